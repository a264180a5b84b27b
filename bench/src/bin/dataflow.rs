//! Dataflow-only benchmark: the rules of `hmis-dataflows` in memory, no Kafka, no PostgreSQL.
//!
//! ```text
//!  seeded workload (hmis_flow::workload) ──decode──► events ──┬─► naive: per event, refold the workflow
//!                                         (baseline 1)         │        from all its events (baseline 2)
//!                                                              └─► timely workers: Sessions ─► core ─► gather
//!                                                                   1 and 2 workers, event and wall stamping
//!  memory: a child process per variant feeds N open tasks, reads VmHWM / VmRSS
//! ```
//!
//! Throughput is events per second from the first insert until the probe has passed the
//! last input time (every output of that time gathered into flush batches). Two ways of
//! stamping pipeline time, both as the runtime does them:
//! - `event`: each event at its own eventTime (`clock = event`: mostly one event per
//!   millisecond, so differential processes many distinct times per batch);
//! - `wall`: every event of an input batch at one time (`clock = wall` reading a backlog:
//!   a poll batch is stamped within the same millisecond or a few).
//!
//! Baselines, measured in the same run on the same events, single-threaded:
//! - `decode`: `hmis_dataflows::events::decode` alone (bytes → typed events);
//! - `naive`: the seed's per-event design: keep every event in a HashMap by workflow, and on
//!   each event refold that workflow from scratch with the same pure rule functions the
//!   dataflow uses (`fold_task`, `fold_workflow`, `fold_order`, `evaluate`, `evaluate_order`),
//!   diffing the outputs against the previous ones. It has no clock (no timers), no exchange
//!   and no gather, so it does less work than the dataflow.
//!
//! Memory: each variant runs in a fresh child process (VmHWM only grows) that feeds N
//! workflows with one open task each, in batches of 10,000, and reports (peak − before) / N
//! and (resident after − before) / N. The time rules cannot be switched off by
//! configuration, so the variants differ in what the tasks carry:
//! `pending+sla` (dueAt: SLA and stale timers), `pending` (stale timer only),
//! `in_progress+sla` (SLA timer only), `in_progress` (no timer).

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use clap::Parser;
use serde_json::{json, Value};

use hmis_bench::{
    machine_info, proc_status_bytes, process_cpu_secs, si, write_result, LoadMonitor,
};
use hmis_dataflows::engine::{build_core, Core};
use hmis_dataflows::events::{
    decode, format_time, Event, InputTopic, OrderEvent, Pos, TaskEvent, Template, WorkflowEvent,
};
use hmis_dataflows::gather::Gather;
use hmis_dataflows::model::Str;
use hmis_dataflows::orders::{evaluate_order, fold_order};
use hmis_dataflows::output::FlushBatch;
use hmis_dataflows::tasks::{dedup_by_event_id, fold_task};
use hmis_dataflows::workflows::{evaluate, fold_workflow, OrderFact, WfFact, WfOut};
use hmis_dataflows::{RulesConfig, Sessions};

/// The runtime's core, or the one `HMIS_CORE` names (`keyed`, `differential`).
fn build<'s>(
    inputs: hmis_dataflows::Inputs<'s>,
    cfg: &RulesConfig,
) -> differential_dataflow::VecCollection<'s, u64, hmis_dataflows::Emit> {
    build_core(Core::from_env(), inputs, cfg)
}
use hmis_flow::workload::{generate, WorkloadConfig, WorkloadRecord};

#[derive(Parser, Debug)]
#[command(
    about = "Dataflow-only throughput and memory of hmis-flow's rules (no Kafka, no PostgreSQL)"
)]
struct Args {
    /// Workflows in the generated workload (each yields about 10-40 events).
    #[arg(long, default_value_t = 10_000)]
    workflows: usize,
    /// Seed of the workload generator.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Events per input batch (the runtime's default poll_batch).
    #[arg(long, default_value_t = 2_000)]
    batch: usize,
    /// Worker counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    workers: Vec<usize>,
    /// Repetitions of each throughput measurement; the median is reported, all are kept.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Open tasks per memory variant (0: skip the memory measurement).
    #[arg(long, default_value_t = 100_000)]
    open_tasks: usize,
    /// Skip the throughput measurement.
    #[arg(long)]
    no_throughput: bool,
    /// Added to the result file name: bench/results/dataflow-<tag>-<date>.json.
    #[arg(long)]
    tag: Option<String>,
    /// Write the result here instead.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Finished workflows fed for the history-memory measurement (0: skip it).
    #[arg(long, default_value_t = 100_000)]
    finished_workflows: usize,
    /// Internal: measure one memory variant in this process, print its JSON on stdout.
    #[arg(long, hide = true)]
    memory_variant: Option<String>,
    /// Feed the dataflow events decoded before the measurement (as this benchmark did
    /// before session 14) instead of decoding each record inside the measured loop; the
    /// naive refold then also skips decoding.
    #[arg(long)]
    predecoded: bool,
    /// Stampings to measure, comma-separated (`event`, `wall`).
    #[arg(long, value_delimiter = ',', default_value = "event,wall", value_parser = ["event", "wall"])]
    stamps: Vec<String>,
    /// Feed as this benchmark did before session 13: every session advanced and flushed at
    /// each new eventTime (one timely message and progress update per event). The runtime
    /// inserts a poll batch at the records' own times and flushes once per poll, as the
    /// default feeding now does.
    #[arg(long)]
    flush_per_time: bool,
    /// Count the flushed batches on worker 0, inside the gather, as this benchmark did before
    /// session 19, instead of handing each batch to a counting thread (as the runtime hands
    /// it to its sink thread).
    #[arg(long)]
    count_on_worker0: bool,
    /// Wait for each batch as this benchmark did before session 19: every worker spins,
    /// stepping without pause, instead of parking when it has nothing to do (as the runtime's
    /// workers do, `step_or_park` with a short timeout), which leaves the core to the
    /// threads that have work (the gather's collapse, the other worker).
    #[arg(long)]
    spin: bool,
}

