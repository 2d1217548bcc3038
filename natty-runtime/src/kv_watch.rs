//! `#[kv_watch]`: a handler called on each change of a KV key (or of every key), in revision
//! order, resuming after the last revision it saw when the watch is interrupted.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use async_nats::jetstream::kv;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;

use crate::config::Provision;
use crate::handler::CoreOutcome;
use crate::payload::{DecodeError, DecodePayload};
use crate::publish::Client;
use crate::stream::Location;

/// The adapter a `#[kv_watch]` generates.
pub type KvHandlerFn = fn(KvDelivery) -> BoxFuture<'static, CoreOutcome>;

/// A declared KV watch. `#[kv_watch(bucket = "...", key = "...")]` registers one.
#[derive(Debug, Clone, Copy)]
pub struct KvWatchDef {
    pub(crate) name: &'static str,
    pub(crate) bucket: &'static str,
    pub(crate) key: &'static str,
    pub(crate) history: bool,
    pub(crate) handler: KvHandlerFn,
    pub(crate) location: Location,
    /// The state types its arguments take (see [`crate::State`]), checked at startup.
    pub(crate) needs: &'static [crate::state::NeedFn],
    pub(crate) payload: crate::payload::PayloadSource,
}

impl KvWatchDef {
    /// Watches `key` (wildcards allowed; `>` for every key) of `bucket` with `handler`.
    pub const fn new(name: &'static str, bucket: &'static str, key: &'static str, handler: KvHandlerFn) -> Self {
        KvWatchDef {
            name,
            bucket,
            key,
            history: false,
            handler,
            location: Location::UNKNOWN,
            needs: &[],
            payload: crate::payload::PayloadSource::Unknown,
        }
    }

    /// Starts with the current value of each watched key, not only with later changes.
    pub const fn history(mut self, history: bool) -> Self {
        self.history = history;
        self
    }

    crate::payload::handler_definition_setters!("the value type the handler decodes", "MyValue");

    crate::state::needs_setter!();

    /// The handler's name.
    pub fn name(&self) -> &'static str {
        self.name
    }
}

inventory::collect!(KvWatchDef);

/// What happened to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvOperation {
    /// A value was put.
    Put,
    /// The key was deleted.
    Delete,
    /// The key and its history were purged.
    Purge,
}

/// One change of a watched key, with its value decoded from JSON (absent for a delete or purge).
#[derive(Debug, Clone, PartialEq)]
pub struct KvChange<T> {
    /// The key that changed.
    pub key: String,
    /// The bucket's revision of this change: strictly increasing.
    pub revision: u64,
    /// What happened.
    pub operation: KvOperation,
    /// The new value, for a put.
    pub value: Option<T>,
}

/// One KV entry as handed to a generated adapter. Not constructed by users.
#[doc(hidden)]
pub struct KvDelivery {
    pub(crate) entry: kv::Entry,
    /// The runtime's state, for `State<T>` arguments.
    pub(crate) states: std::sync::Arc<crate::state::States>,
}

/// A type a `#[kv_watch]` handler can take: [`KvChange`] of any JSON value.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a #[kv_watch] argument",
    label = "take `KvChange<T>`",
    note = "a #[kv_watch] handler takes one `natty_runtime::KvChange<T>` with `T: serde::Deserialize`"
)]
pub trait FromKvEntry: Sized {
    /// Decodes the entry.
    fn from_entry(delivery: &KvDelivery) -> Result<Self, DecodeError>;

    /// The value's payload, for the AsyncAPI document.
    fn describe() -> crate::payload::PayloadDescription;
}

impl<T: DecodePayload> FromKvEntry for KvChange<T> {
    fn describe() -> crate::payload::PayloadDescription {
        crate::payload::describe_payload::<T>()
    }

    fn from_entry(delivery: &KvDelivery) -> Result<Self, DecodeError> {
        KvChange::decode(&delivery.entry)
    }
}

impl<T: DecodePayload> KvChange<T> {
    /// The change `entry` records, its value decoded as `T`.
    pub(crate) fn decode(entry: &kv::Entry) -> Result<Self, DecodeError> {
        let operation = match entry.operation {
            kv::Operation::Put => KvOperation::Put,
            kv::Operation::Delete => KvOperation::Delete,
            kv::Operation::Purge => KvOperation::Purge,
        };
        let value = match operation {
            // KV entries carry no headers: the value is read in `T`'s format.
            KvOperation::Put => Some(crate::payload::decode::<T>(None, &entry.value)?),
            KvOperation::Delete | KvOperation::Purge => None,
        };
        Ok(KvChange {
            key: entry.key.clone(),
            revision: entry.revision,
            operation,
            value,
        })
    }
}

