//! The demo (README's first command) and the Kafka helpers it shares with tests:
//! topic creation, producing a workload, reading an output topic.
//!
//! `hmis-flow demo`: when no broker is configured (`HMIS_BROKERS` / `--brokers`), an
//! in-process Kafka-protocol mock cluster (librdkafka's) serves the topics, so a fresh
//! machine needs no broker build; when no database is configured, `scripts/services.sh
//! start-pg` brings up PostgreSQL 15 on loopback. The run uses `clock = event` and
//! `until_caught_up`, then prints what the pipeline computed.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use hmis_sinks::KafkaClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use hmis_dataflows::events::InputTopic;

use crate::config::{ClockMode, Config};
use crate::workload::{WorkloadConfig, WorkloadRecord};

/// The contract's topics under `cfg`'s names.
pub fn topic_specs(cfg: &Config) -> Vec<hmis_sinks::TopicSpec> {
    hmis_sinks::default_topics(
        &hmis_sinks::InputTopicNames {
            definitions: cfg.topics.definitions.clone(),
            task_events: cfg.topics.tasks.clone(),
            order_events: cfg.topics.orders.clone(),
            state_events: cfg.topics.workflows.clone(),
            system_events: cfg.topics.system.clone(),
        },
        &hmis_sinks::TopicNames {
            derived: cfg.topics.derived.clone(),
            alerts: cfg.topics.alerts.clone(),
            dead_letter: cfg.topics.dead_letter.clone(),
        },
        &cfg.topics.analytics,
    )
}

/// `hmis-flow topics create`.
pub async fn create_topics(cfg: &Config) -> anyhow::Result<Vec<String>> {
    Ok(hmis_sinks::create_topics_with(
        &cfg.brokers,
        &cfg.kafka,
        &topic_specs(cfg),
        cfg.replication_factor,
    )
    .await?)
}

/// The configured name of the input topic a workload record names by its default name.
pub fn configured_topic<'a>(cfg: &'a Config, default: &str) -> &'a str {
    InputTopic::ALL
        .iter()
        .find(|r| r.default_name() == default)
        .map(|r| cfg.topics.input(*r))
        .unwrap_or_else(|| panic!("workload names unknown topic {default}"))
}

/// The workload producer's librdkafka configuration (`generate`, `demo`).
pub fn producer_config(cfg: &Config) -> KafkaClientConfig {
    hmis_sinks::kafka::client_config(
        &cfg.brokers,
        &cfg.kafka,
        &[
            ("enable.idempotence", "true"),
            ("linger.ms", "5"),
            ("compression.type", "lz4"),
        ],
        &[],
    )
}

/// Produces records in order (idempotent producer, so retries cannot reorder or duplicate).
pub async fn produce(cfg: &Config, records: &[WorkloadRecord]) -> anyhow::Result<usize> {
    produce_paced(cfg, records, None, &|_| {}).await
}

