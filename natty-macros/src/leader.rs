//! `#[leader(bucket = "...", key = "...", ttl = "10s")]`: a task that runs in one instance at a time.

use proc_macro2::TokenStream;
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::LitStr;

use crate::attr::{self, Errors, MacroArgs as _};
use crate::handler::{self, Describes, HandlerKind};

attr::args! {
    /// `#[leader(...)]`'s keys.
    struct Args for "leader" {
        /// The KV bucket holding the election.
        bucket: LitStr = "bucket" => |meta| attr::name(meta, "bucket name");
        /// The election's key in it: one key, no wildcards.
        key: LitStr = "key" => |meta| {
            let lit = attr::lit_str(meta)?;
            Ok(check_key(&lit).map(|()| (lit.clone(), lit.span())))
        };
        /// How long a lease lasts unless renewed.
        ttl: u64 = "ttl" => |meta| attr::duration_at_least(
            meta,
            MIN_TTL_NANOS,
            "`ttl` must be at least 1s: the server counts lease TTLs in whole seconds",
        );
    }
}

const LEADER: HandlerKind = HandlerKind {
    what: "a #[leader] task",
    // Never used: nothing a leader task takes can fail to build.
    undecodable: "Outcome::Undecodable",
    delivery_type: "Lease",
    describes: Describes::Nothing,
};

/// Leases shorter than this cannot be kept: the server counts TTLs in whole seconds.
const MIN_TTL_NANOS: u64 = 1_000_000_000;

/// Expands `#[leader(args)]` on `item`: the task unchanged, plus its adapter and registration
/// (or the errors, beside the task).
pub fn expand(args: TokenStream, item: TokenStream) -> TokenStream {
    let mut errors = Errors::default();
    let parsed = Args::parse(args, &mut errors);
    let function = match handler::function(&item, "leader", "an `async fn`") {
        Ok(function) => function,
        Err(beside) => return beside,
    };
    // Anything but a `Lease` (a payload, say) is refused by trait: no message reaches a leader.
    let handler_args = handler::signature(&function, &mut errors, &LEADER);
    let example = "#[leader(bucket = \"election\", key = \"scheduler\", ttl = \"10s\")]";
    parsed.bucket.require(&mut errors, example);
    parsed.key.require(&mut errors, example);
    if let Err(beside) = errors.beside(&item) {
        return beside;
    }

    let p = attr::private();
    let ident = &function.sig.ident;
    let adapter = format_ident!("__natty_leader_{}", ident);
    let name = ident.to_string();
    let bucket = parsed.bucket.take().map(|lit| lit.value()).unwrap_or_default();
    let key = parsed.key.take().map(|lit| lit.value()).unwrap_or_default();
    let ttl = attr::duration_tokens(parsed.ttl.take().unwrap_or(10 * MIN_TTL_NANOS));
    let result = handler::result_ident();
    let outcome = match &function.sig.output {
        syn::ReturnType::Default => quote!(#p::IntoOutcome::into_outcome(#result)),
        syn::ReturnType::Type(_, ty) => quote_spanned! {ty.span()=>
            <#ty as #p::IntoOutcome>::into_outcome(#result)
        },
    };
    handler::emit(
        &function,
        &LEADER,
        &handler_args,
        None,
        &adapter,
        quote!(#p::Outcome),
        outcome,
        quote!(#p::LeaderDef::new(#name, #bucket, #key, #ttl, #adapter)),
        TokenStream::new(),
    )
}

/// A KV key: subject tokens without wildcards (one key, not a pattern).
fn check_key(lit: &LitStr) -> syn::Result<()> {
    attr::check_subject(lit)?;
    if lit.value().split('.').any(|token| token == "*" || token == ">") {
        return Err(syn::Error::new(
            lit.span(),
            "an election key is one key: no wildcards `*` or `>`",
        ));
    }
    Ok(())
}