/// The task that runs the watch `def` (see [`run`]).
pub(crate) fn task(def: KvWatchDef, client: Client, provision: Provision) -> crate::supervise::Task {
    crate::supervise::Task::new(format!("kv_watch {}", def.name), move |stop| async move {
        run(def, client, provision, stop.cancel, stop.hard_stop).await;
        Ok(())
    })
}

/// Runs one watch until `cancel`. Changes are handled one at a time, in revision order; a
/// handler error is logged and the watch goes on (a watch has no redelivery: make the
/// handler retry what must not be skipped, or consume the bucket's stream with a `#[consumer]`).
pub(crate) async fn run(
    def: KvWatchDef,
    client: Client,
    provision: Provision,
    cancel: CancellationToken,
    hard_stop: CancellationToken,
) {
    let js = client.jetstream();
    loop {
        let store = match js.get_key_value(def.bucket).await {
            Ok(store) => store,
            Err(error) if provision == Provision::CreateOrUpdate => {
                tracing::info!(bucket = def.bucket, error = %crate::error::chain(&error), "creating the watched KV bucket");
                match js
                    .create_key_value(kv::Config {
                        bucket: def.bucket.to_string(),
                        history: 64,
                        ..Default::default()
                    })
                    .await
                {
                    Ok(store) => store,
                    Err(error) => {
                        tracing::warn!(bucket = def.bucket, error = %crate::error::chain(&error), "cannot create the KV bucket; retrying");
                        if !wait(&cancel).await {
                            return;
                        }
                        continue;
                    }
                }
            }
            Err(error) => {
                tracing::warn!(bucket = def.bucket, error = %crate::error::chain(&error), "the watched KV bucket is not there; retrying");
                if !wait(&cancel).await {
                    return;
                }
                continue;
            }
        };
        // Resumes on its own after an interruption, from the revision after the last one
        // delivered, so no change is missed or repeated.
        let start = if def.history {
            WatchStart::LastPerKey
        } else {
            WatchStart::New
        };
        let mut entries = match Entries::open(store, def.key.to_string(), start).await {
            Ok(entries) => entries,
            Err(error) => {
                tracing::warn!(bucket = def.bucket, key = def.key, error = %crate::error::chain(&error), "cannot watch; retrying");
                if !wait(&cancel).await {
                    return;
                }
                continue;
            }
        };
        loop {
            let entry = tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                entry = entries.next() => entry,
            };
            let (key, revision) = (entry.key.clone(), entry.revision);
            // A handler still running at the drain timeout is cut off, so that shutdown ends.
            let handled = tokio::select! {
                biased;
                handled = AssertUnwindSafe((def.handler)(KvDelivery { entry, states: client.states.clone() })).catch_unwind() => handled,
                _ = hard_stop.cancelled() => {
                    tracing::warn!(handler = def.name, bucket = def.bucket, %key, revision,
                        "drain timeout: KV watch handler still running; cut off");
                    return;
                }
            };
            let failure = match handled {
                Ok(CoreOutcome::Done | CoreOutcome::Reply(..)) => continue,
                Ok(CoreOutcome::Failed(error)) => crate::error::chain(&*error).to_string(),
                Ok(CoreOutcome::Undecodable(error)) => crate::error::chain(&error).to_string(),
                Err(_) => "the handler panicked".to_string(),
            };
            tracing::warn!(handler = def.name, bucket = def.bucket, %key, revision, error = %failure, "KV watch handler failed");
        }
    }
}

async fn wait(cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(Duration::from_millis(500)) => true,
    }
}

/// Where a watch starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WatchStart {
    /// With the changes made after it is set up.
    New,
    /// With the current value of each matching key.
    LastPerKey,
    /// With this revision.
    Revision(u64),
}

/// How long a watch may see no change (10 to 20 s, as the timer falls) before it looks whether
/// its bucket was created anew.
const QUIET_CHECK: Duration = Duration::from_secs(10);

/// Pause before setting a broken watch up again, so a server that is down is not hammered.
const RESUME_DELAY: Duration = Duration::from_millis(250);

/// The raw entries of the keys matching `key`, each once and in revision order, surviving
/// interruptions: a watch that errors or ends is set up again from the revision after the last
/// one delivered. Shared by [`Kv`](crate::Kv) watches and `#[kv_watch]`.
pub(crate) struct Entries {
    store: kv::Store,
    key: String,
    /// The next revision wanted; `None` until the first entry of a [`WatchStart::LastPerKey`] watch.
    next: Option<u64>,
    watch: Option<kv::Watch>,
    /// When the bucket's stream was created, as last seen: a bucket deleted and created again
    /// (an operator's doing, or a memory bucket after a server restart) numbers its revisions
    /// from 1 again, and is watched from its start.
    created: Option<String>,
    /// Fires every [`QUIET_CHECK`]; a watch that heard nothing in between is quiet. One timer
    /// for the watch, not one per change.
    quiet: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// An entry came since the timer last fired.
    heard: bool,
}

