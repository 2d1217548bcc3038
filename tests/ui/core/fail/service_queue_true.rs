use natty_runtime::prelude::*;

#[derive(serde::Deserialize)]
struct Query {
    symbol: String,
}

#[derive(serde::Serialize)]
struct Quote {
    cents: u64,
}

// `true` names no queue group: give one, leave `queue` out, or `false` for every instance.
#[service(subject = "prices.quote", queue = true)]
async fn quote(query: Query) -> Result<Quote, std::io::Error> {
    Ok(Quote { cents: query.symbol.len() as u64 })
}

fn main() {}
