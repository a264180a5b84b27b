//! `OrderOp`: the order rules (contract §5) as keyed state, one entry per orderId.
//!
//! An order's entry keeps its events and their fold ([`fold_order`]'s state). At each stamp
//! where its events change (or its fulfillment deadline passes), events that come after
//! every event held, in the fold's order (eventTime, position), and repeat none of them are
//! applied to the state as it is ([`apply_order_event`]); only their own outputs and the
//! order-wide ones are derived ([`evaluate_order_from`]) and compared with the previous
//! order-wide outputs. Otherwise (an event out of order, a duplicate, a retraction, a
//! retirement, the order's identity changed by the new events) the order is folded again and
//! everything the state before derived ([`evaluate_order`]) is compared with what the state
//! now derives. Either way, rows that changed are output as `(-old, +new)`, derived events,
//! alerts and dead letters when they appear, as the differential chain in
//! [`crate::orders::order_rules`] does. ORDER_OVERDUE is a timer of the key (at deadline + 1)
//! and its emit-once flag is state of the key. The [`OrderFact`] readiness needs goes to the
//! workflow operator, keyed by workflow.
//!
//! The lifecycle ([`crate::lifecycle`], here [`super::life`]): a closed order (CLOSED, or
//! CANCELLED with every compensation done: [`crate::orders::retirable`]) retires at the
//! instant the old core's tracker retires it: its events are dropped (the rows' retractions
//! at that instant, with [`Emit::Retired`], forget them), and a tombstone of its eventId
//! hashes rejects a later event (`INVALID_TRANSITION`) and ignores a duplicate.

use crate::model::Str;
use std::sync::Arc;

use serde_json::json;

use crate::derived::{Derived, DerivedType};
use crate::engine::changes::{diff_sorted, replace, sorted, supersede, RowChanges};
use crate::engine::keyed::{Ctx, KeyedLogic};
use crate::engine::life::{self, Closure, Tomb};
use crate::events::{format_time, OrderEvent, Pos};
use crate::lifecycle::{hash_str, late_detail, LifecycleRules, Tracked};
use crate::orders::{
    apply_order_event, evaluate_order, fold_order, CriticalAlert, Eligibility, Notice, OrderOut,
    OrderRules, OverdueInfo, RejectedOrderEvent,
};
use crate::orders::{retirable, OrderState};
use crate::output::Owner;
use crate::output::{AlertRow, DeadLetter, Millis, OutRecord, OutTopic, Row};
use crate::rules::{evaluate_order_from, Applies, Identity};
use crate::workflows::OrderFact;
use crate::Emit;

/// What the order operator outputs: something to emit, or a fact for a workflow.
pub type OrderOutput = Result<Emit, (Str, OrderFact)>;

/// One order's state.
#[derive(Default)]
struct Entry {
    events: Vec<Arc<OrderEvent>>,
    /// The fold of `events` ([`fold_order`]), kept while they arrive in its order and
    /// applied to one by one ([`apply_order_event`]); `None` while `events` is empty.
    state: Option<Arc<OrderState>>,
    /// The greatest (eventTime, position) among `events`: a record above it (and not a
    /// duplicate) is applied to `state` as it is.
    last: Option<(Millis, Pos)>,
    /// The order-wide outputs of the previous evaluation (compensation, fulfillment
    /// deadline, the row's base; sorted, distinct). Each event's own outputs are not kept:
    /// they are output once, when the event is applied, and computed again only when the
    /// fold is redone (an event out of order, a duplicate, a retraction, a retirement, a
    /// change of the order's identity), from the state before.
    prev_wide: Vec<OrderOut>,
    /// The order is overdue now (the differential chain's `OrdersOverdue`).
    overdue_now: Option<OverdueInfo>,
    /// ORDER_OVERDUE was derived (the first appearance stands).
    appeared: Option<OverdueInfo>,
    /// Whether the restart seed ([`LifecycleRules::decide_from`]) has been applied.
    seeded: bool,
    row: Option<Arc<Row>>,
    fact: Option<(Str, OrderFact)>,
    /// The closure as the old core's tracker sees it.
    closure: Closure<Arc<OrderState>>,
    /// Set once the order retired.
    tomb: Option<Tomb>,
}

