//! Per-token behavioural models and the signal contract they share.
//!
//! Every model is a pure function pair over a fixed-size state: `score` reads the state and
//! one closed window and emits [`Signal`]s, each with a calibrated tail probability `p` of
//! seeing something at least this extreme if the token behaves as before; `learn` folds the
//! window into the state. Models never see the clock, files or the network: time comes in
//! through [`Ctx`]. Global, cross-token models (peer groups, isolation, endpoint rarity) are
//! fitted from all shards' states and handed in read-only as [`Global`].

pub mod codec;
pub mod endpoints;
pub mod isolation;
pub mod network;
pub mod peers;
pub mod rate;
pub mod registry;
pub mod seasonal;
pub mod sketch;
pub mod telemetry;

use crate::config::Config;
use crate::window::WindowAgg;
use codec::{Reader, Writer};

pub use crate::signal::SignalKind;

/// One model's finding about one window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Signal {
    /// Which signal.
    pub kind: SignalKind,
    /// What the window showed (count, bytes, fraction, distance...).
    pub observed: f64,
    /// What the token's model expected.
    pub expected: f64,
    /// Tail probability under the token's model (1 = nothing unusual).
    pub p: f64,
    /// Evidence in nats, filled in by `score::risk`.
    pub evidence: f64,
    /// The item involved (country, ASN, prefix, endpoint key), 0 if none.
    pub item: u64,
    /// Up to two items the token usually has (folded keys), for the reason.
    pub usual: [u32; 2],
}

impl Signal {
    /// A signal with no item.
    pub fn new(kind: SignalKind, observed: f64, expected: f64, p: f64) -> Self {
        Signal {
            kind,
            observed,
            expected,
            p: p.clamp(1e-300, 1.0),
            evidence: 0.0,
            item: 0,
            usual: [0; 2],
        }
    }

    /// Attach the item involved.
    pub fn with_item(mut self, item: u64) -> Self {
        self.item = item;
        self
    }

    /// Attach what the token usually shows.
    pub fn with_usual(mut self, usual: &[u32]) -> Self {
        for (d, s) in self.usual.iter_mut().zip(usual) {
            *d = *s;
        }
        self
    }
}

/// Number of features the isolation model sees per window.
pub const FEATURES: usize = 10;

/// Feature slots filled by the per-token models for the isolation model.
#[allow(missing_docs)]
pub mod feature {
    pub const RATE_Z: usize = 0;
    pub const LOG_COUNT: usize = 1;
    pub const BYTES_Z: usize = 2;
    pub const AUTH_EXCESS: usize = 3;
    pub const CLIENT_EXCESS: usize = 4;
    pub const NOVELTY: usize = 5;
    pub const SEASONAL: usize = 6;
    pub const MIX_Z: usize = 7;
    pub const NETWORKS: usize = 8;
    pub const LATENCY_Z: usize = 9;
}

/// Per-window scratch: signals raised and isolation features.
#[derive(Debug, Clone, Default)]
pub struct Scratch {
    /// Signals raised by the models.
    pub signals: Vec<Signal>,
    /// Isolation features.
    pub features: [f32; FEATURES],
    /// The rate model's (tail probability, standardised residual) of the window, kept for
    /// tracking it without computing the expectation again.
    pub rate: Option<(f64, f64)>,
    /// Tail probability of the window's largest burst on one endpoint, before its
    /// recurrence discount (see `endpoints`).
    pub burst: Option<f64>,
}

impl Scratch {
    /// Reset for the next window.
    pub fn clear(&mut self) {
        self.signals.clear();
        self.features = [0.0; FEATURES];
        self.rate = None;
        self.burst = None;
    }

    /// Raise a signal if it says anything (p < 1).
    #[inline]
    pub fn push(&mut self, s: Signal) {
        if s.p < 1.0 {
            self.signals.push(s);
        }
    }
}

/// What a model may know besides its own state.
pub struct Ctx<'a> {
    /// Configuration.
    pub cfg: &'a Config,
    /// Window size in ms.
    pub window_ms: i64,
    /// Start of the window being scored or learned.
    pub start: i64,
    /// Windows of this token learned so far.
    pub windows: u32,
    /// First window start of this token.
    pub first_seen: i64,
    /// Cross-token models.
    pub global: &'a Global,
    /// Registry facts of this token.
    pub registry: Option<&'a registry::RegistryEntry>,
    /// The token's peer group, once groups are fitted.
    pub group: Option<&'a peers::GroupStats>,
    /// An operator said this window is normal: new items are trusted at once.
    pub trusted: bool,
}

