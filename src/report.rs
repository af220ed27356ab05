//! `eval --report FILE.html`: one self-contained HTML page of an evaluation (inline SVG and
//! CSS, no script, nothing fetched), so it opens on an air-gapped machine and can be mailed:
//! the summary table, the precision-recall curve, recall per incident kind, the distribution
//! of detection delays, and the risk timelines of the worst misses and the noisiest false
//! alerts. Drawn by hand with [`crate::svg`].

use std::fmt::Write as _;

use crate::eval::{Metrics, Report};
use crate::event::fmt_ts;
pub use crate::svg::thin;
use crate::svg::{end_figure, esc, frame, PAD, STYLE, W};

/// What the pictures are drawn from (kept by `eval` when a report is asked for).
#[derive(Debug, Clone, Default)]
pub struct Pictures {
    /// Precision-recall curve, (recall, precision), from the highest risk down.
    pub pr: Vec<(f64, f64)>,
    /// Detection delays of the detected incidents (s).
    pub delays: Vec<f64>,
    /// Incidents that no alert caught, longest first.
    pub misses: Vec<Timeline>,
    /// False alert episodes, most paged windows first.
    pub noisy: Vec<Timeline>,
    /// The alert threshold (risk).
    pub alert_risk: f64,
}

/// One token's windows around an incident or a false alert.
#[derive(Debug, Clone, Default)]
pub struct Timeline {
    /// Token id.
    pub token: String,
    /// What it shows ("missed token_sharing", "false alert").
    pub title: String,
    /// The span of interest (ms): the incident, or the episode.
    pub span: (i64, i64),
    /// Windows: start (ms), risk, labelled, paged.
    pub points: Vec<(i64, f32, bool, bool)>,
}

fn unit_ticks() -> Vec<(f64, String)> {
    (0..=5)
        .map(|i| (i as f64 / 5.0, format!("{:.1}", i as f64 / 5.0)))
        .collect()
}

fn pr_curve(p: &Pictures, m: &Metrics) -> String {
    let (mut s, at) = frame(
        "Precision-recall over the risk ranking",
        "recall",
        "precision",
        &unit_ticks(),
        &unit_ticks(),
        (0.0, 1.0),
        (0.0, 1.0),
    );
    let pts: Vec<String> = thin(&p.pr)
        .iter()
        .map(|&(r, pr)| {
            let (x, y) = at(r, pr);
            format!("{x:.1},{y:.1}")
        })
        .collect();
    let _ = write!(s, "<polyline points=\"{}\" class=\"line\"/>", pts.join(" "));
    let (x, y) = at(m.recall, m.precision);
    let _ = write!(
        s,
        "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"5\" class=\"mark\"><title>at the alert threshold: precision {:.3}, recall {:.3}</title></circle>",
        m.precision, m.recall
    );
    end_figure(
        s,
        &format!(
            "PR-AUC {:.3}; the dot is the alert threshold (precision {:.3}, recall {:.3}).",
            m.pr_auc, m.precision, m.recall
        ),
    )
}

fn kind_bars(m: &Metrics) -> String {
    let n = m.per_kind.len().max(1);
    let row = 24.0;
    let h = PAD + n as f64 * row + 10.0;
    let mut s = format!(
        "<figure><figcaption>Recall per incident kind (incidents detected; lighter: labelled windows alerted)</figcaption><svg viewBox=\"0 0 {W} {h}\" width=\"{W}\" height=\"{h}\" role=\"img\" aria-label=\"recall per kind\">"
    );
    let x0 = 170.0;
    let span = W - x0 - 70.0;
    for (i, k) in m.per_kind.iter().enumerate() {
        let y = 20.0 + i as f64 * row;
        let win = if k.windows > 0 {
            k.windows_alerted as f64 / k.windows as f64
        } else {
            0.0
        };
        let _ = write!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" class=\"tick\" text-anchor=\"end\">{}</text>\
             <rect x=\"{x0}\" y=\"{:.1}\" width=\"{span:.1}\" height=\"16\" class=\"plot\"/>\
             <rect x=\"{x0}\" y=\"{:.1}\" width=\"{:.1}\" height=\"16\" class=\"bar2\"/>\
             <rect x=\"{x0}\" y=\"{:.1}\" width=\"{:.1}\" height=\"8\" class=\"bar\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" class=\"tick\">{}/{} ({:.0}% of windows)</text>",
            x0 - 6.0,
            y + 12.0,
            esc(&k.kind),
            y,
            y,
            span * win,
            y + 4.0,
            span * k.recall,
            x0 + span + 4.0,
            y + 12.0,
            k.detected,
            k.incidents,
            100.0 * win
        );
    }
    s.push_str("</svg></figure>\n");
    s
}

