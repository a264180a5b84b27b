//! # hmis-bench: what the benchmark binaries share
//!
//! The benchmarks separate the layers (see `docs/benchmarks.md`):
//!
//! ```text
//!  bin/dataflow   decode alone │ naive per-event recompute │ dataflow (1, 2 workers) │ memory per open task
//!                 ── in memory, no Kafka, no PostgreSQL, one seeded workload ──
//!  bin/latency    Kafka ─► hmis_flow::run (wall clock) ─► PostgreSQL ─► outbox ─► Kafka ─► consumer
//!                 deadline → TASK_SLA_BREACHED seen by a consumer, p50/p90/p99/max
//! ```
//!
//! This module holds the plumbing both use: machine facts, a load monitor (the machines are
//! shared, so every result says how busy the machine was), memory readings from
//! `/proc/self/status`, percentiles, and where results are written.

use std::path::PathBuf;
use std::time::Instant;

use serde_json::{json, Value};

/// Milliseconds since the Unix epoch.
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A field of `/proc/self/status` given in kB (`VmRSS`, `VmHWM`, ...), in bytes.
pub fn proc_status_bytes(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kb * 1024)
    })
}

fn first_line_of(cmd: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(cmd).args(args).output().ok()?;
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_string()
    })
}

/// What the figures were measured on: cores, CPU model, memory, compiler, commit, load.
pub fn machine_info() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_total_kb: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let root = env!("CARGO_MANIFEST_DIR");
    let commit = first_line_of("git", &["-C", root, "rev-parse", "--short", "HEAD"]);
    // Shared working trees change under a run: name the files that differ from the commit.
    let modified: Vec<String> = std::process::Command::new("git")
        .args(["-C", root, "status", "--porcelain", "--untracked-files=no"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.get(3..))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "cpu_model": model,
        "mem_total_bytes": mem_total_kb * 1024,
        "rustc": first_line_of("rustc", &["--version"]).unwrap_or_else(|| "unknown".into()),
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
        "git_commit": commit,
        "git_dirty": !modified.is_empty(),
        "git_modified_files": modified,
        "loadavg_at_start": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
    })
}

fn cpu_jiffies() -> (u64, u64) {
    // First line of /proc/stat: cpu user nice system idle iowait irq softirq steal ...
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let nums: Vec<u64> = text
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|s| s.parse().ok())
        .collect();
    let total: u64 = nums.iter().take(8).sum();
    let idle = nums.get(3).copied().unwrap_or(0) + nums.get(4).copied().unwrap_or(0);
    (total, idle)
}

/// utime + stime (clock ticks) of a process, from `/proc/<pid>/stat`.
fn process_ticks(pid: &str) -> Option<(String, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text[open + 1..close].to_string();
    let fields: Vec<&str> = text[close + 2..].split_whitespace().collect();
    // After the command: state is field 3 of the full line, utime 14, stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

/// CPU time (user + system) this process has used so far, in seconds (10 ms resolution).
pub fn process_cpu_secs() -> f64 {
    process_ticks("self").map(|x| x.1).unwrap_or(0) as f64 / TICKS_PER_SEC
}

/// CPU ticks per process whose command name starts with one of `names`.
fn ticks_of_named(names: &[&str]) -> std::collections::HashMap<String, u64> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Default::default();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        .filter_map(|pid| process_ticks(&pid).map(|(comm, t)| (pid, comm, t)))
        .filter(|(_, comm, _)| names.iter().any(|n| comm.starts_with(n)))
        .map(|(pid, _, t)| (pid, t))
        .collect()
}

/// Ticks the named processes used since `before` (per pid; processes that exited meanwhile
/// are not counted, so this is a lower bound).
fn ticks_since(names: &[&str], before: &std::collections::HashMap<String, u64>) -> u64 {
    ticks_of_named(names)
        .iter()
        .map(|(pid, t)| t.saturating_sub(before.get(pid).copied().unwrap_or(0)))
        .sum()
}

const SERVICES: [&str; 2] = ["postgres", "nisshi"];

/// How busy the machine was during a measurement, split into this process, the services it
/// talks to (`postgres`, `nisshi`; shared with other users of the machine) and the rest.
pub struct LoadMonitor {
    started: Instant,
    machine: (u64, u64),
    own: u64,
    services: std::collections::HashMap<String, u64>,
}

/// Clock ticks per second of `/proc` times (USER_HZ; 100 on every Linux we run on).
const TICKS_PER_SEC: f64 = 100.0;

impl LoadMonitor {
    pub fn start() -> LoadMonitor {
        LoadMonitor {
            started: Instant::now(),
            machine: cpu_jiffies(),
            own: process_ticks("self").map(|x| x.1).unwrap_or(0),
            services: ticks_of_named(&SERVICES),
        }
    }

    /// Average cores busy since `start`: machine, this process, services, everything else.
    pub fn finish(&self) -> Value {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let (total, idle) = cpu_jiffies();
        let dt = total.saturating_sub(self.machine.0) as f64;
        let di = idle.saturating_sub(self.machine.1) as f64;
        let ncpu = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1) as f64;
        let machine_busy = if dt > 0.0 { (dt - di) / dt * ncpu } else { 0.0 };
        let own = process_ticks("self")
            .map(|x| x.1)
            .unwrap_or(0)
            .saturating_sub(self.own) as f64
            / TICKS_PER_SEC
            / secs;
        let services = ticks_since(&SERVICES, &self.services) as f64 / TICKS_PER_SEC / secs;
        let round = |x: f64| (x * 100.0).round() / 100.0;
        json!({
            "seconds": round(secs),
            "machine_busy_cores": round(machine_busy),
            "this_process_cores": round(own),
            "postgres_and_broker_cores": round(services),
            "other_cores": round((machine_busy - own - services).max(0.0)),
            "loadavg_at_end": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        })
    }
}

