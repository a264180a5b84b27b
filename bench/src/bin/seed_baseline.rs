//! The seed's own design, in Rust, as a peer for `bench/run.sh` (issue 14): what a hospital
//! team would run instead of hmis-flow.
//!
//! ```text
//!  Kafka (same input topics as hmis-flow; definitions read first)
//!    │  one BaseConsumer, auto-commit (Spring Kafka's default), no batching
//!    ▼
//!  per event, ONE PostgreSQL transaction (seed: "Database: Update task and workflow status"):
//!    processed_events  insert eventId, skip the event if it was there (the seed's idempotency)
//!    apply             task / order / workflow / system row: SELECT … FOR UPDATE, write back
//!    recompute W       read W's row, all of W's task rows and orders; readiness, progress,
//!                      status (contract §4); UPDATE W, rewrite W's task_readiness rows
//!    COMMIT
//!  scheduler thread (its own connection), on the event clock (the highest eventTime read):
//!    every 5 min   monitorSLABreaches:  due_at < now AND NOT sla_breached AND PENDING|IN_PROGRESS
//!    every 10 min  monitorStaleTasks:   PENDING with no event for 4 h
//!    every 15 min  monitorEscalatedWorkflows: escalated, no task completed for 1 h → level + 1
//! ```
//!
//! The clock is the event clock (hmis-flow's `clock = event` watermark), not `now()`, so
//! that a replayed backlog behaves as the live system would have: a breach becomes visible at
//! the first poll after its deadline, and the delay (poll time − dueAt) is what this binary
//! reports. Polls run in lockstep with the consumer (it waits for each), so a poll at T sees
//! the rows as they were when the clock reached T; their time counts in the baseline's run. Everything lives in its
//! own schema (`--schema`), created afresh. It stops when it has read every partition to the
//! end it had at start, waits for the scheduler, and prints one JSON line (`result …`);
//! while running it prints `progress N` lines on stdout for the orchestrator's progress bar.

use std::collections::{BTreeSet, HashMap};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};
use tokio_postgres::{Client, NoTls};

use hmis_bench::{schema_url, Services};
use hmis_dataflows::events::parse_time;

#[derive(Parser, Debug)]
#[command(
    about = "The seed's design (per-event read-modify-write in PostgreSQL + polling scheduler)"
)]
struct Args {
    #[command(flatten)]
    services: Services,
    /// Schema of this run (dropped and created).
    #[arg(long)]
    schema: String,
    /// Input topic names are `<prefix>.<contract name>` (empty: the contract's names).
    #[arg(long, default_value = "")]
    topic_prefix: String,
    #[arg(long, default_value = "seed-baseline")]
    group_id: String,
    /// monitorSLABreaches period, seconds of the clock.
    #[arg(long, default_value_t = 300)]
    sla_poll_secs: u64,
    /// monitorStaleTasks period.
    #[arg(long, default_value_t = 600)]
    stale_poll_secs: u64,
    /// monitorEscalatedWorkflows period.
    #[arg(long, default_value_t = 900)]
    escalation_poll_secs: u64,
    /// A PENDING task with no event for this long is stale (contract default 4 h).
    #[arg(long, default_value_t = 4 * 3_600_000)]
    stale_after_ms: i64,
    /// An escalation unanswered this long is escalated again (contract default 1 h).
    #[arg(long, default_value_t = 3_600_000)]
    re_escalate_after_ms: i64,
    /// Print `progress N` every this many records.
    #[arg(long, default_value_t = 500)]
    progress_every: u64,
}

fn topic(args: &Args, name: &str) -> String {
    if args.topic_prefix.is_empty() {
        name.to_string()
    } else {
        format!("{}.{name}", args.topic_prefix)
    }
}

const SCHEMA_SQL: &str = r#"
CREATE TABLE workflow_templates (
    template_id text NOT NULL, version bigint NOT NULL, definition jsonb NOT NULL,
    PRIMARY KEY (template_id, version));
