//! The gather's collapse on every worker (with as many workers as cores, or more): each
//! worker collapses its own completed changes into [`Partial`]s, one per *cell* of stamps,
//! and worker 0 only merges the partials of all workers at cuts every worker made.
//!
//! **Why cells.** A flush at `X` holds every change below `X` and none above (the sink
//! commits it with its offsets and frontier). A partial collapsed over `[a, b)` cannot be
//! split, so `X` must be a boundary of every worker's partials. Workers see different
//! frontier sequences (worker A may pass 90 and 110 where worker B passes 100), so cutting
//! where each saw its frontier alone would leave no common cut while the frontier keeps
//! moving. Every worker also cuts at the points of a decimal grid: an activation that moves
//! a worker's frontier over a span of stamps cuts at the multiples of `g` inside it, `g` the
//! least power of ten with at most [`INNER_CUTS`] of them ([`cuts`]). The grids are nested,
//! so every multiple of the coarsest `g` in use is a cut of every worker (at most about one
//! advance apart), and the frontier's last value, where it stops, is one too (every worker
//! is woken with it). Consecutive cells without changes go as one partial: a cut anywhere
//! inside it splits nothing.
//!
//! **What a partial holds**: rows by key, each as what the cell did to it
//! ([`CellRow`]: its final value when the cell wrote it, or the retractions and facts
//! whose effect depends on the value before the cell); records in gather order with their
//! sort keys, duplicates within the cell removed; dead letters; the highest offset per
//! partition. Worker 0 merges the partials of a flush: rows by key in time order (a row's
//! changes come from the worker that owns its workflow or order), records by their sort
//! keys with duplicates removed across partials, offsets by maximum. The result is the batch
//! [`super::Collapser`] makes of the same changes (`merged_partials_flush_as_one_collapse`).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{apply_row, for_each_time, forgotten, keep_highest, offset_marks, Fast, Seen};
use crate::model::Str;
use crate::output::{DeadLetter, FlushBatch, Millis, OutRecord, Row};
use crate::Emit;

/// A row's primary key ([`Row::key`]).
pub(crate) type RowKey = (u8, Str, Str);

/// What one cell did to a row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum CellRow {
    /// The row's value after the cell, whatever it was before (the cell wrote it; `None`:
    /// deleted after).
    Set(Option<Arc<Row>>),
    /// Changes whose effect depends on the value before the cell (retractions, facts), in
    /// order.
    Ops(Vec<(Arc<Row>, isize)>),
}

impl CellRow {
    /// Adds one change (retractions of a time before its insertions, as the collapse).
    fn add(slot: &mut Option<CellRow>, row: Arc<Row>, r: isize) {
        match slot {
            Some(CellRow::Set(v)) => {
                let mut cur = Some(v.take());
                apply_row(&mut cur, row, r);
                *v = cur.expect("a value once applied");
            }
            _ if r > 0 && !row.is_fact() => *slot = Some(CellRow::Set(Some(row))),
            Some(CellRow::Ops(ops)) => ops.push((row, r)),
            None => *slot = Some(CellRow::Ops(vec![(row, r)])),
        }
    }

    /// Applies the cell to what the batch holds for the row (`None`: untouched so far).
    fn apply(self, slot: &mut Option<Option<Arc<Row>>>) {
        match self {
            CellRow::Set(v) => *slot = Some(v),
            CellRow::Ops(ops) => {
                for (row, r) in ops {
                    apply_row(slot, row, r);
                }
            }
        }
    }
}

/// A record's place in a batch: (time, dead letter?, workflow, type rank); derived records
/// then by eventId, dead letters in arrival order (see `gather_order`).
pub(crate) type RecKey = (u64, bool, Str, u8);

/// The order of records in a batch (see [`RecKey`]).
fn record_order(a: &(RecKey, OutRecord), b: &(RecKey, OutRecord)) -> std::cmp::Ordering {
    let ((ta, da, wa, ra), (tb, db, wb, rb)) = (&a.0, &b.0);
    (ta, da, wa, ra).cmp(&(tb, db, wb, rb)).then_with(|| {
        if *da {
            std::cmp::Ordering::Equal
        } else {
            a.1.event_id.cmp(&b.1.event_id)
        }
    })
}

/// One worker's changes of the stamps in `[from, to)`, collapsed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Partial {
    pub(crate) worker: usize,
    pub(crate) from: u64,
    pub(crate) to: u64,
    /// Sorted by key, each with the least time it was changed at in the cell.
    rows: Vec<(RowKey, u64, CellRow)>,
    /// In gather order; a (topic, eventId) once.
    records: Vec<(RecKey, OutRecord)>,
    dead: Vec<(u64, DeadLetter)>,
    offsets: Vec<((String, i32), i64)>,
}

impl Partial {
    fn is_empty(&self) -> bool {
        self.rows.is_empty()
            && self.records.is_empty()
            && self.dead.is_empty()
            && self.offsets.is_empty()
    }
}

