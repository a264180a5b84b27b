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
//!   the uninterrupted run's: nothing lost, nothing published twice.
//!
//! `HMIS_REF_SEEDS=n` sets the number of seeds (default 60), `HMIS_REF_SEED=s` runs one seed.
//! A failure lists, per kind of discrepancy, how many (seed, mode) runs showed it and the
//! first examples.

mod common;
#[path = "reference/history.rs"]
mod history;
#[path = "reference/model.rs"]
mod model;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use hmis_dataflows::events::{parse_time, Event};
use hmis_dataflows::harness::{run, Outcome, Run};
use hmis_dataflows::output::{Millis, OutRecord, Row};
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
                ob.ready.insert((r.workflow_instance_id.clone(), r.task_def_id.clone()));
            }
            Row::Workflow(w) => {
                ob.workflows.insert(w.workflow_instance_id.clone(), (w.status.clone(), w.progress_percentage, w.is_escalated));
            }
            Row::Task(t) => {
                ob.tasks.insert(t.task_instance_id.clone(), (t.status.clone(), t.attempt as u32));
            }
        }
    }
    for r in &o.records {
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
                    ob.escalated_failures.entry(wid).or_default().insert(def.to_string());
                }
            }
            "TASK_RETRY_SCHEDULED" => {
                ob.retries.insert((s(&v, "taskInstanceId"), v["attempt"].as_u64().unwrap_or(0) as u32));
            }
            "WORKFLOW_PROGRESS" => {
                ob.progress.insert((wid, v["progressPercentage"].as_i64().unwrap_or(-1) as i32));
            }
            "TASK_READY" => {
                ob.ready_ids.entry(pair).or_default().insert(r.event_id.clone());
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

fn diff_sets<T: Ord + std::fmt::Debug + Clone>(want: &BTreeSet<T>, got: &BTreeSet<T>) -> Option<String> {
    if want == got {
        return None;
    }
    let missing: Vec<_> = want.difference(got).cloned().collect();
    let extra: Vec<_> = got.difference(want).cloned().collect();
    Some(format!("missing {missing:?}, unexpected {extra:?}"))
}

fn diff_maps<K: Ord + std::fmt::Debug, V: PartialEq + std::fmt::Debug>(want: &BTreeMap<K, V>, got: &BTreeMap<K, V>) -> Option<String> {
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

/// Final rows: readiness, workflow status and progress, task status and attempt.
fn check_rows(found: &mut Found, ctx: &str, exp: &Expected, ob: &Observed) {
    if let Some(d) = diff_sets(&exp.ready, &ob.ready) {
        note(found, "final readiness rows", format!("{ctx}: {d}"));
    }
    let want: BTreeMap<_, _> = exp.workflows.iter().map(|(k, w)| (k.clone(), (w.status.to_string(), w.progress))).collect();
    let got: BTreeMap<_, _> = ob.workflows.iter().map(|(k, w)| (k.clone(), (w.0.clone(), w.1))).collect();
    if let Some(d) = diff_maps(&want, &got) {
        note(found, "final workflow status/progress", format!("{ctx}: {d}"));
    }
    let want: BTreeMap<_, _> = exp.workflows.iter().map(|(k, w)| (k.clone(), w.escalated)).collect();
    let got: BTreeMap<_, _> = ob.workflows.iter().map(|(k, w)| (k.clone(), w.2)).collect();
    if let Some(d) = diff_maps(&want, &got) {
        note(found, "final workflow is_escalated", format!("{ctx}: {d}"));
    }
    if let Some(d) = diff_maps(&exp.tasks, &ob.tasks) {
        note(found, "final task status/attempt", format!("{ctx}: {d}"));
    }
}

/// Derived facts that do not depend on how the clock advances.
fn check_facts(found: &mut Found, ctx: &str, exp: &Expected, ob: &Observed) {
    if let Some(d) = diff_sets(&exp.completed, &ob.completed) {
        note(found, "WORKFLOW_COMPLETED set", format!("{ctx}: {d}"));
    }
    let want: BTreeMap<String, BTreeSet<String>> =
        exp.failed.iter().map(|(w, d)| (w.clone(), BTreeSet::from([d.clone()]))).collect();
    if let Some(d) = diff_maps(&want, &ob.failed) {
        note(found, "WORKFLOW_FAILED set", format!("{ctx}: {d}"));
    }
    if let Some(d) = diff_maps(&want, &ob.escalated_failures) {
        note(found, "WORKFLOW_ESCALATED(TASK_FAILED) set", format!("{ctx}: {d}"));
    }
    if let Some(d) = diff_sets(&exp.retries, &ob.retries) {
        note(found, "TASK_RETRY_SCHEDULED set", format!("{ctx}: {d}"));
    }
}

/// Per-event clock: every transient fact the contract names must show up exactly.
fn check_transients_exact(found: &mut Found, ctx: &str, exp: &Expected, ob: &Observed) {
    if let Some(d) = diff_sets(&exp.progress, &ob.progress) {
        note(found, "WORKFLOW_PROGRESS values (per event)", format!("{ctx}: {d}"));
    }
    let got: BTreeMap<_, _> = ob.ready_ids.iter().map(|(k, v)| (k.clone(), v.len())).collect();
    if let Some(d) = diff_maps(&exp.ready_episodes, &got) {
        note(found, "TASK_READY once per readiness episode (per event)", format!("{ctx}: {d}"));
    }
    check_blocked(found, ctx, exp, ob);
}

fn check_blocked(found: &mut Found, ctx: &str, exp: &Expected, ob: &Observed) {
    let missing: Vec<_> = exp.blocked_required.difference(&ob.blocked).collect();
    if !missing.is_empty() {
        note(found, "TASK_BLOCKED missing", format!("{ctx}: {missing:?}"));
    }
    let invented: Vec<_> = ob.blocked.difference(&exp.blocked_possible).collect();
    if !invented.is_empty() {
        note(found, "TASK_BLOCKED never blocked", format!("{ctx}: {invented:?}"));
    }
}

/// Coarse clock: transients may be skipped, not invented.
fn check_transients_subset(found: &mut Found, ctx: &str, exp: &Expected, ob: &Observed) {
    let extra: Vec<_> = ob.progress.difference(&exp.progress).collect();
    let finals: BTreeSet<(String, i32)> = exp
        .workflows
        .iter()
        .filter(|(w, _)| exp.progress.iter().any(|(x, _)| x == *w))
        .map(|(w, r)| (w.clone(), r.progress))
        .collect();
    let missing_final: Vec<_> = finals.difference(&ob.progress).collect();
    if !extra.is_empty() || !missing_final.is_empty() {
        note(found, "WORKFLOW_PROGRESS values (batched)", format!("{ctx}: invented {extra:?}, final value missing {missing_final:?}"));
    }
    let ever = exp.ever_ready();
    let got: BTreeSet<_> = ob.ready_ids.keys().cloned().collect();
    let invented: Vec<_> = got.difference(&ever).collect();
    let missing: Vec<_> = exp.ready.difference(&got).collect();
    if !invented.is_empty() || !missing.is_empty() {
        note(found, "TASK_READY pairs (batched)", format!("{ctx}: never ready {invented:?}, ready at the end without TASK_READY {missing:?}"));
    }
    let invented: Vec<_> = ob.blocked.difference(&exp.blocked_possible).collect();
    if !invented.is_empty() {
        note(found, "TASK_BLOCKED never blocked", format!("{ctx}: {invented:?}"));
    }
}

type Feed = Vec<(Millis, Event)>;

/// Every event at its own eventTime; definitions (no eventTime) first, at T0.
fn per_event_feed(h: &history::History) -> Feed {
    let mut feed: Feed = h.records.iter().map(|r| (r.time.unwrap_or(history::T0), r.event.clone())).collect();
    feed.sort_by_key(|(t, e)| (*t, pos_of(e)));
    feed
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
    (1..feed.len()).filter(|&i| feed[i - 1].0 < feed[i].0).collect()
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
    let mut queues: Vec<std::collections::VecDeque<usize>> = h.partitions.values().map(|v| v.iter().copied().collect()).collect();
    let mut arrival = Vec::with_capacity(h.records.len());
    while queues.iter().any(|q| !q.is_empty()) {
        let live: Vec<usize> = (0..queues.len()).filter(|&i| !queues[i].is_empty()).collect();
        let q = *live.choose(rng).unwrap();
        arrival.push(queues[q].pop_front().unwrap());
    }
    let k = rng.random_range(1..=6usize);
    let mut cuts: Vec<usize> = (0..k).map(|_| rng.random_range(0..arrival.len())).collect();
    cuts.sort();
    arrival
        .iter()
        .enumerate()
        .map(|(i, &r)| (history::T0 + cuts.iter().filter(|&&c| c < i).count() as Millis, h.records[r].event.clone()))
        .collect()
}

fn go(workers: usize, feed: &Feed) -> Outcome {
    let end = feed.last().map(|(t, _)| t + 1).unwrap_or(history::T0 + 1);
    run(Run::new(workers, feed.clone(), end))
}

fn record_time(r: &OutRecord) -> Millis {
    let v: Value = serde_json::from_str(&r.payload).unwrap();
    parse_time(v["eventTime"].as_str().unwrap()).unwrap()
}

/// Splits `feed` at a random instant F, runs the first part, then restarts with it replayed
/// below F. Rows and records must be those of the uninterrupted run `whole`.
fn check_restart(found: &mut Found, ctx: &str, workers: usize, feed: &Feed, whole: &Outcome, rng: &mut SmallRng) {
    let b = boundaries(feed);
    let Some(&cut) = b.choose(rng) else { return };
    let end = feed.last().unwrap().0 + 1;
    let part1: Feed = feed[..cut].to_vec();
    let first = run(Run::new(workers, part1.clone(), part1.last().unwrap().0 + 1));
    let Some(f) = first.batches.last().map(|b| b.frontier) else {
        note(found, "restart", format!("{ctx}: first run flushed nothing"));
        return;
    };
    let second = run(Run {
        workers,
        feed: feed[cut..].to_vec(),
        end,
        replay: part1.into_iter().map(|(_, e)| e).collect(),
        restore_time: f - 1,
        suppress_before: f,
        config: Default::default(),
    });
    let mut combined = first.clone();
    for b in &second.batches {
        combined.apply(b.clone());
    }
    if combined.rows != whole.rows {
        let want: BTreeSet<_> = whole.rows.values().collect();
        let got: BTreeSet<_> = combined.rows.values().collect();
        let missing: Vec<_> = want.difference(&got).take(3).collect();
        let extra: Vec<_> = got.difference(&want).take(3).collect();
        note(found, "restart rows", format!("{ctx} split at F={f}: missing {missing:?}, unexpected {extra:?}"));
    }
    // Published records: run 1 publishes what the uninterrupted run published below F, run 2
    // what it published at or after F; together nothing is lost and nothing repeated.
    let whole_records: Vec<&OutRecord> = whole.batches.iter().flat_map(|b| b.records.iter()).collect();
    let before: BTreeSet<(String, String)> = whole_records
        .iter()
        .filter(|r| record_time(r) < f)
        .map(|r| (r.event_id.clone(), r.payload.clone()))
        .collect();
    let after: BTreeSet<(String, String)> = whole_records
        .iter()
        .filter(|r| record_time(r) >= f)
        .map(|r| (r.event_id.clone(), r.payload.clone()))
        .collect();
    let got1: BTreeSet<(String, String)> = first.records.iter().map(|r| (r.event_id.clone(), r.payload.clone())).collect();
    let got2: BTreeSet<(String, String)> = second.records.iter().map(|r| (r.event_id.clone(), r.payload.clone())).collect();
    if let Some(d) = diff_sets(&before, &got1) {
        note(found, "restart records before F", format!("{ctx} F={f}: {d}"));
    }
    if let Some(d) = diff_sets(&after, &got2) {
        note(found, "restart records after F", format!("{ctx} F={f}: {d}"));
    }
    let ids = |o: &Outcome| o.records.iter().map(|r| r.event_id.clone()).collect::<BTreeSet<_>>();
    let (ids1, ids2, idsw) = (ids(&first), ids(&second), ids(whole));
    let union: BTreeSet<String> = ids1.union(&ids2).cloned().collect();
    if union != idsw {
        note(found, "restart record ids", format!("{ctx} F={f}: {:?}", diff_sets(&idsw, &union)));
    }
    // An id the uninterrupted run publishes once must not be published by both halves.
    let twice: Vec<_> = ids1
        .intersection(&ids2)
        .filter(|id| whole_records.iter().filter(|r| &&r.event_id == id).count() < 2)
        .collect();
    if !twice.is_empty() {
        note(found, "restart duplicates", format!("{ctx} F={f}: {twice:?}"));
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
                    v["taskInstanceId"].as_str().or(v["orderId"].as_str()).unwrap_or(""),
                    v["taskDefId"].as_str().or(v["orderType"].as_str()).unwrap_or(""),
                    v["templateId"].as_str().map(|t| format!("{t}:{}", v["templateVersion"])).unwrap_or_default(),
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
        eprintln!("ready episodes: {:?}", exp.ready_episodes.iter().filter(|(k, _)| k.0 == wid).collect::<Vec<_>>());
        let o = go(1, &per_event_feed(&h));
        for r in o.records.iter().filter(|r| r.key.as_deref() == Some(wid.as_str())) {
            eprintln!("  {} {}", r.event_type, r.payload);
        }
    }
    let mut rng = SmallRng::seed_from_u64(seed ^ 0x5eed);

    let per_event = per_event_feed(&h);
    for workers in [1, 3] {
        let o = go(workers, &per_event);
        let ctx = format!("seed {seed}, per event, {workers} workers");
        let ob = observe(&o);
        check_rows(found, &ctx, &exp, &ob);
        check_facts(found, &ctx, &exp, &ob);
        check_transients_exact(found, &ctx, &exp, &ob);
        if workers == 1 + 2 * (seed as usize % 2) {
            check_restart(found, &ctx, workers, &per_event, &o, &mut rng);
        }
    }
    let batched = batched_feed(&h, &mut rng);
    for workers in [1, 3] {
        let o = go(workers, &batched);
        let ctx = format!("seed {seed}, batched, {workers} workers");
        let ob = observe(&o);
        check_rows(found, &ctx, &exp, &ob);
        check_facts(found, &ctx, &exp, &ob);
        check_transients_subset(found, &ctx, &exp, &ob);
        if workers == 3 - 2 * (seed as usize % 2) {
            check_restart(found, &ctx, workers, &batched, &o, &mut rng);
        }
    }
    let workers = if seed % 2 == 0 { 3 } else { 1 };
    let o = go(workers, &interleaved_feed(&h, &mut rng));
    check_rows(found, &format!("seed {seed}, interleaved, {workers} workers"), &exp, &observe(&o));
}

fn report(found: &Found) -> String {
    let mut out = String::new();
    for (kind, examples) in found {
        out.push_str(&format!("\n== {kind}: {} run(s)\n", examples.len()));
        for e in examples.iter().take(3) {
            let e = if e.len() > 1200 { format!("{}…", &e[..1200]) } else { e.clone() };
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
            let n = std::env::var("HMIS_REF_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
            (0..n).collect()
        }
    };
    let mut found = Found::new();
    for seed in &seeds {
        check_seed(*seed, &mut found);
    }
    assert!(found.is_empty(), "the dataflow disagrees with the reference on {} seed(s):{}", seeds.len(), report(&found));
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
        add("readiness episodes > 1", exp.ready_episodes.values().filter(|n| **n > 1).count());
        add("upstream COMPLETED", exp.workflows.values().filter(|w| w.status == "COMPLETED").count().saturating_sub(exp.completed.len()));
        add("failed status", exp.workflows.values().filter(|w| w.status == "FAILED").count());
        add("progress strictly between", exp.workflows.values().filter(|w| w.progress > 0 && w.progress < 100).count());
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
        order("ORDER_CREATED", "PROPOSED", "o1", "w1", "LAB_TEST", T0 + 2 * MIN, json!({})),
        task("TASK_COMPLETED", "t2", "w1", "blood-cultures", 1, T0 + 3 * MIN),
    ];
    let e = ev(base.clone());
    assert!(e.ready.is_empty());
    assert_eq!(e.workflows["w1"].progress, 66);
    assert_eq!(e.progress.iter().map(|p| p.1).collect::<Vec<_>>(), [0, 33, 66]);
    assert!(e.blocked_required.is_empty(), "antibiotics was never ready");
    assert_eq!(e.blocked_possible, BTreeSet::from([("w1".to_string(), "antibiotics".to_string())]));
    // An unauthorized authorization is ignored: still open.
    let mut evs = base.clone();
    evs.push(order("ORDER_AUTHORIZED", "AUTHORIZED", "o1", "w1", "LAB_TEST", T0 + 4 * MIN, json!({"actorRole": "SURGEON"})));
    evs.push(order("ORDER_CANCELLED", "CANCELLED", "o1", "w1", "LAB_TEST", T0 + 5 * MIN, json!({})));
    let e = ev(evs);
    assert_eq!(e.ready, BTreeSet::from([("w1".to_string(), "antibiotics".to_string())]));
    // Skipping a step is ignored: ACTIVATED from PROPOSED stays PROPOSED (open).
    let mut evs = base;
    evs.push(order("ORDER_ACTIVATED", "ACTIVATED", "o1", "w1", "LAB_TEST", T0 + 4 * MIN, json!({})));
    evs.push(order("ORDER_RESULTED", "RESULTED", "o1", "w1", "LAB_TEST", T0 + 5 * MIN, json!({})));
    assert!(ev(evs).ready.is_empty());
}

#[test]
fn model_retries_failure_task_and_terminal_order() {
    let evs = vec![
        def(sepsis(3)),
        wf_started("w1", "sepsis-bundle", 3, T0),
        task("TASK_COMPLETED", "t1", "w1", "triage", 1, T0 + MIN),
        task("TASK_FAILED", "t2", "w1", "blood-cultures", 1, T0 + 2 * MIN),
        task("TASK_CREATED", "t2", "w1", "blood-cultures", 2, T0 + 3 * MIN),
        task("TASK_FAILED", "t2", "w1", "blood-cultures", 2, T0 + 4 * MIN),
        task("TASK_CREATED", "t2", "w1", "blood-cultures", 3, T0 + 5 * MIN),
        task("TASK_FAILED", "t2", "w1", "blood-cultures", 3, T0 + 6 * MIN),
    ];
    let e = ev(evs);
    assert_eq!(e.retries, BTreeSet::from([("t2".to_string(), 2), ("t2".to_string(), 3)]));
    assert_eq!(e.ready, BTreeSet::from([("w1".to_string(), "manual-review".to_string())]));
    assert_eq!(e.workflows["w1"].status, "ACTIVE");
    assert_eq!(e.tasks["t2"], ("FAILED".to_string(), 3));
    // blood-cultures: ready after triage, again for each retry.
    assert_eq!(e.ready_episodes[&("w1".to_string(), "blood-cultures".to_string())], 3);

    // Completed first, then a failure: stays COMPLETED (§8).
    let evs = vec![
        def(with_side_task()),
        wf_started("w1", "sepsis-bundle", 3, T0),
        task("TASK_COMPLETED", "t1", "w1", "triage", 1, T0 + MIN),
        task("TASK_COMPLETED", "t2", "w1", "blood-cultures", 1, T0 + 2 * MIN),
        task("TASK_COMPLETED", "t3", "w1", "antibiotics", 1, T0 + 3 * MIN),
        task("TASK_FAILED", "t4", "w1", "side", 1, T0 + 4 * MIN),
    ];
    let e = ev(evs.clone());
    assert_eq!((e.workflows["w1"].status, e.completed.len(), e.failed.len()), ("COMPLETED", 1, 0));
    // The same failure before the completion: FAILED, and it stays so.
    let mut early = evs;
    early[5] = task("TASK_FAILED", "t4", "w1", "side", 1, T0 + MIN / 2);
    let e = ev(early);
    assert_eq!((e.workflows["w1"].status, e.completed.len()), ("FAILED", 0));
    assert_eq!(e.failed["w1"], "side");
    assert!(e.workflows["w1"].escalated);
}

// ---------------------------------------------------------------------------------------
// Minimal reproductions of the discrepancies the comparison finds (see the report in the
// test output of `random_histories_match_the_reference`).

fn run_per_event(workers: usize, events: Vec<Event>) -> Outcome {
    let mut feed: Feed = events.into_iter().map(|e| (e.event_time().unwrap_or(T0), e)).collect();
    feed.sort_by_key(|(t, _)| *t);
    go(workers, &feed)
}

fn run_one_batch(workers: usize, events: Vec<Event>) -> Outcome {
    let t = events.iter().filter_map(|e| e.event_time()).max().unwrap_or(T0);
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
    v["tasks"].as_array_mut().unwrap().push(json!({"taskDefId": "side", "name": "Side", "required": false}));
    v
}

fn completed_then_side_failure() -> Vec<Event> {
    vec![
        def(with_side_task()),
        wf_started("w1", "sepsis-bundle", 3, T0),
        task("TASK_COMPLETED", "t1", "w1", "triage", 1, T0 + MIN),
        task("TASK_COMPLETED", "t2", "w1", "blood-cultures", 1, T0 + 2 * MIN),
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
    for o in [run_per_event(1, completed_then_side_failure()), run_one_batch(1, completed_then_side_failure())] {
        let w = workflow_row(&o, "w1");
        assert_eq!(w.status, "COMPLETED", "status after a later task failure");
        assert_eq!(o.of_type("WORKFLOW_COMPLETED").len(), 1);
        assert_eq!(o.of_type("WORKFLOW_FAILED").len(), 0, "no WORKFLOW_FAILED for a completed workflow");
    }
}

fn completed_then_upstream_completed() -> Vec<Event> {
    vec![
        def(sepsis(3)),
        wf_started("w1", "sepsis-bundle", 3, T0),
        task("TASK_COMPLETED", "t1", "w1", "triage", 1, T0 + MIN),
        task("TASK_COMPLETED", "t2", "w1", "blood-cultures", 1, T0 + 2 * MIN),
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
    assert_eq!(per_event.of_type("WORKFLOW_COMPLETED").len(), 1, "per event");
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

/// Same for a derived failure followed by upstream's WORKFLOW_FAILED; and the escalation flag
/// set by the derived WORKFLOW_ESCALATED "stays set" (§4).
#[test]
fn derived_failure_is_published_and_escalation_stays_set_when_upstream_failure_follows() {
    let per_event = run_per_event(1, failure_then_upstream_failed());
    assert_eq!(per_event.of_type("WORKFLOW_FAILED").len(), 1, "per event");
    assert!(workflow_row(&per_event, "w1").is_escalated, "per event: escalated by TASK_FAILED:triage, stays set");
    let batched = run_one_batch(1, failure_then_upstream_failed());
    assert_eq!(batched.of_type("WORKFLOW_FAILED").len(), 1, "one batch");
    assert_eq!(batched.of_type("WORKFLOW_ESCALATED").len(), 1, "one batch");
    assert!(workflow_row(&batched, "w1").is_escalated, "one batch");
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
        task("TASK_CREATED", "t2", "w1", "blood-cultures", 2, T0 + 2 * MIN + 1000),
    ];
    assert_eq!(run_per_event(1, evs.clone()).of_type("TASK_RETRY_SCHEDULED").len(), 1, "per event");
    assert_eq!(run_one_batch(1, evs).of_type("TASK_RETRY_SCHEDULED").len(), 1, "one batch");
}
