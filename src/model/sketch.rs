//! Fixed-size building blocks of per-token state: EWMA moments, a small heavy-hitter table
//! and a Bloom filter. No heap, so a token's whole state has a known, small size.

use super::codec::{Reader, Writer};
use super::DecodeError;

/// Exponentially weighted mean and variance (West's incremental form).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Ewma {
    /// Mean.
    pub mean: f32,
    /// Variance.
    pub var: f32,
}

impl Ewma {
    /// Smoothing factor for a half-life counted in updates.
    pub fn alpha(half_life: f64) -> f64 {
        1.0 - 0.5f64.powf(1.0 / half_life.max(1e-9))
    }

    /// Update with `x`. `n` is how many updates came before: the first updates average
    /// plainly so that the first value does not linger for a half-life.
    pub fn update(&mut self, x: f64, alpha: f64, n: u32) {
        let a = alpha.max(1.0 / (n as f64 + 1.0));
        let mean = self.mean as f64;
        let diff = x - mean;
        let incr = a * diff;
        let new_mean = mean + incr;
        let new_var = (1.0 - a) * (self.var as f64 + diff * incr);
        self.mean = new_mean as f32;
        self.var = new_var.max(0.0) as f32;
    }

    /// Standard deviation.
    pub fn sd(&self) -> f64 {
        (self.var as f64).sqrt()
    }

    pub(crate) fn encode(&self, w: &mut Writer) {
        w.f32(self.mean);
        w.f32(self.var);
    }

    pub(crate) fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Ewma {
            mean: r.f32()?,
            var: r.f32()?,
        })
    }
}

/// The upper tail of a statistic, learned from the token's own history: a running high
/// quantile `u` (the `Tail::Q` quantile, by stochastic approximation) and the mean excess of
/// the values above it. Beyond `u` the tail is extrapolated as exponential with that mean
/// excess (peaks over threshold: past a high threshold almost any distribution's tail is
/// close to a generalised Pareto, of which the exponential is the light end), so no shape
/// is assumed for the bulk and heavy tails widen the excess instead of breaking a
/// parametric fit. Beyond the largest value the token has shown lately (`max`, decaying
/// toward `u`) the tail also falls off quadratically: within the token's experience its own
/// tail speaks, past it a value the token has never come near is strong evidence even for a
/// steady token whose excess is small. 16 bytes; written by hand because no crate keeps a fixed-size,
/// allocation-free tail estimate that can be snapshotted bit for bit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tail {
    /// Running `Q` quantile.
    pub u: f32,
    /// Mean excess over `u` of the values above it.
    pub excess: f32,
    /// Largest value seen lately (decays toward `u`).
    pub max: f32,
    /// Updates so far.
    pub n: u32,
}

impl Tail {
    /// The quantile `u` tracks.
    pub const Q: f64 = 0.9;
    /// A tail of a standardised residual, before the token's own values move it (about a
    /// standard normal's).
    pub const STANDARD: Tail = Tail::new(1.28, 0.5);
    /// Standardised residuals a learned tail may never call extreme below this.
    pub const MIN_U: f64 = 1.0;
    /// Smallest mean excess of a learned tail of standardised residuals.
    pub const MIN_EXCESS: f64 = 0.35;

    /// Tail probability of a standardised residual `z` with the floors above.
    pub fn p_std(&self, z: f64) -> f64 {
        self.p(z, Self::MIN_U, Self::MIN_EXCESS)
    }

    /// A tail that starts as `(u, excess)`, a prior the token's own values then move.
    pub const fn new(u: f32, excess: f32) -> Self {
        Tail {
            u,
            excess,
            max: u + 4.0 * excess,
            n: 0,
        }
    }

