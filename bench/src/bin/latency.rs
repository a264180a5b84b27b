//! End-to-end detection latency in `clock = wall` (issue 3's benchmark): from a task's
//! deadline to its TASK_SLA_BREACHED being readable on `workflow-derived-events`.
//!
//! ```text
//!  1. produce: template + N open workflows, each with a task due in 30 days (the backlog)
//!  2. hmis_flow::run(clock = wall) in a thread; wait until it has read the backlog and
//!     published everything up to then (Shared counters)
//!  3. a consumer tails the derived topic from its current end
//!  4. produce M TASK_CREATED with dueAt = now + lead + uniform(0, spread)
//!  5. per TASK_SLA_BREACHED: latency = (wall clock when the consumer got it) − dueAt,
//!     split into  Kafka timestamp − eventTime (the pipeline: the frontier reaches dueAt + 1,
//!                                              the dataflow fires, gather, PostgreSQL commit,
//!                                              outbox, produce call)
//!                 seen − Kafka timestamp      (delivery to the broker and to the consumer)
//!     eventTime is the *logical* time the breach appeared at, dueAt + 1 by construction:
//!     checked, not a latency. A sampler records how far the committed and published
//!     frontiers trail the wall clock meanwhile.
//!  6. shared.stop, join; delete the private topics and schema (unless --keep)
//! ```
//!
//! Runs against the local services (`scripts/services.sh start`, then
//! `eval "$(scripts/services.sh env)"`), with private topics, schema and group like
//! `tests/e2e.rs`, so it can run next to tests and other benchmarks.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};

use hmis_bench::{
    machine_info, proc_status_bytes, schema_url, summary, wall_ms, write_result, LoadMonitor,
    Services,
};
use hmis_dataflows::events::{format_time, parse_time};
use hmis_flow::config::{ClockMode, Config, Topics};
use hmis_flow::workload::WorkloadRecord;
use hmis_flow::Shared;

#[derive(Parser, Debug)]
#[command(about = "Wall-clock SLA detection latency, deadline to derived event in Kafka")]
struct Args {
    /// Open tasks in the backlog (one workflow each, due in 30 days).
    #[arg(long, default_value_t = 100_000)]
    open: usize,
    /// Tasks whose deadline passes during the measurement.
    #[arg(long, default_value_t = 10_000)]
    deadlines: usize,
    /// Deadlines are spread uniformly over this many seconds...
    #[arg(long, default_value_t = 60.0)]
    spread_secs: f64,
    /// ...starting this many seconds after they are produced.
    #[arg(long, default_value_t = 5.0)]
    lead_secs: f64,
    /// Seconds to wait for missing breaches after the last deadline.
    #[arg(long, default_value_t = 30)]
    grace_secs: u64,
    /// Timely workers of the pipeline.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// The pipeline's tick_ms.
    #[arg(long)]
    tick_ms: Option<u64>,
    /// Seed of the deadlines.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    #[command(flatten)]
    services: Services,
    /// VACUUM the outbox table once the backlog is published (an experiment: the outbox's
    /// dead rows from the catch-up slow the publisher until autovacuum comes by).
    #[arg(long)]
    vacuum_outbox: bool,
    /// Keep the private topics and schema afterwards.
    #[arg(long)]
    keep: bool,
    /// Only delete the topics and schema of an earlier run (its id, printed at its start),
    /// e.g. one that was killed.
    #[arg(long, value_name = "ID")]
    cleanup: Option<String>,
    /// Added to the result file name: bench/results/latency-<tag>-<date>.json.
    #[arg(long)]
    tag: Option<String>,
    /// Write the result here instead.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Measure a restart instead of the latency (issue 5): catch up on the backlog of
    /// `--open` open tasks with `--until-caught-up`, then run again and time the restart
    /// (replay of the committed input, state rebuilt, caught up, committed, exited).
    /// Writes bench/results/restart-<tag>-<date>.json.
    #[arg(long)]
    restart: bool,
}

/// One TASK_SLA_BREACHED as the consumer saw it (all in ms since the epoch).
#[derive(Clone, Debug)]
struct Seen {
    task: String,
    due: u64,
    event_time: u64,
    kafka_ts: Option<u64>,
    seen: u64,
}

