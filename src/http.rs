//! HTTP endpoints (hyper): `/health/live`, `/health/ready`, `/metrics` (Prometheus text).
//!
//! Ready means: state restored, not stopping, the Kafka brokers reachable (the runtime's
//! broker probe, see [`Shared::kafka_down_since`]) and the sink not retrying a PostgreSQL or
//! Kafka failure; otherwise `/health/ready` answers 503 with the reasons. The metric names
//! follow the seed document where it has one (`hmis_events_processed_total`, …).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::runtime::Shared;

/// Renders the Prometheus exposition text.
pub fn metrics_text(s: &Shared) -> String {
    let mut out = String::new();
    let mut counter = |name: &str, help: &str, kind: &str, v: u64| {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
        ));
    };
    counter(
        "hmis_events_processed_total",
        "Input records read from Kafka.",
        "counter",
        s.records_read.load(Ordering::Relaxed),
    );
    counter(
        "hmis_dead_letters_total",
        "Input records rejected to the dead-letter topic.",
        "counter",
        s.dead_letters.load(Ordering::Relaxed),
    );
    counter(
        "hmis_sink_batches_total",
        "Transactions committed to PostgreSQL.",
        "counter",
        s.batches_committed.load(Ordering::Relaxed),
    );
    counter(
        "hmis_sink_rows_total",
        "Rows upserted or deleted.",
        "counter",
        s.rows_written.load(Ordering::Relaxed),
    );
    counter(
        "hmis_alerts_total",
        "Alerts written to the alerts table (a batch written again after a restart may count one twice).",
        "counter",
        s.alerts_raised.load(Ordering::Relaxed),
    );
    counter(
        "hmis_error_reports_quiet_total",
        "MEDIUM and LOW ERROR_REPORTs (contract §6: counted and logged, no alert).",
        "counter",
        s.quiet_error_reports.load(Ordering::Relaxed),
    );
    counter(
        "hmis_derived_events_published_total",
        "Records published from the outbox to Kafka.",
        "counter",
        s.events_published.load(Ordering::Relaxed),
    );
    counter(
        "hmis_sink_retries_total",
        "Transient sink failures retried.",
        "counter",
        s.sink_retries.load(Ordering::Relaxed),
    );
    counter(
        "hmis_kafka_consumer_errors_total",
        "Errors reported by the Kafka consumers.",
        "counter",
        s.kafka_errors.load(Ordering::Relaxed),
    );
    counter(
        "hmis_committed_frontier_ms",
        "Pipeline clock committed to PostgreSQL (ms since epoch).",
        "gauge",
        s.committed.load(Ordering::Relaxed),
    );
    counter(
        "hmis_sink_in_flight_batches",
        "Batches waiting for the sink.",
        "gauge",
        s.in_flight.load(Ordering::Relaxed) as u64,
    );
    counter(
        "hmis_kafka_up",
        "1 while the Kafka brokers answer the broker probe (every second), 0 while they do not.",
        "gauge",
        u64::from(s.kafka_down_since.load(Ordering::SeqCst) == 0),
    );
    counter(
        "hmis_postgres_up",
        "1 unless the sink is retrying a PostgreSQL failure (the connection or a transaction).",
        "gauge",
        u64::from(s.postgres_down_since.load(Ordering::SeqCst) == 0),
    );
    let l = &s.lifecycle.0;
    let gauge = |v: &std::sync::atomic::AtomicI64| v.load(Ordering::Relaxed).max(0) as u64;
    counter(
        "hmis_state_held_records",
        "Input records held in the dataflow's state for open workflows and orders.",
        "gauge",
        gauge(&l.held_records),
    );
    counter(
        "hmis_state_live_keys",
        "Workflows and orders with state (open, or closed less than retire_after_ms ago).",
        "gauge",
        gauge(&l.live_keys),
    );
    counter(
        "hmis_state_tombstones",
        "Retired workflows and orders remembered for duplicates and late events.",
        "gauge",
        gauge(&l.tombstones),
    );
    counter(
        "hmis_state_retired_total",
        "Workflows and orders whose state was retired after closing.",
        "counter",
        l.retired_total.load(Ordering::Relaxed),
    );
    counter(
        "hmis_rederived_events_suppressed_total",
        "Derived events and alerts derived again under an id already published (e.g. after a restart), not published again.",
        "counter",
        s.republish_suppressed.load(Ordering::Relaxed),
    );
    counter(
        "hmis_sink_items_dead_lettered_total",
        "Rows, records or dead letters PostgreSQL refused for their content: dead-lettered, the rest of their flush committed.",
        "counter",
        s.sink_items_dead_lettered.load(Ordering::Relaxed),
    );
    counter(
        "hmis_unknown_reference_dead_letters_total",
        "Records dead-lettered because their workflow or template stayed unknown past the grace.",
        "counter",
        l.unknown_total.load(Ordering::Relaxed),
    );
    counter(
        "hmis_late_events_total",
        "New events for a retired workflow or order (dead-lettered).",
        "counter",
        l.late_total.load(Ordering::Relaxed),
    );
    counter(
        "hmis_duplicate_events_after_retirement_total",
        "Duplicates (same eventId) of events of a retired workflow or order, ignored.",
        "counter",
        l.duplicates_total.load(Ordering::Relaxed),
    );
    counter(
        "hmis_ready",
        "1 when ready.",
        "gauge",
        u64::from(is_ready(s)),
    );
    out
}

