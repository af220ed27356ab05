//! What each console page shows (serialisable: the JSON form of the page) and its HTML.
//! Charts are inline SVG drawn here (see [`crate::svg`]); hovering a point shows its title,
//! clicking a window of the risk chart opens its contributions. No script.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use rustc_hash::FxHashMap;
use serde::Serialize;

use super::super::host::TokenView;
use super::super::pb;
use super::super::timeline::{Point, DETAIL_MIN_RISK};
use super::Who;
use crate::event::fmt_ts;
use crate::model::registry::RegistryEntry;
use crate::model::SignalKind;
use crate::respond::actions::AlertRow;
use crate::svg::{end_figure, esc, frame, thin};

/// Percent-encode a path segment or query value.
fn enc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            o.push(b as char);
        } else {
            let _ = write!(o, "%{b:02X}");
        }
    }
    o
}

/// The console's style sheet (served at /static/console.css: no inline style, so the
/// content security policy can forbid it).
pub fn css() -> String {
    format!(
        "{}\nnav{{background:#1f2a38;padding:8px 16px;margin:-24px -24px 16px;display:flex;gap:16px;align-items:center}}\
nav a{{color:#fff;text-decoration:none}}nav .who{{margin-left:auto;color:#cfd8e3;font-size:12px}}\
nav form{{display:inline}}nav button{{font-size:12px}}.risk{{font-weight:600}}.hi{{color:#c62828}}\
.muted{{color:#777;font-size:12px}}.pt{{fill:#1f5fa8;opacity:.35}}.pt:hover{{opacity:1}}\
.sel{{fill:none;stroke:#111;stroke-width:1.5}}.cell{{stroke:#fff}}.err{{color:#c62828}}\
form.inline{{display:inline}}td.l,th.l{{text-align:left}}.verdict button{{margin-right:4px}}\
.s0{{fill:#1f5fa8}}.s1{{fill:#c62828}}.s2{{fill:#2e7d32}}.s3{{fill:#ef6c00}}.s4{{fill:#6a1b9a}}.s5{{fill:#00838f}}.s6{{fill:#999}}",
        crate::svg::STYLE
    )
}

/// One contribution, as pages show it.
#[derive(Debug, Clone, Serialize)]
pub struct Reason {
    /// Signal.
    pub signal: String,
    /// Evidence (nats).
    pub score: f64,
    /// What the window showed.
    pub observed: f64,
    /// What the model expected.
    pub expected: f64,
    /// In words.
    pub reason: String,
}

fn reasons(r: &pb::TokenRisk, n: usize) -> Vec<Reason> {
    r.contributions
        .iter()
        .take(n)
        .map(|c| Reason {
            signal: c.signal.clone(),
            score: c.score,
            observed: c.observed,
            expected: c.expected,
            reason: c.reason.clone(),
        })
        .collect()
}

/// The overview.
#[derive(Debug, Serialize)]
pub struct Overview {
    /// Events applied.
    pub events: u64,
    /// Events per second (between the last two views of this page, up to a minute apart).
    pub events_per_sec: f64,
    /// Windows scored.
    pub windows: u64,
    /// Windows at or above the alert threshold.
    pub alert_windows: u64,
    /// Policy alerts remembered without a verdict.
    pub open_alerts: usize,
    /// Tokens tracked in memory.
    pub tokens_tracked: u64,
    /// Tokens seen.
    pub tokens: u64,
    /// Alerting windows per hour (event time, the last day with alerts) by top signal.
    pub alerts_by_hour: Vec<HourCounts>,
    /// The same over the whole day, per signal.
    pub alerts_by_signal: BTreeMap<String, u32>,
}

/// Alerting windows in one hour.
#[derive(Debug, Serialize)]
pub struct HourCounts {
    /// Hour start (ms).
    pub hour_start_ms: i64,
    /// Per top signal.
    pub counts: BTreeMap<String, u32>,
}

impl Overview {
    /// From GetStats, the events rate, open alerts and the hourly alert counts.
    pub fn new(
        s: &pb::StatsResponse,
        events_per_sec: f64,
        open_alerts: usize,
        hours: Vec<(i64, [u32; SignalKind::ALL.len()])>,
    ) -> Self {
        let mut by_signal = BTreeMap::new();
        let alerts_by_hour = hours
            .into_iter()
            .map(|(h, c)| {
                let mut counts = BTreeMap::new();
                for k in SignalKind::ALL {
                    let n = c[k.index()];
                    if n > 0 {
                        counts.insert(k.name().to_string(), n);
                        *by_signal.entry(k.name().to_string()).or_insert(0) += n;
                    }
                }
                HourCounts {
                    hour_start_ms: h,
                    counts,
                }
            })
            .collect();
        Overview {
            events: s.events,
            events_per_sec,
            windows: s.windows,
            alert_windows: s.alert_windows,
            open_alerts,
            tokens_tracked: s.tracked_tokens,
            tokens: s.tokens,
            alerts_by_hour,
            alerts_by_signal: by_signal,
        }
    }
}

/// A row of the risky tokens.
#[derive(Debug, Serialize)]
pub struct RiskyRow {
    /// Token id.
    pub token_id: String,
    /// Risk of its latest window.
    pub risk: f64,
    /// Its start (ms).
    pub window_start_ms: i64,
    /// Whether it alerted.
    pub alert: bool,
    /// Confidence of the baseline.
    pub confidence: f64,
    /// Registry owner.
    pub owner: String,
    /// Registry environment.
    pub env: String,
    /// Top signals and why.
    pub top: Vec<Reason>,
}

