//! The lifecycle of input records: unknown references dead-lettered after the grace (contract
//! §7), and the state of finished work retired without changing any row.
//!
//! In the harness, `end` is the dataflow frontier, so the pipeline clock is `end - 1`, and
//! "the clock passes t" needs `end >= t + 2` (as in time_rules.rs).
//!
//! Every test runs on both cores ([`on_both_cores`]): the differential one with its
//! feedback loop, and the keyed one with the lifecycle as state of the key.

mod common;

use common::*;
use hmis_dataflows::engine::Core;
use hmis_dataflows::events::Event;
use hmis_dataflows::harness::{Outcome, Run};
use hmis_dataflows::lifecycle::{LifecycleRules, Stats, SIGNAL_DELAY_MS};
use hmis_dataflows::output::{DeadLetter, Millis, RejectReason, Row};
use hmis_dataflows::RulesConfig;
use serde_json::json;

thread_local! {
    static CORE: std::cell::Cell<Core> = const { std::cell::Cell::new(Core::Differential) };
}

/// Runs `r` on the core the current test body runs on.
fn run(r: Run) -> Outcome {
    hmis_dataflows::engine::run(r, CORE.with(|c| c.get()))
}

/// Runs `body` on the differential core, then on the keyed core; a failure names the core.
fn on_both_cores(body: fn()) {
    for core in [Core::Differential, Core::Keyed] {
        CORE.with(|c| c.set(core));
        if let Err(e) = std::panic::catch_unwind(body) {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("on the {core:?} core: {msg}");
        }
    }
}

const GRACE: Millis = 10 * MIN;
/// A record's grace check is decided this long after the grace ends (the signal delay).
const DECIDED: Millis = GRACE + SIGNAL_DELAY_MS;

/// Runs `feed` (events at their given pipeline times) with the clock at `clock`.
fn at_clock_with(mut feed: Vec<(Millis, Event)>, clock: Millis, config: RulesConfig) -> Outcome {
    feed.sort_by_key(|(t, _)| *t);
    let mut r = Run::new(2, feed, clock + 1);
    r.config = config;
    run(r)
}

/// Events at their eventTimes (definitions at T0 - 1), default rules.
fn at_clock(events: Vec<Event>, clock: Millis) -> Outcome {
    at_clock_with(stamped(events), clock, RulesConfig::default())
}

fn stamped(events: Vec<Event>) -> Vec<(Millis, Event)> {
    events
        .into_iter()
        .map(|e| (e.event_time().unwrap_or(T0 - 1), e))
        .collect()
}

fn dead(o: &Outcome) -> Vec<&DeadLetter> {
    o.batches.iter().flat_map(|b| &b.dead_letters).collect()
}

fn reasons(o: &Outcome) -> Vec<RejectReason> {
    dead(o).iter().map(|d| d.reason).collect()
}

fn task_rows(o: &Outcome) -> Vec<(String, String)> {
    o.rows
        .values()
        .filter_map(|r| match r {
            Row::Task(t) => Some((t.task_instance_id.to_string(), t.status.to_string())),
            _ => None,
        })
        .collect()
}

fn workflow_status(o: &Outcome, wid: &str) -> Option<String> {
    o.rows.values().find_map(|r| match r {
        Row::Workflow(w) if w.workflow_instance_id == wid => Some(w.status.to_string()),
        _ => None,
    })
}

#[test]
fn a_task_of_an_unknown_workflow_is_dead_lettered_only_after_the_grace() {
    on_both_cores(a_task_of_an_unknown_workflow_is_dead_lettered_only_after_the_grace_on)
}

