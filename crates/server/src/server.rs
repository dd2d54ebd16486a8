//! The HTTP side: router, accept loop, WebSocket upgrade hand-off, and graceful shutdown.
//!
//! The accept loop serves HTTP/1.1 with hyper directly (not `axum::serve`) so that an upgraded
//! connection hands back the plain `TcpStream`: the fan-out then writes to the socket without
//! a per-connection writer task. It also sets a header read timeout against slowloris.
//!
//! Request bodies are checked before any handler reads them: one with a `Content-Encoding`
//! other than `identity` gets 415 (nothing is ever decompressed, so the body limit is the
//! limit), and one whose `Content-Length` is over `http.max_body_size` gets 413 at once.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};

use crate::config::Config;
use crate::node::{Node, Secrets};
use crate::{api, conn, ws};

pub fn router(node: Arc<Node>) -> Router {
    let body_limit = node.config.http.max_body_size;
    Router::new()
        .route("/connection/websocket", get(websocket))
        .route("/docs/{doc_id}", get(crate::docs::websocket))
        .route("/api/{method}", post(api::handle))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(crate::rest::routes())
        // Last: every path no route above took is the web app's (or a 404 under the
        // server's own prefixes).
        .fallback(crate::web::serve)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn(move |req, next| {
            refuse_bodies(body_limit, req, next)
        }))
        .with_state(node)
}

/// Refuses bodies before any handler reads them: 415 for a body with a content coding (gzip,
/// deflate, br...), since nothing here inflates bodies and reading one as plain would only
/// give a confusing error; 413 for a declared `Content-Length` over the limit, at once,
/// rather than after reading up to the limit (`DefaultBodyLimit` only counts what arrives).
async fn refuse_bodies(limit: usize, req: Request, next: axum::middleware::Next) -> Response {
    let refuse = |status: StatusCode, code: &str, message: &str| {
        let body = serde_json::json!({"error": {"code": code, "message": message}});
        (status, axum::Json(body)).into_response()
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        tracing::debug!(
            path = req.uri().path(),
            "refused: declared body over the limit"
        );
        return refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "request body too large",
        );
    }
    let encoded = req
        .headers()
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .any(|v| {
            v.to_str().map_or(true, |s| {
                s.split(',')
                    .any(|c| !c.trim().is_empty() && !c.trim().eq_ignore_ascii_case("identity"))
            })
        });
    if !encoded {
        return next.run(req).await;
    }
    tracing::debug!(path = req.uri().path(), "refused: compressed request body");
    let mut resp = refuse(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        "compressed request bodies (Content-Encoding) are not accepted",
    );
    // RFC 7694: say which codings are accepted.
    resp.headers_mut().insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    resp
}

/// PostgreSQL: how long a store call waits for a database connection before it fails with
/// "unavailable" (clients: the temporary error 100; REST: 503). When the database is down,
/// sqlx keeps retrying a refused connection until this runs out, and the chat writer, which
/// commits every send, waits with it: short enough that a send is answered well before an
/// SDK's 5 s command timeout, long enough for a busy pool. SQLite keeps the store's default
/// (5 s): its one writer connection is shared by every write, so waiting for it is queueing,
/// not an outage, and a slow disk can hold it for more than a second (seen in the soak).
const PG_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long `/readyz` waits for the database's answer before it reports it unavailable.
const READY_PING_TIMEOUT: Duration = Duration::from_secs(1);

/// 503 while shutting down or while the database does not answer (sends would fail with the
/// temporary error 100 then); `/healthz` stays 200, because a restart would not help.
async fn readyz(State(node): State<Arc<Node>>) -> Response {
    if node.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    match tokio::time::timeout(READY_PING_TIMEOUT, node.store.ping()).await {
        Ok(Ok(())) => "ready".into_response(),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "readyz: database unavailable");
            (StatusCode::SERVICE_UNAVAILABLE, "database unavailable").into_response()
        }
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "database unavailable").into_response(),
    }
}

async fn metrics(State(node): State<Arc<Node>>) -> Response {
    node.metrics.tasks.set(node.tasks.len() as i64);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        node.metrics.render(),
    )
        .into_response()
}

async fn websocket(State(node): State<Arc<Node>>, req: Request) -> Response {
    upgrade(node, req, ws::CENTRIFUGE_PROTOCOLS, conn::run)
}

