//! What travels through JetStream: event batches as Arrow IPC, their de-duplication ids,
//! and the names of every stream, bucket and subject.

use arrow::record_batch::RecordBatch;

/// The events stream: every accepted event, on `tokenwatch.events.<partition>`.
pub const EVENTS: &str = "TOKENWATCH_EVENTS";
/// Every closed window's score, on `tokenwatch.scores.<partition>` (de-duplicated by
/// token and window start, so a new owner that replays windows publishes none twice).
pub const SCORES: &str = "TOKENWATCH_SCORES";
/// Alerting windows, on `tokenwatch.alerts` (de-duplicated the same way).
pub const ALERTS: &str = "TOKENWATCH_ALERTS";
/// Subject of the alerts.
pub const ALERTS_SUBJECT: &str = "tokenwatch.alerts";
/// Key-value bucket of the leases (`node.<id>` heartbeats and `part.<p>` owners); its
/// entries expire after the lease TTL unless renewed.
pub const LEASES: &str = "tokenwatch_leases";
/// Key-value bucket of the cluster's shared facts that never expire: `origin` (the refit
/// grid) and `clock` (cluster event time).
pub const FACTS: &str = "tokenwatch_cluster";
/// Object store of the partitions' snapshots (object `p<p>`) and fitted models
/// (`global/<refit point>`).
pub const SNAPSHOTS: &str = "tokenwatch_snapshots";
/// Object store of the event history, the format of record: each partition's owner writes
/// the events it applied as Parquet, `p<p>/date=YYYY-MM-DD/part-<first>-<last>.parquet`
/// (stream sequences, zero-padded), before every snapshot, so each event is in it once.
pub const HISTORY: &str = "tokenwatch_history";
/// Object store of the refit exchange (`refit/<point>/p<p>`: one partition's share).
pub const REFITS: &str = "tokenwatch_refits";
/// Subject of GetStats' scatter-gather over nodes.
pub const STATS_SUBJECT: &str = "tokenwatch.query.stats";
/// Header carrying the ingesting node's wall clock (ms) when it published a batch: the
/// trusted clock the owner applies it with (the same on every replay of the message).
pub const NOW_HEADER: &str = "Tokenwatch-Now";
/// Header on a window's score: the events-stream sequence whose application closed it. A
/// new owner of the partition takes the last published one as the point up to which the
/// old owner already delivered its alerts' actions.
pub const SEQ_HEADER: &str = "Tokenwatch-Seq";
/// Header on an alert: every alert id the window raised or grew, comma-separated (the
/// message's `alert_id` is the first policy's, as in embedded mode's WatchAlerts).
pub const ALERT_IDS_HEADER: &str = "Tokenwatch-Alert-Ids";
/// Header marking a message of the events stream that is not an event batch:
/// [`FEEDBACK_KIND`] (an operator's verdict, applied by the owner in stream order).
pub const KIND_HEADER: &str = "Tokenwatch-Kind";
/// [`KIND_HEADER`] of a verdict.
pub const FEEDBACK_KIND: &str = "feedback";
/// Header of a verdict: the inbox its submitting node waits on for the effect.
pub const REPLY_HEADER: &str = "Tokenwatch-Reply";
/// Stream metadata key holding the partition count fixed at creation.
pub const PARTITIONS_KEY: &str = "tokenwatch.partitions";

/// Subject of partition `p`'s events.
pub fn events_subject(p: u32) -> String {
    format!("tokenwatch.events.{p}")
}

/// Subject of queries answered by partition `p`'s owner (GetTokenRisk: the token id as
/// the request, its latest `TokenRisk` as the reply, empty when it has none).
pub fn query_subject(p: u32) -> String {
    format!("tokenwatch.query.{p}")
}

/// Subject of the console's token views of partition `p` (answered by its owner): a
/// [`DescribeAsk`] in, a [`pack_view`] out (empty: the token is not tracked).
pub fn describe_subject(p: u32) -> String {
    format!("tokenwatch.describe.{p}")
}

/// What a node asks a partition's owner for a token's view.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct DescribeAsk {
    /// The token.
    pub token: String,
    /// User-agent keys whose names the console wants.
    pub keys: Vec<u64>,
}

/// The names beside a packed view's state.
#[derive(serde::Serialize, serde::Deserialize)]
struct ViewNames {
    endpoints: Vec<(u32, String)>,
    agents: Vec<(u64, String)>,
}

