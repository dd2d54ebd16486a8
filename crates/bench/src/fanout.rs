//! `bench fanout`: N subscribers on one channel and one publisher sending R messages per second.
//!
//! Each message carries its send time (`"t"`, ns since the UNIX epoch) and padding up to S bytes.
//! Subscribers compute latency as receive time minus `t`, which needs the bench and the server
//! to share a clock, so it works on one machine only. The run is split in two: a warm-up,
//! whose messages are delivered but not counted, then the measured window. A message counts
//! if its `t` falls inside the window, wherever it is received. After the window, the bench
//! waits for stragglers until deliveries stop growing. Server and bench CPU are read from
//! /proc at the window's edges.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::sync::{oneshot, watch};
use tokio_tungstenite::tungstenite::Message;

use crate::client::{now_ns, open_all, pong, request_reply, Dialer, ErrorSample, Ws};
use crate::stats::{self, Recorder, Window};
use crate::wire::{self, Line};
use crate::{procfs, round3, Target};

pub use crate::stats::LatencySummary;

/// Read chunk per subscriber. tungstenite zero-fills this much before every read attempt, so a
/// larger chunk costs CPU on every message. 16 KiB cost 10% of the bench's CPU in a profile.
/// 4 KiB still takes a batch of about 20 small pushes in one read.
const READ_BUFFER: usize = 4096;
/// The publisher buffers the messages due at each tick and flushes them with one write.
const PUBLISHER_WRITE_BUFFER: usize = 64 * 1024;
/// The publisher's tick. tokio timers have 1 ms resolution. At higher rates, several
/// messages go out per tick, and each is stamped with its own send time.
const MIN_TICK: Duration = Duration::from_millis(1);
/// After the window, the bench stops waiting once deliveries have not grown for this long...
const DRAIN_IDLE: Duration = Duration::from_secs(1);
/// ...or after this long in total. Whatever is still queued then counts as lost.
const DRAIN_MAX: Duration = Duration::from_secs(30);
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Size of `{"t":<19 digits>,"p":""}`, the data without padding.
const DATA_OVERHEAD: usize = 32;

#[derive(clap::Args, Debug, Clone)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub target: Target,
    /// Number of subscriber connections.
    #[arg(long, default_value_t = 1000)]
    pub subs: usize,
    /// Publications per second.
    #[arg(long, default_value_t = 100)]
    pub rate: u32,
    /// Size in bytes of each publication's `data` (minimum 32).
    #[arg(long, default_value_t = 128)]
    pub size: usize,
    /// Length of the measured window.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Publishing time before the measured window. Its messages are not counted.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    #[arg(long, default_value = "bench")]
    pub channel: String,
    /// Subscriber connection attempts in flight at once.
    #[arg(long, default_value_t = 200)]
    pub concurrency: usize,
    /// Extra subscribers that never read (4 KiB receive buffer). The server should close them
    /// with 3008 while the others keep their latency; they are not counted in deliveries.
    #[arg(long, default_value_t = 0)]
    pub stalled: usize,
    /// Publish through another node (its WebSocket URL), so that every delivery crosses the
    /// broker between nodes. Default: the subscribers' node (`--url`).
    #[arg(long)]
    pub publish_url: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct FanoutReport {
    pub bench: &'static str,
    pub subs: usize,
    /// Subscribers that connected and subscribed.
    pub subscribed: usize,
    pub rate: u32,
    pub size: usize,
    pub duration_s: f64,
    /// Publications sent inside the measured window.
    pub published: u64,
    /// Publish commands that got an error reply, over the whole run.
    pub publish_errors: u64,
    pub expected_deliveries: u64,
    pub deliveries: u64,
    /// `1 - deliveries / expected_deliveries`. It is negative if the server duplicated messages.
    pub loss: f64,
    pub deliveries_per_s: f64,
    pub latency_ms: Option<LatencySummary>,
    /// Time spent after the window waiting for the remaining deliveries.
    pub drain_s: f64,
    /// Subscribers that the server disconnected during the run.
    pub disconnected: usize,
    /// Stalled subscribers opened (`--stalled`), how many the server closed (a Close frame,
    /// or the socket dropped when the peer would not even read the Close frame), and how many
    /// of those closes carried 3008.
    pub stalled: usize,
    pub stalled_closed: usize,
    pub stalled_closed_3008: usize,
    /// Server RSS at the end of the measured window.
    pub server_rss_kb: Option<u64>,
    pub server_pid: Option<u32>,
    pub server_cpu_s: Option<f64>,
    pub server_cpu_s_per_million_deliveries: Option<f64>,
    pub deliveries_per_server_cpu_s: Option<f64>,
    pub bench_cpu_s: Option<f64>,
    /// The bench's own cost. If it is near the server's, the bench may be what limits the run.
    pub bench_cpu_s_per_million_deliveries: Option<f64>,
    /// The first few distinct errors: failed subscribers, rejected publishes, disconnect reasons.
    pub errors: Vec<String>,
}

