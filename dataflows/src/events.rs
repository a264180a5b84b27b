//! Input events: typed forms of the contract's JSON (§2–§6) and `decode(bytes) -> Result<Event, Rejection>`.
//!
//! Decoding is the only place where bytes become events. It never panics: every
//! failure is a [`Rejection`] carrying a contract reason and a human-readable detail,
//! which the runtime turns into a dead letter (raw bytes kept) while processing goes on.
//!
//! Classification (contract §7):
//! - not UTF-8 or not JSON, or not a JSON object → `INVALID_JSON`;
//! - `eventType` present but not one of its topic's types → `UNKNOWN_EVENT_TYPE`;
//! - a required field missing or of the wrong type, an unparseable `eventTime` → `SCHEMA_VIOLATION`;
//! - a definition whose references dangle, whose `nextTaskId` links cycle, or whose key
//!   disagrees with its body → `INVALID_DEFINITION`.
//!
//! Unknown fields are ignored (forward compatibility).

use crate::model::Str;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::output::{Millis, RejectReason};

mod one_pass;

/// The input topics, by role. Names are configurable; roles are not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum InputTopic {
    Definitions,
    Tasks,
    Orders,
    Workflows,
    System,
}

impl InputTopic {
    pub const ALL: [InputTopic; 5] = [
        InputTopic::Definitions,
        InputTopic::Tasks,
        InputTopic::Orders,
        InputTopic::Workflows,
        InputTopic::System,
    ];
    /// The contract's default topic name.
    pub fn default_name(&self) -> &'static str {
        match self {
            InputTopic::Definitions => "workflow-definitions",
            InputTopic::Tasks => "workflow-task-events",
            InputTopic::Orders => "workflow-order-events",
            InputTopic::Workflows => "workflow-state-events",
            InputTopic::System => "system-events",
        }
    }
}

/// Where a record came from: its partition and offset within its topic.
/// Orders ties between events (contract §5: "(eventTime, offset) order").
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Pos {
    pub partition: i32,
    pub offset: i64,
}

/// A rejected record: why, and what exactly was wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub reason: RejectReason,
    pub detail: String,
}

impl Rejection {
    fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        Rejection {
            reason,
            detail: detail.into(),
        }
    }
    fn schema(detail: impl Into<String>) -> Self {
        Self::new(RejectReason::SchemaViolation, detail)
    }
}

/// Lifecycle status of a task (contract §4). The derived `Ord` is not the rank: use [`TaskStatus::rank`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum TaskStatus {
    Pending,
    InProgress,
    Completed,
    Failed,
}

impl TaskStatus {
    /// PENDING 0 < IN_PROGRESS 1 < COMPLETED 2 = FAILED 2.
    pub fn rank(&self) -> u8 {
        match self {
            TaskStatus::Pending => 0,
            TaskStatus::InProgress => 1,
            TaskStatus::Completed | TaskStatus::Failed => 2,
        }
    }
    pub fn as_str(&self) -> &'static str {
        match self {
            TaskStatus::Pending => "PENDING",
            TaskStatus::InProgress => "IN_PROGRESS",
            TaskStatus::Completed => "COMPLETED",
            TaskStatus::Failed => "FAILED",
        }
    }
}

/// TASK_CREATED, TASK_STARTED, TASK_COMPLETED or TASK_FAILED.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TaskEvent {
    pub event_id: Str,
    pub event_time: Millis,
    pub pos: Pos,
    pub task_instance_id: Str,
    pub workflow_instance_id: Str,
    pub patient_id: Option<Str>,
    pub task_def_id: Str,
    pub task_name: Option<Str>,
    /// Implied by the event type (the payload's `status`, if any, must agree).
    pub status: TaskStatus,
    pub attempt: u32,
    pub error_message: Option<Str>,
    pub due_at: Option<Millis>,
    /// The record's Kafka key as text (for a dead letter).
    pub raw_key: Option<Arc<[u8]>>,
    /// The record's original payload, kept so that an event dead-lettered later (an unknown
    /// reference after its grace, contract §7) carries its bytes. Shared: copies cost a pointer.
    pub raw: Option<Arc<str>>,
}

/// Upstream workflow event kinds (contract §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum WorkflowEventKind {
    Started,
    Escalated,
    Failed,
    Completed,
}

/// WORKFLOW_STARTED, WORKFLOW_ESCALATED, WORKFLOW_FAILED or WORKFLOW_COMPLETED from upstream.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WorkflowEvent {
    pub event_id: Str,
    pub event_time: Millis,
    pub pos: Pos,
    pub workflow_instance_id: Str,
    pub kind: WorkflowEventKind,
    pub patient_id: Option<Str>,
    /// Required on WORKFLOW_STARTED.
    pub template_id: Option<Str>,
    /// Required on WORKFLOW_STARTED.
    pub template_version: Option<i64>,
    pub template_name: Option<Str>,
    pub escalation_reason: Option<Str>,
    /// The record's Kafka key as text (for a dead letter).
    pub raw_key: Option<Arc<[u8]>>,
    /// The record's original payload, kept so that an event dead-lettered later (an unknown
    /// reference after its grace, contract §7) carries its bytes. Shared: copies cost a pointer.
    pub raw: Option<Arc<str>>,
}

/// Order lifecycle states (contract §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum OrderStatus {
    Proposed,
    Authorized,
    Activated,
    InProgress,
    Resulted,
    Dispensed,
    Completed,
    Verified,
    Closed,
    Cancelled,
}

