//! Catch-up end to end against the broker's raw consume rate (issue 12's end-to-end figure).
//!
//! ```text
//!  generate --workflows N ─► input topics (preloaded once, own topic prefix)
//!  per repetition, alternating, same run:
//!    raw consume: one plain rdkafka consumer reads every input partition to its end (no decode)
//!    for each binary (in turn first and last, repetition by repetition):
//!        fresh output topics, CHECKPOINT ─► fresh schema ─► migrate
//!        ─► run --until-caught-up --workers W --clock C
//!           (wall time of the process, its user+sys CPU and peak RSS from wait4)
//! ```
//!
//! Each binary starts from the same state: output topics deleted and created again (the
//! previous run's millions of derived events would otherwise make the broker larger and
//! the publisher's recovery scan longer for whoever runs second), and PostgreSQL
//! checkpointed (the previous run's dirty pages are not left for the next one to write).
//! At 5.3M records a binary running second was measured 6-8 % slower than itself running
//! first (docs/engine.md, session 16).
//!
//! The figure is records per second of each binary divided by the raw consume rate measured
//! in the same repetition. With two binaries (e.g. a baseline build and the current one) both
//! run on the same topics and the same machine, alternately, so their ratio is fair too.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::{json, Value};

use hmis_bench::{
    children_usage, delete_topics, machine_info, private_topics, schema_url, si, topics_toml,
    vm_hwm, write_result, LoadMonitor, Services, INPUTS, OUTPUTS,
};

#[derive(Parser, Debug)]
#[command(about = "hmis-flow catching up a preloaded backlog vs the broker's raw consume rate")]
struct Args {
    /// The hmis-flow binaries to compare (first = baseline).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "target/release/hmis-flow"
    )]
    binaries: Vec<PathBuf>,
    /// Workflows generated into the topics (about 21 records each).
    #[arg(long, default_value_t = 50_000)]
    workflows: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// `event` or `wall`.
    #[arg(long, default_value = "event")]
    clock: String,
    /// Repetitions (each: raw consume, then every binary once).
    #[arg(long, default_value_t = 2)]
    repeat: usize,
    /// Extra `run` flags, e.g. `--poll-batch=10000`, one per binary (comma-separated
    /// lists are not split: give the flag once per binary, in order; empty = none).
    #[arg(long)]
    run_flags: Vec<String>,
    #[command(flatten)]
    services: Services,
    /// Keep the preloaded topics afterwards (deleted by default: the local broker holds
    /// them in memory).
    #[arg(long)]
    keep: bool,
    #[arg(long)]
    tag: Option<String>,
    #[arg(long)]
    out: Option<PathBuf>,
}

/// A config file naming this run's own topics (so a preloaded backlog is not mixed).
fn config(prefix: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::temp_dir().join(format!("{prefix}.toml"));
    std::fs::write(&path, topics_toml(prefix))?;
    Ok(path)
}

/// Reads every partition of `topics` from the beginning to its end; (records, seconds).
/// The loop only counts (no per-record lookups): it stops once it has read as many records
/// as the partitions held when it started.
fn raw_consume(brokers: &str, topics: &[String]) -> anyhow::Result<(u64, f64)> {
    use rdkafka::Message;
    let consumer: BaseConsumer = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("raw-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    let mut expected = 0u64;
    for topic in topics {
        let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        for p in md.topics().iter().flat_map(|t| t.partitions()) {
            let (low, high) = consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(10))?;
            if high > low {
                tpl.add_partition_offset(topic, p.id(), rdkafka::Offset::Beginning)?;
                expected += (high - low) as u64;
            }
        }
    }
    let start = Instant::now();
    consumer.assign(&tpl)?;
    let (mut n, mut bytes) = (0u64, 0usize);
    while n < expected {
        let Some(m) = consumer.poll(Duration::from_secs(10)) else {
            anyhow::bail!("raw consume: no record for 10 s after {n} of {expected}");
        };
        bytes += m?.payload().map_or(0, <[u8]>::len);
        n += 1;
    }
    std::hint::black_box(bytes);
    Ok((n, start.elapsed().as_secs_f64()))
}

