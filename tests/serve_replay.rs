//! One scoring path and one alerting path for every door: the same generated events fed
//! through `serve` (gRPC, in process on 127.0.0.1:0) and through the engine as `replay`
//! drives it give the same window scores (the board of latest scores per token), the same
//! alerting windows with the same contributions, and the same policy alert ids.

use std::collections::BTreeMap;
use std::time::Duration;

use tokenwatch::ingest::{read_registry, BadRowPolicy, EventReader};
use tokenwatch::loadgen::Bearer;
use tokenwatch::respond::policy::{self, Policies};
use tokenwatch::server::{self, auth::Keys, pb};
use tonic::transport::Channel;

mod common;
use common::events_of;

const KEY: &str = "admin-key-00000000000003";

/// (risk, signals in order) of one window, as both doors report it.
type Seen = (f64, Vec<String>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_and_replay_give_the_same_scores_and_alerts() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = tokenwatch::generate::Options::new(dir.path().to_path_buf());
    g.tokens = 16;
    g.days = 5;
    g.seed = 3;
    g.scale = 0.3;
    tokenwatch::generate::run(&g).unwrap();
    let (registry, _) = read_registry(&dir.path().join("tokens.csv"), BadRowPolicy::Fail).unwrap();
    let mut cfg = tokenwatch::Config::default();
    cfg.engine.shards = 2;
    let policies = policy::parse(policy::DEFAULT_POLICIES, "default").unwrap();

    // The replay door: the engine over the file's batches, every closed window judged by
    // the same policies the server runs.
    let mut reader =
        EventReader::open(&dir.path().join("events.parquet"), BadRowPolicy::Fail).unwrap();
    let mut batches = Vec::new();
    while let Some(b) = reader.next_batch().unwrap() {
        batches.push(b);
    }
    let mut engine = tokenwatch::Engine::new(cfg.clone(), registry.clone());
    let mut judge = Policies::new(policies.clone(), cfg.window.size.ms);
    let mut replay_alerts: BTreeMap<(String, i64), (Seen, String)> = BTreeMap::new();
    let mut latest: BTreeMap<String, Seen> = BTreeMap::new();
    let mut take = |scores: Vec<tokenwatch::WindowScore>, latest: &mut BTreeMap<String, Seen>| {
        for s in scores {
            let seen: Seen = (
                s.risk as f64,
                s.contributions
                    .iter()
                    .map(|c| c.signal.name().to_string())
                    .collect(),
            );
            let id = judge
                .judge(&s)
                .first()
                .map(|d| d.alert_id.clone())
                .unwrap_or_default();
            latest.insert(s.token.to_string(), seen.clone());
            if s.alert {
                replay_alerts.insert((s.token.to_string(), s.start), (seen, id));
            }
        }
    };
    for b in &batches {
        take(engine.apply(b).unwrap(), &mut latest);
    }
    let board = latest.clone();
    take(engine.close_open(), &mut latest);
    assert!(
        replay_alerts.len() >= 5,
        "too few alerts to compare: {}",
        replay_alerts.len()
    );

    // The serve door.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let opts = server::Options {
        config: cfg.clone(),
        registry,
        keys: Some(Keys::parse(&format!("admin {KEY}\n"), std::path::Path::new("k")).unwrap()),
        tls: None,
        shutdown_grace: Duration::from_secs(10),
        data_dir: None,
        policies,
        dry_run: false,
        faults: None,
        ready: Some(ready_tx),
        http: None,
        cluster: None,
    };
    let task = tokio::spawn(server::run(listener, opts, async {
        let _ = stopped.await;
    }));
    ready_rx.await.expect("the server did not become ready");
    let ch = Channel::from_shared(format!("http://{addr}")).unwrap();
    let ch = loop {
        match ch.connect().await {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let mut client = pb::token_watch_client::TokenWatchClient::with_interceptor(
        ch,
        Bearer::new(Some(KEY)).unwrap(),
    );
    let mut feed = client
        .watch_alerts(pb::WatchAlertsRequest { min_risk: 0.0 })
        .await
        .unwrap()
        .into_inner();
    let reqs: Vec<pb::IngestRequest> = batches
        .iter()
        .flat_map(|b| {
            events_of(b)
                .chunks(500)
                .map(|c| pb::IngestRequest { events: c.to_vec() })
                .collect::<Vec<_>>()
        })
        .collect();
    let sent: u64 = reqs.iter().map(|r| r.events.len() as u64).sum();
    let resp = client
        .ingest(tokio_stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((resp.accepted, resp.rejected, resp.late), (sent, 0, 0));

    // Every token's latest closed window on the board equals the replay's.
    for (token, want) in &board {
        let got = client
            .get_token_risk(pb::GetTokenRiskRequest {
                token_id: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        let signals: Vec<String> = got.contributions.iter().map(|c| c.signal.clone()).collect();
        assert!(
            (got.risk - want.0).abs() < 1e-4 && signals == want.1,
            "{token}: serve {got:?} vs replay {want:?}"
        );
    }

    // Shutdown closes and scores every open window and publishes the last alerts.
    let _ = stop.send(());
    let mut serve_alerts: BTreeMap<(String, i64), (Seen, String)> = BTreeMap::new();
    while let Ok(Ok(Some(a))) = tokio::time::timeout(Duration::from_secs(30), feed.message()).await
    {
        assert_eq!(a.missed, 0);
        let signals = a.contributions.iter().map(|c| c.signal.clone()).collect();
        serve_alerts.insert(
            (a.token_id, a.window_start_ms),
            ((a.risk, signals), a.alert_id),
        );
    }
    task.await.unwrap().unwrap();
    assert_eq!(
        serve_alerts.keys().collect::<Vec<_>>(),
        replay_alerts.keys().collect::<Vec<_>>(),
        "the same windows alert"
    );
    for (k, (want, want_id)) in &replay_alerts {
        let (got, got_id) = &serve_alerts[k];
        assert!(
            (got.0 - want.0).abs() < 1e-4 && got.1 == want.1,
            "{k:?}: {got:?} vs {want:?}"
        );
        assert_eq!(got_id, want_id, "{k:?}: the same policy alert");
    }
}
