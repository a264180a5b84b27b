//! Issue 13, items 4–7, end to end with the real binary against the real broker and
//! PostgreSQL (`HMIS_TEST_BROKERS`, `HMIS_TEST_DATABASE_URL`):
//!
//! - the administrator migrates (`hmis-flow migrate` as the `postgres` superuser) and the
//!   pipeline runs as a login role that is a member of `hmis_pipeline`, owns nothing, and
//!   still writes every table and publishes every topic;
//! - at `HMIS_LOG=info` its logs hold no patient id and no free text of the workload, although
//!   the run logged MEDIUM/LOW error reports and PostgreSQL refused rows quoting them; with
//!   `HMIS_LOG_PATIENT_DATA=1` the same lines carry them (so the scan can see a leak);
//! - every record it published matches `schemas/`;
//! - `/metrics` of a live pipeline passes `promtool check metrics`; the endpoints answer
//!   only GET and HEAD, refuse bodies and slow headers, and `--http :PORT` is loopback.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use common::{exclusive, free_port, pg_execute, private_config, query_texts, rt, Scratch, BIN};
use hmis_flow::config::Config;
use hmis_flow::workload::{generate, WorkloadConfig, WorkloadRecord};

const START_MS: u64 = 1_795_687_200_000; // 2026-11-26T10:00:00Z

/// A generated workload whose free text is unique and findable: every errorMessage, error
/// report message, cancellation reason, upstream escalation reason and audit details gets a
/// sentinel (`ftxt…`); every other errorMessage ends in `-refuse`, which a CHECK constraint
/// of the test makes PostgreSQL refuse, so the sink's refusal path runs and quotes the row.
/// Returns the records, the patient ids and the sentinels.
fn workload(seed: u64, workflows: usize) -> (Vec<WorkloadRecord>, BTreeSet<String>, Vec<String>) {
    let mut records = generate(&WorkloadConfig {
        seed,
        workflows,
        start_ms: START_MS,
        bad_record_ratio: 0.02,
        duplicate_ratio: 0.02,
    });
    let mut patients = BTreeSet::new();
    let mut sentinels = Vec::new();
    let tag = format!("{:08x}", rand::random::<u32>());
    let mut errors = 0usize;
    for r in &mut records {
        let Ok(mut v) = serde_json::from_slice::<Value>(&r.payload) else {
            continue;
        };
        if !v.is_object() {
            continue;
        }
        let mut sentinel = |refuse: bool| {
            let s = format!(
                "ftxt{tag}n{}{}",
                sentinels.len(),
                if refuse { "-refuse" } else { "" }
            );
            sentinels.push(s.clone());
            s
        };
        if v["errorMessage"].is_string() {
            // Every other errorMessage is refused by the test's CHECK constraint.
            errors += 1;
            v["errorMessage"] = sentinel(errors.is_multiple_of(2)).into();
        }
        if v["eventType"] == "ERROR_REPORT" {
            v["message"] = sentinel(false).into();
        }
        if v["escalationReason"].is_string() {
            v["escalationReason"] = sentinel(false).into();
        }
        if v["metadata"]["reason"].is_string() {
            v["metadata"]["reason"] = sentinel(false).into();
        }
        if v["eventType"] == "AUDIT_EVENT" {
            v["details"] = serde_json::json!({ "note": sentinel(false) });
        }
        if let Some(p) = v["patientId"].as_str() {
            patients.insert(p.to_string());
        }
        r.payload = serde_json::to_vec(&v).unwrap();
    }
    // MEDIUM and LOW error reports (logged, contract §6), whatever the seed made.
    for (i, severity) in ["MEDIUM", "LOW"].into_iter().enumerate() {
        let text = format!("ftxt{tag}report{i}");
        sentinels.push(text.clone());
        let v = serde_json::json!({"eventId": format!("ops-report-{tag}-{i}"),
            "eventType": "ERROR_REPORT", "eventTime": "2026-11-26T10:30:00.000Z",
            "component": "lab-gateway", "severity": severity, "message": text});
        records.push(WorkloadRecord {
            topic: hmis_flow::workload::SYSTEM_EVENTS_TOPIC,
            key: Some("lab-gateway".into()),
            payload: serde_json::to_vec(&v).unwrap(),
        });
    }
    // Patient ids also inside the malformed records (their payloads are raw bytes).
    for r in &records {
        let text = String::from_utf8_lossy(&r.payload);
        if let Some(i) = text.find("\"patientId\":\"") {
            let rest = &text[i + 13..];
            if let Some(end) = rest.find('"') {
                patients.insert(rest[..end].to_string());
            }
        }
    }
    patients.retain(|p| p.len() >= 8);
    (records, patients, sentinels)
}

