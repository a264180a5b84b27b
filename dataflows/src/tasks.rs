//! Task state (contract §4): the current state of a task instance from its events.
//!
//! The state is defined on the *set* of a task's events, not on their arrival order:
//! the winner is the event with the highest (attempt, lifecycle rank), ties to the later
//! eventTime (then the later offset, so the choice is total). Duplicate eventIds count
//! once (the first by position wins).

use crate::model::Str;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use differential_dataflow::VecCollection;

use crate::events::{TaskEvent, TaskStatus};
use crate::output::Millis;

/// The current state of one task instance.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TaskState {
    pub task_instance_id: Str,
    pub workflow_instance_id: Str,
    pub patient_id: Option<Str>,
    pub task_def_id: Str,
    pub task_name: Option<Str>,
    pub status: TaskStatus,
    pub attempt: u32,
    /// eventTime of the winning event.
    pub event_time: Millis,
    /// eventId of the winning event (the cause of what follows from this state).
    pub event_id: Str,
    /// eventTime of the TASK_CREATED of the current attempt.
    pub created_at: Option<Millis>,
    /// `dueAt` of the TASK_CREATED of the current attempt, when it carried one.
    pub due_at_explicit: Option<Millis>,
    /// eventTime of the TASK_STARTED of the current attempt.
    pub started_at: Option<Millis>,
    /// eventTime of the TASK_COMPLETED / TASK_FAILED that decided the current attempt.
    pub finished_at: Option<Millis>,
    pub error_message: Option<Str>,
    /// eventTime of the task's most recent event (any attempt).
    pub last_event_time: Millis,
    /// Every attempt seen, in attempt order (SLA is per attempt, also for superseded ones).
    pub attempts: Vec<AttemptInfo>,
}

/// What happened to one attempt of a task.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AttemptInfo {
    pub attempt: u32,
    /// eventTime of this attempt's TASK_CREATED.
    pub created_at: Option<Millis>,
    /// `dueAt` carried by that TASK_CREATED.
    pub due_at_explicit: Option<Millis>,
    /// eventTime of this attempt's first TASK_STARTED.
    pub started_at: Option<Millis>,
    /// eventTime of this attempt's first TASK_COMPLETED / TASK_FAILED.
    pub finished_at: Option<Millis>,
    /// eventTime of the earliest event of a higher attempt (the attempt was superseded).
    pub superseded_at: Option<Millis>,
    /// The attempt's TASK_FAILED, if it failed: (eventId, errorMessage).
    pub failed: Option<(Str, Option<Str>)>,
}

impl AttemptInfo {
    /// When the attempt stopped being open: finished, or superseded by a retry.
    pub fn ended_at(&self) -> Option<Millis> {
        match (self.finished_at, self.superseded_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// Removes duplicate eventIds, keeping the first by input position.
pub fn dedup_by_event_id<'a>(
    events: impl IntoIterator<Item = &'a TaskEvent>,
) -> Vec<&'a TaskEvent> {
    let mut v: Vec<&TaskEvent> = events.into_iter().collect();
    v.sort_by(|a, b| a.event_id.cmp(&b.event_id).then(a.pos.cmp(&b.pos)));
    v.dedup_by(|b, a| a.event_id == b.event_id);
    v
}

/// Folds the (deduplicated) events of one task instance into its state.
pub fn fold_task(events: &[&TaskEvent]) -> Option<TaskState> {
    let winner = events
        .iter()
        .max_by_key(|e| (e.attempt, e.status.rank(), e.event_time, e.pos))?;
    let same_attempt = || events.iter().filter(|e| e.attempt == winner.attempt);
    let created = same_attempt()
        .filter(|e| e.status == TaskStatus::Pending)
        .min_by_key(|e| (e.event_time, e.pos));
    let started = same_attempt()
        .filter(|e| e.status == TaskStatus::InProgress)
        .min_by_key(|e| (e.event_time, e.pos));
    let finished_at = matches!(winner.status, TaskStatus::Completed | TaskStatus::Failed)
        .then_some(winner.event_time);
    let patient_id = winner
        .patient_id
        .clone()
        .or_else(|| events.iter().find_map(|e| e.patient_id.clone()));
    let task_name = winner
        .task_name
        .clone()
        .or_else(|| events.iter().find_map(|e| e.task_name.clone()));
    Some(TaskState {
        task_instance_id: winner.task_instance_id.clone(),
        workflow_instance_id: winner.workflow_instance_id.clone(),
        patient_id,
        task_def_id: winner.task_def_id.clone(),
        task_name,
        status: winner.status,
        attempt: winner.attempt,
        event_time: winner.event_time,
        event_id: winner.event_id.clone(),
        created_at: created.map(|e| e.event_time),
        due_at_explicit: created.and_then(|e| e.due_at),
        started_at: started.map(|e| e.event_time),
        finished_at,
        error_message: if winner.status == TaskStatus::Failed {
            winner.error_message.clone()
        } else {
            None
        },
        last_event_time: events
            .iter()
            .map(|e| e.event_time)
            .max()
            .unwrap_or(winner.event_time),
        attempts: attempts(events),
    })
}

fn attempts(events: &[&TaskEvent]) -> Vec<AttemptInfo> {
    let mut numbers: Vec<u32> = events.iter().map(|e| e.attempt).collect();
    numbers.sort_unstable();
    numbers.dedup();
    numbers
        .iter()
        .map(|&a| {
            let of = |st: TaskStatus| {
                events
                    .iter()
                    .filter(|e| e.attempt == a && e.status == st)
                    .min_by_key(|e| (e.event_time, e.pos))
            };
            let created = of(TaskStatus::Pending);
            let finished = events
                .iter()
                .filter(|e| {
                    e.attempt == a && matches!(e.status, TaskStatus::Completed | TaskStatus::Failed)
                })
                .map(|e| e.event_time)
                .min();
            AttemptInfo {
                attempt: a,
                created_at: created.map(|e| e.event_time),
                due_at_explicit: created.and_then(|e| e.due_at),
                started_at: of(TaskStatus::InProgress).map(|e| e.event_time),
                finished_at: finished,
                superseded_at: events
                    .iter()
                    .filter(|e| e.attempt > a)
                    .map(|e| e.event_time)
                    .min(),
                failed: of(TaskStatus::Failed)
                    .map(|e| (e.event_id.clone(), e.error_message.clone())),
            }
        })
        .collect()
}

/// Extension trait: the task-state operator.
pub trait TaskStates<'s> {
    /// One [`TaskState`] per task instance, keyed by taskInstanceId.
    fn task_states(self) -> VecCollection<'s, u64, (String, Arc<TaskState>)>;
}

impl<'s> TaskStates<'s> for VecCollection<'s, u64, Arc<TaskEvent>> {
    fn task_states(self) -> VecCollection<'s, u64, (String, Arc<TaskState>)> {
        self.map(|e| (e.task_instance_id.to_string(), e))
            .reduce_named("TaskState", |_key, input, output| {
                let events = dedup_by_event_id(input.iter().map(|(e, _)| &***e));
                if let Some(state) = fold_task(&events) {
                    output.push((Arc::new(state), 1));
                }
            })
    }
}
