//! Workflows (contract §4): readiness, progress, completion and failure, per workflow instance.
//!
//! Everything a rule about workflow instance W needs is gathered under W's key as a set of
//! [`WfFact`]s — W's upstream state, its pinned template version, the states of its task
//! instances and of its orders — and one `reduce` evaluates the contract's rules on that
//! set with [`evaluate`]. Differential dataflow re-evaluates W only when one of its facts
//! changes and reports only the outputs that changed, so a rule is a plain function of
//! state (arrival order cannot matter) while the computation stays incremental.
//!
//! ```text
//!  workflow events ─reduce─► WfState ─┐
//!  definitions ─reduce─► Template ─join(templateId,version)─┤
//!  task events ─reduce─► TaskState ───┤  (by workflowInstanceId)
//!  order events ─reduce─► OrderState ─┘
//!                                     └─► reduce(evaluate) ─► WfOut: rows and derived events
//! ```

use crate::model::Str;
use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use differential_dataflow::VecCollection;

use crate::derived::{Derived, DerivedType, IdName};
use crate::events::{TaskStatus, Template, WorkflowEvent, WorkflowEventKind};
use crate::orders::OrderState;
use crate::output::{Millis, ReadinessRow, Row, TaskRow, WorkflowRow};
use crate::tasks::TaskState;

/// What upstream said about a workflow instance.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WfState {
    pub workflow_instance_id: Str,
    pub patient_id: Option<Str>,
    /// From WORKFLOW_STARTED (the earliest, if several).
    pub started: Option<Started>,
    /// The latest upstream WORKFLOW_COMPLETED / WORKFLOW_FAILED, by (eventTime, offset).
    pub upstream_terminal: Option<(WorkflowEventKind, Millis)>,
    /// eventTime of the first upstream terminal event: nothing is derived after it.
    pub first_upstream_terminal: Option<Millis>,
    /// The latest upstream WORKFLOW_ESCALATED reason, if any was sent.
    pub upstream_escalation: Option<(Millis, Option<Str>)>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Started {
    pub template_id: Str,
    pub template_version: i64,
    pub template_name: Option<Str>,
    pub at: Millis,
    pub event_id: Str,
}

/// Folds the upstream events of one workflow instance (duplicates count once).
pub fn fold_workflow(wid: &str, events: &[&WorkflowEvent]) -> WfState {
    let mut evs: Vec<&WorkflowEvent> = events.to_vec();
    evs.sort_by(|a, b| a.event_id.cmp(&b.event_id).then(a.pos.cmp(&b.pos)));
    evs.dedup_by(|b, a| a.event_id == b.event_id);
    evs.sort_by_key(|e| (e.event_time, e.pos));
    let mut st = WfState {
        workflow_instance_id: wid.into(),
        patient_id: None,
        started: None,
        upstream_terminal: None,
        first_upstream_terminal: None,
        upstream_escalation: None,
    };
    for e in evs {
        if st.patient_id.is_none() {
            st.patient_id = e.patient_id.clone();
        }
        match e.kind {
            WorkflowEventKind::Started => {
                if st.started.is_none() {
                    st.started = Some(Started {
                        template_id: e.template_id.clone().unwrap_or_default(),
                        template_version: e.template_version.unwrap_or_default(),
                        template_name: e.template_name.clone(),
                        at: e.event_time,
                        event_id: e.event_id.clone(),
                    });
                }
            }
            WorkflowEventKind::Completed | WorkflowEventKind::Failed => {
                st.upstream_terminal = Some((e.kind, e.event_time));
                st.first_upstream_terminal.get_or_insert(e.event_time);
            }
            WorkflowEventKind::Escalated => {
                st.upstream_escalation = Some((e.event_time, e.escalation_reason.clone()))
            }
        }
    }
    st
}

/// One fact about a workflow instance, gathered under its key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum WfFact {
    State(Arc<WfState>),
    Template(Arc<Template>),
    /// Shared with the task-state operator's output arrangement.
    Task(Arc<TaskState>),
    Order(OrderFact),
}

/// What readiness needs of an order.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OrderFact {
    pub order_id: Str,
    pub order_type: Option<Str>,
    pub open: bool,
}

