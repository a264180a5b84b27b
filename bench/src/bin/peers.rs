//! `bench/run.sh`'s orchestrator (issue 14): one generated workload, every system on it in
//! the same run, measured the same way, results checked against hmis-flow's, one JSON.
//!
//! ```text
//!  hmis-flow generate --files DIR ──► private topics <id>.* (Kafka)  +  DIR/<topic>.jsonl
//!        │
//!        ├─► hmis-flow run --clock event --until-caught-up   (schema <id>)        ┐ each a child
//!        ├─► seed_baseline (per-event RMW + polling scheduler)  (schema <id>_seed) │ process: wall
//!        │      └─ tasks / workflows / readiness compared with schema <id>        │ time, CPU from
//!        └─► python bench/pathway/hmis_pathway.py DIR (2 threads)                 │ getrusage, peak
//!               └─ final task states / workflow progress compared with <id>       ┘ RSS from /proc
//!  ──► bench/results/peers-<size>-<date>.json   (a mismatch: the JSON says so, exit 1)
//! ```
//!
//! Every figure is per input record (all five topics, definitions included) over the wall
//! time from starting the child to its exit, so connection set-up and catch-up count for
//! everyone alike.

use std::collections::HashMap;
use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use hmis_bench::{
    children_usage, delete_topics, machine_info, private_topics, schema_url, topics_toml, vm_hwm,
    wall_ms, write_result, LoadMonitor, Services,
};

