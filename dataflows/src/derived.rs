//! Derived events (contract §7): their types, deterministic ids and JSON.
//!
//! Every id is a UUID v5 in the URL namespace of a name `hmis-flow:<what>:<cause…>`, so a
//! replay, a restart or a second pipeline on the same input produces the same ids
//! (compensation actions use exactly the contract's name, `hmis-flow:compensation:<orderId>:<actionType>`).

use crate::model::Str;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::events::format_time;
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

/// UUID v5 (URL namespace) of `name`, as text.
pub fn v5(name: &str) -> String {
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, name.as_bytes()).to_string()
}

/// A derived event before serialization. Absent fields are omitted from the JSON.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Derived {
    pub event_type: Option<DerivedType>,
    pub event_id: Str,
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
            event_id: v5(id_name).into(),
            workflow_instance_id: workflow_instance_id.into(),
            ..Default::default()
        }
    }

    /// Publication rank within one instant and workflow (the [`DerivedType`] order).
    pub fn rank(&self) -> u8 {
        self.event_type.map(|t| t as u8).unwrap_or(u8::MAX)
    }

    /// The JSON document, stamped with the pipeline clock at which it was derived.
    pub fn to_json(&self, event_time: Millis) -> String {
        let mut m = Map::new();
        let mut put = |k: &str, v: Value| {
            m.insert(k.to_string(), v);
        };
        put("eventId", self.event_id.as_str().into());
        put(
            "eventType",
            self.event_type
                .map(|t| t.as_str())
                .unwrap_or("UNKNOWN")
                .into(),
        );
        put("eventTime", format_time(event_time).into());
        put(
            "workflowInstanceId",
            self.workflow_instance_id.as_str().into(),
        );
        macro_rules! opt {
            ($name:literal, $v:expr) => {
                if let Some(v) = &$v {
                    put($name, serde_json::json!(v));
                }
            };
        }
        opt!("patientId", self.patient_id);
        opt!("taskInstanceId", self.task_instance_id);
        opt!("taskDefId", self.task_def_id);
        opt!("taskName", self.task_name);
        opt!("templateId", self.template_id);
        opt!("templateVersion", self.template_version);
        opt!("orderId", self.order_id);
        opt!("orderType", self.order_type);
        opt!("attempt", self.attempt);
        opt!("automatic", self.automatic);
        opt!("progressPercentage", self.progress_percentage);
        opt!("durationSeconds", self.duration_seconds);
        opt!("escalatedTo", self.escalated_to);
        opt!("escalationReason", self.escalation_reason);
        opt!("escalationLevel", self.escalation_level);
        if let Some(d) = self.due_at {
            put("dueAt", format_time(d).into());
        }
        opt!("minutesOverdue", self.minutes_overdue);
        opt!("actionId", self.action_id);
        opt!("actionType", self.action_type);
        opt!("amount", self.amount);
        opt!("reason", self.reason);
        opt!("errorMessage", self.error_message);
        opt!("causeEventId", self.cause_event_id);
        if !self.blocking_order_ids.is_empty() {
            put(
                "blockingOrderIds",
                serde_json::json!(self.blocking_order_ids),
            );
        }
        Value::Object(m).to_string()
    }

    /// The record published to `workflow-derived-events` (key workflowInstanceId).
    pub fn to_record(&self, event_time: Millis) -> OutRecord {
        if self.per_transition {
            let mut d = self.clone();
            d.event_id = v5(&format!("{}@{event_time}", self.event_id)).into();
            d.per_transition = false;
            return d.to_record(event_time);
        }
        OutRecord {
            topic: OutTopic::Derived,
            event_id: self.event_id.to_string(),
            event_type: self
                .event_type
                .map(|t| t.as_str())
                .unwrap_or("UNKNOWN")
                .to_string(),
            key: Some(self.workflow_instance_id.to_string()),
            payload: self.to_json(event_time),
        }
    }
}
