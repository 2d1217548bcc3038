//! `#[kv_watch(bucket = "...", key = "...")]`: a handler called on each change of a KV key.

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{ItemFn, LitStr};

use crate::attr::{self, Errors, Slot};
use crate::handler::{self, HandlerKind};

const KEYS: &[&str] = &["bucket", "key", "history"];

const KV_WATCH: HandlerKind = HandlerKind {
    what: "a #[kv_watch] handler",
    undecodable: "CoreOutcome::Undecodable",
    delivery_type: "KvDelivery",
    describes_payload: true,
};

pub fn expand(args: TokenStream, item: TokenStream) -> TokenStream {
    let mut errors = Errors::default();
    let mut bucket: Slot<LitStr> = Slot::new("bucket");
    let mut key: Slot<LitStr> = Slot::new("key");
    let mut history: Slot<bool> = Slot::new("history");
    let seen = attr::parse_keys(args, &mut errors, |name, meta| {
        Ok(match name {
            "bucket" => {
                let lit = attr::lit_str(meta)?;
                attr::check_name(&lit, "bucket name").and_then(|()| bucket.set(meta, lit.clone(), lit.span()))
            }
            "key" => {
                let lit = attr::lit_str(meta)?;
                attr::check_subject(&lit).and_then(|()| key.set(meta, lit.clone(), lit.span()))
            }
            "history" => {
                let lit: syn::LitBool = meta.value()?.parse()?;
                history.set(meta, lit.value, lit.span())
            }
            _ => return attr::unknown_key(meta, "kv_watch", KEYS),
        })
    });
    let function: ItemFn = match syn::parse2(item.clone()) {
        Ok(function) => function,
        Err(_) => {
            let error = syn::Error::new_spanned(&item, "`#[kv_watch]` goes on an `async fn`").to_compile_error();
            return quote!(#item #error);
        }
    };
    let handler_args = handler::signature(&function, &mut errors, &KV_WATCH);
    if !seen.iter().any(|seen| seen == "bucket") {
        errors.push(syn::Error::new(
            Span::call_site(),
            "missing `bucket`, e.g. #[kv_watch(bucket = \"config\", key = \"features.>\")]",
        ));
    }
    if let Err(error) = errors.into_result() {
        let error = error.to_compile_error();
        return quote!(#item #error);
    }

    let p = attr::private();
    let ident = &function.sig.ident;
    let adapter = format_ident!("__natty_kv_watch_{}", ident);
    let name = ident.to_string();
    let bucket = bucket.take().map(|lit| lit.value()).unwrap_or_default();
    let key = key.take().map_or_else(|| ">".to_string(), |lit| lit.value());
    let history = history.take().unwrap_or(false);
    let result = handler::result_ident();
    let outcome = match &function.sig.output {
        syn::ReturnType::Default => quote!(#p::CoreOutcome::subscribed(#result)),
        syn::ReturnType::Type(_, ty) => quote_spanned! {ty.span()=>
            #p::CoreOutcome::from_outcome(<#ty as #p::IntoOutcome>::into_outcome(#result))
        },
    };
    handler::emit(
        &function,
        &KV_WATCH,
        &handler_args,
        None,
        &adapter,
        quote!(#p::CoreOutcome),
        outcome,
        quote!(#p::KvWatchDef::new(#name, #bucket, #key, #adapter).history(#history)),
        TokenStream::new(),
    )
}
