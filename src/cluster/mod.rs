//! Cluster mode (`serve --cluster nats://HOST:PORT`): several nodes on NATS JetStream,
//! partitioned by token.
//!
//! - Ingest on any node: validated as in embedded mode, split by partition
//!   (`engine::shard_of(token, N)`), published to `TOKENWATCH_EVENTS` on
//!   `tokenwatch.events.<p>` as Arrow IPC with a content-digest de-duplication id; the
//!   Ingest response waits for JetStream's ack of every piece.
//! - Ownership ([`lease`]): leases in `tokenwatch_leases`, the partitions spread evenly over
//!   the live nodes, taken over within about the lease TTL when a node dies.
//! - State ([`partition`]): each owned partition is an [`Engine`] of its own tokens,
//!   restored from its snapshot in `tokenwatch_snapshots` and replaying the stream from
//!   the sequence after it; refits are shared through `tokenwatch_refits` so that the
//!   cross-token models are those of one engine over every token.
//! - Outputs: every closed window on `TOKENWATCH_SCORES`, alerts on `tokenwatch.alerts`
//!   (both de-duplicated per window). Every node folds the scores into its own board and
//!   relays the alerts into its WatchAlerts streams, so GetTokenRisk, ListRiskyTokens and
//!   WatchAlerts answer the same on every node; GetStats gathers every node's counters.
//!
//! Embedded mode (no `--cluster`) does not touch any of this.

pub mod lease;
pub mod partition;
pub mod wire;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::{AsArray, UInt32Array};
use arrow::datatypes::TimestampMillisecondType;
use arrow::record_batch::RecordBatch;
use async_nats::jetstream::{self, kv, object_store, stream};
use prost::Message as _;
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;

use crate::config::Config;
use crate::engine::{shard_of, Stats};
use crate::event::col;
use crate::model::registry::Registry;
use crate::server::host::{now_ms, Ack, Board, Cmd};
use crate::server::pb;

/// How to join a cluster.
#[derive(Debug, Clone)]
pub struct Options {
    /// NATS server URL(s), e.g. `nats://127.0.0.1:4222`.
    pub url: String,
    /// This node's id (unique in the cluster).
    pub node_id: String,
    /// Partitions (fixed when the events stream is created).
    pub partitions: u32,
    /// How often each owned partition writes its snapshot.
    pub snapshot_every: Duration,
    /// How long an owned partition buffers applied events before it writes them to the
    /// history (they are written before every snapshot too).
    pub history_every: Duration,
    /// Local scratch directory (snapshot files on their way to and from the object store).
    pub work_dir: PathBuf,
    /// How long events are kept in the events stream (must exceed the snapshot interval
    /// by a wide margin: a new owner replays from its partition's last snapshot).
    pub retention: Duration,
}

/// What an owned partition reports.
#[derive(Debug, Clone, Default)]
pub struct PartStatus {
    /// Its engine's counters.
    pub stats: Stats,
    /// Last stream sequence applied.
    pub seq: u64,
    /// Messages of its subject not yet delivered (0: caught up).
    pub lag: u64,
}

/// What a node's tasks and partition threads share.
pub struct Shared {
    js: jetstream::Context,
    client: async_nats::Client,
    leases: kv::Store,
    facts: kv::Store,
    snaps: object_store::ObjectStore,
    refits: object_store::ObjectStore,
    history: object_store::ObjectStore,
    events: stream::Stream,
    /// Partition count.
    pub n: u32,
    /// This node's id.
    pub node: String,
    cfg: Config,
    registry: Registry,
    handle: tokio::runtime::Handle,
    snapshot_every: Duration,
    history_every: Duration,
    idle_close: Duration,
    work_dir: PathBuf,
    /// Owned partitions' reports.
    parts: Mutex<BTreeMap<u32, PartStatus>>,
    /// Partitions this node holds leases for.
    owned: Mutex<Vec<u32>>,
    /// Live nodes seen at the last lease round.
    live: AtomicU64,
    /// Events this node published (acknowledged by JetStream).
    accepted: AtomicU64,
    /// The alert policies every owned partition judges its windows with, and this node's
    /// delivery of their actions (`None`: no policies).
    policing: Option<Policing>,
    /// Alert id -> token of the cluster's alerts (from the alerts stream), so that a
    /// verdict submitted on any node reaches the alert's owner.
    alert_tokens: Mutex<AlertIndex>,
    /// The responders of the owned partitions (for the console's alert pages).
    responders: Mutex<BTreeMap<u32, Arc<Mutex<crate::respond::actions::Responder>>>>,
    /// The owned partitions' workers, for the console's token views: the worker's number
    /// and where to ask it (it answers between two messages).
    asks: Mutex<BTreeMap<u32, (u64, std::sync::mpsc::Sender<partition::Ask>)>>,
    /// Numbers the workers' registrations (a new worker of a partition replaces the old).
    workers: AtomicU64,
}

/// Alert policies and the delivery of their actions.
struct Policing {
    policies: Vec<crate::respond::policy::Policy>,
    window_ms: i64,
    actions: Arc<crate::respond::actions::Actions>,
    tx: mpsc::Sender<crate::respond::actions::Calls>,
}

/// Bounded map of alert id -> token, oldest forgotten first.
#[derive(Default)]
struct AlertIndex {
    map: rustc_hash::FxHashMap<String, Arc<str>>,
    order: std::collections::VecDeque<String>,
}

impl AlertIndex {
    /// As many alerts as a responder remembers for verdicts.
    const MAX: usize = 100_000;

