//! PostgreSQL over TLS (docs/security.md, "PostgreSQL TLS"), against a private PostgreSQL
//! 15 with `ssl = on`, a server certificate made by the test (rcgen) for `localhost` only,
//! and plaintext TCP refused: `verify-full` with the right CA (a migration and a flush
//! commit), the wrong CA (refused, saying why), `verify-ca` and `verify-full` on a name the
//! certificate does not hold, and `require` (encrypted, nothing checked).

mod common;
#[path = "common/tls.rs"]
mod tls;

use hmis_dataflows::output::{DeadLetter, FlushBatch, OffsetMark, RejectReason};
use hmis_sinks::PgSink;

use common::rt;
use tls::{make_ca, tls_pg, PrivatePgUrl};

/// The server certificate names `localhost` only: connecting to `127.0.0.1` is a name
/// mismatch for `verify-full`.
fn url(pg: &common::PrivatePg, host: &str, params: &str) -> String {
    PrivatePgUrl::of(pg)
        .with(params)
        .replacen("127.0.0.1", host, 1)
}

async fn ssl_in_use(client: &tokio_postgres::Client) -> bool {
    client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[test]
fn postgres_tls_modes() {
    let _one = common::exclusive();
    let started = std::time::Instant::now();
    let ca = make_ca("pg", &["localhost"]);
    let wrong = make_ca("pg-wrong", &["localhost"]);
    let pg = tls_pg(&ca);
    let ca_path = ca.ca.display().to_string();
    let wrong_path = wrong.ca.display().to_string();

    rt().block_on(async {
        // verify-full, the right CA: a migration and a flush commit over TLS.
        let full = url(
            &pg,
            "localhost",
            &format!("sslmode=verify-full&sslrootcert={ca_path}"),
        );
        let mut sink = PgSink::connect(&full).await.expect("verify-full, right CA");
        assert!(ssl_in_use(sink.client()).await);
        let applied = sink.migrate().await.unwrap();
        assert!(applied.contains(&"0001_init".to_string()), "{applied:?}");
        sink.claim("tls", "test").await.unwrap();
        let batch = FlushBatch {
            frontier: 1_000,
            dead_letters: vec![DeadLetter {
                topic: "workflow-task-events".into(),
                partition: 0,
                offset: 7,
                key: Some("k".into()),
                key_encoding: "utf8".into(),
                payload: "{not json".into(),
                payload_encoding: "utf8".into(),
                reason: RejectReason::InvalidJson,
                detail: "over TLS".into(),
                rejected_at: 1,
            }],
            offsets: vec![OffsetMark {
                topic: "workflow-task-events".into(),
                partition: 0,
                next_offset: 8,
            }],
            ..FlushBatch::default()
        };
        sink.apply("tls", &batch).await.expect("a flush over TLS");
        let progress = sink.load_progress("tls").await.unwrap();
        assert_eq!(progress.frontier_ms, Some(1_000));
        let dead: i64 = sink
            .client()
            .query_one("SELECT count(*) FROM dead_letters", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(dead, 1);

        // The same from the config file's fields instead of URL parameters.
        let fields = hmis_sinks::PgTls {
            sslmode: Some(hmis_sinks::SslMode::VerifyFull),
            sslrootcert: Some(ca.ca.clone()),
        };
        let client = hmis_sinks::pg_tls::connect(&url(&pg, "localhost", ""), &fields)
            .await
            .expect("verify-full from the config fields");
        assert!(ssl_in_use(&client).await);

        // verify-full, the wrong CA: refused, and the error says why and with what.
        let bad = url(
            &pg,
            "localhost",
            &format!("sslmode=verify-full&sslrootcert={wrong_path}"),
        );
        let err = PgSink::connect(&bad).await.err().expect("wrong CA refused");
        let text = err.to_string();
        assert!(text.contains("sslmode=verify-full"), "{text}");
        assert!(text.contains(&wrong_path), "{text}");
        assert!(
            text.contains("invalid peer certificate") && text.contains("UnknownIssuer"),
            "{text}"
        );

        // A name the certificate does not hold: verify-full refuses, verify-ca accepts.
        let ip_full = url(
            &pg,
            "127.0.0.1",
            &format!("sslmode=verify-full&sslrootcert={ca_path}"),
        );
        let text = PgSink::connect(&ip_full)
            .await
            .err()
            .expect("name mismatch")
            .to_string();
        assert!(text.contains("not valid for name"), "{text}");
        let ip_ca = url(
            &pg,
            "127.0.0.1",
            &format!("sslmode=verify-ca&sslrootcert={ca_path}"),
        );
        let sink = PgSink::connect(&ip_ca)
            .await
            .expect("verify-ca ignores the name");
        assert!(ssl_in_use(sink.client()).await);
        let ip_wrong_ca = url(
            &pg,
            "127.0.0.1",
            &format!("sslmode=verify-ca&sslrootcert={wrong_path}"),
        );
        assert!(
            PgSink::connect(&ip_wrong_ca).await.is_err(),
            "verify-ca checks the chain"
        );

        // require: encrypted, no certificate checked (any CA, any name).
        let sink = PgSink::connect(&url(&pg, "127.0.0.1", "sslmode=require"))
            .await
            .expect("require");
        assert!(ssl_in_use(sink.client()).await);
        // prefer (the default) takes TLS when offered; disable is refused by this server.
        let sink = PgSink::connect(&url(&pg, "127.0.0.1", ""))
            .await
            .expect("prefer");
        assert!(ssl_in_use(sink.client()).await);
        let text = PgSink::connect(&url(&pg, "127.0.0.1", "sslmode=disable"))
            .await
            .err()
            .expect("plaintext refused by the server")
            .to_string();
        assert!(text.contains("no encryption"), "{text}");
        sink.client()
            .batch_execute("CREATE SCHEMA cli")
            .await
            .unwrap();
    });

    // The binary: `hmis-flow migrate` over verify-full (from the URL in the environment).
    let full = url(
        &pg,
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={ca_path}&options=-c%20search_path%3Dcli"),
    );
    let out = tls::hmis_flow_cmd()
        .arg("migrate")
        .env("HMIS_DATABASE_URL", &full)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("0001_init"), "{text}");
    let bad = full.replace(&ca_path, &wrong_path);
    let out = tls::hmis_flow_cmd()
        .arg("migrate")
        .env("HMIS_DATABASE_URL", &bad)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success());
    assert!(
        text.contains("sslmode=verify-full") && text.contains("UnknownIssuer"),
        "{text}"
    );
    eprintln!(
        "postgres TLS modes: {:.1}s",
        started.elapsed().as_secs_f64()
    );
}
