//! Row-by-row validation of raw batches into the canonical event schema.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Float32Array, StringArray, StringBuilder,
    TimestampMillisecondArray, UInt16Array, UInt32Array, UInt64Array, UInt8Array,
};
use arrow::compute::{cast_with_options, CastOptions};
use arrow::datatypes::{DataType, Float64Type, Int64Type, TimeUnit, UInt64Type};
use arrow::record_batch::RecordBatch;

use super::{Error, ReadReport};
use crate::event::{col, event_schema, COLUMNS, MAX_TOKEN_ID_BYTES, REQUIRED};

/// Internal column added by the JSON reader: the line offset of each row in its chunk.
pub const LINE_COLUMN: &str = "__tokenwatch_line";
/// Internal column added by the JSON reader: the line was not valid JSON.
pub const BAD_JSON_COLUMN: &str = "__tokenwatch_bad_json";

/// A row that breaks the contract.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{path}: row {row}, column `{column}`: {reason}")]
pub struct RowError {
    /// File (or `grpc` for the service).
    pub path: String,
    /// 1-based data row (line for JSON Lines; header not counted for CSV).
    pub row: u64,
    /// Contract column at fault.
    pub column: String,
    /// Why.
    pub reason: String,
}

/// One cell seen through the lens of the few shapes the formats produce.
#[derive(Clone, Copy)]
enum Cell<'a> {
    Null,
    Str(&'a str),
    Int(i64),
    UInt(u64),
    Float(f64),
}

/// A column converted to one of the shapes `Cell` reads.
enum ColView {
    Missing,
    Str(StringArray),
    Int(arrow::array::Int64Array),
    UInt(arrow::array::UInt64Array),
    Float(arrow::array::Float64Array),
}

impl ColView {
    fn new(a: Option<&ArrayRef>) -> Result<ColView, String> {
        let Some(a) = a else {
            return Ok(ColView::Missing);
        };
        let opts = CastOptions::default();
        let conv = |to: &DataType| cast_with_options(a, to, &opts).map_err(|e| e.to_string());
        Ok(match a.data_type() {
            DataType::Utf8 => ColView::Str(a.as_string::<i32>().clone()),
            DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 => {
                ColView::Int(conv(&DataType::Int64)?.as_primitive::<Int64Type>().clone())
            }
            DataType::UInt8 | DataType::UInt16 | DataType::UInt32 | DataType::UInt64 => {
                ColView::UInt(
                    conv(&DataType::UInt64)?
                        .as_primitive::<UInt64Type>()
                        .clone(),
                )
            }
            DataType::Float16 | DataType::Float32 | DataType::Float64 => ColView::Float(
                conv(&DataType::Float64)?
                    .as_primitive::<Float64Type>()
                    .clone(),
            ),
            DataType::Timestamp(_, _) => {
                let ms = conv(&DataType::Timestamp(TimeUnit::Millisecond, None))?;
                ColView::Int(conv_i64(&ms)?.as_primitive::<Int64Type>().clone())
            }
            DataType::Boolean => {
                ColView::Int(conv(&DataType::Int64)?.as_primitive::<Int64Type>().clone())
            }
            DataType::Null => ColView::Missing,
            _ => ColView::Str(conv(&DataType::Utf8)?.as_string::<i32>().clone()),
        })
    }

    #[inline]
    fn get(&self, i: usize) -> Cell<'_> {
        match self {
            ColView::Missing => Cell::Null,
            ColView::Str(a) if a.is_valid(i) => Cell::Str(a.value(i)),
            ColView::Int(a) if a.is_valid(i) => Cell::Int(a.value(i)),
            ColView::UInt(a) if a.is_valid(i) => Cell::UInt(a.value(i)),
            ColView::Float(a) if a.is_valid(i) => Cell::Float(a.value(i)),
            _ => Cell::Null,
        }
    }
}

fn conv_i64(a: &ArrayRef) -> Result<ArrayRef, String> {
    cast_with_options(a, &DataType::Int64, &CastOptions::default()).map_err(|e| e.to_string())
}

fn is_empty(c: Cell<'_>) -> bool {
    match c {
        Cell::Null => true,
        Cell::Str(s) => s.trim().is_empty(),
        _ => false,
    }
}

