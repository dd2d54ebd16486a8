//! # Switchboard engines
//!
//! Engines that many nodes share, behind the hub's `Broker` and `PresenceStore` traits: the
//! nodes never talk to each other directly, only through a service the user already runs.
//!
//! - [`redis`]: pub/sub for fan-out, a stream plus a Lua script per channel for history
//!   (append and publish are one atomic step), presence in hashes with heartbeat TTLs.
//! - [`nats`]: core NATS for fan-out, JetStream for history and recovery, presence in a KV
//!   bucket with a TTL.
//!
//! Both are behind cargo features that are on by default.

#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "redis")]
pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use switchboard_hub::{Broker, BrokerError, PresenceStore};
use tokio_util::sync::CancellationToken;

/// Settings every engine takes.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Prefix of every key, subject, stream and bucket name, so that several deployments (or
    /// test runs) share one service without seeing each other.
    pub prefix: String,
    /// How long a node's presence entries outlive its last heartbeat (heartbeats every third
    /// of it), so a crashed node's clients leave presence within this time.
    pub presence_ttl: Duration,
    /// Upper bounds over all namespaces: the most publications any channel keeps and the
    /// longest any stream lives after its last publication. Engines that size their storage
    /// once (a JetStream stream) use them; per-publication options still apply within them.
    pub history_max_size: usize,
    pub history_max_ttl: Duration,
    /// Stops the engine's background tasks (subscription reader, heartbeats).
    pub shutdown: CancellationToken,
}

/// A connected engine: the broker and presence store of one node.
pub struct Engine {
    pub broker: Arc<dyn Broker>,
    pub presence: Arc<dyn PresenceStore>,
}

/// Connects to the engine `url` names: `redis://` (or `rediss://`) or `nats://`.
pub async fn connect(url: &str, opts: EngineOptions) -> Result<Engine, BrokerError> {
    let scheme = url.split("://").next().unwrap_or_default();
    match scheme {
        #[cfg(feature = "redis")]
        "redis" | "rediss" => redis::connect(url, opts).await,
        #[cfg(feature = "nats")]
        "nats" | "tls" => nats::connect(url, opts).await,
        _ => Err(BrokerError::Unavailable(format!(
            "unsupported broker url scheme {scheme:?} (expected redis:// or nats://)"
        ))),
    }
}
