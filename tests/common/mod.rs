//! Helpers for the process-level fault tests (`tests/fault.rs`): private topics, schemas and
//! groups on the shared services; the `hmis-flow` binary as a child process that can be
//! killed, signalled and restarted; private PostgreSQL and broker instances that can be
//! restarted without disturbing anyone else; and comparisons of tables and output topics.
//!
//! Addresses of the shared services come from `HMIS_TEST_BROKERS` and
//! `HMIS_TEST_DATABASE_URL` (`scripts/test.sh` and `.ci/run` set them).

#![allow(dead_code)] // each test binary uses a part

pub mod schemas;

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use hmis_flow::config::{ClockMode, Config, Topics};

/// The `hmis-flow` binary built for this test run.
pub const BIN: &str = env!("CARGO_BIN_EXE_hmis-flow");

/// Tables that hold the relational picture, compared between runs.
pub const TABLES: &[&str] = &[
    "workflow_instances",
    "task_instances",
    "task_readiness",
    "dead_letters",
    "orders",
    "order_transitions",
    "compensation_actions",
    "sla_breaches",
    "alerts",
    "component_health",
    "audit_log",
    "error_reports",
    "analytics_windows",
];

/// Columns left out of the comparison: database time of the write (`updated_at`,
/// `recorded_at`), surrogate keys (`id`, `audit_id`), and pipeline-clock values that depend
/// on how input was batched rather than on the input (`ready_since`: the flush that made a
/// pair ready; `rejected_at`: the clock when a record without an eventTime was read).
pub const VOLATILE_COLUMNS: &[&str] = &[
    "updated_at",
    "recorded_at",
    "id",
    "audit_id",
    "ready_since",
    "rejected_at",
];

pub fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: start the services with `scripts/services.sh start` and `eval \"$(scripts/services.sh env)\"`, or run scripts/test.sh")
    })
}

pub fn unique(tag: &str) -> String {
    format!("{tag}{}_{}", std::process::id(), rand::random::<u32>())
}

/// One tokio runtime for the helpers' PostgreSQL and Kafka calls.
pub fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    })
}

