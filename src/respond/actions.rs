//! Delivering decisions: webhook POSTs (retried with backoff, then dead-lettered),
//! revocation calls (enforce mode; only recorded in dry-run), and an append-only audit log of
//! every action and its outcome. Runs on the async runtime, fed by a bounded queue from the
//! engine thread, so a slow receiver never holds scoring back.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use tokio::sync::mpsc;

use super::policy::{Decision, Event, Mode, Policy};
use crate::config::RespondConfig;
use crate::event::fmt_ts;
pub use crate::store::JsonLog;

/// One decision with the policy that made it.
pub struct Job {
    /// What was decided.
    pub decision: Decision,
    /// The policy (its actions and mode).
    pub policy: Arc<Policy>,
}

/// The calls one decision needs, prepared on the engine thread and written to the outbox
/// before they are queued, so a crash does not lose them: everything a delivery needs, in
/// a form that can be read back after a restart.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Calls {
    /// Position in the outbox.
    pub id: u64,
    /// Policy name (its URLs, mode and signing key are looked up when delivering).
    pub policy: String,
    /// Token.
    pub token_id: String,
    /// Alert.
    pub alert_id: String,
    /// `fired` or `updated`.
    pub event: String,
    /// Why the policy matched, for the audit log.
    pub why: String,
    /// Webhook body, if this decision notifies.
    pub webhook: Option<serde_json::Value>,
    /// Revocation body, if this decision fires a policy with a revocation URL.
    pub revoke: Option<serde_json::Value>,
}

impl Calls {
    /// The calls of `job` (outbox position `id`).
    pub fn of(job: &Job, id: u64) -> Calls {
        let d = &job.decision;
        let p = &job.policy;
        Calls {
            id,
            policy: p.name.clone(),
            token_id: d.score.token.to_string(),
            alert_id: d.alert_id.clone(),
            event: match d.event {
                Event::Fired => "fired",
                Event::Updated => "updated",
            }
            .into(),
            why: why(d, p),
            webhook: (p.webhook.is_some() && notify(d)).then(|| payload(job)),
            revoke: (d.event == Event::Fired && p.revoke_url.is_some()).then(|| {
                json!({
                    "token_id": d.score.token.as_ref(),
                    "alert_id": d.alert_id,
                    "policy": p.name,
                    "risk": d.score.risk,
                    "reason": why(d, p),
                })
            }),
        }
    }
}

/// Decisions whose calls are not finished yet, on disk (`DATA_DIR/outbox.jsonl`): one line
/// per prepared [`Calls`] (fsync'd before it is queued) and one `{"done": id}` per delivery
/// finished (sent or dead-lettered). What has no `done` line is delivered again at start.
pub struct Outbox {
    log: JsonLog,
    next: std::sync::atomic::AtomicU64,
}

/// File name of the outbox in the data directory.
pub const OUTBOX: &str = "outbox.jsonl";

