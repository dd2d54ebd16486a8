//! An in-process server for tests: port 0, a temporary data directory, known secrets.

use std::net::SocketAddr;

use crate::auth::{now_secs, sign_hs256, ConnectClaims};
use crate::config::Config;
use crate::server::Server;

pub struct TestServer {
    pub addr: SocketAddr,
    pub api_key: String,
    pub secret: String,
    server: Option<Server>,
    _dir: tempfile::TempDir,
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with("").await
    }

    /// Starts with `extra_toml` merged over the test defaults, on SQLite in the temp directory.
    pub async fn start_with(extra_toml: &str) -> TestServer {
        Self::start_on("", extra_toml).await
    }

    /// Starts on the database at `database_url` (empty: SQLite in the temp directory).
    pub async fn start_on(database_url: &str, extra_toml: &str) -> TestServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("config.toml");
        std::fs::write(&file, extra_toml).expect("write config");
        let secret = "test-secret-0123456789".to_string();
        let api_key = "test-api-key".to_string();
        let data_dir = dir.path().join("data").display().to_string();
        let flags = [
            ("listen", "127.0.0.1:0".to_string()),
            ("data_dir", data_dir),
            ("token.hmac_secret", secret.clone()),
            ("api.key", api_key.clone()),
            ("database", database_url.to_string()),
        ];
        let config = Config::load(Some(&file), std::iter::empty(), &flags).expect("test config");
        let server = Server::start(config).await.expect("server starts");
        TestServer {
            addr: server.addr,
            api_key,
            secret,
            server: Some(server),
            _dir: dir,
        }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/connection/websocket", self.addr)
    }

    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A connection token for `user`; a negative `ttl_secs` gives an already expired one.
    pub fn token(&self, user: &str, ttl_secs: Option<i64>) -> String {
        let claims = ConnectClaims {
            sub: user.to_string(),
            exp: ttl_secs.map(|t| (now_secs() as i64 + t) as u64),
            ..Default::default()
        };
        sign_hs256(&self.secret, &claims)
    }

    pub fn token_with(&self, claims: serde_json::Value) -> String {
        sign_hs256(&self.secret, &claims)
    }

    pub fn node(&self) -> &std::sync::Arc<crate::node::Node> {
        &self.server.as_ref().expect("running").node
    }

    pub async fn shutdown(mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = &self.server {
            s.node.shutdown.cancel();
        }
    }
}
