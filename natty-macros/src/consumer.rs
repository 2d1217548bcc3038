//! `#[consumer(...)]`: parses the consumer's keys and the handler's signature, then emits the
//! handler unchanged plus an adapter that decodes the payload, builds the extractors and
//! registers a `ConsumerDef`.

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{FnArg, ItemFn, LitStr, Pat, Type};

use crate::attr::{self, Errors, Slot};

const KEYS: &[&str] = &[
    "stream",
    "durable",
    "subject",
    "ack_wait",
    "max_deliver",
    "max_ack_pending",
    "concurrency",
    "prefetch",
];

/// Argument types the runtime provides by extraction rather than by decoding the payload.
/// Matched on the last path segment so `natty_runtime::Context` and `Context` both work.
const EXTRACTORS: &[&str] = &["Context"];

struct Args {
    stream: Slot<LitStr>,
    durable: Slot<LitStr>,
    subjects: Slot<Vec<LitStr>>,
    ack_wait: Slot<u64>,
    max_deliver: Slot<i64>,
    max_ack_pending: Slot<i64>,
    concurrency: Slot<usize>,
    prefetch: Slot<usize>,
}

impl Args {
    fn parse(args: TokenStream, errors: &mut Errors) -> Args {
        let mut parsed = Args {
            stream: Slot::new("stream"),
            durable: Slot::new("durable"),
            subjects: Slot::new("subject"),
            ack_wait: Slot::new("ack_wait"),
            max_deliver: Slot::new("max_deliver"),
            max_ack_pending: Slot::new("max_ack_pending"),
            concurrency: Slot::new("concurrency"),
            prefetch: Slot::new("prefetch"),
        };
        let parser = syn::meta::parser(|meta| parsed.key(&meta));
        if let Err(error) = syn::parse::Parser::parse2(parser, args) {
            errors.push(error);
        }
        parsed
    }

    fn key(&mut self, meta: &syn::meta::ParseNestedMeta) -> syn::Result<()> {
        let Some(key) = meta.path.get_ident().map(|ident| ident.to_string()) else {
            return Err(attr::unknown_key(meta, "consumer", KEYS));
        };
        match key.as_str() {
            "stream" => {
                let lit = attr::lit_str(meta)?;
                attr::check_name(&lit, "stream name")?;
                self.stream.set(meta, lit)
            }
            "durable" => {
                let lit = attr::lit_str(meta)?;
                attr::check_name(&lit, "durable name")?;
                self.durable.set(meta, lit)
            }
            "subject" | "subjects" => {
                let subjects = attr::str_or_list(meta)?;
                for subject in &subjects {
                    attr::check_subject(subject)?;
                }
                self.subjects.set(meta, subjects)
            }
            "ack_wait" => {
                let lit = attr::lit_str(meta)?;
                let nanos = attr::duration(&lit)?;
                if nanos < 1_000_000 {
                    return Err(syn::Error::new(lit.span(), "`ack_wait` must be at least 1ms"));
                }
                self.ack_wait.set(meta, nanos)
            }
            "max_deliver" => {
                let (value, lit) = attr::lit_int::<i64>(meta)?;
                if value < 1 {
                    return Err(syn::Error::new(lit.span(), "`max_deliver` must be at least 1"));
                }
                self.max_deliver.set(meta, value)
            }
            "max_ack_pending" => {
                let (value, lit) = attr::lit_int::<i64>(meta)?;
                if value < 1 {
                    return Err(syn::Error::new(lit.span(), "`max_ack_pending` must be at least 1"));
                }
                self.max_ack_pending.set(meta, value)
            }
            "concurrency" => {
                let (value, lit) = attr::lit_int::<usize>(meta)?;
                if value < 1 {
                    return Err(syn::Error::new(lit.span(), "`concurrency` must be at least 1"));
                }
                self.concurrency.set(meta, value)
            }
            "prefetch" => {
                let (value, lit) = attr::lit_int::<usize>(meta)?;
                if value < 1 {
                    return Err(syn::Error::new(lit.span(), "`prefetch` must be at least 1"));
                }
                self.prefetch.set(meta, value)
            }
            _ => Err(attr::unknown_key(meta, "consumer", KEYS)),
        }
    }
}

/// How one handler argument is produced.
enum Arg {
    Payload(Type),
    Extractor(Type),
}