/// The WebSocket upgrade both endpoints share: origin check, handshake checks, the node's
/// connection limit; then `run` gets the plain socket (and the bytes read past the request)
/// on a tracked task.
pub(crate) fn upgrade<F, Fut>(
    node: Arc<Node>,
    mut req: Request,
    protocols: &[&'static str],
    run: F,
) -> Response
where
    F: FnOnce(Arc<Node>, TcpStream, Vec<u8>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let headers = req.headers();
    if !ws::origin_allowed(
        &node.config.allowed_origins,
        &node.site_origins.get(),
        headers,
    ) {
        tracing::info!(origin = ?headers.get(header::ORIGIN), "refused: origin not allowed");
        return (StatusCode::FORBIDDEN, "origin not allowed").into_response();
    }
    let (accept, protocol) = match ws::check_upgrade(headers, protocols) {
        Ok(v) => v,
        Err((status, msg)) => {
            tracing::debug!(msg, "refused upgrade");
            return (status, msg).into_response();
        }
    };
    if node.connections.load(Ordering::Relaxed) >= node.config.client.max_connections {
        tracing::warn!("refused: connection limit reached");
        return (StatusCode::SERVICE_UNAVAILABLE, "connection limit reached").into_response();
    }
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    if let Some(ip) = peer {
        if let Err(retry) = node.connection_rate.admit(ip, std::time::Instant::now()) {
            // Debug, not info: a flood would otherwise flood the log too.
            tracing::debug!(%ip, "refused: connection rate per address");
            let secs = (retry.as_millis() as u64).div_ceil(1000).max(1);
            let mut resp = (
                StatusCode::TOO_MANY_REQUESTS,
                "too many new connections from this address",
            )
                .into_response();
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            return resp;
        }
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    let task_node = node.clone();
    node.tasks.spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
        };
        match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => {
                // Copy the few bytes read past the request and drop `read_buf` now: it is a
                // slice of hyper's 8 KiB read buffer, which would otherwise live as long as the
                // connection.
                let prefix = parts.read_buf.to_vec();
                drop(parts.read_buf);
                run(task_node, parts.io.into_inner(), prefix).await;
            }
            Err(_) => tracing::error!("upgraded connection is not a TCP stream"),
        }
    });
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("base64"),
    );
    if let Some(p) = protocol {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(p));
    }
    resp
}

/// Accepts connections until the node's shutdown token fires.
pub async fn serve(listener: TcpListener, node: Arc<Node>) {
    let app = router(node.clone());
    let header_timeout = node.config.http.header_read_timeout;
    loop {
        let (stream, peer) = tokio::select! {
            _ = node.shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        // Each request carries the TCP peer, for `ConnectInfo<SocketAddr>` (login rate limits).
        let service = TowerToHyperService::new(tower::ServiceExt::map_request(
            app.clone(),
            move |mut req: Request<hyper::body::Incoming>| {
                req.extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                req
            },
        ));
        let shutdown = node.shutdown.clone();
        node.tasks.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            let conn = builder
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "http connection ended with an error");
                    }
                }
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}

/// A running node.
pub struct Server {
    pub addr: SocketAddr,
    pub node: Arc<Node>,
}

