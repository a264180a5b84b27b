//! Least privilege (migration 0006) against a real PostgreSQL (`HMIS_TEST_DATABASE_URL`):
//! the pipeline role writes what the sink writes and nothing else, owns nothing, and cannot
//! change or unprotect the audit log; the reporting role logs in, reads, and cannot write.
//!
//! Roles are cluster-wide: the tests log in as a login role made for the test and member of
//! `hmis_pipeline` (then `SET ROLE hmis_pipeline`, so every check is the role's own), and as
//! `hmis_reporting` itself. The shared test server trusts loopback connections; where it
//! asks for a password, the test gives the role one.

mod common;

use hmis_dataflows::model::{OrderStatus, TaskStatus};

use std::collections::BTreeMap;

use common::*;
use hmis_dataflows::output::{
    AlertRow, AuditRow, CompensationRow, ComponentHealthRow, ErrorReportRow, OrderRow,
    OrderTransitionRow, OutTopic, Row, SlaBreachRow,
};
use hmis_sinks::{migrate, PgSink};
use tokio_postgres::{Client, NoTls};

/// A connection to the test server as `user` (with `password` if given), in `schema`.
async fn connect_as(
    db: &TestDb,
    user: &str,
    password: Option<&str>,
) -> Result<Client, tokio_postgres::Error> {
    let mut config: tokio_postgres::Config = db.url.parse().expect("HMIS_TEST_DATABASE_URL");
    config.user(user);
    if let Some(p) = password {
        config.password(p);
    }
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
        .batch_execute(&format!("SET search_path TO {}", db.schema))
        .await?;
    Ok(client)
}

/// Logs in as `role`; when the server wants a password, gives the role a random one first.
async fn log_in(db: &TestDb, admin: &Client, role: &str) -> Client {
    match connect_as(db, role, None).await {
        Ok(c) => c,
        Err(first) => {
            let password = uuid::Uuid::new_v4().simple().to_string();
            admin
                .batch_execute(&format!("ALTER ROLE {role} PASSWORD '{password}'"))
                .await
                .expect("set a password");
            connect_as(db, role, Some(&password))
                .await
                .unwrap_or_else(|e| panic!("log in as {role}: {e} (without a password: {first})"))
        }
    }
}

/// Runs `sql` and returns the SQLSTATE it failed with (panics if it succeeded).
async fn refused(client: &Client, sql: &str) -> String {
    match client.batch_execute(sql).await {
        Ok(()) => panic!("allowed: {sql}"),
        Err(e) => e
            .as_db_error()
            .map(|d| d.code().code().to_string())
            .unwrap_or_else(|| panic!("{sql}: {e}")),
    }
}

