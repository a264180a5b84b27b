//! # hmis-dataflows: the rules of hmis-flow as a timely/differential dataflow
//!
//! This crate holds *all* rule logic and *no* I/O: no Kafka, no PostgreSQL, no tokio.
//! It takes collections of decoded input events and returns one collection of
//! [`Emit`]s — relational rows, derived events, dead letters and input offsets — whose
//! changes the runtime gathers per pipeline-clock interval ([`gather`]) into
//! [`output::FlushBatch`]es for the sink.
//!
//! ## Layout
//! - [`events`]: input types and `decode(bytes) -> Result<Event, Rejection>`.
//! - [`tasks`]: task state. [`orders`]: the order lifecycle. [`workflows`]: readiness,
//!   progress, completion, failure. [`derived`]: derived event types, ids, JSON.
//! - [`gather`]: the operator that turns timestamped changes into flush batches.
//!
//! ## Time
//! The dataflow's timestamp is the pipeline clock in milliseconds (contract §8): in
//! `clock = event` a record is stamped with its own eventTime (so results do not depend on
//! how partitions interleave or batch), in `clock = wall` with the wall clock at ingestion.
//! A pipeline time is *complete* when the input frontier has passed it; only complete
//! times are flushed.

pub mod derived;
pub mod engine;
pub mod events;
pub mod gather;
pub mod harness;
pub mod lifecycle;
pub mod model;
pub mod orders;
pub mod output;
pub mod rules;
pub mod system;
pub mod tasks;
pub mod timers;
pub mod workflows;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use differential_dataflow::VecCollection;

use events::{DefinitionRecord, OrderEvent, SystemEvent, TaskEvent, Template, WorkflowEvent};
use model::WfStatus;
use orders::{Eligibility, OrderStates};
use output::{DeadLetter, OffsetMark, OutRecord, Row};
use tasks::TaskStates;
use workflows::{fold_workflow, OrderFact, WfFact, WorkflowRules};

/// The times a restart replays committed history at, below the committed frontier `f`:
/// consecutive milliseconds, one per poll, from `f - RESTORE_SPAN_MS` up to at most
/// `f - 1 - SIGNAL_DELAY_MS` (further polls share that last time), so that every signal the
/// replay causes reaches the lifecycle trackers below `f`, where its decisions are due.
/// Returns (first, last); both 0 when `f` is too small to hold a replay.
pub fn restore_times(f: u64) -> (u64, u64) {
    let last = f.saturating_sub(1 + lifecycle::SIGNAL_DELAY_MS);
    (f.saturating_sub(RESTORE_SPAN_MS).min(last), last)
}

/// See [`restore_times`]: 35 minutes, 25 of them distinct replay times.
pub const RESTORE_SPAN_MS: u64 = 1 << 21;

/// Rule parameters (contract defaults).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RulesConfig {
    /// Who may authorize which order type.
    pub eligibility: Eligibility,
    /// Fulfillment limits, auto-activated types, the orders topic name (for dead letters).
    pub orders: orders::OrderRules,
    /// Stale-task and re-escalation durations.
    pub time: workflows::TimeRules,
    /// Unknown-reference grace, retirement of finished work.
    pub lifecycle: lifecycle::LifecycleRules,
    /// Metric thresholds of the system-event rules (contract §6).
    pub system: system::SystemRules,
}

/// Everything the dataflow emits, as one collection.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Emit {
    /// A row state; `+1` when it becomes current, `-1` when it stops being current.
    Row(Arc<Row>),
    /// A record to publish, with its ordering key (workflow, type rank) within one instant.
    /// Boxed, as the dead letter: an `Emit` is moved through the exchange, the output
    /// buffers and the gather's sort; by value these two made every update ~200 bytes.
    Record((model::Str, u8), Box<OutRecord>),
    /// A rejected input record.
    Dead(Box<DeadLetter>),
    /// The input position after a record.
    Offset(OffsetMark),
    /// The state of a workflow or order was retired ([`lifecycle`]) at this time.
    Retired(output::Owner),
}

