//! Accounts over HTTP, on SQLite and PostgreSQL: register, login, refresh rotation with reuse
//! detection, logout, profile changes, login rate limits, roles and the audit log, the
//! `admin create` command, and the OpenAPI document's coverage of every `/v1` route.
//!
//! Most servers here use `password_hash_cost = "test"` (cheap argon2id) to stay fast; the
//! first test and the CLI test use the real parameters.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{http, RawClient};
use reqwest::StatusCode;
use serde_json::{json, Value};
use switchboard::testing::TestServer;
use switchboard_store::testing::TestDatabase;
use switchboard_store::{NewUser, UserRole};

const FAST: &str = "[accounts]\npassword_hash_cost = \"test\"\n";

/// The databases to run on: SQLite always, PostgreSQL when it is there (required under CI).
async fn databases() -> Vec<TestDatabase> {
    let mut dbs = vec![TestDatabase::sqlite()];
    match TestDatabase::postgres().await {
        Some(db) => dbs.push(db),
        None if std::env::var_os("CI").is_some() => {
            panic!("PostgreSQL is required under CI (127.0.0.1:5432, database test)")
        }
        None => eprintln!("\n*** SKIP PostgreSQL half: no server at 127.0.0.1:5432 ***\n"),
    }
    dbs
}

/// A request to `path` with an optional bearer token and JSON body; returns (status, body).
async fn call(
    server: &TestServer,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = http().request(method, format!("{}{path}", server.http_url()));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status();
    let text = resp.text().await.expect("body");
    let value = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    (status, value)
}

