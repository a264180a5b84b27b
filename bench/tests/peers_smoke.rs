//! A smoke run of `bench/run.sh`'s orchestrator (issue 14): a tiny workload (20 workflows)
//! through hmis-flow end to end, the seed-style baseline and, when `bench/.venv` has
//! Pathway, Pathway; every peer's rows must equal hmis-flow's. ~10 s.
//!
//! Addresses come from `HMIS_TEST_BROKERS` and `HMIS_TEST_DATABASE_URL` (scripts/test.sh);
//! the run uses private topics, schemas and groups and deletes them afterwards. The
//! hmis-flow binary must sit next to `peers` (`cargo test --workspace --release` builds it
//! there for its own tests).

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: start the services with `scripts/services.sh start` and `eval $(scripts/services.sh env)`, or run scripts/test.sh")
    })
}

#[test]
fn peers_smoke_run_matches_hmis_flow() {
    let peers = PathBuf::from(env!("CARGO_BIN_EXE_peers"));
    let bin_dir = peers.parent().expect("target folder").to_path_buf();
    // The root package's binary: `cargo test --workspace` builds it for that package's tests.
    assert!(
        bin_dir.join("hmis-flow").exists(),
        "{} is missing: run `cargo build --release -p hmis-flow` (or the whole workspace's tests)",
        bin_dir.join("hmis-flow").display()
    );
    let out = std::env::temp_dir().join(format!("peers-smoke-{}.json", std::process::id()));
    let venv_python = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let mut cmd = Command::new(&peers);
    cmd.args(["--size", "smoke", "--quiet", "--seed", "7"])
        .arg("--bin-dir")
        .arg(&bin_dir)
        .arg("--out")
        .arg(&out)
        .env("HMIS_BROKERS", env("HMIS_TEST_BROKERS"))
        .env("HMIS_DATABASE_URL", env("HMIS_TEST_DATABASE_URL"));
    if venv_python.exists() {
        cmd.arg("--python").arg(&venv_python);
    }
    let output = cmd.output().expect("running peers");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "peers failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    let result: Value =
        serde_json::from_str(&std::fs::read_to_string(&out).expect("result")).expect("result JSON");
    std::fs::remove_file(&out).ok();

    assert!(result["records"].as_u64().unwrap_or(0) > 300, "{result}");
    assert_eq!(result["check_failures"], serde_json::json!([]), "{result}");
    let system = |name: &str| {
        result["systems"]
            .as_array()
            .and_then(|a| a.iter().find(|s| s["name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("{name} missing: {result}"))
    };
    let hmis = system("hmis-flow");
    assert!(hmis["events_per_s"].as_f64().unwrap_or(0.0) > 0.0, "{hmis}");
    assert!(hmis["peak_rss_bytes"].as_u64().unwrap_or(0) > 0, "{hmis}");
    assert!(hmis["cpu_s"].as_f64().unwrap_or(0.0) > 0.0, "{hmis}");
    // The comparison covers every kind of row (so that a difference could show).
    let seed = system("seed-style baseline");
    let check = &seed["check_against_hmis_flow"];
    assert_eq!(check["matched"], serde_json::json!(true), "{seed}");
    for k in ["tasks", "workflows", "ready_pairs", "sla_breaches"] {
        assert!(check[k].as_u64().unwrap_or(0) > 0, "{k} in {check}");
    }
    let pathway = system("Pathway");
    if venv_python.exists() {
        assert_eq!(
            pathway["check_against_hmis_flow"]["matched"],
            serde_json::json!(true),
            "{pathway}"
        );
        assert_eq!(
            pathway["check_against_hmis_flow"]["sla_breach_mismatches"],
            serde_json::json!(0),
            "{pathway}"
        );
    } else {
        assert!(pathway["skipped"].is_string(), "{pathway}");
    }
}
