//! The contract suite run over every per-token model, and known-answer tests per model.
//!
//! Contract: (1) deterministic: the same seeded history gives the same state and signals;
//! (2) snapshot round trip: encode -> decode gives the same state, and truncation is an
//! error, never a panic; (3) an injected outlier window gets a smaller tail probability
//! than an ordinary window of the same history.

use rand::Rng;
use rand_xoshiro::rand_core::SeedableRng;
use rand_xoshiro::Xoshiro256PlusPlus;

use super::codec::{Reader, Writer};
use super::*;
use crate::config::Config;
use crate::window::{country_key, endpoint_key, prefix_key, text_key, WindowAgg};

const T0: i64 = 1_772_409_600_000; // Monday 2026-03-02 00:00 UTC
const W: i64 = 60_000;

/// A window with `n` calls from DE / AS 3320 / 198.51.100.0/24 to the given endpoints.
fn window(start: i64, n: u32, eps: &[&str]) -> WindowAgg {
    let mut w = WindowAgg::default();
    w.reset(start);
    let ip: std::net::IpAddr = "198.51.100.7".parse().unwrap();
    for i in 0..n {
        w.count += 1;
        w.status[0] += 1;
        w.bytes += 2_000;
        w.latency_sum += 40.0;
        w.latency_n += 1;
        w.endpoints
            .add(endpoint_key("GET", eps[i as usize % eps.len()]));
        w.countries.add(country_key("DE"));
        w.asns.add(3320);
        w.prefixes.add(prefix_key(&ip));
        w.agents.add(text_key("svc/1.0"));
        w.scopes.add(text_key("orders:read"));
        w.envs.add(text_key("prod"));
        w.first_ts = w.first_ts.min(start + i as i64);
        w.last_ts = w.last_ts.max(start + i as i64);
    }
    w
}

/// A seeded ordinary history: a business-hours token with 2..8 calls per active minute.
fn history(seed: u64, minutes: i64) -> Vec<WindowAgg> {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let mut out = Vec::new();
    for m in 0..minutes {
        let start = T0 + m * W;
        let hour = (start / 3_600_000) % 24;
        if !(8..18).contains(&hour) || rng.gen_bool(0.5) {
            continue;
        }
        let n = rng.gen_range(2..16);

        out.push(window(
            start,
            n,
            &["/v1/orders", "/v1/orders/{id}", "/v1/products"],
        ));
    }
    out
}

/// The outlier: 3 a.m., 400 calls, from BR / AS 28573, to an admin endpoint, all 401.
fn outlier(start: i64) -> WindowAgg {
    let mut w = WindowAgg::default();
    w.reset(start);
    let ip: std::net::IpAddr = "203.0.113.9".parse().unwrap();
    for i in 0..400 {
        w.count += 1;
        w.status[crate::window::class::AUTH] += 1;
        w.bytes += 900_000;
        w.latency_sum += 900.0;
        w.latency_n += 1;
        w.endpoints.add(endpoint_key("GET", "/v1/admin/keys"));
        w.countries.add(country_key("BR"));
        w.asns.add(28573);
        w.prefixes.add(prefix_key(&ip));
        w.agents.add(text_key("curl/8.5.0"));
        w.scopes.add(text_key("admin"));
        w.envs.add(text_key("staging"));
        w.first_ts = w.first_ts.min(start + i);
        w.last_ts = w.last_ts.max(start + i);
    }
    w.out_of_scope = w.count; // its scope `admin` is granted to no test token
    w
}

struct Env {
    cfg: Config,
    global: Global,
    reg: registry::RegistryEntry,
}

impl Env {
    fn new() -> Self {
        let cfg = Config::default();
        let mut global = Global::default();
        global.rarity.tokens = 100;
        global
            .rarity
            .users
            .insert(crate::window::fold(endpoint_key("GET", "/v1/orders")), 60);
        let reg = registry::RegistryEntry::new(
            "t1",
            "team",
            "svc",
            "prod",
            ["orders:read", "catalog:read"].into_iter(),
            Some(T0 - 86_400_000),
            Some(T0 + 60 * 86_400_000),
        );
        Env { cfg, global, reg }
    }

