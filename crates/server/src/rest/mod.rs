//! The `/v1` REST API: accounts, rooms, messages. Every route is listed in `routes()`.
//!
//! Errors are [`error::ApiError`]: 400, 401, 403, 404, 409 (and 429, 503) with a JSON body that
//! says what is wrong. Callers authenticate with [`extract::AuthUser`].

use std::sync::Arc;

use axum::Router;

use crate::node::Node;

pub mod error;
pub mod extract;

/// All `/v1` routes.
pub fn routes() -> Router<Arc<Node>> {
    Router::new()
}
