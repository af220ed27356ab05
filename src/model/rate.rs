//! Rate: how many calls this token makes in a window, given its level and its daily and
//! weekly rhythm, and how far the count strays from that, in both directions.
//!
//! The expected count is `exp(level + day[hour] + week[weekday])`, all in log space and
//! learned online from the token's calm windows (the day and week factors start flat and
//! learn as the token's history grows, so a young token's shape is shrunk toward a flat
//! one; a very young token borrows its peer group's level). The residual of a window is
//! standardised by the token's own dispersion (learned as a multiple of counting noise, so
//! it follows the rhythm: a quiet night is noisier in relative terms than a busy day, and a
//! token steadier than Poisson is allowed to be), and its tail
//! probability comes from the token's own learned tails of past residuals: for rises a
//! [`Tail`](super::sketch::Tail) (peaks over threshold, with a fall-off past the token's
//! experience, so a burst beyond anything it has done is strong evidence), for drops its own
//! running quantiles ([`Quantiles`](super::sketch::Quantiles)), because the drops of real
//! traffic come as a mixture (a daily job that ends early, a gap) that one fitted excess
//! would call impossible. Heavy-tailed tokens widen their own tails instead of breaking a
//! parametric fit.
//!
//! The tails learn from every window, calm or not (they say how often this token looks odd),
//! the baseline only from calm ones.
//!
//! Lasting change: a recent level follows every window (calm or not). When the count has
//! stayed on one side of the baseline for `adopt-after`, the baseline adopts the recent level:
//! the change was flagged when it began and is the new normal from then on, unless an
//! operator confirmed an incident on the token (held), which keeps the old baseline.

use super::codec::{Reader, Writer};
use super::sketch::{Ewma, Quantiles, Tail};
use super::{feature, Ctx, DecodeError, Model, Scratch, Signal, SignalKind};
use crate::config::Config;
use crate::event::hour_of_week;
use crate::window::{class, WindowAgg};

/// Fixed-point scale of the day and week log factors.
const FIX: f32 = 1024.0;

/// Per-token rate state (log space).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateState {
    /// ln of the deseasonalised expected count, from calm windows.
    pub level: f32,
    /// ln of the recent deseasonalised count, from every window.
    pub recent: f32,
    /// Dispersion: variance of the log residual as a multiple of counting (Poisson) noise.
    pub disp: f32,
    /// Hour-of-day log factors (x 1/1024), UTC hours.
    pub day: [i16; 24],
    /// Day-of-week log factors (x 1/1024), Monday first.
    pub week: [i16; 7],
    /// Consecutive windows on one side of the baseline (+ above, - below).
    pub run: i16,
    /// Tail of standardised residuals above the baseline.
    pub up: Tail,
    /// Tail (own quantiles) of standardised residuals below the baseline.
    pub down: Quantiles,
    /// Windows folded into the baseline (saturating).
    pub n: u16,
    /// The token's own bursts: episodes per window (an EWMA of episode starts), see
    /// [`RateState::burst_p`].
    pub burst_rate: f32,
    /// The ln z its burst windows reach (up quickly, down slowly), x 16 (0: none yet).
    pub burst_size: u8,
    /// The latest burst, packed in one byte (the state's budget has no other left): its
    /// 4-hour unit since the epoch modulo 64 (10 days; the low 6 bits), whether the token
    /// has shown more than one episode ([`BURST_HABIT`]) and whether the latest window
    /// followed was a burst, an episode under way ([`IN_BURST`]).
    pub burst_at: u8,
}

/// A rise the ordinary tail calls rarer than this is a burst.
pub const BURST_P: f64 = 1e-6;
/// A burst e^BURST_SCALE times the token's usual size is e times rarer.
const BURST_SCALE: f64 = 0.1;
/// Fixed-point scale of a burst's ln z.
const BURST_FIX: f64 = 16.0;
/// Bursts less than this many 4-hour units apart (8 to 12 hours) are one episode.
const BURST_APART: u8 = 3;
/// Bits of [`RateState::burst_at`]: the unit, a second episode seen, an episode under way.
const BURST_UNIT: u8 = 0x3f;
const BURST_HABIT: u8 = 0x40;
const IN_BURST: u8 = 0x80;