    fn ctx<'a>(&'a self, start: i64, windows: u32) -> Ctx<'a> {
        Ctx {
            trusted: false,
            cfg: &self.cfg,
            window_ms: W,
            start,
            windows,
            first_seen: T0,
            global: &self.global,
            registry: Some(&self.reg),
            group: None,
        }
    }
}

/// Train a model on a history; returns the state.
fn train<M: Model>(m: &M, env: &Env, hist: &[WindowAgg]) -> M::State {
    let mut st = M::State::default();
    for (i, w) in hist.iter().enumerate() {
        let ctx = env.ctx(w.start, i as u32);
        m.learn(&mut st, w, &ctx);
    }
    st
}

fn min_p<M: Model>(m: &M, st: &M::State, env: &Env, w: &WindowAgg, windows: u32) -> f64 {
    let mut sc = Scratch::default();
    m.score(st, w, &env.ctx(w.start, windows), &mut sc);
    sc.signals.iter().map(|s| s.p).fold(1.0, f64::min)
}

fn contract<M: Model>(m: &M) {
    let env = Env::new();
    let days = 14;
    let hist = history(11, days * 1440);
    let n = hist.len() as u32;
    // (1) deterministic under a seed.
    let a = train(m, &env, &hist);
    let b = train(m, &env, &history(11, days * 1440));
    assert_eq!(a, b, "training is not deterministic");
    // (2) snapshot round trip, and a truncated snapshot is an error.
    let mut w = Writer::default();
    M::encode(&a, &mut w);
    let back = M::decode(&mut Reader::new(&w.buf)).expect("decode");
    assert_eq!(a, back, "snapshot round trip changed the state");
    if !w.buf.is_empty() {
        assert!(M::decode(&mut Reader::new(&w.buf[..w.buf.len() - 1])).is_err());
    }
    // (3) an injected outlier is more surprising than an ordinary window.
    let next = T0 + days * 86_400_000;
    let ordinary = window(next + 10 * 3_600_000, 5, &["/v1/orders"]);
    let odd = outlier(next + 3 * 3_600_000);
    let p_ord = min_p(m, &a, &env, &ordinary, n);
    let p_odd = min_p(m, &a, &env, &odd, n);
    assert!(
        p_odd < p_ord,
        "outlier p {p_odd} not below ordinary p {p_ord}"
    );
    assert!(
        p_odd < env.cfg.score.quiet_p,
        "outlier p {p_odd} is not surprising enough to speak"
    );
}

#[test]
fn contract_rate() {
    contract(&rate::RateModel::new(&Config::default()));
}

#[test]
fn contract_seasonal() {
    contract(&seasonal::SeasonalModel::new(&Config::default()));
}

#[test]
fn contract_network() {
    contract(&network::NetworkModel::new(&Config::default()));
}

#[test]
fn contract_endpoints() {
    contract(&endpoints::EndpointModel::new(&Config::default()));
}

#[test]
fn contract_telemetry() {
    contract(&telemetry::TelemetryModel::new(&Config::default()));
}

#[test]
fn contract_peers() {
    contract(&peers::PeerModel::new(&Config::default()));
}

#[test]
fn contract_registry() {
    contract(&registry::RegistryModel::new(&Config::default()));
}

#[test]
fn token_state_round_trip_and_size() {
    let env = Env::new();
    let models = Models::new(&env.cfg);
    let mut st = TokenState {
        first_seen: T0,
        ..Default::default()
    };
    for w in history(3, 3 * 1440) {
        let ctx = env.ctx(w.start, st.windows);
        models.learn(&mut st, &w, &ctx);
    }
    let mut w = Writer::default();
    st.encode(&mut w);
    assert_eq!(TokenState::decode(&w.buf).unwrap(), st);
    assert!(w.buf.len() <= 1024, "encoded state {} B", w.buf.len());
    assert!(std::mem::size_of::<TokenState>() <= 1024);
    let mut bad = w.buf.clone();
    bad[0] = 99;
    assert!(matches!(
        TokenState::decode(&bad),
        Err(DecodeError::Version { .. })
    ));
    bad = w.buf.clone();
    bad.push(0);
    assert!(matches!(
        TokenState::decode(&bad),
        Err(DecodeError::Trailing(1))
    ));
}

// ---- known answers ----

