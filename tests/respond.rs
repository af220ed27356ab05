//! Alert policies and actions against a real HTTP receiver on 127.0.0.1: a policy fires after
//! N windows and not before, the cooldown makes one incident one alert, a failing webhook is
//! retried and dead-lettered, revocation is called in enforce mode and only recorded in
//! dry-run, and every action is in the audit log.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{burst, steady, MINUTE, T0};
use tokenwatch::server::{self, pb};
use tonic::transport::Channel;

/// Whether `sig` (`sha256=HEX`) is the HMAC-SHA256 of `TS.BODY` under `key`: what a
/// receiver of tokenwatch's calls checks (README, Alert policies and actions).
fn signed(key: &str, ts: &str, sig: &str, body: &[u8]) -> bool {
    let Some(hex) = sig.strip_prefix("sha256=") else {
        return false;
    };
    let tag: Option<Vec<u8>> = (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
        .collect();
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.as_bytes());
    tag.is_some_and(|t| ring::hmac::verify(&k, &[ts.as_bytes(), b".", body].concat(), &t).is_ok())
}

/// A minimal HTTP/1.1 receiver: records (path, body); answers 500 on paths starting with
/// `/fail`, 200 otherwise.
struct Receiver {
    addr: String,
    seen: Arc<Mutex<Vec<(String, serde_json::Value)>>>,
    /// Every call as it came.
    raw: Arc<Mutex<Vec<RawCall>>>,
}

/// (path, timestamp header, signature header, raw body) of one call.
type RawCall = (String, String, String, Vec<u8>);

impl Receiver {
    fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let raw = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let raw_log = raw.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let log = log.clone();
                let raw_log = raw_log.clone();
                std::thread::spawn(move || {
                    let mut r = BufReader::new(conn.try_clone().unwrap());
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                        let mut len = 0;
                        let (mut ts, mut sig) = (String::new(), String::new());
                        loop {
                            let mut h = String::new();
                            r.read_line(&mut h).unwrap();
                            if h == "\r\n" || h.is_empty() {
                                break;
                            }
                            let lower = h.to_ascii_lowercase();
                            if let Some(v) = lower.strip_prefix("content-length:") {
                                len = v.trim().parse().unwrap();
                            }
                            if let Some(v) = lower.strip_prefix("x-tokenwatch-timestamp:") {
                                ts = v.trim().to_string();
                            }
                            if let Some(v) = lower.strip_prefix("x-tokenwatch-signature:") {
                                sig = v.trim().to_string();
                            }
                        }
                        let mut body = vec![0; len];
                        r.read_exact(&mut body).unwrap();
                        raw_log
                            .lock()
                            .unwrap()
                            .push((path.clone(), ts, sig, body.clone()));
                        let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                        log.lock().unwrap().push((path.clone(), json));
                        let status = if path.starts_with("/fail") {
                            "500 Oops"
                        } else {
                            "200 OK"
                        };
                        let _ = write!(conn, "HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
                    }
                });
            }
        });
        Receiver { addr, seen, raw }
    }

    fn on(&self, path: &str) -> Vec<serde_json::Value> {
        let seen = self.seen.lock().unwrap();
        seen.iter()
            .filter(|(p, _)| p == path)
            .map(|(_, b)| b.clone())
            .collect()
    }
}

async fn run_scenario(dir: &std::path::Path, policies: &str, dry_run: bool) {
    run_scenario_with(dir, policies, dry_run, None).await
}

