//! Issue 11: no record a Kafka client can send stops the pipeline.
//!
//! A generated workload is produced twice: once as it is (run A), once with records of every
//! shape a broker can deliver produced between its halves (run B): null values (tombstones)
//! on three topics, an empty value, non-UTF-8 bytes, a non-UTF-8 key holding a NUL, no key,
//! JSON nested 5,000 levels deep, NUL characters in strings and object keys, an identifier
//! longer than a primary key may be, numbers out of range, valid events with odd keys, a
//! record exactly at `HMIS_MAX_RECORD_BYTES`, one byte over it, and one far over it.
//!
//! Both runs are the real binary (`hmis-flow run --clock event --until-caught-up`) against
//! the real broker and PostgreSQL; B gets its record limit from the `HMIS_MAX_RECORD_BYTES`
//! variable. Checked: both exit 0; every hostile record has its dead letter with its reason,
//! encodings, key and payload, stored and published; every table, every other dead letter
//! and every derived event and alert of B equals A's.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Value};

use common::{
    exclusive, private_config, query_texts, read_topic, rt, Pipeline, Scratch, TABLES,
    VOLATILE_COLUMNS,
};
use hmis_flow::config::Config;
use hmis_flow::workload::{generate_labeled, WorkloadConfig};

const START_MS: u64 = 1_795_687_200_000; // 2026-11-26T10:00:00Z
const LIMIT: usize = 32 * 1024;

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// What a hostile record must become.
#[derive(Clone, Debug)]
struct Want {
    reason: &'static str,
    payload_encoding: &'static str,
    key_encoding: &'static str,
    /// The stored payload is cut (a record far over every limit).
    cut: bool,
}

fn dead(reason: &'static str, payload_encoding: &'static str) -> Want {
    Want {
        reason,
        payload_encoding,
        key_encoding: "utf8",
        cut: false,
    }
}

struct Hostile {
    what: &'static str,
    topic: &'static str,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    want: Want,
}

fn task(wid: &str, tid: &str) -> Value {
    json!({"eventId": format!("hostile-{tid}"), "eventType": "TASK_CREATED",
           "eventTime": "2026-11-26T10:01:00.000Z", "taskInstanceId": tid,
           "workflowInstanceId": wid, "patientId": "p-hostile", "taskDefId": "triage"})
}

/// A valid TASK_CREATED for an unknown workflow, padded (errorMessage) so that key + value
/// is exactly `size` bytes.
fn padded_task(key: &[u8], tid: &str, size: usize) -> Vec<u8> {
    let mut doc = task(&format!("w-ghost-{tid}"), tid);
    doc["errorMessage"] = json!("");
    let bare = serde_json::to_vec(&doc).unwrap().len() + key.len();
    doc["errorMessage"] = json!("x".repeat(size - bare));
    let v = serde_json::to_vec(&doc).unwrap();
    assert_eq!(v.len() + key.len(), size);
    v
}