fn as_u64(c: Cell<'_>) -> Result<Option<u64>, String> {
    match c {
        Cell::Null => Ok(None),
        Cell::Str(s) if s.trim().is_empty() => Ok(None),
        Cell::Str(s) => {
            let t = s.trim();
            t.parse::<u64>()
                .ok()
                .or_else(|| {
                    // "200.0" from tools that write every number as a float.
                    t.parse::<f64>()
                        .ok()
                        .filter(|f| *f >= 0.0 && f.fract() == 0.0 && *f < 1.8e19)
                        .map(|f| f as u64)
                })
                .map(Some)
                .ok_or_else(|| format!("{} is not an unsigned integer", shown(s)))
        }
        Cell::UInt(v) => Ok(Some(v)),
        Cell::Int(v) if v >= 0 => Ok(Some(v as u64)),
        Cell::Int(v) => Err(format!("{v} is negative")),
        Cell::Float(f) if f >= 0.0 && f.fract() == 0.0 && f < 1.8e19 => Ok(Some(f as u64)),
        Cell::Float(f) => Err(format!("{f} is not an unsigned integer")),
    }
}

fn as_f64(c: Cell<'_>) -> Result<Option<f64>, String> {
    match c {
        Cell::Null => Ok(None),
        Cell::Str(s) if s.trim().is_empty() => Ok(None),
        Cell::Str(s) => s
            .trim()
            .parse::<f64>()
            .map(Some)
            .map_err(|_| format!("{} is not a number", shown(s))),
        Cell::UInt(v) => Ok(Some(v as f64)),
        Cell::Int(v) => Ok(Some(v as f64)),
        Cell::Float(f) => Ok(Some(f)),
    }
}

/// A value as an error message shows it: quoted, at most 40 characters (a hostile cell must
/// not be echoed back whole).
pub fn shown(s: &str) -> String {
    let mut it = s.chars();
    let head: String = it.by_ref().take(40).collect();
    if it.next().is_some() {
        format!("{head:?}... ({} bytes)", s.len())
    } else {
        format!("{head:?}")
    }
}

fn str_of<'a>(c: Cell<'a>, what: &str) -> Result<&'a str, String> {
    match c {
        Cell::Str(s) => Ok(s),
        Cell::Null => Err(format!("{what} is missing")),
        _ => Err(format!("{what} must be text")),
    }
}

/// Validated values of one row that need rebuilding (the rest is cast column-wise).
struct Row {
    ts: i64,
    method: [u8; 16],
    method_len: usize,
    country: Option<[u8; 2]>,
    label: Option<u8>,
    status: u16,
    bytes_out: u64,
    latency: Option<f32>,
    asn: Option<u32>,
}

/// Field checks shared by every door (files here, gRPC in `server::convert`), so that a
/// value is accepted or rejected alike whatever way it came in.
pub mod field {
    use super::*;

    /// Event time in epoch ms: years 1970..=9999 keep every later time computation far
    /// from overflow.
    pub fn ts(ts: i64) -> Result<i64, String> {
        if (0..=253_402_300_799_999).contains(&ts) {
            Ok(ts)
        } else {
            Err(format!("{ts} is outside 1970..=9999"))
        }
    }