#[test]
fn rate_low_volume_is_calm_and_bursts_are_not() {
    let env = Env::new();
    let m = rate::RateModel::new(&env.cfg);
    let hist: Vec<WindowAgg> = (0..200).map(|i| window(T0 + i * W, 1, &["/a"])).collect();
    let st = train(&m, &env, &hist);
    // 3 calls after a steady 1 is not an incident.
    assert!(min_p(&m, &st, &env, &window(T0 + 300 * W, 3, &["/a"]), 200) > 0.05);
    // 40 is.
    assert!(min_p(&m, &st, &env, &window(T0 + 300 * W, 40, &["/a"]), 200) < 1e-10);
}

#[test]
fn seasonal_flags_night_activity_of_a_day_token() {
    let env = Env::new();
    let m = seasonal::SeasonalModel::new(&env.cfg);
    let hist = history(5, 14 * 1440);
    let st = train(&m, &env, &hist);
    let n = hist.len() as u32;
    let day = T0 + 14 * 86_400_000;
    let p_day = min_p(&m, &st, &env, &window(day + 11 * 3_600_000, 3, &["/a"]), n);
    let p_night = min_p(&m, &st, &env, &window(day + 3 * 3_600_000, 3, &["/a"]), n);
    assert!(p_day > 0.5, "{p_day}");
    assert!(p_night < 0.01, "{p_night}");
}

#[test]
fn network_novelty_depends_on_stability() {
    let env = Env::new();
    let m = network::NetworkModel::new(&env.cfg);
    let hist: Vec<WindowAgg> = (0..3000).map(|i| window(T0 + i * W, 2, &["/a"])).collect();
    let st = train(&m, &env, &hist);
    let mut sc = Scratch::default();
    let odd = outlier(T0 + 4000 * W);
    m.score(&st, &odd, &env.ctx(odd.start, 3000), &mut sc);
    let country = sc
        .signals
        .iter()
        .find(|s| s.kind == SignalKind::NewCountry)
        .unwrap();
    assert!(country.p < 1e-3);
    assert_eq!(crate::window::country_name(country.item), "BR");
    assert_eq!(country.usual[0] as u64, country_key("DE"));
    // A token that changes prefix every other window gets little from a new one.
    let mut st2 = network::NetworkState::default();
    for i in 0..3000 {
        let mut w = window(T0 + i * W, 2, &["/a"]);
        if i % 2 == 0 {
            w.prefixes.items.clear();
            w.prefixes.add((4u64 << 56) | i as u64);
        }
        m.learn(&mut st2, &w, &env.ctx(w.start, i as u32));
    }
    let mut sc2 = Scratch::default();
    m.score(&st2, &odd, &env.ctx(odd.start, 3000), &mut sc2);
    // (Its Bloom filter may be saturated, in which case nothing is new: p = 1.)
    let pfx = |sc: &Scratch| {
        sc.signals
            .iter()
            .find(|s| s.kind == SignalKind::NewPrefix)
            .map_or(1.0, |s| s.p)
    };
    assert!(
        pfx(&sc2) > 0.3 && pfx(&sc) < 1e-3,
        "{} {}",
        pfx(&sc2),
        pfx(&sc)
    );
}

#[test]
fn endpoint_first_use_of_a_rare_endpoint() {
    let env = Env::new();
    let m = endpoints::EndpointModel::new(&env.cfg);
    let hist: Vec<WindowAgg> = (0..1000)
        .map(|i| window(T0 + i * W, 2, &["/v1/orders"]))
        .collect();
    let st = train(&m, &env, &hist);
    let mut sc = Scratch::default();
    let w = window(T0 + 2000 * W, 1, &["/v1/admin/keys"]);
    m.score(&st, &w, &env.ctx(w.start, 1000), &mut sc);
    let rare = sc
        .signals
        .iter()
        .find(|s| s.kind == SignalKind::EndpointRarity)
        .unwrap();
    assert!((rare.p - 1.0 / 102.0).abs() < 1e-9);
    let mut sc = Scratch::default();
    m.score(
        &st,
        &window(T0 + 2000 * W, 3, &["/v1/orders"]),
        &env.ctx(w.start, 1000),
        &mut sc,
    );
    assert!(sc.signals.is_empty());
}

