//! An order's rules, composed (contract §5): what was rejected ([`rejections`]), what the
//! accepted events did ([`apply_accepted`]: transitions, activation requests, the critical
//! result), the compensation of a cancellation ([`super::compensation`](mod@super::compensation)),
//! the fulfillment deadline ([`super::fulfillment`]) and the order's row ([`order_row`]).

use std::collections::BTreeMap;

use crate::derived::{Derived, DerivedType, IdName};
use crate::events::{OrderEvent, OrderEventKind, OrderStatus};
use crate::model::Str;
use crate::orders::{Notice, OrderOut, OrderRules, OrderState};
use crate::output::{Millis, OrderRow, OrderTransitionRow, RejectReason, Row};

use super::{compensation, critical_result, fulfillment_deadline};

/// What an order's derived events say about it: the first values its accepted events name.
#[derive(Default, PartialEq, Eq)]
pub(crate) struct Identity {
    pub(crate) workflow_instance_id: Option<Str>,
    pub(crate) patient_id: Option<Str>,
    pub(crate) order_type: Option<Str>,
}

impl Identity {
    pub(crate) fn of(st: &OrderState) -> Identity {
        let mut id = Identity::default();
        for e in &st.accepted {
            for (slot, v) in [
                (&mut id.workflow_instance_id, &e.workflow_instance_id),
                (&mut id.patient_id, &e.patient_id),
                (&mut id.order_type, &e.order_type),
            ] {
                if slot.is_none() {
                    slot.clone_from(v);
                }
            }
        }
        id
    }

    /// A derived event about order `order_id`, keyed by its workflow (else the orderId).
    /// Its id is named (`hmis-flow:<type>:<name…>`) and hashed when it is published.
    pub(crate) fn notice(&self, ty: DerivedType, name: IdName, order_id: &Str) -> Notice {
        let key = self
            .workflow_instance_id
            .clone()
            .unwrap_or_else(|| order_id.clone());
        let mut d = Derived::named(ty, name, &key);
        d.patient_id = self.patient_id.clone();
        d.order_id = Some(order_id.clone());
        d.order_type = self.order_type.clone();
        Notice {
            derived: d,
            in_workflow: self.workflow_instance_id.is_some(),
            appointment_id: None,
        }
    }
}

/// Whether a decimal text is a positive amount.
pub(crate) fn positive(amount: &str) -> bool {
    amount.parse::<f64>().is_ok_and(|v| v > 0.0)
}

/// Everything the contract derives from one order's state (§5).
pub fn evaluate_order(st: &OrderState, rules: &OrderRules) -> Vec<OrderOut> {
    let mut out = Vec::new();
    evaluate_order_from(st, rules, Applies::default(), &mut out);
    out
}

/// How many of an order's accepted and rejected events (in application order) an
/// evaluation skips the outputs of.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applies {
    pub accepted: usize,
    pub rejected: usize,
}

impl Applies {
    /// All the events applied to `st` so far.
    pub fn of(st: &OrderState) -> Applies {
        Applies {
            accepted: st.accepted.len(),
            rejected: st.rejected.len(),
        }
    }
}

/// What [`evaluate_order`] outputs, without the outputs of the events before `from`: each
/// accepted or rejected event's own outputs (its transition row, the notices, alert and dead
/// letter it causes) depend only on it, the status before it and the order's [`Identity`];
/// so while the identity stays, an order whose events arrive in application order needs
/// only the new events' outputs and the order-wide ones (compensation, fulfillment deadline,
/// row). Pushes the events' outputs first and returns the index in `out` where the
/// order-wide ones begin.
pub fn evaluate_order_from(
    st: &OrderState,
    rules: &OrderRules,
    from: Applies,
    out: &mut Vec<OrderOut>,
) -> usize {
    let ident = Identity::of(st);
    rejections(st, &ident, from.rejected, out);
    let applied = apply_accepted(st, &ident, rules, from.accepted, out);
    let split = out.len();
    let Some(status) = applied.status else {
        // No accepted ORDER_CREATED yet: the order does not exist (its rejected events do).
        return split;
    };
    if let Some((ci, c)) = applied.cancel {
        compensation(st, &ident, ci, c, out);
    }
    if let Some((ai, a)) = applied.activated {
        fulfillment_deadline(st, &ident, ai, a, rules, out);
    }
    out.push(order_row(st, status, &applied));
    split
}

