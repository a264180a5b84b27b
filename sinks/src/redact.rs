//! Patient data in logs: left out unless an operator opts in.
//!
//! hmis-flow's log lines never carry patient data by default: patient ids, the free text of
//! the input (`errorMessage`, `details`, `reason`, an error report's `message`), raw or
//! dead-lettered payloads, and PostgreSQL's error DETAIL, which quotes the row it refused
//! ("Failing row contains (…)", "Key (…)=(…)"). The values stay where they belong (the
//! tables, the topics, the dead letters); a log line says what happened and where (topic,
//! partition, offset, event id, table, constraint, SQLSTATE).
//!
//! A log call site passes anything that may hold such data through [`text`] (free text and
//! ids), [`error`] ([`SinkError`]) or [`postgres`] (a driver error). They print the value
//! itself only when `HMIS_LOG_PATIENT_DATA` is `1` (or `true`, `yes`, `on`) in the process's
//! environment, for debugging (docs/security.md, "Patient data in logs"); otherwise:
//!
//! - [`text`]: `[redacted 23 B #5f0c9e1a]`: the length and a hash keyed per process, so two
//!   lines of one process about the same value can be matched, but no list of candidate ids
//!   can be hashed to find one (the key is random and never logged);
//! - [`error`] / [`postgres`]: severity, SQLSTATE, message and the schema, table, column,
//!   data type and constraint involved, without DETAIL, HINT and WHERE, and with every quoted
//!   value in the message replaced by `"…"` unless it is one of those names
//!   (`invalid input syntax for type numeric: "…"`).

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use crate::SinkError;

/// The environment variable that lets log lines carry patient data.
pub const ENV: &str = "HMIS_LOG_PATIENT_DATA";

/// 0: not decided yet (read [`ENV`] on first use), 1: redact, 2: log as is.
static MODE: AtomicU8 = AtomicU8::new(0);

/// Whether log lines may carry patient data (`HMIS_LOG_PATIENT_DATA`, read once).
pub fn enabled() -> bool {
    match MODE.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => {
            let on = std::env::var(ENV).is_ok_and(|v| {
                matches!(
                    v.trim().to_ascii_lowercase().as_str(),
                    "1" | "true" | "yes" | "on"
                )
            });
            set_enabled(on);
            if on {
                tracing::warn!("{ENV} is set: log lines carry patient data");
            }
            on
        }
    }
}

/// Overrides [`ENV`] for this process (e.g. from a test).
pub fn set_enabled(on: bool) {
    MODE.store(if on { 2 } else { 1 }, Ordering::Relaxed);
}

/// Free text or an id from the input, for a log line.
pub fn text(value: &str) -> Text<'_> {
    Text(value)
}

/// [`text`]'s result: the value, or its length and a keyed hash.
pub struct Text<'a>(&'a str);

impl fmt::Display for Text<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if enabled() {
            return f.write_str(self.0);
        }
        static KEY: OnceLock<RandomState> = OnceLock::new();
        let mut h = KEY.get_or_init(RandomState::new).build_hasher();
        h.write(self.0.as_bytes());
        write!(
            f,
            "[redacted {} B #{:08x}]",
            self.0.len(),
            h.finish() as u32
        )
    }
}

/// A sink error for a log line: [`SinkError`]'s text, without what PostgreSQL quoted of
/// the data unless patient data may be logged.
pub fn error(e: &SinkError) -> String {
    match e {
        SinkError::Postgres { context, source } if !enabled() => {
            format!("postgres: {context}: {}", postgres(source))
        }
        other => other.to_string(),
    }
}

/// A PostgreSQL driver error for a log line (see the module docs).
pub fn postgres(e: &tokio_postgres::Error) -> String {
    use std::fmt::Write as _;
    let Some(db) = e.as_db_error() else {
        return crate::postgres_detail(e);
    };
    if enabled() {
        return crate::postgres_detail(e);
    }
    let names: Vec<&str> = [
        db.schema(),
        db.table(),
        db.column(),
        db.datatype(),
        db.constraint(),
    ]
    .into_iter()
    .flatten()
    .collect();
    let mut out = format!(
        "{} {}: {}",
        db.severity(),
        db.code().code(),
        unquote_values(db.message(), &names)
    );
    for (name, v) in [
        ("schema", db.schema()),
        ("table", db.table()),
        ("column", db.column()),
        ("datatype", db.datatype()),
        ("constraint", db.constraint()),
    ] {
        if let Some(v) = v {
            let _ = write!(out, "; {name}: {v}");
        }
    }
    if db.detail().is_some() {
        out.push_str(&format!("; detail: [redacted, {ENV}=1 shows it]"));
    }
    out
}

/// `message` with each `"quoted"` part that is not one of `names` replaced by `"…"`.
fn unquote_values(message: &str, names: &[&str]) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(open) = rest.find('"') {
        out.push_str(&rest[..=open]);
        let after = &rest[open + 1..];
        let Some(close) = after.find('"') else {
            // An unbalanced quote: the rest may be a value.
            out.push_str("…\"");
            return out;
        };
        let quoted = &after[..close];
        if names.contains(&quoted) {
            out.push_str(quoted);
        } else {
            out.push('…');
        }
        out.push('"');
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_values_go_and_names_stay() {
        assert_eq!(
            unquote_values(
                "new row for relation \"task_instances\" violates check constraint \"no_x\"",
                &["task_instances", "no_x"]
            ),
            "new row for relation \"task_instances\" violates check constraint \"no_x\""
        );
        assert_eq!(
            unquote_values(
                "invalid input syntax for type numeric: \"patient-42\"",
                &["orders"]
            ),
            "invalid input syntax for type numeric: \"…\""
        );
        assert_eq!(unquote_values("value \"abc", &[]), "value \"…\"");
        assert_eq!(unquote_values("no quotes", &[]), "no quotes");
    }

    #[test]
    fn text_is_redacted_by_default_and_shown_when_enabled() {
        // One test toggles the process-wide mode, so the two cases cannot race.
        set_enabled(false);
        let shown = text("patient-42 declined").to_string();
        assert!(!shown.contains("patient-42"), "{shown}");
        assert!(shown.starts_with("[redacted 19 B #"), "{shown}");
        assert_eq!(shown, text("patient-42 declined").to_string(), "stable");
        assert_ne!(shown, text("patient-43 declined").to_string());
        set_enabled(true);
        assert_eq!(
            text("patient-42 declined").to_string(),
            "patient-42 declined"
        );
        set_enabled(false);
    }
}
