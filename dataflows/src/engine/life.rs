//! The lifecycle ([`crate::lifecycle`]) as state of a keyed operator's key: what the old
//! core's tracker learns through its feedback loop, computed from the key's own evaluations.
//!
//! The tracker decides at instant `d` with the signals of the rules at `d - SIGNAL_DELAY_MS`
//! (the loop's delay): "known" and "closed" at `d` are the rules' values at that earlier
//! instant. A key keeps the history of both values ([`Log`]) back to the oldest instant a
//! decision still due can ask about, and decides at the instants the tracker decides:
//!
//! - **grace checks** at `grace_end + SIGNAL_DELAY_MS` of each of its records (woken for
//!   those records that arrive while the key is not known, and for every record whose grace
//!   is still running when the key stops being known): if the key was not known a signal
//!   delay earlier, every record whose grace ended before the check is dead-lettered;
//! - **retirement** at [`crate::lifecycle::retire_instant`] of each closure the rules
//!   report (a change of the closed row is a retraction and an insertion of the closure,
//!   and so a new closure too), if the key was closed a signal delay earlier. "Closed" is
//!   the tracker's flag: its last closure signal of an instant decides it, and the rules'
//!   signals of one instant reach it in the order of their values (see [`Closure::update`]).

use std::sync::atomic::Ordering;

use crate::lifecycle::{retire_instant, LifecycleRules, Stats, SIGNAL_DELAY_MS};
use crate::output::Millis;

/// The values a key's rules had at each instant, as transitions `(instant, value)`.
#[derive(Debug, Default)]
pub(crate) struct Log {
    entries: Vec<(u64, bool)>,
}

impl Log {
    /// The value at rules time `x` (`false` before the first transition).
    pub fn at(&self, x: u64) -> bool {
        self.entries
            .iter()
            .rev()
            .find(|(t, _)| *t <= x)
            .is_some_and(|(_, v)| *v)
    }
    /// The latest value.
    pub fn now(&self) -> bool {
        self.entries.last().is_some_and(|(_, v)| *v)
    }
    /// Sets the value from instant `t` on (at or after every transition so far).
    pub fn set(&mut self, t: u64, v: bool) {
        if self.now() == v {
            return;
        }
        if self.entries.last().is_some_and(|(l, _)| *l == t) {
            self.entries.pop();
            if self.now() == v {
                return;
            }
        }
        self.entries.push((t, v));
    }
    /// Forgets what no decision at or after `t` can ask about (they ask at `>= t - delay`).
    pub fn prune(&mut self, t: u64) {
        let horizon = t.saturating_sub(SIGNAL_DELAY_MS);
        let keep_from = self
            .entries
            .iter()
            .rposition(|(x, _)| *x <= horizon)
            .unwrap_or(0);
        if keep_from > 0 {
            self.entries.drain(..keep_from);
        }
        if self.entries.len() == 1 && !self.entries[0].1 && self.entries[0].0 <= horizon {
            self.entries.clear();
        }
    }
}

/// The closure of a key as the tracker sees it.
#[derive(Debug)]
pub(crate) struct Closure<V> {
    /// The tracker's closed flag, by rules time.
    pub log: Log,
    /// The rules' current closure: the value whose order the signals follow, and the
    /// closing (data) time.
    pub current: Option<(V, Millis)>,
    /// Retirements due (instants), each to be decided once.
    pub due: Vec<u64>,
}

impl<V> Default for Closure<V> {
    fn default() -> Self {
        Closure {
            log: Log::default(),
            current: None,
            due: Vec::new(),
        }
    }
}

impl<V: Ord> Closure<V> {
    /// The rules' closure at instant `t` is `new`; returns the retirement instant to wake at,
    /// if the tracker would schedule one.
    ///
    /// The old core's signals of one instant are applied in the order the rules' reduce
    /// outputs them, by value: a closed value replaced by another closed one is `-old, +new`
    /// if `old < new` (closed stays set) and `+new, -old` otherwise, which clears the
    /// tracker's flag although the key is still closed (reproduced here; see
    /// docs/engine.md).
    pub fn update(
        &mut self,
        rules: &LifecycleRules,
        t: u64,
        new: Option<(V, Millis)>,
    ) -> Option<u64> {
        let wake = match (&self.current, &new) {
            (None, None) => None,
            (Some(_), None) => {
                self.log.set(t, false);
                None
            }
            (None, Some((_, at))) => {
                self.log.set(t, true);
                Some(retire_instant(rules, t, *at))
            }
            (Some((old, _)), Some((nv, at))) => {
                if old == nv {
                    None
                } else {
                    self.log.set(t, old < nv);
                    Some(retire_instant(rules, t, *at))
                }
            }
        };
        self.current = new;
        if let Some(d) = wake {
            if !self.due.contains(&d) {
                self.due.push(d);
            }
        }
        wake
    }

    /// Whether the key retires at `d`: a retirement is due then and the tracker saw the key
    /// closed (the rules' flag a signal delay earlier).
    pub fn retires_at(&mut self, d: u64) -> bool {
        let n = self.due.len();
        self.due.retain(|x| *x > d);
        n != self.due.len() && self.log.at(d.saturating_sub(SIGNAL_DELAY_MS))
    }
}

/// A retired key: the hashes of its eventIds, until `at + tombstone_retention_ms`.
///
/// The hashes are a sorted, distinct `Vec` (8 bytes each, built with one sort at
/// retirement; a `HashSet` cost ~2× the memory and SipHash per insert, 4 % of the workflow
/// operator's samples in the session 11 profile). Lookups are binary searches; an insert
/// (an event that arrives after retirement) is rare.
#[derive(Debug)]
pub(crate) struct Tomb {
    pub at: u64,
    ids: Vec<u64>,
}

impl Tomb {
    pub fn new(at: u64, mut ids: Vec<u64>) -> Tomb {
        ids.sort_unstable();
        ids.dedup();
        ids.shrink_to_fit();
        Tomb { at, ids }
    }

    /// Adds `id`; whether it was absent (as `HashSet::insert`).
    pub fn insert(&mut self, id: u64) -> bool {
        match self.ids.binary_search(&id) {
            Ok(_) => false,
            Err(i) => {
                self.ids.insert(i, id);
                true
            }
        }
    }

    /// Whether the tombstone has expired at `t` (the old core forgets it once the frontier
    /// has passed `at + retention`).
    pub fn expired(&self, rules: &LifecycleRules, t: u64) -> bool {
        t > self.at.saturating_add(rules.tombstone_retention_ms)
    }
}

/// Adds to a gauge or counter of [`Stats`].
pub(crate) fn add(
    stats: &Stats,
    f: impl Fn(&crate::lifecycle::StatsInner) -> &std::sync::atomic::AtomicI64,
    n: i64,
) {
    if n != 0 {
        f(&stats.0).fetch_add(n, Ordering::Relaxed);
    }
}

/// Counts one more of a counter of [`Stats`].
pub(crate) fn count(
    stats: &Stats,
    f: impl Fn(&crate::lifecycle::StatsInner) -> &std::sync::atomic::AtomicU64,
) {
    f(&stats.0).fetch_add(1, Ordering::Relaxed);
}

/// The instant of a grace check of a record whose grace ends at `g`.
pub(crate) fn check_instant(g: u64) -> u64 {
    g.saturating_add(SIGNAL_DELAY_MS)
}
