//! `#[kv_watch(bucket = "...", key = "...")]`: a handler called on each change of a KV key.

use proc_macro2::TokenStream;
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::LitStr;

use crate::attr::{self, Errors, MacroArgs as _};
use crate::handler::{self, Describes, HandlerKind};

attr::args! {
    /// `#[kv_watch(...)]`'s keys.
    struct Args for "kv_watch" {
        bucket: LitStr = "bucket" => |meta| attr::name(meta, "bucket name");
        /// Which keys to watch: wildcards allowed.
        key: LitStr = "key" => attr::subject;
        /// Whether to start with the current values.
        history: bool = "history" => |meta| {
            let lit: syn::LitBool = meta.value()?.parse()?;
            Ok(Ok((lit.value, lit.span())))
        };
    }
}

const KV_WATCH: HandlerKind = HandlerKind {
    what: "a #[kv_watch] handler",
    undecodable: "CoreOutcome::Undecodable",
    delivery_type: "KvDelivery",
    describes: Describes::Argument,
};

/// Expands `#[kv_watch(args)]` on `item`: the handler unchanged, plus its adapter and
/// registration (or the errors, beside the handler).
pub fn expand(args: TokenStream, item: TokenStream) -> TokenStream {
    let mut errors = Errors::default();
    let parsed = Args::parse(args, &mut errors);
    let function = match handler::function(&item, "kv_watch", "an `async fn`") {
        Ok(function) => function,
        Err(beside) => return beside,
    };
    let handler_args = handler::signature(&function, &mut errors, &KV_WATCH);
    parsed
        .bucket
        .require(&mut errors, "#[kv_watch(bucket = \"config\", key = \"features.>\")]");
    if let Err(beside) = errors.beside(&item) {
        return beside;
    }

    let p = attr::private();
    let ident = &function.sig.ident;
    let adapter = format_ident!("__natty_kv_watch_{}", ident);
    let name = ident.to_string();
    let bucket = parsed.bucket.take().map(|lit| lit.value()).unwrap_or_default();
    let key = parsed.key.take().map_or_else(|| ">".to_string(), |lit| lit.value());
    let history = parsed.history.take().unwrap_or(false);
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
