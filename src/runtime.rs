//! The runtime: timely workers reading Kafka, one sink thread writing PostgreSQL and Kafka.
//!
//! ```text
//!  worker 0..N ─ Source(poll) ─► Sessions ─► dataflow (hmis-dataflows::engine)
//!                                                 │ Emit (exchanged to worker 0)
//!                                                 ▼
//!                                     gather: FlushBatch per frontier advance
//!                                                 │ bounded channel (backpressure)
//!                                                 ▼
//!  sink thread (tokio): PgSink::apply — rows + outbox + dead letters + offsets + frontier,
//!                       one transaction, fenced by the group's epoch
//!                       └► Publisher: outbox → Kafka (idempotent, seq headers, no duplicates)
//! ```
//!
//! Start-up: the sink thread takes the group's advisory lock, claims a new epoch and loads
//! the committed frontier F and offsets; workers replay every partition from its beginning,
//! records below the committed offsets a poll per millisecond just below F
//! (`hmis_dataflows::restore_times`; state only: the gatherer suppresses times below F;
//! records the lifecycle dead-lettered are skipped), then continue at F or later.
//!
//! Shutdown: on `until_caught_up` (every partition read to the end it had at start) or on a
//! signal, the workers agree on a final frontier, advance to it, and wait until the sink has
//! committed it and the publisher has sent everything.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tracing::{debug, error, info, warn};

use hmis_dataflows::engine::{build_core, Core};
use hmis_dataflows::gather::Gather;
use hmis_dataflows::output::{FlushBatch, OutRecord, Row};
use hmis_dataflows::{RulesConfig, Sessions};
use hmis_sinks::pg::OutboxRow;
use hmis_sinks::{PgSink, Publisher, PublisherConfig, SinkError, TopicNames};

use crate::config::Config;
use crate::source::{enumerate_partitions, wall_ms, Source};

/// A worker's input time (its source's frontier) and whether its event partitions are all
/// read to their end.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InputClock {
    pub time: u64,
    pub idle: bool,
}

/// The lowest input time of the workers other than `me` that are still reading; `None` when
/// every other worker is idle. A worker that has not reported yet counts as reading at 0.
pub fn reading_low(clocks: &[InputClock], me: usize, peers: usize) -> Option<u64> {
    (0..peers)
        .filter(|&w| w != me)
        .map(|w| clocks.get(w).copied().unwrap_or_default())
        .filter(|c| !c.idle)
        .map(|c| c.time)
        .min()
}

/// State shared by the workers, the sink thread and the HTTP endpoints.
#[derive(Default)]
pub struct Shared {
    /// Highest eventTime read by any worker.
    pub max_event_time: AtomicU64,
    /// Highest pipeline time any worker stamped a record with (after restoring): the final
    /// frontier must pass it, or that record's effects would not be committed.
    pub max_stamp: AtomicU64,
    /// Frontier of the last batch committed to PostgreSQL.
    pub committed: AtomicU64,
    /// Frontier of the last batch whose outbox rows reached Kafka.
    pub published: AtomicU64,
    /// Batches handed to the sink and not yet committed.
    pub in_flight: AtomicUsize,
    /// Workers whose partitions are read to their end at start.
    pub caught_up: AtomicUsize,
    /// Agreed final frontier (0 = not finishing).
    pub final_frontier: AtomicU64,
    /// Each worker's input clock, by worker index: the lowest time is the pipeline clock, the
    /// most a drain may complete in `clock = event`.
    pub input_clocks: Mutex<Vec<InputClock>>,
    /// Set by a signal or a fatal sink error: stop reading, drain, exit.
    pub stop: AtomicBool,
    /// Set once state is restored and the sink is connected.
    pub ready: AtomicBool,
    /// Since when (ms since the epoch) the Kafka brokers have been unreachable, 0 while they
    /// answer. Owned by the broker probe ([`kafka_probe`]).
    pub kafka_down_since: AtomicU64,
    /// Since when the sink has been retrying a PostgreSQL failure, 0 when not.
    pub postgres_down_since: AtomicU64,
    /// Since when the sink has been retrying a Kafka failure of the outbox publisher, 0 when not.
    pub publish_retrying_since: AtomicU64,
    pub records_read: AtomicU64,
    pub dead_letters: AtomicU64,
    pub batches_committed: AtomicU64,
    pub rows_written: AtomicU64,
    /// Time the sink spent applying batches to PostgreSQL (µs), retries included.
    pub sink_apply_us: AtomicU64,
    /// Time the sink spent publishing the outbox to Kafka (µs), retries included.
    pub sink_publish_us: AtomicU64,
    /// Alerts committed (rows of `alerts`: system events and critical results).
    pub alerts_raised: AtomicU64,
    /// ERROR_REPORTs committed that raise no alert (MEDIUM and LOW: contract §6, "counted").
    pub quiet_error_reports: AtomicU64,
    pub events_published: AtomicU64,
    pub kafka_errors: AtomicU64,
    pub sink_retries: AtomicU64,
    /// Derived events and alerts derived again with an id already published: not published.
    pub republish_suppressed: AtomicU64,
    /// Items of flushes PostgreSQL refused for their content, dead-lettered instead of
    /// stopping the pipeline ([`hmis_sinks::SinkError::is_content_error`]).
    pub sink_items_dead_lettered: AtomicU64,
    /// A permanent sink failure, reported as the run's error.
    pub fatal: Mutex<Option<String>>,
    /// Gauges of the dataflow's lifecycle trackers (held records, tombstones, retirements).
    pub lifecycle: hmis_dataflows::lifecycle::Stats,
}

