//! Partition ownership through leases in the `tokenwatch_leases` key-value bucket, whose
//! entries expire after [`TTL`] unless renewed.
//!
//! - `node.<id>`: each node's heartbeat, put every [`RENEW`]; the live nodes are the keys
//!   present.
//! - `part.<p>`: partition p's owner, claimed with `create` (only if absent) and renewed
//!   with `update` at the revision the owner last wrote. An owner that misses its renewal
//!   (paused, partitioned away) fails its next `update` and stops the partition at once.
//!
//! The preferred owner of p is `live[p % live.len()]` (live node ids sorted), so the
//! partitions are spread evenly; a node holding a partition it is no longer preferred
//! for (a node joined) lets its worker snapshot, then deletes the key at its revision
//! and the preferred node claims it. Fencing: every apply, publish and snapshot of a
//! worker first checks [`Lease::valid`]: its last renewal plus the TTL, less a margin
//! for clock drift and the renewal's own latency, is still ahead.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_stream::StreamExt;

use super::Shared;
use crate::server::host::now_ms;

/// Lease lifetime: the bucket's `max_age`. A dead node's partitions are taken within
/// about this (plus one renewal).
pub const TTL: Duration = Duration::from_secs(6);
/// Renewal (and rebalancing) interval.
pub const RENEW: Duration = Duration::from_secs(1);
/// A lease is taken as lost this long before it would expire.
const MARGIN: Duration = Duration::from_millis(1500);

/// One held partition lease, as its worker sees it.
#[derive(Debug, Default)]
pub struct Lease {
    valid_until: AtomicI64,
    lost: AtomicBool,
}

impl Lease {
    /// The lease is still held for certain: a worker may apply, publish, snapshot.
    pub fn valid(&self) -> bool {
        !self.lost.load(Ordering::Relaxed)
            && (now_ms() as i64) < self.valid_until.load(Ordering::Relaxed)
    }

    fn renewed(&self, at_ms: i64) {
        let until = at_ms + (TTL - MARGIN).as_millis() as i64;
        self.valid_until.store(until, Ordering::Relaxed);
    }
}

/// A partition this node holds.
struct Held {
    rev: u64,
    lease: Arc<Lease>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn part_key(p: u32) -> String {
    format!("part.{p}")
}

fn node_key(id: &str) -> String {
    format!("node.{id}")
}

/// Keep this node's heartbeat and partitions until `stop` becomes true; then stop every
/// worker (each writes a last snapshot) and give their leases back at once, so the
/// survivors need not wait for them to expire.
pub async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut held: BTreeMap<u32, Held> = BTreeMap::new();
    let mut every = tokio::time::interval(RENEW);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        tick(&shared, &mut held).await;
    }
    for h in held.values() {
        h.stop.store(true, Ordering::Relaxed);
    }
    for (p, mut h) in std::mem::take(&mut held) {
        if let Some(t) = h.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        let _ = shared
            .leases
            .delete_expect_revision(part_key(p), Some(h.rev))
            .await;
    }
    let _ = shared.leases.delete(node_key(&shared.node)).await;
    shared
        .owned
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clear();
}

async fn live_nodes(shared: &Shared) -> Result<Vec<String>, String> {
    let mut keys = shared.leases.keys().await.map_err(|e| e.to_string())?;
    let mut live = vec![shared.node.clone()];
    while let Some(k) = keys.next().await {
        let k = k.map_err(|e| e.to_string())?;
        if let Some(id) = k.strip_prefix("node.") {
            live.push(id.to_string());
        }
    }
    live.sort();
    live.dedup();
    Ok(live)
}

async fn tick(shared: &Arc<Shared>, held: &mut BTreeMap<u32, Held>) {
    let me = shared.node.as_str();
    let now = now_ms() as i64;
    if let Err(e) = shared
        .leases
        .put(node_key(me), now.to_string().into())
        .await
    {
        tracing::warn!(error = %e, "cannot renew this node's heartbeat");
    }
    let live = match live_nodes(shared).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list the live nodes");
            vec![me.to_string()]
        }
    };
    shared
        .live
        .store(live.len() as u64, std::sync::atomic::Ordering::Relaxed);
    for p in 0..shared.n {
        let preferred = live[p as usize % live.len()].as_str() == me;
        let key = part_key(p);
        if let Some(h) = held.get_mut(&p) {
            let finished = h.thread.as_ref().is_none_or(|t| t.is_finished());
            if finished {
                // The worker ended (handover, lost exchange, an error): give the lease
                // back so the preferred node (maybe this one again) starts afresh.
                if let Some(t) = h.thread.take() {
                    let _ = t.join();
                }
                let _ = shared
                    .leases
                    .delete_expect_revision(&key, Some(h.rev))
                    .await;
                held.remove(&p);
                continue;
            }
            match shared
                .leases
                .update(&key, me.to_string().into(), h.rev)
                .await
            {
                Ok(rev) => {
                    h.rev = rev;
                    h.lease.renewed(now);
                }
                Err(e) => {
                    tracing::warn!(partition = p, error = %e, "partition lease lost");
                    h.lease.lost.store(true, Ordering::Relaxed);
                    h.stop.store(true, Ordering::Relaxed);
                    // The worker stops by itself at its next check; it is not waited for.
                    held.remove(&p);
                    continue;
                }
            }
            if !preferred && !h.stop.load(Ordering::Relaxed) {
                tracing::info!(
                    partition = p,
                    "handing the partition over to its preferred node"
                );
                h.stop.store(true, Ordering::Relaxed);
            }
        } else if preferred {
            if let Ok(rev) = shared.leases.create(&key, me.to_string().into()).await {
                let lease = Arc::new(Lease::default());
                lease.renewed(now);
                let stop = Arc::new(AtomicBool::new(false));
                let (s, l, st) = (shared.clone(), lease.clone(), stop.clone());
                let thread = std::thread::Builder::new()
                    .name(format!("tokenwatch-p{p}"))
                    .spawn(move || super::partition::run(s, p, l, st));
                match thread {
                    Ok(t) => {
                        held.insert(
                            p,
                            Held {
                                rev,
                                lease,
                                stop,
                                thread: Some(t),
                            },
                        );
                    }
                    Err(e) => {
                        tracing::error!(partition = p, error = %e, "cannot start the partition's thread");
                        let _ = shared.leases.delete_expect_revision(&key, Some(rev)).await;
                    }
                }
            }
        }
    }
    let owned: Vec<u32> = held.keys().copied().collect();
    metrics::gauge!("tokenwatch_cluster_partitions_owned").set(owned.len() as f64);
    metrics::gauge!("tokenwatch_cluster_live_nodes").set(live.len() as f64);
    *shared.owned.lock().unwrap_or_else(|e| e.into_inner()) = owned;
}