CREATE TABLE processed_events (event_id text PRIMARY KEY);
CREATE TABLE workflow_instances (
    workflow_instance_id text PRIMARY KEY, patient_id text,
    template_id text, template_version bigint, started_at timestamptz,
    status text NOT NULL DEFAULT 'ACTIVE', progress_percentage integer NOT NULL DEFAULT 0,
    upstream_terminal text, upstream_terminal_at timestamptz, first_upstream_terminal_at timestamptz,
    is_escalated boolean NOT NULL DEFAULT false, escalation_reason text, escalated_at timestamptz,
    escalation_level integer NOT NULL DEFAULT 0, last_task_completed_at timestamptz,
    completed_at timestamptz, updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE task_instances (
    task_instance_id text PRIMARY KEY, workflow_instance_id text NOT NULL, task_def_id text NOT NULL,
    status text NOT NULL, attempt integer NOT NULL, event_time timestamptz NOT NULL,
    created_at timestamptz, started_at timestamptz, completed_at timestamptz,
    due_at timestamptz, due_explicit boolean NOT NULL DEFAULT false,
    sla_breached boolean NOT NULL DEFAULT false, is_escalated boolean NOT NULL DEFAULT false,
    escalated_to text, is_stale boolean NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL DEFAULT now());
CREATE INDEX task_instances_workflow_idx ON task_instances (workflow_instance_id);
CREATE INDEX task_instances_open_due_idx ON task_instances (due_at) WHERE NOT sla_breached;
CREATE TABLE orders (
    order_id text PRIMARY KEY, workflow_instance_id text, order_type text, order_status text,
    event_time timestamptz NOT NULL, updated_at timestamptz NOT NULL DEFAULT now());
CREATE INDEX orders_workflow_idx ON orders (workflow_instance_id);
CREATE TABLE task_readiness (
    workflow_instance_id text NOT NULL, task_def_id text NOT NULL,
    PRIMARY KEY (workflow_instance_id, task_def_id));
CREATE TABLE sla_breaches (
    task_instance_id text NOT NULL, attempt integer NOT NULL, due_at timestamptz NOT NULL,
    detected_at timestamptz NOT NULL, escalated_to text, PRIMARY KEY (task_instance_id, attempt));
CREATE TABLE stale_tasks (task_instance_id text PRIMARY KEY, detected_at timestamptz NOT NULL);
CREATE TABLE escalations (
    workflow_instance_id text NOT NULL, level integer NOT NULL, detected_at timestamptz NOT NULL,
    PRIMARY KEY (workflow_instance_id, level));
CREATE TABLE component_health (component text PRIMARY KEY, status text, updated_at timestamptz);
CREATE TABLE audit_log (event_id text PRIMARY KEY, payload jsonb NOT NULL);
"#;

async fn connect(url: &str) -> anyhow::Result<Client> {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| "connecting to PostgreSQL".to_string())?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("postgres connection: {e}");
        }
    });
    Ok(client)
}

