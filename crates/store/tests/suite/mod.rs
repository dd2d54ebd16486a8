//! The store suite, written once against `Arc<dyn Store>` and run on both backends by
//! `on_both!` in `store.rs`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use switchboard_store::testing::TestDatabase;
use switchboard_store::*;

// ----- helpers -----

async fn user(store: &Arc<dyn Store>, name: &str) -> User {
    store
        .create_user(NewUser {
            username: name.to_owned(),
            password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".to_owned(),
            display_name: format!("{name} display"),
            role: UserRole::User,
        })
        .await
        .unwrap()
}

async fn room(store: &Arc<dyn Store>, owner: i64, kind: RoomKind) -> Room {
    store
        .create_room(NewRoom {
            kind,
            name: "general".to_owned(),
            created_by: owner,
        })
        .await
        .unwrap()
}

fn msg(room_id: i64, user_id: i64, cmid: &str, text: &str) -> NewMessage {
    NewMessage {
        room_id,
        user_id,
        client_msg_id: Some(cmid.to_owned()),
        text: text.to_owned(),
        reply_to: None,
    }
}

async fn send(store: &Arc<dyn Store>, m: NewMessage) -> AppendedMessage {
    let mut out = store.append_messages(vec![m]).await;
    assert_eq!(out.len(), 1);
    out.pop().unwrap().unwrap()
}

fn event(room_id: i64, message_id: i64, user_id: i64, kind: EventKind) -> NewEvent {
    NewEvent {
        room_id,
        message_id,
        user_id,
        kind,
        text: None,
        data: serde_json::Value::Null,
    }
}

async fn offsets(store: &Arc<dyn Store>, room_id: i64) -> Vec<i64> {
    let events = store.events(room_id, 0, MAX_PAGE).await.unwrap();
    events.iter().map(|e| e.offset).collect()
}

// ----- the suite -----

pub async fn migrations_are_idempotent(db: &TestDatabase) {
    let first = db.open().await;
    let alice = user(&first, "alice").await;
    first.close().await;
    // Open again (migrations run again and find nothing to do), then migrate explicitly.
    let second = db.open().await;
    assert_eq!(
        second.user_by_id(alice.id).await.unwrap().unwrap().username,
        "alice"
    );
    assert_eq!(
        switchboard_store::migrate(db.url()).await.unwrap(),
        db.backend()
    );
    assert_eq!(second.backend(), db.backend());
    second.close().await;
}

pub async fn accounts(store: Arc<dyn Store>) {
    store.ping().await.unwrap();
    let alice = user(&store, "alice").await;
    assert_eq!(alice.role, UserRole::User);
    let err = store
        .create_user(NewUser {
            username: "alice".into(),
            password_hash: "x".into(),
            display_name: "other".into(),
            role: UserRole::Admin,
        })
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");

    assert_eq!(store.user_by_id(alice.id).await.unwrap().unwrap(), alice);
    assert_eq!(
        store.user_by_username("alice").await.unwrap().unwrap(),
        alice
    );
    assert_eq!(store.user_by_username("Alice").await.unwrap(), None);
    assert_eq!(store.user_by_id(alice.id + 1000).await.unwrap(), None);

    let updated = store
        .update_user(
            alice.id,
            UserUpdate {
                display_name: Some("Alice A.".into()),
                role: Some(UserRole::Admin),
                ..UserUpdate::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(updated.display_name, "Alice A.");
    assert_eq!(updated.role, UserRole::Admin);
    assert_eq!(updated.password_hash, alice.password_hash);
    let err = store
        .update_user(alice.id + 1000, UserUpdate::default())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound), "{err:?}");
    // The hash never leaves through serde.
    assert!(!serde_json::to_string(&updated).unwrap().contains("argon2"));
}

pub async fn refresh_tokens(store: Arc<dyn Store>) {
    let alice = user(&store, "alice").await;
    let now = now_ms();
    let token = RefreshToken {
        token_hash: "h1".into(),
        user_id: alice.id,
        expires_at: now + 60_000,
        revoked: false,
    };
    store.store_refresh_token(token.clone()).await.unwrap();
    let err = store.store_refresh_token(token.clone()).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert_eq!(
        store.find_refresh_token("h1").await.unwrap().unwrap(),
        token
    );
    assert_eq!(store.find_refresh_token("nope").await.unwrap(), None);

    assert!(store.revoke_refresh_token("h1").await.unwrap());
    assert!(!store.revoke_refresh_token("h1").await.unwrap());
    assert!(!store.revoke_refresh_token("nope").await.unwrap());
    assert!(
        store
            .find_refresh_token("h1")
            .await
            .unwrap()
            .unwrap()
            .revoked
    );

    for (hash, expires_at) in [("h2", now + 60_000), ("h3", now - 1)] {
        store
            .store_refresh_token(RefreshToken {
                token_hash: hash.into(),
                user_id: alice.id,
                expires_at,
                revoked: false,
            })
            .await
            .unwrap();
    }
    assert_eq!(store.revoke_user_refresh_tokens(alice.id).await.unwrap(), 2);
    assert!(
        store
            .find_refresh_token("h2")
            .await
            .unwrap()
            .unwrap()
            .revoked
    );
    assert_eq!(store.purge_expired_refresh_tokens(now).await.unwrap(), 1);
    assert_eq!(store.find_refresh_token("h3").await.unwrap(), None);
}

pub async fn rooms_and_membership(store: Arc<dyn Store>) {
    let alice = user(&store, "alice").await;
    let bob = user(&store, "bob").await;
    let carol = user(&store, "carol").await;
    let general = room(&store, alice.id, RoomKind::Public).await;
    assert_eq!(general.last_offset, 0);
    assert!(!general.epoch.is_empty());
    assert_eq!(store.room(general.id).await.unwrap().unwrap(), general);
    assert_eq!(store.room(general.id + 1000).await.unwrap(), None);

    let owner = store.member(general.id, alice.id).await.unwrap().unwrap();
    assert_eq!(owner.role, MemberRole::Owner);

    let err = store
        .create_room(NewRoom {
            kind: RoomKind::Public,
            name: "x".into(),
            created_by: 999_999,
        })
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound), "{err:?}");

    let m = store
        .add_member(general.id, bob.id, MemberRole::Member)
        .await
        .unwrap();
    assert_eq!(
        (m.role, m.muted_until, m.last_read_offset),
        (MemberRole::Member, None, 0)
    );
    let err = store
        .add_member(general.id, bob.id, MemberRole::Member)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    let err = store
        .add_member(general.id + 1000, bob.id, MemberRole::Member)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound), "{err:?}");
    let err = store
        .add_member(general.id, 999_999, MemberRole::Member)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound), "{err:?}");

    let m = store
        .set_member_role(general.id, bob.id, MemberRole::Moderator)
        .await
        .unwrap();
    assert_eq!(m.role, MemberRole::Moderator);
    let until = now_ms() + 60_000;
    let m = store
        .set_member_muted(general.id, bob.id, Some(until))
        .await
        .unwrap();
    assert_eq!(m.muted_until, Some(until));
    assert_eq!(
        store
            .member(general.id, bob.id)
            .await
            .unwrap()
            .unwrap()
            .muted_until,
        Some(until)
    );
    let m = store
        .set_member_muted(general.id, bob.id, None)
        .await
        .unwrap();
    assert_eq!(m.muted_until, None);
    let err = store
        .set_member_role(general.id, carol.id, MemberRole::Owner)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound), "{err:?}");

    let members = store.members(general.id).await.unwrap();
    let ids: Vec<i64> = members.iter().map(|m| m.user_id).collect();
    assert_eq!(ids, vec![alice.id, bob.id]);

    store.remove_member(general.id, bob.id).await.unwrap();
    let err = store.remove_member(general.id, bob.id).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound), "{err:?}");
    assert_eq!(store.member(general.id, bob.id).await.unwrap(), None);

    // Direct rooms are found by their two members, in either order.
    let dm = room(&store, alice.id, RoomKind::Direct).await;
    store
        .add_member(dm.id, carol.id, MemberRole::Member)
        .await
        .unwrap();
    assert_eq!(
        store.direct_room(carol.id, alice.id).await.unwrap(),
        Some(dm.clone())
    );
    assert_eq!(store.direct_room(alice.id, bob.id).await.unwrap(), None);

    let secret = room(&store, alice.id, RoomKind::Private).await;
    let public = store.public_rooms(0, 10).await.unwrap();
    assert_eq!(public, vec![general.clone()]);
    assert!(store.public_rooms(general.id, 10).await.unwrap().is_empty());

    // Deleting a room takes its members and messages along.
    let sent = send(&store, msg(secret.id, alice.id, "s1", "hush")).await;
    store.delete_room(secret.id).await.unwrap();
    assert_eq!(store.room(secret.id).await.unwrap(), None);
    assert_eq!(store.message(sent.message.id).await.unwrap(), None);
    assert_eq!(store.member(secret.id, alice.id).await.unwrap(), None);
    assert!(store.events(secret.id, 0, 10).await.unwrap().is_empty());
    assert!(matches!(
        store.delete_room(secret.id).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.room_position(secret.id).await,
        Err(StoreError::NotFound)
    ));
}

