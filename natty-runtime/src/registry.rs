//! Everything a service declares, gathered in one place: what this binary's macros registered
//! (read from `inventory` here and nowhere else), what the builder added by hand, the handler
//! filter (`NATTY_HANDLERS`), and the checks that span declarations. The runtime runs it, the
//! command line lists and checks it, and the AsyncAPI document describes it.

use std::collections::HashMap;

use crate::consumer::ConsumerDef;
use crate::error::{Error, Result};
use crate::kv::KvBucketDef;
use crate::kv_watch::KvWatchDef;
use crate::leader::LeaderDef;
use crate::object_store::ObjectStoreDef;
use crate::stream::StreamDef;
use crate::subscribe::SubscriptionDef;

/// Declares [`Declarations`] from one list: the declarations it provisions, and the handler
/// kinds with how each one's name is read (for the filter and the unknown-name message). A new
/// kind is one line here; `registered`, `handler_names`, the filter and `extend` follow.
macro_rules! declarations {
    (
        provisioned { $($decl:ident: $decl_ty:ty),* $(,)? }
        handlers { $($(#[$cfg:meta])? $field:ident: $ty:ty => $name:expr),* $(,)? }
    ) => {
        /// A service's declarations: what it provisions and the handlers it runs.
        #[derive(Debug, Default, Clone)]
        pub(crate) struct Declarations {
            $(pub(crate) $decl: Vec<$decl_ty>,)*
            $($(#[$cfg])? pub(crate) $field: Vec<$ty>,)*
        }

        impl Declarations {
            /// Everything this binary's macros registered.
            pub(crate) fn registered() -> Declarations {
                fn all<T: inventory::Collect + Copy>() -> Vec<T> {
                    inventory::iter::<T>.into_iter().copied().collect()
                }
                Declarations {
                    $($decl: all(),)*
                    $($(#[$cfg])? $field: all(),)*
                }
            }

            /// Every handler's name: consumers, subscriptions and services, KV watches, leader
            /// tasks and captures (by their key function's name).
            pub(crate) fn handler_names(&self) -> Vec<&'static str> {
                #[allow(unused_mut)]
                let mut names = Vec::new();
                $($(#[$cfg])? names.extend(self.$field.iter().map($name));)*
                names
            }

            /// Keeps the handlers whose name `keep` accepts.
            fn retain_handlers(&mut self, keep: impl Fn(&str) -> bool) {
                $($(#[$cfg])? self.$field.retain(|handler| keep(($name)(handler)));)*
            }

            /// Adds `more` after what is declared already.
            pub(crate) fn extend(&mut self, more: Declarations) {
                $(self.$decl.extend(more.$decl);)*
                $($(#[$cfg])? self.$field.extend(more.$field);)*
            }
        }
    };
}

declarations! {
    provisioned {
        streams: StreamDef,
        kv_buckets: KvBucketDef,
        object_stores: ObjectStoreDef,
    }
    handlers {
        consumers: ConsumerDef => |c: &ConsumerDef| c.name,
        subscriptions: SubscriptionDef => |s: &SubscriptionDef| s.name,
        kv_watches: KvWatchDef => |w: &KvWatchDef| w.name,
        leaders: LeaderDef => |l: &LeaderDef| l.name,
        #[cfg(feature = "capture")]
        captures: crate::capture::CaptureDef => |c: &crate::capture::CaptureDef| c.name(),
    }
}

impl Declarations {
    /// Keeps only the handlers named in `only` (streams, buckets and object stores stay: a
    /// handler that is not run may still be what another process's handlers read).
    ///
    /// # Errors
    ///
    /// [`Error::Config`] naming `setting` when a name is no handler's, with the handlers there are.
    pub(crate) fn select(&mut self, only: &[String], setting: &str) -> Result<()> {
        let known = self.handler_names();
        if let Some(unknown) = only.iter().find(|name| !known.contains(&name.as_str())) {
            return Err(Error::config(
                setting,
                only.join(","),
                format!(
                    "no handler named `{unknown}` is registered; registered: {}",
                    known.join(", ")
                ),
            ));
        }
        self.retain_handlers(|name| only.iter().any(|o| o == name));
        Ok(())
    }

    /// The consumers captures read through.
    pub(crate) fn capture_consumers(&self) -> Vec<ConsumerDef> {
        #[cfg(feature = "capture")]
        return self.captures.iter().map(|c| c.consumer_def()).collect();
        #[cfg(not(feature = "capture"))]
        Vec::new()
    }

    /// Every consumer: the handlers' and the captures'.
    pub(crate) fn all_consumers(&self) -> Vec<ConsumerDef> {
        let mut all = self.consumers.clone();
        all.extend(self.capture_consumers());
        all
    }

    /// Whether any handler or capture is declared: a service with none has nothing to run.
    pub(crate) fn runs_anything(&self) -> bool {
        !self.handler_names().is_empty()
    }

    /// The checks that span declarations, before anything is connected or provisioned:
    /// something to run, each stream declared once, each durable consumer once.
    ///
    /// # Errors
    ///
    /// [`Error::NothingRegistered`], or [`Error::Duplicate`] naming where both were declared.
    pub(crate) fn check(&self) -> Result<()> {
        if !self.runs_anything() {
            return Err(Error::NothingRegistered);
        }
        let mut streams: HashMap<&str, &StreamDef> = HashMap::new();
        for stream in &self.streams {
            if let Some(first) = streams.insert(stream.name, stream) {
                return Err(Error::Duplicate {
                    what: format!("stream `{}`", stream.name),
                    first: first.location.to_string(),
                    second: stream.location.to_string(),
                });
            }
        }
        let consumers = self.all_consumers();
        let mut durables: HashMap<(&str, &str), &ConsumerDef> = HashMap::new();
        for consumer in consumers.iter().filter(|c| !c.ephemeral) {
            if let Some(first) = durables.insert((consumer.stream, consumer.durable), consumer) {
                return Err(Error::Duplicate {
                    what: format!("consumer `{}` on stream `{}`", consumer.durable, consumer.stream),
                    first: first.location.to_string(),
                    second: consumer.location.to_string(),
                });
            }
        }
        Ok(())
    }

    /// The declared stream named `name`, if any.
    pub(crate) fn stream(&self, name: &str) -> Option<StreamDef> {
        self.streams.iter().find(|s| s.name == name).copied()
    }
}
