//! `hmis-flow`: CLI → config → tracing → command.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use hmis_flow::config::{ClockMode, Config};
use hmis_flow::runtime::Shared;

/// Incremental hospital-workflow rules: Kafka in, timely/differential dataflow, Kafka and PostgreSQL out.
#[derive(Parser)]
#[command(name = "hmis-flow", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Manage the contract's Kafka topics.
    Topics {
        #[command(subcommand)]
        action: TopicsAction,
    },
    /// Apply the PostgreSQL migrations (versioned, idempotent, safe concurrently).
    Migrate(Common),
    /// Run the pipeline.
    Run(RunArgs),
    /// Bring up local services if none are configured, feed a demo workload, run, summarize.
    Demo(DemoArgs),
    /// Produce a generated workload to the input topics (for tests and benchmarks).
    Generate(GenerateArgs),
    /// Print a topic's records (JSON, one per line) from its beginning to its current end.
    Tail {
        #[command(flatten)]
        common: Common,
        /// Topic name, e.g. workflow-derived-events.
        topic: String,
    },
}

#[derive(Subcommand)]
enum TopicsAction {
    /// Create the contract's topics (existing ones are left alone).
    Create {
        #[command(flatten)]
        common: Common,
        /// Replication factor (3 in production, 1 on a development broker).
        #[arg(long, env = "HMIS_REPLICATION_FACTOR")]
        replication_factor: Option<i32>,
    },
}

/// Options every command takes.
#[derive(Args, Clone, Default)]
struct Common {
    /// TOML configuration file (see docs/configuration.md).
    #[arg(long, env = "HMIS_CONFIG")]
    config: Option<PathBuf>,
    /// Kafka bootstrap servers.
    #[arg(long, env = "HMIS_BROKERS")]
    brokers: Option<String>,
    /// PostgreSQL URL.
    #[arg(long, env = "HMIS_DATABASE_URL")]
    database_url: Option<String>,
    /// Pipeline identity (progress rows, fencing, consumer group).
    #[arg(long, env = "HMIS_GROUP_ID")]
    group_id: Option<String>,
}

#[derive(Args, Clone)]
struct RunArgs {
    #[command(flatten)]
    common: Common,
    /// Timely worker threads.
    #[arg(long, env = "HMIS_WORKERS")]
    workers: Option<usize>,
    /// Pipeline clock: wall (default) or event.
    #[arg(long, env = "HMIS_CLOCK", value_enum)]
    clock: Option<ClockMode>,
    /// Address for /health/live, /health/ready and /metrics: PORT or :PORT (loopback), or IP:PORT.
    #[arg(long, env = "HMIS_HTTP", value_parser = hmis_flow::http::parse_listen_addr)]
    http: Option<SocketAddr>,
    /// Read every input partition to its end offset at start, commit, exit 0.
    #[arg(long, env = "HMIS_UNTIL_CAUGHT_UP")]
    until_caught_up: bool,
    /// In clock=event, how far the watermark trails the inputs (ms).
    #[arg(long, env = "HMIS_ALLOWED_LATENESS_MS")]
    allowed_lateness_ms: Option<u64>,
    /// Wall-clock tick and flush interval (ms).
    #[arg(long, env = "HMIS_TICK_MS")]
    tick_ms: Option<u64>,
    /// Most records read per worker before the dataflow runs.
    #[arg(long, env = "HMIS_POLL_BATCH")]
    poll_batch: Option<usize>,
    /// Records (key + value) larger than this many bytes are dead-lettered unread.
    #[arg(long, env = "HMIS_MAX_RECORD_BYTES")]
    max_record_bytes: Option<usize>,
    /// Benchmarks only: compute everything but write nothing (no rows, no derived events,
    /// no offsets), to measure reading and the dataflow without the sinks.
    #[arg(long)]
    discard_output: bool,
}

