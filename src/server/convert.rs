//! proto <-> domain: gRPC events into the canonical Arrow batch (validated field by field
//! with the same checks as the file readers), window scores into `TokenRisk` / `Alert`.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, Float32Builder, StringBuilder, TimestampMillisecondArray, UInt16Array, UInt32Builder,
    UInt64Array,
};
use arrow::record_batch::RecordBatch;

use super::pb;
use crate::engine::{Contribution, WindowScore};
use crate::event::{col, event_schema, fmt_ts};
use crate::ingest::validate::field;

/// Where a batch of proto events stands against the clock.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// Wall clock, epoch ms.
    pub now_ms: i64,
    /// Largest accepted distance of an event ahead of `now_ms`.
    pub max_future_skew_ms: i64,
}

/// Errors of one request: all are counted, the first `limit` listed.
#[derive(Debug, Default)]
pub struct Rejections {
    /// Rejected events.
    pub count: u64,
    /// The listed ones.
    pub listed: Vec<pb::EventError>,
    /// How many to list at most.
    pub limit: usize,
}

impl Rejections {
    fn push(&mut self, index: u64, field: &str, reason: String) {
        self.count += 1;
        if self.listed.len() < self.limit {
            self.listed.push(pb::EventError {
                index,
                field: field.into(),
                reason,
            });
        }
    }
}

/// Validate proto events into the canonical batch. `first_index` is the stream position of
/// `events[0]`; each invalid event is recorded with its stream index, field and reason, and
/// the valid ones are kept in order.
pub fn to_batch(
    events: &[pb::Event],
    first_index: u64,
    clock: Clock,
    rejected: &mut Rejections,
) -> RecordBatch {
    to_batch_with(events, first_index, clock, rejected, &mut |_| true)
}

/// [`to_batch`], keeping only the valid events for which `keep` says yes (it is asked
/// after an event passed validation: the de-duplication of resent events).
pub fn to_batch_with(
    events: &[pb::Event],
    first_index: u64,
    clock: Clock,
    rejected: &mut Rejections,
    keep: &mut dyn FnMut(&pb::Event) -> bool,
) -> RecordBatch {
    let n = events.len();
    let text = |f: fn(&pb::Event) -> &str| events.iter().map(f).map(str::len).sum::<usize>();
    let mut ts = Vec::with_capacity(n);
    let mut token = StringBuilder::with_capacity(n, text(|e| &e.token_id));
    let mut method = StringBuilder::with_capacity(n, n * 4);
    let mut endpoint = StringBuilder::with_capacity(n, text(|e| &e.endpoint));
    let mut status = Vec::with_capacity(n);
    let mut bytes_out = Vec::with_capacity(n);
    let mut latency = Float32Builder::with_capacity(n);
    let mut src_ip = StringBuilder::with_capacity(n, text(|e| &e.src_ip));
    let mut country = StringBuilder::with_capacity(n, n * 2);
    let mut asn = UInt32Builder::with_capacity(n);
    let mut user_agent = StringBuilder::with_capacity(n, text(|e| &e.user_agent));
    let mut scope = StringBuilder::with_capacity(n, text(|e| &e.scope));
    let mut env = StringBuilder::with_capacity(n, text(|e| &e.env));
    let horizon = clock.now_ms.saturating_add(clock.max_future_skew_ms);
    for (i, e) in events.iter().enumerate() {
        let index = first_index + i as u64;
        let checked = check(e, horizon);
        let (t, (m, mlen), s, lat, c, a) = match checked {
            Ok(v) => v,
            Err((f, reason)) => {
                rejected.push(index, f, reason);
                continue;
            }
        };
        if !keep(e) {
            continue;
        }
        ts.push(t);
        token.append_value(&e.token_id);
        // The method bytes are ASCII letters (checked).
        method.append_value(std::str::from_utf8(&m[..mlen]).unwrap_or("GET"));
        endpoint.append_value(&e.endpoint);
        status.push(s);
        bytes_out.push(e.bytes_out);
        latency.append_option(lat);
        src_ip.append_value(e.src_ip.trim());
        match c {
            Some(c) => country.append_value(std::str::from_utf8(&c).unwrap_or("")),
            None => country.append_null(),
        }
        asn.append_option(a);
        optional(&mut user_agent, &e.user_agent);
        optional(&mut scope, &e.scope);
        optional(&mut env, &e.env);
    }
    let kept = ts.len();
    let cols: Vec<ArrayRef> = vec![
        Arc::new(TimestampMillisecondArray::from(ts).with_timezone("UTC")),
        Arc::new(token.finish()),
        Arc::new(method.finish()),
        Arc::new(endpoint.finish()),
        Arc::new(UInt16Array::from(status)),
        Arc::new(UInt64Array::from(bytes_out)),
        Arc::new(latency.finish()),
        Arc::new(src_ip.finish()),
        Arc::new(country.finish()),
        Arc::new(asn.finish()),
        Arc::new(user_agent.finish()),
        Arc::new(scope.finish()),
        Arc::new(env.finish()),
        arrow::array::new_null_array(&arrow::datatypes::DataType::UInt8, kept),
        arrow::array::new_null_array(&arrow::datatypes::DataType::Utf8, kept),
    ];
    // Every column is built above in the schema's order and types, with `kept` rows.
    RecordBatch::try_new(event_schema(), cols)
        .unwrap_or_else(|e| unreachable!("proto batch does not match the event schema: {e}"))
}

