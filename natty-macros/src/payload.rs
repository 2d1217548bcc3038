//! `#[derive(Payload)]`: a message type's subject (a template over its fields) and format.

use proc_macro2::{Span, TokenStream};
use quote::quote;
use syn::{Data, DeriveInput, Fields, LitStr};

use crate::attr::{self, Errors, MacroArgs as _, Parsed};

attr::args! {
    /// `#[payload(...)]`'s keys.
    struct Args for "payload" {
        /// A template: `{field}` placeholders are checked against the struct's fields later.
        subject: LitStr = "subject" => attr::text;
        format: Format = "format" => format;
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Format {
    Json,
    Protobuf,
}

/// `format = "json" | "protobuf"`.
fn format(meta: &syn::meta::ParseNestedMeta) -> Parsed<Format> {
    let lit = attr::lit_str(meta)?;
    Ok(match lit.value().as_str() {
        "json" => Ok(Format::Json),
        "protobuf" => Ok(Format::Protobuf),
        other => Err(syn::Error::new(
            lit.span(),
            format!("unknown format `{other}`; expected \"json\" or \"protobuf\""),
        )),
    }
    .map(|format| (format, lit.span())))
}

/// One piece of a subject template: literal text or a field to format.
enum Piece {
    Text(String),
    Field(syn::Ident),
}

/// Derives `Payload` (and, for protobuf, the encoding traits) from the `#[payload(...)]`
/// attributes of `input`, or returns the errors.
pub fn expand(input: TokenStream) -> TokenStream {
    let input: DeriveInput = match syn::parse2(input) {
        Ok(input) => input,
        Err(error) => return error.to_compile_error(),
    };
    let mut errors = Errors::default();
    let mut parsed = Args::default();
    let mut attributes = 0;
    for attribute in input.attrs.iter().filter(|a| a.path().is_ident("payload")) {
        attributes += 1;
        let args = match &attribute.meta {
            syn::Meta::List(list) => list.tokens.clone(),
            other => {
                errors.spanned(other, "write `#[payload(subject = \"...\")]`");
                continue;
            }
        };
        parsed.parse_more(args, &mut errors);
    }
    let format_value = parsed.format.get().copied().unwrap_or(Format::Json);
    if attributes == 0 {
        errors.push(syn::Error::new(
            Span::call_site(),
            "`#[derive(Payload)]` needs `#[payload(subject = \"...\")]` (and `format = \"protobuf\"` for prost messages)",
        ));
    } else if parsed.subject.get().is_none() && format_value == Format::Json {
        errors.push(syn::Error::new(
            Span::call_site(),
            "a JSON payload needs `subject`: decoding already works for any `serde::Deserialize` type",
        ));
    }
    let pieces = parsed.subject.get().map(|lit| template(lit, &input, &mut errors));
    if let Err(error) = errors.into_result() {
        return error.to_compile_error();
    }

    let p = attr::private();
    let name = &input.ident;
    let name_str = name.to_string();
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    let mut out = TokenStream::new();
    if let Some(pieces) = pieces {
        let template = parsed.subject.get().map(LitStr::value).unwrap_or_default();
        let body = subject_body(&pieces, &template);
        out.extend(quote! {
            #[automatically_derived]
            impl #impl_generics #p::Payload for #name #ty_generics #where_clause {
                fn subject(&self) -> ::core::result::Result<::std::borrow::Cow<'_, str>, #p::PublishError> {
                    #body
                }
            }
        });
    }
    if format_value == Format::Protobuf {
        out.extend(quote! {
            #[automatically_derived]
            impl #impl_generics #p::EncodePayload for #name #ty_generics #where_clause {
                const FORMAT: #p::Format = #p::Format::Protobuf;

                fn to_bytes(&self) -> ::core::result::Result<#p::Bytes, #p::BoxError> {
                    ::core::result::Result::Ok(#p::Bytes::from(#p::prost::Message::encode_to_vec(self)))
                }
            }

            #[automatically_derived]
            impl #impl_generics #p::DecodePayload for #name #ty_generics #where_clause {
                const FORMAT: #p::Format = #p::Format::Protobuf;

                fn from_bytes(bytes: &[u8]) -> ::core::result::Result<Self, #p::BoxError> {
                    <Self as #p::prost::Message>::decode(bytes).map_err(::core::convert::Into::into)
                }

                fn json_schema() -> #p::JsonValue {
                    #p::protobuf_schema(#name_str, ::core::any::type_name::<Self>())
                }
            }
        });
    }
    out
}

