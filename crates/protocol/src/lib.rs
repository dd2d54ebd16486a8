//! # Switchboard wire formats
//!
//! The only crate that defines what goes on the wire. No tokio, no I/O.
//!
//! - [`codes`]: error and disconnect codes of the Centrifugo client protocol.
//! - [`client`]: the JSON client protocol v2 (commands, replies, pushes).

pub mod client;
pub mod codes;

pub use serde_json::value::RawValue;
