//! Versioned schema migrations, embedded in the binary from `migrations/*.sql`.
//!
//! ```text
//!  BEGIN
//!   pg_advisory_xact_lock(MIGRATION_LOCK)    second instance waits here
//!   CREATE TABLE IF NOT EXISTS hmis_schema_migrations
//!   for each embedded migration, in version order:
//!     applied, same checksum   -> skip
//!     applied, other checksum  -> error (MigrationChanged), roll back everything
//!     not applied              -> run its SQL, record (version, name, checksum)
//!  COMMIT
//! ```
//!
//! Everything happens in one transaction, so a failing migration leaves the schema as it
//! was, and an instance that waited for the lock sees the other's work once it gets it
//! (READ COMMITTED: each statement takes a fresh snapshot). Objects land in the first
//! schema of the connection's `search_path`, which lets tests use a schema each.
//!
//! The checksum is the SHA-256 of the file with `\r` removed (so a checkout with CRLF
//! line endings does not count as a change), computed by the server.

use tokio_postgres::Client;
use tracing::info;

use crate::SinkError;

/// One embedded migration.
#[derive(Clone, Copy, Debug)]
pub struct Migration {
    /// Its number, from the file name's prefix; applied in increasing order.
    pub version: i32,
    /// The file name without `.sql`, e.g. `0001_init`.
    pub name: &'static str,
    /// The SQL, run as one multi-statement batch.
    pub sql: &'static str,
}

/// The migrations this build knows, in the order they apply. Append only: an applied
/// migration must never be edited (the checksum check refuses it).
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "0001_init",
        sql: include_str!("../../migrations/0001_init.sql"),
    },
    Migration {
        version: 2,
        name: "0002_reporting",
        sql: include_str!("../../migrations/0002_reporting.sql"),
    },
    Migration {
        version: 3,
        name: "0003_published_events",
        sql: include_str!("../../migrations/0003_published_events.sql"),
    },
    Migration {
        version: 4,
        name: "0004_system_events",
        sql: include_str!("../../migrations/0004_system_events.sql"),
    },
    Migration {
        version: 5,
        name: "0005_dead_letter_encodings",
        sql: include_str!("../../migrations/0005_dead_letter_encodings.sql"),
    },
    Migration {
        version: 6,
        name: "0006_roles",
        sql: include_str!("../../migrations/0006_roles.sql"),
    },
    Migration {
        version: 7,
        name: "0007_outbox_keys",
        sql: include_str!("../../migrations/0007_outbox_keys.sql"),
    },
    Migration {
        version: 8,
        name: "0008_ledger_key_order",
        sql: include_str!("../../migrations/0008_ledger_key_order.sql"),
    },
];

/// Advisory lock key serializing migrations across all instances on one database
/// (the ASCII of `hmis-mig`).
pub const MIGRATION_LOCK: i64 = 0x686d_6973_2d6d_6967;

const CREATE_TRACKING_TABLE: &str = "
CREATE TABLE IF NOT EXISTS hmis_schema_migrations (
    version    integer PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)";

/// Applies the embedded migrations that the database does not have yet.
///
/// Returns the names of the migrations applied now (empty when the schema was current).
/// Safe to run from several instances at once: they serialize on [`MIGRATION_LOCK`].
///
/// # Errors
/// [`SinkError::MigrationChanged`] when an applied migration differs from the embedded
/// one, [`SinkError::UnknownMigration`] when the database is newer than this build, and
/// [`SinkError::Postgres`] when a statement fails; nothing is applied in any of these cases.
pub async fn migrate(client: &mut Client) -> Result<Vec<String>, SinkError> {
    let tx = client
        .transaction()
        .await
        .map_err(SinkError::pg("begin migration"))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(SinkError::pg("take the migration lock"))?;
    // A role that may not create objects (the pipeline's, `hmis_pipeline`) can still check
    // a migrated schema, so `hmis-flow run` works as that role; it cannot apply anything,
    // and its errors say who can.
    let who = tx
        .query_one(
            "SELECT coalesce(has_schema_privilege(current_schema(), 'CREATE'), false), \
                    current_user::text, \
                    EXISTS (SELECT 1 FROM pg_tables WHERE schemaname = current_schema() \
                            AND tablename = 'hmis_schema_migrations')",
            &[],
        )
        .await
        .map_err(SinkError::pg("read the migration privileges"))?;
    let (may_create, role, tracked): (bool, String, bool) = (who.get(0), who.get(1), who.get(2));
    let context = |what: String| {
        if may_create {
            what
        } else {
            format!(
                "{what} (role `{role}` may not create objects in this schema: run \
                 `hmis-flow migrate` as the administrator first, docs/security.md)"
            )
        }
    };
    // CREATE TABLE IF NOT EXISTS needs CREATE on the schema even when the table exists.
    if !tracked {
        tx.batch_execute(CREATE_TRACKING_TABLE)
            .await
            .map_err(SinkError::pg(context(
                "create hmis_schema_migrations".into(),
            )))?;
    }

    let applied = tx
        .query(
            "SELECT version, name, checksum FROM hmis_schema_migrations ORDER BY version",
            &[],
        )
        .await
        .map_err(SinkError::pg("read hmis_schema_migrations"))?;
    let applied: Vec<(i32, String, String)> = applied
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();

    if let Some((version, name, _)) = applied
        .iter()
        .find(|(version, _, _)| !MIGRATIONS.iter().any(|m| m.version == *version))
    {
        return Err(SinkError::UnknownMigration {
            version: *version,
            name: name.clone(),
        });
    }

    let mut done = Vec::new();
    for migration in MIGRATIONS {
        let checksum: String = tx
            .query_one(
                "SELECT encode(sha256(convert_to(replace($1, E'\\r', ''), 'UTF8')), 'hex')",
                &[&migration.sql],
            )
            .await
            .map_err(SinkError::pg("checksum a migration"))?
            .get(0);
        match applied.iter().find(|(v, _, _)| *v == migration.version) {
            Some((_, _, recorded)) if *recorded == checksum => continue,
            Some((_, _, recorded)) => {
                return Err(SinkError::MigrationChanged {
                    version: migration.version,
                    name: migration.name.to_string(),
                    applied: recorded.clone(),
                    embedded: checksum,
                });
            }
            None => {}
        }
        tx.batch_execute(migration.sql)
            .await
            .map_err(SinkError::pg(context(format!(
                "apply migration {}",
                migration.name
            ))))?;
        tx.execute(
            "INSERT INTO hmis_schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
            &[&migration.version, &migration.name, &checksum],
        )
        .await
        .map_err(SinkError::pg(format!(
            "record migration {}",
            migration.name
        )))?;
        done.push(migration.name.to_string());
    }

    tx.commit()
        .await
        .map_err(SinkError::pg("commit migrations"))?;
    if !done.is_empty() {
        info!(applied = ?done, "schema migrated");
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_in_order() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version as usize, i + 1, "{}", m.name);
            assert!(
                m.name.starts_with(&format!("{:04}_", m.version)),
                "{} does not start with its version",
                m.name
            );
        }
    }

    #[test]
    fn every_migration_file_is_embedded() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../migrations");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .expect("migrations folder")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".sql"))
            .collect();
        files.sort();
        let embedded: Vec<String> = MIGRATIONS
            .iter()
            .map(|m| format!("{}.sql", m.name))
            .collect();
        assert_eq!(
            files, embedded,
            "add new files in migrations/ to MIGRATIONS"
        );
    }
}
