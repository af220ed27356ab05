//! Durability and retraining, black-box: a server killed with SIGKILL mid-stream loses
//! nothing it acknowledged and comes back with the same risk; a retrain from the Parquet
//! history gives the live models' scores.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use arrow::array::AsArray;
use arrow::datatypes::UInt64Type;
use tokenwatch::loadgen::Bearer;
use tokenwatch::server::pb;
use tonic::transport::Channel;

const KEY: &str = "admin-key-for-persistence-tests";
const MINUTE: i64 = 60_000;
/// 2026-03-02T00:00:00Z.
const T0: i64 = 1_772_409_600_000;

type Client = pb::token_watch_client::TokenWatchClient<
    tonic::service::interceptor::InterceptedService<Channel, Bearer>,
>;

/// Events of `tokens` tokens over `minutes`, 3 a minute each; `bytes_out` is a unique
/// serial number, so the history can be checked event by event.
fn traffic(
    prefix: &str,
    tokens: usize,
    from: i64,
    minutes: i64,
    serial: &mut u64,
) -> Vec<pb::IngestRequest> {
    (0..minutes)
        .map(|m| pb::IngestRequest {
            events: (0..tokens)
                .flat_map(|t| (0..3).map(move |k| (t, k)))
                .map(|(t, k)| {
                    *serial += 1;
                    pb::Event {
                        ts_ms: from + m * MINUTE + k * 20_000 + t as i64 * 10,
                        token_id: format!("{prefix}-{t}"),
                        method: "GET".into(),
                        endpoint: format!("/v1/items/{}", k % 2),
                        status: if (m + k) % 17 == 0 { 404 } else { 200 },
                        bytes_out: *serial,
                        latency_ms: Some(10.0 + k as f64),
                        src_ip: format!("10.1.{t}.{}", 1 + k),
                        country: "NL".into(),
                        asn: Some(1136),
                        user_agent: "sync/1".into(),
                        scope: String::new(),
                        env: String::new(),
                        event_id: String::new(),
                    }
                })
                .collect(),
        })
        .collect()
}