    /// Probability of a value at least `x` (1 at or below the quantile's neighbourhood).
    /// `min_u` and `min_excess` floor the learned tail, so a token that has been perfectly
    /// regular cannot make the smallest wobble look extreme.
    pub fn p(&self, x: f64, min_u: f64, min_excess: f64) -> f64 {
        if x.is_nan() {
            return 1.0;
        }
        let u = (self.u as f64).max(min_u);
        let b = (self.excess as f64).max(min_excess);
        let m = (self.max as f64).max(u + 2.0 * b);
        let beyond = (x - m).max(0.0);
        ((1.0 - Self::Q) * (-(x - u) / b - 0.5 * beyond * beyond).exp()).min(1.0)
    }

    /// Fold in a value; `rate` is the learning rate of the mean excess (an EWMA factor), the
    /// quantile moves by a step proportional to the current excess.
    pub fn update(&mut self, x: f64, rate: f64) {
        if !x.is_finite() {
            return;
        }
        // The starting tail counts as 20 values, so the first few cannot throw it far.
        let a = rate.max(1.0 / (self.n as f64 + 20.0));
        let u = self.u as f64;
        let b = (self.excess as f64).max(1e-6);
        let step = 2.0 * a * b.min(1.0);
        if x > u {
            // Only one value in 1 / (1 - Q) exceeds: the excess learns at that much the rate.
            // Winsorised: one huge value moves it by at most a few of its own sizes.
            // ...but a side of the tail that has seen few values yet is not thrown by them.
            let ae = (a / (1.0 - Self::Q)).min(2.0 / (self.n as f64 + 20.0));
            let over = (x - u).min(8.0 * b);
            self.excess = (b + ae * (over - b)) as f32;
            self.u = (u + step * Self::Q) as f32;
        } else {
            self.u = (u - step * (1.0 - Self::Q)) as f32;
        }
        // The experienced range grows by at most one excess a value, so one wild window
        // cannot make everything short of it look familiar.
        let m = self.max as f64;
        let m = u + (m - u) * (1.0 - a);
        self.max = m.max(x.min(m + b)) as f32;
        self.n = self.n.saturating_add(1);
    }

    pub(crate) fn encode(&self, w: &mut Writer) {
        w.f32(self.u);
        w.f32(self.excess);
        w.f32(self.max);
        w.u32(self.n);
    }

    pub(crate) fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Tail {
            u: r.f32()?,
            excess: r.f32()?,
            max: r.f32()?,
            n: r.u32()?,
        })
    }
}

/// The upper tail of a statistic as three of its own running quantiles (90%, 99% and
/// 99.9%, by stochastic approximation), interpolated log-linearly between them and extended
/// past the last with the slope of the last stretch. Nothing is assumed about the shape: a
/// mixture (ordinary sizes with now and then one huge response) keeps a far tail as wide as
/// it really is, where one mean excess fitted to all the values above the 90% level would
/// be set by the many small excesses and call every large one impossible. For heavy-tailed
/// quantities (sizes, latency) per the token. 16 bytes; written by hand because no crate
/// keeps a fixed-size, allocation-free quantile sketch that can be snapshotted bit for bit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quantiles {
    /// Running 90%, 99% and 99.9% quantiles.
    pub q: [f32; 3],
    /// Updates so far.
    pub n: u32,
}

impl Quantiles {
    /// The levels tracked.
    pub const LEVELS: [f64; 3] = [0.9, 0.99, 0.999];
    /// A tail of a standardised residual before the token's own values move it (a standard
    /// normal's quantiles).
    pub const STANDARD: Quantiles = Quantiles {
        q: [1.28, 2.33, 3.09],
        n: 0,
    };
    /// A standardised residual is never called extreme below this (the 90% level's floor).
    pub const MIN_Q: f64 = 1.0;
    /// Smallest distance between two levels (a tenfold drop in probability), so a token
    /// that has been perfectly regular cannot make the smallest wobble look extreme.
    pub const MIN_GAP: f64 = 0.8;

    fn floored(&self) -> [f64; 3] {
        let a = (self.q[0] as f64).max(Self::MIN_Q);
        let b = (self.q[1] as f64).max(a + Self::MIN_GAP);
        let c = (self.q[2] as f64).max(b + Self::MIN_GAP);
        [a, b, c]
    }

