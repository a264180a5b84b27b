//! The order rules end to end: order events produced to a real Kafka-protocol broker, the
//! pipeline run in-process (`clock = event`, until caught up), and the PostgreSQL tables
//! (`orders`, `order_transitions`, `compensation_actions`, `alerts`, `dead_letters`) and
//! the output topics (derived events, alerts, dead letters) checked against contract §5.
//!
//! Addresses come from `HMIS_TEST_BROKERS` and `HMIS_TEST_DATABASE_URL`; the test uses its
//! own topic prefix, schema and group id.

use std::collections::BTreeMap;
use std::sync::Arc;

use hmis_dataflows::derived::v5;
use hmis_dataflows::events::format_time as iso;
use hmis_dataflows::orders::action_id;
use hmis_flow::config::{ClockMode, Config, Topics};
use hmis_flow::workload::WorkloadRecord;
use serde_json::{json, Value};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: start the services with `scripts/services.sh start` and `eval $(scripts/services.sh env)`, or run scripts/test.sh")
    })
}

/// A config with private topics, schema and group (as in `tests/e2e.rs`).
async fn private_config(tag: &str) -> Config {
    let id = format!("{tag}{}_{}", std::process::id(), rand::random::<u32>());
    let p = |name: &str| format!("{id}.{name}");
    let d = Topics::default();
    let topics = Topics {
        definitions: p(&d.definitions),
        tasks: p(&d.tasks),
        orders: p(&d.orders),
        workflows: p(&d.workflows),
        system: p(&d.system),
        derived: p(&d.derived),
        alerts: p(&d.alerts),
        dead_letter: p(&d.dead_letter),
        analytics: p(&d.analytics),
    };
    let base = env("HMIS_TEST_DATABASE_URL");
    let (client, conn) = tokio_postgres::connect(&base, tokio_postgres::NoTls)
        .await
        .expect("connect to test PostgreSQL");
    tokio::spawn(conn);
    client
        .batch_execute(&format!("CREATE SCHEMA \"{id}\""))
        .await
        .unwrap();
    let sep = if base.contains('?') { '&' } else { '?' };
    let mut cfg = Config {
        brokers: env("HMIS_TEST_BROKERS"),
        database_url: format!("{base}{sep}options=-c%20search_path%3D{id}"),
        group_id: id.clone(),
        clock: ClockMode::Event,
        until_caught_up: true,
        workers: 2,
        topics,
        ..Config::default()
    };
    cfg.tick_ms = 20;
    hmis_flow::demo::create_topics(&cfg)
        .await
        .expect("create topics");
    cfg
}

fn run_pipeline(cfg: &Config) -> hmis_flow::RunSummary {
    let cfg = cfg.clone();
    std::thread::spawn(move || hmis_flow::run(cfg, Arc::new(hmis_flow::Shared::default())))
        .join()
        .expect("pipeline thread")
        .expect("pipeline run")
}

/// 2026-11-26T10:00:00Z.
const T0: u64 = 1_795_687_200_000;
const MIN: u64 = 60_000;

/// Builds the order events of one order.
struct Order {
    oid: &'static str,
    wid: Option<&'static str>,
    ty: &'static str,
}

impl Order {
    fn event_id(&self, kind: &str, at: u64) -> String {
        format!("{kind}-{}-{at}", self.oid)
    }

    fn record(&self, kind: &str, status: &str, at: u64, md: Value) -> WorkloadRecord {
        let mut doc = json!({"eventId": self.event_id(kind, at), "eventType": kind,
            "eventTime": iso(at), "orderId": self.oid, "patientId": "p-1", "orderType": self.ty,
            "orderStatus": status, "actor": "dr-x", "metadata": md});
        if let Some(w) = self.wid {
            doc["workflowInstanceId"] = w.into();
        }
        WorkloadRecord {
            topic: "workflow-order-events",
            key: Some(self.oid.to_string()),
            payload: doc.to_string().into_bytes(),
        }
    }
}