/// A token's view as bytes: the state's length (u32, little-endian), the state
/// (`TokenState::encode`), then the names as JSON.
pub fn pack_view(v: &crate::server::host::TokenView) -> Vec<u8> {
    let mut w = crate::model::codec::Writer::default();
    v.state.encode(&mut w);
    let mut out = Vec::with_capacity(w.buf.len() + 256);
    out.extend_from_slice(&(w.buf.len() as u32).to_le_bytes());
    out.extend_from_slice(&w.buf);
    let names = ViewNames {
        endpoints: v.endpoints.clone(),
        agents: v.agents.clone(),
    };
    out.extend(serde_json::to_vec(&names).unwrap_or_default());
    out
}

/// The view [`pack_view`] wrote.
pub fn unpack_view(b: &[u8]) -> Result<crate::server::host::TokenView, String> {
    let n = b
        .get(..4)
        .map(|h| u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize)
        .ok_or("a token view cut short")?;
    let state = b.get(4..4 + n).ok_or("a token view cut short")?;
    let state = crate::model::TokenState::decode(state).map_err(|e| e.to_string())?;
    let names: ViewNames = serde_json::from_slice(&b[4 + n..]).map_err(|e| e.to_string())?;
    Ok(crate::server::host::TokenView {
        state,
        endpoints: names.endpoints,
        agents: names.agents,
    })
}

/// Subject of partition `p`'s window scores.
pub fn scores_subject(p: u32) -> String {
    format!("tokenwatch.scores.{p}")
}

/// Arrow IPC stream bytes of `batch`.
pub fn encode_batch(batch: &RecordBatch) -> Result<Vec<u8>, String> {
    let mut w = arrow::ipc::writer::StreamWriter::try_new(Vec::new(), &batch.schema())
        .map_err(|e| e.to_string())?;
    w.write(batch).map_err(|e| e.to_string())?;
    w.finish().map_err(|e| e.to_string())?;
    w.into_inner().map_err(|e| e.to_string())
}

/// The batches of Arrow IPC stream bytes, concatenated.
pub fn decode_batch(bytes: &[u8]) -> Result<RecordBatch, String> {
    let r = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)
        .map_err(|e| e.to_string())?;
    let schema = r.schema();
    let batches: Vec<RecordBatch> = r.collect::<Result<_, _>>().map_err(|e| e.to_string())?;
    arrow::compute::concat_batches(&schema, &batches).map_err(|e| e.to_string())
}

/// De-duplication id of one published piece of a request: a digest of its partition and
/// bytes. A client that resends the same request (through any node) produces the same
/// ids, and JetStream drops the copies within its duplicate window.
pub fn message_id(partition: u32, bytes: &[u8]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(&partition.to_le_bytes());
    ctx.update(bytes);
    let d = ctx.finish();
    d.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An operator's verdict as it travels through the events stream to the alert's owner.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Feedback {
    /// Alert id.
    pub alert_id: String,
    /// `true_positive`, `false_positive` or `expected_change`.
    pub verdict: String,
    /// Free text.
    pub note: String,
    /// When it was submitted (ms, the submitting node's clock).
    pub at: i64,
}

/// What applying a verdict did, sent back to the node that submitted it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FeedbackReply {
    /// The effect, or why it could not be applied.
    pub result: Result<(String, u32, Vec<String>, Option<i64>), String>,
}

/// Magic of a partition snapshot object: `TWP1`, then the engine's Parquet snapshot, the
/// responder's state (JSON, may be empty) and the token spill (a redb file, may be empty),
/// the first two each after its length (u64 LE), the spill to the end.
const PACK_MAGIC: &[u8; 4] = b"TWP1";
/// The same with a CRC32 of everything after it (written since 2026-12-04; the older form
/// is still read): a damaged object is told from a good one before it is decoded.
const PACK_MAGIC_SUMMED: &[u8; 4] = b"TWP2";

/// The parts of a partition snapshot object.
#[derive(Debug, PartialEq)]
pub struct Packed<'a> {
    /// The engine's Parquet snapshot.
    pub parquet: &'a [u8],
    /// The responder's state.
    pub responder: Option<serde_json::Value>,
    /// The spill file of the partition's evicted tokens (empty: none evicted).
    pub spill: &'a [u8],
}

/// A partition snapshot object of its parts.
pub fn pack_snapshot(
    parquet: &[u8],
    responder: Option<&serde_json::Value>,
    spill: &[u8],
) -> Vec<u8> {
    let json = responder.map(|v| v.to_string()).unwrap_or_default();
    let mut out = Vec::with_capacity(24 + parquet.len() + json.len() + spill.len());
    out.extend_from_slice(PACK_MAGIC_SUMMED);
    out.extend_from_slice(&[0; 4]);
    for part in [parquet, json.as_bytes()] {
        out.extend_from_slice(&(part.len() as u64).to_le_bytes());
        out.extend_from_slice(part);
    }
    out.extend_from_slice(spill);
    let sum = crc32fast::hash(&out[8..]);
    out[4..8].copy_from_slice(&sum.to_le_bytes());
    out
}