impl Ctx<'_> {
    /// Day number (since the epoch) of the window.
    pub fn day(&self) -> u16 {
        (self.start.div_euclid(86_400_000)).clamp(0, u16::MAX as i64) as u16
    }
}

/// Cross-token models fitted from every shard's state, shared read-only by all shards.
#[derive(Debug, Default, Clone)]
pub struct Global {
    /// Peer groups.
    pub peers: Option<peers::PeerGroups>,
    /// Isolation model over window features.
    pub isolation: Option<isolation::IsolationModel>,
    /// How many tokens use each endpoint.
    pub rarity: endpoints::Rarity,
    /// Population priors of novelty (country, ASN, prefix, user agent, endpoint) and of
    /// several networks at once.
    pub novelty: Option<[BetaPrior; 6]>,
    /// Event time of the fit (ms), 0 before the first.
    pub fitted_at: i64,
}

impl Global {
    /// Write every cross-token model (snapshot).
    pub fn encode(&self, w: &mut Writer) {
        w.i64(self.fitted_at);
        match &self.peers {
            None => w.u8(0),
            Some(p) => {
                w.u8(1);
                w.u32(p.groups.len() as u32);
                for g in &p.groups {
                    for &c in &g.centroid {
                        w.f32(c);
                    }
                    w.u32(g.members);
                    for v in [g.dist_mean, g.dist_sd, g.rate_mean, g.rate_var] {
                        w.f64(v);
                    }
                }
            }
        }
        match &self.isolation {
            None => w.u8(0),
            Some(m) => {
                w.u8(1);
                m.encode(w);
            }
        }
        self.rarity.encode(w);
        match &self.novelty {
            None => w.u8(0),
            Some(n) => {
                w.u8(1);
                for b in n {
                    w.f64(b.a);
                    w.f64(b.b);
                }
            }
        }
    }

    /// Read what [`Global::encode`] wrote.
    pub fn decode(r: &mut Reader) -> Result<Global, DecodeError> {
        let fitted_at = r.i64()?;
        let peers = match r.u8()? {
            0 => None,
            _ => {
                let n = r.count(4 * peers::DIMS + 36)?;
                let mut groups = Vec::with_capacity(n);
                for _ in 0..n {
                    let mut centroid = [0f32; peers::DIMS];
                    for c in centroid.iter_mut() {
                        *c = r.f32()?;
                    }
                    groups.push(peers::GroupStats {
                        centroid,
                        members: r.u32()?,
                        dist_mean: r.f64()?,
                        dist_sd: r.f64()?,
                        rate_mean: r.f64()?,
                        rate_var: r.f64()?,
                    });
                }
                Some(peers::PeerGroups { groups })
            }
        };
        let isolation = match r.u8()? {
            0 => None,
            _ => Some(isolation::IsolationModel::decode(r)?),
        };
        let rarity = endpoints::Rarity::decode(r)?;
        let novelty = match r.u8()? {
            0 => None,
            _ => {
                let mut n = [BetaPrior { a: 0.0, b: 0.0 }; 6];
                for b in n.iter_mut() {
                    b.a = r.f64()?;
                    b.b = r.f64()?;
                }
                Some(n)
            }
        };
        Ok(Global {
            peers,
            isolation,
            rarity,
            novelty,
            fitted_at,
        })
    }
}

/// One shard's (or one partition's) part of a refit of the cross-token models: what each of
/// its tokens contributes, gathered by the models themselves. Partials are merged (in any
/// order: the fit sorts what needs sorting) and the merge is fitted once, so nothing outside
/// the models reads a token's internals and a partition of tokens can send its partial
/// elsewhere (cluster mode).
#[derive(Debug, Clone, Default)]
pub struct RefitPartial {
    /// Endpoint users and the token count.
    pub rarity: endpoints::Rarity,
    /// (novel windows, windows) per token for each novelty prior.
    pub novelty: [Vec<(u32, u32)>; 6],
    /// Peer-group points of tokens with enough history.
    pub points: Vec<peers::PeerPoint>,
}