/// Runs `cmd` to its exit: (wall s, user+sys CPU s from getrusage of the waited child, peak
/// RSS bytes: VmHWM sampled every 20 ms, or the children's max RSS when it moved), as
/// `peers` measures its children.
fn timed(cmd: &mut Command) -> anyhow::Result<(f64, f64, u64)> {
    let (cpu0, rss0) = children_usage();
    let start = Instant::now();
    let mut child = cmd.spawn().context("spawning hmis-flow")?;
    let mut peak = 0u64;
    let status = loop {
        peak = peak.max(vm_hwm(child.id()).unwrap_or(0));
        if let Some(s) = child.try_wait()? {
            break s;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let wall = start.elapsed().as_secs_f64();
    anyhow::ensure!(status.success(), "hmis-flow run failed: {status}");
    let (cpu1, rss1) = children_usage();
    if rss1 > rss0 {
        peak = peak.max(rss1 as u64 * 1024);
    }
    Ok((wall, cpu1 - cpu0, peak))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let first = &args.binaries[0];
    let prefix = format!("catchup{}", std::process::id());
    let cfg = config(&prefix)?;
    let brokers = &args.services.brokers;
    let db = &args.services.database_url;
    let hf = |b: &PathBuf| {
        let mut c = Command::new(b);
        c.env("HMIS_CONFIG", &cfg)
            .env("HMIS_LOG", hmis_bench::child_log_filter("warn"));
        c.stdout(std::process::Stdio::null());
        c
    };
    let ok = |c: &mut Command, what: &str| -> anyhow::Result<()> {
        let s = c.status().with_context(|| what.to_string())?;
        anyhow::ensure!(s.success(), "{what} failed: {s}");
        Ok(())
    };
    ok(
        hf(first).args(["topics", "create", "--brokers", brokers]),
        "topics create",
    )?;
    let gen_start = Instant::now();
    let out = hf(first)
        .args(["generate", "--quiet", "--brokers", brokers])
        .args(["--workflows", &args.workflows.to_string()])
        .args(["--seed", &args.seed.to_string()])
        .stdout(std::process::Stdio::piped())
        .output()?;
    anyhow::ensure!(out.status.success(), "generate failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let records: u64 = text
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .context("generate printed no count")?;
    eprintln!(
        "preloaded {records} records in {:.1} s",
        gen_start.elapsed().as_secs_f64()
    );
    let inputs: Vec<String> = INPUTS
        .iter()
        .map(|(_, n)| format!("{prefix}.{n}"))
        .collect();

    let outputs: Vec<String> = OUTPUTS
        .iter()
        .map(|(_, n)| format!("{prefix}.{n}"))
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let load = LoadMonitor::start();
    let mut reps = Vec::new();
    for rep in 0..args.repeat {
        let (n, secs) = raw_consume(brokers, &inputs)?;
        anyhow::ensure!(n == records, "raw consume read {n} of {records} records");
        let raw_rate = n as f64 / secs;
        eprintln!("rep {rep}: raw consume {} records/s", si(raw_rate));
        let mut runs = Vec::new();
        let mut order: Vec<usize> = (0..args.binaries.len()).collect();
        if rep % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let b = &args.binaries[i];
            rt.block_on(delete_topics(brokers, &outputs))?;
            wait_until_gone(brokers, &outputs)?;
            ok(
                hf(b).args(["topics", "create", "--brokers", brokers]),
                "topics create",
            )?;
            ok(&mut postgres_cmd(db, "checkpoint"), "checkpoint")?;
            let schema = format!("{prefix}_{rep}_{i}");
            let mut admin = postgres_cmd(db, &format!("create schema {schema}"));
            ok(&mut admin, "create schema")?;
            let url = schema_url(db, &schema);
            ok(hf(b).args(["migrate", "--database-url", &url]), "migrate")?;
            let mut run = hf(b);
            run.args(["run", "--brokers", brokers, "--database-url", &url])
                .args(["--workers", &args.workers.to_string()])
                .args(["--clock", &args.clock])
                .args(["--group-id", &schema, "--until-caught-up"]);
            if let Some(f) = args.run_flags.get(i).filter(|f| !f.is_empty()) {
                run.args(f.split_whitespace());
            }
            let (wall, cpu, rss) = timed(&mut run)?;
            let rate = records as f64 / wall;
            eprintln!(
                "rep {rep}: {} {} records/s ({:.3}x raw), {:.1} CPU-s, peak RSS {} MB",
                b.display(),
                si(rate),
                rate / raw_rate,
                cpu,
                rss / 1_000_000
            );
            runs.push(json!({
                "binary": b.display().to_string(),
                "position_in_repetition": runs.len(),
                "run_flags": args.run_flags.get(i),
                "wall_s": wall,
                "cpu_s": cpu,
                "peak_rss_bytes": rss,
                "records_per_s": rate,
                "ratio_to_raw_consume": rate / raw_rate,
            }));
            let mut drop = postgres_cmd(db, &format!("drop schema {schema} cascade"));
            ok(&mut drop, "drop schema")?;
        }
        reps.push(
            json!({"raw_consume_records_per_s": raw_rate, "raw_consume_s": secs, "runs": runs}),
        );
    }
    let result: Value = json!({
        "benchmark": "catchup",
        "machine": machine_info(),
        "load": load.finish(),
        "records": records,
        "workflows": args.workflows,
        "seed": args.seed,
        "workers": args.workers,
        "clock": args.clock,
        "repetitions": reps,
    });
    let path = write_result("catchup", args.tag.as_deref(), args.out.as_ref(), &result)?;
    if !args.keep {
        rt.block_on(delete_topics(brokers, &private_topics(&prefix)))?;
        let _ = std::fs::remove_file(&cfg);
    }
    eprintln!("wrote {}", path.display());
    Ok(())
}

/// Waits until the broker's metadata lists none of `topics` (deletion completes
/// asynchronously; creating them again before would find them still there).
fn wait_until_gone(brokers: &str, topics: &[String]) -> anyhow::Result<()> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let metadata = consumer.fetch_metadata(None, Duration::from_secs(10))?;
        if !metadata
            .topics()
            .iter()
            .any(|t| topics.iter().any(|n| n == t.name()))
        {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "output topics not deleted in 30 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `psql -c sql` against `db` (the schemas keep each run's tables apart).
fn postgres_cmd(db: &str, sql: &str) -> Command {
    let mut c = Command::new("psql");
    c.args([db, "-qX", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .env("PGOPTIONS", "-c client_min_messages=warning");
    c.stdout(std::process::Stdio::null());
    c
}