impl OrderStatus {
    pub const ALL: [OrderStatus; 10] = [
        OrderStatus::Proposed,
        OrderStatus::Authorized,
        OrderStatus::Activated,
        OrderStatus::InProgress,
        OrderStatus::Resulted,
        OrderStatus::Dispensed,
        OrderStatus::Completed,
        OrderStatus::Verified,
        OrderStatus::Closed,
        OrderStatus::Cancelled,
    ];
    pub fn as_str(&self) -> &'static str {
        match self {
            OrderStatus::Proposed => "PROPOSED",
            OrderStatus::Authorized => "AUTHORIZED",
            OrderStatus::Activated => "ACTIVATED",
            OrderStatus::InProgress => "IN_PROGRESS",
            OrderStatus::Resulted => "RESULTED",
            OrderStatus::Dispensed => "DISPENSED",
            OrderStatus::Completed => "COMPLETED",
            OrderStatus::Verified => "VERIFIED",
            OrderStatus::Closed => "CLOSED",
            OrderStatus::Cancelled => "CANCELLED",
        }
    }
    pub fn parse(s: &str) -> Option<OrderStatus> {
        OrderStatus::ALL.iter().copied().find(|st| st.as_str() == s)
    }
    /// Open: any status other than RESULTED, DISPENSED, COMPLETED, VERIFIED, CLOSED, CANCELLED.
    pub fn is_open(&self) -> bool {
        matches!(
            self,
            OrderStatus::Proposed
                | OrderStatus::Authorized
                | OrderStatus::Activated
                | OrderStatus::InProgress
        )
    }
}

/// Order event types (contract §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum OrderEventKind {
    Created,
    Authorized,
    Activated,
    Started,
    Resulted,
    Verified,
    Closed,
    Cancelled,
    CompensationCompleted,
}

impl OrderEventKind {
    pub const ALL: [OrderEventKind; 9] = [
        OrderEventKind::Created,
        OrderEventKind::Authorized,
        OrderEventKind::Activated,
        OrderEventKind::Started,
        OrderEventKind::Resulted,
        OrderEventKind::Verified,
        OrderEventKind::Closed,
        OrderEventKind::Cancelled,
        OrderEventKind::CompensationCompleted,
    ];
    pub fn as_str(&self) -> &'static str {
        match self {
            OrderEventKind::Created => "ORDER_CREATED",
            OrderEventKind::Authorized => "ORDER_AUTHORIZED",
            OrderEventKind::Activated => "ORDER_ACTIVATED",
            OrderEventKind::Started => "ORDER_STARTED",
            OrderEventKind::Resulted => "ORDER_RESULTED",
            OrderEventKind::Verified => "ORDER_VERIFIED",
            OrderEventKind::Closed => "ORDER_CLOSED",
            OrderEventKind::Cancelled => "ORDER_CANCELLED",
            OrderEventKind::CompensationCompleted => "ORDER_COMPENSATION_COMPLETED",
        }
    }
}

/// An ORDER_* event.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OrderEvent {
    pub event_id: Str,
    pub event_time: Millis,
    pub pos: Pos,
    pub kind: OrderEventKind,
    pub order_id: Str,
    pub workflow_instance_id: Option<Str>,
    pub patient_id: Option<Str>,
    pub order_type: Option<Str>,
    /// The state the event moves the order to; `None` only for ORDER_COMPENSATION_COMPLETED.
    pub order_status: Option<OrderStatus>,
    pub actor: Option<Str>,
    pub actor_role: Option<Str>,
    /// Cost in the smallest currency unit is not assumed: kept as the decimal text sent.
    pub cost: Option<Str>,
    pub department: Option<Str>,
    pub critical: bool,
    pub reason: Option<Str>,
    pub appointment_id: Option<Str>,
    pub action_id: Option<Str>,
    /// The record's Kafka key as text, kept for the dead letter of a rejected transition.
    pub raw_key: Option<Arc<[u8]>>,
    /// The record's original payload (UTF-8 JSON as received), kept so that a transition the
    /// lifecycle rejects can be dead-lettered byte for byte (contract §7). Shared, so the
    /// copies the order state keeps cost a pointer each.
    pub raw: Option<Arc<str>>,
}

/// One task of a workflow template (contract §3), defaults applied.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TaskDef {
    pub task_def_id: Str,
    pub name: Option<Str>,
    pub required: bool,
    pub next_task_id: Option<Str>,
    pub sla_minutes: Option<u32>,
    pub max_retries: u32,
    pub failure_task_id: Option<Str>,
    pub blocking_order_types: Vec<Str>,
    pub escalate_to: Str,
    pub automatic: bool,
}

/// A validated workflow template version.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Template {
    pub template_id: Str,
    pub version: i64,
    pub template_name: Option<Str>,
    pub tasks: Vec<TaskDef>,
}

impl Template {
    pub fn task(&self, task_def_id: &str) -> Option<&TaskDef> {
        self.tasks.iter().find(|t| t.task_def_id == task_def_id)
    }
}

/// A record of the compacted definitions topic: a template version, or its deletion.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DefinitionRecord {
    pub template_id: Str,
    pub version: i64,
    pub pos: Pos,
    /// `None`: a tombstone (null value) deleting that version.
    pub template: Option<Arc<Template>>,
}

/// A decoded input event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Definition(DefinitionRecord),
    Task(TaskEvent),
    Workflow(WorkflowEvent),
    Order(OrderEvent),
    System(SystemEvent),
}

impl Event {
    /// The event's `eventTime`; definitions carry none and never move the clock.
    pub fn event_time(&self) -> Option<Millis> {
        match self {
            Event::Definition(_) => None,
            Event::Task(e) => Some(e.event_time),
            Event::Workflow(e) => Some(e.event_time),
            Event::Order(e) => Some(e.event_time),
            Event::System(e) => Some(e.event_time),
        }
    }
}

/// HEALTH_CHECK, PERFORMANCE_METRIC, ERROR_REPORT or AUDIT_EVENT (contract §6).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SystemEvent {
    pub event_id: Str,
    pub event_time: Millis,
    pub pos: Pos,
    pub component: String,
    pub kind: SystemKind,
}

/// A component's reported health.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum HealthStatus {
    Up,
    Degraded,
    Unhealthy,
}

impl HealthStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            HealthStatus::Up => "UP",
            HealthStatus::Degraded => "DEGRADED",
            HealthStatus::Unhealthy => "UNHEALTHY",
        }
    }
}

/// An ERROR_REPORT's severity (also an alert's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Severity {
    Critical,
    High,
    Medium,
    Low,
}

impl Severity {
    pub const ALL: [Severity; 4] = [
        Severity::Critical,
        Severity::High,
        Severity::Medium,
        Severity::Low,
    ];