/// The points a worker cuts its changes at when its frontier moves from `last` to `upper`:
/// the multiples of a power of ten `g` inside the span, `g` the least with at most
/// [`INNER_CUTS`] of them, then `upper` (module doc). `upper` = `u64::MAX` (the input
/// exhausted) is one cell.
pub(crate) fn cuts(last: u64, upper: u64) -> impl Iterator<Item = u64> {
    debug_assert!(upper > last);
    // Multiples of g in (last, upper): ⌊(upper - 1) / g⌋ - ⌊last / g⌋.
    let inner = |g: u64| (upper - 1) / g - last / g;
    let mut g: u64 = 1;
    while inner(g) > INNER_CUTS && g <= u64::MAX / 10 {
        g *= 10;
    }
    let n = if upper == u64::MAX { 0 } else { inner(g) };
    let first = last / g + 1;
    (0..n)
        .map(move |i| (first + i) * g)
        .chain(std::iter::once(upper))
}

/// At most this many cuts inside one frontier advance, on the grid (module doc). With one
/// (the least power of ten ≥ the advance) the multiples every worker cuts at were up to ten
/// advances apart; live at 10K records/s (event clock) p50 239-451 ms against 183-276 on
/// worker 0's collapse; with ten, 197-327 (same runs; bench/results/latency-at-rate-10k-
/// event-s20-*). The benchmark's throughput did not move beyond its noise either way.
const INNER_CUTS: u64 = 10;

/// The partials of one frontier advance of worker `worker` from `last` to `upper`: its
/// completed changes (sorted in gather order, all in `[last, upper)`) collapsed per cell
/// between [`cuts`], consecutive empty cells as one.
pub(crate) fn advance(
    cells: &mut CellCollapser,
    worker: usize,
    last: u64,
    upper: u64,
    completed: impl Iterator<Item = (Emit, u64, isize)>,
) -> Vec<Partial> {
    let mut out: Vec<Partial> = Vec::new();
    let mut rest = completed.peekable();
    let mut from = last;
    for to in cuts(last, upper) {
        let changes = std::iter::from_fn(|| rest.next_if(|u| u.1 < to));
        let p = cells.collapse(worker, from, to, changes);
        match out.last_mut() {
            Some(prev) if prev.is_empty() && p.is_empty() => prev.to = to,
            _ => out.push(p),
        }
        from = to;
    }
    debug_assert!(rest.next().is_none(), "every change below {upper}");
    out
}

/// Collapses changes sorted in gather order, all at times in `[from, to)`, into a partial.
#[derive(Default)]
pub(crate) struct CellCollapser {
    rows: HashMap<RowKey, (u64, Option<CellRow>), Fast>,
    seen: Seen,
    /// One time's changes, while they are grouped ([`for_each_time`]).
    time: Vec<(Emit, isize)>,
}

impl CellCollapser {
    pub(crate) fn collapse(
        &mut self,
        worker: usize,
        from: u64,
        to: u64,
        changes: impl Iterator<Item = (Emit, u64, isize)>,
    ) -> Partial {
        let mut p = Partial {
            worker,
            from,
            to,
            ..Partial::default()
        };
        let mut offsets: BTreeMap<(String, i32), i64> = BTreeMap::new();
        let CellCollapser { rows, seen, time } = self;
        for_each_time(changes, time, |t, e, r, retired| {
            debug_assert!(from <= t && t < to, "{t} outside [{from}, {to})");
            match e {
                Emit::Row(row) if !forgotten(&row, r, retired) => {
                    let slot = rows.entry(row.key()).or_insert((t, None));
                    CellRow::add(&mut slot.1, row, r);
                }
                Emit::Record((wid, rank), rec)
                    if r > 0 && seen.first(&p.records, &rec, |k| &k.1) =>
                {
                    p.records.push(((t, false, wid, rank), *rec));
                }
                Emit::Dead(d) if r > 0 => {
                    let rec = d.to_record();
                    if seen.first(&p.records, &rec, |k| &k.1) {
                        p.records.push(((t, true, Str::default(), 0), rec));
                    }
                    p.dead.push((t, *d));
                }
                Emit::Offset(m) if r > 0 => {
                    keep_highest(&mut offsets, (m.topic, m.partition), m.next_offset)
                }
                _ => {}
            }
        });
        p.rows = self
            .rows
            .drain()
            .map(|(k, (t, c))| (k, t, c.expect("a change made the entry")))
            .collect();
        p.rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        p.offsets = offsets.into_iter().collect();
        self.seen.clear();
        p
    }
}

/// Worker 0's side: the partials of every worker, merged into one batch per common cut.
pub(crate) struct Merge {
    suppress_before: Millis,
    /// Per worker, the partials not flushed yet, in stamp order.
    pending: Vec<VecDeque<Partial>>,
    /// Per worker, the end of its last partial.
    reached: Vec<u64>,
    /// The last cut flushed.
    flushed: u64,
    seen: Seen,
    /// The merge's buffers, kept between flushes: allocated anew at each flush (grown
    /// by doubling), they were fresh pages every time, zeroed by the kernel (half of the
    /// merge's time in page faults, 3 % of the workers').
    rows: Vec<(RowKey, u64, CellRow)>,
    records: Vec<(RecKey, OutRecord)>,
}

