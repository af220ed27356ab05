//! The `TokenWatch` RPCs: authorization per call, proto conversion, and hand-off to the
//! engine thread through the bounded queue.

use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{broadcast, mpsc, oneshot, watch, Semaphore};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::auth::{require, Caller, Role};
use super::convert::{to_batch, to_batch_with, Clock, Rejections};
use super::host::{Ack, Board, Cmd};
use super::pb;
use crate::config::ServerConfig;

/// Default and largest `limit` of ListRiskyTokens.
const DEFAULT_LIMIT: usize = 20;
const MAX_LIMIT: usize = 10_000;

/// The service state shared by every call.
pub struct Service {
    pub(super) engine: mpsc::Sender<Cmd>,
    pub(super) board: Arc<Board>,
    /// In cluster mode, the queries forwarded to a partition's owner (set once the node
    /// has joined).
    pub(super) cluster: Arc<std::sync::OnceLock<crate::cluster::Query>>,
    pub(super) cfg: ServerConfig,
    /// Bounds the Ingest streams open at once (each holds buffers while it runs).
    pub(super) streams: Arc<Semaphore>,
    /// Becomes true when the server starts shutting down: ingest stops reading.
    pub(super) closing: watch::Receiver<bool>,
    /// Becomes true once the last windows are published: alert streams drain and end.
    pub(super) finished: watch::Receiver<bool>,
    /// Becomes true once state is recovered: until then every RPC is UNAVAILABLE.
    pub(super) ready: watch::Receiver<bool>,
    /// Recently accepted event ids (resent events are dropped).
    pub(super) dedup: Arc<std::sync::Mutex<super::dedup::Dedup>>,
    /// Least-privilege reports from the history.
    pub(super) scopes: Arc<crate::scopes::Cache>,
}

impl Service {
    /// UNAVAILABLE while state is being recovered.
    fn ready(&self) -> Result<(), Status> {
        if *self.ready.borrow() {
            Ok(())
        } else {
            Err(Status::unavailable(
                "recovering state after a restart; retry shortly (health says SERVING when done)",
            ))
        }
    }

    /// Wait until everything queued so far is durable and applied.
    async fn flush(&self) -> Result<(), Status> {
        let (tx, rx) = oneshot::channel();
        self.engine
            .send(Cmd::Flush(tx))
            .await
            .map_err(|_| engine_gone())?;
        rx.await
            .map_err(|_| engine_gone())?
            .map_err(Status::unavailable)
    }
}

fn engine_gone() -> Status {
    Status::unavailable("the engine has stopped (server shutting down)")
}

type AlertStream = Pin<Box<dyn Stream<Item = Result<pb::Alert, Status>> + Send>>;

