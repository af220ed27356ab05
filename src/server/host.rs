//! The engine's home inside the server: one OS thread owns the [`Engine`] (which runs its
//! shards on their own threads), fed by a bounded queue; what it scores is published on the
//! [`Board`] that the RPC handlers read. Async handlers never touch the engine.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use arrow::record_batch::RecordBatch;
use rustc_hash::FxHashMap;
use tokio::sync::{broadcast, mpsc, oneshot};

use super::pb;
use crate::config::Config;
use crate::engine::{Engine, Stats, WindowScore};
use crate::model::registry::Registry;
use crate::store::{LogPos, Store};

/// A reply carrying a path or a reason.
pub type PathReply = oneshot::Sender<Result<std::path::PathBuf, String>>;

/// One token's baseline, for the console.
#[derive(Debug, Clone)]
pub struct TokenView {
    /// The model state as it is now.
    pub state: crate::model::TokenState,
    /// Printable names of its most used endpoints (folded key, method and route).
    pub endpoints: Vec<(u32, String)>,
    /// Printable names of the user agents asked for (key, name).
    pub agents: Vec<(u64, String)>,
}

/// What one ingest stream learns about the batches it queued.
#[derive(Debug, Default)]
pub struct Ack {
    /// Events that arrived behind the watermark (accepted and kept, too late for their
    /// window to be scored).
    pub late: AtomicU64,
    /// A write of the log that held some of its events failed (they are not durable and
    /// were not applied).
    pub failed: std::sync::Mutex<Option<String>>,
}