#[test]
fn telemetry_auth_storm_and_bulk_bytes() {
    let env = Env::new();
    let m = telemetry::TelemetryModel::new(&env.cfg);
    let hist: Vec<WindowAgg> = (0..500).map(|i| window(T0 + i * W, 5, &["/a"])).collect();
    let st = train(&m, &env, &hist);
    let mut sc = Scratch::default();
    let odd = outlier(T0 + 600 * W);
    m.score(&st, &odd, &env.ctx(odd.start, 500), &mut sc);
    let kinds: Vec<SignalKind> = sc
        .signals
        .iter()
        .filter(|s| s.p < 1e-6)
        .map(|s| s.kind)
        .collect();
    assert!(kinds.contains(&SignalKind::AuthErrors), "{kinds:?}");
    assert!(kinds.contains(&SignalKind::BytesOut), "{kinds:?}");
    // One expired session (1 of 5 calls refused) is not a storm.
    let mut w = window(T0 + 600 * W, 5, &["/a"]);
    w.status = [4, 1, 0, 0, 0];
    let mut sc = Scratch::default();
    m.score(&st, &w, &env.ctx(w.start, 500), &mut sc);
    assert!(sc.signals.iter().all(|s| s.p > 0.01), "{:?}", sc.signals);
}

#[test]
fn registry_violations() {
    let env = Env::new();
    let m = registry::RegistryModel::new(&env.cfg);
    let mut sc = Scratch::default();
    let odd = outlier(T0);
    m.score(&Default::default(), &odd, &env.ctx(odd.start, 0), &mut sc);
    let kinds: Vec<SignalKind> = sc.signals.iter().map(|s| s.kind).collect();
    assert_eq!(
        kinds,
        vec![SignalKind::ScopeViolation, SignalKind::EnvMismatch]
    );
    assert_eq!(sc.signals[0].observed, 400.0);
    // Expired token.
    let late = window(T0 + 61 * 86_400_000, 1, &["/a"]);
    let mut sc = Scratch::default();
    m.score(&Default::default(), &late, &env.ctx(late.start, 0), &mut sc);
    assert_eq!(sc.signals[0].kind, SignalKind::TokenValidity);
    // No registry row: no registry signal.
    let mut ctx = env.ctx(odd.start, 0);
    ctx.registry = None;
    let mut sc = Scratch::default();
    m.score(&Default::default(), &odd, &ctx, &mut sc);
    assert!(sc.signals.is_empty());
}

/// One call outside the token's scopes, to `scope`, answered with `status`.
fn stray(start: i64, scope: &str, status: u16) -> WindowAgg {
    let mut w = window(start, 5, &["/v1/orders"]);
    w.scopes.add(text_key(scope));
    w.out_of_scope = 1;
    if status < 400 {
        w.out_of_scope_ok = 1;
    } else {
        w.status[crate::window::class::AUTH] += 1;
    }
    w
}

#[test]
fn stray_refusals_weighed_by_history_successes_at_once() {
    let env = Env::new();
    let m = registry::RegistryModel::new(&env.cfg);
    let p_of = |st: &registry::RegistryState, w: &WindowAgg, n: u32| {
        let mut sc = Scratch::default();
        m.score(st, w, &env.ctx(w.start, n), &mut sc);
        sc.signals
            .iter()
            .find(|s| s.kind == SignalKind::ScopeViolation)
            .map_or(1.0, |s| s.p)
    };
    // A token whose UI hits a route outside its scopes now and then (1 window in 100).
    let mut st = registry::RegistryState::default();
    for i in 0..30 {
        let w = stray(T0 + i * 100 * W, "admin", 403);
        m.track(&mut st, &w, &env.ctx(w.start, (i * 100) as u32));
        m.learn(&mut st, &w, &env.ctx(w.start, (i * 100) as u32));
    }
    let next = T0 + 3_100 * W;
    let refused = stray(next, "admin", 403);
    assert!(
        p_of(&st, &refused, 3_000) > 1e-3,
        "{} {st:?}",
        p_of(&st, &refused, 3_000)
    );
    // The same route answered 200: a violation at once.
    assert!(p_of(&st, &stray(next, "admin", 200), 3_000) < 1e-6);
    // A token that never strays: one refusal is weak, a few in an hour add up.
    let mut st = registry::RegistryState::default();
    let one = p_of(&st, &refused, 3_000);
    assert!(one > 1e-5, "{one}");
    for k in 0..3 {
        let w = stray(next + k * 10 * W, "admin", 403);
        m.track(&mut st, &w, &env.ctx(w.start, 3_000));
    }
    let fourth = stray(next + 30 * W, "admin", 403);
    assert!(
        p_of(&st, &fourth, 3_000) < 1e-6,
        "{}",
        p_of(&st, &fourth, 3_000)
    );
    // ...and a day later they have decayed away.
    let later = stray(next + 1_440 * W, "admin", 403);
    assert!(p_of(&st, &later, 3_000) > 1e-5);
}

