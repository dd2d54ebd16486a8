//! The `/v1` REST API: accounts, rooms, messages, moderation, notifications, presence, sites
//! and documents. Every route is listed in `routes()`.
//!
//! Errors are [`error::ApiError`]: 400, 401, 403, 404, 409 (and 429, 503) with a JSON body that
//! says what is wrong. Callers authenticate with [`extract::AuthUser`]. Every route is
//! documented in [`openapi::OPS`] (a test checks this).

use std::sync::Arc;

use axum::Router;

use crate::node::Node;

pub mod admin;
pub mod auth;
pub mod documents;
pub mod error;
pub mod extract;
pub mod moderation;
pub mod notifications;
pub mod openapi;
pub mod rooms;
pub mod sites;
pub mod users;

/// All `/v1` routes.
pub fn routes() -> Router<Arc<Node>> {
    Router::new()
        .merge(auth::routes())
        .merge(users::routes())
        .merge(admin::routes())
        .merge(openapi::routes())
        .merge(rooms::routes())
        .merge(moderation::routes())
        .merge(notifications::routes())
        .merge(sites::routes())
        .merge(documents::routes())
}