/// State shared by the receivers.
struct Shared {
    window: Window,
    recorder: Recorder,
    disconnected: AtomicUsize,
    errors: Mutex<ErrorSample>,
}

impl Shared {
    fn errors(&self) -> std::sync::MutexGuard<'_, ErrorSample> {
        self.errors.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn error(&self, e: anyhow::Error) {
        self.errors().add(&e);
    }
}

pub async fn run(args: FanoutArgs) -> anyhow::Result<FanoutReport> {
    if args.rate == 0 || args.duration.is_zero() {
        bail!("--rate and --duration must be positive");
    }
    procfs::warn_if_fd_limit_low(args.subs + 1);
    let dialer = Arc::new(Dialer::new(&args.target, READ_BUFFER).await?);
    let pid = procfs::server_pid(args.target.server_pid, dialer.port());
    let shared = Arc::new(Shared {
        window: Window::new(),
        recorder: Recorder::new(),
        disconnected: AtomicUsize::new(0),
        errors: Mutex::new(ErrorSample::default()),
    });
    let subscribe =
        serde_json::json!({"id": 2, "subscribe": {"channel": args.channel}}).to_string();

    // Subscribers: connect and subscribe with bounded concurrency, then each becomes a receiver.
    let (stop_tx, stop_rx) = watch::channel(false);
    let opened = {
        let shared = shared.clone();
        let subscribe = subscribe.clone();
        open_all(
            args.subs,
            args.concurrency,
            move |i| {
                let (dialer, subscribe) = (dialer.clone(), subscribe.clone());
                async move {
                    let mut ws = dialer.open(i).await?;
                    request_reply(&mut ws, 2, subscribe, "subscribe").await?;
                    Ok(ws)
                }
            },
            move |i, ws| {
                let (shared, stop) = (shared.clone(), stop_rx.clone());
                async move { receive(ws, i, &shared, stop).await }
            },
        )
        .await
    };
    let subscribed = opened.connected;
    let mut tasks = opened.tasks;
    shared.errors().extend(opened.errors);
    if subscribed == 0 {
        bail!(
            "no subscriber could subscribe: {:?}",
            shared.errors().snapshot()
        );
    }

    // Stalled subscribers: subscribe, then never read again until the end of the run.
    let mut stalled = Vec::with_capacity(args.stalled);
    if args.stalled > 0 {
        let dialer = Dialer::new(&args.target, READ_BUFFER)
            .await?
            .with_recv_buffer(4096);
        for k in 0..args.stalled {
            let mut ws = dialer.open(args.subs + 1 + k).await?;
            request_reply(&mut ws, 2, subscribe.clone(), "subscribe").await?;
            stalled.push(ws);
        }
    }

    // Publisher: its own connection. The user number follows the subscribers' numbers.
    let mut publisher_target = args.target.clone();
    if let Some(url) = &args.publish_url {
        publisher_target.url.clone_from(url);
    }
    let publisher_dialer = Dialer::new(&publisher_target, READ_BUFFER)
        .await?
        .with_write_buffer(PUBLISHER_WRITE_BUFFER);
    let publisher_ws = publisher_dialer.open(args.subs).await?;

    let start_ns = now_ns() + args.warmup.as_nanos() as u64;
    let end_ns = start_ns + args.duration.as_nanos() as u64;
    shared.window.set(start_ns, end_ns);
    let begin = Instant::now();
    let (published_tx, published_rx) = oneshot::channel();
    let publisher = tokio::spawn(publish(
        publisher_ws,
        Plan {
            channel: args.channel.clone(),
            rate: args.rate,
            size: args.size,
            until: begin + args.warmup + args.duration,
        },
        shared.clone(),
        published_tx,
        stop_tx.subscribe(),
    ));

    tokio::time::sleep_until((begin + args.warmup).into()).await;
    let server_cpu_start = pid.and_then(|p| procfs::cpu_seconds(Some(p)));
    let bench_cpu_start = procfs::cpu_seconds(None);
    let measured_from = Instant::now();
    tokio::time::sleep_until((begin + args.warmup + args.duration).into()).await;
    let server_cpu_end = pid.and_then(|p| procfs::cpu_seconds(Some(p)));
    let bench_cpu_end = procfs::cpu_seconds(None);
    let server_rss_kb = pid.and_then(|p| procfs::rss_kb(Some(p)));
    let window_s = measured_from.elapsed().as_secs_f64();

    let published = match published_rx.await {
        Ok(n) => n,
        // The publisher gave up before the end of the window: report why.
        Err(_) => {
            return Err(publisher
                .await?
                .err()
                .unwrap_or_else(|| anyhow::anyhow!("publisher stopped")))
        }
    };
    let expected = published * subscribed as u64;
    let drain_started = Instant::now();
    drain(&shared.recorder, expected).await;
    let drain_s = round3(drain_started.elapsed().as_secs_f64());

    let codes = close_codes(stalled).await;
    let stalled_closed = codes.iter().filter(|c| c.is_some()).count();
    let stalled_closed_3008 = codes.iter().filter(|&&c| c == Some(3008)).count();
    let _ = stop_tx.send(true);
    let publish_errors = match publisher.await? {
        Ok(n) => n,
        // Every publication was sent, so the report is still worth having.
        Err(e) => {
            shared.error(e.context("publisher, after the window"));
            0
        }
    };
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();

    let (latency, deliveries, _) = shared.recorder.merge();
    let errors = shared.errors().snapshot();
    let server_cpu = server_cpu_start.zip(server_cpu_end).map(|(a, b)| b - a);
    let bench_cpu = bench_cpu_start.zip(bench_cpu_end).map(|(a, b)| b - a);
    warn_if_bench_bound(bench_cpu, window_s);
    let duration_s = args.duration.as_secs_f64();
    Ok(FanoutReport {
        bench: "fanout",
        subs: args.subs,
        subscribed,
        rate: args.rate,
        size: args.size.max(DATA_OVERHEAD),
        duration_s: round3(duration_s),
        published,
        publish_errors,
        expected_deliveries: expected,
        deliveries,
        loss: if expected == 0 {
            0.0
        } else {
            // Six decimals: one lost delivery in a million still shows.
            ((1.0 - deliveries as f64 / expected as f64) * 1e6).round() / 1e6
        },
        deliveries_per_s: round3(deliveries as f64 / duration_s),
        latency_ms: stats::summarize(&latency),
        drain_s,
        disconnected: shared.disconnected.load(Ordering::Relaxed),
        stalled: args.stalled,
        stalled_closed,
        stalled_closed_3008,
        server_rss_kb,
        server_pid: pid,
        server_cpu_s: server_cpu.map(round3),
        server_cpu_s_per_million_deliveries: server_cpu
            .filter(|_| deliveries > 0)
            .map(|c| round3(c * 1e6 / deliveries as f64)),
        deliveries_per_server_cpu_s: server_cpu
            .filter(|&c| c > 0.0)
            // The /proc sample covers window_s, which may be a little longer than duration_s.
            .map(|c| round3(deliveries as f64 / (c * duration_s / window_s))),
        bench_cpu_s: bench_cpu.map(round3),
        bench_cpu_s_per_million_deliveries: bench_cpu
            .filter(|_| deliveries > 0)
            .map(|c| round3(c * 1e6 / deliveries as f64)),
        errors,
    })
}

