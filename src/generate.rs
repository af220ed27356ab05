//! Synthetic labelled traffic for development: token archetypes (service bots, human
//! dashboards, nightly batch jobs, mobile backends, low-volume integrations) with their
//! ordinary noise (redeploys, new networks within the same provider, expired sessions,
//! server outages, new common endpoints, new tokens), and incidents of every kind injected
//! only after the clean training period. Writes events, the token registry and the
//! incident list. Deterministic under a seed.
//!
//! The detector must never key on anything here but behaviour: token ids are random hex,
//! and roles in the registry are informational only.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    ArrayRef, Float32Builder, StringBuilder, TimestampMillisecondBuilder, UInt16Builder,
    UInt32Builder, UInt64Builder, UInt8Builder,
};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use rand::seq::SliceRandom;
use rand::Rng;
use rand_distr::{Distribution, LogNormal, Poisson};
use rand_xoshiro::rand_core::SeedableRng;
use rand_xoshiro::Xoshiro256PlusPlus;

use crate::event::{event_schema, fmt_ts};

/// Output format of the events file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutFormat {
    /// `events.csv`
    Csv,
    /// `events.jsonl`
    Jsonl,
    /// `events.parquet`
    Parquet,
}

/// Generator options.
#[derive(Debug, Clone)]
pub struct Options {
    /// Tokens.
    pub tokens: usize,
    /// Days of traffic.
    pub days: u32,
    /// Seed.
    pub seed: u64,
    /// Output directory.
    pub out: PathBuf,
    /// Events file format.
    pub format: OutFormat,
    /// Multiplies every request rate (smaller samples).
    pub scale: f64,
    /// Fraction of the period kept free of incidents (training).
    pub clean_fraction: f64,
    /// First day (RFC 3339 date-time, should be a Monday 00:00 UTC).
    pub start: i64,
    /// Show a progress bar.
    pub progress: bool,
    /// Benign drift that real traffic has (travel, app releases, retry storms, level shifts,
    /// bots moving region, new routes within scopes, a holiday, heavy-tailed sizes). Drawn
    /// from its own random stream: without it the data is what it was before drift existed.
    pub drift: bool,
}

impl Options {
    /// Defaults.
    pub fn new(out: PathBuf) -> Self {
        Options {
            tokens: 500,
            days: 21,
            seed: 7,
            out,
            format: OutFormat::Parquet,
            scale: 1.0,
            clean_fraction: 0.7,
            start: 1_772_409_600_000, // 2026-03-02T00:00:00Z, a Monday
            progress: false,
            drift: true,
        }
    }
}

/// Errors of the generator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Writing files.
    #[error("{path}: {reason}")]
    Write {
        /// File.
        path: PathBuf,
        /// Cause.
        reason: String,
    },
    /// Options out of range.
    #[error("{0}")]
    Invalid(String),
}

/// What was written.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Events written.
    pub events: u64,
    /// Labelled events.
    pub labelled: u64,
    /// Incidents injected.
    pub incidents: usize,
    /// Files written.
    pub files: Vec<PathBuf>,
}

const MIN: i64 = 60_000;
const HOUR: i64 = 3_600_000;
const DAY: i64 = 86_400_000;

struct Ep {
    method: &'static str,
    path: &'static str,
    scope: &'static str,
    bytes: f64,
    sensitive: bool,
}

const fn ep(
    method: &'static str,
    path: &'static str,
    scope: &'static str,
    bytes: f64,
    sensitive: bool,
) -> Ep {
    Ep {
        method,
        path,
        scope,
        bytes,
        sensitive,
    }
}

static CATALOGUE: &[Ep] = &[
    ep("GET", "/v1/orders", "orders:read", 8000.0, false),
    ep("GET", "/v1/orders/{id}", "orders:read", 1500.0, false),
    ep("POST", "/v1/orders", "orders:write", 600.0, false),
    ep("PUT", "/v1/orders/{id}", "orders:write", 600.0, false),
    ep("GET", "/v1/products", "catalog:read", 12000.0, false),
    ep("GET", "/v1/products/{id}", "catalog:read", 2000.0, false),
    ep("GET", "/v1/customers/{id}", "customers:read", 1800.0, false),
    ep("GET", "/v1/customers", "customers:read", 9000.0, false),
    ep("POST", "/v1/customers", "customers:write", 700.0, false),
    ep("GET", "/v1/inventory", "inventory:read", 15000.0, false),
    ep(
        "PUT",
        "/v1/inventory/{sku}",
        "inventory:write",
        400.0,
        false,
    ),
    ep("GET", "/v1/invoices", "billing:read", 7000.0, false),
    ep("GET", "/v1/invoices/{id}", "billing:read", 2500.0, false),
    ep("POST", "/v1/payments", "payments:write", 900.0, false),
    ep("GET", "/v1/payments/{id}", "payments:read", 1200.0, false),
    ep("GET", "/v1/shipments", "shipping:read", 6000.0, false),
    ep("POST", "/v1/shipments", "shipping:write", 800.0, false),
    ep("GET", "/v1/search", "catalog:read", 5000.0, false),
    ep("GET", "/v1/users/me", "profile:read", 900.0, false),
    ep("GET", "/v1/notifications", "profile:read", 2000.0, false),
    ep("POST", "/v1/events", "events:write", 300.0, false),
    ep("GET", "/v1/metrics", "metrics:read", 4000.0, false),
    ep("GET", "/v1/reports", "reports:read", 20000.0, false),
    ep("GET", "/v1/reports/{id}", "reports:read", 60000.0, false),
    ep("POST", "/v1/auth/refresh", "auth", 500.0, false),
    ep("POST", "/v1/auth/login", "auth", 400.0, false),
    ep("GET", "/v1/config", "config:read", 3000.0, false),
    ep("GET", "/v1/webhooks", "webhooks:read", 2000.0, false),
    ep("POST", "/v1/webhooks", "webhooks:write", 500.0, false),
    ep("GET", "/v1/exports", "exports:read", 1000.0, false),
    ep(
        "GET",
        "/v1/exports/{id}/download",
        "exports:read",
        3_000_000.0,
        false,
    ),
    // Sensitive, rarely used.
    ep("GET", "/v1/admin/users", "admin", 30000.0, true),
    ep("GET", "/v1/admin/keys", "admin", 5000.0, true),
    ep("POST", "/v1/admin/keys", "admin", 800.0, true),
    ep("GET", "/v1/admin/audit", "admin", 40000.0, true),
    ep("GET", "/v1/admin/settings", "admin", 3000.0, true),
    ep("GET", "/v1/admin/roles", "admin", 3000.0, true),
    ep("DELETE", "/v1/admin/users/{id}", "admin", 200.0, true),
    ep("GET", "/v1/users/export", "users:export", 8_000_000.0, true),
    ep(
        "GET",
        "/v1/billing/export",
        "billing:export",
        6_000_000.0,
        true,
    ),
    ep("GET", "/internal/debug/vars", "internal", 20000.0, true),
];

const LOGIN: usize = 25;
const EXPORT_LIST: usize = 29;
const EXPORT_DOWNLOAD: usize = 30;
const CUSTOMERS_LIST: usize = 7;

