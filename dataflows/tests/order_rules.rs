//! The order rules of contract §5 on the in-memory dataflow: rows, ORDER_* derived events,
//! the critical-result alert, dead letters of rejected transitions, compensation sets, and
//! the fulfillment deadline at its boundary. Every event goes through the real decoder.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use hmis_dataflows::derived::v5;
use hmis_dataflows::events::Event;
use hmis_dataflows::harness::{run, Outcome, Run};
use hmis_dataflows::orders::action_id;
use hmis_dataflows::output::{
    AlertRow, CompensationRow, DeadLetter, Millis, OrderRow, OrderTransitionRow, OutRecord,
    OutTopic, Row,
};
use hmis_dataflows::RulesConfig;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// Builders

/// An order: its id, workflow (or none) and type; builds its events.
#[derive(Clone, Copy)]
struct O {
    oid: &'static str,
    wid: Option<&'static str>,
    ty: &'static str,
}

const fn lab(oid: &'static str) -> O {
    O {
        oid,
        wid: Some("w1"),
        ty: "LAB_TEST",
    }
}

impl O {
    fn of(self, ty: &'static str) -> O {
        O { ty, ..self }
    }

    fn event_id(&self, kind: &str, at: Millis) -> String {
        format!("{kind}-{}-{at}", self.oid)
    }

    /// The JSON of one event (as produced upstream).
    fn doc(&self, kind: &str, status: &str, at: Millis, md: Value) -> Value {
        let mut doc = json!({"eventId": self.event_id(kind, at), "eventType": kind, "eventTime": iso(at),
            "orderId": self.oid, "patientId": "p-1", "orderType": self.ty, "orderStatus": status,
            "actor": "dr-x", "metadata": md});
        if let Some(w) = self.wid {
            doc["workflowInstanceId"] = w.into();
        }
        doc
    }

    fn ev(&self, kind: &str, status: &str, at: Millis, md: Value) -> Event {
        dec(
            hmis_dataflows::events::InputTopic::Orders,
            Some(self.oid),
            Some(self.doc(kind, status, at, md)),
        )
    }

    fn created(&self, at: Millis, md: Value) -> Event {
        self.ev("ORDER_CREATED", "PROPOSED", at, md)
    }
    fn authorized(&self, at: Millis, role: &str) -> Event {
        self.ev(
            "ORDER_AUTHORIZED",
            "AUTHORIZED",
            at,
            json!({"actorRole": role}),
        )
    }
    fn activated(&self, at: Millis) -> Event {
        self.ev("ORDER_ACTIVATED", "ACTIVATED", at, json!({}))
    }
    fn started(&self, at: Millis) -> Event {
        self.ev("ORDER_STARTED", "IN_PROGRESS", at, json!({}))
    }
    fn resulted(&self, at: Millis, critical: bool) -> Event {
        self.ev(
            "ORDER_RESULTED",
            "RESULTED",
            at,
            json!({"critical": critical}),
        )
    }
    fn verified(&self, at: Millis) -> Event {
        self.ev("ORDER_VERIFIED", "VERIFIED", at, json!({}))
    }
    fn closed(&self, at: Millis) -> Event {
        self.ev("ORDER_CLOSED", "CLOSED", at, json!({}))
    }
    fn cancelled(&self, at: Millis) -> Event {
        self.ev(
            "ORDER_CANCELLED",
            "CANCELLED",
            at,
            json!({"reason": "patient discharged"}),
        )
    }
    fn compensated(&self, at: Millis, action_type: &str) -> Event {
        self.ev(
            "ORDER_COMPENSATION_COMPLETED",
            "CANCELLED",
            at,
            json!({"actionId": action_id(self.oid, action_type)}),
        )
    }

    /// CREATED, AUTHORIZED (PHYSICIAN), ACTIVATED at T0, +1, +2 minutes.
    fn up_to_activated(&self, md: Value) -> Vec<Event> {
        vec![
            self.created(T0, md),
            self.authorized(T0 + MIN, "PHYSICIAN"),
            self.activated(T0 + 2 * MIN),
        ]
    }
}

// ---------------------------------------------------------------------------------------------
// Running and reading the outcome

fn run_with(
    workers: usize,
    feed: Vec<(Millis, Event)>,
    end: Millis,
    config: RulesConfig,
) -> Outcome {
    let mut r = Run::new(workers, feed, end);
    r.config = config;
    run(r)
}

/// Each event at its own eventTime, in eventTime order; flushed to just past the last one.
fn go(workers: usize, events: Vec<Event>) -> Outcome {
    let mut feed: Vec<_> = events
        .into_iter()
        .map(|e| (e.event_time().unwrap(), e))
        .collect();
    feed.sort_by_key(|(t, _)| *t);
    let end = feed.last().map(|(t, _)| t + 1).unwrap_or(T0 + 1);
    run_with(workers, feed, end, RulesConfig::default())
}

fn orders(o: &Outcome) -> BTreeMap<String, OrderRow> {
    o.rows
        .values()
        .filter_map(|r| match r {
            Row::Order(x) => Some((x.order_id.to_string(), x.clone())),
            _ => None,
        })
        .collect()
}

fn order(o: &Outcome, oid: &str) -> OrderRow {
    orders(o)
        .remove(oid)
        .unwrap_or_else(|| panic!("no orders row for {oid}"))
}

/// Transition rows in (eventTime, offset) order.
fn transitions(o: &Outcome) -> Vec<OrderTransitionRow> {
    let mut v: Vec<_> = o
        .rows
        .values()
        .filter_map(|r| match r {
            Row::OrderTransition(x) => Some(x.clone()),
            _ => None,
        })
        .collect();
    v.sort_by_key(|t| (t.event_time, t.source_offset));
    v
}

fn compensations(o: &Outcome) -> Vec<CompensationRow> {
    o.rows
        .values()
        .filter_map(|r| match r {
            Row::Compensation(x) => Some(x.clone()),
            _ => None,
        })
        .collect()
}

