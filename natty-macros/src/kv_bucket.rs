//! `#[kv_bucket(...)]`: parses a KV bucket declaration and registers a `KvBucketDef`.

use proc_macro2::TokenStream;
use quote::quote;
use syn::LitStr;

use crate::attr::{self, Errors, MacroArgs as _, Parsed};
use crate::declaration;

attr::args! {
    /// `#[kv_bucket(...)]`'s keys, in the order an unknown key's error lists them.
    struct Args for "kv_bucket" {
        name: LitStr = "name" => attr::bucket_name;
        history: i64 = "history" => history;
        ttl: u64 = "ttl" => attr::duration;
        replicas: usize = "replicas" => attr::replicas;
        cluster: LitStr = "cluster" => attr::cluster;
        tags: Vec<LitStr> = "tags" => attr::tags;
        max_value_size: i64 = "max_value_size" => max_value_size;
        max_bytes: i64 = "max_bytes" => |meta| attr::int_at_least(meta, 1);
        storage: TokenStream = "storage" => attr::storage;
        description: LitStr = "description" => attr::text;
    }
}

/// The server's limit on revisions kept per key.
const MAX_HISTORY: i64 = 64;

/// `history = N`: revisions kept per key, 1 to [`MAX_HISTORY`].
fn history(meta: &syn::meta::ParseNestedMeta) -> Parsed<i64> {
    Ok(attr::int_at_least(meta, i64::MIN)?.and_then(|(value, span)| {
        if (1..=MAX_HISTORY).contains(&value) {
            Ok((value, span))
        } else {
            Err(syn::Error::new(
                span,
                format!("`history` must be between 1 and {MAX_HISTORY} (the server keeps at most {MAX_HISTORY} revisions per key)"),
            ))
        }
    }))
}

/// `max_value_size = N`: the server holds it in an `i32`.
fn max_value_size(meta: &syn::meta::ParseNestedMeta) -> Parsed<i64> {
    Ok(attr::int_at_least(meta, 1)?.and_then(|(value, span)| {
        if value > i64::from(i32::MAX) {
            Err(syn::Error::new(
                span,
                format!("`max_value_size` must be at most {}", i32::MAX),
            ))
        } else {
            Ok((value, span))
        }
    }))
}

/// Expands `#[kv_bucket(args)]` on `item`: the struct unchanged, plus its registration (or the
/// errors, beside the struct).
pub fn expand(args: TokenStream, item: TokenStream) -> TokenStream {
    let mut errors = Errors::default();
    let parsed = Args::parse(args, &mut errors);
    declaration::check_item(&item, "kv_bucket", "struct Config;", &mut errors);
    parsed.name.require(&mut errors, "#[kv_bucket(name = \"config\")]");
    if let Err(beside) = errors.beside(&item) {
        return beside;
    }

    let p = attr::private();
    let name = parsed.name.take().map(|lit| lit.value()).unwrap_or_default();
    let mut setters = Vec::new();
    if let Some(value) = parsed.history.take() {
        setters.push(quote!(.history(#value)));
    }
    if let Some(nanos) = parsed.ttl.take() {
        let duration = attr::duration_tokens(nanos);
        setters.push(quote!(.ttl(#duration)));
    }
    if let Some(value) = parsed.replicas.take() {
        setters.push(quote!(.replicas(#value)));
    }
    setters.extend(attr::placement(parsed.cluster, parsed.tags, &p));
    if let Some(value) = parsed.max_value_size.take() {
        let value = value as i32;
        setters.push(quote!(.max_value_size(#value)));
    }
    if let Some(value) = parsed.max_bytes.take() {
        setters.push(quote!(.max_bytes(#value)));
    }
    if let Some(storage) = parsed.storage.take() {
        setters.push(quote!(.storage(#p::StorageType::#storage)));
    }
    if let Some(lit) = parsed.description.take() {
        setters.push(quote!(.description(#lit)));
    }
    declaration::emit(item, quote!(#p::KvBucketDef::new(#name) #(#setters)*))
}