    fn insert(&mut self, id: String, token: &str) {
        if id.is_empty() || self.map.contains_key(&id) {
            return;
        }
        if self.order.len() >= Self::MAX {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
        self.order.push_back(id.clone());
        self.map.insert(id, token.into());
    }
}

impl Shared {
    fn responders_mut(
        &self,
    ) -> std::sync::MutexGuard<'_, BTreeMap<u32, Arc<Mutex<crate::respond::actions::Responder>>>>
    {
        self.responders.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The alerts this node's partitions remember, most recently raised first, at most
    /// `most` (with `token`, only its), and how many they remember and hold open.
    fn recent_alerts(
        &self,
        most: usize,
        token: Option<&str>,
    ) -> (Vec<crate::respond::actions::AlertRow>, usize, usize) {
        let rs: Vec<_> = self.responders_mut().values().cloned().collect();
        let (mut rows, mut total, mut open) = (Vec::new(), 0, 0);
        for r in rs {
            let (mut page, t, o) = r
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .recent(0, most, token);
            rows.append(&mut page);
            total += t;
            open += o;
        }
        newest_first(&mut rows);
        rows.truncate(most);
        (rows, total, open)
    }

    /// A responder for one owned partition (its own policy state, the node's delivery).
    fn responder(&self) -> Option<crate::respond::actions::Responder> {
        let p = self.policing.as_ref()?;
        Some(crate::respond::actions::Responder::new(
            p.policies.clone(),
            p.window_ms,
            p.tx.clone(),
            p.actions.clone(),
        ))
    }
}

/// A running cluster node: the queue the RPC handlers send to, and the board they read.
pub struct Node {
    /// Queue of commands from the RPC handlers.
    pub tx: mpsc::Sender<Cmd>,
    /// Latest scores of every token of the cluster, and the alert feed.
    pub board: Arc<Board>,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    leases: tokio::task::JoinHandle<()>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    link: watch::Receiver<bool>,
}

/// Read an integer fact (`origin`, `clock`).
async fn read_i64(facts: &kv::Store, key: &str) -> Result<Option<i64>, String> {
    let v = facts.get(key).await.map_err(|e| e.to_string())?;
    Ok(v.and_then(|b| std::str::from_utf8(&b).ok()?.parse().ok()))
}

/// The cluster's first refit point, once ingest has set it.
async fn origin(shared: &Shared) -> Result<Option<i64>, String> {
    read_i64(&shared.facts, "origin").await
}

/// Raise the cluster clock to `t` (never lower it; compare-and-set on the revision).
async fn raise_clock(facts: &kv::Store, t: i64) -> Result<(), String> {
    for _ in 0..16 {
        match facts.entry("clock").await.map_err(|e| e.to_string())? {
            Some(e) if e.operation == kv::Operation::Put => {
                let cur: i64 = std::str::from_utf8(&e.value)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(i64::MIN);
                if cur >= t {
                    return Ok(());
                }
                if facts
                    .update("clock", t.to_string().into(), e.revision)
                    .await
                    .is_ok()
                {
                    return Ok(());
                }
            }
            _ => {
                if facts.create("clock", t.to_string().into()).await.is_ok() {
                    return Ok(());
                }
            }
        }
    }
    Err("the cluster clock is contended; not raised".into())
}

/// Open `what` named `name`, creating it if it is missing; when the create fails because
/// another node created it in between, open that one.
async fn get_or_create<T, E1, E2, G, C>(
    what: &str,
    name: &str,
    get: impl Fn() -> G,
    create: C,
) -> Result<T, String>
where
    G: std::future::Future<Output = Result<T, E1>>,
    C: std::future::Future<Output = Result<T, E2>>,
    E2: std::fmt::Display,
{
    if let Ok(x) = get().await {
        return Ok(x);
    }
    match create.await {
        Ok(x) => Ok(x),
        Err(e) => get()
            .await
            .map_err(|_| format!("cannot create the {what} {name}: {e}")),
    }
}

async fn stream_of(js: &jetstream::Context, cfg: stream::Config) -> Result<stream::Stream, String> {
    let name = cfg.name.clone();
    get_or_create(
        "stream",
        &name,
        || js.get_stream(&name),
        js.create_stream(cfg),
    )
    .await
}

async fn kv_of(js: &jetstream::Context, cfg: kv::Config) -> Result<kv::Store, String> {
    let name = cfg.bucket.clone();
    let get = || js.get_key_value(&name);
    get_or_create("key-value bucket", &name, get, js.create_key_value(cfg)).await
}

async fn objects_of(
    js: &jetstream::Context,
    cfg: object_store::Config,
) -> Result<object_store::ObjectStore, String> {
    let name = cfg.bucket.clone();
    let get = || js.get_object_store(&name);
    get_or_create("object store", &name, get, js.create_object_store(cfg)).await
}

/// Duplicate window of every stream: a resend within it is dropped.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(600);

impl Node {
    /// Connect, create what is missing (streams, buckets), check the partition count, and
    /// start the lease round, the relays and the command router on `queue`.
    pub async fn start(
        opts: Options,
        cfg: &Config,
        registry: &Registry,
        board: Arc<Board>,
        queue: (mpsc::Sender<Cmd>, mpsc::Receiver<Cmd>),
        (policies, dry_run): (&[crate::respond::policy::Policy], bool),
    ) -> Result<Node, String> {
        let n = opts.partitions;
        let id_ok = !opts.node_id.is_empty()
            && opts.node_id.len() <= 64
            && opts
                .node_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !id_ok {
            return Err(format!(
                "--node-id {:?}: 1 to 64 of A-Z, a-z, 0-9, '-' and '_'",
                opts.node_id
            ));
        }
        if n == 0 || n > 4096 {
            return Err(format!("--partitions {n}: must be 1..=4096"));
        }
        let client = async_nats::ConnectOptions::new()
            .name(format!("tokenwatch {}", opts.node_id))
            .connection_timeout(Duration::from_secs(10))
            .connect(opts.url.as_str())
            .await
            .map_err(|e| format!("cannot connect to the cluster at {}: {e}", opts.url))?;
        let js = jetstream::new(client.clone());
        // The control plane (leases, clock, snapshots, refit shares) on its own context: its
        // publishes never wait behind the data plane's in-flight acks.
        let ctl = jetstream::new(client.clone());
        let events = stream_of(
            &js,
            stream::Config {
                name: wire::EVENTS.into(),
                subjects: vec!["tokenwatch.events.*".into()],
                duplicate_window: DUPLICATE_WINDOW,
                max_age: opts.retention,
                metadata: [(wire::PARTITIONS_KEY.to_string(), n.to_string())].into(),
                ..Default::default()
            },
        )
        .await?;
        let theirs = events
            .cached_info()
            .config
            .metadata
            .get(wire::PARTITIONS_KEY)
            .cloned()
            .unwrap_or_default();
        if theirs != n.to_string() {
            return Err(format!(
                "the cluster's stream {} was created with {} partitions; this node was started with --partitions {n} (start it with --partitions {})",
                wire::EVENTS,
                if theirs.is_empty() { "an unknown number of" } else { &theirs },
                if theirs.is_empty() { "?" } else { &theirs },
            ));
        }
        for (name, subject) in [
            (wire::SCORES, "tokenwatch.scores.*"),
            (wire::ALERTS, wire::ALERTS_SUBJECT),
        ] {
            stream_of(
                &js,
                stream::Config {
                    name: name.into(),
                    subjects: vec![subject.into()],
                    duplicate_window: DUPLICATE_WINDOW,
                    max_age: opts.retention,
                    ..Default::default()
                },
            )
            .await?;
        }
        let leases = kv_of(
            &ctl,
            kv::Config {
                bucket: wire::LEASES.into(),
                history: 1,
                max_age: lease::TTL,
                ..Default::default()
            },
        )
        .await?;
        let facts = kv_of(
            &ctl,
            kv::Config {
                bucket: wire::FACTS.into(),
                history: 1,
                ..Default::default()
            },
        )
        .await?;
        let snaps = objects_of(
            &ctl,
            object_store::Config {
                bucket: wire::SNAPSHOTS.into(),
                ..Default::default()
            },
        )
        .await?;
        let refits = objects_of(
            &ctl,
            object_store::Config {
                bucket: wire::REFITS.into(),
                max_age: opts.retention,
                ..Default::default()
            },
        )
        .await?;
        // The history keeps what `store.retention` says (by the time a chunk was written,
        // JetStream's own age limit), as the embedded history does.
        let history = objects_of(
            &ctl,
            object_store::Config {
                bucket: wire::HISTORY.into(),
                max_age: Duration::from_millis(cfg.store.retention.ms.max(0) as u64),
                ..Default::default()
            },
        )
        .await?;
        let mut pcfg = cfg.clone();
        // One thread per partition; the node's memory budget shared by its partitions.
        pcfg.engine.shards = 1;
        pcfg.engine.memory_budget.0 /= u64::from(n).max(1);
        if pcfg.engine.max_tokens > 0 {
            pcfg.engine.max_tokens = pcfg.engine.max_tokens.div_ceil(u64::from(n)).max(1);
        }
        std::fs::create_dir_all(&opts.work_dir)
            .map_err(|e| format!("{}: {e}", opts.work_dir.display()))?;
        // Each owner delivers the actions of its partitions' alerts (outbox, audit and dead
        // letters in the data directory, where the embedded mode keeps them and the console
        // reads the audit).
        let mut tasks = Vec::new();
        let policing = if policies.is_empty() {
            None
        } else {
            let rcfg = cfg.respond.clone();
            let (tx, rx) = mpsc::channel(rcfg.queue.max(1));
            let (actions, resumed, bad) = crate::respond::actions::Actions::new(
                Some(opts.work_dir.parent().unwrap_or(&opts.work_dir)),
                rcfg,
                dry_run,
                policies,
            );
            for w in bad {
                tracing::warn!("{w}");
            }
            let actions = Arc::new(actions);
            tasks.push(tokio::spawn(crate::respond::actions::run(
                rx,
                actions.clone(),
                resumed,
            )));
            Some(Policing {
                policies: policies.to_vec(),
                window_ms: cfg.window.size.ms,
                actions,
                tx,
            })
        };
        let shared = Arc::new(Shared {
            js,
            client,
            leases,
            facts,
            snaps,
            refits,
            history,
            events,
            n,
            node: opts.node_id.clone(),
            cfg: pcfg,
            registry: registry.clone(),
            handle: tokio::runtime::Handle::current(),
            snapshot_every: opts.snapshot_every,
            history_every: opts.history_every,
            idle_close: Duration::from_millis(cfg.server.idle_close.ms.max(0) as u64),
            work_dir: opts.work_dir.clone(),
            parts: Mutex::default(),
            owned: Mutex::default(),
            live: AtomicU64::new(1),
            accepted: AtomicU64::new(0),
            policing,
            alert_tokens: Mutex::default(),
            responders: Mutex::default(),
            asks: Mutex::default(),
            workers: AtomicU64::new(0),
        });
        let (stop, stop_rx) = watch::channel(false);
        let leases = tokio::spawn(lease::run(shared.clone(), stop_rx.clone()));
        let (tx, rx) = queue;
        let (link_tx, link) = watch::channel(true);
        tasks.extend([
            tokio::spawn(relay_scores(shared.clone(), board.clone(), stop_rx.clone())),
            tokio::spawn(relay_alerts(shared.clone(), board.clone(), stop_rx.clone())),
            tokio::spawn(answer_stats(shared.clone(), stop_rx.clone())),
            tokio::spawn(answer_queries(
                shared.clone(),
                board.clone(),
                stop_rx.clone(),
            )),
            tokio::spawn(answer_alerts(shared.clone(), stop_rx.clone())),
            tokio::spawn(answer_describe(shared.clone(), stop_rx.clone())),
            tokio::spawn(answer_audit(shared.clone(), stop_rx.clone())),
            tokio::spawn(answer_snapshot(shared.clone(), stop_rx.clone())),
            tokio::spawn(route(rx, shared.clone(), board.clone())),
            tokio::spawn(watch_link(shared.clone(), link_tx)),
            tokio::spawn(index_alerts(shared.clone(), stop_rx.clone())),
        ]);
        tracing::info!(node = %opts.node_id, partitions = n, url = %opts.url, "joined the cluster");
        Ok(Node {
            tx,
            board,
            shared,
            stop,
            leases,
            tasks,
            link,
        })
    }

