//! Validated configuration: the embedded `models/default.toml`, then an optional file, then
//! environment overrides. Passed explicitly to whoever needs it; there is no global.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::signal::SignalKind;

/// The defaults shipped with the binary, documented in place.
pub const DEFAULT_TOML: &str = include_str!("../models/default.toml");

/// Errors while loading or validating configuration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("config {path}: {source}")]
    Io {
        /// File that failed.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// TOML syntax or an unknown / mistyped key.
    #[error("config {origin}: {message}")]
    Parse {
        /// Where the text came from.
        origin: String,
        /// What the parser said.
        message: String,
    },
    /// A value that parses but makes no sense.
    #[error("config: {key}: {reason}")]
    Invalid {
        /// Dotted key.
        key: String,
        /// Why it is refused.
        reason: String,
    },
}

/// Whole configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Config {
    /// Windowing.
    pub window: WindowConfig,
    /// Engine layout and refits.
    pub engine: EngineConfig,
    /// Risk combination.
    pub score: ScoreConfig,
    /// Per-signal weights.
    pub weights: Weights,
    /// Rate model.
    pub rate: RateConfig,
    /// Novelty (network, endpoints).
    pub novelty: NoveltyConfig,
    /// Hour-of-week profile.
    pub seasonal: SeasonalConfig,
    /// Error, bytes, latency baselines.
    pub telemetry: TelemetryConfig,
    /// Peer groups.
    pub peers: PeersConfig,
    /// Isolation model.
    pub isolation: IsolationConfig,
    /// Registry checks.
    pub registry: RegistryConfig,
    /// The gRPC service's limits.
    pub server: ServerConfig,
    /// Durability and history.
    pub store: StoreConfig,
    /// Alert actions.
    pub respond: RespondConfig,
    /// What operator verdicts do.
    pub feedback: FeedbackConfig,
    /// The web console (`serve --http`).
    pub console: ConsoleConfig,
}

/// `[feedback]`: effects of operator verdicts on a token's models.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct FeedbackConfig {
    /// False alarms on the same signal of a token before that signal is damped for it.
    pub damp_after: u8,
    /// Evidence of a damped signal is multiplied by this.
    pub damp_factor: f64,
    /// How long (event time) a damping lasts.
    pub damp_for: Duration,
    /// After a confirmed incident, for this long only calm windows of the token (risk below
    /// `hold-learn-below`) are learned.
    pub hold_for: Duration,
    /// Risk under which a window is still learned during a hold.
    pub hold_learn_below: f64,
    /// Quarantined windows are kept this long (event time) so that a false-positive verdict
    /// can still teach them to the models.
    pub keep_quarantined: Duration,
}

/// `[respond]`: how webhooks and revocations are delivered.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RespondConfig {
    /// Time limit of one HTTP attempt.
    pub timeout: Duration,
    /// Attempts after the first before a call is dead-lettered.
    pub retries: u32,
    /// Wait before the first retry; doubled for each next one.
    pub backoff: Duration,
    /// Actions waiting to be delivered; beyond it they are dead-lettered at once.
    pub queue: usize,
    /// PEM file of the CA certificates https:// actions trust (default: the system's bundle).
    #[serde(default)]
    pub ca_file: Option<String>,
}

/// `[store]`: the data directory of `tokenwatch serve`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct StoreConfig {
    /// fsync the write-ahead log before acknowledging (off: faster, a machine crash may
    /// lose acknowledged events; a process crash still does not).
    pub fsync: bool,
    /// A log segment is sealed and compacted into Parquet history past this size.
    pub segment_bytes: u64,
    /// Model snapshot interval (processing time).
    pub snapshot_every: Duration,
    /// History kept, in event time behind the newest event; "0" keeps everything.
    pub retention: Duration,
}

/// `[server]`: limits and clocks of `tokenwatch serve`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ServerConfig {
    /// An event stamped more than this ahead of the wall clock is rejected.
    pub max_future_skew: Duration,
    /// With no event arriving for this long (processing time), event time is taken to go
    /// on with the wall clock so that the open windows of idle tokens close.
    pub idle_close: Duration,
    /// Batches queued towards the engine before ingest streams wait (backpressure).
    pub queue_batches: usize,
    /// Largest gRPC message accepted, in bytes.
    pub max_message_bytes: usize,
    /// Ingest streams open at once; more get RESOURCE_EXHAUSTED.
    pub max_ingest_streams: usize,
    /// Alerts buffered per WatchAlerts subscriber before it is told it lagged.
    pub alert_buffer: usize,
    /// Event errors listed in one IngestResponse (the rest are only counted).
    pub max_listed_errors: usize,
    /// An Ingest stream with no message for this long is ended (DEADLINE_EXCEEDED).
    pub stream_idle_timeout: Duration,
    /// Most recent (token_id, event_id) pairs remembered to drop resent events (0: off).
    pub dedup_ids: usize,
}