struct Country {
    code: &'static str,
    tz: i64,
    isps: &'static [u32],
}

static COUNTRIES: &[Country] = &[
    Country {
        code: "US",
        tz: -5,
        isps: &[7922, 701, 7018, 20115],
    },
    Country {
        code: "DE",
        tz: 1,
        isps: &[3320, 3209, 6805],
    },
    Country {
        code: "GB",
        tz: 0,
        isps: &[2856, 5089, 5607],
    },
    Country {
        code: "FR",
        tz: 1,
        isps: &[3215, 12322, 5410],
    },
    Country {
        code: "JP",
        tz: 9,
        isps: &[4713, 2516, 17676],
    },
    Country {
        code: "BR",
        tz: -3,
        isps: &[28573, 18881, 26599],
    },
    Country {
        code: "IN",
        tz: 5,
        isps: &[9829, 55836, 24560],
    },
    Country {
        code: "NL",
        tz: 1,
        isps: &[1136, 33915],
    },
    Country {
        code: "CA",
        tz: -5,
        isps: &[812, 577],
    },
    Country {
        code: "AU",
        tz: 10,
        isps: &[1221, 4804],
    },
    Country {
        code: "SG",
        tz: 8,
        isps: &[9506, 4773],
    },
    Country {
        code: "ES",
        tz: 1,
        isps: &[3352, 12479],
    },
];

/// Cloud providers: (ASN, countries of their regions).
static CLOUDS: &[(u32, &[&str])] = &[
    (16509, &["US", "DE", "IE", "JP", "SG"]),
    (15169, &["US", "NL", "JP"]),
    (8075, &["US", "NL", "GB"]),
];

/// Hosting providers attackers like: (ASN, country).
static HOSTING: &[(u32, &str)] = &[
    (14061, "NL"),
    (24940, "FI"),
    (16276, "FR"),
    (20473, "US"),
    (9009, "RO"),
    (51167, "DE"),
    (45102, "CN"),
    (12389, "RU"),
    (7552, "VN"),
    (36873, "NG"),
];

static ATTACK_AGENTS: &[&str] = &[
    "python-requests/2.31.0",
    "curl/8.5.0",
    "Go-http-client/1.1",
    "okhttp/4.12.0",
    "Mozilla/5.0 (X11; Linux x86_64) HeadlessChrome/120.0",
];

static BROWSERS: &[&str] = &[
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/121.0",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_2) Safari/605.1.15",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) Firefox/122.0",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_2) Chrome/121.0",
    "Mozilla/5.0 (X11; Linux x86_64) Firefox/122.0",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arch {
    Bot,
    Dashboard,
    Batch,
    Mobile,
    LowVolume,
}

impl Arch {
    fn role(self) -> &'static str {
        match self {
            Arch::Bot => "service",
            Arch::Dashboard => "dashboard",
            Arch::Batch => "batch",
            Arch::Mobile => "mobile",
            Arch::LowVolume => "integration",
        }
    }
}

/// Incident kinds, as written in `kind`.
pub const KINDS: [&str; 8] = [
    "leaked_foreign",
    "rate_abuse",
    "credential_stuffing",
    "offhours_exfil",
    "scope_violation",
    "env_mismatch",
    "slow_insider",
    "token_sharing",
];

struct Tok {
    id: Arc<str>,
    arch: Arch,
    country: usize,
    tz: i64,
    asns: Vec<u32>,
    /// (asn, prefix) pairs in use.
    nets: Vec<(u32, u32)>,
    agents: Vec<String>,
    endpoints: Vec<usize>,
    weights: Vec<f64>,
    scopes: Vec<&'static str>,
    env: &'static str,
    rate: f64,
    batch_hour: i64,
    created: i64,
    owner: String,
    admin_user: bool,
    drift: Drift,
}

/// Benign changes of one token (all `None` / false without `--drift`).
#[derive(Clone, Default)]
struct Drift {
    /// The owner travels: (from, to, country index); the home country stops meanwhile.
    travel: Option<(i64, i64, usize)>,
    /// A new app version rolls out to the token's clients from this time (over two days).
    release: Option<i64>,
    /// Now and then a retry storm: a few minutes at 2-3x with 503s.
    storms: bool,
    /// From this time on the volume is this multiple of before.
    shift: Option<(i64, f64)>,
    /// From this time on the bot runs from another network of its provider (old stops).
    moved: Option<(i64, (u32, u32))>,
    /// From this time on the token also uses this route (its scope granted).
    adopt: Option<(i64, usize)>,
    /// Response sizes are heavy-tailed (Pareto) instead of log-normal.
    heavy: bool,
}
#[derive(Clone)]
struct Ev {
    ts: i64,
    tok: u32,
    ep: u16,
    status: u16,
    bytes: u64,
    latency: f32,
    ip: u32,
    country: Arc<str>,
    asn: u32,
    agent: Arc<str>,
    env: &'static str,
    kind: u8, // 0 = normal, else KINDS[kind-1]
}

fn prefix_for(asn: u32, j: u32) -> u32 {
    let h = crate::model::sketch::mix(((asn as u64) << 20) ^ j as u64);
    // Keep out of 0/8, 10/8, 127/8 and multicast for realism.
    let a = 11 + (h % 200) as u32;
    (a << 16) | ((h >> 8) as u32 & 0xffff)
}

fn ip_in(prefix: u32, rng: &mut Xoshiro256PlusPlus) -> u32 {
    (prefix << 8) | rng.gen_range(1..255)
}

fn ip_text(ip: u32) -> String {
    std::net::Ipv4Addr::from(ip).to_string()
}