    /// Probability of a value at least `x` (1 well below the 90% level).
    pub fn p(&self, x: f64) -> f64 {
        if x.is_nan() {
            return 1.0;
        }
        let [a, b, c] = self.floored();
        let ln10 = std::f64::consts::LN_10;
        let ln_p = if x <= b {
            -ln10 * (1.0 + (x - a) / (b - a))
        } else if x <= c {
            -ln10 * (2.0 + (x - b) / (c - b))
        } else {
            -ln10 * (3.0 + (x - c) / (c - b))
        };
        ln_p.exp().min(1.0)
    }

    /// Fold in a value; `rate` is the learning rate (an EWMA factor). Each quantile moves by
    /// a step proportional to the stretch of tail above it, larger for the higher levels in
    /// proportion to their rarity (so each adapts at a similar pace in its own exceedances),
    /// never past the value itself nor by more than the stretch below it.
    pub fn update(&mut self, x: f64, rate: f64) {
        if !x.is_finite() {
            return;
        }
        // The starting quantiles count as 20 values, so the first few cannot throw them far.
        let a = rate.max(1.0 / (self.n as f64 + 20.0));
        let f = self.floored();
        let ln10 = std::f64::consts::LN_10;
        for i in 0..3 {
            let tau = Self::LEVELS[i];
            let gap = if i == 0 { f[1] - f[0] } else { f[2] - f[1] };
            let step = 2.0 * a * (gap / ln10).min(1.0) * (0.1 / (1.0 - tau));
            let q = self.q[i] as f64;
            let q = if x > q {
                // One value moves a level by at most the stretch below it: a single wild
                // window cannot make everything short of it look familiar.
                q + (step * tau).min(gap).min(x - q)
            } else {
                q - step * (1.0 - tau)
            };
            self.q[i] = q as f32;
        }
        // Keep the levels in order.
        self.q[1] = self.q[1].max(self.q[0]);
        self.q[2] = self.q[2].max(self.q[1]);
        self.n = self.n.saturating_add(1);
    }

    /// Every number is finite.
    pub fn is_finite(&self) -> bool {
        self.q.iter().all(|v| v.is_finite())
    }

    pub(crate) fn encode(&self, w: &mut Writer) {
        for v in self.q {
            w.f32(v);
        }
        w.u32(self.n);
    }

    pub(crate) fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Quantiles {
            q: [r.f32()?, r.f32()?, r.f32()?],
            n: r.u32()?,
        })
    }
}

/// One slot of a [`TopK`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Slot {
    /// Item key (0 = empty).
    pub key: u32,
    /// Count, halved for all slots when one would overflow.
    pub count: u16,
    /// Day (since the epoch) the item was last seen.
    pub last_day: u16,
}

/// Space-saving heavy hitters over `N` slots: the most frequent items with their counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopK<const N: usize> {
    /// Slots, unsorted.
    pub slots: [Slot; N],
}

impl<const N: usize> Default for TopK<N> {
    fn default() -> Self {
        TopK {
            slots: [Slot::default(); N],
        }
    }
}

impl<const N: usize> TopK<N> {
    /// Add `c` observations of `key` (0 is reserved and mapped to 1).
    pub fn add(&mut self, key: u32, c: u32, day: u16) {
        let key = key.max(1);
        let c = c.min(u16::MAX as u32) as u16;
        let mut min_i = 0;
        for i in 0..N {
            let s = &mut self.slots[i];
            if s.key == key {
                if s.count as u32 + c as u32 > u16::MAX as u32 {
                    for t in self.slots.iter_mut() {
                        t.count /= 2;
                    }
                }
                let s = &mut self.slots[i];
                s.count = s.count.saturating_add(c);
                s.last_day = day;
                return;
            }
            if s.key == 0 {
                *s = Slot {
                    key,
                    count: c,
                    last_day: day,
                };
                return;
            }
            if s.count < self.slots[min_i].count {
                min_i = i;
            }
        }
        // Space-saving: the newcomer inherits the evicted count as its error bound.
        let s = &mut self.slots[min_i];
        let count = s.count.saturating_add(c);
        *s = Slot {
            key,
            count,
            last_day: day,
        };
    }

