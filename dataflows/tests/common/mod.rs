//! Event builders for the rule tests: every event goes through the real decoder.
#![allow(dead_code)]

use hmis_dataflows::events::{decode, Event, InputTopic, Pos};
use hmis_dataflows::output::Millis;
use serde_json::{json, Value};

/// 2026-11-26T10:00:00Z in ms.
pub const T0: Millis = 1_795_687_200_000;
pub const MIN: Millis = 60_000;

pub fn iso(ms: Millis) -> String {
    hmis_dataflows::events::format_time(ms)
}

static SEQ: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

fn next_offset() -> i64 {
    SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
}

pub fn dec(topic: InputTopic, key: Option<&str>, v: Option<Value>) -> Event {
    let bytes = v.map(|v| v.to_string().into_bytes());
    decode(
        topic,
        key.map(|k| k.as_bytes()),
        bytes.as_deref(),
        Pos {
            partition: 0,
            offset: next_offset(),
        },
    )
    .unwrap_or_else(|r| panic!("test event rejected: {r:?}"))
}

/// The contract's example template (sepsis-bundle v3).
pub fn sepsis(version: i64) -> Value {
    json!({"templateId": "sepsis-bundle", "version": version, "templateName": "Sepsis Bundle",
    "tasks": [
     {"taskDefId": "triage", "name": "Triage", "required": true, "slaMinutes": 15,
      "nextTaskId": "blood-cultures", "escalateTo": "CHARGE_NURSE"},
     {"taskDefId": "blood-cultures", "name": "Draw blood cultures", "slaMinutes": 30,
      "nextTaskId": "antibiotics", "maxRetries": 2, "failureTaskId": "manual-review"},
     {"taskDefId": "antibiotics", "name": "Give antibiotics", "slaMinutes": 60,
      "blockingOrderTypes": ["LAB_TEST"]},
     {"taskDefId": "manual-review", "name": "Manual review", "required": false}
    ]})
}

pub fn def(v: Value) -> Event {
    let key = format!("{}:{}", v["templateId"].as_str().unwrap(), v["version"]);
    dec(InputTopic::Definitions, Some(&key), Some(v))
}

pub fn wf_started(wid: &str, template: &str, version: i64, at: Millis) -> Event {
    dec(
        InputTopic::Workflows,
        Some(wid),
        Some(
            json!({"eventId": format!("wf-start-{wid}"), "eventType": "WORKFLOW_STARTED", "eventTime": iso(at),
            "workflowInstanceId": wid, "patientId": "p-1", "templateId": template, "templateVersion": version,
            "status": "ACTIVE"}),
        ),
    )
}

pub fn wf_event(wid: &str, ty: &str, at: Millis) -> Event {
    dec(
        InputTopic::Workflows,
        Some(wid),
        Some(
            json!({"eventId": format!("wf-{ty}-{wid}-{at}"), "eventType": ty, "eventTime": iso(at),
            "workflowInstanceId": wid}),
        ),
    )
}

pub fn task(ty: &str, tid: &str, wid: &str, def_id: &str, attempt: u32, at: Millis) -> Event {
    dec(
        InputTopic::Tasks,
        Some(tid),
        Some(
            json!({"eventId": format!("{ty}-{tid}-{attempt}"), "eventType": ty, "eventTime": iso(at),
            "taskInstanceId": tid, "workflowInstanceId": wid, "patientId": "p-1", "taskDefId": def_id,
            "attempt": attempt}),
        ),
    )
}

pub fn order(
    ty: &str,
    status: &str,
    oid: &str,
    wid: &str,
    order_type: &str,
    at: Millis,
    md: Value,
) -> Event {
    dec(
        InputTopic::Orders,
        Some(oid),
        Some(
            json!({"eventId": format!("{ty}-{oid}-{at}"), "eventType": ty, "eventTime": iso(at),
            "orderId": oid, "workflowInstanceId": wid, "patientId": "p-1", "orderType": order_type,
            "orderStatus": status, "actor": "dr-x", "metadata": md}),
        ),
    )
}
