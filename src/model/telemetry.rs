//! Telemetry: what the gateway answered. Error fractions per class (401/403, 429, other
//! 4xx, 5xx) with binomial tails, bytes_out per window (bulk export) and mean latency on a
//! log scale, standardised by the token's own moments and judged against the token's own
//! learned tail of those residuals ([`Tail`]): a token whose sizes are heavy-tailed learns
//! a wide tail and stays quiet, a 20x export on a steady token does not.

use super::codec::{Reader, Writer};
use super::sketch::{Ewma, Quantiles};
use super::{feature, tail, Ctx, DecodeError, Model, Scratch, Signal, SignalKind};
use crate::config::Config;
use crate::window::{class, WindowAgg};

const CLASSES: [(usize, SignalKind); 4] = [
    (class::AUTH, SignalKind::AuthErrors),
    (class::LIMITED, SignalKind::RateLimited),
    (class::CLIENT, SignalKind::ClientErrors),
    (class::SERVER, SignalKind::ServerErrors),
];

/// Per-token telemetry state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TelemetryState {
    /// Error fraction per class, in the order auth, 429, other 4xx, 5xx.
    pub errors: [Ewma; 4],
    /// ln(1 + mean bytes_out per call) of a window.
    pub bytes: Ewma,
    /// ln(1 + mean latency ms).
    pub latency: Ewma,
    /// Windows that had a latency.
    pub latency_n: u32,
    /// Learned tail (own quantiles) of the standardised log bytes.
    pub bytes_tail: Quantiles,
    /// Learned tail (own quantiles) of the standardised log latency.
    pub latency_tail: Quantiles,
}

impl Default for TelemetryState {
    fn default() -> Self {
        TelemetryState {
            errors: [Ewma::default(); 4],
            bytes: Ewma::default(),
            latency: Ewma::default(),
            latency_n: 0,
            bytes_tail: Quantiles::STANDARD,
            latency_tail: Quantiles::STANDARD,
        }
    }
}

/// Telemetry parameters.
#[derive(Debug, Clone)]
pub struct TelemetryModel {
    alpha: f64,
    min_rate: f64,
    min_sd: f64,
}

impl TelemetryModel {
    /// From configuration.
    pub fn new(cfg: &Config) -> Self {
        TelemetryModel {
            alpha: Ewma::alpha(cfg.telemetry.half_life),
            min_rate: cfg.telemetry.min_error_rate,
            min_sd: cfg.telemetry.min_log_sd,
        }
    }
}

/// Calls in a window from which its response size leaves out the largest one.
const TRIM_FROM: u32 = 5;

/// Mean bytes_out per call of a window; from [`TRIM_FROM`] calls on, without its largest
/// call. One huge response among many ordinary ones is what a token with heavy-tailed
/// sizes does now and then, and it alone would make the mean look like an export; a bulk
/// export makes many large calls and still moves the trimmed mean. A window of a few calls
/// (a quiet token, an insider's single export) keeps every call.
fn per_call(w: &WindowAgg) -> f64 {
    if w.count >= TRIM_FROM {
        w.bytes.saturating_sub(w.bytes_max) as f64 / (w.count - 1) as f64
    } else {
        w.bytes as f64 / w.count.max(1) as f64
    }
}

impl TelemetryModel {
    /// Standardised log mean response size of the window. Per call, so that a window with
    /// more calls (the rate model's business) is not a second, rhythm-blind bytes signal;
    /// a bulk export of large responses is.
    fn bytes_z(&self, st: &TelemetryState, w: &WindowAgg) -> f64 {
        let x = per_call(w).ln_1p();
        let sd = st.bytes.sd().max(self.min_sd);
        (x - st.bytes.mean as f64) / sd
    }

    /// Standardised log mean latency, once the token has a latency baseline.
    fn latency_z(&self, st: &TelemetryState, w: &WindowAgg) -> Option<f64> {
        let l = w.mean_latency()?;
        if st.latency_n < 10 {
            return None;
        }
        let sd = st.latency.sd().max(self.min_sd);
        Some((l.ln_1p() - st.latency.mean as f64) / sd)
    }
}

impl TelemetryModel {
    /// The tails learn from every window, calm or quarantined (not while an operator holds
    /// the token): a token whose big responses recur must learn that they do.
    pub fn track(&self, st: &mut TelemetryState, w: &WindowAgg, ctx: &Ctx) {
        if w.count == 0 || ctx.windows < 10 {
            return;
        }
        let z = self.bytes_z(st, w);
        st.bytes_tail.update(z, self.alpha);
        if let Some(z) = self.latency_z(st, w) {
            st.latency_tail.update(z, self.alpha);
        }
    }
}

impl Model for TelemetryModel {
    type State = TelemetryState;

    fn score(&self, st: &TelemetryState, w: &WindowAgg, ctx: &Ctx, out: &mut Scratch) {
        let n = w.count as u64;
        for (i, (cls, kind)) in CLASSES.iter().enumerate() {
            let k = w.status[*cls] as u64;
            let expected = (st.errors[i].mean as f64).max(self.min_rate);
            if *cls == class::AUTH {
                out.features[feature::AUTH_EXCESS] = (k as f64 / n as f64 - expected) as f32;
            } else if *cls == class::CLIENT {
                out.features[feature::CLIENT_EXCESS] = (k as f64 / n as f64 - expected) as f32;
            }
            if k == 0 {
                continue;
            }
            let p = tail::binomial_at_least(k, n, expected);
            out.push(Signal::new(*kind, k as f64, expected * n as f64, p));
        }
        if ctx.windows < 10 {
            return;
        }
        let z = self.bytes_z(st, w);
        out.features[feature::BYTES_Z] = z as f32;
        out.push(Signal::new(
            SignalKind::BytesOut,
            per_call(w),
            (st.bytes.mean as f64).exp_m1(),
            st.bytes_tail.p(z),
        ));
        if let Some(z) = self.latency_z(st, w) {
            out.features[feature::LATENCY_Z] = z as f32;
            out.push(Signal::new(
                SignalKind::Latency,
                w.mean_latency().unwrap_or(0.0),
                (st.latency.mean as f64).exp_m1(),
                st.latency_tail.p(z),
            ));
        }
    }

    fn learn(&self, st: &mut TelemetryState, w: &WindowAgg, ctx: &Ctx) {
        let n = w.count.max(1) as f64;
        for (i, (cls, _)) in CLASSES.iter().enumerate() {
            st.errors[i].update(w.status[*cls] as f64 / n, self.alpha, ctx.windows);
        }
        st.bytes
            .update(per_call(w).ln_1p(), self.alpha, ctx.windows);
        if let Some(l) = w.mean_latency() {
            st.latency.update(l.ln_1p(), self.alpha, st.latency_n);
            st.latency_n = st.latency_n.saturating_add(1);
        }
    }

    fn encode(st: &TelemetryState, w: &mut Writer) {
        for e in &st.errors {
            e.encode(w);
        }
        st.bytes.encode(w);
        st.latency.encode(w);
        w.u32(st.latency_n);
        st.bytes_tail.encode(w);
        st.latency_tail.encode(w);
    }

    fn decode(r: &mut Reader) -> Result<TelemetryState, DecodeError> {
        Ok(TelemetryState {
            errors: [
                Ewma::decode(r)?,
                Ewma::decode(r)?,
                Ewma::decode(r)?,
                Ewma::decode(r)?,
            ],
            bytes: Ewma::decode(r)?,
            latency: Ewma::decode(r)?,
            latency_n: r.u32()?,
            bytes_tail: Quantiles::decode(r)?,
            latency_tail: Quantiles::decode(r)?,
        })
    }
}