/// Steps `worker` until `done`: parked while idle (woken by messages, at most 1 ms later),
/// or spinning with `spin`.
fn step_until(worker: &mut timely::worker::Worker, spin: bool, mut done: impl FnMut() -> bool) {
    while !done() {
        if spin {
            worker.step();
        } else {
            worker.step_or_park(Some(std::time::Duration::from_millis(1)));
        }
    }
}

fn role_of(topic: &str) -> InputTopic {
    InputTopic::ALL
        .into_iter()
        .find(|r| r.default_name() == topic)
        .expect("workload topic is an input topic")
}

/// Decodes one workload record read at `pos`.
fn decode_record(r: &WorkloadRecord, pos: Pos) -> Result<Event, hmis_dataflows::events::Rejection> {
    decode(
        role_of(r.topic),
        r.key.as_deref().map(str::as_bytes),
        Some(&r.payload),
        pos,
    )
}

/// Every record, numbered by its index as offset (see [`pos_of`]); invalid ones left out.
fn decode_all(records: &[WorkloadRecord]) -> Vec<Event> {
    records
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let pos = Pos {
                partition: 0,
                offset: i as i64,
            };
            decode_record(r, pos).ok()
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Events per second of wall time and per second of CPU time over repetitions. On a shared
/// machine the CPU rate is the steadier one: it does not count time the process waited.
#[derive(Clone, Debug, Default)]
struct Rates {
    wall: Vec<f64>,
    cpu: Vec<f64>,
}

impl Rates {
    fn push(&mut self, events: usize, wall_secs: f64, cpu_secs: f64) {
        self.wall.push(events as f64 / wall_secs.max(1e-9));
        // /proc times tick every 10 ms: never divide by less than one tick.
        self.cpu.push(events as f64 / cpu_secs.max(0.01));
    }
    fn wall(&self) -> f64 {
        median(self.wall.clone())
    }
    fn cpu(&self) -> f64 {
        median(self.cpu.clone())
    }
    fn show(&self) -> String {
        format!(
            "{:>9} events/s, {:>9} events per CPU-second",
            si(self.wall()),
            si(self.cpu())
        )
    }
    fn to_json(&self) -> Value {
        json!({
            "events_per_sec": self.wall().round(),
            "events_per_cpu_sec": self.cpu().round(),
            "all_events_per_sec": self.wall.iter().map(|r| r.round()).collect::<Vec<_>>(),
            "all_events_per_cpu_sec": self.cpu.iter().map(|r| r.round()).collect::<Vec<_>>(),
        })
    }
}

// ------------------------------------------------------------------------------------------
// The dataflow, driven in memory.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stamp {
    Event,
    Wall,
}

impl Stamp {
    fn name(self) -> &'static str {
        match self {
            Stamp::Event => "event",
            Stamp::Wall => "wall",
        }
    }
}

/// What one dataflow run measured (worker 0's view; the probe covers every worker).
#[derive(Clone, Debug, Default)]
struct DataflowRun {
    seconds: f64,
    /// CPU time of the whole process over the run (every worker, spinning included).
    cpu_seconds: f64,
    /// Derived records in the flush batches (an event re-derived later counts again).
    records_out: u64,
    /// Distinct derived eventIds (what the outbox publishes): equal for any worker count.
    distinct_records: u64,
    /// The same, by event type.
    distinct_by_type: std::collections::BTreeMap<String, u64>,
    rows_out: u64,
    flushes: u64,
}

/// What a worker inserts: an event decoded before the measurement, or a record's bytes,
/// decoded inside the measured loop (the default: decode is part of the pipeline's cost).
enum Item {
    Decoded(Event),
    Raw(WorkloadRecord, Pos),
}

impl Item {
    fn event(self) -> Event {
        match self {
            Item::Decoded(e) => e,
            Item::Raw(r, pos) => decode_record(&r, pos).expect("decoded once before"),
        }
    }
}

/// The position `decode_all` gave an event (its record's index as offset).
fn pos_of(e: &Event) -> Pos {
    match e {
        Event::Definition(d) => d.pos,
        Event::Task(x) => x.pos,
        Event::Workflow(x) => x.pos,
        Event::Order(x) => x.pos,
        Event::System(x) => x.pos,
    }
}

/// The workload record an event was decoded from, and its position.
fn record_of<'r>(e: &Event, records: &'r [WorkloadRecord]) -> (&'r WorkloadRecord, Pos) {
    let pos = pos_of(e);
    (&records[pos.offset as usize], pos)
}

/// Decodes again, from its record's bytes, the event `e` was decoded as.
fn decode_again(e: &Event, records: &[WorkloadRecord]) -> Event {
    let (r, pos) = record_of(e, records);
    decode_record(r, pos).expect("decoded once before")
}

