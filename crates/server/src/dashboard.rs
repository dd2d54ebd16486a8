//! The live dashboard's feed: once a second every node publishes its own figures to
//! [`CHANNEL`] (`system:dashboard`), which the web app plots.
//!
//! A sample is read from the node's Prometheus metrics, so the dashboard and `/metrics`
//! never disagree: rates are counter deltas over the last interval, and the command latency
//! percentiles come from the deltas of the `switchboard_command_duration_seconds` buckets
//! (interpolated inside a bucket, as Prometheus' `histogram_quantile` does). The feed's own
//! publication and its deliveries to this node's viewers are left out of the rates, so a
//! quiet node shows zero. The `system` namespace is configured in `Config::load`: clients
//! may subscribe and read its short history (the last minute), nobody may publish there,
//! and it has no presence.
//!
//! The sample, as JSON:
//! `{type: "sample", node: {uid, name}, at (ms), interval_ms, uptime_s, connections,
//! doc_connections, users, subscriptions, docs_loaded, messages_in, messages_out,
//! rates: {commands, publications, deliveries, doc_updates}, latency_ms: {p50, p99, count}}`
//! with rates per second; `messages_in` is client commands plus document updates,
//! `messages_out` is deliveries to subscribers; `p50`/`p99` are `null` in a second without
//! commands.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::core::Collector;
use serde_json::{json, Value};
use switchboard_protocol::client::Method;

use crate::conn::publish_options;
use crate::node::Node;

/// The namespace of server-published system channels.
pub const NAMESPACE: &str = "system";
/// Where every node publishes its samples.
pub const CHANNEL: &str = "system:dashboard";
/// How often a node publishes a sample.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// Counter totals at one instant.
#[derive(Debug, Clone, Default, PartialEq)]
struct Totals {
    commands: u64,
    publications: u64,
    deliveries: u64,
    doc_updates: u64,
    /// Command latency: (upper bound in seconds, cumulative count), summed over methods.
    latency: Vec<(f64, u64)>,
    latency_count: u64,
}

impl Totals {
    fn read(node: &Node) -> Totals {
        let m = &node.metrics;
        let hub = node.hub.metrics();
        let commands = Method::ALL
            .iter()
            .map(|method| m.commands.with_label_values(&[method.name()]).get())
            .sum();
        let mut latency: Vec<(f64, u64)> = Vec::new();
        let mut latency_count = 0;
        for family in m.command_seconds.collect() {
            for metric in family.get_metric() {
                let h = metric.get_histogram();
                latency_count += h.sample_count();
                for (i, b) in h.get_bucket().iter().enumerate() {
                    match latency.get_mut(i) {
                        Some(slot) => slot.1 += b.cumulative_count(),
                        None => latency.push((b.upper_bound(), b.cumulative_count())),
                    }
                }
            }
        }
        Totals {
            commands,
            publications: hub.publications.get(),
            deliveries: hub.deliveries.get(),
            doc_updates: m.collab.updates.get(),
            latency,
            latency_count,
        }
    }
}

/// The `q` quantile (0..1) of a cumulative histogram with `total` observations, in the unit
/// of its bounds; `None` without observations. Past the last bound, the last bound.
fn quantile(q: f64, buckets: &[(f64, u64)], total: u64) -> Option<f64> {
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let (mut lower, mut below) = (0.0, 0u64);
    for &(upper, count) in buckets {
        if count as f64 >= rank && count > below {
            let within = (rank - below as f64) / (count - below) as f64;
            return Some(lower + (upper - lower) * within.clamp(0.0, 1.0));
        }
        (lower, below) = (upper, count);
    }
    Some(lower)
}

/// Turns successive [`Totals`] into samples.
struct Sampler {
    prev: Totals,
    at: Instant,
    /// Deliveries of our own last sample, left out of the next one's rates.
    own_deliveries: u64,
    own_publications: u64,
}

impl Sampler {
    fn new(node: &Node) -> Sampler {
        Sampler {
            prev: Totals::read(node),
            at: Instant::now(),
            own_deliveries: 0,
            own_publications: 0,
        }
    }