impl RiskyRow {
    /// A token's latest window with its registry entry.
    pub fn new(r: &pb::TokenRisk, reg: Option<&RegistryEntry>) -> Self {
        RiskyRow {
            token_id: r.token_id.clone(),
            risk: r.risk,
            window_start_ms: r.window_start_ms,
            alert: r.alert,
            confidence: r.confidence,
            owner: reg.map(|e| e.owner.clone()).unwrap_or_default(),
            env: reg.and_then(|e| e.env.clone()).unwrap_or_default(),
            top: reasons(r, 3),
        }
    }
}

/// The risky tokens.
#[derive(Debug, Serialize)]
pub struct Risky {
    /// This page, highest risk first.
    pub tokens: Vec<RiskyRow>,
    /// Rows skipped.
    pub offset: usize,
    /// Rows per page.
    pub page: usize,
    /// Only tokens with this signal among their top three.
    pub signal: Option<String>,
    /// Only this owner's.
    pub owner: Option<String>,
    /// Only this environment's.
    pub env: Option<String>,
    /// With a filter, how many of the riskiest tokens it looked at.
    pub filter_scan: Option<usize>,
    /// Tokens with a scored window.
    pub tracked: usize,
}

/// Registry facts of a token.
#[derive(Debug, Serialize)]
pub struct Facts {
    /// Owner.
    pub owner: String,
    /// Role.
    pub role: String,
    /// Environment.
    pub env: Option<String>,
    /// Scopes granted.
    pub scopes: Vec<String>,
    /// Created (ms).
    pub created_at_ms: Option<i64>,
    /// Expires (ms).
    pub expires_at_ms: Option<i64>,
}

/// A share of a token's traffic.
#[derive(Debug, Serialize)]
pub struct Share {
    /// What.
    pub name: String,
    /// Share of the counted traffic, 0..1.
    pub share: f64,
}

/// A token's baseline as the models hold it now.
#[derive(Debug, Serialize)]
pub struct Baseline {
    /// First window (ms).
    pub first_seen_ms: i64,
    /// Latest window (ms).
    pub last_seen_ms: i64,
    /// Windows learned.
    pub windows_learned: u32,
    /// Most used countries.
    pub countries: Vec<Share>,
    /// Most used networks (autonomous systems).
    pub networks: Vec<Share>,
    /// Most used endpoints.
    pub endpoints: Vec<Share>,
    /// Learned windows per hour of the week (Monday 00:00 UTC first).
    pub hour_of_week: Vec<u8>,
    /// User agents of its recent windows (the console's timeline: the two busiest agents of
    /// each window kept there), by calls.
    pub user_agents: Vec<Share>,
}

fn shares<const N: usize>(
    top: &crate::model::sketch::TopK<N>,
    name: impl Fn(u32) -> String,
) -> Vec<Share> {
    let total: u32 = top.slots.iter().map(|s| s.count as u32).sum();
    let mut v: Vec<_> = top
        .slots
        .iter()
        .filter(|s| s.key != 0 && s.count > 0)
        .map(|s| Share {
            name: name(s.key),
            share: s.count as f64 / total.max(1) as f64,
        })
        .collect();
    v.sort_by(|a, b| {
        b.share
            .total_cmp(&a.share)
            .then_with(|| a.name.cmp(&b.name))
    });
    v
}

impl Baseline {
    fn of(v: &TokenView, agents: &[(u64, u32)]) -> Self {
        let st = &v.state;
        let country = |k: u32| {
            let (a, b) = ((k >> 8) as u8, k as u8);
            if k < 0x1_0000 && a.is_ascii_alphabetic() && b.is_ascii_alphabetic() {
                format!("{}{}", a as char, b as char)
            } else {
                format!("#{k:08x}")
            }
        };
        let endpoint = |k: u32| {
            v.endpoints
                .iter()
                .find(|(key, _)| *key == k)
                .map_or_else(|| format!("endpoint #{k:08x}"), |(_, n)| n.clone())
        };
        Baseline {
            first_seen_ms: st.first_seen,
            last_seen_ms: st.last_seen,
            windows_learned: st.windows,
            countries: shares(&st.network.countries, country),
            networks: shares(&st.network.asns, |k| format!("AS{k}")),
            endpoints: shares(&st.endpoints.top, endpoint),
            hour_of_week: st.seasonal.active.to_vec(),
            user_agents: {
                let total: u64 = agents.iter().map(|a| a.1 as u64).sum();
                agents
                    .iter()
                    .map(|&(k, c)| Share {
                        name: v
                            .agents
                            .iter()
                            .find(|(key, _)| *key == k)
                            .map_or_else(|| format!("agent #{k:016x}"), |(_, n)| n.clone()),
                        share: c as f64 / total.max(1) as f64,
                    })
                    .collect()
            },
        }
    }
}

/// One window of the chart.
#[derive(Debug, Clone, Serialize)]
pub struct TimePoint {
    /// Start (ms).
    pub start_ms: i64,
    /// Risk.
    pub risk: f32,
    /// Events.
    pub events: u32,
    /// Alerted.
    pub alert: bool,
}

/// The window picked on the chart (or the latest), with its contributions.
#[derive(Debug, Serialize)]
pub struct WindowDetail {
    /// Start (ms).
    pub start_ms: i64,
    /// Risk.
    pub risk: f64,
    /// Events.
    pub events: u32,
    /// Alerted.
    pub alert: bool,
    /// Contributions, largest first (empty: the window was below the detail floor).
    pub contributions: Vec<Reason>,
}

