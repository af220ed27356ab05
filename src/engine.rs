//! The one path every door uses: owns the sharded per-token state, applies validated event
//! batches, closes windows on the watermark, scores them, learns them, and refits the
//! cross-token models. `eval`, `replay`, the demo and the server all drive this.
//!
//! Shards own disjoint sets of tokens (stable hash of the token id) and everything about
//! them; a batch is split by shard and each shard runs on its own thread with no locks.
//! Only the global models (peer groups, isolation, endpoint rarity) cross shards: they are
//! fitted from all shards' states at fixed event-time points and handed back read-only.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Array, AsArray, StringArray};
use arrow::datatypes::{
    Float32Type, TimestampMillisecondType, UInt16Type, UInt32Type, UInt64Type, UInt8Type,
};
use arrow::record_batch::RecordBatch;
use rustc_hash::FxHashMap;

use crate::config::Config;
use crate::event::col;
use crate::model::isolation::{IsolationModel, Reservoir};
use crate::model::peers::NO_GROUP;
use crate::model::registry::Registry;
use crate::model::sketch::{mix, Ewma};
use crate::model::{
    Ctx, FeedbackState, Global, Model, Models, RefitPartial, Scratch, Signal, SignalKind,
    TokenState,
};
use crate::score;
use crate::store::spill::{Spill, SpillRef};
use crate::window::{text_key, window_start, EventRef, Names, WindowAgg};

/// Errors of the engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A batch that is not in the canonical schema (a bug in the caller).
    #[error("batch column `{0}` does not have the event schema's type")]
    Schema(&'static str),
}

/// One signal's part in a score, with its plain-words reason.
#[derive(Debug, Clone, PartialEq)]
pub struct Contribution {
    /// Signal.
    pub signal: SignalKind,
    /// What the window showed.
    pub observed: f64,
    /// What the model expected.
    pub expected: f64,
    /// Tail probability.
    pub p: f64,
    /// Evidence added to the log-odds (nats).
    pub evidence: f64,
    /// Why, in words.
    pub reason: String,
}

/// The score of one (token, window).
#[derive(Debug, Clone, PartialEq)]
pub struct WindowScore {
    /// Token id.
    pub token: Arc<str>,
    /// Window start (epoch ms).
    pub start: i64,
    /// Events in the window.
    pub events: u32,
    /// Risk 0..=100.
    pub risk: f32,
    /// Risk reached the alert threshold.
    pub alert: bool,
    /// The window was learned into the baseline (false: quarantined).
    pub learned: bool,
    /// Labelled events (evaluation only).
    pub labelled: u32,
    /// Anomaly kind of the labelled events.
    pub kind: Option<String>,
    /// Contributions with evidence, largest first.
    pub contributions: Vec<Contribution>,
    /// How much of the token's own history its baseline rests on, 0..=1 (a week of it and
    /// the rate model's warm-up make 1); below 0.5 the top reason says so.
    pub confidence: f32,
    /// The window's two most frequent user agents (key, calls; key 0: none), for the
    /// console's view of what clients a token has (the models keep agents only as a set).
    pub agents: [(u64, u32); 2],
}

impl WindowScore {
    /// Name of the largest contributor or `none`.
    pub fn top_signal(&self) -> &'static str {
        self.contributions
            .first()
            .map_or("none", |c| c.signal.name())
    }

    /// Evidence of one signal (0 if it did not contribute).
    pub fn evidence(&self, s: SignalKind) -> f64 {
        self.contributions
            .iter()
            .find(|c| c.signal == s)
            .map_or(0.0, |c| c.evidence)
    }
}

/// Counters of what the engine did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    /// Events applied.
    pub events: u64,
    /// Events dropped because their window had already closed.
    pub late: u64,
    /// Windows scored.
    pub windows: u64,
    /// Windows at or above the alert threshold.
    pub alerts: u64,
    /// Windows kept out of the baseline.
    pub quarantined: u64,
    /// Tokens known (first seen, whether tracked now or evicted).
    pub tokens: u64,
    /// Global refits done.
    pub refits: u64,
    /// Tokens tracked in memory now.
    pub tracked: u64,
    /// Tokens evicted to the spill (idle longest, past the budget).
    pub evicted: u64,
    /// Evicted tokens loaded back when they returned.
    pub reloaded: u64,
    /// Events of new tokens refused tracking: the budget and its headroom were full and no
    /// token was idle (still in the log and history; replay and retrain score them).
    pub untracked: u64,
}

struct Slot {
    name: Arc<str>,
    state: TokenState,
    /// Registry row, looked up once when the token first appears.
    reg: Option<Arc<crate::model::registry::RegistryEntry>>,
    /// Open windows: (start, index into the shard's aggregate arena).
    open: Vec<(i64, u32)>,
    /// Window start of the armed silence check, or [`NO_SILENCE`].
    silence_at: i64,
    /// The slot holds a tracked token (false: evicted, free for the next one).
    live: bool,
}

/// No silence check armed.
const NO_SILENCE: i64 = i64::MIN;

/// Columns of a canonical batch, typed once per batch.
struct Cols<'a> {
    ts: &'a arrow::array::PrimitiveArray<TimestampMillisecondType>,
    token: &'a StringArray,
    method: &'a StringArray,
    endpoint: &'a StringArray,
    status: &'a arrow::array::PrimitiveArray<UInt16Type>,
    bytes: &'a arrow::array::PrimitiveArray<UInt64Type>,
    latency: &'a arrow::array::PrimitiveArray<Float32Type>,
    ip: &'a StringArray,
    country: &'a StringArray,
    asn: &'a arrow::array::PrimitiveArray<UInt32Type>,
    agent: &'a StringArray,
    scope: &'a StringArray,
    env: &'a StringArray,
    label: &'a arrow::array::PrimitiveArray<UInt8Type>,
    kind: &'a StringArray,
}

impl<'a> Cols<'a> {
    fn new(b: &'a RecordBatch) -> Result<Self, Error> {
        fn s<'b>(b: &'b RecordBatch, c: usize, n: &'static str) -> Result<&'b StringArray, Error> {
            b.columns()
                .get(c)
                .and_then(|a| a.as_string_opt::<i32>())
                .ok_or(Error::Schema(n))
        }
        macro_rules! p {
            ($c:expr, $t:ty, $n:expr) => {
                b.columns()
                    .get($c)
                    .and_then(|a| a.as_primitive_opt::<$t>())
                    .ok_or(Error::Schema($n))?
            };
        }
        Ok(Cols {
            ts: p!(col::TS, TimestampMillisecondType, "ts"),
            token: s(b, col::TOKEN_ID, "token_id")?,
            method: s(b, col::METHOD, "method")?,
            endpoint: s(b, col::ENDPOINT, "endpoint")?,
            status: p!(col::STATUS, UInt16Type, "status"),
            bytes: p!(col::BYTES_OUT, UInt64Type, "bytes_out"),
            latency: p!(col::LATENCY_MS, Float32Type, "latency_ms"),
            ip: s(b, col::SRC_IP, "src_ip")?,
            country: s(b, col::COUNTRY, "country")?,
            asn: p!(col::ASN, UInt32Type, "asn"),
            agent: s(b, col::USER_AGENT, "user_agent")?,
            scope: s(b, col::SCOPE, "scope")?,
            env: s(b, col::ENV, "env")?,
            label: p!(col::LABEL, UInt8Type, "label"),
            kind: s(b, col::KIND, "kind")?,
        })
    }
}

#[inline]
fn opt_str(a: &StringArray, i: usize) -> Option<&str> {
    if a.is_valid(i) {
        let s = a.value(i);
        (!s.is_empty()).then_some(s)
    } else {
        None
    }
}

/// A shard: a disjoint set of tokens and everything about them.
struct Shard {
    cfg: Arc<Config>,
    models: Models,
    registry: Arc<Registry>,
    global: Arc<Global>,
    tokens: FxHashMap<Box<str>, u32>,
    slots: Vec<Slot>,
    aggs: Vec<WindowAgg>,
    free: Vec<u32>,
    queue: BTreeMap<i64, Vec<u32>>,
    /// Silence checks: window start -> tokens that expected traffic in that window. Each
    /// steady token has at most one; it is re-armed by every window the token closes.
    silence: BTreeMap<i64, Vec<u32>>,
    /// The aggregate of a window without traffic.
    empty: WindowAgg,
    names: Names,
    reservoir: Reservoir,
    scratch: Scratch,
    closed_wm: i64,
    stats: Stats,
    /// Recently quarantined windows per token (slot), for false-positive verdicts.
    held: FxHashMap<u32, Vec<WindowAgg>>,
    /// Learning rate of each token's surprise distribution (`score.calibration-windows`).
    calibration_alpha: f64,
    /// Tokens tracked at most once windows close (this shard's part of the budget), and
    /// with the headroom for a window's worth of new tokens.
    budget: usize,
    hard_budget: usize,
    /// Slots holding a tracked token, and free slots (of evicted tokens).
    live: usize,
    free_slots: Vec<u32>,
    /// Where evicted tokens go (shared by the shards, opened on first need).
    spill: SpillCell,
    /// `stats.windows` when an eviction found no idle token (none can be idle before a
    /// window closes, so it is not looked for again until then).
    evict_blocked_at: Option<u64>,
    /// `stats.windows` when the spill could not be opened or written (not tried again
    /// before a window closes).
    spill_broken_at: Option<u64>,
    /// The last eviction could not write the spill (error or the disk floor).
    spill_refused: bool,
    /// Names of evicted tokens, for the door to drop what it keeps beside them.
    evicted_names: Option<Vec<Arc<str>>>,
    /// Tokens loaded back whose spill entry is still to be deleted (with the next write).
    reloaded_names: Vec<crate::store::spill::Gone>,
}

/// The spill shared by the shards of one engine: set by the door (the server's data
/// directory) or made in the temporary directory on first need (runs over files).
type SpillCell = Arc<std::sync::OnceLock<Option<Arc<Spill>>>>;

