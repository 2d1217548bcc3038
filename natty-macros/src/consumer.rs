//! `#[consumer(...)]`: parses the consumer's keys and the handler's signature, then emits the
//! handler unchanged plus an adapter that decodes the payload, builds the extractors and
//! registers a `ConsumerDef`.

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{ItemFn, LitStr};

use crate::attr::{self, Errors, Slot};
use crate::handler::{self, HandlerKind};

const CONSUMER: HandlerKind = HandlerKind {
    what: "a consumer handler",
    undecodable: "Outcome::Undecodable",
    delivery_type: "Delivery",
    describes_payload: true,
};

const KEYS: &[&str] = &[
    "stream",
    "durable",
    "subject",
    "ack_wait",
    "max_deliver",
    "max_ack_pending",
    "replicas",
    "concurrency",
    "prefetch",
    "backoff",
    "dead_letter",
    "deliver",
    "start_sequence",
    "start_time",
    "inactive_threshold",
    "order_by",
    "while_leading",
];

struct Args {
    stream: Slot<LitStr>,
    durable: Slot<LitStr>,
    subjects: Slot<Vec<LitStr>>,
    ack_wait: Slot<u64>,
    max_deliver: Slot<i64>,
    max_ack_pending: Slot<i64>,
    replicas: Slot<usize>,
    concurrency: Slot<usize>,
    prefetch: Slot<usize>,
    backoff: Slot<Vec<u64>>,
    dead_letter: Slot<LitStr>,
    /// `deliver`, `start_sequence` and `start_time` all choose where to start: one slot.
    deliver: Slot<TokenStream>,
    inactive_threshold: Slot<u64>,
    order_by: Slot<OrderBy>,
    /// (bucket, key) of the election this consumer follows.
    while_leading: Slot<(String, String)>,
}

impl Args {
    fn parse(args: TokenStream, errors: &mut Errors) -> (Args, Vec<String>) {
        let mut parsed = Args {
            stream: Slot::new("stream"),
            durable: Slot::new("durable"),
            subjects: Slot::new("subject"),
            ack_wait: Slot::new("ack_wait"),
            max_deliver: Slot::new("max_deliver"),
            max_ack_pending: Slot::new("max_ack_pending"),
            replicas: Slot::new("replicas"),
            concurrency: Slot::new("concurrency"),
            prefetch: Slot::new("prefetch"),
            backoff: Slot::new("backoff"),
            dead_letter: Slot::new("dead_letter"),
            deliver: Slot::new("deliver` / `start_sequence` / `start_time"),
            inactive_threshold: Slot::new("inactive_threshold"),
            order_by: Slot::new("order_by"),
            while_leading: Slot::new("while_leading"),
        };
        let seen = attr::parse_keys(args, errors, |key, meta| parsed.key(key, meta));
        (parsed, seen)
    }

