//! The time rules of contract §4 at their boundaries: SLA breaches (clock and late events),
//! stale tasks, unanswered escalations; and their scope (only workflows not COMPLETED/FAILED).
//!
//! In the harness, `end` is the dataflow frontier: every time below it is complete, so the
//! pipeline clock is `end - 1`. "The clock passes t" (clock > t) therefore needs `end >= t + 2`.

mod common;

use common::*;
use hmis_dataflows::events::Event;
use hmis_dataflows::harness::{run, Outcome, Run};
use hmis_dataflows::output::{Millis, Row};

const H: Millis = 60 * MIN;

/// Runs events at their eventTimes (definitions at T0 - 1) with the clock at `clock`.
fn at_clock(events: Vec<Event>, clock: Millis) -> Outcome {
    let mut feed: Vec<_> = events
        .into_iter()
        .map(|e| (e.event_time().unwrap_or(T0 - 1), e))
        .collect();
    feed.sort_by_key(|(t, _)| *t);
    run(Run::new(2, feed, clock + 1))
}

fn base() -> Vec<Event> {
    // triage: slaMinutes 15, escalateTo CHARGE_NURSE.
    vec![
        def(sepsis(3)),
        wf_started("w1", "sepsis-bundle", 3, T0),
        task("TASK_CREATED", "t1", "w1", "triage", 1, T0),
    ]
}

fn count(o: &Outcome, ty: &str) -> usize {
    o.of_type(ty).len()
}

/// The breach events (TASK_SLA_BREACHED, TASK_ESCALATED, WORKFLOW_ESCALATED) of every flush,
/// in order: a copy published by a later flush counts again.
fn breach_events_published(o: &Outcome) -> Vec<&hmis_dataflows::output::OutRecord> {
    o.batches
        .iter()
        .flat_map(|b| &b.records)
        .filter(|r| {
            matches!(
                r.event_type.as_str(),
                "TASK_SLA_BREACHED" | "TASK_ESCALATED" | "WORKFLOW_ESCALATED"
            )
        })
        .collect()
}

fn json(o: &Outcome, ty: &str) -> serde_json::Value {
    serde_json::from_str(&o.of_type(ty)[0].payload).unwrap()
}

#[test]
fn sla_breach_fires_only_once_the_clock_passes_due() {
    let due = T0 + 15 * MIN;
    assert_eq!(
        count(&at_clock(base(), due - 1), "TASK_SLA_BREACHED"),
        0,
        "just before"
    );
    assert_eq!(
        count(&at_clock(base(), due), "TASK_SLA_BREACHED"),
        0,
        "at dueAt the clock has not passed it"
    );
    let o = at_clock(base(), due + 1);
    assert_eq!(count(&o, "TASK_SLA_BREACHED"), 1, "just after");
    assert_eq!(count(&o, "TASK_ESCALATED"), 1);
    assert_eq!(count(&o, "WORKFLOW_ESCALATED"), 1);
    let b = json(&o, "TASK_SLA_BREACHED");
    assert_eq!(b["dueAt"], iso(due));
    assert_eq!(b["minutesOverdue"], 0);
    assert_eq!(json(&o, "TASK_ESCALATED")["escalatedTo"], "CHARGE_NURSE");
    assert_eq!(
        json(&o, "WORKFLOW_ESCALATED")["escalationReason"],
        "SLA_BREACH:triage"
    );
    // Rows: the breach, the task's flags, the workflow's escalation.
    let mut breach_rows = 0;
    for r in o.rows.values() {
        match r {
            Row::SlaBreach(b) => {
                breach_rows += 1;
                assert_eq!((b.due_at, b.attempt), (due, 1));
            }
            Row::Task(t) => assert!(
                t.sla_breached
                    && t.is_escalated
                    && t.escalated_to.as_deref() == Some("CHARGE_NURSE")
            ),
            Row::Workflow(w) => {
                assert!(w.is_escalated);
                assert_eq!(
                    (w.escalation_level, w.escalation_reason.as_deref()),
                    (1, Some("SLA_BREACH:triage"))
                );
            }
            _ => {}
        }
    }
    assert_eq!(breach_rows, 1);
    // Much later: still exactly one of each.
    let o = at_clock(base(), due + 10 * MIN);
    assert_eq!(count(&o, "TASK_SLA_BREACHED"), 1);
}

