//! Streams: the [`StreamDef`] a `#[stream]` registers, and its provisioning
//! (create-or-update, verify-only, off).

use std::time::Duration;

use async_nats::jetstream::{
    self,
    stream::{Config as StreamConfig, RetentionPolicy, StorageType},
};

use crate::config::Provision;
use crate::error::{BoxError, Declared, Drift, Error, Result};

/// Where a declaration was written, for error messages and `--list`.
#[derive(Debug, Clone, Copy)]
pub struct Location {
    /// Source file.
    pub file: &'static str,
    /// Line in that file.
    pub line: u32,
    /// Module path.
    pub module: &'static str,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

impl Location {
    pub(crate) const UNKNOWN: Location = Location {
        file: "<built by hand>",
        line: 0,
        module: "",
    };
}

/// Where a replicated stream (or the stream behind a bucket) is placed: in a named cluster of a
/// super-cluster, on servers carrying every one of the given tags (`server_tags` in their
/// configs). Empty, the server chooses.
///
/// # Examples
///
/// ```
/// use natty_runtime::{Placement, StreamDef};
/// const ORDERS: StreamDef = StreamDef::new("orders", &["orders.>"])
///     .replicas(3)
///     .placement(Placement::new().cluster("east").tags(&["ssd"]));
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Placement {
    pub(crate) cluster: Option<&'static str>,
    pub(crate) tags: &'static [&'static str],
}

impl Placement {
    /// No constraint: the server chooses.
    pub const fn new() -> Self {
        Placement {
            cluster: None,
            tags: &[],
        }
    }

    /// Place the stream in the cluster of this name.
    pub const fn cluster(mut self, cluster: &'static str) -> Self {
        self.cluster = Some(cluster);
        self
    }

    /// Place the stream on servers that have every one of these tags.
    pub const fn tags(mut self, tags: &'static [&'static str]) -> Self {
        self.tags = tags;
        self
    }

    /// The placement as the server's configuration has it.
    pub(crate) fn server(&self) -> jetstream::stream::Placement {
        jetstream::stream::Placement {
            cluster: self.cluster.map(String::from),
            tags: self.tags.iter().map(|tag| tag.to_string()).collect(),
        }
    }
}

/// Sets the declared parts of a placement in `config`, keeping the server's for the rest.
pub(crate) fn apply_placement(declared: Option<Placement>, config: &mut StreamConfig) {
    let Some(declared) = declared else { return };
    let mut placement = config.placement.clone().unwrap_or_default();
    if let Some(cluster) = declared.cluster {
        placement.cluster = Some(cluster.to_string());
    }
    if !declared.tags.is_empty() {
        placement.tags = declared.tags.iter().map(|tag| tag.to_string()).collect();
    }
    config.placement = Some(placement);
}

/// The first part of a declared placement that differs from the server's: (field, declared,
/// actual). Tags are compared as sets.
pub(crate) fn placement_drift(
    declared: Option<Placement>,
    actual: Option<&jetstream::stream::Placement>,
) -> Option<(&'static str, String, String)> {
    let declared = declared?;
    let actual_cluster = actual.and_then(|p| p.cluster.as_deref()).unwrap_or("");
    if let Some(cluster) = declared.cluster {
        if cluster != actual_cluster {
            return Some((
                "placement.cluster",
                format!("{cluster:?}"),
                format!("{actual_cluster:?}"),
            ));
        }
    }
    if !declared.tags.is_empty() {
        let mut wanted: Vec<&str> = declared.tags.to_vec();
        let mut server: Vec<&str> = actual
            .map(|p| p.tags.iter().map(String::as_str).collect())
            .unwrap_or_default();
        wanted.sort_unstable();
        wanted.dedup();
        server.sort_unstable();
        server.dedup();
        if wanted != server {
            return Some(("placement.tags", format!("{wanted:?}"), format!("{server:?}")));
        }
    }
    None
}

