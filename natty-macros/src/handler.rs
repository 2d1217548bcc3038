//! What every handler macro shares: checking the `async fn`'s signature, and binding its
//! arguments (one decoded payload, any number of extractors) in the generated adapter.

use proc_macro2::{Ident, Span, TokenStream};
use quote::{format_ident, quote_spanned};
use syn::spanned::Spanned;
use syn::{FnArg, ItemFn, Pat, Type};

use crate::attr::Errors;

/// What differs between the kinds of handler.
pub struct HandlerKind {
    /// "a consumer handler", for messages.
    pub what: &'static str,
    /// `__private` path of the outcome for an undecodable payload (takes the error).
    pub undecodable: &'static str,
    /// `__private` type the adapter receives.
    pub delivery_type: &'static str,
    /// What its definition records of the payload (`payload_probe`), for the AsyncAPI document.
    pub describes: Describes,
}

/// What a handler's definition records of its payload, for the AsyncAPI document.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Describes {
    /// Nothing (a leader task has no payload).
    Nothing,
    /// The argument that is the payload.
    Argument,
    /// The item type of a batch handler's `Vec<T>` or `Batch<T>`.
    BatchItems,
}

impl HandlerKind {
    fn private(&self, path: &str) -> TokenStream {
        let path: syn::Path = syn::parse_str(path).expect("a valid path");
        let p = crate::attr::private();
        quote::quote!(#p::#path)
    }

    /// The adapter's parameter type.
    pub fn delivery_type(&self) -> TokenStream {
        self.private(self.delivery_type)
    }
}

/// The item `#[attribute]` is on, as a function; else the error, beside the item.
pub fn function(item: &TokenStream, attribute: &str, what: &str) -> Result<ItemFn, TokenStream> {
    syn::parse2(item.clone()).map_err(|_| {
        let error = syn::Error::new_spanned(item, format!("`#[{attribute}]` goes on {what}")).to_compile_error();
        quote::quote!(#item #error)
    })
}

/// Checks the handler's signature, pointing each mistake at its token; returns its arguments.
pub fn signature(function: &ItemFn, errors: &mut Errors, kind: &HandlerKind) -> Vec<Type> {
    let what = kind.what;
    let sig = &function.sig;
    if sig.asyncness.is_none() {
        errors.spanned(sig.fn_token, format!("{what} must be an `async fn`"));
    }
    if let Some(token) = &sig.unsafety {
        errors.spanned(
            token,
            format!("{what} cannot be `unsafe`: the runtime calls it with no safety contract"),
        );
    }
    if let Some(token) = &sig.constness {
        errors.spanned(token, format!("{what} cannot be `const`"));
    }
    if let Some(abi) = &sig.abi {
        errors.spanned(abi, format!("{what} cannot have an `extern` ABI"));
    }
    let generic = format!("{what} cannot be generic: the runtime must know the payload type");
    if !sig.generics.params.is_empty() {
        errors.spanned(&sig.generics, &generic);
    } else if let Some(where_clause) = &sig.generics.where_clause {
        errors.spanned(where_clause, &generic);
    }
    if let Some(variadic) = &sig.variadic {
        errors.spanned(variadic, format!("{what} cannot be variadic"));
    }
    let mut args = Vec::new();
    for input in &sig.inputs {
        let typed = match input {
            FnArg::Receiver(receiver) => {
                errors.spanned(receiver, format!("{what} cannot take `self`: write a free function"));
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
        // What the argument is (the payload, or something built from the delivery) is the
        // compiler's to decide, by trait: see `HandlerArg` in the runtime.
        args.push(ty.clone());
    }
    args
}

/// The adapter's parameter name, the statements binding each argument, and the argument
/// names to call the handler with. `key_fn`: the span of an `order_by` key function, which
/// needs a payload among the arguments.
pub fn bindings(args: &[Type], kind: &HandlerKind, key_fn: Option<Span>) -> (Ident, Vec<TokenStream>, Vec<Ident>) {
    // Interpolated (call-site) idents: a token written inside `quote_spanned!` would take the
    // user's span and, inside a `macro_rules!`, that macro's hygiene.
    let delivery = format_ident!("__natty_delivery");
    let p = crate::attr::private();
    let delivery_type = kind.delivery_type();
    let undecodable = kind.private(kind.undecodable);
    let built: Vec<Ident> = (0..args.len()).map(|i| format_ident!("__built{}", i)).collect();
    let mut bindings = Vec::new();
    // First build them all (the one place that requires each type to be an argument, so a
    // wrong one is reported once, at its type), then check them together, then bind them.
    for (ty, built) in args.iter().zip(&built) {
        bindings.push(quote_spanned! {ty.span()=>
            let #built = #p::arg::<#delivery_type, _, #ty>(&#delivery);
        });
    }
    if args.len() >= 2 {
        let last = args.last().map_or_else(Span::call_site, Spanned::span);
        bindings.push(payload_sum(&built, ("AtMostOne", last)));
    }
    if let Some(span) = key_fn {
        bindings.push(payload_sum(&built, ("HoldsPayload", span)));
    }
    let mut call_args = Vec::new();
    for (index, (ty, built)) in args.iter().zip(&built).enumerate() {
        let var = Ident::new(&format!("__arg{index}"), Span::call_site());
        call_args.push(var.clone());
        bindings.push(quote_spanned! {ty.span()=>
            let #var: #ty = match #built.value {
                ::core::result::Result::Ok(value) => value,
                ::core::result::Result::Err(error) => return #undecodable(error),
            };
        });
    }
    (delivery, bindings, call_args)
}

/// A check of the built arguments' markers added up (`OneMore`): the sum must implement
/// `require` (a `__private` trait), reported at its span.
fn payload_sum(built: &[Ident], (require, span): (&str, Span)) -> TokenStream {
    let p = crate::attr::private();
    let markers: Vec<Ident> = (0..built.len()).map(|i| format_ident!("M{}", i)).collect();
    let mut bounds = Vec::new();
    let Some(first) = markers.first() else {
        return TokenStream::new();
    };
    let mut sum = quote::quote!(#first);
    for marker in markers.iter().skip(1) {
        bounds.push(quote::quote!(#sum: #p::OneMore<#marker>));
        sum = quote::quote!(<#sum as #p::OneMore<#marker>>::Sum);
    }
    let require = Ident::new(require, span);
    bounds.push(quote::quote!(#sum: #p::#require));
    let check = Ident::new("check", span);
    // Every token of the call at `span`, where the error belongs.
    let built = built.iter().map(|built| Ident::new(&built.to_string(), span));
    let call = quote_spanned! {span=> #check(#(#built.marker),*)};
    quote::quote! {
        {
            #[allow(clippy::type_complexity)]
            fn #check<#(#markers),*>(#(_: ::core::marker::PhantomData<#markers>),*) where #(#bounds),* {}
            #call;
        }
    }
}

/// The local the adapter binds the handler's return value to, for the outcome expression.
pub fn result_ident() -> Ident {
    format_ident!("__natty_result")
}

/// A function describing a `#[service]`'s reply (through its return type `ty`) for the
/// AsyncAPI document, named `name`, through the runtime's probe: the probe falls back to
/// "unknown" for a type natty cannot describe, so a wrong return type is reported once, by the
/// adapter, and not again from here.
pub fn reply_describer(name: &Ident, ty: &Type) -> TokenStream {
    let p = crate::attr::private();
    quote::quote! {
        #[automatically_derived]
        // The borrows select the probe's impl (autoref specialization): none is needless.
        #[allow(clippy::needless_borrow)]
        fn #name() -> #p::PayloadDescription {
            #[allow(unused_imports)]
            use #p::{DescribeDecodedReply as _, DescribeEncodedReply as _, DescribeUnknownReply as _};
            (&&&#p::Probe::<#ty>::new()).describe_reply()
        }
    }
}

/// A function describing the payload among `args` for the AsyncAPI document, through the
/// runtime's probes: an argument that is not a decodable payload describes nothing (and a
/// wrong one is reported once, by the adapter, not again from here).
pub fn payload_describer(name: &Ident, args: &[Type], describes: Describes) -> TokenStream {
    let p = crate::attr::private();
    // A batch handler's payload is the item of its `Vec<T>` or `Batch<T>`; elsewhere a `Vec<T>`
    // is the payload itself (a JSON array), so the batch probe is in scope only for batches.
    let (traits, probe) = match describes {
        Describes::BatchItems => (quote::quote!(ArgBatchItems as _, ArgOther as _), quote::quote!(&&&&)),
        _ => (
            quote::quote!(ArgDecoded as _, ArgKvValue as _, ArgOther as _),
            quote::quote!(&&&),
        ),
    };
    quote::quote! {
        #[automatically_derived]
        // The borrows select the probe's impl (autoref specialization): none is needless.
        #[allow(clippy::needless_borrow)]
        fn #name() -> ::core::option::Option<#p::PayloadDescription> {
            #[allow(unused_imports)]
            use #p::{#traits};
            ::core::option::Option::None
                #(.or_else(|| (#probe #p::Probe::<#args>::new()).describe_arg()))*
        }
    }
}

/// What each argument needs from the runtime's state (a `State<T>`'s `T`, probed), as the
/// `&'static [NeedFn]` of the handler's definition, for the startup check.
fn needs(args: &[Type]) -> TokenStream {
    let p = crate::attr::private();
    let probes = args.iter().map(|ty| {
        quote::quote! {
            {
                #[automatically_derived]
                // The borrows select the probe's impl (autoref specialization).
                #[allow(clippy::needless_borrow)]
                fn need() -> ::core::option::Option<#p::Need> {
                    #[allow(unused_imports)]
                    use #p::{ArgState as _, ArgStateless as _};
                    (&&#p::Probe::<#ty>::new()).need()
                }
                need as #p::NeedFn
            }
        }
    });
    quote::quote!(&[#(#probes),*])
}

/// Emits the user's function unchanged, its adapter (decode, call, convert the result with
/// `outcome`, an expression of [`result_ident`]), the function describing its payload type
/// (plus `items`, e.g. another describer), and the registration of `definition` with its
/// payload description and where it was written.
#[allow(clippy::too_many_arguments)]
pub fn emit(
    function: &ItemFn,
    kind: &HandlerKind,
    args: &[Type],
    key_fn: Option<Span>,
    adapter: &Ident,
    outcome_type: TokenStream,
    outcome: TokenStream,
    definition: TokenStream,
    items: TokenStream,
) -> TokenStream {
    let p = crate::attr::private();
    let ident = &function.sig.ident;
    let result = result_ident();
    let (delivery, bindings, call_args) = bindings(args, kind, key_fn);
    let delivery_type = kind.delivery_type();
    let needs = needs(args);
    let (describer, payload_setter) = match kind.describes {
        Describes::Nothing => (TokenStream::new(), TokenStream::new()),
        describes => {
            let describe = format_ident!("__natty_payload");
            (
                payload_describer(&describe, args, describes),
                quote::quote!(.payload_probe(#describe)),
            )
        }
    };
    quote::quote! {
        #function

        const _: () = {
            #[automatically_derived]
            fn #adapter(#delivery: #delivery_type) -> #p::BoxFuture<'static, #outcome_type> {
                ::std::boxed::Box::pin(async move {
                    #(#bindings)*
                    let #result = #ident(#(#call_args),*).await;
                    #outcome
                })
            }

            #describer
            #items

            #p::inventory::submit! {
                #definition
                    #payload_setter
                    .needs(#needs)
                    .at(#p::Location { file: ::core::file!(), line: ::core::line!(), module: ::core::module_path!() })
            }
        };
    }
}
