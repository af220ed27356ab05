//! What the console draws and the board alone does not keep: each token's recent windows
//! (risk over time, with the full contributions of the windows worth a look) and the alerts
//! per signal per hour. Filled by the engine thread as it publishes, bounded by a budget of
//! windows in all: when it is full, the timelines of the tokens whose recent windows were the
//! least risky go first, so the tokens an operator opens (the risky ones) keep their story.

use std::collections::VecDeque;
use std::sync::Arc;

use rustc_hash::FxHashMap;

use super::pb;
use crate::engine::WindowScore;
use crate::model::SignalKind;

/// Windows whose risk reaches this (or that alerted) keep their contributions and reasons;
/// the others keep risk and events only (their hover says so).
pub const DETAIL_MIN_RISK: f32 = 5.0;

/// Hours of alert counts kept.
const HOURS: usize = 48;

/// One window of a token.
#[derive(Debug, Clone)]
pub struct Point {
    /// Window start (ms).
    pub start: i64,
    /// Risk 0..100.
    pub risk: f32,
    /// Events in the window.
    pub events: u32,
    /// Whether the window alerted.
    pub alert: bool,
    /// The published score with its contributions, for windows worth a look.
    pub detail: Option<Arc<pb::TokenRisk>>,
}

#[derive(Default)]
struct Line {
    points: VecDeque<Point>,
    /// Calls per user agent over the token's recent windows (the top two of each window),
    /// at most `AGENTS` kept: a newcomer replaces the smallest, counts are halved when one
    /// would overflow.
    agents: Vec<(u64, u32)>,
}

/// User agents kept per timeline.
const AGENTS: usize = 6;

impl Line {
    fn count_agents(&mut self, top: &[(u64, u32); 2]) {
        for &(k, c) in top.iter().filter(|a| a.0 != 0 && a.1 > 0) {
            if let Some(a) = self.agents.iter_mut().find(|a| a.0 == k) {
                a.1 = a.1.saturating_add(c);
            } else if self.agents.len() < AGENTS {
                self.agents.push((k, c));
            } else if let Some(min) = self.agents.iter_mut().min_by_key(|a| a.1) {
                // Space-saving: the newcomer inherits the smallest count.
                *min = (k, min.1.saturating_add(c));
            }
            if self.agents.iter().any(|a| a.1 > u32::MAX / 2) {
                for a in self.agents.iter_mut() {
                    a.1 /= 2;
                }
            }
        }
    }
}

impl Line {
    fn max_risk(&self) -> f32 {
        self.points.iter().map(|p| p.risk).fold(0.0, f32::max)
    }
}

/// The timelines and the alert counts.
pub struct Timelines {
    lines: FxHashMap<Arc<str>, Line>,
    /// Points held in all.
    held: usize,
    /// Most points held in all (0: nothing is kept).
    budget: usize,
    /// Most points of one token (its last windows).
    per_token: usize,
    /// How far back (event time) a token's points go from its newest.
    span_ms: i64,
    /// A token without a timeline gets one, while the budget is full, only at this risk.
    floor: f32,
    /// Per event-time hour (hours since the epoch), alerting windows per top signal.
    hours: VecDeque<(i64, [u32; SignalKind::ALL.len()])>,
    /// Timelines dropped to stay in budget.
    pub dropped: u64,
}

impl Timelines {
    /// At most `budget` points in all, `per_token` per token, none older than `span_ms`
    /// before the token's newest.
    pub fn new(budget: usize, per_token: usize, span_ms: i64) -> Self {
        Timelines {
            lines: FxHashMap::default(),
            held: 0,
            budget,
            per_token: per_token.max(1),
            span_ms: span_ms.max(0),
            floor: 0.0,
            hours: VecDeque::new(),
            dropped: 0,
        }
    }

    /// Whether anything is kept.
    pub fn enabled(&self) -> bool {
        self.budget > 0
    }

    /// Record published windows (`built[i]` is the published form of `scores[i]`).
    pub fn record(&mut self, scores: &[WindowScore], built: &[(Arc<str>, Arc<pb::TokenRisk>)]) {
        if !self.enabled() {
            return;
        }
        for (s, (token, risk)) in scores.iter().zip(built) {
            if s.alert {
                self.count_alert(s);
            }
            let line = match self.lines.get_mut(token) {
                Some(l) => l,
                None => {
                    if self.held >= self.budget && s.risk < self.floor {
                        continue;
                    }
                    self.lines.entry(token.clone()).or_default()
                }
            };
            line.count_agents(&s.agents);
            let detail = (s.alert || s.risk >= DETAIL_MIN_RISK).then(|| risk.clone());
            line.points.push_back(Point {
                start: s.start,
                risk: s.risk,
                events: s.events,
                alert: s.alert,
                detail,
            });
            self.held += 1;
            while line.points.len() > self.per_token
                || line
                    .points
                    .front()
                    .is_some_and(|p| p.start < s.start.saturating_sub(self.span_ms))
            {
                line.points.pop_front();
                self.held -= 1;
            }
        }
        if self.held > self.budget {
            self.prune();
        }
    }

    /// Drop the least risky timelines until a tenth of the budget is free again.
    fn prune(&mut self) {
        let mut by_risk: Vec<(f32, Arc<str>, usize)> = self
            .lines
            .iter()
            .map(|(t, l)| (l.max_risk(), t.clone(), l.points.len()))
            .collect();
        by_risk.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
        let target = self.budget - self.budget / 10;
        let mut floor = self.floor;
        for (risk, token, n) in by_risk {
            if self.held <= target {
                break;
            }
            self.lines.remove(&token);
            self.held -= n;
            self.dropped += 1;
            floor = risk;
        }
        self.floor = floor;
    }

