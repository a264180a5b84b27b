//! The keyed core (docs/engine.md, steps 1 and 2): what the runtime and the in-memory
//! harness run ([`Core::from_env`]). The earlier differential core ([`crate::build`]) is kept
//! as a second implementation the keyed one is checked against until step 3.
//!
//! ```text
//!  order events ──exchange(orderId)──► OrderOp ──► rows, events, alerts, dead letters ─┐
//!                                         │ OrderFact (workflow, ±) at the same stamp  │
//!  task + workflow events ──exchange(workflowInstanceId)──► WorkflowOp ──► rows, events ┤
//!  definitions ─────────broadcast─────────────────────────────┘                        │
//!  system events ─► system::system_rules (unchanged) ──────────────────────────────────┤
//!  side (dead letters, offsets) ───────────────────────────────────────────────────────┴► Emit
//! ```
//!
//! - [`keyed`]: the generic operator (stamp-ordered application, timers, one capability).
//! - [`order_op`], [`workflow_op`]: today's pure rule functions (`fold_*`, `evaluate*`)
//!   driven per key and stamp; outputs diffed against the key's previous ones.
//!
//! - [`changes`]: a step's outputs as `±1` changes against its previous ones; a replaced
//!   row as its `+new` only.
//! - [`life`]: the lifecycle as state of the key (unknown references after the grace,
//!   retirement, tombstones).
//!
//! [`build_keyed`] has [`crate::build`]'s signature and output; the differential test
//! `dataflows/tests/engine_parity.rs` compares the two.

pub(crate) mod changes;
pub mod keyed;
pub(crate) mod life;
pub mod order_op;
pub(crate) mod vec_map;
pub mod workflow_op;

use std::sync::Arc;

use differential_dataflow::{AsCollection, VecCollection};
use timely::dataflow::operators::core::OkErr;
use timely::dataflow::operators::vec::Map as _;
use timely::dataflow::operators::Concat as _;

use crate::harness::{Outcome, Run};
use crate::{Emit, Inputs, RulesConfig};
use order_op::OrderLogic;
use workflow_op::{WfRec, WorkflowLogic};

/// The rules on the keyed core: same inputs and output as [`crate::build`].
pub fn build_keyed<'s>(inputs: Inputs<'s>, cfg: &RulesConfig) -> VecCollection<'s, u64, Emit> {
    let scope = inputs.orders.scope();
    let life = cfg.lifecycle.clone();
    let (elig, order_rules) = (cfg.eligibility.clone(), cfg.orders.clone());
    let orders = keyed::keyed(
        inputs.orders.map(Arc::new).inner,
        timely::dataflow::operators::generic::operator::empty(scope),
        "OrderOp",
        move |_| OrderLogic::new(elig, order_rules, life),
    );
    let (order_emits, facts) = orders.ok_err::<Vec<_>, _, Vec<_>, _, _>(|(o, t, d)| match o {
        Ok(e) => Ok((e, t, d)),
        Err((w, f)) => Err((WfRec::Order(w, f), t, d)),
    });
    let records = inputs
        .workflows
        .inner
        .map(|(e, t, d)| (WfRec::Workflow(Arc::new(e)), t, d))
        .concat(
            inputs
                .tasks
                .inner
                .map(|(e, t, d)| (WfRec::Task(Arc::new(e)), t, d)),
        )
        .concat(facts);
    let (rules, life) = (cfg.time.clone(), cfg.lifecycle.clone());
    let workflows = keyed::keyed(records, inputs.definitions.inner, "WorkflowOp", move |_| {
        WorkflowLogic::new(rules, life)
    });
    workflows
        .concat(order_emits)
        .as_collection()
        .concat(inputs.side)
        .concat(crate::system::system_rules(inputs.system, &cfg.system))
}

/// Which core [`run`] builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Core {
    /// [`crate::build`].
    Differential,
    /// [`build_keyed`].
    Keyed,
}

impl Core {
    /// The core named by the environment variable `HMIS_CORE` (`keyed`, the default, or
    /// `differential`): what the runtime and [`crate::harness::run`], and so every rule
    /// test, run on.
    pub fn from_env() -> Core {
        match std::env::var("HMIS_CORE").as_deref() {
            Ok("keyed") | Ok("") | Err(_) => Core::Keyed,
            Ok("differential") => Core::Differential,
            Ok(other) => panic!("HMIS_CORE={other}: expected keyed or differential"),
        }
    }

