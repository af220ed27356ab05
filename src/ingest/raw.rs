//! Raw batches straight from the arrow / parquet readers, before validation.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ProjectionMask;

use super::{Error, BATCH_ROWS};

/// File formats of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// CSV with a header row (optionally `.gz`).
    Csv,
    /// JSON Lines (optionally `.gz`).
    Jsonl,
    /// Parquet.
    Parquet,
}

impl Format {
    /// Format by extension, and whether the text is gzipped.
    pub fn of(path: &Path) -> Option<(Format, bool)> {
        let name = path.file_name()?.to_str()?.to_ascii_lowercase();
        let (stem, gz) = match name.strip_suffix(".gz") {
            Some(s) => (s.to_string(), true),
            None => (name, false),
        };
        let f = if stem.ends_with(".csv") {
            Format::Csv
        } else if stem.ends_with(".jsonl") || stem.ends_with(".ndjson") || stem.ends_with(".json") {
            Format::Jsonl
        } else if stem.ends_with(".parquet") && !gz {
            Format::Parquet
        } else {
            return None;
        };
        Some((f, gz))
    }
}

enum Inner {
    Csv(Box<arrow::csv::reader::BufReader<Box<dyn BufRead + Send>>>),
    Jsonl {
        lines: Box<dyn BufRead + Send>,
        schema: SchemaRef,
        line: u64,
        done: bool,
    },
    Parquet(ParquetRecordBatchReader),
}

/// Raw batches of one file plus the 1-based row number of each batch's first row.
pub struct RawReader {
    path: PathBuf,
    inner: Inner,
    next_row: u64,
}

fn open_text(path: &Path, gz: bool) -> Result<Box<dyn BufRead + Send>, Error> {
    let f = File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let r: Box<dyn Read + Send> = if gz {
        Box::new(flate2::read::MultiGzDecoder::new(f))
    } else {
        Box::new(f)
    };
    Ok(Box::new(BufReader::with_capacity(1 << 20, r)))
}

impl RawReader {
    /// Open a file; `wanted` are the column names of interest (others are ignored).
    pub fn open(path: &Path, wanted: &[&str]) -> Result<Self, Error> {
        let fmt_err = |reason: String| Error::Format {
            path: path.to_path_buf(),
            reason,
        };
        let (fmt, gz) = Format::of(path).ok_or_else(|| {
            fmt_err("unknown file type: use .csv, .jsonl (optionally .gz) or .parquet".into())
        })?;
        let inner = match fmt {
            Format::Csv => {
                // The header decides the columns; every column is read as text and the
                // validator parses it, so one bad cell costs one row, not the batch.
                let mut head = open_text(path, gz)?;
                let mut line = String::new();
                head.read_line(&mut line).map_err(|source| Error::Io {
                    path: path.to_path_buf(),
                    source,
                })?;
                let header = parse_header(line.trim_end_matches(['\r', '\n']));
                if header.iter().all(|h| h.is_empty()) {
                    return Err(fmt_err("empty file: a CSV needs a header row".into()));
                }
                let fields: Vec<Field> = header
                    .iter()
                    .enumerate()
                    .map(|(i, h)| {
                        let name = if h.is_empty() {
                            format!("_col{i}")
                        } else {
                            h.clone()
                        };
                        Field::new(name, DataType::Utf8, true)
                    })
                    .collect();
                let schema = Arc::new(Schema::new(fields));
                let r = arrow::csv::ReaderBuilder::new(schema)
                    .with_header(true)
                    .with_batch_size(BATCH_ROWS)
                    .with_truncated_rows(true)
                    .build_buffered(open_text(path, gz)?)
                    .map_err(|e| fmt_err(e.to_string()))?;
                Inner::Csv(Box::new(r))
            }
            Format::Jsonl => {
                let fields: Vec<Field> = wanted
                    .iter()
                    .map(|n| Field::new(*n, DataType::Utf8, true))
                    .collect();
                Inner::Jsonl {
                    lines: open_text(path, gz)?,
                    schema: Arc::new(Schema::new(fields)),
                    line: 0,
                    done: false,
                }
            }
            Format::Parquet => {
                let f = File::open(path).map_err(|source| Error::Io {
                    path: path.to_path_buf(),
                    source,
                })?;
                let b = ParquetRecordBatchReaderBuilder::try_new(f)
                    .map_err(|e| fmt_err(format!("not a readable Parquet file: {e}")))?;
                let roots: Vec<usize> = b
                    .parquet_schema()
                    .root_schema()
                    .get_fields()
                    .iter()
                    .enumerate()
                    .filter(|(_, f)| wanted.contains(&f.name()))
                    .map(|(i, _)| i)
                    .collect();
                let mask = ProjectionMask::roots(b.parquet_schema(), roots);
                let r = b
                    .with_projection(mask)
                    .with_batch_size(BATCH_ROWS)
                    .build()
                    .map_err(|e| fmt_err(e.to_string()))?;
                Inner::Parquet(r)
            }
        };
        Ok(RawReader {
            path: path.to_path_buf(),
            inner,
            next_row: 1,
        })
    }