impl Shard {
    fn new(
        cfg: Arc<Config>,
        registry: Arc<Registry>,
        global: Arc<Global>,
        spill: SpillCell,
        nshards: usize,
    ) -> Self {
        let budget = (cfg.engine.token_budget() as usize)
            .div_ceil(nshards.max(1))
            .max(1);
        Shard {
            budget,
            hard_budget: budget.saturating_add(budget / 8).max(2),
            live: 0,
            free_slots: Vec::new(),
            spill,
            evict_blocked_at: None,
            spill_broken_at: None,
            spill_refused: false,
            evicted_names: None,
            reloaded_names: Vec::new(),
            models: Models::new(&cfg),
            calibration_alpha: Ewma::alpha(cfg.score.calibration_windows),
            reservoir: Reservoir::new(cfg.isolation.reservoir),
            cfg,
            registry,
            global,
            tokens: FxHashMap::default(),
            slots: Vec::new(),
            aggs: Vec::new(),
            free: Vec::new(),
            queue: BTreeMap::new(),
            silence: BTreeMap::new(),
            empty: WindowAgg::default(),
            names: Names::default(),
            scratch: Scratch::default(),
            closed_wm: i64::MIN,
            stats: Stats::default(),
            held: FxHashMap::default(),
        }
    }

    /// The slot of token `name`: tracked, loaded back from the spill, or new (first seen in
    /// the window starting at `start`). Past the budget and its headroom the tokens idle
    /// longest are evicted first, with their open windows if none is idle (they come back
    /// when those windows close, see [`Engine::close_all`]). `None` only when the spill
    /// cannot be written: then the event is counted as untracked.
    fn token_index(&mut self, name: &str, start: i64) -> Option<u32> {
        if let Some(&t) = self.tokens.get(name) {
            return Some(t);
        }
        if self.live >= self.hard_budget {
            self.evict_to(
                (self.budget - self.budget / 16).min(self.hard_budget - 1),
                true,
            );
        }
        let reg = self.registry.get_shared(name);
        if self.live >= self.hard_budget && reg.is_none() {
            self.stats.untracked += 1;
            return None;
        }
        let (state, open) = match self.reload(name) {
            Some(back) => {
                self.stats.reloaded += 1;
                back
            }
            None => {
                self.stats.tokens += 1;
                let st = TokenState {
                    first_seen: start,
                    last_seen: start,
                    ..Default::default()
                };
                (st, Vec::new())
            }
        };
        Some(self.insert_slot(name, state, reg, open))
    }

    /// Track token `name` again with what the spill held (for a verdict, or because one of
    /// its open windows closes): not counted against the headroom, evicted again when idle.
    fn put_back(&mut self, name: &str, (state, open): (TokenState, Vec<WindowAgg>)) -> u32 {
        self.stats.reloaded += 1;
        let reg = self.registry.get_shared(name);
        self.insert_slot(name, state, reg, open)
    }

    fn insert_slot(
        &mut self,
        name: &str,
        state: TokenState,
        reg: Option<Arc<crate::model::registry::RegistryEntry>>,
        windows: Vec<WindowAgg>,
    ) -> u32 {
        let slot = Slot {
            name: Arc::from(name),
            state,
            reg,
            open: Vec::new(),
            silence_at: NO_SILENCE,
            live: true,
        };
        let t = match self.free_slots.pop() {
            Some(t) => {
                self.slots[t as usize] = slot;
                t
            }
            None => {
                self.slots.push(slot);
                (self.slots.len() - 1) as u32
            }
        };
        for agg in windows {
            let a = match self.free.pop() {
                Some(a) => a as usize,
                None => {
                    self.aggs.push(WindowAgg::default());
                    self.aggs.len() - 1
                }
            };
            let start = agg.start;
            self.aggs[a] = agg;
            self.slots[t as usize].open.push((start, a as u32));
            self.queue.entry(start).or_default().push(t);
        }
        self.tokens.insert(name.into(), t);
        self.live += 1;
        t
    }

    /// The spill, opened (in the temporary directory) on first need.
    fn spill(&self) -> Option<&Arc<Spill>> {
        self.spill
            .get_or_init(|| match Spill::temporary() {
                Ok(s) => {
                    s.set_min_free(self.cfg.engine.spill_min_free.0);
                    Some(Arc::new(s))
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot open a token spill; tokens past the budget are not evicted");
                    None
                }
            })
            .as_ref()
    }