/// A URL without its password, for messages.
fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, host)) => format!("{scheme}://***@{host}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

impl Server {
    /// Resolves secrets, binds, logs what matters about the configuration, and starts serving.
    pub async fn start(config: Config) -> anyhow::Result<Server> {
        let secrets = Secrets::resolve(&config).map_err(|e| {
            anyhow::anyhow!(
                "cannot use data directory {}: {e}",
                config.data_dir.display()
            )
        })?;
        let listener = TcpListener::bind(&config.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
        let addr = listener.local_addr()?;
        warn_insecure(&config, &secrets);
        prepare_data_dir(&config)?;
        let url = config.database_url();
        let mut options = switchboard_store::StoreOptions::default();
        if url.starts_with("postgres") {
            options.acquire_timeout = PG_ACQUIRE_TIMEOUT;
        }
        let store = switchboard_store::open_with(&url, &options)
            .await
            .map_err(|e| anyhow::anyhow!("cannot open the database: {e}"))?;
        let shutdown = tokio_util::sync::CancellationToken::new();
        let engine = if config.broker.url.is_empty() {
            None
        } else {
            let opts = switchboard_engines::EngineOptions {
                prefix: config.broker.prefix.clone(),
                presence_ttl: config.broker.presence_ttl,
                history_max_size: std::iter::once(&config.channel)
                    .chain(config.namespaces.values())
                    .map(|ns| ns.history_size)
                    .max()
                    .unwrap_or_default()
                    .max(1),
                history_max_ttl: std::iter::once(&config.channel)
                    .chain(config.namespaces.values())
                    .map(|ns| ns.history_ttl)
                    .max()
                    .unwrap_or_default()
                    .max(Duration::from_secs(1)),
                shutdown: shutdown.clone(),
            };
            let engine = switchboard_engines::connect(&config.broker.url, opts)
                .await
                .map_err(|e| {
                    anyhow::anyhow!("cannot use the broker {}: {e}", redact(&config.broker.url))
                })?;
            Some(engine)
        };
        let node = Node::new(config, &secrets, store, engine, shutdown)?;
        crate::cluster::start(&node).await?;
        if node.hub.broker.name() != "memory" {
            // Documents loaded on several nodes keep each other up to date.
            node.collab
                .set_relay(crate::cluster::BrokerRelay::start(&node));
        }
        node.site_origins
            .reload(&*node.store)
            .await
            .map_err(|e| anyhow::anyhow!("cannot read sites: {e}"))?;
        crate::chat::install(&node);
        crate::dashboard::start(&node);
        let sweeper = node.clone();
        node.tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = sweeper.shutdown.cancelled() => break,
                    _ = tick.tick() => sweeper.hub.broker.sweep(),
                }
            }
        });
        node.tasks.spawn(serve(listener, node.clone()));
        tracing::info!(%addr, engine = node.hub.broker.name(), store = %node.store.backend(), "switchboard listening");
        if !crate::web::built() {
            tracing::warn!("this binary was built without the web app (npm missing or SWITCHBOARD_SKIP_WEB set): / serves a placeholder page");
        }
        Ok(Server { addr, node })
    }

    /// Stops accepting, closes clients with 3001 and waits for every task, up to the configured
    /// shutdown timeout.
    pub async fn shutdown(self) {
        self.node.shutdown.cancel();
        self.node.tasks.close();
        let timeout = self.node.config.shutdown_timeout;
        if tokio::time::timeout(timeout, self.node.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                ?timeout,
                "shutdown timed out; dropping remaining connections"
            );
        }
        // Connections are closed and the persistence worker has written what it had; anything
        // applied while it finished is written now.
        if !self.node.collab.flush().await {
            tracing::error!("could not write the last document updates before shutdown");
        }
        self.node.store.close().await;
    }
}

/// With the default database (SQLite in the data directory): creates the directory and checks
/// that it is writable, so a read-only or unusable directory stops start-up with a message
/// naming it instead of a database error later. Used by `serve`, `migrate` and `admin`.
pub fn prepare_data_dir(config: &Config) -> anyhow::Result<()> {
    if !config.database.is_empty() {
        return Ok(());
    }
    let dir = &config.data_dir;
    std::fs::create_dir_all(dir)
        .map_err(|e| anyhow::anyhow!("cannot create data directory {}: {e}", dir.display()))?;
    let probe = dir.join(".switchboard-write-check");
    std::fs::write(&probe, b"")
        .and_then(|()| std::fs::remove_file(&probe))
        .map_err(|e| anyhow::anyhow!("data directory {} is not writable: {e}", dir.display()))
}

fn warn_insecure(config: &Config, secrets: &Secrets) {
    let dir = config.data_dir.display();
    if secrets.hmac_generated {
        tracing::warn!("NO TOKEN SECRET CONFIGURED: generated one and stored it in {dir}/token_hmac_secret. Set SWITCHBOARD_TOKEN_HMAC_SECRET for production.");
    }
    if secrets.api_key_generated {
        tracing::warn!("NO API KEY CONFIGURED: generated one and stored it in {dir}/api_key. Set SWITCHBOARD_API_KEY for production.");
    }
    if config.allowed_origins.is_empty() {
        tracing::warn!("allowed_origins is empty: browsers from ANY origin may connect (until a site lists origins)");
    }
    let ns = &config.channel;
    if ns.allow_subscribe_for_client && ns.allow_publish_for_client && !ns.protected {
        tracing::warn!("default namespace is OPEN: any authenticated user may subscribe, publish and read presence and history; restrict it in [channel] for production");
    }
}