    /// The file being read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Next raw batch and the row number of its first row.
    pub fn next_batch(&mut self) -> Result<Option<(RecordBatch, u64)>, Error> {
        let path = self.path.clone();
        let fmt_err = |reason: String| Error::Format {
            path: path.clone(),
            reason,
        };
        let batch = match &mut self.inner {
            Inner::Csv(r) => match r.next() {
                None => None,
                // A malformed CSV record (e.g. too many fields) stops the file here; the
                // batches already returned stay accepted.
                Some(Err(e)) => {
                    return Err(fmt_err(format!(
                        "CSV syntax error after data row {}: {e}",
                        self.next_row.saturating_sub(1)
                    )))
                }
                Some(Ok(b)) => Some(b),
            },
            Inner::Jsonl {
                lines,
                schema,
                line,
                done,
            } => {
                if *done {
                    return Ok(None);
                }
                let first = *line + 1;
                let (b, n, eof) = read_json_chunk(lines, schema, first, &path)?;
                *line += n;
                *done = eof;
                // Rows of a JSON chunk carry their own line numbers (blank lines skipped).
                return Ok(if n == 0 { None } else { Some((b, first)) });
            }
            Inner::Parquet(r) => match r.next() {
                None => None,
                Some(Err(e)) => return Err(fmt_err(format!("Parquet decode error: {e}"))),
                Some(Ok(b)) => Some(b),
            },
        };
        Ok(batch.map(|b| {
            let start = self.next_row;
            self.next_row += b.num_rows() as u64;
            (b, start)
        }))
    }
}

fn parse_header(line: &str) -> Vec<String> {
    // Header names are plain identifiers in the contract; quotes are stripped.
    let line = line.trim_start_matches('\u{feff}');
    line.split(',')
        .map(|h| h.trim().trim_matches('"').to_string())
        .collect()
}

