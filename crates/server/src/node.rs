//! A node's shared state: configuration, the hub, token verification, the registry of local
//! clients, the RPC registry, metrics and the shutdown signal every task watches.

use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use async_trait::async_trait;
use dashmap::DashMap;
use switchboard_hub::{Hub, MemoryBroker, MemoryPresence};
use switchboard_protocol::codes::{self, Disconnect, ErrorCode};
use switchboard_protocol::RawValue;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::TokenVerifier;
use crate::config::{persistent_secret, Config};
use crate::conn::outbound::{Conn, Control};
use crate::metrics::Metrics;
use switchboard_store::Store;

/// Who calls an RPC method.
pub struct RpcContext<'a> {
    pub user: &'a str,
    pub client: &'a str,
}

/// A server-side method clients call with the `rpc` command. Services register theirs at start.
#[async_trait]
pub trait RpcHandler: Send + Sync {
    async fn call(
        &self,
        ctx: RpcContext<'_>,
        data: Option<&RawValue>,
    ) -> Result<Option<Box<RawValue>>, ErrorCode>;
}

/// A service that owns the channels of one namespace (chat rooms, for instance): it decides who
/// may subscribe, handles client publishes (persisting them and then broadcasting them with
/// `Broker::broadcast`, one channel's publications in offset order), and keeps each channel's
/// durable stream, which subscribe and `history` read instead of the broker's ring. Channels of
/// an owned namespace are always positioned and recoverable.
#[async_trait]
pub trait ChannelOwner: Send + Sync {
    /// Whether `user` may subscribe to `channel` (after the namespace's own rules passed).
    async fn can_subscribe(&self, user: &str, channel: &str) -> Result<(), ErrorCode>;

    /// A client `publish` to `channel`. Errors go back to the client as they are.
    async fn publish(
        &self,
        ctx: RpcContext<'_>,
        channel: &str,
        data: &RawValue,
    ) -> Result<(), ErrorCode>;

    /// The channel's durable stream, with the semantics of `Broker::history`.
    async fn history(
        &self,
        channel: &str,
        filter: &switchboard_hub::HistoryFilter,
    ) -> Result<switchboard_hub::HistoryPage, switchboard_hub::BrokerError>;
}

/// Secrets in effect, and whether each was generated (to warn about it).
pub struct Secrets {
    pub hmac_secret: String,
    pub hmac_generated: bool,
    pub api_key: String,
    pub api_key_generated: bool,
}

impl Secrets {
    /// Configured secrets, or ones generated once and kept in the data directory.
    pub fn resolve(config: &Config) -> std::io::Result<Secrets> {
        let (hmac_secret, hmac_generated) = Self::hmac_secret(config)?;
        let (api_key, api_key_generated) = if config.api.key.is_empty() {
            persistent_secret(&config.data_dir, "api_key")?
        } else {
            (config.api.key.clone(), false)
        };
        Ok(Secrets {
            hmac_secret,
            hmac_generated,
            api_key,
            api_key_generated,
        })
    }

    /// The token secret alone (for `switchboard token`, which needs no API key). Returns the
    /// secret and whether it was generated now.
    pub fn hmac_secret(config: &Config) -> std::io::Result<(String, bool)> {
        if config.token.hmac_secret.is_empty() {
            persistent_secret(&config.data_dir, "token_hmac_secret")
        } else {
            Ok((config.token.hmac_secret.clone(), false))
        }
    }
}

