//! One typed configuration for every command.
//!
//! Precedence, lowest first: built-in defaults (the contract's), a TOML file (`--config` /
//! `HMIS_CONFIG`), environment variables (`HMIS_*`), command-line flags. Every field is
//! documented here; `docs/configuration.md` lists them with their variables.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use hmis_sinks::{KafkaOptions, PgTls, SslMode};
use serde::{Deserialize, Serialize};

/// Which clock drives the pipeline (contract §8).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ClockMode {
    /// The wall clock: deadlines fire even when no event arrives.
    Wall,
    /// The input watermark: deterministic replays, backfills and tests.
    Event,
}

/// Topic names (contract §1 defaults).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Topics {
    /// Compacted workflow templates, key `templateId:version`.
    pub definitions: String,
    /// TASK_* events, key taskInstanceId.
    pub tasks: String,
    /// ORDER_* events, key orderId.
    pub orders: String,
    /// Upstream WORKFLOW_* events, key workflowInstanceId.
    pub workflows: String,
    /// System events, key component.
    pub system: String,
    /// Derived events out, key workflowInstanceId.
    pub derived: String,
    /// Alerts out, key source.
    pub alerts: String,
    /// Dead letters out, key the input's key.
    pub dead_letter: String,
    /// Windowed analytics out (contract §10).
    pub analytics: String,
}

impl Default for Topics {
    fn default() -> Self {
        Topics {
            definitions: "workflow-definitions".into(),
            tasks: "workflow-task-events".into(),
            orders: "workflow-order-events".into(),
            workflows: "workflow-state-events".into(),
            system: "system-events".into(),
            derived: "workflow-derived-events".into(),
            alerts: "system-alerts".into(),
            dead_letter: "workflow-dead-letter".into(),
            analytics: "workflow-analytics".into(),
        }
    }
}

impl Topics {
    /// The name of an input topic by role.
    pub fn input(&self, t: hmis_dataflows::events::InputTopic) -> &str {
        use hmis_dataflows::events::InputTopic::*;
        match t {
            Definitions => &self.definitions,
            Tasks => &self.tasks,
            Orders => &self.orders,
            Workflows => &self.workflows,
            System => &self.system,
        }
    }
}

/// The whole configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Kafka bootstrap servers (`HMIS_BROKERS`).
    pub brokers: String,
    /// PostgreSQL connection URL (`HMIS_DATABASE_URL`). libpq's `sslmode` and
    /// `sslrootcert` parameters in it override `database_sslmode` and `database_sslrootcert`.
    pub database_url: String,
    /// PostgreSQL TLS, libpq's `sslmode`: `disable`, `prefer` (the default: TLS if the
    /// server offers it, unchecked), `require`, `verify-ca`, `verify-full` (docs/security.md).
    pub database_sslmode: Option<SslMode>,
    /// CA certificates (PEM) the PostgreSQL server's certificate must chain up to (libpq's
    /// `sslrootcert`); needed by `verify-ca` and `verify-full`.
    pub database_sslrootcert: Option<PathBuf>,
    /// Identity of this pipeline: the PostgreSQL progress rows, the fencing epoch and the
    /// Kafka consumer group used for lag monitoring (`HMIS_GROUP_ID`).
    pub group_id: String,
    /// Timely worker threads (`HMIS_WORKERS`). Input partitions are spread over them.
    pub workers: usize,
    /// `wall` or `event` (`HMIS_CLOCK`).
    pub clock: ClockMode,
    /// In `clock = event`, how far the watermark trails the inputs, in ms (`HMIS_ALLOWED_LATENESS_MS`).
    pub allowed_lateness_ms: u64,
    /// Address of the HTTP endpoints (`/health/live`, `/health/ready`, `/metrics`), if any
    /// (`HMIS_HTTP`): `PORT` or `:PORT` listens on loopback, `IP:PORT` where it says.
    #[serde(deserialize_with = "crate::http::deserialize_listen_addr")]
    pub http: Option<SocketAddr>,
    /// Read every input partition to the end offset it had at start, make every effect
    /// durable, then exit 0 (`HMIS_UNTIL_CAUGHT_UP`).
    pub until_caught_up: bool,
    /// Replication factor for `topics create` (`HMIS_REPLICATION_FACTOR`); 3 in production.
    pub replication_factor: i32,
    /// Records larger than this many bytes are dead-lettered unread (`HMIS_MAX_RECORD_BYTES`).
    pub max_record_bytes: usize,
    /// Most records taken from Kafka per worker before the dataflow runs (`HMIS_POLL_BATCH`).
    pub poll_batch: usize,
    /// How often the wall clock ticks the dataflow and batches are flushed, in ms (`HMIS_TICK_MS`).
    pub tick_ms: u64,
    /// Seconds to wait for another instance's lock on `group_id` before giving up.
    pub lock_wait_secs: u64,
    /// Benchmarks only (`run --discard-output`): computes everything, then drops the rows,
    /// derived events and offsets instead of writing them, so a run measures reading and
    /// the dataflow without PostgreSQL or Kafka output. Nothing is committed: the next run
    /// starts where this one did.
    pub discard_output: bool,
    /// Topic names.
    pub topics: Topics,
    /// librdkafka options for every Kafka client (e.g. `security.protocol`, `ssl.*`,
    /// `sasl.*`); `HMIS_KAFKA__<PROP>` and `HMIS_KAFKA__<PROP>__FILE` variables override them
    /// ([`Config::apply_env`]). Secret values are redacted in `Debug` output.
    pub kafka: KafkaOptions,
    /// Rule parameters: `[rules.time]` (stale_after_ms, re_escalate_after_ms,
    /// max_escalation_level), `[rules.eligibility]` (by_type, other), `[rules.orders]`
    /// (fulfillment_minutes, auto_activate, alert_source), `[rules.lifecycle]`
    /// (unknown_reference_grace_ms, retire_after_ms, tombstone_retention_ms).
    /// `rules.orders.topic` and the lifecycle's topic names are set from `topics`.
    pub rules: hmis_dataflows::RulesConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            brokers: "127.0.0.1:19092".into(),
            database_url: "postgres://postgres@127.0.0.1:15432/hmis".into(),
            database_sslmode: None,
            database_sslrootcert: None,
            group_id: "hmis-flow".into(),
            workers: 1,
            clock: ClockMode::Wall,
            allowed_lateness_ms: 0,
            http: None,
            until_caught_up: false,
            replication_factor: 1,
            max_record_bytes: 1 << 20,
            poll_batch: 2_000,
            tick_ms: 100,
            lock_wait_secs: 30,
            discard_output: false,
            topics: Topics::default(),
            kafka: KafkaOptions::default(),
            rules: hmis_dataflows::RulesConfig::default(),
        }
    }
}