/// `[console]`: the web console of `tokenwatch serve --http`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ConsoleConfig {
    /// Windows kept for the risk timelines, all tokens together (0: no timelines).
    pub timeline_windows: usize,
    /// How far back one token's timeline goes (event time).
    pub timeline_span: Duration,
    /// A console session ends this long after its login.
    pub session_ttl: Duration,
    /// Sessions open at once; a new login past it ends the oldest.
    pub max_sessions: usize,
    /// A least-privilege report is made again once it is this old.
    pub scope_report_max_age: Duration,
    /// Days of history the least-privilege page looks at by default.
    pub scope_days: u32,
    /// A connection must send a request's head (and finish a TLS handshake) within this.
    pub header_timeout: Duration,
}

/// `[window]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct WindowConfig {
    /// Window length.
    pub size: Duration,
    /// Allowed lateness behind the newest event.
    pub lateness: Duration,
}

/// `[engine]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct EngineConfig {
    /// Shard count, 0 = one per core.
    pub shards: usize,
    /// Interval of global refits in event time.
    pub refit_every: Duration,
    /// Event time before the first global fit.
    pub warmup: Duration,
    /// Tokens tracked in memory at most (0: as many as `memory-budget` allows); the
    /// idle-longest are evicted to the on-disk spill and loaded back when they return.
    pub max_tokens: u64,
    /// Memory for tracked tokens (model state, open windows, the latest score, the maps
    /// that find them), as bytes or `"512MiB"`, `"8GiB"`.
    pub memory_budget: Bytes,
    /// Free disk space on the spill's filesystem below which nothing more is evicted
    /// (new tokens past the budget are then untracked): a flood must not fill the disk.
    pub spill_min_free: Bytes,
}

impl EngineConfig {
    /// Tokens tracked in memory at most, from `max-tokens` and `memory-budget`.
    pub fn token_budget(&self) -> u64 {
        let by_memory = (self.memory_budget.0 / BYTES_PER_TRACKED_TOKEN).max(1);
        match self.max_tokens {
            0 => by_memory,
            n => n.min(by_memory),
        }
    }
}

/// Memory one tracked token costs the server, measured (BENCHMARKS.md, "Memory against
/// distinct tokens"): model state, slot, id map, open windows, latest score on the board and
/// its index (about 2 KB without churn, 3 KB with tokens evicted and reloaded all the time),
/// and the copy a snapshot makes while it is written: 4.4 KB at the peak measured.
pub const BYTES_PER_TRACKED_TOKEN: u64 = 4_608;

/// A size written as a number of bytes or `"64KiB"`, `"512MiB"`, `"8GiB"` (also kB, MB, GB).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bytes(pub u64);

impl Bytes {
    /// Parse `"8GiB"` and friends.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (num, unit) = number_and_unit(s);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a size like 65536, 512MiB, 8GiB"))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "kB" | "KB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            u => return Err(format!("{s:?}: unknown unit {u:?} (use B, KiB, MiB, GiB)")),
        };
        n.checked_mul(mult)
            .map(Bytes)
            .ok_or_else(|| format!("{s:?} is too large"))
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Bytes(n)),
            Raw::S(s) => Bytes::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

/// `[score]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ScoreConfig {
    /// Prior incident probability per window.
    pub prior: f64,
    /// Tail probability above which a signal is silent.
    pub quiet_p: f64,
    /// Cap of one signal's evidence in nats.
    pub max_evidence: f64,
    /// Alert threshold on risk.
    pub alert_risk: f64,
    /// Windows at or above this risk are not learned.
    pub learn_max_risk: f64,
    /// A token younger than this learns every window (its first days are its baseline).
    pub learn_all_for: Duration,
    /// After a window of a token alerts, for this long only its calm windows (below
    /// `feedback.hold-learn-below`) are learned; every alerting window extends it.
    pub alert_hold: Duration,
    /// A move (a new place with the old one absent) lasting this long is learned as the
    /// token's new place.
    pub adopt_move_after: Duration,
    /// A new country is a move (not an addition) only if the token's known place went quiet
    /// at least this long before it.
    pub min_travel_gap: Duration,
    /// A new place used beside the usual one (an addition: sharing, a leak) weighs three
    /// times its first window's novelty evidence after this long, then `3 + ln(t / ramp)`
    /// times.
    pub addition_ramp: Duration,
    /// Half-life, in windows, of a token's own distribution of surprise (what its ordinary
    /// windows look like), against which each window's statistical evidence is calibrated.
    pub calibration_windows: f64,
}

