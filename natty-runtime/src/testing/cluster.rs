//! A 3-node nats-server cluster on loopback, with nodes to stop, restart and kill.

use super::*;

/// A JetStream cluster of `nats-server` processes on loopback, killed on drop.
///
/// Node `i` (0-based) is named `n{i+1}`, has its own client, cluster (route) and monitoring
/// ports and its own store directory; all of these survive a [`ClusterNode::restart`].
///
/// async-nats does not split a comma-separated URL into several servers (`"nats://a,nats://b"`
/// is parsed as one address), so there is no single-string URL: use [`urls`](Self::urls) (a
/// `Vec<String>` is accepted by `async_nats::connect`) or [`client`](Self::client).
///
/// # Examples
///
/// ```no_run
/// # async fn example() -> std::io::Result<()> {
/// use natty_runtime::testing::NatsCluster;
///
/// let mut cluster = NatsCluster::start(3).await?;
/// let client = cluster.client().await;
/// cluster.node_mut(2).kill().await;
/// // ... the stream still takes publishes with two of three nodes ...
/// cluster.node_mut(2).restart().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct NatsCluster {
    nodes: Vec<ClusterNode>,
}

/// One node of a [`NatsCluster`].
#[derive(Debug)]
pub struct ClusterNode {
    name: String,
    cluster_port: u16,
    monitor_port: u16,
    server: NatsServer,
}