impl RefitPartial {
    /// Add one token's contribution.
    pub fn add(&mut self, token: &std::sync::Arc<str>, st: &TokenState, min_windows: f64) {
        if st.windows == 0 {
            return;
        }
        self.rarity.tokens += 1;
        for s in st.endpoints.top.slots.iter().filter(|s| s.key != 0) {
            *self.rarity.users.entry(s.key).or_insert(0) += 1;
        }
        if (st.windows as f64) < min_windows {
            return;
        }
        for (obs, novel) in self.novelty.iter_mut().zip(st.network.novel) {
            obs.push((novel, st.windows));
        }
        self.novelty[endpoints::NOVELTY_INDEX].push((st.endpoints.novel, st.windows));
        self.novelty[network::MULTI_INDEX].push((st.network.multi, st.windows));
        self.points.push(peers::PeerPoint {
            token: token.clone(),
            usage: st.peers.usage(),
            d_own: st.peers.d_own.mean as f64,
            rate_mean: st.rate.mean_count(),
            rate_var: st.rate.var_count(),
        });
    }

    /// Fold another partial in.
    pub fn merge(&mut self, other: RefitPartial) {
        self.rarity.tokens += other.rarity.tokens;
        for (k, v) in other.rarity.users {
            *self.rarity.users.entry(k).or_insert(0) += v;
        }
        for (a, b) in self.novelty.iter_mut().zip(other.novelty) {
            a.extend(b);
        }
        self.points.extend(other.points);
    }

    /// Encode for another process (a cluster partition's share of a refit). The bytes do
    /// not depend on hash-map order (see [`endpoints::Rarity::encode`]).
    pub fn encode(&self, w: &mut Writer) {
        self.rarity.encode(w);
        for obs in &self.novelty {
            w.u32(obs.len() as u32);
            for &(a, b) in obs {
                w.u32(a);
                w.u32(b);
            }
        }
        w.u32(self.points.len() as u32);
        for p in &self.points {
            w.bytes(p.token.as_bytes());
            for &u in &p.usage {
                w.f32(u);
            }
            w.f64(p.d_own);
            w.f64(p.rate_mean);
            w.f64(p.rate_var);
        }
    }

    /// Decode what [`RefitPartial::encode`] wrote; truncated, oversized or non-finite input
    /// is an error (a fit must never see a NaN from a damaged message).
    pub fn decode(r: &mut Reader) -> Result<RefitPartial, DecodeError> {
        let mut out = RefitPartial {
            rarity: endpoints::Rarity::decode(r)?,
            ..RefitPartial::default()
        };
        for obs in out.novelty.iter_mut() {
            let n = r.count(8)?;
            obs.reserve(n);
            for _ in 0..n {
                obs.push((r.u32()?, r.u32()?));
            }
        }
        let n = r.count(4 + 4 * peers::DIMS + 24)?;
        out.points.reserve(n);
        for _ in 0..n {
            let token = std::str::from_utf8(r.bytes()?).map_err(|_| DecodeError::Truncated)?;
            let token: std::sync::Arc<str> = token.into();
            let mut usage = [0f32; peers::DIMS];
            for u in usage.iter_mut() {
                *u = r.f32()?;
            }
            let (d_own, rate_mean, rate_var) = (r.f64()?, r.f64()?, r.f64()?);
            let finite = usage.iter().all(|u| u.is_finite())
                && [d_own, rate_mean, rate_var].iter().all(|v| v.is_finite());
            if !finite {
                return Err(DecodeError::Invalid(
                    "a refit peer point is not finite".into(),
                ));
            }
            out.points.push(peers::PeerPoint {
                token,
                usage,
                d_own,
                rate_mean,
                rate_var,
            });
        }
        Ok(out)
    }

    /// Fit the cross-token models from the merged partials and the isolation sample, as of
    /// event time `at`. Deterministic whatever order the partials came in.
    pub fn fit(mut self, sample: &[isolation::Point], cfg: &Config, at: i64) -> Global {
        let iso = &cfg.isolation;
        let isolation =
            isolation::IsolationModel::fit(sample, iso.trees, iso.sample_size, iso.seed);
        let peers = peers::PeerGroups::fit(&mut self.points, cfg.peers.groups, iso.seed);
        for obs in self.novelty.iter_mut() {
            // Beta moments are order-free up to float rounding: sort to make them exact.
            obs.sort_unstable();
        }
        let priors: Vec<BetaPrior> = self
            .novelty
            .iter()
            .filter_map(|o| BetaPrior::fit(o))
            .collect();
        let novelty = <[BetaPrior; 6]>::try_from(priors).ok();
        Global {
            peers,
            isolation,
            rarity: self.rarity,
            novelty,
            fitted_at: at,
        }
    }
}