/// A policy alert, as the pages show it.
#[derive(Debug, Serialize)]
pub struct AlertOut {
    /// Alert id.
    pub alert_id: String,
    /// Token.
    pub token_id: String,
    /// Policy.
    pub policy: String,
    /// Severity.
    pub severity: String,
    /// First matching window (ms).
    pub first_window_ms: i64,
    /// Last matching window (ms).
    pub last_window_ms: i64,
    /// Matching windows.
    pub windows: u32,
    /// Highest risk.
    pub max_risk: f32,
    /// Top signals when it fired.
    pub signals: Vec<String>,
    /// Verdict, once given.
    pub verdict: Option<String>,
    /// Its audit trail (oldest first).
    pub audit: Vec<serde_json::Value>,
}

impl AlertOut {
    fn new(r: AlertRow, audit: Vec<serde_json::Value>) -> Self {
        let a = r.info;
        AlertOut {
            alert_id: r.alert_id,
            token_id: a.token.to_string(),
            policy: a.policy.to_string(),
            severity: a.severity.to_string(),
            first_window_ms: a.first,
            last_window_ms: a.last,
            windows: a.windows,
            max_risk: a.max_risk,
            signals: a.signals.iter().map(|s| s.name().to_string()).collect(),
            verdict: a.verdict.map(|v| v.name().to_string()),
            audit,
        }
    }
}

/// A token's page.
#[derive(Debug, Serialize)]
pub struct TokenPage {
    /// Token id.
    pub token_id: String,
    /// Latest scored window.
    pub latest: Option<RiskyRow>,
    /// Registry facts.
    pub registry: Option<Facts>,
    /// Recent windows, oldest first.
    pub timeline: Vec<TimePoint>,
    /// The window shown in detail.
    pub window: Option<WindowDetail>,
    /// The models' baseline (`None`: not tracked in memory now).
    pub baseline: Option<Baseline>,
    /// Its recent policy alerts.
    pub alerts: Vec<AlertOut>,
    /// Scopes granted and used (`None`: no least-privilege report made yet; open Scopes).
    pub scopes: Option<crate::scopes::TokenScopes>,
}

impl TokenPage {
    /// Put the page together.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        token_id: String,
        latest: Option<pb::TokenRisk>,
        reg: Option<RegistryEntry>,
        view: Option<Box<TokenView>>,
        timeline: Vec<Point>,
        pick: Option<i64>,
        alerts: Vec<AlertRow>,
        scopes: Option<crate::scopes::TokenScopes>,
        agents: Vec<(u64, u32)>,
    ) -> Self {
        let chosen = match pick {
            Some(t) => timeline.iter().find(|p| p.start == t),
            None => timeline.iter().rev().find(|p| p.detail.is_some()),
        };
        let window = match (chosen, &latest) {
            (Some(p), _) => Some(WindowDetail {
                start_ms: p.start,
                risk: p.risk as f64,
                events: p.events,
                alert: p.alert,
                contributions: p
                    .detail
                    .as_ref()
                    .map(|d| reasons(d, usize::MAX))
                    .unwrap_or_default(),
            }),
            (None, Some(l)) if pick.is_none() => Some(WindowDetail {
                start_ms: l.window_start_ms,
                risk: l.risk,
                events: l.events,
                alert: l.alert,
                contributions: reasons(l, usize::MAX),
            }),
            _ => None,
        };
        TokenPage {
            latest: latest.as_ref().map(|l| RiskyRow::new(l, reg.as_ref())),
            registry: reg.map(|e| Facts {
                owner: e.owner,
                role: e.role,
                env: e.env,
                scopes: e.scopes,
                created_at_ms: e.created_at,
                expires_at_ms: e.expires_at,
            }),
            timeline: timeline
                .iter()
                .map(|p| TimePoint {
                    start_ms: p.start,
                    risk: p.risk,
                    events: p.events,
                    alert: p.alert,
                })
                .collect(),
            window,
            baseline: view.as_deref().map(|v| Baseline::of(v, &agents)),
            alerts: alerts
                .into_iter()
                .map(|a| AlertOut::new(a, Vec::new()))
                .collect(),
            scopes,
            token_id,
        }
    }
}

/// The alerts page.
#[derive(Debug, Serialize)]
pub struct Alerts {
    /// This page, most recently raised first.
    pub alerts: Vec<AlertOut>,
    /// Alerts remembered.
    pub total: usize,
    /// Of those, without a verdict.
    pub open: usize,
    /// Rows skipped.
    pub offset: usize,
    /// Rows per page.
    pub page: usize,
}

impl Alerts {
    /// A page of alerts with their audit trails.
    pub fn new(
        rows: Vec<AlertRow>,
        total: usize,
        open: usize,
        offset: usize,
        page: usize,
        mut audit: FxHashMap<String, Vec<serde_json::Value>>,
    ) -> Self {
        Alerts {
            alerts: rows
                .into_iter()
                .map(|r| {
                    let a = audit.remove(&r.alert_id).unwrap_or_default();
                    AlertOut::new(r, a)
                })
                .collect(),
            total,
            open,
            offset,
            page,
        }
    }
}

/// The audit records of `ids`, from the last `tail` bytes of the audit log (a damaged or
/// cut line is skipped).
pub fn audit_of(
    path: &std::path::Path,
    ids: &[String],
    tail: u64,
) -> FxHashMap<String, Vec<serde_json::Value>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut out: FxHashMap<String, Vec<serde_json::Value>> = FxHashMap::default();
    if ids.is_empty() {
        return out;
    }
    let Ok(mut f) = std::fs::File::open(path) else {
        return out;
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let from = len.saturating_sub(tail);
    if f.seek(SeekFrom::Start(from)).is_err() {
        return out;
    }
    let mut buf = Vec::new();
    if f.take(tail).read_to_end(&mut buf).is_err() {
        return out;
    }
    for line in buf.split(|&b| b == b'\n') {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else {
            continue;
        };
        if let Some(id) = v.get("alert_id").and_then(|x| x.as_str()) {
            if ids.iter().any(|i| i == id) {
                out.entry(id.to_string()).or_default().push(v);
            }
        }
    }
    out
}