fn a_task_of_an_unknown_workflow_is_dead_lettered_only_after_the_grace_on() {
    let events = || {
        vec![
            def(sepsis(3)),
            task("TASK_CREATED", "t1", "w9", "triage", 1, T0),
        ]
    };
    assert!(
        dead(&at_clock(events(), T0 + GRACE - 1)).is_empty(),
        "before"
    );
    assert!(
        dead(&at_clock(events(), T0 + GRACE)).is_empty(),
        "at the end of the grace the clock has not passed it"
    );
    assert!(
        dead(&at_clock(events(), T0 + DECIDED - 1)).is_empty(),
        "decided once the signals of the grace's last instant are in"
    );
    let o = at_clock(events(), T0 + DECIDED);
    let d = dead(&o);
    assert_eq!(d.len(), 1, "after");
    assert_eq!(d[0].reason, RejectReason::UnknownWorkflow);
    assert_eq!(d[0].topic, "workflow-task-events");
    assert_eq!(d[0].key.as_deref(), Some("t1"));
    assert_eq!(d[0].rejected_at, T0 + DECIDED);
    let payload: serde_json::Value = serde_json::from_str(&d[0].payload).unwrap();
    assert_eq!(payload["taskInstanceId"], "t1", "the original payload");
    assert!(d[0].detail.contains("w9"), "{}", d[0].detail);
    // Published on the dead-letter topic too.
    assert_eq!(o.of_type("UNKNOWN_WORKFLOW").len(), 1);
}

#[test]
fn a_workflow_started_within_the_grace_wins() {
    on_both_cores(a_workflow_started_within_the_grace_wins_on)
}

fn a_workflow_started_within_the_grace_wins_on() {
    let just_in_time = vec![
        def(sepsis(3)),
        task("TASK_CREATED", "t1", "w1", "triage", 1, T0),
        wf_started("w1", "sepsis-bundle", 3, T0 + GRACE),
    ];
    let o = at_clock(just_in_time, T0 + DECIDED + MIN);
    assert!(dead(&o).is_empty(), "{:?}", reasons(&o));
    assert_eq!(task_rows(&o), [("t1".to_string(), "PENDING".to_string())]);

    let too_late = vec![
        def(sepsis(3)),
        task("TASK_CREATED", "t1", "w1", "triage", 1, T0),
        wf_started("w1", "sepsis-bundle", 3, T0 + GRACE + 1),
    ];
    let o = at_clock(too_late, T0 + DECIDED + MIN);
    assert_eq!(reasons(&o), [RejectReason::UnknownWorkflow]);
    assert!(task_rows(&o).is_empty(), "the task was not applied");
    assert_eq!(workflow_status(&o, "w1").as_deref(), Some("ACTIVE"));
}

#[test]
fn an_unknown_template_is_dead_lettered_after_the_grace_unless_it_arrives() {
    on_both_cores(an_unknown_template_is_dead_lettered_after_the_grace_unless_it_arrives_on)
}

fn an_unknown_template_is_dead_lettered_after_the_grace_unless_it_arrives_on() {
    let events = || {
        vec![
            def(sepsis(3)),
            wf_started("w1", "sepsis-bundle", 4, T0),
            task("TASK_CREATED", "t1", "w1", "triage", 1, T0 + MIN),
        ]
    };
    let o = at_clock(events(), T0 + GRACE);
    assert!(dead(&o).is_empty());
    assert_eq!(workflow_status(&o, "w1").as_deref(), Some("ACTIVE"));

    let o = at_clock(events(), T0 + MIN + DECIDED);
    let mut got = reasons(&o);
    got.sort();
    assert_eq!(
        got,
        [RejectReason::UnknownTemplate, RejectReason::UnknownWorkflow]
    );
    let started = dead(&o)
        .into_iter()
        .find(|d| d.reason == RejectReason::UnknownTemplate)
        .unwrap();
    assert_eq!(started.topic, "workflow-state-events");
    assert!(started.payload.contains("WORKFLOW_STARTED"));
    assert_eq!(workflow_status(&o, "w1"), None, "its rows are gone");
    assert!(task_rows(&o).is_empty());

    // The version arriving within the grace wins.
    let mut feed = stamped(events());
    feed.push((T0 + GRACE - 1, def(sepsis(4))));
    let o = at_clock_with(feed, T0 + MIN + DECIDED + MIN, RulesConfig::default());
    assert!(dead(&o).is_empty(), "{:?}", reasons(&o));
    assert_eq!(workflow_status(&o, "w1").as_deref(), Some("ACTIVE"));
    assert_eq!(task_rows(&o).len(), 1);
}

#[test]
fn wall_clock_grace_counts_from_arrival() {
    on_both_cores(wall_clock_grace_counts_from_arrival_on)
}

