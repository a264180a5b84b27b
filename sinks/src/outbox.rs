//! Moving `hmis_outbox` rows to Kafka exactly once, without broker transactions.
//!
//! ```text
//!   hmis_outbox (group, seq order)                      output partition p
//!   ┌─────┬──────────┬─────┐   produce, explicit p     ┌──────────────────────────┐
//!   │ seq │ topic/key│ ... │ ────────────────────────► │ ... [hmis-outbox-seq=41] │
//!   └─────┴──────────┴─────┘   header hmis-outbox-seq  └──────────────────────────┘
//!        ▲                     await every delivery,        │ on start: last message
//!        └──── DELETE seqs ◄── then delete in the same ─────┘ of ours per partition
//!                              transaction                    = published position
//! ```
//!
//! # The guarantee
//!
//! Each outbox row reaches its topic once, in `seq` order per partition, hence in the order
//! the rules produced the events of each key (all events of a workflow instance share the
//! key workflowInstanceId and so one partition).
//!
//! Why it holds:
//! - **One writer per group.** `PgSink::claim` gives every instance a new epoch;
//!   [`Publisher::publish_pending`] reads and deletes rows in a transaction that holds
//!   the group's progress row `FOR SHARE` and fails with [`SinkError::Fenced`] once the
//!   epoch is not [`PublisherConfig::epoch`] any more. A new owner's claim waits for a
//!   running publish to finish, so two publishers never overlap.
//! - **seq order is production order.** Rows are produced in `seq` order to partitions
//!   chosen up front, with an idempotent producer (`enable.idempotence`, `acks=all`) and
//!   `enable.gapless.guarantee`, so a partition holds a gap-free prefix of our records for
//!   it, and its last record of ours carries the highest seq published there.
//! - **Crash between produce and delete.** The rows stay in the outbox. On start (and
//!   after any publish error) [`Publisher::recover`] reads, for every partition of every
//!   output topic, the last message carrying our group's `hmis-outbox-group` header and
//!   takes its `hmis-outbox-seq` as the partition's published position; rows at or below
//!   it are deleted without producing them again.
//!
//! Assumptions: the partition count of an output topic does not change while rows are in
//! the outbox (keys would move); and a produce request whose outcome was never reported
//! (the process died mid-flight) has reached the broker, or failed, before the next
//! publisher reads the positions back, which holds for a restart but not for re-reading
//! within milliseconds. Event ids are deterministic, so consumers can deduplicate anyway.
//!
//! Partitions are chosen exactly as Kafka's Java client does by default (murmur2 of the
//! key, see [`partition_for`]), rather than librdkafka's CRC32 default, so hmis-flow places
//! keys where any other Kafka producer would. Records without a key are placed by their
//! event id and sent without a key.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use hmis_dataflows::output::{OutRecord, OutTopic};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio_postgres::{Client, Transaction};
use tracing::{debug, info, warn};

use crate::kafka::{self, KafkaClientConfig, KafkaOptions};
use crate::pg::{outbox_topic, OutboxRow};
use crate::SinkError;

/// Header carrying the record's `hmis_outbox.seq`, as decimal ASCII.
pub const SEQ_HEADER: &str = "hmis-outbox-seq";
/// Header carrying the pipeline group that published the record.
pub const GROUP_HEADER: &str = "hmis-outbox-group";
/// Header carrying the record's event id (also inside the payload), for consumers that
/// deduplicate without parsing.
pub const EVENT_ID_HEADER: &str = "hmis-event-id";

/// Names of the output topics; the defaults are the contract's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicNames {
    /// Derived events, key workflowInstanceId.
    pub derived: String,
    /// Alerts, key source.
    pub alerts: String,
    /// Rejected input records, key the input's key.
    pub dead_letter: String,
}

impl Default for TopicNames {
    fn default() -> Self {
        TopicNames {
            derived: "workflow-derived-events".into(),
            alerts: "system-alerts".into(),
            dead_letter: "workflow-dead-letter".into(),
        }
    }
}

impl TopicNames {
    /// The configured name of an output topic.
    pub fn name(&self, topic: OutTopic) -> &str {
        match topic {
            OutTopic::Derived => &self.derived,
            OutTopic::Alerts => &self.alerts,
            OutTopic::DeadLetter => &self.dead_letter,
        }
    }

