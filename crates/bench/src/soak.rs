//! `bench soak`: a long, steady, mixed load against one server, with the server process
//! sampled every few seconds. The question is whether anything grows without bound: the
//! verdict is "flat line".
//!
//! **Load.** `--conns` connections in all (15,000 by default: one bench process must stay
//! under its open-files limit, 20,000 here), spread over source addresses
//! 127.0.0.1..=127.0.0.`--sources`:
//! - *chat:* `--rooms` rooms of `--members` users, registered and logged in over REST as in
//!   `bench chat` (users `<prefix>-<n>`, reused on re-runs). Each member is subscribed to
//!   its room and sends `--chat-rate` messages per second with a `client_msg_id`; each
//!   checks that it sees its room's offsets 1, 2, 3 … with no gap, repeat or reordering.
//! - *documents:* `--docs` documents with `--editors` y-websocket connections each. Every
//!   editor applies what it receives and appends a character `--edit-rate` times per second;
//!   at the end every editor's text and the server's (`GET /v1/documents/{id}/content`) must
//!   be equal.
//! - *idle:* the rest, connected with minted tokens (`sub = bench-<i>`) and subscribed to one
//!   of `--channels` channels, on which one more connection publishes `--publish-rate`
//!   messages per second in all. Every delivery is counted against what was expected.
//!
//! **Samples.** Every `--sample-every`: the server's RSS, open files, threads and CPU time
//! (`/proc/PID`), and its `/metrics` gauges (connections, subscriptions, document
//! connections, loaded documents, tracked tasks), plus the load's counters so far.
//!
//! **Verdict.** Pass when, over the second half of the run: RSS (mean of the last three
//! samples against the three around the midpoint) grew less than `--max-rss-growth-pct`;
//! open files and threads stayed within `--fd-band` and `--thread-band` of each other;
//! and, over the whole run, no connection was dropped, every chat send was acknowledged
//! with no error and no order violation, nothing published was lost, and the documents
//! converged. `reasons` lists what failed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use yrs::{Doc, GetString, Transact};

use crate::chat::{self, ChatArgs};
use crate::client::{open_all, pong, request_reply, Dialer, ErrorSample, Opened, Ws};
use crate::docs::{self, Frame};
use crate::wire::{self, Line};
use crate::{procfs, round3, Target};

/// Read chunk per connection: small, 15,000 of them are held.
const READ_BUFFER: usize = 4096;
/// After the load stops, how long in-flight messages get to arrive before the checks.
const SETTLE: Duration = Duration::from_secs(3);
const CLOSE_GRACE: Duration = Duration::from_secs(10);
const HTTP_TIMEOUT: Duration = Duration::from_secs(60);
/// Open files the bench needs besides its connections (stdio, runtime, HTTP client).
const FD_RESERVE: usize = 200;

#[derive(clap::Args, Debug, Clone)]
pub struct SoakArgs {
    #[command(flatten)]
    pub target: Target,
    /// Base URL of the REST API (accounts, rooms, documents, /metrics). Default: the
    /// WebSocket URL's host and port over http.
    #[arg(long)]
    pub base_url: Option<String>,
    /// How long the load runs (setup excluded).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Connections in all: chat members, document editors, one publisher and idle
    /// subscribers (the rest).
    #[arg(long, default_value_t = 15_000)]
    pub conns: usize,
    /// Chat rooms.
    #[arg(long, default_value_t = 20)]
    pub rooms: usize,
    /// Members per room, each one registered user with one connection.
    #[arg(long, default_value_t = 10)]
    pub members: usize,
    /// Messages per second sent by each chat member.
    #[arg(long, default_value_t = 0.5)]
    pub chat_rate: f64,
    /// Documents being edited.
    #[arg(long, default_value_t = 10)]
    pub docs: usize,
    /// Editor connections per document.
    #[arg(long, default_value_t = 10)]
    pub editors: usize,
    /// Edits per second per editor.
    #[arg(long, default_value_t = 1.0)]
    pub edit_rate: f64,
    /// Channels the idle connections subscribe to (round robin).
    #[arg(long, default_value_t = 100)]
    pub channels: usize,
    /// Publications per second over all channels (each reaches that channel's idle
    /// subscribers).
    #[arg(long, default_value_t = 20.0)]
    pub publish_rate: f64,
    /// Time between samples of the server process.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub sample_every: Duration,
    /// Verdict: most RSS growth allowed over the second half, in percent.
    #[arg(long, default_value_t = 5.0)]
    pub max_rss_growth_pct: f64,
    /// Verdict: largest spread of open files over the second half.
    #[arg(long, default_value_t = 32)]
    pub fd_band: u64,
    /// Verdict: largest spread of threads over the second half.
    #[arg(long, default_value_t = 8)]
    pub thread_band: u64,
    /// WebSocket setups in flight at once.
    #[arg(long, default_value_t = 200)]
    pub concurrency: usize,
    /// REST calls in flight at once during setup (register and login hash a password).
    #[arg(long, default_value_t = 4)]
    pub setup_concurrency: usize,
    /// Chat users are `<prefix>-<n>`, reused on re-runs.
    #[arg(long, default_value = "soak")]
    pub user_prefix: String,
    #[arg(long, default_value = "bench-password")]
    pub password: String,
}