    /// Stop every partition (each writes a last snapshot), give the leases back, stop the
    /// relays; the counters of the partitions this node held.
    pub async fn stop(self) -> Stats {
        let stats = self.shared.local().1;
        let _ = self.stop.send(true);
        let _ = self.leases.await;
        for t in self.tasks {
            t.abort();
        }
        let _ = self.shared.client.flush().await;
        stats
    }
}

impl Node {
    /// Whether the node is connected to NATS (checked every second): a node cut off from
    /// it can neither take events nor apply them, and health says so.
    pub fn link_watch(&self) -> watch::Receiver<bool> {
        self.link.clone()
    }
}

async fn watch_link(shared: Arc<Shared>, tx: watch::Sender<bool>) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    loop {
        every.tick().await;
        let up = shared.client.connection_state() == async_nats::connection::State::Connected;
        tx.send_if_modified(|v| std::mem::replace(v, up) != up);
        metrics::gauge!("tokenwatch_cluster_connected").set(f64::from(u8::from(up)));
    }
}

impl Shared {
    /// This node's report: owned partitions with their status, and their counters summed.
    fn local(&self) -> (Vec<(u32, PartStatus)>, Stats) {
        let parts: Vec<(u32, PartStatus)> = self
            .parts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(p, s)| (*p, s.clone()))
            .collect();
        let mut sum = Stats::default();
        for (_, s) in &parts {
            let s = &s.stats;
            sum.events += s.events;
            sum.late += s.late;
            sum.windows += s.windows;
            sum.alerts += s.alerts;
            sum.tokens += s.tokens;
            sum.tracked += s.tracked;
            sum.evicted += s.evicted;
            sum.reloaded += s.reloaded;
            sum.untracked += s.untracked;
            sum.refits = sum.refits.max(s.refits);
        }
        (parts, sum)
    }

    fn report(&self) -> pb::ClusterNode {
        let (parts, _) = self.local();
        pb::ClusterNode {
            node_id: self.node.clone(),
            partitions: self.owned.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            lag: parts.iter().map(|(_, s)| s.lag).sum(),
            live_nodes: self.live.load(Ordering::Relaxed) as u32,
            partition_count: self.n,
            applied: parts
                .iter()
                .map(|(p, s)| pb::PartitionApplied {
                    partition: *p,
                    sequence: s.seq,
                    lag: s.lag,
                })
                .collect(),
        }
    }

    /// This node's counters as a StatsResponse (engine counters of its partitions).
    fn local_stats(&self) -> pb::StatsResponse {
        let (_, s) = self.local();
        pb::StatsResponse {
            events: s.events,
            late_events: s.late,
            windows: s.windows,
            alert_windows: s.alerts,
            tokens: s.tokens,
            tracked_tokens: s.tracked,
            evicted_tokens: s.evicted,
            reloaded_tokens: s.reloaded,
            untracked_events: s.untracked,
            accepted_events: self.accepted.load(Ordering::Relaxed),
            cluster: Some(self.report()),
            ..Default::default()
        }
    }
}

