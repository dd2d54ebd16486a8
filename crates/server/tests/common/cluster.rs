//! A cluster of real node processes for the scale-out tests: N nodes on loopback ports
//! sharing a PostgreSQL schema of their own and a broker (Redis or NATS) under a key prefix of
//! their own, so tests never see each other.

use super::free_port;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use switchboard::auth::sign_hs256;
use switchboard_store::testing::TestDatabase;
use switchboard_store::{MemberRole, NewRoom, NewUser, RoomKind, UserRole};
use tokio::process::{Child, Command};

use super::RawClient;

pub const SECRET: &str = "cluster-test-secret";
pub const API_KEY: &str = "cluster-test-key";

/// A namespace with history and presence for the tests; nodes forget a silent peer (and a
/// crashed node's presence) after 3 s.
const CONFIG: &str = r#"
[namespaces.feed]
history_size = 1000
history_ttl = "300s"
presence = true

[broker]
presence_ttl = "3s"
"#;

pub fn redis_url() -> String {
    std::env::var("SWITCHBOARD_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

pub fn nats_url() -> String {
    std::env::var("SWITCHBOARD_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// Whether something listens at the URL's host:port.
async fn reachable(url: &str) -> bool {
    let hostport = url
        .split("://")
        .nth(1)
        .unwrap_or(url)
        .split('/')
        .next()
        .unwrap_or_default()
        .rsplit('@')
        .next()
        .unwrap_or_default()
        .to_string();
    tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(hostport),
    )
    .await
    .is_ok_and(|r| r.is_ok())
}

/// Fails under CI; otherwise prints a loud skip notice.
pub fn missing(what: &str) {
    super::missing_service("cluster", what)
}

pub struct Node {
    pub child: Option<Child>,
    pub port: u16,
    _dir: tempfile::TempDir,
}

pub struct Cluster {
    pub nodes: Vec<Node>,
    pub db: TestDatabase,
    pub broker: String,
    pub prefix: String,
    config: tempfile::TempDir,
}

impl Cluster {
    /// Starts `n` nodes on `broker`, or returns `None` (after a SKIP) when a service is missing.
    pub async fn start(broker: &str, n: usize) -> Option<Cluster> {
        if !reachable(broker).await {
            missing(broker);
            return None;
        }
        let Some(db) = TestDatabase::postgres().await else {
            missing("PostgreSQL at 127.0.0.1:5432");
            return None;
        };
        let config = tempfile::tempdir().unwrap();
        std::fs::write(config.path().join("config.toml"), CONFIG).unwrap();
        let mut cluster = Cluster {
            nodes: Vec::new(),
            db,
            broker: broker.to_string(),
            prefix: format!("sbtest{:x}", rand::random::<u64>()),
            config,
        };
        // The first node migrates the schema; the others start together once it is up.
        let first = cluster.spawn_node(0).await;
        cluster.nodes.push(first);
        let rest: Vec<_> = (1..n).map(|i| cluster.spawn_node(i)).collect();
        for node in futures_util::future::join_all(rest).await {
            cluster.nodes.push(node);
        }
        Some(cluster)
    }

    async fn spawn_node(&self, i: usize) -> Node {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .arg("serve")
            .arg("--config")
            .arg(self.config.path().join("config.toml"))
            .env("SWITCHBOARD_LISTEN", format!("127.0.0.1:{port}"))
            .env("SWITCHBOARD_NAME", format!("node{i}"))
            .env("SWITCHBOARD_DATA_DIR", dir.path())
            .env("SWITCHBOARD_DATABASE_URL", self.db.url())
            .env("SWITCHBOARD_BROKER_URL", &self.broker)
            .env("SWITCHBOARD_BROKER__PREFIX", &self.prefix)
            .env("SWITCHBOARD_TOKEN_HMAC_SECRET", SECRET)
            .env("SWITCHBOARD_API_KEY", API_KEY)
            .env("SWITCHBOARD_CLIENT__COMMAND_RATE", "100000")
            .env("SWITCHBOARD_CLIENT__COMMAND_BURST", "100000")
            .env("SWITCHBOARD_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start switchboard");
        let node = Node {
            child: Some(child),
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return node;
            }
            assert!(
                Instant::now() < deadline,
                "node {i} did not start on port {port}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn addr(&self, i: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.nodes[i].port))
    }

    pub fn http(&self, i: usize) -> String {
        format!("http://{}", self.addr(i))
    }

    /// `POST /api/{method}` on node `i`; the whole JSON answer.
    pub async fn api(&self, i: usize, method: &str, body: Value) -> Value {
        let resp = super::http()
            .post(format!("{}/api/{method}", self.http(i)))
            .header("X-API-Key", API_KEY)
            .json(&body)
            .send()
            .await
            .expect("api request");
        assert_eq!(resp.status().as_u16(), 200, "/api/{method} on node {i}");
        resp.json().await.expect("api json")
    }

    /// A connected raw client on node `i`, authenticated as `user`.
    pub async fn client(&self, i: usize, user: &str) -> RawClient {
        let mut c = RawClient::open_at(self.addr(i)).await;
        let token = sign_hs256(SECRET, &json!({"sub": user}));
        let reply = c.call(json!({"connect": {"token": token}})).await;
        assert!(reply.get("connect").is_some(), "connect failed: {reply}");
        c
    }

    /// SIGKILL: no shutdown path runs.
    pub async fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            child.start_kill().unwrap();
            let _ = child.wait().await;
        }
    }
}

/// A room with `members` users, made through the store of the cluster's database.
pub async fn chat_room(db: &TestDatabase, members: usize) -> (i64, Vec<i64>) {
    let store = db.open().await;
    let mut users = Vec::new();
    for i in 0..members {
        let u = store
            .create_user(NewUser {
                username: format!("member{i}"),
                password_hash: String::new(),
                display_name: format!("Member {i}"),
                role: UserRole::User,
            })
            .await
            .unwrap();
        users.push(u.id);
    }
    let room = store
        .create_room(NewRoom {
            kind: RoomKind::Private,
            name: "cluster".into(),
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
    (room.id, users)
}

/// Debian's nginx running `deploy/nginx.conf`, with the upstream servers replaced by the
/// cluster's nodes and the listen address by a loopback port.
pub struct Nginx {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Nginx {
    /// Starts nginx in front of every node of `cluster`, or returns `None` (after a SKIP) when
    /// nginx is not installed.
    pub async fn start(cluster: &Cluster) -> Option<Nginx> {
        let bin = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists());
        let Some(bin) = bin else {
            missing("nginx (Debian package nginx)");
            return None;
        };
        let template = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/nginx.conf"),
        )
        .expect("deploy/nginx.conf");
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let mut conf = String::new();
        let mut servers_written = false;
        for line in template.lines() {
            let t = line.trim_start();
            if t.starts_with("server node") {
                if !servers_written {
                    for n in &cluster.nodes {
                        conf.push_str(&format!(
                            "        server 127.0.0.1:{} max_fails=1 fail_timeout=5s;\n",
                            n.port
                        ));
                    }
                    servers_written = true;
                }
            } else if t.starts_with("listen ") {
                conf.push_str(&format!("        listen 127.0.0.1:{port};\n"));
            } else if t.starts_with("pid ") {
                conf.push_str(&format!("pid {}/nginx.pid;\n", dir.path().display()));
            } else {
                conf.push_str(line);
                conf.push('\n');
            }
        }
        assert!(
            servers_written,
            "deploy/nginx.conf has no `server node...` lines"
        );
        // Temporary files of a non-root prefix.
        conf = conf.replace(
            "http {\n",
            &format!(
                "http {{\n    client_body_temp_path {d}/body;\n    proxy_temp_path {d}/proxy;\n    fastcgi_temp_path {d}/fastcgi;\n    uwsgi_temp_path {d}/uwsgi;\n    scgi_temp_path {d}/scgi;\n",
                d = dir.path().display()
            ),
        );
        let file = dir.path().join("nginx.conf");
        std::fs::write(&file, conf).unwrap();
        let child = Command::new(bin)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&file)
            .arg("-g")
            .arg("daemon off;")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start nginx");
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "nginx did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Some(Nginx {
            child,
            port,
            _dir: dir,
        })
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/connection/websocket", self.port)
    }

    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// tests/compat/js with its packages installed (`npm ci` on first use), or `None` (after a
/// SKIP) without node and npm.
pub async fn js_suite() -> Option<std::path::PathBuf> {
    static INSTALLED: tokio::sync::OnceCell<bool> = tokio::sync::OnceCell::const_new();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/compat/js");
    let ok = *INSTALLED
        .get_or_init(|| async {
            let have = |tool: &'static str| async move {
                Command::new(tool)
                    .arg("--version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .await
                    .is_ok_and(|s| s.success())
            };
            if !have("node").await || !have("npm").await {
                return false;
            }
            if !dir.join("node_modules/centrifuge/package.json").exists() {
                let status = Command::new("npm")
                    .args(["ci", "--no-audit", "--no-fund"])
                    .current_dir(&dir)
                    .status()
                    .await
                    .expect("npm ci");
                assert!(status.success(), "npm ci in tests/compat/js failed");
            }
            true
        })
        .await;
    if !ok {
        missing("node and npm");
        return None;
    }
    Some(dir)
}