fn alert_rows(o: &Outcome) -> Vec<AlertRow> {
    o.rows
        .values()
        .filter_map(|r| match r {
            Row::Alert(x) => Some(x.clone()),
            _ => None,
        })
        .collect()
}

/// Every record of every batch (not deduplicated: each must be there once).
fn all_records(o: &Outcome) -> Vec<&OutRecord> {
    o.batches.iter().flat_map(|b| &b.records).collect()
}

fn dead_letters(o: &Outcome) -> Vec<&DeadLetter> {
    o.batches.iter().flat_map(|b| &b.dead_letters).collect()
}

/// The parsed payloads of the derived events of type `ty`.
fn derived(o: &Outcome, ty: &str) -> Vec<Value> {
    all_records(o)
        .into_iter()
        .filter(|r| r.topic == OutTopic::Derived && r.event_type == ty)
        .map(|r| serde_json::from_str(&r.payload).unwrap())
        .collect()
}

fn order_events(o: &Outcome) -> Vec<&OutRecord> {
    all_records(o)
        .into_iter()
        .filter(|r| r.event_type.starts_with("ORDER_"))
        .collect()
}

/// Every derived event and alert published once, and keyed as the contract says.
fn assert_each_once(o: &Outcome) {
    let mut seen = BTreeSet::new();
    for r in all_records(o) {
        assert!(
            seen.insert((r.topic, r.event_id.clone())),
            "published twice: {} {}",
            r.event_type,
            r.payload
        );
        let doc: Value = serde_json::from_str(&r.payload).unwrap();
        match r.topic {
            OutTopic::Derived => {
                assert_eq!(doc["eventId"], r.event_id.as_str());
                let key = doc["workflowInstanceId"]
                    .as_str()
                    .or(doc["orderId"].as_str());
                assert_eq!(r.key.as_deref(), key, "{}", r.payload);
            }
            OutTopic::Alerts => assert_eq!(r.key.as_deref(), doc["source"].as_str()),
            OutTopic::DeadLetter => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Lifecycle, rows and the events of accepted transitions

#[test]
fn the_happy_path_fills_the_order_row_and_one_transition_per_event() {
    let o1 = lab("o-1");
    let md = json!({"cost": 42.5, "department": "ER", "appointmentId": "ap-1"});
    let mut evs = o1.up_to_activated(md);
    evs.push(o1.started(T0 + 3 * MIN));
    evs.push(o1.resulted(T0 + 10 * MIN, false));
    evs.push(o1.verified(T0 + 11 * MIN));
    evs.push(o1.closed(T0 + 12 * MIN));
    let o = go(1, evs);
    assert_each_once(&o);

    let row = order(&o, "o-1");
    assert_eq!(row.order_status, "CLOSED");
    assert_eq!(row.workflow_instance_id.as_deref(), Some("w1"));
    assert_eq!(row.order_type, "LAB_TEST");
    assert_eq!(row.cost.as_deref(), Some("42.5"));
    assert_eq!(row.department.as_deref(), Some("ER"));
    assert_eq!(row.appointment_id.as_deref(), Some("ap-1"));
    assert_eq!(
        (row.actor.as_deref(), row.actor_role.as_deref()),
        (Some("dr-x"), Some("PHYSICIAN"))
    );
    assert_eq!(
        [
            row.created_at,
            row.authorized_at,
            row.activated_at,
            row.started_at,
            row.resulted_at,
            row.verified_at,
            row.closed_at
        ],
        [0, 1, 2, 3, 10, 11, 12].map(|m| Some(T0 + m * MIN))
    );
    assert_eq!(row.cancelled_at, None);
    assert!(!row.critical && !row.is_overdue && row.cancel_reason.is_none());

    let moves: Vec<_> = transitions(&o)
        .iter()
        .map(|t| {
            (
                t.event_type.to_string(),
                t.from_status.map(|s| s.as_str()).map(String::from),
                t.to_status.map(|s| s.as_str()).map(String::from),
                t.accepted,
            )
        })
        .collect();
    let s = |x: &str| Some(x.to_string());
    assert_eq!(
        moves,
        [
            ("ORDER_CREATED".into(), None, s("PROPOSED"), true),
            (
                "ORDER_AUTHORIZED".into(),
                s("PROPOSED"),
                s("AUTHORIZED"),
                true
            ),
            (
                "ORDER_ACTIVATED".into(),
                s("AUTHORIZED"),
                s("ACTIVATED"),
                true
            ),
            (
                "ORDER_STARTED".into(),
                s("ACTIVATED"),
                s("IN_PROGRESS"),
                true
            ),
            (
                "ORDER_RESULTED".into(),
                s("IN_PROGRESS"),
                s("RESULTED"),
                true
            ),
            ("ORDER_VERIFIED".into(), s("RESULTED"), s("VERIFIED"), true),
            ("ORDER_CLOSED".into(), s("VERIFIED"), s("CLOSED"), true),
        ]
    );

    // The only ORDER_* event of a clean lab order: the activation request after authorization.
    let events: Vec<_> = order_events(&o)
        .iter()
        .map(|r| r.event_type.clone())
        .collect();
    assert_eq!(events, ["ORDER_ACTIVATION_REQUESTED"]);
    let req = &derived(&o, "ORDER_ACTIVATION_REQUESTED")[0];
    assert_eq!(req["orderId"], "o-1");
    assert_eq!(req["orderType"], "LAB_TEST");
    assert_eq!(req["workflowInstanceId"], "w1");
    assert_eq!(req["patientId"], "p-1");
    assert_eq!(
        req["causeEventId"],
        o1.event_id("ORDER_AUTHORIZED", T0 + MIN)
    );
    // eventTime is the pipeline clock when derived: here, the authorization's time.
    assert_eq!(req["eventTime"], iso(T0 + MIN));
    assert!(dead_letters(&o).is_empty());
}

#[test]
fn activation_is_requested_for_lab_tests_and_imaging_only() {
    let cases = [
        ("LAB_TEST", "NURSE_PRACTITIONER", true),
        ("IMAGING", "PHYSICIAN", true),
        ("MEDICATION", "PHYSICIAN", false),
        ("SURGERY", "SURGEON", false),
        ("PHYSIOTHERAPY", "PHYSICIAN", false),
    ];
    for (ty, role, requested) in cases {
        let x = lab("o-1").of(ty);
        let o = go(
            1,
            vec![x.created(T0, json!({})), x.authorized(T0 + MIN, role)],
        );
        assert_eq!(order(&o, "o-1").order_status, "AUTHORIZED", "{ty}");
        assert_eq!(
            derived(&o, "ORDER_ACTIVATION_REQUESTED").len(),
            usize::from(requested),
            "{ty} by {role}"
        );
    }
}

#[test]
fn an_invalid_transition_is_rejected_reported_and_dead_lettered_with_the_original_record() {
    let o1 = lab("o-1");
    let activated_too_early = o1.doc("ORDER_ACTIVATED", "ACTIVATED", T0 + MIN, json!({}));
    let o = go(1, vec![o1.created(T0, json!({})), o1.activated(T0 + MIN)]);
    assert_each_once(&o);

    assert_eq!(
        order(&o, "o-1").order_status,
        "PROPOSED",
        "a rejected event changes nothing"
    );
    assert!(order(&o, "o-1").activated_at.is_none());
    let rejected = transitions(&o).pop().unwrap();
    assert_eq!(rejected.event_id, o1.event_id("ORDER_ACTIVATED", T0 + MIN));
    assert!(!rejected.accepted);
    assert_eq!(
        rejected.reject_reason.as_deref(),
        Some("INVALID_TRANSITION")
    );
    assert_eq!(rejected.from_status.map(|s| s.as_str()), Some("PROPOSED"));
    assert_eq!(rejected.to_status.map(|s| s.as_str()), Some("ACTIVATED"));

    let ev = derived(&o, "ORDER_TRANSITION_REJECTED");
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0]["reason"], "INVALID_TRANSITION");
    assert_eq!(ev[0]["causeEventId"], rejected.event_id.as_str());
    assert_eq!(ev[0]["orderId"], "o-1");
    assert_eq!(ev[0]["workflowInstanceId"], "w1");
    assert_eq!(
        ev[0]["eventId"],
        v5(&format!(
            "hmis-flow:ORDER_TRANSITION_REJECTED:{}:INVALID_TRANSITION",
            rejected.event_id
        ))
        .as_str()
    );

    let dead = dead_letters(&o);
    assert_eq!(dead.len(), 1);
    let d = dead[0];
    assert_eq!(d.reason.as_str(), "INVALID_TRANSITION");
    assert_eq!(d.topic, "workflow-order-events");
    assert_eq!(d.key.as_deref(), Some("o-1"));
    assert_eq!(d.offset, rejected.source_offset);
    assert_eq!(d.payload_encoding, "utf8");
    assert_eq!(
        d.payload,
        activated_too_early.to_string(),
        "the original payload"
    );
    assert_eq!(d.rejected_at, T0 + MIN);
    assert!(d.detail.contains("PROPOSED"), "{}", d.detail);
}

#[test]
fn an_ineligible_authorization_is_rejected_as_unauthorized_actor() {
    let o1 = lab("o-1");
    let o = go(
        1,
        vec![o1.created(T0, json!({})), o1.authorized(T0 + MIN, "NURSE")],
    );
    assert_each_once(&o);
    assert_eq!(order(&o, "o-1").order_status, "PROPOSED");
    assert_eq!(
        transitions(&o)[1].reject_reason.as_deref(),
        Some("UNAUTHORIZED_ACTOR")
    );
    let ev = derived(&o, "ORDER_TRANSITION_REJECTED");
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0]["reason"], "UNAUTHORIZED_ACTOR");
    assert!(derived(&o, "ORDER_ACTIVATION_REQUESTED").is_empty());
    let dead = dead_letters(&o);
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason.as_str(), "UNAUTHORIZED_ACTOR");

    // The topic name in the dead letter is configuration.
    let mut cfg = RulesConfig::default();
    cfg.orders.topic = "prod.orders".into();
    let feed = vec![
        (T0, o1.created(T0, json!({}))),
        (T0 + MIN, o1.authorized(T0 + MIN, "NURSE")),
    ];
    let o = run_with(1, feed, T0 + MIN + 1, cfg);
    assert_eq!(dead_letters(&o)[0].topic, "prod.orders");
}