/// Splits `orders.{store}.created` into text and fields, checking that each placeholder is a
/// whole subject token naming a field, and that the rest is a valid subject without wildcards.
fn template(lit: &LitStr, input: &DeriveInput, errors: &mut Errors) -> Vec<Piece> {
    let text = lit.value();
    let fields: Vec<String> = match &input.data {
        Data::Struct(data) => match &data.fields {
            Fields::Named(named) => named
                .named
                .iter()
                .filter_map(|field| field.ident.as_ref().map(ToString::to_string))
                .collect(),
            _ => Vec::new(),
        },
        _ => Vec::new(),
    };
    let mut pieces = Vec::new();
    let mut checked = Vec::new();
    for (index, token) in text.split('.').enumerate() {
        if index > 0 {
            pieces.push(Piece::Text(".".into()));
        }
        match token.strip_prefix('{').and_then(|rest| rest.strip_suffix('}')) {
            Some(field) => {
                if !fields.iter().any(|known| known == field) {
                    let hint = if fields.is_empty() {
                        "placeholders need a struct with named fields".to_string()
                    } else {
                        format!("its fields are {}", fields.join(", "))
                    };
                    errors.spanned(lit, format!("subject placeholder `{{{field}}}` names no field; {hint}"));
                    continue;
                }
                pieces.push(Piece::Field(syn::Ident::new(field, lit.span())));
                checked.push("x".to_string());
            }
            None => {
                if token.contains(['{', '}']) {
                    errors.spanned(
                        lit,
                        format!(
                            "`{token}`: a placeholder must be a whole subject token, e.g. `orders.{{store}}.created`"
                        ),
                    );
                    continue;
                }
                if token == "*" || token == ">" {
                    errors.spanned(lit, "a payload's subject is where it is published: no wildcards");
                    continue;
                }
                pieces.push(Piece::Text(token.to_string()));
                checked.push(token.to_string());
            }
        }
    }
    if let Err(error) = attr::check_subject(&LitStr::new(&checked.join("."), lit.span())) {
        // Re-word with the template the user wrote rather than the substituted one.
        errors.spanned(lit, error.to_string().replace(&checked.join("."), &text));
    }
    pieces
}

/// The body of `Payload::subject`: the template's text, with each field's value checked to be
/// exactly one subject token, since field values come from users' data (`"a.b"` or `"*"` would
/// publish elsewhere than the template says).
fn subject_body(pieces: &[Piece], template: &str) -> TokenStream {
    let p = attr::private();
    if pieces.iter().all(|piece| matches!(piece, Piece::Text(_))) {
        let text: String = pieces
            .iter()
            .map(|piece| match piece {
                Piece::Text(text) => text.as_str(),
                Piece::Field(_) => "",
            })
            .collect();
        return quote!(::core::result::Result::Ok(::std::borrow::Cow::Borrowed(#text)));
    }
    let mut format = String::new();
    let mut values = Vec::new();
    for piece in pieces {
        match piece {
            Piece::Text(text) => format.push_str(&text.replace('{', "{{").replace('}', "}}")),
            Piece::Field(field) => {
                format.push_str("{}");
                let name = field.to_string();
                values.push(quote! {
                    #p::subject_token(::core::any::type_name::<Self>(), #name, #template, &self.#field)?
                });
            }
        }
    }
    quote!(::core::result::Result::Ok(::std::borrow::Cow::Owned(
        ::std::format!(#format, #(#values),*)
    )))
}