fn delay_histogram(p: &Pictures) -> String {
    // Log-spaced bins from 10 s to 1 day, the last open.
    let edges = [
        0.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0,
    ];
    let labels = [
        "<30s", "30s-1m", "1-2m", "2-5m", "5-10m", "10-30m", "30m-1h", "1-2h", "2-6h", "6-24h",
        ">1d",
    ];
    let mut counts = [0u64; 11];
    for &d in &p.delays {
        let i = edges.iter().rposition(|&e| d >= e).unwrap_or(0);
        let i = if d >= 86400.0 { 10 } else { i };
        counts[i] += 1;
    }
    let most = counts.iter().copied().max().unwrap_or(1).max(1) as f64;
    let yt: Vec<(f64, String)> = (0..=4)
        .map(|i| {
            let v = most * i as f64 / 4.0;
            (v, format!("{v:.0}"))
        })
        .collect();
    let xt: Vec<(f64, String)> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (i as f64 + 0.5, l.to_string()))
        .collect();
    let (mut s, at) = frame(
        "Detection delay (incident start to the end of its first paged window)",
        "delay",
        "incidents",
        &xt,
        &yt,
        (0.0, 11.0),
        (0.0, most),
    );
    for (i, &c) in counts.iter().enumerate() {
        let (x, y) = at(i as f64 + 0.1, c as f64);
        let (x2, y0) = at(i as f64 + 0.9, 0.0);
        let _ = write!(
            s,
            "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\" class=\"bar\"><title>{}: {c}</title></rect>",
            x2 - x,
            (y0 - y).max(0.0),
            esc(labels[i])
        );
    }
    end_figure(s, &format!("{} detected incidents.", p.delays.len()))
}

fn timeline(t: &Timeline, alert_risk: f64) -> String {
    let Some(first) = t.points.first() else {
        return format!(
            "<figure><figcaption>{} — {}: no window of the token in view</figcaption></figure>\n",
            esc(&t.title),
            esc(&t.token)
        );
    };
    let x0 = first.0.min(t.span.0) as f64;
    let x1 = t.points.last().map_or(first.0, |p| p.0).max(t.span.1) as f64;
    let hours = ((x1 - x0) / 3_600_000.0).max(1e-9);
    let xt: Vec<(f64, String)> = (0..=4)
        .map(|i| {
            let x = x0 + (x1 - x0) * i as f64 / 4.0;
            (x, format!("+{:.1} h", hours * i as f64 / 4.0))
        })
        .collect();
    let yt: Vec<(f64, String)> = [0.0, 25.0, 50.0, 75.0, 100.0]
        .iter()
        .map(|&v| (v, format!("{v:.0}")))
        .collect();
    let (mut s, at) = frame(
        &format!("{} — {} (from {})", t.title, t.token, fmt_ts(x0 as i64)),
        "event time",
        "risk",
        &xt,
        &yt,
        (x0, x1),
        (0.0, 100.0),
    );
    // The incident or episode, shaded; labelled windows below the axis.
    let (a, top) = at(t.span.0 as f64, 100.0);
    let (b, bottom) = at(t.span.1 as f64, 0.0);
    let _ = write!(
        s,
        "<rect x=\"{a:.1}\" y=\"{top:.1}\" width=\"{:.1}\" height=\"{:.1}\" class=\"span\"/>",
        (b - a).max(1.0),
        bottom - top
    );
    let (l, y) = at(x0, alert_risk);
    let (r, _) = at(x1, alert_risk);
    let _ = write!(
        s,
        "<line x1=\"{l:.1}\" y1=\"{y:.1}\" x2=\"{r:.1}\" y2=\"{y:.1}\" class=\"threshold\"/>"
    );
    let pts = thin(&t.points);
    let line: Vec<String> = pts
        .iter()
        .map(|p| {
            let (x, y) = at(p.0 as f64, p.1 as f64);
            format!("{x:.1},{y:.1}")
        })
        .collect();
    let _ = write!(
        s,
        "<polyline points=\"{}\" class=\"line\"/>",
        line.join(" ")
    );
    for p in &pts {
        let (x, y) = at(p.0 as f64, p.1 as f64);
        if p.3 {
            let _ = write!(
                s,
                "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"3\" class=\"mark\"/>"
            );
        }
        if p.2 {
            let _ = write!(
                s,
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"2\" height=\"5\" class=\"label\"/>",
                x - 1.0,
                bottom + 2.0
            );
        }
    }
    let paged = t.points.iter().filter(|p| p.3).count();
    let labelled = t.points.iter().filter(|p| p.2).count();
    let max = t.points.iter().map(|p| p.1).fold(0.0f32, f32::max);
    end_figure(
        s,
        &format!(
            "{} windows shown, {labelled} labelled (ticks under the axis), {paged} paged (dots); highest risk {max:.1}; dashed: the alert threshold; shaded: the {}.",
            t.points.len(),
            if t.title.starts_with("missed") {
                "incident"
            } else {
                "episode"
            }
        ),
    )
}

