//! The PostgreSQL side: one transaction per [`FlushBatch`], fenced by an epoch.
//!
//! ```text
//!  PgSink::apply(group, batch)            one transaction
//!   1 SELECT epoch ... FOR UPDATE          ours? else SinkError::Fenced (nothing written)
//!   2 DELETE ... = ANY($keys)              per table, rows whose final state is "gone"
//!     INSERT ... SELECT * FROM UNNEST(...) per table, ON CONFLICT DO UPDATE
//!                                          (workflow_instances, task_instances,
//!                                          task_readiness, orders, order_transitions,
//!                                          compensation_actions, sla_breaches, alerts)
//!   3 INSERT INTO dead_letters             one per input record, duplicates ignored
//!   4 INSERT INTO hmis_outbox              batch order -> seq order, duplicates ignored;
//!                                          a dead letter only if step 3 stored it
//!   5 upsert hmis_input_offsets            where consumption resumes
//!     UPDATE hmis_pipeline_progress        the completed frontier
//!  COMMIT
//! ```
//!
//! All writes are set-based: one statement per table and chunk of [`CHUNK`] rows, with
//! the columns passed as arrays. Keys are deduplicated per statement (last state wins)
//! because `ON CONFLICT DO UPDATE` refuses to touch a row twice.
//!
//! **Fencing.** Each instance taking over a group calls [`PgSink::claim`], which increments
//! `hmis_pipeline_progress.epoch`. `apply` locks that row first and refuses to write when
//! the epoch moved on, so a paused or partitioned old owner can never commit after its
//! successor started. The claim blocks while an old owner's transaction holds the row, so
//! the successor's [`PgSink::load_progress`] sees every committed effect.
//! [`PgSink::try_lock_group`] adds a session advisory lock for the common case of refusing
//! a second live instance outright.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use hmis_dataflows::output::{
    AlertRow, AuditRow, CompensationRow, ComponentHealthRow, DeadLetter, ErrorReportRow,
    FlushBatch, Millis, OrderRow, OrderTransitionRow, OutRecord, OutTopic, ReadinessRow,
    RejectReason, Row, SlaBreachRow, TaskRow, WorkflowRow,
};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement, Transaction};
use tracing::{debug, error, info, warn};

use crate::pg_tls::PgTls;
use crate::SinkError;

/// Rows per statement: large enough to amortize round trips, small enough to keep the
/// parameter arrays modest.
pub const CHUNK: usize = 10_000;

/// Where a group stopped: what [`PgSink::load_progress`] returns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// The last committed frontier (exclusive upper bound of completed pipeline times), or
    /// `None` before the first flush.
    pub frontier_ms: Option<u64>,
    /// Next offset to consume per (topic, partition).
    pub offsets: HashMap<(String, i32), i64>,
    /// Input records below the committed offsets that the lifecycle trackers dead-lettered
    /// (`UNKNOWN_WORKFLOW`, `UNKNOWN_TEMPLATE`: taken out of the input), per (topic,
    /// partition): decided for good, so a restore skips them instead of deciding again. (A
    /// record the order rules rejected stays part of its order's history; one that failed to
    /// decode is rejected again the same way.)
    pub dead_lettered: HashMap<(String, i32), HashSet<i64>>,
}

/// The name an [`OutTopic`] has in `hmis_outbox.topic`: logical, so that topic names stay
/// configuration of the publisher.
pub fn outbox_topic(topic: OutTopic) -> &'static str {
    match topic {
        OutTopic::Derived => "derived",
        OutTopic::Alerts => "alerts",
        OutTopic::DeadLetter => "dead_letter",
    }
}

/// Advisory lock key of a pipeline group: FNV-1a of the group id, so every instance
/// computes the same key without asking the server.
pub fn group_lock_key(group_id: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in b"hmis-flow:group:".iter().chain(group_id.as_bytes()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash as i64
}

/// A PostgreSQL connection that applies [`FlushBatch`]es for one claimed group.
pub struct PgSink {
    client: Client,
    /// The group this sink claimed and the epoch it got.
    claimed: Option<(String, i64)>,
    statements: Option<Statements>,
    /// Derived events and alerts not put in the outbox because their id was published
    /// before (`hmis_published_events`): derived again, e.g. after a restart.
    pub republish_suppressed: u64,
    /// Items of flushes PostgreSQL refused for their content, dead-lettered instead
    /// (`hmis_sink_items_dead_lettered_total`).
    pub quarantined: u64,
    /// How long published ids are remembered (default 7 days, the input retention).
    pub ledger_retention: std::time::Duration,
    last_prune: Option<std::time::Instant>,
    /// The outbox rows the last [`PgSink::apply`] inserted, when it knows them all (see
    /// [`PgSink::take_outbox_inserted`]).
    inserted: Option<Vec<OutboxRow>>,
}

/// An outbox row a flush inserted: its seq and the index of its record in the applied
/// batch's `records`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutboxRow {
    pub seq: i64,
    pub index: usize,
}

impl PgSink {
    /// Connects (`url` as understood by tokio-postgres, e.g.
    /// `postgres://user@host:5432/db?options=-csearch_path%3Dhmis`, plus libpq's TLS
    /// parameters `sslmode` and `sslrootcert`: see [`crate::pg_tls`]) and drives the
    /// connection on the current tokio runtime.
    pub async fn connect(url: &str) -> Result<PgSink, SinkError> {
        PgSink::connect_with_tls(url, &PgTls::default()).await
    }

    /// [`PgSink::connect`] with TLS settings (the config file's) that the URL's own
    /// parameters override.
    pub async fn connect_with_tls(url: &str, tls: &PgTls) -> Result<PgSink, SinkError> {
        let client = crate::pg_tls::connect(url, tls).await?;
        Ok(PgSink::from_client(client))
    }

    /// Wraps a client connected by the caller (with TLS, or with session settings such as
    /// a `search_path`).
    pub fn from_client(client: Client) -> PgSink {
        PgSink {
            client,
            claimed: None,
            statements: None,
            republish_suppressed: 0,
            quarantined: 0,
            ledger_retention: std::time::Duration::from_secs(7 * 24 * 3600),
            last_prune: None,
            inserted: None,
        }
    }

    /// The underlying client, e.g. for [`crate::Publisher::publish_pending`] or
    /// [`crate::migrate()`].
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The underlying client, mutably (transactions need it).
    pub fn client_mut(&mut self) -> &mut Client {
        &mut self.client
    }

    /// The outbox rows the last successful [`PgSink::apply`] inserted, once, indexing that
    /// batch's `records`: what [`crate::Publisher::publish_inserted`] produces from memory.
    /// `None` when they are not known (no apply since the last call, an apply that failed or
    /// wrote item by item, a record not inserted because it was published before): the
    /// publisher then reads the outbox.
    pub fn take_outbox_inserted(&mut self) -> Option<Vec<OutboxRow>> {
        self.inserted.take()
    }

    /// Applies the pending schema migrations (see [`crate::migrate()`]).
    pub async fn migrate(&mut self) -> Result<Vec<String>, SinkError> {
        // Statements prepared before a migration could refer to replaced objects.
        self.statements = None;
        crate::migrate(&mut self.client).await
    }

    /// Takes the group's session-level advisory lock without waiting: `true` when this
    /// connection now holds it (or already did), `false` when another session does. The
    /// lock lasts until [`PgSink::unlock_group`] or the end of the connection.
    pub async fn try_lock_group(&self, group_id: &str) -> Result<bool, SinkError> {
        self.client
            .query_one(
                "SELECT pg_try_advisory_lock($1)",
                &[&group_lock_key(group_id)],
            )
            .await
            .map(|row| row.get(0))
            .map_err(SinkError::pg(format!("lock group {group_id}")))
    }

    /// Releases the lock taken by [`PgSink::try_lock_group`]; `false` if it was not held.
    pub async fn unlock_group(&self, group_id: &str) -> Result<bool, SinkError> {
        self.client
            .query_one(
                "SELECT pg_advisory_unlock($1)",
                &[&group_lock_key(group_id)],
            )
            .await
            .map(|row| row.get(0))
            .map_err(SinkError::pg(format!("unlock group {group_id}")))
    }

    /// Takes over `group_id`: increments its epoch (creating the progress row on first
    /// use), records `owner` (a human-readable instance name), and returns the new epoch.
    /// From now on every earlier owner's [`PgSink::apply`] fails with
    /// [`SinkError::Fenced`].
    pub async fn claim(&mut self, group_id: &str, owner: &str) -> Result<i64, SinkError> {
        let epoch: i64 = self
            .client
            .query_one(
                "INSERT INTO hmis_pipeline_progress (group_id, epoch, owner, updated_at)
                 VALUES ($1, 1, $2, now())
                 ON CONFLICT (group_id) DO UPDATE
                 SET epoch = hmis_pipeline_progress.epoch + 1,
                     owner = EXCLUDED.owner,
                     updated_at = now()
                 RETURNING epoch",
                &[&group_id, &owner],
            )
            .await
            .map_err(SinkError::pg(format!("claim group {group_id}")))?
            .get(0);
        debug!(group_id, owner, epoch, "claimed group");
        self.claimed = Some((group_id.to_string(), epoch));
        Ok(epoch)
    }

    /// The epoch of the last successful [`PgSink::claim`].
    pub fn epoch(&self) -> Option<i64> {
        self.claimed.as_ref().map(|(_, epoch)| *epoch)
    }

