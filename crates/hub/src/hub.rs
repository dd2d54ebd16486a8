//! A node's local channels: who is subscribed here, and fan-out of what the broker delivers.
//!
//! Fan-out encodes each push once ([`Delivery`]) and hands the same bytes to every subscriber's
//! [`Sink`]. The subscriber list of a channel is a copy-on-write `Arc<[Subscriber]>`: a
//! publisher clones the `Arc` under a short lock and iterates without holding it, so
//! subscribing never waits for a fan-out and a fan-out never waits for another.

use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use dashmap::DashMap;
use prometheus::IntCounter;
use switchboard_protocol::client::{self, ClientInfo, JoinLeave, Publication};

use crate::broker::{Broker, BrokerError, BrokerEventHandler, PresenceStore};

/// One push, encoded once and shared by every subscriber it goes to.
pub struct Delivery {
    pub channel: Arc<str>,
    /// The publication's offset; 0 for joins, leaves and channels without history.
    pub offset: u64,
    /// The JSON push.
    pub payload: Bytes,
    framed: OnceLock<Bytes>,
}

impl Delivery {
    pub fn new(channel: Arc<str>, offset: u64, payload: Bytes) -> Self {
        Delivery {
            channel,
            offset,
            payload,
            framed: OnceLock::new(),
        }
    }

    /// The payload framed for a transport. The first caller frames it; the rest share the result.
    pub fn framed(&self, frame: impl FnOnce(&[u8]) -> Bytes) -> &Bytes {
        self.framed.get_or_init(|| frame(&self.payload))
    }
}

/// Where a subscriber's pushes go: a connection's outbound path. `deliver` must not block or
/// await; a sink that cannot keep up applies its own overflow policy (see the server's conn).
pub trait Sink: Send + Sync {
    fn deliver(&self, delivery: &Delivery);
}

#[derive(Clone)]
pub struct Subscriber {
    pub client: Arc<str>,
    pub sink: Arc<dyn Sink>,
    /// Receives join and leave pushes.
    pub join_leave: bool,
}

struct LocalChannel {
    name: Arc<str>,
    subscribers: Mutex<Arc<[Subscriber]>>,
}

/// Counters the server exports.
#[derive(Clone)]
pub struct HubMetrics {
    pub publications: IntCounter,
    pub deliveries: IntCounter,
}

impl Default for HubMetrics {
    fn default() -> Self {
        HubMetrics {
            publications: IntCounter::new(
                "switchboard_publications_total",
                "Publications fanned out on this node",
            )
            .expect("valid metric"),
            deliveries: IntCounter::new(
                "switchboard_deliveries_total",
                "Pushes handed to local subscribers",
            )
            .expect("valid metric"),
        }
    }
}

struct Inner {
    channels: DashMap<Arc<str>, Arc<LocalChannel>>,
    metrics: HubMetrics,
}

/// A node's channel registry, engine handles and fan-out. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
    pub broker: Arc<dyn Broker>,
    pub presence: Arc<dyn PresenceStore>,
}

impl Hub {
    pub fn new(broker: Arc<dyn Broker>, presence: Arc<dyn PresenceStore>) -> Self {
        let inner = Arc::new(Inner {
            channels: DashMap::new(),
            metrics: HubMetrics::default(),
        });
        let weak = Arc::downgrade(&inner);
        let handler: std::sync::Weak<dyn BrokerEventHandler> = weak;
        broker.register(handler);
        Hub {
            inner,
            broker,
            presence,
        }
    }

    pub fn metrics(&self) -> &HubMetrics {
        &self.inner.metrics
    }

    /// Adds a local subscriber. The node subscribes to the channel on the broker when this is
    /// the channel's first local subscriber. Deliveries to `sub` start before this returns.
    pub async fn add_subscriber(&self, channel: &str, sub: Subscriber) -> Result<(), BrokerError> {
        let mut first = false;
        {
            let ch = self
                .inner
                .channels
                .entry(Arc::from(channel))
                .or_insert_with(|| {
                    first = true;
                    Arc::new(LocalChannel {
                        name: Arc::from(channel),
                        subscribers: Mutex::new(Arc::from(Vec::new())),
                    })
                });
            let mut subs = ch.subscribers.lock().expect("subscribers lock poisoned");
            let mut next: Vec<Subscriber> = subs.iter().cloned().collect();
            next.push(sub);
            *subs = next.into();
        }
        if first {
            self.broker.subscribe(channel).await?;
        }
        Ok(())
    }

    /// Removes a local subscriber; unsubscribes the node from the broker when it was the last.
    pub async fn remove_subscriber(&self, channel: &str, client: &str) -> Result<(), BrokerError> {
        let mut now_empty = false;
        if let Some(ch) = self.inner.channels.get(channel) {
            let mut subs = ch.subscribers.lock().expect("subscribers lock poisoned");
            let next: Vec<Subscriber> = subs
                .iter()
                .filter(|s| &*s.client != client)
                .cloned()
                .collect();
            now_empty = next.is_empty();
            *subs = next.into();
        }
        if now_empty {
            let removed = self.inner.channels.remove_if(channel, |_, ch| {
                ch.subscribers
                    .lock()
                    .expect("subscribers lock poisoned")
                    .is_empty()
            });
            if removed.is_some() {
                self.broker.unsubscribe(channel).await?;
            }
        }
        Ok(())
    }

