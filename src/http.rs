//! HTTP endpoints (hyper): `/health/live`, `/health/ready`, `/metrics` (Prometheus text).
//!
//! Ready means: state restored, not stopping, the Kafka brokers reachable (the runtime's
//! broker probe, see [`Shared::kafka_down_since`]) and the sink not retrying a PostgreSQL or
//! Kafka failure; otherwise `/health/ready` answers 503 with the reasons. The metric names
//! follow the seed document where it has one (`hmis_events_processed_total`, …) and
//! Prometheus's conventions (`promtool check metrics` accepts them, tested): base units,
//! `_total` for counters.
//!
//! The endpoints only read, and they are meant for a scraper on the same host or network:
//!
//! - the address defaults to loopback: `--http 9464` or `--http :9464` is
//!   `127.0.0.1:9464` ([`parse_listen_addr`]); any other interface is named explicitly
//!   (`--http 0.0.0.0:9464`);
//! - only `GET` and `HEAD` are served (anything else: 405 with `Allow: GET, HEAD`), and no
//!   endpoint changes state;
//! - a request's headers must arrive within [`HEADER_READ_TIMEOUT`] and fit
//!   [`MAX_HEADER_BYTES`]; a request body is never read, and one declared larger than
//!   [`MAX_BODY_BYTES`] (or of unknown length) is refused with 413; a connection lives at
//!   most [`CONNECTION_LIFETIME`], and at most [`MAX_CONNECTIONS`] are served at once.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Body as _, Bytes};
use hyper::header::{HeaderValue, ALLOW, CONNECTION, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::runtime::Shared;

/// How long a client may take to send a request's headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// The most a connection is kept, keep-alive included.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Read buffer, and so the largest request head (line and headers) accepted.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// The largest request body accepted (it is never read: no endpoint takes one).
pub const MAX_BODY_BYTES: u64 = 1024;
/// Connections served at once; more wait in the listen queue.
pub const MAX_CONNECTIONS: usize = 64;

/// Parses the HTTP address: `PORT` or `:PORT` listens on loopback (`127.0.0.1:PORT`),
/// `localhost:PORT` too; `IP:PORT` (`0.0.0.0:9464`, `[::1]:9464`) listens where it says.
pub fn parse_listen_addr(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    let loopback = |port: &str| {
        port.parse::<u16>()
            .map(|p| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), p))
            .map_err(|_| format!("`{s}`: not a port number"))
    };
    if let Some(port) = s.strip_prefix(':') {
        return loopback(port);
    }
    if let Some(port) = s.strip_prefix("localhost:") {
        return loopback(port);
    }
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return loopback(s);
    }
    s.parse::<SocketAddr>().map_err(|_| {
        format!("`{s}`: expected PORT, :PORT (loopback) or IP:PORT, e.g. 127.0.0.1:9464")
    })
}

/// [`parse_listen_addr`] for the config file's `http` (serde `deserialize_with`).
pub fn deserialize_listen_addr<'de, D>(d: D) -> Result<Option<SocketAddr>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    use serde::Deserialize as _;
    match Option::<String>::deserialize(d)? {
        None => Ok(None),
        Some(s) => parse_listen_addr(&s)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

/// Renders the Prometheus exposition text.
pub fn metrics_text(s: &Shared) -> String {
    let mut out = String::new();
    // Base units (promtool refuses `_ms`): seconds since the epoch, to the millisecond.
    let committed = s.committed.load(Ordering::Relaxed);
    out.push_str(&format!(
        "# HELP hmis_committed_frontier_timestamp_seconds Pipeline clock committed to PostgreSQL \
         (seconds since the Unix epoch; replaces hmis_committed_frontier_ms).\n\
         # TYPE hmis_committed_frontier_timestamp_seconds gauge\n\
         hmis_committed_frontier_timestamp_seconds {}.{:03}\n",
        committed / 1000,
        committed % 1000
    ));
    for (name, help, us) in [
        (
            "hmis_sink_apply_seconds_total",
            "Time spent writing flushes to PostgreSQL (one transaction each, retries included).",
            &s.sink_apply_us,
        ),
        (
            "hmis_outbox_publish_seconds_total",
            "Time spent publishing committed derived events from the outbox to Kafka.",
            &s.sink_publish_us,
        ),
    ] {
        let v = us.load(Ordering::Relaxed) as f64 / 1e6;
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v:.6}\n"
        ));
    }
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
    let reply = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed: the endpoints are read-only (GET, HEAD)\n".into(),
        );
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        r.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
        return Ok(r);
    }
    // Never read; a body of unknown length could only be bounded by reading it.
    if req
        .body()
        .size_hint()
        .upper()
        .is_none_or(|n| n > MAX_BODY_BYTES)
    {
        let mut r = reply(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body over {MAX_BODY_BYTES} bytes\n"),
        );
        r.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
        return Ok(r);
    }
    let (status, body) = match req.uri().path() {
        "/health/live" => (StatusCode::OK, "ok\n".to_string()),
        "/health/ready" => match not_ready_reason(&shared) {
            None => (StatusCode::OK, "ready\n".to_string()),
            Some(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
        },
        "/metrics" => (StatusCode::OK, metrics_text(&shared)),
        _ => (StatusCode::NOT_FOUND, "not found\n".to_string()),
    };
    let mut r = reply(status, body);
    let kind = if req.uri().path() == "/metrics" {
        "text/plain; version=0.0.4; charset=utf-8"
    } else {
        "text/plain; charset=utf-8"
    };
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(kind));
    Ok(r)
}