#[test]
fn events_of_an_order_that_does_not_exist_are_rejected() {
    let o1 = lab("o-1");
    let o = go(1, vec![o1.authorized(T0, "PHYSICIAN")]);
    assert!(orders(&o).is_empty(), "no ORDER_CREATED, no order");
    let t = transitions(&o);
    assert_eq!(t.len(), 1);
    assert_eq!(
        (t[0].from_status.map(|s| s.as_str()), t[0].accepted),
        (None, false)
    );
    assert_eq!(derived(&o, "ORDER_TRANSITION_REJECTED").len(), 1);
    assert_eq!(dead_letters(&o).len(), 1);
}

#[test]
fn a_critical_result_emits_the_event_and_a_critical_alert() {
    let o1 = lab("o-1");
    let mut evs = o1.up_to_activated(json!({}));
    evs.push(o1.resulted(T0 + 5 * MIN, true));
    let o = go(1, evs);
    assert_each_once(&o);
    let result_id = o1.event_id("ORDER_RESULTED", T0 + 5 * MIN);

    let ev = derived(&o, "ORDER_CRITICAL_RESULT");
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0]["causeEventId"], result_id.as_str());
    assert_eq!(ev[0]["orderId"], "o-1");
    assert_eq!(
        ev[0]["eventId"],
        v5(&format!("hmis-flow:ORDER_CRITICAL_RESULT:{result_id}")).as_str()
    );
    assert!(order(&o, "o-1").critical);

    let alerts: Vec<_> = all_records(&o)
        .into_iter()
        .filter(|r| r.topic == OutTopic::Alerts)
        .collect();
    assert_eq!(alerts.len(), 1);
    let a: Value = serde_json::from_str(&alerts[0].payload).unwrap();
    let alert_id = v5(&format!(
        "hmis-flow:alert:ORDER_CRITICAL_RESULT:{result_id}"
    ));
    assert_eq!(a["alertId"], alert_id.as_str());
    assert_eq!(alerts[0].event_id, alert_id);
    assert_eq!(a["severity"], "CRITICAL");
    assert_eq!(a["source"], "orders");
    assert_eq!(alerts[0].key.as_deref(), Some("orders"));
    assert_eq!(a["kind"], "ORDER_CRITICAL_RESULT");
    assert_eq!(a["raisedAt"], iso(T0 + 5 * MIN));
    assert_eq!(a["causeEventId"], result_id.as_str());
    assert_eq!(a["orderId"], "o-1");
    assert_eq!(a["workflowInstanceId"], "w1");
    assert_eq!(a["derivedEventId"], ev[0]["eventId"]);
    assert!(a["message"].as_str().unwrap().contains("o-1"));

    let rows = alert_rows(&o);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].alert_id, alert_id);
    assert_eq!(rows[0].severity, "CRITICAL");
    assert_eq!(rows[0].raised_at, T0 + 5 * MIN);
    assert_eq!(rows[0].order_id.as_deref(), Some("o-1"));
    assert_eq!(rows[0].cause_event_id.as_deref(), Some(result_id.as_str()));

    // Not critical: neither.
    let mut evs = o1.up_to_activated(json!({}));
    evs.push(o1.resulted(T0 + 5 * MIN, false));
    let o = go(1, evs);
    assert!(derived(&o, "ORDER_CRITICAL_RESULT").is_empty() && alert_rows(&o).is_empty());
}

