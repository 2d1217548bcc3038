//! `#[subscribe(...)]`: a core-NATS handler, at most once. Parses the subject and the handler's
//! signature, then emits the handler unchanged plus an adapter, and registers a
//! `SubscriptionDef`.

use proc_macro2::TokenStream;
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::LitStr;

use crate::attr::{self, Errors, MacroArgs as _};
use crate::handler::{self, Describes, HandlerKind};

const SUBSCRIBE: HandlerKind = HandlerKind {
    what: "a #[subscribe] handler",
    undecodable: "CoreOutcome::Undecodable",
    delivery_type: "CoreDelivery",
    describes: Describes::Argument,
};

attr::args! {
    /// `#[subscribe(...)]`'s keys.
    struct Args for "subscribe" {
        subject: LitStr = "subject" => attr::subject;
        /// A queue group: each message goes to one of its members.
        queue: LitStr = "queue" => |meta| attr::name(meta, "queue group");
        concurrency: usize = "concurrency" => attr::count;
    }
}

/// Expands `#[subscribe(args)]` on `item`: the handler unchanged, plus its adapter and
/// registration (or the errors, beside the handler).
pub fn expand(args: TokenStream, item: TokenStream) -> TokenStream {
    let mut errors = Errors::default();
    let parsed = Args::parse(args, &mut errors);
    let function = match handler::function(&item, "subscribe", "an `async fn`") {
        Ok(function) => function,
        Err(beside) => return beside,
    };
    let handler_args = handler::signature(&function, &mut errors, &SUBSCRIBE);
    parsed
        .subject
        .require(&mut errors, "#[subscribe(subject = \"orders.lookup\")]");
    if let Err(beside) = errors.beside(&item) {
        return beside;
    }

    let p = attr::private();
    let ident = &function.sig.ident;
    let adapter = format_ident!("__natty_subscribe_{}", ident);
    let name = ident.to_string();
    let subject = parsed.subject.take().map(|lit| lit.value()).unwrap_or_default();
    let result = handler::result_ident();
    let outcome = match &function.sig.output {
        syn::ReturnType::Default => quote!(#p::CoreOutcome::subscribed(#result)),
        syn::ReturnType::Type(_, ty) => quote_spanned! {ty.span()=>
            #p::CoreOutcome::from_outcome(<#ty as #p::IntoOutcome>::into_outcome(#result))
        },
    };
    let mut setters = Vec::new();
    if let Some(queue) = parsed.queue.take() {
        setters.push(quote!(.queue(#queue)));
    }
    if let Some(concurrency) = parsed.concurrency.take() {
        setters.push(quote!(.concurrency(#concurrency)));
    }

    handler::emit(
        &function,
        &SUBSCRIBE,
        &handler_args,
        None,
        &adapter,
        quote!(#p::CoreOutcome),
        outcome,
        quote!(#p::SubscriptionDef::subscribe(#name, #subject, #adapter) #(#setters)*),
        TokenStream::new(),
    )
}
