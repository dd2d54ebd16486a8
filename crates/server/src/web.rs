//! The browser app (`web/`), built by `build.rs` and embedded in the binary, served at `/`.
//!
//! The files are a static table compiled in with `include_bytes!`: a request path is only
//! ever a key into that table, so nothing is read from the file system at run time and no
//! path (`..`, `%2e%2e`, absolute, encoded slashes) can reach anything else. A path that is
//! not a file gets `index.html`, since the app routes in the browser, unless its last
//! segment has a dot (a missing asset is a 404, never HTML in place of a script), or it is
//! under one of the server's own prefixes ([`RESERVED`]), which keep their plain 404.
//! When the app was not built (no npm, or `SWITCHBOARD_SKIP_WEB=1`), the table holds a
//! placeholder page that says how to build it.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};

mod assets {
    include!(concat!(env!("OUT_DIR"), "/web_assets.rs"));
}

/// Path prefixes the server itself answers: an unknown path under them is a 404, never the
/// app.
pub const RESERVED: &[&str] = &[
    "/api",
    "/v1",
    "/docs",
    "/connection",
    "/metrics",
    "/healthz",
    "/readyz",
];

/// The app's page. `default-src 'self'` keeps scripts, styles and sockets to this origin;
/// CodeMirror injects `<style>` elements, hence `'unsafe-inline'` for styles only.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
                   img-src 'self' data:; connect-src 'self'; object-src 'none'; \
                   base-uri 'none'; frame-ancestors 'none'";

/// Whether the real app is embedded (false: the placeholder page).
pub fn built() -> bool {
    assets::BUILT
}

/// The embedded files, by path relative to the app's root (`index.html`, `assets/...`).
pub fn files() -> impl Iterator<Item = &'static str> {
    assets::FILES.iter().map(|(name, _)| *name)
}

fn file(name: &str) -> Option<&'static [u8]> {
    assets::FILES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, bytes)| *bytes)
}

fn content_type(name: &str) -> &'static str {
    match name.rsplit_once('.').map_or("", |(_, ext)| ext) {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "json" | "map" => "application/json",
        "txt" => "text/plain; charset=utf-8",
        "woff2" => "font/woff2",
        _ => "application/octet-stream",
    }
}

fn reserved(path: &str) -> bool {
    RESERVED.iter().any(|p| {
        path.strip_prefix(p)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    })
}

/// The router's fallback: every path no other route took.
pub async fn serve(req: Request) -> Response {
    let path = req.uri().path();
    if reserved(path) {
        return (StatusCode::NOT_FOUND, "not found").into_response();
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut resp = (StatusCode::METHOD_NOT_ALLOWED, "method not allowed").into_response();
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    let name = path.trim_start_matches('/');
    let (name, bytes) = match file(name) {
        Some(bytes) if !name.is_empty() => (name, bytes),
        _ if name
            .rsplit('/')
            .next()
            .is_some_and(|last| last.contains('.')) =>
        {
            return (StatusCode::NOT_FOUND, "not found").into_response();
        }
        _ => (
            "index.html",
            file("index.html").expect("build.rs embeds index.html"),
        ),
    };
    let mut resp = Response::new(Body::from(bytes));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(name)),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // Bundles have content hashes in their names; everything else must be revalidated so a
    // new binary's index.html is picked up at once.
    let cache = if name.starts_with("assets/") {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    if name == "index.html" {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        );
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types() {
        assert_eq!(content_type("index.html"), "text/html; charset=utf-8");
        assert_eq!(
            content_type("assets/app-X1.js"),
            "text/javascript; charset=utf-8"
        );
        assert_eq!(
            content_type("assets/style-X1.css"),
            "text/css; charset=utf-8"
        );
        assert_eq!(content_type("favicon.svg"), "image/svg+xml");
        assert_eq!(content_type("noext"), "application/octet-stream");
    }

    #[test]
    fn reserved_prefixes() {
        for p in [
            "/api",
            "/api/publish",
            "/v1/x",
            "/docs/1",
            "/connection/websocket",
        ] {
            assert!(reserved(p), "{p}");
        }
        for p in ["/", "/apis", "/v10", "/chat/1", "/documents"] {
            assert!(!reserved(p), "{p}");
        }
    }

    #[test]
    fn index_is_embedded() {
        assert!(file("index.html").is_some());
        assert!(files().any(|f| f == "index.html"));
    }
}
