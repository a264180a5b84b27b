//! Deadlines as data: the temporal operator behind every time rule (contract §4, §5, §8).
//!
//! A record that *becomes true* when the pipeline clock passes its deadline `d` is modelled
//! as a collection whose updates are moved forward in time to `max(t, d + 1)` (the first
//! millisecond at which "the clock has passed d"). An insertion and a retraction that both
//! happen before the deadline cancel at `d + 1`, so nothing is emitted; a record still present
//! at `d + 1` appears there — that appearance is the deadline firing. No polling: the
//! dataflow's frontier *is* the pipeline clock, so the record appears when the clock passes
//! `d` (wall mode: within a tick; event mode: when the watermark passes `d`).
//!
//! ```text
//!   candidate (while open) ──delay_until(deadline)──► appears at d+1 if still open ──► fire
//! ```
//!
//! Consolidate (or reduce) before reading a delayed collection: updates at future times are
//! held by the operators that follow, not emitted early.

use crate::model::Str;
use std::sync::Arc;

use differential_dataflow::{AsCollection, VecCollection};
use timely::dataflow::operators::vec::Map as _;

use crate::output::Millis;

/// Extension trait: move each update to when the clock passes its record's deadline.
pub trait DelayUntil<'s, D> {
    /// Every update `(d, t, r)` is moved to `max(t, deadline(d) + 1)`; records without a
    /// deadline pass unchanged.
    fn delay_until(
        self,
        deadline: impl Fn(&D) -> Option<Millis> + 'static,
    ) -> VecCollection<'s, u64, D>;
}

impl<'s, D: Clone + 'static> DelayUntil<'s, D> for VecCollection<'s, u64, D> {
    fn delay_until(
        self,
        deadline: impl Fn(&D) -> Option<Millis> + 'static,
    ) -> VecCollection<'s, u64, D> {
        self.inner
            .map(move |(d, t, r)| {
                let t2 = match deadline(&d) {
                    Some(dl) => t.max(dl.saturating_add(1)),
                    None => t,
                };
                (d, t2, r)
            })
            .as_collection()
    }
}

use crate::derived::{Derived, DerivedType};
use crate::output::{Owner, Row, SlaBreachRow, TaskRow, WorkflowRow};
use crate::workflows::{ReEscalation, SlaInfo, StaleInfo, WfOut, WfParts};
use crate::Emit;

/// What [`key_appearances`] yields: the fresh appearances, to derive events from, and the
/// keys that appeared, to build rows from.
pub(crate) struct Appearances<'s, K: 'static, V: 'static> {
    /// `((key, value), t, +1)` the first time the key has a record (at or after
    /// `decide_from`), with the value it appears with: derive its events from this, once.
    pub events: timely::dataflow::Stream<'s, u64, Vec<((K, V), u64, isize)>>,
    /// Every key that appeared, for as long as its owner lives: `+1` with the value it
    /// appeared with, at its appearance (or, for a key present when the clock reaches
    /// `decide_from`, at that instant: it appeared before the restart); `-1`, the same, when
    /// its owner retires. Rows built from it agree with the events published, whatever the
    /// key's cause did afterwards.
    pub facts: VecCollection<'s, u64, (K, V)>,
}

