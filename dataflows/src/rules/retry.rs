//! Retries (contract §4): a failed attempt with retries left schedules the next one.

use std::sync::Arc;

use crate::derived::{DerivedType, IdName};
use crate::events::TaskDef;
use crate::model::Str;
use crate::tasks::TaskState;
use crate::workflows::WfOut;

use super::{workflow_event, WfCtx};

/// Retries: a failed attempt with retries left schedules the next one (once per (task,
/// attempt)); per attempt, so a retry created in the same instant as the failure still
/// counts.
pub(crate) fn retries(
    wid: &Str,
    task: &TaskState,
    def: &TaskDef,
    ctx: &WfCtx,
    out: &mut Vec<WfOut>,
) {
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