    /// The severity named `s` (`CRITICAL`, `HIGH`, `MEDIUM`, `LOW`).
    pub fn parse(s: &str) -> Option<Severity> {
        Severity::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// Whether an ERROR_REPORT of this severity raises an alert (contract §6: CRITICAL and
    /// HIGH do; MEDIUM and LOW are counted and logged only).
    pub fn raises_alert(&self) -> bool {
        matches!(self, Severity::Critical | Severity::High)
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Severity::Critical => "CRITICAL",
            Severity::High => "HIGH",
            Severity::Medium => "MEDIUM",
            Severity::Low => "LOW",
        }
    }
}

/// The fields of a system event that its type names (contract §6).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum SystemKind {
    HealthCheck {
        status: HealthStatus,
    },
    Metric {
        metric_name: String,
        /// The JSON number as sent (compared as an f64 with the thresholds).
        value: String,
        unit: String,
    },
    ErrorReport {
        severity: Severity,
        message: String,
    },
    Audit {
        actor: String,
        action: String,
        entity_type: String,
        entity_id: String,
        /// Any JSON value, as JSON text; `None` when absent.
        details: Option<String>,
    },
}

/// Parses an RFC 3339 timestamp into milliseconds since the epoch.
pub fn parse_time(s: &str) -> Result<Millis, String> {
    let t = chrono::DateTime::parse_from_rfc3339(s)
        .map_err(|e| format!("`{s}` is not an RFC 3339 timestamp: {e}"))?;
    let ms = t.timestamp_millis();
    u64::try_from(ms).map_err(|_| format!("`{s}` is before 1970"))
}

/// Formats pipeline milliseconds as RFC 3339 with millisecond precision (`2026-11-26T10:15:00.123Z`).
pub fn format_time(ms: Millis) -> String {
    let mut buf = Vec::with_capacity(24);
    write_time(&mut buf, ms);
    String::from_utf8(buf).expect("ASCII")
}

/// Appends [`format_time`]'s text for `ms` to `buf`: `YYYY-MM-DDTHH:MM:SS.mmmZ`, written
/// digit by digit for years up to 9999 (every real timestamp), through chrono's
/// `%Y-%m-%dT%H:%M:%S%.3fZ` beyond (a sign and more year digits), which it equals
/// (`time_format_tests::write_time_matches_chrono`).
pub fn write_time(buf: &mut Vec<u8>, ms: Millis) {
    use chrono::{Datelike, Timelike};
    let t = chrono::DateTime::from_timestamp_millis(ms as i64).unwrap_or_default();
    let year = t.year();
    if !(0..=9999).contains(&year) {
        use std::io::Write;
        let _ = write!(buf, "{}", t.format("%Y-%m-%dT%H:%M:%S%.3fZ"));
        return;
    }
    fn digits(buf: &mut Vec<u8>, n: u32, width: u32) {
        let mut div = 10u32.pow(width - 1);
        while div > 0 {
            buf.push(b'0' + ((n / div) % 10) as u8);
            div /= 10;
        }
    }
    digits(buf, year as u32, 4);
    for (sep, n, width) in [
        (b'-', t.month(), 2),
        (b'-', t.day(), 2),
        (b'T', t.hour(), 2),
        (b':', t.minute(), 2),
        (b':', t.second(), 2),
        (b'.', t.timestamp_subsec_millis(), 3),
    ] {
        buf.push(sep);
        digits(buf, n, width);
    }
    buf.push(b'Z');
}

// ---------------------------------------------------------------------------------------------
// Raw (wire) shapes. Optional everywhere so that *we* say which field is missing, with the
// event type in the message, instead of serde's generic text.

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawEnvelope {
    event_id: Option<String>,
    event_type: Option<String>,
    event_time: Option<String>,
}