/// One token of the least-privilege page.
#[derive(Debug, Serialize)]
pub struct ScopeRow {
    /// Token.
    pub token_id: String,
    /// Owner.
    pub owner: String,
    /// Environment.
    pub env: String,
    /// Granted.
    pub granted: Vec<String>,
    /// Granted and used (calls).
    pub used: Vec<(String, u64)>,
    /// Granted, not used.
    pub unused: Vec<String>,
    /// Used, not granted (calls).
    pub not_granted: Vec<(String, u64)>,
}

/// The least-privilege page.
#[derive(Debug, Serialize)]
pub struct Scopes {
    /// Days covered.
    pub days: u32,
    /// Period (ms).
    pub from_ms: i64,
    /// Period end (ms).
    pub to_ms: i64,
    /// Granted scopes over every registered token.
    pub granted_total: u64,
    /// Of those unused.
    pub unused_total: u64,
    /// Share that could be removed.
    pub removable_share: f64,
    /// Tokens in the report.
    pub total_tokens: u64,
    /// When the report was made (ms).
    pub computed_at_ms: i64,
    /// This page, most removable first.
    pub tokens: Vec<ScopeRow>,
    /// Rows skipped.
    pub offset: usize,
    /// Rows per page.
    pub page: usize,
}

impl Scopes {
    /// From GetScopeUsage.
    pub fn new(r: pb::GetScopeUsageResponse, offset: usize, page: usize) -> Self {
        let calls = |v: &[pb::ScopeCalls]| v.iter().map(|c| (c.scope.clone(), c.calls)).collect();
        Scopes {
            days: r.days,
            from_ms: r.from_ms,
            to_ms: r.to_ms,
            granted_total: r.granted_total,
            unused_total: r.unused_total,
            removable_share: r.removable_share,
            total_tokens: r.total_tokens,
            computed_at_ms: r.computed_at_ms,
            tokens: r
                .tokens
                .iter()
                .map(|t| ScopeRow {
                    token_id: t.token_id.clone(),
                    owner: t.owner.clone(),
                    env: t.env.clone(),
                    granted: t.granted.clone(),
                    used: calls(&t.used),
                    unused: t.unused.clone(),
                    not_granted: calls(&t.not_granted),
                })
                .collect(),
            offset,
            page,
        }
    }
}

// ---- HTML ----

fn layout(who: Option<&Who>, title: &str, body: &str) -> String {
    let mut s = format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{} · tokenwatch</title><link rel=\"stylesheet\" href=\"/static/console.css\"></head><body>\n<nav><strong><a href=\"/\">tokenwatch</a></strong>",
        esc(title)
    );
    if let Some(w) = who {
        s.push_str("<a href=\"/tokens\">Risky tokens</a><a href=\"/alerts\">Alerts</a><a href=\"/scopes\">Least privilege</a>");
        let _ = write!(
            s,
            "<span class=\"who\">{} ({})</span><form method=\"post\" action=\"/logout\">{}<button type=\"submit\">Log out</button></form>",
            esc(&w.name),
            w.role.name(),
            csrf_field(w)
        );
    }
    let _ = write!(s, "</nav>\n<h1>{}</h1>\n{body}</body></html>\n", esc(title));
    s
}

fn csrf_field(w: &Who) -> String {
    match &w.csrf {
        Some(t) => format!("<input type=\"hidden\" name=\"csrf\" value=\"{}\">", esc(t)),
        None => String::new(),
    }
}

/// The login form.
pub fn login(error: Option<&str>) -> String {
    let mut b = String::new();
    if let Some(e) = error {
        let _ = write!(b, "<p class=\"err\" id=\"error\">{}</p>", esc(e));
    }
    b.push_str(
        "<form method=\"post\" action=\"/login\" id=\"login\"><p><label>API key (role read or admin)<br>\
<input type=\"password\" name=\"key\" id=\"key\" autocomplete=\"current-password\" size=\"48\" autofocus></label></p>\
<p><button type=\"submit\" id=\"submit\">Log in</button></p></form>\
<p class=\"muted\">The key is checked like the API's bearer key and is not stored; the session ends after a while or at logout.</p>",
    );
    layout(None, "Log in", &b)
}

fn risk_cell(risk: f64) -> String {
    format!(
        "<td class=\"risk{}\">{risk:.1}</td>",
        if risk >= 50.0 { " hi" } else { "" }
    )
}

fn palette(i: usize) -> &'static str {
    ["s0", "s1", "s2", "s3", "s4", "s5"]
        .get(i)
        .copied()
        .unwrap_or("s6")
}

/// The overview page.
pub fn overview(who: &Who, d: &Overview) -> String {
    let mut b = String::new();
    let _ = write!(
        b,
        "<table id=\"stats\"><tr><th>events/s</th><th>events</th><th>windows scored</th><th>alerting windows</th><th>open alerts</th><th>tokens tracked</th></tr>\
<tr><td>{:.0}</td><td>{}</td><td>{}</td><td>{}</td><td><a href=\"/alerts\">{}</a></td><td>{}</td></tr></table>",
        d.events_per_sec, d.events, d.windows, d.alert_windows, d.open_alerts, d.tokens_tracked
    );
    b.push_str(
        "<h2>Alerting windows per hour, by top signal (the last day with alerts, event time)</h2>",
    );
    b.push_str(&alert_bars(d));
    layout(Some(who), "Overview", &b)
}

