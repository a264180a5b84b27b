//! Orders (contract §5): the lifecycle fold per order, and the rules that follow from it.
//!
//! An order's events apply in (eventTime, offset) order; an event the lifecycle does not
//! allow from the current state — or an authorization by an ineligible role — is rejected
//! and changes nothing. Because the fold is recomputed from the order's event set whenever
//! it changes, a late event that sorts earlier re-decides everything after it, exactly as
//! if the events had arrived in order.
//!
//! ```text
//!  order events ─reduce(fold_order)─► OrderState ─flat_map(evaluate_order)─► OrderOut ─consolidate─┐
//!     ┌────────────────────────────────────────────────────────────────────────────────────────────┘
//!     ├─ transition and compensation rows ─────────────────────────────────────────► Emit::Row (±)
//!     ├─ derived events, critical-result alerts, rejected records (on appearance) ─► Emit::Record / Row / Dead
//!     ├─ OverdueLate ─────────────────────────┐
//!     ├─ OverdueOpen ─delay_until(deadline)───┴─reduce(per order)─► overdue ──► ORDER_OVERDUE (on appearance)
//!     │                     overdue ∪ the orders whose ORDER_OVERDUE was published ─┐
//!     └─ OrderBase ─────────────────────────────────────────────────────────────────┴─reduce(per order)─► Row::Order with is_overdue
//! ```
//!
//! **Emitted once.** A derived event (and an alert, a dead letter) is emitted when its item
//! *appears* in a consolidated collection. Each item's content is therefore a function of
//! what its id names — the causing event, the action, the order — and never of state that
//! can change later (the last actor, a later event's time). The one exception is inherent:
//! an event that arrives late with an *earlier* eventTime re-decides the history after it,
//! which can change a row but cannot unsend what was already published.
//!
//! **Keys.** Order events are published on `workflow-derived-events` keyed by the order's
//! workflowInstanceId; an order that names no workflow is keyed by its orderId and its
//! events carry `"workflowInstanceId": null`. The workflowInstanceId, patientId and
//! orderType of an order's events are the first ones its accepted events name, in
//! application order, so later events cannot change them.
//!
//! **Fulfillment deadline.** An order with a limit for its type is *overdue* when the event
//! that ended its ACTIVATED/IN_PROGRESS period (result or cancellation) has an eventTime
//! after `activated_at + limit`, or, while it is still in that period, when the pipeline
//! clock passes the deadline (a candidate present while the order is open, delayed to the
//! deadline: see [`crate::timers`]). A cancellation before the deadline ends the period, so a
//! cancelled order is not overdue after it. The deadline applies to every order, whatever
//! its workflow's status: the timer scope of contract §8 names task and workflow timers
//! only, and an order that is still open is still open work. The row's `is_overdue` follows
//! the events: set while the order is overdue by the rules *or* its ORDER_OVERDUE was
//! published (in wall mode a result dated before the deadline can arrive after it fired;
//! the event stands, and so does the flag).

use crate::model::Str;
use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use differential_dataflow::{AsCollection, VecCollection};
use timely::dataflow::operators::vec::Map as _;

use crate::derived::{v5, Derived, DerivedType, IdName};
use crate::events::{format_time, InputTopic, OrderEvent, OrderEventKind, OrderStatus};
use crate::output::{
    AlertRow, DeadLetter, Millis, OrderRow, OutRecord, OutTopic, RejectReason, Row,
};
pub use crate::rules::evaluate_order;
use crate::rules::Identity;
use crate::timers::DelayUntil;
use crate::Emit;

/// Roles allowed to authorize each order type (contract §5 defaults).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
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
        Eligibility {
            by_type,
            other: s(&["PHYSICIAN"]),
        }
    }
}

impl Eligibility {
    pub fn allows(&self, order_type: &str, role: Option<&str>) -> bool {
        let roles = self.by_type.get(order_type).unwrap_or(&self.other);
        role.is_some_and(|r| roles.iter().any(|x| x == r))
    }
}

