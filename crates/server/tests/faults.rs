//! Faults injected into running servers, and what clients see:
//! - the database goes away and comes back while clients send (PostgreSQL behind a TCP proxy
//!   that the test cuts: the shared PostgreSQL itself is never stopped);
//! - the data directory is read-only at start, or fills up while running (SQLite on a small
//!   tmpfs, mounted by the test);
//! - connection churn: 2,000 connects and disconnects per second for 60 s against one server
//!   process, whose memory, open files, threads and gauges must come back to their baseline.
//!
//! `kill -9` during send bursts is in `crash.rs` (and the SDK's in `tests/compat/js`);
//! `scripts/faults.sh` runs all of them.
//!
//! Every test needs something from the machine (PostgreSQL on 127.0.0.1:5432, the right to
//! mount tmpfs). Without it a test prints a loud SKIP, except under CI (env `CI` set), where
//! it fails. The tests take turns ([`TURN`]), so the churn test measures a process nothing
//! else disturbs and the outage test's timing does not depend on the churn.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::free_port;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use switchboard::auth::sign_hs256;
use switchboard::testing::TestServer;
use switchboard_store::testing::TestDatabase;
use switchboard_store::{
    DocRole, EventKind, MemberRole, NewDocument, NewRoom, NewUser, RoomKind, Store, UserRole,
};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

/// One fault test at a time (see the module docs). A tokio mutex: it is held across awaits,
/// and each test has its own runtime.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const SECRET: &str = "faults-test-secret";

/// Fails under CI; otherwise prints a loud SKIP. Returns only when skipping.
fn missing(what: &str) {
    common::missing_service("fault", what)
}

fn token(user: i64) -> String {
    sign_hs256(SECRET, &json!({"sub": user.to_string()}))
}

async fn new_user(store: &dyn Store, name: &str) -> i64 {
    store
        .create_user(NewUser {
            username: name.to_string(),
            password_hash: String::new(),
            display_name: name.to_string(),
            role: UserRole::User,
        })
        .await
        .expect("create user")
        .id
}

/// A private room owned by `users[0]` with the others as members.
async fn new_room(store: &dyn Store, users: &[i64]) -> i64 {
    let room = store
        .create_room(NewRoom {
            kind: RoomKind::Private,
            name: "faults".into(),
            created_by: users[0],
        })
        .await
        .expect("create room");
    for u in &users[1..] {
        store
            .add_member(room.id, *u, MemberRole::Member)
            .await
            .expect("add member");
    }
    room.id
}

/// The client_msg_ids stored in a room, in offset order, after checking the offsets run
/// 1, 2, 3 ... with no gap.
async fn stored_ids(store: &dyn Store, room: i64) -> Vec<String> {
    let pos = store.room_position(room).await.expect("room position");
    let events = store.events(room, 0, 10_000).await.expect("events");
    let offsets: Vec<i64> = events.iter().map(|e| e.offset).collect();
    assert_eq!(
        offsets,
        (1..=pos.offset).collect::<Vec<_>>(),
        "the room's offsets run 1..=N with no gap"
    );
    // Message events only: an edit or a moderation removal carries its message too.
    events
        .iter()
        .filter(|e| e.kind == EventKind::Message)
        .filter_map(|e| e.message.as_ref()?.client_msg_id.clone())
        .collect()
}

/// Every acknowledged id is stored exactly once, and nothing else is.
fn assert_exactly_once(stored: &[String], acked: &HashSet<String>, what: &str) {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for id in stored {
        *counts.entry(id.as_str()).or_default() += 1;
    }
    let dups: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dups.is_empty(), "{what}: duplicated messages {dups:?}");
    let lost: Vec<_> = acked
        .iter()
        .filter(|id| !counts.contains_key(id.as_str()))
        .collect();
    assert!(
        lost.is_empty(),
        "{what}: acknowledged messages lost: {lost:?}"
    );
    let unacked: Vec<_> = counts.keys().filter(|id| !acked.contains(**id)).collect();
    assert!(
        unacked.is_empty(),
        "{what}: stored but never acknowledged (every send is retried until acknowledged): {unacked:?}"
    );
}

// ----- a server process --------------------------------------------------------------------

/// `switchboard serve` as a real process, killed on drop. Its log goes to a file outside the
/// data directory (which may be read-only or full).
struct Proc {
    child: Child,
    port: u16,
    pid: u32,
    log: PathBuf,
    _log_dir: tempfile::TempDir,
}

impl Proc {
    async fn start(data_dir: &Path, extra: &[(&str, &str)]) -> Proc {
        let log_dir = tempfile::tempdir().unwrap();
        let log = log_dir.path().join("server.log");
        let port = free_port();
        let mut cmd = server_command("serve", data_dir, port, &log, extra);
        let child = cmd.spawn().expect("start switchboard");
        let pid = child.id().expect("pid");
        let mut p = Proc {
            child,
            port,
            pid,
            log,
            _log_dir: log_dir,
        };
        for _ in 0..200 {
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!("server exited at start with {status}: {}", p.log_text());
            }
            if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return p;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("server did not start on port {port}: {}", p.log_text());
    }