pub struct Node {
    pub config: Config,
    pub hub: Hub,
    /// Durable data: accounts, rooms, messages (SQLite or PostgreSQL).
    pub store: Arc<dyn Store>,
    /// Rooms and their message streams (owner of the `chat` namespace).
    pub chat: switchboard_chat::Chat,
    /// Collaborative documents (`/docs/{id}`).
    pub collab: switchboard_collab::Collab,
    pub verifier: TokenVerifier,
    /// Password hashing, access/refresh tokens and login rate limits (`/v1/auth`).
    pub accounts: crate::accounts::Accounts,
    pub api_key: String,
    pub uid: String,
    pub started: Instant,
    /// Local clients by client id.
    pub clients: DashMap<Arc<str>, (String, Arc<Conn>)>,
    /// Local client ids by user id: a user is online (on this node) while it is here.
    pub users: DashMap<String, Vec<Arc<str>>>,
    /// Records `last_seen` when a user's last connection closes (see [`crate::presence`]).
    pub last_seen: crate::presence::LastSeen,
    pub connections: AtomicUsize,
    /// New WebSocket connections per client address (`client.connection_rate_per_ip`).
    pub connection_rate: crate::ws::ConnectionRate,
    /// The allowed origins of every site, checked at WebSocket upgrade (reloaded from the
    /// store when a site is created or changed; never queried per upgrade).
    pub site_origins: crate::sites::SiteOrigins,
    /// The other nodes of the cluster, from their heartbeats (see [`crate::cluster`]).
    pub peers: crate::cluster::Peers,
    rpc: RwLock<HashMap<String, Arc<dyn RpcHandler>>>,
    /// Services owning namespaces, by namespace name.
    owners: RwLock<HashMap<String, Arc<dyn ChannelOwner>>>,
    pub metrics: Metrics,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
}