/// The scenario: every order rule once.
fn scenario() -> Vec<WorkloadRecord> {
    let a = Order {
        oid: "o-a",
        wid: Some("w-1"),
        ty: "LAB_TEST",
    };
    let b = Order {
        oid: "o-b",
        wid: Some("w-1"),
        ty: "IMAGING",
    };
    let c = Order {
        oid: "o-c",
        wid: Some("w-2"),
        ty: "LAB_TEST",
    };
    let d = Order {
        oid: "o-d",
        wid: Some("w-2"),
        ty: "LAB_TEST",
    };
    let e = Order {
        oid: "o-e",
        wid: Some("w-3"),
        ty: "LAB_TEST",
    };
    let f = Order {
        oid: "o-f",
        wid: None,
        ty: "MEDICATION",
    };
    let auth = |o: &Order, at: u64, role: &str| {
        o.record(
            "ORDER_AUTHORIZED",
            "AUTHORIZED",
            at,
            json!({"actorRole": role}),
        )
    };
    vec![
        // A: a critical result.
        a.record(
            "ORDER_CREATED",
            "PROPOSED",
            T0,
            json!({"department": "ER", "cost": 12}),
        ),
        auth(&a, T0 + MIN, "PHYSICIAN"),
        a.record("ORDER_ACTIVATED", "ACTIVATED", T0 + 2 * MIN, json!({})),
        a.record(
            "ORDER_RESULTED",
            "RESULTED",
            T0 + 10 * MIN,
            json!({"critical": true}),
        ),
        // B: cancelled after activation: all five compensation actions, one completed.
        b.record(
            "ORDER_CREATED",
            "PROPOSED",
            T0,
            json!({"cost": 250.5, "appointmentId": "ap-1"}),
        ),
        auth(&b, T0 + MIN, "NURSE_PRACTITIONER"),
        b.record("ORDER_ACTIVATED", "ACTIVATED", T0 + 2 * MIN, json!({})),
        b.record(
            "ORDER_CANCELLED",
            "CANCELLED",
            T0 + 3 * MIN,
            json!({"reason": "duplicate order"}),
        ),
        b.record(
            "ORDER_COMPENSATION_COMPLETED",
            "CANCELLED",
            T0 + 4 * MIN,
            json!({"actionId": action_id("o-b", "REVERSE_CHARGE")}),
        ),
        // C: an invalid transition and an ineligible authorization.
        c.record("ORDER_CREATED", "PROPOSED", T0, json!({})),
        c.record("ORDER_ACTIVATED", "ACTIVATED", T0 + MIN, json!({})),
        auth(&c, T0 + 2 * MIN, "NURSE"),
        // D: resulted after its 60-minute limit.
        d.record("ORDER_CREATED", "PROPOSED", T0, json!({})),
        auth(&d, T0 + MIN, "PHYSICIAN"),
        d.record("ORDER_ACTIVATED", "ACTIVATED", T0 + 2 * MIN, json!({})),
        d.record("ORDER_RESULTED", "COMPLETED", T0 + 90 * MIN, json!({})),
        // E: still open when the clock passes its deadline (T0 + 65 min).
        e.record("ORDER_CREATED", "PROPOSED", T0, json!({})),
        auth(&e, T0 + 4 * MIN, "PHYSICIAN"),
        e.record("ORDER_ACTIVATED", "ACTIVATED", T0 + 5 * MIN, json!({})),
        e.record("ORDER_STARTED", "IN_PROGRESS", T0 + 6 * MIN, json!({})),
        // F: no workflow; medication waits for manual activation; cancelled.
        f.record("ORDER_CREATED", "PROPOSED", T0, json!({})),
        auth(&f, T0 + MIN, "PHYSICIAN"),
        f.record("ORDER_CANCELLED", "CANCELLED", T0 + 2 * MIN, json!({})),
    ]
}

