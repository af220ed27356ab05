//! Thin binary: parse the command line, build the configuration, call the library, print
//! the error chain once and return an exit code.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Parser;

use tokenwatch::cli::{Cli, Command, LogFormat, ReplayArgs, ServeArgs};
use tokenwatch::config::Config;
use tokenwatch::eval::{self, Split};
use tokenwatch::generate;
use tokenwatch::ingest::{self, BadRowPolicy};
use tokenwatch::model::registry::Registry;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(args: &ReplayArgs) -> Result<(Config, Registry)> {
    let mut cfg = Config::load(args.config.as_deref())?.with_window(args.window)?;
    if let Some(s) = args.shards {
        cfg.engine.shards = s;
    }
    let registry = load_registry(args.tokens.as_deref(), args.on_bad_row)?;
    Ok((cfg, registry))
}

fn load_registry(path: Option<&Path>, policy: BadRowPolicy) -> Result<Registry> {
    let Some(p) = path else {
        return Ok(Registry::default());
    };
    let (reg, rep) = ingest::read_registry(p, policy)?;
    if rep.bad_rows > 0 {
        eprintln!("registry: {}", rep.summary());
    }
    Ok(reg)
}

fn replay_options(args: &ReplayArgs, split: Split) -> eval::Options {
    let mut o = eval::Options::new(args.events.clone());
    o.tokens = args.tokens.clone();
    o.scores_out = args.scores_out.clone();
    o.on_bad_row = args.on_bad_row;
    o.split = split;
    o.progress = std::io::stderr().is_terminal();
    o.snapshot = args.snapshot.clone();
    o
}