/// The first appearance of each key of `c`: `((key, value), t, +1)` the first time the key
/// has a record, with the value it appears with. Whatever was derived when a key appeared
/// stands: a later change of its value is not an appearance, nor is the key coming back
/// after it vanished (a wall-clock rule fired, then events dated before the deadline took its
/// cause away, then another cause brought it back), so one cause is never published twice.
/// The keys that appeared are remembered per `owner` (the workflow or order whose state
/// produced them) until the owner is `retired`, which bounds the memory by open work; while
/// remembered, they are also a collection ([`Appearances::facts`]), so that the rows fed by a
/// timer follow what was published, not the timer's current cause (rows must not contradict
/// published events). Their retraction happens at the retirement instant, where the sink
/// ignores row retractions of the retired owner ([`crate::gather`]): the rows stay.
/// Updates are applied in time order, once both inputs have passed their time; retirements
/// after the updates of their time.
///
/// Below `decide_from` (the restart's replay, whose effects are suppressed) nothing appears:
/// the replay applies history a poll at a time, so a key can come and go there in states the
/// original run never had. The keys present when the clock reaches `decide_from` count as
/// appeared (they did, before the restart): they publish nothing, and are facts from then on,
/// with their latest value. A key that appeared before the restart but is gone at the resumed
/// frontier is not known to have appeared (see decisions.md, "Rows follow published events").
pub(crate) fn key_appearances<'s, K, V, O>(
    c: VecCollection<'s, u64, (K, V)>,
    retired: &VecCollection<'s, u64, Owner>,
    decide_from: u64,
    owner: O,
) -> Appearances<'s, K, V>
where
    K: differential_dataflow::ExchangeData + std::hash::Hash,
    V: differential_dataflow::ExchangeData,
    O: Fn(&K, &V) -> Owner + Clone + 'static,
{
    use std::collections::{BTreeMap, HashMap};
    use timely::container::CapacityContainerBuilder;
    use timely::dataflow::channels::pact::Exchange;
    use timely::dataflow::operators::core::OkErr;
    use timely::dataflow::operators::generic::Operator;
    use timely::dataflow::operators::Capability;

    fn hash<T: std::hash::Hash>(x: &T) -> u64 {
        use std::hash::Hasher;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        x.hash(&mut h);
        h.finish()
    }
    let route = owner.clone();
    type Pending<K, V> = (Vec<((K, V), isize)>, Vec<Owner>);
    /// `true`: a fresh appearance (an event); `false`: a change of the facts.
    type Item<K, V> = (((K, V), bool), u64, isize);
    let out = c
        .inner
        .binary_frontier::<_, CapacityContainerBuilder<Vec<Item<K, V>>>, _, _, _, _>(
            retired.inner.clone(),
            Exchange::new(move |u: &((K, V), u64, isize)| hash(&route(&u.0 .0, &u.0 .1))),
            Exchange::new(|u: &(Owner, u64, isize)| hash(&u.0)),
            "KeyAppearances",
            move |_cap, _info| {
                // Per live key: its net count, its owner, and its latest value inserted.
                let mut counts: HashMap<K, (isize, Owner, V)> = HashMap::new();
                // Per owner: the keys that appeared, with the value they appeared with.
                let mut seen: HashMap<Owner, HashMap<K, V>> = HashMap::new();
                let mut seeded = false;
                let mut stash: BTreeMap<u64, Pending<K, V>> = BTreeMap::new();
                let mut caps: BTreeMap<u64, Capability<u64>> = BTreeMap::new();
                move |(input, input_f), (ret, ret_f), output| {
                    input.for_each(|cap, batch| {
                        for (d, t, r) in batch.drain(..) {
                            caps.entry(t).or_insert_with(|| cap.delayed(&t, 0));
                            stash.entry(t).or_default().0.push((d, r));
                        }
                    });
                    ret.for_each(|cap, batch| {
                        for (o, t, r) in batch.drain(..) {
                            if r > 0 {
                                caps.entry(t).or_insert_with(|| cap.delayed(&t, 0));
                                stash.entry(t).or_default().1.push(o);
                            }
                        }
                    });
                    while let Some((&t, _)) = stash.first_key_value() {
                        if input_f.less_equal(&t) || ret_f.less_equal(&t) {
                            break;
                        }
                        let (_, (updates, retirements)) = stash.pop_first().expect("first");
                        let cap = caps.remove(&t).expect("a capability per stashed time");
                        let mut session = output.session(&cap);
                        if !seeded && t >= decide_from {
                            seeded = true;
                            for (k, (n, o, v)) in &counts {
                                if *n > 0 {
                                    seen.entry(o.clone())
                                        .or_default()
                                        .insert(k.clone(), v.clone());
                                    session.give((((k.clone(), v.clone()), false), t, 1));
                                }
                            }
                        }
                        let mut candidates: Vec<(K, V)> = Vec::new();
                        for ((k, v), r) in updates {
                            // The owner is computed once per key, not per update.
                            let n = match counts.get_mut(&k) {
                                Some(n) => {
                                    n.0 += r;
                                    if r > 0 {
                                        n.2 = v.clone();
                                    }
                                    n.0
                                }
                                None => {
                                    let o = owner(&k, &v);
                                    counts.insert(k.clone(), (r, o, v.clone()));
                                    r
                                }
                            };
                            if n == 0 {
                                counts.remove(&k);
                            }
                            if r > 0 && seeded {
                                candidates.push((k, v));
                            }
                        }
                        for (k, v) in candidates {
                            if counts.get(&k).is_some_and(|n| n.0 > 0) {
                                let keys = seen.entry(owner(&k, &v)).or_default();
                                if !keys.contains_key(&k) {
                                    keys.insert(k.clone(), v.clone());
                                    session.give((((k.clone(), v.clone()), false), t, 1));
                                    session.give((((k, v), true), t, 1));
                                }
                            }
                        }
                        for o in retirements {
                            for (k, v) in seen.remove(&o).unwrap_or_default() {
                                session.give((((k, v), false), t, -1));
                            }
                        }
                    }
                }
            },
        );
    let (events, facts) = out.ok_err::<Vec<_>, _, Vec<_>, _, _>(|(((k, v), is_event), t, r)| {
        if is_event {
            Ok(((k, v), t, r))
        } else {
            Err(((k, v), t, r))
        }
    });
    Appearances {
        events,
        facts: facts.as_collection(),
    }
}

