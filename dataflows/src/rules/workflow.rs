//! The workflow's own rules, composed (contract §4): what its tasks say per definition
//! ([`summarize`]), progress, completion and failure ([`super::progress`]), readiness
//! ([`super::readiness`](mod@super::readiness)), its row ([`workflow_row`]); and the context
//! every task's rules read of it ([`WfCtx`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::derived::{Derived, DerivedType, IdName};
use crate::events::{TaskStatus, Template};
use crate::model::{Str, WfStatus};
use crate::output::{Millis, WorkflowRow};
use crate::tasks::TaskState;
use crate::workflows::{OrderFact, Started, WfOut, WfState};

use super::{decide, readiness, terminal_events, Decision};

/// Per task definition, what the instances of W say about it.
#[derive(Default, Debug)]
pub(crate) struct DefSummary<'a> {
    pub(crate) completed: Option<&'a TaskState>,
    pub(crate) in_progress: bool,
    pub(crate) failed_for_good: Option<&'a TaskState>,
    /// Highest failed attempt that still had retries left.
    pub(crate) failed_retriable: Option<u32>,
    /// Highest attempt created and waiting (PENDING).
    pub(crate) pending: Option<u32>,
}

impl DefSummary<'_> {
    /// The attempt an executor works on next: a waiting one, else the retry of a failed one,
    /// else 1.
    pub(crate) fn next_attempt(&self) -> u32 {
        self.pending
            .unwrap_or(1)
            .max(self.failed_retriable.map(|a| a + 1).unwrap_or(1))
    }
}

/// What the workflow-level rules decide that each task's rules read
/// ([`super::evaluate_task`]): a task evaluated twice with equal states, templates and
/// contexts outputs the same.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct WfCtx {
    /// The workflow's patient: upstream's, else the first task's that names one.
    pub(crate) patient: Option<Str>,
    pub(crate) template_id: Str,
    pub(crate) template_version: i64,
    /// The workflow is ACTIVE: readiness and the clock's timer rules apply.
    pub(crate) active: bool,
    /// When the workflow left ACTIVE, if it did.
    pub(crate) completed_at: Option<Millis>,
}

/// A derived event of workflow `wid` with the fields every one of its events carries.
pub(crate) fn workflow_event(ty: DerivedType, id: IdName, wid: &Str, ctx: &WfCtx) -> Derived {
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
pub(crate) fn evaluate_workflow(
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
pub(crate) fn summarize<'t, 'a>(
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

/// The `workflow_instances` row before the timers' escalations are merged in (`lib.rs`,
/// the keyed core's step), with the time of its own escalation reason.
pub(crate) fn workflow_row(
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
            status: d.status,
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
