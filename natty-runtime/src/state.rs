//! Application state: values given to the runtime once ([`RuntimeBuilder::state`],
//! [`run_with`](crate::run_with)) and taken by any handler as a [`State<T>`] argument, as an
//! axum handler takes `State<T>`: a database pool, an HTTP client, the service's settings.
//!
//! Several values of different types may be given; a handler names the one it wants by type.
//! A handler asking for a type nobody gave is refused at startup, naming the handler and the
//! type, before anything connects: never a panic at its first message.
//!
//! [`RuntimeBuilder::state`]: crate::RuntimeBuilder::state

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::Arc;

/// A value the handler takes from the runtime's state, by type: `State(pool): State<PgPool>`.
///
/// The value is cloned for each call, so give the runtime something cheap to clone (a pool, an
/// `Arc`).
///
/// # Examples
///
/// ```no_run
/// use natty_runtime::prelude::*;
/// use natty_runtime::State;
///
/// #[derive(Clone)]
/// struct Prices { vat: f64 }
///
/// #[derive(serde::Deserialize)]
/// struct Order { net: f64 }
///
/// #[consumer(stream = "orders", durable = "invoicing")]
/// async fn invoice(order: Order, State(prices): State<Prices>) {
///     let _gross = order.net * (1.0 + prices.vat);
/// }
///
/// #[tokio::main]
/// async fn main() -> natty_runtime::Result<()> {
///     natty_runtime::run_with(Prices { vat: 0.2 }).await
/// }
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct State<T>(pub T);

impl<T> std::ops::Deref for State<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> std::ops::DerefMut for State<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

/// The values given to the runtime, by type.
#[derive(Clone, Default)]
pub(crate) struct States {
    values: HashMap<TypeId, Arc<dyn Any + Send + Sync>>,
}

impl std::fmt::Debug for States {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} state value(s)", self.values.len())
    }
}

impl States {
    /// Adds `value`, replacing an earlier one of the same type.
    pub(crate) fn insert<T: Clone + Send + Sync + 'static>(&mut self, value: T) {
        self.values.insert(TypeId::of::<T>(), Arc::new(value));
    }

    /// Whether a value of the type `id` was given.
    pub(crate) fn has(&self, id: TypeId) -> bool {
        self.values.contains_key(&id)
    }

    /// A clone of the value of type `T`.
    pub(crate) fn get<T: Clone + 'static>(&self) -> Option<T> {
        self.values.get(&TypeId::of::<T>())?.downcast_ref::<T>().cloned()
    }

    /// The `State<T>` argument of a handler; `T` was checked at startup (see [`Need`]).
    pub(crate) fn argument<T: Clone + 'static>(&self) -> State<T> {
        match self.get::<T>() {
            Some(value) => State(value),
            // Startup refuses a handler whose states were not all given (`Need`), and only
            // generated adapters build arguments, so this is a bug in natty, not in the service.
            None => panic!(
                "natty bug: no state of type {} reached a handler that startup let run",
                std::any::type_name::<T>()
            ),
        }
    }
}

/// A state type a handler takes, as its generated adapter reports it, for the startup check.
#[derive(Debug, Clone, Copy)]
pub struct Need {
    pub(crate) type_id: fn() -> TypeId,
    pub(crate) type_name: &'static str,
}

impl Need {
    /// The need of a `State<T>` argument.
    pub fn of<T: 'static>() -> Need {
        Need {
            type_id: TypeId::of::<T>,
            type_name: std::any::type_name::<T>(),
        }
    }
}

/// What one argument of a handler needs from the state: `Some` for a [`State<T>`], `None` for
/// anything else (the payload, `Context`, `Envelope`, ...). Reported by generated adapters.
pub type NeedFn = fn() -> Option<Need>;

/// The setter generated code calls to list what a handler's arguments need from the state,
/// for each handler definition.
macro_rules! needs_setter {
    () => {
        /// What generated code registers: what each argument of the handler needs from the
        /// runtime's state (see [`State`](crate::State)), checked at startup.
        #[doc(hidden)]
        pub const fn needs(mut self, needs: &'static [$crate::state::NeedFn]) -> Self {
            self.needs = needs;
            self
        }
    };
}
pub(crate) use needs_setter;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_found_by_type() {
        let mut states = States::default();
        states.insert(7u32);
        states.insert(String::from("settings"));
        states.insert(9u32);
        assert_eq!(
            states.get::<u32>(),
            Some(9),
            "a later value of a type replaces the earlier"
        );
        assert_eq!(states.argument::<String>().0, "settings");
        assert!(states.has(TypeId::of::<String>()));
        assert!(!states.has(TypeId::of::<u64>()));
        assert_eq!(states.get::<u64>(), None);
        assert_eq!(Need::of::<u64>().type_name, "u64");
        assert_eq!((Need::of::<u64>().type_id)(), TypeId::of::<u64>());
    }
}
