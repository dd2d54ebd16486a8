//! `kill -9` during a burst of sends loses no acknowledged message (SQLite and PostgreSQL).
//! The server runs as a real process so that it can be killed without any shutdown path.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::free_port;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use switchboard::auth::sign_hs256;
use switchboard_store::testing::TestDatabase;
use switchboard_store::{MemberRole, NewRoom, NewUser, RoomKind, UserRole};
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "crash-test-secret";

async fn spawn(db_url: &str, data_dir: &std::path::Path, port: u16) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchboard"));
    // Every SWITCHBOARD_* variable is a config key to the server (SWITCHBOARD_SKIP_WEB, set
    // for a build without the web app, would stop it): only the test's own.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("SWITCHBOARD_") {
            cmd.env_remove(k);
        }
    }
    let child = cmd
        .arg("serve")
        .env("SWITCHBOARD_LISTEN", format!("127.0.0.1:{port}"))
        .env("SWITCHBOARD_DATA_DIR", data_dir)
        .env("SWITCHBOARD_DATABASE_URL", db_url)
        .env("SWITCHBOARD_TOKEN_HMAC_SECRET", SECRET)
        .env("SWITCHBOARD_API_KEY", "k")
        .env("SWITCHBOARD_CLIENT__COMMAND_RATE", "100000")
        .env("SWITCHBOARD_CLIENT__COMMAND_BURST", "100000")
        .env("SWITCHBOARD_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start switchboard");
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return child;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("server did not start on port {port}");
}

/// One sender: connects as `user` and publishes until the connection dies. Returns the
/// client_msg_ids whose publish was acknowledged.
async fn sender(port: u16, user: i64, channel: String) -> Vec<String> {
    let url = format!("ws://127.0.0.1:{port}/connection/websocket");
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("ws");
    let token = sign_hs256(SECRET, &json!({"sub": user.to_string()}));
    ws.send(Message::text(
        json!({"id": 1, "connect": {"token": token}}).to_string(),
    ))
    .await
    .unwrap();
    let _ = ws.next().await;
    let mut acked = Vec::new();
    for n in 0u32.. {
        let cmid = format!("{user}-{n}");
        let cmd = json!({"id": n + 2, "publish": {"channel": channel, "data": {"text": cmid, "client_msg_id": cmid}}});
        if ws.send(Message::text(cmd.to_string())).await.is_err() {
            break;
        }
        // Wait for this publish's reply, skipping pushes (our own messages come back too).
        let acknowledged = loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    let reply = t
                        .lines()
                        .map(|l| serde_json::from_str::<Value>(l).unwrap())
                        .find(|v| v["id"] == n + 2);
                    if let Some(v) = reply {
                        break v.get("publish").is_some();
                    }
                }
                Some(Ok(_)) => {}
                _ => break false,
            }
        };
        if !acknowledged {
            break;
        }
        acked.push(cmid);
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_burst_loses_no_acknowledged_message() {
    let mut dbs = vec![TestDatabase::sqlite()];
    match TestDatabase::postgres().await {
        Some(db) => dbs.push(db),
        None if std::env::var_os("CI").is_some() => panic!("PostgreSQL is required under CI"),
        None => eprintln!("SKIP PostgreSQL half: no server at 127.0.0.1:5432"),
    }
    for db in dbs {
        let dir = tempfile::tempdir().unwrap();
        // Users and a room, made through the store before the server starts.
        let store = db.open().await;
        let mut users = Vec::new();
        for i in 0..4 {
            let u = store
                .create_user(NewUser {
                    username: format!("crash{i}"),
                    password_hash: String::new(),
                    display_name: format!("c{i}"),
                    role: UserRole::User,
                })
                .await
                .unwrap();
            users.push(u.id);
        }
        let room = store
            .create_room(NewRoom {
                kind: RoomKind::Private,
                name: "crash".into(),
                created_by: users[0],
            })
            .await
            .unwrap();
        for u in &users[1..] {
            store
                .add_member(room.id, *u, MemberRole::Member)
                .await
                .unwrap();
        }
        store.close().await;
        let channel = format!("chat:{}", room.id);

        let port = free_port();
        let mut server = spawn(db.url(), dir.path(), port).await;
        let senders: Vec<_> = users
            .iter()
            .map(|u| tokio::spawn(sender(port, *u, channel.clone())))
            .collect();
        tokio::time::sleep(Duration::from_millis(700)).await;
        server.start_kill().unwrap(); // SIGKILL: no shutdown, no flush
        server.wait().await.unwrap();
        let mut acked = Vec::new();
        for s in senders {
            acked.extend(s.await.unwrap());
        }
        assert!(
            acked.len() > 50,
            "the burst was too small to mean anything: {}",
            acked.len()
        );

        // Restart on the same database: it must come up, and hold every acknowledged message.
        let port = free_port();
        let mut server = spawn(db.url(), dir.path(), port).await;
        let store = db.open().await;
        let pos = store.room_position(room.id).await.unwrap();
        let events = store.events(room.id, 0, 10_000).await.unwrap();
        let stored: std::collections::HashSet<String> = events
            .iter()
            .filter_map(|e| e.message.as_ref()?.client_msg_id.clone())
            .collect();
        for id in &acked {
            assert!(
                stored.contains(id),
                "acknowledged message {id} was lost ({})",
                db.url()
            );
        }
        let offsets: Vec<i64> = events.iter().map(|e| e.offset).collect();
        assert_eq!(
            offsets,
            (1..=pos.offset).collect::<Vec<_>>(),
            "offsets stay gap-free"
        );
        eprintln!(
            "{:?}: {} acknowledged, {} stored",
            db.backend(),
            acked.len(),
            events.len()
        );
        store.close().await;
        server.start_kill().unwrap();
        let _ = server.wait().await;
    }
}
