//! `#[capture(...)]`: parses the capture's keys and its key function's signature, then emits the
//! function unchanged plus an adapter that decodes the payload and calls it, and registers a
//! `CaptureDef`.

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{ItemFn, LitStr};

use crate::attr::{self, Errors, MacroArgs as _, Parsed};
use crate::handler;

/// The placeholders every path template may use; a struct key adds its fields.
const PLACEHOLDERS: &[&str] = &["key", "stream", "durable", "date", "yyyy", "mm", "dd", "hh", "min"];

/// `format = "..."`: how a block's records are written, as the runtime's `BlockFormat`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    Csv,
    Ndjson,
    Parquet,
    Raw,
}

impl Format {
    /// Each format by the name the key takes, in the order an unknown one's error lists them.
    const NAMES: &[(&str, Format)] = &[
        ("csv", Format::Csv),
        ("ndjson", Format::Ndjson),
        ("parquet", Format::Parquet),
        ("raw", Format::Raw),
    ];

    /// The `BlockFormat` variant.
    fn variant(self) -> TokenStream {
        match self {
            Format::Csv => quote!(Csv),
            Format::Ndjson => quote!(Ndjson),
            Format::Parquet => quote!(Parquet),
            Format::Raw => quote!(Raw),
        }
    }
}

/// `compression = "..."`: how a block's file is compressed, as the runtime's `Compression`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// Each compression by the name the key takes, in the order an unknown one's error lists them.
    const NAMES: &[(&str, Compression)] = &[
        ("none", Compression::None),
        ("gzip", Compression::Gzip),
        ("zstd", Compression::Zstd),
    ];

    /// The `Compression` variant.
    fn variant(self) -> TokenStream {
        match self {
            Compression::None => quote!(None),
            Compression::Gzip => quote!(Gzip),
            Compression::Zstd => quote!(Zstd),
        }
    }
}

attr::args! {
    /// `#[capture(...)]`'s keys, in the order an unknown key's error lists them.
    struct Args for "capture" {
        stream: LitStr = "stream" => |meta| attr::name(meta, "stream name");
        durable: LitStr = "durable" => |meta| attr::name(meta, "durable name");
        subjects: Vec<LitStr> = "subject" | "subjects" => attr::subjects;
        store: LitStr = "store" => store;
        format: Format = "format" => |meta| one_of(meta, "format", Format::NAMES);
        compression: Compression = "compression" => |meta| one_of(meta, "compression", Compression::NAMES);
        every: u64 = "every" => |meta| attr::duration_at_least(meta, 100_000_000, "`every` must be at least 100ms");
        max_bytes: u64 = "max_bytes" => byte_size;
        max_messages: i64 = "max_messages" => |meta| attr::int_at_least(meta, 1);
        ack_wait: u64 = "ack_wait" => |meta| attr::duration_at_least(
            meta,
            1_000_000_000,
            "a capture's `ack_wait` must be at least 1s: held messages are kept alive every half ack_wait",
        );
        max_ack_pending: i64 = "max_ack_pending" => |meta| attr::int_at_least(meta, 1);
        max_deliver: i64 = "max_deliver" => |meta| attr::int_at_least(meta, 1);
        dead_letter: LitStr = "dead_letter" => attr::dead_letter;
        store_concurrency: i64 = "store_concurrency" => |meta| attr::int_at_least(meta, 1);
        max_memory: u64 = "max_memory" => byte_size;
        /// Captured by a partitioned group of this many partitions.
        partitions: u32 = "partitions" => crate::consumer::partitions;
    }
}

/// `store = "s3://bucket/{key}/"`, checked by [`check_store`].
fn store(meta: &syn::meta::ParseNestedMeta) -> Parsed<LitStr> {
    let lit = attr::lit_str(meta)?;
    Ok(check_store(&lit).map(|()| (lit.clone(), lit.span())))
}

