//! Throw-away databases for tests, so one suite runs against both backends.
//!
//! [`TestDatabase::sqlite`] makes a fresh file in a temporary directory. [`TestDatabase::postgres`]
//! makes a uniquely named schema (`sb_test_<random>`) in the test database and points the
//! URL's `search_path` at it, so concurrent tests never see each other's tables. Both are
//! removed on drop, also when the test panics.
//!
//! PostgreSQL is at `postgres://postgres@127.0.0.1:5432/test` unless
//! `SWITCHBOARD_TEST_POSTGRES_URL` says otherwise. If it is unreachable, `postgres()` panics
//! when `CI` is set (CI must cover both backends) and otherwise prints a loud SKIP and
//! returns `None`.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};

use crate::{Backend, Store, StoreOptions};

/// The PostgreSQL the tests use by default.
pub const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A database that exists for one test.
pub struct TestDatabase {
    url: String,
    backend: Backend,
    cleanup: Cleanup,
}

enum Cleanup {
    Dir(PathBuf),
    Schema { base_url: String, schema: String },
}

fn unique_suffix() -> String {
    format!(
        "{}_{:012x}",
        std::process::id(),
        rand::random::<u64>() >> 16
    )
}

impl TestDatabase {
    /// A SQLite database file in a new temporary directory.
    pub fn sqlite() -> TestDatabase {
        let dir = std::env::temp_dir().join(format!("sb_store_test_{}", unique_suffix()));
        std::fs::create_dir_all(&dir).expect("create a temporary directory");
        TestDatabase {
            url: format!("sqlite://{}/switchboard.db", dir.display()),
            backend: Backend::Sqlite,
            cleanup: Cleanup::Dir(dir),
        }
    }

    /// A fresh schema in the test PostgreSQL, or `None` (after a loud SKIP) if it is
    /// unreachable outside CI.
    pub async fn postgres() -> Option<TestDatabase> {
        let base_url = std::env::var("SWITCHBOARD_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| DEFAULT_POSTGRES_URL.to_owned());
        let opts = PgConnectOptions::from_str(&base_url).expect("a valid PostgreSQL URL");
        let conn = tokio::time::timeout(Duration::from_secs(3), opts.connect()).await;
        let mut conn = match conn {
            Ok(Ok(conn)) => conn,
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".to_owned(),
                };
                if std::env::var_os("CI").is_some() {
                    panic!(
                        "PostgreSQL at {base_url} is unreachable ({why}); with CI set the \
                         store suite must run on both backends"
                    );
                }
                eprintln!(
                    "\n*** SKIP: PostgreSQL at {base_url} is unreachable ({why}); running \
                     SQLite only. Set CI=1 to make this an error. ***\n"
                );
                return None;
            }
        };
        let schema = format!("sb_test_{}", unique_suffix());
        // The name is ours (digits, letters, underscores): safe to splice.
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&mut conn)
            .await
            .expect("create the test schema");
        let _ = conn.close().await;
        let sep = if base_url.contains('?') { '&' } else { '?' };
        Some(TestDatabase {
            url: format!("{base_url}{sep}options%5Bsearch_path%5D={schema}"),
            backend: Backend::Postgres,
            cleanup: Cleanup::Schema { base_url, schema },
        })
    }

    /// The URL to give [`crate::open`] (or a server's `--database`).
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Opens the database with small pools, panicking on failure.
    pub async fn open(&self) -> Arc<dyn Store> {
        let options = StoreOptions {
            max_connections: 4,
            ..StoreOptions::default()
        };
        crate::open_with(&self.url, &options)
            .await
            .unwrap_or_else(|e| panic!("open {}: {e}", self.url))
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        match &self.cleanup {
            Cleanup::Dir(dir) => {
                let _ = std::fs::remove_dir_all(dir);
            }
            Cleanup::Schema { base_url, schema } => {
                // Drop may run inside a runtime (and during a panic): do the async work on
                // a thread of its own with a runtime of its own.
                let (base_url, schema) = (base_url.clone(), schema.clone());
                let done = std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .ok()?;
                    rt.block_on(async {
                        let opts = PgConnectOptions::from_str(&base_url).ok()?;
                        let mut conn = opts.connect().await.ok()?;
                        sqlx::query(sqlx::AssertSqlSafe(format!(
                            "DROP SCHEMA IF EXISTS {schema} CASCADE"
                        )))
                        .execute(&mut conn)
                        .await
                        .ok()?;
                        conn.close().await.ok()
                    })
                })
                .join();
                if !matches!(done, Ok(Some(()))) {
                    eprintln!("warning: could not drop test schema (drop it by hand)");
                }
            }
        }
    }
}
