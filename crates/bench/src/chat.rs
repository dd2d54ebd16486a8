//! `bench chat`: R rooms of U members each. Every member is one user with one connection,
//! subscribed to its room's channel `chat:ID`, and sends M messages per second into it.
//!
//! **Setup, not measured.** Users `<prefix>-0 ..` are registered over REST (an existing user
//! is reused: a 409 is fine) and log in; the access token is the connection token. Password
//! hashing costs tens of ms per call on the server, so this runs with `--setup-concurrency`
//! calls in flight. The first member of each room creates it as a private room with the
//! others as members. Rooms are new on every run, so their offsets start at 1.
//!
//! **Load.** Each member sends on its own clock, spread evenly over one send interval so that
//! the members do not fire together: `{"id":N,"publish":{"channel":"chat:ID","data":
//! {"text":"see you at…","client_msg_id":"<run>-<member>-<seq>-<send ns>"}}}`, with a text of
//! `--size` bytes of words. The sender and send time ride in the `client_msg_id`, which every
//! publication carries, so that the text is what a chat's own traffic is (see [`PAD`]). The
//! server answers `{"id":N,"publish":{}}` once the message is committed, so an answered
//! publish is a persisted message. Sends are open loop: a slow
//! server makes the latency grow, not the send rate fall (the server handles one
//! connection's commands one at a time, so a member's later sends queue behind its earlier
//! ones, and that wait is part of the latency).
//!
//! **What counts.** A message counts when its send time falls in the measured window (after
//! `--warmup`). Send→ack latency is measured at the sender, send→deliver latency at every
//! other member of the room, from the time in the `client_msg_id`. After the window the bench
//! waits until every send is answered and every delivery arrived, or until nothing moves for a
//! while.
//! Finally it checks that each member saw its room's offsets 1, 2, 3 … up to the room's last
//! offset, with no gap, repeat or reordering (`order_violations`), and that no acknowledged
//! message is missing from that stream (`missing_acked`).
//!
//! The receive path is as cheap as `fanout`'s: lines are classified by prefix and the offset,
//! time and sender are found by byte search. No JSON tree is built per push.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{now_ns, open_all, pong, request_reply, Dialer, ErrorSample, Ws};
use crate::stats::{self, LatencySummary, Recorder, Window};
use crate::wire::{self, find, leading_u64};
use crate::{procfs, round3};

/// Read chunk per member connection (see `fanout`: tungstenite zero-fills it on every read).
const READ_BUFFER: usize = 4096;
/// The first publish's command id: 1 is `connect`, 2 is `subscribe`.
const FIRST_PUBLISH_ID: u64 = 3;
/// After the window, stop waiting once nothing has moved for this long...
const DRAIN_IDLE: Duration = Duration::from_secs(2);
/// ...or after this long in total.
const DRAIN_MAX: Duration = Duration::from_secs(60);
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Time between handing out the plan and the first send, so that every member has it.
const START_DELAY: Duration = Duration::from_millis(200);
const HTTP_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(clap::Args, Debug, Clone)]
pub struct ChatArgs {
    /// Base URL of the server's REST API, used to create users and rooms.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub base_url: String,
    /// WebSocket URL of the Centrifugo-protocol endpoint. Default: the base URL's host and port
    /// with `ws://` and `/connection/websocket`.
    #[arg(long)]
    pub url: Option<String>,
    /// Server process for /proc readings (CPU). If omitted, the bench looks for the process
    /// that listens on the WebSocket URL's port.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Spread client sockets over source addresses 127.0.0.1..=127.0.0.N (loopback targets only).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u8).range(1..=254))]
    pub sources: u8,
    /// Number of rooms.
    #[arg(long, default_value_t = 100)]
    pub rooms: usize,
    /// Members per room. Each member is one user with one connection.
    #[arg(long, default_value_t = 10)]
    pub users: usize,
    /// Messages per second sent by each member.
    #[arg(long, default_value_t = 1.0)]
    pub rate: f64,
    /// Length in bytes of each message's text.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub size: u32,
    /// Length of the measured window.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Sending time before the measured window. Its messages are not counted.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// WebSocket connection attempts in flight at once.
    #[arg(long, default_value_t = 200)]
    pub concurrency: usize,
    /// Register, login and room-create calls in flight at once (each login or register hashes a
    /// password on the server).
    #[arg(long, default_value_t = 4)]
    pub setup_concurrency: usize,
    /// Users are named `<prefix>-<n>`. Existing users of that name are reused, so re-runs
    /// against the same server skip registration.
    #[arg(long, default_value = "bench")]
    pub user_prefix: String,
    /// Password of the bench users.
    #[arg(long, default_value = "bench-password")]
    pub password: String,
}