fn alert_bars(d: &Overview) -> String {
    if d.alerts_by_hour.is_empty() {
        return "<p class=\"muted\">No alerting window yet.</p>".into();
    }
    // The signals with the most alerts get their own colour; the rest share one.
    let mut ranked: Vec<(&String, &u32)> = d.alerts_by_signal.iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
    let colour = |s: &str| palette(ranked.iter().position(|(n, _)| *n == s).unwrap_or(9));
    let h0 = d.alerts_by_hour[0].hour_start_ms as f64;
    let h1 = d.alerts_by_hour[d.alerts_by_hour.len() - 1].hour_start_ms as f64 + 3_600_000.0;
    let max = d
        .alerts_by_hour
        .iter()
        .map(|h| h.counts.values().sum::<u32>())
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let xt: Vec<(f64, String)> = (0..=4)
        .map(|i| {
            let x = h0 + (h1 - h0) * i as f64 / 4.0;
            (x, fmt_ts(x as i64)[5..16].replace('T', " "))
        })
        .collect();
    let yt: Vec<(f64, String)> = (0..=4)
        .map(|i| (max * i as f64 / 4.0, format!("{:.0}", max * i as f64 / 4.0)))
        .collect();
    let (mut s, at) = frame(
        "Alerting windows per hour",
        "hour (UTC)",
        "windows",
        &xt,
        &yt,
        (h0, h1),
        (0.0, max),
    );
    for h in &d.alerts_by_hour {
        let x = h.hour_start_ms as f64;
        let mut base = 0.0;
        let mut parts: Vec<(&String, &u32)> = h.counts.iter().collect();
        parts.sort_by_key(|(n, _)| ranked.iter().position(|(r, _)| r == n));
        let title: Vec<String> = parts.iter().map(|(n, c)| format!("{n}: {c}")).collect();
        for (name, c) in parts {
            let (xa, ya) = at(x + 300_000.0, base + *c as f64);
            let (xb, yb) = at(x + 3_300_000.0, base);
            let _ = write!(
                s,
                "<rect x=\"{xa:.1}\" y=\"{ya:.1}\" width=\"{:.1}\" height=\"{:.1}\" class=\"{}\"><title>{} — {}</title></rect>",
                (xb - xa).max(1.0),
                (yb - ya).max(0.5),
                colour(name),
                esc(&fmt_ts(h.hour_start_ms)),
                esc(&title.join(", "))
            );
            base += *c as f64;
        }
    }
    let legend: Vec<String> = ranked
        .iter()
        .take(6)
        .map(|(n, c)| format!("{n} ({c})"))
        .collect();
    let mut out = end_figure(
        s,
        &format!(
            "Colours, most alerts first: {}{}.",
            legend.join(", "),
            if ranked.len() > 6 {
                ", others grey"
            } else {
                ""
            }
        ),
    );
    out.push_str("<table id=\"by-signal\"><tr><th>signal</th><th>alerting windows</th></tr>");
    for (n, c) in &ranked {
        let _ = write!(
            out,
            "<tr><td><a href=\"/tokens?signal={}\">{}</a></td><td>{c}</td></tr>",
            enc(n),
            esc(n)
        );
    }
    out.push_str("</table>");
    out
}

fn top_reasons(top: &[Reason]) -> String {
    top.iter()
        .map(|r| format!("<b>{}</b>: {}", esc(&r.signal), esc(&r.reason)))
        .collect::<Vec<_>>()
        .join("<br>")
}

fn pager(base: &str, offset: usize, page: usize, shown: usize) -> String {
    let mut s = String::from("<p class=\"pager\">");
    let sep = if base.contains('?') { '&' } else { '?' };
    if offset > 0 {
        let _ = write!(
            s,
            "<a href=\"{base}{sep}offset={}\">« previous</a> ",
            offset.saturating_sub(page)
        );
    }
    if shown == page {
        let _ = write!(
            s,
            "<a href=\"{base}{sep}offset={}\">next »</a>",
            offset + page
        );
    }
    s.push_str("</p>");
    s
}

/// The risky tokens page.
pub fn risky(who: &Who, d: &Risky) -> String {
    let mut b = String::new();
    let v = |o: &Option<String>| esc(o.as_deref().unwrap_or(""));
    let _ = write!(
        b,
        "<form method=\"get\" action=\"/tokens\" id=\"filter\">signal <input name=\"signal\" value=\"{}\" size=\"16\"> owner <input name=\"owner\" value=\"{}\" size=\"16\"> env <input name=\"env\" value=\"{}\" size=\"8\"> <button type=\"submit\">Filter</button></form>",
        v(&d.signal),
        v(&d.owner),
        v(&d.env)
    );
    if let Some(n) = d.filter_scan {
        let _ = write!(
            b,
            "<p class=\"muted\">Filtered among the {n} riskiest of {} tokens.</p>",
            d.tracked
        );
    }
    b.push_str("<table id=\"risky\"><tr><th class=\"l\">token</th><th>risk</th><th class=\"l\">window</th><th class=\"l\">owner</th><th class=\"l\">env</th><th>confidence</th><th class=\"l\">top signals</th></tr>");
    for r in &d.tokens {
        let _ = write!(
            b,
            "<tr><td class=\"l\"><a class=\"token\" href=\"/tokens/{}\">{}</a></td>{}<td class=\"l\">{}{}</td><td class=\"l\">{}</td><td class=\"l\">{}</td><td>{:.2}</td><td class=\"l\">{}</td></tr>",
            enc(&r.token_id),
            esc(&r.token_id),
            risk_cell(r.risk),
            esc(&fmt_ts(r.window_start_ms)),
            if r.alert { " (alert)" } else { "" },
            esc(&r.owner),
            esc(&r.env),
            r.confidence,
            top_reasons(&r.top)
        );
    }
    b.push_str("</table>");
    let mut q = String::from("/tokens?");
    for (k, o) in [("signal", &d.signal), ("owner", &d.owner), ("env", &d.env)] {
        if let Some(x) = o {
            let _ = write!(q, "{k}={}&", enc(x));
        }
    }
    b.push_str(&pager(
        q.trim_end_matches(['&', '?']),
        d.offset,
        d.page,
        d.tokens.len(),
    ));
    layout(Some(who), "Risky tokens", &b)
}