#[derive(Args, Clone)]
struct DemoArgs {
    #[command(flatten)]
    common: Common,
    /// Workflows in the generated workload.
    #[arg(long, default_value_t = 200)]
    workflows: usize,
    /// Seed of the generated workload.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Timely worker threads.
    #[arg(long, default_value_t = 2)]
    workers: usize,
}

#[derive(Args, Clone)]
struct GenerateArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 1000)]
    workflows: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Fraction of malformed records.
    #[arg(long, default_value_t = 0.0)]
    bad_ratio: f64,
    /// Fraction of re-sent duplicates.
    #[arg(long, default_value_t = 0.0)]
    duplicate_ratio: f64,
    /// Also write the records as per-topic JSON-lines files into this folder
    /// (`<topic>.jsonl` + `manifest.json`), for peers that read files (bench/pathway).
    #[arg(long, value_name = "DIR")]
    files: Option<PathBuf>,
    /// Do not produce to Kafka (with `--files`: only write the files).
    #[arg(long)]
    no_produce: bool,
    /// Produce at most this many records per second (default: as fast as the broker takes them).
    #[arg(long, value_name = "RECORDS_PER_S")]
    rate: Option<f64>,
    /// No progress bars (they are drawn on stderr, and only when it is a terminal).
    #[arg(long)]
    quiet: bool,
}

/// mimalloc instead of glibc's malloc: allocation and free were a fifth of the dataflow's
/// profile (docs/engine.md, session 13).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn load(common: &Common) -> anyhow::Result<Config> {
    let mut cfg = match &common.config {
        Some(p) => Config::from_file(p)?,
        None => Config::default(),
    };
    if let Some(b) = &common.brokers {
        cfg.brokers = b.clone();
    }
    if let Some(d) = &common.database_url {
        cfg.database_url = d.clone();
    }
    if let Some(g) = &common.group_id {
        cfg.group_id = g.clone();
    }
    // HMIS_KAFKA__* (librdkafka options and secrets: never taken from flags).
    cfg.apply_env()?;
    Ok(cfg)
}

