//! The lifecycle of input records: unknown references (contract §7) and retiring finished
//! work, so that the dataflow's state is bounded by open work, not by history.
//!
//! Every task and workflow event passes through one [`track`] operator keyed by its
//! workflowInstanceId, every order event through another keyed by its orderId. The operator
//! forwards each record at once and keeps a copy while the record's key is live. The rules
//! downstream tell it, through a feedback loop [`SIGNAL_DELAY_MS`] later, what they learnt:
//!
//! ```text
//!  input ──► track ──► rules ──► rows, events
//!              ▲         │
//!              └─(t+1m)──┘  Known(W): W started and its template exists
//!                           Closed(W, at): W is COMPLETED/FAILED (an order: CLOSED, or
//!                                          CANCELLED with every compensation done)
//! ```
//!
//! - **Unknown references.** A record whose workflow is not known is checked once the clock
//!   has passed its arrival plus `unknown_reference_grace_ms` (event clock: its eventTime plus
//!   the grace, or its arrival if later) — decided [`SIGNAL_DELAY_MS`] after that instant. If the workflow is still not known then, the record is
//!   retracted and dead-lettered: `UNKNOWN_TEMPLATE` for a WORKFLOW_STARTED (its template
//!   never arrived), `UNKNOWN_WORKFLOW` for anything else. A WORKFLOW_STARTED (and template)
//!   that arrives within the grace wins.
//! - **Retirement.** `retire_after_ms` after a key closed (its closing time is data, so a
//!   replay retires at the same instant), every record of the key is retracted: the
//!   arrangements downstream consolidate them away, and the rows they produced stay in
//!   PostgreSQL (the operator emits [`Emit::Retired`], which tells the sink that the
//!   retractions at that instant forget, not delete). A tombstone remembers the key and the
//!   hashes of its eventIds for `tombstone_retention_ms`: a duplicate changes nothing, a new
//!   event for a retired key is dead-lettered (`UNKNOWN_WORKFLOW` / `INVALID_TRANSITION`).
//!
//! Records at a time are forwarded before anything about that time is decided, and a
//! decision at time `d` waits until both inputs have passed `d`, so the result does not
//! depend on how records and feedback interleave.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use differential_dataflow::{AsCollection, VecCollection};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::core::OkErr;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::vec::Map as _;
use timely::dataflow::operators::{Capability, ConnectLoop, Feedback};

use crate::events::{OrderEvent, TaskEvent, WorkflowEvent, WorkflowEventKind};
use crate::output::{DeadLetter, Millis, Owner, RejectReason};
use crate::Emit;

/// Lifecycle parameters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LifecycleRules {
    /// How long an event may wait for the workflow (or template) it names (default 10 min).
    pub unknown_reference_grace_ms: u64,
    /// How long after a workflow or order closed its state is kept (default 1 h): events
    /// arriving later than this after closure are dead-lettered, duplicates ignored.
    pub retire_after_ms: u64,
    /// How long a retired key is remembered, for duplicates and late events (default 7 days,
    /// the input topics' retention).
    pub tombstone_retention_ms: u64,
    /// Count the grace and the retirement delay from eventTimes (`clock = event`; the
    /// default) instead of the pipeline clock at arrival or closure (`clock = wall`; set by
    /// the runtime), so that a replay decides at the same instant.
    #[serde(skip)]
    pub grace_from_event_time: bool,
    /// No grace check is decided below this time (set by the runtime to the committed
    /// frontier it resumes from): a record replayed to rebuild state was decided before the
    /// restart if its check fell below it — dead-lettered (the source skips those) or
    /// accepted — and its check is not repeated at the replay's compressed times, where the
    /// signal that accepted it might come later than in the original run.
    #[serde(skip)]
    pub decide_from: u64,
    /// Input topic names, for dead letters (set by the runtime).
    #[serde(skip)]
    pub tasks_topic: String,
    #[serde(skip)]
    pub workflows_topic: String,
    #[serde(skip)]
    pub orders_topic: String,
    /// Gauges and counters, read by the runtime's metrics.
    #[serde(skip)]
    pub stats: Stats,
}