    /// Halve every count while their sum exceeds `cap`: the counts then describe the most
    /// recent `cap` to `2 cap` observations, so shares follow lasting change.
    pub fn cap(&mut self, cap: u32) {
        while self.total() > cap.max(1) {
            for s in self.slots.iter_mut() {
                s.count /= 2;
            }
        }
    }

    /// Count of `key` (0 if not held).
    pub fn count(&self, key: u32) -> u32 {
        let key = key.max(1);
        self.slots
            .iter()
            .find(|s| s.key == key)
            .map_or(0, |s| s.count as u32)
    }

    /// Sum of all counts.
    pub fn total(&self) -> u32 {
        self.slots.iter().map(|s| s.count as u32).sum()
    }

    /// Keys of the `k` largest counts, largest first.
    pub fn top(&self, k: usize) -> Vec<u32> {
        let mut v: Vec<Slot> = self.slots.iter().copied().filter(|s| s.key != 0).collect();
        v.sort_by(|a, b| b.count.cmp(&a.count).then(a.key.cmp(&b.key)));
        v.into_iter().take(k).map(|s| s.key).collect()
    }

    /// Number of occupied slots.
    pub fn len(&self) -> usize {
        self.slots.iter().filter(|s| s.key != 0).count()
    }

    /// No slot is occupied.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn encode(&self, w: &mut Writer) {
        for s in &self.slots {
            w.u32(s.key);
            w.u16(s.count);
            w.u16(s.last_day);
        }
    }

    pub(crate) fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        let mut t = TopK::default();
        for s in t.slots.iter_mut() {
            *s = Slot {
                key: r.u32()?,
                count: r.u16()?,
                last_day: r.u16()?,
            };
        }
        Ok(t)
    }
}

/// Bloom filter of `W` 64-bit words, 3 probes: "has this token ever used this item".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bloom<const W: usize> {
    bits: [u64; W],
}

impl<const W: usize> Default for Bloom<W> {
    fn default() -> Self {
        Bloom { bits: [0; W] }
    }
}

