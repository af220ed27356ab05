//! Alert policies: which windows become alerts, how often, and what may be done about them.
//! Pure: window scores in, decisions out, time is the windows' event time. One incident is
//! one alert: while a (token, policy) keeps matching within the cooldown, the same alert is
//! updated as it grows instead of a new one being raised.

use std::path::Path;

use rustc_hash::FxHashMap;
use serde::Deserialize;

use crate::config::Duration;
use crate::engine::WindowScore;
use crate::model::SignalKind;

/// What a policy may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Tell (webhook, audit), never act.
    Alert,
    /// Tell and act (revoke), unless the server runs with `--dry-run`.
    Enforce,
}

/// One `[[policy]]` table.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub struct Policy {
    /// Unique name (in alert ids, audit records and metrics).
    pub name: String,
    /// `alert` (default) or `enforce`.
    #[serde(default = "default_mode")]
    pub mode: Mode,
    /// Risk a window must reach, 0..=100.
    #[serde(default)]
    pub min_risk: f64,
    /// Signals that must all be among the window's contributors (empty: any).
    #[serde(default)]
    pub signals: Vec<String>,
    /// Matching windows in a row (adjacent windows of the token) before the policy fires.
    #[serde(default = "one")]
    pub consecutive_windows: u32,
    /// A (token, policy) that matched within this much event time updates its open alert
    /// instead of raising a new one.
    #[serde(default = "default_cooldown")]
    pub cooldown: Duration,
    /// Free text severity, by convention low, medium, high, critical.
    #[serde(default = "default_severity")]
    pub severity: String,
    /// POST the alert here (JSON).
    #[serde(default)]
    pub webhook: Option<String>,
    /// POST a revocation request for the token here (enforce mode only).
    #[serde(default)]
    pub revoke_url: Option<String>,
    /// Name of an environment variable holding the key that signs this policy's calls.
    #[serde(default)]
    pub secret_env: Option<String>,
    /// A file holding the key that signs this policy's calls (one line; keep it chmod 600).
    #[serde(default)]
    pub secret_file: Option<String>,
    /// The signing key, read from `secret_env` or `secret_file` when the policies are
    /// loaded (never printed).
    #[serde(skip)]
    pub secret: Secret,
}

/// A signing key that never shows in logs or debug output.
#[derive(Clone, Default, PartialEq)]
pub struct Secret(pub Option<std::sync::Arc<[u8]>>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Secret(<redacted>)"
        } else {
            "Secret(none)"
        })
    }
}

impl Secret {
    /// Headers that let a receiver verify a call: the unix time in seconds, and
    /// `sha256=` + hex HMAC-SHA256 of `"{timestamp}.{body}"` under the key. `None` without
    /// a key.
    pub fn sign(&self, body: &[u8], unix_s: u64) -> Option<(String, String)> {
        let key = self.0.as_ref()?;
        let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
        let ts = unix_s.to_string();
        let mut ctx = ring::hmac::Context::with_key(&k);
        ctx.update(ts.as_bytes());
        ctx.update(b".");
        ctx.update(body);
        let tag = ctx.sign();
        let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        Some((ts, format!("sha256={hex}")))
    }
}

fn default_mode() -> Mode {
    Mode::Alert
}
fn one() -> u32 {
    1
}
fn default_cooldown() -> Duration {
    Duration { ms: 30 * 60_000 }
}
fn default_severity() -> String {
    "medium".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    policy: Vec<Policy>,
}

/// A policy file problem.
#[derive(Debug, thiserror::Error)]
#[error("{origin}: {reason}")]
pub struct Error {
    /// File (or "embedded").
    pub origin: String,
    /// Why.
    pub reason: String,
}

/// The policies shipped in `models/policies.toml`.
pub const DEFAULT_POLICIES: &str = include_str!("../../models/policies.toml");

