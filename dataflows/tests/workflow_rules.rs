//! The task and workflow rules of contract §4, each shown on a small scenario.

mod common;

use common::*;
use hmis_dataflows::harness::{run, Outcome, Run};
use hmis_dataflows::output::Row;
use serde_json::json;

fn go(workers: usize, events: Vec<hmis_dataflows::events::Event>) -> Outcome {
    // Definitions carry no eventTime: stamp them at T0.
    let feed: Vec<_> = events
        .into_iter()
        .map(|e| (e.event_time().unwrap_or(T0), e))
        .collect();
    let mut sorted = feed.clone();
    sorted.sort_by_key(|(t, _)| *t);
    let end = sorted.last().map(|(t, _)| t + 1).unwrap_or(T0 + 1);
    run(Run::new(workers, sorted, end))
}

fn ready(o: &Outcome) -> Vec<(String, String)> {
    o.rows
        .values()
        .filter_map(|r| match r {
            Row::Readiness(r) => Some((
                r.workflow_instance_id.to_string(),
                r.task_def_id.to_string(),
            )),
            _ => None,
        })
        .collect()
}

fn workflow(o: &Outcome, wid: &str) -> hmis_dataflows::output::WorkflowRow {
    o.rows
        .values()
        .find_map(|r| match r {
            Row::Workflow(w) if w.workflow_instance_id == wid => Some(w.clone()),
            _ => None,
        })
        .expect("workflow row")
}

#[test]
fn start_makes_the_first_task_ready_and_not_the_failure_task() {
    let o = go(
        1,
        vec![
            def(sepsis(3)),
            wf_started("w1", "sepsis-bundle", 3, T0 + MIN),
        ],
    );
    assert_eq!(ready(&o), vec![("w1".into(), "triage".into())]);
    assert_eq!(o.of_type("TASK_READY").len(), 1);
    let w = workflow(&o, "w1");
    assert_eq!((w.status.as_str(), w.progress_percentage), ("ACTIVE", 0));
}

#[test]
fn chain_advances_and_progress_counts_required_tasks() {
    let o = go(
        1,
        vec![
            def(sepsis(3)),
            wf_started("w1", "sepsis-bundle", 3, T0 + MIN),
            task("TASK_CREATED", "t1", "w1", "triage", 1, T0 + 2 * MIN),
            task("TASK_STARTED", "t1", "w1", "triage", 1, T0 + 3 * MIN),
            task("TASK_COMPLETED", "t1", "w1", "triage", 1, T0 + 4 * MIN),
        ],
    );
    assert_eq!(ready(&o), vec![("w1".into(), "blood-cultures".into())]);
    // 1 of 3 required definitions (manual-review is optional).
    assert_eq!(workflow(&o, "w1").progress_percentage, 33);
    let progress: Vec<_> = o
        .of_type("WORKFLOW_PROGRESS")
        .iter()
        .map(|r| r.payload.clone())
        .collect();
    assert_eq!(
        progress.len(),
        2,
        "0% at start, 33% after triage: {progress:?}"
    );
}

#[test]
fn pending_task_is_still_ready_in_progress_is_not() {
    let o = go(
        1,
        vec![
            def(sepsis(3)),
            wf_started("w1", "sepsis-bundle", 3, T0),
            task("TASK_CREATED", "t1", "w1", "triage", 1, T0 + MIN),
        ],
    );
    assert_eq!(ready(&o), vec![("w1".into(), "triage".into())]);
    let o = go(
        1,
        vec![
            def(sepsis(3)),
            wf_started("w1", "sepsis-bundle", 3, T0),
            task("TASK_STARTED", "t1", "w1", "triage", 1, T0 + MIN),
        ],
    );
    assert!(ready(&o).is_empty());
}

#[test]
fn blocking_order_blocks_then_releases() {
    let mut evs = vec![
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
    let o = go(1, evs.clone());
    assert!(
        ready(&o).is_empty(),
        "antibiotics is blocked by the open LAB_TEST"
    );
    assert_eq!(o.of_type("TASK_BLOCKED").len(), 1);
    evs.push(order(
        "ORDER_AUTHORIZED",
        "AUTHORIZED",
        "o1",
        "w1",
        "LAB_TEST",
        T0 + 4 * MIN,
        json!({"actorRole": "PHYSICIAN"}),
    ));
    evs.push(order(
        "ORDER_ACTIVATED",
        "ACTIVATED",
        "o1",
        "w1",
        "LAB_TEST",
        T0 + 5 * MIN,
        json!({}),
    ));
    evs.push(order(
        "ORDER_RESULTED",
        "RESULTED",
        "o1",
        "w1",
        "LAB_TEST",
        T0 + 6 * MIN,
        json!({}),
    ));
    let o = go(1, evs);
    assert_eq!(ready(&o), vec![("w1".into(), "antibiotics".into())]);
}

#[test]
fn completion_once_with_duration() {
    let o = go(
        2,
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
            task(
                "TASK_COMPLETED",
                "t3",
                "w1",
                "antibiotics",
                1,
                T0 + 10 * MIN,
            ),
        ],
    );
    let w = workflow(&o, "w1");
    assert_eq!(
        (w.status.as_str(), w.progress_percentage),
        ("COMPLETED", 100)
    );
    let done = o.of_type("WORKFLOW_COMPLETED");
    assert_eq!(done.len(), 1);
    let v: serde_json::Value = serde_json::from_str(&done[0].payload).unwrap();
    assert_eq!(v["durationSeconds"], 600);
    assert!(ready(&o).is_empty(), "no readiness in a completed workflow");
}

