//! How a generated adapter builds each argument of a handler: decided by trait, as axum
//! decides between `FromRequestParts` and `FromRequest`, never by the name of the type.
//!
//! Every argument type `T` of a handler fed deliveries `D` must implement
//! [`HandlerArg<D, M>`](HandlerArg) for exactly one marker `M`, which the compiler infers:
//! [`ViaPayload`] for a type decoded from the message (any `serde::Deserialize` type, or a
//! Protobuf `Payload`), [`ViaParts`] for a type the runtime builds from the delivery
//! ([`Context`](crate::Context) in a `#[consumer]`, [`Envelope`](crate::Envelope) in a
//! `#[subscribe]` or `#[service]`). So `use natty_runtime::Context as Ctx;` then `ctx: Ctx`
//! works, and a payload struct that happens to be called `Envelope` is a payload.

use crate::consumer::{BatchDelivery, FromBatch, FromBatchParts};
use crate::handler::{Delivery, FromDelivery};
use crate::kv_watch::{FromKvEntry, KvDelivery};
use crate::payload::{DecodeError, DecodePayload};
use crate::state::{Need, State};
use crate::subscribe::{CoreDelivery, FromCoreDelivery};

/// Marker: the argument is the message's payload, decoded.
pub struct ViaPayload;

/// Marker: the argument is built from the delivery (its subject, headers, a client...).
pub struct ViaParts;

/// An argument a handler fed deliveries `D` can take; `M` says how it is built.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be an argument of this handler",
    label = "neither a payload natty can decode nor something the runtime provides",
    note = "a handler takes one payload (a `serde::Deserialize` type, or a Protobuf `Payload`), and besides it \
            `natty_runtime::Context` in a #[consumer], `natty_runtime::Envelope` in a #[subscribe] or #[service]; \
            a #[kv_watch] takes one `natty_runtime::KvChange<T>`, a #[leader] task `natty_runtime::Lease`, \
            a batch #[consumer] its messages as `Vec<T>` or `natty_runtime::Batch<T>`; \
            any handler may take `natty_runtime::State<T>`, a value given to the runtime"
)]
pub trait HandlerArg<D, M>: Sized {
    /// Builds the argument for one delivery.
    ///
    /// # Errors
    ///
    /// The payload cannot be decoded as this type.
    fn from_delivery(delivery: &D) -> Result<Self, DecodeError>;
}

/// A delivery with a payload to decode.
pub trait Carrier {
    /// The message's headers.
    fn headers(&self) -> Option<&async_nats::HeaderMap>;
    /// The message's payload.
    fn payload(&self) -> &[u8];
}

impl Carrier for Delivery {
    fn headers(&self) -> Option<&async_nats::HeaderMap> {
        self.headers.as_deref()
    }

    fn payload(&self) -> &[u8] {
        &self.payload
    }
}

impl Carrier for CoreDelivery {
    fn headers(&self) -> Option<&async_nats::HeaderMap> {
        self.headers.as_ref()
    }

    fn payload(&self) -> &[u8] {
        &self.payload
    }
}

impl<D: Carrier, T: DecodePayload> HandlerArg<D, ViaPayload> for T {
    fn from_delivery(delivery: &D) -> Result<Self, DecodeError> {
        crate::payload::decode(delivery.headers(), delivery.payload())
    }
}

impl<T: FromDelivery> HandlerArg<Delivery, ViaParts> for T {
    fn from_delivery(delivery: &Delivery) -> Result<Self, DecodeError> {
        Ok(<T as FromDelivery>::from_delivery(delivery))
    }
}

impl<T: FromCoreDelivery> HandlerArg<CoreDelivery, ViaParts> for T {
    fn from_delivery(delivery: &CoreDelivery) -> Result<Self, DecodeError> {
        Ok(<T as FromCoreDelivery>::from_delivery(delivery))
    }
}

impl<T: FromBatch> HandlerArg<BatchDelivery, ViaPayload> for T {
    fn from_delivery(delivery: &BatchDelivery) -> Result<Self, DecodeError> {
        Ok(T::from_batch(delivery))
    }
}

impl<T: FromBatchParts> HandlerArg<BatchDelivery, ViaParts> for T {
    fn from_delivery(delivery: &BatchDelivery) -> Result<Self, DecodeError> {
        Ok(T::from_parts(delivery))
    }
}

/// An argument of a `#[kv_watch]` handler built from the runtime rather than from the entry:
/// a [`State<T>`].
pub trait FromKvParts: Sized {
    /// Builds the argument.
    fn from_parts(delivery: &KvDelivery) -> Self;
}

impl<T: Clone + Send + Sync + 'static> FromKvParts for State<T> {
    fn from_parts(delivery: &KvDelivery) -> Self {
        delivery.states.argument()
    }
}

impl<T: FromKvParts> HandlerArg<KvDelivery, ViaParts> for T {
    fn from_delivery(delivery: &KvDelivery) -> Result<Self, DecodeError> {
        Ok(T::from_parts(delivery))
    }
}

impl<T: FromKvEntry> HandlerArg<KvDelivery, ViaPayload> for T {
    fn from_delivery(delivery: &KvDelivery) -> Result<Self, DecodeError> {
        T::from_entry(delivery)
    }
}