    /// Where `group_id` stopped: its committed frontier and input offsets.
    pub async fn load_progress(&self, group_id: &str) -> Result<Progress, SinkError> {
        let frontier = self
            .client
            .query_opt(
                "SELECT frontier_ms FROM hmis_pipeline_progress WHERE group_id = $1",
                &[&group_id],
            )
            .await
            .map_err(SinkError::pg(format!("read progress of group {group_id}")))?
            .and_then(|row| row.get::<_, Option<i64>>(0));
        let frontier_ms = frontier
            .map(|ms| {
                u64::try_from(ms).map_err(|_| {
                    SinkError::InvalidBatch(format!(
                        "group {group_id} has a negative frontier {ms} in the database"
                    ))
                })
            })
            .transpose()?;
        let offsets = self
            .client
            .query(
                "SELECT topic, partition, next_offset FROM hmis_input_offsets WHERE group_id = $1",
                &[&group_id],
            )
            .await
            .map_err(SinkError::pg(format!("read offsets of group {group_id}")))?
            .iter()
            .map(|row| ((row.get(0), row.get(1)), row.get(2)))
            .collect();
        let mut dead_lettered: HashMap<(String, i32), HashSet<i64>> = HashMap::new();
        for row in self
            .client
            .query(
                "SELECT d.topic, d.partition, d.\"offset\"
                 FROM dead_letters d
                 JOIN hmis_input_offsets o
                   ON o.group_id = $1 AND o.topic = d.topic AND o.partition = d.partition
                 WHERE d.\"offset\" < o.next_offset
                   AND d.reason IN ('UNKNOWN_WORKFLOW', 'UNKNOWN_TEMPLATE')",
                &[&group_id],
            )
            .await
            .map_err(SinkError::pg(format!(
                "read dead letters of group {group_id}"
            )))?
        {
            dead_lettered
                .entry((row.get(0), row.get(1)))
                .or_default()
                .insert(row.get(2));
        }
        Ok(Progress {
            frontier_ms,
            offsets,
            dead_lettered,
        })
    }

    /// Makes `batch` durable for `group_id` in one transaction: rows, outbox records, dead
    /// letters, offsets and frontier, or nothing.
    ///
    /// # Errors
    /// [`SinkError::NotClaimed`] without a prior [`PgSink::claim`] of this group,
    /// [`SinkError::Fenced`] when another instance claimed it since,
    /// [`SinkError::InvalidBatch`] for out-of-range values, [`SinkError::Postgres`]
    /// otherwise (see [`SinkError::is_transient`]).
    pub async fn apply(&mut self, group_id: &str, batch: &FlushBatch) -> Result<(), SinkError> {
        match self.apply_as(group_id, batch, Isolate::No).await {
            Err(e) if e.is_content_error() => {
                warn!(
                    group_id,
                    error = %crate::redact::error(&e),
                    "PostgreSQL refused part of a flush; writing it again item by item to \
                     dead-letter what it refuses"
                );
                self.apply_as(group_id, batch, Isolate::Yes).await
            }
            other => other,
        }
    }

    async fn apply_as(
        &mut self,
        group_id: &str,
        batch: &FlushBatch,
        isolate: Isolate,
    ) -> Result<(), SinkError> {
        let ours = match &self.claimed {
            Some((claimed, epoch)) if claimed == group_id => *epoch,
            _ => {
                return Err(SinkError::NotClaimed {
                    group_id: group_id.to_string(),
                })
            }
        };
        let frontier = to_i64(batch.frontier, "frontier")?;
        let ready_since = timestamp(batch.frontier)?;

        if self.statements.is_none() {
            self.statements = Some(Statements::prepare(&self.client).await?);
        }
        let statements = self.statements.as_ref().expect("prepared above");

        let tx = self
            .client
            .transaction()
            .await
            .map_err(SinkError::pg("begin flush"))?;

        let current: Option<i64> = tx
            .query_opt(&statements.lock_epoch, &[&group_id])
            .await
            .map_err(SinkError::pg(format!("lock progress of group {group_id}")))?
            .map(|row| row.get(0));
        SinkError::check_epoch(group_id, ours, current)?;

        self.inserted = None;
        let mut inserted = Some(Vec::new());
        let (suppressed, quarantined, plans) = match isolate {
            Isolate::No => {
                let plan = Plan::new(batch)?;
                let suppressed = write_content(
                    &tx,
                    statements,
                    group_id,
                    batch,
                    &plan,
                    ready_since,
                    &mut inserted,
                )
                .await?;
                (suppressed, 0, vec![plan])
            }
            Isolate::Yes => write_isolating(&tx, statements, group_id, batch, ready_since).await?,
        };

        let mut offsets: BTreeMap<(&str, i32), i64> = BTreeMap::new();
        for mark in &batch.offsets {
            let next = offsets
                .entry((mark.topic.as_str(), mark.partition))
                .or_insert(mark.next_offset);
            *next = (*next).max(mark.next_offset);
        }
        if !offsets.is_empty() {
            let topics: Vec<&str> = offsets.keys().map(|(t, _)| *t).collect();
            let partitions: Vec<i32> = offsets.keys().map(|(_, p)| *p).collect();
            let next: Vec<i64> = offsets.values().copied().collect();
            tx.execute(
                &statements.upsert_offsets,
                &[&group_id, &topics, &partitions, &next],
            )
            .await
            .map_err(SinkError::pg("upsert hmis_input_offsets"))?;
        }
        tx.execute(&statements.set_frontier, &[&group_id, &frontier])
            .await
            .map_err(SinkError::pg("update hmis_pipeline_progress"))?;

        tx.commit()
            .await
            .map_err(SinkError::pg(format!("commit flush of group {group_id}")))?;
        if isolate == Isolate::No {
            self.inserted = inserted;
        }
        if suppressed > 0 {
            debug!(
                group_id,
                suppressed, "derived again and not published again"
            );
        }
        self.republish_suppressed += suppressed;
        self.quarantined += quarantined;
        for plan in &plans {
            plan.log_quiet_errors();
        }
        self.prune_ledger(group_id).await;
        debug!(
            group_id,
            frontier = batch.frontier,
            rows = batch.rows.len(),
            records = batch.records.len(),
            dead_letters = batch.dead_letters.len(),
            "flush committed"
        );
        Ok(())
    }
}

/// Whether [`PgSink::apply_as`] writes the batch's content in one go or item by item.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Isolate {
    No,
    Yes,
}

/// Rows, dead letters and outbox records of `batch` (everything but offsets and frontier);
/// returns how many records were suppressed as published before.
async fn write_content(
    tx: &Transaction<'_>,
    statements: &Statements,
    group_id: &str,
    batch: &FlushBatch,
    plan: &Plan<'_>,
    ready_since: DateTime<Utc>,
    inserted: &mut Option<Vec<OutboxRow>>,
) -> Result<u64, SinkError> {
    plan.write_rows(tx, statements, ready_since).await?;
    // A dead letter is published only when it is stored for the first time: an input
    // record decided again after a restart (an unknown reference whose grace ended before
    // the crash is re-decided after the replay) is not published twice.
    let stored = write_dead_letters(tx, statements, &batch.dead_letters).await?;
    if batch.dead_letters.len() == stored.len() {
        write_outbox(tx, statements, group_id, &batch.records, inserted).await
    } else {
        // Indices into a filtered copy would not be the batch's: the outbox is read.
        *inserted = None;
        let records: Vec<OutRecord> = batch
            .records
            .iter()
            .filter(|r| r.topic != OutTopic::DeadLetter || stored.contains(&r.event_id))
            .cloned()
            .collect();
        write_outbox(tx, statements, group_id, &records, inserted).await
    }
}

/// One item of a batch's content, written or refused on its own when isolating.
#[derive(Clone, Copy)]
enum Item {
    Row(usize),
    Record(usize),
    /// A dead letter, with its document on the dead-letter topic if the batch has it.
    Dead(usize, Option<usize>),
}

/// Writes `batch`'s content item by item where PostgreSQL refuses it whole: ranges of items
/// are written under a savepoint, and a refused range is halved until the refused items are
/// alone (so k bad items among n cost O(k log n) statements, in the batch's order). Each
/// refused item becomes a dead letter carrying PostgreSQL's message ([`quarantine`]); the
/// rest of the batch commits. Returns (records suppressed, items dead-lettered, the plans
/// written).
async fn write_isolating<'b>(
    tx: &Transaction<'_>,
    statements: &Statements,
    group_id: &str,
    batch: &'b FlushBatch,
    ready_since: DateTime<Utc>,
) -> Result<(u64, u64, Vec<Plan<'b>>), SinkError> {
    // Items in the batch's production order: rows (not in the outbox), then the records,
    // a dead letter together with its document; dead letters without one last.
    let mut dead_of_doc: HashMap<&str, usize> = HashMap::new();
    for (i, d) in batch.dead_letters.iter().enumerate() {
        // The document's id is the dead letter's deterministic id.
        let id = d.to_record().event_id;
        if let Some(pos) = batch
            .records
            .iter()
            .position(|r| r.topic == OutTopic::DeadLetter && r.event_id == id)
        {
            dead_of_doc
                .entry(batch.records[pos].event_id.as_str())
                .or_insert(i);
        }
    }
    let mut with_doc = HashSet::new();
    let mut items: Vec<Item> = (0..batch.rows.len()).map(Item::Row).collect();
    for (i, r) in batch.records.iter().enumerate() {
        match dead_of_doc.get(r.event_id.as_str()) {
            Some(&d) if r.topic == OutTopic::DeadLetter && with_doc.insert(d) => {
                items.push(Item::Dead(d, Some(i)))
            }
            _ => items.push(Item::Record(i)),
        }
    }
    items.extend(
        (0..batch.dead_letters.len())
            .filter(|d| !with_doc.contains(d))
            .map(|d| Item::Dead(d, None)),
    );

    let mut suppressed = 0;
    let mut quarantined = 0;
    let mut plans = Vec::new();
    // Ranges still to write, the next one on top: halves are pushed right first.
    let mut todo = vec![(0, items.len())];
    while let Some((lo, hi)) = todo.pop() {
        if lo == hi {
            continue;
        }
        let part = sub_batch(batch, &items[lo..hi]);
        savepoint(tx, "SAVEPOINT hmis_item").await?;
        let written = match Plan::new(&part) {
            // What it inserted is not kept: the publisher reads the outbox after an
            // isolated flush.
            Ok(plan) => {
                let inserted = &mut None;
                write_content(
                    tx,
                    statements,
                    group_id,
                    &part,
                    &plan,
                    ready_since,
                    inserted,
                )
                .await
            }
            Err(e) => Err(e),
        };
        match written {
            Ok(n) => {
                savepoint(tx, "RELEASE SAVEPOINT hmis_item").await?;
                suppressed += n;
            }
            Err(e) if e.is_content_error() => {
                savepoint(tx, "ROLLBACK TO SAVEPOINT hmis_item").await?;
                if hi - lo > 1 {
                    let mid = lo + (hi - lo) / 2;
                    todo.push((mid, hi));
                    todo.push((lo, mid));
                    continue;
                }
                let dead = quarantine(batch, items[lo], &e);
                error!(
                    group_id,
                    topic = dead.topic,
                    offset = dead.offset,
                    error = %crate::redact::error(&e),
                    "PostgreSQL refused one item of a flush: dead-lettered, the rest commits"
                );
                quarantined += 1;
                let doc = dead.to_record();
                let lone = FlushBatch {
                    frontier: batch.frontier,
                    records: vec![doc],
                    dead_letters: vec![dead],
                    ..FlushBatch::default()
                };
                savepoint(tx, "SAVEPOINT hmis_item").await?;
                let plan = Plan::new(&lone)?;
                let inserted = &mut None;
                let written = write_content(
                    tx,
                    statements,
                    group_id,
                    &lone,
                    &plan,
                    ready_since,
                    inserted,
                );
                match written.await {
                    Ok(_) => savepoint(tx, "RELEASE SAVEPOINT hmis_item").await?,
                    Err(e2) if e2.is_content_error() => {
                        // Cannot happen by construction (base64 text, bounded detail); if
                        // it does, the item is logged above and the flush still commits.
                        savepoint(tx, "ROLLBACK TO SAVEPOINT hmis_item").await?;
                        error!(group_id, error = %crate::redact::error(&e2), "the dead letter of a refused item was refused too");
                    }
                    Err(e2) => return Err(e2),
                }
            }
            Err(e) => return Err(e),
        }
    }
    // Plans borrow the batch for the quiet-error log; build it once for the whole batch.
    if let Ok(plan) = Plan::new(batch) {
        plans.push(plan);
    }
    Ok((suppressed, quarantined, plans))
}

