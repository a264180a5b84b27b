//! The dataflow against a from-scratch reference of the contract (§4, §5), on seeded random
//! histories (differential's `reduce_reference` pattern).
//!
//! For each seed, [`history::generate`] builds a history and [`model::expect`] computes what the
//! contract requires of it. The history is then fed to `harness::run` with 1 and 3 workers:
//! - **per event**: every event at its own eventTime (what `clock = event` does). Final rows,
//!   the derived WORKFLOW_COMPLETED / WORKFLOW_FAILED / WORKFLOW_ESCALATED(TASK_FAILED) /
//!   TASK_RETRY_SCHEDULED facts and the WORKFLOW_PROGRESS values must equal the reference;
//!   TASK_READY must be emitted once per readiness episode; TASK_BLOCKED must cover every
//!   "stopped being ready because of a blocking order" and nothing that was never blocked.
//! - **batched**: the eventTime-sorted history cut into a few batches, each at one pipeline
//!   time (a coarse clock). Final rows and the derived facts must still equal the reference;
//!   transient events (TASK_READY, WORKFLOW_PROGRESS) may be skipped, never invented.
//! - **interleaved**: partitions interleaved at random (arrival order across topics is
//!   arbitrary), cut into a few batches. Only the final rows must equal the reference.
//! - **restart**: a run split at a random instant F, the second part restarted with the first
//!   replayed below F; with the same times per event, rows and published records must equal
//!   the uninterrupted run's: nothing lost, nothing published twice, one content per eventId.
//!
//! Every outcome (and every restart's combined outcome) is also checked against itself: its
//! final rows must agree with the derived events it published ([`check_rows_follow_events`]).
//! `timed_histories_rows_agree_with_events` checks that invariant alone on histories with
//! timers ([`history::generate_timed`]: SLA breaches, stale tasks, re-escalations, overdue
//! orders), which the model does not model (`HMIS_REF_TIMED_SEEDS=n`, default 20).
//!
//! `HMIS_REF_SEEDS=n` sets the number of seeds (default 60), `HMIS_REF_SEED=s` runs one seed;
//! with it, `HMIS_REF_WF=w03` prints that workflow's input and published events
//! (`HMIS_REF_WORKERS` workers). A failure lists, per kind of discrepancy, how many
//! (seed, mode) runs showed it and the first examples. Discrepancies already understood are
//! named `[K1]`…`[K8]` and each has a minimal reproduction at the end of this file; any other
//! kind is new. `[K9]` and `[K10]` name rows that miss a published event for a documented
//! reason (a restart's seeding, a re-decided history): they are printed, not failed.

mod common;
#[path = "reference/history.rs"]
mod history;
#[path = "reference/model.rs"]
mod model;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use hmis_dataflows::events::{parse_time, Event};
use hmis_dataflows::harness::{run, Outcome, Run};
use hmis_dataflows::model::Str;
use hmis_dataflows::output::{Millis, OutRecord, OutTopic, Row};
use model::Expected;
use rand::rngs::SmallRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// What a run published and left in its tables, in the reference's terms.
#[derive(Debug, Default)]
struct Observed {
    ready: BTreeSet<(String, String)>,
    workflows: BTreeMap<String, (String, i32, bool)>,
    tasks: BTreeMap<String, (String, u32)>,
    completed: BTreeSet<String>,
    failed: BTreeMap<String, BTreeSet<String>>,
    escalated_failures: BTreeMap<String, BTreeSet<String>>,
    retries: BTreeSet<(String, u32)>,
    progress: BTreeSet<(String, i32)>,
    ready_ids: BTreeMap<(String, String), BTreeSet<String>>,
    blocked: BTreeSet<(String, String)>,
}

fn s(v: &Value, k: &str) -> String {
    v[k].as_str().unwrap_or_default().to_string()
}

fn observe(o: &Outcome) -> Observed {
    let mut ob = Observed::default();
    for r in o.rows.values() {
        match r {
            Row::Readiness(r) => {
                ob.ready.insert((
                    r.workflow_instance_id.to_string(),
                    r.task_def_id.to_string(),
                ));
            }
            Row::Workflow(w) => {
                ob.workflows.insert(
                    w.workflow_instance_id.to_string(),
                    (w.status.to_string(), w.progress_percentage, w.is_escalated),
                );
            }
            Row::Task(t) => {
                ob.tasks.insert(
                    t.task_instance_id.to_string(),
                    (t.status.to_string(), t.attempt as u32),
                );
            }
            // Order, SLA and alert tables are outside this comparison.
            _ => {}
        }
    }
    for r in o.records.iter().filter(|r| r.topic == OutTopic::Derived) {
        let v: Value = serde_json::from_str(&r.payload).expect("derived payload is JSON");
        assert_eq!(v["eventType"].as_str(), Some(r.event_type.as_str()));
        assert_eq!(v["eventId"].as_str(), Some(r.event_id.as_str()));
        let wid = s(&v, "workflowInstanceId");
        let pair = (wid.clone(), s(&v, "taskDefId"));
        match r.event_type.as_str() {
            "WORKFLOW_COMPLETED" => {
                ob.completed.insert(wid);
            }
            "WORKFLOW_FAILED" => {
                ob.failed.entry(wid).or_default().insert(s(&v, "taskDefId"));
            }
            "WORKFLOW_ESCALATED" => {
                let reason = s(&v, "escalationReason");
                if let Some(def) = reason.strip_prefix("TASK_FAILED:") {
                    ob.escalated_failures
                        .entry(wid)
                        .or_default()
                        .insert(def.to_string());
                }
            }
            "TASK_RETRY_SCHEDULED" => {
                ob.retries.insert((
                    s(&v, "taskInstanceId"),
                    v["attempt"].as_u64().unwrap_or(0) as u32,
                ));
            }
            "WORKFLOW_PROGRESS" => {
                ob.progress
                    .insert((wid, v["progressPercentage"].as_i64().unwrap_or(-1) as i32));
            }
            "TASK_READY" => {
                ob.ready_ids
                    .entry(pair)
                    .or_default()
                    .insert(r.event_id.clone());
            }
            "TASK_BLOCKED" => {
                ob.blocked.insert(pair);
            }
            _ => {}
        }
    }
    ob
}

/// Discrepancies found, by kind: kind → examples.
type Found = BTreeMap<&'static str, Vec<String>>;

fn note(found: &mut Found, kind: &'static str, what: String) {
    found.entry(kind).or_default().push(what);
}

fn diff_sets<T: Ord + std::fmt::Debug + Clone>(
    want: &BTreeSet<T>,
    got: &BTreeSet<T>,
) -> Option<String> {
    if want == got {
        return None;
    }
    let missing: Vec<_> = want.difference(got).cloned().collect();
    let extra: Vec<_> = got.difference(want).cloned().collect();
    Some(format!("missing {missing:?}, unexpected {extra:?}"))
}

fn diff_maps<K: Ord + std::fmt::Debug, V: PartialEq + std::fmt::Debug>(
    want: &BTreeMap<K, V>,
    got: &BTreeMap<K, V>,
) -> Option<String> {
    let mut out = Vec::new();
    for (k, w) in want {
        match got.get(k) {
            Some(g) if g == w => {}
            g => out.push(format!("{k:?}: want {w:?}, got {g:?}")),
        }
    }
    for (k, g) in got {
        if !want.contains_key(k) {
            out.push(format!("{k:?}: unexpected {g:?}"));
        }
    }
    (!out.is_empty()).then(|| out.join("; "))
}

// Known discrepancy classes (see the minimal reproductions at the end of this file). They
// still fail the comparison; naming them keeps any other discrepancy visible in the report.
const K1: &str = "[K1] after a derived completion, a task failing for good turns the workflow FAILED (§8: stays COMPLETED)";
const K2: &str = "[K2] derived WORKFLOW_COMPLETED/FAILED/ESCALATED not published when an upstream terminal event is processed at the same time";
const K3: &str =
    "[K3] is_escalated cleared by a later upstream terminal event (§4: the flag stays set)";
const K4: &str = "[K4] TASK_RETRY_SCHEDULED not published when the failure and the next attempt are processed at the same time";
const K6: &str = "[K6] an eventId derived again after being retracted (e.g. TASK_BLOCKED whose open-order list returns to an earlier value): published once or twice depending on flush/restart boundaries";
const K7: &str = "[K7] one eventId published with different contents (e.g. TASK_READY of a failure task whose causeEventId moves when a second task naming it fails)";
const K8: &str = "[K8] a derived WORKFLOW_COMPLETED/FAILED published although an earlier upstream terminal event had already ended the workflow (compared with the latest upstream terminal event instead of the first)";
const K5: &str = "[K5] extra TASK_READY while the task stayed ready (an order of a blocking type appeared already closed)";

/// What a comparison needs besides the two results.
struct Cx<'a> {
    name: String,
    exp: &'a Expected,
    h: &'a history::History,
    /// eventTime → pipeline time, for feeds that batch several instants together.
    batch: Option<BTreeMap<Millis, Millis>>,
}

