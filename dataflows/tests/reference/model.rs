//! A deliberately simple, from-scratch model of contract §4 (tasks, readiness, progress,
//! completion, failure, retries) and §5 (the order lifecycle as far as readiness needs it).
//!
//! It is written independently of `src/workflows.rs`, `src/tasks.rs` and `src/orders.rs`: it
//! uses only the decoded event *types*. It is a function of the final multiset of input
//! events. Where a rule depends on "when" (§4 "each time D becomes ready", "when it reaches
//! 100 and W is not FAILED", §8 "a workflow that is COMPLETED or FAILED stays so"), "when"
//! is eventTime: the model replays every distinct eventTime of a workflow's events in order
//! and evaluates the rules on the state as of that instant (all events with eventTime ≤ t).
//! That is what `clock = event` promises (§8: the same results however partitions are
//! interleaved, batched or restarted).
//!
//! Readings where the contract is silent, matching what `src/workflows.rs` documents or does:
//! - A workflow is known only once a WORKFLOW_STARTED exists (the earliest one counts);
//!   before that there are no rows for it or its tasks. Its template is the version the start
//!   names, if that version exists (the latest record by position; a tombstone deletes it).
//! - Without its template a workflow has progress 0, no readiness, no derived events, and
//!   status ACTIVE unless upstream sent a terminal event.
//! - A template with no required task is 100% as soon as the workflow starts (so it
//!   completes at once).
//! - Upstream WORKFLOW_COMPLETED / WORKFLOW_FAILED: the latest by (eventTime, offset) sets the
//!   status and overrides anything derived; a derivation that happens after an upstream
//!   terminal event emits nothing (W is already COMPLETED or FAILED, so it does not "become"
//!   so). A derivation *before* it was emitted at that instant and stays emitted.
//! - If, at one instant, a task fails for good and progress reaches 100, FAILED wins.
//! - WORKFLOW_PROGRESS is emitted for every distinct progress value, the initial 0 included,
//!   whatever the status.
//! - TASK_RETRY_SCHEDULED: once per (task, attempt) whose state was FAILED with
//!   attempt <= maxRetries at some instant, whatever the workflow status (template needed).
//! - A failure task (some definition's failureTaskId) is ready by the failure rule only; its
//!   nextTaskId predecessors (if any) do not make it ready.
//! - The escalation flag is set by an upstream WORKFLOW_ESCALATED or by a derived failure
//!   (which emits WORKFLOW_ESCALATED) and stays set (§4).
//! - Duplicates: of the events sharing an eventId, the one with the lowest position counts.
//! - An order belongs to the workflow its events name, and exists from its first accepted
//!   event; ORDER_COMPENSATION_COMPLETED changes no status and is accepted on any existing order.
//! - Task states tie on (attempt, rank, eventTime): the later offset wins.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use hmis_dataflows::events::{
    Event, OrderEvent, OrderEventKind, OrderStatus, Pos, TaskDef, TaskEvent, TaskStatus, Template,
    WorkflowEvent, WorkflowEventKind,
};
use hmis_dataflows::model::Str;
use hmis_dataflows::output::Millis;

