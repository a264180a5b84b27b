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
use crate::events::{TaskDef, TaskStatus, Template, WorkflowEvent, WorkflowEventKind};
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

/// What the workflow-level rules decide that each task's rules read ([`evaluate_task`]):
/// a task evaluated twice with equal states, templates and contexts outputs the same.
#[derive(Clone, Debug, PartialEq, Eq)]
struct WfCtx {
    /// The workflow's patient: upstream's, else the first task's that names one.
    pub patient: Option<Str>,
    pub template_id: Str,
    pub template_version: i64,
    /// The workflow is ACTIVE: readiness and the clock's timer rules apply.
    pub active: bool,
    /// When the workflow left ACTIVE, if it did.
    pub completed_at: Option<Millis>,
}

/// Evaluates the contract's rules for one workflow instance from its facts: the
/// workflow's own rules ([`evaluate_workflow`]), each task's ([`evaluate_task`]), then the
/// re-escalations of what was escalated ([`re_escalations`]).
/// `wid` is shared by every row and event the workflow yields (a reference count each).
pub fn evaluate(wid: &Str, facts: &[&WfFact], rules: &TimeRules) -> Vec<WfOut> {
    let mut out = Vec::new();
    let mut state = None;
    let mut template = None;
    let mut tasks: Vec<&TaskState> = Vec::new();
    let mut orders: Vec<&OrderFact> = Vec::new();
    for f in facts {
        match f {
            WfFact::State(s) => state = Some(&**s),
            WfFact::Template(t) => template = Some(&**t),
            WfFact::Task(t) => tasks.push(t),
            WfFact::Order(o) => orders.push(o),
        }
    }
    // Without WORKFLOW_STARTED nothing about W is known yet (the events may still be on their way).
    if let Some(state) = state {
        apply_rules(wid, state, template, &tasks, &orders, rules, &mut out);
    }
    out
}

/// The rules over a workflow's facts, unpacked (what [`evaluate`] does once it has them):
/// the workflow's own ([`evaluate_workflow`]), each task's ([`evaluate_task`]), then the
/// re-escalations of what was escalated ([`re_escalations`]). Nothing before the workflow
/// started.
pub fn apply_rules(
    wid: &Str,
    state: &WfState,
    template: Option<&Template>,
    tasks: &[&TaskState],
    orders: &[&OrderFact],
    rules: &TimeRules,
    out: &mut Vec<WfOut>,
) {
    let Some(ctx) = evaluate_workflow(wid, state, template, tasks, orders, out) else {
        return;
    };
    let mut escalated: Vec<(Str, Millis)> = upstream_escalation(state).into_iter().collect();
    for task in tasks {
        evaluate_task(wid, task, template, &ctx, rules, out, &mut escalated);
    }
    re_escalations(wid, &ctx, tasks, &escalated, rules, out);
}

/// A derived event of workflow `wid` with the fields every one of its events carries.
fn workflow_event(ty: DerivedType, id: IdName, wid: &Str, ctx: &WfCtx) -> Derived {
    let mut d = Derived::named(ty, id, wid);
    d.patient_id = ctx.patient.clone();
    d.template_id = Some(ctx.template_id.clone());
    d.template_version = Some(ctx.template_version);
    d
}

/// The workflow's own rules: progress, completion and failure ([`decide`],
/// [`terminal_events`]), readiness ([`readiness`]), the workflow row ([`workflow_row`]).
/// Returns what the tasks' rules read, or `None` (and outputs nothing) before the workflow
/// started.
fn evaluate_workflow(
    wid: &Str,
    state: &WfState,
    template: Option<&Template>,
    tasks: &[&TaskState],
    orders: &[&OrderFact],
    out: &mut Vec<WfOut>,
) -> Option<WfCtx> {
    let started = state.started.as_ref()?;
    let patient = state
        .patient_id
        .clone()
        .or_else(|| tasks.iter().find_map(|t| t.patient_id.clone()));
    let summary = template.map(|t| summarize(t, tasks)).unwrap_or_default();
    let decision = decide(state, started, template, &summary);
    let ctx = WfCtx {
        patient,
        template_id: started.template_id.clone(),
        template_version: started.template_version,
        active: decision.status == WfStatus::Active,
        completed_at: decision.completed_at,
    };
    let escalation = terminal_events(wid, state, started, template, &decision, &ctx, out);
    if let (Some(t), true) = (template, ctx.active) {
        readiness(wid, t, &summary, orders, &ctx, out);
    }
    out.push(workflow_row(
        wid, started, template, &decision, &ctx, escalation,
    ));
    Some(ctx)
}

