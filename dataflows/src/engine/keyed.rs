//! The keyed operator: per-key state, applied in stamp order, with per-worker timers.
//!
//! ```text
//!  records (data, stamp, ±1) ──exchange(hash(key))──┐
//!                                                   ├─► buffer by stamp ─► when the inputs'
//!  side records (definitions) ──broadcast───────────┘   frontier passes a stamp t:
//!                                                         side(t), then per key (in key order):
//!                                                         step(key, t, its records at t in
//!                                                         (topic, partition, offset) order)
//!  timers: BTreeSet<(ms, key)> ──────────────────────────► a key due at t is stepped at t too
//!                                                         │
//!                                                         ▼ (out, t, ±1)
//! ```
//!
//! The stamp is the timely time of today's collections (the pipeline clock in ms), so the
//! operator reads a `VecCollection`'s `inner` stream and its output is one again. A key is
//! stepped at most once per stamp, with every record of that stamp for it, after the side
//! records of the stamp: the logic sees the state as of the whole instant, as differential's
//! `reduce` does, and what it outputs is stamped `t`.
//!
//! **Timers** are per worker: a step asks to be woken at a later instant (`Ctx::wake_at`),
//! and the key is stepped at that instant, records or not, once the frontier has passed it.
//! Cancellation is lazy: a wake that is no longer needed is a step that changes nothing.
//! When the inputs are exhausted (empty frontier) every instant is complete: the pending
//! timers fire, in order, as the differential chain's delayed updates do (a driver stops
//! reading outputs past its end).
//!
//! **One capability**, held at the least of the input frontier, the earliest buffered stamp
//! and the earliest timer. The updates output while processing a run of stamps go out as
//! one message at the run's first stamp, each update carrying its own stamp (an update's
//! time may exceed its message's; the gather groups by the update's time).

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};

use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::vec::Broadcast;
use timely::dataflow::operators::Capability;
use timely::dataflow::Stream;
use timely::ExchangeData;

/// A stream of differential-style updates at pipeline-ms stamps.
pub type Updates<'s, D> = Stream<'s, u64, Vec<(D, u64, isize)>>;

/// The per-key logic a [`keyed`] operator drives. It owns the state of its worker's keys.
pub trait KeyedLogic: 'static {
    /// What records are grouped by (and exchanged by: equal keys meet on one worker).
    type Key: Clone + Ord + Hash + 'static;
    /// Keyed input records.
    type Rec: ExchangeData + Clone;
    /// Records every worker receives (e.g. definitions).
    type Side: ExchangeData + Clone;
    /// Outputs.
    type Out: Clone + 'static;
    /// The order records of one key are applied in within one stamp (e.g. (topic,
    /// partition, offset)); ties keep arrival order, so make it total.
    type Order: Ord;

    fn key(rec: &Self::Rec) -> Self::Key;
    fn order(rec: &Self::Rec) -> Self::Order;

    /// Applies the side records of stamp `t` (before any key is stepped at `t`); pushes the
    /// keys that must be stepped at `t` because of them.
    fn side(&mut self, t: u64, side: Vec<(Self::Side, isize)>, touched: &mut Vec<Self::Key>);

    /// Steps `key` at stamp `t` with its records of that stamp (possibly none: a timer or a
    /// side record woke it), in [`KeyedLogic::order`].
    fn step(
        &mut self,
        key: &Self::Key,
        t: u64,
        recs: Vec<(Self::Rec, isize)>,
        cx: &mut Ctx<Self::Out>,
    );
}

/// What a step can do besides changing its state: output updates, ask to be woken.
pub struct Ctx<O> {
    out: Vec<(O, isize)>,
    wakes: Vec<u64>,
    exhausted: bool,
    touched: bool,
}

impl<O> Ctx<O> {
    /// Outputs `o` with `diff` at the stamp being stepped.
    pub fn give(&mut self, o: O, diff: isize) {
        self.out.push((o, diff));
    }
    /// Steps this key again at `ms` (ignored unless later than the stamp being stepped).
    pub fn wake_at(&mut self, ms: u64) {
        self.wakes.push(ms);
    }
    /// Whether the inputs are exhausted: the step runs only because every instant is
    /// complete once they are (pending timers fire; a driver reads nothing past its end).
    /// Decisions that change no output there (the lifecycle's) can be skipped, as the old
    /// core's tracker drops its timers then.
    pub fn exhausted(&self) -> bool {
        self.exhausted
    }
    /// Whether the key is stepped because [`KeyedLogic::side`] named it at this stamp.
    pub fn touched(&self) -> bool {
        self.touched
    }
}

