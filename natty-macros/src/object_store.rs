//! `#[object_store(...)]`: parses an object store declaration and registers an `ObjectStoreDef`.

use proc_macro2::TokenStream;
use quote::quote;
use syn::LitStr;

use crate::attr::{self, Errors, MacroArgs as _};
use crate::declaration;

attr::args! {
    /// `#[object_store(...)]`'s keys, in the order an unknown key's error lists them.
    struct Args for "object_store" {
        name: LitStr = "name" => attr::bucket_name;
        replicas: usize = "replicas" => attr::replicas;
        cluster: LitStr = "cluster" => attr::cluster;
        tags: Vec<LitStr> = "tags" => attr::tags;
        max_bytes: i64 = "max_bytes" => |meta| attr::int_at_least(meta, 1);
        storage: TokenStream = "storage" => attr::storage;
        ttl: u64 = "ttl" => attr::duration;
        description: LitStr = "description" => attr::text;
    }
}

/// Expands `#[object_store(args)]` on `item`: the struct unchanged, plus its registration (or the
/// errors, beside the struct).
pub fn expand(args: TokenStream, item: TokenStream) -> TokenStream {
    let mut errors = Errors::default();
    let parsed = Args::parse(args, &mut errors);
    declaration::check_item(&item, "object_store", "struct Config;", &mut errors);
    parsed.name.require(&mut errors, "#[object_store(name = \"reports\")]");
    if let Err(beside) = errors.beside(&item) {
        return beside;
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
    declaration::emit(item, quote!(#p::ObjectStoreDef::new(#name) #(#setters)*))
}