/// 20 senders × 50 messages into one room, concurrently, in small batches: the offsets are
/// exactly 1..=1000 and each sender's messages are in its sending order.
pub async fn offsets_gap_free_under_concurrency(store: Arc<dyn Store>) {
    const SENDERS: usize = 20;
    const EACH: usize = 50;
    let owner = user(&store, "owner").await;
    let r = room(&store, owner.id, RoomKind::Public).await;
    let mut senders = Vec::new();
    for i in 0..SENDERS {
        let u = user(&store, &format!("sender{i}")).await;
        store
            .add_member(r.id, u.id, MemberRole::Member)
            .await
            .unwrap();
        senders.push(u.id);
    }
    let mut tasks = Vec::new();
    for (i, &uid) in senders.iter().enumerate() {
        let store = store.clone();
        let room_id = r.id;
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            let mut k = 0;
            // Batches of 1..=4 messages, varying per sender, to mix batch shapes.
            while k < EACH {
                let n = (1 + (i + k) % 4).min(EACH - k);
                let batch: Vec<NewMessage> = (k..k + n)
                    .map(|j| msg(room_id, uid, &format!("{i}-{j}"), &format!("m {i} {j}")))
                    .collect();
                for res in store.append_messages(batch).await {
                    let a = res.unwrap();
                    assert!(!a.duplicate);
                    got.push(a.message);
                }
                k += n;
            }
            got
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        let got = t.await.unwrap();
        assert_eq!(got.len(), EACH);
        // Per-sender order: offsets increase in the order the messages were sent.
        for (j, pair) in got.windows(2).enumerate() {
            assert!(
                pair[0].offset < pair[1].offset,
                "sender order broken at {j}"
            );
            assert_eq!(
                pair[1].text,
                format!("m {} {}", pair[1].text.split(' ').nth(1).unwrap(), j + 1)
            );
        }
        all.extend(got);
    }
    let total = (SENDERS * EACH) as i64;
    let mut seen: Vec<i64> = all.iter().map(|m| m.offset).collect();
    seen.sort_unstable();
    assert_eq!(seen, (1..=total).collect::<Vec<_>>());
    assert_eq!(offsets(&store, r.id).await, (1..=total).collect::<Vec<_>>());
    assert_eq!(store.room_position(r.id).await.unwrap().offset, total);
    assert_eq!(store.room_position(r.id).await.unwrap().epoch, r.epoch);
    // The stream agrees with what each append returned.
    let by_offset: HashMap<i64, i64> = all.iter().map(|m| (m.offset, m.id)).collect();
    for e in store.events(r.id, 0, MAX_PAGE).await.unwrap() {
        assert_eq!(e.kind, EventKind::Message);
        assert_eq!(by_offset[&e.offset], e.message_id);
    }
}