    /// The configured name for a logical name stored in `hmis_outbox.topic`.
    fn resolve(&self, logical: &str) -> Option<&str> {
        [OutTopic::Derived, OutTopic::Alerts, OutTopic::DeadLetter]
            .into_iter()
            .find(|t| outbox_topic(*t) == logical)
            .map(|t| self.name(t))
    }

    fn all(&self) -> [&str; 3] {
        [&self.derived, &self.alerts, &self.dead_letter]
    }
}

/// How a [`Publisher`] connects and batches.
#[derive(Clone, Debug)]
pub struct PublisherConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// The pipeline group whose outbox rows to publish.
    pub group_id: String,
    /// Output topic names.
    pub topics: TopicNames,
    /// The epoch this instance claimed with `PgSink::claim`; publishing fails with
    /// [`SinkError::Fenced`] once another instance claimed the group. `None` skips the
    /// check (only for tools that run alone).
    pub epoch: Option<i64>,
    /// Outbox rows read, produced and deleted per transaction. Default 5000.
    pub batch_size: usize,
    /// The operator's librdkafka options (TLS, SASL, e.g. `compression.type`), for the
    /// producer and the recovery consumer alike. The settings the guarantee rests on
    /// (`enable.idempotence`, `acks`, `enable.gapless.guarantee`; the recovery consumer's
    /// group and reading mode) cannot be overridden.
    pub client_options: KafkaOptions,
    /// Limit for metadata, watermark and read-back calls during recovery. Default 30 s.
    pub timeout: Duration,
    /// How many messages back per partition recovery looks for one of ours when the last
    /// ones were written by someone else. Default 10 000.
    pub recover_scan_limit: i64,
}

impl PublisherConfig {
    /// Defaults for everything but the brokers and the group.
    pub fn new(brokers: impl Into<String>, group_id: impl Into<String>) -> PublisherConfig {
        PublisherConfig {
            brokers: brokers.into(),
            group_id: group_id.into(),
            topics: TopicNames::default(),
            epoch: None,
            batch_size: 5000,
            client_options: KafkaOptions::default(),
            timeout: Duration::from_secs(30),
            recover_scan_limit: 10_000,
        }
    }
}

/// Publishes a group's outbox rows to Kafka; see the module docs for the guarantee.
pub struct Publisher {
    config: PublisherConfig,
    producer: FutureProducer,
    /// Partition count per output topic name.
    partitions: HashMap<String, i32>,
    /// Highest seq of ours in each (topic name, partition).
    positions: HashMap<(String, i32), i64>,
    /// Positions may be behind Kafka (an error or a cancelled publish): re-read them first.
    stale: bool,
    /// Every row of the group at or below this seq is deleted: the next read starts after
    /// it. Without it each read walked the index from the group's first entry over every
    /// row deleted since the last vacuum (a queue's dead tuples): in a catch-up that read
    /// was 40 % of PostgreSQL's time (docs/engine.md, session 12). Seqs of one group commit
    /// in increasing order (one fenced writer, one transaction at a time), so nothing can
    /// appear below it later; it goes back to 0 whenever the positions are re-read.
    deleted_through: i64,
}

impl Publisher {
    /// Connects and reads back what was already published: the last `hmis-outbox-seq` of
    /// this group in every partition of every output topic.
    pub async fn recover(config: PublisherConfig) -> Result<Publisher, SinkError> {
        let producer = create_producer(&config)?;
        let mut publisher = Publisher {
            config,
            producer,
            partitions: HashMap::new(),
            positions: HashMap::new(),
            stale: true,
            deleted_through: 0,
        };
        publisher.refresh().await?;
        Ok(publisher)
    }

    /// Highest seq of this group known to be in each (topic, partition).
    pub fn positions(&self) -> &HashMap<(String, i32), i64> {
        &self.positions
    }

    /// Publishes every outbox row of the group, in seq order, batch by batch: produce,
    /// await all deliveries, delete. Rows already in Kafka are deleted without producing.
    /// Returns how many records were produced.
    ///
    /// After an error nothing is lost: the rows not yet deleted stay, and the next call
    /// first re-reads the published positions (recreating the producer if it failed).
    pub async fn publish_pending(&mut self, client: &mut Client) -> Result<usize, SinkError> {
        let mut produced = 0;
        loop {
            if self.stale {
                self.refresh().await?;
            }
            let (batch_produced, rows) = self.publish_batch(client).await?;
            produced += batch_produced;
            if rows < self.config.batch_size {
                return Ok(produced);
            }
        }
    }

