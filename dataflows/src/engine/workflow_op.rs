//! `WorkflowOp`: the workflow rules (contract §4) and their time rules as keyed state, one
//! entry per workflowInstanceId.
//!
//! A workflow's entry keeps its workflow events, the events of its tasks, the facts of its
//! orders (from [`super::order_op`]) and the template version it pins (definitions are
//! broadcast: every worker holds the latest valid record per (templateId, version)). At each
//! stamp where any of these changed, or a timer of the key is due, the workflow is evaluated
//! over its folds ([`fold_workflow`], [`fold_task`]; each kept with its events and taken
//! again only when they change) by the rules ([`apply_rules`]: what
//! [`crate::workflows::evaluate`] does over the facts gathered); the outputs are compared
//! with the previous evaluation's:
//!
//! - rows (`task_readiness`) as `(-old, +new)`, derived events when they appear;
//! - SLA breaches, stale tasks and re-escalations as in [`crate::timers::time_rules`]: a
//!   candidate with deadline `d` counts from `d + 1` (the key wakes then; the rules, told
//!   the step's instant with [`Clock::At`], output a candidate not due yet as its deadline
//!   only, [`WfOut::Wake`]), and the first
//!   appearance of each key (task attempt, stale period, level) derives its events once; the
//!   keys that appeared are state of the workflow, merged with the live ones into the
//!   `workflow_instances` and `task_instances` rows, which are output when they change.
//!   Timers are cancelled lazily: a wake whose instant none of this (nor the lifecycle
//!   below) is due at is skipped without evaluating ([`Entry::wakes_at`]).
//!
//! The lifecycle ([`crate::lifecycle`], here [`super::life`]) is state of the key too: each
//! task and workflow event keeps the end of its grace; at the instants the old core's
//! tracker checks them, the events of a workflow that was not known (started, with its
//! pinned template present) a signal delay earlier are dead-lettered (`UNKNOWN_TEMPLATE` for
//! its WORKFLOW_STARTED, `UNKNOWN_WORKFLOW` otherwise) and dropped; a closed workflow
//! retires at the instant the tracker retires it (its events dropped, [`Emit::Retired`],
//! the keys that appeared forgotten) and a tombstone of its eventId hashes rejects a later
//! event (`UNKNOWN_WORKFLOW`) and ignores a duplicate. Order facts are not the workflow's
//! records: they keep coming from the orders' own lifecycle.

use crate::model::{Str, WfStatus};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::derived::{Derived, DerivedType};
use crate::engine::changes::{diff_sorted_by, supersede_as, Change, RowChanges};
use crate::engine::keyed::{Ctx, KeyedLogic};
use crate::engine::life::{self, check_instant, Closure, Log, Tomb};
use crate::engine::vec_map::VecMap;
use crate::events::{DefinitionRecord, TaskEvent, Template, WorkflowEvent};
use crate::lifecycle::{
    grace_end_of, hash_str, late_detail, unknown_detail, LifecycleRules, Tracked, WfInput,
    SIGNAL_DELAY_MS,
};
use crate::output::Owner;
use crate::output::{Millis, ReadinessRow, Row, SlaBreachRow, TaskRow, WorkflowRow};
use crate::rules::apply_rules;
use crate::tasks::{dedup_by_event_id, fold_task, TaskState};
use crate::workflows::{
    fold_workflow, Clock, OrderFact, ReEscalation, SlaInfo, StaleInfo, TimeRules, WfOut, WfState,
};
use crate::Emit;

/// A record of a workflow: its events, its tasks' events, its orders' facts.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum WfRec {
    Workflow(Arc<WorkflowEvent>),
    Task(Arc<TaskEvent>),
    /// (workflowInstanceId, fact).
    Order(Str, OrderFact),
}

type TemplateKey = (Str, i64);