/// Feeds `defs` then `feed` (in eventTime order) to `workers` timely workers, `batch` events
/// at a time, stepping until each batch's time is complete.
#[allow(clippy::too_many_arguments)]
fn run_dataflow(
    workers: usize,
    defs: &[Event],
    feed: &[(u64, Event)],
    raw: Option<&[WorkloadRecord]>,
    batch: usize,
    stamp: Stamp,
    flush_per_time: bool,
    count_on_worker0: bool,
    spin: bool,
) -> DataflowRun {
    let first = feed.first().map(|(t, _)| *t).unwrap_or(1).max(1);
    // Pipeline time per batch: event stamping keeps each eventTime; wall stamping gives the
    // whole batch one time (its last eventTime, at least one past the previous batch's).
    let mut times = Vec::with_capacity(feed.len());
    let mut batch_ends = Vec::new();
    let mut batch_times = Vec::new();
    let mut prev = first;
    for (b, chunk) in feed.chunks(batch.max(1)).enumerate() {
        let last = chunk.last().map(|(t, _)| *t).unwrap_or(prev);
        let wall_t = if b == 0 {
            last.max(first)
        } else {
            last.max(prev + 1)
        };
        for (t, _) in chunk {
            times.push(match stamp {
                Stamp::Event => *t,
                Stamp::Wall => wall_t,
            });
        }
        prev = match stamp {
            Stamp::Event => last,
            Stamp::Wall => wall_t,
        };
        batch_ends.push(times.len());
        batch_times.push(prev);
    }
    let end = prev + 1;
    // Each worker owns its share (round robin, as partitions are dealt), so nothing is cloned
    // inside the measured loop.
    let item = |e: &Event| match raw {
        Some(records) => {
            let (r, pos) = record_of(e, records);
            Item::Raw(r.clone(), pos)
        }
        None => Item::Decoded(e.clone()),
    };
    let mut shares: Vec<Vec<(usize, u64, Item)>> = (0..workers).map(|_| Vec::new()).collect();
    for (i, ((_, e), t)) in feed.iter().zip(&times).enumerate() {
        shares[i % workers].push((i, *t, item(e)));
    }
    let shares = Arc::new(Mutex::new(shares.into_iter().map(Some).collect::<Vec<_>>()));
    let defs = Arc::new(defs.to_vec());
    let batches: Arc<Vec<(usize, u64)>> =
        Arc::new(batch_ends.into_iter().zip(batch_times).collect());
    let out = Arc::new(Mutex::new(DataflowRun::default()));
    let result = out.clone();
    // The sink's side of the benchmark: worker 0 hands each batch to this thread, as the
    // runtime's gather hands it to the sink thread (a channel send), so counting what was
    // derived is not worker 0's work. `--count-on-worker0` counts inside the gather, as this
    // benchmark did before session 19.
    let (to_counter, batches_in) = std::sync::mpsc::channel::<Option<FlushBatch>>();
    let counter = std::thread::spawn(move || {
        let mut c = Counted::default();
        // Until worker 0 says it has gathered everything (`None`).
        while let Ok(Some(b)) = batches_in.recv() {
            c.add(b);
        }
        c
    });
    let counted_inline = Arc::new(Mutex::new(Counted::default()));
    let counted_at_end = counted_inline.clone();
    // Highest frontier flushed by the gatherer (worker 0): the probe sits before the gather,
    // so every worker steps until the gatherer, too, has flushed everything below `end`.
    let gathered = Arc::new(AtomicU64::new(0));
    let guards = timely::execute(timely::Config::process(workers), move |worker| {
        let gathered = gathered.clone();
        let g2 = gathered.clone();
        let index = worker.index();
        let counted_inline = counted_inline.clone();
        let to_counter = to_counter.clone();
        let done_to_counter = to_counter.clone();
        let (mut sessions, probe) = worker.dataflow::<u64, _, _>(|scope| {
            let (sessions, inputs) = Sessions::new(scope);
            let (probe, emits) = build(inputs, &RulesConfig::default()).probe();
            emits.gather(0, Core::from_env().owners(), move |b| {
                let frontier = b.frontier;
                if count_on_worker0 {
                    counted_inline.lock().unwrap().add(b);
                } else {
                    to_counter
                        .send(Some(b))
                        .expect("the counting thread runs until the end");
                }
                g2.fetch_max(frontier, Ordering::SeqCst);
            });
            (sessions, probe)
        });
        let mut mine = shares.lock().unwrap()[index]
            .take()
            .expect("one share per worker");
        let started = Instant::now();
        let cpu_started = process_cpu_secs();
        sessions.advance_to(first - 1);
        if index == 0 {
            for d in defs.iter() {
                sessions.insert(d.clone(), first - 1);
            }
        }
        let mut events = mine.drain(..).peekable();
        for &(batch_end, batch_time) in batches.iter() {
            // As the runtime's source does: each event at its own time (at or above the
            // sessions' time), one flush per batch.
            while let Some((_, t, e)) = events.next_if(|(i, _, _)| *i < batch_end) {
                if flush_per_time && t > sessions.time() {
                    sessions.advance_to(t);
                }
                sessions.insert(e.event(), t);
            }
            // Every worker reaches the batch's time, also one with no event in it; the next
            // batch is read once everything before that time is computed and gathered.
            sessions.advance_to(batch_time);
            step_until(worker, spin, || !probe.less_than(&batch_time));
        }
        sessions.advance_to(end);
        step_until(worker, spin, || {
            !probe.less_than(&end) && gathered.load(Ordering::SeqCst) >= end
        });
        let seconds = started.elapsed().as_secs_f64();
        let cpu_seconds = process_cpu_secs() - cpu_started;
        if index == 0 {
            let mut o = out.lock().unwrap();
            o.seconds = seconds;
            o.cpu_seconds = cpu_seconds;
            done_to_counter
                .send(None)
                .expect("the counting thread runs until the end");
        }
        // Drop the dataflow before the inputs close: closing would fire every future timer.
        for id in worker.installed_dataflows() {
            worker.drop_dataflow(id);
        }
    })
    .expect("timely workers");
    drop(guards);
    let mut r = result.lock().unwrap().clone();
    let mut c = counter.join().expect("the counting thread");
    c.merge(std::mem::take(&mut *counted_at_end.lock().unwrap()));
    r.distinct_records = c.distinct.len() as u64;
    for (ty, _) in c.distinct.iter() {
        *r.distinct_by_type.entry(ty.clone()).or_insert(0) += 1;
    }
    r.records_out = c.records;
    r.rows_out = c.rows;
    r.flushes = c.flushes;
    r
}

/// What the batches held, counted on the benchmark's sink side.
#[derive(Debug, Default)]
struct Counted {
    records: u64,
    rows: u64,
    flushes: u64,
    /// (eventType, hash of eventId) of every record.
    distinct: HashSet<(String, u64)>,
}

impl Counted {
    fn add(&mut self, b: FlushBatch) {
        self.records += b.records.len() as u64;
        // The batch is the sink's: its types move into the set (no copy).
        for r in b.records {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            r.event_id.hash(&mut h);
            self.distinct.insert((r.event_type, h.finish()));
        }
        self.rows += b.rows.len() as u64;
        self.flushes += 1;
    }
    fn merge(&mut self, o: Counted) {
        self.records += o.records;
        self.rows += o.rows;
        self.flushes += o.flushes;
        self.distinct.extend(o.distinct);
    }
}

// ------------------------------------------------------------------------------------------
// Baseline: the naive per-event recompute.