    fn http(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then waits for a graceful exit (closing clients, flushing documents).
    async fn stop(mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        let status = tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("server stops within 20 s of SIGTERM")
            .expect("wait");
        assert!(
            status.success(),
            "graceful exit: {status}: {}",
            self.log_text()
        );
    }
}

/// `switchboard <subcommand>` with the test's secrets, on `data_dir`, logging to `log`.
fn server_command(
    subcommand: &str,
    data_dir: &Path,
    port: u16,
    log: &Path,
    extra: &[(&str, &str)],
) -> Command {
    let log = std::fs::File::create(log).expect("log file");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchboard"));
    // Every SWITCHBOARD_* variable is a config key to the server: only the test's own.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("SWITCHBOARD_") {
            cmd.env_remove(k);
        }
    }
    cmd.arg(subcommand)
        .env("SWITCHBOARD_LISTEN", format!("127.0.0.1:{port}"))
        .env("SWITCHBOARD_DATA_DIR", data_dir)
        .env("SWITCHBOARD_TOKEN_HMAC_SECRET", SECRET)
        .env("SWITCHBOARD_API_KEY", "k")
        .env("SWITCHBOARD_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true);
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd
}

/// A minimal client of the Centrifugo JSON protocol for servers that are processes (the
/// shared `RawClient` needs an in-process `TestServer`).
struct Client {
    ws: WebSocketStream<TcpStream>,
    next_id: u32,
}

impl Client {
    async fn connect(addr: SocketAddr, user: i64) -> Client {
        let tcp = TcpStream::connect(addr).await.expect("tcp connect");
        let url = format!("ws://{addr}/connection/websocket");
        let (ws, _) = tokio_tungstenite::client_async(url, tcp)
            .await
            .expect("websocket handshake");
        let mut c = Client { ws, next_id: 0 };
        let r = c.call(json!({"connect": {"token": token(user)}})).await;
        assert!(r.get("connect").is_some(), "connect: {r}");
        c
    }

    /// Sends a command and returns its reply; pushes are skipped, pings answered.
    async fn call(&mut self, mut cmd: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        cmd["id"] = json!(id);
        self.ws
            .send(Message::text(cmd.to_string()))
            .await
            .expect("send");
        let wait = async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Text(t))) => {
                        for line in t.split('\n').filter(|l| !l.trim().is_empty()) {
                            let v: Value = serde_json::from_str(line).expect("JSON");
                            if v.as_object().is_some_and(|o| o.is_empty()) {
                                let _ = self.ws.send(Message::text("{}")).await;
                            } else if v["id"] == id {
                                return v;
                            }
                        }
                    }
                    Some(Ok(_)) => {}
                    other => panic!("connection ended waiting for reply {id}: {other:?}"),
                }
            }
        };
        tokio::time::timeout(common::STEP, wait)
            .await
            .unwrap_or_else(|_| panic!("no reply to {cmd} within {:?}", common::STEP))
    }
}

// ----- the database goes away ----------------------------------------------------------------

/// A TCP proxy between the server and PostgreSQL. [`Proxy::cut`] resets every connection
/// through it and closes its listener, so new connections are refused (as from a database
/// host that is down) until [`Proxy::restore`] listens again on the same port.
struct Proxy {
    addr: SocketAddr,
    up: watch::Sender<bool>,
    /// Connections accepted so far.
    accepted: Arc<AtomicUsize>,
}

impl Proxy {
    async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (up, rx) = watch::channel(true);
        let accepted = Arc::new(AtomicUsize::new(0));
        tokio::spawn(proxy_loop(listener, upstream, rx, accepted.clone()));
        Proxy { addr, up, accepted }
    }

    fn cut(&self) {
        self.up.send_replace(false);
    }

    fn restore(&self) {
        self.up.send_replace(true);
    }
}

async fn proxy_loop(
    first: TcpListener,
    upstream: String,
    mut up: watch::Receiver<bool>,
    accepted: Arc<AtomicUsize>,
) {
    let addr = first.local_addr().unwrap();
    let mut listener = Some(first);
    loop {
        let l = match listener.take() {
            Some(l) => l,
            None => loop {
                // The old listener's port may take a moment to be free again.
                match TcpListener::bind(addr).await {
                    Ok(l) => break l,
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            },
        };
        let sever = CancellationToken::new();
        loop {
            tokio::select! {
                r = l.accept() => if let Ok((client, _)) = r {
                    accepted.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(pipe(client, upstream.clone(), sever.clone()));
                },
                _ = up.wait_for(|u| !*u) => break,
            }
        }
        sever.cancel();
        drop(l);
        if up.wait_for(|u| *u).await.is_err() {
            return;
        }
    }
}

async fn pipe(mut client: TcpStream, upstream: String, sever: CancellationToken) {
    let Ok(mut server) = TcpStream::connect(&upstream).await else {
        return;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = sever.cancelled() => {
            // A reset, not a polite FIN: the database went away mid-conversation.
            let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
            let _ = socket2::SockRef::from(&server).set_linger(Some(Duration::ZERO));
        }
    }
}

/// `host:port` of a postgres:// URL (default port 5432).
fn pg_host_port(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:5432")
    }
}

/// What one sender saw.
#[derive(Default)]
struct SendLog {
    acked: Vec<String>,
    /// Error replies: (when, relative to the test start; code; temporary).
    errors: Vec<(Duration, u64, bool)>,
    /// Messages acknowledged only after a retry.
    retried: usize,
    slowest_reply: Duration,
}