async fn run_scenario_with(
    dir: &std::path::Path,
    policies: &str,
    dry_run: bool,
    ca_file: Option<String>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut config = tokenwatch::Config::default();
    config.respond.ca_file = ca_file;
    config.respond.backoff = tokenwatch::config::Duration { ms: 10 };
    config.respond.timeout = tokenwatch::config::Duration { ms: 2_000 };
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let opts = server::Options {
        config,
        registry: Default::default(),
        keys: None,
        tls: None,
        shutdown_grace: Duration::from_secs(20),
        data_dir: Some(dir.to_path_buf()),
        policies: {
            let mut p = tokenwatch::respond::policy::parse(policies, "test").unwrap();
            tokenwatch::respond::policy::resolve_secrets(&mut p, "test").unwrap();
            p
        },
        dry_run,
        faults: None,
        ready: Some(ready_tx),
        http: None,
        cluster: None,
    };
    let task = tokio::spawn(server::run(listener, opts, async {
        let _ = rx.await;
    }));
    ready_rx.await.expect("the server did not become ready");
    let ch = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = pb::token_watch_client::TokenWatchClient::new(ch);
    // Three quiet days; then svc-03 misbehaves for 2 minutes (A), later for 3 (B), and
    // again 10 minutes after B (C, within the cooldown); the others go on.
    let days = 3 * 24 * 60;
    let mut reqs = steady(6, T0, days);
    let a = T0 + days * MINUTE;
    let b = a + 60 * MINUTE;
    let cc = b + 10 * MINUTE;
    let mut tail = steady(6, a, 90);
    for r in tail.iter_mut() {
        r.events.retain(|e| e.token_id != "svc-03");
    }
    for m in [
        a,
        a + MINUTE,
        b,
        b + MINUTE,
        b + 2 * MINUTE,
        cc,
        cc + MINUTE,
        cc + 2 * MINUTE,
    ] {
        tail[((m - a) / MINUTE) as usize]
            .events
            .extend(burst("svc-03", m).events);
    }
    reqs.extend(tail);
    c.ingest(tokio_stream::iter(reqs)).await.unwrap();
    // Actions are delivered asynchronously; the stop waits for what is queued.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = tx.send(());
    task.await.unwrap().unwrap();
}