    /// Publishes what the last flush inserted into the outbox (`inserted`, from
    /// [`crate::PgSink::take_outbox_inserted`], indexing `records`, that flush's records),
    /// producing them from memory instead of reading them back. Falls back to
    /// [`Publisher::publish_pending`] whenever that would not publish every pending row:
    /// the positions are stale, the inserted rows are unknown, or rows of the group other
    /// than these wait (e.g. of an apply whose commit succeeded unseen before a retry).
    /// Returns how many records were produced.
    pub async fn publish_inserted(
        &mut self,
        client: &mut Client,
        records: &[OutRecord],
        inserted: Option<Vec<OutboxRow>>,
    ) -> Result<usize, SinkError> {
        let Some(mut inserted) = inserted.filter(|i| !i.is_empty() && !self.stale) else {
            return self.publish_pending(client).await;
        };
        inserted.sort_unstable_by_key(|r| r.seq);
        let pending: Option<Vec<Pending>> = inserted
            .iter()
            .map(|row| {
                let r = records.get(row.index)?;
                Some(Pending {
                    seq: row.seq,
                    topic: outbox_topic(r.topic),
                    key: r.key.as_deref(),
                    event_id: &r.event_id,
                    payload: &r.payload,
                })
            })
            .collect();
        let Some(pending) = pending else {
            warn!("an inserted outbox row is not among the flush's records; reading the outbox");
            return self.publish_pending(client).await;
        };

        let group_id = self.config.group_id.clone();
        let (tx, after) = self.begin(client).await?;
        // Nothing else may wait below these rows (above them nothing can exist yet: one
        // writer, and its next flush comes after this call).
        let first = pending[0].seq;
        let others: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM hmis_outbox
                                WHERE group_id = $1 AND seq > $2 AND seq < $3)",
                &[&group_id, &after, &first],
            )
            .await
            .map_err(SinkError::pg("check hmis_outbox"))?
            .get(0);
        if others || first <= after {
            tx.commit()
                .await
                .map_err(SinkError::pg("end outbox publish"))?;
            debug!(group_id, "other outbox rows pending; reading the outbox");
            return self.publish_pending(client).await;
        }
        self.publish_in(tx, &pending).await
    }

    /// One transaction: fence check, read a batch, produce it, delete it. Returns (records
    /// produced, rows handled).
    async fn publish_batch(&mut self, client: &mut Client) -> Result<(usize, usize), SinkError> {
        let group_id = self.config.group_id.clone();
        let (tx, after) = self.begin(client).await?;
        let limit = i64::try_from(self.config.batch_size).unwrap_or(i64::MAX);
        let rows = tx
            .query(
                "SELECT seq, topic, key, event_id, payload FROM hmis_outbox
                 WHERE group_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                &[&group_id, &after, &limit],
            )
            .await
            .map_err(SinkError::pg("read hmis_outbox"))?;
        if rows.is_empty() {
            tx.commit()
                .await
                .map_err(SinkError::pg("end outbox publish"))?;
            self.deleted_through = after;
            return Ok((0, 0));
        }
        let records: Vec<Pending> = rows
            .iter()
            .map(|row| Pending {
                seq: row.get(0),
                topic: row.get(1),
                key: row.get(2),
                event_id: row.get(3),
                payload: row.get(4),
            })
            .collect();
        let produced = self.publish_in(tx, &records).await?;
        Ok((produced, records.len()))
    }

    /// Begins a publish transaction that holds the group's progress row `FOR SHARE` until
    /// it ends (a new owner's claim waits for this publish), checks the epoch, and returns
    /// it with the seq reading continues after.
    async fn begin<'c>(&self, client: &'c mut Client) -> Result<(Transaction<'c>, i64), SinkError> {
        let tx = client
            .transaction()
            .await
            .map_err(SinkError::pg("begin outbox publish"))?;
        let group_id = &self.config.group_id;
        if let Some(ours) = self.config.epoch {
            let current: Option<i64> = tx
                .query_opt(
                    "SELECT epoch FROM hmis_pipeline_progress WHERE group_id = $1 FOR SHARE",
                    &[group_id],
                )
                .await
                .map_err(SinkError::pg(format!("check epoch of group {group_id}")))?
                .map(|row| row.get(0));
            SinkError::check_epoch(group_id, ours, current)?;
        }
        Ok((tx, self.deleted_through))
    }

    /// Produces `records` (ascending seqs, above `deleted_through`) in the transaction that
    /// holds the progress row, deletes their rows and commits. Returns how many were
    /// produced (those already in Kafka are not).
    async fn publish_in(
        &mut self,
        tx: Transaction<'_>,
        records: &[Pending<'_>],
    ) -> Result<usize, SinkError> {
        // Until the deliveries are confirmed and the rows deleted, the positions may be
        // behind: a cancelled or failed call leaves them marked stale.
        self.stale = true;
        let produced = self.produce(records).await?;
        let group_id = &self.config.group_id;
        let seqs: Vec<i64> = records.iter().map(|r| r.seq).collect();
        // The rows are ascending, from just above `deleted_through`: bounding the range
        // keeps the delete a short index range scan instead of a search of the group's
        // whole (dead-tuple laden) key range for each seq.
        let (low, high) = (seqs[0], seqs[seqs.len() - 1]);
        tx.execute(
            "DELETE FROM hmis_outbox
             WHERE group_id = $1 AND seq >= $2 AND seq <= $3 AND seq = ANY($4)",
            &[group_id, &low, &high, &seqs],
        )
        .await
        .map_err(SinkError::pg("delete published hmis_outbox rows"))?;
        tx.commit()
            .await
            .map_err(SinkError::pg("commit outbox publish"))?;
        self.stale = false;
        self.deleted_through = high;
        debug!(
            group_id,
            produced,
            skipped = records.len() - produced,
            "outbox batch published"
        );
        Ok(produced)
    }

    /// Produces the records not yet in Kafka, in order, and waits for every delivery.
    async fn produce(&mut self, records: &[Pending<'_>]) -> Result<usize, SinkError> {
        let mut in_flight: VecDeque<InFlight> = VecDeque::new();
        let mut first_error: Option<SinkError> = None;
        let mut produced = 0;
        let group = self.config.group_id.as_bytes();

        for record in records {
            let Some(topic) = self.config.topics.resolve(record.topic) else {
                first_error = Some(SinkError::Topic {
                    topic: record.topic.to_string(),
                    detail: format!("outbox seq {} names no output topic", record.seq),
                });
                break;
            };
            let Some(&count) = self.partitions.get(topic) else {
                first_error = Some(SinkError::Topic {
                    topic: topic.to_string(),
                    detail: "partition count unknown".into(),
                });
                break;
            };
            let placement = record.key.unwrap_or(record.event_id);
            let partition = partition_for(placement.as_bytes(), count);
            let position = self.positions.get(&(topic.to_string(), partition));
            if position.is_some_and(|&published| record.seq <= published) {
                continue;
            }

            let seq = record.seq.to_string();
            let headers = OwnedHeaders::new_with_capacity(3)
                .insert(Header {
                    key: SEQ_HEADER,
                    value: Some(seq.as_bytes()),
                })
                .insert(Header {
                    key: GROUP_HEADER,
                    value: Some(group),
                })
                .insert(Header {
                    key: EVENT_ID_HEADER,
                    value: Some(record.event_id.as_bytes()),
                });
            let mut message = FutureRecord::<str, str>::to(topic)
                .partition(partition)
                .payload(record.payload)
                .headers(headers);
            if let Some(key) = &record.key {
                message = message.key(key);
            }
            // Enqueue strictly in seq order: when the local queue is full, wait for the
            // oldest delivery and retry the same record rather than moving on.
            let delivery = loop {
                match self.producer.send_result(message) {
                    Ok(delivery) => break Some(delivery),
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        message = back;
                        match in_flight.pop_front() {
                            Some(oldest) => {
                                if let Err(error) = settle(&mut self.positions, oldest).await {
                                    first_error.get_or_insert(error);
                                    break None;
                                }
                            }
                            None => tokio::time::sleep(Duration::from_millis(5)).await,
                        }
                    }
                    Err((error, _)) => {
                        first_error.get_or_insert(SinkError::Kafka {
                            context: format!("produce outbox seq {} to {topic}", record.seq),
                            source: error,
                        });
                        break None;
                    }
                }
            };
            let Some(delivery) = delivery else { break };
            in_flight.push_back(InFlight {
                seq: record.seq,
                topic: topic.to_string(),
                delivery,
            });
            produced += 1;
        }

        // Even after an error, wait for everything enqueued: nothing may still be on its
        // way when positions are read back.
        for pending in in_flight {
            if let Err(error) = settle(&mut self.positions, pending).await {
                first_error.get_or_insert(error);
            }
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(produced),
        }
    }

    /// Re-reads partition counts and published positions, after making sure nothing of
    /// ours is still in flight; replaces a producer that hit a fatal error.
    async fn refresh(&mut self) -> Result<(), SinkError> {
        let producer = self.producer.clone();
        let timeout = self.config.timeout;
        let flushed = tokio::task::spawn_blocking(move || producer.flush(timeout))
            .await
            .map_err(|e| SinkError::Timeout(format!("flush before recovery: {e}")))?;
        if let Err(error) = flushed {
            warn!(%error, "producer flush before recovery failed");
        }
        if let Some((code, reason)) = self.producer.client().fatal_error() {
            warn!(?code, reason, "producer failed fatally; creating a new one");
            self.producer = create_producer(&self.config)?;
        }

        let config = self.config.clone();
        let (partitions, positions) = tokio::task::spawn_blocking(move || read_positions(&config))
            .await
            .map_err(|e| SinkError::Timeout(format!("read published positions: {e}")))??;
        info!(
            group_id = %self.config.group_id,
            partitions = positions.len(),
            "outbox positions recovered"
        );
        self.partitions = partitions;
        self.positions = positions;
        self.deleted_through = 0;
        self.stale = false;
        Ok(())
    }
}