    /// Channels with at least one local subscriber, with their subscriber counts.
    pub fn channels(&self) -> Vec<(String, usize)> {
        self.inner
            .channels
            .iter()
            .map(|e| {
                (
                    e.key().to_string(),
                    e.subscribers
                        .lock()
                        .expect("subscribers lock poisoned")
                        .len(),
                )
            })
            .collect()
    }

    pub fn num_subscribers(&self, channel: &str) -> usize {
        self.inner.channels.get(channel).map_or(0, |c| {
            c.subscribers
                .lock()
                .expect("subscribers lock poisoned")
                .len()
        })
    }
}

impl Inner {
    fn subscribers(&self, channel: &str) -> Option<(Arc<str>, Arc<[Subscriber]>)> {
        let ch = self.channels.get(channel)?;
        let subs = ch
            .subscribers
            .lock()
            .expect("subscribers lock poisoned")
            .clone();
        Some((ch.name.clone(), subs))
    }

    fn fan_out(&self, channel: Arc<str>, offset: u64, payload: Vec<u8>, subs: &[Subscriber]) {
        let delivery = Delivery::new(channel, offset, Bytes::from(payload));
        let mut n = 0;
        for s in subs {
            s.sink.deliver(&delivery);
            n += 1;
        }
        self.metrics.deliveries.inc_by(n);
    }

    fn join_leave(&self, channel: &str, key: &str, info: &ClientInfo) {
        let Some((name, subs)) = self.subscribers(channel) else {
            return;
        };
        let wanted: Vec<Subscriber> = subs.iter().filter(|s| s.join_leave).cloned().collect();
        if wanted.is_empty() {
            return;
        }
        let mut payload = Vec::new();
        client::encode_push(&mut payload, channel, key, &JoinLeave { info });
        self.fan_out(name, 0, payload, &wanted);
    }
}

impl BrokerEventHandler for Inner {
    fn handle_publication(&self, channel: &str, publication: Arc<Publication>, _epoch: &str) {
        self.metrics.publications.inc();
        let Some((name, subs)) = self.subscribers(channel) else {
            return;
        };
        let payload = client::publication_push(channel, &publication);
        self.fan_out(name, publication.offset, payload, &subs);
    }

    fn handle_join(&self, channel: &str, info: &ClientInfo) {
        self.join_leave(channel, "join", info)
    }

    fn handle_leave(&self, channel: &str, info: &ClientInfo) {
        self.join_leave(channel, "leave", info)
    }

    fn handle_message(&self, _topic: &str, _payload: Bytes) {}

    fn handle_reconnect(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::PublishOptions;
    use crate::memory::{MemoryBroker, MemoryPresence};
    use std::time::Duration;
    use switchboard_protocol::RawValue;

    #[derive(Default)]
    struct Collect(Mutex<Vec<(u64, String)>>, std::sync::atomic::AtomicUsize);
    impl Sink for Collect {
        fn deliver(&self, d: &Delivery) {
            // Framing runs once per delivery, whoever asks first.
            d.framed(|p| {
                self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Bytes::copy_from_slice(p)
            });
            self.0
                .lock()
                .unwrap()
                .push((d.offset, String::from_utf8(d.payload.to_vec()).unwrap()));
        }
    }

    fn info(c: &str) -> ClientInfo {
        ClientInfo {
            user: "u".into(),
            client: c.into(),
            conn_info: None,
            chan_info: None,
        }
    }

    #[tokio::test]
    async fn fans_out_once_encoded_in_offset_order() {
        let hub = Hub::new(
            Arc::new(MemoryBroker::default()),
            Arc::new(MemoryPresence::new()),
        );
        let a = Arc::new(Collect::default());
        let b = Arc::new(Collect::default());
        for (id, s, jl) in [("a", &a, true), ("b", &b, false)] {
            let sub = Subscriber {
                client: id.into(),
                sink: s.clone(),
                join_leave: jl,
            };
            hub.add_subscriber("news", sub).await.unwrap();
        }
        let opts = PublishOptions {
            history_size: 10,
            history_ttl: Duration::from_secs(5),
            tags: None,
        };
        for i in 0..3 {
            let data = RawValue::from_string(format!("{{\"n\":{i}}}")).unwrap();
            hub.broker.publish("news", data, None, &opts).await.unwrap();
        }
        hub.broker.publish_join("news", &info("c")).await.unwrap();
        let got_a = a.0.lock().unwrap().clone();
        let got_b = b.0.lock().unwrap().clone();
        assert_eq!(
            got_a.iter().map(|x| x.0).collect::<Vec<_>>(),
            vec![1, 2, 3, 0]
        );
        assert_eq!(got_b.len(), 3, "b did not ask for join/leave");
        assert_eq!(
            got_a[1].1,
            r#"{"push":{"channel":"news","pub":{"offset":2,"data":{"n":1}}}}"#
        );
        assert_eq!(a.1.load(std::sync::atomic::Ordering::SeqCst), 4);
        assert_eq!(
            b.1.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "framed once, by a"
        );
        assert_eq!(hub.metrics().deliveries.get(), 7);

        hub.remove_subscriber("news", "a").await.unwrap();
        hub.remove_subscriber("news", "b").await.unwrap();
        assert!(hub.channels().is_empty());
    }
}