/// `url` with its user replaced by `user`.
fn as_user(url: &str, user: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a postgres:// URL");
    let rest = rest.split_once('@').map_or(rest, |(_, host)| host);
    format!("{scheme}://{user}@{rest}")
}

/// Runs the binary with `args` (the config file first), the test's `HMIS_*` removed and
/// `env` set; waits for it; returns (success, stdout + stderr).
fn run_binary(
    scratch: &Scratch,
    name: &str,
    cfg: &Config,
    args: &[&str],
    env: &[(&str, &str)],
    timeout: Duration,
) -> (bool, String) {
    let config = scratch.path(&format!("{name}.toml"));
    std::fs::write(&config, toml::to_string(cfg).unwrap()).unwrap();
    let out_path = scratch.path(&format!("{name}.log"));
    let out = std::fs::File::create(&out_path).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.arg(args[0])
        .arg("--config")
        .arg(&config)
        .args(&args[1..]);
    for (k, _) in std::env::vars() {
        if k.starts_with("HMIS_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    let mut child = cmd.spawn().expect("start hmis-flow");
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = std::fs::read_to_string(&out_path).unwrap_or_default();
    (status.is_some_and(|s| s.success()), strip_ansi(&log))
}

/// `text` without terminal colour codes (`ESC [ … letter`), as the log reads.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The lines of `log` that contain any of `needles`.
fn leaks<'a>(log: &'a str, needles: impl IntoIterator<Item = &'a String>) -> Vec<String> {
    let needles: Vec<&String> = needles.into_iter().collect();
    log.lines()
        .filter_map(|l| {
            needles
                .iter()
                .find(|n| l.contains(n.as_str()))
                .map(|n| format!("`{n}` in: {l}"))
        })
        .collect()
}

fn count(cfg: &Config, sql: &str) -> i64 {
    query_texts(cfg, &format!("SELECT ({sql})::text"))[0]
        .parse()
        .unwrap()
}

/// The workload produced to `cfg`'s topics, the CHECK constraint that makes PostgreSQL
/// refuse some task rows, migrations applied by the administrator.
fn prepare(cfg: &Config, scratch: &Scratch, seed: u64) -> (BTreeSet<String>, Vec<String>) {
    let (records, patients, sentinels) = workload(seed, 25);
    assert!(patients.len() > 20, "{patients:?}");
    rt().block_on(hmis_flow::demo::produce(cfg, &records))
        .unwrap();
    let (ok, log) = run_binary(
        scratch,
        "migrate",
        cfg,
        &["migrate"],
        &[],
        Duration::from_secs(60),
    );
    assert!(ok, "hmis-flow migrate as the administrator:\n{log}");
    pg_execute(
        &cfg.database_url,
        "ALTER TABLE task_instances ADD CONSTRAINT test_refuses_marked_errors
             CHECK (error_message IS NULL OR error_message NOT LIKE '%-refuse')",
    );
    (patients, sentinels)
}

#[test]
fn the_pipeline_role_runs_it_and_the_logs_hold_no_patient_data() {
    let _one = exclusive();
    let brokers = common::env("HMIS_TEST_BROKERS");
    let database = common::env("HMIS_TEST_DATABASE_URL");
    let cfg = private_config("ops_role", &brokers, &database);
    let scratch = Scratch::new("ops_role");
    let (patients, sentinels) = prepare(&cfg, &scratch, 5);

    // The account `hmis-flow run` logs in with: a member of hmis_pipeline (docs/security.md).
    let login = format!("hmis_flow_test_{:08x}", rand::random::<u32>());
    pg_execute(
        &database,
        &format!("CREATE ROLE {login} LOGIN IN ROLE hmis_pipeline"),
    );
    let mut as_pipeline = cfg.clone();
    as_pipeline.database_url = as_user(&cfg.database_url, &login);
    let (ok, log) = run_binary(
        &scratch,
        "run",
        &as_pipeline,
        &["run", "--until-caught-up", "--clock", "event"],
        &[("HMIS_LOG", "info")],
        Duration::from_secs(300),
    );
    assert!(ok, "hmis-flow run as {login}:\n{log}");

    // It wrote every kind of output as that role.
    for (sql, what) in [
        ("SELECT count(*) FROM workflow_instances", "workflows"),
        ("SELECT count(*) FROM task_instances", "tasks"),
        ("SELECT count(*) FROM audit_log", "audit entries"),
        ("SELECT count(*) FROM error_reports", "error reports"),
        (
            "SELECT count(*) FROM dead_letters WHERE topic = 'hmis-flow.task_instances'",
            "rows PostgreSQL refused, dead-lettered",
        ),
        ("SELECT count(*) FROM hmis_input_offsets", "offsets"),
    ] {
        assert!(count(&cfg, sql) > 0, "no {what}");
    }
    assert_eq!(
        count(&cfg, "SELECT count(*) FROM hmis_outbox"),
        0,
        "all published"
    );
    let owned = count(
        &cfg,
        &format!(
            "SELECT (SELECT count(*) FROM pg_class WHERE relowner = '{login}'::regrole)
                  + (SELECT count(*) FROM pg_class WHERE relowner = 'hmis_pipeline'::regrole)"
        ),
    );
    assert_eq!(owned, 0, "the pipeline's roles own nothing");
    let published = common::schemas::assert_topics_match_schemas(&cfg);
    assert!(
        published.keys().any(|k| k.starts_with("dead-letter:")),
        "{published:?}"
    );

    // The log lines that would carry patient data ran, redacted.
    assert!(
        log.contains("error report (counted, no alert)") && log.contains("report=[redacted"),
        "MEDIUM/LOW error reports logged:\n{log}"
    );
    assert!(
        log.contains("PostgreSQL refused") && log.contains("detail: [redacted"),
        "the refusal path ran:\n{log}"
    );
    let found = leaks(&log, patients.iter().chain(sentinels.iter()));
    assert!(
        found.is_empty(),
        "{} log lines carry patient data:\n{}",
        found.len(),
        found[..found.len().min(10)].join("\n")
    );
    pg_execute(&database, &format!("DROP ROLE {login}"));
    scratch.done();
}

#[test]
fn patient_data_in_logs_is_an_explicit_opt_in() {
    let _one = exclusive();
    let brokers = common::env("HMIS_TEST_BROKERS");
    let database = common::env("HMIS_TEST_DATABASE_URL");
    let cfg = private_config("ops_optin", &brokers, &database);
    let scratch = Scratch::new("ops_optin");
    let (patients, sentinels) = prepare(&cfg, &scratch, 6);
    let (ok, log) = run_binary(
        &scratch,
        "run",
        &cfg,
        &["run", "--until-caught-up", "--clock", "event"],
        &[("HMIS_LOG", "info"), ("HMIS_LOG_PATIENT_DATA", "1")],
        Duration::from_secs(300),
    );
    assert!(ok, "{log}");
    assert!(log.contains("HMIS_LOG_PATIENT_DATA is set"), "{log}");
    let sentinels_seen = leaks(&log, sentinels.iter()).len();
    let patients_seen = leaks(&log, patients.iter()).len();
    assert!(
        sentinels_seen > 0 && patients_seen > 0,
        "with the opt-in, error-report messages and PostgreSQL's quoted rows are logged \
         ({sentinels_seen} lines with free text, {patients_seen} with patient ids):\n{log}"
    );
    scratch.done();
}

/// `(status, headers and body)` of one raw HTTP/1.1 exchange (`Connection: close`).
fn http(addr: &str, request: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The server may close before reading all of a request it refuses.
    let _ = s.write_all(request.as_bytes());
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// promtool from PATH, or `None` with a clear message outside CI.
fn promtool() -> Option<&'static str> {
    let found = Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some("promtool");
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "promtool is missing in CI: scripts/test.sh installs Debian's `prometheus` package"
    );
    eprintln!(
        "SKIPPED the promtool check: promtool is not installed (scripts/test.sh installs \
         Debian's `prometheus` package; run it, or `apt-get install prometheus`)"
    );
    None
}

