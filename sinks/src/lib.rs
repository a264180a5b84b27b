//! hmis-flow's output I/O: everything that leaves the process goes through this crate.
//!
//! The dataflow hands over one [`FlushBatch`](hmis_dataflows::output::FlushBatch) per
//! completed pipeline-clock interval. The sink makes it durable in **one PostgreSQL
//! transaction** (rows, records to publish, dead letters, input offsets, frontier), and a
//! separate publisher moves the committed records from the outbox table to Kafka:
//!
//! ```text
//!                         one transaction per FlushBatch (pg.rs)
//!  FlushBatch ──► PgSink::apply ─┬─► workflow_instances / task_instances / task_readiness
//!                               ├─► hmis_outbox            (derived events, alerts, DLQ docs)
//!                               ├─► dead_letters
//!                               ├─► hmis_input_offsets     (where consumption resumes)
//!                               └─► hmis_pipeline_progress (frontier; epoch fences old owners)
//!
//!  hmis_outbox ──► Publisher::publish_pending (outbox.rs) ──► workflow-derived-events
//!     (seq order)     explicit partition, header                system-alerts
//!                     hmis-outbox-seq, then DELETE              workflow-dead-letter
//! ```
//!
//! Input offsets are committed with the effects they caused, so after a crash the pipeline
//! resumes exactly where its last committed effects end. Kafka output never needs broker
//! transactions: on start the publisher reads back the last `hmis-outbox-seq` per output
//! partition and skips what is already there (see [`outbox`]).
//!
//! Errors of every kind are one type, [`SinkError`], classified transient or permanent in
//! one place, [`SinkError::is_transient`].
//!
//! # Layout
//! - [`mod@migrate`]: the embedded, versioned schema migrations of `migrations/`.
//! - [`pg`]: [`PgSink`]: claim a group, load progress, apply a batch.
//! - [`outbox`]: [`Publisher`]: outbox rows to Kafka, exactly once per record.
//! - [`topics`]: create the contract's topics.
//! - [`kafka`]: the one function every Kafka client is configured with (TLS, SASL, secrets).
//! - [`pg_tls`]: connecting to PostgreSQL, with libpq's `sslmode` / `sslrootcert`.
//! - [`redact`]: what log lines show of patient data (nothing, unless opted in).

pub mod kafka;
pub mod migrate;
pub mod outbox;
pub mod pg;
pub mod pg_tls;
pub mod redact;
pub mod topics;

pub use kafka::{KafkaClientConfig, KafkaOptions};
pub use migrate::migrate;
pub use outbox::{Publisher, PublisherConfig, TopicNames};
pub use pg::{PgSink, Progress};
pub use pg_tls::{PgTls, SslMode};
pub use topics::{create_topics, create_topics_with, default_topics, InputTopicNames, TopicSpec};

use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

/// Everything that can go wrong writing hmis-flow's output.
///
/// Whether to retry is decided by [`SinkError::is_transient`] alone.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// A PostgreSQL call failed; `context` says which one.
    #[error("postgres: {context}: {}", postgres_detail(source))]
    Postgres {
        /// What was being done, e.g. `"upsert task_instances"`.
        context: String,
        /// The driver's error (carries the SQLSTATE when the server raised it).
        #[source]
        source: tokio_postgres::Error,
    },
    /// A Kafka call failed; `context` says which one.
    #[error("kafka: {context}: {source}")]
    Kafka {
        /// What was being done, e.g. `"produce outbox seq 42 to system-alerts"`.
        context: String,
        /// The client's error.
        #[source]
        source: KafkaError,
    },
    /// Another instance claimed the group after us: this writer must stop.
    #[error(
        "group {group_id}: fenced off, our epoch is {ours} but the current one is {current:?}; \
         another instance took over"
    )]
    Fenced {
        /// The pipeline group.
        group_id: String,
        /// The epoch this writer claimed.
        ours: i64,
        /// The epoch in the database (`None`: the group's progress row is gone).
        current: Option<i64>,
    },
    /// [`PgSink::apply`] was called for a group this sink has not claimed.
    #[error("group {group_id} is not claimed by this sink: call PgSink::claim first")]
    NotClaimed {
        /// The pipeline group.
        group_id: String,
    },
    /// An applied migration's SQL differs from the one embedded in this build.
    #[error(
        "migration {version} ({name}) was changed after it was applied: checksum {applied} in \
         the database, {embedded} in this build; add a new migration instead of editing it"
    )]
    MigrationChanged {
        /// Migration number.
        version: i32,
        /// Migration file name without `.sql`.
        name: String,
        /// Checksum recorded when it was applied.
        applied: String,
        /// Checksum of the embedded SQL.
        embedded: String,
    },
    /// The database has a migration this build does not know (it is older than the schema).
    #[error("the database has migration {version} ({name}), which this build does not know")]
    UnknownMigration {
        /// Migration number.
        version: i32,
        /// Name recorded in the database.
        name: String,
    },
    /// A [`FlushBatch`](hmis_dataflows::output::FlushBatch) that cannot be written as is.
    #[error("invalid flush batch: {0}")]
    InvalidBatch(String),
    /// An output topic is missing or unusable.
    #[error("topic {topic}: {detail}")]
    Topic {
        /// The topic's name.
        topic: String,
        /// What is wrong with it.
        detail: String,
    },
    /// A Kafka operation did not finish in time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// A connection setting that cannot be used (e.g. a TLS mode or CA file).
    #[error("configuration: {0}")]
    Config(String),
}

