//! Command line: subcommands and raw flags, no logic.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::Duration;
use crate::generate::OutFormat;
use crate::ingest::BadRowPolicy;

/// tokenwatch: says when an API token stops behaving like itself.
#[derive(Debug, Parser)]
#[command(name = "tokenwatch", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write synthetic labelled traffic (events, registry, incidents).
    Generate {
        /// Number of tokens.
        #[arg(long, default_value_t = 500)]
        tokens: usize,
        /// Days of traffic.
        #[arg(long, default_value_t = 21)]
        days: u32,
        /// Random seed.
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Events file format.
        #[arg(long, value_enum, default_value_t = OutFormat::Parquet)]
        format: OutFormat,
        /// Multiply every request rate (smaller samples).
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        /// Leave out the benign drift (travel, app releases, retry storms, level shifts,
        /// moves, new routes, a holiday, heavy-tailed sizes).
        #[arg(long)]
        no_drift: bool,
    },
    /// Replay a labelled file through the engine and measure detection quality.
    Eval {
        /// Input and output.
        #[command(flatten)]
        replay: ReplayArgs,
        /// Training ends here (RFC 3339 or epoch ms); windows after it are evaluated.
        #[arg(long, conflicts_with = "train_fraction")]
        train_until: Option<String>,
        /// Fraction of the file's time span used for training.
        #[arg(long, default_value_t = 0.67)]
        train_fraction: f64,
        /// Write the metrics as JSON here.
        #[arg(long)]
        json_out: Option<PathBuf>,
        /// Incidents file (token_id, kind, start, end); derived from labels if absent.
        #[arg(long)]
        incidents: Option<PathBuf>,
        /// Write every evaluated alert (token_id, window_start, last_window_start, verdict
        /// from the labels) as CSV: the verdicts an operator would give.
        #[arg(long)]
        alerts_out: Option<PathBuf>,
        /// Write a self-contained HTML report (PR curve, recall per kind, detection delays,
        /// risk timelines of the worst misses and noisiest false alerts, summary table).
        #[arg(long)]
        report: Option<PathBuf>,
        /// Replay operator verdicts (token_id, window_start, verdict; as --alerts-out
        /// writes them): each is applied when its alert starts plus --feedback-delay.
        #[arg(long)]
        feedback: Option<PathBuf>,
        /// Event time between an alert's first window and the operator's verdict.
        #[arg(long, default_value = "30m")]
        feedback_delay: Duration,
        /// Alert policies that decide which windows page someone, as `serve --policies`
        /// (default: models/policies.toml as built in).
        #[arg(long)]
        policies: Option<PathBuf>,
    },
    /// Replay a file through the engine and write window scores (no labels needed).
    Replay {
        /// Input and output.
        #[command(flatten)]
        replay: ReplayArgs,
    },
    /// Least privilege: per token, granted scopes its calls did not use in the last days,
    /// and scopes its calls needed but were not granted (from the Parquet history).
    Scopes {
        /// The server's data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// Token registry file (the granted scopes).
        #[arg(long)]
        tokens: Option<PathBuf>,
        /// Days of event time, ending at the newest event in the history.
        #[arg(long, default_value_t = 30)]
        days: u32,
        /// Output format.
        #[arg(long, value_enum, default_value_t = ScopesFormat::Table)]
        format: ScopesFormat,
    },
    /// Copy a cluster's Parquet event history (JetStream object store `tokenwatch_history`)
    /// into a data directory's history layout, for `retrain`, `scopes` and offline study.
    History {
        /// NATS URL of the cluster (as `serve --cluster`).
        #[arg(long, env = "TOKENWATCH_CLUSTER")]
        cluster: String,
        /// Directory to write (its `events/` gets one file per UTC date).
        #[arg(long)]
        out: PathBuf,
        /// Only these partitions (repeat the flag; default: every partition).
        #[arg(long)]
        partition: Vec<u32>,
    },
    /// Rebuild every model from a data directory's Parquet history and write a snapshot.
    Retrain {
        /// The server's data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// Only events at or after this time (RFC 3339 or epoch ms).
        #[arg(long)]
        from: Option<String>,
        /// Only events before this time.
        #[arg(long)]
        to: Option<String>,
        /// Token registry file.
        #[arg(long)]
        tokens: Option<PathBuf>,
        /// Model parameters overriding models/default.toml.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Tell a running server whether an alert was right (SubmitFeedback).
    Label {
        /// Server address (host:port or http://host:port).
        #[arg(long, default_value = "127.0.0.1:50051")]
        target: String,
        /// Admin key.
        #[arg(long, env = "TOKENWATCH_KEY", hide_env_values = true)]
        key: Option<String>,
        /// Alert id (from the webhook, the audit log or WatchAlerts).
        #[arg(long)]
        alert: String,
        /// true_positive, false_positive or expected_change.
        #[arg(long)]
        verdict: String,
        /// Free text kept with the verdict.
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Run the gRPC service (proto/tokenwatch/v1/tokenwatch.proto).
    Serve(ServeArgs),
    /// Stream generated events into a running server and measure it.
    Loadgen {
        /// Server address (host:port or http://host:port).
        #[arg(long, default_value = "127.0.0.1:50051")]
        target: String,
        /// Events to send in all.
        #[arg(long, default_value_t = 1_000_000)]
        events: u64,
        /// Events per IngestRequest.
        #[arg(long, default_value_t = 1_000)]
        batch: usize,
        /// Parallel Ingest streams.
        #[arg(long, default_value_t = 2)]
        streams: usize,
        /// Distinct tokens.
        #[arg(long, default_value_t = 1_000)]
        tokens: usize,
        /// Bearer key (needs the ingest and read roles, or admin).
        #[arg(long, env = "TOKENWATCH_KEY", hide_env_values = true)]
        key: Option<String>,
        /// GetTokenRisk calls per second during the load (0 = none).
        #[arg(long, default_value_t = 1_000)]
        risk_rate: u32,
        /// ListRiskyTokens calls (limit 20) after the load, one after another (0 = none).
        #[arg(long, default_value_t = 0)]
        list_calls: u32,
        /// Random seed of the generated traffic.
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Event time the load spans in seconds, ending now (0 = one event per token per
        /// second on average); a long span lets windows close while tokens come and go.
        #[arg(long, default_value_t = 0)]
        span_secs: u64,
    },
    /// Train and score the bundled sample in data/, print the riskiest tokens and the
    /// evaluation summary.
    Demo {
        /// Directory of the sample (events.parquet, tokens.csv, incidents.csv).
        #[arg(long, default_value = "data")]
        data: PathBuf,
        /// Also write window scores here.
        #[arg(long)]
        scores_out: Option<PathBuf>,
    },
}

/// Log line format of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Flags of `serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free port, printed at start).
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: String,
    /// Directory of the server's durable state (created if missing).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Token registry file (scopes, environments, validity).
    #[arg(long)]
    pub tokens: Option<PathBuf>,
    /// Model parameters and server limits overriding models/default.toml.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// API keys: one `ROLE KEY` per line, roles ingest, read, admin; `#` comments.
    #[arg(long, env = "TOKENWATCH_KEYS_FILE")]
    pub keys: Option<PathBuf>,
    /// Serve without authentication (anyone may do anything). For local experiments only.
    #[arg(long, conflicts_with = "keys")]
    pub insecure_no_auth: bool,
    /// TLS certificate chain (PEM); with --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM); with --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Log line format (level from RUST_LOG, default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// On shutdown, how long in-flight requests may take to finish.
    #[arg(long, default_value = "30s")]
    pub shutdown_grace: Duration,
    /// Alert policies (default: models/policies.toml as built in).
    #[arg(long)]
    pub policies: Option<PathBuf>,
    /// Shadow mode: enforce-mode policies record the revocations they would make, and
    /// make none.
    #[arg(long)]
    pub dry_run: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464). With
    /// `--keys`, a scrape needs a bearer key of any role.
    #[arg(long)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Serve /metrics without a key even when the API has keys.
    #[arg(long)]
    pub metrics_public: bool,
    /// Serve the web console here too (e.g. 127.0.0.1:8080): pages for the people who answer
    /// the alerts, with a login by API key (read or admin); over TLS when --tls-cert is given.
    #[arg(long, env = "TOKENWATCH_HTTP")]
    pub http: Option<String>,
    /// Run as a node of a cluster on NATS JetStream (e.g. nats://127.0.0.1:4222) instead of
    /// the embedded engine and its local log: events go to the stream, partitions are owned
    /// through leases, state is snapshotted to the object store.
    #[arg(long, env = "TOKENWATCH_CLUSTER")]
    pub cluster: Option<String>,
    /// This node's id in the cluster (default: host name and process id).
    #[arg(long, env = "TOKENWATCH_NODE_ID", requires = "cluster")]
    pub node_id: Option<String>,
    /// Partitions of the cluster, fixed when its stream is created (every node must agree).
    #[arg(long, default_value_t = 12, requires = "cluster")]
    pub partitions: u32,
    /// How often each owned partition writes its snapshot to the object store.
    #[arg(long, default_value = "30s", requires = "cluster")]
    pub cluster_snapshot_every: Duration,
    /// How often each owned partition writes the events it applied to the Parquet history
    /// (object store `tokenwatch_history`; also before every snapshot).
    #[arg(long, default_value = "10s", requires = "cluster")]
    pub cluster_history_every: Duration,
    /// How long the cluster's streams keep events, scores and alerts.
    #[arg(long, default_value = "7d", requires = "cluster")]
    pub cluster_retention: Duration,
}

/// Flags shared by `eval` and `replay`.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// Events file (.csv, .jsonl, optionally .gz, or .parquet).
    #[arg(long)]
    pub events: PathBuf,
    /// Token registry file.
    #[arg(long)]
    pub tokens: Option<PathBuf>,
    /// Model parameters overriding models/default.toml.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Window size (e.g. 1m, 5m); overrides the config.
    #[arg(long)]
    pub window: Option<Duration>,
    /// Window scores output (.csv or .parquet).
    #[arg(long)]
    pub scores_out: Option<PathBuf>,
    /// What to do with rows that break the input contract.
    #[arg(long, value_enum, default_value_t = BadRowPolicy::Skip)]
    pub on_bad_row: BadRowPolicy,
    /// Number of shards (threads); 0 = one per core. Overrides the config.
    #[arg(long)]
    pub shards: Option<usize>,
    /// Start from this model snapshot (DATA_DIR/snapshots/*.parquet) instead of untrained
    /// models.
    #[arg(long)]
    pub snapshot: Option<PathBuf>,
}

/// Output of `tokenwatch scopes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ScopesFormat {
    /// Aligned text.
    Table,
    /// One row per token.
    Csv,
    /// The whole report.
    Json,
}