    /// Outer error: the attribute cannot be parsed further. Inner error: this key's value is
    /// wrong; parsing goes on.
    fn key(&mut self, key: &str, meta: &syn::meta::ParseNestedMeta) -> syn::Result<syn::Result<()>> {
        Ok(match key {
            "stream" => {
                let lit = attr::lit_str(meta)?;
                attr::check_name(&lit, "stream name").and_then(|()| self.stream.set(meta, lit.clone(), lit.span()))
            }
            "durable" => {
                let lit = attr::lit_str(meta)?;
                attr::check_name(&lit, "durable name").and_then(|()| self.durable.set(meta, lit.clone(), lit.span()))
            }
            "subject" | "subjects" => {
                let subjects = attr::str_or_list(meta)?;
                let span = subjects
                    .first()
                    .map_or_else(proc_macro2::Span::call_site, |lit| lit.span());
                subjects
                    .iter()
                    .try_for_each(attr::check_subject)
                    .and_then(|()| self.subjects.set(meta, subjects, span))
            }
            "ack_wait" => {
                let lit = attr::lit_str(meta)?;
                attr::duration(&lit)
                    .and_then(|nanos| {
                        if nanos < 1_000_000 {
                            Err(syn::Error::new(lit.span(), "`ack_wait` must be at least 1ms"))
                        } else {
                            Ok(nanos)
                        }
                    })
                    .and_then(|nanos| self.ack_wait.set(meta, nanos, lit.span()))
            }
            "max_deliver" => attr::int_at_least(meta, "max_deliver", 1)?
                .and_then(|(value, span)| self.max_deliver.set(meta, value, span)),
            "max_ack_pending" => attr::int_at_least(meta, "max_ack_pending", 1)?
                .and_then(|(value, span)| self.max_ack_pending.set(meta, value, span)),
            "replicas" => attr::replicas(meta)?.and_then(|(value, span)| self.replicas.set(meta, value, span)),
            "concurrency" => attr::int_at_least(meta, "concurrency", 1)?
                .and_then(|(value, span)| self.concurrency.set(meta, value as usize, span)),
            "prefetch" => attr::int_at_least(meta, "prefetch", 1)?
                .and_then(|(value, span)| self.prefetch.set(meta, value as usize, span)),
            "backoff" => {
                let steps = attr::str_or_list(meta)?;
                let span = steps
                    .first()
                    .map_or_else(proc_macro2::Span::call_site, |lit| lit.span());
                steps
                    .iter()
                    .map(attr::duration)
                    .collect::<syn::Result<Vec<u64>>>()
                    .and_then(|nanos| self.backoff.set(meta, nanos, span))
            }
            "dead_letter" => {
                let lit = attr::lit_str(meta)?;
                attr::check_dead_letter(&lit).and_then(|()| self.dead_letter.set(meta, lit.clone(), lit.span()))
            }
            "deliver" => {
                let lit = attr::lit_str(meta)?;
                match lit.value().as_str() {
                    "all" => Ok(quote!(All)),
                    "new" => Ok(quote!(New)),
                    "last" => Ok(quote!(Last)),
                    "last_per_subject" => Ok(quote!(LastPerSubject)),
                    other => Err(syn::Error::new(
                        lit.span(),
                        format!(
                            "unknown deliver policy `{other}`; expected \"all\", \"new\", \"last\" or \"last_per_subject\" \
                             (start from a sequence or a time with `start_sequence` or `start_time`)"
                        ),
                    )),
                }
                .and_then(|tokens| self.deliver.set(meta, tokens, lit.span()))
            }
            "start_sequence" => attr::int_at_least(meta, "start_sequence", 1)?.and_then(|(value, span)| {
                let value = value as u64;
                self.deliver.set(meta, quote!(FromSequence(#value)), span)
            }),
            "order_by" => {
                let expr: syn::Expr = meta.value()?.parse()?;
                let span = syn::spanned::Spanned::span(&expr);
                match expr {
                    syn::Expr::Lit(syn::ExprLit {
                        lit: syn::Lit::Str(lit),
                        ..
                    }) => {
                        let text = lit.value();
                        let token = text
                            .strip_prefix("subject[")
                            .and_then(|rest| rest.strip_suffix(']'))
                            .map(|index| index.parse::<usize>());
                        match (text.as_str(), token) {
                            ("subject", _) => Ok(OrderBy::Subject),
                            (_, Some(Ok(index))) => Ok(OrderBy::Token(index)),
                            _ => Err(syn::Error::new(
                                lit.span(),
                                format!(
                                    "unknown `order_by` `{text}`; expected \"subject\" (the whole subject), \
                                     \"subject[N]\" (its N-th token, from 0) or a key function's path"
                                ),
                            )),
                        }
                    }
                    syn::Expr::Path(path) if path.qself.is_none() => Ok(OrderBy::Key(path.path)),
                    other => Err(syn::Error::new_spanned(
                        other,
                        "`order_by` takes \"subject\", \"subject[N]\" or the path of a function \
                         `fn(&Payload) -> impl Hash`",
                    )),
                }
                .and_then(|order_by| self.order_by.set(meta, order_by, span))
            }
            "while_leading" => {
                let lit = attr::lit_str(meta)?;
                let text = lit.value();
                match text.split_once('/') {
                    Some((bucket, key)) => {
                        let bucket_lit = LitStr::new(bucket, lit.span());
                        let key_lit = LitStr::new(key, lit.span());
                        attr::check_name(&bucket_lit, "bucket name")
                            .and_then(|()| attr::check_subject(&key_lit))
                            .and_then(|()| {
                                if key.split('.').any(|token| token == "*" || token == ">") {
                                    Err(syn::Error::new(lit.span(), "an election key is one key: no wildcards"))
                                } else {
                                    Ok(())
                                }
                            })
                            .and_then(|()| {
                                self.while_leading
                                    .set(meta, (bucket.to_string(), key.to_string()), lit.span())
                            })
                    }
                    None => Err(syn::Error::new(
                        lit.span(),
                        format!("`while_leading` takes \"bucket/key\", e.g. \"election/scheduler\"; got `{text}`"),
                    )),
                }
            }
            "inactive_threshold" => {
                let lit = attr::lit_str(meta)?;
                attr::duration(&lit).and_then(|nanos| self.inactive_threshold.set(meta, nanos, lit.span()))
            }
            "start_time" => {
                let lit = attr::lit_str(meta)?;
                humantime::parse_rfc3339(&lit.value())
                    .map_err(|error| {
                        syn::Error::new(
                            lit.span(),
                            format!("invalid `start_time`: {error}; write an RFC 3339 UTC time, e.g. \"2026-11-01T00:00:00Z\""),
                        )
                    })
                    .and_then(|_| self.deliver.set(meta, quote!(FromTime(#lit)), lit.span()))
            }
            _ => return attr::unknown_key(meta, "consumer", KEYS),
        })
    }
}

/// How an ordered consumer keys its messages.
enum OrderBy {
    Subject,
    Token(usize),
    /// A function from the payload to its key.
    Key(syn::Path),
}

pub fn expand(args: TokenStream, item: TokenStream) -> TokenStream {
    let mut errors = Errors::default();
    let (parsed, seen) = Args::parse(args, &mut errors);
    let function: ItemFn = match syn::parse2(item.clone()) {
        Ok(function) => function,
        Err(_) => {
            let error = syn::Error::new_spanned(&item, "`#[consumer]` goes on an `async fn`").to_compile_error();
            return quote!(#item #error);
        }
    };
    let handler_args = handler::signature(&function, &mut errors, &CONSUMER);
    // A key given with a bad value was already reported; it is not also "missing".
    if !seen.iter().any(|seen| seen == "stream") {
        errors.push(syn::Error::new(
            Span::call_site(),
            "missing `stream`, e.g. #[consumer(stream = \"orders\", durable = \"billing\")]",
        ));
    }
    let durable_given = seen.iter().any(|seen| seen == "durable");
    if let (true, Some(span)) = (durable_given, parsed.inactive_threshold.span()) {
        errors.push(syn::Error::new(
            span,
            "`inactive_threshold` applies to ephemeral consumers: leave out `durable` for one",
        ));
    }
    if let (Some(prefetch), Some(max_ack_pending)) = (parsed.prefetch.get(), parsed.max_ack_pending.get()) {
        if *prefetch as i64 > *max_ack_pending {
            errors.push(syn::Error::new(
                parsed.prefetch.span().unwrap_or_else(Span::call_site),
                format!(
                    "`prefetch` ({prefetch}) exceeds `max_ack_pending` ({max_ack_pending}): \
                     the server would stop delivering before the prefetch fills"
                ),
            ));
        }
    }
    // Whether the handler's arguments hold a payload is the compiler's to say (by trait, in
    // the adapter); with no argument at all it is known here.
    let mut key_fn = None;
    if let Some(OrderBy::Key(path)) = parsed.order_by.get() {
        if handler_args.is_empty() {
            errors.spanned(
                path,
                "a key function is called with the handler's payload: the handler takes none",
            );
        }
        key_fn = Some(path.span());
    }
    if let Err(error) = errors.into_result() {
        let error = error.to_compile_error();
        return quote!(#item #error);
    }

    let p = attr::private();
    let ident = &function.sig.ident;
    let adapter = format_ident!("__natty_consumer_{}", ident);
    let name = ident.to_string();
    let stream = parsed.stream.take().map(|lit| lit.value()).unwrap_or_default();
    // Without a durable name, each instance gets its own ephemeral consumer.
    let constructor = match parsed.durable.take().map(|lit| lit.value()) {
        Some(durable) => quote!(#p::ConsumerDef::new(#name, #stream, #durable, #adapter)),
        None => quote!(#p::ConsumerDef::ephemeral(#name, #stream, #adapter)),
    };

    let result = handler::result_ident();
    // Named through the declared return type so that a wrong one is reported at that type.
    let outcome = match &function.sig.output {
        syn::ReturnType::Default => quote!(#p::IntoOutcome::into_outcome(#result)),
        syn::ReturnType::Type(_, ty) => quote_spanned! {ty.span()=>
            <#ty as #p::IntoOutcome>::into_outcome(#result)
        },
    };

    let mut setters = Vec::new();
    if let Some(subjects) = parsed.subjects.take() {
        setters.push(quote!(.subjects(&[#(#subjects),*])));
    }
    if let Some(nanos) = parsed.ack_wait.take() {
        let duration = attr::duration_tokens(nanos);
        setters.push(quote!(.ack_wait(#duration)));
    }
    if let Some(value) = parsed.max_deliver.take() {
        setters.push(quote!(.max_deliver(#value)));
    }
    if let Some(value) = parsed.max_ack_pending.take() {
        setters.push(quote!(.max_ack_pending(#value)));
    }
    if let Some(value) = parsed.replicas.take() {
        setters.push(quote!(.replicas(#value)));
    }
    if let Some(value) = parsed.concurrency.take() {
        setters.push(quote!(.concurrency(#value)));
    }
    if let Some(value) = parsed.prefetch.take() {
        setters.push(quote!(.prefetch(#value)));
    }
    if let Some(steps) = parsed.backoff.take() {
        let steps = steps.into_iter().map(attr::duration_tokens);
        setters.push(quote!(.backoff(&[#(#steps),*])));
    }
    if let Some(subject) = parsed.dead_letter.take() {
        setters.push(quote!(.dead_letter(#subject)));
    }
    if let Some(nanos) = parsed.inactive_threshold.take() {
        let duration = attr::duration_tokens(nanos);
        setters.push(quote!(.inactive_threshold(#duration)));
    }
    if let Some(order_by) = parsed.order_by.take() {
        let order_by = match order_by {
            OrderBy::Subject => quote!(#p::OrderBy::Subject),
            OrderBy::Token(index) => quote!(#p::OrderBy::Token(#index)),
            OrderBy::Key(path) => {
                // The message decoded as the key function's argument (its type inferred from
                // the call), so the lane is known before the handler starts.
                let matches = handler_args.iter().map(|ty| {
                    quote_spanned! {path.span()=> #p::KeyArg(&payload).check::<#p::Delivery, _, #ty>();}
                });
                quote_spanned! {path.span()=>
                    #p::OrderBy::Key(|headers, bytes| {
                        let payload = #p::decode(headers, bytes).ok()?;
                        let key = #p::hash_key(&#path(&payload));
                        #(#matches)*
                        ::core::option::Option::Some(key)
                    })
                }
            }
        };
        setters.push(quote!(.order_by(#order_by)));
    }
    if let Some((bucket, key)) = parsed.while_leading.take() {
        setters.push(quote!(.while_leading(#bucket, #key)));
    }
    if let Some(deliver) = parsed.deliver.take() {
        setters.push(quote!(.deliver(#p::Deliver::#deliver)));
    }

    handler::emit(
        &function,
        &CONSUMER,
        &handler_args,
        key_fn,
        &adapter,
        quote!(#p::Outcome),
        outcome,
        quote!(#constructor #(#setters)*),
        TokenStream::new(),
    )
}