/// The choice named by the key's string, if it is one of `choices`; an unknown name is an
/// error at the string that lists the valid ones (never a silent default).
fn one_of<T: Copy>(meta: &syn::meta::ParseNestedMeta, key: &str, choices: &[(&str, T)]) -> Parsed<T> {
    let lit = attr::lit_str(meta)?;
    let value = lit.value();
    if let Some((_, choice)) = choices.iter().find(|(name, _)| *name == value) {
        return Ok(Ok((*choice, lit.span())));
    }
    let list = choices
        .iter()
        .map(|(name, _)| format!("\"{name}\""))
        .collect::<Vec<_>>()
        .join(", ");
    Ok(Err(syn::Error::new(
        lit.span(),
        format!("unknown {key} `{value}`; expected one of {list}"),
    )))
}

/// A byte count: an integer, or a string such as `"64MiB"`, `"10MB"`, `"512KiB"`.
fn byte_size(meta: &syn::meta::ParseNestedMeta) -> Parsed<u64> {
    let key = attr::key_name(meta);
    let expr: syn::Expr = meta.value()?.parse()?;
    Ok(bytes(&expr, &key).map(|bytes| (bytes, expr.span())))
}

/// The byte count `expr` says, for `key`'s errors.
fn bytes(expr: &syn::Expr, key: &str) -> syn::Result<u64> {
    let fail = || {
        syn::Error::new_spanned(
            expr,
            format!("`{key}` takes a byte count: an integer or a string such as \"64MiB\", \"10MB\", \"512KiB\""),
        )
    };
    let bytes = match expr {
        syn::Expr::Lit(syn::ExprLit {
            lit: syn::Lit::Int(int),
            ..
        }) => int.base10_parse::<u64>().map_err(|_| fail())?,
        syn::Expr::Lit(syn::ExprLit {
            lit: syn::Lit::Str(text),
            ..
        }) => {
            let text = text.value();
            let text = text.trim();
            let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
            let (number, unit) = text.split_at(split);
            let number: u64 = number.parse().map_err(|_| fail())?;
            let scale: u64 = match unit.trim() {
                "" | "B" => 1,
                "KB" | "kB" => 1_000,
                "MB" => 1_000_000,
                "GB" => 1_000_000_000,
                "KiB" => 1 << 10,
                "MiB" => 1 << 20,
                "GiB" => 1 << 30,
                _ => return Err(fail()),
            };
            number.checked_mul(scale).ok_or_else(fail)?
        }
        _ => return Err(fail()),
    };
    if bytes == 0 {
        return Err(syn::Error::new_spanned(expr, format!("`{key}` must be at least 1")));
    }
    Ok(bytes)
}

/// Checks a store URL: a known scheme (unless it comes from an environment variable) and a
/// well-formed path template.
fn check_store(lit: &LitStr) -> syn::Result<()> {
    let url = lit.value();
    let known = ["file://", "s3://", "az://", "azure://"];
    if !url.starts_with("${") && !known.iter().any(|scheme| url.starts_with(scheme)) {
        return Err(syn::Error::new(
            lit.span(),
            format!(
                "unsupported store `{url}`; expected \"file://<folder>/...\", \"s3://<bucket>/...\" or \
                 \"az://<container>/...\" (or \"${{VAR}}/...\" to take it from the environment)"
            ),
        ));
    }
    placeholders(&url)
        .map(|_| ())
        .map_err(|why| syn::Error::new(lit.span(), format!("invalid path template `{url}`: {why}")))
}

/// The `{name}` placeholders of a template, leaving out `${VAR}` environment references.
fn placeholders(template: &str) -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find(['{', '}']) {
        if rest[open..].starts_with('}') {
            return Err("a `}` without its `{`".into());
        }
        let is_env = open > 0 && rest[..open].ends_with('$');
        let Some(close) = rest[open..].find('}') else {
            return Err("a `{` without its `}`".into());
        };
        let name = &rest[open + 1..open + close];
        // `${VAR}` and `${VAR:-default}` are read from the environment at startup.
        if !is_env {
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("`{{{name}}}` is not a placeholder name"));
            }
            names.push(name.to_string());
        }
        rest = &rest[open + close + 1..];
    }
    Ok(names)
}