/// The token's own bursts, the far tail of its rises as its history draws it. A window is
/// a burst when the ordinary tail calls its rise rarer than [`BURST_P`]; an episode is a run
/// of bursts less than [`BURST_APART`] apart. The rate learns one event per episode, at its
/// first window; the size is the ln z its burst windows reach. Once a token has shown two
/// episodes (one burst is an event, not a habit), a rise is at most as surprising as that
/// mixture says: a token that bursts daily (a nightly job, a client that retries in storms)
/// has shown that bursts of that size are its routine, while a burst several times larger
/// than its usual ones, or on a token that never bursts, keeps the ordinary tail's verdict.
/// The mixture judges the first window of an episode that starts well apart from the latest
/// one and the windows that go on from it (a spike that straddles two windows is one
/// episode); a new rise within hours of the latest burst (an attacker who pauses and
/// resumes) keeps the ordinary tail's verdict. Six bytes of state: a mixture fitted per
/// token would need the token's past windows, which are not kept.
impl RateState {
    /// Probability of a rise of at least `z` at `start` under the token's own bursts (0
    /// before a second episode, or for a new rise within [`BURST_APART`] of the latest).
    pub fn burst_p(&self, z: f64, start: i64) -> f64 {
        if self.burst_at & BURST_HABIT == 0 || self.burst_size == 0 || z <= 0.0 {
            return 0.0;
        }
        if self.burst_at & IN_BURST == 0 && burst_units_since(self.burst_at, start) < BURST_APART {
            return 0.0;
        }
        let over = (z.ln() - self.burst_size as f64 / BURST_FIX).max(0.0);
        self.burst_rate as f64 * (-over / BURST_SCALE).exp()
    }

    /// Fold in the window at `start` with standardised residual `z` whose ordinary tail
    /// probability was `body`; `alpha` is the rate's EWMA factor.
    fn learn_bursts(&mut self, z: f64, body: f64, start: i64, alpha: f64) {
        let burst = z > 0.0 && body < BURST_P;
        let first = self.burst_size == 0;
        let counted = burst && (first || burst_units_since(self.burst_at, start) >= BURST_APART);
        self.burst_rate += (alpha * ((counted as u8 as f64) - self.burst_rate as f64)) as f32;
        let mut flags = self.burst_at & BURST_HABIT;
        if counted && !first {
            flags |= BURST_HABIT;
        }
        let mut unit = self.burst_at & BURST_UNIT;
        if burst {
            let lz = (z.ln() * BURST_FIX).clamp(1.0, 255.0);
            // The size the token's bursts reach: up quickly, down slowly, so the smaller
            // windows at the edges of a spike do not drag it below the spike's peak.
            let prev = self.burst_size as f64;
            let s = if first {
                lz
            } else if lz > prev {
                prev + 0.25 * (lz - prev)
            } else {
                prev + 0.05 * (lz - prev)
            };
            self.burst_size = s.round().clamp(1.0, 255.0) as u8;
            unit = burst_unit(start);
            // An episode is under way from its counted start; a resumption within hours
            // is not one, so all its windows keep the ordinary verdict.
            if counted || self.burst_at & IN_BURST != 0 {
                flags |= IN_BURST;
            }
        }
        self.burst_at = unit | flags;
    }
}

/// The 4-hour unit of `t` (ms) modulo 64.
fn burst_unit(t: i64) -> u8 {
    (t.div_euclid(4 * 3_600_000).rem_euclid(64)) as u8
}

/// 4-hour units from the latest burst (the unit bits of `at`) to `t`, modulo 64.
fn burst_units_since(at: u8, t: i64) -> u8 {
    (burst_unit(t) + 64 - (at & BURST_UNIT)) % 64
}

const UP0: Tail = Tail::STANDARD;

impl Default for RateState {
    fn default() -> Self {
        RateState {
            level: 0.0,
            recent: 0.0,
            disp: 1.0,
            day: [0; 24],
            week: [0; 7],
            run: 0,
            up: UP0,
            down: Quantiles::STANDARD,
            n: 0,
            burst_rate: 0.0,
            burst_size: 0,
            burst_at: 0,
        }
    }
}

impl RateState {
    /// Expected calls per window at the level alone (no rhythm).
    pub fn mean_count(&self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            (self.level as f64).exp()
        }
    }

    /// Variance of calls per window at the level (quasi-Poisson).
    pub fn var_count(&self) -> f64 {
        self.mean_count() * self.disp as f64
    }

    fn season(&self, start: i64) -> f64 {
        let how = hour_of_week(start);
        (self.day[how % 24] as f64 + self.week[how / 24] as f64) / FIX as f64
    }

    /// Lowest and highest rhythm factor within half an hour of `start`: a daily job or a
    /// working day does not start on the same minute every day, so a window is judged
    /// against the neighbouring hour where that one is closer to what it saw.
    fn season_range(&self, start: i64) -> (f64, f64) {
        crate::event::within_half_hour(start)
            .into_iter()
            .map(|t| self.season(t))
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            })
    }
}