/// Per task definition of the template, what W's task instances say about it.
fn summarize<'t, 'a>(
    t: &'t Template,
    tasks: &[&'a TaskState],
) -> BTreeMap<&'t str, DefSummary<'a>> {
    let mut summary: BTreeMap<&str, DefSummary> = BTreeMap::new();
    for task in tasks {
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
            TaskStatus::Failed => s.failed_retriable = s.failed_retriable.max(Some(task.attempt)),
            TaskStatus::Pending => s.pending = s.pending.max(Some(task.attempt)),
        }
    }
    summary
}

/// What the rules decide about a workflow as a whole.
struct Decision<'a> {
    progress: i32,
    /// When every required task had completed (the latest completion, not before the start).
    completion: Option<Millis>,
    /// The task that failed for good first (of those without a failure task).
    failure: Option<&'a TaskState>,
    /// The first terminal state the rules derived, if before any upstream terminal event.
    derived_first: Option<(WfStatus, Millis)>,
    status: WfStatus,
    /// When the workflow left ACTIVE.
    completed_at: Option<Millis>,
}

/// Progress, completion and failure; the status, which an upstream terminal event decides.
fn decide<'a>(
    state: &WfState,
    started: &Started,
    template: Option<&Template>,
    summary: &BTreeMap<&str, DefSummary<'a>>,
) -> Decision<'a> {
    let mut progress = 0;
    let mut completion: Option<Millis> = None;
    let mut failure: Option<&TaskState> = None;
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
            completion = Some(
                done.iter()
                    .copied()
                    .max()
                    .unwrap_or(started.at)
                    .max(started.at),
            );
        }
        failure = t
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
    let failure_at = failure.map(|f| f.finished_at.unwrap_or(f.event_time));
    let derived: Option<(WfStatus, Millis)> = match (completion, failure_at) {
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
    Decision {
        progress,
        completion,
        failure,
        derived_first,
        status,
        completed_at,
    }
}

