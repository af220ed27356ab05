//! `tokenwatch loadgen`: a gRPC client that streams generated events into a running server
//! over several streams while it calls GetTokenRisk at a steady rate, and reports accepted
//! events per second and GetTokenRisk latency percentiles. Events are built before the
//! clock starts, so the measurement is the server (and the wire), not the generator.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

use crate::server::pb;

/// Load to generate.
#[derive(Debug, Clone)]
pub struct Options {
    /// `host:port` or a full `http://` URL.
    pub target: String,
    /// Events in all.
    pub events: u64,
    /// Events per IngestRequest.
    pub batch: usize,
    /// Parallel Ingest streams (one connection each).
    pub streams: usize,
    /// Distinct tokens.
    pub tokens: usize,
    /// Bearer key (role ingest and read, or admin).
    pub key: Option<String>,
    /// GetTokenRisk calls per second while ingesting.
    pub risk_rate: u32,
    /// ListRiskyTokens calls after ingesting, one after another.
    pub list_calls: u32,
    /// Seed of the generated traffic.
    pub seed: u64,
    /// Event time the load spans, in seconds, ending now (0: one event per token per
    /// second on average). A long span lets windows close while tokens come and go.
    pub span_secs: u64,
}

/// What a load run measured.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Events sent.
    pub sent: u64,
    /// Events the server accepted.
    pub accepted: u64,
    /// Events the server rejected.
    pub rejected: u64,
    /// Accepted events that were behind the server's watermark (not scored).
    pub late: u64,
    /// Wall time from the first send to the last Ingest response (all applied).
    pub elapsed: Duration,
    /// GetTokenRisk calls answered (OK or NOT_FOUND).
    pub risk_calls: u64,
    /// GetTokenRisk calls that failed otherwise.
    pub risk_errors: u64,
    /// GetTokenRisk latency percentiles p50, p99, p99.9, max.
    pub latency: [Duration; 4],
    /// ListRiskyTokens calls made after the load.
    pub list_calls: u64,
    /// The server's counters after the load (GetStats), if it answered.
    pub stats: Option<pb::StatsResponse>,
    /// Cluster mode: wall time from the first send until the partitions had applied every
    /// accepted event (`None`: embedded mode, where an ack means applied).
    pub applied: Option<Duration>,
    /// ListRiskyTokens latency percentiles p50, p99, p99.9, max.
    pub list_latency: [Duration; 4],
}

impl Report {
    /// Accepted and scored (not late) events per second.
    pub fn rate(&self) -> f64 {
        (self.accepted - self.late.min(self.accepted)) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Human-readable summary.
    pub fn render(&self) -> String {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        format!(
            "sent {} events: {} accepted ({} late), {} rejected in {:.2} s = {:.0} events/s accepted and scored\n\
             GetTokenRisk: {} calls ({} errors), latency p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms\n",
            self.sent,
            self.accepted,
            self.late,
            self.rejected,
            self.elapsed.as_secs_f64(),
            self.rate(),
            self.risk_calls,
            self.risk_errors,
            ms(self.latency[0]),
            ms(self.latency[1]),
            ms(self.latency[2]),
            ms(self.latency[3]),
        )
    }

    /// The cluster line: when every accepted event was applied.
    pub fn render_applied(&self) -> String {
        match self.applied {
            Some(d) => format!(
                "cluster: every event accepted since the start applied by its partition's owner after {:.2} s ({} events through this client: {:.0} events/s)\n",
                d.as_secs_f64(),
                self.accepted,
                self.accepted as f64 / d.as_secs_f64().max(1e-9)
            ),
            None => String::new(),
        }
    }

    /// The ListRiskyTokens line, if any were called.
    pub fn render_list(&self) -> String {
        if self.list_calls == 0 {
            return String::new();
        }
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        format!(
            "ListRiskyTokens: {} calls, latency p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms\n",
            self.list_calls,
            ms(self.list_latency[0]),
            ms(self.list_latency[1]),
            ms(self.list_latency[2]),
            ms(self.list_latency[3])
        )
    }
}

/// Errors of the load generator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad target address or key.
    #[error("{0}")]
    Invalid(String),
    /// Could not connect.
    #[error("connecting to {target}: {source}")]
    Connect {
        /// Address.
        target: String,
        /// Cause.
        source: tonic::transport::Error,
    },
    /// An RPC failed.
    #[error("{rpc}: {status}")]
    Rpc {
        /// Which call.
        rpc: &'static str,
        /// Status.
        status: tonic::Status,
    },
}