/// The order logic of a worker.
pub struct OrderLogic {
    elig: Eligibility,
    rules: OrderRules,
    decide_from: u64,
    life: LifecycleRules,
    orders: std::collections::HashMap<Str, Entry>,
}

impl OrderLogic {
    pub fn new(elig: Eligibility, rules: OrderRules, life: LifecycleRules) -> OrderLogic {
        OrderLogic {
            elig,
            rules,
            decide_from: life.decide_from,
            life,
            orders: Default::default(),
        }
    }
}

/// A derived order event's emit (as `Notice::emit`).
fn notice(n: &Notice, t: Millis) -> Emit {
    Emit::record(
        (n.derived.workflow_instance_id.clone(), n.derived.rank()),
        n.to_record(t),
    )
}

/// The record and row of a critical-result alert raised at `t` (as `CriticalAlert::emit`).
fn alert(a: &CriticalAlert, t: Millis) -> [Emit; 2] {
    let details = json!({
        "orderType": a.order_type,
        "patientId": a.patient_id,
        "derivedEventId": a.derived_event_id,
    });
    let doc = json!({
        "alertId": a.alert_id,
        "severity": "CRITICAL",
        "source": a.source,
        "kind": "ORDER_CRITICAL_RESULT",
        "message": a.message,
        "raisedAt": format_time(t),
        "causeEventId": a.cause_event_id,
        "orderId": a.order_id,
        "workflowInstanceId": a.workflow_instance_id,
        "patientId": a.patient_id,
        "orderType": a.order_type,
        "derivedEventId": a.derived_event_id,
    });
    let record = OutRecord {
        topic: OutTopic::Alerts,
        event_id: a.alert_id.clone(),
        event_type: "ORDER_CRITICAL_RESULT".into(),
        key: Some(a.source.clone()),
        payload: doc.to_string(),
    };
    let row = AlertRow {
        alert_id: a.alert_id.clone(),
        severity: "CRITICAL".into(),
        source: a.source.clone(),
        kind: "ORDER_CRITICAL_RESULT".into(),
        message: a.message.clone(),
        raised_at: t,
        cause_event_id: Some(a.cause_event_id.clone()),
        component: None,
        workflow_instance_id: a.workflow_instance_id.clone(),
        task_instance_id: None,
        order_id: Some(a.order_id.clone()),
        details: Some(details.to_string()),
    };
    [
        Emit::record(
            (
                a.ordering_key.as_str().into(),
                DerivedType::OrderCriticalResult as u8,
            ),
            record,
        ),
        Emit::row(Row::Alert(row)),
    ]
}

/// The dead letter of a rejected order event (as `orders::dead_letter`).
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

/// ORDER_OVERDUE from the overdue facts of its first appearance, at `t`.
fn overdue(i: &OverdueInfo, t: Millis) -> Emit {
    let key = i.workflow_instance_id.as_deref().unwrap_or(&i.order_id);
    let mut d = Derived::new(
        DerivedType::OrderOverdue,
        &format!("hmis-flow:ORDER_OVERDUE:{}", i.order_id),
        key,
    );
    d.patient_id = i.patient_id.clone();
    d.order_id = Some(i.order_id.clone());
    d.order_type = Some(i.order_type.clone());
    d.due_at = Some(i.due_at);
    d.minutes_overdue = Some((t.saturating_sub(i.due_at) / 60_000) as i64);
    d.cause_event_id = Some(i.activated_event_id.clone());
    notice(
        &Notice {
            derived: d,
            in_workflow: i.workflow_instance_id.is_some(),
            appointment_id: None,
        },
        t,
    )
}

impl KeyedLogic for OrderLogic {
    type Key = Str;
    type Rec = Arc<OrderEvent>;
    type Side = ();
    type Out = OrderOutput;
    type Order = (i32, i64);

    fn key(rec: &Self::Rec) -> Str {
        rec.order_id.clone()
    }
    fn order(rec: &Self::Rec) -> (i32, i64) {
        (rec.pos.partition, rec.pos.offset)
    }
    fn side(&mut self, _t: u64, _side: Vec<((), isize)>, _touched: &mut Vec<Str>) {}