    /// An evicted token's state and open windows, loaded back from the spill (its entries
    /// there are deleted with the next write).
    fn reload(&mut self, name: &str) -> Option<(TokenState, Vec<WindowAgg>)> {
        let spill = self.spill.get()?.as_ref()?.clone();
        let bytes = match spill.get(name) {
            Ok(Some(b)) => b,
            Ok(None) => return None,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the token spill; the token starts anew");
                return None;
            }
        };
        let back = match decode_record(&bytes) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "an evicted token's record does not decode; it starts anew");
                return None;
            }
        };
        let earliest = back.1.iter().map(|a| a.start).min();
        self.reloaded_names.push((Arc::from(name), earliest));
        if self.reloaded_names.len() >= MAX_PENDING_DELETES {
            self.flush_deletes(&spill);
        }
        Some(back)
    }

    /// Delete the spill entries of tokens loaded back since the last write.
    fn flush_deletes(&mut self, spill: &Spill) {
        if self.reloaded_names.is_empty() {
            return;
        }
        match spill.write([], &self.reloaded_names) {
            Ok(()) => self.reloaded_names.clear(),
            Err(e) => tracing::error!(error = %e, "cannot write the token spill"),
        }
    }

    /// Bring back an evicted token whose open window starting at `start` closes now.
    fn bring_back(&mut self, name: &str, start: i64) {
        if self.tokens.contains_key(name) {
            // Already back (its pending entry was not deleted yet): delete it now.
            self.reloaded_names.push((Arc::from(name), Some(start)));
            return;
        }
        match self.reload(name) {
            Some(back) => {
                self.put_back(name, back);
            }
            None => self.reloaded_names.push((Arc::from(name), Some(start))),
        }
    }

    /// Evict the tokens idle longest until at most `target` are tracked: first those with no
    /// open window, then (with `open`) the others with their open windows. Their state goes
    /// to the spill in one write; what is kept beside them here (held windows, a silence
    /// check) is dropped.
    fn evict_to(&mut self, target: usize, open: bool) {
        let now = Some(self.stats.windows);
        if self.live <= target
            || self.spill_broken_at == now
            || (!open && self.evict_blocked_at == now)
        {
            return;
        }
        let need = self.live - target;
        let mut cand: Vec<(bool, i64, u32)> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.live && (open || s.open.is_empty()))
            .map(|(i, s)| (!s.open.is_empty(), s.state.last_seen, i as u32))
            .collect();
        if cand.len() > need {
            cand.select_nth_unstable(need);
            cand.truncate(need);
        }
        if cand.is_empty() {
            self.evict_blocked_at = now;
            return;
        }
        let Some(spill) = self.spill().cloned().filter(|s| s.has_room()) else {
            self.spill_broken_at = now;
            self.spill_refused = true;
            return;
        };
        let records: Vec<(Vec<u8>, Option<i64>)> = cand
            .iter()
            .map(|&(_, _, t)| encode_record(&self.slots[t as usize], &self.aggs))
            .collect();
        let put = spill.write(
            cand.iter().zip(&records).map(|(&(_, _, t), (b, first))| {
                (&*self.slots[t as usize].name, b.as_slice(), *first)
            }),
            &self.reloaded_names,
        );
        if let Err(e) = put {
            tracing::error!(error = %e, "cannot write the token spill; no token evicted");
            self.spill_broken_at = now;
            self.spill_refused = true;
            return;
        }
        self.spill_refused = false;
        self.reloaded_names.clear();
        for &(_, _, t) in &cand {
            let slot = &mut self.slots[t as usize];
            self.tokens.remove(&*slot.name);
            self.held.remove(&t);
            if slot.silence_at != NO_SILENCE {
                if let Some(v) = self.silence.get_mut(&slot.silence_at) {
                    v.retain(|&x| x != t);
                }
            }
            // Open windows went with the token; their queue entries are stale now (a
            // window is closed only through its token's `open` list).
            for (_, a) in slot.open.drain(..) {
                self.free.push(a);
            }
            slot.live = false;
            slot.silence_at = NO_SILENCE;
            slot.reg = None;
            let name = std::mem::replace(&mut slot.name, Arc::from(""));
            if let Some(names) = self.evicted_names.as_mut() {
                names.push(name);
            }
            self.free_slots.push(t);
            self.live -= 1;
            self.stats.evicted += 1;
        }
        if self.live > target && !open {
            self.evict_blocked_at = now;
        }
    }

    /// Aggregate the given rows of a batch into open windows.
    fn ingest(&mut self, c: &Cols, rows: impl Iterator<Item = usize>) {
        let w = self.cfg.window.size.ms;
        for i in rows {
            let ts = c.ts.value(i);
            let start = window_start(ts, w);
            if is_late(start, w, self.closed_wm) {
                self.stats.late += 1;
                continue;
            }
            let Some(t) = self.token_index(c.token.value(i), start) else {
                continue;
            };
            self.stats.events += 1;
            let t = t as usize;
            let slot = &mut self.slots[t];
            let a = match slot.open.iter().find(|o| o.0 == start) {
                Some(o) => o.1 as usize,
                None => {
                    let a = match self.free.pop() {
                        Some(a) => a as usize,
                        None => {
                            self.aggs.push(WindowAgg::default());
                            self.aggs.len() - 1
                        }
                    };
                    self.aggs[a].reset(start);
                    slot.open.push((start, a as u32));
                    self.queue.entry(start).or_default().push(t as u32);
                    a
                }
            };
            let ev = EventRef {
                ts,
                method: c.method.value(i),
                endpoint: c.endpoint.value(i),
                status: c.status.value(i),
                bytes: c.bytes.value(i),
                latency: c.latency.is_valid(i).then(|| c.latency.value(i)),
                ip: c.ip.value(i),
                country: opt_str(c.country, i),
                asn: c.asn.is_valid(i).then(|| c.asn.value(i)),
                agent: opt_str(c.agent, i),
                scope: opt_str(c.scope, i),
                env: opt_str(c.env, i),
                label: c.label.is_valid(i) && c.label.value(i) == 1,
                kind: opt_str(c.kind, i),
            };
            let granted = slot.reg.as_deref().map_or(&[][..], |r| r.scope_keys());
            self.aggs[a].observe(&ev, granted, &mut self.names);
        }
    }

    /// Close, score and learn every window that ends at or before `wm`, and score the
    /// windows without traffic of steady tokens up to `silence_upto` (never past the newest
    /// event time: at the end of input, silence after it is not known yet). Both go in
    /// window order, a token's own window first, so the result does not depend on batching.
    fn close_until(&mut self, wm: i64, silence_upto: i64, out: &mut Vec<WindowScore>) {
        let w = self.cfg.window.size.ms;
        loop {
            let q = self
                .queue
                .first_key_value()
                .map(|(k, _)| *k)
                .filter(|k| k.saturating_add(w) <= wm);
            let quiet = self
                .silence
                .first_key_value()
                .map(|(k, _)| *k)
                .filter(|k| k.saturating_add(w) <= wm.min(silence_upto));
            match (q, quiet) {
                (None, None) => break,
                (Some(qk), Some(sk)) if sk < qk => self.check_silence(sk, out),
                (None, Some(sk)) => self.check_silence(sk, out),
                (Some(start), _) => {
                    let toks = self.queue.remove(&start).unwrap_or_default();
                    for t in toks {
                        let slot = &mut self.slots[t as usize];
                        let Some(pos) = slot.open.iter().position(|o| o.0 == start) else {
                            continue;
                        };
                        let (_, a) = slot.open.swap_remove(pos);
                        let s = self.close_one(t as usize, Some(a as usize));
                        out.push(s);
                        self.free.push(a);
                    }
                }
            }
        }
        self.closed_wm = self.closed_wm.max(wm);
        // Closed windows make tokens idle: bring the tracked tokens back to the budget.
        if self.live > self.budget {
            self.evict_to(self.budget - self.budget / 16, false);
        }
    }

    /// Score the window starting at `start` for every token that expected traffic in it and
    /// had none.
    fn check_silence(&mut self, start: i64, out: &mut Vec<WindowScore>) {
        let toks = self.silence.remove(&start).unwrap_or_default();
        for t in toks {
            let slot = &mut self.slots[t as usize];
            // Only the token's armed check counts: an entry left by a token since evicted
            // (whose slot another token may hold now) or re-armed later is stale.
            if !slot.live || slot.silence_at != start {
                continue;
            }
            slot.silence_at = NO_SILENCE;
            if slot.state.last_seen >= start {
                continue;
            }
            self.empty.reset(start);
            let s = self.close_one(t as usize, None);
            out.push(s);
        }
    }

    /// Arm the silence check of token `t` for the window after `start`, if it is steady
    /// enough there for no traffic to mean something.
    fn arm_silence(&mut self, t: usize, start: i64) {
        let next = start.saturating_add(self.cfg.window.size.ms);
        let st = &self.slots[t].state;
        let ctx = Ctx {
            cfg: &self.cfg,
            window_ms: self.cfg.window.size.ms,
            start: next,
            windows: st.windows,
            first_seen: st.first_seen,
            global: &self.global,
            registry: None,
            group: None,
            trusted: false,
        };
        if self.models.rate.expects_traffic(&st.rate, &ctx) {
            self.silence.entry(next).or_default().push(t as u32);
            self.slots[t].silence_at = next;
        }
    }

    /// Score and learn one closed window of token `t`: the aggregate `a`, or with `None`
    /// a window without traffic (only the rate model speaks and learns).
    fn close_one(&mut self, t: usize, a: Option<usize>) -> WindowScore {
        let score = self.score_one(t, a);
        self.arm_silence(t, score.start);
        score
    }

    fn score_one(&mut self, t: usize, a: Option<usize>) -> WindowScore {
        let cfg = &*self.cfg;
        let global = &*self.global;
        let slot = &mut self.slots[t];
        let silent = a.is_none();
        let agg = match a {
            Some(a) => &self.aggs[a],
            None => &self.empty,
        };
        let st = &mut slot.state;
        if st.peers.group == NO_GROUP && st.windows > 0 {
            if let Some(p) = &global.peers {
                st.peers.group = p.nearest(&st.peers.usage()) as u8;
            }
        }
        let reg = slot.reg.as_deref();

        let ctx = Ctx {
            cfg,
            window_ms: cfg.window.size.ms,
            start: agg.start,
            windows: st.windows,
            first_seen: st.first_seen,
            global,
            registry: reg,
            group: global
                .peers
                .as_ref()
                .and_then(|p| p.groups.get(st.peers.group as usize)),
            trusted: false,
        };
        // A move (new place, the old one absent) that has lasted is adopted: its windows
        // no longer count the new place as new and are learned with it trusted at once.
        // An addition never is.
        let held = st.feedback.held_at(agg.start);
        let mut adopted = false;
        // Minutes a move to this window's new place has lasted (0: none under way).
        let mut moving_for = 0u32;
        // Minutes a new place has been in use beside the usual one (an addition).
        let mut adding_for = 0u32;
        if !silent {
            let now = (agg.start.div_euclid(60_000)).clamp(0, u32::MAX as i64) as u32;
            let place = self.models.network.new_place(&st.network, agg);
            let c = &mut st.change;
            if agg.countries.distinct() > 0 && !matches!(place, Some((_, true))) {
                // The usual place (or part of it) is here.
                c.home = now;
            }
            if let Some((k, moved)) = place {
                if c.key != k || now.saturating_sub(c.last) > 1440 {
                    c.key = k;
                    c.since = now;
                } else if moved && c.home == c.since {
                    // It began in a window shared with the usual place (a handover) and the
                    // usual place has not been back: the move starts here.
                    c.since = now;
                }
                c.last = now;
                if c.home > c.since {
                    // The usual place was back after the new one appeared: the two are in
                    // use side by side, an addition (sharing, a leak), never adopted.
                    adding_for = now.saturating_sub(c.since);
                } else if moved {
                    moving_for = now.saturating_sub(c.since);
                    let after = (cfg.score.adopt_move_after.ms / 60_000) as u32;
                    // A new country is a move only if the old one went quiet long enough
                    // before it for a journey (a second user appearing while the owner was
                    // just active is an addition); a new provider within the same country
                    // (a bot moving region) needs no journey.
                    let journey = if k & 1 == 1 {
                        c.since.saturating_sub(c.home)
                            >= (cfg.score.min_travel_gap.ms / 60_000) as u32
                    } else {
                        true
                    };
                    if !held && journey && moving_for >= after {
                        adopted = true;
                    }
                }
            }
        }
        let scratch = &mut self.scratch;
        scratch.clear();
        if silent {
            self.models.rate.score(&st.rate, agg, &ctx, scratch);
        } else {
            self.models.score(st, agg, &ctx, scratch);
        }
        if adopted {
            scratch.signals.retain(|s| !PLACE.contains(&s.kind));
        }
        let fb = st.feedback;
        let scaling = score::Scaling {
            // Alerts on a move decay while it lasts (half-life: the adoption time): flagged
            // when it starts, quieter as it goes on. An addition resets the move, so it speaks
            // at full strength again.
            moving: (moving_for > 0 && !adopted).then(|| {
                let half = (cfg.score.adopt_move_after.ms as f64 / 60_000.0).max(1.0);
                let mask = PLACE.iter().fold(0u32, |m, k| m | 1 << k.index());
                (mask, 0.5f64.powf(moving_for as f64 / half))
            }),
            // A new place used beside the usual one (a shared or leaked token) is weak
            // evidence in any one window; it accumulates while the addition lasts.
            adding: (adding_for > 0).then(|| {
                let mask = PLACE
                    .iter()
                    .chain(&[SignalKind::NewUserAgent])
                    .fold(0u32, |m, k| m | 1 << k.index());
                let ramp = (cfg.score.addition_ramp.ms as f64 / 60_000.0).max(1.0);
                let x = adding_for as f64 / ramp;
                (mask, 1.0 + 2.0 * x.min(1.0) + x.max(1.0).ln())
            }),
            damped: fb
                .damped_at(agg.start)
                .then_some((fb.damp_mask, cfg.feedback.damp_factor)),
            calibration: Some(st.surprise.0),
        };
        let mut r = score::risk(&mut scratch.signals, &scaling, &cfg.score, &cfg.weights);
        if let (Some(iso), false) = (&global.isolation, silent) {
            // The forest is the costliest model; it is consulted only where the most it can
            // add (its smallest tail probability) could matter.
            let most =
                score::evidence(SignalKind::Isolation, iso.min_p(), &cfg.score, &cfg.weights);
            if st.windows >= 10
                && !IsolationModel::is_ordinary(&scratch.features)
                && score::worth_consulting(r.risk, most)
            {
                let (s, p) = iso.score(&scratch.features);
                scratch.push(Signal::new(SignalKind::Isolation, s, 0.5, p));
                r = score::risk(&mut scratch.signals, &scaling, &cfg.score, &cfg.weights);
            }
        }
        let risk = r.risk;
        let alert = score::alerts(risk, &cfg.score);
        let young = agg.start - st.first_seen < cfg.score.learn_all_for.ms;
        let hold = if held {
            score::Hold::Confirmed(cfg.feedback.hold_learn_below)
        } else if st.feedback.alerted_at(agg.start) {
            score::Hold::Alerted(cfg.feedback.hold_learn_below)
        } else {
            score::Hold::None
        };
        let learned = score::learned(risk, &cfg.score, young, adopted, hold);
        if alert {
            let until = agg.start.saturating_add(cfg.score.alert_hold.ms);
            st.feedback.alert_until = st.feedback.alert_until.max(FeedbackState::minutes(until));
        }
        // The token's own distribution of surprise learns from its ordinary (learned)
        // windows, not in its first day (everything is new then).
        if learned && agg.start - st.first_seen >= 86_400_000 {
            st.surprise.0.update(r.surprise, self.calibration_alpha);
        }
        self.models.track(st, agg, &ctx, held, scratch);
        if learned && silent {
            self.models.rate.learn(&mut st.rate, agg, &ctx);
        } else if learned {
            let lctx = Ctx {
                trusted: adopted,
                ..ctx
            };
            self.models.learn(st, agg, &lctx);
            if st.windows > 30 {
                let h = mix(text_key(&slot.name) ^ (agg.start as u64).rotate_left(17));
                self.reservoir.offer(h, &scratch.features);
            }
        } else {
            st.quarantined = st.quarantined.saturating_add(1);
            self.stats.quarantined += 1;
            if !held && !silent {
                let keep = self.held.entry(t as u32).or_default();
                let oldest = agg.start.saturating_sub(cfg.feedback.keep_quarantined.ms);
                keep.retain(|w| w.start >= oldest);
                if keep.len() >= MAX_HELD {
                    keep.remove(0);
                }
                keep.push(agg.clone());
            }
        }
        st.last_seen = st.last_seen.max(agg.start);
        self.stats.windows += 1;
        if alert {
            self.stats.alerts += 1;
        }
        let age_days = (agg.start - st.first_seen) as f64 / 86_400_000.0;
        let confidence = ((age_days / 7.0).min(1.0)
            * (st.rate.n as f64 / cfg.rate.warmup_windows.max(1.0)).min(1.0))
        .clamp(0.0, 1.0) as f32;
        let mut contributions: Vec<Contribution> = scratch
            .signals
            .iter()
            .filter(|s| s.evidence >= score::SHOWN)
            .map(|s| Contribution {
                signal: s.kind,
                observed: s.observed,
                expected: s.expected,
                p: s.p,
                evidence: s.evidence,
                reason: score::explain(s, agg.start, &self.names, reg),
            })
            .collect();
        if confidence < 0.5 {
            if let Some(c) = contributions.first_mut() {
                c.reason.push_str(&format!(
                    " (baseline from {}, low confidence)",
                    score::human_age(age_days)
                ));
            }
        }
        WindowScore {
            token: slot.name.clone(),
            start: agg.start,
            events: agg.count,
            risk: risk as f32,
            alert,
            learned,
            labelled: agg.labelled,
            kind: (agg.kind != 0).then(|| self.names.get(agg.kind).unwrap_or("?").to_string()),
            contributions,
            confidence,
            agents: top_two(&agg.agents.items),
        }
    }
}