#[derive(Parser, Debug)]
#[command(about = "hmis-flow next to its peers on one workload (bench/run.sh)")]
struct Args {
    /// smoke (~20 workflows, seconds), small (2,500 ≈ 53K records), medium (12,000 ≈ 250K),
    /// large (27,000 ≈ 570K, the size of issue 14's first comparison).
    #[arg(long, default_value = "small")]
    size: String,
    /// Overrides the size's number of workflows.
    #[arg(long)]
    workflows: Option<usize>,
    #[arg(long, default_value_t = 14)]
    seed: u64,
    /// Timely workers of hmis-flow (Pathway gets as many threads).
    #[arg(long, default_value_t = 2)]
    workers: usize,
    #[command(flatten)]
    services: Services,
    /// Python of the Pathway venv (bench/.venv/bin/python); missing: Pathway is skipped and
    /// the JSON says so.
    #[arg(long)]
    python: Option<PathBuf>,
    /// Skip the seed-style baseline.
    #[arg(long)]
    no_seed: bool,
    /// Skip hmis-flow's dataflow alone (bench/bin/dataflow on the same workload).
    #[arg(long)]
    no_dataflow: bool,
    /// Also measure hmis-flow's event → result latency at this offered rate (records/s):
    /// `clock = wall`, the workload produced live at the rate, and for each input record the
    /// time from its produce timestamp to the PostgreSQL commit of its effects.
    #[arg(long, value_name = "RECORDS_PER_S")]
    latency_rate: Option<f64>,
    /// The clock of the latency run: `wall` (default) or `event` (a time completes when the
    /// records' eventTimes pass it).
    #[arg(long, default_value = "wall", value_parser = ["wall", "event"])]
    latency_clock: String,
    /// Workflows of the latency run (≈ 21 records each).
    #[arg(long, default_value_t = 500)]
    latency_workflows: usize,
    /// Where hmis-flow and seed_baseline are (default: next to this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Write the result here instead of bench/results/peers-<size>-<date>.json.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Keep the private topics, schemas and files afterwards.
    #[arg(long)]
    keep: bool,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

fn workflows_of(size: &str) -> anyhow::Result<usize> {
    Ok(match size {
        "smoke" => 20,
        "small" => 2_500,
        "medium" => 12_000,
        "large" => 27_000,
        other => anyhow::bail!("unknown size {other} (smoke, small, medium, large)"),
    })
}

fn config_toml(args: &Args, id: &str) -> String {
    format!(
        "brokers = {:?}\ndatabase_url = {:?}\ngroup_id = {:?}\n{}",
        args.services.brokers,
        schema_url(&args.services.database_url, id),
        id,
        topics_toml(id)
    )
}

fn bar(quiet: bool, len: u64, what: &str) -> ProgressBar {
    let pb = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(len)
    };
    let template = if len == 0 {
        "{msg:>22} [{elapsed_precise}] {spinner} (no per-record progress from this peer)"
    } else {
        "{msg:>22} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} records ({per_sec}, eta {eta})"
    };
    pb.set_style(ProgressStyle::with_template(template).expect("progress template"));
    pb.set_message(what.to_string());
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

/// What one measured child did.
struct Measured {
    wall_s: f64,
    cpu_s: f64,
    peak_rss_bytes: u64,
    stdout: String,
}

/// Runs `cmd` to its exit, polling `progress` for the bar; wall time, CPU (getrusage of the
/// waited child) and peak RSS (VmHWM sampled every 50 ms; getrusage's max RSS when larger).
fn measure(
    mut cmd: Command,
    log: &Path,
    pb: &ProgressBar,
    progress: &dyn Fn() -> Option<u64>,
    stdout_counter: Option<Arc<AtomicU64>>,
) -> anyhow::Result<Measured> {
    let (cpu0, rss0) = children_usage();
    let log_file = std::fs::File::create(log)?;
    cmd.stdout(Stdio::piped()).stderr(log_file);
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    let pid = child.id();
    let out = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if let (Some(c), Some(rest)) = (&stdout_counter, line.strip_prefix("progress ")) {
                if let Some(n) = rest.split_whitespace().next().and_then(|n| n.parse().ok()) {
                    c.store(n, Ordering::Relaxed);
                }
                continue;
            }
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    let mut peak = 0u64;
    let mut last_poll = Instant::now() - Duration::from_secs(1);
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        peak = peak.max(vm_hwm(pid).unwrap_or(0));
        if last_poll.elapsed() >= Duration::from_millis(250) {
            if let Some(n) = progress() {
                pb.set_position(n);
            }
            last_poll = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let wall_s = started.elapsed().as_secs_f64();
    let (cpu1, rss1) = children_usage();
    let stdout = reader.join().unwrap_or_default();
    if let Some(n) = progress() {
        pb.set_position(n);
    }
    pb.finish();
    anyhow::ensure!(
        status.success(),
        "{:?} failed ({status}); its log: {}",
        cmd.get_program(),
        log.display()
    );
    if rss1 > rss0 {
        // ru_maxrss (kB) of the children is the largest of any: it moved, so it is this one's.
        peak = peak.max(rss1 as u64 * 1024);
    }
    Ok(Measured {
        wall_s,
        cpu_s: cpu1 - cpu0,
        peak_rss_bytes: peak,
        stdout,
    })
}

fn run_quiet(mut cmd: Command, what: &str) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("starting {what}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

fn system_json(name: &str, what: &str, m: &Measured, records: u64) -> Value {
    let eps = records as f64 / m.wall_s.max(1e-9);
    json!({
        "name": name,
        "what": what,
        "records": records,
        "wall_s": round(m.wall_s, 3),
        "events_per_s": round(eps, 1),
        "cpu_s": round(m.cpu_s, 3),
        "cpu_s_per_million_events": round(m.cpu_s / records.max(1) as f64 * 1e6, 2),
        "cores_used": round(m.cpu_s / m.wall_s.max(1e-9), 2),
        "peak_rss_bytes": m.peak_rss_bytes,
    })
}

/// hmis-flow's final rows: task (status, attempt), workflow (status, progress), ready pairs.
struct Rows {
    tasks: HashMap<String, (String, i32)>,
    workflows: HashMap<String, (String, i32)>,
    ready: std::collections::BTreeSet<(String, String)>,
    /// (task_instance_id, attempt) of every SLA breach.
    breaches: std::collections::BTreeSet<(String, i32)>,
}

async fn pg(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(c)
}

async fn load_rows(db: &tokio_postgres::Client, schema: &str) -> anyhow::Result<Rows> {
    let mut rows = Rows {
        tasks: HashMap::new(),
        workflows: HashMap::new(),
        ready: Default::default(),
        breaches: Default::default(),
    };
    for r in db
        .query(
            &format!("SELECT task_instance_id, status, attempt FROM \"{schema}\".task_instances"),
            &[],
        )
        .await?
    {
        rows.tasks.insert(r.get(0), (r.get(1), r.get(2)));
    }
    for r in db
        .query(
            &format!("SELECT workflow_instance_id, status, progress_percentage FROM \"{schema}\".workflow_instances"),
            &[],
        )
        .await?
    {
        rows.workflows.insert(r.get(0), (r.get(1), r.get(2)));
    }
    for r in db
        .query(
            &format!("SELECT workflow_instance_id, task_def_id FROM \"{schema}\".task_readiness"),
            &[],
        )
        .await?
    {
        rows.ready.insert((r.get(0), r.get(1)));
    }
    for r in db
        .query(
            &format!("SELECT task_instance_id, attempt FROM \"{schema}\".sla_breaches"),
            &[],
        )
        .await?
    {
        rows.breaches.insert((r.get(0), r.get(1)));
    }
    Ok(rows)
}

/// Rows that hmis-flow's retirement (docs/decisions.md, "Unknown references and
/// retirement") leaves as they were: an event that arrives more than `retire_after_ms` after
/// its workflow closed is dead-lettered (`UNKNOWN_WORKFLOW`), while the peers, which have no
/// such rule, apply it. Differences on these keys are reported apart, not as mismatches.
#[derive(Default)]
struct Excused {
    /// Dead-lettered records of retired workflows.
    records: usize,
    tasks: std::collections::HashSet<String>,
    workflows: std::collections::HashSet<String>,
}

async fn load_excused(db: &tokio_postgres::Client, schema: &str) -> anyhow::Result<Excused> {
    let mut e = Excused::default();
    for r in db
        .query(
            &format!(
                "SELECT payload FROM \"{schema}\".dead_letters
                 WHERE reason = 'UNKNOWN_WORKFLOW' AND payload_encoding = 'utf8' AND detail LIKE '%retired%'"
            ),
            &[],
        )
        .await?
    {
        let Ok(v) = serde_json::from_str::<Value>(r.get::<_, &str>(0)) else {
            continue;
        };
        e.records += 1;
        if let Some(t) = v["taskInstanceId"].as_str() {
            e.tasks.insert(t.to_string());
        }
        if let Some(w) = v["workflowInstanceId"].as_str() {
            e.workflows.insert(w.to_string());
        }
    }
    Ok(e)
}

/// Compares a peer's rows with hmis-flow's: counts, mismatches and up to 5 examples each.
/// `check_breaches`: the seed's polling design misses breaches by construction (a task
/// completed late between two polls), so its breaches are reported, not compared.
fn compare(
    reference: &Rows,
    peer: &Rows,
    excused: &Excused,
    check_ready: bool,
    check_breaches: bool,
) -> Value {
    let mut examples: Vec<String> = Vec::new();
    let mut explained = 0usize;
    // Counts a difference on `key` (owned by `task`/`workflow`), or excuses it.
    let mut differ = |what: String, task: Option<&str>, workflow: Option<&str>| -> usize {
        let excused = task.is_some_and(|t| excused.tasks.contains(t))
            || workflow.is_some_and(|w| excused.workflows.contains(w));
        if excused {
            explained += 1;
            return 0;
        }
        if examples.len() < 8 {
            examples.push(what);
        }
        1
    };
    fn keys<V: PartialEq>(a: &HashMap<String, V>, b: &HashMap<String, V>) -> Vec<String> {
        let mut k: Vec<String> = a
            .iter()
            .filter(|(k, v)| b.get(*k) != Some(*v))
            .map(|(k, _)| k.clone())
            .chain(b.keys().filter(|k| !a.contains_key(*k)).cloned())
            .collect();
        k.sort();
        k
    }
    let mut tn = 0;
    for k in keys(&reference.tasks, &peer.tasks) {
        let what = format!(
            "task {k}: hmis-flow {:?}, peer {:?}",
            reference.tasks.get(&k),
            peer.tasks.get(&k)
        );
        tn += differ(what, Some(&k), None);
    }
    let mut wn = 0;
    for k in keys(&reference.workflows, &peer.workflows) {
        let what = format!(
            "workflow {k}: hmis-flow {:?}, peer {:?}",
            reference.workflows.get(&k),
            peer.workflows.get(&k)
        );
        wn += differ(what, None, Some(&k));
    }
    let mut rn = 0;
    if check_ready {
        for (w, d) in reference.ready.symmetric_difference(&peer.ready) {
            let side = if reference.ready.contains(&(w.clone(), d.clone())) {
                "hmis-flow only"
            } else {
                "peer only"
            };
            rn += differ(format!("ready {w} {d}: {side}"), None, Some(w));
        }
    }
    let mut bn = 0;
    if check_breaches {
        for (t, a) in reference.breaches.symmetric_difference(&peer.breaches) {
            let side = if reference.breaches.contains(&(t.clone(), *a)) {
                "hmis-flow only"
            } else {
                "peer only"
            };
            bn += differ(format!("breach {t} attempt {a}: {side}"), Some(t), None);
        }
    }
    json!({
        "matched": tn == 0 && wn == 0 && rn == 0 && bn == 0 && !reference.tasks.is_empty(),
        "tasks": reference.tasks.len(),
        "workflows": reference.workflows.len(),
        "ready_pairs": reference.ready.len(),
        "sla_breaches": reference.breaches.len(),
        "task_state_mismatches": tn,
        "workflow_mismatches": wn,
        "readiness_mismatches": if check_ready { json!(rn) } else { json!("not compared") },
        "sla_breach_mismatches": if check_breaches { json!(bn) } else { json!("not compared") },
        "explained_by_retirement": {
            "differences": explained,
            "dead_lettered_records": excused.records,
            "note": "hmis-flow dead-letters (UNKNOWN_WORKFLOW) events that arrive more than retire_after_ms (1 h) after their workflow closed (docs/decisions.md); the peers apply them. Differences on those tasks and workflows are counted here, not as mismatches.",
        },
        "examples": examples,
    })
}

/// Pathway's outputs are update streams (JSON lines with `diff`); the final state is what
/// remains with a positive count.
fn final_rows(path: &Path, key: &[&str], cols: &[&str]) -> anyhow::Result<HashMap<String, Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut count: HashMap<(String, String), (i64, u64)> = HashMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line)?;
        let k = key
            .iter()
            .map(|c| match &v[*c] {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect::<Vec<_>>()
            .join("|");
        let val = Value::Array(cols.iter().map(|c| v[*c].clone()).collect()).to_string();
        let e = count.entry((k, val)).or_insert((0, 0));
        e.0 += v["diff"].as_i64().unwrap_or(1);
        e.1 = e.1.max(v["time"].as_u64().unwrap_or(0));
    }
    let mut out: HashMap<String, Value> = HashMap::new();
    for ((k, val), (n, _)) in count {
        if n > 0 {
            out.insert(k, serde_json::from_str(&val)?);
        }
    }
    Ok(out)
}

fn pathway_rows(dir: &Path) -> anyhow::Result<Rows> {
    let tasks = final_rows(
        &dir.join("tasks.jsonl"),
        &["task_instance_id"],
        &["status", "attempt"],
    )?;
    let wfs = final_rows(
        &dir.join("workflows.jsonl"),
        &["workflow_instance_id"],
        &["status", "progress_percentage"],
    )?;
    let ready = final_rows(
        &dir.join("readiness.jsonl"),
        &["workflow_instance_id", "task_def_id"],
        &[],
    )?;
    let breaches = final_rows(
        &dir.join("sla_breaches.jsonl"),
        &["task_instance_id", "attempt"],
        &[],
    )?;
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    let i = |v: &Value| v.as_i64().unwrap_or(-1) as i32;
    Ok(Rows {
        tasks: tasks
            .into_iter()
            .map(|(k, v)| (k, (s(&v[0]), i(&v[1]))))
            .collect(),
        workflows: wfs
            .into_iter()
            .map(|(k, v)| (k, (s(&v[0]), i(&v[1]))))
            .collect(),
        ready: ready
            .into_keys()
            .filter_map(|k| {
                k.split_once('|')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
            })
            .collect(),
        breaches: breaches
            .into_keys()
            .filter_map(|k| {
                let (t, a) = k.rsplit_once('|')?;
                Some((t.to_string(), a.parse().ok()?))
            })
            .collect(),
    })
}

/// hmis-flow in `clock = wall` while the workload is produced live at `rate` records/s: per
/// input record, produce timestamp (Kafka CreateTime) → the PostgreSQL commit that holds its
/// effects and moves its partition's committed offset past it (rows, and the outbox the
/// derived events are published from), sampled every 20 ms.
fn latency_at_rate(
    args: &Args,
    hmis: &Path,
    work: &Path,
    run_id: &str,
    rate: f64,
    rt: &tokio::runtime::Runtime,
    admin: &tokio_postgres::Client,
) -> anyhow::Result<Value> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::Message;
    let id = format!("{run_id}_lat");
    let cfg_path = work.join("latency.toml");
    std::fs::write(&cfg_path, config_toml(args, &id))?;
    rt.block_on(admin.batch_execute(&format!("CREATE SCHEMA \"{id}\"")))?;
    let cmd = |sub: &[&str]| {
        let mut c = Command::new(hmis);
        c.args(sub)
            .arg("--config")
            .arg(&cfg_path)
            .env(
                "HMIS_LOG",
                hmis_bench::child_log_filter("warn,librdkafka=error"),
            )
            .env_remove("HMIS_BROKERS")
            .env_remove("HMIS_DATABASE_URL")
            .env_remove("HMIS_GROUP_ID");
        c
    };
    let result = (|| -> anyhow::Result<Value> {
        run_quiet(cmd(&["topics", "create"]), "hmis-flow topics create")?;
        run_quiet(cmd(&["migrate"]), "hmis-flow migrate")?;
        let mut run = cmd(&[
            "run",
            "--clock",
            &args.latency_clock,
            "--workers",
            &args.workers.to_string(),
        ]);
        run.stdout(Stdio::null())
            .stderr(std::fs::File::create(work.join("latency-hmis-flow.log"))?);
        let mut pipeline = run.spawn().context("starting hmis-flow run")?;
        // Subscribed and assigned before the first record is produced.
        std::thread::sleep(Duration::from_secs(5));
        let mut gen = cmd(&["generate"]);
        gen.args([
            "--workflows",
            &args.latency_workflows.to_string(),
            "--seed",
            &args.seed.to_string(),
            "--rate",
            &rate.to_string(),
        ]);
        if args.quiet {
            gen.arg("--quiet");
        }
        let mut producer = gen
            .stdout(Stdio::piped())
            .spawn()
            .context("starting generate")?;
        let db = rt.block_on(pg(&schema_url(&args.services.database_url, &id)))?;
        let sql =
            "SELECT topic, partition, next_offset FROM hmis_input_offsets WHERE group_id = $1";
        // Per (topic, partition): (wall ms, committed next offset) whenever it moved.
        let mut samples: HashMap<(String, i32), Vec<(i64, i64)>> = HashMap::new();
        let produce_start = Instant::now();
        let mut produced: Option<(u64, f64)> = None;
        let mut done_at: Option<Instant> = None;
        loop {
            let rows = rt.block_on(db.query(sql, &[&id]))?;
            // Stamped when the answer is in: an upper bound of the commit's time.
            let now = wall_ms() as i64;
            let mut committed = 0i64;
            for r in rows {
                let key = (r.get::<_, String>(0), r.get::<_, i32>(1));
                let next: i64 = r.get(2);
                committed += next;
                let v = samples.entry(key).or_default();
                if v.last().is_none_or(|l| l.1 != next) {
                    v.push((now, next));
                }
            }
            if produced.is_none() {
                if let Some(status) = producer.try_wait()? {
                    anyhow::ensure!(status.success(), "hmis-flow generate --rate failed");
                    let mut text = String::new();
                    use std::io::Read as _;
                    producer
                        .stdout
                        .take()
                        .expect("piped")
                        .read_to_string(&mut text)?;
                    let n: u64 = text
                        .split_whitespace()
                        .find_map(|w| w.parse().ok())
                        .context("generate printed no count")?;
                    produced = Some((n, produce_start.elapsed().as_secs_f64()));
                    done_at = Some(Instant::now());
                }
            }
            if let Some((n, _)) = produced {
                if committed as u64 >= n {
                    break;
                }
                anyhow::ensure!(
                    done_at.is_some_and(|d| d.elapsed() < Duration::from_secs(120)),
                    "hmis-flow did not commit all {n} records within 120 s of the last"
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("kill")
            .args(["-TERM", &pipeline.id().to_string()])
            .status();
        let _ = pipeline.wait();
        let (records, produce_s) = produced.expect("set before the loop ends");

        // Every input record's produce timestamp, from the topics themselves.
        let consumer: BaseConsumer = rdkafka::config::ClientConfig::new()
            .set("bootstrap.servers", &args.services.brokers)
            .set("group.id", format!("{id}-reader"))
            .set("enable.auto.commit", "false")
            .create()?;
        let mut latencies: Vec<i64> = Vec::new();
        let mut per_partition = serde_json::Map::new();
        for ((topic, partition), points) in &samples {
            let first = latencies.len();
            let (_, high) =
                consumer.fetch_watermarks(topic, *partition, Duration::from_secs(10))?;
            let mut tpl = rdkafka::TopicPartitionList::new();
            tpl.add_partition_offset(topic, *partition, rdkafka::Offset::Beginning)?;
            consumer.assign(&tpl)?;
            let mut seen = 0i64;
            while seen < high {
                let Some(m) = consumer.poll(Duration::from_secs(10)) else {
                    anyhow::bail!("{topic}/{partition}: no record after offset {seen}");
                };
                let m = m?;
                seen = m.offset() + 1;
                let Some(ts) = m.timestamp().to_millis() else {
                    continue;
                };
                // The first sample whose committed next offset is past this record.
                let i = points.partition_point(|p| p.1 <= m.offset());
                if let Some((at, _)) = points.get(i) {
                    latencies.push(at - ts);
                }
            }
            per_partition.insert(
                format!("{topic}/{partition}"),
                hmis_bench::summary(&latencies[first..]),
            );
        }
        anyhow::ensure!(!latencies.is_empty(), "no latency measured");
        Ok(json!({
            "system": format!("hmis-flow end to end, clock = {}", args.latency_clock),
            "offered_rate_records_per_s": rate,
            "achieved_rate_records_per_s": round(records as f64 / produce_s.max(1e-9), 1),
            "records": records,
            "workflows": args.latency_workflows,
            "workers": args.workers,
            "produce_to_committed_ms": hmis_bench::summary(&latencies),
            "produce_to_committed_ms_per_partition": per_partition,
            "note": "per input record: Kafka CreateTime (the producer's send) → the PostgreSQL commit holding its effects (rows + outbox), seen by polling hmis_input_offsets every 20 ms (+ the query's time); the derived events' publication from the outbox comes after. The seed-style baseline and Pathway (static mode, files) are not measured this way yet.",
        }))
    })();
    if !args.keep {
        let _ =
            rt.block_on(admin.batch_execute(&format!("DROP SCHEMA IF EXISTS \"{id}\" CASCADE")));
        let _ = rt.block_on(delete_topics(&args.services.brokers, &private_topics(&id)));
    }
    result
}

/// The newest wall-clock detection-latency result (bench/bin/latency) of issue 3's size.
fn latest_latency() -> Value {
    let dir = hmis_bench::results_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.retain(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("latency-20") && n.ends_with(".json"))
    });
    files.sort();
    let Some(p) = files.last() else {
        return json!(null);
    };
    let v: Value = std::fs::read_to_string(p)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    let lat = v
        .pointer("/latency_ms/total")
        .or_else(|| v.pointer("/latency_ms"))
        .cloned()
        .unwrap_or(Value::Null);
    json!({"file": p.strip_prefix(hmis_bench::results_dir().parent().unwrap_or(Path::new("."))).unwrap_or(p).display().to_string(), "deadline_to_derived_event_ms": lat})
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let workflows = match args.workflows {
        Some(w) => w,
        None => workflows_of(&args.size)?,
    };
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("binary folder")?
            .to_path_buf(),
    };
    let hmis = bin_dir.join("hmis-flow");
    let seed_bin = bin_dir.join("seed_baseline");
    let dataflow_bin = bin_dir.join("dataflow");
    anyhow::ensure!(
        hmis.exists(),
        "{} is missing: cargo build --release --bin hmis-flow",
        hmis.display()
    );
    let id = format!("bp_{}_{}", args.size, wall_ms());
    let work = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .join("target")
        .join("bench-peers")
        .join(&id);
    std::fs::create_dir_all(&work)?;
    let cfg_path = work.join("config.toml");
    std::fs::write(&cfg_path, config_toml(&args, &id))?;
    let files = work.join("files");
    eprintln!(
        "run {id}: {workflows} workflows, seed {}, work folder {}",
        args.seed,
        work.display()
    );
    let machine = machine_info();
    let load = LoadMonitor::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let admin = rt.block_on(pg(&args.services.database_url))?;
    rt.block_on(admin.batch_execute(&format!("CREATE SCHEMA \"{id}\"")))?;

    let hmis_cmd = |sub: &[&str]| {
        let mut c = Command::new(&hmis);
        c.args(sub)
            .arg("--config")
            .arg(&cfg_path)
            .env("HMIS_LOG", "warn,librdkafka=error")
            .env_remove("HMIS_BROKERS")
            .env_remove("HMIS_DATABASE_URL")
            .env_remove("HMIS_GROUP_ID");
        c
    };
    run_quiet(hmis_cmd(&["topics", "create"]), "hmis-flow topics create")?;
    run_quiet(hmis_cmd(&["migrate"]), "hmis-flow migrate")?;

    // Generate + load (hmis-flow generate draws its own progress bars on stderr).
    let t0 = Instant::now();
    let mut gen = hmis_cmd(&["generate"]);
    gen.args([
        "--workflows",
        &workflows.to_string(),
        "--seed",
        &args.seed.to_string(),
    ])
    .arg("--files")
    .arg(&files);
    if args.quiet {
        gen.arg("--quiet");
    }
    let status = gen.stdout(Stdio::null()).status()?;
    anyhow::ensure!(status.success(), "hmis-flow generate failed");
    let generate_s = t0.elapsed().as_secs_f64();
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(files.join("manifest.json"))?)?;
    let records = manifest["records"].as_u64().unwrap_or(0);
    anyhow::ensure!(records > 0, "empty workload");

