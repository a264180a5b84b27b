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

use crate::model::{OrderStatus, Str, TaskStatus, WfStatus};
use serde::{Deserialize, Serialize};

/// Pipeline-clock instant, milliseconds since the Unix epoch.
pub type Millis = u64;

/// A row of `workflow_instances`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WorkflowRow {
    pub workflow_instance_id: Str,
    pub patient_id: Option<Str>,
    pub template_id: Str,
    pub template_version: i64,
    pub template_name: Option<Str>,
    /// ACTIVE, COMPLETED or FAILED.
    pub status: WfStatus,
    pub progress_percentage: i32,
    pub is_escalated: bool,
    pub escalation_level: i32,
    pub escalation_reason: Option<Str>,
    pub started_at: Option<Millis>,
    pub completed_at: Option<Millis>,
}

/// A row of `task_instances`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TaskRow {
    pub task_instance_id: Str,
    pub workflow_instance_id: Str,
    pub patient_id: Option<Str>,
    pub task_def_id: Str,
    pub task_name: Option<Str>,
    /// PENDING, IN_PROGRESS, COMPLETED or FAILED.
    pub status: TaskStatus,
    pub attempt: i32,
    pub due_at: Option<Millis>,
    pub sla_breached: bool,
    pub is_escalated: bool,
    pub escalated_to: Option<Str>,
    pub created_at: Option<Millis>,
    pub started_at: Option<Millis>,
    pub completed_at: Option<Millis>,
    pub error_message: Option<Str>,
}

/// A row of `task_readiness`: one per ready (workflow instance, task definition).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ReadinessRow {
    pub workflow_instance_id: Str,
    pub task_def_id: Str,
    pub patient_id: Option<Str>,
    pub template_id: Str,
    pub template_version: i64,
    pub task_name: Option<Str>,
    pub automatic: bool,
    /// Attempt the executor should create next (1, or the retry's attempt).
    pub next_attempt: i32,
}

/// A row of `orders`: the current state of an order.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OrderRow {
    pub order_id: Str,
    pub workflow_instance_id: Option<Str>,
    pub patient_id: Option<Str>,
    pub order_type: Str,
    pub order_status: OrderStatus,
    pub actor: Option<Str>,
    pub actor_role: Option<Str>,
    /// Decimal text as sent (`metadata.cost`).
    pub cost: Option<Str>,
    pub department: Option<Str>,
    pub critical: bool,
    pub appointment_id: Option<Str>,
    pub cancel_reason: Option<Str>,
    pub is_overdue: bool,
    pub created_at: Option<Millis>,
    pub authorized_at: Option<Millis>,
    pub activated_at: Option<Millis>,
    pub started_at: Option<Millis>,
    pub resulted_at: Option<Millis>,
    pub verified_at: Option<Millis>,
    pub closed_at: Option<Millis>,
    pub cancelled_at: Option<Millis>,
}

/// A row of `order_transitions`: one per order event, accepted or rejected.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OrderTransitionRow {
    pub event_id: Str,
    pub order_id: Str,
    pub workflow_instance_id: Option<Str>,
    pub event_type: Str,
    pub from_status: Option<OrderStatus>,
    pub to_status: Option<OrderStatus>,
    pub actor: Option<Str>,
    pub actor_role: Option<Str>,
    pub accepted: bool,
    pub reject_reason: Option<Str>,
    pub event_time: Millis,
    pub source_partition: i32,
    pub source_offset: i64,
}

/// A row of `compensation_actions`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CompensationRow {
    /// UUID v5 of `hmis-flow:compensation:<orderId>:<actionType>` (URL namespace).
    pub action_id: Str,
    pub order_id: Str,
    pub workflow_instance_id: Option<Str>,
    pub patient_id: Option<Str>,
    /// SEND_NOTIFICATION, REVERSE_CHARGE, CANCEL_ORDER, RELEASE_RESOURCE, CANCEL_APPOINTMENT.
    pub action_type: Str,
    pub amount: Option<Str>,
    pub appointment_id: Option<Str>,
    /// PENDING or COMPLETED.
    pub status: Str,
    pub reason: Option<Str>,
    pub cause_event_id: Option<Str>,
    pub requested_at: Millis,
    pub completed_at: Option<Millis>,
}