/// Whether a key function's return type is a plain string or number: then its value is
/// `{key}` and no other key placeholder exists.
fn is_scalar_key(ty: &syn::Type) -> bool {
    let ty = match ty {
        syn::Type::Reference(reference) => &*reference.elem,
        other => other,
    };
    let syn::Type::Path(path) = ty else { return false };
    let Some(last) = path.path.segments.last() else {
        return false;
    };
    matches!(
        last.ident.to_string().as_str(),
        "String"
            | "str"
            | "Cow"
            | "u8"
            | "u16"
            | "u32"
            | "u64"
            | "i8"
            | "i16"
            | "i32"
            | "i64"
            | "usize"
            | "isize"
            | "bool"
    )
}

/// The payload type of `fn name(record: &Payload) -> Key`.
fn signature(function: &ItemFn, errors: &mut Errors) -> Option<(syn::Type, syn::Type)> {
    let sig = &function.sig;
    if let Some(asyncness) = &sig.asyncness {
        errors.spanned(
            asyncness,
            "a capture function is a plain `fn` that returns the split key: remove `async`",
        );
    }
    if !sig.generics.params.is_empty() {
        errors.spanned(&sig.generics, "a capture function cannot be generic");
    }
    let output = match &sig.output {
        syn::ReturnType::Type(_, ty) => Some((**ty).clone()),
        syn::ReturnType::Default => {
            errors.spanned(
                &sig.ident,
                "a capture function returns the split key, e.g. `fn backup(order: &Order) -> String`",
            );
            None
        }
    };
    let mut inputs = sig.inputs.iter();
    let payload = match (inputs.next(), inputs.next()) {
        (Some(syn::FnArg::Typed(arg)), None) => match &*arg.ty {
            syn::Type::Reference(reference) if reference.mutability.is_none() => Some((*reference.elem).clone()),
            other => {
                errors.spanned(
                    other,
                    "a capture function takes its payload by reference, e.g. `order: &Order`",
                );
                None
            }
        },
        (Some(syn::FnArg::Receiver(receiver)), _) => {
            errors.spanned(receiver, "a capture function cannot take `self`");
            None
        }
        (_, Some(extra)) => {
            errors.spanned(
                extra,
                "a capture function takes one argument: the payload, by reference",
            );
            None
        }
        (None, None) => {
            errors.spanned(
                &sig.inputs,
                "a capture function takes the payload by reference, e.g. `fn backup(order: &Order) -> String`",
            );
            None
        }
    };
    Some((payload?, output?))
}