/// The `p`-th percentile (0..=100) of sorted values, nearest rank.
pub fn percentile(sorted: &[i64], p: f64) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// count, min, p50, p90, p99, max and mean of a sample (any order).
pub fn summary(values: &[i64]) -> Value {
    let mut v = values.to_vec();
    v.sort_unstable();
    let mean = if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<i64>() as f64 / v.len() as f64
    };
    json!({
        "count": v.len(),
        "min": v.first(),
        "p50": percentile(&v, 50.0),
        "p90": percentile(&v, 90.0),
        "p99": percentile(&v, 99.0),
        "max": v.last(),
        "mean": (mean * 10.0).round() / 10.0,
    })
}

/// The log filter (`HMIS_LOG`) for the `hmis-flow` processes a benchmark starts:
/// `HMIS_BENCH_LOG` when set (e.g. `hmis_flow::runtime=debug` for the clock log), else
/// `default`.
pub fn child_log_filter(default: &str) -> String {
    std::env::var("HMIS_BENCH_LOG").unwrap_or_else(|_| default.into())
}

/// `bench/results/`.
pub fn results_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("results")
}

/// Writes `value` (pretty JSON) to `bench/results/<name>[-<tag>]-<YYYY-MM-DD>.json`, or to
/// `out` when given; returns the path.
pub fn write_result(
    name: &str,
    tag: Option<&str>,
    out: Option<&PathBuf>,
    value: &Value,
) -> anyhow::Result<PathBuf> {
    let path = match out {
        Some(p) => p.clone(),
        None => {
            let date = &hmis_dataflows::events::format_time(wall_ms())[..10];
            let stem = match tag {
                Some(t) if !t.is_empty() => format!("{name}-{t}-{date}.json"),
                _ => format!("{name}-{date}.json"),
            };
            results_dir().join(stem)
        }
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&path, serde_json::to_string_pretty(value)? + "\n")?;
    Ok(path)
}

/// `1234567` → `"1.23M"`, for tables.
pub fn si(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}K", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<i64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&v, 100.0), Some(100));
        assert_eq!(percentile(&[7], 99.0), Some(7));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn reads_own_memory() {
        assert!(proc_status_bytes("VmRSS").unwrap() > 0);
        assert!(proc_status_bytes("VmHWM").unwrap() >= proc_status_bytes("VmRSS").unwrap() / 2);
    }
}

/// The services every end-to-end benchmark talks to: the same flags, variables and defaults
/// in each binary (`#[command(flatten)]`).
#[derive(clap::Args, Debug, Clone)]
pub struct Services {
    /// Kafka bootstrap servers.
    #[arg(long, env = "HMIS_BROKERS", default_value = "127.0.0.1:19092")]
    pub brokers: String,
    /// PostgreSQL URL; each run's tables go into a private schema of it.
    #[arg(
        long,
        env = "HMIS_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:15432/hmis"
    )]
    pub database_url: String,
}

/// `base` with `search_path` set to `schema` (libpq's `options` parameter).
pub fn schema_url(base: &str, schema: &str) -> String {
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}options=-c%20search_path%3D{schema}")
}

/// The input topics' config keys and contract names (`[topics]` of a config file).
pub const INPUTS: [(&str, &str); 5] = [
    ("definitions", "workflow-definitions"),
    ("tasks", "workflow-task-events"),
    ("orders", "workflow-order-events"),
    ("workflows", "workflow-state-events"),
    ("system", "system-events"),
];
/// The output topics' config keys and contract names.
pub const OUTPUTS: [(&str, &str); 4] = [
    ("derived", "workflow-derived-events"),
    ("alerts", "system-alerts"),
    ("dead_letter", "workflow-dead-letter"),
    ("analytics", "workflow-analytics"),
];

/// Every topic of a run with id `id`: `<id>.<contract name>`.
pub fn private_topics(id: &str) -> Vec<String> {
    INPUTS
        .iter()
        .chain(OUTPUTS.iter())
        .map(|(_, n)| format!("{id}.{n}"))
        .collect()
}

/// The `[topics]` section naming a run's private topics ([`private_topics`]).
pub fn topics_toml(id: &str) -> String {
    let mut s = String::from("[topics]\n");
    for (k, name) in INPUTS.iter().chain(OUTPUTS.iter()) {
        s.push_str(&format!("{k} = \"{id}.{name}\"\n"));
    }
    s
}

/// CPU seconds (user + system) and the largest max RSS (kB) of the children waited for so far.
pub fn children_usage() -> (f64, i64) {
    use nix::sys::resource::{getrusage, UsageWho};
    match getrusage(UsageWho::RUSAGE_CHILDREN) {
        Ok(u) => {
            let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
            (secs(u.user_time()) + secs(u.system_time()), u.max_rss())
        }
        Err(_) => (0.0, 0),
    }
}

/// Peak resident memory of a running process (`VmHWM`), in bytes.
pub fn vm_hwm(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|l| {
        let kb: u64 = l
            .strip_prefix("VmHWM:")?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb * 1024)
    })
}

/// Deletes `names` (a run's private topics); what the broker answers per topic is not
/// checked (a topic may never have been created). Fails only if no admin client can be made.
pub async fn delete_topics(brokers: &str, names: &[String]) -> anyhow::Result<()> {
    let admin: rdkafka::admin::AdminClient<_> = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let _ = admin
        .delete_topics(&refs, &rdkafka::admin::AdminOptions::new())
        .await;
    Ok(())
}