fn signature(function: &ItemFn, errors: &mut Errors) -> Vec<Arg> {
    let sig = &function.sig;
    if sig.asyncness.is_none() {
        errors.spanned(sig.fn_token, "a consumer handler must be an `async fn`");
    }
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        errors.spanned(
            &sig.generics,
            "a consumer handler cannot be generic: the runtime must know the payload type",
        );
    }
    if let Some(variadic) = &sig.variadic {
        errors.spanned(variadic, "a consumer handler cannot be variadic");
    }
    let mut args = Vec::new();
    let mut payload_seen = false;
    for input in &sig.inputs {
        let typed = match input {
            FnArg::Receiver(receiver) => {
                errors.spanned(receiver, "a consumer handler cannot take `self`: write a free function");
                continue;
            }
            FnArg::Typed(typed) => typed,
        };
        if let Pat::Ident(ident) = &*typed.pat {
            if ident.by_ref.is_some() {
                errors.spanned(ident, "handler arguments are taken by value");
                continue;
            }
        }
        let ty = &*typed.ty;
        match ty {
            Type::Reference(reference) => {
                errors.spanned(
                    reference.and_token,
                    "handler arguments are taken by value: the runtime owns nothing it could lend",
                );
                continue;
            }
            Type::ImplTrait(_) | Type::Infer(_) | Type::Never(_) | Type::TraitObject(_) => {
                errors.spanned(ty, "the runtime cannot provide this argument: name a concrete type");
                continue;
            }
            _ => {}
        }
        if is_extractor(ty) {
            args.push(Arg::Extractor(ty.clone()));
        } else if payload_seen {
            errors.spanned(
                ty,
                "the runtime cannot provide this argument: a consumer takes one payload \
                 (the decoded message) and otherwise only `Context`",
            );
        } else {
            payload_seen = true;
            args.push(Arg::Payload(ty.clone()));
        }
    }
    args
}

fn is_extractor(ty: &Type) -> bool {
    let Type::Path(path) = ty else { return false };
    path.qself.is_none()
        && path
            .path
            .segments
            .last()
            .is_some_and(|last| last.arguments.is_none() && EXTRACTORS.contains(&last.ident.to_string().as_str()))
}

pub fn expand(args: TokenStream, item: TokenStream) -> TokenStream {
    let mut errors = Errors::default();
    let parsed = Args::parse(args, &mut errors);
    let function: ItemFn = match syn::parse2(item.clone()) {
        Ok(function) => function,
        Err(_) => {
            let error = syn::Error::new_spanned(&item, "`#[consumer]` goes on an `async fn`").to_compile_error();
            return quote!(#item #error);
        }
    };
    let handler_args = signature(&function, &mut errors);
    for (slot, example) in [
        (
            parsed.stream.get().is_none(),
            "missing `stream`, e.g. #[consumer(stream = \"orders\", durable = \"billing\")]",
        ),
        (
            parsed.durable.get().is_none(),
            "missing `durable`, e.g. #[consumer(stream = \"orders\", durable = \"billing\")]",
        ),
    ] {
        if slot {
            errors.push(syn::Error::new(Span::call_site(), example));
        }
    }
    if let (Some(prefetch), Some(max_ack_pending)) = (parsed.prefetch.get(), parsed.max_ack_pending.get()) {
        if *prefetch as i64 > *max_ack_pending {
            errors.push(syn::Error::new(
                Span::call_site(),
                "`prefetch` exceeds `max_ack_pending`: the server would stop delivering before the prefetch fills",
            ));
        }
    }
    if let Err(error) = errors.into_result() {
        let error = error.to_compile_error();
        return quote!(#item #error);
    }

    let p = quote!(::natty_runtime::__private);
    let ident = &function.sig.ident;
    let adapter = format_ident!("__natty_consumer_{}", ident);
    let name = ident.to_string();
    let stream = parsed.stream.take().map(|lit| lit.value()).unwrap_or_default();
    let durable = parsed.durable.take().map(|lit| lit.value()).unwrap_or_default();

    let mut bindings = Vec::new();
    let mut call_args = Vec::new();
    for (index, arg) in handler_args.iter().enumerate() {
        let var = format_ident!("__arg{}", index);
        call_args.push(var.clone());
        bindings.push(match arg {
            // Spanned at the type so a payload that is not `Deserialize` is reported there.
            Arg::Payload(ty) => quote_spanned! {ty.span()=>
                let #var: #ty = match #p::decode_payload::<#ty>(&__delivery) {
                    ::core::result::Result::Ok(value) => value,
                    ::core::result::Result::Err(error) => return #p::Outcome::Undecodable(error),
                };
            },
            Arg::Extractor(ty) => quote_spanned! {ty.span()=>
                let #var: #ty = <#ty as #p::FromDelivery>::from_delivery(&__delivery);
            },
        });
    }
    let output_span = match &function.sig.output {
        syn::ReturnType::Default => function.sig.ident.span(),
        syn::ReturnType::Type(_, ty) => ty.span(),
    };
    let outcome = quote_spanned! {output_span=>
        #p::IntoOutcome::into_outcome(#ident(#(#call_args),*).await)
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
    if let Some(value) = parsed.concurrency.take() {
        setters.push(quote!(.concurrency(#value)));
    }
    if let Some(value) = parsed.prefetch.take() {
        setters.push(quote!(.prefetch(#value)));
    }

    quote! {
        #function

        const _: () = {
            #[automatically_derived]
            fn #adapter(__delivery: #p::Delivery) -> #p::BoxFuture<'static, #p::Outcome> {
                ::std::boxed::Box::pin(async move {
                    #(#bindings)*
                    #outcome
                })
            }

            #p::inventory::submit! {
                #p::ConsumerDef::new(#name, #stream, #durable, #adapter)
                    #(#setters)*
                    .at(#p::Location { file: ::core::file!(), line: ::core::line!(), module: ::core::module_path!() })
            }
        };
    }
}
