//! One owned partition: its own OS thread with an [`Engine`] holding only the partition's
//! tokens. It loads the partition's newest snapshot from the object store, consumes the
//! partition's subject from the sequence after it, applies every batch with the clock its
//! ingesting node stamped on it (so a replay applies exactly what the first owner did),
//! publishes every closed window, shares every refit with the other partitions, and
//! writes a snapshot now and then. Every side effect first checks the lease.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use async_nats::jetstream::message::PublishMessage;
use prost::Message as _;
use tokio::io::AsyncReadExt;
use tokio_stream::StreamExt;

use super::lease::Lease;
use super::wire;
use super::{PartStatus, Shared};
use crate::engine::{fit_shares, Engine, Exchange, Share, WindowScore};
use crate::model::Global;
use crate::respond::actions::Responder;
use crate::server::pb;
use crate::store::LogPos;
use std::collections::btree_map::Entry;
use std::collections::BTreeMap;

use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;

/// How long one wait for the next message lasts before the partition looks at cluster
/// time (and its lease, and its snapshot clock).
const POLL: Duration = Duration::from_millis(200);

/// How often a partition waiting at a refit looks for the other partitions' shares.
const EXCHANGE_POLL: Duration = Duration::from_millis(50);

/// Run partition `p` until `stop` is set or its lease is lost. A stop (handover,
/// shutdown) with the lease still held writes a last snapshot first.
pub fn run(shared: Arc<Shared>, p: u32, lease: Arc<Lease>, stop: Arc<AtomicBool>) {
    let h = shared.handle.clone();
    let loaded = match load(&shared, p) {
        Ok(Found::Loaded(l)) => Some(l),
        Ok(Found::Missing) => None,
        Ok(Found::Damaged { reason, bytes }) => {
            // A snapshot that cannot be used (damaged, or written by a version whose model
            // state this one cannot read) must not keep the partition from being applied:
            // it is moved aside, never deleted unread, and the partition is rebuilt from
            // the events its stream still holds.
            match h.block_on(quarantine(&shared, p, &bytes, &reason)) {
                Ok(name) => tracing::error!(
                    partition = p,
                    reason = %reason,
                    moved_to = %name,
                    "the partition's snapshot cannot be used; moved aside, rebuilding the partition from the events its stream holds (baselines from before the stream's retention are lost)"
                ),
                Err(e) => {
                    tracing::error!(partition = p, reason = %reason, error = %e, "the partition's snapshot cannot be used and cannot be moved aside; not taking it");
                    return;
                }
            }
            None
        }
        Err(e) => {
            tracing::error!(partition = p, error = %e, "cannot read the partition's snapshot; not taking it");
            return;
        }
    };
    let (mut engine, mut seq, saved) = match loaded {
        Some(l) => l,
        None => {
            let mut e = Engine::new(shared.cfg.clone(), shared.registry.clone());
            if let Err(err) = attach_spill(&mut e, &shared.work_dir.join(format!("p{p}")), None) {
                tracing::error!(partition = p, error = %err, "cannot open the partition's token spill; not taking it");
                return;
            }
            (e, 0, None)
        }
    };
    // The stream's oldest event: what a replay can still read.
    let first = match h.block_on(async {
        let st = shared.js.get_stream(wire::EVENTS).await;
        st.map(|st| st.cached_info().state.first_sequence)
            .map_err(|e| e.to_string())
    }) {
        Ok(f) => f,
        Err(e) => {
            tracing::error!(partition = p, error = %e, "cannot read the events stream's first sequence; not taking it");
            return;
        }
    };
    if seq > 0 && first > seq + 1 {
        // Said, not hidden: a snapshot older than the stream's retention.
        tracing::error!(
            partition = p,
            snapshot_sequence = seq,
            stream_first_sequence = first,
            "the stream no longer holds every event after the partition's snapshot (its retention): this partition's events among the sequences in between are not applied (they are in its history chunks, if they were written)"
        );
        metrics::counter!("tokenwatch_cluster_replay_gaps_total").increment(1);
    }
    // History chunks that start after this sequence are dropped (replayed, written again).
    // The chunks of events the stream no longer holds (past its retention: without a
    // snapshot, or after an old one) are the only copy and are kept.
    let history_after = seq.max(first.saturating_sub(1));
    let mut own = shared.responder();
    if let (Some(r), Some(v)) = (own.as_mut(), saved.as_ref()) {
        if let Err(e) = r.import(v) {
            // The engine goes on; open alerts may fire once more as new ones.
            tracing::warn!(partition = p, error = %e, "the snapshot's alert policy state cannot be read; starting it empty");
        }
    }
    let responder = own.map(|r| Arc::new(std::sync::Mutex::new(r)));
    // Windows the previous owner already published (and acted on): judged again to
    // follow the policies' state, but their actions are not delivered twice.
    let delivered = match h.block_on(last_published(&shared, p)) {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(partition = p, error = %e, "cannot read the partition's last published window; not taking it");
            return;
        }
    };
    tracing::info!(
        partition = p,
        from_sequence = seq + 1,
        "partition owned: replaying its events from the stream"
    );
    engine.set_exchange(Box::new(Refits {
        shared: shared.clone(),
        p,
        lease: lease.clone(),
        stop: stop.clone(),
    }));
    let mut messages = match h.block_on(consume(&shared, p, seq)) {
        Ok(m) => m,
        Err(e) => {
            tracing::error!(partition = p, error = %e, "cannot consume the partition's events");
            return;
        }
    };
    // Chunks an owner wrote past the snapshot it covered (it died before the snapshot) are
    // replayed again from it: deleted first, so each event is in the history once.
    // Events up to `kept` are in history chunks that stay (they start at or before the
    // snapshot): not written again.
    let kept = match h.block_on(drop_history_after(&shared, p, history_after)) {
        Ok((0, kept)) => kept,
        Ok((n, kept)) => {
            tracing::info!(
                partition = p,
                chunks = n,
                after = history_after,
                "history chunks past the snapshot removed; replayed again"
            );
            kept
        }
        Err(e) => {
            tracing::error!(partition = p, error = %e, "cannot clean the partition's history; not taking it");
            return;
        }
    };
    // Shared with the node's answers to the console's alert pages while this worker runs.
    if let Some(r) = &responder {
        shared.responders_mut().insert(p, r.clone());
    }
    // Token views and snapshots on request are answered by this worker between two
    // messages.
    let me = shared.workers.fetch_add(1, Ordering::Relaxed);
    let (ask_tx, asks) = std::sync::mpsc::channel::<Ask>();
    shared
        .asks
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(p, (me, ask_tx));
    let mut hist = Pending::default();
    let mut snap_seq = seq;
    let mut last_snapshot = Instant::now();
    let mut last_arrival = Instant::now();
    let mut newest_at_arrival = engine.newest();
    let mut lag: u64;
    loop {
        if stop.load(Ordering::Relaxed) {
            if lease.valid() && seq > snap_seq {
                let saved = flush_history(&shared, p, &mut hist, &lease)
                    .and_then(|_| save(&shared, p, &engine, lock(&responder).as_deref(), seq));
                if let Err(e) = saved {
                    tracing::warn!(partition = p, error = %e, "last snapshot before handing over failed");
                }
            }
            break;
        }
        if !lease.valid() {
            tracing::warn!(
                partition = p,
                "lease lost: this node stops applying the partition"
            );
            break;
        }
        if seq > snap_seq && last_snapshot.elapsed() >= shared.snapshot_every {
            // The history first: a snapshot never covers an event the history lacks.
            let saved = flush_history(&shared, p, &mut hist, &lease)
                .and_then(|_| save(&shared, p, &engine, lock(&responder).as_deref(), seq));
            match saved {
                Ok(()) => snap_seq = seq,
                Err(e) => tracing::warn!(partition = p, error = %e, "partition snapshot failed"),
            }
            last_snapshot = Instant::now();
        } else if hist.rows >= CHUNK_ROWS
            || hist
                .since
                .is_some_and(|t| t.elapsed() >= shared.history_every)
        {
            if let Err(e) = flush_history(&shared, p, &mut hist, &lease) {
                tracing::warn!(partition = p, error = %e, "writing the partition's history failed; retried");
            }
        }
        while let Ok(ask) = asks.try_recv() {
            match ask {
                Ask::Describe(token, keys, reply) => {
                    let view = engine
                        .describe(&token, &keys)
                        .map(|(state, endpoints, agents)| {
                            Box::new(crate::server::host::TokenView {
                                state,
                                endpoints,
                                agents,
                            })
                        });
                    let _ = reply.send(view);
                }
                Ask::Snapshot(reply) => {
                    let saved = if seq > snap_seq {
                        flush_history(&shared, p, &mut hist, &lease).and_then(|_| {
                            save(&shared, p, &engine, lock(&responder).as_deref(), seq)
                        })
                    } else {
                        // Nothing applied since the last one: it is current.
                        Ok(())
                    };
                    if saved.is_ok() {
                        snap_seq = seq;
                        last_snapshot = Instant::now();
                    }
                    let _ = reply.send(saved.map(|_| snap_seq));
                }
            }
        }
        let next = h.block_on(async { tokio::time::timeout(POLL, messages.next()).await });
        let scores = match next {
            Ok(Some(Ok(m))) => {
                let (s, pending) = match m.info() {
                    Ok(i) => (i.stream_sequence, i.pending),
                    Err(e) => {
                        tracing::warn!(partition = p, error = %e, "a message without stream info; skipped");
                        continue;
                    }
                };
                if s <= seq {
                    continue;
                }
                lag = pending;
                if engine.next_refit().is_none() {
                    match h.block_on(super::origin(&shared)) {
                        Ok(Some(o)) => engine.set_refit_origin(o),
                        // Ingest writes the origin before it publishes anything.
                        Ok(None) => tracing::warn!(
                            partition = p,
                            "no refit origin in the cluster; taking this batch's"
                        ),
                        Err(e) => {
                            tracing::warn!(partition = p, error = %e, "cannot read the refit origin; retrying");
                            break;
                        }
                    }
                }
                let header = |name: &str| {
                    m.headers
                        .as_ref()
                        .and_then(|hd| hd.get(name))
                        .map(|v| v.as_str().to_string())
                };
                if header(wire::KIND_HEADER).as_deref() == Some(wire::FEEDBACK_KIND) {
                    let result = feedback(&mut engine, lock(&responder).as_deref_mut(), &m.payload);
                    if let Err(e) = &result {
                        tracing::warn!(partition = p, sequence = s, error = %e, "verdict not applied");
                    }
                    // Only the first owner answers; a replay's submitter is long gone.
                    if let Some(inbox) = header(wire::REPLY_HEADER).filter(|_| s > delivered.0) {
                        let reply =
                            serde_json::to_vec(&wire::FeedbackReply { result }).unwrap_or_default();
                        let _ = h.block_on(shared.client.publish(inbox, reply.into()));
                    }
                    seq = s;
                    continue;
                }
                let now = header(wire::NOW_HEADER)
                    .and_then(|v| v.parse::<i64>().ok())
                    .unwrap_or(i64::MAX);
                let out = match wire::decode_batch(&m.payload) {
                    Ok(b) => {
                        let out = engine.apply_at(&b, now).map_err(|e| e.to_string());
                        if out.is_ok() && s > kept {
                            hist.push(&b, s);
                        }
                        out
                    }
                    Err(e) => Err(e),
                };
                seq = s;
                last_arrival = Instant::now();
                newest_at_arrival = engine.newest();
                match out {
                    Ok(scores) => scores,
                    Err(e) => {
                        // Published by a node of this cluster: a defect, not an attack;
                        // every replay skips it the same way.
                        tracing::error!(partition = p, sequence = s, error = %e, "a message of the events stream cannot be applied; skipped");
                        Vec::new()
                    }
                }
            }
            Ok(Some(Err(e))) => {
                tracing::warn!(partition = p, error = %e, "reading the partition's events");
                std::thread::sleep(POLL);
                continue;
            }
            Ok(None) => {
                tracing::warn!(
                    partition = p,
                    "the partition's consumer ended; consuming again"
                );
                match h.block_on(consume(&shared, p, seq)) {
                    Ok(m) => messages = m,
                    Err(e) => {
                        tracing::error!(partition = p, error = %e, "cannot consume the partition's events");
                        break;
                    }
                }
                continue;
            }
            // Nothing for a while: follow cluster time, then idle close.
            Err(_) => {
                lag = 0;
                // A partition that has had no event yet still follows the refit grid: the
                // other partitions wait for its share at every refit point.
                if engine.next_refit().is_none() {
                    if let Ok(Some(o)) = h.block_on(super::origin(&shared)) {
                        engine.set_refit_origin(o);
                    }
                }
                let mut scores = match h.block_on(cluster_time(&shared, p, seq)) {
                    Ok(Some(t)) => engine.advance_to(t),
                    Ok(None) => Vec::new(),
                    Err(e) => {
                        tracing::debug!(partition = p, error = %e, "cannot read cluster time");
                        Vec::new()
                    }
                };
                let idle = last_arrival.elapsed();
                if let Some(newest) = newest_at_arrival.filter(|_| idle >= shared.idle_close) {
                    let now = newest.saturating_add(idle.as_millis().min(i64::MAX as u128) as i64);
                    scores.extend(engine.advance_to(now));
                }
                scores
            }
        };
        if engine.fenced() {
            tracing::warn!(
                partition = p,
                "refit exchange abandoned: this node stops applying the partition"
            );
            break;
        }
        if !scores.is_empty() {
            if !lease.valid() {
                break;
            }
            let ids = judge(lock(&responder).as_deref_mut(), &scores, seq, delivered);
            if let Err(e) = h.block_on(publish(&shared, p, &scores, &ids, seq)) {
                // Not applied as far as the cluster knows: the next owner (or this node
                // again) replays from the last snapshot and publishes them then.
                tracing::error!(partition = p, error = %e, "cannot publish window scores; giving the partition up");
                break;
            }
        }
        let status = PartStatus {
            stats: engine.stats(),
            seq,
            lag,
        };
        shared
            .parts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(p, status);
    }
    shared
        .parts
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&p);
    {
        let mut ds = shared.asks.lock().unwrap_or_else(|e| e.into_inner());
        if ds.get(&p).is_some_and(|(id, _)| *id == me) {
            ds.remove(&p);
        }
    }
    {
        // Not a newer worker's of the same partition.
        let mut rs = shared.responders_mut();
        if let (Some(mine), Some(there)) = (&responder, rs.get(&p)) {
            if Arc::ptr_eq(mine, there) {
                rs.remove(&p);
            }
        }
    }
    tracing::info!(partition = p, sequence = seq, "partition released");
}