fn hostile_records() -> Vec<Hostile> {
    let tasks = "workflow-task-events";
    let j = |v: Value| Some(serde_json::to_vec(&v).unwrap());
    let mut nul_name = task("w-x", "t-nul");
    nul_name["taskName"] = json!("a\u{0}b");
    let mut long_id = task("w-x", "t-long");
    long_id["taskInstanceId"] = json!("t".repeat(1000));
    let mut attempt = task("w-x", "t-attempt");
    attempt["attempt"] = json!(4_294_967_295u64);
    let order_nul = json!({"eventId": "hostile-o1", "eventType": "ORDER_CREATED",
        "eventTime": "2026-11-26T10:01:00.000Z", "orderId": "o-hostile", "patientId": "p-1",
        "orderType": "LAB_TEST", "orderStatus": "PROPOSED", "actor": "dr-x",
        "metadata": {"actorRole": "PHYSICIAN", "no\u{0}te": 1}});
    let metric = br#"{"eventId":"hostile-m1","eventType":"PERFORMANCE_METRIC","eventTime":"2026-11-26T10:01:00.000Z","component":"db","metricName":"kafka.consumer.lag","value":1e400,"unit":"messages"}"#;
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let bad_key = vec![0xff, 0x00, 0xfe];
    vec![
        Hostile {
            what: "null value on tasks",
            topic: tasks,
            key: Some(b"k-null".to_vec()),
            value: None,
            want: dead("INVALID_JSON", "null"),
        },
        Hostile {
            what: "null value on orders",
            topic: "workflow-order-events",
            key: Some(b"o-null".to_vec()),
            value: None,
            want: dead("INVALID_JSON", "null"),
        },
        Hostile {
            what: "null value on system",
            topic: "system-events",
            key: Some(b"c-null".to_vec()),
            value: None,
            want: dead("INVALID_JSON", "null"),
        },
        Hostile {
            what: "empty value",
            topic: tasks,
            key: Some(b"k-empty".to_vec()),
            value: Some(vec![]),
            want: dead("INVALID_JSON", "utf8"),
        },
        Hostile {
            what: "non-UTF-8 value",
            topic: tasks,
            key: Some(b"k-bin".to_vec()),
            value: Some(vec![0xff, 0xfe, 0x00, 0x80]),
            want: dead("INVALID_JSON", "base64"),
        },
        Hostile {
            what: "non-UTF-8 key with a NUL",
            topic: tasks,
            key: Some(bad_key.clone()),
            value: Some(b"{not json".to_vec()),
            want: Want {
                key_encoding: "base64",
                ..dead("INVALID_JSON", "utf8")
            },
        },
        Hostile {
            what: "no key",
            topic: tasks,
            key: None,
            value: Some(b"not json".to_vec()),
            want: dead("INVALID_JSON", "utf8"),
        },
        Hostile {
            what: "5,000 levels of nesting",
            topic: tasks,
            key: Some(b"k-deep".to_vec()),
            value: Some(deep.into_bytes()),
            want: dead("INVALID_JSON", "utf8"),
        },
        Hostile {
            what: "a NUL in a string",
            topic: tasks,
            key: Some(b"k-nul".to_vec()),
            value: j(nul_name),
            want: dead("SCHEMA_VIOLATION", "utf8"),
        },
        Hostile {
            what: "a NUL in a metadata key",
            topic: "workflow-order-events",
            key: Some(b"o-hostile".to_vec()),
            value: j(order_nul),
            want: dead("SCHEMA_VIOLATION", "utf8"),
        },
        Hostile {
            what: "an identifier of 1,000 bytes",
            topic: tasks,
            key: Some(b"k-long".to_vec()),
            value: j(long_id),
            want: dead("SCHEMA_VIOLATION", "utf8"),
        },
        Hostile {
            what: "attempt past PostgreSQL's integer",
            topic: tasks,
            key: Some(b"t-attempt".to_vec()),
            value: j(attempt),
            want: dead("SCHEMA_VIOLATION", "utf8"),
        },
        Hostile {
            what: "a number past f64",
            topic: "system-events",
            key: Some(b"db".to_vec()),
            value: Some(metric.to_vec()),
            want: dead("INVALID_JSON", "utf8"),
        },
        Hostile {
            what: "a valid event with a non-UTF-8 key, for an unknown workflow",
            topic: tasks,
            key: Some(vec![0xc3, 0x28]),
            value: j(task("w-ghost-1", "t-ghost-1")),
            want: Want {
                key_encoding: "base64",
                ..dead("UNKNOWN_WORKFLOW", "utf8")
            },
        },
        Hostile {
            what: "a valid event without a key, for an unknown workflow",
            topic: tasks,
            key: None,
            value: j(task("w-ghost-2", "t-ghost-2")),
            want: dead("UNKNOWN_WORKFLOW", "utf8"),
        },
        Hostile {
            what: "a record exactly at the size limit",
            topic: tasks,
            key: Some(b"k-at".to_vec()),
            value: Some(padded_task(b"k-at", "t-at", LIMIT)),
            want: dead("UNKNOWN_WORKFLOW", "utf8"),
        },
        Hostile {
            what: "a record one byte over the size limit",
            topic: tasks,
            key: Some(b"k-over".to_vec()),
            value: Some(padded_task(b"k-over", "t-over", LIMIT + 1)),
            want: dead("SCHEMA_VIOLATION", "utf8"),
        },
        Hostile {
            what: "a record far over every limit",
            topic: tasks,
            key: Some(b"k-huge".to_vec()),
            value: Some(padded_task(b"k-huge", "t-huge", 400 * 1024)),
            want: Want {
                cut: true,
                ..dead("SCHEMA_VIOLATION", "utf8")
            },
        },
    ]
}

