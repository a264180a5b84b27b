//! PgSink and migrations against a real PostgreSQL (`HMIS_TEST_DATABASE_URL`), one schema
//! per test.

mod common;

use hmis_dataflows::model::{OrderStatus, TaskStatus};

use chrono::{DateTime, Utc};
use common::*;
use hmis_dataflows::output::{
    AlertRow, AuditRow, CompensationRow, ComponentHealthRow, ErrorReportRow, OrderRow,
    OrderTransitionRow, OutTopic, Row, SlaBreachRow,
};
use hmis_sinks::{migrate, SinkError};

fn at(ms: u64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms as i64).unwrap()
}

#[tokio::test]
async fn migrate_creates_the_schema_once() {
    let db = TestDb::new().await;
    let mut client = db.client().await;

    let applied = migrate(&mut client).await.unwrap();
    assert_eq!(
        applied,
        [
            "0001_init",
            "0002_reporting",
            "0003_published_events",
            "0004_system_events",
            "0005_dead_letter_encodings",
            "0006_roles",
            "0007_outbox_keys",
            "0008_ledger_key_order"
        ]
    );
    assert!(migrate(&mut client).await.unwrap().is_empty());

    let tables: Vec<String> = client
        .query(
            "SELECT table_name::text FROM information_schema.tables
             WHERE table_schema = current_schema() ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for expected in [
        "workflow_instances",
        "task_instances",
        "task_readiness",
        "orders",
        "order_transitions",
        "compensation_actions",
        "sla_breaches",
        "alerts",
        "component_health",
        "audit_log",
        "error_reports",
        "dead_letters",
        "analytics_windows",
        "hmis_input_offsets",
        "hmis_pipeline_progress",
        "hmis_outbox",
        "hmis_published_events",
        "hmis_schema_migrations",
        "report_sla_compliance",
        "report_order_turnaround",
        "report_open_escalations",
        "report_workflow_progress",
    ] {
        assert!(tables.iter().any(|t| t == expected), "missing {expected}");
    }

    // The reporting role logs in (0006), reads tables and views, and nothing else
    // (sinks/tests/roles.rs logs in as it).
    let row = client
        .query_one(
            "SELECT has_table_privilege('hmis_reporting', 'workflow_instances', 'SELECT'),
                    has_table_privilege('hmis_reporting', 'report_sla_compliance', 'SELECT'),
                    has_table_privilege('hmis_reporting', 'workflow_instances', 'INSERT'),
                    (SELECT rolcanlogin FROM pg_roles WHERE rolname = 'hmis_reporting')",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));
    assert!(row.get::<_, bool>(1));
    assert!(!row.get::<_, bool>(2));
    assert!(row.get::<_, bool>(3));
    db.drop().await;
}

#[tokio::test]
async fn migrate_refuses_edited_and_unknown_migrations() {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    migrate(&mut client).await.unwrap();

    // A database newer than this build.
    client
        .execute(
            "INSERT INTO hmis_schema_migrations (version, name, checksum)
             VALUES (999, '0999_future', 'x')",
            &[],
        )
        .await
        .unwrap();
    let err = migrate(&mut client).await.unwrap_err();
    assert!(
        matches!(err, SinkError::UnknownMigration { version: 999, .. }),
        "{err}"
    );
    client
        .execute(
            "DELETE FROM hmis_schema_migrations WHERE version = 999",
            &[],
        )
        .await
        .unwrap();

    // An applied migration edited afterwards.
    client
        .execute(
            "UPDATE hmis_schema_migrations SET checksum = 'edited' WHERE version = 1",
            &[],
        )
        .await
        .unwrap();
    let err = migrate(&mut client).await.unwrap_err();
    assert!(
        matches!(err, SinkError::MigrationChanged { version: 1, .. }),
        "{err}"
    );
    assert!(!err.is_transient());
    db.drop().await;
}

#[tokio::test]
async fn concurrent_migrations_are_safe() {
    let db = TestDb::new().await;
    for _ in 0..3 {
        let schema_db = TestDb::new().await;
        let mut clients = Vec::new();
        for _ in 0..4 {
            clients.push(schema_db.client().await);
        }
        let runs = clients.into_iter().map(|mut client| {
            tokio::spawn(async move { migrate(&mut client).await.map(|applied| applied.len()) })
        });
        let mut applied = Vec::new();
        for run in runs.collect::<Vec<_>>() {
            applied.push(run.await.unwrap().expect("concurrent migrate"));
        }
        applied.sort();
        let all = hmis_sinks::migrate::MIGRATIONS.len();
        assert_eq!(applied, [0, 0, 0, all], "exactly one instance migrates");
        let count: i64 = schema_db
            .client()
            .await
            .query_one("SELECT count(*) FROM hmis_schema_migrations", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(count, all as i64);
        schema_db.drop().await;
    }
    db.drop().await;
}

#[tokio::test]
async fn apply_upserts_deletes_and_records_progress() {
    let db = TestDb::new().await;
    let mut sink = db.claimed_sink("g1").await;
    let client = db.client().await;

    // First flush: a workflow, two tasks, two ready pairs, records, dead letters, offsets.
    let mut first = batch(T0 + 1000);
    first.rows = vec![
        upsert(workflow("wf-1", 0)),
        upsert(task("t-1", "wf-1", TaskStatus::Pending)),
        upsert(task("t-2", "wf-1", TaskStatus::InProgress)),
        upsert(ready("wf-1", "triage")),
        upsert(ready("wf-1", "labs")),
    ];
    first.records = vec![
        record(OutTopic::Derived, "e-1", Some("wf-1")),
        record(OutTopic::Alerts, "a-1", Some("monitor")),
        record(OutTopic::Derived, "e-2", Some("wf-1")),
        record(OutTopic::Derived, "e-1", Some("wf-1")), // duplicate event id
        dead_letter(3, 17).to_record(),
    ];
    first.dead_letters = vec![dead_letter(3, 17), dead_letter(3, 17)];
    let d1 = dead_letter(3, 17).to_record();
    let d2 = dead_letter(4, 1).to_record();
    first.offsets = vec![
        offset("workflow-task-events", 3, 10),
        offset("workflow-task-events", 3, 18),
        offset("workflow-state-events", 0, 4),
    ];
    sink.apply("g1", &first).await.unwrap();

    let wf = client
        .query_one(
            "SELECT status, progress_percentage, template_version, started_at, completed_at
             FROM workflow_instances WHERE workflow_instance_id = 'wf-1'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(wf.get::<_, String>(0), "ACTIVE");
    assert_eq!(wf.get::<_, i32>(1), 0);
    assert_eq!(wf.get::<_, i64>(2), 3);
    assert_eq!(wf.get::<_, DateTime<Utc>>(3), at(T0));
    assert_eq!(wf.get::<_, Option<DateTime<Utc>>>(4), None);

    let tasks = client
        .query(
            "SELECT task_instance_id, status, due_at FROM task_instances ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(tasks.len(), 2);
    assert_eq!(tasks[1].get::<_, String>(1), "IN_PROGRESS");
    assert_eq!(tasks[0].get::<_, DateTime<Utc>>(2), at(T0 + 15 * 60_000));

    let readiness: Vec<(String, DateTime<Utc>)> = client
        .query(
            "SELECT task_def_id, ready_since FROM task_readiness ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        readiness,
        [
            ("labs".to_string(), at(T0 + 1000)),
            ("triage".to_string(), at(T0 + 1000))
        ]
    );

    let outbox: Vec<(String, String, Option<String>)> = client
        .query(
            "SELECT topic, event_id, key FROM hmis_outbox WHERE group_id = 'g1' ORDER BY seq",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        outbox,
        [
            ("derived".into(), "e-1".into(), Some("wf-1".into())),
            ("alerts".into(), "a-1".into(), Some("monitor".into())),
            ("derived".into(), "e-2".into(), Some("wf-1".into())),
            ("dead_letter".into(), d1.event_id.clone(), d1.key.clone()),
        ]
    );

    let dl = client
        .query_one(
            "SELECT count(*), min(reason), min(rejected_at) FROM dead_letters",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(dl.get::<_, i64>(0), 1);
    assert_eq!(dl.get::<_, String>(1), "INVALID_JSON");
    assert_eq!(dl.get::<_, DateTime<Utc>>(2), at(T0 + 5));

    let progress = sink.load_progress("g1").await.unwrap();
    assert_eq!(progress.frontier_ms, Some(T0 + 1000));
    assert_eq!(progress.offsets.len(), 2);
    assert_eq!(
        progress.offsets[&("workflow-task-events".to_string(), 3)],
        18
    );
    assert_eq!(
        progress.offsets[&("workflow-state-events".to_string(), 0)],
        4
    );

    // Second flush: progress, a deleted ready pair and task, a re-sent ready pair, a replayed
    // record and dead letter, and a key that appears twice.
    let mut escalated = workflow("wf-1", 50);
    if let hmis_dataflows::output::Row::Workflow(w) = &mut escalated {
        w.is_escalated = true;
        w.escalation_level = 1;
        w.escalation_reason = Some("SLA_BREACH:triage".into());
    }
    let mut second = batch(T0 + 2000);
    second.rows = vec![
        upsert(workflow("wf-1", 10)),
        upsert(escalated),
        delete(ready("wf-1", "triage")),
        upsert(ready("wf-1", "labs")),
        delete(task("t-2", "wf-1", TaskStatus::InProgress)),
        upsert(task("t-1", "wf-1", TaskStatus::InProgress)),
        upsert(task("t-1", "wf-1", TaskStatus::Completed)),
        upsert(ready("wf-2", "triage")),
        delete(ready("wf-2", "triage")),
    ];
    // The dead letter of the first flush was published (its outbox row deleted): decided
    // again, (3, 17) must not be published again; (4, 1) is new.
    client
        .execute("DELETE FROM hmis_outbox WHERE topic = 'dead_letter'", &[])
        .await
        .unwrap();
    second.records = vec![
        record(OutTopic::Derived, "e-2", Some("wf-1")),
        d1.clone(),
        record(OutTopic::Derived, "e-3", Some("wf-1")),
        d2.clone(),
    ];
    second.dead_letters = vec![dead_letter(3, 17), dead_letter(4, 1)];
    second.offsets = vec![offset("workflow-task-events", 3, 25)];
    sink.apply("g1", &second).await.unwrap();

    let wf = client
        .query_one(
            "SELECT progress_percentage, is_escalated, escalation_level, escalation_reason
             FROM workflow_instances",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(wf.get::<_, i32>(0), 50);
    assert!(wf.get::<_, bool>(1));
    assert_eq!(wf.get::<_, i32>(2), 1);
    assert_eq!(wf.get::<_, String>(3), "SLA_BREACH:triage");

    let tasks: Vec<(String, String)> = client
        .query("SELECT task_instance_id, status FROM task_instances", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(tasks, [("t-1".to_string(), "COMPLETED".to_string())]);

    let readiness: Vec<(String, String, DateTime<Utc>)> = client
        .query(
            "SELECT workflow_instance_id, task_def_id, ready_since FROM task_readiness",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    // Still ready since the first flush.
    assert_eq!(
        readiness,
        [("wf-1".to_string(), "labs".to_string(), at(T0 + 1000))]
    );

    let event_ids: Vec<String> = client
        .query("SELECT event_id FROM hmis_outbox ORDER BY seq", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        event_ids,
        ["e-1", "a-1", "e-2", "e-3", d2.event_id.as_str()]
    );

    let dead: i64 = client
        .query_one("SELECT count(*) FROM dead_letters", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(dead, 2);

    let progress = sink.load_progress("g1").await.unwrap();
    assert_eq!(progress.frontier_ms, Some(T0 + 2000));
    assert_eq!(
        progress.offsets[&("workflow-task-events".to_string(), 3)],
        25
    );
    assert_eq!(
        progress.offsets[&("workflow-state-events".to_string(), 0)],
        4
    );

    // Replaying a flush changes nothing.
    sink.apply("g1", &second).await.unwrap();
    let outbox_len: i64 = client
        .query_one("SELECT count(*) FROM hmis_outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(outbox_len, 5);

    // Published (the publisher deleted the outbox rows), then derived again, as after a
    // restart: ids in the ledger are not published again, a new one is.
    client
        .execute("DELETE FROM hmis_outbox", &[])
        .await
        .unwrap();
    let before = sink.republish_suppressed;
    let mut third = batch(T0 + 3000);
    third.records = vec![
        record(OutTopic::Derived, "e-1", Some("wf-1")),
        record(OutTopic::Alerts, "a-1", Some("monitor")),
        record(OutTopic::Derived, "e-4", Some("wf-1")),
    ];
    sink.apply("g1", &third).await.unwrap();
    let event_ids: Vec<String> = client
        .query("SELECT event_id FROM hmis_outbox ORDER BY seq", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(event_ids, ["e-4"]);
    assert_eq!(sink.republish_suppressed - before, 2);
    let ledger: i64 = client
        .query_one(
            "SELECT count(*) FROM hmis_published_events WHERE group_id = 'g1'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        ledger, 5,
        "e-1, e-2, e-3, e-4 and a-1; dead letters are not in it"
    );
    db.drop().await;
}

#[tokio::test]
async fn large_batches_keep_production_order_across_chunks() {
    let db = TestDb::new().await;
    let mut sink = db.claimed_sink("big").await;
    let n = hmis_sinks::pg::CHUNK * 2 + 123;
    let mut big = batch(T0 + 60_000);
    big.rows = (0..n)
        .map(|i| {
            upsert(task(
                &format!("t-{i}"),
                &format!("wf-{}", i % 97),
                TaskStatus::Pending,
            ))
        })
        .collect();
    big.records = (0..n)
        .map(|i| {
            record(
                OutTopic::Derived,
                &format!("e-{i:06}"),
                Some(&format!("wf-{}", i % 97)),
            )
        })
        .collect();
    sink.apply("big", &big).await.unwrap();

    let client = db.client().await;
    let tasks: i64 = client
        .query_one("SELECT count(*) FROM task_instances", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(tasks as usize, n);
    let ids: Vec<String> = client
        .query("SELECT event_id FROM hmis_outbox ORDER BY seq", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let expected: Vec<String> = (0..n).map(|i| format!("e-{i:06}")).collect();
    assert_eq!(ids, expected, "seq follows the batch order");
    db.drop().await;
}

#[tokio::test]
async fn a_record_repeated_in_a_flush_enters_the_outbox_once() {
    // The outbox has no unique key of its own (migration 0007): the ledger and the
    // statement's own de-duplication keep one copy, within a chunk and across chunks.
    let db = TestDb::new().await;
    let mut sink = db.claimed_sink("rep").await;
    let n = hmis_sinks::pg::CHUNK + 10;
    let mut b = batch(T0);
    b.records = (0..n)
        .map(|i| record(OutTopic::Derived, &format!("e-{:06}", i % 7), Some("wf-1")))
        .collect();
    b.records
        .push(record(OutTopic::Alerts, "e-000000", Some("wf-1")));
    sink.apply("rep", &b).await.unwrap();
    // Applied again (a retried flush): nothing new.
    sink.apply("rep", &b).await.unwrap();

    let client = db.client().await;
    let rows: Vec<(String, String)> = client
        .query("SELECT topic, event_id FROM hmis_outbox ORDER BY seq", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut expected: Vec<(String, String)> = (0..7)
        .map(|i| ("derived".to_string(), format!("e-{i:06}")))
        .collect();
    expected.push(("alerts".to_string(), "e-000000".to_string()));
    assert_eq!(
        rows, expected,
        "each (topic, id) once, in first-occurrence order"
    );
    db.drop().await;
}

#[tokio::test]
async fn a_stale_epoch_is_fenced() {
    let db = TestDb::new().await;
    let mut old = db.claimed_sink("g").await;
    let mut unclaimed = db.sink().await;

    let mut flush = batch(T0);
    flush.rows = vec![upsert(workflow("wf-1", 0))];
    flush.offsets = vec![offset("workflow-task-events", 0, 5)];

    let err = unclaimed.apply("g", &flush).await.unwrap_err();
    assert!(matches!(err, SinkError::NotClaimed { .. }), "{err}");

    old.apply("g", &flush).await.unwrap();
    let mut new = db.sink().await;
    let epoch = new.claim("g", "successor").await.unwrap();
    assert_eq!(epoch, old.epoch().unwrap() + 1);

    let mut late = batch(T0 + 1);
    late.rows = vec![upsert(workflow("wf-2", 0))];
    late.offsets = vec![offset("workflow-task-events", 0, 9)];
    let err = old.apply("g", &late).await.unwrap_err();
    assert!(
        matches!(
            err,
            SinkError::Fenced {
                ours: 1,
                current: Some(2),
                ..
            }
        ),
        "{err}"
    );
    assert!(!err.is_transient());

    // Nothing of the fenced flush is visible; the successor resumes where `old` committed.
    let progress = new.load_progress("g").await.unwrap();
    assert_eq!(progress.frontier_ms, Some(T0));
    assert_eq!(
        progress.offsets[&("workflow-task-events".to_string(), 0)],
        5
    );
    let client = db.client().await;
    let workflows: i64 = client
        .query_one("SELECT count(*) FROM workflow_instances", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(workflows, 1);
    let owner: String = client
        .query_one("SELECT owner FROM hmis_pipeline_progress", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner, "successor");

    new.apply("g", &late).await.unwrap();
    db.drop().await;
}

#[tokio::test]
async fn group_lock_admits_one_session() {
    let db = TestDb::new().await;
    let group = format!("lock-{}", db.schema); // advisory locks are per database
    let a = db.sink().await;
    let b = db.sink().await;
    assert!(a.try_lock_group(&group).await.unwrap());
    assert!(!b.try_lock_group(&group).await.unwrap());
    assert!(a.unlock_group(&group).await.unwrap());
    assert!(b.try_lock_group(&group).await.unwrap());
    drop(b); // the lock ends with the session
    let c = db.sink().await;
    for _ in 0..50 {
        if c.try_lock_group(&group).await.unwrap() {
            db.drop().await;
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("lock not released when its session ended");
}

#[tokio::test]
async fn audit_log_rejects_changes() {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    migrate(&mut client).await.unwrap();
    client
        .execute(
            "INSERT INTO audit_log (event_id, actor, action, details, event_time)
             VALUES ('ev-1', 'dr.who', 'VIEW', '{\"x\": 1}', now())",
            &[],
        )
        .await
        .unwrap();
    // A replayed insert is a no-op, not a change.
    client
        .execute(
            "INSERT INTO audit_log (event_id, event_time) VALUES ('ev-1', now())
             ON CONFLICT (event_id) DO NOTHING",
            &[],
        )
        .await
        .unwrap();

    for statement in [
        "UPDATE audit_log SET actor = 'someone else'",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
    ] {
        let err = client.batch_execute(statement).await.unwrap_err();
        let db_err = err.as_db_error().expect("server error");
        assert_eq!(db_err.code().code(), "42501", "{statement}");
        assert!(db_err.message().contains("append-only"), "{statement}");
    }
    let row = client
        .query_one("SELECT count(*), min(actor) FROM audit_log", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 1);
    assert_eq!(row.get::<_, String>(1), "dr.who");
    db.drop().await;
}

#[tokio::test]
async fn reporting_views_summarize_the_tables() {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    migrate(&mut client).await.unwrap();
    client
        .batch_execute(
            "INSERT INTO workflow_instances (workflow_instance_id, template_id, template_version,
                 template_name, status, progress_percentage, is_escalated, escalation_level,
                 escalation_reason)
             VALUES ('w1', 'sepsis', 1, 'Sepsis', 'ACTIVE', 33, true, 1, 'SLA_BREACH:triage'),
                    ('w2', 'sepsis', 1, 'Sepsis', 'COMPLETED', 100, true, 1, 'SLA_BREACH:a'),
                    ('w3', 'sepsis', 1, 'Sepsis', 'ACTIVE', 39, false, 0, NULL);
             INSERT INTO task_instances (task_instance_id, workflow_instance_id, task_def_id,
                 status, due_at, completed_at, sla_breached, is_escalated, escalated_to)
             VALUES ('t1', 'w1', 'triage', 'IN_PROGRESS', now() - interval '1 hour', NULL,
                     true, true, 'CHARGE_NURSE'),
                    ('t2', 'w2', 'triage', 'COMPLETED', '2026-01-01T10:00Z', '2026-01-01T09:59Z',
                     false, false, NULL),
                    ('t3', 'w2', 'labs', 'COMPLETED', '2026-01-01T10:00Z', '2026-01-01T10:01Z',
                     true, false, NULL),
                    ('t4', 'w3', 'labs', 'COMPLETED', '2026-01-01T10:00Z', '2026-01-01T09:00Z',
                     false, false, NULL);
             INSERT INTO orders (order_id, order_type, order_status, department, created_at,
                 resulted_at)
             VALUES ('o1', 'LAB_TEST', 'RESULTED', 'ER', '2026-01-01T10:00Z', '2026-01-01T10:10Z'),
                    ('o2', 'LAB_TEST', 'VERIFIED', 'ER', '2026-01-01T10:00Z', '2026-01-01T10:30Z'),
                    ('o3', 'LAB_TEST', 'ACTIVATED', 'ER', '2026-01-01T10:00Z', NULL);",
        )
        .await
        .unwrap();

    let sla = client
        .query_one(
            "SELECT completed_with_due_at, completed_on_time, sla_breached, open_overdue,
                    sla_compliance_pct::text
             FROM report_sla_compliance WHERE template_id = 'sepsis'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(sla.get::<_, i64>(0), 3);
    assert_eq!(sla.get::<_, i64>(1), 2);
    assert_eq!(sla.get::<_, i64>(2), 2);
    assert_eq!(sla.get::<_, i64>(3), 1);
    assert_eq!(sla.get::<_, String>(4), "66.7");

    let orders = client
        .query_one(
            "SELECT orders, orders_resulted, p50_turnaround_s::float8, p90_turnaround_s::float8
             FROM report_order_turnaround WHERE order_type = 'LAB_TEST' AND department = 'ER'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(orders.get::<_, i64>(0), 3);
    assert_eq!(orders.get::<_, i64>(1), 2);
    assert_eq!(orders.get::<_, f64>(2), 600.0);
    assert_eq!(orders.get::<_, f64>(3), 1800.0);

    let open: Vec<(String, i64, Option<String>)> = client
        .query(
            "SELECT workflow_instance_id, escalated_open_tasks, escalated_to
             FROM report_open_escalations",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        open,
        [("w1".to_string(), 1, Some("CHARGE_NURSE".to_string()))]
    );

    let buckets: Vec<(String, i32, i64)> = client
        .query(
            "SELECT status, progress_from, workflows FROM report_workflow_progress
             ORDER BY status, progress_from",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        buckets,
        [
            ("ACTIVE".to_string(), 30, 2),
            ("COMPLETED".to_string(), 100, 1)
        ]
    );
    db.drop().await;
}

#[tokio::test]
async fn errors_are_classified_transient_or_permanent() {
    // Nobody listens on port 1: a connection failure, worth retrying.
    let err = match hmis_sinks::PgSink::connect("postgres://postgres@127.0.0.1:1/postgres").await {
        Err(err) => err,
        Ok(_) => panic!("connected to port 1"),
    };
    assert!(err.is_transient(), "{err}");

    let db = TestDb::new().await;
    let mut sink = db.claimed_sink("g").await;

    // A constraint violation is permanent and caused by content; its message says all that
    // PostgreSQL said (not just "db error").
    let client = db.client().await;
    let source = client
        .execute(
            "INSERT INTO dead_letters (topic, partition, \"offset\", payload, payload_encoding,
                 reason, detail, rejected_at) VALUES ('t', 0, 0, '', 'rot13', 'r', 'd', now())",
            &[],
        )
        .await
        .unwrap_err();
    let err = SinkError::Postgres {
        context: "insert dead_letters".into(),
        source,
    };
    assert_eq!(err.sqlstate(), Some("23514"), "{err}");
    assert!(!err.is_transient());
    assert!(err.is_content_error());
    let text = err.to_string();
    assert!(
        text.contains("23514") && text.contains("dead_letters_payload_encoding_check"),
        "the message carries the SQLSTATE and the constraint: {text}"
    );
    // Schema drift is permanent, and not the content's fault.
    let source = client
        .execute("SELECT * FROM no_such_table", &[])
        .await
        .unwrap_err();
    let err = SinkError::Postgres {
        context: "select".into(),
        source,
    };
    assert!(!err.is_transient() && !err.is_content_error(), "{err}");
    assert!(err.to_string().contains("no_such_table"), "{err}");

    // The server ending our session (failover, restart) is transient.
    let pid: i32 = sink
        .client()
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    client
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    let mut good = batch(T0);
    good.rows = vec![upsert(workflow("wf-1", 0))];
    let err = sink.apply("g", &good).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    db.drop().await;
}

/// Issue 11: a permanent database error caused by one item's content does not stop the
/// pipeline: the item becomes a dead letter with PostgreSQL's message, the rest commits, and
/// a replay of the same flush stores nothing twice.
#[tokio::test]
async fn a_refused_item_is_dead_lettered_and_the_rest_of_the_flush_commits() {
    let db = TestDb::new().await;
    let mut sink = db.claimed_sink("g").await;
    let client = db.client().await;

    let mut flush = batch(T0 + 1000);
    let mut bad_row = workflow("wf-bad", 0);
    if let Row::Workflow(w) = &mut bad_row {
        w.patient_id = Some("p\u{0}1".into()); // text cannot hold NUL: 22021
    }
    flush.rows = vec![
        upsert(workflow("wf-1", 0)),
        upsert(bad_row),
        upsert(task("t-1", "wf-1", TaskStatus::Pending)),
    ];
    let mut refused = dead_letter(0, 1);
    refused.payload_encoding = "rot13".into(); // breaks the CHECK: 23514
    let good = dead_letter(0, 2);
    flush.records = vec![
        record(OutTopic::Derived, "e-1", Some("wf-1")),
        refused.to_record(),
        good.to_record(),
        record(OutTopic::Derived, "e-2", Some("wf-1")),
    ];
    flush.dead_letters = vec![refused.clone(), good.clone()];
    flush.offsets = vec![offset("workflow-task-events", 0, 3)];
    sink.apply("g", &flush).await.unwrap();
    assert_eq!(sink.quarantined, 2, "the bad row and the bad dead letter");

    let texts = |sql: &'static str| {
        let client = &client;
        async move {
            client
                .query(sql, &[])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<String>>()
        }
    };
    assert_eq!(
        texts("SELECT workflow_instance_id FROM workflow_instances ORDER BY 1").await,
        ["wf-1"]
    );
    assert_eq!(
        texts("SELECT task_instance_id FROM task_instances").await,
        ["t-1"]
    );
    let outbox = texts("SELECT event_id FROM hmis_outbox ORDER BY seq").await;
    assert_eq!(
        outbox.len(),
        5,
        "two events, three dead-letter documents: {outbox:?}"
    );
    let at = |id: &str| outbox.iter().position(|e| e == id).unwrap();
    assert!(
        at("e-1") < at(&good.to_record().event_id),
        "production order kept"
    );
    assert!(
        at(&good.to_record().event_id) < at("e-2"),
        "production order kept"
    );
    let letters = texts(
        "SELECT topic || '|' || partition || '|' || payload_encoding || '|' || key_encoding
                || '|' || detail
         FROM dead_letters ORDER BY topic, partition, \"offset\"",
    )
    .await;
    assert_eq!(letters.len(), 3, "{letters:#?}");
    assert!(
        letters[0].starts_with("hmis-flow.workflow_instances|-1|utf8|utf8|")
            && letters[0].contains("22021"),
        "the refused row, with PostgreSQL's message: {}",
        letters[0]
    );
    assert!(
        letters[1].starts_with("workflow-task-events|0|base64|base64|")
            && letters[1].contains("23514")
            && letters[1].contains("dead_letters_payload_encoding_check"),
        "the refused dead letter, stored as base64 with PostgreSQL's message: {}",
        letters[1]
    );
    assert!(letters[2].starts_with("workflow-task-events|0|utf8|utf8|"));
    let next: i64 = client
        .query_one("SELECT next_offset FROM hmis_input_offsets", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(next, 3, "the flush's offsets are committed");

    // A replay of the same flush (after a restart) stores and publishes nothing twice.
    sink.apply("g", &flush).await.unwrap();
    assert_eq!(
        texts("SELECT topic FROM dead_letters").await.len(),
        3,
        "no dead letter twice"
    );
    db.drop().await;
}

/// Issue 11: a record without a value (a tombstone) is stored as a dead letter; before
/// migration 0005 the CHECK on payload_encoding refused it and the pipeline stopped.
#[tokio::test]
async fn a_tombstone_and_a_binary_key_are_stored_as_dead_letters() {
    let db = TestDb::new().await;
    let mut sink = db.claimed_sink("g").await;
    let client = db.client().await;
    let pos = |offset| hmis_dataflows::events::Pos {
        partition: 0,
        offset,
    };
    let reason = hmis_dataflows::output::RejectReason::InvalidJson;
    let tombstone = hmis_dataflows::output::DeadLetter::of_bytes(
        "workflow-task-events",
        pos(1),
        Some(b"t-1"),
        None,
        reason,
        "empty (null) value".into(),
        T0,
    );
    let binary = hmis_dataflows::output::DeadLetter::of_bytes(
        "workflow-task-events",
        pos(2),
        Some(&[0xff, 0x00]),
        Some(&[0x00, 0xfe]),
        reason,
        "payload is not UTF-8".into(),
        T0,
    );
    let mut flush = batch(T0 + 1);
    flush.records = vec![tombstone.to_record(), binary.to_record()];
    flush.dead_letters = vec![tombstone, binary];
    sink.apply("g", &flush).await.unwrap();
    assert_eq!(sink.quarantined, 0, "stored as they are");
    let rows: Vec<(String, String, Option<String>, String)> = client
        .query(
            "SELECT payload_encoding, payload, key, key_encoding FROM dead_letters ORDER BY \"offset\"",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        rows,
        [
            ("null".into(), "".into(), Some("t-1".into()), "utf8".into()),
            (
                "base64".into(),
                "AP4=".into(),
                Some("/wA=".into()),
                "base64".into()
            ),
        ]
    );
    db.drop().await;
}

fn order_row(id: &str, status: &str) -> OrderRow {
    OrderRow {
        order_id: id.into(),
        workflow_instance_id: Some("wf-1".into()),
        patient_id: Some("patient-1".into()),
        order_type: "IMAGING".into(),
        order_status: OrderStatus::parse(status).expect("a contract order status"),
        actor: Some("dr.a".into()),
        actor_role: Some("PHYSICIAN".into()),
        cost: Some("125.50".into()),
        department: Some("RADIOLOGY".into()),
        critical: false,
        appointment_id: Some("appt-1".into()),
        cancel_reason: None,
        is_overdue: false,
        created_at: Some(T0),
        authorized_at: Some(T0 + 1_000),
        activated_at: Some(T0 + 2_000),
        started_at: None,
        resulted_at: None,
        verified_at: None,
        closed_at: None,
        cancelled_at: None,
    }
}

fn transition_row(event_id: &str, accepted: bool) -> OrderTransitionRow {
    OrderTransitionRow {
        event_id: event_id.into(),
        order_id: "o-1".into(),
        workflow_instance_id: Some("wf-1".into()),
        event_type: "ORDER_AUTHORIZED".into(),
        from_status: Some(OrderStatus::Proposed),
        to_status: Some(OrderStatus::Authorized),
        actor: Some("dr.a".into()),
        actor_role: Some("PHYSICIAN".into()),
        accepted,
        reject_reason: (!accepted).then(|| "UNAUTHORIZED_ACTOR".into()),
        event_time: T0 + 1_000,
        source_partition: 2,
        source_offset: 41,
    }
}

fn compensation_row(action_type: &str, amount: Option<&str>) -> CompensationRow {
    CompensationRow {
        action_id: format!("act-{action_type}").into(),
        order_id: "o-1".into(),
        workflow_instance_id: Some("wf-1".into()),
        patient_id: Some("patient-1".into()),
        action_type: action_type.into(),
        amount: amount.map(Into::into),
        appointment_id: None,
        status: "PENDING".into(),
        reason: Some("patient left".into()),
        cause_event_id: Some("ev-cancel".into()),
        requested_at: T0 + 3_000,
        completed_at: None,
    }
}

fn breach_row(task: &str, attempt: i32) -> SlaBreachRow {
    SlaBreachRow {
        task_instance_id: task.into(),
        attempt,
        workflow_instance_id: "wf-1".into(),
        patient_id: Some("patient-1".into()),
        template_id: Some("sepsis-bundle".into()),
        template_version: Some(3),
        task_def_id: "triage".into(),
        due_at: T0 + 15 * 60_000,
        breached_at: T0 + 15 * 60_000 + 1,
        minutes_overdue: 0,
        escalated_to: Some("CHARGE_NURSE".into()),
        event_id: Some(format!("breach-{task}-{attempt}").into()),
    }
}

fn alert_row(id: &str) -> AlertRow {
    AlertRow {
        alert_id: id.into(),
        severity: "CRITICAL".into(),
        source: "orders".into(),
        kind: "ORDER_CRITICAL_RESULT".into(),
        message: "critical result for order o-1".into(),
        raised_at: T0 + 4_000,
        cause_event_id: Some("ev-result".into()),
        component: None,
        workflow_instance_id: Some("wf-1".into()),
        task_instance_id: None,
        order_id: Some("o-1".into()),
        details: Some(r#"{"orderType":"LAB_TEST","critical":true}"#.into()),
    }
}

#[tokio::test]
async fn apply_writes_orders_transitions_compensations_breaches_and_alerts() {
    let db = TestDb::new().await;
    let mut sink = db.claimed_sink("orders").await;
    let client = db.client().await;

    let mut first = batch(T0 + 5_000);
    first.rows = vec![
        upsert(Row::Order(order_row("o-1", "ACTIVATED"))),
        upsert(Row::Order(order_row("o-2", "PROPOSED"))),
        upsert(Row::OrderTransition(transition_row("ev-1", true))),
        upsert(Row::OrderTransition(transition_row("ev-2", false))),
        upsert(Row::Compensation(compensation_row(
            "REVERSE_CHARGE",
            Some("125.50"),
        ))),
        upsert(Row::Compensation(compensation_row(
            "SEND_NOTIFICATION",
            None,
        ))),
        upsert(Row::SlaBreach(breach_row("t-1", 1))),
        upsert(Row::SlaBreach(breach_row("t-1", 2))),
        upsert(Row::Alert(alert_row("al-1"))),
        upsert(Row::Alert(alert_row("al-2"))),
    ];
    sink.apply("orders", &first).await.unwrap();

    let order = client
        .query_one(
            "SELECT order_status, cost::text, department, appointment_id, activated_at,
                    started_at, is_overdue
             FROM orders WHERE order_id = 'o-1'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(order.get::<_, String>(0), "ACTIVATED");
    assert_eq!(order.get::<_, String>(1), "125.50");
    assert_eq!(order.get::<_, String>(2), "RADIOLOGY");
    assert_eq!(order.get::<_, String>(3), "appt-1");
    assert_eq!(order.get::<_, DateTime<Utc>>(4), at(T0 + 2_000));
    assert_eq!(order.get::<_, Option<DateTime<Utc>>>(5), None);
    assert!(!order.get::<_, bool>(6));

    let transitions: Vec<(String, bool, Option<String>, DateTime<Utc>, i32, i64)> = client
        .query(
            "SELECT event_id, accepted, reject_reason, event_time, source_partition,
                    source_offset
             FROM order_transitions ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
        .collect();
    assert_eq!(
        transitions,
        [
            ("ev-1".into(), true, None, at(T0 + 1_000), 2, 41),
            (
                "ev-2".into(),
                false,
                Some("UNAUTHORIZED_ACTOR".into()),
                at(T0 + 1_000),
                2,
                41
            ),
        ]
    );

    let actions: Vec<(String, Option<String>, String, DateTime<Utc>)> = client
        .query(
            "SELECT action_type, amount::text, status, requested_at
             FROM compensation_actions ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        actions,
        [
            (
                "REVERSE_CHARGE".into(),
                Some("125.50".into()),
                "PENDING".into(),
                at(T0 + 3_000)
            ),
            (
                "SEND_NOTIFICATION".into(),
                None,
                "PENDING".into(),
                at(T0 + 3_000)
            ),
        ]
    );

    let breaches: Vec<(String, i32, DateTime<Utc>, Option<String>)> = client
        .query(
            "SELECT task_instance_id, attempt, due_at, escalated_to FROM sla_breaches
             ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(breaches.len(), 2);
    assert_eq!(breaches[1].1, 2);
    assert_eq!(breaches[0].2, at(T0 + 15 * 60_000));

    let alert = client
        .query_one(
            "SELECT severity, kind, raised_at, details->>'orderType', (details->>'critical')::bool
             FROM alerts WHERE alert_id = 'al-1'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(alert.get::<_, String>(0), "CRITICAL");
    assert_eq!(alert.get::<_, String>(1), "ORDER_CRITICAL_RESULT");
    assert_eq!(alert.get::<_, DateTime<Utc>>(2), at(T0 + 4_000));
    assert_eq!(alert.get::<_, String>(3), "LAB_TEST");
    assert!(alert.get::<_, bool>(4));

    // Second flush: state changes, a completed action, and one delete per table; the
    // breach delete travels with the attempt as text, as `Row::key` makes it.
    let mut cancelled = order_row("o-1", "CANCELLED");
    cancelled.cost = None;
    cancelled.cancel_reason = Some("patient left".into());
    cancelled.cancelled_at = Some(T0 + 3_000);
    cancelled.is_overdue = true;
    let mut done = compensation_row("REVERSE_CHARGE", Some("125.50"));
    done.status = "COMPLETED".into();
    done.completed_at = Some(T0 + 6_000);
    let mut rejected = transition_row("ev-1", false);
    rejected.from_status = Some(OrderStatus::Activated);
    let mut second = batch(T0 + 10_000);
    second.rows = vec![
        upsert(Row::Order(cancelled)),
        delete(Row::Order(order_row("o-2", "PROPOSED"))),
        upsert(Row::OrderTransition(rejected)),
        delete(Row::OrderTransition(transition_row("ev-2", false))),
        upsert(Row::Compensation(done)),
        delete(Row::Compensation(compensation_row(
            "SEND_NOTIFICATION",
            None,
        ))),
        delete(Row::SlaBreach(breach_row("t-1", 2))),
        upsert(Row::SlaBreach(breach_row("t-2", 1))),
        delete(Row::SlaBreach(breach_row("t-2", 1))),
        delete(Row::Alert(alert_row("al-2"))),
    ];
    sink.apply("orders", &second).await.unwrap();

    let orders: Vec<(String, String, Option<String>, Option<String>, bool)> = client
        .query(
            "SELECT order_id, order_status, cost::text, cancel_reason, is_overdue FROM orders",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    assert_eq!(
        orders,
        [(
            "o-1".into(),
            "CANCELLED".into(),
            None,
            Some("patient left".into()),
            true
        )]
    );
    let transitions: Vec<(String, bool, Option<String>)> = client
        .query(
            "SELECT event_id, accepted, from_status FROM order_transitions",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        transitions,
        [("ev-1".into(), false, Some("ACTIVATED".into()))]
    );
    let actions: Vec<(String, String, Option<DateTime<Utc>>)> = client
        .query(
            "SELECT action_type, status, completed_at FROM compensation_actions",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        actions,
        [(
            "REVERSE_CHARGE".into(),
            "COMPLETED".into(),
            Some(at(T0 + 6_000))
        )]
    );
    let breaches: Vec<(String, i32)> = client
        .query("SELECT task_instance_id, attempt FROM sla_breaches", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(breaches, [("t-1".into(), 1)]);
    let alerts: Vec<String> = client
        .query("SELECT alert_id FROM alerts", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(alerts, ["al-1"]);

    // Replaying a flush writes nothing: updated_at stays where it was.
    let stamp = "SELECT (SELECT updated_at FROM orders WHERE order_id = 'o-1'),
                        (SELECT updated_at FROM compensation_actions
                         WHERE action_type = 'REVERSE_CHARGE')";
    let before = client.query_one(stamp, &[]).await.unwrap();
    sink.apply("orders", &second).await.unwrap();
    let after = client.query_one(stamp, &[]).await.unwrap();
    assert_eq!(
        before.get::<_, DateTime<Utc>>(0),
        after.get::<_, DateTime<Utc>>(0)
    );
    assert_eq!(
        before.get::<_, DateTime<Utc>>(1),
        after.get::<_, DateTime<Utc>>(1)
    );
    db.drop().await;
}

fn health_row(component: &str, status: &str, at: u64, since: u64) -> Row {
    Row::ComponentHealth(ComponentHealthRow {
        component: component.into(),
        status: status.into(),
        last_check_at: at,
        status_since: since,
    })
}

fn error_row(event_id: &str, component: &str, severity: &str, at: u64) -> Row {
    Row::ErrorReport(ErrorReportRow {
        event_id: event_id.into(),
        component: component.into(),
        severity: severity.into(),
        message: format!("{severity} at {at}"),
        event_time: at,
        source_topic: "system-events".into(),
        source_partition: 1,
        source_offset: 7,
    })
}

fn audit_row(event_id: &str) -> Row {
    Row::Audit(AuditRow {
        event_id: event_id.into(),
        component: "emr".into(),
        actor: "dr-x".into(),
        action: "VIEW".into(),
        entity_type: "PATIENT".into(),
        entity_id: "p-1".into(),
        details: Some(r#"{"fields":["allergies"]}"#.into()),
        event_time: T0,
        source_topic: "system-events".into(),
        source_partition: 0,
        source_offset: 3,
    })
}

#[tokio::test]
async fn system_rows_health_audit_and_error_counts_exactly_once() {
    let db = TestDb::new().await;
    let mut sink = db.claimed_sink("system").await;
    let client = db.client().await;

    let mut first = batch(T0 + 5_000);
    first.rows = vec![
        upsert(health_row("db", "UNHEALTHY", T0 + 2_000, T0 + 1_000)),
        upsert(audit_row("au-1")),
        upsert(error_row("er-1", "db", "MEDIUM", T0 + 1_000)),
        upsert(error_row("er-2", "db", "LOW", T0 + 3_000)),
        upsert(error_row("er-3", "db", "CRITICAL", T0 + 2_000)),
        // A component that reported an error before any health check.
        upsert(error_row("er-4", "lab", "LOW", T0 + 4_000)),
    ];
    sink.apply("system", &first).await.unwrap();

    // The same reports again (a duplicate input, or a batch written again): nothing counted
    // twice, nothing appended twice. One more MEDIUM, older than the latest error.
    let mut second = batch(T0 + 9_000);
    second.rows = vec![
        upsert(health_row("db", "UP", T0 + 8_000, T0 + 8_000)),
        upsert(audit_row("au-1")),
        upsert(error_row("er-1", "db", "MEDIUM", T0 + 1_000)),
        upsert(error_row("er-2", "db", "LOW", T0 + 3_000)),
        upsert(error_row("er-5", "db", "MEDIUM", T0 + 500)),
    ];
    sink.apply("system", &second).await.unwrap();

    let health: Vec<(
        String,
        Option<String>,
        i64,
        i64,
        Option<DateTime<Utc>>,
        Option<String>,
    )> = client
        .query(
            "SELECT component, status, medium_errors, low_errors, last_error_at,
                        last_error_message
                 FROM component_health ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
        .collect();
    assert_eq!(
        health,
        [
            (
                "db".into(),
                Some("UP".into()),
                2,
                1,
                Some(at(T0 + 3_000)),
                Some(format!("LOW at {}", T0 + 3_000))
            ),
            (
                "lab".into(),
                None,
                0,
                1,
                Some(at(T0 + 4_000)),
                Some(format!("LOW at {}", T0 + 4_000))
            ),
        ],
        "health from the rows; errors counted once per report, CRITICAL not counted"
    );
    let since: DateTime<Utc> = client
        .query_one(
            "SELECT status_since FROM component_health WHERE component = 'db'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(since, at(T0 + 8_000));

    let reports: i64 = client
        .query_one("SELECT count(*) FROM error_reports", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(reports, 5);

    let audit: Vec<(String, String, String, i32, i64)> = client
        .query(
            "SELECT event_id, details->'fields'->>0, source_topic, source_partition,
                    source_offset
             FROM audit_log",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    assert_eq!(
        audit,
        [(
            "au-1".into(),
            "allergies".into(),
            "system-events".into(),
            0,
            3
        )],
        "appended once"
    );
    db.drop().await;
}

/// Migration 0008 reordered the ledger's key (event_id first); what it makes unique is the
/// same triple: an id once per group and topic, and the pruning still finds a group's old ids.
#[tokio::test]
async fn the_ledger_holds_an_id_once_per_group_and_topic() {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    migrate(&mut client).await.unwrap();
    let insert = "INSERT INTO hmis_published_events (group_id, topic, event_id) VALUES ($1, $2, $3)
                  ON CONFLICT DO NOTHING";
    for (group, topic, id, stored) in [
        ("g1", "derived", "e-1", 1),
        ("g1", "derived", "e-1", 0),
        ("g2", "derived", "e-1", 1),
        ("g1", "alerts", "e-1", 1),
        ("g1", "derived", "e-2", 1),
    ] {
        let n = client
            .execute(insert, &[&group, &topic, &id])
            .await
            .unwrap();
        assert_eq!(n, stored, "{group} {topic} {id}");
    }
    client
        .execute(
            "UPDATE hmis_published_events SET first_at = now() - interval '8 days'
             WHERE event_id = 'e-1'",
            &[],
        )
        .await
        .unwrap();
    let pruned = client
        .execute(
            "DELETE FROM hmis_published_events WHERE group_id = 'g1' AND first_at < now() - interval '7 days'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(pruned, 2, "g1's e-1 on both topics");
    let left: Vec<(String, String)> = client
        .query(
            "SELECT group_id, event_id FROM hmis_published_events ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        left,
        [
            ("g1".to_string(), "e-2".to_string()),
            ("g2".into(), "e-1".into())
        ]
    );
    db.drop().await;
}
