//! `#[stream(...)]`: parses a stream declaration and registers a `StreamDef`.

use proc_macro2::TokenStream;
use quote::quote;
use syn::LitStr;

use crate::attr::{self, Errors, MacroArgs as _, Parsed};
use crate::declaration;

attr::args! {
    /// `#[stream(...)]`'s keys, in the order an unknown key's error lists them.
    struct Args for "stream" {
        name: LitStr = "name" => |meta| attr::name(meta, "stream name");
        subjects: Vec<LitStr> = "subjects" => attr::subjects;
        retention: TokenStream = "retention" => retention;
        max_age: u64 = "max_age" => attr::duration;
        max_bytes: i64 = "max_bytes" => |meta| attr::int_at_least(meta, 1);
        max_messages: i64 = "max_messages" => |meta| attr::int_at_least(meta, 1);
        storage: TokenStream = "storage" => attr::storage;
        replicas: usize = "replicas" => attr::replicas;
        cluster: LitStr = "cluster" => attr::cluster;
        tags: Vec<LitStr> = "tags" => attr::tags;
        duplicate_window: u64 = "duplicate_window" => attr::duration;
        description: LitStr = "description" => attr::text;
        counters: bool = "counters" => flag;
        atomic_publish: bool = "atomic_publish" => flag;
        schedules: bool = "schedules" => flag;
    }
}

/// `key = true` or `key = false`.
fn flag(meta: &syn::meta::ParseNestedMeta) -> Parsed<bool> {
    let lit: syn::LitBool = meta.value()?.parse()?;
    Ok(Ok((lit.value, lit.span())))
}

/// `retention = "limits" | "interest" | "workqueue"`, as the `Retention` variant.
fn retention(meta: &syn::meta::ParseNestedMeta) -> Parsed<TokenStream> {
    let lit = attr::lit_str(meta)?;
    Ok(match lit.value().as_str() {
        "limits" => Ok(quote!(Limits)),
        "interest" => Ok(quote!(Interest)),
        "workqueue" | "work_queue" => Ok(quote!(WorkQueue)),
        other => Err(syn::Error::new(
            lit.span(),
            format!("unknown retention `{other}`; expected \"limits\", \"interest\" or \"workqueue\""),
        )),
    }
    .map(|tokens| (tokens, lit.span())))
}

/// Expands `#[stream(args)]` on `item`: the struct unchanged, plus its registration (or the
/// errors, beside the struct).
pub fn expand(args: TokenStream, item: TokenStream) -> TokenStream {
    let mut errors = Errors::default();
    let parsed = Args::parse(args, &mut errors);
    declaration::check_item(&item, "stream", "struct Orders;", &mut errors);
    let example = "#[stream(name = \"orders\", subjects = [\"orders.>\"])]";
    parsed.name.require(&mut errors, example);
    parsed.subjects.require(&mut errors, example);
    if let Err(beside) = errors.beside(&item) {
        return beside;
    }

    let p = attr::private();
    let name = parsed.name.take().map(|lit| lit.value()).unwrap_or_default();
    let subjects = parsed.subjects.take().unwrap_or_default();
    let mut setters = Vec::new();
    if let Some(retention) = parsed.retention.take() {
        setters.push(quote!(.retention(#p::Retention::#retention)));
    }
    if let Some(storage) = parsed.storage.take() {
        setters.push(quote!(.storage(#p::StorageType::#storage)));
    }
    if let Some(nanos) = parsed.max_age.take() {
        let duration = attr::duration_tokens(nanos);
        setters.push(quote!(.max_age(#duration)));
    }
    if let Some(nanos) = parsed.duplicate_window.take() {
        let duration = attr::duration_tokens(nanos);
        setters.push(quote!(.duplicate_window(#duration)));
    }
    if let Some(value) = parsed.max_bytes.take() {
        setters.push(quote!(.max_bytes(#value)));
    }
    if let Some(value) = parsed.max_messages.take() {
        setters.push(quote!(.max_messages(#value)));
    }
    if let Some(value) = parsed.replicas.take() {
        setters.push(quote!(.replicas(#value)));
    }
    setters.extend(attr::placement(parsed.cluster, parsed.tags, &p));
    if let Some(lit) = parsed.description.take() {
        setters.push(quote!(.description(#lit)));
    }
    if let Some(on) = parsed.counters.take() {
        setters.push(quote!(.counters(#on)));
    }
    if let Some(on) = parsed.atomic_publish.take() {
        setters.push(quote!(.atomic_publish(#on)));
    }
    if let Some(on) = parsed.schedules.take() {
        setters.push(quote!(.schedules(#on)));
    }

    declaration::emit(item, quote!(#p::StreamDef::new(#name, &[#(#subjects),*]) #(#setters)*))
}