#[test]
fn peers_group_similar_tokens() {
    use peers::*;
    let mut pts: Vec<PeerPoint> = (0..40)
        .map(|i| {
            let mut u = [0f32; DIMS];
            u[if i % 2 == 0 { 1 } else { 9 }] = 1.0;
            PeerPoint {
                token: std::sync::Arc::from(format!("t{i}").as_str()),
                usage: u,
                d_own: 0.1,
                rate_mean: if i % 2 == 0 { 2.0 } else { 50.0 },
                rate_var: 4.0,
            }
        })
        .collect();
    let g = PeerGroups::fit(&mut pts, 2, 7).unwrap();
    let mut a = [0f32; DIMS];
    a[1] = 1.0;
    let mut b = [0f32; DIMS];
    b[9] = 1.0;
    let (ga, gb) = (g.nearest(&a), g.nearest(&b));
    assert_ne!(ga, gb);
    assert!((g.groups[ga].rate_mean - 2.0).abs() < 1e-9);
    assert!((g.groups[gb].rate_mean - 50.0).abs() < 1e-9);
    assert_eq!(distance(&a, &b), 1.0);
    assert_eq!(distance(&a, &a), 0.0);
}

#[test]
fn a_burst_on_one_endpoint_stands_out_when_the_total_would_not() {
    let env = Env::new();
    let m = endpoints::EndpointModel::new(&env.cfg);
    let hist = history(5, 14 * 1440);
    let st = train(&m, &env, &hist);
    let n = hist.len() as u32;
    let at = T0 + 14 * 86_400_000 + 10 * 3_600_000;
    let burst_p = |w: &WindowAgg| {
        let mut sc = Scratch::default();
        m.score(&st, w, &env.ctx(w.start, n), &mut sc);
        sc.signals
            .iter()
            .find(|s| s.kind == SignalKind::EndpointMix)
            .map_or(1.0, |s| s.p)
    };
    // 15 calls spread as usual over its three endpoints: nothing.
    let usual = window(at, 15, &["/v1/orders", "/v1/orders/{id}", "/v1/products"]);
    assert_eq!(burst_p(&usual), 1.0);
    // 30 calls, 28 of them to one endpoint (a third of its usual traffic): a burst on it.
    let mut odd = window(at, 2, &["/v1/orders"]);
    let one = window(at, 28, &["/v1/products"]);
    odd.count += one.count;
    for &(k, c) in &one.endpoints.items {
        for _ in 0..c {
            odd.endpoints.add(k);
        }
    }
    assert!(burst_p(&odd) < 1e-3, "{}", burst_p(&odd));
}

/// Windows of `n` calls of `size` bytes each (one of them `big` bytes if given).
fn sized(start: i64, n: u32, size: u64, big: Option<u64>) -> WindowAgg {
    let mut w = window(start, n, &["/v1/reports"]);
    w.bytes = size * (n as u64 - big.is_some() as u64) + big.unwrap_or(0);
    w.bytes_max = big.unwrap_or(size).max(size);
    w
}

/// Three weeks of 5-minute windows of 2-12 calls of about 20 KB; with `heavy`, one window
/// in 60 carries one response 30-100x larger (a report now and then).
fn sizes_trained(
    m: &telemetry::TelemetryModel,
    env: &Env,
    heavy: bool,
) -> telemetry::TelemetryState {
    let mut st = telemetry::TelemetryState::default();
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(3);
    for i in 0..6000 {
        let start = T0 + i * 300_000;
        let size = rng.gen_range(15_000..25_000);
        let big = (rng.gen_bool(1.0 / 60.0) && heavy).then(|| size * rng.gen_range(30..100));
        let w = sized(start, rng.gen_range(2..13), size, big);
        let ctx = env.ctx(start, i as u32);
        m.track(&mut st, &w, &ctx);
        m.learn(&mut st, &w, &ctx);
    }
    st
}