/// Ids of order events are named, and hashed only for the events that turn out to be new.
pub(crate) fn named(a: &Str, b: Option<Str>) -> IdName {
    IdName::new(a, b, None)
}

/// The `order_transitions` row of event `e` of the order (`reject`: why it was rejected).
pub(crate) fn transition_row(
    st: &OrderState,
    ident: &Identity,
    e: &OrderEvent,
    from: Option<OrderStatus>,
    to: Option<OrderStatus>,
    reject: Option<RejectReason>,
) -> OrderOut {
    OrderOut::Row(Row::OrderTransition(OrderTransitionRow {
        event_id: e.event_id.clone(),
        order_id: st.order_id.clone(),
        workflow_instance_id: e
            .workflow_instance_id
            .clone()
            .or_else(|| ident.workflow_instance_id.clone()),
        event_type: e.kind.as_str().into(),
        from_status: from,
        to_status: to,
        actor: e.actor.clone(),
        actor_role: e.actor_role.clone(),
        accepted: reject.is_none(),
        reject_reason: reject.map(|r| r.as_str().into()),
        event_time: e.event_time,
        source_partition: e.pos.partition,
        source_offset: e.pos.offset,
    }))
}

/// Rejected events (from the `from`-th): a transition row, ORDER_TRANSITION_REJECTED, and
/// the dead letter.
pub(crate) fn rejections(st: &OrderState, ident: &Identity, from: usize, out: &mut Vec<OrderOut>) {
    let oid = &st.order_id;
    for r in &st.rejected[from.min(st.rejected.len())..] {
        let e = &r.event;
        out.push(transition_row(
            st,
            ident,
            e,
            r.from,
            e.order_status,
            Some(r.reason),
        ));
        // The event's own ids first: they are what the rejected record said.
        let own = Identity {
            workflow_instance_id: e
                .workflow_instance_id
                .clone()
                .or_else(|| ident.workflow_instance_id.clone()),
            patient_id: e.patient_id.clone().or_else(|| ident.patient_id.clone()),
            order_type: e.order_type.clone().or_else(|| ident.order_type.clone()),
        };
        let mut n = own.notice(
            DerivedType::OrderTransitionRejected,
            named(&e.event_id, Some(r.reason.as_str().into())),
            oid,
        );
        n.derived.reason = Some(r.reason.as_str().into());
        n.derived.cause_event_id = Some(e.event_id.clone());
        out.push(OrderOut::Event(n));
        out.push(OrderOut::Dead(r.clone()));
    }
}

