//! The gRPC door (`tokenwatch serve`): the tonic service over the one [`Engine`], with
//! bearer-key authentication per role, standard health and reflection, optional TLS,
//! bounded queues and graceful shutdown. Proto types live here and nowhere else.
//!
//! - [`auth`]: keys file, constant-time key check, roles.
//! - [`convert`]: proto events -> validated Arrow batch; scores -> `TokenRisk` / `Alert`.
//! - `host`: the engine thread and the board of published scores.
//! - `service`: the RPC handlers.
//! - [`console`]: the web console (`serve --http`) over the same handlers.
//! - `timeline`: each token's recent windows and the alerts per hour, for the console.

pub mod auth;
pub mod console;
pub mod convert;
pub mod dedup;
pub(crate) mod host;
mod service;
pub mod telemetry;
mod timeline;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch, Semaphore};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Identity, Server, ServerTlsConfig};

use crate::config::Config;
use crate::engine::{Engine, Stats};
use crate::model::registry::Registry;

/// Generated gRPC types and stubs of `proto/tokenwatch/v1/tokenwatch.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("tokenwatch.v1");

    /// Encoded descriptors, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/tokenwatch_descriptor.bin"));
}

/// Errors that stop the server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The transport failed (bind, TLS setup, serving).
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Reflection could not be built from the descriptors (a build defect).
    #[error("reflection: {0}")]
    Reflection(String),
    /// The data directory could not be opened or recovered.
    #[error("data directory: {0}")]
    Store(#[from] crate::store::Error),
    /// The server task panicked or was cancelled.
    #[error("server task: {0}")]
    Task(String),
    /// The cluster could not be joined.
    #[error("cluster: {0}")]
    Cluster(String),
}

/// How to serve.
pub struct Options {
    /// Models and server limits.
    pub config: Config,
    /// Token registry (scopes, environments).
    pub registry: Registry,
    /// Accepted keys; `None` only with `--insecure-no-auth`.
    pub keys: Option<auth::Keys>,
    /// PEM certificate chain and private key, for TLS.
    pub tls: Option<(Vec<u8>, Vec<u8>)>,
    /// How long a shutdown waits for in-flight requests.
    pub shutdown_grace: Duration,
    /// Durable state (write-ahead log, history, snapshots); `None` keeps everything in
    /// memory (tests, experiments).
    pub data_dir: Option<std::path::PathBuf>,
    /// Alert policies (models/policies.toml by default).
    pub policies: Vec<crate::respond::policy::Policy>,
    /// Record revocations instead of sending them.
    pub dry_run: bool,
    /// Test hook: failures injected into the write-ahead log (`None` in production).
    pub faults: Option<Arc<crate::store::wal::Faults>>,
    /// Told once state is recovered and every RPC is served (the readiness line waits for
    /// it); until then health says NOT_SERVING and RPCs answer UNAVAILABLE.
    pub ready: Option<oneshot::Sender<()>>,
    /// Where the web console listens (`serve --http`); `None`: no console.
    pub http: Option<TcpListener>,
    /// Run as a node of a NATS JetStream cluster (`serve --cluster`) instead of the
    /// embedded engine and its local log.
    pub cluster: Option<crate::cluster::Options>,
}

/// What the RPC handlers' queue leads to: the embedded engine thread, or a cluster node.
enum Backend {
    Local(host::Host),
    Cluster(crate::cluster::Node),
}

impl Backend {
    fn tx(&self) -> &tokio::sync::mpsc::Sender<host::Cmd> {
        match self {
            Backend::Local(h) => &h.tx,
            Backend::Cluster(n) => &n.tx,
        }
    }

    fn board(&self) -> Arc<host::Board> {
        match self {
            Backend::Local(h) => h.board.clone(),
            Backend::Cluster(n) => n.board.clone(),
        }
    }

    async fn stop(self) -> Stats {
        match self {
            Backend::Local(h) => h.stop().await,
            Backend::Cluster(n) => n.stop().await,
        }
    }
}

/// The engine thread counts as stuck when it has not finished a command (it gets a tick
/// every second) for this long: health says NOT_SERVING until it moves again.
const WATCHDOG_AFTER: Duration = Duration::from_secs(60);

