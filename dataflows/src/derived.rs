//! Derived events (contract §7): their types, deterministic ids and JSON.
//!
//! Every id is a UUID v5 in the URL namespace of a name `hmis-flow:<what>:<cause…>`, so a
//! replay, a restart or a second pipeline on the same input produces the same ids
//! (compensation actions use exactly the contract's name, `hmis-flow:compensation:<orderId>:<actionType>`).

use crate::model::Str;
use serde::{Deserialize, Serialize};

use crate::events::write_time;
use crate::output::{Millis, OutRecord, OutTopic};

/// The derived event types, in the order they are published when produced at the same instant
/// for the same workflow (the order the rules produce them: cause before consequence).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum DerivedType {
    OrderTransitionRejected,
    OrderActivationRequested,
    OrderCriticalResult,
    OrderCompensationRequested,
    OrderOverdue,
    TaskRetryScheduled,
    TaskSlaBreached,
    TaskEscalated,
    TaskStale,
    TaskBlocked,
    TaskReady,
    WorkflowProgress,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowEscalated,
}

impl DerivedType {
    pub const ALL: [DerivedType; 15] = [
        DerivedType::OrderTransitionRejected,
        DerivedType::OrderActivationRequested,
        DerivedType::OrderCriticalResult,
        DerivedType::OrderCompensationRequested,
        DerivedType::OrderOverdue,
        DerivedType::TaskRetryScheduled,
        DerivedType::TaskSlaBreached,
        DerivedType::TaskEscalated,
        DerivedType::TaskStale,
        DerivedType::TaskBlocked,
        DerivedType::TaskReady,
        DerivedType::WorkflowProgress,
        DerivedType::WorkflowCompleted,
        DerivedType::WorkflowFailed,
        DerivedType::WorkflowEscalated,
    ];
    pub fn as_str(&self) -> &'static str {
        match self {
            DerivedType::OrderTransitionRejected => "ORDER_TRANSITION_REJECTED",
            DerivedType::OrderActivationRequested => "ORDER_ACTIVATION_REQUESTED",
            DerivedType::OrderCriticalResult => "ORDER_CRITICAL_RESULT",
            DerivedType::OrderCompensationRequested => "ORDER_COMPENSATION_REQUESTED",
            DerivedType::OrderOverdue => "ORDER_OVERDUE",
            DerivedType::TaskRetryScheduled => "TASK_RETRY_SCHEDULED",
            DerivedType::TaskSlaBreached => "TASK_SLA_BREACHED",
            DerivedType::TaskEscalated => "TASK_ESCALATED",
            DerivedType::TaskStale => "TASK_STALE",
            DerivedType::TaskBlocked => "TASK_BLOCKED",
            DerivedType::TaskReady => "TASK_READY",
            DerivedType::WorkflowProgress => "WORKFLOW_PROGRESS",
            DerivedType::WorkflowCompleted => "WORKFLOW_COMPLETED",
            DerivedType::WorkflowFailed => "WORKFLOW_FAILED",
            DerivedType::WorkflowEscalated => "WORKFLOW_ESCALATED",
        }
    }
}

/// UUID v5 (URL namespace) of `name`, as text (lower-case, hyphenated).
pub fn v5(name: &str) -> String {
    with_v5(name, |s| s.to_owned())
}

/// [`v5`] as a shared string (one allocation).
pub fn v5_str(name: &str) -> Str {
    with_v5(name, |s| Str::from(s))
}

/// Hands [`v5`]'s text, encoded on the stack (no formatter), to `make`.
fn with_v5<R>(name: &str, make: impl FnOnce(&str) -> R) -> R {
    let id = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, name.as_bytes());
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    make(id.hyphenated().encode_lower(&mut buf))
}

/// The parts of an id's name `hmis-flow:<eventType>:<a>[:<b>][:<n>]`, kept instead of the
/// id while an event may still turn out to be one already derived: the rules re-derive a
/// workflow's events at each instant it changes and publish those that are new, so most
/// are compared and dropped, and hashing their names (SHA-1) and formatting them was
/// ~15 % of the workflow rules' time (docs/engine.md, session 11). Two events have equal
/// names exactly when their parts are equal (within one event type the parts have one
/// shape, and `n` is the last, numeric part), so comparing parts compares ids.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct IdName {
    pub a: Str,
    pub b: Option<Str>,
    pub n: Option<i64>,
}