fn is_ready(s: &Shared) -> bool {
    not_ready_reason(s).is_none()
}

/// Why the pipeline is not ready, or `None` when it is.
fn not_ready_reason(s: &Shared) -> Option<String> {
    let since = |ms: u64| {
        let at = chrono::DateTime::from_timestamp_millis(ms as i64)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            .unwrap_or_default();
        let secs = crate::source::wall_ms().saturating_sub(ms) as f64 / 1000.0;
        format!("since {at} ({secs:.1} s)")
    };
    let mut reasons = Vec::new();
    if s.stop.load(Ordering::SeqCst) {
        reasons.push("stopping".to_string());
    } else if !s.ready.load(Ordering::SeqCst) {
        reasons.push("starting or restoring state".to_string());
    }
    match s.kafka_down_since.load(Ordering::SeqCst) {
        0 => {}
        ms => reasons.push(format!("kafka unreachable {}", since(ms))),
    }
    match s.postgres_down_since.load(Ordering::SeqCst) {
        0 => {}
        ms => reasons.push(format!("postgres failing, sink retrying {}", since(ms))),
    }
    match s.publish_retrying_since.load(Ordering::SeqCst) {
        0 => {}
        ms => reasons.push(format!("kafka publish failing, retrying {}", since(ms))),
    }
    if reasons.is_empty() {
        None
    } else {
        Some(format!("not ready: {}\n", reasons.join("; ")))
    }
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    shared: Arc<Shared>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, body) = match req.uri().path() {
        "/health/live" => (StatusCode::OK, "ok\n".to_string()),
        "/health/ready" => match not_ready_reason(&shared) {
            None => (StatusCode::OK, "ready\n".to_string()),
            Some(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
        },
        "/metrics" => (StatusCode::OK, metrics_text(&shared)),
        _ => (StatusCode::NOT_FOUND, "not found\n".to_string()),
    };
    Ok(Response::builder()
        .status(status)
        .body(Full::new(Bytes::from(body)))
        .expect("static response"))
}

/// Serves the endpoints on `addr` until the process ends. Returns the bound address.
pub async fn serve(addr: SocketAddr, shared: Arc<Shared>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    info!(%local, "http endpoints listening");
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "http accept failed");
                    continue;
                }
            };
            let shared = shared.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| handle(req, shared.clone()));
                if let Err(e) = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await
                {
                    warn!(error = %e, "http connection failed");
                }
            });
        }
    });
    Ok(local)
}