/// Reads what each stalled connection was sent until the server closed it. Returns, per
/// connection, `Some(code)` for a Close frame, `Some(0)` when the stream ended without one,
/// and `None` when it was still open after the grace period.
async fn close_codes(stalled: Vec<Ws>) -> Vec<Option<u16>> {
    let reads = stalled.into_iter().map(|mut ws| async move {
        let read = async {
            while let Some(msg) = ws.next().await {
                match msg {
                    Ok(Message::Close(Some(frame))) => return u16::from(frame.code),
                    Ok(_) => {}
                    Err(_) => return 0,
                }
            }
            0
        };
        tokio::time::timeout(CLOSE_GRACE, read).await.ok()
    });
    futures_util::future::join_all(reads).await
}

/// Whether the bench used nearly all the cores it may run on (its affinity mask, so `taskset`
/// counts) over a window of `window_s`. Such a bench has measured itself, not the server.
pub(crate) fn bench_bound(bench_cpu: Option<f64>, window_s: f64) -> Option<bool> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    bench_cpu.map(|cpu| cpu > 0.9 * cores * window_s)
}

pub(crate) fn warn_if_bench_bound(bench_cpu: Option<f64>, window_s: f64) {
    if bench_bound(bench_cpu, window_s) == Some(true) {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        eprintln!(
            "bench: used {:.2} CPU-s of {:.2} available ({cores} cores): the bench may be the bottleneck; give it more cores or lower the load",
            bench_cpu.unwrap_or_default(),
            cores * window_s
        );
    }
}

/// Waits until every expected delivery arrived, or nothing arrives for a while. "Nothing"
/// includes warm-up messages: an overloaded server may still be sending those after the window.
async fn drain(recorder: &Recorder, expected: u64) {
    let started = Instant::now();
    let (mut inside, mut received) = recorder.progress();
    let mut last_change = Instant::now();
    while inside < expected && started.elapsed() < DRAIN_MAX && last_change.elapsed() < DRAIN_IDLE {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = recorder.progress();
        if now.1 != received {
            last_change = Instant::now();
        }
        (inside, received) = now;
    }
}