/// Parse and check a policy file's text.
pub fn parse(text: &str, origin: &str) -> Result<Vec<Policy>, Error> {
    let err = |reason: String| Error {
        origin: origin.into(),
        reason,
    };
    let f: PolicyFile = toml::from_str(text).map_err(|e| err(e.to_string()))?;
    if f.policy.len() > 64 {
        return Err(err(format!(
            "{} policies; at most 64 are supported",
            f.policy.len()
        )));
    }
    let mut names = std::collections::HashSet::new();
    for p in &f.policy {
        if p.name.trim().is_empty() || !names.insert(p.name.clone()) {
            return Err(err(format!(
                "policy name {:?} is empty or repeated",
                p.name
            )));
        }
        if !(0.0..=100.0).contains(&p.min_risk) {
            return Err(err(format!(
                "policy {}: min_risk must be in 0..=100",
                p.name
            )));
        }
        if p.consecutive_windows == 0 {
            return Err(err(format!(
                "policy {}: consecutive_windows must be >= 1",
                p.name
            )));
        }
        for s in &p.signals {
            if SignalKind::from_name(s).is_none() {
                return Err(err(format!("policy {}: unknown signal {s:?}", p.name)));
            }
        }
        for u in p.webhook.iter().chain(&p.revoke_url) {
            if !(u.starts_with("http://") || u.starts_with("https://"))
                || u.parse::<hyper::Uri>().map_or(true, |x| x.host().is_none())
            {
                return Err(err(format!(
                    "policy {}: {u:?} is not an http:// or https:// URL",
                    p.name
                )));
            }
        }
        if p.secret_env.is_some() && p.secret_file.is_some() {
            return Err(err(format!(
                "policy {}: give secret_env or secret_file, not both",
                p.name
            )));
        }
        if p.revoke_url.is_some() && p.mode != Mode::Enforce {
            tracing::info!(policy = %p.name, "revoke_url set on an alert-mode policy: revocations are only recorded");
        }
    }
    Ok(f.policy)
}

/// Read a policy file.
pub fn load(path: &Path) -> Result<Vec<Policy>, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| Error {
        origin: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let mut policies = parse(&text, &path.display().to_string())?;
    resolve_secrets(&mut policies, &path.display().to_string())?;
    Ok(policies)
}

/// Read each policy's signing key from its `secret_env` or `secret_file` (relative paths
/// are taken from the working directory). The key itself is never part of an error.
pub fn resolve_secrets(policies: &mut [Policy], origin: &str) -> Result<(), Error> {
    let err = |reason: String| Error {
        origin: origin.into(),
        reason,
    };
    for p in policies.iter_mut() {
        let key = if let Some(var) = &p.secret_env {
            Some(
                std::env::var(var)
                    .map_err(|_| err(format!("policy {}: secret_env {var} is not set", p.name)))?,
            )
        } else if let Some(file) = &p.secret_file {
            Some(
                std::fs::read_to_string(file)
                    .map_err(|e| err(format!("policy {}: secret_file {file}: {e}", p.name)))?,
            )
        } else {
            None
        };
        p.secret = match key.map(|k| k.trim().to_string()) {
            Some(k) if k.len() < 16 => {
                return Err(err(format!(
                    "policy {}: the signing key is shorter than 16 characters",
                    p.name
                )))
            }
            Some(k) => Secret(Some(k.into_bytes().into())),
            None => {
                if p.webhook.is_some() || p.revoke_url.is_some() {
                    tracing::warn!(policy = %p.name, "no secret_env/secret_file: its calls are unsigned, receivers cannot tell them from forged ones");
                }
                Secret(None)
            }
        };
    }
    Ok(())
}

/// Fired (new) or updated (grown) alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A new alert.
    Fired,
    /// More matching windows of an open alert.
    Updated,
}