fn wall_clock_grace_counts_from_arrival_on() {
    // In wall mode the grace starts when the record arrives, not at its eventTime.
    let mut cfg = RulesConfig::default();
    cfg.lifecycle.grace_from_event_time = false;
    let arrival = T0 + 3 * GRACE;
    let feed = vec![
        (T0 - 1, def(sepsis(3))),
        (arrival, task("TASK_CREATED", "t1", "w9", "triage", 1, T0)),
    ];
    let o = at_clock_with(feed.clone(), arrival + GRACE, cfg.clone());
    assert!(dead(&o).is_empty());
    let o = at_clock_with(feed, arrival + DECIDED, cfg);
    assert_eq!(reasons(&o), [RejectReason::UnknownWorkflow]);
}

fn retiring(retire_after: Millis) -> (RulesConfig, Stats) {
    let stats = Stats::default();
    let cfg = RulesConfig {
        lifecycle: LifecycleRules {
            retire_after_ms: retire_after,
            stats: stats.clone(),
            ..LifecycleRules::default()
        },
        ..RulesConfig::default()
    };
    (cfg, stats)
}

fn finished_workflow() -> Vec<Event> {
    vec![
        def(sepsis(3)),
        wf_started("w1", "sepsis-bundle", 3, T0),
        task("TASK_CREATED", "t1", "w1", "triage", 1, T0 + MIN),
        task("TASK_STARTED", "t1", "w1", "triage", 1, T0 + 2 * MIN),
        task("TASK_COMPLETED", "t1", "w1", "triage", 1, T0 + 3 * MIN),
        task(
            "TASK_CREATED",
            "t2",
            "w1",
            "blood-cultures",
            1,
            T0 + 4 * MIN,
        ),
        task("TASK_FAILED", "t2", "w1", "blood-cultures", 1, T0 + 5 * MIN),
        wf_event("w1", "WORKFLOW_FAILED", T0 + 6 * MIN),
    ]
}

#[test]
fn a_finished_workflow_is_retired_and_its_rows_stay() {
    on_both_cores(a_finished_workflow_is_retired_and_its_rows_stay_on)
}

fn a_finished_workflow_is_retired_and_its_rows_stay_on() {
    let clock = T0 + 40 * MIN;
    let (keep_cfg, _) = retiring(u64::MAX / 4);
    let kept = at_clock_with(stamped(finished_workflow()), clock, keep_cfg);
    let (cfg, stats) = retiring(5 * MIN);
    let retired = at_clock_with(stamped(finished_workflow()), clock, cfg);

    assert_eq!(retired.rows, kept.rows, "retiring changes no row");
    assert_eq!(workflow_status(&retired, "w1").as_deref(), Some("FAILED"));
    assert_eq!(retired.records, kept.records, "nor any published record");
    let s = &stats.0;
    use std::sync::atomic::Ordering::SeqCst;
    assert_eq!(s.retired_total.load(SeqCst), 1);
    assert_eq!(s.held_records.load(SeqCst), 0, "nothing of w1 is held");
    assert_eq!(s.live_keys.load(SeqCst), 0);
    assert_eq!(s.tombstones.load(SeqCst), 1);

    // Not before its time: closed at T0 + 6 min, known to the tracker 10 min later, retired
    // on the first whole ten minutes a signal delay after that (T0 is one): T0 + 30 min.
    let (cfg, stats) = retiring(5 * MIN);
    at_clock_with(stamped(finished_workflow()), T0 + 30 * MIN - 1, cfg);
    assert_eq!(stats.0.retired_total.load(SeqCst), 0);
    assert_eq!(stats.0.held_records.load(SeqCst), 7);
}

#[test]
fn retirement_waits_a_signal_delay_after_the_closure_is_known() {
    on_both_cores(retirement_waits_a_signal_delay_after_the_closure_is_known_on)
}