/// Sends numbered messages with a client_msg_id until `stop`; a temporary error is retried
/// with the same id until it is acknowledged.
async fn outage_sender(
    mut c: common::RawClient,
    user: i64,
    channel: String,
    start: Instant,
    stop: watch::Receiver<bool>,
) -> SendLog {
    let mut log = SendLog::default();
    for n in 0u32.. {
        if *stop.borrow() {
            break;
        }
        let cmid = format!("{user}-{n}");
        let cmd =
            json!({"publish": {"channel": channel, "data": {"text": cmid, "client_msg_id": cmid}}});
        let mut attempts = 0;
        loop {
            attempts += 1;
            assert!(attempts < 200, "{cmid} was never acknowledged");
            let sent = Instant::now();
            let reply = c.call(cmd.clone()).await;
            log.slowest_reply = log.slowest_reply.max(sent.elapsed());
            if reply.get("publish").is_some() {
                log.acked.push(cmid.clone());
                log.retried += usize::from(attempts > 1);
                break;
            }
            let err = &reply["error"];
            log.errors.push((
                start.elapsed(),
                err["code"].as_u64().unwrap_or(0),
                err["temporary"].as_bool().unwrap_or(false),
            ));
            // An SDK backs off before it retries.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.close().await;
    log
}

async fn get_status(url: &str) -> u16 {
    match common::http().get(url).send().await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

/// PostgreSQL goes away for 3 s while three clients send chat messages, and comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_gives_temporary_errors_and_the_node_recovers() {
    let _turn = TURN.lock().await;
    let Some(db) = TestDatabase::postgres().await else {
        missing("PostgreSQL at 127.0.0.1:5432 (database test)");
        return;
    };
    let store = db.open().await;
    let mut users = Vec::new();
    for i in 0..4 {
        users.push(new_user(&*store, &format!("outage{i}")).await);
    }
    let room = new_room(&*store, &users).await;
    let channel = format!("chat:{room}");

    let upstream = pg_host_port(db.url());
    let proxy = Proxy::start(upstream.clone()).await;
    let proxied = db.url().replacen(&upstream, &proxy.addr.to_string(), 1);
    assert_ne!(proxied, db.url(), "the server's URL goes through the proxy");
    let server = TestServer::start_on(&proxied, "").await;

    // A subscriber that stays connected throughout, and three senders.
    let mut sub = common::connect(&server, &server.token(&users[3].to_string(), None)).await;
    let r = sub.call(json!({"subscribe": {"channel": channel}})).await;
    assert!(r.get("subscribe").is_some(), "subscribe: {r}");
    let start = Instant::now();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut senders = Vec::new();
    for &u in &users[..3] {
        let c = common::connect(&server, &server.token(&u.to_string(), None)).await;
        senders.push(tokio::spawn(outage_sender(
            c,
            u,
            channel.clone(),
            start,
            stop_rx.clone(),
        )));
    }

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let ready = format!("{}/readyz", server.http_url());
    let health = format!("{}/healthz", server.http_url());
    assert_eq!(get_status(&ready).await, 200, "ready before the outage");
    let accepted_before = proxy.accepted.load(Ordering::Relaxed);

    proxy.cut();
    let cut_at = start.elapsed();
    // During the outage: liveness stays up (no restart wanted), readiness goes down.
    let mut ready_during = BTreeMap::new();
    let mut health_during = BTreeMap::new();
    while start.elapsed() < cut_at + Duration::from_secs(3) {
        *ready_during.entry(get_status(&ready).await).or_insert(0) += 1;
        *health_during.entry(get_status(&health).await).or_insert(0) += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    proxy.restore();
    let restored_at = start.elapsed();

    // After: readiness comes back by itself, and the senders go on for a while.
    let mut ready_again = None;
    for _ in 0..50 {
        if get_status(&ready).await == 200 {
            ready_again = Some(start.elapsed() - restored_at);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_tx.send_replace(true);
    let mut logs = Vec::new();
    for s in senders {
        logs.push(s.await.expect("sender"));
    }

    let acked: HashSet<String> = logs.iter().flat_map(|l| l.acked.clone()).collect();
    let errors: Vec<_> = logs.iter().flat_map(|l| l.errors.clone()).collect();
    let slowest = logs.iter().map(|l| l.slowest_reply).max().unwrap();
    let retried: usize = logs.iter().map(|l| l.retried).sum();
    eprintln!(
        "outage {cut_at:?}..{restored_at:?}: {} acknowledged, {} error replies ({} retried \
         messages), slowest reply {slowest:?}; /readyz during {ready_during:?}, /healthz \
         during {health_during:?}, ready again after {ready_again:?}",
        acked.len(),
        errors.len(),
        retried
    );
    assert!(
        errors.iter().all(|&(_, code, temp)| code == 100 && temp),
        "every error during the outage is the temporary 100: {errors:?}"
    );
    let in_outage = errors
        .iter()
        .filter(|(at, ..)| *at >= cut_at && *at <= restored_at + Duration::from_millis(500))
        .count();
    assert!(
        in_outage >= 3,
        "sends during the outage are answered with 100 while the database is away, not held \
         until it returns: {errors:?}"
    );
    assert!(
        slowest < Duration::from_secs(3),
        "no send waits for the database to come back (SDKs time out at 5 s): slowest {slowest:?}"
    );
    assert_eq!(
        health_during.get(&200),
        Some(&health_during.values().sum()),
        "/healthz stays 200"
    );
    assert!(
        ready_during.contains_key(&503),
        "/readyz reports the missing database: {ready_during:?}"
    );
    assert!(
        ready_again.is_some(),
        "/readyz is 200 again after the outage"
    );
    assert!(
        proxy.accepted.load(Ordering::Relaxed) > accepted_before,
        "the server reconnected to the database by itself"
    );

    // The node works again without a restart: a new client subscribes (a store read) and
    // sends, and the subscriber that stayed connected got every message once, in order.
    let mut late = common::connect(&server, &server.token(&users[0].to_string(), None)).await;
    let r = late.call(json!({"subscribe": {"channel": channel}})).await;
    assert!(
        r.get("subscribe").is_some(),
        "subscribe after the outage: {r}"
    );
    let r = late
        .call(json!({"publish": {"channel": channel, "data": {"text": "after", "client_msg_id": "after"}}}))
        .await;
    assert!(r.get("publish").is_some(), "send after the outage: {r}");
    let mut acked = acked;
    acked.insert("after".into());

    let direct = db.open().await;
    let stored = stored_ids(&*direct, room).await;
    assert_exactly_once(&stored, &acked, "PostgreSQL outage");
    let mut seen = Vec::new();
    while seen.len() < stored.len() {
        match tokio::time::timeout(Duration::from_secs(3), sub.publication(&channel)).await {
            Ok(p) => seen.push(p["offset"].as_i64().expect("offset")),
            Err(_) => break,
        }
    }
    let missing: Vec<i64> = (1..=stored.len() as i64)
        .filter(|o| !seen.contains(o))
        .collect();
    assert_eq!(
        seen,
        (1..=stored.len() as i64).collect::<Vec<_>>(),
        "the live subscriber got every offset once, in order (missing {missing:?})"
    );
    sub.close().await;
    late.close().await;
    server.shutdown().await;
    direct.close().await;
    store.close().await;
}

// ----- the data directory: read-only, full ---------------------------------------------------

/// A tmpfs mounted for one test, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. "16m") with extra `options` ("ro"); `None` if mounting
    /// is not permitted here.
    fn mount(size: &str, options: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = format!("size={size}");
        if !options.is_empty() {
            opts = format!("{opts},{options}");
        }
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &opts, "tmpfs"])
            .arg(dir.path())
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        Some(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn remount(&self, options: &str) {
        let status = std::process::Command::new("mount")
            .args(["-o", &format!("remount,{options}")])
            .arg(self.path())
            .status()
            .expect("mount");
        assert!(status.success(), "remount {options}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Runs `switchboard serve` (or `migrate`) to its exit; returns (exit code, stderr).
async fn run_to_exit(subcommand: &str, data_dir: &Path) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let mut cmd = server_command(subcommand, data_dir, free_port(), &log, &[]);
    let mut child = cmd.spawn().expect("start switchboard");
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .unwrap_or_else(|_| panic!("`switchboard {subcommand}` did not exit"))
        .expect("wait");
    (
        status.code(),
        std::fs::read_to_string(&log).unwrap_or_default(),
    )
}

/// A read-only data directory stops `serve` at once with a message naming the directory and
/// the cause, and exit code 1: empty (first start) and with an existing database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_data_dir_stops_start_with_a_clear_error() {
    let _turn = TURN.lock().await;
    let Some(empty) = Tmpfs::mount("4m", "ro") else {
        missing("permission to mount tmpfs (run as root)");
        return;
    };
    let (code, err) = run_to_exit("serve", empty.path()).await;
    eprintln!("empty read-only data dir: exit {code:?}: {}", err.trim());
    assert_eq!(code, Some(1), "exit code: {err}");
    let dir = empty.path().display().to_string();
    assert!(
        err.contains(&dir) && err.contains("ead-only file system"),
        "the error names the directory and the cause: {err}"
    );

    // A data directory that worked, then became read-only (a disk remounted after errors).
    let used = Tmpfs::mount("16m", "").expect("mount worked a moment ago");
    let (code, err) = run_to_exit("migrate", used.path()).await;
    assert_eq!(code, Some(0), "migrate on a writable dir: {err}");
    assert!(used.path().join("switchboard.db").exists());
    used.remount("ro");
    for sub in ["serve", "migrate"] {
        let (code, err) = run_to_exit(sub, used.path()).await;
        eprintln!(
            "read-only data dir with a database, {sub}: exit {code:?}: {}",
            err.trim()
        );
        assert_eq!(code, Some(1), "{sub} exit code: {err}");
        let dir = used.path().display().to_string();
        assert!(
            err.contains(&dir) && err.contains("ead-only file system"),
            "{sub}: the error names the directory and the cause: {err}"
        );
    }
}

/// Fills `dir`'s file system with one file; returns its path.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).expect("filler");
    let big = vec![0u8; 1 << 20];
    while f.write_all(&big).is_ok() {}
    let small = [0u8; 4096];
    while f.write_all(&small).is_ok() {}
    let _ = f.sync_all();
    path
}

/// A y-websocket peer with its own yrs document (enough of the protocol for this test).
struct DocPeer {
    ws: WebSocketStream<TcpStream>,
    doc: yrs::Doc,
}

fn varuint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn read_varuint(buf: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = buf.split_first()?;
        *buf = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// A y-websocket sync message: type 0, `subtype` (0 step1, 1 step2, 2 update), payload.
fn sync_msg(subtype: u8, payload: &[u8]) -> Message {
    let mut out = vec![0, subtype];
    varuint(&mut out, payload.len() as u64);
    out.extend_from_slice(payload);
    Message::binary(out)
}

/// (subtype, payload) of a sync message; `None` for any other message.
fn parse_sync(frame: &[u8]) -> Option<(u64, Vec<u8>)> {
    let mut buf = frame;
    if read_varuint(&mut buf)? != 0 {
        return None;
    }
    let subtype = read_varuint(&mut buf)?;
    let len = usize::try_from(read_varuint(&mut buf)?).ok()?;
    Some((subtype, buf.get(..len)?.to_vec()))
}

impl DocPeer {
    async fn join(addr: SocketAddr, doc_id: i64, user: i64) -> DocPeer {
        use yrs::updates::encoder::Encode;
        use yrs::{ReadTxn, Transact};
        let tcp = TcpStream::connect(addr).await.expect("tcp");
        let url = format!("ws://{addr}/docs/{doc_id}?token={}", token(user));
        let (ws, _) = tokio_tungstenite::client_async(url, tcp)
            .await
            .expect("doc handshake");
        let mut p = DocPeer {
            ws,
            doc: yrs::Doc::new(),
        };
        let sv = p.doc.transact().state_vector().encode_v1();
        p.ws.send(sync_msg(0, &sv)).await.unwrap();
        p.read_until(|sub| sub == 1).await;
        p
    }

    /// Reads and applies messages until one of subtype `done` arrives.
    async fn read_until(&mut self, done: impl Fn(u64) -> bool) {
        use yrs::updates::decoder::Decode;
        use yrs::{ReadTxn, StateVector, Transact, Update};
        let wait = async {
            loop {
                let frame = match self.ws.next().await {
                    Some(Ok(Message::Binary(b))) => b,
                    Some(Ok(Message::Close(c))) => panic!("document connection closed: {c:?}"),
                    Some(Ok(_)) => continue,
                    other => panic!("document connection ended: {other:?}"),
                };
                let Some((sub, payload)) = parse_sync(&frame) else {
                    continue;
                };
                match sub {
                    0 => {
                        let sv = StateVector::decode_v1(&payload).expect("state vector");
                        let diff = self.doc.transact().encode_state_as_update_v1(&sv);
                        self.ws.send(sync_msg(1, &diff)).await.unwrap();
                    }
                    _ => {
                        let u = Update::decode_v1(&payload).expect("update");
                        self.doc.transact_mut().apply_update(u).expect("apply");
                    }
                }
                if done(sub) {
                    return;
                }
            }
        };
        tokio::time::timeout(common::STEP, wait)
            .await
            .expect("document message in time");
    }

    async fn type_text(&mut self, s: &str) {
        use yrs::{GetString, Text, Transact};
        let text = self.doc.get_or_insert_text("content");
        let update = {
            let mut txn = self.doc.transact_mut();
            let len = text.get_string(&txn).chars().count() as u32;
            text.insert(&mut txn, len, s);
            txn.encode_update_v1()
        };
        self.ws.send(sync_msg(2, &update)).await.unwrap();
    }

    fn text(&self) -> String {
        use yrs::{GetString, Transact};
        let text = self.doc.get_or_insert_text("content");
        let txn = self.doc.transact();
        text.get_string(&txn)
    }
}

/// The stored text of a document: its snapshot and update log applied to a fresh doc.
async fn stored_text(store: &dyn Store, doc_id: i64) -> String {
    use yrs::updates::decoder::Decode;
    use yrs::{GetString, Transact, Update};
    let content = store
        .load_document(doc_id)
        .await
        .expect("load")
        .expect("document exists");
    let doc = yrs::Doc::new();
    let text = doc.get_or_insert_text("content");
    {
        let mut txn = doc.transact_mut();
        for bytes in content
            .snapshot
            .iter()
            .chain(content.updates.iter().map(|u| &u.data))
        {
            txn.apply_update(Update::decode_v1(bytes).expect("stored update"))
                .expect("apply stored update");
        }
    }
    let txn = doc.transact();
    text.get_string(&txn)
}

/// `PRAGMA integrity_check` on a SQLite file.
async fn integrity_check(db: &Path) -> String {
    use sqlx::{ConnectOptions, Connection};
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(db)
        .connect()
        .await
        .expect("open the database file");
    let rows: Vec<(String,)> = sqlx::query_as("PRAGMA integrity_check")
        .fetch_all(&mut conn)
        .await
        .expect("integrity_check");
    let _ = conn.close().await;
    rows.into_iter().map(|r| r.0).collect::<Vec<_>>().join("; ")
}

/// The SQLite data directory fills up while clients send chat messages and edit a document:
/// sends get the temporary 100 (REST: 503) and the log says why, the process keeps serving,
/// nothing acknowledged is damaged, and once space is freed retries and new sends succeed
/// and the document's edits from the full period reach the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_data_dir_refuses_writes_and_recovers_when_space_is_freed() {
    let _turn = TURN.lock().await;
    let Some(fs) = Tmpfs::mount("24m", "") else {
        missing("permission to mount tmpfs (run as root)");
        return;
    };
    let db_path = fs.path().join("switchboard.db");
    let url = format!("sqlite://{}", db_path.display());
    let (users, room, doc_id) = {
        let store = switchboard_store::open(&url).await.expect("open on tmpfs");
        let a = new_user(&*store, "fullA").await;
        let b = new_user(&*store, "fullB").await;
        let room = new_room(&*store, &[a, b]).await;
        let doc = store
            .create_document(NewDocument {
                owner_id: a,
                title: "full".into(),
            })
            .await
            .expect("document");
        store
            .set_document_member(doc.id, b, DocRole::Editor)
            .await
            .expect("share");
        store.close().await;
        ([a, b], room, doc.id)
    };
    let mut server = Proc::start(fs.path(), &[]).await;
    let channel = format!("chat:{room}");
    let pad = "x".repeat(3000);
    let send = |cmid: &str| json!({"publish": {"channel": channel, "data": {"text": format!("{cmid} {pad}"), "client_msg_id": cmid}}});

    let mut sender = Client::connect(server.addr(), users[0]).await;
    let mut acked: HashSet<String> = HashSet::new();
    for n in 0..20 {
        let id = format!("before-{n}");
        let r = sender.call(send(&id)).await;
        assert!(
            r.get("publish").is_some(),
            "send before the disk is full: {r}"
        );
        acked.insert(id);
    }
    let mut editor = DocPeer::join(server.addr(), doc_id, users[0]).await;
    let mut watcher = DocPeer::join(server.addr(), doc_id, users[1]).await;
    editor.type_text("before;").await;
    watcher.read_until(|sub| sub == 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // persisted (50 ms window)

    let filler = fill(fs.path());
    // Sends until the database cannot grow (WAL space already allocated is reused first).
    let mut refused: Vec<String> = Vec::new();
    let started = Instant::now();
    for n in 0..3000 {
        let id = format!("full-{n}");
        let t = Instant::now();
        let r = sender.call(send(&id)).await;
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "a send on a full disk is answered at once"
        );
        if r.get("publish").is_some() {
            acked.insert(id);
            continue;
        }
        assert_eq!(r["error"]["code"], 100, "error on a full disk: {r}");
        assert_eq!(r["error"]["temporary"], true, "{r}");
        refused.push(id);
        if refused.len() >= 5 {
            break;
        }
    }
    assert!(
        !refused.is_empty(),
        "the disk never refused a write ({} acknowledged in {:?})",
        acked.len(),
        started.elapsed()
    );
    // REST sends say 503 with a JSON error.
    let resp = common::http()
        .post(format!("{}/v1/rooms/{room}/messages", server.http()))
        .bearer_auth(token(users[1]))
        .json(&json!({"text": "rest while full", "client_msg_id": "rest-full"}))
        .send()
        .await
        .expect("REST send");
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    assert_eq!(
        status,
        503,
        "REST send on a full disk: {body}; server log: {}",
        server.log_text()
    );
    assert!(body["error"]["message"].is_string(), "{body}");
    // Edits keep flowing to the other editor while they cannot be stored.
    editor.type_text("during;").await;
    watcher.read_until(|sub| sub == 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let metrics = common::http()
        .get(format!("{}/metrics", server.http()))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    assert!(
        gauge(&metrics, "switchboard_doc_persist_errors_total") > 0,
        "document writes failed while the disk was full (and are retried)"
    );
    assert!(server.alive(), "the server survives a full disk");
    assert_eq!(get_status(&format!("{}/healthz", server.http())).await, 200);
    let log = server.log_text();
    assert!(
        log.contains("database or disk is full"),
        "the log says why writes fail: {log}"
    );

    // Space comes back: the refused sends succeed on retry, new ones too, and the document's
    // edits are written.
    std::fs::remove_file(&filler).expect("free space");
    for id in refused.iter().chain([&"rest-full".to_string()]) {
        let mut ok = false;
        for _ in 0..50 {
            let r = sender.call(send(id)).await;
            if r.get("publish").is_some() {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(ok, "{id} is accepted once space is free");
        acked.insert(id.clone());
    }
    for n in 0..10 {
        let id = format!("after-{n}");
        let r = sender.call(send(&id)).await;
        assert!(r.get("publish").is_some(), "send after space is freed: {r}");
        acked.insert(id);
    }
    editor.type_text("after;").await;
    watcher.read_until(|sub| sub == 2).await;
    let expected_text = editor.text();
    assert_eq!(watcher.text(), expected_text);
    drop(editor);
    drop(watcher);
    drop(sender);
    server.stop().await;

    assert_eq!(
        integrity_check(&db_path).await,
        "ok",
        "PRAGMA integrity_check"
    );
    let store = switchboard_store::open(&url).await.expect("reopen");
    let stored = stored_ids(&*store, room).await;
    assert_exactly_once(&stored, &acked, "full data directory");
    assert_eq!(
        stored_text(&*store, doc_id).await,
        expected_text,
        "the document's edits, including those made while the disk was full, are stored"
    );
    eprintln!(
        "full disk: {} acknowledged, {} refused then accepted, document {:?}",
        acked.len(),
        refused.len(),
        expected_text
    );
    store.close().await;
}

// ----- connection churn ----------------------------------------------------------------------

/// Connects and disconnects per second, and for how long.
const CHURN_RATE: u64 = 2_000;
const CHURN_FOR: Duration = Duration::from_secs(60);

/// [`CHURN_FOR`], or `SB_CHURN_SECS` for a shorter run while working on the test.
fn churn_for() -> Duration {
    std::env::var("SB_CHURN_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(CHURN_FOR, Duration::from_secs)
}
/// Source addresses 127.0.0.1..=N: 120k connections with the server's side of each in
/// TIME_WAIT for 60 s need more 4-tuples than one address's ephemeral ports.
const CHURN_SOURCES: u8 = 16;
/// Client tasks dialing at once.
const CHURN_WORKERS: usize = 64;

/// Open database files at most: SQLite keeps the database, its WAL and its shared memory
/// open per connection, and the store pools 1 writer and 8 readers.
const DB_FDS_MAX: usize = 9 * 3;

/// What the server process looks like from outside.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Sample {
    rss_kb: u64,
    fds: usize,
    /// Of `fds`: sockets, pipes and other kernel objects (listener, epoll, eventfds).
    kernel_fds: usize,
    /// Of `fds`: files in the data directory (SQLite's database, WAL and shared memory, per
    /// pooled connection: bounded by the store's pools, not by clients).
    db_fds: usize,
    threads: u64,
    connections: i64,
    subscriptions: i64,
    doc_connections: i64,
    tasks: i64,
}

fn proc_status(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("{key} in /proc/{pid}/status"))
}

fn gauge(metrics: &str, name: &str) -> i64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as i64)
        .unwrap_or_else(|| panic!("gauge {name} in /metrics"))
}

/// What the process's open files are: the targets of `/proc/<pid>/fd/*`, with socket and
/// pipe inode numbers cut off so that kinds can be counted.
fn fd_kinds(pid: u32) -> BTreeMap<String, usize> {
    let mut kinds = BTreeMap::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .flatten()
    {
        let Ok(target) = std::fs::read_link(fd.path()) else {
            continue;
        };
        let t = target.to_string_lossy();
        let kind = match t.split_once(":[") {
            Some((k, _)) => k.to_string(),
            None => t.into_owned(),
        };
        *kinds.entry(kind).or_default() += 1;
    }
    kinds
}

async fn sample(http: &str, pid: u32, data_dir: &Path) -> Sample {
    let metrics = common::http()
        .get(format!("{http}/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body");
    let kinds = fd_kinds(pid);
    Sample {
        rss_kb: proc_status(pid, "VmRSS:"),
        fds: kinds.values().sum(),
        kernel_fds: kinds
            .iter()
            .filter(|(k, _)| !k.starts_with('/'))
            .map(|(_, n)| n)
            .sum(),
        db_fds: kinds
            .iter()
            .filter(|(k, _)| Path::new(k.as_str()).starts_with(data_dir))
            .map(|(_, n)| n)
            .sum(),
        threads: proc_status(pid, "Threads:"),
        connections: gauge(&metrics, "switchboard_connections"),
        subscriptions: gauge(&metrics, "switchboard_subscriptions"),
        doc_connections: gauge(&metrics, "switchboard_doc_connections"),
        tasks: gauge(&metrics, "switchboard_tasks"),
    }
}

#[derive(Default)]
struct ChurnCounts {
    done: AtomicU64,
    failed: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
}

/// One connection's life. `kind` picks what it does: connect and close; connect, subscribe
/// and close; connect and drop the TCP connection with a reset; or a document connection
/// that syncs and closes.
async fn churn_one(
    addr: SocketAddr,
    source: IpAddr,
    kind: u64,
    user: i64,
    doc_id: i64,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0)).context("bind")?;
    let tcp = socket.connect(addr).await.context("connect")?;
    tcp.set_nodelay(true)?;
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    if kind.is_multiple_of(10) {
        let url = format!("ws://{addr}/docs/{doc_id}?token={}", token(user));
        let (mut ws, _) = tokio_tungstenite::client_async_with_config(url, tcp, Some(config))
            .await
            .context("doc upgrade")?;
        ws.send(sync_msg(0, &[0])).await?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Binary(b))) if parse_sync(&b).is_some_and(|(s, _)| s == 1) => {
                    break
                }
                Some(Ok(Message::Close(c))) => anyhow::bail!("doc closed: {c:?}"),
                Some(Ok(_)) => {}
                other => anyhow::bail!("doc ended: {other:?}"),
            }
        }
        ws.close(None).await?;
        while let Some(Ok(_)) = ws.next().await {}
        return Ok(());
    }
    let url = format!("ws://{addr}/connection/websocket");
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(url, tcp, Some(config))
        .await
        .context("upgrade")?;
    let sub = format!("churn{}", kind % 50);
    let mut cmds = vec![json!({"id": 1, "connect": {"token": token(user)}})];
    if kind % 3 == 1 {
        cmds.push(json!({"id": 2, "subscribe": {"channel": sub}}));
    }
    let want = cmds.len();
    let frame = cmds
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n");
    ws.send(Message::text(frame)).await?;
    let mut replies = 0;
    while replies < want {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                for line in t.split('\n') {
                    if line.contains("\"error\"") {
                        anyhow::bail!("error reply: {line}");
                    }
                    if line.starts_with("{\"id\":") {
                        replies += 1;
                    }
                }
            }
            Some(Ok(_)) => {}
            other => anyhow::bail!("ended before the replies: {other:?}"),
        }
    }
    if kind % 3 == 2 {
        // Gone without a Close frame: the server finds out from the reset.
        let tcp = ws.into_inner();
        socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO))?;
        drop(tcp);
        return Ok(());
    }
    ws.close(None).await?;
    while let Some(Ok(_)) = ws.next().await {}
    Ok(())
}