/// Holds `cap` at `at`, the least time its operator may still output at (`None`: nothing
/// more, the capability is dropped).
pub(crate) fn hold(cap: &mut Option<Capability<u64>>, at: Option<u64>) {
    match at {
        None => *cap = None,
        Some(h) => {
            if let Some(c) = cap.as_mut() {
                if h > *c.time() {
                    c.downgrade(&h);
                }
            }
        }
    }
}

/// The hash a key is exchanged by: the same on every worker and in every run.
pub fn route<K: Hash>(k: &K) -> u64 {
    // `DefaultHasher::new()` is SipHash with fixed keys: deterministic across processes.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    k.hash(&mut h);
    h.finish()
}

/// Per-worker counters, for tests and benchmarks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Distinct stamps processed.
    pub stamps: u64,
    /// Key steps.
    pub steps: u64,
    /// Timer wakes that stepped a key.
    pub fired: u64,
}

/// Runs `logic` (one per worker, made by `make(worker index)`) over `records`, keyed by
/// [`KeyedLogic::key`], with `side` broadcast to every worker. See the module doc.
pub fn keyed<'s, L: KeyedLogic>(
    records: Updates<'s, L::Rec>,
    side: Updates<'s, L::Side>,
    name: &str,
    make: impl FnOnce(usize) -> L,
) -> Updates<'s, L::Out> {
    let index = records.scope().index();
    let mut logic = make(index);
    records.binary_frontier::<_, CapacityContainerBuilder<Vec<(L::Out, u64, isize)>>, _, _, _, _>(
        side.broadcast(),
        Exchange::new(|u: &(L::Rec, u64, isize)| route(&L::key(&u.0))),
        Pipeline,
        name,
        move |cap: Capability<u64>, _info| {
            let mut cap = Some(cap);
            let mut buffer: BTreeMap<u64, Vec<(L::Rec, isize)>> = BTreeMap::new();
            let mut side_buf: BTreeMap<u64, Vec<(L::Side, isize)>> = BTreeMap::new();
            let mut timers: BTreeSet<(u64, L::Key)> = BTreeSet::new();
            move |(recs, rec_f), (sides, side_f), output| {
                recs.for_each(|_cap, batch| {
                    for (r, t, d) in batch.drain(..) {
                        buffer.entry(t).or_default().push((r, d));
                    }
                });
                sides.for_each(|_cap, batch| {
                    for (s, t, d) in batch.drain(..) {
                        side_buf.entry(t).or_default().push((s, d));
                    }
                });
                // The least time either input may still deliver (None: both exhausted).
                let lower = |f: &timely::progress::frontier::MutableAntichain<u64>| {
                    f.frontier().iter().next().copied()
                };
                let frontier = match (lower(rec_f), lower(side_f)) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                let complete = |t: u64| frontier.is_none_or(|f| t < f);
                // What this activation outputs, each update at its own stamp (module doc).
                let mut produced: Vec<(L::Out, u64, isize)> = Vec::new();
                loop {
                    let next = [
                        buffer.first_key_value().map(|(t, _)| *t),
                        side_buf.first_key_value().map(|(t, _)| *t),
                        timers.first().map(|(t, _)| *t),
                    ]
                    .into_iter()
                    .flatten()
                    .min();
                    let Some(t) = next.filter(|&t| complete(t)) else {
                        break;
                    };
                    let mut touched = Vec::new();
                    if side_buf.first_key_value().is_some_and(|(s, _)| *s == t) {
                        let s = side_buf.pop_first().expect("first").1;
                        logic.side(t, s, &mut touched);
                    }
                    // Per key: its records, and whether the side records touched it.
                    let mut by_key: BTreeMap<L::Key, (Vec<(L::Rec, isize)>, bool)> =
                        BTreeMap::new();
                    if buffer.first_key_value().is_some_and(|(b, _)| *b == t) {
                        for (r, d) in buffer.pop_first().expect("first").1 {
                            by_key.entry(L::key(&r)).or_default().0.push((r, d));
                        }
                    }
                    while timers.first().is_some_and(|(w, _)| *w == t) {
                        let (_, k) = timers.pop_first().expect("first");
                        by_key.entry(k).or_default();
                    }
                    for k in touched {
                        by_key.entry(k).or_default().1 = true;
                    }
                    let mut cx = Ctx {
                        out: Vec::new(),
                        wakes: Vec::new(),
                        exhausted: frontier.is_none(),
                        touched: false,
                    };
                    for (k, (mut rs, touched)) in by_key {
                        // Stable: equal orders keep arrival order.
                        rs.sort_by_key(|(r, _)| L::order(r));
                        cx.touched = touched;
                        logic.step(&k, t, rs, &mut cx);
                        for w in cx.wakes.drain(..) {
                            if w > t {
                                timers.insert((w, k.clone()));
                            }
                        }
                    }
                    produced.extend(cx.out.into_iter().map(|(o, d)| (o, t, d)));
                }
                // Stamps are processed in order: the first update's is the least.
                if let Some(&(_, t, _)) = produced.first() {
                    let held = cap.as_ref().expect("a capability while stamps are pending");
                    let at = held.delayed(&t);
                    output.session(&at).give_iterator(produced.into_iter());
                }
                // Hold the one capability at the earliest time anything can still be output.
                let hold = [
                    frontier,
                    buffer.first_key_value().map(|(t, _)| *t),
                    side_buf.first_key_value().map(|(t, _)| *t),
                    timers.first().map(|(t, _)| *t),
                ]
                .into_iter()
                .flatten()
                .min();
                self::hold(&mut cap, hold);
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use timely::dataflow::operators::capture::{Capture, Extract};
    use timely::dataflow::InputHandle;

    /// A test logic: records `(key, offset, wake)`; each step outputs
    /// `"key@t:[offsets in order]"` (`[]` for a timer step), a side record `(key)` steps
    /// that key; `wake` > 0 asks for a wake at that ms.
    struct Probe;

    impl KeyedLogic for Probe {
        type Key = String;
        type Rec = (String, i64, u64);
        type Side = String;
        type Out = String;
        type Order = i64;
        fn key(r: &Self::Rec) -> String {
            r.0.clone()
        }
        fn order(r: &Self::Rec) -> i64 {
            r.1
        }
        fn side(&mut self, _t: u64, side: Vec<(String, isize)>, touched: &mut Vec<String>) {
            touched.extend(side.into_iter().map(|(k, _)| k));
        }
        fn step(
            &mut self,
            key: &String,
            t: u64,
            recs: Vec<(Self::Rec, isize)>,
            cx: &mut Ctx<String>,
        ) {
            let offs: Vec<i64> = recs.iter().map(|(r, _)| r.1).collect();
            for (r, _) in &recs {
                if r.2 > 0 {
                    cx.wake_at(r.2);
                }
            }
            cx.give(format!("{key}@{t}:{offs:?}"), 1);
        }
    }

    /// Feeds `(stamp, record)` (non-decreasing stamps) and side records, advancing the
    /// inputs to each stamp as it goes, then to `end`; returns the outputs by stamp.
    fn run_probe(
        workers: usize,
        feed: Vec<(u64, (String, i64, u64))>,
        side: Vec<(u64, String)>,
        end: u64,
    ) -> Vec<(u64, String)> {
        let got = Arc::new(Mutex::new(Vec::new()));
        let shared = got.clone();
        timely::execute(timely::Config::process(workers), move |worker| {
            let (index, peers) = (worker.index(), worker.peers());
            let (tx, rx) = std::sync::mpsc::channel();
            let (mut recs, mut sides) = worker.dataflow::<u64, _, _>(|scope| {
                let mut recs = InputHandle::new();
                let mut sides = InputHandle::new();
                let r = recs.to_stream(scope);
                let s = sides.to_stream(scope);
                keyed(r, s, "Probe", |_| Probe).capture_into(tx);
                (recs, sides)
            });
            let mut side = side.clone().into_iter().peekable();
            for (i, (t, r)) in feed.iter().enumerate() {
                if *t > *recs.time() {
                    recs.advance_to(*t);
                    sides.advance_to(*t);
                    worker.step();
                }
                while let Some((st, s)) = side.next_if(|(st, _)| *st <= *t) {
                    if index == 0 {
                        sides.send((s, st.max(*sides.time()), 1isize));
                    }
                }
                if i % peers == index {
                    recs.send((r.clone(), *t, 1isize));
                }
            }
            recs.advance_to(end);
            sides.advance_to(end);
            drop((recs, sides));
            while worker.step() {}
            let mut out: Vec<(u64, String)> = rx
                .extract()
                .into_iter()
                .flat_map(|(_, v)| v.into_iter().map(|(o, t, _)| (t, o)))
                .collect();
            out.sort();
            shared.lock().unwrap().extend(out);
        })
        .expect("timely");
        let mut v = got.lock().unwrap().clone();
        v.sort();
        v
    }

    fn rec(k: &str, off: i64, wake: u64) -> (String, i64, u64) {
        (k.to_string(), off, wake)
    }

    #[test]
    fn records_of_a_stamp_are_applied_in_order_once_per_key() {
        // Arrival order 3, 1, 2 at stamp 10: one step with [1, 2, 3].
        let feed = vec![
            (10, rec("a", 3, 0)),
            (10, rec("a", 1, 0)),
            (10, rec("b", 7, 0)),
            (10, rec("a", 2, 0)),
            (12, rec("a", 4, 0)),
        ];
        for workers in [1, 3] {
            let out = run_probe(workers, feed.clone(), vec![], 20);
            assert_eq!(
                out,
                vec![
                    (10, "a@10:[1, 2, 3]".to_string()),
                    (10, "b@10:[7]".to_string()),
                    (12, "a@12:[4]".to_string()),
                ],
                "{workers} workers"
            );
        }
    }

    #[test]
    fn a_timer_steps_its_key_at_its_instant_once_the_frontier_passes_it() {
        // Wake at 16 (a deadline of 15, fired at d + 1), between records at 10 and 30;
        // a wake at 100 is past the end, and fires when the inputs are exhausted; a wake at
        // or before its own stamp is ignored.
        let feed = vec![
            (10, rec("a", 1, 16)),
            (10, rec("b", 2, 10)),
            (30, rec("b", 3, 100)),
        ];
        for workers in [1, 3] {
            let out = run_probe(workers, feed.clone(), vec![], 50);
            assert_eq!(
                out,
                vec![
                    (10, "a@10:[1]".to_string()),
                    (10, "b@10:[2]".to_string()),
                    (16, "a@16:[]".to_string()),
                    (30, "b@30:[3]".to_string()),
                    (100, "b@100:[]".to_string()),
                ],
                "{workers} workers"
            );
        }
    }

    #[test]
    fn a_timer_due_at_a_stamp_with_records_steps_the_key_once() {
        let feed = vec![(10, rec("a", 1, 20)), (20, rec("a", 2, 0))];
        let out = run_probe(2, feed, vec![], 30);
        assert_eq!(
            out,
            vec![(10, "a@10:[1]".to_string()), (20, "a@20:[2]".to_string())]
        );
    }

    #[test]
    fn side_records_reach_every_worker_and_step_the_keys_they_name() {
        let feed = vec![
            (10, rec("a", 1, 0)),
            (10, rec("b", 2, 0)),
            (20, rec("c", 3, 0)),
        ];
        let side = vec![(20, "a".to_string()), (20, "b".to_string())];
        for workers in [1, 3] {
            let out = run_probe(workers, feed.clone(), side.clone(), 30);
            // Each worker steps the side's keys: a key whose owner is another worker has no
            // state there, but the probe outputs anyway, so count per worker.
            let at20: Vec<_> = out.iter().filter(|(t, _)| *t == 20).collect();
            assert_eq!(at20.iter().filter(|(_, o)| o == "a@20:[]").count(), workers);
            assert_eq!(at20.iter().filter(|(_, o)| o == "c@20:[3]").count(), 1);
        }
    }
}