impl IdName {
    pub fn new(a: &Str, b: Option<Str>, n: Option<i64>) -> IdName {
        IdName { a: a.clone(), b, n }
    }

    /// The name, for the event type `ty`.
    pub fn render(&self, ty: DerivedType) -> String {
        use std::fmt::Write;
        let mut s = String::with_capacity(96);
        s.push_str("hmis-flow:");
        s.push_str(ty.as_str());
        s.push(':');
        s.push_str(&self.a);
        if let Some(b) = &self.b {
            s.push(':');
            s.push_str(b);
        }
        if let Some(n) = self.n {
            write!(s, ":{n}").expect("writing to a String");
        }
        s
    }
}

/// A derived event before serialization. Absent fields are omitted from the JSON.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Derived {
    pub event_type: Option<DerivedType>,
    /// The id; empty while the id is named lazily (`id_name`).
    pub event_id: Str,
    /// The name of an id hashed only when the event is published ([`Derived::named`]).
    pub id_name: Option<IdName>,
    pub workflow_instance_id: Str,
    pub patient_id: Option<Str>,
    pub task_instance_id: Option<Str>,
    pub task_def_id: Option<Str>,
    pub task_name: Option<Str>,
    pub template_id: Option<Str>,
    pub template_version: Option<i64>,
    pub order_id: Option<Str>,
    pub order_type: Option<Str>,
    pub attempt: Option<u32>,
    pub automatic: Option<bool>,
    pub progress_percentage: Option<i32>,
    pub duration_seconds: Option<i64>,
    pub escalated_to: Option<Str>,
    pub escalation_reason: Option<Str>,
    pub escalation_level: Option<i32>,
    pub due_at: Option<Millis>,
    pub minutes_overdue: Option<i64>,
    pub action_id: Option<Str>,
    pub action_type: Option<Str>,
    pub amount: Option<Str>,
    pub reason: Option<Str>,
    pub error_message: Option<Str>,
    pub cause_event_id: Option<Str>,
    /// Open orders blocking a task (TASK_BLOCKED).
    pub blocking_order_ids: Vec<Str>,
    /// The event marks a *transition* of a state that may recur (readiness, blocking,
    /// progress): its id also names the pipeline time of the transition, so each transition
    /// is its own event, and one that persists is never re-emitted.
    pub per_transition: bool,
}

impl Derived {
    pub fn new(
        event_type: DerivedType,
        id_name: &str,
        workflow_instance_id: impl Into<Str>,
    ) -> Self {
        Derived {
            event_type: Some(event_type),
            event_id: v5_str(id_name),
            workflow_instance_id: workflow_instance_id.into(),
            ..Default::default()
        }
    }

    /// An event whose id is named by `name` (see [`IdName`]) and hashed when published.
    pub fn named(event_type: DerivedType, name: IdName, workflow_instance_id: &Str) -> Self {
        Derived {
            event_type: Some(event_type),
            id_name: Some(name),
            workflow_instance_id: workflow_instance_id.clone(),
            ..Default::default()
        }
    }

    /// The id (hashed now if it was named lazily).
    pub fn id(&self) -> Str {
        match (&self.id_name, self.event_type) {
            (Some(n), Some(ty)) => v5_str(&n.render(ty)),
            _ => self.event_id.clone(),
        }
    }

    /// Publication rank within one instant and workflow (the [`DerivedType`] order).
    pub fn rank(&self) -> u8 {
        self.event_type.map(|t| t as u8).unwrap_or(u8::MAX)
    }

    /// The JSON document, stamped with the pipeline clock at which it was derived.
    ///
    /// Written directly, keys in the byte order a `serde_json::Map` (a `BTreeMap`) gives
    /// them, values escaped and formatted by serde_json: byte for byte the document of
    /// building a `Map` and printing it (`tests::to_json_matches_the_map_document` keeps
    /// that version as its oracle), without a `String` per key and a `Value` per field.
    pub fn to_json(&self, event_time: Millis) -> String {
        self.json_with_id(event_time, &self.id())
    }