pub async fn dedupe_on_retry(store: Arc<dyn Store>) {
    let alice = user(&store, "alice").await;
    let r = room(&store, alice.id, RoomKind::Public).await;
    let first = send(&store, msg(r.id, alice.id, "c-1", "hello")).await;
    assert!(!first.duplicate);
    assert_eq!(first.message.offset, 1);

    // A retry, even with different text, returns the original and takes no offset.
    let retry = send(&store, msg(r.id, alice.id, "c-1", "hello again")).await;
    assert!(retry.duplicate);
    assert_eq!(retry.message, first.message);
    assert_eq!(store.room_position(r.id).await.unwrap().offset, 1);

    // The key is per user: another user may use the same client id.
    let bob = user(&store, "bob").await;
    store
        .add_member(r.id, bob.id, MemberRole::Member)
        .await
        .unwrap();
    let bobs = send(&store, msg(r.id, bob.id, "c-1", "hi")).await;
    assert!(!bobs.duplicate);
    assert_eq!(bobs.message.offset, 2);

    // Messages without a client id are never deduplicated.
    for expect in [3, 4] {
        let mut m = msg(r.id, alice.id, "", "no id");
        m.client_msg_id = None;
        let a = send(&store, m).await;
        assert!(!a.duplicate);
        assert_eq!(a.message.offset, expect);
    }
    assert_eq!(offsets(&store, r.id).await, vec![1, 2, 3, 4]);
    let page = store
        .messages(
            r.id,
            MessagePage {
                limit: 100,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(page.len(), 4);
}

pub async fn batch_with_duplicates_and_failures(store: Arc<dyn Store>) {
    let alice = user(&store, "alice").await;
    let r = room(&store, alice.id, RoomKind::Public).await;
    let other = room(&store, alice.id, RoomKind::Public).await;
    let old = send(&store, msg(r.id, alice.id, "old", "already stored")).await;
    let elsewhere = send(&store, msg(other.id, alice.id, "x", "in the other room")).await;

    let mut bad_reply = msg(r.id, alice.id, "b5", "bad reply");
    bad_reply.reply_to = Some(elsewhere.message.id);
    let mut good_reply = msg(r.id, alice.id, "b6", "good reply");
    good_reply.reply_to = Some(old.message.id);
    let batch = vec![
        msg(r.id, alice.id, "b1", "one"),            // 0: new, offset 2
        msg(r.id, alice.id, "old", "retry of old"),  // 1: duplicate of a stored message
        msg(r.id, alice.id, "b1", "one again"),      // 2: duplicate inside the batch
        msg(r.id + 1000, alice.id, "b3", "no room"), // 3: NotFound
        msg(r.id, 999_999, "b4", "no user"),         // 4: Invalid
        bad_reply,                                   // 5: Invalid
        good_reply,                                  // 6: new, offset 3
        msg(other.id, alice.id, "b7", "other room"), // 7: new, offset 2 of other
        msg(r.id, alice.id, "b8", "nul\0inside"),    // 8: Invalid
        msg(r.id, alice.id, "b9", "last"),           // 9: new, offset 4
    ];
    let out = store.append_messages(batch).await;
    assert_eq!(out.len(), 10);
    let ok = |i: usize| out[i].as_ref().unwrap();
    assert_eq!((ok(0).message.offset, ok(0).duplicate), (2, false));
    assert_eq!(ok(1).message, old.message);
    assert!(ok(1).duplicate);
    assert!(ok(2).duplicate);
    assert_eq!(ok(2).message, ok(0).message);
    assert_eq!(ok(2).message.text, "one");
    assert!(matches!(out[3], Err(StoreError::NotFound)), "{:?}", out[3]);
    assert!(
        matches!(out[4], Err(StoreError::Invalid(_))),
        "{:?}",
        out[4]
    );
    assert!(
        matches!(out[5], Err(StoreError::Invalid(_))),
        "{:?}",
        out[5]
    );
    assert_eq!(ok(6).message.offset, 3);
    assert_eq!(ok(6).message.reply_to, Some(old.message.id));
    assert_eq!((ok(7).message.room_id, ok(7).message.offset), (other.id, 2));
    assert!(
        matches!(out[8], Err(StoreError::Invalid(_))),
        "{:?}",
        out[8]
    );
    assert_eq!(ok(9).message.offset, 4);

    assert_eq!(offsets(&store, r.id).await, vec![1, 2, 3, 4]);
    assert_eq!(offsets(&store, other.id).await, vec![1, 2]);
    // What the batch returned is what is stored.
    for i in [0, 6, 7, 9] {
        assert_eq!(
            store.message(ok(i).message.id).await.unwrap().unwrap(),
            ok(i).message
        );
    }
    // A failed key can be used later.
    let later = send(&store, msg(r.id, alice.id, "b3", "now with a room")).await;
    assert!(!later.duplicate);
    assert_eq!(later.message.offset, 5);
    assert!(store.append_messages(Vec::new()).await.is_empty());
}

/// `append_sends` checks each sender's standing in the batch's own transaction: refused
/// messages take no offset and the rest of the batch commits; a change of membership,
/// mute or ban applies to the very next batch.
pub async fn sends_check_membership_mutes_and_bans(store: Arc<dyn Store>) {
    let alice = user(&store, "alice").await;
    let bob = user(&store, "bob").await;
    let carol = user(&store, "carol").await;
    let r = room(&store, alice.id, RoomKind::Private).await;
    store
        .add_member(r.id, bob.id, MemberRole::Member)
        .await
        .unwrap();
    let sends = |batch: Vec<NewMessage>| {
        let store = store.clone();
        async move { store.append_sends(batch).await }
    };
    assert!(sends(Vec::new()).await.is_empty());

    // One batch: member, stranger, missing room, an unknown user, member again.
    let out = sends(vec![
        msg(r.id, alice.id, "s1", "hi"),
        msg(r.id, carol.id, "s2", "let me in"),
        msg(r.id + 1000, alice.id, "s3", "nowhere"),
        msg(r.id, i64::MAX, "s4", "who?"),
        msg(r.id, bob.id, "s5", "hello"),
    ])
    .await;
    assert_eq!(out[0].as_ref().unwrap().message.offset, 1);
    assert!(matches!(out[1], Err(StoreError::Forbidden)), "{:?}", out[1]);
    assert!(matches!(out[2], Err(StoreError::NotFound)), "{:?}", out[2]);
    assert!(matches!(out[3], Err(StoreError::Forbidden)), "{:?}", out[3]);
    assert_eq!(out[4].as_ref().unwrap().message.offset, 2);
    assert_eq!(offsets(&store, r.id).await, vec![1, 2]);

    // Invited: the next batch accepts carol. Muted: bob is refused, even for a retry of a
    // stored message, and takes no offset; unmuted, he sends again.
    store
        .add_member(r.id, carol.id, MemberRole::Member)
        .await
        .unwrap();
    store
        .set_member_muted(r.id, bob.id, Some(now_ms() + 60_000))
        .await
        .unwrap();
    let out = sends(vec![
        msg(r.id, carol.id, "s2", "let me in"),
        msg(r.id, bob.id, "s6", "muted?"),
        msg(r.id, bob.id, "s5", "hello"),
    ])
    .await;
    assert_eq!(out[0].as_ref().unwrap().message.offset, 3);
    assert!(matches!(out[1], Err(StoreError::Muted)), "{:?}", out[1]);
    assert!(matches!(out[2], Err(StoreError::Muted)), "{:?}", out[2]);
    // A mute that has ended does not count.
    store
        .set_member_muted(r.id, bob.id, Some(now_ms() - 1))
        .await
        .unwrap();
    let out = sends(vec![msg(r.id, bob.id, "s6", "free")]).await;
    assert_eq!(out[0].as_ref().unwrap().message.offset, 4);

    // Banned (anywhere): refused; an expired ban does not count; lifted, sends again.
    let ban = |until| NewBan {
        until,
        reason: "spam".into(),
        created_by: None,
    };
    store.set_ban(carol.id, ban(None)).await.unwrap();
    let out = sends(vec![msg(r.id, carol.id, "s7", "banned?")]).await;
    assert!(matches!(out[0], Err(StoreError::Muted)), "{:?}", out[0]);
    store
        .set_ban(carol.id, ban(Some(now_ms() - 1)))
        .await
        .unwrap();
    let out = sends(vec![msg(r.id, carol.id, "s7", "expired")]).await;
    assert_eq!(out[0].as_ref().unwrap().message.offset, 5);
    store.set_ban(carol.id, ban(None)).await.unwrap();
    assert!(store.lift_ban(carol.id).await.unwrap());
    let out = sends(vec![msg(r.id, carol.id, "s8", "lifted")]).await;
    assert_eq!(out[0].as_ref().unwrap().message.offset, 6);

    // Kicked: refused at once; its dedupe key still returns nothing new.
    store.remove_member(r.id, bob.id).await.unwrap();
    let out = sends(vec![
        msg(r.id, bob.id, "s9", "still here?"),
        msg(r.id, alice.id, "s10", "bye bob"),
    ])
    .await;
    assert!(matches!(out[0], Err(StoreError::Forbidden)), "{:?}", out[0]);
    assert_eq!(out[1].as_ref().unwrap().message.offset, 7);

    // Dedupe works as in append_messages, within a batch and across batches.
    let out = sends(vec![
        msg(r.id, alice.id, "s11", "once"),
        msg(r.id, alice.id, "s11", "once"),
        msg(r.id, alice.id, "s1", "hi"),
    ])
    .await;
    let first = out[0].as_ref().unwrap();
    assert!(!first.duplicate);
    assert_eq!(first.message.offset, 8);
    assert!(out[1].as_ref().unwrap().duplicate);
    assert_eq!(out[1].as_ref().unwrap().message.id, first.message.id);
    assert!(out[2].as_ref().unwrap().duplicate);
    assert_eq!(out[2].as_ref().unwrap().message.offset, 1);

    // A deleted room: NotFound.
    store.delete_room(r.id).await.unwrap();
    let out = sends(vec![msg(r.id, alice.id, "s12", "gone")]).await;
    assert!(matches!(out[0], Err(StoreError::NotFound)), "{:?}", out[0]);
}

pub async fn events_and_paging(store: Arc<dyn Store>) {
    let alice = user(&store, "alice").await;
    let r = room(&store, alice.id, RoomKind::Public).await;
    let mut ids = Vec::new();
    for chunk in 0..5 {
        let batch: Vec<NewMessage> = (0..5)
            .map(|j| {
                let k = chunk * 5 + j;
                msg(r.id, alice.id, &format!("p{k}"), &format!("text {k}"))
            })
            .collect();
        for res in store.append_messages(batch).await {
            ids.push(res.unwrap().message.id);
        }
    }
    let mut edit = event(r.id, ids[0], alice.id, EventKind::Edit);
    edit.text = Some("text 0, edited".into());
    assert_eq!(store.append_event(edit).await.unwrap().offset, 26);
    assert_eq!(
        store
            .append_event(event(r.id, ids[1], alice.id, EventKind::Delete))
            .await
            .unwrap()
            .offset,
        27
    );

    let first = store.events(r.id, 0, 10).await.unwrap();
    assert_eq!(
        first.iter().map(|e| e.offset).collect::<Vec<_>>(),
        (1..=10).collect::<Vec<_>>()
    );
    let e1 = &first[0];
    assert_eq!(
        (e1.kind, e1.message_id, e1.user_id),
        (EventKind::Message, ids[0], alice.id)
    );
    assert_eq!(e1.data, json!({}));
    // The joined message is its current state.
    let m1 = e1.message.as_ref().unwrap();
    assert_eq!(
        (m1.text.as_str(), m1.edited_at.is_some()),
        ("text 0, edited", true)
    );
    assert!(first[1].message.as_ref().unwrap().deleted);

    let next = store.events(r.id, 10, 10).await.unwrap();
    assert_eq!(next.first().unwrap().offset, 11);
    assert_eq!(next.last().unwrap().offset, 20);
    let rest = store.events(r.id, 20, 100).await.unwrap();
    assert_eq!(
        rest.iter().map(|e| e.offset).collect::<Vec<_>>(),
        (21..=27).collect::<Vec<_>>()
    );
    assert_eq!(rest[5].kind, EventKind::Edit);
    assert_eq!(rest[5].data, json!({"text": "text 0, edited"}));
    assert_eq!(rest[6].kind, EventKind::Delete);
    assert!(store.events(r.id, 27, 10).await.unwrap().is_empty());
    assert!(store.events(r.id, 0, 0).await.unwrap().is_empty());

    let before = store.events_before(r.id, 27, 5).await.unwrap();
    assert_eq!(
        before.iter().map(|e| e.offset).collect::<Vec<_>>(),
        vec![22, 23, 24, 25, 26]
    );
    let head = store.events_before(r.id, 3, 5).await.unwrap();
    assert_eq!(
        head.iter().map(|e| e.offset).collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert!(store.events_before(r.id, 1, 5).await.unwrap().is_empty());
    // Paging backwards from the top visits every offset once.
    let mut cursor = i64::MAX;
    let mut seen = Vec::new();
    loop {
        let page = store.events_before(r.id, cursor, 4).await.unwrap();
        let Some(first) = page.first() else { break };
        cursor = first.offset;
        seen.splice(0..0, page.iter().map(|e| e.offset));
    }
    assert_eq!(seen, (1..=27).collect::<Vec<_>>());

    let pos = store.room_position(r.id).await.unwrap();
    assert_eq!(
        pos,
        StreamPosition {
            offset: 27,
            epoch: r.epoch.clone()
        }
    );
    assert!(store.events(r.id + 1000, 0, 10).await.unwrap().is_empty());
}

pub async fn edits_deletes_and_moderation(store: Arc<dyn Store>) {
    let alice = user(&store, "alice").await;
    let moderator = user(&store, "mod").await;
    let r = room(&store, alice.id, RoomKind::Public).await;
    let other = room(&store, alice.id, RoomKind::Public).await;
    let m = send(&store, msg(r.id, alice.id, "e1", "original"))
        .await
        .message;

    let mut removed = event(r.id, m.id, moderator.id, EventKind::Removed);
    removed.data = json!({"reason": "profanity"});
    let ev = store.append_event(removed.clone()).await.unwrap();
    assert_eq!(
        (ev.offset, ev.kind, ev.user_id),
        (2, EventKind::Removed, moderator.id)
    );
    assert_eq!(ev.data, json!({"reason": "profanity"}));
    assert!(ev.message.as_ref().unwrap().removed);
    assert!(store.message(m.id).await.unwrap().unwrap().removed);

    // State conflicts take no offset.
    let err = store.append_event(removed.clone()).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    let mut edit = event(r.id, m.id, alice.id, EventKind::Edit);
    edit.text = Some("sneaky".into());
    let err = store.append_event(edit.clone()).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert_eq!(store.room_position(r.id).await.unwrap().offset, 2);

    let restored = store
        .append_event(event(r.id, m.id, moderator.id, EventKind::Restored))
        .await
        .unwrap();
    assert_eq!(restored.offset, 3);
    assert!(!restored.message.unwrap().removed);
    let err = store
        .append_event(event(r.id, m.id, moderator.id, EventKind::Restored))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");

    let edited = store.append_event(edit).await.unwrap();
    assert_eq!(edited.offset, 4);
    let now = edited.message.unwrap();
    assert_eq!(now.text, "sneaky");
    assert!(now.edited_at.is_some());

    store
        .append_event(event(r.id, m.id, alice.id, EventKind::Delete))
        .await
        .unwrap();
    let err = store
        .append_event(event(r.id, m.id, alice.id, EventKind::Delete))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");

    // Wrong room, unknown message, unknown room, bad kinds.
    let err = store
        .append_event(event(other.id, m.id, alice.id, EventKind::Removed))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound), "{err:?}");
    let err = store
        .append_event(event(r.id, m.id + 1000, alice.id, EventKind::Removed))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound), "{err:?}");
    let err = store
        .append_event(event(r.id + 1000, m.id, alice.id, EventKind::Removed))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound), "{err:?}");
    let err = store
        .append_event(event(r.id, m.id, alice.id, EventKind::Message))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
    let err = store
        .append_event(event(r.id, m.id, alice.id, EventKind::Edit))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");

    assert_eq!(offsets(&store, r.id).await, vec![1, 2, 3, 4, 5]);
    assert_eq!(offsets(&store, other.id).await, Vec::<i64>::new());
    let kinds: Vec<EventKind> = store
        .events(r.id, 0, 10)
        .await
        .unwrap()
        .iter()
        .map(|e| e.kind)
        .collect();
    use EventKind::*;
    assert_eq!(kinds, vec![Message, Removed, Restored, Edit, Delete]);
}

