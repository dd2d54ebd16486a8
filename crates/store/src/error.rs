//! The store's one error type, and the translation of sqlx errors into it.

use std::borrow::Cow;

/// What went wrong in a store call, by what the caller should do about it.
///
/// Messages name the store's own concepts, never SQL; still, callers sanitize before
/// anything reaches a client (`Unavailable` maps to protocol error 100 "temporary").
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The room, message, membership or token the call names does not exist.
    #[error("not found")]
    NotFound,
    /// The write contradicts what is stored (a taken username, an existing membership, a
    /// message already deleted).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The input is unacceptable whatever the stored state (a NUL character, an unknown user,
    /// a `reply_to` outside the room, a malformed URL).
    #[error("invalid: {0}")]
    Invalid(String),
    /// The sender of a message is not a member of its room ([`crate::Store::append_sends`]).
    #[error("not a member")]
    Forbidden,
    /// The sender of a message is muted in its room or banned
    /// ([`crate::Store::append_sends`]).
    #[error("muted or banned")]
    Muted,
    /// The database cannot be reached or is too busy: connection refused or lost, timeouts,
    /// pool exhaustion, locks, serialization failures. Retrying later may succeed.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Anything else; a bug or a broken database rather than the caller's fault.
    #[error("store error: {0}")]
    Other(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl StoreError {
    /// A copy for every message of a batch that failed as a whole. `Other` loses its source
    /// chain in the copy but keeps its text.
    pub(crate) fn replicate(&self) -> StoreError {
        match self {
            StoreError::NotFound => StoreError::NotFound,
            StoreError::Conflict(s) => StoreError::Conflict(s.clone()),
            StoreError::Invalid(s) => StoreError::Invalid(s.clone()),
            StoreError::Forbidden => StoreError::Forbidden,
            StoreError::Muted => StoreError::Muted,
            StoreError::Unavailable(s) => StoreError::Unavailable(s.clone()),
            StoreError::Other(e) => StoreError::Other(e.to_string().into()),
        }
    }

    pub(crate) fn other(msg: impl Into<String>) -> StoreError {
        StoreError::Other(msg.into().into())
    }
}

/// PostgreSQL SQLSTATE classes and codes that mean "try again later" rather than "your
/// request is wrong": connection exceptions (08), insufficient resources (53), operator
/// intervention such as shutdown (57P01..57P05), query cancelled/statement timeout (57014),
/// lock not available (55P03), serialization failure (40001) and deadlock (40P01).
fn pg_temporary(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("57P")
        || matches!(code, "57014" | "55P03" | "40001" | "40P01")
}

/// SQLite primary result codes (the extended code masked to its low byte) that mean the
/// database is busy or cannot be reached: BUSY 5, LOCKED 6, NOMEM 7, IOERR 10, FULL 13,
/// CANTOPEN 14, PROTOCOL 15.
fn sqlite_temporary(code: &str) -> bool {
    match code.parse::<i64>() {
        Ok(c) => matches!(c & 0xff, 5 | 6 | 7 | 10 | 13 | 14 | 15),
        Err(_) => false,
    }
}

/// Translates a sqlx error. Unique, foreign-key and check violations that a call can
/// anticipate are mapped by the call itself with a better message; this is the fallback.
/// No message built here quotes the database's own text to a client-facing variant
/// (`Conflict`, `Invalid`): that text can name tables, columns and SQL.
pub(crate) fn db_err(e: sqlx::Error) -> StoreError {
    use sqlx::error::ErrorKind;
    match e {
        sqlx::Error::RowNotFound => StoreError::NotFound,
        sqlx::Error::PoolTimedOut => {
            StoreError::Unavailable("timed out waiting for a database connection".into())
        }
        sqlx::Error::PoolClosed => StoreError::Unavailable("the store is closed".into()),
        sqlx::Error::WorkerCrashed => {
            StoreError::Unavailable("the database worker thread stopped".into())
        }
        sqlx::Error::Io(io) => StoreError::Unavailable(format!("database i/o: {io}")),
        sqlx::Error::Tls(tls) => StoreError::Unavailable(format!("database tls: {tls}")),
        sqlx::Error::Configuration(c) => StoreError::Invalid(format!("database url: {c}")),
        sqlx::Error::Database(db) => {
            let code: Cow<'_, str> = db.code().unwrap_or_default();
            let temporary = if db
                .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .is_some()
            {
                pg_temporary(&code)
            } else {
                db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some()
                    && sqlite_temporary(&code)
            };
            drop(code);
            match db.kind() {
                ErrorKind::UniqueViolation => StoreError::Conflict("already exists".into()),
                ErrorKind::ForeignKeyViolation => StoreError::NotFound,
                // The database's text names columns and SQL, and an input the call did not
                // check first is a bug: `Other`, so callers log it and answer a plain 500.
                ErrorKind::CheckViolation | ErrorKind::NotNullViolation => {
                    StoreError::Other(Box::new(sqlx::Error::Database(db)))
                }
                _ if temporary => StoreError::Unavailable(db.message().to_owned()),
                _ => StoreError::Other(Box::new(sqlx::Error::Database(db))),
            }
        }
        other => StoreError::Other(Box::new(other)),
    }
}

pub(crate) fn migrate_err(e: sqlx::migrate::MigrateError) -> StoreError {
    match e {
        sqlx::migrate::MigrateError::Execute(e) => db_err(e),
        other => StoreError::Other(Box::new(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_codes() {
        for code in [
            "08006", "08001", "53300", "57P01", "40001", "40P01", "57014",
        ] {
            assert!(pg_temporary(code), "{code}");
        }
        for code in ["23505", "42601", "22P02"] {
            assert!(!pg_temporary(code), "{code}");
        }
        // SQLITE_BUSY, SQLITE_BUSY_SNAPSHOT (517), SQLITE_IOERR_FSYNC (1034), SQLITE_CANTOPEN.
        for code in ["5", "517", "1034", "14"] {
            assert!(sqlite_temporary(code), "{code}");
        }
        // SQLITE_CONSTRAINT_UNIQUE (2067), SQLITE_ERROR.
        for code in ["2067", "1", "x"] {
            assert!(!sqlite_temporary(code), "{code}");
        }
    }

    #[test]
    fn io_errors_are_unavailable() {
        let e = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(matches!(db_err(e), StoreError::Unavailable(_)));
        assert!(matches!(
            db_err(sqlx::Error::PoolTimedOut),
            StoreError::Unavailable(_)
        ));
    }
}
