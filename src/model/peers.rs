//! Peers: each token's long-run usage vector (hashed endpoint shares and country shares),
//! k-means peer groups over those vectors (linfa-clustering), and two distances of the
//! current window's vector: from the token's own vector (a shift in its endpoint / geo
//! mix) and from its peer group's centroid. New tokens take their peer group's baseline
//! (rate, distance) until they have history of their own (cold start).

use linfa::prelude::*;
use linfa_clustering::KMeans;
use ndarray::Array2;
use rand_xoshiro::rand_core::SeedableRng;
use rand_xoshiro::Xoshiro256Plus;

use super::codec::{Reader, Writer};
use super::sketch::Ewma;
use super::{feature, tail, Ctx, DecodeError, Model, Scratch, Signal, SignalKind};
use crate::config::Config;
use crate::window::WindowAgg;

/// Dimensions of endpoint shares.
pub const EP_DIMS: usize = 24;
/// Dimensions of country shares.
pub const GEO_DIMS: usize = 8;
/// Length of a usage vector.
pub const DIMS: usize = EP_DIMS + GEO_DIMS;
/// Calls a window needs before its endpoint / geo mix is compared.
pub const MIX_MIN_CALLS: u32 = 10;
/// No peer group assigned.
pub const NO_GROUP: u8 = u8::MAX;
const SCALE: f32 = 60_000.0;

/// A usage vector: endpoint part and country part, each summing to 1 (or all zero).
pub type Usage = [f32; DIMS];

/// The usage vector of one window.
pub fn window_usage(w: &WindowAgg) -> Usage {
    let mut v = [0.0f32; DIMS];
    let n: u32 = w.endpoints.items.iter().map(|x| x.1).sum();
    for &(k, c) in &w.endpoints.items {
        v[(k % EP_DIMS as u64) as usize] += c as f32 / n.max(1) as f32;
    }
    let g: u32 = w.countries.items.iter().map(|x| x.1).sum();
    for &(k, c) in &w.countries.items {
        v[EP_DIMS + (crate::model::sketch::mix(k) % GEO_DIMS as u64) as usize] +=
            c as f32 / g.max(1) as f32;
    }
    v
}

/// Distance in 0..=1: total variation of the endpoint part, blended with that of the
/// country part when both sides have one.
pub fn distance(a: &Usage, b: &Usage) -> f64 {
    let tv = |r: std::ops::Range<usize>| -> (f64, bool) {
        let (mut d, mut sa, mut sb) = (0.0f64, 0.0f64, 0.0f64);
        for i in r {
            d += (a[i] - b[i]).abs() as f64;
            sa += a[i] as f64;
            sb += b[i] as f64;
        }
        (0.5 * d, sa > 0.0 && sb > 0.0)
    };
    let (de, _) = tv(0..EP_DIMS);
    let (dg, has_geo) = tv(EP_DIMS..DIMS);
    if has_geo {
        0.75 * de + 0.25 * dg
    } else {
        de
    }
}

/// Per-token peer state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PeerState {
    /// Long-run usage vector, quantised.
    pub usage: [u16; DIMS],
    /// Peer group, or [`NO_GROUP`].
    pub group: u8,
    /// Distance of its windows from its own vector.
    pub d_own: Ewma,
    /// Distance of its windows from its group's centroid.
    pub d_peer: Ewma,
    /// Windows with enough calls to measure a mix.
    pub mix_n: u32,
}

impl Default for PeerState {
    fn default() -> Self {
        PeerState {
            usage: [0; DIMS],
            group: NO_GROUP,
            d_own: Ewma::default(),
            d_peer: Ewma::default(),
            mix_n: 0,
        }
    }
}

impl PeerState {
    /// The long-run usage vector.
    pub fn usage(&self) -> Usage {
        let mut u = [0.0f32; DIMS];
        for (d, s) in u.iter_mut().zip(self.usage.iter()) {
            *d = *s as f32 / SCALE;
        }
        u
    }
}

/// A fitted peer group.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupStats {
    /// Centroid usage vector.
    pub centroid: Usage,
    /// Members at fit time.
    pub members: u32,
    /// Typical window distance from the centroid.
    pub dist_mean: f64,
    /// Its spread.
    pub dist_sd: f64,
    /// Members' mean requests per active window.
    pub rate_mean: f64,
    /// Members' variance of requests per active window.
    pub rate_var: f64,
}

/// All peer groups.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerGroups {
    /// Groups by id.
    pub groups: Vec<GroupStats>,
}

/// One token's contribution to a fit.
#[derive(Debug, Clone)]
pub struct PeerPoint {
    /// Token id (sorting key: fits must not depend on shard layout).
    pub token: std::sync::Arc<str>,
    /// Long-run usage.
    pub usage: Usage,
    /// Own distance mean.
    pub d_own: f64,
    /// Rate mean.
    pub rate_mean: f64,
    /// Rate variance.
    pub rate_var: f64,
}

