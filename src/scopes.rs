//! Least privilege: per token, the scopes the registry grants that its calls did not use in
//! the last N days, and the scopes its calls needed that it was not granted; in aggregate,
//! how much granted scope could be removed. Read from the Parquet event history
//! (`tokenwatch scopes`), so it covers what the server saw, restarts included.
//!
//! A scope counts as used by a successful call (status below 400) that needed it; a refused
//! call is an attempt, not a use. The period ends at the newest event in the history (not
//! the wall clock), so the same history always gives the same report.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{TimestampMillisecondType, UInt16Type};
use serde::Serialize;

use crate::event::col;
use crate::model::registry::Registry;
use crate::store::{self, history, Error};

const DAY_MS: i64 = 86_400_000;

/// One token's scopes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenScopes {
    /// Token id.
    pub token_id: String,
    /// Owner (registry), empty if the token is not in it.
    pub owner: String,
    /// Environment (registry).
    pub env: Option<String>,
    /// Whether the registry knows the token.
    pub registered: bool,
    /// Scopes granted.
    pub granted: Vec<String>,
    /// Granted scopes with successful calls in the period, and how many.
    pub used: BTreeMap<String, u64>,
    /// Granted scopes no successful call needed in the period: candidates for removal.
    pub unused: Vec<String>,
    /// Scopes calls needed that the token is not granted, with the calls (any status).
    pub not_granted: BTreeMap<String, u64>,
}

/// The whole report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScopeReport {
    /// Days covered.
    pub days: u32,
    /// Period start and end (epoch ms; end = newest event in the history).
    pub from_ms: i64,
    /// Period end.
    pub to_ms: i64,
    /// Per token, most removable scope first.
    pub tokens: Vec<TokenScopes>,
    /// Granted scopes over all registered tokens.
    pub granted_total: u64,
    /// Of those, unused in the period.
    pub unused_total: u64,
}

impl ScopeReport {
    /// Share of granted scope that could be removed (0 with nothing granted).
    pub fn removable_share(&self) -> f64 {
        if self.granted_total == 0 {
            0.0
        } else {
            self.unused_total as f64 / self.granted_total as f64
        }
    }
}

/// Build the report from the history under `data_dir` and the `registry`, over the last
/// `days` days of event time.
pub fn from_history(data_dir: &Path, registry: &Registry, days: u32) -> Result<ScopeReport, Error> {
    let events = store::events_dir(data_dir);
    // token -> scope -> day -> (successful calls, all calls); keys allocated once each.
    type ByDay = BTreeMap<i64, (u64, u64)>;
    let mut seen: BTreeMap<String, BTreeMap<String, ByDay>> = BTreeMap::new();
    let mut newest = i64::MIN;
    for f in history::files(&events, None, None)? {
        for b in history::read_file(&f, None, None)? {
            let b = b?;
            let ts = b.column(col::TS).as_primitive::<TimestampMillisecondType>();
            let tok = b.column(col::TOKEN_ID).as_string::<i32>();
            let scope = b.column(col::SCOPE).as_string::<i32>();
            let status = b.column(col::STATUS).as_primitive::<UInt16Type>();
            for i in 0..b.num_rows() {
                if !ts.is_valid(i) || !tok.is_valid(i) {
                    continue;
                }
                newest = newest.max(ts.value(i));
                if !seen.contains_key(tok.value(i)) {
                    seen.insert(tok.value(i).to_string(), BTreeMap::new());
                }
                if !scope.is_valid(i) || scope.value(i).is_empty() {
                    continue;
                }
                let Some(scopes) = seen.get_mut(tok.value(i)) else {
                    continue;
                };
                if !scopes.contains_key(scope.value(i)) {
                    scopes.insert(scope.value(i).to_string(), ByDay::new());
                }
                let Some(by_day) = scopes.get_mut(scope.value(i)) else {
                    continue;
                };
                let e = by_day.entry(ts.value(i).div_euclid(DAY_MS)).or_default();
                e.1 += 1;
                if status.is_valid(i) && status.value(i) < 400 {
                    e.0 += 1;
                }
            }
        }
    }
    let to_ms = if newest == i64::MIN { 0 } else { newest };
    let from_ms = to_ms.saturating_sub(days as i64 * DAY_MS);
    let first_day = from_ms.div_euclid(DAY_MS);
    let mut tokens: BTreeSet<String> = seen.keys().cloned().collect();
    for e in registry.iter() {
        tokens.insert(e.token_id.clone());
    }
    let none = BTreeMap::new();
    let mut out = Vec::with_capacity(tokens.len());
    let (mut granted_total, mut unused_total) = (0u64, 0u64);
    for t in tokens {
        let reg = registry.get(&t);
        let granted: Vec<String> = reg.map(|r| r.scopes.clone()).unwrap_or_default();
        let mut used = BTreeMap::new();
        let mut not_granted = BTreeMap::new();
        for (s, by_day) in seen.get(&t).unwrap_or(&none) {
            let (ok, all) = by_day
                .range(first_day..)
                .fold((0, 0), |(a, b), (_, (o, n))| (a + o, b + n));
            if granted.iter().any(|g| g == s) {
                if ok > 0 {
                    used.insert(s.clone(), ok);
                }
            } else if all > 0 && reg.is_some() {
                not_granted.insert(s.clone(), all);
            }
        }
        let unused: Vec<String> = granted
            .iter()
            .filter(|g| !used.contains_key(*g))
            .cloned()
            .collect();
        if reg.is_some() {
            granted_total += granted.len() as u64;
            unused_total += unused.len() as u64;
        }
        out.push(TokenScopes {
            owner: reg.map(|r| r.owner.clone()).unwrap_or_default(),
            env: reg.and_then(|r| r.env.clone()),
            registered: reg.is_some(),
            token_id: t,
            granted,
            used,
            unused,
            not_granted,
        });
    }
    out.sort_by(|a, b| {
        (b.unused.len() + b.not_granted.len())
            .cmp(&(a.unused.len() + a.not_granted.len()))
            .then_with(|| a.token_id.cmp(&b.token_id))
    });
    Ok(ScopeReport {
        days,
        from_ms,
        to_ms,
        tokens: out,
        granted_total,
        unused_total,
    })
}