impl Outbox {
    /// The outbox of `dir` (none without one) and the calls it holds unfinished, in order.
    /// The file is rewritten with those only. Unreadable lines are reported, not fatal.
    pub fn open(dir: Option<&Path>) -> (Outbox, Vec<Calls>, Vec<String>) {
        let mut pending: Vec<Calls> = Vec::new();
        let mut warnings = Vec::new();
        let mut next = 1u64;
        if let Some(path) = dir.map(|d| d.join(OUTBOX)) {
            match std::fs::read_to_string(&path) {
                Ok(text) => {
                    let mut done = std::collections::HashSet::new();
                    for (i, line) in text.lines().enumerate() {
                        if line.trim().is_empty() {
                            continue;
                        }
                        let v: serde_json::Value = match serde_json::from_str(line) {
                            Ok(v) => v,
                            Err(e) => {
                                warnings.push(format!("{} line {}: {e}", path.display(), i + 1));
                                continue;
                            }
                        };
                        if let Some(id) = v.get("done").and_then(|d| d.as_u64()) {
                            done.insert(id);
                            continue;
                        }
                        match serde_json::from_value::<Calls>(v) {
                            Ok(c) => {
                                next = next.max(c.id + 1);
                                pending.push(c);
                            }
                            Err(e) => {
                                warnings.push(format!("{} line {}: {e}", path.display(), i + 1))
                            }
                        }
                    }
                    pending.retain(|c| !done.contains(&c.id));
                    let tmp = path.with_extension("jsonl.tmp");
                    let body: String = pending
                        .iter()
                        .filter_map(|c| serde_json::to_string(c).ok())
                        .map(|l| l + "\n")
                        .collect();
                    let rewritten = std::fs::write(&tmp, body)
                        .and_then(|_| std::fs::File::open(&tmp).and_then(|f| f.sync_all()))
                        .and_then(|_| std::fs::rename(&tmp, &path));
                    if let Err(e) = rewritten {
                        warnings.push(format!("{}: cannot compact: {e}", path.display()));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => warnings.push(format!("{}: {e}", path.display())),
            }
        }
        let outbox = Outbox {
            log: JsonLog::new(dir.map(|d| d.join(OUTBOX))),
            next: std::sync::atomic::AtomicU64::new(next),
        };
        (outbox, pending, warnings)
    }

    /// Prepare and persist the calls of `job`; `Err` if they could not be made durable
    /// (they are delivered all the same, at most once).
    pub fn record(&self, job: &Job) -> (Calls, Result<(), String>) {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let calls = Calls::of(job, id);
        let r = serde_json::to_value(&calls)
            .map_err(|e| e.to_string())
            .and_then(|v| self.log.try_append(&v).map_err(|e| e.to_string()));
        (calls, r)
    }

    /// The delivery of `id` finished (sent or dead-lettered).
    pub fn done(&self, id: u64) {
        self.log.append(&json!({ "done": id }));
    }
}

/// Where actions write and how they retry.
pub struct Actions {
    /// `audit.jsonl`.
    pub audit: JsonLog,
    /// `dead_letter.jsonl`.
    pub dead_letter: JsonLog,
    /// Retry and timeout.
    pub cfg: RespondConfig,
    /// Revocations are recorded, not sent.
    pub dry_run: bool,
    /// Calls not finished yet, on disk.
    pub outbox: Outbox,
    /// The policies by name (a delivery resumed after a restart finds its policy here).
    pub policies: rustc_hash::FxHashMap<String, Arc<Policy>>,
}

impl Actions {
    /// Logs under `dir` (none without one) for `policies`; also the calls an earlier run
    /// left unfinished in the outbox, and what could not be read of it.
    pub fn new(
        dir: Option<&Path>,
        cfg: RespondConfig,
        dry_run: bool,
        policies: &[Policy],
    ) -> (Self, Vec<Calls>, Vec<String>) {
        let (outbox, pending, warnings) = Outbox::open(dir);
        let actions = Actions {
            audit: JsonLog::new(dir.map(|d| d.join("audit.jsonl"))),
            dead_letter: JsonLog::new(dir.map(|d| d.join("dead_letter.jsonl"))),
            cfg,
            dry_run,
            outbox,
            policies: policies
                .iter()
                .map(|p| (p.name.clone(), Arc::new(p.clone())))
                .collect(),
        };
        (actions, pending, warnings)
    }

    /// Record calls that could not even be queued (and finish them in the outbox).
    pub fn dropped(&self, calls: &Calls, why: &str) {
        if let Some(body) = &calls.webhook {
            let url = self
                .policies
                .get(&calls.policy)
                .and_then(|p| p.webhook.clone());
            self.dead_letter
                .append(&json!({"at": now(), "action": "webhook", "url": url, "reason": why, "payload": body}));
            self.audit_record(calls, "webhook", &format!("dead_letter: {why}"));
        }
        if let Some(body) = &calls.revoke {
            let url = self
                .policies
                .get(&calls.policy)
                .and_then(|p| p.revoke_url.clone());
            self.dead_letter
                .append(&json!({"at": now(), "action": "revoke", "url": url, "reason": why, "payload": body}));
            self.audit_record(calls, "revoke", &format!("dead_letter: {why}"));
        }
        self.outbox.done(calls.id);
    }

    fn audit_record(&self, c: &Calls, what: &str, result: &str) {
        let outcome = result.split([':', ' ']).next().unwrap_or("").to_string();
        metrics::counter!("tokenwatch_actions_total", "action" => what.to_string(), "outcome" => outcome)
            .increment(1);
        self.audit.append(&json!({
            "at": now(),
            "who": format!("policy:{}", c.policy),
            "what": what,
            "token_id": c.token_id,
            "alert_id": c.alert_id,
            "event": c.event,
            "why": c.why,
            "result": result,
        }));
    }
}

fn now() -> String {
    fmt_ts(chrono::Utc::now().timestamp_millis())
}

fn why(d: &Decision, p: &Policy) -> String {
    let top: Vec<&str> = d
        .score
        .contributions
        .iter()
        .take(3)
        .map(|c| c.signal.name())
        .collect();
    format!(
        "risk {:.1} >= {} ({} matching window(s), consecutive {}); top signals: {}",
        d.score.risk,
        p.min_risk,
        d.windows,
        p.consecutive_windows,
        top.join(", ")
    )
}

/// The JSON body of a webhook: the alert, its contributions and a rotation hint.
pub fn payload(job: &Job) -> serde_json::Value {
    let d = &job.decision;
    let p = &job.policy;
    json!({
        "alert_id": d.alert_id,
        "token_id": d.score.token.as_ref(),
        "policy": p.name,
        "severity": p.severity,
        "mode": match p.mode { Mode::Alert => "alert", Mode::Enforce => "enforce" },
        "event": match d.event { Event::Fired => "fired", Event::Updated => "updated" },
        "risk": d.score.risk,
        "max_risk": d.max_risk,
        "window_start": fmt_ts(d.score.start),
        "first_window_start": fmt_ts(d.first_window),
        "windows": d.windows,
        "events": d.score.events,
        "contributions": d.score.contributions.iter().map(|c| json!({
            "signal": c.signal.name(),
            "observed": c.observed,
            "expected": c.expected,
            "score": c.evidence,
            "reason": c.reason,
        })).collect::<Vec<_>>(),
        "rotation_hint": format!(
            "If this is not expected, rotate token {}: issue a replacement, move its legitimate \
             callers over, then revoke it. Label the alert (tokenwatch label --alert {} --verdict \
             true_positive|false_positive|expected_change) so the models learn from it.",
            d.score.token, d.alert_id
        ),
    })
}

/// Whether an update is worth a webhook: the first, then at 2, 4, 8... windows, so a long
/// incident is one alert that reports its growth without flooding the receiver.
fn notify(d: &Decision) -> bool {
    d.event == Event::Fired || d.windows.is_power_of_two()
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// What sends an action's calls: a pooled HTTP/1 client for http://, rustls for https://.
#[derive(Clone)]
struct Sender {
    http: HttpClient,
    /// `None`: no CA roots could be loaded; https:// calls then fail (and say why).
    tls: Option<tokio_rustls::TlsConnector>,
}

/// Places where Linux distributions keep the system's CA bundle.
const SYSTEM_CA_FILES: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// TLS client for https:// actions, trusting the CAs of `ca_file` (PEM), else the system's.
fn tls_connector(ca_file: Option<&str>) -> Result<tokio_rustls::TlsConnector, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    use tokio_rustls::rustls;
    let file = match ca_file {
        Some(f) => f.to_string(),
        None => SYSTEM_CA_FILES
            .iter()
            .find(|f| Path::new(f).exists())
            .ok_or("no CA bundle found (set respond.ca-file)")?
            .to_string(),
    };
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(&file).map_err(|e| format!("{file}: {e}"))?;
    for c in certs {
        let c = c.map_err(|e| format!("{file}: {e}"))?;
        // A bundle may hold certificates this TLS stack does not accept; skip them.
        let _ = roots.add(c);
    }
    if roots.is_empty() {
        return Err(format!("{file}: no CA certificate"));
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
}

/// One https:// call on its own connection (actions are rare; no pool), certificate and
/// host name verified by rustls.
async fn send_tls(
    tls: &tokio_rustls::TlsConnector,
    req: hyper::Request<Full<Bytes>>,
) -> Result<hyper::StatusCode, String> {
    let uri = req.uri().clone();
    let host = uri
        .host()
        .ok_or("no host in the URL")?
        .trim_matches(['[', ']']);
    let port = uri.port_u16().unwrap_or(443);
    let tcp = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("connect {host}:{port}: {e}"))?;
    let name = rustls_pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| format!("{host}: {e}"))?;
    let stream = tls
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS with {host}: {e}"))?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP with {host}: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let (mut parts, body) = req.into_parts();
    parts.uri = uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .parse()
        .map_err(|e| format!("{e}"))?;
    let authority = uri.authority().map_or(host, |a| a.as_str()).to_string();
    parts.headers.insert(
        hyper::header::HOST,
        hyper::header::HeaderValue::from_str(&authority).map_err(|e| e.to_string())?,
    );
    let resp = send
        .send_request(hyper::Request::from_parts(parts, body))
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    let status = resp.status();
    let _ = resp.into_body().collect().await;
    Ok(status)
}

/// POST `body` to `url`, retrying with backoff; Ok(status) or the last error.
async fn post(
    client: &Sender,
    cfg: &RespondConfig,
    url: &str,
    body: &serde_json::Value,
    secret: &crate::respond::policy::Secret,
) -> Result<String, String> {
    let bytes = Bytes::from(body.to_string());
    let mut wait = Duration::from_millis(cfg.backoff.ms.max(0) as u64);
    let timeout = Duration::from_millis(cfg.timeout.ms.max(1) as u64);
    let mut last = String::new();
    for attempt in 0..=cfg.retries {
        if attempt > 0 {
            tokio::time::sleep(wait).await;
            wait *= 2;
        }
        let mut req = hyper::Request::post(url)
            .header("content-type", "application/json")
            .header("user-agent", "tokenwatch");
        // Signed at each attempt: a receiver may refuse stale timestamps (replays).
        let unix_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if let Some((ts, sig)) = secret.sign(&bytes, unix_s) {
            req = req
                .header("x-tokenwatch-timestamp", ts)
                .header("x-tokenwatch-signature", sig);
        }
        let req = req
            .body(Full::new(bytes.clone()))
            .map_err(|e| format!("bad request for {url}: {e}"))?;
        let call = async {
            if url.starts_with("https://") {
                let tls = client
                    .tls
                    .as_ref()
                    .ok_or("https:// needs CA roots (respond.ca-file or a system bundle)")?;
                send_tls(tls, req).await
            } else {
                let resp = client
                    .http
                    .request(req)
                    .await
                    .map_err(|e| format!("request failed: {e}"))?;
                let status = resp.status();
                // Read the body so the connection can be reused; its content is not needed.
                let _ = resp.into_body().collect().await;
                Ok(status)
            }
        };
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(status)) if status.is_success() => return Ok(format!("ok {}", status.as_u16())),
            Ok(Ok(status)) => last = format!("HTTP {}", status.as_u16()),
            Ok(Err(e)) => last = e,
            Err(_) => last = format!("no answer within {timeout:?}"),
        }
        tracing::debug!(url, attempt, error = %last, "action attempt failed");
    }
    Err(format!("{} attempts: {last}", cfg.retries + 1))
}

