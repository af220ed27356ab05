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
/// Object store of the refit exchange (`refit/<point>/p<p>`: one partition's share).
pub const REFITS: &str = "tokenwatch_refits";
/// Subject of GetStats' scatter-gather over nodes.
pub const STATS_SUBJECT: &str = "tokenwatch.query.stats";
/// Header carrying the ingesting node's wall clock (ms) when it published a batch: the
/// trusted clock the owner applies it with (the same on every replay of the message).
pub const NOW_HEADER: &str = "Tokenwatch-Now";
/// Stream metadata key holding the partition count fixed at creation.
pub const PARTITIONS_KEY: &str = "tokenwatch.partitions";

/// Subject of partition `p`'s events.
pub fn events_subject(p: u32) -> String {
    format!("tokenwatch.events.{p}")
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

/// De-duplication id of a window's score or alert.
pub fn window_id(token: &str, start: i64) -> String {
    format!("{token}|{start}")
}

#[cfg(test)]
mod tests {
    use super::*;

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