/// Produces the hostile records (each to partition 0 of its topic); returns each one's offset.
fn produce_hostile(cfg: &Config, records: &[Hostile]) -> Vec<i64> {
    rt().block_on(async {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &cfg.brokers)
            .set("enable.idempotence", "true")
            .set("compression.type", "lz4")
            .create()
            .unwrap();
        let mut offsets = Vec::new();
        for h in records {
            let topic = topic_name(cfg, h.topic);
            let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).partition(0);
            if let Some(k) = &h.key {
                rec = rec.key(k.as_slice());
            }
            if let Some(v) = &h.value {
                rec = rec.payload(v.as_slice());
            }
            let delivered = producer
                .send(rec, Duration::from_secs(30))
                .await
                .unwrap_or_else(|(e, _)| panic!("producing {}: {e}", h.what));
            assert_eq!(delivered.partition, 0);
            offsets.push(delivered.offset);
        }
        offsets
    })
}

fn topic_name<'a>(cfg: &'a Config, default: &str) -> &'a str {
    hmis_dataflows::events::InputTopic::ALL
        .into_iter()
        .find(|r| r.default_name() == default)
        .map(|r| cfg.topics.input(r))
        .unwrap()
}

/// Rows of `table` as JSON text without the volatile columns and the input positions (the
/// hostile records shift the offsets of the records after them; the topics are private).
fn rows(cfg: &Config, table: &str) -> Vec<String> {
    let mut drop: Vec<String> = VOLATILE_COLUMNS.iter().map(|c| format!("'{c}'")).collect();
    drop.extend([
        "'source_partition'".into(),
        "'source_offset'".into(),
        "'source_topic'".into(),
    ]);
    query_texts(
        cfg,
        &format!(
            "SELECT (to_jsonb(t) - ARRAY[{}]::text[])::text FROM {table} t",
            drop.join(",")
        ),
    )
}

/// (reason, key, payload) of every dead letter, with its (topic suffix, partition, offset).
fn dead_letters(cfg: &Config) -> Vec<(String, String, i32, i64, Value)> {
    query_texts(
        cfg,
        "SELECT to_jsonb(d)::text FROM dead_letters d ORDER BY topic, partition, \"offset\"",
    )
    .into_iter()
    .map(|text| {
        let v: Value = serde_json::from_str(&text).unwrap();
        let topic = v["topic"].as_str().unwrap();
        let suffix = topic.rsplit('.').next().unwrap().to_string();
        (
            suffix,
            v["reason"].as_str().unwrap().to_string(),
            v["partition"].as_i64().unwrap() as i32,
            v["offset"].as_i64().unwrap(),
            v,
        )
    })
    .collect()
}

/// (eventId, payload) of a topic's records.
fn published(cfg: &Config, topic: &str) -> BTreeMap<String, String> {
    read_topic(&cfg.brokers, topic)
        .into_iter()
        .map(|m| (m.event_id, m.payload))
        .collect()
}

