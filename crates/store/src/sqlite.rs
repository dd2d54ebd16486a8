//! The SQLite backend: one file in WAL mode, one writer connection and a pool of readers.
//!
//! SQLite allows one writer at a time. Rather than let several pooled connections race for
//! the write lock (and sleep in the busy handler), every write goes through `writer`, a
//! pool of exactly one connection: writers queue fairly in the pool, and each write
//! transaction starts with `BEGIN IMMEDIATE`, so it holds the lock from its first read and
//! never has to upgrade (which could fail with SQLITE_BUSY_SNAPSHOT). Reads use `reader`,
//! which in WAL mode never blocks the writer nor waits for it. `busy_timeout` still covers
//! other processes (a `switchboard migrate` run beside a server).
//!
//! A batch append is a handful of statements whatever its size: JSON-parameter lookups, one
//! offset reservation per room, multi-row `INSERT ... VALUES` in fixed chunk sizes (every
//! value bound), and one `INSERT ... SELECT` per room for the stream events.
//!
//! Durability: `synchronous = FULL`. In WAL mode, NORMAL may lose the last commits on power
//! loss or an OS crash (never on a process crash); FULL syncs the WAL at every commit, so an
//! acknowledged message survives both. Group commit makes that affordable: a batch is one
//! transaction and one fsync, however many messages it holds.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Sqlite, Transaction};

use crate::plan::{Lookup, Plan, Wanted};
use crate::{migrations, Backend, StoreOptions};

/// How long a connection waits for another process's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) struct SqliteStore {
    /// Exactly one connection: the only writer (see the module docs).
    writer: SqlitePool,
    /// Readers; the same pool as `writer` for an in-memory database, which exists only
    /// inside its one connection.
    reader: SqlitePool,
}

/// Parses the URL, applies the pragmas, and creates the file's directory if missing.
fn connect_options(url: &str) -> Result<SqliteConnectOptions, StoreError> {
    let opts = SqliteConnectOptions::from_str(url)
        .map_err(db_err)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .foreign_keys(true)
        .busy_timeout(BUSY_TIMEOUT);
    if !is_memory(url) {
        if let Some(dir) = opts.get_filename().parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|e| {
                    StoreError::Unavailable(format!("cannot create {}: {e}", dir.display()))
                })?;
            }
        }
    }
    Ok(opts)
}

fn is_memory(url: &str) -> bool {
    url.contains(":memory:") || url.contains("mode=memory")
}

impl SqliteStore {
    const BACKEND: Backend = Backend::Sqlite;
    /// Finds a document inside a write transaction. No lock clause: `BEGIN IMMEDIATE`
    /// already holds the database's write lock, which excludes every other writer.
    const LOCK_DOCUMENT: &'static str = "SELECT id FROM documents WHERE id = $1";

    /// Opens (creating the file and its directory if needed) and migrates.
    pub(crate) async fn open(url: &str, options: &StoreOptions) -> Result<SqliteStore, StoreError> {
        let opts = connect_options(url)?;
        let memory = is_memory(url);
        let writer = Self::writer_pool(&opts, options).await?;
        let reader = if memory {
            writer.clone()
        } else {
            SqlitePoolOptions::new()
                .max_connections(options.max_connections.max(1))
                .acquire_timeout(options.acquire_timeout)
                .connect_with(opts.clone())
                .await
                .map_err(db_err)?
        };
        tracing::info!(
            backend = "sqlite",
            path = %opts.get_filename().display(),
            synchronous = "FULL",
            "store opened"
        );
        Ok(SqliteStore { writer, reader })
    }

    /// The single-connection write pool, migrated.
    async fn writer_pool(
        opts: &SqliteConnectOptions,
        options: &StoreOptions,
    ) -> Result<SqlitePool, StoreError> {
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(options.acquire_timeout)
            .connect_with(opts.clone())
            .await
            .map_err(db_err)?;
        migrations::migrator(Backend::Sqlite)
            .run(&writer)
            .await
            .map_err(crate::error::migrate_err)?;
        Ok(writer)
    }

    /// Runs the migrations only.
    pub(crate) async fn migrate(url: &str) -> Result<(), StoreError> {
        let opts = connect_options(url)?;
        Self::writer_pool(&opts, &StoreOptions::default())
            .await?
            .close()
            .await;
        Ok(())
    }