/// What the contract says the pipeline must produce for a final set of input events.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Expected {
    /// `task_readiness`: ready (workflowInstanceId, taskDefId) of ACTIVE workflows.
    pub ready: BTreeSet<(String, String)>,
    /// `workflow_instances`: status, progress, escalation flag.
    pub workflows: BTreeMap<String, WfRow>,
    /// `task_instances`: status and attempt per taskInstanceId.
    pub tasks: BTreeMap<String, (String, u32)>,
    /// Workflows for which hmis-flow derives WORKFLOW_COMPLETED.
    pub completed: BTreeSet<String>,
    /// Workflows for which hmis-flow derives WORKFLOW_FAILED, with the failing taskDefId
    /// (also the WORKFLOW_ESCALATED reason `TASK_FAILED:<taskDefId>`).
    pub failed: BTreeMap<String, String>,
    /// eventTime at which each derived completion / failure happened.
    pub completed_at: BTreeMap<String, Millis>,
    pub failed_at: BTreeMap<String, Millis>,
    /// Workflows that, after their derived completion, had a task fail for good (no failure
    /// task, no upstream terminal event before): they stay COMPLETED (§8).
    pub failure_after_completion: BTreeSet<String>,
    /// eventTimes of upstream WORKFLOW_COMPLETED / WORKFLOW_FAILED per workflow.
    pub upstream_terminals: BTreeMap<String, Vec<Millis>>,
    /// TASK_RETRY_SCHEDULED: (taskInstanceId, the attempt to schedule).
    pub retries: BTreeSet<(String, u32)>,
    /// WORKFLOW_PROGRESS: every (workflow, progress) the workflow went through.
    pub progress: BTreeSet<(String, i32)>,
    /// Number of times (W, D) became ready (each emits TASK_READY): from not ready, or from
    /// ready for another attempt (a task that failed with retries left is ready for its retry).
    pub ready_episodes: BTreeMap<(String, String), usize>,
    /// Pairs that stopped being ready, before being started, because a blocking order appeared:
    /// each of these must have emitted TASK_BLOCKED.
    pub blocked_required: BTreeSet<(String, String)>,
    /// Pairs that were, at some instant, ready but for an open blocking order: the most that
    /// may carry a TASK_BLOCKED (the project also reports a task that *would* become ready).
    pub blocked_possible: BTreeSet<(String, String)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WfRow {
    pub status: &'static str,
    pub progress: i32,
    pub escalated: bool,
}

impl Expected {
    /// Pairs ready at some instant.
    pub fn ever_ready(&self) -> BTreeSet<(String, String)> {
        self.ready_episodes.keys().cloned().collect()
    }
}

fn rank(s: TaskStatus) -> u8 {
    match s {
        TaskStatus::Pending => 0,
        TaskStatus::InProgress => 1,
        TaskStatus::Completed | TaskStatus::Failed => 2,
    }
}

/// Keeps, per eventId, the event with the lowest position.
fn first_per_id<T: Clone>(
    events: Vec<T>,
    id: impl Fn(&T) -> Str,
    pos: impl Fn(&T) -> Pos,
) -> Vec<T> {
    let mut best: BTreeMap<Str, T> = BTreeMap::new();
    for e in events {
        let k = id(&e);
        match best.get(&k) {
            Some(b) if pos(b) <= pos(&e) => {}
            _ => {
                best.insert(k, e);
            }
        }
    }
    best.into_values().collect()
}

/// The task's current event as of `t`: highest (attempt, rank), ties to the later eventTime.
fn task_at(events: &[TaskEvent], t: Millis) -> Option<&TaskEvent> {
    let mut best: Option<&TaskEvent> = None;
    for e in events.iter().filter(|e| e.event_time <= t) {
        best = match best {
            None => Some(e),
            Some(b) => {
                let ke = (e.attempt, rank(e.status), e.event_time, e.pos);
                let kb = (b.attempt, rank(b.status), b.event_time, b.pos);
                Some(if ke > kb { e } else { b })
            }
        };
    }
    best
}

/// §5 lifecycle, by event kind (the decoder already ties each kind to its target status).
fn lifecycle_allows(from: Option<OrderStatus>, kind: OrderEventKind) -> bool {
    use OrderEventKind as K;
    use OrderStatus as S;
    let Some(from) = from else {
        return kind == K::Created;
    };
    match kind {
        K::Created => false,
        K::Authorized => from == S::Proposed,
        K::Activated => from == S::Authorized,
        K::Started => from == S::Activated,
        K::Resulted => from == S::Activated || from == S::InProgress,
        K::Verified => [S::Resulted, S::Dispensed, S::Completed].contains(&from),
        K::Closed => from == S::Verified,
        K::Cancelled => from != S::Closed && from != S::Cancelled,
        K::CompensationCompleted => true,
    }
}

/// §5 default eligibility.
fn may_authorize(order_type: &str, role: Option<&str>) -> bool {
    let Some(role) = role else { return false };
    match order_type {
        "LAB_TEST" | "IMAGING" => role == "PHYSICIAN" || role == "NURSE_PRACTITIONER",
        "MEDICATION" => role == "PHYSICIAN",
        "SURGERY" => role == "SURGEON",
        _ => role == "PHYSICIAN",
    }
}

