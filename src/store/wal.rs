//! The write-ahead log: validated batches appended as records (magic, length, index,
//! CRC-32, then the batch as an Arrow IPC stream), flushed and fsync'd before the Ingest that
//! carried them is acknowledged. A new segment starts at every open, when the current one
//! passes its size limit, and after a failed write. A torn tail (a crash during a write)
//! ends the segment's replay at the last whole record, the last one acked; damage in the
//! middle is skipped by searching for the next valid record, so it never hides the records
//! after it (the store quarantines such a segment with a report).

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use arrow::record_batch::RecordBatch;

use super::{format, io, sync_dir, Error, LogPos};
use crate::event::event_schema;

/// File of segment `seq`.
pub fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}.arrows"))
}

/// Marker of a segment that is in the event history.
pub fn compacted_marker(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}.compacted"))
}

/// Segments present, oldest first.
pub fn segments(dir: &Path) -> Result<Vec<u64>, Error> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io(dir)(e)),
    };
    for e in rd {
        let e = e.map_err(io(dir))?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        if let Some(seq) = name.strip_suffix(".arrows").and_then(|s| s.parse().ok()) {
            out.push(seq);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// First bytes of a segment written in the framed format (version 1).
pub const SEGMENT_MAGIC: &[u8; 8] = b"TWLOG\x01\n\0";
/// First bytes of every record: lets a reader find the next record after damage.
const RECORD_MAGIC: u32 = 0x5457_5243; // "TWRC"
/// A record whose events carried client event ids: the payload starts with the count and
/// the 64-bit keys of those ids ([`crate::server::dedup`]), then the batch. The keys are in
/// the same record (one checksum) as the events, so they are durable exactly when the
/// events are, and a restart still knows which ids it acknowledged.
const KEYED_MAGIC: u32 = 0x5457_524B; // "TWRK"
/// Record header: magic, payload length, record index in the segment, CRC-32 of index and
/// payload.
const HEADER: usize = 16;
/// Largest record payload a reader believes (a length past it is damage).
const MAX_RECORD: usize = 1 << 30;

/// What reading a segment found.
#[derive(Debug, Default)]
pub struct Segment {
    /// The intact batches, in log order, each with its index in the segment (the count of
    /// batches appended before it, so a damaged record does not shift the ones after it).
    pub batches: Vec<(u64, RecordBatch)>,
    /// An incomplete last record (a crash during a write: it was never acknowledged).
    pub torn: Option<String>,
    /// Damage inside the segment: bytes that are not a whole record with a valid checksum,
    /// followed by intact records. What was there had been acknowledged.
    pub damage: Vec<String>,
    /// Rows of intact records that failed validation again (a hand-made or hostile file).
    pub invalid_rows: u64,
    /// De-duplication keys of the intact records' client event ids, in log order.
    pub keys: Vec<u64>,
}

impl Segment {
    /// Only the batches (in order).
    pub fn into_batches(self) -> Vec<RecordBatch> {
        self.batches.into_iter().map(|(_, b)| b).collect()
    }

    /// Batches with an index at or after `from`.
    pub fn since(self, from: u64) -> impl Iterator<Item = (u64, RecordBatch)> {
        self.batches.into_iter().filter(move |(i, _)| *i >= from)
    }
}

fn crc(index: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&index.to_le_bytes());
    h.update(payload);
    h.finalize()
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Read a segment: its intact batches (checksums verified, rows validated again), a torn
/// tail if there is one, and any damage in the middle (which never hides the records after
/// it). Segments of the first format (a plain Arrow IPC stream, no checksums) are read as
/// before.
pub fn read_segment(path: &Path) -> Result<Segment, Error> {
    read_segment_with(path, true)
}

/// [`read_segment`], validating rows again or not: a segment this process wrote (compacted
/// while it runs) holds only rows it validated at ingest; a segment found at start may not.
pub fn read_segment_with(path: &Path, validate: bool) -> Result<Segment, Error> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    let mut seg = Segment::default();
    if bytes.is_empty() {
        return Ok(seg);
    }
    if !bytes.starts_with(SEGMENT_MAGIC) {
        return read_stream_segment(path, &bytes);
    }
    let (torn, damage) = scan(&bytes, |magic, index, payload| {
        let batch = split_keys(path, magic, index, payload, &mut seg.keys)?;
        decode_record(path, batch, index, validate, &mut seg)
    })?;
    seg.torn = torn;
    seg.damage = damage;
    Ok(seg)
}

/// Only the de-duplication keys of a segment's intact records, in log order (at start, of
/// the segments already in the history: no batch is decoded).
pub fn read_keys(path: &Path) -> Result<Vec<u64>, Error> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    let mut keys = Vec::new();
    if bytes.starts_with(SEGMENT_MAGIC) {
        scan(&bytes, |magic, index, payload| {
            split_keys(path, magic, index, payload, &mut keys).map(|_| ())
        })?;
    }
    Ok(keys)
}