// The topic shapes are generic in their text type: the reference path fills them with
// `String`s through serde (`S = String`), the one-pass decoder with borrowed `Cow<str>`s;
// both then build the event with the same functions (`task_event`, …).

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawTask<S = String> {
    task_instance_id: Option<S>,
    workflow_instance_id: Option<S>,
    patient_id: Option<S>,
    task_def_id: Option<S>,
    task_name: Option<S>,
    status: Option<S>,
    attempt: Option<u32>,
    error_message: Option<S>,
    due_at: Option<S>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawWorkflow<S = String> {
    workflow_instance_id: Option<S>,
    patient_id: Option<S>,
    template_id: Option<S>,
    template_version: Option<i64>,
    workflow_template_name: Option<S>,
    escalation_reason: Option<S>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawOrderMetadata<S = String> {
    actor_role: Option<S>,
    cost: Option<serde_json::Number>,
    department: Option<S>,
    critical: Option<bool>,
    reason: Option<S>,
    appointment_id: Option<S>,
    action_id: Option<S>,
}

impl<S> Default for RawOrderMetadata<S> {
    fn default() -> Self {
        RawOrderMetadata {
            actor_role: None,
            cost: None,
            department: None,
            critical: None,
            reason: None,
            appointment_id: None,
            action_id: None,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawOrder<S = String> {
    order_id: Option<S>,
    workflow_instance_id: Option<S>,
    patient_id: Option<S>,
    order_type: Option<S>,
    order_status: Option<S>,
    actor: Option<S>,
    metadata: Option<RawOrderMetadata<S>>,
}

/// A field's text as either decoder holds it: an owned `String` or a borrowed `Cow<str>`.
trait Text: AsRef<str> + Into<String> {}
impl<T: AsRef<str> + Into<String>> Text for T {}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawTaskDef {
    task_def_id: Option<String>,
    name: Option<String>,
    required: Option<bool>,
    next_task_id: Option<String>,
    sla_minutes: Option<u32>,
    max_retries: Option<u32>,
    failure_task_id: Option<String>,
    blocking_order_types: Option<Vec<String>>,
    escalate_to: Option<String>,
    automatic: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawTemplate {
    template_id: Option<String>,
    version: Option<i64>,
    template_name: Option<String>,
    tasks: Option<Vec<RawTaskDef>>,
}

fn parse_json<'a, T: Deserialize<'a>>(text: &'a str, what: &str) -> Result<T, Rejection> {
    serde_json::from_str::<T>(text).map_err(|e| {
        if e.is_syntax() || e.is_eof() {
            Rejection::new(RejectReason::InvalidJson, format!("not valid JSON: {e}"))
        } else {
            Rejection::schema(format!("{what}: {e}"))
        }
    })
}

/// Limits every accepted record keeps, so that whatever it carries can be stored and
/// published (PostgreSQL `text` holds no NUL; a btree key holds ~2.7 KB; a derived event must
/// fit one Kafka message). Past one, the record is a SCHEMA_VIOLATION dead letter.
pub mod limits {
    /// Most bytes of an identifier (eventId, taskInstanceId, workflowInstanceId, orderId,
    /// templateId, taskDefId, component): they are primary keys.
    pub const MAX_ID_BYTES: usize = 512;
    /// Most bytes of any other string (names, messages, reasons, metadata values).
    pub const MAX_STRING_BYTES: usize = 64 * 1024;
    /// Highest attempt number (the next attempt must fit PostgreSQL's `integer`).
    pub const MAX_ATTEMPT: u32 = i32::MAX as u32 - 1;
    /// Most tasks one template (definition) may define: every workflow pinned to it holds
    /// per-task state, and readiness walks the template.
    pub const MAX_TASKS_PER_TEMPLATE: usize = 1024;
    /// Most bytes of an event's `metadata` object or an audit event's `details`, as compact
    /// JSON: they are kept with the event and re-published in derived events and alerts.
    pub const MAX_METADATA_BYTES: usize = 16 * 1024;
}

/// Compact-JSON size of `v` in bytes, counting only up to `cap + 1` (the write stops there).
fn json_size_capped(v: &Value, cap: usize) -> usize {
    struct Count(usize, usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            if self.0 > self.1 {
                return Err(std::io::Error::other("over the cap"));
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0, cap);
    let _ = serde_json::to_writer(&mut c, v);
    c.0
}

/// `metadata` (or `details`) of at most [`limits::MAX_METADATA_BYTES`] as compact JSON.
fn check_metadata_size(v: &Value, field: &str, et: &str) -> Result<(), Rejection> {
    if json_size_capped(v, limits::MAX_METADATA_BYTES) > limits::MAX_METADATA_BYTES {
        return Err(Rejection::schema(format!(
            "{et}: field `{field}` exceeds the limit of {} bytes (as compact JSON)",
            limits::MAX_METADATA_BYTES
        )));
    }
    Ok(())
}

/// Checks every string of a parsed record (object keys included): no NUL character, at most
/// [`limits::MAX_STRING_BYTES`]. JSON nesting is bounded by the parser (128 levels: deeper is
/// INVALID_JSON).
fn check_strings(v: &Value) -> Result<(), Rejection> {
    fn text(s: &str) -> Result<(), Rejection> {
        if s.contains('\0') {
            return Err(Rejection::schema(
                "a string holds a NUL character (\\u0000), which PostgreSQL text cannot store",
            ));
        }
        if s.len() > limits::MAX_STRING_BYTES {
            return Err(Rejection::schema(format!(
                "a string of {} bytes exceeds the limit of {} bytes",
                s.len(),
                limits::MAX_STRING_BYTES
            )));
        }
        Ok(())
    }
    match v {
        Value::String(s) => text(s),
        Value::Array(a) => a.iter().try_for_each(check_strings),
        Value::Object(o) => o.iter().try_for_each(|(k, v)| {
            text(k)?;
            check_strings(v)
        }),
        _ => Ok(()),
    }
}

fn required<T>(v: Option<T>, field: &str, event_type: &str) -> Result<T, Rejection> {
    v.ok_or_else(|| Rejection::schema(format!("{event_type} lacks required field `{field}`")))
}

fn non_empty<S: Text>(v: Option<S>, field: &str, event_type: &str) -> Result<Str, Rejection> {
    let v = required(v, field, event_type)?;
    let len = v.as_ref().len();
    if len == 0 {
        return Err(Rejection::schema(format!(
            "{event_type}: field `{field}` is empty"
        )));
    }
    if len > limits::MAX_ID_BYTES {
        return Err(Rejection::schema(format!(
            "{event_type}: field `{field}` has {len} bytes, more than the {} an identifier may have",
            limits::MAX_ID_BYTES
        )));
    }
    Ok(to_str(v))
}

/// A field's text as the event keeps it.
fn to_str<S: Text>(v: S) -> Str {
    Str::from(v.as_ref())
}

/// Decodes one record of `topic` (its key and value) into an event.
///
/// Two paths with one meaning: the one-pass decoder ([`one_pass`]: borrowed strings, no
/// DOM) takes the records it can prove well formed; anything else (any error, duplicate
/// fields, escapes in places it does not follow, a record some rule rejects) goes through
/// [`decode_reference`], which says why byte for byte as it always has. Both build the event
/// with the same functions, and `tests/decode_parity.rs` and the fuzz target check that the
/// results are equal for every input.
pub fn decode(
    topic: InputTopic,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    pos: Pos,
) -> Result<Event, Rejection> {
    if topic != InputTopic::Definitions {
        if let Some(text) = value.and_then(|b| std::str::from_utf8(b).ok()) {
            if let Some(event) = one_pass::decode(topic, key, text, pos) {
                return Ok(event);
            }
        }
    }
    decode_reference(topic, key, value, pos)
}

/// The reference decoder: a serde_json DOM, checked, then typed. Every rejection's text comes
/// from here. Public only so that tests, the fuzz target and benchmarks can compare it with
/// [`decode`].
#[doc(hidden)]
pub fn decode_reference(
    topic: InputTopic,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    pos: Pos,
) -> Result<Event, Rejection> {
    if topic == InputTopic::Definitions {
        return decode_definition(key, value, pos).map(Event::Definition);
    }
    let Some(bytes) = value else {
        return Err(Rejection::new(
            RejectReason::InvalidJson,
            "empty (null) value",
        ));
    };
    let text = std::str::from_utf8(bytes).map_err(|e| {
        Rejection::new(
            RejectReason::InvalidJson,
            format!("payload is not UTF-8: {e}"),
        )
    })?;
    // An object is required; check it first so `[]` or `3` get INVALID_JSON, as a non-event.
    let value: Value = parse_json(text, "event")?;
    let Value::Object(_) = &value else {
        return Err(Rejection::new(
            RejectReason::InvalidJson,
            "payload is JSON but not an object",
        ));
    };
    check_strings(&value)?;
    let env: RawEnvelope = serde_json::from_value(value.clone())
        .map_err(|e| Rejection::schema(format!("envelope: {e}")))?;
    if let Some(md) = value.get("metadata") {
        if !md.is_object() && !md.is_null() {
            return Err(Rejection::schema("field `metadata` must be an object"));
        }
    }
    let event_type = env
        .event_type
        .ok_or_else(|| Rejection::schema("lacks required field `eventType`"))?;
    for field in ["metadata", "details"] {
        if let Some(v) = value.get(field) {
            check_metadata_size(v, field, &event_type)?;
        }
    }
    let et = event_type.as_str();
    let (event_id, event_time) = check_head(topic, et, env.event_id, env.event_time)?;
    let head = Head {
        et,
        event_id,
        event_time,
        pos,
        key,
        text,
    };
    match topic {
        InputTopic::Tasks => {
            let raw: RawTask = serde_json::from_value(value)
                .map_err(|e| Rejection::schema(format!("{et}: {e}")))?;
            task_event(head, raw)
        }
        InputTopic::Workflows => {
            let raw: RawWorkflow = serde_json::from_value(value)
                .map_err(|e| Rejection::schema(format!("{et}: {e}")))?;
            workflow_event(head, raw)
        }
        InputTopic::Orders => {
            let raw: RawOrder = serde_json::from_value(value)
                .map_err(|e| Rejection::schema(format!("{et}: {e}")))?;
            order_event(head, raw)
        }
        InputTopic::System => system_event(head, &value),
        InputTopic::Definitions => unreachable!("handled above"),
    }
}

/// The event type against its topic (the type decides before the other fields: an unknown
/// type is its own reason), then `eventId` and `eventTime`.
fn check_head<S: Text>(
    topic: InputTopic,
    et: &str,
    event_id: Option<S>,
    event_time: Option<S>,
) -> Result<(Str, Millis), Rejection> {
    match (topic, et) {
        (InputTopic::Tasks, "TASK_CREATED" | "TASK_STARTED" | "TASK_COMPLETED" | "TASK_FAILED") => {
        }
        (
            InputTopic::Workflows,
            "WORKFLOW_STARTED" | "WORKFLOW_ESCALATED" | "WORKFLOW_FAILED" | "WORKFLOW_COMPLETED",
        ) => {}
        (InputTopic::Orders, t) if OrderEventKind::ALL.iter().any(|k| k.as_str() == t) => {}
        (
            InputTopic::System,
            "HEALTH_CHECK" | "PERFORMANCE_METRIC" | "ERROR_REPORT" | "AUDIT_EVENT",
        ) => {}
        _ => {
            return Err(Rejection::new(
                RejectReason::UnknownEventType,
                format!(
                    "eventType `{et}` is not a type of topic {}",
                    topic.default_name()
                ),
            ))
        }
    }
    let event_id = non_empty(event_id, "eventId", et)?;
    let event_time = parse_time(required(event_time, "eventTime", et)?.as_ref())
        .map_err(|e| Rejection::schema(format!("{et}: eventTime {e}")))?;
    Ok((event_id, event_time))
}

/// What every event carries besides its topic's fields, checked.
struct Head<'a> {
    et: &'a str,
    event_id: Str,
    event_time: Millis,
    pos: Pos,
    key: Option<&'a [u8]>,
    /// The whole payload, copied into the event's `raw`.
    text: &'a str,
}

fn task_event<S: Text>(h: Head<'_>, raw: RawTask<S>) -> Result<Event, Rejection> {
    let et = h.et;
    let status = match et {
        "TASK_CREATED" => TaskStatus::Pending,
        "TASK_STARTED" => TaskStatus::InProgress,
        "TASK_COMPLETED" => TaskStatus::Completed,
        _ => TaskStatus::Failed,
    };
    if let Some(s) = &raw.status {
        let s = s.as_ref();
        if s != status.as_str() {
            return Err(Rejection::schema(format!(
                "{et}: status `{s}` contradicts the event type (expected {})",
                status.as_str()
            )));
        }
    }
    let attempt = raw.attempt.unwrap_or(1);
    if attempt == 0 || attempt > limits::MAX_ATTEMPT {
        return Err(Rejection::schema(format!(
            "{et}: attempt {attempt} is outside 1..={}",
            limits::MAX_ATTEMPT
        )));
    }
    let due_at = match raw.due_at {
        Some(d) => Some(
            parse_time(d.as_ref()).map_err(|e| Rejection::schema(format!("{et}: dueAt {e}")))?,
        ),
        None => None,
    };
    Ok(Event::Task(TaskEvent {
        event_id: h.event_id,
        event_time: h.event_time,
        pos: h.pos,
        task_instance_id: non_empty(raw.task_instance_id, "taskInstanceId", et)?,
        workflow_instance_id: non_empty(raw.workflow_instance_id, "workflowInstanceId", et)?,
        patient_id: raw.patient_id.map(to_str),
        task_def_id: non_empty(raw.task_def_id, "taskDefId", et)?,
        task_name: raw.task_name.map(to_str),
        status,
        attempt,
        error_message: raw.error_message.map(to_str),
        due_at,
        raw_key: h.key.map(Arc::from),
        raw: Some(Arc::from(h.text)),
    }))
}

fn workflow_event<S: Text>(h: Head<'_>, raw: RawWorkflow<S>) -> Result<Event, Rejection> {
    let et = h.et;
    let kind = match et {
        "WORKFLOW_STARTED" => WorkflowEventKind::Started,
        "WORKFLOW_ESCALATED" => WorkflowEventKind::Escalated,
        "WORKFLOW_FAILED" => WorkflowEventKind::Failed,
        _ => WorkflowEventKind::Completed,
    };
    let (template_id, template_version) = if kind == WorkflowEventKind::Started {
        (
            Some(non_empty(raw.template_id, "templateId", et)?),
            Some(required(raw.template_version, "templateVersion", et)?),
        )
    } else {
        (raw.template_id.map(to_str), raw.template_version)
    };
    Ok(Event::Workflow(WorkflowEvent {
        event_id: h.event_id,
        event_time: h.event_time,
        pos: h.pos,
        workflow_instance_id: non_empty(raw.workflow_instance_id, "workflowInstanceId", et)?,
        kind,
        patient_id: raw.patient_id.map(to_str),
        template_id,
        template_version,
        template_name: raw.workflow_template_name.map(to_str),
        escalation_reason: raw.escalation_reason.map(to_str),
        raw_key: h.key.map(Arc::from),
        raw: Some(Arc::from(h.text)),
    }))
}

fn order_event<S: Text>(h: Head<'_>, raw: RawOrder<S>) -> Result<Event, Rejection> {
    let et = h.et;
    let kind = OrderEventKind::ALL
        .iter()
        .copied()
        .find(|k| k.as_str() == et)
        .expect("checked by check_head");
    let order_status = match (kind, &raw.order_status) {
        (OrderEventKind::CompensationCompleted, s) => {
            s.as_ref().and_then(|s| OrderStatus::parse(s.as_ref()))
        }
        (_, None) => {
            return Err(Rejection::schema(format!(
                "{et} lacks required field `orderStatus`"
            )))
        }
        (k, Some(s)) => {
            let s = s.as_ref();
            let st = OrderStatus::parse(s).ok_or_else(|| {
                Rejection::schema(format!("{et}: orderStatus `{s}` is not an order state"))
            })?;
            let fits = match k {
                OrderEventKind::Created => st == OrderStatus::Proposed,
                OrderEventKind::Authorized => st == OrderStatus::Authorized,
                OrderEventKind::Activated => st == OrderStatus::Activated,
                OrderEventKind::Started => st == OrderStatus::InProgress,
                OrderEventKind::Resulted => {
                    matches!(
                        st,
                        OrderStatus::Resulted | OrderStatus::Dispensed | OrderStatus::Completed
                    )
                }
                OrderEventKind::Verified => st == OrderStatus::Verified,
                OrderEventKind::Closed => st == OrderStatus::Closed,
                OrderEventKind::Cancelled => st == OrderStatus::Cancelled,
                OrderEventKind::CompensationCompleted => true,
            };
            if !fits {
                return Err(Rejection::schema(format!(
                    "{et}: orderStatus `{s}` does not fit the event type"
                )));
            }
            Some(st)
        }
    };
    let md = raw.metadata.unwrap_or_default();
    if kind == OrderEventKind::CompensationCompleted && md.action_id.is_none() {
        return Err(Rejection::schema(format!(
            "{et} lacks required field `metadata.actionId`"
        )));
    }
    let order_type = raw.order_type;
    if kind == OrderEventKind::Created && order_type.is_none() {
        return Err(Rejection::schema(format!(
            "{et} lacks required field `orderType`"
        )));
    }
    Ok(Event::Order(OrderEvent {
        event_id: h.event_id,
        event_time: h.event_time,
        pos: h.pos,
        kind,
        order_id: non_empty(raw.order_id, "orderId", et)?,
        workflow_instance_id: raw.workflow_instance_id.map(to_str),
        patient_id: raw.patient_id.map(to_str),
        order_type: order_type.map(to_str),
        order_status,
        actor: raw.actor.map(to_str),
        actor_role: md.actor_role.map(to_str),
        cost: md.cost.map(|n| Str::from(n.to_string())),
        department: md.department.map(to_str),
        critical: md.critical.unwrap_or(false),
        reason: md.reason.map(to_str),
        appointment_id: md.appointment_id.map(to_str),
        action_id: md.action_id.map(to_str),
        raw_key: h.key.map(Arc::from),
        raw: Some(Arc::from(h.text)),
    }))
}

/// A top-level field of a system event, as far as [`system_event`] looks at it.
enum SystemField<'v> {
    Text(&'v str),
    Number(&'v serde_json::Number),
    /// null, a boolean, an array or an object.
    Other,
}

/// A system event's top-level fields: the DOM's, or those the one-pass decoder kept.
trait SystemFields {
    fn field(&self, name: &str) -> Option<SystemField<'_>>;
    /// `details` as compact JSON, `None` when absent or null.
    fn details_json(&self) -> Option<String>;
}

impl SystemFields for Value {
    fn field(&self, name: &str) -> Option<SystemField<'_>> {
        self.get(name).map(|v| match v {
            Value::String(s) => SystemField::Text(s),
            Value::Number(n) => SystemField::Number(n),
            _ => SystemField::Other,
        })
    }
    fn details_json(&self) -> Option<String> {
        self.get("details")
            .filter(|d| !d.is_null())
            .map(Value::to_string)
    }
}

fn system_event(h: Head<'_>, fields: &impl SystemFields) -> Result<Event, Rejection> {
    let et = h.et;
    let text = |field: &str| system_text(fields, field, et);
    let component = text("component")?;
    let kind = match et {
        "HEALTH_CHECK" => SystemKind::HealthCheck {
            status: match text("status")?.as_str() {
                "UP" => HealthStatus::Up,
                "DEGRADED" => HealthStatus::Degraded,
                "UNHEALTHY" => HealthStatus::Unhealthy,
                other => {
                    return Err(Rejection::schema(format!(
                        "{et}: status `{other}` is not UP, DEGRADED or UNHEALTHY"
                    )))
                }
            },
        },
        "PERFORMANCE_METRIC" => SystemKind::Metric {
            metric_name: text("metricName")?,
            value: match fields.field("value") {
                Some(SystemField::Number(n)) => n.to_string(),
                Some(_) => {
                    return Err(Rejection::schema(format!(
                        "{et}: field `value` must be a number"
                    )))
                }
                None => {
                    return Err(Rejection::schema(format!(
                        "{et} lacks required field `value`"
                    )))
                }
            },
            unit: text("unit")?,
        },
        "ERROR_REPORT" => SystemKind::ErrorReport {
            severity: {
                let text = text("severity")?;
                Severity::parse(&text).ok_or_else(|| {
                    Rejection::schema(format!(
                        "{et}: severity `{text}` is not CRITICAL, HIGH, MEDIUM or LOW"
                    ))
                })?
            },
            message: text("message")?,
        },
        "AUDIT_EVENT" => SystemKind::Audit {
            actor: text("actor")?,
            action: text("action")?,
            entity_type: text("entityType")?,
            entity_id: text("entityId")?,
            details: fields.details_json(),
        },
        _ => unreachable!("system event types are checked by check_head"),
    };
    Ok(Event::System(SystemEvent {
        event_id: h.event_id,
        event_time: h.event_time,
        pos: h.pos,
        component,
        kind,
    }))
}

/// A required, non-empty string field of a system event.
fn system_text(fields: &impl SystemFields, field: &str, et: &str) -> Result<String, Rejection> {
    match fields.field(field) {
        Some(SystemField::Text(c)) if c.len() > limits::MAX_ID_BYTES && field == "component" => {
            Err(Rejection::schema(format!(
                "{et}: field `component` has {} bytes, more than the {} an identifier may have",
                c.len(),
                limits::MAX_ID_BYTES
            )))
        }
        Some(SystemField::Text(c)) if !c.is_empty() => Ok(c.to_string()),
        Some(SystemField::Text(_)) => {
            Err(Rejection::schema(format!("{et}: field `{field}` is empty")))
        }
        Some(_) => Err(Rejection::schema(format!(
            "{et}: field `{field}` must be a string"
        ))),
        None => Err(Rejection::schema(format!(
            "{et} lacks required field `{field}`"
        ))),
    }
}

/// Parses a definitions key `templateId:version` (split at the last colon).
fn parse_def_key(key: Option<&[u8]>) -> Result<(String, i64), Rejection> {
    let key = key.ok_or_else(|| {
        Rejection::new(
            RejectReason::InvalidDefinition,
            "definition record without a key",
        )
    })?;
    let key = std::str::from_utf8(key).map_err(|_| {
        Rejection::new(
            RejectReason::InvalidDefinition,
            "definition key is not UTF-8",
        )
    })?;
    let (id, ver) = key.rsplit_once(':').ok_or_else(|| {
        Rejection::new(
            RejectReason::InvalidDefinition,
            format!("definition key `{key}` is not `templateId:version`"),
        )
    })?;
    let ver: i64 = ver.parse().map_err(|_| {
        Rejection::new(
            RejectReason::InvalidDefinition,
            format!("definition key `{key}`: version is not an integer"),
        )
    })?;
    if id.is_empty() {
        return Err(Rejection::new(
            RejectReason::InvalidDefinition,
            format!("definition key `{key}`: empty templateId"),
        ));
    }
    Ok((id.to_string(), ver))
}

fn decode_definition(
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    pos: Pos,
) -> Result<DefinitionRecord, Rejection> {
    let Some(bytes) = value else {
        let (template_id, version) = parse_def_key(key)?;
        return Ok(DefinitionRecord {
            template_id: template_id.into(),
            version,
            pos,
            template: None,
        });
    };
    let text = std::str::from_utf8(bytes).map_err(|e| {
        Rejection::new(
            RejectReason::InvalidJson,
            format!("payload is not UTF-8: {e}"),
        )
    })?;
    let value: Value = parse_json(text, "definition")?;
    if !value.is_object() {
        return Err(Rejection::new(
            RejectReason::InvalidJson,
            "definition is JSON but not an object",
        ));
    }
    check_strings(&value)?;
    let raw: RawTemplate =
        serde_json::from_value(value).map_err(|e| Rejection::schema(format!("definition: {e}")))?;
    let template_id = non_empty(raw.template_id, "templateId", "definition")?;
    let version = required(raw.version, "version", "definition")?;
    if let Some(k) = key {
        let (kid, kver) = parse_def_key(Some(k))?;
        if kid != template_id || kver != version {
            return Err(Rejection::new(
                RejectReason::InvalidDefinition,
                format!("key `{kid}:{kver}` disagrees with body `{template_id}:{version}`"),
            ));
        }
    }
    let raw_tasks = required(raw.tasks, "tasks", "definition")?;
    if raw_tasks.len() > limits::MAX_TASKS_PER_TEMPLATE {
        return Err(Rejection::new(
            RejectReason::InvalidDefinition,
            format!(
                "definition `{template_id}:{version}` has {} tasks, more than the limit of {}",
                raw_tasks.len(),
                limits::MAX_TASKS_PER_TEMPLATE
            ),
        ));
    }
    let mut tasks = Vec::with_capacity(raw_tasks.len());
    for (i, t) in raw_tasks.into_iter().enumerate() {
        let task_def_id = non_empty(
            t.task_def_id,
            &format!("tasks[{i}].taskDefId"),
            "definition",
        )?;
        tasks.push(TaskDef {
            task_def_id,
            name: t.name.map(Str::from),
            required: t.required.unwrap_or(true),
            next_task_id: t.next_task_id.map(Str::from),
            sla_minutes: t.sla_minutes,
            max_retries: t.max_retries.unwrap_or(0),
            failure_task_id: t.failure_task_id.map(Str::from),
            blocking_order_types: t
                .blocking_order_types
                .unwrap_or_default()
                .into_iter()
                .map(Str::from)
                .collect(),
            escalate_to: t
                .escalate_to
                .map_or_else(|| Str::from("MANAGER"), Str::from),
            automatic: t.automatic.unwrap_or(false),
        });
    }
    let template = Template {
        template_id,
        version,
        template_name: raw.template_name.map(Str::from),
        tasks,
    };
    validate_template(&template).map_err(|d| Rejection::new(RejectReason::InvalidDefinition, d))?;
    Ok(DefinitionRecord {
        template_id: template.template_id.clone(),
        version,
        pos,
        template: Some(Arc::new(template)),
    })
}

/// Contract §3: unique ids, references inside the template, no `nextTaskId` cycle.
pub fn validate_template(t: &Template) -> Result<(), String> {
    let mut ids = BTreeSet::new();
    for d in &t.tasks {
        if !ids.insert(d.task_def_id.as_str()) {
            return Err(format!("taskDefId `{}` appears twice", d.task_def_id));
        }
    }
    for d in &t.tasks {
        for (field, target) in [
            ("nextTaskId", &d.next_task_id),
            ("failureTaskId", &d.failure_task_id),
        ] {
            if let Some(target) = target {
                if !ids.contains(target.as_str()) {
                    return Err(format!(
                        "task `{}`: {field} `{target}` names no task of the template",
                        d.task_def_id
                    ));
                }
            }
        }
    }
    // Each node has at most one outgoing nextTaskId edge: follow chains, detect a revisit.
    let next: BTreeMap<&str, &str> = t
        .tasks
        .iter()
        .filter_map(|d| {
            d.next_task_id
                .as_deref()
                .map(|n| (d.task_def_id.as_str(), n))
        })
        .collect();
    for start in next.keys() {
        let mut seen = BTreeSet::new();
        let mut cur = *start;
        while let Some(n) = next.get(cur) {
            if !seen.insert(cur) {
                return Err(format!("nextTaskId links form a cycle through `{cur}`"));
            }
            cur = n;
        }
    }
    Ok(())
}

/// The one-pass decoder alone: `Some` for the records it decodes itself, `None` for those it
/// leaves to [`decode_reference`]. For tests and benchmarks (how much takes the fast path).
#[doc(hidden)]
pub fn decode_one_pass(
    topic: InputTopic,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    pos: Pos,
) -> Option<Event> {
    if topic == InputTopic::Definitions {
        return None;
    }
    one_pass::decode(topic, key, std::str::from_utf8(value?).ok()?, pos)
}

/// The fuzz target's layout of a record in its input bytes: a topic byte (its high bit: a
/// null value), a key length, the key, the value. `None` for empty input. The fuzz target,
/// the corpus replay in `tests/decode.rs` and `tests/decode_parity.rs` read it this way.
#[doc(hidden)]
pub fn fuzz_record(data: &[u8]) -> Option<(InputTopic, Option<&[u8]>, Option<&[u8]>)> {
    let (&head, rest) = data.split_first()?;
    let topic = InputTopic::ALL[usize::from(head & 0x7f) % InputTopic::ALL.len()];
    let (key, value) = match rest.split_first() {
        Some((&len, rest)) => {
            let len = usize::from(len % 64).min(rest.len());
            (Some(&rest[..len]), &rest[len..])
        }
        None => (None, rest),
    };
    let value = if head & 0x80 != 0 { None } else { Some(value) };
    Some((topic, key, value))
}

/// [`decode`] and [`decode_reference`] agree on this record: the same event, or the same
/// rejection (reason and detail). The fuzz target and the parity tests call it. Panics when
/// they do not.
#[doc(hidden)]
pub fn check_decoders_agree(topic: InputTopic, key: Option<&[u8]>, value: Option<&[u8]>) {
    let pos = Pos {
        partition: 3,
        offset: 17,
    };
    let fast = decode(topic, key, value, pos);
    let reference = decode_reference(topic, key, value, pos);
    if fast != reference {
        let value = value.map(String::from_utf8_lossy);
        let value: Option<String> = value.map(|v| v.chars().take(2000).collect());
        panic!(
            "decode and decode_reference differ on {topic:?}, key {key:?}, value {value:?}:\n\
             decode:    {fast:?}\ndecode_reference: {reference:?}"
        );
    }
}

/// What must hold of any record, whatever its bytes (the fuzz target and the corpus replay in
/// `tests/decode.rs` call this): decoding never panics and is deterministic; a rejection says
/// why; an accepted event carries no string PostgreSQL would refuse; and the dead letter of
/// the record is within what PostgreSQL and Kafka accept (no NUL in any text, payload and
/// detail bounded). Panics when one does not hold.
pub fn check_any_record(topic: InputTopic, key: Option<&[u8]>, value: Option<&[u8]>) {
    use crate::output::{DeadLetter, DEAD_LETTER_DETAIL_MAX, DEAD_LETTER_PAYLOAD_MAX};
    let pos = Pos::default();
    let (reason, detail) = match decode(topic, key, value, pos) {
        Ok(event) => {
            let again = decode(topic, key, value, pos).expect("decode is deterministic");
            assert_eq!(event.event_time(), again.event_time());
            fn no_nul(v: &Value) -> bool {
                match v {
                    Value::String(s) => !s.contains('\0'),
                    Value::Array(a) => a.iter().all(no_nul),
                    Value::Object(o) => o.iter().all(|(k, v)| !k.contains('\0') && no_nul(v)),
                    _ => true,
                }
            }
            let doc = match &event {
                Event::Definition(d) => serde_json::to_value(d),
                Event::Task(e) => serde_json::to_value(e),
                Event::Workflow(e) => serde_json::to_value(e),
                Event::Order(e) => serde_json::to_value(e),
                Event::System(e) => serde_json::to_value(e),
            }
            .expect("an event serializes");
            assert!(no_nul(&doc), "an accepted event holds a NUL");
            (
                RejectReason::UnknownWorkflow,
                "checked as a later dead letter".to_string(),
            )
        }
        Err(rejection) => {
            assert!(!rejection.detail.is_empty(), "a rejection says why");
            (rejection.reason, rejection.detail)
        }
    };
    let d = DeadLetter::of_bytes(topic.default_name(), pos, key, value, reason, detail, 0);
    for text in [d.key.as_deref().unwrap_or(""), &d.payload, &d.detail] {
        assert!(!text.contains('\0'), "a dead letter's text holds a NUL");
    }
    let escaped = serde_json::to_string(&d.payload).expect("a string serializes");
    assert!(escaped.len() <= DEAD_LETTER_PAYLOAD_MAX, "payload bounded");
    assert!(
        d.detail.len() <= DEAD_LETTER_DETAIL_MAX + 400,
        "detail bounded"
    );
    assert!(d.to_record().payload.len() < 1_000_000, "one Kafka message");
}

#[cfg(test)]
mod time_format_tests {
    use super::*;

    fn chrono_text(ms: Millis) -> String {
        let t = chrono::DateTime::from_timestamp_millis(ms as i64).unwrap_or_default();
        t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
    }

    #[test]
    fn write_time_matches_chrono() {
        let mut cases: Vec<Millis> = vec![
            0,
            1,
            999,
            1000,
            86_399_999,
            951_782_400_000, // 2000-02-29
            1_764_892_800_123,
            253_402_300_799_999, // 9999-12-31T23:59:59.999
            253_402_300_800_000, // +10000
            8_210_266_876_799_999,
            (i64::MAX as u64) + 7, // negative as i64
            u64::MAX,
        ];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            cases.push(x % 4_102_444_800_000); // up to 2100
            cases.push(x);
        }
        for ms in cases {
            assert_eq!(format_time(ms), chrono_text(ms), "ms = {ms}");
        }
    }
}