/// What a server did, returned after a clean shutdown.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Engine counters at the end.
    pub stats: Stats,
    /// Windows published (scored) over the run.
    pub windows: u64,
    /// Alerts published.
    pub alerts: u64,
}

/// Health of the service and of the server as a whole (the empty service name).
async fn set_health(h: &tonic_health::server::HealthReporter, serving: bool) {
    use tonic_health::ServingStatus;
    let s = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    h.set_service_status("", s).await;
    h.set_service_status(
        <pb::token_watch_server::TokenWatchServer<service::Service> as tonic::server::NamedService>::NAME,
        s,
    )
    .await;
}

/// Serve on `listener` until `shutdown` resolves; then stop accepting, let in-flight
/// requests finish (at most `shutdown_grace`), close every open window and return.
pub async fn run(
    listener: TcpListener,
    mut opts: Options,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<Summary, Error> {
    let scfg = opts.config.server.clone();
    // The console's timelines cost memory only when there is a console to show them.
    let timeline = match &opts.http {
        Some(_) => {
            let c = &opts.config.console;
            let per_token = c.timeline_span.ms / opts.config.window.size.ms.max(1);
            let per_token = per_token.clamp(1, 1 << 20) as usize;
            (c.timeline_windows, per_token, c.timeline_span.ms)
        }
        None => (0, 1, 0),
    };
    let board = Arc::new(host::Board::new(scfg.alert_buffer, timeline));
    let registry = Arc::new(opts.registry.clone());
    let scopes = Arc::new(crate::scopes::Cache::new(
        opts.data_dir.clone(),
        registry.clone(),
        Duration::from_millis(opts.config.console.scope_report_max_age.ms.max(0) as u64),
    ));
    // The engine's queue exists before the engine: the service is reachable (and says it is
    // recovering) while state is read back.
    let (etx, erx) = tokio::sync::mpsc::channel(scfg.queue_batches.max(1));
    let (close_tx, close_rx) = watch::channel(false);
    let (finished_tx, finished_rx) = watch::channel(false);
    let streams = Arc::new(Semaphore::new(scfg.max_ingest_streams));
    let (ready_tx, ready_rx) = watch::channel(false);
    let cluster_query: Arc<std::sync::OnceLock<crate::cluster::Query>> = Arc::default();
    let dedup = Arc::new(std::sync::Mutex::new(dedup::Dedup::new(scfg.dedup_ids)));
    let svc = Arc::new(service::Service {
        scopes,
        dedup: dedup.clone(),
        engine: etx.clone(),
        board: board.clone(),
        cluster: cluster_query.clone(),
        ready: ready_rx,
        cfg: scfg.clone(),
        streams: streams.clone(),
        closing: close_rx.clone(),
        finished: finished_rx,
    });
    let keys = opts.keys.map(Arc::new);
    let authn = auth::Authenticate { keys: keys.clone() };
    if let Some(listener) = opts.http {
        let console = Arc::new(console::Console::new(
            svc.clone(),
            board.clone(),
            etx.clone(),
            keys.clone(),
            registry.clone(),
            opts.config.console.clone(),
            opts.data_dir.clone(),
            opts.tls.is_some(),
            opts.config.score.alert_risk,
        ));
        let mut closing = close_rx.clone();
        let stop = async move {
            let _ = closing.wait_for(|c| *c).await;
        };
        let tls = opts.tls.clone();
        tokio::spawn(async move {
            if let Err(e) = console::serve(listener, console, tls, stop).await {
                tracing::error!(error = %e, "the console stopped");
            }
        });
    }
    let api = pb::token_watch_server::TokenWatchServer::from_arc(svc)
        .max_decoding_message_size(scfg.max_message_bytes)
        .max_encoding_message_size(scfg.max_message_bytes);
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Reflection(e.to_string()))?;
    let (health, health_svc) = tonic_health::server::health_reporter();
    // NOT_SERVING (the service and the server as a whole) until state is recovered.
    set_health(&health, false).await;

    let mut builder = Server::builder()
        .max_concurrent_streams(Some(256))
        .concurrency_limit_per_connection(256)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)));
    if let Some((cert, key)) = opts.tls {
        builder =
            builder.tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))?;
    }
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    // No Nagle delay: a small answer (GetTokenRisk, ListRiskyTokens) must not wait for the
    // client's delayed ACK (~40 ms).
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut server = tokio::spawn(
        builder
            .add_service(health_svc)
            .add_service(InterceptedService::new(reflection, authn.clone()))
            .add_service(InterceptedService::new(api, authn))
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop_rx.await;
            }),
    );
    let heartbeat = Arc::new(std::sync::atomic::AtomicU64::new(host::now_ms()));
    let mut deliveries = None;
    let backend = if let Some(c) = opts.cluster.take() {
        let node = crate::cluster::Node::start(
            c,
            &opts.config,
            &opts.registry,
            board.clone(),
            (etx, erx),
            (&opts.policies, opts.dry_run),
        )
        .await;
        match node {
            Ok(n) => {
                let _ = cluster_query.set(n.query());
                Backend::Cluster(n)
            }
            Err(e) => {
                let _ = stop_tx.send(());
                let _ = server.await;
                return Err(Error::Cluster(e));
            }
        }
    } else {
        let recovered = async {
            let (engine, store, replayed) = match opts.data_dir.clone() {
                None => (
                    Engine::new(opts.config.clone(), opts.registry.clone()),
                    None,
                    0,
                ),
                Some(dir) => {
                    let (cfg, reg) = (opts.config.clone(), opts.registry.clone());
                    let t0 = std::time::Instant::now();
                    let (mut store, rec) = tokio::task::spawn_blocking(move || {
                        crate::store::Store::open(&dir, &cfg, reg)
                    })
                    .await
                    .map_err(|e| Error::Task(e.to_string()))??;
                    store.set_faults(opts.faults.clone());
                    for w in &rec.warnings {
                        tracing::warn!("{w}");
                    }
                    board.restore(rec.extras.iter().filter_map(|(t, b)| {
                        let r: pb::TokenRisk = prost::Message::decode(b.as_slice()).ok()?;
                        Some((t.clone(), r))
                    }));
                    board.publish_quietly(&rec.scores);
                    // Before the first Ingest is served (the service says it is recovering
                    // until then): a resend of an event acknowledged before the restart is
                    // still a duplicate.
                    dedup
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .restore(&rec.dedup_keys);
                    tracing::info!(
                        snapshot = ?rec.snapshot,
                        event_ids = rec.dedup_keys.len(),
                        batches = rec.replayed_batches,
                        events = rec.replayed_events,
                        seconds = t0.elapsed().as_secs_f64(),
                        "state recovered"
                    );
                    (rec.engine, Some(store), rec.replayed_batches)
                }
            };
            Ok::<_, Error>((engine, store, replayed))
        }
        .await;
        let (engine, store, replayed) = match recovered {
            Ok(x) => x,
            Err(e) => {
                let _ = stop_tx.send(());
                let _ = server.await;
                return Err(e);
            }
        };
        let (responder, delivery) = if opts.policies.is_empty() {
            (None, None)
        } else {
            let cfg = opts.config.respond.clone();
            let (tx, rx) = tokio::sync::mpsc::channel(cfg.queue.max(1));
            let (actions, resumed, bad) = crate::respond::actions::Actions::new(
                opts.data_dir.as_deref(),
                cfg,
                opts.dry_run,
                &opts.policies,
            );
            for w in bad {
                tracing::warn!("{w}");
            }
            let actions = Arc::new(actions);
            let responder = crate::respond::actions::Responder::new(
                opts.policies.clone(),
                opts.config.window.size.ms,
                tx,
                actions.clone(),
            );
            let task = tokio::spawn(crate::respond::actions::run(rx, actions, resumed));
            (Some(responder), Some(task))
        };
        deliveries = delivery;
        let host = host::Host::start_on(
            (etx, erx),
            engine,
            board,
            host::Setup {
                idle_close: Duration::from_millis(scfg.idle_close.ms as u64),
                snapshot_every: Duration::from_millis(
                    opts.config.store.snapshot_every.ms.max(1000) as u64,
                ),
                store,
                config: opts.config.clone(),
                registry: opts.registry.clone(),
                responder,
            },
            heartbeat.clone(),
        );
        if replayed > 0 {
            // Start from a fresh snapshot, so the next restart replays nothing twice over.
            let (tx, rx) = oneshot::channel();
            if host.tx.send(host::Cmd::Snapshot(tx)).await.is_ok() {
                if let Ok(Err(e)) = rx.await {
                    tracing::warn!(error = %e, "snapshot after recovery failed");
                }
            }
        }
        Backend::Local(host)
    };
    // Idle close runs on processing time; a full queue means the engine is busy anyway.
    let ticker = {
        let tx = backend.tx().clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                every.tick().await;
                if let Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) =
                    tx.try_send(host::Cmd::Tick)
                {
                    break;
                }
            }
        })
    };
    // A cluster node cut off from NATS can neither take events nor apply them.
    let link = match &backend {
        Backend::Cluster(n) => Some(n.link_watch()),
        Backend::Local(_) => None,
    }
    .map(|mut up| {
        let health = health.clone();
        tokio::spawn(async move {
            while up.changed().await.is_ok() {
                let on = *up.borrow();
                if on {
                    tracing::warn!("connected to the cluster again: health is SERVING");
                } else {
                    tracing::error!(
                        "cut off from the cluster's NATS server: health is NOT_SERVING"
                    );
                }
                set_health(&health, on).await;
            }
        })
    });
    let watchdog = matches!(backend, Backend::Local(_)).then(|| {
        let health = health.clone();
        let heartbeat = heartbeat.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            let mut stuck = false;
            loop {
                every.tick().await;
                let idle = host::now_ms()
                    .saturating_sub(heartbeat.load(std::sync::atomic::Ordering::Relaxed));
                let now_stuck = idle > WATCHDOG_AFTER.as_millis() as u64;
                if now_stuck != stuck {
                    stuck = now_stuck;
                    if stuck {
                        tracing::error!(
                            seconds = idle / 1000,
                            "the engine thread makes no progress: health is NOT_SERVING"
                        );
                    } else {
                        tracing::warn!("the engine thread moves again: health is SERVING");
                    }
                    set_health(&health, !stuck).await;
                }
            }
        })
    });
    let _ = ready_tx.send(true);
    set_health(&health, true).await;
    if let Some(r) = opts.ready {
        let _ = r.send(());
    }
    let early = tokio::select! {
        r = &mut server => Some(r),
        _ = shutdown => None,
    };
    if let Some(r) = early {
        ticker.abort();
        for w in watchdog.iter().chain(link.iter()) {
            w.abort();
        }
        let _ = backend.stop().await;
        return match r {
            Ok(Ok(())) => Err(Error::Task("server stopped by itself".into())),
            Ok(Err(e)) => Err(e.into()),
            Err(e) => Err(Error::Task(e.to_string())),
        };
    }
    tracing::info!("shutting down: refusing new requests, finishing in-flight ones");
    health
        .set_not_serving::<pb::token_watch_server::TokenWatchServer<service::Service>>()
        .await;
    // Order matters: ingest streams stop reading and finish their last message; then the
    // engine closes every window and publishes the last alerts; only then do alert streams
    // end, so a subscriber sees the alerts of the final windows.
    let _ = close_tx.send(true);
    let _ = stop_tx.send(());
    let all = u32::try_from(scfg.max_ingest_streams).unwrap_or(u32::MAX);
    let deadline = tokio::time::Instant::now() + opts.shutdown_grace;
    if tokio::time::timeout_at(deadline, streams.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!(grace = ?opts.shutdown_grace, "ingest streams still open after the grace period");
    }
    ticker.abort();
    let board = backend.board();
    let stats = backend.stop().await;
    let _ = finished_tx.send(true);
    if let Some(task) = deliveries {
        // The engine thread is gone, so the action queue is closed: deliver what is left.
        if tokio::time::timeout_at(deadline, task).await.is_err() {
            tracing::warn!("alert actions still pending after the grace period; cut");
        }
    }
    match tokio::time::timeout_at(deadline, &mut server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "transport error while draining"),
        Ok(Err(e)) => tracing::warn!(error = %e, "server task failed while draining"),
        Err(_) => {
            tracing::warn!(grace = ?opts.shutdown_grace, "requests still open after the grace period; cut");
            server.abort();
        }
    }
    let summary = Summary {
        stats,
        windows: board.windows.load(std::sync::atomic::Ordering::Relaxed),
        alerts: board.alerted.load(std::sync::atomic::Ordering::Relaxed),
    };
    tracing::info!(
        events = summary.stats.events,
        windows = summary.windows,
        alerts = summary.alerts,
        "stopped: every open window closed and scored"
    );
    Ok(summary)
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