impl Merge {
    pub(crate) fn new(peers: usize, suppress_before: Millis) -> Merge {
        Merge {
            suppress_before,
            pending: (0..peers).map(|_| VecDeque::new()).collect(),
            reached: vec![0; peers],
            flushed: 0,
            seen: Seen::default(),
            rows: Vec::new(),
            records: Vec::new(),
        }
    }

    /// Adds a worker's next partial. Timely's channels deliver the messages between two
    /// workers in the order they were sent, so each worker's partials arrive contiguous.
    pub(crate) fn add(&mut self, p: Partial) {
        let w = p.worker;
        debug_assert_eq!(
            p.from, self.reached[w],
            "worker {w}'s partials are contiguous"
        );
        self.reached[w] = p.to;
        self.pending[w].push_back(p);
    }

    /// Whether a cut at `x` is one worker `w` made: reached, splitting no partial of it that
    /// holds changes.
    fn made_cut(&self, w: usize, x: u64) -> bool {
        x <= self.reached[w]
            && !self.pending[w]
                .iter()
                .any(|p| p.from < x && x < p.to && !p.is_empty())
    }

    /// The greatest cut every worker made, if above the last one flushed.
    fn common_cut(&self) -> Option<u64> {
        let reach = self.reached.iter().copied().min()?;
        let candidates = self
            .pending
            .iter()
            .flatten()
            .flat_map(|p| [p.from, p.to])
            .chain(std::iter::once(reach))
            .filter(|x| *x <= reach && *x > self.flushed);
        let mut best: Option<u64> = None;
        for x in candidates {
            if best.is_none_or(|b| x > b) && (0..self.pending.len()).all(|w| self.made_cut(w, x)) {
                best = Some(x);
            }
        }
        best
    }

    /// The batch of the next common cut, if every worker has made one since the last.
    pub(crate) fn next_flush(&mut self) -> Option<FlushBatch> {
        let x = self.common_cut()?;
        self.flushed = x;
        // The partials below the cut, by (start, worker): a worker's in stamp order.
        let mut parts: Vec<Partial> = Vec::new();
        for q in &mut self.pending {
            while q.front().is_some_and(|p| p.to <= x) {
                parts.push(q.pop_front().expect("front"));
            }
            if q.front().is_some_and(|p| p.from < x) {
                // An empty partial straddling the cut: its part below is flushed now.
                let p = q.front_mut().expect("front");
                debug_assert!(p.is_empty());
                p.from = x;
            }
        }
        parts.sort_by_key(|p| (p.from, p.worker));
        Some(self.merge(parts, x))
    }

    fn merge(&mut self, parts: Vec<Partial>, x: u64) -> FlushBatch {
        let (mut rows, mut records) = (
            std::mem::take(&mut self.rows),
            std::mem::take(&mut self.records),
        );
        rows.reserve(parts.iter().map(|p| p.rows.len()).sum());
        records.reserve(parts.iter().map(|p| p.records.len()).sum());
        let mut dead: Vec<(u64, DeadLetter)> = Vec::new();
        let mut offsets: BTreeMap<(String, i32), i64> = BTreeMap::new();
        for p in parts {
            rows.extend(p.rows);
            records.extend(p.records);
            dead.extend(p.dead);
            for (k, o) in p.offsets {
                keep_highest(&mut offsets, k, o);
            }
        }
        // Stable: equal keys keep the partials' order (a worker's cells in stamp order).
        rows.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
        let mut merged: Vec<(RowKey, Option<Row>)> = Vec::with_capacity(rows.len());
        let mut it = rows.drain(..).peekable();
        while let Some((key, _, cell)) = it.next() {
            let mut slot = None;
            cell.apply(&mut slot);
            while let Some((_, _, more)) = it.next_if(|n| n.0 == key) {
                more.apply(&mut slot);
            }
            if let Some(value) = slot {
                merged.push((key, value.map(Arc::unwrap_or_clone)));
            }
        }
        drop(it);
        // Each partial's records are in order: merged by a stable sort (it finds the runs).
        if !records
            .windows(2)
            .all(|w| record_order(&w[0], &w[1]) != std::cmp::Ordering::Greater)
        {
            records.sort_by(record_order);
        }
        let mut kept: Vec<(RecKey, OutRecord)> = Vec::with_capacity(records.len());
        for r in records.drain(..) {
            if self.seen.first(&kept, &r.1, |k| &k.1) {
                kept.push(r);
            }
        }
        self.seen.clear();
        (self.rows, self.records) = (rows, records);
        dead.sort_by_key(|d| d.0);
        FlushBatch {
            frontier: x.max(self.suppress_before),
            rows: merged,
            records: kept.into_iter().map(|r| r.1).collect(),
            dead_letters: dead.into_iter().map(|d| d.1).collect(),
            offsets: offset_marks(offsets),
        }
    }
}
