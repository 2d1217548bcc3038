//! `#[consumer(...)]`: parses the consumer's keys and the handler's signature, then emits the
//! handler unchanged plus an adapter that decodes the payload, builds the extractors and
//! registers a `ConsumerDef`.

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::LitStr;

use crate::attr::{self, Errors, MacroArgs as _, Parsed};
use crate::handler::{self, Describes, HandlerKind};

const CONSUMER: HandlerKind = HandlerKind {
    what: "a consumer handler",
    undecodable: "Outcome::Undecodable",
    delivery_type: "Delivery",
    describes: Describes::Argument,
};

/// A batch consumer's handler: its arguments are built from the whole batch (`Vec<T>`,
/// `Batch<T>`, `State<T>`).
const BATCH: HandlerKind = HandlerKind {
    what: "a consumer handler",
    undecodable: "Outcome::Undecodable",
    delivery_type: "BatchDelivery",
    describes: Describes::BatchItems,
};

/// How long a batch waits to fill when `batch_wait` is not given.
const DEFAULT_BATCH_WAIT_NANOS: u64 = 100_000_000;

attr::args! {
    /// `#[consumer(...)]`'s keys, in the order an unknown key's error lists them.
    struct Args for "consumer" {
        stream: LitStr = "stream" => |meta| attr::name(meta, "stream name");
        durable: LitStr = "durable" => |meta| attr::name(meta, "durable name");
        subjects: Vec<LitStr> = "subject" | "subjects" => attr::subjects;
        ack_wait: u64 = "ack_wait" => |meta| {
            attr::duration_at_least(meta, 1_000_000, "`ack_wait` must be at least 1ms")
        };
        max_deliver: i64 = "max_deliver" => |meta| attr::int_at_least(meta, 1);
        max_ack_pending: i64 = "max_ack_pending" => |meta| attr::int_at_least(meta, 1);
        replicas: usize = "replicas" => attr::replicas;
        concurrency: usize = "concurrency" => attr::count;
        prefetch: usize = "prefetch" => attr::count;
        backoff: Vec<u64> = "backoff" => backoff;
        dead_letter: LitStr = "dead_letter" => attr::dead_letter;
        /// Where to start: three keys, one slot.
        deliver: TokenStream = "deliver" => deliver,
            "start_sequence" => start_sequence,
            "start_time" => start_time;
        inactive_threshold: u64 = "inactive_threshold" => attr::duration;
        order_by: OrderBy = "order_by" => order_by;
        /// (bucket, key) of the election this consumer follows.
        while_leading: (String, String) = "while_leading" => while_leading;
        /// `"sent"` (the default) or `"confirmed"`.
        ack: TokenStream = "ack" => ack;
        /// A partitioned group of this many partitions.
        partitions: u32 = "partitions" => partitions;
        batch: usize = "batch" => attr::count;
        batch_wait: u64 = "batch_wait" => |meta| {
            attr::duration_at_least(meta, 1_000_000, "`batch_wait` must be at least 1ms")
        };
    }
}

/// The most partitions a group may have (the runtime's `MAX_PARTITIONS`).
const MAX_PARTITIONS: i64 = 64;

/// `partitions = N`: 1 to 64 (also `#[capture]`'s).
pub(crate) fn partitions(meta: &syn::meta::ParseNestedMeta) -> Parsed<u32> {
    Ok(attr::int_at_least(meta, 1)?.and_then(|(value, span)| {
        if value > MAX_PARTITIONS {
            Err(syn::Error::new(
                span,
                format!("`partitions` must be between 1 and {MAX_PARTITIONS}: each is a durable consumer of its own"),
            ))
        } else {
            Ok((value as u32, span))
        }
    }))
}

/// `backoff = "1s"` or `["1s", "5s", "30s"]`: the delay before each redelivery after an error.
fn backoff(meta: &syn::meta::ParseNestedMeta) -> Parsed<Vec<u64>> {
    let steps = attr::str_or_list(meta)?;
    let span = steps.first().map_or_else(Span::call_site, LitStr::span);
    Ok(steps
        .iter()
        .map(attr::nanos)
        .collect::<syn::Result<Vec<u64>>>()
        .map(|nanos| (nanos, span)))
}