/// The keys at the start of a keyed record's payload (appended to `keys`) and the batch
/// after them.
fn split_keys<'a>(
    path: &Path,
    magic: u32,
    index: u64,
    payload: &'a [u8],
    keys: &mut Vec<u64>,
) -> Result<&'a [u8], Error> {
    if magic != KEYED_MAGIC {
        return Ok(payload);
    }
    let bad = || {
        format(path)(format!(
            "record {index}: checksum valid but its key list is cut short"
        ))
    };
    if payload.len() < 4 {
        return Err(bad());
    }
    let n = u32_at(payload, 0) as usize;
    let end = n
        .checked_mul(8)
        .and_then(|b| b.checked_add(4))
        .filter(|&e| e <= payload.len());
    let Some(end) = end else {
        return Err(bad());
    };
    keys.extend(
        payload[4..end]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default())),
    );
    Ok(&payload[end..])
}

/// Walk the records of a framed segment (after its magic), calling `f` with each intact
/// record's magic, index and payload. Returns an incomplete last record (torn tail) and the
/// damage found in the middle.
fn scan(
    bytes: &[u8],
    mut f: impl FnMut(u32, u64, &[u8]) -> Result<(), Error>,
) -> Result<(Option<String>, Vec<String>), Error> {
    let mut damage = Vec::new();
    let mut at = SEGMENT_MAGIC.len();
    // Bytes not accounted for by an intact record: where they start, and whether they
    // start like the last record of a crash (a header or a record cut short by the end).
    let mut bad: Option<(usize, bool)> = None;
    while at < bytes.len() {
        let rest = bytes.len() - at;
        if rest < HEADER {
            bad.get_or_insert((at, true));
            break;
        }
        let (m, len) = (u32_at(bytes, at), u32_at(bytes, at + 4) as usize);
        let (index, sum) = (u32_at(bytes, at + 8) as u64, u32_at(bytes, at + 12));
        if (m == RECORD_MAGIC || m == KEYED_MAGIC) && len <= MAX_RECORD {
            if rest - HEADER >= len {
                let payload = &bytes[at + HEADER..at + HEADER + len];
                if crc(index, payload) == sum {
                    if let Some((from, _)) = bad.take() {
                        damage.push(format!(
                            "bytes {from}..{at} are damaged (no valid record); the records after them are intact"
                        ));
                    }
                    f(m, index, payload)?;
                    at += HEADER + len;
                    continue;
                }
            } else {
                bad.get_or_insert((at, true));
            }
        }
        // Not a valid record here: look for the next record magic.
        bad.get_or_insert((at, false));
        at += 1;
    }
    let torn = match bad {
        Some((from, true)) => Some(format!(
            "the last record, from byte {from}, is incomplete ({} bytes)",
            bytes.len() - from
        )),
        Some((from, false)) => {
            damage.push(format!(
                "bytes {from}..{} are damaged (no valid record up to the end of the segment)",
                bytes.len()
            ));
            None
        }
        None => None,
    };
    Ok((torn, damage))
}

/// One record's payload (an Arrow IPC stream of one batch), validated again.
fn decode_record(
    path: &Path,
    payload: &[u8],
    index: u64,
    validate: bool,
    seg: &mut Segment,
) -> Result<(), Error> {
    let reader = StreamReader::try_new(payload, None).map_err(|e| {
        format(path)(format!(
            "record {index}: checksum valid but not Arrow IPC: {e}"
        ))
    })?;
    for b in reader {
        let b = b.map_err(|e| format(path)(format!("record {index}: {e}")))?;
        if !validate {
            seg.batches.push((index, b));
            continue;
        }
        let mut report = crate::ingest::ReadReport::default();
        let valid = crate::ingest::validate::normalize(&b, path, 1, &mut report)
            .map_err(|e| format(path)(format!("record {index}: {e}")))?;
        seg.invalid_rows += report.bad_rows;
        seg.batches.push((index, valid));
    }
    Ok(())
}

