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
//! A batch append is three round trips to the connection's worker thread whatever its size
//! and however many rooms it touches, plus sqlx's ping when the connection goes back to the
//! pool: `BEGIN IMMEDIATE` with one `SELECT` of every lookup (as one JSON object); one
//! `UPDATE` reserving every room's offsets with the `SELECT` reading them back; one `INSERT`
//! of the messages (each row is also its stream event) with the `SELECT` of their new ids
//! and the `COMMIT`. A query of several statements is one round trip. The transaction is
//! opened and closed by these queries, not by sqlx, so a failed batch rolls itself back
//! (`abandon`). Under load each round trip waits for a core (the worker thread and the
//! writer thread both need one): on a loaded 2-core machine, the eight round trips this
//! used to take (an acquire ping, `BEGIN`, two lookups, the two queries above, `COMMIT`, the
//! release ping) kept the writer busy most of each second (see BENCHMARKS.md).
//!
//! Rows and keys go in as one JSON parameter per statement, unpacked by `json_each` (every
//! value is still bound), and rows come back as one JSON array in one row: sqlx hands each
//! returned row across threads on its own, so a `RETURNING` of a few hundred rows cost as
//! many wake-ups.
//!
//! **The writer thread.** Batch appends and moderation flags (the writes that come in a
//! stream) run on a thread of their own, `sqlite-writer`, with a current-thread runtime, and
//! so does the chat writer task that feeds them (`Store::writer_runtime`). Every statement
//! is a hop to the connection's worker thread and back; on the server's runtime each wake-up
//! after a hop waited for a worker busy with sockets (about 1 ms a statement under load,
//! measured), and the batch held the only writer meanwhile. Here the thread waiting for the
//! statement is the one that runs next. Other writes (accounts, rooms, documents) are rare
//! and stay where they are called.
//!
//! Durability: `synchronous = FULL`. In WAL mode, NORMAL may lose the last commits on power
//! loss or an OS crash (never on a process crash); FULL syncs the WAL at every commit, so an
//! acknowledged message survives both. Group commit makes that affordable: a batch is one
//! transaction and one fsync, however many messages it holds.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Sqlite, Transaction};

use crate::plan::{refusal_sql, Lookup, Plan, Refusal, Wanted};
use crate::{migrations, Backend, StoreOptions};

/// Every write transaction's first statement (see the module docs), as a macro so that
/// the queries that open their own transaction can `concat!` it.
macro_rules! begin_write {
    () => {
        "BEGIN IMMEDIATE"
    };
}
const BEGIN_WRITE: &str = begin_write!();
/// How long a connection waits for another process's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// The page size of a new database file, in bytes (see `connect_options`).
const PAGE_SIZE: u32 = 2048;
/// The writer's page cache, in KiB (`cache_size` takes a negative number for KiB).
///
/// Big enough for a batch's dirty pages (see `writer_pool`), and no bigger, because SQLite
/// scans the whole cache at some commits: when a b-tree page splits, `balance_nonroot`
/// parks pages under the lock-byte page's number (page 524,289 with 2 KiB pages), which
/// lifts the cache's highest key past the end of the file, and the commit's truncate then
/// walks every cached page to drop what lies beyond it. Under chat load many commits split
/// a page. With 32 MiB (16,384 pages, full after a few minutes) that walk was 7.2% of the
/// writer connection's thread at 15,000 msgs/s, and 2.4% with 8 MiB (`perf`, SQLite
/// 3.51.3; found with a gdb watchpoint on the cache's `iMaxKey`). 8 MiB is 4,096 pages,
/// about four times the pages a 512-message batch dirties.
const WRITER_CACHE_KIB: i64 = 8 * 1024;
/// The WAL length, in pages, past which the writer checkpoints after a commit (SQLite's
/// default is 1,000). A hot page written by many commits is copied to the database once per
/// checkpoint, so a longer WAL copies less per message (measured with 4 KiB pages: 13.2 KB
/// written per message at 1,000 pages, 9.4 KB at 10,000; with 2 KiB pages, in six pairs of
/// runs of the store example: 4.7 vs 5.0 KB and a median of 64.6 vs 69.8 µs a message at
/// 20,000 vs 10,000). The cost is a WAL file of about 40 MB (2 KiB pages; 80 MB in an older
/// file of 4 KiB pages) before each checkpoint, which a reader pinning an old snapshot can
/// stretch.
const WAL_AUTOCHECKPOINT_PAGES: u32 = 20_000;