/// One reading of the server and of the load.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SoakSample {
    pub t_s: f64,
    pub rss_kb: Option<u64>,
    pub fds: Option<u64>,
    pub threads: Option<u64>,
    pub cpu_s: Option<f64>,
    /// `/metrics` gauges (absent when the server does not have them).
    pub connections: Option<i64>,
    pub subscriptions: Option<i64>,
    pub doc_connections: Option<i64>,
    pub docs_loaded: Option<i64>,
    pub tasks: Option<i64>,
    /// Load counters so far.
    pub chat_acked: u64,
    pub doc_edits: u64,
    pub deliveries: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct Verdict {
    pub pass: bool,
    /// RSS at the end against the midpoint (means of three samples), in percent.
    pub rss_growth_second_half_pct: Option<f64>,
    /// max − min over the second half.
    pub fd_band_second_half: Option<u64>,
    pub thread_band_second_half: Option<u64>,
    pub reasons: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct SoakReport {
    pub bench: &'static str,
    pub duration_s: f64,
    pub conns: usize,
    pub connected: usize,
    pub failed: usize,
    pub setup_s: f64,
    pub connect_s: f64,
    pub chat_members: usize,
    pub chat_sent: u64,
    pub chat_acked: u64,
    pub chat_errors: u64,
    pub chat_order_violations: u64,
    pub chat_deliveries: u64,
    pub doc_editors: usize,
    pub doc_edits: u64,
    pub docs_converged: bool,
    /// Documents whose editors or server text disagreed.
    pub docs_diverged: Vec<i64>,
    pub idle: usize,
    pub published: u64,
    pub publish_errors: u64,
    pub expected_deliveries: u64,
    pub deliveries: u64,
    /// Connections the server closed during the run.
    pub disconnected: usize,
    pub server_pid: Option<u32>,
    pub server_cpu_s: Option<f64>,
    pub bench_cpu_s: Option<f64>,
    pub cores_busy: Option<Vec<f64>>,
    pub verdict: Verdict,
    pub samples: Vec<SoakSample>,
    pub errors: Vec<String>,
}

/// Counters shared by the connection tasks.
#[derive(Default)]
struct Shared {
    chat_sent: AtomicU64,
    chat_acked: AtomicU64,
    chat_errors: AtomicU64,
    chat_violations: AtomicU64,
    chat_deliveries: AtomicU64,
    doc_edits: AtomicU64,
    published: Vec<AtomicU64>,
    publish_errors: AtomicU64,
    subscribers: Vec<AtomicUsize>,
    deliveries: AtomicU64,
    disconnected: AtomicUsize,
    /// Each editor's final text, by document index.
    texts: Mutex<BTreeMap<usize, Vec<String>>>,
    errors: Mutex<ErrorSample>,
}

impl Shared {
    fn error(&self, e: anyhow::Error) {
        lock(&self.errors).add(&e);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The load's phases, as seen by every connection task.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    /// Connected, waiting for the others.
    Ready,
    /// Sending.
    Load,
    /// Stopped sending; still reading what arrives.
    Settle,
    /// Close and report.
    Stop,
}

pub async fn run(args: SoakArgs) -> anyhow::Result<SoakReport> {
    let chat_members = args.rooms * args.members;
    let doc_editors = args.docs * args.editors;
    let fixed = chat_members + doc_editors + 1;
    if args.conns < fixed {
        bail!(
            "--conns {} is less than the chat members, editors and publisher ({fixed})",
            args.conns
        );
    }
    if args.channels == 0 || args.sample_every.is_zero() {
        bail!("--channels and --sample-every must be positive");
    }
    let idle = args.conns - fixed;
    if let Some(limit) = procfs::open_files_soft_limit() {
        if (args.conns + FD_RESERVE) as u64 > limit {
            bail!(
                "--conns {} needs about {} open files, but the limit is {limit}: lower --conns \
                 or raise `ulimit -n`",
                args.conns,
                args.conns + FD_RESERVE
            );
        }
    }
    let dialer = Arc::new(Dialer::new(&args.target, READ_BUFFER).await?);
    let pid = procfs::server_pid(args.target.server_pid, dialer.port());
    let base = match &args.base_url {
        Some(b) => b.trim_end_matches('/').to_owned(),
        None => http_base(&args.target.url)?,
    };
    let http = reqwest::Client::builder()
        .timeout(HTTP_TIMEOUT)
        .build()
        .context("HTTP client")?;

    // Setup: chat users and rooms (as `bench chat` makes them), documents.
    let setup_started = Instant::now();
    let chat_args = ChatArgs {
        base_url: base.clone(),
        url: Some(args.target.url.clone()),
        server_pid: pid,
        sources: args.target.sources,
        rooms: args.rooms.max(1),
        users: args.members.max(1),
        rate: args.chat_rate.max(f64::MIN_POSITIVE),
        size: 0,
        duration: args.duration,
        warmup: Duration::ZERO,
        concurrency: args.concurrency,
        setup_concurrency: args.setup_concurrency,
        user_prefix: args.user_prefix.clone(),
        password: args.password.clone(),
    };
    // One account at least: it owns the documents.
    let accounts = chat::create_accounts(&http, &base, &chat_args, chat_members.max(1)).await?;
    let room_ids = if chat_members > 0 {
        let tag = format!("soak {:x}", crate::client::now_ns() / 1_000_000);
        chat::create_rooms(&http, &base, &chat_args, &accounts, &tag).await?
    } else {
        Vec::new()
    };
    let owner = &accounts[0];
    let mut doc_ids = Vec::new();
    for d in 0..args.docs {
        doc_ids.push(create_document(&http, &base, &owner.token, d).await?);
    }
    let setup_s = round3(setup_started.elapsed().as_secs_f64());
    eprintln!(
        "bench soak: {chat_members} chat members in {} rooms, {} documents ready in {setup_s} s",
        room_ids.len(),
        doc_ids.len()
    );

    // Tokens outlive the run (access tokens from login expire in 15 minutes).
    let ttl = args.duration.as_secs() + 3600;
    let chat_tokens: Vec<String> = accounts
        .iter()
        .take(chat_members)
        .map(|a| dialer.token_for(&a.id.to_string(), ttl))
        .collect::<anyhow::Result<_>>()?;
    let owner_token = dialer.token_for(&owner.id.to_string(), ttl)?;
    let ws_base = ws_origin(&args.target.url)?;

    let shared = Arc::new(Shared {
        published: (0..args.channels).map(|_| AtomicU64::new(0)).collect(),
        subscribers: (0..args.channels).map(|_| AtomicUsize::new(0)).collect(),
        ..Shared::default()
    });
    let (phase_tx, phase_rx) = watch::channel(Phase::Ready);

    let connect_started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut connected = 0;
    let mut failed = 0;
    // Each group's tasks keep running under one waiter task in `tasks`; aborting it drops
    // (and so aborts) the group.
    let mut absorb = |o: Opened, tasks: &mut tokio::task::JoinSet<()>| {
        connected += o.connected;
        failed += o.failed;
        lock(&shared.errors).extend(o.errors);
        let mut group = o.tasks;
        tasks.spawn(async move { while group.join_next().await.is_some() {} });
    };

    // Chat members: connection i is member i (room i / members).
    {
        let (dialer, shared2, phase) = (dialer.clone(), shared.clone(), phase_rx.clone());
        let tokens = Arc::new(chat_tokens);
        let channels: Arc<Vec<String>> =
            Arc::new(room_ids.iter().map(|id| format!("chat:{id}")).collect());
        let (members, rate) = (args.members, args.chat_rate);
        let channels_run = channels.clone();
        let opened = open_all(
            chat_members,
            args.concurrency,
            move |i| {
                let (dialer, tokens, channels) = (dialer.clone(), tokens.clone(), channels.clone());
                async move {
                    let mut ws = dialer.open_with_token(i, &tokens[i]).await?;
                    let sub = serde_json::json!({"id": 2, "subscribe": {"channel": channels[i / members]}});
                    request_reply(&mut ws, 2, sub.to_string(), "subscribe").await?;
                    Ok(ws)
                }
            },
            move |i, ws| {
                let (shared, phase) = (shared2.clone(), phase.clone());
                let channel = channels_run[i / members].clone();
                async move { chat_member(ws, i, channel, rate, &shared, phase).await }
            },
        )
        .await;
        absorb(opened, &mut tasks);
    }
    // Editors: connection chat_members + j edits document j / editors.
    {
        let (dialer, shared2, phase) = (dialer.clone(), shared.clone(), phase_rx.clone());
        let urls: Arc<Vec<String>> = Arc::new(
            doc_ids
                .iter()
                .map(|id| format!("{ws_base}/docs/{id}?token={owner_token}"))
                .collect(),
        );
        let (editors, rate, first) = (args.editors, args.edit_rate, chat_members);
        let opened = open_all(
            doc_editors,
            args.concurrency,
            move |j| {
                let (dialer, urls) = (dialer.clone(), urls.clone());
                async move {
                    let doc = Doc::new();
                    let ws = docs::join(&dialer, first + j, &urls[j / editors], &doc).await?;
                    Ok((ws, doc))
                }
            },
            move |j, (ws, doc)| {
                let (shared, phase) = (shared2.clone(), phase.clone());
                async move { editor(ws, doc, j, j / editors, rate, &shared, phase).await }
            },
        )
        .await;
        absorb(opened, &mut tasks);
    }
    // Idle subscribers, then the publisher.
    {
        let first = chat_members + doc_editors;
        let (idle_dialer, shared2, shared3, phase) = (
            dialer.clone(),
            shared.clone(),
            shared.clone(),
            phase_rx.clone(),
        );
        let channels = args.channels;
        let opened = open_all(
            idle,
            args.concurrency,
            move |k| {
                let (dialer, shared) = (idle_dialer.clone(), shared2.clone());
                async move {
                    let mut ws = dialer.open(first + k).await?;
                    let c = k % channels;
                    let sub =
                        serde_json::json!({"id": 2, "subscribe": {"channel": format!("soak-{c}")}});
                    request_reply(&mut ws, 2, sub.to_string(), "subscribe").await?;
                    shared.subscribers[c].fetch_add(1, Ordering::Relaxed);
                    Ok(ws)
                }
            },
            move |_, ws| {
                let (shared, phase) = (shared3.clone(), phase.clone());
                async move { idle_subscriber(ws, &shared, phase).await }
            },
        )
        .await;
        absorb(opened, &mut tasks);
        let mut ws = dialer.open(first + idle).await.context("publisher")?;
        connected += 1;
        let (shared, phase, rate) = (shared.clone(), phase_rx.clone(), args.publish_rate);
        tasks.spawn(async move {
            if let Err(e) = publisher(&mut ws, channels, rate, &shared, phase).await {
                shared.error(e);
            }
            let _ = ws.close(None).await;
        });
    }
    let connect_s = round3(connect_started.elapsed().as_secs_f64());
    eprintln!(
        "bench soak: {connected} of {} connections open in {connect_s} s ({failed} failed); load for {:?}",
        args.conns, args.duration
    );

    // Load, with samples.
    let started = Instant::now();
    let server_cpu_start = pid.and_then(|p| procfs::cpu_seconds(Some(p)));
    let bench_cpu_start = procfs::cpu_seconds(None);
    let cores_start = procfs::core_ticks();
    let _ = phase_tx.send(Phase::Load);
    let mut samples = Vec::new();
    let mut next = started;
    let mut last_report = started;
    while next <= started + args.duration {
        tokio::time::sleep_until(next.into()).await;
        let s = take_sample(&http, &base, pid, started, &shared).await;
        if last_report.elapsed() >= Duration::from_secs(60) {
            last_report = Instant::now();
            eprintln!(
                "bench soak: {:.0} s: rss {:?} kB, fds {:?}, threads {:?}, connections {:?}, chat acked {}, deliveries {}",
                s.t_s, s.rss_kb, s.fds, s.threads, s.connections, s.chat_acked, s.deliveries
            );
        }
        samples.push(s);
        next += args.sample_every;
    }
    let server_cpu = pid
        .and_then(|p| procfs::cpu_seconds(Some(p)))
        .zip(server_cpu_start)
        .map(|(b, a)| round3(b - a));
    let bench_cpu = procfs::cpu_seconds(None)
        .zip(bench_cpu_start)
        .map(|(b, a)| round3(b - a));
    let cores_busy = cores_start.zip(procfs::core_ticks()).map(|(a, b)| {
        procfs::busy_fractions(&a, &b)
            .into_iter()
            .map(round3)
            .collect()
    });

    // Stop sending, let the last messages arrive, then close and check.
    let _ = phase_tx.send(Phase::Settle);
    tokio::time::sleep(SETTLE).await;
    let _ = phase_tx.send(Phase::Stop);
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();

    let (docs_converged, docs_diverged) =
        check_docs(&http, &base, &owner.token, &doc_ids, &shared).await;
    let expected_deliveries: u64 = shared
        .published
        .iter()
        .zip(&shared.subscribers)
        .map(|(p, s)| p.load(Ordering::Relaxed) * s.load(Ordering::Relaxed) as u64)
        .sum();
    let mut report = SoakReport {
        bench: "soak",
        duration_s: round3(args.duration.as_secs_f64()),
        conns: args.conns,
        connected,
        failed,
        setup_s,
        connect_s,
        chat_members,
        chat_sent: shared.chat_sent.load(Ordering::Relaxed),
        chat_acked: shared.chat_acked.load(Ordering::Relaxed),
        chat_errors: shared.chat_errors.load(Ordering::Relaxed),
        chat_order_violations: shared.chat_violations.load(Ordering::Relaxed),
        chat_deliveries: shared.chat_deliveries.load(Ordering::Relaxed),
        doc_editors,
        doc_edits: shared.doc_edits.load(Ordering::Relaxed),
        docs_converged,
        docs_diverged,
        idle,
        published: shared
            .published
            .iter()
            .map(|p| p.load(Ordering::Relaxed))
            .sum(),
        publish_errors: shared.publish_errors.load(Ordering::Relaxed),
        expected_deliveries,
        deliveries: shared.deliveries.load(Ordering::Relaxed),
        disconnected: shared.disconnected.load(Ordering::Relaxed),
        server_pid: pid,
        server_cpu_s: server_cpu,
        bench_cpu_s: bench_cpu,
        cores_busy,
        verdict: Verdict::default(),
        samples,
        errors: lock(&shared.errors).snapshot(),
    };
    report.verdict = verdict(&report, &args);
    Ok(report)
}

/// `ws://host:port/...` → `http://host:port`.
fn http_base(ws_url: &str) -> anyhow::Result<String> {
    let origin = ws_origin(ws_url)?;
    Ok(origin.replacen("ws://", "http://", 1))
}

/// `ws://host:port/...` → `ws://host:port`.
fn ws_origin(ws_url: &str) -> anyhow::Result<String> {
    let rest = ws_url
        .strip_prefix("ws://")
        .ok_or_else(|| anyhow!("--url must be ws://host:port/..."))?;
    let authority = rest.split('/').next().unwrap_or(rest);
    Ok(format!("ws://{authority}"))
}

async fn create_document(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    n: usize,
) -> anyhow::Result<i64> {
    let reply = http
        .post(format!("{base}/v1/documents"))
        .bearer_auth(token)
        .json(&serde_json::json!({"title": format!("soak {n}")}))
        .send()
        .await
        .context("create document")?;
    let status = reply.status();
    let body: serde_json::Value = reply.json().await.context("document reply")?;
    if !status.is_success() {
        bail!("create document: {status} {body}");
    }
    body["document"]["id"]
        .as_i64()
        .ok_or_else(|| anyhow!("document reply without an id: {body}"))
}

/// A `/metrics` gauge or counter value by exact name.
fn metric(text: &str, name: &str) -> Option<i64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as i64)
}