pub async fn flags_and_bans(store: Arc<dyn Store>) {
    let alice = user(&store, "alice").await;
    let moderator = user(&store, "mod").await;
    let r = room(&store, alice.id, RoomKind::Public).await;
    let other = room(&store, alice.id, RoomKind::Public).await;
    let m1 = send(&store, msg(r.id, alice.id, "f1", "spam spam"))
        .await
        .message;
    let m2 = send(&store, msg(r.id, alice.id, "f2", "spam spam"))
        .await
        .message;
    let m3 = send(&store, msg(other.id, alice.id, "f3", "elsewhere"))
        .await
        .message;
    let flag = |m: &Message, reason: &str| NewFlag {
        message_id: m.id,
        room_id: m.room_id,
        user_id: m.user_id,
        reason: reason.into(),
        detail: json!({"count": 2}),
    };
    assert_eq!(store.add_flags(vec![]).await.unwrap(), 0);
    let n = store
        .add_flags(vec![
            flag(&m1, "repeat"),
            flag(&m2, "repeat"),
            flag(&m3, "links"),
        ])
        .await
        .unwrap();
    assert_eq!(n, 3);

    // Newest first, per room or everywhere, with the message (text included).
    let in_room = store
        .flags(FlagQuery {
            room_id: Some(r.id),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    let ids: Vec<i64> = in_room.iter().map(|f| f.message_id).collect();
    assert_eq!(ids, vec![m2.id, m1.id]);
    assert_eq!(in_room[0].reason, "repeat");
    assert_eq!(in_room[0].detail, json!({"count": 2}));
    assert_eq!(in_room[0].message.as_ref().unwrap().text, "spam spam");
    assert_eq!(in_room[0].resolution, None);
    let all = store
        .flags(FlagQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(all.len(), 3);
    let older = store
        .flags(FlagQuery {
            before_id: Some(all[0].id),
            limit: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(older.len(), 1);
    assert_eq!(older[0].id, all[1].id);

    // Resolving: one flag, then a message's open flags; resolved flags leave the open list.
    let dismissed = store
        .resolve_flag(in_room[0].id, Some(moderator.id), FlagResolution::Dismissed)
        .await
        .unwrap();
    assert_eq!(dismissed.resolution, Some(FlagResolution::Dismissed));
    assert_eq!(dismissed.resolved_by, Some(moderator.id));
    assert!(dismissed.resolved_at.is_some());
    let err = store
        .resolve_flag(in_room[0].id, None, FlagResolution::Dismissed)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    let err = store
        .resolve_flag(i64::MAX / 2, None, FlagResolution::Dismissed)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound), "{err:?}");
    let n = store
        .resolve_message_flags(m1.id, None, FlagResolution::Removed)
        .await
        .unwrap();
    assert_eq!(n, 1);
    let open = store
        .flags(FlagQuery {
            room_id: Some(r.id),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(open.is_empty(), "{open:?}");
    let resolved = store
        .flags(FlagQuery {
            room_id: Some(r.id),
            include_resolved: true,
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(resolved.len(), 2);
    assert_eq!(resolved[1].resolution, Some(FlagResolution::Removed));
    assert_eq!(
        store.flag(resolved[1].id).await.unwrap().unwrap(),
        resolved[1]
    );

    // Flags of a deleted room drop out of listings.
    store.delete_room(other.id).await.unwrap();
    let all = store
        .flags(FlagQuery {
            include_resolved: true,
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(all.len(), 2);

    // Bans: set, replace, read with the membership, lift.
    let (member, ban) = store.sender(r.id, alice.id).await.unwrap().unwrap();
    assert_eq!((member.user_id, ban), (alice.id, None));
    assert!(store.sender(r.id, moderator.id).await.unwrap().is_none());
    let b = store
        .set_ban(
            alice.id,
            NewBan {
                until: Some(now_ms() + 60_000),
                reason: "spam".into(),
                created_by: Some(moderator.id),
            },
        )
        .await
        .unwrap();
    assert!(b.active_at(now_ms()));
    assert!(!b.active_at(now_ms() + 120_000));
    assert_eq!(store.ban(alice.id).await.unwrap(), Some(b.clone()));
    let forever = store
        .set_ban(
            alice.id,
            NewBan {
                until: None,
                reason: "again".into(),
                created_by: None,
            },
        )
        .await
        .unwrap();
    assert!(forever.active_at(i64::MAX));
    let (_, ban) = store.sender(r.id, alice.id).await.unwrap().unwrap();
    assert_eq!(ban, Some(forever));
    let err = store
        .set_ban(
            i64::MAX / 2,
            NewBan {
                until: None,
                reason: String::new(),
                created_by: None,
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound), "{err:?}");
    assert!(store.lift_ban(alice.id).await.unwrap());
    assert!(!store.lift_ban(alice.id).await.unwrap());
    assert_eq!(store.ban(alice.id).await.unwrap(), None);
}

pub async fn unread_counts(store: Arc<dyn Store>) {
    let alice = user(&store, "alice").await;
    let bob = user(&store, "bob").await;
    let a = room(&store, alice.id, RoomKind::Public).await;
    let b = room(&store, alice.id, RoomKind::Private).await;
    send(&store, msg(a.id, alice.id, "before-join", "history")).await;
    // Joining later: history is not unread.
    store
        .add_member(a.id, bob.id, MemberRole::Member)
        .await
        .unwrap();
    store
        .add_member(b.id, bob.id, MemberRole::Member)
        .await
        .unwrap();
    let summary = store.rooms_for_user(bob.id).await.unwrap();
    assert_eq!(summary.len(), 2);
    assert!(summary.iter().all(|s| s.unread == 0));

    for i in 0..3 {
        send(
            &store,
            msg(a.id, alice.id, &format!("a{i}"), &format!("a {i}")),
        )
        .await;
    }
    let last_b = send(&store, msg(b.id, alice.id, "b0", "in b"))
        .await
        .message;
    let unread =
        |rooms: &[RoomSummary], id: i64| rooms.iter().find(|s| s.room.id == id).unwrap().clone();
    let rooms = store.rooms_for_user(bob.id).await.unwrap();
    // Most recently active first.
    assert_eq!(rooms[0].room.id, b.id);
    assert_eq!(unread(&rooms, a.id).unread, 3);
    assert_eq!(unread(&rooms, b.id).unread, 1);
    assert_eq!(unread(&rooms, a.id).last_message.unwrap().text, "a 2");
    assert_eq!(unread(&rooms, b.id).last_message.unwrap(), last_b);
    assert_eq!(unread(&rooms, b.id).member.role, MemberRole::Member);

    assert_eq!(store.set_last_read(a.id, bob.id, 3).await.unwrap(), 3);
    assert_eq!(
        unread(&store.rooms_for_user(bob.id).await.unwrap(), a.id).unread,
        1
    );
    // Never backward, never past the end.
    assert_eq!(store.set_last_read(a.id, bob.id, 2).await.unwrap(), 3);
    assert_eq!(store.set_last_read(a.id, bob.id, 999).await.unwrap(), 4);
    assert_eq!(
        unread(&store.rooms_for_user(bob.id).await.unwrap(), a.id).unread,
        0
    );
    let err = store.set_last_read(a.id, 999_999, 1).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound), "{err:?}");

    // A delete is an event (unread again) and hides the message from "last message".
    let newest = store
        .messages(
            a.id,
            MessagePage {
                limit: 1,
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .pop()
        .unwrap();
    store
        .append_event(event(a.id, newest.id, alice.id, EventKind::Delete))
        .await
        .unwrap();
    let s = unread(&store.rooms_for_user(bob.id).await.unwrap(), a.id);
    assert_eq!(s.unread, 1);
    assert_eq!(s.last_message.unwrap().text, "a 1");
    // The owner's view: alice is in both, read nothing since creating them.
    let mine = store.rooms_for_user(alice.id).await.unwrap();
    assert_eq!(unread(&mine, a.id).unread, 5);
    assert_eq!(unread(&mine, a.id).member.role, MemberRole::Owner);
    // A room without messages has no last message.
    let empty = room(&store, bob.id, RoomKind::Private).await;
    let s = unread(&store.rooms_for_user(bob.id).await.unwrap(), empty.id);
    assert_eq!((s.unread, s.last_message), (0, None));
}

pub async fn message_pages(store: Arc<dyn Store>) {
    let alice = user(&store, "alice").await;
    let r = room(&store, alice.id, RoomKind::Public).await;
    let batch: Vec<NewMessage> = (1..=10)
        .map(|i| msg(r.id, alice.id, &format!("m{i}"), &format!("{i}")))
        .collect();
    assert!(store.append_messages(batch).await.iter().all(|r| r.is_ok()));
    let texts = |page: Vec<Message>| page.into_iter().map(|m| m.text).collect::<Vec<_>>();
    let page = |before, after, limit| MessagePage {
        before,
        after,
        limit,
    };

    assert_eq!(
        texts(store.messages(r.id, page(None, None, 3)).await.unwrap()),
        ["8", "9", "10"]
    );
    assert_eq!(
        texts(store.messages(r.id, page(Some(8), None, 3)).await.unwrap()),
        ["5", "6", "7"]
    );
    assert_eq!(
        texts(store.messages(r.id, page(None, Some(8), 5)).await.unwrap()),
        ["9", "10"]
    );
    assert_eq!(
        texts(store.messages(r.id, page(None, Some(2), 3)).await.unwrap()),
        ["3", "4", "5"]
    );
    assert_eq!(
        texts(
            store
                .messages(r.id, page(Some(6), Some(2), 10))
                .await
                .unwrap()
        ),
        ["3", "4", "5"]
    );
    assert!(store
        .messages(r.id, page(Some(1), None, 3))
        .await
        .unwrap()
        .is_empty());
    assert!(store
        .messages(r.id + 1000, page(None, None, 3))
        .await
        .unwrap()
        .is_empty());

    // Removed and deleted messages stay in history, flagged.
    let third = store
        .messages(r.id, page(Some(4), Some(2), 1))
        .await
        .unwrap()
        .pop()
        .unwrap();
    store
        .append_event(event(r.id, third.id, alice.id, EventKind::Removed))
        .await
        .unwrap();
    let again = store
        .messages(r.id, page(Some(4), Some(2), 1))
        .await
        .unwrap()
        .pop()
        .unwrap();
    assert!(again.removed);
    assert_eq!(again.id, third.id);
    assert_eq!(store.message(third.id).await.unwrap().unwrap(), again);
}

pub async fn sql_and_html_round_trip_byte_exact(store: Arc<dyn Store>) {
    let nasty = [
        "'; DROP TABLE messages; --",
        "Robert'); DROP TABLE users;--",
        "\" OR \"1\"=\"1",
        "1; DELETE FROM rooms WHERE 1=1",
        "$1 $2 ?1 ?NNN :name @var",
        "%_\\%\\_ LIKE '%'",
        "<script>alert('x')</script>",
        "<img src=x onerror=alert(1)>&amp;&lt;&#0;",
        "{\"text\": \"json\", \"n\": 1}",
        "  leading and trailing whitespace \t\r\n",
        "back\\slash \\\\ and quotes ' \" `",
        "emoji 🎉 and RTL \u{202e}gnirts and zero-width \u{200b}",
        "control \u{1} \u{7f} \u{1b}[31m",
        "",
    ];
    let name = "o'brien <b>\"; DROP TABLE users; --";
    let u = user(&store, name).await;
    assert_eq!(
        store
            .user_by_username(name)
            .await
            .unwrap()
            .unwrap()
            .username,
        name
    );
    let r = room(&store, u.id, RoomKind::Public).await;
    let big = "<p>".repeat(20_000);
    let mut texts: Vec<String> = nasty.iter().map(|s| s.to_string()).collect();
    texts.push(big);
    let batch: Vec<NewMessage> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| msg(r.id, u.id, &format!("{}-{i}", nasty[i % nasty.len()]), t))
        .collect();
    let out = store.append_messages(batch.clone()).await;
    for (res, t) in out.iter().zip(&texts) {
        assert_eq!(&res.as_ref().unwrap().message.text, t);
    }
    let events = store.events(r.id, 0, 100).await.unwrap();
    let page = store
        .messages(
            r.id,
            MessagePage {
                limit: 100,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    for (i, t) in texts.iter().enumerate() {
        assert_eq!(
            events[i].message.as_ref().unwrap().text.as_bytes(),
            t.as_bytes()
        );
        assert_eq!(page[i].text.as_bytes(), t.as_bytes());
        assert_eq!(page[i].client_msg_id, batch[i].client_msg_id);
    }
    // Dedupe keys that look like SQL still match exactly.
    let retry = store.append_messages(batch).await;
    assert!(retry.iter().all(|r| r.as_ref().unwrap().duplicate));

    let mut edit = event(r.id, page[0].id, u.id, EventKind::Edit);
    edit.text = Some(nasty[6].to_owned());
    let e = store.append_event(edit).await.unwrap();
    assert_eq!(e.message.unwrap().text, nasty[6]);
    let stored = store.events(r.id, e.offset - 1, 1).await.unwrap();
    assert_eq!(stored[0].data, json!({"text": nasty[6]}));

    let detail = json!({"html": nasty[7], "sql": nasty[0], "nested": {"list": nasty}});
    let entry = store
        .append_audit(NewAudit {
            actor_user_id: Some(u.id),
            action: "login".into(),
            target: nasty[1].into(),
            detail: detail.clone(),
        })
        .await
        .unwrap();
    let listed = store.audit_log(None, 10).await.unwrap();
    assert_eq!(listed, vec![entry]);
    assert_eq!(listed[0].detail, detail);
    assert_eq!(listed[0].target, nasty[1]);

    // NUL cannot be stored by PostgreSQL; both refuse it the same way.
    let mut nul = msg(r.id, u.id, "nul", "a\0b");
    let res = store.append_messages(vec![nul.clone()]).await;
    assert!(
        matches!(res[0], Err(StoreError::Invalid(_))),
        "{:?}",
        res[0]
    );
    nul.text = "fine".into();
    nul.client_msg_id = Some("n\0ul".into());
    let res = store.append_messages(vec![nul]).await;
    assert!(
        matches!(res[0], Err(StoreError::Invalid(_))),
        "{:?}",
        res[0]
    );
    let err = store
        .create_user(NewUser {
            username: "nul\0user".into(),
            password_hash: String::new(),
            display_name: String::new(),
            role: UserRole::User,
        })
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
    assert_eq!(store.user_by_username("nul\0user").await.unwrap(), None);
    assert_eq!(store.find_refresh_token("\0").await.unwrap(), None);
    assert_eq!(offsets(&store, r.id).await.len(), texts.len() + 1);
}

pub async fn audit_log_order(store: Arc<dyn Store>) {
    let admin = user(&store, "admin").await;
    let mut written = Vec::new();
    for (i, action) in [
        "login",
        "login_failed",
        "role_change",
        "message_removed",
        "room_deleted",
    ]
    .iter()
    .enumerate()
    {
        written.push(
            store
                .append_audit(NewAudit {
                    actor_user_id: if i == 1 { None } else { Some(admin.id) },
                    action: (*action).into(),
                    target: format!("user:{i}"),
                    detail: json!({"i": i}),
                })
                .await
                .unwrap(),
        );
    }
    let all = store.audit_log(None, 100).await.unwrap();
    let newest_first: Vec<AuditEntry> = written.iter().rev().cloned().collect();
    assert_eq!(all, newest_first);
    assert!(all
        .windows(2)
        .all(|w| w[0].id > w[1].id && w[0].at >= w[1].at));
    assert_eq!(all[3].actor_user_id, None);
    // Paging with before_id.
    let first = store.audit_log(None, 2).await.unwrap();
    let second = store.audit_log(Some(first[1].id), 2).await.unwrap();
    let third = store.audit_log(Some(second[1].id), 2).await.unwrap();
    let paged: Vec<AuditEntry> = [first, second, third].concat();
    assert_eq!(paged, newest_first);
}

pub async fn closed_store_is_unavailable(store: Arc<dyn Store>) {
    let alice = user(&store, "alice").await;
    store.close().await;
    let err = store.ping().await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    let err = store.user_by_id(alice.id).await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    let res = store
        .append_messages(vec![msg(1, alice.id, "x", "y"), msg(1, alice.id, "z", "w")])
        .await;
    assert_eq!(res.len(), 2);
    assert!(res
        .iter()
        .all(|r| matches!(r, Err(StoreError::Unavailable(_)))));
}

/// Not an assertion: prints append throughput, 20,000 messages in batches of 200, one
/// sender after another (each batch is one transaction and one commit).
pub async fn throughput(store: Arc<dyn Store>) {
    const TOTAL: usize = 20_000;
    const BATCH: usize = 200;
    let alice = user(&store, "alice").await;
    let r = room(&store, alice.id, RoomKind::Public).await;
    let text = "x".repeat(70);
    let started = Instant::now();
    for b in 0..TOTAL / BATCH {
        let batch: Vec<NewMessage> = (0..BATCH)
            .map(|i| msg(r.id, alice.id, &format!("t{b}-{i}"), &text))
            .collect();
        for res in store.append_messages(batch).await {
            res.unwrap();
        }
    }
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(
        store.room_position(r.id).await.unwrap().offset,
        TOTAL as i64
    );
    let line = format!(
        "THROUGHPUT {}: {TOTAL} messages in batches of {BATCH}: {:.2} s, {:.0} msgs/s",
        store.backend(),
        secs,
        TOTAL as f64 / secs
    );
    eprintln!("{line}");
    // One message per transaction: the cost of a commit, i.e. why batching matters.
    const SINGLES: usize = 300;
    let started = Instant::now();
    for i in 0..SINGLES {
        send(&store, msg(r.id, alice.id, &format!("s{i}"), &text)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "THROUGHPUT {}: {SINGLES} messages one per transaction: {:.0} msgs/s, {:.2} ms per commit",
        store.backend(),
        SINGLES as f64 / secs,
        secs * 1000.0 / SINGLES as f64
    );
}

pub async fn notifications_and_last_seen(store: Arc<dyn Store>) {
    let alice = user(&store, "alice").await;
    let bob = user(&store, "bob").await;
    let carol = user(&store, "carol").await;
    let r = room(&store, alice.id, RoomKind::Private).await;
    store
        .add_member(r.id, bob.id, MemberRole::Member)
        .await
        .unwrap();

    // Mentions resolve only the room's members, by exact (normalized) username.
    let names = vec![
        "bob".to_owned(),
        "carol".to_owned(),
        "nobody".to_owned(),
        "bob".to_owned(),
        "a\0b".to_owned(),
    ];
    let ids = store.member_ids_by_username(r.id, &names).await.unwrap();
    assert_eq!(ids, vec![bob.id]);

    assert!(store.add_notifications(vec![]).await.unwrap().is_empty());
    let note = |user_id: i64, kind: NotificationKind, n: i64| NewNotification {
        user_id,
        kind,
        room_id: Some(r.id),
        message_id: Some(n),
        actor_id: Some(alice.id),
        data: json!({"text": format!("<b>'{n}'</b>")}),
    };
    let stored = store
        .add_notifications(vec![
            note(bob.id, NotificationKind::Mention, 1),
            note(bob.id, NotificationKind::Invite, 2),
            note(carol.id, NotificationKind::Direct, 3),
            note(bob.id, NotificationKind::Mention, 4),
        ])
        .await
        .unwrap();
    assert_eq!(stored.len(), 4);
    assert!(stored.windows(2).all(|w| w[0].id < w[1].id));
    assert!(stored.iter().all(|n| n.read_at.is_none()));

    // An unknown user stores nothing at all.
    let err = store
        .add_notifications(vec![
            note(bob.id, NotificationKind::Mention, 5),
            note(999_999, NotificationKind::Mention, 6),
        ])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound), "{err:?}");

    let q = |unread_only: bool, before_id: Option<i64>, limit: u32| NotificationQuery {
        user_id: bob.id,
        unread_only,
        before_id,
        limit,
    };
    let all = store.notifications(q(false, None, 10)).await.unwrap();
    let ids: Vec<i64> = all.iter().map(|n| n.id).collect();
    assert_eq!(
        ids,
        vec![stored[3].id, stored[1].id, stored[0].id],
        "newest first"
    );
    assert_eq!(all[0], stored[3], "read back exactly");
    assert_eq!(all[1].kind, NotificationKind::Invite);
    let page = store
        .notifications(q(false, Some(stored[3].id), 1))
        .await
        .unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].id, stored[1].id);

    // Marking read: by id (another user's id is ignored), then everything.
    let n = store
        .mark_notifications_read(bob.id, MarkRead::Ids(vec![stored[0].id, stored[2].id]))
        .await
        .unwrap();
    assert_eq!(n, 1);
    let again = store
        .mark_notifications_read(bob.id, MarkRead::Ids(vec![stored[0].id]))
        .await
        .unwrap();
    assert_eq!(again, 0, "already read");
    let unread = store.notifications(q(true, None, 10)).await.unwrap();
    assert_eq!(unread.len(), 2);
    assert!(unread.iter().all(|n| n.id != stored[0].id));
    let n = store
        .mark_notifications_read(bob.id, MarkRead::All)
        .await
        .unwrap();
    assert_eq!(n, 2);
    assert!(store
        .notifications(q(true, None, 10))
        .await
        .unwrap()
        .is_empty());
    assert!(store
        .notifications(q(false, None, 10))
        .await
        .unwrap()
        .iter()
        .all(|n| n.read_at.is_some()));
    // Carol's stays unread.
    let carols = store
        .notifications(NotificationQuery {
            user_id: carol.id,
            unread_only: true,
            before_id: None,
            limit: 10,
        })
        .await
        .unwrap();
    assert_eq!(carols.len(), 1);

    // last_seen: never, then set, never backward; unknown users are skipped.
    assert_eq!(store.last_seen(alice.id).await.unwrap(), None);
    assert!(matches!(
        store.last_seen(999_999).await,
        Err(StoreError::NotFound)
    ));
    store
        .set_last_seen(vec![(alice.id, 1_000), (bob.id, 2_000), (999_999, 5)])
        .await
        .unwrap();
    store
        .set_last_seen(vec![(alice.id, 500), (bob.id, 3_000)])
        .await
        .unwrap();
    assert_eq!(store.last_seen(alice.id).await.unwrap(), Some(1_000));
    assert_eq!(store.last_seen(bob.id).await.unwrap(), Some(3_000));
    // The account itself is unchanged.
    assert_eq!(
        store.user_by_id(alice.id).await.unwrap().unwrap().username,
        "alice"
    );
}

pub async fn sites(store: Arc<dyn Store>) {
    assert!(store.sites().await.unwrap().is_empty());
    let a = store
        .create_site(NewSite {
            name: "Shop".into(),
            key_hash: "hash-a".into(),
            allowed_origins: vec!["https://shop.example".into()],
        })
        .await
        .unwrap();
    assert_eq!(a.allowed_origins, vec!["https://shop.example".to_string()]);
    let err = store
        .create_site(NewSite {
            name: "Dup".into(),
            key_hash: "hash-a".into(),
            allowed_origins: vec![],
        })
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    let b = store
        .create_site(NewSite {
            name: "Game".into(),
            key_hash: "hash-b".into(),
            allowed_origins: vec![],
        })
        .await
        .unwrap();
    assert_eq!(store.site(a.id).await.unwrap().unwrap(), a);
    assert_eq!(store.site(b.id + 100).await.unwrap(), None);
    assert_eq!(store.sites().await.unwrap(), vec![a.clone(), b.clone()]);

    let renamed = store
        .update_site(
            b.id,
            SiteUpdate {
                name: Some("Games".into()),
                ..SiteUpdate::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(renamed.name, "Games");
    assert!(renamed.allowed_origins.is_empty());
    let b = store
        .update_site(
            b.id,
            SiteUpdate {
                allowed_origins: Some(vec!["https://a.example".into(), "https://b.example".into()]),
                ..SiteUpdate::default()
            },
        )
        .await
        .unwrap();
    assert_eq!((b.name.as_str(), b.allowed_origins.len()), ("Games", 2));
    assert_eq!(b.key_hash, "hash-b");
    assert!(matches!(
        store
            .update_site(b.id + 100, SiteUpdate::default())
            .await
            .unwrap_err(),
        StoreError::NotFound
    ));

    let new = |username: &str| NewUser {
        username: username.into(),
        password_hash: "!site".into(),
        display_name: "Site user".into(),
        role: UserRole::User,
    };
    assert_eq!(store.site_user(a.id, "42").await.unwrap(), None);
    let u = store
        .create_site_user(a.id, "42", new("s1_42"))
        .await
        .unwrap();
    assert_eq!(store.site_user(a.id, "42").await.unwrap().unwrap(), u);
    assert_eq!(store.user_by_id(u.id).await.unwrap().unwrap(), u);
    // The same external id on another site is another user.
    assert_eq!(store.site_user(b.id, "42").await.unwrap(), None);
    let v = store
        .create_site_user(b.id, "42", new("s2_42"))
        .await
        .unwrap();
    assert_ne!(u.id, v.id);
    // One user per (site, external id); usernames stay globally unique.
    for (site, ext, name) in [(a.id, "42", "s1_42_again"), (b.id, "43", "s1_42")] {
        let err = store
            .create_site_user(site, ext, new(name))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    }
    let err = store
        .create_site_user(b.id + 100, "1", new("nobody"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound), "{err:?}");
    // Ordinary accounts are not site users.
    let plain = user(&store, "plain").await;
    assert_eq!(store.site_user(a.id, &plain.username).await.unwrap(), None);
}

// ----- documents -----

async fn document(store: &Arc<dyn Store>, owner_id: i64, title: &str) -> Document {
    store
        .create_document(NewDocument {
            owner_id,
            title: title.to_owned(),
        })
        .await
        .unwrap()
}

fn update(doc_id: i64, data: &[u8]) -> NewDocUpdate {
    NewDocUpdate {
        doc_id,
        data: data.to_vec(),
    }
}

fn version(doc_id: i64, label: &str, auto: bool, state: &[u8]) -> NewDocVersion {
    NewDocVersion {
        doc_id,
        label: label.to_owned(),
        auto,
        created_by: None,
        state: state.to_vec(),
    }
}

/// updated_at has millisecond resolution: wait until the clock has moved on.
async fn next_ms() {
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
}

fn ids_and_roles(list: &[DocumentSummary]) -> Vec<(i64, DocRole)> {
    list.iter().map(|s| (s.document.id, s.role)).collect()
}

pub async fn documents_and_roles(store: Arc<dyn Store>) {
    let alice = user(&store, "alice").await;
    let bob = user(&store, "bob").await;
    let carol = user(&store, "carol").await;
    let dave = user(&store, "dave").await;
    let plan = document(&store, alice.id, "Plan").await;
    assert_eq!((plan.title.as_str(), plan.owner_id), ("Plan", alice.id));
    assert_eq!(plan.created_at, plan.updated_at);
    assert_eq!(store.document(plan.id).await.unwrap().unwrap(), plan);
    assert_eq!(store.document(plan.id + 1000).await.unwrap(), None);
    let notes = document(&store, alice.id, "Notes").await;
    let bobs = document(&store, bob.id, "Bob's").await;

    let err = store
        .create_document(NewDocument {
            owner_id: 999_999,
            title: "orphan".into(),
        })
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound), "{err:?}");
    let err = store
        .create_document(NewDocument {
            owner_id: alice.id,
            title: "a\0b".into(),
        })
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
    // Any other text is the caller's to judge, the empty title included.
    assert_eq!(document(&store, dave.id, "").await.title, "");

    store
        .set_document_member(plan.id, bob.id, DocRole::Editor)
        .await
        .unwrap();
    store
        .set_document_member(plan.id, carol.id, DocRole::Viewer)
        .await
        .unwrap();
    store
        .set_document_member(bobs.id, alice.id, DocRole::Viewer)
        .await
        .unwrap();

    // Renaming bumps updated_at, which moves the document to the top of its users' lists.
    next_ms().await;
    let renamed = store.rename_document(plan.id, "Plan v2").await.unwrap();
    assert_eq!(renamed.title, "Plan v2");
    assert_eq!(renamed.created_at, plan.created_at);
    assert!(renamed.updated_at > plan.updated_at, "{renamed:?}");
    assert_eq!(store.document(plan.id).await.unwrap().unwrap(), renamed);
    let err = store
        .rename_document(plan.id + 1000, "x")
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound), "{err:?}");
    let err = store.rename_document(plan.id, "x\0").await.unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");

    // Most recently updated first; notes and bobs may share a millisecond, and then the
    // higher id comes first.
    use DocRole::*;
    let alices = store.documents_for_user(alice.id).await.unwrap();
    assert_eq!(
        ids_and_roles(&alices),
        vec![(plan.id, Owner), (bobs.id, Viewer), (notes.id, Owner)]
    );
    assert_eq!(alices[0].document, renamed);
    assert_eq!(
        ids_and_roles(&store.documents_for_user(bob.id).await.unwrap()),
        vec![(plan.id, Editor), (bobs.id, Owner)]
    );
    assert_eq!(
        ids_and_roles(&store.documents_for_user(carol.id).await.unwrap()),
        vec![(plan.id, Viewer)]
    );
    let stranger = user(&store, "stranger").await;
    assert!(store
        .documents_for_user(stranger.id)
        .await
        .unwrap()
        .is_empty());

    // An appended update bumps updated_at too.
    next_ms().await;
    let seqs = store
        .append_doc_updates(vec![update(notes.id, b"\x01\x02")])
        .await
        .unwrap();
    assert!(seqs[0].is_some());
    let bumped = store.document(notes.id).await.unwrap().unwrap();
    assert!(bumped.updated_at > renamed.updated_at, "{bumped:?}");
    assert_eq!(
        ids_and_roles(&store.documents_for_user(alice.id).await.unwrap()),
        vec![(notes.id, Owner), (plan.id, Owner), (bobs.id, Viewer)]
    );

    for (doc, who, role) in [
        (plan.id, alice.id, Some(Owner)),
        (plan.id, bob.id, Some(Editor)),
        (plan.id, carol.id, Some(Viewer)),
        (plan.id, stranger.id, None),
        (bobs.id, alice.id, Some(Viewer)),
        (bobs.id, carol.id, None),
        (plan.id + 1000, alice.id, None),
    ] {
        assert_eq!(
            store.document_role(doc, who).await.unwrap(),
            role,
            "doc {doc} user {who}"
        );
    }
}

pub async fn document_members(store: Arc<dyn Store>) {
    let alice = user(&store, "alice").await;
    let bob = user(&store, "bob").await;
    let carol = user(&store, "carol").await;
    let doc = document(&store, alice.id, "Shared").await;
    assert!(store.document_members(doc.id).await.unwrap().is_empty());

    let added = store
        .set_document_member(doc.id, bob.id, DocRole::Viewer)
        .await
        .unwrap();
    assert_eq!(
        (added.doc_id, added.user_id, added.role),
        (doc.id, bob.id, DocRole::Viewer)
    );
    // A change of role is an upsert that keeps added_at.
    next_ms().await;
    let changed = store
        .set_document_member(doc.id, bob.id, DocRole::Editor)
        .await
        .unwrap();
    assert_eq!(changed.role, DocRole::Editor);
    assert_eq!(changed.added_at, added.added_at);
    let carols = store
        .set_document_member(doc.id, carol.id, DocRole::Viewer)
        .await
        .unwrap();
    assert_eq!(
        store.document_members(doc.id).await.unwrap(),
        vec![changed.clone(), carols.clone()],
        "by user id, without the owner"
    );
    assert_eq!(
        store.document_role(doc.id, bob.id).await.unwrap(),
        Some(DocRole::Editor)
    );

    // Owner is nobody's member role, and the owner is nobody's member.
    for (who, role) in [
        (bob.id, DocRole::Owner),
        (alice.id, DocRole::Editor),
        (alice.id, DocRole::Owner),
    ] {
        let err = store
            .set_document_member(doc.id, who, role)
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::Invalid(_)),
            "{who} {role}: {err:?}"
        );
    }
    assert_eq!(
        store.document_role(doc.id, alice.id).await.unwrap(),
        Some(DocRole::Owner)
    );
    for (doc_id, who) in [(doc.id + 1000, bob.id), (doc.id, 999_999)] {
        let err = store
            .set_document_member(doc_id, who, DocRole::Viewer)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::NotFound), "{err:?}");
    }

    store.remove_document_member(doc.id, bob.id).await.unwrap();
    let err = store
        .remove_document_member(doc.id, bob.id)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound), "{err:?}");
    let err = store
        .remove_document_member(doc.id, alice.id)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::NotFound),
        "the owner is not a member: {err:?}"
    );
    assert_eq!(store.document_role(doc.id, bob.id).await.unwrap(), None);
    assert_eq!(store.document_members(doc.id).await.unwrap(), vec![carols]);
    // Added again later: a new added_at.
    next_ms().await;
    let again = store
        .set_document_member(doc.id, bob.id, DocRole::Viewer)
        .await
        .unwrap();
    assert!(again.added_at > added.added_at);

    // A share notification round-trips with its kind.
    let stored = store
        .add_notifications(vec![NewNotification {
            user_id: bob.id,
            kind: NotificationKind::Share,
            room_id: None,
            message_id: None,
            actor_id: Some(alice.id),
            data: json!({"document_id": doc.id, "title": doc.title, "role": DocRole::Viewer}),
        }])
        .await
        .unwrap();
    let listed = store
        .notifications(NotificationQuery {
            user_id: bob.id,
            unread_only: true,
            before_id: None,
            limit: 10,
        })
        .await
        .unwrap();
    assert_eq!(listed, stored);
    assert_eq!(listed[0].kind, NotificationKind::Share);
    assert_eq!(
        listed[0].data,
        json!({"document_id": doc.id, "title": "Shared", "role": "viewer"})
    );
}