#[test]
fn completion_at_due_is_on_time_and_after_due_is_a_breach() {
    let due = T0 + 15 * MIN;
    let mut on_time = base();
    on_time.push(task("TASK_COMPLETED", "t1", "w1", "triage", 1, due));
    assert_eq!(
        count(&at_clock(on_time, due + H / 2), "TASK_SLA_BREACHED"),
        0
    );

    // Completed 1 ms late; the pipeline saw everything only afterwards (all inserted at one time).
    let mut late = base();
    late.push(task("TASK_COMPLETED", "t1", "w1", "triage", 1, due + 1));
    let feed = late.into_iter().map(|e| (due + 5 * MIN, e)).collect();
    let o = run(Run::new(1, feed, due + 5 * MIN + 1));
    assert_eq!(
        count(&o, "TASK_SLA_BREACHED"),
        1,
        "late completion while the pipeline was down"
    );
    assert_eq!(
        json(&o, "TASK_SLA_BREACHED")["minutesOverdue"],
        5,
        "minutes past dueAt when detected"
    );
}

#[test]
fn explicit_due_at_wins_over_sla_minutes() {
    let due = T0 + 2 * MIN;
    let evs = vec![
        def(sepsis(3)),
        wf_started("w1", "sepsis-bundle", 3, T0),
        dec_task_with_due("t1", "w1", "triage", T0, due),
    ];
    assert_eq!(count(&at_clock(evs.clone(), due), "TASK_SLA_BREACHED"), 0);
    assert_eq!(count(&at_clock(evs, due + 1), "TASK_SLA_BREACHED"), 1);
}

fn dec_task_with_due(tid: &str, wid: &str, def_id: &str, at: Millis, due: Millis) -> Event {
    dec(
        hmis_dataflows::events::InputTopic::Tasks,
        Some(tid),
        Some(
            serde_json::json!({"eventId": format!("c-{tid}"), "eventType": "TASK_CREATED", "eventTime": iso(at),
            "taskInstanceId": tid, "workflowInstanceId": wid, "taskDefId": def_id, "dueAt": iso(due)}),
        ),
    )
}