/// `[weights]`: one weight per signal, named as the signal.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct Weights {
    pub rate: f64,
    pub seasonal: f64,
    pub new_country: f64,
    pub new_asn: f64,
    pub new_prefix: f64,
    pub new_user_agent: f64,
    pub concurrent_networks: f64,
    pub new_endpoint: f64,
    pub endpoint_rarity: f64,
    pub auth_errors: f64,
    pub rate_limited: f64,
    pub server_errors: f64,
    pub client_errors: f64,
    pub bytes_out: f64,
    pub latency: f64,
    pub endpoint_mix: f64,
    pub peer_distance: f64,
    pub isolation: f64,
    pub scope_violation: f64,
    pub env_mismatch: f64,
    pub token_validity: f64,
}

impl Weights {
    /// Weight of one signal.
    pub fn get(&self, s: SignalKind) -> f64 {
        use SignalKind::*;
        match s {
            Rate => self.rate,
            Seasonal => self.seasonal,
            NewCountry => self.new_country,
            NewAsn => self.new_asn,
            NewPrefix => self.new_prefix,
            NewUserAgent => self.new_user_agent,
            ConcurrentNetworks => self.concurrent_networks,
            NewEndpoint => self.new_endpoint,
            EndpointRarity => self.endpoint_rarity,
            AuthErrors => self.auth_errors,
            RateLimited => self.rate_limited,
            ServerErrors => self.server_errors,
            ClientErrors => self.client_errors,
            BytesOut => self.bytes_out,
            Latency => self.latency,
            EndpointMix => self.endpoint_mix,
            PeerDistance => self.peer_distance,
            Isolation => self.isolation,
            ScopeViolation => self.scope_violation,
            EnvMismatch => self.env_mismatch,
            TokenValidity => self.token_validity,
        }
    }
}

/// `[rate]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RateConfig {
    /// Short EWMA half-life in active windows.
    pub short_half_life: f64,
    /// Long EWMA half-life in active windows.
    pub long_half_life: f64,
    /// Floor of the expected count.
    pub min_expected: f64,
    /// Windows before the own baseline is fully trusted.
    pub warmup_windows: f64,
    /// Half-life of the hour-of-day and weekday factors (event time).
    pub season_half_life: Duration,
    /// A count that stays on one side of the baseline this long becomes the new baseline.
    pub adopt_after: Duration,
    /// Drops (and silence) are scored only where at least this many calls were expected.
    pub min_drop_expected: f64,
    /// Evidence of a drop relative to a rise of the same tail probability.
    pub drop_weight: f64,
}

/// `[novelty]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct NoveltyConfig {
    /// Beta prior pseudo-count of novel windows.
    pub prior_novel: f64,
    /// Beta prior pseudo-count of windows without novelty.
    pub prior_seen: f64,
    /// Windows of history before novelty speaks.
    pub min_windows: f64,
    /// Half-life of the evidence of rare endpoints taken up (slow exploration).
    pub explore_half_life: Duration,
}

/// `[seasonal]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SeasonalConfig {
    /// Shrinkage of hour-of-week toward hour-of-day.
    pub shrink_hour_of_week: f64,
    /// Shrinkage of hour-of-day toward overall.
    pub shrink_hour_of_day: f64,
    /// Days of history before the signal speaks.
    pub min_days: f64,
}

/// `[telemetry]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Floor of error fractions.
    pub min_error_rate: f64,
    /// Half-life in active windows.
    pub half_life: f64,
    /// Floor of log-scale standard deviations.
    pub min_log_sd: f64,
}

/// `[peers]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PeersConfig {
    /// k of k-means.
    pub groups: usize,
    /// Windows of history to take part.
    pub min_windows: f64,
}

/// `[isolation]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct IsolationConfig {
    /// Number of trees.
    pub trees: usize,
    /// Sub-sample per tree.
    pub sample_size: usize,
    /// Reservoir of training windows.
    pub reservoir: usize,
    /// Seed.
    pub seed: u64,
}

