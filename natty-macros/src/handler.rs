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
    /// Argument types the runtime provides by extraction rather than by decoding the payload,
    /// matched on the last path segment so `natty_runtime::Context` and `Context` both work.
    pub extractors: &'static [&'static str],
    /// `__private` function that decodes the payload.
    pub decode: &'static str,
    /// `__private` trait that builds an extractor.
    pub from_trait: &'static str,
    /// `__private` path of the outcome for an undecodable payload (takes the error).
    pub undecodable: &'static str,
    /// `__private` type the adapter receives.
    pub delivery_type: &'static str,
}

impl HandlerKind {
    fn private(&self, path: &str) -> TokenStream {
        let path: syn::Path = syn::parse_str(path).expect("a valid path");
        quote::quote!(::natty_runtime::__private::#path)
    }

    /// The adapter's parameter type.
    pub fn delivery_type(&self) -> TokenStream {
        self.private(self.delivery_type)
    }
}

/// How one handler argument is produced.
pub enum Arg {
    Payload(Type),
    Extractor(Type),
}

/// Checks the handler's signature, pointing each mistake at its token; returns its arguments.
pub fn signature(function: &ItemFn, errors: &mut Errors, kind: &HandlerKind) -> Vec<Arg> {
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
    let mut payload_seen = false;
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
        if is_extractor(ty, kind.extractors) {
            args.push(Arg::Extractor(ty.clone()));
        } else if payload_seen {
            let extractors = kind
                .extractors
                .iter()
                .map(|e| format!("`{e}`"))
                .collect::<Vec<_>>()
                .join(", ");
            errors.spanned(
                ty,
                format!(
                    "the runtime cannot provide this argument: {what} takes one payload \
                     (the decoded message) and otherwise only {extractors}"
                ),
            );
        } else {
            payload_seen = true;
            args.push(Arg::Payload(ty.clone()));
        }
    }
    args
}

fn is_extractor(ty: &Type, extractors: &[&str]) -> bool {
    let Type::Path(path) = ty else { return false };
    path.qself.is_none()
        && path
            .path
            .segments
            .last()
            .is_some_and(|last| last.arguments.is_none() && extractors.contains(&last.ident.to_string().as_str()))
}

/// The adapter's parameter name, the statements binding each argument, and the argument
/// names to call the handler with.
pub fn bindings(args: &[Arg], kind: &HandlerKind) -> (Ident, Vec<TokenStream>, Vec<Ident>) {
    // Interpolated (call-site) idents: a token written inside `quote_spanned!` would take the
    // user's span and, inside a `macro_rules!`, that macro's hygiene.
    let delivery = format_ident!("__natty_delivery");
    let decode = kind.private(kind.decode);
    let from_trait = kind.private(kind.from_trait);
    let undecodable = kind.private(kind.undecodable);
    let mut bindings = Vec::new();
    let mut call_args = Vec::new();
    for (index, arg) in args.iter().enumerate() {
        let var = Ident::new(&format!("__arg{index}"), Span::call_site());
        call_args.push(var.clone());
        bindings.push(match arg {
            // Spanned at the type so a payload that is not `Deserialize` is reported there.
            Arg::Payload(ty) => quote_spanned! {ty.span()=>
                let #var: #ty = match #decode::<#ty>(&#delivery) {
                    ::core::result::Result::Ok(value) => value,
                    ::core::result::Result::Err(error) => return #undecodable(error),
                };
            },
            Arg::Extractor(ty) => quote_spanned! {ty.span()=>
                let #var: #ty = <#ty as #from_trait>::from_delivery(&#delivery);
            },
        });
    }
    (delivery, bindings, call_args)
}

/// The local the adapter binds the handler's return value to, for the outcome expression.
pub fn result_ident() -> Ident {
    format_ident!("__natty_result")
}

/// A function describing `ty` for the AsyncAPI document, named `name`, through the
/// runtime's probe: the probe falls back to "unknown" for a type natty cannot decode, so a
/// wrong payload type is reported once, by the adapter, and not again from here. `method` is
/// `describe` for a payload, `describe_reply` for a service's return type.
pub fn describer(name: &Ident, ty: &Type, method: &str) -> TokenStream {
    let p = quote::quote!(::natty_runtime::__private);
    let method = Ident::new(method, Span::call_site());
    quote::quote! {
        #[automatically_derived]
        // The borrows select the probe's impl (autoref specialization): none is needless.
        #[allow(clippy::needless_borrow)]
        fn #name() -> #p::PayloadDescription {
            #[allow(unused_imports)]
            use #p::{
                DescribeDecoded as _, DescribeDecodedReply as _, DescribeEncodedReply as _, DescribeKvValue as _,
                DescribeUnknown as _, DescribeUnknownReply as _,
            };
            (&&&#p::Probe::<#ty>::new()).#method()
        }
    }
}

/// Emits the user's function unchanged, its adapter (decode, call, convert the result with
/// `outcome`, an expression of [`result_ident`]), the function describing its payload type
/// (plus `items`, e.g. another describer), and the registration of `definition` with its
/// payload description and where it was written.
#[allow(clippy::too_many_arguments)]
pub fn emit(
    function: &ItemFn,
    kind: &HandlerKind,
    args: &[Arg],
    adapter: &Ident,
    outcome_type: TokenStream,
    outcome: TokenStream,
    definition: TokenStream,
    items: TokenStream,
) -> TokenStream {
    let p = quote::quote!(::natty_runtime::__private);
    let ident = &function.sig.ident;
    let result = result_ident();
    let (delivery, bindings, call_args) = bindings(args, kind);
    let delivery_type = kind.delivery_type();
    let payload = args.iter().find_map(|arg| match arg {
        Arg::Payload(ty) => Some(ty),
        Arg::Extractor(_) => None,
    });
    let describe = format_ident!("__natty_payload");
    let (describer, payload_setter) = match payload {
        Some(ty) => (describer(&describe, ty, "describe"), quote::quote!(.payload(#describe))),
        None => (TokenStream::new(), TokenStream::new()),
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
                    .at(#p::Location { file: ::core::file!(), line: ::core::line!(), module: ::core::module_path!() })
            }
        };
    }
}