fn emit(d: Derived, t: u64) -> (Emit, u64, isize) {
    (
        Emit::record((d.workflow_instance_id.clone(), d.rank()), d.to_record(t)),
        t,
        1,
    )
}

/// Combined escalation facts merged into a workflow row.
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
enum WfRowPart {
    Base(Arc<WorkflowRow>, Option<Millis>),
    Breach(Millis, Str),
    Level(i32),
}

/// Facts merged into a task row.
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
enum TaskRowPart {
    Base(Arc<TaskRow>),
    Breach(u32, Str),
}

/// The time rules (contract §4 SLA, stale tasks, unanswered escalations) and the rows they
/// change, from the workflow rules' output. Returns everything to emit, including the final
/// `workflow_instances` and `task_instances` rows and every non-timer output passed through.
///
/// The rows merge, besides the live breaches and re-escalations, every one whose events were
/// published ([`Appearances::facts`]): a row never says less than its events (a workflow
/// re-escalated to level 2 keeps level 2 when it completes and its candidates go; in wall mode
/// a task keeps `sla_breached` when its on-time end arrives after the clock breached it).
pub fn time_rules<'s>(
    parts: WfParts<'s>,
    retired: &VecCollection<'s, u64, Owner>,
    decide_from: u64,
) -> VecCollection<'s, u64, Emit> {
    // Plain rows and events pass through; events are emitted when they appear.
    let WfParts {
        passthrough,
        sla_late,
        sla_open,
        stale,
        re_escalate,
        workflow_base,
        task_base,
    } = parts;
    let passthrough = passthrough
        .inner
        .flat_map(|((wid, out), t, r)| match out {
            WfOut::Row(row) => Some((Emit::Row(row), t, r)),
            WfOut::Event(d) if r > 0 => {
                Some((Emit::record((wid.into(), d.rank()), d.to_record(t)), t, 1))
            }
            _ => None,
        })
        .as_collection();

    // SLA: a breach per (task, attempt) when it is late by its events, or open past dueAt.
    let late = sla_late.map(|i| ((i.task_instance_id.clone(), i.attempt), i));
    let open = sla_open
        .map(|i| ((i.task_instance_id.clone(), i.attempt), i))
        .delay_until(|(_, i): &((Str, u32), Arc<SlaInfo>)| Some(i.due_at));
    let breaches = late
        .concat(open)
        .reduce_named("SlaBreaches", |_key, input, output| {
            output.push((input[0].0.clone(), 1));
        });
    let Appearances { events, facts } = key_appearances(
        breaches.clone(),
        retired,
        decide_from,
        |_, i: &Arc<SlaInfo>| Owner::Workflow(i.workflow_instance_id.clone()),
    );
    // The rows show every breach published, live or not (its attempt ended on time in wall
    // mode), with the live ones.
    let breaches_shown = breaches.concat(facts);
    let breach_out = events
        .flat_map(|((_, i), t, r): (((Str, u32), Arc<SlaInfo>), u64, isize)| {
            let mut out = Vec::new();
            if r <= 0 {
                return out;
            }
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
            out.push(emit(b, t));
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
            out.push(emit(e, t));
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
            out.push(emit(w, t));
            out.push((
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
                t,
                1,
            ));
            out
        })
        .as_collection();

    // Stale PENDING tasks.
    let stale = stale.delay_until(|s: &Arc<StaleInfo>| Some(s.deadline));
    // No row shows a stale period: its facts are not needed.
    let stale_out = key_appearances(
        stale.map(|s| {
            (
                (s.task_instance_id.clone(), s.attempt, s.last_event_time),
                s,
            )
        }),
        retired,
        decide_from,
        |_, s: &Arc<StaleInfo>| Owner::Workflow(s.workflow_instance_id.clone()),
    )
    .events
    .flat_map(
        |((_, s), t, r): (((Str, u32, Millis), Arc<StaleInfo>), u64, isize)| {
            (r > 0 && t > s.deadline).then(|| {
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
            })
        },
    )
    .as_collection();

    // Unanswered escalations: one per (workflow, level).
    let reesc = re_escalate
        .map(|r| ((r.workflow_instance_id.clone(), r.level), r))
        .delay_until(|(_, r): &((Str, i32), Arc<ReEscalation>)| Some(r.deadline))
        .reduce_named("ReEscalations", |_key, input, output| {
            // One per (workflow, level), with content that does not depend on which of several
            // escalations fired it (nor when): a second source firing later, or the first one
            // retracting, must not change it, or the same eventId would be emitted again.
            let r: &ReEscalation = input[0].0;
            output.push((
                Arc::new(ReEscalation {
                    deadline: 0,
                    source: Str::default(),
                    ..r.clone()
                }),
                1,
            ));
        });
    let Appearances { events, facts } = key_appearances(
        reesc.clone(),
        retired,
        decide_from,
        |(wid, _): &(Str, i32), _| Owner::Workflow(wid.clone()),
    );
    // The row shows every level published, live or not (the workflow closed, or in wall
    // mode a completion dated before the deadline answered it afterwards), with the live ones.
    let levels_shown = reesc.concat(facts);
    let reesc_out = events
        .flat_map(
            |((_, r), t, diff): (((Str, i32), Arc<ReEscalation>), u64, isize)| {
                (diff > 0).then(|| {
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
                })
            },
        )
        .as_collection();

    // Rows with the timers' escalations merged in.
    let wf_parts = workflow_base
        .map(|(wid, (row, t))| (wid, WfRowPart::Base(row, t)))
        .concat(breaches_shown.clone().map(|(_, i)| {
            (
                i.workflow_instance_id.to_string(),
                WfRowPart::Breach(i.due_at, i.task_def_id.clone()),
            )
        }))
        .concat(levels_shown.map(|((wid, level), _)| (wid.to_string(), WfRowPart::Level(level))));
    let wf_rows = wf_parts
        .reduce_named("WorkflowRow", |_wid, input, output| {
            let mut base = None;
            let mut breach: Option<(Millis, &Str)> = None;
            let mut level = 0;
            for (p, _) in input {
                match p {
                    WfRowPart::Base(row, t) => base = Some((row, *t)),
                    WfRowPart::Breach(due, def) => {
                        if breach.is_none_or(|(d, _)| *due > d) {
                            breach = Some((*due, def));
                        }
                    }
                    WfRowPart::Level(l) => level = level.max(*l),
                }
            }
            let Some((row, reason_time)) = base else {
                return;
            };
            let mut row = WorkflowRow::clone(row);
            if let Some((due, def)) = breach {
                row.is_escalated = true;
                row.escalation_level = row.escalation_level.max(1);
                if reason_time.is_none_or(|t| due >= t) {
                    row.escalation_reason = Some(format!("SLA_BREACH:{def}").into());
                }
            }
            if level > 0 {
                row.is_escalated = true;
                row.escalation_level = row.escalation_level.max(level);
            }
            output.push((Row::Workflow(row), 1));
        })
        .map(|(_, row)| Emit::row(row));
    let task_parts = task_base
        .map(|row| (row.task_instance_id.clone(), TaskRowPart::Base(row)))
        .concat(breaches_shown.map(|(_, i)| {
            (
                i.task_instance_id.clone(),
                TaskRowPart::Breach(i.attempt, i.escalate_to.clone()),
            )
        }));
    let task_rows = task_parts
        .reduce_named("TaskRow", |_id, input, output| {
            let mut base = None;
            let mut breaches = Vec::new();
            for (p, _) in input {
                match p {
                    TaskRowPart::Base(row) => base = Some(row),
                    TaskRowPart::Breach(a, to) => breaches.push((*a, to)),
                }
            }
            let Some(row) = base else { return };
            let mut row = TaskRow::clone(row);
            row.sla_breached = breaches.iter().any(|(a, _)| *a as i32 == row.attempt);
            if let Some((_, to)) = breaches.iter().max() {
                row.is_escalated = true;
                row.escalated_to = Some((*to).clone());
            }
            output.push((Row::Task(row), 1));
        })
        .map(|(_, row)| Emit::row(row));

    passthrough
        .concat(breach_out)
        .concat(stale_out)
        .concat(reesc_out)
        .concat(wf_rows)
        .concat(task_rows)
}