/// What the rate model expects of one window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Expectation {
    /// Expected count.
    pub mean: f64,
    /// Standard deviation of ln(count + 1/2) around ln(mean + 1/2).
    pub sd: f64,
    /// The token's own baseline alone (not blended with its peer group while young).
    pub own: bool,
}

/// Surprise (nats) past which a drop's evidence grows only logarithmically.
pub const DROP_KNEE: f64 = 12.0;

/// A drop's tail probability with its surprise past [`DROP_KNEE`] grown logarithmically: a
/// token quieter than usual (or silent) says that something changed, not that someone abuses
/// it, so a drop alone ranks (a deeper one higher, strictly) but does not page; with other
/// evidence it adds.
fn drop_p(p: f64) -> f64 {
    let s = -p.max(1e-300).ln();
    if s <= DROP_KNEE {
        p
    } else {
        // The scoring's own soft cap, applied to the surprise before it becomes evidence.
        (-crate::score::soft_cap(s, DROP_KNEE)).exp()
    }
}

/// Rate model parameters.
#[derive(Debug, Clone)]
pub struct RateModel {
    recent_alpha: f64,
    level_alpha: f64,
    season_days: f64,
    min_expected: f64,
    warmup: f64,
    adopt_windows: i16,
    min_drop_expected: f64,
    drop_weight: f64,
}

impl RateModel {
    /// From configuration.
    pub fn new(cfg: &Config) -> Self {
        let r = &cfg.rate;
        let w = cfg.window.size.ms.max(1);
        RateModel {
            recent_alpha: Ewma::alpha(r.short_half_life),
            level_alpha: Ewma::alpha(r.long_half_life),
            season_days: r.season_half_life.ms as f64 / 86_400_000.0,
            min_expected: r.min_expected,
            warmup: r.warmup_windows.max(1.0),
            adopt_windows: (r.adopt_after.ms / w).clamp(1, i16::MAX as i64) as i16,
            min_drop_expected: r.min_drop_expected,
            drop_weight: r.drop_weight,
        }
    }

    /// Expected count of the window starting at `ctx.start`: the token's level and rhythm,
    /// blended with its peer group's level while it is young (cold start). `None` for a
    /// token with no history and no group.
    pub fn expectation(&self, st: &RateState, ctx: &Ctx) -> Option<Expectation> {
        self.expectation_with(st, ctx, st.season(ctx.start))
    }

    /// [`Self::expectation`] with the rhythm factor `season` (log).
    fn expectation_with(&self, st: &RateState, ctx: &Ctx, season: f64) -> Option<Expectation> {
        let own_w = (st.n as f64 / self.warmup).min(1.0);
        let own = st.level as f64 + season;
        let (ln_mean, disp, spread) = match ctx.group {
            Some(g) if own_w < 1.0 && g.rate_mean > 0.0 => {
                let g_ln = g.rate_mean.ln();
                let g_disp = (g.rate_var / g.rate_mean).max(0.01);
                let m = if st.n == 0 {
                    g_ln
                } else {
                    own_w * own + (1.0 - own_w) * g_ln
                };
                let d = own - g_ln;
                let disp = own_w * st.disp as f64 + (1.0 - own_w) * g_disp;
                (m, disp, (1.0 - own_w) * d * d)
            }
            _ if st.n == 0 => return None,
            // Young and alone: its own few windows, with their spread widened.
            _ => (own, st.disp as f64, 1.0 - own_w),
        };
        let mean = ln_mean.exp().max(self.min_expected);
        // Never finer than one call: a token that always made exactly one call has not
        // shown that three is extreme.
        let floor = 1.0 / ((mean + 0.5) * (mean + 0.5));
        let sd = ((disp / (mean + 0.5)).max(floor) + spread).sqrt();
        Some(Expectation {
            mean,
            sd,
            own: spread == 0.0,
        })
    }

    /// Standardised residual of `count` against `e`: on the log scale, and for rises of a
    /// token past its warm-up also as a Pearson residual in calls (quasi-Poisson with the token's dispersion, never
    /// tighter than Poisson), whichever is larger. The log scale alone compresses a burst on
    /// a quiet token (40 calls where 1 is usual is a few log units); the learned tails see
    /// this same statistic, so it stays calibrated to the token.
    fn z(count: f64, e: &Expectation, disp: f32) -> f64 {
        let z = ((count + 0.5).ln() - (e.mean + 0.5).ln()) / e.sd;
        if z > 0.0 && e.own {
            let pearson = (count - e.mean) / (e.mean * (disp as f64).max(1.0)).sqrt();
            z.max(pearson)
        } else {
            z
        }
    }

