//! Parquet event history: sealed log segments are split by UTC event date and written as
//! `events/date=YYYY-MM-DD/part-SEQ.parquet` (zstd), each file written under a temporary
//! name and renamed, so a reader never sees half a file. A segment's marker is written
//! after its last file: a crash in between is redone from the segment, after removing the
//! files of the interrupted attempt, so every event is in the history exactly once.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch, UInt32Array};
use arrow::datatypes::{Schema, SchemaRef, TimestampMillisecondType};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use super::wal::{compacted_marker, read_segment_with, segment_path};
use super::{format, io, sync_dir, Error};
use crate::event::{col, event_schema};

const DAY_MS: i64 = 86_400_000;
/// Columns of the history: the contract's, without the evaluation-only label and kind.
const HISTORY_COLUMNS: usize = col::LABEL;

/// Schema of history files.
pub fn history_schema() -> SchemaRef {
    let s = event_schema();
    Arc::new(Schema::new(s.fields()[..HISTORY_COLUMNS].to_vec()))
}

fn date_of(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms.div_euclid(DAY_MS) * DAY_MS)
        .map(|d| d.format("%Y-%m-%d").to_string())
        .unwrap_or_else(|| "invalid".into())
}

fn part_name(seq: u64) -> String {
    format!("part-{seq:020}.parquet")
}

/// Remove the files an interrupted compaction of `seq` may have left.
fn remove_parts(events: &Path, seq: u64) -> Result<(), Error> {
    let Ok(rd) = std::fs::read_dir(events) else {
        return Ok(());
    };
    let name = part_name(seq);
    for d in rd.flatten() {
        for f in [d.path().join(&name), d.path().join(format!("{name}.tmp"))] {
            if f.exists() {
                std::fs::remove_file(&f).map_err(io(&f))?;
            }
        }
    }
    Ok(())
}

/// Write segment `seq` of `wal` into the history under `events`, once. Returns the rows
/// written (0 if it was already there). `validate`: check its rows again (a segment found
/// at start); a segment this process wrote holds only rows it validated at ingest.
pub fn compact(wal: &Path, events: &Path, seq: u64, validate: bool) -> Result<u64, Error> {
    let marker = compacted_marker(wal, seq);
    if marker.exists() {
        return Ok(0);
    }
    remove_parts(events, seq)?;
    let batches = read_segment_with(&segment_path(wal, seq), validate)?.into_batches();
    let by_date = by_date(&batches).map_err(format(segment_path(wal, seq)))?;
    let mut rows = 0u64;
    for (date, parts) in by_date {
        let dir = events.join(format!("date={date}"));
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let path = dir.join(part_name(seq));
        rows += write_parquet(&path, &parts)?;
        sync_dir(&dir)?;
    }
    std::fs::write(&marker, b"").map_err(io(&marker))?;
    sync_dir(wal)?;
    Ok(rows)
}

/// The history columns of `batches`, split by UTC event date: each date's rows in their
/// order.
pub fn by_date(batches: &[RecordBatch]) -> Result<BTreeMap<String, Vec<RecordBatch>>, String> {
    let mut by_date: BTreeMap<String, Vec<RecordBatch>> = BTreeMap::new();
    for b in batches {
        let b = b
            .project(&(0..HISTORY_COLUMNS).collect::<Vec<_>>())
            .map_err(|e| e.to_string())?;
        let ts = b.column(col::TS).as_primitive::<TimestampMillisecondType>();
        let mut rows: BTreeMap<i64, Vec<u32>> = BTreeMap::new();
        for i in 0..b.num_rows() {
            rows.entry(ts.value(i).div_euclid(DAY_MS))
                .or_default()
                .push(i as u32);
        }
        for (day, idx) in rows {
            let part = if idx.len() == b.num_rows() {
                b.clone()
            } else {
                let take = UInt32Array::from(idx);
                let cols = b
                    .columns()
                    .iter()
                    .map(|c| arrow::compute::take(c.as_ref(), &take, None))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| e.to_string())?;
                RecordBatch::try_new(b.schema(), cols).map_err(|e| e.to_string())?
            };
            by_date.entry(date_of(day * DAY_MS)).or_default().push(part);
        }
    }
    Ok(by_date)
}

/// A Parquet writer of history rows (zstd, row groups of 256 Ki rows) to `w`.
pub fn parquet_writer<W: std::io::Write + Send>(w: W) -> Result<ArrowWriter<W>, String> {
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).unwrap_or_default()))
        .set_max_row_group_row_count(Some(256 * 1024))
        .build();
    ArrowWriter::try_new(w, history_schema(), Some(props)).map_err(|e| e.to_string())
}