#[derive(Debug, Serialize)]
pub struct ChatReport {
    pub bench: &'static str,
    pub rooms: usize,
    pub users_per_room: usize,
    /// Messages per second per member, and in total (`rooms × users × rate`).
    pub rate_per_user: f64,
    pub offered_per_s: f64,
    pub size: usize,
    pub duration_s: f64,
    /// Registering and logging in the users and creating the rooms.
    pub setup_s: f64,
    /// Opening and subscribing every member connection.
    pub connect_s: f64,
    /// Member connections that connected and subscribed.
    pub connected: usize,
    /// Publishes sent inside the window.
    pub sent: u64,
    /// Publishes sent inside the window and acknowledged (committed to the store).
    pub persisted: u64,
    pub persisted_per_s: f64,
    /// Error replies to publishes over the whole run, in total and by protocol error code.
    pub publish_errors: u64,
    pub publish_errors_by_code: BTreeMap<u32, u64>,
    /// Publishes of the whole run that had no reply when the bench stopped.
    pub unanswered: u64,
    pub ack_latency_ms: Option<LatencySummary>,
    pub deliver_latency_ms: Option<LatencySummary>,
    /// `persisted` × (subscribed members of the room − 1): each message reaches every other member.
    pub expected_deliveries: u64,
    pub deliveries: u64,
    /// `1 - deliveries / expected_deliveries`.
    pub loss: f64,
    pub deliveries_per_s: f64,
    /// Out-of-sequence offsets seen by members, plus members whose stream does not run from 1
    /// to the room's last offset.
    pub order_violations: u64,
    /// Acknowledged messages (whole run) beyond the last offset members saw in their room.
    pub missing_acked: u64,
    pub drain_s: f64,
    /// Member connections that the server closed during the run.
    pub disconnected: usize,
    pub server_pid: Option<u32>,
    pub server_cpu_s: Option<f64>,
    pub persisted_per_server_cpu_s: Option<f64>,
    pub bench_cpu_s: Option<f64>,
    /// Busy fraction of each core over the window (`/proc/stat`). It covers every process,
    /// softirq time and the database, which the server's own CPU figure leaves out.
    pub cores_busy: Option<Vec<f64>>,
    pub errors: Vec<String>,
}

/// Counters of one room.
#[derive(Default)]
struct RoomCounters {
    subscribed: AtomicUsize,
    /// Acknowledged publishes sent inside the window.
    acked_in_window: AtomicU64,
    /// Acknowledged publishes over the whole run.
    acked: AtomicU64,
}

/// State shared by the member tasks.
struct Shared {
    window: Window,
    ack_latency: Recorder,
    deliver_latency: Recorder,
    rooms: Vec<RoomCounters>,
    sent: AtomicU64,
    sent_in_window: AtomicU64,
    /// Publishes answered, with an ack or an error.
    answered: AtomicU64,
    /// Members that sent their last message (or ended). A member can run late, so the end
    /// of the window does not mean that every send has gone out.
    done_sending: AtomicUsize,
    errors_by_code: Mutex<BTreeMap<u32, u64>>,
    disconnected: AtomicUsize,
    /// Each member's stream, stored when its task ends: (room index, what it saw).
    tracks: Mutex<Vec<Option<(usize, Track)>>>,
    errors: Mutex<ErrorSample>,
}

impl Shared {
    fn errors(&self) -> std::sync::MutexGuard<'_, ErrorSample> {
        self.errors.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn error(&self, e: anyhow::Error) {
        self.errors().add(&e);
    }

    /// Expected in-window deliveries so far, from the acknowledged sends.
    fn expected_deliveries(&self) -> u64 {
        self.rooms
            .iter()
            .map(|r| {
                let others = r.subscribed.load(Ordering::Relaxed).saturating_sub(1) as u64;
                r.acked_in_window.load(Ordering::Relaxed) * others
            })
            .sum()
    }
}

/// When and how the members send. Handed to every member at once.
struct Plan {
    /// The first send. Members start spread evenly over one send interval, and a room's
    /// members are spread too (see [`Plan::due`]).
    begin: Instant,
    /// No send is due at or after this.
    until: Instant,
    rate: f64,
    members: usize,
    /// Members per room.
    per_room: usize,
    /// Makes `client_msg_id`s unique across runs by the same users.
    run_tag: String,
    size: usize,
}

impl Plan {
    /// When member `i`'s send number `seq` is due. Member `i` is number `i % per_room` of
    /// room `i / per_room`; its start slot is `(i % per_room) × rooms + i / per_room` of
    /// `members`, so the members of one room start `1 / per_room` of an interval apart, as
    /// people in a room who do not type in lockstep. (Numbering slots by `i` put a room's
    /// members side by side, so they sent together and their pushes shared frames.)
    fn due(&self, i: usize, seq: u64) -> Instant {
        let per_room = self.per_room.max(1);
        let rooms = self.members.div_ceil(per_room);
        let slot = (i % per_room) * rooms + i / per_room;
        let phase = slot as f64 / self.members as f64;
        self.begin + Duration::from_secs_f64((phase + seq as f64) / self.rate)
    }
}