/// WORKFLOW_PROGRESS, and WORKFLOW_COMPLETED or WORKFLOW_FAILED (with its escalation) as
/// decided. Returns the workflow's own escalation: its reason and time (upstream
/// WORKFLOW_ESCALATED, or a derived failure).
fn terminal_events(
    wid: &Str,
    state: &WfState,
    started: &Started,
    template: Option<&Template>,
    d: &Decision,
    ctx: &WfCtx,
    out: &mut Vec<WfOut>,
) -> (Option<Str>, Option<Millis>) {
    // Ids are named, and hashed only for the events that turn out to be new.
    let name = IdName::new;
    let base = |ty: DerivedType, id: IdName| workflow_event(ty, id, wid, ctx);
    let mut escalation_reason = state
        .upstream_escalation
        .as_ref()
        .map(|(_, r)| r.clone().unwrap_or_default());
    let mut escalation_time = state.upstream_escalation.as_ref().map(|(t, _)| *t);
    if template.is_some() {
        let mut e = base(
            DerivedType::WorkflowProgress,
            name(wid, None, Some(d.progress.into())),
        );
        e.progress_percentage = Some(d.progress);
        e.per_transition = true;
        out.push(WfOut::Event(Arc::new(e)));
    }
    if let (Some((WfStatus::Completed, _)), Some(at)) = (d.derived_first, d.completion) {
        let mut e = base(DerivedType::WorkflowCompleted, name(wid, None, None));
        e.progress_percentage = Some(d.progress);
        e.duration_seconds = Some((at.saturating_sub(started.at) / 1000) as i64);
        out.push(WfOut::Event(Arc::new(e)));
    }
    if let (Some((WfStatus::Failed, _)), Some(f)) = (d.derived_first, d.failure) {
        let reason: Str = format!("TASK_FAILED:{}", f.task_def_id).into();
        let mut e = base(DerivedType::WorkflowFailed, name(wid, None, None));
        e.task_instance_id = Some(f.task_instance_id.clone());
        e.task_def_id = Some(f.task_def_id.clone());
        e.reason = Some(reason.clone());
        e.error_message = f.error_message.clone();
        e.cause_event_id = Some(f.event_id.clone());
        out.push(WfOut::Event(Arc::new(e)));
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
    (escalation_reason, escalation_time)
}

/// Readiness of an ACTIVE workflow's task definitions: TASK_READY with its row, or
/// TASK_BLOCKED. An event's content must be a function of what identifies it (its
/// eventId's name), so that it is emitted once: a readiness event names the definition,
/// not the instance (which may be created while the task stays ready).
fn readiness(
    wid: &Str,
    t: &Template,
    summary: &BTreeMap<&str, DefSummary>,
    orders: &[&OrderFact],
    ctx: &WfCtx,
    out: &mut Vec<WfOut>,
) {
    let name = IdName::new;
    let base = |ty: DerivedType, id: IdName| workflow_event(ty, id, wid, ctx);
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
        if s.is_some_and(|s| s.in_progress || s.completed.is_some() || s.failed_for_good.is_some())
        {
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
        // Content names only the readiness itself: what made it ready (which completion,
        // which order closing) is in the event's time, and which orders block may change
        // while the task stays blocked; a transition into either is one event
        // (`per_transition`).
        let ty = if blocked {
            DerivedType::TaskBlocked
        } else {
            DerivedType::TaskReady
        };
        let mut e = base(
            ty,
            name(wid, Some(d.task_def_id.clone()), Some(next_attempt.into())),
        );
        e.task_def_id = Some(d.task_def_id.clone());
        e.task_name = d.name.clone();
        e.attempt = Some(next_attempt);
        e.per_transition = true;
        if blocked {
            e.reason = Some("BLOCKING_ORDER_OPEN".into());
            out.push(WfOut::Event(Arc::new(e)));
            continue;
        }
        e.automatic = Some(d.automatic);
        out.push(WfOut::Event(Arc::new(e)));
        out.push(WfOut::Row(Arc::new(Row::Readiness(ReadinessRow {
            workflow_instance_id: wid.into(),
            task_def_id: d.task_def_id.clone(),
            patient_id: ctx.patient.clone(),
            template_id: ctx.template_id.clone(),
            template_version: ctx.template_version,
            task_name: d.name.clone(),
            automatic: d.automatic,
            next_attempt: next_attempt as i32,
        }))));
    }
}

/// The `workflow_instances` row before the timers' escalations are merged in (`lib.rs`,
/// the keyed core's step), with the time of its own escalation reason.
fn workflow_row(
    wid: &Str,
    started: &Started,
    template: Option<&Template>,
    d: &Decision,
    ctx: &WfCtx,
    (escalation_reason, escalation_time): (Option<Str>, Option<Millis>),
) -> WfOut {
    WfOut::WorkflowBase(
        Arc::new(WorkflowRow {
            workflow_instance_id: wid.into(),
            patient_id: ctx.patient.clone(),
            template_id: started.template_id.clone(),
            template_version: started.template_version,
            template_name: started
                .template_name
                .clone()
                .or_else(|| template.and_then(|t| t.template_name.clone())),
            status: d.status.as_str().into(),
            progress_percentage: d.progress,
            is_escalated: escalation_reason.is_some(),
            escalation_level: if escalation_reason.is_some() { 1 } else { 0 },
            escalation_reason,
            started_at: Some(started.at),
            completed_at: if d.status == WfStatus::Active {
                None
            } else {
                d.completed_at
            },
        }),
        escalation_time,
    )
}

/// What upstream escalated (WORKFLOW_ESCALATED): its reason as the source of
/// re-escalations, and when.
fn upstream_escalation(state: &WfState) -> Option<(Str, Millis)> {
    state
        .upstream_escalation
        .as_ref()
        .map(|(at, reason)| (reason.clone().unwrap_or_else(|| "UPSTREAM".into()), *at))
}

/// Completion times of a workflow's tasks: an escalation is answered by a completion after it.
fn completions(tasks: &[&TaskState]) -> Vec<Millis> {
    tasks
        .iter()
        .filter(|t| t.status == TaskStatus::Completed)
        .filter_map(|t| t.finished_at)
        .collect()
}

/// One task's rules: its retries ([`retries`]), its row ([`task_row`]), its SLA per
/// attempt ([`sla`]) and whether it is stale ([`stale`]). What it escalated (an SLA breach:
/// source and dueAt) is added to `escalated`.
fn evaluate_task(
    wid: &Str,
    task: &TaskState,
    template: Option<&Template>,
    ctx: &WfCtx,
    rules: &TimeRules,
    out: &mut Vec<WfOut>,
    escalated: &mut Vec<(Str, Millis)>,
) {
    let def = template.and_then(|t| t.task(&task.task_def_id));
    if let Some(def) = def {
        retries(wid, task, def, ctx, out);
    }
    let view = TaskView {
        wid,
        task,
        def,
        ctx,
        patient: task.patient_id.clone().or_else(|| ctx.patient.clone()),
        name: task
            .task_name
            .clone()
            .or_else(|| def.and_then(|d| d.name.clone())),
    };
    out.push(task_row(&view));
    sla(&view, out, escalated);
    if ctx.active && task.status == TaskStatus::Pending {
        out.push(stale(&view, rules));
    }
}

/// A task as its row and timer rules see it.
struct TaskView<'a> {
    wid: &'a Str,
    task: &'a TaskState,
    /// Its definition in the pinned template, if there is one.
    def: Option<&'a TaskDef>,
    ctx: &'a WfCtx,
    /// The task's patient, else the workflow's.
    patient: Option<Str>,
    /// The task's name, else its definition's.
    name: Option<Str>,
}