/// One workflow's state.
#[derive(Default)]
struct Entry {
    /// Workflow events, each with the end of its grace.
    events: Vec<(Arc<WorkflowEvent>, u64)>,
    /// Task events by task, each with the end of its grace, and the task's folded state.
    tasks: VecMap<Str, TaskSlot>,
    /// The folded workflow events, kept until they change (`None`: refold).
    wf_state: Option<Arc<WfState>>,
    /// Whether the workflow was known (started, its template present), by instant.
    known: Log,
    closure: Closure<(Arc<WorkflowRow>, Option<Millis>)>,
    /// Set once the workflow retired.
    tomb: Option<Tomb>,
    orders: BTreeMap<OrderFact, isize>,
    /// The template version its WORKFLOW_STARTED names (indexed in `pinned`).
    pin: Option<TemplateKey>,
    /// The previous evaluation's rows (sorted, distinct).
    /// Held as `ReadinessRow`s (96 bytes; an `Arc<Row>` is 328), wrapped when output.
    prev_rows: Vec<ReadinessRow>,
    /// The previous evaluation's derived events, as fingerprints ([`Fingerprints`]; sorted,
    /// distinct): an event is output when it appears, so only its identity is needed
    /// afterwards, and a `Derived` is ~440 bytes where its fingerprint is 16.
    prev_events: Vec<u128>,
    /// The timer rules' emit-once state; `None` while empty (most workflows, most of the
    /// time: ~170 bytes saved per entry).
    timed: Option<Box<Timed>>,
    seeded: bool,
    /// The workflow's and its tasks' rows as output last, held as their tables' types (an
    /// `Arc<Row>` is sized for the largest table's row) and wrapped when output.
    wf_row: Option<WorkflowRow>,
    task_rows: VecMap<Str, TaskRow>,
    /// The instants (deadline + 1) at which the last evaluation's timer candidates (SLA,
    /// stale, re-escalation) come due: what a timer wake can change (see [`Entry::wakes_at`]).
    time_wakes: Vec<u64>,
}

/// The emit-once state of the timer rules: the keys live now and the keys that appeared.
#[derive(Default)]
struct Timed {
    breaches_now: BTreeMap<(Str, u32), Arc<SlaInfo>>,
    breaches_seen: BTreeMap<(Str, u32), Arc<SlaInfo>>,
    stale_now: BTreeSet<(Str, u32, Millis)>,
    stale_seen: HashSet<(Str, u32, Millis)>,
    levels_now: BTreeMap<i32, Arc<ReEscalation>>,
    levels_seen: BTreeMap<i32, Arc<ReEscalation>>,
}

impl Timed {
    fn is_empty(&self) -> bool {
        self.breaches_now.is_empty()
            && self.breaches_seen.is_empty()
            && self.stale_now.is_empty()
            && self.stale_seen.is_empty()
            && self.levels_now.is_empty()
            && self.levels_seen.is_empty()
    }
}

/// One task's events and their fold, kept until the events change.
#[derive(Default)]
struct TaskSlot {
    events: Vec<(Arc<TaskEvent>, u64)>,
    /// The fold of `events` (`None` while they changed since it was taken).
    state: Option<Option<Arc<TaskState>>>,
}

impl TaskSlot {
    /// The task's state: the cached fold, or a new one when the events changed.
    fn state(&mut self) -> Option<&TaskState> {
        let events = &self.events;
        self.state
            .get_or_insert_with(|| {
                let evs = dedup_by_event_id(events.iter().map(|(x, _)| &**x));
                fold_task(&evs).map(Arc::new)
            })
            .as_deref()
    }
}

impl Entry {
    /// Whether a step at `t` without records or definition changes can change anything:
    /// a timer candidate of the last evaluation comes due, a grace check, retirement or
    /// tombstone expiry is due, or emit-once keys are to be seeded. Otherwise the step
    /// would evaluate the same facts to the same outputs (the rules are a function of the
    /// facts; the clock enters only through these instants), and is skipped: timers are
    /// cancelled lazily, and most wakes find their candidate gone (a task started before
    /// it went stale, completed before its SLA).
    fn wakes_at(&self, t: u64, life: &LifecycleRules, decide_from: u64) -> bool {
        (!self.seeded && t >= decide_from)
            || self.time_wakes.contains(&t)
            || self.closure.due.iter().any(|d| *d <= t)
            || self.tomb.as_ref().is_some_and(|tb| tb.expired(life, t))
            || (self.tomb.is_none() && self.graces().any(|g| check_instant(g) == t))
    }

    /// Records held (workflow and task events).
    fn held(&self) -> usize {
        self.events.len() + self.tasks.values().map(|s| s.events.len()).sum::<usize>()
    }
    /// The ends of the graces of the records held.
    fn graces(&self) -> impl Iterator<Item = u64> + '_ {
        self.events
            .iter()
            .map(|(_, g)| *g)
            .chain(self.tasks.values().flat_map(|s| &s.events).map(|(_, g)| *g))
    }
}

/// The readiness row a workflow rule output (the only rows [`apply_rules`] outputs).
fn readiness(r: &Row) -> &ReadinessRow {
    match r {
        Row::Readiness(x) => x,
        _ => unreachable!("the workflow rules output readiness rows only"),
    }
}

/// 128-bit fingerprints of derived events, from two hashers seeded at random per process:
/// two events are taken for the same when their fingerprints are equal. Two different
/// events of one workflow collide with probability ~2^-128 per pair, and the seeds are not
/// known outside the process, so no input can be crafted to collide.
struct Fingerprints(foldhash::fast::FixedState, foldhash::fast::FixedState);

