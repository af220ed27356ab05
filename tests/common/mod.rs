//! Helpers shared by the black-box tests: events, steady traffic, keys.
#![allow(dead_code)]

use arrow::array::{Array, AsArray};
use arrow::datatypes::{Float32Type, TimestampMillisecondType, UInt16Type, UInt32Type, UInt64Type};
use tokenwatch::event::col;
use tokenwatch::server::pb;

pub const MINUTE: i64 = 60_000;
/// 2026-03-02T00:00:00Z, a Monday.
pub const T0: i64 = 1_772_409_600_000;

pub fn event(ts: i64, token: &str, ip: &str, country: &str, asn: u32, status: u32) -> pb::Event {
    pb::Event {
        ts_ms: ts,
        token_id: token.into(),
        method: "GET".into(),
        endpoint: "/v1/orders/{id}".into(),
        status,
        bytes_out: 900 + (ts / 1000 % 200) as u64,
        latency_ms: Some(20.0),
        src_ip: ip.into(),
        country: country.into(),
        asn: Some(asn),
        user_agent: "billing-sync/2.1".into(),
        scope: String::new(),
        env: "prod".into(),
        event_id: String::new(),
    }
}

/// Steady traffic of `tokens` tokens (`svc-NN`, 4 calls a minute each, from their own
/// network) over `minutes` from `from`, one request per minute.
pub fn steady(tokens: usize, from: i64, minutes: i64) -> Vec<pb::IngestRequest> {
    (0..minutes)
        .map(|m| {
            let mut events = Vec::new();
            for t in 0..tokens {
                for k in 0..4 {
                    let ts = from + m * MINUTE + k * 15_000 + t as i64 * 100;
                    let ip = format!("10.{t}.0.{}", 1 + k);
                    events.push(event(ts, &format!("svc-{t:02}"), &ip, "DE", 3320, 200));
                }
            }
            pb::IngestRequest { events }
        })
        .collect()
}

/// A burst on one token: a new country and network, mostly failed logins, in the minute
/// starting at `at`.
pub fn burst(token: &str, at: i64) -> pb::IngestRequest {
    pb::IngestRequest {
        events: (0..200)
            .map(|k| {
                let status = if k % 4 == 0 { 200 } else { 401 };
                event(at + k * 250, token, "203.0.113.9", "KP", 64_512, status)
            })
            .collect(),
    }
}

/// Write a secret file (a keys file) readable by its owner only, as the server demands.
#[allow(dead_code)]
pub fn write_secret(path: &std::path::Path, text: &str) {
    std::fs::write(path, text).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
}
pub mod http;
pub mod webdriver;

/// The events of a canonical batch (as read from a file) as the proto sends them.
pub fn events_of(batch: &arrow::record_batch::RecordBatch) -> Vec<pb::Event> {
    let ts = batch
        .column(col::TS)
        .as_primitive::<TimestampMillisecondType>();
    let s = |c: usize| batch.column(c).as_string::<i32>().clone();
    let (token, method, endpoint, ip) = (
        s(col::TOKEN_ID),
        s(col::METHOD),
        s(col::ENDPOINT),
        s(col::SRC_IP),
    );
    let (country, agent, scope, env) = (
        s(col::COUNTRY),
        s(col::USER_AGENT),
        s(col::SCOPE),
        s(col::ENV),
    );
    let status = batch.column(col::STATUS).as_primitive::<UInt16Type>();
    let bytes = batch.column(col::BYTES_OUT).as_primitive::<UInt64Type>();
    let lat = batch.column(col::LATENCY_MS).as_primitive::<Float32Type>();
    let asn = batch.column(col::ASN).as_primitive::<UInt32Type>();
    let text = |a: &arrow::array::StringArray, i: usize| {
        if a.is_valid(i) {
            a.value(i).to_string()
        } else {
            String::new()
        }
    };
    (0..batch.num_rows())
        .map(|i| pb::Event {
            ts_ms: ts.value(i),
            token_id: token.value(i).into(),
            method: method.value(i).into(),
            endpoint: endpoint.value(i).into(),
            status: status.value(i) as u32,
            bytes_out: bytes.value(i),
            latency_ms: lat.is_valid(i).then(|| lat.value(i) as f64),
            src_ip: ip.value(i).into(),
            country: text(&country, i),
            asn: asn.is_valid(i).then(|| asn.value(i)),
            user_agent: text(&agent, i),
            scope: text(&scope, i),
            env: text(&env, i),
            event_id: String::new(),
        })
        .collect()
}