pub(crate) struct SqliteStore {
    /// Exactly one connection: the only writer (see the module docs).
    writer: SqlitePool,
    /// Readers; the same pool as `writer` for an in-memory database, which exists only
    /// inside its one connection.
    reader: SqlitePool,
    /// Where batch appends run (see the module docs).
    write_thread: WriterThread,
}

/// A job for the writer thread: a future that reports its own result.
type WriterJob = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Jobs waiting for the writer thread. Its callers wait for room (backpressure), and in
/// practice there is one: the chat writer, with one batch at a time.
const WRITER_JOBS: usize = 16;

/// A thread with a current-thread runtime of its own that runs the batch appends (see the
/// module docs). Jobs run one at a time, each as a task (a panic fails that job only); the
/// thread ends when the store is dropped.
struct WriterThread {
    jobs: tokio::sync::mpsc::Sender<WriterJob>,
    /// Its runtime, for `Store::writer_runtime`.
    handle: tokio::runtime::Handle,
}

impl WriterThread {
    fn start() -> Result<WriterThread, StoreError> {
        let stopped = |e: std::io::Error| {
            StoreError::Unavailable(format!("cannot start the SQLite writer thread: {e}"))
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(stopped)?;
        let handle = runtime.handle().clone();
        let (jobs, mut queue) = tokio::sync::mpsc::channel::<WriterJob>(WRITER_JOBS);
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || {
                runtime.block_on(async move {
                    while let Some(job) = queue.recv().await {
                        if tokio::spawn(job).await.is_err() {
                            tracing::error!("sqlite: a write job panicked");
                        }
                    }
                })
            })
            .map_err(stopped)?;
        Ok(WriterThread { jobs, handle })
    }

    /// Runs `job` on the thread and waits for its result. A job whose caller went away
    /// still runs to its end (a batch is never cut off between its statements).
    async fn run<T: Send + 'static>(
        &self,
        job: impl std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let gone = || StoreError::Unavailable("the SQLite writer thread is gone".into());
        let (reply, result) = tokio::sync::oneshot::channel();
        let job = Box::pin(async move {
            let _ = reply.send(job.await);
        });
        self.jobs.send(job).await.map_err(|_| gone())?;
        result.await.map_err(|_| gone())?
    }
}