#[test]
fn metrics_pass_promtool_and_the_endpoints_only_read() {
    let _one = exclusive();
    let brokers = common::env("HMIS_TEST_BROKERS");
    let database = common::env("HMIS_TEST_DATABASE_URL");
    let cfg = private_config("ops_http", &brokers, &database);
    let scratch = Scratch::new("ops_http");
    let (records, _, _) = workload(8, 10);
    rt().block_on(hmis_flow::demo::produce(&cfg, &records))
        .unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let config = scratch.path("http.toml");
    std::fs::write(&config, toml::to_string(&cfg).unwrap()).unwrap();
    let log_path = scratch.path("http.log");
    let log_file = std::fs::File::create(&log_path).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(["run", "--config"]).arg(&config).args([
        "--clock",
        "wall",
        "--http",
        &format!(":{port}"),
    ]);
    for (k, _) in std::env::vars() {
        if k.starts_with("HMIS_") {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd
        .env("HMIS_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .unwrap();
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(child.try_wait().unwrap().is_none(), "exited:\n{}", log());
        assert!(Instant::now() < deadline, "never ready:\n{}", log());
        if TcpStream::connect(&addr).is_ok()
            && http(
                &addr,
                "GET /health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
            .0 == 200
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Something counted before scraping.
    let deadline = Instant::now() + Duration::from_secs(60);
    let metrics = loop {
        let (status, text) = http(
            &addr,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert_eq!(status, 200, "{text}");
        let body = text.split_once("\r\n\r\n").unwrap().1.to_string();
        if body.contains("hmis_sink_batches_total ")
            && !body.contains("hmis_sink_batches_total 0\n")
        {
            assert!(text.contains("text/plain; version=0.0.4"), "{text}");
            break body;
        }
        assert!(Instant::now() < deadline, "no commit:\n{body}\n{}", log());
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        metrics.contains("hmis_committed_frontier_timestamp_seconds "),
        "{metrics}"
    );
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("hmis_committed_frontier_ms")),
        "renamed"
    );
    if let Some(tool) = promtool() {
        let mut p = Command::new(tool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        p.stdin
            .take()
            .unwrap()
            .write_all(metrics.as_bytes())
            .unwrap();
        let out = p.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics refuses /metrics:\n{}{}\n--- /metrics ---\n{metrics}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Read-only: GET and HEAD; anything else 405 and changes nothing.
    for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"] {
        let (status, text) = http(
            &addr,
            &format!("{method} /health/ready HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
        );
        assert_eq!(status, 405, "{method}: {text}");
        assert!(
            text.to_ascii_lowercase().contains("allow: get, head"),
            "{text}"
        );
    }
    let (status, text) = http(
        &addr,
        "HEAD /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 200, "{text}");
    assert!(text.ends_with("\r\n\r\n"), "HEAD has no body: {text:?}");
    // A body: refused unread when large or of unknown length.
    let (status, _) = http(
        &addr,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 413);
    let (status, _) = http(
        &addr,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 413);
    // Headers larger than the buffer: refused.
    let big = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let (status, _) = http(&addr, &big);
    assert!(status == 431 || status == 400 || status == 0, "{status}");
    // Headers that never finish: the connection is closed after the header timeout.
    let mut slow = TcpStream::connect(&addr).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let t = Instant::now();
    let mut buf = Vec::new();
    let _ = slow.read_to_end(&mut buf);
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "an unfinished request head is dropped (header read timeout), waited {:?}",
        t.elapsed()
    );
    // `:PORT` listens on loopback only.
    assert!(
        log()
            .lines()
            .any(|l| l.contains("http endpoints listening")
                && l.contains(&format!("127.0.0.1:{port}"))),
        "{}",
        log()
    );
    if let Some(ip) = outward_ip() {
        assert!(
            TcpStream::connect_timeout(
                &format!("{ip}:{port}").parse().unwrap(),
                Duration::from_secs(2)
            )
            .is_err(),
            "reachable on {ip}"
        );
    }

    // Still serving, then a clean stop.
    assert_eq!(
        http(
            &addr,
            "GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .0,
        200
    );
    let ok = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "no exit after SIGTERM:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{}", log());
    scratch.done();
}

/// An address of this machine other than loopback, if it has one.
fn outward_ip() -> Option<std::net::IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?; // TEST-NET-1: no packet is sent by connect
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}