    /// Tail probability of a window with `count` calls (rises and drops alike), the
    /// expectation and the standardised residual.
    pub fn surprise(
        &self,
        st: &RateState,
        count: f64,
        ctx: &Ctx,
    ) -> Option<(f64, Expectation, f64)> {
        self.surprise_retried(st, count, 0.0, ctx)
    }

    /// [`Self::surprise`] of a window in which `retried` calls failed on the server's side
    /// (5xx). A rise is judged on the calls that did not: a client retries what failed, so
    /// a storm of retries during an outage is not demand (the 5xx themselves are the error
    /// model's business), while a burst of calls that are answered stands out in full.
    pub fn surprise_retried(
        &self,
        st: &RateState,
        count: f64,
        retried: f64,
        ctx: &Ctx,
    ) -> Option<(f64, Expectation, f64)> {
        let e = self.expectation(st, ctx)?;
        // A rise is judged against the busier of the neighbouring half hours, a drop
        // against the quieter (see `season_range`); a count between the two is no surprise.
        let (lo, hi) = st.season_range(ctx.start);
        let (e, z) = if count > e.mean {
            let up = (count - retried).max(e.mean);
            let e = self.expectation_with(st, ctx, hi)?;
            (e, Self::z(up, &e, st.disp).max(0.0))
        } else if count < e.mean {
            let e = self.expectation_with(st, ctx, lo)?;
            (e, Self::z(count, &e, st.disp).min(0.0))
        } else {
            (e, 0.0)
        };
        let p = if z >= 0.0 {
            let body = st.up.p_std(z);
            if body < BURST_P {
                (body + st.burst_p(z, ctx.start)).min(1.0)
            } else {
                body
            }
        } else if e.mean >= self.min_drop_expected {
            drop_p(st.down.p(-z).powf(self.drop_weight))
        } else {
            1.0
        };
        Some((p, e, z))
    }

    /// Would a window with no call at all be surprising next (at `ctx.start`)? A token is
    /// watched for silence only where a drop can mean something.
    ///
    /// Silence that has lasted `adopt-after` is not adopted as a new level of zero (traffic
    /// that comes back at its old level is not a burst); the token is taken to have stopped
    /// and is no longer watched until it calls again.
    pub fn expects_traffic(&self, st: &RateState, ctx: &Ctx) -> bool {
        st.run > -self.adopt_windows
            && st.n as f64 >= self.warmup
            && ((st.level as f64 + st.season_range(ctx.start).0).exp()).max(self.min_expected)
                >= self.min_drop_expected
    }

    /// Follow a window whether or not it is learned: the recent level, the run of windows
    /// on one side, and adoption of a lasting change (not while `held`: an operator
    /// confirmed an incident, so the old baseline stays).
    /// `scored`: the window's (p, z) as [`Model::score`] found them with this same state, if
    /// it was scored (saves computing the expectation again).
    pub fn track(
        &self,
        st: &mut RateState,
        w: &WindowAgg,
        ctx: &Ctx,
        held: bool,
        scored: Option<(f64, f64)>,
    ) {
        let c = w.count as f64;
        if st.n == 0 {
            return;
        }
        let y = (c + 0.5).ln() as f32 - st.season(ctx.start) as f32;
        if w.count > 0 {
            st.recent += (self.recent_alpha as f32) * (y - st.recent);
        }
        let Some((p, z)) = scored.or_else(|| self.surprise(st, c, ctx).map(|(p, _, z)| (p, z)))
        else {
            return;
        };
        // The tails learn from every window, calm or quarantined: how often this token's
        // windows look odd is exactly what they calibrate, and a token whose spikes recur
        // must learn that they do (one incident moves them only a little: winsorised, slow).
        // Not in a token's first day: its hour factors are still being learned, and those
        // residuals say nothing about its tails.
        // Nor while an operator-confirmed incident holds the token.
        if !held && ctx.start - ctx.first_seen >= 86_400_000 {
            // Only a rise can be a burst: the tail is not consulted for a drop.
            let body = if z > 0.0 { st.up.p_std(z) } else { 1.0 };
            st.learn_bursts(z, body, ctx.start, self.level_alpha);
            if z >= 0.0 {
                st.up.update(z, self.level_alpha);
            } else {
                st.down.update(-z, self.level_alpha);
            }
        }
        let side: i16 = if p < ctx.cfg.score.quiet_p {
            if z > 0.0 {
                1
            } else {
                -1
            }
        } else {
            0
        };
        st.run = match side {
            0 => 0,
            s if st.run.signum() == s => st.run.saturating_add(s),
            s => s,
        };
        if w.count == 0 {
            // A silent window never moves the recent level toward zero for adoption: see
            // `expects_traffic`. It still counts in the run (that ends the watch).
            return;
        }
        if !held && st.run.unsigned_abs() as i16 >= self.adopt_windows {
            st.level = st.recent;
            st.run = 0;
        }
    }
}