/// `deliver = "all" | "new" | "last" | "last_per_subject"`, as the `Deliver` variant.
fn deliver(meta: &syn::meta::ParseNestedMeta) -> Parsed<TokenStream> {
    let lit = attr::lit_str(meta)?;
    Ok(match lit.value().as_str() {
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
    .map(|tokens| (tokens, lit.span())))
}

/// `ack = "sent" | "confirmed"`, as the `Ack` variant.
fn ack(meta: &syn::meta::ParseNestedMeta) -> Parsed<TokenStream> {
    let lit = attr::lit_str(meta)?;
    Ok(match lit.value().as_str() {
        "sent" => Ok(quote!(Sent)),
        "confirmed" => Ok(quote!(Confirmed)),
        other => Err(syn::Error::new(
            lit.span(),
            format!(
                "unknown ack mode `{other}`; expected \"confirmed\" (wait until the server confirms each ack, \
                 sending it again until it does) or \"sent\" (the default: send and go on)"
            ),
        )),
    }
    .map(|tokens| (tokens, lit.span())))
}

/// `start_sequence = N`: start at the stream's N-th message.
fn start_sequence(meta: &syn::meta::ParseNestedMeta) -> Parsed<TokenStream> {
    Ok(attr::int_at_least(meta, 1)?.map(|(value, span)| {
        let value = value as u64;
        (quote!(FromSequence(#value)), span)
    }))
}

/// `start_time = "2026-11-01T00:00:00Z"`: start at the first message stored from then on.
fn start_time(meta: &syn::meta::ParseNestedMeta) -> Parsed<TokenStream> {
    let lit = attr::lit_str(meta)?;
    Ok(humantime::parse_rfc3339(&lit.value())
        .map_err(|error| {
            syn::Error::new(
                lit.span(),
                format!("invalid `start_time`: {error}; write an RFC 3339 UTC time, e.g. \"2026-11-01T00:00:00Z\""),
            )
        })
        .map(|_| (quote!(FromTime(#lit)), lit.span())))
}

/// `order_by = "subject" | "subject[N]" | key_fn`.
fn order_by(meta: &syn::meta::ParseNestedMeta) -> Parsed<OrderBy> {
    let expr: syn::Expr = meta.value()?.parse()?;
    let span = syn::spanned::Spanned::span(&expr);
    Ok(match expr {
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
    .map(|order_by| (order_by, span)))
}

/// `while_leading = "bucket/key"`: consume only while this instance leads that election.
fn while_leading(meta: &syn::meta::ParseNestedMeta) -> Parsed<(String, String)> {
    let lit = attr::lit_str(meta)?;
    let text = lit.value();
    Ok(match text.split_once('/') {
        Some((bucket, key)) => {
            let bucket_lit = LitStr::new(bucket, lit.span());
            let key_lit = LitStr::new(key, lit.span());
            attr::check_name(&bucket_lit, "bucket name")
                .and_then(|()| attr::check_subject(&key_lit))
                .and_then(|()| {
                    if key.split('.').any(|token| token == "*" || token == ">") {
                        Err(syn::Error::new(lit.span(), "an election key is one key: no wildcards"))
                    } else {
                        Ok(((bucket.to_string(), key.to_string()), lit.span()))
                    }
                })
        }
        None => Err(syn::Error::new(
            lit.span(),
            format!("`while_leading` takes \"bucket/key\", e.g. \"election/scheduler\"; got `{text}`"),
        )),
    })
}

/// How an ordered consumer keys its messages.
enum OrderBy {
    Subject,
    Token(usize),
    /// A function from the payload to its key.
    Key(syn::Path),
}

/// What a partitioned group needs: a durable, one subject, and a key the server can compute
/// from it (`order_by` on the subject or on one of its `*` tokens).
fn check_partitions(parsed: &Args, span: Span, errors: &mut Errors) {
    let mut refuse = |span: Span, message: &str| errors.push(syn::Error::new(span, message));
    if !parsed.durable.given() {
        refuse(
            span,
            "`partitions` makes a durable consumer a group shared by every instance: give it a `durable`",
        );
    }
    if let Some(other) = parsed.batch.span().or(parsed.while_leading.span()) {
        refuse(
            other,
            "a partitioned group cannot be a batch consumer or `while_leading`: its partitions are already owned by one instance each",
        );
    }
    let subject = match parsed.subjects.get().map(Vec::as_slice) {
        Some([one]) => one,
        Some([_, second, ..]) => {
            refuse(
                second.span(),
                "a partitioned group consumes one subject, with its key under a `*` wildcard",
            );
            return;
        }
        _ => {
            refuse(
                span,
                "`partitions` needs the `subject` its key is in, e.g. subject = \"accounts.*.posted\", order_by = \"subject[1]\"",
            );
            return;
        }
    };
    let value = subject.value();
    let tokens: Vec<&str> = value.split('.').collect();
    if tokens.contains(&">") {
        refuse(
            subject.span(),
            "a partitioned group's subject cannot hold `>`: write each token, with the key under a `*`",
        );
        return;
    }
    let order_span = parsed.order_by.span().unwrap_or(span);
    match parsed.order_by.get() {
        Some(OrderBy::Token(index)) if tokens.get(*index) != Some(&"*") => refuse(
            order_span,
            &format!(
                "the key of a partitioned group must be a `*` token of its subject: token {index} of \"{value}\" is {}",
                tokens.get(*index).map_or("missing".to_string(), |token| format!("`{token}`"))
            ),
        ),
        Some(OrderBy::Subject) if !tokens.contains(&"*") => refuse(
            subject.span(),
            "with `order_by = \"subject\"` a partitioned group's subject needs a `*` wildcard to partition by",
        ),
        Some(OrderBy::Key(_)) | None => refuse(
            order_span,
            "`partitions` needs `order_by = \"subject[N]\"` (or \"subject\"): the server routes each message to its \
             partition by its subject, so the key must be a token of it. To key by the payload, publish the key into the \
             subject (e.g. `accounts.{id}.posted`)",
        ),
        _ => {}
    }
}

/// Expands `#[consumer(args)]` on `item`: the handler unchanged, plus its adapter and
/// registration (or the errors, beside the handler).
pub fn expand(args: TokenStream, item: TokenStream) -> TokenStream {
    let mut errors = Errors::default();
    let parsed = Args::parse(args, &mut errors);
    let function = match handler::function(&item, "consumer", "an `async fn`") {
        Ok(function) => function,
        Err(beside) => return beside,
    };
    let kind = if parsed.batch.given() { &BATCH } else { &CONSUMER };
    let handler_args = handler::signature(&function, &mut errors, kind);
    if let (false, Some(span)) = (parsed.batch.given(), parsed.batch_wait.span()) {
        errors.push(syn::Error::new(
            span,
            "`batch_wait` applies to batch handlers: add `batch = <size>`",
        ));
    }
    if let (true, Some(span)) = (parsed.batch.given(), parsed.order_by.span()) {
        errors.push(syn::Error::new(
            span,
            "`order_by` applies to handlers of one message: a batch holds its messages in stream order",
        ));
    }
    parsed
        .stream
        .require(&mut errors, "#[consumer(stream = \"orders\", durable = \"billing\")]");
    if let (true, Some(span)) = (parsed.durable.given(), parsed.inactive_threshold.span()) {
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
    if let Some(span) = parsed.partitions.span() {
        check_partitions(&parsed, span, &mut errors);
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
    if let Err(beside) = errors.beside(&item) {
        return beside;
    }

    let p = attr::private();
    let ident = &function.sig.ident;
    let adapter = format_ident!("__natty_consumer_{}", ident);
    let name = ident.to_string();
    let stream = parsed.stream.take().map(|lit| lit.value()).unwrap_or_default();
    // Without a durable name, each instance gets its own ephemeral consumer.
    // A batch consumer's per-message handler is a placeholder: its batch handler runs instead.
    let per_message = match parsed.batch.given() {
        true => quote!(#p::batch_only),
        false => quote!(#adapter),
    };
    let constructor = match parsed.durable.take().map(|lit| lit.value()) {
        Some(durable) => quote!(#p::ConsumerDef::new(#name, #stream, #durable, #per_message)),
        None => quote!(#p::ConsumerDef::ephemeral(#name, #stream, #per_message)),
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
    if let Some(ack) = parsed.ack.take() {
        setters.push(quote!(.ack(#p::Ack::#ack)));
    }
    if let Some(partitions) = parsed.partitions.take() {
        setters.push(quote!(.partitions(#partitions)));
    }
    if let Some(size) = parsed.batch.take() {
        let wait = attr::duration_tokens(parsed.batch_wait.take().unwrap_or(DEFAULT_BATCH_WAIT_NANOS));
        setters.push(quote!(.batch(#size, #wait, #adapter)));
    }

    handler::emit(
        &function,
        kind,
        &handler_args,
        key_fn,
        &adapter,
        quote!(#p::Outcome),
        outcome,
        quote!(#constructor #(#setters)*),
        TokenStream::new(),
    )
}