#[derive(Default)]
struct Naive {
    templates: HashMap<(Str, i64), Arc<Template>>,
    workflows: HashMap<Str, Vec<WorkflowEvent>>,
    tasks: HashMap<Str, HashMap<Str, Vec<TaskEvent>>>,
    orders: HashMap<Str, HashMap<Str, Vec<OrderEvent>>>,
    /// Orders without a workflow: only their own rules apply.
    lone_orders: HashMap<Str, Vec<OrderEvent>>,
    last: HashMap<Str, Vec<WfOut>>,
    changes: u64,
}

impl Naive {
    fn on_event(&mut self, e: &Event, rules: &RulesConfig) {
        let wid = match e {
            Event::Definition(d) => {
                if let Some(t) = &d.template {
                    self.templates
                        .insert((d.template_id.clone(), d.version), t.clone());
                }
                return;
            }
            Event::Workflow(w) => {
                self.workflows
                    .entry(w.workflow_instance_id.clone())
                    .or_default()
                    .push(w.clone());
                w.workflow_instance_id.clone()
            }
            Event::Task(t) => {
                let wid = t.workflow_instance_id.clone();
                self.tasks
                    .entry(wid.clone())
                    .or_default()
                    .entry(t.task_instance_id.clone())
                    .or_default()
                    .push(t.clone());
                wid
            }
            Event::Order(o) => {
                let Some(wid) = o.workflow_instance_id.clone() else {
                    let evs = self.lone_orders.entry(o.order_id.clone()).or_default();
                    evs.push(o.clone());
                    let refs: Vec<&OrderEvent> = evs.iter().collect();
                    let st = fold_order(&o.order_id, &refs, &rules.eligibility);
                    self.changes += evaluate_order(&st, &rules.orders).len() as u64;
                    return;
                };
                self.orders
                    .entry(wid.clone())
                    .or_default()
                    .entry(o.order_id.clone())
                    .or_default()
                    .push(o.clone());
                wid
            }
            Event::System(_) => return,
        };
        self.recompute(&wid, rules);
    }

    /// Refolds workflow `wid` from all its events and counts the outputs that changed.
    fn recompute(&mut self, wid: &Str, rules: &RulesConfig) {
        let mut facts = Vec::new();
        if let Some(evs) = self.workflows.get(wid) {
            let refs: Vec<&WorkflowEvent> = evs.iter().collect();
            let st = fold_workflow(wid, &refs);
            if let Some(s) = &st.started {
                if let Some(t) = self
                    .templates
                    .get(&(s.template_id.clone(), s.template_version))
                {
                    facts.push(WfFact::Template(t.clone()));
                }
            }
            facts.push(WfFact::State(Arc::new(st)));
        }
        if let Some(tasks) = self.tasks.get(wid) {
            for evs in tasks.values() {
                if let Some(st) = fold_task(&dedup_by_event_id(evs.iter())) {
                    facts.push(WfFact::Task(Arc::new(st)));
                }
            }
        }
        let mut order_outs = 0;
        if let Some(orders) = self.orders.get(wid) {
            for (oid, evs) in orders {
                let refs: Vec<&OrderEvent> = evs.iter().collect();
                let st = fold_order(oid, &refs, &rules.eligibility);
                order_outs += evaluate_order(&st, &rules.orders).len();
                if let Some((_, f)) = OrderFact::of(&st) {
                    facts.push(WfFact::Order(f));
                }
            }
        }
        let refs: Vec<&WfFact> = facts.iter().collect();
        let mut outs = evaluate(wid, &refs, &rules.time);
        outs.sort();
        outs.dedup();
        let prev = self.last.remove(wid).unwrap_or_default();
        self.changes += symmetric_difference(&prev, &outs) + order_outs as u64;
        self.last.insert(wid.clone(), outs);
    }
}

fn symmetric_difference<T: Ord>(a: &[T], b: &[T]) -> u64 {
    let (mut i, mut j, mut n) = (0, 0, 0u64);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => {
                n += 1;
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                n += 1;
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                i += 1;
                j += 1;
            }
        }
    }
    n + (a.len() - i + b.len() - j) as u64
}

// ------------------------------------------------------------------------------------------
// Memory per open task.

const MEMORY_VARIANTS: [&str; 4] = ["pending+sla", "pending", "in_progress+sla", "in_progress"];

/// JSON records for workflows `from..to`: WORKFLOW_STARTED and one open task each.
fn open_task_records(
    variant: &str,
    from: usize,
    to: usize,
    at: u64,
) -> Vec<(InputTopic, String, String)> {
    let sla = variant.ends_with("+sla");
    let started = variant.starts_with("in_progress");
    let iso = format_time(at);
    let due = format_time(at + 30 * 24 * 3_600_000);
    let mut out = Vec::with_capacity((to - from) * 3);
    for i in from..to {
        let wid = format!("wf-{i:08}");
        let tid = format!("task-{i:08}");
        out.push((
            InputTopic::Workflows,
            wid.clone(),
            json!({"eventId": format!("ws-{i}"), "eventType": "WORKFLOW_STARTED", "eventTime": iso,
                "workflowInstanceId": wid, "patientId": format!("p-{i}"), "templateId": "bench-mem", "templateVersion": 1})
            .to_string(),
        ));
        let mut created = json!({"eventId": format!("tc-{i}"), "eventType": "TASK_CREATED", "eventTime": iso,
            "taskInstanceId": tid, "workflowInstanceId": wid, "taskDefId": "only"});
        if sla {
            created["dueAt"] = due.clone().into();
        }
        out.push((InputTopic::Tasks, tid.clone(), created.to_string()));
        if started {
            out.push((
                InputTopic::Tasks,
                tid.clone(),
                json!({"eventId": format!("ts-{i}"), "eventType": "TASK_STARTED", "eventTime": iso,
                    "taskInstanceId": tid, "workflowInstanceId": wid, "taskDefId": "only"})
                .to_string(),
            ));
        }
    }
    out
}

