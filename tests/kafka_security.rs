//! Kafka TLS and SASL (docs/security.md): every client the binary makes is configured by
//! `hmis_sinks::kafka::client_config` with the operator's options, secrets never show, and
//! the whole pipeline runs against a broker that accepts only TLS + SCRAM — with PostgreSQL
//! over `verify-full` TLS at the same time.
//!
//! The first three tests need no services. The end-to-end tests start their own nisshi
//! broker (TLS, `--authentication`) and PostgreSQL (ssl = on, plaintext TCP refused).

mod common;
#[path = "common/tls.rs"]
mod tls;

use std::time::Duration;

use hmis_flow::config::{ClockMode, Config, Topics};
use hmis_flow::workload::{generate, WorkloadConfig};
use hmis_sinks::{KafkaClientConfig, KafkaOptions, SslMode};

use common::{exclusive, rt, unique, Pipeline, Scratch};
use tls::{make_ca, tls_pg, ScramUser, SecureBroker};

const SECRET: &str = "s3cr3t-Pa55word-never-shown";

/// Every Kafka client of the binary, by the function that configures it.
fn every_client(cfg: &Config) -> Vec<(&'static str, KafkaClientConfig)> {
    let publisher = hmis_flow::runtime::publisher_config(cfg);
    vec![
        ("source consumer", hmis_flow::source::client_config(cfg)),
        ("broker probe", hmis_flow::runtime::probe_client_config(cfg)),
        (
            "lag monitor",
            hmis_flow::runtime::lag_monitor_client_config(cfg),
        ),
        (
            "outbox producer",
            hmis_sinks::outbox::producer_config(&publisher),
        ),
        (
            "outbox recovery consumer",
            hmis_sinks::outbox::recovery_consumer_config(&publisher),
        ),
        (
            "topic admin",
            hmis_sinks::topics::admin_config(&cfg.brokers, &cfg.kafka),
        ),
        ("tail reader", hmis_flow::demo::reader_config(cfg)),
        (
            "generate/demo producer",
            hmis_flow::demo::producer_config(cfg),
        ),
    ]
}

fn secure_options(ca: &std::path::Path, mechanism: &str, user: &str) -> KafkaOptions {
    [
        ("security.protocol", "SASL_SSL"),
        ("sasl.mechanism", mechanism),
        ("sasl.username", user),
        ("ssl.ca.location", ca.to_str().unwrap()),
    ]
    .into_iter()
    .collect()
}

#[test]
fn every_client_gets_the_security_options() {
    let ca = make_ca("clients", &["127.0.0.1"]);
    let mut cfg = Config {
        kafka: secure_options(&ca.ca, "SCRAM-SHA-512", "hmis"),
        ..Config::default()
    };
    cfg.kafka.insert("sasl.password", SECRET);
    let clients = every_client(&cfg);
    assert_eq!(clients.len(), 8);
    for (name, client) in &clients {
        for (key, value) in cfg.kafka.iter() {
            assert_eq!(client.get(key), Some(value), "{name}: {key}");
        }
        assert_eq!(client.get("bootstrap.servers"), Some(cfg.brokers.as_str()));
        // librdkafka accepts them: built with TLS (and SCRAM, which needs OpenSSL).
        let created = client.create::<rdkafka::consumer::BaseConsumer>();
        assert!(created.is_ok(), "{name}: {:?}", created.err());
        let shown = format!("{client:?}");
        assert!(!shown.contains(SECRET), "{name}: {shown}");
    }
    // The mechanisms this build has (PLAIN and SCRAM need no cyrus-sasl; GSSAPI would).
    for (mechanism, built) in [
        ("PLAIN", true),
        ("SCRAM-SHA-256", true),
        ("SCRAM-SHA-512", true),
        ("GSSAPI", false),
    ] {
        let mut options = secure_options(&ca.ca, mechanism, "hmis");
        options.insert("sasl.password", SECRET);
        let client = hmis_sinks::kafka::client_config("127.0.0.1:1", &options, &[], &[]);
        let created = client.create::<rdkafka::consumer::BaseConsumer>();
        assert_eq!(created.is_ok(), built, "{mechanism}: {:?}", created.err());
    }
    // The settings a client's correctness rests on cannot be overridden by [kafka].
    let mut over = cfg.clone();
    over.kafka.insert("enable.auto.commit", "true");
    over.kafka.insert("acks", "1");
    let by_name: std::collections::HashMap<_, _> = every_client(&over).into_iter().collect();
    assert_eq!(
        by_name["source consumer"].get("enable.auto.commit"),
        Some("false")
    );
    assert_eq!(by_name["outbox producer"].get("acks"), Some("all"));
    assert_eq!(by_name["broker probe"].get("group.id"), None);
}