impl Node {
    /// `engine`: the broker and presence store shared with other nodes; `None` runs one node
    /// on the in-process engine. `shutdown` is the token the engine's tasks already watch.
    pub fn new(
        config: Config,
        secrets: &Secrets,
        store: Arc<dyn Store>,
        engine: Option<switchboard_engines::Engine>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Node>> {
        let verifier = TokenVerifier::new(&config.token, &secrets.hmac_secret)?;
        let accounts = crate::accounts::Accounts::new(&config, &secrets.hmac_secret);
        // Quiet streams live as long as the longest history TTL, so a quiet channel's position
        // stays recoverable at least as long as a busy one's.
        let idle_ttl = std::iter::once(&config.channel)
            .chain(config.namespaces.values())
            .map(|ns| ns.history_ttl)
            .max()
            .unwrap_or_default();
        let hub = match engine {
            Some(e) => Hub::new(e.broker, e.presence),
            None => Hub::new(
                Arc::new(MemoryBroker::new(idle_ttl)),
                Arc::new(MemoryPresence::new()),
            ),
        };
        let metrics = Metrics::new(hub.metrics());
        let tasks = TaskTracker::new();
        let chat = switchboard_chat::Chat::start(
            store.clone(),
            hub.broker.clone(),
            switchboard_chat::ChatConfig {
                max_message_chars: config.chat.max_message_chars,
                moderation: config.moderation.to_chat(metrics.moderation.clone()),
            },
            &tasks,
            shutdown.clone(),
        );
        let collab = switchboard_collab::Collab::start(
            store.clone(),
            config.docs.to_collab(),
            metrics.collab.clone(),
            &tasks,
            shutdown.clone(),
        );
        let last_seen = crate::presence::LastSeen::start(store.clone(), &tasks, shutdown.clone());
        let connection_rate = crate::ws::ConnectionRate::new(
            config.client.connection_rate_per_ip,
            config.client.connection_burst_per_ip,
        );
        let node = Arc::new(Node {
            config,
            hub,
            store,
            chat,
            collab,
            verifier,
            accounts,
            api_key: secrets.api_key.clone(),
            uid: uuid::Uuid::new_v4().to_string(),
            started: Instant::now(),
            clients: DashMap::new(),
            users: DashMap::new(),
            last_seen,
            connections: AtomicUsize::new(0),
            connection_rate,
            site_origins: crate::sites::SiteOrigins::default(),
            peers: crate::cluster::Peers::default(),
            rpc: RwLock::new(HashMap::new()),
            owners: RwLock::new(HashMap::new()),
            metrics,
            shutdown,
            tasks,
        });
        let source: std::sync::Weak<dyn switchboard_hub::HistorySource> =
            Arc::downgrade(&node) as std::sync::Weak<Node>;
        node.hub.set_history_source(source);
        let messages: std::sync::Weak<dyn switchboard_hub::MessageHandler> =
            Arc::downgrade(&node) as std::sync::Weak<Node>;
        node.hub.set_message_handler(messages);
        Ok(node)
    }

    pub fn register_rpc(&self, method: &str, handler: Arc<dyn RpcHandler>) {
        self.rpc
            .write()
            .expect("rpc lock poisoned")
            .insert(method.to_string(), handler);
    }

    pub fn rpc(&self, method: &str) -> Option<Arc<dyn RpcHandler>> {
        self.rpc
            .read()
            .expect("rpc lock poisoned")
            .get(method)
            .cloned()
    }

    /// Hands the channels of `namespace` to `owner`. The namespace must be configured.
    pub fn register_owner(&self, namespace: &str, owner: Arc<dyn ChannelOwner>) {
        self.owners
            .write()
            .expect("owners lock poisoned")
            .insert(namespace.to_string(), owner);
    }

    /// A channel's stream: its owner's durable one, or the broker's history.
    pub async fn stream_history(
        &self,
        channel: &str,
        filter: &switchboard_hub::HistoryFilter,
    ) -> Result<switchboard_hub::HistoryPage, switchboard_hub::BrokerError> {
        match self.owner(channel) {
            Some(owner) => owner.history(channel, filter).await,
            None => self.hub.broker.history(channel, filter).await,
        }
    }

    /// The service owning `channel`'s namespace, if any.
    pub fn owner(&self, channel: &str) -> Option<Arc<dyn ChannelOwner>> {
        let (ns, _) = channel.split_once(':')?;
        self.owners
            .read()
            .expect("owners lock poisoned")
            .get(ns)
            .cloned()
    }

    pub(crate) fn add_client(&self, user: &str, conn: Arc<Conn>) {
        self.clients
            .insert(conn.id.clone(), (user.to_string(), conn.clone()));
        self.users
            .entry(user.to_string())
            .or_default()
            .push(conn.id.clone());
    }

    pub(crate) fn remove_client(&self, user: &str, id: &str) {
        self.clients.remove(id);
        let last = self.users.remove_if_mut(user, |_, ids| {
            ids.retain(|c| &**c != id);
            ids.is_empty()
        });
        if last.is_some() {
            // Never blocks: a bounded hand-off to the last_seen writer.
            self.last_seen.offline(user);
        }
    }

    /// The connections of `user` (all of them, or only `client`).
    pub fn user_conns(&self, user: &str, client: Option<&str>) -> Vec<Arc<Conn>> {
        let Some(ids) = self.users.get(user).map(|v| v.clone()) else {
            return Vec::new();
        };
        ids.iter()
            .filter(|id| client.is_none_or(|c| c == &***id))
            .filter_map(|id| self.clients.get(id).map(|e| e.1.clone()))
            .collect()
    }

    pub fn disconnect_user(&self, user: &str, client: Option<&str>, d: Disconnect) -> usize {
        let conns = self.user_conns(user, client);
        for c in &conns {
            c.close(d);
        }
        conns.len()
    }

    pub fn control_user(&self, user: &str, client: Option<&str>, make: impl Fn() -> Control) {
        for c in self.user_conns(user, client) {
            c.control(make());
        }
    }
}

/// The hub fills gaps in a channel's offsets from the same stream subscribers recover from.
#[async_trait]
impl switchboard_hub::HistorySource for Node {
    async fn history(
        &self,
        channel: &str,
        filter: &switchboard_hub::HistoryFilter,
    ) -> Result<switchboard_hub::HistoryPage, switchboard_hub::BrokerError> {
        self.stream_history(channel, filter).await
    }
}

/// Node topic messages: the control topic, and document relays.
impl switchboard_hub::MessageHandler for Node {
    fn handle_message(&self, topic: &str, payload: bytes::Bytes) {
        if topic == crate::cluster::CONTROL_TOPIC {
            crate::cluster::handle(self, &payload);
        } else if let Some(doc) = crate::cluster::doc_of_topic(topic) {
            self.collab.handle_relay(doc, payload);
        } else {
            tracing::debug!(topic, "message on an unknown topic dropped");
        }
    }
}

/// The default disconnect for `/api/disconnect` without one.
pub const API_DISCONNECT: Disconnect = codes::DISCONNECT_FORCE_NO_RECONNECT;
