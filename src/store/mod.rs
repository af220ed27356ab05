//! Durable state under the data directory: the write-ahead log of accepted batches, the
//! Parquet event history it is compacted into, and model snapshots.
//!
//! ```text
//! DATA_DIR/wal/SEQ.arrows                      Arrow IPC stream, one message per batch, fsync'd
//! DATA_DIR/wal/SEQ.compacted                   marker: SEQ is in the history exactly once
//! DATA_DIR/events/date=YYYY-MM-DD/part-SEQ.parquet   event history (zstd), by UTC event date
//! DATA_DIR/snapshots/snap-SEQ.parquet          model state, schema-versioned
//! ```
//!
//! Nothing here knows about tonic; the server and the `retrain` command drive it.

pub mod history;
pub mod snapshot;
pub mod spill;
pub mod wal;

use std::path::PathBuf;

/// Errors of the store, each naming the file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// File or directory.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Arrow IPC or Parquet could not encode or decode.
    #[error("{path}: {reason}")]
    Format {
        /// File.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}

pub(crate) fn format(path: impl Into<PathBuf>) -> impl FnOnce(String) -> Error {
    let path = path.into();
    move |reason| Error::Format { path, reason }
}

/// fsync a directory so that a rename or a new file in it survives a crash.
pub(crate) fn sync_dir(dir: &std::path::Path) -> Result<(), Error> {
    #[cfg(unix)]
    {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Append-only JSON Lines file, one fsync'd line per record (feedback, audit, dead letters).
pub struct JsonLog {
    path: Option<PathBuf>,
    // Records may come from concurrent writers; one at a time keeps lines whole.
    file: std::sync::Mutex<Option<std::fs::File>>,
}

impl JsonLog {
    /// Log at `path` (created on first write); `None` writes nothing (no data directory).
    pub fn new(path: Option<PathBuf>) -> Self {
        JsonLog {
            path,
            file: std::sync::Mutex::new(None),
        }
    }

    /// Append one record and fsync it.
    pub fn try_append(&self, record: &serde_json::Value) -> Result<(), Error> {
        use std::io::Write;
        let Some(path) = &self.path else {
            return Ok(());
        };
        let mut guard = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(io(path))?;
            *guard = Some(f);
        }
        if let Some(f) = guard.as_mut() {
            f.write_all(format!("{record}\n").as_bytes())
                .and_then(|_| f.sync_data())
                .map_err(io(path))?;
        }
        Ok(())
    }

    /// Append one record; a failure is logged, never fatal (what it records already
    /// happened).
    pub fn append(&self, record: &serde_json::Value) {
        if let Err(e) = self.try_append(record) {
            tracing::error!(error = %e, "cannot append to log");
        }
    }
}

/// An operator's verdict as kept in `DATA_DIR/feedback.jsonl`: applied again, at the same
/// point, when the log is replayed after a crash, and after the alert's windows close when
/// the models are rebuilt from history.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct FeedbackRecord {
    /// Wall-clock time of the verdict (RFC 3339).
    pub at: String,
    /// Log position when it was applied (segment, batches).
    pub pos: (u64, u64),
    /// Alert.
    pub alert_id: String,
    /// Token.
    pub token_id: String,
    /// First and last window start of the alert (epoch ms).
    pub from_ms: i64,
    /// Last window start.
    pub to_ms: i64,
    /// `true_positive`, `false_positive` or `expected_change`.
    pub verdict: String,
    /// The alert's top signals.
    pub signals: Vec<String>,
    /// Operator's note.
    pub note: String,
}

impl FeedbackRecord {
    /// Apply to an engine.
    pub fn apply(&self, engine: &mut Engine) {
        let Some(v) = crate::engine::Verdict::parse(&self.verdict) else {
            return;
        };
        let signals: Vec<crate::model::SignalKind> = self
            .signals
            .iter()
            .filter_map(|s| crate::model::SignalKind::from_name(s))
            .collect();
        let _ = engine.feedback(&self.token_id, (self.from_ms, self.to_ms), v, &signals);
    }

    fn log_pos(&self) -> LogPos {
        LogPos {
            segment: self.pos.0,
            batches: self.pos.1,
        }
    }
}

/// File of the feedback log in a data directory.
const FEEDBACK_LOG: &str = "feedback.jsonl";

/// The feedback log of a data directory, oldest first; unreadable lines are reported.
pub fn read_feedback(dir: &Path) -> Result<(Vec<FeedbackRecord>, Vec<String>), Error> {
    let path = dir.join(FEEDBACK_LOG);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), Vec::new())),
        Err(e) => return Err(io(&path)(e)),
    };
    let mut out = Vec::new();
    let mut bad = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(r) => out.push(r),
            Err(e) => bad.push(format!("{}: line {}: {e}", path.display(), i + 1)),
        }
    }
    Ok((out, bad))
}