/// The two largest counts of a window's items (no allocation).
fn top_two(items: &[(u64, u32)]) -> [(u64, u32); 2] {
    let mut top = [(0u64, 0u32); 2];
    for &(k, c) in items {
        if c > top[0].1 {
            top[1] = top[0];
            top[0] = (k, c);
        } else if c > top[1].1 {
            top[1] = (k, c);
        }
    }
    top
}

/// The shard (of `n`) that owns `token`: a stable hash of the id, the same on every run,
/// version and node (the cluster's partitions use it too). The key's lowest bit is always
/// set (keys are never 0), so it is shifted out first.
pub fn shard_of(token: &str, n: usize) -> usize {
    ((text_key(token) >> 1) % n.max(1) as u64) as usize
}

/// A window starting at `start` (of `w` ms) closed before the watermark `closed` passed.
fn is_late(start: i64, w: i64, closed: i64) -> bool {
    start.saturating_add(w) <= closed
}

/// The signals of a new place: what a move changes and an adopted move no longer counts.
const PLACE: [SignalKind; 3] = [
    SignalKind::NewCountry,
    SignalKind::NewAsn,
    SignalKind::NewPrefix,
];

/// Reloaded tokens whose spill entries are deleted in one write, at most.
const MAX_PENDING_DELETES: usize = 4096;

/// Evicted tokens brought back at once to close their windows, at most (per round).
const PENDING_CHUNK: usize = 65_536;

/// Version of a spill record ([`encode_record`]).
const RECORD_VERSION: u8 = 2;

/// A token's spill record: its state and open windows; and the start of its earliest open
/// window, if any.
fn encode_record(slot: &Slot, aggs: &[WindowAgg]) -> (Vec<u8>, Option<i64>) {
    let mut w = crate::model::codec::Writer::default();
    w.u8(RECORD_VERSION);
    let mut st = crate::model::codec::Writer::default();
    slot.state.encode(&mut st);
    w.bytes(&st.buf);
    w.u32(slot.open.len() as u32);
    for &(_, a) in &slot.open {
        aggs[a as usize].encode(&mut w);
    }
    (w.buf, slot.open.iter().map(|o| o.0).min())
}

/// What [`encode_record`] wrote.
fn decode_record(b: &[u8]) -> Result<(TokenState, Vec<WindowAgg>), crate::model::DecodeError> {
    use crate::model::DecodeError;
    let mut r = crate::model::codec::Reader::new(b);
    let v = r.u8()?;
    if v != RECORD_VERSION {
        return Err(DecodeError::Version {
            found: v,
            expected: RECORD_VERSION,
        });
    }
    let state = TokenState::decode(r.bytes()?)?;
    let mut open = Vec::new();
    for _ in 0..r.count(8)? {
        open.push(WindowAgg::decode(&mut r)?);
    }
    if r.remaining() != 0 {
        return Err(DecodeError::Trailing(r.remaining()));
    }
    Ok((state, open))
}

/// Quarantined windows kept per token for feedback, at most.
const MAX_HELD: usize = 64;

/// An operator's verdict on an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It was an incident.
    TruePositive,
    /// Nothing happened: the models were wrong.
    FalsePositive,
    /// A real but legitimate change (a move, a new integration).
    ExpectedChange,
}

impl Verdict {
    /// `true_positive`, `false_positive`, `expected_change`.
    pub fn parse(s: &str) -> Option<Verdict> {
        match s {
            "true_positive" => Some(Verdict::TruePositive),
            "false_positive" => Some(Verdict::FalsePositive),
            "expected_change" => Some(Verdict::ExpectedChange),
            _ => None,
        }
    }

    /// Name as parsed.
    pub fn name(self) -> &'static str {
        match self {
            Verdict::TruePositive => "true_positive",
            Verdict::FalsePositive => "false_positive",
            Verdict::ExpectedChange => "expected_change",
        }
    }
}

/// What a verdict changed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FeedbackEffect {
    /// Quarantined windows of the alert now learned.
    pub learned_windows: u32,
    /// Signals damped for the token by this verdict.
    pub damped: Vec<SignalKind>,
    /// No window of the token is learned before this event time.
    pub hold_until: Option<i64>,
}

impl Shard {
    fn feedback(
        &mut self,
        t: u32,
        (from, to): (i64, i64),
        verdict: Verdict,
        signals: &[SignalKind],
    ) -> FeedbackEffect {
        let cfg = self.cfg.clone();
        let w = cfg.window.size.ms;
        let mut held = self.held.remove(&t).unwrap_or_default();
        let (mine, rest): (Vec<WindowAgg>, Vec<WindowAgg>) = held
            .drain(..)
            .partition(|a| a.start >= from && a.start < to.saturating_add(w));
        if !rest.is_empty() {
            self.held.insert(t, rest);
        }
        let mut effect = FeedbackEffect::default();
        let slot = &mut self.slots[t as usize];
        let fb = &mut slot.state.feedback;
        match verdict {
            Verdict::TruePositive => {
                let until = to.saturating_add(cfg.feedback.hold_for.ms);
                fb.hold_until = fb.hold_until.max(FeedbackState::minutes(until));
                effect.hold_until = Some(fb.hold_until as i64 * 60_000);
            }
            Verdict::FalsePositive | Verdict::ExpectedChange => {
                // What the alert held back is ordinary after all: learning resumes at once.
                fb.alert_until = 0;
                if verdict == Verdict::FalsePositive {
                    for &s in signals {
                        let n = &mut fb.false_alarms[s.index()];
                        *n = n.saturating_add(1);
                        if *n >= cfg.feedback.damp_after {
                            *n = 0;
                            fb.damp_mask |= 1 << s.index();
                            let until = to.saturating_add(cfg.feedback.damp_for.ms);
                            fb.damp_until = fb.damp_until.max(FeedbackState::minutes(until));
                            effect.damped.push(s);
                        }
                    }
                }
                let global = self.global.clone();
                for agg in &mine {
                    let st = &mut slot.state;
                    let ctx = Ctx {
                        cfg: &cfg,
                        window_ms: w,
                        start: agg.start,
                        windows: st.windows,
                        first_seen: st.first_seen,
                        global: &global,
                        registry: slot.reg.as_deref(),
                        group: global
                            .peers
                            .as_ref()
                            .and_then(|p| p.groups.get(st.peers.group as usize)),
                        trusted: true,
                    };
                    self.models.learn(st, agg, &ctx);
                    st.quarantined = st.quarantined.saturating_sub(1);
                    effect.learned_windows += 1;
                }
            }
        }
        effect
    }
}

/// A cluster partition's side of a refit: the engine of one partition holds only its own
/// tokens, so at each refit point it sends its share and gets back what every partition's
/// shares fit to (the same on every node: the merge is order-free and the fit
/// deterministic).
pub trait Exchange: Send {
    /// Send this engine's share of the refit at event time `at` (with its earliest open
    /// window, or its newest event time when it has none open, whichever is earlier), and
    /// wait for the models fitted from every partition's shares and the earliest of all
    /// partitions' `earliest`. `None`: this engine may not go on (its partition was lost);
    /// it stops advancing and [`Engine::fenced`] says so.
    fn refit(&mut self, at: i64, share: Share) -> Option<(Arc<Global>, i64)>;
}

/// One partition's part of a refit as the cluster carries it: its tokens' partials, its
/// bottom-k isolation sample and its earliest open window ([`Exchange::refit`]).
pub struct Share {
    /// Partial statistics of its tracked tokens.
    pub partial: RefitPartial,
    /// Bottom-k sample of its windows' isolation points.
    pub sample: Reservoir,
    /// Its earliest open window (or newest event time, whichever is earlier).
    pub earliest: i64,
}

/// Version of [`Share`]'s bytes.
const SHARE_VERSION: u8 = 1;

impl Share {
    /// Canonical bytes (the same share always encodes the same).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = crate::model::codec::Writer::default();
        w.u8(SHARE_VERSION);
        w.i64(self.earliest);
        self.partial.encode(&mut w);
        self.sample.encode(&mut w);
        w.buf
    }

    /// Decode what [`Share::encode`] wrote (keeping at most `cap` sample points); damaged
    /// bytes are an error, never a partial share.
    pub fn decode(buf: &[u8], cap: usize) -> Result<Share, crate::model::DecodeError> {
        use crate::model::DecodeError;
        let mut r = crate::model::codec::Reader::new(buf);
        let v = r.u8()?;
        if v != SHARE_VERSION {
            return Err(DecodeError::Version {
                found: v,
                expected: SHARE_VERSION,
            });
        }
        let earliest = r.i64()?;
        let partial = RefitPartial::decode(&mut r)?;
        let mut sample = Reservoir::new(cap);
        sample.absorb(&mut r)?;
        if r.remaining() > 0 {
            return Err(DecodeError::Trailing(r.remaining()));
        }
        Ok(Share {
            partial,
            sample,
            earliest,
        })
    }
}

/// The first refit point of an engine whose first batch starts at `min_ts`: one warm-up
/// after that batch's first window (a cluster takes it from the first request it ingests).
pub fn first_refit(cfg: &Config, min_ts: i64) -> i64 {
    window_start(min_ts, cfg.window.size.ms).saturating_add(cfg.engine.warmup.ms)
}

/// Fit the cross-token models of the refit at `at` from every partition's share (in any
/// order: the merge is order-free and the fit deterministic, so every node that fits the
/// same shares installs the same models), and the earliest of their `earliest`.
pub fn fit_shares(shares: Vec<Share>, cfg: &Config, at: i64) -> (Global, i64) {
    let earliest = shares.iter().map(|s| s.earliest).min().unwrap_or(at);
    let samples: Vec<&Reservoir> = shares.iter().map(|s| &s.sample).collect();
    let sample = Reservoir::merged(&samples, cfg.isolation.reservoir);
    let mut merged = RefitPartial::default();
    for s in shares {
        merged.merge(s.partial);
    }
    (merged.fit(&sample, cfg, at), earliest)
}

