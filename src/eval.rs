//! Replays an events file through the [`Engine`] (learning throughout, scoring each window
//! before learning it) and, when the file carries labels, measures detection quality on the
//! evaluation period: window-level precision / recall / F1 at the alert threshold, PR-AUC,
//! incident recall per kind, median detection delay and false alerts per 1,000 token-days.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use rustc_hash::FxHashMap;
use serde::Serialize;

use crate::config::Config;
use crate::engine::{Engine, WindowScore};
use crate::event::fmt_ts;
use crate::ingest::{self, BadRowPolicy, EventReader, RawReader};
use crate::model::registry::Registry;
use crate::output::ScoresWriter;

/// Errors of a replay.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading input.
    #[error(transparent)]
    Ingest(#[from] ingest::Error),
    /// Writing output.
    #[error(transparent)]
    Output(#[from] crate::output::Error),
    /// Engine.
    #[error(transparent)]
    Engine(#[from] crate::engine::Error),
    /// Anything else, with context.
    #[error("{0}")]
    Other(String),
}

/// Where training ends and evaluation begins.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Split {
    /// Windows starting at or after this time are evaluated.
    Until(i64),
    /// This fraction of the file's time span is training.
    Fraction(f64),
}

/// What to replay and where to write.
#[derive(Debug, Clone)]
pub struct Options {
    /// Events file.
    pub events: PathBuf,
    /// Registry file.
    pub tokens: Option<PathBuf>,
    /// Train / eval split.
    pub split: Split,
    /// Window scores file.
    pub scores_out: Option<PathBuf>,
    /// Incidents file (`token_id, kind, start, end`); derived from labels when absent.
    pub incidents: Option<PathBuf>,
    /// Bad row policy.
    pub on_bad_row: BadRowPolicy,
    /// Show a progress bar.
    pub progress: bool,
    /// Alert windows of one token closer than this form one alert (ms).
    pub alert_gap_ms: i64,
    /// Labelled windows of one token and kind closer than this form one incident (ms).
    pub incident_gap_ms: i64,
    /// How many of the riskiest tokens to keep.
    pub top: usize,
    /// Compute metrics (eval); false for a plain replay, where every window is scored
    /// alike and the file's labels, if any, are ignored.
    pub measure: bool,
    /// Start from this model snapshot instead of an untrained engine.
    pub snapshot: Option<PathBuf>,
    /// Operator verdicts to replay (`token_id,window_start,verdict`: the first window of an
    /// alert, as `alerts_out` writes them).
    pub feedback: Option<PathBuf>,
    /// Event time between an alert's first window and its verdict.
    pub feedback_delay_ms: i64,
    /// Write each evaluated alert (first window, last window, the verdict the labels give).
    pub alerts_out: Option<PathBuf>,
    /// Write a self-contained HTML report of the evaluation (`report`).
    pub report: Option<PathBuf>,
    /// Alert policies, as the server runs them (`respond::policy`): which windows page
    /// someone. Incidents, alert episodes and false alert episodes are counted from them.
    pub policies: Vec<crate::respond::policy::Policy>,
}

impl Options {
    /// Defaults for a file.
    pub fn new(events: PathBuf) -> Self {
        Options {
            events,
            tokens: None,
            split: Split::Fraction(0.67),
            scores_out: None,
            incidents: None,
            on_bad_row: BadRowPolicy::Skip,
            progress: false,
            alert_gap_ms: 30 * 60_000,
            incident_gap_ms: 24 * 3_600_000,
            top: 10,
            measure: true,
            snapshot: None,
            feedback: None,
            feedback_delay_ms: 30 * 60_000,
            alerts_out: None,
            report: None,
            policies: crate::respond::policy::parse(
                crate::respond::policy::DEFAULT_POLICIES,
                "models/policies.toml",
            )
            .unwrap_or_default(),
        }
    }
}

/// Recall for one incident kind.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct KindRecall {
    /// Kind.
    pub kind: String,
    /// Incidents.
    pub incidents: u64,
    /// Incidents with at least one alert while they lasted.
    pub detected: u64,
    /// detected / incidents.
    pub recall: f64,
    /// Labelled windows of this kind.
    pub windows: u64,
    /// Labelled windows of this kind that alerted.
    pub windows_alerted: u64,
    /// Median delay from incident start to the end of the first alerting window (s).
    pub median_delay_s: Option<f64>,
}

