//! `events::decode` against contract §2, §3 and §7, table-driven: every rejection reason,
//! the fields the contract names, the defaults it fixes, and tombstones.
//!
//! Each case is a topic, a key and raw bytes; the expectation is either the contract's
//! reject reason or acceptance. Documents are built by mutating one valid document per
//! topic, so a case changes exactly one thing.

use hmis_dataflows::events::{
    check_decoders_agree, decode, fuzz_record, Event, InputTopic, OrderEventKind, OrderStatus, Pos,
    TaskStatus, WorkflowEventKind,
};
use hmis_dataflows::output::RejectReason::{self, *};
use serde_json::{json, Value};

/// 2026-11-26T10:15:00.123Z in ms since the epoch.
const T_123: u64 = 1_795_687_200_000 + 15 * 60_000 + 123;

fn task_doc() -> Value {
    json!({"eventId": "e-1", "eventType": "TASK_CREATED", "eventTime": "2026-11-26T10:15:00.123Z",
           "taskInstanceId": "t-1", "workflowInstanceId": "w-1", "patientId": "p-1", "taskDefId": "triage"})
}

fn workflow_doc() -> Value {
    json!({"eventId": "e-2", "eventType": "WORKFLOW_STARTED", "eventTime": "2026-11-26T10:15:00.123Z",
           "workflowInstanceId": "w-1", "patientId": "p-1", "templateId": "sepsis-bundle", "templateVersion": 3,
           "workflowTemplateName": "Sepsis Bundle", "status": "ACTIVE"})
}

fn order_doc() -> Value {
    json!({"eventId": "e-3", "eventType": "ORDER_CREATED", "eventTime": "2026-11-26T10:15:00.123Z",
           "orderId": "o-1", "workflowInstanceId": "w-1", "patientId": "p-1", "orderType": "LAB_TEST",
           "orderStatus": "PROPOSED", "actor": "dr-x",
           "metadata": {"actorRole": "PHYSICIAN", "cost": 12.5, "department": "LAB"}})
}

/// Valid for every system event type (each reads the fields its type names).
fn system_doc() -> Value {
    json!({"eventId": "e-4", "eventType": "HEALTH_CHECK", "eventTime": "2026-11-26T10:15:00.123Z",
           "component": "db", "status": "UP", "metricName": "kafka.consumer.lag", "value": 12,
           "unit": "messages", "severity": "LOW", "message": "slow query", "actor": "admin-1",
           "action": "EXPORT", "entityType": "PATIENT", "entityId": "p-1", "details": {"rows": 3}})
}