/// The order's (status, type) as of `t`, `None` while no event of it was accepted.
fn order_at(events: &[OrderEvent], t: Millis) -> Option<(OrderStatus, Option<Str>)> {
    let mut evs: Vec<&OrderEvent> = events.iter().filter(|e| e.event_time <= t).collect();
    evs.sort_by_key(|e| (e.event_time, e.pos));
    let mut status: Option<OrderStatus> = None;
    let mut ty: Option<Str> = None;
    for e in evs {
        if !lifecycle_allows(status, e.kind) {
            continue;
        }
        if e.kind == OrderEventKind::Authorized {
            let t = e
                .order_type
                .clone()
                .or_else(|| ty.clone())
                .unwrap_or_default();
            if !may_authorize(&t, e.actor_role.as_deref()) {
                continue;
            }
        }
        if e.order_type.is_some() {
            ty = e.order_type.clone();
        }
        if e.kind != OrderEventKind::CompensationCompleted {
            status = e.order_status;
        }
    }
    status.map(|s| (s, ty))
}

fn is_open(s: OrderStatus) -> bool {
    use OrderStatus as S;
    !matches!(
        s,
        S::Resulted | S::Dispensed | S::Completed | S::Verified | S::Closed | S::Cancelled
    )
}

fn status_str(s: TaskStatus) -> &'static str {
    match s {
        TaskStatus::Pending => "PENDING",
        TaskStatus::InProgress => "IN_PROGRESS",
        TaskStatus::Completed => "COMPLETED",
        TaskStatus::Failed => "FAILED",
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Terminal {
    Completed,
    Failed,
}

/// Computes what the contract requires for `events` (the final multiset of input events).
pub fn expect(events: &[Event]) -> Expected {
    let mut defs = Vec::new();
    let mut tasks = Vec::new();
    let mut wfs = Vec::new();
    let mut orders = Vec::new();
    for e in events {
        match e {
            Event::Definition(d) => defs.push(d.clone()),
            Event::Task(t) => tasks.push(t.clone()),
            Event::Workflow(w) => wfs.push(w.clone()),
            Event::Order(o) => orders.push(o.clone()),
            Event::System(_) => {}
        }
    }
    let tasks = first_per_id(tasks, |e: &TaskEvent| e.event_id.clone(), |e| e.pos);
    let wfs = first_per_id(wfs, |e: &WorkflowEvent| e.event_id.clone(), |e| e.pos);
    let orders = first_per_id(orders, |e: &OrderEvent| e.event_id.clone(), |e| e.pos);

    // Templates: per (id, version) the record with the highest position; a tombstone deletes.
    let mut latest: BTreeMap<(Str, i64), (Pos, Option<Arc<Template>>)> = BTreeMap::new();
    for d in defs {
        let k = (d.template_id.clone(), d.version);
        if latest.get(&k).is_none_or(|(p, _)| *p < d.pos) {
            latest.insert(k, (d.pos, d.template.clone()));
        }
    }

    // A workflow is known when its pinned version exists (every definition is read before
    // any event here, so "exists" is the latest record's verdict); the records of any other
    // workflow are dead-lettered once their grace has passed (contract §7).

    // Group by workflow.
    let mut wf_events: BTreeMap<String, Vec<WorkflowEvent>> = BTreeMap::new();
    for e in wfs {
        wf_events
            .entry(e.workflow_instance_id.to_string())
            .or_default()
            .push(e);
    }
    let mut task_events: BTreeMap<String, BTreeMap<String, Vec<TaskEvent>>> = BTreeMap::new();
    for e in tasks {
        task_events
            .entry(e.workflow_instance_id.to_string())
            .or_default()
            .entry(e.task_instance_id.to_string())
            .or_default()
            .push(e);
    }
    let mut order_events: BTreeMap<String, BTreeMap<String, Vec<OrderEvent>>> = BTreeMap::new();
    for e in orders {
        let Some(w) = e.workflow_instance_id.as_deref().map(str::to_string) else {
            continue;
        };
        order_events
            .entry(w)
            .or_default()
            .entry(e.order_id.to_string())
            .or_default()
            .push(e);
    }

    let mut out = Expected::default();
    let empty_tasks = BTreeMap::new();
    let empty_orders = BTreeMap::new();
    for (wid, wevs) in &wf_events {
        let Some(start) = wevs
            .iter()
            .filter(|e| e.kind == WorkflowEventKind::Started)
            .min_by_key(|e| (e.event_time, e.pos))
        else {
            continue;
        };
        let pinned = (
            start.template_id.clone().unwrap_or_default(),
            start.template_version.unwrap_or_default(),
        );
        if latest.get(&pinned).is_none_or(|(_, t)| t.is_none()) {
            continue;
        }
        let tasks_of_w = task_events.get(wid).unwrap_or(&empty_tasks);
        let orders_of_w = order_events.get(wid).unwrap_or(&empty_orders);
        let template: Option<Arc<Template>> = latest
            .get(&(
                start.template_id.clone().unwrap_or_default(),
                start.template_version.unwrap_or_default(),
            ))
            .and_then(|(_, t)| t.clone());
        let upstream_at = |t: Millis| -> Option<Terminal> {
            wevs.iter()
                .filter(|e| e.event_time <= t)
                .filter(|e| {
                    matches!(
                        e.kind,
                        WorkflowEventKind::Completed | WorkflowEventKind::Failed
                    )
                })
                .max_by_key(|e| (e.event_time, e.pos))
                .map(|e| {
                    if e.kind == WorkflowEventKind::Completed {
                        Terminal::Completed
                    } else {
                        Terminal::Failed
                    }
                })
        };

        let mut instants: BTreeSet<Millis> = BTreeSet::new();
        instants.insert(start.event_time);
        instants.extend(wevs.iter().map(|e| e.event_time));
        instants.extend(tasks_of_w.values().flatten().map(|e| e.event_time));
        instants.extend(orders_of_w.values().flatten().map(|e| e.event_time));
        instants.retain(|t| *t >= start.event_time);

        let mut derived: Option<Terminal> = None;
        // Ready definitions and the attempt each is ready for.
        let mut prev_ready: BTreeMap<String, u32> = BTreeMap::new();
        let mut status = "ACTIVE";
        let mut progress = 0;
        for &t in &instants {
            let up = upstream_at(t);
            let Some(tpl) = &template else {
                status = match up {
                    Some(Terminal::Completed) => "COMPLETED",
                    Some(Terminal::Failed) => "FAILED",
                    None => "ACTIVE",
                };
                continue;
            };
            let def =
                |id: &str| -> Option<&TaskDef> { tpl.tasks.iter().find(|d| d.task_def_id == id) };
            // Current state of every task instance of W, as of t.
            let states: Vec<(&str, &TaskEvent)> = tasks_of_w
                .iter()
                .filter_map(|(tid, evs)| task_at(evs, t).map(|e| (tid.as_str(), e)))
                .collect();
            let of_def = |d: &str| -> Vec<&TaskEvent> {
                states
                    .iter()
                    .filter(|(_, e)| e.task_def_id == d)
                    .map(|(_, e)| *e)
                    .collect()
            };
            let failed_for_good = |d: &TaskDef| {
                of_def(&d.task_def_id)
                    .iter()
                    .any(|e| e.status == TaskStatus::Failed && e.attempt > d.max_retries)
            };
            let has_completed =
                |d: &str| of_def(d).iter().any(|e| e.status == TaskStatus::Completed);

            let required: Vec<&TaskDef> = tpl.tasks.iter().filter(|d| d.required).collect();
            let done = required
                .iter()
                .filter(|d| has_completed(&d.task_def_id))
                .count();
            progress = if required.is_empty() {
                100
            } else {
                (100 * done / required.len()) as i32
            };
            out.progress.insert((wid.clone(), progress));

            // The first failure for good of a definition without a failure task, if any.
            let failure = states
                .iter()
                .filter(|(_, e)| e.status == TaskStatus::Failed)
                .filter(|(_, e)| {
                    def(&e.task_def_id)
                        .is_some_and(|d| d.failure_task_id.is_none() && e.attempt > d.max_retries)
                })
                .min_by_key(|(tid, e)| (e.event_time, *tid))
                .map(|(_, e)| e.task_def_id.to_string());
            if derived.is_none() && up.is_none() {
                if let Some(f) = failure {
                    derived = Some(Terminal::Failed);
                    out.failed.insert(wid.clone(), f);
                    out.failed_at.insert(wid.clone(), t);
                } else if progress == 100 {
                    derived = Some(Terminal::Completed);
                    out.completed.insert(wid.clone());
                    out.completed_at.insert(wid.clone(), t);
                }
            } else if derived == Some(Terminal::Completed) && up.is_none() && failure.is_some() {
                out.failure_after_completion.insert(wid.clone());
            }
            status = match up.or(derived) {
                Some(Terminal::Completed) => "COMPLETED",
                Some(Terminal::Failed) => "FAILED",
                None => "ACTIVE",
            };

            for (tid, e) in &states {
                if e.status == TaskStatus::Failed
                    && def(&e.task_def_id).is_some_and(|d| e.attempt <= d.max_retries)
                {
                    out.retries.insert((tid.to_string(), e.attempt + 1));
                }
            }

            // Readiness.
            let mut ready_now: BTreeMap<String, u32> = BTreeMap::new();
            let mut blocked_now = BTreeSet::new();
            if status == "ACTIVE" {
                let open_types: Vec<Str> = orders_of_w
                    .values()
                    .filter_map(|evs| order_at(evs, t))
                    .filter(|(s, _)| is_open(*s))
                    .filter_map(|(_, ty)| ty)
                    .collect();
                for d in &tpl.tasks {
                    let namers: Vec<&TaskDef> = tpl
                        .tasks
                        .iter()
                        .filter(|n| n.failure_task_id.as_deref() == Some(&d.task_def_id))
                        .collect();
                    let cond1 = if namers.is_empty() {
                        tpl.tasks
                            .iter()
                            .filter(|p| p.next_task_id.as_deref() == Some(&d.task_def_id))
                            .all(|p| has_completed(&p.task_def_id))
                    } else {
                        namers.iter().any(|n| failed_for_good(n))
                    };
                    let cond2 = !open_types
                        .iter()
                        .any(|ty| d.blocking_order_types.contains(ty));
                    let cond3 = !of_def(&d.task_def_id).iter().any(|e| match e.status {
                        TaskStatus::InProgress | TaskStatus::Completed => true,
                        TaskStatus::Failed => e.attempt > d.max_retries,
                        TaskStatus::Pending => false,
                    });
                    if cond1 && cond3 {
                        if cond2 {
                            // The attempt it is ready for: 1; the one created and pending; or the
                            // retry of one that failed with retries left.
                            let attempt = of_def(&d.task_def_id)
                                .iter()
                                .filter_map(|e| match e.status {
                                    TaskStatus::Pending => Some(e.attempt),
                                    TaskStatus::Failed => Some(e.attempt + 1),
                                    _ => None,
                                })
                                .max()
                                .unwrap_or(1);
                            ready_now.insert(d.task_def_id.to_string(), attempt);
                        } else {
                            blocked_now.insert(d.task_def_id.to_string());
                        }
                    }
                }
            }
            // A new episode: ready now, and not ready (or ready for another attempt) before.
            for (d, a) in &ready_now {
                if prev_ready.get(d) != Some(a) {
                    *out.ready_episodes
                        .entry((wid.clone(), d.clone()))
                        .or_default() += 1;
                }
            }
            for d in prev_ready.keys() {
                if !ready_now.contains_key(d) && blocked_now.contains(d) {
                    out.blocked_required.insert((wid.clone(), d.clone()));
                }
            }
            out.blocked_possible
                .extend(blocked_now.iter().map(|d| (wid.clone(), d.clone())));
            prev_ready = ready_now;
        }
        out.ready
            .extend(prev_ready.into_keys().map(|d| (wid.clone(), d)));
        let terminals: Vec<Millis> = wevs
            .iter()
            .filter(|e| {
                matches!(
                    e.kind,
                    WorkflowEventKind::Completed | WorkflowEventKind::Failed
                )
            })
            .map(|e| e.event_time)
            .collect();
        if !terminals.is_empty() {
            out.upstream_terminals.insert(wid.clone(), terminals);
        }
        let escalated = wevs.iter().any(|e| e.kind == WorkflowEventKind::Escalated)
            || out.failed.contains_key(wid);
        out.workflows.insert(
            wid.clone(),
            WfRow {
                status,
                progress,
                escalated,
            },
        );
        for (tid, evs) in tasks_of_w {
            if let Some(e) = task_at(evs, Millis::MAX) {
                out.tasks
                    .insert(tid.clone(), (status_str(e.status).to_string(), e.attempt));
            }
        }
    }
    out
}