impl Fingerprints {
    fn new() -> Fingerprints {
        use std::hash::BuildHasher;
        let seed = |n: u8| std::collections::hash_map::RandomState::new().hash_one(n);
        Fingerprints(
            foldhash::fast::FixedState::with_seed(seed(0)),
            foldhash::fast::FixedState::with_seed(seed(1)),
        )
    }
    fn of(&self, d: &Derived) -> u128 {
        use std::hash::BuildHasher;
        ((self.0.hash_one(d) as u128) << 64) | self.1.hash_one(d) as u128
    }
}

/// The workflow logic of a worker.
pub struct WorkflowLogic {
    fingerprints: Fingerprints,
    rules: TimeRules,
    decide_from: u64,
    life: LifecycleRules,
    /// Definition records per (templateId, version), with their multiplicities.
    definitions: HashMap<TemplateKey, Vec<(DefinitionRecord, isize)>>,
    /// Which of this worker's workflows pin each template version.
    pinned: HashMap<TemplateKey, HashSet<Str>>,
    /// foldhash: this map is probed at every step (SipHash was 2 % of the workers' time).
    /// Entries boxed: the table keeps ~25-55 % of its slots empty, each the size of a slot,
    /// and an `Entry` is ~500 bytes.
    workflows: HashMap<Str, Box<Entry>, foldhash::fast::RandomState>,
}

impl WorkflowLogic {
    pub fn new(rules: TimeRules, life: LifecycleRules) -> WorkflowLogic {
        WorkflowLogic {
            fingerprints: Fingerprints::new(),
            rules,
            decide_from: life.decide_from,
            life,
            definitions: HashMap::new(),
            pinned: HashMap::new(),
            workflows: HashMap::default(),
        }
    }
}

/// The latest valid template of `key` among `definitions`: the record with the highest
/// position; a tombstone deletes (as [`crate::templates`]).
fn template_of(
    definitions: &HashMap<TemplateKey, Vec<(DefinitionRecord, isize)>>,
    key: &TemplateKey,
) -> Option<Arc<Template>> {
    definitions
        .get(key)?
        .iter()
        .filter(|(_, n)| *n > 0)
        .max_by_key(|(d, _)| d.pos)
        .and_then(|(d, _)| d.template.clone())
}

fn emit(d: Derived, t: u64) -> Emit {
    Emit::record((d.workflow_instance_id.clone(), d.rank()), d.to_record(t))
}

/// The events and the row of an SLA breach found at `t` (as in `time_rules`).
fn breach(i: &SlaInfo, t: u64, cx: &mut Ctx<Emit>) {
    let minutes = (t.saturating_sub(i.due_at) / 60_000) as i64;
    let reason: Str = format!("SLA_BREACH:{}", i.task_def_id).into();
    let base = |ty: DerivedType, name: String| {
        let mut d = Derived::new(ty, &name, &i.workflow_instance_id);
        d.patient_id = i.patient_id.clone();
        d.template_id = Some(i.template_id.clone());
        d.template_version = Some(i.template_version);
        d.task_instance_id = Some(i.task_instance_id.clone());
        d.task_def_id = Some(i.task_def_id.clone());
        d.task_name = i.task_name.clone();
        d.attempt = Some(i.attempt);
        d
    };
    let mut b = base(
        DerivedType::TaskSlaBreached,
        format!(
            "hmis-flow:TASK_SLA_BREACHED:{}:{}",
            i.task_instance_id, i.attempt
        ),
    );
    b.due_at = Some(i.due_at);
    b.minutes_overdue = Some(minutes);
    let breach_id = b.event_id.clone();
    cx.give(emit(b, t), 1);
    let mut e = base(
        DerivedType::TaskEscalated,
        format!(
            "hmis-flow:TASK_ESCALATED:{}:{}",
            i.task_instance_id, i.attempt
        ),
    );
    e.escalated_to = Some(i.escalate_to.clone());
    e.escalation_reason = Some(reason.clone());
    e.escalation_level = Some(1);
    e.cause_event_id = Some(breach_id.clone());
    cx.give(emit(e, t), 1);
    let mut w = base(
        DerivedType::WorkflowEscalated,
        format!(
            "hmis-flow:WORKFLOW_ESCALATED:{}:SLA_BREACH:{}:{}",
            i.workflow_instance_id, i.task_instance_id, i.attempt
        ),
    );
    w.escalation_reason = Some(reason);
    w.escalation_level = Some(1);
    w.escalated_to = Some(i.escalate_to.clone());
    w.cause_event_id = Some(breach_id.clone());
    cx.give(emit(w, t), 1);
    cx.give(
        Emit::row(Row::SlaBreach(SlaBreachRow {
            task_instance_id: i.task_instance_id.clone(),
            attempt: i.attempt as i32,
            workflow_instance_id: i.workflow_instance_id.clone(),
            patient_id: i.patient_id.clone(),
            template_id: Some(i.template_id.clone()),
            template_version: Some(i.template_version),
            task_def_id: i.task_def_id.clone(),
            due_at: i.due_at,
            breached_at: t,
            minutes_overdue: minutes,
            escalated_to: Some(i.escalate_to.clone()),
            event_id: Some(breach_id),
        })),
        1,
    );
}

