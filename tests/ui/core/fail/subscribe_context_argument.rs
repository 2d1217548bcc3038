use natty_runtime::prelude::*;

#[derive(serde::Deserialize)]
struct Price {
    cents: u64,
}

// `Context` belongs to JetStream consumers; a core handler takes an `Envelope`.
#[subscribe(subject = "prices.>")]
async fn on_price(price: Price, ctx: Context) {
    let _ = (price.cents, ctx);
}

fn main() {}
