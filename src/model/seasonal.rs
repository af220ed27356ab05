//! Seasonal: the token's own hour-of-week rhythm (168 buckets of active windows) and a
//! time-of-use score for activity where the token is normally silent.
//!
//! The probability that the token is active in a window of bucket b is estimated with
//! hierarchical shrinkage: hour-of-week toward hour-of-day toward the token's overall
//! activity. The signal's tail probability is the likelihood ratio q_b / q_overall (capped
//! at 1): how much less likely activity is now than at a typical time for this token.

use super::codec::{Reader, Writer};
use super::{feature, Ctx, DecodeError, Model, Scratch, Signal, SignalKind};
use crate::config::Config;
use crate::event::hour_of_week;
use crate::window::WindowAgg;

const HOURS: usize = 168;
const HOUR_MS: i64 = 3_600_000;

/// Active windows per hour-of-week bucket (Monday 00h UTC = 0), forgetting by halves: when
/// a bucket would pass 255, every count is halved and the start its exposure is counted
/// from moves halfway to now, so the profile follows a lasting change of rhythm (a new
/// shift, a moved job) and fits in one byte per bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeasonalState {
    /// Counts of learned windows per bucket.
    pub active: [u8; HOURS],
    /// Exposure is counted from here, in hours since the epoch (0: from the token's first
    /// window).
    pub since: u32,
}

impl Default for SeasonalState {
    fn default() -> Self {
        SeasonalState {
            active: [0; HOURS],
            since: 0,
        }
    }
}

impl SeasonalState {
    fn start(&self, first_seen: i64) -> i64 {
        if self.since == 0 {
            first_seen
        } else {
            (self.since as i64 * HOUR_MS).max(first_seen)
        }
    }
}

/// Seasonal parameters.
#[derive(Debug, Clone)]
pub struct SeasonalModel {
    shrink_week: f64,
    shrink_day: f64,
    min_days: f64,
}

/// Windows of bucket `b` elapsed between `first` and `now` (whole hours only).
fn exposure_of(first: i64, now: i64, per_hour: f64, b: usize) -> f64 {
    let h0 = first.div_euclid(HOUR_MS);
    let total = (now.div_euclid(HOUR_MS) - h0).max(0);
    let full = (total / HOURS as i64) as f64;
    let rem = (total % HOURS as i64) as usize;
    let start = hour_of_week(h0 * HOUR_MS);
    let extra = if (b + HOURS - start) % HOURS < rem {
        1.0
    } else {
        0.0
    };
    (full + extra) * per_hour
}

/// Windows of each bucket elapsed between `first` and `now` (whole hours only).
#[cfg(test)]
fn exposure(first: i64, now: i64, per_hour: f64) -> [f64; HOURS] {
    let h0 = first.div_euclid(HOUR_MS);
    let h1 = now.div_euclid(HOUR_MS);
    let total = (h1 - h0).max(0);
    let full = (total / HOURS as i64) as f64;
    let rem = (total % HOURS as i64) as usize;
    let start = hour_of_week(h0 * HOUR_MS);
    let mut e = [full; HOURS];
    for i in 0..rem {
        e[(start + i) % HOURS] += 1.0;
    }
    for x in e.iter_mut() {
        *x *= per_hour;
    }
    e
}

impl SeasonalModel {
    /// From configuration.
    pub fn new(cfg: &Config) -> Self {
        SeasonalModel {
            shrink_week: cfg.seasonal.shrink_hour_of_week,
            shrink_day: cfg.seasonal.shrink_hour_of_day,
            min_days: cfg.seasonal.min_days,
        }
    }

    /// (probability of activity in this window's bucket, overall probability).
    pub fn activity(&self, st: &SeasonalState, ctx: &Ctx) -> Option<(f64, f64)> {
        let days = (ctx.start - ctx.first_seen) as f64 / 86_400_000.0;
        if days < self.min_days {
            return None;
        }
        let first = st.start(ctx.first_seen);
        let per_hour = (HOUR_MS as f64 / ctx.window_ms as f64).max(1.0);
        let n = |b: usize| exposure_of(first, ctx.start, per_hour, b);
        let total_n =
            ((ctx.start.div_euclid(HOUR_MS) - first.div_euclid(HOUR_MS)).max(0) as f64) * per_hour;
        let total_a: f64 = st.active.iter().map(|&a| a as u32).sum::<u32>() as f64;
        if total_n <= 0.0 || total_a <= 0.0 {
            return None;
        }
        let overall = (total_a / total_n).min(1.0);
        let b = hour_of_week(ctx.start);
        let h = b % 24;
        let (mut a_h, mut n_h) = (0.0, 0.0);
        for d in 0..7 {
            a_h += st.active[d * 24 + h] as f64;
            n_h += n(d * 24 + h);
        }
        let q_h = (a_h + self.shrink_day * overall) / (n_h + self.shrink_day);
        let q_b = (st.active[b] as f64 + self.shrink_week * q_h) / (n(b) + self.shrink_week);
        Some((q_b, overall))
    }
}

impl Model for SeasonalModel {
    type State = SeasonalState;

    fn score(&self, st: &SeasonalState, _w: &WindowAgg, ctx: &Ctx, out: &mut Scratch) {
        let Some((q_b, overall)) = self.activity(st, ctx) else {
            return;
        };
        let ratio = (q_b / overall).min(1.0);
        out.features[feature::SEASONAL] = (-ratio.max(1e-12).ln()) as f32;
        let per_hour = (HOUR_MS as f64 / ctx.window_ms as f64).max(1.0);
        out.push(Signal::new(
            SignalKind::Seasonal,
            q_b * per_hour,
            overall * per_hour,
            ratio,
        ));
    }

    fn learn(&self, st: &mut SeasonalState, _w: &WindowAgg, ctx: &Ctx) {
        let b = hour_of_week(ctx.start);
        if st.active[b] == u8::MAX {
            for a in st.active.iter_mut() {
                *a /= 2;
            }
            let first = st.start(ctx.first_seen);
            let half = (ctx.start - first).max(0) / 2;
            st.since = (first + half).div_euclid(HOUR_MS).clamp(0, u32::MAX as i64) as u32;
        }
        st.active[b] += 1;
    }

    fn encode(st: &SeasonalState, w: &mut Writer) {
        for a in &st.active {
            w.u8(*a);
        }
        w.u32(st.since);
    }

    fn decode(r: &mut Reader) -> Result<SeasonalState, DecodeError> {
        let mut st = SeasonalState::default();
        for a in st.active.iter_mut() {
            *a = r.u8()?;
        }
        st.since = r.u32()?;
        Ok(st)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposure_counts_whole_hours() {
        // Two whole weeks from Monday 00h: every bucket seen twice, 60 windows per hour.
        let monday = crate::event::parse_ts("2026-03-02T00:00:00Z").unwrap();
        let e = exposure(monday, monday + 14 * 86_400_000, 60.0);
        assert!(e.iter().all(|&x| x == 120.0));
        let e = exposure(monday, monday + 25 * HOUR_MS, 1.0);
        assert_eq!(e[0], 1.0);
        assert_eq!(e[24], 1.0);
        assert_eq!(e[25], 0.0);
        let wed = monday + 2 * 86_400_000 + 5 * HOUR_MS;
        let e = exposure(wed, wed + 200 * HOUR_MS, 60.0);
        for (b, x) in e.iter().enumerate() {
            assert_eq!(*x, exposure_of(wed, wed + 200 * HOUR_MS, 60.0, b));
        }
    }
}