impl Shared {
    /// Marks `flag` (one of the `*_since` fields) as failing since now, unless it already is;
    /// true if it was not.
    fn mark_down(flag: &AtomicU64) -> bool {
        flag.compare_exchange(0, wall_ms().max(1), Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    /// Clears `flag`.
    fn mark_up(flag: &AtomicU64) {
        if flag.load(Ordering::Relaxed) != 0 {
            flag.store(0, Ordering::SeqCst);
        }
    }
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub records_read: u64,
    pub dead_letters: u64,
    pub batches: u64,
    pub published: u64,
    pub frontier: u64,
    pub elapsed: Duration,
}

/// Runs the pipeline until caught up (if configured) or until `shared.stop` is set.
pub fn run(cfg: Config, shared: Arc<Shared>) -> anyhow::Result<RunSummary> {
    let started = Instant::now();
    let partitions = enumerate_partitions(&cfg).context("reading input topic metadata")?;
    // Stops the broker probe when the run ends, however it ends.
    let _probe = kafka_probe(&cfg, shared.clone()).context("starting the broker probe")?;

    // The sink thread connects, locks, claims and loads progress before workers start.
    let (tx, rx) = tokio::sync::mpsc::channel::<FlushBatch>(16);
    let (progress_tx, progress_rx) = std::sync::mpsc::channel();
    let sink_cfg = cfg.clone();
    let sink_shared = shared.clone();
    let sink = std::thread::Builder::new()
        .name("hmis-sink".into())
        .spawn(move || sink_thread(sink_cfg, rx, progress_tx, sink_shared))?;
    let progress: hmis_sinks::Progress = match progress_rx.recv() {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            let _ = sink.join();
            return Err(e);
        }
        Err(_) => {
            let _ = sink.join();
            anyhow::bail!("sink thread ended during start-up");
        }
    };
    let resume = progress.frontier_ms.unwrap_or(0);
    info!(
        resume_frontier = resume,
        offsets = progress.offsets.len(),
        "restoring from committed progress"
    );
    shared.committed.store(resume, Ordering::SeqCst);
    shared.published.store(resume, Ordering::SeqCst);

    let workers = cfg.workers.max(1);
    let committed = Arc::new(progress.offsets);
    let dead_lettered = Arc::new(progress.dead_lettered);
    let partitions = Arc::new(partitions);
    let tx = Arc::new(Mutex::new(Some(tx)));
    let wcfg = cfg.clone();
    let wshared = shared.clone();
    let core = Core::from_env();
    info!(?core, "dataflow core");
    let guards = timely::execute(timely::Config::process(workers), move |worker| {
        let index = worker.index();
        let peers = worker.peers();
        let shared = wshared.clone();
        let cfg = wcfg.clone();
        let mut rules: RulesConfig = cfg.rules.clone();
        // Dead letters of rejected order events name the configured topic.
        rules.orders.topic = cfg.topics.orders.clone();
        rules.lifecycle.orders_topic = cfg.topics.orders.clone();
        rules.lifecycle.tasks_topic = cfg.topics.tasks.clone();
        rules.lifecycle.workflows_topic = cfg.topics.workflows.clone();
        rules.system.topic = cfg.topics.system.clone();
        rules.lifecycle.grace_from_event_time = cfg.clock == crate::config::ClockMode::Event;
        rules.lifecycle.decide_from = resume;
        rules.lifecycle.stats = shared.lifecycle.clone();
        let sender = if index == 0 { tx.lock().unwrap().take() } else { None };
        let gshared = shared.clone();
        let (mut sessions, probe) = worker.dataflow::<u64, _, _>(|scope| {
            let (sessions, inputs) = Sessions::new(scope);
            let (probe, emits) = build_core(core, inputs, &rules).probe();
            let sender = sender.clone();
            emits.gather(resume, core.owners(), move |batch| {
                if let Some(s) = &sender {
                    gshared.in_flight.fetch_add(1, Ordering::SeqCst);
                    if s.blocking_send(batch).is_err() {
                        gshared.in_flight.fetch_sub(1, Ordering::SeqCst);
                    }
                }
            });
            (sessions, probe)
        });
        drop(sender);
        // Assigning partitions reads their watermarks from the broker: retried with backoff
        // for up to a minute (a broker restarting under us), then fatal. Either way this worker
        // must not leave the closure with its dataflow installed: timely would wait for it to
        // complete, which needs the other workers' operators, so the process would hang.
        let started = Instant::now();
        let mut backoff = Duration::from_millis(100);
        let mut source = loop {
            match Source::new(&cfg, &partitions, index, peers, &committed, &dead_lettered, resume) {
                Ok(s) => break s,
                Err(e) if started.elapsed() < Duration::from_secs(60) && !shared.stop.load(Ordering::SeqCst) => {
                    warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "source start failed, retrying");
                    shared.kafka_errors.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    error!(error = %e, "source start failed");
                    let mut fatal = shared.fatal.lock().unwrap();
                    fatal.get_or_insert_with(|| format!("source: {e:#}"));
                    drop(fatal);
                    shared.stop.store(true, Ordering::SeqCst);
                    for id in worker.installed_dataflows() {
                        worker.drop_dataflow(id);
                    }
                    return;
                }
            }
        };
        sessions.advance_to(source.restore_time());
        let mut counted_caught_up = false;
        let tick = Duration::from_millis(cfg.tick_ms.max(1));
        let mut last_read = 0u64;
        let mut finishing_log = std::time::Instant::now();
        let mut clock_log = Instant::now();
        loop {
            let final_frontier = shared.final_frontier.load(Ordering::SeqCst);
            if final_frontier > 0 {
                if sessions.time() < final_frontier {
                    sessions.advance_to(final_frontier);
                }
                worker.step_or_park(Some(Duration::from_millis(5)));
                let fatal = shared.fatal.lock().unwrap().is_some();
                if fatal || shared.published.load(Ordering::SeqCst) >= final_frontier {
                    break;
                }
                if finishing_log.elapsed() > Duration::from_secs(1) {
                    finishing_log = std::time::Instant::now();
                    let mut dataflow = None;
                    probe.with_frontier(|f| dataflow = f.first().copied());
                    debug!(
                        worker = index,
                        final_frontier,
                        dataflow_frontier = ?dataflow,
                        committed = shared.committed.load(Ordering::SeqCst),
                        published = shared.published.load(Ordering::SeqCst),
                        in_flight = shared.in_flight.load(Ordering::SeqCst),
                        "finishing"
                    );
                }
                continue;
            }
            // Backpressure: don't read while the sink is behind, nor while the dataflow has
            // not finished the times already read. Without the second condition a backlog is
            // read whole into the dataflow before its first time completes: memory grows with
            // the backlog and nothing is committed until all of it is processed (a crash
            // meanwhile loses everything; the fault test's kills showed it).
            //
            // An idle worker (every partition at its end) reads regardless: its input time
            // follows the other workers' (`reading_low`), which the dataflow is behind whenever
            // they have just read, so checking it again would starve it (seen: a record on its
            // partitions waited for another worker's whole backlog, 1 run in 4 of the e2e test
            // `an_idle_worker_reads_new_records_while_another_works_through_a_backlog`). What it
            // reads is not a backlog: the consumer said there was nothing more.
            let dataflow_behind = !source.idle() && probe.less_than(&sessions.time());
            let n = if !dataflow_behind && shared.in_flight.load(Ordering::SeqCst) < 8 {
                source.poll(&mut sessions, cfg.poll_batch, &shared)
            } else {
                0
            };
            let others = reading_low(&shared.input_clocks.lock().unwrap(), index, peers);
            let f = source.frontier(
                sessions.time(),
                others,
                shared.max_event_time.load(Ordering::Relaxed),
                shared.max_stamp.load(Ordering::Relaxed),
            );
            if f > sessions.time() {
                sessions.advance_to(f);
            } else {
                sessions.flush();
            }
            {
                let mut clocks = shared.input_clocks.lock().unwrap();
                if clocks.len() < peers {
                    clocks.resize(peers, InputClock::default());
                }
                clocks[index] = InputClock {
                    time: sessions.time(),
                    idle: source.idle(),
                };
            }
            if clock_log.elapsed() > Duration::from_secs(1) {
                clock_log = Instant::now();
                let mut dataflow = None;
                probe.with_frontier(|f| dataflow = f.first().copied());
                debug!(
                    worker = index,
                    input_time = sessions.time(),
                    dataflow_frontier = ?dataflow,
                    max_event_time = shared.max_event_time.load(Ordering::Relaxed),
                    max_stamp = shared.max_stamp.load(Ordering::Relaxed),
                    in_flight = shared.in_flight.load(Ordering::SeqCst),
                    partitions = %source.clock_report(),
                    "clock"
                );
            }
            let read = source.records_read;
            shared.records_read.fetch_add(read - last_read, Ordering::Relaxed);
            last_read = read;
            if n == 0 {
                worker.step_or_park(Some(tick.min(Duration::from_millis(10))));
            } else {
                worker.step();
            }
            if !source.restoring() && !shared.ready.load(Ordering::SeqCst) && index == 0 {
                shared.ready.store(true, Ordering::SeqCst);
            }
            if cfg.until_caught_up && !counted_caught_up && source.caught_up() && !source.restoring() {
                counted_caught_up = true;
                shared.caught_up.fetch_add(1, Ordering::SeqCst);
            }
            let all_caught_up = cfg.until_caught_up && shared.caught_up.load(Ordering::SeqCst) == peers;
            if all_caught_up || shared.stop.load(Ordering::SeqCst) {
                // Agree on the final frontier: the first worker to get here decides.
                let stamped = shared.max_stamp.load(Ordering::SeqCst).saturating_add(1);
                let proposal = match cfg.clock {
                    // Caught up: every partition is read to its end, so the clock is past
                    // everything read (contract §8), and all of it is completed.
                    crate::config::ClockMode::Event if all_caught_up => {
                        let m = shared.max_event_time.load(Ordering::SeqCst);
                        (if m > 0 { m + 1 } else { 0 })
                            .max(sessions.time())
                            .max(resume)
                            .max(stamped)
                            .max(1)
                    }
                    // Stopped mid-stream: complete only what the pipeline clock (the lowest
                    // input time over all workers, the watermark) has reached. Going further
                    // would fire deadlines and grace checks that records not read yet, in
                    // partitions behind the others, may still change; records stamped at or
                    // after it stay uncommitted and are read again by the next run.
                    crate::config::ClockMode::Event => {
                        let times = shared.input_clocks.lock().unwrap();
                        let low = if times.len() < peers {
                            0
                        } else {
                            times.iter().map(|c| c.time).min().unwrap_or(0)
                        };
                        low.max(resume).max(1)
                    }
                    crate::config::ClockMode::Wall => wall_ms().max(sessions.time()).max(stamped),
                };
                let _ = shared.final_frontier.compare_exchange(0, proposal, Ordering::SeqCst, Ordering::SeqCst);
            }
        }
        shared.dead_letters.fetch_add(source.dead_letters, Ordering::Relaxed);
        let _ = probe;
        // Drop the dataflow rather than closing its inputs: closing would flush times beyond
        // the final frontier (future deadlines) that this run never reached.
        for id in worker.installed_dataflows() {
            worker.drop_dataflow(id);
        }
    })
    .map_err(|e| anyhow::anyhow!("starting timely workers: {e}"))?;
    drop(guards);
    let sink_result = sink
        .join()
        .map_err(|_| anyhow::anyhow!("sink thread panicked"))?;
    if let Some(f) = shared.fatal.lock().unwrap().clone() {
        anyhow::bail!(f);
    }
    sink_result?;
    info!(
        apply_s = shared.sink_apply_us.load(Ordering::Relaxed) as f64 / 1e6,
        publish_s = shared.sink_publish_us.load(Ordering::Relaxed) as f64 / 1e6,
        elapsed_s = started.elapsed().as_secs_f64(),
        "sink time"
    );
    Ok(RunSummary {
        records_read: shared.records_read.load(Ordering::SeqCst),
        dead_letters: shared.dead_letters.load(Ordering::SeqCst),
        batches: shared.batches_committed.load(Ordering::SeqCst),
        published: shared.events_published.load(Ordering::SeqCst),
        frontier: shared.committed.load(Ordering::SeqCst),
        elapsed: started.elapsed(),
    })
}

