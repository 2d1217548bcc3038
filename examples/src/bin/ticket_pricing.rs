//! A request-reply service: answers `tickets.price` with a quote. Instances share a queue
//! group, so each request is answered once however many run.
//!
//! Ask it from any program: `client.request::<_, PriceQuote>("tickets.price", &query).await?`.

use natty_examples::{PriceQuery, PriceQuote};
use natty_runtime::prelude::*;

#[service(subject = "tickets.price", concurrency = 8)]
async fn quote(query: PriceQuery) -> Result<PriceQuote, std::io::Error> {
    if query.seats == 0 {
        return Err(std::io::Error::other("a quote needs at least one seat"));
    }
    // Group discount: 10% off from 4 seats.
    let unit = if query.seats >= 4 {
        query.unit_price * 9 / 10
    } else {
        query.unit_price
    };
    Ok(PriceQuote {
        seats: query.seats,
        total: unit * query.seats,
    })
}

#[tokio::main]
async fn main() -> natty_runtime::Result<()> {
    natty_runtime::run().await
}