/// Position in the log: every batch before it (segments `< segment`, and the first
/// `batches` of `segment`) is reflected in whatever carries the position.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct LogPos {
    /// Segment sequence number.
    pub segment: u64,
    /// Batches of that segment.
    pub batches: u64,
}

use std::path::Path;
use std::sync::Arc;

use arrow::record_batch::RecordBatch;

use crate::config::{Config, StoreConfig};
use crate::engine::{Engine, EngineSnapshot, WindowScore};
use crate::model::registry::Registry;

/// What a start found and rebuilt.
pub struct Recovered {
    /// The engine, in the state of the last acknowledged batch.
    pub engine: Engine,
    /// Snapshot loaded, if any.
    pub snapshot: Option<PathBuf>,
    /// Log batches replayed after it.
    pub replayed_batches: u64,
    /// Events in them.
    pub replayed_events: u64,
    /// Per token, the bytes a door kept beside it in the snapshot.
    pub extras: Vec<(Arc<str>, Vec<u8>)>,
    /// Windows the replay closed (already alerted before the restart, if at all).
    pub scores: Vec<WindowScore>,
    /// Problems that did not stop the start (a corrupt snapshot skipped, a torn log tail).
    pub warnings: Vec<String>,
    /// De-duplication keys of the client event ids in the log segments still on disk, oldest
    /// first, at most `server.dedup-ids` of them: a resend after a restart is still caught.
    pub dedup_keys: Vec<u64>,
}

/// The data directory of a running server.
pub struct Store {
    dir: PathBuf,
    wal: wal::Wal,
    cfg: StoreConfig,
    feedback: JsonLog,
    /// Event-id keys remembered (`server.dedup-ids`).
    dedup_cap: usize,
}

/// Event-id keys of log segments that were deleted (see [`Store::checkpoint`]), in the log
/// directory: magic, the keys (u64, little-endian, oldest first), CRC-32 of the keys.
const CARRIED_KEYS: &str = "dedup.keys";
const CARRIED_MAGIC: &[u8; 8] = b"TWKEYS1\n";

/// The carried keys (none if the file is missing; a damaged file is an error naming it).
fn read_carried(wal_d: &Path) -> Result<Vec<u64>, Error> {
    let path = wal_d.join(CARRIED_KEYS);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(&path)(e)),
    };
    let body = bytes
        .strip_prefix(CARRIED_MAGIC)
        .filter(|b| b.len() >= 4 && (b.len() - 4) % 8 == 0)
        .ok_or_else(|| format(&path)("not a tokenwatch event-id key file".into()))?;
    let (keys, sum) = body.split_at(body.len() - 4);
    if crc32fast::hash(keys).to_le_bytes() != sum {
        return Err(format(&path)(
            "checksum mismatch: the file is damaged".into(),
        ));
    }
    Ok(keys
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
        .collect())
}

/// Keep the last `cap` keys (the newest: keys are oldest first).
fn keep_newest(keys: &mut Vec<u64>, cap: usize) {
    if keys.len() > cap {
        keys.drain(..keys.len() - cap);
    }
}