/// Write history rows as one Parquet file to `path`, under a temporary name renamed when it
/// is whole (fsync'd); the rows written.
pub fn write_parquet(path: &Path, parts: &[RecordBatch]) -> Result<u64, Error> {
    let tmp = path.with_extension("parquet.tmp");
    let f = File::create(&tmp).map_err(io(&tmp))?;
    let fail = |e: parquet::errors::ParquetError| format(&tmp)(e.to_string());
    let mut w = parquet_writer(f).map_err(format(&tmp))?;
    let mut rows = 0;
    for p in parts {
        w.write(p).map_err(fail)?;
        rows += p.num_rows() as u64;
    }
    let f = w.into_inner().map_err(fail)?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    Ok(rows)
}

/// History files in log order (segment, then date), optionally only dates that may hold
/// events in `[from, to)`.
pub fn files(events: &Path, from: Option<i64>, to: Option<i64>) -> Result<Vec<PathBuf>, Error> {
    let mut out: Vec<(String, String, PathBuf)> = Vec::new();
    let rd = match std::fs::read_dir(events) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(events)(e)),
    };
    let lo = from.map(date_of);
    let hi = to.map(|t| date_of(t.saturating_sub(1)));
    for d in rd.flatten() {
        let name = d.file_name().to_string_lossy().into_owned();
        let Some(date) = name.strip_prefix("date=") else {
            continue;
        };
        if lo.as_deref().is_some_and(|lo| date < lo) || hi.as_deref().is_some_and(|hi| date > hi) {
            continue;
        }
        for f in std::fs::read_dir(d.path()).map_err(io(d.path()))?.flatten() {
            let fname = f.file_name().to_string_lossy().into_owned();
            if fname.starts_with("part-") && fname.ends_with(".parquet") {
                out.push((fname, date.to_string(), f.path()));
            }
        }
    }
    out.sort();
    Ok(out.into_iter().map(|(_, _, p)| p).collect())
}

/// Batches of one history file, in the canonical event schema (label and kind null),
/// keeping only events in `[from, to)`.
pub fn read_file(
    path: &Path,
    from: Option<i64>,
    to: Option<i64>,
) -> Result<impl Iterator<Item = Result<RecordBatch, Error>>, Error> {
    let f = File::open(path).map_err(io(path))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(f)
        .and_then(|b| b.with_batch_size(64 * 1024).build())
        .map_err(|e| format(path)(e.to_string()))?;
    let path = path.to_path_buf();
    Ok(reader.map(move |b| {
        let b = b.map_err(|e| format(&path)(e.to_string()))?;
        widen(&b, from, to).map_err(|e| format(&path)(e))
    }))
}

fn widen(b: &RecordBatch, from: Option<i64>, to: Option<i64>) -> Result<RecordBatch, String> {
    let n = b.num_rows();
    let mut cols = b.columns().to_vec();
    if cols.len() != HISTORY_COLUMNS {
        return Err(format!(
            "{} columns, expected {HISTORY_COLUMNS}",
            cols.len()
        ));
    }
    let schema = event_schema();
    for f in &schema.fields()[HISTORY_COLUMNS..] {
        cols.push(arrow::array::new_null_array(f.data_type(), n));
    }
    let full = RecordBatch::try_new(schema, cols).map_err(|e| e.to_string())?;
    if from.is_none() && to.is_none() {
        return Ok(full);
    }
    let ts = full
        .column(col::TS)
        .as_primitive::<TimestampMillisecondType>();
    let keep: arrow::array::BooleanArray = (0..n)
        .map(|i| {
            let t = ts.value(i);
            Some(from.is_none_or(|f| t >= f) && to.is_none_or(|e| t < e) && ts.is_valid(i))
        })
        .collect();
    arrow::compute::filter_record_batch(&full, &keep).map_err(|e| e.to_string())
}

/// Delete date partitions entirely older than `newest - keep` (event time).
pub fn apply_retention(events: &Path, newest: i64, keep_ms: i64) -> Result<u64, Error> {
    if keep_ms <= 0 {
        return Ok(0);
    }
    let cutoff = date_of(newest.saturating_sub(keep_ms));
    let mut removed = 0;
    let Ok(rd) = std::fs::read_dir(events) else {
        return Ok(0);
    };
    for d in rd.flatten() {
        let name = d.file_name().to_string_lossy().into_owned();
        if name
            .strip_prefix("date=")
            .is_some_and(|date| *date < *cutoff)
        {
            std::fs::remove_dir_all(d.path()).map_err(io(d.path()))?;
            removed += 1;
        }
    }
    Ok(removed)
}