impl Ack {
    /// The failure, if one of this stream's writes failed.
    pub fn failure(&self) -> Option<String> {
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Work for the engine thread.
pub enum Cmd {
    /// Validated events, what their stream learns about them, and the de-duplication keys
    /// of their client event ids (logged with them, so a restart remembers them).
    Batch(RecordBatch, Arc<Ack>, Vec<u64>),
    /// Answer once everything queued before this is processed (each stream then reads its
    /// own [`Ack`]).
    Flush(oneshot::Sender<Result<(), String>>),
    /// Processing time passed (idle close, periodic snapshot).
    Tick,
    /// Write a snapshot now.
    Snapshot(PathReply),
    /// Rebuild the models from history in the background, then swap them in.
    Retrain(Option<i64>, Option<i64>, PathReply),
    /// A background rebuild finished: catch it up with the log and swap it in.
    Swap(Box<Result<(Engine, LogPos), String>>, PathReply),
    /// An operator's verdict on an alert.
    Feedback {
        /// Alert.
        alert_id: String,
        /// Verdict.
        verdict: crate::engine::Verdict,
        /// Free text.
        note: String,
        /// Token and what changed, or why nothing could be done.
        reply: oneshot::Sender<Result<(String, crate::engine::FeedbackEffect), String>>,
    },
    /// Counters for GetStats.
    Stats(oneshot::Sender<pb::StatsResponse>),
    /// One token's model state as it is now (`None`: not tracked), with the names of the
    /// given user-agent keys, for the console.
    Describe(Arc<str>, Vec<u64>, oneshot::Sender<Option<Box<TokenView>>>),
    /// Remembered policy alerts, most recently raised first, and how many are remembered.
    Alerts {
        /// Skipped first.
        offset: usize,
        /// Most returned.
        limit: usize,
        /// Only this token's.
        token: Option<String>,
        /// The page.
        reply: oneshot::Sender<(Vec<crate::respond::actions::AlertRow>, usize, usize)>,
    },
    /// Close every window, publish, snapshot, and stop.
    Stop(oneshot::Sender<Stats>),
}

/// What the engine published: the latest window of every token, and the alert feed.
pub struct Board {
    // A read-mostly map: readers (GetTokenRisk) take the read lock for one lookup; the
    // engine thread takes the write lock in short chunks, so a reader never waits long.
    latest: RwLock<Latest>,
    /// Alert feed; each subscriber has its own bounded buffer (lagging is reported).
    pub alerts: broadcast::Sender<Arc<pb::Alert>>,
    /// Windows scored.
    pub windows: AtomicU64,
    /// Alerts published.
    pub alerted: AtomicU64,
    /// Recent windows per token and alerts per hour, for the console (empty without it).
    timelines: std::sync::Mutex<super::timeline::Timelines>,
}

/// Entries written per write-lock acquisition.
const PUBLISH_CHUNK: usize = 256;

/// Each token's latest score, and the same ordered by risk (highest first, then token id),
/// so ListRiskyTokens reads its top k without scanning every token.
#[derive(Default)]
struct Latest {
    map: FxHashMap<Arc<str>, Arc<pb::TokenRisk>>,
    by_risk: std::collections::BTreeSet<(std::cmp::Reverse<u64>, Arc<str>)>,
}

/// A risk (0..=100, finite) as a key whose order is the risk's: the bits of a non-negative
/// float order as the float does.
fn risk_key(r: f64) -> std::cmp::Reverse<u64> {
    std::cmp::Reverse(if r.is_finite() { r.max(0.0) } else { 0.0 }.to_bits())
}

impl Latest {
    fn insert(&mut self, token: Arc<str>, risk: Arc<pb::TokenRisk>) {
        let key = risk_key(risk.risk);
        if let Some(old) = self.map.insert(token.clone(), risk) {
            self.by_risk.remove(&(risk_key(old.risk), token.clone()));
        }
        self.by_risk.insert((key, token));
    }

    fn remove(&mut self, token: &str) {
        if let Some((t, old)) = self.map.remove_entry(token) {
            self.by_risk.remove(&(risk_key(old.risk), t));
        }
    }
}

impl Board {
    /// An empty board; timelines of at most `timeline` (points in all, points per token,
    /// event time from a token's newest).
    pub fn new(alert_buffer: usize, timeline: (usize, usize, i64)) -> Self {
        Board {
            latest: RwLock::new(Latest::default()),
            alerts: broadcast::channel(alert_buffer).0,
            windows: AtomicU64::new(0),
            alerted: AtomicU64::new(0),
            timelines: std::sync::Mutex::new(super::timeline::Timelines::new(
                timeline.0, timeline.1, timeline.2,
            )),
        }
    }

    /// The timelines (a poisoned lock still holds consistent data: every update is whole).
    pub fn timelines(&self) -> std::sync::MutexGuard<'_, super::timeline::Timelines> {
        self.timelines.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The riskiest tokens that `keep` says yes to, highest first: `offset` skipped, at most
    /// `limit`, looking at no more than the `scan` riskiest (a bounded walk of the index).
    pub fn riskiest_where(
        &self,
        keep: impl Fn(&pb::TokenRisk) -> bool,
        offset: usize,
        limit: usize,
        scan: usize,
    ) -> Vec<Arc<pb::TokenRisk>> {
        let l = self.latest.read().unwrap_or_else(|p| p.into_inner());
        l.by_risk
            .iter()
            .take(scan)
            .filter_map(|(_, t)| l.map.get(t))
            .filter(|r| keep(r))
            .skip(offset)
            .take(limit)
            .cloned()
            .collect()
    }

    /// The latest scored window of a token.
    pub fn get(&self, token: &str) -> Option<Arc<pb::TokenRisk>> {
        let l = self.latest.read().unwrap_or_else(|p| p.into_inner());
        l.map.get(token).cloned()
    }

    /// The riskiest tokens (latest window each), highest first.
    /// O(limit log n): read from the risk-ordered index, not a scan of every token.
    pub fn riskiest(&self, limit: usize, min_risk: f64) -> Vec<Arc<pb::TokenRisk>> {
        let l = self.latest.read().unwrap_or_else(|p| p.into_inner());
        l.by_risk
            .iter()
            .filter_map(|(_, t)| l.map.get(t))
            .take_while(|r| r.risk >= min_risk)
            .take(limit)
            .cloned()
            .collect()
    }

    /// Forget the latest scores of `tokens` (evicted from the engine: the board holds only
    /// tracked tokens, so it follows the same budget).
    pub fn forget(&self, tokens: &[Arc<str>]) {
        self.timelines().forget(tokens);
        for chunk in tokens.chunks(PUBLISH_CHUNK) {
            let mut l = self.latest.write().unwrap_or_else(|p| p.into_inner());
            for t in chunk {
                l.remove(t);
            }
        }
    }

    /// Keep only the latest scores of tokens `keep` says yes to.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        let mut l = self.latest.write().unwrap_or_else(|p| p.into_inner());
        let gone: Vec<Arc<str>> = l.map.keys().filter(|t| !keep(t)).cloned().collect();
        for t in gone {
            l.remove(&t);
        }
    }

    /// Tokens on the board.
    pub fn len(&self) -> usize {
        let l = self.latest.read().unwrap_or_else(|p| p.into_inner());
        l.map.len()
    }

    /// Put restored latest scores on the board (start after a restart); no alert is sent.
    pub fn restore(&self, latest: impl IntoIterator<Item = (Arc<str>, pb::TokenRisk)>) {
        let mut l = self.latest.write().unwrap_or_else(|p| p.into_inner());
        for (t, r) in latest {
            l.insert(t, Arc::new(r));
        }
    }

    /// One window closed elsewhere (a cluster's owner): it becomes the token's latest
    /// unless the board already has a later one.
    pub fn put_risk(&self, r: pb::TokenRisk) {
        self.windows.fetch_add(1, Ordering::Relaxed);
        let token: Arc<str> = r.token_id.as_str().into();
        let mut l = self.latest.write().unwrap_or_else(|p| p.into_inner());
        if l.map
            .get(&token)
            .is_some_and(|old| old.window_start_ms > r.window_start_ms)
        {
            return;
        }
        l.insert(token, Arc::new(r));
    }

    /// Publish windows without alerting (replayed after a restart: alerted before it).
    pub fn publish_quietly(&self, scores: &[WindowScore]) {
        let mut l = self.latest.write().unwrap_or_else(|p| p.into_inner());
        for s in scores {
            l.insert(s.token.clone(), Arc::new(pb::TokenRisk::from(s)));
        }
    }

    fn publish(&self, scores: Vec<WindowScore>, alert_ids: &[(Arc<str>, i64, String)]) {
        if scores.is_empty() {
            return;
        }
        // Build outside the lock; readers only wait for the map inserts.
        let built: Vec<(Arc<str>, Arc<pb::TokenRisk>)> = scores
            .iter()
            .map(|s| (s.token.clone(), Arc::new(pb::TokenRisk::from(s))))
            .collect();
        self.windows
            .fetch_add(scores.len() as u64, Ordering::Relaxed);
        self.timelines().record(&scores, &built);
        for chunk in built.chunks(PUBLISH_CHUNK) {
            let mut l = self.latest.write().unwrap_or_else(|p| p.into_inner());
            for (token, risk) in chunk {
                l.insert(token.clone(), risk.clone());
            }
        }
        for (s, (_, risk)) in scores.iter().zip(&built) {
            if s.alert {
                self.alerted.fetch_add(1, Ordering::Relaxed);
                let mut a = pb::Alert::from(risk.as_ref());
                if let Some((_, _, id)) = alert_ids
                    .iter()
                    .find(|(t, start, _)| *t == s.token && *start == s.start)
                {
                    a.alert_id = id.clone();
                }
                // No subscriber is not an error: the alert is still on the board.
                let _ = self.alerts.send(Arc::new(a));
            }
        }
    }
}

/// Handle on the engine thread.
pub struct Host {
    /// Queue into the engine (bounded: senders wait when it is full).
    pub tx: mpsc::Sender<Cmd>,
    /// What the engine published.
    pub board: Arc<Board>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Rows merged into one engine batch: fewer, larger batches amortise the per-batch cost
/// (shard split, thread hand-off, log fsync) when many small client batches queue up.
const COALESCE_ROWS: usize = 65_536;

/// What the engine thread needs besides the engine.
pub struct Setup {
    /// Idle close after this much processing time without events.
    pub idle_close: Duration,
    /// Durable store (None: in memory only).
    pub store: Option<Store>,
    /// Snapshot interval.
    pub snapshot_every: Duration,
    /// For rebuilding engines (retrain).
    pub config: Config,
    /// For rebuilding engines (retrain).
    pub registry: Registry,
    /// Alert policies and their action queue (None: no policies).
    pub responder: Option<crate::respond::actions::Responder>,
}

/// Wall-clock time in ms since the epoch (the server's one clock).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis().min(i64::MAX as u128) as u64)
}

impl Host {
    /// Start the engine thread on a queue made earlier (the service holds its sender before
    /// the engine exists, while state is recovered); `board` may already hold restored
    /// scores. The thread stores its progress (ms since the epoch when it last took a
    /// command) in `heartbeat` for the watchdog.
    pub fn start_on(
        (tx, rx): (mpsc::Sender<Cmd>, mpsc::Receiver<Cmd>),
        engine: Engine,
        board: Arc<Board>,
        setup: Setup,
        heartbeat: Arc<AtomicU64>,
    ) -> Host {
        let b = board.clone();
        let me = tx.clone();
        let thread = std::thread::Builder::new()
            .name("tokenwatch-engine".into())
            .spawn(move || {
                lower_priority();
                Worker::new(engine, b, setup, me).run(rx, &heartbeat)
            })
            .ok();
        Host { tx, board, thread }
    }