/// Runs connections at `rate` per second until `until`, spread over `CHURN_WORKERS` tasks.
async fn churn(
    addr: SocketAddr,
    rate: u64,
    dur: Duration,
    user: i64,
    doc_id: i64,
) -> Arc<ChurnCounts> {
    let counts = Arc::new(ChurnCounts::default());
    let ticket = Arc::new(AtomicU64::new(0));
    let start = tokio::time::Instant::now();
    let total = rate * dur.as_millis() as u64 / 1000;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CHURN_WORKERS {
        let (counts, ticket) = (counts.clone(), ticket.clone());
        tasks.spawn(async move {
            loop {
                let i = ticket.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                tokio::time::sleep_until(start + Duration::from_micros(i * 1_000_000 / rate)).await;
                let source = IpAddr::V4(Ipv4Addr::new(
                    127,
                    0,
                    0,
                    1 + (i % CHURN_SOURCES as u64) as u8,
                ));
                let r = tokio::time::timeout(
                    Duration::from_secs(10),
                    churn_one(addr, source, i, user, doc_id),
                )
                .await;
                let err = match r {
                    Ok(Ok(())) => {
                        counts.done.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    Ok(Err(e)) => format!("{e:#}"),
                    Err(_) => "timed out".to_string(),
                };
                counts.failed.fetch_add(1, Ordering::Relaxed);
                *counts.errors.lock().unwrap().entry(err).or_default() += 1;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    counts
}

/// 2,000 connects and disconnects per second for 60 s against one server process leave no
/// trace: open files, connection and subscription gauges and tracked tasks return to their
/// baseline; memory and threads stay within a small slack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_churn_leaks_nothing() {
    let _turn = TURN.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let url = format!("sqlite://{}/switchboard.db", data.display());
    let (user, doc_id) = {
        let store = switchboard_store::open(&url).await.expect("open");
        let user = new_user(&*store, "churner").await;
        let doc = store
            .create_document(NewDocument {
                owner_id: user,
                title: "churn".into(),
            })
            .await
            .expect("document");
        store.close().await;
        (user, doc.id)
    };
    let server = Proc::start(
        &data,
        &[
            ("SWITCHBOARD_CLIENT__COMMAND_RATE", "100000"),
            ("SWITCHBOARD_CLIENT__COMMAND_BURST", "100000"),
        ],
    )
    .await;

    // Warm up first: thread pools, allocator arenas and the document reach their steady
    // state, which is the baseline a leak is measured against.
    let warm = churn(
        server.addr(),
        CHURN_RATE,
        Duration::from_secs(5),
        user,
        doc_id,
    )
    .await;
    assert_eq!(
        warm.failed.load(Ordering::Relaxed),
        0,
        "warm-up failures: {:?}",
        warm.errors.lock().unwrap()
    );
    let idle = |s: &Sample| s.connections == 0 && s.doc_connections == 0;
    let mut before = sample(&server.http(), server.pid, &data).await;
    for _ in 0..100 {
        if idle(&before) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        before = sample(&server.http(), server.pid, &data).await;
    }
    assert!(idle(&before), "idle after the warm-up: {before:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = sample(&server.http(), server.pid, &data).await;
    let fds_before = fd_kinds(server.pid);

    let started = Instant::now();
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let sampler = {
        let (http, pid, data) = (server.http(), server.pid, data.clone());
        tokio::spawn(async move {
            let (mut peak_rss, mut peak_fds) = (0, 0);
            loop {
                tokio::select! {
                    _ = stop_rx.changed() => return (peak_rss, peak_fds),
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
                if let Ok(s) =
                    tokio::time::timeout(Duration::from_secs(2), sample(&http, pid, &data)).await
                {
                    peak_rss = peak_rss.max(s.rss_kb);
                    peak_fds = peak_fds.max(s.fds);
                }
            }
        })
    };
    let counts = churn(server.addr(), CHURN_RATE, churn_for(), user, doc_id).await;
    let elapsed = started.elapsed();
    stop_tx.send_replace(true);
    let (peak_rss, peak_fds) = sampler.await.expect("sampler");
    let done = counts.done.load(Ordering::Relaxed);
    let failed = counts.failed.load(Ordering::Relaxed);

    // Closing connections finish their close handshakes; then everything is back.
    let mut after = sample(&server.http(), server.pid, &data).await;
    for _ in 0..150 {
        if idle(&after) && after.kernel_fds <= before.kernel_fds && after.tasks <= before.tasks {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = sample(&server.http(), server.pid, &data).await;
    }
    let rate = done as f64 / elapsed.as_secs_f64();
    eprintln!(
        "churn: {done} connections in {elapsed:?} ({rate:.0}/s), {failed} failed {:?}; \
         before {before:?}; after {after:?}; peak RSS {peak_rss} kB, peak fds {peak_fds}",
        counts.errors.lock().unwrap()
    );
    assert!(
        failed * 1000 <= done,
        "at most 0.1% of connections fail: {failed} of {done}: {:?}",
        counts.errors.lock().unwrap()
    );
    assert!(
        rate >= CHURN_RATE as f64 * 0.8,
        "the churn ran at {rate:.0}/s, not {CHURN_RATE}/s (machine overloaded?)"
    );
    assert_eq!(after.connections, before.connections, "connection gauge");
    assert_eq!(
        after.doc_connections, before.doc_connections,
        "document connection gauge"
    );
    assert_eq!(
        after.subscriptions, before.subscriptions,
        "subscription gauge"
    );
    assert!(
        after.tasks <= before.tasks,
        "tracked tasks: {} -> {}",
        before.tasks,
        after.tasks
    );
    // Every socket is closed again; only the store's pools may have opened (a bounded
    // number of) database connections for the document reads.
    let fds_after = fd_kinds(server.pid);
    assert!(
        after.kernel_fds <= before.kernel_fds,
        "sockets and other kernel fds: {} -> {}: {fds_before:?} -> {fds_after:?}",
        before.kernel_fds,
        after.kernel_fds
    );
    assert_eq!(
        after.fds - after.kernel_fds - after.db_fds,
        before.fds - before.kernel_fds - before.db_fds,
        "other open files: {fds_before:?} -> {fds_after:?}"
    );
    assert!(
        after.db_fds <= DB_FDS_MAX,
        "database files: {} -> {}: {fds_before:?} -> {fds_after:?}",
        before.db_fds,
        after.db_fds
    );
    assert!(
        after.threads <= before.threads + 4,
        "threads: {} -> {}",
        before.threads,
        after.threads
    );
    // Allocator retention: freed memory is not always returned to the OS. A leak of even
    // 100 bytes per connection would be 12 MB here.
    let slack_kb = (before.rss_kb / 4).max(8 * 1024);
    assert!(
        after.rss_kb <= before.rss_kb + slack_kb,
        "RSS {} kB -> {} kB (slack {slack_kb} kB)",
        before.rss_kb,
        after.rss_kb
    );
    server.stop().await;
}