fn retirement_waits_a_signal_delay_after_the_closure_is_known_on() {
    // retire_after_ms = 0: without the minimum delay, w1 (closed at T0 + 6 min, known to the
    // tracker at T0 + 16 min) would retire on the next whole ten minutes, T0 + 20 min. With
    // it, not before T0 + 26 min, so on T0 + 30 min: a closure that a replay's partial
    // history shows for a moment is taken back before anything retires.
    use std::sync::atomic::Ordering::SeqCst;
    let (cfg, stats) = retiring(0);
    at_clock_with(stamped(finished_workflow()), T0 + 30 * MIN - 1, cfg);
    assert_eq!(stats.0.retired_total.load(SeqCst), 0);
    assert_eq!(stats.0.held_records.load(SeqCst), 7);
    let (cfg, stats) = retiring(0);
    at_clock_with(stamped(finished_workflow()), T0 + 31 * MIN, cfg);
    assert_eq!(stats.0.retired_total.load(SeqCst), 1);
    assert_eq!(stats.0.held_records.load(SeqCst), 0);
}

#[test]
fn after_retirement_a_duplicate_changes_nothing_and_a_new_event_is_dead_lettered() {
    on_both_cores(after_retirement_a_duplicate_changes_nothing_and_a_new_event_is_dead_lettered_on)
}

fn after_retirement_a_duplicate_changes_nothing_and_a_new_event_is_dead_lettered_on() {
    let clock = T0 + 60 * MIN;
    let (cfg, _) = retiring(5 * MIN);
    let before = at_clock_with(stamped(finished_workflow()), clock, cfg);

    // The same TASK_COMPLETED again (same eventId), long after the retirement.
    let mut feed = stamped(finished_workflow());
    feed.push((
        T0 + 40 * MIN,
        task("TASK_COMPLETED", "t1", "w1", "triage", 1, T0 + 3 * MIN),
    ));
    let (cfg, stats) = retiring(5 * MIN);
    let dup = at_clock_with(feed, clock, cfg);
    assert_eq!(dup.rows, before.rows);
    assert_eq!(dup.records, before.records);
    assert!(dead(&dup).is_empty());
    assert_eq!(
        stats
            .0
            .duplicates_total
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );

    // A new event for the retired workflow: dead-lettered, with the reason why.
    let mut feed = stamped(finished_workflow());
    feed.push((
        T0 + 40 * MIN,
        task(
            "TASK_CREATED",
            "t3",
            "w1",
            "manual-review",
            1,
            T0 + 40 * MIN,
        ),
    ));
    let (cfg, _) = retiring(5 * MIN);
    let late = at_clock_with(feed, clock, cfg);
    assert_eq!(late.rows, before.rows);
    let d = dead(&late);
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].reason, RejectReason::UnknownWorkflow);
    assert!(d[0].detail.contains("retired"), "{}", d[0].detail);
}

fn closed_order() -> Vec<Event> {
    let o = |ty: &str, status: &str, at: Millis, md: serde_json::Value| {
        order(ty, status, "o1", "w1", "LAB_TEST", at, md)
    };
    vec![
        o("ORDER_CREATED", "PROPOSED", T0, json!({"cost": 25})),
        o(
            "ORDER_AUTHORIZED",
            "AUTHORIZED",
            T0 + MIN,
            json!({"actorRole": "PHYSICIAN"}),
        ),
        o("ORDER_ACTIVATED", "ACTIVATED", T0 + 2 * MIN, json!({})),
        o("ORDER_RESULTED", "RESULTED", T0 + 3 * MIN, json!({})),
        o("ORDER_VERIFIED", "VERIFIED", T0 + 4 * MIN, json!({})),
        o("ORDER_CLOSED", "CLOSED", T0 + 5 * MIN, json!({})),
    ]
}

#[test]
fn a_closed_order_is_retired_and_a_later_event_is_an_invalid_transition() {
    on_both_cores(a_closed_order_is_retired_and_a_later_event_is_an_invalid_transition_on)
}