fn start(dir: &Path) -> (Child, String) {
    common::write_secret(&dir.join("keys"), &format!("admin {KEY}\n"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_tokenwatch"))
        .args(["serve", "--listen", "127.0.0.1:0", "--keys"])
        .arg(dir.join("keys"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("serve.log")).unwrap())
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
    (child, addr)
}

async fn client(addr: &str) -> Client {
    let ch = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    pb::token_watch_client::TokenWatchClient::with_interceptor(ch, Bearer::new(Some(KEY)).unwrap())
}

async fn risk(c: &mut Client, token: &str) -> pb::TokenRisk {
    c.get_token_risk(pb::GetTokenRiskRequest {
        token_id: token.into(),
    })
    .await
    .unwrap()
    .into_inner()
}

/// bytes_out serial -> times it appears in the history.
fn history(data: &Path) -> HashMap<u64, u32> {
    let mut seen = HashMap::new();
    for f in tokenwatch::store::history::files(&data.join("events"), None, None).unwrap() {
        // Every history file reads with the plain Parquet reader (pyarrow, DuckDB alike).
        let file = std::fs::File::open(&f).unwrap();
        let r = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap();
        for b in r {
            let b = b.unwrap();
            let col = b
                .column_by_name("bytes_out")
                .unwrap()
                .as_primitive::<UInt64Type>();
            for v in col.values() {
                *seen.entry(*v).or_insert(0) += 1;
            }
        }
    }
    seen
}

#[cfg(unix)]
#[test]
fn sigkill_mid_stream_loses_no_acknowledged_event_and_risk_survives() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut serial = 0u64;
    let (mut child, addr) = start(dir.path());
    // Acknowledged: six hours of 5 tokens, in 3 streams.
    let acked_batches = traffic("tok", 5, T0, 360, &mut serial);
    let acked_last = serial;
    let mut acked = 0;
    let before = rt.block_on(async {
        let mut c = client(&addr).await;
        for part in acked_batches.chunks(120) {
            let r = c
                .ingest(tokio_stream::iter(part.to_vec()))
                .await
                .unwrap()
                .into_inner();
            acked += r.accepted;
        }
        risk(&mut c, "tok-2").await
    });
    assert_eq!(acked, acked_last);
    // Mid-stream: another stream is sending (other tokens, inside the open windows' time,
    // so the acknowledged tokens' windows stay as they are) when the server is killed.
    let mid = traffic("mid", 3, T0 + 359 * MINUTE, 1, &mut serial);
    let many: Vec<pb::IngestRequest> = (0..40_000).map(|i| mid[i % mid.len()].clone()).collect();
    rt.block_on(async {
        let mut c = client(&addr).await;
        // The stream never ends: the kill always comes in the middle of it.
        let endless =
            tokio_stream::StreamExt::chain(tokio_stream::iter(many), tokio_stream::pending());
        let sending = tokio::spawn(async move { c.ingest(endless).await });
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        child.kill().unwrap(); // SIGKILL
        let _ = child.wait();
        // The interrupted stream was never acknowledged.
        assert!(sending.await.unwrap().is_err());
    });

    let (mut child, addr) = start(dir.path());
    let after = rt.block_on(async {
        let mut c = client(&addr).await;
        let after = risk(&mut c, "tok-2").await;
        // Snapshot and Retrain on the running server write snapshots and keep serving.
        let snap = c
            .snapshot(pb::SnapshotRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(Path::new(&snap.path).exists(), "{}", snap.path);
        let re = c
            .retrain(pb::RetrainRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(
            Path::new(&re.snapshot_path).exists(),
            "{}",
            re.snapshot_path
        );
        assert_eq!(risk(&mut c, "tok-2").await, after);
        after
    });
    assert_eq!(after, before, "risk after the restart differs");
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    let log = std::fs::read_to_string(dir.path().join("serve.log")).unwrap();
    assert!(status.success(), "{status:?}\n{log}");
    assert!(!log.contains(KEY), "the key reached the log");

    let seen = history(&dir.path().join("data"));
    for s in 1..=acked_last {
        assert_eq!(
            seen.get(&s),
            Some(&1),
            "acknowledged event {s} not exactly once in the history"
        );
    }
    // (The interrupted stream re-sent one minute many times over, so its serials repeat by
    // design; whatever of it was logged before the kill is in the history too.)
    let tmp_left = walk(&dir.path().join("data"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "tmp"))
        .count();
    assert_eq!(tmp_left, 0, "a half-written file is visible");
}

fn walk(p: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(p).unwrap().flatten() {
        if e.path().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

#[test]
fn retraining_from_history_gives_the_live_scores() {
    use tokenwatch::server::convert::{to_batch, Clock};
    use tokenwatch::store::{self, Store};
    let dir = tempfile::tempdir().unwrap();
    let cfg = tokenwatch::Config::default();
    let clock = Clock {
        now_ms: i64::MAX / 4,
        max_future_skew_ms: 0,
    };
    let mut serial = 0;
    // Four days (refits and quarantine in play) of 6 tokens, with an odd burst on day 3.
    let mut reqs = traffic("r", 6, T0, 4 * 24 * 60, &mut serial);
    for e in reqs[3 * 24 * 60 + 30].events.iter_mut() {
        e.country = "BR".into();
        e.status = 401;
    }
    let batches: Vec<_> = reqs
        .chunks(97)
        .map(|c| {
            let ev: Vec<pb::Event> = c.iter().flat_map(|r| r.events.clone()).collect();
            to_batch(&ev, 0, clock, &mut Default::default())
        })
        .collect();
    let (mut st, rec) = Store::open(dir.path(), &cfg, Default::default()).unwrap();
    let mut live = rec.engine;
    let mut live_scores = Vec::new();
    for b in &batches[..batches.len() - 1] {
        st.append(b).unwrap();
        st.commit().unwrap();
        live_scores.extend(live.apply(b).unwrap());
    }
    st.seal().unwrap();
    let (mut rebuilt, _) = store::rebuild(
        dir.path(),
        &cfg,
        Default::default(),
        (None, None),
        None,
        |_| {},
    )
    .unwrap();
    assert_eq!(rebuilt.stats(), live.stats());
    // The same new data scores the same in both (tolerance: exact to 1e-9 risk).
    let last = batches.last().unwrap();
    let mut a = live.apply(last).unwrap();
    let mut b = rebuilt.apply(last).unwrap();
    a.extend(live.finish());
    b.extend(rebuilt.finish());
    assert!(a.len() > 100);
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!((&x.token, x.start), (&y.token, y.start));
        assert!((x.risk - y.risk).abs() <= 1e-9, "{x:?} vs {y:?}");
        assert_eq!(x.contributions, y.contributions);
    }
    assert!(live_scores.iter().any(|s| s.alert), "the burst alerted");
    // And a snapshot round trip is the same engine again.
    let snap = live.snapshot();
    let again = tokenwatch::Engine::restore(cfg.clone(), Default::default(), &snap).unwrap();
    assert_eq!(again.stats(), live.stats());
    let (x, y) = (again.snapshot().tokens, snap.tokens);
    assert_eq!(x.len(), y.len());
    for (a, b) in x.iter().zip(&y) {
        assert!(
            a.token == b.token && a.state == b.state && a.open == b.open,
            "{}",
            a.token
        );
    }
}

#[test]
fn a_corrupt_snapshot_falls_back_to_the_previous_one_and_retention_keeps_recent_days() {
    use tokenwatch::store::{self, history, snapshot, LogPos, Store};
    let dir = tempfile::tempdir().unwrap();
    let cfg = tokenwatch::Config::default();
    let (st, rec) = Store::open(dir.path(), &cfg, Default::default()).unwrap();
    drop(st);
    let snap = rec.engine.snapshot();
    let snaps = store::snapshots_dir(dir.path());
    let older = snapshot::write(
        &snaps,
        &snap,
        LogPos {
            segment: 1,
            batches: 0,
        },
    )
    .unwrap();
    let newer = snapshot::write(
        &snaps,
        &snap,
        LogPos {
            segment: 2,
            batches: 0,
        },
    )
    .unwrap();
    std::fs::write(&newer, b"PAR1 not really").unwrap();
    let (_st, rec) = Store::open(dir.path(), &cfg, Default::default()).unwrap();
    assert_eq!(rec.snapshot.as_deref(), Some(older.as_path()));
    assert!(
        rec.warnings
            .iter()
            .any(|w| w.contains(&newer.display().to_string())),
        "{:?}",
        rec.warnings
    );
    // Retention counts event time back from the newest event.
    let events = store::events_dir(dir.path());
    for d in ["2026-03-01", "2026-03-05", "2026-03-09"] {
        std::fs::create_dir_all(events.join(format!("date={d}"))).unwrap();
    }
    let newest = tokenwatch::event::parse_ts("2026-03-09T12:00:00Z").unwrap();
    assert_eq!(history::apply_retention(&events, newest, 0).unwrap(), 0);
    assert_eq!(
        history::apply_retention(&events, newest, 5 * 86_400_000).unwrap(),
        1
    );
    assert!(!events.join("date=2026-03-01").exists());
    assert!(events.join("date=2026-03-05").exists());
}

/// Hourly batches of eight tokens taking turns (one active each hour, two calls a
/// minute), in the canonical schema.
fn turns(hours: std::ops::Range<i64>) -> Vec<arrow::record_batch::RecordBatch> {
    let clock = tokenwatch::server::convert::Clock {
        now_ms: i64::MAX / 2,
        max_future_skew_ms: 0,
    };
    hours
        .map(|h| {
            let tok = format!("tok-{}", h % 8);
            let events: Vec<pb::Event> = (0..120)
                .map(|i| {
                    common::event(
                        T0 + h * 60 * MINUTE + i * 30_000,
                        &tok,
                        "10.0.0.1",
                        "FR",
                        1,
                        200,
                    )
                })
                .collect();
            tokenwatch::server::convert::to_batch(&events, 0, clock, &mut Default::default())
        })
        .collect()
}

/// A crash after tokens were evicted (and some loaded back and evicted again) since the
/// last snapshot: recovery rolls the spill back to the snapshot's savepoint before the log
/// is replayed, so no event is applied twice to an evicted token, and the scores that follow
/// are those of a run that never stopped and never evicted.
#[test]
fn a_crash_after_evictions_recovers_the_spill_of_the_snapshot() {
    use tokenwatch::model::registry::Registry;
    use tokenwatch::store::Store;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tokenwatch::Config::default();
    cfg.engine.shards = 1;
    cfg.engine.max_tokens = 3;
    // The spill's free-disk floor is the host's business, not this test's.
    cfg.engine.spill_min_free = tokenwatch::config::Bytes(0);
    let (mut store, rec) = Store::open(dir.path(), &cfg, Registry::default()).unwrap();
    let mut e = rec.engine;
    for b in turns(0..20) {
        store.append(&b).unwrap();
        store.commit().unwrap();
        e.apply(&b).unwrap();
    }
    let snap = e.snapshot_with_spill().unwrap();
    assert!(
        snap.spill.is_some(),
        "tokens were evicted to the data directory's spill"
    );
    store.checkpoint(&snap, e.newest()).unwrap();
    for b in turns(20..36) {
        store.append(&b).unwrap();
        store.commit().unwrap();
        e.apply(&b).unwrap();
    }
    assert!(e.stats().reloaded > 10, "{:?}", e.stats());
    // Crash: no snapshot, nothing closed.
    drop((e, store));
    let (_store, rec) = Store::open(dir.path(), &cfg, Registry::default()).unwrap();
    assert!(rec.warnings.is_empty(), "{:?}", rec.warnings);
    let mut recovered = rec.engine;
    let mut free_cfg = cfg.clone();
    free_cfg.engine.max_tokens = 0;
    let mut reference = tokenwatch::Engine::new(free_cfg, Registry::default());
    for b in turns(0..36) {
        reference.apply(&b).unwrap();
    }
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for batch in turns(36..52) {
        a.extend(recovered.apply(&batch).unwrap());
        b.extend(reference.apply(&batch).unwrap());
    }
    a.extend(recovered.finish());
    b.extend(reference.finish());
    assert!(recovered.stats().evicted > 0);
    assert_eq!(a.len(), b.len());
    assert!(
        a == b,
        "scores after recovery differ from a run that never stopped"
    );
}

#[test]
fn event_ids_acknowledged_before_a_crash_are_still_duplicates_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut serial = 0u64;
    // Every event carries an id: its serial number.
    let with_ids = |reqs: Vec<pb::IngestRequest>| -> Vec<pb::IngestRequest> {
        reqs.into_iter()
            .map(|mut r| {
                for e in &mut r.events {
                    e.event_id = format!("ev-{}", e.bytes_out);
                }
                r
            })
            .collect()
    };
    let first = with_ids(traffic("dup", 2, T0, 10, &mut serial));
    let second = with_ids(traffic("dup", 2, T0 + 10 * MINUTE, 5, &mut serial));
    let fresh = with_ids(traffic("dup", 2, T0 + 15 * MINUTE, 1, &mut serial));
    let n = |reqs: &[pb::IngestRequest]| reqs.iter().map(|r| r.events.len() as u64).sum::<u64>();
    let ingest = |addr: String, reqs: Vec<pb::IngestRequest>| {
        rt.block_on(async move {
            let mut c = client(&addr).await;
            c.ingest(tokio_stream::iter(reqs))
                .await
                .unwrap()
                .into_inner()
        })
    };
    let (mut child, addr) = start(dir.path());
    let r = ingest(addr.clone(), first.clone());
    assert_eq!((r.accepted, r.duplicates), (n(&first), 0), "{r:?}");
    // A snapshot: the first events' log segment is sealed and put into the history, so after
    // the crash they are not replayed, only their ids are read back.
    rt.block_on(async {
        client(&addr)
            .await
            .snapshot(pb::SnapshotRequest {})
            .await
            .unwrap();
    });
    let r = ingest(addr.clone(), second.clone());
    assert_eq!((r.accepted, r.duplicates), (n(&second), 0), "{r:?}");
    child.kill().unwrap(); // SIGKILL: the acknowledgements may never have reached the client
    let _ = child.wait();

    let (mut child, addr) = start(dir.path());
    // The client resends everything, and some new events.
    let mut again = first.clone();
    again.extend(second.clone());
    again.extend(fresh.clone());
    let r = ingest(addr.clone(), again);
    assert_eq!(
        (r.accepted, r.duplicates),
        (n(&fresh), n(&first) + n(&second)),
        "{r:?}"
    );
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    assert!(child.wait().unwrap().success());
    // Each event is in the history exactly once.
    let seen = history(&dir.path().join("data"));
    assert_eq!(seen.len() as u64, serial);
    assert!(seen.values().all(|&c| c == 1), "an event was stored twice");
}
