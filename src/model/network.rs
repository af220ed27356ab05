//! Network: where the token is called from. Known countries, ASNs, network prefixes (/24,
//! /48) and user agents with counts; novelty of a never-seen item, weighted by how stable
//! the token has been; and more distinct networks in one window than usual (sharing).
//!
//! Novelty probability is the Beta-Bernoulli posterior predictive of "a window brings a new
//! item of this kind": (novel windows + a) / (windows + a + b). A token that has shown a new
//! prefix in one window of ten gets little from another; one that never moved in ten
//! thousand windows gets a lot.

use super::codec::{Reader, Writer};
use super::sketch::{Bloom, Slot, TopK};
use super::{feature, BetaPrior, Ctx, DecodeError, Model, Scratch, Signal, SignalKind};
use crate::config::Config;
use crate::window::{fold, Counts, WindowAgg};

/// Categories of network item, in the order of `NetworkState::novel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Category {
    /// ISO country.
    Country = 0,
    /// Autonomous system.
    Asn = 1,
    /// /24 or /48 prefix.
    Prefix = 2,
    /// User agent string.
    Agent = 3,
}

impl Category {
    const ALL: [Category; 4] = [
        Category::Country,
        Category::Asn,
        Category::Prefix,
        Category::Agent,
    ];

    fn signal(self) -> SignalKind {
        match self {
            Category::Country => SignalKind::NewCountry,
            Category::Asn => SignalKind::NewAsn,
            Category::Prefix => SignalKind::NewPrefix,
            Category::Agent => SignalKind::NewUserAgent,
        }
    }

    fn counts(self, w: &WindowAgg) -> &Counts {
        match self {
            Category::Country => &w.countries,
            Category::Asn => &w.asns,
            Category::Prefix => &w.prefixes,
            Category::Agent => &w.agents,
        }
    }

    /// Key as stored in the Bloom filter: salted by category.
    #[inline]
    fn salted(self, key: u64) -> u64 {
        key ^ ((self as u64 + 1) << 58).rotate_left(3)
    }
}

/// Per-token network state.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct NetworkState {
    /// Every item trusted (all categories, salted).
    pub known: Bloom<16>,
    /// Items on probation: seen in learned windows of one day only (key = folded salted
    /// item, `last_day` = the day first seen). An item becomes trusted when it is seen again
    /// on a later day; until then every window with it still shows it as new, so one
    /// moderately odd window cannot teach the token a new place.
    pub pending: [Slot; PENDING],
    /// Most used countries.
    pub countries: TopK<4>,
    /// Most used ASNs.
    pub asns: TopK<4>,
    /// Learned windows that brought a new item, per category.
    pub novel: [u32; 4],
    /// Learned windows with several countries at once.
    pub multi: u32,
}

/// Index of "several networks at once" in [`Global::novelty`](super::Global).
pub const MULTI_INDEX: usize = 5;

/// Two countries in one window. (Two providers of one country at once is ordinary for a
/// token used from an office and a home; two countries is not.)
fn is_multi(w: &WindowAgg) -> bool {
    w.countries.distinct() >= 2
}

/// Items a token can hold on probation at once.
pub const PENDING: usize = 4;

impl NetworkState {
    /// Note a not-yet-trusted item seen in a learned window of `day`.
    fn probation(&mut self, salted: u64, day: u16) -> Sighting {
        let key = fold(salted);
        if let Some(i) = self.pending.iter().position(|p| p.key == key) {
            if self.pending[i].last_day != day {
                self.pending[i] = Slot::default();
                return Sighting::Trusted;
            }
            self.pending[i].count = self.pending[i].count.saturating_add(1);
            return Sighting::Again;
        }
        // A free slot, else the oldest.
        let i = self
            .pending
            .iter()
            .position(|p| p.key == 0)
            .unwrap_or_else(|| {
                (0..PENDING)
                    .min_by_key(|&i| self.pending[i].last_day)
                    .unwrap_or(0)
            });
        self.pending[i] = Slot {
            key,
            count: 1,
            last_day: day,
        };
        Sighting::First
    }
}

/// What a sighting of a not-yet-trusted item means.
enum Sighting {
    /// Never seen before (counts as a novel window).
    First,
    /// On probation since earlier today.
    Again,
    /// On probation since an earlier day: now trusted.
    Trusted,
}

/// Network parameters.
#[derive(Debug, Clone)]
pub struct NetworkModel {
    prior: BetaPrior,
    min_windows: f64,
}

impl NetworkModel {
    /// From configuration.
    pub fn new(cfg: &Config) -> Self {
        NetworkModel {
            prior: BetaPrior {
                a: cfg.novelty.prior_novel,
                b: cfg.novelty.prior_seen,
            },
            min_windows: cfg.novelty.min_windows,
        }
    }

    /// Probability that a window of this token brings a new item of `cat`: the population
    /// prior once fitted, the configured one before.
    pub fn p_new(&self, cat: Category, novel: u32, ctx: &Ctx) -> f64 {
        let prior = ctx.global.novelty.map_or(self.prior, |n| n[cat as usize]);
        prior.p_new(novel, ctx.windows)
    }
}