/// The latest report of a server, made again once it is older than `max_age` or another
/// number of days is asked for. One report is made at a time (a full read of the history):
/// callers that arrive meanwhile wait for it instead of starting their own, so readers cannot
/// multiply the work.
pub struct Cache {
    dir: Option<std::path::PathBuf>,
    registry: std::sync::Arc<Registry>,
    max_age: std::time::Duration,
    /// Held while a report is made.
    making: tokio::sync::Mutex<()>,
    last: std::sync::Mutex<Option<Cached>>,
}

#[derive(Clone)]
struct Cached {
    days: u32,
    made: std::time::Instant,
    at_ms: i64,
    report: std::sync::Arc<ScopeReport>,
}

impl Cache {
    /// Reports from the history under `dir` (`None`: the server keeps no history).
    pub fn new(
        dir: Option<std::path::PathBuf>,
        registry: std::sync::Arc<Registry>,
        max_age: std::time::Duration,
    ) -> Self {
        Cache {
            dir,
            registry,
            max_age,
            making: tokio::sync::Mutex::new(()),
            last: std::sync::Mutex::new(None),
        }
    }

    fn fresh(&self, days: u32) -> Option<Cached> {
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        last.as_ref()
            .filter(|c| c.days == days && c.made.elapsed() < self.max_age)
            .cloned()
    }

    /// The report made last, if any (never waits, never reads the history).
    pub fn peek(&self) -> Option<std::sync::Arc<ScopeReport>> {
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        last.as_ref().map(|c| c.report.clone())
    }

    /// The report over `days`, and when it was made (epoch ms, wall clock).
    pub async fn get(&self, days: u32) -> Result<(std::sync::Arc<ScopeReport>, i64), String> {
        let dir = self
            .dir
            .clone()
            .ok_or("this server keeps no history (no data directory), so it has no scope report")?;
        if let Some(c) = self.fresh(days) {
            return Ok((c.report, c.at_ms));
        }
        let _making = self.making.lock().await;
        // Made by another caller while this one waited?
        if let Some(c) = self.fresh(days) {
            return Ok((c.report, c.at_ms));
        }
        let registry = self.registry.clone();
        let report = tokio::task::spawn_blocking(move || from_history(&dir, &registry, days))
            .await
            .map_err(|e| format!("the scope report failed: {e}"))?
            .map_err(|e| format!("reading the history for the scope report: {e}"))?;
        let report = std::sync::Arc::new(report);
        let at_ms = chrono::Utc::now().timestamp_millis();
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(Cached {
            days,
            made: std::time::Instant::now(),
            at_ms,
            report: report.clone(),
        });
        Ok((report, at_ms))
    }
}

fn joined<'a>(v: impl IntoIterator<Item = &'a String>) -> String {
    v.into_iter().cloned().collect::<Vec<_>>().join(" ")
}