/// Runs the heavy tests one at a time: each starts pipelines with two worker threads, and
/// the kill timings and time budgets assume the machine's two cores are theirs.
pub fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A free TCP port on loopback (bound and released: good enough for private services).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `cond` every 50 ms until it holds; panics with `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `base` with `search_path` set to `schema`.
pub fn with_schema(base: &str, schema: &str) -> String {
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}options=-c%20search_path%3D{schema}")
}

pub fn pg_execute(url: &str, sql: &str) {
    let url = url.to_string();
    let sql = sql.to_string();
    rt().block_on(async move {
        let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect to PostgreSQL");
        tokio::spawn(conn);
        c.batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    })
}

/// A config with private topics (prefix = group id), a private schema and group, for the
/// given services; topics and schema are created.
pub fn private_config(tag: &str, brokers: &str, database: &str) -> Config {
    let id = unique(tag);
    pg_execute(database, &format!("CREATE SCHEMA \"{id}\""));
    let p = |name: &str| format!("{id}.{name}");
    let d = Topics::default();
    let mut cfg = Config {
        brokers: brokers.to_string(),
        database_url: with_schema(database, &id),
        group_id: id.clone(),
        clock: ClockMode::Event,
        workers: 2,
        topics: Topics {
            definitions: p(&d.definitions),
            tasks: p(&d.tasks),
            orders: p(&d.orders),
            workflows: p(&d.workflows),
            system: p(&d.system),
            derived: p(&d.derived),
            alerts: p(&d.alerts),
            dead_letter: p(&d.dead_letter),
            analytics: p(&d.analytics),
        },
        ..Config::default()
    };
    if let Ok(ms) = std::env::var("HMIS_FAULT_RETIRE_MS") {
        cfg.rules.lifecycle.retire_after_ms = ms.parse().unwrap();
    }
    rt().block_on(hmis_flow::demo::create_topics(&cfg))
        .expect("create topics");
    cfg
}

/// Another pipeline on the same input topics: its own group, schema (in `database`) and
/// output topics, e.g. an uninterrupted reference run.
pub fn sibling_config(cfg: &Config, tag: &str, database: &str) -> Config {
    let id = unique(tag);
    pg_execute(database, &format!("CREATE SCHEMA \"{id}\""));
    let p = |name: &str| format!("{id}.{name}");
    let d = Topics::default();
    let mut other = cfg.clone();
    other.database_url = with_schema(database, &id);
    other.group_id = id.clone();
    other.topics.derived = p(&d.derived);
    other.topics.alerts = p(&d.alerts);
    other.topics.dead_letter = p(&d.dead_letter);
    other.topics.analytics = p(&d.analytics);
    rt().block_on(hmis_flow::demo::create_topics(&other))
        .expect("create output topics");
    other
}

/// A folder for config files and logs; removed by [`Scratch::done`] (kept after a failure).
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("hmis-fault-{}", unique(tag)));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    pub fn done(self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `hmis-flow run` as a child process with a config file; stdout and stderr go to files.
pub struct Pipeline {
    pub name: String,
    child: Child,
    pub started: Instant,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

impl Pipeline {
    /// Starts `hmis-flow run --config <cfg as TOML> <args>` (no `HMIS_*` variables leak in
    /// from the test's environment: the config file says everything).
    pub fn start(cfg: &Config, scratch: &Scratch, name: &str, args: &[&str]) -> Pipeline {
        Pipeline::start_with_env(cfg, scratch, name, args, &[])
    }

    /// [`Pipeline::start`] with `env` set on top (after the test's `HMIS_*` are removed).
    pub fn start_with_env(
        cfg: &Config,
        scratch: &Scratch,
        name: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Pipeline {
        let config = scratch.path(&format!("{name}.toml"));
        std::fs::write(&config, toml::to_string(cfg).expect("config as TOML")).unwrap();
        let stdout = scratch.path(&format!("{name}.out"));
        let stderr = scratch.path(&format!("{name}.err"));
        let mut cmd = Command::new(BIN);
        cmd.arg("run").arg("--config").arg(&config).args(args);
        for (k, _) in std::env::vars() {
            if k.starts_with("HMIS_") {
                cmd.env_remove(k);
            }
        }
        let log = std::env::var("HMIS_FAULT_LOG")
            .unwrap_or_else(|_| "warn,hmis_flow=info,hmis_sinks=info".into());
        cmd.envs(env.iter().copied());
        cmd.env("HMIS_LOG", log)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap());
        let child = cmd.spawn().expect("start hmis-flow");
        Pipeline {
            name: name.to_string(),
            child,
            started: Instant::now(),
            stdout,
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} {}", self.pid());
    }

    /// The exit status if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Waits up to `timeout` for the exit; `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for a successful exit; panics with the logs otherwise.
    pub fn expect_success(&mut self, timeout: Duration) {
        match self.wait_timeout(timeout) {
            Some(s) if s.success() => {}
            Some(s) => panic!("{} exited with {s}\n{}", self.name, self.logs()),
            None => {
                self.kill9();
                panic!(
                    "{} did not finish within {timeout:?}\n{}",
                    self.name,
                    self.logs()
                )
            }
        }
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// The tail of stdout and stderr, for failure messages.
    pub fn logs(&self) -> String {
        let tail = |p: &Path| {
            let s = std::fs::read_to_string(p).unwrap_or_default();
            let lines: Vec<&str> = s
                .lines()
                .filter(|l| !l.contains("PartitionEOF") && !l.contains("CONFWARN"))
                .collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        format!(
            "--- {} stdout ---\n{}\n--- stderr (tail) ---\n{}",
            self.name,
            tail(&self.stdout),
            tail(&self.stderr)
        )
    }

    /// "read N records" of the summary line, once it has exited.
    pub fn records_read(&self) -> Option<u64> {
        let out = self.output();
        let rest = out.split("read ").nth(1)?;
        rest.split_whitespace().next()?.parse().ok()
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What PostgreSQL holds about a group's progress.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    pub frontier: Option<i64>,
    pub epoch: i64,
    /// Sum of the committed next offsets over all input partitions: on topics written once
    /// from offset 0, the number of input records whose effects are committed.
    pub offsets: i64,
    /// Outbox rows committed and not yet published.
    pub outbox: i64,
}

/// The group's progress, or `None` while its tables do not exist yet (or PostgreSQL is down).
pub fn progress(cfg: &Config) -> Option<Progress> {
    let url = cfg.database_url.clone();
    let group = cfg.group_id.clone();
    rt().block_on(async move {
        let connect = tokio_postgres::connect(&url, tokio_postgres::NoTls);
        let (c, conn) = tokio::time::timeout(Duration::from_secs(5), connect).await.ok()?.ok()?;
        tokio::spawn(conn);
        let p = c.query_opt("SELECT frontier_ms, epoch FROM hmis_pipeline_progress WHERE group_id = $1", &[&group]).await.ok()?;
        let offsets: i64 = c
            .query_one("SELECT coalesce(sum(next_offset), 0)::bigint FROM hmis_input_offsets WHERE group_id = $1", &[&group])
            .await
            .ok()?
            .get(0);
        let outbox: i64 = c.query_one("SELECT count(*) FROM hmis_outbox WHERE group_id = $1", &[&group]).await.ok()?.get(0);
        Some(Progress {
            frontier: p.as_ref().and_then(|r| r.get(0)),
            epoch: p.as_ref().map(|r| r.get(1)).unwrap_or(0),
            offsets,
            outbox,
        })
    })
}

/// Every row of `table`, as canonical JSON text without [`VOLATILE_COLUMNS`], sorted.
pub fn table_rows(cfg: &Config, table: &str) -> Vec<String> {
    let url = cfg.database_url.clone();
    let sql = format!("SELECT (to_jsonb(t) - $1::text[])::text FROM {table} t");
    let volatile: Vec<String> = VOLATILE_COLUMNS.iter().map(|s| s.to_string()).collect();
    let mut rows: Vec<String> = rt().block_on(async move {
        let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        c.query(&sql, &[&volatile])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .iter()
            .map(|r| r.get(0))
            .collect()
    });
    rows.sort();
    rows
}

/// The rows of a query returning one text column, sorted.
pub fn query_texts(cfg: &Config, sql: &str) -> Vec<String> {
    let url = cfg.database_url.clone();
    let sql = sql.to_string();
    let mut rows: Vec<String> = rt().block_on(async move {
        let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        c.query(&sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .iter()
            .map(|r| r.get(0))
            .collect()
    });
    rows.sort();
    rows
}

/// Asserts that every table of [`TABLES`] holds the same rows in both schemas; returns the
/// row count per table.
pub fn assert_same_tables(got: &Config, want: &Config) -> BTreeMap<&'static str, usize> {
    let mut counts = BTreeMap::new();
    let mut diffs = Vec::new();
    for table in TABLES {
        let g = table_rows(got, table);
        let w = table_rows(want, table);
        if g != w {
            let gs: BTreeSet<&String> = g.iter().collect();
            let ws: BTreeSet<&String> = w.iter().collect();
            let extra: Vec<_> = gs.difference(&ws).take(3).collect();
            let missing: Vec<_> = ws.difference(&gs).take(3).collect();
            diffs.push(format!(
                "{table}: {} rows, want {}; e.g. unexpected {extra:#?}\n missing {missing:#?}",
                g.len(),
                w.len()
            ));
        }
        counts.insert(*table, w.len());
    }
    assert!(
        diffs.is_empty(),
        "tables differ from the uninterrupted run:\n{}",
        diffs.join("\n")
    );
    counts
}

/// One record of an output topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutMsg {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub payload: String,
    /// The `hmis-event-id` header.
    pub event_id: String,
}

/// Reads a topic from its beginning to its current end (read_committed), in partition and
/// offset order.
pub fn read_topic(brokers: &str, topic: &str) -> Vec<OutMsg> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("hmis-fault-reader-{}", unique("r")))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "50")
        .create()
        .unwrap();
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    let mut ends = BTreeMap::new();
    for p in md
        .topics()
        .first()
        .map(|t| t.partitions())
        .unwrap_or_default()
    {
        let (low, high) = consumer
            .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
            .unwrap();
        if high > low {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                .unwrap();
            ends.insert(p.id(), high);
        }
    }
    let mut out = Vec::new();
    if ends.is_empty() {
        return out;
    }
    consumer.assign(&tpl).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut done = BTreeSet::new();
    while done.len() < ends.len() {
        assert!(Instant::now() < deadline, "timed out reading {topic}");
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let event_id = m
                    .headers()
                    .and_then(|h| {
                        h.iter()
                            .find(|h| h.key == hmis_sinks::outbox::EVENT_ID_HEADER)
                            .and_then(|h| h.value)
                    })
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default();
                out.push(OutMsg {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    payload: String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
                    event_id,
                });
                if m.offset() + 1 >= ends[&m.partition()] {
                    done.insert(m.partition());
                }
            }
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            None => {}
        }
    }
    out.sort_by_key(|m| (m.partition, m.offset));
    out
}

