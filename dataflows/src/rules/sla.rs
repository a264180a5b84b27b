//! SLA per task attempt (contract §4): breached late (the data says so) or open (the clock
//! decides), and what it escalates.

use std::sync::Arc;

use crate::events::TaskStatus;
use crate::output::Millis;
use crate::workflows::{Clock, SlaInfo, WfOut};

use super::{Escalated, TaskView};

/// SLA per attempt with a deadline: breached late (the data says so) or open (the clock
/// decides). Either escalates while the workflow is ACTIVE.
pub(crate) fn sla<'a>(
    v: &TaskView<'a>,
    clock: Clock,
    out: &mut Vec<WfOut>,
    escalated: &mut Vec<(Escalated<'a>, Millis)>,
) {
    let (task, ctx) = (v.task, v.ctx);
    for a in &task.attempts {
        let Some(due) = v.sla_due(a.created_at, a.due_at_explicit) else {
            continue;
        };
        let info = || {
            Arc::new(SlaInfo {
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
            })
        };
        let late = a.started_at.is_some_and(|s| s > due) || a.ended_at().is_some_and(|e| e > due);
        let open = a.ended_at().is_none()
            && a.attempt == task.attempt
            && matches!(task.status, TaskStatus::Pending | TaskStatus::InProgress);
        if late || (open && ctx.active) {
            escalated.push((Escalated::SlaBreach(&task.task_def_id), due));
        }
        // Still open when the workflow left ACTIVE after dueAt: the clock breached it
        // while it was in scope, and that stays a fact when the timer's scope ends (else
        // the breach would vanish, and appear again, published twice, should the attempt
        // end late afterwards).
        let open_past_due_at_close =
            !ctx.active && a.ended_at().is_none() && ctx.completed_at.is_some_and(|c| c > due);
        if late || open_past_due_at_close {
            out.push(WfOut::SlaLate(info()));
        } else if open && ctx.active {
            out.push(if clock.due(due) {
                WfOut::SlaOpen(info())
            } else {
                WfOut::Wake(due)
            });
        }
    }
}