/// A row of `sla_breaches`: one per breached (task, attempt).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SlaBreachRow {
    pub task_instance_id: Str,
    pub attempt: i32,
    pub workflow_instance_id: Str,
    pub patient_id: Option<Str>,
    pub template_id: Option<Str>,
    pub template_version: Option<i64>,
    pub task_def_id: Str,
    pub due_at: Millis,
    pub breached_at: Millis,
    pub minutes_overdue: i64,
    pub escalated_to: Option<Str>,
    pub event_id: Option<Str>,
}

/// A row of `alerts` (the same alert is published on `system-alerts`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AlertRow {
    pub alert_id: String,
    /// CRITICAL, HIGH, MEDIUM or LOW.
    pub severity: String,
    pub source: String,
    pub kind: String,
    pub message: String,
    pub raised_at: Millis,
    pub cause_event_id: Option<String>,
    pub component: Option<String>,
    pub workflow_instance_id: Option<String>,
    pub task_instance_id: Option<String>,
    pub order_id: Option<String>,
    /// JSON text.
    pub details: Option<String>,
}

/// A row of `component_health`: a component's current health (contract §6). The error
/// columns of that table are the sink's (counted from [`ErrorReportRow`]s as they are
/// inserted), not this row's.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ComponentHealthRow {
    pub component: String,
    /// UP, DEGRADED or UNHEALTHY.
    pub status: String,
    /// eventTime of the latest HEALTH_CHECK.
    pub last_check_at: Millis,
    /// eventTime of the check that changed the status to what it is.
    pub status_since: Millis,
}

/// A row of `audit_log` (append-only): one AUDIT_EVENT.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AuditRow {
    pub event_id: String,
    pub component: String,
    pub actor: String,
    pub action: String,
    pub entity_type: String,
    pub entity_id: String,
    /// JSON text.
    pub details: Option<String>,
    pub event_time: Millis,
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
}

/// A row of `error_reports` (append-only): one ERROR_REPORT, whatever its severity.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ErrorReportRow {
    pub event_id: String,
    pub component: String,
    /// CRITICAL, HIGH, MEDIUM or LOW.
    pub severity: String,
    pub message: String,
    pub event_time: Millis,
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
}

impl ErrorReportRow {
    /// A MEDIUM or LOW report: no alert, counted and logged only (contract §6).
    pub fn is_quiet(&self) -> bool {
        crate::events::Severity::parse(&self.severity).is_some_and(|s| !s.raises_alert())
    }
}

/// One change to a relational table, keyed by the table's primary key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Row {
    Workflow(WorkflowRow),
    Task(TaskRow),
    Readiness(ReadinessRow),
    Order(OrderRow),
    OrderTransition(OrderTransitionRow),
    Compensation(CompensationRow),
    SlaBreach(SlaBreachRow),
    Alert(AlertRow),
    ComponentHealth(ComponentHealthRow),
    Audit(AuditRow),
    ErrorReport(ErrorReportRow),
}

impl Row {
    /// The primary key of the row within its table, used to collapse many changes to one upsert.
    pub fn key(&self) -> (u8, Str, Str) {
        let none = Str::default;
        match self {
            Row::Workflow(w) => (0, w.workflow_instance_id.clone(), none()),
            Row::Task(t) => (1, t.task_instance_id.clone(), none()),
            Row::Readiness(r) => (2, r.workflow_instance_id.clone(), r.task_def_id.clone()),
            Row::Order(o) => (3, o.order_id.clone(), none()),
            Row::OrderTransition(t) => (4, t.event_id.clone(), none()),
            Row::Compensation(c) => (5, c.action_id.clone(), none()),
            Row::SlaBreach(b) => (6, b.task_instance_id.clone(), b.attempt.to_string().into()),
            Row::Alert(a) => (7, a.alert_id.as_str().into(), none()),
            Row::ComponentHealth(h) => (8, h.component.as_str().into(), none()),
            Row::Audit(a) => (9, a.event_id.as_str().into(), none()),
            Row::ErrorReport(e) => (10, e.event_id.as_str().into(), none()),
        }
    }