#[test]
fn each_retry_attempt_has_its_own_sla() {
    // blood-cultures: slaMinutes 30, maxRetries 2.
    let mut evs = base();
    evs.push(task("TASK_COMPLETED", "t1", "w1", "triage", 1, T0 + MIN));
    evs.push(task(
        "TASK_CREATED",
        "t2",
        "w1",
        "blood-cultures",
        1,
        T0 + 2 * MIN,
    ));
    evs.push(task(
        "TASK_FAILED",
        "t2",
        "w1",
        "blood-cultures",
        1,
        T0 + 40 * MIN,
    )); // late: attempt 1 breached
    evs.push(task(
        "TASK_CREATED",
        "t2",
        "w1",
        "blood-cultures",
        2,
        T0 + 41 * MIN,
    ));
    let o = at_clock(evs, T0 + 41 * MIN + 31 * MIN); // attempt 2 open past its due too
    let breached: Vec<_> = o
        .of_type("TASK_SLA_BREACHED")
        .iter()
        .map(|r| serde_json::from_str::<serde_json::Value>(&r.payload).unwrap())
        .map(|v| {
            (
                v["taskInstanceId"].as_str().unwrap().to_string(),
                v["attempt"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(
        breached.contains(&("t2".into(), 1)) && breached.contains(&("t2".into(), 2)),
        "{breached:?}"
    );
}

#[test]
fn stale_pending_task_once() {
    let last = T0;
    assert_eq!(
        count(&at_clock(base(), last + 4 * H), "TASK_STALE"),
        0,
        "at staleAfter"
    );
    let o = at_clock(base(), last + 4 * H + 1);
    assert_eq!(count(&o, "TASK_STALE"), 1);
    assert_eq!(
        count(&at_clock(base(), last + 9 * H), "TASK_STALE"),
        1,
        "once"
    );
    // Started before staleAfter: not stale.
    let mut started = base();
    started.push(task("TASK_STARTED", "t1", "w1", "triage", 1, T0 + H));
    assert_eq!(count(&at_clock(started, last + 9 * H), "TASK_STALE"), 0);
}

#[test]
fn unanswered_escalation_climbs_to_level_three_and_stops() {
    let due = T0 + 15 * MIN;
    let levels = |o: &Outcome| -> Vec<i64> {
        let mut l: Vec<i64> = o
            .of_type("WORKFLOW_ESCALATED")
            .iter()
            .map(|r| {
                serde_json::from_str::<serde_json::Value>(&r.payload).unwrap()["escalationLevel"]
                    .as_i64()
                    .unwrap()
            })
            .collect();
        l.sort();
        l
    };
    assert_eq!(
        levels(&at_clock(base(), due + H)),
        vec![1],
        "re-escalation needs reEscalateAfter to pass"
    );
    assert_eq!(levels(&at_clock(base(), due + H + 1)), vec![1, 2]);
    let o = at_clock(base(), due + 5 * H);
    assert_eq!(levels(&o), vec![1, 2, 3], "at most level 3");
    let w = o
        .rows
        .values()
        .find_map(|r| {
            if let Row::Workflow(w) = r {
                Some(w.clone())
            } else {
                None
            }
        })
        .unwrap();
    assert_eq!(w.escalation_level, 3);
    // A task completed after the escalation answers it: no level 2.
    let mut answered = base();
    answered.push(task(
        "TASK_COMPLETED",
        "t1",
        "w1",
        "triage",
        1,
        due + 30 * MIN,
    ));
    assert_eq!(levels(&at_clock(answered, due + 5 * H)), vec![1]);
}

#[test]
fn timers_do_not_apply_to_finished_workflows() {
    let mut evs = base();
    evs.push(wf_event("w1", "WORKFLOW_COMPLETED", T0 + MIN));
    let o = at_clock(evs, T0 + 10 * H);
    for ty in ["TASK_SLA_BREACHED", "TASK_STALE", "WORKFLOW_ESCALATED"] {
        assert_eq!(count(&o, ty), 0, "{ty} in a completed workflow");
    }
}

#[test]
fn event_clock_results_do_not_depend_on_batching_or_workers() {
    let mut evs = base();
    evs.push(task("TASK_STARTED", "t1", "w1", "triage", 1, T0 + 20 * MIN));
    evs.push(task(
        "TASK_COMPLETED",
        "t1",
        "w1",
        "triage",
        1,
        T0 + 30 * MIN,
    ));
    evs.push(task(
        "TASK_CREATED",
        "t2",
        "w1",
        "blood-cultures",
        1,
        T0 + 31 * MIN,
    ));
    let clock = T0 + 6 * H;
    let a = at_clock(evs.clone(), clock);
    // Same records, batched: each at the next 10-minute boundary (never earlier than its eventTime).
    let mut feed: Vec<_> = evs
        .into_iter()
        .map(|e| {
            let t = e.event_time().unwrap_or(T0 - 1);
            (t.div_ceil(10 * MIN) * 10 * MIN, e)
        })
        .collect();
    feed.sort_by_key(|(t, _)| *t);
    let b = run(Run::new(3, feed, clock + 1));
    assert_eq!(a.rows, b.rows);
    let timer_ids = |o: &Outcome| {
        let mut v: Vec<String> = o
            .records
            .iter()
            .filter(|r| {
                ["TASK_SLA_BREACHED", "TASK_ESCALATED", "TASK_STALE"]
                    .contains(&r.event_type.as_str())
                    || r.event_type == "WORKFLOW_ESCALATED"
            })
            .map(|r| r.event_id.clone())
            .collect();
        v.sort();
        v
    };
    assert_eq!(timer_ids(&a), timer_ids(&b));
    assert!(!timer_ids(&a).is_empty());
}

#[test]
fn a_breach_is_published_once_even_when_the_task_changes_after_it() {
    // The clock breaches triage at dueAt + 1; 20 minutes later the task starts (late) with a
    // taskName it did not have: the breach's facts change, its events must not be re-derived
    // with new contents (published twice with the same eventIds, when the two instants fall in
    // different flushes).
    let due = T0 + 15 * MIN;
    let started = dec(
        hmis_dataflows::events::InputTopic::Tasks,
        Some("t1"),
        Some(
            serde_json::json!({"eventId": "start-t1", "eventType": "TASK_STARTED",
            "eventTime": iso(due + 20 * MIN), "taskInstanceId": "t1", "workflowInstanceId": "w1",
            "patientId": "p-1", "taskDefId": "triage", "taskName": "Triage (renamed)", "attempt": 1}),
        ),
    );
    let mut events = base();
    events.push(started);
    // One flush per instant: the harness flushes whenever the frontier advances.
    let o = at_clock(events, due + 30 * MIN);
    let published = breach_events_published(&o);
    assert_eq!(published.len(), 3, "{published:#?}");
    let breach: serde_json::Value = serde_json::from_str(&published[0].payload).unwrap();
    assert_eq!(breach["minutesOverdue"], 0, "the clock's breach stands");
}

#[test]
fn a_breach_stays_when_the_workflow_closes_and_the_task_ends_late_afterwards() {
    // The clock breaches triage at dueAt + 1; the workflow fails 5 minutes later (the timer's
    // scope ends while the task is open); the task fails 5 minutes after that, late. The
    // breach must not vanish with the scope and appear again from the late event: its
    // eventIds would be published twice (found by the kill -9 fault test's reference run).
    let due = T0 + 15 * MIN;
    let mut events = base();
    events.push(wf_event("w1", "WORKFLOW_FAILED", due + 5 * MIN));
    events.push(task("TASK_FAILED", "t1", "w1", "triage", 1, due + 10 * MIN));
    let o = at_clock(events, due + 30 * MIN);
    let published = breach_events_published(&o);
    assert_eq!(published.len(), 3, "{published:#?}");
    let breach = json(&o, "TASK_SLA_BREACHED");
    assert_eq!(breach["minutesOverdue"], 0, "the clock's breach stands");
    let task = o
        .rows
        .values()
        .find_map(|r| match r {
            Row::Task(t) if t.task_instance_id == "t1" => Some(t),
            _ => None,
        })
        .expect("task row");
    assert!(task.sla_breached, "the task row keeps its breach: {task:?}");
}

#[test]
fn an_escalation_the_clock_fired_is_not_published_again_when_its_cause_comes_back() {
    // As `clock = wall` reading a backlog: records stamped by arrival, long after their
    // eventTimes. At C the clock fires triage's breach and both re-escalation levels; at C+1
    // triage's completion (dated 30 minutes after dueAt) answers them by eventTime, so their
    // facts vanish; at C+2 a second task, late too, is a new cause for the same levels. The
    // same eventIds must not be published again (found by the wall-clock kill -9 test).
    let c = T0 + 10 * H;
    let due = T0 + 15 * MIN;
    let feed = vec![
        (c - 1, def(sepsis(3))),
        (c, wf_started("w1", "sepsis-bundle", 3, T0)),
        (c, task("TASK_CREATED", "t1", "w1", "triage", 1, T0)),
        (
            c + 1,
            task("TASK_COMPLETED", "t1", "w1", "triage", 1, due + 30 * MIN),
        ),
        (
            c + 2,
            task(
                "TASK_CREATED",
                "t2",
                "w1",
                "blood-cultures",
                1,
                T0 + 40 * MIN,
            ),
        ),
    ];
    let mut r = Run::new(2, feed, c + 3);
    r.settle_each_time = true;
    let o = run(r);
    let mut ids: Vec<String> = o
        .batches
        .iter()
        .flat_map(|b| &b.records)
        .filter(|r| r.event_type == "WORKFLOW_ESCALATED")
        .map(|r| r.event_id.clone())
        .collect();
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(n, ids.len(), "an eventId published twice");
    // Level 1 twice (triage's and blood-cultures' breaches), levels 2 and 3 once.
    assert_eq!(n, 4, "{ids:#?}");
}

// ---------------------------------------------------------------------------------------------
// Rows follow the published events (issue 11): a row field a timer set stays set for the life
// of its owner, also when the timer's cause leaves scope afterwards.

fn workflow_row(o: &Outcome, wid: &str) -> hmis_dataflows::output::WorkflowRow {
    o.rows
        .values()
        .find_map(|r| match r {
            Row::Workflow(w) if w.workflow_instance_id == wid => Some(w.clone()),
            _ => None,
        })
        .expect("workflow row")
}

fn task_row(o: &Outcome, tid: &str) -> hmis_dataflows::output::TaskRow {
    o.rows
        .values()
        .find_map(|r| match r {
            Row::Task(t) if t.task_instance_id == tid => Some(t.clone()),
            _ => None,
        })
        .expect("task row")
}

/// `(escalationLevel, escalationReason)` of every WORKFLOW_ESCALATED published, sorted.
fn escalations(o: &Outcome) -> Vec<(i64, String)> {
    let mut v: Vec<(i64, String)> = o
        .of_type("WORKFLOW_ESCALATED")
        .iter()
        .map(|r| {
            let v: serde_json::Value = serde_json::from_str(&r.payload).unwrap();
            (
                v["escalationLevel"].as_i64().unwrap(),
                v["escalationReason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn escalation_level_stays_at_the_highest_level_published_after_the_workflow_completes() {
    // Event clock. A one-task template: triage (slaMinutes 15) is the only required task.
    // The clock breaches triage at dueAt + 1 (level 1); nothing completes within the hour, so
    // level 2 (UNANSWERED_ESCALATION) is published at dueAt + 1 h + 1; then triage completes,
    // which answers level 3 and completes the workflow. The row must say level 2, as published.
    let due = T0 + 15 * MIN;
    let tpl = serde_json::json!({"templateId": "one", "version": 1, "tasks": [
        {"taskDefId": "triage", "name": "Triage", "slaMinutes": 15, "escalateTo": "CHARGE_NURSE"}
    ]});
    let events = vec![
        def(tpl),
        wf_started("w1", "one", 1, T0),
        task("TASK_CREATED", "t1", "w1", "triage", 1, T0),
        task(
            "TASK_COMPLETED",
            "t1",
            "w1",
            "triage",
            1,
            due + H + 10 * MIN,
        ),
    ];
    let mut feed: Vec<_> = events
        .into_iter()
        .map(|e| (e.event_time().unwrap_or(T0 - 1), e))
        .collect();
    feed.sort_by_key(|(t, _)| *t);
    for workers in [1, 3] {
        for settle in [false, true] {
            let mut r = Run::new(workers, feed.clone(), due + 3 * H);
            r.settle_each_time = settle;
            let o = run(r);
            let ctx = format!("{workers} workers, settle {settle}");
            assert_eq!(
                escalations(&o),
                vec![
                    (1, "SLA_BREACH:triage".to_string()),
                    (2, "UNANSWERED_ESCALATION".to_string())
                ],
                "{ctx}"
            );
            let w = workflow_row(&o, "w1");
            assert_eq!(w.status, "COMPLETED", "{ctx}");
            assert!(w.is_escalated, "{ctx}");
            assert_eq!(
                (w.escalation_level, w.escalation_reason.as_deref()),
                (2, Some("SLA_BREACH:triage")),
                "{ctx}: the highest level published"
            );
        }
    }
}

#[test]
fn wall_clock_breach_flags_stay_when_an_on_time_event_arrives_after_the_breach_fired() {
    // As `clock = wall`: records stamped at arrival. The clock breaches triage at dueAt + 1
    // (TASK_SLA_BREACHED, TASK_ESCALATED, WORKFLOW_ESCALATED published); 5 minutes later the
    // triage completion arrives, dated 1 minute *before* dueAt. By its events the attempt was
    // on time, but the breach was published: the task and workflow rows keep its flags.
    let due = T0 + 15 * MIN;
    let feed = vec![
        (T0 - 1, def(sepsis(3))),
        (T0, wf_started("w1", "sepsis-bundle", 3, T0)),
        (T0, task("TASK_CREATED", "t1", "w1", "triage", 1, T0)),
        (
            due + 5 * MIN,
            task("TASK_COMPLETED", "t1", "w1", "triage", 1, due - MIN),
        ),
    ];
    for workers in [1, 3] {
        let mut r = Run::new(workers, feed.clone(), due + 30 * MIN);
        r.settle_each_time = true;
        r.config.lifecycle.grace_from_event_time = false;
        let o = run(r);
        assert_eq!(count(&o, "TASK_SLA_BREACHED"), 1, "{workers} workers");
        assert_eq!(count(&o, "TASK_ESCALATED"), 1);
        let t = task_row(&o, "t1");
        assert_eq!(t.status, "COMPLETED");
        assert!(
            t.sla_breached && t.is_escalated && t.escalated_to.as_deref() == Some("CHARGE_NURSE"),
            "{workers} workers: the task row contradicts the published breach: {t:?}"
        );
        let w = workflow_row(&o, "w1");
        assert!(w.is_escalated, "{workers} workers: {w:?}");
        assert_eq!(
            (w.escalation_level, w.escalation_reason.as_deref()),
            (1, Some("SLA_BREACH:triage")),
            "{workers} workers"
        );
        // The breach row stays too (it always did).
        assert_eq!(
            o.rows
                .values()
                .filter(|r| matches!(r, Row::SlaBreach(_)))
                .count(),
            1
        );
    }
}

#[test]
fn wall_clock_re_escalation_level_stays_when_an_answer_dated_before_it_arrives_later() {
    // As `clock = wall`: the clock breaches triage (level 1) and, an hour later, re-escalates
    // (level 2); then blood-cultures' creation and triage's completion arrive, the completion
    // dated 30 minutes after dueAt: by eventTime the escalation was answered before level 2's
    // deadline, so the level-2 candidate is retracted. Level 2 was published: the row keeps it.
    let due = T0 + 15 * MIN;
    let feed = vec![
        (T0 - 1, def(sepsis(3))),
        (T0, wf_started("w1", "sepsis-bundle", 3, T0)),
        (T0, task("TASK_CREATED", "t1", "w1", "triage", 1, T0)),
        (
            due + H + 10 * MIN,
            task("TASK_COMPLETED", "t1", "w1", "triage", 1, due + 30 * MIN),
        ),
    ];
    let mut r = Run::new(2, feed, due + 2 * H);
    r.settle_each_time = true;
    r.config.lifecycle.grace_from_event_time = false;
    let o = run(r);
    assert_eq!(
        escalations(&o),
        vec![
            (1, "SLA_BREACH:triage".to_string()),
            (2, "UNANSWERED_ESCALATION".to_string())
        ]
    );
    let w = workflow_row(&o, "w1");
    assert_eq!(w.escalation_level, 2, "{w:?}");
}