#[test]
fn a_heavy_tailed_size_is_not_flagged_while_a_20x_export_is() {
    let env = Env::new();
    let m = telemetry::TelemetryModel::new(&env.cfg);
    let p = |st: &telemetry::TelemetryState, w: &WindowAgg| {
        let mut sc = Scratch::default();
        m.score(st, w, &env.ctx(w.start, 6000), &mut sc);
        sc.signals
            .iter()
            .find(|s| s.kind == SignalKind::BytesOut)
            .map_or(1.0, |s| s.p)
    };
    let at = T0 + 6000 * 300_000;
    let export = sized(at, 20, 400_000, None); // 20 calls, each 20x the usual size
    let heavy = sizes_trained(&m, &env, true);
    // Its usual now-and-then large response: unusual (about one window in a thousand, a
    // nat or two of evidence), not alarming.
    let report = p(&heavy, &sized(at, 3, 20_000, Some(20_000 * 80)));
    assert!(report > 2e-4, "{report}");
    // One huge response among many ordinary calls is not an export either (trimmed).
    let one = p(&heavy, &sized(at, 12, 20_000, Some(20_000 * 100)));
    assert!(one > 0.01, "{one}");
    // A bulk export ranks above that on the same token, though only weakly (about as
    // unusual as a few-call window with one of its large reports: the per-window mean
    // cannot tell those apart), and is extreme on a token whose sizes are steady.
    assert!(p(&heavy, &export) < one && p(&heavy, &export) < 0.01);
    let steady = sizes_trained(&m, &env, false);
    assert!(p(&steady, &export) < 1e-9, "{}", p(&steady, &export));
    assert!(p(&steady, &sized(at, 6, 21_000, None)) > 0.05);
}

#[test]
fn a_daily_burst_on_one_endpoint_alerts_on_its_first_day_only() {
    let env = Env::new();
    let m = endpoints::EndpointModel::new(&env.cfg);
    let hist = history(5, 14 * 1440);
    let mut st = train(&m, &env, &hist);
    let n = hist.len() as u32;
    // A nightly job: 40 calls to /v1/products at 02:10 UTC, every day from day 14 on.
    let job = |day: i64| {
        let mut w = window(
            T0 + day * 86_400_000 + 2 * 3_600_000 + 600_000,
            2,
            &["/v1/orders"],
        );
        for _ in 0..40 {
            w.count += 1;
            w.endpoints.add(endpoint_key("GET", "/v1/products"));
        }
        w
    };
    let mut ps = Vec::new();
    for day in 14..18 {
        // A day's ordinary traffic first (the day rolls over), then the job; the job's
        // windows alert, so they are never learned.
        let w = window(T0 + day * 86_400_000 + 3_600_000, 3, &["/v1/orders"]);
        let mut sc = Scratch::default();
        m.score(&st, &w, &env.ctx(w.start, n), &mut sc);
        m.track(&mut st, &env.ctx(w.start, n), sc.burst);
        let j = job(day);
        let mut sc = Scratch::default();
        m.score(&st, &j, &env.ctx(j.start, n), &mut sc);
        ps.push(
            sc.signals
                .iter()
                .find(|s| s.kind == SignalKind::EndpointMix)
                .map_or(1.0, |s| s.p),
        );
        m.track(&mut st, &env.ctx(j.start, n), sc.burst);
    }
    assert!(ps[0] < 1e-6, "{ps:?}");
    // From the second day on, the same burst at the same time keeps only a share of its
    // evidence; a burst at another time of day would not.
    for p in &ps[1..] {
        assert!(*p > ps[0].powf(0.5), "{ps:?}");
    }
    let mut other = job(18);
    other.start += 8 * 3_600_000;
    let mut sc = Scratch::default();
    m.score(&st, &other, &env.ctx(other.start, n), &mut sc);
    let p_other = sc
        .signals
        .iter()
        .find(|s| s.kind == SignalKind::EndpointMix)
        .map_or(1.0, |s| s.p);
    assert!(p_other < 1e-6, "{p_other}");
}