type Checked = (
    i64,
    ([u8; 16], usize),
    u16,
    Option<f32>,
    Option<[u8; 2]>,
    Option<u32>,
);

fn check(e: &pb::Event, horizon: i64) -> Result<Checked, (&'static str, String)> {
    let t = field::ts(e.ts_ms).map_err(|r| ("ts_ms", r))?;
    if t > horizon {
        return Err((
            "ts_ms",
            format!(
                "{} is {} s ahead of the server clock (more than the allowed skew)",
                fmt_ts(t),
                (t - horizon) / 1000
            ),
        ));
    }
    field::token_id(&e.token_id).map_err(|r| ("token_id", r))?;
    let m = field::method(&e.method).map_err(|r| ("method", r))?;
    field::endpoint(&e.endpoint).map_err(|r| ("endpoint", r))?;
    let s = field::status(u64::from(e.status)).map_err(|r| ("status", r))?;
    let lat = match e.latency_ms {
        Some(l) => Some(field::latency(l).map_err(|r| ("latency_ms", r))?),
        None => None,
    };
    field::src_ip(&e.src_ip).map_err(|r| ("src_ip", r))?;
    let c = field::country(&e.country).map_err(|r| ("country", r))?;
    field::bytes_out(e.bytes_out).map_err(|r| ("bytes_out", r))?;
    if !e.event_id.is_empty() {
        field::text("event_id", &e.event_id, field::MAX_EVENT_ID_BYTES)
            .map_err(|r| ("event_id", r))?;
    }
    for (name, column, v) in [
        ("user_agent", col::USER_AGENT, &e.user_agent),
        ("scope", col::SCOPE, &e.scope),
        ("env", col::ENV, &e.env),
    ] {
        field::optional_text(column, v).map_err(|r| (name, r))?;
    }
    Ok((t, m, s, lat, c, e.asn))
}

fn optional(b: &mut StringBuilder, s: &str) {
    if s.is_empty() {
        b.append_null();
    } else {
        b.append_value(s);
    }
}

impl From<&Contribution> for pb::Contribution {
    fn from(c: &Contribution) -> Self {
        pb::Contribution {
            signal: c.signal.name().into(),
            observed: c.observed,
            expected: c.expected,
            score: c.evidence,
            reason: c.reason.clone(),
        }
    }
}

impl From<&WindowScore> for pb::TokenRisk {
    fn from(s: &WindowScore) -> Self {
        pb::TokenRisk {
            token_id: s.token.to_string(),
            risk: f64::from(s.risk),
            window_start_ms: s.start,
            alert: s.alert,
            contributions: s.contributions.iter().map(Into::into).collect(),
            events: s.events,
            confidence: f64::from(s.confidence),
        }
    }
}