impl Cx<'_> {
    fn same_batch(&self, a: Millis, b: Millis) -> bool {
        self.batch
            .as_ref()
            .is_some_and(|m| m.get(&a).is_some() && m.get(&a) == m.get(&b))
    }
    /// Whether W's derivation at `at` shares its pipeline time with an upstream terminal event.
    fn upstream_terminal_with(&self, wid: &str, at: Option<&Millis>) -> bool {
        let (Some(at), Some(ts)) = (at, self.exp.upstream_terminals.get(wid)) else {
            return false;
        };
        ts.iter().any(|t| self.same_batch(*t, *at))
    }
    /// Whether the failure of `tid`'s attempt `next - 1` and its attempt `next` share a pipeline time.
    fn retry_in_same_batch(&self, tid: &str, next: u32) -> bool {
        let evs: Vec<&hmis_dataflows::events::TaskEvent> = self
            .h
            .records
            .iter()
            .filter_map(|r| match &r.event {
                Event::Task(t) if t.task_instance_id == tid => Some(t),
                _ => None,
            })
            .collect();
        let failed = evs.iter().filter(|e| {
            e.attempt == next - 1 && e.status == hmis_dataflows::events::TaskStatus::Failed
        });
        let later = evs
            .iter()
            .filter(|e| e.attempt >= next)
            .map(|e| e.event_time)
            .min();
        failed
            .into_iter()
            .any(|f| later.is_some_and(|l| self.same_batch(f.event_time, l)))
    }
    /// Whether an order of W has two events at one eventTime.
    fn order_tie(&self, wid: &str) -> bool {
        let mut ids: BTreeMap<(Str, Millis), BTreeSet<Str>> = BTreeMap::new();
        for r in &self.h.records {
            if let Event::Order(o) = &r.event {
                if o.workflow_instance_id.as_deref() == Some(wid) {
                    ids.entry((o.order_id.clone(), o.event_time))
                        .or_default()
                        .insert(o.event_id.clone());
                }
            }
        }
        ids.values().any(|s| s.len() > 1)
    }
    fn several_upstream_terminals(&self, wid: &str) -> bool {
        self.exp
            .upstream_terminals
            .get(wid)
            .is_some_and(|t| t.len() > 1)
    }
    fn note(&self, found: &mut Found, kind: &'static str, what: String) {
        note(found, kind, format!("{}: {what}", self.name));
    }
}

/// Final rows: readiness, workflow status and progress, task status and attempt.
fn check_rows(found: &mut Found, cx: &Cx, ob: &Observed) {
    let exp = cx.exp;
    if let Some(d) = diff_sets(&exp.ready, &ob.ready) {
        cx.note(found, "final readiness rows", d);
    }
    for (wid, w) in &exp.workflows {
        let Some((status, progress, escalated)) = ob.workflows.get(wid) else {
            cx.note(found, "final workflow rows", format!("{wid}: missing"));
            continue;
        };
        if (w.status, w.progress) != (status.as_str(), *progress) {
            let kind = if w.status == "COMPLETED"
                && status == "FAILED"
                && exp.failure_after_completion.contains(wid)
            {
                K1
            } else {
                "final workflow status/progress"
            };
            cx.note(
                found,
                kind,
                format!(
                    "{wid}: want {:?}, got {:?}",
                    (w.status, w.progress),
                    (status, progress)
                ),
            );
        }
        if w.escalated != *escalated {
            let kind = if w.escalated
                && exp.failed.contains_key(wid)
                && exp.upstream_terminals.contains_key(wid)
            {
                K3
            } else if !w.escalated && exp.failure_after_completion.contains(wid) {
                K1
            } else if !w.escalated && cx.several_upstream_terminals(wid) {
                K8
            } else {
                "final workflow is_escalated"
            };
            cx.note(
                found,
                kind,
                format!("{wid}: want is_escalated {}, got {escalated}", w.escalated),
            );
        }
    }
    for wid in ob
        .workflows
        .keys()
        .filter(|w| !exp.workflows.contains_key(*w))
    {
        cx.note(found, "final workflow rows", format!("{wid}: unexpected"));
    }
    if let Some(d) = diff_maps(&exp.tasks, &ob.tasks) {
        cx.note(found, "final task status/attempt", d);
    }
}

/// Derived facts that do not depend on how the clock advances.
fn check_facts(found: &mut Found, cx: &Cx, ob: &Observed) {
    let exp = cx.exp;
    for wid in exp.completed.difference(&ob.completed) {
        let kind = if cx.upstream_terminal_with(wid, exp.completed_at.get(wid)) {
            K2
        } else if exp.failure_after_completion.contains(wid) {
            K1
        } else {
            "WORKFLOW_COMPLETED missing"
        };
        cx.note(found, kind, format!("{wid}: no WORKFLOW_COMPLETED"));
    }
    for wid in ob.completed.difference(&exp.completed) {
        let kind = if cx.several_upstream_terminals(wid) {
            K8
        } else {
            "WORKFLOW_COMPLETED unexpected"
        };
        cx.note(found, kind, wid.clone());
    }
    for (what, got) in [
        ("WORKFLOW_FAILED", &ob.failed),
        ("WORKFLOW_ESCALATED(TASK_FAILED)", &ob.escalated_failures),
    ] {
        for (wid, def) in &exp.failed {
            match got.get(wid) {
                Some(g) if g.len() == 1 && g.contains(def) => {}
                None if cx.upstream_terminal_with(wid, exp.failed_at.get(wid)) => {
                    cx.note(found, K2, format!("{wid}: no {what}"))
                }
                g => cx.note(
                    found,
                    "WORKFLOW_FAILED / ESCALATED(TASK_FAILED) wrong",
                    format!("{wid}: {what} want {def}, got {g:?}"),
                ),
            }
        }
        for (wid, g) in got.iter().filter(|(w, _)| !exp.failed.contains_key(*w)) {
            let kind = if exp.failure_after_completion.contains(wid) {
                K1
            } else if cx.several_upstream_terminals(wid) {
                K8
            } else {
                "WORKFLOW_FAILED / ESCALATED(TASK_FAILED) unexpected"
            };
            cx.note(found, kind, format!("{wid}: {what} {g:?}"));
        }
    }
    for (tid, next) in exp.retries.difference(&ob.retries) {
        let kind = if cx.retry_in_same_batch(tid, *next) {
            K4
        } else {
            "TASK_RETRY_SCHEDULED missing"
        };
        cx.note(found, kind, format!("{tid} attempt {next}"));
    }
    for r in ob.retries.difference(&exp.retries) {
        cx.note(found, "TASK_RETRY_SCHEDULED unexpected", format!("{r:?}"));
    }
}

/// Per-event clock: every transient fact the contract names must show up exactly.
fn check_transients_exact(found: &mut Found, cx: &Cx, ob: &Observed) {
    let exp = cx.exp;
    if let Some(d) = diff_sets(&exp.progress, &ob.progress) {
        cx.note(found, "WORKFLOW_PROGRESS values (per event)", d);
    }
    for (pair, want) in &exp.ready_episodes {
        let got = ob.ready_ids.get(pair).map_or(0, |s| s.len());
        if got != *want {
            let kind = if got > *want && cx.order_tie(&pair.0) {
                K5
            } else {
                "TASK_READY once per readiness episode (per event)"
            };
            cx.note(
                found,
                kind,
                format!("{pair:?}: {want} episode(s), {got} TASK_READY"),
            );
        }
    }
    for (pair, ids) in ob
        .ready_ids
        .iter()
        .filter(|(p, _)| !exp.ready_episodes.contains_key(*p))
    {
        cx.note(
            found,
            "TASK_READY for a pair never ready",
            format!("{pair:?}: {} TASK_READY", ids.len()),
        );
    }
    check_blocked(found, cx, ob);
}

fn check_blocked(found: &mut Found, cx: &Cx, ob: &Observed) {
    let missing: Vec<_> = cx.exp.blocked_required.difference(&ob.blocked).collect();
    if !missing.is_empty() {
        cx.note(found, "TASK_BLOCKED missing", format!("{missing:?}"));
    }
    let invented: Vec<_> = ob.blocked.difference(&cx.exp.blocked_possible).collect();
    if !invented.is_empty() {
        cx.note(found, "TASK_BLOCKED never blocked", format!("{invented:?}"));
    }
}

/// Coarse clock: transients may be skipped, not invented.
fn check_transients_subset(found: &mut Found, cx: &Cx, ob: &Observed) {
    let exp = cx.exp;
    let extra: Vec<_> = ob.progress.difference(&exp.progress).collect();
    let finals: BTreeSet<(String, i32)> = exp
        .workflows
        .iter()
        .filter(|(w, _)| exp.progress.iter().any(|(x, _)| x == *w))
        .map(|(w, r)| (w.clone(), r.progress))
        .collect();
    let missing_final: Vec<_> = finals.difference(&ob.progress).collect();
    if !extra.is_empty() || !missing_final.is_empty() {
        cx.note(
            found,
            "WORKFLOW_PROGRESS values (batched)",
            format!("invented {extra:?}, final value missing {missing_final:?}"),
        );
    }
    let ever = exp.ever_ready();
    let got: BTreeSet<_> = ob.ready_ids.keys().cloned().collect();
    let invented: Vec<_> = got.difference(&ever).collect();
    let missing: Vec<_> = exp.ready.difference(&got).collect();
    if !invented.is_empty() || !missing.is_empty() {
        cx.note(
            found,
            "TASK_READY pairs (batched)",
            format!("never ready {invented:?}, ready at the end without TASK_READY {missing:?}"),
        );
    }
    let invented: Vec<_> = ob.blocked.difference(&exp.blocked_possible).collect();
    if !invented.is_empty() {
        cx.note(found, "TASK_BLOCKED never blocked", format!("{invented:?}"));
    }
}

type Feed = Vec<(Millis, Event)>;

/// Every event at its own eventTime; definitions (no eventTime) first, at T0.
fn per_event_feed(h: &history::History) -> Feed {
    let mut feed: Feed = h
        .records
        .iter()
        .map(|r| (r.time.unwrap_or(history::T0), r.event.clone()))
        .collect();
    feed.sort_by_key(|(t, e)| (*t, pos_of(e)));
    feed
}

