//! TLS fixtures for the security tests (`tests/pg_tls.rs`, `tests/kafka_security.rs`): a
//! private CA and server certificates made with rcgen, a private PostgreSQL switched to
//! `ssl = on` that refuses plaintext TCP, and a private nisshi broker that only accepts TLS
//! connections authenticated with SCRAM.
//!
//! Used as `#[path = "common/tls.rs"] mod tls;` next to `mod common;`.

#![allow(dead_code)] // each test binary uses a part

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::common::{free_port, pg_execute, unique, wait_until, PrivatePg, BIN};

/// The `hmis-flow` binary with none of the test's `HMIS_*` variables (the shared services'
/// addresses would override the config file under test).
pub fn hmis_flow_cmd() -> Command {
    let mut cmd = Command::new(BIN);
    for (k, _) in std::env::vars() {
        if k.starts_with("HMIS_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// A CA and one server certificate it signed, as PEM files in `dir`.
pub struct TestCa {
    pub dir: PathBuf,
    /// The CA certificate (what clients trust).
    pub ca: PathBuf,
    /// The server's certificate.
    pub cert: PathBuf,
    /// The server's private key (PKCS#8).
    pub key: PathBuf,
}

/// Makes a CA named `name` and a server certificate for `hosts` (DNS names or IP
/// addresses) in a new folder under the temp dir.
pub fn make_ca(name: &str, hosts: &[&str]) -> TestCa {
    let dir = std::env::temp_dir().join(format!("hmis-tls-{}", unique(name)));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("hmis test CA {name}"));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(
        DnType::CommonName,
        hosts.first().copied().unwrap_or("server"),
    );
    for host in hosts {
        params.subject_alt_names.push(match host.parse() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName((*host).try_into().unwrap()),
        });
    }
    let cert = params.signed_by(&server_key, &issuer).unwrap();

    let ca = TestCa {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
        dir,
    };
    std::fs::write(&ca.ca, ca_cert.pem()).unwrap();
    std::fs::write(&ca.cert, cert.pem()).unwrap();
    std::fs::write(&ca.key, server_key.serialize_pem()).unwrap();
    ca
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A private PostgreSQL (see [`PrivatePg`]) serving `ca`'s server certificate, with
/// plaintext TCP connections refused (`hostnossl ... reject`): whatever connects to it
/// over TCP uses TLS.
pub fn tls_pg(ca: &TestCa) -> PrivatePg {
    let pg = PrivatePg::start();
    let data = pg.dir.join("data");
    std::fs::copy(&ca.cert, data.join("server.crt")).unwrap();
    std::fs::copy(&ca.key, data.join("server.key")).unwrap();
    for file in ["server.crt", "server.key"] {
        let path = data.join(file);
        let ok = Command::new("chmod")
            .arg("600")
            .arg(&path)
            .status()
            .unwrap()
            .success();
        assert!(ok, "chmod {}", path.display());
        if is_root() {
            let ok = Command::new("chown")
                .arg("postgres:")
                .arg(&path)
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown {}", path.display());
        }
    }
    // Plaintext TCP refused from now on; the Unix socket (`local`) stays as initdb made it.
    let hba = data.join("pg_hba.conf");
    let old = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!("hostnossl all all 0.0.0.0/0 reject\nhostnossl all all ::/0 reject\n{old}"),
    )
    .unwrap();
    let url = format!("{}?sslmode=disable", pg.url());
    for sql in [
        "ALTER SYSTEM SET ssl = on",
        "ALTER SYSTEM SET ssl_cert_file = 'server.crt'",
        "ALTER SYSTEM SET ssl_key_file = 'server.key'",
        "SELECT pg_reload_conf()",
    ] {
        pg_execute(&url, sql);
    }
    wait_until(Duration::from_secs(30), "PostgreSQL with ssl = on", || {
        crate::common::rt().block_on(async {
            let require = PrivatePgUrl::of(&pg).with("sslmode=require");
            hmis_sinks::pg_tls::connect(&require, &Default::default())
                .await
                .is_ok()
        })
    });
    pg
}

/// URLs of a private PostgreSQL with extra parameters.
pub struct PrivatePgUrl(String);

impl PrivatePgUrl {
    pub fn of(pg: &PrivatePg) -> PrivatePgUrl {
        PrivatePgUrl(pg.url())
    }
    /// The URL with `params` (`a=b&c=d`) appended.
    pub fn with(&self, params: &str) -> String {
        let sep = if self.0.contains('?') { '&' } else { '?' };
        format!("{}{sep}{params}", self.0)
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn nisshi_bin() -> PathBuf {
    let on_path = std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|d| Path::new(d).join("nisshi"))
        .find(|p| p.exists());
    let cargo_home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(crate::common::env("HOME")).join(".cargo"));
    let bin = on_path.unwrap_or_else(|| cargo_home.join("bin/nisshi"));
    assert!(
        bin.exists(),
        "nisshi not found (scripts/services.sh start installs it)"
    );
    bin
}

/// A SCRAM user of [`SecureBroker`].
pub struct ScramUser {
    /// `SCRAM-SHA-256` or `SCRAM-SHA-512` (librdkafka's `sasl.mechanism`).
    pub mechanism: &'static str,
    pub name: String,
    pub password: String,
}

/// A private nisshi broker (SQLite storage in a temp folder, a free port) that accepts only
/// TLS connections (`ca`'s server certificate) authenticated with SCRAM (`--authentication`).
/// The users are created first, on the same storage, by the broker started without
/// authentication (nisshi refuses every request but the SASL ones before authentication).
pub struct SecureBroker {
    pub dir: PathBuf,
    pub port: u16,
    child: Option<Child>,
}

impl SecureBroker {
    pub fn start(ca: &TestCa, users: &[ScramUser]) -> SecureBroker {
        let dir = std::env::temp_dir().join(format!("hmis-tls-nisshi-{}", unique("")));
        std::fs::create_dir_all(&dir).unwrap();
        let mut b = SecureBroker {
            dir,
            port: free_port(),
            child: None,
        };
        b.spawn(&[]);
        let brokers = b.brokers();
        wait_until(Duration::from_secs(60), "the broker (plaintext)", || {
            let options = hmis_sinks::KafkaOptions::default();
            metadata_ok(&brokers, &options)
        });
        for user in users {
            let mechanism = match user.mechanism {
                "SCRAM-SHA-256" => "scram256",
                "SCRAM-SHA-512" => "scram512",
                other => panic!("nisshi has no SASL mechanism {other}"),
            };
            // The password on nisshi's command line: a throwaway test fixture, not hmis-flow.
            let out = Command::new(nisshi_bin())
                .args(["user", "create", "--broker"])
                .arg(format!("tcp://{brokers}"))
                .args(["--mechanism", mechanism, &user.name, &user.password])
                .output()
                .expect("nisshi user create");
            assert!(
                out.status.success(),
                "nisshi user create: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        b.stop();
        b.spawn(&[
            "--authentication".into(),
            "--cert".into(),
            ca.cert.display().to_string(),
            "--key".into(),
            ca.key.display().to_string(),
        ]);
        b
    }

    fn spawn(&mut self, extra: &[String]) {
        let url = format!("tcp://{}", self.brokers());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("nisshi.log"))
            .unwrap();
        let child = Command::new(nisshi_bin())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                "sqlite://nisshi.db",
                "--group-initial-rebalance-delay",
                "0s",
            ])
            .args(extra)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start nisshi");
        self.child = Some(child);
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Waits until a client with `options` gets the cluster's metadata.
    pub fn wait_ready(&self, options: &hmis_sinks::KafkaOptions) {
        let brokers = self.brokers();
        wait_until(Duration::from_secs(60), "the broker (TLS + SCRAM)", || {
            metadata_ok(&brokers, options)
        });
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            for _ in 0..600 {
                if child.try_wait().unwrap().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("nisshi.log")).unwrap_or_default()
    }
}

impl Drop for SecureBroker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A metadata request with `options` succeeds.
pub fn metadata_ok(brokers: &str, options: &hmis_sinks::KafkaOptions) -> bool {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let config = hmis_sinks::kafka::client_config(brokers, options, &[], &[]);
    let Ok(c) = config.create::<BaseConsumer>() else {
        return false;
    };
    c.fetch_metadata(None, Duration::from_secs(2))
        .map(|m| !m.brokers().is_empty())
        .unwrap_or(false)
}
