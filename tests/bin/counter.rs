//! A service that adds to a counter, for `tests/counters.rs`: it declares the stream `hits`
//! with `counters = true`, and each `counter.go` request makes it add 1 to `hits.total`
//! `COUNTER_TIMES` times, as fast as it can, then print `done <its last total>`.

use natty_runtime::prelude::*;

#[stream(name = "hits", subjects = ["hits.>"], counters = true)]
struct Hits;

#[subscribe(subject = "counter.go")]
async fn go(_go: serde_json::Value, envelope: Envelope) {
    let times: u64 = std::env::var("COUNTER_TIMES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100);
    let counter = envelope.client().counter("hits.total");
    let mut last = 0;
    for _ in 0..times {
        match counter.increment().await {
            Ok(total) => last = total,
            Err(error) => {
                println!("failed {error}");
                return;
            }
        }
    }
    println!("done {last}");
}

#[tokio::main]
async fn main() -> natty_runtime::Result<()> {
    natty_runtime::run().await
}