/// Fold every closed window of the cluster into this node's board (its latest score per
/// token), from the start of the scores stream.
async fn relay_scores(shared: Arc<Shared>, board: Arc<Board>, stop: watch::Receiver<bool>) {
    relay(
        shared,
        wire::SCORES,
        async_nats::jetstream::consumer::DeliverPolicy::All,
        stop,
        move |b, _| {
            if let Ok(r) = pb::TokenRisk::decode(b) {
                board.put_risk(r);
            }
        },
    )
    .await
}

/// Relay alerts raised from now on by every owner into this node's WatchAlerts streams.
async fn relay_alerts(shared: Arc<Shared>, board: Arc<Board>, stop: watch::Receiver<bool>) {
    relay(
        shared,
        wire::ALERTS,
        async_nats::jetstream::consumer::DeliverPolicy::New,
        stop,
        move |b, _| {
            if let Ok(a) = pb::Alert::decode(b) {
                board.alerted.fetch_add(1, Ordering::Relaxed);
                // No subscriber is not an error.
                let _ = board.alerts.send(Arc::new(a));
            }
        },
    )
    .await
}

/// Follow the alerts stream from its start into the alert id -> token index.
async fn index_alerts(shared: Arc<Shared>, stop: watch::Receiver<bool>) {
    let s = shared.clone();
    relay(
        shared,
        wire::ALERTS,
        async_nats::jetstream::consumer::DeliverPolicy::All,
        stop,
        move |b, headers| {
            if let Ok(a) = pb::Alert::decode(b) {
                let mut index = s.alert_tokens.lock().unwrap_or_else(|e| e.into_inner());
                // Every alert the window raised or grew (one per matching policy).
                let all = headers
                    .and_then(|h| h.get(wire::ALERT_IDS_HEADER))
                    .map(|v| v.as_str().to_string())
                    .unwrap_or_default();
                for id in all.split(',').filter(|i| !i.is_empty()) {
                    index.insert(id.to_string(), &a.token_id);
                }
                index.insert(a.alert_id, &a.token_id);
            }
        },
    )
    .await
}

async fn relay(
    shared: Arc<Shared>,
    name: &str,
    deliver_policy: async_nats::jetstream::consumer::DeliverPolicy,
    mut stop: watch::Receiver<bool>,
    mut each: impl FnMut(&[u8], Option<&async_nats::HeaderMap>),
) {
    use async_nats::jetstream::consumer::pull;
    let mut from = deliver_policy;
    loop {
        let consumer = async {
            let s = shared
                .js
                .get_stream(name)
                .await
                .map_err(|e| e.to_string())?;
            let c = s
                .create_consumer(pull::OrderedConfig {
                    deliver_policy: from,
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string())?;
            c.messages().await.map_err(|e| e.to_string())
        };
        let mut messages = match consumer.await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(stream = name, error = %e, "cannot follow the stream; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        };
        loop {
            let m = tokio::select! {
                m = messages.next() => m,
                _ = stop.wait_for(|s| *s) => return,
            };
            match m {
                Some(Ok(m)) => {
                    if let Ok(i) = m.info() {
                        from = async_nats::jetstream::consumer::DeliverPolicy::ByStartSequence {
                            start_sequence: i.stream_sequence + 1,
                        };
                    }
                    each(&m.payload, m.headers.as_ref());
                }
                Some(Err(e)) => {
                    tracing::warn!(stream = name, error = %e, "following the stream");
                    break;
                }
                None => break,
            }
        }
    }
}

/// Answer GetStats' scatter: this node's counters.
/// How long a node waits for a partition's owner to answer a query before it answers from
/// its own copy of the scores.
const QUERY_WAIT: Duration = Duration::from_secs(1);

/// Queries any node forwards to a partition's owner (see [`Query`]).
pub struct Query {
    client: async_nats::Client,
    n: u32,
    board: Arc<Board>,
    shared: Arc<Shared>,
}

impl Node {
    /// The handle the RPC handlers forward owner queries through.
    pub fn query(&self) -> Query {
        Query {
            client: self.shared.client.clone(),
            n: self.shared.n,
            board: self.board.clone(),
            shared: self.shared.clone(),
        }
    }
}

/// Subject of the console's audit scatter: alert ids in (JSON), each node's audit records
/// of them out.
const AUDIT_QUERY: &str = "tokenwatch.query.audit";

/// Alert ids one audit question may name (a console page asks for one page's).
const AUDIT_MOST_IDS: usize = 1000;

/// Answer the audit scatter from this node's audit log (each owner audits its partitions'
/// alerts: raised, delivered, verdicts).
async fn answer_audit(shared: Arc<Shared>, stop: watch::Receiver<bool>) {
    let path = shared
        .work_dir
        .parent()
        .unwrap_or(&shared.work_dir)
        .join("audit.jsonl");
    answer(shared, AUDIT_QUERY, "the console's audit", stop, move |m| {
        let mut ids: Vec<String> = serde_json::from_slice(&m.payload).unwrap_or_default();
        ids.truncate(AUDIT_MOST_IDS);
        let found = crate::server::console::pages::audit_of(
            &path,
            &ids,
            crate::server::console::AUDIT_TAIL,
        );
        serde_json::to_vec(&found).ok()
    })
    .await
}

impl Query {
    /// The audit records of `ids` from every node's audit log that answers within a second,
    /// each id's records in time order.
    pub async fn audit(
        &self,
        ids: &[String],
    ) -> rustc_hash::FxHashMap<String, Vec<serde_json::Value>> {
        let mut out: rustc_hash::FxHashMap<String, Vec<serde_json::Value>> = Default::default();
        let Ok(ask) = serde_json::to_vec(ids) else {
            return out;
        };
        for a in scatter(&self.shared, AUDIT_QUERY, ask, QUERY_WAIT).await {
            let Ok(found) = serde_json::from_slice::<BTreeMap<String, Vec<serde_json::Value>>>(&a)
            else {
                continue;
            };
            for (id, recs) in found {
                out.entry(id).or_default().extend(recs);
            }
        }
        for recs in out.values_mut() {
            recs.sort_by(|a, b| a["at"].to_string().cmp(&b["at"].to_string()));
        }
        out
    }

    /// The token's latest window as its partition's owner knows it (request/reply on
    /// `tokenwatch.query.<p>`); when no owner answers within [`QUERY_WAIT`] (a handover
    /// under way), this node's copy from the scores stream.
    pub async fn token_risk(&self, token: &str) -> Option<Arc<pb::TokenRisk>> {
        let p = shard_of(token, self.n as usize) as u32;
        let asked = tokio::time::timeout(
            QUERY_WAIT,
            self.client
                .request(wire::query_subject(p), token.to_string().into()),
        )
        .await;
        match asked {
            Ok(Ok(m)) if m.payload.is_empty() => None,
            Ok(Ok(m)) => match pb::TokenRisk::decode(m.payload.as_ref()) {
                Ok(r) => Some(Arc::new(r)),
                Err(e) => {
                    tracing::warn!(partition = p, error = %e, "an owner's answer cannot be read");
                    self.board.get(token)
                }
            },
            _ => {
                tracing::debug!(
                    partition = p,
                    "no owner answered; answering from this node's scores"
                );
                self.board.get(token)
            }
        }
    }
}

/// Answer the queries of the partitions this node owns (other nodes stay silent: the
/// owner's is the answer).
async fn answer_queries(shared: Arc<Shared>, board: Arc<Board>, stop: watch::Receiver<bool>) {
    let s = shared.clone();
    answer(
        shared,
        "tokenwatch.query.*",
        "partition queries",
        stop,
        move |m| {
            let p = m
                .subject
                .strip_prefix("tokenwatch.query.")
                .and_then(|p| p.parse::<u32>().ok())?;
            if !s
                .owned
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&p)
            {
                return None;
            }
            Some(
                std::str::from_utf8(&m.payload)
                    .ok()
                    .and_then(|t| board.get(t))
                    .map(|r| r.encode_to_vec())
                    .unwrap_or_default(),
            )
        },
    )
    .await
}

/// Longest wait for a partition's owner to describe a token (it answers between two
/// messages of its partition).
const DESCRIBE_WAIT: Duration = Duration::from_secs(2);

/// A token's model state and names as its partition's owner has them (the console's token
/// page), `None` if it is not tracked or no owner answered within [`DESCRIBE_WAIT`].
async fn describe(
    shared: &Shared,
    token: &str,
    keys: Vec<u64>,
) -> Option<Box<crate::server::host::TokenView>> {
    let p = shard_of(token, shared.n as usize) as u32;
    let ask = wire::DescribeAsk {
        token: token.to_string(),
        keys,
    };
    let body = serde_json::to_vec(&ask).ok()?;
    let m = tokio::time::timeout(
        DESCRIBE_WAIT,
        shared
            .client
            .request(wire::describe_subject(p), body.into()),
    )
    .await;
    match m {
        Ok(Ok(m)) if m.payload.is_empty() => None,
        Ok(Ok(m)) => match wire::unpack_view(&m.payload) {
            Ok(v) => Some(Box::new(v)),
            Err(e) => {
                tracing::warn!(partition = p, error = %e, "an owner's token view cannot be read");
                None
            }
        },
        _ => {
            tracing::debug!(partition = p, "no owner described the token");
            None
        }
    }
}

/// The workers of this node's partitions (`p` only, or all), to ask them something.
fn workers(shared: &Shared, p: Option<u32>) -> Vec<(u32, std::sync::mpsc::Sender<partition::Ask>)> {
    shared
        .asks
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|(q, _)| p.is_none_or(|p| p == **q))
        .map(|(q, (_, tx))| (*q, tx.clone()))
        .collect()
}