impl From<&pb::TokenRisk> for pb::Alert {
    fn from(r: &pb::TokenRisk) -> Self {
        pb::Alert {
            token_id: r.token_id.clone(),
            risk: r.risk,
            window_start_ms: r.window_start_ms,
            contributions: r.contributions.clone(),
            missed: 0,
            events: r.events,
            alert_id: String::new(),
            confidence: r.confidence,
        }
    }
}

impl From<&crate::scopes::TokenScopes> for pb::TokenScopeUsage {
    fn from(t: &crate::scopes::TokenScopes) -> Self {
        let calls = |m: &std::collections::BTreeMap<String, u64>| {
            m.iter()
                .map(|(s, n)| pb::ScopeCalls {
                    scope: s.clone(),
                    calls: *n,
                })
                .collect()
        };
        pb::TokenScopeUsage {
            token_id: t.token_id.clone(),
            owner: t.owner.clone(),
            env: t.env.clone().unwrap_or_default(),
            registered: t.registered,
            granted: t.granted.clone(),
            used: calls(&t.used),
            unused: t.unused.clone(),
            not_granted: calls(&t.not_granted),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::col;
    use arrow::array::AsArray;

    fn ok_event(ts: i64) -> pb::Event {
        pb::Event {
            ts_ms: ts,
            token_id: "tok-1".into(),
            method: "get".into(),
            endpoint: "/v1/a/{id}".into(),
            status: 200,
            bytes_out: 10,
            latency_ms: Some(3.5),
            src_ip: "10.0.0.1".into(),
            country: "de".into(),
            asn: Some(3320),
            user_agent: "curl/8".into(),
            scope: String::new(),
            env: "prod".into(),
            event_id: String::new(),
        }
    }

    #[test]
    fn keeps_valid_events_and_names_each_bad_one() {
        let now = 1_772_356_502_000;
        let clock = Clock {
            now_ms: now,
            max_future_skew_ms: 300_000,
        };
        let mut bad_ip = ok_event(now);
        bad_ip.src_ip = "300.1.1.1".into();
        let mut bad_status = ok_event(now);
        bad_status.status = 999;
        let mut empty_token = ok_event(now);
        empty_token.token_id.clear();
        let future = ok_event(now + 3_600_000);
        let events = vec![
            ok_event(now - 86_400_000 * 365), // a year old: accepted (backfill)
            bad_ip,
            bad_status,
            empty_token,
            future,
            ok_event(now + 60_000), // within the skew
        ];
        let mut rej = Rejections {
            limit: 10,
            ..Default::default()
        };
        let b = to_batch(&events, 100, clock, &mut rej);
        assert_eq!(b.num_rows(), 2);
        assert_eq!(rej.count, 4);
        let got: Vec<(u64, &str)> = rej
            .listed
            .iter()
            .map(|e| (e.index, e.field.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (101, "src_ip"),
                (102, "status"),
                (103, "token_id"),
                (104, "ts_ms")
            ]
        );
        assert!(
            rej.listed[3].reason.contains("ahead"),
            "{:?}",
            rej.listed[3]
        );
        assert_eq!(b.column(col::METHOD).as_string::<i32>().value(0), "GET");
        assert_eq!(b.column(col::COUNTRY).as_string::<i32>().value(1), "DE");
        assert!(b.column(col::SCOPE).is_null(0));
    }

    #[test]
    fn lists_at_most_the_limit_but_counts_all() {
        let mut e = ok_event(1_000);
        e.status = 42;
        let events = vec![e; 5];
        let mut rej = Rejections {
            limit: 2,
            ..Default::default()
        };
        let clock = Clock {
            now_ms: 2_000,
            max_future_skew_ms: 0,
        };
        let b = to_batch(&events, 0, clock, &mut rej);
        assert_eq!((b.num_rows(), rej.count, rej.listed.len()), (0, 5, 2));
    }
}
