//! jetcapture's pizza example: orders grouped by store, as gzipped CSV in a local folder per
//! store and as Parquet in S3 (a moto server here), every order in exactly one file of each.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::time::Duration;

use futures_util::StreamExt;
use natty_examples::pizza::PizzaOrder;
use natty_runtime::testing::stores::MotoServer;
use natty_runtime::testing::NatsServer;
use natty_tests::capture::{files, settled};
use natty_tests::{collect_stderr, run_to_exit, send_signal, spawn_service, wait_until};
use object_store::ObjectStoreExt as _;

const CAPTURE: &str = env!("CARGO_BIN_EXE_pizza-capture");
const ORDERS: &str = env!("CARGO_BIN_EXE_pizza-orders");
const COUNT: u64 = 400;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pizza_orders_are_captured_per_store_as_csv_and_as_parquet_in_s3() {
    let server = NatsServer::start().await.expect("nats-server");
    let moto = MotoServer::start().await.expect("moto");
    moto.create_bucket("pizza").await.expect("bucket");
    let dir = tempfile::tempdir().unwrap();
    let csv_store = format!("file://{}", dir.path().join("backup").display());
    let mut env: Vec<(String, String)> = moto.env();
    env.push(("PIZZA_CSV_STORE".into(), csv_store));
    env.push(("PIZZA_PARQUET_STORE".into(), "s3://pizza".into()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();

    let mut capture = spawn_service(Path::new(CAPTURE), Some(&server.url()), &env);
    let logs = collect_stderr(&mut capture);
    let client = server.client().await;
    let js = async_nats::jetstream::new(client);
    wait_until(Duration::from_secs(20), "the capture running", || async {
        logs.lock()
            .unwrap()
            .iter()
            .any(|line| line.contains("natty is running"))
    })
    .await;
    let (code, output) = run_to_exit(
        Path::new(ORDERS),
        Some(&server.url()),
        &[("RUST_LOG", "warn")],
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(code, Some(0), "{output}");
    // Placed twice: the order ids make the stream keep each once.
    let (code, output) = run_to_exit(Path::new(ORDERS), Some(&server.url()), &[], Duration::from_secs(60)).await;
    assert_eq!(code, Some(0), "{output}");

    for durable in ["pizza-csv", "pizza-parquet"] {
        wait_until(
            Duration::from_secs(60),
            &format!("`{durable}` to store every order"),
            || settled(&js, "pizza", durable, COUNT),
        )
        .await;
    }
    send_signal(capture.id().unwrap(), "TERM");
    let status = tokio::time::timeout(Duration::from_secs(30), capture.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{}", logs.lock().unwrap().join("\n"));

    // CSV: backup/<store>/<date>/pizza-<first>-<last>.csv.gz, each row an order of that store.
    let mut csv_seen: BTreeMap<u64, usize> = BTreeMap::new();
    for path in files(&dir.path().join("backup")) {
        let store = path
            .strip_prefix(dir.path().join("backup"))
            .unwrap()
            .iter()
            .next()
            .unwrap();
        let store = store.to_string_lossy().into_owned();
        assert!(path.to_string_lossy().ends_with(".csv.gz"), "{}", path.display());
        let mut text = String::new();
        flate2::read::GzDecoder::new(std::fs::File::open(&path).unwrap())
            .read_to_string(&mut text)
            .unwrap();
        let mut reader = csv::Reader::from_reader(text.as_bytes());
        assert_eq!(
            reader.headers().unwrap().iter().collect::<Vec<_>>(),
            [
                "order_id",
                "store_id",
                "customer",
                "pizza",
                "quantity",
                "price_cents",
                "delivery"
            ]
        );
        for row in reader.records() {
            let row = row.unwrap();
            let id: u64 = row[0].parse().unwrap();
            let expected = PizzaOrder::example(id);
            assert_eq!(row[1], expected.store_id, "order {id} in {store}'s folder");
            assert_eq!(store, expected.store_id);
            assert_eq!(row[5].parse::<u64>().unwrap(), expected.price_cents);
            *csv_seen.entry(id).or_default() += 1;
        }
    }
    assert_eq!(csv_seen.len() as u64, COUNT, "every order in the CSV blocks");
    assert!(csv_seen.values().all(|n| *n == 1), "each order once in the CSV blocks");

    // Parquet in S3: store=<store>/<yyyy>/<mm>/<dd>/pizza-<first>-<last>.parquet.
    let bucket = moto.store("pizza");
    let listed: Vec<_> = bucket.list(None).collect().await;
    let mut parquet_seen: BTreeMap<u64, usize> = BTreeMap::new();
    for meta in listed {
        let meta = meta.unwrap();
        let location = meta.location.to_string();
        assert!(location.ends_with(".parquet"), "{location}");
        let bytes = bucket.get(&meta.location).await.unwrap().bytes().await.unwrap();
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
            .unwrap()
            .build()
            .unwrap();
        for batch in reader {
            let orders: Vec<PizzaOrder> = serde_arrow::from_record_batch(&batch.unwrap()).unwrap();
            for order in orders {
                assert_eq!(order, PizzaOrder::example(order.order_id));
                assert!(
                    location.starts_with(&format!("store={}/", order.store_id)),
                    "{location}"
                );
                *parquet_seen.entry(order.order_id).or_default() += 1;
            }
        }
    }
    assert_eq!(parquet_seen.len() as u64, COUNT, "every order in the Parquet blocks");
    assert!(
        parquet_seen.values().all(|n| *n == 1),
        "each order once in the Parquet blocks"
    );
}
