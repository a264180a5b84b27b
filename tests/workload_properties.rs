//! Properties of the dataflow on generated HMIS workloads (no services needed):
//! every derived eventId is emitted once within a run and across a restart at any point,
//! and a restarted run ends with the same tables as an uninterrupted one; and the one-pass
//! decoder gives what the reference decoder gives on every generated record.

use std::collections::BTreeMap;

use hmis_dataflows::events::{decode, Event, InputTopic, Pos};
use hmis_dataflows::harness::{run, Outcome, Run};
use hmis_flow::workload::{generate, WorkloadConfig};

fn events(seed: u64, workflows: usize) -> Vec<Event> {
    let recs = generate(&WorkloadConfig {
        seed,
        workflows,
        start_ms: 1_795_687_200_000,
        bad_record_ratio: 0.02,
        duplicate_ratio: 0.05,
    });
    let role = |t: &str| {
        InputTopic::ALL
            .into_iter()
            .find(|r| r.default_name() == t)
            .unwrap()
    };
    recs.iter()
        .enumerate()
        .filter_map(|(i, r)| {
            decode(
                role(r.topic),
                r.key.as_deref().map(str::as_bytes),
                Some(&r.payload),
                Pos {
                    partition: 0,
                    offset: i as i64,
                },
            )
            .ok()
        })
        .collect()
}

/// Stamps like the event clock: eventTime, never below `low` (definitions get `low`).
/// `decode` (one pass) and `decode_reference` agree on every record of generated workloads,
/// malformed records and duplicates included, and the well-formed events take the one-pass
/// path (`dataflows/tests/decode_parity.rs` covers mutations and hostile shapes).
#[test]
fn one_pass_decode_agrees_with_the_reference_on_generated_workloads() {
    use hmis_dataflows::events::{check_decoders_agree, decode_one_pass, decode_reference};
    for seed in 0..3 {
        let recs = generate(&WorkloadConfig {
            seed,
            workflows: 150,
            start_ms: 1_795_687_200_000,
            bad_record_ratio: 0.1,
            duplicate_ratio: 0.05,
        });
        let (mut accepted, mut one_pass) = (0, 0);
        for r in &recs {
            let topic = InputTopic::ALL
                .into_iter()
                .find(|t| t.default_name() == r.topic)
                .unwrap();
            let key = r.key.as_deref().map(str::as_bytes);
            check_decoders_agree(topic, key, Some(&r.payload));
            let pos = Pos::default();
            if topic != InputTopic::Definitions
                && decode_reference(topic, key, Some(&r.payload), pos).is_ok()
            {
                accepted += 1;
                one_pass +=
                    usize::from(decode_one_pass(topic, key, Some(&r.payload), pos).is_some());
            }
        }
        assert!(accepted > 1000, "seed {seed}: {accepted} events");
        assert_eq!(
            one_pass, accepted,
            "seed {seed}: every accepted event in one pass"
        );
    }
}

fn feed(evs: &[Event], low: u64) -> Vec<(u64, Event)> {
    let mut f: Vec<_> = evs
        .iter()
        .map(|e| (e.event_time().unwrap_or(low).max(low), e.clone()))
        .collect();
    f.sort_by_key(|x| x.0);
    f
}

fn emitted_ids(o: &Outcome) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for b in &o.batches {
        for r in &b.records {
            *m.entry(r.event_id.clone()).or_insert(0) += 1;
        }
    }
    m
}

#[test]
fn each_event_id_once_in_a_run_and_across_restarts() {
    for seed in 1..=12u64 {
        let evs = events(seed, 30);
        let full_feed = feed(&evs, 1);
        let end = full_feed.last().unwrap().0 + 1;
        let full = run(Run::new(2, full_feed, end));
        let ids = emitted_ids(&full);
        let twice: Vec<_> = ids.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            twice.is_empty(),
            "seed {seed}: emitted more than once in one run: {twice:?}"
        );

        for cut in [evs.len() / 3, evs.len() / 2, 2 * evs.len() / 3] {
            let (a, b) = evs.split_at(cut);
            let f1 = a.iter().filter_map(|e| e.event_time()).max().unwrap() + 1;
            let first = run(Run::new(1, feed(a, 1), f1));
            let mut second = Run::new(3, feed(b, f1), end.max(f1 + 1));
            second.replay = a.to_vec();
            second.restore_time = f1 - 1;
            second.suppress_before = f1;
            let second = run(second);
            // The tables hold run 1's rows, updated by run 2's batches.
            let mut tables = Outcome::default();
            for b in first.batches.iter().chain(second.batches.iter()) {
                tables.apply(b.clone());
            }
            let diff: Vec<_> = full
                .rows
                .iter()
                .filter(|(k, v)| tables.rows.get(*k) != Some(*v))
                .map(|(k, v)| format!("want {v:?}\n got {:?}", tables.rows.get(k)))
                .chain(
                    tables
                        .rows
                        .iter()
                        .filter(|(k, _)| !full.rows.contains_key(*k))
                        .map(|(_, v)| format!("extra {v:?}")),
                )
                .collect();
            assert!(
                diff.is_empty(),
                "seed {seed} cut {cut}: tables after a restart differ:\n{}",
                diff.join("\n")
            );
            let mut both = emitted_ids(&first);
            for (id, n) in emitted_ids(&second) {
                *both.entry(id).or_insert(0) += n;
            }
            let twice: Vec<_> = both.iter().filter(|(_, n)| **n > 1).collect();
            assert!(
                twice.is_empty(),
                "seed {seed} cut {cut}: emitted again after restart: {twice:?}"
            );
        }
    }
}