/// A segment of the first format: one Arrow IPC stream; a broken message ends it.
fn read_stream_segment(path: &Path, bytes: &[u8]) -> Result<Segment, Error> {
    let mut seg = Segment::default();
    let reader = match StreamReader::try_new(bytes, None) {
        Ok(r) => r,
        // Crashed before the schema message was whole: nothing in it was acknowledged.
        Err(e) => {
            seg.torn = Some(e.to_string());
            return Ok(seg);
        }
    };
    if reader.schema().fields() != event_schema().fields() {
        return Err(format(path)(
            "the log's schema is not this version's event schema".into(),
        ));
    }
    for (i, b) in reader.enumerate() {
        match b {
            Ok(b) => seg.batches.push((i as u64, b)),
            Err(e) => {
                seg.torn = Some(e.to_string());
                break;
            }
        }
    }
    Ok(seg)
}

/// Test hook: make the next `n` log commits fail as a full or broken disk would.
#[derive(Debug, Default)]
pub struct Faults {
    /// Commits left to fail.
    pub fail_commits: std::sync::atomic::AtomicU32,
}

impl Faults {
    fn take(&self) -> bool {
        use std::sync::atomic::Ordering;
        self.fail_commits
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

/// The log being written.
pub struct Wal {
    dir: PathBuf,
    seq: u64,
    batches: u64,
    bytes: u64,
    max_bytes: u64,
    fsync: bool,
    writer: Option<BufWriter<File>>,
    /// Encoding buffer of one record (reused).
    buf: Vec<u8>,
    faults: Option<std::sync::Arc<Faults>>,
}

impl Wal {
    /// Open the log in `dir`: a new segment after every existing one.
    pub fn open(dir: &Path, max_bytes: u64, fsync: bool) -> Result<Wal, Error> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let seq = segments(dir)?.last().map_or(1, |s| s + 1);
        Ok(Wal {
            dir: dir.to_path_buf(),
            seq,
            batches: 0,
            bytes: 0,
            max_bytes,
            fsync,
            writer: None,
            buf: Vec::new(),
            faults: None,
        })
    }

    /// Install a fault injector (tests).
    pub fn set_faults(&mut self, f: Option<std::sync::Arc<Faults>>) {
        self.faults = f;
    }

    /// Position after the last appended batch.
    pub fn pos(&self) -> LogPos {
        LogPos {
            segment: self.seq,
            batches: self.batches,
        }
    }

    /// Append a batch (buffered) as one checksummed record; [`Wal::commit`] makes it
    /// durable.
    pub fn append(&mut self, batch: &RecordBatch) -> Result<(), Error> {
        self.append_keyed(batch, &[])
    }

    /// [`Wal::append`] with the de-duplication keys of the batch's client event ids (none:
    /// a plain record, as before ids existed).
    pub fn append_keyed(&mut self, batch: &RecordBatch, keys: &[u64]) -> Result<(), Error> {
        let path = segment_path(&self.dir, self.seq);
        if self.writer.is_none() {
            let f = OpenOptions::new()
                .create_new(true)
                .write(true)
                .open(&path)
                .map_err(io(&path))?;
            sync_dir(&self.dir)?;
            let mut w = BufWriter::with_capacity(1 << 20, f);
            w.write_all(SEGMENT_MAGIC).map_err(io(&path))?;
            self.writer = Some(w);
        }
        self.buf.clear();
        if !keys.is_empty() {
            self.buf
                .extend_from_slice(&(keys.len() as u32).to_le_bytes());
            for k in keys {
                self.buf.extend_from_slice(&k.to_le_bytes());
            }
        }
        {
            let mut sw = StreamWriter::try_new(&mut self.buf, &event_schema())
                .map_err(|e| format(&path)(e.to_string()))?;
            sw.write(batch).map_err(|e| format(&path)(e.to_string()))?;
            sw.finish().map_err(|e| format(&path)(e.to_string()))?;
        }
        let index = self.batches;
        let mut header = [0u8; HEADER];
        let magic = if keys.is_empty() {
            RECORD_MAGIC
        } else {
            KEYED_MAGIC
        };
        header[0..4].copy_from_slice(&magic.to_le_bytes());
        header[4..8].copy_from_slice(&(self.buf.len() as u32).to_le_bytes());
        header[8..12].copy_from_slice(&(index as u32).to_le_bytes());
        header[12..16].copy_from_slice(&crc(index, &self.buf).to_le_bytes());
        if let Some(w) = self.writer.as_mut() {
            if let Err(e) = w.write_all(&header).and_then(|_| w.write_all(&self.buf)) {
                self.abandon();
                return Err(io(&path)(e));
            }
        }
        self.batches += 1;
        self.bytes += (HEADER + self.buf.len()) as u64;
        Ok(())
    }

    /// Flush and fsync what was appended (group commit: one fsync for many batches).
    /// Returns the sealed segment's number when the segment passed its size limit.
    ///
    /// After a failed write or fsync the segment is abandoned (nothing is appended after a
    /// failure: the kernel may have dropped the dirty pages) and the next append starts a
    /// new one.
    pub fn commit(&mut self) -> Result<Option<u64>, Error> {
        let path = segment_path(&self.dir, self.seq);
        let r = self.flush_sync(&path);
        if r.is_err() {
            self.abandon();
            return r.map(|_| None);
        }
        if self.bytes >= self.max_bytes {
            return self.seal();
        }
        Ok(None)
    }

    /// Give up the current segment after a failure: nothing more is written to it (what
    /// it holds up to the failure is read back as usual, its last record torn at worst).
    fn abandon(&mut self) {
        self.writer = None;
        self.seq += 1;
        self.batches = 0;
        self.bytes = 0;
    }

    fn flush_sync(&mut self, path: &Path) -> Result<(), Error> {
        if self.faults.as_ref().is_some_and(|f| f.take()) {
            return Err(io(path)(std::io::Error::other("injected write failure")));
        }
        if let Some(w) = self.writer.as_mut() {
            w.flush().map_err(io(path))?;
            if self.fsync {
                w.get_ref().sync_data().map_err(io(path))?;
            }
        }
        Ok(())
    }

    /// End the current segment (if it holds anything) and start the next; the sealed
    /// segment's number.
    pub fn seal(&mut self) -> Result<Option<u64>, Error> {
        let Some(mut w) = self.writer.take() else {
            return Ok(None);
        };
        let path = segment_path(&self.dir, self.seq);
        w.flush().map_err(io(&path))?;
        if self.fsync {
            w.get_ref().sync_data().map_err(io(&path))?;
        }
        let sealed = self.seq;
        self.seq += 1;
        self.batches = 0;
        self.bytes = 0;
        Ok(Some(sealed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::col;
    use arrow::array::AsArray;

    fn batch(n: usize, t0: i64) -> RecordBatch {
        let events: Vec<crate::server::pb::Event> = (0..n)
            .map(|i| crate::server::pb::Event {
                ts_ms: t0 + i as i64,
                token_id: format!("t{i}"),
                method: "GET".into(),
                endpoint: "/a".into(),
                status: 200,
                bytes_out: 1,
                src_ip: "10.0.0.1".into(),
                ..Default::default()
            })
            .collect();
        let clock = crate::server::convert::Clock {
            now_ms: i64::MAX / 2,
            max_future_skew_ms: 0,
        };
        crate::server::convert::to_batch(&events, 0, clock, &mut Default::default())
    }

    fn rows(seg: &Segment) -> Vec<(u64, usize)> {
        seg.batches
            .iter()
            .map(|(i, b)| (*i, b.num_rows()))
            .collect()
    }

    #[test]
    fn appends_survive_and_a_torn_tail_keeps_the_whole_batches() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Wal::open(dir.path(), u64::MAX, true).unwrap();
        w.append(&batch(3, 1_000)).unwrap();
        w.commit().unwrap();
        w.append(&batch(2, 2_000)).unwrap();
        w.commit().unwrap();
        assert_eq!(
            w.pos(),
            LogPos {
                segment: 1,
                batches: 2
            }
        );
        drop(w); // a crash: never sealed
        let p = segment_path(dir.path(), 1);
        let seg = read_segment(&p).unwrap();
        assert_eq!(rows(&seg), [(0, 3), (1, 2)]);
        assert!(seg.torn.is_none() && seg.damage.is_empty(), "{seg:?}");
        // Cut the file in the middle of the second batch.
        let len = std::fs::metadata(&p).unwrap().len();
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(len - 40).unwrap();
        let seg = read_segment(&p).unwrap();
        assert_eq!(rows(&seg), [(0, 3)]);
        assert!(seg.torn.is_some() && seg.damage.is_empty(), "{seg:?}");
        assert_eq!(
            seg.batches[0]
                .1
                .column(col::TOKEN_ID)
                .as_string::<i32>()
                .value(2),
            "t2"
        );
        // A reopened log starts a new segment and never appends to a torn one.
        let mut w = Wal::open(dir.path(), u64::MAX, true).unwrap();
        w.append(&batch(1, 3_000)).unwrap();
        w.commit().unwrap();
        assert_eq!(segments(dir.path()).unwrap(), [1, 2]);
        assert_eq!(w.seal().unwrap(), Some(2));
        assert_eq!(w.seal().unwrap(), None);
    }

    #[test]
    fn event_id_keys_are_durable_with_their_batch() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Wal::open(dir.path(), u64::MAX, true).unwrap();
        w.append_keyed(&batch(3, 1_000), &[7, 8, 9]).unwrap();
        w.append(&batch(2, 2_000)).unwrap();
        w.append_keyed(&batch(1, 3_000), &[u64::MAX]).unwrap();
        w.commit().unwrap();
        drop(w);
        let p = segment_path(dir.path(), 1);
        let seg = read_segment(&p).unwrap();
        assert_eq!(rows(&seg), [(0, 3), (1, 2), (2, 1)]);
        assert_eq!(seg.keys, [7, 8, 9, u64::MAX]);
        assert!(seg.torn.is_none() && seg.damage.is_empty(), "{seg:?}");
        assert_eq!(read_keys(&p).unwrap(), [7, 8, 9, u64::MAX]);
        // A torn last record takes its keys with it: neither was acknowledged.
        let len = std::fs::metadata(&p).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(len - 10)
            .unwrap();
        let seg = read_segment(&p).unwrap();
        assert_eq!(rows(&seg), [(0, 3), (1, 2)]);
        assert_eq!(seg.keys, [7, 8, 9]);
        assert_eq!(read_keys(&p).unwrap(), [7, 8, 9]);
        // A checksum-valid record whose key count runs past its payload is refused, named.
        let mut w = Wal::open(dir.path(), u64::MAX, true).unwrap();
        w.append_keyed(&batch(1, 4_000), &[1]).unwrap();
        w.commit().unwrap();
        drop(w);
        let p = segment_path(dir.path(), 2);
        let mut bytes = std::fs::read(&p).unwrap();
        let at = SEGMENT_MAGIC.len() + HEADER;
        bytes[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let len = u32_at(&bytes, SEGMENT_MAGIC.len() + 4) as usize;
        let sum = crc(0, &bytes[at..at + len]);
        let h = SEGMENT_MAGIC.len() + 12;
        bytes[h..h + 4].copy_from_slice(&sum.to_le_bytes());
        std::fs::write(&p, &bytes).unwrap();
        let e = read_keys(&p).unwrap_err().to_string();
        assert!(e.contains("record 0") && e.contains("key list"), "{e}");
    }

    #[test]
    fn damage_in_the_middle_hides_no_record_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Wal::open(dir.path(), u64::MAX, true).unwrap();
        for k in 0..5 {
            w.append(&batch(10 + k, 1_000 * k as i64)).unwrap();
        }
        w.commit().unwrap();
        w.seal().unwrap();
        let p = segment_path(dir.path(), 1);
        let mut bytes = std::fs::read(&p).unwrap();
        let whole = read_segment(&p).unwrap();
        assert_eq!(whole.batches.len(), 5);
        // Flip bytes inside the second record's payload (its checksum no longer holds).
        let at = bytes.len() * 3 / 10;
        for b in &mut bytes[at..at + 8] {
            *b ^= 0x5a;
        }
        std::fs::write(&p, &bytes).unwrap();
        let seg = read_segment(&p).unwrap();
        let got = rows(&seg);
        assert_eq!(got.len(), 4, "{got:?} {seg:?}");
        // The records after the damage keep their indices (log positions stay true).
        assert!(got.iter().all(|&(i, n)| n == 10 + i as usize), "{got:?}");
        assert_eq!(seg.damage.len(), 1, "{seg:?}");
        assert!(seg.torn.is_none());
        // Garbage appended after the last record is damage at the end, not a torn record.
        bytes.extend_from_slice(&[0xab; 64]);
        std::fs::write(&p, &bytes).unwrap();
        let seg = read_segment(&p).unwrap();
        assert_eq!(seg.batches.len(), 4);
        assert_eq!(seg.damage.len(), 2, "{seg:?}");
    }

    #[test]
    fn segments_of_the_first_format_are_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = segment_path(dir.path(), 7);
        let mut sw = StreamWriter::try_new(File::create(&p).unwrap(), &event_schema()).unwrap();
        sw.write(&batch(4, 1_000)).unwrap();
        sw.write(&batch(2, 2_000)).unwrap();
        sw.finish().unwrap();
        let seg = read_segment(&p).unwrap();
        assert_eq!(rows(&seg), [(0, 4), (1, 2)]);
    }
}