    fn step(
        &mut self,
        oid: &Str,
        t: u64,
        recs: Vec<(Self::Rec, isize)>,
        cx: &mut Ctx<OrderOutput>,
    ) {
        let life_rules = &self.life;
        let stats = &life_rules.stats;
        let e = self.orders.entry(oid.clone()).or_default();
        let held_before = e.events.len() as i64;
        if !cx.exhausted() && e.tomb.as_ref().is_some_and(|tb| tb.expired(life_rules, t)) {
            e.tomb = None;
            life::add(stats, |s| &s.tombstones, -1);
        }
        let n_before = e.events.len();
        let mut retracted = false;
        for (r, d) in recs {
            if let Some(tomb) = &mut e.tomb {
                // Retired: a duplicate changes nothing, a new event is rejected.
                if d > 0 {
                    if tomb.insert(hash_str(&r.event_id)) {
                        life::count(stats, |s| &s.late_total);
                        let detail = late_detail(oid, tomb.at);
                        let dl = r.dead_letter(life_rules, r.late_reason(), detail, t);
                        cx.give(Ok(Emit::dead(dl)), 1);
                    } else {
                        life::count(stats, |s| &s.duplicates_total);
                    }
                }
                continue;
            }
            if d > 0 {
                e.events.push(r);
            } else if let Some(i) = e.events.iter().position(|x| *x == r) {
                e.events.swap_remove(i);
                retracted = true;
            }
        }
        // Retirement: the tracker retracts every record of the key at this instant.
        let mut retired = false;
        if e.tomb.is_none() && !cx.exhausted() && e.closure.retires_at(t) {
            let ids = e.events.iter().map(|r| hash_str(&r.event_id)).collect();
            e.events.clear();
            e.tomb = Some(Tomb::new(t, ids));
            e.appeared = None;
            e.overdue_now = None;
            retired = true;
            cx.give(Ok(Emit::Retired(Owner::Order(oid.clone()))), 1);
            life::count(stats, |s| &s.retired_total);
            life::add(stats, |s| &s.tombstones, 1);
            cx.wake_at(
                t.saturating_add(life_rules.tombstone_retention_ms)
                    .saturating_add(1),
            );
        }

        // The new events in the fold's order, if they can be applied to the state as it is:
        // each after every event held, none a duplicate of another.
        let mut added: Vec<&OrderEvent> = Vec::new();
        let in_order = !retracted && !retired && {
            added.extend(e.events[n_before..].iter().map(|x| &**x));
            added.sort_by_key(|x| (x.event_time, x.pos));
            let after = added
                .first()
                .is_none_or(|x| e.last.is_none_or(|l| (x.event_time, x.pos) > l));
            after
                && added
                    .iter()
                    .all(|x| e.events.iter().filter(|y| y.event_id == x.event_id).count() == 1)
        };
        // What the state before derived (`before`) against what it derives now (`outs`),
        // both sorted and distinct, and the order-wide part of `outs` (kept for the next
        // step). While the new events apply in order and the identity stays, `before` is
        // the previous order-wide outputs and `outs` adds only the new events' own.
        let (elig, rules) = (&self.elig, &self.rules);
        let mut outs: Vec<OrderOut> = Vec::new();
        let mut applied = None;
        if in_order && !added.is_empty() {
            let st = Arc::make_mut(
                e.state
                    .get_or_insert_with(|| Arc::new(OrderState::new(oid))),
            );
            let (from, ident) = (Applies::of(st), Identity::of(st));
            for x in &added {
                apply_order_event(st, x, elig);
            }
            e.last = e.last.max(added.last().map(|x| (x.event_time, x.pos)));
            if Identity::of(st) == ident {
                applied = Some(evaluate_order_from(st, rules, from, &mut outs));
            }
        }
        let (before, wide) = match applied {
            Some(split) => {
                let wide = sorted(outs[split..].to_vec());
                (std::mem::take(&mut e.prev_wide), wide)
            }
            None if in_order && added.is_empty() => {
                // Nothing applied: the same outputs.
                outs = e.prev_wide.clone();
                (e.prev_wide.clone(), std::mem::take(&mut e.prev_wide))
            }
            None => {
                // Derived again from the state before and the state now. Applied in order
                // (the identity changed): the state before is the fold of the events held
                // before this step; else it is the state kept, and the state now a new fold.
                let before = if in_order {
                    let old: Vec<&OrderEvent> = e.events[..n_before].iter().map(|x| &**x).collect();
                    evaluate_order(&fold_order(oid, &old, elig), rules)
                } else {
                    let before = e.state.as_deref().map(|st| evaluate_order(st, rules));
                    let evs: Vec<&OrderEvent> = e.events.iter().map(|x| &**x).collect();
                    e.state = (!evs.is_empty()).then(|| Arc::new(fold_order(oid, &evs, elig)));
                    e.last = evs.iter().map(|x| (x.event_time, x.pos)).max();
                    before.unwrap_or_default()
                };
                let split = match &e.state {
                    Some(st) => evaluate_order_from(st, rules, Applies::default(), &mut outs),
                    None => 0,
                };
                (sorted(before), sorted(outs[split..].to_vec()))
            }
        };
        let outs = sorted(outs);
        let st = e.state.clone();

        // Overdue: late by its events, or open with its deadline passed at `t`.
        let mut base = None;
        let mut now: Option<&OverdueInfo> = None;
        for o in &outs {
            match o {
                OrderOut::OverdueLate(i) => now = now.min(Some(i)).or(Some(i)),
                OrderOut::OverdueOpen(i) if t > i.due_at => {
                    now = now.min(Some(i)).or(Some(i));
                }
                OrderOut::OverdueOpen(i) => cx.wake_at(i.due_at.saturating_add(1)),
                OrderOut::OrderBase(row) => base = Some(row),
                _ => {}
            }
        }
        let now = now.cloned();
        if !e.seeded && t >= self.decide_from {
            // Present when the clock reached `decide_from`: it appeared before the restart.
            e.seeded = true;
            if e.appeared.is_none() {
                e.appeared = e.overdue_now.clone();
            }
        }
        if t >= self.decide_from && e.appeared.is_none() {
            if let Some(i) = &now {
                cx.give(Ok(overdue(i, t)), 1);
                e.appeared = Some(i.clone());
            }
        }
        e.overdue_now = now;

        let rules = &self.rules;
        let mut rows = RowChanges::default();
        diff_sorted(&before, &outs, |o, d| match o {
            OrderOut::Row(row) => rows.give(Arc::new(row.clone()), d, |r, d| {
                cx.give(Ok(Emit::Row(r)), d)
            }),
            OrderOut::Event(n) if d > 0 => cx.give(Ok(notice(n, t)), 1),
            OrderOut::Alert(a) if d > 0 => {
                for x in alert(a, t) {
                    cx.give(Ok(x), 1);
                }
            }
            OrderOut::Dead(rej) if d > 0 => {
                cx.give(Ok(Emit::dead(dead_letter(rej, &rules.topic, t))), 1)
            }
            _ => {}
        });
        rows.finish(|r, d| cx.give(Ok(Emit::Row(r)), d));

        let row = base.map(|b| {
            let mut b = b.clone();
            b.is_overdue = e.overdue_now.is_some() || e.appeared.is_some();
            Arc::new(Row::Order(b))
        });
        supersede(&mut e.row, row, |r, d| cx.give(Ok(Emit::Row(r)), d));
        let fact = st.as_deref().and_then(OrderFact::of);
        replace(&mut e.fact, fact, |f, d| cx.give(Err(f), d));
        e.prev_wide = wide;
        if e.tomb.is_none() && !retired {
            let closure = st.and_then(|st| {
                let at = retirable(&st, &self.rules)?;
                Some((st, at))
            });
            if let Some(d) = e.closure.update(life_rules, t, closure) {
                cx.wake_at(d);
            }
            e.closure.log.prune(t);
        } else {
            e.closure = Closure::default();
        }
        let held_after = e.events.len() as i64;
        life::add(stats, |s| &s.held_records, held_after - held_before);
        life::add(
            stats,
            |s| &s.live_keys,
            (held_after > 0) as i64 - (held_before > 0) as i64,
        );
        if e.events.is_empty()
            && e.row.is_none()
            && e.fact.is_none()
            && e.appeared.is_none()
            && e.tomb.is_none()
            && e.closure.due.is_empty()
        {
            self.orders.remove(oid);
        }
    }
}
