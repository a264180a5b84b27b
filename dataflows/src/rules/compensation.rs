//! Compensation (contract §5): what a cancelled order must undo.

use crate::derived::DerivedType;
use crate::events::{OrderEvent, OrderEventKind};
use crate::model::Str;
use crate::orders::{action_id, OrderOut, OrderState, ACTION_TYPES};
use crate::output::{CompensationRow, Row};

use super::{named, positive, Identity};

/// Compensation of a cancelled order (`c`, the `ci`-th accepted event), from the state the
/// order had reached when it was cancelled: an action row and ORDER_COMPENSATION_REQUESTED
/// per action that applies.
pub(crate) fn compensation(
    st: &OrderState,
    ident: &Identity,
    ci: usize,
    c: &OrderEvent,
    out: &mut Vec<OrderOut>,
) {
    let oid = &st.order_id;
    let before = &st.accepted[..=ci];
    let reached_activated = before.iter().any(|e| e.kind == OrderEventKind::Activated);
    let last = |f: fn(&OrderEvent) -> &Option<Str>| before.iter().rev().find_map(|e| f(e).clone());
    let cost = last(|e| &e.cost);
    let appointment = last(|e| &e.appointment_id);
    let ty = ident.order_type.as_deref().unwrap_or("");
    for action in ACTION_TYPES {
        let applies = match action {
            "SEND_NOTIFICATION" => true,
            "REVERSE_CHARGE" => reached_activated && cost.as_deref().is_some_and(positive),
            "CANCEL_ORDER" => reached_activated,
            "RELEASE_RESOURCE" => reached_activated && matches!(ty, "IMAGING" | "SURGERY"),
            _ => appointment.is_some(),
        };
        if !applies {
            continue;
        }
        let id: Str = action_id(oid, action).into();
        let amount = (action == "REVERSE_CHARGE").then(|| cost.clone()).flatten();
        let appointment_id = (action == "CANCEL_APPOINTMENT")
            .then(|| appointment.clone())
            .flatten();
        let completed_at = st
            .accepted
            .iter()
            .filter(|e| {
                e.kind == OrderEventKind::CompensationCompleted
                    && e.action_id.as_deref() == Some(&id)
            })
            .map(|e| e.event_time)
            .min();
        out.push(OrderOut::Row(Row::Compensation(CompensationRow {
            action_id: id.clone(),
            order_id: oid.into(),
            workflow_instance_id: ident.workflow_instance_id.clone(),
            patient_id: ident.patient_id.clone(),
            action_type: action.into(),
            amount: amount.clone(),
            appointment_id: appointment_id.clone(),
            status: if completed_at.is_some() {
                "COMPLETED"
            } else {
                "PENDING"
            }
            .into(),
            reason: c.reason.clone(),
            cause_event_id: Some(c.event_id.clone()),
            requested_at: c.event_time,
            completed_at,
        })));
        let mut n = ident.notice(
            DerivedType::OrderCompensationRequested,
            named(&id, None),
            oid,
        );
        n.derived.action_id = Some(id);
        n.derived.action_type = Some(action.into());
        n.derived.amount = amount;
        n.derived.reason = c.reason.clone();
        n.derived.cause_event_id = Some(c.event_id.clone());
        n.appointment_id = appointment_id;
        out.push(OrderOut::Event(n));
    }
}