impl SinkError {
    /// [`SinkError::Fenced`] unless `current`, the epoch in the group's progress row, is
    /// `ours`: the check every sink and publish transaction makes after locking that row.
    pub fn check_epoch(group_id: &str, ours: i64, current: Option<i64>) -> Result<(), SinkError> {
        if current == Some(ours) {
            return Ok(());
        }
        Err(SinkError::Fenced {
            group_id: group_id.to_string(),
            ours,
            current,
        })
    }

    /// Whether retrying the same operation later can succeed: the one place errors are
    /// classified.
    ///
    /// Transient (retry with capped backoff, keep the input paused, lose nothing):
    /// - PostgreSQL: connection failures and closed connections, SQLSTATE class `08`
    ///   (connection exception), `40001` (serialization failure), `40P01` (deadlock),
    ///   `57P01`–`57P03` (admin/crash shutdown, cannot connect now), class `53`
    ///   (insufficient resources);
    /// - Kafka: broker unreachable, timeouts, leadership changes, full queues, too few
    ///   in-sync replicas;
    /// - [`SinkError::Timeout`].
    ///
    /// Everything else is permanent: constraint violations, bad SQL, schema drift, fencing,
    /// invalid batches, missing topics, fatal idempotent-producer errors.
    pub fn is_transient(&self) -> bool {
        match self {
            SinkError::Postgres { source, .. } => postgres_is_transient(source),
            SinkError::Kafka { source, .. } => kafka_is_transient(source),
            SinkError::Timeout(_) => true,
            SinkError::Fenced { .. }
            | SinkError::NotClaimed { .. }
            | SinkError::MigrationChanged { .. }
            | SinkError::UnknownMigration { .. }
            | SinkError::InvalidBatch(_)
            | SinkError::Topic { .. }
            | SinkError::Config(_) => false,
        }
    }

    /// The SQLSTATE of a PostgreSQL error raised by the server, if any.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            SinkError::Postgres { source, .. } => source.code().map(|c| c.code()),
            _ => None,
        }
    }

    /// Wraps a PostgreSQL error with what was being done.
    pub(crate) fn pg(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> Self {
        let context = context.into();
        move |source| SinkError::Postgres { context, source }
    }

    /// Wraps a Kafka error with what was being done.
    pub(crate) fn kafka(context: impl Into<String>) -> impl FnOnce(KafkaError) -> Self {
        let context = context.into();
        move |source| SinkError::Kafka { context, source }
    }
}

/// What PostgreSQL said, in full: the driver's own text for a server error is just "db error",
/// which hides the message, the SQLSTATE, and the table, column and constraint involved.
/// Errors raised before the server answered carry their cause chain instead.
pub fn postgres_detail(err: &tokio_postgres::Error) -> String {
    use std::fmt::Write as _;
    if let Some(db) = err.as_db_error() {
        let mut out = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
        let mut field = |name: &str, v: Option<&str>| {
            if let Some(v) = v {
                let _ = write!(out, "; {name}: {v}");
            }
        };
        field("detail", db.detail());
        field("hint", db.hint());
        field("schema", db.schema());
        field("table", db.table());
        field("column", db.column());
        field("constraint", db.constraint());
        field("where", db.where_());
        return out;
    }
    error_chain(err)
}

/// An error and its sources, joined with `: ` (what `{:#}` prints for an `anyhow::Error`),
/// skipping a source whose text the previous one already ends with.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = inner.source();
    }
    out
}