fn counted(m: &BTreeMap<String, u64>) -> String {
    m.iter()
        .map(|(s, n)| format!("{s}({n})"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The report as text: a summary line and one row per token with something to say.
pub fn render_table(r: &ScopeReport) -> String {
    let mut s = format!(
        "scopes over {} days ({} .. {}): {} of {} granted scopes unused ({:.0}%) across {} tokens\n",
        r.days,
        crate::event::fmt_ts(r.from_ms),
        crate::event::fmt_ts(r.to_ms),
        r.unused_total,
        r.granted_total,
        100.0 * r.removable_share(),
        r.tokens.len()
    );
    s.push_str(&format!(
        "{:<28} {:<16} {:<32} {:<32} {}\n",
        "token", "owner", "unused (remove)", "used (calls)", "needed, not granted (calls)"
    ));
    for t in r
        .tokens
        .iter()
        .filter(|t| !t.unused.is_empty() || !t.not_granted.is_empty())
    {
        s.push_str(&format!(
            "{:<28} {:<16} {:<32} {:<32} {}\n",
            t.token_id,
            t.owner,
            joined(&t.unused),
            counted(&t.used),
            counted(&t.not_granted)
        ));
    }
    s
}

/// The report as CSV: one row per token.
pub fn render_csv(r: &ScopeReport) -> String {
    let q = |v: &str| format!("\"{}\"", v.replace('"', "\"\""));
    let mut s = String::from("token_id,owner,env,registered,granted,used,unused,not_granted\n");
    for t in &r.tokens {
        s.push_str(&format!(
            "{},{},{},{},{},{},{},{}\n",
            q(&t.token_id),
            q(&t.owner),
            q(t.env.as_deref().unwrap_or("")),
            t.registered,
            q(&joined(&t.granted)),
            q(&counted(&t.used)),
            q(&joined(&t.unused)),
            q(&counted(&t.not_granted))
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::convert::{to_batch, Clock};
    use crate::server::pb;
    use crate::store::wal::Wal;

    fn ev(ts: i64, token: &str, scope: &str, status: u32) -> pb::Event {
        pb::Event {
            ts_ms: ts,
            token_id: token.into(),
            method: "GET".into(),
            endpoint: "/v1/x".into(),
            status,
            bytes_out: 10,
            src_ip: "10.0.0.1".into(),
            scope: scope.into(),
            ..Default::default()
        }
    }

    #[test]
    fn unused_and_ungranted_scopes_from_the_history() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = 1_772_409_600_000; // 2026-03-02
        let day = DAY_MS;
        let events = vec![
            // Used long ago only: unused in the last 30 days.
            ev(t0, "a", "billing:read", 200),
            ev(t0 + 40 * day, "a", "orders:read", 200),
            // Refused calls are attempts, not uses.
            ev(t0 + 41 * day, "a", "orders:write", 403),
            ev(t0 + 41 * day, "a", "admin:all", 403),
            ev(t0 + 42 * day, "a", "admin:all", 403),
            ev(t0 + 42 * day, "b", "orders:read", 200),
        ];
        let clock = Clock {
            now_ms: i64::MAX / 2,
            max_future_skew_ms: 0,
        };
        let batch = to_batch(&events, 0, clock, &mut Default::default());
        let wal_d = store::wal_dir(dir.path());
        let mut w = Wal::open(&wal_d, u64::MAX, false).unwrap();
        w.append(&batch).unwrap();
        w.commit().unwrap();
        w.seal().unwrap();
        history::compact(&wal_d, &store::events_dir(dir.path()), 1, true).unwrap();
        let reg_csv = "token_id,owner,role,env,scopes\n\
            a,alice,dashboard,prod,billing:read orders:read orders:write\n\
            c,carol,bot,prod,reports:read\n";
        let p = dir.path().join("tokens.csv");
        std::fs::write(&p, reg_csv).unwrap();
        let (reg, _) = crate::ingest::read_registry(&p, crate::ingest::BadRowPolicy::Skip).unwrap();
        let r = from_history(dir.path(), &reg, 30).unwrap();
        let a = r.tokens.iter().find(|t| t.token_id == "a").unwrap();
        assert_eq!(a.used.get("orders:read"), Some(&1));
        assert_eq!(a.unused, ["billing:read", "orders:write"]);
        assert_eq!(a.not_granted.get("admin:all"), Some(&2));
        let c = r.tokens.iter().find(|t| t.token_id == "c").unwrap();
        assert_eq!(c.unused, ["reports:read"]);
        // b is not registered: nothing granted, nothing judged.
        let b = r.tokens.iter().find(|t| t.token_id == "b").unwrap();
        assert!(!b.registered && b.unused.is_empty() && b.not_granted.is_empty());
        assert_eq!((r.granted_total, r.unused_total), (4, 3));
        assert!(render_table(&r).contains("3 of 4 granted scopes unused (75%)"));
        assert!(render_csv(&r).lines().count() == 4);
        // A longer period sees the old use.
        let r = from_history(dir.path(), &reg, 60).unwrap();
        let a = r.tokens.iter().find(|t| t.token_id == "a").unwrap();
        assert_eq!(a.unused, ["orders:write"]);
    }
}