impl Entries {
    /// Sets the watch up once, so that a key or bucket that cannot be watched is reported to the
    /// caller rather than retried.
    pub(crate) async fn open(
        store: kv::Store,
        key: String,
        start: WatchStart,
    ) -> std::result::Result<Entries, kv::WatchError> {
        let info = store
            .stream
            .get_info()
            .await
            .map_err(|error| kv::WatchError::with_source(kv::WatchErrorKind::Other, error))?;
        let next = match start {
            // A start revision rather than "new" makes the start point survive an interruption
            // before the first change: async-nats would otherwise replay the whole history.
            WatchStart::New => Some(info.state.last_sequence + 1),
            WatchStart::LastPerKey => None,
            WatchStart::Revision(revision) => Some(revision),
        };
        let mut entries = Entries {
            store,
            key,
            next,
            watch: None,
            created: Some(info.created.to_string()),
            quiet: Box::pin(tokio::time::sleep(QUIET_CHECK)),
            heard: false,
        };
        entries.watch = Some(Entries::watch(&entries.store, &entries.key, entries.next).await?);
        Ok(entries)
    }

    // Not a method on `&self`: `kv::Watch` is not `Sync`, so a future holding `&Entries` would not be `Send`.
    async fn watch(store: &kv::Store, key: &str, next: Option<u64>) -> std::result::Result<kv::Watch, kv::WatchError> {
        match next {
            Some(revision) => store.watch_from_revision(key, revision).await,
            None => store.watch_with_history(key).await,
        }
    }

    /// The next entry, waiting as long as it takes (setting the watch up again as needed).
    pub(crate) async fn next(&mut self) -> kv::Entry {
        loop {
            if self.watch.is_none() {
                // Set up again after an interruption: on the same bucket, or a new one.
                self.check_incarnation().await;
            }
            let watch = match &mut self.watch {
                Some(watch) => watch,
                None => match Entries::watch(&self.store, &self.key, self.next).await {
                    Ok(watch) => self.watch.insert(watch),
                    Err(error) => {
                        tracing::warn!(bucket = %self.store.name, key = %self.key, error = %crate::error::chain(&error), "cannot watch; retrying");
                        tokio::time::sleep(RESUME_DELAY).await;
                        continue;
                    }
                },
            };
            // A bucket created anew goes unnoticed by the watch (async-nats sets its consumer up
            // again on the new stream, from the old revisions on): a watch quiet for a while
            // looks.
            let next = tokio::select! {
                next = watch.next() => Some(next),
                () = self.quiet.as_mut() => None,
            };
            let Some(next) = next else {
                self.quiet.as_mut().reset(tokio::time::Instant::now() + QUIET_CHECK);
                if !std::mem::take(&mut self.heard) && self.check_incarnation().await {
                    self.watch = None;
                }
                continue;
            };
            self.heard = true;
            match next {
                Some(Ok(entry)) => {
                    // async-nats re-creates its consumer after a reconnect, from the beginning of
                    // the bucket if it had delivered nothing yet: skip what precedes the start.
                    if self.next.is_some_and(|next| entry.revision < next) {
                        continue;
                    }
                    self.next = Some(entry.revision + 1);
                    return entry;
                }
                Some(Err(error)) => {
                    tracing::warn!(bucket = %self.store.name, key = %self.key, error = %crate::error::chain(&error), "watch interrupted; resuming");
                }
                None => {
                    tracing::debug!(bucket = %self.store.name, key = %self.key, "watch ended; resuming");
                }
            }
            self.watch = None;
            tokio::time::sleep(RESUME_DELAY).await;
        }
    }

    /// Whether the bucket was created anew since it was last seen; if so its revisions start
    /// again at 1, and so does the watch. (A bucket that cannot be asked about is left to the
    /// watch's own retries.)
    async fn check_incarnation(&mut self) -> bool {
        let Ok(info) = self.store.stream.get_info().await else {
            return false;
        };
        let created = info.created.to_string();
        let anew = self.created.as_ref().is_some_and(|seen| *seen != created);
        if anew {
            tracing::warn!(bucket = %self.store.name, key = %self.key, "the bucket was created anew; watching it from its first revision");
            self.next = Some(1);
        }
        self.created = Some(created);
        anew
    }

    pub(crate) fn into_stream(self) -> BoxStream<'static, kv::Entry> {
        futures_util::stream::unfold(self, |mut entries| async move {
            let entry = entries.next().await;
            Some((entry, entries))
        })
        .boxed()
    }
}
