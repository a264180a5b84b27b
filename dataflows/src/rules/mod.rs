//! The contract's rules as small named pieces, one family per file (issue 12, item 4). Each is
//! a plain function of state: the cores (the keyed operators in [`crate::engine`], the
//! differential one in [`crate::workflows`] and [`crate::orders`]) decide when they run and
//! what of their output is new.
//!
//! | rule (contract §4, orders §5) | where |
//! |---|---|
//! | a workflow's own rules, composed; the context its tasks read | [`workflow`] |
//! | progress, completion, failure | [`progress`] |
//! | readiness: TASK_READY / TASK_BLOCKED | [`readiness`](mod@readiness) |
//! | a task's rules, composed; its row | [`task`] |
//! | retries | [`retry`] |
//! | SLA per attempt | [`sla`](mod@sla) |
//! | stale tasks | [`stale`](mod@stale) |
//! | upstream escalation, re-escalations | [`escalation`] |
//! | an order's rules, composed: rejections, transitions, its row (contract §5) | [`order`] |
//! | critical results | [`critical`] |
//! | compensation of a cancelled order | [`compensation`](mod@compensation) |
//! | fulfillment deadline (overdue orders) | [`fulfillment`] |
//!
//! [`apply_rules`] composes the workflow family in the order the contract's outputs depend on
//! each other: the workflow's own rules, each task's, then the re-escalations of what was
//! escalated.

pub(crate) mod compensation;
pub(crate) mod critical;
pub(crate) mod escalation;
pub(crate) mod fulfillment;
pub(crate) mod order;
pub(crate) mod progress;
pub(crate) mod readiness;
pub(crate) mod retry;
pub(crate) mod sla;
pub(crate) mod stale;
pub(crate) mod task;
pub(crate) mod workflow;

pub(crate) use compensation::compensation;
pub(crate) use critical::critical_result;
pub(crate) use escalation::{re_escalations, upstream_escalation, Escalated};
pub(crate) use fulfillment::fulfillment_deadline;
pub use order::{evaluate_order, evaluate_order_from, Applies};
pub(crate) use order::{named, positive, Identity};
pub(crate) use progress::{decide, terminal_events, Decision};
pub(crate) use readiness::readiness;
pub(crate) use retry::retries;
pub(crate) use sla::sla;
pub(crate) use stale::stale;
pub(crate) use task::{evaluate_task, TaskView};
pub(crate) use workflow::{evaluate_workflow, workflow_event, DefSummary, WfCtx};

use crate::events::Template;
use crate::model::Str;
use crate::output::Millis;
use crate::tasks::TaskState;
use crate::workflows::{Clock, OrderFact, TimeRules, WfOut, WfState};

/// The rules over a workflow's facts, unpacked (what [`crate::workflows::evaluate`] does once
/// it has them):
/// the workflow's own ([`evaluate_workflow`]), each task's ([`evaluate_task`]), then the
/// re-escalations of what was escalated ([`re_escalations`]). Nothing before the workflow
/// started. Timer candidates not due at `clock` are output as their deadlines
/// ([`WfOut::Wake`]).
pub fn apply_rules(
    wid: &Str,
    state: &WfState,
    template: Option<&Template>,
    tasks: &[&TaskState],
    orders: &[&OrderFact],
    rules: &TimeRules,
    clock: Clock,
    out: &mut Vec<WfOut>,
) {
    let Some(ctx) = evaluate_workflow(wid, state, template, tasks, orders, out) else {
        return;
    };
    let mut escalated: Vec<(Escalated, Millis)> = upstream_escalation(state)
        .map(|(reason, at)| (Escalated::Upstream(reason), at))
        .into_iter()
        .collect();
    for task in tasks {
        evaluate_task(wid, task, template, &ctx, rules, clock, out, &mut escalated);
    }
    re_escalations(wid, &ctx, tasks, &escalated, rules, clock, out);
}