/// Whether the lifecycle allows `kind` (moving to `to`) from `from` (`None`: no order yet).
pub fn transition_allowed(
    from: Option<OrderStatus>,
    kind: OrderEventKind,
    to: Option<OrderStatus>,
) -> bool {
    use OrderStatus::*;
    match kind {
        OrderEventKind::Created => from.is_none() && to == Some(Proposed),
        OrderEventKind::CompensationCompleted => from.is_some(),
        OrderEventKind::Cancelled => {
            from.is_some_and(|f| !matches!(f, Closed | Cancelled)) && to == Some(Cancelled)
        }
        _ => {
            let (Some(f), Some(t)) = (from, to) else {
                return false;
            };
            // The target must be the one the kind moves to (the decoder ensures it; this
            // keeps the function right on its own).
            let fits = match kind {
                OrderEventKind::Authorized => t == Authorized,
                OrderEventKind::Activated => t == Activated,
                OrderEventKind::Started => t == InProgress,
                OrderEventKind::Resulted => matches!(t, Resulted | Dispensed | Completed),
                OrderEventKind::Verified => t == Verified,
                _ => t == Closed,
            };
            fits && matches!(
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
    pub order_id: Str,
    pub workflow_instance_id: Option<Str>,
    pub patient_id: Option<Str>,
    pub order_type: Option<Str>,
    /// `None` when no accepted event created it yet.
    pub status: Option<OrderStatus>,
    /// eventId / eventTime of the last accepted status-changing event.
    pub last_event_id: Option<Str>,
    pub last_event_time: Option<Millis>,
    pub last_actor: Option<Str>,
    pub cost: Option<Str>,
    pub department: Option<Str>,
    pub appointment_id: Option<Str>,
    /// Accepted events in application order.
    pub accepted: Vec<OrderEvent>,
    pub rejected: Vec<RejectedOrderEvent>,
}

impl OrderState {
    /// The state of an order no event was applied to yet.
    pub fn new(order_id: &str) -> OrderState {
        OrderState {
            order_id: order_id.into(),
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
        }
    }
    /// Whether the order ever reached `s` through an accepted event.
    pub fn reached(&self, s: OrderStatus) -> bool {
        self.accepted
            .iter()
            .any(|e| e.order_status == Some(s) && e.kind != OrderEventKind::CompensationCompleted)
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
    let mut st = OrderState::new(order_id);
    for e in evs {
        apply_order_event(&mut st, e, elig);
    }
    st
}

/// Applies one order event to `st`, in the fold's order ((eventTime, position), duplicates
/// already dropped): rejected (an invalid transition, an actor not eligible to authorize)
/// or accepted. [`fold_order`] is this over the sorted events; the keyed core applies an
/// order's events one by one while they arrive in that order.
pub fn apply_order_event(st: &mut OrderState, e: &OrderEvent, elig: &Eligibility) {
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
        return;
    }
    if e.kind == OrderEventKind::Authorized {
        let ty = e
            .order_type
            .as_deref()
            .or(st.order_type.as_deref())
            .unwrap_or("");
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
            return;
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

/// Extension trait: the order-lifecycle operator.
pub trait OrderStates<'s> {
    /// One [`OrderState`] per order that has at least one event, keyed by orderId.
    fn order_states(
        self,
        elig: Arc<Eligibility>,
    ) -> VecCollection<'s, u64, (String, Arc<OrderState>)>;
}

impl<'s> OrderStates<'s> for VecCollection<'s, u64, Arc<OrderEvent>> {
    fn order_states(
        self,
        elig: Arc<Eligibility>,
    ) -> VecCollection<'s, u64, (String, Arc<OrderState>)> {
        self.map(|e| (e.order_id.to_string(), e)).reduce_named(
            "OrderState",
            move |key, input, output| {
                let events: Vec<&OrderEvent> = input.iter().map(|(e, _)| &***e).collect();
                // Shared: the state holds the order's events, and arrangements copy on merge.
                output.push((Arc::new(fold_order(key, &events, &elig)), 1));
            },
        )
    }
}

// ---------------------------------------------------------------------------------------------
// The order rules: rows, derived events, alerts, dead letters and the fulfillment deadline.

/// Order rule parameters (contract §5 defaults).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OrderRules {
    /// Name of the order-events input topic, written into the dead letters of rejected
    /// transitions (default `workflow-order-events`; the runtime passes the configured name).
    pub topic: String,
    /// Fulfillment limit per orderType, in minutes from ORDER_ACTIVATED to RESULTED,
    /// DISPENSED or COMPLETED (defaults: LAB_TEST 60, IMAGING 120, MEDICATION 30). Types
    /// not listed have no deadline.
    pub fulfillment_minutes: BTreeMap<String, u64>,
    /// Order types whose valid authorization emits ORDER_ACTIVATION_REQUESTED (the upstream
    /// system then activates them); others wait for manual activation. Default: LAB_TEST,
    /// IMAGING.
    pub auto_activate: Vec<String>,
    /// `source` of the alerts the order rules raise (the `system-alerts` key; default `orders`).
    pub alert_source: String,
}

impl Default for OrderRules {
    fn default() -> Self {
        OrderRules {
            topic: InputTopic::Orders.default_name().to_string(),
            fulfillment_minutes: [("LAB_TEST", 60), ("IMAGING", 120), ("MEDICATION", 30)]
                .into_iter()
                .map(|(t, m)| (t.to_string(), m))
                .collect(),
            auto_activate: vec!["LAB_TEST".into(), "IMAGING".into()],
            alert_source: "orders".into(),
        }
    }
}

impl OrderRules {
    /// The fulfillment limit of `order_type` in milliseconds, if it has one.
    pub fn limit_ms(&self, order_type: &str) -> Option<Millis> {
        self.fulfillment_minutes.get(order_type).map(|m| m * 60_000)
    }
}

/// Compensation action types, in the order they are created and published.
pub const ACTION_TYPES: [&str; 5] = [
    "SEND_NOTIFICATION",
    "REVERSE_CHARGE",
    "CANCEL_ORDER",
    "RELEASE_RESOURCE",
    "CANCEL_APPOINTMENT",
];

/// The contract's deterministic compensation actionId: UUID v5 (URL namespace) of
/// `hmis-flow:compensation:<orderId>:<actionType>`.
pub fn action_id(order_id: &str, action_type: &str) -> String {
    v5(&format!("hmis-flow:compensation:{order_id}:{action_type}"))
}

/// A derived order event ready to publish: the event, and how its JSON differs from the
/// workflow events' (an order may belong to no workflow; CANCEL_APPOINTMENT names its
/// appointment).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Notice {
    /// `workflow_instance_id` holds the publication key: the workflow, else the orderId.
    pub derived: Derived,
    /// Whether the order names a workflow; if not, the JSON says `"workflowInstanceId": null`.
    pub in_workflow: bool,
    pub appointment_id: Option<Str>,
}