/// A declared stream. `#[stream(...)]` registers one; [`StreamDef::new`] builds one by hand.
///
/// Only the settings given are enforced: the server keeps its value for the rest.
///
/// # Examples
///
/// ```
/// use natty_runtime::StreamDef;
/// use std::time::Duration;
/// const ORDERS: StreamDef = StreamDef::new("orders", &["orders.>"]).max_age(Duration::from_secs(86_400));
/// ```
#[derive(Debug, Clone, Copy)]
pub struct StreamDef {
    pub(crate) name: &'static str,
    pub(crate) subjects: &'static [&'static str],
    pub(crate) retention: Option<RetentionPolicy>,
    pub(crate) storage: Option<StorageType>,
    pub(crate) max_age: Option<Duration>,
    pub(crate) max_bytes: Option<i64>,
    pub(crate) max_messages: Option<i64>,
    pub(crate) replicas: Option<usize>,
    pub(crate) placement: Option<Placement>,
    pub(crate) duplicate_window: Option<Duration>,
    pub(crate) description: Option<&'static str>,
    pub(crate) counters: Option<bool>,
    pub(crate) atomic_publish: Option<bool>,
    pub(crate) schedules: Option<bool>,
    pub(crate) location: Location,
}

impl StreamDef {
    /// A stream named `name` capturing `subjects`.
    pub const fn new(name: &'static str, subjects: &'static [&'static str]) -> Self {
        StreamDef {
            name,
            subjects,
            retention: None,
            storage: None,
            max_age: None,
            max_bytes: None,
            max_messages: None,
            replicas: None,
            placement: None,
            duplicate_window: None,
            description: None,
            counters: None,
            atomic_publish: None,
            schedules: None,
            location: Location::UNKNOWN,
        }
    }

    /// Retention policy: limits, interest or work queue.
    pub const fn retention(mut self, retention: RetentionPolicy) -> Self {
        self.retention = Some(retention);
        self
    }

    /// File or memory storage.
    pub const fn storage(mut self, storage: StorageType) -> Self {
        self.storage = Some(storage);
        self
    }

    /// Messages older than this are removed.
    pub const fn max_age(mut self, max_age: Duration) -> Self {
        self.max_age = Some(max_age);
        self
    }

    /// Size limit of the stream, in bytes.
    pub const fn max_bytes(mut self, max_bytes: i64) -> Self {
        self.max_bytes = Some(max_bytes);
        self
    }

    /// Message-count limit of the stream.
    pub const fn max_messages(mut self, max_messages: i64) -> Self {
        self.max_messages = Some(max_messages);
        self
    }

    /// Number of replicas (1, 3 or 5 in practice).
    pub const fn replicas(mut self, replicas: usize) -> Self {
        self.replicas = Some(replicas);
        self
    }

    /// Where the stream's replicas are placed (cluster, server tags).
    pub const fn placement(mut self, placement: Placement) -> Self {
        self.placement = Some(placement);
        self
    }

    /// Window within which a repeated `Nats-Msg-Id` is dropped as a duplicate.
    pub const fn duplicate_window(mut self, window: Duration) -> Self {
        self.duplicate_window = Some(window);
        self
    }

    /// Human-readable description.
    pub const fn description(mut self, description: &'static str) -> Self {
        self.description = Some(description);
        self
    }

    /// Makes every subject of the stream a counter (nats-server 2.12, ADR-49): a message adds
    /// the number in its `Nats-Incr` header to the subject's total, which the server keeps in
    /// the subject's last message. Read and add through [`crate::Counter`].
    pub const fn counters(mut self, on: bool) -> Self {
        self.counters = Some(on);
        self
    }

    /// Lets the stream take atomic batches (nats-server 2.12, ADR-50): several messages stored
    /// all together or not at all, sent with [`crate::Client::atomic_batch`].
    pub const fn atomic_publish(mut self, on: bool) -> Self {
        self.atomic_publish = Some(on);
        self
    }

    /// Lets the stream hold messages the server publishes later (nats-server 2.12, ADR-51):
    /// `#[schedule]` declarations and delayed publishes ([`crate::Publish::after`]). natty
    /// adds the subjects `natty.schedules.<name>.>` for what the server holds until then, and
    /// filters the stream's unfiltered consumers to the declared subjects so that handlers
    /// never see those. A stream a `#[schedule]` targets gets it without asking. Startup
    /// refuses it with interest retention, `max_messages` or `max_bytes`: the server would drop
    /// what waits (bound it by `max_age`).
    pub const fn schedules(mut self, on: bool) -> Self {
        self.schedules = Some(on);
        self
    }

    /// Records where the declaration was written (the macros set this).
    pub const fn at(mut self, location: Location) -> Self {
        self.location = location;
        self
    }

    /// The subjects the server's config has: the declared ones, and the schedules' holders.
    fn all_subjects(&self) -> Vec<String> {
        let mut subjects: Vec<String> = self.subjects.iter().map(|s| s.to_string()).collect();
        if self.schedules == Some(true) {
            subjects.push(crate::schedule::space(self.name));
        }
        subjects
    }

    /// The stream's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The stream's subjects.
    pub fn subjects(&self) -> &'static [&'static str] {
        self.subjects
    }