    /// Whether `self` and `other` have the same [`Row::key`], without building either key
    /// (a key clones its ids: an atomic increment on each id's text, per comparison).
    pub fn same_key(&self, other: &Row) -> bool {
        match (self, other) {
            (Row::Workflow(a), Row::Workflow(b)) => {
                a.workflow_instance_id == b.workflow_instance_id
            }
            (Row::Task(a), Row::Task(b)) => a.task_instance_id == b.task_instance_id,
            (Row::Readiness(a), Row::Readiness(b)) => {
                a.workflow_instance_id == b.workflow_instance_id && a.task_def_id == b.task_def_id
            }
            (Row::Order(a), Row::Order(b)) => a.order_id == b.order_id,
            (Row::OrderTransition(a), Row::OrderTransition(b)) => a.event_id == b.event_id,
            (Row::Compensation(a), Row::Compensation(b)) => a.action_id == b.action_id,
            (Row::SlaBreach(a), Row::SlaBreach(b)) => {
                a.task_instance_id == b.task_instance_id && a.attempt == b.attempt
            }
            (Row::Alert(a), Row::Alert(b)) => a.alert_id == b.alert_id,
            (Row::ComponentHealth(a), Row::ComponentHealth(b)) => a.component == b.component,
            (Row::Audit(a), Row::Audit(b)) => a.event_id == b.event_id,
            (Row::ErrorReport(a), Row::ErrorReport(b)) => a.event_id == b.event_id,
            _ => false,
        }
    }
}

/// The state a row belongs to: when that state is retired (its inputs retracted to bound
/// memory), the row's retraction means "forget", not "delete".
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Owner {
    Workflow(Str),
    Order(Str),
}

impl Row {
    /// An alert, an audit entry or an error report: a fact written once, by its first cause.
    /// The sink inserts these `ON CONFLICT DO NOTHING`; a later write of the same key (a
    /// duplicate input, a re-derivation) changes nothing.
    pub fn is_fact(&self) -> bool {
        matches!(self, Row::Alert(_) | Row::Audit(_) | Row::ErrorReport(_))
    }