    /// Longest route template accepted (bytes).
    pub const MAX_ENDPOINT_BYTES: usize = 512;
    /// Longest user agent accepted (bytes).
    pub const MAX_USER_AGENT_BYTES: usize = 512;
    /// Longest scope accepted (bytes).
    pub const MAX_SCOPE_BYTES: usize = 128;
    /// Longest environment name accepted (bytes).
    pub const MAX_ENV_BYTES: usize = 32;
    /// Longest incident kind accepted (bytes, labelled data only).
    pub const MAX_KIND_BYTES: usize = 64;
    /// Longest client event id accepted (bytes, gRPC only).
    pub const MAX_EVENT_ID_BYTES: usize = 128;
    /// Largest response size accepted (1 TiB): beyond it a value is broken, not a response.
    pub const MAX_BYTES_OUT: u64 = 1 << 40;
    /// The HTTP methods (RFC 9110 and PATCH, RFC 5789).
    pub const METHODS: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
    ];

    /// Text of a field: at most `max` bytes, printable (no control characters: they would
    /// reach logs, consoles and CSV files as they are).
    pub fn text(name: &str, s: &str, max: usize) -> Result<(), String> {
        if s.len() > max {
            return Err(format!("{name} is {} bytes, more than {max}", s.len()));
        }
        // Fast path on bytes: every control character's UTF-8 starts with a byte below 0x20,
        // 0x7F, or 0xC2 (U+0080..U+009F); text without them has none.
        // (A fold without early exit: the compiler vectorises it; fields are short.)
        let suspect = s.as_bytes().iter().fold(false, |acc, &b| {
            acc | (b < 0x20) | (b == 0x7f) | (b == 0xc2)
        });
        if !suspect {
            return Ok(());
        }
        if let Some((at, c)) = s.char_indices().find(|(_, c)| c.is_control()) {
            return Err(format!(
                "{name} has a control character (U+{:04X}) at byte {at}",
                c as u32
            ));
        }
        Ok(())
    }

    /// A token id: 1..=256 bytes, printable.
    pub fn token_id(token: &str) -> Result<(), String> {
        if token.is_empty() {
            return Err("token_id is empty".into());
        }
        text("token_id", token, MAX_TOKEN_ID_BYTES)
    }

    /// An HTTP method (any case), upper-cased into a fixed buffer (no allocation).
    pub fn method(m: &str) -> Result<([u8; 16], usize), String> {
        // Gateways send upper case: an exact match first, any case after.
        let known = METHODS
            .iter()
            .find(|k| k.as_bytes() == m.as_bytes())
            .or_else(|| METHODS.iter().find(|k| k.eq_ignore_ascii_case(m)));
        let Some(known) = known else {
            return Err(format!(
                "{} is not an HTTP method ({})",
                super::shown(m),
                METHODS.join(", ")
            ));
        };
        let mut method = [0u8; 16];
        method[..known.len()].copy_from_slice(known.as_bytes());
        Ok((method, known.len()))
    }

    /// A route template: 1..=512 bytes, printable.
    pub fn endpoint(ep: &str) -> Result<(), String> {
        if ep.is_empty() {
            return Err("endpoint is empty".into());
        }
        text("endpoint", ep, MAX_ENDPOINT_BYTES)
    }

    /// The optional text fields (user agent, scope, env, kind) by column, with their limits.
    pub fn optional_text(column: usize, s: &str) -> Result<(), String> {
        let (name, max) = match column {
            col::USER_AGENT => ("user_agent", MAX_USER_AGENT_BYTES),
            col::SCOPE => ("scope", MAX_SCOPE_BYTES),
            col::ENV => ("env", MAX_ENV_BYTES),
            _ => ("kind", MAX_KIND_BYTES),
        };
        text(name, s, max)
    }

    /// A response size in bytes, at most [`MAX_BYTES_OUT`].
    pub fn bytes_out(b: u64) -> Result<u64, String> {
        if b <= MAX_BYTES_OUT {
            Ok(b)
        } else {
            Err(format!("{b} bytes is more than {MAX_BYTES_OUT} (1 TiB)"))
        }
    }

    /// An HTTP status, 100..=599.
    pub fn status(s: u64) -> Result<u16, String> {
        if (100..=599).contains(&s) {
            Ok(s as u16)
        } else {
            Err(format!("{s} is not an HTTP status (100..=599)"))
        }
    }

    /// Largest latency accepted (ms): a day. Anything larger is a broken clock or a hostile
    /// value, and must not become an infinite `f32` in a token's baseline.
    pub const MAX_LATENCY_MS: f64 = 86_400_000.0;

    /// A latency in ms: finite, not negative, at most [`MAX_LATENCY_MS`].
    pub fn latency(l: f64) -> Result<f32, String> {
        if (0.0..=MAX_LATENCY_MS).contains(&l) {
            Ok(l as f32)
        } else {
            Err(format!(
                "{l:?} is not a latency (finite, 0..={MAX_LATENCY_MS:.0} ms)"
            ))
        }
    }

    /// An IPv4 or IPv6 address in text.
    pub fn src_ip(ip: &str) -> Result<IpAddr, String> {
        ip.trim()
            .parse::<IpAddr>()
            .map_err(|_| format!("{} is not an IPv4 or IPv6 address", super::shown(ip)))
    }

    /// An ISO 3166-1 alpha-2 code, upper-cased; empty text is "unknown".
    pub fn country(s: &str) -> Result<Option<[u8; 2]>, String> {
        let b = s.trim().as_bytes();
        if b.is_empty() {
            return Ok(None);
        }
        if b.len() != 2 || !b.iter().all(|c| c.is_ascii_alphabetic()) {
            return Err(format!(
                "{} is not an ISO 3166-1 alpha-2 code",
                super::shown(s)
            ));
        }
        Ok(Some([b[0].to_ascii_uppercase(), b[1].to_ascii_uppercase()]))
    }

    /// An autonomous system number (32 bits).
    pub fn asn(a: u64) -> Result<u32, String> {
        u32::try_from(a).map_err(|_| format!("{a} is larger than a 32-bit ASN"))
    }
}

