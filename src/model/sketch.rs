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
}
