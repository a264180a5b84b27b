//! The published JSON Schemas (`schemas/`, contract §7 and §10) against everything the
//! dataflow emits, without services: a generated workload (malformed records and duplicates
//! included) goes through the decoder and the in-memory dataflow (`hmis_dataflows::harness`),
//! with the clock run six hours past the last event so that every timer fires (SLA breaches,
//! escalations, re-escalations, stale tasks, overdue orders, unknown references, retirement).
//! Every derived event, alert and dead letter must match its schema and declare nothing
//! extra, and every schema must have been exercised. The end-to-end tests (`tests/e2e.rs`,
//! `tests/hostile_input.rs`, `tests/operations.rs`) check the published topics the same way.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::schemas::{Output, Schemas};
use hmis_dataflows::derived::DerivedType;
use hmis_dataflows::events::{decode, Event, InputTopic, Pos};
use hmis_dataflows::harness::{run, Run};
use hmis_dataflows::output::{DeadLetter, OutTopic};
use hmis_flow::workload::{generate, WorkloadConfig};

const SIX_HOURS_MS: u64 = 6 * 3_600_000;

#[test]
fn there_is_one_schema_per_derived_event_type_and_each_is_valid() {
    let schemas = Schemas::load();
    let want: BTreeSet<&str> = DerivedType::ALL.iter().map(|t| t.as_str()).collect();
    let have: BTreeSet<&str> = schemas.derived.keys().map(String::as_str).collect();
    assert_eq!(
        have, want,
        "schemas/derived/<TYPE>.schema.json per DerivedType"
    );
    for s in schemas.derived.values().chain([
        &schemas.alert,
        &schemas.dead_letter,
        &schemas.analytics_window,
    ]) {
        assert_eq!(s.doc["x-schemaVersion"], 1, "{}", s.file.display());
        assert!(s.doc["$id"].is_string(), "{}", s.file.display());
    }
    // The README links every schema.
    let readme = std::fs::read_to_string(Schemas::dir().join("README.md")).unwrap();
    for t in &want {
        assert!(readme.contains(&format!("derived/{t}.schema.json")), "{t}");
    }
}