/// Published (key, document) pairs of a topic.
fn documents(cfg: &Config, topic: &str) -> Vec<(Option<String>, Value)> {
    hmis_flow::demo::read_topic(cfg, topic)
        .unwrap()
        .into_iter()
        .map(|(k, p)| (k, serde_json::from_str(&p).unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_rules_reach_postgres_and_kafka_once() {
    let cfg = private_config("e2e_orders").await;
    let records = scenario();
    hmis_flow::demo::produce(&cfg, &records).await.unwrap();
    let summary = run_pipeline(&cfg);
    assert_eq!(summary.records_read as usize, records.len());

    let (c, conn) = tokio_postgres::connect(&cfg.database_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);

    // orders: the current state of each.
    let orders: BTreeMap<String, (String, bool, bool, Option<String>)> = c
        .query(
            "SELECT order_id, order_status, critical, is_overdue, cost::text FROM orders",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3), r.get(4))))
        .collect();
    let o = |s: &str, critical, overdue, cost: Option<&str>| {
        (s.to_string(), critical, overdue, cost.map(str::to_string))
    };
    assert_eq!(
        orders,
        BTreeMap::from([
            ("o-a".into(), o("RESULTED", true, false, Some("12"))),
            ("o-b".into(), o("CANCELLED", false, false, Some("250.5"))),
            ("o-c".into(), o("PROPOSED", false, false, None)),
            ("o-d".into(), o("COMPLETED", false, true, None)),
            ("o-e".into(), o("IN_PROGRESS", false, true, None)),
            ("o-f".into(), o("CANCELLED", false, false, None)),
        ])
    );
    let a = c
        .query_one(
            "SELECT created_at, activated_at, resulted_at, department FROM orders
             WHERE order_id = 'o-a'",
            &[],
        )
        .await
        .unwrap();
    let at = |ms: u64| chrono::DateTime::from_timestamp_millis(ms as i64).unwrap();
    assert_eq!(a.get::<_, chrono::DateTime<chrono::Utc>>(0), at(T0));
    assert_eq!(
        a.get::<_, chrono::DateTime<chrono::Utc>>(1),
        at(T0 + 2 * MIN)
    );
    assert_eq!(
        a.get::<_, chrono::DateTime<chrono::Utc>>(2),
        at(T0 + 10 * MIN)
    );
    assert_eq!(a.get::<_, String>(3), "ER");

    // order_transitions: one per event, the two rejected ones with their reasons.
    let n: i64 = c
        .query_one("SELECT count(*) FROM order_transitions", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n as usize, records.len());
    let rejected: Vec<(String, String, Option<String>)> = c
        .query(
            "SELECT event_type, reject_reason, from_status FROM order_transitions
             WHERE NOT accepted ORDER BY event_time",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        rejected,
        [
            (
                "ORDER_ACTIVATED".into(),
                "INVALID_TRANSITION".into(),
                Some("PROPOSED".into())
            ),
            (
                "ORDER_AUTHORIZED".into(),
                "UNAUTHORIZED_ACTOR".into(),
                Some("PROPOSED".into())
            ),
        ]
    );

    // compensation_actions: the contract's set and ids.
    let actions: BTreeMap<String, (String, String, Option<String>, Option<String>)> = c
        .query(
            "SELECT action_id, order_id, status, amount::text, appointment_id
             FROM compensation_actions",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3), r.get(4))))
        .collect();
    let act = |oid: &str, status: &str, amount: Option<&str>, ap: Option<&str>| {
        (
            oid.to_string(),
            status.to_string(),
            amount.map(str::to_string),
            ap.map(str::to_string),
        )
    };
    assert_eq!(
        actions,
        BTreeMap::from([
            (
                action_id("o-b", "SEND_NOTIFICATION"),
                act("o-b", "PENDING", None, None)
            ),
            (
                action_id("o-b", "REVERSE_CHARGE"),
                act("o-b", "COMPLETED", Some("250.5"), None)
            ),
            (
                action_id("o-b", "CANCEL_ORDER"),
                act("o-b", "PENDING", None, None)
            ),
            (
                action_id("o-b", "RELEASE_RESOURCE"),
                act("o-b", "PENDING", None, None)
            ),
            (
                action_id("o-b", "CANCEL_APPOINTMENT"),
                act("o-b", "PENDING", None, Some("ap-1"))
            ),
            (
                action_id("o-f", "SEND_NOTIFICATION"),
                act("o-f", "PENDING", None, None)
            ),
        ])
    );
    assert_eq!(
        action_id("o-b", "REVERSE_CHARGE"),
        v5("hmis-flow:compensation:o-b:REVERSE_CHARGE")
    );

    // alerts: one CRITICAL, for o-a's result.
    let alerts: Vec<(String, String, String, Option<String>)> = c
        .query("SELECT alert_id, severity, kind, order_id FROM alerts", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let result_a = format!("ORDER_RESULTED-o-a-{}", T0 + 10 * MIN);
    let alert_id = v5(&format!("hmis-flow:alert:ORDER_CRITICAL_RESULT:{result_a}"));
    assert_eq!(
        alerts,
        [(
            alert_id.clone(),
            "CRITICAL".into(),
            "ORDER_CRITICAL_RESULT".into(),
            Some("o-a".into())
        )]
    );

    // The derived topic: each ORDER_* event once, keyed by workflow (or order).
    let derived = documents(&cfg, &cfg.topics.derived);
    let mut ids: BTreeMap<String, usize> = BTreeMap::new();
    let mut types: BTreeMap<String, usize> = BTreeMap::new();
    for (key, doc) in &derived {
        *ids.entry(doc["eventId"].as_str().unwrap().to_string())
            .or_default() += 1;
        *types
            .entry(doc["eventType"].as_str().unwrap().to_string())
            .or_default() += 1;
        let expected_key = doc["workflowInstanceId"]
            .as_str()
            .or(doc["orderId"].as_str());
        assert_eq!(key.as_deref(), expected_key, "{doc}");
    }
    assert!(ids.values().all(|&n| n == 1), "each eventId once: {ids:?}");
    let order_types: BTreeMap<String, usize> = types
        .into_iter()
        .filter(|(t, _)| t.starts_with("ORDER_"))
        .collect();
    assert_eq!(
        order_types,
        BTreeMap::from([
            ("ORDER_ACTIVATION_REQUESTED".into(), 4), // a, b, d, e (not c, not the medication)
            ("ORDER_COMPENSATION_REQUESTED".into(), 6),
            ("ORDER_CRITICAL_RESULT".into(), 1),
            ("ORDER_OVERDUE".into(), 2),
            ("ORDER_TRANSITION_REJECTED".into(), 2),
        ])
    );
    let find = |ty: &str, oid: &str| -> Vec<&Value> {
        derived
            .iter()
            .map(|(_, d)| d)
            .filter(|d| d["eventType"] == ty && d["orderId"] == oid)
            .collect()
    };
    let overdue = find("ORDER_OVERDUE", "o-e");
    assert_eq!(overdue[0]["dueAt"], iso(T0 + 65 * MIN));
    assert_eq!(
        overdue[0]["eventId"],
        v5("hmis-flow:ORDER_OVERDUE:o-e").as_str()
    );
    let critical = find("ORDER_CRITICAL_RESULT", "o-a");
    assert_eq!(critical[0]["causeEventId"], result_a.as_str());
    let f = find("ORDER_COMPENSATION_REQUESTED", "o-f");
    assert_eq!(f[0]["workflowInstanceId"], Value::Null);
    assert_eq!(
        f[0]["actionId"],
        action_id("o-f", "SEND_NOTIFICATION").as_str()
    );
    let charge: Vec<_> = find("ORDER_COMPENSATION_REQUESTED", "o-b")
        .into_iter()
        .filter(|d| d["actionType"] == "REVERSE_CHARGE")
        .collect();
    assert_eq!(charge[0]["amount"], "250.5");
    assert_eq!(
        charge[0]["actionId"],
        action_id("o-b", "REVERSE_CHARGE").as_str()
    );

    // The alert topic: the same alert, keyed by its source.
    let alerts = documents(&cfg, &cfg.topics.alerts);
    assert_eq!(alerts.len(), 1);
    let (key, alert) = &alerts[0];
    assert_eq!(key.as_deref(), Some("orders"));
    assert_eq!(alert["alertId"], alert_id.as_str());
    assert_eq!(alert["severity"], "CRITICAL");
    assert_eq!(alert["causeEventId"], result_a.as_str());
    assert_eq!(alert["raisedAt"], iso(T0 + 10 * MIN));

    // The dead-letter topic: both rejected records, keyed by the input's key.
    let dead_topic = documents(&cfg, &cfg.topics.dead_letter);
    assert_eq!(dead_topic.len(), 2);
    for (key, doc) in &dead_topic {
        assert_eq!(key.as_deref(), Some("o-c"));
        assert!(
            doc["reason"].is_string() && doc["payload"].is_string(),
            "{doc}"
        );
    }

    // A second run with nothing new publishes nothing and changes nothing.
    let again = run_pipeline(&cfg);
    assert_eq!(again.published, 0);
    assert_eq!(documents(&cfg, &cfg.topics.derived).len(), derived.len());
    assert_eq!(documents(&cfg, &cfg.topics.alerts).len(), 1);

    // dead_letters: the two rejected records, byte for byte, under the configured topic
    // name. Checked last: it needs the runtime to pass that name (RulesConfig.orders.topic).
    let dead: Vec<(String, String, String, Option<String>)> = c
        .query(
            "SELECT topic, reason, payload, key FROM dead_letters ORDER BY reason",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let payload = |i: usize| String::from_utf8(records[i].payload.clone()).unwrap();
    assert_eq!(
        dead,
        [
            (
                cfg.topics.orders.clone(),
                "INVALID_TRANSITION".into(),
                payload(10),
                Some("o-c".into())
            ),
            (
                cfg.topics.orders.clone(),
                "UNAUTHORIZED_ACTOR".into(),
                payload(11),
                Some("o-c".into())
            ),
        ]
    );

    for (_, doc) in &dead_topic {
        assert_eq!(doc["topic"], cfg.topics.orders.as_str());
    }
}