/// Event ids that occur more than once.
pub fn repeated(msgs: &[OutMsg]) -> Vec<(String, usize)> {
    let mut n: BTreeMap<&str, usize> = BTreeMap::new();
    for m in msgs {
        *n.entry(m.event_id.as_str()).or_default() += 1;
    }
    n.into_iter()
        .filter(|(_, c)| *c > 1)
        .map(|(id, c)| (id.to_string(), c))
        .collect()
}

/// Asserts that each output topic of `got` holds each event id exactly once, the same ids
/// as `want`'s, and (derived events) the same payloads in the same order per key. Returns
/// the number of records per output (derived, alerts, dead letters).
pub fn assert_same_outputs(got: &Config, want: &Config) -> (usize, usize, usize) {
    let mut sizes = Vec::new();
    for (g, w, exact) in [
        (&got.topics.derived, &want.topics.derived, true),
        (&got.topics.alerts, &want.topics.alerts, true),
        // A dead letter's document carries rejectedAt, the clock when the record was read.
        (&got.topics.dead_letter, &want.topics.dead_letter, false),
    ] {
        let gm = read_topic(&got.brokers, g);
        let wm = read_topic(&want.brokers, w);
        let twice = repeated(&gm);
        // Where the copies are (adjacent offsets: a producer retry; apart: emitted twice).
        let at: Vec<(i32, i64)> = gm
            .iter()
            .filter(|m| twice.iter().take(5).any(|(id, _)| *id == m.event_id))
            .map(|m| (m.partition, m.offset))
            .collect();
        assert!(
            twice.is_empty(),
            "{g}: {} event ids published more than once, e.g. {:?} at (partition, offset) {at:?}",
            twice.len(),
            &twice[..twice.len().min(5)]
        );
        // The uninterrupted run too: a rule that publishes one eventId twice is a bug of the
        // rules, not of the restart.
        let ref_twice = repeated(&wm);
        assert!(
            ref_twice.is_empty(),
            "{w} (uninterrupted run): {} event ids published more than once, e.g. {:?}",
            ref_twice.len(),
            &ref_twice[..ref_twice.len().min(5)]
        );
        assert!(
            gm.iter().all(|m| !m.event_id.is_empty()),
            "{g}: every record carries its event id header"
        );
        let gi: BTreeSet<&str> = gm.iter().map(|m| m.event_id.as_str()).collect();
        let wi: BTreeSet<&str> = wm.iter().map(|m| m.event_id.as_str()).collect();
        if gi != wi {
            let extra: Vec<_> = gi.difference(&wi).take(5).collect();
            let missing: Vec<_> = wi.difference(&gi).take(5).collect();
            panic!("{g}: {} event ids, the uninterrupted run has {}; unexpected {extra:?}, missing {missing:?}", gi.len(), wi.len());
        }
        if exact {
            // Per key, the same records in the same order (contract §8, Ordering).
            let by_key = |ms: &[OutMsg]| {
                let mut k: BTreeMap<Option<String>, Vec<String>> = BTreeMap::new();
                for m in ms {
                    k.entry(m.key.clone()).or_default().push(m.payload.clone());
                }
                k
            };
            let (gk, wk) = (by_key(&gm), by_key(&wm));
            if gk != wk {
                let bad: Vec<_> = wk
                    .iter()
                    .filter(|(k, v)| gk.get(*k) != Some(v))
                    .take(1)
                    .collect();
                let (key, want_seq) = bad[0];
                panic!("{g}: records of key {key:?} differ from the uninterrupted run:\n got {:#?}\nwant {want_seq:#?}", gk.get(key));
            }
        }
        sizes.push(gm.len());
    }
    (sizes[0], sizes[1], sizes[2])
}