/// The contract's example template (§3).
fn template_doc() -> Value {
    json!({"templateId": "sepsis-bundle", "version": 3, "templateName": "Sepsis Bundle",
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

const DEF_KEY: &str = "sepsis-bundle:3";

/// `doc` with `path` (slash-separated; a number indexes an array) set to `v`, or removed when `v` is None.
fn edit(mut doc: Value, path: &str, v: Option<Value>) -> Value {
    let parts: Vec<&str> = path.split('/').collect();
    let (last, init) = parts.split_last().unwrap();
    let mut cur = &mut doc;
    for p in init {
        cur = match p.parse::<usize>() {
            Ok(i) => &mut cur[i],
            Err(_) => &mut cur[*p],
        };
    }
    match v {
        Some(v) => match last.parse::<usize>() {
            Ok(i) => cur[i] = v,
            Err(_) => {
                cur.as_object_mut().unwrap().insert(last.to_string(), v);
            }
        },
        None => {
            cur.as_object_mut().unwrap().remove(*last);
        }
    }
    doc
}
fn set(doc: Value, path: &str, v: Value) -> Value {
    edit(doc, path, Some(v))
}
fn del(doc: Value, path: &str) -> Value {
    edit(doc, path, None)
}
fn bytes(v: &Value) -> Option<Vec<u8>> {
    Some(v.to_string().into_bytes())
}

fn run(
    topic: InputTopic,
    key: Option<&str>,
    value: Option<&[u8]>,
) -> Result<Event, hmis_dataflows::events::Rejection> {
    // Every case also compares the one-pass decoder with the reference one.
    check_decoders_agree(topic, key.map(str::as_bytes), value);
    decode(
        topic,
        key.map(str::as_bytes),
        value,
        Pos {
            partition: 2,
            offset: 41,
        },
    )
}

struct Case {
    name: String,
    topic: InputTopic,
    key: Option<String>,
    value: Option<Vec<u8>>,
    /// None: accepted.
    want: Option<RejectReason>,
}

fn case(
    name: &str,
    topic: InputTopic,
    key: Option<&str>,
    value: Option<Vec<u8>>,
    want: Option<RejectReason>,
) -> Case {
    Case {
        name: name.to_string(),
        topic,
        key: key.map(str::to_string),
        value,
        want,
    }
}

fn check(cases: Vec<Case>) {
    let mut failures = Vec::new();
    for c in &cases {
        let got = run(c.topic, c.key.as_deref(), c.value.as_deref());
        let got_reason = got.as_ref().err().map(|r| r.reason);
        if got_reason != c.want {
            failures.push(format!(
                "{}: expected {:?}, got {:?} (payload {:?})",
                c.name,
                c.want.map(|r| r.as_str()).unwrap_or("accepted"),
                got.as_ref().map(|_| "accepted").map_err(|r| format!(
                    "{} ({})",
                    r.reason.as_str(),
                    r.detail
                )),
                c.value.as_deref().map(String::from_utf8_lossy)
            ));
        }
        if let Err(r) = &got {
            // Dead letters carry a human-readable detail (§7).
            if r.detail.trim().is_empty() {
                failures.push(format!("{}: rejection without detail", c.name));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

const EVENT_TOPICS: [InputTopic; 4] = [
    InputTopic::Tasks,
    InputTopic::Workflows,
    InputTopic::Orders,
    InputTopic::System,
];

fn base(topic: InputTopic) -> Value {
    match topic {
        InputTopic::Tasks => task_doc(),
        InputTopic::Workflows => workflow_doc(),
        InputTopic::Orders => order_doc(),
        InputTopic::System => system_doc(),
        InputTopic::Definitions => template_doc(),
    }
}

#[test]
fn invalid_json() {
    let mut cases = Vec::new();
    let raw: [(&str, &[u8]); 9] = [
        ("truncated", b"{\"eventId\": \"e-1\""),
        ("not json", b"not json"),
        ("empty", b""),
        ("not utf-8", b"\xff\xfe{\"eventId\": \"e-1\"}"),
        (
            "utf-8 invalid inside a string",
            b"{\"eventId\": \"e-\xc3\x28\"}",
        ),
        ("array", b"[]"),
        ("number", b"3"),
        ("string", b"\"TASK_CREATED\""),
        ("json null", b"null"),
    ];
    for topic in EVENT_TOPICS {
        for (name, b) in raw {
            cases.push(case(
                &format!("{topic:?}: {name}"),
                topic,
                Some("k"),
                Some(b.to_vec()),
                Some(InvalidJson),
            ));
        }
        cases.push(case(
            &format!("{topic:?}: null value"),
            topic,
            Some("k"),
            None,
            Some(InvalidJson),
        ));
        // A valid document followed by garbage is not valid JSON either.
        let mut trailing = bytes(&base(topic)).unwrap();
        trailing.extend_from_slice(b" }");
        cases.push(case(
            &format!("{topic:?}: trailing garbage"),
            topic,
            Some("k"),
            Some(trailing),
            Some(InvalidJson),
        ));
    }
    for (name, b) in [
        ("truncated", &b"{\"templateId\": "[..]),
        ("not json", b"nope"),
        ("not utf-8", b"\xff\xfe"),
    ] {
        cases.push(case(
            &format!("definition: {name}"),
            InputTopic::Definitions,
            Some(DEF_KEY),
            Some(b.to_vec()),
            Some(InvalidJson),
        ));
    }
    check(cases);
}

/// §2: "Every input event is a UTF-8 JSON object"; the decoder documents "not a JSON object →
/// INVALID_JSON". Definitions must follow the same rule as the other topics.
#[test]
fn definition_that_is_not_a_json_object_is_invalid_json() {
    let mut cases = Vec::new();
    for (name, b) in [
        ("array", &b"[]"[..]),
        ("number", b"3"),
        ("string", b"\"sepsis-bundle\""),
        // serde accepts a sequence for a struct: this array must not decode as a template.
        (
            "array shaped like a template",
            b"[\"sepsis-bundle\", 3, \"Sepsis\", []]",
        ),
    ] {
        cases.push(case(
            &format!("definition: {name}"),
            InputTopic::Definitions,
            Some(DEF_KEY),
            Some(b.to_vec()),
            Some(InvalidJson),
        ));
    }
    check(cases);
}

#[test]
fn envelope_schema_violations() {
    let mut cases = Vec::new();
    for topic in EVENT_TOPICS {
        let d = base(topic);
        let mut add = |name: &str, v: Value| {
            cases.push(case(
                &format!("{topic:?}: {name}"),
                topic,
                Some("k"),
                bytes(&v),
                Some(SchemaViolation),
            ));
        };
        add("no eventId", del(d.clone(), "eventId"));
        add("empty eventId", set(d.clone(), "eventId", json!("")));
        add("numeric eventId", set(d.clone(), "eventId", json!(42)));
        add("null eventId", set(d.clone(), "eventId", Value::Null));
        add("no eventType", del(d.clone(), "eventType"));
        add("numeric eventType", set(d.clone(), "eventType", json!(7)));
        add("no eventTime", del(d.clone(), "eventTime"));
        add(
            "eventTime prose",
            set(d.clone(), "eventTime", json!("yesterday")),
        );
        add(
            "eventTime date only",
            set(d.clone(), "eventTime", json!("2026-11-26")),
        );
        add(
            "eventTime without offset",
            set(d.clone(), "eventTime", json!("2026-11-26T10:15:00")),
        );
        add(
            "eventTime out of range",
            set(d.clone(), "eventTime", json!("2026-13-40T10:15:00Z")),
        );
        add(
            "eventTime as epoch number",
            set(d.clone(), "eventTime", json!(1_795_687_200_000u64)),
        );
    }
    check(cases);
}

#[test]
fn field_schema_violations() {
    let mut cases = Vec::new();
    let mut add = |topic: InputTopic, name: &str, v: Value| {
        cases.push(case(
            &format!("{topic:?}: {name}"),
            topic,
            Some("k"),
            bytes(&v),
            Some(SchemaViolation),
        ));
    };
    use InputTopic::*;
    let t = task_doc();
    add(Tasks, "no taskInstanceId", del(t.clone(), "taskInstanceId"));
    add(
        Tasks,
        "empty taskInstanceId",
        set(t.clone(), "taskInstanceId", json!("")),
    );
    add(
        Tasks,
        "no workflowInstanceId",
        del(t.clone(), "workflowInstanceId"),
    );
    add(Tasks, "no taskDefId", del(t.clone(), "taskDefId"));
    add(
        Tasks,
        "numeric taskDefId",
        set(t.clone(), "taskDefId", json!(5)),
    );
    add(
        Tasks,
        "attempt as text",
        set(t.clone(), "attempt", json!("2")),
    );
    add(Tasks, "attempt 0", set(t.clone(), "attempt", json!(0)));
    add(
        Tasks,
        "negative attempt",
        set(t.clone(), "attempt", json!(-1)),
    );
    add(
        Tasks,
        "fractional attempt",
        set(t.clone(), "attempt", json!(1.5)),
    );
    add(
        Tasks,
        "status contradicting the type",
        set(t.clone(), "status", json!("COMPLETED")),
    );
    add(
        Tasks,
        "dueAt not a timestamp",
        set(t.clone(), "dueAt", json!("soon")),
    );
    add(
        Tasks,
        "numeric patientId",
        set(t.clone(), "patientId", json!(5)),
    );
    add(
        Tasks,
        "numeric errorMessage",
        set(
            set(t.clone(), "eventType", json!("TASK_FAILED")),
            "errorMessage",
            json!(5),
        ),
    );

    let w = workflow_doc();
    add(
        Workflows,
        "STARTED without templateId",
        del(w.clone(), "templateId"),
    );
    add(
        Workflows,
        "STARTED without templateVersion",
        del(w.clone(), "templateVersion"),
    );
    add(
        Workflows,
        "templateVersion as text",
        set(w.clone(), "templateVersion", json!("3")),
    );
    add(
        Workflows,
        "no workflowInstanceId",
        del(w.clone(), "workflowInstanceId"),
    );
    add(
        Workflows,
        "numeric escalationReason",
        set(
            set(w.clone(), "eventType", json!("WORKFLOW_ESCALATED")),
            "escalationReason",
            json!(5),
        ),
    );

    let o = order_doc();
    add(Orders, "no orderId", del(o.clone(), "orderId"));
    add(
        Orders,
        "numeric orderId",
        set(o.clone(), "orderId", json!(1)),
    );
    add(Orders, "no orderStatus", del(o.clone(), "orderStatus"));
    add(
        Orders,
        "orderStatus not a state",
        set(o.clone(), "orderStatus", json!("DONE")),
    );
    add(
        Orders,
        "CREATED without orderType",
        del(o.clone(), "orderType"),
    );
    add(
        Orders,
        "AUTHORIZED moving to ACTIVATED",
        set(
            set(o.clone(), "eventType", json!("ORDER_AUTHORIZED")),
            "orderStatus",
            json!("ACTIVATED"),
        ),
    );
    add(
        Orders,
        "RESULTED moving to VERIFIED",
        set(
            set(o.clone(), "eventType", json!("ORDER_RESULTED")),
            "orderStatus",
            json!("VERIFIED"),
        ),
    );
    add(
        Orders,
        "CANCELLED moving to CLOSED",
        set(
            set(o.clone(), "eventType", json!("ORDER_CANCELLED")),
            "orderStatus",
            json!("CLOSED"),
        ),
    );
    add(
        Orders,
        "COMPENSATION_COMPLETED without actionId",
        set(
            o.clone(),
            "eventType",
            json!("ORDER_COMPENSATION_COMPLETED"),
        ),
    );
    add(
        Orders,
        "critical as text",
        set(o.clone(), "metadata/critical", json!("yes")),
    );
    add(
        Orders,
        "actorRole as number",
        set(o.clone(), "metadata/actorRole", json!(3)),
    );
    add(
        Orders,
        "metadata not an object",
        set(o.clone(), "metadata", json!("PHYSICIAN")),
    );

    let s = system_doc();
    add(System, "no component", del(s.clone(), "component"));
    add(
        System,
        "numeric component",
        set(s.clone(), "component", json!(5)),
    );
    add(
        System,
        "empty component",
        set(s.clone(), "component", json!("")),
    );
    add(
        System,
        "unknown health status",
        set(s.clone(), "status", json!("DOWN")),
    );
    add(System, "no health status", del(s.clone(), "status"));
    let typed = |ty: &str| set(s.clone(), "eventType", json!(ty));
    add(
        System,
        "no metricName",
        del(typed("PERFORMANCE_METRIC"), "metricName"),
    );
    add(
        System,
        "metric value as text",
        set(typed("PERFORMANCE_METRIC"), "value", json!("12")),
    );
    add(
        System,
        "no metric value",
        del(typed("PERFORMANCE_METRIC"), "value"),
    );
    add(System, "no unit", del(typed("PERFORMANCE_METRIC"), "unit"));
    add(
        System,
        "unknown severity",
        set(typed("ERROR_REPORT"), "severity", json!("FATAL")),
    );
    add(System, "no message", del(typed("ERROR_REPORT"), "message"));
    add(System, "no actor", del(typed("AUDIT_EVENT"), "actor"));
    add(
        System,
        "numeric entityId",
        set(typed("AUDIT_EVENT"), "entityId", json!(7)),
    );
    check(cases);
}

/// §2 types `metadata` as an object on *every* input event; a field of the wrong type is a
/// SCHEMA_VIOLATION whatever the topic.
#[test]
fn metadata_of_the_wrong_type_is_a_schema_violation_on_every_topic() {
    let mut cases = Vec::new();
    for topic in EVENT_TOPICS {
        for bad in [json!(5), json!("x"), json!([1])] {
            let v = set(base(topic), "metadata", bad.clone());
            cases.push(case(
                &format!("{topic:?}: metadata {bad}"),
                topic,
                Some("k"),
                bytes(&v),
                Some(SchemaViolation),
            ));
        }
        // null is "absent" for an optional field.
        let v = set(base(topic), "metadata", Value::Null);
        cases.push(case(
            &format!("{topic:?}: metadata null"),
            topic,
            Some("k"),
            bytes(&v),
            None,
        ));
    }
    check(cases);
}

#[test]
fn unknown_event_types() {
    let mut cases = Vec::new();
    let mut add = |topic: InputTopic, ty: &str| {
        let v = set(base(topic), "eventType", json!(ty));
        cases.push(case(
            &format!("{topic:?}: {ty:?}"),
            topic,
            Some("k"),
            bytes(&v),
            Some(UnknownEventType),
        ));
    };
    use InputTopic::*;
    add(Tasks, "TASK_EXPLODED");
    add(Tasks, "task_created");
    add(Tasks, "");
    // A type of another topic is unknown on this one.
    add(Tasks, "ORDER_CREATED");
    add(Tasks, "WORKFLOW_STARTED");
    add(Tasks, "HEALTH_CHECK");
    add(Workflows, "TASK_CREATED");
    add(Workflows, "WORKFLOW_PAUSED");
    add(Orders, "WORKFLOW_STARTED");
    add(Orders, "ORDER_REFUNDED");
    add(Orders, "TASK_READY");
    add(System, "REBOOT");
    add(System, "TASK_CREATED");
    check(cases);
}

#[test]
fn definition_schema_violations() {
    let d = template_doc();
    let mut cases = Vec::new();
    let mut add = |name: &str, v: Value| {
        cases.push(case(
            &format!("definition: {name}"),
            InputTopic::Definitions,
            Some(DEF_KEY),
            bytes(&v),
            Some(SchemaViolation),
        ));
    };
    add("no templateId", del(d.clone(), "templateId"));
    add("no version", del(d.clone(), "version"));
    add("version as text", set(d.clone(), "version", json!("3")));
    add("no tasks", del(d.clone(), "tasks"));
    add(
        "tasks not an array",
        set(d.clone(), "tasks", json!({"triage": {}})),
    );
    add(
        "task without taskDefId",
        del(d.clone(), "tasks/2/taskDefId"),
    );
    add(
        "required as text",
        set(d.clone(), "tasks/0/required", json!("yes")),
    );
    add(
        "negative maxRetries",
        set(d.clone(), "tasks/1/maxRetries", json!(-1)),
    );
    add(
        "blockingOrderTypes as text",
        set(d.clone(), "tasks/2/blockingOrderTypes", json!("LAB_TEST")),
    );
    add(
        "slaMinutes as text",
        set(d.clone(), "tasks/0/slaMinutes", json!("15")),
    );
    add(
        "nextTaskId as number",
        set(d.clone(), "tasks/0/nextTaskId", json!(1)),
    );
    check(cases);
}

#[test]
fn invalid_definitions() {
    let d = template_doc();
    let mut cases = Vec::new();
    let mut add = |name: &str, key: Option<&str>, v: Option<Value>| {
        cases.push(case(
            &format!("definition: {name}"),
            InputTopic::Definitions,
            key,
            v.as_ref().and_then(bytes),
            Some(InvalidDefinition),
        ));
    };
    add(
        "dangling nextTaskId",
        Some(DEF_KEY),
        Some(set(d.clone(), "tasks/2/nextTaskId", json!("discharge"))),
    );
    add(
        "dangling failureTaskId",
        Some(DEF_KEY),
        Some(set(d.clone(), "tasks/0/failureTaskId", json!("nobody"))),
    );
    add(
        "two-node cycle",
        Some(DEF_KEY),
        Some(set(d.clone(), "tasks/1/nextTaskId", json!("triage"))),
    );
    add(
        "self loop",
        Some(DEF_KEY),
        Some(set(d.clone(), "tasks/3/nextTaskId", json!("manual-review"))),
    );
    add(
        "three-node cycle",
        Some(DEF_KEY),
        Some(set(d.clone(), "tasks/2/nextTaskId", json!("triage"))),
    );
    add(
        "cycle off the entry chain",
        Some(DEF_KEY),
        Some(set(
            set(d.clone(), "tasks/2/nextTaskId", json!("manual-review")),
            "tasks/3/nextTaskId",
            json!("antibiotics"),
        )),
    );
    add(
        "duplicate taskDefId",
        Some(DEF_KEY),
        Some(set(d.clone(), "tasks/3/taskDefId", json!("triage"))),
    );
    add(
        "key names another template",
        Some("sepsis-lite:3"),
        Some(d.clone()),
    );
    add(
        "key names another version",
        Some("sepsis-bundle:4"),
        Some(d.clone()),
    );
    add(
        "key without version",
        Some("sepsis-bundle"),
        Some(d.clone()),
    );
    add(
        "key version not a number",
        Some("sepsis-bundle:three"),
        Some(d.clone()),
    );
    add(
        "tombstone with a key without version",
        Some("sepsis-bundle"),
        None,
    );
    add("tombstone without key", None, None);
    check(cases);
}

#[test]
fn accepted_documents() {
    let mut cases = Vec::new();
    let mut ok = |topic: InputTopic, name: &str, key: Option<&str>, v: Value| {
        cases.push(case(
            &format!("{topic:?}: {name}"),
            topic,
            key,
            bytes(&v),
            None,
        ));
    };
    use InputTopic::*;
    for ty in [
        "TASK_CREATED",
        "TASK_STARTED",
        "TASK_COMPLETED",
        "TASK_FAILED",
    ] {
        ok(
            Tasks,
            ty,
            Some("t-1"),
            set(task_doc(), "eventType", json!(ty)),
        );
    }
    ok(
        Tasks,
        "status agreeing with the type",
        Some("t-1"),
        set(task_doc(), "status", json!("PENDING")),
    );
    ok(
        Tasks,
        "no patientId",
        Some("t-1"),
        del(task_doc(), "patientId"),
    );
    ok(
        Tasks,
        "null patientId",
        Some("t-1"),
        set(task_doc(), "patientId", Value::Null),
    );
    ok(Tasks, "no key", None, task_doc());
    for ty in [
        "WORKFLOW_ESCALATED",
        "WORKFLOW_FAILED",
        "WORKFLOW_COMPLETED",
    ] {
        // Only WORKFLOW_STARTED needs the template.
        ok(
            Workflows,
            ty,
            Some("w-1"),
            del(
                del(set(workflow_doc(), "eventType", json!(ty)), "templateId"),
                "templateVersion",
            ),
        );
    }
    for (ty, st) in [
        ("ORDER_CREATED", "PROPOSED"),
        ("ORDER_AUTHORIZED", "AUTHORIZED"),
        ("ORDER_ACTIVATED", "ACTIVATED"),
        ("ORDER_STARTED", "IN_PROGRESS"),
        ("ORDER_RESULTED", "RESULTED"),
        ("ORDER_RESULTED", "DISPENSED"),
        ("ORDER_RESULTED", "COMPLETED"),
        ("ORDER_VERIFIED", "VERIFIED"),
        ("ORDER_CLOSED", "CLOSED"),
        ("ORDER_CANCELLED", "CANCELLED"),
    ] {
        ok(
            Orders,
            &format!("{ty} {st}"),
            Some("o-1"),
            set(
                set(order_doc(), "eventType", json!(ty)),
                "orderStatus",
                json!(st),
            ),
        );
    }
    // Only ORDER_CREATED must name the type.
    ok(
        Orders,
        "AUTHORIZED without orderType",
        Some("o-1"),
        del(
            set(
                set(order_doc(), "eventType", json!("ORDER_AUTHORIZED")),
                "orderStatus",
                json!("AUTHORIZED"),
            ),
            "orderType",
        ),
    );
    ok(
        Orders,
        "COMPENSATION_COMPLETED without orderStatus",
        Some("o-1"),
        set(
            del(
                set(
                    order_doc(),
                    "eventType",
                    json!("ORDER_COMPENSATION_COMPLETED"),
                ),
                "orderStatus",
            ),
            "metadata/actionId",
            json!("a-1"),
        ),
    );
    ok(
        Orders,
        "other order type",
        Some("o-1"),
        set(order_doc(), "orderType", json!("PHYSIOTHERAPY")),
    );
    ok(
        Orders,
        "no metadata",
        Some("o-1"),
        del(order_doc(), "metadata"),
    );
    ok(
        Orders,
        "critical result",
        Some("o-1"),
        set(
            set(
                set(order_doc(), "eventType", json!("ORDER_RESULTED")),
                "orderStatus",
                json!("RESULTED"),
            ),
            "metadata/critical",
            json!(true),
        ),
    );
    for ty in [
        "HEALTH_CHECK",
        "PERFORMANCE_METRIC",
        "ERROR_REPORT",
        "AUDIT_EVENT",
    ] {
        ok(
            System,
            ty,
            Some("db"),
            set(system_doc(), "eventType", json!(ty)),
        );
    }
    ok(
        Definitions,
        "the contract's example",
        Some(DEF_KEY),
        template_doc(),
    );
    ok(
        Definitions,
        "templateId with a colon (key split at the last one)",
        Some("ns:sepsis:3"),
        set(template_doc(), "templateId", json!("ns:sepsis")),
    );
    ok(
        Definitions,
        "fan-in: two definitions with the same nextTaskId",
        Some(DEF_KEY),
        set(template_doc(), "tasks/3/nextTaskId", json!("antibiotics")),
    );
    ok(
        Definitions,
        "nulls for optional task fields",
        Some(DEF_KEY),
        set(
            set(template_doc(), "tasks/2/nextTaskId", Value::Null),
            "tasks/3/required",
            Value::Null,
        ),
    );
    check(cases);
}

#[test]
fn unknown_fields_are_ignored() {
    let extra = json!({"nested": {"deep": [1, 2, {"x": null}]}, "n": 1.5});
    let cases = vec![
        (
            InputTopic::Tasks,
            set(
                set(task_doc(), "futureField", extra.clone()),
                "metadata",
                json!({"trace": "abc", "x": extra.clone()}),
            ),
        ),
        (
            InputTopic::Workflows,
            set(workflow_doc(), "futureField", extra.clone()),
        ),
        (
            InputTopic::Orders,
            set(
                set(order_doc(), "futureField", extra.clone()),
                "metadata/shoeSize",
                json!(44),
            ),
        ),
        (
            InputTopic::System,
            set(system_doc(), "futureField", extra.clone()),
        ),
        (
            InputTopic::Definitions,
            set(
                set(template_doc(), "owner", json!("icu")),
                "tasks/0/color",
                json!("red"),
            ),
        ),
    ];
    for (topic, doc) in cases {
        let with = run(topic, Some(DEF_KEY), bytes(&doc).as_deref())
            .unwrap_or_else(|r| panic!("{topic:?} rejected: {r:?}"));
        // The same document without the unknown fields decodes to the same event.
        let plain = match topic {
            InputTopic::Tasks => task_doc(),
            InputTopic::Workflows => workflow_doc(),
            InputTopic::Orders => order_doc(),
            InputTopic::System => system_doc(),
            InputTopic::Definitions => template_doc(),
        };
        let without = run(topic, Some(DEF_KEY), bytes(&plain).as_deref()).unwrap();
        if let (Event::Order(a), Event::Order(b)) = (&with, &without) {
            // Order events keep their payload verbatim (for dead letters): compare the rest.
            let strip =
                |e: &hmis_dataflows::events::OrderEvent| hmis_dataflows::events::OrderEvent {
                    raw: None,
                    ..e.clone()
                };
            assert_eq!(
                strip(a),
                strip(b),
                "{topic:?}: unknown fields changed the event"
            );
        } else if let (Event::Task(a), Event::Task(b)) = (&with, &without) {
            let strip = |e: &hmis_dataflows::events::TaskEvent| hmis_dataflows::events::TaskEvent {
                raw: None,
                ..e.clone()
            };
            assert_eq!(
                strip(a),
                strip(b),
                "{topic:?}: unknown fields changed the event"
            );
        } else if let (Event::Workflow(a), Event::Workflow(b)) = (&with, &without) {
            let strip =
                |e: &hmis_dataflows::events::WorkflowEvent| hmis_dataflows::events::WorkflowEvent {
                    raw: None,
                    ..e.clone()
                };
            assert_eq!(
                strip(a),
                strip(b),
                "{topic:?}: unknown fields changed the event"
            );
        } else {
            assert_eq!(with, without, "{topic:?}: unknown fields changed the event");
        }
    }
}

#[test]
fn fields_and_defaults() {
    // Task: attempt defaults to 1, status implied by the type, times parsed to ms.
    let Ok(Event::Task(t)) = run(
        InputTopic::Tasks,
        Some("t-1"),
        bytes(&task_doc()).as_deref(),
    ) else {
        panic!()
    };
    assert_eq!(
        (t.attempt, t.status, t.event_time),
        (1, TaskStatus::Pending, T_123)
    );
    assert_eq!(
        (
            t.event_id.as_str(),
            t.task_instance_id.as_str(),
            t.workflow_instance_id.as_str(),
            t.task_def_id.as_str()
        ),
        ("e-1", "t-1", "w-1", "triage")
    );
    assert_eq!(
        t.pos,
        Pos {
            partition: 2,
            offset: 41
        }
    );
    assert_eq!(t.due_at, None);
    let doc = set(
        set(
            set(task_doc(), "attempt", json!(3)),
            "dueAt",
            json!("2026-11-26T11:15:00.123+01:00"),
        ),
        "eventType",
        json!("TASK_FAILED"),
    );
    let doc = set(doc, "errorMessage", json!("boom"));
    let Ok(Event::Task(t)) = run(InputTopic::Tasks, Some("t-1"), bytes(&doc).as_deref()) else {
        panic!()
    };
    assert_eq!(
        (t.attempt, t.status, t.due_at, t.error_message.as_deref()),
        (3, TaskStatus::Failed, Some(T_123), Some("boom"))
    );
    for (ty, st) in [
        ("TASK_STARTED", TaskStatus::InProgress),
        ("TASK_COMPLETED", TaskStatus::Completed),
    ] {
        let Ok(Event::Task(t)) = run(
            InputTopic::Tasks,
            None,
            bytes(&set(task_doc(), "eventType", json!(ty))).as_deref(),
        ) else {
            panic!()
        };
        assert_eq!(t.status, st);
    }
    // An offset other than Z names the same instant.
    let Ok(Event::Task(t)) = run(
        InputTopic::Tasks,
        None,
        bytes(&set(
            task_doc(),
            "eventTime",
            json!("2026-11-26T05:15:00.123-05:00"),
        ))
        .as_deref(),
    ) else {
        panic!()
    };
    assert_eq!(t.event_time, T_123);

    // Workflow.
    let Ok(Event::Workflow(w)) = run(
        InputTopic::Workflows,
        Some("w-1"),
        bytes(&workflow_doc()).as_deref(),
    ) else {
        panic!()
    };
    assert_eq!(w.kind, WorkflowEventKind::Started);
    assert_eq!(
        (
            w.template_id.as_deref(),
            w.template_version,
            w.template_name.as_deref()
        ),
        (Some("sepsis-bundle"), Some(3), Some("Sepsis Bundle"))
    );
    let esc = set(
        set(workflow_doc(), "eventType", json!("WORKFLOW_ESCALATED")),
        "escalationReason",
        json!("family request"),
    );
    let Ok(Event::Workflow(w)) = run(InputTopic::Workflows, Some("w-1"), bytes(&esc).as_deref())
    else {
        panic!()
    };
    assert_eq!(
        (w.kind, w.escalation_reason.as_deref()),
        (WorkflowEventKind::Escalated, Some("family request"))
    );

    // Order: metadata fields, critical defaults to false.
    let Ok(Event::Order(o)) = run(
        InputTopic::Orders,
        Some("o-1"),
        bytes(&order_doc()).as_deref(),
    ) else {
        panic!()
    };
    assert_eq!(
        (o.kind, o.order_status, o.order_type.as_deref()),
        (
            OrderEventKind::Created,
            Some(OrderStatus::Proposed),
            Some("LAB_TEST")
        )
    );
    assert_eq!(
        (
            o.actor.as_deref(),
            o.actor_role.as_deref(),
            o.department.as_deref(),
            o.critical
        ),
        (Some("dr-x"), Some("PHYSICIAN"), Some("LAB"), false)
    );
    assert_eq!(
        o.cost.as_deref().map(|c| c.parse::<f64>().unwrap()),
        Some(12.5)
    );
    let res = set(
        set(
            set(
                set(order_doc(), "eventType", json!("ORDER_RESULTED")),
                "orderStatus",
                json!("DISPENSED"),
            ),
            "metadata/critical",
            json!(true),
        ),
        "metadata/appointmentId",
        json!("ap-9"),
    );
    let Ok(Event::Order(o)) = run(InputTopic::Orders, Some("o-1"), bytes(&res).as_deref()) else {
        panic!()
    };
    assert_eq!(
        (
            o.kind,
            o.order_status,
            o.critical,
            o.appointment_id.as_deref()
        ),
        (
            OrderEventKind::Resulted,
            Some(OrderStatus::Dispensed),
            true,
            Some("ap-9")
        )
    );
    let cancel = set(
        set(
            set(order_doc(), "eventType", json!("ORDER_CANCELLED")),
            "orderStatus",
            json!("CANCELLED"),
        ),
        "metadata/reason",
        json!("duplicate"),
    );
    let Ok(Event::Order(o)) = run(InputTopic::Orders, Some("o-1"), bytes(&cancel).as_deref())
    else {
        panic!()
    };
    assert_eq!(
        (o.kind, o.reason.as_deref()),
        (OrderEventKind::Cancelled, Some("duplicate"))
    );
    let comp = set(
        del(
            set(
                order_doc(),
                "eventType",
                json!("ORDER_COMPENSATION_COMPLETED"),
            ),
            "orderStatus",
        ),
        "metadata/actionId",
        json!("a-1"),
    );
    let Ok(Event::Order(o)) = run(InputTopic::Orders, Some("o-1"), bytes(&comp).as_deref()) else {
        panic!()
    };
    assert_eq!(
        (o.kind, o.order_status, o.action_id.as_deref()),
        (OrderEventKind::CompensationCompleted, None, Some("a-1"))
    );

    // Definition: required true, maxRetries 0, escalateTo MANAGER, no blocking types, not automatic.
    let Ok(Event::Definition(d)) = run(
        InputTopic::Definitions,
        Some(DEF_KEY),
        bytes(&template_doc()).as_deref(),
    ) else {
        panic!()
    };
    assert_eq!(
        (d.template_id.as_str(), d.version, d.pos),
        (
            "sepsis-bundle",
            3,
            Pos {
                partition: 2,
                offset: 41
            }
        )
    );
    let t = d.template.expect("a template");
    assert_eq!(t.template_name.as_deref(), Some("Sepsis Bundle"));
    let ids: Vec<&str> = t.tasks.iter().map(|d| d.task_def_id.as_str()).collect();
    assert_eq!(
        ids,
        ["triage", "blood-cultures", "antibiotics", "manual-review"]
    );
    let triage = t.task("triage").unwrap();
    assert_eq!(
        (
            triage.required,
            triage.max_retries,
            triage.escalate_to.as_str(),
            triage.sla_minutes
        ),
        (true, 0, "CHARGE_NURSE", Some(15))
    );
    assert_eq!(triage.next_task_id.as_deref(), Some("blood-cultures"));
    let bc = t.task("blood-cultures").unwrap();
    assert_eq!(
        (
            bc.required,
            bc.max_retries,
            bc.failure_task_id.as_deref(),
            bc.escalate_to.as_str()
        ),
        (true, 2, Some("manual-review"), "MANAGER")
    );
    assert!(bc.blocking_order_types.is_empty() && !bc.automatic);
    let ab = t.task("antibiotics").unwrap();
    assert_eq!(
        (ab.blocking_order_types.clone(), ab.next_task_id.clone()),
        (vec!["LAB_TEST".into()], None)
    );
    let mr = t.task("manual-review").unwrap();
    assert_eq!(
        (mr.required, mr.sla_minutes, mr.name.as_deref()),
        (false, None, Some("Manual review"))
    );
    let auto = set(template_doc(), "tasks/3/automatic", json!(true));
    let Ok(Event::Definition(d)) = run(
        InputTopic::Definitions,
        Some(DEF_KEY),
        bytes(&auto).as_deref(),
    ) else {
        panic!()
    };
    assert!(d.template.unwrap().task("manual-review").unwrap().automatic);
}

#[test]
fn tombstones() {
    let Ok(Event::Definition(d)) = run(InputTopic::Definitions, Some(DEF_KEY), None) else {
        panic!("tombstone rejected")
    };
    assert_eq!(
        (d.template_id.as_str(), d.version, d.template.is_none()),
        ("sepsis-bundle", 3, true)
    );
    assert_eq!(
        d.pos,
        Pos {
            partition: 2,
            offset: 41
        }
    );
    let Ok(Event::Definition(d)) = run(InputTopic::Definitions, Some("ns:sepsis:12"), None) else {
        panic!("tombstone rejected")
    };
    assert_eq!((d.template_id.as_str(), d.version), ("ns:sepsis", 12));
    // Definitions carry no eventTime: they never move the clock.
    assert_eq!(Event::Definition(d).event_time(), None);
}

/// Issue 11: every shape of record a Kafka client can send is decoded or rejected with a
/// reason, and whatever is accepted carries nothing PostgreSQL or Kafka would refuse later.
fn reason_of(topic: InputTopic, key: Option<&[u8]>, value: Option<&[u8]>) -> Option<RejectReason> {
    check_decoders_agree(topic, key, value);
    decode(topic, key, value, Pos::default()).err().map(|r| {
        assert!(!r.detail.is_empty(), "a rejection says why");
        r.reason
    })
}

#[test]
fn hostile_shapes_are_rejected_with_their_reason() {
    use hmis_dataflows::events::limits;
    let t = InputTopic::Tasks;
    let v = |doc: Value| serde_json::to_vec(&doc).unwrap();
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let deep_object = format!("{}1{}", "{\"a\":".repeat(5000), "}".repeat(5000));
    let cases: Vec<(&str, InputTopic, Option<Vec<u8>>, Option<RejectReason>)> = vec![
        (
            "null value (tombstone) on tasks",
            t,
            None,
            Some(InvalidJson),
        ),
        (
            "null value on orders",
            InputTopic::Orders,
            None,
            Some(InvalidJson),
        ),
        (
            "null value on system",
            InputTopic::System,
            None,
            Some(InvalidJson),
        ),
        ("empty value", t, Some(vec![]), Some(InvalidJson)),
        (
            "not UTF-8",
            t,
            Some(vec![0xff, 0xfe, b'{', 0x80]),
            Some(InvalidJson),
        ),
        (
            "5,000 nested arrays",
            t,
            Some(deep.into_bytes()),
            Some(InvalidJson),
        ),
        (
            "5,000 nested objects",
            t,
            Some(deep_object.into_bytes()),
            Some(InvalidJson),
        ),
        (
            "a NUL in an id",
            t,
            Some(v(set(task_doc(), "taskInstanceId", json!("t\u{0}1")))),
            Some(SchemaViolation),
        ),
        (
            "a NUL in free text",
            t,
            Some(v(set(task_doc(), "taskName", json!("a\u{0}b")))),
            Some(SchemaViolation),
        ),
        (
            "a NUL in an object key of metadata",
            InputTopic::Orders,
            Some(v(set(order_doc(), "metadata/x\u{0}y", json!(1)))),
            Some(SchemaViolation),
        ),
        (
            "a NUL in an audit detail",
            InputTopic::System,
            Some(v(set(
                set(system_doc(), "eventType", json!("AUDIT_EVENT")),
                "details",
                json!({"note": "\u{0}"}),
            ))),
            Some(SchemaViolation),
        ),
        (
            "an id longer than an identifier may be",
            t,
            Some(v(set(
                task_doc(),
                "workflowInstanceId",
                json!("w".repeat(limits::MAX_ID_BYTES + 1)),
            ))),
            Some(SchemaViolation),
        ),
        (
            "an id at the identifier limit",
            t,
            Some(v(set(
                task_doc(),
                "workflowInstanceId",
                json!("w".repeat(limits::MAX_ID_BYTES)),
            ))),
            None,
        ),
        (
            "a component longer than an identifier may be",
            InputTopic::System,
            Some(v(set(
                system_doc(),
                "component",
                json!("c".repeat(limits::MAX_ID_BYTES + 1)),
            ))),
            Some(SchemaViolation),
        ),
        (
            "a very long string",
            t,
            Some(v(set(
                task_doc(),
                "errorMessage",
                json!("x".repeat(limits::MAX_STRING_BYTES + 1)),
            ))),
            Some(SchemaViolation),
        ),
        (
            "a long string at the limit",
            t,
            Some(v(set(
                task_doc(),
                "errorMessage",
                json!("x".repeat(limits::MAX_STRING_BYTES)),
            ))),
            None,
        ),
        (
            "attempt past PostgreSQL's integer",
            t,
            Some(v(set(task_doc(), "attempt", json!(4_294_967_295u64)))),
            Some(SchemaViolation),
        ),
        (
            "attempt 1e20",
            t,
            Some(v(set(task_doc(), "attempt", json!(1e20)))),
            Some(SchemaViolation),
        ),
        (
            "negative attempt",
            t,
            Some(v(set(task_doc(), "attempt", json!(-1)))),
            Some(SchemaViolation),
        ),
        (
            "templateVersion past i64",
            InputTopic::Workflows,
            Some(v(set(workflow_doc(), "templateVersion", json!(u64::MAX)))),
            Some(SchemaViolation),
        ),
        (
            "a number past f64",
            InputTopic::System,
            Some(
                String::from_utf8(v(set(
                    system_doc(),
                    "eventType",
                    json!("PERFORMANCE_METRIC"),
                )))
                .unwrap()
                .replace("\"value\":12", "\"value\":1e400")
                .into_bytes(),
            ),
            Some(InvalidJson),
        ),
        (
            "an eventTime before 1970",
            t,
            Some(v(set(
                task_doc(),
                "eventTime",
                json!("1969-12-31T23:59:59Z"),
            ))),
            Some(SchemaViolation),
        ),
    ];
    let mut wrong = Vec::new();
    // metadata / details at the size limit (compact JSON) and one byte over it.
    let sized = |n: usize| {
        // {"x":"…"} is 8 bytes of JSON around the string.
        json!({ "x": "m".repeat(n - 8) })
    };
    let m = limits::MAX_METADATA_BYTES;
    let mut cases = cases;
    cases.extend([
        (
            "metadata at the size limit",
            t,
            Some(v(set(task_doc(), "metadata", sized(m)))),
            None,
        ),
        (
            "metadata one byte over the size limit",
            t,
            Some(v(set(task_doc(), "metadata", sized(m + 1)))),
            Some(SchemaViolation),
        ),
        (
            "order metadata over the size limit",
            InputTopic::Orders,
            Some(v(set(order_doc(), "metadata/x", json!("m".repeat(m))))),
            Some(SchemaViolation),
        ),
        (
            "audit details at the size limit",
            InputTopic::System,
            Some(v(set(system_doc(), "details", sized(m)))),
            None,
        ),
        (
            "audit details over the size limit",
            InputTopic::System,
            Some(v(set(system_doc(), "details", sized(m + 1)))),
            Some(SchemaViolation),
        ),
    ]);
    for (what, topic, value, want) in &cases {
        let got = reason_of(*topic, Some(b"k"), value.as_deref());
        if got != *want {
            wrong.push(format!("{what}: want {want:?}, got {got:?}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn templates_with_more_tasks_than_the_limit_are_invalid_definitions() {
    use hmis_dataflows::events::limits;
    let with_tasks = |n: usize| {
        let tasks: Vec<Value> = (0..n)
            .map(|i| json!({"taskDefId": format!("t{i}"), "name": format!("T{i}")}))
            .collect();
        serde_json::to_vec(&set(template_doc(), "tasks", Value::Array(tasks))).unwrap()
    };
    let at = with_tasks(limits::MAX_TASKS_PER_TEMPLATE);
    let over = with_tasks(limits::MAX_TASKS_PER_TEMPLATE + 1);
    let key = Some(DEF_KEY.as_bytes());
    assert_eq!(reason_of(InputTopic::Definitions, key, Some(&at)), None);
    let r = decode(InputTopic::Definitions, key, Some(&over), Pos::default()).unwrap_err();
    assert_eq!(r.reason, InvalidDefinition);
    assert!(r.detail.contains("1025 tasks"), "{}", r.detail);
}

#[test]
fn keys_of_any_shape_do_not_change_the_decoding() {
    let doc = serde_json::to_vec(&task_doc()).unwrap();
    for key in [
        None,
        Some(&b""[..]),
        Some(&[0xff, 0x00, 0xfe][..]),
        Some(&b"t-1"[..]),
    ] {
        let e = decode(InputTopic::Tasks, key, Some(&doc), Pos::default())
            .unwrap_or_else(|r| panic!("key {key:?}: {r:?}"));
        let Event::Task(e) = e else {
            panic!("a task event")
        };
        assert_eq!(e.task_instance_id, "t-1");
        assert_eq!(e.raw_key.as_deref(), key, "the key is kept byte for byte");
    }
}

/// The fuzz target's seeds (`fuzz/corpus/decode/`, hostile shapes included) through the
/// target's own checks, on stable Rust: whatever libFuzzer's corpus holds must pass here too.
#[test]
fn the_fuzz_corpus_passes_the_fuzz_targets_checks() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/decode");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let data = std::fs::read(entry.unwrap().path()).unwrap();
        // The target's layout: topic byte (high bit: null value), key length, key, value.
        let Some((topic, key, value)) = fuzz_record(&data) else {
            continue;
        };
        hmis_dataflows::events::check_any_record(topic, key, value);
        check_decoders_agree(topic, key, value);
        n += 1;
    }
    assert!(n >= 20, "the corpus holds the seeds ({n})");
}