struct Gen {
    rng: Xoshiro256PlusPlus,
    toks: Vec<Tok>,
    evs: Vec<Ev>,
    agents: Vec<Arc<str>>,
    countries: Vec<Arc<str>>,
    opts: Options,
    outages: Vec<(i64, i64)>,
    incidents: Vec<(usize, &'static str, i64, i64)>,
    /// Random stream of the benign drift, apart from the main one.
    drift_rng: Xoshiro256PlusPlus,
    /// A public holiday (day start), with drift: humans off, bots at 60%.
    holiday: Option<i64>,
}

impl Gen {
    /// Draw each token's benign drift (only with `--drift`). Changes start between 30% and
    /// 95% of the period, so most of them land in the evaluated part.
    fn make_drift(&mut self) {
        if !self.opts.drift {
            return;
        }
        let start = self.opts.start;
        let span = self.opts.days as i64 * DAY;
        let at = |r: &mut Xoshiro256PlusPlus| start + (r.gen_range(0.3..0.95) * span as f64) as i64;
        let r = &mut self.drift_rng;
        // One weekday holiday in the last 40% of the period.
        let d0 = (self.opts.days as f64 * 0.6) as i64;
        let hol = (d0..self.opts.days as i64)
            .find(|d| ((start / DAY + d + 3).rem_euclid(7)) < 5)
            .filter(|_| self.opts.days >= 7);
        self.holiday = hol.map(|d| start + d * DAY);
        for tok in self.toks.iter_mut() {
            let mut d = Drift::default();
            match tok.arch {
                Arch::Dashboard => {
                    if r.gen_bool(0.15) {
                        let from = at(r);
                        let len = r.gen_range(2..6) * DAY;
                        let mut c = r.gen_range(0..COUNTRIES.len());
                        if c == tok.country {
                            c = (c + 1) % COUNTRIES.len();
                        }
                        d.travel = Some((from, from + len, c));
                    }
                    if r.gen_bool(0.2) {
                        d.release = Some(at(r)); // a browser update
                    }
                }
                Arch::Mobile => {
                    if r.gen_bool(0.5) {
                        d.release = Some(at(r));
                    }
                    if r.gen_bool(0.15) {
                        d.shift = Some((at(r), if r.gen_bool(0.5) { 2.0 } else { 0.5 }));
                    }
                }
                Arch::Bot | Arch::Batch => {
                    d.storms = tok.arch == Arch::Bot && r.gen_bool(0.25);
                    d.heavy = r.gen_bool(0.2);
                    if r.gen_bool(0.1) {
                        d.shift = Some((at(r), if r.gen_bool(0.5) { 2.0 } else { 0.5 }));
                    }
                    if r.gen_bool(0.06) {
                        let asn = tok.asns[0];
                        d.moved = Some((at(r), (asn, prefix_for(asn, r.gen_range(400..600)))));
                    }
                    if r.gen_bool(0.1) {
                        d.release = Some(at(r)); // a library upgrade
                    }
                }
                Arch::LowVolume => {}
            }
            if r.gen_bool(0.1) {
                // A route the token may use (its scope granted) but had not.
                let cands: Vec<usize> = (0..CATALOGUE.len())
                    .filter(|&e| {
                        !tok.endpoints.contains(&e)
                            && tok.scopes.contains(&CATALOGUE[e].scope)
                            && !CATALOGUE[e].sensitive
                    })
                    .collect();
                if let Some(&e) = cands.get(r.gen_range(0..cands.len().max(1))) {
                    d.adopt = Some((at(r), e));
                }
            }
            tok.drift = d;
        }
    }

    /// The drifted user agent of a token at `ts`, if its release has reached this call.
    fn released_agent(&mut self, t: usize, ts: i64, agent: &str) -> Option<String> {
        let at = self.toks[t].drift.release?;
        if ts < at {
            return None;
        }
        let share = ((ts - at) as f64 / (2 * DAY) as f64).clamp(0.05, 0.9);
        if !self.drift_rng.gen_bool(share) {
            return None;
        }
        Some(match agent.split_once('/') {
            Some((name, _)) => format!("{name}/9.0.1"),
            None => format!("{agent} 9.0"),
        })
    }

    fn agent(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.agents.iter().find(|a| &***a == s) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(s);
        self.agents.push(a.clone());
        a
    }

    fn country(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.countries.iter().find(|a| &***a == s) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(s);
        self.countries.push(a.clone());
        a
    }