impl Default for LifecycleRules {
    fn default() -> Self {
        LifecycleRules {
            unknown_reference_grace_ms: 10 * 60_000,
            retire_after_ms: 3_600_000,
            tombstone_retention_ms: 7 * 24 * 3_600_000,
            grace_from_event_time: true,
            decide_from: 0,
            tasks_topic: crate::events::InputTopic::Tasks.default_name().to_string(),
            workflows_topic: crate::events::InputTopic::Workflows
                .default_name()
                .to_string(),
            orders_topic: crate::events::InputTopic::Orders.default_name().to_string(),
            stats: Stats::default(),
        }
    }
}

/// Shared gauges and counters of the lifecycle operators (all workers add into them).
#[derive(Clone, Debug, Default)]
pub struct Stats(pub Arc<StatsInner>);

#[derive(Debug, Default)]
pub struct StatsInner {
    /// Input records kept for live keys.
    pub held_records: AtomicI64,
    /// Live keys (workflows and orders with state).
    pub live_keys: AtomicI64,
    /// Retired keys remembered.
    pub tombstones: AtomicI64,
    /// Keys retired so far.
    pub retired_total: AtomicU64,
    /// Records dead-lettered for an unknown reference.
    pub unknown_total: AtomicU64,
    /// Records for a retired key: dead-lettered, or dropped as duplicates.
    pub late_total: AtomicU64,
    pub duplicates_total: AtomicU64,
}

impl PartialEq for Stats {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for Stats {}

/// What the rules tell the tracker about a key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Signal {
    /// The workflow is started and its template version exists.
    Known(String),
    /// The key closed at (data time) `at`.
    Closed(String, Millis),
}

impl Signal {
    fn key(&self) -> &str {
        match self {
            Signal::Known(k) | Signal::Closed(k, _) => k,
        }
    }
}

/// An input record the lifecycle operator can track.
pub trait Tracked: differential_dataflow::ExchangeData + Hash + std::fmt::Debug + 'static {
    /// The key whose lifecycle the record follows.
    fn key(&self) -> &str;
    fn event_id(&self) -> &str;
    fn event_time(&self) -> Millis;
    /// Why the record is rejected if its key stays unknown past the grace; `None`: no check.
    fn unknown_reason(&self) -> Option<RejectReason>;
    /// Why a new record for a retired key is rejected.
    fn late_reason(&self) -> RejectReason;
    fn owner(key: String) -> Owner;
    fn dead_letter(
        &self,
        rules: &LifecycleRules,
        reason: RejectReason,
        detail: String,
        at: Millis,
    ) -> DeadLetter;
}

/// A task or workflow event, keyed by its workflow instance.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum WfInput {
    /// Shared: the tracker's copy and the rules' input arrangements hold one event.
    Task(Arc<TaskEvent>),
    Workflow(Arc<WorkflowEvent>),
}

impl Tracked for WfInput {
    fn key(&self) -> &str {
        match self {
            WfInput::Task(e) => &e.workflow_instance_id,
            WfInput::Workflow(e) => &e.workflow_instance_id,
        }
    }
    fn event_id(&self) -> &str {
        match self {
            WfInput::Task(e) => &e.event_id,
            WfInput::Workflow(e) => &e.event_id,
        }
    }
    fn event_time(&self) -> Millis {
        match self {
            WfInput::Task(e) => e.event_time,
            WfInput::Workflow(e) => e.event_time,
        }
    }
    fn unknown_reason(&self) -> Option<RejectReason> {
        Some(match self {
            WfInput::Workflow(e) if e.kind == WorkflowEventKind::Started => {
                RejectReason::UnknownTemplate
            }
            _ => RejectReason::UnknownWorkflow,
        })
    }
    fn late_reason(&self) -> RejectReason {
        RejectReason::UnknownWorkflow
    }
    fn owner(key: String) -> Owner {
        Owner::Workflow(key.into())
    }
    fn dead_letter(
        &self,
        rules: &LifecycleRules,
        reason: RejectReason,
        detail: String,
        at: Millis,
    ) -> DeadLetter {
        match self {
            WfInput::Task(e) => DeadLetter::of_record(
                &rules.tasks_topic,
                e.pos,
                e.raw_key.as_deref(),
                &e.task_instance_id,
                e.raw.as_deref(),
                || serde_json::to_string(&**e).unwrap_or_default(),
                reason,
                detail,
                at,
            ),
            WfInput::Workflow(e) => DeadLetter::of_record(
                &rules.workflows_topic,
                e.pos,
                e.raw_key.as_deref(),
                &e.workflow_instance_id,
                e.raw.as_deref(),
                || serde_json::to_string(&**e).unwrap_or_default(),
                reason,
                detail,
                at,
            ),
        }
    }
}