    /// Where it was declared.
    pub fn location(&self) -> Location {
        self.location
    }

    /// The full config for a new stream: declared values over the server's defaults.
    fn new_config(&self) -> StreamConfig {
        let mut config = StreamConfig {
            name: self.name.to_string(),
            ..Default::default()
        };
        self.apply(&mut config);
        config
    }

    /// Overwrites the declared settings in `config`, leaving the rest as the server has them.
    fn apply(&self, config: &mut StreamConfig) {
        config.subjects = self.all_subjects();
        if let Some(value) = self.retention {
            config.retention = value;
        }
        if let Some(value) = self.storage {
            config.storage = value;
        }
        if let Some(value) = self.max_age {
            config.max_age = value;
        }
        if let Some(value) = self.max_bytes {
            config.max_bytes = value;
        }
        if let Some(value) = self.max_messages {
            config.max_messages = value;
        }
        if let Some(value) = self.replicas {
            config.num_replicas = value;
        }
        if let Some(value) = self.duplicate_window {
            config.duplicate_window = value;
        }
        apply_placement(self.placement, config);
        if let Some(value) = self.description {
            config.description = Some(value.to_string());
        }
        if let Some(on) = self.counters {
            config.allow_message_counter = on;
        }
        if let Some(on) = self.atomic_publish {
            config.allow_atomic_publish = on;
        }
        if let Some(on) = self.schedules {
            config.allow_message_schedules = on;
        }
    }

    /// The first declared setting that differs from `actual`: (field, declared, actual).
    pub(crate) fn drift(&self, actual: &StreamConfig) -> Option<(&'static str, String, String)> {
        let all = self.all_subjects();
        let mut subjects: Vec<&str> = all.iter().map(String::as_str).collect();
        let mut server: Vec<&str> = actual.subjects.iter().map(String::as_str).collect();
        subjects.sort_unstable();
        server.sort_unstable();
        if subjects != server {
            return Some(("subjects", format!("{subjects:?}"), format!("{server:?}")));
        }
        check("retention", self.retention, actual.retention)
            .or_else(|| check("storage", self.storage, actual.storage))
            .or_else(|| check("max_age", self.max_age, actual.max_age))
            .or_else(|| check("max_bytes", self.max_bytes, actual.max_bytes))
            .or_else(|| check("max_messages", self.max_messages, actual.max_messages))
            .or_else(|| check("replicas", self.replicas, actual.num_replicas))
            .or_else(|| placement_drift(self.placement, actual.placement.as_ref()))
            .or_else(|| check("duplicate_window", self.duplicate_window, actual.duplicate_window))
            .or_else(|| {
                check(
                    "description",
                    self.description,
                    actual.description.as_deref().unwrap_or(""),
                )
            })
            .or_else(|| check("counters", self.counters, actual.allow_message_counter))
            .or_else(|| check("schedules", self.schedules, actual.allow_message_schedules))
            .or_else(|| check("atomic_publish", self.atomic_publish, actual.allow_atomic_publish))
    }

    /// Refuses a stream that takes schedules but would drop what waits there (see
    /// `schedule::unkept`): as declared over `actual`, or over the server's defaults.
    fn keeps_schedules(&self, actual: Option<&StreamConfig>) -> Result<()> {
        if self.schedules != Some(true) {
            return Ok(());
        }
        let config = match actual {
            Some(actual) => {
                let mut config = actual.clone();
                self.apply(&mut config);
                config
            }
            None => self.new_config(),
        };
        match crate::schedule::unkept(self.name, &config) {
            Some(why) => Err(Error::config(
                format!("#[stream] `{}` at {}", self.name, self.location),
                "schedules = true",
                why,
            )),
            None => Ok(()),
        }
    }

