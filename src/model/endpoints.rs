//! Endpoints: which routes the token calls. Per-token endpoint frequencies (heavy hitters)
//! and a Bloom filter of every endpoint ever used; first use of an endpoint (novelty, as in
//! the network model) and, for a first use, how rare the endpoint is across all tokens
//! (an endpoint few tokens touch is where sensitive data lives).

use rustc_hash::FxHashMap;

use super::codec::{Reader, Writer};
use super::sketch::{Bloom, TopK};
use super::{feature, tail, BetaPrior, Ctx, DecodeError, Model, Scratch, Signal, SignalKind};
use crate::config::Config;
use crate::window::{fold, WindowAgg};

/// How many tokens use each endpoint (folded key), over all shards.
#[derive(Debug, Clone, Default)]
pub struct Rarity {
    /// Tokens using each endpoint.
    pub users: FxHashMap<u32, u32>,
    /// Tokens counted.
    pub tokens: u32,
}

impl Rarity {
    /// Write the token count and the endpoint users sorted by key (bytes independent of
    /// hash-map order).
    pub fn encode(&self, w: &mut Writer) {
        w.u32(self.tokens);
        let mut users: Vec<(u32, u32)> = self.users.iter().map(|(&k, &v)| (k, v)).collect();
        users.sort_unstable();
        w.u32(users.len() as u32);
        for (k, v) in users {
            w.u32(k);
            w.u32(v);
        }
    }

    /// Read what [`Rarity::encode`] wrote.
    pub fn decode(r: &mut Reader) -> Result<Rarity, DecodeError> {
        let tokens = r.u32()?;
        let n = r.count(8)?;
        let mut users = FxHashMap::default();
        for _ in 0..n {
            let k = r.u32()?;
            users.insert(k, r.u32()?);
        }
        Ok(Rarity { users, tokens })
    }

    /// Fewer tokens than this and rarity says nothing.
    pub const MIN_TOKENS: u32 = 20;

    /// Probability that a token uses this endpoint (Laplace-smoothed share of tokens).
    pub fn p_used(&self, key: u64) -> Option<(f64, u32)> {
        if self.tokens < Self::MIN_TOKENS {
            return None;
        }
        let u = self.users.get(&fold(key)).copied().unwrap_or(0);
        Some(((u as f64 + 1.0) / (self.tokens as f64 + 2.0), u))
    }
}

/// Per-token endpoint state.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EndpointState {
    /// Every endpoint ever learned.
    pub known: Bloom<8>,
    /// Most used endpoints.
    pub top: TopK<16>,
    /// Learned windows that brought a new endpoint.
    pub novel: u32,
    /// Rarity evidence (nats) of endpoints taken up recently, as of `explore_at`.
    pub explore: f32,
    /// Minute (since the epoch) of the last update of `explore`.
    pub explore_at: u32,
    /// Where in the day bursts on one endpoint happened lately (see [`Recurring`]).
    pub recurring: Recurring,
}

/// Two-hour slots of the UTC day in which a burst on one endpoint happened, on the token's
/// latest earlier day with traffic (bits 0..12) and today (bits 12..24), and today's day
/// number modulo 256 (bits 24..32). A burst in a slot where one happened the day before is
/// the token's daily routine (a nightly job reading one route), not abuse: it is discounted,
/// so a daily pattern alerts on its first day, not every day. 4 bytes, packed by hand to
/// stay within the per-token state budget.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recurring(pub u32);

impl Recurring {
    const SLOT_MS: i64 = 7_200_000;
    const SLOTS: u32 = 12;

    fn slot(start: i64) -> u32 {
        (start.rem_euclid(86_400_000) / Self::SLOT_MS) as u32
    }

    /// A burst happened the previous day in the slot of `start` or, within half an hour of
    /// a slot boundary, in the slot beside it (a job does not start on the same minute
    /// every day).
    pub fn yesterday(&self, start: i64) -> bool {
        let prev = self.0 & ((1 << Self::SLOTS) - 1);
        crate::event::within_half_hour(start)
            .into_iter()
            .any(|t| prev & (1 << Self::slot(t)) != 0)
    }