/// Waits for one delivery and advances its partition's position.
async fn settle(
    positions: &mut HashMap<(String, i32), i64>,
    pending: InFlight,
) -> Result<(), SinkError> {
    let context = || format!("deliver outbox seq {} to {}", pending.seq, pending.topic);
    match pending.delivery.await {
        Ok(Ok(delivery)) => {
            let position = positions
                .entry((pending.topic.clone(), delivery.partition))
                .or_insert(pending.seq);
            *position = (*position).max(pending.seq);
            Ok(())
        }
        Ok(Err((error, _))) => Err(SinkError::Kafka {
            context: context(),
            source: error,
        }),
        Err(_canceled) => Err(SinkError::Kafka {
            context: context(),
            source: KafkaError::Canceled,
        }),
    }
}

/// An outbox row as read for publishing.
struct Pending<'a> {
    seq: i64,
    /// Logical ([`outbox_topic`]).
    topic: &'a str,
    key: Option<&'a str>,
    event_id: &'a str,
    payload: &'a str,
}

/// A produced record awaiting its delivery report.
struct InFlight {
    seq: i64,
    topic: String,
    delivery: DeliveryFuture,
}

/// The outbox producer's librdkafka configuration.
pub fn producer_config(config: &PublisherConfig) -> KafkaClientConfig {
    kafka::client_config(
        &config.brokers,
        &config.client_options,
        &[("linger.ms", "5")],
        &[
            ("enable.idempotence", "true"),
            ("acks", "all"),
            ("enable.gapless.guarantee", "true"),
        ],
    )
}