/// Deliveries in flight at once. An alert always goes to the same lane, so its fired and
/// updated calls reach the receiver in order; one dead receiver delays only its lane.
const LANES: usize = 16;

/// Deliver the calls an earlier run left unfinished (`resumed`), then the queued ones until
/// the queue closes.
pub async fn run(mut rx: mpsc::Receiver<Calls>, actions: Arc<Actions>, resumed: Vec<Calls>) {
    let tls = match tls_connector(actions.cfg.ca_file.as_deref()) {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::warn!(error = %e, "no CA roots: https:// actions will fail");
            None
        }
    };
    let client = Sender {
        http: Client::builder(TokioExecutor::new()).build_http(),
        tls,
    };
    let mut lanes = Vec::with_capacity(LANES);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..LANES {
        let (tx, mut lane) = mpsc::channel::<Calls>(64);
        let (client, actions) = (client.clone(), actions.clone());
        tasks.spawn(async move {
            while let Some(job) = lane.recv().await {
                deliver(&client, &actions, job).await;
            }
        });
        lanes.push(tx);
    }
    if !resumed.is_empty() {
        tracing::info!(
            calls = resumed.len(),
            "delivering actions an earlier run left unfinished"
        );
    }
    let mut resumed = resumed.into_iter();
    loop {
        let calls = match resumed.next() {
            Some(c) => c,
            None => match rx.recv().await {
                Some(c) => c,
                None => break,
            },
        };
        let lane = crate::engine::shard_of(&calls.alert_id, LANES);
        if lanes[lane].send(calls).await.is_err() {
            break;
        }
    }
    drop(lanes);
    while tasks.join_next().await.is_some() {}
}