    /// Close every open window, publish, snapshot, stop the thread; the engine's counters.
    pub async fn stop(mut self) -> Stats {
        let (tx, rx) = oneshot::channel();
        let stats = if self.tx.send(Cmd::Stop(tx)).await.is_ok() {
            rx.await.unwrap_or_default()
        } else {
            Stats::default()
        };
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        stats
    }
}

struct Worker {
    engine: Engine,
    board: Arc<Board>,
    idle_close: Duration,
    last_arrival: Instant,
    newest_at_arrival: Option<i64>,
    store: Option<Store>,
    snapshot_every: Duration,
    last_snapshot: Instant,
    config: Config,
    registry: Registry,
    retraining: bool,
    me: mpsc::Sender<Cmd>,
    responder: Option<crate::respond::actions::Responder>,
}

impl Worker {
    fn new(mut engine: Engine, board: Arc<Board>, setup: Setup, me: mpsc::Sender<Cmd>) -> Self {
        engine.report_evictions();
        Worker {
            engine,
            board,
            idle_close: setup.idle_close,
            last_arrival: Instant::now(),
            newest_at_arrival: None,
            store: setup.store,
            snapshot_every: setup.snapshot_every,
            last_snapshot: Instant::now(),
            config: setup.config,
            registry: setup.registry,
            retraining: false,
            me,
            responder: setup.responder,
        }
    }