/// Runs in the child process: one worker, `n` open tasks of `variant`.
fn memory_variant(variant: &str, n: usize) -> Value {
    let base: u64 = 1_800_000_000_000;
    let chunk = 10_000;
    let out = Arc::new(Mutex::new(json!({})));
    let result = out.clone();
    let variant = variant.to_string();
    timely::execute(timely::Config::process(1), move |worker| {
        let arranged = Arranged::register(worker);
        let (mut sessions, probe) = worker.dataflow::<u64, _, _>(|scope| {
            let (sessions, inputs) = Sessions::new(scope);
            let (probe, emits) = build(inputs, &RulesConfig::default()).probe();
            emits.gather(0, Core::from_env().owners(), |_b| {});
            (sessions, probe)
        });
        let template = json!({"templateId": "bench-mem", "version": 1, "tasks": [{"taskDefId": "only", "name": "Only task"}]});
        sessions.advance_to(base - 1);
        let def = decode(InputTopic::Definitions, Some(b"bench-mem:1"), Some(template.to_string().as_bytes()), Pos::default())
            .expect("valid template");
        sessions.insert(def, base - 1);
        sessions.advance_to(base);
        worker.step_while(|| probe.less_than(&base));
        let rss_before = proc_status_bytes("VmRSS").unwrap_or(0);
        let started = Instant::now();
        let mut events = 0u64;
        let mut t = base;
        let mut offset = 0i64;
        for from in (0..n).step_by(chunk) {
            let recs = open_task_records(&variant, from, (from + chunk).min(n), base);
            for (role, key, payload) in recs {
                offset += 1;
                let pos = Pos { partition: 0, offset };
                let ev = decode(role, Some(key.as_bytes()), Some(payload.as_bytes()), pos).expect("valid event");
                sessions.insert(ev, t);
                events += 1;
            }
            t += 1;
            sessions.advance_to(t);
            worker.step_while(|| probe.less_than(&t));
        }
        // Let the arrangements finish merging, as they would in an idle pipeline.
        for _ in 0..200 {
            t += 1;
            sessions.advance_to(t);
            worker.step_while(|| probe.less_than(&t));
        }
        let secs = started.elapsed().as_secs_f64();
        let hwm = proc_status_bytes("VmHWM").unwrap_or(0);
        let rss_after = proc_status_bytes("VmRSS").unwrap_or(0);
        let per = |x: u64| (x.saturating_sub(rss_before) as f64 / n.max(1) as f64).round();
        *out.lock().unwrap() = json!({
            "variant": variant,
            "open_tasks": n,
            "events": events,
            "seconds": (secs * 100.0).round() / 100.0,
            "rss_before_bytes": rss_before,
            "rss_after_bytes": rss_after,
            "peak_rss_bytes": hwm,
            "bytes_per_open_task_peak": per(hwm),
            "bytes_per_open_task_resident": per(rss_after),
            "arranged": arranged.borrow().summary(),
        });
        for id in worker.installed_dataflows() {
            worker.drop_dataflow(id);
        }
    })
    .expect("timely worker");
    let v = result.lock().unwrap().clone();
    v
}

/// Runs in the child process: `n` workflows that start, complete their task and complete; `retire` keeps state for 1 minute after closure, else
/// for ever (the state before retirement existed). Reports resident bytes per finished
/// workflow: with retirement only tombstones should remain. Event time advances 10 min per
/// 10,000 workflows, then 50 min more.
/// Updates held per arrangement, from differential's batch/merge/drop log events, with the
/// operators' names from timely's log: what the arrangements hold, apart from the allocator.
#[derive(Default)]
struct Arranged {
    records: HashMap<usize, i64>,
    names: HashMap<usize, String>,
}

impl Arranged {
    /// Registers the loggers on `worker`, before its dataflows are built.
    fn register(worker: &mut timely::worker::Worker) -> std::rc::Rc<std::cell::RefCell<Arranged>> {
        use differential_dataflow::logging::{DifferentialEvent, DifferentialEventBuilder};
        use timely::logging::{TimelyEvent, TimelyEventBuilder};
        let state = std::rc::Rc::new(std::cell::RefCell::new(Arranged::default()));
        let mut reg = worker.log_register().expect("logging is on");
        let s = state.clone();
        reg.insert::<DifferentialEventBuilder, _>("differential/arrange", move |_t, data| {
            let Some(data) = data else { return };
            let mut a = s.borrow_mut();
            for (_, e) in data.iter() {
                match e {
                    DifferentialEvent::Batch(b) => {
                        *a.records.entry(b.operator).or_default() += b.length as i64
                    }
                    DifferentialEvent::Merge(m) => {
                        if let Some(done) = m.complete {
                            *a.records.entry(m.operator).or_default() +=
                                done as i64 - m.length1 as i64 - m.length2 as i64;
                        }
                    }
                    DifferentialEvent::Drop(d) => {
                        *a.records.entry(d.operator).or_default() -= d.length as i64
                    }
                    _ => {}
                }
            }
        });
        let s = state.clone();
        reg.insert::<TimelyEventBuilder, _>("timely", move |_t, data| {
            let Some(data) = data else { return };
            let mut a = s.borrow_mut();
            for (_, e) in data.iter() {
                if let TimelyEvent::Operates(o) = e {
                    a.names.insert(o.id, o.name.clone());
                }
            }
        });
        state
    }

    /// Total updates held, and the largest arrangements by name.
    fn summary(&self) -> Value {
        let total: i64 = self.records.values().sum();
        let mut by: Vec<(String, i64)> = self
            .records
            .iter()
            .filter(|(_, n)| **n != 0)
            .map(|(id, n)| {
                (
                    format!(
                        "{}#{id}",
                        self.names.get(id).map(String::as_str).unwrap_or("?")
                    ),
                    *n,
                )
            })
            .collect();
        by.sort_by_key(|(_, n)| -n);
        by.truncate(20);
        json!({"total_updates": total, "largest": by.into_iter().map(|(k, n)| json!([k, n])).collect::<Vec<_>>()})
    }
}