async fn savepoint(tx: &Transaction<'_>, sql: &str) -> Result<(), SinkError> {
    tx.batch_execute(sql)
        .await
        .map_err(SinkError::pg(sql.to_lowercase()))
}

/// The part of `batch` made of `items` (offsets and frontier are written once, by the caller).
fn sub_batch(batch: &FlushBatch, items: &[Item]) -> FlushBatch {
    let mut part = FlushBatch {
        frontier: batch.frontier,
        ..FlushBatch::default()
    };
    let mut records = Vec::new();
    for item in items {
        match *item {
            Item::Row(i) => part.rows.push(batch.rows[i].clone()),
            Item::Record(i) => records.push(i),
            Item::Dead(i, doc) => {
                part.dead_letters.push(batch.dead_letters[i].clone());
                records.extend(doc);
            }
        }
    }
    // The outbox keeps the batch's production order.
    records.sort_unstable();
    part.records = records
        .into_iter()
        .map(|i| batch.records[i].clone())
        .collect();
    part
}

/// The dead letter of an item PostgreSQL refused. An input's dead letter is stored again
/// with its key and payload as base64 (whatever text the database refused is then plain
/// ASCII); a row or an outbox record, which no single input record caused, is dead-lettered
/// under its table or output topic, partition -1 and an offset hashed from its key (so a
/// replay stores it once), with the row or record as JSON.
fn quarantine(batch: &FlushBatch, item: Item, e: &SinkError) -> DeadLetter {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
    let said = format!("PostgreSQL refused it: {e}");
    let stable_offset = |what: &str| -> i64 {
        let id = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, what.as_bytes());
        (id.as_u128() as i64) & i64::MAX
    };
    let at = batch.frontier.saturating_sub(1);
    let of_output = |topic: &str, key: String, payload: String| DeadLetter {
        topic: format!("hmis-flow.{topic}"),
        partition: -1,
        offset: stable_offset(&format!("{topic}:{key}")),
        key: Some(key),
        key_encoding: "utf8".into(),
        payload,
        payload_encoding: "utf8".into(),
        reason: RejectReason::SchemaViolation,
        detail: said.clone(),
        rejected_at: at,
    };
    let dead = match item {
        Item::Dead(i, _) => {
            let d = &batch.dead_letters[i];
            DeadLetter {
                key: d.key.as_deref().map(b64),
                key_encoding: "base64".into(),
                payload: if d.payload_encoding == "base64" {
                    d.payload.clone()
                } else {
                    b64(&d.payload)
                },
                payload_encoding: if d.payload_encoding == "null" {
                    "null".into()
                } else {
                    "base64".into()
                },
                detail: format!("{}; stored as base64: {said}", d.detail),
                ..d.clone()
            }
        }
        Item::Row(i) => {
            let (key, row) = &batch.rows[i];
            let table = row.as_ref().map(table_of).unwrap_or("row");
            of_output(
                table,
                format!("{}:{}", key.1, key.2),
                serde_json::to_string(row).unwrap_or_default(),
            )
        }
        Item::Record(i) => {
            let r = &batch.records[i];
            of_output(outbox_topic(r.topic), r.event_id.clone(), r.payload.clone())
        }
    };
    dead.bounded()
}

/// The table a row goes to.
fn table_of(row: &Row) -> &'static str {
    match row {
        Row::Workflow(_) => "workflow_instances",
        Row::Task(_) => "task_instances",
        Row::Readiness(_) => "task_readiness",
        Row::Order(_) => "orders",
        Row::OrderTransition(_) => "order_transitions",
        Row::Compensation(_) => "compensation_actions",
        Row::SlaBreach(_) => "sla_breaches",
        Row::Alert(_) => "alerts",
        Row::ComponentHealth(_) => "component_health",
        Row::Audit(_) => "audit_log",
        Row::ErrorReport(_) => "error_reports",
    }
}

impl PgSink {
    /// Forgets published ids older than [`PgSink::ledger_retention`], at most every 10
    /// minutes, outside the flush transaction. Best effort: a failure is logged and retried
    /// at the next chance.
    async fn prune_ledger(&mut self, group_id: &str) {
        if self
            .last_prune
            .is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(600))
        {
            return;
        }
        self.last_prune = Some(std::time::Instant::now());
        let secs = self.ledger_retention.as_secs_f64();
        let r = self
            .client
            .execute(
                "DELETE FROM hmis_published_events
                 WHERE group_id = $1 AND first_at < now() - make_interval(secs => $2)",
                &[&group_id, &secs],
            )
            .await;
        match r {
            Ok(n) if n > 0 => debug!(group_id, pruned = n, "published-id ledger pruned"),
            Ok(_) => {}
            Err(e) => {
                warn!(group_id, error = %crate::redact::postgres(&e), "pruning hmis_published_events failed")
            }
        }
    }
}

/// A batch's rows sorted by table, one final state per key.
struct Plan<'a> {
    workflows: Vec<&'a WorkflowRow>,
    tasks: Vec<&'a TaskRow>,
    readiness: Vec<&'a ReadinessRow>,
    orders: Vec<&'a OrderRow>,
    transitions: Vec<&'a OrderTransitionRow>,
    compensations: Vec<&'a CompensationRow>,
    breaches: Vec<&'a SlaBreachRow>,
    alerts: Vec<&'a AlertRow>,
    health: Vec<&'a ComponentHealthRow>,
    audits: Vec<&'a AuditRow>,
    errors: Vec<&'a ErrorReportRow>,
    gone_workflows: Vec<&'a str>,
    gone_tasks: Vec<&'a str>,
    gone_readiness: Vec<(&'a str, &'a str)>,
    /// Deleted keys of the tables keyed by one text column, by table tag.
    gone_by_id: BTreeMap<u8, Vec<&'a str>>,
    gone_breaches: Vec<(&'a str, i32)>,
}

/// Table tags of [`Row::key`].
const WORKFLOW: u8 = 0;
const TASK: u8 = 1;
const READINESS: u8 = 2;
const ORDER: u8 = 3;
const ORDER_TRANSITION: u8 = 4;
const COMPENSATION: u8 = 5;
const SLA_BREACH: u8 = 6;
const ALERT: u8 = 7;
const COMPONENT_HEALTH: u8 = 8;
const AUDIT: u8 = 9;
const ERROR_REPORT: u8 = 10;

