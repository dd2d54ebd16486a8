//! Durable storage for Switchboard: accounts, rooms, each room's ordered message stream,
//! moderation flags and bans, notifications and users' `last_seen`, sites, collaborative
//! documents (per document: members, a Yjs update log with its compacted snapshot, and saved
//! versions), and the audit log, behind one [`Store`] trait with a SQLite and a PostgreSQL
//! backend.
//!
//! # Layout
//! - [`store`](Store): the trait, the only thing the rest of the server depends on.
//! - `model`: plain records ([`Message`], [`RoomEvent`], [`Room`], ...) and their inputs.
//! - `error`: [`StoreError`], and the translation of database errors into it.
//! - `shared`: the SQL both backends share, expanded once per backend by a macro.
//! - `plan`: the per-message decisions of a batch append (dedupe, validation, offsets),
//!   free of SQL and shared by both backends.
//! - `sqlite`, `postgres`: connection set-up, transactions and the bulk append path.
//! - `migrations`: the schema, embedded from `migrations/<backend>/*.sql`.
//! - [`testing`]: a throw-away database per test, for this crate's suite and the server's.
//!
//! [`open`] picks the backend from the URL scheme (`sqlite:`, `postgres:`/`postgresql:`) in
//! one place, migrates, and logs which backend it opened.
//!
//! # Guarantees
//! - **Offsets.** Every event of a room (message, edit, delete, removal, restore) takes the
//!   room's next offset: 1, 2, 3, ... strictly increasing with no gaps, assigned inside the
//!   transaction that writes the event (`UPDATE rooms SET last_offset = last_offset + n ...
//!   RETURNING`), so an offset is never seen by anyone unless its event is committed. Within
//!   a room, messages of one batch get offsets in batch order, so a sender who appends in
//!   order is stored in order.
//! - **Epoch.** Random at room creation and never changed: a room's history is never
//!   trimmed, so recovery positions stay valid across restarts.
//! - **Dedupe.** `(user_id, client_msg_id)` is unique. Appending it again, in a later batch
//!   or the same one, returns the original message with `duplicate: true` and takes no
//!   offset, so a client retry never duplicates a message and never leaves a gap.
//! - **Group commit.** [`Store::append_messages`] writes a whole batch in one transaction:
//!   one commit and one fsync for N messages. Batching is the caller's (the chat service
//!   collects what arrives within a few ms).
//! - **Document logs.** An update's `seq` comes from one counter for the whole table and is
//!   never reused. Appends hold their documents' rows while taking seqs, so one document's
//!   seqs commit in increasing order: a load (snapshot and log read in one consistent view)
//!   sees a prefix of the log, and compacting through a seq the caller has loaded never
//!   drops an update it has not seen.
//! - **Durability: acknowledged == committed.** A call returns `Ok` only after its commit.
//!   SQLite runs in WAL mode with `synchronous = FULL` (the WAL is fsynced at every commit,
//!   so a commit survives power loss, not only a crashed process; group commit keeps the
//!   cost to one fsync per batch). PostgreSQL runs with its default `synchronous_commit = on`.
//! - **Bytes in, bytes out.** Every value is a bound parameter, never spliced into SQL, and
//!   JSON and text columns are TEXT: text that looks like SQL or HTML is stored and returned
//!   exactly. The one refusal is NUL, which PostgreSQL cannot store (`Invalid` on both).
//! - **Errors.** [`StoreError::Unavailable`] means "temporary": the database is down,
//!   unreachable, timed out or busy. Opening an unreachable database fails within
//!   [`StoreOptions::connect_timeout`]; it does not hang.

mod error;
mod migrations;
mod model;
mod plan;
mod postgres;
mod shared;
mod sqlite;
mod store;
pub mod testing;

use std::sync::Arc;
use std::time::Duration;

pub use error::StoreError;
pub use model::*;
pub use store::{Store, MAX_PAGE};

/// Tuning for [`open_with`]. The defaults suit a single node on a small machine.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// PostgreSQL: the pool size. SQLite: the number of reader connections (writes always
    /// go through one connection).
    pub max_connections: u32,
    /// How long opening waits for the database to answer before `Unavailable`.
    pub connect_timeout: Duration,
    /// How long a call waits for a pooled connection before `Unavailable`.
    pub acquire_timeout: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            max_connections: 8,
            connect_timeout: Duration::from_secs(5),
            acquire_timeout: Duration::from_secs(5),
        }
    }
}

/// Backend named by a URL's scheme: the one place that decides.
fn backend_of(url: &str) -> Result<Backend, StoreError> {
    let scheme = url.split(':').next().unwrap_or("");
    match scheme {
        "sqlite" => Ok(Backend::Sqlite),
        "postgres" | "postgresql" => Ok(Backend::Postgres),
        _ => Err(StoreError::Invalid(format!(
            "unsupported database URL scheme {scheme:?}: use sqlite: or postgres:"
        ))),
    }
}

/// Opens the database named by `url` with default options, running pending migrations.
///
/// `sqlite://path/to/file.db` (created with its directory if missing), `sqlite::memory:`, or
/// `postgres://user@host:port/db`. With PostgreSQL, `?options[search_path]=schema` keeps
/// Switchboard's tables in a schema of their own.
pub async fn open(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    open_with(url, &StoreOptions::default()).await
}

/// [`open`] with explicit options.
pub async fn open_with(url: &str, options: &StoreOptions) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match backend_of(url)? {
        Backend::Sqlite => Arc::new(sqlite::SqliteStore::open(url, options).await?),
        Backend::Postgres => Arc::new(postgres::PgStore::open(url, options).await?),
    })
}

/// Runs pending migrations and returns, for `switchboard migrate`. Already-applied
/// migrations are skipped (checked by version and checksum); PostgreSQL serializes
/// concurrent migrators with an advisory lock.
pub async fn migrate(url: &str) -> Result<Backend, StoreError> {
    let backend = backend_of(url)?;
    match backend {
        Backend::Sqlite => sqlite::SqliteStore::migrate(url).await?,
        Backend::Postgres => postgres::PgStore::migrate(url).await?,
    }
    tracing::info!(%backend, "migrations applied");
    Ok(backend)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheme_picks_the_backend() {
        assert_eq!(backend_of("sqlite://data/sb.db").unwrap(), Backend::Sqlite);
        assert_eq!(backend_of("sqlite::memory:").unwrap(), Backend::Sqlite);
        assert_eq!(backend_of("postgres://h/db").unwrap(), Backend::Postgres);
        assert_eq!(backend_of("postgresql://h/db").unwrap(), Backend::Postgres);
        assert!(matches!(
            backend_of("mysql://h/db"),
            Err(StoreError::Invalid(_))
        ));
        assert!(matches!(
            backend_of("data/sb.db"),
            Err(StoreError::Invalid(_))
        ));
    }
}
