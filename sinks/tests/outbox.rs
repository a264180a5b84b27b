//! The outbox publisher against Kafka: a real broker from `HMIS_TEST_BROKERS` (the test fails
//! when it is unset) and librdkafka's in-process mock cluster, each with a real PostgreSQL from
//! `HMIS_TEST_DATABASE_URL` and unique topic names.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use hmis_dataflows::output::OutTopic;
use hmis_sinks::outbox::{partition_for, GROUP_HEADER, SEQ_HEADER};
use hmis_sinks::{create_topics, Publisher, PublisherConfig, SinkError, TopicNames, TopicSpec};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Headers;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

/// librdkafka's mock cluster on a thread of its own (it is not `Send`).
struct MockKafka {
    bootstrap: String,
    commands: mpsc::Sender<(String, i32, mpsc::Sender<()>)>,
    thread: Option<JoinHandle<()>>,
}

impl MockKafka {
    fn start() -> MockKafka {
        let (commands, requests) = mpsc::channel::<(String, i32, mpsc::Sender<()>)>();
        let (bootstrap_tx, bootstrap_rx) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            let cluster = MockCluster::new(1).expect("mock cluster");
            bootstrap_tx.send(cluster.bootstrap_servers()).unwrap();
            // Ends when the sender is dropped.
            for (topic, partitions, done) in requests {
                cluster
                    .create_topic(&topic, partitions, 1)
                    .expect("mock topic");
                let _ = done.send(());
            }
        });
        MockKafka {
            bootstrap: bootstrap_rx.recv().unwrap(),
            commands,
            thread: Some(thread),
        }
    }

    fn create_topic(&self, topic: &str, partitions: i32) {
        let (done, wait) = mpsc::channel();
        self.commands
            .send((topic.to_string(), partitions, done))
            .unwrap();
        wait.recv().unwrap();
    }
}

impl Drop for MockKafka {
    fn drop(&mut self) {
        let (dummy, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.commands, dummy));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

enum Broker {
    Real(String),
    Mock(MockKafka),
}

impl Broker {
    fn bootstrap(&self) -> String {
        match self {
            Broker::Real(brokers) => brokers.clone(),
            Broker::Mock(mock) => mock.bootstrap.clone(),
        }
    }

