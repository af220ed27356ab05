//! The on-disk home of tokens the engine stopped tracking in memory (`engine.max-tokens`,
//! `engine.memory-budget`): the idle-longest tokens' model state, keyed by token id, loaded
//! back when the token returns, so an evicted token keeps its baseline.
//!
//! An embedded key-value store (redb: pure Rust, ACID, B-tree, one file) rather than Parquet:
//! the job is point reads and writes of ~1 KB records by key with no index in memory, which
//! is what a B-tree does and an append-only columnar file does not.
//!
//! Consistency with snapshots: evictions commit without fsync; each engine snapshot takes a
//! persistent savepoint (fsync'd) and records its id, and recovery rolls the file back to the
//! savepoint of the snapshot it loads before the log is replayed, so the spilled states and
//! the snapshot describe the same moment and a replayed event is never applied twice.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use redb::{Database, Durability, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::Error;

const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
/// Evicted tokens that still have open windows, by the start of their earliest: (start,
/// token id) -> nothing. The engine brings them back when that window closes.
const PENDING: TableDefinition<&[u8], &[u8]> = TableDefinition::new("pending");

/// Key of [`PENDING`]: the start as big-endian with the sign bit flipped (byte order is
/// time order), then the token id.
fn pending_key(start: i64, token: &str) -> Vec<u8> {
    let mut k = ((start as u64) ^ (1 << 63)).to_be_bytes().to_vec();
    k.extend_from_slice(token.as_bytes());
    k
}

fn pending_start(key: &[u8]) -> Option<(i64, &str)> {
    let (t, name) = (key.get(..8)?, key.get(8..)?);
    let start = (u64::from_be_bytes(t.try_into().ok()?) ^ (1 << 63)) as i64;
    Some((start, std::str::from_utf8(name).ok()?))
}

/// One token for [`Spill::write`]: id, encoded record, start of its earliest open window.
pub type Put<'a> = (&'a str, &'a [u8], Option<i64>);

/// A token loaded back, for [`Spill::write`] to delete: id, start of its earliest open
/// window when it was evicted.
pub type Gone = (Arc<str>, Option<i64>);

/// zstd level of spilled states (fast; they are small).
const ZSTD_LEVEL: i32 = 1;

/// Largest state a spill entry may decompress to (a token's state is about 1 KB).
const MAX_STATE_BYTES: usize = 64 << 10;

/// Page cache of the spill file (redb's default is 1 GiB, too much beside the budget).
const CACHE_BYTES: usize = 32 << 20;

/// The savepoints kept: only the newest snapshot's. A savepoint keeps every page freed after
/// it from being reused, so under heavy eviction churn each one kept costs disk in proportion
/// to the churn since it was taken (three kept grew a spill to 14 GB where one keeps it near
/// its live size). An older snapshot therefore cannot restore the spill: if the newest one
/// is unreadable, recovery falls back past them to rebuilding from the history.
const KEEP_SAVEPOINTS: usize = 1;

/// Where a snapshot's spilled tokens are: the spill file (name inside `DATA_DIR/spill/`)
/// and the savepoint taken with the snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpillRef {
    /// File name of the spill inside the spill directory.
    pub file: String,
    /// Persistent savepoint id.
    pub savepoint: u64,
}

/// An open spill file.
pub struct Spill {
    db: Database,
    path: PathBuf,
    /// Tokens in the file (kept here so a miss on an empty spill costs nothing).
    len: AtomicU64,
    /// Delete the file when dropped (a spill of a run without a data directory).
    temporary: bool,
    /// Free disk space below which nothing more is spilled (`engine.spill-min-free`).
    min_free: AtomicU64,
    /// When the free space was last looked at (ms since the spill opened), and whether it
    /// was enough.
    checked: std::sync::Mutex<(Option<std::time::Instant>, bool)>,
}

fn db_err(path: &Path) -> impl Fn(redb::Error) -> Error + '_ {
    move |e| Error::Format {
        path: path.to_path_buf(),
        reason: format!("token spill: {e}"),
    }
}