/// Beta prior on "a window of this token brings a never-seen item of this kind".
///
/// Fitted across tokens by the method of moments (empirical Bayes), so a token with a short
/// history borrows the population's view of how rare novelty is, and a token's own record
/// (novel windows out of windows) takes over as it grows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BetaPrior {
    /// Pseudo-count of novel windows.
    pub a: f64,
    /// Pseudo-count of windows without novelty.
    pub b: f64,
}

impl BetaPrior {
    /// Posterior predictive probability that the next window brings a new item.
    #[inline]
    pub fn p_new(&self, novel: u32, windows: u32) -> f64 {
        (novel as f64 + self.a) / (windows as f64 + self.a + self.b)
    }

    /// Method-of-moments fit to per-token (novel windows, windows); `None` with fewer than
    /// 10 tokens.
    pub fn fit(obs: &[(u32, u32)]) -> Option<BetaPrior> {
        if obs.len() < 10 {
            return None;
        }
        let rates: Vec<f64> = obs
            .iter()
            .filter(|o| o.1 > 0)
            .map(|&(k, n)| k.min(n) as f64 / n as f64)
            .collect();
        let n = rates.len() as f64;
        let m = rates.iter().sum::<f64>() / n;
        let v = rates.iter().map(|r| (r - m).powi(2)).sum::<f64>() / n;
        // Strength of the prior in windows: large when tokens agree, small when they differ.
        let kappa = if v > 0.0 {
            (m * (1.0 - m) / v - 1.0).clamp(2.0, 1e6)
        } else {
            1e6
        };
        Some(BetaPrior {
            a: (m * kappa).max(1e-3),
            b: ((1.0 - m) * kappa).max(1.0),
        })
    }
}

/// A snapshot could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer bytes than the state needs.
    #[error("model state is truncated")]
    Truncated,
    /// Written by another schema version.
    #[error("model state version {found}, expected {expected}")]
    Version {
        /// Found.
        found: u8,
        /// Expected.
        expected: u8,
    },
    /// Bytes left over.
    #[error("model state has {0} trailing bytes")]
    Trailing(usize),
    /// A token twice in one snapshot.
    #[error("token {0:?} appears twice")]
    Duplicate(String),
    /// Decoded, but not a state this code could have written (an index out of range, a
    /// cycle, a number that is not finite).
    #[error("model state is invalid: {0}")]
    Invalid(String),
}

/// The contract every per-token model follows (see the contract suite in the tests).
pub trait Model {
    /// Fixed-size per-token state.
    type State: Clone + Default + PartialEq + std::fmt::Debug;
    /// Emit signals (and isolation features) for a closed window.
    fn score(&self, st: &Self::State, w: &WindowAgg, ctx: &Ctx, out: &mut Scratch);
    /// Fold a window into the state.
    fn learn(&self, st: &mut Self::State, w: &WindowAgg, ctx: &Ctx);
    /// Serialise the state.
    fn encode(st: &Self::State, w: &mut Writer);
    /// Read back what `encode` wrote.
    fn decode(r: &mut Reader) -> Result<Self::State, DecodeError>;
}

/// Everything tokenwatch keeps about one token. Fixed size: no heap.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenState {
    /// First window start.
    pub first_seen: i64,
    /// Last window start.
    pub last_seen: i64,
    /// Windows learned.
    pub windows: u32,
    /// Windows scored but kept out of the baseline (quarantined).
    pub quarantined: u32,
    /// Rate model.
    pub rate: rate::RateState,
    /// Hour-of-week model.
    pub seasonal: seasonal::SeasonalState,
    /// Network novelty model.
    pub network: network::NetworkState,
    /// Endpoint model.
    pub endpoints: endpoints::EndpointState,
    /// Errors, bytes, latency.
    pub telemetry: telemetry::TelemetryState,
    /// Usage vector and peer group.
    pub peers: peers::PeerState,
    /// Out-of-scope history.
    pub registry: registry::RegistryState,
    /// A move under way (new place, old one absent), adopted after `score.adopt-move-after`.
    pub change: ChangeState,
    /// What operators said about this token's alerts.
    pub feedback: FeedbackState,
    /// How odd this token's ordinary windows are.
    pub surprise: SurpriseState,
}