fn risk_chart(d: &TokenPage, alert_risk: f64) -> String {
    let pts = &d.timeline;
    let (Some(first), Some(last)) = (pts.first(), pts.last()) else {
        return "<p class=\"muted\" id=\"no-chart\">No window of this token is kept for the chart (none scored since the start, or its timeline was dropped to stay in the console's budget).</p>".into();
    };
    let x0 = first.start_ms as f64;
    let x1 = (last.start_ms as f64).max(x0 + 60_000.0);
    let xt: Vec<(f64, String)> = (0..=4)
        .map(|i| {
            let x = x0 + (x1 - x0) * i as f64 / 4.0;
            (x, fmt_ts(x as i64)[5..16].replace('T', " "))
        })
        .collect();
    let yt: Vec<(f64, String)> = [0.0, 25.0, 50.0, 75.0, 100.0]
        .iter()
        .map(|&v| (v, format!("{v:.0}")))
        .collect();
    let (mut s, at) = frame(
        "Risk per window",
        "window start (UTC)",
        "risk",
        &xt,
        &yt,
        (x0, x1),
        (0.0, 100.0),
    );
    let (l, y) = at(x0, alert_risk);
    let (r, _) = at(x1, alert_risk);
    let _ = write!(
        s,
        "<line x1=\"{l:.1}\" y1=\"{y:.1}\" x2=\"{r:.1}\" y2=\"{y:.1}\" class=\"threshold\"/>"
    );
    let thinned = thin(pts);
    let line: Vec<String> = thinned
        .iter()
        .map(|p| {
            let (x, y) = at(p.start_ms as f64, p.risk as f64);
            format!("{x:.1},{y:.1}")
        })
        .collect();
    let _ = write!(
        s,
        "<polyline points=\"{}\" class=\"line\"/>",
        line.join(" ")
    );
    let base = format!("/tokens/{}", enc(&d.token_id));
    // Points to hover and click: the thinned line's, and every alert (never thinned away).
    let mut shown: Vec<&TimePoint> = thinned.iter().collect();
    shown.extend(pts.iter().filter(|p| p.alert));
    shown.sort_by_key(|p| p.start_ms);
    shown.dedup_by_key(|p| p.start_ms);
    for p in shown {
        let (x, y) = at(p.start_ms as f64, p.risk as f64);
        let _ = write!(
            s,
            "<a href=\"{base}?window={}#window\"><circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"{}\" class=\"{}\"><title>{} — risk {:.1}, {} events{}</title></circle></a>",
            p.start_ms,
            if p.alert { 3.5 } else { 2.5 },
            if p.alert { "mark" } else { "pt" },
            esc(&fmt_ts(p.start_ms)),
            p.risk,
            p.events,
            if p.alert { ", alert" } else { "" }
        );
    }
    if let Some(w) = &d.window {
        let (x, y) = at(w.start_ms as f64, w.risk);
        let _ = write!(
            s,
            "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"6\" class=\"sel\"/>"
        );
    }
    let alerts = pts.iter().filter(|p| p.alert).count();
    end_figure(
        s,
        &format!(
            "{} windows from {} to {}; {alerts} alerted (red dots); dashed: the alert threshold. Hover a point for its risk, click it for its reasons (kept for windows at risk {DETAIL_MIN_RISK:.0} or more).",
            pts.len(),
            fmt_ts(first.start_ms),
            fmt_ts(last.start_ms)
        ),
    )
    .replacen("<figure>", "<figure id=\"risk-chart\">", 1)
}

fn heat_map(b: &Baseline) -> String {
    const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
    let (cw, ch, left, top) = (18.0, 16.0, 36.0, 18.0);
    let max = b.hour_of_week.iter().copied().max().unwrap_or(0).max(1) as f64;
    let (w, h) = (left + 24.0 * cw + 4.0, top + 7.0 * ch + 4.0);
    let mut s = format!(
        "<figure id=\"heat-map\"><figcaption>Learned windows per hour of the week (UTC)</figcaption><svg viewBox=\"0 0 {w} {h}\" width=\"{w}\" height=\"{h}\" role=\"img\" aria-label=\"hour of week\">"
    );
    for hour in (0..24).step_by(3) {
        let _ = write!(
            s,
            "<text x=\"{:.1}\" y=\"12\" class=\"tick\">{hour:02}</text>",
            left + hour as f64 * cw
        );
    }
    for (d, name) in DAYS.iter().enumerate() {
        let _ = write!(
            s,
            "<text x=\"2\" y=\"{:.1}\" class=\"tick\">{name}</text>",
            top + d as f64 * ch + 12.0
        );
        for hour in 0..24 {
            let n = b.hour_of_week.get(d * 24 + hour).copied().unwrap_or(0);
            let _ = write!(
                s,
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{cw}\" height=\"{ch}\" class=\"cell s0\" fill-opacity=\"{:.2}\"><title>{name} {hour:02}:00 — {n} learned windows</title></rect>",
                left + hour as f64 * cw,
                top + d as f64 * ch,
                if n == 0 { 0.04 } else { 0.15 + 0.85 * n as f64 / max }
            );
        }
    }
    end_figure(s, "")
}

