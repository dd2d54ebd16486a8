//! `bench conns`: open N idle connections, hold them, and report how much server memory they
//! cost. Each connection is one task that answers pings. Its read buffer is 4 KiB and it keeps
//! no write buffer, so 19.5k connections fit in the bench under a 20k open-files limit.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{open_all, pong, Dialer, Opened, Ws};
use crate::wire::{self, Line};
use crate::{procfs, round3, Target};

/// Read chunk per held connection. Control frames and pings are tiny.
const READ_BUFFER: usize = 4096;
/// How long held connections get to send their close frames at the end.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

#[derive(clap::Args, Debug, Clone)]
pub struct ConnsArgs {
    #[command(flatten)]
    pub target: Target,
    /// Number of connections to open.
    #[arg(long, default_value_t = 1000)]
    pub n: usize,
    /// How long to hold the connections after the last one connected, before reading RSS.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub hold: Duration,
    /// Connection attempts in flight at once.
    #[arg(long, default_value_t = 200)]
    pub concurrency: usize,
}

#[derive(Debug, Serialize)]
pub struct ConnsReport {
    pub bench: &'static str,
    pub n: usize,
    pub connected: usize,
    pub failed: usize,
    pub server_pid: Option<u32>,
    pub server_rss_before_kb: Option<u64>,
    pub server_rss_after_kb: Option<u64>,
    pub rss_per_conn_bytes: Option<i64>,
    /// Held connections that the server closed before the end.
    pub dropped: usize,
    /// Time to open all connections, hold excluded.
    pub elapsed_s: f64,
    pub hold_s: f64,
    pub bench_cpu_s: Option<f64>,
    /// The first few distinct connection errors.
    pub errors: Vec<String>,
}

pub async fn run(args: ConnsArgs) -> anyhow::Result<ConnsReport> {
    procfs::warn_if_fd_limit_low(args.n);
    let dialer = Arc::new(Dialer::new(&args.target, READ_BUFFER).await?);
    let pid = procfs::server_pid(args.target.server_pid, dialer.port());
    let cpu_start = procfs::cpu_seconds(None);
    let rss_before = pid.and_then(|p| procfs::rss_kb(Some(p)));
    let started = Instant::now();

    let (stop_tx, stop_rx) = watch::channel(false);
    let dropped = Arc::new(AtomicUsize::new(0));
    let opened = {
        let dropped = dropped.clone();
        open_all(
            args.n,
            args.concurrency,
            move |i| {
                let dialer = dialer.clone();
                async move { dialer.open(i).await }
            },
            move |_, ws| {
                let (stop, dropped) = (stop_rx.clone(), dropped.clone());
                async move {
                    if !hold(ws, stop).await {
                        dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            },
        )
        .await
    };
    let elapsed = started.elapsed();
    let Opened {
        mut tasks,
        connected,
        failed,
        errors,
    } = opened;

    tokio::time::sleep(args.hold).await;
    let rss_after = pid.and_then(|p| procfs::rss_kb(Some(p)));

    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    let bench_cpu = cpu_start
        .zip(procfs::cpu_seconds(None))
        .map(|(a, b)| round3(b - a));

    let rss_per_conn_bytes = match (rss_before, rss_after) {
        (Some(b), Some(a)) if connected > 0 => {
            Some((a as i64 - b as i64) * 1024 / connected as i64)
        }
        _ => None,
    };
    Ok(ConnsReport {
        bench: "conns",
        n: args.n,
        connected,
        failed,
        server_pid: pid,
        server_rss_before_kb: rss_before,
        server_rss_after_kb: rss_after,
        rss_per_conn_bytes,
        dropped: dropped.load(Ordering::Relaxed),
        elapsed_s: round3(elapsed.as_secs_f64()),
        hold_s: round3(args.hold.as_secs_f64()),
        bench_cpu_s: bench_cpu,
        errors: errors.snapshot(),
    })
}

/// Holds an idle connection until told to stop, answering pings. Returns false if the server
/// ended the connection first.
async fn hold(mut ws: Ws, mut stop: watch::Receiver<bool>) -> bool {
    loop {
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    if wire::lines(t.as_bytes()).any(|l| wire::classify(l) == Line::Ping)
                        && ws.send(pong()).await.is_err()
                    {
                        return false;
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return false,
                Some(Ok(_)) => {}
            },
            _ = stop.changed() => {
                let _ = ws.close(None).await;
                return true;
            }
        }
    }
}