/// Builds argument `T` of a handler fed `D` (the marker inferred): what generated adapters
/// call, the one place that requires `T: HandlerArg`, so that a wrong type is reported once.
pub fn arg<D, M, T: HandlerArg<D, M>>(delivery: &D) -> Built<T, M> {
    Built {
        value: T::from_delivery(delivery),
        marker: std::marker::PhantomData,
    }
}

/// One argument, built, with the marker of how (for [`OneMore`]).
pub struct Built<T, M> {
    /// The argument, or why the payload could not be decoded.
    pub value: Result<T, DecodeError>,
    /// How it was built.
    pub marker: std::marker::PhantomData<M>,
}

/// Adds the argument marked `M` to the arguments so far (`Self`). Every sum exists, so that
/// no impl is unique enough to steer type inference; [`AtMostOne`] then refuses two payloads.
pub trait OneMore<M> {
    /// The arguments with this one.
    type Sum;
}

/// Marker: two payloads or more.
pub struct TwoPayloads;

impl OneMore<ViaParts> for ViaParts {
    type Sum = ViaParts;
}

impl OneMore<ViaPayload> for ViaParts {
    type Sum = ViaPayload;
}

impl OneMore<ViaParts> for ViaPayload {
    type Sum = ViaPayload;
}

impl OneMore<ViaPayload> for ViaPayload {
    type Sum = TwoPayloads;
}

impl<M> OneMore<M> for TwoPayloads {
    type Sum = TwoPayloads;
}

/// The sum of a handler's arguments holds one payload at most.
#[diagnostic::on_unimplemented(
    message = "this handler takes two payloads",
    label = "a handler takes one payload: the decoded message",
    note = "besides its payload, a handler takes only what the runtime provides (`natty_runtime::Context` in a \
            #[consumer], `natty_runtime::Envelope` in a #[subscribe] or #[service])"
)]
pub trait AtMostOne {}

impl AtMostOne for ViaParts {}

impl AtMostOne for ViaPayload {}

impl<T: crate::leader::FromLease> HandlerArg<crate::leader::Lease, ViaParts> for T {
    fn from_delivery(lease: &crate::leader::Lease) -> Result<Self, DecodeError> {
        Ok(<T as crate::leader::FromLease>::from_delivery(lease))
    }
}

/// For `order_by = key_fn`: the argument marked `M` is compatible with a key function taking
/// `&A`: anything built from the delivery is, and the payload when it is `A` itself.
#[diagnostic::on_unimplemented(
    message = "the key function of `order_by` takes `&{A}`, but the handler's payload is `{Self}`",
    label = "the handler's payload",
    note = "a key function is called with the handler's payload: `fn key(payload: &{Self}) -> K`"
)]
pub trait KeyTakes<M, A> {}

impl<T> KeyTakes<ViaPayload, T> for T {}

impl<T, A> KeyTakes<ViaParts, A> for T {}

/// The key function's argument, decoded, to check each handler argument against (see
/// [`KeyTakes`]): its type is settled before any argument is looked at.
pub struct KeyArg<'a, A>(pub &'a A);

impl<A> KeyArg<'_, A> {
    /// Checks argument `T` of a handler fed `D` against the key function's argument.
    pub fn check<D, M, T: HandlerArg<D, M> + KeyTakes<M, A>>(&self) {}
}

/// For `order_by = key_fn`: the handler's arguments, added up (see [`OneMore`]), hold a payload.
#[diagnostic::on_unimplemented(
    message = "a key function is called with the handler's payload: the handler takes none",
    label = "no payload among these arguments"
)]
pub trait HoldsPayload {}

impl HoldsPayload for ViaPayload {}

// Reported by `AtMostOne`; here it only keeps the impl from being unique.
impl HoldsPayload for TwoPayloads {}

/// A handler argument that is a [`State<T>`]: what generated code lists in the handler's
/// definition (its `needs`), for the startup check. Probed by autoref specialization, as the
/// payload is for the AsyncAPI document, rather than required by a bound: a wrong argument is
/// reported once, where it is built. Not part of the API.
pub trait ArgState {
    /// The state this argument takes.
    fn need(&self) -> Option<Need>;
}

impl<T: 'static> ArgState for &Probe<State<T>> {
    fn need(&self) -> Option<Need> {
        Some(Need::of::<T>())
    }
}

/// Any other handler argument: it takes no state. Not part of the API.
pub trait ArgStateless {
    /// The state this argument takes: none.
    fn need(&self) -> Option<Need>;
}

impl<T> ArgStateless for Probe<T> {
    fn need(&self) -> Option<Need> {
        None
    }
}

/// What generated code asks of an argument's type without requiring anything of it (its
/// payload's description, the state it takes), by autoref specialization: the probe's
/// most-referenced impl that applies wins, and the last applies to every type, so a type that
/// is not an argument yields the compiler's usual error at the handler and none from here.
/// Not part of the API.
#[doc(hidden)]
pub struct Probe<T>(std::marker::PhantomData<fn() -> T>);

impl<T> Probe<T> {
    /// A probe of `T`.
    #[allow(clippy::new_without_default)]
    pub const fn new() -> Self {
        Probe(std::marker::PhantomData)
    }
}
