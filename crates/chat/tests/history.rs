//! The chat stream read used for recovery honours its limit exactly, beyond the store's
//! per-read cap: a recovery that asks for `max + 1` events must see them all to know that
//! more than `max` are missing.

use std::sync::Arc;

use switchboard_chat::{Chat, ChatConfig};
use switchboard_hub::{Broker, HistoryFilter, MemoryBroker};
use switchboard_protocol::client::StreamPosition;
use switchboard_store::testing::TestDatabase;
use switchboard_store::{NewMessage, NewRoom, NewUser, RoomKind, UserRole};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[tokio::test]
async fn limits_are_exact_across_store_pages() {
    let db = TestDatabase::sqlite();
    let store = db.open().await;
    let user = store
        .create_user(NewUser {
            username: "w".into(),
            password_hash: String::new(),
            display_name: "w".into(),
            role: UserRole::User,
        })
        .await
        .unwrap();
    let room = store
        .create_room(NewRoom {
            kind: RoomKind::Public,
            name: "big".into(),
            created_by: user.id,
        })
        .await
        .unwrap();
    const N: usize = 10_050;
    for chunk in (0..N).collect::<Vec<_>>().chunks(1000) {
        let batch = chunk
            .iter()
            .map(|i| NewMessage {
                room_id: room.id,
                user_id: user.id,
                client_msg_id: Some(format!("m{i}")),
                text: format!("t{i}"),
                reply_to: None,
            })
            .collect();
        assert!(store.append_messages(batch).await.iter().all(|r| r.is_ok()));
    }
    let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::default());
    let tracker = TaskTracker::new();
    let chat = Chat::start(
        store,
        broker,
        ChatConfig::default(),
        &tracker,
        CancellationToken::new(),
    );

    let since = |offset| {
        Some(StreamPosition {
            offset,
            epoch: room.epoch.clone(),
        })
    };
    let page = |f: HistoryFilter| {
        let chat = chat.clone();
        async move { chat.history(room.id, &f).await.unwrap() }
    };
    let p = page(HistoryFilter {
        since: since(0),
        limit: Some(10_001),
        reverse: false,
    })
    .await;
    assert_eq!(
        p.publications.len(),
        10_001,
        "exactly the limit, across two store reads"
    );
    assert_eq!(p.publications.last().unwrap().offset, 10_001);
    assert_eq!(p.position.offset, N as u64);
    let all = page(HistoryFilter {
        since: since(0),
        limit: None,
        reverse: false,
    })
    .await;
    let offsets: Vec<u64> = all.publications.iter().map(|p| p.offset).collect();
    assert_eq!(offsets, (1..=N as u64).collect::<Vec<_>>());
    let back = page(HistoryFilter {
        since: None,
        limit: Some(10_020),
        reverse: true,
    })
    .await;
    assert_eq!(back.publications.len(), 10_020);
    assert_eq!(back.publications[0].offset, N as u64, "newest first");
    assert_eq!(
        back.publications.last().unwrap().offset,
        (N - 10_020 + 1) as u64
    );
    let wrong = HistoryFilter {
        since: Some(StreamPosition {
            offset: 1,
            epoch: "x".into(),
        }),
        limit: None,
        reverse: false,
    };
    assert!(chat.history(room.id, &wrong).await.is_err());
}

/// Regression: a client's offset past `i64::MAX` (any `u64` is valid on the wire) was cast
/// to a negative store offset, so "after 2^64 - 1" read the whole stream from the start.
#[tokio::test]
async fn offsets_past_i64_max_are_beyond_every_event() {
    let db = TestDatabase::sqlite();
    let store = db.open().await;
    let user = store
        .create_user(NewUser {
            username: "m".into(),
            password_hash: String::new(),
            display_name: "m".into(),
            role: UserRole::User,
        })
        .await
        .unwrap();
    let room = store
        .create_room(NewRoom {
            kind: RoomKind::Public,
            name: "r".into(),
            created_by: user.id,
        })
        .await
        .unwrap();
    let batch = (0..3)
        .map(|i| NewMessage {
            room_id: room.id,
            user_id: user.id,
            client_msg_id: None,
            text: format!("t{i}"),
            reply_to: None,
        })
        .collect();
    assert!(store.append_messages(batch).await.iter().all(|r| r.is_ok()));
    let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::default());
    let tracker = TaskTracker::new();
    let chat = Chat::start(
        store,
        broker,
        ChatConfig::default(),
        &tracker,
        CancellationToken::new(),
    );
    for offset in [u64::MAX, i64::MAX as u64 + 1] {
        let since = Some(StreamPosition {
            offset,
            epoch: room.epoch.clone(),
        });
        let after = HistoryFilter {
            since: since.clone(),
            limit: None,
            reverse: false,
        };
        let p = chat.history(room.id, &after).await.unwrap();
        assert!(p.publications.is_empty(), "nothing is after {offset}");
        assert_eq!(p.position.offset, 3);
        let before = HistoryFilter {
            since,
            limit: None,
            reverse: true,
        };
        let p = chat.history(room.id, &before).await.unwrap();
        let offsets: Vec<u64> = p.publications.iter().map(|p| p.offset).collect();
        assert_eq!(offsets, vec![3, 2, 1], "everything is before {offset}");
    }
}