/// Parses the URL, applies the pragmas, and creates the file's directory if missing.
fn connect_options(url: &str) -> Result<SqliteConnectOptions, StoreError> {
    let opts = SqliteConnectOptions::from_str(url)
        .map_err(db_err)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .foreign_keys(true)
        .busy_timeout(BUSY_TIMEOUT)
        // Statement journals (every multi-row INSERT under a UNIQUE constraint keeps one, to
        // undo itself on a conflict) stay in memory instead of spilling to a temporary file
        // past 64 KiB: a batch's journal is a few MB, written and thrown away each commit.
        .pragma("temp_store", "memory")
        // A new database's page size (an existing one keeps its own: in WAL mode only a
        // VACUUM in another journal mode changes it). A batch dirties about one index leaf
        // per room and per sender, each written whole to the WAL at commit, so smaller
        // pages write less: in the store example (200 rooms × 4 users, 100-message
        // batches), 5.0 KB written and 54 µs of store time a message at 2 KiB, against 6.8
        // KB and 66 µs at SQLite's default of 4 KiB (and 4.4 KB but 58 µs at 1 KiB, where
        // the deeper trees cost more than the bytes saved).
        .page_size(PAGE_SIZE);
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

/// Keeps the writer connection only if it is out of any transaction.
///
/// A transaction dropped without commit queues its ROLLBACK on the connection's worker;
/// the ping lets it run before we look. When SQLite has already rolled the transaction back
/// by itself (it does on SQLITE_FULL and some I/O errors), that ROLLBACK fails, sqlx keeps
/// counting the transaction as open, and every later `BEGIN` on the connection would fail
/// ("non-zero transaction depth"): with one writer, no write would ever succeed again. Such a
/// connection is closed instead, and the pool opens a fresh one for the next write.
async fn release_writer(conn: &mut sqlx::SqliteConnection) -> Result<bool, sqlx::Error> {
    use sqlx::Connection;
    if !conn.is_in_transaction() {
        return Ok(true);
    }
    conn.ping().await?;
    if conn.is_in_transaction() {
        tracing::warn!(
            "sqlite: the writer connection is stuck in a failed transaction; reopening it"
        );
        return Ok(false);
    }
    Ok(true)
}

fn is_memory(url: &str) -> bool {
    url.contains(":memory:") || url.contains("mode=memory")
}

impl SqliteStore {
    /// The writer thread's runtime (see `Store::writer_runtime`).
    fn writer_runtime(&self) -> Option<tokio::runtime::Handle> {
        Some(self.write_thread.handle.clone())
    }

    /// Stores a batch of moderation flags in one statement, on the writer thread.
    async fn insert_flags(
        &self,
        rows: Vec<crate::shared::FlagRow>,
        created_at: i64,
    ) -> Result<(), StoreError> {
        let writer = self.writer.clone();
        self.write_thread
            .run(async move {
                let mut conn = writer.acquire().await.map_err(db_err)?;
                // One round trip: the transaction and its statement in one query.
                let result = sqlx::query(concat!(
                    begin_write!(),
                    "; INSERT INTO moderation_flags \
                     (message_id, room_id, user_id, reason, detail, created_at) \
                     SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, $2 \
                     FROM json_each($1) ORDER BY key; \
                     COMMIT"
                ))
                .bind(json(&rows))
                .bind(created_at)
                .execute(&mut *conn)
                .await
                .map_err(db_err);
                give_back(conn, result.is_ok()).await;
                result.map(drop)
            })
            .await
    }

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
        let write_thread = WriterThread::start()?;
        Ok(SqliteStore {
            writer,
            reader,
            write_thread,
        })
    }

    /// The single-connection write pool, migrated.
    async fn writer_pool(
        opts: &SqliteConnectOptions,
        options: &StoreOptions,
    ) -> Result<SqlitePool, StoreError> {
        // Sized for group commit (see the module docs): a batch of a few hundred messages
        // across as many rooms and senders dirties about two pages per message, more than
        // the default 2 MiB cache holds, which would spill them to the WAL mid-transaction
        // (see `WRITER_CACHE_KIB` for why it is not bigger).
        let opts = opts
            .clone()
            .pragma("cache_size", (-WRITER_CACHE_KIB).to_string())
            .pragma("wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES.to_string());
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(options.acquire_timeout)
            // A ping per acquire is a round trip to the worker thread per write, and a
            // local file's connection does not go stale the way a socket does.
            .test_before_acquire(false)
            .after_release(|conn, _| Box::pin(release_writer(conn)))
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
        self.writer.begin_with(BEGIN_WRITE).await.map_err(db_err)
    }

    /// A read transaction: in WAL mode its reads all see the database as of its first one.
    async fn begin_read(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        self.reader.begin().await.map_err(db_err)
    }

    /// `append_messages` (and, with `senders`, `append_sends`) for SQLite. The write lock is
    /// held from `BEGIN IMMEDIATE`, so what the lookup sees (senders' standing included)
    /// cannot change before the commit: no retries are needed.
    ///
    /// Every query is a round trip to the connection's worker thread (sqlx runs each SQLite
    /// connection on a thread of its own), so the batch is written in three queries
    /// whatever its size or the number of rooms it touches (see the module docs). The rows
    /// go in as one JSON parameter per statement (unpacked by `json_each`), still bound,
    /// never spliced into the SQL. It runs on the writer thread.
    async fn append_batch(
        &self,
        batch: Vec<NewMessage>,
        senders: bool,
    ) -> Result<Vec<Result<AppendedMessage, StoreError>>, StoreError> {
        let writer = self.writer.clone();
        self.write_thread
            .run(async move {
                let mut conn = writer.acquire().await.map_err(db_err)?;
                let result = append_on(&mut conn, batch, senders).await;
                give_back(conn, result.is_ok()).await;
                result
            })
            .await
    }
}

/// Returns the writer connection after a write job that opened and closed its own
/// transaction: inline when it succeeded, through `abandon` when it failed.
///
/// A dropped pool connection goes back through a spawned task, which waits its turn behind
/// every runnable task; the next batch waits for the only writer meanwhile. This runs the
/// same return (with `after_release`) inline. sqlx marks it `doc(hidden)`; the version is
/// pinned in Cargo.lock.
async fn give_back(mut conn: sqlx::pool::PoolConnection<Sqlite>, succeeded: bool) {
    if succeeded {
        conn.return_to_pool().await;
    } else {
        abandon(conn).await;
    }
}

/// Ends the transaction that a failed write job opened with its own `BEGIN IMMEDIATE`
/// (sqlx does not know about it, so nothing else would). When the `ROLLBACK` fails for any
/// reason but "no transaction is active" (SQLite rolls back by itself on SQLITE_FULL and
/// some I/O errors), the transaction may still be open: the connection is closed instead,
/// and the pool opens a fresh one for the next write.
async fn abandon(mut conn: sqlx::pool::PoolConnection<Sqlite>) {
    use sqlx::Connection;
    match sqlx::query("ROLLBACK").execute(&mut *conn).await {
        Ok(_) => {}
        Err(e) if e.to_string().contains("no transaction is active") => {}
        Err(e) => {
            tracing::warn!(error = %e, "sqlite: rollback failed; reopening the writer connection");
            let _ = conn.detach().close().await;
        }
    }
}

/// `append_batch` on the writer connection, in three queries: `BEGIN IMMEDIATE` with the
/// lookup, the offsets `UPDATE` with the `SELECT` reading them back, and the messages
/// `INSERT` with the `SELECT` of their ids and the `COMMIT`. A query of several statements
/// is one round trip (`fetch_all` runs them all). On an error the caller rolls back
/// (`abandon`).
async fn append_on(
    conn: &mut sqlx::SqliteConnection,
    batch: Vec<NewMessage>,
    senders: bool,
) -> Result<Vec<Result<AppendedMessage, StoreError>>, StoreError> {
    let now = now_ms();
    let lookup = begin_with_lookup(conn, &Wanted::of(&batch, senders), now).await?;
    let mut plan = Plan::new(batch, lookup, now);
    let counts: Vec<(i64, i64)> = plan.room_counts().into_iter().collect();
    if counts.is_empty() {
        sqlx::query("COMMIT")
            .execute(&mut *conn)
            .await
            .map_err(db_err)?;
        return Ok(plan.finish(&HashMap::new()));
    }
    // No RETURNING: the rows come back as one JSON array (see the module docs).
    let counts_json = json(&counts);
    // Two statements in one round trip: the UPDATE returns no row, the SELECT one.
    let last: Vec<(i64, i64)> = json_rows(
        sqlx::query_scalar(
            "UPDATE rooms SET last_offset = last_offset + c.n \
             FROM (SELECT value ->> 0 AS id, value ->> 1 AS n FROM json_each($1)) AS c \
             WHERE rooms.id = c.id; \
             SELECT json_group_array(json_array(id, last_offset)) FROM rooms \
             WHERE id IN (SELECT value ->> 0 FROM json_each($1))",
        )
        .bind(&counts_json)
        .fetch_one(&mut *conn)
        .await
        .map_err(db_err)?,
    )?;
    let last: BTreeMap<i64, i64> = last.into_iter().collect();
    if last.len() != counts.len() {
        // The lookup found these rooms under the same write lock.
        return Err(StoreError::other("a room vanished inside its append"));
    }
    plan.assign(&last);
    let rows: Vec<_> = plan
        .new_rows()
        .map(|(m, offset)| {
            let cmid = m.client_msg_id.as_deref();
            let text = m.text.as_str();
            (m.room_id, offset, m.user_id, cmid, text, m.reply_to)
        })
        .collect();
    // Each room's new messages hold a contiguous block of offsets, ending at its new last
    // offset. One round trip inserts them, reads their ids back in one row (the INSERT
    // returns no row) and commits. A message's row is also its stream event (migration
    // 0006). `fetch_all`, not `fetch_one`: sqlx stops at the first row of a limited fetch,
    // and the COMMIT comes after it.
    let blocks = json(
        &counts
            .iter()
            .map(|&(room, n)| (room, last[&room] - n + 1, last[&room]))
            .collect::<Vec<(i64, i64, i64)>>(),
    );
    let mut inserted: Vec<String> = sqlx::query_scalar(
        "INSERT INTO messages \
         (room_id, seq, user_id, client_msg_id, text, reply_to, created_at) \
         SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, \
         value ->> 5, $2 FROM json_each($1) ORDER BY key; \
         SELECT json_group_array(json_array(m.id, m.room_id, m.seq)) \
         FROM json_each($3) AS j CROSS JOIN messages AS m ON m.room_id = j.value ->> 0 \
         AND m.seq BETWEEN j.value ->> 1 AND j.value ->> 2; \
         COMMIT",
    )
    .bind(json(&rows))
    .bind(plan.created_at())
    .bind(&blocks)
    .fetch_all(&mut *conn)
    .await
    .map_err(db_err)?;
    let inserted: Vec<(i64, i64, i64)> = match inserted.pop() {
        Some(text) if inserted.is_empty() => json_rows(text)?,
        _ => return Err(StoreError::other("the batch insert returned no ids row")),
    };
    let ids = inserted
        .into_iter()
        .map(|(id, room, seq)| ((room, seq), id))
        .collect();
    Ok(plan.finish(&ids))
}

/// What `begin_with_lookup` reads, as one JSON object.
#[derive(serde::Deserialize)]
struct LookupRows {
    /// Ids of stored messages with one of the batch's dedupe keys.
    existing: Vec<i64>,
    /// `(room_id, user_id, refusal code)` of the refused senders.
    refused: Vec<(i64, i64, i32)>,
    users: Vec<i64>,
    rooms: Vec<i64>,
    /// `(message id, room id)` of the messages replied to.
    replies: Vec<(i64, i64)>,
}

/// Opens the write transaction and resolves a batch's references in the same round trip,
/// whatever its size: `BEGIN IMMEDIATE`, then one `SELECT` of one JSON object holding the
/// dedupe keys found, the refused senders (for `append_sends`; usually none), the users and
/// rooms that exist, and the rooms of replies. The key lists go in as one JSON parameter
/// each and are unpacked by `json_each`. Duplicates (retries) are rare, so their stored
/// rows are read by a second query only when there are some.
async fn begin_with_lookup(
    conn: &mut sqlx::SqliteConnection,
    wanted: &Wanted,
    now: i64,
) -> Result<Lookup, StoreError> {
    let found: Vec<String> = sqlx::query_scalar(concat!(
        begin_write!(),
        "; SELECT json_object(",
        // CROSS JOIN makes json_each the outer loop: one unique-index probe per key.
        "'existing', (SELECT json_group_array(m.id) FROM json_each($1) AS j \
         CROSS JOIN messages AS m ON m.user_id = json_extract(j.value, '$[0]') \
         AND m.client_msg_id = json_extract(j.value, '$[1]')), ",
        // Only the refused pairs; LEFT JOINs keep json_each the outer loop, with one
        // primary-key probe per table and pair.
        "'refused', (SELECT json_group_array(json_array(j.value ->> 0, j.value ->> 1, ",
        refusal_sql!(code),
        ")) FROM json_each($2) AS j \
         LEFT JOIN rooms AS r ON r.id = j.value ->> 0 \
         LEFT JOIN room_members AS rm ON rm.room_id = r.id AND rm.user_id = j.value ->> 1 \
         LEFT JOIN user_bans AS b ON b.user_id = rm.user_id WHERE ",
        refusal_sql!(where "$3"),
        "), 'users', (SELECT json_group_array(id) FROM users \
         WHERE id IN (SELECT value FROM json_each($4))), \
         'rooms', (SELECT json_group_array(id) FROM rooms \
         WHERE id IN (SELECT value FROM json_each($5))), \
         'replies', (SELECT json_group_array(json_array(id, room_id)) FROM messages \
         WHERE id IN (SELECT value FROM json_each($6))))"
    ))
    .bind(json(&wanted.keys))
    .bind(json(&wanted.senders))
    .bind(now)
    .bind(json(&wanted.users))
    .bind(json(&wanted.rooms))
    .bind(json(&wanted.replies))
    .fetch_all(&mut *conn)
    .await
    .map_err(db_err)?;
    let found: LookupRows = match found.as_slice() {
        [text] => json_rows(text.clone())?,
        _ => return Err(StoreError::other("the batch lookup returned no row")),
    };
    let mut out = Lookup {
        users: found.users.into_iter().collect(),
        rooms: found.rooms.into_iter().collect(),
        reply_rooms: found.replies.into_iter().collect(),
        ..Lookup::default()
    };
    if !wanted.senders.is_empty() {
        let refused = found.refused.into_iter();
        let refused = refused.map(|(room, user, code)| ((room, user), Refusal::from_code(code)));
        out.refused = Some(refused.collect());
    }
    if !found.existing.is_empty() {
        let rows = sqlx::query(concat!(
            "SELECT ",
            msg_cols!(""),
            " FROM messages WHERE id IN (SELECT value FROM json_each($1))"
        ))
        .bind(json(&found.existing))
        .fetch_all(&mut *conn)
        .await
        .map_err(db_err)?;
        for r in &rows {
            let m = message_at(r, 0)?;
            let key = (m.user_id, m.client_msg_id.clone().unwrap_or_default());
            out.existing.insert(key, m);
        }
    }
    Ok(out)
}

/// Rows that came back as one JSON array (see `append_batch`).
fn json_rows<T: serde::de::DeserializeOwned>(text: String) -> Result<T, StoreError> {
    serde_json::from_str(&text).map_err(|e| StoreError::other(format!("bad JSON rows: {e}")))
}

/// A key list as JSON for `json_each`. Integers and strings always serialize.
fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "[]".to_owned())
}