#[test]
fn failure_with_retries_then_failure_task_then_workflow_failure() {
    let base = vec![
        def(sepsis(3)),
        wf_started("w1", "sepsis-bundle", 3, T0),
        task("TASK_COMPLETED", "t1", "w1", "triage", 1, T0 + MIN),
        task("TASK_FAILED", "t2", "w1", "blood-cultures", 1, T0 + 2 * MIN),
    ];
    let o = go(1, base.clone());
    assert_eq!(o.of_type("TASK_RETRY_SCHEDULED").len(), 1);
    assert_eq!(
        ready(&o),
        vec![("w1".into(), "blood-cultures".into())],
        "ready for its retry"
    );
    let mut evs = base;
    evs.push(task(
        "TASK_CREATED",
        "t2",
        "w1",
        "blood-cultures",
        2,
        T0 + 3 * MIN,
    ));
    evs.push(task(
        "TASK_FAILED",
        "t2",
        "w1",
        "blood-cultures",
        2,
        T0 + 4 * MIN,
    ));
    evs.push(task(
        "TASK_CREATED",
        "t2",
        "w1",
        "blood-cultures",
        3,
        T0 + 5 * MIN,
    ));
    evs.push(task(
        "TASK_FAILED",
        "t2",
        "w1",
        "blood-cultures",
        3,
        T0 + 6 * MIN,
    ));
    let o = go(1, evs);
    assert_eq!(
        o.of_type("TASK_RETRY_SCHEDULED").len(),
        2,
        "attempts 1 and 2 had retries left"
    );
    assert_eq!(ready(&o), vec![("w1".into(), "manual-review".into())]);
    assert_eq!(workflow(&o, "w1").status, "ACTIVE");
}

#[test]
fn failure_without_failure_task_fails_the_workflow() {
    let o = go(
        1,
        vec![
            def(sepsis(3)),
            wf_started("w1", "sepsis-bundle", 3, T0),
            task("TASK_FAILED", "t1", "w1", "triage", 1, T0 + MIN),
        ],
    );
    assert_eq!(workflow(&o, "w1").status, "FAILED");
    assert_eq!(o.of_type("WORKFLOW_FAILED").len(), 1);
    let esc = o.of_type("WORKFLOW_ESCALATED");
    assert_eq!(esc.len(), 1);
    assert!(esc[0].payload.contains("TASK_FAILED:triage"));
    assert!(ready(&o).is_empty());
}

#[test]
fn out_of_order_arrival_gives_the_same_result() {
    let evs = vec![
        def(sepsis(3)),
        wf_started("w1", "sepsis-bundle", 3, T0),
        task("TASK_COMPLETED", "t1", "w1", "triage", 1, T0 + MIN),
    ];
    let a = go(1, evs.clone());
    // Tasks before the workflow start and the definition, all at one time.
    let mut rev = evs.clone();
    rev.reverse();
    let feed = rev.into_iter().map(|e| (T0 + 5 * MIN, e)).collect();
    let b = run(Run::new(3, feed, T0 + 5 * MIN + 1));
    assert_eq!(a.rows, b.rows);
}

#[test]
fn template_version_is_pinned() {
    let mut v4 = sepsis(4);
    v4["tasks"][0]["nextTaskId"] = json!(null);
    let o = go(
        1,
        vec![
            def(sepsis(3)),
            def(v4),
            wf_started("w1", "sepsis-bundle", 3, T0),
            task("TASK_COMPLETED", "t1", "w1", "triage", 1, T0 + MIN),
        ],
    );
    assert_eq!(ready(&o), vec![("w1".into(), "blood-cultures".into())]);
}

#[test]
fn duplicate_event_ids_change_nothing() {
    let e = task("TASK_COMPLETED", "t1", "w1", "triage", 1, T0 + MIN);
    let a = go(
        1,
        vec![
            def(sepsis(3)),
            wf_started("w1", "sepsis-bundle", 3, T0),
            e.clone(),
        ],
    );
    let b = go(
        1,
        vec![
            def(sepsis(3)),
            wf_started("w1", "sepsis-bundle", 3, T0),
            e.clone(),
            e,
        ],
    );
    assert_eq!(a.rows, b.rows);
    assert_eq!(a.records, b.records);
}