fn stale(s: &StaleInfo, t: u64) -> Emit {
    let mut d = Derived::new(
        DerivedType::TaskStale,
        &format!(
            "hmis-flow:TASK_STALE:{}:{}:{}",
            s.task_instance_id, s.attempt, s.last_event_time
        ),
        &s.workflow_instance_id,
    );
    d.patient_id = s.patient_id.clone();
    d.task_instance_id = Some(s.task_instance_id.clone());
    d.task_def_id = Some(s.task_def_id.clone());
    d.task_name = s.task_name.clone();
    d.attempt = Some(s.attempt);
    d.minutes_overdue = Some(((t - s.last_event_time) / 60_000) as i64);
    emit(d, t)
}

fn re_escalation(r: &ReEscalation, t: u64) -> Emit {
    let mut d = Derived::new(
        DerivedType::WorkflowEscalated,
        &format!(
            "hmis-flow:WORKFLOW_ESCALATED:{}:UNANSWERED:{}",
            r.workflow_instance_id, r.level
        ),
        &r.workflow_instance_id,
    );
    d.patient_id = r.patient_id.clone();
    d.template_id = Some(r.template_id.clone());
    d.template_version = Some(r.template_version);
    d.escalation_level = Some(r.level);
    d.escalation_reason = Some("UNANSWERED_ESCALATION".into());
    emit(d, t)
}

/// Keeps the least value per key (as `reduce`'s `input[0]`).
fn keep_min<K: Ord, V: Ord>(m: &mut BTreeMap<K, V>, k: K, v: V) {
    match m.get(&k) {
        Some(cur) if *cur <= v => {}
        _ => {
            m.insert(k, v);
        }
    }
}

impl KeyedLogic for WorkflowLogic {
    type Key = Str;
    type Rec = WfRec;
    type Side = DefinitionRecord;
    type Out = Emit;
    /// Workflow events, then task events, each by position; then order facts.
    type Order = (u8, i32, i64);

    fn key(rec: &WfRec) -> Str {
        match rec {
            WfRec::Workflow(e) => e.workflow_instance_id.clone(),
            WfRec::Task(e) => e.workflow_instance_id.clone(),
            WfRec::Order(w, _) => w.clone(),
        }
    }
    fn order(rec: &WfRec) -> (u8, i32, i64) {
        match rec {
            WfRec::Workflow(e) => (0, e.pos.partition, e.pos.offset),
            WfRec::Task(e) => (1, e.pos.partition, e.pos.offset),
            WfRec::Order(..) => (2, 0, 0),
        }
    }

    fn side(&mut self, _t: u64, side: Vec<(DefinitionRecord, isize)>, touched: &mut Vec<Str>) {
        let mut changed: BTreeSet<TemplateKey> = BTreeSet::new();
        let mut before: HashMap<TemplateKey, Option<Arc<Template>>> = HashMap::new();
        for (d, n) in side {
            let key = (d.template_id.clone(), d.version);
            if !before.contains_key(&key) {
                before.insert(key.clone(), template_of(&self.definitions, &key));
            }
            let recs = self.definitions.entry(key.clone()).or_default();
            match recs.iter_mut().find(|(x, _)| *x == d) {
                Some(slot) => slot.1 += n,
                None => recs.push((d, n)),
            }
            recs.retain(|(_, n)| *n != 0);
            changed.insert(key);
        }
        for key in changed {
            if before.get(&key).cloned().flatten() != template_of(&self.definitions, &key) {
                if let Some(ws) = self.pinned.get(&key) {
                    touched.extend(ws.iter().cloned());
                }
            }
        }
    }