/// What the accepted events, applied in order, leave of the order.
pub(crate) struct Applied<'a> {
    pub(crate) status: Option<OrderStatus>,
    /// When each status was first reached.
    pub(crate) at: BTreeMap<OrderStatus, Millis>,
    /// The last actor, and the role each actor last stated (an event may name its actor
    /// without repeating the role).
    pub(crate) actor: Option<&'a Str>,
    pub(crate) roles: BTreeMap<&'a Str, &'a Str>,
    pub(crate) critical: bool,
    /// The ORDER_CANCELLED and the ORDER_ACTIVATED (the last of each), with their index
    /// among the accepted events.
    pub(crate) cancel: Option<(usize, &'a OrderEvent)>,
    pub(crate) activated: Option<(usize, &'a OrderEvent)>,
}

/// Accepted events, in application order: a transition row each, ORDER_ACTIVATION_REQUESTED
/// for an authorized order of an auto-activated type, ORDER_CRITICAL_RESULT with its alert;
/// output for the events from the `from`-th, applied for all.
pub(crate) fn apply_accepted<'a>(
    st: &'a OrderState,
    ident: &Identity,
    rules: &OrderRules,
    from: usize,
    out: &mut Vec<OrderOut>,
) -> Applied<'a> {
    let oid = &st.order_id;
    let mut a = Applied {
        status: None,
        at: BTreeMap::new(),
        actor: None,
        roles: BTreeMap::new(),
        critical: false,
        cancel: None,
        activated: None,
    };
    for (i, e) in st.accepted.iter().enumerate() {
        let emit = i >= from;
        let before = a.status;
        if e.kind == OrderEventKind::CompensationCompleted {
            if emit {
                out.push(transition_row(st, ident, e, before, before, None));
            }
            continue;
        }
        a.status = e.order_status;
        if emit {
            out.push(transition_row(st, ident, e, before, a.status, None));
        }
        if let Some(s) = a.status {
            a.at.entry(s).or_insert(e.event_time);
        }
        if let Some(actor) = &e.actor {
            a.actor = Some(actor);
            if let Some(r) = &e.actor_role {
                a.roles.insert(actor, r);
            }
        }
        match e.kind {
            OrderEventKind::Authorized => {
                let ty = e
                    .order_type
                    .as_deref()
                    .or(ident.order_type.as_deref())
                    .unwrap_or("");
                if emit && rules.auto_activate.iter().any(|t| t == ty) {
                    let mut n = ident.notice(
                        DerivedType::OrderActivationRequested,
                        named(&e.event_id, None),
                        oid,
                    );
                    n.derived.cause_event_id = Some(e.event_id.clone());
                    out.push(OrderOut::Event(n));
                }
            }
            OrderEventKind::Activated => a.activated = Some((i, e)),
            OrderEventKind::Resulted if e.critical => {
                a.critical = true;
                if emit {
                    critical_result(oid, ident, e, rules, out);
                }
            }
            OrderEventKind::Cancelled => a.cancel = Some((i, e)),
            _ => {}
        }
    }
    a
}