/// Accumulates consecutive batches into one transaction. The row index is kept across
/// merges: rebuilding it per merge made catching up on a backlog quadratic (the sink spent
/// minutes merging one large batch with many small ones; see docs/benchmarks.md).
#[derive(Default)]
struct Merger {
    batch: FlushBatch,
    index: HashMap<(u8, hmis_dataflows::model::Str, hmis_dataflows::model::Str), usize>,
}

impl Merger {
    fn new(first: FlushBatch) -> Merger {
        let index = first
            .rows
            .iter()
            .enumerate()
            .map(|(i, (k, _))| (k.clone(), i))
            .collect();
        Merger {
            batch: first,
            index,
        }
    }

    /// Rows in the accumulated transaction.
    fn rows(&self) -> usize {
        self.batch.rows.len() + self.batch.records.len()
    }

    fn merge(&mut self, b: FlushBatch) {
        merge(&mut self.batch, &mut self.index, b)
    }
}

/// Merges `b` (later) into `a`, whose row keys are indexed in `rows`.
fn merge(
    a: &mut FlushBatch,
    rows: &mut HashMap<(u8, hmis_dataflows::model::Str, hmis_dataflows::model::Str), usize>,
    b: FlushBatch,
) {
    for (k, v) in b.rows {
        match rows.get(&k) {
            Some(&i) => a.rows[i].1 = v,
            None => {
                rows.insert(k.clone(), a.rows.len());
                a.rows.push((k, v));
            }
        }
    }
    a.records.extend(b.records);
    a.dead_letters.extend(b.dead_letters);
    for m in b.offsets {
        match a
            .offsets
            .iter_mut()
            .find(|x| x.topic == m.topic && x.partition == m.partition)
        {
            Some(x) => x.next_offset = x.next_offset.max(m.next_offset),
            None => a.offsets.push(m),
        }
    }
    a.frontier = a.frontier.max(b.frontier);
}

