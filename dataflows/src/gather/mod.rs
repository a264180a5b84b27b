//! Gathering: from timestamped changes to [`FlushBatch`]es, handed in order to a callback
//! (the sink) on worker 0.
//!
//! Two ways, chosen by the number of workers against the cores ([`Place`]):
//! - **every worker collapses its own changes** ([`gather_partials`], as many workers as
//!   cores or more; the keyed core only, see [`Owners`]): each worker collapses what
//!   completed into partial batches over cells of stamps cut on a decimal grid, and worker 0
//!   merges the partials of all workers at the cuts they all made ([`partial`]). Worker 0
//!   keeps only the merge: at 2 workers the collapse was ~30 % of its time while worker 1
//!   waited.
//! - **worker 0 collapses everything** ([`gather_beside`]): each worker sorts its own
//!   completed changes ([`gather_order`], one sorted run per frontier advance); the runs are
//!   exchanged to worker 0, which buffers them in arrival order; when the frontier passes a
//!   time, the completed changes are merged (a stable sort of sorted runs), collapsed into
//!   one [`FlushBatch`] per frontier advance ([`Stage2`]) on a thread beside worker 0 where
//!   a core is left for it ([`CollapseThread`]: 1 worker on 2 cores +12-20 %), and for the
//!   differential core.
//!
//! Both give the batch a single collapse of the same changes gives (tests below).
//!
//! Collapsing rules, applied in time order:
//! - rows: per primary key, retractions before insertions at each time, so the batch holds
//!   each touched row's final state (`None`: delete); a fact (an alert, an audit entry, an
//!   error report: [`crate::output::Row::is_fact`]) keeps its first write;
//! - records and dead letters: those with a positive change, in (time, workflow, type) order,
//!   duplicates (same topic and eventId) removed;
//! - offsets: the highest position per partition;
//! - a row retraction at a time where its owner is [`Emit::Retired`] is ignored: the state
//!   was forgotten to bound memory, the row stays.
//!
//! Times below `suppress_before` are dropped: on restart the source replays history at one
//! time below the committed frontier to rebuild state, and its effects were already durable.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::Arc;

use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::progress::frontier::AntichainRef;

use differential_dataflow::VecCollection;

use crate::engine::keyed::{hold, Updates};
use crate::model::Str;
use crate::output::{DeadLetter, FlushBatch, Millis, OffsetMark, OutRecord, Owner, Row};
use crate::Emit;

mod partial;
use partial::{CellCollapser, Merge, Partial};

type Fast = foldhash::fast::RandomState;

/// Accumulates the changes of completed times into a batch. Public so tests and the
/// reference comparison can collapse captured output exactly as the sink would.
///
/// Hash maps, not ordered ones: a change costs one hash and one comparison instead of a
/// path of string comparisons, and the rows are sorted by key once, when taken (the batch's
/// order is the one a `BTreeMap` gave). All keep their capacity across flushes.
#[derive(Default)]
pub struct Collapser {
    /// The rows touched, by key (`Some(None)`: deleted).
    rows: HashMap<(u8, Str, Str), Option<Option<Arc<Row>>>, Fast>,
    records: Vec<OutRecord>,
    /// The (topic, eventId) of `records`: a record whose pair is there is a duplicate.
    seen: Seen,
    dead: Vec<DeadLetter>,
    offsets: BTreeMap<(String, i32), i64>,
    /// One time's changes, while they are grouped ([`for_each_time`]).
    time: Vec<(Emit, isize)>,
}

impl Collapser {
    /// Adds all changes of one time (any order within the time).
    pub fn add_time(&mut self, mut updates: Vec<(Emit, isize)>) {
        // Retractions first, so a row replaced at this time ends at its new value (a stable
        // sort: each part keeps its order).
        updates.sort_by_key(|u| u.1 > 0);
        let retired = retired_in(updates.iter().map(|(e, r)| (e, *r)));
        for (e, r) in updates {
            self.add(e, r, &retired);
        }
    }

    /// Adds one change of a time whose retired owners are `retired`. The changes of a time
    /// must come retractions first (see [`Collapser::add_time`]).
    fn add(&mut self, e: Emit, r: isize, retired: &HashSet<Owner, Fast>) {
        match e {
            Emit::Row(row) if !forgotten(&row, r, retired) => {
                apply_row(self.rows.entry(row.key()).or_insert(None), row, r);
            }
            Emit::Record(_, rec) if r > 0 => self.push_record(*rec),
            Emit::Dead(d) if r > 0 => {
                self.push_record(d.to_record());
                self.dead.push(*d);
            }
            Emit::Offset(m) if r > 0 => {
                keep_highest(&mut self.offsets, (m.topic, m.partition), m.next_offset)
            }
            _ => {}
        }
    }

