//! SVG charts of `bench/results/*.json` (issue 14), written next to them in
//! `bench/results/plots/` and shown in the README and docs/benchmarks.md.
//!
//! ```text
//!  newest peers-<size>-*.json ─► peers-<size>.svg      events/s │ CPU-s per M events │ peak RSS
//!  newest peers-*.json + newest latency-*.json
//!                             ─► breach-visibility.svg  deadline → breach visible (ms, log)
//!  restart-*.json            ─► memory-per-open-task.svg, restart-time.svg (vs open tasks)
//! ```
//!
//! A chart whose results do not exist is skipped with a note, never drawn empty. Text is
//! plain SVG `<text>` (plotters' SVG backend without font files), so the files stay small
//! and diff-able.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Parser;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde_json::Value;

#[derive(Parser, Debug)]
#[command(about = "SVG plots of bench/results/*.json")]
struct Args {
    /// Folder of the JSON results.
    #[arg(long)]
    results: Option<PathBuf>,
    /// Folder for the SVG files (default: <results>/plots).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Plot this peers result instead of the newest of each size.
    #[arg(long)]
    peers: Option<PathBuf>,
}

const COLORS: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
];

fn read_json(p: &Path) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
}

/// `<prefix>*.json` in `dir`, oldest first (the names end in the date, `write_result`).
fn results_named(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.retain(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(prefix) && n.ends_with(".json"))
    });
    files.sort_by_key(|p| date_of(p));
    files
}

/// The `YYYY-MM-DD` a result's name ends with (the sort key of "newest").
fn date_of(p: &Path) -> String {
    let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    let date = stem.len().checked_sub(10).map(|i| &stem[i..]).unwrap_or("");
    format!("{date}{stem}")
}

/// Value labels: centred above the point they label.
fn label_style(size: u32) -> TextStyle<'static> {
    TextStyle::from(("sans-serif", size).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom))
}

/// A bar filling its segment but for a gap on both sides.
fn bar<X, Y>(corners: [(X, Y); 2], style: ShapeStyle) -> Rectangle<(X, Y)> {
    let mut r = Rectangle::new(corners, style);
    r.set_margin(0, 0, 10, 10);
    r
}

/// The systems' names as the bars show them (the JSON has the full ones).
fn short_name(name: &str) -> String {
    match name {
        "hmis-flow" => "hmis-flow e2e",
        "hmis-flow dataflow only" => "dataflow only",
        "seed-style baseline" => "seed-style",
        other => other,
    }
    .to_string()
}

/// One color per system in every chart.
fn system_color(short: &str) -> RGBColor {
    match short {
        "hmis-flow e2e" => COLORS[0],
        "dataflow only" => RGBColor(120, 170, 215),
        "seed-style" => COLORS[1],
        "Pathway" => COLORS[2],
        _ => COLORS[4],
    }
}