impl Emit {
    /// A record to publish, with its ordering key.
    pub fn record(key: (model::Str, u8), record: OutRecord) -> Emit {
        Emit::Record(key, Box::new(record))
    }

    /// A rejected input record.
    pub fn dead(dead_letter: DeadLetter) -> Emit {
        Emit::Dead(Box::new(dead_letter))
    }

    /// A row state (shared: the keyed core keeps the rows it emitted and retracts them
    /// later without copying them).
    pub fn row(row: Row) -> Emit {
        Emit::Row(Arc::new(row))
    }
}

/// The dataflow's input collections.
pub struct Inputs<'s> {
    pub definitions: VecCollection<'s, u64, DefinitionRecord>,
    pub tasks: VecCollection<'s, u64, TaskEvent>,
    pub workflows: VecCollection<'s, u64, WorkflowEvent>,
    pub orders: VecCollection<'s, u64, OrderEvent>,
    pub system: VecCollection<'s, u64, SystemEvent>,
    /// Dead letters and offset marks from the source, passed through to the sink.
    pub side: VecCollection<'s, u64, Emit>,
}

/// Latest valid template per (templateId, version): the record with the highest position wins,
/// a tombstone deletes.
pub fn templates<'s>(
    definitions: VecCollection<'s, u64, DefinitionRecord>,
) -> VecCollection<'s, u64, ((String, i64), Arc<Template>)> {
    definitions
        .map(|d| ((d.template_id.to_string(), d.version), d))
        .reduce_named("Templates", |_key, input, output| {
            if let Some((latest, _)) = input.iter().max_by_key(|(d, _)| d.pos) {
                if let Some(t) = &latest.template {
                    output.push((t.clone(), 1));
                }
            }
        })
}

/// Builds the rules over `inputs`; returns everything to emit.
pub fn build<'s>(inputs: Inputs<'s>, cfg: &RulesConfig) -> VecCollection<'s, u64, Emit> {
    use lifecycle::{Signal, WfInput};

    let templates = templates(inputs.definitions);

    // Task and workflow events, tracked per workflow instance; order events per order.
    let (wf_live, wf_life, wf_loop) = lifecycle::track(
        inputs
            .tasks
            .map(|e| WfInput::Task(Arc::new(e)))
            .concat(inputs.workflows.map(|e| WfInput::Workflow(Arc::new(e)))),
        &cfg.lifecycle,
        "WorkflowLifecycle",
    );
    let (tasks, workflows) = lifecycle::split(wf_live);
    let (orders, order_life, order_loop) = lifecycle::track(
        inputs.orders.map(Arc::new),
        &cfg.lifecycle,
        "OrderLifecycle",
    );

    let wf_states = workflows
        .map(|e| (e.workflow_instance_id.to_string(), e))
        .reduce_named("WorkflowState", |wid, input, output| {
            let events: Vec<&WorkflowEvent> = input.iter().map(|(e, _)| &***e).collect();
            output.push((Arc::new(fold_workflow(wid, &events)), 1));
        });

    let pinned = wf_states
        .clone()
        .flat_map(|(wid, st)| {
            st.started
                .as_ref()
                .map(|s| ((s.template_id.to_string(), s.template_version), wid))
        })
        .join_map(templates, |_key, wid, t| {
            (wid.clone(), WfFact::Template(t.clone()))
        });

    let task_facts = tasks
        .task_states()
        .map(|(_, s)| (s.workflow_instance_id.to_string(), WfFact::Task(s)));

    let order_states = orders.order_states(Arc::new(cfg.eligibility.clone()));
    let order_facts = order_states
        .clone()
        .flat_map(|(_, st)| OrderFact::of(&st).map(|(w, f)| (w.to_string(), WfFact::Order(f))));

    let facts = wf_states
        .map(|(wid, st)| (wid, WfFact::State(st)))
        .concat(pinned.clone())
        .concat(task_facts)
        .concat(order_facts);

    let wf_out = facts.workflow_rules(cfg.time.clone());

    // What the lifecycle trackers need to know: which workflows are known, which closed.
    let known = pinned.map(|(wid, _)| Signal::Known(wid));
    let wf_parts = workflows::split(wf_out);
    let closed = wf_parts.workflow_base.clone().flat_map(|(wid, (row, _))| {
        (row.status != WfStatus::Active)
            .then(|| Signal::Closed(wid, row.completed_at.unwrap_or_default()))
    });
    wf_loop.connect(known.concat(closed));
    let order_rules_cfg = cfg.orders.clone();
    order_loop.connect(order_states.clone().flat_map(move |(oid, st)| {
        orders::retirable(&st, &order_rules_cfg).map(|at| Signal::Closed(oid, at))
    }));

    // Retired workflows and orders: the time rules forget which of their keys appeared.
    let retired = wf_life
        .clone()
        .concat(order_life.clone())
        .flat_map(|e| match e {
            Emit::Retired(o) => Some(o),
            _ => None,
        });
    timers::time_rules(wf_parts, &retired, cfg.lifecycle.decide_from)
        .concat(inputs.side)
        .concat(wf_life)
        .concat(order_life)
        .concat(orders::order_rules(
            order_states,
            &cfg.orders,
            &retired,
            cfg.lifecycle.decide_from,
        ))
        .concat(system::system_rules(inputs.system, &cfg.system))
}

