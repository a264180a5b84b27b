//! Decode-only benchmark: `events::decode` (one pass, borrowed) against
//! `events::decode_reference` (serde_json DOM, clone, typed decode) on the same generated
//! records, in the same run, one thread, release.
//!
//! ```text
//!  seeded workload (hmis_flow::workload) ──► records (topic, key, bytes)
//!      ├─► decode_reference  (the old path)      ┐
//!      ├─► decode            (one pass + fallback)├─ µs per record, records per CPU-second
//!      └─► Arc::<str>::from(payload) alone        ┘  (the `raw` copy every event keeps)
//! ```
//!
//! Before timing, every record is decoded both ways and the results compared: a benchmark of
//! a decoder that disagrees with the reference is no result. Passes alternate between the two
//! decoders so that a busy machine slows both alike; the median pass is reported.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use serde_json::json;

use hmis_bench::{machine_info, process_cpu_secs, si, write_result, LoadMonitor};
use hmis_dataflows::events::{
    decode, decode_one_pass, decode_reference, format_time, Event, InputTopic, Pos, Rejection,
};
use hmis_flow::workload::{generate, WorkloadConfig, WorkloadRecord};

#[derive(Parser, Debug)]
#[command(about = "Decode-only throughput: one-pass decode vs the DOM reference, same records")]
struct Args {
    /// Workflows in the generated workload (each yields about 10-40 records).
    #[arg(long, default_value_t = 10_000)]
    workflows: usize,
    /// Seed of the workload generator.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Share of malformed records (dead letters: these take both paths).
    #[arg(long, default_value_t = 0.0)]
    bad_record_ratio: f64,
    /// Timed passes per decoder; the median is reported.
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Added to the result file name: bench/results/decode-<tag>-<date>.json.
    #[arg(long)]
    tag: Option<String>,
    /// Write the result here instead.
    #[arg(long)]
    out: Option<PathBuf>,
}

type Decoder = fn(InputTopic, Option<&[u8]>, Option<&[u8]>, Pos) -> Result<Event, Rejection>;

fn role_of(topic: &str) -> InputTopic {
    InputTopic::ALL
        .into_iter()
        .find(|r| r.default_name() == topic)
        .expect("workload topic is an input topic")
}

struct Input {
    topic: InputTopic,
    key: Option<Vec<u8>>,
    value: Vec<u8>,
}

/// One pass over every record; returns (wall seconds, CPU seconds, accepted).
fn pass(inputs: &[Input], f: Decoder) -> (f64, f64, usize) {
    let (t, c) = (Instant::now(), process_cpu_secs());
    let mut ok = 0;
    for (i, r) in inputs.iter().enumerate() {
        let pos = Pos {
            partition: 0,
            offset: i as i64,
        };
        // Dropped here, as the runtime drops what it has fed on: the free is part of the cost.
        ok += usize::from(f(r.topic, r.key.as_deref(), Some(&r.value), pos).is_ok());
    }
    (t.elapsed().as_secs_f64(), process_cpu_secs() - c, ok)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let load = LoadMonitor::start();
    let records: Vec<WorkloadRecord> = generate(&WorkloadConfig {
        seed: args.seed,
        workflows: args.workflows,
        start_ms: 1_795_680_000_000,
        bad_record_ratio: args.bad_record_ratio,
        duplicate_ratio: 0.0,
    });
    let inputs: Vec<Input> = records
        .iter()
        .map(|r| Input {
            topic: role_of(r.topic),
            key: r.key.as_ref().map(|k| k.as_bytes().to_vec()),
            value: r.payload.clone(),
        })
        .collect();
    let n = inputs.len();
    let bytes: usize = inputs.iter().map(|r| r.value.len()).sum();

    // Same results first, and how many take the one-pass path.
    let mut one_pass = 0;
    for (i, r) in inputs.iter().enumerate() {
        let pos = Pos {
            partition: 0,
            offset: i as i64,
        };
        let (key, value) = (r.key.as_deref(), Some(&r.value[..]));
        anyhow::ensure!(
            decode(r.topic, key, value, pos) == decode_reference(r.topic, key, value, pos),
            "decode and decode_reference differ on record {i}"
        );
        one_pass += usize::from(decode_one_pass(r.topic, key, value, pos).is_some());
    }
    eprintln!(
        "workload: {n} records ({} workflows, {:.0} bytes/record avg), {one_pass} decoded in one pass",
        args.workflows,
        bytes as f64 / n as f64
    );

    let (mut reference, mut fast, mut copy) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.repeat.max(1) {
        reference.push(pass(&inputs, decode_reference));
        fast.push(pass(&inputs, decode));
        let (t, c) = (Instant::now(), process_cpu_secs());
        let mut len = 0;
        for r in &inputs {
            let text = std::str::from_utf8(&r.value).unwrap_or_default();
            let raw: Arc<str> = Arc::from(std::hint::black_box(text));
            len += raw.len();
        }
        std::hint::black_box(len);
        copy.push((t.elapsed().as_secs_f64(), process_cpu_secs() - c, n));
    }
    let summary = |runs: &[(f64, f64, usize)]| {
        let wall = median(runs.iter().map(|r| r.0).collect());
        let cpu = median(runs.iter().map(|r| r.1).collect());
        json!({
            "us_per_record_wall": wall * 1e6 / n as f64,
            "us_per_record_cpu": cpu.max(0.01) * 1e6 / n as f64,
            "records_per_sec": (n as f64 / wall).round(),
            "records_per_cpu_sec": (n as f64 / cpu.max(0.01)).round(),
            "accepted": runs[0].2,
            "all_wall_secs": runs.iter().map(|r| r.0).collect::<Vec<_>>(),
            "all_cpu_secs": runs.iter().map(|r| r.1).collect::<Vec<_>>(),
        })
    };
    let (r, f, c) = (summary(&reference), summary(&fast), summary(&copy));
    println!();
    println!("| decode ({n} records, {:.0} bytes avg, 1 thread) | µs per record (wall) | µs per record (CPU) | records per CPU-second |", bytes as f64 / n as f64);
    println!("|---|---:|---:|---:|");
    for (name, s) in [
        ("decode_reference (DOM, clone, typed)", &r),
        ("decode (one pass, borrowed)", &f),
        ("of which: the `raw` copy (Arc<str>) alone", &c),
    ] {
        println!(
            "| {name} | {:.3} | {:.3} | {} |",
            s["us_per_record_wall"].as_f64().unwrap_or(0.0),
            s["us_per_record_cpu"].as_f64().unwrap_or(0.0),
            si(s["records_per_cpu_sec"].as_f64().unwrap_or(0.0))
        );
    }
    let speedup = r["us_per_record_cpu"].as_f64().unwrap_or(0.0)
        / f["us_per_record_cpu"].as_f64().unwrap_or(1.0);
    println!("\nspeed-up (CPU): {speedup:.2}×");
    let result = json!({
        "benchmark": "decode",
        "started_at": format_time(hmis_bench::wall_ms()),
        "machine": machine_info(),
        "config": {
            "workflows": args.workflows, "seed": args.seed,
            "bad_record_ratio": args.bad_record_ratio, "repeat": args.repeat,
        },
        "records": n,
        "payload_bytes_avg": bytes as f64 / n as f64,
        "one_pass_records": one_pass,
        "decode_reference": r,
        "decode": f,
        "raw_copy_alone": c,
        "speedup_cpu": speedup,
        "load": load.finish(),
    });
    let path = write_result("decode", args.tag.as_deref(), args.out.as_ref(), &result)?;
    println!("wrote {}", path.display());
    Ok(())
}