impl Notice {
    /// The record, stamped with the pipeline clock `t` at which it appeared.
    pub fn to_record(&self, t: Millis) -> OutRecord {
        let mut rec = self.derived.to_record(t);
        if !self.in_workflow || self.appointment_id.is_some() {
            let mut doc: Value =
                serde_json::from_str(&rec.payload).expect("derived events serialize to JSON");
            if !self.in_workflow {
                doc["workflowInstanceId"] = Value::Null;
            }
            if let Some(a) = &self.appointment_id {
                doc["appointmentId"] = a.as_str().into();
            }
            rec.payload = doc.to_string();
        }
        rec
    }

    fn emit(&self, t: Millis) -> (Emit, Millis, isize) {
        let rank = self.derived.rank();
        (
            Emit::record(
                (self.derived.workflow_instance_id.clone(), rank),
                self.to_record(t),
            ),
            t,
            1,
        )
    }
}

/// A critical-result alert, before the clock stamps it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CriticalAlert {
    /// UUID v5 of `hmis-flow:alert:ORDER_CRITICAL_RESULT:<resultEventId>`.
    pub alert_id: String,
    pub source: String,
    pub message: String,
    /// The ORDER_RESULTED event.
    pub cause_event_id: String,
    /// The ORDER_CRITICAL_RESULT derived event.
    pub derived_event_id: String,
    pub order_id: String,
    pub order_type: Option<String>,
    pub workflow_instance_id: Option<String>,
    pub patient_id: Option<String>,
    /// Ordering key of the order's derived events (workflow, else orderId).
    pub ordering_key: String,
}