    /// Brings the server in line with this declaration, or checks it, per `mode`.
    pub(crate) async fn provision(&self, js: &jetstream::Context, mode: Provision) -> Result<()> {
        // The declared limits hold whether the stream is created or updated; the server's
        // own (not declared) are looked at once it is read.
        if mode != Provision::Off {
            self.keeps_schedules(None)?;
        }
        let target = Provisioned {
            stream: self.name.to_string(),
            location: self.location,
            owner: None,
        };
        let create = async {
            js.create_stream(self.new_config())
                .await
                .map(drop)
                .map_err(|error| Box::new(error) as BoxError)
        };
        target
            .provision(
                js,
                mode,
                |actual| {
                    crate::schedule::still_declared(self, actual)?;
                    self.keeps_schedules(Some(actual))
                },
                |actual| self.drift(actual),
                |config| self.apply(config),
                create,
            )
            .await
    }
}

/// `Some((field, declared, actual))` when a declared setting differs from the server's.
pub(crate) fn check<T: PartialEq + std::fmt::Debug>(
    field: &'static str,
    declared: Option<T>,
    actual: T,
) -> Option<(&'static str, String, String)> {
    match declared {
        Some(declared) if declared != actual => Some((field, format!("{declared:?}"), format!("{actual:?}"))),
        _ => None,
    }
}

/// A stream to provision: a declared stream, or the one behind a KV bucket or an object store.
pub(crate) struct Provisioned {
    /// The stream's name (`KV_<name>` or `OBJ_<name>` behind a bucket).
    pub(crate) stream: String,
    pub(crate) location: Location,
    /// For a bucket, its kind ("KV bucket", "object store") and name, for messages.
    pub(crate) owner: Option<(&'static str, &'static str)>,
}

impl Provisioned {
    /// Creates the stream with `create`, or compares and updates only the declared settings
    /// (`drift`, `apply`), or checks them, per `mode`; an existing stream `refuse` turns down
    /// is left as it is.
    pub(crate) async fn provision(
        &self,
        js: &jetstream::Context,
        mode: Provision,
        refuse: impl Fn(&StreamConfig) -> Result<()>,
        drift: impl Fn(&StreamConfig) -> Option<(&'static str, String, String)>,
        apply: impl Fn(&mut StreamConfig),
        create: impl std::future::Future<Output = std::result::Result<(), BoxError>>,
    ) -> Result<()> {
        if mode == Provision::Off {
            return Ok(());
        }
        let failed = |action: &'static str, source: BoxError| Error::Stream {
            stream: self.stream.clone(),
            action,
            source,
        };
        let existing = match js.get_stream(&self.stream).await {
            Ok(mut stream) => Some(
                stream
                    .info()
                    .await
                    .map_err(|error| failed("reading its info", Box::new(error)))?
                    .config
                    .clone(),
            ),
            Err(error) if is_stream_not_found(&error) => None,
            Err(error) => return Err(failed("looking it up", Box::new(error))),
        };
        let owner = |after: &str| match self.owner {
            Some((kind, name)) => format!("the {kind} `{name}`{after}"),
            None => String::new(),
        };
        match (existing, mode) {
            (None, Provision::VerifyOnly) => Err(Error::StreamNotFound {
                stream: self.stream.clone(),
                hint: format!(
                    " ({}declared at {}; provisioning is verify-only, so natty does not create it)",
                    owner(" "),
                    self.location
                ),
            }),
            (None, _) => {
                create.await.map_err(|error| failed("creating it", error))?;
                match self.owner {
                    Some((kind, name)) => tracing::info!(bucket = name, kind, "created {kind}"),
                    None => tracing::info!(stream = self.stream, "created stream"),
                }
                Ok(())
            }
            (Some(actual), mode) => {
                refuse(&actual)?;
                let Some((field, declared, server)) = drift(&actual) else {
                    return Ok(());
                };
                if mode == Provision::VerifyOnly {
                    return Err(Drift {
                        declared_on: Declared::Stream(self.stream.clone()),
                        field,
                        declared,
                        actual: server,
                        hint: format!(" ({}provisioning is verify-only)", owner("; ")),
                    }
                    .into());
                }
                let mut config = actual.clone();
                apply(&mut config);
                match js.update_stream(&config).await {
                    Ok(_) => {
                        match self.owner {
                            Some((kind, name)) => {
                                tracing::info!(bucket = name, kind, field, from = %server, to = %declared, "updated {kind}")
                            }
                            None => {
                                tracing::info!(stream = self.stream, field, from = %server, to = %declared, "updated stream")
                            }
                        }
                        Ok(())
                    }
                    Err(error) => Err(Drift {
                        declared_on: Declared::Stream(self.stream.clone()),
                        field,
                        declared,
                        actual: server,
                        hint: match self.owner {
                            Some(_) => format!(" ({}); the server refused to change it: {error}", owner("")),
                            None => format!("; the server refused to change it: {error}"),
                        },
                    }
                    .into()),
                }
            }
        }
    }
}