fn audit(dir: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_fire_dedup_retry_dead_letter_revoke_and_audit() {
    let rx = Receiver::start();
    let dir = tempfile::tempdir().unwrap();
    const KEY: &str = "hook-signing-key-0123456789";
    let secret = dir.path().join("hook.secret");
    common::write_secret(&secret, &format!("{KEY}\n"));
    let policies = format!(
        r#"
[[policy]]
name = "sustained"
min_risk = 50
consecutive_windows = 3
cooldown = "30m"
severity = "critical"
webhook = "http://{0}/hook"
secret_file = "{1}"

[[policy]]
name = "broken-receiver"
min_risk = 50
cooldown = "6h"
webhook = "http://{0}/fail"

[[policy]]
name = "cut-off"
mode = "enforce"
min_risk = 50
cooldown = "6h"
revoke_url = "http://{0}/revoke"
"#,
        rx.addr,
        secret.display()
    );
    let t0 = Instant::now();
    run_scenario(dir.path(), &policies, false).await;

    // N = 3: the 2-window burst (A) raised nothing; B's third window fired; C, within the
    // cooldown, updated the same alert once its streak was 3 again (2nd window of the alert;
    // updates are reported at 2, 4, 8... windows).
    let hooks = rx.on("/hook");
    let events: Vec<(&str, u64)> = hooks
        .iter()
        .map(|h| (h["event"].as_str().unwrap(), h["windows"].as_u64().unwrap()))
        .collect();
    assert_eq!(events, [("fired", 1), ("updated", 2)], "{hooks:#?}");
    // Each call is signed: HMAC-SHA256 of "timestamp.body" under the policy's key, as a
    // receiver checks it; the unsigned policies send no signature.
    for (path, ts, sig, body) in rx.raw.lock().unwrap().iter() {
        if path != "/hook" {
            assert!(sig.is_empty(), "{path} {sig}");
            continue;
        }
        assert!(signed(KEY, ts, sig, body), "the signature verifies");
        assert!(!signed(KEY, ts, sig, b"{}"), "a forged body does not");
        let age = chrono::Utc::now().timestamp() - ts.parse::<i64>().unwrap();
        assert!((0..300).contains(&age), "{ts}");
    }
    assert_eq!(hooks[0]["alert_id"], hooks[1]["alert_id"]);
    assert_eq!(hooks[0]["token_id"], "svc-03");
    assert_eq!(hooks[0]["severity"], "critical");
    let b = T0 + (3 * 24 * 60 + 60) * MINUTE;
    assert_eq!(
        hooks[0]["window_start"],
        tokenwatch::event::fmt_ts(b + 2 * MINUTE)
    );
    assert!(hooks[0]["contributions"].as_array().unwrap().len() >= 2);
    assert!(hooks[0]["rotation_hint"]
        .as_str()
        .unwrap()
        .contains("rotate"));

    // The broken receiver: one alert (6 h cooldown) reported as it grew; each report was
    // tried 1 + 3 times, then dead-lettered.
    let dead = std::fs::read_to_string(dir.path().join("dead_letter.jsonl")).unwrap();
    let dead_n = dead.lines().count();
    assert!(dead_n >= 2, "{dead}");
    assert_eq!(rx.on("/fail").len(), 4 * dead_n);
    assert!(dead
        .lines()
        .all(|l| l.contains("HTTP 500") && l.contains("broken-receiver")));
    let ids: std::collections::HashSet<String> = rx
        .on("/fail")
        .iter()
        .map(|b| b["alert_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 1, "one incident, one alert");

    // Enforce mode: the revocation endpoint was called once, for svc-03.
    let revokes = rx.on("/revoke");
    assert_eq!(revokes.len(), 1);
    assert_eq!(revokes[0]["token_id"], "svc-03");

    // The audit log has every action with its outcome.
    let log = audit(dir.path());
    let count = |what: &str, result: &str| {
        log.iter()
            .filter(|r| r["what"] == what && r["result"].as_str().unwrap().starts_with(result))
            .count()
    };
    assert_eq!(count("webhook", "ok 200"), 2);
    assert_eq!(count("webhook", "dead_letter"), dead_n);
    assert_eq!(count("revoke", "ok 200"), 1);
    assert_eq!(count("alert", "raised"), 3);
    assert!(log
        .iter()
        .all(|r| r["who"].as_str().unwrap().starts_with("policy:")
            && r["why"].as_str().unwrap().contains("risk")
            && r["at"].is_string()));
    assert!(t0.elapsed() < Duration::from_secs(60));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_records_revocations_without_calling() {
    let rx = Receiver::start();
    let dir = tempfile::tempdir().unwrap();
    let policies = format!(
        "[[policy]]\nname = \"cut-off\"\nmode = \"enforce\"\nmin_risk = 50\ncooldown = \"6h\"\nrevoke_url = \"http://{}/revoke\"\n",
        rx.addr
    );
    run_scenario(dir.path(), &policies, true).await;
    assert!(rx.on("/revoke").is_empty());
    let log = audit(dir.path());
    let dry: Vec<_> = log.iter().filter(|r| r["what"] == "revoke").collect();
    assert_eq!(dry.len(), 1, "{log:#?}");
    assert!(dry[0]["result"].as_str().unwrap().starts_with("dry_run"));
    assert_eq!(dry[0]["token_id"], "svc-03");
}

/// Svc-03 changes: from minute A it is called from a new country and network, by a new
/// client on an endpoint it never used, at its usual rate and with its usual answers (a
/// migration, or a leak). Returns the verdict's effect and the risk of the same behaviour
/// 20 minutes after the verdict.
async fn verdict_then_same_behaviour(verdict: &str) -> (pb::FeedbackResponse, pb::TokenRisk) {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let opts = server::Options {
        config: tokenwatch::Config::default(),
        registry: Default::default(),
        keys: None,
        tls: None,
        shutdown_grace: Duration::from_secs(20),
        data_dir: Some(dir.path().to_path_buf()),
        policies: tokenwatch::respond::policy::parse(
            tokenwatch::respond::policy::DEFAULT_POLICIES,
            "built in",
        )
        .unwrap(),
        dry_run: false,
        faults: None,
        ready: Some(ready_tx),
        http: None,
        cluster: None,
    };
    let task = tokio::spawn(server::run(listener, opts, async {
        let _ = rx.await;
    }));
    ready_rx.await.expect("the server did not become ready");
    let ch = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = pb::token_watch_client::TokenWatchClient::new(ch);
    let mut alerts = c
        .watch_alerts(pb::WatchAlertsRequest { min_risk: 0.0 })
        .await
        .unwrap()
        .into_inner();
    let days = 3 * 24 * 60;
    let a = T0 + days * MINUTE;
    let moved = |m: i64| -> Vec<pb::Event> {
        (0..4)
            .map(|k| {
                let mut e = common::event(
                    a + m * MINUTE + k * 15_000,
                    "svc-03",
                    "198.51.100.7",
                    "FR",
                    12_322,
                    200,
                );
                e.endpoint = "/v1/exports/{id}".into();
                e.user_agent = "exporter/1.0".into();
                e
            })
            .collect()
    };
    let mut first = steady(6, T0, days);
    let mut after = steady(6, a, 10);
    for (m, r) in after.iter_mut().enumerate() {
        r.events.retain(|e| e.token_id != "svc-03");
        if m < 2 {
            r.events.extend(moved(m as i64));
        }
    }
    first.extend(after);
    c.ingest(tokio_stream::iter(first)).await.unwrap();
    let alert = tokio::time::timeout(Duration::from_secs(10), alerts.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(alert.token_id, "svc-03");
    assert!(alert.risk >= 50.0, "{alert:?}");
    assert!(!alert.alert_id.is_empty());
    let fb = if verdict == "false_positive" {
        // Through the command line, as an operator would.
        let (id, target) = (alert.alert_id.clone(), addr.to_string());
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_tokenwatch"))
                .args(["label", "--target", &target, "--alert", &id])
                .args([
                    "--verdict",
                    "false_positive",
                    "--note",
                    "moved to the Paris region",
                ])
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("on token svc-03"), "{text}");
        let learned = text
            .split(": ")
            .nth(1)
            .and_then(|t| t.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .expect(&text);
        pb::FeedbackResponse {
            token_id: "svc-03".into(),
            learned_windows: learned,
            ..Default::default()
        }
    } else {
        c.submit_feedback(pb::FeedbackRequest {
            alert_id: alert.alert_id.clone(),
            verdict: verdict.into(),
            note: "confirmed: leaked in a CI log".into(),
        })
        .await
        .unwrap()
        .into_inner()
    };
    // The same behaviour again, 20 minutes later.
    let mut again = steady(6, a + 20 * MINUTE, 10);
    for (m, r) in again.iter_mut().enumerate() {
        r.events.retain(|e| e.token_id != "svc-03");
        if m < 2 {
            r.events.extend(moved(20 + m as i64));
        }
    }
    c.ingest(tokio_stream::iter(again)).await.unwrap();
    let risk = c
        .get_token_risk(pb::GetTokenRiskRequest {
            token_id: "svc-03".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(risk.window_start_ms, a + 21 * MINUTE);
    let stats = c
        .get_stats(pb::GetStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.labelled, 1);
    assert_eq!(stats.confirmed, u64::from(verdict == "true_positive"));
    let _ = tx.send(());
    task.await.unwrap().unwrap();
    let log = std::fs::read_to_string(dir.path().join("feedback.jsonl")).unwrap();
    assert!(
        log.contains(&alert.alert_id) && log.contains(verdict),
        "{log}"
    );
    (fb, risk)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_false_positive_verdict_teaches_the_token_and_a_true_positive_does_not() {
    let (fb, risk) = verdict_then_same_behaviour("false_positive").await;
    assert!(fb.learned_windows >= 1, "{fb:?}");
    assert!(
        risk.risk < 50.0 && !risk.alert,
        "after a false positive: {risk:?}"
    );

    let (fb, risk) = verdict_then_same_behaviour("true_positive").await;
    assert_eq!(fb.learned_windows, 0);
    assert!(fb.hold_until_ms > 0);
    assert!(
        risk.risk >= 50.0 && risk.alert,
        "after a true positive: {risk:?}"
    );
}

/// Engine level: two false alarms on the same signals damp them for the token (a third
/// such window scores lower than without verdicts), and a rebuild from the history with the
/// feedback log reaches the same token state.
#[test]
fn repeated_false_alarms_damp_a_signal_and_retrain_applies_verdicts_again() {
    use tokenwatch::engine::Verdict;
    use tokenwatch::server::convert::{to_batch, Clock};
    use tokenwatch::store::{self, FeedbackRecord, Store};
    let clock = Clock {
        now_ms: i64::MAX / 4,
        max_future_skew_ms: 0,
    };
    let days = 3 * 24 * 60;
    let a = T0 + days * MINUTE;
    // Steady traffic, then three one-minute bursts of svc-03 (ten times its rate, same
    // network and answers) two hours apart.
    let mut reqs = steady(4, T0, days + 5 * 60);
    for h in [0, 2, 4] {
        let m = (days + h * 60) as usize;
        let extra: Vec<pb::Event> = (0..40)
            .map(|k| {
                common::event(
                    a + h * 3_600_000 + k * 1_400,
                    "svc-03",
                    "10.3.0.1",
                    "DE",
                    3320,
                    200,
                )
            })
            .collect();
        reqs[m].events.extend(extra);
    }
    let batches: Vec<_> = reqs
        .chunks(60)
        .map(|c| {
            let ev: Vec<pb::Event> = c.iter().flat_map(|r| r.events.clone()).collect();
            to_batch(&ev, 0, clock, &mut Default::default())
        })
        .collect();
    let burst_risk = |scores: &[tokenwatch::WindowScore], h: i64| {
        scores
            .iter()
            .find(|s| &*s.token == "svc-03" && s.start == a + h * 3_600_000)
            .cloned()
            .unwrap()
    };
    // Without verdicts.
    let cfg = tokenwatch::Config::default();
    let mut control = tokenwatch::Engine::new(cfg.clone(), Default::default());
    let mut plain = Vec::new();
    for b in &batches {
        plain.extend(control.apply(b).unwrap());
    }
    plain.extend(control.finish());
    let third_plain = burst_risk(&plain, 4);
    assert!(third_plain.alert, "{third_plain:?}");

    // With a false-positive verdict after each of the first two bursts.
    let dir = tempfile::tempdir().unwrap();
    let (mut st, rec) = Store::open(dir.path(), &cfg, Default::default()).unwrap();
    let mut live = rec.engine;
    let mut scores = Vec::new();
    let mut given = 0;
    for b in &batches {
        st.append(b).unwrap();
        st.commit().unwrap();
        scores.extend(live.apply(b).unwrap());
        for h in [0, 2] {
            let Some(s) = scores
                .iter()
                .find(|s| &*s.token == "svc-03" && s.start == a + h * 3_600_000)
                .cloned()
            else {
                continue;
            };
            if given > h / 2 {
                continue;
            }
            given += 1;
            let signals: Vec<_> = s.contributions.iter().take(2).map(|c| c.signal).collect();
            let effect = live
                .feedback(
                    "svc-03",
                    (s.start, s.start),
                    Verdict::FalsePositive,
                    &signals,
                )
                .unwrap();
            assert_eq!(effect.learned_windows, 1);
            assert_eq!(effect.damped.is_empty(), h == 0, "{effect:?}");
            let pos = st.pos();
            st.record_feedback(&FeedbackRecord {
                at: "2026-11-23T00:00:00Z".into(),
                pos: (pos.segment, pos.batches),
                alert_id: format!("al-{h}"),
                token_id: "svc-03".into(),
                from_ms: s.start,
                to_ms: s.start,
                verdict: "false_positive".into(),
                signals: signals.iter().map(|k| k.name().to_string()).collect(),
                note: String::new(),
            })
            .unwrap();
        }
    }
    scores.extend(live.close_open());
    assert_eq!(given, 2);
    let third = burst_risk(&scores, 4);
    assert!(
        third.risk < third_plain.risk,
        "damped {} vs {}",
        third.risk,
        third_plain.risk
    );

    // The history plus the feedback log rebuild the same token.
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
    rebuilt.close_open();
    assert_eq!(
        rebuilt.token_state("svc-03").unwrap().feedback,
        live.token_state("svc-03").unwrap().feedback
    );
    assert_ne!(live.token_state("svc-03").unwrap().feedback.damp_mask, 0);
}

/// An https:// webhook, with the receiver's CA configured (`respond.ca-file`), is delivered
/// over TLS and its signature verifies; without that CA the call fails and is
/// dead-lettered. Needs `openssl` for the throwaway certificates (says so and passes without).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_webhook_to_a_configured_ca_is_delivered_and_signed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sh = |args: &str| {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(args)
            .current_dir(d)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    let made = sh("openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 1 -subj /CN=tw-test-ca 2>/dev/null \
        && openssl req -newkey rsa:2048 -nodes -keyout srv.key -out srv.csr -subj /CN=127.0.0.1 2>/dev/null \
        && printf 'subjectAltName=IP:127.0.0.1\\nbasicConstraints=CA:FALSE\\n' > ext.cnf \
        && openssl x509 -req -in srv.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out srv.crt -days 1 -extfile ext.cnf 2>/dev/null");
    if !made {
        eprintln!("SKIPPED: openssl is not available to make test certificates");
        return;
    }
    use rustls_pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls;
    let certs: Vec<_> = rustls_pki_types::CertificateDer::pem_file_iter(d.join("srv.crt"))
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(d.join("srv.key")).unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // (timestamp header, signature header, body) of each call.
    type Call = (String, String, Vec<u8>);
    let got: Arc<Mutex<Vec<Call>>> = Arc::default();
    let log = got.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, log) = (acceptor.clone(), log.clone());
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let head_end = loop {
                    let n = s.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                let header = |name: &str| {
                    head.lines()
                        .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
                        .unwrap_or_default()
                };
                let len: usize = header("content-length:").parse().unwrap_or(0);
                while buf.len() < head_end + len {
                    let n = s.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let body = buf[head_end..head_end + len].to_vec();
                log.lock().unwrap().push((
                    header("x-tokenwatch-timestamp:"),
                    header("x-tokenwatch-signature:"),
                    body,
                ));
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
                let _ = s.shutdown().await;
            });
        }
    });
    const KEY: &str = "tls-hook-signing-key-0001";
    common::write_secret(&d.join("hook.secret"), KEY);
    let policies = format!(
        "[[policy]]\nname = \"tls\"\nmin_risk = 50\ncooldown = \"6h\"\nwebhook = \"https://{addr}/hook\"\nsecret_file = \"{}\"\n",
        d.join("hook.secret").display()
    );
    let data = d.join("data");
    std::fs::create_dir_all(&data).unwrap();
    run_scenario_with(
        &data,
        &policies,
        false,
        Some(d.join("ca.crt").display().to_string()),
    )
    .await;
    let calls = got.lock().unwrap().clone();
    assert!(!calls.is_empty(), "no https call arrived");
    for (ts, sig, body) in &calls {
        assert!(signed(KEY, ts, sig, body), "the signature verifies");
        let json: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(json["policy"], "tls");
    }
    let log = audit(&data);
    assert!(log
        .iter()
        .any(|r| r["what"] == "webhook" && r["result"].as_str().unwrap().starts_with("ok 200")));
    // Without the receiver's CA (the system's roots do not know it) the call is refused.
    let other = d.join("data2");
    std::fs::create_dir_all(&other).unwrap();
    let before = got.lock().unwrap().len();
    run_scenario_with(&other, &policies, false, None).await;
    assert_eq!(
        got.lock().unwrap().len(),
        before,
        "an unverified TLS peer got the call"
    );
    let dead = std::fs::read_to_string(other.join("dead_letter.jsonl")).unwrap_or_default();
    assert!(dead.contains("TLS") || dead.contains("CA"), "{dead}");
}

/// An action queued when the process died is delivered when it starts again: the calls
/// of a decision are in the outbox (fsync'd) before they are queued, and only a finished
/// delivery takes them out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_queued_at_a_crash_is_delivered_after_the_restart() {
    use tokenwatch::respond::actions::{self, Actions, Job};
    use tokenwatch::respond::policy::{Decision, Event};
    let rx = Receiver::start();
    let dir = tempfile::tempdir().unwrap();
    let policies = tokenwatch::respond::policy::parse(
        &format!(
            "[[policy]]\nname = \"page\"\nmode = \"enforce\"\nmin_risk = 50\nwebhook = \"http://{0}/hook\"\nrevoke_url = \"http://{0}/revoke\"\n",
            rx.addr
        ),
        "test",
    )
    .unwrap();
    let mut cfg = tokenwatch::Config::default().respond;
    cfg.backoff = tokenwatch::config::Duration { ms: 10 };
    let (first, pending, bad) = Actions::new(Some(dir.path()), cfg.clone(), false, &policies);
    assert!(pending.is_empty() && bad.is_empty());
    let score = tokenwatch::WindowScore {
        token: "svc-07".into(),
        start: T0,
        events: 40,
        risk: 97.0,
        alert: true,
        learned: false,
        labelled: 0,
        kind: None,
        contributions: Vec::new(),
        confidence: 1.0,
        agents: Default::default(),
    };
    let job = Job {
        decision: Decision {
            event: Event::Fired,
            alert_id: "page-svc-07-1".into(),
            policy: 0,
            score,
            first_window: T0,
            windows: 1,
            max_risk: 97.0,
        },
        policy: Arc::new(policies[0].clone()),
    };
    // Recorded and queued; the process dies before the delivery task ran.
    let (calls, durable) = first.outbox.record(&job);
    durable.unwrap();
    assert!(calls.webhook.is_some() && calls.revoke.is_some());
    drop(first);
    assert!(rx.on("/hook").is_empty());
    // The restart finds it and delivers it: webhook and revocation, in the audit log.
    let (second, pending, bad) = Actions::new(Some(dir.path()), cfg.clone(), false, &policies);
    assert!(bad.is_empty(), "{bad:?}");
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].alert_id, "page-svc-07-1");
    let (tx, queue) = tokio::sync::mpsc::channel(4);
    drop(tx);
    actions::run(queue, Arc::new(second), pending).await;
    let hooks = rx.on("/hook");
    assert_eq!(hooks.len(), 1);
    assert_eq!(hooks[0]["alert_id"], "page-svc-07-1");
    assert_eq!(rx.on("/revoke").len(), 1);
    let results: Vec<String> = audit(dir.path())
        .iter()
        .map(|a| {
            format!(
                "{} {}",
                a["what"].as_str().unwrap(),
                a["result"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(results, ["alert raised", "webhook ok 200", "revoke ok 200"]);
    // Delivered: a third start has nothing left to do.
    let (_, pending, _) = Actions::new(Some(dir.path()), cfg, false, &policies);
    assert!(pending.is_empty());
}
