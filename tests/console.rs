//! The web console, black-box: `serve --http` with a generated data set ingested over gRPC,
//! then its pages as scripts read them (JSON, plain HTTP) and as people see them (headless
//! Chromium through chromedriver, when installed: `.ci/run` installs it), and the
//! `tokenwatch scopes` command on the same history.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use arrow::array::{Array, AsArray};
use arrow::datatypes::{Float32Type, TimestampMillisecondType, UInt16Type, UInt32Type, UInt64Type};
use common::http::{form_value, request, Resp};
use tokenwatch::event::col;
use tokenwatch::server::pb;
use tonic::transport::Channel;

const INGEST: &str = "ingest-console-test-key-00000001";
const READ: &str = "read-console-test-key-000000000002";
const ADMIN: &str = "admin-console-test-key-0000000003";

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tokenwatch"))
}

/// A generated data set: events (as proto events) and its registry.
fn generate(dir: &Path) -> (Vec<pb::Event>, PathBuf) {
    let out = dir.join("gen");
    let st = bin()
        .args(["generate", "--tokens", "40", "--days", "8", "--seed", "5"])
        .args(["--scale", "0.3", "--out"])
        .arg(&out)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let (batches, _) = tokenwatch::ingest::read_events(
        &out.join("events.parquet"),
        tokenwatch::ingest::BadRowPolicy::Skip,
    )
    .unwrap();
    let mut events = Vec::new();
    for b in &batches {
        let ts = b.column(col::TS).as_primitive::<TimestampMillisecondType>();
        let s = |c: usize| b.column(c).as_string::<i32>();
        let (tok, method, ep, ip) = (
            s(col::TOKEN_ID),
            s(col::METHOD),
            s(col::ENDPOINT),
            s(col::SRC_IP),
        );
        let (country, ua, scope, env) = (
            s(col::COUNTRY),
            s(col::USER_AGENT),
            s(col::SCOPE),
            s(col::ENV),
        );
        let status = b.column(col::STATUS).as_primitive::<UInt16Type>();
        let bytes = b.column(col::BYTES_OUT).as_primitive::<UInt64Type>();
        let lat = b.column(col::LATENCY_MS).as_primitive::<Float32Type>();
        let asn = b.column(col::ASN).as_primitive::<UInt32Type>();
        let opt = |a: &arrow::array::StringArray, i: usize| {
            if a.is_valid(i) {
                a.value(i).to_string()
            } else {
                String::new()
            }
        };
        for i in 0..b.num_rows() {
            events.push(pb::Event {
                ts_ms: ts.value(i),
                token_id: tok.value(i).into(),
                method: method.value(i).into(),
                endpoint: ep.value(i).into(),
                status: status.value(i) as u32,
                bytes_out: bytes.value(i),
                latency_ms: lat.is_valid(i).then(|| lat.value(i) as f64),
                src_ip: ip.value(i).into(),
                country: opt(country, i),
                asn: asn.is_valid(i).then(|| asn.value(i)),
                user_agent: opt(ua, i),
                scope: opt(scope, i),
                env: opt(env, i),
                event_id: String::new(),
            });
        }
    }
    (events, out.join("tokens.csv"))
}