    let mut systems: Vec<Value> = Vec::new();
    let mut failures: Vec<String> = Vec::new();

    // 1. hmis-flow end to end: Kafka → dataflow → PostgreSQL rows + outbox → Kafka.
    let db = rt.block_on(pg(&args.services.database_url))?;
    let offsets_sql = format!(
        "SELECT coalesce(sum(next_offset), 0)::bigint FROM \"{id}\".hmis_input_offsets WHERE group_id = $1"
    );
    let pb = bar(args.quiet, records, "hmis-flow catch-up");
    let mut run = hmis_cmd(&["run"]);
    run.args([
        "--clock",
        "event",
        "--until-caught-up",
        "--workers",
        &args.workers.to_string(),
    ]);
    let progress = || -> Option<u64> {
        rt.block_on(db.query_one(&offsets_sql, &[&id]))
            .ok()
            .map(|r| r.get::<_, i64>(0) as u64)
    };
    let m = measure(run, &work.join("hmis-flow.log"), &pb, &progress, None)?;
    let mut hmis_json = system_json(
        "hmis-flow",
        "end to end: Kafka → timely/differential → PostgreSQL rows + outbox → Kafka (clock = event, --until-caught-up)",
        &m,
        records,
    );
    hmis_json["workers"] = json!(args.workers);
    hmis_json["summary_line"] = json!(m.stdout.trim());
    let reference = rt.block_on(load_rows(&db, &id))?;
    let excused = rt.block_on(load_excused(&db, &id))?;
    let breaches = rt.block_on(db.query_one(
        &format!(
            "SELECT count(*), coalesce(percentile_disc(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM breached_at - due_at) * 1000), 0)::float8,
                    coalesce(max(extract(epoch FROM breached_at - due_at) * 1000), 0)::float8,
                    count(*) FILTER (WHERE breached_at - due_at <= interval '1 second')
             FROM \"{id}\".sla_breaches"
        ),
        &[],
    ))?;
    let hmis_breaches: i64 = breaches.get(0);
    hmis_json["sla_breaches"] = json!({
        "count": hmis_breaches,
        "within_1s_of_deadline_on_the_event_clock": breaches.get::<_, i64>(3),
        "breached_at_minus_due_ms_p50": breaches.get::<_, f64>(1),
        "breached_at_minus_due_ms_max": breaches.get::<_, f64>(2),
        "note": "on the event clock a breach of an open task is decided at dueAt + 1 ms; one found from a late TASK_STARTED/COMPLETED/FAILED (the contract's second rule) is stamped with that event's time",
    });
    systems.push(hmis_json);