impl Model for RateModel {
    type State = RateState;

    fn score(&self, st: &RateState, w: &WindowAgg, ctx: &Ctx, out: &mut Scratch) {
        let c = w.count as f64;
        out.features[feature::LOG_COUNT] = c.ln_1p() as f32;
        let retried = w.status[class::SERVER] as f64;
        let Some((p, e, z)) = self.surprise_retried(st, c, retried, ctx) else {
            return;
        };
        out.features[feature::RATE_Z] = z as f32;
        out.rate = Some((p, z));
        // A change that goes on is flagged when it starts and fades toward its adoption
        // (`adopt-after`): each window of a run on the same side speaks with less of its
        // surprise, down to a quarter, so one lasting shift is one alert, not an hour of
        // them, while a burst far past anything the token does still pages throughout.
        // Only the signal fades: `out.rate` keeps the full surprise, so the run that
        // leads to adoption is not cut short by its own fade.
        let run = st.run as f64;
        let p = if run != 0.0 && run.signum() == z.signum() {
            p.powf((1.0 - run.abs() / self.adopt_windows as f64).max(0.25))
        } else {
            p
        };
        out.push(Signal::new(SignalKind::Rate, c, e.mean, p));
    }

    fn learn(&self, st: &mut RateState, w: &WindowAgg, ctx: &Ctx) {
        let c = w.count as f64;
        let y = (c + 0.5).ln();
        let how = hour_of_week(ctx.start);
        let (h, d) = (how % 24, how / 24);
        if st.n == 0 {
            st.level = (y - st.season(ctx.start)) as f32;
            st.recent = st.level;
            st.n = 1;
            return;
        }
        if self.expectation(st, ctx).is_none() {
            return;
        }
        let pred = st.level as f64 + st.season(ctx.start);
        let noise = 1.0 / (pred.exp() + 0.5);
        // Winsorised at 2.5 sd so one odd calm window moves the baseline only a little.
        let lim = 2.5 * (noise * st.disp as f64).sqrt();
        let err = (y - pred).clamp(-lim, lim);
        let n = st.n as f64;
        // While the history is short, an average that weighs windows by their age in it
        // (the rate 2/(n+2)) rather than a plain one: the first guesses, made before the
        // factors knew the rhythm, fade instead of staying in the mean for weeks.
        let a_level = self.level_alpha.max(2.0 / (n + 2.0));
        let per_day = (86_400_000.0 / ctx.window_ms as f64).max(1.0);
        // A factor is updated once per window of its hour (weekday): its half-life is
        // `season-half-life` of those updates, and the same age-weighted average as the
        // level's while they are few.
        let days = n / per_day;
        let a_day =
            Ewma::alpha(self.season_days * per_day / 24.0).max(2.0 / (days * per_day / 24.0 + 3.0));
        // A weekday factor sees its weekday's windows in one run a week: it must learn within
        // that run (half-life: one day of windows, so a single odd day, a holiday, moves it
        // half way and the next ordinary one mostly back).
        let a_week = Ewma::alpha(per_day);
        // Backfitting, one step: the fastest component (the weekday) takes its share of the
        // error first, the hour of day what is left, the level the rest, so a weekend does
        // not bleed into the hours of every day.
        let dw = st.week[d] as f64 / FIX as f64 + a_week * err;
        let err = err * (1.0 - a_week);
        let dh = st.day[h] as f64 / FIX as f64 + a_day * err;
        let err = err * (1.0 - a_day);
        let mut level = st.level as f64 + a_level * err;
        st.day[h] = (dh * FIX as f64).clamp(-30_000.0, 30_000.0) as i16;
        st.week[d] = (dw * FIX as f64).clamp(-30_000.0, 30_000.0) as i16;
        // Keep the factors centred, the level holds the mean.
        let md = st.day.iter().map(|&v| v as i32).sum::<i32>() / 24;
        let mw = st.week.iter().map(|&v| v as i32).sum::<i32>() / 7;
        for v in st.day.iter_mut() {
            *v = (*v as i32 - md) as i16;
        }
        for v in st.week.iter_mut() {
            *v = (*v as i32 - mw) as i16;
        }
        level += (md + mw) as f64 / FIX as f64;
        st.level = level as f32;
        let ratio = ((y - pred) * (y - pred) / noise).min(9.0 * st.disp as f64);
        let dv = st.disp as f64 + a_level * (ratio - st.disp as f64);
        st.disp = dv.clamp(0.01, 1000.0) as f32;
        st.n = st.n.saturating_add(1);
    }