/// Like [`produce`], at most `rate` records per second when given (a steady offered load
/// for latency measurements), calling `progress` with the number of records delivered so far.
/// Deliveries are awaited as they go (at most 50,000 in flight), so the count is what the
/// broker has acknowledged, not what sits in librdkafka's queue.
pub async fn produce_paced(
    cfg: &Config,
    records: &[WorkloadRecord],
    rate: Option<f64>,
    progress: &dyn Fn(usize),
) -> anyhow::Result<usize> {
    const IN_FLIGHT: usize = 50_000;
    let producer: FutureProducer = producer_config(cfg).create()?;
    let mut pending = std::collections::VecDeque::with_capacity(IN_FLIGHT);
    let mut delivered = 0usize;
    let started = std::time::Instant::now();
    for (i, r) in records.iter().enumerate() {
        if let Some(rate) = rate.filter(|r| *r > 0.0) {
            // Sleep until record i is due: i / rate seconds after the start.
            let due = Duration::from_secs_f64(i as f64 / rate);
            let now = started.elapsed();
            if due > now + Duration::from_millis(1) {
                tokio::time::sleep(due - now).await;
            }
        }
        let topic = configured_topic(cfg, r.topic);
        let mut rec = FutureRecord::to(topic).payload(&r.payload);
        if let Some(k) = &r.key {
            rec = rec.key(k);
        }
        loop {
            match producer.send_result(rec) {
                Ok(f) => {
                    pending.push_back(f);
                    break;
                }
                Err((
                    KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                    r2,
                )) => {
                    rec = r2;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => return Err(e).context("producing the workload"),
            }
        }
        while pending.len() >= IN_FLIGHT {
            await_delivery(pending.pop_front())
                .await
                .with_context(|| format!("record {i}"))?;
            delivered += 1;
            if delivered.is_multiple_of(1000) {
                progress(delivered);
            }
        }
    }
    while let Some(f) = pending.pop_front() {
        await_delivery(Some(f)).await?;
        delivered += 1;
        if delivered.is_multiple_of(1000) {
            progress(delivered);
        }
    }
    progress(delivered);
    Ok(delivered)
}

async fn await_delivery(f: Option<rdkafka::producer::DeliveryFuture>) -> anyhow::Result<()> {
    let Some(f) = f else { return Ok(()) };
    f.await
        .map_err(|_| anyhow::anyhow!("delivery cancelled"))?
        .map_err(|(e, _)| e)
        .context("delivery")?;
    Ok(())
}

/// Writes the records as one JSON-lines file per input topic, `<dir>/<topic>.jsonl` under the
/// contract's default topic names (one JSON value per line, in the order given, which is
/// eventTime order per topic), for peers that read files instead of Kafka (bench/pathway).
/// Records that are not single-line UTF-8 JSON (the malformed ones of `--bad-ratio`) are
/// left out: they would break the file format; their number is returned as `skipped`.
/// Also writes `<dir>/manifest.json` with the counts.
pub fn write_topic_files(
    dir: &std::path::Path,
    records: &[WorkloadRecord],
    manifest_extra: serde_json::Value,
) -> anyhow::Result<BTreeMap<String, usize>> {
    use std::io::Write as _;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut files: BTreeMap<&str, std::io::BufWriter<std::fs::File>> = BTreeMap::new();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for t in InputTopic::ALL {
        let name = t.default_name();
        let path = dir.join(format!("{name}.jsonl"));
        let f =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        files.insert(name, std::io::BufWriter::new(f));
        counts.insert(name.to_string(), 0);
    }
    let mut skipped = 0usize;
    for r in records {
        let ok = std::str::from_utf8(&r.payload)
            .ok()
            .filter(|s| !s.contains('\n'))
            .filter(|s| serde_json::from_str::<serde::de::IgnoredAny>(s).is_ok());
        let (Some(line), Some(f)) = (ok, files.get_mut(r.topic)) else {
            skipped += 1;
            continue;
        };
        f.write_all(line.as_bytes())?;
        f.write_all(b"\n")?;
        *counts.entry(r.topic.to_string()).or_default() += 1;
    }
    for (_, mut f) in files {
        f.flush()?;
    }
    let mut manifest = serde_json::json!({
        "records": records.len(),
        "per_topic": counts,
        "skipped": skipped,
    });
    if let (Some(m), serde_json::Value::Object(extra)) = (manifest.as_object_mut(), manifest_extra)
    {
        m.extend(extra);
    }
    std::fs::write(
        dir.join("manifest.json"),
        serde_json::to_string_pretty(&manifest)? + "\n",
    )?;
    Ok(counts)
}

/// The topic reader's librdkafka configuration (`tail`, the demo's summary).
pub fn reader_config(cfg: &Config) -> KafkaClientConfig {
    let group = format!("{}-reader", cfg.group_id);
    hmis_sinks::kafka::client_config(
        &cfg.brokers,
        &cfg.kafka,
        &[("isolation.level", "read_committed")],
        &[("group.id", &group), ("enable.auto.commit", "false")],
    )
}

/// Reads a topic from its beginning to its current end; returns (key, payload) pairs.
pub fn read_topic(cfg: &Config, topic: &str) -> anyhow::Result<Vec<(Option<String>, String)>> {
    let consumer: BaseConsumer = reader_config(cfg).create()?;
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    let mut ends = BTreeMap::new();
    for p in md
        .topics()
        .first()
        .map(|t| t.partitions())
        .unwrap_or_default()
    {
        let (low, high) = consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(10))?;
        if high > low {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
            ends.insert(p.id(), high);
        }
    }
    let mut out = Vec::new();
    if ends.is_empty() {
        return Ok(out);
    }
    consumer.assign(&tpl)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut done = BTreeMap::new();
    while done.len() < ends.len() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "timed out reading {topic}"
        );
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                out.push((
                    m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
                ));
                if m.offset() + 1 >= ends[&m.partition()] {
                    done.insert(m.partition(), ());
                }
            }
            Some(Err(e)) => anyhow::bail!("reading {topic}: {e}"),
            None => {}
        }
    }
    Ok(out)
}