fn check_row(cols: &[ColView], i: usize) -> Result<Row, (usize, String)> {
    let ts = match cols[col::TS].get(i) {
        Cell::Null => return Err((col::TS, "timestamp is missing".into())),
        Cell::Int(v) => v,
        Cell::UInt(v) => i64::try_from(v).map_err(|_| (col::TS, format!("{v} is out of range")))?,
        Cell::Float(f) if f.fract() == 0.0 && f.abs() < 9e15 => f as i64,
        Cell::Float(f) => return Err((col::TS, format!("{f} is not epoch milliseconds"))),
        Cell::Str(s) => crate::event::parse_ts(s).map_err(|e| (col::TS, e))?,
    };
    let ts = field::ts(ts).map_err(|e| (col::TS, e))?;
    let token = str_of(cols[col::TOKEN_ID].get(i), "token_id").map_err(|e| (col::TOKEN_ID, e))?;
    field::token_id(token).map_err(|e| (col::TOKEN_ID, e))?;
    let m = str_of(cols[col::METHOD].get(i), "method").map_err(|e| (col::METHOD, e))?;
    let (method, method_len) = field::method(m).map_err(|e| (col::METHOD, e))?;
    let ep = str_of(cols[col::ENDPOINT].get(i), "endpoint").map_err(|e| (col::ENDPOINT, e))?;
    field::endpoint(ep).map_err(|e| (col::ENDPOINT, e))?;
    let status = match as_u64(cols[col::STATUS].get(i)) {
        Ok(Some(s)) => field::status(s).map_err(|e| (col::STATUS, e))?,
        Ok(None) => return Err((col::STATUS, "status is missing".into())),
        Err(e) => return Err((col::STATUS, e)),
    };
    let bytes_out = match as_u64(cols[col::BYTES_OUT].get(i)) {
        Ok(Some(b)) => field::bytes_out(b).map_err(|e| (col::BYTES_OUT, e))?,
        Ok(None) => return Err((col::BYTES_OUT, "bytes_out is missing".into())),
        Err(e) => return Err((col::BYTES_OUT, e)),
    };
    let latency = match as_f64(cols[col::LATENCY_MS].get(i)) {
        Ok(Some(l)) => Some(field::latency(l).map_err(|e| (col::LATENCY_MS, e))?),
        Ok(None) => None,
        Err(e) => return Err((col::LATENCY_MS, e)),
    };
    let ip = str_of(cols[col::SRC_IP].get(i), "src_ip").map_err(|e| (col::SRC_IP, e))?;
    field::src_ip(ip).map_err(|e| (col::SRC_IP, e))?;
    let country = match cols[col::COUNTRY].get(i) {
        c if is_empty(c) => None,
        Cell::Str(s) => field::country(s).map_err(|e| (col::COUNTRY, e))?,
        _ => return Err((col::COUNTRY, "country must be text".into())),
    };
    let asn = match as_u64(cols[col::ASN].get(i)) {
        Ok(Some(a)) => Some(field::asn(a).map_err(|e| (col::ASN, e))?),
        Ok(None) => None,
        Err(e) => return Err((col::ASN, e)),
    };
    for c in [col::USER_AGENT, col::SCOPE, col::ENV, col::KIND] {
        match cols[c].get(i) {
            Cell::Int(_) | Cell::UInt(_) | Cell::Float(_) => {
                return Err((c, format!("{} must be text", COLUMNS[c])));
            }
            Cell::Str(s) => field::optional_text(c, s).map_err(|e| (c, e))?,
            Cell::Null => {}
        }
    }
    let label = match as_u64(cols[col::LABEL].get(i)) {
        Ok(None) => None,
        Ok(Some(v)) if v <= 1 => Some(v as u8),
        Ok(Some(v)) => return Err((col::LABEL, format!("{v} is not 0 or 1"))),
        Err(e) => return Err((col::LABEL, e)),
    };
    Ok(Row {
        ts,
        method,
        method_len,
        country,
        label,
        status,
        bytes_out,
        latency,
        asn,
    })
}