/// A 64-bit finaliser (splitmix64): spreads any key over all bits.
#[inline]
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl<const W: usize> Bloom<W> {
    const BITS: u64 = (W * 64) as u64;

    #[inline]
    fn probes(key: u64) -> [usize; 3] {
        let h = mix(key);
        [
            (h % Self::BITS) as usize,
            ((h >> 21) % Self::BITS) as usize,
            ((h >> 42) % Self::BITS) as usize,
        ]
    }

    /// Insert a key.
    #[inline]
    pub fn insert(&mut self, key: u64) {
        for p in Self::probes(key) {
            self.bits[p >> 6] |= 1 << (p & 63);
        }
    }

    /// Possibly contains (false positives at the known Bloom rate, never false negatives).
    #[inline]
    pub fn contains(&self, key: u64) -> bool {
        Self::probes(key)
            .iter()
            .all(|&p| self.bits[p >> 6] & (1 << (p & 63)) != 0)
    }

    /// Fraction of bits set (saturation).
    pub fn fill(&self) -> f64 {
        self.bits.iter().map(|b| b.count_ones()).sum::<u32>() as f64 / Self::BITS as f64
    }

    pub(crate) fn encode(&self, w: &mut Writer) {
        for b in &self.bits {
            w.u64(*b);
        }
    }

    pub(crate) fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        let mut b = Self::default();
        for x in b.bits.iter_mut() {
            *x = r.u64()?;
        }
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ewma_tracks_mean_and_variance() {
        let mut e = Ewma::default();
        let a = Ewma::alpha(10.0);
        for i in 0..2000 {
            e.update(if i % 2 == 0 { 9.0 } else { 11.0 }, a, i);
        }
        assert!((e.mean - 10.0).abs() < 0.2, "{e:?}");
        assert!((e.var - 1.0).abs() < 0.3, "{e:?}");
        let mut f = Ewma::default();
        f.update(5.0, a, 0);
        assert_eq!(f.mean, 5.0);
    }

    #[test]
    fn topk_keeps_heavy_hitters() {
        let mut t: TopK<4> = TopK::default();
        for i in 0..100u32 {
            t.add(7, 10, 0);
            t.add(100 + i, 1, 0);
        }
        assert_eq!(t.top(1), vec![7]);
        assert_eq!(t.count(7), 1000);
        assert_eq!(t.len(), 4);
    }

    #[test]
    fn bloom_has_no_false_negatives() {
        let mut b: Bloom<16> = Bloom::default();
        for k in 0..50u64 {
            b.insert(k * 31);
        }
        assert!((0..50u64).all(|k| b.contains(k * 31)));
        let fp = (1000..11000u64).filter(|k| b.contains(*k * 31)).count();
        assert!(fp < 100, "false positives {fp}");
    }

    #[test]
    fn tail_learns_a_heavy_tail_without_a_shape() {
        // Pareto(1.5)-distributed values: a normal fit would call the 99th percentile
        // extreme; the learned tail does not, and still finds 50x the median extreme.
        let mut rng = 12345u64;
        let mut t = Tail::new(1.28, 0.5);
        let mut xs = Vec::new();
        for _ in 0..20_000 {
            rng = mix(rng);
            let u = (rng >> 11) as f64 / (1u64 << 53) as f64;
            let x = (1.0 - u).powf(-1.0 / 1.5).ln(); // log of a Pareto value
            xs.push(x);
            t.update(x, 0.002);
        }
        xs.sort_by(|a, b| a.total_cmp(b));
        let q90 = xs[18_000];
        assert!((t.u as f64 - q90).abs() < 0.25, "u {} vs q90 {q90}", t.u);
        let q99 = xs[19_800];
        assert!(t.p(q99, 0.0, 0.0) > 0.003, "{}", t.p(q99, 0.0, 0.0));
        assert!(t.p(50f64.ln() + 3.0, 0.0, 0.0) < 1e-3);
        assert_eq!(t.p(-1.0, 0.0, 0.0), 1.0);
    }

    #[test]
    fn quantiles_keep_a_mixture_tail_as_wide_as_it_is() {
        // Mostly a standard-normal-like bulk, one value in 200 five to nine units out (an
        // ordinary size with now and then a huge response). The three levels land near the
        // sample's own quantiles; a value as far out as the outliers go is unusual, not
        // impossible, while one far beyond everything seen is extreme.
        let mut rng = 99u64;
        let mut q = Quantiles::STANDARD;
        let mut xs = Vec::new();
        for _ in 0..40_000 {
            rng = mix(rng);
            let u = (rng >> 11) as f64 / (1u64 << 53) as f64;
            rng = mix(rng);
            let v = (rng >> 11) as f64 / (1u64 << 53) as f64;
            let x = if v < 0.005 {
                5.0 + 4.0 * u
            } else {
                2.0 * u - 1.0
            };
            xs.push(x);
            q.update(x, 0.002);
        }
        xs.sort_by(|a, b| a.total_cmp(b));
        let q99 = xs[39_600];
        assert!((q.q[1] as f64 - q99).abs() < 0.5, "{:?} vs {q99}", q.q);
        // An outlier of the usual kind: about as rare as it really is (1 in 200 to 2,000).
        assert!(q.p(7.0) > 2e-4, "{}", q.p(7.0));
        assert!(q.p(20.0) < 1e-4, "{}", q.p(20.0));
        assert!(q.p(30.0) < 1e-6, "{}", q.p(30.0));
        assert_eq!(q.p(-1.0), 1.0);
        // Monotone.
        assert!(q.p(3.0) >= q.p(5.0) && q.p(5.0) >= q.p(9.0));
    }
}
