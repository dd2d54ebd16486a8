//! # Switchboard hub
//!
//! A node's channels and the engines behind them, with no sockets and no HTTP.
//!
//! - [`broker`]: the `Broker` (fan-out between nodes plus history streams) and `PresenceStore`
//!   traits, with the guarantees every engine gives.
//! - [`memory`]: the single-node, in-process engine.
//! - [`hub`]: local subscribers of each channel and the encode-once fan-out to their `Sink`s.

pub mod broker;
pub mod hub;
pub mod memory;

pub use broker::{
    Broker, BrokerError, BrokerEventHandler, HistoryFilter, HistoryPage, PresenceStore,
    PublishOptions,
};
pub use hub::{Delivery, HistorySource, Hub, HubMetrics, MessageHandler, Sink, Subscriber};
pub use memory::{MemoryBroker, MemoryPresence};