fn history_variant(retire: bool, n: usize, idle_merge_effort: Option<isize>) -> Value {
    let base: u64 = 1_800_000_000_000;
    let chunk = 10_000;
    let out = Arc::new(Mutex::new(json!({})));
    let result = out.clone();
    let mut config = timely::Config::process(1);
    differential_dataflow::configure(
        &mut config.worker,
        &differential_dataflow::Config::default().idle_merge_effort(idle_merge_effort),
    );
    timely::execute(config, move |worker| {
        let arranged = Arranged::register(worker);
        let mut rules = RulesConfig::default();
        rules.lifecycle.retire_after_ms = if retire { 60_000 } else { u64::MAX / 4 };
        let stats = rules.lifecycle.stats.clone();
        let (mut sessions, probe) = worker.dataflow::<u64, _, _>(|scope| {
            let (sessions, inputs) = Sessions::new(scope);
            let (probe, emits) = build(inputs, &rules).probe();
            emits.gather(0, Core::from_env().owners(), |_b| {});
            (sessions, probe)
        });
        let template = json!({"templateId": "bench-mem", "version": 1, "tasks": [{"taskDefId": "only", "name": "Only task"}]});
        sessions.advance_to(base - 1);
        let def = decode(InputTopic::Definitions, Some(b"bench-mem:1"), Some(template.to_string().as_bytes()), Pos::default())
            .expect("valid template");
        sessions.insert(def, base - 1);
        sessions.advance_to(base);
        worker.step_while(|| probe.less_than(&base));
        let rss_before = proc_status_bytes("VmRSS").unwrap_or(0);
        let started = Instant::now();
        let mut t = base;
        let mut offset = 0i64;
        let mut samples = Vec::new();
        for from in (0..n).step_by(chunk) {
            let iso = |ms: u64| format_time(ms);
            for i in from..(from + chunk).min(n) {
                let wid = format!("wf-{i:08}");
                let tid = format!("task-{i:08}");
                let recs = [
                    (InputTopic::Workflows, &wid, json!({"eventId": format!("ws-{i}"), "eventType": "WORKFLOW_STARTED", "eventTime": iso(t),
                        "workflowInstanceId": wid, "patientId": format!("p-{i}"), "templateId": "bench-mem", "templateVersion": 1})),
                    (InputTopic::Tasks, &tid, json!({"eventId": format!("tc-{i}"), "eventType": "TASK_CREATED", "eventTime": iso(t),
                        "taskInstanceId": tid, "workflowInstanceId": wid, "taskDefId": "only"})),
                    (InputTopic::Tasks, &tid, json!({"eventId": format!("td-{i}"), "eventType": "TASK_COMPLETED", "eventTime": iso(t),
                        "taskInstanceId": tid, "workflowInstanceId": wid, "taskDefId": "only"})),
                ];
                for (role, key, v) in recs {
                    offset += 1;
                    let pos = Pos { partition: 0, offset };
                    let ev = decode(role, Some(key.as_bytes()), Some(v.to_string().as_bytes()), pos).expect("valid event");
                    sessions.insert(ev, t);
                }
            }
            // Ten minutes of event time per 10,000 workflows: the tracker's signals arrive
            // 10 min late and retirements fall on whole ten minutes.
            t += 600_000;
            sessions.advance_to(t);
            worker.step_while(|| probe.less_than(&t));
            samples.push(json!({"finished": (from + chunk).min(n), "rss_bytes": proc_status_bytes("VmRSS").unwrap_or(0)}));
        }
        // Past the last retirement, then let the arrangements merge as in an idle pipeline.
        for _ in 0..200 {
            t += 15_000;
            sessions.advance_to(t);
            worker.step_while(|| probe.less_than(&t));
        }
        let rss_after = proc_status_bytes("VmRSS").unwrap_or(0);
        // Growth per finished workflow over the second half of the feed, once the workflows
        // in flight (retired within the next chunk) have reached their steady number: what
        // history costs, as opposed to open work.
        let growth = {
            let point = |i: usize| {
                let v: &Value = &samples[i];
                (v["finished"].as_f64().unwrap_or(0.0), v["rss_bytes"].as_f64().unwrap_or(0.0))
            };
            if samples.len() >= 4 {
                let ((f0, r0), (f1, r1)) = (point(samples.len() / 2 - 1), point(samples.len() - 1));
                ((r1 - r0) / (f1 - f0).max(1.0)).round()
            } else {
                f64::NAN
            }
        };
        let s = &stats.0;
        *out.lock().unwrap() = json!({
            "variant": match (retire, idle_merge_effort) {
                (false, _) => "finished:keep",
                (true, None) => "finished:retire",
                (true, Some(_)) => "finished:retire-merge",
            },
            "idle_merge_effort": idle_merge_effort,
            "arranged": arranged.borrow().summary(),
            "finished_workflows": n,
            "seconds": (started.elapsed().as_secs_f64() * 100.0).round() / 100.0,
            "rss_before_bytes": rss_before,
            "rss_after_bytes": rss_after,
            "peak_rss_bytes": proc_status_bytes("VmHWM").unwrap_or(0),
            "bytes_per_finished_workflow_resident": (rss_after.saturating_sub(rss_before) as f64 / n.max(1) as f64).round(),
            "rss_growth_second_half_bytes_per_workflow": growth,
            "samples": samples,
            "held_records": s.held_records.load(Ordering::SeqCst),
            "tombstones": s.tombstones.load(Ordering::SeqCst),
            "retired": s.retired_total.load(Ordering::SeqCst),
        });
        for id in worker.installed_dataflows() {
            worker.drop_dataflow(id);
        }
    })
    .expect("timely worker");
    let v = result.lock().unwrap().clone();
    v
}

/// The idle merge effort the `retire-merge` variant runs with.
const IDLE_MERGE_EFFORT: isize = 1_000;

