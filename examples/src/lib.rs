//! Shared types of the ticketing example (seed 001's flow, in natty).

use serde::{Deserialize, Serialize};

/// Published on `tickets.created` when a ticket goes on sale.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TicketCreated {
    /// Unique ticket id.
    pub id: String,
    /// What the ticket is for.
    pub title: String,
    /// Price in cents.
    pub price: u32,
    /// Version of the ticket, incremented on each change (seed 001's guard against reordering).
    pub version: u64,
}

/// The subject tickets are announced on.
pub const TICKET_CREATED: &str = "tickets.created";

/// A price request for the `ticket-pricing` service (`tickets.price`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PriceQuery {
    /// How many seats.
    pub seats: u32,
    /// Price of one seat, in cents.
    pub unit_price: u32,
}

/// The `ticket-pricing` service's answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PriceQuote {
    /// How many seats.
    pub seats: u32,
    /// Total in cents, discounts applied.
    pub total: u32,
}