/// A bar chart of one figure per system into `area`.
fn bars(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    title: &str,
    names: &[String],
    values: &[Option<f64>],
    unit: &str,
) -> anyhow::Result<()> {
    let max = values.iter().flatten().copied().fold(0.0, f64::max);
    let top = if max > 0.0 { max * 1.2 } else { 1.0 };
    let n = names.len();
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d((0..n.max(1) - 1).into_segmented(), 0f64..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc(unit)
        .y_label_formatter(&|y| hmis_bench::si(*y))
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .draw()?;
    for (i, v) in values.iter().enumerate() {
        let color = system_color(&names[i]);
        match v {
            Some(v) => {
                chart.draw_series(std::iter::once(bar(
                    [
                        (SegmentValue::Exact(i), 0.0),
                        (SegmentValue::Exact(i + 1), *v),
                    ],
                    color.mix(0.8).filled(),
                )))?;
                chart.draw_series(std::iter::once(Text::new(
                    hmis_bench::si(*v),
                    (SegmentValue::CenterOf(i), *v + top * 0.01),
                    label_style(13),
                )))?;
            }
            None => {
                chart.draw_series(std::iter::once(Text::new(
                    "not counted",
                    (SegmentValue::CenterOf(i), top * 0.05),
                    label_style(13).color(&RED),
                )))?;
            }
        }
    }
    Ok(())
}

fn peers_chart(result: &Value, path: &Path) -> anyhow::Result<()> {
    let systems: Vec<&Value> = result["systems"]
        .as_array()
        .map(|a| a.iter().filter(|s| s.get("skipped").is_none()).collect())
        .unwrap_or_default();
    anyhow::ensure!(!systems.is_empty(), "no measured system");
    let names: Vec<String> = systems
        .iter()
        .map(|s| short_name(s["name"].as_str().unwrap_or("?")))
        .collect();
    let get = |k: &str, scale: f64| -> Vec<Option<f64>> {
        systems
            .iter()
            .map(|s| s[k].as_f64().map(|v| v * scale))
            .collect()
    };
    let root = SVGBackend::new(path, (1200, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let (head, body) = root.split_vertically(40);
    head.draw(&Text::new(
        format!(
            "{} records ({} workflows), {} cores {}, load {}; commit {}",
            result["records"],
            result["workflows"],
            result["machine"]["nproc"],
            result["machine"]["cpu_model"].as_str().unwrap_or("?"),
            result["machine"]["loadavg_at_start"]
                .as_str()
                .unwrap_or("?"),
            result["machine"]["git_commit"].as_str().unwrap_or("?"),
        ),
        (12, 12),
        ("sans-serif", 15).into_font(),
    ))?;
    let panels = body.split_evenly((1, 3));
    bars(
        &panels[0],
        "throughput (higher is better)",
        &names,
        &get("events_per_s", 1.0),
        "input records / s",
    )?;
    bars(
        &panels[1],
        "CPU per million records (lower is better)",
        &names,
        &get("cpu_s_per_million_events", 1.0),
        "CPU-seconds",
    )?;
    bars(
        &panels[2],
        "peak RSS (lower is better)",
        &names,
        &get("peak_rss_bytes", 1e-6),
        "MB",
    )?;
    root.present()?;
    Ok(())
}

/// p50/p90/p99/max of each source, grouped bars on a log scale.
fn breach_chart(groups: &[(String, Value)], path: &Path) -> anyhow::Result<()> {
    const STATS: [&str; 4] = ["p50", "p90", "p99", "max"];
    let max = groups
        .iter()
        .flat_map(|(_, v)| STATS.iter().filter_map(|s| v[*s].as_f64()))
        .fold(1.0, f64::max);
    let root = SVGBackend::new(path, (900, 460)).into_drawing_area();
    root.fill(&WHITE)?;
    let n = groups.len() * STATS.len();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "SLA deadline → breach visible (ms, log scale; lower is better)",
            ("sans-serif", 18),
        )
        .margin(14)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (0..n.max(1) - 1).into_segmented(),
            (0.5f64..max * 3.0).log_scale(),
        )?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc("milliseconds")
        .y_label_formatter(&|y| hmis_bench::si(*y))
        .x_labels(n)
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => STATS[*i % STATS.len()].to_string(),
            _ => String::new(),
        })
        .draw()?;
    for (gi, (name, v)) in groups.iter().enumerate() {
        let color = COLORS[gi % COLORS.len()];
        for (si, stat) in STATS.iter().enumerate() {
            let Some(y) = v[*stat].as_f64() else { continue };
            let i = gi * STATS.len() + si;
            chart.draw_series(std::iter::once(bar(
                [
                    (SegmentValue::Exact(i), 0.5),
                    (SegmentValue::Exact(i + 1), y.max(0.6)),
                ],
                color.mix(0.8).filled(),
            )))?;
            chart.draw_series(std::iter::once(Text::new(
                hmis_bench::si(y),
                (SegmentValue::CenterOf(i), y.max(0.6) * 1.1),
                label_style(12),
            )))?;
        }
        chart
            .draw_series(std::iter::empty::<Circle<(SegmentValue<usize>, f64), i32>>())?
            .label(name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// One line per series of (open tasks, value) points, log-scaled open tasks.
fn open_tasks_chart(
    title: &str,
    y_desc: &str,
    series: &[(String, Vec<(f64, f64)>)],
    path: &Path,
) -> anyhow::Result<()> {
    let xs = series.iter().flat_map(|(_, p)| p.iter().map(|q| q.0));
    let (lo, hi) = xs.fold((f64::MAX, 0f64), |(a, b), x| (a.min(x), b.max(x)));
    let ymax = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|q| q.1))
        .fold(0f64, f64::max);
    let root = SVGBackend::new(path, (800, 440)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((lo / 1.5..hi * 1.5).log_scale(), 0f64..ymax * 1.2)?;
    chart
        .configure_mesh()
        .x_desc("open tasks")
        .x_labels(4)
        .y_desc(y_desc)
        .x_label_formatter(&|x| hmis_bench::si(*x))
        .draw()?;
    for (i, (name, points)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
        chart.draw_series(
            points
                .iter()
                .map(|&(x, y)| Circle::new((x, y), 4, color.filled())),
        )?;
        chart.draw_series(
            points
                .iter()
                .map(|&(x, y)| Text::new(hmis_bench::si(y), (x, y + ymax * 0.02), label_style(12))),
        )?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = args.results.clone().unwrap_or_else(hmis_bench::results_dir);
    let out = args.out.clone().unwrap_or_else(|| dir.join("plots"));
    std::fs::create_dir_all(&out)?;
    let mut written: Vec<PathBuf> = Vec::new();

    // Peers: the newest result of each size (or the one given).
    let peers: Vec<PathBuf> = match &args.peers {
        Some(p) => vec![p.clone()],
        None => {
            let mut newest: std::collections::BTreeMap<String, PathBuf> = Default::default();
            for p in results_named(&dir, "peers-") {
                if let Ok(v) = read_json(&p) {
                    let size = v["size"].as_str().unwrap_or("?").to_string();
                    newest.insert(size, p);
                }
            }
            newest.into_values().collect()
        }
    };
    let mut newest_peers: Option<(usize, Value)> = None;
    for p in &peers {
        let v = read_json(p)?;
        let path = out.join(format!("peers-{}.svg", v["size"].as_str().unwrap_or("run")));
        peers_chart(&v, &path)?;
        written.push(path);
        // The breach chart takes the seed's polling delays from the largest run that has them.
        let rank = ["smoke", "small", "medium", "large"]
            .iter()
            .position(|s| v["size"] == *s)
            .unwrap_or(0);
        let has_delays = v["systems"].as_array().into_iter().flatten().any(|s| {
            s.pointer("/sla_breaches/breach_visibility_delay_ms/count")
                .and_then(Value::as_u64)
                .unwrap_or(0)
                > 0
        });
        if has_delays && newest_peers.as_ref().is_none_or(|(r, _)| rank >= *r) {
            newest_peers = Some((rank, v));
        }
    }
    if peers.is_empty() {
        eprintln!(
            "no peers-*.json in {}: throughput chart skipped",
            dir.display()
        );
    }

    // Deadline → breach visible: hmis-flow (wall clock, `latency`) and the seed's polling.
    let mut groups: Vec<(String, Value)> = Vec::new();
    if let Some(p) = results_named(&dir, "latency-20").last() {
        let v = read_json(p)?;
        if let Some(l) = v.pointer("/latency_ms/total") {
            groups.push(("hmis-flow (wall clock, consumer sees it)".into(), l.clone()));
        }
    }
    if let Some((_, v)) = &newest_peers {
        let seed = v["systems"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["name"] == "seed-style baseline");
        if let Some(d) = seed.and_then(|s| s.pointer("/sla_breaches/breach_visibility_delay_ms")) {
            if d["count"].as_u64().unwrap_or(0) > 0 {
                groups.push(("seed-style (5-min polling)".into(), d.clone()));
            }
        }
    }
    if groups.is_empty() {
        eprintln!("no latency or seed breach delays: breach chart skipped");
    } else {
        let path = out.join("breach-visibility.svg");
        breach_chart(&groups, &path)?;
        written.push(path);
    }

    // Memory and restart time vs open tasks (bin/restart results), newest per open-task count.
    let mut by_open: std::collections::BTreeMap<u64, Value> = Default::default();
    for p in results_named(&dir, "restart-") {
        if let Ok(v) = read_json(&p) {
            if let Some(n) = v["open_tasks"].as_u64() {
                by_open.insert(n, v);
            }
        }
    }
    if by_open.is_empty() {
        eprintln!("no restart-*.json: memory and restart charts skipped");
    } else {
        let pts = |ptr: &str, scale: f64| -> Vec<(f64, f64)> {
            by_open
                .iter()
                .filter_map(|(n, v)| v.pointer(ptr)?.as_f64().map(|y| (*n as f64, y * scale)))
                .collect()
        };
        let first_run: Vec<(f64, f64)> = by_open
            .iter()
            .filter_map(|(n, v)| {
                let rss = v.pointer("/first_run/peak_rss_bytes")?.as_f64()?;
                Some((*n as f64, rss / *n as f64 / 1e3))
            })
            .collect();
        // Where these figures come from: older runs, possibly another machine.
        let source = by_open
            .values()
            .next_back()
            .map(|v| {
                format!(
                    " ({}, commit {})",
                    v["machine"]["cpu_model"].as_str().unwrap_or("?"),
                    v["machine"]["git_commit"].as_str().unwrap_or("?")
                )
            })
            .unwrap_or_default();
        let path = out.join("memory-per-open-task.svg");
        open_tasks_chart(
            &format!("hmis-flow peak RSS per open task{source}"),
            "kB per open task",
            &[
                ("first run (backlog read)".into(), first_run),
                (
                    "restart (replay)".into(),
                    pts("/restart/peak_rss_bytes_per_open_task", 1e-3),
                ),
            ],
            &path,
        )?;
        written.push(path);
        let path = out.join("restart-time.svg");
        open_tasks_chart(
            &format!("hmis-flow restart: start to caught up{source}"),
            "seconds",
            &[("restart".into(), pts("/restart/seconds_to_exit", 1.0))],
            &path,
        )?;
        written.push(path);
    }
    for p in &written {
        println!("wrote {}", p.display());
    }
    Ok(())
}