pub async fn document_update_log(store: Arc<dyn Store>) {
    let alice = user(&store, "alice").await;
    let a = document(&store, alice.id, "a").await;
    let b = document(&store, alice.id, "b").await;
    let fresh = store.load_document(a.id).await.unwrap().unwrap();
    assert_eq!(
        fresh,
        DocContent {
            snapshot: None,
            snapshot_seq: 0,
            updates: vec![]
        }
    );
    assert_eq!(store.load_document(a.id + 1000).await.unwrap(), None);
    assert!(store.append_doc_updates(vec![]).await.unwrap().is_empty());

    // One batch across two documents: one seq per input, increasing in input order.
    let seqs = store
        .append_doc_updates(vec![
            update(a.id, b"a1"),
            update(b.id, b"b1"),
            update(a.id, b"a2"),
            update(a.id, b"a3"),
            update(b.id, b"b2"),
        ])
        .await
        .unwrap();
    let seqs: Vec<i64> = seqs.into_iter().map(Option::unwrap).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let log = |c: &DocContent| -> Vec<(i64, Vec<u8>)> {
        c.updates.iter().map(|u| (u.seq, u.data.clone())).collect()
    };
    let loaded = store.load_document(a.id).await.unwrap().unwrap();
    assert_eq!((loaded.snapshot.as_deref(), loaded.snapshot_seq), (None, 0));
    assert_eq!(
        log(&loaded),
        vec![
            (seqs[0], b"a1".to_vec()),
            (seqs[2], b"a2".to_vec()),
            (seqs[3], b"a3".to_vec())
        ]
    );
    assert_eq!(
        log(&store.load_document(b.id).await.unwrap().unwrap()),
        vec![(seqs[1], b"b1".to_vec()), (seqs[4], b"b2".to_vec())]
    );

    // A deleted document's updates are skipped; the rest of the batch commits.
    let gone = document(&store, alice.id, "gone").await;
    store.delete_document(gone.id).await.unwrap();
    let out = store
        .append_doc_updates(vec![
            update(a.id, b"a4"),
            update(gone.id, b"lost"),
            update(b.id, b"b3"),
            update(gone.id + 1000, b"never"),
        ])
        .await
        .unwrap();
    assert_eq!(out.len(), 4);
    assert!(out[0].unwrap() > seqs[4]);
    assert_eq!((out[1], out[3]), (None, None));
    assert!(out[2].unwrap() > out[0].unwrap());
    assert_eq!(
        store
            .load_document(a.id)
            .await
            .unwrap()
            .unwrap()
            .updates
            .last()
            .unwrap(),
        &DocUpdate {
            seq: out[0].unwrap(),
            data: b"a4".to_vec()
        }
    );
    assert_eq!(store.load_document(gone.id).await.unwrap(), None);

    // An empty update fails the whole call, and nothing of it is stored.
    let before = store.load_document(a.id).await.unwrap().unwrap();
    let err = store
        .append_doc_updates(vec![update(a.id, b"a5"), update(b.id, b"")])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
    assert_eq!(store.load_document(a.id).await.unwrap().unwrap(), before);
}