fn private_config(args: &Args, id: &str) -> Config {
    let p = |name: &str| format!("{id}.{name}");
    let d = Topics::default();
    let topics = Topics {
        definitions: p(&d.definitions),
        tasks: p(&d.tasks),
        orders: p(&d.orders),
        workflows: p(&d.workflows),
        system: p(&d.system),
        derived: p(&d.derived),
        alerts: p(&d.alerts),
        dead_letter: p(&d.dead_letter),
        analytics: p(&d.analytics),
    };
    let mut cfg = Config {
        brokers: args.services.brokers.clone(),
        database_url: schema_url(&args.services.database_url, id),
        group_id: id.to_string(),
        clock: ClockMode::Wall,
        until_caught_up: false,
        workers: args.workers.max(1),
        topics,
        ..Config::default()
    };
    if let Some(t) = args.tick_ms {
        cfg.tick_ms = t;
    }
    cfg
}

fn topic_names(cfg: &Config) -> Vec<String> {
    let t = &cfg.topics;
    vec![
        t.definitions.clone(),
        t.tasks.clone(),
        t.orders.clone(),
        t.workflows.clone(),
        t.system.clone(),
        t.derived.clone(),
        t.alerts.clone(),
        t.dead_letter.clone(),
        t.analytics.clone(),
    ]
}

fn backlog(open: usize, now: u64) -> Vec<WorkloadRecord> {
    let template = json!({"templateId": "bench-latency", "version": 1, "templateName": "Latency benchmark",
        "tasks": [{"taskDefId": "background", "name": "Background task"}, {"taskDefId": "timed", "name": "Timed task"}]});
    let iso = format_time(now);
    let far = format_time(now + 30 * 24 * 3_600_000);
    let mut out = Vec::with_capacity(1 + 2 * open);
    out.push(WorkloadRecord {
        topic: "workflow-definitions",
        key: Some("bench-latency:1".into()),
        payload: template.to_string().into_bytes(),
    });
    for i in 0..open {
        let wid = format!("wf-{i:08}");
        out.push(WorkloadRecord {
            topic: "workflow-state-events",
            key: Some(wid.clone()),
            payload: json!({"eventId": format!("ws-{i}"), "eventType": "WORKFLOW_STARTED", "eventTime": iso,
                "workflowInstanceId": wid, "patientId": format!("p-{i}"), "templateId": "bench-latency", "templateVersion": 1})
            .to_string()
            .into_bytes(),
        });
        let tid = format!("bg-{i:08}");
        out.push(WorkloadRecord {
            topic: "workflow-task-events",
            key: Some(tid.clone()),
            payload: json!({"eventId": format!("bc-{i}"), "eventType": "TASK_CREATED", "eventTime": iso,
                "taskInstanceId": tid, "workflowInstanceId": wid, "taskDefId": "background", "dueAt": far})
            .to_string()
            .into_bytes(),
        });
    }
    out
}

/// The deadline tasks, spread over the backlog's workflows; returns the records and dueAt per task.
fn deadline_tasks(args: &Args, now: u64) -> (Vec<WorkloadRecord>, HashMap<String, u64>) {
    let mut rng = SmallRng::seed_from_u64(args.seed);
    let iso = format_time(now);
    let lead = (args.lead_secs * 1000.0) as u64;
    let spread = ((args.spread_secs * 1000.0) as u64).max(1);
    let mut records = Vec::with_capacity(args.deadlines);
    let mut due = HashMap::new();
    for j in 0..args.deadlines {
        let w = if args.open == 0 {
            j
        } else {
            j * args.open / args.deadlines.max(1) % args.open
        };
        let wid = format!("wf-{w:08}");
        let tid = format!("timed-{j:08}");
        let d = now + lead + rng.random_range(0..spread);
        records.push(WorkloadRecord {
            topic: "workflow-task-events",
            key: Some(tid.clone()),
            payload: json!({"eventId": format!("tc-{j}"), "eventType": "TASK_CREATED", "eventTime": iso,
                "taskInstanceId": tid, "workflowInstanceId": wid, "taskDefId": "timed", "dueAt": format_time(d)})
            .to_string()
            .into_bytes(),
        });
        due.insert(tid, d);
    }
    (records, due)
}

