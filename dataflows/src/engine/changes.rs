//! Output changes of a keyed step: what changed between a key's previous outputs and its
//! new ones, as `±1` updates ([`diff_sorted`], [`replace`]); for rows, with the retraction
//! of a row replaced under the same primary key left out ([`RowChanges`], [`supersede`]).

use std::sync::Arc;

use crate::output::Row;

/// `v` sorted and distinct, as [`diff_sorted`] takes its lists.
pub(crate) fn sorted<T: Ord>(mut v: Vec<T>) -> Vec<T> {
    v.sort();
    v.dedup();
    v
}

/// Calls `f(item, -1)` for items only in `old`, `f(item, +1)` for items only in `new`
/// (both sorted and distinct).
pub(crate) fn diff_sorted<T: Ord>(old: &[T], new: &[T], mut f: impl FnMut(&T, isize)) {
    diff_sorted_by(old, new, T::cmp, |c| match c {
        Change::Gone(a) => f(a, -1),
        Change::New(b) => f(b, 1),
    });
}

/// An item of [`diff_sorted_by`]: only in `old`, or only in `new`.
pub(crate) enum Change<'a, A, B> {
    Gone(&'a A),
    New(&'a B),
}

/// [`diff_sorted`] between slices of two types ordered alike by `cmp` (e.g. rows kept as
/// their table's type against new rows as `Arc<Row>`).
pub(crate) fn diff_sorted_by<A, B>(
    old: &[A],
    new: &[B],
    cmp: impl Fn(&A, &B) -> std::cmp::Ordering,
    mut f: impl FnMut(Change<'_, A, B>),
) {
    use std::cmp::Ordering::*;
    let (mut i, mut j) = (0, 0);
    while i < old.len() || j < new.len() {
        let ord = match (old.get(i), new.get(j)) {
            (Some(a), Some(b)) => cmp(a, b),
            (Some(_), None) => Less,
            (None, _) => Greater,
        };
        match ord {
            Equal => {
                i += 1;
                j += 1;
            }
            Less => {
                f(Change::Gone(&old[i]));
                i += 1;
            }
            Greater => {
                f(Change::New(&new[j]));
                j += 1;
            }
        }
    }
}

/// A step's row changes, with the retraction of a row replaced under the same primary key
/// left out. At one time the gather applies retractions before insertions
/// ([`crate::gather::Collapser`]), so `-old +new` and `+new` alone collapse to the same
/// upsert; leaving `-old` out halves what a replaced row costs on its way to the gatherer
/// (the exchange, the sort and the collapse on worker 0). A fact (first write stands) keeps
/// its retraction, and so does a row deleted rather than replaced (or replaced under
/// another key).
///
/// Feed it a sorted diff ([`diff_sorted`]), where a row's `-old` comes right before its
/// `+new` when the key fields lead the row's order; where they do not, both are given.
#[derive(Default)]
pub(crate) struct RowChanges {
    held: Option<Arc<Row>>,
}

impl RowChanges {
    pub(crate) fn give(&mut self, row: Arc<Row>, d: isize, mut f: impl FnMut(Arc<Row>, isize)) {
        if d < 0 {
            if let Some(h) = self.held.replace(row) {
                f(h, -1);
            }
            return;
        }
        if let Some(h) = self.held.take() {
            if h.is_fact() || !h.same_key(&row) {
                f(h, -1);
            }
        }
        f(row, d);
    }

    /// Gives the retraction still held (call at the end of the diff).
    pub(crate) fn finish(&mut self, mut f: impl FnMut(Arc<Row>, isize)) {
        if let Some(h) = self.held.take() {
            f(h, -1);
        }
    }
}

/// Outputs `+new` for a row replaced by another of the same key, `-old` for a row gone
/// (see [`RowChanges`]; a fact's `-old` is kept).
pub(crate) fn supersede(
    old: &mut Option<Arc<Row>>,
    new: Option<Arc<Row>>,
    f: impl FnMut(Arc<Row>, isize),
) {
    supersede_as(old, new, Arc::clone, f)
}

/// [`supersede`] for a row held as its table's type, wrapped by `wrap` when output.
pub(crate) fn supersede_as<T: PartialEq>(
    old: &mut Option<T>,
    new: Option<T>,
    wrap: impl Fn(&T) -> Arc<Row>,
    mut f: impl FnMut(Arc<Row>, isize),
) {
    if *old != new {
        let mut changes = RowChanges::default();
        if let Some(o) = old.take() {
            changes.give(wrap(&o), -1, &mut f);
        }
        if let Some(n) = &new {
            changes.give(wrap(n), 1, &mut f);
        }
        changes.finish(&mut f);
        *old = new;
    }
}

/// Outputs `-old +new` for a value that changed.
pub(crate) fn replace<T: Clone + PartialEq>(
    old: &mut Option<T>,
    new: Option<T>,
    mut f: impl FnMut(T, isize),
) {
    if *old != new {
        if let Some(o) = old.take() {
            f(o, -1);
        }
        if let Some(n) = &new {
            f(n.clone(), 1);
        }
        *old = new;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gather::Collapser;
    use crate::output::samples;
    use crate::Emit;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn readiness(wf: u32, def: u32, attempt: i32) -> Arc<Row> {
        Arc::new(samples::readiness(wf, def, attempt))
    }

    fn alert(id: u32, message: u32) -> Arc<Row> {
        Arc::new(samples::alert(id, 1, message))
    }

    /// A key's rows: at most one per primary key, sorted.
    fn rows(rng: &mut StdRng) -> Vec<Arc<Row>> {
        let mut v: Vec<Arc<Row>> = Vec::new();
        for def in 0..4 {
            if rng.random_bool(0.6) {
                v.push(readiness(1, def, rng.random_range(1..3)));
            }
        }
        for id in 0..3 {
            if rng.random_bool(0.5) {
                v.push(alert(id, rng.random_range(0..2)));
            }
        }
        v.sort();
        v
    }

    /// What the gather makes of one step's changes, with and without the replaced rows'
    /// retractions: the same batch, from any earlier state of the flush.
    #[test]
    fn leaving_out_replaced_rows_retractions_collapses_alike() {
        let mut dropped = 0;
        for seed in 0..500 {
            let mut rng = StdRng::seed_from_u64(seed);
            let (before, old, new) = (rows(&mut rng), rows(&mut rng), rows(&mut rng));
            let (old_wf, new_wf) = (
                rng.random_bool(0.7)
                    .then(|| readiness(2, 0, rng.random_range(1..3))),
                rng.random_bool(0.7)
                    .then(|| readiness(2, 0, rng.random_range(1..3))),
            );
            let mut full: Vec<(Emit, isize)> = Vec::new();
            diff_sorted(&old, &new, |r, d| full.push((Emit::Row(r.clone()), d)));
            replace(&mut old_wf.clone(), new_wf.clone(), |r, d| {
                full.push((Emit::Row(r), d))
            });
            let mut lean: Vec<(Emit, isize)> = Vec::new();
            let mut changes = RowChanges::default();
            diff_sorted(&old, &new, |r, d| {
                changes.give(r.clone(), d, |r, d| lean.push((Emit::Row(r), d)))
            });
            changes.finish(|r, d| lean.push((Emit::Row(r), d)));
            supersede(&mut old_wf.clone(), new_wf.clone(), |r, d| {
                lean.push((Emit::Row(r), d))
            });
            dropped += full.len() - lean.len();

            let collapse = |changes: Vec<(Emit, isize)>| {
                let mut c = Collapser::default();
                c.add_time(before.iter().map(|r| (Emit::Row(r.clone()), 1)).collect());
                c.add_time(changes);
                c.take(0).rows
            };
            assert_eq!(collapse(lean), collapse(full), "seed {seed}");
        }
        assert!(
            dropped > 100,
            "the test exercises replaced rows ({dropped})"
        );
    }
}