impl Config {
    /// Loads a TOML file over the defaults.
    pub fn from_file(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))
    }

    /// Applies the environment's `HMIS_KAFKA__<PROP>` (a librdkafka property in upper case,
    /// `.` written `_`) and `HMIS_KAFKA__<PROP>__FILE` (a file holding the value, e.g. a
    /// mounted secret) variables over `[kafka]`. The other `HMIS_*` variables are read with
    /// the command-line flags.
    pub fn apply_env(&mut self) -> anyhow::Result<()> {
        Ok(self.kafka.apply_env(std::env::vars_os())?)
    }

    /// The PostgreSQL TLS settings of the config file (the URL's parameters override them).
    pub fn database_tls(&self) -> PgTls {
        PgTls {
            sslmode: self.database_sslmode,
            sslrootcert: self.database_sslrootcert.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_overrides_defaults_and_rejects_unknown_keys() {
        let cfg: Config = toml::from_str(
            r#"
            brokers = "b:9092"
            clock = "event"
            [topics]
            tasks = "t"
            [kafka]
            "security.protocol" = "SASL_SSL"
            [rules.time]
            stale_after_ms = 1000
            [rules.orders.fulfillment_minutes]
            LAB_TEST = 5
            [rules.lifecycle]
            retire_after_ms = 60000
            "#,
        )
        .unwrap();
        assert_eq!(cfg.brokers, "b:9092");
        assert_eq!(cfg.clock, ClockMode::Event);
        assert_eq!(cfg.topics.tasks, "t");
        assert_eq!(
            cfg.topics.orders, "workflow-order-events",
            "unset fields keep their defaults"
        );
        assert_eq!(cfg.kafka["security.protocol"], "SASL_SSL");
        assert_eq!(cfg.rules.time.stale_after_ms, 1000);
        assert_eq!(cfg.rules.time.re_escalate_after_ms, 3_600_000);
        assert_eq!(cfg.rules.orders.fulfillment_minutes["LAB_TEST"], 5);
        assert_eq!(cfg.rules.lifecycle.retire_after_ms, 60_000);
        assert_eq!(cfg.rules.lifecycle.unknown_reference_grace_ms, 600_000);
        assert!(toml::from_str::<Config>("database_sslmode = \"verify-full\"").is_ok());
        assert!(toml::from_str::<Config>("database_sslmode = \"sometimes\"").is_err());
        assert!(
            toml::from_str::<Config>("brokerz = \"x\"").is_err(),
            "a misspelled key is an error"
        );
        assert!(toml::from_str::<Config>("[rules.time]\nstale_after = 1").is_err());
    }

    #[test]
    fn tls_settings_and_redacted_secrets() {
        let cfg: Config = toml::from_str(
            r#"
            database_sslmode = "verify-full"
            database_sslrootcert = "/etc/hmis/pg-ca.pem"
            [kafka]
            "security.protocol" = "SASL_SSL"
            "sasl.mechanism" = "SCRAM-SHA-512"
            "sasl.username" = "hmis"
            "sasl.password" = "pa55-in-the-file"
            "#,
        )
        .unwrap();
        let tls = cfg.database_tls();
        assert_eq!(tls.sslmode, Some(SslMode::VerifyFull));
        assert_eq!(tls.sslrootcert, Some(PathBuf::from("/etc/hmis/pg-ca.pem")));
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("pa55-in-the-file"), "{shown}");
        assert!(shown.contains("SCRAM-SHA-512"), "{shown}");
        // Serialized (e.g. for a child process's config file), the value is kept.
        let again: Config = toml::from_str(&toml::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(again.kafka.get("sasl.password"), Some("pa55-in-the-file"));
        assert_eq!(again, cfg);
    }
}