    async fn create(&self, specs: &[TopicSpec]) {
        match self {
            Broker::Real(brokers) => {
                create_topics(brokers, specs, 1)
                    .await
                    .expect("create topics");
            }
            Broker::Mock(mock) => {
                for spec in specs {
                    mock.create_topic(&spec.name, spec.partitions);
                }
            }
        }
    }
}

/// One consumed record.
#[derive(Debug)]
struct Seen {
    topic: String,
    partition: i32,
    key: Option<String>,
    event_id: String,
    seq: i64,
}

/// Every record in the topics, read from the beginning to the end of each partition.
fn read_all(brokers: &str, topics: &[(&str, i32)]) -> Vec<Seen> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "hmis-sinks-test-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("fetch.wait.max.ms", "20")
        .create()
        .unwrap();
    // Watermarks first: requests queue behind parked fetches once partitions are assigned.
    let mut plan = Vec::new();
    for (topic, partitions) in topics {
        let mut assignment = TopicPartitionList::new();
        let mut reading = HashSet::new();
        for partition in 0..*partitions {
            let (low, high) = consumer
                .fetch_watermarks(topic, partition, Duration::from_secs(10))
                .unwrap();
            if high > low {
                assignment
                    .add_partition_offset(topic, partition, Offset::Beginning)
                    .unwrap();
                reading.insert(partition);
            }
        }
        plan.push((topic, assignment, reading));
    }
    let mut seen = Vec::new();
    for (topic, assignment, mut reading) in plan {
        if reading.is_empty() {
            continue;
        }
        consumer.assign(&assignment).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !reading.is_empty() {
            assert!(Instant::now() < deadline, "reading {topic} timed out");
            match consumer.poll(Duration::from_millis(100)) {
                None => {}
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    reading.remove(&p);
                }
                Some(Err(e)) => panic!("consume {topic}: {e}"),
                Some(Ok(m)) => {
                    let Some(headers) = m.headers() else {
                        continue; // written by someone else
                    };
                    let header = |name: &str| {
                        headers
                            .iter()
                            .find(|h| h.key == name)
                            .and_then(|h| h.value)
                            .map(|v| String::from_utf8(v.to_vec()).unwrap())
                    };
                    assert_eq!(header(GROUP_HEADER).as_deref(), Some("pub"));
                    let payload = m.payload_view::<str>().unwrap().unwrap();
                    let event_id = payload
                        .trim_start_matches(r#"{"eventId":""#)
                        .trim_end_matches(r#""}"#)
                        .to_string();
                    seen.push(Seen {
                        topic: topic.to_string(),
                        partition: m.partition(),
                        key: m.key_view::<str>().map(|k| k.unwrap().to_string()),
                        event_id,
                        seq: header(SEQ_HEADER).unwrap().parse().unwrap(),
                    });
                }
            }
        }
    }
    seen
}

fn records(prefix: &str, count: usize) -> Vec<hmis_dataflows::output::OutRecord> {
    (0..count)
        .map(|i| match i % 10 {
            // alerts keyed by source, dead-letter documents without a key
            7 => record(
                OutTopic::Alerts,
                &format!("{prefix}-a{i}"),
                Some(&format!("monitor-{}", i % 3)),
            ),
            9 => record(OutTopic::DeadLetter, &format!("{prefix}-d{i}"), None),
            _ => record(
                OutTopic::Derived,
                &format!("{prefix}-e{i}"),
                Some(&format!("wf-{}", i % 17)),
            ),
        })
        .collect()
}

async fn outbox_len(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM hmis_outbox", &[])
        .await
        .unwrap()
        .get(0)
}

/// Output topics with names of their own, created with `partitions` (derived, alerts, dead
/// letter); returns the names and each topic's (name, partition count).
async fn output_topics(broker: &Broker, partitions: [i32; 3]) -> (TopicNames, Vec<(String, i32)>) {
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let names = TopicNames {
        derived: format!("derived-{suffix}"),
        alerts: format!("alerts-{suffix}"),
        dead_letter: format!("dead-letter-{suffix}"),
    };
    let layout: Vec<(String, i32)> = [&names.derived, &names.alerts, &names.dead_letter]
        .into_iter()
        .cloned()
        .zip(partitions)
        .collect();
    let specs: Vec<TopicSpec> = layout.iter().map(|(n, p)| TopicSpec::new(n, *p)).collect();
    broker.create(&specs).await;
    (names, layout)
}

/// Publish, crash before the delete commits, publish again: every record exactly once.
async fn round_trip(broker: Broker) {
    let db = TestDb::new().await;
    let (names, layout) = output_topics(&broker, [6, 3, 2]).await;
    let brokers = broker.bootstrap();

    let mut sink = db.claimed_sink("pub").await;
    let mut first = batch(T0);
    first.records = records("one", 300);
    sink.apply("pub", &first).await.unwrap();

    let mut pg = db.client().await;
    // What the outbox held before publishing: restored below to simulate a crash after
    // producing but before the delete committed.
    pg.batch_execute("CREATE TABLE outbox_before AS SELECT * FROM hmis_outbox")
        .await
        .unwrap();

    let mut config = PublisherConfig::new(&brokers, "pub");
    config.topics = names.clone();
    config.epoch = sink.epoch();
    config.batch_size = 64; // several transactions
    config.timeout = Duration::from_secs(20);

    let mut publisher = Publisher::recover(config.clone()).await.unwrap();
    assert!(publisher.positions().is_empty(), "fresh topics");
    assert_eq!(publisher.publish_pending(&mut pg).await.unwrap(), 300);
    assert_eq!(outbox_len(&pg).await, 0);
    assert_eq!(publisher.publish_pending(&mut pg).await.unwrap(), 0);
    drop(publisher);

    // The crash: every published row is back; new rows arrive after it.
    pg.batch_execute("INSERT INTO hmis_outbox SELECT * FROM outbox_before")
        .await
        .unwrap();
    let mut second = batch(T0 + 1);
    second.records = records("two", 50);
    sink.apply("pub", &second).await.unwrap();

    // Someone else wrote to the derived topic since: recovery must look past their records.
    let foreign: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    for partition in 0..6 {
        for i in 0..20 {
            foreign
                .send(
                    FutureRecord::<str, str>::to(&names.derived)
                        .partition(partition)
                        .key("other")
                        .payload(&format!("foreign {i}")),
                    Duration::from_secs(10),
                )
                .await
                .unwrap();
        }
    }

    let mut publisher = Publisher::recover(config.clone()).await.unwrap();
    // A position for every partition the first batch went to, at its highest seq there.
    let expected: HashSet<(String, i32)> = first
        .records
        .iter()
        .map(|r| {
            let topic = names.name(r.topic).to_string();
            let placement = r.key.as_deref().unwrap_or(&r.event_id);
            let count = layout.iter().find(|(n, _)| *n == topic).unwrap().1;
            (topic, partition_for(placement.as_bytes(), count))
        })
        .collect();
    let recovered: HashSet<(String, i32)> = publisher.positions().keys().cloned().collect();
    assert_eq!(recovered, expected);
    assert_eq!(publisher.publish_pending(&mut pg).await.unwrap(), 50);
    assert_eq!(outbox_len(&pg).await, 0);

    let brokers_for_read = brokers.clone();
    let layout_owned = layout.clone();
    let seen = tokio::task::spawn_blocking(move || {
        let topics: Vec<(&str, i32)> = layout_owned.iter().map(|(n, p)| (n.as_str(), *p)).collect();
        read_all(&brokers_for_read, &topics)
    })
    .await
    .unwrap();

    // Exactly once.
    assert_eq!(seen.len(), 350, "no duplicates, nothing lost");
    let ids: HashSet<&str> = seen.iter().map(|s| s.event_id.as_str()).collect();
    assert_eq!(ids.len(), 350);

    // Java-compatible placement, and per key the production (seq) order.
    let counts: HashMap<&str, i32> = layout.iter().map(|(n, p)| (n.as_str(), *p)).collect();
    let mut per_key: BTreeMap<(String, String), Vec<i64>> = BTreeMap::new();
    for s in &seen {
        let placement = s.key.clone().unwrap_or_else(|| s.event_id.clone());
        assert_eq!(
            s.partition,
            partition_for(placement.as_bytes(), counts[s.topic.as_str()]),
            "{s:?}"
        );
        if s.topic == names.dead_letter {
            assert_eq!(s.key, None, "dead-letter documents here have no key");
        }
        per_key
            .entry((s.topic.clone(), placement))
            .or_default()
            .push(s.seq);
    }
    for ((topic, key), seqs) in &per_key {
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "{topic}/{key} out of order: {seqs:?}"
        );
    }

