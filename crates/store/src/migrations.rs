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
    (
        5,
        "documents",
        include_str!("../migrations/sqlite/0005_documents.sql"),
    ),
    (
        6,
        "message_events",
        include_str!("../migrations/sqlite/0006_message_events.sql"),
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
    (
        5,
        "documents",
        include_str!("../migrations/postgres/0005_documents.sql"),
    ),
    (
        6,
        "message_events",
        include_str!("../migrations/postgres/0006_message_events.sql"),
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
    migrator_of(list(backend))
}

fn migrator_of(migrations: &'static [(i64, &'static str, &'static str)]) -> Migrator {
    Migrator::with_migrations(
        migrations
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

    /// An existing database at version 4: its notifications, migrated by 0005.
    async fn notifications_across_0005<DB>(pool: &sqlx::Pool<DB>, backend: Backend)
    where
        DB: sqlx::Database,
        <DB as sqlx::Database>::Connection: sqlx::migrate::Migrate,
        for<'q> <DB as sqlx::Database>::Arguments: sqlx::IntoArguments<DB>,
        for<'e> &'e sqlx::Pool<DB>: sqlx::Executor<'e, Database = DB>,
        i64: sqlx::Type<DB> + for<'r> sqlx::Decode<'r, DB> + for<'q> sqlx::Encode<'q, DB>,
        String: sqlx::Type<DB> + for<'r> sqlx::Decode<'r, DB>,
        (i64, String): for<'r> sqlx::FromRow<'r, DB::Row>,
    {
        migrator_of(&list(backend)[..4]).run(pool).await.unwrap();
        sqlx::query(
            "INSERT INTO users (username, password_hash, display_name, role, created_at) \
             VALUES ('u', '', 'U', 'user', 0)",
        )
        .execute(pool)
        .await
        .unwrap();
        for kind in ["mention", "invite", "direct"] {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO notifications (user_id, kind, data, created_at) \
                 SELECT id, '{kind}', '{{}}', 0 FROM users"
            )))
            .execute(pool)
            .await
            .unwrap();
        }
        // The newest is gone: its id must not be handed out again either.
        sqlx::query("DELETE FROM notifications WHERE kind = 'direct'")
            .execute(pool)
            .await
            .unwrap();
        let before: Vec<(i64, String)> =
            sqlx::query_as("SELECT id, kind FROM notifications ORDER BY id")
                .fetch_all(pool)
                .await
                .unwrap();
        assert_eq!(before.len(), 2);

        migrator(backend).run(pool).await.unwrap();
        let after: Vec<(i64, String)> =
            sqlx::query_as("SELECT id, kind FROM notifications ORDER BY id")
                .fetch_all(pool)
                .await
                .unwrap();
        assert_eq!(after, before, "{backend}: rows and ids kept");
        let (id, kind): (i64, String) = sqlx::query_as(
            "INSERT INTO notifications (user_id, kind, data, created_at) \
             SELECT id, 'share', '{}', 0 FROM users RETURNING id, kind",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        assert_eq!(kind, "share");
        assert!(id > before[1].0 + 1, "{backend}: id {id} reused");
        let bogus = sqlx::query(
            "INSERT INTO notifications (user_id, kind, data, created_at) \
             SELECT id, 'bogus', '{}', 0 FROM users",
        )
        .execute(pool)
        .await;
        assert!(bogus.is_err(), "{backend}: the kind CHECK is gone");
    }

    /// A room's stream written before 0006 (a 'message' row per message in room_events):
    /// after the migration the store reads the same stream, each offset once.
    async fn stream_across_0006<DB>(pool: &sqlx::Pool<DB>, backend: Backend, url: &str)
    where
        DB: sqlx::Database,
        <DB as sqlx::Database>::Connection: sqlx::migrate::Migrate,
        for<'q> <DB as sqlx::Database>::Arguments: sqlx::IntoArguments<DB>,
        for<'e> &'e sqlx::Pool<DB>: sqlx::Executor<'e, Database = DB>,
        i64: sqlx::Type<DB> + for<'r> sqlx::Decode<'r, DB>,
        (i64,): for<'r> sqlx::FromRow<'r, DB::Row>,
    {
        migrator_of(&list(backend)[..5]).run(pool).await.unwrap();
        for sql in [
            "INSERT INTO users (username, password_hash, display_name, role, created_at) \
             VALUES ('u', '', 'U', 'user', 0)",
            "INSERT INTO rooms (kind, name, created_by, created_at, epoch, last_offset) \
             SELECT 'public', 'r', id, 0, 'e', 3 FROM users",
            "INSERT INTO messages (room_id, seq, user_id, client_msg_id, text, created_at) \
             SELECT r.id, s.seq, r.created_by, NULL, 'hi', 0 FROM rooms r \
             CROSS JOIN (SELECT 1 AS seq UNION ALL SELECT 2) s",
            "INSERT INTO room_events (room_id, seq, kind, message_id, user_id, data, created_at) \
             SELECT room_id, seq, 'message', id, user_id, '{}', 0 FROM messages",
            "INSERT INTO room_events (room_id, seq, kind, message_id, user_id, data, created_at) \
             SELECT room_id, 3, 'edit', id, user_id, '{\"text\":\"hey\"}', 0 FROM messages \
             WHERE seq = 1",
        ] {
            sqlx::query(sql).execute(pool).await.unwrap();
        }
        let (room,): (i64,) = sqlx::query_as("SELECT id FROM rooms")
            .fetch_one(pool)
            .await
            .unwrap();
        migrator(backend).run(pool).await.unwrap();
        let store = crate::open(url).await.unwrap();
        let stream = store.events(room, 0, 10).await.unwrap();
        let got: Vec<(i64, crate::EventKind)> = stream.iter().map(|e| (e.offset, e.kind)).collect();
        use crate::EventKind::{Edit, Message};
        assert_eq!(got, [(1, Message), (2, Message), (3, Edit)], "{backend}");
        let newest = store.events_before(room, 4, 2).await.unwrap();
        let got: Vec<i64> = newest.iter().map(|e| e.offset).collect();
        assert_eq!(got, [2, 3], "{backend}: oldest first, the newest two");
        assert_eq!(stream[2].message.as_ref().map(|m| m.offset), Some(1));
        store.close().await;
    }

    #[tokio::test]
    async fn sqlite_0006_keeps_the_stream() {
        use std::str::FromStr;
        let db = crate::testing::TestDatabase::sqlite();
        let opts = sqlx::sqlite::SqliteConnectOptions::from_str(db.url())
            .unwrap()
            .create_if_missing(true);
        let pool = sqlx::SqlitePool::connect_with(opts).await.unwrap();
        stream_across_0006(&pool, Backend::Sqlite, db.url()).await;
        pool.close().await;
    }

    #[tokio::test]
    async fn postgres_0006_keeps_the_stream() {
        let Some(db) = crate::testing::TestDatabase::postgres().await else {
            return;
        };
        let pool = sqlx::PgPool::connect(db.url()).await.unwrap();
        stream_across_0006(&pool, Backend::Postgres, db.url()).await;
        pool.close().await;
    }

    #[tokio::test]
    async fn sqlite_0005_rebuilds_notifications_keeping_ids() {
        use std::str::FromStr;
        let db = crate::testing::TestDatabase::sqlite();
        let opts = sqlx::sqlite::SqliteConnectOptions::from_str(db.url())
            .unwrap()
            .create_if_missing(true)
            .foreign_keys(true);
        let pool = sqlx::SqlitePool::connect_with(opts).await.unwrap();
        notifications_across_0005(&pool, Backend::Sqlite).await;
        let index: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND name = 'notifications_user'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(index, 1);
        pool.close().await;
    }

    #[tokio::test]
    async fn postgres_0005_widens_the_notifications_check() {
        let Some(db) = crate::testing::TestDatabase::postgres().await else {
            return;
        };
        let pool = sqlx::PgPool::connect(db.url()).await.unwrap();
        notifications_across_0005(&pool, Backend::Postgres).await;
        pool.close().await;
    }
}