async fn count(client: &Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

fn order_row(id: &str, status: &str) -> Row {
    Row::Order(OrderRow {
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
        appointment_id: None,
        cancel_reason: None,
        is_overdue: false,
        created_at: Some(T0),
        authorized_at: None,
        activated_at: None,
        started_at: None,
        resulted_at: None,
        verified_at: None,
        closed_at: None,
        cancelled_at: None,
    })
}

fn transition_row(event_id: &str) -> Row {
    Row::OrderTransition(OrderTransitionRow {
        event_id: event_id.into(),
        order_id: "o-1".into(),
        workflow_instance_id: Some("wf-1".into()),
        event_type: "ORDER_CREATED".into(),
        from_status: None,
        to_status: Some(OrderStatus::Proposed),
        actor: Some("dr.a".into()),
        actor_role: Some("PHYSICIAN".into()),
        accepted: true,
        reject_reason: None,
        event_time: T0,
        source_partition: 2,
        source_offset: 41,
    })
}

fn compensation_row(action_type: &str) -> Row {
    Row::Compensation(CompensationRow {
        action_id: format!("act-{action_type}").into(),
        order_id: "o-1".into(),
        workflow_instance_id: Some("wf-1".into()),
        patient_id: Some("patient-1".into()),
        action_type: action_type.into(),
        amount: None,
        appointment_id: None,
        status: "PENDING".into(),
        reason: Some("ordered in error".into()),
        cause_event_id: Some("ev-cancel".into()),
        requested_at: T0 + 3_000,
        completed_at: None,
    })
}

fn breach_row(task: &str) -> Row {
    Row::SlaBreach(SlaBreachRow {
        task_instance_id: task.into(),
        attempt: 1,
        workflow_instance_id: "wf-1".into(),
        patient_id: Some("patient-1".into()),
        template_id: Some("sepsis-bundle".into()),
        template_version: Some(3),
        task_def_id: "triage".into(),
        due_at: T0 + 15 * 60_000,
        breached_at: T0 + 15 * 60_000 + 1,
        minutes_overdue: 0,
        escalated_to: Some("CHARGE_NURSE".into()),
        event_id: Some(format!("breach-{task}").into()),
    })
}

fn alert_row(id: &str) -> Row {
    Row::Alert(AlertRow {
        alert_id: id.into(),
        severity: "HIGH".into(),
        source: "db".into(),
        kind: "COMPONENT_UNHEALTHY".into(),
        message: "component db is UNHEALTHY (was UP)".into(),
        raised_at: T0 + 4_000,
        cause_event_id: Some("ev-health".into()),
        component: Some("db".into()),
        workflow_instance_id: None,
        task_instance_id: None,
        order_id: None,
        details: Some(r#"{"previousStatus":"UP"}"#.into()),
    })
}

fn system_rows() -> Vec<Row> {
    vec![
        Row::ComponentHealth(ComponentHealthRow {
            component: "db".into(),
            status: "UNHEALTHY".into(),
            last_check_at: T0 + 2_000,
            status_since: T0 + 2_000,
        }),
        Row::ErrorReport(ErrorReportRow {
            event_id: "er-1".into(),
            component: "db".into(),
            severity: "MEDIUM".into(),
            message: "query failed".into(),
            event_time: T0 + 1_000,
            source_topic: "system-events".into(),
            source_partition: 1,
            source_offset: 7,
        }),
        Row::Audit(AuditRow {
            event_id: "au-1".into(),
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
        }),
    ]
}

/// A login role of its own for one test, member of `hmis_pipeline` (as an administrator
/// would set up `hmis-flow run`'s account); dropped by [`drop_role`].
async fn pipeline_login(admin: &Client) -> String {
    let name = format!(
        "hmis_pipeline_test_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    admin
        .batch_execute(&format!("CREATE ROLE {name} LOGIN IN ROLE hmis_pipeline"))
        .await
        .expect("create a login role in hmis_pipeline");
    name
}

async fn drop_role(admin: &Client, name: &str) {
    // The role's sessions may still be closing.
    for _ in 0..50 {
        if admin
            .batch_execute(&format!("DROP ROLE IF EXISTS {name}"))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("could not drop role {name}");
}

#[tokio::test]
async fn the_pipeline_role_flushes_and_cannot_touch_the_audit_log() {
    let db = TestDb::new().await;
    let mut admin = db.client().await;
    migrate(&mut admin).await.unwrap();
    let login = pipeline_login(&admin).await;
    let client = log_in(&db, &admin, &login).await;
    client
        .batch_execute("SET ROLE hmis_pipeline")
        .await
        .unwrap();
    let who: String = client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(who, "hmis_pipeline");

    // What `hmis-flow run` does as this role: check the migrations, claim, restore, flush.
    let mut sink = PgSink::from_client(client);
    assert!(sink.migrate().await.unwrap().is_empty(), "nothing to apply");
    sink.claim("g1", "test").await.unwrap();
    sink.load_progress("g1").await.unwrap();
    let mut first = batch(T0 + 1_000);
    first.rows = [
        workflow("wf-1", 0),
        task("t-1", "wf-1", TaskStatus::Pending),
        ready("wf-1", "triage"),
        order_row("o-1", "PROPOSED"),
        transition_row("ev-o1"),
        compensation_row("SEND_NOTIFICATION"),
        breach_row("t-1"),
        alert_row("al-1"),
    ]
    .into_iter()
    .chain(system_rows())
    .map(upsert)
    .collect();
    first.records = vec![
        record(OutTopic::Derived, "e-1", Some("wf-1")),
        record(OutTopic::Alerts, "al-1", Some("db")),
        dead_letter(3, 17).to_record(),
    ];
    first.dead_letters = vec![dead_letter(3, 17)];
    first.offsets = vec![offset("workflow-task-events", 3, 18)];
    sink.apply("g1", &first).await.unwrap();

    // Upserts again, every deletable row deleted, the facts written again (no change).
    let mut second = batch(T0 + 2_000);
    second.rows = vec![
        upsert(workflow("wf-1", 50)),
        upsert(task("t-1", "wf-1", TaskStatus::Completed)),
        delete(ready("wf-1", "triage")),
        upsert(order_row("o-1", "CANCELLED")),
        upsert(transition_row("ev-o1")),
        upsert(compensation_row("SEND_NOTIFICATION")),
        upsert(breach_row("t-1")),
        upsert(alert_row("al-1")),
    ];
    second.rows.extend(system_rows().into_iter().map(upsert));
    second.offsets = vec![offset("workflow-task-events", 3, 19)];
    sink.apply("g1", &second).await.unwrap();
    let mut third = batch(T0 + 3_000);
    third.rows = [
        workflow("wf-1", 50),
        task("t-1", "wf-1", TaskStatus::Completed),
        order_row("o-1", "CANCELLED"),
        transition_row("ev-o1"),
        compensation_row("SEND_NOTIFICATION"),
        breach_row("t-1"),
        alert_row("al-1"),
    ]
    .into_iter()
    .map(delete)
    .collect();
    sink.apply("g1", &third).await.unwrap();

    // A row PostgreSQL refuses (NUL in text): the savepoint path dead-letters it as this role.
    let mut fourth = batch(T0 + 4_000);
    let mut bad = task("t-nul", "wf-2", TaskStatus::Pending);
    if let Row::Task(t) = &mut bad {
        t.task_name = Some("a\u{0}b".into());
    }
    fourth.rows = vec![upsert(workflow("wf-2", 0)), upsert(bad)];
    sink.apply("g1", &fourth).await.unwrap();
    let progress = sink.load_progress("g1").await.unwrap();
    assert_eq!(progress.frontier_ms, Some(T0 + 4_000));

    // What the outbox publisher runs as this role (outbox.rs), and the ledger's pruning.
    let c = sink.client();
    c.batch_execute(
        "BEGIN;
         SELECT epoch FROM hmis_pipeline_progress WHERE group_id = 'g1' FOR SHARE;
         SELECT seq, topic, key, event_id, payload FROM hmis_outbox WHERE group_id = 'g1';
         DELETE FROM hmis_outbox WHERE group_id = 'g1' AND seq = ANY(ARRAY[1, 2]::int8[]);
         DELETE FROM hmis_published_events WHERE group_id = 'g1' AND first_at < now() - interval '7 days';
         COMMIT",
    )
    .await
    .unwrap();

    // Written as the role: seen by the administrator.
    for (sql, want) in [
        ("SELECT count(*) FROM workflow_instances", 1),
        ("SELECT count(*) FROM task_instances", 0),
        ("SELECT count(*) FROM orders", 0),
        ("SELECT count(*) FROM component_health", 1),
        ("SELECT count(*) FROM error_reports", 1),
        ("SELECT count(*) FROM audit_log", 1),
        (
            "SELECT count(*) FROM dead_letters WHERE topic = 'hmis-flow.task_instances'",
            1,
        ),
        ("SELECT count(*) FROM dead_letters", 2),
        ("SELECT count(*) FROM hmis_input_offsets", 1),
    ] {
        assert_eq!(count(&admin, sql).await, want, "{sql}");
    }

    // The audit log: neither changed nor unprotected, not even read.
    for sql in [
        "UPDATE audit_log SET actor = 'someone else'",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
        "SELECT * FROM audit_log",
        "ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_update_delete",
        "ALTER TABLE audit_log DISABLE TRIGGER ALL",
        "DROP TRIGGER audit_log_no_truncate ON audit_log",
        "ALTER TABLE audit_log ADD COLUMN note text",
        "ALTER TABLE audit_log OWNER TO hmis_pipeline",
        "DROP TABLE audit_log",
        "SET session_replication_role = replica",
        "CREATE OR REPLACE FUNCTION hmis_audit_log_immutable() RETURNS trigger \
         LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$",
    ] {
        assert_eq!(refused(c, sql).await, "42501", "{sql}");
    }
    // Nor any other table's shape or contents beyond its grants.
    for sql in [
        "TRUNCATE workflow_instances",
        "ALTER TABLE workflow_instances ADD COLUMN note text",
        "CREATE TABLE mine (x int)",
        "UPDATE error_reports SET message = 'x'",
        "DELETE FROM dead_letters",
        "UPDATE hmis_schema_migrations SET checksum = 'x'",
        "SELECT * FROM report_workflow_progress",
    ] {
        assert_eq!(refused(c, sql).await, "42501", "{sql}");
    }
    assert_eq!(count(&admin, "SELECT count(*) FROM audit_log").await, 1);

    // It owns nothing, anywhere in the database; nor does the login role.
    for role in ["hmis_pipeline", login.as_str()] {
        let owned = count(
            &admin,
            &format!(
                "SELECT (SELECT count(*) FROM pg_class WHERE relowner = '{role}'::regrole)
                      + (SELECT count(*) FROM pg_namespace WHERE nspowner = '{role}'::regrole)
                      + (SELECT count(*) FROM pg_proc WHERE proowner = '{role}'::regrole)
                      + (SELECT count(*) FROM pg_type WHERE typowner = '{role}'::regrole)"
            ),
        )
        .await;
        assert_eq!(owned, 0, "{role} owns objects");
    }
    drop(sink);
    drop_role(&admin, &login).await;
    db.drop().await;
}

/// Every table has a decision about the pipeline role, and that decision is the least the
/// sink needs. A new table without grants fails here (it would fail in production only).
#[tokio::test]
async fn the_pipeline_role_has_exactly_the_privileges_the_sink_needs() {
    let db = TestDb::new().await;
    let mut admin = db.client().await;
    migrate(&mut admin).await.unwrap();
    let rows = admin
        .query(
            "SELECT c.relname::text, c.relkind::text,
                    array_to_string(ARRAY(
                        SELECT p FROM unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE',
                                                   'TRUNCATE', 'REFERENCES', 'TRIGGER']) p
                        WHERE has_table_privilege('hmis_pipeline', c.oid, p)), ' ')
             FROM pg_class c
             WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind IN ('r', 'v')
             ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    let got: BTreeMap<String, String> = rows
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, String>(2)))
        .collect();
    let all = "SELECT INSERT UPDATE DELETE";
    let upsert = "SELECT INSERT UPDATE";
    let append = "SELECT INSERT";
    let mut want: BTreeMap<String, String> = [
        ("workflow_instances", all),
        ("task_instances", all),
        ("task_readiness", all),
        ("orders", all),
        ("order_transitions", all),
        ("compensation_actions", all),
        ("sla_breaches", all),
        ("alerts", all),
        ("component_health", upsert),
        ("analytics_windows", upsert),
        ("hmis_input_offsets", upsert),
        ("hmis_pipeline_progress", upsert),
        ("error_reports", append),
        ("dead_letters", append),
        ("audit_log", "INSERT"),
        ("hmis_outbox", "SELECT INSERT DELETE"),
        ("hmis_published_events", "SELECT INSERT DELETE"),
        ("hmis_schema_migrations", "SELECT"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    // The reporting views are not the pipeline's.
    for r in rows.iter().filter(|r| r.get::<_, String>(1) == "v") {
        want.insert(r.get(0), String::new());
    }
    assert_eq!(got, want);
    let schema = count(
        &admin,
        "SELECT (has_schema_privilege('hmis_pipeline', current_schema(), 'USAGE'))::int::int8
              + 2 * (has_schema_privilege('hmis_pipeline', current_schema(), 'CREATE'))::int::int8",
    )
    .await;
    assert_eq!(schema, 1, "USAGE on the schema, no CREATE");
    // Of the audit log it reads only the column its idempotent insert checks.
    let audit_columns: Vec<String> = admin
        .query(
            "SELECT attname::text FROM pg_attribute
             WHERE attrelid = 'audit_log'::regclass AND attnum > 0 AND NOT attisdropped
               AND has_column_privilege('hmis_pipeline', attrelid, attnum, 'SELECT')",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(audit_columns, ["event_id"]);
    db.drop().await;
}

#[tokio::test]
async fn the_pipeline_role_cannot_migrate_a_new_schema() {
    // Another schema's migration makes sure the (cluster-wide) role exists.
    let other = TestDb::new().await;
    migrate(&mut other.client().await).await.unwrap();
    other.drop().await;
    let db = TestDb::new().await;
    let admin = db.client().await;
    // A schema the pipeline may use but not create in: the administrator has not migrated it.
    admin
        .batch_execute(&format!(
            "GRANT USAGE ON SCHEMA {} TO hmis_pipeline",
            db.schema
        ))
        .await
        .unwrap();
    let login = pipeline_login(&admin).await;
    let mut client = log_in(&db, &admin, &login).await;
    let err = migrate(&mut client).await.unwrap_err().to_string();
    assert!(
        err.contains("run `hmis-flow migrate` as the administrator"),
        "{err}"
    );
    drop(client);
    drop_role(&admin, &login).await;
    db.drop().await;
}

#[tokio::test]
async fn the_reporting_role_logs_in_reads_and_cannot_write() {
    let db = TestDb::new().await;
    let admin = db.client().await;
    let mut sink = db.claimed_sink("r").await;
    let mut b = batch(T0 + 1_000);
    b.rows = vec![upsert(workflow("wf-1", 40)), upsert(workflow("wf-2", 100))];
    sink.apply("r", &b).await.unwrap();

    let reporting = log_in(&db, &admin, "hmis_reporting").await;
    let rows = reporting
        .query(
            "SELECT progress_from::int4, workflows::int8 FROM report_workflow_progress
             ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(i32, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(got, [(40, 1), (100, 1)]);
    assert_eq!(
        count(&reporting, "SELECT count(*) FROM workflow_instances").await,
        2
    );

    // Read-only transactions by default, and no write privilege behind them either.
    assert_eq!(
        refused(&reporting, "DELETE FROM workflow_instances").await,
        "25006"
    );
    for sql in [
        "INSERT INTO workflow_instances (workflow_instance_id, template_id, template_version, \
         status) VALUES ('x', 't', 1, 'ACTIVE')",
        "UPDATE workflow_instances SET progress_percentage = 0",
        "DELETE FROM workflow_instances",
        "TRUNCATE audit_log",
        "CREATE TABLE mine (x int)",
    ] {
        assert_eq!(
            refused(&reporting, &format!("BEGIN READ WRITE; {sql}; COMMIT")).await,
            "42501",
            "{sql}"
        );
        reporting.batch_execute("ROLLBACK").await.unwrap();
    }
    assert_eq!(
        count(&admin, "SELECT count(*) FROM workflow_instances").await,
        2
    );
    db.drop().await;
}