/// `[registry]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RegistryConfig {
    /// Tail probability of a registry violation.
    pub error_p: f64,
    /// Out-of-scope calls in one window that are a violation at once, even if refused.
    pub scope_burst: u32,
    /// Half-life of the accumulated evidence of stray refused out-of-scope windows.
    pub stray_half_life: Duration,
}

/// `"512MiB"` -> (`"512"`, `"MiB"`): the leading digits and the rest.
fn number_and_unit(s: &str) -> (&str, &str) {
    s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()))
}

/// A duration written as `"90s"`, `"1m"`, `"2h"`, `"3d"` (or a bare number of seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Duration {
    /// Milliseconds.
    pub ms: i64,
}

impl Duration {
    /// Parse `"5m"` and friends.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (num, unit) = number_and_unit(s);
        let n: i64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a duration like 30s, 1m, 2h, 3d"))?;
        let mult = match unit {
            "" | "s" => 1_000,
            "ms" => 1,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m, h, d)")),
        };
        n.checked_mul(mult)
            .map(|ms| Duration { ms })
            .ok_or_else(|| format!("{s:?} is too long"))
    }
}

impl std::str::FromStr for Duration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Duration::parse(s)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Duration::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl Default for Config {
    fn default() -> Self {
        // The embedded defaults are checked by a unit test; failing here is a build defect.
        Config::from_toml_str(DEFAULT_TOML, "embedded defaults").expect("embedded defaults")
    }
}