#[tonic::async_trait]
impl pb::token_watch_server::TokenWatch for Service {
    async fn ingest(
        &self,
        req: Request<Streaming<pb::IngestRequest>>,
    ) -> Result<Response<pb::IngestResponse>, Status> {
        require(&req, Role::Ingest)?;
        self.ready()?;
        let mut closing = self.closing.clone();
        if *closing.borrow() {
            return Err(Status::unavailable("server shutting down"));
        }
        let caller = req.extensions().get::<Arc<Caller>>().cloned();
        // The key's own limit first, so one key cannot take every slot of the server's.
        let _key_permit = match &caller {
            Some(c) => Some(c.streams.clone().try_acquire_owned().map_err(|_| {
                Status::resource_exhausted(format!(
                    "key `{}` already has {} ingest streams open (its limit); retry later",
                    c.name, c.limits.streams
                ))
            })?),
            None => None,
        };
        let key: Arc<str> = caller
            .as_ref()
            .map_or_else(|| "none".into(), |c| c.name.clone());
        let idle = std::time::Duration::from_millis(self.cfg.stream_idle_timeout.ms as u64);
        let _permit = self.streams.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "more than {} ingest streams open; retry later",
                self.cfg.max_ingest_streams
            ))
        })?;
        let mut stream = req.into_inner();
        let mut index = 0u64;
        let mut accepted = 0u64;
        let mut duplicates = 0u64;
        let ack = Arc::new(Ack::default());
        let mut rejected = Rejections {
            limit: self.cfg.max_listed_errors,
            ..Default::default()
        };
        loop {
            let msg = tokio::select! {
                // A shutdown stops reading between messages: what was read is applied.
                _ = closing.changed() => break,
                m = tokio::time::timeout(idle, stream.message()) => m,
            };
            let msg = match msg {
                Ok(Ok(Some(m))) => m,
                Ok(Ok(None)) => break,
                Err(_) => {
                    // Idle: end the stream, keeping (and making durable) what it sent.
                    self.flush().await?;
                    metrics::counter!("tokenwatch_ingest_idle_closed_total", "key" => key.to_string())
                        .increment(1);
                    return Err(Status::deadline_exceeded(format!(
                        "no message for {} s: the ingest stream is closed; the {accepted} events accepted before are durable",
                        idle.as_secs()
                    )));
                }
                Ok(Err(status)) => {
                    // The client went away or sent garbage: what was accepted stays.
                    tracing::debug!(%status, accepted, "ingest stream ended with an error");
                    return Err(status);
                }
            };
            let clock = Clock {
                now_ms: super::host::now_ms() as i64,
                max_future_skew_ms: self.cfg.max_future_skew.ms,
            };
            let t0 = std::time::Instant::now();
            let before = rejected.count;
            let mut dup = 0u64;
            // Keys of the accepted events' ids: logged with the events (one allocation per
            // message, only for messages with ids).
            let mut keys = Vec::new();
            let batch = if msg.events.iter().any(|e| !e.event_id.is_empty()) {
                let mut d = self.dedup.lock().unwrap_or_else(|e| e.into_inner());
                to_batch_with(&msg.events, index, clock, &mut rejected, &mut |e| {
                    if e.event_id.is_empty() {
                        return true;
                    }
                    let k = super::dedup::Dedup::key(&e.token_id, &e.event_id);
                    let first = d.first_key(k);
                    dup += u64::from(!first);
                    if first {
                        keys.push(k);
                    }
                    first
                })
            } else {
                to_batch(&msg.events, index, clock, &mut rejected)
            };
            duplicates += dup;
            metrics::counter!("tokenwatch_events_rejected_total")
                .increment(rejected.count - before);
            index += msg.events.len() as u64;
            let rows = batch.num_rows() as u64;
            if let Some(c) = &caller {
                // The key's event budget: past it, this stream waits (and is not read).
                c.admit(rows as usize).await;
            }
            if rows > 0 {
                // Bounded queue: when the engine is behind, this waits, the stream is not
                // read, and HTTP/2 flow control pushes back on the client.
                self.engine
                    .send(Cmd::Batch(batch, ack.clone(), keys))
                    .await
                    .map_err(|_| engine_gone())?;
                accepted += rows;
                metrics::counter!("tokenwatch_events_accepted_total").increment(rows);
            }
            metrics::histogram!("tokenwatch_ingest_seconds").record(t0.elapsed().as_secs_f64());
            // Decoding and validating a message is CPU work on a shared worker; give the
            // short read calls queued behind it their turn between messages.
            tokio::task::yield_now().await;
        }
        self.flush().await?;
        if let Some(e) = ack.failure() {
            // The events of the failed write will be resent: they must not look like
            // duplicates then.
            self.dedup.lock().unwrap_or_else(|e| e.into_inner()).clear();
            return Err(Status::unavailable(e));
        }
        let late = ack.late.load(std::sync::atomic::Ordering::Relaxed);
        if late > 0 {
            metrics::counter!("tokenwatch_events_late_by_key_total", "key" => key.to_string())
                .increment(late);
        }
        if rejected.count > 0 {
            tracing::info!(
                accepted,
                rejected = rejected.count,
                "ingest stream had invalid events"
            );
        }
        Ok(Response::new(pb::IngestResponse {
            accepted,
            rejected: rejected.count,
            errors: rejected.listed,
            late,
            duplicates,
        }))
    }

    async fn get_token_risk(
        &self,
        req: Request<pb::GetTokenRiskRequest>,
    ) -> Result<Response<pb::TokenRisk>, Status> {
        require(&req, Role::Read)?;
        self.ready()?;
        let token = &req.get_ref().token_id;
        let found = match self.cluster.get() {
            Some(q) => q.token_risk(token).await,
            None => self.board.get(token),
        };
        match found {
            Some(r) => Ok(Response::new(r.as_ref().clone())),
            None => Err(Status::not_found(
                "no scored window for this token (unknown, or its first window is still open)",
            )),
        }
    }

    async fn list_risky_tokens(
        &self,
        req: Request<pb::ListRiskyTokensRequest>,
    ) -> Result<Response<pb::ListRiskyTokensResponse>, Status> {
        require(&req, Role::Read)?;
        self.ready()?;
        let r = req.get_ref();
        if !r.min_risk.is_finite() {
            return Err(Status::invalid_argument("min_risk must be a number"));
        }
        let limit = match r.limit as usize {
            0 => DEFAULT_LIMIT,
            n => n.min(MAX_LIMIT),
        };
        let tokens = self
            .board
            .riskiest(limit, r.min_risk)
            .iter()
            .map(|t| t.as_ref().clone())
            .collect();
        Ok(Response::new(pb::ListRiskyTokensResponse { tokens }))
    }

    type WatchAlertsStream = AlertStream;

    async fn watch_alerts(
        &self,
        req: Request<pb::WatchAlertsRequest>,
    ) -> Result<Response<AlertStream>, Status> {
        require(&req, Role::Read)?;
        self.ready()?;
        let min_risk = req.get_ref().min_risk;
        if !min_risk.is_finite() {
            return Err(Status::invalid_argument("min_risk must be a number"));
        }
        let mut feed = self.board.alerts.subscribe();
        let mut finished = self.finished.clone();
        // A small hand-off buffer; the subscriber's real buffer is its broadcast slot, so
        // a slow client never holds the engine back, it only misses alerts (and is told).
        let (tx, rx) = mpsc::channel::<Result<pb::Alert, Status>>(16);
        tokio::spawn(async move {
            let mut missed = 0u64;
            loop {
                let next = tokio::select! {
                    biased;
                    a = feed.recv() => a,
                    _ = tx.closed() => break,
                    // Only reached with nothing left in the feed (biased order).
                    _ = finished.changed() => break,
                };
                match next {
                    Ok(a) if a.risk >= min_risk => {
                        let mut a = a.as_ref().clone();
                        a.missed = std::mem::take(&mut missed);
                        if tx.send(Ok(a)).await.is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(n)) => missed += n,
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn retrain(
        &self,
        req: Request<pb::RetrainRequest>,
    ) -> Result<Response<pb::RetrainResponse>, Status> {
        require(&req, Role::Admin)?;
        self.ready()?;
        let r = req.get_ref();
        let (tx, rx) = oneshot::channel();
        self.engine
            .send(Cmd::Retrain(r.from_ms, r.to_ms, tx))
            .await
            .map_err(|_| engine_gone())?;
        let path = rx
            .await
            .map_err(|_| engine_gone())?
            .map_err(Status::failed_precondition)?;
        Ok(Response::new(pb::RetrainResponse {
            snapshot_path: path.display().to_string(),
        }))
    }

    async fn snapshot(
        &self,
        req: Request<pb::SnapshotRequest>,
    ) -> Result<Response<pb::SnapshotResponse>, Status> {
        require(&req, Role::Admin)?;
        self.ready()?;
        let (tx, rx) = oneshot::channel();
        self.engine
            .send(Cmd::Snapshot(tx))
            .await
            .map_err(|_| engine_gone())?;
        let path = rx
            .await
            .map_err(|_| engine_gone())?
            .map_err(Status::failed_precondition)?;
        Ok(Response::new(pb::SnapshotResponse {
            path: path.display().to_string(),
        }))
    }

    async fn submit_feedback(
        &self,
        req: Request<pb::FeedbackRequest>,
    ) -> Result<Response<pb::FeedbackResponse>, Status> {
        require(&req, Role::Admin)?;
        self.ready()?;
        let r = req.into_inner();
        let verdict = crate::engine::Verdict::parse(&r.verdict).ok_or_else(|| {
            Status::invalid_argument(format!(
                "verdict {:?}: use true_positive, false_positive or expected_change",
                r.verdict
            ))
        })?;
        let (tx, rx) = oneshot::channel();
        self.engine
            .send(Cmd::Feedback {
                alert_id: r.alert_id,
                verdict,
                note: r.note,
                reply: tx,
            })
            .await
            .map_err(|_| engine_gone())?;
        let (token_id, effect) = rx
            .await
            .map_err(|_| engine_gone())?
            .map_err(Status::not_found)?;
        Ok(Response::new(pb::FeedbackResponse {
            token_id,
            learned_windows: effect.learned_windows,
            damped_signals: effect.damped.iter().map(|s| s.name().to_string()).collect(),
            hold_until_ms: effect.hold_until.unwrap_or(0),
        }))
    }

    async fn get_stats(
        &self,
        req: Request<pb::GetStatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, Status> {
        require(&req, Role::Read)?;
        self.ready()?;
        let (tx, rx) = oneshot::channel();
        self.engine
            .send(Cmd::Stats(tx))
            .await
            .map_err(|_| engine_gone())?;
        Ok(Response::new(rx.await.map_err(|_| engine_gone())?))
    }

    async fn get_scope_usage(
        &self,
        req: Request<pb::GetScopeUsageRequest>,
    ) -> Result<Response<pb::GetScopeUsageResponse>, Status> {
        require(&req, Role::Read)?;
        self.ready()?;
        let r = req.into_inner();
        let days = match r.days {
            0 => 30,
            d => d.min(3650),
        };
        let limit = match r.limit as usize {
            0 => 100,
            n => n.min(MAX_LIMIT),
        };
        let (report, at_ms) = self
            .scopes
            .get(days)
            .await
            .map_err(Status::failed_precondition)?;
        let chosen: Vec<&crate::scopes::TokenScopes> = if r.token_id.is_empty() {
            report
                .tokens
                .iter()
                .skip(r.offset as usize)
                .take(limit)
                .collect()
        } else {
            report
                .tokens
                .iter()
                .filter(|t| t.token_id == r.token_id)
                .collect()
        };
        if !r.token_id.is_empty() && chosen.is_empty() {
            return Err(Status::not_found(
                "the token is neither in the registry nor in the history",
            ));
        }
        Ok(Response::new(pb::GetScopeUsageResponse {
            tokens: chosen.into_iter().map(pb::TokenScopeUsage::from).collect(),
            days,
            from_ms: report.from_ms,
            to_ms: report.to_ms,
            granted_total: report.granted_total,
            unused_total: report.unused_total,
            removable_share: report.removable_share(),
            total_tokens: report.tokens.len() as u64,
            computed_at_ms: at_ms,
        }))
    }
}
