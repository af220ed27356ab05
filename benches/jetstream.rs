//! The ceiling of cluster ingest: how fast this machine's NATS server acknowledges
//! JetStream publishes of the pieces tokenwatch sends (Arrow IPC of 1,000 events of the
//! load generator's shape), pipelined like `serve --cluster` does (publish, then await the
//! acks). Not criterion: one timed run against an external server.
//!
//! TOKENWATCH_NATS_URL=nats://127.0.0.1:4222 cargo bench --bench jetstream

use std::time::Instant;

use tokenwatch::server::convert::{to_batch, Clock};
use tokenwatch::server::pb;

fn main() {
    let Some(url) = std::env::var_os("TOKENWATCH_NATS_URL") else {
        eprintln!("set TOKENWATCH_NATS_URL (a nats-server with -js) to run this benchmark");
        return;
    };
    let url = url.to_string_lossy().to_string();
    let now = 1_772_409_600_000i64;
    let events: Vec<pb::Event> = (0..1000)
        .map(|i| pb::Event {
            ts_ms: now + i,
            token_id: format!("lg-{:06}", i % 1000),
            method: "GET".into(),
            endpoint: format!("/v1/items/{}", i % 50),
            status: 200,
            bytes_out: 1200 + i as u64,
            latency_ms: Some(12.5),
            src_ip: format!("10.0.{}.{}", i % 7, i % 200),
            country: "DE".into(),
            asn: Some(3320),
            user_agent: format!("client/{}.{}", i % 4, i % 20),
            scope: "items:read".into(),
            env: "prod".into(),
            event_id: String::new(),
        })
        .collect();
    let clock = Clock {
        now_ms: i64::MAX / 2,
        max_future_skew_ms: 0,
    };
    let batch = to_batch(&events, 0, clock, &mut Default::default());
    let bytes = tokenwatch::cluster::wire::encode_batch(&batch).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = async_nats::connect(url.as_str()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let _ = js.delete_stream("TOKENWATCH_BENCH").await;
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "TOKENWATCH_BENCH".into(),
            subjects: vec!["tokenwatch.bench.*".into()],
            ..Default::default()
        })
        .await
        .unwrap();
        for (label, msgs, window) in [("warm-up", 200usize, 64usize), ("run", 3000, 64)] {
            let t0 = Instant::now();
            let mut pending = std::collections::VecDeque::new();
            for i in 0..msgs {
                let msg = async_nats::jetstream::message::PublishMessage::build()
                    .payload(bytes.clone().into())
                    .message_id(format!("{label}-{i}"));
                pending.push_back(js.send_publish(format!("tokenwatch.bench.{}", i % 12), msg).await.unwrap());
                if pending.len() >= window {
                    pending.pop_front().unwrap().await.unwrap();
                }
            }
            for f in pending {
                f.await.unwrap();
            }
            let s = t0.elapsed().as_secs_f64();
            if label == "run" {
                println!(
                    "jetstream publish: {msgs} messages of {} B (1,000 events each) in {s:.2} s = {:.0} msg/s, {:.0} MB/s, {:.0} events/s",
                    bytes.len(),
                    msgs as f64 / s,
                    (msgs * bytes.len()) as f64 / s / 1e6,
                    (msgs * 1000) as f64 / s
                );
            }
        }
        let _ = js.delete_stream("TOKENWATCH_BENCH").await;
    });
}