async fn deliver(client: &Sender, actions: &Actions, c: Calls) {
    let Some(p) = actions.policies.get(&c.policy).cloned() else {
        // Resumed after a restart whose policies no longer have this one.
        actions.dropped(&c, "policy no longer configured");
        return;
    };
    if c.event == "fired" {
        actions.audit_record(&c, "alert", "raised");
    }
    if let (Some(url), Some(body)) = (p.webhook.as_deref(), c.webhook.as_ref()) {
        match post(client, &actions.cfg, url, body, &p.secret).await {
            Ok(r) => actions.audit_record(&c, "webhook", &r),
            Err(e) => {
                tracing::warn!(policy = %p.name, alert = %c.alert_id, error = %e, "webhook dead-lettered");
                actions.dead_letter.append(&json!({
                    "at": now(), "action": "webhook", "url": url, "reason": e, "payload": body,
                }));
                actions.audit_record(&c, "webhook", &format!("dead_letter: {e}"));
            }
        }
    }
    if let (Some(url), Some(body)) = (p.revoke_url.as_deref(), c.revoke.as_ref()) {
        if p.mode != Mode::Enforce {
            actions.audit_record(&c, "revoke", "not sent: policy in alert mode");
        } else if actions.dry_run {
            actions.audit_record(&c, "revoke", &format!("dry_run: would POST to {url}"));
        } else {
            match post(client, &actions.cfg, url, body, &p.secret).await {
                Ok(r) => {
                    tracing::warn!(policy = %p.name, alert = %c.alert_id, "token revocation requested");
                    actions.audit_record(&c, "revoke", &r)
                }
                Err(e) => {
                    actions.dead_letter.append(&json!({
                        "at": now(), "action": "revoke", "url": url, "reason": e, "payload": body,
                    }));
                    actions.audit_record(&c, "revoke", &format!("dead_letter: {e}"));
                }
            }
        }
    }
    actions.outbox.done(c.id);
}

