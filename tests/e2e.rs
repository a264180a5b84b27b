//! End to end against a real Kafka-protocol broker and a real PostgreSQL.
//!
//! Addresses come from `HMIS_TEST_BROKERS` and `HMIS_TEST_DATABASE_URL` (`.ci/run` and
//! `scripts/test.sh` start the services and set them). Each test uses its own topic prefix,
//! PostgreSQL schema and group id, so tests run in parallel and leave nothing shared.
//!
//! The pipeline runs in-process through `hmis_flow::run` exactly as `hmis-flow run --clock
//! event --until-caught-up` does. Its PostgreSQL rows and published events are compared with
//! the in-memory dataflow (`hmis_dataflows::harness`) fed the same records — which the
//! property tests compare with the from-scratch reference model — plus absolute checks.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use hmis_dataflows::events::{decode, Event, InputTopic, Pos};
use hmis_dataflows::harness::{self, Outcome, Run};
use hmis_dataflows::output::Row;
use hmis_flow::config::{ClockMode, Config, Topics};
use hmis_flow::workload::{generate_labeled, WorkloadConfig, WorkloadRecord};

#[allow(dead_code)] // this test uses one helper of it
#[path = "common/schemas.rs"]
mod schemas;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: start the services with `scripts/services.sh start` and `eval $(scripts/services.sh env)`, or run scripts/test.sh")
    })
}

fn unique(prefix: &str) -> String {
    format!("{prefix}{}_{}", std::process::id(), rand::random::<u32>())
}

/// A config with private topics, schema and group.
async fn private_config(tag: &str) -> Config {
    let id = unique(tag);
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
    let base = env("HMIS_TEST_DATABASE_URL");
    let (client, conn) = tokio_postgres::connect(&base, tokio_postgres::NoTls)
        .await
        .expect("connect to test PostgreSQL");
    tokio::spawn(conn);
    client
        .batch_execute(&format!("CREATE SCHEMA \"{id}\""))
        .await
        .unwrap();
    let sep = if base.contains('?') { '&' } else { '?' };
    let mut cfg = Config {
        brokers: env("HMIS_TEST_BROKERS"),
        database_url: format!("{base}{sep}options=-c%20search_path%3D{id}"),
        group_id: id.clone(),
        clock: ClockMode::Event,
        until_caught_up: true,
        workers: 2,
        topics,
        ..Config::default()
    };
    cfg.tick_ms = 20;
    let created = hmis_flow::demo::create_topics(&cfg)
        .await
        .expect("create topics");
    assert_eq!(
        created.len(),
        9,
        "all nine contract topics are created: {created:?}"
    );
    cfg
}

fn role_of(topic: &str) -> InputTopic {
    InputTopic::ALL
        .into_iter()
        .find(|r| r.default_name() == topic)
        .unwrap()
}

/// The in-memory dataflow on the same records, stamped as the event clock stamps them.
fn expected(records: &[WorkloadRecord], workers: usize) -> Outcome {
    let mut defs = Vec::new();
    let mut feed = Vec::new();
    for (i, r) in records.iter().enumerate() {
        let pos = Pos {
            partition: 0,
            offset: i as i64,
        };
        if let Ok(ev) = decode(
            role_of(r.topic),
            r.key.as_deref().map(str::as_bytes),
            Some(&r.payload),
            pos,
        ) {
            match ev.event_time() {
                Some(t) => feed.push((t, ev)),
                None => defs.push(ev),
            }
        }
    }
    feed.sort_by_key(|(t, _)| *t);
    let start = feed.first().map(|(t, _)| *t).unwrap_or(1);
    let end = feed.last().map(|(t, _)| t + 1).unwrap_or(2);
    let mut all: Vec<(u64, Event)> = defs.into_iter().map(|d| (start - 1, d)).collect();
    all.extend(feed);
    harness::run(Run::new(workers, all, end))
}

type Picture = (
    BTreeSet<(String, String, i32)>,
    BTreeSet<(String, String, i32)>,
    BTreeSet<(String, String)>,
);

