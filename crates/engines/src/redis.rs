//! The Redis engine (to be written).
use crate::{Engine, EngineOptions};
use switchboard_hub::BrokerError;

pub async fn connect(_url: &str, _opts: EngineOptions) -> Result<Engine, BrokerError> {
    Err(BrokerError::Unavailable(
        "redis engine not built yet".into(),
    ))
}