#[test]
fn every_input_shape_is_processed_or_dead_lettered_and_the_run_goes_on() {
    let _one = exclusive();
    let brokers = common::env("HMIS_TEST_BROKERS");
    let database = common::env("HMIS_TEST_DATABASE_URL");
    let a = private_config("hostile_a", &brokers, &database);
    let b = private_config("hostile_b", &brokers, &database);
    let workload: Vec<_> = generate_labeled(&WorkloadConfig {
        seed: 41,
        workflows: 30,
        start_ms: START_MS,
        bad_record_ratio: 0.02,
        duplicate_ratio: 0.02,
    })
    .into_iter()
    .map(|(_, r)| r)
    .collect();
    let (first, second) = workload.split_at(workload.len() / 2);
    let hostile = hostile_records();
    rt().block_on(hmis_flow::demo::produce(&a, &workload))
        .unwrap();
    rt().block_on(hmis_flow::demo::produce(&b, first)).unwrap();
    let offsets = produce_hostile(&b, &hostile);
    rt().block_on(hmis_flow::demo::produce(&b, second)).unwrap();

    let scratch = Scratch::new("hostile");
    let args = ["--until-caught-up", "--clock", "event"];
    let mut run_a = Pipeline::start(&a, &scratch, "a", &args);
    run_a.expect_success(Duration::from_secs(300));
    let limit = LIMIT.to_string();
    let mut run_b = Pipeline::start_with_env(
        &b,
        &scratch,
        "b",
        &args,
        &[("HMIS_MAX_RECORD_BYTES", limit.as_str())],
    );
    run_b.expect_success(Duration::from_secs(300));

    // Every hostile record: its dead letter, with its reason, encodings, key and payload.
    let stored_b = dead_letters(&b);
    let mut problems = Vec::new();
    let mut hostile_positions = Vec::new();
    for (h, offset) in hostile.iter().zip(&offsets) {
        let suffix = h.topic;
        hostile_positions.push((suffix.to_string(), *offset));
        let Some((_, reason, _, _, v)) = stored_b
            .iter()
            .find(|(s, _, p, o, _)| s == suffix && *p == 0 && o == offset)
        else {
            problems.push(format!("{}: no dead letter", h.what));
            continue;
        };
        let w = &h.want;
        let mut check = |ok: bool, what: String| {
            if !ok {
                problems.push(format!("{}: {what}; got {v}", h.what));
            }
        };
        check(reason == w.reason, format!("reason, want {}", w.reason));
        check(
            v["payload_encoding"] == w.payload_encoding,
            format!("payload_encoding, want {}", w.payload_encoding),
        );
        check(
            v["key_encoding"] == w.key_encoding,
            format!("key_encoding, want {}", w.key_encoding),
        );
        check(
            !v["detail"].as_str().unwrap_or_default().is_empty(),
            "an empty detail".into(),
        );
        let want_key = match (&h.key, w.key_encoding) {
            (None, _) if w.reason == "UNKNOWN_WORKFLOW" => v["key"].clone(), // the entity's id
            (None, _) => Value::Null,
            (Some(k), "base64") => json!(b64(k)),
            (Some(k), _) => json!(String::from_utf8(k.clone()).unwrap()),
        };
        check(v["key"] == want_key, format!("key, want {want_key}"));
        let payload = v["payload"].as_str().unwrap_or_default();
        match (&h.value, w.payload_encoding) {
            (None, _) => check(payload.is_empty(), "a null value's payload is empty".into()),
            (Some(bytes), "base64") => check(payload == b64(bytes), "base64 payload".into()),
            (Some(bytes), _) if w.cut => {
                let text = std::str::from_utf8(bytes).unwrap();
                check(
                    payload.len() < text.len()
                        && text.starts_with(payload)
                        && payload.len() <= hmis_dataflows::output::DEAD_LETTER_PAYLOAD_MAX,
                    "a payload cut to its head".into(),
                );
                check(
                    v["detail"].as_str().unwrap_or_default().contains("cut"),
                    "the detail says the payload was cut".into(),
                );
            }
            (Some(bytes), _) => check(
                payload.as_bytes() == bytes.as_slice(),
                "the payload byte for byte".into(),
            ),
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // Every dead letter is published, the hostile ones included.
    let topic_b = published(&b, &b.topics.dead_letter);
    assert_eq!(
        topic_b.len(),
        stored_b.len(),
        "one published dead letter per stored one"
    );
    let published_positions: Vec<(String, i64)> = topic_b
        .values()
        .map(|p| {
            let v: Value = serde_json::from_str(p).unwrap();
            (
                v["topic"]
                    .as_str()
                    .unwrap()
                    .rsplit('.')
                    .next()
                    .unwrap()
                    .to_string(),
                v["offset"].as_i64().unwrap(),
            )
        })
        .collect();
    for pos in &hostile_positions {
        assert!(
            published_positions.contains(pos),
            "dead letter at {pos:?} published"
        );
    }

    // The good records' results are unchanged.
    let other_dead = |stored: Vec<(String, String, i32, i64, Value)>, skip: &[(String, i64)]| {
        let mut v: Vec<String> = stored
            .into_iter()
            .filter(|(s, _, p, o, _)| !(*p == 0 && skip.contains(&(s.clone(), *o))))
            .map(|(s, r, _, _, v)| format!("{s} {r} {} {}", v["key"], v["payload"]))
            .collect();
        v.sort();
        v
    };
    let dead_a = other_dead(dead_letters(&a), &[]);
    assert!(!dead_a.is_empty(), "the workload has malformed records");
    assert_eq!(
        other_dead(stored_b, &hostile_positions),
        dead_a,
        "the workload's own dead letters"
    );
    for table in TABLES.iter().filter(|t| **t != "dead_letters") {
        assert_eq!(rows(&b, table), rows(&a, table), "table {table}");
    }
    assert!(!rows(&a, "workflow_instances").is_empty());
    let derived_a = published(&a, &a.topics.derived);
    assert!(!derived_a.is_empty());
    assert_eq!(
        published(&b, &b.topics.derived),
        derived_a,
        "derived events"
    );
    assert_eq!(
        published(&b, &b.topics.alerts),
        published(&a, &a.topics.alerts),
        "alerts"
    );
    common::schemas::assert_topics_match_schemas(&b);
    scratch.done();
}