    /// Move to the day of `start`: today's slots become the previous day's if today was
    /// the day before or up to three days earlier (Friday to Monday), else they are
    /// forgotten.
    fn roll(&mut self, start: i64) {
        let day = start.div_euclid(86_400_000);
        let cur = (day & 0xFF) as u32;
        let stored = self.0 >> 24;
        if cur == stored {
            return;
        }
        let gap = (cur + 256 - stored) % 256;
        let today = (self.0 >> Self::SLOTS) & ((1 << Self::SLOTS) - 1);
        let prev = if gap <= 3 { today } else { 0 };
        self.0 = prev | (cur << 24);
    }

    /// Note a burst in the window starting at `start`.
    fn note(&mut self, start: i64) {
        self.roll(start);
        self.0 |= 1 << (Self::SLOTS + Self::slot(start));
    }
}

/// A recurring burst (see [`Recurring`]) keeps this share of its evidence (tail
/// probability raised to this power).
pub const RECURRING_WEIGHT: f64 = 0.3;

/// Endpoint parameters.
#[derive(Debug, Clone)]
pub struct EndpointModel {
    prior: BetaPrior,
    min_windows: f64,
    explore_half_life_min: f64,
}

/// Calls the endpoint shares remember (between this and twice as many, the most recent
/// learned ones): a route the token adopted becomes usual within a few thousand calls
/// instead of staying rare against its whole history. Alerting windows are not learned, so
/// a burst does not teach itself.
pub const SHARE_MEMORY: u32 = 4096;

/// Calls to one endpoint in a window before a burst on it is judged.
pub const BURST_MIN_CALLS: u32 = 10;

/// Index of endpoints in [`Global::novelty`](super::Global).
pub const NOVELTY_INDEX: usize = 4;

impl EndpointModel {
    /// From configuration.
    pub fn new(cfg: &Config) -> Self {
        EndpointModel {
            prior: BetaPrior {
                a: cfg.novelty.prior_novel,
                b: cfg.novelty.prior_seen,
            },
            min_windows: cfg.novelty.min_windows,
            explore_half_life_min: (cfg.novelty.explore_half_life.ms as f64 / 60_000.0).max(1.0),
        }
    }

    /// A burst on one known endpoint (quota abuse, pagination scraping, ID enumeration):
    /// its share of the window's calls against its share of the token's history. The
    /// binomial tail is taken with the usual share widened (x1.5 + 2 points) and only for at
    /// least `BURST_MIN_CALLS` calls at twice the usual share, because shares of real
    /// traffic wander more than independent draws would. Reported as `endpoint_mix`, with
    /// the endpoint as its item.
    fn burst(&self, st: &EndpointState, w: &WindowAgg, ctx: &Ctx, out: &mut Scratch) {
        let n = w.count as u64;
        let total = st.top.total() as f64;
        if n < BURST_MIN_CALLS as u64 || total <= 0.0 {
            return;
        }
        let mut best: Option<(f64, u32, f64, u64)> = None;
        for &(k, c) in &w.endpoints.items {
            if c < BURST_MIN_CALLS || !st.known.contains(k) {
                continue;
            }
            let usual = st.top.count(fold(k)) as f64 / total;
            if (c as f64) < 2.0 * usual * n as f64 {
                continue;
            }
            let widened = (1.5 * usual + 0.02).min(0.999);
            let p = tail::binomial_at_least(c as u64, n, widened);
            if best.is_none_or(|b| p < b.0) {
                best = Some((p, c, usual, k));
            }
        }
        if let Some((p, c, usual, k)) = best {
            out.burst = Some(p);
            let p = if st.recurring.yesterday(ctx.start) {
                p.powf(RECURRING_WEIGHT)
            } else {
                p
            };
            out.push(
                Signal::new(SignalKind::EndpointMix, c as f64, usual * n as f64, p).with_item(k),
            );
        }
    }