/// Answer the token views asked of the partitions this node owns, from their workers.
async fn answer_describe(shared: Arc<Shared>, stop: watch::Receiver<bool>) {
    let s = shared.clone();
    answer_later(
        shared,
        "tokenwatch.describe.*",
        "token views",
        stop,
        move |m| {
            let p = m
                .subject
                .strip_prefix("tokenwatch.describe.")
                .and_then(|p| p.parse::<u32>().ok())?;
            let ask = serde_json::from_slice::<wire::DescribeAsk>(&m.payload).ok()?;
            // Not owned here: the owner answers.
            let (_, worker) = workers(&s, Some(p)).pop()?;
            let (tx, rx) = tokio::sync::oneshot::channel();
            worker
                .send(partition::Ask::Describe(ask.token.into(), ask.keys, tx))
                .ok()?;
            Some(Box::pin(async move {
                match tokio::time::timeout(DESCRIBE_WAIT, rx).await {
                    Ok(Ok(Some(v))) => Some(wire::pack_view(&v)),
                    Ok(Ok(None)) => Some(Vec::new()),
                    // The worker ended or is busy: stay silent, the asking node gives up.
                    _ => None,
                }
            }))
        },
    )
    .await
}

/// Subject of the Snapshot RPC's scatter: every node snapshots the partitions it owns now.
const SNAPSHOT_QUERY: &str = "tokenwatch.query.snapshot";

/// Longest wait for the partitions' snapshots of a Snapshot RPC.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(30);

/// Answer the Snapshot scatter: each owned partition writes its history chunk and its
/// snapshot now (between two messages); the answer lists them (`{"p": .., "sequence": ..}`
/// or `{"p": .., "error": ..}`).
async fn answer_snapshot(shared: Arc<Shared>, stop: watch::Receiver<bool>) {
    let s = shared.clone();
    answer_later(shared, SNAPSHOT_QUERY, "snapshot requests", stop, move |_| {
        let mut waits = Vec::new();
        for (p, worker) in workers(&s, None) {
            let (tx, rx) = tokio::sync::oneshot::channel();
            if worker.send(partition::Ask::Snapshot(tx)).is_ok() {
                waits.push((p, rx));
            }
        }
        Some(Box::pin(async move {
            let mut out = Vec::new();
            for (p, rx) in waits {
                out.push(match tokio::time::timeout(SNAPSHOT_WAIT, rx).await {
                    Ok(Ok(Ok(seq))) => serde_json::json!({"p": p, "sequence": seq}),
                    Ok(Ok(Err(e))) => serde_json::json!({"p": p, "error": e}),
                    _ => serde_json::json!({"p": p, "error": "the partition's worker did not answer"}),
                });
            }
            serde_json::to_vec(&out).ok()
        }))
    })
    .await
}

/// The Snapshot RPC in cluster mode: every node's partitions snapshot themselves now; a
/// summary (partitions and the stream sequences their snapshots cover), or what failed.
async fn snapshot_all(shared: &Shared) -> Result<PathBuf, String> {
    let mut done: BTreeMap<u64, u64> = BTreeMap::new();
    let mut failed = Vec::new();
    for a in scatter(shared, SNAPSHOT_QUERY, Vec::new(), SNAPSHOT_WAIT).await {
        let Ok(parts) = serde_json::from_slice::<Vec<serde_json::Value>>(&a) else {
            continue;
        };
        for v in parts {
            let p = v["p"].as_u64().unwrap_or(u64::MAX);
            match v["sequence"].as_u64() {
                Some(seq) => {
                    done.insert(p, seq);
                }
                None => failed.push(format!("p{p}: {}", v["error"].as_str().unwrap_or("?"))),
            }
        }
    }
    if !failed.is_empty() {
        return Err(format!("snapshots failed: {}", failed.join("; ")));
    }
    let missing: Vec<String> = (0..u64::from(shared.n))
        .filter(|p| !done.contains_key(p))
        .map(|p| format!("p{p}"))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "no owner answered for {} (a handover under way?); the others wrote their snapshots",
            missing.join(", ")
        ));
    }
    let seqs: Vec<String> = done.iter().map(|(p, s)| format!("p{p}@{s}")).collect();
    Ok(PathBuf::from(format!(
        "{}: {} partitions ({})",
        wire::SNAPSHOTS,
        done.len(),
        seqs.join(" ")
    )))
}