    /// Keeps `rec` unless a record of its topic and eventId was kept before.
    fn push_record(&mut self, rec: OutRecord) {
        if self.seen.first(&self.records, &rec, |r| r) {
            self.records.push(rec);
        }
    }

    /// Adds the changes of completed times, sorted by [`gather_order`] (times ascending,
    /// each as [`Collapser::add_time`] orders it).
    fn add_sorted(&mut self, updates: &mut Vec<(Emit, u64, isize)>) {
        let mut time = std::mem::take(&mut self.time);
        for_each_time(updates.drain(..), &mut time, |_, e, r, retired| {
            self.add(e, r, retired)
        });
        self.time = time;
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
            && self.records.is_empty()
            && self.dead.is_empty()
            && self.offsets.is_empty()
    }

    /// Takes the batch accumulated so far.
    pub fn take(&mut self, frontier: Millis) -> FlushBatch {
        let mut rows: Vec<_> = self
            .rows
            .drain()
            .filter_map(|(k, v)| Some((k, v?.map(Arc::unwrap_or_clone))))
            .collect();
        rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        self.seen.clear();
        FlushBatch {
            frontier,
            rows,
            records: std::mem::take(&mut self.records),
            dead_letters: std::mem::take(&mut self.dead),
            offsets: offset_marks(std::mem::take(&mut self.offsets)),
        }
    }
}

/// Dedup of records by (topic, eventId), as the collapse: the first one stands.
#[derive(Default)]
struct Seen {
    /// Indices into the records kept.
    table: hashbrown::HashTable<usize>,
    hasher: Fast,
}

impl Seen {
    /// Whether `rec` is the first of its (topic, eventId) among `kept` (`record` reads an
    /// element's record); if so it is taken to be pushed at index `kept.len()`.
    fn first<T>(&mut self, kept: &[T], rec: &OutRecord, record: impl Fn(&T) -> &OutRecord) -> bool {
        let Seen { table, hasher } = self;
        let hash = |r: &OutRecord| hasher.hash_one((r.topic, r.event_id.as_str()));
        let same = |i: &usize| {
            let k = record(&kept[*i]);
            k.topic == rec.topic && k.event_id == rec.event_id
        };
        if table.find(hash(rec), same).is_some() {
            return false;
        }
        table.insert_unique(hash(rec), kept.len(), |i| hash(record(&kept[*i])));
        true
    }

    fn clear(&mut self) {
        self.table.clear();
    }
}

/// Calls `f(time, change, diff, owners retired at that time)` for changes sorted by time,
/// one time after the other (`time` buffers one time's changes).
fn for_each_time(
    changes: impl Iterator<Item = (Emit, u64, isize)>,
    time: &mut Vec<(Emit, isize)>,
    mut f: impl FnMut(u64, Emit, isize, &HashSet<Owner, Fast>),
) {
    let mut changes = changes.peekable();
    while let Some(t) = changes.peek().map(|c| c.1) {
        time.clear();
        while let Some((e, _, r)) = changes.next_if(|c| c.1 == t) {
            time.push((e, r));
        }
        let retired = retired_in(time.iter().map(|(e, r)| (e, *r)));
        for (e, r) in time.drain(..) {
            f(t, e, r, &retired);
        }
    }
}

/// Whether a row's change is ignored: a retraction where its owner retires (the state was
/// forgotten to bound memory; the row stays).
fn forgotten(row: &Row, r: isize, retired: &HashSet<Owner, Fast>) -> bool {
    r < 0 && !retired.is_empty() && row.owner().is_some_and(|o| retired.contains(&o))
}

/// Keeps the highest input position per partition.
fn keep_highest(offsets: &mut BTreeMap<(String, i32), i64>, key: (String, i32), next: i64) {
    let e = offsets.entry(key).or_insert(next);
    *e = (*e).max(next);
}

/// The highest positions per partition as a batch holds them (in (topic, partition) order).
fn offset_marks(offsets: BTreeMap<(String, i32), i64>) -> Vec<OffsetMark> {
    offsets
        .into_iter()
        .map(|((topic, partition), next_offset)| OffsetMark {
            topic,
            partition,
            next_offset,
        })
        .collect()
}

