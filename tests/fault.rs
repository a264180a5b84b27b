//! Fault tests: the effectively-once guarantee (contract §8, issue 5) through kill -9,
//! SIGTERM, a second instance of the same group, a PostgreSQL restart and a broker restart.
//!
//! Each test runs the real `hmis-flow` binary (`env!("CARGO_BIN_EXE_hmis-flow")`) as a
//! child process with `--clock event`, on private topics, schema and group, and compares
//! the result with an **uninterrupted run** of the same binary over the same input topics
//! into a second schema, group and set of output topics:
//! - every table of the relational picture (`common::TABLES`: `workflow_instances`,
//!   `task_instances`, `task_readiness`, `dead_letters`, orders, ...) holds the same rows,
//!   all columns but those that record *when* something was written (`common::VOLATILE_COLUMNS`);
//! - each output topic holds each event id exactly once (read_committed), the same ids as
//!   the uninterrupted run, and for derived events and alerts the same payloads in the same
//!   order per key;
//! - every input offset is committed and the outbox is empty.
//!
//! Services: the shared broker and PostgreSQL from `HMIS_TEST_BROKERS` and
//! `HMIS_TEST_DATABASE_URL`; the restart tests start their own PostgreSQL (initdb in a temp
//! folder) or broker (nisshi with SQLite storage) on free ports, so they never disturb the
//! shared ones. The tests take turns (`common::exclusive`): each pipeline uses two worker
//! threads, and the machine this is sized for has two cores.
//!
//! Sizes (measured on a busy 2-core machine, release build; `HMIS_FAULT_WORKFLOWS` overrides
//! the kill test's): the kill test generates 9,400 workflows ≈ 200k input records, the
//! issue's figure. The uninterrupted run of those takes ~35 s; the six killed incarnations
//! replay their committed prefix on every start (~2–5 s each) and redo their uncommitted tail,
//! so the test takes ~2 min. The other tests use 1,000–2,000 workflows (20k–45k records):
//! enough for several commits before the fault, small enough for the whole file to stay
//! within ~4 minutes.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use common::*;
use hmis_flow::config::Config;
use hmis_flow::workload::{generate, WorkloadConfig, WorkloadRecord};

/// eventTime of the first workflow: 2026-11-26T08:00:00Z.
const START_MS: u64 = 1_795_687_200_000;

fn shared_services() -> (String, String) {
    (env("HMIS_TEST_BROKERS"), env("HMIS_TEST_DATABASE_URL"))
}

/// A workload with bad records (dead letters) and re-sent duplicates.
fn workload(seed: u64, workflows: usize, start_ms: u64) -> Vec<WorkloadRecord> {
    generate(&WorkloadConfig {
        seed,
        workflows,
        start_ms,
        bad_record_ratio: 0.01,
        duplicate_ratio: 0.02,
    })
}

fn produce(cfg: &Config, records: &[WorkloadRecord]) {
    let n = rt()
        .block_on(hmis_flow::demo::produce(cfg, records))
        .expect("produce the workload");
    assert_eq!(n, records.len());
}

/// Runs `cfg` uninterrupted to the end of its input: the reference.
fn reference_run(cfg: &Config, scratch: &Scratch, name: &str) -> Duration {
    let mut p = Pipeline::start(cfg, scratch, name, &["--until-caught-up"]);
    p.expect_success(Duration::from_secs(300));
    p.started.elapsed()
}

/// Everything committed, published, and equal to the reference; returns a summary line.
fn assert_equivalent(cfg: &Config, reference: &Config, input_records: usize) -> String {
    let p = progress(cfg).expect("progress");
    assert_eq!(
        p.offsets, input_records as i64,
        "every input offset is committed"
    );
    assert_eq!(p.outbox, 0, "everything committed is published");
    let r = progress(reference).expect("reference progress");
    // Records read after a restart with eventTimes below the committed clock are stamped at
    // that clock, and the run completes them 1 ms past it.
    assert!(
        p.frontier == r.frontier || p.frontier == r.frontier.map(|f| f + 1),
        "the same final clock as the uninterrupted run (or 1 ms later after a drain): {:?} vs {:?}",
        p.frontier,
        r.frontier
    );
    let counts = assert_same_tables(cfg, reference);
    assert!(
        counts["workflow_instances"] > 0 && counts["task_readiness"] > 0,
        "a meaningful workload: {counts:?}"
    );
    assert!(
        counts["dead_letters"] > 0,
        "bad records were dead-lettered: {counts:?}"
    );
    let (derived, alerts, dead) = assert_same_outputs(cfg, reference);
    assert!(derived > 0);
    format!("tables {counts:?}; published {derived} derived events, {alerts} alerts, {dead} dead letters, each once")
}