impl Tracked for Arc<OrderEvent> {
    fn key(&self) -> &str {
        &self.order_id
    }
    fn event_id(&self) -> &str {
        &self.event_id
    }
    fn event_time(&self) -> Millis {
        self.event_time
    }
    /// An order's lifecycle is its own: it is applied whether or not its workflow is known.
    fn unknown_reason(&self) -> Option<RejectReason> {
        None
    }
    fn late_reason(&self) -> RejectReason {
        RejectReason::InvalidTransition
    }
    fn owner(key: String) -> Owner {
        Owner::Order(key.into())
    }
    fn dead_letter(
        &self,
        rules: &LifecycleRules,
        reason: RejectReason,
        detail: String,
        at: Millis,
    ) -> DeadLetter {
        DeadLetter::of_record(
            &rules.orders_topic,
            self.pos,
            self.raw_key.as_deref(),
            &self.order_id,
            self.raw.as_deref(),
            || serde_json::to_string(&**self).unwrap_or_default(),
            reason,
            detail,
            at,
        )
    }
}

/// The other end of a tracker's feedback loop: connect the rules' [`Signal`]s to it, once.
/// They arrive [`SIGNAL_DELAY_MS`] later.
pub struct SignalLoop<'s> {
    handle: timely::dataflow::operators::core::feedback::Handle<'s, u64, Vec<(Signal, u64, isize)>>,
}

impl<'s> SignalLoop<'s> {
    /// Feeds `signals` back to the tracker, [`SIGNAL_DELAY_MS`] later.
    pub fn connect(self, signals: VecCollection<'s, u64, Signal>) {
        signals
            .inner
            .map(|(s, t, r)| (s, t.saturating_add(SIGNAL_DELAY_MS), r))
            .connect_loop(self.handle);
    }
}