/// What a policy decided about one window.
#[derive(Debug, Clone)]
pub struct Decision {
    /// Fired or updated.
    pub event: Event,
    /// Stable id of the alert (the same for its updates).
    pub alert_id: String,
    /// Index of the policy.
    pub policy: usize,
    /// The window that matched.
    pub score: WindowScore,
    /// First matching window of the alert (epoch ms).
    pub first_window: i64,
    /// Matching windows so far.
    pub windows: u32,
    /// Highest risk so far.
    pub max_risk: f32,
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct Track {
    streak: u32,
    last_start: i64,
    open: Option<Open>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Open {
    id: String,
    first: i64,
    last: i64,
    windows: u32,
    max_risk: f32,
}

/// Policies with their per-(token, policy) state.
pub struct Policies {
    /// The policies, in file order.
    pub list: Vec<Policy>,
    signals: Vec<Vec<SignalKind>>,
    window_ms: i64,
    /// Per token, one track per policy; a token enters on its first matching window.
    state: FxHashMap<std::sync::Arc<str>, Vec<Track>>,
}

impl Policies {
    /// Policies over windows of `window_ms`.
    pub fn new(list: Vec<Policy>, window_ms: i64) -> Self {
        let signals = list
            .iter()
            .map(|p| {
                p.signals
                    .iter()
                    .filter_map(|s| SignalKind::from_name(s))
                    .collect()
            })
            .collect();
        Policies {
            list,
            signals,
            window_ms,
            state: FxHashMap::default(),
        }
    }

    fn matches(&self, i: usize, s: &WindowScore) -> bool {
        let p = &self.list[i];
        f64::from(s.risk) >= p.min_risk
            && self.signals[i]
                .iter()
                .all(|k| s.contributions.iter().any(|c| c.signal == *k))
    }

    /// Forget the state of `tokens` (evicted from the engine).
    pub fn forget(&mut self, tokens: &[std::sync::Arc<str>]) {
        for t in tokens {
            self.state.remove(&**t);
        }
    }

    /// Keep only the state of tokens `keep` says yes to.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.state.retain(|t, _| keep(t));
    }

    /// The per-(token, policy) state as JSON (a cluster partition keeps it beside its
    /// engine snapshot, so a new owner continues open alerts and streaks instead of firing
    /// them again).
    pub fn export(&self) -> serde_json::Value {
        let mut rows: Vec<(&str, &Vec<Track>)> =
            self.state.iter().map(|(t, v)| (&**t, v)).collect();
        rows.sort_by(|a, b| a.0.cmp(b.0));
        serde_json::json!({
            "policies": self.list.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            "state": rows,
        })
    }

    /// Take the state [`Self::export`] wrote. Tracks are matched to policies by name, so a
    /// policy added or removed since only loses (or starts) its own tracks.
    pub fn import(&mut self, v: &serde_json::Value) -> Result<(), String> {
        let names: Vec<String> = serde_json::from_value(v["policies"].clone())
            .map_err(|e| format!("policy state: policies: {e}"))?;
        let rows: Vec<(String, Vec<Track>)> = serde_json::from_value(v["state"].clone())
            .map_err(|e| format!("policy state: state: {e}"))?;
        let at: Vec<Option<usize>> = self
            .list
            .iter()
            .map(|p| names.iter().position(|n| *n == p.name))
            .collect();
        self.state.clear();
        for (token, tracks) in rows {
            let mine = at
                .iter()
                .map(|i| i.and_then(|i| tracks.get(i).cloned()).unwrap_or_default())
                .collect();
            self.state.insert(token.into(), mine);
        }
        Ok(())
    }

    /// Judge one scored window (windows of a token arrive in start order).
    pub fn judge(&mut self, s: &WindowScore) -> Vec<Decision> {
        let mut out = Vec::new();
        let n = self.list.len();
        // One look-up per window; most windows match nothing for a token never matched.
        let mut hits = 0u64;
        for i in 0..n.min(64) {
            if self.matches(i, s) {
                hits |= 1 << i;
            }
        }
        let tracks = if hits == 0 {
            match self.state.get_mut(&*s.token) {
                Some(t) => t,
                None => return out,
            }
        } else {
            self.state
                .entry(s.token.clone())
                .or_insert_with(|| vec![Track::default(); n])
        };
        for (i, t) in tracks.iter_mut().enumerate() {
            if hits & (1 << i) == 0 {
                t.streak = 0;
                continue;
            }
            let window_ms = self.window_ms;
            let (need, cooldown) = (self.list[i].consecutive_windows, self.list[i].cooldown.ms);
            let adjacent = t.streak > 0 && s.start == t.last_start.saturating_add(window_ms);
            t.streak = if adjacent { t.streak + 1 } else { 1 };
            t.last_start = s.start;
            if t.streak < need {
                continue;
            }
            let within = t
                .open
                .as_ref()
                .is_some_and(|o| s.start.saturating_sub(o.last) <= cooldown);
            let event = if within {
                let o = t.open.as_mut().expect("checked above");
                o.last = s.start;
                o.windows += 1;
                o.max_risk = o.max_risk.max(s.risk);
                Event::Updated
            } else {
                let id = alert_id(&s.token, &self.list[i].name, s.start);
                t.open = Some(Open {
                    id,
                    first: s.start,
                    last: s.start,
                    windows: 1,
                    max_risk: s.risk,
                });
                Event::Fired
            };
            let o = t.open.as_ref().expect("set above");
            out.push(Decision {
                event,
                alert_id: o.id.clone(),
                policy: i,
                score: s.clone(),
                first_window: o.first,
                windows: o.windows,
                max_risk: o.max_risk,
            });
        }
        out
    }
}

/// Stable alert id: the same (token, policy, first window) always gives the same id.
pub fn alert_id(token: &str, policy: &str, first_window: i64) -> String {
    let key = crate::window::text_key(&format!("{token}\0{policy}\0{first_window}"));
    format!("al-{key:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Contribution;

    fn window(start_min: i64, risk: f32, signal: SignalKind) -> WindowScore {
        WindowScore {
            token: "t".into(),
            start: start_min * 60_000,
            events: 10,
            risk,
            alert: risk >= 50.0,
            learned: false,
            labelled: 0,
            kind: None,
            contributions: vec![Contribution {
                signal,
                observed: 1.0,
                expected: 0.0,
                p: 1e-6,
                evidence: 5.0,
                reason: "x".into(),
            }],
            confidence: 1.0,
            agents: Default::default(),
        }
    }

    fn policies(text: &str) -> Policies {
        Policies::new(parse(text, "test").unwrap(), 60_000)
    }

    #[test]
    fn fires_after_n_consecutive_windows_and_not_before() {
        let mut p =
            policies("[[policy]]\nname = \"burst\"\nmin_risk = 80\nconsecutive_windows = 3\n");
        let r = |m| window(m, 90.0, SignalKind::Rate);
        assert!(p.judge(&r(0)).is_empty());
        assert!(p.judge(&r(1)).is_empty());
        let d = p.judge(&r(2));
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].event, Event::Fired);
        // A gap breaks the streak: the next alert needs three in a row again... but within the
        // cooldown the open alert is updated, not raised anew.
        assert!(p.judge(&r(10)).is_empty());
        assert!(p.judge(&r(11)).is_empty());
        let u = p.judge(&r(12));
        assert_eq!(
            (u[0].event, u[0].alert_id.clone()),
            (Event::Updated, d[0].alert_id.clone())
        );
        // A calm window resets the streak.
        assert!(p.judge(&window(13, 10.0, SignalKind::Rate)).is_empty());
        assert!(p.judge(&r(14)).is_empty());
    }