fn topic_of(e: &Event) -> &'static str {
    use hmis_dataflows::events::InputTopic;
    match e {
        Event::Definition(_) => InputTopic::Definitions.default_name(),
        Event::Task(_) => InputTopic::Tasks.default_name(),
        Event::Workflow(_) => InputTopic::Workflows.default_name(),
        Event::Order(_) => InputTopic::Orders.default_name(),
        Event::System(_) => InputTopic::System.default_name(),
    }
}

fn pos_of(e: &Event) -> (i32, i64) {
    let p = match e {
        Event::Definition(d) => d.pos,
        Event::Task(x) => x.pos,
        Event::Workflow(x) => x.pos,
        Event::Order(x) => x.pos,
        Event::System(x) => x.pos,
    };
    (p.partition, p.offset)
}

/// Indices `i` where `feed[i - 1]` and `feed[i]` have different times (where a cut keeps
/// every instant whole).
fn boundaries(feed: &Feed) -> Vec<usize> {
    (1..feed.len())
        .filter(|&i| feed[i - 1].0 < feed[i].0)
        .collect()
}

/// The per-event feed cut at a few instants; each batch at its last eventTime.
fn batched_feed(h: &history::History, rng: &mut SmallRng) -> Feed {
    let feed = per_event_feed(h);
    let b = boundaries(&feed);
    let k = rng.random_range(1..=5usize).min(b.len());
    let mut cuts: Vec<usize> = b.choose_multiple(rng, k).copied().collect();
    cuts.push(feed.len());
    cuts.sort();
    let mut out = Vec::with_capacity(feed.len());
    let mut from = 0;
    for c in cuts {
        let t = feed[c - 1].0;
        out.extend(feed[from..c].iter().map(|(_, e)| (t, e.clone())));
        from = c;
    }
    out
}

/// Partitions interleaved at random (each in offset order), cut into a few batches.
fn interleaved_feed(h: &history::History, rng: &mut SmallRng) -> Feed {
    let mut queues: Vec<std::collections::VecDeque<usize>> = h
        .partitions
        .values()
        .map(|v| v.iter().copied().collect())
        .collect();
    let mut arrival = Vec::with_capacity(h.records.len());
    while queues.iter().any(|q| !q.is_empty()) {
        let live: Vec<usize> = (0..queues.len())
            .filter(|&i| !queues[i].is_empty())
            .collect();
        let q = *live.choose(rng).unwrap();
        arrival.push(queues[q].pop_front().unwrap());
    }
    let k = rng.random_range(1..=6usize);
    let mut cuts: Vec<usize> = (0..k).map(|_| rng.random_range(0..arrival.len())).collect();
    cuts.sort();
    arrival
        .iter()
        .enumerate()
        .map(|(i, &r)| {
            (
                history::T0 + cuts.iter().filter(|&&c| c < i).count() as Millis,
                h.records[r].event.clone(),
            )
        })
        .collect()
}

/// Where a run over `feed` ends: past every record's unknown-reference grace, so that every
/// record of a workflow that never became known is dead-lettered whatever the feed's stamps.
fn end_of(feed: &Feed) -> Millis {
    let grace = hmis_dataflows::RulesConfig::default()
        .lifecycle
        .unknown_reference_grace_ms;
    feed.iter()
        .map(|(t, e)| {
            (*t).max(e.event_time().unwrap_or(0).saturating_add(grace))
                + hmis_dataflows::lifecycle::SIGNAL_DELAY_MS
                + 1
        })
        .max()
        .unwrap_or(history::T0 + 1)
}

fn go(workers: usize, feed: &Feed) -> Outcome {
    run(Run::new(workers, feed.clone(), end_of(feed)))
}

/// The pipeline time a record was produced at: a derived event's `eventTime`, an alert's
/// `raisedAt`, a dead letter's `rejectedAt`.
const STAMPS: [&str; 3] = ["eventTime", "raisedAt", "rejectedAt"];

fn record_time(r: &OutRecord) -> Millis {
    let v: Value = serde_json::from_str(&r.payload).unwrap();
    let stamp = STAMPS
        .iter()
        .find_map(|k| v[*k].as_str())
        .unwrap_or_else(|| panic!("no time stamp in {}", r.payload));
    parse_time(stamp).unwrap()
}

/// A published payload without the pipeline time it was produced at.
fn timeless(payload: &str) -> String {
    let mut v: Value = serde_json::from_str(payload).unwrap();
    for k in STAMPS {
        v.as_object_mut().unwrap().remove(k);
    }
    v.to_string()
}

/// Ids a run published in more than one flush: with the real outbox (rows deleted once
/// published) these reach the topic more than once.
fn check_republished(found: &mut Found, ctx: &str, o: &Outcome) {
    let mut batches_of: BTreeMap<&str, usize> = BTreeMap::new();
    for b in &o.batches {
        for id in b
            .records
            .iter()
            .map(|r| r.event_id.as_str())
            .collect::<BTreeSet<_>>()
        {
            *batches_of.entry(id).or_default() += 1;
        }
    }
    let again: Vec<String> = batches_of
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| {
            o.records
                .iter()
                .find(|r| r.event_id == *id)
                .map(|r| r.event_type.clone())
                .unwrap_or_default()
        })
        .collect();
    if !again.is_empty() {
        note(
            found,
            K6,
            format!("{ctx}: published in several flushes: {again:?}"),
        );
    }
    let mut contents: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for r in o.batches.iter().flat_map(|b| b.records.iter()) {
        contents
            .entry(r.event_id.as_str())
            .or_default()
            .insert(timeless(&r.payload));
    }
    for (id, c) in contents.iter().filter(|(_, c)| c.len() > 1) {
        note(found, K7, format!("{ctx}: {id}: {c:?}"));
    }
}

/// Splits `feed` at a random instant F, runs the first part, then restarts with it replayed
/// below F and runs to `end`. Rows and records must be those of the uninterrupted run
/// `whole`. Returns what the two runs left together (the first's batches, then the second's).
fn check_restart(
    found: &mut Found,
    ctx: &str,
    workers: usize,
    feed: &Feed,
    end: Millis,
    whole: &Outcome,
    rng: &mut SmallRng,
) -> Option<(String, Outcome, Outcome)> {
    let b = boundaries(feed);
    let &cut = b.choose(rng)?;
    let part1: Feed = feed[..cut].to_vec();
    let first = run(Run::new(
        workers,
        part1.clone(),
        part1.last().unwrap().0 + 1,
    ));
    let Some(f) = first.batches.last().map(|b| b.frontier) else {
        note(
            found,
            "restart",
            format!("{ctx}: first run flushed nothing"),
        );
        return None;
    };
    // As the runtime: records dead-lettered by the first run are not replayed (decided for
    // good), and the replay goes a chunk per time (0: all at one time).
    let dead: BTreeSet<(String, i32, i64)> = first
        .batches
        .iter()
        .flat_map(|b| &b.dead_letters)
        .filter(|d| {
            matches!(
                d.reason,
                hmis_dataflows::output::RejectReason::UnknownWorkflow
                    | hmis_dataflows::output::RejectReason::UnknownTemplate
            )
        })
        .map(|d| (d.topic.clone(), d.partition, d.offset))
        .collect();
    let replay_chunk = rng.random_range(0..=8usize);
    let second = run(Run {
        workers,
        feed: feed[cut..].to_vec(),
        end,
        replay: part1
            .into_iter()
            .map(|(_, e)| e)
            .filter(|e| {
                let (p, o) = pos_of(e);
                !dead.contains(&(topic_of(e).to_string(), p, o))
            })
            .collect(),
        restore_time: f - 1,
        suppress_before: f,
        config: Default::default(),
        settle_each_time: false,
        replay_chunk,
    });
    let ctx = &format!("{ctx}, replay chunk {replay_chunk}");
    let ctx = format!("{ctx}, restart at F={f}");
    let mut combined = first.clone();
    for b in &second.batches {
        combined.apply(b.clone());
    }
    if combined.rows != whole.rows {
        let want: BTreeSet<_> = whole.rows.values().collect();
        let got: BTreeSet<_> = combined.rows.values().collect();
        let missing: Vec<_> = want.difference(&got).take(3).collect();
        let extra: Vec<_> = got.difference(&want).take(3).collect();
        note(
            found,
            "restart: rows",
            format!("{ctx}: missing {missing:?}, unexpected {extra:?}"),
        );
    }
    // The first run publishes below F, the second (its replay suppressed) at or after F.
    let misplaced: Vec<_> = first
        .records
        .iter()
        .filter(|r| record_time(r) >= f)
        .chain(second.records.iter().filter(|r| record_time(r) < f))
        .map(|r| r.event_type.clone())
        .collect();
    if !misplaced.is_empty() {
        note(
            found,
            "restart: a record published by the wrong half",
            format!("{ctx}: {misplaced:?}"),
        );
    }
    // Together nothing is lost and nothing invented; contents are the uninterrupted run's.
    let whole_all: BTreeSet<(String, String)> = whole
        .batches
        .iter()
        .flat_map(|b| b.records.iter())
        .map(|r| (r.event_id.clone(), r.payload.clone()))
        .collect();
    let whole_timeless: BTreeSet<(String, String)> = whole_all
        .iter()
        .map(|(id, p)| (id.clone(), timeless(p)))
        .collect();
    let ids = |o: &Outcome| {
        o.records
            .iter()
            .map(|r| r.event_id.clone())
            .collect::<BTreeSet<_>>()
    };
    let (ids1, ids2, idsw) = (ids(&first), ids(&second), ids(whole));
    let union: BTreeSet<String> = ids1.union(&ids2).cloned().collect();
    if let Some(d) = diff_sets(&idsw, &union) {
        let unexpected: Vec<&str> = first
            .records
            .iter()
            .chain(&second.records)
            .filter(|r| !idsw.contains(&r.event_id))
            .map(|r| r.payload.as_str())
            .take(2)
            .collect();
        note(
            found,
            "restart: published eventIds",
            format!("{ctx}: {d}; unexpected records {unexpected:?}"),
        );
    }
    for r in first.records.iter().chain(&second.records) {
        let exact = whole_all.contains(&(r.event_id.clone(), r.payload.clone()));
        if !exact && !whole_timeless.contains(&(r.event_id.clone(), timeless(&r.payload))) {
            let kind = if idsw.contains(&r.event_id) {
                K7
            } else {
                "restart: record content differs"
            };
            note(found, kind, format!("{ctx}: {}", r.payload));
        }
    }
    // Published by both halves: re-derived after F (K6), or the suppression failed. A dead
    // letter re-derived after F (an unknown reference decided again after the replay) is not:
    // the sink stores a dead letter once per input position and publishes only what it stored.
    let dead_ids: BTreeSet<&String> = first
        .records
        .iter()
        .filter(|r| r.topic == OutTopic::DeadLetter)
        .map(|r| &r.event_id)
        .collect();
    let twice: Vec<_> = ids1
        .intersection(&ids2)
        .filter(|id| !dead_ids.contains(id))
        .collect();
    if !twice.is_empty() {
        let types: Vec<&str> = second
            .records
            .iter()
            .filter(|r| twice.contains(&&r.event_id))
            .map(|r| r.event_type.as_str())
            .collect();
        note(
            found,
            K6,
            format!("{ctx}: published before and after the restart: {twice:?} {types:?}"),
        );
    }
    Some((ctx, first, combined))
}

