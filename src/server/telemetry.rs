//! Watching the watcher: Prometheus metrics (names prefixed `tokenwatch_`), served by
//! `serve --metrics-listen ADDR` at `/metrics`. Without a listener the calls are no-ops.

use std::net::SocketAddr;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

/// Start the exporter on `addr` (on the current tokio runtime) and describe every metric.
pub async fn install(
    addr: SocketAddr,
    keys: Option<std::sync::Arc<super::auth::Keys>>,
) -> Result<SocketAddr, String> {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
        ])
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| format!("metrics recorder: {e}"))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("metrics listener on {addr}: {e}"))?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    if keys.is_none() && !bound.ip().is_loopback() {
        tracing::warn!(%bound, "/metrics is served without a key on a non-loopback address");
    }
    tokio::spawn(serve_metrics(listener, handle, keys));
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
    Ok(bound)
}

/// Serve `GET /metrics` (Prometheus text) on `listener`; with `keys`, only to a bearer key
/// of any role (the same keys as the API). Hand-off to hyper's HTTP/1 server: one task per
/// connection, header read timeout, nothing else routed.
async fn serve_metrics(
    listener: tokio::net::TcpListener,
    handle: metrics_exporter_prometheus::PrometheusHandle,
    keys: Option<std::sync::Arc<super::auth::Keys>>,
) {
    use http_body_util::Full;
    use hyper::{Response, StatusCode};
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let (handle, keys) = (handle.clone(), keys.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(
                move |req: hyper::Request<hyper::body::Incoming>| {
                    let (handle, keys) = (handle.clone(), keys.clone());
                    async move {
                        let authorized = keys.as_ref().is_none_or(|k| {
                            let header = req
                                .headers()
                                .get("authorization")
                                .and_then(|v| v.to_str().ok());
                            super::auth::bearer(header)
                                .is_some_and(|key| k.caller_of(key.as_bytes()).is_some())
                        });
                        let (status, body) = if req.uri().path() != "/metrics" {
                            (StatusCode::NOT_FOUND, String::from("not found\n"))
                        } else if !authorized {
                            metrics::counter!("tokenwatch_auth_failures_total", "reason" => "metrics").increment(1);
                            (
                                StatusCode::UNAUTHORIZED,
                                String::from("a bearer key is required\n"),
                            )
                        } else {
                            (StatusCode::OK, handle.render())
                        };
                        let mut resp = Response::new(Full::new(bytes::Bytes::from(body)));
                        *resp.status_mut() = status;
                        resp.headers_mut().insert(
                            "content-type",
                            hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
                        );
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                },
            );
            let io = hyper_util::rt::TokioIo::new(tcp);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(io, svc);
            let _ = conn.await;
        });
    }
}
