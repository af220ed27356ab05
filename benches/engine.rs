//! Criterion benchmarks of the pure core, on seeded generated data (I/O kept outside the
//! measured loops): whole-engine replay throughput, validation, and one window's scoring.
//!
//! cargo bench --bench engine

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tokenwatch::config::Config;
use tokenwatch::engine::Engine;
use tokenwatch::ingest::{read_events, BadRowPolicy};
use tokenwatch::model::registry::Registry;

fn sample() -> (Vec<arrow::record_batch::RecordBatch>, Registry, usize) {
    let dir = std::env::temp_dir().join("tokenwatch-bench-sample");
    if !dir.join("events.parquet").exists() {
        let mut o = tokenwatch::generate::Options::new(dir.clone());
        o.tokens = 100;
        o.days = 5;
        o.seed = 11;
        tokenwatch::generate::run(&o).expect("generate");
    }
    let (batches, _) = read_events(&dir.join("events.parquet"), BadRowPolicy::Fail).unwrap();
    let (reg, _) =
        tokenwatch::ingest::read_registry(&dir.join("tokens.csv"), BadRowPolicy::Fail).unwrap();
    let n = batches.iter().map(|b| b.num_rows()).sum();
    (batches, reg, n)
}

fn engine(c: &mut Criterion) {
    let (batches, reg, n) = sample();
    let mut g = c.benchmark_group("engine");
    g.sample_size(10);
    g.throughput(Throughput::Elements(n as u64));
    for shards in [1usize, 2] {
        g.bench_function(format!("replay_{n}_events_{shards}_shards"), |b| {
            b.iter(|| {
                let mut cfg = Config::default();
                cfg.engine.shards = shards;
                let mut e = Engine::new(cfg, reg.clone());
                let mut windows = 0usize;
                for batch in &batches {
                    windows += e.apply(batch).unwrap().len();
                }
                windows += e.finish().len();
                black_box(windows)
            })
        });
    }
    g.finish();
}

fn validate(c: &mut Criterion) {
    let (batches, _, _) = sample();
    let raw = &batches[0];
    let mut g = c.benchmark_group("ingest");
    g.throughput(Throughput::Elements(raw.num_rows() as u64));
    g.bench_function("normalize_canonical_batch", |b| {
        b.iter(|| {
            let mut rep = tokenwatch::ingest::ReadReport::default();
            black_box(
                tokenwatch::ingest::normalize(raw, std::path::Path::new("bench"), 1, &mut rep)
                    .unwrap(),
            )
        })
    });
    g.finish();
}

criterion_group!(benches, engine, validate);
criterion_main!(benches);
