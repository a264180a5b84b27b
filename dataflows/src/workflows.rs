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
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use differential_dataflow::VecCollection;

use crate::derived::Derived;
use crate::events::{Template, WorkflowEvent, WorkflowEventKind};
use crate::orders::OrderState;
use crate::output::{Millis, Row, TaskRow, WorkflowRow};
use crate::rules::apply_rules;
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
    /// A candidate of the timer rules (an open SLA, a stale task, a re-escalation) that is
    /// not due at the evaluation's [`Clock`]: only its deadline, after which the workflow is
    /// evaluated again (and the candidate output in full, if it still stands).
    Wake(Millis),
}

/// What the timer rules know of the clock when they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clock {
    /// Nothing: every candidate is output in full (the differential core, where the clock
    /// is the candidates' delay).
    Unknown,
    /// The evaluation's instant: a candidate is due when the instant is past its deadline;
    /// one not due yet is output as [`WfOut::Wake`] (the keyed core, which evaluates the
    /// workflow again at deadline + 1).
    At(Millis),
}

impl Clock {
    /// Whether a candidate with `deadline` is output in full.
    pub fn due(self, deadline: Millis) -> bool {
        match self {
            Clock::Unknown => true,
            Clock::At(t) => t > deadline,
        }
    }
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

/// Evaluates the contract's rules for one workflow instance from its facts: the
/// workflow's own rules, each task's, then the re-escalations of what was escalated
/// ([`crate::rules::apply_rules`]).
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
        apply_rules(
            wid,
            state,
            template,
            &tasks,
            &orders,
            rules,
            Clock::Unknown,
            &mut out,
        );
    }
    out
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
                WfOut::Wake(_) => unreachable!("the differential core's clock is Unknown"),
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