impl TaskView<'_> {
    /// An attempt's SLA deadline: its explicit dueAt, else its creation plus the
    /// definition's SLA minutes.
    fn sla_due(&self, created: Option<Millis>, explicit: Option<Millis>) -> Option<Millis> {
        explicit.or_else(|| Some(created? + u64::from(self.def?.sla_minutes?) * 60_000))
    }
}

/// Retries: a failed attempt with retries left schedules the next one (once per (task,
/// attempt)); per attempt, so a retry created in the same instant as the failure still
/// counts.
fn retries(wid: &Str, task: &TaskState, def: &TaskDef, ctx: &WfCtx, out: &mut Vec<WfOut>) {
    for a in task
        .attempts
        .iter()
        .filter(|a| a.attempt <= def.max_retries)
    {
        let Some((failed_event, error)) = &a.failed else {
            continue;
        };
        let mut d = workflow_event(
            DerivedType::TaskRetryScheduled,
            IdName::new(&task.task_instance_id, None, Some(a.attempt.into())),
            wid,
            ctx,
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

/// The `task_instances` row before the SLA breaches are merged in.
fn task_row(v: &TaskView) -> WfOut {
    let task = v.task;
    WfOut::TaskBase(Arc::new(TaskRow {
        task_instance_id: task.task_instance_id.clone(),
        workflow_instance_id: v.wid.into(),
        patient_id: v.patient.clone(),
        task_def_id: task.task_def_id.clone(),
        task_name: v.name.clone(),
        status: task.status.as_str().into(),
        attempt: task.attempt as i32,
        due_at: v.sla_due(task.created_at, task.due_at_explicit),
        sla_breached: false,
        is_escalated: false,
        escalated_to: None,
        created_at: task.created_at,
        started_at: task.started_at,
        completed_at: task.finished_at,
        error_message: task.error_message.clone(),
    }))
}

/// SLA per attempt with a deadline: breached late (the data says so) or open (the clock
/// decides). Either escalates while the workflow is ACTIVE.
fn sla(v: &TaskView, out: &mut Vec<WfOut>, escalated: &mut Vec<(Str, Millis)>) {
    let (task, ctx) = (v.task, v.ctx);
    for a in &task.attempts {
        let Some(due) = v.sla_due(a.created_at, a.due_at_explicit) else {
            continue;
        };
        let info = Arc::new(SlaInfo {
            task_instance_id: task.task_instance_id.clone(),
            attempt: a.attempt,
            workflow_instance_id: v.wid.into(),
            patient_id: v.patient.clone(),
            template_id: ctx.template_id.clone(),
            template_version: ctx.template_version,
            task_def_id: task.task_def_id.clone(),
            task_name: v.name.clone(),
            due_at: due,
            escalate_to: v
                .def
                .map(|d| d.escalate_to.clone())
                .unwrap_or_else(|| "MANAGER".into()),
        });
        let late = a.started_at.is_some_and(|s| s > due) || a.ended_at().is_some_and(|e| e > due);
        let open = a.ended_at().is_none()
            && a.attempt == task.attempt
            && matches!(task.status, TaskStatus::Pending | TaskStatus::InProgress);
        if late || (open && ctx.active) {
            escalated.push((format!("SLA_BREACH:{}", task.task_def_id).into(), due));
        }
        // Still open when the workflow left ACTIVE after dueAt: the clock breached it
        // while it was in scope, and that stays a fact when the timer's scope ends (else
        // the breach would vanish, and appear again, published twice, should the attempt
        // end late afterwards).
        let open_past_due_at_close =
            !ctx.active && a.ended_at().is_none() && ctx.completed_at.is_some_and(|c| c > due);
        if late || open_past_due_at_close {
            out.push(WfOut::SlaLate(info));
        } else if open && ctx.active {
            out.push(WfOut::SlaOpen(info));
        }
    }
}

/// A PENDING task of an ACTIVE workflow: stale when the clock passes its deadline.
fn stale(v: &TaskView, rules: &TimeRules) -> WfOut {
    let task = v.task;
    WfOut::Stale(Arc::new(StaleInfo {
        task_instance_id: task.task_instance_id.clone(),
        attempt: task.attempt,
        workflow_instance_id: v.wid.into(),
        patient_id: v.patient.clone(),
        task_def_id: task.task_def_id.clone(),
        task_name: v.name.clone(),
        last_event_time: task.last_event_time,
        deadline: task.last_event_time + rules.stale_after_ms,
    }))
}

/// Re-escalations (levels 2 up to the highest) of what was escalated at `at`, while the
/// workflow is ACTIVE and no task completed in between.
fn re_escalations(
    wid: &Str,
    ctx: &WfCtx,
    tasks: &[&TaskState],
    escalated: &[(Str, Millis)],
    rules: &TimeRules,
    out: &mut Vec<WfOut>,
) {
    if !ctx.active || escalated.is_empty() {
        return;
    }
    let completions = completions(tasks);
    for (source, at) in escalated {
        let at = *at;
        for level in 2..=rules.max_escalation_level {
            let deadline = at + (level as u64 - 1) * rules.re_escalate_after_ms;
            if completions.iter().any(|&c| c > at && c <= deadline) {
                break;
            }
            out.push(WfOut::ReEscalate(Arc::new(ReEscalation {
                workflow_instance_id: wid.into(),
                level,
                deadline,
                patient_id: ctx.patient.clone(),
                template_id: ctx.template_id.clone(),
                template_version: ctx.template_version,
                source: source.clone(),
            })));
        }
    }
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
