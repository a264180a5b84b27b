//! Progress, completion and failure of a workflow (contract §4): what the rules decide
//! ([`decide`]) and the events that follow ([`terminal_events`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::derived::{DerivedType, IdName};
use crate::events::{Template, WorkflowEventKind};
use crate::model::{Str, WfStatus};
use crate::output::Millis;
use crate::tasks::TaskState;
use crate::workflows::{Started, WfOut, WfState};

use super::{workflow_event, DefSummary, WfCtx};

/// What the rules decide about a workflow as a whole.
pub(crate) struct Decision<'a> {
    pub(crate) progress: i32,
    /// When every required task had completed (the latest completion, not before the start).
    pub(crate) completion: Option<Millis>,
    /// The task that failed for good first (of those without a failure task).
    pub(crate) failure: Option<&'a TaskState>,
    /// The first terminal state the rules derived, if before any upstream terminal event.
    pub(crate) derived_first: Option<(WfStatus, Millis)>,
    pub(crate) status: WfStatus,
    /// When the workflow left ACTIVE.
    pub(crate) completed_at: Option<Millis>,
}

/// Progress, completion and failure; the status, which an upstream terminal event decides.
pub(crate) fn decide<'a>(
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
pub(crate) fn terminal_events(
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