#[test]
fn an_order_without_a_workflow_is_keyed_by_its_order_id() {
    let x = O {
        oid: "o-9",
        wid: None,
        ty: "IMAGING",
    };
    let o = go(
        1,
        vec![
            x.created(T0, json!({})),
            x.authorized(T0 + MIN, "PHYSICIAN"),
            x.cancelled(T0 + 2 * MIN),
        ],
    );
    assert_each_once(&o);
    let evs = order_events(&o);
    assert!(!evs.is_empty());
    for r in evs {
        assert_eq!(r.key.as_deref(), Some("o-9"));
        let doc: Value = serde_json::from_str(&r.payload).unwrap();
        assert_eq!(doc["workflowInstanceId"], Value::Null, "{}", r.payload);
        assert_eq!(doc["orderId"], "o-9");
    }
    assert_eq!(order(&o, "o-9").workflow_instance_id, None);
}

// ---------------------------------------------------------------------------------------------
// Compensation

#[test]
fn action_ids_are_the_contracts_uuid_v5() {
    // Computed independently, with Python's uuid.uuid5(uuid.NAMESPACE_URL, name).
    let expected = [
        ("SEND_NOTIFICATION", "42867d73-46fd-5bed-bdb1-1be2a1013039"),
        ("REVERSE_CHARGE", "86a9d6bd-f0a2-5c9c-921c-9540f1541088"),
        ("CANCEL_ORDER", "c18e1924-6739-5c18-8e25-69d232356fc4"),
        ("RELEASE_RESOURCE", "e2f6fce3-1aa3-534b-852e-a8f049c4baae"),
        ("CANCEL_APPOINTMENT", "7797dd91-f810-5b47-9940-f5278cdf8fe7"),
    ];
    for (action, id) in expected {
        assert_eq!(action_id("o-1", action), id, "{action}");
    }
}

/// The stages an order can be cancelled from, as the events that bring it there.
fn history_to(x: O, stage: &str, md: Value) -> Vec<Event> {
    let mut evs = vec![x.created(T0, md)];
    let steps: [(&str, fn(&O, Millis) -> Event); 5] = [
        ("AUTHORIZED", |x, t| {
            x.authorized(
                t,
                if x.ty == "SURGERY" {
                    "SURGEON"
                } else {
                    "PHYSICIAN"
                },
            )
        }),
        ("ACTIVATED", |x, t| x.activated(t)),
        ("IN_PROGRESS", |x, t| x.started(t)),
        ("RESULTED", |x, t| x.resulted(t, false)),
        ("VERIFIED", |x, t| x.verified(t)),
    ];
    if stage == "PROPOSED" {
        return evs;
    }
    for (i, (name, step)) in steps.iter().enumerate() {
        evs.push(step(&x, T0 + (i as u64 + 1) * MIN));
        if *name == stage {
            break;
        }
    }
    evs
}

