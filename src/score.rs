//! Pure scoring: signals -> one risk 0..100 with the contributions that drove it.
//!
//! Each signal carries a calibrated tail probability `p` from its model. Its evidence (in
//! nats) is `weight * min(cap, max(0, -ln p + ln quiet_p))`: a signal is silent until its
//! tail probability is below `quiet_p`, then adds log-likelihood in proportion to how
//! surprising the window is. Evidence adds to the prior log-odds of an incident:
//!
//! ```text
//! risk = 100 * sigmoid( ln(prior / (1 - prior)) + sum_i evidence_i )
//! ```
//!
//! so risk 50 means the signals together outweigh the prior, and the contributions say
//! exactly how much each one pushed. Two refinements keep the risk a ranking that PR curves
//! and threshold sweeps can use: the quiet level is a soft knee (softplus), so a small real
//! surprise adds a small, nonzero evidence instead of none; and above 50 the risk grows as
//! `100 - 50 / (1 + L/2)` of the log-odds `L` (same slope at 50) instead of saturating, so
//! more evidence always gives a strictly higher risk and alerts do not all tie at 100.

use crate::config::{ScoreConfig, Weights};
use crate::event::fmt_ts;
use crate::model::registry::RegistryEntry;
use crate::model::sketch::Tail;
use crate::model::{Signal, SignalKind};
use crate::window::{country_name, prefix_name, Names};

/// Combine signals into a risk (0..=100); fills each signal's `evidence` and sorts the
/// signals by evidence, largest first.
///
/// ```
/// use tokenwatch::config::Config;
/// use tokenwatch::model::{Signal, SignalKind};
///
/// let cfg = Config::default();
/// // Two calls needing a scope the token was never granted: a registry violation.
/// let mut signals = vec![Signal::new(SignalKind::ScopeViolation, 2.0, 0.0, 1e-7)];
/// let risk = tokenwatch::score::combine(&mut signals, &cfg.score, &cfg.weights);
/// assert!(risk >= cfg.score.alert_risk);
/// assert!(signals[0].evidence > 0.0);
/// ```
pub fn combine(signals: &mut [Signal], cfg: &ScoreConfig, weights: &Weights) -> f64 {
    risk(signals, &Scaling::default(), cfg, weights).risk
}

/// A window's risk and the raw statistical surprise its token's calibration learns from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Risk {
    /// Risk 0..=100.
    pub risk: f64,
    /// Evidence (nats) of the calibrated signals before calibration.
    pub surprise: f64,
}

/// Risk (0..100) of posterior log-odds `l`: the posterior probability in percent up to 50,
/// then a slowly saturating rank (see the module doc).
pub fn risk_of(l: f64) -> f64 {
    if l <= 0.0 {
        100.0 / (1.0 + (-l).exp())
    } else {
        100.0 - 50.0 / (1.0 + l / 2.0)
    }
}

/// What the token's situation does to some signals' evidence (bits = positions in
/// [`SignalKind::ALL`], factor applied to their evidence).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Scaling {
    /// A move under way: its novelty evidence decays while it lasts.
    pub moving: Option<(u32, f64)>,
    /// A new place used beside the usual one: its novelty evidence grows while it lasts.
    pub adding: Option<(u32, f64)>,
    /// Operator feedback: signals that raised repeated false alarms for the token.
    pub damped: Option<(u32, f64)>,
    /// The token's own distribution of surprise (see [`calibrate`]).
    pub calibration: Option<Tail>,
}

impl Scaling {
    fn factor(&self, kind: SignalKind) -> f64 {
        let bit = 1u32 << kind.index();
        [self.moving, self.adding, self.damped]
            .into_iter()
            .flatten()
            .filter(|(mask, _)| mask & bit != 0)
            .map(|(_, k)| k)
            .product()
    }
}