    fn make_tokens(&mut self) {
        let n = self.opts.tokens;
        let span = self.opts.days as i64 * DAY;
        for i in 0..n {
            let r = &mut self.rng;
            let arch = match r.gen_range(0..100) {
                0..=29 => Arch::Bot,
                30..=54 => Arch::Dashboard,
                55..=66 => Arch::Batch,
                67..=76 => Arch::Mobile,
                _ => Arch::LowVolume,
            };
            let id: String = format!("tok_{:012x}", r.gen::<u64>() & 0xffff_ffff_ffff);
            let ci = r.gen_range(0..COUNTRIES.len());
            let c = &COUNTRIES[ci];
            let mut tz = c.tz;
            let (asns, _region) = match arch {
                Arch::Bot | Arch::Batch => {
                    let (asn, regions) = CLOUDS[r.gen_range(0..CLOUDS.len())];
                    (
                        vec![asn],
                        regions[r.gen_range(0..regions.len())].to_string(),
                    )
                }
                _ => (
                    vec![c.isps[r.gen_range(0..c.isps.len())]],
                    c.code.to_string(),
                ),
            };
            if arch == Arch::Dashboard && r.gen_bool(0.3) {
                // Office and home on two providers.
                let other = c.isps[r.gen_range(0..c.isps.len())];
                let mut a = asns.clone();
                if other != a[0] {
                    a.push(other);
                }
                let nets = a
                    .iter()
                    .map(|&x| (x, prefix_for(x, r.gen_range(0..50))))
                    .collect();
                self.push_token(i, id, arch, ci, tz, a, nets, span);
                continue;
            }
            let nprefix = match arch {
                Arch::Bot => r.gen_range(1..=3),
                Arch::Dashboard => r.gen_range(1..=2),
                _ => 1,
            };
            let nets: Vec<(u32, u32)> = (0..nprefix)
                .map(|_| (asns[0], prefix_for(asns[0], r.gen_range(0..200))))
                .collect();
            if arch == Arch::Bot || arch == Arch::Batch {
                tz = 0;
            }
            self.push_token(i, id, arch, ci, tz, asns, nets, span);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn push_token(
        &mut self,
        i: usize,
        id: String,
        arch: Arch,
        ci: usize,
        tz: i64,
        asns: Vec<u32>,
        nets: Vec<(u32, u32)>,
        span: i64,
    ) {
        let r = &mut self.rng;
        let common: Vec<usize> = (0..CATALOGUE.len())
            .filter(|&e| !CATALOGUE[e].sensitive && e != LOGIN && e != EXPORT_DOWNLOAD)
            .collect();
        let sensitive: Vec<usize> = (0..CATALOGUE.len())
            .filter(|&e| CATALOGUE[e].sensitive)
            .collect();
        let n_ep = match arch {
            Arch::Bot => r.gen_range(2..=6),
            Arch::Dashboard => r.gen_range(8..=16),
            Arch::Batch => r.gen_range(2..=4),
            Arch::Mobile => r.gen_range(6..=12),
            Arch::LowVolume => r.gen_range(1..=3),
        };
        let mut endpoints: Vec<usize> = common.choose_multiple(r, n_ep).copied().collect();
        if arch == Arch::Dashboard {
            endpoints.push(LOGIN);
        }
        if arch == Arch::Batch && r.gen_bool(0.4) {
            endpoints.push(EXPORT_DOWNLOAD);
        }
        let admin_user = arch == Arch::Dashboard && r.gen_bool(0.12);
        if admin_user {
            for &e in sensitive.choose_multiple(r, 3) {
                endpoints.push(e);
            }
        }
        let weights: Vec<f64> = (0..endpoints.len())
            .map(|k| 1.0 / (k as f64 + 1.0).powf(0.9))
            .collect();
        let mut scopes: Vec<&'static str> = endpoints.iter().map(|&e| CATALOGUE[e].scope).collect();
        // Some humans hold broad grants they never use (the insider's starting point).
        if arch == Arch::Dashboard && r.gen_bool(0.35) {
            scopes.extend(["admin", "users:export", "billing:export"]);
        }
        scopes.sort();
        scopes.dedup();
        let env = if r.gen_bool(0.15) { "staging" } else { "prod" };
        let rate = match arch {
            Arch::Bot => LogNormal::new(0.3f64, 0.8)
                .map(|d| d.sample(r))
                .unwrap_or(1.0)
                .clamp(0.2, 12.0),
            Arch::Dashboard => r.gen_range(1.5..4.0),
            Arch::Batch => r.gen_range(20.0..90.0),
            Arch::Mobile => LogNormal::new(1.2f64, 0.6)
                .map(|d| d.sample(r))
                .unwrap_or(3.0)
                .clamp(1.0, 25.0),
            Arch::LowVolume => r.gen_range(3.0..30.0), // calls per day
        } * self.opts.scale;
        let agents = match arch {
            Arch::Bot | Arch::Batch => {
                let names = [
                    "orders-sync",
                    "inventory-worker",
                    "billing-etl",
                    "report-builder",
                    "crm-bridge",
                    "ship-notify",
                ];
                vec![format!(
                    "{}/{}.{}.{}",
                    names[r.gen_range(0..names.len())],
                    r.gen_range(1..4),
                    r.gen_range(0..20),
                    r.gen_range(0..10)
                )]
            }
            Arch::Dashboard => {
                let k = r.gen_range(1..=2);
                BROWSERS
                    .choose_multiple(r, k)
                    .map(|s| s.to_string())
                    .collect()
            }
            Arch::Mobile => (0..6)
                .map(|k| {
                    format!(
                        "ShopApp/5.{k} ({})",
                        if k % 2 == 0 { "iOS 17" } else { "Android 14" }
                    )
                })
                .collect(),
            Arch::LowVolume => vec![format!(
                "integration-client/{}.{}",
                r.gen_range(1..3),
                r.gen_range(0..9)
            )],
        };
        // A few tokens are created during the period.
        let created = if i % 33 == 5 {
            self.opts.start + (r.gen_range(0.3..0.8) * span as f64) as i64
        } else {
            self.opts.start - r.gen_range(30..400) * DAY
        };
        let owner = format!("team-{}", r.gen_range(1..40));
        self.toks.push(Tok {
            id: Arc::from(id.as_str()),
            arch,
            country: ci,
            tz,
            asns,
            nets,
            agents,
            endpoints,
            weights,
            scopes,
            env,
            rate,
            batch_hour: r.gen_range(0..5),
            created,
            owner,
            admin_user,
            drift: Drift::default(),
        });
    }

    fn pick_ep(&mut self, t: usize) -> usize {
        let tok = &self.toks[t];
        let total: f64 = tok.weights.iter().sum();
        let mut x = self.rng.gen::<f64>() * total;
        for (k, w) in tok.weights.iter().enumerate() {
            x -= w;
            if x <= 0.0 {
                return tok.endpoints[k];
            }
        }
        tok.endpoints[0]
    }

    fn normal_status(&mut self, ts: i64) -> u16 {
        let in_outage = self.outages.iter().any(|&(s, e)| ts >= s && ts < e);
        let r = &mut self.rng;
        if in_outage && r.gen_bool(0.35) {
            return if r.gen_bool(0.7) { 503 } else { 500 };
        }
        let x = r.gen::<f64>();
        if x < 0.008 {
            404
        } else if x < 0.011 {
            400
        } else if x < 0.0125 {
            500
        } else if x < 0.0135 {
            409
        } else if x < 0.7 {
            200
        } else if x < 0.75 {
            201
        } else {
            200
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn emit(
        &mut self,
        ts: i64,
        t: usize,
        ep: usize,
        status: u16,
        net: (u32, u32),
        country: Arc<str>,
        agent: Arc<str>,
        env: &'static str,
        kind: u8,
        bytes_mult: f64,
    ) {
        if ts >= self.opts.start + self.opts.days as i64 * DAY {
            return; // incidents never run past the period
        }
        let r = &mut self.rng;
        let e = &CATALOGUE[ep];

        let bytes = if status >= 400 {
            r.gen_range(80..400)
        } else {
            (e.bytes * bytes_mult * LogNormal::new(0.0, 0.5).map(|d| d.sample(r)).unwrap_or(1.0))
                as u64
        };
        let base_lat = 20.0 + (e.bytes / 50_000.0).min(3000.0);
        let latency =
            (base_lat * LogNormal::new(0.0, 0.4).map(|d| d.sample(r)).unwrap_or(1.0)) as f32;
        let ip = ip_in(net.1, r);
        self.evs.push(Ev {
            ts,
            tok: t as u32,
            ep: ep as u16,
            status,
            bytes,
            latency,
            ip,
            country,
            asn: net.0,
            agent,
            env,
            kind,
        });
    }

    /// Expected calls in the minute `m` (epoch ms) for a token, by archetype.
    fn minute_rate(&mut self, t: usize, m: i64, day_state: &DayState) -> f64 {
        let base = self.base_rate(t, m, day_state);
        let d = &self.toks[t].drift;
        let mut f = 1.0;
        if let Some((at, k)) = d.shift {
            if m >= at {
                f *= k;
            }
        }
        if day_state.holiday {
            f *= 0.6;
        }
        if day_state.storms.iter().any(|&(s, e)| m >= s && m < e) {
            f *= 2.5;
        }
        base * f
    }

    fn base_rate(&mut self, t: usize, m: i64, day_state: &DayState) -> f64 {
        let tok = &self.toks[t];
        let local = m + tok.tz * HOUR;
        let hod = local.rem_euclid(DAY) as f64 / HOUR as f64;
        let dow = (local.div_euclid(DAY) + 3).rem_euclid(7); // 0 = Monday
        match tok.arch {
            Arch::Bot => {
                tok.rate * (1.0 + 0.3 * ((hod - 14.0) / 24.0 * std::f64::consts::TAU).cos())
            }
            Arch::Mobile => {
                let d = (1.0 + 0.7 * ((hod - 20.0) / 24.0 * std::f64::consts::TAU).cos()).max(0.05);
                tok.rate * d
            }
            Arch::Batch => {
                let start = day_state.batch_start;
                if m >= start && m < start + day_state.batch_len {
                    tok.rate
                } else if m.rem_euclid(HOUR) == 0 && t % 5 == 0 {
                    3.0 // hourly heartbeat of some jobs
                } else {
                    0.0
                }
            }
            Arch::Dashboard => {
                if day_state.sessions.iter().any(|&(s, e)| m >= s && m < e) {
                    if self.rng.gen_bool(0.6) {
                        tok.rate
                    } else {
                        0.0
                    }
                } else {
                    let _ = dow;
                    0.0
                }
            }
            Arch::LowVolume => {
                // calls per day spread uniformly
                tok.rate / 1440.0
            }
        }
    }

    fn normal_traffic(&mut self) {
        let days = self.opts.days as i64;
        let start = self.opts.start;
        let bar = if self.opts.progress {
            indicatif::ProgressBar::new(self.toks.len() as u64)
        } else {
            indicatif::ProgressBar::hidden()
        };
        for t in 0..self.toks.len() {
            bar.inc(1);
            let mut agent_idx = 0usize;
            for d in 0..days {
                let day0 = start + d * DAY;
                let tok = &self.toks[t];
                if day0 + DAY <= tok.created {
                    continue;
                }
                // Day-level noise: redeploys and new networks within the same provider.
                let arch = tok.arch;
                let r = &mut self.rng;
                if (arch == Arch::Bot || arch == Arch::Batch)
                    && r.gen_bool(0.04)
                    && self.toks[t].agents.len() == 1
                {
                    let a = self.toks[t].agents[0].clone();
                    let bumped = format!("{}.{}", a, r.gen_range(1..9));
                    self.toks[t].agents.push(bumped);
                    agent_idx = 1;
                }
                if (arch == Arch::Bot && r.gen_bool(0.03))
                    || (arch == Arch::Dashboard && r.gen_bool(0.04))
                {
                    let asn = self.toks[t].asns[0];
                    let p = prefix_for(asn, r.gen_range(200..400));
                    self.toks[t].nets.push((asn, p));
                }
                if arch == Arch::Dashboard && r.gen_bool(0.04) {
                    // A new common endpoint joins the user's habits.
                    let e = r.gen_range(0..LOGIN);
                    if !self.toks[t].endpoints.contains(&e) {
                        let tk = &mut self.toks[t];
                        tk.endpoints.push(e);
                        tk.weights.push(0.3);
                        tk.scopes.push(CATALOGUE[e].scope);
                    }
                }
                if let Some((at, e)) = self.toks[t].drift.adopt {
                    if at >= day0 && at < day0 + DAY && !self.toks[t].endpoints.contains(&e) {
                        let tk = &mut self.toks[t];
                        tk.endpoints.push(e);
                        tk.weights.push(0.4);
                    }
                }
                let tok = &self.toks[t];
                let local_day0 = day0 - tok.tz * HOUR;
                let dow = (day0.div_euclid(DAY) + 3).rem_euclid(7);
                let mut ds = DayState {
                    holiday: self.holiday == Some(day0),
                    ..Default::default()
                };
                if tok.drift.storms {
                    for _ in 0..self.drift_rng.gen_range(0..3) {
                        let s = day0 + self.drift_rng.gen_range(0..1440) * MIN;
                        ds.storms
                            .push((s, s + self.drift_rng.gen_range(3..9) * MIN));
                    }
                }
                match tok.arch {
                    Arch::Batch => {
                        ds.batch_start =
                            local_day0 + tok.batch_hour * HOUR + self.rng.gen_range(-10..10) * MIN;
                        ds.batch_len = self.rng.gen_range(15..45) * MIN;
                    }
                    Arch::Dashboard => {
                        let workday = dow < 5 || self.rng.gen_bool(0.08);
                        if workday && !ds.holiday {
                            for _ in 0..self.rng.gen_range(2..=5) {
                                let s = local_day0 + self.rng.gen_range(8 * 60..18 * 60) * MIN;
                                let len = self.rng.gen_range(10..60) * MIN;
                                ds.sessions.push((s, s + len));
                            }
                        }
                    }
                    _ => {}
                }
                for k in 0..1440 {
                    let m = day0 + k * MIN;
                    if m < self.toks[t].created {
                        continue;
                    }
                    let lam = self.minute_rate(t, m, &ds);
                    if lam <= 0.0 {
                        continue;
                    }
                    let n = if lam < 0.05 {
                        self.rng.gen_bool(lam) as u64
                    } else {
                        Poisson::new(lam)
                            .map(|p| p.sample(&mut self.rng) as u64)
                            .unwrap_or(0)
                    };
                    for _ in 0..n {
                        let ts = m + self.rng.gen_range(0..MIN);
                        let ep = if self.toks[t].arch == Arch::Dashboard && self.rng.gen_bool(0.02)
                        {
                            LOGIN
                        } else {
                            self.pick_ep(t)
                        };
                        let mut status = self.normal_status(ts);
                        if self.toks[t].arch == Arch::Dashboard && self.rng.gen_bool(0.003) {
                            status = 401; // expired session
                        }
                        let (net, country, agent) = self.normal_origin(t, agent_idx);
                        let (net, country, agent, mult) =
                            self.drifted(t, ts, &ds, net, country, agent, &mut status);
                        let env = self.toks[t].env;
                        self.emit(ts, t, ep, status, net, country, agent, env, 0, mult);
                    }
                }
            }
        }
    }

    fn normal_origin(&mut self, t: usize, agent_idx: usize) -> ((u32, u32), Arc<str>, Arc<str>) {
        let tok = &self.toks[t];
        match tok.arch {
            Arch::Mobile => {
                let r = &mut self.rng;
                let ci = if r.gen_bool(0.85) {
                    tok.country
                } else {
                    r.gen_range(0..COUNTRIES.len())
                };
                let c = &COUNTRIES[ci];
                let asn = c.isps[r.gen_range(0..c.isps.len())];
                let p = prefix_for(asn, r.gen_range(0..400));
                let a = tok.agents[r.gen_range(0..tok.agents.len())].clone();
                let code = c.code;
                let country = self.country(code);
                let agent = self.agent(&a);
                ((asn, p), country, agent)
            }
            _ => {
                let r = &mut self.rng;
                let net = tok.nets[r.gen_range(0..tok.nets.len())];
                let a = if tok.agents.len() > 1 && agent_idx > 0 {
                    tok.agents[tok.agents.len() - 1].clone()
                } else {
                    tok.agents[r.gen_range(0..tok.agents.len())].clone()
                };
                let code = match tok.arch {
                    Arch::Bot | Arch::Batch => cloud_country(net.0, tok.id.as_ref()),
                    _ => COUNTRIES[tok.country].code,
                };
                let country = self.country(code);
                let agent = self.agent(&a);
                (net, country, agent)
            }
        }
    }

    /// An ordinary call as the token's benign drift changes it: travel, a move, a new
    /// release's agent, a retry storm's 503s, heavy-tailed sizes (the bytes multiplier).
    #[allow(clippy::too_many_arguments)]
    fn drifted(
        &mut self,
        t: usize,
        ts: i64,
        ds: &DayState,
        net: (u32, u32),
        country: Arc<str>,
        agent: Arc<str>,
        status: &mut u16,
    ) -> ((u32, u32), Arc<str>, Arc<str>, f64) {
        let d = self.toks[t].drift.clone();
        let (mut net, mut country, mut agent) = (net, country, agent);
        if let Some((from, to, ci)) = d.travel {
            if ts >= from && ts < to {
                let c = &COUNTRIES[ci];
                let isp = c.isps[(t + ci) % c.isps.len()];
                net = (isp, prefix_for(isp, 7 + (ts - from) as u32 / DAY as u32));
                country = self.country(c.code);
            }
        }
        if let Some((at, n)) = d.moved {
            if ts >= at {
                net = n;
                let code = cloud_country(n.0, self.toks[t].id.as_ref());
                country = self.country(code);
            }
        }
        if let Some(a) = self.released_agent(t, ts, &agent) {
            agent = self.agent(&a);
        }
        if ds.storms.iter().any(|&(s, e)| ts >= s && ts < e) && self.drift_rng.gen_bool(0.3) {
            *status = 503;
        }
        let mult = if d.heavy {
            // Pareto(1.3) sizes: mostly small, now and then 10-100x.
            let u: f64 = self.drift_rng.gen_range(1e-9..1.0);
            u.powf(-1.0 / 1.3) * 0.3
        } else {
            1.0
        };
        (net, country, agent, mult)
    }

    /// Most recent calls of a token (to time incidents near its activity).
    fn usual_origin(&mut self, t: usize) -> ((u32, u32), Arc<str>, Arc<str>) {
        self.normal_origin(t, 0)
    }

    fn inject(&mut self) {
        let start = self.opts.start;
        let span = self.opts.days as i64 * DAY;
        let from = start + (span as f64 * self.opts.clean_fraction) as i64;
        let to = start + span - 2 * HOUR;
        if to - from < DAY {
            return;
        }
        let per_kind = ((self.toks.len() as f64 * 0.03).round() as usize).max(2);
        let mut used = vec![false; self.toks.len()];
        for (ki, kind) in KINDS.iter().enumerate() {
            let eligible: Vec<usize> = (0..self.toks.len())
                .filter(|&t| !used[t] && self.toks[t].created < from)
                .filter(|&t| {
                    let tk = &self.toks[t];
                    match *kind {
                        "leaked_foreign" | "token_sharing" => tk.arch != Arch::Mobile,
                        "rate_abuse" => tk.arch != Arch::Batch,
                        "offhours_exfil" => {
                            matches!(tk.arch, Arch::Dashboard | Arch::LowVolume | Arch::Batch)
                        }
                        "env_mismatch" => tk.env == "staging",
                        "slow_insider" => {
                            tk.arch == Arch::Dashboard
                                && tk.scopes.contains(&"admin")
                                && !tk.admin_user
                        }
                        _ => true,
                    }
                })
                .collect();
            let chosen: Vec<usize> = eligible
                .choose_multiple(&mut self.rng, per_kind)
                .copied()
                .collect();
            for t in chosen {
                used[t] = true;
                let at = from + self.rng.gen_range(0..(to - from - DAY).max(HOUR));
                self.incident(t, kind, (ki + 1) as u8, at);
            }
        }
    }

    fn incident(&mut self, t: usize, kind: &'static str, k: u8, at: i64) {
        let env = self.toks[t].env;
        let mut first = i64::MAX;
        let mut last = i64::MIN;
        let mut note = |ts: i64| {
            first = first.min(ts);
            last = last.max(ts);
        };
        match kind {
            "leaked_foreign" | "token_sharing" => {
                let home = COUNTRIES[self.toks[t].country].code;
                let (asn, cc, agent) = if kind == "leaked_foreign" {
                    let (asn, cc) = *HOSTING.choose(&mut self.rng).unwrap_or(&HOSTING[0]);
                    (
                        asn,
                        cc,
                        ATTACK_AGENTS
                            .choose(&mut self.rng)
                            .copied()
                            .unwrap_or("curl/8.5.0")
                            .to_string(),
                    )
                } else {
                    let others: Vec<&Country> =
                        COUNTRIES.iter().filter(|c| c.code != home).collect();
                    let c = others[self.rng.gen_range(0..others.len())];
                    (
                        c.isps[self.rng.gen_range(0..c.isps.len())],
                        c.code,
                        BROWSERS
                            .choose(&mut self.rng)
                            .copied()
                            .unwrap_or("Mozilla/5.0")
                            .to_string(),
                    )
                };
                let p = prefix_for(asn, 1000 + self.rng.gen_range(0..100));
                let country = self.country(cc);
                let agent = self.agent(&agent);
                let dur = if kind == "leaked_foreign" {
                    self.rng.gen_range(20..120)
                } else {
                    self.rng.gen_range(120..360)
                };
                let rate = if kind == "leaked_foreign" {
                    self.rng.gen_range(1.0..12.0)
                } else {
                    self.rng.gen_range(0.5..4.0)
                };
                for mi in 0..dur {
                    let m = at + mi * MIN;
                    let n = Poisson::new(rate)
                        .map(|d| d.sample(&mut self.rng) as u64)
                        .unwrap_or(1);
                    for _ in 0..n {
                        let ts = m + self.rng.gen_range(0..MIN);
                        let ep = self.pick_ep(t);
                        let st = self.normal_status(ts);
                        self.emit(
                            ts,
                            t,
                            ep,
                            st,
                            (asn, p),
                            country.clone(),
                            agent.clone(),
                            env,
                            k,
                            1.0,
                        );
                        note(ts);
                    }
                }
            }
            "rate_abuse" => {
                let (net, country, agent) = self.usual_origin(t);
                let base = match self.toks[t].arch {
                    Arch::LowVolume => 1.0,
                    _ => self.toks[t].rate,
                };
                let rate = (base * self.rng.gen_range(10.0..30.0)).max(40.0);
                let dur = self.rng.gen_range(10..40);
                for mi in 0..dur {
                    let m = at + mi * MIN;
                    let n = Poisson::new(rate)
                        .map(|d| d.sample(&mut self.rng) as u64)
                        .unwrap_or(1);
                    for _ in 0..n {
                        let ts = m + self.rng.gen_range(0..MIN);
                        let ep = self.pick_ep(t);
                        let st = if self.rng.gen_bool(0.05) { 429 } else { 200 };
                        self.emit(
                            ts,
                            t,
                            ep,
                            st,
                            net,
                            country.clone(),
                            agent.clone(),
                            env,
                            k,
                            1.0,
                        );
                        note(ts);
                    }
                }
            }
            "credential_stuffing" => {
                let (asn, cc) = if self.rng.gen_bool(0.5) {
                    *HOSTING.choose(&mut self.rng).unwrap_or(&HOSTING[0])
                } else {
                    let (net, c, _) = self.usual_origin(t);
                    (net.0, if c.as_ref() == "US" { "US" } else { "NL" })
                };
                let country = self.country(cc);
                let ua = ATTACK_AGENTS
                    .choose(&mut self.rng)
                    .copied()
                    .unwrap_or("curl/8.5.0");
                let agent = self.agent(ua);
                let prefixes: Vec<u32> = (0..self.rng.gen_range(1..5))
                    .map(|j| prefix_for(asn, 2000 + j))
                    .collect();
                let rate = self.rng.gen_range(30.0..150.0);
                let dur = self.rng.gen_range(10..30);
                for mi in 0..dur {
                    let m = at + mi * MIN;
                    let n = Poisson::new(rate)
                        .map(|d| d.sample(&mut self.rng) as u64)
                        .unwrap_or(1);
                    for _ in 0..n {
                        let ts = m + self.rng.gen_range(0..MIN);
                        let st = if self.rng.gen_bool(0.9) {
                            if self.rng.gen_bool(0.8) {
                                401
                            } else {
                                403
                            }
                        } else {
                            200
                        };
                        let p = prefixes[self.rng.gen_range(0..prefixes.len())];
                        self.emit(
                            ts,
                            t,
                            LOGIN,
                            st,
                            (asn, p),
                            country.clone(),
                            agent.clone(),
                            env,
                            k,
                            1.0,
                        );
                        note(ts);
                    }
                }
            }
            "offhours_exfil" => {
                // A quiet hour of this token: 02-04h local, or its batch's off time.
                let tz = self.toks[t].tz;
                let day = (at + tz * HOUR).div_euclid(DAY) * DAY - tz * HOUR;
                let hour = if self.toks[t].arch == Arch::Batch {
                    (self.toks[t].batch_hour + 12) % 24
                } else {
                    self.rng.gen_range(1..4)
                };
                let s = day + hour * HOUR + self.rng.gen_range(0..30) * MIN;
                let (net, country, agent) = self.usual_origin(t);
                let dur = self.rng.gen_range(20..60);
                let rate = self.rng.gen_range(2.0..8.0);
                for mi in 0..dur {
                    let m = s + mi * MIN;
                    let n = Poisson::new(rate)
                        .map(|d| d.sample(&mut self.rng) as u64)
                        .unwrap_or(1)
                        .max(1);
                    for _ in 0..n {
                        let ts = m + self.rng.gen_range(0..MIN);
                        let ep = *[EXPORT_DOWNLOAD, CUSTOMERS_LIST, EXPORT_LIST]
                            .choose(&mut self.rng)
                            .unwrap_or(&EXPORT_DOWNLOAD);
                        self.emit(
                            ts,
                            t,
                            ep,
                            200,
                            net,
                            country.clone(),
                            agent.clone(),
                            env,
                            k,
                            3.0,
                        );
                        note(ts);
                    }
                }
            }
            "scope_violation" => {
                let outside: Vec<usize> = (0..CATALOGUE.len())
                    .filter(|&e| !self.toks[t].scopes.contains(&CATALOGUE[e].scope))
                    .collect();
                if outside.is_empty() {
                    return;
                }
                let (net, country, agent) = self.usual_origin(t);
                let n = self.rng.gen_range(3..20);
                let span = self.rng.gen_range(30..120) * MIN;
                for _ in 0..n {
                    let ts = at + self.rng.gen_range(0..span);
                    let ep = outside[self.rng.gen_range(0..outside.len())];
                    let st = if self.rng.gen_bool(0.5) { 403 } else { 200 };
                    self.emit(
                        ts,
                        t,
                        ep,
                        st,
                        net,
                        country.clone(),
                        agent.clone(),
                        env,
                        k,
                        1.0,
                    );
                    note(ts);
                }
            }
            "env_mismatch" => {
                let (net, country, agent) = self.usual_origin(t);
                let n = self.rng.gen_range(5..50);
                let span = self.rng.gen_range(30..90) * MIN;
                for _ in 0..n {
                    let ts = at + self.rng.gen_range(0..span);
                    let ep = self.pick_ep(t);
                    self.emit(
                        ts,
                        t,
                        ep,
                        200,
                        net,
                        country.clone(),
                        agent.clone(),
                        "prod",
                        k,
                        1.0,
                    );
                    note(ts);
                }
            }
            "slow_insider" => {
                let sensitive: Vec<usize> = (0..CATALOGUE.len())
                    .filter(|&e| {
                        CATALOGUE[e].sensitive && self.toks[t].scopes.contains(&CATALOGUE[e].scope)
                    })
                    .collect();
                if sensitive.is_empty() {
                    return;
                }
                let (net, country, agent) = self.usual_origin(t);
                let tz = self.toks[t].tz;
                let days = self.rng.gen_range(3..=5);
                for d in 0..days {
                    let day = (at + tz * HOUR).div_euclid(DAY) * DAY - tz * HOUR + d * DAY;
                    for _ in 0..self.rng.gen_range(1..=3) {
                        let s = day + self.rng.gen_range(9 * 60..17 * 60) * MIN;
                        for _ in 0..self.rng.gen_range(1..=3) {
                            let ep = sensitive[self.rng.gen_range(0..sensitive.len())];
                            for _ in 0..self.rng.gen_range(1..=2) {
                                let ts = s + self.rng.gen_range(0..MIN);
                                self.emit(
                                    ts,
                                    t,
                                    ep,
                                    200,
                                    net,
                                    country.clone(),
                                    agent.clone(),
                                    env,
                                    k,
                                    1.0,
                                );
                                note(ts);
                            }
                        }
                    }
                }
            }
            _ => {}
        }
        let end = self.opts.start + self.opts.days as i64 * DAY - 1;
        let last = last.min(end);
        if first <= last {
            self.incidents.push((t, kind, first, last));
        }
    }
}

#[derive(Default)]
struct DayState {
    batch_start: i64,
    batch_len: i64,
    sessions: Vec<(i64, i64)>,
    /// Retry storms of the day (drift).
    storms: Vec<(i64, i64)>,
    /// The day is the holiday (drift).
    holiday: bool,
}

fn cloud_country(asn: u32, token: &str) -> &'static str {
    let regions = CLOUDS
        .iter()
        .find(|c| c.0 == asn)
        .map(|c| c.1)
        .unwrap_or(&["US"]);
    regions[(stable_hash(token) % regions.len() as u64) as usize]
}

/// The generator's own stable string hash (FNV-1a, mixed), so generated data stays the same
/// for a seed whatever the engine does with its keys.
fn stable_hash(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    crate::model::sketch::mix(h) | 1
}

/// Generate and write `events.*`, `tokens.csv` and `incidents.csv` into `opts.out`.
pub fn run(opts: &Options) -> Result<Summary, Error> {
    if opts.tokens == 0 || opts.days == 0 {
        return Err(Error::Invalid(
            "--tokens and --days must be at least 1".into(),
        ));
    }
    if !(opts.scale > 0.0 && opts.scale <= 100.0) {
        return Err(Error::Invalid("--scale must be in (0, 100]".into()));
    }
    std::fs::create_dir_all(&opts.out).map_err(|e| Error::Write {
        path: opts.out.clone(),
        reason: e.to_string(),
    })?;
    let mut g = Gen {
        rng: Xoshiro256PlusPlus::seed_from_u64(opts.seed),
        toks: Vec::new(),
        evs: Vec::new(),
        agents: Vec::new(),
        countries: Vec::new(),
        opts: opts.clone(),
        outages: Vec::new(),
        incidents: Vec::new(),
        drift_rng: Xoshiro256PlusPlus::seed_from_u64(opts.seed ^ 0xD21F_7D21_F7D2_1F7D),
        holiday: None,
    };
    // Two server-side outages a fortnight, anywhere in the period: 5xx for everybody.
    let span = opts.days as i64 * DAY;
    for _ in 0..(opts.days / 7 + 1) {
        let s = opts.start + g.rng.gen_range(0..span.max(HOUR));
        g.outages.push((s, s + g.rng.gen_range(10..30) * MIN));
    }
    g.make_tokens();
    g.make_drift();
    g.normal_traffic();
    g.inject();
    g.evs.sort_by_key(|e| e.ts);
    let ext = match opts.format {
        OutFormat::Csv => "csv",
        OutFormat::Jsonl => "jsonl",
        OutFormat::Parquet => "parquet",
    };
    let events_path = opts.out.join(format!("events.{ext}"));
    let labelled = g.evs.iter().filter(|e| e.kind > 0).count() as u64;
    write_events(&g, &events_path, opts.format)?;
    let tokens_path = opts.out.join("tokens.csv");
    write_registry(&g, &tokens_path)?;
    let inc_path = opts.out.join("incidents.csv");
    write_incidents(&g, &inc_path)?;
    Ok(Summary {
        events: g.evs.len() as u64,
        labelled,
        incidents: g.incidents.len(),
        files: vec![events_path, tokens_path, inc_path],
    })
}

fn werr(path: &Path) -> impl Fn(String) -> Error + '_ {
    move |reason| Error::Write {
        path: path.to_path_buf(),
        reason,
    }
}

fn write_events(g: &Gen, path: &Path, format: OutFormat) -> Result<(), Error> {
    let err = werr(path);
    let canonical = event_schema();
    // Text formats carry RFC 3339 timestamps, as the contract shows them.
    let schema = if format == OutFormat::Parquet {
        canonical.clone()
    } else {
        let mut f: Vec<Field> = canonical
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        f[0] = Field::new("ts", DataType::Utf8, false);
        Arc::new(Schema::new(f))
    };
    let file = File::create(path).map_err(|e| err(e.to_string()))?;
    enum W {
        Csv(arrow::csv::Writer<BufWriter<File>>),
        Json(arrow::json::LineDelimitedWriter<BufWriter<File>>),
        Pq(ArrowWriter<File>),
    }
    let mut w = match format {
        OutFormat::Csv => W::Csv(
            arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(BufWriter::new(file)),
        ),
        OutFormat::Jsonl => W::Json(arrow::json::LineDelimitedWriter::new(BufWriter::new(file))),
        OutFormat::Parquet => {
            let props = WriterProperties::builder()
                .set_compression(Compression::ZSTD(ZstdLevel::try_new(6).unwrap_or_default()))
                .set_max_row_group_row_count(Some(1 << 20))
                .build();
            W::Pq(
                ArrowWriter::try_new(file, schema.clone(), Some(props))
                    .map_err(|e| err(e.to_string()))?,
            )
        }
    };
    for chunk in g.evs.chunks(65_536) {
        let n = chunk.len();
        let mut ts_t = TimestampMillisecondBuilder::with_capacity(n);
        let mut ts_s = StringBuilder::new();
        let mut token = StringBuilder::new();
        let mut method = StringBuilder::new();
        let mut endpoint = StringBuilder::new();
        let mut status = UInt16Builder::with_capacity(n);
        let mut bytes = UInt64Builder::with_capacity(n);
        let mut latency = Float32Builder::with_capacity(n);
        let mut ip = StringBuilder::new();
        let mut country = StringBuilder::new();
        let mut asn = UInt32Builder::with_capacity(n);
        let mut agent = StringBuilder::new();
        let mut scope = StringBuilder::new();
        let mut env = StringBuilder::new();
        let mut label = UInt8Builder::with_capacity(n);
        let mut kind = StringBuilder::new();
        for e in chunk {
            if format == OutFormat::Parquet {
                ts_t.append_value(e.ts);
            } else {
                ts_s.append_value(fmt_ts(e.ts));
            }
            let c = &CATALOGUE[e.ep as usize];
            token.append_value(&g.toks[e.tok as usize].id);
            method.append_value(c.method);
            endpoint.append_value(c.path);
            status.append_value(e.status);
            bytes.append_value(e.bytes);
            latency.append_value(e.latency);
            ip.append_value(ip_text(e.ip));
            country.append_value(&e.country);
            asn.append_value(e.asn);
            agent.append_value(&e.agent);
            scope.append_value(c.scope);
            env.append_value(e.env);
            label.append_value((e.kind > 0) as u8);
            if e.kind > 0 {
                kind.append_value(KINDS[e.kind as usize - 1]);
            } else {
                kind.append_null();
            }
        }
        let ts: ArrayRef = if format == OutFormat::Parquet {
            Arc::new(ts_t.finish().with_timezone("UTC"))
        } else {
            Arc::new(ts_s.finish())
        };
        let cols: Vec<ArrayRef> = vec![
            ts,
            Arc::new(token.finish()),
            Arc::new(method.finish()),
            Arc::new(endpoint.finish()),
            Arc::new(status.finish()),
            Arc::new(bytes.finish()),
            Arc::new(latency.finish()),
            Arc::new(ip.finish()),
            Arc::new(country.finish()),
            Arc::new(asn.finish()),
            Arc::new(agent.finish()),
            Arc::new(scope.finish()),
            Arc::new(env.finish()),
            Arc::new(label.finish()),
            Arc::new(kind.finish()),
        ];
        let b = RecordBatch::try_new(schema.clone(), cols).map_err(|e| err(e.to_string()))?;
        match &mut w {
            W::Csv(x) => x.write(&b).map_err(|e| err(e.to_string()))?,
            W::Json(x) => x.write(&b).map_err(|e| err(e.to_string()))?,
            W::Pq(x) => x.write(&b).map_err(|e| err(e.to_string()))?,
        }
    }
    match w {
        W::Csv(x) => {
            let mut f = x.into_inner();
            f.flush().map_err(|e| err(e.to_string()))?;
        }
        W::Json(mut x) => {
            x.finish().map_err(|e| err(e.to_string()))?;
            let mut f = x.into_inner();
            f.flush().map_err(|e| err(e.to_string()))?;
        }
        W::Pq(x) => {
            x.close().map_err(|e| err(e.to_string()))?;
        }
    }
    Ok(())
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn write_registry(g: &Gen, path: &Path) -> Result<(), Error> {
    let err = werr(path);
    let f = File::create(path).map_err(|e| err(e.to_string()))?;
    let mut w = BufWriter::new(f);
    let mut text = String::from("token_id,owner,role,env,scopes,created_at,expires_at\n");
    for t in &g.toks {
        text.push_str(&format!(
            "{},{},{},{},{},{},\n",
            csv_field(&t.id),
            csv_field(&t.owner),
            t.arch.role(),
            t.env,
            csv_field(&t.scopes.join(" ")),
            fmt_ts(t.created)
        ));
    }
    w.write_all(text.as_bytes())
        .map_err(|e| err(e.to_string()))?;
    w.flush().map_err(|e| err(e.to_string()))
}

fn write_incidents(g: &Gen, path: &Path) -> Result<(), Error> {
    let err = werr(path);
    let mut text = String::from("token_id,kind,start,end\n");
    let mut inc = g.incidents.clone();
    inc.sort_by_key(|i| (i.2, i.0));
    for (t, kind, s, e) in inc {
        text.push_str(&format!(
            "{},{},{},{}\n",
            g.toks[t].id,
            kind,
            fmt_ts(s),
            fmt_ts(e)
        ));
    }
    std::fs::write(path, text).map_err(|e| err(e.to_string()))
}
