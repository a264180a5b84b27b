//! A task's rules (contract §4), composed: its retries ([`super::retry`]), its row
//! ([`task_row`]), its SLA per attempt ([`super::sla`](mod@super::sla)), whether it is stale
//! ([`super::stale`](mod@super::stale)).

use std::sync::Arc;

use crate::events::{TaskDef, TaskStatus, Template};
use crate::model::Str;
use crate::output::{Millis, TaskRow};
use crate::tasks::TaskState;
use crate::workflows::{Clock, TimeRules, WfOut};

use super::{retries, sla, stale, Escalated, WfCtx};

/// One task's rules: its retries ([`retries`]), its row ([`task_row`]), its SLA per
/// attempt ([`sla`]) and whether it is stale ([`stale`]). What it escalated (an SLA breach:
/// source and dueAt) is added to `escalated`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn evaluate_task<'a>(
    wid: &'a Str,
    task: &'a TaskState,
    template: Option<&'a Template>,
    ctx: &'a WfCtx,
    rules: &TimeRules,
    clock: Clock,
    out: &mut Vec<WfOut>,
    escalated: &mut Vec<(Escalated<'a>, Millis)>,
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
    sla(&view, clock, out, escalated);
    if ctx.active && task.status == TaskStatus::Pending {
        out.push(stale(&view, rules, clock));
    }
}

/// A task as its row and timer rules see it.
pub(crate) struct TaskView<'a> {
    pub(crate) wid: &'a Str,
    pub(crate) task: &'a TaskState,
    /// Its definition in the pinned template, if there is one.
    pub(crate) def: Option<&'a TaskDef>,
    pub(crate) ctx: &'a WfCtx,
    /// The task's patient, else the workflow's.
    pub(crate) patient: Option<Str>,
    /// The task's name, else its definition's.
    pub(crate) name: Option<Str>,
}

impl TaskView<'_> {
    /// An attempt's SLA deadline: its explicit dueAt, else its creation plus the
    /// definition's SLA minutes.
    pub(crate) fn sla_due(
        &self,
        created: Option<Millis>,
        explicit: Option<Millis>,
    ) -> Option<Millis> {
        explicit.or_else(|| Some(created? + u64::from(self.def?.sla_minutes?) * 60_000))
    }
}

/// The `task_instances` row before the SLA breaches are merged in.
pub(crate) fn task_row(v: &TaskView) -> WfOut {
    let task = v.task;
    WfOut::TaskBase(Arc::new(TaskRow {
        task_instance_id: task.task_instance_id.clone(),
        workflow_instance_id: v.wid.into(),
        patient_id: v.patient.clone(),
        task_def_id: task.task_def_id.clone(),
        task_name: v.name.clone(),
        status: task.status,
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
