//! Black-box tests of the gRPC service: a server on 127.0.0.1:0 (in process, or the binary
//! for shutdown), driven by the generated client only.

mod common;

use common::{event, steady, MINUTE, T0};
use std::net::SocketAddr;
use std::time::Duration;

use tokenwatch::loadgen::Bearer;
use tokenwatch::server::{self, auth::Keys, pb};
use tonic::transport::Channel;
use tonic::Code;

const INGEST: &str = "ingest-key-000000000001";
const READ: &str = "read-key-0000000000000002";
const ADMIN: &str = "admin-key-00000000000003";

fn keys() -> Keys {
    Keys::parse(
        &format!("# test keys\ningest {INGEST}\nread {READ}\nadmin {ADMIN}\n"),
        std::path::Path::new("test-keys"),
    )
    .unwrap()
}

type Client = pb::token_watch_client::TokenWatchClient<
    tonic::service::interceptor::InterceptedService<Channel, Bearer>,
>;

struct TestServer {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<server::Summary, server::Error>>,
}

impl TestServer {
    async fn start() -> TestServer {
        TestServer::start_with(|_| {}, keys()).await
    }

    /// A server with the default configuration changed by `f`, accepting `keys`.
    async fn start_with(f: impl FnOnce(&mut tokenwatch::Config), keys: Keys) -> TestServer {
        TestServer::start_opts(|o| {
            f(&mut o.config);
            o.keys = Some(keys);
        })
        .await
    }

