//! `#[subscribe(...)]` and `#[service(...)]`: core-NATS handlers. One parser for both; they
//! differ in what the handler returns and what the runtime does with it.

use proc_macro2::TokenStream;
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{ItemFn, LitStr};

use crate::attr::{self, Errors, MacroArgs as _};
use crate::handler::{self, HandlerKind};

/// Which macro is expanding.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Subscribe,
    Service,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Subscribe => "subscribe",
            Kind::Service => "service",
        }
    }

    fn handler_kind(self) -> HandlerKind {
        HandlerKind {
            what: match self {
                Kind::Subscribe => "a #[subscribe] handler",
                Kind::Service => "a #[service] handler",
            },
            undecodable: "CoreOutcome::Undecodable",
            delivery_type: "CoreDelivery",
            describes_payload: true,
        }
    }
}

attr::args! {
    /// `#[subscribe(...)]`'s keys.
    struct SubscribeArgs for "subscribe" {
        subject: LitStr = "subject" => attr::subject;
        queue: LitStr = "queue" => |meta| attr::name(meta, "queue group");
        concurrency: usize = "concurrency" => attr::count;
    }
}

attr::args! {
    /// `#[service(...)]`'s keys.
    struct ServiceArgs for "service" {
        subject: LitStr = "subject" => attr::subject;
        queue: LitStr = "queue" => |meta| attr::name(meta, "queue group");
        concurrency: usize = "concurrency" => attr::count;
    }
}

pub fn expand(kind: Kind, args: TokenStream, item: TokenStream) -> TokenStream {
    let mut errors = Errors::default();
    let (subject, queue, concurrency) = match kind {
        Kind::Subscribe => {
            let parsed = SubscribeArgs::parse(args, &mut errors);
            (parsed.subject, parsed.queue, parsed.concurrency)
        }
        Kind::Service => {
            let parsed = ServiceArgs::parse(args, &mut errors);
            (parsed.subject, parsed.queue, parsed.concurrency)
        }
    };
    let function: ItemFn = match syn::parse2(item.clone()) {
        Ok(function) => function,
        Err(_) => {
            let message = format!("`#[{}]` goes on an `async fn`", kind.name());
            let error = syn::Error::new_spanned(&item, message).to_compile_error();
            return quote!(#item #error);
        }
    };
    let handler_kind = kind.handler_kind();
    let handler_args = handler::signature(&function, &mut errors, &handler_kind);
    subject.require(&mut errors, format!("#[{}(subject = \"orders.lookup\")]", kind.name()));
    if kind == Kind::Service && matches!(function.sig.output, syn::ReturnType::Default) {
        errors.spanned(
            &function.sig.ident,
            "a #[service] handler returns its reply: `-> Result<Reply, E>` with `Reply: Serialize`",
        );
    }
    if let Err(error) = errors.into_result() {
        let error = error.to_compile_error();
        return quote!(#item #error);
    }

    let p = attr::private();
    let ident = &function.sig.ident;
    let adapter = format_ident!("__natty_{}_{}", kind.name(), ident);
    let name = ident.to_string();
    let subject = subject.take().map(|lit| lit.value()).unwrap_or_default();
    let result = handler::result_ident();
    let (constructor, outcome) = match kind {
        Kind::Subscribe => (
            quote!(#p::SubscriptionDef::subscribe(#name, #subject, #adapter)),
            match &function.sig.output {
                syn::ReturnType::Default => quote!(#p::CoreOutcome::subscribed(#result)),
                syn::ReturnType::Type(_, ty) => quote_spanned! {ty.span()=>
                    #p::CoreOutcome::from_outcome(<#ty as #p::IntoOutcome>::into_outcome(#result))
                },
            },
        ),
        Kind::Service => (
            quote!(#p::SubscriptionDef::service(#name, #subject, #adapter)),
            match &function.sig.output {
                syn::ReturnType::Type(_, ty) => quote_spanned! {ty.span()=>
                    <#ty as #p::IntoReply>::into_reply(#result)
                },
                syn::ReturnType::Default => unreachable!("rejected above"),
            },
        ),
    };
    let mut setters = Vec::new();
    if let Some(queue) = queue.take() {
        setters.push(quote!(.queue(#queue)));
    }
    if let Some(concurrency) = concurrency.take() {
        setters.push(quote!(.concurrency(#concurrency)));
    }
    // A service's reply type, named through its declared return type `Result<R, E>` (an
    // alias works too: the probe sees the type it stands for).
    let mut items = TokenStream::new();
    if let (Kind::Service, syn::ReturnType::Type(_, ty)) = (kind, &function.sig.output) {
        let describe = format_ident!("__natty_reply");
        items = handler::reply_describer(&describe, ty);
        setters.push(quote!(.reply(#describe)));
    }

    handler::emit(
        &function,
        &handler_kind,
        &handler_args,
        None,
        &adapter,
        quote!(#p::CoreOutcome),
        outcome,
        quote!(#constructor #(#setters)*),
        items,
    )
}
