//! The Kafka source: input partitions → timestamped events in a worker's input sessions.
//!
//! ```text
//!  partitions (all input topics, enumerated in a fixed order, dealt round-robin to workers)
//!     │  one BaseConsumer per topic per worker, manual assignment, no auto commit
//!     ▼
//!  decode ──ok──► Sessions::insert(event, t)        t = pipeline time (below)
//!     └──err───► Sessions::emit(Dead(..), t)         nothing is dropped, nothing blocks
//!  per batch:   Sessions::emit(Offset(..), t_last)   positions travel with their effects
//! ```
//!
//! **Pipeline time of a record.** While *restoring* (offset below the committed position
//! loaded from PostgreSQL) records are stamped `restore_time`: one time per poll, from 35
//! minutes below the committed frontier on (`hmis_dataflows::restore_times`), so the history is
//! processed a poll at a time (memory of a normal run, not of the whole history at one
//! instant; finished work retires during the replay). Its effects, already durable, are
//! suppressed by the gatherer; records dead-lettered before the restart are skipped (decided
//! for good), and no grace check is decided below the frontier (see
//! `LifecycleRules::decide_from`). Afterwards: in `clock = event` a record is stamped with its
//! eventTime, in `clock = wall` with the wall clock; either way never below the current
//! frontier, the resumed frontier, nor the previous record of its partition, so positions
//! per partition complete in offset order. Offset marks are exact (one per partition and
//! stamp): a committed offset separates the records whose effects are committed from those
//! whose effects are not, which is what makes the replay-and-suppress restore exact.
//!
//! **Frontier (the pipeline clock, contract §8).** `wall`: now. `event`: the lowest, over this
//! worker's partitions that are not at their end, of the highest eventTime read from each,
//! minus `allowed_lateness`; definitions never count; when every partition is at its end, the
//! highest eventTime seen by any worker, plus one millisecond (so that time is complete).
//! Timely takes the minimum over workers, which is exactly the contract's watermark.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use hmis_sinks::KafkaClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, info, warn};

use hmis_dataflows::events::{decode, InputTopic, Pos};
use hmis_dataflows::output::{DeadLetter, OffsetMark, RejectReason};
use hmis_dataflows::{Emit, Sessions};

use crate::config::{ClockMode, Config};
use crate::runtime::Shared;

/// Records read from one consumer before [`Source::poll`] looks again for the one holding
/// the watermark back.
const CHUNK: usize = 500;

/// One assigned input partition.
#[derive(Debug)]
pub struct PartitionState {
    pub role: InputTopic,
    pub topic: String,
    pub partition: i32,
    /// Position after the last record read.
    pub next_offset: i64,
    /// Records below this offset are replayed to rebuild state.
    pub restore_until: i64,
    /// High watermark when the run started (for `until_caught_up`).
    pub end_at_start: i64,
    /// The consumer reported the end of the partition and nothing was read since.
    pub at_end: bool,
    pub max_event_time: Option<u64>,
    pub last_time: u64,
    /// Offsets below `restore_until` that were dead-lettered: skipped by the restore.
    pub skip: HashSet<i64>,
}

/// The partitions of every input topic, in the fixed order used to deal them to workers.
pub fn enumerate_partitions(cfg: &Config) -> anyhow::Result<Vec<(InputTopic, String, i32)>> {
    let consumer: SourceConsumer = client_config(cfg).create_with_context(SourceContext)?;
    let mut out = Vec::new();
    for role in InputTopic::ALL {
        let name = cfg.topics.input(role).to_string();
        let md = consumer
            .fetch_metadata(Some(&name), Duration::from_secs(10))
            .map_err(|e| anyhow::anyhow!("metadata of topic {name}: {e}"))?;
        let t = md
            .topics()
            .first()
            .ok_or_else(|| anyhow::anyhow!("topic {name}: no metadata"))?;
        if t.partitions().is_empty() {
            anyhow::bail!("input topic {name} does not exist (run `hmis-flow topics create`)");
        }
        for p in t.partitions() {
            out.push((role, name.clone(), p.id()));
        }
    }
    out.sort_by_key(|a| (a.0, a.2));
    Ok(out)
}