#[test]
fn compensation_sets_for_a_cancellation_at_each_stage() {
    let stages = [
        "PROPOSED",
        "AUTHORIZED",
        "ACTIVATED",
        "IN_PROGRESS",
        "RESULTED",
        "VERIFIED",
    ];
    let types = [
        "LAB_TEST",
        "IMAGING",
        "MEDICATION",
        "SURGERY",
        "PHYSIOTHERAPY",
    ];
    let metadata = [
        json!({}),
        json!({"cost": 125.5}),
        json!({"cost": 0}),
        json!({"cost": 80, "appointmentId": "ap-7"}),
        json!({"appointmentId": "ap-8"}),
    ];
    let mut checked = 0;
    for stage in stages {
        for ty in types {
            for md in &metadata {
                let x = lab("o-1").of(ty);
                let mut evs = history_to(x, stage, md.clone());
                let cancel_at = T0 + 30 * MIN;
                evs.push(x.cancelled(cancel_at));
                let o = go(1, evs);
                assert_each_once(&o);

                // The contract's rules, written out.
                let activated = !matches!(stage, "PROPOSED" | "AUTHORIZED");
                let cost = md["cost"].as_f64().unwrap_or(0.0);
                let appointment = md["appointmentId"].as_str();
                let mut want: BTreeMap<String, (Option<String>, Option<String>)> = BTreeMap::new();
                let mut add = |action: &str, amount: Option<String>, ap: Option<&str>| {
                    want.insert(action.to_string(), (amount, ap.map(str::to_string)));
                };
                add("SEND_NOTIFICATION", None, None);
                if activated && cost > 0.0 {
                    add("REVERSE_CHARGE", Some(md["cost"].to_string()), None);
                }
                if activated {
                    add("CANCEL_ORDER", None, None);
                }
                if activated && matches!(ty, "IMAGING" | "SURGERY") {
                    add("RELEASE_RESOURCE", None, None);
                }
                if let Some(ap) = appointment {
                    add("CANCEL_APPOINTMENT", None, Some(ap));
                }

                let ctx = format!("{ty} cancelled from {stage} with {md}");
                let rows = compensations(&o);
                let got: BTreeMap<String, (Option<String>, Option<String>)> = rows
                    .iter()
                    .map(|c| {
                        (
                            c.action_type.to_string(),
                            (
                                c.amount.as_deref().map(String::from),
                                c.appointment_id.as_deref().map(String::from),
                            ),
                        )
                    })
                    .collect();
                assert_eq!(got, want, "{ctx}");
                let cancel_id = x.event_id("ORDER_CANCELLED", cancel_at);
                for c in &rows {
                    assert_eq!(c.action_id, action_id("o-1", &c.action_type), "{ctx}");
                    assert_eq!(c.status, "PENDING");
                    assert_eq!(c.requested_at, cancel_at);
                    assert_eq!(c.completed_at, None);
                    assert_eq!(c.cause_event_id.as_deref(), Some(cancel_id.as_str()));
                    assert_eq!(c.reason.as_deref(), Some("patient discharged"));
                    assert_eq!(c.workflow_instance_id.as_deref(), Some("w1"));
                }

                let events = derived(&o, "ORDER_COMPENSATION_REQUESTED");
                let got: BTreeMap<String, (Option<String>, Option<String>)> = events
                    .iter()
                    .map(|e| {
                        assert_eq!(
                            e["actionId"],
                            action_id("o-1", e["actionType"].as_str().unwrap()).as_str()
                        );
                        assert_eq!(e["causeEventId"], cancel_id.as_str());
                        assert_eq!(e["reason"], "patient discharged");
                        assert_eq!(e["orderId"], "o-1");
                        let s = |v: &Value| v.as_str().map(str::to_string);
                        (
                            s(&e["actionType"]).unwrap(),
                            (s(&e["amount"]), s(&e["appointmentId"])),
                        )
                    })
                    .collect();
                assert_eq!(got, want, "{ctx}");
                assert_eq!(events.len(), want.len(), "{ctx}");

                let row = order(&o, "o-1");
                assert_eq!(row.order_status, "CANCELLED");
                assert_eq!(row.cancelled_at, Some(cancel_at));
                assert_eq!(row.cancel_reason.as_deref(), Some("patient discharged"));
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 6 * 5 * 5);
}

#[test]
fn a_closed_or_cancelled_order_cannot_be_cancelled() {
    let o1 = lab("o-1");
    let mut evs = history_to(o1, "VERIFIED", json!({"cost": 10}));
    evs.push(o1.closed(T0 + 10 * MIN));
    evs.push(o1.cancelled(T0 + 11 * MIN));
    let o = go(1, evs);
    assert!(compensations(&o).is_empty());
    assert_eq!(order(&o, "o-1").order_status, "CLOSED");
    assert_eq!(derived(&o, "ORDER_TRANSITION_REJECTED").len(), 1);

    let o = go(
        1,
        vec![
            o1.created(T0, json!({})),
            o1.cancelled(T0 + MIN),
            o1.cancelled(T0 + 2 * MIN),
        ],
    );
    assert_eq!(
        compensations(&o).len(),
        1,
        "the second cancellation is rejected"
    );
    assert_eq!(derived(&o, "ORDER_COMPENSATION_REQUESTED").len(), 1);
    assert_eq!(dead_letters(&o).len(), 1);
}

#[test]
fn compensation_completed_marks_its_action_completed() {
    let x = lab("o-1").of("IMAGING");
    let mut evs = history_to(x, "ACTIVATED", json!({"cost": 300}));
    evs.push(x.cancelled(T0 + 10 * MIN));
    evs.push(x.compensated(T0 + 20 * MIN, "REVERSE_CHARGE"));
    evs.push(x.compensated(T0 + 21 * MIN, "RELEASE_RESOURCE"));
    let o = go(1, evs);
    assert_each_once(&o);
    let status: BTreeMap<String, (String, Option<Millis>)> = compensations(&o)
        .into_iter()
        .map(|c| (c.action_type.into(), (c.status.into(), c.completed_at)))
        .collect();
    let p = |s: &str| (s.to_string(), None);
    assert_eq!(
        status,
        BTreeMap::from([
            ("SEND_NOTIFICATION".into(), p("PENDING")),
            (
                "REVERSE_CHARGE".into(),
                ("COMPLETED".into(), Some(T0 + 20 * MIN))
            ),
            ("CANCEL_ORDER".into(), p("PENDING")),
            (
                "RELEASE_RESOURCE".into(),
                ("COMPLETED".into(), Some(T0 + 21 * MIN))
            ),
        ])
    );
    // A compensation record changes no status and is an accepted transition.
    assert_eq!(order(&o, "o-1").order_status, "CANCELLED");
    let last = transitions(&o).pop().unwrap();
    assert!(last.accepted);
    assert_eq!(last.event_type, "ORDER_COMPENSATION_COMPLETED");
    assert_eq!(
        (
            last.from_status.map(|s| s.as_str()),
            last.to_status.map(|s| s.as_str())
        ),
        (Some("CANCELLED"), Some("CANCELLED"))
    );
    // Completing changes a row, never re-requests.
    assert_eq!(derived(&o, "ORDER_COMPENSATION_REQUESTED").len(), 4);

    // Arriving (and even dated) before the cancellation, it still completes the action.
    let o = go(
        1,
        vec![
            x.created(T0, json!({})),
            x.compensated(T0 + MIN, "SEND_NOTIFICATION"),
            x.cancelled(T0 + 2 * MIN),
        ],
    );
    let c = compensations(&o);
    assert_eq!(
        (c.len(), c[0].status.as_str(), c[0].completed_at),
        (1, "COMPLETED", Some(T0 + MIN))
    );
}

// ---------------------------------------------------------------------------------------------
// Duplicates, arrival order, workers

/// A scenario touching every rule: several orders, a rejection, an unauthorized actor, a
/// critical result, cancellations with compensation and a completion, an overdue result.
fn scenario() -> Vec<Event> {
    let a = lab("o-a");
    let b = lab("o-b").of("IMAGING");
    let c = O {
        oid: "o-c",
        wid: Some("w2"),
        ty: "SURGERY",
    };
    let d = lab("o-d");
    let mut evs = a.up_to_activated(json!({"cost": 20, "department": "ER"}));
    evs.push(a.started(T0 + 3 * MIN));
    evs.push(a.resulted(T0 + 4 * MIN, true));
    evs.push(a.closed(T0 + 5 * MIN)); // rejected: not verified
    evs.extend(history_to(
        b,
        "IN_PROGRESS",
        json!({"cost": 99.9, "appointmentId": "ap-1"}),
    ));
    evs.push(b.cancelled(T0 + 6 * MIN));
    evs.push(b.compensated(T0 + 7 * MIN, "CANCEL_APPOINTMENT"));
    evs.push(c.created(T0 + MIN, json!({"cost": 5000})));
    evs.push(c.authorized(T0 + 2 * MIN, "PHYSICIAN")); // rejected: surgeons only
    evs.push(c.authorized(T0 + 3 * MIN, "SURGEON"));
    evs.extend(d.up_to_activated(json!({})));
    evs.push(d.resulted(T0 + 90 * MIN, false)); // overdue: due at T0 + 62 min
    evs
}

/// Rows as a comparable picture; alert rows without their raise time (the clock when they
/// were first seen, which depends on arrival).
fn picture(o: &Outcome) -> Vec<Row> {
    o.rows
        .values()
        .filter(|r| {
            matches!(
                r,
                Row::Order(_) | Row::OrderTransition(_) | Row::Compensation(_) | Row::Alert(_)
            )
        })
        .cloned()
        .map(|r| match r {
            Row::Alert(mut a) => {
                a.raised_at = 0;
                Row::Alert(a)
            }
            r => r,
        })
        .collect()
}

#[test]
fn the_scenario_produces_every_order_event() {
    let o = go(1, scenario());
    assert_each_once(&o);
    let count = |ty: &str| derived(&o, ty).len();
    assert_eq!(count("ORDER_ACTIVATION_REQUESTED"), 3, "o-a, o-b, o-d");
    assert_eq!(count("ORDER_TRANSITION_REJECTED"), 2);
    assert_eq!(count("ORDER_CRITICAL_RESULT"), 1);
    assert_eq!(
        count("ORDER_COMPENSATION_REQUESTED"),
        5,
        "o-b: all five actions"
    );
    assert_eq!(count("ORDER_OVERDUE"), 1);
    assert_eq!(dead_letters(&o).len(), 2);
    assert_eq!(alert_rows(&o).len(), 1);
    let flags: BTreeMap<String, bool> = orders(&o)
        .into_iter()
        .map(|(k, r)| (k, r.is_overdue))
        .collect();
    assert_eq!(
        flags,
        BTreeMap::from([
            ("o-a".into(), false),
            ("o-b".into(), false),
            ("o-c".into(), false),
            ("o-d".into(), true)
        ])
    );
}

#[test]
fn duplicates_change_nothing() {
    let evs = scenario();
    let once = go(1, evs.clone());
    // Every event twice: the same eventId and time, a later offset (a re-sent record).
    let mut twice = evs;
    twice.extend(scenario());
    let o = go(1, twice);
    assert_each_once(&o);
    assert_eq!(picture(&o), picture(&once));
    let ids = |o: &Outcome| {
        all_records(o)
            .iter()
            .map(|r| (r.topic, r.event_id.clone(), r.payload.clone()))
            .collect::<BTreeSet<_>>()
    };
    assert_eq!(ids(&o), ids(&once));
    // One dead letter per rejected record (the first copy; the duplicate is no new record).
    assert_eq!(dead_letters(&o).len(), dead_letters(&once).len());
}

#[test]
fn arrival_order_and_batching_do_not_change_the_rows() {
    let scenario = scenario();
    let reference = go(1, scenario.clone());
    let last_time = scenario
        .iter()
        .map(|e| e.event_time().unwrap())
        .max()
        .unwrap();
    for seed in 0..12u64 {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let mut evs = scenario.clone();
        evs.shuffle(&mut rng);
        // Arrival times: non-decreasing, unrelated to eventTime, some batched at one instant.
        let mut t = T0;
        let feed: Vec<(Millis, Event)> = evs
            .into_iter()
            .map(|e| {
                if rng.random_bool(0.6) {
                    t += rng.random_range(1..10 * MIN);
                }
                (t, e)
            })
            .collect();
        let end = t.max(last_time) + 1;
        let workers = if seed % 2 == 0 { 1 } else { 3 };
        let o = run_with(workers, feed, end, RulesConfig::default());
        assert_eq!(
            picture(&o),
            picture(&reference),
            "seed {seed}, {workers} workers"
        );
        let mut seen = BTreeSet::new();
        for r in all_records(&o) {
            if r.event_type != "ORDER_TRANSITION_REJECTED" && r.topic != OutTopic::DeadLetter {
                // Rejections are published on arrival, from the history known then; a late
                // event can revoke or re-word them but not unsend them. Everything else is
                // published once.
                assert!(
                    seen.insert(r.event_id.clone()),
                    "seed {seed}: twice: {}",
                    r.payload
                );
            }
        }
    }
}

#[test]
fn one_and_three_workers_agree() {
    let scenario = scenario();
    let one = go(1, scenario.clone());
    let three = go(3, scenario);
    assert_each_once(&three);
    assert_eq!(picture(&three), picture(&one));
    let recs = |o: &Outcome| all_records(o).into_iter().cloned().collect::<Vec<_>>();
    assert_eq!(
        recs(&three),
        recs(&one),
        "the same records in the same order"
    );
    let dead = |o: &Outcome| {
        dead_letters(o)
            .into_iter()
            .cloned()
            .collect::<BTreeSet<_>>()
    };
    assert_eq!(dead(&three), dead(&one));
}

// ---------------------------------------------------------------------------------------------
// Fulfillment deadline (ORDER_OVERDUE)

/// LAB_TEST activated at T0 + 2 min: due at T0 + 62 min.
const DUE: Millis = T0 + 62 * MIN;

fn feed_of(evs: Vec<Event>) -> Vec<(Millis, Event)> {
    let mut feed: Vec<_> = evs
        .into_iter()
        .map(|e| (e.event_time().unwrap(), e))
        .collect();
    feed.sort_by_key(|(t, _)| *t);
    feed
}

#[test]
fn a_result_at_the_deadline_is_in_time_one_millisecond_later_is_overdue() {
    let o1 = lab("o-1");
    for (at, overdue) in [(DUE - 1, false), (DUE, false), (DUE + 1, true)] {
        let mut evs = o1.up_to_activated(json!({}));
        evs.push(o1.resulted(at, false));
        for workers in [1, 3] {
            let o = run_with(
                workers,
                feed_of(evs.clone()),
                DUE + 10 * MIN,
                RulesConfig::default(),
            );
            assert_each_once(&o);
            assert_eq!(
                order(&o, "o-1").is_overdue,
                overdue,
                "resulted at due{:+} ms",
                at as i64 - DUE as i64
            );
            let ev = derived(&o, "ORDER_OVERDUE");
            assert_eq!(ev.len(), usize::from(overdue));
            if overdue {
                assert_eq!(ev[0]["eventId"], v5("hmis-flow:ORDER_OVERDUE:o-1").as_str());
                assert_eq!(ev[0]["dueAt"], iso(DUE));
                assert_eq!(ev[0]["orderId"], "o-1");
                assert_eq!(ev[0]["orderType"], "LAB_TEST");
                assert_eq!(ev[0]["workflowInstanceId"], "w1");
                assert_eq!(
                    ev[0]["causeEventId"],
                    o1.event_id("ORDER_ACTIVATED", T0 + 2 * MIN)
                );
            }
        }
    }
}

#[test]
fn an_open_order_is_overdue_when_the_clock_passes_its_deadline() {
    let o1 = lab("o-1");
    let mut evs = o1.up_to_activated(json!({}));
    evs.push(o1.started(T0 + 3 * MIN));
    // Flushed up to the deadline itself (frontier DUE + 1: times <= DUE complete): not yet.
    let o = run_with(1, feed_of(evs.clone()), DUE + 1, RulesConfig::default());
    assert!(!order(&o, "o-1").is_overdue);
    assert!(derived(&o, "ORDER_OVERDUE").is_empty());
    // The clock passes the deadline (DUE + 1 completes): overdue, stamped with that clock.
    for workers in [1, 3] {
        let o = run_with(
            workers,
            feed_of(evs.clone()),
            DUE + 2,
            RulesConfig::default(),
        );
        assert!(order(&o, "o-1").is_overdue);
        let ev = derived(&o, "ORDER_OVERDUE");
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0]["eventTime"], iso(DUE + 1));
        assert_eq!(ev[0]["minutesOverdue"], 0);
    }
    // A late result afterwards keeps the flag and emits nothing again.
    let mut late = evs.clone();
    late.push(o1.resulted(DUE + 30 * MIN, false));
    let o = run_with(1, feed_of(late), DUE + 40 * MIN, RulesConfig::default());
    assert_each_once(&o);
    assert!(order(&o, "o-1").is_overdue);
    assert_eq!(derived(&o, "ORDER_OVERDUE").len(), 1);
    assert_eq!(order(&o, "o-1").order_status, "RESULTED");
}