    /// A new owner that takes the exported state goes on as the old one would have: the
    /// open alert grows, a streak in progress completes; a policy it does not have is
    /// dropped, one the old owner did not have starts empty.
    #[test]
    fn exported_state_continues_open_alerts_and_streaks() {
        let text = "[[policy]]\nname = \"any\"\nmin_risk = 50\ncooldown = \"30m\"\n\
                    [[policy]]\nname = \"burst\"\nmin_risk = 80\nconsecutive_windows = 3\n";
        let mut old = policies(text);
        let a = old.judge(&window(0, 90.0, SignalKind::Rate));
        assert_eq!(a.len(), 1);
        assert!(old.judge(&window(1, 90.0, SignalKind::Rate)).len() == 1);
        let saved = old.export();
        let mut new = policies(text);
        new.import(&saved).unwrap();
        let mut cold = policies(text);
        let next = window(2, 90.0, SignalKind::Rate);
        let (n, o, c) = (new.judge(&next), old.judge(&next), cold.judge(&next));
        assert_eq!(n.len(), 2, "the streak of three completes");
        assert_eq!(
            n.iter()
                .map(|d| (d.event, d.alert_id.clone(), d.windows))
                .collect::<Vec<_>>(),
            o.iter()
                .map(|d| (d.event, d.alert_id.clone(), d.windows))
                .collect::<Vec<_>>()
        );
        assert_eq!(
            (n[0].event, &n[0].alert_id),
            (Event::Updated, &a[0].alert_id)
        );
        assert_eq!(c.len(), 1, "without the state: a new alert, no streak");
        assert_ne!(c[0].alert_id, a[0].alert_id);
        // Matched by name: a renamed policy starts empty, the other keeps its tracks.
        let mut other = policies(
            "[[policy]]\nname = \"burst2\"\nmin_risk = 80\nconsecutive_windows = 3\n\
             [[policy]]\nname = \"any\"\nmin_risk = 50\ncooldown = \"30m\"\n",
        );
        other.import(&saved).unwrap();
        let d = other.judge(&next);
        assert_eq!(d.len(), 1);
        assert_eq!(
            (d[0].event, &d[0].alert_id),
            (Event::Updated, &a[0].alert_id)
        );
        assert!(policies(text)
            .import(&serde_json::json!({"policies": 3}))
            .is_err());
    }