    fn step(&mut self, wid: &Str, t: u64, recs: Vec<(WfRec, isize)>, cx: &mut Ctx<Emit>) {
        // The key's entry in place (one hash, no move of the entry); removed at the end
        // if the key turns out idle.
        let WorkflowLogic {
            fingerprints,
            rules,
            decide_from,
            life: life_rules,
            definitions,
            pinned,
            workflows,
        } = self;
        if recs.is_empty()
            && !cx.touched()
            && !cx.exhausted()
            && workflows
                .get(wid)
                .is_none_or(|e| !e.wakes_at(t, life_rules, *decide_from))
        {
            return;
        }
        let e = workflows.entry(wid.clone()).or_default();
        let stats = &life_rules.stats;
        let held_before = e.held() as i64;
        if !cx.exhausted() && e.tomb.as_ref().is_some_and(|tb| tb.expired(life_rules, t)) {
            e.tomb = None;
            life::add(stats, |s| &s.tombstones, -1);
        }
        // Graces of the records that arrive now (checked if the key is not known after
        // this instant).
        let mut arrived: Vec<u64> = Vec::new();
        for (r, d) in recs {
            if let (Some(tomb), true) = (&mut e.tomb, !matches!(r, WfRec::Order(..))) {
                // Retired: a duplicate changes nothing, a new event is rejected.
                if d > 0 {
                    let input = match r {
                        WfRec::Workflow(x) => WfInput::Workflow(x),
                        WfRec::Task(x) => WfInput::Task(x),
                        WfRec::Order(..) => unreachable!("order facts are not tracked"),
                    };
                    if tomb.insert(hash_str(input.event_id())) {
                        life::count(stats, |s| &s.late_total);
                        let detail = late_detail(wid, tomb.at);
                        cx.give(
                            Emit::dead(input.dead_letter(
                                life_rules,
                                input.late_reason(),
                                detail,
                                t,
                            )),
                            1,
                        );
                    } else {
                        life::count(stats, |s| &s.duplicates_total);
                    }
                }
                continue;
            }
            match r {
                WfRec::Workflow(x) => {
                    if d > 0 {
                        let g = grace_end_of(life_rules, x.event_time, t);
                        arrived.push(g);
                        e.events.push((x, g));
                        e.wf_state = None;
                    } else if let Some(i) = e.events.iter().position(|(y, _)| *y == x) {
                        e.events.swap_remove(i);
                        e.wf_state = None;
                    }
                }
                WfRec::Task(x) => {
                    if d > 0 {
                        let slot = e.tasks.get_or_default(&x.task_instance_id);
                        let g = grace_end_of(life_rules, x.event_time, t);
                        arrived.push(g);
                        slot.events.push((x, g));
                        slot.state = None;
                    } else if let Some(slot) = e.tasks.get_mut(&x.task_instance_id) {
                        if let Some(i) = slot.events.iter().position(|(y, _)| *y == x) {
                            slot.events.swap_remove(i);
                            slot.state = None;
                            if slot.events.is_empty() {
                                e.tasks.remove(&x.task_instance_id);
                            }
                        }
                    }
                }
                WfRec::Order(_, f) => {
                    let n = e.orders.entry(f.clone()).or_default();
                    *n += d;
                    if *n == 0 {
                        e.orders.remove(&f);
                    }
                }
            }
        }

        // A grace check due now, with the workflow not known a signal delay ago: every
        // record whose grace has ended is dead-lettered (and retracted).
        if e.tomb.is_none()
            && !cx.exhausted()
            && !e.known.at(t.saturating_sub(SIGNAL_DELAY_MS))
            && e.graces().any(|g| check_instant(g) == t)
        {
            let grace = life_rules.unknown_reference_grace_ms;
            let mut dead = Vec::new();
            e.events.retain(|(x, g)| {
                let late = *g < t;
                if late {
                    dead.push(WfInput::Workflow(x.clone()));
                }
                !late
            });
            if !dead.is_empty() {
                e.wf_state = None;
            }
            for slot in e.tasks.values_mut() {
                let before = slot.events.len();
                slot.events.retain(|(x, g)| {
                    let late = *g < t;
                    if late {
                        dead.push(WfInput::Task(x.clone()));
                    }
                    !late
                });
                if slot.events.len() != before {
                    slot.state = None;
                }
            }
            e.tasks.retain(|_, slot| !slot.events.is_empty());
            for r in dead {
                let reason = r.unknown_reason().expect("workflow records are checked");
                let detail = unknown_detail(reason, wid, grace);
                life::count(stats, |s| &s.unknown_total);
                cx.give(Emit::dead(r.dead_letter(life_rules, reason, detail, t)), 1);
            }
        }
        // Retirement: every record of the workflow is dropped at this instant.
        let mut retired = false;
        if e.tomb.is_none() && !cx.exhausted() && e.closure.retires_at(t) {
            let mut ids = Vec::with_capacity(e.held());
            ids.extend(e.events.iter().map(|(x, _)| hash_str(&x.event_id)));
            for slot in e.tasks.values() {
                ids.extend(slot.events.iter().map(|(x, _)| hash_str(&x.event_id)));
            }
            e.events.clear();
            e.tasks.clear();
            e.wf_state = None;
            e.tomb = Some(Tomb::new(t, ids));
            if let Some(tm) = &mut e.timed {
                tm.breaches_seen.clear();
                tm.stale_seen.clear();
                tm.levels_seen.clear();
            }
            retired = true;
            cx.give(Emit::Retired(Owner::Workflow(wid.clone())), 1);
            life::count(stats, |s| &s.retired_total);
            life::add(stats, |s| &s.tombstones, 1);
            cx.wake_at(
                t.saturating_add(life_rules.tombstone_retention_ms)
                    .saturating_add(1),
            );
        }

        // The workflow's facts: its folded events, the template it pins, its tasks' folds
        // (by taskInstanceId), its orders (a `BTreeMap`'s keys). Folds are cached: only what
        // changed at this instant is folded again.
        let mut pin = None;
        let mut known = false;
        let mut state: Option<Arc<WfState>> = None;
        let mut template: Option<Arc<Template>> = None;
        if !e.events.is_empty() {
            let events = &e.events;
            let st = e
                .wf_state
                .get_or_insert_with(|| {
                    let evs: Vec<&WorkflowEvent> = events.iter().map(|(x, _)| &**x).collect();
                    Arc::new(fold_workflow(wid, &evs))
                })
                .clone();
            if let Some(s) = &st.started {
                let key = (s.template_id.clone(), s.template_version);
                template = template_of(definitions, &key);
                known = template.is_some();
                pin = Some(key);
            }
            state = Some(st);
        }
        if pin != e.pin {
            if let Some(old) = e.pin.take() {
                if let Some(ws) = pinned.get_mut(&old) {
                    ws.remove(wid);
                    if ws.is_empty() {
                        pinned.remove(&old);
                    }
                }
            }
            if let Some(new) = &pin {
                pinned.entry(new.clone()).or_default().insert(wid.clone());
            }
            e.pin = pin;
        }
        let tasks: Vec<&TaskState> = e.tasks.values_mut().filter_map(|s| s.state()).collect();
        debug_assert!(tasks
            .windows(2)
            .all(|w| w[0].task_instance_id < w[1].task_instance_id));
        let orders: Vec<&OrderFact> = e
            .orders
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(f, _)| f)
            .collect();