#[test]
fn wall_clock_overdue_stays_on_the_row_when_an_on_time_result_arrives_after_it_fired() {
    // As `clock = wall`: records stamped at arrival. The clock passes the deadline with the
    // order open: ORDER_OVERDUE is published. 10 minutes later a result dated 5 minutes
    // *before* the deadline arrives: by its events the order was in time, but ORDER_OVERDUE
    // was published and stands, and the row follows the events (decisions.md).
    let o1 = lab("o-1");
    let mut feed = feed_of(o1.up_to_activated(json!({})));
    feed.push((DUE + 10 * MIN, o1.resulted(DUE - 5 * MIN, false)));
    for workers in [1, 3] {
        let mut r = Run::new(workers, feed.clone(), DUE + 30 * MIN);
        r.settle_each_time = true;
        r.config.lifecycle.grace_from_event_time = false;
        let o = run(r);
        assert_each_once(&o);
        assert_eq!(derived(&o, "ORDER_OVERDUE").len(), 1, "{workers} workers");
        let row = order(&o, "o-1");
        assert_eq!(row.order_status, "RESULTED");
        assert!(
            row.is_overdue,
            "{workers} workers: the row contradicts the published ORDER_OVERDUE: {row:?}"
        );
    }
}

/// The restart gap of decisions.md ("Rows follow published events"; `[K9]` in
/// tests/reference.rs): ORDER_OVERDUE fires by the clock, then a result dated before the
/// deadline arrives (wall mode), then the pipeline restarts. At the resumed frontier the
/// order is not overdue by its events, so the restarted pipeline does not know the event was
/// published; when the row is rewritten after the restart (the order is verified), it loses
/// `is_overdue`. Ignored: it fails until the published keys survive a restart.
#[test]
#[ignore = "known gap: a timer fact whose cause was gone before a restart is not seeded"]
fn restart_keeps_is_overdue_when_the_cause_was_gone_before_it() {
    let o1 = lab("o-1");
    let mut before = feed_of(o1.up_to_activated(json!({})));
    before.push((DUE + 10 * MIN, o1.resulted(DUE - 5 * MIN, false)));
    let mut first = Run::new(1, before.clone(), DUE + 10 * MIN + 1);
    first.config.lifecycle.grace_from_event_time = false;
    let first = run(first);
    assert_eq!(derived(&first, "ORDER_OVERDUE").len(), 1);
    assert!(order(&first, "o-1").is_overdue);
    let f = first.batches.last().unwrap().frontier;
    let mut second = Run::new(
        1,
        vec![(DUE + 20 * MIN, o1.verified(DUE + 20 * MIN))],
        DUE + 30 * MIN,
    );
    second.config.lifecycle.grace_from_event_time = false;
    second.replay = before.into_iter().map(|(_, e)| e).collect();
    second.restore_time = f - 1;
    second.suppress_before = f;
    let second = run(second);
    assert!(
        derived(&second, "ORDER_OVERDUE").is_empty(),
        "published once"
    );
    let row = order(&second, "o-1");
    assert_eq!(row.order_status, "VERIFIED");
    assert!(
        row.is_overdue,
        "the row contradicts the ORDER_OVERDUE published: {row:?}"
    );
}