/// librdkafka settings shared by the source's consumers. Offsets live in PostgreSQL and the
/// end of a partition is seen through `enable.partition.eof`: those settings cannot be
/// overridden by `[kafka]`.
pub fn client_config(cfg: &Config) -> KafkaClientConfig {
    hmis_sinks::kafka::client_config(
        &cfg.brokers,
        &cfg.kafka,
        &[
            ("group.id", &cfg.group_id),
            ("auto.offset.reset", "earliest"),
            ("isolation.level", "read_committed"),
            ("fetch.wait.max.ms", "50"),
            ("message.max.bytes", "16777216"),
            ("fetch.message.max.bytes", "16777216"),
        ],
        &[
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("enable.partition.eof", "true"),
        ],
    )
}

/// Client context that reports librdkafka errors through tracing, except end-of-partition
/// notices (expected: `enable.partition.eof` is how the source knows a partition is at its end).
pub struct SourceContext;

impl rdkafka::client::ClientContext for SourceContext {
    fn error(&self, error: KafkaError, reason: &str) {
        let eof = matches!(error, KafkaError::PartitionEOF(_))
            || matches!(&error, KafkaError::Global(c) if *c == rdkafka::types::RDKafkaErrorCode::PartitionEOF);
        if !eof {
            warn!(error = %error, reason, "kafka client error");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for SourceContext {}

/// A consumer of the source.
pub type SourceConsumer = BaseConsumer<SourceContext>;

/// A worker's share of the input.
pub struct Source {
    consumers: Vec<(InputTopic, SourceConsumer)>,
    /// (consumer index, partition) → state.
    pub parts: HashMap<(usize, i32), PartitionState>,
    clock: ClockMode,
    lateness: u64,
    max_record_bytes: usize,
    restore_time: u64,
    resume_frontier: u64,
    pub records_read: u64,
    pub dead_letters: u64,
}

impl Source {
    /// Assigns this worker's partitions, replaying each from its beginning.
    pub fn new(
        cfg: &Config,
        all: &[(InputTopic, String, i32)],
        index: usize,
        peers: usize,
        committed: &HashMap<(String, i32), i64>,
        dead_lettered: &HashMap<(String, i32), HashSet<i64>>,
        resume_frontier: u64,
    ) -> anyhow::Result<Source> {
        let mine: Vec<&(InputTopic, String, i32)> = all
            .iter()
            .enumerate()
            .filter(|(i, _)| i % peers == index)
            .map(|(_, p)| p)
            .collect();
        let mut consumers = Vec::new();
        let mut parts = HashMap::new();
        for role in InputTopic::ALL {
            let ps: Vec<_> = mine.iter().filter(|p| p.0 == role).collect();
            if ps.is_empty() {
                continue;
            }
            let consumer: SourceConsumer = client_config(cfg).create_with_context(SourceContext)?;
            let mut tpl = TopicPartitionList::new();
            let ci = consumers.len();
            for (_, topic, p) in ps {
                let (low, high) = consumer
                    .fetch_watermarks(topic, *p, Duration::from_secs(10))
                    .map_err(|e| anyhow::anyhow!("watermarks of {topic}/{p}: {e}"))?;
                let mut restore_until = committed.get(&(topic.clone(), *p)).copied().unwrap_or(0);
                if restore_until > high {
                    warn!(topic, partition = p, committed = restore_until, high, "committed position is past the end of the partition (topic recreated?); replaying what exists");
                    restore_until = high;
                }
                if low > 0 && restore_until > 0 {
                    warn!(topic, partition = p, low, "input history before offset {low} is gone (retention): state from it cannot be rebuilt");
                }
                tpl.add_partition_offset(topic, *p, Offset::Beginning)?;
                parts.insert(
                    (ci, *p),
                    PartitionState {
                        role,
                        topic: topic.clone(),
                        partition: *p,
                        next_offset: low,
                        restore_until,
                        end_at_start: high,
                        at_end: false,
                        max_event_time: None,
                        last_time: 0,
                        skip: dead_lettered
                            .get(&(topic.clone(), *p))
                            .cloned()
                            .unwrap_or_default(),
                    },
                );
            }
            consumer.assign(&tpl)?;
            consumers.push((role, consumer));
        }
        info!(worker = index, partitions = parts.len(), "source assigned");
        Ok(Source {
            consumers,
            parts,
            clock: cfg.clock,
            lateness: cfg.allowed_lateness_ms,
            max_record_bytes: cfg.max_record_bytes,
            restore_time: hmis_dataflows::restore_times(resume_frontier).0,
            resume_frontier,
            records_read: 0,
            dead_letters: 0,
        })
    }

    /// Time the next records are replayed at while restoring.
    pub fn restore_time(&self) -> u64 {
        self.restore_time
    }

    pub fn restoring(&self) -> bool {
        self.parts.values().any(|p| p.next_offset < p.restore_until)
    }

    /// Every event partition read to its end, as far as the consumer last said (definitions
    /// never move the clock), and neither restoring nor bootstrapping definitions: this worker
    /// holds the pipeline clock back for nothing it has yet to read.
    pub fn idle(&self) -> bool {
        !self.restoring()
            && !self.bootstrapping_definitions()
            && self
                .parts
                .values()
                .all(|p| p.role == InputTopic::Definitions || p.at_end)
    }

    /// Definitions partitions not yet read to the end they had at start.
    pub fn bootstrapping_definitions(&self) -> bool {
        self.parts
            .values()
            .any(|p| p.role == InputTopic::Definitions && p.next_offset < p.end_at_start)
    }

    /// Every partition read up to the end offset it had at start.
    pub fn caught_up(&self) -> bool {
        self.parts.values().all(|p| p.next_offset >= p.end_at_start)
    }

    /// Reads up to `budget` records into `sessions`. Returns how many were read.
    ///
    /// Consumers are read in chunks of [`CHUNK`] records, each time from the one whose
    /// partitions hold the watermark back (see [`Source::read_position`]). Reading one topic
    /// to its end before the next (as a plain loop over consumers does on a backlog) would
    /// hold the event-clock frontier until the whole backlog is read: nothing would be
    /// committed until then, and a crash would lose all of it.
    pub fn poll(&mut self, sessions: &mut Sessions, budget: usize, shared: &Shared) -> usize {
        let mut n = 0;
        // Per partition, the (time, next offset) of the last record read in this call. A mark
        // is emitted each time a partition's stamp changes, and for the last one at the end:
        // a committed offset then covers exactly the records stamped below the committed
        // frontier, never one stamped at or above it (whose effects are not committed) and
        // never leaves one stamped below it uncovered (whose effects are). One mark per poll
        // at its last stamp would leave the second kind after a restart: re-read and, being
        // past the committed offset, applied twice.
        let mut marks: HashMap<(usize, i32), (u64, i64)> = HashMap::new();
        let mut drained = vec![false; self.consumers.len()];
        let mut restored = false;
        while n < budget {
            let Some(ci) = self.lagging_consumer(&drained) else {
                break;
            };
            let chunk_end = (n + CHUNK).min(budget);
            while n < chunk_end {
                let msg = match self.consumers[ci].1.poll(Duration::ZERO) {
                    None => {
                        drained[ci] = true;
                        break;
                    }
                    Some(Err(KafkaError::PartitionEOF(p))) => {
                        if let Some(ps) = self.parts.get_mut(&(ci, p)) {
                            ps.at_end = true;
                        }
                        continue;
                    }
                    Some(Err(e)) => {
                        // librdkafka retries by itself; the error is reported, the input stays paused here.
                        warn!(error = %e, "kafka consumer error");
                        shared.kafka_errors.fetch_add(1, Ordering::Relaxed);
                        drained[ci] = true;
                        break;
                    }
                    Some(Ok(m)) => m,
                };
                n += 1;
                let role = self.consumers[ci].0;
                let partition = msg.partition();
                let offset = msg.offset();
                let Some(ps) = self.parts.get_mut(&(ci, partition)) else {
                    continue;
                };
                ps.next_offset = offset + 1;
                ps.at_end = false;
                let restoring = offset < ps.restore_until;
                if restoring {
                    restored = true;
                    if ps.skip.remove(&offset) {
                        // Dead-lettered before the restart: decided for good.
                        continue;
                    }
                }
                let pos = Pos { partition, offset };
                let size = msg.payload().map(|p| p.len()).unwrap_or(0)
                    + msg.key().map(|k| k.len()).unwrap_or(0);
                let decoded = if size > self.max_record_bytes {
                    Err(hmis_dataflows::events::Rejection {
                        reason: RejectReason::SchemaViolation,
                        detail: format!(
                            "record of {size} bytes exceeds max_record_bytes ({})",
                            self.max_record_bytes
                        ),
                    })
                } else {
                    decode(role, msg.key(), msg.payload(), pos)
                };
                let event_time = decoded.as_ref().ok().and_then(|e| e.event_time());
                if let Some(et) = event_time {
                    ps.max_event_time = Some(ps.max_event_time.map_or(et, |m| m.max(et)));
                    shared.max_event_time.fetch_max(et, Ordering::Relaxed);
                }
                let now = sessions.time();
                let t = if restoring {
                    self.restore_time
                } else {
                    let base = match self.clock {
                        ClockMode::Event => event_time.unwrap_or(now),
                        ClockMode::Wall => wall_ms(),
                    };
                    // Never below the resumed frontier: every record past the committed
                    // offset has effects that are not committed yet, and the gatherer drops
                    // times below that frontier (a late event, or one without an eventTime,
                    // read right after the restore would be lost).
                    base.max(now).max(ps.last_time).max(self.resume_frontier)
                };
                if !restoring {
                    ps.last_time = t;
                    shared.max_stamp.fetch_max(t, Ordering::Relaxed);
                    if let Some((before, next)) = marks.insert((ci, partition), (t, offset + 1)) {
                        if before < t {
                            sessions.emit(
                                Emit::Offset(OffsetMark {
                                    topic: ps.topic.clone(),
                                    partition,
                                    next_offset: next,
                                }),
                                before,
                            );
                        }
                    }
                }
                match decoded {
                    Ok(ev) => sessions.insert(ev, t),
                    Err(rej) => {
                        if !restoring {
                            self.dead_letters += 1;
                            debug!(
                                topic = ps.topic,
                                partition,
                                offset,
                                reason = rej.reason.as_str(),
                                "rejected record"
                            );
                        }
                        sessions.emit(
                            Emit::dead(DeadLetter::of_bytes(
                                &ps.topic,
                                pos,
                                msg.key(),
                                msg.payload(),
                                rej.reason,
                                rej.detail,
                                t,
                            )),
                            t,
                        );
                    }
                }
            }
        }
        for ((ci, p), (t, next)) in marks {
            let ps = &self.parts[&(ci, p)];
            sessions.emit(
                Emit::Offset(OffsetMark {
                    topic: ps.topic.clone(),
                    partition: p,
                    next_offset: next,
                }),
                t,
            );
        }
        // The next poll of the restore replays at the next time (up to `F - 1`), so the
        // history is processed a poll at a time, not all at one instant.
        if restored {
            let last = hmis_dataflows::restore_times(self.resume_frontier).1;
            self.restore_time = (self.restore_time + 1).min(last);
        }
        self.records_read += n as u64;
        n
    }

    /// The consumer to read next: the one, not drained in this call, whose input is read
    /// least far in eventTime.
    fn lagging_consumer(&self, drained: &[bool]) -> Option<usize> {
        (0..self.consumers.len())
            .filter(|&ci| !drained[ci])
            .min_by_key(|&ci| self.read_position(ci))
    }

    /// How far a consumer's input is read, in eventTime: the lowest highest-eventTime of its
    /// partitions not at their end; 0 while one has none yet, and for definitions (read
    /// first: they are bootstrapped before any event); `u64::MAX` when all are at the end.
    fn read_position(&self, ci: usize) -> u64 {
        self.parts
            .iter()
            .filter(|((c, _), p)| *c == ci && !p.at_end)
            .map(|(_, p)| {
                if p.role == InputTopic::Definitions {
                    0
                } else {
                    p.max_event_time.unwrap_or(0)
                }
            })
            .min()
            .unwrap_or(u64::MAX)
    }

    /// One line per partition (role/partition, next offset, highest eventTime, at end): what
    /// the event clock's frontier is made of, for the `clock` debug log.
    pub fn clock_report(&self) -> String {
        let mut v: Vec<_> = self.parts.values().collect();
        v.sort_by_key(|p| (p.role, p.partition));
        v.iter()
            .map(|p| {
                format!(
                    "{:?}/{}@{}:{}{}",
                    p.role,
                    p.partition,
                    p.next_offset,
                    p.max_event_time.map_or(-1, |m| m as i64),
                    if p.at_end { "E" } else { "" }
                )
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The frontier this worker can promise: no record it reads later will be stamped earlier.
    ///
    /// Held while restoring, and while the definitions read at start are not all read: templates
    /// are bootstrapped at the earliest pipeline time, before any event that may need them.
    ///
    /// In `clock = event`, a worker whose partitions are all read to their end holds nothing
    /// back: its frontier follows the lowest of the workers still reading (`others`), so what
    /// it reads next is stamped as close to its eventTime as the clock allows. Once every
    /// worker's partitions are read to their end the clock is the highest eventTime seen — or
    /// the highest stamp, if higher: records read after a restart with eventTimes below the
    /// resumed frontier are stamped at it, and must still complete. (Jumping there as soon as
    /// this worker's own partitions were at their end stamped what it read next at the
    /// highest eventTime any worker had read, ahead of the clock: such a record waited for
    /// every other worker's backlog.)
    pub fn frontier(
        &self,
        current: u64,
        others: Option<u64>,
        global_max_event_time: u64,
        global_max_stamp: u64,
    ) -> u64 {
        if self.restoring() {
            return current.max(self.restore_time);
        }
        if self.bootstrapping_definitions() {
            return current;
        }
        let f = match self.clock {
            ClockMode::Wall => wall_ms(),
            ClockMode::Event => {
                let mut active = self
                    .parts
                    .values()
                    .filter(|p| p.role != InputTopic::Definitions && !p.at_end);
                let mut low: Option<u64> = None;
                let mut unknown = false;
                for p in active.by_ref() {
                    match p.max_event_time {
                        Some(m) => low = Some(low.map_or(m, |l| l.min(m))),
                        None => unknown = true,
                    }
                }
                if unknown {
                    current
                } else {
                    match (low, others) {
                        (Some(l), _) => l.saturating_sub(self.lateness),
                        (None, Some(reading)) => reading,
                        (None, None) if global_max_event_time > 0 => {
                            (global_max_event_time + 1).max(global_max_stamp.saturating_add(1))
                        }
                        (None, None) => current,
                    }
                }
            }
        };
        f.max(current).max(self.resume_frontier)
    }
}

/// Milliseconds since the Unix epoch.
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