impl NatsCluster {
    /// Starts an `n`-node JetStream cluster and waits until every node reports healthy and
    /// JetStream answers on node 1 (which needs an elected meta leader).
    ///
    /// Ports are picked by binding `127.0.0.1:0` and releasing them, so another process may
    /// take one in between; the whole start is then tried once more.
    ///
    /// # Errors
    ///
    /// `InvalidInput` for `n == 0`; otherwise when a node cannot be started or the cluster is
    /// not ready within 30 s, twice. The error quotes the failing node's log tail.
    pub async fn start(n: usize) -> io::Result<NatsCluster> {
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a cluster needs at least one node",
            ));
        }
        match Self::start_once(n).await {
            Ok(cluster) => Ok(cluster),
            Err(first) => {
                tracing::warn!(%first, "test cluster did not start; trying once more");
                Self::start_once(n).await.map_err(|second| {
                    io::Error::new(
                        second.kind(),
                        format!("{second}\n(an earlier attempt failed too: {first})"),
                    )
                })
            }
        }
    }

    pub(super) async fn start_once(n: usize) -> io::Result<NatsCluster> {
        let ports = free_ports(3 * n)?;
        let client_port = |i: usize| ports[3 * i];
        let cluster_port = |i: usize| ports[3 * i + 1];
        let monitor_port = |i: usize| ports[3 * i + 2];

        let mut nodes = Vec::with_capacity(n);
        for i in 0..n {
            let name = format!("n{}", i + 1);
            let dir = tempfile::Builder::new()
                .prefix(&format!("natty-nats-{name}-"))
                .tempdir()?;
            let routes = (0..n)
                .filter(|&j| j != i)
                .map(|j| format!("nats-route://127.0.0.1:{}", cluster_port(j)))
                .collect::<Vec<_>>()
                .join(", ");
            // Every node carries the tag `natty-test`, and `node:<name>` of its own, so that
            // tests can declare placements that all, one or none of the servers satisfy.
            let config = format!(
                "server_name: {name}\n\
                 server_tags: [\"natty-test\", \"node:{name}\"]\n\
                 listen: 127.0.0.1:{client}\n\
                 http: 127.0.0.1:{monitor}\n\
                 jetstream {{\n  store_dir: {store}\n}}\n\
                 cluster {{\n  name: natty-test\n  listen: 127.0.0.1:{cluster}\n  routes: [{routes}]\n}}\n",
                client = client_port(i),
                monitor = monitor_port(i),
                cluster = cluster_port(i),
                store = quoted(dir.path()),
            );
            // JetStream comes from the config's block, which names the store: nats-server
            // refuses `-sd` next to a config `store_dir` ("Duplicate 'store_dir'"). Wait only
            // for TCP here: a node's JetStream cannot answer until a quorum of nodes is up.
            let server = NatsServer::builder()
                .config(config)
                .jetstream(false)
                .port(client_port(i))
                .ready_check(false)
                .with_dir(dir)
                .start()
                .await?;
            nodes.push(ClusterNode {
                name,
                cluster_port: cluster_port(i),
                monitor_port: monitor_port(i),
                server,
            });
        }

        let cluster = NatsCluster { nodes };
        cluster.wait_ready(Instant::now() + CLUSTER_DEADLINE).await?;
        Ok(cluster)
    }

    /// Waits until every node is healthy, JetStream answers on node 1, and every existing stream
    /// has a leader. The last matters after [`restart_all`](Self::restart_all): `/healthz` and
    /// account info are fine seconds before the streams' own elections finish.
    pub(super) async fn wait_ready(&self, deadline: Instant) -> io::Result<()> {
        for node in &self.nodes {
            node.wait_healthy(deadline).await?;
        }
        let first = &self.nodes[0];
        let mut client = None;
        loop {
            let probe = deadline
                .saturating_duration_since(Instant::now())
                .clamp(POLL, PROBE_TIMEOUT);
            let reason = match &client {
                None => match connect_probe(first.port(), probe).await {
                    Ok(connected) => {
                        client = Some(connected);
                        continue;
                    }
                    Err(reason) => reason,
                },
                Some(connected) => match jetstream_probe(connected, probe).await {
                    Ok(()) => match streams_have_leaders(connected, probe).await {
                        Ok(()) => return Ok(()),
                        Err(reason) => reason,
                    },
                    Err(reason) => reason,
                },
            };
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "test cluster JetStream is not ready on {} after {CLUSTER_DEADLINE:?}: \
                         {reason}; see the log in {}",
                        first.name,
                        first.server.log_file().display()
                    ),
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The client URLs of all nodes, in node order.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(ClusterNode::url).collect()
    }

    /// Connects a client that knows every node, so it fails over when one is killed.
    ///
    /// # Panics
    ///
    /// When no node accepts the connection: this is a test helper.
    pub async fn client(&self) -> async_nats::Client {
        let urls = self.urls();
        async_nats::ConnectOptions::new()
            .connect(urls.as_slice())
            .await
            .unwrap_or_else(|err| panic!("cannot connect to the test cluster at {urls:?}: {err}"))
    }

    /// All nodes, in order.
    pub fn nodes(&self) -> &[ClusterNode] {
        &self.nodes
    }

    /// Node `i` (0-based; node 0 is `n1`).
    ///
    /// # Panics
    ///
    /// When `i` is out of range.
    pub fn node(&self, i: usize) -> &ClusterNode {
        &self.nodes[i]
    }

    /// Node `i` (0-based; node 0 is `n1`), to kill, restart or signal it.
    ///
    /// # Panics
    ///
    /// When `i` is out of range.
    pub fn node_mut(&mut self, i: usize) -> &mut ClusterNode {
        &mut self.nodes[i]
    }

    /// The node whose server name is `name` (`"n1"`...), e.g. a stream's leader as reported by
    /// stream info.
    pub fn node_named(&mut self, name: &str) -> Option<&mut ClusterNode> {
        self.nodes.iter_mut().find(|node| node.name == name)
    }

    /// Kills every node, then starts them all again and waits as [`start`](Self::start) does:
    /// the whole-cluster crash case, which restarting nodes one by one cannot cover because a
    /// lone node never becomes healthy without a quorum.
    ///
    /// # Errors
    ///
    /// When a node does not come back, or the cluster is not ready within 30 s.
    pub async fn restart_all(&mut self) -> io::Result<()> {
        for node in &mut self.nodes {
            node.kill().await;
        }
        for node in &mut self.nodes {
            node.server.restart().await?;
        }
        self.wait_ready(Instant::now() + CLUSTER_DEADLINE).await
    }
}

