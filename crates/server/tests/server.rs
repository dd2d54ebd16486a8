//! The server's boundaries outside the command protocol: shutdown, origins, limits, health,
//! metrics, RS256 tokens and configuration errors.

mod common;

use std::time::Duration;

use common::{http, RawClient};
use serde_json::json;
use switchboard::config::Config;
use switchboard::server::Server;
use switchboard::testing::TestServer;

/// A raw upgrade request; returns the HTTP status.
async fn upgrade_status(server: &TestServer, origin: Option<&str>) -> u16 {
    let mut req = http()
        .get(format!("{}/connection/websocket", server.http_url()))
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==");
    if let Some(o) = origin {
        req = req.header("Origin", o);
    }
    req.send().await.expect("request").status().as_u16()
}

#[tokio::test]
async fn graceful_shutdown_closes_clients_with_3001() {
    let server = TestServer::start().await;
    let mut a = RawClient::connect(&server, "a").await;
    let mut b = RawClient::connect(&server, "b").await;
    let started = std::time::Instant::now();
    let shutdown = tokio::spawn(server.shutdown());
    a.expect_close(3001).await;
    b.expect_close(3001).await;
    shutdown.await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn origins_are_checked_when_configured() {
    let server = TestServer::start_with("allowed_origins = [\"https://app.example\"]\n").await;
    assert_eq!(
        upgrade_status(&server, Some("https://app.example")).await,
        101
    );
    assert_eq!(
        upgrade_status(&server, Some("https://evil.example")).await,
        403
    );
    // Non-browser clients send no Origin; origins only protect browsers.
    assert_eq!(upgrade_status(&server, None).await, 101);
    server.shutdown().await;
}

#[tokio::test]
async fn connection_limit_refuses_upgrades_with_503() {
    let server = TestServer::start_with("[client]\nmax_connections = 2\n").await;
    let _a = RawClient::connect(&server, "a").await;
    let _b = RawClient::connect(&server, "b").await;
    assert_eq!(upgrade_status(&server, None).await, 503);
    server.shutdown().await;
}

#[tokio::test]
async fn health_ready_and_metrics() {
    let server = TestServer::start().await;
    let get = |path: &str| http().get(format!("{}{path}", server.http_url())).send();
    assert_eq!(get("/healthz").await.unwrap().status().as_u16(), 200);
    assert_eq!(get("/readyz").await.unwrap().status().as_u16(), 200);

    let mut c = RawClient::connect(&server, "m").await;
    let r = c
        .call(json!({"subscribe": {"channel": "metrics-test"}}))
        .await;
    assert!(r.get("subscribe").is_some(), "{r}");
    let r = c
        .call(json!({"publish": {"channel": "metrics-test", "data": {"n": 1}}}))
        .await;
    assert!(r.get("publish").is_some(), "{r}");
    c.publication("metrics-test").await;

    let text = get("/metrics").await.unwrap().text().await.unwrap();
    for line in [
        "switchboard_connections 1",
        "switchboard_subscriptions 1",
        "switchboard_commands_total{method=\"publish\"} 1",
        "switchboard_publications_total 1",
        "switchboard_deliveries_total 1",
        "switchboard_slow_disconnects_total 0",
        "switchboard_rate_limited_total 0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    assert!(text.contains("switchboard_command_duration_seconds_bucket{method=\"subscribe\""));
    server.shutdown().await;
}

#[tokio::test]
async fn rs256_tokens_when_a_public_key_is_configured() {
    use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
    let private = rsa::RsaPrivateKey::new(&mut rand_core_06(), 2048).expect("rsa key");
    let public_pem = private
        .to_public_key()
        .to_public_key_pem(LineEnding::LF)
        .unwrap();
    let private_pem = private.to_pkcs8_pem(LineEnding::LF).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("pub.pem");
    std::fs::write(&key_path, public_pem).unwrap();
    let server =
        TestServer::start_with(&format!("[token]\nrsa_public_key = {:?}\n", key_path)).await;

    let claims = json!({"sub": "rs", "exp": switchboard::auth::now_secs() + 60});
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(private_pem.as_bytes()).unwrap();
    let good = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        &claims,
        &key,
    )
    .unwrap();
    let mut c = RawClient::open(&server).await;
    let r = c.call(json!({"connect": {"token": good}})).await;
    assert!(r.get("connect").is_some(), "RS256 token refused: {r}");

    // HS256 signed with the (public) key text: the classic algorithm-confusion attack.
    let forged =
        switchboard::auth::sign_hs256(&std::fs::read_to_string(&key_path).unwrap(), &claims);
    let mut c = RawClient::open(&server).await;
    c.send(json!({"connect": {"token": forged}})).await;
    c.expect_close(3500).await;
    // And the server's HMAC secret no longer opens anything either.
    let mut c = RawClient::open(&server).await;
    c.send(json!({"connect": {"token": server.token("x", None)}}))
        .await;
    c.expect_close(3500).await;
    server.shutdown().await;
}

/// rsa 0.9 takes a rand_core 0.6 RNG; build one from the OS.
fn rand_core_06() -> impl rsa::rand_core::CryptoRngCore {
    rsa::rand_core::OsRng
}

#[tokio::test]
async fn bad_configuration_is_refused_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(&file, "[client]\nping_interval = \"often\"\n").unwrap();
    let err = Config::load(Some(&file), std::iter::empty(), &[]).unwrap_err();
    assert!(err.to_string().contains("ping_interval"), "{err}");

    std::fs::write(&file, "[namespaces.chat]\nhistroy_size = 5\n").unwrap();
    let err = Config::load(Some(&file), std::iter::empty(), &[]).unwrap_err();
    assert!(err.to_string().contains("histroy_size"), "{err}");

    // A listen address in use is a start-up error, not a panic.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let flags = [
        ("listen", taken.local_addr().unwrap().to_string()),
        ("data_dir", dir.path().join("d").display().to_string()),
    ];
    let config = Config::load(None, std::iter::empty(), &flags).unwrap();
    let err = Server::start(config).await.err().expect("bind must fail");
    assert!(err.to_string().contains("cannot listen"), "{err}");
}