        // The workflow's own rules, then each task's.
        let mut outs: Vec<WfOut> = Vec::new();
        if let Some(st) = state.as_deref() {
            let tpl = template.as_deref();
            apply_rules(
                wid,
                st,
                tpl,
                &tasks,
                &orders,
                rules,
                Clock::At(t),
                &mut outs,
            );
        }

        // Split: events are output when they appear (below), rows pass through, timer
        // candidates count from deadline + 1.
        let mut fps: Vec<u128> = Vec::with_capacity(outs.len());
        let mut new_events: Vec<Arc<Derived>> = Vec::new();
        let mut rows_now: Vec<Arc<Row>> = Vec::new();
        let mut breaches_now = BTreeMap::new();
        let mut stale_now: BTreeMap<(Str, u32, Millis), Arc<StaleInfo>> = BTreeMap::new();
        let mut levels_now: BTreeMap<i32, Arc<ReEscalation>> = BTreeMap::new();
        let mut wf_base = None;
        let mut closed = None;
        let mut task_bases = Vec::new();
        e.time_wakes.clear();
        let mut wake_at = |w: u64, cx: &mut Ctx<Emit>| {
            e.time_wakes.push(w);
            cx.wake_at(w);
        };
        for o in outs {
            match o {
                WfOut::Event(ev) => {
                    let fp = fingerprints.of(&ev);
                    if e.prev_events.binary_search(&fp).is_err() {
                        new_events.push(ev);
                    }
                    fps.push(fp);
                }
                WfOut::Row(row) => rows_now.push(row),
                WfOut::SlaLate(i) => keep_min(
                    &mut breaches_now,
                    (i.task_instance_id.clone(), i.attempt),
                    i,
                ),
                WfOut::SlaOpen(i) if t > i.due_at => keep_min(
                    &mut breaches_now,
                    (i.task_instance_id.clone(), i.attempt),
                    i,
                ),
                WfOut::SlaOpen(i) => wake_at(i.due_at.saturating_add(1), cx),
                WfOut::Stale(s) if t > s.deadline => keep_min(
                    &mut stale_now,
                    (s.task_instance_id.clone(), s.attempt, s.last_event_time),
                    s,
                ),
                WfOut::Stale(s) => wake_at(s.deadline.saturating_add(1), cx),
                WfOut::ReEscalate(r) if t > r.deadline => keep_min(&mut levels_now, r.level, r),
                WfOut::ReEscalate(r) => wake_at(r.deadline.saturating_add(1), cx),
                WfOut::Wake(d) => wake_at(d.saturating_add(1), cx),
                WfOut::WorkflowBase(row, rt) => {
                    if row.status != WfStatus::Active {
                        closed = Some((row.clone(), rt));
                    }
                    wf_base = Some((row, rt))
                }
                WfOut::TaskBase(row) => task_bases.push(row),
            }
        }
        // Events that appear are output, in their sorted order, before rows (only they need
        // an order: most of a workflow's events are those of its previous evaluation).
        new_events.sort();
        new_events.dedup();
        for ev in &new_events {
            cx.give(Emit::record((wid.clone(), ev.rank()), ev.to_record(t)), 1);
        }
        fps.sort_unstable();
        fps.dedup();
        e.prev_events = fps;
        // Only what is diffed with the previous evaluation needs an order (the rest is keyed
        // above, by least value, which no order changes).
        rows_now.sort();
        rows_now.dedup();
        // One per (workflow, level), with content independent of which escalation fired it.
        let levels_now: BTreeMap<i32, Arc<ReEscalation>> = levels_now
            .into_iter()
            .map(|(l, r)| {
                (
                    l,
                    Arc::new(ReEscalation {
                        deadline: 0,
                        source: Str::default(),
                        ..ReEscalation::clone(&r)
                    }),
                )
            })
            .collect();