#[test]
fn a_result_that_arrives_late_while_the_pipeline_was_down_is_overdue() {
    let o1 = lab("o-1");
    // The clock jumps from the activation straight to the (late) result: no flush in between.
    let mut evs = o1.up_to_activated(json!({}));
    evs.push(o1.resulted(DUE + 5 * MIN, false));
    let o = run_with(1, feed_of(evs), DUE + 5 * MIN + 1, RulesConfig::default());
    assert!(order(&o, "o-1").is_overdue);
    let ev = derived(&o, "ORDER_OVERDUE");
    assert_eq!(ev.len(), 1);

    // After a restart: the history up to the activation is replayed below the committed
    // frontier (its effects were committed before), then the late result arrives.
    let mut r = Run::new(
        1,
        vec![(DUE + 5 * MIN, o1.resulted(DUE + 5 * MIN, false))],
        DUE + 5 * MIN + 1,
    );
    r.replay = o1.up_to_activated(json!({}));
    r.restore_time = T0 + 2 * MIN;
    r.suppress_before = T0 + 2 * MIN + 1;
    let o = run(r);
    assert!(order(&o, "o-1").is_overdue);
    assert_eq!(derived(&o, "ORDER_OVERDUE").len(), 1);
    assert_eq!(
        derived(&o, "ORDER_ACTIVATION_REQUESTED").len(),
        0,
        "committed before the restart"
    );

    // The same replay with the result in time, read only after the restart (stamped at its
    // arrival): the clock passed DUE with the order open as far as the pipeline knew, so
    // ORDER_OVERDUE is published at DUE + 1 ms (it always was), and the row follows the
    // published event (issue 11; it used to say not overdue, contradicting the event).
    let mut r = Run::new(
        1,
        vec![(DUE + 5 * MIN, o1.resulted(DUE - MIN, false))],
        DUE + 5 * MIN + 1,
    );
    r.replay = o1.up_to_activated(json!({}));
    r.restore_time = T0 + 2 * MIN;
    r.suppress_before = T0 + 2 * MIN + 1;
    let o = run(r);
    let ev = derived(&o, "ORDER_OVERDUE");
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0]["eventTime"], iso(DUE + 1));
    assert!(order(&o, "o-1").is_overdue);
}