/// Detection quality on the evaluation period.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Metrics {
    /// Evaluation period start (RFC 3339).
    pub eval_from: String,
    /// Windows scored in the evaluation period.
    pub windows: u64,
    /// Windows with labelled events.
    pub positive_windows: u64,
    /// Alerting windows.
    pub alert_windows: u64,
    /// True positives (alerting, labelled).
    pub tp: u64,
    /// False positives.
    pub fp: u64,
    /// False negatives.
    pub fn_: u64,
    /// Precision at the alert threshold.
    pub precision: f64,
    /// Recall at the alert threshold.
    pub recall: f64,
    /// F1 at the alert threshold.
    pub f1: f64,
    /// Area under the precision-recall curve (average precision over risk).
    pub pr_auc: f64,
    /// Incidents.
    pub incidents: u64,
    /// Incidents detected.
    pub incidents_detected: u64,
    /// Per kind.
    pub per_kind: Vec<KindRecall>,
    /// Median detection delay over all detected incidents (s).
    pub median_delay_s: Option<f64>,
    /// Alert episodes that touch no labelled window and no incident of that token.
    pub false_alerts: u64,
    /// Alert episodes: runs of paged windows of one token (policies, gap <= 30 min).
    pub episodes: u64,
    /// Distinct (token, UTC day) pairs with traffic in the evaluation period.
    pub token_days: u64,
    /// false_alerts per 1,000 token-days.
    pub false_alerts_per_1k_token_days: f64,
    /// Verdicts replayed (`--feedback`).
    pub verdicts_applied: u64,
}

/// What a replay did.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Events applied.
    pub events: u64,
    /// Bad rows skipped.
    pub bad_rows: u64,
    /// Late events dropped.
    pub late_events: u64,
    /// Windows scored.
    pub windows: u64,
    /// Alerting windows (whole replay).
    pub alerts: u64,
    /// Tokens seen.
    pub tokens: u64,
    /// Wall seconds.
    pub seconds: f64,
    /// Events per second.
    pub events_per_s: f64,
    /// Bytes of model state per token in memory / encoded.
    pub state_bytes_per_token: (usize, usize),
    /// Metrics, when the file had labels.
    pub metrics: Option<Metrics>,
    /// The riskiest tokens of the evaluation period, highest first.
    #[serde(skip)]
    pub riskiest: Vec<WindowScore>,
    /// First bad-row errors, for people.
    #[serde(skip)]
    pub bad_row_summary: String,
}

/// Time span (min, max event time) of a file, reading only `ts` where the format allows.
pub fn time_span(path: &Path) -> Result<(i64, i64), Error> {
    let mut r = RawReader::open(path, &["ts"])?;
    let (mut lo, mut hi) = (i64::MAX, i64::MIN);
    while let Some((b, _)) = r.next_batch()? {
        let Ok(i) = b.schema().index_of("ts") else {
            return Err(Error::Other(format!("{}: no `ts` column", path.display())));
        };
        let a = b.column(i);
        let ms = match a.data_type() {
            arrow::datatypes::DataType::Utf8 => {
                use arrow::array::AsArray;
                a.as_string::<i32>()
                    .iter()
                    .flatten()
                    .filter_map(|s| crate::event::parse_ts(s).ok())
                    .collect::<Vec<i64>>()
            }
            _ => {
                use arrow::array::AsArray;
                let c = arrow::compute::cast(
                    a,
                    &arrow::datatypes::DataType::Timestamp(
                        arrow::datatypes::TimeUnit::Millisecond,
                        None,
                    ),
                )
                .and_then(|c| arrow::compute::cast(&c, &arrow::datatypes::DataType::Int64))
                .map_err(|e| Error::Other(format!("{}: ts: {e}", path.display())))?;
                c.as_primitive::<arrow::datatypes::Int64Type>()
                    .iter()
                    .flatten()
                    .collect()
            }
        };
        for t in ms {
            lo = lo.min(t);
            hi = hi.max(t);
        }
    }
    if lo > hi {
        return Err(Error::Other(format!("{}: no events", path.display())));
    }
    Ok((lo, hi))
}

fn parquet_rows(path: &Path) -> Option<u64> {
    let f = std::fs::File::open(path).ok()?;
    let r = parquet::file::reader::SerializedFileReader::new(f).ok()?;
    use parquet::file::reader::FileReader;
    Some(r.metadata().file_metadata().num_rows() as u64)
}