/// Serves the endpoints on `addr` until the process ends. Returns the bound address.
pub async fn serve(addr: SocketAddr, shared: Arc<Shared>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    if local.ip().is_loopback() {
        info!(%local, "http endpoints listening");
    } else {
        info!(%local, "http endpoints listening beyond loopback");
    }
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "http accept failed");
                    // E.g. out of file descriptors: do not spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let shared = shared.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let svc = service_fn(move |req| handle(req, shared.clone()));
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .max_buf_size(MAX_HEADER_BYTES)
                    .serve_connection(TokioIo::new(stream), svc);
                match tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
                    // A client that is slow, hangs up or sends what HTTP/1.1 refuses (an
                    // oversized head): its problem, answered or dropped.
                    Ok(Err(e)) if e.is_timeout() || e.is_incomplete_message() || e.is_parse() => {
                        debug!(error = %e, "http request refused")
                    }
                    Ok(Err(e)) => warn!(error = %e, "http connection failed"),
                    _ => {}
                }
            });
        }
    });
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_port_listens_on_loopback() {
        let lo = |p| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), p);
        assert_eq!(parse_listen_addr("9464"), Ok(lo(9464)));
        assert_eq!(parse_listen_addr(":9464"), Ok(lo(9464)));
        assert_eq!(parse_listen_addr("localhost:9464"), Ok(lo(9464)));
        assert_eq!(parse_listen_addr("127.0.0.1:0"), Ok(lo(0)));
        assert_eq!(
            parse_listen_addr("0.0.0.0:9464").unwrap().to_string(),
            "0.0.0.0:9464"
        );
        assert_eq!(
            parse_listen_addr("[::1]:9464").unwrap().to_string(),
            "[::1]:9464"
        );
        assert!(parse_listen_addr(":http").is_err());
        assert!(parse_listen_addr("99999").is_err());
        assert!(parse_listen_addr("").is_err());
        assert!(parse_listen_addr("example.org:80").is_err());
    }

    #[test]
    fn the_config_file_takes_the_same_forms() {
        #[derive(serde::Deserialize)]
        struct C {
            #[serde(default, deserialize_with = "deserialize_listen_addr")]
            http: Option<SocketAddr>,
        }
        let c: C = toml::from_str("http = \":9464\"").unwrap();
        assert_eq!(c.http.unwrap().to_string(), "127.0.0.1:9464");
        let c: C = toml::from_str("").unwrap();
        assert_eq!(c.http, None);
        assert!(toml::from_str::<C>("http = \"nowhere\"").is_err());
    }

    #[test]
    fn metric_names_follow_prometheus_conventions() {
        let text = metrics_text(&Shared::default());
        let mut names = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split(' ');
                let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
                assert!(name.starts_with("hmis_"), "{name}");
                assert_eq!(
                    kind == "counter",
                    name.ends_with("_total"),
                    "{name}: counters and only counters end in _total"
                );
                assert!(!name.ends_with("_ms"), "{name}: base units");
                names.push(name.to_string());
            }
        }
        assert!(names.contains(&"hmis_committed_frontier_timestamp_seconds".to_string()));
        assert!(text.contains("hmis_committed_frontier_timestamp_seconds 0.000\n"));
    }
}