/// A lasting change of place under way: the key of the new place and when (minutes since
/// the epoch) it was first and last seen without the old one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChangeState {
    /// Key of the new place (0: none).
    pub key: u32,
    /// First window of the move (minute).
    pub since: u32,
    /// Latest window of the move (minute).
    pub last: u32,
    /// Latest window from the token's known place (minute).
    pub home: u32,
}

/// Operator feedback kept with a token (fixed size, part of the snapshot).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FeedbackState {
    /// False alarms per signal (position in [`SignalKind::ALL`]) since its last damping.
    pub false_alarms: [u8; 21],
    /// Signals damped (bit per signal) until `damp_until`.
    pub damp_mask: u32,
    /// Event time the damping ends (minutes since the epoch).
    pub damp_until: u32,
    /// A confirmed incident: no window of this token is learned before this event time
    /// (minutes since the epoch).
    pub hold_until: u32,
    /// The token alerted: until this event time (minutes since the epoch) only its calm
    /// windows are learned (`score.alert-hold`), so an incident cannot teach the baseline
    /// through its quieter windows.
    pub alert_until: u32,
}

impl FeedbackState {
    /// An event time (ms) as the minutes these fields hold, rounded up so a deadline is
    /// never earlier than asked.
    pub fn minutes(ms: i64) -> u32 {
        (ms.max(0) as u64).div_ceil(60_000).min(u32::MAX as u64) as u32
    }

    /// Whether an operator-confirmed incident holds the token at event time `ms`.
    pub fn held_at(&self, ms: i64) -> bool {
        ms < self.hold_until as i64 * 60_000
    }

    /// Whether a recent alert of the token holds its learning at event time `ms`.
    pub fn alerted_at(&self, ms: i64) -> bool {
        ms < self.alert_until as i64 * 60_000
    }

    /// Whether the damped signals are damped at event time `ms`.
    pub fn damped_at(&self, ms: i64) -> bool {
        self.damp_mask != 0 && ms < self.damp_until as i64 * 60_000
    }
}

/// A token's own distribution of statistical surprise (evidence in nats per window), against
/// which its windows are calibrated (`score::calibrate`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SurpriseState(pub sketch::Tail);

/// Prior spread (nats) of a token's surprise past its ordinary level, before its own windows
/// have moved it (it sets how fast the level is learned).
pub const MIN_SPREAD: f64 = 1.0;

impl Default for SurpriseState {
    /// Calm: level 0, spread [`MIN_SPREAD`].
    fn default() -> Self {
        SurpriseState(sketch::Tail::new(0.0, MIN_SPREAD as f32))
    }
}

/// Version of the encoded [`TokenState`].
pub const STATE_VERSION: u8 = 6;

/// A rise of the token's rate this unlikely (or less) marks its slot of the day as the
/// token's routine (see [`Models::track`]).
const ROUTINE_RISE_P: f64 = 1e-6;

/// All per-token models, built from the configuration.
#[derive(Debug, Clone)]
pub struct Models {
    /// Rate.
    pub rate: rate::RateModel,
    /// Seasonal.
    pub seasonal: seasonal::SeasonalModel,
    /// Network.
    pub network: network::NetworkModel,
    /// Endpoints.
    pub endpoints: endpoints::EndpointModel,
    /// Telemetry.
    pub telemetry: telemetry::TelemetryModel,
    /// Peers.
    pub peers: peers::PeerModel,
    /// Registry.
    pub registry: registry::RegistryModel,
}

impl Models {
    /// Build from configuration.
    pub fn new(cfg: &Config) -> Self {
        Models {
            rate: rate::RateModel::new(cfg),
            seasonal: seasonal::SeasonalModel::new(cfg),
            network: network::NetworkModel::new(cfg),
            endpoints: endpoints::EndpointModel::new(cfg),
            telemetry: telemetry::TelemetryModel::new(cfg),
            peers: peers::PeerModel::new(cfg),
            registry: registry::RegistryModel::new(cfg),
        }
    }