/// Backoff between retries of a transient failure: 100 ms doubling to 10 s.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Backoff(Duration::from_millis(100))
    }
    /// Waits before retrying `e`, which [`SinkError::is_transient`] classified as transient,
    /// and marks the service it came from as down for readiness.
    async fn wait(&mut self, what: &str, e: &SinkError, shared: &Shared) {
        match e {
            // Kafka calls, and the publisher's Kafka waits that timed out.
            SinkError::Kafka { .. } | SinkError::Timeout(_) => {
                Shared::mark_down(&shared.publish_retrying_since);
            }
            _ => {
                Shared::mark_down(&shared.postgres_down_since);
            }
        }
        shared.sink_retries.fetch_add(1, Ordering::Relaxed);
        warn!(error = %hmis_sinks::redact::error(e), retry_in_ms = self.0.as_millis() as u64, "{what} failed, retrying");
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(Duration::from_secs(10));
    }
}

/// Applies a batch, retrying transient failures (the input stays paused meanwhile).
/// A lost connection is re-opened, re-locked and re-claimed (a new epoch) before retrying;
/// if another instance took the group meanwhile, we are fenced out (permanent).
async fn apply_with_retry(
    pg: &mut PgSink,
    cfg: &Config,
    batch: &FlushBatch,
    shared: &Shared,
) -> Result<(), SinkError> {
    let group = cfg.group_id.as_str();
    let mut backoff = Backoff::new();
    loop {
        if pg.client().is_closed() {
            match reconnect(cfg, pg.epoch()).await {
                Ok(new) => *pg = new,
                Err(e) if e.is_transient() => {
                    backoff.wait("reconnect", &e, shared).await;
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        match pg.apply(group, batch).await {
            Ok(()) => {
                shared.republish_suppressed.fetch_add(
                    std::mem::take(&mut pg.republish_suppressed),
                    Ordering::Relaxed,
                );
                shared
                    .sink_items_dead_lettered
                    .fetch_add(std::mem::take(&mut pg.quarantined), Ordering::Relaxed);
                Shared::mark_up(&shared.postgres_down_since);
                return Ok(());
            }
            Err(e) if e.is_transient() => backoff.wait("commit", &e, shared).await,
            Err(e) => return Err(e),
        }
    }
}

/// Connects the sink, with the published-id ledger kept as long as the tombstones (the
/// input retention: no replay can derive an older id again).
async fn connect_sink(cfg: &Config) -> Result<PgSink, SinkError> {
    let mut pg = PgSink::connect_with_tls(&cfg.database_url, &cfg.database_tls()).await?;
    pg.ledger_retention = Duration::from_millis(cfg.rules.lifecycle.tombstone_retention_ms);
    Ok(pg)
}

/// Re-opens the connection after it was lost, takes the group's lock again and claims the
/// next epoch. `previous` is the epoch this instance held: if the claim does not return
/// exactly the next one, another instance owned the group in between (its writes are not in
/// our dataflow state), and continuing would corrupt the output: fenced, permanently.
async fn reconnect(cfg: &Config, previous: Option<i64>) -> Result<PgSink, SinkError> {
    let ours = previous.unwrap_or(0);
    let mut pg = connect_sink(cfg).await?;
    if !pg.try_lock_group(&cfg.group_id).await? {
        return Err(SinkError::Fenced {
            group_id: cfg.group_id.clone(),
            ours,
            current: None,
        });
    }
    let epoch = pg
        .claim(
            &cfg.group_id,
            &format!("{}:{}", hostname(), std::process::id()),
        )
        .await?;
    if epoch != ours + 1 {
        return Err(SinkError::Fenced {
            group_id: cfg.group_id.clone(),
            ours,
            current: Some(epoch - 1),
        });
    }
    info!(group = cfg.group_id, epoch, "reconnected to PostgreSQL");
    Ok(pg)
}

/// Publishes the outbox, retrying transient failures: first what the last flush inserted,
/// from memory (`records`, `inserted`: see [`Publisher::publish_inserted`]), and after a
/// failure by reading the outbox.
///
/// The publisher checks the epoch it was created with; after a reconnect claimed a new one
/// it is recreated with that epoch (and re-reads the published positions), else its first
/// check would find the group "taken over" by this very instance.
async fn publish_with_retry(
    publisher: &mut Publisher,
    pcfg: &mut PublisherConfig,
    pg: &mut PgSink,
    cfg: &Config,
    shared: &Shared,
    records: &[OutRecord],
    mut inserted: Option<Vec<OutboxRow>>,
) -> Result<usize, SinkError> {
    let mut backoff = Backoff::new();
    loop {
        if pg.client().is_closed() {
            match reconnect(cfg, pg.epoch()).await {
                Ok(new) => *pg = new,
                Err(e) if e.is_transient() => {
                    backoff.wait("reconnect", &e, shared).await;
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        if pcfg.epoch != pg.epoch() {
            let mut renewed = pcfg.clone();
            renewed.epoch = pg.epoch();
            match Publisher::recover(renewed.clone()).await {
                Ok(p) => {
                    Shared::mark_up(&shared.publish_retrying_since);
                    *publisher = p;
                    *pcfg = renewed;
                }
                Err(e) if e.is_transient() => {
                    backoff.wait("recover publisher", &e, shared).await;
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        let published = publisher.publish_inserted(pg.client_mut(), records, inserted.take());
        match published.await {
            Ok(n) => {
                Shared::mark_up(&shared.postgres_down_since);
                Shared::mark_up(&shared.publish_retrying_since);
                return Ok(n);
            }
            Err(e) if e.is_transient() => backoff.wait("publish", &e, shared).await,
            Err(e) => return Err(e),
        }
    }
}

fn sink_thread(
    cfg: Config,
    mut rx: tokio::sync::mpsc::Receiver<FlushBatch>,
    progress_tx: std::sync::mpsc::Sender<anyhow::Result<hmis_sinks::Progress>>,
    shared: Arc<Shared>,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        let start = async {
            let mut pg = connect_sink(&cfg)
                .await
                .context("connecting to PostgreSQL")?;
            pg.migrate().await.context("applying migrations")?;
            let deadline = Instant::now() + Duration::from_secs(cfg.lock_wait_secs);
            while !pg.try_lock_group(&cfg.group_id).await? {
                if Instant::now() > deadline {
                    anyhow::bail!(
                        "another instance holds group `{}` (waited {} s)",
                        cfg.group_id,
                        cfg.lock_wait_secs
                    );
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            let owner = format!("{}:{}", hostname(), std::process::id());
            let epoch = pg.claim(&cfg.group_id, &owner).await?;
            let progress = pg.load_progress(&cfg.group_id).await?;
            let mut pcfg = publisher_config(&cfg);
            pcfg.epoch = Some(epoch);
            let mut publisher = Publisher::recover(pcfg.clone())
                .await
                .context("recovering the outbox publisher")?;
            // Whatever an earlier run committed but did not publish goes out first.
            publisher.publish_pending(pg.client_mut()).await?;
            info!(group = cfg.group_id, epoch, "sink ready");
            Ok::<_, anyhow::Error>((pg, publisher, pcfg, progress))
        };
        let (mut pg, mut publisher, mut pcfg, progress) = match start.await {
            Ok(v) => v,
            Err(e) => {
                let _ = progress_tx.send(Err(e));
                return Ok(());
            }
        };
        let _ = progress_tx.send(Ok(progress));
        let lag_monitor = LagMonitor::new(&cfg);
        loop {
            let first = match tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
                Ok(Some(b)) => b,
                Err(_) => continue,
                Ok(None) => break,
            };
            let mut merger = Merger::new(first);
            let mut n = 1;
            // Bound a transaction's size so a backlog is committed in steps.
            while merger.rows() < 50_000 {
                let Ok(b) = rx.try_recv() else { break };
                merger.merge(b);
                n += 1;
            }
            let batch = merger.batch;
            let is_empty = batch.rows.is_empty()
                && batch.records.is_empty()
                && batch.dead_letters.is_empty()
                && batch.offsets.is_empty();
            // Progress-only batches are committed at most every 500 ms (or when finishing).
            let finishing = shared.final_frontier.load(Ordering::SeqCst) > 0;
            if cfg.discard_output {
                shared.committed.store(batch.frontier, Ordering::SeqCst);
                shared.published.store(batch.frontier, Ordering::SeqCst);
            } else if !is_empty
                || finishing
                || batch.frontier >= shared.committed.load(Ordering::SeqCst) + 500
            {
                let applying = Instant::now();
                let res = apply_with_retry(&mut pg, &cfg, &batch, &shared).await;
                shared
                    .sink_apply_us
                    .fetch_add(applying.elapsed().as_micros() as u64, Ordering::Relaxed);
                if let Err(e) = res {
                    let e = hmis_sinks::redact::error(&e);
                    error!(error = %e, "sink failed permanently");
                    *shared.fatal.lock().unwrap() = Some(format!("sink: {e}"));
                    shared.stop.store(true, Ordering::SeqCst);
                    shared.in_flight.fetch_sub(n, Ordering::SeqCst);
                    break;
                }
                lag_monitor.commit(&batch);
                shared
                    .rows_written
                    .fetch_add(batch.rows.len() as u64, Ordering::Relaxed);
                shared.batches_committed.fetch_add(1, Ordering::Relaxed);
                let (alerts, quiet) =
                    batch
                        .rows
                        .iter()
                        .fold((0, 0), |(a, q), (_, row)| match row {
                            Some(Row::Alert(_)) => (a + 1, q),
                            Some(Row::ErrorReport(e)) if e.is_quiet() => (a, q + 1),
                            _ => (a, q),
                        });
                shared.alerts_raised.fetch_add(alerts, Ordering::Relaxed);
                shared
                    .quiet_error_reports
                    .fetch_add(quiet, Ordering::Relaxed);
                shared.committed.store(batch.frontier, Ordering::SeqCst);
                let inserted = pg.take_outbox_inserted();
                if !batch.records.is_empty() {
                    let publishing = Instant::now();
                    let res = publish_with_retry(
                        &mut publisher,
                        &mut pcfg,
                        &mut pg,
                        &cfg,
                        &shared,
                        &batch.records,
                        inserted,
                    )
                    .await;
                    shared
                        .sink_publish_us
                        .fetch_add(publishing.elapsed().as_micros() as u64, Ordering::Relaxed);
                    match res {
                        Ok(k) => {
                            shared
                                .events_published
                                .fetch_add(k as u64, Ordering::Relaxed);
                        }
                        Err(e) => {
                            let e = hmis_sinks::redact::error(&e);
                            error!(error = %e, "publisher failed permanently");
                            *shared.fatal.lock().unwrap() = Some(format!("publisher: {e}"));
                            shared.stop.store(true, Ordering::SeqCst);
                            shared.in_flight.fetch_sub(n, Ordering::SeqCst);
                            break;
                        }
                    }
                }
                shared.published.store(batch.frontier, Ordering::SeqCst);
            }
            shared.in_flight.fetch_sub(n, Ordering::SeqCst);
        }
        Ok::<_, anyhow::Error>(())
    });
    if let Err(e) = &result {
        *shared.fatal.lock().unwrap() = Some(format!("{e:#}"));
        shared.stop.store(true, Ordering::SeqCst);
    }
    result
}

/// How often [`kafka_probe`] asks the brokers for metadata, and how long it waits.
const PROBE_EVERY: Duration = Duration::from_secs(1);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Context of the probe's client: librdkafka's `AllBrokersDown` (all of this client's broker
/// connections are down) marks Kafka unreachable at once. Its connection failures are logged
/// at debug level only: the pipeline's other clients report them already.
struct ProbeContext(Arc<Shared>);

impl rdkafka::client::ClientContext for ProbeContext {
    fn log(&self, _level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        tracing::debug!(target: "librdkafka", "probe: {fac} {message}");
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        tracing::debug!(%error, reason, "kafka probe client error");
        if error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::AllBrokersDown)
            && Shared::mark_down(&self.0.kafka_down_since)
        {
            warn!(%error, reason, "kafka brokers unreachable");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for ProbeContext {}

/// Stops the probe thread when dropped (the thread ends within [`PROBE_TIMEOUT`]; it is not
/// waited for).
struct ProbeGuard(Arc<AtomicBool>);

impl Drop for ProbeGuard {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// The broker probe, for readiness: a thread of its own, so that it answers whatever the
/// workers and the sink are blocked on (while the brokers are down the sink typically waits
/// in a publish and the workers stop reading, backpressured, so their own clients' errors are
/// not even polled). Every [`PROBE_EVERY`] it asks for the metadata of an input topic: an
/// answer marks Kafka reachable, a failure that [`SinkError::is_transient`] classifies as
/// transient (unreachable, timed out, ...) marks it unreachable; between requests librdkafka's
/// `AllBrokersDown` marks it unreachable at once. The request is the last word of each round,
/// so an old event cannot override a newer answer.
fn kafka_probe(cfg: &Config, shared: Arc<Shared>) -> anyhow::Result<ProbeGuard> {
    use rdkafka::consumer::Consumer as _;
    let consumer: rdkafka::consumer::BaseConsumer<ProbeContext> =
        probe_client_config(cfg).create_with_context(ProbeContext(shared.clone()))?;
    let topic = cfg
        .topics
        .input(hmis_dataflows::events::InputTopic::ALL[0])
        .to_string();
    let done = Arc::new(AtomicBool::new(false));
    let stop = done.clone();
    std::thread::Builder::new()
        .name("hmis-kafka-probe".into())
        .spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let round = Instant::now();
                // Serve the queued events first (they are older than the answer below).
                while consumer.poll(Duration::ZERO).is_some() {}
                match consumer.fetch_metadata(Some(&topic), PROBE_TIMEOUT) {
                    Ok(_) => {
                        if shared.kafka_down_since.load(Ordering::Relaxed) != 0 {
                            info!("kafka brokers reachable again");
                        }
                        Shared::mark_up(&shared.kafka_down_since);
                    }
                    Err(source) => {
                        let e = SinkError::Kafka {
                            context: format!("metadata of {topic} (broker probe)"),
                            source,
                        };
                        if e.is_transient() {
                            if Shared::mark_down(&shared.kafka_down_since) {
                                warn!(error = %e, "kafka brokers unreachable");
                            }
                        } else {
                            warn!(error = %e, "kafka broker probe failed");
                        }
                    }
                }
                while round.elapsed() < PROBE_EVERY && !stop.load(Ordering::SeqCst) {
                    let _ = consumer.poll(Duration::from_millis(100));
                }
            }
        })?;
    Ok(ProbeGuard(done))
}

/// How the outbox publisher connects: brokers, group, output topics and `[kafka]` (for its
/// producer and its recovery consumer).
pub fn publisher_config(cfg: &Config) -> PublisherConfig {
    let mut pcfg = PublisherConfig::new(cfg.brokers.clone(), cfg.group_id.clone());
    pcfg.topics = TopicNames {
        derived: cfg.topics.derived.clone(),
        alerts: cfg.topics.alerts.clone(),
        dead_letter: cfg.topics.dead_letter.clone(),
    };
    pcfg.client_options = cfg.kafka.clone();
    pcfg
}

/// The broker probe's librdkafka configuration: the source's, without a group (the probe
/// needs no coordinator, and its events stay on its own queue).
pub fn probe_client_config(cfg: &Config) -> hmis_sinks::KafkaClientConfig {
    let mut config = crate::source::client_config(cfg);
    config.remove("group.id");
    config
}

/// The lag monitor's librdkafka configuration: the source's (its group is the pipeline's).
pub fn lag_monitor_client_config(cfg: &Config) -> hmis_sinks::KafkaClientConfig {
    crate::source::client_config(cfg)
}

/// Mirrors the committed input positions into the Kafka consumer group, for lag dashboards
/// only: PostgreSQL holds the positions the pipeline resumes from. Best effort, asynchronous.
struct LagMonitor(Option<rdkafka::consumer::BaseConsumer>);

impl LagMonitor {
    fn new(cfg: &Config) -> LagMonitor {
        let consumer = lag_monitor_client_config(cfg).create::<rdkafka::consumer::BaseConsumer>();
        if let Err(e) = &consumer {
            warn!(error = %e, "no consumer-group lag reporting");
        }
        LagMonitor(consumer.ok())
    }

    fn commit(&self, batch: &FlushBatch) {
        use rdkafka::consumer::Consumer as _;
        let Some(c) = &self.0 else { return };
        if batch.offsets.is_empty() {
            return;
        }
        let mut tpl = rdkafka::TopicPartitionList::new();
        for m in &batch.offsets {
            let _ = tpl.add_partition_offset(
                &m.topic,
                m.partition,
                rdkafka::Offset::Offset(m.next_offset),
            );
        }
        if let Err(e) = c.commit(&tpl, rdkafka::consumer::CommitMode::Async) {
            warn!(error = %e, "consumer-group commit (lag monitoring) failed");
        }
        // Serve the commit callback queue so async commits complete.
        let _ = c.poll(Duration::ZERO);
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::{reading_low, InputClock};

    #[test]
    fn an_idle_worker_follows_the_lowest_of_the_workers_still_reading() {
        let c = |time, idle| InputClock { time, idle };
        let clocks = [c(50, false), c(900, true), c(70, false)];
        assert_eq!(reading_low(&clocks, 1, 3), Some(50));
        assert_eq!(reading_low(&clocks, 0, 3), Some(70), "not its own time");
        assert_eq!(
            reading_low(&clocks[..2], 1, 3),
            Some(0),
            "a worker that has not reported yet holds the clock at 0"
        );
        assert_eq!(
            reading_low(&[c(5, true), c(9, false)], 1, 2),
            None,
            "every other worker idle"
        );
    }
}