/// Validate a raw batch: returns the valid rows in the canonical schema and records each
/// bad row (file, row, column, reason) in `report`. Only a batch-level problem (a
/// required column missing, an unreadable column type) is an error.
pub fn normalize(
    raw: &RecordBatch,
    path: &Path,
    first_row: u64,
    report: &mut ReadReport,
) -> Result<RecordBatch, Error> {
    let schema = raw.schema();
    let find = |name: &str| schema.index_of(name).ok().map(|i| raw.column(i));
    let found = || {
        schema
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .filter(|n| !n.starts_with("__tokenwatch"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let bad_json = find(BAD_JSON_COLUMN).map(|a| a.as_boolean().clone());
    let line_of = find(LINE_COLUMN).map(|a| a.as_primitive::<UInt64Type>().clone());
    let all_bad_json = bad_json.as_ref().is_some_and(|b| b.true_count() == b.len());
    for &c in &REQUIRED {
        // JSON Lines always have every column (null when absent from the objects), so a
        // missing field there is a row error, not a file error.
        if find(COLUMNS[c]).is_none() && !all_bad_json {
            return Err(Error::MissingColumn {
                path: path.to_path_buf(),
                column: COLUMNS[c],
                found: found(),
            });
        }
    }
    let mut views = Vec::with_capacity(COLUMNS.len());
    for name in COLUMNS {
        views.push(ColView::new(find(name)).map_err(|reason| Error::Format {
            path: path.to_path_buf(),
            reason: format!("column `{name}`: {reason}"),
        })?);
    }
    let n = raw.num_rows();
    let mut keep = Vec::with_capacity(n);
    let mut ts = Vec::with_capacity(n);
    let mut method = StringBuilder::with_capacity(n, n * 4);
    let mut country = StringBuilder::with_capacity(n, n * 2);
    let mut label = Vec::with_capacity(n);
    let mut status = Vec::with_capacity(n);
    let mut bytes_out = Vec::with_capacity(n);
    let mut latency = Vec::with_capacity(n);
    let mut asn = Vec::with_capacity(n);
    let path_s = path.display().to_string();
    for i in 0..n {
        let row = first_row + line_of.as_ref().map(|l| l.value(i)).unwrap_or(i as u64);
        if bad_json.as_ref().is_some_and(|b| b.value(i)) {
            report.push(RowError {
                path: path_s.clone(),
                row,
                column: "-".into(),
                reason: "line is not a valid JSON object".into(),
            });
            keep.push(false);
            continue;
        }
        match check_row(&views, i) {
            Ok(r) => {
                keep.push(true);
                ts.push(r.ts);
                // The method bytes are ASCII letters, checked above.
                method
                    .append_value(std::str::from_utf8(&r.method[..r.method_len]).unwrap_or("GET"));
                match r.country {
                    Some(c) => country.append_value(std::str::from_utf8(&c).unwrap_or("")),
                    None => country.append_null(),
                }
                label.push(r.label);
                status.push(r.status);
                bytes_out.push(r.bytes_out);
                latency.push(r.latency);
                asn.push(r.asn);
            }
            Err((c, reason)) => {
                keep.push(false);
                report.push(RowError {
                    path: path_s.clone(),
                    row,
                    column: COLUMNS[c].into(),
                    reason,
                });
            }
        }
    }
    let mask = BooleanArray::from(keep);
    let out_schema = event_schema();
    let kept = mask.true_count();
    let mut cols: Vec<ArrayRef> = Vec::with_capacity(COLUMNS.len());
    for (c, field) in out_schema.fields().iter().enumerate() {
        let a: ArrayRef = match c {
            col::TS => Arc::new(
                TimestampMillisecondArray::from(std::mem::take(&mut ts)).with_timezone("UTC"),
            ),
            col::METHOD => Arc::new(method.finish()),
            col::COUNTRY => Arc::new(country.finish()),
            col::LABEL => Arc::new(UInt8Array::from(std::mem::take(&mut label))),
            col::STATUS => Arc::new(UInt16Array::from(std::mem::take(&mut status))),
            col::BYTES_OUT => Arc::new(UInt64Array::from(std::mem::take(&mut bytes_out))),
            col::LATENCY_MS => Arc::new(Float32Array::from(std::mem::take(&mut latency))),
            col::ASN => Arc::new(UInt32Array::from(std::mem::take(&mut asn))),
            _ => match find(field.name()) {
                None => arrow::array::new_null_array(field.data_type(), kept),
                Some(a) => {
                    let a = filter(a, &mask, kept)?;
                    if a.data_type() == field.data_type() {
                        a
                    } else {
                        // Values were validated above; a safe cast of the kept rows
                        // cannot turn a valid value into a null.
                        cast_with_options(&a, field.data_type(), &CastOptions::default()).map_err(
                            |e| Error::Format {
                                path: path.to_path_buf(),
                                reason: format!("column `{}`: {e}", field.name()),
                            },
                        )?
                    }
                }
            },
        };
        cols.push(a);
    }
    let batch = RecordBatch::try_new(out_schema, cols).map_err(|e| Error::Format {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(batch)
}

fn filter(a: &ArrayRef, mask: &BooleanArray, kept: usize) -> Result<ArrayRef, Error> {
    if kept == a.len() {
        return Ok(a.clone());
    }
    arrow::compute::filter(a.as_ref(), mask).map_err(|e| Error::Format {
        path: Default::default(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{Field, Schema};

    fn raw(rows: &[[&str; 7]]) -> RecordBatch {
        let names = [
            "ts",
            "token_id",
            "method",
            "endpoint",
            "status",
            "bytes_out",
            "src_ip",
        ];
        let fields: Vec<Field> = names
            .iter()
            .map(|n| Field::new(*n, DataType::Utf8, true))
            .collect();
        let cols: Vec<ArrayRef> = (0..7)
            .map(|c| Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r[c]))) as ArrayRef)
            .collect();
        RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap()
    }

    #[test]
    fn keeps_valid_rows_and_names_the_bad_ones() {
        let b = raw(&[
            [
                "2026-03-01T09:15:02.123Z",
                "t1",
                "get",
                "/v1/a",
                "200",
                "10",
                "10.0.0.1",
            ],
            [
                "2026-03-01T09:15:03Z",
                "t1",
                "GET",
                "/v1/a",
                "999",
                "10",
                "10.0.0.1",
            ],
            ["1772356502123", "", "GET", "/v1/a", "200", "10", "10.0.0.1"],
            [
                "1772356502123",
                "t2",
                "GET",
                "/v1/a",
                "200",
                "10",
                "not-an-ip",
            ],
            [
                "1772356502123",
                "t2",
                "POST",
                "/v1/b",
                "201",
                "0",
                "2001:db8::1",
            ],
        ]);
        let mut rep = ReadReport::default();
        let out = normalize(&b, Path::new("x.csv"), 1, &mut rep).unwrap();
        assert_eq!(out.num_rows(), 2);
        assert_eq!(rep.bad_rows, 3);
        assert_eq!(rep.first_errors[0].row, 2);
        assert_eq!(rep.first_errors[0].column, "status");
        assert_eq!(rep.first_errors[1].column, "token_id");
        assert_eq!(rep.first_errors[2].column, "src_ip");
        assert!(rep.first_errors[2].to_string().starts_with("x.csv: row 4"));
        assert_eq!(out.column(col::METHOD).as_string::<i32>().value(0), "GET");
        let ts = out
            .column(col::TS)
            .as_primitive::<arrow::datatypes::TimestampMillisecondType>();
        assert_eq!(ts.value(0), 1_772_356_502_123);
    }

    #[test]
    fn missing_required_column_is_a_file_error() {
        let fields = vec![Field::new("ts", DataType::Int64, false)];
        let b = RecordBatch::try_new(
            Arc::new(Schema::new(fields)),
            vec![Arc::new(Int64Array::from(vec![1]))],
        )
        .unwrap();
        let e = normalize(&b, Path::new("y.parquet"), 1, &mut ReadReport::default()).unwrap_err();
        assert!(e.to_string().contains("token_id"), "{e}");
    }

    #[test]
    fn a_latency_that_would_overflow_f32_is_rejected() {
        // 1e300 is a finite f64 but an infinite f32: it must never reach a baseline.
        assert!(field::latency(1e300).is_err());
        assert!(field::method("FOOBARBAZ").is_err());
        assert_eq!(
            field::method("patch").map(|(m, n)| m[..n].to_vec()),
            Ok(b"PATCH".to_vec())
        );
        assert!(field::endpoint(&"x".repeat(513)).is_err());
        assert!(field::endpoint("/v1/a\tb").is_err());
        assert!(field::optional_text(col::ENV, "prod").is_ok());
        assert!(field::optional_text(col::ENV, &"e".repeat(33)).is_err());
        assert!(field::optional_text(col::USER_AGENT, "Mozilla/5.0 (X11; Linux) é").is_ok());
        assert!(field::bytes_out(u64::MAX).is_err());
        assert!(shown(&"z".repeat(10_000)).len() < 80);
        assert!(field::latency(f64::NAN).is_err());
        assert!(field::latency(-1.0).is_err());
        assert_eq!(field::latency(12.5), Ok(12.5));
    }
}