    #[test]
    fn cooldown_dedups_then_a_new_alert_after_it() {
        let mut p = policies("[[policy]]\nname = \"any\"\nmin_risk = 50\ncooldown = \"30m\"\n");
        let a = p.judge(&window(0, 60.0, SignalKind::NewCountry));
        let b = p.judge(&window(20, 70.0, SignalKind::NewCountry));
        let c = p.judge(&window(49, 70.0, SignalKind::NewCountry));
        let d = p.judge(&window(120, 70.0, SignalKind::NewCountry));
        assert_eq!(a[0].event, Event::Fired);
        assert_eq!((b[0].event, b[0].windows), (Event::Updated, 2));
        assert_eq!(b[0].alert_id, a[0].alert_id);
        assert_eq!(c[0].alert_id, a[0].alert_id);
        assert_eq!(d[0].event, Event::Fired);
        assert_ne!(d[0].alert_id, a[0].alert_id);
    }

    #[test]
    fn signal_rules_and_file_errors() {
        let mut p = policies(
            "[[policy]]\nname = \"scope\"\nsignals = [\"scope_violation\"]\nseverity = \"high\"\nmode = \"enforce\"\n",
        );
        assert!(p.judge(&window(0, 99.0, SignalKind::Rate)).is_empty());
        assert_eq!(
            p.judge(&window(1, 5.0, SignalKind::ScopeViolation)).len(),
            1
        );
        assert!(parse("[[policy]]\nname = \"x\"\nsignals = [\"nope\"]\n", "f").is_err());
        assert!(parse("[[policy]]\nname = \"x\"\nmin_risk = 120\n", "f").is_err());
        assert!(parse("[[policy]]\nname = \"x\"\n[[policy]]\nname = \"x\"\n", "f").is_err());
        assert!(parse("[[policy]]\nname = \"x\"\ncolour = 1\n", "f").is_err());
        assert!(parse("[[policy]]\nname = \"x\"\nwebhook = \"ftp://a\"\n", "f").is_err());
        assert!(!parse(DEFAULT_POLICIES, "embedded").unwrap().is_empty());
    }
}