/// The risk of a window: every signal's evidence ([`evidence`]) times the token's
/// [`Scaling`], added to the prior log-odds ([`risk_of`]); fills each signal's `evidence` and
/// sorts the signals by it, largest first. The one function from signals to risk that every
/// door's windows go through.
pub fn risk(
    signals: &mut [Signal],
    scaling: &Scaling,
    cfg: &ScoreConfig,
    weights: &Weights,
) -> Risk {
    let mut surprise = 0.0;
    // A new device in a new place: the agent's novelty is not a second coincidence to be
    // discounted on its own (travel keeps the device, a release keeps the place), so with a
    // new country or provider in the window that is itself rare for the token (past the
    // quiet level: not a mobile backend whose clients bring new providers all the time) it
    // speaks without its own quiet floor.
    let placed = signals.iter().any(|s| {
        matches!(s.kind, SignalKind::NewCountry | SignalKind::NewAsn) && s.p < cfg.quiet_p
    });
    for s in signals.iter_mut() {
        let floored = !(s.kind.is_ratio() || placed && s.kind == SignalKind::NewUserAgent);
        s.evidence = evidence_with(s.kind, s.p, floored, cfg, weights) * scaling.factor(s.kind);
        if s.kind.is_calibrated() {
            surprise += s.evidence;
        }
    }
    if let Some(t) = &scaling.calibration {
        if surprise > 0.0 {
            let k = calibrate(surprise, t) / surprise;
            for s in signals.iter_mut().filter(|s| s.kind.is_calibrated()) {
                s.evidence *= k;
            }
        }
    }
    let logit =
        (cfg.prior / (1.0 - cfg.prior)).ln() + signals.iter().map(|s| s.evidence).sum::<f64>();
    signals.sort_by(|a, b| b.evidence.total_cmp(&a.evidence).then(a.kind.cmp(&b.kind)));
    Risk {
        risk: risk_of(logit),
        surprise,
    }
}

/// Statistical evidence `e` (nats) as the token's own history of ordinary windows `t` makes
/// it: what lies past the level those windows reach one time in ten (the tail's quantile).
/// A steady token (level 0) keeps its evidence as it is; a token whose ordinary windows
/// often carry a few nats of surprise needs that much more before it speaks. Only the level
/// is taken off, not the spread: dividing by how far its odd windows usually go was tried and
/// lost more incidents than false alarms (README, calibration).
pub fn calibrate(e: f64, t: &Tail) -> f64 {
    (e - (t.u as f64).max(0.0)).max(0.0)
}

/// Whether a costly model that can add at most `most` nats could lift a window at `risk`
/// past 1% (below that it cannot change anything anyone sees).
pub fn worth_consulting(risk: f64, most: f64) -> bool {
    logit(risk) + most >= logit(1.0)
}

/// A window at this risk alerts.
pub fn alerts(risk: f64, cfg: &ScoreConfig) -> bool {
    risk >= cfg.alert_risk
}

/// How a token's recent history restrains what it learns (see [`learned`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Hold {
    /// Nothing: windows below `learn-max-risk` are learned.
    None,
    /// The token alerted within `score.alert-hold`: only windows below this risk, or a
    /// move being adopted.
    Alerted(f64),
    /// An operator confirmed an incident: only windows below this risk.
    Confirmed(f64),
}

/// Whether a window is learned into the token's baseline: below `learn-max-risk`, or the
/// token is young, or the window completes a move being adopted; shortly after an alert of
/// the token, only calm windows or an adopted move; while an operator's true-positive hold
/// is on, only calm windows (below `hold_learn_below`).
pub fn learned(risk: f64, cfg: &ScoreConfig, young: bool, adopted: bool, hold: Hold) -> bool {
    match hold {
        Hold::Confirmed(below) => risk < below,
        _ if young => true,
        Hold::Alerted(below) => risk < below || adopted,
        Hold::None => risk < cfg.learn_max_risk || adopted,
    }
}

/// Evidence (nats) of one signal with tail probability `p`. Likelihood-ratio signals are
/// evidence as they stand; tail probabilities must first clear the quiet level.
pub fn evidence(kind: SignalKind, p: f64, cfg: &ScoreConfig, weights: &Weights) -> f64 {
    evidence_with(kind, p, !kind.is_ratio(), cfg, weights)
}