fn measure_history(n: usize) -> anyhow::Result<Value> {
    let exe = std::env::current_exe()?;
    let mut variants = serde_json::Map::new();
    for v in ["finished:keep", "finished:retire", "finished:retire-merge"] {
        let out = std::process::Command::new(&exe)
            .args([
                "--memory-variant",
                v,
                "--finished-workflows",
                &n.to_string(),
            ])
            .stderr(std::process::Stdio::inherit())
            .output()?;
        anyhow::ensure!(out.status.success(), "variant {v} failed: {}", out.status);
        let value: Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim())?;
        eprintln!(
            "  {v:<22} {:>7} B per finished workflow resident, {:>7} B per workflow in the second half, {} updates arranged ({:.1}s)",
            value["bytes_per_finished_workflow_resident"],
            value["rss_growth_second_half_bytes_per_workflow"],
            value["arranged"]["total_updates"],
            value["seconds"].as_f64().unwrap_or(0.0)
        );
        variants.insert(v.to_string(), value);
    }
    let get = |v: &str| {
        variants[v]["bytes_per_finished_workflow_resident"]
            .as_f64()
            .unwrap_or(0.0)
    };
    let ratio = get("finished:retire") / get("finished:keep").max(1.0);
    let slope = |v: &str| {
        variants[v]["rss_growth_second_half_bytes_per_workflow"]
            .as_f64()
            .unwrap_or(f64::NAN)
    };
    let slope_ratio = slope("finished:retire") / slope("finished:keep").max(1.0);
    Ok(json!({
        "variants": variants,
        "retire_over_keep": (ratio * 1000.0).round() / 1000.0,
        "second_half_growth_retire_over_keep": (slope_ratio * 1000.0).round() / 1000.0,
    }))
}

fn measure_memory(n: usize) -> anyhow::Result<Value> {
    let exe = std::env::current_exe()?;
    let mut variants = serde_json::Map::new();
    for v in MEMORY_VARIANTS {
        let out = std::process::Command::new(&exe)
            .args(["--memory-variant", v, "--open-tasks", &n.to_string()])
            .stderr(std::process::Stdio::inherit())
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "memory variant {v} failed: {}",
            out.status
        );
        let line = String::from_utf8_lossy(&out.stdout);
        let value: Value = serde_json::from_str(line.trim())?;
        eprintln!(
            "  memory {v:<16} {:>7} B/task peak, {:>7} B/task resident ({:.1}s)",
            value["bytes_per_open_task_peak"],
            value["bytes_per_open_task_resident"],
            value["seconds"].as_f64().unwrap_or(0.0)
        );
        variants.insert(v.to_string(), value);
    }
    let get = |v: &str, k: &str| variants[v][k].as_f64().unwrap_or(0.0);
    let derived = json!({
        "with_timers_bytes_per_task_peak": get("pending+sla", "bytes_per_open_task_peak"),
        "without_timers_bytes_per_task_peak": get("in_progress", "bytes_per_open_task_peak"),
        "with_timers_bytes_per_task_resident": get("pending+sla", "bytes_per_open_task_resident"),
        "without_timers_bytes_per_task_resident": get("in_progress", "bytes_per_open_task_resident"),
        "sla_timer_bytes_per_task_peak": get("in_progress+sla", "bytes_per_open_task_peak") - get("in_progress", "bytes_per_open_task_peak"),
        "sla_timer_bytes_per_task_resident": get("in_progress+sla", "bytes_per_open_task_resident") - get("in_progress", "bytes_per_open_task_resident"),
        "note": "with timers = PENDING task with dueAt (SLA + stale timers); without = IN_PROGRESS, no dueAt (no timer; one more stored event). sla_timer = in_progress+sla - in_progress (same events).",
    });
    Ok(json!({ "variants": variants, "summary": derived }))
}

/// mimalloc instead of glibc's malloc: allocation and free were a fifth of the dataflow's
/// profile (docs/engine.md, session 13).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