/// An alert as the responder remembers it, for verdicts.
#[derive(Debug, Clone)]
pub struct AlertInfo {
    /// Token.
    pub token: Arc<str>,
    /// First matching window start.
    pub first: i64,
    /// Last matching window start.
    pub last: i64,
    /// Top two contributors when it fired.
    pub signals: Vec<crate::model::SignalKind>,
    /// Verdict, once given.
    pub verdict: Option<crate::engine::Verdict>,
    /// The policy that raised it.
    pub policy: Arc<str>,
    /// The policy's severity.
    pub severity: Arc<str>,
    /// Matching windows so far.
    pub windows: u32,
    /// Highest risk so far.
    pub max_risk: f32,
}

/// One remembered alert, as the console lists it.
#[derive(Debug, Clone)]
pub struct AlertRow {
    /// Alert id.
    pub alert_id: String,
    /// What is known of it.
    pub info: AlertInfo,
}

impl AlertRow {
    /// As JSON (a partition snapshot's responder state, a cluster node's answer to a
    /// console page).
    pub fn to_json(&self) -> serde_json::Value {
        let a = &self.info;
        json!({
            "id": self.alert_id,
            "token": &*a.token,
            "first": a.first,
            "last": a.last,
            "signals": a.signals.iter().map(|s| s.name()).collect::<Vec<_>>(),
            "verdict": a.verdict.map(|v| v.name()),
            "policy": &*a.policy,
            "severity": &*a.severity,
            "windows": a.windows,
            "max_risk": a.max_risk,
        })
    }