#[test]
fn everything_the_dataflow_emits_matches_its_schema() {
    let schemas = Schemas::load();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut add = |s: BTreeMap<String, usize>| {
        for (k, n) in s {
            *seen.entry(k).or_insert(0) += n;
        }
    };
    for seed in [3u64, 17] {
        let records = generate(&WorkloadConfig {
            seed,
            workflows: 60,
            start_ms: 1_795_687_200_000,
            bad_record_ratio: 0.03,
            duplicate_ratio: 0.02,
        });
        // What the workload does not make: an order transition from no state, an order of no
        // workflow (its events say "workflowInstanceId": null), a task of a workflow that
        // never starts, a workflow of a template that does not exist.
        let at = "2026-11-26T11:00:00.000Z";
        let mut records = records;
        for (topic, key, json) in [
            (
                "workflow-order-events",
                "o-orphan",
                format!(
                    r#"{{"eventId":"x-1","eventType":"ORDER_VERIFIED","eventTime":"{at}","orderId":"o-orphan","patientId":"p-x","orderType":"LAB_TEST","orderStatus":"VERIFIED"}}"#
                ),
            ),
            (
                "workflow-order-events",
                "o-alone",
                format!(
                    r#"{{"eventId":"x-2","eventType":"ORDER_CREATED","eventTime":"{at}","orderId":"o-alone","patientId":"p-y","orderType":"IMAGING","orderStatus":"PROPOSED","actor":"dr-a"}}"#
                ),
            ),
            (
                "workflow-order-events",
                "o-alone",
                format!(
                    r#"{{"eventId":"x-3","eventType":"ORDER_CANCELLED","eventTime":"{at}","orderId":"o-alone","patientId":"p-y","orderType":"IMAGING","orderStatus":"CANCELLED","actor":"dr-a","metadata":{{"reason":"duplicate order","appointmentId":"ap-1"}}}}"#
                ),
            ),
            (
                "workflow-task-events",
                "t-ghost",
                format!(
                    r#"{{"eventId":"x-4","eventType":"TASK_CREATED","eventTime":"{at}","taskInstanceId":"t-ghost","workflowInstanceId":"w-ghost","patientId":"p-z","taskDefId":"triage","status":"PENDING"}}"#
                ),
            ),
            (
                "workflow-state-events",
                "w-nobody",
                format!(
                    r#"{{"eventId":"x-5","eventType":"WORKFLOW_STARTED","eventTime":"{at}","workflowInstanceId":"w-nobody","patientId":"p-w","templateId":"no-such-template","templateVersion":1,"status":"ACTIVE"}}"#
                ),
            ),
        ] {
            records.push(hmis_flow::workload::WorkloadRecord {
                topic,
                key: Some(key.to_string()),
                payload: json.into_bytes(),
            });
        }
        let mut events: Vec<Event> = Vec::new();
        let mut rejected = Vec::new();
        for (i, r) in records.iter().enumerate() {
            let role = InputTopic::ALL
                .into_iter()
                .find(|t| t.default_name() == r.topic)
                .unwrap();
            let pos = Pos {
                partition: 0,
                offset: i as i64,
            };
            let key = r.key.as_deref().map(str::as_bytes);
            match decode(role, key, Some(&r.payload), pos) {
                Ok(e) => events.push(e),
                // As the source does with a record that does not decode.
                Err(rej) => rejected.push(
                    DeadLetter::of_bytes(
                        r.topic,
                        pos,
                        key,
                        Some(&r.payload),
                        rej.reason,
                        rej.detail,
                        1_795_687_200_000,
                    )
                    .to_record(),
                ),
            }
        }
        // A record without a value and one with a binary key: the dead letter's encodings.
        let bin_key = [0xffu8, 0x00, 0xfe];
        for (key, value) in [
            (Some(&b"k-null"[..]), None),
            (Some(&bin_key[..]), Some(&b"{x"[..])),
        ] {
            let pos = Pos {
                partition: 1,
                offset: 0,
            };
            let rej = decode(InputTopic::Tasks, key, value, pos).unwrap_err();
            rejected.push(
                DeadLetter::of_bytes(
                    "workflow-task-events",
                    pos,
                    key,
                    value,
                    rej.reason,
                    rej.detail,
                    1,
                )
                .to_record(),
            );
        }
        add(schemas.assert_valid(
            rejected
                .iter()
                .map(|r| (Output::DeadLetter, r.payload.as_str())),
        ));

        // Stamped like the event clock; definitions at the start.
        let mut feed: Vec<(u64, Event)> = events
            .into_iter()
            .map(|e| (e.event_time().unwrap_or(1).max(1), e))
            .collect();
        feed.sort_by_key(|x| x.0);
        let end = feed.last().unwrap().0 + SIX_HOURS_MS;
        let outcome = run(Run::new(2, feed, end));
        assert!(
            outcome.records.iter().any(|r| r.topic == OutTopic::Derived
                && r.payload.contains(r#""workflowInstanceId":null"#)),
            "an order event without a workflow"
        );
        add(schemas.assert_valid(outcome.records.iter().map(|r| {
            let output = match r.topic {
                OutTopic::Derived => Output::Derived,
                OutTopic::Alerts => Output::Alert,
                OutTopic::DeadLetter => Output::DeadLetter,
            };
            (output, r.payload.as_str())
        })));
    }

    // Every schema was exercised: each derived type, each alert kind, the dead-letter
    // reasons the workload produces.
    let mut missing: Vec<String> = DerivedType::ALL
        .iter()
        .map(|t| t.as_str().to_string())
        .chain(
            [
                "COMPONENT_UNHEALTHY",
                "METRIC_THRESHOLD_EXCEEDED",
                "ERROR_REPORT",
                "ORDER_CRITICAL_RESULT",
            ]
            .map(|k| format!("alert:{k}")),
        )
        .chain(
            [
                "INVALID_JSON",
                "SCHEMA_VIOLATION",
                "UNKNOWN_EVENT_TYPE",
                "INVALID_DEFINITION",
                "INVALID_TRANSITION",
                "UNAUTHORIZED_ACTOR",
                "UNKNOWN_WORKFLOW",
                "UNKNOWN_TEMPLATE",
            ]
            .map(|r| format!("dead-letter:{r}")),
        )
        .filter(|k| !seen.contains_key(k))
        .collect();
    missing.sort();
    assert!(
        missing.is_empty(),
        "never emitted: {missing:?}\nseen: {seen:?}"
    );
}

/// The analytics window schema describes what contract §10 will publish (not produced yet):
/// a document of that shape validates, and a wrong one does not.
#[test]
fn the_analytics_window_schema_takes_the_contract_shape() {
    let schemas = Schemas::load();
    let ok = r#"{"eventId":"8c3e0d43-77b6-5f0e-9b5c-2f1d8a0c1e23","metric":"sla_compliance_pct",
        "dimension":"sepsis-bundle","windowStart":"2026-11-26T10:00:00.000Z",
        "windowEnd":"2026-11-26T11:00:00.000Z","value":87.5,"revision":2,
        "emittedAt":"2026-11-26T11:00:00.001Z"}"#;
    assert_eq!(
        schemas.check(Output::AnalyticsWindow, ok),
        Ok("analytics:sla_compliance_pct".to_string())
    );
    for bad in [
        ok.replace("\"revision\":2", "\"revision\":0"),
        ok.replace("sla_compliance_pct", "tasks_done"),
        ok.replace("2026-11-26T10:00:00.000Z", "yesterday"),
        ok.replace("\"value\":87.5,", ""),
    ] {
        assert!(
            schemas.check(Output::AnalyticsWindow, &bad).is_err(),
            "{bad}"
        );
    }
}
