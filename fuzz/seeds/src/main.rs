//! Writes the seed corpora of the fuzz targets into `fuzz/corpus/<target>/`: real messages
//! of every kind (y-websocket ones produced with yrs, the way Yjs clients produce them), plus
//! a few edge cases. Deterministic: fixed client ids, so a re-run writes the same files.

use std::fs;
use std::path::{Path, PathBuf};

use yrs::encoding::write::Write;
use yrs::sync::awareness::{AwarenessUpdate, AwarenessUpdateEntry};
use yrs::sync::{Message, SyncMessage};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{Array, Doc, Map, ReadTxn, StateVector, Text, Transact, XmlFragment, XmlTextPrelim};

fn corpus(target: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../corpus")
        .join(target);
    fs::create_dir_all(&dir).expect("create the corpus directory");
    dir
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    fs::write(corpus(target).join(name), bytes).expect("write a seed");
}

/// A `ywebsocket` input: each frame preceded by its varuint length.
fn frames(frames: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        out.write_buf(f);
    }
    out
}

fn sync(m: SyncMessage) -> Vec<u8> {
    Message::Sync(m).encode_v1()
}

fn awareness(entries: &[(u64, u32, &str)]) -> Vec<u8> {
    let update = AwarenessUpdate {
        clients: entries
            .iter()
            .map(|(id, clock, json)| {
                (
                    yrs::ClientID::new(*id),
                    AwarenessUpdateEntry {
                        clock: *clock,
                        json: (*json).into(),
                    },
                )
            })
            .collect(),
    };
    Message::Awareness(update).encode_v1()
}

fn text_edits(client: u64) -> (Doc, Vec<Vec<u8>>) {
    let doc = Doc::with_client_id(client);
    let text = doc.get_or_insert_text("content");
    let mut updates = Vec::new();
    for (at, s) in [(0, "hello"), (5, " world"), (0, ">> ")] {
        let mut txn = doc.transact_mut();
        text.insert(&mut txn, at, s);
        updates.push(txn.encode_update_v1());
    }
    let mut txn = doc.transact_mut();
    text.remove_range(&mut txn, 3, 5);
    updates.push(txn.encode_update_v1());
    drop(txn);
    (doc, updates)
}