    // A successor claims the group: this publisher must stop.
    let mut successor = db.sink().await;
    successor.claim("pub", "successor").await.unwrap();
    let err = publisher.publish_pending(&mut pg).await.unwrap_err();
    assert!(matches!(err, SinkError::Fenced { .. }), "{err}");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_round_trip_real_broker() {
    let brokers = std::env::var("HMIS_TEST_BROKERS")
        .ok()
        .filter(|brokers| !brokers.is_empty())
        .expect(
            "HMIS_TEST_BROKERS is not set: start the services with `scripts/services.sh start` \
             and `eval \"$(scripts/services.sh env)\"`, or run scripts/test.sh",
        );
    round_trip(Broker::Real(brokers)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_round_trip_mock_cluster() {
    round_trip(Broker::Mock(MockKafka::start())).await;
}

/// Publishing a flush from memory (`publish_inserted`) publishes exactly what it inserted;
/// and when rows of an earlier flush wait unseen (its commit succeeded, but the sink never
/// learnt what it inserted, as when a commit's answer is lost and the flush retried), it
/// reads the outbox instead, so they are published too, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_is_published_from_memory_and_rows_waiting_unseen_are_not_skipped() {
    let broker = Broker::Mock(MockKafka::start());
    let db = TestDb::new().await;
    let (names, layout) = output_topics(&broker, [4, 1, 1]).await;
    let brokers = broker.bootstrap();

    let mut sink = db.claimed_sink("pub").await;
    let mut config = PublisherConfig::new(&brokers, "pub");
    config.topics = names.clone();
    config.epoch = sink.epoch();
    config.timeout = Duration::from_secs(20);
    let mut publisher = Publisher::recover(config).await.unwrap();
    let mut pg = db.client().await;

    // A flush published from memory.
    let mut first = batch(T0);
    first.records = records("a", 40);
    sink.apply("pub", &first).await.unwrap();
    let inserted = sink
        .take_outbox_inserted()
        .expect("known after a plain apply");
    assert_eq!(inserted.len(), 40);
    assert!(sink.take_outbox_inserted().is_none(), "taken once");
    let n = publisher
        .publish_inserted(&mut pg, &first.records, Some(inserted))
        .await
        .unwrap();
    assert_eq!(n, 40);
    assert_eq!(outbox_len(&pg).await, 0);

    // A flush whose inserted rows the publisher never hears of, then one it does.
    let mut unseen = batch(T0 + 1);
    unseen.records = records("b", 30);
    sink.apply("pub", &unseen).await.unwrap();
    drop(sink.take_outbox_inserted());
    let mut next = batch(T0 + 2);
    next.records = records("c", 20);
    sink.apply("pub", &next).await.unwrap();
    let inserted = sink.take_outbox_inserted().unwrap();
    assert_eq!(inserted.len(), 20);
    let n = publisher
        .publish_inserted(&mut pg, &next.records, Some(inserted))
        .await
        .unwrap();
    assert_eq!(n, 50, "the unseen flush's rows too");
    assert_eq!(outbox_len(&pg).await, 0);

    // A flush with a record published before: which rows it inserted is not known, and the
    // outbox is read instead.
    let mut again = batch(T0 + 3);
    again.records = records("d", 5);
    again.records.push(first.records[0].clone());
    sink.apply("pub", &again).await.unwrap();
    let inserted = sink.take_outbox_inserted();
    assert!(inserted.is_none(), "the repeat was not inserted again");
    let n = publisher
        .publish_inserted(&mut pg, &again.records, inserted)
        .await
        .unwrap();
    assert_eq!(n, 5);
    assert_eq!(outbox_len(&pg).await, 0);

    let topics = layout.clone();
    let seen = tokio::task::spawn_blocking(move || {
        let topics: Vec<(&str, i32)> = topics.iter().map(|(n, p)| (n.as_str(), *p)).collect();
        read_all(&brokers, &topics)
    })
    .await
    .unwrap();
    let ids: HashSet<&str> = seen.iter().map(|s| s.event_id.as_str()).collect();
    assert_eq!(seen.len(), 95, "each record once");
    assert_eq!(ids.len(), 95);
    db.drop().await;
}

/// Our partition choice equals librdkafka's own Java-compatible `murmur2` partitioner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_choice_matches_librdkafka_murmur2() {
    let mock = MockKafka::start();
    mock.create_topic("placement", 7);
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &mock.bootstrap)
        .set("partitioner", "murmur2")
        .create()
        .unwrap();
    for i in 0..200 {
        let key = format!("wf-{i}-{}", "x".repeat(i % 9));
        let (partition, _) = producer
            .send(
                FutureRecord::<str, str>::to("placement")
                    .key(&key)
                    .payload("p"),
                Duration::from_secs(10),
            )
            .await
            .map(|d| (d.partition, d.offset))
            .unwrap();
        assert_eq!(partition, partition_for(key.as_bytes(), 7), "key {key}");
    }
}
