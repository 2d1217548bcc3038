//! Shared attribute parsing: the key table every macro declares its arguments with (`args!`),
//! its duplicate-aware slots, an error collector, the parsers several macros share, and the
//! compile-time validators for subjects, names and durations.

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
    /// Records `error` beside the ones before it.
    pub fn push(&mut self, error: syn::Error) {
        match &mut self.0 {
            Some(existing) => existing.combine(error),
            None => self.0 = Some(error),
        }
    }

    /// Records an error about `tokens`, spanning all of them.
    pub fn spanned(&mut self, tokens: impl ToTokens, message: impl std::fmt::Display) {
        self.push(syn::Error::new_spanned(tokens, message));
    }

    /// Every recorded error, as one (each still at its own span), or `Ok` when there is none.
    /// `Err` with the errors emitted beside `item` (kept as written, so the code using it still
    /// resolves and only these errors are reported), `Ok` when there are none.
    pub fn beside(self, item: &TokenStream) -> Result<(), TokenStream> {
        self.into_result().map_err(|error| {
            let error = error.to_compile_error();
            quote::quote!(#item #error)
        })
    }

    pub fn into_result(self) -> Result<(), syn::Error> {
        match self.0 {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

/// What a key's parser returns. Outer error: the attribute cannot be parsed further (the value
/// is not even the right kind of token). Inner error: this key's value is wrong, and parsing goes
/// on, so that every mistake is reported at once. The span is the value's, for later errors
/// about it (one key checked against another).
pub type Parsed<T> = syn::Result<syn::Result<(T, Span)>>;

/// A key's parser: reads the value after `key =` and validates it.
pub type Parser<T> = fn(&ParseNestedMeta) -> Parsed<T>;

/// A key that may be given once; the second time is an error at the second key.
pub struct Slot<T> {
    /// The names that fill this slot, as the table lists them: one, except where several keys
    /// are alternatives (the consumer's `deliver` / `start_sequence` / `start_time`).
    names: &'static [&'static str],
    given: bool,
    value: Option<(T, Span)>,
}

impl<T> Slot<T> {
    /// An empty slot for the key (or alternative keys) `names`; [`args!`] makes them.
    pub fn new(names: &'static [&'static str]) -> Self {
        Slot {
            names,
            given: false,
            value: None,
        }
    }

    /// How errors name this slot: "`name`", or each of its names.
    fn label(&self) -> String {
        self.names
            .iter()
            .map(|name| format!("`{name}`"))
            .collect::<Vec<_>>()
            .join(" / ")
    }

    /// Reads this slot's key with `parse`. The error for a second value is at the second key
    /// and its value (a refused value is reported as such, not as a repetition).
    pub fn parse(&mut self, meta: &ParseNestedMeta, parse: Parser<T>) -> syn::Result<syn::Result<()>> {
        self.given = true;
        let (value, span) = match parse(meta)? {
            Ok(parsed) => parsed,
            Err(invalid) => return Ok(Err(invalid)),
        };
        if self.value.is_some() {
            return Ok(Err(meta.error(format!("{} set multiple times", self.label()))));
        }
        self.value = Some((value, span));
        Ok(Ok(()))
    }

    /// Whether the key was written, even with a value that was refused.
    pub fn given(&self) -> bool {
        self.given
    }

    /// Reports this key missing, at the attribute, unless it was written: a key given with a
    /// bad value was already reported and is not also "missing". `example` is a whole attribute.
    pub fn require(&self, errors: &mut Errors, example: impl std::fmt::Display) {
        if !self.given {
            errors.push(syn::Error::new(
                Span::call_site(),
                format!("missing {}, e.g. {example}", self.label()),
            ));
        }
    }

    /// The value, if the key was given a valid one.
    pub fn get(&self) -> Option<&T> {
        self.value.as_ref().map(|(value, _)| value)
    }

    /// Where the value was written, for an error that involves another key.
    pub fn span(&self) -> Option<Span> {
        self.value.as_ref().map(|(_, span)| *span)
    }

    /// The value, to generate code from.
    pub fn take(self) -> Option<T> {
        self.value.map(|(value, _)| value)
    }
}

/// A macro's arguments: one [`Slot`] per key, declared with [`args!`].
pub trait MacroArgs: Default {
    /// Every key as "unknown key" lists it: in table order, without the alternative spellings.
    const KEYS: &'static [&'static str];

    /// Parses `key` into its slot (see [`Parsed`] for the two errors).
    fn key(&mut self, key: &str, meta: &ParseNestedMeta) -> syn::Result<syn::Result<()>>;

    /// Parses one attribute's `key = value` pairs, recording every mistake in `errors`.
    fn parse(args: TokenStream, errors: &mut Errors) -> Self {
        let mut parsed = Self::default();
        parsed.parse_more(args, errors);
        parsed
    }

    /// Parses another attribute into the same slots: a derive's keys may be spread over
    /// several `#[payload(...)]` attributes, and a key is still given once in all of them.
    fn parse_more(&mut self, args: TokenStream, errors: &mut Errors) {
        parse_keys(args, errors, |key, meta| self.key(key, meta));
    }
}

