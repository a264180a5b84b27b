//! Critical results (contract §5): a RESULTED order with a critical flag alerts.

use crate::derived::{v5, DerivedType};
use crate::events::OrderEvent;
use crate::model::Str;
use crate::orders::{CriticalAlert, OrderOut, OrderRules};

use super::{named, Identity};

/// ORDER_CRITICAL_RESULT of a critical ORDER_RESULTED, and its CRITICAL alert.
pub(crate) fn critical_result(
    oid: &Str,
    ident: &Identity,
    e: &OrderEvent,
    rules: &OrderRules,
    out: &mut Vec<OrderOut>,
) {
    let mut n = ident.notice(
        DerivedType::OrderCriticalResult,
        named(&e.event_id, None),
        oid,
    );
    n.derived.cause_event_id = Some(e.event_id.clone());
    let status = e.order_status.map(|s| s.as_str()).unwrap_or("RESULTED");
    out.push(OrderOut::Alert(CriticalAlert {
        alert_id: v5(&format!(
            "hmis-flow:alert:ORDER_CRITICAL_RESULT:{}",
            e.event_id
        )),
        source: rules.alert_source.clone(),
        message: format!(
            "critical result on {} order {oid} ({status})",
            ident.order_type.as_deref().unwrap_or("an")
        ),
        cause_event_id: e.event_id.to_string(),
        derived_event_id: n.derived.id().to_string(),
        order_id: oid.to_string(),
        order_type: ident.order_type.as_deref().map(String::from),
        workflow_instance_id: ident.workflow_instance_id.as_deref().map(String::from),
        patient_id: ident.patient_id.as_deref().map(String::from),
        ordering_key: n.derived.workflow_instance_id.to_string(),
    }));
    out.push(OrderOut::Event(n));
}
