//! The embedded web app and the dashboard feed: `/` and its assets with the right types and
//! cache headers, the SPA fallback, the API prefixes keeping their 404s, paths that try to
//! escape (`..`, `%2e%2e`, encoded slashes) getting nothing but the app, and
//! `system:dashboard` samples that a client can subscribe to but not publish to.
//!
//! These pass with the placeholder page too (a build without npm), checking the bundle's
//! files only when the real app is embedded.

mod common;

use std::time::Duration;

use common::{error_code, http, RawClient};
use serde_json::{json, Value};
use switchboard::testing::TestServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn get(server: &TestServer, path: &str) -> reqwest::Response {
    http()
        .get(format!("{}{path}", server.http_url()))
        .send()
        .await
        .expect("GET")
}

fn header<'a>(resp: &'a reqwest::Response, name: &str) -> &'a str {
    resp.headers()
        .get(name)
        .map_or("", |v| v.to_str().expect("ascii header"))
}

/// A request with the path sent exactly as given (clients normalize `..` away), returning
/// the status and the body.
async fn raw_get(server: &TestServer, path: &str) -> (u16, Vec<u8>) {
    let mut tcp = TcpStream::connect(server.addr).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(common::STEP, tcp.read_to_end(&mut buf))
        .await
        .expect("response in time")
        .expect("read");
    let text = String::from_utf8_lossy(&buf);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(Vec::new(), |i| buf[i + 4..].to_vec());
    (status, body)
}