fn ts(ms: i64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

fn ms_of(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A template as the consumer keeps it (the seed's JPA cache of definitions).
#[derive(Clone, Debug)]
struct Def {
    id: String,
    required: bool,
    next: Option<String>,
    sla_minutes: Option<i64>,
    max_retries: i32,
    failure: Option<String>,
    blocking: Vec<String>,
    escalate_to: String,
}

fn parse_template(v: &Value) -> Option<((String, i64), Vec<Def>)> {
    let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    let defs = v
        .get("tasks")?
        .as_array()?
        .iter()
        .map(|t| {
            Some(Def {
                id: s(t, "taskDefId")?,
                required: t.get("required").and_then(Value::as_bool).unwrap_or(true),
                next: s(t, "nextTaskId"),
                sla_minutes: t.get("slaMinutes").and_then(Value::as_i64),
                max_retries: t.get("maxRetries").and_then(Value::as_i64).unwrap_or(0) as i32,
                failure: s(t, "failureTaskId"),
                blocking: t
                    .get("blockingOrderTypes")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| x.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default(),
                escalate_to: s(t, "escalateTo").unwrap_or_else(|| "MANAGER".into()),
            })
        })
        .collect::<Option<Vec<Def>>>()?;
    Some(((s(v, "templateId")?, v.get("version")?.as_i64()?), defs))
}

fn rank(status: &str) -> i32 {
    match status {
        "PENDING" => 0,
        "IN_PROGRESS" => 1,
        _ => 2,
    }
}

const CLOSED_ORDER: [&str; 6] = [
    "RESULTED",
    "DISPENSED",
    "COMPLETED",
    "VERIFIED",
    "CLOSED",
    "CANCELLED",
];

struct Consumer_ {
    db: Client,
    templates: HashMap<(String, i64), Vec<Def>>,
    duplicates: u64,
    skipped: u64,
}

impl Consumer_ {
    /// One event, one transaction.
    async fn handle(&mut self, topic_kind: &str, v: &Value) -> anyhow::Result<()> {
        if topic_kind == "definitions" {
            if let Some((key, defs)) = parse_template(v) {
                self.db
                    .execute(
                        "INSERT INTO workflow_templates VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                        &[&key.0, &key.1, v],
                    )
                    .await?;
                self.templates.insert(key, defs);
            } else {
                self.skipped += 1;
            }
            return Ok(());
        }
        let (Some(event_id), Some(event_type), Some(time)) = (
            v.get("eventId").and_then(Value::as_str),
            v.get("eventType").and_then(Value::as_str),
            v.get("eventTime")
                .and_then(Value::as_str)
                .and_then(|s| parse_time(s).ok()),
        ) else {
            self.skipped += 1;
            return Ok(());
        };
        let time = time as i64;
        let s = |k: &str| v.get(k).and_then(Value::as_str);
        let tx = self.db.transaction().await?;
        let fresh = tx
            .execute(
                "INSERT INTO processed_events VALUES ($1) ON CONFLICT DO NOTHING",
                &[&event_id],
            )
            .await?;
        if fresh == 0 {
            self.duplicates += 1;
            tx.commit().await?;
            return Ok(());
        }
        let mut workflow = s("workflowInstanceId").map(str::to_owned);
        match topic_kind {
            "tasks" => {
                let (Some(tid), Some(wid), Some(def)) =
                    (s("taskInstanceId"), s("workflowInstanceId"), s("taskDefId"))
                else {
                    self.skipped += 1;
                    tx.commit().await?;
                    return Ok(());
                };
                let status = match event_type {
                    "TASK_CREATED" => "PENDING",
                    "TASK_STARTED" => "IN_PROGRESS",
                    "TASK_COMPLETED" => "COMPLETED",
                    "TASK_FAILED" => "FAILED",
                    _ => {
                        self.skipped += 1;
                        tx.commit().await?;
                        return Ok(());
                    }
                };
                let attempt = v.get("attempt").and_then(Value::as_i64).unwrap_or(1) as i32;
                let due = s("dueAt")
                    .and_then(|d| parse_time(d).ok())
                    .map(|d| ts(d as i64));
                let row = tx
                    .query_opt(
                        "SELECT status, attempt, event_time FROM task_instances WHERE task_instance_id = $1 FOR UPDATE",
                        &[&tid],
                    )
                    .await?;
                let newer = match &row {
                    None => true,
                    Some(r) => {
                        let (st, at, et): (String, i32, std::time::SystemTime) =
                            (r.get(0), r.get(1), r.get(2));
                        (attempt, rank(status), time) > (at, rank(&st), ms_of(et))
                    }
                };
                let t = ts(time);
                if row.is_none() {
                    tx.execute(
                        "INSERT INTO task_instances (task_instance_id, workflow_instance_id, task_def_id, status, attempt, event_time) VALUES ($1, $2, $3, $4, $5, $6)",
                        &[&tid, &wid, &def, &status, &attempt, &t],
                    )
                    .await?;
                } else if newer {
                    tx.execute(
                        "UPDATE task_instances SET status = $2, attempt = $3, event_time = $4, updated_at = now() WHERE task_instance_id = $1",
                        &[&tid, &status, &attempt, &t],
                    )
                    .await?;
                }
                // Timestamps of the current attempt: a CREATED of a newer attempt resets them.
                match event_type {
                    "TASK_CREATED" => {
                        tx.execute(
                            "UPDATE task_instances SET created_at = $2, due_at = $3, due_explicit = $4, sla_breached = false
                             WHERE task_instance_id = $1 AND attempt = $5",
                            &[&tid, &t, &due, &due.is_some(), &attempt],
                        )
                        .await?;
                    }
                    "TASK_STARTED" => {
                        tx.execute(
                            "UPDATE task_instances SET started_at = $2 WHERE task_instance_id = $1 AND attempt = $3",
                            &[&tid, &t, &attempt],
                        )
                        .await?;
                    }
                    _ => {
                        tx.execute(
                            "UPDATE task_instances SET completed_at = $2 WHERE task_instance_id = $1 AND attempt = $3",
                            &[&tid, &t, &attempt],
                        )
                        .await?;
                    }
                }
            }
            "orders" => {
                if let (Some(oid), Some(st)) = (s("orderId"), s("orderStatus")) {
                    let t = ts(time);
                    tx.execute(
                        "INSERT INTO orders (order_id, workflow_instance_id, order_type, order_status, event_time)
                         VALUES ($1, $2, $3, $4, $5)
                         ON CONFLICT (order_id) DO UPDATE SET order_status = EXCLUDED.order_status,
                           order_type = COALESCE(EXCLUDED.order_type, orders.order_type),
                           event_time = EXCLUDED.event_time, updated_at = now()
                         WHERE orders.event_time <= EXCLUDED.event_time
                           AND orders.order_status NOT IN ('CLOSED', 'CANCELLED')",
                        &[&oid, &s("workflowInstanceId"), &s("orderType"), &st, &t],
                    )
                    .await?;
                }
            }
            "workflows" => {
                let Some(wid) = s("workflowInstanceId") else {
                    self.skipped += 1;
                    tx.commit().await?;
                    return Ok(());
                };
                let t = ts(time);
                tx.execute(
                    "INSERT INTO workflow_instances (workflow_instance_id, patient_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    &[&wid, &s("patientId")],
                )
                .await?;
                match event_type {
                    "WORKFLOW_STARTED" => {
                        let version = v.get("templateVersion").and_then(Value::as_i64);
                        tx.execute(
                            "UPDATE workflow_instances SET template_id = $2, template_version = $3, started_at = $4
                             WHERE workflow_instance_id = $1 AND (started_at IS NULL OR started_at > $4)",
                            &[&wid, &s("templateId"), &version, &t],
                        )
                        .await?;
                    }
                    "WORKFLOW_COMPLETED" | "WORKFLOW_FAILED" => {
                        let st = if event_type == "WORKFLOW_COMPLETED" {
                            "COMPLETED"
                        } else {
                            "FAILED"
                        };
                        tx.execute(
                            "UPDATE workflow_instances SET
                               upstream_terminal = CASE WHEN upstream_terminal_at IS NULL OR upstream_terminal_at <= $3 THEN $2 ELSE upstream_terminal END,
                               upstream_terminal_at = GREATEST(upstream_terminal_at, $3),
                               first_upstream_terminal_at = LEAST(first_upstream_terminal_at, $3)
                             WHERE workflow_instance_id = $1",
                            &[&wid, &st, &t],
                        )
                        .await?;
                    }
                    "WORKFLOW_ESCALATED" => {
                        tx.execute(
                            "UPDATE workflow_instances SET is_escalated = true, escalation_reason = $2,
                               escalated_at = GREATEST(escalated_at, $3), escalation_level = GREATEST(escalation_level, 1)
                             WHERE workflow_instance_id = $1",
                            &[&wid, &s("escalationReason"), &t],
                        )
                        .await?;
                    }
                    _ => {}
                }
            }
            _ => {
                // system-events: current health per component, the audit log; metrics and
                // error reports are counted only (their alerts are not part of this comparison).
                workflow = None;
                match event_type {
                    "HEALTH_CHECK" => {
                        tx.execute(
                            "INSERT INTO component_health VALUES ($1, $2, $3)
                             ON CONFLICT (component) DO UPDATE SET status = EXCLUDED.status, updated_at = EXCLUDED.updated_at
                             WHERE component_health.updated_at <= EXCLUDED.updated_at",
                            &[&s("component"), &s("status"), &ts(time)],
                        )
                        .await?;
                    }
                    "AUDIT_EVENT" => {
                        tx.execute(
                            "INSERT INTO audit_log VALUES ($1, $2) ON CONFLICT DO NOTHING",
                            &[&event_id, v],
                        )
                        .await?;
                    }
                    _ => {}
                }
            }
        }
        if let Some(wid) = workflow {
            recompute(&tx, &self.templates, &wid).await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// Readiness, progress and status of one workflow from its rows (contract §4), written back.
async fn recompute(
    tx: &tokio_postgres::Transaction<'_>,
    templates: &HashMap<(String, i64), Vec<Def>>,
    wid: &str,
) -> anyhow::Result<()> {
    let Some(w) = tx
        .query_opt(
            "SELECT template_id, template_version, started_at, upstream_terminal, upstream_terminal_at, first_upstream_terminal_at
             FROM workflow_instances WHERE workflow_instance_id = $1 FOR UPDATE",
            &[&wid],
        )
        .await?
    else {
        return Ok(()); // tasks before their WORKFLOW_STARTED: recomputed when it comes
    };
    let (Some(tid), Some(ver), Some(started)) = (
        w.get::<_, Option<String>>(0),
        w.get::<_, Option<i64>>(1),
        w.get::<_, Option<std::time::SystemTime>>(2),
    ) else {
        return Ok(());
    };
    let Some(defs) = templates.get(&(tid, ver)) else {
        return Ok(());
    };
    let started = ms_of(started);
    let upstream: Option<(String, i64)> = w
        .get::<_, Option<String>>(3)
        .zip(w.get::<_, Option<std::time::SystemTime>>(4).map(ms_of));
    let first_upstream = w.get::<_, Option<std::time::SystemTime>>(5).map(ms_of);

    let tasks = tx
        .query(
            "SELECT task_instance_id, task_def_id, status, attempt, event_time, completed_at, created_at, due_at, due_explicit
             FROM task_instances WHERE workflow_instance_id = $1",
            &[&wid],
        )
        .await?;
    let orders = tx
        .query(
            "SELECT order_type, order_status FROM orders WHERE workflow_instance_id = $1",
            &[&wid],
        )
        .await?;

    #[derive(Default)]
    struct Summary {
        completed: Option<(i64, String)>,
        in_progress: bool,
        failed_for_good: Option<(i64, String)>,
    }
    let by_id: HashMap<&str, &Def> = defs.iter().map(|d| (d.id.as_str(), d)).collect();
    let mut summary: HashMap<&str, Summary> = HashMap::new();
    let mut missing_due: Vec<(String, std::time::SystemTime)> = Vec::new();
    for r in &tasks {
        let task_id: String = r.get(0);
        let def_id: String = r.get(1);
        let Some(def) = by_id.get(def_id.as_str()) else {
            continue;
        };
        let status: String = r.get(2);
        let attempt: i32 = r.get(3);
        let finished = r
            .get::<_, Option<std::time::SystemTime>>(5)
            .map(ms_of)
            .unwrap_or_else(|| ms_of(r.get(4)));
        let s = summary.entry(def.id.as_str()).or_default();
        match status.as_str() {
            // The earliest instance that completed (or failed for good) decides the time.
            "COMPLETED"
                if s.completed
                    .as_ref()
                    .is_none_or(|c| (finished, &task_id) < (c.0, &c.1)) =>
            {
                s.completed = Some((finished, task_id.clone()));
            }
            "IN_PROGRESS" => s.in_progress = true,
            "FAILED"
                if attempt > def.max_retries
                    && s.failed_for_good
                        .as_ref()
                        .is_none_or(|c| (finished, &task_id) < (c.0, &c.1)) =>
            {
                s.failed_for_good = Some((finished, task_id.clone()));
            }
            _ => {}
        }
        // dueAt from the template when TASK_CREATED had none (the template may have been
        // unknown when the task arrived before its workflow).
        let created = r.get::<_, Option<std::time::SystemTime>>(6);
        let due = r.get::<_, Option<std::time::SystemTime>>(7);
        if let (Some(c), None, Some(m)) = (created, due, def.sla_minutes) {
            missing_due.push((task_id.clone(), ts(ms_of(c) + m * 60_000)));
        }
    }
    for (task_id, due) in &missing_due {
        tx.execute(
            "UPDATE task_instances SET due_at = $2 WHERE task_instance_id = $1",
            &[task_id, due],
        )
        .await?;
    }

    let required: Vec<&Def> = defs.iter().filter(|d| d.required).collect();
    let done: Vec<i64> = required
        .iter()
        .filter_map(|d| {
            summary
                .get(d.id.as_str())
                .and_then(|s| s.completed.as_ref())
        })
        .map(|c| c.0)
        .collect();
    let progress = if required.is_empty() {
        100
    } else {
        (100 * done.len() / required.len()) as i32
    };
    let completion =
        (progress == 100).then(|| done.iter().copied().max().unwrap_or(started).max(started));
    let failure = defs
        .iter()
        .filter(|d| d.failure.is_none())
        .filter_map(|d| {
            summary
                .get(d.id.as_str())
                .and_then(|s| s.failed_for_good.clone())
        })
        .min()
        .map(|f| f.0);
    let derived = match (completion, failure) {
        (Some(c), Some(f)) if c < f => Some(("COMPLETED", c)),
        (_, Some(f)) => Some(("FAILED", f)),
        (Some(c), None) => Some(("COMPLETED", c)),
        (None, None) => None,
    };
    let derived_first = match (derived, first_upstream) {
        (Some((s, at)), Some(up)) if at < up => Some((s, at)),
        (d, None) => d,
        _ => None,
    };
    let (status, completed_at): (String, Option<i64>) = match (&upstream, derived_first) {
        (Some((us, _)), Some((ds, dat))) if us == ds => (us.clone(), Some(dat)),
        (Some((us, uat)), _) => (us.clone(), Some(*uat)),
        (None, Some((ds, dat))) => (ds.to_string(), Some(dat)),
        (None, None) => ("ACTIVE".to_string(), None),
    };
    let last_completed = done.iter().copied().max().map(ts);
    tx.execute(
        "UPDATE workflow_instances SET status = $2, progress_percentage = $3, completed_at = $4,
           last_task_completed_at = $5, updated_at = now() WHERE workflow_instance_id = $1",
        &[
            &wid,
            &status,
            &progress,
            &completed_at.map(ts),
            &last_completed,
        ],
    )
    .await?;

    // Readiness: exactly the ready definitions of an ACTIVE workflow.
    let mut ready: Vec<&str> = Vec::new();
    if status == "ACTIVE" {
        let mut failure_namers: HashMap<&str, Vec<&str>> = HashMap::new();
        for d in defs {
            if let Some(f) = &d.failure {
                failure_namers
                    .entry(f.as_str())
                    .or_default()
                    .push(d.id.as_str());
            }
        }
        let open_types: BTreeSet<String> = orders
            .iter()
            .filter(|o| {
                o.get::<_, Option<String>>(1)
                    .is_some_and(|st| !CLOSED_ORDER.contains(&st.as_str()))
            })
            .filter_map(|o| o.get::<_, Option<String>>(0))
            .collect();
        for d in defs {
            let s = summary.get(d.id.as_str());
            if s.is_some_and(|s| {
                s.in_progress || s.completed.is_some() || s.failed_for_good.is_some()
            }) {
                continue;
            }
            let satisfied = match failure_namers.get(d.id.as_str()) {
                Some(namers) => namers
                    .iter()
                    .any(|n| summary.get(n).is_some_and(|s| s.failed_for_good.is_some())),
                None => defs
                    .iter()
                    .filter(|p| p.next.as_deref() == Some(d.id.as_str()))
                    .all(|p| {
                        summary
                            .get(p.id.as_str())
                            .is_some_and(|s| s.completed.is_some())
                    }),
            };
            if satisfied && !d.blocking.iter().any(|b| open_types.contains(b)) {
                ready.push(d.id.as_str());
            }
        }
    }
    tx.execute(
        "DELETE FROM task_readiness WHERE workflow_instance_id = $1",
        &[&wid],
    )
    .await?;
    if !ready.is_empty() {
        tx.execute(
            "INSERT INTO task_readiness SELECT $1, unnest($2::text[])",
            &[&wid, &ready],
        )
        .await?;
    }
    Ok(())
}

/// What the scheduler is asked to do, at a clock instant.
enum Tick {
    Sla(i64),
    Stale(i64),
    Escalation(i64),
}

/// The scheduler thread: runs each poll against its own connection; returns the breach
/// visibility delays (poll instant − dueAt, ms) and counts.
fn scheduler(
    url: String,
    args_stale_after: i64,
    args_re_escalate: i64,
    escalate_to: HashMap<String, String>,
    rx: mpsc::Receiver<Tick>,
    ack: mpsc::Sender<()>,
) -> anyhow::Result<Value> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let db = connect(&url).await?;
        let mut delays: Vec<i64> = Vec::new();
        let (mut polls, mut stale, mut escalations) = (0u64, 0u64, 0u64);
        let mut busy = Duration::ZERO;
        while let Ok(tick) = rx.recv() {
            let t0 = Instant::now();
            match tick {
                Tick::Sla(now) => {
                    polls += 1;
                    // monitorSLABreaches: mark, escalate, record (one transaction per poll).
                    let rows = db
                        .query(
                            "UPDATE task_instances SET sla_breached = true, is_escalated = true
                             WHERE due_at < $1 AND NOT sla_breached AND status IN ('PENDING', 'IN_PROGRESS')
                             RETURNING task_instance_id, attempt, due_at, task_def_id",
                            &[&ts(now)],
                        )
                        .await?;
                    for r in &rows {
                        let due: std::time::SystemTime = r.get(2);
                        delays.push(now - ms_of(due));
                        let def: String = r.get(3);
                        let to = escalate_to.get(&def).cloned().unwrap_or_else(|| "MANAGER".into());
                        let task: String = r.get(0);
                        let attempt: i32 = r.get(1);
                        db.execute(
                            "UPDATE task_instances SET escalated_to = $2 WHERE task_instance_id = $1",
                            &[&task, &to],
                        )
                        .await?;
                        db.execute(
                            "INSERT INTO sla_breaches VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                            &[&task, &attempt, &due, &ts(now), &to],
                        )
                        .await?;
                    }
                }
                Tick::Stale(now) => {
                    stale += db
                        .execute(
                            "WITH s AS (UPDATE task_instances SET is_stale = true
                               WHERE status = 'PENDING' AND NOT is_stale AND event_time < $1
                               RETURNING task_instance_id)
                             INSERT INTO stale_tasks SELECT task_instance_id, $2 FROM s ON CONFLICT DO NOTHING",
                            &[&ts(now - args_stale_after), &ts(now)],
                        )
                        .await?;
                }
                Tick::Escalation(now) => {
                    escalations += db
                        .execute(
                            "WITH e AS (UPDATE workflow_instances SET escalation_level = escalation_level + 1, escalated_at = $2
                               WHERE is_escalated AND status = 'ACTIVE' AND escalation_level BETWEEN 1 AND 2
                                 AND escalated_at < $1
                                 AND (last_task_completed_at IS NULL OR last_task_completed_at < escalated_at)
                               RETURNING workflow_instance_id, escalation_level)
                             INSERT INTO escalations SELECT workflow_instance_id, escalation_level, $2 FROM e ON CONFLICT DO NOTHING",
                            &[&ts(now - args_re_escalate), &ts(now)],
                        )
                        .await?;
                }
            }
            busy += t0.elapsed();
            let _ = ack.send(());
        }
        let mut sorted = delays.clone();
        sorted.sort_unstable();
        Ok::<Value, anyhow::Error>(json!({
            "sla_polls": polls,
            "sla_breaches": delays.len(),
            "stale_tasks": stale,
            "re_escalations": escalations,
            "scheduler_busy_s": busy.as_secs_f64(),
            "breach_visibility_delay_ms": hmis_bench::summary(&sorted),
        }))
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    let url = schema_url(&args.services.database_url, &args.schema);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    // Fresh schema.
    rt.block_on(async {
        let db = connect(&args.services.database_url).await?;
        db.batch_execute(&format!(
            "DROP SCHEMA IF EXISTS \"{0}\" CASCADE; CREATE SCHEMA \"{0}\";",
            args.schema
        ))
        .await?;
        let db = connect(&url).await?;
        db.batch_execute(SCHEMA_SQL).await?;
        anyhow::Ok(())
    })?;

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &args.services.brokers)
        .set("group.id", &args.group_id)
        .set("enable.auto.commit", "true")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "50")
        .create()?;
    let kinds = [
        ("definitions", "workflow-definitions"),
        ("tasks", "workflow-task-events"),
        ("orders", "workflow-order-events"),
        ("workflows", "workflow-state-events"),
        ("system", "system-events"),
    ];
    let mut kind_of: HashMap<String, &str> = HashMap::new();
    // End offsets at start, per (topic, partition): the run stops when all are reached.
    let mut ends: Vec<(String, i32, i64)> = Vec::new();
    for (kind, name) in kinds {
        let t = topic(&args, name);
        kind_of.insert(t.clone(), kind);
        let md = consumer.fetch_metadata(Some(&t), Duration::from_secs(10))?;
        let parts: Vec<i32> = md
            .topics()
            .first()
            .map(|m| m.partitions().iter().map(|p| p.id()).collect())
            .unwrap_or_default();
        anyhow::ensure!(!parts.is_empty(), "topic {t} has no partitions");
        for p in parts {
            let (_, high) = consumer.fetch_watermarks(&t, p, Duration::from_secs(10))?;
            ends.push((t.clone(), p, high));
        }
    }
    let total: i64 = ends.iter().map(|e| e.2).sum();

    let mut state = rt.block_on(async {
        anyhow::Ok(Consumer_ {
            db: connect(&url).await?,
            templates: HashMap::new(),
            duplicates: 0,
            skipped: 0,
        })
    })?;

    // Definitions first (as hmis-flow does): read them to their end before anything else.
    let assign = |only_defs: bool| -> anyhow::Result<()> {
        let mut tpl = TopicPartitionList::new();
        for (t, p, _) in &ends {
            let is_defs = kind_of[t] == "definitions";
            if is_defs == only_defs {
                tpl.add_partition_offset(t, *p, Offset::Beginning)?;
            }
        }
        consumer.assign(&tpl)?;
        Ok(())
    };
    let mut read: i64 = 0;
    let mut positions: HashMap<(String, i32), i64> = HashMap::new();
    let mut clock: i64 = i64::MIN;
    let mut highest: HashMap<(String, i32), i64> = HashMap::new();
    let (tx, rx) = mpsc::channel::<Tick>();
    let (ack_tx, ack) = mpsc::channel::<()>();
    let mut rx_slot = Some((rx, ack_tx));
    let mut next_tick: Option<[i64; 3]> = None;
    let periods = [
        args.sla_poll_secs as i64 * 1000,
        args.stale_poll_secs as i64 * 1000,
        args.escalation_poll_secs as i64 * 1000,
    ];
    let mut sched: Option<std::thread::JoinHandle<anyhow::Result<Value>>> = None;
    let mut last_progress = 0i64;
    let mut processing = Duration::ZERO;
    for phase in [true, false] {
        assign(phase)?;
        let done = |positions: &HashMap<(String, i32), i64>| {
            ends.iter()
                .filter(|(t, _, _)| (kind_of[t] == "definitions") == phase)
                .all(|(t, p, high)| positions.get(&(t.clone(), *p)).copied().unwrap_or(0) >= *high)
        };
        while !done(&positions) {
            let Some(res) = consumer.poll(Duration::from_millis(100)) else {
                continue;
            };
            let m = res.context("consuming")?;
            positions.insert((m.topic().to_string(), m.partition()), m.offset() + 1);
            read += 1;
            let kind = kind_of.get(m.topic()).copied().unwrap_or("system");
            let Some(v) = m
                .payload()
                .and_then(|p| serde_json::from_slice::<Value>(p).ok())
            else {
                state.skipped += 1;
                continue;
            };
            let t0 = Instant::now();
            rt.block_on(state.handle(kind, &v))
                .with_context(|| format!("{} offset {}", m.topic(), m.offset()))?;
            processing += t0.elapsed();
            // The event clock, and the scheduler's polls as it crosses their instants.
            if let Some(et) = v
                .get("eventTime")
                .and_then(Value::as_str)
                .and_then(|s| parse_time(s).ok())
            {
                let e = highest
                    .entry((m.topic().to_string(), m.partition()))
                    .or_insert(i64::MIN);
                *e = (*e).max(et as i64);
                clock = watermark(&ends, &kind_of, &positions, &highest);
                if clock == i64::MIN {
                    continue;
                }
                if sched.is_none() {
                    // Escalation targets per taskDefId (the templates are all read by now).
                    let mut to = HashMap::new();
                    for defs in state.templates.values() {
                        for d in defs {
                            to.insert(d.id.clone(), d.escalate_to.clone());
                        }
                    }
                    let (u, sa, re) = (url.clone(), args.stale_after_ms, args.re_escalate_after_ms);
                    let (rx, ack_tx) = rx_slot.take().expect("scheduler started once");
                    sched = Some(
                        std::thread::Builder::new()
                            .name("scheduler".into())
                            .spawn(move || scheduler(u, sa, re, to, rx, ack_tx))?,
                    );
                }
                let nt =
                    next_tick.get_or_insert_with(|| periods.map(|p| (clock.div_euclid(p) + 1) * p));
                send_due_ticks(&tx, &ack, nt, &periods, clock)?;
            }
            if read - last_progress >= args.progress_every as i64 {
                println!("progress {read} {total}");
                last_progress = read;
            }
        }
    }
    let consume_s = started.elapsed().as_secs_f64();
    // The polls that come after the last event: the first of each kind after the clock, so
    // every deadline up to the clock becomes visible (as it would in the live system).
    clock = highest.values().copied().max().unwrap_or(clock);
    if let Some(nt) = next_tick.as_mut() {
        send_due_ticks(&tx, &ack, nt, &periods, clock)?;
        tx.send(Tick::Sla(nt[0])).ok();
    }
    drop(tx);
    let sched_result = match sched {
        Some(h) => h
            .join()
            .map_err(|_| anyhow::anyhow!("scheduler thread panicked"))??,
        None => json!({}),
    };
    println!("progress {read} {total}");
    let result = json!({
        "records_read": read,
        "records_total": total,
        "duplicates_skipped": state.duplicates,
        "unparsed_skipped": state.skipped,
        "wall_s": started.elapsed().as_secs_f64(),
        "consume_s": consume_s,
        "handler_s": processing.as_secs_f64(),
        "clock": hmis_dataflows::events::format_time(clock.max(0) as u64),
        "scheduler": sched_result,
        "sla_poll_secs": args.sla_poll_secs,
        "stale_poll_secs": args.stale_poll_secs,
        "escalation_poll_secs": args.escalation_poll_secs,
    });
    println!("result {result}");
    Ok(())
}

/// The event clock as hmis-flow's `clock = event` defines it (contract §8): the lowest, over
/// the event partitions not yet read to their end, of the highest eventTime read from each
/// (`i64::MIN` while one has given nothing yet); once all are at their end, the highest.
fn watermark(
    ends: &[(String, i32, i64)],
    kind_of: &HashMap<String, &str>,
    positions: &HashMap<(String, i32), i64>,
    highest: &HashMap<(String, i32), i64>,
) -> i64 {
    let mut low: Option<i64> = None;
    for (t, p, high) in ends {
        if kind_of[t] == "definitions" {
            continue;
        }
        let key = (t.clone(), *p);
        if positions.get(&key).copied().unwrap_or(0) >= *high {
            continue;
        }
        let h = highest.get(&key).copied().unwrap_or(i64::MIN);
        low = Some(low.map_or(h, |l| l.min(h)));
    }
    low.unwrap_or_else(|| highest.values().copied().max().unwrap_or(i64::MIN))
}

/// Sends every poll whose instant the clock has passed, in order, and moves them on.
fn send_due_ticks(
    tx: &mpsc::Sender<Tick>,
    ack: &mpsc::Receiver<()>,
    next: &mut [i64; 3],
    periods: &[i64; 3],
    clock: i64,
) -> anyhow::Result<()> {
    loop {
        let (i, at) = next
            .iter()
            .copied()
            .enumerate()
            .min_by_key(|(_, at)| *at)
            .expect("three kinds");
        if at > clock {
            return Ok(());
        }
        let tick = match i {
            0 => Tick::Sla(at),
            1 => Tick::Stale(at),
            _ => Tick::Escalation(at),
        };
        // Lockstep: the poll at instant T sees the rows as they are when the clock reaches T.
        tx.send(tick)
            .map_err(|_| anyhow::anyhow!("scheduler thread stopped"))?;
        ack.recv()
            .map_err(|_| anyhow::anyhow!("scheduler thread stopped"))?;
        next[i] += periods[i];
    }
}