/// A compact record of one evaluated window.
struct Rec {
    token: u32,
    start: i64,
    risk: f32,
    alert: bool,
    /// An alert policy fired on or updated an alert with this window (someone is paged).
    paged: bool,
    positive: bool,
    kind: u16,
}

/// Replay `opts.events` through a fresh engine; measure when labels are present.
pub fn run(cfg: Config, registry: Registry, opts: &Options) -> Result<Report, Error> {
    let split_at = match opts.split {
        Split::Until(t) => t,
        Split::Fraction(f) => {
            let (lo, hi) = time_span(&opts.events)?;
            lo + ((hi - lo) as f64 * f.clamp(0.0, 1.0)) as i64
        }
    };
    let window_ms = cfg.window.size.ms;
    let alert_risk = cfg.score.alert_risk;
    let split_at = match split_at {
        i64::MIN | i64::MAX => split_at,
        t => crate::window::window_start(t, window_ms),
    };
    let measure = opts.measure;
    let mut engine = match &opts.snapshot {
        None => Engine::new(cfg, registry),
        Some(p) => {
            let (snap, _) =
                crate::store::snapshot::read(p).map_err(|e| Error::Other(e.to_string()))?;
            Engine::restore(cfg, registry, &snap)
                .map_err(|e| Error::Other(format!("{}: {e}", p.display())))?
        }
    };
    let mut reader = EventReader::open(&opts.events, opts.on_bad_row)?;
    let mut writer = match &opts.scores_out {
        Some(p) => Some(ScoresWriter::create(p)?),
        None => None,
    };
    let bar = if opts.progress {
        let pb = match parquet_rows(&opts.events) {
            Some(n) => indicatif::ProgressBar::new(n),
            None => indicatif::ProgressBar::new_spinner(),
        };
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:40} {human_pos}/{human_len} events ({per_sec})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb
    } else {
        indicatif::ProgressBar::hidden()
    };
    let verdicts = match &opts.feedback {
        Some(p) => read_verdicts(p)?,
        None => FxHashMap::default(),
    };
    // Alerts seen so far per token (first, last window), and verdicts waiting for their
    // time; shared by the score handler and the loop that applies them.
    let pending: std::cell::RefCell<Vec<Pending>> = Default::default();
    let mut runs: FxHashMap<Arc<str>, (i64, i64)> = FxHashMap::default();
    let mut tokens: FxHashMap<Arc<str>, u32> = FxHashMap::default();
    let mut kinds: Vec<String> = vec![String::new()];
    let mut recs: Vec<Rec> = Vec::new();
    let mut any_label = false;
    let mut riskiest: FxHashMap<Arc<str>, WindowScore> = FxHashMap::default();
    let started = Instant::now();
    // The server's alerting path: the same policies over the same windows, in order.
    let mut policies = crate::respond::policy::Policies::new(opts.policies.clone(), window_ms);
    let mut handle =
        |scores: Vec<WindowScore>, writer: &mut Option<ScoresWriter>| -> Result<(), Error> {
            for s in scores {
                let eval = s.start >= split_at;
                let paged = !policies.judge(&s).is_empty();
                let phase = match (measure, eval) {
                    (false, _) => "replay",
                    (true, true) => "eval",
                    (true, false) => "train",
                };
                if eval && s.alert && !verdicts.is_empty() {
                    let gap = opts.alert_gap_ms;
                    let run = runs.entry(s.token.clone()).or_insert((i64::MIN, i64::MIN));
                    if run.1 == i64::MIN || s.start - run.1 > gap {
                        *run = (s.start, s.start);
                        if let Some(&v) = verdicts.get(&(s.token.to_string(), s.start)) {
                            pending.borrow_mut().push(Pending {
                                token: s.token.clone(),
                                first: s.start,
                                last: s.start,
                                due: s.start.saturating_add(opts.feedback_delay_ms),
                                verdict: v,
                                signals: s.contributions.iter().take(2).map(|c| c.signal).collect(),
                            });
                        }
                    } else {
                        run.1 = s.start;
                        for p in pending.borrow_mut().iter_mut() {
                            if p.token == s.token && p.first == run.0 {
                                p.last = s.start;
                            }
                        }
                    }
                }
                if eval {
                    if s.labelled > 0 {
                        any_label = true;
                    }
                    let t = match tokens.get(&s.token) {
                        Some(&t) => t,
                        None => {
                            let t = tokens.len() as u32;
                            tokens.insert(s.token.clone(), t);
                            t
                        }
                    };
                    let kind = match &s.kind {
                        None => 0,
                        Some(k) => match kinds.iter().position(|x| x == k) {
                            Some(i) => i as u16,
                            None => {
                                kinds.push(k.clone());
                                (kinds.len() - 1) as u16
                            }
                        },
                    };
                    recs.push(Rec {
                        token: t,
                        start: s.start,
                        risk: s.risk,
                        alert: s.alert,
                        paged,
                        positive: s.labelled > 0,
                        kind,
                    });
                    // A copy only when a token's peak rises (a few times per token).
                    let better = riskiest.get(&s.token).is_none_or(|b| s.risk > b.risk);
                    if better && s.risk > 0.0 {
                        riskiest.insert(s.token.clone(), s.clone());
                    }
                }
                if let Some(w) = writer.as_mut() {
                    w.write(s, phase)?;
                }
            }
            Ok(())
        };
    // Decoding and validation run on their own thread, a few batches ahead of the engine
    // (a bounded channel: memory stays flat whatever the file size).
    let (tx, rx) = std::sync::mpsc::sync_channel::<arrow::record_batch::RecordBatch>(4);
    let mut applied = 0u64;
    let read = std::thread::scope(|sc| -> Result<ingest::ReadReport, Error> {
        let producer = std::thread::Builder::new()
            .name("tokenwatch-reader".into())
            .spawn_scoped(sc, move || -> Result<ingest::ReadReport, ingest::Error> {
                while let Some(batch) = reader.next_batch()? {
                    if tx.send(batch).is_err() {
                        break; // the engine side stopped on an error
                    }
                }
                Ok(reader.report().clone())
            })
            .map_err(|e| Error::Other(format!("cannot start the reader thread: {e}")))?;
        let mut consumed: Result<(), Error> = Ok(());
        for batch in rx.iter() {
            bar.inc(batch.num_rows() as u64);
            let step = engine
                .apply(&batch)
                .map_err(Error::from)
                .and_then(|out| handle(out, &mut writer));
            // The operator answers once the verdict is due (event time).
            let wm = engine.watermark();
            pending.borrow_mut().retain(|p| {
                if p.due > wm {
                    return true;
                }
                engine.feedback(&p.token, (p.first, p.last), p.verdict, &p.signals);
                applied += 1;
                false
            });
            if let Err(e) = step {
                consumed = Err(e);
                break;
            }
        }
        drop(rx);
        let report = producer
            .join()
            .map_err(|_| Error::Other("the reader thread panicked".into()))??;
        consumed?;
        Ok(report)
    })?;
    handle(engine.finish(), &mut writer)?;
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    if let Some(w) = writer {
        w.finish()?;
    }
    let stats = engine.stats();
    let mut report_pictures: Option<(PathBuf, crate::report::Pictures)> = None;
    let metrics = if any_label && measure {
        let incidents = match &opts.incidents {
            Some(p) => Some(read_incidents(p, &tokens, &mut kinds)?),
            None => None,
        };
        let mut alerts = Vec::new();
        let mut measured = Measured::default();
        let mut m = compute_metrics(
            &recs,
            &kinds,
            incidents,
            split_at,
            window_ms,
            opts,
            (&mut alerts, &mut measured),
        );
        m.verdicts_applied = applied;
        let mut names: Vec<&str> = vec![""; tokens.len()];
        for (name, &i) in &tokens {
            names[i as usize] = name;
        }
        if let Some(p) = &opts.report {
            let pics = pictures(
                &recs,
                measured,
                &alerts,
                (&names, &kinds),
                window_ms,
                alert_risk,
            );
            report_pictures = Some((p.clone(), pics));
        }
        if let Some(p) = &opts.alerts_out {
            let mut text = String::from("token_id,window_start,last_window_start,verdict\n");
            for (t, first, last, truth) in alerts {
                text += &format!(
                    "{},{},{},{}\n",
                    names[t as usize],
                    fmt_ts(first),
                    fmt_ts(last),
                    if truth {
                        "true_positive"
                    } else {
                        "false_positive"
                    }
                );
            }
            std::fs::write(p, text).map_err(|e| Error::Other(format!("{}: {e}", p.display())))?;
        }
        Some(m)
    } else {
        None
    };
    let mut top: Vec<WindowScore> = riskiest.into_values().collect();
    top.sort_by(|a, b| {
        b.risk
            .total_cmp(&a.risk)
            .then_with(|| a.token.cmp(&b.token))
    });
    top.truncate(opts.top);
    let rr = &read;

    let report = Report {
        events: stats.events,
        bad_rows: rr.bad_rows,
        late_events: stats.late,
        windows: stats.windows,
        alerts: stats.alerts,
        tokens: stats.tokens,
        seconds,
        events_per_s: stats.events as f64 / seconds.max(1e-9),
        state_bytes_per_token: engine.state_bytes(),
        metrics,
        riskiest: top,
        bad_row_summary: if rr.bad_rows > 0 {
            rr.summary()
        } else {
            String::new()
        },
    };
    if let Some(path) = &opts.report {
        let pics = report_pictures.map(|p| p.1).unwrap_or_default();
        let title = format!("tokenwatch eval: {}", opts.events.display());
        std::fs::write(path, crate::report::html(&report, &pics, &title))
            .map_err(|e| Error::Other(format!("{}: {e}", path.display())))?;
    }
    Ok(report)
}