    /// Every per-token model's signals for a window (isolation is added by the caller,
    /// from the features).
    pub fn score(&self, st: &TokenState, w: &WindowAgg, ctx: &Ctx, out: &mut Scratch) {
        let before = out.signals.len();
        self.rate.score(&st.rate, w, ctx, out);
        // A rise at the time of day the token rose on its previous day with traffic (within
        // a two-hour slot, see `endpoints::Recurring`) is its daily routine, a nightly job:
        // it keeps a share of its evidence, so such a job alerts on its first days, not
        // every day, while a rise far past the routine still stands out.
        if out.rate.is_some_and(|(_, z)| z > 0.0) && st.endpoints.recurring.yesterday(ctx.start) {
            for s in &mut out.signals[before..] {
                if s.kind == SignalKind::Rate {
                    s.p = s.p.powf(endpoints::RECURRING_WEIGHT);
                }
            }
        }
        self.seasonal.score(&st.seasonal, w, ctx, out);
        self.network.score(&st.network, w, ctx, out);
        self.endpoints.score(&st.endpoints, w, ctx, out);
        self.telemetry.score(&st.telemetry, w, ctx, out);
        self.peers.score(&st.peers, w, ctx, out);
        self.registry.score(&st.registry, w, ctx, out);
    }

    /// Fold a window into every model.
    pub fn learn(&self, st: &mut TokenState, w: &WindowAgg, ctx: &Ctx) {
        self.rate.learn(&mut st.rate, w, ctx);
        self.seasonal.learn(&mut st.seasonal, w, ctx);
        self.network.learn(&mut st.network, w, ctx);
        self.endpoints.learn(&mut st.endpoints, w, ctx);
        self.telemetry.learn(&mut st.telemetry, w, ctx);
        self.peers.learn(&mut st.peers, w, ctx);
        self.registry.learn(&mut st.registry, w, ctx);
        st.windows = st.windows.saturating_add(1);
    }

    /// Follow a window whether it is learned or quarantined (before any learning): what
    /// must see every window, such as a lasting change of volume or stray refusals adding
    /// up. `held`: an operator confirmed an incident on the token.
    /// `scored` is the scratch the window was scored into (with this same state).
    pub fn track(
        &self,
        st: &mut TokenState,
        w: &WindowAgg,
        ctx: &Ctx,
        held: bool,
        scored: &Scratch,
    ) {
        // Bursts of the whole token count for the routine as bursts on one endpoint do.
        // Only a rise that the ordinary tail calls extreme (far past the quiet level, before
        // the token's own bursts temper it) marks the slot.
        let rise = scored
            .rate
            .map(|(_, z)| (st.rate.up.p_std(z), z))
            .filter(|&(p, z)| z > 0.0 && p < ROUTINE_RISE_P)
            .map(|(p, _)| p);
        self.rate.track(&mut st.rate, w, ctx, held, scored.rate);
        let burst = match (scored.burst, rise) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.endpoints.track(&mut st.endpoints, ctx, burst);
        self.registry.track(&mut st.registry, w, ctx);
        if !held {
            self.telemetry.track(&mut st.telemetry, w, ctx);
        }
    }
}

impl TokenState {
    /// Serialise (versioned) for snapshots.
    pub fn encode(&self, w: &mut Writer) {
        w.u8(STATE_VERSION);
        w.i64(self.first_seen);
        w.i64(self.last_seen);
        w.u32(self.windows);
        w.u32(self.quarantined);
        rate::RateModel::encode(&self.rate, w);
        seasonal::SeasonalModel::encode(&self.seasonal, w);
        network::NetworkModel::encode(&self.network, w);
        endpoints::EndpointModel::encode(&self.endpoints, w);
        telemetry::TelemetryModel::encode(&self.telemetry, w);
        peers::PeerModel::encode(&self.peers, w);
        registry::RegistryModel::encode(&self.registry, w);
        w.u32(self.change.key);
        w.u32(self.change.since);
        w.u32(self.change.last);
        w.u32(self.change.home);
        for &n in &self.feedback.false_alarms {
            w.u8(n);
        }
        w.u32(self.feedback.damp_mask);
        w.u32(self.feedback.damp_until);
        w.u32(self.feedback.hold_until);
        w.u32(self.feedback.alert_until);
        self.surprise.0.encode(w);
    }

