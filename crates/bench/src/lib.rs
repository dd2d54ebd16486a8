//! Load generator for Switchboard's Centrifugo-compatible WebSocket endpoint.
//!
//! Each scenario prints exactly one JSON line on stdout, so runs can be appended to a file and
//! compared. Diagnostics go to stderr. The server binary exposes this as `switchboard bench ...`.
//! It calls [`run`] from its own multi-threaded tokio runtime. Pin the server and the bench to
//! different cores with `taskset` so that neither steals the other's CPU.
//!
//! # Layout
//! - [`conns`]: many idle connections. Measures server memory per connection.
//! - [`fanout`]: one publisher and N subscribers on one channel. Measures deliveries/s,
//!   end-to-end latency and server CPU per delivery.
//! - [`chat`]: R rooms of U members who all send. Measures persisted messages/s, send→ack
//!   and send→deliver latency, and checks that every member saw its room's offsets in order.
//! - [`docs`]: E editors on one collaborative document over y-websocket (binary Yjs sync
//!   messages, not Centrifugo). Measures edit propagation latency, server CPU, memory per
//!   loaded document and the load time of a large document, and checks convergence.
//! - [`soak`]: a long, steady mix of the above (idle subscribers with fan-out, chat rooms,
//!   edited documents) while the server process is sampled; the verdict is "flat line"
//!   (memory, open files and threads stop growing, nothing is lost).
//! - `client`: dials one bench connection (source address, WebSocket, `connect` handshake, or
//!   the bare upgrade for `docs`) and sends request/reply commands during setup.
//! - `wire`: the cheap receive path. It splits frames into lines and finds `"t":` by byte search.
//! - `stats`: sharded latency histograms and the percentile summary.
//! - `procfs`: `/proc` readings (RSS, CPU ticks, open-files limit, which pid listens on a port).
//!
//! # Limits
//! Every connection uses one file descriptor in the bench and one in the server. The bench does
//! not raise `RLIMIT_NOFILE`, because the crate forbids `unsafe`. Run `ulimit -n <hard limit>`
//! first if the soft limit is low. A warning is printed when `n` gets close to it. A single
//! source address has about 28k ephemeral ports, so client sockets are spread over
//! `127.0.0.1..=127.0.0.<sources>`.

pub mod chat;
mod client;
pub mod conns;
pub mod docs;
pub mod fanout;
mod procfs;
pub mod soak;
mod stats;
mod wire;

pub use chat::{ChatArgs, ChatReport};
pub use conns::{ConnsArgs, ConnsReport};
pub use docs::{DocsArgs, DocsReport};
pub use fanout::{FanoutArgs, FanoutReport, LatencySummary};
pub use soak::{SoakArgs, SoakReport};

/// Where the server is and how to authenticate to it. Shared by every scenario.
#[derive(clap::Args, Debug, Clone)]
pub struct Target {
    /// WebSocket URL of the Centrifugo-protocol endpoint.
    #[arg(long, default_value = "ws://127.0.0.1:8000/connection/websocket")]
    pub url: String,
    /// HMAC secret used to mint HS256 connection tokens (`sub` = `bench-<i>`, 1 h expiry).
    #[arg(long, env = "SWITCHBOARD_TOKEN_HMAC_SECRET", hide_env_values = true)]
    pub secret: String,
    /// Server process for /proc readings (RSS, CPU). If omitted, the bench looks for the
    /// process that listens on the URL's port.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Spread client sockets over source addresses 127.0.0.1..=127.0.0.N (loopback targets only).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u8).range(1..=254))]
    pub sources: u8,
}

#[derive(clap::Subcommand, Debug)]
pub enum BenchCommand {
    /// Open N idle connections, hold them and report server RSS per connection.
    Conns(ConnsArgs),
    /// N subscribers on one channel and one publisher at a fixed rate. Reports deliveries/s,
    /// latency percentiles and server CPU per delivery.
    Fanout(FanoutArgs),
    /// R rooms of U members, each member sending M messages/s over its own connection.
    /// Reports persisted messages/s, send→ack and send→deliver latency, and ordering checks.
    Chat(ChatArgs),
    /// E editors typing into one shared document (y-websocket), plus optional memory-per-document
    /// and large-document load phases. Reports propagation latency, convergence and server cost.
    Docs(DocsArgs),
    /// A long mixed load (15,000 connections: idle subscribers with fan-out, chat rooms,
    /// edited documents) while the server's RSS, open files, threads and gauges are sampled.
    /// Reports the time series and a flat-line verdict.
    Soak(SoakArgs),
}

/// Runs one scenario and prints its report as one JSON line on stdout.
///
/// Call it from a multi-threaded tokio runtime. With a current-thread runtime, the receive
/// path shares one core with everything else in the process.
pub async fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    let report = match cmd {
        BenchCommand::Conns(args) => conns::run(args).await.map(|r| serde_json::to_string(&r)),
        BenchCommand::Fanout(args) => fanout::run(args).await.map(|r| serde_json::to_string(&r)),
        BenchCommand::Chat(args) => chat::run(args).await.map(|r| serde_json::to_string(&r)),
        BenchCommand::Docs(args) => docs::run(args).await.map(|r| serde_json::to_string(&r)),
        BenchCommand::Soak(args) => soak::run(args).await.map(|r| serde_json::to_string(&r)),
    };
    // Flatten the context chain into one message: callers may print only the outermost layer.
    let line = report.map_err(|e| anyhow::anyhow!("{e:#}"))??;
    println!("{line}");
    Ok(())
}

/// Rounds to 3 decimals so that reports stay readable.
pub(crate) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
