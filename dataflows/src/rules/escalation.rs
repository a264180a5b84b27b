//! Escalations (contract §4): what upstream escalated, and re-escalations (levels 2 up to
//! the highest) of what was escalated while no task completed.

use std::sync::Arc;

use crate::events::TaskStatus;
use crate::model::Str;
use crate::output::Millis;
use crate::tasks::TaskState;
use crate::workflows::{Clock, ReEscalation, TimeRules, WfOut, WfState};

use super::WfCtx;

/// What was escalated, the source of its re-escalations: named only when a re-escalation
/// is output in full.
pub(crate) enum Escalated<'a> {
    /// Upstream's WORKFLOW_ESCALATED, with its reason.
    Upstream(Str),
    /// An SLA breach of a task of this definition (`SLA_BREACH:<taskDefId>`).
    SlaBreach(&'a Str),
}

impl Escalated<'_> {
    fn source(&self) -> Str {
        match self {
            Escalated::Upstream(reason) => reason.clone(),
            Escalated::SlaBreach(def) => format!("SLA_BREACH:{def}").into(),
        }
    }
}

/// What upstream escalated (WORKFLOW_ESCALATED): its reason as the source of
/// re-escalations, and when.
pub(crate) fn upstream_escalation(state: &WfState) -> Option<(Str, Millis)> {
    state
        .upstream_escalation
        .as_ref()
        .map(|(at, reason)| (reason.clone().unwrap_or_else(|| "UPSTREAM".into()), *at))
}

/// Completion times of a workflow's tasks: an escalation is answered by a completion after it.
pub(crate) fn completions(tasks: &[&TaskState]) -> Vec<Millis> {
    tasks
        .iter()
        .filter(|t| t.status == TaskStatus::Completed)
        .filter_map(|t| t.finished_at)
        .collect()
}

/// Re-escalations (levels 2 up to the highest) of what was escalated at `at`, while the
/// workflow is ACTIVE and no task completed in between.
pub(crate) fn re_escalations(
    wid: &Str,
    ctx: &WfCtx,
    tasks: &[&TaskState],
    escalated: &[(Escalated, Millis)],
    rules: &TimeRules,
    clock: Clock,
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
            if !clock.due(deadline) {
                out.push(WfOut::Wake(deadline));
                continue;
            }
            out.push(WfOut::ReEscalate(Arc::new(ReEscalation {
                workflow_instance_id: wid.into(),
                level,
                deadline,
                patient_id: ctx.patient.clone(),
                template_id: ctx.template_id.clone(),
                template_version: ctx.template_version,
                source: source.source(),
            })));
        }
    }
}