impl CriticalAlert {
    /// The `system-alerts` record and the `alerts` row, raised at pipeline clock `t`.
    fn emit(&self, t: Millis) -> [(Emit, Millis, isize); 2] {
        let details = json!({
            "orderType": self.order_type,
            "patientId": self.patient_id,
            "derivedEventId": self.derived_event_id,
        });
        let doc = json!({
            "alertId": self.alert_id,
            "severity": "CRITICAL",
            "source": self.source,
            "kind": "ORDER_CRITICAL_RESULT",
            "message": self.message,
            "raisedAt": format_time(t),
            "causeEventId": self.cause_event_id,
            "orderId": self.order_id,
            "workflowInstanceId": self.workflow_instance_id,
            "patientId": self.patient_id,
            "orderType": self.order_type,
            "derivedEventId": self.derived_event_id,
        });
        let record = OutRecord {
            topic: OutTopic::Alerts,
            event_id: self.alert_id.clone(),
            event_type: "ORDER_CRITICAL_RESULT".into(),
            key: Some(self.source.clone()),
            payload: doc.to_string(),
        };
        let row = AlertRow {
            alert_id: self.alert_id.clone(),
            severity: "CRITICAL".into(),
            source: self.source.clone(),
            kind: "ORDER_CRITICAL_RESULT".into(),
            message: self.message.clone(),
            raised_at: t,
            cause_event_id: Some(self.cause_event_id.clone()),
            component: None,
            workflow_instance_id: self.workflow_instance_id.clone(),
            task_instance_id: None,
            order_id: Some(self.order_id.clone()),
            details: Some(details.to_string()),
        };
        // Right after the ORDER_CRITICAL_RESULT it accompanies.
        let rank = DerivedType::OrderCriticalResult as u8;
        [
            (
                Emit::record((self.ordering_key.as_str().into(), rank), record),
                t,
                1,
            ),
            (Emit::row(Row::Alert(row)), t, 1),
        ]
    }
}

/// An order with a fulfillment deadline: what ORDER_OVERDUE reports.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OverdueInfo {
    pub order_id: Str,
    pub order_type: Str,
    pub workflow_instance_id: Option<Str>,
    pub patient_id: Option<Str>,
    /// The ORDER_ACTIVATED event the deadline runs from.
    pub activated_event_id: Str,
    pub activated_at: Millis,
    pub due_at: Millis,
}

/// One output of [`evaluate_order`].
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum OrderOut {
    /// The `orders` row before `is_overdue` is merged in.
    OrderBase(OrderRow),
    /// An `order_transitions` or `compensation_actions` row.
    Row(Row),
    /// A derived event, published when it appears.
    Event(Notice),
    /// A critical-result alert, raised when it appears.
    Alert(CriticalAlert),
    /// A rejected record, dead-lettered when it appears.
    Dead(RejectedOrderEvent),
    /// The order's ACTIVATED/IN_PROGRESS period ended after its deadline: overdue.
    OverdueLate(OverdueInfo),
    /// The order is still ACTIVATED/IN_PROGRESS: overdue when the clock passes its deadline.
    OverdueOpen(OverdueInfo),
}

/// Parts merged into an `orders` row.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
enum OrderRowPart {
    Base(OrderRow),
    Overdue,
}