fn share_table(id: &str, title: &str, v: &[Share]) -> String {
    let mut s = format!(
        "<table id=\"{id}\" class=\"shares\"><tr><th class=\"l\">{}</th><th>share</th></tr>",
        esc(title)
    );
    if v.is_empty() {
        s.push_str("<tr><td class=\"l muted\" colspan=\"2\">none learned</td></tr>");
    }
    for x in v {
        let _ = write!(
            s,
            "<tr><td class=\"l\">{}</td><td>{:.0}%</td></tr>",
            esc(&x.name),
            100.0 * x.share
        );
    }
    s.push_str("</table>");
    s
}

fn reasons_table(id: &str, v: &[Reason]) -> String {
    let mut s = format!(
        "<table id=\"{id}\"><tr><th class=\"l\">signal</th><th>evidence</th><th>observed</th><th>expected</th><th class=\"l\">reason</th></tr>"
    );
    for r in v {
        let _ = write!(
            s,
            "<tr><td class=\"l\">{}</td><td>{:.2}</td><td>{:.4}</td><td>{:.4}</td><td class=\"l reason\">{}</td></tr>",
            esc(&r.signal),
            r.score,
            r.observed,
            r.expected,
            esc(&r.reason)
        );
    }
    s.push_str("</table>");
    s
}

fn alerts_table(who: &Who, v: &[AlertOut], with_audit: bool) -> String {
    let mut s = String::from("<table id=\"alerts\"><tr><th class=\"l\">alert</th><th class=\"l\">token</th><th class=\"l\">policy</th><th class=\"l\">severity</th><th class=\"l\">first window</th><th class=\"l\">last window</th><th>windows</th><th>max risk</th><th class=\"l\">signals</th><th class=\"l\">verdict</th></tr>");
    for a in v {
        let verdict = match (&a.verdict, who.admin()) {
            (Some(v), false) => esc(v),
            (v, true) => {
                let mut f = format!(
                    "{}<form method=\"post\" class=\"verdict\" action=\"/alerts/{}/verdict\">{}<input name=\"note\" placeholder=\"note\" size=\"12\">",
                    v.as_deref().map(|v| format!("{} ", esc(v))).unwrap_or_default(),
                    enc(&a.alert_id),
                    csrf_field(who)
                );
                for (value, label) in [
                    ("true_positive", "True positive"),
                    ("false_positive", "False positive"),
                    ("expected_change", "Expected change"),
                ] {
                    let _ = write!(
                        f,
                        "<button type=\"submit\" name=\"verdict\" value=\"{value}\">{label}</button>"
                    );
                }
                f.push_str("</form>");
                f
            }
            (None, false) => "<span class=\"muted\">open</span>".into(),
        };
        let _ = write!(
            s,
            "<tr class=\"alert\" data-alert=\"{}\"><td class=\"l\">{}</td><td class=\"l\"><a href=\"/tokens/{}\">{}</a></td><td class=\"l\">{}</td><td class=\"l\">{}</td><td class=\"l\">{}</td><td class=\"l\">{}</td><td>{}</td>{}<td class=\"l\">{}</td><td class=\"l\">{verdict}</td></tr>",
            esc(&a.alert_id),
            esc(&a.alert_id),
            enc(&a.token_id),
            esc(&a.token_id),
            esc(&a.policy),
            esc(&a.severity),
            esc(&fmt_ts(a.first_window_ms)),
            esc(&fmt_ts(a.last_window_ms)),
            a.windows,
            risk_cell(a.max_risk as f64),
            esc(&a.signals.join(", "))
        );
        if with_audit && !a.audit.is_empty() {
            let trail: Vec<String> = a
                .audit
                .iter()
                .map(|e| {
                    let f = |k: &str| e.get(k).and_then(|v| v.as_str()).unwrap_or("");
                    format!(
                        "{} {} {} {}",
                        esc(f("at")),
                        esc(f("what")),
                        esc(f("why")),
                        esc(f("result"))
                    )
                })
                .collect();
            let _ = write!(
                s,
                "<tr class=\"audit\"><td class=\"l muted\" colspan=\"10\">audit: {}</td></tr>",
                trail.join("<br>")
            );
        }
    }
    s.push_str("</table>");
    s
}