        // Rows as their changes.
        let mut rows = RowChanges::default();
        let mut changed = false;
        diff_sorted_by(
            &e.prev_rows,
            &rows_now,
            |a, b| a.cmp(readiness(b)),
            |c| {
                changed = true;
                let (row, d) = match c {
                    Change::Gone(old) => (Arc::new(Row::Readiness(old.clone())), -1),
                    Change::New(new) => (new.clone(), 1),
                };
                rows.give(row, d, |r, d| cx.give(Emit::Row(r), d))
            },
        );
        rows.finish(|r, d| cx.give(Emit::Row(r), d));
        if changed {
            e.prev_rows = rows_now.iter().map(|r| readiness(r).clone()).collect();
        }

        // A workflow without timer state works on an empty one on the stack (no allocation),
        // boxed below if this step filled it.
        let mut fresh = Timed::default();
        let tm: &mut Timed = match e.timed.as_deref_mut() {
            Some(tm) => tm,
            None => &mut fresh,
        };
        // Emit-once keys: what was present when the clock reached `decide_from` appeared
        // before a restart; from then on, the first appearance derives the events.
        if !e.seeded && t >= *decide_from {
            e.seeded = true;
            for (k, v) in &tm.breaches_now {
                tm.breaches_seen
                    .entry(k.clone())
                    .or_insert_with(|| v.clone());
            }
            tm.stale_seen.extend(tm.stale_now.iter().cloned());
            for (k, v) in &tm.levels_now {
                tm.levels_seen.entry(*k).or_insert_with(|| v.clone());
            }
        }
        if t >= *decide_from {
            for (k, i) in &breaches_now {
                if !tm.breaches_seen.contains_key(k) {
                    tm.breaches_seen.insert(k.clone(), i.clone());
                    breach(i, t, cx);
                }
            }
            for (k, s) in &stale_now {
                if tm.stale_seen.insert(k.clone()) {
                    cx.give(stale(s, t), 1);
                }
            }
            for (l, r) in &levels_now {
                if !tm.levels_seen.contains_key(l) {
                    tm.levels_seen.insert(*l, r.clone());
                    cx.give(re_escalation(r, t), 1);
                }
            }
        }
        tm.breaches_now = breaches_now;
        tm.stale_now = stale_now.into_keys().collect();
        tm.levels_now = levels_now;

