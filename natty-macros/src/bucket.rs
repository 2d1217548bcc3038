//! `#[kv_bucket(...)]` and `#[object_store(...)]`: parse a bucket declaration and register a
//! `KvBucketDef` or an `ObjectStoreDef`.

use proc_macro2::TokenStream;
use quote::quote;
use syn::{Item, LitStr};

use crate::attr::{self, Errors, MacroArgs as _, Parsed};

attr::args! {
    /// `#[kv_bucket(...)]`'s keys, in the order an unknown key's error lists them.
    struct KvArgs for "kv_bucket" {
        name: LitStr = "name" => bucket_name;
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

attr::args! {
    /// `#[object_store(...)]`'s keys, in the order an unknown key's error lists them.
    struct ObjectStoreArgs for "object_store" {
        name: LitStr = "name" => bucket_name;
        replicas: usize = "replicas" => attr::replicas;
        cluster: LitStr = "cluster" => attr::cluster;
        tags: Vec<LitStr> = "tags" => attr::tags;
        max_bytes: i64 = "max_bytes" => |meta| attr::int_at_least(meta, 1);
        storage: TokenStream = "storage" => attr::storage;
        ttl: u64 = "ttl" => attr::duration;
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

/// Bucket names become stream names (`KV_<name>`, `OBJ_<name>`) and subject tokens: the
/// server and async-nats accept only letters, digits, `-` and `_`.
fn bucket_name(meta: &syn::meta::ParseNestedMeta) -> Parsed<LitStr> {
    let lit = attr::lit_str(meta)?;
    Ok(check_bucket_name(&lit).map(|()| (lit.clone(), lit.span())))
}

fn check_bucket_name(lit: &LitStr) -> syn::Result<()> {
    attr::check_name(lit, "bucket name")?;
    let name = lit.value();
    match name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        Some(bad) => Err(syn::Error::new(
            lit.span(),
            format!(
                "invalid bucket name `{name}`: bucket names cannot contain `{bad}`; use letters, digits, `-` and `_`"
            ),
        )),
        None => Ok(()),
    }
}

pub fn expand_kv(args: TokenStream, item: TokenStream) -> TokenStream {
    let mut errors = Errors::default();
    let parsed = KvArgs::parse(args, &mut errors);
    check_item(&item, "kv_bucket", &mut errors);
    parsed.name.require(&mut errors, "#[kv_bucket(name = \"config\")]");
    if let Err(error) = errors.into_result() {
        let error = error.to_compile_error();
        return quote!(#item #error);
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
    emit(item, quote!(#p::KvBucketDef::new(#name) #(#setters)*))
}

pub fn expand_object_store(args: TokenStream, item: TokenStream) -> TokenStream {
    let mut errors = Errors::default();
    let parsed = ObjectStoreArgs::parse(args, &mut errors);
    check_item(&item, "object_store", &mut errors);
    parsed.name.require(&mut errors, "#[object_store(name = \"reports\")]");
    if let Err(error) = errors.into_result() {
        let error = error.to_compile_error();
        return quote!(#item #error);
    }

    let p = attr::private();
    let name = parsed.name.take().map(|lit| lit.value()).unwrap_or_default();
    let mut setters = Vec::new();
    if let Some(nanos) = parsed.ttl.take() {
        let duration = attr::duration_tokens(nanos);
        setters.push(quote!(.ttl(#duration)));
    }
    if let Some(value) = parsed.replicas.take() {
        setters.push(quote!(.replicas(#value)));
    }
    setters.extend(attr::placement(parsed.cluster, parsed.tags, &p));
    if let Some(value) = parsed.max_bytes.take() {
        setters.push(quote!(.max_bytes(#value)));
    }
    if let Some(storage) = parsed.storage.take() {
        setters.push(quote!(.storage(#p::StorageType::#storage)));
    }
    if let Some(lit) = parsed.description.take() {
        setters.push(quote!(.description(#lit)));
    }
    emit(item, quote!(#p::ObjectStoreDef::new(#name) #(#setters)*))
}

/// Checks that the macro is on a plain struct: the declaration's only use is to be registered.
fn check_item(item: &TokenStream, macro_name: &str, errors: &mut Errors) {
    let misplaced = format!("`#[{macro_name}]` goes on a struct, e.g. `struct Config;`");
    match syn::parse2::<Item>(item.clone()) {
        Ok(Item::Struct(item)) if item.generics.params.is_empty() => {}
        Ok(Item::Struct(item)) => {
            errors.spanned(&item.generics, format!("a `#[{macro_name}]` struct cannot be generic"))
        }
        Ok(Item::Fn(item)) => errors.spanned(item.sig.fn_token, &misplaced),
        Ok(other) => errors.spanned(other, &misplaced),
        Err(error) => errors.push(error),
    }
}

/// The struct unchanged, and the registration of `definition` with where it was written.
fn emit(item: TokenStream, definition: TokenStream) -> TokenStream {
    let p = attr::private();
    quote! {
        // The declaration is the item's only use; it is never constructed.
        #[allow(dead_code)]
        #item
        const _: () = {
            #p::inventory::submit! {
                #definition
                    .at(#p::Location { file: ::core::file!(), line: ::core::line!(), module: ::core::module_path!() })
            }
        };
    }
}
