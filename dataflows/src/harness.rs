//! An in-memory driver for the dataflow: feeds timestamped events to N timely workers and
//! collects the flush batches, applied to an in-memory picture of the tables and topics.
//! Used by the rule tests, the property tests against the reference model, and benchmarks.

use std::collections::BTreeMap;

use crate::events::Event;
use crate::output::{FlushBatch, Millis, OutRecord, Row};
use crate::RulesConfig;

/// What a run produced, applied as the sink would apply it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Final table contents by primary key.
    pub rows: BTreeMap<(u8, crate::model::Str, crate::model::Str), Row>,
    /// Published records in publication order.
    pub records: Vec<OutRecord>,
    /// Every batch, in order.
    pub batches: Vec<FlushBatch>,
}

impl Outcome {
    /// Applies a batch: upserts, deletes, appends records (deduplicated by eventId, like the outbox).
    pub fn apply(&mut self, b: FlushBatch) {
        for (k, v) in &b.rows {
            match v {
                // Alerts, the audit log and error reports are facts: the first write stands
                // (the sink inserts them `ON CONFLICT DO NOTHING`).
                Some(r) if r.is_fact() => {
                    self.rows.entry(k.clone()).or_insert_with(|| r.clone());
                }
                Some(r) => {
                    self.rows.insert(k.clone(), r.clone());
                }
                None => {
                    self.rows.remove(k);
                }
            }
        }
        for r in &b.records {
            if !self
                .records
                .iter()
                .any(|x| x.topic == r.topic && x.event_id == r.event_id)
            {
                self.records.push(r.clone());
            }
        }
        self.batches.push(b);
    }

    /// Records of one event type.
    pub fn of_type(&self, ty: &str) -> Vec<&OutRecord> {
        self.records.iter().filter(|r| r.event_type == ty).collect()
    }
}

/// A run specification: events with their pipeline times, fed in order.
#[derive(Clone, Debug)]
pub struct Run {
    pub workers: usize,
    /// Events and the pipeline time each is inserted at (non-decreasing).
    pub feed: Vec<(Millis, Event)>,
    /// The frontier to advance to at the end (everything below it is flushed).
    pub end: Millis,
    /// Events replayed at `restore_time` before `feed` (as after a restart), whose outputs
    /// below `suppress_before` are dropped.
    pub replay: Vec<Event>,
    pub restore_time: Millis,
    pub suppress_before: Millis,
    pub config: RulesConfig,
    /// Wait for the dataflow to complete each time of `feed` before the next (one flush per
    /// time, as a live pipeline whose sink keeps up); otherwise times may share a flush.
    pub settle_each_time: bool,
    /// Replay `replay` in chunks of this many events, one time each from
    /// [`crate::restore_times`]`(suppress_before)`, as the runtime does; 0: all at
    /// `restore_time`.
    pub replay_chunk: usize,
}

impl Run {
    pub fn new(workers: usize, feed: Vec<(Millis, Event)>, end: Millis) -> Run {
        Run {
            workers,
            feed,
            end,
            replay: Vec::new(),
            restore_time: 0,
            suppress_before: 0,
            config: RulesConfig::default(),
            settle_each_time: false,
            replay_chunk: 0,
        }
    }
}

/// Runs the dataflow on `run` and returns the applied outcome, on the core named by
/// `HMIS_CORE` ([`crate::engine::Core::from_env`]; the differential one by default).
pub fn run(run: Run) -> Outcome {
    crate::engine::run(run, crate::engine::Core::from_env())
}