impl OrderFact {
    pub fn of(st: &OrderState) -> Option<(Str, OrderFact)> {
        let wid = st.workflow_instance_id.clone()?;
        st.status?;
        Some((
            wid,
            OrderFact {
                order_id: st.order_id.clone(),
                order_type: st.order_type.clone(),
                open: st.is_open(),
            },
        ))
    }
}

/// An output of the workflow rules: a row, a derived event (emitted when it appears), or a
/// timer candidate that the time rules (see `lib.rs`) delay to its deadline.
///
/// Payloads are shared (`Arc`): the rules' output arrangement holds every output of every
/// open workflow, and the time rules hold the same outputs again (delayed candidates, row
/// parts); a shared payload is stored once, and an enum of pointers costs 24 bytes a slot
/// instead of its largest variant (528 bytes).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum WfOut {
    Event(Arc<Derived>),
    Row(Arc<Row>),
    /// The workflow row before timer escalations are merged in, with the time of its own
    /// escalation reason (upstream WORKFLOW_ESCALATED or a task failure), if any.
    WorkflowBase(Arc<WorkflowRow>, Option<Millis>),
    /// A task row before SLA breaches are merged in.
    TaskBase(Arc<TaskRow>),
    /// A task attempt started or ended after its dueAt: breached, whatever the clock says.
    SlaLate(Arc<SlaInfo>),
    /// A task attempt still open with a dueAt: breached when the clock passes dueAt.
    SlaOpen(Arc<SlaInfo>),
    /// A PENDING task: stale when the clock passes its deadline.
    Stale(Arc<StaleInfo>),
    /// An unanswered escalation: re-escalated when the clock passes its deadline.
    ReEscalate(Arc<ReEscalation>),
}

/// Identifies a task attempt with a deadline, and what its breach reports.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SlaInfo {
    pub task_instance_id: Str,
    pub attempt: u32,
    pub workflow_instance_id: Str,
    pub patient_id: Option<Str>,
    pub template_id: Str,
    pub template_version: i64,
    pub task_def_id: Str,
    pub task_name: Option<Str>,
    pub due_at: Millis,
    pub escalate_to: Str,
}

/// A PENDING task attempt and when it goes stale.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct StaleInfo {
    pub task_instance_id: Str,
    pub attempt: u32,
    pub workflow_instance_id: Str,
    pub patient_id: Option<Str>,
    pub task_def_id: Str,
    pub task_name: Option<Str>,
    pub last_event_time: Millis,
    pub deadline: Millis,
}

/// A re-escalation of workflow W to `level`, due at `deadline` unless a task completes first.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ReEscalation {
    pub workflow_instance_id: Str,
    pub level: i32,
    pub deadline: Millis,
    pub patient_id: Option<Str>,
    pub template_id: Str,
    pub template_version: i64,
    /// What was escalated first (e.g. `SLA_BREACH:triage`).
    pub source: Str,
}

/// Durations of the time rules (contract §4 defaults).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TimeRules {
    /// A PENDING task with no event for this long is stale (default 4 h).
    pub stale_after_ms: u64,
    /// An escalation with no task completed for this long is escalated again (default 1 h).
    pub re_escalate_after_ms: u64,
    /// Highest escalation level (contract: 3).
    pub max_escalation_level: i32,
}

impl Default for TimeRules {
    fn default() -> Self {
        TimeRules {
            stale_after_ms: 4 * 3_600_000,
            re_escalate_after_ms: 3_600_000,
            max_escalation_level: 3,
        }
    }
}

/// Status of a workflow instance as the rules decide it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum WfStatus {
    Active,
    Completed,
    Failed,
}

impl WfStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            WfStatus::Active => "ACTIVE",
            WfStatus::Completed => "COMPLETED",
            WfStatus::Failed => "FAILED",
        }
    }
}

/// Per task definition, what the instances of W say about it.
#[derive(Default, Debug)]
struct DefSummary<'a> {
    completed: Option<&'a TaskState>,
    in_progress: bool,
    failed_for_good: Option<&'a TaskState>,
    /// Highest failed attempt that still had retries left.
    failed_retriable: Option<u32>,
    /// Highest attempt created and waiting (PENDING).
    pending: Option<u32>,
}