    /// A server with its options changed by `f`.
    async fn start_opts(f: impl FnOnce(&mut server::Options)) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut config = tokenwatch::Config::default();
        config.engine.shards = 2;
        let mut opts = server::Options {
            config,
            registry: Default::default(),
            keys: Some(keys()),
            tls: None,
            shutdown_grace: Duration::from_secs(10),
            data_dir: None,
            policies: Vec::new(),
            dry_run: false,
            faults: None,
            ready: None,
            http: None,
            cluster: None,
        };
        f(&mut opts);
        // Wait for readiness unless the test watches it itself.
        let ready = if opts.ready.is_none() {
            let (tx, rx) = tokio::sync::oneshot::channel();
            opts.ready = Some(tx);
            Some(rx)
        } else {
            None
        };
        let task = tokio::spawn(server::run(listener, opts, async {
            let _ = rx.await;
        }));
        if let Some(r) = ready {
            r.await.expect("the server did not become ready");
        }
        TestServer {
            addr,
            stop: Some(tx),
            task,
        }
    }

    async fn client(&self, key: Option<&str>) -> Client {
        let ch = Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        pb::token_watch_client::TokenWatchClient::with_interceptor(ch, Bearer::new(key).unwrap())
    }

    async fn stop(mut self) -> server::Summary {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incident_shows_in_risk_list_and_alert_feed() {
    let srv = TestServer::start().await;
    let mut reader = srv.client(Some(READ)).await;
    let mut ingest = srv.client(Some(INGEST)).await;
    let mut alerts = reader
        .watch_alerts(pb::WatchAlertsRequest { min_risk: 50.0 })
        .await
        .unwrap()
        .into_inner();

    // Three days of routine, then svc-03 is used from a new country and network in a burst
    // of failed logins, while the others go on as usual (their traffic closes the window).
    let days = 3 * 24 * 60;
    let mut reqs = steady(8, T0, days);
    let at = T0 + days * MINUTE;
    let mut burst = Vec::new();
    for k in 0..200 {
        let status = if k % 4 == 0 { 200 } else { 401 };
        burst.push(event(
            at + k * 250,
            "svc-03",
            "203.0.113.9",
            "KP",
            64_512,
            status,
        ));
    }
    reqs.push(pb::IngestRequest { events: burst });
    let mut after = steady(8, at + MINUTE, 10);
    for r in after.iter_mut() {
        r.events.retain(|e| e.token_id != "svc-03");
    }
    reqs.extend(after);
    let sent: u64 = reqs.iter().map(|r| r.events.len() as u64).sum();
    let resp = ingest
        .ingest(tokio_stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((resp.accepted, resp.rejected), (sent, 0));

    let risk = reader
        .get_token_risk(pb::GetTokenRiskRequest {
            token_id: "svc-03".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(risk.window_start_ms, at, "{risk:?}");
    assert!(risk.alert && risk.risk >= 50.0, "{risk:?}");
    let signals: Vec<&str> = risk
        .contributions
        .iter()
        .map(|c| c.signal.as_str())
        .collect();
    assert!(
        signals.contains(&"new_country") && signals.contains(&"auth_errors"),
        "{signals:?}"
    );
    assert!(risk.contributions.iter().all(|c| !c.reason.is_empty()));

    let calm = reader
        .get_token_risk(pb::GetTokenRiskRequest {
            token_id: "svc-05".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(calm.risk < 50.0 && !calm.alert, "{calm:?}");

    let list = reader
        .list_risky_tokens(pb::ListRiskyTokensRequest {
            limit: 3,
            min_risk: 0.0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.tokens.len(), 3);
    assert_eq!(list.tokens[0].token_id, "svc-03");
    assert!(list.tokens.windows(2).all(|w| w[0].risk >= w[1].risk));

    let alert = tokio::time::timeout(Duration::from_secs(10), alerts.message())
        .await
        .expect("an alert within 10 s")
        .unwrap()
        .expect("the alert stream is open");
    assert_eq!(alert.token_id, "svc-03");
    assert_eq!(alert.window_start_ms, at);
    assert!(!alert.contributions.is_empty());

    let missing = reader
        .get_token_risk(pb::GetTokenRiskRequest {
            token_id: "never-seen".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let summary = srv.stop().await;
    assert_eq!(summary.stats.events, sent);
    // The alert stream ends cleanly at shutdown.
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(_)) = alerts.message().await {}
    })
    .await;
    assert!(end.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_events_are_rejected_one_by_one_with_index_field_and_reason() {
    let srv = TestServer::start().await;
    let mut c = srv.client(Some(INGEST)).await;
    let now = chrono::Utc::now().timestamp_millis();
    let good = |k: i64| event(now - 3_600_000 + k, "tok-a", "10.0.0.1", "FR", 1, 200);
    let mut bad_ip = good(1);
    bad_ip.src_ip = "10.0.0.999".into();
    let mut bad_status = good(2);
    bad_status.status = 999;
    let mut empty_token = good(3);
    empty_token.token_id.clear();
    let mut future = good(4);
    future.ts_ms = now + 86_400_000;
    let old = event(T0 - 365 * 86_400_000, "tok-old", "10.0.0.2", "FR", 1, 200);
    // Request 1: 3 events (indices 0..3); request 2: 5 (indices 3..8).
    let reqs = vec![
        pb::IngestRequest {
            events: vec![good(0), bad_ip, good(5)],
        },
        pb::IngestRequest {
            events: vec![bad_status, empty_token, old, future, good(6)],
        },
    ];
    let r = c
        .ingest(tokio_stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.accepted, r.rejected), (4, 4), "{r:?}");
    let got: Vec<(u64, &str)> = r
        .errors
        .iter()
        .map(|e| (e.index, e.field.as_str()))
        .collect();
    assert_eq!(
        got,
        [(1, "src_ip"), (3, "status"), (4, "token_id"), (6, "ts_ms")]
    );
    assert!(
        r.errors[0].reason.contains("10.0.0.999"),
        "{:?}",
        r.errors[0]
    );
    assert!(r.errors[1].reason.contains("999"), "{:?}", r.errors[1]);
    assert!(r.errors[3].reason.contains("ahead"), "{:?}", r.errors[3]);
    let summary = srv.stop().await;
    assert_eq!(summary.stats.events + summary.stats.late, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_fields_are_rejected_with_the_field_named_and_never_reach_state() {
    let srv = TestServer::start().await;
    let mut c = srv.client(Some(INGEST)).await;
    let now = chrono::Utc::now().timestamp_millis();
    let good = |k: i64| event(now - 3_600_000 + k, "tok-h", "10.0.0.1", "FR", 1, 200);
    let with = |k: i64, f: &dyn Fn(&mut pb::Event)| {
        let mut e = good(k);
        f(&mut e);
        e
    };
    let events = vec![
        good(0),
        with(1, &|e| {
            e.endpoint = format!("/v1/{}", "a".repeat(1_000_000))
        }),
        with(2, &|e| e.scope = "s".repeat(1_000_000)),
        with(3, &|e| e.env = "prod\u{1b}[31m".into()),
        with(4, &|e| e.method = "FOOBARBAZ".into()),
        with(5, &|e| e.latency_ms = Some(1e300)),
        with(6, &|e| e.latency_ms = Some(f64::NAN)),
        with(7, &|e| e.user_agent = "curl\n/8.0".into()),
        with(8, &|e| e.token_id = "tok\u{0}x".into()),
        with(9, &|e| e.method = "patch".into()),
    ];
    let r = c
        .ingest(tokio_stream::iter(vec![pb::IngestRequest { events }]))
        .await
        .unwrap()
        .into_inner();
    let got: Vec<(u64, &str)> = r
        .errors
        .iter()
        .map(|e| (e.index, e.field.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (1, "endpoint"),
            (2, "scope"),
            (3, "env"),
            (4, "method"),
            (5, "latency_ms"),
            (6, "latency_ms"),
            (7, "user_agent"),
            (8, "token_id")
        ],
        "{r:?}"
    );
    assert_eq!(r.accepted, 2, "{r:?}");
    assert!(
        r.errors[0].reason.contains("more than 512"),
        "{:?}",
        r.errors[0]
    );
    assert!(
        r.errors[2].reason.contains("control character"),
        "{:?}",
        r.errors[2]
    );
    // A reason never echoes a huge value back.
    assert!(r.errors.iter().all(|e| e.reason.len() < 300), "{r:?}");
    let summary = srv.stop().await;
    assert_eq!(summary.stats.events + summary.stats.late, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_skewed_event_does_not_make_other_clients_late() {
    // The widest skew a deployment might allow, wider than the default.
    let srv = TestServer::start_with(|c| c.server.max_future_skew.ms = 300_000, keys()).await;
    let mut a = srv.client(Some(INGEST)).await;
    let mut b = srv.client(Some(INGEST)).await;
    let now = chrono::Utc::now().timestamp_millis();
    // Client A's clock runs 290 s ahead (inside the allowed skew, so it is accepted).
    let skewed = event(now + 290_000, "tok-skew", "10.0.0.9", "FR", 1, 200);
    let r = a
        .ingest(tokio_stream::iter(vec![pb::IngestRequest {
            events: vec![skewed],
        }]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.accepted, 1, "{r:?}");
    // Client B's events are 30-90 s old, well inside the lateness: none may be late.
    let events: Vec<pb::Event> = (0..60)
        .map(|k| event(now - 90_000 + k * 1000, "tok-b", "10.0.0.1", "FR", 1, 200))
        .collect();
    let r = b
        .ingest(tokio_stream::iter(vec![pb::IngestRequest { events }]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.accepted, r.late), (60, 0), "{r:?}");
    let summary = srv.stop().await;
    assert_eq!(summary.stats.late, 0);
    assert_eq!(summary.stats.events, 61);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_streams_of_one_key_do_not_lock_out_other_clients() {
    const A: &str = "ingest-key-aaaaaaaaaaaa01";
    const B: &str = "ingest-key-bbbbbbbbbbbb02";
    let keys = Keys::parse(
        &format!("ingest {A} name=gw-a streams=4\ningest {B} name=gw-b\nread {READ}\n"),
        std::path::Path::new("test-keys"),
    )
    .unwrap();
    let srv = TestServer::start_with(|c| c.server.stream_idle_timeout.ms = 1500, keys).await;
    // Key A opens six streams that never send anything.
    let mut idle = Vec::new();
    for _ in 0..6 {
        let mut c = srv.client(Some(A)).await;
        idle.push(tokio::spawn(async move {
            c.ingest(tokio_stream::pending::<pb::IngestRequest>())
                .await
                .map(|r| r.into_inner())
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Another key is served at once.
    let now = chrono::Utc::now().timestamp_millis();
    let mut b = srv.client(Some(B)).await;
    let events: Vec<pb::Event> = (0..10)
        .map(|k| event(now - 60_000 + k, "tok-b", "10.0.0.1", "FR", 1, 200))
        .collect();
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        b.ingest(tokio_stream::iter(vec![pb::IngestRequest { events }])),
    )
    .await
    .expect("a second key must not wait for the first key's idle streams")
    .unwrap()
    .into_inner();
    assert_eq!(r.accepted, 10);
    // Key A got four streams (its limit) and two refusals; the four end when idle.
    let mut codes = Vec::new();
    for h in idle {
        let r = tokio::time::timeout(Duration::from_secs(10), h)
            .await
            .expect("an idle stream must be ended")
            .unwrap();
        codes.push(r.unwrap_err().code());
    }
    codes.sort_by_key(|c| *c as i32);
    assert_eq!(
        codes,
        [
            Code::DeadlineExceeded,
            Code::DeadlineExceeded,
            Code::DeadlineExceeded,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
            Code::ResourceExhausted
        ]
    );
    // Its slots are free again.
    let mut a = srv.client(Some(A)).await;
    let events = vec![event(now - 30_000, "tok-a", "10.0.0.2", "FR", 1, 200)];
    let r = a
        .ingest(tokio_stream::iter(vec![pb::IngestRequest { events }]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.accepted, 1);
    srv.stop().await;
}

async fn ingest_one(
    c: &mut Client,
    events: Vec<pb::Event>,
) -> Result<pb::IngestResponse, tonic::Status> {
    c.ingest(tokio_stream::iter(vec![pb::IngestRequest { events }]))
        .await
        .map(|r| r.into_inner())
}

fn events_of(token: &str, from: i64, n: i64) -> Vec<pb::Event> {
    (0..n)
        .map(|k| event(from + k * 100, token, "10.0.0.1", "FR", 1, 200))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_log_write_fails_exactly_its_stream_and_the_log_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let faults = std::sync::Arc::new(tokenwatch::store::wal::Faults::default());
    let start = |faults: Option<std::sync::Arc<tokenwatch::store::wal::Faults>>| {
        let d = dir.path().to_path_buf();
        TestServer::start_opts(move |o| {
            o.data_dir = Some(d);
            o.faults = faults;
        })
    };
    let srv = start(Some(faults.clone())).await;
    let mut c = srv.client(Some(INGEST)).await;
    let now = chrono::Utc::now().timestamp_millis();
    assert_eq!(
        ingest_one(&mut c, events_of("tok-1", now - 600_000, 30))
            .await
            .unwrap()
            .accepted,
        30
    );
    // The disk fails once: the stream whose events that write held is told, with UNAVAILABLE.
    faults
        .fail_commits
        .store(1, std::sync::atomic::Ordering::SeqCst);
    let e = ingest_one(&mut c, events_of("tok-2", now - 500_000, 20))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("durable"), "{e:?}");
    // The next stream is fine: the log went on in a new segment, not after the failure.
    let mut c2 = srv.client(Some(INGEST)).await;
    assert_eq!(
        ingest_one(&mut c2, events_of("tok-3", now - 400_000, 10))
            .await
            .unwrap()
            .accepted,
        10
    );
    let summary = srv.stop().await;
    assert_eq!(summary.stats.events + summary.stats.late, 40);
    // After a restart exactly the acknowledged events are there.
    let srv = start(None).await;
    let mut r = srv.client(Some(READ)).await;
    let st = r
        .get_stats(pb::GetStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.events + st.late_events, 40, "{st:?}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_log_segment_is_quarantined_and_every_intact_record_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let start = || {
        let d = dir.path().to_path_buf();
        TestServer::start_opts(move |o| {
            o.data_dir = Some(d);
            // No snapshot during the test: recovery replays the log.
            o.config.store.snapshot_every.ms = 86_400_000;
        })
    };
    let srv = start().await;
    let mut c = srv.client(Some(INGEST)).await;
    let now = chrono::Utc::now().timestamp_millis();
    for k in 0..6 {
        let got = ingest_one(
            &mut c,
            events_of(&format!("tok-{k}"), now - 900_000 + k * 10_000, 50),
        )
        .await;
        assert_eq!(got.unwrap().accepted, 50);
    }
    // A crash: the server is dropped without its shutdown (no final snapshot, log unsealed).
    srv.task.abort();
    let _ = srv.task.await;
    let wal = dir.path().join("wal");
    let seg = std::fs::read_dir(&wal)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "arrows"))
        .max()
        .unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    let whole = bytes.len();
    // Damage the middle of the third of six records (of about equal size).
    let at = whole * 5 / 12;
    for b in &mut bytes[at..at + 16] {
        *b ^= 0xff;
    }
    std::fs::write(&seg, &bytes).unwrap();
    let srv = start().await;
    let mut r = srv.client(Some(READ)).await;
    let st = r
        .get_stats(pb::GetStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    // One record of 50 events is lost; the five before and after it are recovered.
    assert_eq!(st.events + st.late_events, 250, "{st:?}");
    srv.stop().await;
    let q = wal.join("quarantine");
    let kept: Vec<String> = std::fs::read_dir(&q)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(kept.iter().any(|n| n.ends_with(".arrows")), "{kept:?}");
    let report = kept.iter().find(|n| n.ends_with(".report.txt")).unwrap();
    let text = std::fs::read_to_string(q.join(report)).unwrap();
    assert!(
        text.contains("intact records: 5 (250 events)") && text.contains("damaged"),
        "{text}"
    );
    // The quarantined copy is the damaged file as it was.
    assert_eq!(
        std::fs::read(q.join(seg.file_name().unwrap()))
            .unwrap()
            .len(),
        whole
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_not_serving_until_a_slow_recovery_has_finished() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let dir = tempfile::tempdir().unwrap();
    // A long log to replay: 300 records of 1,000 events.
    let mut wal =
        tokenwatch::store::wal::Wal::open(&dir.path().join("wal"), u64::MAX, false).unwrap();
    let clock = tokenwatch::server::convert::Clock {
        now_ms: i64::MAX / 2,
        max_future_skew_ms: 0,
    };
    for b in 0..300i64 {
        let events: Vec<pb::Event> = (0..1000)
            .map(|k| {
                event(
                    T0 + b * 60_000 + k,
                    &format!("tok-{}", k % 200),
                    "10.0.0.1",
                    "FR",
                    1,
                    200,
                )
            })
            .collect();
        let batch =
            tokenwatch::server::convert::to_batch(&events, 0, clock, &mut Default::default());
        wal.append(&batch).unwrap();
    }
    wal.commit().unwrap();
    drop(wal);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let d = dir.path().to_path_buf();
    let srv = TestServer::start_opts(move |o| {
        o.data_dir = Some(d);
        o.ready = Some(ready_tx);
    })
    .await;
    let ch = loop {
        match Channel::from_shared(format!("http://{}", srv.addr))
            .unwrap()
            .connect()
            .await
        {
            Ok(ch) => break ch,
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    };
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
    let status = |h: &mut tonic_health::pb::health_client::HealthClient<Channel>| {
        let mut h = h.clone();
        async move {
            h.check(tonic_health::pb::HealthCheckRequest {
                service: "tokenwatch.v1.TokenWatch".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status
        }
    };
    assert_eq!(status(&mut health).await, ServingStatus::NotServing as i32);
    // RPCs say why they cannot answer yet.
    let e = srv
        .client(Some(READ))
        .await
        .get_stats(pb::GetStatsRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert!(e.message().contains("recovering"), "{e:?}");
    ready_rx.await.unwrap();
    assert_eq!(status(&mut health).await, ServingStatus::Serving as i32);
    let st = srv
        .client(Some(READ))
        .await
        .get_stats(pb::GetStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.events + st.late_events, 300_000);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resend_with_event_ids_is_counted_once() {
    let srv = TestServer::start().await;
    let mut c = srv.client(Some(INGEST)).await;
    let now = chrono::Utc::now().timestamp_millis();
    let with_ids: Vec<pb::Event> = events_of("tok-id", now - 120_000, 40)
        .into_iter()
        .enumerate()
        .map(|(k, mut e)| {
            e.event_id = format!("req-{k}");
            e
        })
        .collect();
    let r = ingest_one(&mut c, with_ids.clone()).await.unwrap();
    assert_eq!((r.accepted, r.duplicates), (40, 0), "{r:?}");
    // The acknowledgement was lost: the client sends the same events again, plus new ones.
    let mut again = with_ids;
    again.extend(
        events_of("tok-id", now - 60_000, 5)
            .into_iter()
            .map(|mut e| {
                e.event_id = format!("new-{}", e.ts_ms);
                e
            }),
    );
    let r = ingest_one(&mut c, again).await.unwrap();
    assert_eq!((r.accepted, r.duplicates), (5, 40), "{r:?}");
    // Without ids nothing is de-duplicated (behaviour as before).
    let plain = events_of("tok-plain", now - 60_000, 10);
    assert_eq!(
        ingest_one(&mut c, plain.clone()).await.unwrap().accepted,
        10
    );
    assert_eq!(ingest_one(&mut c, plain).await.unwrap().accepted, 10);
    // An id that breaks the limits is rejected with the field named.
    let mut bad = events_of("tok-id", now - 30_000, 1);
    bad[0].event_id = "x".repeat(200);
    let r = ingest_one(&mut c, bad).await.unwrap();
    assert_eq!(r.errors[0].field, "event_id", "{r:?}");
    let summary = srv.stop().await;
    assert_eq!(summary.stats.events + summary.stats.late, 65);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_and_roles_give_the_right_codes() {
    let srv = TestServer::start().await;
    let req = || pb::GetTokenRiskRequest {
        token_id: "x".into(),
    };
    let code = |r: Result<tonic::Response<pb::TokenRisk>, tonic::Status>| r.unwrap_err().code();
    assert_eq!(
        code(srv.client(None).await.get_token_risk(req()).await),
        Code::Unauthenticated
    );
    assert_eq!(
        code(
            srv.client(Some("not-a-key-000000000000"))
                .await
                .get_token_risk(req())
                .await
        ),
        Code::Unauthenticated
    );
    assert_eq!(
        code(srv.client(Some(INGEST)).await.get_token_risk(req()).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(srv.client(Some(READ)).await.get_token_risk(req()).await),
        Code::NotFound
    );
    assert_eq!(
        code(srv.client(Some(ADMIN)).await.get_token_risk(req()).await),
        Code::NotFound
    );
    let ingest = srv
        .client(Some(READ))
        .await
        .ingest(tokio_stream::iter(Vec::<pb::IngestRequest>::new()))
        .await
        .unwrap_err();
    assert_eq!(ingest.code(), Code::PermissionDenied);
    let retrain = srv
        .client(Some(READ))
        .await
        .retrain(pb::RetrainRequest::default())
        .await
        .unwrap_err();
    assert_eq!(retrain.code(), Code::PermissionDenied);

    // Health answers without a key (load balancers and probes carry none).
    let ch = Channel::from_shared(format!("http://{}", srv.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
    let h = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "tokenwatch.v1.TokenWatch".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        h.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    srv.stop().await;
}

/// The binary: SIGTERM closes every open window, the server says so and exits 0.
#[cfg(unix)]
#[test]
fn sigterm_shuts_down_gracefully() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    common::write_secret(&keys, &format!("ingest {INGEST}\nread {READ}\n"));
    // A free port for the metrics listener (the exporter cannot report one it picked).
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tokenwatch"))
        .args(["serve", "--listen", "127.0.0.1:0", "--keys"])
        .arg(&keys)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--metrics-listen", &metrics])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .expect(&line)
        .to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let reqs = steady(3, T0, 5);
    let r = rt.block_on(async {
        let ch = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut c = pb::token_watch_client::TokenWatchClient::with_interceptor(
            ch,
            Bearer::new(Some(INGEST)).unwrap(),
        );
        c.ingest(tokio_stream::iter(reqs))
            .await
            .unwrap()
            .into_inner()
    });
    assert_eq!(r.accepted, 60);
    // Prometheus text at /metrics, for a bearer key only (the server has keys).
    let scrape = |auth: &str| {
        use std::io::{Read, Write};
        let mut conn = std::net::TcpStream::connect(&metrics).unwrap();
        write!(
            conn,
            "GET /metrics HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"
        )
        .unwrap();
        let mut t = String::new();
        conn.read_to_string(&mut t).unwrap();
        t
    };
    assert!(scrape("").starts_with("HTTP/1.1 401"), "{}", scrape(""));
    assert!(scrape("Authorization: Bearer not-a-key-at-all-0000\r\n").starts_with("HTTP/1.1 401"));
    let text = scrape(&format!("Authorization: Bearer {READ}\r\n"));
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    for name in [
        "tokenwatch_events_accepted_total 60",
        "tokenwatch_events_rejected_total 0",
        "tokenwatch_ingest_seconds_bucket",
        "tokenwatch_scoring_seconds_count",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(status.success(), "exit {status:?}\n{rest}\n{err}");
    // 3 tokens x 5 minutes: every window, open ones included, was scored at shutdown.
    assert!(
        rest.contains("stopped: 60 events, 15 windows scored"),
        "{rest}\n{err}"
    );
    assert!(
        !err.contains(INGEST) && !err.contains(READ),
        "a key reached the log"
    );
}

/// A client in another language: examples/python_client.py against the binary. Needs
/// python3 with grpcio and grpcio-tools (`.ci/run` installs them); says so and passes
/// without them.
#[test]
fn python_client_ingests_a_file_and_lists_the_riskiest() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let probe = Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED: python3 with grpcio and grpcio-tools is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    common::write_secret(&keys, &format!("admin {ADMIN}\n"));
    let events = dir.path().join("events.csv");
    let mut csv = String::from("ts,token_id,method,endpoint,status,bytes_out,src_ip,country\n");
    for m in 0..30 {
        for t in 0..3 {
            csv += &format!(
                "{},py-{t},GET,/v1/a,200,100,10.0.0.{t},DE\n",
                tokenwatch::event::fmt_ts(T0 + m * MINUTE + t * 1000)
            );
        }
    }
    csv += "2026-03-02T00:31:00Z,py-0,GET,/v1/a,999,100,10.0.0.1,DE\n";
    std::fs::write(&events, csv).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tokenwatch"))
        .args(["serve", "--listen", "127.0.0.1:0", "--keys"])
        .arg(&keys)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .expect(&line)
        .to_string();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/python_client.py");
    let out = Command::new("python3")
        .arg(script)
        .args([
            "--target", &addr, "--key", ADMIN, "--limit", "3", "--events",
        ])
        .arg(&events)
        .output()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("90 accepted, 1 rejected"), "{text}");
    assert!(text.contains("event 90: status"), "{text}");
    assert!(text.contains("riskiest 3 tokens"), "{text}");
}

/// TLS: with a certificate the server speaks only TLS; a client trusting the certificate
/// works; the console (`--http`) is served over the same TLS, with `Secure` session cookies.
/// Needs `openssl` to make a throwaway certificate (says so and passes without).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_clients_that_trust_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (crt, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ])
        .args(["-addext", "subjectAltName=DNS:localhost"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .output();
    if !made.is_ok_and(|o| o.status.success()) {
        eprintln!("SKIPPED: openssl is not available to make a test certificate");
        return;
    }
    let pem = std::fs::read(&crt).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_addr = http.local_addr().unwrap();
    let opts = server::Options {
        config: tokenwatch::Config::default(),
        registry: Default::default(),
        keys: Some(keys()),
        tls: Some((pem.clone(), std::fs::read(&key).unwrap())),
        shutdown_grace: Duration::from_secs(10),
        data_dir: None,
        policies: Vec::new(),
        dry_run: false,
        faults: None,
        ready: Some(ready_tx),
        http: Some(http),
        cluster: None,
    };
    let task = tokio::spawn(server::run(listener, opts, async {
        let _ = rx.await;
    }));
    ready_rx.await.expect("the server did not become ready");
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&pem))
        .domain_name("localhost");
    let ch = Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = pb::token_watch_client::TokenWatchClient::with_interceptor(
        ch,
        Bearer::new(Some(READ)).unwrap(),
    );
    let s = c
        .get_stats(pb::GetStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.events, 0);
    // Plain text to the same port does not get an answer.
    let plain = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await;
    if let Ok(ch) = plain {
        let mut c = pb::token_watch_client::TokenWatchClient::with_interceptor(
            ch,
            Bearer::new(Some(READ)).unwrap(),
        );
        assert!(c.get_stats(pb::GetStatsRequest {}).await.is_err());
    }
    // The console over the same certificate: the login page, and a Secure session cookie.
    let https = |req: String| {
        let pem = pem.clone();
        async move {
            use rustls_pki_types::pem::PemObject;
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            use tokio_rustls::rustls;
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
                roots.add(c.unwrap()).unwrap();
            }
            let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
            let tcp = tokio::net::TcpStream::connect(http_addr).await.unwrap();
            let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
            let mut s = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
                .connect(name, tcp)
                .await
                .unwrap();
            s.write_all(req.as_bytes()).await.unwrap();
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out).await;
            String::from_utf8_lossy(&out).to_string()
        }
    };
    let page =
        https("GET /login HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".into()).await;
    assert!(
        page.starts_with("HTTP/1.1 200") && page.contains("type=\"password\""),
        "{page}"
    );
    let body = format!("key={READ}");
    let login = https(format!(
        "POST /login HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ))
    .await;
    assert!(login.starts_with("HTTP/1.1 303"), "{login}");
    let cookie = login
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .unwrap_or_default();
    assert!(
        cookie.contains("Secure") && cookie.contains("HttpOnly"),
        "{cookie}"
    );
    let _ = tx.send(());
    task.await.unwrap().unwrap();
}

/// A flood of distinct token ids against a budget of 200 tracked tokens (two shards of
/// 100, each with 1/8 headroom): memory stays within it while the server answers, every
/// flood token's window is still scored, the idle-longest token is evicted to the spill, and
/// when it returns (also after a restart) it comes back with its baseline, not as a new
/// token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_distinct_token_flood_stays_within_the_budget_and_an_evicted_token_keeps_its_baseline() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let opts = move |o: &mut server::Options| {
        o.config.engine.max_tokens = 200;
        // The spill's free-disk floor is the host's business, not this test's.
        o.config.engine.spill_min_free = tokenwatch::config::Bytes(0);
        o.data_dir = Some(d.clone());
    };
    let srv = TestServer::start_opts(opts.clone()).await;
    let mut c = srv.client(Some(INGEST)).await;
    let mut r = srv.client(Some(READ)).await;
    let now = chrono::Utc::now().timestamp_millis();
    let day = 86_400_000;
    // A week of history of one token, one call every ten minutes, ending a day ago.
    let home: Vec<pb::Event> = (0..7 * 144)
        .map(|k| {
            event(
                now - 8 * day + k * 600_000,
                "tok-home",
                "10.0.0.1",
                "FR",
                1,
                200,
            )
        })
        .collect();
    assert_eq!(ingest_one(&mut c, home).await.unwrap().accepted, 1008);
    // 20,000 distinct ids in two minutes of event time, 2,000 per message.
    let t_flood = now - 3_600_000;
    for b in 0..10i64 {
        let events: Vec<pb::Event> = (0..2000i64)
            .map(|k| {
                let i = b * 2000 + k;
                event(
                    t_flood + i * 6,
                    &format!("flood-{i:05}"),
                    "10.9.0.1",
                    "US",
                    7,
                    200,
                )
            })
            .collect();
        let resp = ingest_one(&mut c, events).await.unwrap();
        assert_eq!(
            resp.accepted, 2000,
            "accepted even when not all can be tracked"
        );
        // The server keeps answering reads during the flood.
        let st = r
            .get_stats(pb::GetStatsRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(st.tracked_tokens <= 224, "{st:?}");
    }
    // Half an hour later the flood's windows have closed: its tokens are idle and evicted
    // as new ones come (the idle-longest first, tok-home among them).
    let later: Vec<pb::Event> = (0..300i64)
        .map(|i| {
            event(
                now - 1_800_000 + i * 10,
                &format!("late-{i}"),
                "10.9.0.2",
                "US",
                7,
                200,
            )
        })
        .collect();
    ingest_one(&mut c, later.clone()).await.unwrap();
    ingest_one(&mut c, later).await.unwrap();
    // Event time moves past their windows (a tracked token's call): they close.
    ingest_one(
        &mut c,
        vec![event(now - 1_200_000, "late-299", "10.9.0.2", "US", 7, 200)],
    )
    .await
    .unwrap();
    let st = r
        .get_stats(pb::GetStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(st.tracked_tokens <= 224, "{st:?}");
    assert!(st.evicted_tokens > 0, "{st:?}");
    // Every flood token was tracked (evicted with its open window when none was idle) and
    // its window scored when it closed.
    assert_eq!(st.untracked_events, 0, "{st:?}");
    assert!(st.windows >= 1008 + 20_000, "{st:?}");
    let gone = r
        .get_token_risk(pb::GetTokenRiskRequest {
            token_id: "tok-home".into(),
        })
        .await;
    assert_eq!(
        gone.unwrap_err().code(),
        Code::NotFound,
        "evicted: off the board too"
    );
    // tok-home returns: loaded back from the spill, with its week of baseline. Its three
    // calls fall in one (1-minute) window wherever `now` lies in its minute.
    let minute = (now - 600_000).div_euclid(60_000) * 60_000;
    let back: Vec<pb::Event> = (0..3)
        .map(|k| {
            event(
                minute + 10_000 + k * 1000,
                "tok-home",
                "10.0.0.1",
                "FR",
                1,
                200,
            )
        })
        .collect();
    ingest_one(&mut c, back).await.unwrap();
    let st = r
        .get_stats(pb::GetStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(st.reloaded_tokens >= 1, "{st:?}");
    assert!(st.tracked_tokens <= 224, "{st:?}");
    // A later event closes tok-home's window: scored with its week of baseline (full
    // confidence), as a token first seen now would not be.
    ingest_one(
        &mut c,
        vec![event(now - 1000, "late-0", "10.9.0.2", "US", 7, 200)],
    )
    .await
    .unwrap();
    let home = r
        .get_token_risk(pb::GetTokenRiskRequest {
            token_id: "tok-home".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(home.events, 3, "{home:?}");
    assert!(home.confidence > 0.99, "{home:?}");
    drop((c, r));
    let known = srv.stop().await.stats.tokens;
    // Restarted: tokens evicted before the final snapshot are still in the spill.
    let srv = TestServer::start_opts(opts).await;
    let mut c = srv.client(Some(INGEST)).await;
    let mut r = srv.client(Some(READ)).await;
    // A flood token evicted before the restart returns (event time after the windows the
    // graceful stop closed).
    let now = chrono::Utc::now().timestamp_millis() + 65_000;
    let st0 = r
        .get_stats(pb::GetStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    ingest_one(
        &mut c,
        vec![event(now, "flood-00000", "10.9.0.1", "US", 7, 200)],
    )
    .await
    .unwrap();
    let st = r
        .get_stats(pb::GetStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        st.reloaded_tokens,
        st0.reloaded_tokens + 1,
        "{st0:?} -> {st:?}"
    );
    assert_eq!(st.tokens, st0.tokens, "a reloaded token is not a new one");
    assert_eq!(st.tokens, known, "{st:?}");
    drop((c, r));
    let summary = srv.stop().await;
    assert!(summary.stats.tracked <= 224, "{:?}", summary.stats);
}

/// The console cuts off a client that opens a connection and sends its request head slowly
/// (slowloris), while an ordinary request on another connection is answered meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_closes_connections_that_never_finish_a_request() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = http.local_addr().unwrap();
    let srv = TestServer::start_opts(move |o| {
        o.config.console.header_timeout = tokenwatch::config::Duration { ms: 1_000 };
        o.http = Some(http);
    })
    .await;
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /login HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut ok = tokio::net::TcpStream::connect(addr).await.unwrap();
    ok.write_all(b"GET /login HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut page = String::new();
    ok.read_to_string(&mut page).await.unwrap();
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    let t0 = std::time::Instant::now();
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut rest)).await;
    assert!(r.is_ok(), "the slow connection was not closed");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    drop(srv);
}
