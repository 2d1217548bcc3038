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
use crate::state::{NeedFn, States};
use crate::stream::{Location, StreamDef};
use crate::subscribe::SubscriptionDef;

/// Declares [`Declarations`] from one list: the declarations it provisions, and the handler
/// kinds with how each one is described ([`Handler`]: its name, for the filter and the
/// unknown-name message; where it was declared and the state it needs, for the startup check).
/// A new kind is one line here; `registered`, `handlers`, the filter and `extend` follow.
macro_rules! declarations {
    (
        provisioned { $($decl:ident: $decl_ty:ty),* $(,)? }
        handlers { $($(#[$cfg:meta])? $field:ident: $ty:ty => $describe:expr),* $(,)? }
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

            /// Every handler: consumers, subscriptions and services, KV watches, leader tasks
            /// and captures (named after their key function).
            pub(crate) fn handlers(&self) -> Vec<Handler> {
                #[allow(unused_mut)]
                let mut handlers = Vec::new();
                $($(#[$cfg])? handlers.extend(self.$field.iter().map($describe));)*
                handlers
            }

            /// Keeps the handlers whose name `keep` accepts.
            fn retain_handlers(&mut self, keep: impl Fn(&str) -> bool) {
                $($(#[$cfg])? self.$field.retain(|handler| keep(($describe)(handler).name));)*
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
        schedules: crate::schedule::ScheduleDef,
    }
    handlers {
        consumers: ConsumerDef => |c: &ConsumerDef| Handler::new(c.name, c.location, c.needs),
        subscriptions: SubscriptionDef => |s: &SubscriptionDef| Handler::new(s.name, s.location, s.needs),
        kv_watches: KvWatchDef => |w: &KvWatchDef| Handler::new(w.name, w.location, w.needs),
        leaders: LeaderDef => |l: &LeaderDef| Handler::new(l.name, l.location, l.needs),
        #[cfg(feature = "capture")]
        captures: crate::capture::CaptureDef => |c: &crate::capture::CaptureDef| Handler::new(c.name(), c.location(), &[]),
    }
}

/// What the registry needs to know of any handler.
pub(crate) struct Handler {
    pub(crate) name: &'static str,
    location: Location,
    needs: &'static [NeedFn],
}

impl Handler {
    fn new(name: &'static str, location: Location, needs: &'static [NeedFn]) -> Handler {
        Handler { name, location, needs }
    }
}

impl Declarations {
    /// Every handler's name.
    pub(crate) fn handler_names(&self) -> Vec<&'static str> {
        self.handlers().iter().map(|handler| handler.name).collect()
    }

    /// Checks that every `State<T>` a handler takes was given.
    ///
    /// # Errors
    ///
    /// [`Error::MissingState`] naming the first handler and type missing.
    pub(crate) fn check_states(&self, states: &States) -> Result<()> {
        for handler in self.handlers() {
            for need in handler.needs.iter().filter_map(|need| need()) {
                if !states.has((need.type_id)()) {
                    return Err(Error::MissingState {
                        handler: handler.name.to_owned(),
                        location: handler.location.to_string(),
                        type_name: need.type_name,
                    });
                }
            }
        }
        Ok(())
    }

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
        // One holder per (stream, name): two alike would replace each other at every start.
        let mut schedules: HashMap<(&str, &str), &crate::schedule::ScheduleDef> = HashMap::new();
        for schedule in &self.schedules {
            if let Some(first) = schedules.insert((schedule.stream, schedule.name), schedule) {
                return Err(Error::Duplicate {
                    what: format!("schedule `{}` on stream `{}`", schedule.name, schedule.stream),
                    first: first.location.to_string(),
                    second: schedule.location.to_string(),
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

    /// Gives every stream a `#[schedule]` targets the schedules setting, and the unfiltered
    /// consumers of a stream with schedules the stream's declared subjects as their filter, so
    /// that they never read what the server holds for later (`natty.schedules.<stream>.>`).
    pub(crate) fn link_schedules(&mut self) {
        let targeted: Vec<&str> = self.schedules.iter().map(|schedule| schedule.stream).collect();
        for stream in &mut self.streams {
            if stream.schedules.is_none() && targeted.contains(&stream.name) {
                stream.schedules = Some(true);
            }
        }
        let holding: Vec<StreamDef> = self
            .streams
            .iter()
            .filter(|stream| stream.schedules == Some(true))
            .copied()
            .collect();
        for consumer in &mut self.consumers {
            if let Some(stream) = holding.iter().find(|stream| stream.name == consumer.stream) {
                if consumer.subjects.is_empty() {
                    consumer.subjects = stream.subjects;
                }
            }
        }
        // A capture would write the holders into its files.
        #[cfg(feature = "capture")]
        for capture in &mut self.captures {
            if let Some(stream) = holding.iter().find(|stream| stream.name == capture.stream) {
                if capture.subjects.is_empty() {
                    capture.subjects = stream.subjects;
                }
            }
        }
    }

    /// The declared stream named `name`, if any.
    pub(crate) fn stream(&self, name: &str) -> Option<StreamDef> {
        self.streams.iter().find(|s| s.name == name).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::{ScheduleDef, Spec};

    fn handler(_: crate::handler::Delivery) -> futures_util::future::BoxFuture<'static, crate::handler::Outcome> {
        Box::pin(async { crate::handler::Outcome::Ack })
    }

    fn body() -> std::result::Result<(bytes::Bytes, crate::Format), crate::PublishError> {
        crate::schedule::body("jobs.tick", &"tick")
    }

    #[test]
    fn a_scheduled_stream_takes_schedules_and_its_unfiltered_consumers_read_its_subjects_only() {
        let mut declared = Declarations::default();
        declared.streams.push(StreamDef::new("jobs", &["jobs.>"]));
        declared.streams.push(StreamDef::new("other", &["other.>"]));
        declared.schedules.push(ScheduleDef::new(
            "tick",
            "jobs",
            "jobs.tick",
            Spec::Every(std::time::Duration::from_secs(1)),
            body,
        ));
        declared.consumers.push(ConsumerDef::new("all", "jobs", "all", handler));
        declared
            .consumers
            .push(ConsumerDef::new("some", "jobs", "some", handler).subjects(&["jobs.some"]));
        declared
            .consumers
            .push(ConsumerDef::new("elsewhere", "other", "elsewhere", handler));
        declared.link_schedules();
        assert_eq!(declared.streams[0].schedules, Some(true));
        assert_eq!(declared.streams[1].schedules, None);
        assert_eq!(declared.consumers[0].subjects, ["jobs.>"]);
        assert_eq!(declared.consumers[1].subjects, ["jobs.some"], "a declared filter stays");
        assert!(
            declared.consumers[2].subjects.is_empty(),
            "another stream's consumer is untouched"
        );

        // Two schedules of one name on one stream would replace each other at every start.
        declared.schedules.push(ScheduleDef::new(
            "tick",
            "jobs",
            "jobs.other",
            Spec::Cron("@hourly"),
            body,
        ));
        let duplicate = declared.check().unwrap_err().to_string();
        assert!(duplicate.contains("schedule `tick` on stream `jobs`"), "{duplicate}");
    }
}
