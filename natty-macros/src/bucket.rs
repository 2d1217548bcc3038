//! `#[kv_bucket(...)]` and `#[object_store(...)]`: parse a bucket declaration and register a
//! `KvBucketDef` or an `ObjectStoreDef`.

use proc_macro2::{Span, TokenStream};
use quote::quote;
use syn::{Item, LitStr};

use crate::attr::{self, Errors, Slot};

/// What the two macros differ in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Kv,
    ObjectStore,
}

impl Kind {
    fn macro_name(self) -> &'static str {
        match self {
            Kind::Kv => "kv_bucket",
            Kind::ObjectStore => "object_store",
        }
    }

    fn keys(self) -> &'static [&'static str] {
        match self {
            Kind::Kv => &[
                "name",
                "history",
                "ttl",
                "replicas",
                "cluster",
                "tags",
                "max_value_size",
                "max_bytes",
                "storage",
                "description",
            ],
            Kind::ObjectStore => &[
                "name",
                "replicas",
                "cluster",
                "tags",
                "max_bytes",
                "storage",
                "ttl",
                "description",
            ],
        }
    }

    fn example(self) -> &'static str {
        match self {
            Kind::Kv => "#[kv_bucket(name = \"config\")]",
            Kind::ObjectStore => "#[object_store(name = \"reports\")]",
        }
    }
}

/// The server's limit on revisions kept per key.
const MAX_HISTORY: i64 = 64;

struct Args {
    kind: Kind,
    name: Slot<LitStr>,
    history: Slot<i64>,
    ttl: Slot<u64>,
    replicas: Slot<usize>,
    placement: attr::Placement,
    max_value_size: Slot<i64>,
    max_bytes: Slot<i64>,
    storage: Slot<TokenStream>,
    description: Slot<LitStr>,
}

impl Args {
    fn parse(kind: Kind, args: TokenStream, errors: &mut Errors) -> (Args, Vec<String>) {
        let mut parsed = Args {
            kind,
            name: Slot::new("name"),
            history: Slot::new("history"),
            ttl: Slot::new("ttl"),
            replicas: Slot::new("replicas"),
            placement: attr::Placement::default(),
            max_value_size: Slot::new("max_value_size"),
            max_bytes: Slot::new("max_bytes"),
            storage: Slot::new("storage"),
            description: Slot::new("description"),
        };
        let seen = attr::parse_keys(args, errors, |key, meta| parsed.key(key, meta));
        (parsed, seen)
    }

    /// Outer error: the attribute cannot be parsed further. Inner error: this key's value is
    /// wrong; parsing goes on.
    fn key(&mut self, key: &str, meta: &syn::meta::ParseNestedMeta) -> syn::Result<syn::Result<()>> {
        let kv = self.kind == Kind::Kv;
        Ok(match key {
            "name" => {
                let lit = attr::lit_str(meta)?;
                check_bucket_name(&lit).and_then(|()| self.name.set(meta, lit.clone(), lit.span()))
            }
            "history" if kv => attr::int_at_least(meta, "history", i64::MIN)?.and_then(|(value, span)| {
                if (1..=MAX_HISTORY).contains(&value) {
                    self.history.set(meta, value, span)
                } else {
                    Err(syn::Error::new(
                        span,
                        format!("`history` must be between 1 and {MAX_HISTORY} (the server keeps at most {MAX_HISTORY} revisions per key)"),
                    ))
                }
            }),
            "ttl" => {
                let lit = attr::lit_str(meta)?;
                attr::duration(&lit).and_then(|nanos| self.ttl.set(meta, nanos, lit.span()))
            }
            "replicas" => attr::replicas(meta)?.and_then(|(value, span)| self.replicas.set(meta, value, span)),
            "max_value_size" if kv => attr::int_at_least(meta, "max_value_size", 1)?.and_then(|(value, span)| {
                if value > i64::from(i32::MAX) {
                    Err(syn::Error::new(
                        span,
                        format!("`max_value_size` must be at most {}", i32::MAX),
                    ))
                } else {
                    self.max_value_size.set(meta, value, span)
                }
            }),
            "max_bytes" => attr::int_at_least(meta, "max_bytes", 1)?
                .and_then(|(value, span)| self.max_bytes.set(meta, value, span)),
            "storage" => {
                let lit = attr::lit_str(meta)?;
                attr::storage(&lit).and_then(|tokens| self.storage.set(meta, tokens, lit.span()))
            }
            "description" => {
                let lit = attr::lit_str(meta)?;
                self.description.set(meta, lit.clone(), lit.span())
            }
            _ => match self.placement.key(key, meta)? {
                Some(parsed) => parsed,
                None => return attr::unknown_key(meta, self.kind.macro_name(), self.kind.keys()),
            },
        })
    }
}

/// Bucket names become stream names (`KV_<name>`, `OBJ_<name>`) and subject tokens: the
/// server and async-nats accept only letters, digits, `-` and `_`.
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
    expand(Kind::Kv, args, item)
}

pub fn expand_object_store(args: TokenStream, item: TokenStream) -> TokenStream {
    expand(Kind::ObjectStore, args, item)
}

fn expand(kind: Kind, args: TokenStream, item: TokenStream) -> TokenStream {
    let macro_name = kind.macro_name();
    let mut errors = Errors::default();
    let (parsed, seen) = Args::parse(kind, args, &mut errors);
    let item_tokens = item.clone();
    let misplaced = format!("`#[{macro_name}]` goes on a struct, e.g. `struct Config;`");
    match syn::parse2::<Item>(item) {
        Ok(Item::Struct(item)) if item.generics.params.is_empty() => {}
        Ok(Item::Struct(item)) => {
            errors.spanned(&item.generics, format!("a `#[{macro_name}]` struct cannot be generic"))
        }
        Ok(Item::Fn(item)) => errors.spanned(item.sig.fn_token, &misplaced),
        Ok(other) => errors.spanned(other, &misplaced),
        Err(error) => errors.push(error),
    }
    // A name given with a bad value was already reported; it is not also "missing".
    if !seen.iter().any(|seen| seen == "name") {
        errors.push(syn::Error::new(
            Span::call_site(),
            format!("missing `name`, e.g. {}", kind.example()),
        ));
    }
    if let Err(error) = errors.into_result() {
        let error = error.to_compile_error();
        return quote!(#item_tokens #error);
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
    setters.extend(parsed.placement.setter(&p));
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
    let def = match kind {
        Kind::Kv => quote!(#p::KvBucketDef),
        Kind::ObjectStore => quote!(#p::ObjectStoreDef),
    };

    quote! {
        // The declaration is the item's only use; it is never constructed.
        #[allow(dead_code)]
        #item_tokens
        const _: () = {
            #p::inventory::submit! {
                #def::new(#name)
                    #(#setters)*
                    .at(#p::Location { file: ::core::file!(), line: ::core::line!(), module: ::core::module_path!() })
            }
        };
    }
}
