//! The capture store against real stores: a temporary folder, moto's S3 server and Azurite.
//!
//! What the capture engine relies on: a block lands at the path its template names and reads
//! back byte for byte, through `BlockStore::object_store` and through an independent client;
//! rewriting a block (a redelivery after a crash) replaces it; a 70 MiB block goes up in parts
//! and arrives whole; a local store leaves nothing in `.natty-tmp` and sweeps what a crash left
//! there; a put against a dead server fails with an error naming the store and the block, and
//! the same store works again once the server is back.

use bytes::Bytes;
use futures_util::TryStreamExt as _;
use natty_runtime::capture::store::{
    block_file_name, BlockStore, PathVars, StoreError, MAX_RETRIES_ENV, RETRY_TIMEOUT_ENV,
};
use natty_runtime::testing::stores::{Azurite, MotoServer};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt as _};

/// Over the store's 32 MiB multipart threshold, and not a multiple of its 16 MiB part size.
const LARGE: usize = 70 * 1024 * 1024;
/// 2026-11-23 13:45:00 UTC.
const WINDOW_START: u64 = 1_795_441_500;

/// The variables as an `open_with_env` lookup, plus `extra`.
fn lookup(mut vars: Vec<(String, String)>, extra: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    vars.extend(
        extra
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned())),
    );
    move |name| vars.iter().find(|(var, _)| var == name).map(|(_, value)| value.clone())
}

/// Bytes that no store or transport could compress or dedupe into a false pass (xorshift64).
fn pseudo_random(len: usize, seed: u64) -> Bytes {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

fn sha256(bytes: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, bytes).as_ref().to_vec()
}

async fn read(store: &dyn ObjectStore, path: &Path) -> Bytes {
    let got = store.get(path).await.unwrap_or_else(|err| panic!("get {path}: {err}"));
    got.bytes().await.unwrap_or_else(|err| panic!("read {path}: {err}"))
}

async fn list(store: &dyn ObjectStore, prefix: &Path) -> Vec<String> {
    let mut names: Vec<String> = store
        .list(Some(prefix))
        .map_ok(|meta| meta.location.to_string())
        .try_collect()
        .await
        .unwrap_or_else(|err| panic!("list {prefix}: {err}"));
    names.sort();
    names
}

fn key() -> Vec<(String, String)> {
    // A `/` in a key value must not add a segment.
    vec![("key".to_owned(), "eu/west".to_owned())]
}

fn vars(key: &[(String, String)]) -> PathVars<'_> {
    PathVars {
        stream: "ORDERS",
        durable: "archive",
        key,
        window_start: WINDOW_START,
    }
}