/// One change of a row applied to what the batch holds for its key (`None`: untouched so
/// far; `Some(None)`: deleted). A fact (raised or appended once) keeps its first write (the
/// records keep their first copy too); a retraction deletes only the value it retracts.
fn apply_row(slot: &mut Option<Option<Arc<Row>>>, row: Arc<Row>, r: isize) {
    if r > 0 && row.is_fact() {
        if slot.as_ref().is_none_or(|v| v.is_none()) {
            *slot = Some(Some(row));
        }
    } else if r > 0 {
        *slot = Some(Some(row));
    } else if r < 0 {
        match slot {
            Some(Some(cur)) if **cur != *row => {}
            _ => *slot = Some(None),
        }
    }
}

/// The owners retired among one time's changes.
fn retired_in<'a>(updates: impl Iterator<Item = (&'a Emit, isize)>) -> HashSet<Owner, Fast> {
    updates
        .filter_map(|(e, r)| match e {
            Emit::Retired(o) if r > 0 => Some(o.clone()),
            _ => None,
        })
        .collect()
}

/// The order completed changes are collapsed in: by time; within a time retractions
/// first, then insertions (as [`Collapser::add_time`]); within each, records in
/// publication order (by workflow, type rank, eventId), then the rest in arrival order (the
/// sort is stable).
fn gather_order(e: &Emit, t: u64, r: isize) -> (u64, bool, u8, &str, u8, &str) {
    match e {
        Emit::Record((wid, rank), rec) => (t, r > 0, 0, wid.as_str(), *rank, rec.event_id.as_str()),
        _ => (t, r > 0, 1, "", 0, ""),
    }
}

/// Sorts changes into [`gather_order`] (stable: ties keep their order).
fn sort_in_gather_order(updates: &mut [(Emit, u64, isize)]) {
    updates.sort_by(|a, b| gather_order(&a.0, a.1, a.2).cmp(&gather_order(&b.0, b.1, b.2)));
}

/// Extension trait: gather a collection of [`Emit`] into flush batches on worker 0.
pub trait Gather {
    /// Calls `flush` with every batch of completed times at or above `suppress_before`.
    /// `owners` says where a row's changes come from (see [`Owners`]).
    /// `flush` is also called, with an empty batch, when the frontier advances without
    /// changes, so the sink can record the clock's progress. Its frontier is
    /// `u64::MAX` once the input is exhausted.
    fn gather<F: FnMut(FlushBatch) + Send + 'static>(
        self,
        suppress_before: Millis,
        owners: Owners,
        flush: F,
    );
}

/// Where the changes of a row come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owners {
    /// From the worker that owns the row's workflow or order, which also retires it (the
    /// keyed core): each worker can collapse its own changes.
    Local,
    /// From any worker (the differential core: a task's row and its workflow's retirement
    /// may be on two workers): only the gatherer sees them all.
    Anywhere,
}

impl Gather for VecCollection<'_, u64, Emit> {
    fn gather<F: FnMut(FlushBatch) + Send + 'static>(
        self,
        suppress_before: Millis,
        owners: Owners,
        flush: F,
    ) {
        // With fewer workers than cores the collapse runs on a thread of its own beside
        // worker 0; with as many or more, every worker collapses its own changes and worker
        // 0 only merges (a third thread on 2 cores only competed with the workers: 2
        // workers -5 % events/s, the CPU per event +10 %; with 1 worker it gained 12-20 %).
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let place = Place::from_env().unwrap_or(if self.inner.scope().peers() < cores {
            Place::Thread
        } else {
            Place::Workers
        });
        let place = match (place, owners) {
            (Place::Workers, Owners::Anywhere) => Place::Worker0,
            (place, _) => place,
        };
        match place {
            Place::Workers => gather_partials(self.inner, suppress_before, flush),
            beside => gather_beside(self.inner, suppress_before, flush, beside == Place::Thread),
        }
    }
}

/// Where the gather collapses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    /// Every worker its own changes, worker 0 merges ([`gather_partials`]).
    Workers,
    /// Worker 0 all changes, on a thread beside it ([`gather_beside`]).
    Thread,
    /// Worker 0 all changes, itself (the differential core with as many workers as cores).
    Worker0,
}

impl Place {
    /// `HMIS_GATHER` = `workers`, `thread` or `worker0` overrides the choice by core count
    /// (to compare them in one build; unset or empty: by core count).
    fn from_env() -> Option<Place> {
        match std::env::var("HMIS_GATHER").as_deref() {
            Ok("workers") => Some(Place::Workers),
            Ok("thread") => Some(Place::Thread),
            Ok("worker0") => Some(Place::Worker0),
            Ok("") | Err(_) => None,
            Ok(other) => panic!("HMIS_GATHER={other}: expected workers, thread or worker0"),
        }
    }
}