    /// Every number of the state is finite (a decoded state that is not could only come
    /// from a damaged or hand-made file, and would disable a signal for good).
    fn check_finite(&self) -> Result<(), DecodeError> {
        let tails = [&self.rate.up, &self.surprise.0];
        let ewmas = self
            .telemetry
            .errors
            .iter()
            .chain([&self.telemetry.bytes, &self.telemetry.latency])
            .chain([&self.peers.d_own, &self.peers.d_peer]);
        let ok = [
            self.rate.level,
            self.rate.recent,
            self.rate.disp,
            self.rate.burst_rate,
        ]
        .iter()
        .all(|v| v.is_finite())
            && tails
                .iter()
                .all(|t| t.u.is_finite() && t.excess.is_finite() && t.max.is_finite())
            && self.rate.down.is_finite()
            && self.telemetry.bytes_tail.is_finite()
            && self.telemetry.latency_tail.is_finite()
            && ewmas
                .into_iter()
                .all(|e| e.mean.is_finite() && e.var.is_finite());
        if ok {
            Ok(())
        } else {
            Err(DecodeError::Invalid(
                "a number of the token's state is not finite".into(),
            ))
        }
    }

    /// Read back what [`TokenState::encode`] wrote; the whole buffer must be used.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let v = r.u8()?;
        if v != STATE_VERSION {
            return Err(DecodeError::Version {
                found: v,
                expected: STATE_VERSION,
            });
        }
        let st = TokenState {
            first_seen: r.i64()?,
            last_seen: r.i64()?,
            windows: r.u32()?,
            quarantined: r.u32()?,
            rate: rate::RateModel::decode(&mut r)?,
            seasonal: seasonal::SeasonalModel::decode(&mut r)?,
            network: network::NetworkModel::decode(&mut r)?,
            endpoints: endpoints::EndpointModel::decode(&mut r)?,
            telemetry: telemetry::TelemetryModel::decode(&mut r)?,
            peers: peers::PeerModel::decode(&mut r)?,
            registry: registry::RegistryModel::decode(&mut r)?,
            change: ChangeState {
                key: r.u32()?,
                since: r.u32()?,
                last: r.u32()?,
                home: r.u32()?,
            },
            feedback: {
                let mut false_alarms = [0u8; 21];
                for n in false_alarms.iter_mut() {
                    *n = r.u8()?;
                }
                FeedbackState {
                    false_alarms,
                    damp_mask: r.u32()?,
                    damp_until: r.u32()?,
                    hold_until: r.u32()?,
                    alert_until: r.u32()?,
                }
            },
            surprise: SurpriseState(sketch::Tail::decode(&mut r)?),
        };
        if r.remaining() != 0 {
            return Err(DecodeError::Trailing(r.remaining()));
        }
        st.check_finite()?;
        Ok(st)
    }
}

/// Upper-tail probability helpers shared by the models (statrs distributions).
pub mod tail {
    use statrs::distribution::{Binomial, ContinuousCDF, DiscreteCDF, Normal};

    /// P(X >= k) for X ~ Binomial(n, p), computed only where it can be small.
    pub fn binomial_at_least(k: u64, n: u64, p: f64) -> f64 {
        if k == 0 || n == 0 {
            return 1.0;
        }
        let p = p.clamp(1e-9, 1.0 - 1e-9);
        let mean = n as f64 * p;
        let sd = (mean * (1.0 - p)).sqrt();
        if (k as f64) <= mean + 2.0 * sd + 0.5 {
            return 1.0;
        }
        let v = Binomial::new(p, n).map(|d| d.sf(k - 1)).unwrap_or(1.0);
        if v.is_nan() {
            1.0
        } else {
            v
        }
    }

    /// Upper tail of a standard normal at `z`.
    pub fn normal_above(z: f64) -> f64 {
        if z.is_nan() || z <= 2.0 {
            return 1.0;
        }
        Normal::new(0.0, 1.0).map(|d| d.sf(z)).unwrap_or(1.0)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn binomial_and_normal() {
            assert_eq!(binomial_at_least(0, 10, 0.1), 1.0);
            assert!(binomial_at_least(50, 60, 0.02) < 1e-30);
            assert!((normal_above(3.0) - 0.00135).abs() < 1e-4);
            assert_eq!(normal_above(1.0), 1.0);
        }
    }
}

#[cfg(test)]
mod tests;
