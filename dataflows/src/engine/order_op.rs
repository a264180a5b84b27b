//! `OrderOp`: the order rules (contract §5) as keyed state, one entry per orderId.
//!
//! At each stamp where an order's events change (or its fulfillment deadline passes), the
//! order is refolded with [`fold_order`] and evaluated with [`evaluate_order`] — today's pure
//! functions — and the result is compared with the previous one: rows that changed are
//! output as `(-old, +new)`, derived events, alerts and dead letters when they appear, as
//! the differential chain in [`crate::orders::order_rules`] does. ORDER_OVERDUE is a timer
//! of the key (at deadline + 1) and its emit-once flag is state of the key. The
//! [`OrderFact`] readiness needs goes to the workflow operator, keyed by workflow.
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
use crate::engine::keyed::{Ctx, KeyedLogic};
use crate::engine::life::{self, Closure, Tomb};
use crate::events::{format_time, OrderEvent};
use crate::lifecycle::{hash_str, late_detail, LifecycleRules, Tracked};
use crate::orders::{
    evaluate_order, fold_order, CriticalAlert, Eligibility, Notice, OrderOut, OrderRules,
    OverdueInfo, RejectedOrderEvent,
};
use crate::orders::{retirable, OrderState};
use crate::output::Owner;
use crate::output::{AlertRow, DeadLetter, Millis, OutRecord, OutTopic, Row};
use crate::workflows::OrderFact;
use crate::Emit;

/// What the order operator outputs: something to emit, or a fact for a workflow.
pub type OrderOutput = Result<Emit, (Str, OrderFact)>;

/// One order's state.
#[derive(Default)]
struct Entry {
    events: Vec<Arc<OrderEvent>>,
    /// The previous evaluation's rows, events, alerts and dead letters (sorted, distinct).
    prev: Vec<OrderOut>,
    /// The order is overdue now (the differential chain's `OrdersOverdue`).
    overdue_now: Option<OverdueInfo>,
    /// ORDER_OVERDUE was derived (the first appearance stands).
    appeared: Option<OverdueInfo>,
    /// Whether the restart seed ([`Config::decide_from`]) has been applied.
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

/// Calls `f(item, -1)` for items only in `old`, `f(item, +1)` for items only in `new`
/// (both sorted and distinct).
pub(crate) fn diff_sorted<T: Ord>(old: &[T], new: &[T], mut f: impl FnMut(&T, isize)) {
    let (mut i, mut j) = (0, 0);
    while i < old.len() || j < new.len() {
        match (old.get(i), new.get(j)) {
            (Some(a), Some(b)) if a == b => {
                i += 1;
                j += 1;
            }
            (Some(a), Some(b)) if a < b => {
                f(a, -1);
                i += 1;
            }
            (Some(_), Some(b)) => {
                f(b, 1);
                j += 1;
            }
            (Some(a), None) => {
                f(a, -1);
                i += 1;
            }
            (None, Some(b)) => {
                f(b, 1);
                j += 1;
            }
            (None, None) => unreachable!(),
        }
    }
}

/// A step's row changes, with the retraction of a row replaced under the same primary key
/// left out. At one time the gather applies retractions before insertions
/// ([`crate::gather::Collapser`]), so `-old +new` and `+new` alone collapse to the same
/// upsert; leaving `-old` out halves what a replaced row costs on its way to the gatherer
/// (the exchange, the sort and the collapse on worker 0). A fact (first write stands) keeps
/// its retraction, and so does a row deleted rather than replaced.
///
/// Feed it a sorted diff ([`diff_sorted`]), where a row's `-old` comes right before its
/// `+new` when the key fields lead the row's order; where they do not, both are given.
#[derive(Default)]
pub(crate) struct RowChanges {
    held: Option<Arc<Row>>,
}

impl RowChanges {
    pub(crate) fn give(&mut self, row: Arc<Row>, d: isize, mut f: impl FnMut(Arc<Row>, isize)) {
        if d < 0 {
            if let Some(h) = self.held.replace(row) {
                f(h, -1);
            }
            return;
        }
        if let Some(h) = self.held.take() {
            if h.is_fact() || !h.same_key(&row) {
                f(h, -1);
            }
        }
        f(row, d);
    }