struct Profile {
    id: String,
    country: &'static str,
    asn: u32,
    net: [u8; 3],
    agent: String,
    endpoints: [usize; 4],
}

const COUNTRIES: [&str; 8] = ["US", "DE", "FR", "GB", "JP", "BR", "IN", "CA"];
const ENDPOINTS: [(&str, &str); 12] = [
    ("GET", "/v1/orders"),
    ("GET", "/v1/orders/{id}"),
    ("POST", "/v1/orders"),
    ("GET", "/v1/customers/{id}"),
    ("GET", "/v1/invoices"),
    ("GET", "/v1/products"),
    ("PUT", "/v1/products/{id}"),
    ("GET", "/v1/reports/daily"),
    ("POST", "/v1/payments"),
    ("GET", "/v1/payments/{id}"),
    ("DELETE", "/v1/sessions/{id}"),
    ("GET", "/v1/health"),
];

/// Build the request pool: `streams` lists of IngestRequests, event times evenly spread
/// over the recent past (one event per token per second of event time on average) and
/// ending a second before now, so that none is in the future.
fn build(opts: &Options, now_ms: i64) -> (Vec<Vec<pb::IngestRequest>>, Vec<String>) {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(opts.seed);
    let tokens: Vec<Profile> = (0..opts.tokens.max(1))
        .map(|i| Profile {
            id: format!("lg-{i:06}"),
            country: COUNTRIES[rng.gen_range(0..COUNTRIES.len())],
            asn: rng.gen_range(1_000..65_000),
            net: [rng.gen_range(1..224), rng.gen(), rng.gen()],
            agent: format!("client/{}.{}", rng.gen_range(1..5), rng.gen_range(0..20)),
            endpoints: std::array::from_fn(|_| rng.gen_range(0..ENDPOINTS.len())),
        })
        .collect();
    let n = opts.events;
    let span_ms = if opts.span_secs > 0 {
        opts.span_secs as f64 * 1000.0
    } else {
        (n as f64 * 1000.0 / tokens.len() as f64).max(1.0)
    };
    let start = now_ms - 1_000 - span_ms as i64;
    let streams = opts.streams.max(1);
    let batch = opts.batch.max(1);
    let mut out: Vec<Vec<pb::IngestRequest>> = (0..streams).map(|_| Vec::new()).collect();
    let mut current: Vec<Vec<pb::Event>> =
        (0..streams).map(|_| Vec::with_capacity(batch)).collect();
    for i in 0..n {
        let t = &tokens[rng.gen_range(0..tokens.len())];
        let (method, endpoint) = ENDPOINTS[t.endpoints[rng.gen_range(0..4)]];
        let s = (i % streams as u64) as usize;
        current[s].push(pb::Event {
            ts_ms: start + (i as f64 * span_ms / n as f64) as i64,
            token_id: t.id.clone(),
            method: method.into(),
            endpoint: endpoint.into(),
            status: if rng.gen_bool(0.97) { 200 } else { 404 },
            bytes_out: rng.gen_range(200..20_000),
            latency_ms: Some(rng.gen_range(5.0..120.0)),
            src_ip: format!(
                "{}.{}.{}.{}",
                t.net[0],
                t.net[1],
                t.net[2],
                rng.gen_range(1..255)
            ),
            country: t.country.into(),
            asn: Some(t.asn),
            user_agent: t.agent.clone(),
            scope: String::new(),
            env: "prod".into(),
            event_id: String::new(),
        });
        if current[s].len() == batch {
            let events = std::mem::replace(&mut current[s], Vec::with_capacity(batch));
            out[s].push(pb::IngestRequest { events });
        }
    }
    for (s, rest) in current.into_iter().enumerate() {
        if !rest.is_empty() {
            out[s].push(pb::IngestRequest { events: rest });
        }
    }
    (out, tokens.into_iter().map(|t| t.id).collect())
}

fn endpoint(target: &str) -> Result<Endpoint, Error> {
    let url = if target.contains("://") {
        target.to_string()
    } else {
        format!("http://{target}")
    };
    Endpoint::from_shared(url).map_err(|e| Error::Invalid(format!("--target {target}: {e}")))
}