impl Config {
    /// Defaults overlaid with the file (if any), then the environment, then validated.
    pub fn load(path: Option<&Path>) -> Result<Self, Error> {
        let mut value: toml::Table = toml::from_str(DEFAULT_TOML).map_err(|e| Error::Parse {
            origin: "embedded defaults".into(),
            message: e.to_string(),
        })?;
        if let Some(path) = path {
            let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
                path: path.to_path_buf(),
                source,
            })?;
            let over: toml::Table = toml::from_str(&text).map_err(|e| Error::Parse {
                origin: path.display().to_string(),
                message: e.to_string(),
            })?;
            merge(&mut value, over);
        }
        // TOKENWATCH_WINDOW_SIZE=5m style overrides for the few knobs people reach for.
        for (env, section, key) in [
            ("TOKENWATCH_WINDOW_SIZE", "window", "size"),
            ("TOKENWATCH_WINDOW_LATENESS", "window", "lateness"),
            ("TOKENWATCH_SHARDS", "engine", "shards"),
            ("TOKENWATCH_ALERT_RISK", "score", "alert-risk"),
        ] {
            if let Ok(v) = std::env::var(env) {
                let parsed: toml::Value = v
                    .parse::<i64>()
                    .map(toml::Value::Integer)
                    .or_else(|_| v.parse::<f64>().map(toml::Value::Float))
                    .unwrap_or(toml::Value::String(v.clone()));
                if let Some(toml::Value::Table(t)) = value.get_mut(section) {
                    t.insert(key.into(), parsed);
                }
            }
        }
        let origin = path
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "defaults".into());
        let cfg: Config = toml::Value::Table(value)
            .try_into()
            .map_err(|e: toml::de::Error| Error::Parse {
                origin,
                message: e.to_string(),
            })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parse a complete TOML document (no layering) and validate it.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self, Error> {
        let cfg: Config = toml::from_str(text).map_err(|e| Error::Parse {
            origin: origin.into(),
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Window size override from the command line.
    pub fn with_window(mut self, size: Option<Duration>) -> Result<Self, Error> {
        if let Some(size) = size {
            self.window.size = size;
            self.validate()?;
        }
        Ok(self)
    }

    fn validate(&self) -> Result<(), Error> {
        let bad = |key: &str, reason: &str| {
            Err(Error::Invalid {
                key: key.into(),
                reason: reason.into(),
            })
        };
        let w = self.window.size.ms;
        if !(1_000..=86_400_000).contains(&w) {
            return bad("window.size", "must be between 1s and 1d");
        }
        if 3_600_000 % w != 0 && w % 3_600_000 != 0 {
            return bad(
                "window.size",
                "must divide an hour (or be whole hours) so windows align with the hour-of-week profile",
            );
        }
        if self.window.lateness.ms < 0 {
            return bad("window.lateness", "must not be negative");
        }
        if !(self.score.prior > 0.0 && self.score.prior < 1.0) {
            return bad("score.prior", "must be in (0, 1)");
        }
        if !(self.score.quiet_p > 0.0 && self.score.quiet_p <= 1.0) {
            return bad("score.quiet-p", "must be in (0, 1]");
        }
        if !(0.0..=100.0).contains(&self.score.alert_risk) {
            return bad("score.alert-risk", "must be in 0..=100");
        }
        if !(0.0..=100.0).contains(&self.score.learn_max_risk) {
            return bad("score.learn-max-risk", "must be in 0..=100");
        }
        if self.score.calibration_windows.is_nan() || self.score.calibration_windows < 1.0 {
            return bad("score.calibration-windows", "must be >= 1");
        }
        for s in SignalKind::ALL {
            let v = self.weights.get(s);
            if !(0.0..=10.0).contains(&v) {
                return bad(&format!("weights.{}", s.name()), "must be in 0..=10");
            }
        }
        if self.rate.short_half_life <= 0.0 || self.rate.long_half_life <= 0.0 {
            return bad("rate", "half-lives must be positive");
        }
        if self.rate.season_half_life.ms <= 0 || self.rate.adopt_after.ms <= 0 {
            return bad("rate", "season-half-life and adopt-after must be positive");
        }
        if !(0.0..=1.0).contains(&self.rate.drop_weight)
            || self.rate.min_drop_expected.is_nan()
            || self.rate.min_drop_expected < 1.0
        {
            return bad(
                "rate",
                "drop-weight must be in 0..=1, min-drop-expected >= 1",
            );
        }
        if self.telemetry.half_life <= 0.0 {
            return bad("telemetry.half-life", "must be positive");
        }
        if self.isolation.trees == 0 || self.isolation.sample_size < 2 {
            return bad("isolation", "need at least one tree and a sample of 2");
        }
        if self.peers.groups == 0 {
            return bad("peers.groups", "must be at least 1");
        }
        if self.server.queue_batches == 0 || self.server.alert_buffer == 0 {
            return bad(
                "server",
                "queue-batches and alert-buffer must be at least 1",
            );
        }
        if self.server.max_ingest_streams == 0 || self.server.max_message_bytes < 1024 {
            return bad(
                "server",
                "max-ingest-streams must be at least 1 and max-message-bytes at least 1024",
            );
        }
        if self.console.session_ttl.ms <= 0
            || self.console.max_sessions == 0
            || self.console.header_timeout.ms <= 0
        {
            return bad(
                "console",
                "session-ttl and header-timeout must be positive and max-sessions at least 1",
            );
        }
        if self.console.timeline_span.ms < 0 || self.console.scope_days == 0 {
            return bad(
                "console",
                "timeline-span must not be negative and scope-days at least 1",
            );
        }
        if self.server.stream_idle_timeout.ms <= 0 {
            return bad("server.stream-idle-timeout", "must be positive");
        }
        if self.server.max_future_skew.ms < 0 || self.server.idle_close.ms <= 0 {
            return bad(
                "server",
                "max-future-skew must not be negative and idle-close must be positive",
            );
        }
        if !(0.0..=1.0).contains(&self.feedback.damp_factor) || self.feedback.damp_after == 0 {
            return bad(
                "feedback",
                "damp-factor must be in 0..=1 and damp-after at least 1",
            );
        }
        if self.engine.refit_every.ms <= 0 {
            return bad("engine.refit-every", "must be positive");
        }
        Ok(())
    }

    /// Number of shards to run.
    pub fn shard_count(&self) -> usize {
        if self.engine.shards == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .min(64)
        } else {
            self.engine.shards.min(256)
        }
    }
}

fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_defaults_parse() {
        let c = Config::load(None).unwrap();
        assert_eq!(c.window.size.ms, 60_000);
        assert_eq!(c.window.lateness.ms, 300_000);
    }

    #[test]
    fn durations() {
        assert_eq!(Duration::parse("5m").unwrap().ms, 300_000);
        assert_eq!(Duration::parse("2d").unwrap().ms, 172_800_000);
        assert_eq!(Duration::parse("90").unwrap().ms, 90_000);
        assert!(Duration::parse("5x").is_err());
        assert!(Duration::parse("m").is_err());
    }

    #[test]
    fn file_overrides_and_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "[window]\nsize = \"5m\"\n").unwrap();
        let c = Config::load(Some(&p)).unwrap();
        assert_eq!(c.window.size.ms, 300_000);
        assert_eq!(c.score.alert_risk, Config::default().score.alert_risk);
        std::fs::write(&p, "[window]\nsise = \"5m\"\n").unwrap();
        let e = Config::load(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("sise"), "{e}");
        std::fs::write(&p, "[window]\nsize = \"7m\"\n").unwrap();
        assert!(Config::load(Some(&p)).is_err());
    }
}