impl SinkError {
    /// Whether this failure is caused by the *content* of what was written (a value the
    /// database or the driver refuses), not by the database, the network or a bug in the
    /// SQL: another write of the same batch without the offending item would succeed. The
    /// sink then isolates the item and dead-letters it instead of stopping (see
    /// [`PgSink::apply`]):
    /// - SQLSTATE class `22` (data exception: a value out of range, invalid text, a NUL),
    ///   `23` (integrity constraint violation), `54` (program limit exceeded: an index row
    ///   too large);
    /// - a value the driver cannot encode, and [`SinkError::InvalidBatch`].
    pub fn is_content_error(&self) -> bool {
        match self {
            SinkError::Postgres { source, .. } => match source.code() {
                Some(code) => {
                    let c = code.code();
                    c.starts_with("22") || c.starts_with("23") || c.starts_with("54")
                }
                None => source
                    .to_string()
                    .starts_with("error serializing parameter"),
            },
            SinkError::InvalidBatch(_) => true,
            _ => false,
        }
    }
}

/// SQLSTATE classes and codes after which a retry can succeed.
fn sqlstate_is_transient(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || matches!(code, "40001" | "40P01" | "57P01" | "57P02" | "57P03")
}

fn postgres_is_transient(err: &tokio_postgres::Error) -> bool {
    if let Some(code) = err.code() {
        return sqlstate_is_transient(code.code());
    }
    if err.is_closed() {
        return true;
    }
    // Without a SQLSTATE the server never answered: an I/O failure underneath (connect,
    // read, write) is transient; conversion and protocol errors are bugs, hence permanent.
    let mut source = std::error::Error::source(err);
    while let Some(inner) = source {
        if inner.is::<std::io::Error>() {
            return true;
        }
        source = inner.source();
    }
    // tokio-postgres reports its connect timeout without a source.
    err.to_string().contains("timeout")
}

fn kafka_is_transient(err: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    match err {
        // The client went away mid-operation (producer dropped or reset): redo it.
        KafkaError::Canceled => true,
        _ => matches!(
            err.rdkafka_error_code(),
            Some(
                C::BrokerTransportFailure
                    | C::Resolve
                    | C::MessageTimedOut
                    | C::AllBrokersDown
                    | C::OperationTimedOut
                    | C::QueueFull
                    | C::TimedOutQueue
                    | C::WaitingForCoordinator
                    | C::Retry
                    | C::LeaderNotAvailable
                    | C::NotLeaderForPartition
                    | C::RequestTimedOut
                    | C::ReplicaNotAvailable
                    | C::NetworkException
                    | C::CoordinatorLoadInProgress
                    | C::CoordinatorNotAvailable
                    | C::NotCoordinator
                    | C::NotEnoughReplicas
                    | C::NotEnoughReplicasAfterAppend
                    | C::PreferredLeaderNotAvailable
                    // The broker failed inside (Kafka's UNKNOWN_SERVER_ERROR, storage errors):
                    // nisshi reports its SQLite store being busy this way under load. The
                    // outbox keeps the records and the producer is idempotent, so retrying
                    // is safe; readiness reports the publisher failing meanwhile.
                    | C::Unknown
                    | C::KafkaStorageError
                    // The idempotent producer failed fatally (e.g. on such a broker error
                    // with the gapless guarantee) and purged its queue: the next attempt
                    // replaces the producer and re-reads the published positions
                    // (`Publisher::publish_pending`), so nothing is lost or doubled.
                    | C::PurgeQueue
                    | C::PurgeInflight
                    | C::Fatal
            )
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_are_classified() {
        for transient in [
            "08000", "08006", "08P01", "40001", "40P01", "57P01", "57P03", "53100",
        ] {
            assert!(sqlstate_is_transient(transient), "{transient}");
        }
        for permanent in [
            "23505", "42P01", "22003", "57014", "P0001", "42501", "40002",
        ] {
            assert!(!sqlstate_is_transient(permanent), "{permanent}");
        }
    }

    #[test]
    fn kafka_errors_are_classified() {
        let transient = KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull);
        let permanent = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        assert!(kafka_is_transient(&transient));
        assert!(!kafka_is_transient(&permanent));
        for code in [RDKafkaErrorCode::Unknown, RDKafkaErrorCode::PurgeQueue] {
            assert!(kafka_is_transient(&KafkaError::MessageProduction(code)));
        }
        let fenced = SinkError::Fenced {
            group_id: "g".into(),
            ours: 1,
            current: Some(2),
        };
        assert!(!fenced.is_transient());
        assert!(SinkError::Timeout("x".into()).is_transient());
    }
}