pub async fn run(args: ChatArgs) -> anyhow::Result<ChatReport> {
    if args.rooms == 0 || args.users == 0 {
        bail!("--rooms and --users must be positive");
    }
    if !(args.rate.is_finite() && args.rate > 0.0) || args.duration.is_zero() {
        bail!("--rate and --duration must be positive");
    }
    let n = args.rooms * args.users;
    procfs::warn_if_fd_limit_low(n);
    let ws_url = match &args.url {
        Some(u) => u.clone(),
        None => websocket_url(&args.base_url)?,
    };
    let dialer = Arc::new(Dialer::for_url(&ws_url, args.sources, None, READ_BUFFER).await?);
    let pid = procfs::server_pid(args.server_pid, dialer.port());
    let run_tag = format!("{:x}", now_ns() / 1_000_000);

    // Setup: users, tokens and rooms. Not measured.
    let setup_started = Instant::now();
    let http = reqwest::Client::builder()
        .timeout(HTTP_TIMEOUT)
        .build()
        .context("HTTP client")?;
    let base = args.base_url.trim_end_matches('/').to_owned();
    let accounts = create_accounts(&http, &base, &args, n).await?;
    let room_ids = create_rooms(&http, &base, &args, &accounts, &run_tag).await?;
    let setup_s = round3(setup_started.elapsed().as_secs_f64());
    eprintln!(
        "bench chat: {n} users in {} rooms ready in {setup_s} s",
        args.rooms
    );

    let shared = Arc::new(Shared {
        window: Window::new(),
        ack_latency: Recorder::new(),
        deliver_latency: Recorder::new(),
        rooms: (0..args.rooms).map(|_| RoomCounters::default()).collect(),
        sent: AtomicU64::new(0),
        sent_in_window: AtomicU64::new(0),
        answered: AtomicU64::new(0),
        done_sending: AtomicUsize::new(0),
        errors_by_code: Mutex::new(BTreeMap::new()),
        disconnected: AtomicUsize::new(0),
        tracks: Mutex::new(vec![None; n]),
        errors: Mutex::new(ErrorSample::default()),
    });

    // Members: connect with their own token, subscribe to their room, then wait for the plan.
    let connect_started = Instant::now();
    let tokens: Arc<Vec<String>> = Arc::new(accounts.into_iter().map(|a| a.token).collect());
    let channels: Arc<Vec<String>> =
        Arc::new(room_ids.iter().map(|id| format!("chat:{id}")).collect());
    let users = args.users;
    let (go_tx, go_rx) = watch::channel::<Option<Arc<Plan>>>(None);
    let (stop_tx, stop_rx) = watch::channel(false);
    let opened = {
        let (shared_setup, shared_run) = (shared.clone(), shared.clone());
        let channels_run = channels.clone();
        open_all(
            n,
            args.concurrency,
            move |i| {
                let (dialer, tokens, channels) = (dialer.clone(), tokens.clone(), channels.clone());
                let shared = shared_setup.clone();
                async move {
                    let mut ws = dialer.open_with_token(i, &tokens[i]).await?;
                    let room = i / users;
                    let subscribe =
                        serde_json::json!({"id": 2, "subscribe": {"channel": channels[room]}});
                    request_reply(&mut ws, 2, subscribe.to_string(), "subscribe").await?;
                    shared.rooms[room]
                        .subscribed
                        .fetch_add(1, Ordering::Relaxed);
                    Ok(ws)
                }
            },
            move |i, ws| {
                let member = MemberSpec {
                    i,
                    room: i / users,
                    channel: channels_run[i / users].clone(),
                };
                let (shared, go, stop) = (shared_run.clone(), go_rx.clone(), stop_rx.clone());
                async move { member_loop(ws, member, &shared, go, stop).await }
            },
        )
        .await
    };
    let connected = opened.connected;
    let mut tasks = opened.tasks;
    shared.errors().extend(opened.errors);
    if connected == 0 {
        bail!(
            "no member could subscribe: {:?}",
            shared.errors().snapshot()
        );
    }
    let connect_s = round3(connect_started.elapsed().as_secs_f64());
    eprintln!("bench chat: {connected} of {n} members subscribed in {connect_s} s");

    // Load: hand out the plan, measure the window.
    let begin = Instant::now() + START_DELAY;
    let window_start = begin + args.warmup;
    let until = window_start + args.duration;
    let start_ns = now_ns() + (window_start - Instant::now()).as_nanos() as u64;
    shared
        .window
        .set(start_ns, start_ns + args.duration.as_nanos() as u64);
    let _ = go_tx.send(Some(Arc::new(Plan {
        begin,
        until,
        rate: args.rate,
        members: n,
        per_room: args.users,
        run_tag,
        size: args.size as usize,
    })));
    tokio::time::sleep_until(window_start.into()).await;
    let server_cpu_start = pid.and_then(|p| procfs::cpu_seconds(Some(p)));
    let bench_cpu_start = procfs::cpu_seconds(None);
    let cores_start = procfs::core_ticks();
    let measured_from = Instant::now();
    tokio::time::sleep_until(until.into()).await;
    let server_cpu_end = pid.and_then(|p| procfs::cpu_seconds(Some(p)));
    let bench_cpu_end = procfs::cpu_seconds(None);
    let cores_end = procfs::core_ticks();
    let window_s = measured_from.elapsed().as_secs_f64();

    let drain_started = Instant::now();
    drain(&shared, connected).await;
    let drain_s = round3(drain_started.elapsed().as_secs_f64());
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();

    // Verdicts.
    let (ack_hist, persisted, _) = shared.ack_latency.merge();
    let (deliver_hist, deliveries, _) = shared.deliver_latency.merge();
    let expected = shared.expected_deliveries();
    let tracks: Vec<(usize, Track)> = lock(&shared.tracks).iter().flatten().copied().collect();
    let order = check_order(&tracks, args.rooms);
    let acked: Vec<u64> = shared
        .rooms
        .iter()
        .map(|r| r.acked.load(Ordering::Relaxed))
        .collect();
    let missing_acked = acked
        .iter()
        .zip(&order.last_offsets)
        .map(|(&a, &last)| a.saturating_sub(last))
        .sum();
    let errors_by_code = lock(&shared.errors_by_code).clone();
    let sent_all = shared.sent.load(Ordering::Relaxed);
    let errors = shared.errors().snapshot();
    let answered = shared.answered.load(Ordering::Relaxed);

    let server_cpu = server_cpu_start.zip(server_cpu_end).map(|(a, b)| b - a);
    let bench_cpu = bench_cpu_start.zip(bench_cpu_end).map(|(a, b)| b - a);
    crate::fanout::warn_if_bench_bound(bench_cpu, window_s);
    let duration_s = args.duration.as_secs_f64();
    Ok(ChatReport {
        bench: "chat",
        rooms: args.rooms,
        users_per_room: args.users,
        rate_per_user: args.rate,
        offered_per_s: round3(args.rate * n as f64),
        size: args.size as usize,
        duration_s: round3(duration_s),
        setup_s,
        connect_s,
        connected,
        sent: shared.sent_in_window.load(Ordering::Relaxed),
        persisted,
        persisted_per_s: round3(persisted as f64 / duration_s),
        publish_errors: errors_by_code.values().sum(),
        publish_errors_by_code: errors_by_code,
        unanswered: sent_all.saturating_sub(answered),
        ack_latency_ms: stats::summarize(&ack_hist),
        deliver_latency_ms: stats::summarize(&deliver_hist),
        expected_deliveries: expected,
        deliveries,
        loss: if expected == 0 {
            0.0
        } else {
            ((1.0 - deliveries as f64 / expected as f64) * 1e6).round() / 1e6
        },
        deliveries_per_s: round3(deliveries as f64 / duration_s),
        order_violations: order.violations,
        missing_acked,
        drain_s,
        disconnected: shared.disconnected.load(Ordering::Relaxed),
        server_pid: pid,
        server_cpu_s: server_cpu.map(round3),
        persisted_per_server_cpu_s: server_cpu
            .filter(|&c| c > 0.0)
            .map(|c| round3(persisted as f64 / (c * duration_s / window_s))),
        bench_cpu_s: bench_cpu.map(round3),
        cores_busy: cores_start.zip(cores_end).map(|(a, b)| {
            procfs::busy_fractions(&a, &b)
                .into_iter()
                .map(round3)
                .collect()
        }),
        errors,
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `http://host:port/...` → `ws://host:port/connection/websocket`.
fn websocket_url(base_url: &str) -> anyhow::Result<String> {
    let mut url =
        reqwest::Url::parse(base_url).with_context(|| format!("bad --base-url {base_url}"))?;
    let scheme = match url.scheme() {
        "http" => "ws",
        "https" => "wss",
        other => bail!("--base-url scheme {other} is not supported (http:// or https://)"),
    };
    url.set_scheme(scheme)
        .map_err(|()| anyhow!("cannot make a WebSocket URL of {base_url}"))?;
    url.set_path("/connection/websocket");
    url.set_query(None);
    Ok(url.to_string())
}

pub(crate) struct Account {
    pub(crate) id: i64,
    pub(crate) token: String,
}

#[derive(Deserialize)]
struct LoginReply {
    access_token: String,
    user: UserReply,
}

#[derive(Deserialize)]
struct UserReply {
    id: i64,
}

#[derive(Deserialize)]
struct RoomReply {
    id: i64,
}

/// Registers (or reuses) and logs in users `0..n`, `setup_concurrency` at a time.
pub(crate) async fn create_accounts(
    http: &reqwest::Client,
    base: &str,
    args: &ChatArgs,
    n: usize,
) -> anyhow::Result<Vec<Account>> {
    let mut out: Vec<Option<Account>> = (0..n).map(|_| None).collect();
    let mut done = futures_util::stream::iter(0..n)
        .map(|i| async move { (i, account(http, base, args, i).await) })
        .buffer_unordered(args.setup_concurrency.max(1));
    let mut finished = 0;
    while let Some((i, account)) = done.next().await {
        out[i] = Some(account.with_context(|| format!("user {}-{i}", args.user_prefix))?);
        finished += 1;
        if finished % 1000 == 0 {
            eprintln!("bench chat: {finished} of {n} users logged in");
        }
    }
    Ok(out.into_iter().flatten().collect())
}

async fn account(
    http: &reqwest::Client,
    base: &str,
    args: &ChatArgs,
    i: usize,
) -> anyhow::Result<Account> {
    let username = format!("{}-{i}", args.user_prefix);
    let register = http
        .post(format!("{base}/v1/auth/register"))
        .json(&serde_json::json!({
            "username": username,
            "password": args.password,
            "display_name": username,
        }))
        .send()
        .await
        .context("register")?;
    let status = register.status();
    // 409: the user exists from an earlier run. Logging in tells whether it is ours.
    if !(status.is_success() || status == reqwest::StatusCode::CONFLICT) {
        let body = register.text().await.unwrap_or_default();
        bail!("register: {status} {body}");
    }
    let login = http
        .post(format!("{base}/v1/auth/login"))
        .json(&serde_json::json!({"username": username, "password": args.password}))
        .send()
        .await
        .context("login")?;
    let status = login.status();
    if !status.is_success() {
        let body = login.text().await.unwrap_or_default();
        bail!("login: {status} {body} (an existing user with another password? try another --user-prefix)");
    }
    let reply: LoginReply = login.json().await.context("login reply")?;
    Ok(Account {
        id: reply.user.id,
        token: reply.access_token,
    })
}

/// Creates one private room per `args.users` accounts: the first creates it, with the others
/// as members. Returns the room ids in order.
pub(crate) async fn create_rooms(
    http: &reqwest::Client,
    base: &str,
    args: &ChatArgs,
    accounts: &[Account],
    run_tag: &str,
) -> anyhow::Result<Vec<i64>> {
    let mut out = vec![0; args.rooms];
    let mut done = futures_util::stream::iter(0..args.rooms)
        .map(|r| {
            let members = &accounts[r * args.users..(r + 1) * args.users];
            async move {
                let body = serde_json::json!({
                    "kind": "private",
                    "name": format!("bench {run_tag} {r}"),
                    "members": members[1..].iter().map(|a| a.id).collect::<Vec<_>>(),
                });
                let reply = http
                    .post(format!("{base}/v1/rooms"))
                    .bearer_auth(&members[0].token)
                    .json(&body)
                    .send()
                    .await
                    .context("create room")?;
                let status = reply.status();
                if !status.is_success() {
                    let body = reply.text().await.unwrap_or_default();
                    bail!("create room {r}: {status} {body}");
                }
                let room: RoomReply = reply.json().await.context("room reply")?;
                Ok::<_, anyhow::Error>((r, room.id))
            }
        })
        .buffer_unordered(args.setup_concurrency.max(1));
    while let Some(result) = done.next().await {
        let (r, id) = result?;
        out[r] = id;
    }
    Ok(out)
}

/// After the window: waits until every member has sent its last message, every send is
/// answered and every expected delivery arrived, or until nothing has moved for [`DRAIN_IDLE`].
async fn drain(shared: &Shared, members: usize) {
    let started = Instant::now();
    let mut last_change = Instant::now();
    let progress = || {
        (
            shared.done_sending.load(Ordering::Relaxed),
            shared.sent.load(Ordering::Relaxed),
            shared.answered.load(Ordering::Relaxed),
            shared.deliver_latency.progress(),
        )
    };
    let mut seen = progress();
    loop {
        let (done, sent, answered, (delivered, _)) = seen;
        if done >= members && sent == answered && delivered >= shared.expected_deliveries() {
            return;
        }
        if started.elapsed() >= DRAIN_MAX || last_change.elapsed() >= DRAIN_IDLE {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = progress();
        if now != seen {
            last_change = Instant::now();
        }
        seen = now;
    }
}

/// Who a member is.
struct MemberSpec {
    /// Member number: picks the user, the source address and the send phase.
    i: usize,
    room: usize,
    channel: String,
}

/// One member: sends on the plan's schedule and reads acks and pushes until told to stop.
/// Stores what it saw of the room's stream in `shared.tracks` when it ends.
async fn member_loop(
    mut ws: Ws,
    me: MemberSpec,
    shared: &Shared,
    mut go: watch::Receiver<Option<Arc<Plan>>>,
    mut stop: watch::Receiver<bool>,
) {
    let channel = serde_json::to_string(&me.channel).expect("strings serialize");
    let mut plan: Option<Arc<Plan>> = None;
    let mut go_open = true;
    let mut pending = Pending::default();
    let mut track = Track::default();
    let mut seq = 0u64;
    let mut command = String::new();
    let sleep = tokio::time::sleep(Duration::from_secs(86_400));
    tokio::pin!(sleep);
    let mut sending = false;
    let done_sending = || {
        shared.done_sending.fetch_add(1, Ordering::Relaxed);
    };
    let mut counted_done = false;

    let ended_by_server = loop {
        tokio::select! {
            biased;
            msg = ws.next() => {
                let frame = match &msg {
                    Some(Ok(Message::Text(t))) => t.as_bytes(),
                    Some(Ok(Message::Binary(b))) => &b[..],
                    Some(Ok(Message::Close(frame))) => {
                        let why = frame.as_ref().map(|c| format!("{} {}", c.code, c.reason));
                        shared.error(anyhow!("member closed by server: {}", why.unwrap_or_default()));
                        break true;
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        shared.error(anyhow!("member connection failed: {e}"));
                        break true;
                    }
                    None => break true,
                };
                let pinged = record_frame(frame, &me, shared, &mut pending, &mut track);
                if pinged && ws.send(pong()).await.is_err() {
                    break true;
                }
            }
            _ = &mut sleep, if sending => {
                let Some(p) = plan.as_deref() else { continue };
                let now = Instant::now();
                let mut failed = false;
                while p.due(me.i, seq) <= now && p.due(me.i, seq) < p.until {
                    let t = now_ns();
                    let id = FIRST_PUBLISH_ID + pending.push(t);
                    command.clear();
                    write_publish(&mut command, id, &channel, t, me.i, &p.run_tag, seq, p.size);
                    shared.sent.fetch_add(1, Ordering::Relaxed);
                    if shared.window.contains(t) {
                        shared.sent_in_window.fetch_add(1, Ordering::Relaxed);
                    }
                    seq += 1;
                    if let Err(e) = ws.send(Message::text(command.as_str())).await {
                        shared.error(anyhow!("member send failed: {e}"));
                        failed = true;
                        break;
                    }
                }
                if failed {
                    break true;
                }
                let next = p.due(me.i, seq);
                sending = next < p.until;
                sleep.as_mut().reset(next.into());
                if !sending && !counted_done {
                    counted_done = true;
                    done_sending();
                }
            }
            changed = go.changed(), if plan.is_none() && go_open => {
                if changed.is_err() {
                    go_open = false;
                    continue;
                }
                plan = go.borrow_and_update().clone();
                if let Some(p) = &plan {
                    let first = p.due(me.i, 0);
                    sending = first < p.until;
                    sleep.as_mut().reset(first.into());
                    if !sending && !counted_done {
                        counted_done = true;
                        done_sending();
                    }
                }
            }
            _ = stop.changed() => break false,
        }
    };
    if !counted_done {
        done_sending();
    }
    if ended_by_server {
        shared.disconnected.fetch_add(1, Ordering::Relaxed);
    }
    lock(&shared.tracks)[me.i] = Some((me.room, track));
    if !ended_by_server {
        let _ = ws.close(None).await;
    }
}

/// Handles one frame: acks, errors and pushes, recorded under at most one lock per recorder.
/// Returns whether the frame had a ping.
fn record_frame(
    frame: &[u8],
    me: &MemberSpec,
    shared: &Shared,
    pending: &mut Pending,
    track: &mut Track,
) -> bool {
    let now = now_ns();
    let window = shared.window.get();
    let mut pinged = false;
    let mut acks = None;
    let mut deliveries = None;
    for line in wire::lines(frame) {
        match parse_line(line) {
            ChatLine::Ping => pinged = true,
            ChatLine::Message { offset, stamp } => {
                track.see(offset);
                match stamp {
                    Some(s) if s.member as usize != me.i => deliveries
                        .get_or_insert_with(|| stats::lock(shared.deliver_latency.shard(me.i)))
                        .record(window, Some(s.t), now),
                    _ => {}
                }
            }
            ChatLine::Reply { id, error } => {
                let Some(seq) = id.checked_sub(FIRST_PUBLISH_ID) else {
                    continue;
                };
                let Some(t) = pending.take(seq) else { continue };
                shared.answered.fetch_add(1, Ordering::Relaxed);
                match error {
                    None => {
                        let room = &shared.rooms[me.room];
                        room.acked.fetch_add(1, Ordering::Relaxed);
                        if t >= window.0 && t < window.1 {
                            room.acked_in_window.fetch_add(1, Ordering::Relaxed);
                        }
                        acks.get_or_insert_with(|| stats::lock(shared.ack_latency.shard(me.i)))
                            .record(window, Some(t), now);
                    }
                    Some(code) => {
                        *lock(&shared.errors_by_code).entry(code).or_default() += 1;
                        // Without the command id, so that equal errors collapse into one entry.
                        let error = line.splitn(2, |&b| b == b',').nth(1).unwrap_or(line);
                        shared.error(anyhow!("publish: {}", String::from_utf8_lossy(error)));
                    }
                }
            }
            ChatLine::Other => {}
        }
    }
    pinged
}

/// What a text is made of: ordinary words, cycled and cut at `--size`. The server's
/// profanity filter costs per character, and more on digits and runs of one character than
/// on words (rustrict on a fast machine: 13 µs for 100 bytes of words, 30 µs for a stamp and
/// dots, 260 µs for a stamp and `x`s; on a slow one 18 µs for the words, 28 µs with a 28-byte
/// `t=<ns> u=<member>` stamp in front), so a text of words is what a chat's own traffic
/// costs it, and the bench's stamp goes in the `client_msg_id` instead.
const PAD: &[u8] = b"see you at the standup tomorrow, the notes from last week are in the doc ";

/// Writes one publish command. The text is `size` bytes of words ([`PAD`]); the
/// `client_msg_id` is `<run>-<member>-<seq>-<t>`.
#[allow(clippy::too_many_arguments)]
fn write_publish(
    out: &mut String,
    id: u64,
    channel_json: &str,
    t: u64,
    member: usize,
    run_tag: &str,
    seq: u64,
    size: usize,
) {
    let _ = write!(
        out,
        r#"{{"id":{id},"publish":{{"channel":{channel_json},"data":{{"text":""#
    );
    out.extend(PAD.iter().cycle().take(size).map(|&b| char::from(b)));
    let _ = write!(
        out,
        r#"","client_msg_id":"{run_tag}-{member}-{seq}-{t}"}}}}}}"#
    );
}

/// The bench's stamp: who sent a message and when, from its `client_msg_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    /// Send time, ns since the UNIX epoch.
    t: u64,
    /// The sending member's number.
    member: u32,
}

/// One line of a server frame, as far as a chat member cares.
#[derive(Debug, PartialEq, Eq)]
enum ChatLine {
    Ping,
    /// A stream publication (it has an offset), with the bench's stamp if its text has one.
    Message {
        offset: u64,
        stamp: Option<Stamp>,
    },
    /// A reply to command `id`, with the error code if it failed.
    Reply {
        id: u64,
        error: Option<u32>,
    },
    /// Ephemeral pushes (typing, receipts), joins, anything else.
    Other,
}

fn parse_line(line: &[u8]) -> ChatLine {
    if line == b"{}" {
        return ChatLine::Ping;
    }
    if let Some(rest) = line.strip_prefix(b"{\"push\":") {
        // Publication's `offset` is its first field, and it is omitted when 0 (ephemeral).
        let Some(at) = find(rest, b"\"pub\":{\"offset\":") else {
            return ChatLine::Other;
        };
        let publication = &rest[at..];
        let Some((offset, _)) = leading_u64(publication) else {
            return ChatLine::Other;
        };
        let stamp =
            find(publication, b"\"client_msg_id\":\"").and_then(|s| parse_stamp(&publication[s..]));
        return ChatLine::Message { offset, stamp };
    }
    if let Some(rest) = line.strip_prefix(b"{\"id\":") {
        let Some((id, _)) = leading_u64(rest) else {
            return ChatLine::Other;
        };
        let error = find(rest, b"\"error\":").map(|e| {
            find(&rest[e..], b"\"code\":")
                .and_then(|c| leading_u64(&rest[e + c..]))
                .map_or(0, |(code, _)| u32::try_from(code).unwrap_or(u32::MAX))
        });
        return ChatLine::Reply { id, error };
    }
    ChatLine::Other
}

/// `<run>-<member>-<seq>-<ns>"...`, a `client_msg_id` and what follows it.
fn parse_stamp(s: &[u8]) -> Option<Stamp> {
    let run = s.iter().position(|&b| b == b'-' || b == b'"')?;
    let rest = s[run..].strip_prefix(b"-")?;
    let (member, len) = leading_u64(rest)?;
    let rest = rest[len..].strip_prefix(b"-")?;
    let (_seq, len) = leading_u64(rest)?;
    let rest = rest[len..].strip_prefix(b"-")?;
    let (t, len) = leading_u64(rest)?;
    if rest.get(len) != Some(&b'"') {
        return None;
    }
    Some(Stamp {
        t,
        member: u32::try_from(member).ok()?,
    })
}

/// A member's unanswered publishes: the send time of each, by send number. Answers may come
/// in any order; the front is dropped as soon as it is answered, so the queue stays as long
/// as the oldest unanswered send is old.
#[derive(Default)]
struct Pending {
    /// Send number of `times[0]`.
    first: u64,
    /// Send times; 0 once answered.
    times: VecDeque<u64>,
}

impl Pending {
    /// Records a send at `t` (ns, non-zero) and returns its send number.
    fn push(&mut self, t: u64) -> u64 {
        self.times.push_back(t.max(1));
        self.first + self.times.len() as u64 - 1
    }

    /// The send time of send number `seq` if it was still unanswered.
    fn take(&mut self, seq: u64) -> Option<u64> {
        let idx = usize::try_from(seq.checked_sub(self.first)?).ok()?;
        let slot = self.times.get_mut(idx)?;
        let t = std::mem::take(slot);
        if t == 0 {
            return None;
        }
        while self.times.front() == Some(&0) {
            self.times.pop_front();
            self.first += 1;
        }
        Some(t)
    }
}

/// What one member saw of its room's stream.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Track {
    first: Option<u64>,
    last: u64,
    seen: u64,
    /// Offsets that were not the previous one plus one.
    bad_steps: u64,
}

impl Track {
    fn see(&mut self, offset: u64) {
        if self.first.is_none() {
            self.first = Some(offset);
        } else if offset != self.last + 1 {
            self.bad_steps += 1;
        }
        self.last = offset;
        self.seen += 1;
    }
}

#[derive(Debug, PartialEq, Eq)]
struct OrderVerdict {
    violations: u64,
    /// The highest offset any member saw, per room.
    last_offsets: Vec<u64>,
}

/// Every member of a fresh room must have seen exactly 1, 2, … up to the room's last offset.
/// Counts each out-of-sequence step, and each member whose stream does not start at 1 or does
/// not reach the room's last offset.
fn check_order(tracks: &[(usize, Track)], rooms: usize) -> OrderVerdict {
    let mut last_offsets = vec![0u64; rooms];
    for (room, t) in tracks {
        last_offsets[*room] = last_offsets[*room].max(t.last);
    }
    let mut violations = 0;
    for (room, t) in tracks {
        violations += t.bad_steps;
        let room_last = last_offsets[*room];
        let complete = match t.first {
            None => room_last == 0,
            Some(first) => first == 1 && t.last == room_last && t.seen == room_last,
        };
        if !complete && t.bad_steps == 0 {
            violations += 1;
        }
    }
    OrderVerdict {
        violations,
        last_offsets,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push_of(command: &str, offset: u64) -> String {
        // What the server makes of a publish: the message view, keys sorted, inside a push.
        let cmd: serde_json::Value = serde_json::from_str(command).unwrap();
        let data = &cmd["publish"]["data"];
        let message = serde_json::json!({
            "client_msg_id": data["client_msg_id"], "created_at": 1, "deleted": false,
            "edited_at": null, "id": 9, "offset": offset, "removed": false, "reply_to": null,
            "room_id": 4, "text": data["text"], "user_id": 12,
        });
        let event = serde_json::json!({"at": 1, "message": message, "message_id": 9,
            "type": "message", "user_id": 12});
        format!(r#"{{"push":{{"channel":"chat:4","pub":{{"offset":{offset},"data":{event}}}}}}}"#)
    }

    #[test]
    fn publish_commands_carry_words_and_a_stamped_id() {
        let mut out = String::new();
        write_publish(
            &mut out,
            7,
            "\"chat:4\"",
            1_763_916_296_123_456_789,
            42,
            "ab",
            5,
            80,
        );
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["id"], 7);
        assert_eq!(v["publish"]["channel"], "chat:4");
        let text = v["publish"]["data"]["text"].as_str().unwrap();
        assert_eq!(text.len(), 80);
        assert!(text.starts_with("see you at the standup"), "{text}");
        assert_eq!(
            v["publish"]["data"]["client_msg_id"],
            "ab-42-5-1763916296123456789"
        );
        out.clear();
        write_publish(&mut out, 7, "\"c\"", 5, 3, "ab", 0, 1);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["publish"]["data"]["text"], "s");
    }

    #[test]
    fn parses_pushes_replies_and_pings() {
        let mut cmd = String::new();
        write_publish(
            &mut cmd,
            3,
            "\"chat:4\"",
            1_763_916_296_123_456_789,
            42,
            "ab",
            0,
            64,
        );
        let push = push_of(&cmd, 17);
        assert_eq!(
            parse_line(push.as_bytes()),
            ChatLine::Message {
                offset: 17,
                stamp: Some(Stamp {
                    t: 1_763_916_296_123_456_789,
                    member: 42
                })
            }
        );
        // Someone else's message: an offset, no stamp.
        let foreign =
            br#"{"push":{"channel":"chat:4","pub":{"offset":3,"data":{"message":{"text":"hi"}}}}}"#;
        assert_eq!(
            parse_line(foreign),
            ChatLine::Message {
                offset: 3,
                stamp: None
            }
        );
        // Ephemeral pushes have no offset.
        let typing =
            br#"{"push":{"channel":"chat:4","pub":{"data":{"type":"typing","user_id":1}}}}"#;
        assert_eq!(parse_line(typing), ChatLine::Other);
        assert_eq!(parse_line(b"{}"), ChatLine::Ping);
        assert_eq!(
            parse_line(br#"{"id":12,"publish":{}}"#),
            ChatLine::Reply {
                id: 12,
                error: None
            }
        );
        assert_eq!(
            parse_line(br#"{"id":13,"error":{"code":103,"message":"permission denied"}}"#),
            ChatLine::Reply {
                id: 13,
                error: Some(103)
            }
        );
        assert_eq!(
            parse_line(br#"{"id":14,"error":{"message":"odd"}}"#),
            ChatLine::Reply {
                id: 14,
                error: Some(0)
            }
        );
        assert_eq!(parse_line(br#"{"connect":{}}"#), ChatLine::Other);
    }

    #[test]
    fn stamps_need_time_and_member() {
        assert_eq!(
            parse_stamp(br#"ab-3-7-12","x""#),
            Some(Stamp { t: 12, member: 3 })
        );
        assert_eq!(parse_stamp(br#"ab-3-7","x""#), None, "no time");
        assert_eq!(parse_stamp(br#"ab-3-7-12x""#), None);
        assert_eq!(parse_stamp(br#"someone-else""#), None);
        assert_eq!(parse_stamp(br#"ab""#), None);
    }

    #[test]
    fn pending_answers_in_any_order() {
        let mut p = Pending::default();
        assert_eq!(p.push(100), 0);
        assert_eq!(p.push(200), 1);
        assert_eq!(p.push(300), 2);
        assert_eq!(p.take(1), Some(200));
        assert_eq!(p.take(1), None, "answered twice");
        assert_eq!(p.times.len(), 3, "the front is still open");
        assert_eq!(p.take(0), Some(100));
        assert_eq!((p.first, p.times.len()), (2, 1));
        assert_eq!(p.take(7), None, "never sent");
        assert_eq!(p.push(400), 3);
        assert_eq!(p.take(2), Some(300));
        assert_eq!(p.take(3), Some(400));
        assert!(p.times.is_empty());
        assert_eq!(p.take(0), None, "before the front");
        assert_eq!(p.push(0), 4);
        assert_eq!(p.take(4), Some(1), "a zero time is stored as 1 ns");
    }

    fn track(offsets: &[u64]) -> Track {
        let mut t = Track::default();
        for &o in offsets {
            t.see(o);
        }
        t
    }

    #[test]
    fn order_check() {
        let good = track(&[1, 2, 3, 4]);
        let ok = check_order(
            &[
                (0, good),
                (0, good),
                (1, track(&[1])),
                (2, Track::default()),
            ],
            3,
        );
        assert_eq!(
            ok,
            OrderVerdict {
                violations: 0,
                last_offsets: vec![4, 1, 0]
            }
        );
        // A gap, a swap, a repeat, a late start and a short stream.
        let bad = [
            (0, good),
            (0, track(&[1, 2, 4])),
            (0, track(&[1, 3, 2, 4])),
            (0, track(&[1, 2, 2, 3, 4])),
            (0, track(&[2, 3, 4])),
            (0, track(&[1, 2, 3])),
            (1, Track::default()),
            (1, track(&[1])),
        ];
        let v = check_order(&bad, 2);
        assert_eq!(v.last_offsets, vec![4, 1]);
        // gap 1 + swap 3 + repeat 1 + late start 1 + short 1 + empty member of room 1: 1.
        assert_eq!(v.violations, 8);
    }

    #[test]
    fn plan_spreads_members_over_one_interval() {
        let begin = Instant::now();
        let p = Plan {
            begin,
            until: begin + Duration::from_secs(1),
            rate: 10.0,
            members: 4,
            per_room: 2,
            run_tag: String::new(),
            size: 0,
        };
        // Rooms {0, 1} and {2, 3}: slots 0, 2, 1, 3 of four.
        assert_eq!(p.due(0, 0), begin);
        assert_eq!(p.due(1, 0), begin + Duration::from_millis(50));
        assert_eq!(p.due(2, 0), begin + Duration::from_millis(25));
        assert_eq!(p.due(3, 0), begin + Duration::from_millis(75));
        assert_eq!(p.due(2, 3), begin + Duration::from_millis(325));
    }

    #[test]
    fn websocket_url_from_base_url() {
        assert_eq!(
            websocket_url("http://127.0.0.1:8000").unwrap(),
            "ws://127.0.0.1:8000/connection/websocket"
        );
        assert_eq!(
            websocket_url("http://h:9/api/?x=1").unwrap(),
            "ws://h:9/connection/websocket"
        );
        assert!(websocket_url("ftp://h").is_err());
    }
}