impl DefSummary<'_> {
    /// The attempt an executor works on next: a waiting one, else the retry of a failed one, else 1.
    fn next_attempt(&self) -> u32 {
        self.pending
            .unwrap_or(1)
            .max(self.failed_retriable.map(|a| a + 1).unwrap_or(1))
    }
}

/// Evaluates the contract's rules for one workflow instance from its facts.
/// `wid` is shared by every row and event the workflow yields (a reference count each).
pub fn evaluate(wid: &Str, facts: &[&WfFact], rules: &TimeRules) -> Vec<WfOut> {
    let mut out = Vec::new();
    let mut state = None;
    let mut template = None;
    let mut tasks: Vec<&TaskState> = Vec::new();
    let mut orders: Vec<&OrderFact> = Vec::new();
    for f in facts {
        match f {
            WfFact::State(s) => state = Some(s),
            WfFact::Template(t) => template = Some(t),
            WfFact::Task(t) => tasks.push(t),
            WfFact::Order(o) => orders.push(o),
        }
    }
    // Without WORKFLOW_STARTED nothing about W is known yet (the events may still be on their way).
    let Some(state) = state else { return out };
    let Some(started) = &state.started else {
        return out;
    };
    let patient = state
        .patient_id
        .clone()
        .or_else(|| tasks.iter().find_map(|t| t.patient_id.clone()));

    let mut summary: BTreeMap<&str, DefSummary> = BTreeMap::new();
    if let Some(t) = template {
        for task in &tasks {
            let Some(def) = t.task(&task.task_def_id) else {
                continue;
            };
            let s = summary.entry(def.task_def_id.as_str()).or_default();
            match task.status {
                TaskStatus::Completed => {
                    if s.completed.is_none_or(|c| {
                        (task.finished_at, &task.task_instance_id)
                            < (c.finished_at, &c.task_instance_id)
                    }) {
                        s.completed = Some(task);
                    }
                }
                TaskStatus::InProgress => s.in_progress = true,
                TaskStatus::Failed if task.attempt > def.max_retries => {
                    if s.failed_for_good.is_none_or(|c| {
                        (task.finished_at, &task.task_instance_id)
                            < (c.finished_at, &c.task_instance_id)
                    }) {
                        s.failed_for_good = Some(task);
                    }
                }
                TaskStatus::Failed => {
                    s.failed_retriable = s.failed_retriable.max(Some(task.attempt))
                }
                TaskStatus::Pending => s.pending = s.pending.max(Some(task.attempt)),
            }
        }
    }

    // Progress, completion and failure.
    let mut progress = 0;
    let mut derived_completion: Option<Millis> = None;
    let mut derived_failure: Option<&TaskState> = None;
    if let Some(t) = template {
        let required: Vec<_> = t.tasks.iter().filter(|d| d.required).collect();
        let done: Vec<Millis> = required
            .iter()
            .filter_map(|d| {
                summary
                    .get(d.task_def_id.as_str())
                    .and_then(|s| s.completed)
            })
            .map(|c| c.finished_at.unwrap_or(c.event_time))
            .collect();
        progress = if required.is_empty() {
            100
        } else {
            (100 * done.len() / required.len()) as i32
        };
        if progress == 100 {
            derived_completion = Some(
                done.iter()
                    .copied()
                    .max()
                    .unwrap_or(started.at)
                    .max(started.at),
            );
        }
        derived_failure = t
            .tasks
            .iter()
            .filter(|d| d.failure_task_id.is_none())
            .filter_map(|d| {
                summary
                    .get(d.task_def_id.as_str())
                    .and_then(|s| s.failed_for_good)
            })
            .min_by_key(|f| (f.finished_at, f.task_instance_id.clone()));
    }
    // The first terminal state the rules derive, by eventTime (failure on a tie): a workflow
    // that completed stays completed when a task fails later, and vice versa.
    let failure_at = derived_failure.map(|f| f.finished_at.unwrap_or(f.event_time));
    let derived: Option<(WfStatus, Millis)> = match (derived_completion, failure_at) {
        (Some(c), Some(f)) if c < f => Some((WfStatus::Completed, c)),
        (_, Some(f)) => Some((WfStatus::Failed, f)),
        (Some(c), None) => Some((WfStatus::Completed, c)),
        (None, None) => None,
    };
    // An upstream terminal event decides the status; what the rules derived *before* it
    // was derived (and is published) all the same.
    let derived_first = match (derived, state.first_upstream_terminal.map(|up| ((), up))) {
        (Some((s, at)), Some((_, up))) if at < up => Some((s, at)),
        (d, None) => d,
        _ => None,
    };
    let upstream_status = state.upstream_terminal.map(|(k, at)| {
        (
            if k == WorkflowEventKind::Completed {
                WfStatus::Completed
            } else {
                WfStatus::Failed
            },
            at,
        )
    });
    let (status, completed_at) = match (upstream_status, derived_first) {
        (Some((us, _)), Some((ds, dat))) if us == ds => (us, Some(dat)),
        (Some((us, uat)), _) => (us, Some(uat)),
        (None, Some((ds, dat))) => (ds, Some(dat)),
        (None, None) => (WfStatus::Active, None),
    };

    // Ids are named, and hashed only for the events that turn out to be new.
    let name = IdName::new;
    let base = |ty: DerivedType, id: IdName| {
        let mut d = Derived::named(ty, id, wid);
        d.patient_id = patient.clone();
        d.template_id = Some(started.template_id.clone());
        d.template_version = Some(started.template_version);
        d
    };

    // Escalation: upstream WORKFLOW_ESCALATED, or a derived failure.
    let mut escalation_reason = state
        .upstream_escalation
        .as_ref()
        .map(|(_, r)| r.clone().unwrap_or_default());
    let mut escalation_time = state.upstream_escalation.as_ref().map(|(t, _)| *t);
    if template.is_some() {
        out.push(WfOut::Event(Arc::new({
            let mut d = base(
                DerivedType::WorkflowProgress,
                name(wid, None, Some(progress.into())),
            );
            d.progress_percentage = Some(progress);
            d.per_transition = true;
            d
        })));
    }
    {
        if let (Some((WfStatus::Completed, _)), Some(at)) = (derived_first, derived_completion) {
            let mut d = base(DerivedType::WorkflowCompleted, name(wid, None, None));
            d.progress_percentage = Some(progress);
            d.duration_seconds = Some((at.saturating_sub(started.at) / 1000) as i64);
            out.push(WfOut::Event(Arc::new(d)));
        }
        if let (Some((WfStatus::Failed, _)), Some(f)) = (derived_first, derived_failure) {
            let reason: Str = format!("TASK_FAILED:{}", f.task_def_id).into();
            let mut d = base(DerivedType::WorkflowFailed, name(wid, None, None));
            d.task_instance_id = Some(f.task_instance_id.clone());
            d.task_def_id = Some(f.task_def_id.clone());
            d.reason = Some(reason.clone());
            d.error_message = f.error_message.clone();
            d.cause_event_id = Some(f.event_id.clone());
            out.push(WfOut::Event(Arc::new(d)));
            let mut e = base(
                DerivedType::WorkflowEscalated,
                name(wid, Some(reason.clone()), Some(1)),
            );
            e.task_instance_id = Some(f.task_instance_id.clone());
            e.task_def_id = Some(f.task_def_id.clone());
            e.escalation_reason = Some(reason.clone());
            e.escalation_level = Some(1);
            e.cause_event_id = Some(f.event_id.clone());
            out.push(WfOut::Event(Arc::new(e)));
            escalation_reason = Some(reason);
            escalation_time = f.finished_at;
        }
    }

    // Retries: a failed attempt with retries left schedules the next one (once per (task, attempt)).
    if let Some(t) = template {
        for task in &tasks {
            let Some(def) = t.task(&task.task_def_id) else {
                continue;
            };
            // Per attempt, so a retry created in the same instant as the failure still counts.
            for a in task
                .attempts
                .iter()
                .filter(|a| a.attempt <= def.max_retries)
            {
                let Some((failed_event, error)) = &a.failed else {
                    continue;
                };
                let mut d = base(
                    DerivedType::TaskRetryScheduled,
                    name(&task.task_instance_id, None, Some(a.attempt.into())),
                );
                d.task_instance_id = Some(task.task_instance_id.clone());
                d.task_def_id = Some(task.task_def_id.clone());
                d.task_name = task.task_name.clone().or_else(|| def.name.clone());
                d.attempt = Some(a.attempt + 1);
                d.error_message = error.clone();
                d.cause_event_id = Some(failed_event.clone());
                out.push(WfOut::Event(Arc::new(d)));
            }
        }
    }

    // Readiness (only in ACTIVE workflows). An event's content must be a function of what
    // identifies it (its eventId's name), so that it is emitted once: a readiness event names
    // the definition, not the instance (which may be created while the task stays ready).
    if let (Some(t), WfStatus::Active) = (template, status) {
        let failure_namers: BTreeMap<&str, Vec<&str>> =
            t.tasks.iter().fold(BTreeMap::new(), |mut m, d| {
                if let Some(f) = &d.failure_task_id {
                    m.entry(f.as_str())
                        .or_insert_with(Vec::new)
                        .push(d.task_def_id.as_str());
                }
                m
            });
        for d in &t.tasks {
            let id = d.task_def_id.as_str();
            let s = summary.get(id);
            // Condition 3.
            if s.is_some_and(|s| {
                s.in_progress || s.completed.is_some() || s.failed_for_good.is_some()
            }) {
                continue;
            }
            // Condition 1 (or the failure-task rule).
            let satisfied = match failure_namers.get(id) {
                Some(namers) => namers
                    .iter()
                    .any(|n| summary.get(n).is_some_and(|s| s.failed_for_good.is_some())),
                None => t
                    .tasks
                    .iter()
                    .filter(|p| p.next_task_id.as_deref() == Some(id))
                    .all(|p| {
                        summary
                            .get(p.task_def_id.as_str())
                            .is_some_and(|s| s.completed.is_some())
                    }),
            };
            if !satisfied {
                continue;
            }
            // Condition 2.
            let blocked = orders.iter().any(|o| {
                o.open
                    && o.order_type
                        .as_ref()
                        .is_some_and(|ty| d.blocking_order_types.contains(ty))
            });
            let next_attempt = s.map(|s| s.next_attempt()).unwrap_or(1);
            if !blocked {
                // Content names only the readiness itself: what made it ready (which
                // completion, which order closing) is in the event's time; a transition
                // into readiness is one event (`per_transition`).
                let mut e = base(
                    DerivedType::TaskReady,
                    name(wid, Some(d.task_def_id.clone()), Some(next_attempt.into())),
                );
                e.task_def_id = Some(d.task_def_id.clone());
                e.task_name = d.name.clone();
                e.attempt = Some(next_attempt);
                e.automatic = Some(d.automatic);
                e.per_transition = true;
                out.push(WfOut::Event(Arc::new(e)));
                out.push(WfOut::Row(Arc::new(Row::Readiness(ReadinessRow {
                    workflow_instance_id: wid.into(),
                    task_def_id: d.task_def_id.clone(),
                    patient_id: patient.clone(),
                    template_id: started.template_id.clone(),
                    template_version: started.template_version,
                    task_name: d.name.clone(),
                    automatic: d.automatic,
                    next_attempt: next_attempt as i32,
                }))));
            } else {
                // Which orders block may change while the task stays blocked: not content.
                let mut e = base(
                    DerivedType::TaskBlocked,
                    name(wid, Some(d.task_def_id.clone()), Some(next_attempt.into())),
                );
                e.task_def_id = Some(d.task_def_id.clone());
                e.task_name = d.name.clone();
                e.attempt = Some(next_attempt);
                e.reason = Some("BLOCKING_ORDER_OPEN".into());
                e.per_transition = true;
                out.push(WfOut::Event(Arc::new(e)));
            }
        }
    }

    // Rows (escalations found by timers are merged in later, see `lib.rs`).
    out.push(WfOut::WorkflowBase(
        Arc::new(WorkflowRow {
            workflow_instance_id: wid.into(),
            patient_id: patient.clone(),
            template_id: started.template_id.clone(),
            template_version: started.template_version,
            template_name: started
                .template_name
                .clone()
                .or_else(|| template.and_then(|t| t.template_name.clone())),
            status: status.as_str().into(),
            progress_percentage: progress,
            is_escalated: escalation_reason.is_some(),
            escalation_level: if escalation_reason.is_some() { 1 } else { 0 },
            escalation_reason,
            started_at: Some(started.at),
            completed_at: if status == WfStatus::Active {
                None
            } else {
                completed_at
            },
        }),
        escalation_time,
    ));
    let active = status == WfStatus::Active;
    // Completion times of W's tasks: an escalation is answered by a completion after it.
    let completions: Vec<Millis> = tasks
        .iter()
        .filter(|t| t.status == TaskStatus::Completed)
        .filter_map(|t| t.finished_at)
        .collect();
    let re_escalate = |source: Str, at: Millis, out: &mut Vec<WfOut>| {
        if !active {
            return;
        }
        for level in 2..=rules.max_escalation_level {
            let deadline = at + (level as u64 - 1) * rules.re_escalate_after_ms;
            if completions.iter().any(|&c| c > at && c <= deadline) {
                break;
            }
            out.push(WfOut::ReEscalate(Arc::new(ReEscalation {
                workflow_instance_id: wid.into(),
                level,
                deadline,
                patient_id: patient.clone(),
                template_id: started.template_id.clone(),
                template_version: started.template_version,
                source: source.clone(),
            })));
        }
    };
    if let Some((at, reason)) = &state.upstream_escalation {
        re_escalate(
            reason.clone().unwrap_or_else(|| "UPSTREAM".into()),
            *at,
            &mut out,
        );
    }
    for task in &tasks {
        let def = template.and_then(|t| t.task(&task.task_def_id));
        let sla_due = |created: Option<Millis>, explicit: Option<Millis>| {
            explicit.or_else(|| Some(created? + u64::from(def?.sla_minutes?) * 60_000))
        };
        let due_at = sla_due(task.created_at, task.due_at_explicit);
        let task_name = task
            .task_name
            .clone()
            .or_else(|| def.and_then(|d| d.name.clone()));
        out.push(WfOut::TaskBase(Arc::new(TaskRow {
            task_instance_id: task.task_instance_id.clone(),
            workflow_instance_id: wid.into(),
            patient_id: task.patient_id.clone().or_else(|| patient.clone()),
            task_def_id: task.task_def_id.clone(),
            task_name: task_name.clone(),
            status: task.status.as_str().into(),
            attempt: task.attempt as i32,
            due_at,
            sla_breached: false,
            is_escalated: false,
            escalated_to: None,
            created_at: task.created_at,
            started_at: task.started_at,
            completed_at: task.finished_at,
            error_message: task.error_message.clone(),
        })));
        // SLA per attempt: late (data) or open (clock).
        for a in &task.attempts {
            let Some(due) = sla_due(a.created_at, a.due_at_explicit) else {
                continue;
            };
            let info = Arc::new(SlaInfo {
                task_instance_id: task.task_instance_id.clone(),
                attempt: a.attempt,
                workflow_instance_id: wid.into(),
                patient_id: task.patient_id.clone().or_else(|| patient.clone()),
                template_id: started.template_id.clone(),
                template_version: started.template_version,
                task_def_id: task.task_def_id.clone(),
                task_name: task_name.clone(),
                due_at: due,
                escalate_to: def
                    .map(|d| d.escalate_to.clone())
                    .unwrap_or_else(|| "MANAGER".into()),
            });
            let late =
                a.started_at.is_some_and(|s| s > due) || a.ended_at().is_some_and(|e| e > due);
            let open = a.ended_at().is_none()
                && a.attempt == task.attempt
                && matches!(task.status, TaskStatus::Pending | TaskStatus::InProgress);
            if late || (open && active) {
                re_escalate(
                    format!("SLA_BREACH:{}", task.task_def_id).into(),
                    due,
                    &mut out,
                );
            }
            // Still open when the workflow left ACTIVE after dueAt: the clock breached it
            // while it was in scope, and that stays a fact when the timer's scope ends (else
            // the breach would vanish, and appear again, published twice, should the attempt
            // end late afterwards).
            let open_past_due_at_close =
                !active && a.ended_at().is_none() && completed_at.is_some_and(|c| c > due);
            if late || open_past_due_at_close {
                out.push(WfOut::SlaLate(info));
            } else if open && active {
                out.push(WfOut::SlaOpen(info));
            }
        }
        if active && task.status == TaskStatus::Pending {
            out.push(WfOut::Stale(Arc::new(StaleInfo {
                task_instance_id: task.task_instance_id.clone(),
                attempt: task.attempt,
                workflow_instance_id: wid.into(),
                patient_id: task.patient_id.clone().or_else(|| patient.clone()),
                task_def_id: task.task_def_id.clone(),
                task_name,
                last_event_time: task.last_event_time,
                deadline: task.last_event_time + rules.stale_after_ms,
            })));
        }
    }
    out
}