impl Spill {
    /// Open (or create) the spill file at `path`.
    pub fn open(path: &Path) -> Result<Spill, Error> {
        let err = db_err(path);
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d).map_err(super::io(d))?;
        }
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| err(e.into()))?;
        // Both tables exist from the start, so readers never meet a missing one.
        let tx = db.begin_write().map_err(|e| err(e.into()))?;
        tx.open_table(TOKENS).map_err(|e| err(e.into()))?;
        tx.open_table(PENDING).map_err(|e| err(e.into()))?;
        tx.commit().map_err(|e| err(e.into()))?;
        let s = Spill {
            db,
            path: path.to_path_buf(),
            len: AtomicU64::new(0),
            temporary: false,
            min_free: AtomicU64::new(0),
            checked: std::sync::Mutex::new((None, true)),
        };
        s.recount()?;
        Ok(s)
    }

    /// A spill in the system's temporary directory, deleted when dropped (runs over files,
    /// which have no data directory).
    pub fn temporary() -> Result<Spill, Error> {
        static N: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "tokenwatch-spill-{}-{}.redb",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let path = std::env::temp_dir().join(name);
        let _ = std::fs::remove_file(&path);
        let mut s = Spill::open(&path)?;
        s.temporary = true;
        Ok(s)
    }

    /// Path of the file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Spill nothing more while the filesystem has less than `bytes` free.
    pub fn set_min_free(&self, bytes: u64) {
        self.min_free.store(bytes, Ordering::Relaxed);
    }

    /// Whether the filesystem has room to spill (looked at once a second at most). A
    /// flood must not fill the disk the log and the history need: below the floor the
    /// engine evicts nothing and counts new tokens' events as untracked.
    pub fn has_room(&self) -> bool {
        let floor = self.min_free.load(Ordering::Relaxed);
        if floor == 0 {
            return true;
        }
        let mut c = self.checked.lock().unwrap_or_else(|p| p.into_inner());
        let stale =
            c.0.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(1));
        if stale {
            let dir = self.path.parent().unwrap_or(Path::new("."));
            let ok = crate::sys::free_bytes(dir).is_none_or(|free| free >= floor);
            if !ok && c.1 {
                tracing::error!(
                    path = %self.path.display(),
                    floor,
                    "less free disk than engine.spill-min-free: no more tokens are evicted; new tokens past the budget are untracked"
                );
            }
            *c = (Some(std::time::Instant::now()), ok);
        }
        c.1
    }

    /// Tokens in the file.
    pub fn len(&self) -> u64 {
        self.len.load(Ordering::Relaxed)
    }

    /// No token in the file.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn recount(&self) -> Result<(), Error> {
        let err = db_err(&self.path);
        let tx = self.db.begin_read().map_err(|e| err(e.into()))?;
        let t = tx.open_table(TOKENS).map_err(|e| err(e.into()))?;
        let n = t.len().map_err(|e| err(e.into()))?;
        self.len.store(n, Ordering::Relaxed);
        Ok(())
    }

    /// In one transaction, remove the states of `delete` (tokens loaded back) and write
    /// those of `put` (token id, encoded state; a token in both is written).
    pub fn write<'a>(
        &self,
        put: impl IntoIterator<Item = Put<'a>>,
        delete: &[Gone],
    ) -> Result<(), Error> {
        let err = db_err(&self.path);
        // Compressed (a young token's state is mostly zeros) and in key order, so that one
        // write touches each page of the tree once.
        let mut items: Vec<(&str, Vec<u8>, Option<i64>)> = Vec::new();
        let mut c = zstd::bulk::Compressor::new(ZSTD_LEVEL).map_err(|e| Error::Format {
            path: self.path.clone(),
            reason: format!("token spill: compressor: {e}"),
        })?;
        for (k, v, open) in put {
            let z = c.compress(v).map_err(|e| Error::Format {
                path: self.path.clone(),
                reason: format!("token spill: compress: {e}"),
            })?;
            items.push((k, z, open));
        }
        items.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let mut gone: Vec<&Gone> = delete.iter().collect();
        gone.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut tx = self.db.begin_write().map_err(|e| err(e.into()))?;
        // Not fsync'd (a crash rolls the file back to the last snapshot's savepoint anyway),
        // but a durable-kind commit: only those free the pages earlier commits replaced.
        tx.set_durability(Durability::Eventual);
        let (mut added, mut removed) = (0u64, 0u64);
        {
            let mut t = tx.open_table(TOKENS).map_err(|e| err(e.into()))?;
            let mut p = tx.open_table(PENDING).map_err(|e| err(e.into()))?;
            for (k, open) in gone {
                if t.remove(&**k).map_err(|e| err(e.into()))?.is_some() {
                    removed += 1;
                }
                if let Some(start) = open {
                    p.remove(pending_key(*start, k).as_slice())
                        .map_err(|e| err(e.into()))?;
                }
            }
            for (k, v, open) in &items {
                if t.insert(*k, v.as_slice())
                    .map_err(|e| err(e.into()))?
                    .is_none()
                {
                    added += 1;
                }
                if let Some(start) = open {
                    p.insert(pending_key(*start, k).as_slice(), &[][..])
                        .map_err(|e| err(e.into()))?;
                }
            }
        }
        tx.commit().map_err(|e| err(e.into()))?;
        let n = self.len.load(Ordering::Relaxed) + added;
        self.len.store(n.saturating_sub(removed), Ordering::Relaxed);
        Ok(())
    }

    /// The state of `token`, if it is here. It stays until a later [`Spill::write`]
    /// deletes it (a reloaded token's entry goes with the next eviction), so a load back is
    /// a read, not a write.
    pub fn get(&self, token: &str) -> Result<Option<Vec<u8>>, Error> {
        if self.is_empty() {
            return Ok(None);
        }
        let err = db_err(&self.path);
        let tx = self.db.begin_read().map_err(|e| err(e.into()))?;
        let t = tx.open_table(TOKENS).map_err(|e| err(e.into()))?;
        let Some(v) = t.get(token).map_err(|e| err(e.into()))? else {
            return Ok(None);
        };
        // One decompression context per thread: creating one per call costs more than the
        // decompression of a 1 KB state.
        thread_local! {
            static D: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
                const { std::cell::RefCell::new(None) };
        }
        let bad = |e: std::io::Error| Error::Format {
            path: self.path.clone(),
            reason: format!("token spill: {token:?} does not decompress: {e}"),
        };
        D.with(|d| {
            let mut d = d.borrow_mut();
            if d.is_none() {
                *d = Some(zstd::bulk::Decompressor::new().map_err(bad)?);
            }
            match d.as_mut() {
                Some(d) => d
                    .decompress(v.value(), MAX_STATE_BYTES)
                    .map(Some)
                    .map_err(bad),
                None => Ok(None),
            }
        })
    }

    /// Evicted tokens with an open window starting at or before `upto`, earliest first, at
    /// most `max`: (window start, token id).
    pub fn pending(&self, upto: i64, max: usize) -> Result<Vec<(i64, String)>, Error> {
        let err = db_err(&self.path);
        let tx = self.db.begin_read().map_err(|e| err(e.into()))?;
        let t = tx.open_table(PENDING).map_err(|e| err(e.into()))?;
        let mut out = Vec::new();
        for r in t.iter().map_err(|e| err(e.into()))? {
            let (k, _) = r.map_err(|e| err(e.into()))?;
            let Some((start, name)) = pending_start(k.value()) else {
                continue;
            };
            if start > upto || out.len() >= max {
                break;
            }
            out.push((start, name.to_string()));
        }
        Ok(out)
    }

    /// Make everything written so far durable and mark this moment (a snapshot's): the id
    /// to give [`Spill::restore`]. Older savepoints past the few kept are deleted.
    pub fn savepoint(&self) -> Result<u64, Error> {
        let err = db_err(&self.path);
        let tx = self.db.begin_write().map_err(|e| err(e.into()))?;
        let id = tx.persistent_savepoint().map_err(|e| err(e.into()))?;
        let mut ids: Vec<u64> = tx
            .list_persistent_savepoints()
            .map_err(|e| err(e.into()))?
            .collect();
        ids.sort_unstable();
        let old = ids.len().saturating_sub(KEEP_SAVEPOINTS);
        for &o in &ids[..old] {
            tx.delete_persistent_savepoint(o)
                .map_err(|e| err(e.into()))?;
        }
        tx.commit().map_err(|e| err(e.into()))?;
        Ok(id)
    }

    /// Roll the file back to savepoint `id` (recovery from the snapshot that took it).
    pub fn restore(&self, id: u64) -> Result<(), Error> {
        let err = db_err(&self.path);
        let mut tx = self.db.begin_write().map_err(|e| err(e.into()))?;
        let sp = tx.get_persistent_savepoint(id).map_err(|e| err(e.into()))?;
        tx.restore_savepoint(&sp).map_err(|e| err(e.into()))?;
        tx.commit().map_err(|e| err(e.into()))?;
        self.recount()
    }
}