/// An incident: token, kind index, start, end (ms).
type Incident = (u32, u16, i64, i64);

/// An alert episode: token, first and last paged window start (ms), touches the truth.
type Episode = (u32, i64, i64, bool);

/// Per token, its windows in time order.
fn by_token(recs: &[Rec]) -> BTreeMap<u32, Vec<&Rec>> {
    let mut by: BTreeMap<u32, Vec<&Rec>> = BTreeMap::new();
    for r in recs {
        by.entry(r.token).or_default().push(r);
    }
    for v in by.values_mut() {
        v.sort_by_key(|r| r.start);
    }
    by
}

/// What `compute_metrics` found on the way that the HTML report draws.
#[derive(Debug, Default)]
struct Measured {
    /// (recall, precision) after each block of equal risk, highest first.
    pr: Vec<(f64, f64)>,
    /// Detection delays (s).
    delays: Vec<f64>,
    /// Incidents no page caught.
    missed: Vec<Incident>,
}

/// Timelines drawn per section of the report.
const REPORT_TIMELINES: usize = 5;
/// Event time shown before and after an incident or episode in its timeline.
const REPORT_MARGIN_MS: i64 = 3 * 3_600_000;

/// What the HTML report draws: the PR curve and the delays `compute_metrics` measured, and
/// the timelines of the longest missed incidents and of the false episodes that paged most.
fn pictures(
    recs: &[Rec],
    measured: Measured,
    alerts: &[Episode],
    (names, kinds): (&[&str], &[String]),
    window_ms: i64,
    alert_risk: f64,
) -> crate::report::Pictures {
    let by_token = by_token(recs);
    let line = |t: u32, title: String, (s, e): (i64, i64)| crate::report::Timeline {
        token: names.get(t as usize).copied().unwrap_or("?").to_string(),
        title,
        span: (s, e),
        points: by_token
            .get(&t)
            .map(|v| {
                v.iter()
                    .filter(|r| r.start >= s - REPORT_MARGIN_MS && r.start <= e + REPORT_MARGIN_MS)
                    .map(|r| (r.start, r.risk, r.positive, r.paged))
                    .collect()
            })
            .unwrap_or_default(),
    };
    let mut missed: Vec<(i64, u32, u16, i64, i64)> = measured
        .missed
        .iter()
        .map(|&(t, k, s, e)| (e - s, t, k, s, e))
        .collect();
    missed.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let misses = missed
        .iter()
        .take(REPORT_TIMELINES)
        .map(|&(_, t, k, s, e)| {
            let kind = kinds.get(k as usize).map_or("", |k| k.as_str());
            line(t, format!("missed {kind}"), (s, e + window_ms))
        })
        .collect();
    let mut noisy: Vec<(usize, u32, i64, i64)> = alerts
        .iter()
        .filter(|a| !a.3)
        .map(|&(t, first, last, _)| {
            let paged = by_token.get(&t).map_or(0, |v| {
                v.iter()
                    .filter(|r| r.paged && r.start >= first && r.start <= last)
                    .count()
            });
            (paged, t, first, last)
        })
        .collect();
    noisy.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let noisy = noisy
        .iter()
        .take(REPORT_TIMELINES)
        .map(|&(n, t, first, last)| {
            line(
                t,
                format!("false alert, {n} paged windows"),
                (first, last + window_ms),
            )
        })
        .collect();
    crate::report::Pictures {
        pr: measured.pr,
        delays: measured.delays,
        misses,
        noisy,
        alert_risk,
    }
}

