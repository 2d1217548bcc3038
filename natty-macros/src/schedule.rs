//! `#[schedule(...)]`: a message the server publishes on a cron expression or at an interval
//! (nats-server 2.12, ADR-51), its body what the function returns.

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned, ToTokens};
use syn::spanned::Spanned;
use syn::LitStr;

use crate::attr::{self, Errors, MacroArgs as _};

attr::args! {
    /// `#[schedule(...)]`'s keys, in the order an unknown key's error lists them.
    struct Args for "schedule" {
        stream: LitStr = "stream" => |meta| attr::name(meta, "stream name");
        subject: LitStr = "subject" => |meta| {
            let lit = attr::lit_str(meta)?;
            Ok(attr::check_dead_letter(&lit)
                .map_err(|_| syn::Error::new(lit.span(), format!(
                    "`{}` is not a subject a schedule can publish to: one subject, no wildcards, no empty token",
                    lit.value()
                )))
                .map(|()| (lit.clone(), lit.span())))
        };
        cron: LitStr = "cron" => |meta| {
            let lit = attr::lit_str(meta)?;
            Ok(check_cron(&lit).map(|()| (lit.clone(), lit.span())))
        };
        every: u64 = "every" => |meta| attr::duration_at_least(
            meta,
            1_000_000_000,
            "`every` must be at least 1s: the server refuses shorter intervals",
        );
        time_zone: LitStr = "time_zone" => |meta| {
            let lit = attr::lit_str(meta)?;
            let zone = lit.value();
            Ok(if zone.is_empty() || zone.chars().any(char::is_whitespace) || zone.starts_with(['+', '-']) {
                Err(syn::Error::new(lit.span(), format!(
                    "`{zone}` is not an IANA time zone name such as \"Europe/Prague\" (fixed offsets are not accepted)"
                )))
            } else {
                Ok((lit.clone(), lit.span()))
            })
        };
    }
}

/// The names `@…` the server knows.
const PREDEFINED: [&str; 7] = [
    "@yearly",
    "@annually",
    "@monthly",
    "@weekly",
    "@daily",
    "@midnight",
    "@hourly",
];

/// A cron expression in the server's syntax: six fields, seconds first, or a predefined name.
fn check_cron(lit: &LitStr) -> syn::Result<()> {
    let expression = lit.value();
    if expression.starts_with('@') {
        if expression.starts_with("@every") {
            return Err(syn::Error::new(
                lit.span(),
                "write an interval as `every = \"5m\"`, not in `cron`",
            ));
        }
        if !PREDEFINED.contains(&expression.as_str()) {
            return Err(syn::Error::new(
                lit.span(),
                format!(
                    "unknown schedule `{expression}`; expected one of {}",
                    PREDEFINED.join(", ")
                ),
            ));
        }
        return Ok(());
    }
    let fields = expression.split_whitespace().count();
    if fields != 6 {
        return Err(syn::Error::new(
            lit.span(),
            format!(
                "a cron expression has six fields (seconds minutes hours day-of-month month day-of-week), e.g. \"0 0 6 * * *\"; this one has {fields}"
            ),
        ));
    }
    Ok(())
}