/// Concurrent batches into one document: every seq is unique, and each writer's updates
/// are in its own order in the log.
pub async fn document_appends_under_concurrency(store: Arc<dyn Store>) {
    const WRITERS: u8 = 8;
    const EACH: u8 = 20;
    let alice = user(&store, "alice").await;
    let doc = document(&store, alice.id, "busy").await;
    let other = document(&store, alice.id, "other").await;
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let store = store.clone();
        let (doc_id, other_id) = (doc.id, other.id);
        tasks.push(tokio::spawn(async move {
            for k in (0..EACH).step_by(2) {
                // Half the batches touch both documents, in either order.
                let mut batch = vec![update(doc_id, &[w, k]), update(doc_id, &[w, k + 1])];
                if k % 4 == 0 {
                    batch.insert(usize::from(w % 2), update(other_id, &[w, k]));
                }
                for seq in store.append_doc_updates(batch).await.unwrap() {
                    assert!(seq.is_some());
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let log = store.load_document(doc.id).await.unwrap().unwrap().updates;
    assert_eq!(log.len(), usize::from(WRITERS) * usize::from(EACH));
    assert!(log.windows(2).all(|p| p[0].seq < p[1].seq));
    for w in 0..WRITERS {
        let mine: Vec<u8> = log
            .iter()
            .filter(|u| u.data[0] == w)
            .map(|u| u.data[1])
            .collect();
        assert_eq!(mine, (0..EACH).collect::<Vec<_>>(), "writer {w}");
    }
}

pub async fn document_compaction(store: Arc<dyn Store>) {
    let alice = user(&store, "alice").await;
    let doc = document(&store, alice.id, "compact me").await;
    let seqs: Vec<i64> = store
        .append_doc_updates((1..=5u8).map(|i| update(doc.id, &[i])).collect())
        .await
        .unwrap()
        .into_iter()
        .map(Option::unwrap)
        .collect();
    let seqs_of = |c: &DocContent| -> Vec<i64> { c.updates.iter().map(|u| u.seq).collect() };

    store
        .compact_document(doc.id, b"snap-3".to_vec(), seqs[2])
        .await
        .unwrap();
    let loaded = store.load_document(doc.id).await.unwrap().unwrap();
    assert_eq!(loaded.snapshot.as_deref(), Some(&b"snap-3"[..]));
    assert_eq!(loaded.snapshot_seq, seqs[2]);
    assert_eq!(seqs_of(&loaded), vec![seqs[3], seqs[4]]);
    assert_eq!(loaded.updates[0].data, vec![4]);

    // Stale compactions (at or below the stored snapshot_seq) change nothing.
    for stale in [seqs[1], seqs[2], 0, -1] {
        store
            .compact_document(doc.id, b"stale".to_vec(), stale)
            .await
            .unwrap();
        assert_eq!(store.load_document(doc.id).await.unwrap().unwrap(), loaded);
    }

    // A later compaction replaces the snapshot.
    let more: Vec<i64> = store
        .append_doc_updates(vec![update(doc.id, &[6]), update(doc.id, &[7])])
        .await
        .unwrap()
        .into_iter()
        .map(Option::unwrap)
        .collect();
    store
        .compact_document(doc.id, b"snap-6".to_vec(), more[0])
        .await
        .unwrap();
    let loaded = store.load_document(doc.id).await.unwrap().unwrap();
    assert_eq!(
        (loaded.snapshot.as_deref(), loaded.snapshot_seq),
        (Some(&b"snap-6"[..]), more[0])
    );
    assert_eq!(seqs_of(&loaded), vec![more[1]]);

    // Refused: an empty snapshot, a seq the document never had, a document that is gone.
    for (snapshot, through) in [(vec![], more[1]), (b"x".to_vec(), more[1] + 1)] {
        let err = store
            .compact_document(doc.id, snapshot, through)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
    }
    assert_eq!(store.load_document(doc.id).await.unwrap().unwrap(), loaded);
    let err = store
        .compact_document(doc.id + 1000, b"x".to_vec(), 1)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound), "{err:?}");

    // Compacting the whole log: later updates still get higher seqs (never reused), so the
    // next load sees them.
    store
        .compact_document(doc.id, b"snap-7".to_vec(), more[1])
        .await
        .unwrap();
    let loaded = store.load_document(doc.id).await.unwrap().unwrap();
    assert!(loaded.updates.is_empty());
    assert_eq!(loaded.snapshot_seq, more[1]);
    let next = store
        .append_doc_updates(vec![update(doc.id, &[8])])
        .await
        .unwrap()[0]
        .unwrap();
    assert!(next > more[1], "{next} after {}", more[1]);
    assert_eq!(
        seqs_of(&store.load_document(doc.id).await.unwrap().unwrap()),
        vec![next]
    );
}

/// Loads while the log is appended to and compacted: every load is one consistent state,
/// a snapshot merging the first `n` updates followed by updates `n`, `n + 1`, ... with
/// none missing (an old snapshot with an already trimmed log would skip some).
pub async fn document_load_during_compaction(store: Arc<dyn Store>) {
    const ROUNDS: u32 = 60;
    let alice = user(&store, "alice").await;
    let doc_id = document(&store, alice.id, "hot").await.id;
    let writer = tokio::spawn({
        let store = store.clone();
        async move {
            let mut seqs = Vec::new();
            for i in 0..ROUNDS {
                let out = store
                    .append_doc_updates(vec![update(doc_id, &i.to_be_bytes())])
                    .await
                    .unwrap();
                seqs.push(out[0].unwrap());
                if i % 3 == 2 {
                    // Merge all but the newest: the snapshot says how many it holds.
                    let merged = seqs.len() - 1;
                    let snapshot = (merged as u32).to_be_bytes().to_vec();
                    store
                        .compact_document(doc_id, snapshot, seqs[merged - 1])
                        .await
                        .unwrap();
                }
            }
        }
    });
    let as_u32 = |b: &[u8]| u32::from_be_bytes(b.try_into().unwrap());
    let mut loads = 0;
    while !writer.is_finished() {
        let content = store.load_document(doc_id).await.unwrap().unwrap();
        let merged = content.snapshot.as_deref().map_or(0, as_u32);
        let got: Vec<u32> = content.updates.iter().map(|u| as_u32(&u.data)).collect();
        let want: Vec<u32> = (merged..merged + got.len() as u32).collect();
        assert_eq!(got, want, "snapshot of {merged} updates, then {got:?}");
        loads += 1;
    }
    writer.await.unwrap();
    assert!(loads > 0);
    let last = store.load_document(doc_id).await.unwrap().unwrap();
    assert_eq!(last.snapshot.as_deref().map(as_u32), Some(ROUNDS - 1));
    assert_eq!(last.updates.len(), 1);
}

pub async fn document_delete_cascades(store: Arc<dyn Store>) {
    let alice = user(&store, "alice").await;
    let bob = user(&store, "bob").await;
    let doc = document(&store, alice.id, "doomed").await;
    let keep = document(&store, alice.id, "kept").await;
    for d in [doc.id, keep.id] {
        store
            .set_document_member(d, bob.id, DocRole::Editor)
            .await
            .unwrap();
        let seqs = store
            .append_doc_updates(vec![update(d, b"one"), update(d, b"two")])
            .await
            .unwrap();
        store
            .compact_document(d, b"snap".to_vec(), seqs[0].unwrap())
            .await
            .unwrap();
    }
    let v = store
        .create_doc_version(version(doc.id, "v1", false, b"state"))
        .await
        .unwrap();
    store
        .create_doc_version(version(keep.id, "v1", false, b"state"))
        .await
        .unwrap();
    let kept_before = store.load_document(keep.id).await.unwrap().unwrap();

    store.delete_document(doc.id).await.unwrap();
    assert_eq!(store.document(doc.id).await.unwrap(), None);
    assert_eq!(store.load_document(doc.id).await.unwrap(), None);
    assert!(store.document_members(doc.id).await.unwrap().is_empty());
    assert!(store.doc_versions(doc.id).await.unwrap().is_empty());
    assert_eq!(store.doc_version(doc.id, v.id).await.unwrap(), None);
    assert_eq!(store.document_role(doc.id, bob.id).await.unwrap(), None);
    assert_eq!(store.document_role(doc.id, alice.id).await.unwrap(), None);
    assert_eq!(
        ids_and_roles(&store.documents_for_user(bob.id).await.unwrap()),
        vec![(keep.id, DocRole::Editor)]
    );
    let err = store.delete_document(doc.id).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound), "{err:?}");
    let err = store
        .create_doc_version(version(doc.id, "late", true, b"s"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound), "{err:?}");
    let err = store
        .set_document_member(doc.id, bob.id, DocRole::Viewer)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound), "{err:?}");
    let err = store.rename_document(doc.id, "back").await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound), "{err:?}");

    // The other document is untouched.
    assert_eq!(
        store.load_document(keep.id).await.unwrap().unwrap(),
        kept_before
    );
    assert_eq!(store.doc_versions(keep.id).await.unwrap().len(), 1);
    assert_eq!(store.document_members(keep.id).await.unwrap().len(), 1);
}

