//! System events (contract §6): health changes to UNHEALTHY, metric thresholds, error reports
//! and the audit log, checked case by case and against a from-scratch fold on random inputs
//! (batched, out of order, duplicated, restarted, 1 and 2 workers).

mod common;

use std::collections::BTreeMap;

use common::*;
use hmis_dataflows::events::{Event, InputTopic};
use hmis_dataflows::harness::{run, Outcome, Run};
use hmis_dataflows::output::{Millis, OutTopic, Row};
use hmis_dataflows::RulesConfig;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

static ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A system event of `ty` for `component` at `at`, with the type's fields in `fields`.
fn sys(ty: &str, component: &str, at: Millis, fields: Value) -> Event {
    let n = ID.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let mut doc = json!({"eventId": format!("sys-{n}"), "eventType": ty, "eventTime": iso(at),
        "component": component});
    for (k, v) in fields.as_object().expect("fields").iter() {
        doc[k] = v.clone();
    }
    dec(InputTopic::System, Some(component), Some(doc))
}

fn check(component: &str, status: &str, at: Millis) -> Event {
    sys("HEALTH_CHECK", component, at, json!({"status": status}))
}

fn event_id(e: &Event) -> String {
    match e {
        Event::System(s) => s.event_id.to_string(),
        _ => unreachable!(),
    }
}

/// Runs `feed` (pipeline time, event) on `workers` workers up to `end`.
fn go(workers: usize, feed: Vec<(Millis, Event)>, end: Millis, config: RulesConfig) -> Outcome {
    let mut r = Run::new(workers, feed, end);
    r.config = config;
    run(r)
}

/// Events each stamped with its own eventTime (event clock).
fn at_event_time(events: Vec<Event>) -> Vec<(Millis, Event)> {
    let mut feed: Vec<(Millis, Event)> = events
        .into_iter()
        .map(|e| (e.event_time().expect("system events have one"), e))
        .collect();
    feed.sort_by_key(|(t, _)| *t);
    feed
}

