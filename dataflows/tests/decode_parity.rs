//! `events::decode` (one pass, borrowed, falling back to the reference path) against
//! `events::decode_reference` (the DOM decoder whose texts the contract's dead letters
//! carry): the same event or the same rejection, detail text included, for every input.
//!
//! Inputs: every record of the reference histories (untimed and timed), documents with every
//! field each topic reads, the fuzz corpus, and thousands of seeded mutations of those (field
//! deletions, type swaps, nulls, duplicate keys, escapes, long strings, deep nesting, unknown
//! fields, metadata around its size limit, broken bytes). The hostile and table-driven cases
//! of `tests/decode.rs` go through the same check there. Besides equality, the valid records
//! must actually take the one-pass path (`decode_one_pass`), or the comparison proves little.

#[allow(dead_code)]
#[path = "reference/history.rs"]
mod history;

use hmis_dataflows::events::{
    check_decoders_agree, decode_one_pass, decode_reference, fuzz_record, limits, Event,
    InputTopic, Pos,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const EVENT_TOPICS: [InputTopic; 4] = [
    InputTopic::Tasks,
    InputTopic::Workflows,
    InputTopic::Orders,
    InputTopic::System,
];

fn topic_of(e: &Event) -> InputTopic {
    match e {
        Event::Definition(_) => InputTopic::Definitions,
        Event::Task(_) => InputTopic::Tasks,
        Event::Workflow(_) => InputTopic::Workflows,
        Event::Order(_) => InputTopic::Orders,
        Event::System(_) => InputTopic::System,
    }
}

/// Documents with every field the topic's types read, one per event type.
fn full_documents() -> Vec<(InputTopic, Value)> {
    let t = "2026-11-26T10:15:00.123Z";
    let mut docs = Vec::new();
    for et in [
        "TASK_CREATED",
        "TASK_STARTED",
        "TASK_COMPLETED",
        "TASK_FAILED",
    ] {
        let status = match et {
            "TASK_CREATED" => "PENDING",
            "TASK_STARTED" => "IN_PROGRESS",
            "TASK_COMPLETED" => "COMPLETED",
            _ => "FAILED",
        };
        docs.push((
            InputTopic::Tasks,
            json!({"eventId": "e-1", "eventType": et, "eventTime": t, "taskInstanceId": "t-1",
                   "workflowInstanceId": "w-1", "patientId": "p-1", "taskDefId": "triage",
                   "taskName": "Triage", "status": status, "attempt": 2,
                   "errorMessage": "timeout", "dueAt": "2026-11-26T11:15:00Z",
                   "metadata": {"source": "ehr", "n": [1, 2.5, -3, true, null]}}),
        ));
    }
    for et in [
        "WORKFLOW_STARTED",
        "WORKFLOW_ESCALATED",
        "WORKFLOW_FAILED",
        "WORKFLOW_COMPLETED",
    ] {
        docs.push((
            InputTopic::Workflows,
            json!({"eventId": "e-2", "eventType": et, "eventTime": t, "workflowInstanceId": "w-1",
                   "patientId": "p-1", "templateId": "sepsis-bundle", "templateVersion": 3,
                   "workflowTemplateName": "Sepsis Bundle", "escalationReason": "late",
                   "status": "ACTIVE"}),
        ));
    }
    for (et, st) in [
        ("ORDER_CREATED", "PROPOSED"),
        ("ORDER_AUTHORIZED", "AUTHORIZED"),
        ("ORDER_ACTIVATED", "ACTIVATED"),
        ("ORDER_STARTED", "IN_PROGRESS"),
        ("ORDER_RESULTED", "DISPENSED"),
        ("ORDER_VERIFIED", "VERIFIED"),
        ("ORDER_CLOSED", "CLOSED"),
        ("ORDER_CANCELLED", "CANCELLED"),
        ("ORDER_COMPENSATION_COMPLETED", "CANCELLED"),
    ] {
        docs.push((
            InputTopic::Orders,
            json!({"eventId": "e-3", "eventType": et, "eventTime": t, "orderId": "o-1",
                   "workflowInstanceId": "w-1", "patientId": "p-1", "orderType": "LAB_TEST",
                   "orderStatus": st, "actor": "dr-x",
                   "metadata": {"actorRole": "PHYSICIAN", "cost": 12.5, "department": "LAB",
                                "critical": true, "reason": "r", "appointmentId": "a-1",
                                "actionId": "act-1", "extra": {"k": ["v"]}}}),
        ));
    }
    for et in [
        "HEALTH_CHECK",
        "PERFORMANCE_METRIC",
        "ERROR_REPORT",
        "AUDIT_EVENT",
    ] {
        docs.push((
            InputTopic::System,
            json!({"eventId": "e-4", "eventType": et, "eventTime": t, "component": "db",
                   "status": "DEGRADED", "metricName": "kafka.consumer.lag", "value": 12.75,
                   "unit": "messages", "severity": "HIGH", "message": "slow query",
                   "actor": "admin-1", "action": "EXPORT", "entityType": "PATIENT",
                   "entityId": "p-1", "details": {"rows": 3, "b": "é\n", "a": [null]}}),
        ));
    }
    docs
}

/// Seed documents: the full ones and every record of a few reference histories.
fn seeds() -> Vec<(InputTopic, Option<Vec<u8>>, Vec<u8>)> {
    let mut out: Vec<(InputTopic, Option<Vec<u8>>, Vec<u8>)> = full_documents()
        .into_iter()
        .map(|(t, v)| (t, Some(b"k-1".to_vec()), v.to_string().into_bytes()))
        .collect();
    for seed in 0..4 {
        for h in [history::generate(seed), history::generate_timed(seed)] {
            for r in &h.records {
                let Some(v) = &r.value else { continue };
                let topic = topic_of(&r.event);
                if topic != InputTopic::Definitions {
                    out.push((topic, None, v.to_string().into_bytes()));
                }
            }
        }
    }
    out
}

#[test]
fn every_valid_record_takes_the_one_pass_path_and_agrees() {
    let seeds = seeds();
    assert!(seeds.len() > 1000, "{} seed records", seeds.len());
    for (topic, key, value) in &seeds {
        check_decoders_agree(*topic, key.as_deref(), Some(value));
        // Whatever the reference accepts (all of these), the one-pass decoder decodes itself.
        let reference = decode_reference(*topic, key.as_deref(), Some(value), Pos::default());
        let fast = decode_one_pass(*topic, key.as_deref(), Some(value), Pos::default());
        assert_eq!(
            fast.as_ref(),
            reference.as_ref().ok(),
            "{}",
            String::from_utf8_lossy(value)
        );
        assert!(fast.is_some(), "{}", String::from_utf8_lossy(value));
    }
}

/// The same record, its keys written with escapes, spaces and another order: still one pass.
#[test]
fn escapes_whitespace_and_key_order_take_the_one_pass_path() {
    for (topic, doc) in full_documents() {
        let Value::Object(map) = doc else {
            unreachable!()
        };
        let mut parts: Vec<String> = map
            .iter()
            .map(|(k, v)| {
                let k = k.replacen('e', "\\u0065", 1);
                let v = match v {
                    Value::String(s) => format!("\"{}\"", s.replace('-', "\\u002d")),
                    v => v.to_string(),
                };
                format!("\"{k}\" :\t{v}")
            })
            .collect();
        parts.reverse();
        let text = format!(" {{ {} }}\n", parts.join(" ,\r\n "));
        check_decoders_agree(topic, None, Some(text.as_bytes()));
        assert!(
            decode_one_pass(topic, None, Some(text.as_bytes()), Pos::default()).is_some(),
            "{text}"
        );
    }
}

// --------------------------------------------------------------------------- mutations ----

const FIELDS: &[&str] = &[
    "eventId",
    "eventType",
    "eventTime",
    "metadata",
    "details",
    "taskInstanceId",
    "workflowInstanceId",
    "patientId",
    "taskDefId",
    "taskName",
    "status",
    "attempt",
    "errorMessage",
    "dueAt",
    "templateId",
    "templateVersion",
    "workflowTemplateName",
    "escalationReason",
    "orderId",
    "orderType",
    "orderStatus",
    "actor",
    "component",
    "metricName",
    "value",
    "unit",
    "severity",
    "message",
    "action",
    "entityType",
    "entityId",
    "EventId",
    "eventid",
    "unknownField",
];

const META_FIELDS: &[&str] = &[
    "actorRole",
    "cost",
    "department",
    "critical",
    "reason",
    "appointmentId",
    "actionId",
    "x",
];

const EVENT_TYPES: &[&str] = &[
    "TASK_CREATED",
    "TASK_STARTED",
    "TASK_COMPLETED",
    "TASK_FAILED",
    "WORKFLOW_STARTED",
    "WORKFLOW_ESCALATED",
    "WORKFLOW_FAILED",
    "WORKFLOW_COMPLETED",
    "ORDER_CREATED",
    "ORDER_AUTHORIZED",
    "ORDER_RESULTED",
    "ORDER_COMPENSATION_COMPLETED",
    "HEALTH_CHECK",
    "PERFORMANCE_METRIC",
    "ERROR_REPORT",
    "AUDIT_EVENT",
    "TASK_PAUSED",
    "task_created",
    "",
];

/// A nested value `depth` levels deep.
fn nested(depth: usize, leaf: Value) -> Value {
    (0..depth).fold(leaf, |v, i| {
        if i % 2 == 0 {
            json!([v])
        } else {
            json!({ "n": v })
        }
    })
}

/// A JSON value of some shape the decoders must tell apart.
fn any_value(rng: &mut SmallRng) -> Value {
    match rng.random_range(0..40) {
        0 => Value::Null,
        1 => json!(true),
        2 => json!(false),
        3 => json!(0),
        4 => json!(1),
        5 => json!(-1),
        6 => json!(2.0),
        7 => json!(1.5e300),
        8 => json!(u32::MAX),
        9 => json!(limits::MAX_ATTEMPT),
        10 => json!(u64::MAX),
        11 => json!(i64::MIN),
        12 => json!(i64::MAX),
        13 => json!(""),
        14 => json!("x".repeat(limits::MAX_ID_BYTES)),
        15 => json!("x".repeat(limits::MAX_ID_BYTES + 1)),
        16 => json!("y".repeat(limits::MAX_STRING_BYTES)),
        17 => json!("y".repeat(limits::MAX_STRING_BYTES + 1)),
        18 => json!("a\u{0}b"),
        19 => json!("tab\there \"quoted\" back\\slash é ✓ \u{1}"),
        20 => json!([]),
        21 => json!({}),
        22 => json!(["a", 1, null]),
        23 => json!({"k": "v", "n": {"m": [1.25]}}),
        24 => json!("2026-11-26T10:15:00Z"),
        25 => json!("2026-11-26T10:15:00.123456+02:00"),
        26 => json!("1969-12-31T23:59:59Z"),
        27 => json!("2026-13-01T00:00:00Z"),
        28 => json!("PENDING"),
        29 => json!("IN_PROGRESS"),
        30 => json!("CANCELLED"),
        31 => json!("UP"),
        32 => json!("CRITICAL"),
        33 => json!(EVENT_TYPES[rng.random_range(0..EVENT_TYPES.len())]),
        34 => nested(rng.random_range(120..130), json!("deep")),
        35 => json!({"x\u{0}y": 1}),
        36 => json!(-0.0),
        37 => json!(1e-7),
        38 => json!("PHYSICIAN"),
        _ => json!("w-1"),
    }
}

/// `metadata` whose compact JSON is `target` bytes give or take a few, with escapes and
/// floats in it so that the one-pass size count is exercised near the limit.
fn sized_metadata(rng: &mut SmallRng, target: usize) -> Value {
    let mut m = serde_json::Map::new();
    m.insert("actorRole".into(), json!("PHYSICIAN"));
    m.insert("cost".into(), json!(1e15));
    m.insert("n".into(), json!([0.1, -2, "q\"\n"]));
    let base = Value::Object(m.clone()).to_string().len();
    // ,"pad":"" adds 9 bytes around the padding.
    let pad = target.saturating_sub(base + 9) as i64 + rng.random_range(-3..=3);
    let unit = if rng.random_bool(0.3) { "\n" } else { "p" };
    let per = if unit == "\n" { 2 } else { 1 };
    m.insert(
        "pad".into(),
        json!(unit.repeat((pad.max(0) as usize) / per)),
    );
    Value::Object(m)
}

/// One structural mutation of an object document.
fn mutate_value(rng: &mut SmallRng, doc: &mut Value) {
    let Value::Object(map) = doc else { return };
    let field = FIELDS[rng.random_range(0..FIELDS.len())];
    match rng.random_range(0..10) {
        0 | 1 => {
            map.remove(field);
        }
        2..=4 => {
            map.insert(field.into(), any_value(rng));
        }
        5 => {
            map.insert(
                "eventType".into(),
                json!(EVENT_TYPES[rng.random_range(0..EVENT_TYPES.len())]),
            );
        }
        6 => {
            let target = limits::MAX_METADATA_BYTES + rng.random_range(0..2);
            let which = if rng.random_bool(0.5) {
                "metadata"
            } else {
                "details"
            };
            map.insert(which.into(), sized_metadata(rng, target));
        }
        7 => {
            let md = map.entry("metadata").or_insert_with(|| json!({}));
            if let Value::Object(md) = md {
                let f = META_FIELDS[rng.random_range(0..META_FIELDS.len())];
                if rng.random_bool(0.3) {
                    md.remove(f);
                } else {
                    md.insert(f.into(), any_value(rng));
                }
            } else {
                *md = any_value(rng);
            }
        }
        8 => {
            map.insert(format!("u{}", rng.random_range(0..5)), any_value(rng));
        }
        _ => {
            map.insert("metadata".into(), any_value(rng));
        }
    }
}

/// One mutation of the text: duplicate keys, escaped keys, broken bytes.
fn mutate_text(rng: &mut SmallRng, text: &mut Vec<u8>) {
    let field = FIELDS[rng.random_range(0..FIELDS.len())];
    match rng.random_range(0..9) {
        0 => {
            // A duplicate of a field, first or last.
            let v = any_value(rng).to_string();
            if rng.random_bool(0.5) && text.first() == Some(&b'{') {
                let ins = format!("\"{field}\":{v},");
                text.splice(1..1, ins.into_bytes());
            } else if text.last() == Some(&b'}') {
                let at = text.len() - 1;
                let ins = format!(",\"{field}\":{v}");
                text.splice(at..at, ins.into_bytes());
            }
        }
        1 => {
            // The field's key spelt with an escape.
            let s = String::from_utf8_lossy(text).into_owned();
            let from = format!("\"{field}\"");
            let to = format!("\"\\u{:04x}{}\"", field.as_bytes()[0], &field[1..]);
            *text = s.replacen(&from, &to, 1).into_bytes();
        }
        2 if !text.is_empty() => {
            let at = rng.random_range(0..text.len());
            text.truncate(at);
        }
        3 if !text.is_empty() => {
            let at = rng.random_range(0..text.len());
            text[at] = rng.random();
        }
        4 => {
            let tail: &[u8] = [&b" "[..], b"x", b"}", b"\n", b"\0", b",{}"][rng.random_range(0..6)];
            text.extend_from_slice(tail);
        }
        5 => {
            // Escapes inside a string value: a NUL, a lone or paired surrogate, a quote.
            let esc = [
                "\\u0000",
                "\\ud800",
                "\\udc00",
                "\\ud83d\\ude00",
                "\\\"",
                "\\/",
                "\\u00e9",
            ][rng.random_range(0..7)];
            let s = String::from_utf8_lossy(text).into_owned();
            let from = format!("\"{field}\":\"");
            *text = s.replacen(&from, &format!("{from}{esc}"), 1).into_bytes();
        }
        6 => {
            let s = String::from_utf8_lossy(text).into_owned();
            *text = s.replacen(':', " : ", 2).into_bytes();
        }
        7 => {
            let s = String::from_utf8_lossy(text).into_owned();
            let from = format!("\"{field}\"");
            *text = s.replacen(&from, &from.to_uppercase(), 1).into_bytes();
        }
        _ => {
            // A number written another way.
            let s = String::from_utf8_lossy(text).into_owned();
            let way = ["1.0", "1e0", "-0", "01", "1E2", "4294967296"][rng.random_range(0..6)];
            let from = format!("\"{field}\":");
            if let Some(i) = s.find(&from) {
                let start = i + from.len();
                let end = s[start..].find([',', '}']).map_or(s.len(), |e| start + e);
                *text = format!("{}{way}{}", &s[..start], &s[end..]).into_bytes();
            }
        }
    }
}

#[test]
fn seeded_mutations_agree() {
    let seeds = seeds();
    let mut rng = SmallRng::seed_from_u64(12);
    let (mut cases, mut one_pass, mut accepted) = (0, 0, 0);
    for i in 0..6000 {
        let (topic, key, text) = &seeds[if i % 2 == 0 {
            i / 2 % 25
        } else {
            rng.random_range(0..seeds.len())
        }];
        let topic = if rng.random_bool(0.05) {
            EVENT_TOPICS[rng.random_range(0..4)]
        } else {
            *topic
        };
        let mut doc: Value = serde_json::from_slice(text).unwrap();
        for _ in 0..rng.random_range(1..=3) {
            mutate_value(&mut rng, &mut doc);
        }
        let mut bytes = doc.to_string().into_bytes();
        if rng.random_bool(0.4) {
            mutate_text(&mut rng, &mut bytes);
        }
        check_decoders_agree(topic, key.as_deref(), Some(&bytes));
        cases += 1;
        if decode_one_pass(topic, key.as_deref(), Some(&bytes), Pos::default()).is_some() {
            one_pass += 1;
        }
        if decode_reference(topic, key.as_deref(), Some(&bytes), Pos::default()).is_ok() {
            accepted += 1;
        }
    }
    // The mutations reach both sides: many accepted (mostly in one pass), many rejected.
    assert!(accepted > cases / 5, "{accepted} of {cases} accepted");
    assert!(accepted < cases * 4 / 5, "{accepted} of {cases} accepted");
    assert!(
        one_pass > accepted * 3 / 4,
        "{one_pass} of {accepted} in one pass"
    );
}

#[test]
fn the_fuzz_corpus_agrees() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/decode");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let data = std::fs::read(entry.unwrap().path()).unwrap();
        // Each file once per topic, as a value and with the fuzz target's own layout.
        for topic in EVENT_TOPICS {
            check_decoders_agree(topic, None, Some(&data));
        }
        let Some((topic, key, value)) = fuzz_record(&data) else {
            continue;
        };
        check_decoders_agree(topic, key, value);
        n += 1;
    }
    assert!(n >= 20, "the corpus holds the seeds ({n})");
}