/// Waits until stream `name` has a leader (at once on a single server), polling its info.
/// Returns `Ok(false)` when the stream does not exist: creating it, or saying it is missing, is
/// the caller's business.
///
/// # Errors
///
/// [`Error::NoStreamLeader`] after `timeout`, with the stream's replicas as last reported.
pub(crate) async fn wait_for_leader(js: &jetstream::Context, name: &str, timeout: Duration) -> Result<bool> {
    let started = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(100);
    let mut announced = false;
    loop {
        let detail = match tokio::time::timeout(timeout, js.get_stream(name)).await {
            Ok(Ok(stream)) => {
                let info = stream.cached_info();
                match &info.cluster {
                    // A single server reports itself as the leader; an old one may say nothing.
                    None => return Ok(true),
                    Some(cluster) if cluster.leader.as_deref().is_some_and(|leader| !leader.is_empty()) => {
                        if announced {
                            tracing::info!(
                                stream = name,
                                leader = cluster.leader.as_deref(),
                                "the stream has a leader"
                            );
                        }
                        return Ok(true);
                    }
                    Some(cluster) => {
                        let offline: Vec<&str> = cluster
                            .replicas
                            .iter()
                            .filter(|peer| peer.offline || !peer.current)
                            .map(|peer| peer.name.as_str())
                            .collect();
                        format!(
                            "replicas {}, not current or offline: {}",
                            info.config.num_replicas,
                            if offline.is_empty() {
                                "none reported".into()
                            } else {
                                offline.join(", ")
                            }
                        )
                    }
                }
            }
            Ok(Err(error)) if is_stream_not_found(&error) => return Ok(false),
            Ok(Err(error)) => format!("stream info failed: {error}"),
            Err(_) => format!("stream info got no answer within {timeout:?}"),
        };
        let waited = started.elapsed();
        if waited >= timeout {
            return Err(Error::NoStreamLeader {
                stream: name.to_string(),
                waited,
                detail,
            });
        }
        if !announced {
            tracing::warn!(stream = name, %detail, "the stream has no leader yet; waiting for its servers to elect one");
            announced = true;
        }
        tokio::time::sleep(pause.min(timeout.saturating_sub(waited))).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

/// Looks up stream `name` just created (by this instance or another). In a cluster the
/// server answering may not know of it yet for a moment (its assignment is still on its way
/// from the meta leader; seen as "stream not found" right after a create that succeeded), so
/// "not found" is asked again for a few seconds before it is believed.
pub(crate) async fn read_back(
    js: &jetstream::Context,
    name: &str,
) -> std::result::Result<jetstream::stream::Stream, jetstream::context::GetStreamError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match js.get_stream(name).await {
            Err(error) if is_stream_not_found(&error) && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            answer => return answer,
        }
    }
}

/// Whether a JetStream API error is "stream not found" (10059).
pub(crate) fn is_stream_not_found(error: &jetstream::context::GetStreamError) -> bool {
    matches!(
        error.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(ref e)
            if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

inventory::collect!(StreamDef);
