//! Readiness (contract §4): which task definitions of an ACTIVE workflow are ready next
//! (TASK_READY with its `task_readiness` row) or blocked by an open order (TASK_BLOCKED).

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::derived::{DerivedType, IdName};
use crate::events::Template;
use crate::model::Str;
use crate::output::{ReadinessRow, Row};
use crate::workflows::{OrderFact, WfOut};

use super::{workflow_event, DefSummary, WfCtx};

/// Readiness of an ACTIVE workflow's task definitions: TASK_READY with its row, or
/// TASK_BLOCKED. An event's content must be a function of what identifies it (its
/// eventId's name), so that it is emitted once: a readiness event names the definition,
/// not the instance (which may be created while the task stays ready).
pub(crate) fn readiness(
    wid: &Str,
    t: &Template,
    summary: &BTreeMap<&str, DefSummary>,
    orders: &[&OrderFact],
    ctx: &WfCtx,
    out: &mut Vec<WfOut>,
) {
    let name = IdName::new;
    let base = |ty: DerivedType, id: IdName| workflow_event(ty, id, wid, ctx);
    let failure_namers: BTreeMap<&str, Vec<&str>> =
        t.tasks.iter().fold(BTreeMap::new(), |mut m, d| {
            if let Some(f) = &d.failure_task_id {
                m.entry(f.as_str())
                    .or_insert_with(Vec::new)
                    .push(d.task_def_id.as_str());
            }
            m
        });
    for d in &t.tasks {
        let id = d.task_def_id.as_str();
        let s = summary.get(id);
        // Condition 3.
        if s.is_some_and(|s| s.in_progress || s.completed.is_some() || s.failed_for_good.is_some())
        {
            continue;
        }
        // Condition 1 (or the failure-task rule).
        let satisfied = match failure_namers.get(id) {
            Some(namers) => namers
                .iter()
                .any(|n| summary.get(n).is_some_and(|s| s.failed_for_good.is_some())),
            None => t
                .tasks
                .iter()
                .filter(|p| p.next_task_id.as_deref() == Some(id))
                .all(|p| {
                    summary
                        .get(p.task_def_id.as_str())
                        .is_some_and(|s| s.completed.is_some())
                }),
        };
        if !satisfied {
            continue;
        }
        // Condition 2.
        let blocked = orders.iter().any(|o| {
            o.open
                && o.order_type
                    .as_ref()
                    .is_some_and(|ty| d.blocking_order_types.contains(ty))
        });
        let next_attempt = s.map(|s| s.next_attempt()).unwrap_or(1);
        // Content names only the readiness itself: what made it ready (which completion,
        // which order closing) is in the event's time, and which orders block may change
        // while the task stays blocked; a transition into either is one event
        // (`per_transition`).
        let ty = if blocked {
            DerivedType::TaskBlocked
        } else {
            DerivedType::TaskReady
        };
        let mut e = base(
            ty,
            name(wid, Some(d.task_def_id.clone()), Some(next_attempt.into())),
        );
        e.task_def_id = Some(d.task_def_id.clone());
        e.task_name = d.name.clone();
        e.attempt = Some(next_attempt);
        e.per_transition = true;
        if blocked {
            e.reason = Some("BLOCKING_ORDER_OPEN".into());
            out.push(WfOut::Event(Arc::new(e)));
            continue;
        }
        e.automatic = Some(d.automatic);
        out.push(WfOut::Event(Arc::new(e)));
        out.push(WfOut::Row(Arc::new(Row::Readiness(ReadinessRow {
            workflow_instance_id: wid.into(),
            task_def_id: d.task_def_id.clone(),
            patient_id: ctx.patient.clone(),
            template_id: ctx.template_id.clone(),
            template_version: ctx.template_version,
            task_name: d.name.clone(),
            automatic: d.automatic,
            next_attempt: next_attempt as i32,
        }))));
    }
}
