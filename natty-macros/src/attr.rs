//! Shared attribute parsing: duplicate-aware key slots, an error collector, and the
//! compile-time validators for subjects, durable names and durations.

use proc_macro2::{Span, TokenStream};
use quote::ToTokens;
use syn::meta::ParseNestedMeta;
use syn::{Expr, ExprArray, ExprLit, Lit, LitStr};

thread_local! {
    /// The path of natty-runtime named by a `crate = "..."` key of the expansion under way.
    static CRATE: std::cell::RefCell<Option<syn::Path>> = const { std::cell::RefCell::new(None) };
}

/// Forgets the `crate` key of an earlier expansion: the first thing every macro does (the
/// compiler may expand many on one thread).
pub fn start_expansion() {
    CRATE.with(|path| *path.borrow_mut() = None);
}

/// natty-runtime as the user's crate names it: `::natty_runtime`, or the path of a
/// `crate = "..."` key (a dependency renamed in Cargo.toml, or a re-export), as serde's
/// `#[serde(crate = "...")]`.
pub fn runtime() -> TokenStream {
    CRATE.with(|path| match &*path.borrow() {
        Some(path) => path.to_token_stream(),
        None => quote::quote!(::natty_runtime),
    })
}

/// The module of natty-runtime everything generated code names lives in.
pub fn private() -> TokenStream {
    let runtime = runtime();
    quote::quote!(#runtime::__private)
}

/// Reads a `crate = "path"` key: any macro takes it, before its own keys.
fn crate_key(meta: &ParseNestedMeta) -> syn::Result<Result<(), syn::Error>> {
    let lit = lit_str(meta)?;
    let path = match lit.parse::<syn::Path>() {
        Ok(path) => path,
        Err(_) => {
            return Ok(Err(syn::Error::new(
                lit.span(),
                "`crate` names the path of natty-runtime, e.g. crate = \"natty\" for a dependency renamed `natty`",
            )))
        }
    };
    Ok(CRATE.with(|slot| {
        let mut slot = slot.borrow_mut();
        if slot.is_some() {
            return Err(syn::Error::new(lit.span(), "`crate` is given twice"));
        }
        *slot = Some(path);
        Ok(())
    }))
}

/// Collects every error instead of stopping at the first, like serde_derive's `Ctxt`.
#[derive(Default)]
pub struct Errors(Option<syn::Error>);

impl Errors {
    pub fn push(&mut self, error: syn::Error) {
        match &mut self.0 {
            Some(existing) => existing.combine(error),
            None => self.0 = Some(error),
        }
    }

    pub fn spanned(&mut self, tokens: impl ToTokens, message: impl std::fmt::Display) {
        self.push(syn::Error::new_spanned(tokens, message));
    }

    pub fn into_result(self) -> Result<(), syn::Error> {
        match self.0 {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

/// A key that may be given once; the second time is an error at the second key.
pub struct Slot<T> {
    name: &'static str,
    value: Option<(T, Span)>,
}

impl<T> Slot<T> {
    pub fn new(name: &'static str) -> Self {
        Slot { name, value: None }
    }

    /// Stores `value`, given at `span` (the literal, for later errors about it).
    pub fn set(&mut self, meta: &ParseNestedMeta, value: T, span: Span) -> syn::Result<()> {
        if self.value.is_some() {
            return Err(meta.error(format!("`{}` set multiple times", self.name)));
        }
        self.value = Some((value, span));
        Ok(())
    }

    pub fn get(&self) -> Option<&T> {
        self.value.as_ref().map(|(value, _)| value)
    }

    pub fn span(&self) -> Option<Span> {
        self.value.as_ref().map(|(_, span)| *span)
    }

    pub fn take(self) -> Option<T> {
        self.value.map(|(value, _)| value)
    }
}

/// Parses `key = value` pairs with `key`, recording a key's invalid value in `errors` and going
/// on, so that every mistake is reported at once and a key given with a bad value is not also
/// reported as missing. Returns the names of the keys seen.
pub fn parse_keys(
    args: TokenStream,
    errors: &mut Errors,
    mut key: impl FnMut(&str, &ParseNestedMeta) -> syn::Result<Result<(), syn::Error>>,
) -> Vec<String> {
    let mut seen = Vec::new();
    let parser = syn::meta::parser(|meta| {
        let name = meta.path.to_token_stream().to_string().replace(' ', "");
        seen.push(name.clone());
        let parsed = if name == "crate" {
            crate_key(&meta)?
        } else {
            key(&name, &meta)?
        };
        match parsed {
            Ok(()) => Ok(()),
            Err(invalid) => {
                errors.push(invalid);
                Ok(())
            }
        }
    });
    if let Err(error) = syn::parse::Parser::parse2(parser, args) {
        errors.push(error);
    }
    seen
}

/// The error for a key the macro does not know, listing the ones it does. Its value is
/// consumed so parsing can go on to the next key.
pub fn unknown_key(meta: &ParseNestedMeta, macro_name: &str, valid: &[&str]) -> syn::Result<Result<(), syn::Error>> {
    let key = meta.path.to_token_stream().to_string().replace(' ', "");
    let list = valid
        .iter()
        .map(|key| format!("`{key}`"))
        .collect::<Vec<_>>()
        .join(", ");
    let error = meta.error(format!("unknown `{macro_name}` key `{key}`; valid keys are {list}"));
    if meta.input.peek(syn::Token![=]) {
        meta.value()?.parse::<Expr>()?;
    }
    Ok(Err(error))
}

pub fn lit_str(meta: &ParseNestedMeta) -> syn::Result<LitStr> {
    meta.value()?.parse::<LitStr>()
}

/// An integer literal (optionally negative) that must be at least `min`; the error names `key`
/// and points at the literal.
pub fn int_at_least(meta: &ParseNestedMeta, key: &str, min: i64) -> syn::Result<Result<(i64, Span), syn::Error>> {
    let expr: Expr = meta.value()?.parse()?;
    let span = syn::spanned::Spanned::span(&expr);
    let value = match &expr {
        Expr::Lit(ExprLit { lit: Lit::Int(lit), .. }) => lit.base10_parse::<i64>().ok(),
        Expr::Unary(syn::ExprUnary {
            op: syn::UnOp::Neg(_),
            expr: inner,
            ..
        }) => match &**inner {
            Expr::Lit(ExprLit { lit: Lit::Int(lit), .. }) => lit.base10_parse::<i64>().ok().map(|v| -v),
            _ => None,
        },
        _ => None,
    };
    Ok(match value {
        Some(value) if value >= min => Ok((value, span)),
        Some(_) => Err(syn::Error::new_spanned(
            &expr,
            format!("`{key}` must be at least {min}"),
        )),
        None => Err(syn::Error::new_spanned(
            &expr,
            format!("`{key}` takes an integer, e.g. `{key} = {}`", min.max(1)),
        )),
    })
}

/// A string, or a list of strings: `subject = "a.b"` or `subject = ["a.b", "c.>"]`.
pub fn str_or_list(meta: &ParseNestedMeta) -> syn::Result<Vec<LitStr>> {
    let expr: Expr = meta.value()?.parse()?;
    match expr {
        Expr::Lit(ExprLit { lit: Lit::Str(lit), .. }) => Ok(vec![lit]),
        Expr::Array(array) if array.elems.is_empty() => Err(syn::Error::new_spanned(
            array,
            "the list is empty: give at least one subject",
        )),
        Expr::Array(ExprArray { elems, .. }) => elems
            .into_iter()
            .map(|elem| match elem {
                Expr::Lit(ExprLit { lit: Lit::Str(lit), .. }) => Ok(lit),
                other => Err(syn::Error::new_spanned(other, "expected a string literal")),
            })
            .collect(),
        other => Err(syn::Error::new_spanned(
            other,
            "expected a string or a list of strings, e.g. `[\"orders.>\"]`",
        )),
    }
}

/// Parses a duration literal such as `"30s"`, `"15m"` or `"1h 30m"`, into nanoseconds.
pub fn duration(lit: &LitStr) -> syn::Result<u64> {
    let text = lit.value();
    let parsed = humantime::parse_duration(&text).map_err(|error| {
        syn::Error::new(
            lit.span(),
            format!("invalid duration `{text}`: {error}; write e.g. \"500ms\", \"30s\", \"15m\", \"2h\", \"30d\""),
        )
    })?;
    u64::try_from(parsed.as_nanos()).map_err(|_| syn::Error::new(lit.span(), format!("duration `{text}` is too long")))
}

/// A storage type, `"file"` or `"memory"`, as the `StorageType` variant's name.
pub fn storage(lit: &LitStr) -> syn::Result<TokenStream> {
    match lit.value().as_str() {
        "file" => Ok(quote::quote!(File)),
        "memory" => Ok(quote::quote!(Memory)),
        other => Err(syn::Error::new(
            lit.span(),
            format!("unknown storage `{other}`; expected \"file\" or \"memory\""),
        )),
    }
}

/// `replicas = N`: 1 to 5, as the server allows.
pub fn replicas(meta: &ParseNestedMeta) -> syn::Result<Result<(usize, Span), syn::Error>> {
    Ok(int_at_least(meta, "replicas", 1)?.and_then(|(value, span)| {
        if value > 5 {
            Err(syn::Error::new(span, "`replicas` must be between 1 and 5"))
        } else {
            Ok((value as usize, span))
        }
    }))
}

/// `cluster = "..."` and `tags = [...]`: where a stream's replicas are placed.
pub struct Placement {
    cluster: Slot<LitStr>,
    tags: Slot<Vec<LitStr>>,
}

impl Default for Placement {
    fn default() -> Self {
        Placement {
            cluster: Slot::new("cluster"),
            tags: Slot::new("tags"),
        }
    }
}

impl Placement {
    /// Parses `key` if it is a placement key; `None` otherwise.
    pub fn key(&mut self, key: &str, meta: &ParseNestedMeta) -> syn::Result<Option<Result<(), syn::Error>>> {
        Ok(Some(match key {
            "cluster" => {
                let lit = lit_str(meta)?;
                check_name(&lit, "cluster name").and_then(|()| self.cluster.set(meta, lit.clone(), lit.span()))
            }
            "tags" => {
                let tags = str_or_list(meta)?;
                let span = tags.first().map_or_else(Span::call_site, LitStr::span);
                tags.iter()
                    .try_for_each(|tag| {
                        if tag.value().is_empty() || tag.value().contains(char::is_whitespace) {
                            Err(syn::Error::new(
                                tag.span(),
                                "a server tag is a non-empty word without spaces",
                            ))
                        } else {
                            Ok(())
                        }
                    })
                    .and_then(|()| self.tags.set(meta, tags, span))
            }
            _ => return Ok(None),
        }))
    }

    /// The `.placement(...)` setter, when a placement key was given.
    pub fn setter(self, p: &TokenStream) -> Option<TokenStream> {
        let cluster = self.cluster.take();
        let tags = self.tags.take();
        if cluster.is_none() && tags.is_none() {
            return None;
        }
        let cluster = cluster.map(|lit| quote::quote!(.cluster(#lit)));
        let tags = tags.map(|tags| quote::quote!(.tags(&[#(#tags),*])));
        Some(quote::quote!(.placement(#p::Placement::new() #cluster #tags)))
    }
}

/// Emits a `core::time::Duration` constant expression.
pub fn duration_tokens(nanos: u64) -> TokenStream {
    quote::quote!(::core::time::Duration::from_nanos(#nanos))
}

/// Checks a subject (or filter subject) the way nats-server does: non-empty tokens separated
/// by `.`, no whitespace, `*` only as a whole token, `>` only as the whole last token.
pub fn check_subject(lit: &LitStr) -> syn::Result<()> {
    let subject = lit.value();
    let fail = |why: &str| {
        Err(syn::Error::new(
            lit.span(),
            format!("invalid subject `{subject}`: {why}"),
        ))
    };
    if subject.is_empty() {
        return fail("it is empty");
    }
    if subject.chars().any(char::is_whitespace) {
        return fail("subjects cannot contain whitespace");
    }
    let tokens: Vec<&str> = subject.split('.').collect();
    for (index, token) in tokens.iter().enumerate() {
        if token.is_empty() {
            return fail("it has an empty token (a leading, trailing or double `.`)");
        }
        if token.len() > 1 && (token.contains('*') || token.contains('>')) {
            return fail("wildcards `*` and `>` must be whole tokens");
        }
        if *token == ">" && index + 1 != tokens.len() {
            return fail("`>` may only be the last token");
        }
    }
    Ok(())
}

/// Checks a dead-letter subject: a subject messages are published to, so no wildcards.
pub fn check_dead_letter(lit: &LitStr) -> syn::Result<()> {
    check_subject(lit)?;
    if lit.value().contains(['*', '>']) {
        return Err(syn::Error::new(
            lit.span(),
            "a dead-letter subject cannot contain wildcards",
        ));
    }
    Ok(())
}

/// Checks a durable consumer or stream name: nats-server refuses `.`, `*`, `>`, path
/// separators and whitespace in names because they become subject tokens and file names.
pub fn check_name(lit: &LitStr, what: &str) -> syn::Result<()> {
    let name = lit.value();
    let fail = |why: String| Err(syn::Error::new(lit.span(), format!("invalid {what} `{name}`: {why}")));
    if name.is_empty() {
        return fail("it is empty".into());
    }
    if let Some(bad) = name
        .chars()
        .find(|c| matches!(c, '.' | '*' | '>' | '/' | '\\') || c.is_whitespace() || c.is_control())
    {
        return fail(format!(
            "{what}s cannot contain {}",
            if bad.is_whitespace() {
                "whitespace".to_string()
            } else {
                format!("`{bad}`")
            }
        ));
    }
    Ok(())
}