/// Replace the carried keys with `keys` (atomically: a temporary file, fsync'd, renamed).
fn write_carried(wal_d: &Path, keys: &[u64]) -> Result<(), Error> {
    let path = wal_d.join(CARRIED_KEYS);
    let tmp = path.with_extension("keys.tmp");
    let mut buf = Vec::with_capacity(CARRIED_MAGIC.len() + keys.len() * 8 + 4);
    buf.extend_from_slice(CARRIED_MAGIC);
    for k in keys {
        buf.extend_from_slice(&k.to_le_bytes());
    }
    let sum = crc32fast::hash(&buf[CARRIED_MAGIC.len()..]);
    buf.extend_from_slice(&sum.to_le_bytes());
    {
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        std::io::Write::write_all(&mut f, &buf).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    sync_dir(wal_d)
}

/// Paths inside a data directory.
pub fn wal_dir(dir: &Path) -> PathBuf {
    dir.join("wal")
}
/// Event history.
pub fn events_dir(dir: &Path) -> PathBuf {
    dir.join("events")
}
/// Model snapshots.
pub fn snapshots_dir(dir: &Path) -> PathBuf {
    dir.join("snapshots")
}

fn apply_all(
    engine: &mut Engine,
    batch: &RecordBatch,
    path: &Path,
    out: &mut Vec<WindowScore>,
) -> Result<(), Error> {
    let s = engine
        .apply(batch)
        .map_err(|e| format(path)(e.to_string()))?;
    out.extend(s);
    Ok(())
}

impl Store {
    /// Open `dir`: load the newest valid snapshot, replay the log after it (or, with no
    /// snapshot, the history and the log not yet in it), and open a new log segment.
    pub fn open(dir: &Path, cfg: &Config, registry: Registry) -> Result<(Store, Recovered), Error> {
        let (wal_d, events_d, snaps_d) = (wal_dir(dir), events_dir(dir), snapshots_dir(dir));
        for d in [&wal_d, &events_d, &snaps_d] {
            std::fs::create_dir_all(d).map_err(io(d))?;
        }
        let mut warnings = Vec::new();
        let mut loaded = None;
        for (_, path) in snapshot::list(&snaps_d)? {
            let attempt = snapshot::read(&path).and_then(|(snap, pos)| {
                let mut e = Engine::restore(cfg.clone(), registry.clone(), &snap)
                    .map_err(|e| format(&path)(format!("model state: {e}")))?;
                attach_spill(dir, &mut e, snap.spill.as_ref())?;
                Ok((e, snap, pos))
            });
            match attempt {
                Ok(x) => {
                    loaded = Some((path, x));
                    break;
                }
                Err(e) => warnings.push(format!("{e}; falling back to the previous snapshot")),
            }
        }
        let mut scores = Vec::new();
        let (mut replayed_batches, mut replayed_events) = (0u64, 0u64);
        let segments = wal::segments(&wal_d)?;
        let (mut engine, snapshot, extras, from) = match loaded {
            Some((path, (engine, snap, pos))) => {
                let extras = snap
                    .tokens
                    .into_iter()
                    .filter(|t| !t.extra.is_empty())
                    .map(|t| (t.token, t.extra))
                    .collect();
                (engine, Some(path), extras, Some(pos))
            }
            None => {
                // No snapshot: the history holds the compacted part of the log.
                let mut engine = Engine::new(cfg.clone(), registry);
                attach_spill(dir, &mut engine, None)?;
                for f in history::files(&events_d, None, None)? {
                    for b in history::read_file(&f, None, None)? {
                        let b = b?;
                        replayed_events += b.num_rows() as u64;
                        replayed_batches += 1;
                        apply_all(&mut engine, &b, &f, &mut scores)?;
                    }
                }
                (engine, None, Vec::new(), None)
            }
        };
        let (feedback, bad) = read_feedback(dir)?;
        warnings.extend(bad);
        let mut pending: Vec<&FeedbackRecord> = feedback
            .iter()
            .filter(|f| from.is_none_or(|p| f.log_pos() > p))
            .collect();
        pending.sort_by_key(|f| f.log_pos());
        let mut pending = pending.into_iter().peekable();
        // The ids of deleted segments first (they are older), then those of the segments.
        let mut dedup_keys = match read_carried(&wal_d) {
            Ok(k) => k,
            Err(e) => {
                warnings.push(format!(
                    "{e}; the event ids of the log's deleted segments are forgotten (a resend of those events is counted again)"
                ));
                Vec::new()
            }
        };
        for seg in segments {
            let path = wal::segment_path(&wal_d, seg);
            let skip = match from {
                Some(p) if seg < p.segment => None,
                Some(p) if seg == p.segment => Some(p.batches),
                Some(_) => Some(0),
                None if wal::compacted_marker(&wal_d, seg).exists() => None,
                None => Some(0),
            };
            let Some(skip) = skip else {
                // Already in the model state: only which ids it acknowledged is read.
                dedup_keys.extend(wal::read_keys(&path)?);
                continue;
            };
            let mut read = wal::read_segment(&path)?;
            dedup_keys.append(&mut read.keys);
            if let Some(t) = &read.torn {
                warnings.push(format!(
                    "{}: torn tail after {} whole batches ({t}); nothing after them was acknowledged",
                    path.display(),
                    read.batches.len()
                ));
            }
            if !read.damage.is_empty() || read.invalid_rows > 0 {
                warnings.push(quarantine(&wal_d, seg, &read)?);
            }
            for (k, b) in read.since(skip) {
                let b = &b;
                // Verdicts given when the log held k batches of this segment come first.
                let here = LogPos {
                    segment: seg,
                    batches: k,
                };
                while let Some(f) = pending.next_if(|f| f.log_pos() <= here) {
                    f.apply(&mut engine);
                }
                replayed_events += b.num_rows() as u64;
                replayed_batches += 1;
                apply_all(&mut engine, b, &path, &mut scores)?;
            }
        }
        for f in pending {
            f.apply(&mut engine);
        }
        keep_newest(&mut dedup_keys, cfg.server.dedup_ids);
        let wal = wal::Wal::open(&wal_d, cfg.store.segment_bytes, cfg.store.fsync)?;
        let store = Store {
            dir: dir.to_path_buf(),
            wal,
            cfg: cfg.store.clone(),
            feedback: JsonLog::new(Some(dir.join(FEEDBACK_LOG))),
            dedup_cap: cfg.server.dedup_ids,
        };
        // Segments of earlier runs are whole (torn tails end at the last whole batch).
        store.compact_sealed(true)?;
        prune_spills(dir, engine.spill_file())?;
        Ok((
            store,
            Recovered {
                engine,
                snapshot,
                replayed_batches,
                replayed_events,
                extras,
                scores,
                warnings,
                dedup_keys,
            },
        ))
    }

    /// Append a batch to the log (durable at the next [`Store::commit`]).
    pub fn append(&mut self, batch: &RecordBatch) -> Result<(), Error> {
        self.wal.append(batch)
    }

    /// [`Store::append`] with the de-duplication keys of the batch's client event ids.
    pub fn append_keyed(&mut self, batch: &RecordBatch, keys: &[u64]) -> Result<(), Error> {
        self.wal.append_keyed(batch, keys)
    }

    /// Install a fault injector into the log (tests).
    pub fn set_faults(&mut self, f: Option<std::sync::Arc<wal::Faults>>) {
        self.wal.set_faults(f);
    }

    /// Make every appended batch durable; a segment past its size is sealed and compacted.
    pub fn commit(&mut self) -> Result<(), Error> {
        if self.wal.commit()?.is_some() {
            self.compact_sealed(false)?;
        }
        Ok(())
    }

    /// Seal the log and write a snapshot of `snap` covering it; compact sealed segments,
    /// drop those every kept snapshot covers, apply retention. The snapshot's path.
    pub fn checkpoint(
        &mut self,
        snap: &EngineSnapshot,
        newest: Option<i64>,
    ) -> Result<PathBuf, Error> {
        self.wal.seal()?;
        let path = snapshot::write(&snapshots_dir(&self.dir), snap, self.wal.pos())?;
        self.compact_sealed(false)?;
        prune_spills(&self.dir, snap.spill.as_ref().map(|r| r.file.as_str()))?;
        // A segment may go once it is in the history and the oldest kept snapshot (the
        // last fallback) is past it.
        let snaps = snapshot::list(&snapshots_dir(&self.dir))?;
        if let Some((oldest, _)) = snaps.last() {
            let wal_d = wal_dir(&self.dir);
            let gone: Vec<u64> = wal::segments(&wal_d)?
                .into_iter()
                .filter(|&seg| seg < oldest.segment)
                .filter(|&seg| wal::compacted_marker(&wal_d, seg).exists())
                .collect();
            // The event ids they acknowledged outlive them (a client may resend after a
            // restart): carried into the key file first, the segments deleted after.
            let mut carried = Vec::new();
            for &seg in &gone {
                carried.extend(wal::read_keys(&wal::segment_path(&wal_d, seg))?);
            }
            if !carried.is_empty() && self.dedup_cap > 0 {
                // A damaged key file is replaced (start reported it).
                let mut keys = read_carried(&wal_d).unwrap_or_default();
                keys.append(&mut carried);
                keep_newest(&mut keys, self.dedup_cap);
                write_carried(&wal_d, &keys)?;
            }
            for seg in gone {
                let p = wal::segment_path(&wal_d, seg);
                let marker = wal::compacted_marker(&wal_d, seg);
                std::fs::remove_file(&p).map_err(io(&p))?;
                std::fs::remove_file(&marker).map_err(io(&marker))?;
            }
        }
        if let Some(newest) = newest {
            history::apply_retention(&events_dir(&self.dir), newest, self.cfg.retention.ms)?;
        }
        Ok(path)
    }

    /// Seal the log and put every sealed segment into the history (server stop).
    pub fn close(mut self) -> Result<(), Error> {
        self.wal.seal()?;
        self.compact_sealed(false)
    }

    /// Log position after the last appended batch.
    pub fn pos(&self) -> LogPos {
        self.wal.pos()
    }

    /// Seal the log and put every sealed segment into the history: afterwards the history
    /// holds everything before [`Store::pos`].
    pub fn seal(&mut self) -> Result<LogPos, Error> {
        self.wal.seal()?;
        self.compact_sealed(false)?;
        Ok(self.wal.pos())
    }

    /// Batches in the log at or after `from` (a retrained engine catches up with them).
    pub fn read_since(&self, from: LogPos) -> Result<Vec<RecordBatch>, Error> {
        let wal_d = wal_dir(&self.dir);
        let mut out = Vec::new();
        for seg in wal::segments(&wal_d)? {
            if seg < from.segment {
                continue;
            }
            let skip = if seg == from.segment { from.batches } else { 0 };
            let read = wal::read_segment(&wal::segment_path(&wal_d, seg))?;
            out.extend(read.since(skip).map(|(_, b)| b));
        }
        Ok(out)
    }

    /// Bytes of log segments not yet in the history.
    pub fn backlog_bytes(&self) -> u64 {
        let wal_d = wal_dir(&self.dir);
        wal::segments(&wal_d)
            .unwrap_or_default()
            .into_iter()
            .filter(|&s| !wal::compacted_marker(&wal_d, s).exists())
            .filter_map(|s| std::fs::metadata(wal::segment_path(&wal_d, s)).ok())
            .map(|m| m.len())
            .sum()
    }

    /// Append a verdict to the feedback log (fsync'd).
    pub fn record_feedback(&self, rec: &FeedbackRecord) -> Result<(), Error> {
        let value = serde_json::to_value(rec)
            .map_err(|e| format(self.dir.join(FEEDBACK_LOG))(e.to_string()))?;
        self.feedback.try_append(&value)
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Put every sealed segment into the history; `validate`: check rows again (segments of
    /// earlier runs, at start).
    fn compact_sealed(&self, validate: bool) -> Result<(), Error> {
        let wal_d = wal_dir(&self.dir);
        let current = self.wal.pos().segment;
        for seg in wal::segments(&wal_d)? {
            if seg < current {
                history::compact(&wal_d, &events_dir(&self.dir), seg, validate)?;
            }
        }
        Ok(())
    }
}

/// Copy a damaged segment to `wal/quarantine/` (kept for ever: nothing there is deleted) with
/// a report of what was read and what was not; the recovery's warning. The segment itself
/// goes on as usual: its intact records are replayed and compacted into the history.
fn quarantine(wal_d: &Path, seg: u64, read: &wal::Segment) -> Result<String, Error> {
    let q = wal_d.join("quarantine");
    std::fs::create_dir_all(&q).map_err(io(&q))?;
    let src = wal::segment_path(wal_d, seg);
    let dst = q.join(src.file_name().unwrap_or_default());
    if !dst.exists() {
        std::fs::copy(&src, &dst).map_err(io(&dst))?;
    }
    let events: usize = read.batches.iter().map(|(_, b)| b.num_rows()).sum();
    let mut report = format!(
        "segment {}\nintact records: {} ({events} events), replayed\n",
        src.display(),
        read.batches.len()
    );
    for d in &read.damage {
        report.push_str(&format!(
            "damaged: {d}; events in those bytes were acknowledged and are lost\n"
        ));
    }
    if read.invalid_rows > 0 {
        report.push_str(&format!(
            "rows failing validation in intact records: {} (dropped)\n",
            read.invalid_rows
        ));
    }
    if let Some(t) = &read.torn {
        report.push_str(&format!("torn tail: {t} (never acknowledged)\n"));
    }
    let rp = q.join(format!("{seg:020}.report.txt"));
    std::fs::write(&rp, &report).map_err(io(&rp))?;
    sync_dir(&q)?;
    Ok(format!(
        "{}: DAMAGED: {}; {} intact records ({events} events) replayed; copied to {} with a report",
        src.display(),
        read.damage.join("; "),
        read.batches.len(),
        dst.display()
    ))
}

/// Give `engine` the spill of data directory `dir`: the file and savepoint a snapshot
/// refers to (rolled back to that moment), or a new, empty one.
fn attach_spill(
    dir: &Path,
    engine: &mut Engine,
    at: Option<&spill::SpillRef>,
) -> Result<(), Error> {
    let (s, name) = match at {
        Some(r) => {
            let p = spill::dir(dir).join(&r.file);
            if !p.exists() {
                return Err(format(&p)(
                    "the token spill this snapshot refers to is missing".into(),
                ));
            }
            let s = spill::Spill::open(&p)?;
            s.restore(r.savepoint)?;
            (s, r.file.clone())
        }
        None => spill::create_next(dir)?,
    };
    engine.set_spill(Arc::new(s), name);
    Ok(())
}

/// Delete the spill files of earlier generations than `current` that no kept snapshot
/// refers to (a retrain's newer file, still being filled, is kept).
fn prune_spills(dir: &Path, current: Option<&str>) -> Result<(), Error> {
    let Some(current) = current else {
        return Ok(());
    };
    let mut keep = vec![current.to_string()];
    for (_, p) in snapshot::list(&snapshots_dir(dir))? {
        if let Ok(Some(r)) = snapshot::read_spill_ref(&p) {
            keep.push(r.file);
        }
    }
    for f in spill::files(dir)? {
        if f.as_str() < current && !keep.contains(&f) {
            let p = spill::dir(dir).join(&f);
            std::fs::remove_file(&p).map_err(io(&p))?;
        }
    }
    Ok(())
}

/// Rebuild an engine from the history under `dir` (and the log segments below
/// `below_segment` not yet in it), events in `[from, to)`, in log order; `progress` is told
/// the events applied so far. Returns the engine and the log position it covers.
pub fn rebuild(
    dir: &Path,
    cfg: &Config,
    registry: Registry,
    (from, to): (Option<i64>, Option<i64>),
    below_segment: Option<u64>,
    mut progress: impl FnMut(u64),
) -> Result<(Engine, LogPos), Error> {
    let mut engine = Engine::new(cfg.clone(), registry);
    attach_spill(dir, &mut engine, None)?;
    let mut events = 0u64;
    let wal_d = wal_dir(dir);
    let (mut feedback, _) = read_feedback(dir)?;
    feedback.sort_by_key(|f| f.to_ms);
    let w = cfg.window.size.ms;
    let mut feedback = feedback.into_iter().peekable();
    for f in history::files(&events_dir(dir), from, to)? {
        for b in history::read_file(&f, from, to)? {
            let b = b?;
            events += b.num_rows() as u64;
            engine.apply(&b).map_err(|e| format(&f)(e.to_string()))?;
            catch_up(&mut feedback, &mut engine, w);
            progress(events);
        }
    }
    let mut segments = wal::segments(&wal_d)?;
    if let Some(b) = below_segment {
        segments.retain(|&s| s < b);
    }
    for &seg in &segments {
        if wal::compacted_marker(&wal_d, seg).exists() {
            continue;
        }
        let path = wal::segment_path(&wal_d, seg);
        let batches = wal::read_segment(&path)?.into_batches();
        for b in batches {
            let b = filter_time(&b, from, to).map_err(|e| format(&path)(e))?;
            events += b.num_rows() as u64;
            engine.apply(&b).map_err(|e| format(&path)(e.to_string()))?;
            catch_up(&mut feedback, &mut engine, w);
            progress(events);
        }
    }
    for f in feedback {
        f.apply(&mut engine);
    }
    let next = below_segment.unwrap_or_else(|| segments.last().map_or(1, |s| s + 1));
    Ok((
        engine,
        LogPos {
            segment: next,
            batches: 0,
        },
    ))
}

/// Apply the verdicts whose alert's last window has closed, as they were applied live.
fn catch_up(
    pending: &mut std::iter::Peekable<std::vec::IntoIter<FeedbackRecord>>,
    engine: &mut Engine,
    window_ms: i64,
) {
    while let Some(f) = pending.next_if(|f| engine.watermark() >= f.to_ms.saturating_add(window_ms))
    {
        f.apply(engine);
    }
}

fn filter_time(b: &RecordBatch, from: Option<i64>, to: Option<i64>) -> Result<RecordBatch, String> {
    use arrow::array::AsArray;
    if from.is_none() && to.is_none() {
        return Ok(b.clone());
    }
    let ts = b
        .column(crate::event::col::TS)
        .as_primitive::<arrow::datatypes::TimestampMillisecondType>();
    let keep: arrow::array::BooleanArray = ts
        .values()
        .iter()
        .map(|&t| Some(from.is_none_or(|f| t >= f) && to.is_none_or(|e| t < e)))
        .collect();
    arrow::compute::filter_record_batch(b, &keep).map_err(|e| e.to_string())
}
