//! `#[stream(...)]`: parses a stream declaration and registers a `StreamDef`.

use proc_macro2::TokenStream;
use quote::quote;
use syn::{Item, LitStr};

use crate::attr::{self, Errors, Slot};

const KEYS: &[&str] = &[
    "name",
    "subjects",
    "retention",
    "max_age",
    "max_bytes",
    "max_messages",
    "storage",
    "replicas",
    "cluster",
    "tags",
    "duplicate_window",
    "description",
];

struct Args {
    name: Slot<LitStr>,
    subjects: Slot<Vec<LitStr>>,
    retention: Slot<TokenStream>,
    max_age: Slot<u64>,
    max_bytes: Slot<i64>,
    max_messages: Slot<i64>,
    storage: Slot<TokenStream>,
    replicas: Slot<usize>,
    placement: attr::Placement,
    duplicate_window: Slot<u64>,
    description: Slot<LitStr>,
}

impl Args {
    fn parse(args: TokenStream, errors: &mut Errors) -> (Args, Vec<String>) {
        let mut parsed = Args {
            name: Slot::new("name"),
            subjects: Slot::new("subjects"),
            retention: Slot::new("retention"),
            max_age: Slot::new("max_age"),
            max_bytes: Slot::new("max_bytes"),
            max_messages: Slot::new("max_messages"),
            storage: Slot::new("storage"),
            replicas: Slot::new("replicas"),
            placement: attr::Placement::default(),
            duplicate_window: Slot::new("duplicate_window"),
            description: Slot::new("description"),
        };
        let seen = attr::parse_keys(args, errors, |key, meta| parsed.key(key, meta));
        (parsed, seen)
    }

    /// Outer error: the attribute cannot be parsed further. Inner error: this key's value is
    /// wrong; parsing goes on.
    fn key(&mut self, key: &str, meta: &syn::meta::ParseNestedMeta) -> syn::Result<syn::Result<()>> {
        Ok(match key {
            "name" => {
                let lit = attr::lit_str(meta)?;
                attr::check_name(&lit, "stream name").and_then(|()| self.name.set(meta, lit.clone(), lit.span()))
            }
            "subjects" => {
                let subjects = attr::str_or_list(meta)?;
                let span = subjects
                    .first()
                    .map_or_else(proc_macro2::Span::call_site, |lit| lit.span());
                subjects
                    .iter()
                    .try_for_each(attr::check_subject)
                    .and_then(|()| self.subjects.set(meta, subjects, span))
            }
            "retention" => {
                let lit = attr::lit_str(meta)?;
                match lit.value().as_str() {
                    "limits" => Ok(quote!(Limits)),
                    "interest" => Ok(quote!(Interest)),
                    "workqueue" | "work_queue" => Ok(quote!(WorkQueue)),
                    other => Err(syn::Error::new(
                        lit.span(),
                        format!("unknown retention `{other}`; expected \"limits\", \"interest\" or \"workqueue\""),
                    )),
                }
                .and_then(|tokens| self.retention.set(meta, tokens, lit.span()))
            }
            "storage" => {
                let lit = attr::lit_str(meta)?;
                attr::storage(&lit).and_then(|tokens| self.storage.set(meta, tokens, lit.span()))
            }
            "max_age" => {
                let lit = attr::lit_str(meta)?;
                attr::duration(&lit).and_then(|nanos| self.max_age.set(meta, nanos, lit.span()))
            }
            "duplicate_window" => {
                let lit = attr::lit_str(meta)?;
                attr::duration(&lit).and_then(|nanos| self.duplicate_window.set(meta, nanos, lit.span()))
            }
            "max_bytes" => attr::int_at_least(meta, "max_bytes", 1)?
                .and_then(|(value, span)| self.max_bytes.set(meta, value, span)),
            "max_messages" => attr::int_at_least(meta, "max_messages", 1)?
                .and_then(|(value, span)| self.max_messages.set(meta, value, span)),
            "replicas" => attr::replicas(meta)?.and_then(|(value, span)| self.replicas.set(meta, value, span)),
            "description" => {
                let lit = attr::lit_str(meta)?;
                self.description.set(meta, lit.clone(), lit.span())
            }
            _ => match self.placement.key(key, meta)? {
                Some(parsed) => parsed,
                None => return attr::unknown_key(meta, "stream", KEYS),
            },
        })
    }
}

pub fn expand(args: TokenStream, item: TokenStream) -> TokenStream {
    let mut errors = Errors::default();
    let (parsed, seen) = Args::parse(args, &mut errors);
    let item_tokens = item.clone();
    match syn::parse2::<Item>(item) {
        Ok(Item::Struct(item)) if item.generics.params.is_empty() => {}
        Ok(Item::Struct(item)) => errors.spanned(&item.generics, "a `#[stream]` struct cannot be generic"),
        Ok(Item::Fn(item)) => errors.spanned(item.sig.fn_token, "`#[stream]` goes on a struct, e.g. `struct Orders;`"),
        Ok(other) => errors.spanned(other, "`#[stream]` goes on a struct, e.g. `struct Orders;`"),
        Err(error) => errors.push(error),
    }
    for key in ["name", "subjects"] {
        // A key given with a bad value was already reported; it is not also "missing".
        if !seen.iter().any(|seen| seen == key) {
            errors.push(syn::Error::new(
                proc_macro2::Span::call_site(),
                format!("missing `{key}`, e.g. #[stream(name = \"orders\", subjects = [\"orders.>\"])]"),
            ));
        }
    }
    if let Err(error) = errors.into_result() {
        let error = error.to_compile_error();
        return quote!(#item_tokens #error);
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
    setters.extend(parsed.placement.setter(&p));
    if let Some(lit) = parsed.description.take() {
        setters.push(quote!(.description(#lit)));
    }

    quote! {
        // The declaration is the item's only use; it is never constructed.
        #[allow(dead_code)]
        #item_tokens
        const _: () = {
            #p::inventory::submit! {
                #p::StreamDef::new(#name, &[#(#subjects),*])
                    #(#setters)*
                    .at(#p::Location { file: ::core::file!(), line: ::core::line!(), module: ::core::module_path!() })
            }
        };
    }
}