impl<'a> Plan<'a> {
    fn new(batch: &'a FlushBatch) -> Result<Plan<'a>, SinkError> {
        // Last state per key wins. An upsert's key is the row's own primary key, which is
        // what the table conflicts on; the batch's key only matters for deletes.
        let mut last: HashMap<
            (u8, &'a str, Cow<'a, str>),
            (
                &'a (u8, hmis_dataflows::model::Str, hmis_dataflows::model::Str),
                Option<&'a Row>,
            ),
        > = HashMap::new();
        for (key, row) in &batch.rows {
            let unified = match row {
                Some(row) => row_key(row),
                None => (key.0, key.1.as_str(), Cow::Borrowed(key.2.as_str())),
            };
            last.insert(unified, (key, row.as_ref()));
        }
        let mut plan = Plan {
            workflows: Vec::new(),
            tasks: Vec::new(),
            readiness: Vec::new(),
            orders: Vec::new(),
            transitions: Vec::new(),
            compensations: Vec::new(),
            breaches: Vec::new(),
            alerts: Vec::new(),
            health: Vec::new(),
            audits: Vec::new(),
            errors: Vec::new(),
            gone_workflows: Vec::new(),
            gone_tasks: Vec::new(),
            gone_readiness: Vec::new(),
            gone_by_id: BTreeMap::new(),
            gone_breaches: Vec::new(),
        };
        for ((table, _, _), ((_, first, second), row)) in last {
            let (first, second) = (first.as_str(), second.as_str());
            match (table, row) {
                (_, Some(Row::Workflow(row))) => plan.workflows.push(row),
                (_, Some(Row::Task(row))) => plan.tasks.push(row),
                (_, Some(Row::Readiness(row))) => plan.readiness.push(row),
                (_, Some(Row::Order(row))) => plan.orders.push(row),
                (_, Some(Row::OrderTransition(row))) => plan.transitions.push(row),
                (_, Some(Row::Compensation(row))) => plan.compensations.push(row),
                (_, Some(Row::SlaBreach(row))) => plan.breaches.push(row),
                (_, Some(Row::Alert(row))) => plan.alerts.push(row),
                (_, Some(Row::ComponentHealth(row))) => plan.health.push(row),
                (_, Some(Row::Audit(row))) => plan.audits.push(row),
                (_, Some(Row::ErrorReport(row))) => plan.errors.push(row),
                // Append-only tables lose nothing, and a component's health is only ever
                // replaced: the rules retract none of these rows without a new state.
                (COMPONENT_HEALTH | AUDIT | ERROR_REPORT, None) => {}
                (WORKFLOW, None) => plan.gone_workflows.push(first),
                (TASK, None) => plan.gone_tasks.push(first),
                (READINESS, None) => plan.gone_readiness.push((first, second)),
                (ORDER | ORDER_TRANSITION | COMPENSATION | ALERT, None) => {
                    plan.gone_by_id.entry(table).or_default().push(first)
                }
                (SLA_BREACH, None) => {
                    let attempt = second.parse().map_err(|_| {
                        SinkError::InvalidBatch(format!(
                            "delete of sla_breaches ({first:?}, {second:?}): attempt is not an integer"
                        ))
                    })?;
                    plan.gone_breaches.push((first, attempt));
                }
                (other, None) => {
                    return Err(SinkError::InvalidBatch(format!(
                        "delete of ({other}, {first:?}, {second:?}): unknown table tag {other}"
                    )))
                }
            }
        }
        // A stable order keeps lock acquisition consistent between concurrent writers.
        plan.workflows
            .sort_by(|a, b| a.workflow_instance_id.cmp(&b.workflow_instance_id));
        plan.tasks
            .sort_by(|a, b| a.task_instance_id.cmp(&b.task_instance_id));
        plan.readiness.sort_by(|a, b| {
            (&a.workflow_instance_id, &a.task_def_id)
                .cmp(&(&b.workflow_instance_id, &b.task_def_id))
        });
        plan.orders.sort_by(|a, b| a.order_id.cmp(&b.order_id));
        plan.transitions.sort_by(|a, b| a.event_id.cmp(&b.event_id));
        plan.compensations
            .sort_by(|a, b| a.action_id.cmp(&b.action_id));
        plan.breaches.sort_by(|a, b| {
            (&a.task_instance_id, a.attempt).cmp(&(&b.task_instance_id, b.attempt))
        });
        plan.alerts.sort_by(|a, b| a.alert_id.cmp(&b.alert_id));
        plan.health.sort_by(|a, b| a.component.cmp(&b.component));
        plan.audits.sort_by(|a, b| a.event_id.cmp(&b.event_id));
        plan.errors.sort_by(|a, b| a.event_id.cmp(&b.event_id));
        plan.gone_workflows.sort_unstable();
        plan.gone_tasks.sort_unstable();
        plan.gone_readiness.sort_unstable();
        plan.gone_by_id
            .values_mut()
            .for_each(|keys| keys.sort_unstable());
        plan.gone_breaches.sort_unstable();
        Ok(plan)
    }

    async fn write_rows(
        &self,
        tx: &Transaction<'_>,
        st: &Statements,
        ready_since: DateTime<Utc>,
    ) -> Result<(), SinkError> {
        for chunk in self.gone_workflows.chunks(CHUNK) {
            tx.execute(&st.delete_workflows, &[&chunk])
                .await
                .map_err(SinkError::pg("delete workflow_instances"))?;
        }
        for chunk in self.gone_tasks.chunks(CHUNK) {
            tx.execute(&st.delete_tasks, &[&chunk])
                .await
                .map_err(SinkError::pg("delete task_instances"))?;
        }
        for chunk in self.gone_readiness.chunks(CHUNK) {
            let workflows: Vec<&str> = chunk.iter().map(|(w, _)| *w).collect();
            let defs: Vec<&str> = chunk.iter().map(|(_, d)| *d).collect();
            tx.execute(&st.delete_readiness, &[&workflows, &defs])
                .await
                .map_err(SinkError::pg("delete task_readiness"))?;
        }

        for chunk in self.workflows.chunks(CHUNK) {
            let c = WorkflowColumns::new(chunk)?;
            tx.execute(
                &st.upsert_workflows,
                &[
                    &c.id,
                    &c.patient,
                    &c.template,
                    &c.version,
                    &c.name,
                    &c.status,
                    &c.progress,
                    &c.escalated,
                    &c.level,
                    &c.reason,
                    &c.started,
                    &c.completed,
                ],
            )
            .await
            .map_err(SinkError::pg("upsert workflow_instances"))?;
        }
        for chunk in self.tasks.chunks(CHUNK) {
            let c = TaskColumns::new(chunk)?;
            tx.execute(
                &st.upsert_tasks,
                &[
                    &c.id,
                    &c.workflow,
                    &c.patient,
                    &c.def,
                    &c.name,
                    &c.status,
                    &c.attempt,
                    &c.due,
                    &c.breached,
                    &c.escalated,
                    &c.escalated_to,
                    &c.created,
                    &c.started,
                    &c.completed,
                    &c.error,
                ],
            )
            .await
            .map_err(SinkError::pg("upsert task_instances"))?;
        }
        for chunk in self.readiness.chunks(CHUNK) {
            let workflow: Vec<&str> = chunk
                .iter()
                .map(|r| r.workflow_instance_id.as_str())
                .collect();
            let def: Vec<&str> = chunk.iter().map(|r| r.task_def_id.as_str()).collect();
            let patient: Vec<Option<&str>> =
                chunk.iter().map(|r| r.patient_id.as_deref()).collect();
            let template: Vec<&str> = chunk.iter().map(|r| r.template_id.as_str()).collect();
            let version: Vec<i64> = chunk.iter().map(|r| r.template_version).collect();
            let name: Vec<Option<&str>> = chunk.iter().map(|r| r.task_name.as_deref()).collect();
            let automatic: Vec<bool> = chunk.iter().map(|r| r.automatic).collect();
            let attempt: Vec<i32> = chunk.iter().map(|r| r.next_attempt).collect();
            tx.execute(
                &st.upsert_readiness,
                &[
                    &workflow,
                    &def,
                    &patient,
                    &template,
                    &version,
                    &name,
                    &automatic,
                    &attempt,
                    &ready_since,
                ],
            )
            .await
            .map_err(SinkError::pg("upsert task_readiness"))?;
        }

        for (table, keys) in &self.gone_by_id {
            let (statement, what) = match *table {
                ORDER => (&st.delete_orders, "delete orders"),
                ORDER_TRANSITION => (&st.delete_transitions, "delete order_transitions"),
                COMPENSATION => (&st.delete_compensations, "delete compensation_actions"),
                _ => (&st.delete_alerts, "delete alerts"),
            };
            for chunk in keys.chunks(CHUNK) {
                tx.execute(statement, &[&chunk])
                    .await
                    .map_err(SinkError::pg(what))?;
            }
        }
        for chunk in self.gone_breaches.chunks(CHUNK) {
            let tasks: Vec<&str> = chunk.iter().map(|(t, _)| *t).collect();
            let attempts: Vec<i32> = chunk.iter().map(|(_, a)| *a).collect();
            tx.execute(&st.delete_breaches, &[&tasks, &attempts])
                .await
                .map_err(SinkError::pg("delete sla_breaches"))?;
        }

        upsert_chunks(
            tx,
            &st.upsert_orders,
            &self.orders,
            order_columns,
            "upsert orders",
        )
        .await?;
        upsert_chunks(
            tx,
            &st.upsert_transitions,
            &self.transitions,
            transition_columns,
            "upsert order_transitions",
        )
        .await?;
        upsert_chunks(
            tx,
            &st.upsert_compensations,
            &self.compensations,
            compensation_columns,
            "upsert compensation_actions",
        )
        .await?;
        upsert_chunks(
            tx,
            &st.upsert_breaches,
            &self.breaches,
            breach_columns,
            "upsert sla_breaches",
        )
        .await?;
        upsert_chunks(
            tx,
            &st.upsert_alerts,
            &self.alerts,
            alert_columns,
            "insert alerts",
        )
        .await?;
        upsert_chunks(
            tx,
            &st.upsert_health,
            &self.health,
            health_columns,
            "upsert component_health",
        )
        .await?;
        upsert_chunks(
            tx,
            &st.insert_audit,
            &self.audits,
            audit_columns,
            "insert audit_log",
        )
        .await?;
        upsert_chunks(
            tx,
            &st.insert_errors,
            &self.errors,
            error_columns,
            "insert error_reports",
        )
        .await?;
        Ok(())
    }

    /// Logs the error reports that raise no alert (contract §6: "counted and logged").
    fn log_quiet_errors(&self) {
        for e in &self.errors {
            if e.is_quiet() {
                info!(
                    component = %e.component,
                    severity = %e.severity,
                    event_id = %e.event_id,
                    report = %crate::redact::text(&e.message),
                    "error report (counted, no alert)"
                );
            }
        }
    }
}

/// One statement parameter: a column array of a chunk.
type Column<'a> = Box<dyn ToSql + Sync + 'a>;

fn column<'a, T: ToSql + Sync + 'a>(values: Vec<T>) -> Column<'a> {
    Box::new(values)
}