fn read_incidents(
    path: &Path,
    tokens: &FxHashMap<Arc<str>, u32>,
    kinds: &mut Vec<String>,
) -> Result<Vec<Incident>, Error> {
    let mut r = RawReader::open(path, &["token_id", "kind", "start", "end"])?;
    let mut out = Vec::new();
    while let Some((b, first)) = r.next_batch()? {
        use arrow::array::{Array, AsArray};
        let get = |name: &str| -> Result<arrow::array::StringArray, Error> {
            let i = b.schema().index_of(name).map_err(|_| {
                Error::Other(format!("{}: column `{name}` missing", path.display()))
            })?;
            let a = arrow::compute::cast(b.column(i), &arrow::datatypes::DataType::Utf8)
                .map_err(|e| Error::Other(e.to_string()))?;
            Ok(a.as_string::<i32>().clone())
        };
        let (tk, kd, st, en) = (get("token_id")?, get("kind")?, get("start")?, get("end")?);
        for i in 0..b.num_rows() {
            if !tk.is_valid(i) || !st.is_valid(i) || !en.is_valid(i) {
                continue;
            }
            let Some(&t) = tokens.get(tk.value(i)) else {
                continue; // token never seen in the evaluation period
            };
            let parse = |s: &str| {
                crate::event::parse_ts(s).map_err(|e| {
                    Error::Other(format!("{}: row {}: {e}", path.display(), first + i as u64))
                })
            };
            let k = if kd.is_valid(i) { kd.value(i) } else { "" };
            let ki = match kinds.iter().position(|x| x == k) {
                Some(x) => x as u16,
                None => {
                    kinds.push(k.to_string());
                    (kinds.len() - 1) as u16
                }
            };
            out.push((t, ki, parse(st.value(i))?, parse(en.value(i))?));
        }
    }
    Ok(out)
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// A verdict waiting for its time in `eval --feedback`.
struct Pending {
    token: Arc<str>,
    first: i64,
    last: i64,
    due: i64,
    verdict: crate::engine::Verdict,
    signals: Vec<crate::model::SignalKind>,
}

/// `token_id,window_start,verdict[,...]` rows (header first; extra columns ignored).
fn read_verdicts(path: &Path) -> Result<FxHashMap<(String, i64), crate::engine::Verdict>, Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Other(format!("{}: {e}", path.display())))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .collect();
    let col = |name: &str| {
        header.iter().position(|h| *h == name).ok_or_else(|| {
            Error::Other(format!(
                "{}: no `{name}` column in the header",
                path.display()
            ))
        })
    };
    let (ct, cw, cv) = (col("token_id")?, col("window_start")?, col("verdict")?);
    let mut out = FxHashMap::default();
    for (i, line) in lines.enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        let bad = |what: &str| Error::Other(format!("{}: row {}: {what}", path.display(), i + 1));
        let (Some(t), Some(w), Some(v)) = (f.get(ct), f.get(cw), f.get(cv)) else {
            return Err(bad("too few fields"));
        };
        let w = crate::event::parse_ts(w).map_err(|e| bad(&format!("window_start: {e}")))?;
        let v = crate::engine::Verdict::parse(v).ok_or_else(|| {
            bad("verdict must be true_positive, false_positive or expected_change")
        })?;
        out.insert((t.to_string(), w), v);
    }
    Ok(out)
}