/// Expands `#[capture(args)]` on `item`: the key function unchanged, plus its adapter and
/// registration (or the errors, beside the function).
pub fn expand(args: TokenStream, item: TokenStream) -> TokenStream {
    let mut errors = Errors::default();
    let parsed = Args::parse(args, &mut errors);
    let function = match handler::function(&item, "capture", "a `fn` that returns a record's split key") {
        Ok(function) => function,
        Err(beside) => return beside,
    };
    let types = signature(&function, &mut errors);
    for (slot, key_value) in [
        (&parsed.stream, "stream = \"orders\""),
        (&parsed.durable, "durable = \"backup\""),
        (&parsed.store, "store = \"file://backup/{key}/\""),
    ] {
        let example = "#[capture(stream = \"orders\", durable = \"backup\", store = \"file://backup/{key}/\")]";
        slot.require(&mut errors, format!("{example}: add `{key_value}`"));
    }
    if let (Some(store), Some((_, key_type))) = (parsed.store.get(), &types) {
        if is_scalar_key(key_type) {
            if let Ok(names) = placeholders(&store.value()) {
                if let Some(unknown) = names.iter().find(|name| !PLACEHOLDERS.contains(&name.as_str())) {
                    let list = PLACEHOLDERS
                        .iter()
                        .map(|p| format!("{{{p}}}"))
                        .collect::<Vec<_>>()
                        .join(", ");
                    errors.push(syn::Error::new(
                        store.span(),
                        format!(
                            "unknown placeholder `{{{unknown}}}`: the key is a single value, so the template may use {list} \
                             (return a struct to name several key fields)"
                        ),
                    ));
                }
            }
        }
    }
    if let (Some(max_messages), Some(max_ack_pending)) = (parsed.max_messages.get(), parsed.max_ack_pending.get()) {
        if max_messages > max_ack_pending {
            errors.push(syn::Error::new(
                parsed.max_messages.span().unwrap_or_else(Span::call_site),
                format!(
                    "a block could never fill: `max_messages` ({max_messages}) exceeds `max_ack_pending` \
                     ({max_ack_pending}), and every message of an open block is unacked"
                ),
            ));
        }
    }
    let raw = parsed.format.get() == Some(&Format::Raw);
    let Some((payload, _)) = types else {
        let error = errors
            .into_result()
            .err()
            .unwrap_or_else(|| syn::Error::new(Span::call_site(), "invalid capture function"));
        let error = error.to_compile_error();
        return quote!(#item #error);
    };
    if let Err(beside) = errors.beside(&item) {
        return beside;
    }

    let p = attr::private();
    let runtime = attr::runtime();
    let ident = &function.sig.ident;
    let adapter = format_ident!("__natty_capture_{}", ident);
    let describe = format_ident!("__natty_capture_payload_{}", ident);
    let describer = handler::payload_describer(&describe, std::slice::from_ref(&payload), handler::Describes::Argument);
    let name = ident.to_string();
    let stream = parsed.stream.take().map(|lit| lit.value()).unwrap_or_default();
    let durable = parsed.durable.take().map(|lit| lit.value()).unwrap_or_default();
    let store = parsed.store.take().map(|lit| lit.value()).unwrap_or_default();

    let writers = if raw {
        quote!(#p::capture::raw_writers)
    } else {
        // Spanned at the payload type, so a type without serde support is reported there.
        quote_spanned!(payload.span()=> #p::capture::writers::<#payload>)
    };
    let mut setters = Vec::new();
    if let Some(subjects) = parsed.subjects.take() {
        setters.push(quote!(.subjects(&[#(#subjects),*])));
    }
    if let Some(format) = parsed.format.take() {
        let variant = format.variant();
        setters.push(quote!(.format(#p::capture::BlockFormat::#variant)));
    }
    if let Some(compression) = parsed.compression.take() {
        let variant = compression.variant();
        setters.push(quote!(.compression(#p::capture::Compression::#variant)));
    }
    if let Some(nanos) = parsed.every.take() {
        let duration = attr::duration_tokens(nanos);
        setters.push(quote!(.every(#duration)));
    }
    if let Some(bytes) = parsed.max_bytes.take() {
        setters.push(quote!(.max_bytes(#bytes)));
    }
    if let Some(count) = parsed.max_messages.take() {
        let count = count as u64;
        setters.push(quote!(.max_messages(#count)));
    }
    if let Some(nanos) = parsed.ack_wait.take() {
        let duration = attr::duration_tokens(nanos);
        setters.push(quote!(.ack_wait(#duration)));
    }
    if let Some(value) = parsed.max_ack_pending.take() {
        setters.push(quote!(.max_ack_pending(#value)));
    }
    if let Some(value) = parsed.max_deliver.take() {
        setters.push(quote!(.max_deliver(#value)));
    }
    if let Some(subject) = parsed.dead_letter.take() {
        setters.push(quote!(.dead_letter(#subject)));
    }
    if let Some(value) = parsed.store_concurrency.take() {
        let value = value as usize;
        setters.push(quote!(.store_concurrency(#value)));
    }
    if let Some(partitions) = parsed.partitions.take() {
        setters.push(quote!(.partitions(#partitions)));
    }
    if let Some(bytes) = parsed.max_memory.take() {
        setters.push(quote!(.max_memory(#bytes)));
    }

    quote! {
        #function

        #runtime::__natty_capture! {
        #[doc(hidden)]
        #[allow(non_snake_case)]
        fn #adapter(
            headers: ::core::option::Option<&#p::HeaderMap>,
            payload: &[u8],
        ) -> ::core::result::Result<#p::capture::Captured, #p::BoxError> {
            let record: #payload = #p::decode(headers, payload)?;
            let key = #ident(&record);
            #p::capture::Captured::new(record, &key)
        }

        #[doc(hidden)]
        #[allow(non_snake_case)]
        #describer

        #p::inventory::submit! {
            #p::capture::CaptureDef::new(#name, #stream, #durable, #store, #adapter, #writers)
                #(#setters)*
                .payload_probe(#describe)
                .at(#p::Location { file: ::core::file!(), line: ::core::line!(), module: ::core::module_path!() })
        }
        }
    }
}