/// The order rules over the order states: rows of `orders`, `order_transitions`,
/// `compensation_actions` and `alerts`; ORDER_* derived events; CRITICAL alerts; dead letters
/// of rejected transitions; and ORDER_OVERDUE when the fulfillment deadline passes.
pub fn order_rules<'s>(
    states: VecCollection<'s, u64, (String, Arc<OrderState>)>,
    rules: &OrderRules,
    retired: &VecCollection<'s, u64, crate::output::Owner>,
    decide_from: u64,
) -> VecCollection<'s, u64, Emit> {
    let rules = Arc::new(rules.clone());
    let eval_rules = rules.clone();
    // Consolidated, so an output that survives a state change does not reappear.
    let outs = states
        .flat_map(move |(_, st)| evaluate_order(&st, &eval_rules))
        .consolidate();

    let direct = outs
        .clone()
        .inner
        .flat_map(move |(o, t, r)| -> Vec<(Emit, Millis, isize)> {
            match o {
                OrderOut::Row(row) => vec![(Emit::row(row), t, r)],
                OrderOut::Event(n) if r > 0 => vec![n.emit(t)],
                OrderOut::Alert(a) if r > 0 => a.emit(t).into(),
                OrderOut::Dead(rej) if r > 0 => {
                    vec![(Emit::dead(dead_letter(&rej, &rules.topic, t)), t, 1)]
                }
                _ => Vec::new(),
            }
        })
        .as_collection();

    let late = outs.clone().flat_map(|o| match o {
        OrderOut::OverdueLate(i) => Some((i.order_id.clone(), i)),
        _ => None,
    });
    let open = outs
        .clone()
        .flat_map(|o| match o {
            OrderOut::OverdueOpen(i) => Some((i.order_id.clone(), i)),
            _ => None,
        })
        .delay_until(|(_, i): &(Str, OverdueInfo)| Some(i.due_at));
    let overdue = late
        .concat(open)
        .reduce_named("OrdersOverdue", |_id, input, output| {
            output.push((input[0].0.clone(), 1));
        });
    // The first appearance per order stands (a later change of the order's facts must not
    // re-derive ORDER_OVERDUE with new contents under the same eventId).
    let crate::timers::Appearances { events, facts } =
        crate::timers::key_appearances(overdue.clone(), retired, decide_from, |id: &Str, _| {
            crate::output::Owner::Order(id.clone())
        });
    // The row shows every ORDER_OVERDUE published, live or not (in wall mode a result dated
    // before the deadline may arrive after it fired), with the live ones.
    let overdue_shown = overdue.concat(facts);
    let overdue_out = events
        .flat_map(|((_, i), t, r): ((Str, OverdueInfo), Millis, isize)| {
            (r > 0).then(|| {
                let ident = Identity {
                    workflow_instance_id: i.workflow_instance_id.clone(),
                    patient_id: i.patient_id.clone(),
                    order_type: Some(i.order_type.clone()),
                };
                let mut n = ident.notice(
                    DerivedType::OrderOverdue,
                    IdName::new(&i.order_id, None, None),
                    &i.order_id,
                );
                n.derived.due_at = Some(i.due_at);
                n.derived.minutes_overdue = Some((t.saturating_sub(i.due_at) / 60_000) as i64);
                n.derived.cause_event_id = Some(i.activated_event_id.clone());
                n.emit(t)
            })
        })
        .as_collection();

    let rows = outs
        .flat_map(|o| match o {
            OrderOut::OrderBase(row) => Some((row.order_id.clone(), OrderRowPart::Base(row))),
            _ => None,
        })
        .concat(overdue_shown.map(|(id, _)| (id, OrderRowPart::Overdue)))
        .reduce_named("OrderRow", |_id, input, output| {
            let mut base = None;
            let mut overdue = false;
            for (part, _) in input {
                match part {
                    OrderRowPart::Base(row) => base = Some(row),
                    OrderRowPart::Overdue => overdue = true,
                }
            }
            if let Some(row) = base {
                let mut row = row.clone();
                row.is_overdue = overdue;
                output.push((Row::Order(row), 1));
            }
        })
        .map(|(_, row)| Emit::row(row));

    direct.concat(overdue_out).concat(rows)
}

/// When an order's state may be retired ([`crate::lifecycle`]): once CLOSED, or CANCELLED
/// with every compensation action completed. Returns the (data) time it closed.
pub fn retirable(st: &OrderState, rules: &OrderRules) -> Option<Millis> {
    match st.status? {
        OrderStatus::Closed => st.last_event_time,
        OrderStatus::Cancelled => {
            let mut last = st.last_event_time?;
            for o in evaluate_order(st, rules) {
                if let OrderOut::Row(Row::Compensation(c)) = o {
                    last = last.max(c.completed_at?);
                }
            }
            Some(last)
        }
        _ => None,
    }
}

/// The dead letter of a rejected order event: the original record, byte for byte.
fn dead_letter(rej: &RejectedOrderEvent, topic: &str, t: Millis) -> DeadLetter {
    let e = &rej.event;
    DeadLetter::of_record(
        topic,
        e.pos,
        e.raw_key.as_deref(),
        &e.order_id,
        e.raw.as_deref(),
        || serde_json::to_string(e).unwrap_or_default(),
        rej.reason,
        rej.detail.clone(),
        t,
    )
}