/// No Kafka or PostgreSQL client is made anywhere but through the two helpers: a new one
/// that bypasses them (and so TLS, SASL and the redaction) fails this test.
#[test]
fn no_client_bypasses_the_helpers() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let allowed = ["sinks/src/kafka.rs", "sinks/src/pg_tls.rs"];
    let forbidden = [
        "ClientConfig::new",
        "ClientConfig::default",
        "ClientConfig::from",
        "tokio_postgres::connect(",
        "NoTls",
    ];
    let mut offenders = Vec::new();
    let mut stack = vec![root.join("src"), root.join("sinks/src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .to_string();
            if path.extension().is_none_or(|e| e != "rs") || allowed.contains(&rel.as_str()) {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for (n, line) in text.lines().enumerate() {
                if forbidden.iter().any(|f| line.contains(f)) {
                    offenders.push(format!("{rel}:{}: {}", n + 1, line.trim()));
                }
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "clients made without hmis_sinks::kafka::client_config / hmis_sinks::pg_tls::connect:\n{}",
        offenders.join("\n")
    );
}

/// Secrets from the environment reach the clients and never an error message: a private
/// key librdkafka refuses is not echoed by `hmis-flow tail`.
#[test]
fn secrets_from_the_environment_are_not_shown() {
    let dir = Scratch::new("secret-env");
    let password = dir.path("password");
    std::fs::write(&password, format!("{SECRET}\n")).unwrap();
    let mut cfg = Config::default();
    cfg.kafka.insert("sasl.username", "hmis");
    // (The process environment is not changed: other tests of this binary read it.)
    cfg.kafka
        .apply_env([(
            "HMIS_KAFKA__SASL_PASSWORD__FILE".into(),
            password.clone().into_os_string(),
        )])
        .unwrap();
    assert_eq!(cfg.kafka.get("sasl.password"), Some(SECRET));
    assert!(!format!("{cfg:?}").contains(SECRET));

    let out = tls::hmis_flow_cmd()
        .args(["tail", "some-topic", "--brokers", "127.0.0.1:1"])
        .env("HMIS_KAFKA__SECURITY_PROTOCOL", "SSL")
        .env("HMIS_KAFKA__SSL_KEY_PEM", SECRET)
        .env("HMIS_KAFKA__SSL_KEY_PASSWORD", SECRET)
        .env("HMIS_KAFKA__SASL_PASSWORD__FILE", &password)
        .env("HMIS_LOG", "debug")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "a key that is no PEM is refused: {text}"
    );
    assert!(
        text.contains("ssl.key"),
        "the error names the setting: {text}"
    );
    assert!(!text.contains(SECRET), "{text}");
    dir.done();
}

/// The whole pipeline against a broker that accepts only TLS + SCRAM-SHA-512 and a
/// PostgreSQL that accepts only TLS (`verify-full` from the config file's fields): topics
/// created, workload produced, `migrate`, `run --until-caught-up` (source, probe, lag
/// monitor, outbox producer and recovery consumer) and `tail`, the password given only as
/// `HMIS_KAFKA__SASL_PASSWORD__FILE` to the binary.
#[test]
fn pipeline_over_sasl_ssl_and_postgres_tls() {
    let _one = exclusive();
    let started = std::time::Instant::now();
    let ca = make_ca("e2e", &["127.0.0.1", "localhost"]);
    let user = ScramUser {
        mechanism: "SCRAM-SHA-512",
        name: "hmis".into(),
        password: SECRET.into(),
    };
    let broker = SecureBroker::start(&ca, std::slice::from_ref(&user));
    let mut with_password = secure_options(&ca.ca, user.mechanism, &user.name);
    with_password.insert("sasl.password", &user.password);
    broker.wait_ready(&with_password);
    let pg = tls_pg(&ca);
    let id = unique("sec");
    let d = Topics::default();
    let p = |name: &str| format!("{id}.{name}");
    let mut cfg = Config {
        brokers: broker.brokers(),
        database_url: common::with_schema(&pg.url(), &id),
        database_sslmode: Some(SslMode::VerifyFull),
        database_sslrootcert: Some(ca.ca.clone()),
        group_id: id.clone(),
        clock: ClockMode::Event,
        workers: 1,
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
        kafka: with_password,
        ..Config::default()
    };
    rt().block_on(async {
        let client = hmis_sinks::pg_tls::connect(&pg.url(), &cfg.database_tls())
            .await
            .expect("verify-full to the private PostgreSQL");
        client
            .batch_execute(&format!("CREATE SCHEMA \"{id}\""))
            .await
            .unwrap();
    });
    // Topic admin and workload producer, in process.
    let created = rt()
        .block_on(hmis_flow::demo::create_topics(&cfg))
        .expect("create topics over SASL_SSL");
    assert_eq!(created.len(), 9, "{created:?}");
    let records = generate(&WorkloadConfig {
        seed: 13,
        workflows: 20,
        start_ms: 1_795_687_200_000,
        bad_record_ratio: 0.0,
        duplicate_ratio: 0.0,
    });
    let n = rt()
        .block_on(hmis_flow::demo::produce(&cfg, &records))
        .expect("produce over SASL_SSL");
    assert_eq!(n, records.len());

    // The binary: the config file holds no password, the environment names its file.
    let scratch = Scratch::new("sec");
    let password_file = scratch.path("kafka-password");
    std::fs::write(&password_file, format!("{SECRET}\n")).unwrap();
    let mut file_cfg = cfg.clone();
    file_cfg.kafka.remove("sasl.password");
    let file_path = scratch.path("hmis.toml");
    std::fs::write(&file_path, toml::to_string(&file_cfg).unwrap()).unwrap();
    let env = [(
        "HMIS_KAFKA__SASL_PASSWORD__FILE",
        password_file.to_str().unwrap(),
    )];
    let migrate = tls::hmis_flow_cmd()
        .args(["migrate", "--config"])
        .arg(&file_path)
        .envs(env)
        .output()
        .unwrap();
    let migrate_out = String::from_utf8_lossy(&migrate.stdout).to_string()
        + &String::from_utf8_lossy(&migrate.stderr);
    assert!(migrate.status.success(), "migrate over TLS: {migrate_out}");
    assert!(migrate_out.contains("migrations applied"), "{migrate_out}");

    let mut run =
        Pipeline::start_with_env(&file_cfg, &scratch, "secure", &["--until-caught-up"], &env);
    run.expect_success(Duration::from_secs(180));
    assert_eq!(
        run.records_read(),
        Some(records.len() as u64),
        "{}",
        run.logs()
    );
    let logs = run.logs();
    assert!(!logs.contains(SECRET), "{logs}");

    // Rows over TLS, derived events read back with the `tail` reader's config.
    let (workflows, ssl_used) = rt().block_on(async {
        let client = hmis_sinks::pg_tls::connect(&cfg.database_url, &cfg.database_tls())
            .await
            .unwrap();
        let workflows: i64 = client
            .query_one("SELECT count(*) FROM workflow_instances", &[])
            .await
            .unwrap()
            .get(0);
        let ssl: bool = client
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (workflows, ssl)
    });
    assert_eq!(workflows, 20);
    assert!(ssl_used);
    let derived = hmis_flow::demo::read_topic(&cfg, &cfg.topics.derived).unwrap();
    assert!(
        !derived.is_empty(),
        "derived events published over SASL_SSL"
    );
    let tail = tls::hmis_flow_cmd()
        .args(["tail", &cfg.topics.derived, "--config"])
        .arg(&file_path)
        .envs(env)
        .output()
        .unwrap();
    assert!(
        tail.status.success(),
        "{}",
        String::from_utf8_lossy(&tail.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&tail.stdout).lines().count(),
        derived.len()
    );
    cfg.kafka.remove("sasl.password");
    eprintln!(
        "secure pipeline: {} records, {} derived events, {:.1}s",
        records.len(),
        derived.len(),
        started.elapsed().as_secs_f64()
    );
    scratch.done();
}

/// A wrong password, an unknown CA, and SCRAM-SHA-256: the broker's answers.
#[test]
fn broker_refuses_wrong_credentials_and_unknown_cas() {
    let _one = exclusive();
    let ca = make_ca("auth", &["127.0.0.1"]);
    let users = [
        ScramUser {
            mechanism: "SCRAM-SHA-256",
            name: "u256".into(),
            password: "right-256".into(),
        },
        ScramUser {
            mechanism: "SCRAM-SHA-512",
            name: "u512".into(),
            password: "right-512".into(),
        },
    ];
    let broker = SecureBroker::start(&ca, &users);
    let brokers = broker.brokers();
    for user in &users {
        let mut options = secure_options(&ca.ca, user.mechanism, &user.name);
        options.insert("sasl.password", &user.password);
        broker.wait_ready(&options);
    }
    // Wrong password.
    let mut wrong = secure_options(&ca.ca, "SCRAM-SHA-512", "u512");
    wrong.insert("sasl.password", "wrong-password");
    assert!(
        !tls::metadata_ok(&brokers, &wrong),
        "wrong password refused"
    );
    // The right password but a CA that did not sign the broker's certificate.
    let other = make_ca("other", &["127.0.0.1"]);
    let mut untrusted = secure_options(&other.ca, "SCRAM-SHA-512", "u512");
    untrusted.insert("sasl.password", "right-512");
    assert!(
        !tls::metadata_ok(&brokers, &untrusted),
        "unknown CA refused"
    );
    // No TLS at all.
    let mut plain: KafkaOptions = [
        ("security.protocol", "SASL_PLAINTEXT"),
        ("sasl.mechanism", "SCRAM-SHA-512"),
        ("sasl.username", "u512"),
    ]
    .into_iter()
    .collect();
    plain.insert("sasl.password", "right-512");
    assert!(!tls::metadata_ok(&brokers, &plain), "plaintext refused");
    // The binary's error names the failure, not the password.
    let out = tls::hmis_flow_cmd()
        .args(["tail", "no-such-topic", "--brokers", &brokers])
        .env("HMIS_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
        .env("HMIS_KAFKA__SASL_MECHANISM", "SCRAM-SHA-512")
        .env("HMIS_KAFKA__SASL_USERNAME", "u512")
        .env("HMIS_KAFKA__SASL_PASSWORD", "wrong-password")
        .env("HMIS_KAFKA__SSL_CA_LOCATION", &ca.ca)
        .env("HMIS_LOG", "info")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(!text.contains("wrong-password"), "{text}");
}
