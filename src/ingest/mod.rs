//! Readers for the input contract (CSV, JSON Lines, optionally gzipped, and Parquet) and
//! validation into the one event schema. Owns `ingest::Error`. Knows nothing of models.
//!
//! Every reader first produces *raw* Arrow batches with the arrow / parquet crates' own
//! readers (CSV and JSON as text columns, Parquet as stored); [`validate`] then checks each
//! row against the contract and keeps the valid ones. A bad row is reported with file, row,
//! column and reason and never stops the valid rows around it.

mod raw;
pub mod registry;
pub mod validate;

use std::path::{Path, PathBuf};

use arrow::record_batch::RecordBatch;

pub use raw::{Format, RawReader};
pub use registry::read_registry;
pub use validate::{normalize, RowError};

/// Rows per batch produced by the readers.
pub const BATCH_ROWS: usize = 65_536;

/// What to do with a row that breaks the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum BadRowPolicy {
    /// Stop at the first bad row with its error.
    Fail,
    /// Drop bad rows, count them and keep the first few errors.
    #[default]
    Skip,
}

/// Errors of the readers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not of a known format or could not be decoded at all.
    #[error("{path}: {reason}")]
    Format {
        /// File.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A required column is absent.
    #[error("{path}: required column `{column}` is missing (found: {found})")]
    MissingColumn {
        /// File.
        path: PathBuf,
        /// Column.
        column: &'static str,
        /// Columns that were there.
        found: String,
    },
    /// A row broke the contract and the policy is `fail`.
    #[error("{0}")]
    BadRow(RowError),
}

/// Counts of what a read kept and dropped, with the first errors.
#[derive(Debug, Default, Clone)]
pub struct ReadReport {
    /// Valid rows kept.
    pub rows: u64,
    /// Rows dropped as bad.
    pub bad_rows: u64,
    /// The first few bad-row errors.
    pub first_errors: Vec<RowError>,
}

impl ReadReport {
    /// How many errors are kept for display.
    pub const KEEP: usize = 10;

    /// Record a bad row.
    pub fn push(&mut self, e: RowError) {
        self.bad_rows += 1;
        if self.first_errors.len() < Self::KEEP {
            self.first_errors.push(e);
        }
    }

    /// One-paragraph summary for people.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} rows read, {} bad rows skipped",
            self.rows, self.bad_rows
        );
        for e in &self.first_errors {
            s.push_str("\n  ");
            s.push_str(&e.to_string());
        }
        if self.bad_rows as usize > self.first_errors.len() {
            s.push_str(&format!(
                "\n  ... and {} more",
                self.bad_rows as usize - self.first_errors.len()
            ));
        }
        s
    }
}

/// Validated event batches from one file.
pub struct EventReader {
    raw: RawReader,
    policy: BadRowPolicy,
    report: ReadReport,
}

impl EventReader {
    /// Open `path`; the format follows the extension.
    pub fn open(path: &Path, policy: BadRowPolicy) -> Result<Self, Error> {
        Ok(EventReader {
            raw: RawReader::open(path, &crate::event::COLUMNS)?,
            policy,
            report: ReadReport::default(),
        })
    }

    /// Rows kept and dropped so far, with the first errors.
    pub fn report(&self) -> &ReadReport {
        &self.report
    }

    /// Next batch of valid events, or `None` at the end.
    pub fn next_batch(&mut self) -> Result<Option<RecordBatch>, Error> {
        loop {
            let Some((raw, first_row)) = self.raw.next_batch()? else {
                return Ok(None);
            };
            let before = self.report.bad_rows;
            let batch = normalize(&raw, self.raw.path(), first_row, &mut self.report)?;
            if self.policy == BadRowPolicy::Fail && self.report.bad_rows > before {
                // The first bad row of this batch (earlier batches had none, or we would
                // have stopped there).
                let e = self.report.first_errors.get(before as usize).cloned();

                if let Some(e) = e {
                    return Err(Error::BadRow(e));
                }
            }
            self.report.rows += batch.num_rows() as u64;
            if batch.num_rows() > 0 {
                return Ok(Some(batch));
            }
        }
    }
}

/// Read a whole events file into validated batches (for small files and tests).
pub fn read_events(
    path: &Path,
    policy: BadRowPolicy,
) -> Result<(Vec<RecordBatch>, ReadReport), Error> {
    let mut r = EventReader::open(path, policy)?;
    let mut out = Vec::new();
    while let Some(b) = r.next_batch()? {
        out.push(b);
    }
    Ok((out, r.report))
}
