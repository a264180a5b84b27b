//! HTTP endpoints (hyper): `/health/live`, `/health/ready`, `/metrics` (Prometheus text).
//!
//! Ready means: state restored, the sink connected and not retrying an outage. The metric
//! names follow the seed document where it has one (`hmis_events_processed_total`, …).

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
        "hmis_ready",
        "1 when ready.",
        "gauge",
        u64::from(is_ready(s)),
    );
    out
}

fn is_ready(s: &Shared) -> bool {
    s.ready.load(Ordering::SeqCst)
        && !s.degraded.load(Ordering::SeqCst)
        && !s.stop.load(Ordering::SeqCst)
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    shared: Arc<Shared>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, body) = match req.uri().path() {
        "/health/live" => (StatusCode::OK, "ok\n".to_string()),
        "/health/ready" if is_ready(&shared) => (StatusCode::OK, "ready\n".to_string()),
        "/health/ready" => (StatusCode::SERVICE_UNAVAILABLE, "not ready\n".to_string()),
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
