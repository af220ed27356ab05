//! Telemetry: what the gateway answered. Error fractions per class (401/403, 429, other
//! 4xx, 5xx) with binomial tails, bytes_out per window (bulk export) and mean latency on a
//! log scale with normal tails.

use super::codec::{Reader, Writer};
use super::sketch::Ewma;
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
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TelemetryState {
    /// Error fraction per class, in the order auth, 429, other 4xx, 5xx.
    pub errors: [Ewma; 4],
    /// ln(1 + bytes_out per window).
    pub bytes: Ewma,
    /// ln(1 + mean latency ms).
    pub latency: Ewma,
    /// Windows that had a latency.
    pub latency_n: u32,
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
        let x = (w.bytes as f64).ln_1p();
        let sd = st.bytes.sd().max(self.min_sd);
        let z = (x - st.bytes.mean as f64) / sd;
        out.features[feature::BYTES_Z] = z as f32;
        out.push(Signal::new(
            SignalKind::BytesOut,
            w.bytes as f64,
            (st.bytes.mean as f64).exp_m1(),
            tail::normal_above(z),
        ));
        if let Some(l) = w.mean_latency() {
            if st.latency_n >= 10 {
                let x = l.ln_1p();
                let sd = st.latency.sd().max(self.min_sd);
                let z = (x - st.latency.mean as f64) / sd;
                out.features[feature::LATENCY_Z] = z as f32;
                out.push(Signal::new(
                    SignalKind::Latency,
                    l,
                    (st.latency.mean as f64).exp_m1(),
                    tail::normal_above(z),
                ));
            }
        }
    }

    fn learn(&self, st: &mut TelemetryState, w: &WindowAgg, ctx: &Ctx) {
        let n = w.count.max(1) as f64;
        for (i, (cls, _)) in CLASSES.iter().enumerate() {
            st.errors[i].update(w.status[*cls] as f64 / n, self.alpha, ctx.windows);
        }
        st.bytes
            .update((w.bytes as f64).ln_1p(), self.alpha, ctx.windows);
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
        })
    }
}
