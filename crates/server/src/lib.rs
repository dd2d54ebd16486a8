//! # Switchboard server
//!
//! A real-time backend speaking the Centrifugo client protocol v2. The binary (`main.rs`) is
//! thin: everything here can be started in-process on port 0 (see [`testing`]).
//!
//! ## Layout
//! - [`accounts`]: password hashing, access and refresh tokens, login rate limits.
//! - [`config`]: the config struct and its layers (TOML, `SWITCHBOARD_*` env, flags).
//! - [`auth`]: JWT verification with a pinned algorithm; token minting.
//! - [`node`]: a node's shared state: hub, client registry, RPC registry, metrics, shutdown.
//! - [`server`]: router, accept loop, WebSocket upgrade, graceful shutdown.
//! - [`conn`]: one task per client connection; [`conn::outbound`] is the direct-write,
//!   bounded outbound path the fan-out uses.
//! - [`chat`]: the chat service on the wire: the `chat` namespace's owner and `chat.*` RPCs.
//! - [`presence`]: per-user online state and the `last_seen` writer.
//! - [`api`]: the Centrifugo-compatible server HTTP API.
//! - [`rest`]: the `/v1` REST API (accounts, rooms, messages).
//! - [`ws`]: upgrade checks and server-side WebSocket framing.
//! - [`metrics`]: Prometheus metrics.
//! - [`dashboard`]: each node's figures, published every second to `system:dashboard`.
//! - [`web`]: the browser app, embedded at build time and served at `/`.
//! - `fuzzing` (hidden): the decoding entry points of the fuzz targets in `fuzz/`.

pub mod accounts;
pub mod api;
pub mod auth;
pub mod chat;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod dashboard;
pub mod docs;
#[doc(hidden)]
pub mod fuzzing;
pub mod metrics;
pub mod node;
pub mod presence;
pub mod rest;
pub mod server;
pub mod sites;
pub mod testing;
pub mod web;
pub mod ws;
