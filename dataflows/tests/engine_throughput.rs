//! Throughput of the two cores on the same feed (ignored by default; release mode):
//!
//! ```text
//! cargo test --release -p hmis-dataflows --test engine_throughput -- --ignored --nocapture
//! ```
//!
//! The feed is `HMIS_TP_SEEDS` (default 100) timed reference histories
//! ([`history::generate_timed`]) merged into one, each seed's ids prefixed so they do not
//! meet, stamped two ways: `event` (each event at its eventTime) and `batch` (10,000 events
//! per stamp, as `clock = wall` reading a backlog). Each run goes through the same driver and
//! gather ([`hmis_dataflows::engine::run_with`], counting the flushed records instead of
//! applying them); events/s is wall time from start to the last
//! flush, CPU-s is the process's user + system time over the run (all threads).
//! The lifecycle is out of reach in both (the keyed core does not have it yet).

#[allow(dead_code)]
#[path = "reference/history.rs"]
mod history;

use std::sync::Arc;
use std::time::Instant;

use hmis_dataflows::engine::{run_with, Core};
use hmis_dataflows::events::{Event, Template};
use hmis_dataflows::harness::Run;
use hmis_dataflows::model::Str;
use hmis_dataflows::output::Millis;
use hmis_dataflows::RulesConfig;

/// User + system CPU seconds of this process so far (/proc/self/stat, 100 ticks a second).
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 of stat; `after` starts at field 3.
    (tick(11) + tick(12)) / 100.0
}

/// Every id of `e` prefixed with `p`.
fn prefixed(e: Event, p: &str) -> Event {
    let px = |s: &mut Str| *s = format!("{p}{s}").into();
    match e {
        Event::Definition(mut d) => {
            px(&mut d.template_id);
            d.template = d.template.map(|t| {
                let mut t = Template::clone(&t);
                px(&mut t.template_id);
                Arc::new(t)
            });
            Event::Definition(d)
        }
        Event::Task(mut x) => {
            px(&mut x.event_id);
            px(&mut x.task_instance_id);
            px(&mut x.workflow_instance_id);
            Event::Task(x)
        }
        Event::Workflow(mut x) => {
            px(&mut x.event_id);
            px(&mut x.workflow_instance_id);
            if let Some(t) = x.template_id.as_mut() {
                px(t);
            }
            Event::Workflow(x)
        }
        Event::Order(mut x) => {
            px(&mut x.event_id);
            px(&mut x.order_id);
            if let Some(w) = x.workflow_instance_id.as_mut() {
                px(w);
            }
            Event::Order(x)
        }
        Event::System(mut x) => {
            px(&mut x.event_id);
            Event::System(x)
        }
    }
}

fn feed(seeds: u64) -> Vec<(Millis, Event)> {
    let mut feed = Vec::new();
    for seed in 0..seeds {
        let h = history::generate_timed(seed);
        let p = format!("s{seed}-");
        feed.extend(
            h.records
                .iter()
                .map(|r| (r.time.unwrap_or(history::T0), prefixed(r.event.clone(), &p))),
        );
    }
    feed.sort_by_key(|(t, _)| *t);
    feed
}

fn measure(core: Core, workers: usize, feed: &[(Millis, Event)]) -> (f64, f64, usize) {
    let mut cfg = RulesConfig::default();
    cfg.lifecycle.unknown_reference_grace_ms = 1 << 40;
    cfg.lifecycle.retire_after_ms = 1 << 40;
    let end = feed.last().map(|(t, _)| *t).unwrap_or(history::T0) + 24 * 3_600_000;
    let mut r = Run::new(workers, feed.to_vec(), end);
    r.config = cfg;
    let (c0, t0) = (cpu_secs(), Instant::now());
    let records = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = records.clone();
    run_with(r, core, move |b| {
        count.fetch_add(b.records.len(), std::sync::atomic::Ordering::Relaxed);
    });
    let (wall, cpu) = (t0.elapsed().as_secs_f64(), cpu_secs() - c0);
    (
        wall,
        cpu,
        records.load(std::sync::atomic::Ordering::Relaxed),
    )
}

#[test]
#[ignore]
fn throughput_of_both_cores() {
    let seeds = std::env::var("HMIS_TP_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let per_event = feed(seeds);
    let n = per_event.len();
    let batched: Vec<(Millis, Event)> = per_event
        .chunks(10_000)
        .flat_map(|c| {
            let t = c.last().expect("a chunk").0;
            c.iter().map(move |(_, e)| (t, e.clone()))
        })
        .collect();
    println!("{n} events from {seeds} timed histories");
    for (stamps, f) in [("event", &per_event), ("batch", &batched)] {
        for workers in [1, 2] {
            let only = std::env::var("HMIS_TP_CORE").ok();
            for core in [Core::Differential, Core::Keyed] {
                if only.as_deref().is_some_and(|c| c != format!("{core:?}")) {
                    continue;
                }
                let (wall, cpu, records) = measure(core, workers, f);
                println!(
                    "{stamps:>5} stamps, {workers} worker(s), {core:?}: {:>9.0} events/s, {:>9.0} events per CPU-s ({wall:.2} s, {cpu:.2} CPU-s, {records} records)",
                    n as f64 / wall,
                    n as f64 / cpu.max(0.01),
                );
            }
        }
    }
}
