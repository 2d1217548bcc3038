//! `#[service(...)]`: a core-NATS request handler whose `Ok` value is the reply. Parses the
//! subject and the handler's signature, then emits the handler unchanged plus an adapter and a
//! description of its reply, and registers a `SubscriptionDef`.

use proc_macro2::TokenStream;
use quote::{format_ident, quote, quote_spanned};
use syn::meta::ParseNestedMeta;
use syn::spanned::Spanned;
use syn::{Expr, ExprLit, Lit, LitBool, LitStr};

use crate::attr::{self, Errors, MacroArgs as _};
use crate::handler::{self, Describes, HandlerKind};

const SERVICE: HandlerKind = HandlerKind {
    what: "a #[service] handler",
    undecodable: "CoreOutcome::Undecodable",
    delivery_type: "CoreDelivery",
    describes: Describes::Argument,
};

attr::args! {
    /// `#[service(...)]`'s keys.
    struct Args for "service" {
        subject: LitStr = "subject" => attr::subject;
        /// The queue group instances share (default: the subject), or `None` for `queue =
        /// false`: no group, every instance answers.
        queue: Option<LitStr> = "queue" => queue;
        concurrency: usize = "concurrency" => attr::count;
    }
}

/// Expands `#[service(args)]` on `item`: the handler unchanged, plus its adapter, reply
/// description and registration (or the errors, beside the handler).
pub fn expand(args: TokenStream, item: TokenStream) -> TokenStream {
    let mut errors = Errors::default();
    let parsed = Args::parse(args, &mut errors);
    let function = match handler::function(&item, "service", "an `async fn`") {
        Ok(function) => function,
        Err(beside) => return beside,
    };
    let handler_args = handler::signature(&function, &mut errors, &SERVICE);
    parsed
        .subject
        .require(&mut errors, "#[service(subject = \"orders.lookup\")]");
    if matches!(function.sig.output, syn::ReturnType::Default) {
        errors.spanned(
            &function.sig.ident,
            "a #[service] handler returns its reply: `-> Result<Reply, E>` with `Reply: Serialize`",
        );
    }
    if let Err(beside) = errors.beside(&item) {
        return beside;
    }
    let syn::ReturnType::Type(_, reply) = &function.sig.output else {
        unreachable!("a handler without a return type was rejected above");
    };

    let p = attr::private();
    let ident = &function.sig.ident;
    let adapter = format_ident!("__natty_service_{}", ident);
    let name = ident.to_string();
    let subject = parsed.subject.take().map(|lit| lit.value()).unwrap_or_default();
    let result = handler::result_ident();
    let outcome = quote_spanned! {reply.span()=>
        <#reply as #p::IntoReply>::into_reply(#result)
    };
    let mut setters = Vec::new();
    match parsed.queue.take() {
        Some(Some(queue)) => setters.push(quote!(.queue(#queue))),
        Some(None) => setters.push(quote!(.no_queue())),
        None => {}
    }
    if let Some(concurrency) = parsed.concurrency.take() {
        setters.push(quote!(.concurrency(#concurrency)));
    }
    // The reply type, named through the declared return type `Result<R, E>` (an alias works
    // too: the probe sees the type it stands for).
    let describe = format_ident!("__natty_reply");
    let items = handler::reply_describer(&describe, reply);
    setters.push(quote!(.reply(#describe)));

    handler::emit(
        &function,
        &SERVICE,
        &handler_args,
        None,
        &adapter,
        quote!(#p::CoreOutcome),
        outcome,
        quote!(#p::SubscriptionDef::service(#name, #subject, #adapter) #(#setters)*),
        items,
    )
}

/// `queue = "name"`, or `queue = false` (`None`): every instance answers, for a gather with
/// `Client::request_many`. `true` is refused rather than read as "the default group": it names
/// no group, and the default needs no key.
fn queue(meta: &ParseNestedMeta) -> attr::Parsed<Option<LitStr>> {
    let expr: Expr = meta.value()?.parse()?;
    let span = expr.span();
    Ok(match &expr {
        Expr::Lit(ExprLit { lit: Lit::Str(lit), .. }) => {
            attr::check_name(lit, "queue group").map(|()| (Some(lit.clone()), span))
        }
        Expr::Lit(ExprLit {
            lit: Lit::Bool(LitBool { value: false, .. }),
            ..
        }) => Ok((None, span)),
        Expr::Lit(ExprLit { lit: Lit::Bool(_), .. }) => Err(syn::Error::new_spanned(
            &expr,
            "`queue = true` names no queue group: give one (`queue = \"quotes\"`), or leave `queue` out for \
             the default group (the subject); `queue = false` has every instance answer",
        )),
        _ => Err(syn::Error::new_spanned(
            &expr,
            "`queue` takes a queue group name, e.g. `queue = \"quotes\"`, or `false` to have every instance answer",
        )),
    })
}