/// Tails `topic` from its current end, recording every TASK_SLA_BREACHED.
fn start_consumer(
    cfg: &Config,
    topic: &str,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<(
    std::thread::JoinHandle<()>,
    Arc<Mutex<Vec<Seen>>>,
    Arc<Mutex<BTreeMap<String, u64>>>,
)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &cfg.brokers)
        .set("group.id", format!("{}-latency-reader", cfg.group_id))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .set("isolation.level", "read_uncommitted")
        .create()?;
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    for p in md
        .topics()
        .first()
        .map(|t| t.partitions())
        .unwrap_or_default()
    {
        let (_, high) = consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(10))?;
        tpl.add_partition_offset(topic, p.id(), Offset::Offset(high))?;
    }
    anyhow::ensure!(tpl.count() > 0, "derived topic {topic} has no partitions");
    consumer.assign(&tpl)?;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let by_type = Arc::new(Mutex::new(BTreeMap::new()));
    let (s2, t2) = (seen.clone(), by_type.clone());
    let handle = std::thread::Builder::new()
        .name("latency-consumer".into())
        .spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let Some(res) = consumer.poll(Duration::from_millis(50)) else {
                    continue;
                };
                let at = wall_ms();
                let m = match res {
                    Ok(m) => m,
                    Err(e) => {
                        eprintln!("consumer error: {e}");
                        continue;
                    }
                };
                let Some(payload) = m.payload() else { continue };
                let Ok(v) = serde_json::from_slice::<Value>(payload) else {
                    continue;
                };
                let ty = v["eventType"].as_str().unwrap_or("?").to_string();
                *t2.lock().unwrap().entry(ty.clone()).or_insert(0) += 1;
                if ty != "TASK_SLA_BREACHED" {
                    continue;
                }
                let time = |k: &str| v[k].as_str().and_then(|s| parse_time(s).ok()).unwrap_or(0);
                s2.lock().unwrap().push(Seen {
                    task: v["taskInstanceId"].as_str().unwrap_or("").to_string(),
                    due: time("dueAt"),
                    event_time: time("eventTime"),
                    kafka_ts: m.timestamp().to_millis().map(|t| t as u64),
                    seen: at,
                });
            }
        })?;
    Ok((handle, seen, by_type))
}

/// Deletes a run's private topics and schema.
async fn cleanup(args: &Args, cfg: &Config, id: &str) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions};
    let admin: AdminClient<_> = ClientConfig::new()
        .set("bootstrap.servers", &cfg.brokers)
        .create()?;
    let names = topic_names(cfg);
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let results = admin.delete_topics(&refs, &AdminOptions::new()).await?;
    let failed: Vec<String> = results
        .into_iter()
        .filter_map(|r| r.err())
        .map(|(topic, code)| format!("{topic}: {code}"))
        .collect();
    if !failed.is_empty() {
        eprintln!("topics not deleted: {}", failed.join(", "));
    }
    let (client, conn) =
        tokio_postgres::connect(&args.services.database_url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{id}\" CASCADE"))
        .await?;
    Ok(())
}