/// A generated client with the bearer key interceptor.
pub type Client = pb::token_watch_client::TokenWatchClient<
    tonic::service::interceptor::InterceptedService<Channel, Bearer>,
>;

/// Adds `authorization: Bearer KEY` to every call.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<tonic::metadata::Ascii>>);

impl Bearer {
    /// From a key (none: calls go without).
    pub fn new(key: Option<&str>) -> Result<Self, String> {
        key.map(|k| {
            format!("Bearer {k}")
                .parse()
                .map_err(|_| "the key must be printable ASCII".to_string())
        })
        .transpose()
        .map(Bearer)
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

async fn connect(opts: &Options) -> Result<Client, Error> {
    client(&opts.target, opts.key.as_deref()).await
}

/// A client of the service at `target` that sends `key`.
pub async fn client(target: &str, key: Option<&str>) -> Result<Client, Error> {
    let ch = endpoint(target)?
        .connect()
        .await
        .map_err(|source| Error::Connect {
            target: target.to_string(),
            source,
        })?;
    let bearer = Bearer::new(key).map_err(Error::Invalid)?;
    Ok(
        pb::token_watch_client::TokenWatchClient::with_interceptor(ch, bearer)
            .max_encoding_message_size(64 << 20)
            .max_decoding_message_size(64 << 20),
    )
}

/// GetTokenRisk at `risk_rate` per second until `stop`; latencies of answered calls.
async fn read_loop(
    opts: &Options,
    tokens: Vec<String>,
    stop: &AtomicBool,
) -> Result<(Vec<Duration>, u64), Error> {
    let mut lat = Vec::new();
    let mut errors = 0u64;
    if opts.risk_rate == 0 {
        return Ok((lat, errors));
    }
    let mut reader = connect(opts).await?;
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(opts.seed ^ 0x5eed);
    let mut every = tokio::time::interval(Duration::from_secs_f64(1.0 / opts.risk_rate as f64));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.load(Ordering::Relaxed) {
        every.tick().await;
        let token_id = tokens[rng.gen_range(0..tokens.len())].clone();
        let t0 = Instant::now();
        let r = reader
            .get_token_risk(pb::GetTokenRiskRequest { token_id })
            .await;
        let dt = t0.elapsed();
        match r {
            Ok(_) => lat.push(dt),
            Err(s) if s.code() == tonic::Code::NotFound => lat.push(dt),
            Err(_) => errors += 1,
        }
    }
    Ok((lat, errors))
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// The runtime that sends the load: its workers run at a lower priority than the reader
/// thread, so that measured read latency is the server's and the wire's, not the time the
/// reader waited behind this process's own encoding.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(|| crate::sys::lower_thread_priority(SENDER_NICE))
        .build()
}

const SENDER_NICE: i32 = 10;

/// Run the load and measure (on [`runtime`]).
pub async fn run(opts: &Options) -> Result<Report, Error> {
    let now_ms = chrono::Utc::now().timestamp_millis();
    let (pool, tokens) = build(opts, now_ms);
    let mut clients = Vec::with_capacity(pool.len());
    for _ in 0..pool.len() {
        clients.push(connect(opts).await?);
    }
    let sent: u64 = pool.iter().flatten().map(|r| r.events.len() as u64).sum();
    // Events the server had applied before: in cluster mode, applying lags acknowledging.
    let before = match clients[0].get_stats(pb::GetStatsRequest {}).await {
        Ok(r) => {
            let r = r.into_inner();
            (
                r.events + r.late_events + r.untracked_events,
                r.accepted_events,
            )
        }
        Err(_) => (0, 0),
    };
    // The reader runs on its own thread and runtime: its latencies must not include
    // waiting behind this process's own ingest encoding.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (opts, stop) = (opts.clone(), stop.clone());
        std::thread::spawn(move || -> Result<(Vec<Duration>, u64), Error> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| Error::Invalid(format!("reader runtime: {e}")))?;
            rt.block_on(read_loop(&opts, tokens, &stop))
        })
    };
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for (mut client, requests) in clients.into_iter().zip(pool) {
        tasks.push(tokio::spawn(async move {
            client
                .ingest(tokio_stream::iter(requests))
                .await
                .map(|r| r.into_inner())
        }));
    }
    let mut report = Report {
        sent,
        ..Default::default()
    };
    let mut first_err = None;
    for t in tasks {
        match t.await {
            Ok(Ok(r)) => {
                report.accepted += r.accepted;
                report.rejected += r.rejected;
                report.late += r.late;
            }
            Ok(Err(status)) => {
                first_err.get_or_insert(Error::Rpc {
                    rpc: "Ingest",
                    status,
                });
            }
            Err(e) => {
                first_err.get_or_insert(Error::Invalid(format!("ingest task: {e}")));
            }
        }
    }
    report.elapsed = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    let read = reader
        .join()
        .map_err(|_| Error::Invalid("reader thread panicked".into()))?;
    if let Some(e) = first_err {
        return Err(e);
    }
    let (mut lat, errors) = read?;
    lat.sort_unstable();
    report.risk_calls = lat.len() as u64;
    report.risk_errors = errors;
    report.latency = [
        percentile(&lat, 0.50),
        percentile(&lat, 0.99),
        percentile(&lat, 0.999),
        lat.last().copied().unwrap_or_default(),
    ];
    if let Ok(mut c) = connect(opts).await {
        report.stats = c
            .get_stats(pb::GetStatsRequest {})
            .await
            .ok()
            .map(|r| r.into_inner());
        // A cluster acknowledges once the events are durable in JetStream; the partitions'
        // owners apply them after. Wait (at most 10 minutes) until every event the cluster
        // accepted since this run started (this run's and any other client's) is applied.
        let deadline = Instant::now() + Duration::from_secs(600);
        while let Some(st) = report.stats.as_ref().filter(|s| s.cluster.is_some()) {
            // Late and untracked events are applied too (counted, kept out of windows).
            let applied =
                (st.events + st.late_events + st.untracked_events).saturating_sub(before.0);
            let accepted = st.accepted_events.saturating_sub(before.1);
            if applied >= accepted.max(report.accepted) {
                report.applied = Some(t0.elapsed());
                break;
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            report.stats = c
                .get_stats(pb::GetStatsRequest {})
                .await
                .ok()
                .map(|r| r.into_inner());
        }
    }
    if opts.list_calls > 0 {
        let mut c = connect(opts).await?;
        let mut lat = Vec::with_capacity(opts.list_calls as usize);
        for _ in 0..opts.list_calls {
            let t0 = Instant::now();
            c.list_risky_tokens(pb::ListRiskyTokensRequest {
                limit: 20,
                ..Default::default()
            })
            .await
            .map_err(|status| Error::Rpc {
                rpc: "ListRiskyTokens",
                status,
            })?;
            lat.push(t0.elapsed());
        }
        lat.sort_unstable();
        report.list_calls = lat.len() as u64;
        report.list_latency = [
            percentile(&lat, 0.50),
            percentile(&lat, 0.99),
            percentile(&lat, 0.999),
            lat.last().copied().unwrap_or_default(),
        ];
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_is_complete_in_order_and_never_in_the_future() {
        let o = Options {
            target: "127.0.0.1:1".into(),
            events: 1_003,
            batch: 100,
            streams: 3,
            tokens: 20,
            key: None,
            risk_rate: 0,
            list_calls: 0,
            seed: 1,
            span_secs: 0,
        };
        let now = 1_800_000_000_000;
        let (pool, tokens) = build(&o, now);
        assert_eq!(tokens.len(), 20);
        assert_eq!(pool.len(), 3);
        let all: Vec<&pb::Event> = pool.iter().flatten().flat_map(|r| &r.events).collect();
        assert_eq!(all.len(), 1_003);
        assert!(all.iter().all(|e| e.ts_ms < now));
        for s in &pool {
            let ts: Vec<i64> = s.iter().flat_map(|r| &r.events).map(|e| e.ts_ms).collect();
            assert!(ts.windows(2).all(|w| w[0] <= w[1]));
        }
    }

    #[test]
    fn percentiles() {
        let v: Vec<Duration> = (1..=1000).map(Duration::from_micros).collect();
        assert_eq!(percentile(&v, 0.5), Duration::from_micros(500));
        assert_eq!(percentile(&v, 0.99), Duration::from_micros(990));
        assert_eq!(percentile(&v, 0.999), Duration::from_micros(999));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }
}