/// Options of `hmis-flow demo`.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    pub workflows: usize,
    pub seed: u64,
    pub workers: usize,
    pub brokers_configured: bool,
    pub database_configured: bool,
}

/// The checkout whose `scripts/services.sh` manages the local services: the current
/// directory when it is one (`cargo run` from the repository), else the one built from.
fn repo_root() -> std::path::PathBuf {
    let cwd = std::env::current_dir().unwrap_or_default();
    if cwd.join("scripts/services.sh").is_file() {
        cwd
    } else {
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
    }
}

/// `hmis-flow demo`.
pub fn demo(mut cfg: Config, opts: DemoOptions) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    if !opts.database_configured {
        println!("==> no HMIS_DATABASE_URL: starting the local PostgreSQL (scripts/services.sh start-pg)");
        let status = std::process::Command::new(repo_root().join("scripts/services.sh"))
            .arg("start-pg")
            .status()
            .context("running scripts/services.sh")?;
        anyhow::ensure!(status.success(), "scripts/services.sh start-pg failed");
    }
    // The mock cluster is not Send: it lives on this thread for the whole demo.
    let mock = if opts.brokers_configured {
        None
    } else {
        let mock = rdkafka::mocking::MockCluster::new(1)
            .context("starting the in-process Kafka mock cluster")?;
        cfg.brokers = mock.bootstrap_servers();
        println!(
            "==> no HMIS_BROKERS: using an in-process Kafka-protocol mock cluster at {}",
            cfg.brokers
        );
        for spec in topic_specs(&cfg) {
            mock.create_topic(&spec.name, spec.partitions, 1)?;
        }
        Some(mock)
    };
    // A fresh schema per demo run when the broker is fresh too, so progress matches the topics.
    let base_url = cfg.database_url.clone();
    let schema = "hmis_demo";
    if mock.is_some() {
        rt.block_on(async {
            let client = hmis_sinks::pg_tls::connect(&base_url, &cfg.database_tls()).await?;
            client
                .batch_execute(&format!(
                    "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema};"
                ))
                .await?;
            Ok::<_, anyhow::Error>(())
        })
        .context("preparing the demo schema")?;
        let sep = if base_url.contains('?') { '&' } else { '?' };
        cfg.database_url = format!("{base_url}{sep}options=-c%20search_path%3D{schema}");
    } else {
        let created = rt.block_on(create_topics(&cfg))?;
        println!(
            "==> topics: {}",
            if created.is_empty() {
                "all exist".into()
            } else {
                created.join(", ")
            }
        );
    }
    let applied = rt.block_on(async {
        let mut pg =
            hmis_sinks::PgSink::connect_with_tls(&cfg.database_url, &cfg.database_tls()).await?;
        pg.migrate().await
    })?;
    println!(
        "==> migrations applied: {}",
        if applied.is_empty() {
            "none (up to date)".into()
        } else {
            applied.join(", ")
        }
    );

    let records = crate::workload::generate(&WorkloadConfig {
        seed: opts.seed,
        workflows: opts.workflows,
        start_ms: crate::source::wall_ms() - 6 * 3_600_000,
        bad_record_ratio: 0.01,
        duplicate_ratio: 0.02,
    });
    let n = rt.block_on(produce(&cfg, &records))?;
    println!(
        "==> produced {n} input records for {} workflows (1% malformed, 2% duplicates)",
        opts.workflows
    );

    cfg.clock = ClockMode::Event;
    cfg.until_caught_up = true;
    cfg.workers = opts.workers.max(1);
    println!(
        "==> running: hmis-flow run --clock event --until-caught-up --workers {}",
        cfg.workers
    );
    let summary = crate::run(cfg.clone(), std::sync::Arc::new(crate::Shared::default()))?;
    println!(
        "    read {} records, {} dead letters, {} transactions, {} records published, in {:.2}s",
        summary.records_read,
        summary.dead_letters,
        summary.batches,
        summary.published,
        summary.elapsed.as_secs_f64()
    );
    rt.block_on(print_summary(&cfg))?;
    let derived = read_topic(&cfg, &cfg.topics.derived)?;
    let mut by_type: BTreeMap<String, usize> = BTreeMap::new();
    for (_, payload) in &derived {
        let v: serde_json::Value = serde_json::from_str(payload).unwrap_or_default();
        *by_type
            .entry(v["eventType"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
    }
    println!(
        "\nDerived events on {} ({} in all):",
        cfg.topics.derived,
        derived.len()
    );
    for (t, c) in &by_type {
        println!("  {t:<28} {c:>6}");
    }
    if let Some((_, first)) = derived.iter().find(|(_, p)| p.contains("TASK_READY")) {
        println!("  e.g. {first}");
    }
    println!("\nLook further:");
    println!(
        "  psql '{base_url}' -c 'SET search_path={}; SELECT * FROM task_readiness LIMIT 10'",
        if mock.is_some() { schema } else { "public" }
    );
    if mock.is_some() {
        println!("  (the mock broker ends with this process; against a real broker, e.g. after `scripts/services.sh start`");
        println!("   and `eval \"$(scripts/services.sh env)\"`, rerun the demo and read the output with:");
        println!("   cargo run --release -- tail {})", cfg.topics.derived);
    } else {
        println!(
            "  cargo run --release -- tail {}      (brokers from HMIS_BROKERS)",
            cfg.topics.derived
        );
    }
    drop(mock);
    Ok(())
}

async fn print_summary(cfg: &Config) -> anyhow::Result<()> {
    let client = hmis_sinks::pg_tls::connect(&cfg.database_url, &cfg.database_tls()).await?;
    println!("\nWorkflows by status:");
    for r in client
        .query(
            "SELECT status, count(*) FROM workflow_instances GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await?
    {
        println!("  {:<12} {:>6}", r.get::<_, String>(0), r.get::<_, i64>(1));
    }
    println!("Progress distribution:");
    let q = "SELECT CASE WHEN progress_percentage = 0 THEN '0%' WHEN progress_percentage < 50 THEN '1-49%' \
             WHEN progress_percentage < 100 THEN '50-99%' ELSE '100%' END AS bucket, count(*) \
             FROM workflow_instances GROUP BY 1 ORDER BY min(progress_percentage)";
    for r in client.query(q, &[]).await? {
        println!("  {:<12} {:>6}", r.get::<_, String>(0), r.get::<_, i64>(1));
    }
    println!("Ready tasks by definition (task_readiness):");
    for r in client
        .query(
            "SELECT task_def_id, count(*) FROM task_readiness GROUP BY 1 ORDER BY 2 DESC, 1",
            &[],
        )
        .await?
    {
        println!("  {:<24} {:>6}", r.get::<_, String>(0), r.get::<_, i64>(1));
    }
    println!("Dead letters by reason:");
    for r in client
        .query(
            "SELECT reason, count(*) FROM dead_letters GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await?
    {
        println!("  {:<24} {:>6}", r.get::<_, String>(0), r.get::<_, i64>(1));
    }
    println!("Component health (system events; MEDIUM/LOW errors counted):");
    for r in client
        .query(
            "SELECT component, coalesce(status, '?'), medium_errors, low_errors \
             FROM component_health ORDER BY 1",
            &[],
        )
        .await?
    {
        println!(
            "  {:<16} {:<10} medium {:>3}  low {:>3}",
            r.get::<_, String>(0),
            r.get::<_, String>(1),
            r.get::<_, i64>(2),
            r.get::<_, i64>(3)
        );
    }
    println!("Alerts by kind and severity:");
    for r in client
        .query(
            "SELECT kind, severity, count(*) FROM alerts GROUP BY 1, 2 ORDER BY 1, 2",
            &[],
        )
        .await?
    {
        println!(
            "  {:<28} {:<9} {:>6}",
            r.get::<_, String>(0),
            r.get::<_, String>(1),
            r.get::<_, i64>(2)
        );
    }
    Ok(())
}