/// Reads pushes until told to stop. Records each publication in shard `i`.
async fn receive(mut ws: Ws, i: usize, shared: &Shared, mut stop: watch::Receiver<bool>) {
    let shard = shared.recorder.shard(i);
    loop {
        let msg = tokio::select! {
            biased;
            msg = ws.next() => msg,
            _ = stop.changed() => {
                let _ = ws.close(None).await;
                return;
            }
        };
        let frame = match &msg {
            Some(Ok(Message::Text(t))) => t.as_bytes(),
            Some(Ok(Message::Binary(b))) => &b[..],
            Some(Ok(Message::Close(frame))) => {
                shared.disconnected.fetch_add(1, Ordering::Relaxed);
                let why = frame.as_ref().map(|c| format!("{} {}", c.code, c.reason));
                shared.error(anyhow::anyhow!(
                    "subscriber closed by server: {}",
                    why.unwrap_or_default()
                ));
                return;
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                shared.disconnected.fetch_add(1, Ordering::Relaxed);
                shared.error(anyhow::anyhow!("subscriber connection failed: {e}"));
                return;
            }
            None => {
                shared.disconnected.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        if record_frame(frame, shard, shared.window.get()) && ws.send(pong()).await.is_err() {
            shared.disconnected.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
}

/// Records every publication in a frame under one lock. Returns whether the frame had a ping.
fn record_frame(frame: &[u8], shard: &Mutex<stats::Shard>, window: (u64, u64)) -> bool {
    let now = now_ns();
    let mut pinged = false;
    let mut guard = None;
    for line in wire::lines(frame) {
        match wire::classify(line) {
            Line::Ping => pinged = true,
            Line::Pub(t) => guard
                .get_or_insert_with(|| stats::lock(shard))
                .record(window, t, now),
            Line::Other => {}
        }
    }
    pinged
}

struct Plan {
    channel: String,
    rate: u32,
    size: usize,
    until: Instant,
}

/// Publishes at `plan.rate` until `plan.until`, then sends the number of messages stamped
/// inside the window on `published`. It keeps reading replies and answering pings until
/// `stop`: closing earlier, with replies unread, would make the kernel reset the connection,
/// and the server would drop publishes it had not read yet. Returns the number of error replies.
async fn publish(
    mut ws: Ws,
    plan: Plan,
    shared: Arc<Shared>,
    published: oneshot::Sender<u64>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<u64> {
    let channel = serde_json::to_string(&plan.channel)?;
    let padding = "x".repeat(plan.size.saturating_sub(DATA_OVERHEAD));
    let tick = Duration::from_secs_f64(1.0 / f64::from(plan.rate)).max(MIN_TICK);
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let begin = Instant::now();
    let (mut sent, mut in_window, mut errors) = (0u64, 0u64, 0u64);
    let mut command = String::with_capacity(plan.size + 96);
    let mut published = Some(published);

    loop {
        tokio::select! {
            _ = ticker.tick(), if published.is_some() => {
                let now = Instant::now().min(plan.until);
                let due = ((now - begin).as_secs_f64() * f64::from(plan.rate)).floor() as u64 + 1;
                while sent < due {
                    let t = now_ns();
                    if shared.window.contains(t) {
                        in_window += 1;
                    }
                    command.clear();
                    // The first command id is 2; 1 was `connect`.
                    let id = (sent % u64::from(u32::MAX - 2)) + 2;
                    write!(command, r#"{{"id":{id},"publish":{{"channel":{channel},"data":{{"t":{t},"p":"{padding}"}}}}}}"#)?;
                    ws.feed(Message::text(command.as_str())).await?;
                    sent += 1;
                }
                ws.flush().await?;
                if now >= plan.until {
                    if let Some(tx) = published.take() {
                        let _ = tx.send(in_window);
                    }
                }
            }
            msg = ws.next() => {
                let frame = match &msg {
                    Some(Ok(Message::Text(t))) => t.as_bytes(),
                    Some(Ok(Message::Close(c))) => bail!("server closed the publisher: {c:?}"),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => bail!("publisher connection failed: {e}"),
                    None => bail!("server closed the publisher"),
                };
                let mut pinged = false;
                for line in wire::lines(frame) {
                    match wire::classify(line) {
                        Line::Ping => pinged = true,
                        Line::Other if wire::is_error_reply(line) => {
                            errors += 1;
                            shared.error(anyhow::anyhow!("publish: {}", String::from_utf8_lossy(line)));
                        }
                        _ => {}
                    }
                }
                if pinged {
                    ws.send(pong()).await?;
                }
            }
            _ = stop.changed() => break,
        }
    }
    let _ = ws.close(None).await;
    Ok(errors)
}