/// Runs `statement` once per chunk of `rows`, with the column arrays `columns` makes (in
/// the statement's parameter order).
async fn upsert_chunks<'a, R>(
    tx: &Transaction<'_>,
    statement: &Statement,
    rows: &[&'a R],
    columns: fn(&[&'a R]) -> Result<Vec<Column<'a>>, SinkError>,
    what: &'static str,
) -> Result<(), SinkError> {
    for chunk in rows.chunks(CHUNK) {
        let cols = columns(chunk)?;
        let params: Vec<&(dyn ToSql + Sync)> = cols.iter().map(|c| c.as_ref() as _).collect();
        tx.execute(statement, &params)
            .await
            .map_err(SinkError::pg(what))?;
    }
    Ok(())
}

/// Columns of `orders`, in the order of [`ORDER_COLUMNS`].
fn order_columns<'a>(rows: &[&'a OrderRow]) -> Result<Vec<Column<'a>>, SinkError> {
    let text = |f: fn(&'a OrderRow) -> &'a str| column(rows.iter().map(|r| f(r)).collect());
    let opt = |f: fn(&'a OrderRow) -> Option<&'a str>| column(rows.iter().map(|r| f(r)).collect());
    let time =
        |f: fn(&'a OrderRow) -> Option<Millis>| timestamps(rows.iter().map(|r| f(r))).map(column);
    Ok(vec![
        text(|r| &r.order_id),
        opt(|r| r.workflow_instance_id.as_deref()),
        opt(|r| r.patient_id.as_deref()),
        text(|r| &r.order_type),
        text(|r| r.order_status.as_str()),
        opt(|r| r.actor.as_deref()),
        opt(|r| r.actor_role.as_deref()),
        opt(|r| r.cost.as_deref()),
        opt(|r| r.department.as_deref()),
        column(rows.iter().map(|r| r.critical).collect()),
        opt(|r| r.appointment_id.as_deref()),
        opt(|r| r.cancel_reason.as_deref()),
        column(rows.iter().map(|r| r.is_overdue).collect()),
        time(|r| r.created_at)?,
        time(|r| r.authorized_at)?,
        time(|r| r.activated_at)?,
        time(|r| r.started_at)?,
        time(|r| r.resulted_at)?,
        time(|r| r.verified_at)?,
        time(|r| r.closed_at)?,
        time(|r| r.cancelled_at)?,
    ])
}

const ORDER_COLUMNS: &[(&str, &str)] = &[
    ("order_id", "text"),
    ("workflow_instance_id", "text"),
    ("patient_id", "text"),
    ("order_type", "text"),
    ("order_status", "text"),
    ("actor", "text"),
    ("actor_role", "text"),
    ("cost", "numeric"),
    ("department", "text"),
    ("critical", "bool"),
    ("appointment_id", "text"),
    ("cancel_reason", "text"),
    ("is_overdue", "bool"),
    ("created_at", "timestamptz"),
    ("authorized_at", "timestamptz"),
    ("activated_at", "timestamptz"),
    ("started_at", "timestamptz"),
    ("resulted_at", "timestamptz"),
    ("verified_at", "timestamptz"),
    ("closed_at", "timestamptz"),
    ("cancelled_at", "timestamptz"),
];

/// Columns of `order_transitions`, in the order of [`TRANSITION_COLUMNS`].
fn transition_columns<'a>(rows: &[&'a OrderTransitionRow]) -> Result<Vec<Column<'a>>, SinkError> {
    let text =
        |f: fn(&'a OrderTransitionRow) -> &'a str| column(rows.iter().map(|r| f(r)).collect());
    let opt = |f: fn(&'a OrderTransitionRow) -> Option<&'a str>| {
        column(rows.iter().map(|r| f(r)).collect())
    };
    let event_time: Vec<DateTime<Utc>> = rows
        .iter()
        .map(|r| timestamp(r.event_time))
        .collect::<Result<_, _>>()?;
    Ok(vec![
        text(|r| &r.event_id),
        text(|r| &r.order_id),
        opt(|r| r.workflow_instance_id.as_deref()),
        text(|r| &r.event_type),
        opt(|r| r.from_status.map(|s| s.as_str())),
        opt(|r| r.to_status.map(|s| s.as_str())),
        opt(|r| r.actor.as_deref()),
        opt(|r| r.actor_role.as_deref()),
        column(rows.iter().map(|r| r.accepted).collect()),
        opt(|r| r.reject_reason.as_deref()),
        column(event_time),
        column(rows.iter().map(|r| r.source_partition).collect()),
        column(rows.iter().map(|r| r.source_offset).collect()),
    ])
}

const TRANSITION_COLUMNS: &[(&str, &str)] = &[
    ("event_id", "text"),
    ("order_id", "text"),
    ("workflow_instance_id", "text"),
    ("event_type", "text"),
    ("from_status", "text"),
    ("to_status", "text"),
    ("actor", "text"),
    ("actor_role", "text"),
    ("accepted", "bool"),
    ("reject_reason", "text"),
    ("event_time", "timestamptz"),
    ("source_partition", "int4"),
    ("source_offset", "int8"),
];

/// Columns of `compensation_actions`, in the order of [`COMPENSATION_COLUMNS`].
fn compensation_columns<'a>(rows: &[&'a CompensationRow]) -> Result<Vec<Column<'a>>, SinkError> {
    let text = |f: fn(&'a CompensationRow) -> &'a str| column(rows.iter().map(|r| f(r)).collect());
    let opt =
        |f: fn(&'a CompensationRow) -> Option<&'a str>| column(rows.iter().map(|r| f(r)).collect());
    let requested: Vec<DateTime<Utc>> = rows
        .iter()
        .map(|r| timestamp(r.requested_at))
        .collect::<Result<_, _>>()?;
    Ok(vec![
        text(|r| &r.action_id),
        text(|r| &r.order_id),
        opt(|r| r.workflow_instance_id.as_deref()),
        opt(|r| r.patient_id.as_deref()),
        text(|r| &r.action_type),
        opt(|r| r.amount.as_deref()),
        opt(|r| r.appointment_id.as_deref()),
        text(|r| &r.status),
        opt(|r| r.reason.as_deref()),
        opt(|r| r.cause_event_id.as_deref()),
        column(requested),
        column(timestamps(rows.iter().map(|r| r.completed_at))?),
    ])
}

const COMPENSATION_COLUMNS: &[(&str, &str)] = &[
    ("action_id", "text"),
    ("order_id", "text"),
    ("workflow_instance_id", "text"),
    ("patient_id", "text"),
    ("action_type", "text"),
    ("amount", "numeric"),
    ("appointment_id", "text"),
    ("status", "text"),
    ("reason", "text"),
    ("cause_event_id", "text"),
    ("requested_at", "timestamptz"),
    ("completed_at", "timestamptz"),
];

/// Columns of `sla_breaches`, in the order of [`BREACH_COLUMNS`].
fn breach_columns<'a>(rows: &[&'a SlaBreachRow]) -> Result<Vec<Column<'a>>, SinkError> {
    let text = |f: fn(&'a SlaBreachRow) -> &'a str| column(rows.iter().map(|r| f(r)).collect());
    let opt =
        |f: fn(&'a SlaBreachRow) -> Option<&'a str>| column(rows.iter().map(|r| f(r)).collect());
    let due: Vec<DateTime<Utc>> = rows
        .iter()
        .map(|r| timestamp(r.due_at))
        .collect::<Result<_, _>>()?;
    let breached: Vec<DateTime<Utc>> = rows
        .iter()
        .map(|r| timestamp(r.breached_at))
        .collect::<Result<_, _>>()?;
    Ok(vec![
        text(|r| &r.task_instance_id),
        column(rows.iter().map(|r| r.attempt).collect()),
        text(|r| &r.workflow_instance_id),
        opt(|r| r.patient_id.as_deref()),
        opt(|r| r.template_id.as_deref()),
        column(rows.iter().map(|r| r.template_version).collect()),
        text(|r| &r.task_def_id),
        column(due),
        column(breached),
        column(rows.iter().map(|r| r.minutes_overdue).collect()),
        opt(|r| r.escalated_to.as_deref()),
        opt(|r| r.event_id.as_deref()),
    ])
}

const BREACH_COLUMNS: &[(&str, &str)] = &[
    ("task_instance_id", "text"),
    ("attempt", "int4"),
    ("workflow_instance_id", "text"),
    ("patient_id", "text"),
    ("template_id", "text"),
    ("template_version", "int8"),
    ("task_def_id", "text"),
    ("due_at", "timestamptz"),
    ("breached_at", "timestamptz"),
    ("minutes_overdue", "int8"),
    ("escalated_to", "text"),
    ("event_id", "text"),
];

/// Columns of `alerts`, in the order of [`ALERT_COLUMNS`].
fn alert_columns<'a>(rows: &[&'a AlertRow]) -> Result<Vec<Column<'a>>, SinkError> {
    let text = |f: fn(&'a AlertRow) -> &'a str| column(rows.iter().map(|r| f(r)).collect());
    let opt = |f: fn(&'a AlertRow) -> Option<&'a str>| column(rows.iter().map(|r| f(r)).collect());
    let raised: Vec<DateTime<Utc>> = rows
        .iter()
        .map(|r| timestamp(r.raised_at))
        .collect::<Result<_, _>>()?;
    Ok(vec![
        text(|r| &r.alert_id),
        text(|r| &r.severity),
        text(|r| &r.source),
        text(|r| &r.kind),
        text(|r| &r.message),
        column(raised),
        opt(|r| r.cause_event_id.as_deref()),
        opt(|r| r.component.as_deref()),
        opt(|r| r.workflow_instance_id.as_deref()),
        opt(|r| r.task_instance_id.as_deref()),
        opt(|r| r.order_id.as_deref()),
        opt(|r| r.details.as_deref()),
    ])
}

/// Columns of `component_health` the rules own, in the order of [`HEALTH_COLUMNS`].
fn health_columns<'a>(rows: &[&'a ComponentHealthRow]) -> Result<Vec<Column<'a>>, SinkError> {
    let at = |f: fn(&ComponentHealthRow) -> Millis| -> Result<Column<'a>, SinkError> {
        Ok(column(
            rows.iter()
                .map(|r| timestamp(f(r)))
                .collect::<Result<Vec<_>, _>>()?,
        ))
    };
    Ok(vec![
        column(rows.iter().map(|r| r.component.as_str()).collect()),
        column(rows.iter().map(|r| r.status.as_str()).collect()),
        at(|r| r.last_check_at)?,
        at(|r| r.status_since)?,
    ])
}

const HEALTH_COLUMNS: &[(&str, &str)] = &[
    ("component", "text"),
    ("status", "text"),
    ("last_check_at", "timestamptz"),
    ("status_since", "timestamptz"),
];