/// The whole page.
pub fn html(report: &Report, pictures: &Pictures, title: &str) -> String {
    let mut s = format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title><style>{STYLE}</style></head><body>\n<h1>{}</h1>\n",
        esc(title),
        esc(title)
    );
    let _ = writeln!(
        s,
        "<p>{} events, {} windows of {} tokens replayed in {:.1} s ({:.0} events/s); model state {} B per token.</p>",
        report.events, report.windows, report.tokens, report.seconds, report.events_per_s, report.state_bytes_per_token.0
    );
    let Some(m) = &report.metrics else {
        s.push_str("<p>The file has no labels: no metrics.</p></body></html>\n");
        return s;
    };
    s.push_str("<h2>Summary</h2><table><tr><th>measure</th><th>value</th></tr>");
    let delay = m
        .median_delay_s
        .map_or("-".to_string(), |d| format!("{d:.0} s"));
    for (k, v) in [
        ("evaluated from", m.eval_from.clone()),
        ("windows evaluated", m.windows.to_string()),
        ("labelled windows", m.positive_windows.to_string()),
        ("alerting windows", m.alert_windows.to_string()),
        ("window precision", format!("{:.3}", m.precision)),
        ("window recall", format!("{:.3}", m.recall)),
        ("window F1", format!("{:.3}", m.f1)),
        ("PR-AUC", format!("{:.3}", m.pr_auc)),
        (
            "incidents detected",
            format!("{}/{}", m.incidents_detected, m.incidents),
        ),
        ("median detection delay", delay),
        ("alert episodes (policies)", m.episodes.to_string()),
        (
            "false alert episodes",
            format!(
                "{} over {} token-days = {:.2} per 1,000 token-days",
                m.false_alerts, m.token_days, m.false_alerts_per_1k_token_days
            ),
        ),
    ] {
        let _ = write!(s, "<tr><td>{}</td><td>{}</td></tr>", esc(k), esc(&v));
    }
    s.push_str("</table>\n<h2>Ranking and recall</h2>\n");
    s.push_str(&pr_curve(pictures, m));
    s.push_str(&kind_bars(m));
    s.push_str(&delay_histogram(pictures));
    s.push_str("<h2>Worst misses</h2>\n");
    if pictures.misses.is_empty() {
        s.push_str("<p>Every incident was paged.</p>\n");
    }
    for t in &pictures.misses {
        s.push_str(&timeline(t, pictures.alert_risk));
    }
    s.push_str("<h2>Noisiest false alerts</h2>\n");
    if pictures.noisy.is_empty() {
        s.push_str("<p>No false alert episode.</p>\n");
    }
    for t in &pictures.noisy {
        s.push_str(&timeline(t, pictures.alert_risk));
    }
    s.push_str("</body></html>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thin_keeps_ends_and_bounds_length() {
        let v: Vec<u32> = (0..10_001).collect();
        let t = thin(&v);
        assert!(t.len() <= crate::svg::MAX_POINTS + 1);
        assert_eq!(t.first(), Some(&0));
        assert_eq!(t.last(), Some(&10_000));
        assert_eq!(thin(&[1, 2, 3]), vec![1, 2, 3]);
    }

    #[test]
    fn delay_labels_are_escaped() {
        let p = Pictures {
            delays: vec![5.0, 100.0, 100_000.0],
            ..Default::default()
        };
        let s = delay_histogram(&p);
        assert!(s.contains("&lt;30s: 1") && s.contains("&gt;1d: 1"), "{s}");
        assert!(!s.contains("<30s"));
    }

    #[test]
    fn names_are_escaped() {
        let t = Timeline {
            token: "<script>alert(1)</script>".into(),
            title: "false alert".into(),
            span: (0, 60_000),
            points: vec![(0, 60.0, false, true), (60_000, 10.0, true, false)],
        };
        let s = timeline(&t, 50.0);
        assert!(!s.contains("<script>"), "{s}");
        assert!(s.contains("&lt;script&gt;"));
    }
}
