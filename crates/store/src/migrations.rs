//! Schema migrations, embedded in the binary at compile time.
//!
//! `sqlx::migrate!` would embed them too, but it lives behind sqlx's `macros` feature, which
//! builds sqlx's database drivers a second time for the proc-macro host (bundled SQLite C
//! included). Instead each file is `include_str!`ed and handed to sqlx's runtime `Migrator`,
//! which applies it exactly as `migrate!` would: same version numbers (the file prefix),
//! same SHA-384 checksums, same `_sqlx_migrations` table, so the `sqlx` CLI sees the same
//! history. A unit test checks that every file in `migrations/<backend>/` is listed here.

use std::borrow::Cow;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::SqlSafeStr;

use crate::Backend;

/// `(version, description, sql)`, in version order. Add new files here, never edit old ones.
const SQLITE: &[(i64, &str, &str)] = &[
    (
        1,
        "init",
        include_str!("../migrations/sqlite/0001_init.sql"),
    ),
    (
        2,
        "moderation",
        include_str!("../migrations/sqlite/0002_moderation.sql"),
    ),
    (
        3,
        "notifications",
        include_str!("../migrations/sqlite/0003_notifications.sql"),
    ),
    (
        4,
        "sites",
        include_str!("../migrations/sqlite/0004_sites.sql"),
    ),
];

const POSTGRES: &[(i64, &str, &str)] = &[
    (
        1,
        "init",
        include_str!("../migrations/postgres/0001_init.sql"),
    ),
    (
        2,
        "moderation",
        include_str!("../migrations/postgres/0002_moderation.sql"),
    ),
    (
        3,
        "notifications",
        include_str!("../migrations/postgres/0003_notifications.sql"),
    ),
    (
        4,
        "sites",
        include_str!("../migrations/postgres/0004_sites.sql"),
    ),
];

fn list(backend: Backend) -> &'static [(i64, &'static str, &'static str)] {
    match backend {
        Backend::Sqlite => SQLITE,
        Backend::Postgres => POSTGRES,
    }
}

/// The migrator for a backend. Each migration runs in its own transaction.
pub(crate) fn migrator(backend: Backend) -> Migrator {
    Migrator::with_migrations(
        list(backend)
            .iter()
            .map(|&(version, description, sql)| {
                Migration::new(
                    version,
                    Cow::Borrowed(description),
                    MigrationType::Simple,
                    sql.into_sql_str(),
                    false,
                )
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_migration_file_is_embedded() {
        for (backend, dir) in [(Backend::Sqlite, "sqlite"), (Backend::Postgres, "postgres")] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("migrations")
                .join(dir);
            let mut files: Vec<String> = std::fs::read_dir(&path)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter(|f| f.ends_with(".sql"))
                .collect();
            files.sort();
            let listed: Vec<String> = list(backend)
                .iter()
                .map(|(v, d, _)| format!("{v:04}_{d}.sql"))
                .collect();
            assert_eq!(files, listed, "migrations/{dir} and migrations.rs disagree");
        }
    }
}