    fn run(mut self, mut rx: mpsc::Receiver<Cmd>, heartbeat: &AtomicU64) {
        let mut next: Option<Cmd> = None;
        loop {
            heartbeat.store(now_ms(), Ordering::Relaxed);
            let cmd = match next.take() {
                Some(c) => c,
                None => match rx.blocking_recv() {
                    Some(c) => c,
                    None => break,
                },
            };
            match cmd {
                Cmd::Batch(b, ack, mut keys) => {
                    let mut rows = b.num_rows();
                    self.count_late(&b, &ack.late);
                    let mut batches = vec![b];
                    let mut acks = vec![ack];
                    while rows < COALESCE_ROWS {
                        match rx.try_recv() {
                            Ok(Cmd::Batch(b, ack, more)) => {
                                rows += b.num_rows();
                                self.count_late(&b, &ack.late);
                                batches.push(b);
                                acks.push(ack);
                                keys.extend(more);
                            }
                            Ok(other) => {
                                next = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    self.apply(batches, &acks, &keys);
                }
                Cmd::Flush(tx) => {
                    let _ = tx.send(Ok(()));
                }
                Cmd::Tick => self.tick(),
                Cmd::Snapshot(tx) => {
                    let _ = tx.send(self.checkpoint());
                }
                Cmd::Retrain(from, to, tx) => self.start_retrain(from, to, tx),
                Cmd::Swap(built, tx) => {
                    self.retraining = false;
                    let _ = tx.send(self.swap(*built));
                }
                Cmd::Feedback {
                    alert_id,
                    verdict,
                    note,
                    reply,
                } => {
                    let _ = reply.send(self.feedback(&alert_id, verdict, note));
                }
                Cmd::Stats(tx) => {
                    let _ = tx.send(self.stats());
                }
                Cmd::Describe(token, keys, tx) => {
                    let view =
                        self.engine
                            .describe(&token, &keys)
                            .map(|(state, endpoints, agents)| {
                                Box::new(TokenView {
                                    state,
                                    endpoints,
                                    agents,
                                })
                            });
                    let _ = tx.send(view);
                }
                Cmd::Alerts {
                    offset,
                    limit,
                    token,
                    reply,
                } => {
                    let page = match self.responder.as_ref() {
                        Some(r) => r.recent(offset, limit, token.as_deref()),
                        None => (Vec::new(), 0, 0),
                    };
                    let _ = reply.send(page);
                }
                Cmd::Stop(tx) => {
                    let scores = self.engine.close_open();
                    self.emit(scores);
                    if self.store.is_some() {
                        if let Err(e) = self.checkpoint() {
                            tracing::error!(error = %e, "final snapshot failed");
                        }
                        if let Some(store) = self.store.take() {
                            if let Err(e) = store.close() {
                                tracing::error!(error = %e, "compacting the log at shutdown failed");
                            }
                        }
                    }
                    let _ = tx.send(self.engine.stats());
                    return;
                }
            }
        }
        // Every sender is gone without a Stop: still close and publish what is open.
        let scores = self.engine.close_open();
        self.emit(scores);
    }

    fn feedback(
        &mut self,
        alert_id: &str,
        verdict: crate::engine::Verdict,
        note: String,
    ) -> Result<(String, crate::engine::FeedbackEffect), String> {
        let r = self
            .responder
            .as_mut()
            .ok_or("the server runs without alert policies, so there are no alert ids")?;
        let now = chrono::Utc::now().timestamp_millis();
        let (info, effect) = r.apply_verdict(&mut self.engine, alert_id, verdict, &note, now)?;
        let pos = self.store.as_ref().map(|s| s.pos()).unwrap_or_default();
        let rec = crate::store::FeedbackRecord {
            at: crate::event::fmt_ts(now),
            pos: (pos.segment, pos.batches),
            alert_id: alert_id.to_string(),
            token_id: info.token.to_string(),
            from_ms: info.first,
            to_ms: info.last,
            verdict: verdict.name().into(),
            signals: info.signals.iter().map(|s| s.name().to_string()).collect(),
            note,
        };
        if let Some(store) = self.store.as_ref() {
            // Applied already; a failure to record it is reported, not undone.
            if let Err(e) = store.record_feedback(&rec) {
                tracing::error!(error = %e, "feedback could not be recorded");
            }
        }
        Ok((rec.token_id, effect))
    }

    fn stats(&self) -> pb::StatsResponse {
        let st = self.engine.stats();
        let mut out = pb::StatsResponse {
            events: st.events,
            late_events: st.late,
            windows: st.windows,
            alert_windows: st.alerts,
            tokens: st.tokens,
            tracked_tokens: st.tracked,
            evicted_tokens: st.evicted,
            reloaded_tokens: st.reloaded,
            untracked_events: st.untracked,
            ..Default::default()
        };
        if let Some(r) = self.responder.as_ref() {
            let t = r.tally();
            out.alerts = t.alerts;
            out.labelled = t.labelled;
            out.confirmed = t.confirmed;
            for k in crate::model::SignalKind::ALL {
                let (alerts, labelled, confirmed) = t.by_signal[k.index()];
                if alerts > 0 {
                    out.signals.push(pb::SignalStats {
                        signal: k.name().into(),
                        alerts,
                        labelled,
                        confirmed,
                        precision: t.precision(k).unwrap_or(f64::NAN),
                    });
                }
            }
        }
        out
    }

    /// Judge the closed windows against the policies, then publish them.
    fn emit(&mut self, scores: Vec<WindowScore>) {
        let ids = match self.responder.as_mut() {
            Some(r) => r.judge(&scores),
            None => Vec::new(),
        };
        metrics::counter!("tokenwatch_windows_scored_total").increment(scores.len() as u64);
        metrics::counter!("tokenwatch_alert_windows_total")
            .increment(scores.iter().filter(|s| s.alert).count() as u64);
        self.board.publish(scores, &ids);
        // Evicted tokens take nothing with them here: their latest score and policy state
        // go (the board and the policies follow the engine's budget).
        let gone = self.engine.take_evicted();
        if !gone.is_empty() {
            self.board.forget(&gone);
            if let Some(r) = self.responder.as_mut() {
                r.forget(&gone);
            }
        }
    }

    /// Events whose window closed before this batch: the engine counts and skips them.
    fn count_late(&self, b: &RecordBatch, late: &AtomicU64) {
        let n = self.engine.late_rows(b);
        if n > 0 {
            late.fetch_add(n, Ordering::Relaxed);
        }
    }

    fn apply(&mut self, batches: Vec<RecordBatch>, acks: &[Arc<Ack>], keys: &[u64]) {
        let batch = if batches.len() == 1 {
            batches.into_iter().next()
        } else {
            let schema = batches[0].schema();
            arrow::compute::concat_batches(&schema, &batches).ok()
        };
        let Some(batch) = batch else { return };
        // Log first (one fsync for the whole coalesced batch), then apply: an
        // acknowledged event is on disk, and a replay sees the batches the engine saw.
        let t0 = Instant::now();
        if let Some(store) = self.store.as_mut() {
            if let Err(e) = store
                .append_keyed(&batch, keys)
                .and_then(|_| store.commit())
            {
                // Exactly the streams whose events this write held fail; the log goes on
                // in a new segment (never after the failed write).
                tracing::error!(error = %e, streams = acks.len(), "write-ahead log failed; those events are refused");
                metrics::counter!("tokenwatch_log_write_failures_total").increment(1);
                let msg = format!("events could not be made durable: {e}");
                for a in acks {
                    *a.failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(msg.clone());
                }
                return;
            }
        }
        let late = self.engine.stats().late;
        match self.engine.apply_at(&batch, now_ms() as i64) {
            Ok(scores) => self.emit(scores),
            // Batches come from `convert::to_batch` in the canonical schema; a mismatch
            // is a bug, logged rather than taking the server down.
            Err(e) => tracing::error!(error = %e, "engine refused a batch"),
        }
        let st = self.engine.stats();
        metrics::counter!("tokenwatch_events_late_total").increment(st.late - late);
        metrics::histogram!("tokenwatch_scoring_seconds").record(t0.elapsed().as_secs_f64());
        self.last_arrival = Instant::now();
        self.newest_at_arrival = self.engine.newest();
    }

    fn gauges(&self) {
        let st = self.engine.stats();
        metrics::gauge!("tokenwatch_tokens").set(st.tokens as f64);
        metrics::gauge!("tokenwatch_tokens_tracked").set(st.tracked as f64);
        metrics::counter!("tokenwatch_tokens_evicted_total").absolute(st.evicted);
        metrics::counter!("tokenwatch_tokens_reloaded_total").absolute(st.reloaded);
        metrics::counter!("tokenwatch_events_untracked_total").absolute(st.untracked);
        metrics::gauge!("tokenwatch_board_tokens").set(self.board.len() as f64);
        let (points, lines, dropped) = {
            let t = self.board.timelines();
            let (p, l) = t.size();
            (p, l, t.dropped)
        };
        if points > 0 || dropped > 0 {
            metrics::gauge!("tokenwatch_console_timeline_windows").set(points as f64);
            metrics::gauge!("tokenwatch_console_timeline_tokens").set(lines as f64);
            metrics::counter!("tokenwatch_console_timelines_dropped_total").absolute(dropped);
        }
        let (_, per_token) = self.engine.state_bytes();
        metrics::gauge!("tokenwatch_model_state_bytes").set((per_token as u64 * st.tokens) as f64);
        if let Some(store) = self.store.as_ref() {
            metrics::gauge!("tokenwatch_log_backlog_bytes").set(store.backlog_bytes() as f64);
        }
    }

    fn tick(&mut self) {
        self.gauges();
        if self.store.is_some() && self.last_snapshot.elapsed() >= self.snapshot_every {
            if let Err(e) = self.checkpoint() {
                tracing::error!(error = %e, "periodic snapshot failed");
            }
        }
        let idle = self.last_arrival.elapsed();
        let Some(newest) = self.newest_at_arrival else {
            return;
        };
        if idle < self.idle_close {
            return;
        }
        // Event time is taken to go on with the wall clock from the last arrival.
        let now = newest.saturating_add(idle.as_millis().min(i64::MAX as u128) as i64);
        let scores = self.engine.advance_to(now);
        self.emit(scores);
    }

    /// Snapshot the engine (with each token's latest published score) and seal the log.
    fn checkpoint(&mut self) -> Result<std::path::PathBuf, String> {
        let Some(store) = self.store.as_mut() else {
            return Err("the server runs without a data directory".into());
        };
        let mut snap = self
            .engine
            .snapshot_with_spill()
            .map_err(|e| e.to_string())?;
        for t in snap.tokens.iter_mut() {
            if let Some(r) = self.board.get(&t.token) {
                t.extra = prost::Message::encode_to_vec(r.as_ref());
            }
        }
        let t0 = Instant::now();
        self.last_snapshot = t0;
        let path = store
            .checkpoint(&snap, self.engine.newest())
            .map_err(|e| e.to_string())?;
        tracing::info!(
            path = %path.display(),
            tokens = snap.tokens.len(),
            bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0),
            seconds = t0.elapsed().as_secs_f64(),
            "snapshot written"
        );
        Ok(path)
    }

    fn start_retrain(&mut self, from: Option<i64>, to: Option<i64>, tx: PathReply) {
        if self.retraining {
            let _ = tx.send(Err("a retrain is already running".into()));
            return;
        }
        let Some(store) = self.store.as_mut() else {
            let _ = tx.send(Err("the server runs without a data directory".into()));
            return;
        };
        // Everything before `pos` is now in the history; later batches are caught up from
        // the log when the rebuilt engine comes back.
        let pos = match store.seal() {
            Ok(p) => p,
            Err(e) => {
                let _ = tx.send(Err(e.to_string()));
                return;
            }
        };
        self.retraining = true;
        let (dir, cfg, reg, me) = (
            store.dir().to_path_buf(),
            self.config.clone(),
            self.registry.clone(),
            self.me.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name("tokenwatch-retrain".into())
            .spawn(move || {
                lower_priority();
                let t0 = Instant::now();
                let built =
                    crate::store::rebuild(&dir, &cfg, reg, (from, to), Some(pos.segment), |_| {})
                        .map_err(|e| e.to_string());
                tracing::info!(
                    seconds = t0.elapsed().as_secs_f64(),
                    ok = built.is_ok(),
                    "retrain built"
                );
                let _ = me.blocking_send(Cmd::Swap(Box::new(built), tx));
            });
        if let Err(e) = spawned {
            self.retraining = false;
            tracing::error!(error = %e, "cannot start the retrain thread");
        }
    }

    fn swap(
        &mut self,
        built: Result<(Engine, LogPos), String>,
    ) -> Result<std::path::PathBuf, String> {
        let (mut engine, pos) = built?;
        let Some(store) = self.store.as_ref() else {
            return Err("the server runs without a data directory".into());
        };
        engine.report_evictions();
        // Catch up with what arrived while the rebuild ran (already durable in the log).
        for b in store.read_since(pos).map_err(|e| e.to_string())? {
            engine.apply(&b).map_err(|e| e.to_string())?;
        }
        self.engine = engine;
        let _ = self.engine.take_evicted();
        // The board and the policies keep only what the new engine tracks.
        let engine = &self.engine;
        self.board.retain(|t| engine.is_tracked(t));
        if let Some(r) = self.responder.as_mut() {
            r.retain(|t| engine.is_tracked(t));
        }
        self.newest_at_arrival = self.engine.newest();
        tracing::info!("retrained models swapped in");
        self.checkpoint()
    }
}

/// Nice value of the engine thread (0 = normal, 19 = lowest). Under full load the engine
/// thread (and the shard threads it starts, which inherit its priority) yields the CPU to
/// the RPC workers, so that reads stay fast while ingest is throttled by backpressure.
const ENGINE_NICE: i32 = 5;

fn lower_priority() {
    crate::sys::lower_thread_priority(ENGINE_NICE);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The risk-ordered index gives what a full sort of every token's latest score gives,
    /// through updates that move tokens up and down.
    #[test]
    fn riskiest_from_the_index_equals_a_full_sort() {
        let board = Board::new(16, (0, 1, 0));
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for round in 0..5 {
            let batch: Vec<(Arc<str>, pb::TokenRisk)> = (0..2000)
                .map(|_| {
                    let t = format!("tok-{}", next() % 700);
                    // Ties on purpose: a few distinct risks.
                    let risk = (next() % 40) as f64 * 2.5;
                    let r = pb::TokenRisk {
                        token_id: t.clone(),
                        risk,
                        window_start_ms: round,
                        ..Default::default()
                    };
                    (Arc::from(t.as_str()), r)
                })
                .collect();
            board.restore(batch);
            let mut all: Vec<Arc<pb::TokenRisk>> = {
                let l = board.latest.read().unwrap();
                assert_eq!(l.map.len(), l.by_risk.len());
                l.map.values().cloned().collect()
            };
            all.sort_by(|a, b| b.risk.total_cmp(&a.risk).then(a.token_id.cmp(&b.token_id)));
            for (limit, min) in [(20, 0.0), (1000, 0.0), (50, 60.0), (5, 97.5), (10, 200.0)] {
                let want: Vec<String> = all
                    .iter()
                    .filter(|r| r.risk >= min)
                    .take(limit)
                    .map(|r| r.token_id.clone())
                    .collect();
                let got: Vec<String> = board
                    .riskiest(limit, min)
                    .iter()
                    .map(|r| r.token_id.clone())
                    .collect();
                assert_eq!(got, want, "limit {limit} min {min}");
            }
        }
    }
}