impl NetworkModel {
    /// A move, not an addition: every country of the window is new to the token (or, with
    /// its countries known, every network provider is new and none of its usual ones is
    /// there), so the old place is absent. Returns a key of the new place. A window that
    /// mixes the usual place with a new one (a second user, a leaked token used beside its
    /// owner) is no move and stays suspicious.
    pub fn moved(&self, st: &NetworkState, w: &WindowAgg) -> Option<u32> {
        let all_new = |cat: Category| {
            let c = cat.counts(w);
            !c.items.is_empty()
                && c.items
                    .iter()
                    .all(|&(k, _)| !st.known.contains(cat.salted(k)))
        };
        if all_new(Category::Country) {
            return w.countries.items.first().map(|&(k, _)| fold(k) | 1);
        }
        let usual = st.asns.top(2);
        if all_new(Category::Asn) && !w.asns.items.iter().any(|&(k, _)| usual.contains(&fold(k))) {
            return w.asns.items.first().map(|&(k, _)| fold(k) & !1);
        }
        None
    }
}

impl NetworkModel {
    /// The new place of a window, if any, and whether it is a move ([`Self::moved`]): the
    /// key of its first country the token does not trust, else (its countries all known)
    /// of its first new network provider.
    pub fn new_place(&self, st: &NetworkState, w: &WindowAgg) -> Option<(u32, bool)> {
        if let Some(k) = self.moved(st, w) {
            return Some((k, true));
        }
        let new = |cat: Category| {
            cat.counts(w)
                .items
                .iter()
                .find(|&&(k, _)| !st.known.contains(cat.salted(k)))
                .map(|&(k, _)| fold(k))
        };
        if let Some(k) = new(Category::Country) {
            return Some((k | 1, false));
        }
        new(Category::Asn).map(|k| (k & !1, false))
    }
}

impl Model for NetworkModel {
    type State = NetworkState;

    fn score(&self, st: &NetworkState, w: &WindowAgg, ctx: &Ctx, out: &mut Scratch) {
        let mut novelty = 0.0f32;
        // A young token is still discovering where it is called from.
        let cats: &[Category] = if (ctx.windows as f64) < self.min_windows {
            &[]
        } else {
            &Category::ALL
        };
        for &cat in cats {
            let counts = cat.counts(w);
            let mut new_items = 0u32;
            let mut first_new = 0u64;
            for &(k, c) in &counts.items {
                if !st.known.contains(cat.salted(k)) {
                    if first_new == 0 {
                        first_new = k;
                    }
                    new_items += c;
                }
            }
            if new_items == 0 {
                continue;
            }
            let p = self.p_new(cat, st.novel[cat as usize], ctx);
            novelty += (-p.ln()) as f32;
            let usual = match cat {
                Category::Country => st.countries.top(2),
                Category::Asn => st.asns.top(2),
                _ => Vec::new(),
            };
            out.push(
                Signal::new(cat.signal(), new_items as f64, p, p)
                    .with_item(first_new)
                    .with_usual(&usual),
            );
        }
        out.features[feature::NOVELTY] += novelty;
        out.features[feature::NETWORKS] = w.prefixes.distinct().saturating_sub(1) as f32;
        // Two places at once: several countries in one window. How unusual that is
        // for this token is a Beta-Bernoulli rate like novelty (travel moves a token, it
        // does not put it in two places).
        if is_multi(w) && (ctx.windows as f64) >= self.min_windows {
            let prior = ctx.global.novelty.map_or(self.prior, |n| n[MULTI_INDEX]);
            let p = prior.p_new(st.multi, ctx.windows);
            out.push(Signal::new(
                SignalKind::ConcurrentNetworks,
                w.countries.distinct() as f64,
                p,
                p,
            ));
        }
    }

    fn learn(&self, st: &mut NetworkState, w: &WindowAgg, ctx: &Ctx) {
        let day = ctx.day();
        let young = ctx.trusted || ctx.start - ctx.first_seen < ctx.cfg.score.learn_all_for.ms;
        for cat in Category::ALL {
            let counts = cat.counts(w);
            let mut new = false;
            for &(k, c) in &counts.items {
                let s = cat.salted(k);
                if !st.known.contains(s) {
                    if young {
                        new = true;
                        st.known.insert(s);
                    } else {
                        match st.probation(s, day) {
                            Sighting::First => new = true,
                            Sighting::Again => {}
                            Sighting::Trusted => st.known.insert(s),
                        }
                    }
                }
                match cat {
                    Category::Country => st.countries.add(fold(k), c, day),
                    Category::Asn => st.asns.add(fold(k), c, day),
                    _ => {}
                }
            }
            if new && ctx.windows > 0 {
                st.novel[cat as usize] += 1;
            }
        }
        if is_multi(w) && ctx.windows > 0 {
            st.multi += 1;
        }
    }

    fn encode(st: &NetworkState, w: &mut Writer) {
        st.known.encode(w);
        for p in &st.pending {
            w.u32(p.key);
            w.u16(p.count);
            w.u16(p.last_day);
        }
        st.countries.encode(w);
        st.asns.encode(w);
        for n in &st.novel {
            w.u32(*n);
        }
        w.u32(st.multi);
    }

    fn decode(r: &mut Reader) -> Result<NetworkState, DecodeError> {
        Ok(NetworkState {
            known: Bloom::decode(r)?,
            pending: {
                let mut p = [Slot::default(); PENDING];
                for s in p.iter_mut() {
                    *s = Slot {
                        key: r.u32()?,
                        count: r.u16()?,
                        last_day: r.u16()?,
                    };
                }
                p
            },
            countries: TopK::decode(r)?,
            asns: TopK::decode(r)?,
            novel: [r.u32()?, r.u32()?, r.u32()?, r.u32()?],
            multi: r.u32()?,
        })
    }
}