    fn count_alert(&mut self, s: &WindowScore) {
        let hour = s.start.div_euclid(3_600_000);
        let Some(top) = s.contributions.first().map(|c| c.signal.index()) else {
            return;
        };
        let pos = self.hours.iter().rposition(|(h, _)| *h <= hour);
        match pos {
            Some(i) if self.hours[i].0 == hour => self.hours[i].1[top] += 1,
            Some(i) => {
                let mut c = [0; SignalKind::ALL.len()];
                c[top] = 1;
                self.hours.insert(i + 1, (hour, c));
            }
            None if self.hours.len() < HOURS => {
                let mut c = [0; SignalKind::ALL.len()];
                c[top] = 1;
                self.hours.push_front((hour, c));
            }
            None => {} // older than everything kept
        }
        while self.hours.len() > HOURS {
            self.hours.pop_front();
        }
    }

    /// A token's recent windows, oldest first.
    pub fn of(&self, token: &str) -> Vec<Point> {
        self.lines
            .get(token)
            .map(|l| l.points.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// A token's user agents over its recent windows (key, calls), most calls first.
    pub fn agents_of(&self, token: &str) -> Vec<(u64, u32)> {
        let mut v = self
            .lines
            .get(token)
            .map(|l| l.agents.clone())
            .unwrap_or_default();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v
    }

    /// Alerting windows per top signal over the 24 event-time hours up to the newest one
    /// with an alert: (hour start ms, counts by `SignalKind::index`).
    pub fn alert_hours(&self) -> Vec<(i64, [u32; SignalKind::ALL.len()])> {
        let Some(&(last, _)) = self.hours.back() else {
            return Vec::new();
        };
        self.hours
            .iter()
            .filter(|(h, _)| *h > last - 24)
            .map(|(h, c)| (h * 3_600_000, *c))
            .collect()
    }

    /// Forget tokens (evicted from the engine: the console follows its budget).
    pub fn forget(&mut self, tokens: &[Arc<str>]) {
        for t in tokens {
            if let Some(l) = self.lines.remove(t) {
                self.held -= l.points.len();
            }
        }
    }

    /// Points held, timelines held.
    pub fn size(&self) -> (usize, usize) {
        (self.held, self.lines.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn score(token: &str, start: i64, risk: f32, alert: bool) -> WindowScore {
        WindowScore {
            token: token.into(),
            start,
            risk,
            alert,
            events: 1,
            learned: true,
            labelled: 0,
            kind: None,
            contributions: vec![crate::engine::Contribution {
                signal: SignalKind::Rate,
                observed: 1.0,
                expected: 1.0,
                p: 0.01,
                evidence: 1.0,
                reason: "r".into(),
            }],
            confidence: 1.0,
            agents: Default::default(),
        }
    }

    fn publish(t: &mut Timelines, s: Vec<WindowScore>) {
        let built: Vec<_> = s
            .iter()
            .map(|s| (s.token.clone(), Arc::new(pb::TokenRisk::from(s))))
            .collect();
        t.record(&s, &built);
    }

    #[test]
    fn the_riskiest_timelines_stay_within_the_budget() {
        let mut t = Timelines::new(100, 10, i64::MAX);
        for w in 0..10i64 {
            let s = (0..20)
                .map(|i| score(&format!("t{i}"), w * 60_000, i as f32, false))
                .collect();
            publish(&mut t, s);
        }
        let (held, lines) = t.size();
        assert!(held <= 100, "{held}");
        assert!(lines < 20 && t.dropped > 0);
        // The riskiest token keeps its last 10 windows; the quietest lost its timeline.
        assert_eq!(t.of("t19").len(), 10);
        assert!(t.of("t0").is_empty());
        // Detail only where the risk is worth a look.
        let p = t.of("t19");
        assert!(p.iter().all(|p| p.detail.is_some()));
        publish(&mut t, vec![score("t19", 99 * 60_000, 1.0, false)]);
        assert!(t.of("t19").last().unwrap().detail.is_none());
        // Older than the span from the newest: gone.
        let mut short = Timelines::new(100, 10, 120_000);
        for w in 0..5i64 {
            publish(&mut short, vec![score("s", w * 60_000, 1.0, false)]);
        }
        assert_eq!(
            short.of("s").iter().map(|p| p.start).collect::<Vec<_>>(),
            vec![120_000, 180_000, 240_000]
        );
        let mut ua = Timelines::new(100, 10, i64::MAX);
        for w in 0..4i64 {
            let mut s = score("u", w * 60_000, 1.0, false);
            s.agents = [(7, 10), (if w == 3 { 9 } else { 0 }, 2)];
            publish(&mut ua, vec![s]);
        }
        assert_eq!(ua.agents_of("u"), vec![(7, 40), (9, 2)]);
        t.forget(&["t19".into()]);
        assert!(t.of("t19").is_empty());
        assert_eq!(
            t.size().0,
            t.lines.values().map(|l| l.points.len()).sum::<usize>()
        );
    }

    #[test]
    fn alerts_are_counted_per_hour_and_top_signal() {
        let mut t = Timelines::new(10, 10, i64::MAX);
        let h = 3_600_000;
        publish(
            &mut t,
            vec![
                score("a", 5 * h, 90.0, true),
                score("b", 5 * h + 1, 90.0, true),
                score("a", 7 * h, 90.0, true),
                score("c", 6 * h, 90.0, true), // late: lands in its own hour
                score("c", 6 * h + 5, 10.0, false),
            ],
        );
        let hours = t.alert_hours();
        let r = SignalKind::Rate.index();
        assert_eq!(
            hours
                .iter()
                .map(|(s, c)| (*s / h, c[r]))
                .collect::<Vec<_>>(),
            vec![(5, 2), (6, 1), (7, 1)]
        );
    }
}
