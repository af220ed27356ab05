//! Window-score files (`--scores-out`): CSV or Parquet by extension, one row per
//! (token, window) with `token_id, window_start, risk, alert, top_signal`, then `events`,
//! `learned`, `label`, `kind`, `phase`, one evidence column per signal, then `confidence`
//! and `reasons` (the window's reasons in words, `signal: reason` joined by ` | `, largest
//! evidence first; empty when no signal spoke).

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    ArrayRef, Float32Builder, StringBuilder, TimestampMillisecondBuilder, UInt32Builder,
    UInt8Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::engine::WindowScore;
use crate::event::fmt_ts;
use crate::model::SignalKind;

/// Errors writing outputs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// File could not be created or written.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Arrow / Parquet encoder failure.
    #[error("{path}: {reason}")]
    Encode {
        /// File.
        path: PathBuf,
        /// Cause.
        reason: String,
    },
}

enum Sink {
    Csv(arrow::csv::Writer<BufWriter<File>>),
    Parquet(ArrowWriter<File>),
}

/// Streams window scores to a file in batches.
pub struct ScoresWriter {
    path: PathBuf,
    sink: Sink,
    schema: SchemaRef,
    pending: Vec<(WindowScore, &'static str)>,
    rows: u64,
}

const CHUNK: usize = 65_536;

impl ScoresWriter {
    /// Create `path` (`.csv` or `.parquet`).
    pub fn create(path: &Path) -> Result<Self, Error> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let parquet = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("parquet"));
        let mut fields = vec![
            Field::new("token_id", DataType::Utf8, false),
            if parquet {
                Field::new(
                    "window_start",
                    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
                    false,
                )
            } else {
                Field::new("window_start", DataType::Utf8, false)
            },
            Field::new("risk", DataType::Float32, false),
            Field::new("alert", DataType::UInt8, false),
            Field::new("top_signal", DataType::Utf8, false),
            Field::new("events", DataType::UInt32, false),
            Field::new("learned", DataType::UInt8, false),
            Field::new("label", DataType::UInt8, false),
            Field::new("kind", DataType::Utf8, true),
            Field::new("phase", DataType::Utf8, false),
        ];
        for s in SignalKind::ALL {
            fields.push(Field::new(s.name(), DataType::Float32, false));
        }
        fields.push(Field::new("confidence", DataType::Float32, false));
        fields.push(Field::new("reasons", DataType::Utf8, false));
        let schema = Arc::new(Schema::new(fields));
        let file = File::create(path).map_err(io)?;
        let sink = if parquet {
            let props = WriterProperties::builder()
                .set_compression(Compression::ZSTD(ZstdLevel::default()))
                .build();
            Sink::Parquet(
                ArrowWriter::try_new(file, schema.clone(), Some(props)).map_err(|e| {
                    Error::Encode {
                        path: path.to_path_buf(),
                        reason: e.to_string(),
                    }
                })?,
            )
        } else {
            Sink::Csv(
                arrow::csv::WriterBuilder::new()
                    .with_header(true)
                    .build(BufWriter::new(file)),
            )
        };
        Ok(ScoresWriter {
            path: path.to_path_buf(),
            sink,
            schema,
            pending: Vec::with_capacity(CHUNK),
            rows: 0,
        })
    }

    /// Queue one score; `phase` is `train`, `eval` (after the training split) or `replay`.
    pub fn write(&mut self, s: WindowScore, phase: &'static str) -> Result<(), Error> {
        self.pending.push((s, phase));
        if self.pending.len() >= CHUNK {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), Error> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let n = self.pending.len();
        let parquet = matches!(self.sink, Sink::Parquet(_));
        let mut token = StringBuilder::with_capacity(n, n * 16);
        let mut start_s = StringBuilder::with_capacity(n, n * 20);
        let mut start_t = TimestampMillisecondBuilder::with_capacity(n);
        let mut risk = Float32Builder::with_capacity(n);
        let mut alert = UInt8Builder::with_capacity(n);
        let mut top = StringBuilder::with_capacity(n, n * 8);
        let mut events = UInt32Builder::with_capacity(n);
        let mut learned = UInt8Builder::with_capacity(n);
        let mut label = UInt8Builder::with_capacity(n);
        let mut kind = StringBuilder::with_capacity(n, n);
        let mut phase = StringBuilder::with_capacity(n, n * 5);
        let mut sig: Vec<Float32Builder> = SignalKind::ALL
            .iter()
            .map(|_| Float32Builder::with_capacity(n))
            .collect();
        let mut confidence = Float32Builder::with_capacity(n);
        let mut reasons = StringBuilder::with_capacity(n, n * 4);
        let mut line = String::new();
        for (s, ph) in &self.pending {
            token.append_value(&s.token);
            if parquet {
                start_t.append_value(s.start);
            } else {
                start_s.append_value(fmt_ts(s.start));
            }
            risk.append_value(s.risk);
            alert.append_value(s.alert as u8);
            top.append_value(s.top_signal());
            events.append_value(s.events);
            learned.append_value(s.learned as u8);
            label.append_value((s.labelled > 0) as u8);
            kind.append_option(s.kind.as_deref());
            phase.append_value(ph);
            let mut vals = [0f32; SignalKind::ALL.len()];
            // One signal kind may speak twice (the endpoint mix as a whole and a burst on
            // one endpoint): its column is their sum, so the columns add up to the risk.
            for c in &s.contributions {
                vals[c.signal.index()] += c.evidence as f32;
            }
            for (b, v) in sig.iter_mut().zip(vals) {
                b.append_value(v);
            }
            confidence.append_value(s.confidence);
            line.clear();
            for (i, c) in s.contributions.iter().enumerate() {
                if i > 0 {
                    line.push_str(" | ");
                }
                line.push_str(c.signal.name());
                line.push_str(": ");
                line.push_str(&c.reason);
            }
            reasons.append_value(&line);
        }
        let start: ArrayRef = if parquet {
            Arc::new(start_t.finish().with_timezone("UTC"))
        } else {
            Arc::new(start_s.finish())
        };
        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(token.finish()),
            start,
            Arc::new(risk.finish()),
            Arc::new(alert.finish()),
            Arc::new(top.finish()),
            Arc::new(events.finish()),
            Arc::new(learned.finish()),
            Arc::new(label.finish()),
            Arc::new(kind.finish()),
            Arc::new(phase.finish()),
        ];
        for mut b in sig {
            cols.push(Arc::new(b.finish()));
        }
        cols.push(Arc::new(confidence.finish()));
        cols.push(Arc::new(reasons.finish()));
        let enc = |e: String| Error::Encode {
            path: self.path.clone(),
            reason: e,
        };
        let batch =
            RecordBatch::try_new(self.schema.clone(), cols).map_err(|e| enc(e.to_string()))?;
        match &mut self.sink {
            Sink::Csv(w) => w.write(&batch).map_err(|e| enc(e.to_string()))?,
            Sink::Parquet(w) => w.write(&batch).map_err(|e| enc(e.to_string()))?,
        }
        self.rows += n as u64;
        self.pending.clear();
        Ok(())
    }

    /// Flush and close; returns rows written.
    pub fn finish(mut self) -> Result<u64, Error> {
        self.flush()?;
        let path = self.path.clone();
        match self.sink {
            Sink::Csv(w) => {
                let mut inner = w.into_inner();
                std::io::Write::flush(&mut inner).map_err(|source| Error::Io { path, source })?;
            }
            Sink::Parquet(w) => {
                w.close().map_err(|e| Error::Encode {
                    path,
                    reason: e.to_string(),
                })?;
            }
        }
        Ok(self.rows)
    }
}