/// (workflow id, status, progress), (task id, status, attempt), (workflow, ready task def).
fn picture_of(o: &Outcome) -> Picture {
    let mut w = BTreeSet::new();
    let mut t = BTreeSet::new();
    let mut r = BTreeSet::new();
    for row in o.rows.values() {
        match row {
            Row::Workflow(x) => {
                w.insert((
                    x.workflow_instance_id.to_string(),
                    x.status.to_string(),
                    x.progress_percentage,
                ));
            }
            Row::Task(x) => {
                t.insert((
                    x.task_instance_id.to_string(),
                    x.status.to_string(),
                    x.attempt,
                ));
            }
            Row::Readiness(x) => {
                r.insert((
                    x.workflow_instance_id.to_string(),
                    x.task_def_id.to_string(),
                ));
            }
            _ => {}
        }
    }
    (w, t, r)
}

async fn picture_in_pg(cfg: &Config) -> (Picture, BTreeMap<String, i64>) {
    let (c, conn) = tokio_postgres::connect(&cfg.database_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let w = c
        .query(
            "SELECT workflow_instance_id, status, progress_percentage FROM workflow_instances",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let t = c
        .query(
            "SELECT task_instance_id, status, attempt FROM task_instances",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let r = c
        .query(
            "SELECT workflow_instance_id, task_def_id FROM task_readiness",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let dead = c
        .query("SELECT reason, count(*) FROM dead_letters GROUP BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    ((w, t, r), dead)
}

fn run_pipeline(cfg: &Config) -> hmis_flow::RunSummary {
    run_pipeline_with(cfg, Arc::new(hmis_flow::Shared::default()))
}

/// Runs the pipeline with `shared` (its counters are what `/metrics` reports).
fn run_pipeline_with(cfg: &Config, shared: Arc<hmis_flow::Shared>) -> hmis_flow::RunSummary {
    let cfg = cfg.clone();
    std::thread::spawn(move || hmis_flow::run(cfg, shared))
        .join()
        .expect("pipeline thread")
        .expect("pipeline run")
}

/// The pipeline running in-process, as `hmis-flow run` without `--until-caught-up` runs it,
/// until [`stop_pipeline`].
fn spawn_pipeline(
    cfg: &Config,
) -> (
    Arc<hmis_flow::Shared>,
    std::thread::JoinHandle<anyhow::Result<hmis_flow::RunSummary>>,
) {
    let shared = Arc::new(hmis_flow::Shared::default());
    let (run_cfg, run_shared) = (cfg.clone(), shared.clone());
    (
        shared,
        std::thread::spawn(move || hmis_flow::run(run_cfg, run_shared)),
    )
}

/// Asks a [`spawn_pipeline`] pipeline to stop, and waits for its clean exit.
fn stop_pipeline(
    shared: &hmis_flow::Shared,
    pipeline: std::thread::JoinHandle<anyhow::Result<hmis_flow::RunSummary>>,
) {
    shared.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    pipeline
        .join()
        .unwrap()
        .expect("pipeline stops cleanly on request");
}

/// eventIds on the derived topic, with how often each appears.
fn derived_ids(cfg: &Config) -> BTreeMap<String, usize> {
    let mut ids = BTreeMap::new();
    for (key, payload) in hmis_flow::demo::read_topic(cfg, &cfg.topics.derived).unwrap() {
        let v: serde_json::Value = serde_json::from_str(&payload).unwrap();
        assert_eq!(
            key.as_deref(),
            v["workflowInstanceId"].as_str(),
            "derived events are keyed by workflowInstanceId"
        );
        *ids.entry(v["eventId"].as_str().unwrap().to_string())
            .or_insert(0) += 1;
    }
    ids
}

fn workload(seed: u64, workflows: usize) -> (Vec<WorkloadRecord>, usize) {
    let labeled = generate_labeled(&WorkloadConfig {
        seed,
        workflows,
        start_ms: 1_795_687_200_000,
        bad_record_ratio: 0.03,
        duplicate_ratio: 0.05,
    });
    let malformed = labeled.iter().filter(|(k, _)| k.is_malformed()).count();
    (labeled.into_iter().map(|(_, r)| r).collect(), malformed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_mode_run_matches_the_dataflow_and_publishes_each_event_once() {
    let cfg = private_config("e2e_a").await;
    let (records, malformed) = workload(11, 60);
    assert!(malformed > 0, "the workload carries bad records");
    hmis_flow::demo::produce(&cfg, &records).await.unwrap();

    let shared = Arc::new(hmis_flow::Shared::default());
    let summary = run_pipeline_with(&cfg, shared.clone());
    assert_eq!(summary.records_read as usize, records.len());

    let want = expected(&records, 1);
    let (got, dead) = picture_in_pg(&cfg).await;
    let want_picture = picture_of(&want);
    assert!(
        !want_picture.0.is_empty() && !want_picture.2.is_empty(),
        "a meaningful workload"
    );
    assert_eq!(
        got, want_picture,
        "PostgreSQL holds exactly what the dataflow computes"
    );
    let decode_level: i64 = [
        "INVALID_JSON",
        "SCHEMA_VIOLATION",
        "UNKNOWN_EVENT_TYPE",
        "INVALID_DEFINITION",
    ]
    .iter()
    .filter_map(|r| dead.get(*r))
    .sum();
    assert_eq!(
        decode_level as usize, malformed,
        "every malformed record is dead-lettered: {dead:?}"
    );

    let ids = derived_ids(&cfg);
    assert!(
        ids.values().all(|&n| n == 1),
        "each derived eventId exactly once"
    );
    let want_ids: BTreeSet<String> = want
        .records
        .iter()
        .filter(|r| r.topic == hmis_dataflows::output::OutTopic::Derived)
        .map(|r| r.event_id.clone())
        .collect();
    let got_ids: BTreeSet<String> = ids.keys().cloned().collect();
    let missing: Vec<&str> = want
        .records
        .iter()
        .filter(|r| {
            r.topic == hmis_dataflows::output::OutTopic::Derived && !got_ids.contains(&r.event_id)
        })
        .map(|r| r.payload.as_str())
        .collect();
    let published = hmis_flow::demo::read_topic(&cfg, &cfg.topics.derived).unwrap();
    let extra: Vec<&str> = published
        .iter()
        .map(|(_, p)| p.as_str())
        .filter(|p| !want_ids.iter().any(|id| p.contains(id.as_str())))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "derived events differ from the dataflow's: missing {missing:#?} extra {extra:#?}"
    );

    // The consumer group mirrors the committed positions (lag monitoring).
    {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let c: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &cfg.brokers)
            .set("group.id", &cfg.group_id)
            .create()
            .unwrap();
        let mut tpl = rdkafka::TopicPartitionList::new();
        for topic in [
            &cfg.topics.definitions,
            &cfg.topics.tasks,
            &cfg.topics.orders,
            &cfg.topics.workflows,
            &cfg.topics.system,
        ] {
            let md = c
                .fetch_metadata(Some(topic), std::time::Duration::from_secs(10))
                .unwrap();
            for p in md.topics()[0].partitions() {
                tpl.add_partition(topic, p.id());
            }
        }
        let committed = c
            .committed_offsets(tpl, std::time::Duration::from_secs(10))
            .unwrap();
        let total: i64 = committed
            .elements()
            .iter()
            .map(|e| match e.offset() {
                rdkafka::Offset::Offset(o) => o,
                _ => 0,
            })
            .sum();
        assert_eq!(
            total as usize,
            records.len(),
            "group offsets cover every record read"
        );
    }

    // Dead letters reach their topic too, one per rejected record, keyed by the input's key.
    let dead_topic = hmis_flow::demo::read_topic(&cfg, &cfg.topics.dead_letter).unwrap();
    assert_eq!(
        dead_topic.len() as i64,
        dead.values().sum::<i64>(),
        "dead-letter topic matches the table"
    );
    for (_, p) in &dead_topic {
        let v: serde_json::Value = serde_json::from_str(p).unwrap();
        assert!(
            v["reason"].is_string() && v["payload"].is_string() && v["offset"].is_i64(),
            "{p}"
        );
    }

    // System events (contract §6): health, the audit log, error counts and alerts.
    let system = system_in_pg(&cfg).await;
    assert_eq!(
        system,
        system_of(&want),
        "system tables hold what the dataflow computes"
    );
    assert!(
        !system.0.is_empty() && !system.1.is_empty() && !system.3.is_empty(),
        "a meaningful workload: {system:?}"
    );
    let alerts = hmis_flow::demo::read_topic(&cfg, &cfg.topics.alerts).unwrap();
    let mut alert_ids: Vec<String> = alerts
        .iter()
        .map(|(key, p)| {
            let v: serde_json::Value = serde_json::from_str(p).unwrap();
            assert_eq!(
                key.as_deref(),
                v["source"].as_str(),
                "alerts are keyed by source"
            );
            v["alertId"].as_str().unwrap().to_string()
        })
        .collect();
    alert_ids.sort();
    assert_eq!(alert_ids, system.3, "each alert published once, as stored");
    // The metrics count them (hmis_alerts_total, hmis_error_reports_quiet_total).
    use std::sync::atomic::Ordering::SeqCst;
    assert_eq!(shared.alerts_raised.load(SeqCst) as usize, system.3.len());
    let quiet: i64 = system.0.values().map(|(_, medium, low)| medium + low).sum();
    assert_eq!(shared.quiet_error_reports.load(SeqCst) as i64, quiet);

    // Every published record matches its schema (schemas/, contract §7).
    schemas::assert_topics_match_schemas(&cfg);

    // A second run with nothing new changes nothing and publishes nothing.
    let again = run_pipeline(&cfg);
    assert_eq!(again.published, 0);
    assert_eq!(picture_in_pg(&cfg).await.0, want_picture);
    assert_eq!(derived_ids(&cfg), ids);
    assert_eq!(system_in_pg(&cfg).await, system, "and counts nothing twice");
}

/// (component → (status, medium errors, low errors), audit eventIds, error-report eventIds,
/// alert ids), sorted.
type SystemPicture = (
    BTreeMap<String, (Option<String>, i64, i64)>,
    Vec<String>,
    Vec<String>,
    Vec<String>,
);

/// The system tables the dataflow's rows imply (the sink counts MEDIUM and LOW reports).
fn system_of(o: &Outcome) -> SystemPicture {
    let mut health: BTreeMap<String, (Option<String>, i64, i64)> = BTreeMap::new();
    let (mut audit, mut errors, mut alerts) = (Vec::new(), Vec::new(), Vec::new());
    for row in o.rows.values() {
        match row {
            Row::ComponentHealth(h) => {
                health.entry(h.component.clone()).or_default().0 = Some(h.status.clone())
            }
            Row::Audit(a) => audit.push(a.event_id.clone()),
            Row::ErrorReport(e) => {
                errors.push(e.event_id.clone());
                let entry = health.entry(e.component.clone()).or_default();
                match e.severity.as_str() {
                    "MEDIUM" => entry.1 += 1,
                    "LOW" => entry.2 += 1,
                    _ => {}
                }
            }
            Row::Alert(a) => alerts.push(a.alert_id.clone()),
            _ => {}
        }
    }
    audit.sort();
    errors.sort();
    alerts.sort();
    (health, audit, errors, alerts)
}

async fn system_in_pg(cfg: &Config) -> SystemPicture {
    let (c, conn) = tokio_postgres::connect(&cfg.database_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let texts = |sql: &'static str| {
        let c = &c;
        async move {
            let mut v: Vec<String> = c
                .query(sql, &[])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            v.sort();
            v
        }
    };
    let health = c
        .query(
            "SELECT component, status, medium_errors, low_errors FROM component_health",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
        .collect();
    (
        health,
        texts("SELECT event_id FROM audit_log").await,
        texts("SELECT event_id FROM error_reports").await,
        texts("SELECT alert_id FROM alerts").await,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_between_batches_equals_one_run() {
    let cfg = private_config("e2e_b").await;
    let (records, _) = workload(12, 40);
    let cut = records.len() / 2;
    hmis_flow::demo::produce(&cfg, &records[..cut])
        .await
        .unwrap();
    run_pipeline(&cfg);
    hmis_flow::demo::produce(&cfg, &records[cut..])
        .await
        .unwrap();
    let mut three = cfg.clone();
    three.workers = 3;
    run_pipeline(&three);

    let (got, _) = picture_in_pg(&cfg).await;
    assert_eq!(got, picture_of(&expected(&records, 2)));
    let counts = derived_ids(&cfg);
    let dupes: Vec<String> = hmis_flow::demo::read_topic(&cfg, &cfg.topics.derived)
        .unwrap()
        .into_iter()
        .map(|(_, p)| p)
        .filter(|p| {
            let v: serde_json::Value = serde_json::from_str(p).unwrap();
            counts[v["eventId"].as_str().unwrap()] > 1
        })
        .collect();
    assert!(
        dupes.is_empty(),
        "no derived event twice across the restart: {dupes:#?}"
    );
}

/// Wall clock: a task whose 2-second deadline passes with no other input still breaches,
/// and the breach reaches Kafka within a bounded time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wall_clock_breach_fires_with_no_further_input() {
    let mut cfg = private_config("e2e_w").await;
    cfg.clock = ClockMode::Wall;
    cfg.until_caught_up = false;
    cfg.workers = 1;
    let now = hmis_flow::source::wall_ms();
    let iso = hmis_dataflows::events::format_time;
    let template = serde_json::json!({"templateId": "t-wall", "version": 1,
        "tasks": [{"taskDefId": "only", "name": "Only task"}]});
    let records = vec![
        WorkloadRecord { topic: "workflow-definitions", key: Some("t-wall:1".into()), payload: template.to_string().into_bytes() },
        WorkloadRecord {
            topic: "workflow-state-events",
            key: Some("w-wall".into()),
            payload: serde_json::json!({"eventId": "e1", "eventType": "WORKFLOW_STARTED", "eventTime": iso(now),
                "workflowInstanceId": "w-wall", "templateId": "t-wall", "templateVersion": 1}).to_string().into_bytes(),
        },
        WorkloadRecord {
            topic: "workflow-task-events",
            key: Some("task-wall".into()),
            payload: serde_json::json!({"eventId": "e2", "eventType": "TASK_CREATED", "eventTime": iso(now),
                "taskInstanceId": "task-wall", "workflowInstanceId": "w-wall", "taskDefId": "only",
                "dueAt": iso(now + 2_000)}).to_string().into_bytes(),
        },
    ];
    hmis_flow::demo::produce(&cfg, &records).await.unwrap();
    let (shared, pipeline) = spawn_pipeline(&cfg);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut seen_at = None;
    while std::time::Instant::now() < deadline {
        let found = hmis_flow::demo::read_topic(&cfg, &cfg.topics.derived)
            .unwrap()
            .into_iter()
            .any(|(_, p)| p.contains("\"TASK_SLA_BREACHED\""));
        if found {
            seen_at = Some(hmis_flow::source::wall_ms());
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    stop_pipeline(&shared, pipeline);
    let seen_at = seen_at.expect("TASK_SLA_BREACHED published with no further input");
    assert!(seen_at > now + 2_000, "not before the deadline");
    let (c, conn) = tokio_postgres::connect(&cfg.database_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let row = c.query_one("SELECT sla_breached, is_escalated FROM task_instances WHERE task_instance_id = 'task-wall'", &[]).await.unwrap();
    assert!(row.get::<_, bool>(0) && row.get::<_, bool>(1));
    let n: i64 = c
        .query_one("SELECT count(*) FROM sla_breaches", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_references_are_dead_lettered_after_the_grace_and_only_once() {
    let cfg = private_config("e2e_u").await;
    let iso = hmis_dataflows::events::format_time;
    let t0: u64 = 1_795_687_200_000;
    let min = 60_000;
    let rec = |topic: &'static str, key: &str, v: serde_json::Value| WorkloadRecord {
        topic,
        key: Some(key.into()),
        payload: v.to_string().into_bytes(),
    };
    let started = |id: &str, wid: &str, tpl: &str, at: u64| {
        rec(
            "workflow-state-events",
            wid,
            serde_json::json!({"eventId": id, "eventType": "WORKFLOW_STARTED",
            "eventTime": iso(at), "workflowInstanceId": wid, "templateId": tpl, "templateVersion": 1}),
        )
    };
    let created = |id: &str, tid: &str, wid: &str, at: u64| {
        rec(
            "workflow-task-events",
            tid,
            serde_json::json!({"eventId": id, "eventType": "TASK_CREATED",
            "eventTime": iso(at), "taskInstanceId": tid, "workflowInstanceId": wid, "taskDefId": "only"}),
        )
    };
    let records = vec![
        rec(
            "workflow-definitions",
            "t-u:1",
            serde_json::json!({"templateId": "t-u", "version": 1,
                "tasks": [{"taskDefId": "only", "name": "Only task"}]}),
        ),
        started("e1", "w-ok", "t-u", t0),
        created("e2", "t-ok", "w-ok", t0 + min),
        // Never started: UNKNOWN_WORKFLOW once the clock passes t0 + 1 min + grace.
        created("e3", "t-ghost", "w-ghost", t0 + min),
        // A template that never arrives: UNKNOWN_TEMPLATE.
        started("e4", "w-nt", "nosuch", t0 + 2 * min),
        // Started 4 minutes after its task: within the grace, so it wins.
        created("e5", "t-late", "w-late", t0 + 2 * min),
        started("e6", "w-late", "t-u", t0 + 6 * min),
        // Moves the event clock well past every grace.
        created("e7", "t-ok2", "w-ok", t0 + 30 * min),
    ];
    hmis_flow::demo::produce(&cfg, &records).await.unwrap();
    run_pipeline(&cfg);

    let (c, conn) = tokio_postgres::connect(&cfg.database_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let dead: Vec<(String, String, String)> = c
        .query(
            "SELECT reason, key, payload FROM dead_letters ORDER BY reason",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert_eq!(
        (dead[0].0.as_str(), dead[0].1.as_str()),
        ("UNKNOWN_TEMPLATE", "w-nt")
    );
    assert!(dead[0].2.contains("\"nosuch\""), "the original payload");
    assert_eq!(
        (dead[1].0.as_str(), dead[1].1.as_str()),
        ("UNKNOWN_WORKFLOW", "t-ghost")
    );
    let tasks: BTreeSet<String> = c
        .query("SELECT task_instance_id FROM task_instances", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let want: BTreeSet<String> = ["t-ok", "t-ok2", "t-late"].map(String::from).into();
    assert_eq!(tasks, want);
    let workflows: i64 = c
        .query_one(
            "SELECT count(*) FROM workflow_instances WHERE workflow_instance_id = 'w-nt'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        workflows, 0,
        "the workflow with an unknown template left no row"
    );
    let topic = hmis_flow::demo::read_topic(&cfg, &cfg.topics.dead_letter).unwrap();
    assert_eq!(topic.len(), 2);

    // A restart replays the input and decides the same records again: nothing is published
    // twice, nothing is stored twice.
    run_pipeline(&cfg);
    assert_eq!(
        hmis_flow::demo::read_topic(&cfg, &cfg.topics.dead_letter)
            .unwrap()
            .len(),
        2
    );
    let n: i64 = c
        .query_one("SELECT count(*) FROM dead_letters", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);

    // w-ghost starts after all (past t-ghost's grace): applied, t-ghost stays dead-lettered.
    hmis_flow::demo::produce(&cfg, &[started("e8", "w-ghost", "t-u", t0 + 31 * min)])
        .await
        .unwrap();
    run_pipeline(&cfg);
    // A restart now replays both the dead-lettered TASK_CREATED and the WORKFLOW_STARTED that
    // came too late for it: the decision stands (the replay skips what was dead-lettered), so
    // the task's later completion makes a task without a creation.
    let completed = rec(
        "workflow-task-events",
        "t-ghost",
        serde_json::json!({"eventId": "e9", "eventType": "TASK_COMPLETED",
        "eventTime": iso(t0 + 32 * min), "taskInstanceId": "t-ghost", "workflowInstanceId": "w-ghost", "taskDefId": "only"}),
    );
    hmis_flow::demo::produce(&cfg, &[completed]).await.unwrap();
    run_pipeline(&cfg);
    let ghost = c
        .query_one(
            "SELECT status, created_at IS NULL FROM task_instances WHERE task_instance_id = 't-ghost'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(ghost.get::<_, String>(0), "COMPLETED");
    assert!(
        ghost.get::<_, bool>(1),
        "the dead-lettered TASK_CREATED was not applied by the replay"
    );
    let n: i64 = c
        .query_one("SELECT count(*) FROM dead_letters", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
}

/// The committed next offsets of two input partitions (0 where none is committed yet), read
/// in one query, so from one commit.
async fn committed_pair(
    pg: &hmis_sinks::PgSink,
    group: &str,
    a: (&str, i32),
    b: (&str, i32),
) -> (i64, i64) {
    let offsets = pg.load_progress(group).await.unwrap().offsets;
    let at = |(topic, p): (&str, i32)| offsets.get(&(topic.to_string(), p)).copied().unwrap_or(0);
    (at(a), at(b))
}

/// Produces each record to the given partition of its topic, in order.
async fn produce_to(cfg: &Config, records: &[(&WorkloadRecord, i32)]) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = hmis_flow::demo::producer_config(cfg).create().unwrap();
    let mut pending = Vec::with_capacity(records.len());
    for (r, partition) in records {
        let mut rec = FutureRecord::to(hmis_flow::demo::configured_topic(cfg, r.topic))
            .payload(&r.payload)
            .partition(*partition);
        if let Some(k) = &r.key {
            rec = rec.key(k);
        }
        pending.push(producer.send_result(rec).map_err(|(e, _)| e).unwrap());
    }
    for p in pending {
        p.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
}

/// Event clock, 2 workers, live (not `--until-caught-up`): a record arriving on the partitions
/// of a worker that has read all of its own is committed while another worker still works
/// through a backlog. That worker's input time used to jump to the highest eventTime any
/// worker had read plus one (contract §8 says so only once *every* partition is read to its
/// end): it read nothing while the dataflow was behind that time, and what it read was
/// stamped there, so the record waited for the end of the backlog (the 10-12 s latency tail
/// of the 10K records/s benchmark).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_reads_new_records_while_another_works_through_a_backlog() {
    let mut cfg = private_config("e2e_idle").await;
    cfg.until_caught_up = false;
    // Partitions are dealt to workers in this order, the i-th to worker i % workers.
    let partitions = hmis_flow::source::enumerate_partitions(&cfg).unwrap();
    let owned_by = |worker: usize, topic: &str| {
        partitions
            .iter()
            .enumerate()
            .find(|(i, (_, t, _))| i % 2 == worker && t == topic)
            .map(|(_, (_, _, p))| *p)
            .unwrap()
    };
    let records: Vec<WorkloadRecord> = hmis_flow::workload::generate(&WorkloadConfig {
        seed: 5,
        workflows: 4_000,
        start_ms: 1_795_687_200_000,
        bad_record_ratio: 0.0,
        duplicate_ratio: 0.0,
    });
    // The backlog: every event on worker 1's partitions (definitions where they are).
    let probe = records
        .iter()
        .find(|r| r.topic == hmis_flow::workload::SYSTEM_EVENTS_TOPIC)
        .expect("the workload has system events")
        .clone();
    let backlog: Vec<(&WorkloadRecord, i32)> = records
        .iter()
        .map(|r| {
            let topic = hmis_flow::demo::configured_topic(&cfg, r.topic);
            let p = if r.topic == "workflow-definitions" {
                0
            } else {
                owned_by(1, topic)
            };
            (r, p)
        })
        .collect();
    produce_to(&cfg, &backlog).await;
    let system = cfg.topics.system.clone();
    let probe_partition = owned_by(0, &system);
    let tasks = cfg.topics.tasks.clone();
    let backlog_partition = owned_by(1, &tasks);
    let backlog_end = backlog
        .iter()
        .filter(|(r, _)| hmis_flow::demo::configured_topic(&cfg, r.topic) == tasks)
        .count() as i64;

    let mut pg = hmis_sinks::PgSink::connect_with_tls(&cfg.database_url, &cfg.database_tls())
        .await
        .unwrap();
    pg.migrate().await.unwrap();
    let committed = || {
        committed_pair(
            &pg,
            &cfg.group_id,
            (&tasks, backlog_partition),
            (&system, probe_partition),
        )
    };
    let (shared, pipeline) = spawn_pipeline(&cfg);

    // Once the backlog is being committed, one record arrives on worker 0's partition.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while committed().await.0 == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the backlog is never committed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    produce_to(&cfg, &[(&probe, probe_partition)]).await;
    let backlog_when_probe_committed = loop {
        let (backlog, probe) = committed().await;
        if probe == 1 {
            break backlog;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the probe record is never committed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    stop_pipeline(&shared, pipeline);
    assert!(
        backlog_when_probe_committed < backlog_end,
        "the record on the idle worker's partition was committed only after the other worker's \
         backlog ({backlog_when_probe_committed} of {backlog_end} task records committed by then)"
    );
    eprintln!(
        "probe committed with {backlog_when_probe_committed} of {backlog_end} backlog task records committed"
    );
}
