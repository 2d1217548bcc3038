use natty_runtime::prelude::*;

#[derive(serde::Deserialize)]
struct Price {
    cents: u64,
}

#[subscribe(subject = "prices..eu", queue = "pricing")]
async fn on_price(price: Price) {
    let _ = price.cents;
}

fn main() {}
