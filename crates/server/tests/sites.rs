//! Multi-site on SQLite and PostgreSQL: admins create sites (the key is shown once), each
//! site's backend mints tokens for its users with its site key (a wrong key or another
//! site's key is refused), users of two sites and an ordinary account share a room and
//! exchange messages over WebSocket, site origins are allowed at upgrade (and unknown ones
//! refused once any site lists an origin), site users cannot log in with a password, and
//! the admin actions are audited.

mod common;

use common::{connect, databases, http};
use serde_json::{json, Value};
use switchboard::testing::TestServer;
use switchboard_store::testing::TestDatabase;
use switchboard_store::{NewUser, UserRole};

/// A request with optional bearer token and extra headers; returns (status, JSON body).
async fn call(
    server: &TestServer,
    method: &str,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (u16, Value) {
    let url = format!("{}{path}", server.http_url());
    let mut req = match method {
        "GET" => http().get(url),
        "PATCH" => http().patch(url),
        _ => http().post(url),
    };
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn login(server: &TestServer, username: &str, password: &str) -> (u16, Value) {
    let body = json!({"username": username, "password": password});
    call(server, "POST", "/v1/auth/login", None, &[], Some(body)).await
}

/// An admin created straight in the store; returns its access token.
async fn admin(server: &TestServer) -> String {
    let node = server.node();
    let password_hash = node
        .accounts
        .hasher
        .hash("admin-password".into())
        .await
        .unwrap();
    node.store
        .create_user(NewUser {
            username: "root".into(),
            password_hash,
            display_name: "Admin".into(),
            role: UserRole::Admin,
        })
        .await
        .unwrap();
    let (s, body) = login(server, "root", "admin-password").await;
    assert_eq!(s, 200, "{body}");
    body["access_token"].as_str().unwrap().to_string()
}

/// Mints a token for `external_id` at site `site` with `key`; returns (status, body).
async fn mint(server: &TestServer, site: i64, key: &str, body: Value) -> (u16, Value) {
    let path = format!("/v1/sites/{site}/tokens");
    call(
        server,
        "POST",
        &path,
        None,
        &[("X-Site-Key", key)],
        Some(body),
    )
    .await
}

/// The status of a WebSocket upgrade sent with `origin` (101 when accepted).
async fn upgrade_status(server: &TestServer, origin: Option<&str>) -> u16 {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = server.ws_url().into_client_request().unwrap();
    if let Some(o) = origin {
        request.headers_mut().insert("Origin", o.parse().unwrap());
    }
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    match tokio_tungstenite::client_async(request, tcp).await {
        Ok((_, resp)) => resp.status().as_u16(),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("upgrade: {e}"),
    }
}

#[tokio::test]
async fn sites_mint_tokens_share_rooms_and_allow_their_origins() {
    for db in databases().await {
        let server = TestServer::start_on(db.url(), "").await;
        let admin_token = admin(&server).await;

        // Before any site lists an origin, an empty global list allows any (quick start).
        assert_eq!(
            upgrade_status(&server, Some("https://any.example")).await,
            101
        );

        // Admins create sites; the key is shown once; others may not.
        let (s, a) = call(
            &server,
            "POST",
            "/v1/admin/sites",
            Some(&admin_token),
            &[],
            Some(json!({"name": "Shop", "allowed_origins": ["https://Shop.example/"]})),
        )
        .await;
        assert_eq!(s, 201, "{a}");
        let a_id = a["site"]["id"].as_i64().unwrap();
        let a_key = a["site_key"].as_str().unwrap().to_string();
        assert!(a_key.starts_with("sk_"), "{a}");
        assert_eq!(
            a["site"]["allowed_origins"],
            json!(["https://shop.example"])
        );
        assert!(a["site"].get("key_hash").is_none(), "{a}");
        let (s, b) = call(
            &server,
            "POST",
            "/v1/admin/sites",
            Some(&admin_token),
            &[],
            Some(json!({"name": "Game", "allowed_origins": ["https://game.example"]})),
        )
        .await;
        assert_eq!(s, 201, "{b}");
        let b_id = b["site"]["id"].as_i64().unwrap();
        let b_key = b["site_key"].as_str().unwrap().to_string();
        assert_ne!(a_key, b_key);
        let (s, body) = call(
            &server,
            "POST",
            "/v1/admin/sites",
            Some(&admin_token),
            &[],
            Some(json!({"name": "Bad", "allowed_origins": ["shop.example/path"]})),
        )
        .await;
        assert_eq!(s, 400, "{body}");
        let (s, list) = call(
            &server,
            "GET",
            "/v1/admin/sites",
            Some(&admin_token),
            &[],
            None,
        )
        .await;
        assert_eq!(s, 200, "{list}");
        let sites = list["sites"].as_array().unwrap();
        assert_eq!(sites.len(), 2);
        assert!(!list.to_string().contains("sk_"), "{list}");

        // Each site's backend mints tokens for its users with its own key.
        let (s, ta) = mint(
            &server,
            a_id,
            &a_key,
            json!({"external_id": "42", "display_name": "Ann"}),
        )
        .await;
        assert_eq!(s, 200, "{ta}");
        let ua = ta["user"]["id"].as_i64().unwrap();
        assert_eq!(ta["user"]["username"], format!("s{a_id}_42"));
        assert_eq!(ta["user"]["display_name"], "Ann");
        assert_eq!(
            (ta["site_id"].as_i64(), ta["external_id"].as_str()),
            (Some(a_id), Some("42"))
        );
        // The same external id at another site is another user.
        let (s, tb) = mint(
            &server,
            b_id,
            &b_key,
            json!({"external_id": "42", "ttl": 60}),
        )
        .await;
        assert_eq!(s, 200, "{tb}");
        let ub = tb["user"]["id"].as_i64().unwrap();
        assert_ne!(ua, ub);
        assert_eq!(tb["expires_in"], 60);
        // Again: the same user, not a new one.
        let (s, again) = mint(&server, a_id, &a_key, json!({"external_id": "42"})).await;
        assert_eq!(s, 200, "{again}");
        assert_eq!(again["user"]["id"], ua);
        assert_eq!(again["user"]["display_name"], "Ann");
        // Wrong key, another site's key, no key, an unknown site: 401.
        for (site, key) in [
            (a_id, "sk_wrong"),
            (a_id, b_key.as_str()),
            (b_id, a_key.as_str()),
            (b_id + 100, b_key.as_str()),
        ] {
            let (s, body) = mint(&server, site, key, json!({"external_id": "7"})).await;
            assert_eq!(s, 401, "site {site}: {body}");
            assert!(body["error"]["message"].is_string(), "{body}");
        }
        let (s, _) = call(
            &server,
            "POST",
            &format!("/v1/sites/{a_id}/tokens"),
            None,
            &[],
            Some(json!({"external_id": "7"})),
        )
        .await;
        assert_eq!(s, 401);
        let (s, body) = mint(&server, a_id, &a_key, json!({"external_id": ""})).await;
        assert_eq!(s, 400, "{body}");
        let (s, body) = mint(&server, a_id, &a_key, json!({"external_id": "7", "ttl": 0})).await;
        assert_eq!(s, 400, "{body}");
        assert!(server
            .node()
            .store
            .site_user(a_id, "7")
            .await
            .unwrap()
            .is_none());

        // A site token is an ordinary access token for the REST API.
        let a_token = ta["access_token"].as_str().unwrap().to_string();
        let b_token = tb["access_token"].as_str().unwrap().to_string();
        let (s, me) = call(&server, "GET", "/v1/users/me", Some(&b_token), &[], None).await;
        assert_eq!((s, me["id"].as_i64()), (200, Some(ub)), "{me}");

        // A regular account.
        let (s, body) = call(
            &server,
            "POST",
            "/v1/auth/register",
            None,
            &[],
            Some(
                json!({"username": "carol", "password": "carol-password", "display_name": "Carol"}),
            ),
        )
        .await;
        assert_eq!(s, 201, "{body}");
        let uc = body["id"].as_i64().unwrap();
        let (s, body) = login(&server, "carol", "carol-password").await;
        assert_eq!(s, 200, "{body}");
        let c_token = body["access_token"].as_str().unwrap().to_string();

        // Site users cannot log in with a password, whatever they try.
        for password in ["", "!site-user", "password123"] {
            let (s, body) = login(&server, &format!("s{a_id}_42"), password).await;
            assert_eq!(s, 401, "{body}");
        }

        // Users of both sites and the regular account share a private room.
        let (s, room) = call(
            &server,
            "POST",
            "/v1/rooms",
            Some(&c_token),
            &[],
            Some(json!({"kind": "private", "name": "mixed", "members": [ua, ub]})),
        )
        .await;
        assert_eq!(s, 201, "{room}");
        let channel = format!("chat:{}", room["id"].as_i64().unwrap());
        let mut clients = Vec::new();
        for token in [&a_token, &b_token, &c_token] {
            let mut c = connect(&server, token).await;
            let r = c.call(json!({"subscribe": {"channel": channel}})).await;
            assert!(r.get("subscribe").is_some(), "{r}");
            clients.push(c);
        }
        for (i, sender) in [(0usize, ua), (1, ub), (2, uc)] {
            let r = clients[i]
                .call(json!({"publish": {"channel": channel, "data": {"text": format!("hello from {sender}"), "client_msg_id": "m1"}}}))
                .await;
            assert!(r.get("publish").is_some(), "{r}");
            for c in clients.iter_mut() {
                let p = c.publication(&channel).await;
                assert_eq!(
                    p["data"]["message"]["text"],
                    format!("hello from {sender}"),
                    "{p}"
                );
                assert_eq!(p["data"]["message"]["user_id"], sender, "{p}");
                assert_eq!(p["offset"], i as u64 + 1, "{p}");
            }
        }
        for c in clients {
            c.close().await;
        }

        // Origins: a site's are accepted, unknown ones refused now that sites list origins;
        // a client without Origin (not a browser) is always accepted.
        assert_eq!(
            upgrade_status(&server, Some("https://shop.example")).await,
            101
        );
        assert_eq!(
            upgrade_status(&server, Some("https://GAME.example")).await,
            101
        );
        assert_eq!(
            upgrade_status(&server, Some("https://any.example")).await,
            403
        );
        assert_eq!(upgrade_status(&server, None).await, 101);

        // Changing a site's origins applies at once.
        let (s, body) = call(
            &server,
            "PATCH",
            &format!("/v1/admin/sites/{a_id}"),
            Some(&admin_token),
            &[],
            Some(json!({"allowed_origins": ["https://shop2.example"]})),
        )
        .await;
        assert_eq!(s, 200, "{body}");
        assert_eq!(body["name"], "Shop");
        assert_eq!(
            upgrade_status(&server, Some("https://shop.example")).await,
            403
        );
        assert_eq!(
            upgrade_status(&server, Some("https://shop2.example")).await,
            101
        );
        let (s, _) = call(
            &server,
            "PATCH",
            &format!("/v1/admin/sites/{}", b_id + 100),
            Some(&admin_token),
            &[],
            Some(json!({"name": "x"})),
        )
        .await;
        assert_eq!(s, 404);
        let (s, _) = call(
            &server,
            "PATCH",
            &format!("/v1/admin/sites/{a_id}"),
            Some(&c_token),
            &[],
            Some(json!({"name": "x"})),
        )
        .await;
        assert_eq!(s, 403);
        let (s, _) = call(&server, "GET", "/v1/admin/sites", Some(&a_token), &[], None).await;
        assert_eq!(s, 403);

        // Audited.
        let (s, audit) = call(
            &server,
            "GET",
            "/v1/admin/audit?limit=1000",
            Some(&admin_token),
            &[],
            None,
        )
        .await;
        assert_eq!(s, 200, "{audit}");
        let entries = audit["entries"].as_array().unwrap();
        let count = |action: &str| entries.iter().filter(|e| e["action"] == action).count();
        assert_eq!(count("site_created"), 2, "{audit}");
        assert_eq!(count("site_updated"), 1, "{audit}");
        assert_eq!(count("site_user_created"), 2, "{audit}");
        let updated = entries
            .iter()
            .find(|e| e["action"] == "site_updated")
            .unwrap();
        assert_eq!(updated["target"], format!("site:{a_id}"));
        assert_eq!(
            updated["detail"]["to"]["allowed_origins"],
            json!(["https://shop2.example"])
        );
        assert!(!audit.to_string().contains(&a_key));

        server.shutdown().await;
    }
}

/// With a global allow-list, its origins stay allowed next to the sites', and the sites
/// are read back from the store at start-up.
#[tokio::test]
async fn global_origins_stay_allowed_with_sites() {
    let db = TestDatabase::sqlite();
    let config = r#"allowed_origins = ["https://app.example"]"#;
    let server = TestServer::start_on(db.url(), config).await;
    assert_eq!(
        upgrade_status(&server, Some("https://shop.example")).await,
        403
    );
    let admin_token = admin(&server).await;
    let (s, body) = call(
        &server,
        "POST",
        "/v1/admin/sites",
        Some(&admin_token),
        &[],
        Some(json!({"name": "Shop", "allowed_origins": ["https://shop.example"]})),
    )
    .await;
    assert_eq!(s, 201, "{body}");
    for server in [server, TestServer::start_on(db.url(), config).await] {
        assert_eq!(
            upgrade_status(&server, Some("https://shop.example")).await,
            101
        );
        assert_eq!(
            upgrade_status(&server, Some("https://app.example")).await,
            101
        );
        assert_eq!(
            upgrade_status(&server, Some("https://evil.example")).await,
            403
        );
        server.shutdown().await;
    }
}