#[test]
fn a_cancellation_before_the_deadline_ends_it_one_after_it_is_overdue() {
    let o1 = lab("o-1");
    for (at, overdue) in [(DUE, false), (DUE + 1, true)] {
        let mut evs = o1.up_to_activated(json!({}));
        evs.push(o1.cancelled(at));
        let o = run_with(1, feed_of(evs), DUE + 60 * MIN, RulesConfig::default());
        assert_eq!(
            order(&o, "o-1").is_overdue,
            overdue,
            "cancelled at due{:+}",
            at as i64 - DUE as i64
        );
        assert_eq!(derived(&o, "ORDER_OVERDUE").len(), usize::from(overdue));
    }
    // Cancelled before activation: no deadline at all.
    let o = go(1, vec![o1.created(T0, json!({})), o1.cancelled(T0 + MIN)]);
    assert!(!order(&o, "o-1").is_overdue);
}

#[test]
fn limits_per_type_and_configurable() {
    // MEDICATION: 30 min; IMAGING: 120; SURGERY and others: none.
    let cases = [
        ("MEDICATION", 30, true),
        ("IMAGING", 30, false),
        ("IMAGING", 119, false),
        ("IMAGING", 121, true),
        ("SURGERY", 10_000, false),
    ];
    for (ty, minutes, overdue) in cases {
        let x = lab("o-1").of(ty);
        let role = if ty == "SURGERY" {
            "SURGEON"
        } else {
            "PHYSICIAN"
        };
        let evs = vec![
            x.created(T0, json!({})),
            x.authorized(T0 + MIN, role),
            x.activated(T0 + 2 * MIN),
        ];
        let end = T0 + 2 * MIN + minutes * MIN + 2;
        let o = run_with(1, feed_of(evs), end, RulesConfig::default());
        assert_eq!(
            order(&o, "o-1").is_overdue,
            overdue,
            "{ty} open for {minutes} min"
        );
    }
    let mut cfg = RulesConfig::default();
    cfg.orders.fulfillment_minutes.insert("LAB_TEST".into(), 5);
    cfg.orders.fulfillment_minutes.insert("SURGERY".into(), 5);
    for x in [lab("o-1"), lab("o-1").of("SURGERY")] {
        let role = if x.ty == "SURGERY" {
            "SURGEON"
        } else {
            "PHYSICIAN"
        };
        let evs = vec![
            x.created(T0, json!({})),
            x.authorized(T0 + MIN, role),
            x.activated(T0 + 2 * MIN),
        ];
        let o = run_with(1, feed_of(evs), T0 + 7 * MIN + 2, cfg.clone());
        assert!(order(&o, "o-1").is_overdue, "{}", x.ty);
        assert_eq!(derived(&o, "ORDER_OVERDUE")[0]["dueAt"], iso(T0 + 7 * MIN));
    }
}