#[test]
fn a_nightly_rise_of_the_whole_token_alerts_on_its_first_day_only() {
    let env = Env::new();
    let models = Models::new(&env.cfg);
    let hist = history(7, 14 * 1440);
    let mut st = TokenState::default();
    for (i, w) in hist.iter().enumerate() {
        models.learn(&mut st, w, &env.ctx(w.start, i as u32));
    }
    let n = hist.len() as u32;
    let eps = ["/v1/orders", "/v1/orders/{id}", "/v1/products"];
    // Score and follow one window as the engine does (the rises alert: never learned).
    let step = |st: &mut TokenState, w: &WindowAgg| {
        let ctx = env.ctx(w.start, n);
        let mut sc = Scratch::default();
        models.score(st, w, &ctx, &mut sc);
        models.track(st, w, &ctx, false, &sc);
        sc.signals
            .iter()
            .find(|s| s.kind == SignalKind::Rate)
            .map_or(1.0, |s| s.p)
    };
    let day = 86_400_000;
    let mut ps = Vec::new();
    for d in 14..18 {
        // An ordinary window at 09:00, then a job: 400 calls at 10:10 UTC, every day.
        let nine = T0 + d * day + 9 * 3_600_000;
        let ordinary = window(nine, 8, &eps);
        step(&mut st, &ordinary);
        models.learn(&mut st, &ordinary, &env.ctx(nine, n));
        ps.push(step(
            &mut st,
            &window(T0 + d * day + 10 * 3_600_000 + 600_000, 400, &eps),
        ));
    }
    assert!(ps[0] < 1e-6, "{ps:?}");
    // From the second day on, the same rise at the same time of day keeps only a share of
    // its evidence; a rise at another time of day keeps all of it.
    for p in &ps[1..] {
        assert!(*p > ps[0].powf(0.5), "{ps:?}");
    }
    // The same rise at another time of day: the token has shown it bursts this much once a
    // day (its own bursts' rate, see `rate::RateState::burst_p`; a habit from its second
    // episode on), but not at this time, so it keeps more evidence than at its routine time
    // once that is a habit, and far more than an ordinary window.
    let other = step(
        &mut st,
        &window(T0 + 18 * day + 15 * 3_600_000 + 600_000, 400, &eps),
    );
    assert!(
        ps[2..].iter().all(|p| other < p.powf(2.0)),
        "{other} {ps:?}"
    );
    assert!(other < 1e-2, "{other}");
}

#[test]
fn a_refit_partial_survives_encoding_and_fits_the_same() {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(11);
    let mut part = RefitPartial::default();
    part.rarity.tokens = 40;
    for k in 0..30u32 {
        part.rarity
            .users
            .insert(k.wrapping_mul(2_654_435_761), 1 + k % 7);
    }
    for t in 0..40u32 {
        let windows = 50 + rng.gen_range(0..500u32);
        for obs in part.novelty.iter_mut() {
            obs.push((rng.gen_range(0..windows / 4), windows));
        }
        let mut usage = [0f32; peers::DIMS];
        for u in usage.iter_mut() {
            *u = rng.gen_range(0.0..1.0f32);
        }
        part.points.push(peers::PeerPoint {
            token: format!("tok-{t}").into(),
            usage,
            d_own: rng.gen_range(0.0..2.0),
            rate_mean: rng.gen_range(1.0..100.0),
            rate_var: rng.gen_range(1.0..400.0),
        });
    }
    let mut w = Writer::default();
    part.encode(&mut w);
    let mut r = Reader::new(&w.buf);
    let back = RefitPartial::decode(&mut r).unwrap();
    assert_eq!(r.remaining(), 0);
    let mut again = Writer::default();
    back.encode(&mut again);
    assert_eq!(again.buf, w.buf, "encoding is canonical");

    // What a partition receives fits the same global models as what it sent.
    let cfg = Config::default();
    let fitted = |p: RefitPartial| {
        let mut g = Writer::default();
        p.fit(&[], &cfg, 1_000).encode(&mut g);
        g.buf
    };
    assert_eq!(fitted(back), fitted(part));

    // Damaged input is an error, never a panic.
    for cut in 0..w.buf.len() {
        assert!(RefitPartial::decode(&mut Reader::new(&w.buf[..cut])).is_err());
    }
    let mut bad = w.buf.clone();
    let at = bad.len() - 8;
    bad[at..].copy_from_slice(&f64::NAN.to_le_bytes());
    assert!(RefitPartial::decode(&mut Reader::new(&bad)).is_err());
}