/// PostgreSQL's statistics of the outbox table: dead rows and when autovacuum last ran,
/// relative to `t0` (when the deadlines were produced).
async fn outbox_stats(cfg: &Config, t0: u64) -> anyhow::Result<Value> {
    let (client, conn) = tokio_postgres::connect(&cfg.database_url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let row = client
        .query_one(
            "SELECT n_live_tup, n_dead_tup, autovacuum_count, vacuum_count,
                    (extract(epoch FROM last_autovacuum) * 1000)::float8,
                    (extract(epoch FROM last_autoanalyze) * 1000)::float8
             FROM pg_stat_user_tables WHERE schemaname = current_schema() AND relname = 'hmis_outbox'",
            &[],
        )
        .await?;
    let rel = |ms: Option<f64>| ms.map(|m| ((m - t0 as f64) / 100.0).round() / 10.0);
    Ok(json!({
        "live_rows": row.get::<_, i64>(0),
        "dead_rows": row.get::<_, i64>(1),
        "autovacuum_count": row.get::<_, i64>(2),
        "vacuum_count": row.get::<_, i64>(3),
        "last_autovacuum_s_after_deadlines_produced": rel(row.get(4)),
        "last_autoanalyze_s_after_deadlines_produced": rel(row.get(5)),
    }))
}

/// mimalloc instead of glibc's malloc: allocation and free were a fifth of the dataflow's
/// profile (docs/engine.md, session 13).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn wait_until(
    what: &str,
    timeout: Duration,
    shared: &Shared,
    mut done: impl FnMut() -> bool,
) -> anyhow::Result<Duration> {
    let t = Instant::now();
    while !done() {
        if let Some(f) = shared.fatal.lock().unwrap().clone() {
            anyhow::bail!("pipeline failed while waiting for {what}: {f}");
        }
        anyhow::ensure!(
            t.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(t.elapsed())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let machine = machine_info();
    let load = LoadMonitor::start();
    let run_started = Instant::now();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if let Some(id) = &args.cleanup {
        return rt.block_on(cleanup(&args, &private_config(&args, id), id));
    }
    let id = format!("bench_lat_{}_{}", std::process::id(), rand::random::<u32>());
    let cfg = private_config(&args, &id);
    eprintln!("private topics/schema/group: {id}");

    // Schema and topics.
    rt.block_on(async {
        let (client, conn) =
            tokio_postgres::connect(&args.services.database_url, tokio_postgres::NoTls)
                .await
                .context("connecting to PostgreSQL")?;
        tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE SCHEMA \"{id}\""))
            .await?;
        hmis_flow::demo::create_topics(&cfg)
            .await
            .context("creating topics")?;
        Ok::<_, anyhow::Error>(())
    })?;

    let result = if args.restart {
        measure_restart(&args, &cfg, &rt)
    } else {
        measure(&args, &cfg, &rt)
    };

    if !args.keep {
        if let Err(e) = rt.block_on(cleanup(&args, &cfg, &id)) {
            eprintln!("cleanup of {id} failed: {e:#}");
        }
    }

    let mut result = result?;
    result["machine"] = machine;
    result["load"] = load.finish();
    result["total_seconds"] = json!((run_started.elapsed().as_secs_f64() * 10.0).round() / 10.0);
    eprintln!("load during the run: {}", result["load"]);
    let name = if args.restart { "restart" } else { "latency" };
    let path = write_result(name, args.tag.as_deref(), args.out.as_ref(), &result)?;
    println!("\nwrote {}", path.display());
    Ok(())
}