/// An answer computed later (it waits for a partition's worker): its bytes, or `None` to
/// stay silent.
type Later = std::pin::Pin<Box<dyn std::future::Future<Output = Option<Vec<u8>>> + Send>>;

/// [`answer`] for answers that wait: `f` starts one (`None`: stay silent), which is
/// awaited and published on its own task.
async fn answer_later(
    shared: Arc<Shared>,
    subject: &'static str,
    what: &str,
    mut stop: watch::Receiver<bool>,
    mut f: impl FnMut(&async_nats::Message) -> Option<Later>,
) {
    let mut sub = match shared.client.subscribe(subject).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot answer {what}");
            return;
        }
    };
    loop {
        let m = tokio::select! {
            m = sub.next() => m,
            _ = stop.wait_for(|s| *s) => return,
        };
        let Some(m) = m else { return };
        let Some(reply) = m.reply.clone() else {
            continue;
        };
        if let Some(later) = f(&m) {
            let client = shared.client.clone();
            tokio::spawn(async move {
                if let Some(body) = later.await {
                    let _ = client.publish(reply, body.into()).await;
                }
            });
        }
    }
}

/// Answer the requests on `subject` (`what` names them in a log line) with `f`'s bytes;
/// `None`: stay silent (another node answers).
async fn answer(
    shared: Arc<Shared>,
    subject: &'static str,
    what: &str,
    stop: watch::Receiver<bool>,
    mut f: impl FnMut(&async_nats::Message) -> Option<Vec<u8>>,
) {
    answer_later(shared, subject, what, stop, move |m| {
        let body = f(m)?;
        Some(Box::pin(std::future::ready(Some(body))) as Later)
    })
    .await
}

/// Ask every live node on `subject`: the answers that come within a second (the nodes that
/// do not answer in time are left out).
async fn scatter(
    shared: &Shared,
    subject: &'static str,
    ask: Vec<u8>,
    wait: Duration,
) -> Vec<bytes::Bytes> {
    let live = shared.live.load(Ordering::Relaxed).max(1) as usize;
    let inbox = shared.client.new_inbox();
    let mut answers = Vec::new();
    let Ok(mut sub) = shared.client.subscribe(inbox.clone()).await else {
        return answers;
    };
    if shared
        .client
        .publish_with_reply(subject, inbox, ask.into())
        .await
        .is_err()
    {
        return answers;
    }
    let deadline = tokio::time::Instant::now() + wait;
    while answers.len() < live {
        match tokio::time::timeout_at(deadline, sub.next()).await {
            Ok(Some(m)) => answers.push(m.payload),
            _ => break,
        }
    }
    answers
}

async fn answer_stats(shared: Arc<Shared>, stop: watch::Receiver<bool>) {
    let s = shared.clone();
    answer(
        shared,
        wire::STATS_SUBJECT,
        "cluster stats",
        stop,
        move |_| Some(s.local_stats().encode_to_vec()),
    )
    .await
}

/// Every node's counters, summed (nodes that do not answer within a second are left
/// out); the cluster-wide view of windows and tokens comes from this node's board.
async fn gather_stats(shared: &Shared, board: &Board) -> pb::StatsResponse {
    let replies: Vec<pb::StatsResponse> =
        scatter(shared, wire::STATS_SUBJECT, Vec::new(), QUERY_WAIT)
            .await
            .iter()
            .filter_map(|b| pb::StatsResponse::decode(b.as_ref()).ok())
            .collect();
    let mut out = pb::StatsResponse {
        cluster: Some(shared.report()),
        ..Default::default()
    };
    for r in &replies {
        out.events += r.events;
        out.late_events += r.late_events;
        out.windows += r.windows;
        out.alert_windows += r.alert_windows;
        out.tokens += r.tokens;
        out.tracked_tokens += r.tracked_tokens;
        out.evicted_tokens += r.evicted_tokens;
        out.reloaded_tokens += r.reloaded_tokens;
        out.untracked_events += r.untracked_events;
        out.accepted_events += r.accepted_events;
        if let Some(c) = &r.cluster {
            out.nodes.push(c.clone());
        }
    }
    out.nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    out.published_windows = board.windows.load(Ordering::Relaxed);
    out
}

/// Ingest pieces at most this many rows (and below the server's payload limit).
const PIECE_ROWS: usize = 4096;

/// The command queue of a cluster node: batches are published (their streams learn of
/// any failure at their flush), stats are gathered; what only the embedded mode has is
/// refused with a clear reason.
async fn route(mut rx: mpsc::Receiver<Cmd>, shared: Arc<Shared>, board: Arc<Board>) {
    // One task per batch awaits its acks as they come: an ack future holds one of the
    // context's in-flight permits until it is awaited, so waiting for them only at the
    // stream's flush would stall every publish (and every node's) once they run out.
    let mut pending: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    let mut newest = i64::MIN;
    let mut origin_set = false;
    let not_here = "not available in cluster mode yet (see the README's cluster section)";
    while let Some(cmd) = rx.recv().await {
        match cmd {
            // Event ids: JetStream's own de-duplication (message ids) covers a retried
            // publish; the keys are for the embedded log.
            Cmd::Batch(b, ack, _keys) => {
                let (min, max) = ts_range(&b);
                if !origin_set {
                    match ensure_origin(&shared, min).await {
                        Ok(()) => origin_set = true,
                        Err(e) => {
                            fail(&ack, format!("cannot reach the cluster: {e}"));
                            continue;
                        }
                    }
                }
                newest = newest.max(max.min(now_ms() as i64));
                let mut acks = Vec::new();
                if let Err(e) = publish_batch(&shared, &b, &mut acks).await {
                    fail(&ack, e);
                }
                let shared = shared.clone();
                pending.retain(|t| !t.is_finished());
                pending.push(tokio::spawn(async move {
                    for (f, rows) in acks {
                        match f.await {
                            Ok(_) => {
                                shared.accepted.fetch_add(rows, Ordering::Relaxed);
                            }
                            Err(e) => fail(&ack, format!("JetStream did not acknowledge: {e}")),
                        }
                    }
                }));
            }
            Cmd::Flush(tx) => {
                let acks = std::mem::take(&mut pending);
                let clock = std::mem::replace(&mut newest, i64::MIN);
                let shared = shared.clone();
                tokio::spawn(async move {
                    for t in acks {
                        let _ = t.await;
                    }
                    if clock != i64::MIN {
                        if let Err(e) = raise_clock(&shared.facts, clock).await {
                            tracing::warn!(error = %e, "cluster clock");
                        }
                    }
                    let _ = tx.send(Ok(()));
                });
            }
            Cmd::Tick => {
                let (parts, _) = shared.local();
                for (p, s) in parts {
                    metrics::gauge!("tokenwatch_cluster_partition_lag", "partition" => p.to_string())
                        .set(s.lag as f64);
                }
            }
            Cmd::Stats(tx) => {
                let shared = shared.clone();
                let board = board.clone();
                tokio::spawn(async move {
                    let _ = tx.send(gather_stats(&shared, &board).await);
                });
            }
            Cmd::Snapshot(tx) => {
                let shared = shared.clone();
                tokio::spawn(async move {
                    let _ = tx.send(snapshot_all(&shared).await);
                });
            }
            Cmd::Retrain(_, _, tx) => {
                let _ = tx.send(Err(format!(
                    "{not_here}: retrain offline from the history (tokenwatch history, then tokenwatch retrain)"
                )));
            }
            Cmd::Swap(_, tx) => {
                let _ = tx.send(Err(not_here.to_string()));
            }
            Cmd::Feedback {
                alert_id,
                verdict,
                note,
                reply,
            } => {
                let shared = shared.clone();
                tokio::spawn(async move {
                    let _ = reply.send(submit_feedback(&shared, alert_id, verdict, note).await);
                });
            }
            Cmd::Describe(token, keys, tx) => {
                let shared = shared.clone();
                tokio::spawn(async move {
                    let _ = tx.send(describe(&shared, &token, keys).await);
                });
            }
            Cmd::Alerts {
                offset,
                limit,
                token,
                reply,
            } => {
                let shared = shared.clone();
                tokio::spawn(async move {
                    let _ = reply.send(gather_alerts(&shared, offset, limit, token).await);
                });
            }
            Cmd::Stop(tx) => {
                let _ = tx.send(shared.local().1);
                break;
            }
        }
    }
}

