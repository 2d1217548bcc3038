//! The footprint scenario's service: ten consumers on the `idle` stream, each printing
//! `handled` for a message, run through `natty_runtime::run()` as a user's service is — its
//! own small binary with natty-runtime's default features, so that its memory is a service's,
//! not the benchmark's (whose every scenario's handlers, capture and OTLP code would count too).

use natty_runtime::prelude::*;
use serde::Deserialize;

/// What the benchmark publishes; only decoded here.
#[derive(Deserialize)]
struct Order {
    #[allow(dead_code)] // decoded as a handler would, never read
    id: u64,
}

macro_rules! idle_consumers {
    ($($name:ident => $durable:literal),* $(,)?) => {$(
        /// One of the ten consumers; prints when it handles a message.
        #[consumer(stream = "idle", durable = $durable, subject = "idle.go")]
        async fn $name(_order: Order) {
            println!("handled");
        }
    )*};
}

idle_consumers! {
    idle0 => "idle0", idle1 => "idle1", idle2 => "idle2", idle3 => "idle3", idle4 => "idle4",
    idle5 => "idle5", idle6 => "idle6", idle7 => "idle7", idle8 => "idle8", idle9 => "idle9",
}

#[tokio::main]
async fn main() -> natty_runtime::Result<()> {
    natty_runtime::run().await
}