/// The derived events that rows speak for, as published.
#[derive(Default)]
struct Published {
    /// wid → (escalationLevels, escalationReasons but UNANSWERED_ESCALATION, which names no cause).
    workflows: BTreeMap<String, (BTreeSet<i64>, BTreeSet<String>)>,
    /// (task, attempt) with a TASK_SLA_BREACHED.
    breached: BTreeSet<(String, i64)>,
    /// task → attempt → escalatedTo of its TASK_ESCALATED.
    escalated: BTreeMap<String, BTreeMap<i64, String>>,
    /// Orders with an ORDER_OVERDUE.
    overdue: BTreeSet<String>,
}

impl Published {
    fn of<'a>(records: impl Iterator<Item = &'a OutRecord>) -> Published {
        let mut p = Published::default();
        for r in records.filter(|r| r.topic == OutTopic::Derived) {
            let v: Value = serde_json::from_str(&r.payload).expect("derived payload is JSON");
            let attempt = v["attempt"].as_i64().unwrap_or(0);
            match r.event_type.as_str() {
                "WORKFLOW_ESCALATED" => {
                    let e = p.workflows.entry(s(&v, "workflowInstanceId")).or_default();
                    e.0.insert(v["escalationLevel"].as_i64().unwrap_or(-1));
                    let reason = s(&v, "escalationReason");
                    if reason != "UNANSWERED_ESCALATION" {
                        e.1.insert(reason);
                    }
                }
                "TASK_SLA_BREACHED" => {
                    p.breached.insert((s(&v, "taskInstanceId"), attempt));
                }
                "TASK_ESCALATED" => {
                    p.escalated
                        .entry(s(&v, "taskInstanceId"))
                        .or_default()
                        .insert(attempt, s(&v, "escalatedTo"));
                }
                "ORDER_OVERDUE" => {
                    p.overdue.insert(s(&v, "orderId"));
                }
                _ => {}
            }
        }
        p
    }

    /// `(is_escalated, escalation_level)` of workflow `wid`: the highest level published, an
    /// upstream escalation applied being level 1.
    fn workflow(&self, wid: &str, upstream: bool) -> (bool, i64) {
        let level = self
            .workflows
            .get(wid)
            .into_iter()
            .flat_map(|(l, _)| l.iter().copied())
            .chain(upstream.then_some(1))
            .max()
            .unwrap_or(0);
        (level > 0, level)
    }

    /// `(sla_breached, is_escalated, escalated_to)` of task `tid` at `attempt`.
    fn task(&self, tid: &str, attempt: i64) -> (bool, bool, Option<String>) {
        let esc = self.escalated.get(tid);
        (
            self.breached.contains(&(tid.to_string(), attempt)),
            esc.is_some(),
            esc.and_then(|m| m.last_key_value())
                .map(|(_, to)| to.clone()),
        )
    }
}

/// A timer's derived event: an SLA breach's, a re-escalation, ORDER_OVERDUE.
fn is_timer_event(r: &OutRecord) -> bool {
    match r.event_type.as_str() {
        "TASK_SLA_BREACHED" | "TASK_ESCALATED" | "ORDER_OVERDUE" => true,
        "WORKFLOW_ESCALATED" => {
            let v: Value = serde_json::from_str(&r.payload).unwrap();
            let reason = s(&v, "escalationReason");
            reason.starts_with("SLA_BREACH:") || reason == "UNANSWERED_ESCALATION"
        }
        _ => false,
    }
}

// Rows that miss a published event for a documented reason: reported, not failed.
const K9: &str = "[K9] after a restart, a row rewritten by the second run lost a timer fact published before the restart whose cause was gone at the resumed frontier (not seeded: decisions.md, \"Rows follow published events\")";
const K10: &str = "[K10] arrival order (interleaved): a WORKFLOW_ESCALATED(TASK_FAILED) published, then an earlier-dated event re-decided the history (no failure derived, as the model says): the row follows the re-decided history, the event stands";

/// The kinds of [`check_rows_follow_events`] that are reported but accepted.
const ACCEPTED: [&str; 2] = [K9, K10];

/// Takes the accepted kinds out of `found` and prints them.
fn report_accepted(found: &mut Found) {
    for kind in ACCEPTED {
        if let Some(rows) = found.remove(kind) {
            eprintln!(
                "{kind}: {} row(s), e.g. {:?}",
                rows.len(),
                rows.iter().take(3).collect::<Vec<_>>()
            );
        }
    }
}