/// Subject of the console's alert pages, gathered from every node's partitions.
const ALERTS_QUERY: &str = "tokenwatch.query.alerts";

/// Most recently raised first (by first window, then id, so every node orders alike).
fn newest_first(rows: &mut [crate::respond::actions::AlertRow]) {
    rows.sort_by(|a, b| {
        b.info
            .first
            .cmp(&a.info.first)
            .then_with(|| a.alert_id.cmp(&b.alert_id))
    });
}

/// A page of the cluster's remembered alerts: every live node answers with its partitions'
/// newest `offset + limit` (those that do not answer within a second are left out), merged.
async fn gather_alerts(
    shared: &Shared,
    offset: usize,
    limit: usize,
    token: Option<String>,
) -> (Vec<crate::respond::actions::AlertRow>, usize, usize) {
    let most = offset.saturating_add(limit);
    let ask = serde_json::json!({ "most": most, "token": token }).to_string();
    let (mut rows, mut total, mut open) = (Vec::new(), 0, 0);
    for b in scatter(shared, ALERTS_QUERY, ask.into_bytes(), QUERY_WAIT).await {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&b) else {
            continue;
        };
        total += v["total"].as_u64().unwrap_or(0) as usize;
        open += v["open"].as_u64().unwrap_or(0) as usize;
        for r in v["rows"].as_array().into_iter().flatten() {
            if let Ok(r) = crate::respond::actions::AlertRow::from_json(r) {
                rows.push(r);
            }
        }
    }
    newest_first(&mut rows);
    let page = rows.into_iter().skip(offset).take(limit).collect();
    (page, total, open)
}

/// Answer [`gather_alerts`] with this node's partitions' alerts.
async fn answer_alerts(shared: Arc<Shared>, stop: watch::Receiver<bool>) {
    let s = shared.clone();
    answer(
        shared,
        ALERTS_QUERY,
        "the console's alert pages",
        stop,
        move |m| {
            let ask: serde_json::Value = serde_json::from_slice(&m.payload).unwrap_or_default();
            // One page at most as large as the embedded console ever asks for.
            let most = (ask["most"].as_u64().unwrap_or(50) as usize).min(10_000);
            let (rows, total, open) = s.recent_alerts(most, ask["token"].as_str());
            let body = serde_json::json!({
                "rows": rows.iter().map(|r| r.to_json()).collect::<Vec<_>>(),
                "total": total,
                "open": open,
            });
            Some(body.to_string().into_bytes())
        },
    )
    .await
}

/// How long a node waits for the owner to apply a verdict it submitted.
const FEEDBACK_WAIT: Duration = Duration::from_secs(10);

/// A verdict submitted on this node: published on the alert's partition's events subject
/// (durable, applied by the owner in stream order and by every later owner's replay), then
/// the owner's answer awaited.
async fn submit_feedback(
    shared: &Shared,
    alert_id: String,
    verdict: crate::engine::Verdict,
    note: String,
) -> Result<(String, crate::engine::FeedbackEffect), String> {
    if shared.policing.is_none() {
        return Err("the server runs without alert policies, so there are no alert ids".into());
    }
    let token = shared
        .alert_tokens
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .map
        .get(&alert_id)
        .cloned()
        .ok_or_else(|| {
            format!("unknown alert id {alert_id:?} (not on this cluster's alerts stream, or too old to remember)")
        })?;
    let p = shard_of(&token, shared.n as usize) as u32;
    let body = wire::Feedback {
        alert_id,
        verdict: verdict.name().into(),
        note,
        at: now_ms() as i64,
    };
    let payload = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
    let inbox = shared.client.new_inbox();
    let mut answers = shared
        .client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| format!("cannot reach the cluster: {e}"))?;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(wire::KIND_HEADER, wire::FEEDBACK_KIND);
    headers.insert(wire::REPLY_HEADER, inbox.as_str());
    let msg = jetstream::message::PublishMessage::build()
        .payload(payload.clone().into())
        .headers(headers)
        .message_id(wire::message_id(p, &payload));
    shared
        .js
        .send_publish(wire::events_subject(p), msg)
        .await
        .map_err(|e| format!("cannot publish the verdict: {e}"))?
        .await
        .map_err(|e| format!("JetStream did not acknowledge the verdict: {e}"))?;
    let answer = tokio::time::timeout(FEEDBACK_WAIT, answers.next())
        .await
        .map_err(|_| {
            format!(
                "the verdict is recorded in the cluster, but partition {p}'s owner did not apply it within {}s (it will when it catches up)",
                FEEDBACK_WAIT.as_secs()
            )
        })?
        .ok_or("cut off from the cluster while waiting for the verdict's effect")?;
    let r: wire::FeedbackReply =
        serde_json::from_slice(&answer.payload).map_err(|e| format!("the owner's answer: {e}"))?;
    let (token, learned_windows, damped, hold_until) = r.result?;
    Ok((
        token,
        crate::engine::FeedbackEffect {
            learned_windows,
            damped: damped
                .iter()
                .filter_map(|s| crate::model::SignalKind::from_name(s))
                .collect(),
            hold_until,
        },
    ))
}

