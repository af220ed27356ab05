//! Model snapshots as Parquet: one row per token (id, first / last window, windows, model
//! state and open windows as bytes) after one engine-wide row (token_id null), with the
//! schema version and the log position it covers in the file's key-value metadata. Written
//! under a temporary name, fsync'd and renamed; the newest valid one is loaded at start,
//! a corrupt or incompatible one is reported and the previous one used.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, RecordBatch, StringArray, TimestampMillisecondArray,
    UInt32Array,
};
use arrow::datatypes::{
    DataType, Field, Schema, SchemaRef, TimeUnit, TimestampMillisecondType, UInt32Type,
};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

use super::spill::SpillRef;
use super::{format, io, sync_dir, Error, LogPos};
use crate::engine::{EngineSnapshot, TokenSnapshot, SNAPSHOT_VERSION};

const KEY_VERSION: &str = "tokenwatch.snapshot_version";
const KEY_SEGMENT: &str = "tokenwatch.wal_segment";
const KEY_BATCHES: &str = "tokenwatch.wal_batches";
const KEY_CHECKSUM: &str = "tokenwatch.crc32";
const KEY_SPILL_FILE: &str = "tokenwatch.spill_file";
const KEY_SPILL_SAVEPOINT: &str = "tokenwatch.spill_savepoint";

/// CRC-32 of everything a snapshot holds, in its row order (checked before any state is
/// decoded, so a damaged file is refused whole and the previous one used).
fn checksum(header: &[u8], tokens: &[TokenSnapshot]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(header);
    for t in tokens {
        for part in [t.token.as_bytes(), &t.state, &t.open, &t.extra] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part);
        }
        h.update(&t.first_seen.to_le_bytes());
        h.update(&t.last_seen.to_le_bytes());
        h.update(&t.windows.to_le_bytes());
    }
    h.finalize()
}
/// Snapshots kept; older ones are deleted after a new one is written.
pub const KEEP: usize = 3;
const ROWS_PER_BATCH: usize = 64 * 1024;

fn schema() -> SchemaRef {
    let ts = DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("token_id", DataType::Utf8, true),
        Field::new("first_seen", ts.clone(), true),
        Field::new("last_seen", ts, true),
        Field::new("windows", DataType::UInt32, true),
        Field::new("state", DataType::Binary, false),
        Field::new("open_windows", DataType::Binary, true),
        Field::new("latest_score", DataType::Binary, true),
    ]))
}

/// File name of a snapshot covering the log up to `pos` (names sort by position).
pub fn file_name(pos: LogPos) -> String {
    format!("snap-{:020}-{:012}.parquet", pos.segment, pos.batches)
}

fn parse_name(name: &str) -> Option<LogPos> {
    let s = name.strip_prefix("snap-")?.strip_suffix(".parquet")?;
    let (a, b) = s.split_once('-')?;
    Some(LogPos {
        segment: a.parse().ok()?,
        batches: b.parse().ok()?,
    })
}

/// Snapshots present, newest first.
pub fn list(dir: &Path) -> Result<Vec<(LogPos, PathBuf)>, Error> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io(dir)(e)),
    };
    for e in rd.flatten() {
        if let Some(pos) = parse_name(&e.file_name().to_string_lossy()) {
            out.push((pos, e.path()));
        }
    }
    out.sort_by_key(|e| std::cmp::Reverse(e.0));
    Ok(out)
}

/// Write `snap` (covering the log up to `pos`) into `dir`; its path.
pub fn write(dir: &Path, snap: &EngineSnapshot, pos: LogPos) -> Result<PathBuf, Error> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let path = dir.join(file_name(pos));
    let tmp = path.with_extension("parquet.tmp");
    let f = File::create(&tmp).map_err(io(&tmp))?;
    let mut meta = vec![
        KeyValue::new(KEY_VERSION.into(), SNAPSHOT_VERSION.to_string()),
        KeyValue::new(KEY_SEGMENT.into(), pos.segment.to_string()),
        KeyValue::new(KEY_BATCHES.into(), pos.batches.to_string()),
        KeyValue::new(
            KEY_CHECKSUM.into(),
            checksum(&snap.header, &snap.tokens).to_string(),
        ),
    ];
    if let Some(r) = &snap.spill {
        meta.push(KeyValue::new(KEY_SPILL_FILE.into(), r.file.clone()));
        meta.push(KeyValue::new(
            KEY_SPILL_SAVEPOINT.into(),
            r.savepoint.to_string(),
        ));
    }
    let props = WriterProperties::builder()
        .set_compression(parquet::basic::Compression::SNAPPY)
        .set_key_value_metadata(Some(meta))
        .build();
    let fail = |e: String| format(&tmp)(e);
    let mut w = ArrowWriter::try_new(f, schema(), Some(props)).map_err(|e| fail(e.to_string()))?;
    let header = TokenSnapshot {
        token: Arc::from(""),
        state: snap.header.clone(),
        open: Vec::new(),
        extra: Vec::new(),
        first_seen: 0,
        last_seen: 0,
        windows: 0,
    };
    let rows: Vec<(bool, &TokenSnapshot)> = std::iter::once((true, &header))
        .chain(snap.tokens.iter().map(|t| (false, t)))
        .collect();
    for chunk in rows.chunks(ROWS_PER_BATCH) {
        let opt = |f: &dyn Fn(&TokenSnapshot) -> i64| {
            TimestampMillisecondArray::from(
                chunk
                    .iter()
                    .map(|(h, t)| (!h).then(|| f(t)))
                    .collect::<Vec<_>>(),
            )
            .with_timezone("UTC")
        };
        let cols: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(
                chunk
                    .iter()
                    .map(|(h, t)| (!h).then(|| t.token.as_ref()))
                    .collect::<Vec<_>>(),
            )),
            Arc::new(opt(&|t| t.first_seen)),
            Arc::new(opt(&|t| t.last_seen)),
            Arc::new(UInt32Array::from(
                chunk
                    .iter()
                    .map(|(h, t)| (!h).then_some(t.windows))
                    .collect::<Vec<_>>(),
            )),
            Arc::new(BinaryArray::from_iter_values(
                chunk.iter().map(|(_, t)| t.state.as_slice()),
            )),
            Arc::new(BinaryArray::from(
                chunk
                    .iter()
                    .map(|(h, t)| (!h).then_some(t.open.as_slice()))
                    .collect::<Vec<_>>(),
            )),
            Arc::new(BinaryArray::from(
                chunk
                    .iter()
                    .map(|(h, t)| (!h && !t.extra.is_empty()).then_some(t.extra.as_slice()))
                    .collect::<Vec<_>>(),
            )),
        ];
        let b = RecordBatch::try_new(schema(), cols).map_err(|e| fail(e.to_string()))?;
        w.write(&b).map_err(|e| fail(e.to_string()))?;
    }
    let f = w.into_inner().map_err(|e| fail(e.to_string()))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    sync_dir(dir)?;
    for (_, old) in list(dir)?.into_iter().skip(KEEP) {
        let _ = std::fs::remove_file(old);
    }
    Ok(path)
}