async fn take_sample(
    http: &reqwest::Client,
    base: &str,
    pid: Option<u32>,
    started: Instant,
    shared: &Shared,
) -> SoakSample {
    let metrics = async {
        let r = http
            .get(format!("{base}/metrics"))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?;
        r.text().await.ok()
    }
    .await
    .unwrap_or_default();
    SoakSample {
        t_s: round3(started.elapsed().as_secs_f64()),
        rss_kb: pid.and_then(|p| procfs::rss_kb(Some(p))),
        fds: pid.and_then(|p| procfs::fd_count(Some(p))),
        threads: pid.and_then(|p| procfs::threads(Some(p))),
        cpu_s: pid.and_then(|p| procfs::cpu_seconds(Some(p))).map(round3),
        connections: metric(&metrics, "switchboard_connections"),
        subscriptions: metric(&metrics, "switchboard_subscriptions"),
        doc_connections: metric(&metrics, "switchboard_doc_connections"),
        docs_loaded: metric(&metrics, "switchboard_docs_loaded"),
        tasks: metric(&metrics, "switchboard_tasks"),
        chat_acked: shared.chat_acked.load(Ordering::Relaxed),
        doc_edits: shared.doc_edits.load(Ordering::Relaxed),
        deliveries: shared.deliveries.load(Ordering::Relaxed),
    }
}