struct Server {
    child: Child,
    grpc: String,
    http: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(dir: &Path, tokens: &Path) -> Server {
    let keys = dir.join("keys");
    common::write_secret(
        &keys,
        &format!("ingest {INGEST}\nread {READ}\nadmin {ADMIN}\n"),
    );
    let mut child = bin()
        .args(["serve", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .arg("--keys")
        .arg(&keys)
        .arg("--tokens")
        .arg(tokens)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let (mut http, mut grpc) = (String::new(), String::new());
    for _ in 0..2 {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        if let Some(a) = line.trim().strip_prefix("console on http://") {
            http = a.trim_end_matches('/').to_string();
        } else if let Some(a) = line.trim().strip_prefix("listening on ") {
            grpc = a.to_string();
        }
    }
    assert!(!http.is_empty() && !grpc.is_empty(), "{http} {grpc}");
    // Keep reading stdout so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in out.lines() {});
    Server { child, grpc, http }
}

async fn client(
    addr: &str,
    key: &'static str,
) -> pb::token_watch_client::TokenWatchClient<
    tonic::service::interceptor::InterceptedService<Channel, tokenwatch::loadgen::Bearer>,
> {
    let ch = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    pb::token_watch_client::TokenWatchClient::with_interceptor(
        ch,
        tokenwatch::loadgen::Bearer::new(Some(key)).unwrap(),
    )
}

/// The session cookie a login sets.
fn login(http: &str, key: &str) -> String {
    let r = request(
        http,
        "POST",
        "/login",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        &format!("key={}", form_value(key)),
    );
    assert_eq!(r.status, 303, "{}", r.body);
    let c = r.header("set-cookie").expect("a session cookie");
    assert!(
        c.contains("HttpOnly") && c.contains("SameSite=Strict"),
        "{c}"
    );
    c.split(';').next().unwrap().to_string()
}

fn get(http: &str, path: &str, cookie: &str) -> Resp {
    request(http, "GET", path, &[("Cookie", cookie)], "")
}

/// The CSRF token a page's forms carry.
fn csrf_of(page: &str) -> String {
    let at = page.find("name=\"csrf\" value=\"").expect("a CSRF field") + 19;
    page[at..].split('"').next().unwrap().to_string()
}

fn post_verdict(http: &str, cookie: &str, alert: &str, body: &str) -> Resp {
    request(
        http,
        "POST",
        &format!("/alerts/{}/verdict", form_value(alert)),
        &[
            ("Cookie", cookie),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        body,
    )
}

/// Unused granted scopes per registered token, computed here from the generated events and
/// registry: a scope is used by a successful call that needed it (the data spans 8 days,
/// inside the 30 looked at).
fn expected_unused(events: &[pb::Event], tokens: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut used: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for e in events {
        if e.status < 400 && !e.scope.is_empty() {
            used.entry(&e.token_id).or_default().insert(&e.scope);
        }
    }
    let text = std::fs::read_to_string(tokens).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let at = |n: &str| header.iter().position(|h| *h == n).unwrap();
    let (ti, si) = (at("token_id"), at("scopes"));
    let mut out = BTreeMap::new();
    for l in lines {
        let f: Vec<&str> = l.split(',').collect();
        let granted: BTreeSet<String> = f[si]
            .split([' ', ';', '|'])
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        let u = used.get(f[ti]).cloned().unwrap_or_default();
        let unused = granted
            .into_iter()
            .filter(|g| !u.contains(g.as_str()))
            .collect();
        out.insert(f[ti].to_string(), unused);
    }
    out
}

fn unused_of(tokens: &serde_json::Value) -> BTreeMap<String, BTreeSet<String>> {
    tokens
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["registered"].as_bool().unwrap_or(true))
        .map(|t| {
            (
                t["token_id"].as_str().unwrap().to_string(),
                t["unused"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| s.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn console_pages_login_verdicts_and_least_privilege() {
    let dir = tempfile::tempdir().unwrap();
    let (events, tokens) = generate(dir.path());
    assert!(events.len() > 10_000, "{} events", events.len());
    let t_start = Instant::now();
    let srv = serve(dir.path(), &tokens);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut bodies: Vec<String> = Vec::new();

    // Ingest the data set, then wait until every window has closed (idle close).
    let (accepted, risky, alerts_before) = rt.block_on(async {
        let mut c = client(&srv.grpc, INGEST).await;
        let reqs: Vec<pb::IngestRequest> = events
            .chunks(5000)
            .map(|c| pb::IngestRequest { events: c.to_vec() })
            .collect();
        let r = c
            .ingest(tokio_stream::iter(reqs))
            .await
            .unwrap()
            .into_inner();
        let mut read = client(&srv.grpc, READ).await;
        let t0 = Instant::now();
        let mut last = (u64::MAX, 0);
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let s = read
                .get_stats(pb::GetStatsRequest {})
                .await
                .unwrap()
                .into_inner();
            if s.windows == last.0 {
                last.1 += 1;
            } else {
                last = (s.windows, 0);
            }
            if t0.elapsed() > Duration::from_secs(13) && last.1 >= 3 {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "windows never settled"
            );
        }
        let mut admin = client(&srv.grpc, ADMIN).await;
        // A snapshot compacts the log into the Parquet history the scope report reads.
        admin.snapshot(pb::SnapshotRequest {}).await.unwrap();
        let risky = read
            .list_risky_tokens(pb::ListRiskyTokensRequest {
                limit: 50,
                min_risk: 0.0,
            })
            .await
            .unwrap()
            .into_inner()
            .tokens;
        let s = read
            .get_stats(pb::GetStatsRequest {})
            .await
            .unwrap()
            .into_inner();
        (r.accepted, risky, s.labelled)
    });
    assert_eq!(accepted as usize, events.len());
    assert_eq!(alerts_before, 0);
    eprintln!(
        "ingested and settled in {:.1} s",
        t_start.elapsed().as_secs_f64()
    );
    let http = srv.http.as_str();

    // Without a session: the login page (HTML) or 401 (JSON); an ingest key may not log in.
    let r = request(http, "GET", "/", &[], "");
    assert_eq!(r.status, 303);
    assert_eq!(r.header("location"), Some("/login"));
    assert_eq!(
        request(http, "GET", "/tokens?format=json", &[], "").status,
        401
    );
    let r = request(http, "GET", "/login", &[], "");
    assert!(r.status == 200 && r.body.contains("type=\"password\""));
    assert!(r
        .header("content-security-policy")
        .is_some_and(|c| c.contains("default-src 'none'")));
    let bad = request(
        http,
        "POST",
        "/login",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        "key=not-a-key-at-all-00000000000",
    );
    assert_eq!(bad.status, 401);
    assert!(bad.header("set-cookie").is_none() && !bad.body.contains("not-a-key-at-all"));
    let ing = request(
        http,
        "POST",
        "/login",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        &format!("key={INGEST}"),
    );
    assert_eq!(ing.status, 403);
    let r = request(
        http,
        "POST",
        "/login",
        &[
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("Origin", "http://evil.example"),
        ],
        &format!("key={READ}"),
    );
    assert_eq!(r.status, 403, "a cross-site login must be refused");
    let r = request(
        http,
        "POST",
        "/login",
        &[
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("Origin", "null"),
            ("Sec-Fetch-Site", "cross-site"),
        ],
        &format!("key={READ}"),
    );
    assert_eq!(r.status, 403, "a cross-site login must be refused");

    // A read session: the risky tokens are ListRiskyTokens' list.
    let reader = login(http, READ);
    let r = get(http, "/tokens?format=json", &reader);
    assert_eq!(r.status, 200, "{}", r.body);
    bodies.push(r.body.clone());
    let page: Vec<String> = r.json()["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["token_id"].as_str().unwrap().to_string())
        .collect();
    let rpc: Vec<String> = risky.iter().map(|t| t.token_id.clone()).collect();
    assert_eq!(page, rpc);
    assert!(risky[0].risk > 0.0);
    // Bearer works for scripts too, and HTML has the same rows.
    let auth = format!("Bearer {READ}");
    let html = request(http, "GET", "/tokens", &[("Authorization", &auth)], "");
    assert_eq!(html.status, 200);
    assert!(html.body.contains(&format!(">{}</a>", rpc[0])));
    bodies.push(html.body.clone());
    // A filter by signal keeps only tokens with that signal on top.
    let sig = risky[0].contributions[0].signal.clone();
    let f = get(http, &format!("/tokens?format=json&signal={sig}"), &reader).json();
    let f = f["tokens"].as_array().unwrap();
    assert!(!f.is_empty());
    assert!(f.iter().all(|t| t["top"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["signal"] == sig.as_str())));

    // The riskiest token's page: its chart, the window's reasons, its baseline.
    let top = &rpc[0];
    let t = get(
        http,
        &format!("/tokens/{}?format=json", form_value(top)),
        &reader,
    );
    assert_eq!(t.status, 200, "{}", t.body);
    bodies.push(t.body.clone());
    let tj = t.json();
    assert!(tj["timeline"].as_array().unwrap().len() > 10);
    let reasons = tj["window"]["contributions"].as_array().unwrap();
    assert!(!reasons.is_empty() && !reasons[0]["reason"].as_str().unwrap().is_empty());
    assert_eq!(
        tj["baseline"]["hour_of_week"].as_array().unwrap().len(),
        168
    );
    assert!(!tj["baseline"]["countries"].as_array().unwrap().is_empty());
    let agents = tj["baseline"]["user_agents"].as_array().unwrap();
    assert!(!agents.is_empty(), "{tj}");
    assert!(!agents[0]["name"].as_str().unwrap().starts_with("agent #"));
    assert!(tj["registry"]["owner"].is_string());
    let th = get(http, &format!("/tokens/{}", form_value(top)), &reader);
    assert!(th.body.contains("id=\"risk-chart\"") && th.body.contains("<svg"));
    assert!(th.body.contains("id=\"heat-map\"") && th.body.contains("id=\"reasons\""));
    assert!(th.body.contains("id=\"user-agents\""));
    bodies.push(th.body.clone());
    let ov = get(http, "/?format=json", &reader).json();
    assert!(ov["windows"].as_u64().unwrap() > 0 && ov["tokens_tracked"].as_u64().unwrap() > 0);
    assert!(!ov["alerts_by_hour"].as_array().unwrap().is_empty());
    let ovh = get(http, "/", &reader);
    assert!(ovh.body.contains("<svg"));
    bodies.push(ovh.body);

    // Alerts: a read key sees them but may not give a verdict, even with its CSRF token.
    let al = get(http, "/alerts?format=json", &reader).json();
    let first = al["alerts"][0]["alert_id"]
        .as_str()
        .expect("the generated incidents raised alerts")
        .to_string();
    let alerts_html = get(http, "/alerts", &reader).body;
    let csrf = csrf_of(&alerts_html);
    let r = post_verdict(
        http,
        &reader,
        &first,
        &format!("csrf={csrf}&verdict=false_positive"),
    );
    assert_eq!(r.status, 403, "{}", r.body);

    // An admin session: no CSRF token, no verdict; with it, the verdict lands.
    let admin = login(http, ADMIN);
    let r = post_verdict(http, &admin, &first, "verdict=false_positive");
    assert_eq!(
        r.status, 403,
        "a POST without the CSRF token must be refused"
    );
    let r = post_verdict(
        http,
        &admin,
        &first,
        &format!("csrf={csrf}&verdict=false_positive"),
    );
    assert_eq!(
        r.status, 403,
        "another session's CSRF token must be refused"
    );
    let acsrf = csrf_of(&get(http, "/alerts", &admin).body);
    let r = post_verdict(
        http,
        &admin,
        &first,
        &format!("csrf={acsrf}&verdict=false_positive&note=known+job"),
    );
    assert_eq!(r.status, 303, "{}", r.body);
    let labelled = rt.block_on(async {
        let mut read = client(&srv.grpc, READ).await;
        read.get_stats(pb::GetStatsRequest {})
            .await
            .unwrap()
            .into_inner()
    });
    assert_eq!(labelled.labelled, 1);
    let al = get(http, "/alerts?format=json", &admin).json();
    let a = al["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["alert_id"] == first.as_str())
        .unwrap()
        .clone();
    assert_eq!(a["verdict"], "false_positive");
    assert!(a["audit"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["what"] == "feedback" && e["why"] == "false_positive"));
    let audit = std::fs::read_to_string(dir.path().join("data/audit.jsonl")).unwrap();
    assert!(audit
        .lines()
        .any(|l| l.contains(&first) && l.contains("\"feedback\"")));

    // Least privilege: what the history says, from the page and from GetScopeUsage.
    let sc = get(http, "/scopes?format=json&offset=0", &reader);
    assert_eq!(sc.status, 200, "{}", sc.body);
    let sj = sc.json();
    let expected = expected_unused(&events, &tokens);
    let want_unused: usize = expected.values().map(|s| s.len()).sum();
    assert!(want_unused > 0, "the generated registry has unused grants");
    assert_eq!(sj["unused_total"].as_u64().unwrap() as usize, want_unused);
    assert!(sj["unused_total"].as_u64() < sj["granted_total"].as_u64());
    let all_pages = rt.block_on(async {
        let mut read = client(&srv.grpc, READ).await;
        read.get_scope_usage(pb::GetScopeUsageRequest {
            token_id: String::new(),
            days: 30,
            limit: 10_000,
            offset: 0,
        })
        .await
        .unwrap()
        .into_inner()
    });
    let rpc_unused: BTreeMap<String, BTreeSet<String>> = all_pages
        .tokens
        .iter()
        .filter(|t| t.registered)
        .map(|t| (t.token_id.clone(), t.unused.iter().cloned().collect()))
        .collect();
    assert_eq!(rpc_unused, expected);
    bodies.push(get(http, "/scopes", &reader).body);

    eprintln!("pages checked at {:.1} s", t_start.elapsed().as_secs_f64());
    if let Some(b) = common::webdriver::Browser::start() {
        let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
        let base = format!("http://{http}");
        b.goto(&format!("{base}/tokens"));
        b.wait_url(|u| u.ends_with("/login"));
        let k = b.find("#key");
        b.type_into(&k, READ);
        b.click(&b.find("#submit"));
        b.wait_url(|u| !u.ends_with("/login"));
        b.goto(&format!("{base}/tokens"));
        let links = b.find_all("#risky a.token");
        assert!(!links.is_empty(), "no token rows:\n{}", b.source());
        let shown: Vec<String> = links.iter().take(10).map(|l| b.text(l)).collect();
        assert_eq!(shown, rpc[..shown.len()].to_vec());
        b.screenshot(&shots.join("risky-tokens.png"));
        b.click(&links[0]);
        b.wait_url(|u| u.contains(&format!("/tokens/{}", form_value(top))));
        b.find("#risk-chart svg");
        let reason = b.text(&b.find("#reasons td.reason"));
        assert!(!reason.is_empty());
        b.screenshot(&shots.join("token.png"));
        // A read session sees no verdict buttons.
        b.goto(&format!("{base}/alerts"));
        assert!(b.find_all("form.verdict button").is_empty());
        b.click(&b.find("nav form button"));
        b.wait_url(|u| u.ends_with("/login"));
        b.type_into(&b.find("#key"), ADMIN);
        b.click(&b.find("#submit"));
        b.wait_url(|u| !u.ends_with("/login"));
        b.goto(&format!("{base}/alerts"));
        b.screenshot(&shots.join("alerts.png"));
        // The second alert (the first has its verdict): false positive from the page.
        let rows = b.find_all("tr.alert");
        let row = rows
            .iter()
            .find(|r| b.attr(r, "data-alert").as_deref() != Some(first.as_str()))
            .expect("a second alert")
            .clone();
        let second = b.attr(&row, "data-alert").unwrap();
        let button = b
            .find_all(&format!(
                "tr.alert[data-alert=\"{second}\"] button[value=\"false_positive\"]"
            ))
            .into_iter()
            .next()
            .expect("a false-positive button");
        b.click(&button);
        b.wait_url(|u| u.ends_with("/alerts"));
        let stats = rt.block_on(async {
            let mut read = client(&srv.grpc, READ).await;
            read.get_stats(pb::GetStatsRequest {})
                .await
                .unwrap()
                .into_inner()
        });
        assert_eq!(stats.labelled, 2, "the browser's verdict reached GetStats");
        let audit = std::fs::read_to_string(dir.path().join("data/audit.jsonl")).unwrap();
        assert!(audit
            .lines()
            .any(|l| l.contains(&second) && l.contains("\"feedback\"")));
        eprintln!(
            "browser done at {:.1} s; screenshots in {}",
            t_start.elapsed().as_secs_f64(),
            shots.display()
        );
    } else {
        assert!(
            std::env::var_os("TOKENWATCH_REQUIRE_BROWSER").is_none(),
            "TOKENWATCH_REQUIRE_BROWSER is set but {} or {} is missing",
            common::webdriver::CHROMEDRIVER,
            common::webdriver::CHROMIUM
        );
        eprintln!(
            "SKIPPED the browser part: {} not installed",
            common::webdriver::CHROMEDRIVER
        );
    }

    for b in &bodies {
        for k in [INGEST, READ, ADMIN] {
            assert!(!b.contains(k), "a key reached a page");
        }
    }

    // `tokenwatch scopes` on the same history says the same.
    drop(srv);
    let out = bin()
        .args(["scopes", "--format", "json", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--tokens")
        .arg(&tokens)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(unused_of(&cli["tokens"]), expected);
    let table = bin()
        .args(["scopes", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--tokens")
        .arg(&tokens)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains(&format!("{want_unused} of ")),
        "the table's summary: {text}"
    );
}