/// Read one snapshot; any problem is an error naming the file.
pub fn read(path: &Path) -> Result<(EngineSnapshot, LogPos), Error> {
    let bad = |r: String| format(path)(r);
    let f = File::open(path).map_err(io(path))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(f).map_err(|e| bad(e.to_string()))?;
    let kv = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .cloned()
        .unwrap_or_default();
    let get = |k: &str| {
        kv.iter()
            .find(|e| e.key == k)
            .and_then(|e| e.value.clone())
            .ok_or_else(|| bad(format!("no `{k}` in the file metadata")))
    };
    let version = get(KEY_VERSION)?;
    if version != SNAPSHOT_VERSION.to_string() {
        return Err(bad(format!(
            "snapshot version {version}, this build reads version {SNAPSHOT_VERSION}"
        )));
    }
    let pos = LogPos {
        segment: get(KEY_SEGMENT)?
            .parse()
            .map_err(|_| bad("bad segment".into()))?,
        batches: get(KEY_BATCHES)?
            .parse()
            .map_err(|_| bad("bad batch count".into()))?,
    };
    if builder.schema().fields() != schema().fields() {
        return Err(bad("columns are not a snapshot's".into()));
    }
    let spill = spill_ref(&kv).map_err(bad)?;
    let reader = builder.build().map_err(|e| bad(e.to_string()))?;
    let mut snap = EngineSnapshot {
        spill,
        ..Default::default()
    };
    let mut first = true;
    for b in reader {
        let b = b.map_err(|e| bad(e.to_string()))?;
        let id = b.column(0).as_string::<i32>();
        let fs = b.column(1).as_primitive::<TimestampMillisecondType>();
        let ls = b.column(2).as_primitive::<TimestampMillisecondType>();
        let wn = b.column(3).as_primitive::<UInt32Type>();
        let st = b.column(4).as_binary::<i32>();
        let op = b.column(5).as_binary::<i32>();
        let ex = b.column(6).as_binary::<i32>();
        for i in 0..b.num_rows() {
            if first {
                if id.is_valid(i) {
                    return Err(bad("first row is not the engine row".into()));
                }
                snap.header = st.value(i).to_vec();
                first = false;
                continue;
            }
            if !id.is_valid(i) {
                return Err(bad(format!("row {}: token_id is null", i + 1)));
            }
            snap.tokens.push(TokenSnapshot {
                token: Arc::from(id.value(i)),
                state: st.value(i).to_vec(),
                open: if op.is_valid(i) {
                    op.value(i).to_vec()
                } else {
                    Vec::new()
                },
                extra: if ex.is_valid(i) {
                    ex.value(i).to_vec()
                } else {
                    Vec::new()
                },
                first_seen: fs.value(i),
                last_seen: ls.value(i),
                windows: wn.value(i),
            });
        }
    }
    if first {
        return Err(bad("empty snapshot".into()));
    }
    let want: u32 = get(KEY_CHECKSUM)?
        .parse()
        .map_err(|_| bad("bad checksum".into()))?;
    if checksum(&snap.header, &snap.tokens) != want {
        return Err(bad("checksum mismatch: the snapshot is damaged".into()));
    }
    Ok((snap, pos))
}

fn spill_ref(kv: &[KeyValue]) -> Result<Option<SpillRef>, String> {
    let get = |k: &str| kv.iter().find(|e| e.key == k).and_then(|e| e.value.clone());
    match (get(KEY_SPILL_FILE), get(KEY_SPILL_SAVEPOINT)) {
        (None, None) => Ok(None),
        (Some(file), Some(sp)) => {
            if file.contains(['/', '\\']) || file.starts_with('.') {
                return Err(format!("spill file name {file:?} is not a plain file name"));
            }
            let savepoint = sp
                .parse()
                .map_err(|_| format!("bad spill savepoint {sp:?}"))?;
            Ok(Some(SpillRef { file, savepoint }))
        }
        _ => Err("spill file and savepoint must come together".into()),
    }
}

/// The spill a snapshot file refers to (its metadata only).
pub fn read_spill_ref(path: &Path) -> Result<Option<SpillRef>, Error> {
    let bad = |r: String| format(path)(r);
    let f = File::open(path).map_err(io(path))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(f).map_err(|e| bad(e.to_string()))?;
    let kv = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .cloned()
        .unwrap_or_default();
    spill_ref(&kv).map_err(bad)
}
