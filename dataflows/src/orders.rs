//! Orders (contract §5): the lifecycle fold per order.
//!
//! An order's events apply in (eventTime, offset) order; an event the lifecycle does not
//! allow from the current state — or an authorization by an ineligible role — is rejected
//! and changes nothing. Because the fold is recomputed from the order's event set whenever
//! it changes, a late event that sorts earlier re-decides everything after it, exactly as
//! if the events had arrived in order.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use differential_dataflow::VecCollection;

use crate::events::{OrderEvent, OrderEventKind, OrderStatus};
use crate::output::{Millis, RejectReason};

/// Roles allowed to authorize each order type (contract §5 defaults).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Eligibility {
    /// orderType → eligible actorRoles.
    pub by_type: BTreeMap<String, Vec<String>>,
    /// Roles eligible for types not in `by_type`.
    pub other: Vec<String>,
}

impl Default for Eligibility {
    fn default() -> Self {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let mut by_type = BTreeMap::new();
        by_type.insert("LAB_TEST".into(), s(&["PHYSICIAN", "NURSE_PRACTITIONER"]));
        by_type.insert("IMAGING".into(), s(&["PHYSICIAN", "NURSE_PRACTITIONER"]));
        by_type.insert("MEDICATION".into(), s(&["PHYSICIAN"]));
        by_type.insert("SURGERY".into(), s(&["SURGEON"]));
        Eligibility { by_type, other: s(&["PHYSICIAN"]) }
    }
}

impl Eligibility {
    pub fn allows(&self, order_type: &str, role: Option<&str>) -> bool {
        let roles = self.by_type.get(order_type).unwrap_or(&self.other);
        role.is_some_and(|r| roles.iter().any(|x| x == r))
    }
}

/// Whether the lifecycle allows `kind` (moving to `to`) from `from` (`None`: no order yet).
pub fn transition_allowed(from: Option<OrderStatus>, kind: OrderEventKind, to: Option<OrderStatus>) -> bool {
    use OrderStatus::*;
    match kind {
        OrderEventKind::Created => from.is_none() && to == Some(Proposed),
        OrderEventKind::CompensationCompleted => from.is_some(),
        OrderEventKind::Cancelled => from.is_some_and(|f| !matches!(f, Closed | Cancelled)) && to == Some(Cancelled),
        _ => {
            let (Some(f), Some(t)) = (from, to) else { return false };
            matches!(
                (f, t),
                (Proposed, Authorized)
                    | (Authorized, Activated)
                    | (Activated, InProgress)
                    | (Activated | InProgress, Resulted | Dispensed | Completed)
                    | (Resulted | Dispensed | Completed, Verified)
                    | (Verified, Closed)
            )
        }
    }
}

/// An event the lifecycle refused.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RejectedOrderEvent {
    pub event: OrderEvent,
    pub reason: RejectReason,
    pub from: Option<OrderStatus>,
    pub detail: String,
}

/// The current state of one order, and the history that produced it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OrderState {
    pub order_id: String,
    pub workflow_instance_id: Option<String>,
    pub patient_id: Option<String>,
    pub order_type: Option<String>,
    /// `None` when no accepted event created it yet.
    pub status: Option<OrderStatus>,
    /// eventId / eventTime of the last accepted status-changing event.
    pub last_event_id: Option<String>,
    pub last_event_time: Option<Millis>,
    pub last_actor: Option<String>,
    pub cost: Option<String>,
    pub department: Option<String>,
    pub appointment_id: Option<String>,
    /// Accepted events in application order.
    pub accepted: Vec<OrderEvent>,
    pub rejected: Vec<RejectedOrderEvent>,
}

impl OrderState {
    /// Whether the order ever reached `s` through an accepted event.
    pub fn reached(&self, s: OrderStatus) -> bool {
        self.accepted.iter().any(|e| e.order_status == Some(s) && e.kind != OrderEventKind::CompensationCompleted)
    }
    pub fn is_open(&self) -> bool {
        self.status.is_some_and(|s| s.is_open())
    }
}

/// Folds the events of one order (any order, duplicates allowed) into its state.
pub fn fold_order(order_id: &str, events: &[&OrderEvent], elig: &Eligibility) -> OrderState {
    let mut evs: Vec<&OrderEvent> = events.to_vec();
    // Duplicates (same eventId) count once: the first by position.
    evs.sort_by(|a, b| a.event_id.cmp(&b.event_id).then(a.pos.cmp(&b.pos)));
    evs.dedup_by(|b, a| a.event_id == b.event_id);
    evs.sort_by_key(|e| (e.event_time, e.pos));
    let mut st = OrderState {
        order_id: order_id.to_string(),
        workflow_instance_id: None,
        patient_id: None,
        order_type: None,
        status: None,
        last_event_id: None,
        last_event_time: None,
        last_actor: None,
        cost: None,
        department: None,
        appointment_id: None,
        accepted: Vec::new(),
        rejected: Vec::new(),
    };
    for e in evs {
        let from = st.status;
        if !transition_allowed(from, e.kind, e.order_status) {
            st.rejected.push(RejectedOrderEvent {
                event: e.clone(),
                reason: RejectReason::InvalidTransition,
                from,
                detail: format!(
                    "{} to {} is not allowed from {}",
                    e.kind.as_str(),
                    e.order_status.map(|s| s.as_str()).unwrap_or("-"),
                    from.map(|s| s.as_str()).unwrap_or("no order")
                ),
            });
            continue;
        }
        if e.kind == OrderEventKind::Authorized {
            let ty = e.order_type.as_deref().or(st.order_type.as_deref()).unwrap_or("");
            if !elig.allows(ty, e.actor_role.as_deref()) {
                st.rejected.push(RejectedOrderEvent {
                    event: e.clone(),
                    reason: RejectReason::UnauthorizedActor,
                    from,
                    detail: format!(
                        "actorRole `{}` may not authorize a {ty} order",
                        e.actor_role.as_deref().unwrap_or("(none)")
                    ),
                });
                continue;
            }
        }
        // Accepted: apply.
        macro_rules! keep {
            ($field:ident) => {
                if e.$field.is_some() {
                    st.$field = e.$field.clone();
                }
            };
        }
        keep!(workflow_instance_id);
        keep!(patient_id);
        keep!(order_type);
        keep!(cost);
        keep!(department);
        keep!(appointment_id);
        if e.kind != OrderEventKind::CompensationCompleted {
            st.status = e.order_status;
            st.last_event_id = Some(e.event_id.clone());
            st.last_event_time = Some(e.event_time);
            if e.actor.is_some() {
                st.last_actor = e.actor.clone();
            }
        }
        st.accepted.push(e.clone());
    }
    st
}

/// Extension trait: the order-lifecycle operator.
pub trait OrderStates<'s> {
    /// One [`OrderState`] per order that has at least one event, keyed by orderId.
    fn order_states(self, elig: Arc<Eligibility>) -> VecCollection<'s, u64, (String, OrderState)>;
}

impl<'s> OrderStates<'s> for VecCollection<'s, u64, OrderEvent> {
    fn order_states(self, elig: Arc<Eligibility>) -> VecCollection<'s, u64, (String, OrderState)> {
        self.map(|e| (e.order_id.clone(), e)).reduce_named("OrderState", move |key, input, output| {
            let events: Vec<&OrderEvent> = input.iter().map(|(e, _)| *e).collect();
            output.push((fold_order(key, &events, &elig), 1));
        })
    }
}