/// Declares a macro's arguments: the one place each key's name is written. From the table it
/// makes the struct (a [`Slot`] per field), the dispatch from a key to its field's parser, the
/// list an unknown key's error shows, and each slot's name for "set multiple times" and
/// "missing" errors.
///
/// ```ignore
/// attr::args! {
///     /// `#[leader(...)]`'s keys.
///     struct Args for "leader" {
///         bucket: LitStr = "bucket" => |meta| attr::name(meta, "bucket name");
///         // Several keys filling one slot, each with its parser:
///         deliver: TokenStream = "deliver" => policy, "start_time" => start_time;
///         // `| "subjects"`: another spelling, accepted and not listed.
///         subjects: Vec<LitStr> = "subject" | "subjects" => attr::subjects;
///     }
/// }
/// ```
///
/// Every macro also takes `crate = "..."`, read before the table (see [`runtime`]).
macro_rules! args {
    (
        $(#[$doc:meta])*
        struct $Args:ident for $macro_name:literal {
            $(
                $(#[$field_doc:meta])*
                $field:ident: $T:ty = $($key:literal $(| $alias:literal)* => $parse:expr),+;
            )*
        }
    ) => {
        $(#[$doc])*
        struct $Args {
            $($(#[$field_doc])* $field: $crate::attr::Slot<$T>,)*
        }

        impl ::core::default::Default for $Args {
            fn default() -> Self {
                $Args {
                    $($field: $crate::attr::Slot::new(&[$($key),+]),)*
                }
            }
        }

        impl $crate::attr::MacroArgs for $Args {
            const KEYS: &'static [&'static str] = &[$($($key),+),*];

            fn key(
                &mut self,
                key: &str,
                meta: &::syn::meta::ParseNestedMeta,
            ) -> ::syn::Result<::syn::Result<()>> {
                $($(
                    if key == $key $(|| key == $alias)* {
                        return self.$field.parse(meta, $parse);
                    }
                )+)*
                $crate::attr::unknown_key(meta, $macro_name, Self::KEYS)
            }
        }
    };
}

pub(crate) use args;

/// Parses `key = value` pairs with `key`, recording a key's invalid value in `errors` and going
/// on, so that every mistake is reported at once.
fn parse_keys(
    args: TokenStream,
    errors: &mut Errors,
    mut key: impl FnMut(&str, &ParseNestedMeta) -> syn::Result<Result<(), syn::Error>>,
) {
    let parser = syn::meta::parser(|meta| {
        let name = key_name(&meta);
        let parsed = if name == "crate" {
            crate_key(&meta)?
        } else {
            key(&name, &meta)?
        };
        if let Err(invalid) = parsed {
            errors.push(invalid);
        }
        Ok(())
    });
    if let Err(error) = syn::parse::Parser::parse2(parser, args) {
        errors.push(error);
    }
}

/// The key as written, e.g. `ack_wait` (a path such as `a::b` too, to report it as unknown).
pub fn key_name(meta: &ParseNestedMeta) -> String {
    meta.path.to_token_stream().to_string().replace(' ', "")
}

/// The error for a key the macro does not know, listing the ones it does. Its value is
/// consumed so parsing can go on to the next key.
pub fn unknown_key(meta: &ParseNestedMeta, macro_name: &str, valid: &[&str]) -> syn::Result<Result<(), syn::Error>> {
    let key = key_name(meta);
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

/// The string literal after `key =`; anything else is an error that stops parsing.
pub fn lit_str(meta: &ParseNestedMeta) -> syn::Result<LitStr> {
    meta.value()?.parse::<LitStr>()
}

// Parsers shared by several macros' tables, each a [`Parser`] (or one once its other
// arguments are given, in a closure).

/// Any string, e.g. a `description`.
pub fn text(meta: &ParseNestedMeta) -> Parsed<LitStr> {
    let lit = lit_str(meta)?;
    let span = lit.span();
    Ok(Ok((lit, span)))
}

/// A stream, consumer, bucket or queue-group name: `what` says which, for the error.
pub fn name(meta: &ParseNestedMeta, what: &str) -> Parsed<LitStr> {
    let lit = lit_str(meta)?;
    Ok(check_name(&lit, what).map(|()| (lit.clone(), lit.span())))
}

/// One subject, wildcards allowed.
pub fn subject(meta: &ParseNestedMeta) -> Parsed<LitStr> {
    let lit = lit_str(meta)?;
    Ok(check_subject(&lit).map(|()| (lit.clone(), lit.span())))
}

/// A KV bucket or object store name (see [`check_bucket_name`]).
pub fn bucket_name(meta: &ParseNestedMeta) -> Parsed<LitStr> {
    let lit = lit_str(meta)?;
    Ok(check_bucket_name(&lit).map(|()| (lit.clone(), lit.span())))
}

/// A subject or a list of them, wildcards allowed; spanned at the first.
pub fn subjects(meta: &ParseNestedMeta) -> Parsed<Vec<LitStr>> {
    let subjects = str_or_list(meta)?;
    let span = subjects.first().map_or_else(Span::call_site, LitStr::span);
    Ok(subjects.iter().try_for_each(check_subject).map(|()| (subjects, span)))
}

/// A dead-letter subject (see [`check_dead_letter`]).
pub fn dead_letter(meta: &ParseNestedMeta) -> Parsed<LitStr> {
    let lit = lit_str(meta)?;
    Ok(check_dead_letter(&lit).map(|()| (lit.clone(), lit.span())))
}

/// A duration, in nanoseconds.
pub fn duration(meta: &ParseNestedMeta) -> Parsed<u64> {
    let lit = lit_str(meta)?;
    Ok(nanos(&lit).map(|nanos| (nanos, lit.span())))
}

/// A duration of at least `min` nanoseconds; `too_short` is the error otherwise.
pub fn duration_at_least(meta: &ParseNestedMeta, min: u64, too_short: &str) -> Parsed<u64> {
    let lit = lit_str(meta)?;
    Ok(nanos(&lit).and_then(|nanos| {
        if nanos < min {
            Err(syn::Error::new(lit.span(), too_short))
        } else {
            Ok((nanos, lit.span()))
        }
    }))
}

/// An integer literal (optionally negative) that must be at least `min`; the error names the
/// key and points at the literal.
pub fn int_at_least(meta: &ParseNestedMeta, min: i64) -> Parsed<i64> {
    let key = key_name(meta);
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

/// A positive integer: a count of tasks or messages.
pub fn count(meta: &ParseNestedMeta) -> Parsed<usize> {
    Ok(int_at_least(meta, 1)?.map(|(value, span)| (value as usize, span)))
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
pub fn nanos(lit: &LitStr) -> syn::Result<u64> {
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
pub fn storage(meta: &ParseNestedMeta) -> Parsed<TokenStream> {
    let lit = lit_str(meta)?;
    Ok(match lit.value().as_str() {
        "file" => Ok((quote::quote!(File), lit.span())),
        "memory" => Ok((quote::quote!(Memory), lit.span())),
        other => Err(syn::Error::new(
            lit.span(),
            format!("unknown storage `{other}`; expected \"file\" or \"memory\""),
        )),
    })
}

/// `replicas = N`: 1 to 5, as the server allows.
pub fn replicas(meta: &ParseNestedMeta) -> Parsed<usize> {
    Ok(int_at_least(meta, 1)?.and_then(|(value, span)| {
        if value > 5 {
            Err(syn::Error::new(span, "`replicas` must be between 1 and 5"))
        } else {
            Ok((value as usize, span))
        }
    }))
}

/// `cluster = "..."`: the cluster a stream's replicas are placed in.
pub fn cluster(meta: &ParseNestedMeta) -> Parsed<LitStr> {
    name(meta, "cluster name")
}

/// `tags = [...]`: server tags every replica's server must have.
pub fn tags(meta: &ParseNestedMeta) -> Parsed<Vec<LitStr>> {
    let tags = str_or_list(meta)?;
    let span = tags.first().map_or_else(Span::call_site, LitStr::span);
    Ok(tags
        .iter()
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
        .map(|()| (tags, span)))
}

/// The `.placement(...)` setter, when `cluster` or `tags` was given.
pub fn placement(cluster: Slot<LitStr>, tags: Slot<Vec<LitStr>>, p: &TokenStream) -> Option<TokenStream> {
    let cluster = cluster.take();
    let tags = tags.take();
    if cluster.is_none() && tags.is_none() {
        return None;
    }
    let cluster = cluster.map(|lit| quote::quote!(.cluster(#lit)));
    let tags = tags.map(|tags| quote::quote!(.tags(&[#(#tags),*])));
    Some(quote::quote!(.placement(#p::Placement::new() #cluster #tags)))
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

/// Bucket names become stream names (`KV_<name>`, `OBJ_<name>`) and subject tokens: the
/// server and async-nats accept only letters, digits, `-` and `_`.
pub fn check_bucket_name(lit: &LitStr) -> syn::Result<()> {
    check_name(lit, "bucket name")?;
    let name = lit.value();
    match name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        Some(bad) => Err(syn::Error::new(
            lit.span(),
            format!(
                "invalid bucket name `{name}`: bucket names cannot contain `{bad}`; use letters, digits, `-` and `_`"
            ),
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    args! {
        /// One entry of each kind: plain, with another spelling, and two keys in one slot.
        struct Args for "test" {
            name: LitStr = "name" => text;
            subjects: Vec<LitStr> = "subject" | "subjects" => subjects;
            start: i64 = "first" => |meta| int_at_least(meta, 1),
                "second" => |meta| int_at_least(meta, 1);
        }
    }

    /// The parsed slots and every error's message.
    fn parse(tokens: TokenStream) -> (Args, Vec<String>) {
        let mut errors = Errors::default();
        let args = Args::parse(tokens, &mut errors);
        (args, messages(errors))
    }

    fn messages(errors: Errors) -> Vec<String> {
        match errors.into_result() {
            Ok(()) => Vec::new(),
            Err(error) => error.into_iter().map(|error| error.to_string()).collect(),
        }
    }

    #[test]
    fn an_unknown_key_lists_the_table_without_other_spellings() {
        assert_eq!(Args::KEYS, ["name", "subject", "first", "second"]);
        let (_, errors) = parse(quote::quote!(nmae = "x", name = "y"));
        assert_eq!(
            errors,
            ["unknown `test` key `nmae`; valid keys are `name`, `subject`, `first`, `second`"]
        );
    }

    #[test]
    fn a_slot_given_twice_is_named_by_its_listed_keys() {
        let (_, errors) = parse(quote::quote!(first = 1, second = 2));
        assert_eq!(errors, ["`first` / `second` set multiple times"]);
        let (args, errors) = parse(quote::quote!(subjects = "a.b", subject = "c"));
        assert_eq!(errors, ["`subject` set multiple times"]);
        assert_eq!(args.subjects.get().map(Vec::len), Some(1));
    }

    #[test]
    fn a_refused_value_counts_as_given_but_not_set() {
        let (args, errors) = parse(quote::quote!(second = 0));
        assert_eq!(errors, ["`second` must be at least 1"]);
        assert!(args.start.given());
        assert!(args.start.get().is_none());
        let mut missing = Errors::default();
        args.start.require(&mut missing, "#[test(first = 1)]");
        args.name.require(&mut missing, "#[test(name = \"x\")]");
        assert_eq!(messages(missing), ["missing `name`, e.g. #[test(name = \"x\")]"]);
    }
}