/// A token's page.
pub fn token(who: &Who, d: &TokenPage, alert_risk: f64) -> String {
    let mut b = String::new();
    if let Some(l) = &d.latest {
        let _ = write!(
            b,
            "<p id=\"latest\">Latest window {}: risk <span class=\"risk{}\">{:.1}</span>{}, confidence {:.2}.</p>",
            esc(&fmt_ts(l.window_start_ms)),
            if l.risk >= 50.0 { " hi" } else { "" },
            l.risk,
            if l.alert { " (alert)" } else { "" },
            l.confidence
        );
    }
    b.push_str(&risk_chart(d, alert_risk));
    b.push_str("<h2 id=\"window\">Window</h2>");
    match &d.window {
        Some(w) => {
            let _ = write!(
                b,
                "<p>{}: risk {:.1}, {} events{}.</p>",
                esc(&fmt_ts(w.start_ms)),
                w.risk,
                w.events,
                if w.alert { ", alert" } else { "" }
            );
            if w.contributions.is_empty() {
                let _ = write!(
                    b,
                    "<p class=\"muted\">Reasons are kept for windows at risk {DETAIL_MIN_RISK:.0} or more.</p>"
                );
            } else {
                b.push_str(&reasons_table("reasons", &w.contributions));
            }
        }
        None => b.push_str("<p class=\"muted\">No window picked.</p>"),
    }
    b.push_str("<h2>Registry</h2>");
    match &d.registry {
        Some(r) => {
            let ts = |t: Option<i64>| t.map(fmt_ts).unwrap_or_else(|| "-".into());
            let _ = write!(
                b,
                "<table id=\"registry\"><tr><th class=\"l\">owner</th><td class=\"l\">{}</td></tr><tr><th class=\"l\">role</th><td class=\"l\">{}</td></tr><tr><th class=\"l\">env</th><td class=\"l\">{}</td></tr><tr><th class=\"l\">scopes</th><td class=\"l\">{}</td></tr><tr><th class=\"l\">created</th><td class=\"l\">{}</td></tr><tr><th class=\"l\">expires</th><td class=\"l\">{}</td></tr></table>",
                esc(&r.owner),
                esc(&r.role),
                esc(r.env.as_deref().unwrap_or("-")),
                esc(&r.scopes.join(" ")),
                esc(&ts(r.created_at_ms)),
                esc(&ts(r.expires_at_ms))
            );
        }
        None => b.push_str("<p class=\"muted\">Not in the token registry.</p>"),
    }
    b.push_str("<h2>Scopes granted and used</h2>");
    match &d.scopes {
        Some(s) => {
            let used: Vec<String> = s.used.iter().map(|(k, n)| format!("{k} ({n})")).collect();
            let ng: Vec<String> = s
                .not_granted
                .iter()
                .map(|(k, n)| format!("{k} ({n})"))
                .collect();
            let _ = write!(
                b,
                "<table id=\"scopes\"><tr><th class=\"l\">granted</th><td class=\"l\">{}</td></tr><tr><th class=\"l\">used (successful calls)</th><td class=\"l\">{}</td></tr><tr><th class=\"l\">granted, unused</th><td class=\"l\">{}</td></tr><tr><th class=\"l\">used, not granted</th><td class=\"l\">{}</td></tr></table>",
                esc(&s.granted.join(" ")),
                esc(&used.join(" ")),
                esc(&s.unused.join(" ")),
                esc(&ng.join(" "))
            );
        }
        None => b.push_str("<p class=\"muted\">No least-privilege report yet: open <a href=\"/scopes\">Least privilege</a> to make one.</p>"),
    }
    b.push_str("<h2>Baseline now</h2>");
    match &d.baseline {
        Some(bl) => {
            let _ = write!(
                b,
                "<p>{} windows learned, first seen {}, last seen {}.</p>",
                bl.windows_learned,
                esc(&fmt_ts(bl.first_seen_ms)),
                esc(&fmt_ts(bl.last_seen_ms))
            );
            b.push_str(&share_table("countries", "country", &bl.countries));
            b.push_str(&share_table("networks", "network", &bl.networks));
            b.push_str(&share_table("endpoints", "endpoint", &bl.endpoints));
            b.push_str(&share_table(
                "user-agents",
                "user agent (recent windows)",
                &bl.user_agents,
            ));
            b.push_str(&heat_map(bl));
        }
        None => b.push_str("<p class=\"muted\">Not tracked in memory now (idle tokens are kept on disk and come back with their next event).</p>"),
    }
    b.push_str("<h2>Alerts</h2>");
    b.push_str(&alerts_table(who, &d.alerts, false));
    layout(Some(who), &format!("Token {}", d.token_id), &b)
}

/// The alerts page.
pub fn alerts(who: &Who, d: &Alerts) -> String {
    let mut b = format!(
        "<p>{} alerts remembered, {} without a verdict.{}</p>",
        d.total,
        d.open,
        if who.admin() {
            ""
        } else {
            " Verdicts need an admin key."
        }
    );
    b.push_str(&alerts_table(who, &d.alerts, true));
    b.push_str(&pager("/alerts", d.offset, d.page, d.alerts.len()));
    layout(Some(who), "Alerts", &b)
}

/// The least-privilege page.
pub fn scopes(who: &Who, d: &Scopes) -> String {
    let mut b = format!(
        "<p id=\"summary\">Over {} days of history ({} to {}): <b>{} of {} granted scopes unused ({:.0}%)</b> across {} tokens. Report made {}.</p>",
        d.days,
        esc(&fmt_ts(d.from_ms)),
        esc(&fmt_ts(d.to_ms)),
        d.unused_total,
        d.granted_total,
        100.0 * d.removable_share,
        d.total_tokens,
        esc(&fmt_ts(d.computed_at_ms))
    );
    b.push_str("<table id=\"scope-table\"><tr><th class=\"l\">token</th><th class=\"l\">owner</th><th class=\"l\">env</th><th class=\"l\">granted, unused</th><th class=\"l\">used, not granted</th><th class=\"l\">used</th></tr>");
    for t in &d.tokens {
        let calls = |v: &[(String, u64)]| {
            v.iter()
                .map(|(s, n)| format!("{s} ({n})"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let _ = write!(
            b,
            "<tr><td class=\"l\"><a href=\"/tokens/{}\">{}</a></td><td class=\"l\">{}</td><td class=\"l\">{}</td><td class=\"l\">{}</td><td class=\"l\">{}</td><td class=\"l\">{}</td></tr>",
            enc(&t.token_id),
            esc(&t.token_id),
            esc(&t.owner),
            esc(&t.env),
            esc(&t.unused.join(" ")),
            esc(&calls(&t.not_granted)),
            esc(&calls(&t.used))
        );
    }
    b.push_str("</table>");
    b.push_str(&pager(
        &format!("/scopes?days={}", d.days),
        d.offset,
        d.page,
        d.tokens.len(),
    ));
    layout(Some(who), "Least privilege", &b)
}