    /// Exploration evidence decayed to the window being scored.
    fn explored(&self, st: &EndpointState, ctx: &Ctx) -> f64 {
        if st.explore <= 0.0 {
            return 0.0;
        }
        let age = (ctx.start / 60_000 - st.explore_at as i64).max(0) as f64;
        st.explore as f64 * 0.5f64.powf(age / self.explore_half_life_min)
    }
}

impl EndpointModel {
    /// Follow every window, calm or not: where in the day the token's bursts happen
    /// (`burst`: the window's burst tail probability, if it had one).
    pub fn track(&self, st: &mut EndpointState, ctx: &Ctx, burst: Option<f64>) {
        match burst {
            Some(p) if p < ctx.cfg.score.quiet_p => st.recurring.note(ctx.start),
            _ => st.recurring.roll(ctx.start),
        }
    }
}

impl Model for EndpointModel {
    type State = EndpointState;

    fn score(&self, st: &EndpointState, w: &WindowAgg, ctx: &Ctx, out: &mut Scratch) {
        if (ctx.windows as f64) < self.min_windows {
            return; // a young token is still discovering its endpoints
        }
        self.burst(st, w, ctx, out);

        let mut new_calls = 0u32;
        let mut first_new = 0u64;
        let mut rarest: Option<(f64, u32, u64)> = None;
        for &(k, c) in &w.endpoints.items {
            if st.known.contains(k) {
                continue;
            }
            new_calls += c;
            if first_new == 0 {
                first_new = k;
            }
            if let Some((p, users)) = ctx.global.rarity.p_used(k) {
                if rarest.is_none_or(|r| p < r.0) {
                    rarest = Some((p, users, k));
                }
            }
        }
        if new_calls == 0 {
            return;
        }
        let prior = ctx.global.novelty.map_or(self.prior, |n| n[NOVELTY_INDEX]);
        let p = prior.p_new(st.novel, ctx.windows);
        out.features[feature::NOVELTY] += (-p.ln()) as f32;
        let usual: Vec<u32> = st.top.top(2);
        let item = rarest.map_or(first_new, |r| r.2);
        out.push(
            Signal::new(SignalKind::NewEndpoint, new_calls as f64, p, p)
                .with_item(item)
                .with_usual(&usual),
        );
        if let Some((p_r, users, k)) = rarest {
            // Sequential evidence: this first use of a rare endpoint, plus the decayed
            // evidence of the rare endpoints the token took up recently (slow exploration).
            let acc = self.explored(st, ctx);
            out.push(
                Signal::new(
                    SignalKind::EndpointRarity,
                    users as f64,
                    ctx.global.rarity.tokens as f64,
                    p_r * (-acc).exp(),
                )
                .with_item(k),
            );
        }
    }

    fn learn(&self, st: &mut EndpointState, w: &WindowAgg, ctx: &Ctx) {
        let day = ctx.day();
        let mut new = false;
        let mut rare = 0.0;
        for &(k, c) in &w.endpoints.items {
            if !st.known.contains(k) {
                new = true;
                st.known.insert(k);
                if (ctx.windows as f64) >= self.min_windows {
                    if let Some((p, _)) = ctx.global.rarity.p_used(k) {
                        rare += -p.ln();
                    }
                }
            }
            st.top.add(fold(k), c, day);
        }
        st.top.cap(SHARE_MEMORY);
        if rare > 0.0 {
            st.explore = (self.explored(st, ctx) + rare).min(50.0) as f32;
            st.explore_at = (ctx.start / 60_000).clamp(0, u32::MAX as i64) as u32;
        }
        if new && ctx.windows > 0 {
            st.novel += 1;
        }
    }

    fn encode(st: &EndpointState, w: &mut Writer) {
        st.known.encode(w);
        st.top.encode(w);
        w.u32(st.novel);
        w.f32(st.explore);
        w.u32(st.explore_at);
        w.u32(st.recurring.0);
    }

    fn decode(r: &mut Reader) -> Result<EndpointState, DecodeError> {
        Ok(EndpointState {
            known: Bloom::decode(r)?,
            top: TopK::decode(r)?,
            novel: r.u32()?,
            explore: r.f32()?,
            explore_at: r.u32()?,
            recurring: Recurring(r.u32()?),
        })
    }
}