fn create_producer(config: &PublisherConfig) -> Result<FutureProducer, SinkError> {
    producer_config(config)
        .create()
        .map_err(SinkError::kafka("create outbox producer"))
}

/// The recovery consumer's librdkafka configuration (reads the output topics' last records).
pub fn recovery_consumer_config(config: &PublisherConfig) -> KafkaClientConfig {
    let group = format!("hmis-outbox-recover-{}", config.group_id);
    kafka::client_config(
        &config.brokers,
        &config.client_options,
        &[("fetch.wait.max.ms", "20")],
        &[
            ("group.id", &group),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("enable.partition.eof", "true"),
            ("auto.offset.reset", "earliest"),
            ("isolation.level", "read_uncommitted"),
        ],
    )
}

/// Partition counts of the output topics, and the highest seq of ours in each partition
/// (blocking).
fn read_positions(
    config: &PublisherConfig,
) -> Result<(HashMap<String, i32>, HashMap<(String, i32), i64>), SinkError> {
    let consumer: BaseConsumer = recovery_consumer_config(config)
        .create()
        .map_err(SinkError::kafka("create recovery consumer"))?;

    // All metadata and watermarks first: once partitions are assigned, the broker parks
    // fetch requests on the connection, and other requests queue behind them.
    let mut partitions = HashMap::new();
    let mut scans: Vec<(&str, BTreeMap<i32, Scan>)> = Vec::new();
    for topic in config.topics.all() {
        if partitions.contains_key(topic) {
            continue; // two outputs configured onto one topic
        }
        let count = partition_count(&consumer, topic, config.timeout)?;
        partitions.insert(topic.to_string(), count);
        let mut topic_scans = BTreeMap::new();
        for partition in 0..count {
            let (low, high) = consumer
                .fetch_watermarks(topic, partition, config.timeout)
                .map_err(SinkError::kafka(format!(
                    "fetch watermarks of {topic}/{partition}"
                )))?;
            if high > low {
                topic_scans.insert(
                    partition,
                    Scan {
                        low,
                        high,
                        window: 1,
                    },
                );
            }
        }
        scans.push((topic, topic_scans));
    }

    let mut positions = HashMap::new();
    for (topic, topic_scans) in scans {
        for (partition, seq) in last_seqs(&consumer, topic, topic_scans, config)? {
            positions.insert((topic.to_string(), partition), seq);
        }
    }
    Ok((partitions, positions))
}

