//! An in-memory driver for the dataflow: feeds timestamped events to N timely workers and
//! collects the flush batches, applied to an in-memory picture of the tables and topics.
//! Used by the rule tests, the property tests against the reference model, and benchmarks.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::events::Event;
use crate::gather::Gather;
use crate::output::{FlushBatch, Millis, OutRecord, Row};
use crate::{build, RulesConfig, Sessions};

/// What a run produced, applied as the sink would apply it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Final table contents by primary key.
    pub rows: BTreeMap<(u8, String, String), Row>,
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

/// Runs the dataflow on `run` and returns the applied outcome.
pub fn run(run: Run) -> Outcome {
    let outcome = Arc::new(Mutex::new(Outcome::default()));
    let shared = outcome.clone();
    // Highest frontier flushed so far; batches past `end` are ignored (the inputs closing at
    // shutdown would otherwise flush times the run never reached).
    let gathered = Arc::new(AtomicU64::new(0));
    let run = Arc::new(run);
    timely::execute(timely::Config::process(run.workers.max(1)), move |worker| {
        let index = worker.index();
        let peers = worker.peers();
        let shared = shared.clone();
        let gathered = gathered.clone();
        let gathered2 = gathered.clone();
        let end = run.end;
        let mut cfg = run.config.clone();
        // As the runtime: nothing is decided below the frontier a restart resumes from.
        cfg.lifecycle.decide_from = cfg.lifecycle.decide_from.max(run.suppress_before);
        let suppress = run.suppress_before;
        let (mut sessions, probe) = worker.dataflow::<u64, _, _>(|scope| {
            let (sessions, inputs) = Sessions::new(scope);
            let emits = build(inputs, &cfg);
            let (probe, emits) = emits.probe();
            emits.gather(suppress, move |b| {
                if gathered2.load(Ordering::SeqCst) >= end {
                    return;
                }
                let f = b.frontier;
                shared.lock().unwrap().apply(b);
                gathered2.store(f, Ordering::SeqCst);
            });
            (sessions, probe)
        });
        if run.replay_chunk == 0 {
            sessions.advance_to(run.restore_time);
            for (i, e) in run.replay.iter().enumerate() {
                if i % peers == index {
                    sessions.insert(e.clone(), run.restore_time);
                }
            }
        } else {
            // As the runtime replays: a chunk per time from restore_times(suppress_before).
            let (first, last) = crate::restore_times(run.suppress_before);
            for (c, chunk) in run.replay.chunks(run.replay_chunk).enumerate() {
                let t = (first + c as u64).min(last);
                if t > sessions.time() {
                    sessions.advance_to(t);
                    worker.step_while(|| probe.less_than(&sessions.time()));
                }
                for (i, e) in chunk.iter().enumerate() {
                    if (c * run.replay_chunk + i) % peers == index {
                        sessions.insert(e.clone(), t);
                    }
                }
            }
        }
        for (i, (t, e)) in run.feed.iter().enumerate() {
            if *t > sessions.time() {
                let before = sessions.time();
                sessions.advance_to(*t);
                worker.step();
                if run.settle_each_time {
                    let reached = |g: &AtomicU64| g.load(Ordering::SeqCst) >= *t;
                    worker.step_while(|| probe.less_than(t) || (before > 0 && !reached(&gathered)));
                }
            }
            if i % peers == index {
                sessions.insert(e.clone(), *t);
            }
        }
        sessions.advance_to(run.end);
        worker
            .step_while(|| probe.less_than(&run.end) || gathered.load(Ordering::SeqCst) < run.end);
    })
    .expect("timely workers");
    let out = outcome.lock().unwrap().clone();
    out
}
