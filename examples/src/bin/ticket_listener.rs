//! The listener service: every instance shares the durable `ticket-listener`, so each ticket
//! is handled by one of them (seed 001's queue group), and acked only after it was handled.

use natty_examples::TicketCreated;
use natty_runtime::prelude::*;

#[stream(name = "tickets", subjects = ["tickets.>"], duplicate_window = "2m")]
struct Tickets;

#[consumer(
    stream = "tickets",
    durable = "ticket-listener",
    subject = "tickets.created",
    concurrency = 4
)]
async fn on_ticket_created(ticket: TicketCreated, ctx: Context) -> Result<(), std::io::Error> {
    let instance = std::env::var("INSTANCE").unwrap_or_else(|_| std::process::id().to_string());
    // Printed to stdout so the demo (and its test) can see which instance took which ticket.
    println!(
        "[{instance}] handled ticket {} \"{}\" ${}.{:02} (seq {}, attempt {})",
        ticket.id,
        ticket.title,
        ticket.price / 100,
        ticket.price % 100,
        ctx.stream_sequence(),
        ctx.delivery_count()
    );
    Ok(())
}

#[tokio::main]
async fn main() -> natty_runtime::Result<()> {
    natty_runtime::run().await
}
