//! Rate: requests per active window, EWMA mean and variance at a short and a long
//! half-life; the tail probability of the count under a Poisson / negative binomial with
//! those moments. Quiet tokens stay calm: the expectation never drops below a floor.

use super::codec::{Reader, Writer};
use super::sketch::Ewma;
use super::{feature, tail, Ctx, DecodeError, Model, Scratch, Signal, SignalKind};
use crate::config::Config;
use crate::window::WindowAgg;

/// Per-token rate state.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RateState {
    /// Fast-moving moments (recent level).
    pub short: Ewma,
    /// Slow-moving moments (long-run level).
    pub long: Ewma,
}

/// Rate model parameters.
#[derive(Debug, Clone)]
pub struct RateModel {
    short_alpha: f64,
    long_alpha: f64,
    min_expected: f64,
    warmup: f64,
}

impl RateModel {
    /// From configuration.
    pub fn new(cfg: &Config) -> Self {
        RateModel {
            short_alpha: Ewma::alpha(cfg.rate.short_half_life),
            long_alpha: Ewma::alpha(cfg.rate.long_half_life),
            min_expected: cfg.rate.min_expected,
            warmup: cfg.rate.warmup_windows.max(1.0),
        }
    }

    /// Expected mean and variance of the count: the token's own long-run moments,
    /// blended with its peer group's while the token is young (cold start).
    pub fn expectation(&self, st: &RateState, ctx: &Ctx) -> Option<(f64, f64)> {
        let own_w = (ctx.windows as f64 / self.warmup).min(1.0);
        let own = (st.long.mean as f64, st.long.var as f64);
        let (mean, var) = match ctx.group {
            Some(g) if own_w < 1.0 => {
                let m = own_w * own.0 + (1.0 - own_w) * g.rate_mean;
                let v = own_w * own.1 + (1.0 - own_w) * g.rate_var;
                (m, v)
            }
            _ if ctx.windows == 0 => return None,
            _ => own,
        };
        let mean = mean.max(self.min_expected);
        Some((mean, var.max(mean)))
    }
}

impl Model for RateModel {
    type State = RateState;

    fn score(&self, st: &RateState, w: &WindowAgg, ctx: &Ctx, out: &mut Scratch) {
        let c = w.count as f64;
        out.features[feature::LOG_COUNT] = c.ln_1p() as f32;
        let Some((mean, var)) = self.expectation(st, ctx) else {
            return;
        };
        out.features[feature::RATE_Z] = ((c - mean) / var.sqrt()) as f32;
        let mut p = tail::count_at_least(c, mean, var);
        if p < 1.0 && ctx.windows >= 10 {
            // Both the recent and the long-run level must find the count extreme, so a
            // legitimate ramp-up (short adapts) and an old quiet spell (long adapts) do
            // not alarm on their own.
            let sm = (st.short.mean as f64).max(self.min_expected);
            let sv = (st.short.var as f64).max(sm);
            p = p.max(tail::count_at_least(c, sm, sv));
        }
        out.push(Signal::new(SignalKind::Rate, c, mean, p));
    }

    fn learn(&self, st: &mut RateState, w: &WindowAgg, ctx: &Ctx) {
        let c = w.count as f64;
        st.short.update(c, self.short_alpha, ctx.windows);
        st.long.update(c, self.long_alpha, ctx.windows);
    }

    fn encode(st: &RateState, w: &mut Writer) {
        st.short.encode(w);
        st.long.encode(w);
    }

    fn decode(r: &mut Reader) -> Result<RateState, DecodeError> {
        Ok(RateState {
            short: Ewma::decode(r)?,
            long: Ewma::decode(r)?,
        })
    }
}