/// Columns of `audit_log`, in the order of [`AUDIT_COLUMNS`].
fn audit_columns<'a>(rows: &[&'a AuditRow]) -> Result<Vec<Column<'a>>, SinkError> {
    let text = |f: fn(&'a AuditRow) -> &'a str| column(rows.iter().map(|r| f(r)).collect());
    let times: Vec<DateTime<Utc>> = rows
        .iter()
        .map(|r| timestamp(r.event_time))
        .collect::<Result<_, _>>()?;
    Ok(vec![
        text(|r| &r.event_id),
        text(|r| &r.component),
        text(|r| &r.actor),
        text(|r| &r.action),
        text(|r| &r.entity_type),
        text(|r| &r.entity_id),
        column(
            rows.iter()
                .map(|r| r.details.as_deref())
                .collect::<Vec<_>>(),
        ),
        column(times),
        text(|r| &r.source_topic),
        column(rows.iter().map(|r| r.source_partition).collect()),
        column(rows.iter().map(|r| r.source_offset).collect()),
    ])
}

const AUDIT_COLUMNS: &[(&str, &str)] = &[
    ("event_id", "text"),
    ("component", "text"),
    ("actor", "text"),
    ("action", "text"),
    ("entity_type", "text"),
    ("entity_id", "text"),
    ("details", "jsonb"),
    ("event_time", "timestamptz"),
    ("source_topic", "text"),
    ("source_partition", "int4"),
    ("source_offset", "int8"),
];

/// Columns of `error_reports`, in the order of [`ERROR_COLUMNS`].
fn error_columns<'a>(rows: &[&'a ErrorReportRow]) -> Result<Vec<Column<'a>>, SinkError> {
    let text = |f: fn(&'a ErrorReportRow) -> &'a str| column(rows.iter().map(|r| f(r)).collect());
    let times: Vec<DateTime<Utc>> = rows
        .iter()
        .map(|r| timestamp(r.event_time))
        .collect::<Result<_, _>>()?;
    Ok(vec![
        text(|r| &r.event_id),
        text(|r| &r.component),
        text(|r| &r.severity),
        text(|r| &r.message),
        column(times),
        text(|r| &r.source_topic),
        column(rows.iter().map(|r| r.source_partition).collect()),
        column(rows.iter().map(|r| r.source_offset).collect()),
    ])
}

const ERROR_COLUMNS: &[(&str, &str)] = &[
    ("event_id", "text"),
    ("component", "text"),
    ("severity", "text"),
    ("message", "text"),
    ("event_time", "timestamptz"),
    ("source_topic", "text"),
    ("source_partition", "int4"),
    ("source_offset", "int8"),
];

/// `INSERT … SELECT * FROM UNNEST(…) ON CONFLICT (key) DO NOTHING`: for append-only tables,
/// where a replayed or duplicated row is not inserted again.
fn insert_new_sql(table: &str, key: &str, columns: &[(&str, &str)]) -> String {
    let names: Vec<&str> = columns.iter().map(|(name, _)| *name).collect();
    let arrays = unnest_arrays(columns);
    format!(
        "INSERT INTO {table} ({names}) SELECT * FROM UNNEST({arrays}) ON CONFLICT ({key}) DO NOTHING",
        names = names.join(", "),
        arrays = arrays.join(", "),
    )
}

/// Inserts new error reports and, for those actually inserted, counts MEDIUM and LOW per
/// component into `component_health` and keeps its latest error: a report replayed or
/// duplicated inserts nothing, so it counts nothing.
fn insert_errors_sql() -> String {
    format!(
        "WITH inserted AS ({insert} RETURNING component, severity, message, event_time),          per_component AS (            SELECT component,                   count(*) FILTER (WHERE severity = 'MEDIUM') AS medium,                   count(*) FILTER (WHERE severity = 'LOW') AS low,                   max(event_time) AS last_at,                   (array_agg(message ORDER BY event_time DESC))[1] AS last_message            FROM inserted GROUP BY component)          INSERT INTO component_health AS h            (component, medium_errors, low_errors, last_error_at, last_error_message)          SELECT component, medium, low, last_at, last_message FROM per_component          ON CONFLICT (component) DO UPDATE SET            medium_errors = h.medium_errors + EXCLUDED.medium_errors,            low_errors = h.low_errors + EXCLUDED.low_errors,            last_error_message = CASE WHEN h.last_error_at IS NULL              OR EXCLUDED.last_error_at >= h.last_error_at              THEN EXCLUDED.last_error_message ELSE h.last_error_message END,            last_error_at = GREATEST(h.last_error_at, EXCLUDED.last_error_at),            updated_at = now()",
        insert = insert_new_sql("error_reports", "event_id", ERROR_COLUMNS),
    )
}

const ALERT_COLUMNS: &[(&str, &str)] = &[
    ("alert_id", "text"),
    ("severity", "text"),
    ("source", "text"),
    ("kind", "text"),
    ("message", "text"),
    ("raised_at", "timestamptz"),
    ("cause_event_id", "text"),
    ("component", "text"),
    ("workflow_instance_id", "text"),
    ("task_instance_id", "text"),
    ("order_id", "text"),
    ("details", "jsonb"),
];

fn row_key(row: &Row) -> (u8, &str, Cow<'_, str>) {
    match row {
        Row::Workflow(w) => (WORKFLOW, w.workflow_instance_id.as_str(), Cow::Borrowed("")),
        Row::Task(t) => (TASK, t.task_instance_id.as_str(), Cow::Borrowed("")),
        Row::Readiness(r) => (
            READINESS,
            r.workflow_instance_id.as_str(),
            Cow::Borrowed(r.task_def_id.as_str()),
        ),
        Row::Order(o) => (ORDER, o.order_id.as_str(), Cow::Borrowed("")),
        Row::OrderTransition(t) => (ORDER_TRANSITION, t.event_id.as_str(), Cow::Borrowed("")),
        Row::Compensation(c) => (COMPENSATION, c.action_id.as_str(), Cow::Borrowed("")),
        // As in `Row::key`: the attempt in its text form, so an upsert and a delete of the
        // same (task, attempt) meet in one entry.
        Row::SlaBreach(b) => (
            SLA_BREACH,
            b.task_instance_id.as_str(),
            Cow::Owned(b.attempt.to_string()),
        ),
        Row::Alert(a) => (ALERT, a.alert_id.as_str(), Cow::Borrowed("")),
        Row::ComponentHealth(h) => (COMPONENT_HEALTH, h.component.as_str(), Cow::Borrowed("")),
        Row::Audit(a) => (AUDIT, a.event_id.as_str(), Cow::Borrowed("")),
        Row::ErrorReport(e) => (ERROR_REPORT, e.event_id.as_str(), Cow::Borrowed("")),
    }
}

struct WorkflowColumns<'a> {
    id: Vec<&'a str>,
    patient: Vec<Option<&'a str>>,
    template: Vec<&'a str>,
    version: Vec<i64>,
    name: Vec<Option<&'a str>>,
    status: Vec<&'a str>,
    progress: Vec<i32>,
    escalated: Vec<bool>,
    level: Vec<i32>,
    reason: Vec<Option<&'a str>>,
    started: Vec<Option<DateTime<Utc>>>,
    completed: Vec<Option<DateTime<Utc>>>,
}

impl<'a> WorkflowColumns<'a> {
    fn new(rows: &[&'a WorkflowRow]) -> Result<Self, SinkError> {
        Ok(WorkflowColumns {
            id: rows
                .iter()
                .map(|r| r.workflow_instance_id.as_str())
                .collect(),
            patient: rows.iter().map(|r| r.patient_id.as_deref()).collect(),
            template: rows.iter().map(|r| r.template_id.as_str()).collect(),
            version: rows.iter().map(|r| r.template_version).collect(),
            name: rows.iter().map(|r| r.template_name.as_deref()).collect(),
            status: rows.iter().map(|r| r.status.as_str()).collect(),
            progress: rows.iter().map(|r| r.progress_percentage).collect(),
            escalated: rows.iter().map(|r| r.is_escalated).collect(),
            level: rows.iter().map(|r| r.escalation_level).collect(),
            reason: rows
                .iter()
                .map(|r| r.escalation_reason.as_deref())
                .collect(),
            started: timestamps(rows.iter().map(|r| r.started_at))?,
            completed: timestamps(rows.iter().map(|r| r.completed_at))?,
        })
    }
}

struct TaskColumns<'a> {
    id: Vec<&'a str>,
    workflow: Vec<&'a str>,
    patient: Vec<Option<&'a str>>,
    def: Vec<&'a str>,
    name: Vec<Option<&'a str>>,
    status: Vec<&'a str>,
    attempt: Vec<i32>,
    due: Vec<Option<DateTime<Utc>>>,
    breached: Vec<bool>,
    escalated: Vec<bool>,
    escalated_to: Vec<Option<&'a str>>,
    created: Vec<Option<DateTime<Utc>>>,
    started: Vec<Option<DateTime<Utc>>>,
    completed: Vec<Option<DateTime<Utc>>>,
    error: Vec<Option<&'a str>>,
}