pub async fn document_versions(store: Arc<dyn Store>) {
    let alice = user(&store, "alice").await;
    let doc = document(&store, alice.id, "versioned").await;
    let other = document(&store, alice.id, "other").await;
    assert!(store.doc_versions(doc.id).await.unwrap().is_empty());

    let mut made = Vec::new();
    for (label, auto) in [
        ("auto 1", true),
        ("Before the rewrite", false),
        ("auto 2", true),
        ("auto 3", true),
        ("auto 4", true),
    ] {
        let mut v = version(doc.id, label, auto, label.as_bytes());
        v.created_by = (!auto).then_some(alice.id);
        made.push(store.create_doc_version(v).await.unwrap());
    }
    let named = made[1].clone();
    assert_eq!(
        (
            named.label.as_str(),
            named.auto,
            named.created_by,
            named.size
        ),
        ("Before the rewrite", false, Some(alice.id), 18)
    );
    assert_eq!(made[0].created_by, None);
    let other_auto = store
        .create_doc_version(version(other.id, "auto", true, b"o"))
        .await
        .unwrap();

    let listed = store.doc_versions(doc.id).await.unwrap();
    let newest_first: Vec<DocVersion> = made.iter().rev().cloned().collect();
    assert_eq!(listed, newest_first);
    let (meta, state) = store.doc_version(doc.id, named.id).await.unwrap().unwrap();
    assert_eq!(
        (meta, state),
        (named.clone(), b"Before the rewrite".to_vec())
    );
    // Only through its own document.
    assert_eq!(store.doc_version(other.id, named.id).await.unwrap(), None);
    assert_eq!(
        store.doc_version(doc.id, other_auto.id).await.unwrap(),
        None
    );
    assert_eq!(
        store.doc_version(doc.id, named.id + 1000).await.unwrap(),
        None
    );

    // Labels: up to 200 characters (not bytes), no NUL; state not empty; a real document.
    let long = "é".repeat(200);
    let v = store
        .create_doc_version(version(doc.id, &long, false, b"s"))
        .await
        .unwrap();
    assert_eq!(v.label, long);
    for bad in [
        version(doc.id, &"x".repeat(201), false, b"s"),
        version(doc.id, "nul\0", false, b"s"),
        version(doc.id, "empty", true, b""),
    ] {
        let err = store.create_doc_version(bad).await.unwrap_err();
        assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
    }
    let err = store
        .create_doc_version(version(doc.id + 1000, "x", true, b"s"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound), "{err:?}");

    // Pruning keeps the newest `keep` automatic versions and every named one.
    assert_eq!(store.prune_auto_versions(doc.id, 2).await.unwrap(), 2);
    let ids: Vec<i64> = store
        .doc_versions(doc.id)
        .await
        .unwrap()
        .iter()
        .map(|v| v.id)
        .collect();
    assert_eq!(ids, vec![v.id, made[4].id, made[3].id, named.id]);
    assert_eq!(store.prune_auto_versions(doc.id, 2).await.unwrap(), 0);
    assert_eq!(store.prune_auto_versions(doc.id, 0).await.unwrap(), 2);
    let ids: Vec<i64> = store
        .doc_versions(doc.id)
        .await
        .unwrap()
        .iter()
        .map(|v| v.id)
        .collect();
    assert_eq!(ids, vec![v.id, named.id]);
    // Other documents' versions are not touched.
    assert_eq!(
        store.doc_versions(other.id).await.unwrap(),
        vec![other_auto]
    );
    assert_eq!(
        store.prune_auto_versions(doc.id + 1000, 0).await.unwrap(),
        0
    );
}