fn run(cli: Cli) -> Result<()> {
    #[allow(unreachable_patterns)]
    match cli.command {
        Command::Generate {
            tokens,
            days,
            seed,
            out,
            format,
            scale,
            no_drift,
        } => {
            let mut o = generate::Options::new(out);
            o.drift = !no_drift;
            o.tokens = tokens;
            o.days = days;
            o.seed = seed;
            o.format = format;
            o.scale = scale;
            o.progress = std::io::stderr().is_terminal();
            let s = generate::run(&o)?;
            println!(
                "wrote {} events ({} labelled, {} incidents): {}",
                s.events,
                s.labelled,
                s.incidents,
                s.files
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Command::Eval {
            replay,
            train_until,
            train_fraction,
            json_out,
            incidents,
            alerts_out,
            report,
            feedback,
            feedback_delay,
            policies,
        } => {
            let split = match train_until {
                Some(t) => Split::Until(
                    tokenwatch::event::parse_ts(&t)
                        .map_err(|e| anyhow::anyhow!("--train-until: {e}"))?,
                ),
                None => {
                    if !(0.0..1.0).contains(&train_fraction) {
                        bail!("--train-fraction must be in [0, 1)");
                    }
                    Split::Fraction(train_fraction)
                }
            };
            let (cfg, registry) = load(&replay)?;
            let mut o = replay_options(&replay, split);
            o.incidents = incidents;
            o.alerts_out = alerts_out;
            o.report = report;
            o.feedback = feedback;
            o.feedback_delay_ms = feedback_delay.ms;
            if let Some(p) = policies {
                o.policies = tokenwatch::respond::policy::load(&p)?;
            }
            let report = eval::run(cfg.clone(), registry, &o)?;
            print!("{}", report.render(&cfg));
            if report.metrics.is_none() {
                eprintln!("note: the file has no labels (label = 1), so no metrics were computed");
            }
            if let Some(p) = json_out {
                let text = serde_json::to_string_pretty(&report)?;
                std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
            }
        }
        Command::Replay { replay } => {
            let (cfg, registry) = load(&replay)?;
            // Every window is scored alike; labels, if the file has any, are ignored.
            let mut o = replay_options(&replay, Split::Until(i64::MIN));
            o.measure = false;
            let report = eval::run(cfg.clone(), registry, &o)?;
            print!("{}", report.render(&cfg));
        }
        Command::Serve(args) => serve(args)?,
        Command::History {
            cluster,
            out,
            partition,
        } => {
            let rt = runtime()?;
            let t0 = std::time::Instant::now();
            let pulled = rt
                .block_on(tokenwatch::cluster::pull_history(
                    &cluster, &out, &partition,
                ))
                .map_err(|e| anyhow::anyhow!(e))?;
            println!(
                "{} events from {} history chunks into {} files under {} in {:.1} s",
                pulled.events,
                pulled.chunks,
                pulled.files.len(),
                tokenwatch::store::events_dir(&out).display(),
                t0.elapsed().as_secs_f64()
            );
        }
        Command::Label {
            target,
            key,
            alert,
            verdict,
            note,
        } => {
            let rt = runtime()?;
            let r = rt.block_on(async {
                let mut c = tokenwatch::loadgen::client(&target, key.as_deref()).await?;
                c.submit_feedback(tokenwatch::server::pb::FeedbackRequest {
                    alert_id: alert.clone(),
                    verdict,
                    note,
                })
                .await
                .map(|r| r.into_inner())
                .map_err(|s| anyhow::anyhow!("SubmitFeedback: {}: {}", s.code(), s.message()))
            })?;
            println!(
                "alert {alert} on token {}: {} window(s) learned, damped: [{}], unusual windows kept out of the baseline until: {}",
                r.token_id,
                r.learned_windows,
                r.damped_signals.join(", "),
                if r.hold_until_ms > 0 {
                    tokenwatch::event::fmt_ts(r.hold_until_ms)
                } else {
                    "-".into()
                }
            );
        }
        Command::Scopes {
            data_dir,
            tokens,
            days,
            format,
        } => {
            let registry = load_registry(tokens.as_deref(), BadRowPolicy::Skip)?;
            let r = tokenwatch::scopes::from_history(&data_dir, &registry, days)?;
            match format {
                tokenwatch::cli::ScopesFormat::Table => {
                    print!("{}", tokenwatch::scopes::render_table(&r))
                }
                tokenwatch::cli::ScopesFormat::Csv => {
                    print!("{}", tokenwatch::scopes::render_csv(&r))
                }
                tokenwatch::cli::ScopesFormat::Json => {
                    println!("{}", serde_json::to_string_pretty(&r)?)
                }
            }
        }
        Command::Retrain {
            data_dir,
            from,
            to,
            tokens,
            config,
        } => {
            let ts = |s: Option<String>, flag: &str| -> Result<Option<i64>> {
                s.map(|s| {
                    tokenwatch::event::parse_ts(&s).map_err(|e| anyhow::anyhow!("{flag}: {e}"))
                })
                .transpose()
            };
            let (from, to) = (ts(from, "--from")?, ts(to, "--to")?);
            let cfg = Config::load(config.as_deref())?;
            let registry = load_registry(tokens.as_deref(), BadRowPolicy::Skip)?;
            let bar = if std::io::stderr().is_terminal() {
                indicatif::ProgressBar::new_spinner()
            } else {
                indicatif::ProgressBar::hidden()
            };
            let t0 = std::time::Instant::now();
            let (engine, pos) =
                tokenwatch::store::rebuild(&data_dir, &cfg, registry, (from, to), None, |n| {
                    if n % 65_536 < 1024 {
                        bar.set_message(format!("{n} events"));
                    }
                })?;
            bar.finish_and_clear();
            let path = tokenwatch::store::snapshot::write(
                &tokenwatch::store::snapshots_dir(&data_dir),
                &engine.snapshot_with_spill()?,
                pos,
            )?;
            let st = engine.stats();
            println!(
                "retrained on {} events ({} tokens, {} windows) in {:.1} s; snapshot {}",
                st.events + st.late,
                st.tokens,
                st.windows,
                t0.elapsed().as_secs_f64(),
                path.display()
            );
        }
        Command::Loadgen {
            target,
            events,
            batch,
            streams,
            tokens,
            key,
            risk_rate,
            list_calls,
            seed,
            span_secs,
        } => {
            let o = tokenwatch::loadgen::Options {
                target,
                events,
                batch,
                streams,
                tokens,
                key,
                risk_rate,
                list_calls,
                seed,
                span_secs,
            };
            let rt = tokenwatch::loadgen::runtime().context("starting the async runtime")?;
            let report = rt.block_on(tokenwatch::loadgen::run(&o))?;
            print!(
                "{}{}{}",
                report.render(),
                report.render_applied(),
                report.render_list()
            );
            if let Some(st) = &report.stats {
                println!(
                    "server: {} tokens known, {} tracked, {} evicted, {} reloaded, {} events untracked",
                    st.tokens, st.tracked_tokens, st.evicted_tokens, st.reloaded_tokens, st.untracked_events
                );
            }
        }
        Command::Demo { data, scores_out } => {
            let dir = find_data(&data)?;
            let cfg = Config::load(None)?;
            let registry = load_registry(Some(&dir.join("tokens.csv")), BadRowPolicy::Skip)?;
            let mut o = eval::Options::new(dir.join("events.parquet"));
            o.incidents = Some(dir.join("incidents.csv")).filter(|p| p.exists());
            o.scores_out = scores_out;
            o.progress = std::io::stderr().is_terminal();
            println!(
                "tokenwatch demo: training on the first 67% of {} and scoring the rest",
                o.events.display()
            );
            let report = eval::run(cfg.clone(), registry, &o)?;
            print!("{}", report.render(&cfg));
        }
    }
    Ok(())
}

fn find_data(dir: &Path) -> Result<PathBuf> {
    if dir.join("events.parquet").exists() {
        return Ok(dir.to_path_buf());
    }
    let beside = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    if beside.join("events.parquet").exists() {
        return Ok(beside);
    }
    bail!(
        "{}: no events.parquet here (run from the project root, or pass --data DIR)",
        dir.display()
    )
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    // A second initialisation (never in the binary) is harmless: keep the first.
    let _ = match format {
        LogFormat::Text => b.try_init(),
        LogFormat::Json => b.json().try_init(),
    };
}

/// A cluster node id when none is given: the host name and this process's id.
fn default_node_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
        .unwrap_or_else(|| "node".into());
    format!("{host}-{}", std::process::id())
}

fn serve(args: ServeArgs) -> Result<()> {
    use tokenwatch::server;
    init_logs(args.log_format);
    let cfg = Config::load(args.config.as_deref())?;
    let registry = load_registry(args.tokens.as_deref(), BadRowPolicy::Skip)?;
    let keys = match (&args.keys, args.insecure_no_auth) {
        (Some(p), _) => Some(server::auth::Keys::load(p)?),
        (None, true) => {
            tracing::warn!(
                "AUTHENTICATION IS OFF (--insecure-no-auth): anyone who reaches this port may \
                 ingest, read every token's risk and retrain. Never do this outside a lab."
            );
            None
        }
        (None, false) => bail!(
            "no API keys: pass --keys FILE (or TOKENWATCH_KEYS_FILE), lines `ROLE KEY` with \
             roles ingest, read, admin; or --insecure-no-auth to serve without authentication"
        ),
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => Some((
            std::fs::read(c).with_context(|| format!("reading {}", c.display()))?,
            std::fs::read(k).with_context(|| format!("reading {}", k.display()))?,
        )),
        _ => None,
    };
    let policies = match &args.policies {
        Some(p) => tokenwatch::respond::policy::load(p)?,
        None => tokenwatch::respond::policy::parse(
            tokenwatch::respond::policy::DEFAULT_POLICIES,
            "models/policies.toml (built in)",
        )?,
    };
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let rt = runtime()?;
    rt.block_on(async {
        if let Some(m) = args.metrics_listen {
            let mkeys = (!args.metrics_public)
                .then(|| keys.clone().map(std::sync::Arc::new))
                .flatten();
            let bound = tokenwatch::server::telemetry::install(m, mkeys.clone())
                .await
                .map_err(anyhow::Error::msg)?;
            tracing::info!(addr = %bound, key = mkeys.is_some(), "metrics at /metrics");
        }
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        let addr = listener.local_addr()?;
        let http = match &args.http {
            Some(h) => {
                let l = tokio::net::TcpListener::bind(h)
                    .await
                    .with_context(|| format!("binding the console's --http {h}"))?;
                let a = l.local_addr()?;
                if tls.is_none() && !a.ip().is_loopback() {
                    tracing::warn!(addr = %a, "the console serves without TLS on a non-loopback address: keys and session cookies cross the network in clear (use --tls-cert/--tls-key)");
                }
                Some((l, a))
            }
            None => None,
        };
        let console_addr = http.as_ref().map(|(_, a)| *a);
        tracing::info!(
            %addr,
            auth = if keys.is_some() { "bearer keys" } else { "OFF" },
            tls = tls.is_some(),
            "tokenwatch serving"
        );
        if tls.is_none() && !addr.ip().is_loopback() {
            tracing::warn!(%addr, "serving without TLS on a non-loopback address: bearer keys and events cross the network in clear (use --tls-cert/--tls-key)");
        }
        // The one line scripts and tests wait for: printed once state is recovered and every
        // RPC is served.
        let (ready, is_ready) = tokio::sync::oneshot::channel();
        let tls_on = tls.is_some();
        tokio::spawn(async move {
            if is_ready.await.is_ok() {
                if let Some(a) = console_addr {
                    println!("console on {}://{a}/", if tls_on { "https" } else { "http" });
                }
                println!("listening on {addr}");
            }
        });
        let opts = server::Options {
            config: cfg,
            registry,
            keys,
            tls,
            shutdown_grace: std::time::Duration::from_millis(args.shutdown_grace.ms.max(0) as u64),
            data_dir: Some(args.data_dir.clone()),
            policies,
            dry_run: args.dry_run,
            faults: None,
            ready: Some(ready),
            http: http.map(|(l, _)| l),
            cluster: args.cluster.clone().map(|url| tokenwatch::cluster::Options {
                url,
                node_id: args.node_id.clone().unwrap_or_else(default_node_id),
                partitions: args.partitions,
                snapshot_every: std::time::Duration::from_millis(
                    args.cluster_snapshot_every.ms.max(1000) as u64,
                ),
                history_every: std::time::Duration::from_millis(
                    args.cluster_history_every.ms.max(1000) as u64,
                ),
                work_dir: args.data_dir.join("cluster"),
                retention: std::time::Duration::from_millis(
                    args.cluster_retention.ms.max(3_600_000) as u64,
                ),
            }),
        };
        let summary = server::run(listener, opts, server::shutdown_signal()).await?;
        // Whoever started us may have stopped reading stdout: not worth failing the stop.
        use std::io::Write;
        let _ = writeln!(
            std::io::stdout(),
            "stopped: {} events, {} windows scored, {} alerts",
            summary.stats.events,
            summary.windows,
            summary.alerts
        );
        Ok(())
    })
}