    /// What [`Self::to_json`] wrote (unknown signal names are dropped).
    pub fn from_json(v: &serde_json::Value) -> Result<AlertRow, String> {
        #[derive(serde::Deserialize)]
        struct Saved {
            id: String,
            token: String,
            first: i64,
            last: i64,
            signals: Vec<String>,
            verdict: Option<String>,
            policy: String,
            severity: String,
            windows: u32,
            max_risk: f32,
        }
        let a: Saved = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
        Ok(AlertRow {
            alert_id: a.id,
            info: AlertInfo {
                token: a.token.into(),
                first: a.first,
                last: a.last,
                signals: a
                    .signals
                    .iter()
                    .filter_map(|s| crate::model::SignalKind::from_name(s))
                    .collect(),
                verdict: a.verdict.as_deref().and_then(crate::engine::Verdict::parse),
                policy: a.policy.into(),
                severity: a.severity.into(),
                windows: a.windows,
                max_risk: a.max_risk,
            },
        })
    }
}

/// Alert and verdict counters, per signal (position in `SignalKind::ALL`).
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// Alerts raised.
    pub alerts: u64,
    /// Alerts with a verdict.
    pub labelled: u64,
    /// Alerts confirmed (true positive).
    pub confirmed: u64,
    /// Per signal: (alerts, labelled, confirmed).
    pub by_signal: [(u64, u64, u64); 21],
}

impl Tally {
    /// Confirmed / labelled alerts of a signal, once any has a verdict.
    pub fn precision(&self, s: crate::model::SignalKind) -> Option<f64> {
        let (_, labelled, confirmed) = self.by_signal[s.index()];
        (labelled > 0).then(|| confirmed as f64 / labelled as f64)
    }
}

/// Alerts remembered for verdicts, at most (the oldest are forgotten first).
const MAX_ALERTS: usize = 100_000;

/// The engine thread's side: judges every scored window and queues the decisions.
pub struct Responder {
    policies: super::policy::Policies,
    arcs: Vec<Arc<Policy>>,
    tx: mpsc::Sender<Calls>,
    actions: Arc<Actions>,
    alerts: rustc_hash::FxHashMap<String, AlertInfo>,
    order: std::collections::VecDeque<String>,
    tally: Tally,
    /// Judging windows whose actions an earlier owner already took (a cluster partition's
    /// replay): the state follows, nothing is delivered.
    quiet: bool,
}

impl Responder {
    /// Policies over windows of `window_ms`, delivering into `tx`.
    pub fn new(
        list: Vec<Policy>,
        window_ms: i64,
        tx: mpsc::Sender<Calls>,
        actions: Arc<Actions>,
    ) -> Self {
        Responder {
            arcs: list.iter().cloned().map(Arc::new).collect(),
            policies: super::policy::Policies::new(list, window_ms),
            tx,
            actions,
            alerts: Default::default(),
            order: Default::default(),
            tally: Tally::default(),
            quiet: false,
        }
    }

    /// While `quiet`, judged windows update the policies' state and the remembered alerts
    /// but deliver nothing (see the field).
    pub fn set_quiet(&mut self, quiet: bool) {
        self.quiet = quiet;
    }

    /// The policies' state, the remembered alerts and the counters, as JSON: what a new
    /// owner of a cluster partition needs to go on exactly where the old one stopped.
    pub fn export(&self) -> serde_json::Value {
        let alerts: Vec<serde_json::Value> = self
            .order
            .iter()
            .filter_map(|id| {
                let info = self.alerts.get(id)?.clone();
                Some(
                    AlertRow {
                        alert_id: id.clone(),
                        info,
                    }
                    .to_json(),
                )
            })
            .collect();
        let t = &self.tally;
        json!({
            "policies": self.policies.export(),
            "alerts": alerts,
            "tally": [t.alerts, t.labelled, t.confirmed],
            "by_signal": crate::model::SignalKind::ALL
                .iter()
                .map(|k| (k.name(), t.by_signal[k.index()]))
                .filter(|(_, v)| *v != (0, 0, 0))
                .collect::<Vec<_>>(),
        })
    }

