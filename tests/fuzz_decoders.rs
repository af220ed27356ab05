//! Seeded mutation fuzzing of the decoders: whatever the bytes, reading never panics, and
//! the valid rows of a damaged file are still returned.

use rand::{Rng, SeedableRng};
use tokenwatch::ingest::{read_events, read_registry, BadRowPolicy};

const CSV: &str = "ts,token_id,method,endpoint,status,bytes_out,latency_ms,src_ip,country,asn,user_agent,scope,env,label,kind
2026-03-02T10:00:00Z,t1,GET,/v1/a,200,10,5.0,10.0.0.1,DE,3320,ua,s,prod,0,
2026-03-02T10:00:01Z,t2,POST,/v1/b,201,99,1.5,2001:db8::1,US,7922,\"ua, with comma\",s,staging,1,rate_abuse
1772445603000,t3,DELETE,/v1/c,404,0,,192.0.2.9,,,,,,,
";

const JSONL: &str = r#"{"ts":"2026-03-02T10:00:00Z","token_id":"t1","method":"GET","endpoint":"/v1/a","status":200,"bytes_out":10,"src_ip":"10.0.0.1","asn":3320,"label":0}
{"ts":1772445603000,"token_id":"t2","method":"POST","endpoint":"/v1/b","status":"201","bytes_out":"5","src_ip":"2001:db8::1","country":"us"}
"#;

fn mutate(rng: &mut rand::rngs::StdRng, base: &[u8]) -> Vec<u8> {
    let mut v = base.to_vec();
    for _ in 0..rng.gen_range(1..8) {
        if v.is_empty() {
            break;
        }
        let i = rng.gen_range(0..v.len());
        match rng.gen_range(0..4) {
            0 => v[i] = rng.gen(),
            1 => {
                v.remove(i);
            }
            2 => {
                let noise = b",\"{}\n:0-9";
                v.insert(i, noise[rng.gen_range(0..noise.len())])
            }

            _ => v.truncate(i),
        }
    }
    v
}

#[test]
fn mutated_files_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    for round in 0..300 {
        for (name, base) in [
            ("e.csv", CSV),
            ("e.jsonl", JSONL),
            (
                "r.csv",
                "token_id,scopes,created_at\nt1,a b,2026-01-01T00:00:00Z\n",
            ),
        ] {
            let p = dir.path().join(format!("{round}-{name}"));
            std::fs::write(&p, mutate(&mut rng, base.as_bytes())).unwrap();
            let _ = read_events(&p, BadRowPolicy::Skip);
            let _ = read_events(&p, BadRowPolicy::Fail);
            let _ = read_registry(&p, BadRowPolicy::Skip);
        }
    }
    // Raw garbage as Parquet and gzip.
    for round in 0..50 {
        let bytes: Vec<u8> = (0..rng.gen_range(0..4096)).map(|_| rng.gen()).collect();
        for name in ["g.parquet", "g.csv.gz", "g.jsonl.gz"] {
            let p = dir.path().join(format!("{round}-{name}"));
            std::fs::write(&p, &bytes).unwrap();
            let _ = read_events(&p, BadRowPolicy::Skip);
        }
    }
}

#[test]
fn clean_samples_read_fully() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("e.csv");
    std::fs::write(&p, CSV).unwrap();
    let (b, rep) = read_events(&p, BadRowPolicy::Fail).unwrap();
    assert_eq!(
        b.iter().map(|b| b.num_rows()).sum::<usize>(),
        3,
        "{}",
        rep.summary()
    );
    let p = dir.path().join("e.jsonl");
    std::fs::write(&p, JSONL).unwrap();
    let (b, rep) = read_events(&p, BadRowPolicy::Fail).unwrap();
    assert_eq!(
        b.iter().map(|b| b.num_rows()).sum::<usize>(),
        2,
        "{}",
        rep.summary()
    );
    let gz = dir.path().join("e.jsonl.gz");
    let mut enc = flate2::write::GzEncoder::new(
        std::fs::File::create(&gz).unwrap(),
        flate2::Compression::fast(),
    );
    std::io::Write::write_all(&mut enc, JSONL.as_bytes()).unwrap();
    enc.finish().unwrap();
    let (b, _) = read_events(&gz, BadRowPolicy::Fail).unwrap();
    assert_eq!(b.iter().map(|b| b.num_rows()).sum::<usize>(), 2);
}