/// The engine: shards, watermark, global refits.
pub struct Engine {
    cfg: Arc<Config>,
    shards: Vec<Shard>,
    global: Arc<Global>,
    max_ts: i64,
    watermark: i64,
    next_refit: Option<i64>,
    rows: Vec<Vec<u32>>,
    refits: u64,
    spill: SpillCell,
    /// File name of the spill in the data directory (`None`: temporary or none yet).
    spill_name: Option<String>,
    /// Where refits are shared with the other partitions of a cluster (`None`: this
    /// engine sees every token and refits alone).
    exchange: Option<Box<dyn Exchange>>,
    /// The exchange failed: this engine no longer advances.
    fenced: bool,
}

impl Engine {
    /// A fresh engine.
    pub fn new(cfg: Config, registry: Registry) -> Self {
        let cfg = Arc::new(cfg);
        let registry = Arc::new(registry);
        let global = Arc::new(Global::default());
        let n = cfg.shard_count();
        let spill: SpillCell = Arc::default();
        Engine {
            shards: (0..n)
                .map(|_| {
                    Shard::new(
                        cfg.clone(),
                        registry.clone(),
                        global.clone(),
                        spill.clone(),
                        n,
                    )
                })
                .collect(),
            spill,
            spill_name: None,
            cfg,
            global,
            max_ts: i64::MIN,
            watermark: i64::MIN,
            next_refit: None,
            rows: vec![Vec::new(); n],
            refits: 0,
            exchange: None,
            fenced: false,
        }
    }

    /// Share every refit with the other partitions of a cluster through `x`.
    pub fn set_exchange(&mut self, x: Box<dyn Exchange>) {
        self.exchange = Some(x);
    }

    /// The first refit at event time `at` (a cluster's partitions share one grid of refit
    /// points), unless this engine already has one (restored, or events applied).
    pub fn set_refit_origin(&mut self, at: i64) {
        if self.next_refit.is_none() {
            self.next_refit = Some(at);
        }
    }

    /// The next refit point, if the grid is set.
    pub fn next_refit(&self) -> Option<i64> {
        self.next_refit
    }

    /// The refit exchange failed (a cluster partition that lost its lease): nothing this
    /// engine closed after that may be published.
    pub fn fenced(&self) -> bool {
        self.fenced
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Evict into `spill` (the data directory's file `name`) instead of a temporary file.
    /// Only before the first eviction: `false` if a spill is already in use.
    pub fn set_spill(&mut self, spill: Arc<Spill>, name: String) -> bool {
        spill.set_min_free(self.cfg.engine.spill_min_free.0);
        if self.spill.set(Some(spill)).is_err() {
            return false;
        }
        self.spill_name = Some(name);
        true
    }

    /// Make the spill durable and mark this moment for [`Engine::snapshot`]'s snapshot:
    /// where its evicted tokens are. `None` when nothing was ever evicted to a data
    /// directory's spill.
    pub fn spill_savepoint(&self) -> Result<Option<SpillRef>, crate::store::Error> {
        let (Some(Some(spill)), Some(name)) = (self.spill.get(), self.spill_name.as_ref()) else {
            return Ok(None);
        };
        // Nothing evicted: the snapshot holds every token and needs no spill.
        if spill.is_empty() {
            return Ok(None);
        }
        Ok(Some(SpillRef {
            file: name.clone(),
            savepoint: spill.savepoint()?,
        }))
    }

    /// File name of the data directory's spill in use, if any.
    pub fn spill_file(&self) -> Option<&str> {
        self.spill_name.as_deref()
    }

    /// [`Engine::snapshot`] with the spill's savepoint taken at the same moment: what a
    /// data directory's snapshot must hold (its evicted tokens are in the spill).
    pub fn snapshot_with_spill(&self) -> Result<EngineSnapshot, crate::store::Error> {
        let mut snap = self.snapshot();
        snap.spill = self.spill_savepoint()?;
        Ok(snap)
    }

    /// Report the ids of evicted tokens to [`Engine::take_evicted`] from now on (the server
    /// drops its latest score and policy state of each).
    pub fn report_evictions(&mut self) {
        for sh in self.shards.iter_mut() {
            sh.evicted_names.get_or_insert_with(Vec::new);
        }
    }

    /// Tokens evicted since the last call (with [`Engine::report_evictions`]).
    pub fn take_evicted(&mut self) -> Vec<Arc<str>> {
        let mut out = Vec::new();
        for sh in self.shards.iter_mut() {
            if let Some(v) = sh.evicted_names.as_mut() {
                out.append(v);
            }
        }
        out
    }

    /// Current watermark (event time up to which windows are closed).
    pub fn watermark(&self) -> i64 {
        self.watermark
    }

    /// Apply a batch of validated events (the canonical schema); returns the windows the
    /// advancing watermark closed, ordered by (window start, token).
    pub fn apply(&mut self, batch: &RecordBatch) -> Result<Vec<WindowScore>, Error> {
        self.apply_at(batch, i64::MAX)
    }

    /// [`Engine::apply`] with a trusted clock (the server's, epoch ms): event time is taken
    /// to have reached no further than `now`, so the watermark never passes `now` minus the
    /// lateness. An event stamped ahead of the clock waits in its open window; it cannot
    /// make every other client's events late. Files (replay, eval) have no such clock and
    /// follow their newest event.
    pub fn apply_at(&mut self, batch: &RecordBatch, now: i64) -> Result<Vec<WindowScore>, Error> {
        let cols = Cols::new(batch)?;
        let n = batch.num_rows();
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut bmax = i64::MIN;
        let mut bmin = i64::MAX;
        for i in 0..n {
            let t = cols.ts.value(i);
            bmax = bmax.max(t);
            bmin = bmin.min(t);
        }
        if self.next_refit.is_none() {
            self.next_refit = Some(first_refit(&self.cfg, bmin));
        }
        let nshards = self.shards.len();
        if nshards == 1 {
            self.shards[0].ingest(&cols, 0..n);
        } else {
            for r in self.rows.iter_mut() {
                r.clear();
            }
            for i in 0..n {
                let s = shard_of(cols.token.value(i), nshards);
                self.rows[s].push(i as u32);
            }
            let rows = &self.rows;
            let cols = &cols;
            std::thread::scope(|sc| {
                for (shard, rows) in self.shards.iter_mut().zip(rows.iter()) {
                    sc.spawn(move || shard.ingest(cols, rows.iter().map(|&r| r as usize)));
                }
            });
        }
        self.max_ts = self.max_ts.max(bmax.min(now));
        let wm = self.max_ts.saturating_sub(self.cfg.window.lateness.ms);
        Ok(self.advance(wm))
    }

    /// Apply an operator's verdict on an alert of `token` covering the windows starting in
    /// `[from, to]`, whose top contributors were `signals`. `None` for an unknown token.
    pub fn feedback(
        &mut self,
        token: &str,
        (from, to): (i64, i64),
        verdict: Verdict,
        signals: &[SignalKind],
    ) -> Option<FeedbackEffect> {
        let n = self.shards.len() as u64;
        let sh = &mut self.shards[shard_of(token, n as usize)];
        // An evicted token comes back for the verdict (its held windows went with it).
        let t = match sh.tokens.get(token) {
            Some(&t) => t,
            None => {
                let back = sh.reload(token)?;
                sh.put_back(token, back)
            }
        };
        Some(sh.feedback(t, (from, to), verdict, signals))
    }

    /// Event time up to which the shards have closed windows (they all close together).
    fn closed_wm(&self) -> i64 {
        self.shards
            .iter()
            .map(|s| s.closed_wm)
            .max()
            .unwrap_or(i64::MIN)
    }

    /// Rows of a (canonical) batch that would arrive late: their window already closed.
    pub fn late_rows(&self, batch: &RecordBatch) -> u64 {
        let w = self.cfg.window.size.ms;
        let closed = self.closed_wm();
        let Some(ts) = batch
            .column(col::TS)
            .as_primitive_opt::<TimestampMillisecondType>()
        else {
            return 0;
        };
        ts.values()
            .iter()
            .filter(|&&t| is_late(window_start(t, w), w, closed))
            .count() as u64
    }

    /// Newest event time seen, if any event was applied.
    pub fn newest(&self) -> Option<i64> {
        (self.max_ts != i64::MIN).then_some(self.max_ts)
    }

    /// Event time goes on without events: take `now` as the newest event time and close
    /// what the watermark passes. The server calls this when no event has arrived for a
    /// while, so that the last window of a token whose traffic stopped is still scored.
    /// Does nothing before the first event or when `now` is not ahead of the newest event.
    /// An engine that has seen no event moves too once its refit grid is set
    /// ([`Engine::set_refit_origin`]): a cluster partition with no traffic still takes part
    /// in every refit.
    pub fn advance_to(&mut self, now: i64) -> Vec<WindowScore> {
        let unset = self.max_ts == i64::MIN && self.next_refit.is_none();
        if unset || now <= self.max_ts {
            return Vec::new();
        }
        self.max_ts = now;
        let wm = now.saturating_sub(self.cfg.window.lateness.ms);
        self.advance(wm)
    }

    /// Close every open window but stay resumable (graceful shutdown): windows up to the
    /// one holding the newest event count as closed, so an event for them after a restart is
    /// late, and later event times go on as usual.
    pub fn close_open(&mut self) -> Vec<WindowScore> {
        let out = self.advance(i64::MAX);
        let w = self.cfg.window.size.ms;
        let end = if self.max_ts == i64::MIN {
            i64::MIN
        } else {
            window_start(self.max_ts, w).saturating_add(w)
        };
        self.watermark = end;
        for sh in self.shards.iter_mut() {
            sh.closed_wm = end;
        }
        out
    }

    /// Close every open window (end of input).
    pub fn finish(&mut self) -> Vec<WindowScore> {
        self.advance(i64::MAX)
    }

    /// Move the watermark to `wm`, refitting global models at their event-time points so
    /// that results do not depend on batch boundaries.
    fn advance(&mut self, wm: i64) -> Vec<WindowScore> {
        let mut out = Vec::new();
        if wm <= self.watermark {
            return out;
        }
        // Refits happen at fixed event times (never past the newest event), so a large
        // batch and many small ones give the same scores.
        let limit = wm.min(self.max_ts);
        let every = self.cfg.engine.refit_every.ms.max(1);
        while let Some(r) = self.next_refit.filter(|&r| r <= limit) {
            if self.fenced {
                return out;
            }
            self.close_all(r, &mut out);
            self.watermark = self.watermark.max(r);
            // Event time that jumped far ahead (a long gap in traffic, or one broken clock)
            // is caught up with one refit at the last point of the grid before the next open
            // window, not one per interval of the gap: with no window open in between, those
            // refits would all see the same state (so the scores are the same either way,
            // whatever the batching). A cluster's partitions skip by the earliest of all.
            let earliest = self
                .shards
                .iter()
                .filter_map(|s| {
                    let q = s.queue.keys().next().copied();
                    let w = s.silence.keys().next().copied();
                    q.into_iter().chain(w).min()
                })
                .min()
                .unwrap_or(limit)
                .min(limit);
            let earliest = match self.exchange.take() {
                None => {
                    self.refit(r);
                    earliest
                }
                Some(mut x) => {
                    let got = x.refit(r, self.refit_share(earliest));
                    self.exchange = Some(x);
                    match got {
                        Some((global, all)) => {
                            self.install_global(global);
                            all
                        }
                        None => {
                            self.fenced = true;
                            return out;
                        }
                    }
                }
            };
            let next = r.saturating_add(every);
            let skip = earliest.saturating_sub(next) / every;
            self.next_refit = Some(if skip >= 2 {
                next.saturating_add(skip.saturating_mul(every))
            } else {
                next
            });
        }
        self.close_all(wm, &mut out);
        self.watermark = wm;
        out.sort_by(|a, b| a.start.cmp(&b.start).then_with(|| a.token.cmp(&b.token)));
        out
    }

    fn close_all(&mut self, wm: i64, out: &mut Vec<WindowScore>) {
        // Tokens evicted with open windows come back, a chunk at a time, when those windows
        // close: they are scored like any other (an evicted token is never skipped).
        let w = self.cfg.window.size.ms;
        loop {
            let back = self.bring_back_pending(wm.saturating_sub(w));
            self.close_shards(wm, out);
            if back == 0 {
                break;
            }
        }
    }

    /// Load back the evicted tokens with an open window starting at or before `upto` (at
    /// most [`PENDING_CHUNK`]); how many entries were found.
    fn bring_back_pending(&mut self, upto: i64) -> usize {
        let Some(spill) = self.spill.get().and_then(|s| s.as_ref()).cloned() else {
            return 0;
        };
        if spill.is_empty() {
            return 0;
        }
        for sh in self.shards.iter_mut() {
            sh.flush_deletes(&spill);
        }
        // At most the shards' headroom at once, so bringing them back stays in the budget.
        let chunk = self
            .shards
            .iter()
            .map(|s| s.hard_budget - s.budget)
            .sum::<usize>()
            .clamp(1, PENDING_CHUNK);
        let list = match spill.pending(upto, chunk) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the token spill; evicted windows wait");
                return 0;
            }
        };
        let n = self.shards.len();
        let mut moved = 0;
        for (start, name) in &list {
            let sh = &mut self.shards[shard_of(name, n)];
            // Within the budget's headroom only: if the spill cannot take them again (the
            // disk floor), their windows wait rather than memory growing.
            if sh.live >= sh.hard_budget && sh.spill_refused {
                continue;
            }
            sh.bring_back(name, *start);
            moved += 1;
        }
        moved
    }