fn ywebsocket() {
    let t = "ywebsocket";
    let (doc, edits) = text_edits(1);
    let full = doc
        .transact()
        .encode_state_as_update_v1(&StateVector::default());
    let sv = doc.transact().state_vector();
    write(
        t,
        "step1-empty",
        &frames(&[sync(SyncMessage::SyncStep1(StateVector::default()))]),
    );
    write(
        t,
        "step1-known",
        &frames(&[sync(SyncMessage::SyncStep1(sv))]),
    );
    write(
        t,
        "step2-text",
        &frames(&[sync(SyncMessage::SyncStep2(full.clone()))]),
    );
    write(
        t,
        "step2-empty",
        &frames(&[sync(SyncMessage::SyncStep2(vec![0, 0]))]),
    );
    let updates: Vec<Vec<u8>> = edits
        .iter()
        .map(|u| sync(SyncMessage::Update(u.clone())))
        .collect();
    write(t, "updates-text", &frames(&updates));
    // Out of order: later edits first (yrs keeps them pending until the first arrives).
    let mut reversed = updates.clone();
    reversed.reverse();
    write(t, "updates-reversed", &frames(&reversed));

    // Other root types, nested types, and the server's text name used as another type.
    let doc = Doc::with_client_id(2);
    let map = doc.get_or_insert_map("meta");
    let list = doc.get_or_insert_array("items");
    let xml = doc.get_or_insert_xml_fragment("prosemirror");
    let update = {
        let mut txn = doc.transact_mut();
        map.insert(&mut txn, "title", "notes");
        map.insert(&mut txn, "n", 42);
        list.insert_range(&mut txn, 0, [1, 2, 3]);
        let nested = list.push_back(&mut txn, yrs::MapPrelim::default());
        nested.insert(&mut txn, "k", true);
        let p = xml.push_back(&mut txn, yrs::XmlElementPrelim::empty("paragraph"));
        p.push_back(&mut txn, XmlTextPrelim::new("x"));
        list.remove(&mut txn, 1);
        txn.encode_update_v1()
    };
    write(
        t,
        "update-types",
        &frames(&[sync(SyncMessage::Update(update))]),
    );
    let doc = Doc::with_client_id(3);
    let content_map = doc.get_or_insert_map("content");
    let update = {
        let mut txn = doc.transact_mut();
        content_map.insert(&mut txn, "not", "text");
        txn.encode_update_v1()
    };
    write(
        t,
        "update-content-as-map",
        &frames(&[sync(SyncMessage::Update(update))]),
    );

    // Two clients editing concurrently, then one deleting the other's text.
    let (a, a_edits) = text_edits(4);
    let (b, b_edits) = text_edits(5);
    let mut both = Vec::new();
    for (x, y) in a_edits.iter().zip(&b_edits) {
        both.push(sync(SyncMessage::Update(x.clone())));
        both.push(sync(SyncMessage::Update(y.clone())));
    }
    let a_state = a
        .transact()
        .encode_state_as_update_v1(&StateVector::default());
    b.transact_mut()
        .apply_update(yrs::Update::decode_v1(&a_state).expect("decodes"))
        .expect("applies");
    let del = {
        let text = b.get_or_insert_text("content");
        let mut txn = b.transact_mut();
        let len = text.len(&txn);
        text.remove_range(&mut txn, 0, len);
        txn.encode_update_v1()
    };
    both.push(sync(SyncMessage::Update(del)));
    write(t, "updates-concurrent", &frames(&both));

    write(
        t,
        "awareness-one",
        &frames(&[awareness(&[(
            7,
            1,
            r##"{"user":{"name":"ann","color":"#f00"},"cursor":null}"##,
        )])]),
    );
    write(
        t,
        "awareness-two-then-null",
        &frames(&[
            awareness(&[
                (7, 1, r#"{"user":{"name":"ann"}}"#),
                (8, 3, r#"{"user":{"name":"bob"}}"#),
            ]),
            awareness(&[(7, 2, "null")]),
            vec![3],
        ]),
    );
    write(t, "heartbeat", &frames(&[vec![1, 1, 0]]));
    write(t, "query-awareness", &frames(&[vec![3]]));
    write(
        t,
        "auth-denied",
        &frames(&[Message::Auth(Some("no".into())).encode_v1()]),
    );
    // A whole session as y-websocket runs it: step 1, step 2, updates, awareness, query.
    let (doc, edits) = text_edits(6);
    let mut session = vec![
        sync(SyncMessage::SyncStep1(StateVector::default())),
        sync(SyncMessage::SyncStep2(
            doc.transact()
                .encode_state_as_update_v1(&StateVector::default()),
        )),
    ];
    session.extend(edits.into_iter().map(|u| sync(SyncMessage::Update(u))));
    session.push(awareness(&[(6, 1, r#"{"user":{"name":"eve"}}"#)]));
    session.push(vec![3]);
    write(t, "session", &frames(&session));
    // Edge cases: truncated varints and bodies, an unknown type, a length past the end.
    write(t, "edge-truncated", &[3, 0, 2, 0x85]);
    write(t, "edge-unknown-type", &frames(&[vec![9, 0]]));
    write(
        t,
        "edge-garbage-update",
        &frames(&[vec![0, 2, 3, 0xff, 0xff, 0xff]]),
    );
    write(
        t,
        "edge-huge-count",
        &frames(&[vec![1, 6, 0xff, 0xff, 0xff, 0xff, 0x0f, 0]]),
    );
}

/// One file per valid command of every method, a multi-command frame, and edge cases.
fn client_command() {
    let t = "client_command";
    let seeds: &[(&str, &str)] = &[
        ("connect", r#"{"id":1,"connect":{"token":"eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiI0MiJ9.sig","data":{"x":1},"name":"js","version":"5.0.0"}}"#),
        ("connect-subs", r#"{"id":1,"connect":{"token":"t","subs":{"news":{"recover":true,"offset":"12","epoch":"abcd"},"chat:1":{"offset":3,"epoch":"e"}}}}"#),
        ("subscribe", r#"{"id":2,"subscribe":{"channel":"news","recover":true,"epoch":"AbCd1234","offset":17,"positioned":true,"recoverable":true,"join_leave":true}}"#),
        ("subscribe-token", r#"{"id":2,"subscribe":{"channel":"private:x#42,43","token":"t","data":null}}"#),
        ("unsubscribe", r#"{"id":3,"unsubscribe":{"channel":"news"}}"#),
        ("publish", r#"{"id":4,"publish":{"channel":"news","data":{"text":"hi","n":[1,2.5,null,true]}}}"#),
        ("presence", r#"{"id":5,"presence":{"channel":"news"}}"#),
        ("presence_stats", r#"{"id":6,"presence_stats":{"channel":"news"}}"#),
        ("history", r#"{"id":7,"history":{"channel":"news","limit":10,"since":{"offset":"5","epoch":"e"},"reverse":true}}"#),
        ("rpc", r#"{"id":8,"rpc":{"method":"chat.send","data":{"room_id":1,"text":"hi","client_msg_id":"c-1"}}}"#),
        ("send", r#"{"send":{"data":{"typing":true}}}"#),
        ("refresh", r#"{"id":9,"refresh":{"token":"new-token"}}"#),
        ("sub_refresh", r#"{"id":10,"sub_refresh":{"channel":"private:x","token":"t"}}"#),
        ("pong", "{}"),
        ("frame-several", "{\"id\":1,\"connect\":{\"token\":\"t\"}}\n{\"id\":2,\"subscribe\":{\"channel\":\"a\"}}\n\n{}\n{\"id\":3,\"publish\":{\"channel\":\"a\",\"data\":\"x\"}}"),
        ("edge-ambiguous", r#"{"id":1,"presence":{"channel":"a"},"history":{"channel":"a"}}"#),
        ("edge-offset-max", r#"{"id":2,"subscribe":{"channel":"a","recover":true,"offset":"18446744073709551615","epoch":"e"}}"#),
        ("edge-escapes", r#"{"id":4294967295,"publish":{"channel":"a\"\u0000\ud83d\ude00","data":"\u2028"}}"#),
        ("edge-deep", r#"{"id":1,"publish":{"channel":"a","data":[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}}"#),
        ("edge-crlf", "{\"id\":1,\"connect\":{\"token\":\"t\"}}\r\n{}\r\n"),
    ];
    for (name, text) in seeds {
        write(t, name, text.as_bytes());
    }
}

/// The README's example config, a minimal one, and a few with environment overrides.
fn config() {
    let t = "config";
    let readme = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
        .expect("read the README");
    let start = readme
        .find("```toml\n")
        .expect("the README has a TOML example")
        + 8;
    let end = start + readme[start..].find("```").expect("closed");
    write(t, "readme-example", readme[start..end].as_bytes());
    write(t, "empty", b"");
    write(t, "namespaces", b"[namespaces.news]\nhistory_size = 10\nhistory_ttl = \"1m\"\nprotected = true\n\n[namespaces.chat]\npresence = false\n");
    write(
        t,
        "env-overrides",
        b"listen = \"127.0.0.1:1\"\n\0CLIENT__PING_INTERVAL=5s\0ALLOWED_ORIGINS=http://a, https://b\0NAMESPACES__NEWS__HISTORY_SIZE=5\0DOCS__MAX_UPDATE_BYTES=2048",
    );
    write(
        t,
        "env-short-names",
        b"\0LISTEN=0.0.0.0:9\0TOKEN_HMAC_SECRET=s\0API_KEY=k\0DATABASE_URL=sqlite::memory:",
    );
    write(
        t,
        "edge-bad-duration",
        b"[client]\nping_interval = \"99999999999999999999y\"\n",
    );
    write(
        t,
        "edge-wrong-type",
        b"namespaces = 5\n\0NAMESPACES__X__PRESENCE=true",
    );
    write(
        t,
        "edge-inline",
        b"channel = { presence = false, history_size = 0 }\naccounts.login_lockout = \"1h 30m\"\n",
    );
}

/// A valid body for every route, and some invalid ones. The first byte picks the route: its
/// index in `switchboard::fuzzing::REST_BODIES`, then `API_METHODS` after those.
fn rest_bodies() {
    let t = "rest_bodies";
    let (_, edits) = text_edits(9);
    let doc_edit = format!(r#"{{"update":"{}"}}"#, base64(&edits[0]));
    // Keep in the order of REST_BODIES and API_METHODS (crates/server/src/fuzzing.rs).
    let rest: &[(&str, &str)] = &[
        (
            "register",
            r#"{"username":"alice","password":"correct horse","display_name":"Alice"}"#,
        ),
        (
            "login",
            r#"{"username":"Alice","password":"correct horse"}"#,
        ),
        ("refresh", r#"{"refresh_token":"q1w2e3r4t5y6u7i8o9p0"}"#),
        ("logout", r#"{"refresh_token":"q1w2e3r4t5y6u7i8o9p0"}"#),
        ("admin-role", r#"{"role":"admin"}"#),
        (
            "me",
            r#"{"display_name":"  Alice B  ","password":{"current":"correct horse","new":"battery staple"}}"#,
        ),
        (
            "room-create",
            r#"{"kind":"public","name":"general","members":[2,3]}"#,
        ),
        ("room-invite", r#"{"user_id":7}"#),
        ("room-kick", r#"{"user_id":7}"#),
        ("room-role", r#"{"role":"moderator"}"#),
        (
            "room-send",
            r#"{"text":"hello @bob","client_msg_id":"c-1","reply_to":12}"#,
        ),
        ("room-mute", r#"{"user_id":7,"until":1900000000000}"#),
        ("doc-create", r#"{"title":"Notes"}"#),
        ("doc-rename", r#"{"title":"  Renamed  "}"#),
        ("doc-share", r#"{"role":"editor"}"#),
        ("doc-edit", doc_edit.as_str()),
        ("doc-version", r#"{"label":"before the rewrite"}"#),
        ("mod-remove", r#"{"reason":"spam"}"#),
        ("mod-restore", ""),
        ("mod-ban", r#"{"until":null,"reason":"abuse"}"#),
        ("notes-read", r#"{"ids":[1,2,3]}"#),
        (
            "site-create",
            r#"{"name":"Shop","allowed_origins":["https://Shop.example.com/","http://localhost:3000"]}"#,
        ),
        (
            "site-patch",
            r#"{"allowed_origins":["https://[::1]:8443"]}"#,
        ),
        (
            "site-token",
            r#"{"external_id":"user@example.com","display_name":"Ann","ttl":3600}"#,
        ),
    ];
    let api: &[(&str, &str)] = &[
        (
            "api-publish",
            r#"{"channel":"news","data":{"text":"hi"},"skip_history":false,"tags":{"k":"v"}}"#,
        ),
        (
            "api-broadcast",
            r#"{"channels":["news","chat:1","nope:x"],"data":[1,2]}"#,
        ),
        (
            "api-subscribe",
            r#"{"user":"42","channel":"news","client":"c"}"#,
        ),
        ("api-unsubscribe", r#"{"user":"42","channel":"news"}"#),
        (
            "api-disconnect",
            r#"{"user":"42","disconnect":{"code":3001,"reason":"bye"}}"#,
        ),
        ("api-presence", r#"{"channel":"news"}"#),
        ("api-presence_stats", r#"{"channel":"notifications:#1"}"#),
        (
            "api-history",
            r#"{"channel":"news","limit":-1,"since":{"offset":3,"epoch":"e"},"reverse":false}"#,
        ),
        ("api-history_remove", r#"{"channel":"news"}"#),
        ("api-channels", r#"{"pattern":"ch*t:?"}"#),
        ("api-info", ""),
    ];
    for (i, (name, body)) in rest.iter().chain(api).enumerate() {
        let mut bytes = vec![i as u8];
        bytes.extend_from_slice(body.as_bytes());
        write(t, name, &bytes);
    }
    let edge: &[(usize, &str, &str)] = &[
        (
            0,
            "edge-register-unicode",
            r#"{"username":"ÄLICE","password":"\u0000\u0000\u0000\u0000\u0000\u0000\u0000\u0000","display_name":" \u200b "}"#,
        ),
        (
            6,
            "edge-room-direct",
            r#"{"kind":"direct","members":[9223372036854775807]}"#,
        ),
        (15, "edge-doc-edit-text", r#"{"text":"appended"}"#),
        (
            21,
            "edge-site-bad-origin",
            r#"{"name":"\u0007","allowed_origins":["ftp://x","https://a/b"]}"#,
        ),
        (
            23,
            "edge-site-token-long",
            r#"{"external_id":"ééééééééééééééééééééééééééééééééééééééééé!","ttl":0}"#,
        ),
        (24 + 9, "edge-api-glob", r#"{"pattern":"***?*?**"}"#),
    ];
    for (i, name, body) in edge {
        let mut bytes = vec![*i as u8];
        bytes.extend_from_slice(body.as_bytes());
        write(t, name, &bytes);
    }
}

/// Standard base64 with padding (what `POST .../updates` expects in `update`).
fn base64(bytes: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn main() {
    ywebsocket();
    client_command();
    config();
    rest_bodies();
    eprintln!("seed corpora written under {}", corpus("").display());
}