    fn encode(st: &RateState, w: &mut Writer) {
        w.f32(st.level);
        w.f32(st.recent);
        w.f32(st.disp);
        for v in st.day.iter().chain(st.week.iter()) {
            w.u16(*v as u16);
        }
        w.u16(st.run as u16);
        st.up.encode(w);
        st.down.encode(w);
        w.u16(st.n);
        w.f32(st.burst_rate);
        w.u8(st.burst_size);
        w.u8(st.burst_at);
    }

    fn decode(r: &mut Reader) -> Result<RateState, DecodeError> {
        let mut st = RateState {
            level: r.f32()?,
            recent: r.f32()?,
            disp: r.f32()?,
            ..Default::default()
        };
        for v in st.day.iter_mut().chain(st.week.iter_mut()) {
            *v = r.u16()? as i16;
        }
        st.run = r.u16()? as i16;
        st.up = Tail::decode(r)?;
        st.down = Quantiles::decode(r)?;
        st.n = r.u16()?;
        st.burst_rate = r.f32()?;
        st.burst_size = r.u8()?;
        st.burst_at = r.u8()?;
        Ok(st)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Global;

    const T0: i64 = 1_772_409_600_000; // Monday 2026-03-02 00:00 UTC
    const W5: i64 = 300_000;

    fn cfg() -> Config {
        let mut c = Config::default();
        c.window.size.ms = W5;
        c
    }

    fn ctx<'a>(cfg: &'a Config, g: &'a Global, start: i64) -> Ctx<'a> {
        Ctx {
            cfg,
            window_ms: W5,
            start,
            windows: 0,
            first_seen: T0,
            global: g,
            registry: None,
            group: None,
            trusted: false,
        }
    }

    fn win(start: i64, n: u32) -> WindowAgg {
        let mut w = WindowAgg::default();
        w.reset(start);
        w.count = n;
        w
    }

    /// A day-shaped token: 20 calls per window at night, 70 from 09h to 18h UTC, 10% noise,
    /// quieter on Sundays.
    fn usual(start: i64, i: u64) -> u32 {
        let how = hour_of_week(start);
        let base = if (9..18).contains(&(how % 24)) {
            70.0
        } else {
            20.0
        };
        let base = if how / 24 == 6 { base * 0.5 } else { base };
        let noise = ((crate::model::sketch::mix(i) >> 11) as f64 / (1u64 << 53) as f64) - 0.5;
        (base * (1.0 + 0.2 * noise)).round() as u32
    }

    fn trained(days: i64) -> (RateModel, RateState, Config) {
        let c = cfg();
        let g = Global::default();
        let m = RateModel::new(&c);
        let mut st = RateState::default();
        for i in 0..days * 288 {
            let s = T0 + i * W5;
            let w = win(s, usual(s, i as u64));
            let cx = ctx(&c, &g, s);
            m.track(&mut st, &w, &cx, false, None);
            m.learn(&mut st, &w, &cx);
        }
        (m, st, c)
    }

    #[test]
    fn daily_and_weekly_shape_learned_and_predicted() {
        let (m, st, c) = trained(15);
        let g = Global::default();
        let t = T0 + 15 * 86_400_000; // a Tuesday
        let day = m
            .expectation(&st, &ctx(&c, &g, t + 10 * 3_600_000))
            .unwrap();
        let night = m.expectation(&st, &ctx(&c, &g, t + 3 * 3_600_000)).unwrap();
        let sunday = m
            .expectation(&st, &ctx(&c, &g, t + 5 * 86_400_000 + 10 * 3_600_000))
            .unwrap();
        // Within 20%: the weekday factors learn a Sunday only over a few Sundays, and what
        // they have not learned yet pulls the hours of the days after it.
        assert!((day.mean - 70.0).abs() < 14.0, "{day:?}");
        assert!((night.mean - 20.0).abs() < 4.0, "{night:?}");
        assert!(sunday.mean < 50.0, "{sunday:?}");
        // The usual day count is calm; 2x of it is not, and 70 at night is not either.
        let at = |n: u32, s: i64| m.surprise(&st, n as f64, &ctx(&c, &g, s)).unwrap().0;
        let ten = t + 10 * 3_600_000;
        assert!(at(72, ten) > 0.05, "{}", at(72, ten));
        assert!(at(140, ten) < 1e-3, "{} {st:?}", at(140, ten));
        assert!(at(210, ten) < 1e-5, "{}", at(210, ten));
        assert!(at(140, ten) < at(100, ten) && at(100, ten) < at(80, ten));
        assert!(
            at(70, t + 3 * 3_600_000) < 1e-3,
            "{}",
            at(70, t + 3 * 3_600_000)
        );
        // A drop to a quarter of the daytime level is scored too.
        assert!(at(17, ten) < 1e-3, "{}", at(17, ten));
    }

    /// Ten days of the usual rhythm, then 48 windows at three times it; which were flagged.
    /// `held`: an operator confirmed an incident (tracked, never adopted); otherwise calm
    /// windows are learned as the engine would.
    fn shifted(held: bool) -> Vec<bool> {
        let (m, mut st, c) = trained(10);
        let g = Global::default();
        let t0 = T0 + 10 * 86_400_000;
        let mut flagged = Vec::new();
        for i in 0..48 {
            let s = t0 + i * W5;
            let n = 3 * usual(s, 9_000 + i as u64);
            let cx = ctx(&c, &g, s);
            let (p, _, _) = m.surprise(&st, n as f64, &cx).unwrap();
            flagged.push(p < 1e-2);
            m.track(&mut st, &win(s, n), &cx, held, None);
            if !held && p >= 1e-2 {
                m.learn(&mut st, &win(s, n), &cx);
            }
        }
        flagged
    }

    /// The rate signal's tail probability in 8 windows at `k` times the usual rhythm.
    fn run_of(k: u32) -> Vec<f64> {
        let (m, mut st, c) = trained(10);
        let g = Global::default();
        let t0 = T0 + 10 * 86_400_000;
        (0..8)
            .map(|i| {
                let s = t0 + i * W5;
                let w = win(s, k * usual(s, 9_000 + i as u64));
                let cx = ctx(&c, &g, s);
                let mut out = Scratch::default();
                m.score(&st, &w, &cx, &mut out);
                m.track(&mut st, &w, &cx, false, out.rate);
                out.signals
                    .iter()
                    .find(|x| x.kind == SignalKind::Rate)
                    .unwrap()
                    .p
            })
            .collect()
    }

    /// A lasting shift is flagged in full when it starts and fades while it lasts; a burst
    /// far past anything the token does keeps paging through the same fade.
    #[test]
    fn a_lasting_shift_fades_while_a_huge_burst_keeps_paging() {
        let shift = run_of(3);
        assert!(shift[0] < 1e-3, "{shift:?}");
        assert!(shift[6] > shift[0].sqrt(), "{shift:?}");
        let burst = run_of(30);
        assert!(burst.iter().all(|&p| p < 1e-6), "{burst:?}");
    }

    /// Days of the usual rhythm from day `from` to `to` (learned), with `burst(day)`'s
    /// windows (start, calls) scored and followed as the engine does (alerting windows are
    /// not learned); the rate's tail probability of each burst window, per day.
    fn with_bursts(
        m: &RateModel,
        st: &mut RateState,
        c: &Config,
        from: i64,
        to: i64,
        burst: impl Fn(i64) -> Vec<(i64, u32)>,
    ) -> Vec<Vec<f64>> {
        let g = Global::default();
        let mut out = Vec::new();
        for d in from..to {
            let bursts = burst(d);
            let mut ps = Vec::new();
            for i in d * 288..(d + 1) * 288 {
                let s = T0 + i * W5;
                let cx = ctx(c, &g, s);
                if let Some(&(_, n)) = bursts.iter().find(|b| b.0 == s) {
                    let w = win(s, n);
                    let mut sc = Scratch::default();
                    m.score(st, &w, &cx, &mut sc);
                    m.track(st, &w, &cx, false, sc.rate);
                    ps.push(sc.rate.unwrap().0);
                } else {
                    let w = win(s, usual(s, i as u64));
                    m.track(st, &w, &cx, false, None);
                    m.learn(st, &w, &cx);
                }
            }
            out.push(ps);
        }
        out
    }

    /// A token that bursts every night (a spike that straddles two windows) pages on its
    /// first nights; once it has shown that bursts of that size are its habit, they are
    /// tempered, while a burst five times larger, one resumed within hours of the latest,
    /// and the same burst on a token that never bursts keep the ordinary tail's verdict.
    #[test]
    fn a_token_s_own_bursts_temper_rises_of_their_size_only() {
        let (m, mut st, c) = trained(10);
        let night = |d: i64, k: u32| {
            let s = T0 + d * 86_400_000 + 3 * 3_600_000;
            vec![(s, 100 * k), (s + W5, 350 * k)]
        };
        let days = with_bursts(&m, &mut st, &c, 10, 15, |d| night(d, 1));
        // The first night and the start of the second: full verdict (one episode is an
        // event, not a habit).
        assert!(
            days[0].iter().all(|&p| p < 1e-12) && days[1][0] < 1e-12,
            "{days:?}"
        );
        // From then on, every window of an episode is judged by the token's bursts: still
        // evidence, far less of it.
        for p in days.iter().flatten().skip(3) {
            assert!(*p > 1e-9 && *p < 1e-2, "{days:?}");
        }
        // Alone, from the third night on, the tempered rises no longer page; five times larger, far past the token's
        // bursts, the episode does.
        let alone = |p: f64| {
            let mut sig = vec![Signal::new(SignalKind::Rate, 0.0, 1.0, p)];
            crate::score::combine(&mut sig, &c.score, &c.weights)
        };
        for p in days[2..].iter().flatten() {
            assert!(alone(*p) < c.score.alert_risk, "{} {days:?}", alone(*p));
        }
        let big = with_bursts(&m, &mut st.clone(), &c, 15, 16, |d| night(d, 5));
        let worst = big[0].iter().copied().fold(1.0, f64::min);
        assert!(
            alone(worst) >= c.score.alert_risk,
            "{} {big:?}",
            alone(worst)
        );
        assert!(big[0].iter().all(|&p| p < 1e-4), "{big:?}");
        // The usual size, resumed four hours after the latest burst: the resumption is
        // judged in full, all of it.
        let resumed = with_bursts(&m, &mut st.clone(), &c, 15, 16, |d| {
            let s = T0 + d * 86_400_000 + 3 * 3_600_000;
            vec![
                (s, 350),
                (s + 4 * 3_600_000, 350),
                (s + 4 * 3_600_000 + W5, 350),
            ]
        });
        let r = &resumed[0];
        assert!(r[0] > 1e-9 && r[1] < 1e-12 && r[2] < 1e-12, "{r:?}");
        // The same night burst on a token with no bursts of its own.
        let (m, mut calm, c) = trained(12);
        let never = with_bursts(&m, &mut calm, &c, 12, 13, |d| night(d, 1));
        assert!(never[0].iter().all(|&p| p < 1e-12), "{never:?}");
    }

    /// A steady token that goes silent is scored (a deep drop), ranks above a milder drop,
    /// and alone does not page; a burst as surprising does.
    #[test]
    fn silence_ranks_but_a_drop_alone_does_not_page() {
        let (m, st, c) = trained(14);
        let g = Global::default();
        // Tuesday 11:00 UTC: 70 calls expected.
        let s = T0 + 15 * 86_400_000 + 11 * 3_600_000;
        let cx = ctx(&c, &g, s);
        assert!(m.expects_traffic(&st, &cx));
        let (silent, e, z) = m.surprise(&st, 0.0, &cx).unwrap();
        assert!(e.mean > 50.0 && z < -5.0, "{e:?} {z}");
        let (half, _, _) = m.surprise(&st, 25.0, &cx).unwrap();
        assert!(silent < half && half < 0.05, "{silent} {half}");
        let w = &c.weights;
        let alone = |p: f64| {
            let mut sig = vec![Signal::new(SignalKind::Rate, 0.0, e.mean, p)];
            crate::score::combine(&mut sig, &c.score, w)
        };
        assert!(alone(silent) < c.score.alert_risk, "{}", alone(silent));
        assert!(alone(silent) > alone(half));
        // Past the knee a drop still grows, strictly, but slowly.
        assert!(drop_p(1e-5) == 1e-5 && drop_p(1e-6) > 1e-6);
        assert!(drop_p(1e-40) < drop_p(1e-20) && drop_p(1e-20) > 1e-8);
        let (burst, _, _) = m.surprise(&st, 700.0, &cx).unwrap();
        assert!(alone(burst) >= c.score.alert_risk, "{}", alone(burst));
    }

    #[test]
    fn level_shift_flagged_then_adopted() {
        // While an operator holds the token, it stays flagged.
        let flagged = shifted(true);
        assert!(flagged.iter().all(|&f| f), "{flagged:?}");
        let flagged = shifted(false);
        assert!(flagged[0]);
        let adopted = flagged.iter().position(|f| !f).unwrap();
        assert!(
            (10..=16).contains(&adopted),
            "adopted after {adopted}: {flagged:?}"
        );
        assert!(flagged[adopted + 4..].iter().all(|f| !f), "{flagged:?}");
    }
}