    /// Gives the retraction still held (call at the end of the diff).
    pub(crate) fn finish(&mut self, mut f: impl FnMut(Arc<Row>, isize)) {
        if let Some(h) = self.held.take() {
            f(h, -1);
        }
    }
}

/// Outputs `+new` for a row replaced by another of the same key, `-old` for a row gone
/// (see [`RowChanges`]; a fact's `-old` is kept).
pub(crate) fn supersede(
    old: &mut Option<Arc<Row>>,
    new: Option<Arc<Row>>,
    mut f: impl FnMut(Arc<Row>, isize),
) {
    if *old != new {
        match (old.take(), &new) {
            (Some(o), Some(n)) if !o.is_fact() && o.same_key(n) => f(n.clone(), 1),
            (o, n) => {
                if let Some(o) = o {
                    f(o, -1);
                }
                if let Some(n) = n {
                    f(n.clone(), 1);
                }
            }
        }
        *old = new;
    }
}

/// Outputs `-old +new` for a value that changed.
pub(crate) fn replace<T: Clone + PartialEq>(
    old: &mut Option<T>,
    new: Option<T>,
    mut f: impl FnMut(T, isize),
) {
    if *old != new {
        if let Some(o) = old.take() {
            f(o, -1);
        }
        if let Some(n) = &new {
            f(n.clone(), 1);
        }
        *old = new;
    }
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
        let (mut outs, st) = if e.events.is_empty() {
            (Vec::new(), None)
        } else {
            let evs: Vec<&OrderEvent> = e.events.iter().map(|x| &**x).collect();
            let st = fold_order(oid, &evs, &self.elig);
            (evaluate_order(&st, &self.rules), Some(st))
        };
        outs.sort();
        outs.dedup();

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
        diff_sorted(&e.prev, &outs, |o, d| match o {
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
        let fact = st.as_ref().and_then(OrderFact::of);
        replace(&mut e.fact, fact, |f, d| cx.give(Err(f), d));
        e.prev = outs;
        if e.tomb.is_none() && !retired {
            let closure = st.and_then(|st| {
                let at = retirable(&st, &self.rules)?;
                Some((Arc::new(st), at))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gather::Collapser;
    use crate::output::{AlertRow, ReadinessRow};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn readiness(wf: u32, def: u32, attempt: i32) -> Arc<Row> {
        Arc::new(Row::Readiness(ReadinessRow {
            workflow_instance_id: format!("wf-{wf}").into(),
            task_def_id: format!("d-{def}").into(),
            patient_id: None,
            template_id: "tpl".into(),
            template_version: 1,
            task_name: None,
            automatic: false,
            next_attempt: attempt,
        }))
    }

    fn alert(id: u32, message: u32) -> Arc<Row> {
        Arc::new(Row::Alert(AlertRow {
            alert_id: format!("a-{id}"),
            severity: "HIGH".into(),
            source: "test".into(),
            kind: "k".into(),
            message: format!("m-{message}"),
            raised_at: 0,
            cause_event_id: None,
            component: None,
            workflow_instance_id: None,
            task_instance_id: None,
            order_id: None,
            details: None,
        }))
    }

    /// A key's rows: at most one per primary key, sorted.
    fn rows(rng: &mut StdRng) -> Vec<Arc<Row>> {
        let mut v: Vec<Arc<Row>> = Vec::new();
        for def in 0..4 {
            if rng.random_bool(0.6) {
                v.push(readiness(1, def, rng.random_range(1..3)));
            }
        }
        for id in 0..3 {
            if rng.random_bool(0.5) {
                v.push(alert(id, rng.random_range(0..2)));
            }
        }
        v.sort();
        v
    }

    /// What the gather makes of one step's changes, with and without the replaced rows'
    /// retractions: the same batch, from any earlier state of the flush.
    #[test]
    fn leaving_out_replaced_rows_retractions_collapses_alike() {
        let mut dropped = 0;
        for seed in 0..500 {
            let mut rng = StdRng::seed_from_u64(seed);
            let (before, old, new) = (rows(&mut rng), rows(&mut rng), rows(&mut rng));
            let (old_wf, new_wf) = (
                rng.random_bool(0.7)
                    .then(|| readiness(2, 0, rng.random_range(1..3))),
                rng.random_bool(0.7)
                    .then(|| readiness(2, 0, rng.random_range(1..3))),
            );
            let mut full: Vec<(Emit, isize)> = Vec::new();
            diff_sorted(&old, &new, |r, d| full.push((Emit::Row(r.clone()), d)));
            replace(&mut old_wf.clone(), new_wf.clone(), |r, d| {
                full.push((Emit::Row(r), d))
            });
            let mut lean: Vec<(Emit, isize)> = Vec::new();
            let mut changes = RowChanges::default();
            diff_sorted(&old, &new, |r, d| {
                changes.give(r.clone(), d, |r, d| lean.push((Emit::Row(r), d)))
            });
            changes.finish(|r, d| lean.push((Emit::Row(r), d)));
            supersede(&mut old_wf.clone(), new_wf.clone(), |r, d| {
                lean.push((Emit::Row(r), d))
            });
            dropped += full.len() - lean.len();

            let collapse = |changes: Vec<(Emit, isize)>| {
                let mut c = Collapser::default();
                c.add_time(before.iter().map(|r| (Emit::Row(r.clone()), 1)).collect());
                c.add_time(changes);
                c.take(0).rows
            };
            assert_eq!(collapse(lean), collapse(full), "seed {seed}");
        }
        assert!(
            dropped > 100,
            "the test exercises replaced rows ({dropped})"
        );
    }
}