/// Runs the pipeline in this process until it has caught up and exited; returns the seconds
/// to exit, to readiness (state restored), and the run's summary.
fn run_until_caught_up(cfg: &Config) -> anyhow::Result<(f64, Option<f64>, hmis_flow::RunSummary)> {
    let mut cfg = cfg.clone();
    cfg.until_caught_up = true;
    let shared = Arc::new(Shared::default());
    let run_shared = shared.clone();
    let t = Instant::now();
    let pipeline = std::thread::Builder::new()
        .name("pipeline".into())
        .spawn(move || hmis_flow::run(cfg, run_shared))?;
    let mut ready = None;
    while !pipeline.is_finished() {
        if ready.is_none() && shared.ready.load(Ordering::SeqCst) {
            ready = Some(t.elapsed().as_secs_f64());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let summary = pipeline
        .join()
        .map_err(|_| anyhow::anyhow!("pipeline thread panicked"))??;
    Ok((t.elapsed().as_secs_f64(), ready, summary))
}

/// Issue 5's restart time: the backlog caught up by a first run, then a second run over the
/// same committed input (nothing new), timed from its start to its exit.
fn measure_restart(
    args: &Args,
    cfg: &Config,
    rt: &tokio::runtime::Runtime,
) -> anyhow::Result<Value> {
    let records = backlog(args.open, wall_ms());
    let n = records.len();
    let t = Instant::now();
    rt.block_on(hmis_flow::demo::produce(cfg, &records))?;
    drop(records);
    eprintln!(
        "produced {n} records ({} open tasks) in {:.1}s",
        args.open,
        t.elapsed().as_secs_f64()
    );
    let rss_start = proc_status_bytes("VmRSS").unwrap_or(0);
    let (first_secs, _, first) = run_until_caught_up(cfg)?;
    let first_peak = proc_status_bytes("VmHWM").unwrap_or(0);
    eprintln!(
        "first run: caught up on {} records in {first_secs:.1}s (peak RSS {:.2} GB)",
        first.records_read,
        first_peak as f64 / 1e9
    );
    let rss_between = proc_status_bytes("VmRSS").unwrap_or(0);
    // Reset the peak (Linux >= 4.0), so the restart's own peak is measured.
    let peak_reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let (restart_secs, ready_secs, second) = run_until_caught_up(cfg)?;
    let restart_peak = proc_status_bytes("VmHWM").unwrap_or(0);
    eprintln!(
        "restart: state of {} open tasks rebuilt from {} records, ready after {:.1}s, caught up and exited after {restart_secs:.1}s (peak RSS {:.2} GB)",
        args.open,
        second.records_read,
        ready_secs.unwrap_or(f64::NAN),
        restart_peak as f64 / 1e9
    );
    anyhow::ensure!(
        second.records_read as usize == n,
        "the restart replayed {} records, {n} expected",
        second.records_read
    );
    let r2 = |x: f64| (x * 100.0).round() / 100.0;
    Ok(json!({
        "benchmark": "restart",
        "open_tasks": args.open,
        "input_records": n,
        "workers": args.workers,
        "clock": "wall",
        "first_run": {
            "seconds": r2(first_secs),
            "records_read": first.records_read,
            "published": first.published,
            "peak_rss_bytes": first_peak,
            "rss_before_bytes": rss_start,
        },
        "restart": {
            "seconds_to_exit": r2(restart_secs),
            "seconds_to_ready": ready_secs.map(r2),
            "records_replayed": second.records_read,
            "published": second.published,
            "rss_before_bytes": rss_between,
            "peak_rss_bytes": restart_peak,
            "peak_reset": peak_reset,
            "microseconds_per_open_task": r2(restart_secs * 1e6 / args.open.max(1) as f64),
            "peak_rss_bytes_per_open_task": (restart_peak.saturating_sub(rss_start) as f64 / args.open.max(1) as f64).round(),
        },
    }))
}

fn measure(args: &Args, cfg: &Config, rt: &tokio::runtime::Runtime) -> anyhow::Result<Value> {
    // 1. The backlog.
    let now = wall_ms();
    let records = backlog(args.open, now);
    let t = Instant::now();
    rt.block_on(hmis_flow::demo::produce(cfg, &records))?;
    let produce_backlog_secs = t.elapsed().as_secs_f64();
    eprintln!(
        "produced backlog: {} records in {produce_backlog_secs:.1}s",
        records.len()
    );
    let n = records.len() as u64;
    drop(records);
    let rss_before_pipeline = proc_status_bytes("VmRSS").unwrap_or(0);

    // 2. The pipeline, caught up.
    let shared = Arc::new(Shared::default());
    let (run_cfg, run_shared) = (cfg.clone(), shared.clone());
    let pipeline = std::thread::Builder::new()
        .name("pipeline".into())
        .spawn(move || hmis_flow::run(run_cfg, run_shared))?;
    let outcome = (|| {
        let read_secs = wait_until(
            "the backlog to be read",
            Duration::from_secs(1800),
            &shared,
            || shared.records_read.load(Ordering::SeqCst) >= n,
        )?;
        let read_at = wall_ms();
        let published_secs = wait_until(
            "the backlog's effects to be published",
            Duration::from_secs(1800),
            &shared,
            || shared.published.load(Ordering::SeqCst) > read_at + 1,
        )?;
        let catch_up_secs = read_secs.as_secs_f64() + published_secs.as_secs_f64();
        eprintln!(
            "pipeline caught up: read {n} records in {:.1}s, published after {catch_up_secs:.1}s ({} derived events, {} rows)",
            read_secs.as_secs_f64(),
            shared.events_published.load(Ordering::SeqCst),
            shared.rows_written.load(Ordering::SeqCst)
        );
        let rss_caught_up = proc_status_bytes("VmRSS").unwrap_or(0);
        let vacuum_secs = if args.vacuum_outbox {
            let t = Instant::now();
            rt.block_on(async {
                let (client, conn) =
                    tokio_postgres::connect(&cfg.database_url, tokio_postgres::NoTls).await?;
                tokio::spawn(conn);
                client.batch_execute("VACUUM ANALYZE hmis_outbox").await?;
                Ok::<_, anyhow::Error>(())
            })?;
            eprintln!("vacuumed hmis_outbox in {:.1}s", t.elapsed().as_secs_f64());
            Some(t.elapsed().as_secs_f64())
        } else {
            None
        };

        // 3. The consumer, from the derived topic's current end.
        let stop = Arc::new(AtomicBool::new(false));
        let (consumer, seen, by_type) = start_consumer(cfg, &cfg.topics.derived, stop.clone())?;

        // The pipeline's own progress while the deadlines pass: how far the committed and the
        // published frontiers trail the wall clock, and how many batches wait for the sink.
        let sampler = {
            let (shared, stop) = (shared.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut samples = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let now = wall_ms();
                    samples.push((
                        now,
                        now as i64 - shared.committed.load(Ordering::SeqCst) as i64,
                        now as i64 - shared.published.load(Ordering::SeqCst) as i64,
                        shared.in_flight.load(Ordering::SeqCst) as i64,
                    ));
                    std::thread::sleep(Duration::from_millis(20));
                }
                samples
            })
        };

        // 4. The deadlines.
        let now = wall_ms();
        let (timed, due) = deadline_tasks(args, now);
        let t = Instant::now();
        rt.block_on(hmis_flow::demo::produce(cfg, &timed))?;
        let produce_deadlines_secs = t.elapsed().as_secs_f64();
        let first_due = due.values().min().copied().unwrap_or(now);
        let last_due = due.values().max().copied().unwrap_or(now);
        eprintln!(
            "produced {} deadline tasks in {produce_deadlines_secs:.2}s; deadlines from +{:.1}s to +{:.1}s",
            timed.len(),
            first_due.saturating_sub(now) as f64 / 1000.0,
            last_due.saturating_sub(now) as f64 / 1000.0
        );
        let produced_late = wall_ms() > first_due;

        // 5. Wait for the breaches.
        let give_up = last_due + args.grace_secs * 1000;
        let mut last_report = Instant::now();
        let mut rss_peak_window = 0;
        loop {
            let got = seen.lock().unwrap().len();
            rss_peak_window = rss_peak_window.max(proc_status_bytes("VmRSS").unwrap_or(0));
            if got >= due.len() || wall_ms() > give_up {
                break;
            }
            if let Some(f) = shared.fatal.lock().unwrap().clone() {
                anyhow::bail!("pipeline failed during the measurement: {f}");
            }
            if last_report.elapsed() > Duration::from_secs(10) {
                let due_by_now = due.values().filter(|&&d| d < wall_ms()).count();
                eprintln!("  {got} breaches seen, {due_by_now} deadlines passed");
                last_report = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        stop.store(true, Ordering::SeqCst);
        let _ = consumer.join();
        let samples = sampler.join().unwrap_or_default();
        let outbox_stats = rt
            .block_on(outbox_stats(cfg, now))
            .unwrap_or_else(|e| json!({"error": format!("{e:#}")}));
        let seen = seen.lock().unwrap().clone();
        let by_type = by_type.lock().unwrap().clone();
        Ok::<_, anyhow::Error>((
            catch_up_secs,
            read_secs,
            rss_caught_up,
            rss_peak_window,
            produce_deadlines_secs,
            produced_late,
            now,
            due,
            seen,
            by_type,
            samples,
            vacuum_secs,
            outbox_stats,
        ))
    })();
    shared.stop.store(true, Ordering::SeqCst);
    let stop_started = Instant::now();
    let run_result = pipeline
        .join()
        .map_err(|_| anyhow::anyhow!("pipeline thread panicked"))?;
    let stop_secs = stop_started.elapsed().as_secs_f64();
    let (
        catch_up_secs,
        read_secs,
        rss_caught_up,
        rss_peak_window,
        produce_deadlines_secs,
        produced_late,
        t0,
        due,
        seen,
        by_type,
        samples,
        vacuum_secs,
        outbox_stats,
    ) = outcome?;
    let summary_run = run_result.context("pipeline run")?;

    // 6. Figures.
    let mut first_seen: HashMap<&str, &Seen> = HashMap::new();
    let mut duplicates = 0;
    let mut unexpected = 0;
    for s in &seen {
        if !due.contains_key(&s.task) {
            unexpected += 1;
            continue;
        }
        if first_seen.insert(s.task.as_str(), s).is_some() {
            duplicates += 1;
        }
    }
    let missing = due.len() - first_seen.len();
    let wrong_due = first_seen
        .values()
        .filter(|s| due[&s.task] != s.due)
        .count();
    let early = first_seen
        .values()
        .filter(|s| s.event_time <= s.due)
        .count();
    let total: Vec<i64> = first_seen
        .values()
        .map(|s| s.seen as i64 - s.due as i64)
        .collect();
    let fire: Vec<i64> = first_seen
        .values()
        .map(|s| s.event_time as i64 - s.due as i64)
        .collect();
    let publish: Vec<i64> = first_seen
        .values()
        .filter_map(|s| s.kafka_ts.map(|k| k as i64 - s.event_time as i64))
        .collect();
    let deliver: Vec<i64> = first_seen
        .values()
        .filter_map(|s| s.kafka_ts.map(|k| s.seen as i64 - k as i64))
        .collect();

    // Latency by 5-second window of dueAt, to tell a warm-up or a periodic stall from noise.
    let mut windows: BTreeMap<u64, Vec<i64>> = BTreeMap::new();
    for s in first_seen.values() {
        windows
            .entry(s.due.saturating_sub(t0) / 5000 * 5)
            .or_default()
            .push(s.seen as i64 - s.due as i64);
    }
    let by_window: Vec<Value> = windows
        .iter()
        .map(|(w, v)| {
            let mut s = summary(v);
            s["due_from_s"] = json!(w);
            s
        })
        .collect();
    // The frontier samples, by the same 5-second windows (of wall time since t0).
    let mut sample_windows: BTreeMap<u64, (Vec<i64>, Vec<i64>, Vec<i64>)> = BTreeMap::new();
    for (at, commit_lag, publish_lag, in_flight) in &samples {
        let w = sample_windows
            .entry(at.saturating_sub(t0) / 5000 * 5)
            .or_default();
        w.0.push(*commit_lag);
        w.1.push(*publish_lag);
        w.2.push(*in_flight);
    }
    let frontier_by_window: Vec<Value> = sample_windows
        .iter()
        .map(|(w, (c, p, f))| {
            json!({"from_s": w, "committed_lag_ms": summary(c), "published_lag_ms": summary(p), "batches_waiting_for_sink": summary(f)})
        })
        .collect();
    let mut worst: Vec<&&Seen> = first_seen.values().collect();
    worst.sort_by_key(|s| std::cmp::Reverse(s.seen as i64 - s.due as i64));
    let worst: Vec<Value> = worst
        .iter()
        .take(10)
        .map(|s| {
            json!({"task": s.task, "due_offset_ms": s.due as i64 - t0 as i64, "latency_ms": s.seen as i64 - s.due as i64,
                "fire_ms": s.event_time as i64 - s.due as i64,
                "pipeline_ms": s.kafka_ts.map(|k| k as i64 - s.event_time as i64),
                "deliver_ms": s.kafka_ts.map(|k| s.seen as i64 - k as i64)})
        })
        .collect();

    let lat = summary(&total);
    println!();
    println!("| detection latency, deadline → TASK_SLA_BREACHED seen in Kafka (ms) | count | p50 | p90 | p99 | max |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (name, s) in [
        ("total: seen − dueAt", &lat),
        (
            "check: eventTime − dueAt (logical, always 1)",
            &summary(&fire),
        ),
        ("pipeline: Kafka timestamp − eventTime", &summary(&publish)),
        ("delivery: seen − Kafka timestamp", &summary(&deliver)),
    ] {
        println!(
            "| {name} | {} | {} | {} | {} | {} |",
            s["count"], s["p50"], s["p90"], s["p99"], s["max"]
        );
    }
    println!();
    println!(
        "{} open tasks + {} deadlines over {} s; missing {missing}, duplicates {duplicates}, fired at or before dueAt {early}; catch-up {catch_up_secs:.1}s",
        args.open, args.deadlines, args.spread_secs
    );
    let goal_met = lat["p99"].as_i64().is_some_and(|p| p < 1000) && missing == 0;
    println!(
        "goal p99 < 1000 ms: {}",
        if goal_met { "met" } else { "NOT met" }
    );

    Ok(json!({
        "benchmark": "latency",
        "started_at": format_time(t0),
        "config": {
            "open_tasks": args.open, "deadlines": args.deadlines, "spread_secs": args.spread_secs, "lead_secs": args.lead_secs,
            "workers": args.workers, "tick_ms": cfg.tick_ms, "vacuum_outbox": args.vacuum_outbox, "poll_batch": cfg.poll_batch, "seed": args.seed,
            "brokers": cfg.brokers, "clock": "wall",
        },
        "latency_ms": {
            "total": lat,
            "logical_fire_eventtime_minus_due": summary(&fire),
            "pipeline_kafka_ts_minus_eventtime": summary(&publish),
            "delivery": summary(&deliver),
            "by_due_window_5s": by_window,
            "worst": worst,
        },
        "pipeline_frontier_lag": {
            "note": "sampled every 20 ms from hmis_flow::Shared while the deadlines pass: wall clock minus the committed / published frontier, and batches handed to the sink not yet committed",
            "committed_lag_ms": summary(&samples.iter().map(|s| s.1).collect::<Vec<_>>()),
            "published_lag_ms": summary(&samples.iter().map(|s| s.2).collect::<Vec<_>>()),
            "batches_waiting_for_sink": summary(&samples.iter().map(|s| s.3).collect::<Vec<_>>()),
            "by_window_5s": frontier_by_window,
        },
        "goal": { "p99_below_ms": 1000, "met": goal_met },
        "checks": {
            "expected": due.len(), "seen_unique": first_seen.len(), "missing": missing, "duplicates": duplicates,
            "unexpected_tasks": unexpected, "due_mismatch": wrong_due, "fired_at_or_before_due": early,
            "deadline_production_overlapped_first_deadline": produced_late,
            "derived_by_type_during_window": by_type,
        },
        "pipeline": {
            "backlog_records": 1 + 2 * args.open,
            "produce_backlog_secs": produce_backlog_secs,
            "backlog_read_secs": read_secs.as_secs_f64(),
            "catch_up_secs": catch_up_secs,
            "produce_deadlines_secs": produce_deadlines_secs,
            "stop_secs": stop_secs,
            "vacuum_outbox_secs": vacuum_secs,
            "outbox_table_at_end": outbox_stats,
            "records_read": summary_run.records_read,
            "transactions": summary_run.batches,
            "published": summary_run.published,
            "elapsed_secs": summary_run.elapsed.as_secs_f64(),
        },
        "memory": {
            "note": "whole benchmark process (pipeline, librdkafka clients, producer buffers); see the dataflow benchmark for the dataflow alone",
            "rss_before_pipeline_bytes": rss_before_pipeline,
            "rss_caught_up_bytes": rss_caught_up,
            "rss_peak_during_deadlines_bytes": rss_peak_window,
            "process_peak_rss_bytes": proc_status_bytes("VmHWM"),
            "bytes_per_open_task_caught_up": (rss_caught_up.saturating_sub(rss_before_pipeline) as f64 / args.open.max(1) as f64).round(),
        },
    }))
}