pub async fn document_bytes_round_trip(store: Arc<dyn Store>) {
    let alice = user(&store, "alice").await;
    let title = "'); DROP TABLE documents; -- <script>alert(1)</script> ✓";
    let doc = document(&store, alice.id, title).await;
    assert_eq!(store.document(doc.id).await.unwrap().unwrap().title, title);

    let every: Vec<u8> = (0..=255u8).collect();
    let reversed: Vec<u8> = every.iter().rev().copied().collect();
    // A megabyte that is not valid UTF-8 anywhere near its start.
    let big: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 7 + 0x80) as u8).collect();
    let nul_only = vec![0u8; 3];
    let seqs = store
        .append_doc_updates(vec![
            update(doc.id, &every),
            update(doc.id, &big),
            update(doc.id, &nul_only),
            update(doc.id, &reversed),
        ])
        .await
        .unwrap();
    let loaded = store.load_document(doc.id).await.unwrap().unwrap();
    let data: Vec<&[u8]> = loaded.updates.iter().map(|u| u.data.as_slice()).collect();
    assert_eq!(
        data,
        vec![&every[..], &big[..], &nul_only[..], &reversed[..]]
    );

    store
        .compact_document(doc.id, big.clone(), seqs[1].unwrap())
        .await
        .unwrap();
    let loaded = store.load_document(doc.id).await.unwrap().unwrap();
    assert!(
        loaded.snapshot.as_deref() == Some(&big[..]),
        "snapshot differs"
    );
    assert_eq!(loaded.updates.len(), 2);
    assert_eq!(loaded.updates[1].data, reversed);

    let v = store
        .create_doc_version(version(doc.id, title, false, &every))
        .await
        .unwrap();
    assert_eq!(v.size, 256);
    let (meta, state) = store.doc_version(doc.id, v.id).await.unwrap().unwrap();
    assert_eq!(meta.label, title);
    assert_eq!(state, every);
}
