use natty_runtime::prelude::*;

#[derive(serde::Deserialize, serde::Serialize)]
struct Price {
    cents: u64,
}

#[subscribe(subject = "prices.>", queue = "pricing", concurrency = 4)]
async fn on_price(price: Price, envelope: Envelope) -> Result<(), std::io::Error> {
    let _ = (price.cents, envelope.subject());
    Ok(())
}

#[service(subject = "prices.lookup")]
async fn lookup(price: Price) -> Result<Price, std::io::Error> {
    Ok(price)
}

// No queue group: every instance answers each request.
#[service(subject = "prices.quote", queue = false)]
async fn quote(price: Price) -> Result<Price, std::io::Error> {
    Ok(price)
}

#[service(subject = "prices.convert", queue = "converters", concurrency = 2)]
async fn convert(price: Price) -> Result<Price, std::io::Error> {
    Ok(price)
}

fn main() {}