fn fail(ack: &Ack, msg: String) {
    let mut f = ack.failed.lock().unwrap_or_else(|e| e.into_inner());
    if f.is_none() {
        *f = Some(msg);
    }
}

fn ts_range(b: &RecordBatch) -> (i64, i64) {
    let ts = b.column(col::TS).as_primitive::<TimestampMillisecondType>();
    let mut lo = i64::MAX;
    let mut hi = i64::MIN;
    for &t in ts.values().iter() {
        lo = lo.min(t);
        hi = hi.max(t);
    }
    (lo, hi)
}

/// The cluster's refit grid starts from the first request any node ingests (create if
/// absent: the first writer wins, everyone reads the same).
async fn ensure_origin(shared: &Shared, min_ts: i64) -> Result<(), String> {
    if origin(shared).await?.is_some() {
        return Ok(());
    }
    let o = crate::engine::first_refit(&shared.cfg, min_ts);
    if shared
        .facts
        .create("origin", o.to_string().into())
        .await
        .is_err()
        && origin(shared).await?.is_none()
    {
        return Err("cannot set the refit origin".into());
    }
    Ok(())
}

/// Split a validated batch by partition and publish its pieces (not waiting for acks).
async fn publish_batch(
    shared: &Shared,
    b: &RecordBatch,
    pending: &mut Vec<(async_nats::jetstream::context::PublishAckFuture, u64)>,
) -> Result<(), String> {
    let n = shared.n as usize;
    let tok = b.column(col::TOKEN_ID).as_string::<i32>();
    let mut rows: Vec<Vec<u32>> = vec![Vec::new(); n];
    for i in 0..b.num_rows() {
        rows[shard_of(tok.value(i), n)].push(i as u32);
    }
    let now = now_ms().to_string();
    let limit = shared.client.server_info().max_payload.max(64 * 1024) - 16 * 1024;
    for (p, idx) in rows.into_iter().enumerate() {
        if idx.is_empty() {
            continue;
        }
        let part = arrow::compute::take_record_batch(b, &UInt32Array::from(idx))
            .map_err(|e| e.to_string())?;
        // In order: a partition's events reach its owner as they were sent.
        let mut pieces = std::collections::VecDeque::new();
        let mut off = 0;
        while off < part.num_rows() {
            let len = PIECE_ROWS.min(part.num_rows() - off);
            pieces.push_back(part.slice(off, len));
            off += len;
        }
        while let Some(piece) = pieces.pop_front() {
            let bytes = wire::encode_batch(&piece)?;
            if bytes.len() > limit && piece.num_rows() > 1 {
                let half = piece.num_rows() / 2;
                pieces.push_front(piece.slice(half, piece.num_rows() - half));
                pieces.push_front(piece.slice(0, half));
                continue;
            }
            let id = wire::message_id(p as u32, &bytes);
            let msg = async_nats::jetstream::message::PublishMessage::build()
                .payload(bytes.into())
                .message_id(&id)
                .header(wire::NOW_HEADER, now.as_str());
            let f = shared
                .js
                .send_publish(wire::events_subject(p as u32), msg)
                .await
                .map_err(|e| format!("cannot publish to the cluster: {e}"))?;
            pending.push((f, piece.num_rows() as u64));
        }
    }
    Ok(())
}

/// What [`pull_history`] wrote.
#[derive(Debug, Default)]
pub struct Pulled {
    /// History chunks read.
    pub chunks: u64,
    /// Events written.
    pub events: u64,
    /// Files written (one per UTC date).
    pub files: Vec<PathBuf>,
}

/// Copy the cluster's event history (every partition's, or only `only`'s) into the
/// history layout of a data directory, `out/events/date=D/part-....parquet`: per UTC date
/// one file, the partitions' events merged in event-time order (ties in stream order), so
/// `retrain --data-dir out`, `scopes` and `replay` read it as an embedded server's history.
/// A date is merged in memory: a very large cluster pulls a partition at a time.
pub async fn pull_history(
    url: &str,
    out: &std::path::Path,
    only: &[u32],
) -> Result<Pulled, String> {
    let client = async_nats::ConnectOptions::new()
        .name("tokenwatch history")
        .connection_timeout(Duration::from_secs(10))
        .connect(url)
        .await
        .map_err(|e| format!("cannot connect to the cluster at {url}: {e}"))?;
    let js = jetstream::new(client);
    let store = js
        .get_object_store(wire::HISTORY)
        .await
        .map_err(|e| format!("{}: {e} (no node has written history yet?)", wire::HISTORY))?;
    // (date, partition, first sequence) -> object name: dates in order, each date's chunks
    // in partition and stream order.
    let mut chunks: BTreeMap<(String, u32, u64), String> = BTreeMap::new();
    let mut list = store.list().await.map_err(|e| e.to_string())?;
    while let Some(info) = list.next().await {
        let info = info.map_err(|e| e.to_string())?;
        if info.deleted {
            continue;
        }
        if let Some((p, date, first, _)) = partition::parse_history_name(&info.name) {
            if only.is_empty() || only.contains(&p) {
                chunks.insert((date, p, first), info.name);
            }
        }
    }
    let events_d = crate::store::events_dir(out);
    let mut pulled = Pulled::default();
    let mut dates: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for ((date, _, _), name) in chunks {
        dates.entry(date).or_default().push(name);
    }
    for (date, names) in dates {
        let mut batches = Vec::new();
        for name in &names {
            let mut obj = store.get(name).await.map_err(|e| format!("{name}: {e}"))?;
            let mut bytes = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut obj, &mut bytes)
                .await
                .map_err(|e| format!("{name}: {e}"))?;
            let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
                bytes::Bytes::from(bytes),
            )
            .and_then(|b| b.build())
            .map_err(|e| format!("{name}: {e}"))?;
            for b in reader {
                batches.push(b.map_err(|e| format!("{name}: {e}"))?);
            }
            pulled.chunks += 1;
        }
        let schema = crate::store::history::history_schema();
        let all = arrow::compute::concat_batches(&schema, &batches)
            .map_err(|e| format!("date {date}: {e}"))?;
        let ts = all
            .column(col::TS)
            .as_primitive::<TimestampMillisecondType>();
        let mut order: Vec<u32> = (0..all.num_rows() as u32).collect();
        // Stable: events of one time stay in the order their partition applied them.
        order.sort_by_key(|&i| ts.value(i as usize));
        let take = UInt32Array::from(order);
        let cols = all
            .columns()
            .iter()
            .map(|c| arrow::compute::take(c.as_ref(), &take, None))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("date {date}: {e}"))?;
        let sorted = RecordBatch::try_new(schema, cols).map_err(|e| format!("date {date}: {e}"))?;
        let dir = events_d.join(format!("date={date}"));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = dir.join(format!("part-{:020}.parquet", 1));
        pulled.events +=
            crate::store::history::write_parquet(&path, &[sorted]).map_err(|e| e.to_string())?;
        pulled.files.push(path);
    }
    Ok(pulled)
}