/// Puts, rewrites and reads back a small block and a large one; `reader` is a client built
/// independently of the store. `prefix` is what every block path starts with.
async fn exercise(store: &BlockStore, reader: &dyn ObjectStore, prefix: &str) -> (Path, Path) {
    let key = key();
    let small = store
        .block_path(&vars(&key), &block_file_name("ORDERS", 1, 3, "csv"))
        .expect("small block path");
    let folder = format!("{prefix}ORDERS/eu%2Fwest/2026-11-23");
    assert_eq!(
        small.as_ref(),
        format!("{folder}/ORDERS-00000000000000000001-00000000000000000003.csv")
    );

    store
        .put(&small, Bytes::from_static(b"first"))
        .await
        .expect("put the small block");
    assert_eq!(read(store.object_store().as_ref(), &small).await, "first");
    assert_eq!(read(reader, &small).await, "first");

    // A redelivery rewrites the same block with what it holds now.
    store
        .put(&small, Bytes::from_static(b"second, longer"))
        .await
        .expect("rewrite the small block");
    assert_eq!(read(reader, &small).await, "second, longer");

    let large = store
        .block_path(&vars(&key), &block_file_name("ORDERS", 4, 100_000, "bin"))
        .expect("large block path");
    let payload = pseudo_random(LARGE, 7);
    store.put(&large, payload.clone()).await.expect("put the large block");
    let meta = reader.head(&large).await.expect("head the large block");
    assert_eq!(meta.size, LARGE as u64);
    let back = read(reader, &large).await;
    assert_eq!(back.len(), LARGE);
    assert!(sha256(&back) == sha256(&payload), "the large block came back different");

    // Only the two blocks are visible: no temporary, part or half-written object.
    assert_eq!(
        list(reader, &Path::parse(&folder).expect("folder path")).await,
        [small.to_string(), large.to_string()],
    );
    (small, large)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_folder_stores_blocks_atomically_and_sweeps_leftovers() {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path().join("blocks");
    let url = format!("file://{}/{{stream}}/{{key}}/{{date}}/", root.display());
    let store = BlockStore::open_with_env(&url, &|_| None).expect("open the local store");
    assert_eq!(store.scheme(), "file");

    // A block a crash left half-written.
    let tmp = root.join(".natty-tmp");
    std::fs::create_dir_all(&tmp).expect("create .natty-tmp");
    std::fs::write(tmp.join("4242-0.tmp"), b"half a block").expect("write a leftover");
    assert_eq!(store.sweep_temporaries().await.expect("sweep"), 1);
    assert_eq!(std::fs::read_dir(&tmp).expect("list .natty-tmp").count(), 0);

    let reader = object_store::local::LocalFileSystem::new();
    let prefix = object_store::path::Path::from_absolute_path(&root).expect("root as object path");
    let (small, large) = exercise(&store, &reader, &format!("{prefix}/")).await;

    // The blocks are plain files where the template says, and nothing is left in .natty-tmp.
    let folder = root.join("ORDERS").join("eu%2Fwest").join("2026-11-23");
    let small_file = folder.join("ORDERS-00000000000000000001-00000000000000000003.csv");
    assert_eq!(
        std::fs::read(&small_file).expect("read the small block file"),
        b"second, longer"
    );
    assert_eq!(
        std::fs::metadata(folder.join("ORDERS-00000000000000000004-00000000000000100000.bin"))
            .expect("the large block file")
            .len(),
        LARGE as u64
    );
    assert_eq!(std::fs::read_dir(&tmp).expect("list .natty-tmp").count(), 0);
    assert_eq!(store.sweep_temporaries().await.expect("sweep"), 0);
    assert_eq!(
        store.describe(&small),
        format!("file://{}", small_file.display()),
        "describe gives the file's URL"
    );
    assert!(store.describe(&large).ends_with(".bin"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_stores_blocks_on_moto() {
    let moto = MotoServer::start().await.expect("start moto");
    moto.create_bucket("capture").await.expect("create bucket");
    let env = lookup(moto.env(), &[]);
    let store = BlockStore::open_with_env("s3://capture/raw/{stream}/{key}/{date}/", &env).expect("open S3 store");
    assert_eq!(store.scheme(), "s3");
    assert_eq!(store.sweep_temporaries().await.expect("sweep"), 0);

    let reader = moto.store("capture");
    let (small, large) = exercise(&store, reader.as_ref(), "raw/").await;
    assert_eq!(
        store.describe(&small),
        "s3://capture/raw/ORDERS/eu%2Fwest/2026-11-23/ORDERS-00000000000000000001-00000000000000000003.csv"
    );
    // S3 gives a multipart object the ETag `<md5 of the parts' md5s>-<parts>`: 70 MiB in 16 MiB
    // parts is 5 parts, so this proves the large block went up in parts.
    let e_tag = reader.head(&large).await.expect("head").e_tag.unwrap_or_default();
    assert!(
        e_tag.trim_matches('"').ends_with("-5"),
        "ETag {e_tag} is not a 5-part upload's"
    );
    let e_tag = reader.head(&small).await.expect("head").e_tag.unwrap_or_default();
    assert!(
        !e_tag.contains('-'),
        "ETag {e_tag}: the small block should be a single PUT"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_stores_blocks_on_azurite() {
    let mut azurite = Azurite::start().await.expect("start Azurite");
    azurite.create_container("capture").await.expect("create container");
    azurite
        .create_container("capture")
        .await
        .expect("creating it again is a no-op");
    let env = lookup(azurite.env(), &[]);
    let store = BlockStore::open_with_env("az://capture/{stream}/{key}/{date}/", &env).expect("open Azure store");
    assert_eq!(store.scheme(), "az");
    // `azure://` is the same store.
    let same = BlockStore::open_with_env("azure://capture/{stream}/{key}/{date}/", &env).expect("open azure://");
    assert_eq!(same.scheme(), "az");

    let reader = azurite.store("capture");
    let (small, large) = exercise(&store, reader.as_ref(), "").await;
    assert_eq!(
        store.describe(&small),
        "az://capture/ORDERS/eu%2Fwest/2026-11-23/ORDERS-00000000000000000001-00000000000000000003.csv"
    );

    // Azurite keeps its data across a restart, as its harness docs promise.
    azurite.restart().await.expect("restart Azurite");
    assert_eq!(read(reader.as_ref(), &small).await, "second, longer");
    assert_eq!(
        reader.head(&large).await.expect("head after restart").size,
        LARGE as u64
    );
    // Blocks are written through `open_with_env`, never through process-wide variables.
    assert!(std::env::var_os("AZURITE_BLOB_STORAGE_URL").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_put_fails_clearly_while_moto_is_down_and_works_once_it_is_back() {
    let mut moto = MotoServer::start().await.expect("start moto");
    moto.create_bucket("capture").await.expect("create bucket");
    // Few, short retries: the default (10 retries, 3 minutes) is for production.
    let env = lookup(moto.env(), &[(MAX_RETRIES_ENV, "2"), (RETRY_TIMEOUT_ENV, "5s")]);
    let url = "s3://capture/{key}/";
    let store = BlockStore::open_with_env(url, &env).expect("open S3 store");
    let key = key();
    let path = store
        .block_path(&vars(&key), &block_file_name("ORDERS", 1, 1, "csv"))
        .expect("block path");
    store
        .put(&path, Bytes::from_static(b"before"))
        .await
        .expect("put while up");

    moto.stop().await;
    let err = store
        .put(&path, Bytes::from_static(b"while down"))
        .await
        .expect_err("a put with the server down must fail");
    assert!(matches!(err, StoreError::Io { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains(url), "the error names the store URL: {message}");
    assert!(
        message.contains(&store.describe(&path)),
        "the error names the block: {message}"
    );

    // moto forgets everything on restart: the bucket has to be created again.
    moto.restart().await.expect("restart moto");
    let err = store
        .put(&path, Bytes::from_static(b"no bucket"))
        .await
        .expect_err("the bucket is gone after a moto restart");
    assert!(err.to_string().contains(url), "{err}");
    moto.create_bucket("capture").await.expect("create bucket again");
    store
        .put(&path, Bytes::from_static(b"after"))
        .await
        .expect("put after restart");
    assert_eq!(read(moto.store("capture").as_ref(), &path).await, "after");
}
