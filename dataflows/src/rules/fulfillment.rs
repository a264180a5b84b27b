//! The fulfillment deadline (contract §5): an order past its type's limit is overdue.

use crate::events::{OrderEvent, OrderEventKind, OrderStatus};
use crate::orders::{OrderOut, OrderRules, OrderState, OverdueInfo};

use super::Identity;

/// The fulfillment deadline of an activated order (`a`, the `ai`-th accepted event), if its
/// type has a limit: overdue late (the data says so) or open (the clock decides).
pub(crate) fn fulfillment_deadline(
    st: &OrderState,
    ident: &Identity,
    ai: usize,
    a: &OrderEvent,
    rules: &OrderRules,
    out: &mut Vec<OrderOut>,
) {
    let ty = ident
        .order_type
        .clone()
        .or_else(|| st.order_type.clone())
        .unwrap_or_default();
    let Some(limit) = rules.limit_ms(&ty) else {
        return;
    };
    let info = OverdueInfo {
        order_id: st.order_id.clone(),
        order_type: ty.clone(),
        workflow_instance_id: ident.workflow_instance_id.clone(),
        patient_id: ident.patient_id.clone(),
        activated_event_id: a.event_id.clone(),
        activated_at: a.event_time,
        due_at: a.event_time.saturating_add(limit),
    };
    let ended = st.accepted[ai + 1..].iter().find(|e| {
        e.kind != OrderEventKind::CompensationCompleted
            && !matches!(e.order_status, Some(OrderStatus::InProgress))
    });
    match ended {
        Some(e) if e.event_time > info.due_at => out.push(OrderOut::OverdueLate(info)),
        Some(_) => {}
        None => out.push(OrderOut::OverdueOpen(info)),
    }
}