/// The workflow rules' output, split by kind into one collection each. One pass moves each
/// output to the one operator that reads it; reading the rules' output once per kind would
/// copy every batch (all kinds) once per reader.
pub struct WfParts<'s> {
    /// Rows and derived events, passed through (events when they appear).
    pub passthrough: VecCollection<'s, u64, (String, WfOut)>,
    pub sla_late: VecCollection<'s, u64, Arc<SlaInfo>>,
    pub sla_open: VecCollection<'s, u64, Arc<SlaInfo>>,
    pub stale: VecCollection<'s, u64, Arc<StaleInfo>>,
    pub re_escalate: VecCollection<'s, u64, Arc<ReEscalation>>,
    /// (workflowInstanceId, row before escalations, time of its own escalation reason).
    pub workflow_base: VecCollection<'s, u64, (String, (Arc<WorkflowRow>, Option<Millis>))>,
    pub task_base: VecCollection<'s, u64, Arc<TaskRow>>,
}

/// Splits the workflow rules' output by kind (see [`WfParts`]).
pub fn split<'s>(wf_out: VecCollection<'s, u64, (String, WfOut)>) -> WfParts<'s> {
    use differential_dataflow::AsCollection;
    use timely::dataflow::operators::vec::Partition;
    let mut parts = wf_out
        .inner
        .partition(7, |((wid, o), t, r)| {
            let part = match &o {
                WfOut::Event(_) | WfOut::Row(_) => 0,
                WfOut::SlaLate(_) => 1,
                WfOut::SlaOpen(_) => 2,
                WfOut::Stale(_) => 3,
                WfOut::ReEscalate(_) => 4,
                WfOut::WorkflowBase(..) => 5,
                WfOut::TaskBase(_) => 6,
            };
            (part, ((wid, o), t, r))
        })
        .into_iter();
    let mut next = || parts.next().expect("seven parts").as_collection();
    let passthrough = next();
    let sla_late = next().flat_map(|(_, o)| match o {
        WfOut::SlaLate(i) => Some(i),
        _ => None,
    });
    let sla_open = next().flat_map(|(_, o)| match o {
        WfOut::SlaOpen(i) => Some(i),
        _ => None,
    });
    let stale = next().flat_map(|(_, o)| match o {
        WfOut::Stale(i) => Some(i),
        _ => None,
    });
    let re_escalate = next().flat_map(|(_, o)| match o {
        WfOut::ReEscalate(i) => Some(i),
        _ => None,
    });
    let workflow_base = next().flat_map(|(wid, o)| match o {
        WfOut::WorkflowBase(row, t) => Some((wid, (row, t))),
        _ => None,
    });
    let task_base = next().flat_map(|(_, o)| match o {
        WfOut::TaskBase(row) => Some(row),
        _ => None,
    });
    WfParts {
        passthrough,
        sla_late,
        sla_open,
        stale,
        re_escalate,
        workflow_base,
        task_base,
    }
}

/// Extension trait: the per-workflow rules.
pub trait WorkflowRules<'s> {
    /// Evaluates [`evaluate`] per workflow instance over its facts.
    fn workflow_rules(self, rules: TimeRules) -> VecCollection<'s, u64, (String, WfOut)>;
}

impl<'s> WorkflowRules<'s> for VecCollection<'s, u64, (String, WfFact)> {
    fn workflow_rules(self, rules: TimeRules) -> VecCollection<'s, u64, (String, WfOut)> {
        self.reduce_named("WorkflowRules", move |wid, input, output| {
            let facts: Vec<&WfFact> = input.iter().map(|(f, _)| *f).collect();
            let mut outs = evaluate(&Str::from(wid), &facts, &rules);
            outs.sort();
            outs.dedup();
            output.extend(outs.into_iter().map(|o| (o, 1)));
        })
    }
}
