//! What leaves the dataflow: relational rows, derived events and dead letters.
//!
//! The dataflow produces *collections*; the runtime gathers their changes per
//! pipeline-clock interval into a [`FlushBatch`], which the sink applies in one
//! PostgreSQL transaction together with the input offsets that caused it.
//!
//! ```text
//!   rules ──(row, time, ±1)──┐
//!   rules ──(event, time, +1)┼──► gather (worker 0) ──► FlushBatch ──► PG txn ──► outbox ──► Kafka
//!   decode ─(dead letter)────┤
//!   source ─(offset mark)────┘
//! ```
//!
//! Times are milliseconds since the Unix epoch (the pipeline clock, contract §8).

use serde::{Deserialize, Serialize};

/// Pipeline-clock instant, milliseconds since the Unix epoch.
pub type Millis = u64;

/// A row of `workflow_instances`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WorkflowRow {
    pub workflow_instance_id: String,
    pub patient_id: Option<String>,
    pub template_id: String,
    pub template_version: i64,
    pub template_name: Option<String>,
    /// ACTIVE, COMPLETED or FAILED.
    pub status: String,
    pub progress_percentage: i32,
    pub is_escalated: bool,
    pub escalation_level: i32,
    pub escalation_reason: Option<String>,
    pub started_at: Option<Millis>,
    pub completed_at: Option<Millis>,
}

/// A row of `task_instances`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TaskRow {
    pub task_instance_id: String,
    pub workflow_instance_id: String,
    pub patient_id: Option<String>,
    pub task_def_id: String,
    pub task_name: Option<String>,
    /// PENDING, IN_PROGRESS, COMPLETED or FAILED.
    pub status: String,
    pub attempt: i32,
    pub due_at: Option<Millis>,
    pub sla_breached: bool,
    pub is_escalated: bool,
    pub escalated_to: Option<String>,
    pub created_at: Option<Millis>,
    pub started_at: Option<Millis>,
    pub completed_at: Option<Millis>,
    pub error_message: Option<String>,
}

/// A row of `task_readiness`: one per ready (workflow instance, task definition).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ReadinessRow {
    pub workflow_instance_id: String,
    pub task_def_id: String,
    pub patient_id: Option<String>,
    pub template_id: String,
    pub template_version: i64,
    pub task_name: Option<String>,
    pub automatic: bool,
    /// Attempt the executor should create next (1, or the retry's attempt).
    pub next_attempt: i32,
}

/// One change to a relational table, keyed by the table's primary key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Row {
    Workflow(WorkflowRow),
    Task(TaskRow),
    Readiness(ReadinessRow),
}

impl Row {
    /// The primary key of the row within its table, used to collapse many changes to one upsert.
    pub fn key(&self) -> (u8, String, String) {
        match self {
            Row::Workflow(w) => (0, w.workflow_instance_id.clone(), String::new()),
            Row::Task(t) => (1, t.task_instance_id.clone(), String::new()),
            Row::Readiness(r) => (2, r.workflow_instance_id.clone(), r.task_def_id.clone()),
        }
    }
}

/// The output topics hmis-flow writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum OutTopic {
    /// `workflow-derived-events`, keyed by workflowInstanceId.
    Derived,
    /// `system-alerts`, keyed by source.
    Alerts,
    /// `workflow-dead-letter`, keyed by the input's key.
    DeadLetter,
}

/// A record to publish: already serialized, so the sink only moves bytes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OutRecord {
    pub topic: OutTopic,
    /// Deterministic id (UUID v5 of what caused it); the outbox deduplicates on it.
    pub event_id: String,
    pub event_type: String,
    pub key: Option<String>,
    /// The JSON document.
    pub payload: String,
}

/// Why an input record was rejected (contract §7).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum RejectReason {
    InvalidJson,
    SchemaViolation,
    UnknownEventType,
    InvalidDefinition,
    UnknownTemplate,
    UnknownWorkflow,
    InvalidTransition,
    UnauthorizedActor,
}

impl RejectReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            RejectReason::InvalidJson => "INVALID_JSON",
            RejectReason::SchemaViolation => "SCHEMA_VIOLATION",
            RejectReason::UnknownEventType => "UNKNOWN_EVENT_TYPE",
            RejectReason::InvalidDefinition => "INVALID_DEFINITION",
            RejectReason::UnknownTemplate => "UNKNOWN_TEMPLATE",
            RejectReason::UnknownWorkflow => "UNKNOWN_WORKFLOW",
            RejectReason::InvalidTransition => "INVALID_TRANSITION",
            RejectReason::UnauthorizedActor => "UNAUTHORIZED_ACTOR",
        }
    }
}

/// A rejected input record, with everything needed to replay it by hand.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DeadLetter {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    /// The payload as text when it is UTF-8, else base64 (see `payload_encoding`).
    pub payload: String,
    /// `utf8` or `base64`.
    pub payload_encoding: String,
    pub reason: RejectReason,
    pub detail: String,
    /// Pipeline clock when rejected.
    pub rejected_at: Millis,
}

/// Input position after a record: consumption resumes at `next_offset`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OffsetMark {
    pub topic: String,
    pub partition: i32,
    pub next_offset: i64,
}

/// Everything the pipeline produced for pipeline times `< frontier`, applied atomically.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlushBatch {
    /// Exclusive upper bound of the pipeline times this batch completes.
    pub frontier: Millis,
    /// Final state of every row touched in the batch; `None` deletes the row.
    pub rows: Vec<((u8, String, String), Option<Row>)>,
    /// Derived events, alerts and dead-letter documents to publish, in production order.
    pub records: Vec<OutRecord>,
    /// Dead letters for the `dead_letters` table.
    pub dead_letters: Vec<DeadLetter>,
    /// Highest position per input partition covered by this batch.
    pub offsets: Vec<OffsetMark>,
}