/// Expands `#[schedule(args)]` on `item`: the function unchanged, plus the registration of its
/// `ScheduleDef` (or the errors, beside the function).
pub fn expand(args: TokenStream, item: TokenStream) -> TokenStream {
    let mut errors = Errors::default();
    let parsed = Args::parse(args, &mut errors);
    let example = "#[schedule(stream = \"reports\", subject = \"reports.daily\", cron = \"0 0 6 * * *\")]";
    parsed.stream.require(&mut errors, example);
    parsed.subject.require(&mut errors, example);
    match (parsed.cron.given(), parsed.every.given()) {
        (false, false) => errors.push(syn::Error::new(
            proc_macro2::Span::call_site(),
            "missing `cron` or `every`, e.g. cron = \"0 0 6 * * *\" or every = \"5m\"",
        )),
        (true, true) => errors.push(syn::Error::new(
            parsed.every.span().unwrap_or_else(proc_macro2::Span::call_site),
            "give `cron` or `every`, not both",
        )),
        _ => {}
    }
    if let (Some(span), true) = (parsed.time_zone.span(), parsed.every.given()) {
        errors.push(syn::Error::new(span, "`time_zone` applies to a `cron` schedule only"));
    }
    let function = match syn::parse2::<syn::ItemFn>(item.clone()) {
        Ok(function) => {
            let sig = &function.sig;
            if let Some(asyncness) = sig.asyncness {
                errors.spanned(
                    asyncness,
                    "a #[schedule] function is not async: it makes the message's body, once, at start",
                );
            }
            if !sig.inputs.is_empty() {
                errors.spanned(
                    &sig.inputs,
                    "a #[schedule] function takes no arguments: it returns the message's body",
                );
            }
            if !sig.generics.params.is_empty() {
                errors.spanned(&sig.generics, "a #[schedule] function cannot be generic");
            }
            if matches!(sig.output, syn::ReturnType::Default) {
                errors.spanned(
                    sig.fn_token,
                    "a #[schedule] function returns the message's body, e.g. `-> ReportRequest`",
                );
            }
            Some(function)
        }
        Err(_) => {
            errors.push(syn::Error::new(
                item.span(),
                "`#[schedule]` goes on a function returning the message's body, e.g. `fn daily() -> ReportRequest`",
            ));
            None
        }
    };
    if let Err(beside) = errors.beside(&item) {
        return beside;
    }
    let Some(function) = function else { return item };

    let p = attr::private();
    let ident = &function.sig.ident;
    let name = ident.to_string();
    let stream = parsed.stream.take().map(|lit| lit.value()).unwrap_or_default();
    let subject = parsed.subject.take().map(|lit| lit.value()).unwrap_or_default();
    let spec = match (parsed.cron.take(), parsed.every.take()) {
        (Some(cron), _) => {
            // As the server stores it (header values are trimmed): compared at every start.
            let cron = cron.value().split_whitespace().collect::<Vec<_>>().join(" ");
            quote!(#p::Spec::Cron(#cron))
        }
        (None, Some(nanos)) => {
            let duration = attr::duration_tokens(nanos);
            quote!(#p::Spec::Every(#duration))
        }
        (None, None) => unreachable!("checked above"),
    };
    let zone = parsed.time_zone.take().map(|zone| quote!(.time_zone(#zone)));
    let body = quote_spanned!(function.sig.output.span()=> || #p::schedule_body(#subject, &#ident()));
    // The body's type for the AsyncAPI document, through the runtime's probes: a type that is
    // not a payload is reported once, by `body`, and described as unknown here.
    let describe = match &function.sig.output {
        syn::ReturnType::Type(_, ty) => {
            // A type that borrows (`&'static str`) is never decoded, and the decoding probe
            // would be picked for it anyway (lifetimes do not count when the impl is chosen)
            // and then refused: such a type starts at the encoding probe.
            let probe = match borrows(ty.to_token_stream()) {
                true => quote!(&&#p::Probe::<#ty>::new()),
                false => quote!(&&&#p::Probe::<#ty>::new()),
            };
            quote! {
            #[automatically_derived]
            // The borrows select the probe's impl (autoref specialization): none is needless.
            #[allow(clippy::needless_borrow)]
            fn describe() -> #p::PayloadDescription {
                #[allow(unused_imports)]
                use #p::{DescribeDecodedBody as _, DescribeEncodedBody as _, DescribeUnknownBody as _};
                (#probe).describe_body()
            }
            }
        }
        syn::ReturnType::Default => unreachable!("checked above"),
    };
    quote! {
        #function
        const _: () = {
            #describe
            #p::inventory::submit! {
                #p::ScheduleDef::new(#name, #stream, #subject, #spec, #body)
                    #zone
                    .payload(describe)
                    .at(#p::Location { file: ::core::file!(), line: ::core::line!(), module: ::core::module_path!() })
            }
        };
    }
}

/// Whether a type's tokens hold a reference or a lifetime.
fn borrows(tokens: TokenStream) -> bool {
    tokens.into_iter().any(|token| match token {
        proc_macro2::TokenTree::Punct(punct) => punct.as_char() == '&' || punct.as_char() == '\'',
        proc_macro2::TokenTree::Group(group) => borrows(group.stream()),
        _ => false,
    })
}