async fn register(server: &TestServer, username: &str, password: &str) -> Value {
    let (status, body) = call(
        server,
        "POST",
        "/v1/auth/register",
        None,
        Some(json!({"username": username, "password": password, "display_name": username})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "register {username}: {body}");
    body
}

async fn login(server: &TestServer, username: &str, password: &str) -> (StatusCode, Value) {
    call(
        server,
        "POST",
        "/v1/auth/login",
        None,
        Some(json!({"username": username, "password": password})),
    )
    .await
}

/// Logs in and returns the token pair, panicking on failure.
async fn tokens(server: &TestServer, username: &str, password: &str) -> (String, String) {
    let (status, body) = login(server, username, password).await;
    assert_eq!(status, StatusCode::OK, "login {username}: {body}");
    (
        body["access_token"].as_str().unwrap().to_string(),
        body["refresh_token"].as_str().unwrap().to_string(),
    )
}

async fn refresh(server: &TestServer, refresh_token: &str) -> (StatusCode, Value) {
    call(
        server,
        "POST",
        "/v1/auth/refresh",
        None,
        Some(json!({"refresh_token": refresh_token})),
    )
    .await
}

/// An admin created straight in the store; returns its access token.
async fn admin(server: &TestServer, username: &str) -> String {
    let node = server.node();
    let password_hash = node
        .accounts
        .hasher
        .hash("admin-password".into())
        .await
        .unwrap();
    node.store
        .create_user(NewUser {
            username: username.into(),
            password_hash,
            display_name: "Admin".into(),
            role: UserRole::Admin,
        })
        .await
        .unwrap();
    tokens(server, username, "admin-password").await.0
}

async fn audit(server: &TestServer, admin_token: &str) -> Vec<Value> {
    let (status, body) = call(
        server,
        "GET",
        "/v1/admin/audit?limit=1000",
        Some(admin_token),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["entries"].as_array().unwrap().clone()
}

fn message(body: &Value) -> &str {
    body["error"]["message"].as_str().unwrap_or("")
}

#[tokio::test]
async fn register_login_me_patch_and_connect() {
    for db in databases().await {
        // Real argon2id parameters here, to prove them end to end.
        let server = TestServer::start_on(db.url(), "").await;
        let user = register(&server, "Alice", "correct horse").await;
        assert_eq!(user["username"], "alice", "usernames are lower-cased");
        assert_eq!(user["display_name"], "Alice");
        assert_eq!(user["role"], "user");
        assert!(user.get("password_hash").is_none(), "{user}");
        assert!(!user.to_string().contains("argon2"), "{user}");
        let id = user["id"].as_i64().unwrap();

        let (status, pair) = login(&server, "ALICE", "correct horse").await;
        assert_eq!(status, StatusCode::OK, "{pair}");
        assert_eq!(pair["expires_in"], 900);
        assert_eq!(pair["token_type"], "Bearer");
        assert_eq!(pair["user"]["id"], id);
        let access = pair["access_token"].as_str().unwrap();
        let refresh_token = pair["refresh_token"].as_str().unwrap();
        assert_eq!(refresh_token.len(), 43, "32 bytes, base64url");

        // The access token is a connection token.
        let mut ws = RawClient::open(&server).await;
        let reply = ws.call(json!({"connect": {"token": access}})).await;
        assert!(reply.get("connect").is_some(), "connect failed: {reply}");
        ws.close().await;

        let (status, me) = call(&server, "GET", "/v1/users/me", Some(access), None).await;
        assert_eq!((status, me["id"].as_i64()), (StatusCode::OK, Some(id)));
        let (status, _) = call(&server, "GET", "/v1/users/me", None, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, body) = call(&server, "GET", "/v1/users/me", Some("junk"), None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");

        let patch = |body: Value| call(&server, "PATCH", "/v1/users/me", Some(access), Some(body));
        let (status, me) = patch(json!({"display_name": "  Alice A.  "})).await;
        assert_eq!(
            (status, me["display_name"].as_str()),
            (StatusCode::OK, Some("Alice A."))
        );
        let (status, body) = patch(json!({"display_name": ""})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(message(&body).contains("display_name"), "{body}");
        let (status, body) =
            patch(json!({"password": {"current": "wrong horse", "new": "battery staple"}})).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        let (status, body) =
            patch(json!({"password": {"current": "correct horse", "new": "short"}})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(message(&body).contains("at least 8"), "{body}");
        let (status, body) =
            patch(json!({"password": {"current": "correct horse", "new": "battery staple"}})).await;
        assert_eq!(status, StatusCode::OK, "{body}");

        // The new password works, the old one does not, and the old session was signed out.
        assert_eq!(
            login(&server, "alice", "correct horse").await.0,
            StatusCode::UNAUTHORIZED
        );
        tokens(&server, "alice", "battery staple").await;
        assert_eq!(
            refresh(&server, refresh_token).await.0,
            StatusCode::UNAUTHORIZED
        );
        server.shutdown().await;
    }
}

#[tokio::test]
async fn app_minted_tokens_still_connect_and_call_the_api() {
    let server = TestServer::start_with(FAST).await;
    let user = register(&server, "bob", "password1").await;
    // A token minted with the shared secret (as `switchboard token` does) for that user.
    let token = server.token(&user["id"].to_string(), Some(60));
    let mut ws = RawClient::open(&server).await;
    let reply = ws.call(json!({"connect": {"token": &token}})).await;
    assert!(reply.get("connect").is_some(), "{reply}");
    ws.close().await;
    let (status, me) = call(&server, "GET", "/v1/users/me", Some(&token), None).await;
    assert_eq!((status, &me["username"]), (StatusCode::OK, &json!("bob")));
    // Users of an app that mints its own tokens need no account here at all.
    RawClient::connect(&server, "external-user-7")
        .await
        .close()
        .await;
}

#[tokio::test]
async fn refresh_rotates_and_reuse_revokes_every_session() {
    for db in databases().await {
        let server = TestServer::start_on(db.url(), FAST).await;
        register(&server, "carol", "password1").await;
        let (_, first) = tokens(&server, "carol", "password1").await;
        let (_, other_session) = tokens(&server, "carol", "password1").await;

        let (status, pair) = refresh(&server, &first).await;
        assert_eq!(status, StatusCode::OK, "{pair}");
        let second = pair["refresh_token"].as_str().unwrap().to_string();
        assert_ne!(second, first);
        assert_eq!(pair["user"]["username"], "carol");
        let (status, _) = call(
            &server,
            "GET",
            "/v1/users/me",
            pair["access_token"].as_str(),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK);

        // Unknown tokens are refused.
        let (status, body) = refresh(&server, "not-a-token").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");

        // The rotated token used again: theft. Every refresh token of carol is revoked.
        let (status, body) = refresh(&server, &first).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert!(message(&body).contains("already used"), "{body}");
        assert_eq!(refresh(&server, &second).await.0, StatusCode::UNAUTHORIZED);
        assert_eq!(
            refresh(&server, &other_session).await.0,
            StatusCode::UNAUTHORIZED
        );
        // Logging in again starts a fresh chain.
        let (_, fresh) = tokens(&server, "carol", "password1").await;
        assert_eq!(refresh(&server, &fresh).await.0, StatusCode::OK);

        let admin_token = admin(&server, "root").await;
        let entries = audit(&server, &admin_token).await;
        assert!(
            entries.iter().any(|e| e["action"] == "refresh_token_reuse"),
            "{entries:?}"
        );
        server.shutdown().await;
    }
}

#[tokio::test]
async fn expired_tokens_are_refused() {
    let server = TestServer::start_with(
        "[accounts]\npassword_hash_cost = \"test\"\naccess_token_ttl = \"1s\"\nrefresh_token_ttl = \"1s\"\n",
    )
    .await;
    register(&server, "dave", "password1").await;
    let (status, pair) = login(&server, "dave", "password1").await;
    assert_eq!((status, &pair["expires_in"]), (StatusCode::OK, &json!(1)));
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (status, body) = call(
        &server,
        "GET",
        "/v1/users/me",
        pair["access_token"].as_str(),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(message(&body).contains("expired"), "{body}");
    let (status, body) = refresh(&server, pair["refresh_token"].as_str().unwrap()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(message(&body).contains("expired"), "{body}");
}

#[tokio::test]
async fn logout_revokes_the_refresh_token() {
    for db in databases().await {
        let server = TestServer::start_on(db.url(), FAST).await;
        register(&server, "erin", "password1").await;
        register(&server, "frank", "password1").await;
        let (access, refresh_token) = tokens(&server, "erin", "password1").await;
        let (frank_access, _) = tokens(&server, "frank", "password1").await;
        let body = json!({"refresh_token": &refresh_token});

        let (status, _) = call(&server, "POST", "/v1/auth/logout", None, Some(body.clone())).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        // Someone else's token is left alone.
        let (status, _) = call(
            &server,
            "POST",
            "/v1/auth/logout",
            Some(&frank_access),
            Some(body.clone()),
        )
        .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (status, pair) = refresh(&server, &refresh_token).await;
        assert_eq!(status, StatusCode::OK, "{pair}");
        let refresh_token = pair["refresh_token"].as_str().unwrap();

        let body = json!({"refresh_token": refresh_token});
        let logout = || {
            call(
                &server,
                "POST",
                "/v1/auth/logout",
                Some(&access),
                Some(body.clone()),
            )
        };
        let (status, body_out) = logout().await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{body_out}");
        assert_eq!(body_out, Value::Null);
        // Idempotent.
        assert_eq!(logout().await.0, StatusCode::NO_CONTENT);
        assert_eq!(
            refresh(&server, refresh_token).await.0,
            StatusCode::UNAUTHORIZED
        );
        server.shutdown().await;
    }
}

#[tokio::test]
async fn wrong_password_is_401_and_audited_without_the_password() {
    for db in databases().await {
        let server = TestServer::start_on(db.url(), FAST).await;
        let user = register(&server, "grace", "password1").await;
        let (status, wrong) = login(&server, "grace", "hunter2-secret").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{wrong}");
        let (status, unknown) = login(&server, "nobody", "hunter2-secret").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{unknown}");
        assert_eq!(wrong, unknown, "the answer does not tell which was wrong");
        assert_eq!(wrong["error"]["code"], "unauthorized");
        tokens(&server, "grace", "password1").await;

        let admin_token = admin(&server, "root").await;
        let entries = audit(&server, &admin_token).await;
        let text = serde_json::to_string(&entries).unwrap();
        assert!(
            !text.contains("hunter2"),
            "a password reached the audit log"
        );
        let failed: Vec<&Value> = entries
            .iter()
            .filter(|e| e["action"] == "login_failed")
            .collect();
        assert_eq!(failed.len(), 2, "{entries:?}");
        let by_reason = |r: &str| {
            failed
                .iter()
                .find(|e| e["detail"]["reason"] == r)
                .unwrap_or_else(|| panic!("no {r} entry in {failed:?}"))
        };
        let e = by_reason("wrong_password");
        assert_eq!(e["target"], format!("user:{}", user["id"]));
        assert_eq!(e["detail"]["ip"], "127.0.0.1");
        assert_eq!(by_reason("unknown_user")["target"], "username:nobody");
        let logins: Vec<&Value> = entries.iter().filter(|e| e["action"] == "login").collect();
        assert_eq!(logins.len(), 2, "grace and root: {entries:?}");
        assert_eq!(logins[1]["actor_user_id"], user["id"]);
        server.shutdown().await;
    }
}

#[tokio::test]
async fn lockout_gives_429_even_with_the_right_password() {
    for db in databases().await {
        let server = TestServer::start_on(
            db.url(),
            "[accounts]\npassword_hash_cost = \"test\"\nlogin_max_failures = 3\nlogin_max_failures_per_ip = 5\nlogin_lockout = \"3s\"\n",
        )
        .await;
        for name in ["heidi", "ivan", "judy"] {
            register(&server, name, "password1").await;
        }
        // Per account: the third failure locks heidi.
        for _ in 0..3 {
            assert_eq!(
                login(&server, "heidi", "nope-nope").await.0,
                StatusCode::UNAUTHORIZED
            );
        }
        let resp = http()
            .post(format!("{}/v1/auth/login", server.http_url()))
            .json(&json!({"username": "heidi", "password": "password1"}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        let retry: u64 = resp.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=3).contains(&retry), "Retry-After {retry}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], "too_many_requests");
        // Other accounts are not locked.
        tokens(&server, "ivan", "password1").await;

        // Per address: 5 failures from 127.0.0.1 across accounts lock the address.
        assert_eq!(
            login(&server, "ivan", "nope-nope").await.0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            login(&server, "ghost", "nope-nope").await.0,
            StatusCode::UNAUTHORIZED
        );
        let (status, body) = login(&server, "judy", "password1").await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");

        tokio::time::sleep(Duration::from_millis(3100)).await;
        tokens(&server, "heidi", "password1").await;
        tokens(&server, "judy", "password1").await;

        let admin_token = admin(&server, "root").await;
        let entries = audit(&server, &admin_token).await;
        let locks: Vec<&Value> = entries
            .iter()
            .filter_map(|e| e["detail"].get("locked_out"))
            .collect();
        assert_eq!(locks, [&json!("ip"), &json!("account")], "{entries:?}");
        server.shutdown().await;
    }
}

#[tokio::test]
async fn a_parallel_burst_gets_no_more_guesses_than_a_sequence() {
    let server = TestServer::start_with(
        "[accounts]\npassword_hash_cost = \"test\"\nlogin_max_failures = 3\nlogin_max_failures_per_ip = 100\n",
    )
    .await;
    register(&server, "kim", "password1").await;
    let burst = (0..12).map(|i| {
        let server = &server;
        async move { login(server, "kim", &format!("guess-{i:04}")).await.0 }
    });
    let statuses = futures_util::future::join_all(burst).await;
    let count = |s: StatusCode| statuses.iter().filter(|&&x| x == s).count();
    assert_eq!(count(StatusCode::UNAUTHORIZED), 3, "{statuses:?}");
    assert_eq!(count(StatusCode::TOO_MANY_REQUESTS), 9, "{statuses:?}");
}

#[tokio::test]
async fn bad_input_is_400_with_a_message() {
    let server = TestServer::start_with(FAST).await;
    let cases = [
        (
            json!({"username": "ab", "password": "password1", "display_name": "A"}),
            "username must be 3 to 32",
        ),
        (
            json!({"username": "a".repeat(33), "password": "password1", "display_name": "A"}),
            "username must be 3 to 32",
        ),
        (
            json!({"username": "bad name", "password": "password1", "display_name": "A"}),
            "username may contain only",
        ),
        (
            json!({"username": "<script>", "password": "password1", "display_name": "A"}),
            "username may contain only",
        ),
        (
            json!({"username": "okname", "password": "short", "display_name": "A"}),
            "password must be at least 8",
        ),
        (
            json!({"username": "okname", "password": "password1", "display_name": " "}),
            "display_name must be 1 to 64",
        ),
        (
            json!({"username": "okname", "password": "password1", "display_name": "x".repeat(65)}),
            "display_name must be 1 to 64",
        ),
        (
            json!({"username": "okname", "password": "password1"}),
            "display_name",
        ),
        (
            json!({"username": "okname", "password": "password1", "display_name": "A", "role": "admin"}),
            "unknown field `role`",
        ),
        (
            json!({"username": 7, "password": "password1", "display_name": "A"}),
            "username",
        ),
    ];
    for (body, expected) in cases {
        let (status, reply) = call(
            &server,
            "POST",
            "/v1/auth/register",
            None,
            Some(body.clone()),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body} -> {reply}");
        assert_eq!(reply["error"]["code"], "bad_request", "{reply}");
        assert!(message(&reply).contains(expected), "{body}: {reply}");
    }
    // Not JSON at all, and no JSON content type.
    for (content_type, body) in [("application/json", "{not json"), ("text/plain", "{}")] {
        let resp = http()
            .post(format!("{}/v1/auth/register", server.http_url()))
            .header("Content-Type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        let reply: Value = resp.json().await.unwrap();
        assert!(!message(&reply).is_empty(), "{reply}");
    }
    // Audit paging limits, as an admin.
    let admin_token = admin(&server, "root").await;
    for query in ["limit=0", "limit=1001", "limit=lots", "before=x"] {
        let (status, reply) = call(
            &server,
            "GET",
            &format!("/v1/admin/audit?{query}"),
            Some(&admin_token),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {reply}");
        assert!(!message(&reply).is_empty(), "{reply}");
    }
}

#[tokio::test]
async fn duplicate_usernames_are_409() {
    for db in databases().await {
        let server = TestServer::start_on(db.url(), FAST).await;
        register(&server, "mallory", "password1").await;
        for name in ["mallory", "Mallory"] {
            let (status, body) = call(
                &server,
                "POST",
                "/v1/auth/register",
                None,
                Some(json!({"username": name, "password": "password2", "display_name": "M"})),
            )
            .await;
            assert_eq!(status, StatusCode::CONFLICT, "{body}");
            assert_eq!(body["error"]["code"], "conflict");
            assert!(message(&body).contains("taken"), "{body}");
        }
        server.shutdown().await;
    }
}

/// Runs `switchboard admin create` against `database`, feeding `password` on stdin.
fn admin_create(
    database: &str,
    data_dir: &std::path::Path,
    username: &str,
    password: &str,
) -> std::process::Output {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args([
            "admin",
            "create",
            "--username",
            username,
            "--password-stdin",
        ])
        .args(["--display-name", "The Admin", "--database", database])
        .arg("--data-dir")
        .arg(data_dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run switchboard");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(password.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[tokio::test]
async fn admin_create_then_roles_and_audit() {
    for db in databases().await {
        let dir = tempfile::tempdir().unwrap();
        let out = admin_create(db.url(), dir.path(), "Root", "admin pass 1\n");
        assert!(
            out.status.success(),
            "admin create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("created admin root"));
        // Taken username, short password: refused with a message.
        let out = admin_create(db.url(), dir.path(), "root", "another pass\n");
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("taken"),
            "{out:?}"
        );
        let out = admin_create(db.url(), dir.path(), "root2", "short\n");
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("at least 8"),
            "{out:?}"
        );

        let server = TestServer::start_on(db.url(), FAST).await;
        // The trailing newline is not part of the password.
        let (root, _) = tokens(&server, "root", "admin pass 1").await;
        let (status, me) = call(&server, "GET", "/v1/users/me", Some(&root), None).await;
        assert_eq!((status, &me["role"]), (StatusCode::OK, &json!("admin")));
        assert_eq!(me["display_name"], "The Admin");

        let user = register(&server, "oscar", "password1").await;
        let uid = user["id"].as_i64().unwrap();
        let (oscar, _) = tokens(&server, "oscar", "password1").await;
        let (status, body) = call(&server, "GET", "/v1/admin/audit", Some(&oscar), None).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        assert_eq!(body["error"]["code"], "forbidden");
        let (status, _) = call(&server, "GET", "/v1/admin/audit", None, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let role = |token: String, id: i64, role: Value| {
            let server = &server;
            async move {
                call(
                    server,
                    "PATCH",
                    &format!("/v1/admin/users/{id}"),
                    Some(&token),
                    Some(json!({"role": role})),
                )
                .await
            }
        };
        assert_eq!(
            role(oscar.clone(), uid, json!("admin")).await.0,
            StatusCode::FORBIDDEN
        );
        let (status, body) = role(root.clone(), uid, json!("superuser")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(
            role(root.clone(), 999_999, json!("admin")).await.0,
            StatusCode::NOT_FOUND
        );
        let root_id = me["id"].as_i64().unwrap();
        assert_eq!(
            role(root.clone(), root_id, json!("user")).await.0,
            StatusCode::CONFLICT
        );
        let (status, body) = role(root.clone(), uid, json!("admin")).await;
        assert_eq!(
            (status, &body["role"]),
            (StatusCode::OK, &json!("admin")),
            "{body}"
        );
        // Roles are read fresh: oscar's existing token now reaches admin routes.
        let (status, _) = call(&server, "GET", "/v1/admin/audit", Some(&oscar), None).await;
        assert_eq!(status, StatusCode::OK);

        let entries = audit(&server, &root).await;
        let actions: Vec<&str> = entries
            .iter()
            .map(|e| e["action"].as_str().unwrap())
            .collect();
        assert_eq!(
            actions,
            ["role_change", "login", "login", "admin_created"],
            "newest first"
        );
        let change = &entries[0];
        assert_eq!(change["actor_user_id"], root_id);
        assert_eq!(change["target"], format!("user:{uid}"));
        assert_eq!(change["detail"], json!({"from": "user", "to": "admin"}));

        // Paging: one at a time, following next_before.
        let mut seen = Vec::new();
        let mut path = "/v1/admin/audit?limit=1".to_string();
        loop {
            let (status, page) = call(&server, "GET", &path, Some(&root), None).await;
            assert_eq!(status, StatusCode::OK, "{page}");
            seen.extend(
                page["entries"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| e["id"].clone()),
            );
            match page["next_before"].as_i64() {
                Some(b) => path = format!("/v1/admin/audit?limit=1&before={b}"),
                None => break,
            }
        }
        let all: Vec<Value> = entries.iter().map(|e| e["id"].clone()).collect();
        assert_eq!(seen, all);
        server.shutdown().await;
    }
}

/// The `/v1` routes the router has, as (method, path) pairs, found by listing the router's
/// paths and probing each with every method: 405 means "not this method", and a fallback
/// marks paths that do not match at all.
async fn registered_routes(server: &TestServer) -> BTreeSet<(String, String)> {
    use tower::ServiceExt;
    const UNMATCHED: axum::http::StatusCode = axum::http::StatusCode::IM_A_TEAPOT;
    let router =
        || switchboard::server::router(server.node().clone()).fallback(|| async { UNMATCHED });
    // The router's Debug output lists its paths (axum keeps no public route table).
    let listing = format!("{:?}", router());
    let paths: BTreeSet<String> = listing
        .split('"')
        .filter(|s| s.starts_with("/v1/") || *s == "/v1")
        .map(str::to_string)
        .collect();
    assert!(
        paths.contains("/v1/auth/login"),
        "cannot list the router's paths (axum's Debug output changed?): {listing}"
    );
    let mut found = BTreeSet::new();
    for path in paths {
        let concrete: String = path
            .split('/')
            .map(|seg| if seg.starts_with('{') { "1" } else { seg })
            .collect::<Vec<_>>()
            .join("/");
        for method in ["GET", "POST", "PUT", "PATCH", "DELETE"] {
            let req = axum::http::Request::builder()
                .method(method)
                .uri(&concrete)
                .body(axum::body::Body::empty())
                .unwrap();
            let status = router().oneshot(req).await.unwrap().status();
            assert_ne!(
                status, UNMATCHED,
                "{path} is listed but does not match {concrete}"
            );
            if status != axum::http::StatusCode::METHOD_NOT_ALLOWED {
                found.insert((method.to_ascii_lowercase(), path.clone()));
            }
        }
    }
    found
}

#[tokio::test]
async fn openapi_documents_every_v1_route() {
    let server = TestServer::start_with(FAST).await;
    let (status, doc) = call(&server, "GET", "/v1/openapi.json", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(doc.is_object(), "not JSON: {doc}");
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    assert!(doc["info"]["title"].is_string());
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            assert!(op["responses"].is_object(), "{method} {path}");
            documented.insert((method.clone(), path.clone()));
        }
    }
    let registered = registered_routes(&server).await;
    let missing: Vec<_> = registered.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "routes missing from the OpenAPI document (add them to rest::openapi::OPS): {missing:?}"
    );
    let stale: Vec<_> = documented.difference(&registered).collect();
    assert!(
        stale.is_empty(),
        "documented routes that do not exist: {stale:?}"
    );
    for route in [
        ("post", "/v1/auth/register"),
        ("post", "/v1/auth/login"),
        ("post", "/v1/auth/refresh"),
        ("post", "/v1/auth/logout"),
        ("get", "/v1/users/me"),
        ("patch", "/v1/users/me"),
        ("patch", "/v1/admin/users/{id}"),
        ("get", "/v1/admin/audit"),
        ("get", "/v1/openapi.json"),
    ] {
        assert!(
            documented.contains(&(route.0.to_string(), route.1.to_string())),
            "{route:?}"
        );
    }
}