/// The parts of [`pack_snapshot`]'s bytes (a bare Parquet snapshot is only an engine).
pub fn unpack_snapshot(bytes: &[u8]) -> Result<Packed<'_>, String> {
    let summed = match bytes.strip_prefix(PACK_MAGIC_SUMMED) {
        Some(r) => {
            let (sum, r) = r
                .split_first_chunk::<4>()
                .ok_or("partition snapshot: truncated header")?;
            if crc32fast::hash(r) != u32::from_le_bytes(*sum) {
                return Err("partition snapshot: checksum mismatch (the object is damaged)".into());
            }
            Some(r)
        }
        None => None,
    };
    let Some(mut rest) = summed.or_else(|| bytes.strip_prefix(PACK_MAGIC)) else {
        return Ok(Packed {
            parquet: bytes,
            responder: None,
            spill: &[],
        });
    };
    let mut parts = [&[][..]; 2];
    for (i, what) in ["the Parquet part", "the responder part"]
        .iter()
        .enumerate()
    {
        let (len, r) = rest
            .split_first_chunk::<8>()
            .ok_or("partition snapshot: truncated header")?;
        let len = usize::try_from(u64::from_le_bytes(*len))
            .ok()
            .filter(|&l| l <= r.len())
            .ok_or_else(|| format!("partition snapshot: {what} is longer than the object"))?;
        let (part, r) = r.split_at(len);
        parts[i] = part;
        rest = r;
    }
    let responder = if parts[1].is_empty() {
        None
    } else {
        Some(
            serde_json::from_slice(parts[1])
                .map_err(|e| format!("partition snapshot: responder state: {e}"))?,
        )
    };
    Ok(Packed {
        parquet: parts[0],
        responder,
        spill: rest,
    })
}

/// De-duplication id of a window's score or alert.
pub fn window_id(token: &str, start: i64) -> String {
    format!("{token}|{start}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_pack_gives_back_its_parts_and_refuses_a_short_one() {
        let v = serde_json::json!({"a": 1});
        let b = pack_snapshot(b"PAR1xyz", Some(&v), b"redb");
        let want = Packed {
            parquet: b"PAR1xyz",
            responder: Some(v),
            spill: b"redb",
        };
        assert_eq!(unpack_snapshot(&b).unwrap(), want);
        let b = pack_snapshot(b"PAR1", None, b"");
        let bare = Packed {
            parquet: b"PAR1",
            responder: None,
            spill: b"",
        };
        assert_eq!(unpack_snapshot(&b).unwrap(), bare);
        assert_eq!(unpack_snapshot(b"PAR1").unwrap(), bare);
        let mut b = pack_snapshot(b"PAR1xyz", None, b"");
        b.truncate(18);
        assert!(unpack_snapshot(&b).unwrap_err().contains("checksum"));
        // Any damaged byte is caught by the checksum.
        let good = pack_snapshot(b"PAR1xyz", Some(&serde_json::json!({"a": 1})), b"redb");
        for i in 4..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x10;
            assert!(unpack_snapshot(&bad).is_err(), "byte {i}");
        }
        // The older form without a checksum is still read.
        let mut old = b"TWP1".to_vec();
        old.extend_from_slice(&7u64.to_le_bytes());
        old.extend_from_slice(b"PAR1xyz");
        old.extend_from_slice(&0u64.to_le_bytes());
        assert_eq!(unpack_snapshot(&old).unwrap().parquet, b"PAR1xyz");
        old.truncate(14);
        assert!(unpack_snapshot(&old)
            .unwrap_err()
            .contains("longer than the object"));
        assert!(unpack_snapshot(b"TWP1\x01")
            .unwrap_err()
            .contains("truncated"));
    }

    #[test]
    fn a_batch_survives_ipc_and_its_id_is_its_content() {
        let ev = crate::server::pb::Event {
            ts_ms: 1_772_409_600_000,
            token_id: "tok".into(),
            method: "GET".into(),
            endpoint: "/a".into(),
            status: 200,
            src_ip: "10.0.0.1".into(),
            ..Default::default()
        };
        let clock = crate::server::convert::Clock {
            now_ms: i64::MAX / 2,
            max_future_skew_ms: 0,
        };
        let b =
            crate::server::convert::to_batch(&[ev.clone(), ev], 0, clock, &mut Default::default());
        let bytes = encode_batch(&b).unwrap();
        assert_eq!(decode_batch(&bytes).unwrap(), b);
        assert_eq!(
            message_id(3, &bytes),
            message_id(3, &encode_batch(&b).unwrap())
        );
        assert_ne!(message_id(3, &bytes), message_id(4, &bytes));
        assert!(decode_batch(&bytes[..bytes.len() / 2]).is_err());
    }
}