crate::shared::sql_store!(SqliteStore, SqliteRow);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{NewRoom, NewUser, RoomKind, Store, UserRole};

    fn msg(room_id: i64, user_id: i64, cmid: &str, text: &str) -> NewMessage {
        NewMessage {
            room_id,
            user_id,
            client_msg_id: Some(cmid.to_owned()),
            text: text.to_owned(),
            reply_to: None,
        }
    }

    /// A batch whose statements fail inside the database (past everything `Plan` checks)
    /// leaves no transaction open behind it: the next batch, and the other writes that go
    /// through sqlx's own transactions, still succeed, and nothing of the failed batch is
    /// stored.
    #[tokio::test]
    async fn a_failed_batch_leaves_the_writer_usable() {
        let store = SqliteStore::open("sqlite::memory:", &StoreOptions::default())
            .await
            .unwrap();
        let user = NewUser {
            username: "alice".into(),
            password_hash: "x".into(),
            display_name: "Alice".into(),
            role: UserRole::User,
        };
        let alice = store.create_user(user).await.unwrap();
        let room = NewRoom {
            kind: RoomKind::Public,
            name: "general".into(),
            created_by: alice.id,
        };
        let r = store.create_room(room).await.unwrap();
        sqlx::query(
            "CREATE TRIGGER poison BEFORE INSERT ON messages WHEN NEW.text = 'poison' \
             BEGIN SELECT RAISE(ABORT, 'poisoned'); END",
        )
        .execute(&store.writer)
        .await
        .unwrap();

        let out = store
            .append_messages(vec![
                msg(r.id, alice.id, "a", "fine"),
                msg(r.id, alice.id, "b", "poison"),
            ])
            .await;
        assert!(out.iter().all(|m| m.is_err()), "{out:?}");

        let out = store
            .append_messages(vec![msg(r.id, alice.id, "c", "after")])
            .await;
        let appended = out.into_iter().next().unwrap().unwrap();
        assert_eq!(
            appended.message.offset, 1,
            "the failed batch reserved no offsets"
        );
        let room = NewRoom {
            kind: RoomKind::Public,
            name: "second".into(),
            created_by: alice.id,
        };
        store.create_room(room).await.unwrap();
        let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM messages")
            .fetch_one(&store.reader)
            .await
            .unwrap();
        assert_eq!(stored, 1);
    }

    /// The page size is set before the first table is created (sqlx orders the pragmas);
    /// set later, SQLite would ignore it silently.
    #[tokio::test]
    async fn a_new_database_has_small_pages() {
        let dir = std::env::temp_dir().join(format!("sb-pages-{}", std::process::id()));
        let url = format!("sqlite:{}", dir.join("pages.db").display());
        let store = SqliteStore::open(&url, &StoreOptions::default())
            .await
            .unwrap();
        let size: i64 = sqlx::query_scalar("PRAGMA page_size")
            .fetch_one(&store.reader)
            .await
            .unwrap();
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(size, i64::from(PAGE_SIZE));
    }
}
