//! Black-box tests of the command line: generate -> eval, bad input, the demo, and that
//! results do not depend on the number of shards.

use std::path::Path;
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tokenwatch"))
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run tokenwatch");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "tokenwatch failed:\n{text}");
    text
}

fn generate(dir: &Path, format: &str, seed: &str) {
    run_ok(
        bin()
            .args([
                "generate", "--tokens", "40", "--days", "10", "--seed", seed, "--scale", "0.3",
                "--format", format, "--out",
            ])
            .arg(dir),
    );
}

#[test]
fn generate_then_eval_meets_an_honest_floor() {
    let dir = tempfile::tempdir().unwrap();
    generate(dir.path(), "csv", "3");
    let json = dir.path().join("m.json");
    let scores = dir.path().join("scores.csv");
    let text = run_ok(
        bin()
            .arg("eval")
            .arg("--events")
            .arg(dir.path().join("events.csv"))
            .arg("--tokens")
            .arg(dir.path().join("tokens.csv"))
            .arg("--incidents")
            .arg(dir.path().join("incidents.csv"))
            .arg("--scores-out")
            .arg(&scores)
            .arg("--json-out")
            .arg(&json)
            .arg("--alerts-out")
            .arg(dir.path().join("alerts.csv"))
            .arg("--report")
            .arg(dir.path().join("report.html")),
    );
    assert!(text.contains("precision"), "{text}");
    // The HTML report: self-contained (no script, nothing fetched), with its pictures and
    // the same F1 as the summary printed.
    let html = std::fs::read_to_string(dir.path().join("report.html")).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>"));
    for part in [
        "Precision-recall",
        "Recall per incident kind",
        "Detection delay",
        "Worst misses",
        "Noisiest false alerts",
        "<polyline",
    ] {
        assert!(html.contains(part), "{part} missing");
    }
    assert!(!html.contains("<script") && !html.contains(" src=") && !html.contains("href="));
    let f1_line = text
        .lines()
        .find(|l| l.contains("F1 "))
        .expect("F1 in the summary");
    let f1_text = f1_line
        .split("F1 ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    assert!(
        html.contains(&format!("<td>window F1</td><td>{f1_text}</td>")),
        "F1 {f1_text} not in the report"
    );
    // The alerts, with the verdicts the labels give, replay as an operator's feedback.
    let alerts = std::fs::read_to_string(dir.path().join("alerts.csv")).unwrap();
    assert!(alerts.starts_with("token_id,window_start,last_window_start,verdict\n"));
    let n_alerts = alerts.lines().count() - 1;
    assert!(n_alerts > 10, "{alerts}");
    let again = run_ok(
        bin()
            .arg("eval")
            .arg("--events")
            .arg(dir.path().join("events.csv"))
            .arg("--tokens")
            .arg(dir.path().join("tokens.csv"))
            .arg("--incidents")
            .arg(dir.path().join("incidents.csv"))
            .arg("--feedback")
            .arg(dir.path().join("alerts.csv")),
    );
    let replayed: usize = again
        .lines()
        .find_map(|l| l.trim().strip_prefix("operator verdicts replayed: "))
        .expect(&again)
        .parse()
        .unwrap();
    assert!(
        replayed * 2 >= n_alerts,
        "{replayed} of {n_alerts}\n{again}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let m = &v["metrics"];
    let f1 = m["f1"].as_f64().unwrap();
    let detected = m["incidents_detected"].as_f64().unwrap() / m["incidents"].as_f64().unwrap();
    let fa = m["false_alerts_per_1k_token_days"].as_f64().unwrap();
    // Floors well below what the README reports, so that a real regression fails and
    // noise of a small sample does not.
    assert!(f1 >= 0.8, "F1 {f1}\n{text}");
    assert!(detected >= 0.8, "incident recall {detected}\n{text}");
    assert!(fa <= 15.0, "false alerts per 1k token-days {fa}\n{text}");
    // The scores file follows the contract.
    let head = std::fs::read_to_string(&scores).unwrap();
    let header = head.lines().next().unwrap();
    assert!(
        header.starts_with("token_id,window_start,risk,alert,top_signal"),
        "{header}"
    );
    assert!(header.ends_with(",confidence,reasons"), "{header}");
    assert!(head.lines().count() > 1000);
    // An alerting window says why in words, its top signal first.
    let alerting = head
        .lines()
        .skip(1)
        .find(|l| l.split(',').nth(3) == Some("1"))
        .expect("an alerting window");
    let top = alerting.split(',').nth(4).unwrap();
    assert!(alerting.contains(&format!("{top}: ")), "{alerting}");
}

#[test]
fn results_do_not_depend_on_shards() {
    let dir = tempfile::tempdir().unwrap();
    generate(dir.path(), "jsonl", "5");
    let mut outs = Vec::new();
    for shards in ["1", "2", "3"] {
        let scores = dir.path().join(format!("s{shards}.csv"));
        let text = run_ok(
            bin()
                .arg("replay")
                .arg("--events")
                .arg(dir.path().join("events.jsonl"))
                .arg("--tokens")
                .arg(dir.path().join("tokens.csv"))
                .args(["--shards", shards, "--scores-out"])
                .arg(&scores),
        );
        assert!(text.contains("riskiest tokens:"), "{text}");
        let scored = std::fs::read_to_string(&scores).unwrap();
        assert!(
            scored.contains(",replay,"),
            "replay windows are marked as such"
        );
        outs.push(scored);
    }
    assert!(outs[0].lines().count() > 1000);
    assert_eq!(outs[0], outs[1], "1 vs 2 shards differ");
    assert_eq!(outs[0], outs[2], "1 vs 3 shards differ");
}

const HEADER: &str = "ts,token_id,method,endpoint,status,bytes_out,latency_ms,src_ip,country,asn,user_agent,scope,env,label,kind,extra\n";

#[test]
fn bad_rows_are_named_and_the_rest_kept() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("e.csv");
    let mut text = String::from(HEADER);
    text.push_str("2026-03-02T10:00:00Z,t1,GET,/v1/a,200,10,5.0,10.0.0.1,DE,3320,ua,s,prod,,,x\n");
    text.push_str("2026-03-02T10:00:01Z,t1,GET,/v1/a,999,10,5.0,10.0.0.1,DE,3320,ua,s,prod,,,x\n");
    text.push_str("2026-03-02T10:00:02Z,,GET,/v1/a,200,10,5.0,10.0.0.1,DE,3320,ua,s,prod,,,x\n");
    text.push_str("2026-03-02T10:00:03Z,t2,GET,/v1/a,200,10,5.0,300.1.1.1,DE,3320,ua,s,prod,,,x\n");
    text.push_str("yesterday,t2,GET,/v1/a,200,10,5.0,10.0.0.1,DE,3320,ua,s,prod,,,x\n");
    text.push_str("1772445603000,t2,POST,/v1/b,201,0,,2001:db8::1,,,,,,,,x\n");
    std::fs::write(&p, text).unwrap();
    let out = run_ok(bin().arg("replay").arg("--events").arg(&p));
    assert!(
        out.contains("2 windows") || out.contains("replayed 2 events"),
        "{out}"
    );
    assert!(out.contains("4 bad rows skipped"), "{out}");
    assert!(
        out.contains("row 2, column `status`: 999 is not an HTTP status"),
        "{out}"
    );
    assert!(out.contains("row 3, column `token_id`"), "{out}");
    assert!(out.contains("row 4, column `src_ip`"), "{out}");
    assert!(out.contains("row 5, column `ts`"), "{out}");
    // --on-bad-row fail stops with the first error, naming file, row and column.
    let fail = bin()
        .args(["replay", "--on-bad-row", "fail", "--events"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(!fail.status.success());
    let err = String::from_utf8_lossy(&fail.stderr);
    assert!(err.contains("e.csv: row 2, column `status`"), "{err}");
}

#[test]
fn json_lines_with_a_broken_line_keep_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("e.jsonl");
    let good = r#"{"ts":"2026-03-02T10:00:00Z","token_id":"t1","method":"GET","endpoint":"/v1/a","status":200,"bytes_out":10,"src_ip":"10.0.0.1","asn":3320}"#;
    let text = format!(
        "{good}\n{{\"ts\": oops\n\n{}\n",
        good.replace("\"status\":200", "\"status\":\"abc\"")
    );
    std::fs::write(&p, format!("{text}{good}\n")).unwrap();
    let out = run_ok(bin().arg("replay").arg("--events").arg(&p));
    assert!(out.contains("replayed 2 events"), "{out}");
    assert!(
        out.contains("row 2, column `-`: line is not a valid JSON object"),
        "{out}"
    );
    assert!(out.contains("row 4, column `status`"), "{out}");
}

/// Replay a file with this content; it must fail, and its stderr is returned.
fn replay_fails(dir: &Path, name: &str, content: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    let o = bin()
        .arg("replay")
        .arg("--events")
        .arg(&p)
        .output()
        .unwrap();
    assert!(!o.status.success(), "{name} was accepted");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn unknown_extension_and_missing_column_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let err = replay_fails(dir.path(), "e.txt", "x");
    assert!(err.contains("unknown file type"), "{err}");
    let err = replay_fails(dir.path(), "e.csv", "ts,token_id\n1,t\n");
    assert!(err.contains("required column `method` is missing"), "{err}");
}

#[test]
fn demo_prints_riskiest_tokens_and_the_summary() {
    let out = run_ok(bin().arg("demo").current_dir(env!("CARGO_MANIFEST_DIR")));
    assert!(out.contains("riskiest tokens"), "{out}");
    assert!(out.contains("F1"), "{out}");
    assert!(out.contains("ALERT"), "{out}");
}