/// The `orders` row before the overdue flag is merged in.
pub(crate) fn order_row(st: &OrderState, status: OrderStatus, a: &Applied) -> OrderOut {
    let at = |s: OrderStatus| a.at.get(&s).copied();
    OrderOut::OrderBase(OrderRow {
        order_id: st.order_id.clone(),
        workflow_instance_id: st.workflow_instance_id.clone(),
        patient_id: st.patient_id.clone(),
        order_type: st.order_type.clone().unwrap_or_default(),
        order_status: status,
        actor: a.actor.cloned(),
        actor_role: a.actor.and_then(|x| a.roles.get(x)).map(|r| (*r).clone()),
        cost: st.cost.clone(),
        department: st.department.clone(),
        critical: a.critical,
        appointment_id: st.appointment_id.clone(),
        cancel_reason: a.cancel.and_then(|(_, c)| c.reason.clone()),
        is_overdue: false,
        created_at: at(OrderStatus::Proposed),
        authorized_at: at(OrderStatus::Authorized),
        activated_at: at(OrderStatus::Activated),
        started_at: at(OrderStatus::InProgress),
        resulted_at: [
            OrderStatus::Resulted,
            OrderStatus::Dispensed,
            OrderStatus::Completed,
        ]
        .iter()
        .filter_map(|s| a.at.get(s))
        .min()
        .copied(),
        verified_at: at(OrderStatus::Verified),
        closed_at: at(OrderStatus::Closed),
        cancelled_at: at(OrderStatus::Cancelled),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::changes::sorted;
    use crate::events::Pos;
    use crate::orders::{action_id, apply_order_event, fold_order, Eligibility};

    use OrderEventKind as K;
    use OrderStatus as S;

    /// An event of order `o-1` at minute `n` (position `n`), with what `set` adds.
    fn ev(n: i64, kind: K, to: Option<S>, set: impl FnOnce(&mut OrderEvent)) -> OrderEvent {
        let mut e = OrderEvent {
            event_id: format!("e-{n}").into(),
            event_time: 1_000_000 + n as u64 * 60_000,
            pos: Pos {
                partition: 0,
                offset: n,
            },
            kind,
            order_id: "o-1".into(),
            workflow_instance_id: None,
            patient_id: None,
            order_type: None,
            order_status: to,
            actor: Some("dr-a".into()),
            actor_role: Some("PHYSICIAN".into()),
            cost: None,
            department: None,
            critical: false,
            reason: None,
            appointment_id: None,
            action_id: None,
            raw_key: None,
            raw: None,
        };
        set(&mut e);
        e
    }

    fn histories() -> Vec<Vec<OrderEvent>> {
        let created = |n, wid: Option<&str>| {
            ev(n, K::Created, Some(S::Proposed), |e| {
                e.workflow_instance_id = wid.map(Str::from);
                e.patient_id = Some("p-1".into());
                e.order_type = Some("LAB_TEST".into());
                e.cost = Some("12.50".into());
                e.appointment_id = Some("ap-1".into());
            })
        };
        vec![
            // Every step to CLOSED, with an auto-activation request and a critical result.
            vec![
                created(0, Some("w-1")),
                ev(1, K::Authorized, Some(S::Authorized), |_| {}),
                ev(2, K::Activated, Some(S::Activated), |_| {}),
                ev(3, K::Started, Some(S::InProgress), |_| {}),
                ev(4, K::Resulted, Some(S::Resulted), |e| e.critical = true),
                ev(5, K::Verified, Some(S::Verified), |_| {}),
                ev(6, K::Closed, Some(S::Closed), |_| {}),
            ],
            // Rejections (a move not allowed, an actor not eligible) between accepted events,
            // a cancellation after activation and a compensation completed.
            vec![
                created(0, Some("w-1")),
                ev(1, K::Started, Some(S::InProgress), |_| {}),
                ev(2, K::Authorized, Some(S::Authorized), |e| {
                    e.actor_role = Some("CLERK".into())
                }),
                ev(3, K::Authorized, Some(S::Authorized), |_| {}),
                ev(4, K::Activated, Some(S::Activated), |_| {}),
                ev(5, K::Cancelled, Some(S::Cancelled), |e| {
                    e.reason = Some("patient left".into())
                }),
                ev(6, K::CompensationCompleted, None, |e| {
                    e.action_id = Some(action_id("o-1", "REVERSE_CHARGE").into())
                }),
                ev(7, K::Closed, Some(S::Closed), |_| {}),
            ],
            // The workflow named only by a later event: the identity changes there.
            vec![
                created(0, None),
                ev(1, K::Authorized, Some(S::Authorized), |e| {
                    e.workflow_instance_id = Some("w-2".into())
                }),
                ev(2, K::Activated, Some(S::Activated), |_| {}),
            ],
        ]
    }

    /// What the keyed core relies on: applying an order's events one by one gives the fold,
    /// and while the identity stays, the outputs of the events applied before (from the state
    /// then) with `evaluate_order_from` of the rest are everything `evaluate_order` derives.
    #[test]
    fn outputs_from_an_index_complete_the_outputs_before_it() {
        let (elig, rules) = (Eligibility::default(), OrderRules::default());
        let (mut checked, mut identity_changes) = (0, 0);
        for h in histories() {
            let refs: Vec<&OrderEvent> = h.iter().collect();
            let full = fold_order("o-1", &refs, &elig);
            let mut applied = OrderState::new("o-1");
            for e in &h {
                apply_order_event(&mut applied, e, &elig);
            }
            assert_eq!(applied, full);
            let everything = sorted(evaluate_order(&full, &rules));
            for k in 0..=h.len() {
                let before = fold_order("o-1", &refs[..k], &elig);
                if Identity::of(&before) != Identity::of(&full) {
                    identity_changes += 1;
                    continue;
                }
                let mut out = Vec::new();
                let split = evaluate_order_from(&before, &rules, Applies::default(), &mut out);
                out.truncate(split);
                evaluate_order_from(&full, &rules, Applies::of(&before), &mut out);
                assert_eq!(sorted(out), everything, "history {h:?} split after {k}");
                checked += 1;
            }
        }
        assert!(
            checked >= 15 && identity_changes >= 1,
            "{checked} {identity_changes}"
        );
    }
}