// ------------------------------------------------------------------------------------------

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(v) = &args.memory_variant {
        if let Some(kind) = v.strip_prefix("finished:") {
            // retire-merge: also let idle arrangements merge (differential's idle_merge_effort).
            let effort = (kind == "retire-merge").then_some(IDLE_MERGE_EFFORT);
            println!(
                "{}",
                history_variant(kind != "keep", args.finished_workflows, effort)
            );
            return Ok(());
        }
        anyhow::ensure!(
            MEMORY_VARIANTS.contains(&v.as_str()),
            "unknown memory variant {v}"
        );
        println!("{}", memory_variant(v, args.open_tasks));
        return Ok(());
    }
    let machine = machine_info();
    let load = LoadMonitor::start();
    let mut result = json!({
        "benchmark": "dataflow",
        "started_at": format_time(hmis_bench::wall_ms()),
        "machine": machine,
        "config": {
            "workflows": args.workflows, "seed": args.seed, "batch": args.batch,
            "workers": args.workers, "repeat": args.repeat, "open_tasks": args.open_tasks,
            "finished_workflows": args.finished_workflows,
            "flush_per_time": args.flush_per_time,
            "count_on_worker0": args.count_on_worker0,
            "spin": args.spin,
        },
    });

    if !args.no_throughput {
        let repeat = args.repeat.max(1);
        let records = generate(&WorkloadConfig {
            seed: args.seed,
            workflows: args.workflows,
            start_ms: 1_795_680_000_000,
            bad_record_ratio: 0.0,
            duplicate_ratio: 0.0,
        });
        let bytes: usize = records.iter().map(|r| r.payload.len()).sum();
        eprintln!(
            "workload: {} records ({} workflows, {:.0} bytes/record avg)",
            records.len(),
            args.workflows,
            bytes as f64 / records.len() as f64
        );

        // Baseline 1: decode alone.
        let mut decode_rates = Rates::default();
        let mut events = Vec::new();
        for _ in 0..repeat {
            let (t, c) = (Instant::now(), process_cpu_secs());
            events = decode_all(&records);
            decode_rates.push(
                records.len(),
                t.elapsed().as_secs_f64(),
                process_cpu_secs() - c,
            );
        }
        eprintln!("  decode alone             {}", decode_rates.show());
        let mut defs = Vec::new();
        let mut feed = Vec::new();
        for e in events {
            match e.event_time() {
                Some(t) => feed.push((t, e)),
                None => defs.push(e),
            }
        }
        feed.sort_by_key(|(t, _)| *t);
        let n_events = feed.len() + defs.len();

        // Baseline 2: naive per-event recompute.
        let rules = RulesConfig::default();
        let mut naive_rates = Rates::default();
        let mut naive_changes = 0;
        for _ in 0..repeat {
            let mut naive = Naive::default();
            let (t, c) = (Instant::now(), process_cpu_secs());
            for e in defs.iter().chain(feed.iter().map(|(_, e)| e)) {
                if args.predecoded {
                    naive.on_event(e, &rules);
                } else {
                    naive.on_event(&decode_again(e, &records), &rules);
                }
            }
            naive_rates.push(n_events, t.elapsed().as_secs_f64(), process_cpu_secs() - c);
            naive_changes = naive.changes;
        }
        eprintln!(
            "  naive per-event refold   {} ({naive_changes} output changes)",
            naive_rates.show()
        );

        let mut runs = Vec::new();
        let mut table = Vec::new();
        let mut mismatches = Vec::new();
        for stamp in [Stamp::Event, Stamp::Wall]
            .into_iter()
            .filter(|s| args.stamps.iter().any(|n| n == s.name()))
        {
            let mut distinct_by_workers = Vec::new();
            for &w in &args.workers {
                let mut rates = Rates::default();
                let mut last = DataflowRun::default();
                for _ in 0..repeat {
                    last = run_dataflow(
                        w.max(1),
                        &defs,
                        &feed,
                        (!args.predecoded).then_some(&records[..]),
                        args.batch,
                        stamp,
                        args.flush_per_time,
                        args.count_on_worker0,
                        args.spin,
                    );
                    rates.push(n_events, last.seconds, last.cpu_seconds);
                }
                eprintln!(
                    "  dataflow {:<5} {w} worker{} {} ({} distinct derived records, {} row upserts, {} flushes)",
                    stamp.name(),
                    if w == 1 { " " } else { "s" },
                    rates.show(),
                    last.distinct_records,
                    last.rows_out,
                    last.flushes
                );
                distinct_by_workers.push((w, last.distinct_records));
                table.push((stamp.name(), w, rates.clone()));
                runs.push(json!({
                    "stamp": stamp.name(),
                    "workers": w,
                    "events": n_events,
                    "rates": rates.to_json(),
                    "ratio_to_decode": rates.wall() / decode_rates.wall(),
                    "ratio_to_naive": rates.wall() / naive_rates.wall(),
                    "cpu_ratio_to_decode": rates.cpu() / decode_rates.cpu(),
                    "cpu_ratio_to_naive": rates.cpu() / naive_rates.cpu(),
                    "distinct_derived_records": last.distinct_records,
                    "distinct_derived_by_type": last.distinct_by_type,
                    "derived_records_in_flushes": last.records_out,
                    "row_upserts_in_flushes": last.rows_out,
                    "flush_batches": last.flushes,
                }));
            }
            if distinct_by_workers.windows(2).any(|p| p[0].1 != p[1].1) {
                eprintln!("  WARNING: distinct derived records differ between worker counts ({stamp:?}): {distinct_by_workers:?}");
                mismatches.push(format!("{stamp:?}: {distinct_by_workers:?}"));
            }
        }
        println!();
        println!("| layer ({n_events} events) | events/s (wall) | ÷ decode | ÷ naive | events per CPU-second | ÷ decode | ÷ naive |");
        println!("|---|---:|---:|---:|---:|---:|---:|");
        let row = |name: String, r: &Rates| {
            println!(
                "| {name} | {} | {:.2} | {:.2} | {} | {:.2} | {:.2} |",
                si(r.wall()),
                r.wall() / decode_rates.wall(),
                r.wall() / naive_rates.wall(),
                si(r.cpu()),
                r.cpu() / decode_rates.cpu(),
                r.cpu() / naive_rates.cpu()
            )
        };
        row("decode alone (1 thread)".into(), &decode_rates);
        row("naive per-event refold (1 thread)".into(), &naive_rates);
        for (stamp, w, r) in &table {
            row(format!("dataflow, {stamp} stamping, {w} worker(s)"), r);
        }
        result["throughput"] = json!({
            "records": records.len(),
            "events": n_events,
            "payload_bytes_avg": bytes as f64 / records.len() as f64,
            "decode": decode_rates.to_json(),
            "naive": { "rates": naive_rates.to_json(), "output_changes": naive_changes },
            "dataflow": runs,
            "worker_count_mismatches": mismatches,
        });
    }

    if args.open_tasks > 0 {
        eprintln!(
            "memory per open task ({} open tasks, one child process per variant):",
            args.open_tasks
        );
        let mem = measure_memory(args.open_tasks)?;
        let s = &mem["summary"];
        println!();
        println!(
            "| memory per open task ({} tasks) | peak RSS | resident after |",
            args.open_tasks
        );
        println!("|---|---:|---:|");
        let b = |k: &str| format!("{:.0} B", s[k].as_f64().unwrap_or(0.0));
        println!(
            "| with timers (PENDING + dueAt) | {} | {} |",
            b("with_timers_bytes_per_task_peak"),
            b("with_timers_bytes_per_task_resident")
        );
        println!(
            "| without timers (IN_PROGRESS, no dueAt) | {} | {} |",
            b("without_timers_bytes_per_task_peak"),
            b("without_timers_bytes_per_task_resident")
        );
        println!(
            "| SLA timer alone | {} | {} |",
            b("sla_timer_bytes_per_task_peak"),
            b("sla_timer_bytes_per_task_resident")
        );
        result["memory"] = mem;
    }
    if args.finished_workflows > 0 {
        eprintln!(
            "memory over history ({} finished workflows, one child process per variant):",
            args.finished_workflows
        );
        let h = measure_history(args.finished_workflows)?;
        let b = |v: &str| {
            format!(
                "{:.0} B",
                h["variants"][v]["bytes_per_finished_workflow_resident"]
                    .as_f64()
                    .unwrap_or(0.0)
            )
        };
        println!();
        println!(
            "| resident memory per finished workflow ({}) | bytes |",
            args.finished_workflows
        );
        println!("|---|---:|");
        println!("| state kept for ever | {} |", b("finished:keep"));
        println!(
            "| retired 1 min after closure (tombstone left) | {} |",
            b("finished:retire")
        );
        println!("| ratio retire / keep | {} |", h["retire_over_keep"]);
        println!(
            "| growth per workflow over the second half, retire / keep | {} |",
            h["second_half_growth_retire_over_keep"]
        );
        result["history_memory"] = h;
    }
    result["load"] = load.finish();
    eprintln!("load during the run: {}", result["load"]);
    let path = write_result("dataflow", args.tag.as_deref(), args.out.as_ref(), &result)?;
    println!("\nwrote {}", path.display());
    Ok(())
}