    /// Whose state produced the row.
    pub fn owner(&self) -> Option<Owner> {
        Some(match self {
            Row::Workflow(w) => Owner::Workflow(w.workflow_instance_id.clone()),
            Row::Task(t) => Owner::Workflow(t.workflow_instance_id.clone()),
            Row::Readiness(r) => Owner::Workflow(r.workflow_instance_id.clone()),
            Row::SlaBreach(b) => Owner::Workflow(b.workflow_instance_id.clone()),
            Row::Order(o) => Owner::Order(o.order_id.clone()),
            Row::OrderTransition(t) => Owner::Order(t.order_id.clone()),
            Row::Compensation(c) => Owner::Order(c.order_id.clone()),
            Row::Alert(a) => match (&a.order_id, &a.workflow_instance_id) {
                (Some(o), _) => Owner::Order(o.as_str().into()),
                (None, Some(w)) => Owner::Workflow(w.as_str().into()),
                (None, None) => return None,
            },
            Row::ComponentHealth(_) | Row::Audit(_) | Row::ErrorReport(_) => return None,
        })
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

/// How a dead letter's key or payload is written as text (`dead_letters.key_encoding`,
/// `dead_letters.payload_encoding`, `keyEncoding` / `payloadEncoding` in the document).
pub mod encoding {
    /// The bytes are the text: valid UTF-8 without NUL characters (PostgreSQL's `text`
    /// cannot hold U+0000).
    pub const UTF8: &str = "utf8";
    /// Standard base64 of the bytes (not UTF-8, or holding a NUL).
    pub const BASE64: &str = "base64";
    /// The record had no value at all (a tombstone); the payload is empty.
    pub const NULL: &str = "null";
}

/// Most bytes of a dead letter's payload text kept in the table and the published document
/// (after base64 or JSON escaping): a dead letter must fit in one Kafka message under the
/// producer's default `message.max.bytes` (1,000,000) whatever the input was. A longer payload
/// is cut (at a character boundary) and the detail says so; the whole record stays readable at
/// its topic, partition and offset.
pub const DEAD_LETTER_PAYLOAD_MAX: usize = 256 * 1024;

/// Most bytes of a dead letter's `detail`: a reason quoting input (an unknown eventType, say)
/// stays short.
pub const DEAD_LETTER_DETAIL_MAX: usize = 2048;

/// Bytes as text for a dead letter: themselves when UTF-8 without NUL, else base64.
pub fn bytes_as_text(bytes: &[u8]) -> (String, &'static str) {
    match std::str::from_utf8(bytes) {
        Ok(s) if !s.contains('\0') => (s.to_string(), encoding::UTF8),
        _ => {
            use base64::Engine as _;
            (
                base64::engine::general_purpose::STANDARD.encode(bytes),
                encoding::BASE64,
            )
        }
    }
}

/// `text` cut so that its JSON string form is at most `max` bytes (whole characters);
/// `None` when it fits.
fn cut_for_json(text: &str, max: usize) -> Option<&str> {
    let mut len = 2; // the quotes
    for (i, c) in text.char_indices() {
        len += match c {
            '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
            c if (c as u32) < 0x20 => 6,
            c => c.len_utf8(),
        };
        if len > max {
            return Some(&text[..i]);
        }
    }
    None
}

/// `detail` as stored: NUL characters replaced (PostgreSQL's `text` cannot hold them) and at
/// most [`DEAD_LETTER_DETAIL_MAX`] bytes.
fn clean_detail(detail: String) -> String {
    let mut d = if detail.contains('\0') {
        detail.replace('\0', "\u{FFFD}")
    } else {
        detail
    };
    if d.len() > DEAD_LETTER_DETAIL_MAX {
        let mut end = DEAD_LETTER_DETAIL_MAX - 3;
        while !d.is_char_boundary(end) {
            end -= 1;
        }
        d.truncate(end);
        d.push('…');
    }
    d
}

/// A rejected input record, with everything needed to replay it by hand.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DeadLetter {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// The record's key as text (see `key_encoding`); `None`: the record had no key.
    pub key: Option<String>,
    /// `utf8` or `base64` ([`encoding`]).
    pub key_encoding: String,
    /// The payload as text when it is UTF-8, else base64 (see `payload_encoding`); at most
    /// [`DEAD_LETTER_PAYLOAD_MAX`] bytes once JSON-escaped (the detail says when it was cut).
    pub payload: String,
    /// `utf8`, `base64`, or `null` for a record without a value ([`encoding`]).
    pub payload_encoding: String,
    pub reason: RejectReason,
    pub detail: String,
    /// Pipeline clock when rejected.
    pub rejected_at: Millis,
}

impl DeadLetter {
    /// The dead letter of a record as the broker delivered it: any key (or none), any value
    /// (or none). Every shape of input gives a dead letter that PostgreSQL and Kafka accept.
    pub fn of_bytes(
        topic: &str,
        pos: crate::events::Pos,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        reason: RejectReason,
        detail: String,
        at: Millis,
    ) -> DeadLetter {
        let (key, key_encoding) = match key.map(bytes_as_text) {
            Some((k, e)) => (Some(k), e),
            None => (None, encoding::UTF8),
        };
        let (payload, payload_encoding) = match value {
            Some(v) => bytes_as_text(v),
            None => (String::new(), encoding::NULL),
        };
        DeadLetter {
            topic: topic.to_string(),
            partition: pos.partition,
            offset: pos.offset,
            key,
            key_encoding: key_encoding.to_string(),
            payload,
            payload_encoding: payload_encoding.to_string(),
            reason,
            detail,
            rejected_at: at,
        }
        .bounded()
    }

    /// The dead letter of a decoded input record kept in state: its original payload and key
    /// when the decoder kept them (`raw`, `raw_key`), else `fallback` (the event re-encoded,
    /// for events built without the decoder) and `default_key`.
    #[allow(clippy::too_many_arguments)]
    pub fn of_record(
        topic: &str,
        pos: crate::events::Pos,
        raw_key: Option<&[u8]>,
        default_key: &str,
        raw: Option<&str>,
        fallback: impl FnOnce() -> String,
        reason: RejectReason,
        detail: String,
        at: Millis,
    ) -> DeadLetter {
        let (key, key_encoding) = match raw_key {
            Some(k) => bytes_as_text(k),
            None => (default_key.to_string(), encoding::UTF8),
        };
        DeadLetter {
            topic: topic.to_string(),
            partition: pos.partition,
            offset: pos.offset,
            key: Some(key),
            key_encoding: key_encoding.to_string(),
            payload: raw.map(str::to_string).unwrap_or_else(fallback),
            payload_encoding: encoding::UTF8.into(),
            reason,
            detail,
            rejected_at: at,
        }
        .bounded()
    }