    /// [`Derived::to_json`] with the id given.
    fn json_with_id(&self, event_time: Millis, event_id: &str) -> String {
        let mut w = JsonObject::with_capacity(640);
        let event_type = self.event_type.map(|t| t.as_str()).unwrap_or("UNKNOWN");
        w.opt("actionId", &self.action_id);
        w.opt("actionType", &self.action_type);
        w.opt("amount", &self.amount);
        w.opt("attempt", &self.attempt);
        w.opt("automatic", &self.automatic);
        if !self.blocking_order_ids.is_empty() {
            w.field("blockingOrderIds", &self.blocking_order_ids);
        }
        w.opt("causeEventId", &self.cause_event_id);
        if let Some(d) = self.due_at {
            w.time("dueAt", d);
        }
        w.opt("durationSeconds", &self.duration_seconds);
        w.opt("errorMessage", &self.error_message);
        w.opt("escalatedTo", &self.escalated_to);
        w.opt("escalationLevel", &self.escalation_level);
        w.opt("escalationReason", &self.escalation_reason);
        w.field("eventId", event_id);
        w.time("eventTime", event_time);
        w.field("eventType", event_type);
        w.opt("minutesOverdue", &self.minutes_overdue);
        w.opt("orderId", &self.order_id);
        w.opt("orderType", &self.order_type);
        w.opt("patientId", &self.patient_id);
        w.opt("progressPercentage", &self.progress_percentage);
        w.opt("reason", &self.reason);
        w.opt("taskDefId", &self.task_def_id);
        w.opt("taskInstanceId", &self.task_instance_id);
        w.opt("taskName", &self.task_name);
        w.opt("templateId", &self.template_id);
        w.opt("templateVersion", &self.template_version);
        w.field("workflowInstanceId", self.workflow_instance_id.as_str());
        w.finish()
    }

    /// The record published to `workflow-derived-events` (key workflowInstanceId).
    pub fn to_record(&self, event_time: Millis) -> OutRecord {
        let mut id = self.id();
        if self.per_transition {
            id = v5_str(&format!("{id}@{event_time}"));
        }
        OutRecord {
            topic: OutTopic::Derived,
            event_id: id.to_string(),
            event_type: self
                .event_type
                .map(|t| t.as_str())
                .unwrap_or("UNKNOWN")
                .to_string(),
            key: Some(self.workflow_instance_id.to_string()),
            payload: self.json_with_id(event_time, &id),
        }
    }
}

/// A compact JSON object written field by field (keys are trusted literals).
struct JsonObject {
    buf: Vec<u8>,
}