        // The rows, with the escalations of the timers merged in (live or published).
        let shown = || tm.breaches_now.values().chain(tm.breaches_seen.values());
        let wf_row = wf_base.map(|(row, reason_time)| {
            // Built for this step: taken without a copy unless a closure holds it too.
            let mut row = Arc::try_unwrap(row).unwrap_or_else(|r| WorkflowRow::clone(&r));
            let mut latest: Option<(Millis, &Str)> = None;
            for i in shown() {
                let part = (i.due_at, &i.task_def_id);
                if latest.is_none_or(|l| part.0 > l.0 || (part.0 == l.0 && part.1 < l.1)) {
                    latest = Some(part);
                }
            }
            if let Some((due, def)) = latest {
                row.is_escalated = true;
                row.escalation_level = row.escalation_level.max(1);
                if reason_time.is_none_or(|t| due >= t) {
                    row.escalation_reason = Some(format!("SLA_BREACH:{def}").into());
                }
            }
            let level = tm
                .levels_now
                .keys()
                .chain(tm.levels_seen.keys())
                .max()
                .copied()
                .unwrap_or(0);
            if level > 0 {
                row.is_escalated = true;
                row.escalation_level = row.escalation_level.max(level);
            }
            row
        });
        supersede_as(
            &mut e.wf_row,
            wf_row,
            |r| Arc::new(Row::Workflow(r.clone())),
            |r, d| cx.give(Emit::Row(r), d),
        );
        // The task rows, updated in place: a row replaced needs only its `+new` (see
        // `RowChanges`), one gone outputs its `-old` (after the others, as before).
        let mut task_rows = std::mem::take(&mut e.task_rows);
        let mut gone: Vec<TaskRow> = Vec::new();
        if task_rows.len() > task_bases.len() {
            // Some rows are gone: those whose task has no base now (the bases come in
            // taskInstanceId order, the order of the task facts).
            debug_assert!(task_bases
                .windows(2)
                .all(|w| w[0].task_instance_id < w[1].task_instance_id));
            task_rows.retain(|id, row| {
                let live = task_bases
                    .binary_search_by(|b| b.task_instance_id.cmp(id))
                    .is_ok();
                if !live {
                    gone.push(row.clone());
                }
                live
            });
        }
        for base in task_bases {
            // The breaches shown for the task: whether its current attempt's is one, and
            // the escalation of the latest (by attempt, then escalateTo).
            let mut breached = false;
            let mut latest: Option<(u32, &Str)> = None;
            for i in shown().filter(|i| i.task_instance_id == base.task_instance_id) {
                breached |= i.attempt as i32 == base.attempt;
                if latest.is_none_or(|l| (i.attempt, &i.escalate_to) > l) {
                    latest = Some((i.attempt, &i.escalate_to));
                }
            }
            // Built for this step: taken without a copy.
            let mut row = Arc::try_unwrap(base).unwrap_or_else(|b| TaskRow::clone(&b));
            row.sla_breached = breached;
            if let Some((_, to)) = latest {
                row.is_escalated = true;
                row.escalated_to = Some(to.clone());
            }
            match task_rows.get_mut(&row.task_instance_id) {
                Some(old) => {
                    if *old != row {
                        cx.give(Emit::Row(Arc::new(Row::Task(row.clone()))), 1);
                        *old = row;
                    }
                }
                None => {
                    cx.give(Emit::Row(Arc::new(Row::Task(row.clone()))), 1);
                    task_rows.insert(row.task_instance_id.clone(), row);
                }
            }
        }
        for row in gone {
            cx.give(Emit::Row(Arc::new(Row::Task(row))), -1);
        }
        e.task_rows = task_rows;
        match &e.timed {
            None if !fresh.is_empty() => e.timed = Some(Box::new(fresh)),
            Some(tm) if tm.is_empty() => e.timed = None,
            _ => {}
        }

        // What the tracker learns from this instant: known, closed.
        let was_known = e.known.now();
        e.known.set(t, known);
        if !known {
            // Checks at the end of the graces still running: of the records that arrived
            // now, or of all if the workflow stopped being known now.
            if was_known {
                let running: Vec<u64> = e.graces().filter(|g| *g >= t).collect();
                for g in running {
                    cx.wake_at(check_instant(g));
                }
            } else {
                for g in arrived {
                    cx.wake_at(check_instant(g));
                }
            }
        }
        e.known.prune(t);
        if e.tomb.is_none() && !retired {
            let closure = closed.map(|(row, rt)| {
                let at = row.completed_at.unwrap_or_default();
                ((row, rt), at)
            });
            if let Some(d) = e.closure.update(life_rules, t, closure) {
                cx.wake_at(d);
            }
            e.closure.log.prune(t);
        } else {
            e.closure = Closure::default();
        }
        let held_after = e.held() as i64;
        life::add(
            &life_rules.stats,
            |s| &s.held_records,
            held_after - held_before,
        );
        life::add(
            &life_rules.stats,
            |s| &s.live_keys,
            (held_after > 0) as i64 - (held_before > 0) as i64,
        );
        let idle = held_after == 0
            && e.orders.is_empty()
            && e.tomb.is_none()
            && e.wf_row.is_none()
            && e.task_rows.is_empty()
            && e.prev_rows.is_empty()
            && e.prev_events.is_empty()
            && e.closure.due.is_empty()
            && !e.known.now()
            && e.timed.is_none();
        if idle {
            workflows.remove(wid);
        }
    }
}
