//! Domain types and the one Arrow schema every door produces (`../shared/spec/events.md`).
//! No proto, no tonic, no files here.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};

/// Column positions in [`event_schema`]. Readers and the engine index by these.
pub mod col {
    #![allow(missing_docs)]
    pub const TS: usize = 0;
    pub const TOKEN_ID: usize = 1;
    pub const METHOD: usize = 2;
    pub const ENDPOINT: usize = 3;
    pub const STATUS: usize = 4;
    pub const BYTES_OUT: usize = 5;
    pub const LATENCY_MS: usize = 6;
    pub const SRC_IP: usize = 7;
    pub const COUNTRY: usize = 8;
    pub const ASN: usize = 9;
    pub const USER_AGENT: usize = 10;
    pub const SCOPE: usize = 11;
    pub const ENV: usize = 12;
    pub const LABEL: usize = 13;
    pub const KIND: usize = 14;
}

/// Contract column names in schema order.
pub const COLUMNS: [&str; 15] = [
    "ts",
    "token_id",
    "method",
    "endpoint",
    "status",
    "bytes_out",
    "latency_ms",
    "src_ip",
    "country",
    "asn",
    "user_agent",
    "scope",
    "env",
    "label",
    "kind",
];

/// Columns an event cannot do without.
pub const REQUIRED: [usize; 7] = [
    col::TS,
    col::TOKEN_ID,
    col::METHOD,
    col::ENDPOINT,
    col::STATUS,
    col::BYTES_OUT,
    col::SRC_IP,
];

/// Longest token id accepted, in bytes.
pub const MAX_TOKEN_ID_BYTES: usize = 256;

/// The canonical, validated event batch schema.
pub fn event_schema() -> SchemaRef {
    let utc: Arc<str> = Arc::from("UTC");
    Arc::new(Schema::new(vec![
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Millisecond, Some(utc)),
            false,
        ),
        Field::new("token_id", DataType::Utf8, false),
        Field::new("method", DataType::Utf8, false),
        Field::new("endpoint", DataType::Utf8, false),
        Field::new("status", DataType::UInt16, false),
        Field::new("bytes_out", DataType::UInt64, false),
        Field::new("latency_ms", DataType::Float32, true),
        Field::new("src_ip", DataType::Utf8, false),
        Field::new("country", DataType::Utf8, true),
        Field::new("asn", DataType::UInt32, true),
        Field::new("user_agent", DataType::Utf8, true),
        Field::new("scope", DataType::Utf8, true),
        Field::new("env", DataType::Utf8, true),
        Field::new("label", DataType::UInt8, true),
        Field::new("kind", DataType::Utf8, true),
    ]))
}

/// Identifier (or fingerprint) of an API token. Never the secret itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TokenId(pub String);

impl std::fmt::Display for TokenId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Format epoch milliseconds as RFC 3339 UTC (`2026-03-01T09:15:00Z`).
pub fn fmt_ts(ms: i64) -> String {
    match chrono::DateTime::from_timestamp_millis(ms) {
        Some(t) if ms % 1000 == 0 => t.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
        Some(t) => t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
        None => ms.to_string(),
    }
}

/// Parse a contract timestamp: RFC 3339 or integer epoch milliseconds.
pub fn parse_ts(s: &str) -> Result<i64, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty timestamp".into());
    }
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    match chrono::DateTime::parse_from_rfc3339(s) {
        Ok(t) => Ok(t.timestamp_millis()),
        Err(e) => {
            // Tolerated beyond the contract: a date-time without offset is taken as UTC.
            for f in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
                if let Ok(t) = chrono::NaiveDateTime::parse_from_str(s, f) {
                    return Ok(t.and_utc().timestamp_millis());
                }
            }
            Err(format!(
                "{} is neither RFC 3339 nor epoch milliseconds ({e})",
                crate::ingest::validate::shown(s)
            ))
        }
    }
}

/// A time and the times half an hour before and after it: where a daily routine that does
/// not start on the same minute every day may fall (the hour or slot beside it).
pub fn within_half_hour(ms: i64) -> [i64; 3] {
    const HALF_HOUR: i64 = 1_800_000;
    [
        ms.saturating_sub(HALF_HOUR),
        ms,
        ms.saturating_add(HALF_HOUR),
    ]
}

/// Day of the week and hour, 0..168, Monday 00h = 0, in UTC.
pub fn hour_of_week(ms: i64) -> usize {
    // 1970-01-01 was a Thursday: shift so that Monday starts the week.
    let hours = ms.div_euclid(3_600_000);
    ((hours + 3 * 24).rem_euclid(168)) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip() {
        let ms = parse_ts("2026-03-01T09:15:02.123Z").unwrap();
        assert_eq!(fmt_ts(ms), "2026-03-01T09:15:02.123Z");
        assert_eq!(parse_ts("1772356502123").unwrap(), 1_772_356_502_123);
        assert!(parse_ts("yesterday").is_err());
        assert_eq!(
            parse_ts("2026-03-01 09:15:02.123").unwrap(),
            parse_ts("2026-03-01T09:15:02.123Z").unwrap()
        );
        assert_eq!(parse_ts("2026-03-01T10:15:02+01:00").unwrap() % 1000, 0);
    }

    #[test]
    fn hour_of_week_monday_midnight_is_zero() {
        // 2026-03-02 is a Monday.
        let ms = parse_ts("2026-03-02T00:30:00Z").unwrap();
        assert_eq!(hour_of_week(ms), 0);
        let ms = parse_ts("2026-03-08T23:59:00Z").unwrap();
        assert_eq!(hour_of_week(ms), 167);
    }

    #[test]
    fn schema_matches_columns() {
        let s = event_schema();
        for (i, name) in COLUMNS.iter().enumerate() {
            assert_eq!(s.field(i).name(), name);
        }
    }
}