pub(crate) fn hash_str(s: &str) -> u64 {
    let mut h = DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

/// How much later the rules' signals reach the tracker (the feedback loop's delay), and so how
/// long after the end of a grace its check is decided. A loop can only run this far ahead of
/// its slowest part: with a 1 ms delay, a backlog read in event mode (one distinct time per
/// record) advanced one millisecond of records per round trip through the loop (a SIGTERM
/// drain over 25 h of event time took minutes; with a minute, still over 30 s); with ten
/// minutes, a round trip covers ten.
/// Decisions stay exact: a check at `grace end + delay` sees exactly the signals caused by
/// records stamped up to the grace end.
pub const SIGNAL_DELAY_MS: u64 = 600_000;

/// Retirements happen on whole multiples of ten minutes of the pipeline clock: each distinct
/// instant at which the tracker decides costs a round trip through the feedback loop (and a
/// flush), so thousands of closures an hour share at most 6 instants.
const RETIRE_QUANTUM_MS: u64 = SIGNAL_DELAY_MS;

pub(crate) fn retire_at(t: u64) -> u64 {
    t.div_ceil(RETIRE_QUANTUM_MS)
        .saturating_mul(RETIRE_QUANTUM_MS)
}

pub(crate) fn late_detail(key: &str, retired_at: u64) -> String {
    format!(
        "{key} was closed and its state retired at {}; an event arriving more than retire_after_ms after closure is not applied",
        crate::events::format_time(retired_at)
    )
}

/// The instant the grace of record `r`, arrived at `t`, ends. Below
/// [`LifecycleRules::decide_from`] (a restart's replay) nothing is decided: with the event
/// clock a grace that ended before it is checked at `decide_from` (the original run decided
/// it: dead-lettered, and skipped by the replay, or accepted); with the wall clock a
/// replayed record's arrival is unknown, so its grace counts from `decide_from`.
fn grace_end<R: Tracked>(rules: &LifecycleRules, r: &R, t: u64) -> u64 {
    grace_end_of(rules, r.event_time(), t)
}

/// [`grace_end`] of a record with eventTime `event_time`, arrived at `t`.
pub(crate) fn grace_end_of(rules: &LifecycleRules, event_time: Millis, t: u64) -> u64 {
    if rules.grace_from_event_time {
        t.max(event_time.saturating_add(rules.unknown_reference_grace_ms))
            .max(rules.decide_from.saturating_sub(SIGNAL_DELAY_MS))
    } else {
        t.max(rules.decide_from)
            .saturating_add(rules.unknown_reference_grace_ms)
    }
}

/// The instant a key that closed at data time `at`, seen closed by the rules at `tau`, is
/// due to retire: the tracker receives the closure a signal delay later (at `s`) and retires
/// on the first quantum at least a signal delay after `s` and `retire_after_ms` after the
/// closure (event clock: from `at`; wall clock: from `s`).
pub(crate) fn retire_instant(rules: &LifecycleRules, tau: u64, at: Millis) -> u64 {
    let s = tau.saturating_add(SIGNAL_DELAY_MS);
    let from = if rules.grace_from_event_time { at } else { s };
    retire_at(
        s.saturating_add(SIGNAL_DELAY_MS)
            .max(from.saturating_add(rules.retire_after_ms)),
    )
}

/// The detail of a record dead-lettered for an unknown reference.
pub(crate) fn unknown_detail(reason: RejectReason, key: &str, grace: u64) -> String {
    match reason {
        RejectReason::UnknownTemplate => format!(
            "workflow {key} names a template version that did not arrive within unknown_reference_grace_ms ({grace} ms)"
        ),
        _ => format!(
            "workflow {key} was not started (or its template is unknown) within unknown_reference_grace_ms ({grace} ms)"
        ),
    }
}

#[derive(Debug)]
struct Entry<R> {
    held: Vec<(R, u64)>,
    /// Net Known signals applied (> 0: known).
    known: isize,
    /// The pending unknown-reference check of the key, if any (one at a time: each check
    /// schedules the next while the key stays unknown).
    check_at: Option<u64>,
    /// Set while the rules report the key closed.
    closed: bool,
}

impl<R> Default for Entry<R> {
    fn default() -> Self {
        Entry {
            held: Vec::new(),
            known: 0,
            check_at: None,
            closed: false,
        }
    }
}

struct Tomb {
    at: u64,
    ids: HashSet<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Timer {
    Check,
    Retire,
}

/// The operator's one output, split by `ok_err` into live records and emits.
type Out<R> = Result<(R, u64, isize), (Emit, u64, isize)>;

/// Tracks `records` (see the module doc). Returns the live records, the emits (dead letters
/// and retirement markers), and the loop to connect the rules' signals to.
// `Out` is a `Result` only to be split by timely's `ok_err`; neither side is an error.
#[allow(clippy::result_large_err)]
pub fn track<'s, R: Tracked>(
    records: VecCollection<'s, u64, R>,
    rules: &LifecycleRules,
    name: &str,
) -> (
    VecCollection<'s, u64, R>,
    VecCollection<'s, u64, Emit>,
    SignalLoop<'s>,
) {
    let scope = records.scope();
    let (handle, feedback) = scope.feedback::<Vec<(Signal, u64, isize)>>(SIGNAL_DELAY_MS);
    let rules = rules.clone();
    let stats = rules.stats.0.clone();

    let out = records
        .inner
        .binary_frontier::<_, CapacityContainerBuilder<Vec<Out<R>>>, _, _, _, _>(
            feedback,
            Exchange::new(|u: &(R, u64, isize)| hash_str(u.0.key())),
            Exchange::new(|u: &(Signal, u64, isize)| hash_str(u.0.key())),
            name,
            move |_cap, _info| {
                let mut entries: HashMap<String, Entry<R>> = HashMap::new();
                let mut tombs: HashMap<String, Tomb> = HashMap::new();
                let mut expiry: BTreeMap<u64, Vec<String>> = BTreeMap::new();
                let mut timers: BTreeMap<u64, Vec<(String, Timer)>> = BTreeMap::new();
                let mut signals: BTreeMap<u64, Vec<(Signal, isize)>> = BTreeMap::new();
                let mut caps: BTreeMap<u64, Capability<u64>> = BTreeMap::new();
                // What this worker last added to the shared gauges.
                let (mut held_n, mut keys_n, mut tombs_n) = (0i64, 0i64, 0i64);
                // Records held now (kept up to date as records come and go).
                let mut held = 0i64;
                let grace = rules.unknown_reference_grace_ms;
                move |(data, data_f), (sigs, sig_f), output| {
                    data.for_each(|cap, batch| {
                        let mut session = output.session(&cap);
                        for (r, t, diff) in batch.drain(..) {
                            if let Some(tomb) = tombs.get_mut(r.key()) {
                                if !tomb.ids.insert(hash_str(r.event_id())) {
                                    stats.duplicates_total.fetch_add(1, Ordering::Relaxed);
                                    continue;
                                }
                                stats.late_total.fetch_add(1, Ordering::Relaxed);
                                let detail = late_detail(r.key(), tomb.at);
                                let dl = r.dead_letter(&rules, r.late_reason(), detail, t);
                                session.give(Err((Emit::dead(dl), t, 1)));
                                continue;
                            }
                            session.give(Ok((r.clone(), t, diff)));
                            let e = entries.entry(r.key().to_string()).or_default();
                            if diff > 0 {
                                if e.known <= 0 && r.unknown_reason().is_some() {
                                    // "After the grace": decided once the clock has passed it.
                                    let d =
                                        grace_end(&rules, &r, t).saturating_add(SIGNAL_DELAY_MS);
                                    if e.check_at.is_none_or(|c| c > d) {
                                        e.check_at = Some(d);
                                        caps.entry(d).or_insert_with(|| cap.delayed(&d, 0));
                                        timers
                                            .entry(d)
                                            .or_default()
                                            .push((r.key().to_string(), Timer::Check));
                                    }
                                }
                                e.held.push((r, t));
                                held += 1;
                            } else if let Some(i) = e.held.iter().position(|(h, _)| *h == r) {
                                e.held.swap_remove(i);
                                held -= 1;
                            }
                        }
                    });
                    // Signals change the state in time order (below, interleaved with the timers);
                    // a closure schedules its retirement now, while its capability is at hand.
                    sigs.for_each(|cap, batch| {
                        for (s, t, diff) in batch.drain(..) {
                            // A key known by the time of its pending check needs no check: cancel
                            // it now, so that its capability does not hold the clock back.
                            // A key no longer known (its template version deleted) is checked
                            // again at the next end of a grace among its records.
                            if let (Signal::Known(key), true) = (&s, diff < 0) {
                                if let Some(e) = entries.get_mut(key.as_str()) {
                                    let next = e
                                        .held
                                        .iter()
                                        .filter(|(r, _)| r.unknown_reason().is_some())
                                        .map(|(r, rt)| {
                                            grace_end(&rules, r, *rt)
                                                .saturating_add(SIGNAL_DELAY_MS)
                                        })
                                        .filter(|n| *n > t)
                                        .min();
                                    if let Some(n) =
                                        next.filter(|n| e.check_at.is_none_or(|c| c > *n))
                                    {
                                        e.check_at = Some(n);
                                        caps.entry(n).or_insert_with(|| cap.delayed(&n, 0));
                                        timers
                                            .entry(n)
                                            .or_default()
                                            .push((key.clone(), Timer::Check));
                                    }
                                }
                            }
                            if let (Signal::Known(key), true) = (&s, diff > 0) {
                                if let Some(e) = entries.get_mut(key.as_str()) {
                                    // The pending check is cancelled lazily: its timer entry stays
                                    // and is skipped when it fires (`check_at` no longer names it).
                                    // Removing it from the instant's list here cost a scan of that
                                    // list per signal — quadratic when a restart's replay puts
                                    // hundreds of thousands of checks at one instant.
                                    if e.check_at.is_some_and(|d| t <= d) {
                                        e.check_at = None;
                                    }
                                }
                            }
                            if let (Signal::Closed(key, at), true) = (&s, diff > 0) {
                                if entries.contains_key(key.as_str()) {
                                    // Event clock: from the closing eventTime (a replay retires
                                    // at the same instant). Wall clock: from when the pipeline
                                    // saw it close, so a backlog of old events is not retired
                                    // the moment it closes.
                                    let from = if rules.grace_from_event_time { *at } else { t };
                                    // At least a signal delay after the signal: a closure that is
                                    // taken back (a replay's partial history can look closed for a
                                    // moment) is taken back before it retires anything.
                                    let d = retire_at(
                                        t.saturating_add(SIGNAL_DELAY_MS)
                                            .max(from.saturating_add(rules.retire_after_ms)),
                                    );
                                    caps.entry(d).or_insert_with(|| cap.delayed(&d, 0));
                                    timers
                                        .entry(d)
                                        .or_default()
                                        .push((key.clone(), Timer::Retire));
                                }
                            }
                            signals.entry(t).or_default().push((s, diff));
                        }
                    });

                    if data_f.is_empty() {
                        // Input exhausted: nothing decided from here on can matter.
                        timers.clear();
                        caps.clear();
                        signals.clear();
                    } else {
                        let passed = |d: u64| !data_f.less_equal(&d) && !sig_f.less_equal(&d);
                        loop {
                            let next_signal = signals.first_key_value().map(|(t, _)| *t);
                            let next_timer = timers.first_key_value().map(|(t, _)| *t);
                            let Some(d) = next_signal.into_iter().chain(next_timer).min() else {
                                break;
                            };
                            if !passed(d) {
                                break;
                            }
                            // The signals of an instant before its timers: a timer at `d` sees
                            // what the rules knew at `d`.
                            if next_signal == Some(d) {
                                for (s, diff) in signals.pop_first().expect("first signal").1 {
                                    let Some(e) = entries.get_mut(s.key()) else {
                                        continue;
                                    };
                                    match s {
                                        Signal::Known(_) => e.known += diff,
                                        Signal::Closed(..) => e.closed = diff > 0,
                                    }
                                }
                                continue;
                            }
                            let (_, due) = timers.pop_first().expect("first timer");
                            let cap = caps.remove(&d).expect("a capability per timer");
                            let mut session = output.session(&cap);
                            for (key, what) in due {
                                let Some(e) = entries.get_mut(&key) else {
                                    continue;
                                };
                                match what {
                                    Timer::Check => {
                                        if e.check_at != Some(d) {
                                            continue; // superseded by an earlier check
                                        }
                                        e.check_at = None;
                                        if e.known > 0 {
                                            continue;
                                        }
                                        let (late, keep): (Vec<_>, Vec<_>) =
                                            std::mem::take(&mut e.held).into_iter().partition(
                                                |(r, t)| {
                                                    r.unknown_reason().is_some()
                                                        && grace_end(&rules, r, *t) < d
                                                },
                                            );
                                        e.held = keep;
                                        for (r, _) in late {
                                            held -= 1;
                                            let reason = r.unknown_reason().expect("checked");
                                            let detail = unknown_detail(reason, r.key(), grace);
                                            stats.unknown_total.fetch_add(1, Ordering::Relaxed);
                                            let dl = r.dead_letter(&rules, reason, detail, d);
                                            session.give(Err((Emit::dead(dl), d, 1)));
                                            session.give(Ok((r, d, -1)));
                                        }
                                        // Records of the key that arrived while it was known
                                        // (and so were not scheduled) are checked at their own
                                        // grace's end: the earliest one next.
                                        let next = e
                                            .held
                                            .iter()
                                            .filter(|(r, _)| r.unknown_reason().is_some())
                                            .map(|(r, t)| {
                                                grace_end(&rules, r, *t)
                                                    .saturating_add(SIGNAL_DELAY_MS)
                                            })
                                            .min();
                                        if let Some(n) = next {
                                            let n = n.max(d + 1);
                                            e.check_at = Some(n);
                                            caps.entry(n).or_insert_with(|| cap.delayed(&n));
                                            timers
                                                .entry(n)
                                                .or_default()
                                                .push((key.clone(), Timer::Check));
                                        }
                                        if e.held.is_empty() && !e.closed {
                                            entries.remove(&key);
                                        }
                                    }
                                    Timer::Retire => {
                                        if !e.closed {
                                            continue;
                                        }
                                        let mut e = entries.remove(&key).expect("entry");
                                        // Records stamped after `d` arrived ahead of this decision:
                                        // they are treated as if they had found the tombstone.
                                        e.held.sort_by_key(|(_, t)| *t);
                                        let mut ids = HashSet::with_capacity(e.held.len());
                                        for (r, t) in e.held {
                                            held -= 1;
                                            let new = ids.insert(hash_str(r.event_id()));
                                            if t > d {
                                                if new {
                                                    stats
                                                        .late_total
                                                        .fetch_add(1, Ordering::Relaxed);
                                                    let detail = late_detail(r.key(), d);
                                                    let dl = r.dead_letter(
                                                        &rules,
                                                        r.late_reason(),
                                                        detail,
                                                        t,
                                                    );
                                                    session.give(Err((Emit::dead(dl), t, 1)));
                                                } else {
                                                    stats
                                                        .duplicates_total
                                                        .fetch_add(1, Ordering::Relaxed);
                                                }
                                            }
                                            session.give(Ok((r, t.max(d), -1)));
                                        }
                                        session.give(Err((
                                            Emit::Retired(R::owner(key.clone())),
                                            d,
                                            1,
                                        )));
                                        stats.retired_total.fetch_add(1, Ordering::Relaxed);
                                        expiry
                                            .entry(d.saturating_add(rules.tombstone_retention_ms))
                                            .or_default()
                                            .push(key.clone());
                                        tombs.insert(key, Tomb { at: d, ids });
                                    }
                                }
                            }
                        }
                        // Forget tombstones whose retention the clock has passed.
                        while let Some((&d, _)) = expiry.first_key_value() {
                            if data_f.less_equal(&d) {
                                break;
                            }
                            for key in expiry.pop_first().expect("first").1 {
                                if tombs.get(&key).is_some_and(|t| {
                                    t.at.saturating_add(rules.tombstone_retention_ms) == d
                                }) {
                                    tombs.remove(&key);
                                }
                            }
                        }
                    }

                    stats
                        .held_records
                        .fetch_add(held - held_n, Ordering::Relaxed);
                    stats
                        .live_keys
                        .fetch_add(entries.len() as i64 - keys_n, Ordering::Relaxed);
                    stats
                        .tombstones
                        .fetch_add(tombs.len() as i64 - tombs_n, Ordering::Relaxed);
                    (held_n, keys_n, tombs_n) = (held, entries.len() as i64, tombs.len() as i64);
                }
            },
        );
    let (live, emits) = out.ok_err::<Vec<_>, _, Vec<_>, _, _>(|x: Out<R>| x);
    (
        live.as_collection(),
        emits.as_collection(),
        SignalLoop { handle },
    )
}

/// Splits tracked workflow-keyed records back into task and workflow events.
#[allow(clippy::result_large_err)]
pub fn split<'s>(
    live: VecCollection<'s, u64, WfInput>,
) -> (
    VecCollection<'s, u64, Arc<TaskEvent>>,
    VecCollection<'s, u64, Arc<WorkflowEvent>>,
) {
    let (tasks, workflows) =
        live.inner
            .ok_err::<Vec<_>, _, Vec<_>, _, _>(|(x, t, r): (WfInput, u64, isize)| match x {
                WfInput::Task(e) => Ok((e, t, r)),
                WfInput::Workflow(e) => Err((e, t, r)),
            });
    (tasks.as_collection(), workflows.as_collection())
}