    /// Take the state [`Self::export`] wrote (replacing this one's).
    pub fn import(&mut self, v: &serde_json::Value) -> Result<(), String> {
        self.policies.import(&v["policies"])?;
        let saved = v["alerts"]
            .as_array()
            .ok_or("responder state: alerts: not a list")?
            .iter()
            .map(AlertRow::from_json)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("responder state: alerts: {e}"))?;
        let tally: (u64, u64, u64) = serde_json::from_value(v["tally"].clone())
            .map_err(|e| format!("responder state: tally: {e}"))?;
        let by: Vec<(String, (u64, u64, u64))> = serde_json::from_value(v["by_signal"].clone())
            .map_err(|e| format!("responder state: by_signal: {e}"))?;
        self.alerts.clear();
        self.order.clear();
        for a in saved.into_iter().rev().take(MAX_ALERTS).rev() {
            self.order.push_back(a.alert_id.clone());
            self.alerts.insert(a.alert_id, a.info);
        }
        let mut t = Tally {
            alerts: tally.0,
            labelled: tally.1,
            confirmed: tally.2,
            ..Tally::default()
        };
        for (name, v) in by {
            if let Some(k) = crate::model::SignalKind::from_name(&name) {
                t.by_signal[k.index()] = v;
            }
        }
        self.tally = t;
        Ok(())
    }

    /// Forget the policy state of `tokens` (evicted from the engine).
    pub fn forget(&mut self, tokens: &[Arc<str>]) {
        self.policies.forget(tokens);
    }

    /// Keep only the policy state of tokens `keep` says yes to.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.policies.retain(keep);
    }

    /// Judge windows (in close order) and queue what the policies decided; never blocks:
    /// a full queue dead-letters the action instead. Returns, per window that raised or grew
    /// an alert, (token, window start, alert id) of its first policy.
    pub fn judge(&mut self, scores: &[crate::engine::WindowScore]) -> Vec<(Arc<str>, i64, String)> {
        let mut ids = self.judge_all(scores);
        ids.dedup_by(|b, a| a.0 == b.0 && a.1 == b.1);
        ids
    }

    /// [`Self::judge`], returning every alert each window raised or grew (one per matching
    /// policy, in policy order).
    pub fn judge_all(
        &mut self,
        scores: &[crate::engine::WindowScore],
    ) -> Vec<(Arc<str>, i64, String)> {
        let mut ids: Vec<(Arc<str>, i64, String)> = Vec::new();
        for s in scores {
            for decision in self.policies.judge(s) {
                ids.push((s.token.clone(), s.start, decision.alert_id.clone()));
                self.remember(&decision);
                if self.quiet {
                    continue;
                }
                let job = Job {
                    policy: self.arcs[decision.policy].clone(),
                    decision,
                };
                // Durable before it is queued: a crash from here on delivers it at start.
                let (calls, durable) = self.actions.outbox.record(&job);
                if let Err(e) = durable {
                    tracing::error!(error = %e, alert = %calls.alert_id, "cannot write the action outbox; a crash would lose this action");
                }
                if let Err(e) = self.tx.try_send(calls) {
                    let (why, calls) = match e {
                        mpsc::error::TrySendError::Full(c) => ("action queue full", c),
                        mpsc::error::TrySendError::Closed(c) => ("action delivery stopped", c),
                    };
                    self.actions.dropped(&calls, why);
                }
            }
        }
        ids
    }

    fn remember(&mut self, d: &Decision) {
        if let Some(a) = self.alerts.get_mut(&d.alert_id) {
            a.last = a.last.max(d.score.start);
            a.windows = a.windows.max(d.windows);
            a.max_risk = a.max_risk.max(d.max_risk);
            return;
        }
        let signals: Vec<_> = d
            .score
            .contributions
            .iter()
            .take(2)
            .map(|c| c.signal)
            .collect();
        self.tally.alerts += 1;
        metrics::counter!(
            "tokenwatch_alerts_total",
            "signal" => signals.first().map_or("none", |s| s.name()),
            "severity" => self.arcs[d.policy].severity.clone()
        )
        .increment(1);
        for s in &signals {
            self.tally.by_signal[s.index()].0 += 1;
        }
        if self.order.len() >= MAX_ALERTS {
            if let Some(old) = self.order.pop_front() {
                self.alerts.remove(&old);
            }
        }
        self.order.push_back(d.alert_id.clone());
        self.alerts.insert(
            d.alert_id.clone(),
            AlertInfo {
                token: d.score.token.clone(),
                first: d.first_window,
                last: d.score.start,
                signals,
                verdict: None,
                policy: self.arcs[d.policy].name.as_str().into(),
                severity: self.arcs[d.policy].severity.as_str().into(),
                windows: d.windows,
                max_risk: d.max_risk,
            },
        );
    }

    /// Remembered alerts, most recently raised first: `offset` skipped, at most `limit`;
    /// with `token`, only that token's. Also how many are remembered, and how many of them
    /// have no verdict yet (open).
    pub fn recent(
        &self,
        offset: usize,
        limit: usize,
        token: Option<&str>,
    ) -> (Vec<AlertRow>, usize, usize) {
        let rows = self
            .order
            .iter()
            .rev()
            .filter_map(|id| Some((id, self.alerts.get(id)?)))
            .filter(|(_, a)| token.is_none_or(|t| *a.token == *t))
            .skip(offset)
            .take(limit)
            .map(|(id, a)| AlertRow {
                alert_id: id.clone(),
                info: a.clone(),
            })
            .collect();
        let open = self.alerts.values().filter(|a| a.verdict.is_none()).count();
        (rows, self.order.len(), open)
    }

    /// Record a verdict on a remembered alert (a second verdict replaces the first).
    pub fn label(
        &mut self,
        alert_id: &str,
        verdict: crate::engine::Verdict,
    ) -> Result<AlertInfo, String> {
        use crate::engine::Verdict::TruePositive;
        let a = self
            .alerts
            .get_mut(alert_id)
            .ok_or_else(|| format!("unknown alert id {alert_id:?} (or too old to remember)"))?;
        let t = &mut self.tally;
        match a.verdict {
            None => {
                t.labelled += 1;
                for s in &a.signals {
                    t.by_signal[s.index()].1 += 1;
                }
            }
            Some(TruePositive) => {
                t.confirmed -= 1;
                for s in &a.signals {
                    t.by_signal[s.index()].2 -= 1;
                }
            }
            Some(_) => {}
        }
        if verdict == TruePositive {
            t.confirmed += 1;
            for s in &a.signals {
                t.by_signal[s.index()].2 += 1;
            }
        }
        a.verdict = Some(verdict);
        Ok(a.clone())
    }

    /// Apply an operator's verdict on a remembered alert: its memory and the counters
    /// ([`Self::label`]), the token's models (`Engine::feedback`), the feedback metrics and
    /// the audit record (`at`: when it was given, ms). The alert and what changed. The one
    /// path of a verdict through the embedded server and a cluster partition alike.
    pub fn apply_verdict(
        &mut self,
        engine: &mut crate::engine::Engine,
        alert_id: &str,
        verdict: crate::engine::Verdict,
        note: &str,
        at: i64,
    ) -> Result<(AlertInfo, crate::engine::FeedbackEffect), String> {
        let info = self.label(alert_id, verdict)?;
        metrics::counter!("tokenwatch_feedback_total", "verdict" => verdict.name()).increment(1);
        for k in crate::model::SignalKind::ALL {
            if let Some(p) = self.tally.precision(k) {
                metrics::gauge!("tokenwatch_signal_precision", "signal" => k.name()).set(p);
            }
        }
        let effect = engine
            .feedback(&info.token, (info.first, info.last), verdict, &info.signals)
            .ok_or_else(|| format!("token {} is not known to the models", info.token))?;
        self.audit().append(&json!({
            "at": fmt_ts(at),
            "who": "operator",
            "what": "feedback",
            "token_id": &*info.token,
            "alert_id": alert_id,
            "why": verdict.name(),
            "note": note,
            "result": format!(
                "learned {} window(s); damped {:?}; hold until {:?}",
                effect.learned_windows,
                effect.damped.iter().map(|s| s.name()).collect::<Vec<_>>(),
                effect.hold_until.map(fmt_ts)
            ),
        }));
        Ok((info, effect))
    }

    /// Counters so far.
    pub fn tally(&self) -> &Tally {
        &self.tally
    }

    /// The audit log.
    pub fn audit(&self) -> &JsonLog {
        &self.actions.audit
    }
}
