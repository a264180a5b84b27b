//! Shared helpers for the sink tests: a private PostgreSQL schema per test.
#![allow(dead_code)] // each test binary uses a different subset

use hmis_dataflows::model::{TaskStatus, WfStatus};
use hmis_dataflows::output::{
    DeadLetter, FlushBatch, OffsetMark, OutRecord, OutTopic, ReadinessRow, RejectReason, Row,
    TaskRow, WorkflowRow,
};
use hmis_sinks::PgSink;
use tokio_postgres::{Client, NoTls};

/// A schema of its own on the server named by `HMIS_TEST_DATABASE_URL`.
pub struct TestDb {
    pub url: String,
    pub schema: String,
}

impl TestDb {
    /// Panics when no test database is configured: a test that cannot reach PostgreSQL
    /// fails, it does not pass silently (`scripts/test.sh` starts the services and sets it).
    pub async fn new() -> TestDb {
        let url = std::env::var("HMIS_TEST_DATABASE_URL")
            .ok()
            .filter(|url| !url.is_empty())
            .expect(
                "HMIS_TEST_DATABASE_URL is not set: start the services with `scripts/services.sh start` \
                 and `eval \"$(scripts/services.sh env)\"`, or run scripts/test.sh",
            );
        let schema = format!("test_{}", uuid::Uuid::new_v4().simple());
        let db = TestDb { url, schema };
        let admin = db.raw_client().await;
        admin
            .batch_execute(&format!("CREATE SCHEMA {}", db.schema))
            .await
            .expect("create test schema");
        db
    }

    async fn raw_client(&self) -> Client {
        let (client, connection) = tokio_postgres::connect(&self.url, NoTls)
            .await
            .expect("connect to HMIS_TEST_DATABASE_URL");
        tokio::spawn(async move {
            let _ = connection.await;
        });
        client
    }

    /// A connection whose objects live in the test's schema.
    pub async fn client(&self) -> Client {
        let client = self.raw_client().await;
        client
            .batch_execute(&format!("SET search_path TO {}", self.schema))
            .await
            .expect("set search_path");
        client
    }

    /// A sink on a connection of its own.
    pub async fn sink(&self) -> PgSink {
        PgSink::from_client(self.client().await)
    }

    /// A migrated schema and a sink that claimed `group`.
    pub async fn claimed_sink(&self, group: &str) -> PgSink {
        let mut sink = self.sink().await;
        sink.migrate().await.expect("migrate");
        sink.claim(group, "test").await.expect("claim");
        sink
    }

    /// Removes the schema (kept when a test fails before, for inspection).
    pub async fn drop(self) {
        self.raw_client()
            .await
            .batch_execute(&format!("DROP SCHEMA {} CASCADE", self.schema))
            .await
            .expect("drop test schema");
    }
}

pub const T0: u64 = 1_764_152_100_000; // 2025-11-26T10:15:00Z

pub fn workflow(id: &str, progress: i32) -> Row {
    Row::Workflow(WorkflowRow {
        workflow_instance_id: id.into(),
        patient_id: Some("patient-1".into()),
        template_id: "sepsis-bundle".into(),
        template_version: 3,
        template_name: Some("Sepsis Bundle".into()),
        status: WfStatus::Active,
        progress_percentage: progress,
        is_escalated: false,
        escalation_level: 0,
        escalation_reason: None,
        started_at: Some(T0),
        completed_at: None,
    })
}

pub fn task(id: &str, workflow: &str, status: TaskStatus) -> Row {
    Row::Task(TaskRow {
        task_instance_id: id.into(),
        workflow_instance_id: workflow.into(),
        patient_id: Some("patient-1".into()),
        task_def_id: format!("def-{id}").into(),
        task_name: Some("Triage".into()),
        status,
        attempt: 1,
        due_at: Some(T0 + 15 * 60_000),
        sla_breached: false,
        is_escalated: false,
        escalated_to: None,
        created_at: Some(T0),
        started_at: None,
        completed_at: None,
        error_message: None,
    })
}

pub fn ready(workflow: &str, def: &str) -> Row {
    Row::Readiness(ReadinessRow {
        workflow_instance_id: workflow.into(),
        task_def_id: def.into(),
        patient_id: Some("patient-1".into()),
        template_id: "sepsis-bundle".into(),
        template_version: 3,
        task_name: Some(def.to_uppercase().into()),
        automatic: false,
        next_attempt: 1,
    })
}

/// A batch entry that upserts `row`.
pub fn upsert(
    row: Row,
) -> (
    (u8, hmis_dataflows::model::Str, hmis_dataflows::model::Str),
    Option<Row>,
) {
    (row.key(), Some(row))
}

/// A batch entry that deletes the row with the same key as `row`.
pub fn delete(
    row: Row,
) -> (
    (u8, hmis_dataflows::model::Str, hmis_dataflows::model::Str),
    Option<Row>,
) {
    (row.key(), None)
}

pub fn record(topic: OutTopic, event_id: &str, key: Option<&str>) -> OutRecord {
    OutRecord {
        topic,
        event_id: event_id.into(),
        event_type: "WORKFLOW_PROGRESS".into(),
        key: key.map(Into::into),
        payload: format!(r#"{{"eventId":"{event_id}"}}"#),
    }
}

pub fn dead_letter(partition: i32, offset: i64) -> DeadLetter {
    DeadLetter {
        topic: "workflow-task-events".into(),
        partition,
        offset,
        key: Some("task-9".into()),
        key_encoding: "utf8".into(),
        payload: "{not json".into(),
        payload_encoding: "utf8".into(),
        reason: RejectReason::InvalidJson,
        detail: "expected value at line 1 column 2".into(),
        rejected_at: T0 + 5,
    }
}

pub fn offset(topic: &str, partition: i32, next_offset: i64) -> OffsetMark {
    OffsetMark {
        topic: topic.into(),
        partition,
        next_offset,
    }
}

pub fn batch(frontier: u64) -> FlushBatch {
    FlushBatch {
        frontier,
        ..FlushBatch::default()
    }
}