/// Where a partition's read-back stands.
struct Scan {
    /// Low watermark: the first offset still in the partition.
    low: i64,
    /// High watermark at the start of recovery: the offset after the last message.
    high: i64,
    /// How many messages before `high` the current read starts.
    window: i64,
}

fn partition_count(
    consumer: &BaseConsumer,
    topic: &str,
    timeout: Duration,
) -> Result<i32, SinkError> {
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(SinkError::kafka(format!("fetch metadata of {topic}")))?;
    let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Err(SinkError::Topic {
            topic: topic.into(),
            detail: "not in the broker's metadata".into(),
        });
    };
    if let Some(error) = found.error() {
        return Err(SinkError::Topic {
            topic: topic.into(),
            detail: format!("metadata error {:?}", RDKafkaErrorCode::from(error)),
        });
    }
    let count = found.partitions().len() as i32;
    if count == 0 {
        return Err(SinkError::Topic {
            topic: topic.into(),
            detail: "has no partitions (does it exist?)".into(),
        });
    }
    Ok(count)
}

/// Per partition of `topic` with messages: the seq of the last message carrying our group
/// header.
///
/// Reads backwards in growing windows (1, 16, 256, ... messages before the end) until a
/// message of ours is found, the partition's start is reached, or the window exceeds
/// `recover_scan_limit`; in the usual case the last message is ours and one read suffices.
fn last_seqs(
    consumer: &BaseConsumer,
    topic: &str,
    mut scans: BTreeMap<i32, Scan>,
    config: &PublisherConfig,
) -> Result<HashMap<i32, i64>, SinkError> {
    let group = config.group_id.as_bytes();
    let mut found = HashMap::new();
    while !scans.is_empty() {
        let mut assignment = TopicPartitionList::new();
        for (&partition, scan) in &scans {
            let start = (scan.high - scan.window).max(scan.low);
            assignment
                .add_partition_offset(topic, partition, Offset::Offset(start))
                .map_err(SinkError::kafka(format!("assign {topic}/{partition}")))?;
        }
        consumer
            .assign(&assignment)
            .map_err(SinkError::kafka(format!("assign {topic}")))?;

        let mut reading: Vec<i32> = scans.keys().copied().collect();
        let mut latest: HashMap<i32, i64> = HashMap::new();
        let deadline = Instant::now() + config.timeout;
        while !reading.is_empty() {
            if Instant::now() > deadline {
                return Err(SinkError::Timeout(format!(
                    "reading back the last records of {topic} partitions {reading:?}"
                )));
            }
            match consumer.poll(Duration::from_millis(100)) {
                None => {}
                Some(Err(KafkaError::PartitionEOF(partition))) => {
                    reading.retain(|p| *p != partition);
                }
                Some(Err(error)) => {
                    return Err(SinkError::Kafka {
                        context: format!("read back the last records of {topic}"),
                        source: error,
                    })
                }
                Some(Ok(message)) => {
                    let partition = message.partition();
                    let Some(scan) = scans.get(&partition) else {
                        continue;
                    };
                    if message.offset() < scan.high {
                        if let Some(seq) = our_seq(&message, group) {
                            latest.insert(partition, seq);
                        }
                    }
                    if message.offset() >= scan.high - 1 {
                        reading.retain(|p| *p != partition);
                    }
                }
            }
        }

        scans.retain(|partition, scan| {
            if let Some(seq) = latest.get(partition) {
                found.insert(*partition, *seq);
                return false;
            }
            let start = (scan.high - scan.window).max(scan.low);
            if start <= scan.low {
                return false; // read the whole partition: nothing of ours
            }
            if scan.window >= config.recover_scan_limit {
                warn!(
                    topic,
                    partition,
                    scanned = scan.window,
                    "no record of this group among the last messages; assuming none published"
                );
                return false;
            }
            scan.window = (scan.window * 16).min(config.recover_scan_limit);
            true
        });
    }
    consumer
        .unassign()
        .map_err(SinkError::kafka("unassign recovery consumer"))?;
    Ok(found)
}