/// The gather with every worker collapsing its own changes into partials of cells of stamps,
/// merged on worker 0 at cuts every worker made (see [`partial`]).
fn gather_partials<F: FnMut(FlushBatch) + 'static>(
    updates: Updates<'_, Emit>,
    suppress_before: Millis,
    mut flush: F,
) {
    let (worker, peers) = (updates.scope().index(), updates.scope().peers());
    let partials = updates.unary_frontier::<CapacityContainerBuilder<Vec<Partial>>, _, _, _>(
        Pipeline,
        "GatherCells",
        move |cap: Capability<u64>, _info| {
            let mut cap = Some(cap);
            let mut pending: Vec<(Emit, u64, isize)> = Vec::new();
            let mut done: Vec<(Emit, u64, isize)> = Vec::new();
            let mut cells = CellCollapser::default();
            // Where this worker cut last: every change below it was sent.
            let mut last = 0u64;
            move |(input, frontier), output| {
                input.for_each(|_cap, data| {
                    pending.extend(data.drain(..).filter(|u| u.1 >= suppress_before));
                });
                let lower = frontier.frontier().first().copied();
                let upper = lower.unwrap_or(u64::MAX);
                if upper > last {
                    done.extend(pending.extract_if(.., |u| u.1 < upper));
                    sort_in_gather_order(&mut done);
                    let held = cap
                        .as_ref()
                        .expect("a capability until the input is exhausted");
                    let parts = partial::advance(&mut cells, worker, last, upper, done.drain(..));
                    output.session(held).give_iterator(parts.into_iter());
                    last = upper;
                }
                hold(&mut cap, pending.iter().map(|u| u.1).chain(lower).min());
            }
        },
    );
    let mut merge = (worker == 0).then(|| Merge::new(peers, suppress_before));
    partials.sink(Exchange::new(|_| 0u64), "GatherMerge", move |(input, _)| {
        input.for_each(|_cap, data| {
            let m = merge.as_mut().expect("partials are exchanged to worker 0");
            for p in data.drain(..) {
                m.add(p);
            }
        });
        if let Some(m) = merge.as_mut() {
            while let Some(batch) = m.next_flush() {
                flush(batch);
            }
        }
    });
}

/// The gather with every worker sorting its completed changes (stage 1) and worker 0
/// merging, collapsing and flushing them (stage 2), on a thread beside it if `own_thread`.
fn gather_beside<F: FnMut(FlushBatch) + Send + 'static>(
    updates: Updates<'_, Emit>,
    suppress_before: Millis,
    flush: F,
    own_thread: bool,
) {
    // Each worker sorts its own completed changes (stage 1), so the gatherer merges
    // sorted runs instead of sorting everything alone (stage 2).
    let sorted = sort_completed(updates, suppress_before);
    // Changes not yet complete, in arrival order: one buffer, sorted once per flush
    // (a map of per-time vectors cost a lookup per change and a growing vector per
    // distinct time: with event-time stamps most times hold a few changes).
    let mut pending: Vec<(Emit, u64, isize)> = Vec::new();
    let mut flush = Some(flush);
    let mut collapse: Option<Collapse<F>> = None;
    let mut last_frontier: Option<u64> = None;
    let is_gatherer = sorted.scope().index() == 0;
    sorted.sink(
        Exchange::new(|_| 0u64),
        "Gather",
        move |(input, frontier)| {
            input.for_each(|_cap, data| {
                pending.append(data);
            });
            if !is_gatherer {
                return;
            }
            let f: AntichainRef<u64> = frontier.frontier();
            let upper = f.first().copied().unwrap_or(u64::MAX);
            if last_frontier == Some(upper) {
                return;
            }
            last_frontier = Some(upper);
            let collapse = collapse.get_or_insert_with(|| {
                let flush = flush.take().expect("one collapse");
                if own_thread {
                    Collapse::Thread(CollapseThread::spawn(suppress_before, flush))
                } else {
                    Collapse::Here(Box::new(Stage2::new(suppress_before, flush)))
                }
            });
            // What completed leaves `pending`, in a buffer that keeps its capacity
            // (regrowing one from empty at every flush cost page faults: +8 s of system
            // time in a catch-up).
            let mut done = collapse.spare();
            done.extend(pending.extract_if(.., |u| u.1 < upper));
            collapse.flush(done, upper);
        },
    );
}