/// The alerts published, as (kind, severity, causeEventId).
fn alerts(o: &Outcome) -> Vec<(String, String, String)> {
    o.records
        .iter()
        .filter(|r| r.topic == OutTopic::Alerts)
        .map(|r| {
            let v: Value = serde_json::from_str(&r.payload).unwrap();
            (
                v["kind"].as_str().unwrap().to_string(),
                v["severity"].as_str().unwrap().to_string(),
                v["causeEventId"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// component → (status, last_check_at, status_since).
fn health(o: &Outcome) -> BTreeMap<String, (String, Millis, Millis)> {
    o.rows
        .values()
        .filter_map(|r| match r {
            Row::ComponentHealth(h) => Some((
                h.component.clone(),
                (h.status.clone(), h.last_check_at, h.status_since),
            )),
            _ => None,
        })
        .collect()
}

#[test]
fn a_change_to_unhealthy_raises_one_high_alert_per_change() {
    let events = vec![
        check("db", "UP", T0),
        check("db", "UNHEALTHY", T0 + MIN),
        check("db", "UNHEALTHY", T0 + 2 * MIN),
        check("db", "DEGRADED", T0 + 3 * MIN),
        check("db", "UNHEALTHY", T0 + 4 * MIN),
        check("db", "UNHEALTHY", T0 + 5 * MIN),
        // No health known before: a first check that is UNHEALTHY is a change too.
        check("cache", "UNHEALTHY", T0 + MIN),
    ];
    let (first, second, cache) = (
        event_id(&events[1]),
        event_id(&events[4]),
        event_id(&events[6]),
    );
    let o = go(
        1,
        at_event_time(events),
        T0 + 10 * MIN,
        RulesConfig::default(),
    );
    let mut got = alerts(&o);
    got.sort();
    let mut want = vec![
        ("COMPONENT_UNHEALTHY".to_string(), "HIGH".to_string(), first),
        (
            "COMPONENT_UNHEALTHY".to_string(),
            "HIGH".to_string(),
            second,
        ),
        ("COMPONENT_UNHEALTHY".to_string(), "HIGH".to_string(), cache),
    ];
    want.sort();
    assert_eq!(got, want);
    let h = health(&o);
    assert_eq!(
        h["db"],
        ("UNHEALTHY".to_string(), T0 + 5 * MIN, T0 + 4 * MIN),
        "current health: the latest check; since: the check that changed it"
    );
    // The alert is stored too, with its component and cause.
    let stored: Vec<_> = o
        .rows
        .values()
        .filter_map(|r| match r {
            Row::Alert(a) => Some((a.severity.clone(), a.component.clone(), a.source.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(stored.len(), 3);
    assert!(stored
        .iter()
        .all(|(s, c, src)| s == "HIGH" && c.is_some() && Some(src) == c.as_ref()));
    // Published on system-alerts, keyed by source (the component).
    let keys: Vec<_> = o
        .records
        .iter()
        .filter(|r| r.topic == OutTopic::Alerts)
        .map(|r| r.key.clone().unwrap())
        .collect();
    assert_eq!(keys.iter().filter(|k| *k == "db").count(), 2);
}

#[test]
fn a_check_older_than_the_current_health_changes_nothing() {
    // UP at T0+5 arrives first; an UNHEALTHY dated T0+1 arrives after it (wall clock: stamped
    // at arrival). The current health stays UP and nothing is raised.
    let up = check("db", "UP", T0 + 5 * MIN);
    let late = check("db", "UNHEALTHY", T0 + MIN);
    let o = go(
        2,
        vec![(T0 + 5 * MIN, up), (T0 + 6 * MIN, late)],
        T0 + 10 * MIN,
        RulesConfig::default(),
    );
    assert!(alerts(&o).is_empty(), "{:?}", alerts(&o));
    assert_eq!(health(&o)["db"].0, "UP");
}

#[test]
fn a_metric_above_its_threshold_raises_a_medium_alert() {
    let m = |name: &str, value: Value, at| {
        sys(
            "PERFORMANCE_METRIC",
            "consumer",
            at,
            json!({"metricName": name, "value": value, "unit": "x"}),
        )
    };
    let events = vec![
        m("kafka.consumer.lag", json!(1000), T0), // at the threshold: not above
        m("kafka.consumer.lag", json!(1001), T0 + 1), // above
        m("event.processing.time.ms", json!(5000.5), T0 + 2), // above
        m("event.processing.time.ms", json!(12), T0 + 3),
        m("cpu.load", json!(1e9), T0 + 4), // no threshold configured: none
    ];
    let (lag, time) = (event_id(&events[1]), event_id(&events[2]));
    let o = go(
        1,
        at_event_time(events.clone()),
        T0 + MIN,
        RulesConfig::default(),
    );
    let mut got = alerts(&o);
    got.sort();
    let mut want = vec![
        ("METRIC_THRESHOLD_EXCEEDED".into(), "MEDIUM".into(), lag),
        ("METRIC_THRESHOLD_EXCEEDED".into(), "MEDIUM".into(), time),
    ];
    want.sort();
    assert_eq!(got, want);

    // Thresholds are configuration: cpu.load at 0.5 alerts, kafka.consumer.lag still does.
    let mut cfg = RulesConfig::default();
    cfg.system.metric_thresholds.insert(
        "cpu.load".into(),
        serde_json::Number::from_f64(0.5).unwrap(),
    );
    let o = go(1, at_event_time(events.clone()), T0 + MIN, cfg);
    assert_eq!(alerts(&o).len(), 3);
    assert!(alerts(&o)
        .iter()
        .any(|(_, _, cause)| *cause == event_id(&events[4])));
}

#[test]
fn critical_and_high_errors_alert_medium_and_low_are_only_recorded() {
    let e = |sev: &str, at| {
        sys(
            "ERROR_REPORT",
            "lab-gateway",
            at,
            json!({"severity": sev, "message": format!("{sev} trouble")}),
        )
    };
    let events = vec![
        e("CRITICAL", T0),
        e("HIGH", T0 + 1),
        e("MEDIUM", T0 + 2),
        e("LOW", T0 + 3),
    ];
    let (critical, high) = (event_id(&events[0]), event_id(&events[1]));
    let o = go(2, at_event_time(events), T0 + MIN, RulesConfig::default());
    let mut got = alerts(&o);
    got.sort();
    let mut want = vec![
        ("ERROR_REPORT".into(), "CRITICAL".into(), critical),
        ("ERROR_REPORT".into(), "HIGH".into(), high),
    ];
    want.sort();
    assert_eq!(got, want);
    let mut recorded: Vec<String> = o
        .rows
        .values()
        .filter_map(|r| match r {
            Row::ErrorReport(e) => Some(format!("{}:{}", e.severity, e.message)),
            _ => None,
        })
        .collect();
    recorded.sort();
    assert_eq!(
        recorded,
        [
            "CRITICAL:CRITICAL trouble",
            "HIGH:HIGH trouble",
            "LOW:LOW trouble",
            "MEDIUM:MEDIUM trouble"
        ],
        "every report is appended to error_reports, where the sink counts MEDIUM and LOW"
    );
}

#[test]
fn audit_events_are_appended_to_the_audit_log() {
    let a = sys(
        "AUDIT_EVENT",
        "emr",
        T0,
        json!({"actor": "dr-x", "action": "VIEW", "entityType": "PATIENT", "entityId": "p-1",
               "details": {"fields": ["allergies"]}}),
    );
    let b = sys(
        "AUDIT_EVENT",
        "emr",
        T0 + 1,
        json!({"actor": "dr-y", "action": "EXPORT", "entityType": "ORDER", "entityId": "o-9"}),
    );
    let o = go(
        1,
        at_event_time(vec![a, b]),
        T0 + MIN,
        RulesConfig::default(),
    );
    let rows: Vec<_> = o
        .rows
        .values()
        .filter_map(|r| match r {
            Row::Audit(a) => Some(a.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(rows.len(), 2);
    let view = rows.iter().find(|r| r.action == "VIEW").unwrap();
    assert_eq!(
        (
            view.actor.as_str(),
            view.entity_type.as_str(),
            view.entity_id.as_str()
        ),
        ("dr-x", "PATIENT", "p-1")
    );
    let details: Value = serde_json::from_str(view.details.as_deref().unwrap()).unwrap();
    assert_eq!(details, json!({"fields": ["allergies"]}));
    assert_eq!(view.source_topic, "system-events");
    let export = rows.iter().find(|r| r.action == "EXPORT").unwrap();
    assert_eq!(export.details, None);
    assert!(alerts(&o).is_empty());
}

#[test]
fn a_duplicate_changes_nothing() {
    let events = vec![
        check("db", "UP", T0),
        check("db", "UNHEALTHY", T0 + MIN),
        sys(
            "PERFORMANCE_METRIC",
            "db",
            T0 + 2 * MIN,
            json!({"metricName": "kafka.consumer.lag", "value": 5000, "unit": "messages"}),
        ),
        sys(
            "ERROR_REPORT",
            "db",
            T0 + 3 * MIN,
            json!({"severity": "HIGH", "message": "disk"}),
        ),
        sys(
            "AUDIT_EVENT",
            "db",
            T0 + 4 * MIN,
            json!({"actor": "a", "action": "b", "entityType": "c", "entityId": "d"}),
        ),
    ];
    let once = go(
        1,
        at_event_time(events.clone()),
        T0 + 10 * MIN,
        RulesConfig::default(),
    );
    // Every event again, later (same eventIds, new positions).
    let mut feed = at_event_time(events.clone());
    for e in &events {
        let Event::System(s) = e else { unreachable!() };
        let mut again = s.clone();
        again.pos.offset += 1_000_000;
        feed.push((T0 + 6 * MIN, Event::System(again)));
    }
    let twice = go(2, feed, T0 + 10 * MIN, RulesConfig::default());
    assert_eq!(twice.rows, once.rows);
    assert_eq!(alerts(&twice), alerts(&once));
    assert_eq!(alerts(&once).len(), 3);
}

/// A from-scratch reading of §6 for health checks: in input order (pipeline time, then
/// position), a check newer (by eventTime, then position) than the current health replaces
/// it, and a change to UNHEALTHY is an alert.
fn reference(
    feed: &[(Millis, Event)],
) -> (Vec<String>, BTreeMap<String, (String, Millis, Millis)>) {
    let mut by_time: BTreeMap<Millis, Vec<&Event>> = BTreeMap::new();
    for (t, e) in feed {
        by_time.entry(*t).or_default().push(e);
    }
    let mut current: BTreeMap<String, (String, Millis, i64, Millis)> = BTreeMap::new();
    let mut raised = Vec::new();
    for (_, mut events) in by_time {
        events.sort_by_key(|e| match e {
            Event::System(s) => s.pos,
            _ => unreachable!(),
        });
        for e in events {
            let Event::System(s) = e else { unreachable!() };
            let hmis_dataflows::events::SystemKind::HealthCheck { status } = &s.kind else {
                continue;
            };
            let status = status.as_str().to_string();
            let key = (s.event_time, s.pos.offset);
            let prev = current.get(&s.component).cloned();
            if prev
                .as_ref()
                .is_some_and(|(_, at, off, _)| (*at, *off) >= key)
            {
                continue;
            }
            if status == "UNHEALTHY" && prev.as_ref().map(|p| p.0.as_str()) != Some("UNHEALTHY") {
                raised.push(s.event_id.to_string());
            }
            let since = match &prev {
                Some(p) if p.0 == status => p.3,
                _ => s.event_time,
            };
            current.insert(
                s.component.clone(),
                (status, s.event_time, s.pos.offset, since),
            );
        }
    }
    raised.sort();
    let health = current
        .into_iter()
        .map(|(c, (st, at, _, since))| (c, (st, at, since)))
        .collect();
    (raised, health)
}

#[test]
fn health_matches_a_from_scratch_fold_on_random_inputs() {
    let statuses = ["UP", "DEGRADED", "UNHEALTHY"];
    for seed in 0..12u64 {
        let mut rng = SmallRng::seed_from_u64(seed);
        let components = ["db", "api", "lab", "pacs"];
        // Checks with eventTimes mostly in order, some late, some duplicated.
        let mut events = Vec::new();
        for i in 0..200u64 {
            let c = components[rng.random_range(0..components.len())];
            let skew = if rng.random_bool(0.15) {
                rng.random_range(0..20) * MIN
            } else {
                0
            };
            let at = T0 + i * MIN - skew.min(i * MIN);
            let e = check(c, statuses[rng.random_range(0..3)], at);
            if rng.random_bool(0.1) {
                let Event::System(s) = &e else { unreachable!() };
                let mut dup = s.clone();
                dup.pos.offset += 1_000_000;
                events.push(Event::System(dup));
            }
            events.push(e);
        }
        // Stamped at arrival (wall clock): batches of random size share a time.
        let mut feed = Vec::new();
        let mut t = T0;
        let mut i = 0;
        while i < events.len() {
            let n = rng.random_range(1..8).min(events.len() - i);
            t += rng.random_range(1..3) * MIN;
            for e in &events[i..i + n] {
                feed.push((t, e.clone()));
            }
            i += n;
        }
        let end = t + 10 * MIN;
        let (want_alerts, want_health) = reference(&feed);
        for workers in [1, 2] {
            let o = go(workers, feed.clone(), end, RulesConfig::default());
            let mut got: Vec<String> = alerts(&o).into_iter().map(|(_, _, c)| c).collect();
            got.sort();
            assert_eq!(got, want_alerts, "seed {seed}, {workers} worker(s)");
            assert_eq!(health(&o), want_health, "seed {seed}, {workers} worker(s)");
        }
        // Restarted at a random point: the history before it replayed (its effects
        // suppressed), the rest fed as before. Same rows, and no alert raised again.
        let cut = feed[rng.random_range(1..feed.len())].0;
        let mut r = Run::new(
            2,
            feed.iter().filter(|(t, _)| *t >= cut).cloned().collect(),
            end,
        );
        r.replay = feed
            .iter()
            .filter(|(t, _)| *t < cut)
            .map(|(_, e)| e.clone())
            .collect();
        r.suppress_before = cut;
        r.replay_chunk = 1 + rng.random_range(0..8);
        let whole = go(2, feed.clone(), end, RulesConfig::default());
        let restarted = run(r);
        // The uninterrupted run's alerts raised at or after the cut.
        let raised_after_cut: Vec<_> = whole
            .records
            .iter()
            .filter(|r| r.topic == OutTopic::Alerts)
            .filter_map(|r| {
                let v: Value = serde_json::from_str(&r.payload).unwrap();
                let at = hmis_dataflows::events::parse_time(v["raisedAt"].as_str()?).ok()?;
                (at >= cut).then(|| v["causeEventId"].as_str().unwrap().to_string())
            })
            .collect();
        let mut got: Vec<String> = alerts(&restarted).into_iter().map(|(_, _, c)| c).collect();
        got.sort();
        let mut want = raised_after_cut;
        want.sort();
        assert_eq!(got, want, "seed {seed}: restarted at {cut}");
        let whole_health = health(&whole);
        for (c, h) in health(&restarted) {
            assert_eq!(
                Some(&h),
                whole_health.get(&c),
                "seed {seed}: {c} restarted at {cut}"
            );
        }
    }
}