impl JsonObject {
    fn with_capacity(n: usize) -> Self {
        let mut buf = Vec::with_capacity(n);
        buf.push(b'{');
        JsonObject { buf }
    }
    fn key(&mut self, k: &str) {
        if self.buf.len() > 1 {
            self.buf.push(b',');
        }
        self.buf.push(b'"');
        self.buf.extend_from_slice(k.as_bytes());
        self.buf.extend_from_slice(b"\":");
    }
    fn field<T: Serialize + ?Sized>(&mut self, k: &str, v: &T) {
        self.key(k);
        serde_json::to_writer(&mut self.buf, v).expect("strings, integers and bools serialize");
    }
    fn opt<T: Serialize>(&mut self, k: &str, v: &Option<T>) {
        if let Some(v) = v {
            self.field(k, v);
        }
    }
    fn time(&mut self, k: &str, ms: Millis) {
        self.key(k);
        self.buf.push(b'"');
        write_time(&mut self.buf, ms);
        self.buf.push(b'"');
    }
    fn finish(mut self) -> String {
        self.buf.push(b'}');
        String::from_utf8(self.buf).expect("serde_json writes UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Map, Value};

    /// The document as it was built before: a `serde_json::Map` printed compactly.
    fn map_document(d: &Derived, event_time: Millis) -> String {
        use crate::events::format_time;
        let mut m = Map::new();
        let mut put = |k: &str, v: Value| {
            m.insert(k.to_string(), v);
        };
        put("eventId", d.event_id.as_str().into());
        put(
            "eventType",
            d.event_type.map(|t| t.as_str()).unwrap_or("UNKNOWN").into(),
        );
        put("eventTime", format_time(event_time).into());
        put("workflowInstanceId", d.workflow_instance_id.as_str().into());
        macro_rules! opt {
            ($name:literal, $v:expr) => {
                if let Some(v) = &$v {
                    put($name, serde_json::json!(v));
                }
            };
        }
        opt!("patientId", d.patient_id);
        opt!("taskInstanceId", d.task_instance_id);
        opt!("taskDefId", d.task_def_id);
        opt!("taskName", d.task_name);
        opt!("templateId", d.template_id);
        opt!("templateVersion", d.template_version);
        opt!("orderId", d.order_id);
        opt!("orderType", d.order_type);
        opt!("attempt", d.attempt);
        opt!("automatic", d.automatic);
        opt!("progressPercentage", d.progress_percentage);
        opt!("durationSeconds", d.duration_seconds);
        opt!("escalatedTo", d.escalated_to);
        opt!("escalationReason", d.escalation_reason);
        opt!("escalationLevel", d.escalation_level);
        if let Some(t) = d.due_at {
            put("dueAt", format_time(t).into());
        }
        opt!("minutesOverdue", d.minutes_overdue);
        opt!("actionId", d.action_id);
        opt!("actionType", d.action_type);
        opt!("amount", d.amount);
        opt!("reason", d.reason);
        opt!("errorMessage", d.error_message);
        opt!("causeEventId", d.cause_event_id);
        if !d.blocking_order_ids.is_empty() {
            put("blockingOrderIds", serde_json::json!(d.blocking_order_ids));
        }
        Value::Object(m).to_string()
    }

    #[test]
    fn v5_is_the_uuid_text() {
        for name in ["", "hmis-flow:ready:w:t", "é 日本 😀", "x@1764892800123"] {
            let want = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, name.as_bytes()).to_string();
            assert_eq!(v5(name), want);
            assert_eq!(v5_str(name).as_str(), want);
        }
    }

    #[test]
    fn to_json_matches_the_map_document() {
        let texts = [
            "",
            "a",
            "3f1c0a9e-1b2c-4d5e-8f90-123456789abc",
            "quote \" backslash \\ slash / tab \t newline \n",
            "control \u{1} \u{1f} del \u{7f}",
            "unicode é 日本 😀 \u{2028}",
        ];
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for i in 0..5_000 {
            let mut pick = |n: u64| next() % n;
            let text = |p: &mut dyn FnMut(u64) -> u64| -> Option<Str> {
                (p(3) > 0).then(|| Str::from(texts[p(texts.len() as u64) as usize]))
            };
            let mut d = Derived {
                event_type: (pick(8) > 0)
                    .then(|| DerivedType::ALL[pick(DerivedType::ALL.len() as u64) as usize]),
                event_id: Str::from(texts[pick(texts.len() as u64) as usize]),
                workflow_instance_id: Str::from(texts[pick(texts.len() as u64) as usize]),
                ..Default::default()
            };
            d.patient_id = text(&mut pick);
            d.task_instance_id = text(&mut pick);
            d.task_def_id = text(&mut pick);
            d.task_name = text(&mut pick);
            d.template_id = text(&mut pick);
            d.order_id = text(&mut pick);
            d.order_type = text(&mut pick);
            d.escalated_to = text(&mut pick);
            d.escalation_reason = text(&mut pick);
            d.action_id = text(&mut pick);
            d.action_type = text(&mut pick);
            d.amount = text(&mut pick);
            d.reason = text(&mut pick);
            d.error_message = text(&mut pick);
            d.cause_event_id = text(&mut pick);
            let signed = |v: u64| v as i64;
            d.template_version = (pick(2) == 0).then(|| signed(pick(u64::MAX)));
            d.attempt = (pick(2) == 0).then(|| pick(u64::MAX) as u32);
            d.automatic = (pick(2) == 0).then(|| pick(2) == 0);
            d.progress_percentage = (pick(2) == 0).then(|| pick(u64::MAX) as i32);
            d.duration_seconds = (pick(2) == 0).then(|| signed(pick(u64::MAX)));
            d.escalation_level = (pick(2) == 0).then(|| pick(u64::MAX) as i32);
            d.due_at = (pick(2) == 0).then(|| pick(4_102_444_800_000));
            d.minutes_overdue = (pick(2) == 0).then(|| signed(pick(u64::MAX)));
            for _ in 0..pick(4) {
                d.blocking_order_ids
                    .push(Str::from(texts[pick(texts.len() as u64) as usize]));
            }
            let at = if i % 100 == 0 {
                u64::MAX - i
            } else {
                pick(4_102_444_800_000)
            };
            assert_eq!(d.to_json(at), map_document(&d, at), "{d:?} at {at}");
        }
        // Every field present at once, and none of the optional ones.
        let full = Derived {
            event_type: Some(DerivedType::TaskBlocked),
            event_id: "e".into(),
            id_name: None,
            workflow_instance_id: "w".into(),
            patient_id: Some("p".into()),
            task_instance_id: Some("t".into()),
            task_def_id: Some("td".into()),
            task_name: Some("n".into()),
            template_id: Some("tpl".into()),
            template_version: Some(3),
            order_id: Some("o".into()),
            order_type: Some("LAB".into()),
            attempt: Some(2),
            automatic: Some(true),
            progress_percentage: Some(50),
            duration_seconds: Some(-4),
            escalated_to: Some("x".into()),
            escalation_reason: Some("r".into()),
            escalation_level: Some(1),
            due_at: Some(5),
            minutes_overdue: Some(7),
            action_id: Some("a".into()),
            action_type: Some("REFUND".into()),
            amount: Some("1.5".into()),
            reason: Some("why".into()),
            error_message: Some("err".into()),
            cause_event_id: Some("c".into()),
            blocking_order_ids: vec!["o1".into(), "o2".into()],
            per_transition: false,
        };
        assert_eq!(full.to_json(9), map_document(&full, 9));
        let bare = Derived::default();
        assert_eq!(bare.to_json(0), map_document(&bare, 0));
    }

    /// A lazily named id is the id of its name, as eagerly named events have it, and events
    /// compare equal exactly when their names are equal.
    #[test]
    fn named_ids_are_the_ids_of_their_names() {
        let w: Str = "wf-1".into();
        let cases = [
            (
                DerivedType::WorkflowProgress,
                IdName {
                    a: w.clone(),
                    b: None,
                    n: Some(50),
                },
                "hmis-flow:WORKFLOW_PROGRESS:wf-1:50",
            ),
            (
                DerivedType::WorkflowCompleted,
                IdName {
                    a: w.clone(),
                    b: None,
                    n: None,
                },
                "hmis-flow:WORKFLOW_COMPLETED:wf-1",
            ),
            (
                DerivedType::WorkflowEscalated,
                IdName {
                    a: w.clone(),
                    b: Some("TASK_FAILED:lab".into()),
                    n: Some(1),
                },
                "hmis-flow:WORKFLOW_ESCALATED:wf-1:TASK_FAILED:lab:1",
            ),
            (
                DerivedType::TaskRetryScheduled,
                IdName {
                    a: "t-9".into(),
                    b: None,
                    n: Some(2),
                },
                "hmis-flow:TASK_RETRY_SCHEDULED:t-9:2",
            ),
            (
                DerivedType::TaskReady,
                IdName {
                    a: w.clone(),
                    b: Some("triage".into()),
                    n: Some(3),
                },
                "hmis-flow:TASK_READY:wf-1:triage:3",
            ),
        ];
        for (ty, name, text) in cases {
            assert_eq!(name.render(ty), text);
            let lazy = Derived::named(ty, name.clone(), &w);
            let eager = Derived::new(ty, text, w.clone());
            assert_eq!(lazy.id(), eager.event_id);
            assert_eq!(lazy.to_record(7), eager.to_record(7));
            let mut lazy_t = lazy.clone();
            let mut eager_t = eager.clone();
            lazy_t.per_transition = true;
            eager_t.per_transition = true;
            assert_eq!(lazy_t.to_record(7), eager_t.to_record(7));
            assert_ne!(lazy_t.to_record(7).event_id, lazy.to_record(7).event_id);
        }
        let ready = |def: &str, n| {
            Derived::named(
                DerivedType::TaskReady,
                IdName {
                    a: w.clone(),
                    b: Some(def.into()),
                    n: Some(n),
                },
                &w,
            )
        };
        assert_eq!(ready("a", 1), ready("a", 1));
        assert_ne!(ready("a", 1), ready("a", 2));
        assert_ne!(ready("a", 1), ready("b", 1));
    }
}
