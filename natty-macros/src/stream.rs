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
    duplicate_window: Slot<u64>,
    description: Slot<LitStr>,
}

impl Args {
    fn parse(args: TokenStream, errors: &mut Errors) -> Args {
        let mut parsed = Args {
            name: Slot::new("name"),
            subjects: Slot::new("subjects"),
            retention: Slot::new("retention"),
            max_age: Slot::new("max_age"),
            max_bytes: Slot::new("max_bytes"),
            max_messages: Slot::new("max_messages"),
            storage: Slot::new("storage"),
            replicas: Slot::new("replicas"),
            duplicate_window: Slot::new("duplicate_window"),
            description: Slot::new("description"),
        };
        let parser = syn::meta::parser(|meta| parsed.key(&meta));
        if let Err(error) = syn::parse::Parser::parse2(parser, args) {
            errors.push(error);
        }
        parsed
    }

    fn key(&mut self, meta: &syn::meta::ParseNestedMeta) -> syn::Result<()> {
        let Some(key) = meta.path.get_ident().map(|ident| ident.to_string()) else {
            return Err(attr::unknown_key(meta, "stream", KEYS));
        };
        match key.as_str() {
            "name" => {
                let lit = attr::lit_str(meta)?;
                attr::check_name(&lit, "stream name")?;
                self.name.set(meta, lit)
            }
            "subjects" => {
                let subjects = attr::str_or_list(meta)?;
                for subject in &subjects {
                    attr::check_subject(subject)?;
                }
                self.subjects.set(meta, subjects)
            }
            "retention" => {
                let lit = attr::lit_str(meta)?;
                let tokens = match lit.value().as_str() {
                    "limits" => quote!(Limits),
                    "interest" => quote!(Interest),
                    "workqueue" | "work_queue" => quote!(WorkQueue),
                    other => {
                        return Err(syn::Error::new(
                            lit.span(),
                            format!("unknown retention `{other}`; expected \"limits\", \"interest\" or \"workqueue\""),
                        ))
                    }
                };
                self.retention.set(meta, tokens)
            }
            "storage" => {
                let lit = attr::lit_str(meta)?;
                let tokens = match lit.value().as_str() {
                    "file" => quote!(File),
                    "memory" => quote!(Memory),
                    other => {
                        return Err(syn::Error::new(
                            lit.span(),
                            format!("unknown storage `{other}`; expected \"file\" or \"memory\""),
                        ))
                    }
                };
                self.storage.set(meta, tokens)
            }
            "max_age" => {
                let nanos = attr::duration(&attr::lit_str(meta)?)?;
                self.max_age.set(meta, nanos)
            }
            "duplicate_window" => {
                let nanos = attr::duration(&attr::lit_str(meta)?)?;
                self.duplicate_window.set(meta, nanos)
            }
            "max_bytes" => {
                let (value, lit) = attr::lit_int::<i64>(meta)?;
                if value < 1 {
                    return Err(syn::Error::new(lit.span(), "`max_bytes` must be at least 1"));
                }
                self.max_bytes.set(meta, value)
            }
            "max_messages" => {
                let (value, lit) = attr::lit_int::<i64>(meta)?;
                if value < 1 {
                    return Err(syn::Error::new(lit.span(), "`max_messages` must be at least 1"));
                }
                self.max_messages.set(meta, value)
            }
            "replicas" => {
                let (value, lit) = attr::lit_int::<usize>(meta)?;
                if !(1..=5).contains(&value) {
                    return Err(syn::Error::new(lit.span(), "`replicas` must be between 1 and 5"));
                }
                self.replicas.set(meta, value)
            }
            "description" => {
                let lit = attr::lit_str(meta)?;
                self.description.set(meta, lit)
            }
            _ => Err(attr::unknown_key(meta, "stream", KEYS)),
        }
    }
}

pub fn expand(args: TokenStream, item: TokenStream) -> TokenStream {
    let mut errors = Errors::default();
    let parsed = Args::parse(args, &mut errors);
    let item_tokens = item.clone();
    let item: Item = match syn::parse2(item) {
        Ok(item) => item,
        Err(error) => return error.to_compile_error(),
    };
    if !matches!(item, Item::Struct(_) | Item::Enum(_)) {
        errors.spanned(&item, "`#[stream]` goes on a struct, e.g. `struct Orders;`");
    }
    if parsed.name.get().is_none() {
        errors.push(syn::Error::new(
            proc_macro2::Span::call_site(),
            "missing `name`, e.g. #[stream(name = \"orders\", subjects = [\"orders.>\"])]",
        ));
    }
    if parsed.subjects.get().is_none() {
        errors.push(syn::Error::new(
            proc_macro2::Span::call_site(),
            "missing `subjects`, e.g. #[stream(name = \"orders\", subjects = [\"orders.>\"])]",
        ));
    }
    if let Err(error) = errors.into_result() {
        let error = error.to_compile_error();
        return quote!(#item_tokens #error);
    }

    let p = quote!(::natty_runtime::__private);
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