    /// Within the limits every store of a dead letter accepts: the payload cut to
    /// [`DEAD_LETTER_PAYLOAD_MAX`], the detail cleaned ([`DEAD_LETTER_DETAIL_MAX`], no NUL).
    pub fn bounded(mut self) -> DeadLetter {
        self.detail = clean_detail(std::mem::take(&mut self.detail));
        if let Some(kept) = cut_for_json(&self.payload, DEAD_LETTER_PAYLOAD_MAX) {
            let note = format!(
                " (payload cut to its first {} of {} bytes as {}; the record is at its topic, partition and offset)",
                kept.len(),
                self.payload.len(),
                self.payload_encoding
            );
            let kept = kept.len();
            self.payload.truncate(kept);
            self.detail.push_str(&note);
        }
        if let Some(k) = &self.key {
            if let Some(kept) = cut_for_json(k, DEAD_LETTER_DETAIL_MAX) {
                let kept = kept.len();
                self.key.as_mut().expect("some").truncate(kept);
                self.detail.push_str(" (key cut)");
            }
        }
        self
    }

    /// The document published on `workflow-dead-letter` (key: the input's key). Its id is
    /// deterministic in the input position, so a replay cannot publish it twice.
    pub fn to_record(&self) -> OutRecord {
        let id = uuid::Uuid::new_v5(
            &uuid::Uuid::NAMESPACE_URL,
            format!(
                "hmis-flow:dead-letter:{}:{}:{}:{}",
                self.topic,
                self.partition,
                self.offset,
                self.reason.as_str()
            )
            .as_bytes(),
        )
        .to_string();
        let doc = serde_json::json!({
            "deadLetterId": id,
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "key": self.key,
            "keyEncoding": self.key_encoding,
            "payload": self.payload,
            "payloadEncoding": self.payload_encoding,
            "reason": self.reason.as_str(),
            "detail": self.detail,
            "rejectedAt": crate::events::format_time(self.rejected_at),
        });
        OutRecord {
            topic: OutTopic::DeadLetter,
            event_id: id,
            event_type: self.reason.as_str().to_string(),
            key: self.key.clone(),
            payload: doc.to_string(),
        }
    }
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
    pub rows: Vec<((u8, Str, Str), Option<Row>)>,
    /// Derived events, alerts and dead-letter documents to publish, in production order.
    pub records: Vec<OutRecord>,
    /// Dead letters for the `dead_letters` table.
    pub dead_letters: Vec<DeadLetter>,
    /// Highest position per input partition covered by this batch.
    pub offsets: Vec<OffsetMark>,
}

/// Rows for tests (the gather's and the keyed steps' changes).
#[cfg(test)]
pub(crate) mod samples {
    use super::{AlertRow, ReadinessRow, Row};

    pub(crate) fn readiness(wf: u32, def: u32, attempt: i32) -> Row {
        Row::Readiness(ReadinessRow {
            workflow_instance_id: format!("wf-{wf}").into(),
            task_def_id: format!("d-{def}").into(),
            patient_id: None,
            template_id: "tpl".into(),
            template_version: 1,
            task_name: None,
            automatic: false,
            next_attempt: attempt,
        })
    }

    /// A fact: an alert of workflow `wf`.
    pub(crate) fn alert(id: u32, wf: u32, message: u32) -> Row {
        Row::Alert(AlertRow {
            alert_id: format!("a-{id}"),
            severity: "HIGH".into(),
            source: "test".into(),
            kind: "k".into(),
            message: format!("m-{message}"),
            raised_at: 0,
            cause_event_id: None,
            component: None,
            workflow_instance_id: Some(format!("wf-{wf}")),
            task_instance_id: None,
            order_id: None,
            details: None,
        })
    }
}