/// The seq header of a message published by `group`, if it is one.
fn our_seq(message: &impl Message, group: &[u8]) -> Option<i64> {
    let headers = message.headers()?;
    let mut seq = None;
    let mut ours = false;
    for header in headers.iter() {
        match header.key {
            SEQ_HEADER => {
                seq = header
                    .value
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .and_then(|v| v.parse().ok())
            }
            GROUP_HEADER => ours = header.value == Some(group),
            _ => {}
        }
    }
    seq.filter(|_| ours)
}

/// Kafka's murmur2 hash (the Java client's `Utils.murmur2`), seed `0x9747b28c`.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;

    let mut h: u32 = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        for (i, byte) in tail.iter().enumerate().rev() {
            h ^= u32::from(*byte) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition Kafka's default partitioner gives a key:
/// `toPositive(murmur2(key)) % partitions`, where `toPositive` clears the sign bit.
///
/// # Panics
/// When `partitions` is not positive.
pub fn partition_for(key: &[u8], partitions: i32) -> i32 {
    assert!(partitions > 0, "a topic has at least one partition");
    (murmur2(key) & 0x7fff_ffff) % partitions
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_kafka() {
        // Values of org.apache.kafka.common.utils.Utils.murmur2.
        assert_eq!(murmur2(b"21"), -973932308);
        assert_eq!(murmur2(b"foobar"), -790332482);
        assert_eq!(murmur2(b"a-little-bit-long-string"), -985981536);
        assert_eq!(murmur2(b"a-little-bit-longer-string"), -1486304829);
        assert_eq!(
            murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8"),
            -58897971
        );
        assert_eq!(murmur2(b"abc"), 479470107);
        // Every tail length (0 to 3 bytes after the 4-byte blocks).
        assert_eq!(murmur2(b"kafka") as u32, 0xd067_cf64);
        assert_eq!(murmur2(b"giberish123456789") as u32, 0x8f55_2b0c);
        assert_eq!(murmur2(b"1234") as u32, 0x9fc9_7b14);
        assert_eq!(murmur2(b"234") as u32, 0xe7c0_09ca);
        assert_eq!(murmur2(b"34") as u32, 0x8739_30da);
        assert_eq!(murmur2(b"4") as u32, 0x5a4b_5ca1);
        assert_eq!(murmur2(b"") as u32, 0x106e_08d9);
    }

    #[test]
    fn partitions_follow_the_java_default_partitioner() {
        // toPositive(-973932308) = 1173551340.
        assert_eq!(partition_for(b"21", 10), 1_173_551_340 % 10);
        assert_eq!(partition_for(b"21", 1), 0);
        for key in ["wf-1", "wf-2", "", "a much longer workflow instance id"] {
            let p = partition_for(key.as_bytes(), 7);
            assert!((0..7).contains(&p));
        }
    }

    #[test]
    fn logical_topics_resolve_to_configured_names() {
        let names = TopicNames {
            derived: "d".into(),
            alerts: "a".into(),
            dead_letter: "x".into(),
        };
        assert_eq!(names.resolve("derived"), Some("d"));
        assert_eq!(names.resolve("alerts"), Some("a"));
        assert_eq!(names.resolve("dead_letter"), Some("x"));
        assert_eq!(names.resolve("other"), None);
    }
}