fn main() {
    // The demo prints its own summary: keep its log to warnings unless HMIS_LOG says otherwise.
    let quiet = std::env::args().nth(1).as_deref() == Some("demo");
    // librdkafka warns that enable.gapless.guarantee (which the outbox relies on) is "experimental".
    let default_filter = if quiet {
        "warn,librdkafka=error"
    } else {
        "info,rdkafka=warn,librdkafka=error,tokio_postgres=warn"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HMIS_LOG")
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = real_main() {
        eprintln!("hmis-flow: error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Topics {
            action:
                TopicsAction::Create {
                    common,
                    replication_factor,
                },
        } => {
            let mut cfg = load(&common)?;
            if let Some(r) = replication_factor {
                cfg.replication_factor = r;
            }
            let rt = tokio::runtime::Runtime::new()?;
            let created = rt.block_on(hmis_flow::demo::create_topics(&cfg))?;
            println!(
                "topics created: {}",
                if created.is_empty() {
                    "none (all exist)".to_string()
                } else {
                    created.join(", ")
                }
            );
            Ok(())
        }
        Command::Migrate(common) => {
            let cfg = load(&common)?;
            let rt = tokio::runtime::Runtime::new()?;
            let applied = rt.block_on(async {
                let mut pg =
                    hmis_sinks::PgSink::connect_with_tls(&cfg.database_url, &cfg.database_tls())
                        .await?;
                pg.migrate().await
            })?;
            println!(
                "migrations applied: {}",
                if applied.is_empty() {
                    "none (up to date)".to_string()
                } else {
                    applied.join(", ")
                }
            );
            Ok(())
        }
        Command::Run(args) => {
            let mut cfg = load(&args.common)?;
            if let Some(w) = args.workers {
                cfg.workers = w;
            }
            if let Some(c) = args.clock {
                cfg.clock = c;
            }
            if args.http.is_some() {
                cfg.http = args.http;
            }
            cfg.until_caught_up |= args.until_caught_up;
            if let Some(l) = args.allowed_lateness_ms {
                cfg.allowed_lateness_ms = l;
            }
            if let Some(t) = args.tick_ms {
                cfg.tick_ms = t;
            }
            if let Some(p) = args.poll_batch {
                cfg.poll_batch = p;
            }
            if let Some(m) = args.max_record_bytes {
                cfg.max_record_bytes = m;
            }
            cfg.discard_output |= args.discard_output;
            let shared = Arc::new(Shared::default());
            // Signals and HTTP run on a small side runtime; the pipeline has its own threads.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?;
            if let Some(addr) = cfg.http {
                rt.block_on(hmis_flow::http::serve(addr, shared.clone()))
                    .context("binding the HTTP endpoints")?;
            }
            let sig = shared.clone();
            rt.spawn(async move {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .expect("SIGTERM handler");
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {},
                    _ = term.recv() => {},
                }
                tracing::info!("signal received: draining");
                sig.stop.store(true, Ordering::SeqCst);
            });
            let summary = hmis_flow::run(cfg, shared)?;
            println!(
                "hmis-flow: read {} records ({} dead letters), {} commits, {} records published, clock {} , {:.1}s",
                summary.records_read,
                summary.dead_letters,
                summary.batches,
                summary.published,
                hmis_dataflows::events::format_time(summary.frontier),
                summary.elapsed.as_secs_f64()
            );
            Ok(())
        }
        Command::Demo(args) => {
            let explicit = args.common.brokers.is_some() || std::env::var("HMIS_BROKERS").is_ok();
            let explicit_db =
                args.common.database_url.is_some() || std::env::var("HMIS_DATABASE_URL").is_ok();
            let cfg = load(&args.common)?;
            hmis_flow::demo::demo(
                cfg,
                hmis_flow::demo::DemoOptions {
                    workflows: args.workflows,
                    seed: args.seed,
                    workers: args.workers,
                    brokers_configured: explicit,
                    database_configured: explicit_db,
                },
            )
        }
        Command::Tail { common, topic } => {
            let cfg = load(&common)?;
            for (_, payload) in hmis_flow::demo::read_topic(&cfg, &topic)? {
                println!("{payload}");
            }
            Ok(())
        }
        Command::Generate(args) => {
            let cfg = load(&args.common)?;
            let bar = |len: u64, what: &str| {
                let pb = if args.quiet {
                    indicatif::ProgressBar::hidden()
                } else {
                    indicatif::ProgressBar::new(len)
                };
                pb.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{msg:>10} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} ({per_sec}, eta {eta})",
                    )
                    .expect("progress template"),
                );
                pb.set_message(what.to_string());
                pb
            };
            // The generator is one call: the bar ticks (elapsed time) and fills when it returns.
            let pb = bar(args.workflows as u64, "generate");
            pb.enable_steady_tick(std::time::Duration::from_millis(200));
            let records = hmis_flow::workload::generate(&hmis_flow::workload::WorkloadConfig {
                seed: args.seed,
                workflows: args.workflows,
                start_ms: hmis_flow::source::wall_ms() - 24 * 3_600_000,
                bad_record_ratio: args.bad_ratio,
                duplicate_ratio: args.duplicate_ratio,
            });
            pb.set_position(args.workflows as u64);
            pb.finish();
            if let Some(dir) = &args.files {
                let counts = hmis_flow::demo::write_topic_files(
                    dir,
                    &records,
                    serde_json::json!({"workflows": args.workflows, "seed": args.seed}),
                )?;
                eprintln!("wrote {} ({counts:?})", dir.display());
            }
            if args.no_produce {
                println!("generated {} records", records.len());
                return Ok(());
            }
            let pb = bar(records.len() as u64, "produce");
            let rt = tokio::runtime::Runtime::new()?;
            let n = rt.block_on(hmis_flow::demo::produce_paced(
                &cfg,
                &records,
                args.rate,
                &|n| pb.set_position(n as u64),
            ))?;
            pb.finish();
            println!("produced {n} records");
            Ok(())
        }
    }
}