/// When the next send is due: `rate` per second, starting at a phase of its own so that
/// connections do not fire together.
fn interval(rate: f64) -> Option<Duration> {
    (rate.is_finite() && rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate))
}

fn phase_start(i: usize, every: Duration) -> tokio::time::Instant {
    let phase = (i as f64 * 0.618_033_988_75).fract();
    tokio::time::Instant::now() + every.mul_f64(phase)
}

/// Reads one message of a Centrifugo connection; `None` when the server ended it.
fn text_of(msg: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>) -> Option<Message> {
    match msg {
        Some(Ok(Message::Close(_))) | Some(Err(_)) | None => None,
        Some(Ok(m)) => Some(m),
    }
}

/// One chat member: sends at `rate` during the load and checks its room's offsets.
async fn chat_member(
    mut ws: Ws,
    i: usize,
    channel: String,
    rate: f64,
    shared: &Shared,
    mut phase: watch::Receiver<Phase>,
) {
    let every = interval(rate);
    let mut next = every.map(|e| phase_start(i, e));
    let mut id = 2u64;
    let mut seq = 0u64;
    let mut last_offset = 0i64;
    let mut current = *phase.borrow();
    loop {
        let due = async {
            match (current, next) {
                (Phase::Load, Some(t)) => tokio::time::sleep_until(t).await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            msg = ws.next() => {
                let Some(msg) = text_of(msg) else {
                    shared.disconnected.fetch_add(1, Ordering::Relaxed);
                    shared.error(anyhow!("chat member closed by the server"));
                    return;
                };
                let Message::Text(t) = msg else { continue };
                let mut pinged = false;
                for line in wire::lines(t.as_bytes()) {
                    match wire::classify(line) {
                        Line::Ping => pinged = true,
                        Line::Pub(_) => {
                            let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else { continue };
                            let offset = v["push"]["pub"]["offset"].as_i64().unwrap_or(0);
                            if offset == 0 {
                                continue; // typing, receipts: no offset
                            }
                            shared.chat_deliveries.fetch_add(1, Ordering::Relaxed);
                            if offset != last_offset + 1 {
                                shared.chat_violations.fetch_add(1, Ordering::Relaxed);
                            }
                            last_offset = offset;
                        }
                        Line::Other => {
                            if wire::is_error_reply(line) {
                                shared.chat_errors.fetch_add(1, Ordering::Relaxed);
                                shared.error(anyhow!("chat send: {}", String::from_utf8_lossy(line)));
                            } else if line.starts_with(b"{\"id\":") {
                                shared.chat_acked.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
                if pinged && ws.send(pong()).await.is_err() {
                    return;
                }
            }
            _ = due => {
                id += 1;
                seq += 1;
                let cmid = format!("soak-{i}-{seq}-{:x}", crate::client::now_ns());
                let cmd = serde_json::json!({"id": id, "publish": {"channel": channel,
                    "data": {"text": format!("soak message {seq} from member {i}"), "client_msg_id": cmid}}});
                shared.chat_sent.fetch_add(1, Ordering::Relaxed);
                if ws.send(Message::text(cmd.to_string())).await.is_err() {
                    shared.disconnected.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                next = next.zip(every).map(|(t, e)| t + e);
            }
            changed = phase.changed() => {
                if changed.is_err() { return; }
                current = *phase.borrow_and_update();
                if current == Phase::Stop {
                    let _ = ws.close(None).await;
                    return;
                }
            }
        }
    }
}

/// One editor of document `d`: applies what it receives and appends at `rate`; reports its
/// final text.
async fn editor(
    mut ws: Ws,
    doc: Doc,
    j: usize,
    d: usize,
    rate: f64,
    shared: &Shared,
    mut phase: watch::Receiver<Phase>,
) {
    let every = interval(rate);
    let mut next = every.map(|e| phase_start(j, e));
    let mut current = *phase.borrow();
    let ended = loop {
        let due = async {
            match (current, next) {
                (Phase::Load, Some(t)) => tokio::time::sleep_until(t).await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            msg = ws.next() => {
                let frame = match msg {
                    Some(Ok(Message::Binary(b))) => b,
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break true,
                    Some(Ok(_)) => continue,
                };
                match docs::parse_frame(&frame) {
                    Some(Frame::Step1(sv)) => match docs::step2_for(&doc, sv) {
                        Ok(reply) => if ws.send(reply).await.is_err() { break true },
                        Err(e) => shared.error(e),
                    },
                    Some(Frame::Step2(u) | Frame::Update(u)) => {
                        if let Err(e) = docs::apply(&doc, u) {
                            shared.error(e);
                        }
                    }
                    Some(Frame::Other) => {}
                    None => shared.error(anyhow!("malformed sync message from the server")),
                }
            }
            _ = due => {
                let update = docs::append_text(&doc, 1);
                let frame = docs::sync_frame(docs::SYNC_UPDATE, &update);
                shared.doc_edits.fetch_add(1, Ordering::Relaxed);
                if ws.send(Message::binary(frame)).await.is_err() {
                    break true;
                }
                next = next.zip(every).map(|(t, e)| t + e);
            }
            changed = phase.changed() => {
                if changed.is_err() { break false; }
                current = *phase.borrow_and_update();
                if current == Phase::Stop {
                    let _ = ws.close(None).await;
                    break false;
                }
            }
        }
    };
    if ended {
        shared.disconnected.fetch_add(1, Ordering::Relaxed);
        shared.error(anyhow!("document connection closed by the server"));
    }
    let text = {
        let t = doc.get_or_insert_text(docs::TEXT);
        let txn = doc.transact();
        t.get_string(&txn)
    };
    lock(&shared.texts).entry(d).or_default().push(text);
}

/// One idle subscriber: counts publications and answers pings.
async fn idle_subscriber(mut ws: Ws, shared: &Shared, mut phase: watch::Receiver<Phase>) {
    loop {
        tokio::select! {
            msg = ws.next() => {
                let Some(msg) = text_of(msg) else {
                    shared.disconnected.fetch_add(1, Ordering::Relaxed);
                    shared.error(anyhow!("idle subscriber closed by the server"));
                    return;
                };
                let Message::Text(t) = msg else { continue };
                let mut pinged = false;
                let mut pubs = 0;
                for line in wire::lines(t.as_bytes()) {
                    match wire::classify(line) {
                        Line::Ping => pinged = true,
                        Line::Pub(_) => pubs += 1,
                        Line::Other => {}
                    }
                }
                if pubs > 0 {
                    shared.deliveries.fetch_add(pubs, Ordering::Relaxed);
                }
                if pinged && ws.send(pong()).await.is_err() {
                    return;
                }
            }
            changed = phase.changed() => {
                if changed.is_err() || *phase.borrow_and_update() == Phase::Stop {
                    let _ = ws.close(None).await;
                    return;
                }
            }
        }
    }
}

/// Publishes round robin over the idle channels at `rate` per second during the load.
async fn publisher(
    ws: &mut Ws,
    channels: usize,
    rate: f64,
    shared: &Shared,
    mut phase: watch::Receiver<Phase>,
) -> anyhow::Result<()> {
    let every = interval(rate);
    let mut next = every.map(|_| tokio::time::Instant::now());
    let mut id = 1u64;
    let mut current = *phase.borrow();
    loop {
        let due = async {
            match (current, next) {
                (Phase::Load, Some(t)) => tokio::time::sleep_until(t).await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            msg = ws.next() => {
                let Some(msg) = text_of(msg) else {
                    shared.disconnected.fetch_add(1, Ordering::Relaxed);
                    bail!("publisher closed by the server");
                };
                let Message::Text(t) = msg else { continue };
                let mut pinged = false;
                for line in wire::lines(t.as_bytes()) {
                    if wire::classify(line) == Line::Ping {
                        pinged = true;
                    } else if wire::is_error_reply(line) {
                        shared.publish_errors.fetch_add(1, Ordering::Relaxed);
                        shared.error(anyhow!("publish: {}", String::from_utf8_lossy(line)));
                    }
                }
                if pinged {
                    ws.send(pong()).await?;
                }
            }
            _ = due => {
                id += 1;
                let c = (id as usize) % channels;
                let cmd = serde_json::json!({"id": id, "publish": {"channel": format!("soak-{c}"), "data": {"n": id}}});
                ws.send(Message::text(cmd.to_string())).await?;
                shared.published[c].fetch_add(1, Ordering::Relaxed);
                next = next.zip(every).map(|(t, e)| t + e);
            }
            changed = phase.changed() => {
                if changed.is_err() { return Ok(()); }
                current = *phase.borrow_and_update();
                if current == Phase::Stop {
                    return Ok(());
                }
            }
        }
    }
}

/// Whether every editor of each document ended with the same text as the server.
async fn check_docs(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    doc_ids: &[i64],
    shared: &Shared,
) -> (bool, Vec<i64>) {
    let texts = std::mem::take(&mut *lock(&shared.texts));
    let mut diverged = Vec::new();
    for (d, id) in doc_ids.iter().enumerate() {
        let server = async {
            let r = http
                .get(format!("{base}/v1/documents/{id}/content?format=text"))
                .bearer_auth(token)
                .send()
                .await
                .ok()?;
            r.status().is_success().then_some(())?;
            r.text().await.ok()
        }
        .await;
        let editors = texts.get(&d).map(Vec::as_slice).unwrap_or_default();
        let same = server
            .as_ref()
            .is_some_and(|s| !editors.is_empty() && editors.iter().all(|t| t == s));
        if !same {
            diverged.push(*id);
        }
    }
    (diverged.is_empty(), diverged)
}

fn mean(xs: &[u64]) -> Option<f64> {
    (!xs.is_empty()).then(|| xs.iter().sum::<u64>() as f64 / xs.len() as f64)
}

fn band(xs: impl Iterator<Item = u64>) -> Option<u64> {
    let v: Vec<u64> = xs.collect();
    Some(v.iter().max()? - v.iter().min()?)
}

/// The flat-line verdict (see the module docs).
fn verdict(r: &SoakReport, args: &SoakArgs) -> Verdict {
    let mut v = Verdict::default();
    let samples = &r.samples;
    let half = samples.len() / 2;
    let second = samples.get(half..).unwrap_or_default();
    let rss: Vec<u64> = samples.iter().filter_map(|s| s.rss_kb).collect();
    if rss.len() >= 6 {
        let mid = rss.len() / 2;
        let at_mid = mean(&rss[mid - 1..(mid + 2).min(rss.len())]);
        let at_end = mean(&rss[rss.len() - 3..]);
        v.rss_growth_second_half_pct = at_mid.zip(at_end).map(|(m, e)| round3((e - m) / m * 100.0));
    }
    v.fd_band_second_half = band(second.iter().filter_map(|s| s.fds));
    v.thread_band_second_half = band(second.iter().filter_map(|s| s.threads));
    let mut reasons = Vec::new();
    match v.rss_growth_second_half_pct {
        Some(g) if g >= args.max_rss_growth_pct => reasons.push(format!(
            "RSS grew {g}% over the second half (limit {}%)",
            args.max_rss_growth_pct
        )),
        None => reasons.push("too few RSS samples (is --server-pid right?)".into()),
        _ => {}
    }
    if let Some(b) = v.fd_band_second_half.filter(|&b| b > args.fd_band) {
        reasons.push(format!(
            "open files moved by {b} over the second half (limit {})",
            args.fd_band
        ));
    }
    if let Some(b) = v.thread_band_second_half.filter(|&b| b > args.thread_band) {
        reasons.push(format!(
            "threads moved by {b} over the second half (limit {})",
            args.thread_band
        ));
    }
    if r.failed > 0 {
        reasons.push(format!("{} connections failed to open", r.failed));
    }
    if r.disconnected > 0 {
        reasons.push(format!(
            "{} connections were closed by the server",
            r.disconnected
        ));
    }
    if r.chat_errors > 0 || r.chat_acked < r.chat_sent {
        reasons.push(format!(
            "chat: {} sent, {} acknowledged, {} errors",
            r.chat_sent, r.chat_acked, r.chat_errors
        ));
    }
    if r.chat_order_violations > 0 {
        reasons.push(format!(
            "chat: {} order violations",
            r.chat_order_violations
        ));
    }
    if r.publish_errors > 0 || r.deliveries < r.expected_deliveries {
        reasons.push(format!(
            "fan-out: {} of {} deliveries, {} publish errors",
            r.deliveries, r.expected_deliveries, r.publish_errors
        ));
    }
    if !r.docs_converged {
        reasons.push(format!("documents did not converge: {:?}", r.docs_diverged));
    }
    v.pass = reasons.is_empty();
    v.reasons = reasons;
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(samples: Vec<SoakSample>) -> SoakReport {
        SoakReport {
            bench: "soak",
            duration_s: 0.0,
            conns: 0,
            connected: 0,
            failed: 0,
            setup_s: 0.0,
            connect_s: 0.0,
            chat_members: 0,
            chat_sent: 10,
            chat_acked: 10,
            chat_errors: 0,
            chat_order_violations: 0,
            chat_deliveries: 0,
            doc_editors: 0,
            doc_edits: 0,
            docs_converged: true,
            docs_diverged: Vec::new(),
            idle: 0,
            published: 0,
            publish_errors: 0,
            expected_deliveries: 5,
            deliveries: 5,
            disconnected: 0,
            server_pid: None,
            server_cpu_s: None,
            bench_cpu_s: None,
            cores_busy: None,
            verdict: Verdict::default(),
            samples,
            errors: Vec::new(),
        }
    }

    fn samples(rss: &[u64], fds: &[u64]) -> Vec<SoakSample> {
        rss.iter()
            .zip(fds)
            .map(|(&r, &f)| SoakSample {
                rss_kb: Some(r),
                fds: Some(f),
                threads: Some(10),
                ..SoakSample::default()
            })
            .collect()
    }

    fn args() -> SoakArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            soak: SoakArgs,
        }
        Cli::parse_from(["soak", "--secret", "s"]).soak
    }

    #[test]
    fn flat_line_passes() {
        let r = report(samples(
            &[
                100_000, 120_000, 121_000, 121_500, 121_000, 121_200, 121_400, 121_300,
            ],
            &[
                15_040, 15_041, 15_040, 15_042, 15_040, 15_041, 15_040, 15_041,
            ],
        ));
        let v = verdict(&r, &args());
        assert!(v.pass, "{:?}", v.reasons);
        assert_eq!(v.fd_band_second_half, Some(1));
        assert!(v.rss_growth_second_half_pct.unwrap() < 1.0);
    }

    #[test]
    fn growth_and_lost_deliveries_fail() {
        let mut r = report(samples(
            &[
                100_000, 110_000, 120_000, 130_000, 140_000, 150_000, 160_000, 170_000,
            ],
            &[
                15_040, 15_041, 15_040, 15_100, 15_200, 15_300, 15_400, 15_500,
            ],
        ));
        r.deliveries = 4;
        let v = verdict(&r, &args());
        assert!(!v.pass);
        assert_eq!(v.reasons.len(), 3, "{:?}", v.reasons);
    }

    #[test]
    fn urls() {
        assert_eq!(
            http_base("ws://127.0.0.1:8100/connection/websocket").unwrap(),
            "http://127.0.0.1:8100"
        );
        assert!(ws_origin("wss://x/y").is_err());
        assert_eq!(
            metric("a 1\nswitchboard_tasks 42\n", "switchboard_tasks"),
            Some(42)
        );
        assert_eq!(
            metric("switchboard_tasks_total 1\n", "switchboard_tasks"),
            None
        );
    }
}
