//! What the declaration macros share (`#[stream]`, `#[kv_bucket]`, `#[object_store]`): each goes
//! on a plain struct, which is emitted unchanged beside the registration of its definition.

use proc_macro2::TokenStream;
use quote::quote;
use syn::Item;

use crate::attr::{self, Errors};

/// Checks that `#[macro_name]` is on a struct without generics (the struct only names the
/// declaration: it is never constructed); `example` shows one, e.g. `struct Orders;`.
pub fn check_item(item: &TokenStream, macro_name: &str, example: &str, errors: &mut Errors) {
    let misplaced = format!("`#[{macro_name}]` goes on a struct, e.g. `{example}`");
    match syn::parse2::<Item>(item.clone()) {
        Ok(Item::Struct(item)) if item.generics.params.is_empty() => {}
        Ok(Item::Struct(item)) => {
            errors.spanned(&item.generics, format!("a `#[{macro_name}]` struct cannot be generic"))
        }
        Ok(Item::Fn(item)) => errors.spanned(item.sig.fn_token, &misplaced),
        Ok(other) => errors.spanned(other, &misplaced),
        Err(error) => errors.push(error),
    }
}

/// The struct unchanged, and the registration of `definition` (a `...Def` with its setters)
/// with where it was written.
pub fn emit(item: TokenStream, definition: TokenStream) -> TokenStream {
    let p = attr::private();
    quote! {
        // The declaration is the item's only use; it is never constructed.
        #[allow(dead_code)]
        #item
        const _: () = {
            #p::inventory::submit! {
                #definition
                    .at(#p::Location { file: ::core::file!(), line: ::core::line!(), module: ::core::module_path!() })
            }
        };
    }
}