// ---------------------------------------------------------------- private services ----

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Runs a shell command line as the PostgreSQL cluster owner (`postgres` when root).
fn as_pg(cmdline: &str) -> std::process::Output {
    let mut cmd = if is_root() {
        let mut c = Command::new("su");
        c.args(["postgres", "-s", "/bin/bash", "-c", cmdline])
            .current_dir("/");
        c
    } else {
        let mut c = Command::new("bash");
        c.args(["-c", cmdline]);
        c
    };
    cmd.output().expect("run a PostgreSQL command")
}

/// A PostgreSQL 15 cluster of our own (initdb in a temp folder, loopback, a free port), so
/// that it can be stopped and restarted under a running pipeline.
pub struct PrivatePg {
    pub dir: PathBuf,
    pub port: u16,
    bin: PathBuf,
}

impl PrivatePg {
    pub fn start() -> PrivatePg {
        let bin = PathBuf::from(
            std::env::var("HMIS_PGBIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into()),
        );
        assert!(
            bin.join("initdb").exists(),
            "PostgreSQL 15 binaries not found in {} (set HMIS_PGBIN)",
            bin.display()
        );
        let dir = std::env::temp_dir().join(format!("hmis-fault-pg-{}", unique("")));
        std::fs::create_dir_all(&dir).unwrap();
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:", dir.to_str().unwrap()])
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown {}", dir.display());
        }
        let out = as_pg(&format!(
            "'{}/initdb' -D '{}/data' --auth=trust --username=postgres --encoding=UTF8 --locale=C.UTF-8",
            bin.display(),
            dir.display()
        ));
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pg = PrivatePg {
            dir,
            port: free_port(),
            bin,
        };
        pg.start_again();
        pg
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn start_again(&self) {
        let out = as_pg(&format!(
            "'{}/pg_ctl' start -w -t 60 -D '{d}/data' -l '{d}/server.log' -o \"-p {} -c listen_addresses=127.0.0.1 -k '{d}'\"",
            self.bin.display(),
            self.port,
            d = self.dir.display()
        ));
        assert!(
            out.status.success(),
            "pg_ctl start: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `pg_ctl stop -m immediate`: like a crash, every connection is cut at once.
    pub fn crash(&self) {
        let out = as_pg(&format!(
            "'{}/pg_ctl' stop -w -m immediate -D '{}/data'",
            self.bin.display(),
            self.dir.display()
        ));
        assert!(
            out.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let _ = as_pg(&format!(
            "'{}/pg_ctl' stop -w -m fast -D '{}/data'",
            self.bin.display(),
            self.dir.display()
        ));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A nisshi broker of our own with SQLite storage (durable across its restarts) in a temp
/// folder, on a free port.
pub struct PrivateBroker {
    pub dir: PathBuf,
    pub port: u16,
    bin: PathBuf,
    child: Option<Child>,
}

impl PrivateBroker {
    pub fn start() -> PrivateBroker {
        let on_path = std::env::var("PATH")
            .unwrap_or_default()
            .split(':')
            .map(|d| Path::new(d).join("nisshi"))
            .find(|p| p.exists());
        let cargo_home = std::env::var("CARGO_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|_| PathBuf::from(env("HOME")).join(".cargo"));
        let bin = on_path.unwrap_or_else(|| cargo_home.join("bin/nisshi"));
        assert!(
            bin.exists(),
            "nisshi not found (scripts/services.sh start installs it)"
        );
        let dir = std::env::temp_dir().join(format!("hmis-fault-nisshi-{}", unique("")));
        std::fs::create_dir_all(&dir).unwrap();
        let mut b = PrivateBroker {
            dir,
            port: free_port(),
            bin,
            child: None,
        };
        b.start_again();
        b
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "broker already running");
        let url = format!("tcp://{}", self.brokers());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("nisshi.log"))
            .unwrap();
        let child = Command::new(&self.bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args([
                "--storage-engine",
                "sqlite://nisshi.db",
                "--group-initial-rebalance-delay",
                "0s",
            ])
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start nisshi");
        self.child = Some(child);
        let brokers = self.brokers();
        wait_until(Duration::from_secs(60), "the private broker", || {
            let c: BaseConsumer = match ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .create()
            {
                Ok(c) => c,
                Err(_) => return false,
            };
            c.fetch_metadata(None, Duration::from_secs(2))
                .map(|m| !m.brokers().is_empty())
                .unwrap_or(false)
        });
    }

    /// `kill -9`: the broker crashes, clients see their connections cut at once.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops it with SIGTERM (a clean shutdown), waiting up to 30 s, then SIGKILL.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while child.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