impl ClusterNode {
    /// The server name, `n1`..`nN`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The client URL, e.g. `nats://127.0.0.1:4222`.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.server.port()
    }

    /// The route port other nodes connect to.
    pub fn cluster_port(&self) -> u16 {
        self.cluster_port
    }

    /// The HTTP monitoring port (`/healthz`, `/jsz`, `/varz`...).
    pub fn monitor_port(&self) -> u16 {
        self.monitor_port
    }

    /// The process id of the running node, or of the last one if it has been killed.
    pub fn pid(&self) -> u32 {
        self.server.pid()
    }

    /// The node's directory (store in `jetstream/`, log, config).
    pub fn store_dir(&self) -> &Path {
        self.server.store_dir()
    }

    /// The node as a single server.
    pub fn server(&self) -> &NatsServer {
        &self.server
    }

    /// Connects a client to this node only.
    ///
    /// # Panics
    ///
    /// When the connection fails: this is a test helper.
    pub async fn client(&self) -> async_nats::Client {
        self.server.client().await
    }

    /// Kills the node (SIGKILL) and waits for the process to exit.
    pub async fn kill(&mut self) {
        self.server.stop().await;
    }

    /// Kills the node if it runs, starts it again with the same ports and store, and waits
    /// until its `/healthz` says it has caught up with the cluster.
    ///
    /// # Errors
    ///
    /// When the node does not start within 10 s, or is not healthy within 30 s (it needs a
    /// quorum of the cluster running: after killing every node use
    /// [`NatsCluster::restart_all`]).
    pub async fn restart(&mut self) -> io::Result<()> {
        self.server.restart().await?;
        self.wait_healthy(Instant::now() + CLUSTER_DEADLINE).await
    }

    /// Sends the unix signal `sig` to the node; see [`NatsServer::signal`].
    ///
    /// # Panics
    ///
    /// When the node is stopped, or `kill` fails.
    pub fn signal(&self, sig: i32) {
        self.server.signal(sig);
    }

    /// Polls `/healthz` until it answers 200: the node is up, JetStream has a meta leader and
    /// this node's streams and consumers are current.
    pub(super) async fn wait_healthy(&self, deadline: Instant) -> io::Result<()> {
        loop {
            let probe = deadline
                .saturating_duration_since(Instant::now())
                .clamp(POLL, PROBE_TIMEOUT);
            let reason = match tokio::time::timeout(probe, healthz(self.monitor_port)).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(reason)) => reason,
                Err(_) => "/healthz timed out".to_owned(),
            };
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "test cluster node {} is not healthy: {reason}; see the log in {}",
                        self.name,
                        self.server.log_file().display()
                    ),
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// Whether every stream of the account has an elected leader (stream info is answered by the
/// leader, and names it).
pub(super) async fn streams_have_leaders(client: &async_nats::Client, timeout: Duration) -> Result<(), String> {
    let mut js = async_nats::jetstream::new(client.clone());
    js.set_timeout(timeout);
    let names: serde_json::Value = js
        .request("STREAM.NAMES", &serde_json::json!({}))
        .await
        .map_err(|err| format!("listing streams: {err}"))?;
    if let Some(error) = names.get("error") {
        return Err(format!("listing streams: {error}"));
    }
    let names = names["streams"].as_array().cloned().unwrap_or_default();
    for name in names.iter().filter_map(|name| name.as_str()) {
        let mut stream = js
            .get_stream(name)
            .await
            .map_err(|err| format!("stream {name}: {err}"))?;
        let info = stream
            .info()
            .await
            .map_err(|err| format!("stream {name} info: {err}"))?;
        let led = info
            .cluster
            .as_ref()
            .and_then(|cluster| cluster.leader.as_deref())
            .is_some_and(|leader| !leader.is_empty());
        if !led {
            return Err(format!("stream {name} has no leader yet"));
        }
    }
    Ok(())
}

/// One `GET /healthz` on the monitoring port; `Err` carries the answer for the error message.
pub(super) async fn healthz(port: u16) -> Result<(), String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    match super::http_get(addr, "/healthz").await {
        Ok((200, _)) => Ok(()),
        Ok((status, body)) => Err(format!("/healthz: {status} {}", body.trim())),
        Err(err) => Err(format!("monitoring port {port}: {err}")),
    }
}
