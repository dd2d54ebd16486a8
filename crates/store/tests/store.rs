//! The store suite, run on both backends: every function in `suite` runs once on a fresh
//! SQLite file and once in a fresh PostgreSQL schema (see `switchboard_store::testing`).
//!
//! `cargo test -p switchboard-store -- --nocapture throughput` prints append throughput.

mod suite;

use std::time::{Duration, Instant};

use switchboard_store::testing::TestDatabase;
use switchboard_store::StoreError;

/// Expands each name into `sqlite::name` and `postgres::name` tests. `store:` functions
/// take an open `Arc<dyn Store>`; `db:` functions take the `TestDatabase` (to reopen it).
macro_rules! on_both {
    (store: [$($s:ident),* $(,)?], db: [$($d:ident),* $(,)?] $(,)?) => {
        mod sqlite {
            use switchboard_store::testing::TestDatabase;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $s() {
                    let db = TestDatabase::sqlite();
                    let store = db.open().await;
                    crate::suite::$s(store.clone()).await;
                    store.close().await;
                }
            )*
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $d() {
                    crate::suite::$d(&TestDatabase::sqlite()).await;
                }
            )*
        }
        mod postgres {
            use switchboard_store::testing::TestDatabase;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $s() {
                    let Some(db) = TestDatabase::postgres().await else { return };
                    let store = db.open().await;
                    crate::suite::$s(store.clone()).await;
                    store.close().await;
                }
            )*
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $d() {
                    let Some(db) = TestDatabase::postgres().await else { return };
                    crate::suite::$d(&db).await;
                }
            )*
        }
    };
}

on_both! {
    store: [
        accounts,
        refresh_tokens,
        rooms_and_membership,
        offsets_gap_free_under_concurrency,
        dedupe_on_retry,
        batch_with_duplicates_and_failures,
        sends_check_membership_mutes_and_bans,
        events_and_paging,
        edits_deletes_and_moderation,
        flags_and_bans,
        unread_counts,
        message_pages,
        sql_and_html_round_trip_byte_exact,
        audit_log_order,
        notifications_and_last_seen,
        sites,
        documents_and_roles,
        document_members,
        document_update_log,
        document_appends_under_concurrency,
        document_compaction,
        document_load_during_compaction,
        document_delete_cascades,
        document_versions,
        document_bytes_round_trip,
        closed_store_is_unavailable,
        throughput,
    ],
    db: [migrations_are_idempotent],
}

/// Nothing listens on a port we just closed: opening must fail fast with `Unavailable`.
#[tokio::test]
async fn unreachable_postgres_is_unavailable_promptly() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("postgres://postgres@127.0.0.1:{port}/test");
    let started = Instant::now();
    let err = match switchboard_store::open(&url).await {
        Ok(_) => panic!("opened a database on a closed port"),
        Err(e) => e,
    };
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(matches!(
        switchboard_store::migrate(&url).await,
        Err(StoreError::Unavailable(_))
    ));
}

/// A server that accepts TCP but never answers would hang a naive connect: the connect
/// timeout bounds it.
#[tokio::test]
async fn connect_timeout_bounds_open() {
    let options = switchboard_store::StoreOptions {
        connect_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    let started = Instant::now();
    let url = format!("postgres://postgres@127.0.0.1:{port}/test");
    let err = switchboard_store::open_with(&url, &options).await.err();
    assert!(matches!(err, Some(StoreError::Unavailable(_))), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    hold.abort();
}

#[tokio::test]
async fn unusable_sqlite_path_is_unavailable() {
    let db = TestDatabase::sqlite();
    // A regular file where a directory should be.
    let file = std::env::temp_dir().join(format!("sb_not_a_dir_{}", std::process::id()));
    std::fs::write(&file, b"x").unwrap();
    let url = format!("sqlite://{}/store.db", file.display());
    let err = switchboard_store::open(&url).await.err();
    std::fs::remove_file(&file).unwrap();
    assert!(matches!(err, Some(StoreError::Unavailable(_))), "{err:?}");
    drop(db);
}

/// `sqlite::memory:` lives inside one connection: reads and writes must share it.
#[tokio::test]
async fn in_memory_sqlite_works() {
    use switchboard_store::*;
    let store = open("sqlite::memory:").await.unwrap();
    let u = store
        .create_user(NewUser {
            username: "mem".into(),
            password_hash: String::new(),
            display_name: "Mem".into(),
            role: UserRole::User,
        })
        .await
        .unwrap();
    let r = store
        .create_room(NewRoom {
            kind: RoomKind::Public,
            name: "r".into(),
            created_by: u.id,
        })
        .await
        .unwrap();
    let out = store
        .append_messages(vec![NewMessage {
            room_id: r.id,
            user_id: u.id,
            client_msg_id: Some("m1".into()),
            text: "hello".into(),
            reply_to: None,
        }])
        .await;
    assert_eq!(out[0].as_ref().unwrap().message.offset, 1);
    assert_eq!(store.events(r.id, 0, 10).await.unwrap().len(), 1);
}

#[tokio::test]
async fn unknown_scheme_is_invalid() {
    let err = switchboard_store::open("mysql://localhost/db").await.err();
    assert!(matches!(err, Some(StoreError::Invalid(_))), "{err:?}");
}