    // 1b. The same rules in memory: hmis-flow's dataflow alone, same generator and seed.
    if !args.no_dataflow {
        let pb = bar(args.quiet, 0, "hmis-flow dataflow only");
        let out = work.join("dataflow.json");
        let mut cmd = Command::new(&dataflow_bin);
        cmd.args([
            "--workflows",
            &workflows.to_string(),
            "--seed",
            &args.seed.to_string(),
            "--workers",
            &args.workers.to_string(),
            "--repeat",
            "1",
            "--open-tasks",
            "0",
            "--finished-workflows",
            "0",
        ])
        .arg("--out")
        .arg(&out);
        let m = measure(cmd, &work.join("dataflow.log"), &pb, &|| None, None)?;
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&out)?)?;
        let run = v["throughput"]["dataflow"]
            .as_array()
            .and_then(|a| a.iter().find(|d| d["stamp"] == "event"))
            .cloned()
            .context("dataflow printed no event-stamped run")?;
        let eps = run["rates"]["events_per_sec"].as_f64().unwrap_or(0.0);
        let per_cpu = run["rates"]["events_per_cpu_sec"].as_f64().unwrap_or(0.0);
        systems.push(json!({
            "name": "hmis-flow dataflow only",
            "what": "the same rules in memory (bench/bin/dataflow): decode → timely/differential → gathered outputs, no Kafka, no PostgreSQL; each event stamped at its eventTime as clock = event (wall_stamping: a batch at one time, as clock = wall reading a backlog); same generator and seed",
            "records": run["events"],
            "workers": args.workers,
            "events_per_s": round(eps, 1),
            "cpu_s_per_million_events": if per_cpu > 0.0 { json!(round(1e6 / per_cpu, 2)) } else { Value::Null },
            "wall_s": if eps > 0.0 { json!(round(run["events"].as_f64().unwrap_or(0.0) / eps, 3)) } else { Value::Null },
            "peak_rss_bytes": m.peak_rss_bytes,
            "note": "rates are the dataflow's own (decode + dataflow + gather of the events, excluding generation and the process's other measurements: decode alone, a naive refold); peak RSS is the whole child's. Same code as the reference: not compared again.",
            "wall_stamping": v["throughput"]["dataflow"]
                .as_array()
                .and_then(|a| a.iter().find(|d| d["stamp"] == "wall"))
                .map(|d| d["rates"].clone()),
            "decode_alone": v["throughput"]["decode"].clone(),
            "naive_refold": v["throughput"]["naive"].clone(),
        }));
    }

    // 2. The seed's design.
    if !args.no_seed {
        let schema = format!("{id}_seed");
        let pb = bar(args.quiet, records, "seed-style baseline");
        let counter = Arc::new(AtomicU64::new(0));
        let mut cmd = Command::new(&seed_bin);
        cmd.args(["--schema", &schema, "--topic-prefix", &id, "--group-id"])
            .arg(format!("{id}-seed"))
            .args([
                "--brokers",
                &args.services.brokers,
                "--database-url",
                &args.services.database_url,
            ]);
        let c2 = counter.clone();
        let m = measure(
            cmd,
            &work.join("seed_baseline.log"),
            &pb,
            &|| Some(c2.load(Ordering::Relaxed)),
            Some(counter.clone()),
        )?;
        let result: Value = m
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("result "))
            .and_then(|l| serde_json::from_str(l).ok())
            .context("seed_baseline printed no result")?;
        let peer = rt.block_on(load_rows(&db, &schema))?;
        let check = compare(&reference, &peer, &excused, true, false);
        let mut j = system_json(
            "seed-style baseline",
            "the seed's design in Rust: one consumer, per event one PostgreSQL transaction (read the workflow's rows, update, recompute readiness and progress, write back); SLA/stale/escalation polled every 5/10/15 min of the event clock",
            &m,
            records,
        );
        if check["matched"] != json!(true) {
            failures.push(format!(
                "seed-style baseline disagrees with hmis-flow: {check}"
            ));
            j["events_per_s"] = json!(null);
            j["not_counted"] = json!("results differ from hmis-flow's");
        }
        j["check_against_hmis_flow"] = check;
        let delay = result["scheduler"]["breach_visibility_delay_ms"].clone();
        j["sla_breaches"] = json!({
            "count": result["scheduler"]["sla_breaches"],
            "missed_vs_hmis_flow": hmis_breaches - result["scheduler"]["sla_breaches"].as_i64().unwrap_or(0),
            "breach_visibility_delay_ms": delay,
            "note": "poll instant − dueAt; a task completed late between two polls is never flagged by this design",
        });
        j["detail"] = result;
        systems.push(j);
    }

    // 3. Pathway.
    let python = args.python.clone().filter(|p| p.exists());
    match python {
        None => systems.push(json!({
            "name": "Pathway",
            "skipped": match &args.python {
                Some(p) => format!("skipped: {} is missing (bench/run.sh creates bench/.venv)", p.display()),
                None => "skipped: --python not given (bench/run.sh passes bench/.venv's)".to_string(),
            },
        })),
        Some(py) => {
            let out_dir = work.join("pathway-out");
            std::fs::create_dir_all(&out_dir)?;
            let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("pathway/hmis_pathway.py");
            let version = run_quiet(
                {
                    let mut c = Command::new(&py);
                    c.args(["-c", "import pathway; print(pathway.__version__)"]);
                    c
                },
                "python -c 'import pathway'",
            )
            .unwrap_or_default();
            let pb = bar(args.quiet, 0, "Pathway");
            let mut cmd = Command::new(&py);
            cmd.arg(&script)
                .arg("--input")
                .arg(&files)
                .arg("--output")
                .arg(&out_dir)
                .env("PATHWAY_THREADS", args.workers.to_string())
                .env("PATHWAY_MONITORING_LEVEL", "none");
            let m = measure(cmd, &work.join("pathway.log"), &pb, &|| None, None)?;
            let peer = pathway_rows(&out_dir)?;
            let check = compare(&reference, &peer, &excused, true, true);
            let mut j = system_json(
                "Pathway",
                "Pathway (Python API over a Rust differential-dataflow engine), per-topic JSON-lines files, static mode, task/workflow rules (state, readiness, progress, SLA breaches), outputs to JSON-lines files",
                &m,
                records,
            );
            j["version"] = json!(version.trim());
            j["threads"] = json!(args.workers);
            if check["matched"] != json!(true) {
                failures.push(format!("Pathway disagrees with hmis-flow: {check}"));
                j["events_per_s"] = json!(null);
                j["not_counted"] = json!("results differ from hmis-flow's");
            }
            j["check_against_hmis_flow"] = check;
            if let Ok(t) = std::fs::read_to_string(out_dir.join("summary.json")) {
                j["detail"] = serde_json::from_str(&t).unwrap_or(Value::Null);
            }
            systems.push(j);
        }
    }

    let latency = match args.latency_rate {
        Some(rate) => {
            let r = latency_at_rate(&args, &hmis, &work, &id, rate, &rt, &admin);
            match r {
                Ok(v) => v,
                Err(e) => {
                    failures.push(format!("latency run failed: {e:#}"));
                    json!({"error": format!("{e:#}")})
                }
            }
        }
        None => json!("not measured (peers --latency-rate R)"),
    };

    // Ratios against the baselines of this run.
    let eps = |name: &str| {
        systems
            .iter()
            .find(|s| s["name"] == name)
            .and_then(|s| s["events_per_s"].as_f64())
    };
    let hmis_eps = eps("hmis-flow");
    let ratio = |hmis_eps: Option<f64>, peer: &str, goal: f64| match (hmis_eps, eps(peer)) {
        (Some(h), Some(p)) if p > 0.0 => {
            let r = h / p;
            json!({"hmis_flow_over_peer": round(r, 3), "goal": goal, "met": r >= goal,
                   "short_by_factor": if r >= goal { json!(null) } else { json!(round(goal / r, 1)) }})
        }
        _ => json!(null),
    };
    let seed_delay = systems
        .iter()
        .find(|s| s["name"] == "seed-style baseline")
        .map(|s| s["sla_breaches"]["breach_visibility_delay_ms"].clone())
        .unwrap_or(Value::Null);
    let result = json!({
        "benchmark": "peers",
        "date": hmis_dataflows::events::format_time(wall_ms()),
        "size": args.size,
        "workflows": workflows,
        "seed": args.seed,
        "records": records,
        "per_topic": manifest["per_topic"],
        "generate_and_load_s": round(generate_s, 2),
        "machine": machine,
        "load": load.finish(),
        "systems": systems,
        "events_per_s_ratios": {
            "vs_seed_baseline": ratio(hmis_eps, "seed-style baseline", 50.0),
            "vs_pathway": ratio(hmis_eps, "Pathway", 10.0),
            "dataflow_only_vs_pathway": ratio(eps("hmis-flow dataflow only"), "Pathway", 10.0),
            "note": "hmis-flow end to end over each peer, events/s of wall time in this run; the goals are issue 14's",
        },
        "breach_visibility": {
            "seed_style_polling_ms": seed_delay,
            "seed_style_bound_ms": 300_000,
            "hmis_flow_wall_clock_ms": latest_latency(),
            "goal_ms": 1000,
            "note": "hmis-flow's wall-clock figure is from the newest `latency` benchmark result (not this run); the seed's delay is measured in this run on the event clock",
        },
        "latency_at_offered_rate": latency,
        "check_failures": failures,
    });
    let path = write_result(
        &format!("peers-{}", args.size),
        None,
        args.out.as_ref(),
        &result,
    )?;
    if !args.keep {
        rt.block_on(admin.batch_execute(&format!(
            "DROP SCHEMA IF EXISTS \"{id}\" CASCADE; DROP SCHEMA IF EXISTS \"{id}_seed\" CASCADE;"
        )))?;
        rt.block_on(delete_topics(&args.services.brokers, &private_topics(&id)))?;
        let _ = std::fs::remove_dir_all(&work);
    }
    print_table(&result);
    eprintln!("wrote {}", path.display());
    if !failures.is_empty() {
        for f in &failures {
            eprintln!("CHECK FAILED: {f}");
        }
        anyhow::bail!(
            "a peer's results differ from hmis-flow's: its time does not count (see {})",
            path.display()
        );
    }
    Ok(())
}

