//! Prometheus metrics of one node, served at `/metrics`.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};
use switchboard_protocol::client::Method;

/// Cheap to clone: every field is a handle to shared atomics.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub connections: IntGauge,
    pub subscriptions: IntGauge,
    /// Tasks the node tracks (connections, HTTP connections, workers), set when `/metrics`
    /// is read: with `connections`, what a leak check compares before and after.
    pub tasks: IntGauge,
    pub commands: IntCounterVec,
    pub command_seconds: HistogramVec,
    pub slow_disconnects: IntCounter,
    pub rate_limited: IntCounter,
    pub disconnects: IntCounterVec,
    /// Chat moderation: commit-to-decision latency by outcome, and checks dropped on a
    /// full queue (handed to the chat service, which records them).
    pub moderation: switchboard_chat::moderation::ModerationMetrics,
    /// Documents: loaded, connections, updates, persistence, compactions, load time.
    pub collab: switchboard_collab::CollabMetrics,
}

impl Metrics {
    pub fn new(hub: &switchboard_hub::HubMetrics) -> Metrics {
        let registry = Registry::new();
        let connections =
            IntGauge::new("switchboard_connections", "Open client connections").unwrap();
        let subscriptions = IntGauge::new(
            "switchboard_subscriptions",
            "Client subscriptions on this node",
        )
        .unwrap();
        let tasks = IntGauge::new(
            "switchboard_tasks",
            "Tasks tracked by the node: connections, HTTP connections and workers",
        )
        .unwrap();
        let commands = IntCounterVec::new(
            Opts::new("switchboard_commands_total", "Client commands by method"),
            &["method"],
        )
        .unwrap();
        let command_seconds = HistogramVec::new(
            HistogramOpts::new(
                "switchboard_command_duration_seconds",
                "Client command latency",
            )
            .buckets(vec![
                0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05,
                0.1, 0.25, 1.0,
            ]),
            &["method"],
        )
        .unwrap();
        let slow_disconnects = IntCounter::new(
            "switchboard_slow_disconnects_total",
            "Connections closed with 3008 because their write queue overflowed",
        )
        .unwrap();
        let rate_limited = IntCounter::new(
            "switchboard_rate_limited_total",
            "Commands refused with error 111 by the per-connection rate limit",
        )
        .unwrap();
        let disconnects = IntCounterVec::new(
            Opts::new(
                "switchboard_disconnects_total",
                "Connections closed, by close code",
            ),
            &["code"],
        )
        .unwrap();
        let moderation = switchboard_chat::moderation::ModerationMetrics {
            seconds: HistogramVec::new(
                HistogramOpts::new(
                    "switchboard_moderation_seconds",
                    "Chat moderation latency from commit to decision (for a removal, to its \
                     broadcast), by outcome: pass, flag, remove",
                )
                .buckets(vec![
                    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ]),
                &["outcome"],
            )
            .unwrap(),
            dropped: IntCounter::new(
                "switchboard_moderation_dropped_total",
                "Chat moderation checks dropped because the moderation queue was full",
            )
            .unwrap(),
        };
        for m in [
            Box::new(connections.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(subscriptions.clone()),
            Box::new(tasks.clone()),
            Box::new(commands.clone()),
            Box::new(command_seconds.clone()),
            Box::new(slow_disconnects.clone()),
            Box::new(rate_limited.clone()),
            Box::new(disconnects.clone()),
            Box::new(moderation.seconds.clone()),
            Box::new(moderation.dropped.clone()),
            Box::new(hub.publications.clone()),
            Box::new(hub.deliveries.clone()),
            Box::new(hub.held.clone()),
            Box::new(hub.gap_fills.clone()),
            Box::new(hub.duplicates.clone()),
            Box::new(hub.resubscribes.clone()),
        ] {
            registry.register(m).expect("metric names are unique");
        }
        let collab = switchboard_collab::CollabMetrics::new(&registry);
        for m in Method::ALL {
            commands.with_label_values(&[m.name()]);
        }
        Metrics {
            registry,
            connections,
            subscriptions,
            tasks,
            commands,
            command_seconds,
            slow_disconnects,
            rate_limited,
            disconnects,
            moderation,
            collab,
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}
