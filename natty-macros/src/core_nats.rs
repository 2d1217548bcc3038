//! `#[subscribe(...)]` and `#[service(...)]`: core-NATS handlers. One parser for both; they
//! differ in what the handler returns and what the runtime does with it.

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{ItemFn, LitStr};

use crate::attr::{self, Errors, Slot};
use crate::handler::{self, HandlerKind};

const KEYS: &[&str] = &["subject", "queue", "concurrency"];

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

struct Args {
    subject: Slot<LitStr>,
    queue: Slot<LitStr>,
    concurrency: Slot<usize>,
}

impl Args {
    fn key(&mut self, kind: Kind, key: &str, meta: &syn::meta::ParseNestedMeta) -> syn::Result<syn::Result<()>> {
        Ok(match key {
            "subject" => {
                let lit = attr::lit_str(meta)?;
                attr::check_subject(&lit).and_then(|()| self.subject.set(meta, lit.clone(), lit.span()))
            }
            "queue" => {
                let lit = attr::lit_str(meta)?;
                attr::check_name(&lit, "queue group").and_then(|()| self.queue.set(meta, lit.clone(), lit.span()))
            }
            "concurrency" => attr::int_at_least(meta, "concurrency", 1)?
                .and_then(|(value, span)| self.concurrency.set(meta, value as usize, span)),
            _ => return attr::unknown_key(meta, kind.name(), KEYS),
        })
    }
}

pub fn expand(kind: Kind, args: TokenStream, item: TokenStream) -> TokenStream {
    let mut errors = Errors::default();
    let mut parsed = Args {
        subject: Slot::new("subject"),
        queue: Slot::new("queue"),
        concurrency: Slot::new("concurrency"),
    };
    let seen = attr::parse_keys(args, &mut errors, |key, meta| parsed.key(kind, key, meta));
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
    if !seen.iter().any(|seen| seen == "subject") {
        errors.push(syn::Error::new(
            Span::call_site(),
            format!(
                "missing `subject`, e.g. #[{}(subject = \"orders.lookup\")]",
                kind.name()
            ),
        ));
    }
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
    let subject = parsed.subject.take().map(|lit| lit.value()).unwrap_or_default();
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
    if let Some(queue) = parsed.queue.take() {
        setters.push(quote!(.queue(#queue)));
    }
    if let Some(concurrency) = parsed.concurrency.take() {
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