impl<'a> TaskColumns<'a> {
    fn new(rows: &[&'a TaskRow]) -> Result<Self, SinkError> {
        Ok(TaskColumns {
            id: rows.iter().map(|r| r.task_instance_id.as_str()).collect(),
            workflow: rows
                .iter()
                .map(|r| r.workflow_instance_id.as_str())
                .collect(),
            patient: rows.iter().map(|r| r.patient_id.as_deref()).collect(),
            def: rows.iter().map(|r| r.task_def_id.as_str()).collect(),
            name: rows.iter().map(|r| r.task_name.as_deref()).collect(),
            status: rows.iter().map(|r| r.status.as_str()).collect(),
            attempt: rows.iter().map(|r| r.attempt).collect(),
            due: timestamps(rows.iter().map(|r| r.due_at))?,
            breached: rows.iter().map(|r| r.sla_breached).collect(),
            escalated: rows.iter().map(|r| r.is_escalated).collect(),
            escalated_to: rows.iter().map(|r| r.escalated_to.as_deref()).collect(),
            created: timestamps(rows.iter().map(|r| r.created_at))?,
            started: timestamps(rows.iter().map(|r| r.started_at))?,
            completed: timestamps(rows.iter().map(|r| r.completed_at))?,
            error: rows.iter().map(|r| r.error_message.as_deref()).collect(),
        })
    }
}

/// Inserts the records whose ids were not published before, adding them (seq, index in
/// `records`) to `inserted`, which becomes `None` when not every record was inserted (then
/// which ones were is not known); returns how many were not.
async fn write_outbox(
    tx: &Transaction<'_>,
    st: &Statements,
    group_id: &str,
    records: &[OutRecord],
    inserted: &mut Option<Vec<OutboxRow>>,
) -> Result<u64, SinkError> {
    let mut skipped = 0u64;
    // Chunks run in order and each keeps its order (WITH ORDINALITY ... ORDER BY), so seq
    // follows the batch's production order.
    for (c, all) in records.chunks(CHUNK).enumerate() {
        // A record repeated within one statement is written once (its first occurrence):
        // the ledger's ON CONFLICT keeps one id, but the outbox has no key of its own to
        // drop the repeat (migration 0007). Across statements the ledger decides.
        let mut seen = HashSet::with_capacity(all.len());
        let chunk: Vec<&OutRecord> = all
            .iter()
            .filter(|r| seen.insert((outbox_topic(r.topic), r.event_id.as_str())))
            .collect();
        skipped += (all.len() - chunk.len()) as u64;
        let topic: Vec<&str> = chunk.iter().map(|r| outbox_topic(r.topic)).collect();
        let key: Vec<Option<&str>> = chunk.iter().map(|r| r.key.as_deref()).collect();
        let event_id: Vec<&str> = chunk.iter().map(|r| r.event_id.as_str()).collect();
        let event_type: Vec<&str> = chunk.iter().map(|r| r.event_type.as_str()).collect();
        let payload: Vec<&str> = chunk.iter().map(|r| r.payload.as_str()).collect();
        let rows = tx
            .query(
                &st.insert_outbox,
                &[&group_id, &topic, &key, &event_id, &event_type, &payload],
            )
            .await
            .map_err(SinkError::pg("insert hmis_outbox"))?;
        skipped += (chunk.len() as u64).saturating_sub(rows.len() as u64);
        // All of the chunk inserted (the common case: the gather drops repeats already):
        // their seqs, ascending, follow the chunk's order. Returning only the seqs keeps the
        // statement's answer to 8 bytes a row.
        match inserted {
            Some(list) if rows.len() == all.len() => {
                let mut seqs: Vec<i64> = rows.iter().map(|row| row.get(0)).collect();
                seqs.sort_unstable();
                list.extend(seqs.into_iter().enumerate().map(|(i, seq)| OutboxRow {
                    seq,
                    index: c * CHUNK + i,
                }));
            }
            _ => *inserted = None,
        }
    }
    Ok(skipped)
}

/// Stores dead letters not stored before; returns the ids (`deadLetterId`) of those it stored.
async fn write_dead_letters(
    tx: &Transaction<'_>,
    st: &Statements,
    dead_letters: &[DeadLetter],
) -> Result<HashSet<String>, SinkError> {
    let mut stored = HashSet::new();
    for chunk in dead_letters.chunks(CHUNK) {
        let topic: Vec<&str> = chunk.iter().map(|d| d.topic.as_str()).collect();
        let partition: Vec<i32> = chunk.iter().map(|d| d.partition).collect();
        let offset: Vec<i64> = chunk.iter().map(|d| d.offset).collect();
        let key: Vec<Option<&str>> = chunk.iter().map(|d| d.key.as_deref()).collect();
        let payload: Vec<&str> = chunk.iter().map(|d| d.payload.as_str()).collect();
        let encoding: Vec<&str> = chunk.iter().map(|d| d.payload_encoding.as_str()).collect();
        let reason: Vec<&str> = chunk.iter().map(|d| d.reason.as_str()).collect();
        let detail: Vec<&str> = chunk.iter().map(|d| d.detail.as_str()).collect();
        let rejected: Vec<DateTime<Utc>> = chunk
            .iter()
            .map(|d| timestamp(d.rejected_at))
            .collect::<Result<_, _>>()?;
        let key_encoding: Vec<&str> = chunk.iter().map(|d| d.key_encoding.as_str()).collect();
        let params: [&(dyn ToSql + Sync); 10] = [
            &topic,
            &partition,
            &offset,
            &key,
            &payload,
            &encoding,
            &reason,
            &detail,
            &rejected,
            &key_encoding,
        ];
        let inserted: HashSet<(String, i32, i64)> = tx
            .query(&st.insert_dead_letters, &params)
            .await
            .map_err(SinkError::pg("insert dead_letters"))?
            .iter()
            .map(|row| (row.get(0), row.get(1), row.get(2)))
            .collect();
        for d in chunk {
            if inserted.contains(&(d.topic.clone(), d.partition, d.offset)) {
                stored.insert(d.to_record().event_id);
            }
        }
    }
    Ok(stored)
}

fn to_i64(ms: Millis, what: &str) -> Result<i64, SinkError> {
    i64::try_from(ms)
        .map_err(|_| SinkError::InvalidBatch(format!("{what} {ms} ms is out of range")))
}

/// Pipeline milliseconds to a timestamptz value.
fn timestamp(ms: Millis) -> Result<DateTime<Utc>, SinkError> {
    DateTime::from_timestamp_millis(to_i64(ms, "time")?)
        .ok_or_else(|| SinkError::InvalidBatch(format!("time {ms} ms is out of range")))
}

fn timestamps(
    values: impl Iterator<Item = Option<Millis>>,
) -> Result<Vec<Option<DateTime<Utc>>>, SinkError> {
    values.map(|v| v.map(timestamp).transpose()).collect()
}

/// The parameters of `UNNEST(…)`, one typed array per column. `numeric` and `jsonb` columns
/// are passed as text arrays and cast on the server, so the sink needs no decimal or JSON
/// types of its own.
fn unnest_arrays(columns: &[(&str, &str)]) -> Vec<String> {
    columns
        .iter()
        .enumerate()
        .map(|(i, (_, ty))| match *ty {
            "numeric" | "jsonb" => format!("${}::text[]::{ty}[]", i + 1),
            _ => format!("${}::{ty}[]", i + 1),
        })
        .collect()
}

/// `INSERT INTO table (cols) SELECT * FROM UNNEST($1::t1[], ...) ON CONFLICT (key) DO UPDATE`
/// setting every non-key column and `updated_at`, but only where something changed (a
/// replayed batch then writes nothing).
fn upsert_sql(table: &str, key: &[&str], columns: &[(&str, &str)]) -> String {
    upsert_sql_touching(table, key, columns, Some("updated_at"))
}

/// [`upsert_sql`] with the column stamped `now()` on a change named by `touch` (`None` for
/// tables without one).
fn upsert_sql_touching(
    table: &str,
    key: &[&str],
    columns: &[(&str, &str)],
    touch: Option<&str>,
) -> String {
    let names: Vec<&str> = columns.iter().map(|(name, _)| *name).collect();
    let arrays = unnest_arrays(columns);
    let updated: Vec<&str> = names
        .iter()
        .copied()
        .filter(|name| !key.contains(name))
        .collect();
    let mut set: Vec<String> = updated
        .iter()
        .map(|name| format!("{name} = EXCLUDED.{name}"))
        .collect();
    if let Some(touch) = touch {
        set.push(format!("{touch} = now()"));
    }
    let old: Vec<String> = updated
        .iter()
        .map(|name| format!("{table}.{name}"))
        .collect();
    let new: Vec<String> = updated
        .iter()
        .map(|name| format!("EXCLUDED.{name}"))
        .collect();
    format!(
        "INSERT INTO {table} ({names}) SELECT * FROM UNNEST({arrays}) \
         ON CONFLICT ({key}) DO UPDATE SET {set} \
         WHERE ({old}) IS DISTINCT FROM ({new})",
        names = names.join(", "),
        arrays = arrays.join(", "),
        key = key.join(", "),
        set = set.join(", "),
        old = old.join(", "),
        new = new.join(", "),
    )
}

/// Statements prepared once per connection.
struct Statements {
    lock_epoch: Statement,
    upsert_workflows: Statement,
    upsert_tasks: Statement,
    upsert_readiness: Statement,
    delete_workflows: Statement,
    delete_tasks: Statement,
    delete_readiness: Statement,
    upsert_orders: Statement,
    upsert_transitions: Statement,
    upsert_compensations: Statement,
    upsert_breaches: Statement,
    upsert_alerts: Statement,
    upsert_health: Statement,
    insert_audit: Statement,
    insert_errors: Statement,
    delete_orders: Statement,
    delete_transitions: Statement,
    delete_compensations: Statement,
    delete_breaches: Statement,
    delete_alerts: Statement,
    insert_outbox: Statement,
    insert_dead_letters: Statement,
    upsert_offsets: Statement,
    set_frontier: Statement,
}

impl Statements {
    async fn prepare(client: &Client) -> Result<Statements, SinkError> {
        let prepare = |sql: String, what: &'static str| async move {
            client
                .prepare(&sql)
                .await
                .map_err(SinkError::pg(format!("prepare {what}")))
        };
        let upsert_workflows = upsert_sql(
            "workflow_instances",
            &["workflow_instance_id"],
            &[
                ("workflow_instance_id", "text"),
                ("patient_id", "text"),
                ("template_id", "text"),
                ("template_version", "int8"),
                ("template_name", "text"),
                ("status", "text"),
                ("progress_percentage", "int4"),
                ("is_escalated", "bool"),
                ("escalation_level", "int4"),
                ("escalation_reason", "text"),
                ("started_at", "timestamptz"),
                ("completed_at", "timestamptz"),
            ],
        );
        let upsert_tasks = upsert_sql(
            "task_instances",
            &["task_instance_id"],
            &[
                ("task_instance_id", "text"),
                ("workflow_instance_id", "text"),
                ("patient_id", "text"),
                ("task_def_id", "text"),
                ("task_name", "text"),
                ("status", "text"),
                ("attempt", "int4"),
                ("due_at", "timestamptz"),
                ("sla_breached", "bool"),
                ("is_escalated", "bool"),
                ("escalated_to", "text"),
                ("created_at", "timestamptz"),
                ("started_at", "timestamptz"),
                ("completed_at", "timestamptz"),
                ("error_message", "text"),
            ],
        );
        // ready_since is kept while the pair stays ready: it says since when, not last seen.
        let upsert_readiness = "
            INSERT INTO task_readiness (workflow_instance_id, task_def_id, patient_id,
                template_id, template_version, task_name, automatic, next_attempt, ready_since)
            SELECT u.*, $9::timestamptz
            FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[],
                        $6::text[], $7::bool[], $8::int4[]) AS u
            ON CONFLICT (workflow_instance_id, task_def_id) DO UPDATE
            SET patient_id = EXCLUDED.patient_id,
                template_id = EXCLUDED.template_id,
                template_version = EXCLUDED.template_version,
                task_name = EXCLUDED.task_name,
                automatic = EXCLUDED.automatic,
                next_attempt = EXCLUDED.next_attempt
            WHERE (task_readiness.patient_id, task_readiness.template_id,
                   task_readiness.template_version, task_readiness.task_name,
                   task_readiness.automatic, task_readiness.next_attempt)
               IS DISTINCT FROM
                  (EXCLUDED.patient_id, EXCLUDED.template_id, EXCLUDED.template_version,
                   EXCLUDED.task_name, EXCLUDED.automatic, EXCLUDED.next_attempt)";
        Ok(Statements {
            lock_epoch: prepare(
                "SELECT epoch FROM hmis_pipeline_progress WHERE group_id = $1 FOR UPDATE".into(),
                "epoch check",
            )
            .await?,
            upsert_workflows: prepare(upsert_workflows, "upsert workflow_instances").await?,
            upsert_tasks: prepare(upsert_tasks, "upsert task_instances").await?,
            upsert_readiness: prepare(upsert_readiness.into(), "upsert task_readiness").await?,
            delete_workflows: prepare(
                "DELETE FROM workflow_instances WHERE workflow_instance_id = ANY($1::text[])"
                    .into(),
                "delete workflow_instances",
            )
            .await?,
            delete_tasks: prepare(
                "DELETE FROM task_instances WHERE task_instance_id = ANY($1::text[])".into(),
                "delete task_instances",
            )
            .await?,
            delete_readiness: prepare(
                "DELETE FROM task_readiness t
                 USING UNNEST($1::text[], $2::text[]) AS d(workflow_instance_id, task_def_id)
                 WHERE t.workflow_instance_id = d.workflow_instance_id
                   AND t.task_def_id = d.task_def_id"
                    .into(),
                "delete task_readiness",
            )
            .await?,
            upsert_orders: prepare(
                upsert_sql("orders", &["order_id"], ORDER_COLUMNS),
                "upsert orders",
            )
            .await?,
            // No updated_at: recorded_at says when the row was first written.
            upsert_transitions: prepare(
                upsert_sql_touching("order_transitions", &["event_id"], TRANSITION_COLUMNS, None),
                "upsert order_transitions",
            )
            .await?,
            upsert_compensations: prepare(
                upsert_sql(
                    "compensation_actions",
                    &["action_id"],
                    COMPENSATION_COLUMNS,
                ),
                "upsert compensation_actions",
            )
            .await?,
            upsert_breaches: prepare(
                upsert_sql_touching(
                    "sla_breaches",
                    &["task_instance_id", "attempt"],
                    BREACH_COLUMNS,
                    None,
                ),
                "upsert sla_breaches",
            )
            .await?,
            // An alert is a fact: raised once, by its first cause (a duplicate or a
            // re-derivation of the same alert id changes nothing, as on the topic).
            upsert_alerts: prepare(
                insert_new_sql("alerts", "alert_id", ALERT_COLUMNS),
                "insert alerts",
            )
            .await?,
            upsert_health: prepare(
                upsert_sql("component_health", &["component"], HEALTH_COLUMNS),
                "upsert component_health",
            )
            .await?,
            insert_audit: prepare(
                insert_new_sql("audit_log", "event_id", AUDIT_COLUMNS),
                "insert audit_log",
            )
            .await?,
            insert_errors: prepare(insert_errors_sql(), "insert error_reports").await?,
            delete_orders: prepare(
                "DELETE FROM orders WHERE order_id = ANY($1::text[])".into(),
                "delete orders",
            )
            .await?,
            delete_transitions: prepare(
                "DELETE FROM order_transitions WHERE event_id = ANY($1::text[])".into(),
                "delete order_transitions",
            )
            .await?,
            delete_compensations: prepare(
                "DELETE FROM compensation_actions WHERE action_id = ANY($1::text[])".into(),
                "delete compensation_actions",
            )
            .await?,
            delete_breaches: prepare(
                "DELETE FROM sla_breaches s
                 USING UNNEST($1::text[], $2::int4[]) AS d(task_instance_id, attempt)
                 WHERE s.task_instance_id = d.task_instance_id AND s.attempt = d.attempt"
                    .into(),
                "delete sla_breaches",
            )
            .await?,
            delete_alerts: prepare(
                "DELETE FROM alerts WHERE alert_id = ANY($1::text[])".into(),
                "delete alerts",
            )
            .await?,
            insert_outbox: prepare(
                // Derived events and alerts enter the outbox only with a first entry in the
                // ledger; dead letters are published once by `write_dead_letters`.
                "WITH u AS (
                     SELECT * FROM UNNEST($2::text[], $3::text[], $4::text[], $5::text[], $6::text[])
                          WITH ORDINALITY AS u(topic, key, event_id, event_type, payload, ord)),
                 first AS (
                     INSERT INTO hmis_published_events (group_id, topic, event_id)
                     SELECT $1, u.topic, u.event_id FROM u WHERE u.topic <> 'dead_letter'
                     ON CONFLICT DO NOTHING
                     RETURNING topic, event_id)
                 INSERT INTO hmis_outbox (group_id, topic, key, event_id, event_type, payload)
                 SELECT $1, u.topic, u.key, u.event_id, u.event_type, u.payload
                 FROM u
                 WHERE u.topic = 'dead_letter'
                    OR EXISTS (SELECT 1 FROM first f WHERE f.topic = u.topic AND f.event_id = u.event_id)
                 ORDER BY u.ord
                 RETURNING seq"
                    .into(),
                "insert hmis_outbox",
            )
            .await?,
            insert_dead_letters: prepare(
                "INSERT INTO dead_letters (topic, partition, \"offset\", key, payload,
                     payload_encoding, reason, detail, rejected_at, key_encoding)
                 SELECT * FROM UNNEST($1::text[], $2::int4[], $3::int8[], $4::text[], $5::text[],
                                      $6::text[], $7::text[], $8::text[], $9::timestamptz[],
                                      $10::text[])
                 ON CONFLICT (topic, partition, \"offset\") DO NOTHING
                 RETURNING topic, partition, \"offset\""
                    .into(),
                "insert dead_letters",
            )
            .await?,
            upsert_offsets: prepare(
                "INSERT INTO hmis_input_offsets (group_id, topic, partition, next_offset, updated_at)
                 SELECT $1, u.topic, u.partition, u.next_offset, now()
                 FROM UNNEST($2::text[], $3::int4[], $4::int8[]) AS u(topic, partition, next_offset)
                 ON CONFLICT (group_id, topic, partition) DO UPDATE
                 SET next_offset = EXCLUDED.next_offset, updated_at = now()"
                    .into(),
                "upsert hmis_input_offsets",
            )
            .await?,
            set_frontier: prepare(
                "UPDATE hmis_pipeline_progress SET frontier_ms = $2, updated_at = now()
                 WHERE group_id = $1"
                    .into(),
                "update hmis_pipeline_progress",
            )
            .await?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upsert_sql_updates_only_non_key_columns() {
        let sql = upsert_sql("t", &["id"], &[("id", "text"), ("v", "int4")]);
        assert_eq!(
            sql,
            "INSERT INTO t (id, v) SELECT * FROM UNNEST($1::text[], $2::int4[]) \
             ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v, updated_at = now() \
             WHERE (t.v) IS DISTINCT FROM (EXCLUDED.v)"
        );
    }

    #[test]
    fn upsert_sql_casts_text_to_numeric_and_jsonb_and_may_touch_nothing() {
        let sql = upsert_sql_touching(
            "t",
            &["id"],
            &[("id", "text"), ("n", "numeric"), ("j", "jsonb")],
            None,
        );
        assert_eq!(
            sql,
            "INSERT INTO t (id, n, j) SELECT * FROM UNNEST($1::text[], $2::text[]::numeric[], \
             $3::text[]::jsonb[]) ON CONFLICT (id) DO UPDATE SET n = EXCLUDED.n, j = EXCLUDED.j \
             WHERE (t.n, t.j) IS DISTINCT FROM (EXCLUDED.n, EXCLUDED.j)"
        );
    }

    #[test]
    fn every_column_list_matches_its_column_builder() {
        assert_eq!(ORDER_COLUMNS.len(), order_columns(&[]).unwrap().len());
        assert_eq!(
            TRANSITION_COLUMNS.len(),
            transition_columns(&[]).unwrap().len()
        );
        assert_eq!(
            COMPENSATION_COLUMNS.len(),
            compensation_columns(&[]).unwrap().len()
        );
        assert_eq!(BREACH_COLUMNS.len(), breach_columns(&[]).unwrap().len());
        assert_eq!(ALERT_COLUMNS.len(), alert_columns(&[]).unwrap().len());
        assert_eq!(HEALTH_COLUMNS.len(), health_columns(&[]).unwrap().len());
        assert_eq!(AUDIT_COLUMNS.len(), audit_columns(&[]).unwrap().len());
        assert_eq!(ERROR_COLUMNS.len(), error_columns(&[]).unwrap().len());
    }

    #[test]
    fn group_lock_keys_are_stable_and_distinct() {
        assert_eq!(group_lock_key("a"), group_lock_key("a"));
        assert_ne!(group_lock_key("a"), group_lock_key("b"));
    }

    #[test]
    fn millis_become_timestamps() {
        let t = timestamp(1_764_152_100_123).unwrap();
        assert_eq!(t.to_rfc3339(), "2025-11-26T10:15:00.123+00:00");
        assert!(timestamp(u64::MAX).is_err());
    }
}
