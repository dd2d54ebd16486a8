//! The engine contracts: how a node publishes to a channel, keeps its history and presence.
//!
//! A [`Broker`] moves publications between nodes and keeps each channel's history stream.
//! The in-memory engine ([`crate::memory`]) serves one node; Redis and NATS engines implement
//! the same traits for many. Guarantees every implementation must give:
//! - offsets in a channel's stream increase strictly (by one per publication), cluster-wide;
//! - the epoch changes whenever a stream's history is lost, so a client holding an old
//!   position learns that it cannot recover instead of silently missing publications;
//! - a node receives, through its [`BrokerEventHandler`], every publication made to a channel it
//!   subscribed to, in offset order.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use switchboard_protocol::client::{ClientInfo, Publication, StreamPosition};
use switchboard_protocol::RawValue;

/// Errors at the engine boundary.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The requested position belongs to another epoch or was trimmed away.
    #[error("unrecoverable position")]
    UnrecoverablePosition,
    /// The backing service is unreachable or failed; the caller may retry.
    #[error("engine unavailable: {0}")]
    Unavailable(String),
}

/// How a publication is kept.
#[derive(Debug, Clone, Default)]
pub struct PublishOptions {
    /// Publications kept in the channel's history ring; 0 keeps none and assigns no offset.
    pub history_size: usize,
    /// How long a stream lives after its last publication.
    pub history_ttl: Duration,
    pub tags: Option<HashMap<String, String>>,
}

/// Which publications a history call returns.
#[derive(Debug, Clone, Default)]
pub struct HistoryFilter {
    /// Only publications after this position (before it when `reverse`).
    pub since: Option<StreamPosition>,
    /// `None` returns all kept publications, `Some(0)` only the stream position.
    pub limit: Option<usize>,
    /// Newest first.
    pub reverse: bool,
}

#[derive(Debug, Default)]
pub struct HistoryPage {
    pub publications: Vec<Arc<Publication>>,
    /// The stream's top: the offset of its newest publication and its epoch.
    pub position: StreamPosition,
}

/// Receives what the broker delivers to this node. It must not block (the in-memory broker
/// calls it while holding the channel's stream lock). Engines call it in the order their
/// service delivered; publications made on different nodes may arrive out of offset order,
/// and the hub puts them back in order (see [`crate::hub`]).
pub trait BrokerEventHandler: Send + Sync {
    /// `epoch` is the epoch of the stream the offset belongs to, or "" when the publication's
    /// position was assigned outside the broker ([`Broker::broadcast`]).
    fn handle_publication(&self, channel: &str, publication: Arc<Publication>, epoch: &str);
    fn handle_join(&self, channel: &str, info: &ClientInfo);
    fn handle_leave(&self, channel: &str, info: &ClientInfo);
    /// A message on a node topic this node subscribed to ([`Broker::subscribe_topic`]).
    fn handle_message(&self, topic: &str, payload: Bytes);
    /// The engine lost its connection to the service and has it back (subscriptions restored).
    /// Deliveries in between may be missing, so positioned channels must recover.
    fn handle_reconnect(&self);
}

#[async_trait]
pub trait Broker: Send + Sync {
    /// Registers the node's handler. Called once, before any other method.
    fn register(&self, handler: std::sync::Weak<dyn BrokerEventHandler>);

    /// Publishes to every node subscribed to `channel`, appending to history when
    /// `opts.history_size > 0`. Returns the publication's position (offset 0 without history).
    async fn publish(
        &self,
        channel: &str,
        data: Box<RawValue>,
        info: Option<ClientInfo>,
        opts: &PublishOptions,
    ) -> Result<StreamPosition, BrokerError>;

    /// Delivers a publication whose position was assigned elsewhere (a durable store) to every
    /// node subscribed to `channel`, offset untouched, without adding it to broker history.
    /// Callers broadcast a channel's publications one at a time, in offset order.
    async fn broadcast(
        &self,
        channel: &str,
        publication: Arc<Publication>,
    ) -> Result<(), BrokerError>;

    async fn publish_join(&self, channel: &str, info: &ClientInfo) -> Result<(), BrokerError>;
    async fn publish_leave(&self, channel: &str, info: &ClientInfo) -> Result<(), BrokerError>;

    /// Starts delivering `channel`'s publications to this node.
    async fn subscribe(&self, channel: &str) -> Result<(), BrokerError>;
    /// Stops delivering `channel`'s publications to this node.
    async fn unsubscribe(&self, channel: &str) -> Result<(), BrokerError>;

    async fn history(
        &self,
        channel: &str,
        filter: &HistoryFilter,
    ) -> Result<HistoryPage, BrokerError>;
    /// Drops a channel's history. Its next publication starts a new epoch.
    async fn remove_history(&self, channel: &str) -> Result<(), BrokerError>;

    /// Drops expired streams. Called periodically by the server.
    fn sweep(&self) {}

    /// Sends `payload` to every node subscribed to `topic`, the sender included when it is
    /// subscribed. Node-to-node traffic (control messages, document relays): no history, at
    /// most once, in order per sender. Topics are separate from channels.
    async fn publish_message(&self, topic: &str, payload: Bytes) -> Result<(), BrokerError>;
    /// Starts delivering `topic`'s messages to this node's `handle_message`. Deliveries start
    /// before this returns.
    async fn subscribe_topic(&self, topic: &str) -> Result<(), BrokerError>;
    async fn unsubscribe_topic(&self, topic: &str) -> Result<(), BrokerError>;

    /// A short name for logs and `/api/info` ("memory", "redis", "nats").
    fn name(&self) -> &'static str;
}

/// Who is subscribed to a channel, across the cluster. Engines shared by many nodes keep each
/// node's entries alive with heartbeats, so a crashed node's clients expire after a TTL.
#[async_trait]
pub trait PresenceStore: Send + Sync {
    async fn add(&self, channel: &str, info: &ClientInfo) -> Result<(), BrokerError>;
    async fn remove(&self, channel: &str, client: &str) -> Result<(), BrokerError>;
    async fn presence(&self, channel: &str) -> Result<HashMap<String, ClientInfo>, BrokerError>;
    /// (clients, distinct users)
    async fn stats(&self, channel: &str) -> Result<(u32, u32), BrokerError>;
}