fn compute_metrics(
    recs: &[Rec],
    kinds: &[String],
    incidents: Option<Vec<Incident>>,
    split_at: i64,
    window_ms: i64,
    opts: &Options,
    (alerts, seen_out): (&mut Vec<Episode>, &mut Measured),
) -> Metrics {
    let (mut tp, mut fp, mut fn_) = (0u64, 0u64, 0u64);
    for r in recs {
        match (r.alert, r.positive) {
            (true, true) => tp += 1,
            (true, false) => fp += 1,
            (false, true) => fn_ += 1,
            _ => {}
        }
    }
    let precision = if tp + fp > 0 {
        tp as f64 / (tp + fp) as f64
    } else {
        0.0
    };
    let recall = if tp + fn_ > 0 {
        tp as f64 / (tp + fn_) as f64
    } else {
        0.0
    };
    let f1 = if precision + recall > 0.0 {
        2.0 * precision * recall / (precision + recall)
    } else {
        0.0
    };
    // Average precision over the risk ranking; ties are ranked as one block.
    let mut order: Vec<(f32, bool)> = recs.iter().map(|r| (r.risk, r.positive)).collect();
    order.sort_by(|a, b| b.0.total_cmp(&a.0));
    let total_pos = order.iter().filter(|x| x.1).count() as f64;
    let (mut ap, mut seen, mut seen_pos, mut i) = (0.0, 0.0, 0.0, 0);
    let pr = &mut seen_out.pr;
    while i < order.len() {
        let mut j = i;
        let mut block_pos = 0.0;
        while j < order.len() && order[j].0 == order[i].0 {
            if order[j].1 {
                block_pos += 1.0;
            }
            j += 1;
        }
        seen += (j - i) as f64;
        seen_pos += block_pos;
        if block_pos > 0.0 {
            ap += block_pos * (seen_pos / seen);
        }
        pr.push((seen_pos / total_pos.max(1.0), seen_pos / seen));
        i = j;
    }
    let pr_auc = if total_pos > 0.0 { ap / total_pos } else { 0.0 };

    let by_token = by_token(recs);
    // Incidents: given, or runs of labelled windows of one token and kind.
    let incidents: Vec<Incident> = match incidents {
        Some(v) => v.into_iter().filter(|i| i.3 >= split_at).collect(),
        None => {
            let mut out = Vec::new();
            for (&t, v) in &by_token {
                let mut open: FxHashMap<u16, (i64, i64)> = FxHashMap::default();
                for r in v.iter().filter(|r| r.positive) {
                    match open.get_mut(&r.kind) {
                        Some(span) if r.start - span.1 <= opts.incident_gap_ms => {
                            span.1 = r.start + window_ms
                        }
                        _ => {
                            if let Some(span) = open.insert(r.kind, (r.start, r.start + window_ms))
                            {
                                out.push((t, r.kind, span.0, span.1));
                            }
                        }
                    }
                }
                for (k, span) in open {
                    out.push((t, k, span.0, span.1));
                }
            }
            out.sort();
            out
        }
    };
    let mut per_kind: BTreeMap<u16, (u64, u64, Vec<f64>, u64, u64)> = BTreeMap::new();
    let mut all_delays = Vec::new();
    let mut detected_total = 0;
    for &(t, k, s, e) in &incidents {
        let entry = per_kind.entry(k).or_default();
        entry.0 += 1;
        let first_alert = by_token.get(&t).and_then(|v| {
            v.iter()
                .find(|r| r.paged && r.start + window_ms > s && r.start <= e)
        });
        if let Some(a) = first_alert {
            entry.1 += 1;
            detected_total += 1;
            let d = ((a.start + window_ms - s).max(0)) as f64 / 1000.0;
            entry.2.push(d);
            all_delays.push(d);
        } else {
            seen_out.missed.push((t, k, s, e));
        }
    }
    seen_out.delays.clone_from(&all_delays);
    for r in recs.iter().filter(|r| r.positive) {
        let e = per_kind.entry(r.kind).or_default();
        e.3 += 1;
        if r.alert {
            e.4 += 1;
        }
    }
    let per_kind = per_kind
        .into_iter()
        .map(|(k, (n, d, mut delays, w, wa))| KindRecall {
            kind: kinds.get(k as usize).cloned().unwrap_or_default(),
            incidents: n,
            detected: d,
            recall: if n > 0 { d as f64 / n as f64 } else { 0.0 },
            windows: w,
            windows_alerted: wa,
            median_delay_s: median(&mut delays),
        })
        .collect();
    // Alert episodes: runs of paged windows per token (an alert policy fired or updated an
    // alert with them; gap <= alert gap); false when touching no labelled window and no
    // incident span of the token.
    let mut token_days = std::collections::HashSet::new();
    for (&t, v) in &by_token {
        let spans: Vec<(i64, i64)> = incidents
            .iter()
            .filter(|i| i.0 == t)
            .map(|i| (i.2, i.3))
            .collect();
        // (first alert start, last alert start, touches truth)
        let mut run: Option<(i64, i64, bool)> = None;
        for r in v {
            token_days.insert((t, r.start.div_euclid(86_400_000)));
            if !r.paged {
                continue;
            }
            let truth = r.positive
                || spans
                    .iter()
                    .any(|&(s, e)| r.start + window_ms > s && r.start <= e);
            run = match run {
                Some((first, last, tr)) if r.start - last <= opts.alert_gap_ms => {
                    Some((first, r.start, tr || truth))
                }
                Some((first, last, tr)) => {
                    alerts.push((t, first, last, tr));
                    Some((r.start, r.start, truth))
                }
                None => Some((r.start, r.start, truth)),
            };
        }
        if let Some((first, last, tr)) = run {
            alerts.push((t, first, last, tr));
        }
    }
    alerts.sort_unstable();
    let false_alerts = alerts.iter().filter(|a| !a.3).count() as u64;
    let episodes = alerts.len() as u64;
    let token_days = token_days.len() as u64;
    Metrics {
        eval_from: fmt_ts(split_at),
        windows: recs.len() as u64,
        positive_windows: tp + fn_,
        alert_windows: tp + fp,
        tp,
        fp,
        fn_,
        precision,
        recall,
        f1,
        pr_auc,
        incidents: incidents.len() as u64,
        incidents_detected: detected_total,
        per_kind,
        median_delay_s: median(&mut all_delays),
        false_alerts,
        episodes,
        token_days,
        verdicts_applied: 0,
        false_alerts_per_1k_token_days: if token_days > 0 {
            false_alerts as f64 * 1000.0 / token_days as f64
        } else {
            0.0
        },
    }
}

