//! `#[leader]`: a task that runs in one instance at a time.

use proc_macro2::TokenStream;

pub fn expand(_args: TokenStream, item: TokenStream) -> TokenStream {
    item
}