impl PeerGroups {
    /// k-means over the points (sorted by token for determinism).
    pub fn fit(points: &mut [PeerPoint], k: usize, seed: u64) -> Option<PeerGroups> {
        if points.len() < 2 {
            return None;
        }
        points.sort_by(|a, b| a.token.cmp(&b.token));
        let k = k.min(points.len() / 2).max(1);
        let mut data = Array2::<f64>::zeros((points.len(), DIMS));
        for (i, p) in points.iter().enumerate() {
            for j in 0..DIMS {
                data[[i, j]] = p.usage[j] as f64;
            }
        }
        let ds = DatasetBase::from(data.clone());
        let model = KMeans::params_with_rng(k, Xoshiro256Plus::seed_from_u64(seed))
            .max_n_iterations(100)
            .tolerance(1e-6)
            .fit(&ds)
            .ok()?;
        let c = model.centroids();
        let mut groups: Vec<GroupStats> = (0..c.nrows())
            .map(|g| {
                let mut centroid = [0.0f32; DIMS];
                for j in 0..DIMS {
                    centroid[j] = c[[g, j]] as f32;
                }
                GroupStats {
                    centroid,
                    members: 0,
                    dist_mean: 0.0,
                    dist_sd: 0.0,
                    rate_mean: 0.0,
                    rate_var: 0.0,
                }
            })
            .collect();
        let pg = PeerGroups {
            groups: groups.clone(),
        };
        let mut dists: Vec<Vec<f64>> = vec![Vec::new(); groups.len()];
        for p in points.iter() {
            let g = pg.nearest(&p.usage);
            let d = distance(&p.usage, &groups[g].centroid) + p.d_own;
            dists[g].push(d);
            let s = &mut groups[g];
            s.members += 1;
            s.rate_mean += p.rate_mean;
            s.rate_var += p.rate_var;
        }
        for (s, d) in groups.iter_mut().zip(dists) {
            if s.members == 0 {
                continue;
            }
            let n = s.members as f64;
            s.rate_mean /= n;
            s.rate_var /= n;
            let mean = d.iter().sum::<f64>() / n;
            let var = d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
            s.dist_mean = mean;
            s.dist_sd = var.sqrt();
        }
        Some(PeerGroups { groups })
    }

    /// Nearest group to a usage vector.
    pub fn nearest(&self, u: &Usage) -> usize {
        let mut best = (f64::MAX, 0);
        for (i, g) in self.groups.iter().enumerate() {
            let d: f64 = g
                .centroid
                .iter()
                .zip(u.iter())
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum();
            if d < best.0 {
                best = (d, i);
            }
        }
        best.1
    }
}

/// Peer parameters.
#[derive(Debug, Clone)]
pub struct PeerModel {
    alpha: f64,
    min_windows: f64,
}

impl PeerModel {
    /// From configuration.
    pub fn new(cfg: &Config) -> Self {
        PeerModel {
            alpha: Ewma::alpha(200.0),
            min_windows: cfg.peers.min_windows,
        }
    }

    /// Windows a token needs before it joins a fit.
    pub fn min_windows(&self) -> f64 {
        self.min_windows
    }
}

impl Model for PeerModel {
    type State = PeerState;

    fn score(&self, st: &PeerState, w: &WindowAgg, ctx: &Ctx, out: &mut Scratch) {
        if w.count < MIX_MIN_CALLS {
            // A handful of calls says nothing about a mix: one call is "100% one endpoint".
            return;
        }
        let v = window_usage(w);
        if st.mix_n >= 10 {
            let d = distance(&v, &st.usage());
            let sd = st.d_own.sd().max(0.05);
            let z = (d - st.d_own.mean as f64) / sd;
            out.features[feature::MIX_Z] = z as f32;
            out.push(Signal::new(
                SignalKind::EndpointMix,
                d,
                st.d_own.mean as f64,
                tail::normal_above(z),
            ));
        }
        if let Some(g) = ctx.group {
            let d = distance(&v, &g.centroid);
            let (mean, sd) = if (st.mix_n as f64) >= self.min_windows {
                (st.d_peer.mean as f64, st.d_peer.sd())
            } else {
                (g.dist_mean, g.dist_sd)
            };
            let z = (d - mean) / sd.max(0.05);
            out.push(Signal::new(
                SignalKind::PeerDistance,
                d,
                mean,
                tail::normal_above(z),
            ));
        }
    }

    fn learn(&self, st: &mut PeerState, w: &WindowAgg, ctx: &Ctx) {
        let v = window_usage(w);
        let u = st.usage();
        if w.count >= MIX_MIN_CALLS && ctx.windows > 0 {
            let d = distance(&v, &u);
            st.d_own.update(d, self.alpha, st.mix_n);
            if let Some(g) = ctx.group {
                st.d_peer
                    .update(distance(&v, &g.centroid), self.alpha, st.mix_n);
            }
            st.mix_n = st.mix_n.saturating_add(1);
        }
        let a = self.alpha.max(1.0 / (ctx.windows as f64 + 1.0)) as f32;
        for i in 0..DIMS {
            let x = u[i] + a * (v[i] - u[i]);
            st.usage[i] = (x * SCALE).round().clamp(0.0, u16::MAX as f32) as u16;
        }
    }

    fn encode(st: &PeerState, w: &mut Writer) {
        for x in &st.usage {
            w.u16(*x);
        }
        w.u8(st.group);
        st.d_own.encode(w);
        st.d_peer.encode(w);
        w.u32(st.mix_n);
    }

    fn decode(r: &mut Reader) -> Result<PeerState, DecodeError> {
        let mut st = PeerState::default();
        for x in st.usage.iter_mut() {
            *x = r.u16()?;
        }
        st.group = r.u8()?;
        st.d_own = Ewma::decode(r)?;
        st.d_peer = Ewma::decode(r)?;
        st.mix_n = r.u32()?;
        Ok(st)
    }
}