    async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        self.writer
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(db_err)
    }

    /// A read transaction: in WAL mode its reads all see the database as of its first one.
    async fn begin_read(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        self.reader.begin().await.map_err(db_err)
    }

    /// `append_messages` for SQLite. The write lock is held from `BEGIN IMMEDIATE`, so what
    /// the lookup sees cannot change before the commit: no retries are needed.
    async fn append_batch(
        &self,
        batch: Vec<NewMessage>,
    ) -> Result<Vec<Result<AppendedMessage, StoreError>>, StoreError> {
        let mut tx = self.begin_write().await?;
        let lookup = lookup(&mut tx, &Wanted::of(&batch)).await?;
        let mut plan = Plan::new(batch, lookup, now_ms());
        let mut last = BTreeMap::new();
        for (room, count) in plan.room_counts() {
            let top: i64 = sqlx::query_scalar(
                "UPDATE rooms SET last_offset = last_offset + $1 WHERE id = $2 RETURNING last_offset",
            )
            .bind(count)
            .bind(room)
            .fetch_one(&mut *tx)
            .await
            .map_err(db_err)?;
            last.insert(room, top);
        }
        plan.assign(&last);
        let created_at = plan.created_at();
        let rows: Vec<(&NewMessage, i64)> = plan.new_rows().collect();
        let mut ids = HashMap::with_capacity(rows.len());
        let mut rest = &rows[..];
        while !rest.is_empty() {
            let n = chunk_len(rest.len());
            let (chunk, tail) = rest.split_at(n);
            let mut q = sqlx::query_as::<_, (i64, i64, i64)>(insert_messages_sql(n));
            for &(m, offset) in chunk {
                q = q
                    .bind(m.room_id)
                    .bind(offset)
                    .bind(m.user_id)
                    .bind(m.client_msg_id.as_deref())
                    .bind(m.text.as_str())
                    .bind(m.reply_to)
                    .bind(created_at);
            }
            for (id, room, seq) in q.fetch_all(&mut *tx).await.map_err(db_err)? {
                ids.insert((room, seq), id);
            }
            rest = tail;
        }
        // Each room's new messages hold a contiguous block of offsets: copy the block into
        // the stream with one statement per room.
        for (room, count) in plan.room_counts() {
            let top = last[&room];
            sqlx::query(
                "INSERT INTO room_events (room_id, seq, kind, message_id, user_id, data, created_at) \
                 SELECT room_id, seq, 'message', id, user_id, '{}', created_at FROM messages \
                 WHERE room_id = $1 AND seq BETWEEN $2 AND $3",
            )
            .bind(room)
            .bind(top - count + 1)
            .bind(top)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        }
        tx.commit().await.map_err(db_err)?;
        Ok(plan.finish(&ids))
    }
}

/// Rows per multi-row INSERT. A batch is cut into chunks of these sizes, largest first, so
/// only eight statement shapes exist and all stay prepared in the statement cache.
/// 128 rows x 7 columns stays far below SQLite's limit of 32766 parameters.
const CHUNKS: [usize; 8] = [128, 64, 32, 16, 8, 4, 2, 1];

fn chunk_len(remaining: usize) -> usize {
    CHUNKS.into_iter().find(|&c| c <= remaining).unwrap_or(1)
}

/// `INSERT INTO messages ... VALUES (...), (...) RETURNING id, room_id, seq` for `rows` rows,
/// built once per chunk size from placeholders only: every value is still a bound parameter.
fn insert_messages_sql(rows: usize) -> &'static str {
    static SQL: OnceLock<Vec<String>> = OnceLock::new();
    let all = SQL.get_or_init(|| {
        CHUNKS
            .iter()
            .map(|&n| {
                let values: Vec<String> = (0..n)
                    .map(|r| {
                        let p: Vec<String> = (1..=7).map(|c| format!("${}", r * 7 + c)).collect();
                        format!("({})", p.join(", "))
                    })
                    .collect();
                format!(
                    "INSERT INTO messages \
                     (room_id, seq, user_id, client_msg_id, text, reply_to, created_at) \
                     VALUES {} RETURNING id, room_id, seq",
                    values.join(", ")
                )
            })
            .collect()
    });
    let i = CHUNKS
        .iter()
        .position(|&c| c == rows)
        .expect("a chunk size");
    &all[i]
}

/// Resolves a batch's references in four statements, whatever its size: the key lists go
/// in as one JSON parameter each and are unpacked by `json_each`.
async fn lookup(
    tx: &mut Transaction<'static, Sqlite>,
    wanted: &Wanted,
) -> Result<Lookup, StoreError> {
    let mut out = Lookup::default();
    if !wanted.keys.is_empty() {
        // CROSS JOIN makes json_each the outer loop: one unique-index probe per key.
        let rows = sqlx::query(concat!(
            "SELECT ",
            msg_cols!("m."),
            " FROM json_each($1) AS j CROSS JOIN messages AS m \
             ON m.user_id = json_extract(j.value, '$[0]') \
             AND m.client_msg_id = json_extract(j.value, '$[1]')"
        ))
        .bind(json(&wanted.keys))
        .fetch_all(&mut **tx)
        .await
        .map_err(db_err)?;
        for r in &rows {
            let m = message_at(r, 0)?;
            let key = (m.user_id, m.client_msg_id.clone().unwrap_or_default());
            out.existing.insert(key, m);
        }
    }
    out.users =
        sqlx::query_scalar("SELECT id FROM users WHERE id IN (SELECT value FROM json_each($1))")
            .bind(json(&wanted.users))
            .fetch_all(&mut **tx)
            .await
            .map_err(db_err)?
            .into_iter()
            .collect();
    out.rooms =
        sqlx::query_scalar("SELECT id FROM rooms WHERE id IN (SELECT value FROM json_each($1))")
            .bind(json(&wanted.rooms))
            .fetch_all(&mut **tx)
            .await
            .map_err(db_err)?
            .into_iter()
            .collect();
    if !wanted.replies.is_empty() {
        out.reply_rooms = sqlx::query_as::<_, (i64, i64)>(
            "SELECT id, room_id FROM messages WHERE id IN (SELECT value FROM json_each($1))",
        )
        .bind(json(&wanted.replies))
        .fetch_all(&mut **tx)
        .await
        .map_err(db_err)?
        .into_iter()
        .collect();
    }
    Ok(out)
}

/// A key list as JSON for `json_each`. Integers and strings always serialize.
fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "[]".to_owned())
}

crate::shared::sql_store!(SqliteStore, SqliteRow);