impl Report {
    /// Human summary.
    pub fn render(&self, engine_cfg: &Config) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "replayed {} events ({} bad rows skipped, {} late) into {} windows of {} tokens in {:.1}s ({:.0} events/s); {} alert windows; model state {} B/token in memory, {} B encoded",
            self.events,
            self.bad_rows,
            self.late_events,
            self.windows,
            self.tokens,
            self.seconds,
            self.events_per_s,
            self.alerts,
            self.state_bytes_per_token.0,
            self.state_bytes_per_token.1
        );
        if !self.bad_row_summary.is_empty() {
            let _ = writeln!(s, "{}", self.bad_row_summary);
        }
        if !self.riskiest.is_empty() {
            let _ = writeln!(
                s,
                "\nriskiest tokens{}:",
                if self.metrics.is_some() {
                    " (evaluation period)"
                } else {
                    ""
                }
            );
            for w in &self.riskiest {
                let _ = writeln!(
                    s,
                    "  {:<24} risk {:5.1} at {}{}",
                    w.token,
                    w.risk,
                    fmt_ts(w.start),
                    if w.alert { "  ALERT" } else { "" }
                );
                for c in w.contributions.iter().take(4) {
                    let _ = writeln!(
                        s,
                        "      {:<20} +{:5.1}  {}",
                        c.signal.name(),
                        c.evidence,
                        c.reason
                    );
                }
            }
        }
        if let Some(m) = &self.metrics {
            let _ = writeln!(
                s,
                "\nevaluation from {} (alert at risk >= {}):",
                m.eval_from, engine_cfg.score.alert_risk
            );
            let _ = writeln!(
                s,
                "  windows {}  labelled {}  alerting {}  TP {} FP {} FN {}",
                m.windows, m.positive_windows, m.alert_windows, m.tp, m.fp, m.fn_
            );
            let _ = writeln!(
                s,
                "  precision {:.3}  recall {:.3}  F1 {:.3}  PR-AUC {:.3}",
                m.precision, m.recall, m.f1, m.pr_auc
            );
            let _ = writeln!(
                s,
                "  incidents {}/{} detected; median delay {}",
                m.incidents_detected,
                m.incidents,
                m.median_delay_s
                    .map_or("-".to_string(), |d| format!("{d:.0}s"))
            );
            let _ = writeln!(
                s,
                "  alert episodes {} (policies); false alert episodes {} over {} token-days = {:.2} per 1,000 token-days",
                m.episodes, m.false_alerts, m.token_days, m.false_alerts_per_1k_token_days
            );
            if m.verdicts_applied > 0 {
                let _ = writeln!(s, "  operator verdicts replayed: {}", m.verdicts_applied);
            }
            let _ = writeln!(
                s,
                "  {:<22} {:>9} {:>8} {:>7} {:>12} {:>10}",
                "kind", "incidents", "detected", "recall", "win recall", "delay"
            );
            for k in &m.per_kind {
                let _ = writeln!(
                    s,
                    "  {:<22} {:>9} {:>8} {:>7.3} {:>12} {:>10}",
                    k.kind,
                    k.incidents,
                    k.detected,
                    k.recall,
                    format!("{}/{}", k.windows_alerted, k.windows),
                    k.median_delay_s
                        .map_or("-".to_string(), |d| format!("{d:.0}s"))
                );
            }
        }
        s
    }
}
