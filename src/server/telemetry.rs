//! Watching the watcher: Prometheus metrics (names prefixed `tokenwatch_`), served by
//! `serve --metrics-listen ADDR` at `/metrics`. Without a listener the calls are no-ops.

use std::net::SocketAddr;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

/// Start the exporter on `addr` (on the current tokio runtime) and describe every metric.
pub fn install(addr: SocketAddr) -> Result<(), String> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets(&[
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
        ])
        .map_err(|e| e.to_string())?
        .install()
        .map_err(|e| format!("metrics listener on {addr}: {e}"))?;
    describe_counter!(
        "tokenwatch_events_accepted_total",
        "Events accepted by Ingest"
    );
    describe_counter!(
        "tokenwatch_events_rejected_total",
        "Events rejected by Ingest (invalid)"
    );
    describe_counter!(
        "tokenwatch_events_late_total",
        "Accepted events behind the watermark (not scored)"
    );
    describe_counter!(
        "tokenwatch_windows_scored_total",
        "(token, window) pairs scored"
    );
    describe_counter!(
        "tokenwatch_alert_windows_total",
        "Windows at or above the alert threshold"
    );
    describe_counter!(
        "tokenwatch_alerts_total",
        "Policy alerts raised, by top signal and severity"
    );
    describe_counter!(
        "tokenwatch_actions_total",
        "Alert actions by action and outcome"
    );
    describe_counter!("tokenwatch_feedback_total", "Operator verdicts by verdict");
    describe_histogram!(
        "tokenwatch_ingest_seconds",
        Unit::Seconds,
        "Validating and queueing one Ingest message"
    );
    describe_histogram!(
        "tokenwatch_scoring_seconds",
        Unit::Seconds,
        "Logging and applying one engine batch (windows closed and scored included)"
    );
    describe_gauge!("tokenwatch_tokens", "Tokens tracked");
    describe_gauge!(
        "tokenwatch_model_state_bytes",
        Unit::Bytes,
        "Encoded model state of all tokens"
    );
    describe_gauge!(
        "tokenwatch_log_backlog_bytes",
        Unit::Bytes,
        "Write-ahead log not yet compacted into the history"
    );
    describe_gauge!(
        "tokenwatch_signal_precision",
        "Confirmed / labelled alerts per signal, from verdicts"
    );
    Ok(())
}