/// Stage 2 of the gather: the completed changes of each frontier advance merged into
/// [`gather_order`] (each worker's runs arrive cut into messages and interleaved: the
/// stable sort finds the runs and merges them), collapsed, and handed to the flush
/// callback, in the order the frontier advanced.
struct Stage2<F> {
    suppress_before: Millis,
    collapser: Collapser,
    flush: F,
    /// An empty buffer with capacity, for the next advance.
    spare: Vec<(Emit, u64, isize)>,
}

impl<F: FnMut(FlushBatch)> Stage2<F> {
    fn new(suppress_before: Millis, flush: F) -> Self {
        Stage2 {
            suppress_before,
            collapser: Collapser::default(),
            flush,
            spare: Vec::new(),
        }
    }

    /// Flushes the changes completed below `upper`; gives back their emptied buffer.
    fn flush(&mut self, mut done: Vec<(Emit, u64, isize)>, upper: u64) -> Vec<(Emit, u64, isize)> {
        sort_in_gather_order(&mut done);
        self.collapser.add_sorted(&mut done);
        (self.flush)(self.collapser.take(upper.max(self.suppress_before)));
        done
    }
}

/// Where stage 2 runs: on worker 0, or on its own thread.
enum Collapse<F> {
    Here(Box<Stage2<F>>),
    Thread(CollapseThread),
}

impl<F: FnMut(FlushBatch)> Collapse<F> {
    /// An empty buffer with capacity: the last one flushed here, or one the thread gave
    /// back (or a new one).
    fn spare(&mut self) -> Vec<(Emit, u64, isize)> {
        match self {
            Collapse::Here(stage) => std::mem::take(&mut stage.spare),
            Collapse::Thread(thread) => thread.back.try_recv().unwrap_or_default(),
        }
    }

    /// Flushes the changes completed below `upper` (here, or once the thread gets to them).
    fn flush(&mut self, done: Vec<(Emit, u64, isize)>, upper: u64) {
        match self {
            Collapse::Here(stage) => stage.spare = stage.flush(done, upper),
            Collapse::Thread(thread) => thread.send(done, upper),
        }
    }
}

/// Stage 2 on its own thread beside worker 0's. Worker 0 only moves the completed changes
/// to it; a bounded channel (two advances) makes worker 0 wait when the collapse falls
/// behind, so nothing piles up between them. Dropping it (the dataflow completing or
/// dropped) waits until every advance sent was flushed.
struct CollapseThread {
    to: Option<std::sync::mpsc::SyncSender<(Vec<(Emit, u64, isize)>, u64)>>,
    back: std::sync::mpsc::Receiver<Vec<(Emit, u64, isize)>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl CollapseThread {
    fn spawn<F: FnMut(FlushBatch) + Send + 'static>(suppress_before: Millis, flush: F) -> Self {
        let (to, from) = std::sync::mpsc::sync_channel::<(Vec<(Emit, u64, isize)>, u64)>(2);
        let (give_back, back) = std::sync::mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("hmis-gather".into())
            .spawn(move || {
                let mut stage = Stage2::new(suppress_before, flush);
                for (done, upper) in from {
                    // Worker 0 may be gone when the dataflow is dropped.
                    let _ = give_back.send(stage.flush(done, upper));
                }
            })
            .expect("spawn the gather's collapse thread");
        CollapseThread {
            to: Some(to),
            back,
            handle: Some(handle),
        }
    }

    fn send(&self, done: Vec<(Emit, u64, isize)>, upper: u64) {
        let to = self.to.as_ref().expect("open until dropped");
        if to.send((done, upper)).is_err() {
            // The thread ended: only when its flush callback panicked.
            panic!("the gather's collapse thread stopped");
        }
    }
}

impl Drop for CollapseThread {
    fn drop(&mut self) {
        drop(self.to.take());
        if let Some(h) = self.handle.take() {
            if h.join().is_err() && !std::thread::panicking() {
                panic!("the gather's collapse thread panicked");
            }
        }
    }
}