    fn close_shards(&mut self, wm: i64, out: &mut Vec<WindowScore>) {
        let upto = wm.min(self.max_ts);
        if self.shards.len() == 1 {
            self.shards[0].close_until(wm, upto, out);
            return;
        }
        let parts: Vec<Vec<WindowScore>> = std::thread::scope(|sc| {
            let hs: Vec<_> = self
                .shards
                .iter_mut()
                .map(|s| {
                    sc.spawn(move || {
                        let mut o = Vec::new();
                        s.close_until(wm, upto, &mut o);
                        o
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap_or_default())
                .collect()
        });
        for p in parts {
            out.extend(p);
        }
    }

    /// Refit the cross-token models, now (event time `at`): every shard gathers its tokens'
    /// partial statistics (`RefitPartial`, the models' own view of them), the partials are
    /// merged and fitted once.
    pub fn refit(&mut self, at: i64) {
        let share = self.refit_share(at);
        let (global, _) = fit_shares(vec![share], &self.cfg, at);
        self.install_global(Arc::new(global));
    }

    /// This engine's share of a refit: its tracked tokens' partials merged over the shards,
    /// the bottom-k of its shards' isolation samples, and `earliest`. A cluster partition
    /// sends this to the others (the bottom-k of the union of bottom-k's is the union's
    /// bottom-k, so merging shares gives the sample a single engine would have).
    pub fn refit_share(&self, earliest: i64) -> Share {
        let min_w = self.cfg.peers.min_windows;
        let mut merged = RefitPartial::default();
        for sh in &self.shards {
            let mut part = RefitPartial::default();
            for slot in sh.slots.iter().filter(|s| s.live) {
                part.add(&slot.name, &slot.state, min_w);
            }
            merged.merge(part);
        }
        let mut sample = Reservoir::new(self.cfg.isolation.reservoir);
        for sh in &self.shards {
            sample.merge_from(&sh.reservoir);
        }
        Share {
            partial: merged,
            sample,
            earliest,
        }
    }

    /// Hand fitted cross-token models to every shard (and move each token to its nearest
    /// peer group).
    pub fn install_global(&mut self, global: Arc<Global>) {
        for sh in self.shards.iter_mut() {
            sh.global = global.clone();
            if let Some(p) = &global.peers {
                for slot in sh.slots.iter_mut().filter(|s| s.live) {
                    if slot.state.windows > 0 {
                        slot.state.peers.group = p.nearest(&slot.state.peers.usage()) as u8;
                    }
                }
            }
        }
        self.global = global;
        self.refits += 1;
    }

    /// Counters summed over shards.
    pub fn stats(&self) -> Stats {
        let mut s = Stats::default();
        for sh in &self.shards {
            s.events += sh.stats.events;
            s.late += sh.stats.late;
            s.windows += sh.stats.windows;
            s.alerts += sh.stats.alerts;
            s.quarantined += sh.stats.quarantined;
            s.tokens += sh.stats.tokens;
            s.tracked += sh.live as u64;
            s.evicted += sh.stats.evicted;
            s.reloaded += sh.stats.reloaded;
            s.untracked += sh.stats.untracked;
        }
        s.refits = self.refits;
        s
    }

    /// The state of one token, if known.
    pub fn token_state(&self, token: &str) -> Option<&TokenState> {
        self.shards
            .iter()
            .find_map(|sh| sh.tokens.get(token).map(|&t| &sh.slots[t as usize].state))
    }

    /// A token's baseline as the console shows it: its state as it is now, the printable
    /// names of its most used endpoints (folded key, name) and of the text keys `keys` (user
    /// agents), where its shard noted them.
    #[allow(clippy::type_complexity)]
    pub fn describe(
        &self,
        token: &str,
        keys: &[u64],
    ) -> Option<(TokenState, Vec<(u32, String)>, Vec<(u64, String)>)> {
        let sh = self
            .shards
            .iter()
            .find(|sh| sh.tokens.contains_key(token))?;
        let st = sh.slots[*sh.tokens.get(token)? as usize].state.clone();
        let endpoints = st
            .endpoints
            .top
            .slots
            .iter()
            .filter(|s| s.key != 0)
            .filter_map(|s| Some((s.key, sh.names.get_folded(s.key)?.to_string())))
            .collect();
        let named = keys
            .iter()
            .filter_map(|&k| Some((k, sh.names.get(k)?.to_string())))
            .collect();
        Some((st, endpoints, named))
    }

    /// The token is tracked in memory now.
    pub fn is_tracked(&self, token: &str) -> bool {
        let n = self.shards.len() as u64;
        self.shards[shard_of(token, n as usize)]
            .tokens
            .contains_key(token)
    }

    /// Cross-token models in force.
    pub fn global(&self) -> &Global {
        &self.global
    }

    /// Bytes of model state per token: in memory (`size_of`) and encoded (snapshot).
    pub fn state_bytes(&self) -> (usize, usize) {
        let mem = std::mem::size_of::<TokenState>();
        let enc = self
            .shards
            .iter()
            .flat_map(|s| s.slots.iter().find(|s| s.live))
            .map(|s| {
                let mut w = crate::model::codec::Writer::default();
                s.state.encode(&mut w);
                w.buf.len()
            })
            .next()
            .unwrap_or(0);
        (mem, enc)
    }
}

/// Version of [`EngineSnapshot::header`]; a snapshot of another version is refused.
pub const SNAPSHOT_VERSION: u8 = 4;

/// A consistent copy of the whole engine: restoring it and applying the same later batches
/// gives the same scores as if the engine had never stopped.
#[derive(Debug, Clone, Default)]
pub struct EngineSnapshot {
    /// Engine-wide state: clocks, counters, cross-token models, isolation sample, names.
    pub header: Vec<u8>,
    /// Every tracked token, in shard and arrival order.
    pub tokens: Vec<TokenSnapshot>,
    /// Where the evicted tokens are, at the moment of this snapshot.
    pub spill: Option<SpillRef>,
}

/// One token's part of a snapshot.
#[derive(Debug, Clone)]
pub struct TokenSnapshot {
    /// Token id.
    pub token: Arc<str>,
    /// Model state ([`TokenState::encode`]).
    pub state: Vec<u8>,
    /// Open windows ([`WindowAgg::encode`] each, count first).
    pub open: Vec<u8>,
    /// Opaque bytes a door keeps beside the token (the server: its latest published
    /// score); the engine neither writes nor reads them.
    pub extra: Vec<u8>,
    /// First window seen (epoch ms).
    pub first_seen: i64,
    /// Last window seen.
    pub last_seen: i64,
    /// Windows learned or quarantined.
    pub windows: u32,
}

impl Engine {
    /// Copy out the whole state.
    pub fn snapshot(&self) -> EngineSnapshot {
        use crate::model::codec::Writer;
        let mut w = Writer::default();
        w.u8(SNAPSHOT_VERSION);
        w.i64(self.max_ts);
        w.i64(self.watermark);
        w.u8(self.next_refit.is_some() as u8);
        w.i64(self.next_refit.unwrap_or(0));
        w.u64(self.refits);
        let closed = self.closed_wm();
        w.i64(closed);
        let st = self.stats();
        for v in [
            st.events,
            st.late,
            st.windows,
            st.alerts,
            st.quarantined,
            st.tokens,
            st.evicted,
            st.reloaded,
            st.untracked,
        ] {
            w.u64(v);
        }
        self.global.encode(&mut w);
        w.u32(self.shards.len() as u32);
        for sh in &self.shards {
            sh.reservoir.encode(&mut w);
        }
        let mut names: Vec<(u64, &str)> = Vec::new();
        for sh in &self.shards {
            names.extend(sh.names.iter().map(|(k, v)| (*k, v.as_ref())));
        }
        names.sort_unstable();
        names.dedup_by_key(|n| n.0);
        w.u32(names.len() as u32);
        for (k, v) in names {
            w.u64(k);
            w.bytes(v.as_bytes());
        }
        let mut tokens = Vec::new();
        for sh in &self.shards {
            for slot in sh.slots.iter().filter(|s| s.live) {
                let mut s = Writer::default();
                slot.state.encode(&mut s);
                let mut o = Writer::default();
                o.u32(slot.open.len() as u32);
                for &(_, a) in &slot.open {
                    sh.aggs[a as usize].encode(&mut o);
                }
                tokens.push(TokenSnapshot {
                    token: slot.name.clone(),
                    state: s.buf,
                    open: o.buf,
                    extra: Vec::new(),
                    first_seen: slot.state.first_seen,
                    last_seen: slot.state.last_seen,
                    windows: slot.state.windows,
                });
            }
        }
        EngineSnapshot {
            header: w.buf,
            tokens,
            spill: None,
        }
    }

    /// An engine in the state `snap` describes (any shard count; the same count restores
    /// the same layout).
    pub fn restore(
        cfg: Config,
        registry: Registry,
        snap: &EngineSnapshot,
    ) -> Result<Engine, crate::model::DecodeError> {
        use crate::model::codec::Reader;
        use crate::model::DecodeError;
        let mut e = Engine::new(cfg, registry);
        let mut r = Reader::new(&snap.header);
        let v = r.u8()?;
        if v != SNAPSHOT_VERSION {
            return Err(DecodeError::Version {
                found: v,
                expected: SNAPSHOT_VERSION,
            });
        }
        e.max_ts = r.i64()?;
        e.watermark = r.i64()?;
        let has_refit = r.u8()? != 0;
        let next = r.i64()?;
        e.next_refit = has_refit.then_some(next);
        e.refits = r.u64()?;
        let closed = r.i64()?;
        let mut counters = [0u64; 9];
        for c in counters.iter_mut() {
            *c = r.u64()?;
        }
        let global = Arc::new(Global::decode(&mut r)?);
        e.global = global.clone();
        let parts = r.count(4)?;
        // Bottom-k of the union is what refits use: any placement of the points keeps it.
        for _ in 0..parts {
            e.shards[0].reservoir.absorb(&mut r)?;
        }
        let n = r.count(12)?;
        let mut names = Vec::with_capacity(n);
        for _ in 0..n {
            let k = r.u64()?;
            let v = std::str::from_utf8(r.bytes()?).map_err(|_| DecodeError::Truncated)?;
            names.push((k, v.to_string()));
        }
        if r.remaining() != 0 {
            return Err(DecodeError::Trailing(r.remaining()));
        }
        let nshards = e.shards.len() as u64;
        for sh in e.shards.iter_mut() {
            sh.global = global.clone();
            sh.closed_wm = closed;
            for (k, v) in &names {
                sh.names.note(*k, || v.clone());
            }
        }
        let s0 = &mut e.shards[0].stats;
        s0.events = counters[0];
        s0.late = counters[1];
        s0.windows = counters[2];
        s0.alerts = counters[3];
        s0.quarantined = counters[4];
        // Tokens known include the evicted ones (the spill's); the tracked are counted below.
        let tracked = snap.tokens.len() as u64;
        s0.tokens = counters[5].saturating_sub(tracked);
        s0.evicted = counters[6];
        s0.reloaded = counters[7];
        s0.untracked = counters[8];
        for t in &snap.tokens {
            let sh = &mut e.shards[shard_of(&t.token, nshards as usize)];
            let state = TokenState::decode(&t.state)?;
            let idx = sh.slots.len() as u32;
            let mut open = Vec::new();
            let mut o = Reader::new(&t.open);
            for _ in 0..o.count(8)? {
                let agg = WindowAgg::decode(&mut o)?;
                let a = sh.aggs.len() as u32;
                open.push((agg.start, a));
                sh.queue.entry(agg.start).or_default().push(idx);
                sh.aggs.push(agg);
            }
            if o.remaining() != 0 {
                return Err(DecodeError::Trailing(o.remaining()));
            }
            if sh.tokens.insert(t.token.as_ref().into(), idx).is_some() {
                return Err(DecodeError::Duplicate(t.token.to_string()));
            }
            sh.slots.push(Slot {
                name: t.token.clone(),
                state,
                reg: sh.registry.get_shared(&t.token),
                open,
                silence_at: NO_SILENCE,
                live: true,
            });
            sh.live += 1;
            sh.stats.tokens += 1;
        }
        for sh in e.shards.iter_mut() {
            for t in 0..sh.slots.len() {
                let last = sh.slots[t].state.last_seen;
                if sh.slots[t].state.rate.n > 0 {
                    sh.arm_silence(t, last);
                }
            }
        }
        Ok(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::server::pb::Event;

    /// One ordinary call of `token` at `t`.
    fn event(token: &str, t: i64) -> Event {
        Event {
            ts_ms: t,
            token_id: token.into(),
            method: "GET".into(),
            endpoint: "/a".into(),
            status: 200,
            bytes_out: 10,
            src_ip: "10.0.0.1".into(),
            ..Default::default()
        }
    }

    /// Validated columnar batch of `events` (no clock limit).
    fn to_batch(events: &[Event]) -> RecordBatch {
        let clock = crate::server::convert::Clock {
            now_ms: i64::MAX / 2,
            max_future_skew_ms: 0,
        };
        crate::server::convert::to_batch(events, 0, clock, &mut Default::default())
    }

    fn batch(ts: &[i64]) -> RecordBatch {
        let events: Vec<Event> = ts.iter().map(|&t| event("tok", t)).collect();
        to_batch(&events)
    }

    fn batch_of(events: &[(String, i64)]) -> RecordBatch {
        let events: Vec<Event> = events.iter().map(|(tok, t)| event(tok, *t)).collect();
        to_batch(&events)
    }

    /// Shares put so far, by (refit point, partition), and who waits for them.
    type Shares = (
        std::sync::Mutex<BTreeMap<(i64, usize), Vec<u8>>>,
        std::sync::Condvar,
    );

    /// An exchange between partitions in one process: each puts its share of refit `at`
    /// and waits for all of them (what a cluster does through its object store).
    #[derive(Clone)]
    struct Board {
        n: usize,
        cfg: Arc<Config>,
        shares: Arc<Shares>,
    }

    impl Exchange for (Board, usize) {
        fn refit(&mut self, at: i64, share: Share) -> Option<(Arc<Global>, i64)> {
            let (b, me) = (&self.0, self.1);
            let (lock, cv) = &*b.shares;
            let mut m = lock.lock().unwrap();
            // Through the bytes, as between nodes.
            m.insert((at, me), share.encode());
            cv.notify_all();
            while (0..b.n).any(|p| !m.contains_key(&(at, p))) {
                m = cv.wait(m).unwrap();
            }
            let cap = b.cfg.isolation.reservoir;
            let all: Vec<Share> = (0..b.n)
                .rev() // any order fits the same
                .map(|p| Share::decode(&m[&(at, p)], cap).unwrap())
                .collect();
            let (g, earliest) = fit_shares(all, &b.cfg, at);
            Some((Arc::new(g), earliest))
        }
    }

    /// The cluster's engine side: three partitions, each an engine over its own tokens
    /// only (`shard_of(token, 3)`), that share the refit grid's origin and exchange every
    /// refit, give exactly the windows of one engine over every token: the cross-token
    /// models (peer groups, priors, rarity, isolation forest) only ever come from the merge.
    #[test]
    fn partitions_that_exchange_their_refits_score_as_one_engine() {
        let dir = tempfile::tempdir().unwrap();
        let mut g = crate::generate::Options::new(dir.path().to_path_buf());
        g.tokens = 18;
        g.days = 4;
        g.seed = 5;
        g.scale = 0.2;
        crate::generate::run(&g).unwrap();
        let path = dir.path().join("events.parquet");
        let mut reader =
            crate::ingest::EventReader::open(&path, crate::ingest::BadRowPolicy::Fail).unwrap();
        let mut batches = Vec::new();
        while let Some(b) = reader.next_batch().unwrap() {
            batches.push(b);
        }
        let mut cfg = Config::default();
        cfg.window.size.ms = 300_000;
        cfg.engine.shards = 1;
        cfg.engine.warmup.ms = 86_400_000;
        cfg.engine.refit_every.ms = 43_200_000;
        let mut one = Engine::new(cfg.clone(), Registry::default());
        let mut want = Vec::new();
        for b in &batches {
            want.extend(one.apply(b).unwrap());
        }
        let newest = one.newest().unwrap();
        want.extend(one.finish());
        assert!(one.stats().refits >= 4, "{:?}", one.stats());
        assert_eq!(one.stats().late, 0, "the file is in time order");
        let origin = one_origin(&batches, &cfg);

        let n = 3;
        let board = Board {
            n,
            cfg: Arc::new(cfg.clone()),
            shares: Arc::default(),
        };
        let parts: Vec<Vec<RecordBatch>> = (0..n)
            .map(|p| {
                batches
                    .iter()
                    .map(|b| {
                        let tok = b.column(col::TOKEN_ID).as_string::<i32>();
                        let keep: arrow::array::BooleanArray = (0..b.num_rows())
                            .map(|i| Some(shard_of(tok.value(i), n) == p))
                            .collect();
                        arrow::compute::filter_record_batch(b, &keep).unwrap()
                    })
                    .collect()
            })
            .collect();
        let got: Vec<WindowScore> = std::thread::scope(|sc| {
            let hs: Vec<_> = parts
                .iter()
                .enumerate()
                .map(|(p, bs)| {
                    let (cfg, board) = (cfg.clone(), board.clone());
                    sc.spawn(move || {
                        let mut e = Engine::new(cfg, Registry::default());
                        e.set_refit_origin(origin);
                        e.set_exchange(Box::new((board, p)));
                        let mut out = Vec::new();
                        for b in bs {
                            out.extend(e.apply(b).unwrap());
                        }
                        // Cluster time: a partition follows the newest event of all.
                        out.extend(e.advance_to(newest));
                        out.extend(e.finish());
                        assert!(!e.fenced());
                        out
                    })
                })
                .collect();
            hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        let key = |s: &WindowScore| (s.start, s.token.clone());
        let mut got = got;
        got.sort_by_key(key);
        want.sort_by_key(key);
        assert_eq!(got.len(), want.len());
        for (a, b) in got.iter().zip(&want) {
            assert!(a == b, "{a:?}\n!=\n{b:?}");
        }
        assert!(want.iter().any(|s| s.alert));
    }

    /// The first refit point of an engine fed `batches` (what a cluster stores as origin).
    fn one_origin(batches: &[RecordBatch], cfg: &Config) -> i64 {
        let ts = batches[0]
            .column(col::TS)
            .as_primitive::<TimestampMillisecondType>();
        first_refit(cfg, ts.values().iter().copied().min().unwrap())
    }

    /// Ten days from DE / AS 3320, then a new place (FR / AS 12322): as a move (DE stops,
    /// after a quiet night) it is flagged, its evidence decays and it is adopted after
    /// `adopt-move-after`; as an addition (DE goes on beside it) it is never adopted and its
    /// evidence grows while it lasts.
    #[test]
    fn a_move_is_adopted_and_an_addition_accumulates() {
        let t0: i64 = 1_772_409_600_000; // Monday 2026-03-02 00:00 UTC
        let ev = |t: i64, home: bool| Event {
            src_ip: if home { "198.51.100.7" } else { "203.0.113.9" }.into(),
            country: if home { "DE" } else { "FR" }.into(),
            asn: Some(if home { 3320 } else { 12322 }),
            user_agent: if home { "app/1.0" } else { "Mozilla/5.0" }.into(),
            ..event("tok", t)
        };
        // Two calls a minute from 08h to 20h UTC; `place(minute)`: Some(home?) or None.
        let run = |place: &dyn Fn(i64) -> Option<bool>| {
            let mut cfg = Config::default();
            cfg.window.size.ms = 300_000;
            cfg.engine.shards = 1;
            let mut e = Engine::new(cfg, Registry::default());
            let mut out = Vec::new();
            for day in 0..12i64 {
                let mut evs = Vec::new();
                for m in 8 * 60..20 * 60 {
                    let t = t0 + day * 86_400_000 + m * 60_000;
                    if let Some(home) = place(t) {
                        evs.push(ev(t, home));
                        evs.push(ev(t + 20_000, home));
                    }
                }
                out.extend(e.apply(&to_batch(&evs)).unwrap());
            }
            out.extend(e.finish());
            out
        };
        let change = t0 + 10 * 86_400_000 + 8 * 3_600_000;
        let of = |s: &WindowScore, k: SignalKind| {
            s.contributions
                .iter()
                .find(|c| c.signal == k)
                .map_or(0.0, |c| c.evidence)
        };
        let country = |s: &WindowScore| of(s, SignalKind::NewCountry);
        // The move: from day 10 every call is from FR.
        let moved = run(&|t| Some(t < change));
        let after: Vec<&WindowScore> = moved.iter().filter(|s| s.start >= change).collect();
        assert!(country(after[0]) > 2.0, "{:?}", after[0]);
        let first_day: Vec<f64> = after.iter().take(144).map(|s| country(s)).collect();
        assert!(first_day[60] < first_day[0], "{first_day:?}");
        // Adopted: on the next day FR is home.
        assert!(after[144..]
            .iter()
            .all(|s| country(s) == 0.0 && s.risk < 5.0));
        // The addition: from day 10, every other minute from FR, DE goes on.
        let added = run(&|t| Some(t < change || (t / 60_000) % 2 == 0));
        let after: Vec<&WindowScore> = added.iter().filter(|s| s.start >= change).collect();
        let ev0 = country(after[0]);
        assert!(ev0 > 2.0, "{:?}", after[0]);
        // After the ramp it speaks with over twice its first window's evidence (three times
        // the novelty, of a novelty that its first, still calm windows made a little less
        // rare), and it is still new the next day (never adopted, not learned while it alerts).
        let later = country(after[24]);
        assert!(later > 2.0 * ev0, "{ev0} -> {later}");
        assert!(after[24].alert);
        // Past the ramp it goes on growing, slowly (with the log of its duration): the longer
        // two places share the token, the less a coincidence. The second user's new agent
        // accumulates with its place.
        assert!(
            country(after[96]) > 1.1 * later,
            "{later} -> {:?}",
            after[96]
        );
        let agent = |s: &WindowScore| of(s, SignalKind::NewUserAgent);
        assert!(agent(after[96]) > 2.0 * agent(after[0]), "{:?}", after[96]);
        assert!(country(after[150]) > 2.0, "{:?}", after[150]);
    }

    /// Tokens that take turns (one active each hour) under a budget of three: the idle
    /// ones are evicted to the spill and loaded back when their turn comes, and every
    /// window scores exactly as with no budget (the whole model state travels).
    #[test]
    fn evicted_tokens_come_back_with_their_baseline() {
        let run = |max_tokens: u64| {
            let mut cfg = Config::default();
            cfg.engine.shards = 1;
            cfg.engine.max_tokens = max_tokens;
            // The spill's free-disk floor is the host's business, not this test's.
            cfg.engine.spill_min_free = crate::config::Bytes(0);
            let mut e = Engine::new(cfg, Registry::default());
            let t0 = 1_772_409_600_000; // 2026-03-02
            let mut out = Vec::new();
            for hour in 0..48i64 {
                let tok = format!("tok-{}", hour % 8);
                let evs: Vec<(String, i64)> = (0..24)
                    .map(|i| (tok.clone(), t0 + hour * 3_600_000 + i * 150_000))
                    .collect();
                out.extend(e.apply(&batch_of(&evs)).unwrap());
                assert!(e.stats().tracked <= max_tokens.max(8));
            }
            out.extend(e.finish());
            (out, e.stats())
        };
        let (free, fs) = run(0);
        let (bounded, bs) = run(3);
        assert_eq!(fs.evicted, 0);
        assert!(bs.evicted >= 30, "{bs:?}");
        assert!(bs.reloaded >= 30, "{bs:?}");
        assert_eq!(
            bs.tokens, 8,
            "an evicted token that returns is not a new token"
        );
        assert_eq!(bs.untracked, 0);
        assert!(bs.tracked <= 3);
        assert_eq!(free.len(), bounded.len());
        assert!(free == bounded, "scores differ under the budget");
    }

    /// A flood of new tokens within one window, past the budget and its headroom: tokens
    /// are evicted with their open windows (none is idle), tracked tokens never pass the
    /// budget's headroom, and every window is still scored when it closes, exactly as
    /// without a budget.
    #[test]
    fn a_flood_of_new_tokens_stays_within_the_budget_and_is_scored() {
        let run = |max_tokens: u64| {
            let mut cfg = Config::default();
            cfg.engine.shards = 2;
            cfg.engine.max_tokens = max_tokens;
            // The spill's free-disk floor is the host's business, not this test's.
            cfg.engine.spill_min_free = crate::config::Bytes(0);
            let mut e = Engine::new(cfg, Registry::default());
            let t0 = 1_772_409_600_000;
            let flood: Vec<(String, i64)> = (0..1000).map(|i| (format!("f{i}"), t0 + i)).collect();
            let mut out = e.apply(&batch_of(&flood)).unwrap();
            let st = e.stats();
            if max_tokens > 0 {
                assert!(st.tracked <= 18, "budget 16 + 1/8 headroom: {st:?}");
                assert!(st.evicted >= 1000 - 18, "{st:?}");
            }
            assert_eq!(st.untracked, 0);
            // Ten minutes later (one token's event moves event time on) the flood's
            // windows close: the evicted tokens come back for them and go again.
            out.extend(
                e.apply(&batch_of(&[("f0".to_string(), t0 + 600_000)]))
                    .unwrap(),
            );
            out.extend(e.finish());
            if max_tokens > 0 {
                let st = e.stats();
                assert!(st.tracked <= 18, "{st:?}");
                assert!(st.reloaded >= 1000 - 18, "{st:?}");
            }
            out
        };
        let bounded = run(16);
        let free = run(0);

        let scored: std::collections::BTreeSet<&str> = bounded.iter().map(|s| &*s.token).collect();
        assert_eq!(scored.len(), 1000, "every flood token's window is scored");
        let keys = |v: &[WindowScore]| -> std::collections::BTreeSet<(String, i64)> {
            v.iter().map(|s| (s.token.to_string(), s.start)).collect()
        };
        let (kb, kf) = (keys(&bounded), keys(&free));
        assert_eq!(
            kf.difference(&kb).collect::<Vec<_>>(),
            Vec::<&(String, i64)>::new()
        );
        assert_eq!(bounded.len(), free.len());
        assert!(bounded == free, "scores differ under the budget");
    }

    /// With less free disk than `engine.spill-min-free`, nothing is spilled: the budget
    /// still holds, and the events of new tokens past it are counted as untracked.
    #[test]
    fn no_spill_past_the_free_disk_floor() {
        let mut cfg = Config::default();
        cfg.engine.shards = 1;
        cfg.engine.max_tokens = 16;
        cfg.engine.spill_min_free = crate::config::Bytes(u64::MAX);
        let mut e = Engine::new(cfg, Registry::default());
        let t0 = 1_772_409_600_000;
        let flood: Vec<(String, i64)> = (0..1000).map(|i| (format!("f{i}"), t0 + i)).collect();
        e.apply(&batch_of(&flood)).unwrap();
        let st = e.stats();
        assert_eq!((st.tracked, st.evicted), (18, 0), "{st:?}");
        assert_eq!(st.untracked, 1000 - 18);
    }

    /// One event stamped decades ahead (a broken clock, an edited log) costs one catch-up
    /// refit, not one per day of the jump.
    #[test]
    fn an_event_time_jump_does_not_make_refits_loop() {
        let mut e = Engine::new(Config::default(), Registry::default());
        let t0 = 1_772_409_600_000; // 2026-03-02
        let ts: Vec<i64> = (0..4 * 1440).map(|m| t0 + m * 60_000).collect();
        e.apply(&batch(&ts)).unwrap();
        let before = e.stats().refits;
        assert!(before >= 1);
        let y2100 = 4_102_444_800_000;
        e.apply(&batch(&[y2100])).unwrap();
        let after = e.stats().refits;
        assert!(after - before <= 3, "{before} -> {after} refits");
        // Refits go on as usual after the jump.
        e.apply(&batch(&[y2100 + 2 * 86_400_000])).unwrap();
        assert!(e.stats().refits > after);
    }
}