fn seed() -> u64 {
    std::env::var("HMIS_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random)
}

/// GET `path` on the pipeline's HTTP address; the status code, or 0 when unreachable.
fn http_status(addr: &str, path: &str) -> u16 {
    http_get(addr, path).0
}

/// GET `path`: (status code, whole response), (0, "") when unreachable.
fn http_get(addr: &str, path: &str) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return (0, String::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .is_err()
    {
        return (0, String::new());
    }
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, buf)
}

/// A metric's value from `/metrics`.
fn metric(addr: &str, name: &str) -> Option<f64> {
    let (_, body) = http_get(addr, "/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Waits until a commit of incarnation `p` has taken the input past `share` (numerator,
/// denominator) of the `total` records (or all of it), or `p` ended.
fn wait_for_share_of_stream(
    cfg: &Config,
    p: &mut Pipeline,
    before: &Progress,
    total: i64,
    share: (usize, usize),
) {
    let target = total * share.0 as i64 / share.1 as i64;
    wait_until(
        Duration::from_secs(180),
        "a commit of this incarnation past its share of the stream",
        || {
            p.try_wait().is_some()
                || progress(cfg).is_some_and(|q| {
                    (q.frontier != before.frontier && q.offsets >= target) || q.offsets >= total
                })
        },
    );
}

#[test]
fn kill_9_at_random_moments_then_finish_equals_an_uninterrupted_run() {
    let _turn = exclusive();
    let t0 = Instant::now();
    let (brokers, db) = shared_services();
    let scratch = Scratch::new("kill");
    let cfg = private_config("fault_kill", &brokers, &db);
    let workflows = std::env::var("HMIS_FAULT_WORKFLOWS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(9_400);
    let records = workload(21, workflows, START_MS);
    let total = records.len() as i64;
    produce(&cfg, &records);
    let produced = t0.elapsed();

    let reference = sibling_config(&cfg, "fault_kill_ref", &db);
    let ref_time = reference_run(&reference, &scratch, "reference");

    let seed = seed();
    let mut rng = SmallRng::seed_from_u64(seed);
    eprintln!(
        "kill test: {total} records, seed {seed} (HMIS_FAULT_SEED), reference run {ref_time:.1?}"
    );
    const KILLS: usize = 6;
    let mut mid_stream = 0;
    let t_kills = Instant::now();
    for i in 0..KILLS {
        let workers = rng.random_range(1..=2usize).to_string();
        let before = progress(&cfg).unwrap_or_default();
        let mut p = Pipeline::start(&cfg, &scratch, &format!("run{i}"), &["--workers", &workers]);
        // Even incarnations die at a random moment of their first seconds (start-up, replay,
        // first batches); odd ones within 0.3 s of a commit of their own taking the input past
        // the next fraction of the stream (2/7, 4/7, 6/7), so the kills are spread over all of
        // it. (Within 2 s, as until session 15, the pipeline sometimes committed the whole rest
        // of the stream first, failing the mid-stream precondition below.)
        let delay = if i % 2 == 0 {
            Duration::from_millis(rng.random_range(300..4000))
        } else {
            wait_for_share_of_stream(&cfg, &mut p, &before, total, (i + 1, KILLS + 1));
            Duration::from_millis(rng.random_range(0..300))
        };
        std::thread::sleep(delay);
        assert!(
            p.try_wait().is_none(),
            "incarnation {i} ended by itself\n{}",
            p.logs()
        );
        let alive = p.started.elapsed();
        p.kill9();
        let after = progress(&cfg).unwrap_or_default();
        if after.offsets < total {
            mid_stream += 1;
        }
        eprintln!(
            "kill {i}: {workers} worker(s), kill -9 after {alive:.1?}; committed offsets {} -> {} of {total}, outbox {}",
            before.offsets, after.offsets, after.outbox
        );
    }
    let kills_time = t_kills.elapsed();
    assert!(
        mid_stream >= 4,
        "at least 4 of {KILLS} kills left input to process ({mid_stream}): resize the workload (HMIS_FAULT_WORKFLOWS)"
    );

    let t_finish = Instant::now();
    let mut last = Pipeline::start(&cfg, &scratch, "finish", &["--until-caught-up"]);
    last.expect_success(Duration::from_secs(300));
    let finish_time = t_finish.elapsed();
    let summary = assert_equivalent(&cfg, &reference, records.len());
    eprintln!(
        "kill test: {total} records produced in {produced:.1?}; reference {ref_time:.1?}; {KILLS} kills in {kills_time:.1?}; \
         finish {finish_time:.1?}; total {:.1?}\n{summary}",
        t0.elapsed()
    );
    scratch.done();
}

#[test]
fn sigterm_commits_what_was_read_and_exits_zero_in_bounded_time() {
    let _turn = exclusive();
    let (brokers, db) = shared_services();
    let scratch = Scratch::new("term");
    let cfg = private_config("fault_term", &brokers, &db);
    let records = workload(22, 1_500, START_MS);
    let total = records.len() as i64;
    produce(&cfg, &records);
    let reference = sibling_config(&cfg, "fault_term_ref", &db);
    reference_run(&reference, &scratch, "reference");

    // Mid-stream: after the first commit.
    let mut p = Pipeline::start(&cfg, &scratch, "busy", &[]);
    wait_until(Duration::from_secs(60), "a first commit", || {
        progress(&cfg).is_some_and(|q| q.frontier.is_some())
    });
    let t = Instant::now();
    p.signal("TERM");
    let status = p.wait_timeout(Duration::from_secs(30));
    let busy_exit = t.elapsed();
    assert!(
        status.is_some_and(|s| s.success()),
        "exit 0 on SIGTERM within 30 s: {status:?}\n{}",
        p.logs()
    );
    let q = progress(&cfg).unwrap();
    assert_eq!(
        q.outbox, 0,
        "everything committed was published before exiting"
    );
    let read = p.records_read().expect("summary line") as i64;
    assert!(
        q.offsets > 0 && q.offsets <= read,
        "committed offsets {} of {read} read",
        q.offsets
    );

    // Idle: caught up, nothing to do.
    let mut p = Pipeline::start(&cfg, &scratch, "idle", &[]);
    wait_until(Duration::from_secs(120), "catching up", || {
        progress(&cfg).is_some_and(|q| q.offsets == total && q.outbox == 0)
    });
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    p.signal("TERM");
    let status = p.wait_timeout(Duration::from_secs(30));
    let idle_exit = t.elapsed();
    assert!(
        status.is_some_and(|s| s.success()),
        "exit 0 on SIGTERM when idle: {status:?}\n{}",
        p.logs()
    );

    let summary = assert_equivalent(&cfg, &reference, records.len());
    eprintln!("sigterm: exit after {busy_exit:.2?} (busy, {} of {read} read committed), {idle_exit:.2?} (idle); {summary}", q.offsets);
    assert!(
        busy_exit < Duration::from_secs(15) && idle_exit < Duration::from_secs(15),
        "bounded shutdown"
    );
    scratch.done();
}

/// The PostgreSQL backend that holds `cfg`'s group lock.
fn lock_holder(cfg: &Config, db: &str) -> Option<i32> {
    let key = hmis_sinks::pg::group_lock_key(&cfg.group_id);
    let (classid, objid) = (
        (key as u64 >> 32) as u32 as i64,
        (key as u64 & 0xffff_ffff) as i64,
    );
    let db = db.to_string();
    rt().block_on(async move {
        let (c, conn) = tokio_postgres::connect(&db, tokio_postgres::NoTls).await.ok()?;
        tokio::spawn(conn);
        c.query_opt(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid::bigint = $1 AND objid::bigint = $2",
            &[&classid, &objid],
        )
        .await
        .ok()?
        .map(|r| r.get(0))
    })
}

#[test]
fn a_second_instance_of_the_group_waits_or_is_fenced_and_never_duplicates() {
    let _turn = exclusive();
    let (brokers, db) = shared_services();
    let scratch = Scratch::new("zombie");
    let cfg = private_config("fault_zombie", &brokers, &db);
    let first = workload(23, 1_000, START_MS);
    // A second chunk, after the first in eventTime, produced while a zombie sleeps.
    let second = workload(24, 500, START_MS + 30 * 86_400_000);
    let total = (first.len() + second.len()) as i64;
    produce(&cfg, &first);
    let epoch = || progress(&cfg).map(|p| p.epoch).unwrap_or(0);

    // 1. While A runs, B (same group, 2 s lock wait) gives up cleanly and claims nothing.
    let mut a = Pipeline::start(&cfg, &scratch, "a", &[]);
    wait_until(Duration::from_secs(60), "A's first commit", || {
        progress(&cfg).is_some_and(|q| q.frontier.is_some())
    });
    let e_a = epoch();
    let mut short = cfg.clone();
    short.lock_wait_secs = 2;
    let mut b = Pipeline::start(&short, &scratch, "b", &["--until-caught-up"]);
    let status = b
        .wait_timeout(Duration::from_secs(30))
        .expect("B gives up within 30 s");
    assert!(!status.success(), "B must not run alongside A");
    assert!(
        std::fs::read_to_string(&b.stderr)
            .unwrap()
            .contains("another instance holds group"),
        "B says why\n{}",
        b.logs()
    );
    assert_eq!(epoch(), e_a, "B claimed nothing");

    // 2. C (same group, long lock wait) waits while A lives and takes over when A is killed.
    let mut long = cfg.clone();
    long.lock_wait_secs = 120;
    let mut c = Pipeline::start(&long, &scratch, "c", &[]);
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        c.try_wait().is_none() && a.try_wait().is_none(),
        "both still running"
    );
    assert_eq!(epoch(), e_a, "C waits without claiming");
    a.kill9();
    wait_until(Duration::from_secs(30), "C's claim", || epoch() == e_a + 1);
    wait_until(Duration::from_secs(120), "C catching up", || {
        progress(&cfg).is_some_and(|q| q.offsets == first.len() as i64 && q.outbox == 0)
    });

    // 3. A zombie: D is frozen while idle, its PostgreSQL session is cut, new input arrives,
    //    E takes the group; D wakes up with work to do and must write nothing. (The new input
    //    is complete before E starts: in `clock = event`, input that trickles into partitions
    //    already read to their end is stamped at the clock, not at its eventTime, so a live
    //    producer would make E's result depend on timing, not on the input.)
    c.signal("TERM");
    assert!(
        c.wait_timeout(Duration::from_secs(30))
            .is_some_and(|s| s.success()),
        "{}",
        c.logs()
    );
    let mut d = Pipeline::start(&cfg, &scratch, "d", &[]);
    wait_until(Duration::from_secs(60), "D's claim", || epoch() == e_a + 2);
    wait_until(Duration::from_secs(60), "D holding the lock", || {
        lock_holder(&cfg, &db).is_some()
    });
    std::thread::sleep(Duration::from_millis(500));
    d.signal("STOP");
    let pid = lock_holder(&cfg, &db).expect("D's session");
    pg_execute(&db, &format!("SELECT pg_terminate_backend({pid})"));
    produce(&cfg, &second);
    let mut e = Pipeline::start(&long, &scratch, "e", &[]);
    wait_until(Duration::from_secs(30), "E's claim", || epoch() == e_a + 3);
    d.signal("CONT");
    let status = d.wait_timeout(Duration::from_secs(60));
    assert!(
        status.is_some_and(|s| !s.success()),
        "the zombie stops with an error: {status:?}\n{}",
        d.logs()
    );
    let d_err = std::fs::read_to_string(&d.stderr).unwrap();
    assert!(
        d_err.contains("fenced") || d_err.contains("another instance"),
        "the zombie says it was fenced\n{}",
        d.logs()
    );
    wait_until(Duration::from_secs(120), "E catching up", || {
        progress(&cfg).is_some_and(|q| q.offsets == total && q.outbox == 0)
    });
    e.signal("TERM");
    assert!(
        e.wait_timeout(Duration::from_secs(30))
            .is_some_and(|s| s.success()),
        "{}",
        e.logs()
    );

    let reference = sibling_config(&cfg, "fault_zombie_ref", &db);
    reference_run(&reference, &scratch, "reference");
    let summary = assert_equivalent(&cfg, &reference, total as usize);
    eprintln!("zombie: {total} records; {summary}");
    scratch.done();
}

#[test]
fn postgres_restarted_mid_run_is_retried_and_the_result_is_exact() {
    let _turn = exclusive();
    let pg = PrivatePg::start();
    let (brokers, _) = shared_services();
    let scratch = Scratch::new("pg");
    let cfg = private_config("fault_pg", &brokers, &pg.url());
    let records = workload(25, 2_000, START_MS);
    produce(&cfg, &records);
    let reference = sibling_config(&cfg, "fault_pg_ref", &pg.url());
    reference_run(&reference, &scratch, "reference");

    let http = format!("127.0.0.1:{}", free_port());
    let mut p = Pipeline::start(
        &cfg,
        &scratch,
        "run",
        &["--until-caught-up", "--http", &http],
    );
    wait_until(Duration::from_secs(60), "a first commit", || {
        progress(&cfg).is_some_and(|q| q.frontier.is_some())
    });
    let before = progress(&cfg).unwrap();
    pg.crash();
    let down = Instant::now();
    wait_until(
        Duration::from_secs(30),
        "readiness to report the outage",
        || http_status(&http, "/health/ready") == 503,
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        p.try_wait().is_none(),
        "the pipeline survives the outage\n{}",
        p.logs()
    );
    assert_eq!(http_status(&http, "/health/live"), 200);
    pg.start_again();
    let outage = down.elapsed();
    p.expect_success(Duration::from_secs(180));
    let summary = assert_equivalent(&cfg, &reference, records.len());
    eprintln!(
        "postgres restart: {} records, crashed at {} committed offsets, down {outage:.1?}; {summary}",
        records.len(),
        before.offsets
    );
    scratch.done();
}

/// Waits until `/health/ready` answers 503 naming Kafka and `/metrics` has `hmis_kafka_up 0`;
/// returns how long that took and the readiness body.
fn wait_for_kafka_outage_report(http: &str, p: &mut Pipeline) -> (Duration, String) {
    let t = Instant::now();
    let mut body = String::new();
    wait_until(
        Duration::from_secs(30),
        "/health/ready 503 naming kafka, and hmis_kafka_up 0",
        || {
            assert!(
                p.try_wait().is_none(),
                "the pipeline survives the outage\n{}",
                p.logs()
            );
            let (status, b) = http_get(http, "/health/ready");
            body = b;
            status == 503
                && body.contains("kafka unreachable")
                && metric(http, "hmis_kafka_up") == Some(0.0)
        },
    );
    let body = body
        .rsplit("\r\n\r\n")
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    (t.elapsed(), body)
}

/// Keeps the broker down until `outage` since `down`, checking every 100 ms that the
/// pipeline runs on, is live, and stays not ready.
fn hold_outage(http: &str, p: &mut Pipeline, down: Instant, outage: Duration) {
    while down.elapsed() < outage {
        assert!(
            p.try_wait().is_none(),
            "the pipeline survives the outage\n{}",
            p.logs()
        );
        assert_eq!(http_status(http, "/health/live"), 200);
        assert_eq!(
            http_status(http, "/health/ready"),
            503,
            "not ready for as long as the broker is down"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until `/health/ready` answers 200 and `/metrics` has `hmis_kafka_up 1`.
fn wait_for_kafka_recovery(http: &str, p: &mut Pipeline) -> Duration {
    let t = Instant::now();
    wait_until(
        Duration::from_secs(60),
        "/health/ready 200 and hmis_kafka_up 1 after the broker is back",
        || {
            assert!(p.try_wait().is_none(), "the pipeline runs on\n{}", p.logs());
            http_status(http, "/health/ready") == 200 && metric(http, "hmis_kafka_up") == Some(1.0)
        },
    );
    t.elapsed()
}

/// The broker crashes twice: mid-run (with input left to read and output to publish), and
/// when the pipeline is idle (caught up: no record arrives to show the broker is back). Each
/// time readiness must report it (503 naming Kafka, `hmis_kafka_up 0`) and recover by itself
/// once the broker is back; the pipeline never exits, and the result is exact.
#[test]
fn broker_restarted_mid_run_is_retried_and_the_result_is_exact() {
    let _turn = exclusive();
    let mut broker = PrivateBroker::start();
    let (_, db) = shared_services();
    let scratch = Scratch::new("broker");
    let cfg = private_config("fault_broker", &broker.brokers(), &db);
    let records = workload(26, 1_500, START_MS);
    produce(&cfg, &records);
    let reference = sibling_config(&cfg, "fault_broker_ref", &db);
    reference_run(&reference, &scratch, "reference");

    // No --until-caught-up: the run must still be there when the broker is back, to show
    // readiness recovering; it is stopped with SIGTERM once everything is committed.
    let http = format!("127.0.0.1:{}", free_port());
    let mut p = Pipeline::start(&cfg, &scratch, "run", &["--http", &http]);
    // Mid-run: as soon as the pipeline is ready and has read its first records. Whatever it
    // has read by the time the broker is gone, its output cannot all be published without
    // the broker.
    let total = records.len() as i64;
    // (kill -9: a clean stop lets the broker serve for a while, enough for this run to end.)
    wait_until(
        Duration::from_secs(120),
        "ready, first records read",
        || {
            http_status(&http, "/health/ready") == 200
                && metric(&http, "hmis_events_processed_total").is_some_and(|n| n > 0.0)
        },
    );
    let t_kill = Instant::now();
    broker.kill();
    eprintln!("broker killed in {:.2?}", t_kill.elapsed());
    let before = progress(&cfg).unwrap_or_default();
    assert!(
        before.offsets < total || before.outbox > 0,
        "the broker must go down mid-run: resize the workload"
    );
    let down = Instant::now();
    let (reported, body) = wait_for_kafka_outage_report(&http, &mut p);
    hold_outage(&http, &mut p, down, Duration::from_secs(3));
    broker.start_again();
    let outage = down.elapsed();
    let recovered = wait_for_kafka_recovery(&http, &mut p);
    wait_until(
        Duration::from_secs(240),
        "everything committed and published",
        || {
            assert!(p.try_wait().is_none(), "the pipeline runs on\n{}", p.logs());
            progress(&cfg).is_some_and(|q| q.offsets == total && q.outbox == 0)
        },
    );

    // Idle: only librdkafka's own signals can show the broker gone and back.
    broker.kill();
    let idle_down = Instant::now();
    let (idle_reported, _) = wait_for_kafka_outage_report(&http, &mut p);
    hold_outage(&http, &mut p, idle_down, Duration::from_secs(3));
    broker.start_again();
    let idle_recovered = wait_for_kafka_recovery(&http, &mut p);

    p.signal("TERM");
    let status = p.wait_timeout(Duration::from_secs(60));
    assert!(
        status.is_some_and(|s| s.success()),
        "exit 0 on SIGTERM: {status:?}\n{}",
        p.logs()
    );
    let summary = assert_equivalent(&cfg, &reference, records.len());
    eprintln!(
        "broker restart: {} records, stopped at {} committed offsets, down {outage:.1?}; \
         readiness 503 after {reported:.1?} (\"{body}\"), 200 again {recovered:.1?} after the \
         restart; idle: 503 after {idle_reported:.1?}, 200 again after {idle_recovered:.1?}; {summary}",
        records.len(),
        before.offsets
    );
    scratch.done();
}

/// A record that arrives after a finished run, with an eventTime below the committed clock
/// (a late event) or without one (a malformed record), is processed by the next run.
///
/// The next run replays the committed input at one time below the committed clock and
/// drops the effects of times below it (they are durable already); a record past the
/// committed offsets must therefore be stamped at or above that clock, or its effects are
/// dropped with the replay's and it is neither applied nor dead-lettered.
#[test]
fn records_arriving_after_a_finished_run_are_not_lost_by_the_next() {
    let _turn = exclusive();
    let (brokers, db) = shared_services();
    let scratch = Scratch::new("late");
    let cfg = private_config("fault_late", &brokers, &db);
    let records = workload(27, 100, START_MS);
    produce(&cfg, &records);
    Pipeline::start(&cfg, &scratch, "first", &["--until-caught-up"])
        .expect_success(Duration::from_secs(120));

    // A WORKFLOW_STARTED of a new instance dated at the workload's very start, and bytes that
    // are not JSON.
    let started = records
        .iter()
        .find(|r| r.topic == hmis_flow::workload::STATE_EVENTS_TOPIC && r.payload.starts_with(b"{"))
        .expect("a workflow event");
    let mut late: serde_json::Value = serde_json::from_slice(&started.payload).unwrap();
    assert_eq!(late["eventType"], "WORKFLOW_STARTED");
    let wid = format!("late-{}", unique(""));
    late["workflowInstanceId"] = wid.clone().into();
    late["eventId"] = format!("{wid}-started").into();
    let extra = vec![
        WorkloadRecord {
            topic: hmis_flow::workload::STATE_EVENTS_TOPIC,
            key: Some(wid.clone()),
            payload: serde_json::to_vec(&late).unwrap(),
        },
        WorkloadRecord {
            topic: hmis_flow::workload::TASK_EVENTS_TOPIC,
            key: Some(wid.clone()),
            payload: b"{\"eventId\": truncated".to_vec(),
        },
    ];
    produce(&cfg, &extra);
    Pipeline::start(&cfg, &scratch, "second", &["--until-caught-up"])
        .expect_success(Duration::from_secs(120));

    let p = progress(&cfg).unwrap();
    assert_eq!(
        p.offsets,
        (records.len() + extra.len()) as i64,
        "every offset committed"
    );
    let workflows = table_rows(&cfg, "workflow_instances");
    assert!(
        workflows.iter().any(|r| r.contains(&wid)),
        "the late WORKFLOW_STARTED was applied"
    );
    let dead = table_rows(&cfg, "dead_letters");
    assert!(
        dead.iter()
            .any(|r| r.contains("truncated") && r.contains("INVALID_JSON")),
        "the malformed record was dead-lettered"
    );
    let twice = repeated(&read_topic(&cfg.brokers, &cfg.topics.dead_letter));
    assert!(twice.is_empty(), "no dead letter twice: {twice:?}");
    scratch.done();
}

/// `clock = wall` (the default) under kill -9: what the rules derive from the clock (SLA
/// breaches, escalations, the times in derived events) depends on when records were read,
/// so there is no exact reference. What must hold: every output record once (read_committed),
/// every input offset committed, and the clock-independent state (task and workflow status,
/// progress, readiness, dead letters) equal to an uninterrupted wall-clock run's.
///
/// It found re-escalations (WORKFLOW_ESCALATED, `UNANSWERED_ESCALATION`) re-derived after a
/// restart with the same eventId but another reason, published twice (fixed in the rules:
/// their content no longer depends on which escalation fired them).
#[test]
fn wall_clock_kill_9_publishes_each_event_once_and_keeps_the_state_exact() {
    let _turn = exclusive();
    let (brokers, db) = shared_services();
    let scratch = Scratch::new("wall");
    let mut cfg = private_config("fault_wall", &brokers, &db);
    cfg.clock = hmis_flow::config::ClockMode::Wall;
    // The wall clock stamps a whole poll with nearly one time: several times faster than the
    // event clock, hence a larger workload, so that kills land mid-stream.
    let records = workload(28, 6_000, START_MS);
    let total = records.len() as i64;
    produce(&cfg, &records);
    let reference = sibling_config(&cfg, "fault_wall_ref", &db);
    reference_run(&reference, &scratch, "reference");

    let seed = seed();
    let mut rng = SmallRng::seed_from_u64(seed);
    // Six kills: even incarnations at a random moment 0.2-1.2 s after their start (start-up,
    // replay, first batches; a poll is 2,000 records), odd ones once a commit of their own
    // has taken the input past the next fraction of the stream (2/7, 4/7, 6/7), then
    // 0-0.3 s later: the restarts replay committed history whose wall-clock decisions the
    // replay cannot reproduce.
    const KILLS: usize = 6;
    let mut mid_stream = 0;
    let mut after_progress = 0;
    for i in 0..KILLS {
        let workers = rng.random_range(1..=2usize).to_string();
        let before = progress(&cfg).unwrap_or_default();
        if before.offsets >= total {
            break;
        }
        let mut p = Pipeline::start(
            &cfg,
            &scratch,
            &format!("run{i}"),
            &["--workers", &workers, "--poll-batch", "2000"],
        );
        if i % 2 == 1 {
            wait_for_share_of_stream(&cfg, &mut p, &before, total, (i + 1, KILLS + 1));
            // Within 0.3 s: the keyed core reads this workload's remaining share in about
            // a second (a 0-1 s wait let an incarnation finish the stream before its kill).
            std::thread::sleep(Duration::from_millis(rng.random_range(0..300)));
        } else {
            std::thread::sleep(Duration::from_millis(rng.random_range(200..1200)));
        }
        assert!(
            p.try_wait().is_none(),
            "incarnation {i} ended by itself\n{}",
            p.logs()
        );
        p.kill9();
        let after = progress(&cfg).unwrap_or_default();
        if after.offsets < total {
            mid_stream += 1;
            if after.offsets > 0 {
                after_progress += 1;
            }
        }
        eprintln!(
            "wall kill {i} (seed {seed}): {workers} worker(s), committed offsets {} -> {} of {total}, outbox {}",
            before.offsets, after.offsets, after.outbox
        );
    }
    assert!(
        after_progress >= 3,
        "at least 3 kills hit a stream with committed history and input left ({after_progress})"
    );
    assert!(
        mid_stream >= 3,
        "at least 3 kills left input to process ({mid_stream})"
    );
    Pipeline::start(&cfg, &scratch, "finish", &["--until-caught-up"])
        .expect_success(Duration::from_secs(300));

    let p = progress(&cfg).unwrap();
    assert_eq!(p.offsets, total, "every input offset is committed");
    assert_eq!(p.outbox, 0, "everything committed is published");
    for (table, sql) in [
        ("workflow_instances", "SELECT concat_ws('|', workflow_instance_id, status, progress_percentage) FROM workflow_instances"),
        ("task_instances", "SELECT concat_ws('|', task_instance_id, status, attempt) FROM task_instances"),
        ("task_readiness", "SELECT concat_ws('|', workflow_instance_id, task_def_id, next_attempt) FROM task_readiness"),
        ("dead_letters", "SELECT concat_ws('|', topic, partition, \"offset\", reason) FROM dead_letters"),
        ("orders", "SELECT concat_ws('|', order_id, order_status) FROM orders"),
        ("component_health", "SELECT concat_ws('|', component, status, medium_errors, low_errors, last_error_at) FROM component_health"),
        ("audit_log", "SELECT event_id FROM audit_log"),
        ("error_reports", "SELECT event_id FROM error_reports"),
    ] {
        let (g, w) = (query_texts(&cfg, sql), query_texts(&reference, sql));
        assert!(!w.is_empty() || table == "task_readiness", "{table}: a meaningful workload");
        assert!(g == w, "{table}: {} rows, the uninterrupted run has {}", g.len(), w.len());
    }
    let mut published = Vec::new();
    for topic in [
        &cfg.topics.derived,
        &cfg.topics.alerts,
        &cfg.topics.dead_letter,
    ] {
        let msgs = read_topic(&cfg.brokers, topic);
        let twice = repeated(&msgs);
        assert!(
            twice.is_empty(),
            "{topic}: {} event ids published more than once, e.g. {:?}",
            twice.len(),
            &twice[..twice.len().min(5)]
        );
        published.push(msgs.len());
    }
    let dead = read_topic(&cfg.brokers, &cfg.topics.dead_letter).len();
    assert_eq!(
        dead,
        query_texts(&cfg, "SELECT 'x' FROM dead_letters").len(),
        "one dead-letter record per dead letter"
    );
    eprintln!("wall clock: {total} records; published {published:?} (derived, alerts, dead letters), each once");
    scratch.done();
}