/// [`evidence`], with the quiet level's soft knee (`floored`) or counted from zero (a
/// likelihood ratio, or a surprise whose floor another signal of the window already paid).
fn evidence_with(
    kind: SignalKind,
    p: f64,
    floored: bool,
    cfg: &ScoreConfig,
    weights: &Weights,
) -> f64 {
    let surprise = -p.max(1e-300).ln();
    let e = if floored {
        softplus(surprise + cfg.quiet_p.ln())
    } else {
        surprise.max(0.0)
    };
    weights.get(kind) * soft_cap(e, cfg.max_evidence)
}

/// Evidence past `cap` grows only logarithmically: one broken model cannot dominate, yet a
/// more extreme window still ranks higher.
pub(crate) fn soft_cap(e: f64, cap: f64) -> f64 {
    if e <= cap {
        e
    } else {
        cap + (e - cap).ln_1p()
    }
}

/// Evidence below this is too small to name among a window's reasons (it still counts).
pub const SHOWN: f64 = 0.05;

/// ln(1 + e^x), computed without overflow: 0.01 at x = -4.6, ln 2 at 0, x beyond a few.
fn softplus(x: f64) -> f64 {
    if x > 30.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

/// Log-odds of a risk given in percent (the inverse of [`risk_of`]).
pub fn logit(risk: f64) -> f64 {
    if risk > 50.0 {
        2.0 * (50.0 / (100.0 - risk).max(1e-9) - 1.0)
    } else {
        let r = (risk / 100.0).clamp(1e-12, 0.5);
        (r / (1.0 - r)).ln()
    }
}

/// The name of the largest contributor, or `none`.
pub fn top_signal(signals: &[Signal]) -> &'static str {
    signals
        .iter()
        .find(|s| s.evidence >= SHOWN)
        .map_or("none", |s| s.kind.name())
}

/// An age in days as people say it: "5 hours", "2 days".
pub fn human_age(days: f64) -> String {
    if days < 1.0 {
        let h = (days * 24.0).round().max(1.0);
        format!("{h:.0} hour{}", if h == 1.0 { "" } else { "s" })
    } else {
        let d = days.floor();
        format!("{d:.0} day{}", if d == 1.0 { "" } else { "s" })
    }
}

fn human_bytes(b: f64) -> String {
    let units = ["B", "KB", "MB", "GB", "TB"];
    let mut v = b.max(0.0);
    let mut u = 0;
    while v >= 1000.0 && u + 1 < units.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} {}", units[u])
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// A probability as a share people read: "1 in 2,400".
fn share(p: f64) -> String {
    if p.is_nan() || p <= 0.0 {
        return "none".into();
    }
    let n = (1.0 / p).round();
    if n <= 1.0 {
        "all".into()
    } else {
        format!("1 in {n:.0}")
    }
}

fn name_or(names: &Names, key: u64, what: &str) -> String {
    names
        .get(key)
        .map(str::to_string)
        .unwrap_or_else(|| format!("{what} #{key:x}"))
}