    fn sample(&mut self, node: &Node) -> Value {
        let now = Instant::now();
        let totals = Totals::read(node);
        let secs = now.duration_since(self.at).as_secs_f64().max(0.001);
        let rate = |cur: u64, prev: u64, own: u64| {
            let n = cur.saturating_sub(prev).saturating_sub(own);
            (n as f64 / secs * 10.0).round() / 10.0
        };
        let prev = &self.prev;
        let commands = rate(totals.commands, prev.commands, 0);
        let publications = rate(
            totals.publications,
            prev.publications,
            self.own_publications,
        );
        let deliveries = rate(totals.deliveries, prev.deliveries, self.own_deliveries);
        let doc_updates = rate(totals.doc_updates, prev.doc_updates, 0);
        // Bucket deltas; a histogram that grew a bucket since (it cannot) would be skipped.
        let delta: Vec<(f64, u64)> = totals
            .latency
            .iter()
            .enumerate()
            .map(|(i, &(b, c))| (b, c.saturating_sub(prev.latency.get(i).map_or(0, |p| p.1))))
            .collect();
        let count = totals.latency_count.saturating_sub(prev.latency_count);
        let ms = |q| quantile(q, &delta, count).map(|s| (s * 1e6).round() / 1e3);
        let m = &node.metrics;
        let sample = json!({
            "type": "sample",
            "node": {"uid": node.uid, "name": node.config.name},
            "at": switchboard_store::now_ms(),
            "interval_ms": (secs * 1000.0).round() as u64,
            "uptime_s": node.started.elapsed().as_secs(),
            "connections": node.connections.load(Ordering::Relaxed),
            "doc_connections": m.collab.connections.get(),
            "users": node.users.len(),
            "subscriptions": m.subscriptions.get(),
            "docs_loaded": node.collab.loaded(),
            "messages_in": ((commands + doc_updates) * 10.0).round() / 10.0,
            "messages_out": deliveries,
            "rates": {
                "commands": commands,
                "publications": publications,
                "deliveries": deliveries,
                "doc_updates": doc_updates,
            },
            "latency_ms": {"p50": ms(0.5), "p99": ms(0.99), "count": count},
        });
        self.prev = totals;
        self.at = now;
        sample
    }
}

/// Starts the node's publishing task (tracked, stops on shutdown).
pub fn start(node: &Arc<Node>) {
    let node = node.clone();
    let tasks = node.tasks.clone();
    tasks.spawn(async move {
        let Some(ns) = node.config.namespace(CHANNEL) else {
            tracing::error!("the {NAMESPACE} namespace is not configured; no dashboard feed");
            return;
        };
        let opts = publish_options(ns);
        let mut sampler = Sampler::new(&node);
        let mut tick = tokio::time::interval(INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = node.shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let data = sampler.sample(&node);
            let raw = serde_json::value::to_raw_value(&data).expect("JSON values serialize");
            // The memory engine delivers to local subscribers within `publish`.
            let viewers = node.hub.num_subscribers(CHANNEL) as u64;
            match node.hub.broker.publish(CHANNEL, raw, None, &opts).await {
                Ok(_) => {
                    sampler.own_publications = 1;
                    sampler.own_deliveries = viewers;
                }
                Err(e) => {
                    sampler.own_publications = 0;
                    sampler.own_deliveries = 0;
                    tracing::debug!(error = %e, "dashboard sample not published");
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::quantile;

    #[test]
    fn quantiles_interpolate_within_buckets() {
        // 10 observations: 4 in (0, 1], 4 in (1, 2], 2 in (2, 4].
        let b = [(1.0, 4), (2.0, 8), (4.0, 10)];
        assert_eq!(quantile(0.5, &b, 10), Some(1.25));
        assert_eq!(quantile(0.2, &b, 10), Some(0.5));
        assert_eq!(quantile(1.0, &b, 10), Some(4.0));
        assert_eq!(quantile(0.5, &b, 0), None);
        // All past the last bound (the +Inf bucket): the last bound.
        assert_eq!(quantile(0.99, &[(1.0, 0), (2.0, 0)], 3), Some(2.0));
        // Empty leading buckets are skipped.
        assert_eq!(quantile(0.5, &[(1.0, 0), (2.0, 2)], 2), Some(1.5));
    }
}