/// Stage 1 of the gather, on every worker: the worker's changes at or above
/// `suppress_before`, output in [`gather_order`] once their time is complete, one sorted
/// run per frontier advance. Holds one capability, at the least pending time.
fn sort_completed<'s>(updates: Updates<'s, Emit>, suppress_before: Millis) -> Updates<'s, Emit> {
    updates.unary_frontier::<CapacityContainerBuilder<Vec<(Emit, u64, isize)>>, _, _, _>(
        Pipeline,
        "GatherSort",
        move |cap: Capability<u64>, _info| {
            let mut cap = Some(cap);
            let mut pending: Vec<(Emit, u64, isize)> = Vec::new();
            let mut run: Vec<(Emit, u64, isize)> = Vec::new();
            move |(input, frontier), output| {
                input.for_each(|_cap, data| {
                    pending.extend(data.drain(..).filter(|u| u.1 >= suppress_before));
                });
                let upper = frontier.frontier().first().copied();
                let complete = |t: u64| upper.is_none_or(|f| t < f);
                if pending.iter().any(|u| complete(u.1)) {
                    run.extend(pending.extract_if(.., |u| complete(u.1)));
                    sort_in_gather_order(&mut run);
                    let held = cap
                        .as_ref()
                        .expect("a capability while changes are pending");
                    let at = held.delayed(&run[0].1);
                    output.session(&at).give_iterator(run.drain(..));
                }
                // Hold the capability at the least time a change may still be output.
                hold(&mut cap, pending.iter().map(|u| u.1).chain(upper).min());
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::partial::{CellCollapser, Merge, Partial};
    use super::*;
    use crate::output::{samples, OutRecord, OutTopic};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn readiness(wf: u32, def: u32, attempt: i32) -> Emit {
        Emit::row(samples::readiness(wf, def, attempt))
    }

    fn alert(id: u32, wf: u32, message: u32) -> Emit {
        Emit::row(samples::alert(id, wf, message))
    }

    fn record(wf: u32, rank: u8, id: u32) -> Emit {
        let wid: crate::model::Str = format!("wf-{wf}").into();
        Emit::record(
            (wid.clone(), rank),
            OutRecord {
                topic: OutTopic::Derived,
                event_id: format!("e-{id}"),
                event_type: "T".into(),
                key: Some(wid.to_string()),
                payload: format!("{{\"n\":{id}}}"),
            },
        )
    }

    fn random_update(rng: &mut StdRng) -> (Emit, isize) {
        let r = if rng.random_bool(0.4) { -1 } else { 1 };
        let e = match rng.random_range(0..10) {
            0..=3 => readiness(
                rng.random_range(0..4),
                rng.random_range(0..3),
                rng.random_range(1..3),
            ),
            4 => alert(
                rng.random_range(0..4),
                rng.random_range(0..4),
                rng.random_range(0..3),
            ),
            5..=7 => record(
                rng.random_range(0..4),
                rng.random_range(0..3),
                rng.random_range(0..12),
            ),
            8 => Emit::Retired(Owner::Workflow(
                format!("wf-{}", rng.random_range(0..4)).into(),
            )),
            _ => Emit::Offset(OffsetMark {
                topic: "t".into(),
                partition: rng.random_range(0..2),
                next_offset: rng.random_range(0..100),
            }),
        };
        (e, r)
    }

    /// The changes grouped by time, in time order.
    fn by_time(updates: &[(Emit, u64, isize)]) -> BTreeMap<u64, Vec<(Emit, isize)>> {
        let mut by_time: BTreeMap<u64, Vec<(Emit, isize)>> = BTreeMap::new();
        for (e, t, r) in updates {
            by_time.entry(*t).or_default().push((e.clone(), *r));
        }
        by_time
    }

    /// Up to `max` random changes at times 0..6.
    fn random_updates(rng: &mut StdRng, max: usize) -> Vec<(Emit, u64, isize)> {
        let n = rng.random_range(0..max);
        (0..n)
            .map(|_| {
                let (e, r) = random_update(rng);
                (e, rng.random_range(0..6), r)
            })
            .collect()
    }

    /// The batch stage 2 makes of `updates`: sorted into [`gather_order`], collapsed.
    fn collapsed(updates: &[(Emit, u64, isize)]) -> FlushBatch {
        let mut sorted = updates.to_vec();
        sort_in_gather_order(&mut sorted);
        let mut c = Collapser::default();
        c.add_sorted(&mut sorted);
        assert!(sorted.is_empty());
        c.take(0)
    }

    /// The collapse of a flush as the gather did it before it buffered one vector: per
    /// time, records sorted into publication order, the rest after them in arrival order,
    /// then `add_time`.
    fn per_time(updates: &[(Emit, u64, isize)]) -> FlushBatch {
        let key = |e: &Emit| match e {
            Emit::Record((wid, rank), rec) => (0, wid.to_string(), *rank, rec.event_id.clone()),
            _ => (1, String::new(), 0, String::new()),
        };
        let mut c = Collapser::default();
        for (_, ups) in by_time(updates) {
            let (mut ordered, rest): (Vec<_>, Vec<_>) = ups
                .into_iter()
                .partition(|(e, _)| matches!(e, Emit::Record(..)));
            ordered.sort_by_key(|a| key(&a.0));
            ordered.extend(rest);
            c.add_time(ordered);
        }
        c.take(0)
    }

    /// Every update is moved through the exchange, the output buffers and the sort: the
    /// large parts stay boxed.
    #[test]
    fn an_update_stays_small() {
        let size = std::mem::size_of::<(Emit, u64, isize)>();
        assert!(size <= 64, "(Emit, u64, isize) is {size} bytes");
    }

    #[test]
    fn rows_have_the_same_key_exactly_when_their_keys_are_equal() {
        let rows = [
            samples::readiness(1, 1, 1),
            samples::readiness(1, 1, 2),
            samples::readiness(1, 2, 1),
            samples::readiness(2, 1, 1),
            samples::alert(1, 1, 1),
            samples::alert(1, 2, 2),
            samples::alert(2, 1, 1),
        ];
        for a in &rows {
            for b in &rows {
                assert_eq!(a.same_key(b), a.key() == b.key(), "{a:?} {b:?}");
            }
        }
    }

    /// The rows of a flush, collapsed the simplest way (an ordered map by [`Row::key`], per
    /// time, retractions first): a fact's first write stands; a retraction deletes only the
    /// current value; an owner's row retracted where the owner retires is forgotten, not
    /// deleted.
    fn rows_by_key(updates: &[(Emit, u64, isize)]) -> Vec<((u8, Str, Str), Option<Row>)> {
        let mut rows: BTreeMap<(u8, Str, Str), Option<Row>> = BTreeMap::new();
        for (_, mut ups) in by_time(updates) {
            ups.sort_by_key(|u| u.1 > 0);
            let retired: Vec<Owner> = ups
                .iter()
                .filter_map(|(e, r)| match e {
                    Emit::Retired(o) if *r > 0 => Some(o.clone()),
                    _ => None,
                })
                .collect();
            for (e, r) in ups {
                let Emit::Row(row) = e else { continue };
                let row = Row::clone(&row);
                if r < 0 && row.owner().is_some_and(|o| retired.contains(&o)) {
                    continue;
                }
                let key = row.key();
                if r > 0 && row.is_fact() {
                    let slot = rows.entry(key).or_insert(None);
                    if slot.is_none() {
                        *slot = Some(row);
                    }
                } else if r > 0 {
                    rows.insert(key, Some(row));
                } else if r < 0 {
                    match rows.get_mut(&key) {
                        Some(Some(cur)) if *cur != row => {}
                        Some(slot) => *slot = None,
                        None => {
                            rows.insert(key, None);
                        }
                    }
                }
            }
        }
        rows.into_iter().collect()
    }

    #[test]
    fn rows_collapse_as_a_map_by_key_does() {
        for seed in 0..500 {
            let updates = random_updates(&mut StdRng::seed_from_u64(seed), 120);
            assert_eq!(
                collapsed(&updates).rows,
                rows_by_key(&updates),
                "seed {seed}"
            );
        }
    }

    /// Which worker produces a change: the owner's, as the keyed operators do (a row's key
    /// and its owner's retirement stay on one worker; offsets by partition).
    fn worker_of(e: &Emit, peers: usize) -> usize {
        let owner = match e {
            Emit::Row(row) => format!("{:?}", row.owner()),
            Emit::Record((wid, _), _) => format!("{:?}", Some(Owner::Workflow(wid.clone()))),
            Emit::Retired(o) => format!("{:?}", Some(o.clone())),
            Emit::Offset(m) => format!("partition {}", m.partition),
            Emit::Dead(d) => format!("dead {}", d.partition),
        };
        crate::engine::keyed::route(&owner) as usize % peers
    }

    /// Random changes at times 0..300 (alert ids unique per workflow, as real ones are).
    fn spread_updates(rng: &mut StdRng, max: usize) -> Vec<(Emit, u64, isize)> {
        let n = rng.random_range(0..max);
        (0..n)
            .map(|_| {
                let (e, r) = match rng.random_range(0..10) {
                    4 => {
                        let wf = rng.random_range(0..4);
                        let id = wf * 10 + rng.random_range(0..4);
                        let r = if rng.random_bool(0.3) { -1 } else { 1 };
                        (alert(id, wf, rng.random_range(0..3)), r)
                    }
                    _ => loop {
                        let (e, r) = random_update(rng);
                        if !matches!(&e, Emit::Row(row) if row.is_fact()) {
                            break (e, r);
                        }
                    },
                };
                (e, rng.random_range(0..300), r)
            })
            .collect()
    }

    /// The gather on the workers' partials, simulated: each worker cuts at its own random
    /// frontier sequence; worker 0 receives the partials interleaved at random.
    fn partial_flushes(
        updates: &[(Emit, u64, isize)],
        peers: usize,
        rng: &mut StdRng,
    ) -> Vec<FlushBatch> {
        let mut sent: Vec<std::collections::VecDeque<Partial>> = Vec::new();
        for w in 0..peers {
            let mut mine: Vec<_> = updates
                .iter()
                .filter(|u| worker_of(&u.0, peers) == w)
                .cloned()
                .collect();
            let mut cells = CellCollapser::default();
            let mut out = std::collections::VecDeque::new();
            let mut last = 0;
            while last < u64::MAX {
                let upper = if last > 300 || rng.random_bool(0.05) {
                    u64::MAX
                } else {
                    last + rng.random_range(1..60)
                };
                let mut done: Vec<_> = mine.extract_if(.., |u| u.1 < upper).collect();
                sort_in_gather_order(&mut done);
                out.extend(partial::advance(
                    &mut cells,
                    w,
                    last,
                    upper,
                    done.into_iter(),
                ));
                last = upper;
            }
            sent.push(out);
        }
        let mut merge = Merge::new(peers, 0);
        let mut flushes = Vec::new();
        while sent.iter().any(|q| !q.is_empty()) {
            let w = rng.random_range(0..peers);
            if let Some(p) = sent[w].pop_front() {
                merge.add(p);
                while let Some(b) = merge.next_flush() {
                    flushes.push(b);
                }
            }
        }
        flushes
    }

    #[test]
    fn merged_partials_flush_as_one_collapse() {
        for seed in 0..400 {
            let mut rng = StdRng::seed_from_u64(seed);
            let updates = spread_updates(&mut rng, 150);
            let peers = 1 + seed as usize % 3;
            let flushes = partial_flushes(&updates, peers, &mut rng);
            assert_eq!(
                flushes.last().map(|b| b.frontier),
                Some(u64::MAX),
                "seed {seed}"
            );
            let mut below = 0;
            for b in flushes {
                assert!(b.frontier > below, "seed {seed}: cuts advance");
                let part: Vec<_> = updates
                    .iter()
                    .filter(|u| below <= u.1 && u.1 < b.frontier)
                    .cloned()
                    .collect();
                let expected = collapsed(&part);
                let at = format!(
                    "seed {seed}, {peers} workers, flush [{below}, {})",
                    b.frontier
                );
                assert_eq!(b.rows, expected.rows, "{at}: rows");
                assert_eq!(b.records, expected.records, "{at}: records and their order");
                assert_eq!(b.offsets, expected.offsets, "{at}: offsets");
                assert_eq!(b.dead_letters, expected.dead_letters, "{at}: dead letters");
                below = b.frontier;
            }
        }
    }

    #[test]
    fn every_worker_cuts_at_the_coarsest_grid_in_use() {
        let cuts = |a, b| partial::cuts(a, b).collect::<Vec<_>>();
        // The multiples of the least power of ten with at most ten inside, then the end.
        assert_eq!(cuts(95, 150), vec![100, 110, 120, 130, 140, 150]);
        assert_eq!(cuts(100, 150), vec![110, 120, 130, 140, 150]);
        assert_eq!(cuts(0, 7), vec![1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(cuts(0, 11), (1..=11).collect::<Vec<_>>());
        assert_eq!(cuts(0, 12), vec![10, 12]);
        let thousands: Vec<u64> = (2..=9).map(|k| k * 1_000).chain([9_999]).collect();
        assert_eq!(cuts(1_234, 9_999), thousands);
        assert_eq!(cuts(9_999, 10_001), vec![10_000, 10_001]);
        // The input exhausted: one last cell.
        assert_eq!(cuts(5, u64::MAX), vec![u64::MAX]);
    }

    #[test]
    fn one_sorted_buffer_collapses_as_per_time_batches_did() {
        for seed in 0..300 {
            let updates = random_updates(&mut StdRng::seed_from_u64(seed), 80);
            let expected = per_time(&updates);
            let got = collapsed(&updates);
            assert_eq!(got.rows, expected.rows, "seed {seed}: rows");
            assert_eq!(
                got.records, expected.records,
                "seed {seed}: records and their order"
            );
            assert_eq!(got.offsets, expected.offsets, "seed {seed}: offsets");
        }
    }
}
