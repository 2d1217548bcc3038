//! Publishes tickets and waits for each to be stored: `ticket-publisher [COUNT]`.

use natty_examples::{TicketCreated, TICKET_CREATED};

#[tokio::main]
async fn main() -> natty_runtime::Result<()> {
    natty_runtime::init_logging();
    let count: u32 = std::env::args().nth(1).and_then(|n| n.parse().ok()).unwrap_or(10);
    let nats = natty_runtime::connect().await?;
    for n in 1..=count {
        let ticket = TicketCreated {
            id: format!("t-{n}"),
            title: format!("concert #{n}"),
            price: 2000 + n,
            version: 1,
        };
        let ack = nats.publish(TICKET_CREATED, &ticket).await?;
        println!("published ticket {} as {} #{}", ticket.id, ack.stream, ack.sequence);
    }
    nats.flush().await.ok();
    Ok(())
}