#[test]
fn shapes_that_are_not_events_agree() {
    let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
    let deep_in_field = |n: usize| {
        format!(
            r#"{{"eventId":"e","eventType":"TASK_CREATED","eventTime":"2026-11-26T10:15:00Z","taskInstanceId":"t","workflowInstanceId":"w","taskDefId":"d","x":{}}}"#,
            deep(n)
        )
    };
    let mut values: Vec<Option<Vec<u8>>> = vec![
        None,
        Some(vec![]),
        Some(b"   ".to_vec()),
        Some(b"null".to_vec()),
        Some(b"[]".to_vec()),
        Some(b"3".to_vec()),
        Some(b"\"s\"".to_vec()),
        Some(b"{}".to_vec()),
        Some(b"{} {}".to_vec()),
        Some(vec![0xef, 0xbb, 0xbf, b'{', b'}']),
        Some(vec![0xff, 0xfe, b'{', 0x80]),
        Some(deep(5000).into_bytes()),
    ];
    for n in [125, 126, 127, 128, 129] {
        values.push(Some(deep_in_field(n).into_bytes()));
    }
    for topic in InputTopic::ALL {
        for key in [None, Some(&b"k"[..])] {
            for v in &values {
                check_decoders_agree(topic, key, v.as_deref());
            }
        }
    }
}