/// The input handles matching [`Inputs`]: what a source (the Kafka runtime, a test, a
/// benchmark) feeds. Every worker owns one; all must advance together (or be dropped).
pub struct Sessions {
    pub definitions: differential_dataflow::input::InputSession<u64, DefinitionRecord, isize>,
    pub tasks: differential_dataflow::input::InputSession<u64, TaskEvent, isize>,
    pub workflows: differential_dataflow::input::InputSession<u64, WorkflowEvent, isize>,
    pub orders: differential_dataflow::input::InputSession<u64, OrderEvent, isize>,
    pub system: differential_dataflow::input::InputSession<u64, SystemEvent, isize>,
    pub side: differential_dataflow::input::InputSession<u64, Emit, isize>,
}

impl Sessions {
    /// Creates the sessions and their collections in `scope`.
    pub fn new<'s>(scope: timely::dataflow::Scope<'s, u64>) -> (Sessions, Inputs<'s>) {
        use differential_dataflow::input::Input;
        let (definitions, d) = scope.new_collection();
        let (tasks, t) = scope.new_collection();
        let (workflows, w) = scope.new_collection();
        let (orders, o) = scope.new_collection();
        let (system, y) = scope.new_collection();
        let (side, s) = scope.new_collection();
        (
            Sessions {
                definitions,
                tasks,
                workflows,
                orders,
                system,
                side,
            },
            Inputs {
                definitions: d,
                tasks: t,
                workflows: w,
                orders: o,
                system: y,
                side: s,
            },
        )
    }

    /// Inserts a decoded event at pipeline time `time` (at or after the sessions' time).
    pub fn insert(&mut self, event: events::Event, time: u64) {
        match event {
            events::Event::Definition(d) => self.definitions.update_at(d, time, 1),
            events::Event::Task(e) => self.tasks.update_at(e, time, 1),
            events::Event::Workflow(e) => self.workflows.update_at(e, time, 1),
            events::Event::Order(e) => self.orders.update_at(e, time, 1),
            events::Event::System(e) => self.system.update_at(e, time, 1),
        }
    }

    /// Inserts a pass-through item (dead letter, offset mark).
    pub fn emit(&mut self, item: Emit, time: u64) {
        self.side.update_at(item, time, 1);
    }

    /// The sessions' current time.
    pub fn time(&self) -> u64 {
        *self.side.time()
    }

    /// Advances every session to `time` and flushes.
    pub fn advance_to(&mut self, time: u64) {
        self.definitions.advance_to(time);
        self.tasks.advance_to(time);
        self.workflows.advance_to(time);
        self.orders.advance_to(time);
        self.system.advance_to(time);
        self.side.advance_to(time);
        self.flush();
    }

    pub fn flush(&mut self) {
        self.definitions.flush();
        self.tasks.flush();
        self.workflows.flush();
        self.orders.flush();
        self.system.flush();
        self.side.flush();
    }
}