/// Decode up to BATCH_ROWS lines. A line that is not valid JSON becomes a row of nulls
/// with a `_bad_json` marker so the validator reports it with its line number; the
/// other lines of the chunk are kept.
fn read_json_chunk(
    lines: &mut Box<dyn BufRead + Send>,
    schema: &SchemaRef,
    first_line: u64,
    path: &Path,
) -> Result<(RecordBatch, u64, bool), Error> {
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
    let mut offsets: Vec<(usize, usize)> = Vec::new();
    let mut eof = false;
    while offsets.len() < BATCH_ROWS {
        let start = buf.len();
        let n = lines
            .read_until(b'\n', &mut buf)
            .map_err(|source| Error::Io {
                path: path.to_path_buf(),
                source,
            })?;
        if n == 0 {
            eof = true;
            break;
        }
        if !buf.ends_with(b"\n") {
            buf.push(b'\n');
        }
        offsets.push((start, buf.len()));
    }
    let n = offsets.len() as u64;
    let decode = |bytes: &[u8]| -> Result<Option<RecordBatch>, arrow::error::ArrowError> {
        let mut d = arrow::json::ReaderBuilder::new(schema.clone())
            .with_coerce_primitive(true)
            .with_batch_size(BATCH_ROWS + 1)
            .build_decoder()?;
        let used = d.decode(bytes)?;
        if used != bytes.len() {
            return Err(arrow::error::ArrowError::JsonError("trailing data".into()));
        }
        d.flush()
    };
    // Blank lines carry no record; keep the line count but skip them.
    let mut is_blank: Vec<bool> = offsets
        .iter()
        .map(|&(s, e)| buf[s..e].iter().all(|c| c.is_ascii_whitespace()))
        .collect();
    let bad_marker_schema = with_bad_marker(schema);
    if let Ok(Some(b)) = decode(&buf) {
        if b.num_rows() == is_blank.iter().filter(|b| !**b).count() {
            let rows =
                expand_with_line_numbers(&b, &is_blank, &[], &bad_marker_schema).map_err(|e| {
                    Error::Format {
                        path: path.to_path_buf(),
                        reason: format!("line {first_line}: {e}"),
                    }
                })?;
            return Ok((rows, n, eof));
        }
    }
    // Slow path: decode line by line to find the bad ones.
    let mut good: Vec<RecordBatch> = Vec::new();
    let mut bad_lines: Vec<usize> = Vec::new();
    for (i, &(s, e)) in offsets.iter().enumerate() {
        if is_blank[i] {
            continue;
        }
        match decode(&buf[s..e]) {
            Ok(Some(b)) if b.num_rows() == 1 => good.push(b),
            Ok(_) | Err(_) => {
                bad_lines.push(i);
                is_blank[i] = false;
            }
        }
    }
    let merged = if good.is_empty() {
        RecordBatch::new_empty(schema.clone())
    } else {
        arrow::compute::concat_batches(schema, &good).map_err(|e| Error::Format {
            path: path.to_path_buf(),
            reason: format!("line {first_line}: {e}"),
        })?
    };
    let rows = expand_with_line_numbers(&merged, &is_blank, &bad_lines, &bad_marker_schema)
        .map_err(|e| Error::Format {
            path: path.to_path_buf(),
            reason: format!("line {first_line}: {e}"),
        })?;
    Ok((rows, n, eof))
}

fn with_bad_marker(schema: &SchemaRef) -> SchemaRef {
    let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new(
        super::validate::LINE_COLUMN,
        DataType::UInt64,
        false,
    ));
    fields.push(Field::new(
        super::validate::BAD_JSON_COLUMN,
        DataType::Boolean,
        false,
    ));
    Arc::new(Schema::new(fields))
}

/// Attach each record's line offset (0-based within the chunk) and a bad-JSON flag, with a
/// null row for every bad line, so the validator can name the line.
fn expand_with_line_numbers(
    good: &RecordBatch,
    blank: &[bool],
    bad: &[usize],
    schema: &SchemaRef,
) -> Result<RecordBatch, arrow::error::ArrowError> {
    use arrow::array::{new_null_array, Array, BooleanArray, UInt32Array, UInt64Array};
    let total = blank.len();
    let mut line_of: Vec<u64> = Vec::with_capacity(total);
    let mut is_bad: Vec<bool> = Vec::with_capacity(total);
    // take() indices into `good` (None = null row for a bad line).
    let mut take: Vec<Option<u32>> = Vec::with_capacity(total);
    let mut g = 0u32;
    for (i, &b) in blank.iter().enumerate() {
        if bad.binary_search(&i).is_ok() {
            line_of.push(i as u64);
            is_bad.push(true);
            take.push(None);
        } else if !b {
            line_of.push(i as u64);
            is_bad.push(false);
            take.push(Some(g));
            g += 1;
        }
    }
    let idx = UInt32Array::from(take);
    let mut cols: Vec<Arc<dyn Array>> = good
        .columns()
        .iter()
        .map(|c| {
            if c.is_empty() {
                new_null_array(c.data_type(), idx.len())
            } else {
                arrow::compute::take(c.as_ref(), &idx, None)
                    .unwrap_or_else(|_| new_null_array(c.data_type(), idx.len()))
            }
        })
        .collect();
    cols.push(Arc::new(UInt64Array::from(line_of)));
    cols.push(Arc::new(BooleanArray::from(is_bad)));
    RecordBatch::try_new(schema.clone(), cols)
}