fn a_closed_order_is_retired_and_a_later_event_is_an_invalid_transition_on() {
    let clock = T0 + 60 * MIN;
    let events = closed_order();
    let (keep_cfg, _) = retiring(u64::MAX / 4);
    let kept = at_clock_with(stamped(events.clone()), clock, keep_cfg);
    let (cfg, stats) = retiring(5 * MIN);
    let retired = at_clock_with(stamped(events.clone()), clock, cfg);
    assert_eq!(retired.rows, kept.rows);
    assert!(retired
        .rows
        .values()
        .any(|r| matches!(r, Row::Order(o) if o.order_status == "CLOSED")));
    assert_eq!(
        stats
            .0
            .retired_total
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );

    let mut feed = stamped(events);
    feed.push((
        T0 + 40 * MIN,
        order(
            "ORDER_CANCELLED",
            "CANCELLED",
            "o1",
            "w1",
            "LAB_TEST",
            T0 + 40 * MIN,
            json!({"reason": "late"}),
        ),
    ));
    let (cfg, _) = retiring(5 * MIN);
    let late = at_clock_with(feed, clock, cfg);
    assert_eq!(reasons(&late), [RejectReason::InvalidTransition]);
    assert_eq!(late.rows, kept.rows, "the order stays CLOSED");
}

#[test]
fn state_is_bounded_by_open_work() {
    on_both_cores(state_is_bounded_by_open_work_on)
}

fn state_is_bounded_by_open_work_on() {
    // 300 workflows, one after another, each closed within minutes: at the end only the
    // open ones (the last 10) are held; all others are retired.
    let mut events = vec![def(sepsis(3))];
    for i in 0..300u64 {
        let wid = format!("w{i}");
        let t = T0 + i * MIN;
        events.push(wf_started(&wid, "sepsis-bundle", 3, t));
        events.push(task(
            "TASK_CREATED",
            &format!("{wid}-t"),
            &wid,
            "triage",
            1,
            t,
        ));
        if i < 290 {
            events.push(wf_event(&wid, "WORKFLOW_COMPLETED", t + 30_000));
        }
    }
    let (cfg, stats) = retiring(2 * MIN);
    let o = at_clock_with(stamped(events), T0 + 300 * MIN + 15 * MIN, cfg);
    let s = &stats.0;
    use std::sync::atomic::Ordering::SeqCst;
    assert_eq!(s.retired_total.load(SeqCst), 290);
    assert_eq!(s.live_keys.load(SeqCst), 10);
    assert_eq!(s.held_records.load(SeqCst), 20);
    // Every workflow still has its row.
    let workflows = o
        .rows
        .values()
        .filter(|r| matches!(r, Row::Workflow(_)))
        .count();
    assert_eq!(workflows, 300);
}

/// A restart at `f`: `replayed` a chunk of one event per time below `f` (as the runtime
/// replays committed history), then `feed` from `f` on, up to `clock`.
fn restarted(
    replayed: Vec<Event>,
    feed: Vec<(Millis, Event)>,
    f: Millis,
    clock: Millis,
    config: RulesConfig,
) -> Outcome {
    let mut r = Run::new(1, feed, clock + 1);
    r.replay = replayed;
    r.restore_time = f - 1;
    r.suppress_before = f;
    r.replay_chunk = 1;
    r.config = config;
    run(r)
}

#[test]
fn a_replayed_record_waits_its_whole_grace_after_a_restart() {
    on_both_cores(a_replayed_record_waits_its_whole_grace_after_a_restart_on)
}

fn a_replayed_record_waits_its_whole_grace_after_a_restart_on() {
    // Wall clock: a task event read just before the restart (its arrival is not known to the
    // replay), its WORKFLOW_STARTED read just after it. The grace counts from the restart, so
    // the workflow arriving within it wins, as it would have without the restart.
    let mut cfg = RulesConfig::default();
    cfg.lifecycle.grace_from_event_time = false;
    let f = T0 + 10 * GRACE;
    let replayed = vec![
        def(sepsis(3)),
        task("TASK_CREATED", "t1", "w9", "triage", 1, f - 1000),
    ];
    let feed = vec![(f + 1000, wf_started("w9", "sepsis-bundle", 3, f - 500))];
    let o = restarted(replayed.clone(), feed, f, f + 3 * DECIDED, cfg.clone());
    assert!(dead(&o).is_empty(), "{:?}", dead(&o));
    assert_eq!(task_rows(&o), [("t1".to_string(), "PENDING".to_string())]);

    // Without the workflow, it is dead-lettered once its grace (from the restart) has passed.
    let o = restarted(replayed, vec![], f, f + DECIDED + 1, cfg);
    assert_eq!(reasons(&o), [RejectReason::UnknownWorkflow]);
}