impl Drop for Spill {
    fn drop(&mut self) {
        if self.temporary {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The spill directory of a data directory.
pub fn dir(data: &Path) -> PathBuf {
    data.join("spill")
}

/// A new spill file in `data`'s spill directory, named after the next free generation.
pub fn create_next(data: &Path) -> Result<(Spill, String), Error> {
    let d = dir(data);
    std::fs::create_dir_all(&d).map_err(super::io(&d))?;
    let next = files(data)?
        .iter()
        .filter_map(|n| generation(n))
        .max()
        .map_or(1, |g| g + 1);
    let name = format!("tokens-{next:06}.redb");
    let path = d.join(&name);
    let _ = std::fs::remove_file(&path);
    Ok((Spill::open(&path)?, name))
}

/// Spill file names in `data`'s spill directory.
pub fn files(data: &Path) -> Result<Vec<String>, Error> {
    let d = dir(data);
    let rd = match std::fs::read_dir(&d) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(super::io(&d)(e)),
    };
    let mut out = Vec::new();
    for e in rd {
        let e = e.map_err(super::io(&d))?;
        if let Some(n) = e.file_name().to_str() {
            if generation(n).is_some() {
                out.push(n.to_string());
            }
        }
    }
    out.sort();
    Ok(out)
}

fn generation(name: &str) -> Option<u64> {
    name.strip_prefix("tokens-")?
        .strip_suffix(".redb")?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_savepoint_rolls_back_what_was_spilled_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens-000001.redb");
        let s = Spill::open(&path).unwrap();
        s.write(
            [
                ("a", &b"state-a1"[..], None),
                ("b", &b"state-b1"[..], Some(60_000)),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(s.pending(59_999, 10).unwrap(), []);
        assert_eq!(s.pending(60_000, 10).unwrap(), [(60_000, "b".to_string())]);
        assert_eq!(s.len(), 2);
        let sp = s.savepoint().unwrap();
        // After the snapshot: a comes back (and is deleted), b is rewritten, c is new.
        assert_eq!(s.get("a").unwrap().as_deref(), Some(&b"state-a1"[..]));
        s.write(
            [
                ("b", &b"state-b2"[..], None),
                ("c", &b"state-c"[..], Some(-5)),
            ],
            &[(Arc::from("a"), None), (Arc::from("b"), Some(60_000))],
        )
        .unwrap();
        assert_eq!(s.pending(i64::MAX, 10).unwrap(), [(-5, "c".to_string())]);
        assert_eq!(s.get("a").unwrap(), None);
        assert_eq!(s.get("nobody").unwrap(), None);
        assert_eq!(s.len(), 2);
        drop(s);
        // A crash, then recovery from the snapshot that took `sp`.
        let s = Spill::open(&path).unwrap();
        s.restore(sp).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s.get("b").unwrap().as_deref(), Some(&b"state-b1"[..]));
        assert_eq!(s.get("a").unwrap().as_deref(), Some(&b"state-a1"[..]));
        assert_eq!(s.get("c").unwrap(), None);
        assert_eq!(
            s.pending(i64::MAX, 10).unwrap(),
            [(60_000, "b".to_string())]
        );
    }

    #[test]
    fn a_temporary_spill_is_removed_when_dropped() {
        let s = Spill::temporary().unwrap();
        let p = s.path().to_path_buf();
        s.write([("x", &b"1"[..], None)], &[]).unwrap();
        assert!(p.exists());
        drop(s);
        assert!(!p.exists());
    }
}