/// Rows follow the published events (decisions.md, "Rows follow published events"): every
/// final row field that a derived event speaks for agrees with the events `o` published.
/// - `workflow_instances`: `is_escalated` iff a WORKFLOW_ESCALATED was published for it or an
///   upstream WORKFLOW_ESCALATED of it was applied (not dead-lettered); `escalation_level` =
///   the highest escalationLevel published, an upstream escalation being level 1 (0: none);
///   `escalation_reason` set iff escalated, to a reason published (other than
///   UNANSWERED_ESCALATION, which names no cause) or sent upstream;
/// - `task_instances`: `sla_breached` iff a TASK_SLA_BREACHED was published for the task and
///   the row's attempt; `is_escalated` iff a TASK_ESCALATED was published for the task, and
///   `escalated_to` = the escalatedTo of the one with the highest attempt;
/// - `orders`: `is_overdue` iff ORDER_OVERDUE was published for it.
///
/// `excused`: a kind ([`ACCEPTED`]) and events (ids) a row may miss for that reason: such a
/// row must show at least what the other events say, and nothing that was not published.
fn check_rows_follow_events(
    found: &mut Found,
    ctx: &str,
    o: &Outcome,
    h: &history::History,
    excused: Option<(&'static str, BTreeSet<String>)>,
) {
    use hmis_dataflows::events::WorkflowEventKind;
    let dead: BTreeSet<(&str, i32, i64)> = o
        .batches
        .iter()
        .flat_map(|b| &b.dead_letters)
        .map(|d| (d.topic.as_str(), d.partition, d.offset))
        .collect();
    // Upstream escalations applied: wid → reasons.
    let mut upstream: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for r in &h.records {
        if let Event::Workflow(e) = &r.event {
            let (p, off) = pos_of(&r.event);
            if e.kind == WorkflowEventKind::Escalated
                && !dead.contains(&(topic_of(&r.event), p, off))
            {
                upstream
                    .entry(e.workflow_instance_id.to_string())
                    .or_default()
                    .insert(
                        e.escalation_reason
                            .as_deref()
                            .unwrap_or_default()
                            .to_string(),
                    );
            }
        }
    }
    let all = Published::of(o.records.iter());
    // Without the excused events: what a row must show at least.
    let (excuse, has_excuse) = match &excused {
        Some((kind, _)) => (*kind, true),
        None => ("", false),
    };
    let after = Published::of(o.records.iter().filter(|r| {
        excused
            .as_ref()
            .is_none_or(|(_, ids)| !ids.contains(&r.event_id))
    }));
    let mut report = |kind: &'static str, what: String| note(found, kind, format!("{ctx}: {what}"));
    let none = (BTreeSet::new(), BTreeSet::new());
    for row in o.rows.values() {
        match row {
            Row::Workflow(w) => {
                let wid = w.workflow_instance_id.as_str();
                let (levels, reasons) = all.workflows.get(wid).unwrap_or(&none);
                let up = upstream.get(wid);
                let got = (w.is_escalated, w.escalation_level as i64);
                let want = all.workflow(wid, up.is_some());
                let least = after.workflow(wid, up.is_some());
                let reason_ok = match &w.escalation_reason {
                    Some(r) => {
                        w.is_escalated
                            && (reasons.contains(r.as_str())
                                || up.is_some_and(|u| u.contains(r.as_str())))
                    }
                    None => !w.is_escalated,
                };
                if got == want && reason_ok {
                    continue;
                }
                let excused_loss = has_excuse
                    && reason_ok
                    && got.0 == (got.1 > 0)
                    && (least.1..=want.1).contains(&got.1)
                    && (got.1 == least.1 || levels.contains(&got.1));
                report(
                    if excused_loss {
                        excuse
                    } else {
                        "rows follow events: workflow escalation"
                    },
                    format!(
                        "{wid} ({}): row (is_escalated {}, level {}, reason {:?}); published \
                         levels {levels:?}, reasons {reasons:?}, upstream {up:?}",
                        w.status, w.is_escalated, w.escalation_level, w.escalation_reason
                    ),
                );
            }
            Row::Task(t) => {
                let tid = t.task_instance_id.as_str();
                let got = (
                    t.sla_breached,
                    t.is_escalated,
                    t.escalated_to.as_deref().map(str::to_string),
                );
                let want = all.task(tid, t.attempt as i64);
                if got == want {
                    continue;
                }
                let least = after.task(tid, t.attempt as i64);
                // An excused escalation of a later attempt may be the one the row shows, or not.
                let to_ok = got.2 == want.2
                    || got.2 == least.2
                    || all.escalated.get(tid).is_some_and(|m| {
                        let floor = after.escalated.get(tid).and_then(|a| a.keys().max());
                        m.iter()
                            .any(|(a, to)| Some(a) > floor && got.2.as_ref() == Some(to))
                    });
                let excused_loss = has_excuse
                    && (got.0 == want.0 || got.0 == least.0)
                    && (got.1 == want.1 || got.1 == least.1)
                    && got.1 == got.2.is_some()
                    && to_ok;
                report(
                    if excused_loss {
                        excuse
                    } else {
                        "rows follow events: task breach/escalation"
                    },
                    format!(
                        "{tid} ({} attempt {}): row (sla_breached {}, is_escalated {}, \
                         escalated_to {:?}); published breach of this attempt {}, \
                         TASK_ESCALATED {:?}",
                        t.status,
                        t.attempt,
                        got.0,
                        got.1,
                        got.2,
                        want.0,
                        all.escalated.get(tid)
                    ),
                );
            }
            Row::Order(r) if r.is_overdue != all.overdue.contains(r.order_id.as_str()) => {
                let excused_loss =
                    has_excuse && r.is_overdue == after.overdue.contains(r.order_id.as_str());
                report(
                    if excused_loss {
                        excuse
                    } else {
                        "rows follow events: order is_overdue"
                    },
                    format!(
                        "{} ({}): row is_overdue {}, ORDER_OVERDUE published {}",
                        r.order_id,
                        r.order_status,
                        r.is_overdue,
                        all.overdue.contains(r.order_id.as_str())
                    ),
                );
            }
            _ => {}
        }
    }
}

/// `HMIS_REF_WF=w03` (with `HMIS_REF_SEED`): prints that workflow's input events in eventTime order.
fn dump_workflow(h: &history::History, wid: &str) {
    let mut rows: Vec<(Millis, (i32, i64), String)> = h
        .records
        .iter()
        .filter_map(|r| {
            let v = r.value.as_ref()?;
            (v["workflowInstanceId"].as_str()? == wid).then(|| {
                let t = r.time.unwrap();
                let what = format!(
                    "{} {} {} {} attempt={} status={} role={} id={}",
                    v["eventType"].as_str().unwrap_or(""),
                    v["taskInstanceId"]
                        .as_str()
                        .or(v["orderId"].as_str())
                        .unwrap_or(""),
                    v["taskDefId"]
                        .as_str()
                        .or(v["orderType"].as_str())
                        .unwrap_or(""),
                    v["templateId"]
                        .as_str()
                        .map(|t| format!("{t}:{}", v["templateVersion"]))
                        .unwrap_or_default(),
                    v["attempt"],
                    v["orderStatus"],
                    v["metadata"]["actorRole"],
                    v["eventId"].as_str().unwrap_or("")
                );
                (t, pos_of(&r.event), what)
            })
        })
        .collect();
    rows.sort();
    for (t, p, w) in rows {
        eprintln!("  +{:>7.1}s {p:?} {w}", (t - history::T0) as f64 / 1000.0);
    }
}

fn check_seed(seed: u64, found: &mut Found) {
    let h = history::generate(seed);
    let exp = model::expect(&h.events());
    if let Ok(wid) = std::env::var("HMIS_REF_WF") {
        dump_workflow(&h, &wid);
        eprintln!("reference: {:?}", exp.workflows.get(&wid));
        eprintln!(
            "ready episodes: {:?}",
            exp.ready_episodes
                .iter()
                .filter(|(k, _)| k.0 == wid)
                .collect::<Vec<_>>()
        );
        let workers = std::env::var("HMIS_REF_WORKERS")
            .ok()
            .and_then(|w| w.parse().ok())
            .unwrap_or(1);
        let o = go(workers, &per_event_feed(&h));
        for b in &o.batches {
            for r in b
                .records
                .iter()
                .filter(|r| r.key.as_deref() == Some(wid.as_str()))
            {
                eprintln!("  [batch < {}] {} {}", b.frontier, r.event_type, r.payload);
            }
        }
    }
    let mut rng = SmallRng::seed_from_u64(seed ^ 0x5eed);

    let per_event = per_event_feed(&h);
    for workers in [1, 3] {
        let o = go(workers, &per_event);
        let cx = Cx {
            name: format!("seed {seed}, per event, {workers} workers"),
            exp: &exp,
            h: &h,
            batch: None,
        };
        let ob = observe(&o);
        check_rows(found, &cx, &ob);
        check_facts(found, &cx, &ob);
        check_transients_exact(found, &cx, &ob);
        check_republished(found, &cx.name, &o);
        check_rows_follow_events(found, &cx.name, &o, &h, None);
        if workers == 1 + 2 * (seed as usize % 2) {
            let end = end_of(&per_event);
            if let Some((ctx, first, combined)) =
                check_restart(found, &cx.name, workers, &per_event, end, &o, &mut rng)
            {
                check_rows_follow_events(found, &ctx, &combined, &h, lost_in_restart(&first));
            }
        }
    }
    let batched = batched_feed(&h, &mut rng);
    let batch: BTreeMap<Millis, Millis> = batched
        .iter()
        .filter_map(|(bt, e)| Some((e.event_time()?, *bt)))
        .collect();
    for workers in [1, 3] {
        let o = go(workers, &batched);
        let cx = Cx {
            name: format!("seed {seed}, batched, {workers} workers"),
            exp: &exp,
            h: &h,
            batch: Some(batch.clone()),
        };
        let ob = observe(&o);
        check_rows(found, &cx, &ob);
        check_facts(found, &cx, &ob);
        check_transients_subset(found, &cx, &ob);
        check_republished(found, &cx.name, &o);
        check_rows_follow_events(found, &cx.name, &o, &h, None);
        if workers == 3 - 2 * (seed as usize % 2) {
            let end = end_of(&batched);
            if let Some((ctx, first, combined)) =
                check_restart(found, &cx.name, workers, &batched, end, &o, &mut rng)
            {
                check_rows_follow_events(found, &ctx, &combined, &h, lost_in_restart(&first));
            }
        }
    }
    let workers = if seed.is_multiple_of(2) { 3 } else { 1 };
    let o = go(workers, &interleaved_feed(&h, &mut rng));
    let cx = Cx {
        name: format!("seed {seed}, interleaved, {workers} workers"),
        exp: &exp,
        h: &h,
        batch: None,
    };
    check_rows(found, &cx, &observe(&o));
    // Arrival order: a failure escalation published and then re-decided away by an
    // earlier-dated event (the model, in eventTime order, derives no failure).
    let redecided: BTreeSet<String> = o
        .of_type("WORKFLOW_ESCALATED")
        .into_iter()
        .filter(|r| {
            let v: Value = serde_json::from_str(&r.payload).unwrap();
            s(&v, "escalationReason").starts_with("TASK_FAILED:")
                && !exp.failed.contains_key(&s(&v, "workflowInstanceId"))
        })
        .map(|r| r.event_id.clone())
        .collect();
    check_rows_follow_events(found, &cx.name, &o, &h, Some((K10, redecided)));
}

/// What a restart's combined outcome may miss ([`K9`]): the timer events published before it.
fn lost_in_restart(first: &Outcome) -> Option<(&'static str, BTreeSet<String>)> {
    let ids = first
        .records
        .iter()
        .filter(|r| is_timer_event(r))
        .map(|r| r.event_id.clone())
        .collect();
    Some((K9, ids))
}

fn report(found: &Found) -> String {
    let mut out = String::new();
    for (kind, examples) in found {
        out.push_str(&format!("\n== {kind}: {} run(s)\n", examples.len()));
        for e in examples.iter().take(3) {
            let e = if e.len() > 1200 {
                format!("{}…", &e[..1200])
            } else {
                e.clone()
            };
            out.push_str(&format!("   {e}\n"));
        }
    }
    out
}

#[test]
fn random_histories_match_the_reference() {
    let seeds: Vec<u64> = match std::env::var("HMIS_REF_SEED") {
        Ok(s) => vec![s.parse().expect("HMIS_REF_SEED")],
        Err(_) => {
            let n = std::env::var("HMIS_REF_SEEDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(60);
            (0..n).collect()
        }
    };
    let mut found = Found::new();
    for seed in &seeds {
        check_seed(*seed, &mut found);
    }
    report_accepted(&mut found);
    assert!(
        found.is_empty(),
        "the dataflow disagrees with the reference on {} seed(s):{}",
        seeds.len(),
        report(&found)
    );
}

/// The generator must exercise what the comparison is about; otherwise a passing comparison
/// would prove little.
#[test]
fn generator_covers_the_rules() {
    let mut totals: BTreeMap<&str, usize> = BTreeMap::new();
    for seed in 0..40 {
        let h = history::generate(seed);
        let exp = model::expect(&h.events());
        let mut add = |k: &'static str, n: usize| *totals.entry(k).or_default() += n;
        add("workflows", exp.workflows.len());
        add("ready at the end", exp.ready.len());
        add("derived completions", exp.completed.len());
        add("derived failures", exp.failed.len());
        add("retries", exp.retries.len());
        add("blocked after ready", exp.blocked_required.len());
        add(
            "readiness episodes > 1",
            exp.ready_episodes.values().filter(|n| **n > 1).count(),
        );
        add(
            "upstream COMPLETED",
            exp.workflows
                .values()
                .filter(|w| w.status == "COMPLETED")
                .count()
                .saturating_sub(exp.completed.len()),
        );
        add(
            "failed status",
            exp.workflows
                .values()
                .filter(|w| w.status == "FAILED")
                .count(),
        );
        add(
            "progress strictly between",
            exp.workflows
                .values()
                .filter(|w| w.progress > 0 && w.progress < 100)
                .count(),
        );
        add("duplicated eventIds", {
            let mut ids: BTreeMap<String, usize> = BTreeMap::new();
            for r in &h.records {
                if let Some(id) = r.value.as_ref().and_then(|v| v["eventId"].as_str()) {
                    *ids.entry(id.to_string()).or_default() += 1;
                }
            }
            ids.values().filter(|n| **n > 1).count()
        });
        let ready_failure_task = exp
            .ready
            .iter()
            .filter(|(_, d)| ["review", "fx", "e", "f0", "f1"].contains(&d.as_str()))
            .count();
        add("failure task ready", ready_failure_task);
    }
    for (k, n) in &totals {
        assert!(*n > 0, "the generator never produced: {k} ({totals:?})");
    }
}

/// How far a timed run goes past its last record: every timer of the history fires (the last
/// re-escalation 2 h after its cause, a stale task 4 h after its last event), and closed
/// workflows and orders retire (1 h after closing) with their timer facts.
const TIMED_TAIL: Millis = 5 * 3_600_000;

/// What the timed histories exercised, summed over the seeds.
#[derive(Debug, Default)]
struct TimedCoverage(BTreeMap<&'static str, usize>);

impl TimedCoverage {
    fn add(&mut self, what: &'static str, n: usize) {
        *self.0.entry(what).or_default() += n;
    }
    /// Counts what `o` (a run of `h`) published and left in its rows.
    fn count(&mut self, o: &Outcome, h: &history::History, batched: bool) {
        let payloads = |ty: &str| -> Vec<Value> {
            o.of_type(ty)
                .iter()
                .map(|r| serde_json::from_str(&r.payload).unwrap())
                .collect()
        };
        self.add("TASK_SLA_BREACHED", payloads("TASK_SLA_BREACHED").len());
        self.add("TASK_STALE", payloads("TASK_STALE").len());
        self.add("ORDER_OVERDUE", payloads("ORDER_OVERDUE").len());
        let escalations = payloads("WORKFLOW_ESCALATED");
        let level = |v: &Value| v["escalationLevel"].as_i64().unwrap_or(0);
        self.add(
            "WORKFLOW_ESCALATED level 2",
            escalations.iter().filter(|v| level(v) == 2).count(),
        );
        self.add(
            "WORKFLOW_ESCALATED level 3",
            escalations.iter().filter(|v| level(v) == 3).count(),
        );
        // Level 2 or 3 published, then the workflow closed: its re-escalation candidates are
        // gone, its row must keep the level.
        let closed: BTreeSet<&str> = o
            .rows
            .values()
            .filter_map(|r| match r {
                Row::Workflow(w) if w.status != "ACTIVE" => Some(w.workflow_instance_id.as_str()),
                _ => None,
            })
            .collect();
        let re_escalated_then_closed: BTreeSet<String> = escalations
            .iter()
            .filter(|v| level(v) >= 2 && closed.contains(v["workflowInstanceId"].as_str().unwrap()))
            .map(|v| s(v, "workflowInstanceId"))
            .collect();
        self.add(
            "workflow re-escalated (level >= 2), then closed",
            re_escalated_then_closed.len(),
        );
        // Batched (a coarse clock, as wall mode reading a backlog): a breach the clock found
        // while the attempt's events, read later, show it ended by dueAt.
        if batched {
            let on_time = payloads("TASK_SLA_BREACHED")
                .iter()
                .filter(|v| {
                    let due = parse_time(v["dueAt"].as_str().unwrap()).unwrap();
                    let (tid, attempt) = (s(v, "taskInstanceId"), v["attempt"].as_u64().unwrap());
                    let evs: Vec<_> = h
                        .records
                        .iter()
                        .filter_map(|r| match &r.event {
                            Event::Task(t)
                                if t.task_instance_id == tid && u64::from(t.attempt) == attempt =>
                            {
                                Some(t)
                            }
                            _ => None,
                        })
                        .collect();
                    evs.iter().all(|t| t.event_time <= due)
                        && evs.iter().any(|t| {
                            matches!(
                                t.status,
                                hmis_dataflows::events::TaskStatus::Completed
                                    | hmis_dataflows::events::TaskStatus::Failed
                            )
                        })
                })
                .count();
            self.add(
                "breach found by the clock, attempt on time by its events",
                on_time,
            );
        }
    }
}

/// Histories with timers: final rows must agree with the events published (the model does not
/// model timers, so this is the only check), per event and batched, with 1 and 3 workers, and
/// across a restart. Fails when a row field fed by a timer follows the timer's live cause
/// instead of what was published (issue 11: a workflow re-escalated to level 2, then completed,
/// said level 1).
#[test]
fn timed_histories_rows_agree_with_events() {
    let seeds: Vec<u64> = match std::env::var("HMIS_REF_SEED") {
        Ok(s) => vec![s.parse().expect("HMIS_REF_SEED")],
        Err(_) => {
            let n = std::env::var("HMIS_REF_TIMED_SEEDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(20);
            (0..n).collect()
        }
    };
    let mut found = Found::new();
    // The restarts' comparisons with their uninterrupted run, kept apart: not asserted here.
    let mut restart_diffs = Found::new();
    let mut coverage = TimedCoverage::default();
    for &seed in &seeds {
        let h = history::generate_timed(seed);
        let mut rng = SmallRng::seed_from_u64(seed ^ 0x7173);
        let per_event = per_event_feed(&h);
        let batched = batched_feed(&h, &mut rng);
        for (mode, feed) in [("per event", &per_event), ("batched", &batched)] {
            let end = end_of(feed) + TIMED_TAIL;
            for workers in [1, 3] {
                let o = run(Run::new(workers, feed.clone(), end));
                let ctx = format!("timed seed {seed}, {mode}, {workers} workers");
                check_rows_follow_events(&mut found, &ctx, &o, &h, None);
                if workers == 1 {
                    coverage.count(&o, &h, mode == "batched");
                }
                // One restart per seed and mode, with 1 or 3 workers by seed.
                if workers == 1 + 2 * (seed as usize % 2) {
                    if let Some((ctx, first, combined)) =
                        check_restart(&mut restart_diffs, &ctx, workers, feed, end, &o, &mut rng)
                    {
                        check_rows_follow_events(
                            &mut found,
                            &ctx,
                            &combined,
                            &h,
                            lost_in_restart(&first),
                        );
                    }
                }
            }
        }
    }
    if std::env::var("HMIS_REF_TIMED_RESTART").is_ok() {
        eprintln!("restarts vs uninterrupted runs:{}", report(&restart_diffs));
    }
    // The restart's known gap is reported, not failed: the design accepts it (decisions.md).
    report_accepted(&mut found);
    assert!(
        found.is_empty(),
        "rows disagree with the published events on {} timed seed(s):{}",
        seeds.len(),
        report(&found)
    );
    if seeds.len() > 1 {
        for (k, n) in &coverage.0 {
            assert!(
                *n > 0,
                "the timed histories never produced: {k} ({coverage:?})"
            );
        }
        assert_eq!(coverage.0.len(), 7, "{coverage:?}");
    }
    eprintln!("timed coverage: {coverage:?}");
}

// ---------------------------------------------------------------------------------------
// The reference itself, on hand-written cases (so that a bug in the model cannot hide a bug in
// the dataflow by agreeing with it).

fn ev(events: Vec<Event>) -> Expected {
    model::expect(&events)
}

#[test]
fn model_on_the_contract_example() {
    let base = vec![
        def(sepsis(3)),
        wf_started("w1", "sepsis-bundle", 3, T0),
        task("TASK_COMPLETED", "t1", "w1", "triage", 1, T0 + MIN),
        order(
            "ORDER_CREATED",
            "PROPOSED",
            "o1",
            "w1",
            "LAB_TEST",
            T0 + 2 * MIN,
            json!({}),
        ),
        task(
            "TASK_COMPLETED",
            "t2",
            "w1",
            "blood-cultures",
            1,
            T0 + 3 * MIN,
        ),
    ];
    let e = ev(base.clone());
    assert!(e.ready.is_empty());
    assert_eq!(e.workflows["w1"].progress, 66);
    assert_eq!(
        e.progress.iter().map(|p| p.1).collect::<Vec<_>>(),
        [0, 33, 66]
    );
    assert!(e.blocked_required.is_empty(), "antibiotics was never ready");
    assert_eq!(
        e.blocked_possible,
        BTreeSet::from([("w1".to_string(), "antibiotics".to_string())])
    );
    // An unauthorized authorization is ignored: still open.
    let mut evs = base.clone();
    evs.push(order(
        "ORDER_AUTHORIZED",
        "AUTHORIZED",
        "o1",
        "w1",
        "LAB_TEST",
        T0 + 4 * MIN,
        json!({"actorRole": "SURGEON"}),
    ));
    evs.push(order(
        "ORDER_CANCELLED",
        "CANCELLED",
        "o1",
        "w1",
        "LAB_TEST",
        T0 + 5 * MIN,
        json!({}),
    ));
    let e = ev(evs);
    assert_eq!(
        e.ready,
        BTreeSet::from([("w1".to_string(), "antibiotics".to_string())])
    );
    // Skipping a step is ignored: ACTIVATED from PROPOSED stays PROPOSED (open).
    let mut evs = base;
    evs.push(order(
        "ORDER_ACTIVATED",
        "ACTIVATED",
        "o1",
        "w1",
        "LAB_TEST",
        T0 + 4 * MIN,
        json!({}),
    ));
    evs.push(order(
        "ORDER_RESULTED",
        "RESULTED",
        "o1",
        "w1",
        "LAB_TEST",
        T0 + 5 * MIN,
        json!({}),
    ));
    assert!(ev(evs).ready.is_empty());
}

#[test]
fn model_retries_failure_task_and_terminal_order() {
    let evs = vec![
        def(sepsis(3)),
        wf_started("w1", "sepsis-bundle", 3, T0),
        task("TASK_COMPLETED", "t1", "w1", "triage", 1, T0 + MIN),
        task("TASK_FAILED", "t2", "w1", "blood-cultures", 1, T0 + 2 * MIN),
        task(
            "TASK_CREATED",
            "t2",
            "w1",
            "blood-cultures",
            2,
            T0 + 3 * MIN,
        ),
        task("TASK_FAILED", "t2", "w1", "blood-cultures", 2, T0 + 4 * MIN),
        task(
            "TASK_CREATED",
            "t2",
            "w1",
            "blood-cultures",
            3,
            T0 + 5 * MIN,
        ),
        task("TASK_FAILED", "t2", "w1", "blood-cultures", 3, T0 + 6 * MIN),
    ];
    let e = ev(evs);
    assert_eq!(
        e.retries,
        BTreeSet::from([("t2".to_string(), 2), ("t2".to_string(), 3)])
    );
    assert_eq!(
        e.ready,
        BTreeSet::from([("w1".to_string(), "manual-review".to_string())])
    );
    assert_eq!(e.workflows["w1"].status, "ACTIVE");
    assert_eq!(e.tasks["t2"], ("FAILED".to_string(), 3));
    // blood-cultures: ready after triage, again for each retry.
    assert_eq!(
        e.ready_episodes[&("w1".to_string(), "blood-cultures".to_string())],
        3
    );

    // Completed first, then a failure: stays COMPLETED (§8).
    let evs = vec![
        def(with_side_task()),
        wf_started("w1", "sepsis-bundle", 3, T0),
        task("TASK_COMPLETED", "t1", "w1", "triage", 1, T0 + MIN),
        task(
            "TASK_COMPLETED",
            "t2",
            "w1",
            "blood-cultures",
            1,
            T0 + 2 * MIN,
        ),
        task("TASK_COMPLETED", "t3", "w1", "antibiotics", 1, T0 + 3 * MIN),
        task("TASK_FAILED", "t4", "w1", "side", 1, T0 + 4 * MIN),
    ];
    let e = ev(evs.clone());
    assert_eq!(
        (e.workflows["w1"].status, e.completed.len(), e.failed.len()),
        ("COMPLETED", 1, 0)
    );
    // The same failure before the completion: FAILED, and it stays so.
    let mut early = evs;
    early[5] = task("TASK_FAILED", "t4", "w1", "side", 1, T0 + MIN / 2);
    let e = ev(early);
    assert_eq!((e.workflows["w1"].status, e.completed.len()), ("FAILED", 0));
    assert_eq!(e.failed["w1"], "side");
    assert!(e.workflows["w1"].escalated);
}

// ---------------------------------------------------------------------------------------
// Minimal reproductions of the discrepancy classes K1–K8 the comparison found (see the report
// of `random_histories_match_the_reference`): K1 completed_workflow_stays_completed…,
// K2 derived_*_is_published_even_if_upstream_*_follows…, K3 escalation_flag_stays_set…,
// K4 retry_is_scheduled_even_when…, K5 an_order_created_and_closed_at_once…,
// K6 a_re_derived_event_id_is_not_published_again…, K7 a_failure_task_named_twice…,
// K8 nothing_is_derived_after_an_upstream_terminal_event…

fn run_per_event(workers: usize, events: Vec<Event>) -> Outcome {
    let mut feed: Feed = events
        .into_iter()
        .map(|e| (e.event_time().unwrap_or(T0), e))
        .collect();
    feed.sort_by_key(|(t, _)| *t);
    go(workers, &feed)
}

fn run_one_batch(workers: usize, events: Vec<Event>) -> Outcome {
    let t = events
        .iter()
        .filter_map(|e| e.event_time())
        .max()
        .unwrap_or(T0);
    go(workers, &events.into_iter().map(|e| (t, e)).collect())
}

fn workflow_row(o: &Outcome, wid: &str) -> hmis_dataflows::output::WorkflowRow {
    o.rows
        .values()
        .find_map(|r| match r {
            Row::Workflow(w) if w.workflow_instance_id == wid => Some(w.clone()),
            _ => None,
        })
        .expect("workflow row")
}

/// A template whose required chain can complete while an optional side task is still open.
fn with_side_task() -> Value {
    let mut v = sepsis(3);
    v["tasks"]
        .as_array_mut()
        .unwrap()
        .push(json!({"taskDefId": "side", "name": "Side", "required": false}));
    v
}

fn completed_then_side_failure() -> Vec<Event> {
    vec![
        def(with_side_task()),
        wf_started("w1", "sepsis-bundle", 3, T0),
        task("TASK_COMPLETED", "t1", "w1", "triage", 1, T0 + MIN),
        task(
            "TASK_COMPLETED",
            "t2",
            "w1",
            "blood-cultures",
            1,
            T0 + 2 * MIN,
        ),
        task("TASK_COMPLETED", "t3", "w1", "antibiotics", 1, T0 + 3 * MIN),
        task("TASK_FAILED", "t4", "w1", "side", 1, T0 + 4 * MIN),
    ]
}

/// §8 "A workflow that is COMPLETED or FAILED stays so, unless the upstream system sends
/// another terminal event"; §4 WORKFLOW_FAILED only "when a task's state becomes FAILED" in a
/// workflow that can still fail. Here W reaches 100% (WORKFLOW_COMPLETED emitted) and later
/// an optional task without failure task fails.
#[test]
fn completed_workflow_stays_completed_when_a_task_fails_later() {
    for o in [
        run_per_event(1, completed_then_side_failure()),
        run_one_batch(1, completed_then_side_failure()),
    ] {
        let w = workflow_row(&o, "w1");
        assert_eq!(w.status, "COMPLETED", "status after a later task failure");
        assert_eq!(o.of_type("WORKFLOW_COMPLETED").len(), 1);
        assert_eq!(
            o.of_type("WORKFLOW_FAILED").len(),
            0,
            "no WORKFLOW_FAILED for a completed workflow"
        );
    }
}

fn completed_then_upstream_completed() -> Vec<Event> {
    vec![
        def(sepsis(3)),
        wf_started("w1", "sepsis-bundle", 3, T0),
        task("TASK_COMPLETED", "t1", "w1", "triage", 1, T0 + MIN),
        task(
            "TASK_COMPLETED",
            "t2",
            "w1",
            "blood-cultures",
            1,
            T0 + 2 * MIN,
        ),
        task("TASK_COMPLETED", "t3", "w1", "antibiotics", 1, T0 + 3 * MIN),
        // Upstream also reports the completion, a little later.
        wf_event("w1", "WORKFLOW_COMPLETED", T0 + 4 * MIN),
    ]
}

/// hmis-flow derives the completion at T0+3m; upstream's own WORKFLOW_COMPLETED comes at
/// T0+4m. §8 event mode: "the same results however partitions are interleaved, batched or
/// restarted" — the derived WORKFLOW_COMPLETED must be published whether or not both
/// events fall into one batch.
#[test]
fn derived_completion_is_published_even_if_upstream_completion_follows_in_the_same_batch() {
    let per_event = run_per_event(1, completed_then_upstream_completed());
    assert_eq!(
        per_event.of_type("WORKFLOW_COMPLETED").len(),
        1,
        "per event"
    );
    let batched = run_one_batch(1, completed_then_upstream_completed());
    assert_eq!(batched.of_type("WORKFLOW_COMPLETED").len(), 1, "one batch");
    assert_eq!(workflow_row(&batched, "w1").status, "COMPLETED");
}

fn failure_then_upstream_failed() -> Vec<Event> {
    vec![
        def(sepsis(3)),
        wf_started("w1", "sepsis-bundle", 3, T0),
        task("TASK_FAILED", "t1", "w1", "triage", 1, T0 + MIN),
        wf_event("w1", "WORKFLOW_FAILED", T0 + 2 * MIN),
    ]
}

/// Same for a derived failure followed by upstream's WORKFLOW_FAILED.
#[test]
fn derived_failure_is_published_even_if_upstream_failure_follows_in_the_same_batch() {
    let per_event = run_per_event(1, failure_then_upstream_failed());
    assert_eq!(per_event.of_type("WORKFLOW_FAILED").len(), 1, "per event");
    let batched = run_one_batch(1, failure_then_upstream_failed());
    assert_eq!(batched.of_type("WORKFLOW_FAILED").len(), 1, "one batch");
    assert_eq!(batched.of_type("WORKFLOW_ESCALATED").len(), 1, "one batch");
}

/// §4: WORKFLOW_ESCALATED "sets the escalation flag (which stays set)". The derived failure
/// escalates (TASK_FAILED:triage); upstream's later WORKFLOW_FAILED must not clear the flag.
#[test]
fn escalation_flag_stays_set_when_an_upstream_terminal_event_follows() {
    for o in [
        run_per_event(1, failure_then_upstream_failed()),
        run_one_batch(1, failure_then_upstream_failed()),
    ] {
        let w = workflow_row(&o, "w1");
        assert_eq!(w.status, "FAILED");
        assert!(
            w.is_escalated,
            "escalated by TASK_FAILED:triage before upstream's WORKFLOW_FAILED: {w:?}"
        );
    }
}

/// Upstream fails W, hmis-flow then sees triage fail for good, and upstream finally completes
/// W. When triage failed, W was already FAILED (upstream): it did not *become* FAILED, so no
/// WORKFLOW_FAILED / WORKFLOW_ESCALATED is derived (§4 "it emits WORKFLOW_COMPLETED and
/// WORKFLOW_FAILED only for what it derives"; §8 "stays so, unless the upstream system sends
/// another terminal event"). Same for a completion reached while W was upstream-FAILED.
#[test]
fn nothing_is_derived_after_an_upstream_terminal_event_even_if_another_follows() {
    let failing = vec![
        def(sepsis(3)),
        wf_started("w1", "sepsis-bundle", 3, T0),
        wf_event("w1", "WORKFLOW_FAILED", T0 + MIN),
        task("TASK_FAILED", "t1", "w1", "triage", 1, T0 + 2 * MIN),
        wf_event("w1", "WORKFLOW_COMPLETED", T0 + 3 * MIN),
    ];
    let completing = vec![
        def(sepsis(3)),
        wf_started("w1", "sepsis-bundle", 3, T0),
        wf_event("w1", "WORKFLOW_FAILED", T0 + MIN),
        task("TASK_COMPLETED", "t1", "w1", "triage", 1, T0 + 2 * MIN),
        task(
            "TASK_COMPLETED",
            "t2",
            "w1",
            "blood-cultures",
            1,
            T0 + 3 * MIN,
        ),
        task("TASK_COMPLETED", "t3", "w1", "antibiotics", 1, T0 + 4 * MIN),
        wf_event("w1", "WORKFLOW_COMPLETED", T0 + 5 * MIN),
    ];
    for (name, evs) in [("failing", failing), ("completing", completing)] {
        for o in [run_per_event(1, evs.clone()), run_one_batch(1, evs.clone())] {
            let derived: Vec<_> = [
                "WORKFLOW_COMPLETED",
                "WORKFLOW_FAILED",
                "WORKFLOW_ESCALATED",
            ]
            .iter()
            .flat_map(|t| o.of_type(t))
            .map(|r| r.event_type.clone())
            .collect();
            assert!(
                derived.is_empty(),
                "{name}: derived {derived:?} after upstream's WORKFLOW_FAILED"
            );
            let w = workflow_row(&o, "w1");
            assert_eq!(
                (w.status.as_str(), w.is_escalated),
                ("COMPLETED", false),
                "{name}"
            );
        }
    }
}

/// §4: "When a task's state becomes FAILED: if attempt <= maxRetries, emit
/// TASK_RETRY_SCHEDULED". Upstream often creates the retry right away; when the failure and
/// the retry's TASK_CREATED are processed together the failure must still schedule it.
#[test]
fn retry_is_scheduled_even_when_the_retry_is_created_in_the_same_batch() {
    let evs = vec![
        def(sepsis(3)),
        wf_started("w1", "sepsis-bundle", 3, T0),
        task("TASK_COMPLETED", "t1", "w1", "triage", 1, T0 + MIN),
        task("TASK_FAILED", "t2", "w1", "blood-cultures", 1, T0 + 2 * MIN),
        task(
            "TASK_CREATED",
            "t2",
            "w1",
            "blood-cultures",
            2,
            T0 + 2 * MIN + 1000,
        ),
    ];
    assert_eq!(
        run_per_event(1, evs.clone())
            .of_type("TASK_RETRY_SCHEDULED")
            .len(),
        1,
        "per event"
    );
    assert_eq!(
        run_one_batch(1, evs).of_type("TASK_RETRY_SCHEDULED").len(),
        1,
        "one batch"
    );
}

/// A restart of `events` (each at its eventTime) at `f`: the first run up to `f`, then the
/// second with the first part replayed below `f`.
fn restart_at(events: Vec<Event>, f: Millis) -> (Outcome, Outcome) {
    let mut feed: Feed = events
        .into_iter()
        .map(|e| (e.event_time().unwrap_or(T0), e))
        .collect();
    feed.sort_by_key(|(t, _)| *t);
    let cut = feed.iter().position(|(t, _)| *t >= f).unwrap_or(feed.len());
    let end = feed.last().unwrap().0 + 1;
    let first = run(Run::new(1, feed[..cut].to_vec(), f));
    let second = run(Run {
        workers: 1,
        feed: feed[cut..].to_vec(),
        end,
        replay: feed[..cut].iter().map(|(_, e)| e.clone()).collect(),
        restore_time: f - 1,
        suppress_before: f,
        config: Default::default(),
        settle_each_time: false,
        replay_chunk: 0,
    });
    (first, second)
}

/// §4 "Each time D becomes ready": D stays ready when an order of a blocking type is created
/// and resulted at one instant (or, in wall mode, within one flush); no second TASK_READY.
#[test]
fn an_order_created_and_closed_at_once_does_not_make_a_ready_task_ready_again() {
    let t_order = T0 + 2 * MIN;
    let evs = vec![
        def(sepsis(3)),
        wf_started("w1", "sepsis-bundle", 3, T0),
        task("TASK_COMPLETED", "t1", "w1", "triage", 1, T0 + MIN / 2),
        task("TASK_COMPLETED", "t2", "w1", "blood-cultures", 1, T0 + MIN),
        order(
            "ORDER_CREATED",
            "PROPOSED",
            "o1",
            "w1",
            "LAB_TEST",
            t_order,
            json!({}),
        ),
        order(
            "ORDER_CANCELLED",
            "CANCELLED",
            "o1",
            "w1",
            "LAB_TEST",
            t_order,
            json!({}),
        ),
    ];
    let o = run_per_event(1, evs);
    let ready: Vec<_> = o
        .of_type("TASK_READY")
        .into_iter()
        .filter(|r| r.payload.contains("\"antibiotics\""))
        .collect();
    assert_eq!(ready.len(), 1, "antibiotics became ready once: {ready:#?}");
}

/// Contract §8: "Consumers of the output topics see each derived event once". antibiotics is
/// blocked by o1 (TASK_BLOCKED, open [o1]); o2 opens (TASK_BLOCKED, open [o1, o2]); o2 is
/// resulted: the rules re-derive the first TASK_BLOCKED's eventId. Whether it is published
/// again depends on flush boundaries: a restart between the two publishes it twice.
#[test]
fn a_re_derived_event_id_is_not_published_again_after_a_restart() {
    let evs = vec![
        def(sepsis(3)),
        wf_started("w1", "sepsis-bundle", 3, T0),
        task("TASK_COMPLETED", "t1", "w1", "triage", 1, T0 + MIN),
        task(
            "TASK_COMPLETED",
            "t2",
            "w1",
            "blood-cultures",
            1,
            T0 + 2 * MIN,
        ),
        order(
            "ORDER_CREATED",
            "PROPOSED",
            "o1",
            "w1",
            "LAB_TEST",
            T0 + 3 * MIN,
            json!({}),
        ),
        order(
            "ORDER_CREATED",
            "PROPOSED",
            "o2",
            "w1",
            "LAB_TEST",
            T0 + 4 * MIN,
            json!({}),
        ),
        order(
            "ORDER_CANCELLED",
            "CANCELLED",
            "o2",
            "w1",
            "LAB_TEST",
            T0 + 6 * MIN,
            json!({}),
        ),
    ];
    let (first, second) = restart_at(evs, T0 + 5 * MIN);
    let ids = |o: &Outcome| {
        o.records
            .iter()
            .map(|r| r.event_id.clone())
            .collect::<BTreeSet<_>>()
    };
    let twice: Vec<_> = ids(&first).intersection(&ids(&second)).cloned().collect();
    let types: Vec<_> = second
        .records
        .iter()
        .filter(|r| twice.contains(&r.event_id))
        .map(|r| &r.event_type)
        .collect();
    assert!(
        twice.is_empty(),
        "published before and again after the restart: {types:?}"
    );
}

/// decisions.md: "the same eventId is never emitted twice with different content". A failure
/// task named by two definitions is ready once the first fails for good; when the second
/// fails too, its TASK_READY is re-derived under the same eventId with another causeEventId.
#[test]
fn a_failure_task_named_twice_keeps_one_ready_event() {
    let tpl = json!({"templateId": "two-namers", "version": 1, "tasks": [
        {"taskDefId": "a", "failureTaskId": "f"},
        {"taskDefId": "b", "failureTaskId": "f"},
        {"taskDefId": "f", "required": false}
    ]});
    let evs = vec![
        def(tpl),
        wf_started("w1", "two-namers", 1, T0),
        task("TASK_FAILED", "ta", "w1", "a", 1, T0 + MIN),
        task("TASK_FAILED", "tb", "w1", "b", 1, T0 + 3 * MIN),
    ];
    let (first, second) = restart_at(evs, T0 + 2 * MIN);
    let ready = |o: &Outcome| -> Vec<(String, String)> {
        o.of_type("TASK_READY")
            .iter()
            .filter(|r| r.payload.contains("\"taskDefId\":\"f\""))
            .map(|r| (r.event_id.clone(), r.payload.clone()))
            .collect()
    };
    let (r1, r2) = (ready(&first), ready(&second));
    assert_eq!(r1.len(), 1, "f ready once a failed for good");
    assert!(
        r2.is_empty(),
        "f stayed ready; re-published after the restart as {r2:#?} (first: {r1:#?})"
    );
}
