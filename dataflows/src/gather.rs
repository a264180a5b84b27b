//! Gathering: from timestamped changes to [`FlushBatch`]es, one per frontier advance.
//!
//! All workers' [`Emit`]s are exchanged to worker 0, which buffers them by pipeline time.
//! When the frontier passes a time, every change at that time is final; the operator then
//! hands the completed times, collapsed into one [`FlushBatch`], to a callback (the sink).
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

use std::collections::{BTreeMap, HashSet};

use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::progress::frontier::AntichainRef;

use differential_dataflow::VecCollection;

use crate::output::{FlushBatch, Millis, OffsetMark, Owner};
use crate::Emit;

/// Accumulates the changes of completed times into a batch. Public so tests and the
/// reference comparison can collapse captured output exactly as the sink would.
#[derive(Default)]
pub struct Collapser {
    rows: BTreeMap<
        (u8, crate::model::Str, crate::model::Str),
        Option<std::sync::Arc<crate::output::Row>>,
    >,
    records: Vec<crate::output::OutRecord>,
    seen: HashSet<(crate::output::OutTopic, String)>,
    dead: Vec<crate::output::DeadLetter>,
    offsets: BTreeMap<(String, i32), i64>,
}

impl Collapser {
    /// Adds all changes of one time (any order within the time).
    pub fn add_time(&mut self, updates: Vec<(Emit, isize)>) {
        // Retractions first, so a row replaced at this time ends at its new value (a stable
        // partition: each part keeps its order).
        let (mut updates, pos): (Vec<_>, Vec<_>) = updates.into_iter().partition(|u| u.1 <= 0);
        updates.extend(pos);
        // State retired at this time: its rows' retractions forget, they do not delete.
        let retired: HashSet<Owner> = updates
            .iter()
            .filter_map(|(e, r)| match e {
                Emit::Retired(o) if *r > 0 => Some(o.clone()),
                _ => None,
            })
            .collect();
        for (e, r) in updates {
            match e {
                Emit::Row(row) => {
                    if r < 0
                        && !retired.is_empty()
                        && row.owner().is_some_and(|o| retired.contains(&o))
                    {
                        continue;
                    }
                    let key = row.key();
                    if r > 0 && row.is_fact() {
                        // Raised or appended once: the first write stands (the records
                        // keep their first copy too, below).
                        let slot = self.rows.entry(key).or_insert(None);
                        if slot.is_none() {
                            *slot = Some(row);
                        }
                    } else if r > 0 {
                        self.rows.insert(key, Some(row));
                    } else if r < 0 {
                        // Only delete when the current value is the one retracted.
                        let current = match self.rows.get(&key) {
                            None | Some(None) => true,
                            Some(Some(cur)) => **cur == *row,
                        };
                        if current {
                            self.rows.insert(key, None);
                        }
                    }
                }
                Emit::Record(_, rec)
                    if r > 0 && self.seen.insert((rec.topic, rec.event_id.clone())) =>
                {
                    self.records.push(rec);
                }
                Emit::Dead(d) if r > 0 => {
                    let rec = d.to_record();
                    if self.seen.insert((rec.topic, rec.event_id.clone())) {
                        self.records.push(rec);
                    }
                    self.dead.push(d);
                }
                Emit::Offset(m) if r > 0 => {
                    let e = self
                        .offsets
                        .entry((m.topic, m.partition))
                        .or_insert(m.next_offset);
                    *e = (*e).max(m.next_offset);
                }
                _ => {}
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
            && self.records.is_empty()
            && self.dead.is_empty()
            && self.offsets.is_empty()
    }

    /// Takes the batch accumulated so far.
    pub fn take(&mut self, frontier: Millis) -> FlushBatch {
        let rows = std::mem::take(&mut self.rows)
            .into_iter()
            .map(|(k, v)| (k, v.map(std::sync::Arc::unwrap_or_clone)))
            .collect();
        self.seen.clear();
        FlushBatch {
            frontier,
            rows,
            records: std::mem::take(&mut self.records),
            dead_letters: std::mem::take(&mut self.dead),
            offsets: std::mem::take(&mut self.offsets)
                .into_iter()
                .map(|((topic, partition), next_offset)| OffsetMark {
                    topic,
                    partition,
                    next_offset,
                })
                .collect(),
        }
    }
}

/// Sorts one time's updates into publication order: by (workflow, type rank), then the rest.
fn order_key(e: &Emit) -> (u8, &str, u8, &str) {
    match e {
        Emit::Record((wid, rank), rec) => (0, wid.as_str(), *rank, rec.event_id.as_str()),
        _ => (1, "", 0, ""),
    }
}

/// Extension trait: gather a collection of [`Emit`] into flush batches on worker 0.
pub trait Gather {
    /// Calls `flush` with every batch of completed times at or above `suppress_before`.
    /// `flush` is also called, with an empty batch, when the frontier advances without
    /// changes, so the sink can record the clock's progress. Its frontier is
    /// `u64::MAX` once the input is exhausted.
    fn gather<F: FnMut(FlushBatch) + 'static>(self, suppress_before: Millis, flush: F);
}

impl Gather for VecCollection<'_, u64, Emit> {
    fn gather<F: FnMut(FlushBatch) + 'static>(self, suppress_before: Millis, mut flush: F) {
        let mut pending: BTreeMap<u64, Vec<(Emit, isize)>> = BTreeMap::new();
        let mut collapser = Collapser::default();
        let mut last_frontier: Option<u64> = None;
        let is_gatherer = self.scope().index() == 0;
        self.inner.sink(
            Exchange::new(|_| 0u64),
            "Gather",
            move |(input, frontier)| {
                input.for_each(|_cap, data| {
                    for (e, t, r) in data.drain(..) {
                        if t >= suppress_before {
                            pending.entry(t).or_default().push((e, r));
                        }
                    }
                });
                if !is_gatherer {
                    return;
                }
                let f: AntichainRef<u64> = frontier.frontier();
                let upper = f.first().copied().unwrap_or(u64::MAX);
                if last_frontier == Some(upper) {
                    return;
                }
                let later = pending.split_off(&upper);
                let done = std::mem::replace(&mut pending, later);
                for (_t, updates) in done {
                    // Records in publication order, the rest after them in arrival order
                    // (what a stable sort by `order_key` gives, without moving the rest).
                    let (mut ordered, rest): (Vec<_>, Vec<_>) = updates
                        .into_iter()
                        .partition(|(e, _)| matches!(e, Emit::Record(..)));
                    ordered.sort_by(|a, b| order_key(&a.0).cmp(&order_key(&b.0)));
                    ordered.extend(rest);
                    collapser.add_time(ordered);
                }
                last_frontier = Some(upper);
                flush(collapser.take(upper.max(suppress_before)));
            },
        );
    }
}