/// Plain-words reason for one signal ("first call from BR / AS 28573; token seen only
/// from DE").
pub fn explain(
    s: &Signal,
    window_start: i64,
    names: &Names,
    reg: Option<&RegistryEntry>,
) -> String {
    use SignalKind::*;
    let usual = |f: &dyn Fn(u32) -> String| -> String {
        let v: Vec<String> = s.usual.iter().filter(|k| **k != 0).map(|k| f(*k)).collect();
        v.join(", ")
    };
    match s.kind {
        Rate if s.observed == 0.0 => format!(
            "no calls in a window where {:.1} were expected",
            s.expected
        ),
        Rate if s.observed < s.expected => format!(
            "only {:.0} calls in one window; {:.1} expected at this time",
            s.observed, s.expected
        ),
        Rate => format!(
            "{:.0} calls in one window; {:.1} expected at this time",
            s.observed, s.expected
        ),
        Seasonal => {
            let how = crate::event::hour_of_week(window_start);
            let day = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"][how / 24];
            format!(
                "active {day} {:02}h UTC, when this token is rarely active ({:.1} vs {:.1} active windows per hour on average)",
                how % 24,
                s.observed,
                s.expected
            )
        }
        NewCountry => {
            let u = usual(&|k| country_name(k as u64));
            let mut r = format!("first call from {}", country_name(s.item));
            if !u.is_empty() {
                r.push_str(&format!("; token seen only from {u}"));
            }
            r
        }
        NewAsn => {
            let u = usual(&|k| format!("AS {k}"));
            let mut r = format!("first call from AS {}", s.item);
            if !u.is_empty() {
                r.push_str(&format!("; usually {u}"));
            }
            r
        }
        NewPrefix => format!("first call from network {}", prefix_name(s.item)),
        NewUserAgent => format!(
            "first call with user agent {:?}",
            name_or(names, s.item, "agent")
        ),
        ConcurrentNetworks => format!(
            "called from {:.0} countries at once; expected in {} of this token's windows",
            s.observed,
            share(s.expected)
        ),
        NewEndpoint => {
            let u = usual(&|k| names.get_folded(k).unwrap_or("?").to_string());
            let mut r = format!(
                "first call to {} ({:.0} calls to endpoints never used before)",
                name_or(names, s.item, "endpoint"),
                s.observed
            );
            if !u.is_empty() {
                r.push_str(&format!("; usually {u}"));
            }
            r
        }
        EndpointRarity => format!(
            "{} is used by {:.0} of {:.0} tokens",
            name_or(names, s.item, "endpoint"),
            s.observed,
            s.expected
        ),
        AuthErrors => format!(
            "{:.0} calls refused with 401/403; expected {:.1}",
            s.observed, s.expected
        ),
        RateLimited => format!(
            "{:.0} calls rate-limited (429); expected {:.1}",
            s.observed, s.expected
        ),
        ClientErrors => format!(
            "{:.0} calls failed with 4xx; expected {:.1}",
            s.observed, s.expected
        ),
        ServerErrors => format!(
            "{:.0} calls failed with 5xx; expected {:.1}",
            s.observed, s.expected
        ),
        BytesOut => format!(
            "{} per call in one window; usually {}",
            human_bytes(s.observed),
            human_bytes(s.expected)
        ),
        Latency => format!(
            "mean latency {:.0} ms; usually {:.0} ms",
            s.observed, s.expected
        ),
        EndpointMix if s.item != 0 => format!(
            "{:.0} calls to {} in one window; {:.1} expected from its usual share",
            s.observed,
            name_or(names, s.item, "endpoint"),
            s.expected
        ),
        EndpointMix => format!(
            "endpoint and geo mix {:.2} away from the token's usual (typically {:.2})",
            s.observed, s.expected
        ),
        PeerDistance => format!(
            "usage {:.2} away from its peer group (typically {:.2})",
            s.observed, s.expected
        ),
        Isolation => format!(
            "unusual combination of behaviours (isolation score {:.2}; about 1 in {:.0} normal windows score as high)",
            s.observed,
            1.0 / s.p.max(1e-12)
        ),
        ScopeViolation => {
            let has = reg.map(|r| r.scopes.join(" ")).unwrap_or_default();
            format!(
                "{:.0} calls need scope {} which the token lacks (has: {has})",
                s.observed,
                name_or(names, s.item, "scope")
            )
        }
        EnvMismatch => format!(
            "{:.0} calls served by {}; token belongs to {}",
            s.observed,
            name_or(names, s.item, "env"),
            reg.and_then(|r| r.env.as_deref()).unwrap_or("?")
        ),
        TokenValidity => {
            if s.observed < s.expected {
                format!(
                    "used at {}, before the token was created ({})",
                    fmt_ts(s.observed as i64),
                    fmt_ts(s.expected as i64)
                )
            } else {
                format!(
                    "used at {}, after the token expired ({})",
                    fmt_ts(s.observed as i64),
                    fmt_ts(s.expected as i64)
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn quiet_signals_leave_the_prior() {
        let cfg = Config::default();
        let mut s = vec![Signal::new(SignalKind::Rate, 3.0, 1.0, 0.2)];
        let r = combine(&mut s, &cfg.score, &cfg.weights);
        assert!((r - 100.0 * cfg.score.prior).abs() < 1e-3, "{r}");
        // Small but not nothing: ranks above a window with no signal at all.
        assert!(
            s[0].evidence > 0.0 && s[0].evidence < 0.05,
            "{}",
            s[0].evidence
        );
        assert!(r > 100.0 * cfg.score.prior);
    }

    /// A new user agent is weak on its own (a release brings one to many clients) and a new
    /// provider is weak on its own (a network change); both at once, the provider rare for
    /// the token, is another client: the agent then speaks without its own quiet floor. A
    /// provider the token meets all the time (a mobile backend) does not lift it.
    #[test]
    fn a_new_agent_in_a_rare_new_place_is_not_discounted_twice() {
        let cfg = Config::default();
        let agent = |with: Option<f64>| {
            let mut s = vec![Signal::new(SignalKind::NewUserAgent, 1.0, 1e-3, 1e-3)];
            if let Some(p) = with {
                s.push(Signal::new(SignalKind::NewAsn, 1.0, p, p));
            }
            let r = combine(&mut s, &cfg.score, &cfg.weights);
            let e = s
                .iter()
                .find(|x| x.kind == SignalKind::NewUserAgent)
                .unwrap()
                .evidence;
            (e, r)
        };
        let (alone, r_alone) = agent(None);
        let (rare, r_rare) = agent(Some(1e-3));
        let (common, _) = agent(Some(0.2));
        let w = cfg.weights.get(SignalKind::NewUserAgent);
        assert!((rare - w * 1e-3f64.ln().abs()).abs() < 1e-9, "{rare}");
        assert!(rare > 2.0 * alone, "{alone} {rare}");
        assert_eq!(common, alone);
        assert!(r_rare > r_alone);
    }

    #[test]
    fn strong_signals_raise_risk_and_are_ordered() {
        let cfg = Config::default();
        let mut s = vec![
            Signal::new(SignalKind::NewPrefix, 1.0, 1e-3, 1e-3),
            Signal::new(SignalKind::ScopeViolation, 2.0, 0.0, 1e-7),
        ];
        let r = combine(&mut s, &cfg.score, &cfg.weights);
        assert!(r > cfg.score.alert_risk, "{r}");
        assert_eq!(s[0].kind, SignalKind::ScopeViolation);
        assert_eq!(top_signal(&s), "scope_violation");
        // Monotone: a smaller p never lowers risk.
        let mut t = vec![Signal::new(SignalKind::Rate, 9.0, 1.0, 1e-9)];
        let mut u = vec![Signal::new(SignalKind::Rate, 9.0, 1.0, 1e-5)];
        assert!(
            combine(&mut t, &cfg.score, &cfg.weights) > combine(&mut u, &cfg.score, &cfg.weights)
        );
    }

    #[test]
    fn risk_is_graded_and_never_ties_at_the_top() {
        let cfg = Config::default();
        let mut last = 0.0;
        for p in [0.5, 0.05, 1e-3, 1e-6, 1e-12, 1e-30, 1e-60, 1e-120] {
            let mut s = vec![
                Signal::new(SignalKind::Rate, 9.0, 1.0, p),
                Signal::new(SignalKind::NewCountry, 1.0, 0.0, p),
                Signal::new(SignalKind::AuthErrors, 1.0, 0.0, p),
            ];
            let r = combine(&mut s, &cfg.score, &cfg.weights);
            assert!(r > last, "{p}: {r} <= {last}");
            assert!(r < 100.0);
            last = r;
        }
        for r in [0.01, 10.0, 50.0, 80.0, 99.5] {
            assert!((risk_of(logit(r)) - r).abs() < 1e-6, "{r}");
        }
    }

    #[test]
    fn scaling_lowers_only_the_signals_it_names() {
        let cfg = Config::default();
        let signals = || {
            vec![
                Signal::new(SignalKind::NewCountry, 1.0, 1e-4, 1e-6),
                Signal::new(SignalKind::Rate, 9.0, 1.0, 1e-6),
            ]
        };
        let bit = 1 << SignalKind::NewCountry.index();
        let mut plain = signals();
        let mut damped = signals();
        let r0 = combine(&mut plain, &cfg.score, &cfg.weights);
        let half = Scaling {
            damped: Some((bit, 0.5)),
            ..Default::default()
        };
        let r1 = risk(&mut damped, &half, &cfg.score, &cfg.weights).risk;
        assert!(r0 > r1, "{r0} {r1}");
        let ev = |v: &[Signal], k| v.iter().find(|s| s.kind == k).unwrap().evidence;
        assert_eq!(ev(&plain, SignalKind::Rate), ev(&damped, SignalKind::Rate));
        let (a, b) = (
            ev(&damped, SignalKind::NewCountry),
            ev(&plain, SignalKind::NewCountry),
        );
        assert!((a * 2.0 - b).abs() < 1e-9);
    }

    #[test]
    fn reasons_name_the_items() {
        let names = Names::default();
        let s = Signal::new(SignalKind::NewCountry, 4.0, 1e-4, 1e-4)
            .with_item(crate::window::country_key("BR"))
            .with_usual(&[crate::window::country_key("DE") as u32]);
        assert_eq!(
            explain(&s, 0, &names, None),
            "first call from BR; token seen only from DE"
        );
    }

    /// A token whose ordinary windows often carry surprise needs more of it to page than a
    /// steady one; facts (scope) are never calibrated away, and a steady token is unchanged.
    #[test]
    fn calibration_per_token() {
        let cfg = Config::default();
        let window = || {
            vec![
                Signal::new(SignalKind::Rate, 40.0, 5.0, 1e-8),
                Signal::new(SignalKind::BytesOut, 9e6, 1e5, 1e-6),
            ]
        };
        let steady = crate::model::SurpriseState::default().0;
        let mut noisy = steady;
        for i in 0..3000 {
            // One ordinary window in four carries a few nats of surprise.
            noisy.update(if i % 4 == 0 { 6.0 } else { 0.0 }, 1e-3);
        }
        let with = |t: Tail, mut v: Vec<Signal>| {
            let sc = Scaling {
                calibration: Some(t),
                ..Default::default()
            };
            let r = risk(&mut v, &sc, &cfg.score, &cfg.weights);
            (r, v)
        };
        let plain = combine(&mut window(), &cfg.score, &cfg.weights);
        let (s, _) = with(steady, window());
        let (n, nv) = with(noisy, window());
        assert_eq!(s.risk, plain);
        assert!(n.risk < s.risk, "{n:?} {s:?}");
        // The raw surprise the calibration learns from is the same either way.
        assert_eq!(n.surprise, s.surprise);
        assert!(nv.iter().all(|x| x.evidence >= 0.0));
        // More evidence still ranks higher on the noisy token.
        let (n2, _) = with(
            noisy,
            vec![
                Signal::new(SignalKind::Rate, 80.0, 5.0, 1e-12),
                Signal::new(SignalKind::BytesOut, 9e6, 1e5, 1e-6),
            ],
        );
        assert!(n2.risk > n.risk);
        // A scope violation is a fact: calibration does not touch it.
        let fact = || vec![Signal::new(SignalKind::ScopeViolation, 2.0, 0.0, 1e-7)];
        assert_eq!(
            with(noisy, fact()).0.risk,
            combine(&mut fact(), &cfg.score, &cfg.weights)
        );
        assert!(calibrate(3.0, &steady) == 3.0 && calibrate(3.0, &noisy) < 3.0);
    }
}