    /// Where the changes of a row come from on this core (for the gather).
    pub fn owners(self) -> crate::gather::Owners {
        match self {
            Core::Differential => crate::gather::Owners::Anywhere,
            Core::Keyed => crate::gather::Owners::Local,
        }
    }
}

/// [`crate::harness::run`] on either core (the same driver, feed and gather).
pub fn run(run: Run, core: Core) -> Outcome {
    let outcome = Arc::new(std::sync::Mutex::new(Outcome::default()));
    let shared = outcome.clone();
    run_with(run, core, move |b| shared.lock().unwrap().apply(b));
    let out = outcome.lock().unwrap().clone();
    out
}

/// Flush batches completed by a run on one of the cores.
pub type Sink = Arc<std::sync::Mutex<dyn FnMut(crate::output::FlushBatch) + Send>>;

/// The rules on `core`: [`crate::build`] or [`build_keyed`].
pub fn build_core<'s>(
    core: Core,
    inputs: crate::Inputs<'s>,
    cfg: &RulesConfig,
) -> VecCollection<'s, u64, Emit> {
    match core {
        Core::Differential => crate::build(inputs, cfg),
        Core::Keyed => build_keyed(inputs, cfg),
    }
}

/// [`run`] with the flush batches handed to `sink` (worker 0's gather) instead of applied
/// to an [`Outcome`]: `Outcome::apply` looks each record up among all published so far,
/// which dominates a long run's time.
pub fn run_with(
    run: Run,
    core: Core,
    sink: impl FnMut(crate::output::FlushBatch) + Send + 'static,
) {
    use crate::gather::Gather;
    use crate::Sessions;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;

    let shared: Sink = Arc::new(Mutex::new(sink));
    let gathered = Arc::new(AtomicU64::new(0));
    let run = Arc::new(run);
    timely::execute(timely::Config::process(run.workers.max(1)), move |worker| {
        let index = worker.index();
        let peers = worker.peers();
        let shared = shared.clone();
        let gathered = gathered.clone();
        let gathered2 = gathered.clone();
        let end = run.end;
        let mut cfg = run.config.clone();
        cfg.lifecycle.decide_from = cfg.lifecycle.decide_from.max(run.suppress_before);
        let suppress = run.suppress_before;
        let (mut sessions, probe) = worker.dataflow::<u64, _, _>(|scope| {
            let (sessions, inputs) = Sessions::new(scope);
            let emits = build_core(core, inputs, &cfg);
            let (probe, emits) = emits.probe();
            emits.gather(suppress, core.owners(), move |b| {
                if gathered2.load(Ordering::SeqCst) >= end {
                    return;
                }
                let f = b.frontier;
                (shared.lock().unwrap())(b);
                gathered2.store(f, Ordering::SeqCst);
            });
            (sessions, probe)
        });
        if run.replay_chunk == 0 {
            sessions.advance_to(run.restore_time);
            for (i, e) in run.replay.iter().enumerate() {
                if i % peers == index {
                    sessions.insert(e.clone(), run.restore_time);
                }
            }
        } else {
            // As the runtime replays: a chunk per time from restore_times(suppress_before).
            let (first, last) = crate::restore_times(run.suppress_before);
            for (c, chunk) in run.replay.chunks(run.replay_chunk).enumerate() {
                let t = (first + c as u64).min(last);
                if t > sessions.time() {
                    sessions.advance_to(t);
                    worker.step_while(|| probe.less_than(&sessions.time()));
                }
                for (i, e) in chunk.iter().enumerate() {
                    if (c * run.replay_chunk + i) % peers == index {
                        sessions.insert(e.clone(), t);
                    }
                }
            }
        }
        for (i, (t, e)) in run.feed.iter().enumerate() {
            if *t > sessions.time() {
                let before = sessions.time();
                sessions.advance_to(*t);
                worker.step();
                if run.settle_each_time {
                    let reached = |g: &AtomicU64| g.load(Ordering::SeqCst) >= *t;
                    worker.step_while(|| probe.less_than(t) || (before > 0 && !reached(&gathered)));
                }
            }
            if i % peers == index {
                sessions.insert(e.clone(), *t);
            }
        }
        sessions.advance_to(run.end);
        worker
            .step_while(|| probe.less_than(&run.end) || gathered.load(Ordering::SeqCst) < run.end);
    })
    .expect("timely workers");
}
