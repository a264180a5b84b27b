//! Stale tasks (contract §4): a PENDING task of an ACTIVE workflow with no event for
//! `stale_after_ms`.

use std::sync::Arc;

use crate::workflows::{Clock, StaleInfo, TimeRules, WfOut};

use super::TaskView;

/// A PENDING task of an ACTIVE workflow: stale when the clock passes its deadline.
pub(crate) fn stale(v: &TaskView, rules: &TimeRules, clock: Clock) -> WfOut {
    let task = v.task;
    let deadline = task.last_event_time + rules.stale_after_ms;
    if !clock.due(deadline) {
        return WfOut::Wake(deadline);
    }
    WfOut::Stale(Arc::new(StaleInfo {
        task_instance_id: task.task_instance_id.clone(),
        attempt: task.attempt,
        workflow_instance_id: v.wid.into(),
        patient_id: v.patient.clone(),
        task_def_id: task.task_def_id.clone(),
        task_name: v.name.clone(),
        last_event_time: task.last_event_time,
        deadline,
    }))
}