#[tokio::test]
async fn serves_the_app_its_assets_and_the_spa_fallback() {
    let server = TestServer::start().await;
    let index = get(&server, "/").await;
    assert_eq!(index.status(), 200);
    assert_eq!(header(&index, "content-type"), "text/html; charset=utf-8");
    assert_eq!(header(&index, "cache-control"), "no-cache");
    assert_eq!(header(&index, "x-content-type-options"), "nosniff");
    assert!(header(&index, "content-security-policy").contains("default-src 'self'"));
    let html = index.text().await.unwrap();
    assert!(html.contains("<html"), "{html}");

    // Client-side routes get the same page.
    for path in ["/chat", "/chat/12", "/documents/3", "/dashboard"] {
        let r = get(&server, path).await;
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.text().await.unwrap(), html, "{path}");
    }
    // A missing file is a 404, not the page in place of a script.
    assert_eq!(get(&server, "/assets/missing-123.js").await.status(), 404);
    // Other methods are refused.
    let post = http()
        .post(format!("{}/", server.http_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 405);
    assert_eq!(header(&post, "allow"), "GET, HEAD");

    if switchboard::web::built() {
        let script = switchboard::web::files()
            .find(|f| f.starts_with("assets/app-") && f.ends_with(".js"))
            .expect("the bundle has an app script");
        assert!(html.contains(&format!("/{script}")), "index links {script}");
        let js = get(&server, &format!("/{script}")).await;
        assert_eq!(js.status(), 200);
        assert_eq!(
            header(&js, "content-type"),
            "text/javascript; charset=utf-8"
        );
        assert!(header(&js, "cache-control").contains("immutable"));
        assert_eq!(header(&js, "content-security-policy"), "");
        let css = switchboard::web::files()
            .find(|f| f.ends_with(".css"))
            .expect("a stylesheet");
        let css = get(&server, &format!("/{css}")).await;
        assert_eq!(header(&css, "content-type"), "text/css; charset=utf-8");
        let icon = get(&server, "/favicon.svg").await;
        assert_eq!(header(&icon, "content-type"), "image/svg+xml");
    } else {
        eprintln!("web app not built (placeholder embedded): bundle checks skipped");
        assert!(html.contains("not built"), "{html}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn server_routes_keep_working_and_unknown_api_paths_are_404() {
    let server = TestServer::start().await;
    assert_eq!(get(&server, "/healthz").await.text().await.unwrap(), "ok");
    assert_eq!(get(&server, "/readyz").await.status(), 200);
    let metrics = get(&server, "/metrics").await.text().await.unwrap();
    assert!(metrics.contains("switchboard_connections"));
    let openapi: Value = get(&server, "/v1/openapi.json").await.json().await.unwrap();
    assert!(openapi["paths"]["/v1/users"].is_object());
    let (status, _) = common::api(&server, "info", json!({})).await;
    assert_eq!(status, 200);
    for path in [
        "/v1/nope",
        "/v1",
        "/api",
        "/docs",
        "/connection",
        "/connection/nope",
        "/metrics/x",
    ] {
        let r = get(&server, path).await;
        assert_eq!(r.status(), 404, "{path}");
        assert!(
            !header(&r, "content-type").starts_with("text/html"),
            "{path} must not get the app"
        );
    }
    // The WebSocket endpoint still upgrades.
    let c = RawClient::connect(&server, "1").await;
    c.close().await;
    server.shutdown().await;
}

#[tokio::test]
async fn paths_cannot_escape_the_embedded_files() {
    let server = TestServer::start().await;
    let index = get(&server, "/").await.bytes().await.unwrap().to_vec();
    for path in [
        "/../../etc/passwd",
        "/../../../../../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/%2E%2E/%2E%2E/%2E%2E/etc/passwd",
        "/assets/..%2f..%2f..%2fetc%2fpasswd",
        "/assets/%2e%2e/%2e%2e/Cargo.toml",
        "/..%5c..%5c..%5cetc%5cpasswd",
        "//etc/passwd",
        "/assets/../../crates/server/src/web.rs",
        "/%00/etc/passwd",
    ] {
        let (status, body) = raw_get(&server, path).await;
        let text = String::from_utf8_lossy(&body);
        assert!(!text.contains("root:"), "{path} leaked /etc/passwd");
        assert!(!text.contains("[package]"), "{path} leaked a Cargo.toml");
        assert!(!text.contains("include_bytes"), "{path} leaked source");
        match status {
            // The SPA fallback: exactly the app's page.
            200 => assert_eq!(body, index, "{path}"),
            400 | 404 => {}
            other => panic!("{path}: unexpected status {other}"),
        }
    }
    server.shutdown().await;
}

/// The next `system:dashboard` sample.
async fn sample(c: &mut RawClient) -> Value {
    let p = tokio::time::timeout(Duration::from_secs(5), c.publication("system:dashboard"))
        .await
        .expect("a sample within 5 s");
    assert_eq!(p["data"]["type"], "sample", "{p}");
    p["data"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_publishes_a_sample_every_second() {
    let server = TestServer::start().await;
    let mut c = RawClient::connect(&server, "7").await;
    let r = c
        .call(json!({"subscribe": {"channel": "system:dashboard"}}))
        .await;
    assert!(r.get("subscribe").is_some(), "subscribe: {r}");

    let first = sample(&mut c).await;
    let node = server.node();
    assert_eq!(first["node"]["uid"], node.uid.as_str());
    assert_eq!(first["node"]["name"], node.config.name.as_str());
    assert!(first["connections"].as_u64().unwrap() >= 1, "{first}");
    for key in [
        "doc_connections",
        "users",
        "subscriptions",
        "docs_loaded",
        "messages_in",
        "messages_out",
        "uptime_s",
        "interval_ms",
    ] {
        assert!(first[key].is_number(), "{key} in {first}");
    }
    for key in ["commands", "publications", "deliveries", "doc_updates"] {
        assert!(first["rates"][key].is_number(), "rates.{key} in {first}");
    }

    // Some commands now show up in a following sample, with their latency.
    for _ in 0..10 {
        let r = c
            .call(json!({"history": {"channel": "system:dashboard", "limit": 1}}))
            .await;
        assert!(r.get("history").is_some(), "history: {r}");
    }
    let mut busy = None;
    for _ in 0..3 {
        let s = sample(&mut c).await;
        assert!(s["at"].as_i64() > first["at"].as_i64());
        if s["latency_ms"]["count"].as_u64() >= Some(5) {
            busy = Some(s);
            break;
        }
    }
    let busy = busy.expect("a sample that counted the history commands");
    assert!(busy["rates"]["commands"].as_f64().unwrap() > 0.0, "{busy}");
    assert!(busy["messages_in"].as_f64().unwrap() > 0.0, "{busy}");
    let p50 = busy["latency_ms"]["p50"].as_f64().expect("p50");
    let p99 = busy["latency_ms"]["p99"].as_f64().expect("p99");
    assert!(p50 > 0.0 && p50 <= p99, "{busy}");

    // Clients may read but never publish there; no presence.
    let r = c
        .call(json!({"publish": {"channel": "system:dashboard", "data": {"type": "sample"}}}))
        .await;
    assert_eq!(error_code(&r), 103, "{r}");
    let r = c
        .call(json!({"presence": {"channel": "system:dashboard"}}))
        .await;
    assert!(r.get("error").is_some(), "{r}");
    c.close().await;
    server.shutdown().await;
}

#[tokio::test]
async fn profiles_by_username_and_ids() {
    let server = TestServer::start_with("[accounts]\npassword_hash_cost = \"test\"\n").await;
    let base = server.http_url();
    let mut ids = Vec::new();
    for name in ["Ann_Web", "bob_web"] {
        let r = http()
            .post(format!("{base}/v1/auth/register"))
            .json(&json!({"username": name, "password": "long enough pw", "display_name": name}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        ids.push(r.json::<Value>().await.unwrap()["id"].as_i64().unwrap());
    }
    let login: Value = http()
        .post(format!("{base}/v1/auth/login"))
        .json(&json!({"username": "bob_web", "password": "long enough pw"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = login["access_token"].as_str().unwrap();
    let lookup = |query: String| {
        let url = format!("{base}/v1/users?{query}");
        async move {
            let r = http().get(url).bearer_auth(token).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (status, body) = lookup("username=ANN_WEB".into()).await;
    assert_eq!(status, 200);
    assert_eq!(
        body["users"],
        json!([{"id": ids[0], "username": "ann_web", "display_name": "Ann_Web"}])
    );
    assert!(body["users"][0].get("role").is_none());
    let (_, body) = lookup("username=nobody".into()).await;
    assert_eq!(body["users"], json!([]));
    let (_, body) = lookup(format!("ids={},999999,{}", ids[1], ids[0])).await;
    let got: Vec<i64> = body["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["id"].as_i64().unwrap())
        .collect();
    assert_eq!(got, vec![ids[1], ids[0]]);
    assert_eq!(lookup("ids=1,x".into()).await.0, 400);
    assert_eq!(lookup("".into()).await.0, 400);
    let many: Vec<String> = (1..=101).map(|i| i.to_string()).collect();
    assert_eq!(lookup(format!("ids={}", many.join(","))).await.0, 400);
    let anon = http()
        .get(format!("{base}/v1/users?username=ann_web"))
        .send()
        .await
        .unwrap();
    assert_eq!(anon.status(), 401);
    server.shutdown().await;
}
