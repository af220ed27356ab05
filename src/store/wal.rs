//! The write-ahead log: validated batches appended as Arrow IPC stream messages, flushed
//! and fsync'd before the Ingest that carried them is acknowledged. A new segment starts at
//! every open and when the current one passes its size limit; a torn tail (a crash during a
//! write) ends the segment's replay at the last whole batch, which was the last one acked.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Write};
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

/// Read a segment: its whole batches, and a description of a torn tail if there is one.
pub fn read_segment(path: &Path) -> Result<(Vec<RecordBatch>, Option<String>), Error> {
    let f = File::open(path).map_err(io(path))?;
    if f.metadata().map(|m| m.len()).unwrap_or(0) == 0 {
        return Ok((Vec::new(), None));
    }
    let reader = match StreamReader::try_new(BufReader::new(f), None) {
        Ok(r) => r,
        // Crashed before the schema message was whole: nothing in it was acknowledged.
        Err(e) => return Ok((Vec::new(), Some(e.to_string()))),
    };
    if reader.schema().fields() != event_schema().fields() {
        return Err(format(path)(
            "the log's schema is not this version's event schema".into(),
        ));
    }
    let mut out = Vec::new();
    for b in reader {
        match b {
            Ok(b) => out.push(b),
            Err(e) => return Ok((out, Some(e.to_string()))),
        }
    }
    Ok((out, None))
}

/// The log being written.
pub struct Wal {
    dir: PathBuf,
    seq: u64,
    batches: u64,
    bytes: u64,
    max_bytes: u64,
    fsync: bool,
    writer: Option<StreamWriter<BufWriter<File>>>,
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
        })
    }

    /// Position after the last appended batch.
    pub fn pos(&self) -> LogPos {
        LogPos {
            segment: self.seq,
            batches: self.batches,
        }
    }

    /// Append a batch (buffered); [`Wal::commit`] makes it durable.
    pub fn append(&mut self, batch: &RecordBatch) -> Result<(), Error> {
        let path = segment_path(&self.dir, self.seq);
        if self.writer.is_none() {
            let f = OpenOptions::new()
                .create_new(true)
                .write(true)
                .open(&path)
                .map_err(io(&path))?;
            sync_dir(&self.dir)?;
            let w = StreamWriter::try_new(BufWriter::with_capacity(1 << 20, f), &event_schema())
                .map_err(|e| format(&path)(e.to_string()))?;
            self.writer = Some(w);
        }
        if let Some(w) = self.writer.as_mut() {
            w.write(batch).map_err(|e| format(&path)(e.to_string()))?;
        }
        self.batches += 1;
        self.bytes += batch.get_array_memory_size() as u64;
        Ok(())
    }

    /// Flush and fsync what was appended (group commit: one fsync for many batches).
    /// Returns the sealed segment's number when the segment passed its size limit.
    pub fn commit(&mut self) -> Result<Option<u64>, Error> {
        let path = segment_path(&self.dir, self.seq);
        if let Some(w) = self.writer.as_mut() {
            w.flush().map_err(|e| format(&path)(e.to_string()))?;
            let f = w.get_mut();
            f.flush().map_err(io(&path))?;
            if self.fsync {
                f.get_ref().sync_data().map_err(io(&path))?;
            }
        }
        if self.bytes >= self.max_bytes {
            return self.seal();
        }
        Ok(None)
    }

    /// End the current segment (if it holds anything) and start the next; the sealed
    /// segment's number.
    pub fn seal(&mut self) -> Result<Option<u64>, Error> {
        let Some(mut w) = self.writer.take() else {
            return Ok(None);
        };
        let path = segment_path(&self.dir, self.seq);
        w.finish().map_err(|e| format(&path)(e.to_string()))?;
        let mut f = w.into_inner().map_err(|e| format(&path)(e.to_string()))?;
        f.flush().map_err(io(&path))?;
        if self.fsync {
            f.get_ref().sync_data().map_err(io(&path))?;
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
        let (b, torn) = read_segment(&p).unwrap();
        assert_eq!(b.iter().map(|b| b.num_rows()).collect::<Vec<_>>(), [3, 2]);
        assert!(torn.is_none(), "{torn:?}");
        // Cut the file in the middle of the second batch.
        let len = std::fs::metadata(&p).unwrap().len();
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(len - 40).unwrap();
        let (b, torn) = read_segment(&p).unwrap();
        assert_eq!(b.len(), 1);
        assert!(torn.is_some());
        assert_eq!(b[0].column(col::TOKEN_ID).as_string::<i32>().value(2), "t2");
        // A reopened log starts a new segment and never appends to a torn one.
        let mut w = Wal::open(dir.path(), u64::MAX, true).unwrap();
        w.append(&batch(1, 3_000)).unwrap();
        w.commit().unwrap();
        assert_eq!(segments(dir.path()).unwrap(), [1, 2]);
        assert_eq!(w.seal().unwrap(), Some(2));
        assert_eq!(w.seal().unwrap(), None);
    }
}