/// Cluster event time, if this partition has applied everything published before it:
/// the clock is raised by ingest only after the events behind it are acknowledged, so a
/// partition whose last applied sequence is its subject's last has every one of them.
async fn cluster_time(shared: &Shared, p: u32, seq: u64) -> Result<Option<i64>, String> {
    let Some(clock) = super::read_i64(&shared.facts, "clock").await? else {
        return Ok(None);
    };
    match shared
        .events
        .get_last_raw_message_by_subject(&wire::events_subject(p))
        .await
    {
        Ok(m) if m.sequence > seq => return Ok(None),
        Ok(_) => {}
        Err(e)
            if e.kind()
                == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {}
        Err(e) => return Err(e.to_string()),
    }
    Ok(Some(clock))
}

/// An ordered consumer of partition `p`'s subject from the sequence after `seq`.
async fn consume(shared: &Shared, p: u32, seq: u64) -> Result<pull::Ordered, String> {
    let deliver_policy = if seq == 0 {
        DeliverPolicy::All
    } else {
        DeliverPolicy::ByStartSequence {
            start_sequence: seq + 1,
        }
    };
    let consumer = shared
        .events
        .create_consumer(pull::OrderedConfig {
            filter_subject: wire::events_subject(p),
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    consumer.messages().await.map_err(|e| e.to_string())
}

/// A partition's responder, locked (only the partition thread and the console's alert
/// pages take it, each briefly).
fn lock(
    r: &Option<Arc<std::sync::Mutex<Responder>>>,
) -> Option<std::sync::MutexGuard<'_, Responder>> {
    r.as_ref()
        .map(|r| r.lock().unwrap_or_else(|e| e.into_inner()))
}

/// Judge closed windows against the alert policies (see [`last_published`] for
/// `delivered`); per window, the alerts it raised or grew (one per matching policy).
fn judge(
    responder: Option<&mut Responder>,
    scores: &[WindowScore],
    seq: u64,
    delivered: (u64, i64),
) -> Vec<Vec<String>> {
    let Some(r) = responder else {
        return vec![Vec::new(); scores.len()];
    };
    scores
        .iter()
        .map(|s| {
            let (upto, last_start) = delivered;
            r.set_quiet(seq < upto || (seq == upto && s.start <= last_start));
            r.judge_all(std::slice::from_ref(s))
                .into_iter()
                .map(|(_, _, id)| id)
                .collect()
        })
        .collect()
}

/// The events-stream sequence and window start of the last window published on
/// partition `p`'s scores subject ((0, MIN) when none): the point up to which its previous
/// owner delivered the actions of its alerts.
async fn last_published(shared: &Shared, p: u32) -> Result<(u64, i64), String> {
    let stream = shared
        .js
        .get_stream(wire::SCORES)
        .await
        .map_err(|e| e.to_string())?;
    match stream
        .get_last_raw_message_by_subject(&wire::scores_subject(p))
        .await
    {
        Ok(m) => {
            let seq = m
                .headers
                .get(wire::SEQ_HEADER)
                .and_then(|v| v.as_str().parse::<u64>().ok())
                .unwrap_or(0);
            let start = pb::TokenRisk::decode(m.payload.as_ref())
                .map(|r| r.window_start_ms)
                .unwrap_or(i64::MIN);
            Ok((seq, start))
        }
        Err(e)
            if e.kind()
                == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
        {
            Ok((0, i64::MIN))
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Apply a verdict that came through the events stream: the alert's policy memory and the
/// token's models, as the embedded server's `SubmitFeedback` does.
fn feedback(
    engine: &mut Engine,
    responder: Option<&mut Responder>,
    payload: &[u8],
) -> Result<(String, u32, Vec<String>, Option<i64>), String> {
    let f: wire::Feedback =
        serde_json::from_slice(payload).map_err(|e| format!("a verdict message: {e}"))?;
    let verdict = crate::engine::Verdict::parse(&f.verdict)
        .ok_or_else(|| format!("unknown verdict {:?}", f.verdict))?;
    let r =
        responder.ok_or("the cluster runs without alert policies, so there are no alert ids")?;
    let (info, effect) = r.apply_verdict(engine, &f.alert_id, verdict, &f.note, f.at)?;
    Ok((
        info.token.to_string(),
        effect.learned_windows,
        effect.damped.iter().map(|s| s.name().to_string()).collect(),
        effect.hold_until,
    ))
}

/// Publish closed windows (and the alerting ones as alerts, with the alert id a policy
/// gave them), waiting for every ack. Each carries `seq`, the events-stream sequence that
/// closed it.
async fn publish(
    shared: &Shared,
    p: u32,
    scores: &[WindowScore],
    ids: &[Vec<String>],
    seq: u64,
) -> Result<(), String> {
    let subject = wire::scores_subject(p);
    let mut acks = Vec::with_capacity(scores.len());
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(wire::SEQ_HEADER, seq.to_string().as_str());
    for (i, s) in scores.iter().enumerate() {
        let risk = pb::TokenRisk::from(s);
        let id = wire::window_id(&s.token, s.start);
        if s.alert {
            let mut alert = pb::Alert::from(&risk);
            alert.alert_id = ids[i].first().cloned().unwrap_or_default();
            let mut h = async_nats::HeaderMap::new();
            h.insert(wire::ALERT_IDS_HEADER, ids[i].join(",").as_str());
            let msg = PublishMessage::build()
                .headers(h)
                .payload(alert.encode_to_vec().into())
                .message_id(&id);
            acks.push(
                shared
                    .js
                    .send_publish(wire::ALERTS_SUBJECT, msg)
                    .await
                    .map_err(|e| e.to_string())?,
            );
        }
        let msg = PublishMessage::build()
            .payload(risk.encode_to_vec().into())
            .headers(headers.clone())
            .message_id(&id);
        acks.push(
            shared
                .js
                .send_publish(subject.clone(), msg)
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    for a in acks {
        a.await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// What a node asks of a partition's worker (answered between two messages).
pub(super) enum Ask {
    /// A token's view (the console's token page): the token, the user-agent keys to name,
    /// and where the answer goes.
    Describe(
        Arc<str>,
        Vec<u64>,
        tokio::sync::oneshot::Sender<Option<Box<crate::server::host::TokenView>>>,
    ),
    /// Write the history chunk and the snapshot now (the Snapshot RPC); the stream
    /// sequence the partition's snapshot covers.
    Snapshot(tokio::sync::oneshot::Sender<Result<u64, String>>),
}

/// Events applied since the last history chunk (see [`wire::HISTORY`]), encoded as they
/// come: one Parquet writer per UTC date, so what waits for the next chunk is its encoded
/// columns (a few bytes an event), not the decoded batches (holding those cost a third of
/// the node's throughput in page faults alone).
#[derive(Default)]
struct Pending {
    writers: BTreeMap<String, ArrowWriter<Vec<u8>>>,
    rows: usize,
    /// Stream sequences of the first and last batch.
    first: u64,
    last: u64,
    /// When the first batch came.
    since: Option<Instant>,
    /// Finished chunks not yet put (name, Parquet bytes), oldest first.
    ready: Vec<(String, Vec<u8>)>,
    /// Encoding failed: no chunk (and so no snapshot) is written again by this worker; the
    /// next owner replays from the last snapshot.
    broken: Option<String>,
}

impl Pending {
    fn push(&mut self, b: &RecordBatch, seq: u64) {
        if self.rows == 0 {
            self.first = seq;
            self.since = Some(Instant::now());
        }
        self.last = seq;
        self.rows += b.num_rows();
        if self.broken.is_some() {
            return;
        }
        if let Err(e) = self.encode(b) {
            self.broken = Some(e);
        }
    }

    fn encode(&mut self, b: &RecordBatch) -> Result<(), String> {
        for (date, parts) in crate::store::history::by_date(std::slice::from_ref(b))? {
            let w = match self.writers.entry(date) {
                Entry::Occupied(o) => o.into_mut(),
                Entry::Vacant(v) => v.insert(crate::store::history::parquet_writer(Vec::new())?),
            };
            for part in &parts {
                w.write(part).map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }

    /// Finish the open writers into ready chunks named by partition `p` and their range.
    fn finish(&mut self, p: u32) -> Result<(), String> {
        for (date, w) in std::mem::take(&mut self.writers) {
            let bytes = w.into_inner().map_err(|e| e.to_string())?;
            self.ready
                .push((history_name(p, &date, self.first, self.last), bytes));
        }
        self.rows = 0;
        self.since = None;
        Ok(())
    }

    fn is_empty(&self) -> bool {
        self.rows == 0 && self.ready.is_empty() && self.broken.is_none()
    }
}

/// Rows a partition buffers for its history before it writes a chunk between snapshots
/// (or `--cluster-history-every`, whichever comes first).
const CHUNK_ROWS: usize = 256 * 1024;

/// Object name of a history chunk of partition `p`.
fn history_name(p: u32, date: &str, first: u64, last: u64) -> String {
    format!("p{p}/date={date}/part-{first:020}-{last:020}.parquet")
}

/// Partition, date, and first and last stream sequence of a history chunk's object name.
pub(super) fn parse_history_name(name: &str) -> Option<(u32, String, u64, u64)> {
    let (p, rest) = name.strip_prefix('p')?.split_once('/')?;
    let (date, file) = rest.strip_prefix("date=")?.split_once('/')?;
    let (first, last) = file
        .strip_prefix("part-")?
        .strip_suffix(".parquet")?
        .split_once('-')?;
    Some((
        p.parse().ok()?,
        date.to_string(),
        first.parse().ok()?,
        last.parse().ok()?,
    ))
}

/// Write the pending events as history chunks (one Parquet object per UTC date, named by
/// the stream sequences they cover) and empty it. Checks the lease first, as the snapshots
/// do (check, then put: see the README on fencing).
fn flush_history(
    shared: &Shared,
    p: u32,
    pending: &mut Pending,
    lease: &Lease,
) -> Result<(), String> {
    if pending.is_empty() {
        return Ok(());
    }
    if let Some(e) = &pending.broken {
        return Err(format!("encoding the history failed: {e}"));
    }
    if !lease.valid() {
        return Err("the lease is no longer held".into());
    }
    if pending.rows > 0 {
        if let Err(e) = pending.finish(p) {
            pending.broken = Some(e.clone());
            return Err(format!("encoding the history failed: {e}"));
        }
    }
    // Oldest first; a failed put keeps it and what follows for the next try (a chunk's
    // name is its range: written again, it replaces itself).
    while let Some((name, bytes)) = pending.ready.first() {
        if !lease.valid() {
            return Err("the lease is no longer held".into());
        }
        shared
            .handle
            .block_on(shared.history.put(name.as_str(), &mut bytes.as_slice()))
            .map_err(|e| format!("history chunk {name}: {e}"))?;
        pending.ready.remove(0);
    }
    Ok(())
}

/// Delete partition `p`'s history chunks that start after stream sequence `seq`; how many,
/// and the last sequence the chunks that stay cover (0: none).
async fn drop_history_after(shared: &Shared, p: u32, seq: u64) -> Result<(u64, u64), String> {
    let mut list = shared.history.list().await.map_err(|e| e.to_string())?;
    let mut gone = Vec::new();
    let mut kept = 0;
    while let Some(info) = list.next().await {
        let info = info.map_err(|e| e.to_string())?;
        if info.deleted {
            continue;
        }
        if let Some((q, _, first, last)) = parse_history_name(&info.name) {
            if q != p {
                continue;
            }
            if first > seq {
                gone.push(info.name);
            } else {
                kept = kept.max(last);
            }
        }
    }
    for name in &gone {
        shared
            .history
            .delete(name)
            .await
            .map_err(|e| format!("{name}: {e}"))?;
    }
    Ok((gone.len() as u64, kept))
}

/// Object name of partition `p`'s snapshot.
fn snapshot_name(p: u32) -> String {
    format!("p{p}")
}

/// Metadata key of the stream sequence a snapshot covers.
const SEQ_KEY: &str = "sequence";

/// Write partition `p`'s snapshot (covering the stream up to `seq`) to the object store,
/// unless a snapshot of a later sequence is already there (written by a newer owner).
fn save(
    shared: &Shared,
    p: u32,
    engine: &Engine,
    responder: Option<&Responder>,
    seq: u64,
) -> Result<(), String> {
    let h = &shared.handle;
    let name = snapshot_name(p);
    if let Ok(info) = h.block_on(shared.snaps.info(&name)) {
        let theirs = info
            .metadata
            .get(SEQ_KEY)
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0);
        if theirs >= seq {
            return Ok(());
        }
    }
    let dir = shared.work_dir.join(format!("p{p}"));
    let bytes = encode(engine, responder, &dir, seq)?;
    let meta = async_nats::jetstream::object_store::ObjectMetadata {
        name,
        metadata: [(SEQ_KEY.to_string(), seq.to_string())].into(),
        ..Default::default()
    };
    h.block_on(shared.snaps.put(meta, &mut bytes.as_slice()))
        .map_err(|e| e.to_string())?;
    tracing::debug!(
        partition = p,
        sequence = seq,
        bytes = bytes.len(),
        "partition snapshot written"
    );
    Ok(())
}

/// What a partition's snapshot holds: its engine, the stream sequence it covers, and the
/// alert policies' state.
type Loaded = (Engine, u64, Option<serde_json::Value>);

/// What reading a partition's snapshot found.
enum Found {
    /// No snapshot: the partition starts empty.
    Missing,
    /// The snapshot, decoded.
    Loaded(Loaded),
    /// A snapshot that was read but cannot be used: why, and its bytes.
    Damaged { reason: String, bytes: Vec<u8> },
}

/// Partition `p`'s newest snapshot (an error: it could not be read, try again later).
fn load(shared: &Shared, p: u32) -> Result<Found, String> {
    let name = snapshot_name(p);
    let bytes = shared.handle.block_on(async {
        let mut obj = match shared.snaps.get(&name).await {
            Ok(o) => o,
            Err(e) if e.kind() == async_nats::jetstream::object_store::GetErrorKind::NotFound => {
                return Ok(None)
            }
            Err(e) => return Err(e.to_string()),
        };
        let mut bytes = Vec::new();
        // An object replaced while it is read can leave the reader waiting for chunks that
        // were purged: bounded, and the partition is tried again.
        tokio::time::timeout(READ_TIMEOUT, obj.read_to_end(&mut bytes))
            .await
            .map_err(|_| format!("reading {name} timed out"))?
            .map_err(|e| e.to_string())?;
        Ok(Some(bytes))
    })?;
    let Some(bytes) = bytes else {
        return Ok(Found::Missing);
    };
    let dir = shared.work_dir.join(format!("p{p}"));
    match decode(&bytes, &shared.cfg, &shared.registry, &dir) {
        Ok(l) => Ok(Found::Loaded(l)),
        Err(Unloaded::Damaged(reason)) => Ok(Found::Damaged {
            reason: format!("{name}: {reason}"),
            bytes,
        }),
        Err(Unloaded::Local(e)) => Err(format!("{name}: {e}")),
    }
}

/// Move partition `p`'s unusable snapshot aside: its bytes to `p<p>.damaged` in the
/// snapshot store (one per partition: the latest replaces an earlier one), with the
/// reason in its metadata, then the snapshot itself deleted so that the rebuilt partition
/// writes its own. The name it was moved to.
async fn quarantine(shared: &Shared, p: u32, bytes: &[u8], reason: &str) -> Result<String, String> {
    let name = format!("{}.damaged", snapshot_name(p));
    let meta = async_nats::jetstream::object_store::ObjectMetadata {
        name: name.clone(),
        description: Some(reason.chars().take(1000).collect()),
        metadata: [(
            "moved_at_ms".to_string(),
            crate::server::host::now_ms().to_string(),
        )]
        .into(),
        ..Default::default()
    };
    let mut r = bytes;
    shared
        .snaps
        .put(meta, &mut r)
        .await
        .map_err(|e| format!("{name}: {e}"))?;
    shared
        .snaps
        .delete(snapshot_name(p))
        .await
        .map_err(|e| format!("{}: {e}", snapshot_name(p)))?;
    Ok(name)
}

/// A partition's snapshot object (see [`wire::pack_snapshot`]): the engine with the
/// savepoint of its spill, the responder's state, and the spill file as of that savepoint,
/// so a new owner gets the evicted tokens' baselines too. `dir`: the partition's scratch
/// directory on this node.
pub(crate) fn encode(
    engine: &Engine,
    responder: Option<&Responder>,
    dir: &Path,
    seq: u64,
) -> Result<Vec<u8>, String> {
    let pos = LogPos {
        segment: seq,
        batches: 0,
    };
    let snap = engine.snapshot_with_spill().map_err(|e| e.to_string())?;
    let spill = match (&snap.spill, engine.spill_file()) {
        (Some(_), Some(name)) => {
            let path = crate::store::spill::dir(dir).join(name);
            std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?
        }
        _ => Vec::new(),
    };
    let path = crate::store::snapshot::write(dir, &snap, pos).map_err(|e| e.to_string())?;
    let parquet = std::fs::read(&path).map_err(|e| e.to_string());
    let _ = std::fs::remove_file(&path);
    Ok(wire::pack_snapshot(
        &parquet?,
        responder.map(|r| r.export()).as_ref(),
        &spill,
    ))
}

/// Why a snapshot object could not be loaded.
#[derive(Debug)]
pub(crate) enum Unloaded {
    /// The object itself cannot be used (damaged, incomplete, or model state of another
    /// version).
    Damaged(String),
    /// This node could not do its part (its scratch directory): the object may be fine.
    Local(String),
}

impl std::fmt::Display for Unloaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unloaded::Damaged(m) | Unloaded::Local(m) => f.write_str(m),
        }
    }
}

/// The engine (with its spill in `dir`), the stream sequence and the responder state of a
/// snapshot object [`encode`] wrote.
pub(crate) fn decode(
    bytes: &[u8],
    cfg: &crate::config::Config,
    registry: &crate::model::registry::Registry,
    dir: &Path,
) -> Result<Loaded, Unloaded> {
    let local = |e: std::io::Error| Unloaded::Local(format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(local)?;
    let packed = wire::unpack_snapshot(bytes).map_err(Unloaded::Damaged)?;
    let path = dir.join("loaded.parquet");
    std::fs::write(&path, packed.parquet).map_err(local)?;
    let read = crate::store::snapshot::read(&path);
    let _ = std::fs::remove_file(&path);
    let (snap, pos) = read.map_err(|e| Unloaded::Damaged(e.to_string()))?;
    let mut engine = Engine::restore(cfg.clone(), registry.clone(), &snap)
        .map_err(|e| Unloaded::Damaged(format!("model state: {e}")))?;
    let spill = match (&snap.spill, packed.spill.is_empty()) {
        (Some(r), false) => Some((packed.spill, r.savepoint)),
        (Some(_), true) => {
            return Err(Unloaded::Damaged(
                "its evicted tokens' spill is missing".into(),
            ))
        }
        (None, _) => None,
    };
    if let Err(e) = attach_spill(&mut engine, dir, spill) {
        // The spill's bytes, or this node's directory? An empty spill tells.
        return Err(match attach_spill(&mut engine, dir, None) {
            Ok(()) => Unloaded::Damaged(format!("its evicted tokens' spill: {e}")),
            Err(_) => Unloaded::Local(e),
        });
    }
    Ok((engine, pos.segment, packed.responder))
}

/// Give a partition's engine a spill file of its own in `dir` (a new generation; the
/// earlier ones of this directory are deleted): `from`, the bytes of a snapshot's spill and
/// its savepoint, or empty. A named spill (not a temporary one) is what lets the snapshot
/// carry the evicted tokens.
pub(crate) fn attach_spill(
    engine: &mut Engine,
    dir: &Path,
    from: Option<(&[u8], u64)>,
) -> Result<(), String> {
    use crate::store::spill;
    let (s, name) = spill::create_next(dir).map_err(|e| e.to_string())?;
    // Earlier generations belong to earlier owners of the partition on this node (a worker
    // still winding down keeps its open file; a name is never reused while it lives).
    for old in spill::files(dir).map_err(|e| e.to_string())? {
        if old != name {
            let _ = std::fs::remove_file(spill::dir(dir).join(old));
        }
    }
    let s = match from {
        None => s,
        Some((bytes, savepoint)) => {
            let path = s.path().to_path_buf();
            drop(s);
            std::fs::write(&path, bytes).map_err(|e| format!("{}: {e}", path.display()))?;
            let s = spill::Spill::open(&path).map_err(|e| e.to_string())?;
            s.restore(savepoint).map_err(|e| e.to_string())?;
            s
        }
    };
    engine.set_spill(Arc::new(s), name);
    Ok(())
}

/// Longest read of one object (a share, a snapshot).
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// An object's bytes; `None` when it is missing, unreadable or not read within
/// [`READ_TIMEOUT`] (replaced meanwhile: the caller tries again).
async fn read_object(
    store: &async_nats::jetstream::object_store::ObjectStore,
    name: &str,
) -> Option<Vec<u8>> {
    tokio::time::timeout(READ_TIMEOUT, async {
        let mut o = store.get(name).await.ok()?;
        let mut b = Vec::new();
        o.read_to_end(&mut b).await.ok()?;
        Some(b)
    })
    .await
    .ok()
    .flatten()
}

/// The refit exchange through the object store: each partition writes its share as
/// `refit/<point>/p<p>` and reads everyone's. A replaying owner rewrites the same bytes
/// (the engine is deterministic), so a share written by a dead owner stays valid.
struct Refits {
    shared: Arc<Shared>,
    p: u32,
    lease: Arc<Lease>,
    /// A handover or shutdown waits for no barrier: the next owner replays to it.
    stop: Arc<AtomicBool>,
}

impl Exchange for Refits {
    fn refit(&mut self, at: i64, share: Share) -> Option<(Arc<Global>, i64)> {
        let shared = self.shared.clone();
        let (p, n) = (self.p, shared.n);
        let lease = self.lease.clone();
        let h = shared.handle.clone();
        if !lease.valid() {
            return None;
        }
        let mine = share.encode();
        let name = |q: u32| format!("refit/{at}/p{q}");
        // A replaying owner finds its share already there (the same bytes: the engine is
        // deterministic) and does not replace it under the readers' feet.
        let put = h.block_on(async {
            match read_object(&shared.refits, &name(p)).await {
                Some(b) if b == mine => Ok(()),
                _ => shared
                    .refits
                    .put(name(p).as_str(), &mut mine.as_slice())
                    .await
                    .map(|_| ()),
            }
        });
        if let Err(e) = put {
            tracing::error!(partition = p, error = %e, "cannot write the refit share");
            return None;
        }
        let cap = shared.cfg.isolation.reservoir;
        let mut shares: Vec<Option<Share>> = (0..n).map(|_| None).collect();
        let started = Instant::now();
        let mut told = Instant::now();
        loop {
            for q in 0..n {
                if shares[q as usize].is_some() {
                    continue;
                }
                let got = h.block_on(read_object(&shared.refits, &name(q)));
                if let Some(b) = got {
                    match Share::decode(&b, cap) {
                        Ok(s) => shares[q as usize] = Some(s),
                        Err(e) => {
                            tracing::warn!(partition = q, at, error = %e, "a refit share cannot be read; waiting for it again")
                        }
                    }
                }
            }
            if shares.iter().all(Option::is_some) {
                break;
            }
            if !lease.valid() || self.stop.load(Ordering::Relaxed) {
                return None;
            }
            if told.elapsed() >= Duration::from_secs(30) {
                let missing: Vec<u32> = (0..n).filter(|&q| shares[q as usize].is_none()).collect();
                tracing::warn!(
                    partition = p,
                    at,
                    ?missing,
                    waited_s = started.elapsed().as_secs(),
                    "waiting for the other partitions at a refit"
                );
                told = Instant::now();
            }
            std::thread::sleep(EXCHANGE_POLL);
        }
        let all: Vec<Share> = shares.into_iter().flatten().collect();
        let (global, earliest) = fit_shares(all, &shared.cfg, at);
        if p == 0 {
            // The fitted models of each refit, versioned by its point.
            let mut w = crate::model::codec::Writer::default();
            global.encode(&mut w);
            let name = format!("global/{at}");
            let r =
                h.block_on(async { shared.snaps.put(name.as_str(), &mut w.buf.as_slice()).await });
            if let Err(e) = r {
                tracing::warn!(at, error = %e, "cannot store the fitted models");
            }
        }
        Some((Arc::new(global), earliest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::model::registry::Registry;

    /// A partition handed over with evicted tokens: the new owner's engine, restored from
    /// the snapshot object in another directory, scores the rest exactly as the old one
    /// would have (the evicted tokens come back with their baselines from the carried spill).
    #[test]
    fn a_snapshot_object_carries_the_evicted_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let mut g = crate::generate::Options::new(dir.path().join("gen"));
        g.tokens = 12;
        g.days = 3;
        g.seed = 3;
        g.scale = 0.2;
        crate::generate::run(&g).unwrap();
        let path = dir.path().join("gen/events.parquet");
        let mut reader =
            crate::ingest::EventReader::open(&path, crate::ingest::BadRowPolicy::Fail).unwrap();
        let mut batches = Vec::new();
        while let Some(b) = reader.next_batch().unwrap() {
            for at in (0..b.num_rows()).step_by(500) {
                batches.push(b.slice(at, 500.min(b.num_rows() - at)));
            }
        }
        let mut cfg = Config::default();
        cfg.window.size.ms = 300_000;
        cfg.engine.shards = 1;
        cfg.engine.max_tokens = 4;
        let reg = Registry::default();
        let mut old = Engine::new(cfg.clone(), reg.clone());
        attach_spill(&mut old, &dir.path().join("a"), None).unwrap();
        let half = batches.len() / 2;
        for b in &batches[..half] {
            old.apply(b).unwrap();
        }
        assert!(old.stats().evicted > 0, "{:?}", old.stats());
        let bytes = encode(&old, None, &dir.path().join("a"), 7).unwrap();
        let (mut new, seq, responder) = decode(&bytes, &cfg, &reg, &dir.path().join("b")).unwrap();
        assert_eq!((seq, responder), (7, None));
        let (mut want, mut got) = (Vec::new(), Vec::new());
        for b in &batches[half..] {
            want.extend(old.apply(b).unwrap());
            got.extend(new.apply(b).unwrap());
        }
        want.extend(old.finish());
        got.extend(new.finish());
        assert!(new.stats().reloaded > 0, "{:?}", new.stats());
        assert!(!want.is_empty());
        assert_eq!(got, want);

        // Without its spill the object is refused, not restored with tokens missing.
        let p = wire::unpack_snapshot(&bytes).unwrap();
        assert!(!p.spill.is_empty());
        let cut = wire::pack_snapshot(p.parquet, None, &[]);
        let e = decode(&cut, &cfg, &reg, &dir.path().join("c"))
            .err()
            .unwrap();
        assert!(
            matches!(&e, Unloaded::Damaged(m) if m.contains("spill is missing")),
            "{e}"
        );
        // Nor are damaged bytes, or model state this version cannot read: damaged, so the
        // partition is rebuilt from its stream instead of waiting for a snapshot that will
        // never load.
        let mut flipped = bytes.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0x55;
        let e = decode(&flipped, &cfg, &reg, &dir.path().join("d"))
            .err()
            .unwrap();
        assert!(matches!(e, Unloaded::Damaged(_)), "{e}");
        let e = decode(b"not a snapshot", &cfg, &reg, &dir.path().join("d"))
            .err()
            .unwrap();
        assert!(matches!(e, Unloaded::Damaged(_)), "{e}");
    }
}
