//! What nodes tell each other through the broker's `control` topic, and the live-node list.
//!
//! Every node subscribes to the topic at start and, every third of `broker.presence_ttl`
//! (at most 5 s), publishes a heartbeat with its `/api/info` entry; a node that stays silent
//! for `presence_ttl` drops out of every other node's list. Server API calls that act on
//! connections (`disconnect`, `subscribe`, `unsubscribe`) run on the node that got them and
//! are sent to the others as commands, so they reach a user's connections wherever they are.
//!
//! Messages are JSON, at most once (a lost heartbeat is repaired by the next one; a lost
//! command is what the broker's pub/sub gives: the API answers before every node has acted).
//! A message that does not parse is logged and dropped.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use switchboard_protocol::codes::Disconnect;

use crate::conn::outbound::Control;
use crate::node::Node;

/// The topic every node subscribes to.
pub const CONTROL_TOPIC: &str = "control";

/// Heartbeats are sent this often at most.
const MAX_HEARTBEAT: Duration = Duration::from_secs(5);

#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Message {
    /// A node's `/api/info` entry.
    Node { uid: String, info: Value },
    Disconnect {
        origin: String,
        user: String,
        client: Option<String>,
        code: u16,
    },
    Subscribe {
        origin: String,
        user: String,
        client: Option<String>,
        channel: String,
    },
    Unsubscribe {
        origin: String,
        user: String,
        client: Option<String>,
        channel: String,
    },
}

/// The other nodes this node has heard from, with their last heartbeat.
#[derive(Default)]
pub struct Peers {
    nodes: DashMap<String, (Value, Instant)>,
}

impl Peers {
    /// The entries of peers heard from within `ttl`; forgets older ones.
    pub fn live(&self, ttl: Duration) -> Vec<Value> {
        self.nodes.retain(|_, (_, seen)| seen.elapsed() < ttl);
        let mut out: Vec<Value> = self.nodes.iter().map(|e| e.value().0.clone()).collect();
        out.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        out
    }
}

fn heartbeat_every(ttl: Duration) -> Duration {
    (ttl / 3).clamp(Duration::from_millis(100), MAX_HEARTBEAT)
}

/// Subscribes to the control topic and starts the heartbeat task.
pub async fn start(node: &Arc<Node>) -> anyhow::Result<()> {
    node.hub
        .broker
        .subscribe_topic(CONTROL_TOPIC)
        .await
        .map_err(|e| anyhow::anyhow!("cannot subscribe to the control topic: {e}"))?;
    let n = node.clone();
    node.tasks.spawn(async move {
        let mut tick = tokio::time::interval(heartbeat_every(n.config.broker.presence_ttl));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = n.shutdown.cancelled() => break,
                _ = tick.tick() => {
                    let msg = Message::Node { uid: n.uid.clone(), info: crate::api::node_info(&n) };
                    send(&n, &msg).await;
                }
            }
        }
    });
    Ok(())
}

async fn send(node: &Node, msg: &Message) {
    let payload = Bytes::from(serde_json::to_vec(msg).expect("control messages serialize"));
    if let Err(e) = node
        .hub
        .broker
        .publish_message(CONTROL_TOPIC, payload)
        .await
    {
        tracing::warn!(error = %e, "control message not sent");
    }
}

/// Disconnects `user`'s connections on this node and on every other.
pub async fn disconnect_user(node: &Node, user: &str, client: Option<&str>, d: Disconnect) {
    node.disconnect_user(user, client, d);
    let msg = Message::Disconnect {
        origin: node.uid.clone(),
        user: user.to_owned(),
        client: client.map(str::to_owned),
        code: d.code,
    };
    send(node, &msg).await;
}

/// Subscribes (or unsubscribes) `user`'s connections to `channel` on every node.
pub async fn control_user(
    node: &Node,
    user: &str,
    client: Option<&str>,
    channel: &str,
    subscribe: bool,
) {
    let make = || {
        let channel = channel.to_owned();
        if subscribe {
            Control::Subscribe { channel }
        } else {
            Control::Unsubscribe { channel }
        }
    };
    node.control_user(user, client, make);
    let (origin, user, client, channel) = (
        node.uid.clone(),
        user.to_owned(),
        client.map(str::to_owned),
        channel.to_owned(),
    );
    let msg = if subscribe {
        Message::Subscribe {
            origin,
            user,
            client,
            channel,
        }
    } else {
        Message::Unsubscribe {
            origin,
            user,
            client,
            channel,
        }
    };
    send(node, &msg).await;
}