/// An engine that has seen four days of a few tokens: refits ran, so the snapshot holds
/// every part (peer groups, isolation forest, rarity, priors, open windows).
fn trained() -> (tokenwatch::Engine, Vec<arrow::record_batch::RecordBatch>) {
    use tokenwatch::server::convert::{to_batch, Clock};
    use tokenwatch::server::pb;
    let clock = Clock {
        now_ms: i64::MAX / 4,
        max_future_skew_ms: 0,
    };
    let t0 = 1_772_409_600_000i64;
    let mut batches = Vec::new();
    for day in 0..4 {
        let events: Vec<pb::Event> = (0..24 * 60)
            .flat_map(|m| (0..4).map(move |t| (m, t)))
            .filter(|(m, t)| (m + t) % 7 == 0)
            .map(|(m, t)| pb::Event {
                ts_ms: t0 + day * 86_400_000 + m * 60_000 + t * 1_000,
                token_id: format!("f{t}"),
                method: "GET".into(),
                endpoint: format!("/v1/{}", m % 3),
                status: 200,
                bytes_out: 100,
                latency_ms: Some(3.0),
                src_ip: format!("10.0.{t}.1"),
                country: "SE".into(),
                asn: Some(3301),
                user_agent: "x/1".into(),
                ..Default::default()
            })
            .collect();
        batches.push(to_batch(&events, 0, clock, &mut Default::default()));
    }
    let mut e = tokenwatch::Engine::new(tokenwatch::Config::default(), Default::default());
    for b in &batches {
        e.apply(b).unwrap();
    }
    (e, batches)
}

#[test]
fn mutated_snapshots_and_logs_never_panic() {
    use tokenwatch::store::{snapshot, wal, LogPos};
    let (engine, batches) = trained();
    let snap = engine.snapshot();
    assert!(engine.stats().refits > 0);
    let cfg = tokenwatch::Config::default();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for _ in 0..400 {
        let mut s = snap.clone();
        match rng.gen_range(0..3) {
            0 => s.header = mutate(&mut rng, &s.header),
            1 => {
                let i = rng.gen_range(0..s.tokens.len());
                s.tokens[i].state = mutate(&mut rng, &s.tokens[i].state);
            }
            _ => {
                let i = rng.gen_range(0..s.tokens.len());
                s.tokens[i].open = mutate(&mut rng, &s.tokens[i].open);
            }
        }
        let _ = tokenwatch::Engine::restore(cfg.clone(), Default::default(), &s);
    }
    // Files: a snapshot and a log segment, damaged.
    let dir = tempfile::tempdir().unwrap();
    let path = snapshot::write(dir.path(), &snap, LogPos::default()).unwrap();
    let good = std::fs::read(&path).unwrap();
    let mut w = wal::Wal::open(&dir.path().join("wal"), u64::MAX, false).unwrap();
    for b in &batches {
        w.append(b).unwrap();
    }
    w.seal().unwrap();
    let seg = wal::segment_path(&dir.path().join("wal"), 1);
    let log = std::fs::read(&seg).unwrap();
    for round in 0..150 {
        let p = dir.path().join(format!("snap-{round}.parquet"));
        std::fs::write(&p, mutate(&mut rng, &good)).unwrap();
        if let Ok((s, _)) = snapshot::read(&p) {
            let _ = tokenwatch::Engine::restore(cfg.clone(), Default::default(), &s);
        }
        let q = dir.path().join(format!("{round}.arrows"));
        std::fs::write(&q, mutate(&mut rng, &log)).unwrap();
        let _ = wal::read_segment(&q);
    }
}