fn print_table(r: &Value) {
    println!(
        "\n{} records ({} workflows), {} cores, {}",
        r["records"], r["workflows"], r["machine"]["nproc"], r["machine"]["cpu_model"]
    );
    println!(
        "{:<22} {:>10} {:>12} {:>14} {:>12}  check",
        "system", "wall s", "events/s", "CPU-s/M ev", "peak RSS MB"
    );
    for s in r["systems"].as_array().into_iter().flatten() {
        if let Some(skip) = s["skipped"].as_str() {
            println!("{:<22} {skip}", s["name"].as_str().unwrap_or("?"));
            continue;
        }
        println!(
            "{:<22} {:>10.2} {:>12} {:>14.1} {:>12.1}  {}",
            s["name"].as_str().unwrap_or("?"),
            s["wall_s"].as_f64().unwrap_or(0.0),
            s["events_per_s"]
                .as_f64()
                .map(|x| format!("{x:.0}"))
                .unwrap_or_else(|| "not counted".into()),
            s["cpu_s_per_million_events"].as_f64().unwrap_or(0.0),
            s["peak_rss_bytes"].as_f64().unwrap_or(0.0) / 1e6,
            match s.get("check_against_hmis_flow") {
                Some(c) => {
                    if c["matched"] == json!(true) {
                        "matched hmis-flow".to_string()
                    } else {
                        "MISMATCH".to_string()
                    }
                }
                None if s["name"] == "hmis-flow" => "reference".to_string(),
                None => "hmis-flow's own code".to_string(),
            }
        );
    }
    println!("ratios: {}", r["events_per_s_ratios"]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows() -> Rows {
        Rows {
            tasks: [
                ("t1".to_string(), ("COMPLETED".to_string(), 1)),
                ("t2".to_string(), ("PENDING".to_string(), 2)),
            ]
            .into(),
            workflows: [("w1".to_string(), ("ACTIVE".to_string(), 50))].into(),
            ready: [("w1".to_string(), "b".to_string())].into(),
            breaches: [("t2".to_string(), 1)].into(),
        }
    }

    #[test]
    fn equal_rows_match() {
        let c = compare(&rows(), &rows(), &Excused::default(), true, true);
        assert_eq!(c["matched"], json!(true), "{c}");
    }

    #[test]
    fn every_kind_of_difference_is_a_mismatch() {
        let changes: [(&str, fn(&mut Rows)); 6] = [
            ("task status", |r| {
                r.tasks.insert("t1".into(), ("FAILED".into(), 1));
            }),
            ("task attempt", |r| {
                r.tasks.insert("t2".into(), ("PENDING".into(), 1));
            }),
            ("extra task", |r| {
                r.tasks.insert("t3".into(), ("PENDING".into(), 1));
            }),
            ("progress", |r| {
                r.workflows.insert("w1".into(), ("ACTIVE".into(), 75));
            }),
            ("readiness", |r| {
                r.ready.clear();
            }),
            ("breach attempt", |r| {
                r.breaches = [("t2".to_string(), 2)].into();
            }),
        ];
        for (what, change) in changes {
            let mut peer = rows();
            change(&mut peer);
            let c = compare(&rows(), &peer, &Excused::default(), true, true);
            assert_eq!(c["matched"], json!(false), "{what}: {c}");
            assert!(!c["examples"].as_array().unwrap().is_empty(), "{what}: {c}");
        }
        // A difference on a task of a retired workflow is excused, and counted as such.
        let mut peer = rows();
        peer.tasks.insert("t1".into(), ("FAILED".into(), 1));
        let excused = Excused {
            records: 1,
            tasks: ["t1".to_string()].into(),
            workflows: Default::default(),
        };
        let c = compare(&rows(), &peer, &excused, true, true);
        assert_eq!(c["matched"], json!(true), "{c}");
        assert_eq!(c["explained_by_retirement"]["differences"], json!(1), "{c}");
        // The seed-style baseline's breaches are reported, not compared.
        let mut peer = rows();
        peer.breaches.clear();
        assert_eq!(
            compare(&rows(), &peer, &Excused::default(), true, false)["matched"],
            json!(true)
        );
        // An empty reference never counts as a match.
        let empty = Rows {
            tasks: HashMap::new(),
            workflows: HashMap::new(),
            ready: Default::default(),
            breaches: Default::default(),
        };
        let c = compare(&empty, &empty, &Excused::default(), true, true);
        assert_eq!(c["matched"], json!(false), "{c}");
    }

    #[test]
    fn pathway_update_streams_keep_what_remains() {
        let dir = std::env::temp_dir().join(format!("peers-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let w = |name: &str, lines: &[&str]| {
            std::fs::write(dir.join(name), lines.join("\n") + "\n").unwrap();
        };
        w(
            "tasks.jsonl",
            &[
                r#"{"task_instance_id":"t1","status":"PENDING","attempt":1,"diff":1,"time":2}"#,
                r#"{"task_instance_id":"t1","status":"PENDING","attempt":1,"diff":-1,"time":4}"#,
                r#"{"task_instance_id":"t1","status":"COMPLETED","attempt":1,"diff":1,"time":4}"#,
            ],
        );
        w(
            "workflows.jsonl",
            &[
                r#"{"workflow_instance_id":"w1","status":"ACTIVE","progress_percentage":50,"diff":1,"time":4}"#,
            ],
        );
        w(
            "readiness.jsonl",
            &[
                r#"{"workflow_instance_id":"w1","task_def_id":"a","diff":1,"time":2}"#,
                r#"{"workflow_instance_id":"w1","task_def_id":"a","diff":-1,"time":4}"#,
                r#"{"workflow_instance_id":"w1","task_def_id":"b","diff":1,"time":4}"#,
            ],
        );
        w(
            "sla_breaches.jsonl",
            &[r#"{"task_instance_id":"t1","attempt":2,"due_at_ms":1,"diff":1,"time":4}"#],
        );
        let r = pathway_rows(&dir).unwrap();
        std::fs::remove_dir_all(&dir).ok();
        assert_eq!(r.tasks["t1"], ("COMPLETED".to_string(), 1));
        assert_eq!(r.workflows["w1"], ("ACTIVE".to_string(), 50));
        assert_eq!(
            r.ready.into_iter().collect::<Vec<_>>(),
            vec![("w1".to_string(), "b".to_string())]
        );
        assert_eq!(
            r.breaches.into_iter().collect::<Vec<_>>(),
            vec![("t1".to_string(), 2)]
        );
    }
}