/// Handles a message of the control topic (from any node, this one included).
pub fn handle(node: &Node, payload: &[u8]) {
    let msg: Message = match serde_json::from_slice(payload) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(error = %e, "dropping a control message that does not parse");
            return;
        }
    };
    match msg {
        Message::Node { uid, info } => {
            if uid != node.uid {
                node.peers.nodes.insert(uid, (info, Instant::now()));
            }
        }
        Message::Disconnect {
            origin,
            user,
            client,
            code,
        } => {
            if origin != node.uid {
                let d = crate::api::known_disconnect(code).unwrap_or(crate::node::API_DISCONNECT);
                node.disconnect_user(&user, client.as_deref(), d);
            }
        }
        Message::Subscribe {
            origin,
            user,
            client,
            channel,
        } => {
            if origin != node.uid {
                node.control_user(&user, client.as_deref(), || Control::Subscribe {
                    channel: channel.clone(),
                });
            }
        }
        Message::Unsubscribe {
            origin,
            user,
            client,
            channel,
        } => {
            if origin != node.uid {
                node.control_user(&user, client.as_deref(), || Control::Unsubscribe {
                    channel: channel.clone(),
                });
            }
        }
    }
}

/// Topic of a document's relay messages.
fn doc_topic(doc_id: i64) -> String {
    format!("doc.{doc_id}")
}

/// The document id of a relay topic.
pub fn doc_of_topic(topic: &str) -> Option<i64> {
    topic.strip_prefix("doc.")?.parse().ok()
}

/// Relay messages waiting for the broker; past this `send` refuses (the document then asks
/// its peers to sync, see `switchboard_collab::Relay`).
pub const RELAY_QUEUE: usize = 4096;

/// Carries document relays over the broker's topics: one bounded queue, drained in order by
/// one task, so each node's messages of a document leave in the order they were made.
pub struct BrokerRelay {
    broker: Arc<dyn switchboard_hub::Broker>,
    tx: tokio::sync::mpsc::Sender<(i64, Bytes)>,
}

impl BrokerRelay {
    pub fn start(node: &Arc<Node>) -> Arc<BrokerRelay> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(i64, Bytes)>(RELAY_QUEUE);
        let broker = node.hub.broker.clone();
        let shutdown = node.shutdown.clone();
        node.tasks.spawn(async move {
            loop {
                let (doc, payload) = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    m = rx.recv() => match m { Some(m) => m, None => break },
                };
                if let Err(e) = broker.publish_message(&doc_topic(doc), payload).await {
                    tracing::warn!(doc, error = %e, "document relay not sent");
                }
            }
        });
        Arc::new(BrokerRelay {
            broker: node.hub.broker.clone(),
            tx,
        })
    }
}

#[async_trait::async_trait]
impl switchboard_collab::Relay for BrokerRelay {
    async fn subscribe(&self, doc_id: i64) -> Result<(), String> {
        self.broker
            .subscribe_topic(&doc_topic(doc_id))
            .await
            .map_err(|e| e.to_string())
    }

    async fn unsubscribe(&self, doc_id: i64) {
        if let Err(e) = self.broker.unsubscribe_topic(&doc_topic(doc_id)).await {
            tracing::warn!(doc = doc_id, error = %e, "document relay unsubscribe failed");
        }
    }

    fn send(&self, doc_id: i64, payload: Bytes) -> bool {
        self.tx.try_send((doc_id, payload)).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_fit_the_ttl() {
        assert_eq!(heartbeat_every(Duration::from_secs(15)), MAX_HEARTBEAT);
        assert_eq!(
            heartbeat_every(Duration::from_secs(3)),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn silent_peers_drop_out() {
        let p = Peers::default();
        p.nodes.insert(
            "a".into(),
            (serde_json::json!({"name": "a"}), Instant::now()),
        );
        p.nodes.insert(
            "b".into(),
            (
                serde_json::json!({"name": "b"}),
                Instant::now() - Duration::from_secs(10),
            ),
        );
        let live = p.live(Duration::from_secs(5));
        assert_eq!(live.len(), 1);
        assert_eq!(live[0]["name"], "a");
    }
}
