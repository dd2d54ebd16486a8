//! Security: what an attacker can send, and what the server does with it. One test per
//! acceptance point of issue 7 (security part):
//!
//! 1. Tokens: the algorithm is pinned (`none`, HS/RS confusion, other algorithms), `aud`/`iss`
//!    are checked when configured, expired tokens are refused everywhere, refresh tokens are
//!    single use, and no kind of token passes for another.
//! 2. Access: table-driven matrices of channel permissions and document permissions, every
//!    cell asserted.
//! 3. Origins on WebSocket upgrades.
//! 4. Rate limits: new WebSocket connections per address, login lockouts per account and per
//!    address (several loopback source addresses show that limits are per address).
//! 5. Hostile input: SQL injection strings everywhere a user can put text, path traversal on
//!    the web app, oversized bodies and frames on every entry point, compression, slowloris,
//!    sockets that never authenticate.
//! 6. Error responses never leak SQL, paths, Rust types, stack traces or serde/sqlx text.
//!
//! Everything talks to 127.0.0.0/8 only. Timers are configured short so the whole file runs in
//! well under 90 s.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use base64::Engine;
use common::{unique, Event, RawClient};
use futures_util::future::join_all;
use serde_json::{json, Value};
use switchboard::auth::now_secs;
use switchboard::testing::TestServer;
use switchboard_store::{NewUser, UserRole};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Cheap password hashing: these tests log in a lot.
const FAST_HASH: &str = "[accounts]\npassword_hash_cost = \"test\"\n";

/// How long one request or read may take before the test fails. Longer than `common::STEP`:
/// every write here is a SQLite commit with an fsync, and on a machine whose disk is busy
/// with other work one fsync can take seconds. Timing assertions use their own bounds.
const WAIT: Duration = Duration::from_secs(30);

/// An HTTP client that never uses a proxy, with [`WAIT`] as its timeout.
fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(WAIT)
        .build()
        .expect("http client")
}

// ----- HTTP helpers -----

struct Resp {
    status: u16,
    json: Value,
    text: String,
    headers: reqwest::header::HeaderMap,
}

/// A request from the default source address.
async fn call(
    server: &TestServer,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<Value>,
) -> Resp {
    call_from(&http(), server, method, path, bearer, body).await
}

/// A request through `client` (which may be bound to another loopback source address).
async fn call_from(
    client: &reqwest::Client,
    server: &TestServer,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<Value>,
) -> Resp {
    let url = format!("{}{path}", server.http_url());
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let mut req = client.request(method, url);
    if let Some(t) = bearer {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap_or_else(|e| panic!("{path}: {e}"));
    into_resp(resp).await
}

async fn into_resp(resp: reqwest::Response) -> Resp {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.expect("body");
    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
    Resp {
        status,
        json,
        text,
        headers,
    }
}

/// An HTTP client whose connections come from `source` (127.0.0.x).
fn http_from(source: Ipv4Addr) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(WAIT)
        .local_address(IpAddr::V4(source))
        .build()
        .expect("http client")
}

/// Sends `request` as is over a new TCP connection and returns what came back until the
/// server closed the connection.
async fn raw_http(server: &TestServer, request: &[u8]) -> (u16, String) {
    let mut tcp = TcpStream::connect(server.addr).await.expect("connect");
    // The server may answer (and close) before reading everything: that is its right.
    let _ = tcp.write_all(request).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, tcp.read_to_end(&mut buf))
        .await
        .expect("response in time");
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// A user made directly in the store (no password), with a connection/access token.
struct Who {
    id: i64,
    token: String,
}

async fn store_user(server: &TestServer, name: &str, role: UserRole) -> Who {
    let u = server
        .node()
        .store
        .create_user(NewUser {
            username: format!("{name}{}", unique("_")),
            password_hash: String::new(),
            display_name: name.into(),
            role,
        })
        .await
        .expect("create user");
    Who {
        id: u.id,
        token: server.token(&u.id.to_string(), Some(3600)),
    }
}

/// A registered account, logged in: (user id, access token, refresh token).
async fn account(server: &TestServer, username: &str, password: &str) -> (i64, String, String) {
    let r = call(
        server,
        "POST",
        "/v1/auth/register",
        None,
        Some(json!({"username": username, "password": password, "display_name": username})),
    )
    .await;
    assert_eq!(r.status, 201, "register {username}: {}", r.text);
    let (access, refresh) = login(server, username, password).await;
    (r.json["id"].as_i64().expect("id"), access, refresh)
}

async fn login(server: &TestServer, username: &str, password: &str) -> (String, String) {
    let r = call(
        server,
        "POST",
        "/v1/auth/login",
        None,
        Some(json!({"username": username, "password": password})),
    )
    .await;
    assert_eq!(r.status, 200, "login {username}: {}", r.text);
    (
        r.json["access_token"].as_str().expect("access").to_string(),
        r.json["refresh_token"]
            .as_str()
            .expect("refresh")
            .to_string(),
    )
}

// ----- raw WebSocket helpers -----

/// A WebSocket client over a plain TCP stream that writes frames byte for byte as a test
/// wants them (reserved bits, fragments, lying lengths) and reads the server's frames raw.
struct RawWs {
    tcp: TcpStream,
    buf: Vec<u8>,
}

/// An upgrade refused with this status; `head` is the response head.
#[derive(Debug)]
struct Refused {
    status: u16,
    head: String,
}

impl RawWs {
    async fn open(
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
        source: Option<Ipv4Addr>,
    ) -> Result<(RawWs, String), Refused> {
        let tcp = match source {
            None => TcpStream::connect(addr).await.expect("connect"),
            Some(ip) => {
                let sock = TcpSocket::new_v4().expect("socket");
                sock.bind(SocketAddr::new(IpAddr::V4(ip), 0))
                    .expect("bind source address");
                sock.connect(addr).await.expect("connect")
            }
        };
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        let mut ws = RawWs {
            tcp,
            buf: Vec::new(),
        };
        ws.tcp.write_all(req.as_bytes()).await.expect("write");
        let end = loop {
            if let Some(i) = ws.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(WAIT, ws.tcp.read(&mut chunk))
                .await
                .expect("upgrade response in time")
                .expect("read");
            assert!(n > 0, "connection closed before the upgrade response");
            ws.buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&ws.buf[..end]).to_string();
        ws.buf.drain(..end);
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status line");
        if status == 101 {
            Ok((ws, head))
        } else {
            Err(Refused { status, head })
        }
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        // The server may already have closed: a failed write is the test's next read's news.
        let _ = self.tcp.write_all(bytes).await;
    }

    /// A masked client frame.
    async fn send_frame(&mut self, fin: bool, rsv1: bool, opcode: u8, payload: &[u8]) {
        self.send_raw(&client_frame(fin, rsv1, opcode, payload))
            .await;
    }

    async fn fill(&mut self, want: usize) -> bool {
        while self.buf.len() < want {
            let mut chunk = [0u8; 8192];
            match tokio::time::timeout(WAIT, self.tcp.read(&mut chunk)).await {
                Err(_) => panic!("nothing from the server within {WAIT:?}"),
                Ok(Ok(0)) | Ok(Err(_)) => return false,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
        true
    }

    /// The next frame (opcode, payload), or `None` when the stream ended.
    async fn next_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        if !self.fill(2).await {
            return None;
        }
        let opcode = self.buf[0] & 0x0f;
        let (len, header) = match self.buf[1] & 0x7f {
            126 => {
                if !self.fill(4).await {
                    return None;
                }
                (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
            }
            127 => {
                if !self.fill(10).await {
                    return None;
                }
                let b: [u8; 8] = self.buf[2..10].try_into().unwrap();
                (u64::from_be_bytes(b) as usize, 10)
            }
            n => (n as usize, 2),
        };
        if !self.fill(header + len).await {
            return None;
        }
        let payload = self.buf[header..header + len].to_vec();
        self.buf.drain(..header + len);
        Some((opcode, payload))
    }

    /// Reads until a Close frame (its code) or the end of the stream (`None`).
    async fn close_code(&mut self) -> Option<u16> {
        loop {
            match self.next_frame().await {
                None => return None,
                Some((8, p)) if p.len() >= 2 => return Some(u16::from_be_bytes([p[0], p[1]])),
                Some((8, _)) => return Some(1005),
                Some(_) => continue,
            }
        }
    }

    /// Reads binary frames until one starts with `prefix`; `Err(close code)` if the server
    /// closes first.
    async fn until_binary(&mut self, prefix: &[u8]) -> Result<Vec<u8>, Option<u16>> {
        loop {
            match self.next_frame().await {
                None => return Err(None),
                Some((8, p)) => return Err(p.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]))),
                Some((2, p)) if p.starts_with(prefix) => return Ok(p),
                Some(_) => continue,
            }
        }
    }
}

fn client_frame(fin: bool, rsv1: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![(u8::from(fin) << 7) | (u8::from(rsv1) << 6) | opcode];
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= 0xffff {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// What a connect with `token` on `/connection/websocket` got: `Ok(reply)` for a reply
/// (success or error), `Err(close code)` when the server closed instead.
async fn connect_outcome(server: &TestServer, token: &str) -> Result<Value, Option<u16>> {
    let mut c = RawClient::open(server).await;
    c.send(json!({"connect": {"token": token}})).await;
    match c.next_event().await {
        Event::Msg(m) => Ok(m),
        Event::Close(code, _) => Err(code),
        Event::Ended(e) => panic!("connection ended without a Close frame: {e}"),
    }
}

fn assert_connect_refused(outcome: Result<Value, Option<u16>>, code: u16, what: &str) {
    assert_eq!(outcome, Err(Some(code)), "{what}");
}

/// The close code of `/docs/{doc}?token=...` (after any messages).
async fn docs_close_code(server: &TestServer, doc: &str, token: &str) -> Option<u16> {
    let path = format!("/docs/{doc}?token={token}");
    let (mut ws, _) = RawWs::open(server.addr, &path, &[], None)
        .await
        .expect("docs upgrade");
    ws.close_code().await
}

// ----- tokens -----

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A JWT with this header and claims and a given signature (possibly empty).
fn jwt_with_signature(header: &Value, claims: &Value, signature: &str) -> String {
    format!(
        "{}.{}.{signature}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    )
}

fn sign(alg: jsonwebtoken::Algorithm, key: &jsonwebtoken::EncodingKey, claims: &Value) -> String {
    jsonwebtoken::encode(&jsonwebtoken::Header::new(alg), claims, key).expect("sign")
}

/// A 2048-bit RSA key pair: (private PEM, public PEM, public DER).
fn rsa_keys() -> (String, String, Vec<u8>) {
    use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
    let private = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("rsa key");
    let public = private.to_public_key();
    (
        private.to_pkcs8_pem(LineEnding::LF).unwrap().to_string(),
        public.to_public_key_pem(LineEnding::LF).unwrap(),
        public.to_public_key_der().unwrap().as_bytes().to_vec(),
    )
}

/// `alg: none` in its spellings, with an empty signature and with a real one copied over.
fn none_tokens(claims: &Value, real: &str) -> Vec<(String, String)> {
    let stolen_sig = real.rsplit('.').next().unwrap();
    let mut out = Vec::new();
    for alg in ["none", "None", "NONE", "nOnE"] {
        let header = json!({"alg": alg, "typ": "JWT"});
        out.push((
            format!("alg {alg}, no signature"),
            jwt_with_signature(&header, claims, ""),
        ));
        out.push((
            format!("alg {alg}, a copied signature"),
            jwt_with_signature(&header, claims, stolen_sig),
        ));
    }
    out.push((
        "no alg at all".into(),
        jwt_with_signature(&json!({"typ": "JWT"}), claims, stolen_sig),
    ));
    // A valid token's header and signature around other claims.
    let parts: Vec<&str> = real.split('.').collect();
    let other = json!({"sub": "admin", "exp": now_secs() + 3600});
    out.push((
        "claims swapped under a valid signature".into(),
        format!(
            "{}.{}.{}",
            parts[0],
            b64(other.to_string().as_bytes()),
            parts[2]
        ),
    ));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_algorithm_is_pinned_none_and_confusion_are_refused() {
    let (private_pem, public_pem, public_der) = rsa_keys();
    let rsa_key = jsonwebtoken::EncodingKey::from_rsa_pem(private_pem.as_bytes()).unwrap();
    let claims = json!({"sub": "42", "exp": now_secs() + 3600});

    // An HS256 server.
    let hs = TestServer::start().await;
    let secret = jsonwebtoken::EncodingKey::from_secret(hs.secret.as_bytes());
    let good = sign(jsonwebtoken::Algorithm::HS256, &secret, &claims);
    assert!(connect_outcome(&hs, &good).await.unwrap()["connect"].is_object());
    let mut bad: Vec<(String, String)> = none_tokens(&claims, &good);
    for alg in [
        jsonwebtoken::Algorithm::HS384,
        jsonwebtoken::Algorithm::HS512,
    ] {
        // The right secret, another algorithm: pinned to HS256.
        bad.push((
            format!("{alg:?} with the secret"),
            sign(alg, &secret, &claims),
        ));
    }
    bad.push((
        "RS256 from some private key".into(),
        sign(jsonwebtoken::Algorithm::RS256, &rsa_key, &claims),
    ));
    let mut attacker_header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    attacker_header.kid = Some("../../../../dev/null".into());
    attacker_header.jku = Some("https://attacker.example/jwks.json".into());
    bad.push((
        "kid/jku pointing elsewhere, signed with the attacker's key".into(),
        jsonwebtoken::encode(
            &attacker_header,
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(b"attacker"),
        )
        .unwrap(),
    ));
    for (what, token) in &bad {
        assert_connect_refused(connect_outcome(&hs, token).await, 3500, what);
        let r = call(&hs, "GET", "/v1/users/me", Some(token), None).await;
        assert_eq!(r.status, 401, "REST with {what}: {}", r.text);
    }
    // The documents endpoint refuses them too, before looking at the document.
    for (what, token) in bad.iter().take(3) {
        assert_eq!(docs_close_code(&hs, "1", token).await, Some(4401), "{what}");
    }
    hs.shutdown().await;

    // An RS256 server.
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("pub.pem");
    std::fs::write(&key_path, &public_pem).unwrap();
    let rs = TestServer::start_with(&format!("[token]\nrsa_public_key = {key_path:?}\n")).await;
    let good = sign(jsonwebtoken::Algorithm::RS256, &rsa_key, &claims);
    assert!(connect_outcome(&rs, &good).await.unwrap()["connect"].is_object());
    let hmac = |key: &[u8]| {
        sign(
            jsonwebtoken::Algorithm::HS256,
            &jsonwebtoken::EncodingKey::from_secret(key),
            &claims,
        )
    };
    let mut bad = none_tokens(&claims, &good);
    bad.extend([
        // The classic confusion: the public key (which anyone may have) as an HMAC secret.
        (
            "HS256 keyed with the public key PEM".to_string(),
            hmac(public_pem.as_bytes()),
        ),
        (
            "HS256 keyed with the PEM without its newline".into(),
            hmac(public_pem.trim_end().as_bytes()),
        ),
        (
            "HS256 keyed with the public key DER".into(),
            hmac(&public_der),
        ),
        (
            "HS256 keyed with the configured HMAC secret".into(),
            rs.token("42", Some(3600)),
        ),
        (
            "RS512 with the right private key".into(),
            sign(jsonwebtoken::Algorithm::RS512, &rsa_key, &claims),
        ),
        (
            "PS256 with the right private key".into(),
            sign(jsonwebtoken::Algorithm::PS256, &rsa_key, &claims),
        ),
    ]);
    let (other_private, _, _) = rsa_keys();
    let other = jsonwebtoken::EncodingKey::from_rsa_pem(other_private.as_bytes()).unwrap();
    bad.push((
        "RS256 from another private key".into(),
        sign(jsonwebtoken::Algorithm::RS256, &other, &claims),
    ));
    for (what, token) in &bad {
        assert_connect_refused(connect_outcome(&rs, token).await, 3500, what);
        let r = call(&rs, "GET", "/v1/users/me", Some(token), None).await;
        assert_eq!(r.status, 401, "REST with {what}: {}", r.text);
    }
    // The server cannot sign RS256 access tokens, so password login is off (not HS256).
    let r = call(
        &rs,
        "POST",
        "/v1/auth/login",
        None,
        Some(json!({"username": "nobody", "password": "whatever1"})),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text);
    rs.shutdown().await;
}

#[tokio::test]
async fn jwt_audience_and_issuer_are_checked_when_configured() {
    let server = TestServer::start_with(&format!(
        "{FAST_HASH}[token]\naudience = \"switchboard-test\"\nissuer = \"https://auth.test\"\n"
    ))
    .await;
    let exp = now_secs() + 3600;
    let cases = [
        (
            json!({"sub": "1", "exp": exp, "aud": "switchboard-test", "iss": "https://auth.test"}),
            true,
            "both right",
        ),
        (
            json!({"sub": "1", "exp": exp, "aud": ["other", "switchboard-test"], "iss": "https://auth.test"}),
            true,
            "aud list containing ours",
        ),
        (
            json!({"sub": "1", "exp": exp, "iss": "https://auth.test"}),
            false,
            "no aud",
        ),
        (
            json!({"sub": "1", "exp": exp, "aud": "switchboard-test"}),
            false,
            "no iss",
        ),
        (
            json!({"sub": "1", "exp": exp, "aud": "other-app", "iss": "https://auth.test"}),
            false,
            "wrong aud",
        ),
        (
            json!({"sub": "1", "exp": exp, "aud": ["other-app"], "iss": "https://auth.test"}),
            false,
            "aud list without ours",
        ),
        (
            json!({"sub": "1", "exp": exp, "aud": "switchboard-test", "iss": "https://evil.test"}),
            false,
            "wrong iss",
        ),
        (
            json!({"sub": "1", "exp": exp, "aud": "SWITCHBOARD-TEST", "iss": "https://auth.test"}),
            false,
            "aud in another case",
        ),
    ];
    for (claims, ok, what) in &cases {
        let token = server.token_with(claims.clone());
        let outcome = connect_outcome(&server, &token).await;
        if *ok {
            assert!(outcome.unwrap()["connect"].is_object(), "{what}");
        } else {
            assert_connect_refused(outcome, 3500, what);
        }
    }
    // The server's own access tokens carry both, so they connect and call REST.
    let (id, access, _) = account(&server, "audtest", "password-aud").await;
    assert!(connect_outcome(&server, &access).await.unwrap()["connect"].is_object());
    let r = call(&server, "GET", "/v1/users/me", Some(&access), None).await;
    assert_eq!(
        (r.status, r.json["id"].as_i64()),
        (200, Some(id)),
        "{}",
        r.text
    );
    // A token without them is refused over REST as well.
    let plain = server.token(&id.to_string(), Some(3600));
    let r = call(&server, "GET", "/v1/users/me", Some(&plain), None).await;
    assert_eq!(r.status, 401, "{}", r.text);
    server.shutdown().await;

    // Not configured: not checked (any aud and iss pass).
    let server = TestServer::start().await;
    let token = server.token_with(json!({"sub": "1", "aud": "anything", "iss": "anyone"}));
    assert!(connect_outcome(&server, &token).await.unwrap()["connect"].is_object());
    server.shutdown().await;
}

#[tokio::test]
async fn expired_tokens_are_refused_on_connect_refresh_subscribe_and_rest() {
    let server = TestServer::start_with("[namespaces.locked]\nprotected = true\n").await;
    let expired = server.token("7", Some(-1));

    // Connect: error 109 "token expired", which makes the SDK fetch a new token; the
    // connection stays open and a fresh token then connects on it.
    let mut c = RawClient::open(&server).await;
    let reply = c.call(json!({"connect": {"token": expired}})).await;
    assert_eq!(reply["error"]["code"], 109, "{reply}");
    assert_eq!(reply["error"]["message"], "token expired", "{reply}");
    assert_ne!(reply["error"]["temporary"], json!(true), "{reply}");
    let reply = c
        .call(json!({"connect": {"token": server.token("7", Some(60))}}))
        .await;
    assert!(reply["connect"].is_object(), "{reply}");

    // Refresh: an expired token gets 109 and the connection stays.
    let reply = c.call(json!({"refresh": {"token": expired}})).await;
    assert_eq!(reply["error"]["code"], 109, "{reply}");
    let reply = c
        .call(json!({"refresh": {"token": server.token("7", Some(120))}}))
        .await;
    assert!(reply["refresh"]["ttl"].as_u64().unwrap() > 60, "{reply}");

    // Subscription tokens: expired on subscribe and on sub_refresh.
    let sub_token = |exp: i64| {
        server.token_with(
            json!({"sub": "7", "channel": "locked:x", "exp": (now_secs() as i64 + exp)}),
        )
    };
    let reply = c
        .call(json!({"subscribe": {"channel": "locked:x", "token": sub_token(-1)}}))
        .await;
    assert_eq!(reply["error"]["code"], 109, "{reply}");
    let reply = c
        .call(json!({"subscribe": {"channel": "locked:x", "token": sub_token(60)}}))
        .await;
    assert!(reply["subscribe"].is_object(), "{reply}");
    let reply = c
        .call(json!({"sub_refresh": {"channel": "locked:x", "token": sub_token(-1)}}))
        .await;
    assert_eq!(reply["error"]["code"], 109, "{reply}");

    // A refresh for another user, or with a forged token, closes the connection.
    c.send(json!({"refresh": {"token": server.token("8", Some(60))}}))
        .await;
    assert_eq!(c.close_code().await, 3500);

    // REST and documents.
    let r = call(&server, "GET", "/v1/users/me", Some(&expired), None).await;
    assert_eq!(r.status, 401);
    assert_eq!(
        r.json["error"]["message"], "access token expired",
        "{}",
        r.text
    );
    assert_eq!(docs_close_code(&server, "1", &expired).await, Some(4401));
    // No leeway: a token that expired a second ago is expired.
    let just = server.token_with(json!({"sub": "7", "exp": now_secs() - 1}));
    assert_eq!(
        connect_outcome(&server, &just).await.unwrap()["error"]["code"],
        109
    );
    server.shutdown().await;
}

#[tokio::test]
async fn refresh_tokens_rotate_are_single_use_and_are_not_access_tokens() {
    let server = TestServer::start_with(FAST_HASH).await;
    let (id, access, refresh1) = account(&server, "rotator", "password-rot").await;
    let refresh = |token: &str| {
        let token = token.to_string();
        let server = &server;
        async move {
            call(
                server,
                "POST",
                "/v1/auth/refresh",
                None,
                Some(json!({"refresh_token": token})),
            )
            .await
        }
    };

    // Rotation: the new pair works; the old refresh token is spent.
    let r = refresh(&refresh1).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let refresh2 = r.json["refresh_token"].as_str().unwrap().to_string();
    let access2 = r.json["access_token"].as_str().unwrap().to_string();
    assert_ne!(refresh2, refresh1);
    assert_eq!(
        call(&server, "GET", "/v1/users/me", Some(&access2), None)
            .await
            .status,
        200
    );
    // Reusing the spent one is theft: it fails, and so does the newer one from then on.
    let r = refresh(&refresh1).await;
    assert_eq!(r.status, 401, "{}", r.text);
    let r = refresh(&refresh2).await;
    assert_eq!(
        r.status, 401,
        "after reuse every refresh token is revoked: {}",
        r.text
    );

    // Logout revokes the refresh token it names.
    let (access3, refresh3) = login(&server, "rotator", "password-rot").await;
    let r = call(
        &server,
        "POST",
        "/v1/auth/logout",
        Some(&access3),
        Some(json!({"refresh_token": refresh3})),
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.text);
    assert_eq!(refresh(&refresh3).await.status, 401);

    // Two refreshes racing with one token: exactly one wins.
    let (_, refresh4) = login(&server, "rotator", "password-rot").await;
    let results = join_all((0..4).map(|_| refresh(&refresh4))).await;
    let ok = results.iter().filter(|r| r.status == 200).count();
    assert_eq!(
        ok,
        1,
        "{:?}",
        results.iter().map(|r| r.status).collect::<Vec<_>>()
    );

    // No token passes for another kind.
    let (access5, refresh5) = login(&server, "rotator", "password-rot").await;
    assert_eq!(
        refresh(&access5).await.status,
        401,
        "access token as refresh token"
    );
    let r = call(&server, "GET", "/v1/users/me", Some(&refresh5), None).await;
    assert_eq!(r.status, 401, "refresh token as bearer: {}", r.text);
    assert_connect_refused(
        connect_outcome(&server, &refresh5).await,
        3500,
        "refresh token as connection token",
    );
    let sub_token = server
        .token_with(json!({"sub": id.to_string(), "channel": "news", "exp": now_secs() + 60}));
    assert_connect_refused(
        connect_outcome(&server, &sub_token).await,
        3500,
        "subscription token as connection token",
    );
    assert_eq!(
        call(&server, "GET", "/v1/users/me", Some(&sub_token), None)
            .await
            .status,
        401,
        "subscription token as bearer"
    );
    // A connection token is no subscription token.
    let mut c = common::connect(&server, &access5).await;
    c.send(json!({"subscribe": {"channel": "news", "token": access5}}))
        .await;
    assert_eq!(
        c.close_code().await,
        3500,
        "connection token as subscription token"
    );
    // The original access token is still valid (stateless) until its exp: documented.
    assert_eq!(
        call(&server, "GET", "/v1/users/me", Some(&access), None)
            .await
            .status,
        200
    );
    server.shutdown().await;
}

// ----- access matrices -----

#[derive(Clone, Copy, Debug)]
enum ChanOp {
    /// Subscribe without a token.
    Sub,
    /// Subscribe with a valid subscription token for this user and channel.
    SubToken,
    /// Publish without being subscribed.
    Pub,
    /// Subscribe (with a token), then publish.
    SubPub,
    Presence,
    SubPresence,
    History,
    SubHistory,
}

const CHAN_OPS: [ChanOp; 8] = [
    ChanOp::Sub,
    ChanOp::SubToken,
    ChanOp::Pub,
    ChanOp::SubPub,
    ChanOp::Presence,
    ChanOp::SubPresence,
    ChanOp::History,
    ChanOp::SubHistory,
];

/// Runs one cell on a fresh connection: 0 for success, else the error code.
async fn channel_cell(server: &TestServer, user: &Who, channel: &str, op: ChanOp) -> u64 {
    let mut c = common::connect(server, &user.token).await;
    let code = |r: &Value| r["error"]["code"].as_u64().unwrap_or(0);
    let sub_token = server.token_with(
        json!({"sub": user.id.to_string(), "channel": channel, "exp": now_secs() + 600}),
    );
    if matches!(
        op,
        ChanOp::SubToken | ChanOp::SubPub | ChanOp::SubPresence | ChanOp::SubHistory
    ) {
        let r = c
            .call(json!({"subscribe": {"channel": channel, "token": sub_token}}))
            .await;
        if code(&r) != 0 || matches!(op, ChanOp::SubToken) {
            c.close().await;
            return code(&r);
        }
    }
    let data = json!({"text": "matrix", "client_msg_id": unique("m")});
    let r = match op {
        ChanOp::Sub => c.call(json!({"subscribe": {"channel": channel}})).await,
        ChanOp::SubToken => unreachable!(),
        ChanOp::Pub | ChanOp::SubPub => {
            c.call(json!({"publish": {"channel": channel, "data": data}}))
                .await
        }
        ChanOp::Presence | ChanOp::SubPresence => {
            c.call(json!({"presence": {"channel": channel}})).await
        }
        ChanOp::History | ChanOp::SubHistory => {
            c.call(json!({"history": {"channel": channel, "limit": 10}}))
                .await
        }
    };
    c.close().await;
    code(&r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_permission_matrix() {
    let server = TestServer::start_with(
        "[namespaces.open]\n\
         [namespaces.subpub]\nallow_publish_for_client = false\nallow_presence_for_client = false\nallow_history_for_client = false\n\
         [namespaces.readonly]\nallow_publish_for_client = false\nallow_publish_for_subscriber = false\n\
         [namespaces.tokenonly]\nallow_subscribe_for_client = false\n\
         [namespaces.protected]\nprotected = true\n",
    )
    .await;
    let alice = store_user(&server, "alice", UserRole::User).await;
    let bob = store_user(&server, "bob", UserRole::User).await;
    let carol = store_user(&server, "carol", UserRole::User).await;
    let admin = store_user(&server, "admin", UserRole::Admin).await;
    // A private room of alice's with bob in it; carol and the admin are not members.
    let r = call(
        &server,
        "POST",
        "/v1/rooms",
        Some(&alice.token),
        Some(json!({"kind": "private", "name": "secret", "members": [bob.id]})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let room = r.json["id"].as_i64().unwrap();
    let (a, b) = (alice.id, bob.id);
    let chat = format!("chat:{room}");
    let personal = format!("open:#{a}");
    let pair = format!("open:pair#{a},{b}");
    let notes = format!("notifications:#{a}");
    let (chat, personal, pair, notes) = (
        chat.as_str(),
        personal.as_str(),
        pair.as_str(),
        notes.as_str(),
    );

    // Columns: Sub, SubToken, Pub, SubPub, Presence, SubPresence, History, SubHistory.
    // 0 = allowed; 102 unknown channel, 103 permission denied, 108 not available.
    const OK: [u64; 8] = [0; 8];
    const DENIED: [u64; 8] = [103; 8];
    let rows: Vec<(&str, &str, &Who, [u64; 8])> = vec![
        ("open:x", "alice", &alice, OK),
        ("open:x", "carol", &carol, OK),
        ("subpub:x", "alice", &alice, [0, 0, 103, 0, 103, 0, 103, 0]),
        ("readonly:x", "alice", &alice, [0, 0, 103, 103, 0, 0, 0, 0]),
        ("tokenonly:x", "alice", &alice, [103, 0, 0, 0, 0, 0, 0, 0]),
        ("protected:x", "alice", &alice, [103, 0, 0, 0, 0, 0, 0, 0]),
        (personal, "alice (its user)", &alice, OK),
        (personal, "bob", &bob, DENIED),
        (personal, "admin", &admin, DENIED),
        (pair, "alice", &alice, OK),
        (pair, "bob", &bob, OK),
        (pair, "carol", &carol, DENIED),
        (
            notes,
            "alice (its user)",
            &alice,
            [0, 0, 103, 103, 108, 108, 108, 108],
        ),
        (notes, "bob", &bob, [103, 103, 103, 103, 108, 103, 108, 103]),
        (
            "system:dashboard",
            "carol",
            &carol,
            [0, 0, 103, 103, 108, 108, 103, 0],
        ),
        (chat, "alice (owner)", &alice, OK),
        (chat, "bob (member)", &bob, OK),
        (chat, "carol (stranger)", &carol, DENIED),
        (chat, "admin (not a member)", &admin, DENIED),
        ("chat:999999", "alice", &alice, [102; 8]),
        ("chat:not-a-room", "alice", &alice, [102; 8]),
        ("nope:x", "alice", &alice, [102; 8]),
    ];
    let mut failures = Vec::new();
    for (channel, who, user, expected) in &rows {
        for (op, want) in CHAN_OPS.iter().zip(expected) {
            let got = channel_cell(&server, user, channel, *op).await;
            if got != *want {
                failures.push(format!(
                    "{channel} / {who} / {op:?}: got {got}, want {want}"
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "cells that differ:\n{}",
        failures.join("\n")
    );

    // Anonymous: there is no anonymous connection, so no channel at all.
    let mut c = RawClient::open(&server).await;
    c.send(json!({"connect": {}})).await;
    assert_eq!(c.close_code().await, 3501, "connect without a token");
    assert_connect_refused(
        connect_outcome(&server, &server.token_with(json!({"sub": ""}))).await,
        3500,
        "token with an empty sub",
    );
    let mut c = RawClient::open(&server).await;
    c.send(json!({"subscribe": {"channel": "open:x"}})).await;
    assert_eq!(c.close_code().await, 3501, "subscribe before connect");
    server.shutdown().await;
}

/// A y-websocket update that inserts `text` into the `content` text, from a fresh client.
fn yjs_insert(text: &str) -> Vec<u8> {
    use yrs::{Text, Transact};
    let doc = yrs::Doc::new();
    let t = doc.get_or_insert_text("content");
    let update = {
        let mut txn = doc.transact_mut();
        t.insert(&mut txn, 0, text);
        txn.encode_update_v1()
    };
    let mut out = vec![0u8, 2];
    write_var(&mut out, update.len() as u64);
    out.extend_from_slice(&update);
    out
}

fn write_var(out: &mut Vec<u8>, mut n: u64) {
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// Sync step 1 of an empty document.
const STEP1: &[u8] = &[0, 0, 1, 0];

/// What a document connection could do: `Ok(true)` it read and its write was applied,
/// `Ok(false)` it read and its write was refused (auth message), `Err(code)` it was closed.
async fn docs_cell(
    server: &TestServer,
    doc: i64,
    token: Option<&str>,
    owner: &str,
) -> Result<bool, Option<u16>> {
    let path = match token {
        Some(t) => format!("/docs/{doc}?token={t}"),
        None => format!("/docs/{doc}"),
    };
    let (mut ws, _) = RawWs::open(server.addr, &path, &[], None)
        .await
        .expect("docs upgrade");
    ws.send_frame(true, false, 2, STEP1).await;
    // Sync step 2: the document as it is (reading works).
    ws.until_binary(&[0, 1]).await?;
    let marker = unique("w");
    ws.send_frame(true, false, 2, &yjs_insert(&marker)).await;
    // Denied: the y-protocols auth message. Applied: the text shows over REST.
    let deadline = Instant::now() + WAIT;
    loop {
        let text = call(
            server,
            "GET",
            &format!("/v1/documents/{doc}/content"),
            Some(owner),
            None,
        )
        .await
        .text;
        if text.contains(&marker) {
            return Ok(true);
        }
        match tokio::time::timeout(Duration::from_millis(50), ws.next_frame()).await {
            Ok(Some((2, p))) if p.first() == Some(&2) => return Ok(false),
            Ok(Some((8, p))) => return Err(p.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]))),
            Ok(None) => return Err(None),
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "write neither applied nor refused"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn document_permission_matrix() {
    let server = TestServer::start().await;
    let owner = store_user(&server, "owner", UserRole::User).await;
    let editor = store_user(&server, "editor", UserRole::User).await;
    let viewer = store_user(&server, "viewer", UserRole::User).await;
    let stranger = store_user(&server, "stranger", UserRole::User).await;
    let admin = store_user(&server, "admin", UserRole::Admin).await;
    let spare = store_user(&server, "spare", UserRole::User).await;
    let roles: [(&str, Option<&Who>); 6] = [
        ("owner", Some(&owner)),
        ("editor", Some(&editor)),
        ("viewer", Some(&viewer)),
        ("stranger", Some(&stranger)),
        ("admin", Some(&admin)),
        ("anonymous", None),
    ];

    /// A fresh document shared with the editor, the viewer and the spare user (viewer),
    /// with one saved version: (doc id, version id).
    async fn setup(
        server: &TestServer,
        owner: &Who,
        editor: &Who,
        viewer: &Who,
        spare: &Who,
    ) -> (i64, i64) {
        let r = call(
            server,
            "POST",
            "/v1/documents",
            Some(&owner.token),
            Some(json!({"title": "matrix"})),
        )
        .await;
        assert_eq!(r.status, 201, "{}", r.text);
        let doc = r.json["document"]["id"].as_i64().unwrap();
        for (who, role) in [(editor, "editor"), (viewer, "viewer"), (spare, "viewer")] {
            let path = format!("/v1/documents/{doc}/members/{}", who.id);
            let r = call(
                server,
                "PUT",
                &path,
                Some(&owner.token),
                Some(json!({"role": role})),
            )
            .await;
            assert_eq!(r.status, 200, "{}", r.text);
        }
        let path = format!("/v1/documents/{doc}/versions");
        let r = call(
            server,
            "POST",
            &path,
            Some(&owner.token),
            Some(json!({"label": "v1"})),
        )
        .await;
        assert_eq!(r.status, 201, "{}", r.text);
        (doc, r.json["version"]["id"].as_i64().unwrap())
    }

    // (operation, method, path with {doc} {v} {spare} {me}, body,
    //  expected status for owner, editor, viewer, stranger, admin, anonymous)
    type Row = (
        &'static str,
        &'static str,
        &'static str,
        Option<Value>,
        [u16; 6],
    );
    let rows: Vec<Row> = vec![
        (
            "read metadata",
            "GET",
            "/v1/documents/{doc}",
            None,
            [200, 200, 200, 403, 200, 401],
        ),
        (
            "rename",
            "PATCH",
            "/v1/documents/{doc}",
            Some(json!({"title": "renamed"})),
            [200, 200, 403, 403, 200, 401],
        ),
        (
            "read content",
            "GET",
            "/v1/documents/{doc}/content",
            None,
            [200, 200, 200, 403, 200, 401],
        ),
        (
            "read content as update",
            "GET",
            "/v1/documents/{doc}/content?format=update",
            None,
            [200, 200, 200, 403, 200, 401],
        ),
        (
            "write (server-side edit)",
            "POST",
            "/v1/documents/{doc}/updates",
            Some(json!({"text": "x"})),
            [200, 200, 403, 403, 200, 401],
        ),
        (
            "list versions",
            "GET",
            "/v1/documents/{doc}/versions",
            None,
            [200, 200, 200, 403, 200, 401],
        ),
        (
            "save a version",
            "POST",
            "/v1/documents/{doc}/versions",
            Some(json!({"label": "v2"})),
            [201, 201, 403, 403, 201, 401],
        ),
        (
            "read a version",
            "GET",
            "/v1/documents/{doc}/versions/{v}",
            None,
            [200, 200, 200, 403, 200, 401],
        ),
        (
            "restore a version",
            "POST",
            "/v1/documents/{doc}/versions/{v}/restore",
            None,
            [200, 200, 403, 403, 200, 401],
        ),
        (
            "share (set a member)",
            "PUT",
            "/v1/documents/{doc}/members/{spare}",
            Some(json!({"role": "editor"})),
            [200, 403, 403, 403, 200, 401],
        ),
        (
            "unshare (remove a member)",
            "DELETE",
            "/v1/documents/{doc}/members/{spare}",
            None,
            [204, 403, 403, 403, 204, 401],
        ),
        // The owner and an admin are no members: nothing to remove (404).
        (
            "leave (remove oneself)",
            "DELETE",
            "/v1/documents/{doc}/members/{me}",
            None,
            [404, 204, 204, 403, 404, 401],
        ),
        (
            "make oneself owner",
            "PUT",
            "/v1/documents/{doc}/members/{me}",
            Some(json!({"role": "owner"})),
            [400, 403, 403, 403, 400, 401],
        ),
        (
            "delete",
            "DELETE",
            "/v1/documents/{doc}",
            None,
            [204, 403, 403, 403, 204, 401],
        ),
    ];
    let mut failures = Vec::new();
    for (op, method, template, body, expected) in &rows {
        for ((role, who), want) in roles.iter().zip(expected) {
            let (doc, v) = setup(&server, &owner, &editor, &viewer, &spare).await;
            let me = who.map_or(0, |w| w.id);
            let path = template
                .replace("{doc}", &doc.to_string())
                .replace("{v}", &v.to_string())
                .replace("{spare}", &spare.id.to_string())
                .replace("{me}", &me.to_string());
            let r = call(
                &server,
                method,
                &path,
                who.map(|w| w.token.as_str()),
                body.clone(),
            )
            .await;
            if r.status != *want {
                failures.push(format!(
                    "{op} / {role}: got {} ({}), want {want}",
                    r.status, r.text
                ));
            }
        }
    }

    // Listing: a document is listed for its members only (admins open it, but it is not
    // theirs to list).
    let (doc, _) = setup(&server, &owner, &editor, &viewer, &spare).await;
    for ((role, who), (want_status, listed)) in roles.iter().zip([
        (200, true),
        (200, true),
        (200, true),
        (200, false),
        (200, false),
        (401, false),
    ]) {
        let r = call(
            &server,
            "GET",
            "/v1/documents",
            who.map(|w| w.token.as_str()),
            None,
        )
        .await;
        let found = r.json["documents"]
            .as_array()
            .is_some_and(|l| l.iter().any(|d| d["id"] == doc));
        if (r.status, found) != (want_status, listed) {
            failures.push(format!(
                "list / {role}: got {} listed={found}, want {want_status} listed={listed}",
                r.status
            ));
        }
    }

    // The live endpoint: read (sync) and write (an update) for each role.
    for ((role, who), want) in roles.iter().zip([
        Ok(true),
        Ok(true),
        Ok(false),
        Err(Some(4403)),
        Ok(true),
        Err(Some(4401)),
    ]) {
        let got = docs_cell(&server, doc, who.map(|w| w.token.as_str()), &owner.token).await;
        if got != want {
            failures.push(format!("live / {role}: got {got:?}, want {want:?}"));
        }
    }
    // A bad token, an unknown document, an id that is not a number.
    let forged =
        switchboard::auth::sign_hs256("not-the-secret", &json!({"sub": owner.id.to_string()}));
    for (what, doc, token, want) in [
        ("forged token", doc.to_string(), forged.as_str(), Some(4401)),
        (
            "unknown document",
            "999999".to_string(),
            owner.token.as_str(),
            Some(4404),
        ),
        (
            "not a number",
            "abc".to_string(),
            owner.token.as_str(),
            Some(4404),
        ),
    ] {
        let got = docs_close_code(&server, &doc, token).await;
        if got != want {
            failures.push(format!("live / {what}: got {got:?}, want {want:?}"));
        }
    }
    for path in [
        "/v1/documents/999999",
        "/v1/documents/999999/content",
        "/v1/documents/999999/versions",
    ] {
        let r = call(&server, "GET", path, Some(&owner.token), None).await;
        if r.status != 404 {
            failures.push(format!("{path}: got {}, want 404", r.status));
        }
    }
    assert!(
        failures.is_empty(),
        "cells that differ:\n{}",
        failures.join("\n")
    );
    server.shutdown().await;
}

// ----- origins -----

#[tokio::test]
async fn websocket_upgrades_check_the_origin() {
    let server = TestServer::start_with(&format!(
        "allowed_origins = [\"https://app.example\"]\n{FAST_HASH}"
    ))
    .await;
    let status = |path: &'static str, origin: Option<&'static str>| {
        let addr = server.addr;
        async move {
            let headers: Vec<(&str, &str)> = origin.map(|o| ("Origin", o)).into_iter().collect();
            match RawWs::open(addr, path, &headers, None).await {
                Ok(_) => 101,
                Err(r) => r.status,
            }
        }
    };
    let endpoints = ["/connection/websocket", "/docs/1"];
    for path in endpoints {
        assert_eq!(
            status(path, Some("https://app.example")).await,
            101,
            "{path}"
        );
        assert_eq!(
            status(path, Some("https://APP.example")).await,
            101,
            "{path}: case"
        );
        assert_eq!(
            status(path, None).await,
            101,
            "{path}: no Origin (not a browser)"
        );
        for foreign in [
            "https://evil.example",
            "http://app.example",
            "https://app.example:8443",
            "https://app.example.evil.example",
            "https://evilapp.example",
            "null",
            "https://app.example/",
        ] {
            assert_eq!(status(path, Some(foreign)).await, 403, "{path}: {foreign}");
        }
    }
    // A refusal is an HTTP 403 before any upgrade.
    let refused = RawWs::open(
        server.addr,
        "/connection/websocket",
        &[("Origin", "https://evil.example")],
        None,
    )
    .await
    .err()
    .expect("refused");
    assert!(
        !refused
            .head
            .to_ascii_lowercase()
            .contains("upgrade: websocket"),
        "{}",
        refused.head
    );

    // Per-site origins join the global list.
    let admin = store_user(&server, "siteadmin", UserRole::Admin).await;
    let r = call(
        &server,
        "POST",
        "/v1/admin/sites",
        Some(&admin.token),
        Some(json!({"name": "Shop", "allowed_origins": ["https://shop.example"]})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text);
    for path in endpoints {
        assert_eq!(
            status(path, Some("https://shop.example")).await,
            101,
            "{path}"
        );
        assert_eq!(
            status(path, Some("https://app.example")).await,
            101,
            "{path}"
        );
        assert_eq!(
            status(path, Some("https://evil.example")).await,
            403,
            "{path}"
        );
    }
    server.shutdown().await;

    // With no global list, any origin is allowed only until a site lists one.
    let server = TestServer::start().await;
    assert_eq!(status_of(&server, Some("https://evil.example")).await, 101);
    let admin = store_user(&server, "siteadmin", UserRole::Admin).await;
    let r = call(
        &server,
        "POST",
        "/v1/admin/sites",
        Some(&admin.token),
        Some(json!({"name": "Shop", "allowed_origins": ["https://shop.example"]})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(status_of(&server, Some("https://evil.example")).await, 403);
    assert_eq!(status_of(&server, Some("https://shop.example")).await, 101);
    server.shutdown().await;
}

async fn status_of(server: &TestServer, origin: Option<&str>) -> u16 {
    let headers: Vec<(&str, &str)> = origin.map(|o| ("Origin", o)).into_iter().collect();
    match RawWs::open(server.addr, "/connection/websocket", &headers, None).await {
        Ok(_) => 101,
        Err(r) => r.status,
    }
}

// ----- rate limits -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_connections_are_rate_limited_per_ip() {
    let server = TestServer::start_with(
        "[client]\nconnection_rate_per_ip = 1\nconnection_burst_per_ip = 4\n",
    )
    .await;
    let a = Ipv4Addr::new(127, 0, 0, 2);
    let b = Ipv4Addr::new(127, 0, 0, 3);
    let open = |path: &'static str, source: Ipv4Addr| {
        let addr = server.addr;
        async move { RawWs::open(addr, path, &[], Some(source)).await }
    };
    // The burst from one address, over both endpoints (they share the budget): 4 at once,
    // plus what the rate (1/s) added meanwhile.
    let started = Instant::now();
    let mut held = Vec::new();
    let paths = ["/connection/websocket", "/docs/1"];
    let refused = loop {
        match open(paths[held.len() % 2], a).await {
            Ok(ws) => held.push(ws),
            Err(r) => break r,
        }
        assert!(held.len() <= 10, "never refused");
    };
    let extra = started.elapsed().as_secs() as usize + 1;
    assert!(
        (4..=4 + extra).contains(&held.len()),
        "{} admitted",
        held.len()
    );
    for refused in [
        refused,
        open(paths[1], a).await.err().expect("docs refused too"),
    ] {
        assert_eq!(refused.status, 429, "{}", refused.head);
        let retry: u64 = refused
            .head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("retry-after: ")
                    .map(|v| v.trim().parse().unwrap())
            })
            .expect("Retry-After");
        assert_eq!(retry, 1);
    }
    // Another address is not affected.
    for _ in 0..4 {
        held.push(
            open("/connection/websocket", b)
                .await
                .expect("another address"),
        );
    }
    // Connections already open are not touched, and a connected client works.
    let mut c = RawClient::connect(&server, "rate").await;
    let r = c.call(json!({"subscribe": {"channel": unique("r")}})).await;
    assert!(r["subscribe"].is_object(), "{r}");
    // The bucket refills at the rate: about one more from the first address a second later,
    // and then it is empty again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut admitted = 0;
    loop {
        match open("/connection/websocket", a).await {
            Ok(ws) => held.push(ws),
            Err(r) => {
                assert_eq!(r.status, 429, "{}", r.head);
                break;
            }
        }
        admitted += 1;
        assert!(admitted <= 4, "never refused again");
    }
    assert!(admitted >= 1, "the bucket did not refill");
    // A refused upgrade is an HTTP answer, not a half-open socket: plain HTTP still works.
    let r = call_from(&http_from(a), &server, "GET", "/healthz", None, None).await;
    assert_eq!(r.status, 200);
    drop(held);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_are_locked_out_per_account_and_per_ip() {
    let server = TestServer::start_with(&format!(
        "{FAST_HASH}login_max_failures = 3\nlogin_max_failures_per_ip = 6\nlogin_lockout = \"3s\"\n"
    ))
    .await;
    for name in ["victim", "other1", "other2", "other3"] {
        account(&server, name, "right-password").await;
    }
    let from = |last: u8| http_from(Ipv4Addr::new(127, 0, 0, last));
    let (attacker, bystander, third) = (from(2), from(3), from(4));
    let try_login = |client: &reqwest::Client, user: &str, password: &str| {
        let client = client.clone();
        let body = json!({"username": user, "password": password});
        let server = &server;
        async move { call_from(&client, server, "POST", "/v1/auth/login", None, Some(body)).await }
    };

    // Per account: three failures lock it, for everyone, even with the right password.
    let started = Instant::now();
    for _ in 0..3 {
        assert_eq!(try_login(&attacker, "victim", "guess").await.status, 401);
    }
    let r = try_login(&attacker, "victim", "right-password").await;
    assert_eq!(r.status, 429, "{}", r.text);
    assert!(r.headers.contains_key("retry-after"));
    let r = try_login(&bystander, "victim", "right-password").await;
    assert_eq!(r.status, 429, "locked for every address: {}", r.text);
    // Other accounts are fine from elsewhere.
    assert_eq!(
        try_login(&bystander, "other1", "right-password")
            .await
            .status,
        200
    );

    // Per address: guesses spread over accounts lock the address (6 failures: 3 above, 3
    // more here), after which even a right password from it gets 429...
    for user in ["other1", "other2", "nosuchuser"] {
        assert_eq!(
            try_login(&attacker, user, "guess").await.status,
            401,
            "{user}"
        );
    }
    let r = try_login(&attacker, "other3", "right-password").await;
    assert_eq!(r.status, 429, "address locked: {}", r.text);
    // ...while another address logs in to the same account.
    assert_eq!(
        try_login(&third, "other3", "right-password").await.status,
        200
    );

    // Parallel guesses get no more tries than sequential ones: of 10 at once, at most 3 are
    // checked (401); the rest are refused (429).
    account(&server, "parallel", "right-password").await;
    let fourth = from(5);
    let results = join_all((0..10).map(|_| try_login(&fourth, "parallel", "guess"))).await;
    let checked = results.iter().filter(|r| r.status == 401).count();
    assert!(results.iter().all(|r| r.status == 401 || r.status == 429));
    assert!(checked <= 3, "{checked} guesses were checked");

    // After the lockout, the right password works again.
    let wait = Duration::from_millis(3200).saturating_sub(started.elapsed());
    tokio::time::sleep(wait).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let r = try_login(&attacker, "victim", "right-password").await;
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 429);
        assert!(Instant::now() < deadline, "still locked");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    server.shutdown().await;
}

// ----- hostile input -----

const INJECTIONS: &[&str] = &[
    "' OR '1'='1",
    "'; DROP TABLE users; --",
    "\"; DROP TABLE rooms; --",
    "1; DELETE FROM messages",
    "admin'--",
    "' UNION SELECT password_hash, 1, 1 FROM users --",
    "%' OR 1=1 --",
    "\\'; SELECT pg_sleep(5); --",
    "1' AND (SELECT COUNT(*) FROM sqlite_master) > 0 --",
    "Robert'); DROP TABLE documents;--",
    "$1 $2 ?1 ? :name @p1",
];

fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Percent-encodes every byte that is not unreserved, for a path segment.
fn enc_path(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_injection_strings_are_stored_and_matched_as_data() {
    let server = TestServer::start_with(&format!(
        "{FAST_HASH}login_max_failures_per_ip = 1000\nlogin_max_failures = 1000\n"
    ))
    .await;
    let (alice, alice_token, _) = account(&server, "alice", "alice-password").await;
    let admin = store_user(&server, "root", UserRole::Admin).await;
    let mut errors: Vec<Resp> = Vec::new();

    for &evil in INJECTIONS {
        // Usernames: refused by the input rules (before any query), as register and login.
        let r = call(
            &server,
            "POST",
            "/v1/auth/register",
            None,
            Some(json!({"username": evil, "password": "password-1", "display_name": "x"})),
        )
        .await;
        assert_eq!(r.status, 400, "{evil}: {}", r.text);
        errors.push(r);
        let r = call(
            &server,
            "POST",
            "/v1/auth/login",
            None,
            Some(json!({"username": evil, "password": evil})),
        )
        .await;
        assert_eq!(r.status, 401, "{evil}: {}", r.text);
        errors.push(r);
        // The right username with an injection as the password.
        let r = call(
            &server,
            "POST",
            "/v1/auth/login",
            None,
            Some(json!({"username": "alice", "password": evil})),
        )
        .await;
        assert_eq!(r.status, 401, "{evil}: {}", r.text);

        // Display names: stored and returned exactly.
        let name: String = evil.chars().take(64).collect();
        let r = call(
            &server,
            "PATCH",
            "/v1/users/me",
            Some(&alice_token),
            Some(json!({"display_name": name})),
        )
        .await;
        assert_eq!(
            (r.status, r.json["display_name"].as_str()),
            (200, Some(name.as_str())),
            "{}",
            r.text
        );

        // Lookups: matched as a literal, so nothing is found.
        let r = call(
            &server,
            "GET",
            &format!("/v1/users?username={}", enc(evil)),
            Some(&alice_token),
            None,
        )
        .await;
        assert_eq!(
            (r.status, r.json["users"].clone()),
            (200, json!([])),
            "{evil}: {}",
            r.text
        );
        for path in [
            format!("/v1/users?ids={}", enc(evil)),
            format!("/v1/rooms/public?after={}", enc(evil)),
            format!("/v1/rooms/public?limit={}", enc(evil)),
            format!("/v1/notifications?before={}", enc(evil)),
            format!("/v1/rooms/1/messages?before={}", enc(evil)),
            format!("/v1/rooms/{}", enc_path(evil)),
            format!("/v1/rooms/{}/messages", enc_path(evil)),
            format!("/v1/documents/{}/content", enc_path(evil)),
            format!("/v1/users/{}/presence", enc_path(evil)),
        ] {
            let r = call(&server, "GET", &path, Some(&alice_token), None).await;
            assert_eq!(r.status, 400, "{path}: {}", r.text);
            errors.push(r);
        }
        let r = call(
            &server,
            "GET",
            &format!("/v1/admin/audit?before={}", enc(evil)),
            Some(&admin.token),
            None,
        )
        .await;
        assert_eq!(r.status, 400, "{}", r.text);
        errors.push(r);

        // Room names, message texts and client message ids, document titles, version labels
        // and edits: stored exactly.
        let r = call(
            &server,
            "POST",
            "/v1/rooms",
            Some(&alice_token),
            Some(json!({"kind": "public", "name": evil})),
        )
        .await;
        assert_eq!(
            (r.status, r.json["name"].as_str()),
            (201, Some(evil)),
            "{}",
            r.text
        );
        let room = r.json["id"].as_i64().unwrap();
        let path = format!("/v1/rooms/{room}/messages");
        let r = call(
            &server,
            "POST",
            &path,
            Some(&alice_token),
            Some(json!({"text": evil, "client_msg_id": evil})),
        )
        .await;
        assert_eq!(r.status, 201, "{}", r.text);
        let r = call(&server, "GET", &path, Some(&alice_token), None).await;
        assert_eq!(r.json["messages"][0]["text"], evil, "{}", r.text);
        assert_eq!(r.json["messages"][0]["client_msg_id"], evil, "{}", r.text);

        let r = call(
            &server,
            "POST",
            "/v1/documents",
            Some(&alice_token),
            Some(json!({"title": evil})),
        )
        .await;
        assert_eq!(
            (r.status, r.json["document"]["title"].as_str()),
            (201, Some(evil)),
            "{}",
            r.text
        );
        let doc = r.json["document"]["id"].as_i64().unwrap();
        let r = call(
            &server,
            "POST",
            &format!("/v1/documents/{doc}/updates"),
            Some(&alice_token),
            Some(json!({"text": evil})),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let r = call(
            &server,
            "POST",
            &format!("/v1/documents/{doc}/versions"),
            Some(&alice_token),
            Some(json!({"label": evil})),
        )
        .await;
        assert_eq!(
            (r.status, r.json["version"]["label"].as_str()),
            (201, Some(evil)),
            "{}",
            r.text
        );
        let r = call(
            &server,
            "GET",
            &format!("/v1/documents/{doc}/content"),
            Some(&alice_token),
            None,
        )
        .await;
        assert_eq!(r.text, evil);

        // Sites: names, and external ids that become usernames.
        let r = call(
            &server,
            "POST",
            "/v1/admin/sites",
            Some(&admin.token),
            Some(json!({"name": evil, "allowed_origins": []})),
        )
        .await;
        assert_eq!(
            (r.status, r.json["site"]["name"].as_str()),
            (201, Some(evil)),
            "{}",
            r.text
        );
        let site = r.json["site"]["id"].as_i64().unwrap();
        let key = r.json["site_key"].as_str().unwrap().to_string();
        let resp = http()
            .post(format!("{}/v1/sites/{site}/tokens", server.http_url()))
            .header("X-Site-Key", &key)
            .json(&json!({"external_id": evil, "display_name": name}))
            .send()
            .await
            .unwrap();
        let r = into_resp(resp).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.json["external_id"], evil);
        let username = r.json["user"]["username"].as_str().unwrap();
        assert!(
            username
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)),
            "{username}"
        );
        // The wrong key, shaped like an injection.
        let resp = http()
            .post(format!("{}/v1/sites/{site}/tokens", server.http_url()))
            .header("X-Site-Key", "' OR '1'='1")
            .json(&json!({"external_id": "x"}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 401);

        // Over the socket: channels and RPC arguments.
        let mut c = common::connect(&server, &alice_token).await;
        let r = c
            .call(json!({"subscribe": {"channel": format!("chat:{evil}")}}))
            .await;
        assert_eq!(r["error"]["code"], 102, "{r}");
        let r = c
            .call(json!({"rpc": {"method": "chat.send", "data": {"room": evil, "text": "x"}}}))
            .await;
        assert_eq!(r["error"]["code"], 107, "{r}");
        let r = c.call(json!({"rpc": {"method": "chat.send", "data": {"room": room, "text": evil, "client_msg_id": unique(evil)}}})).await;
        assert_eq!(r["rpc"]["data"]["message"]["text"], evil, "{r}");
        c.close().await;
        // The documents endpoint with an injection as the id.
        let path = format!("/docs/{}?token={alice_token}", enc_path(evil));
        let (mut ws, _) = RawWs::open(server.addr, &path, &[], None)
            .await
            .expect("upgrade");
        assert_eq!(ws.close_code().await, Some(4404), "{evil}");
    }

    // Nothing leaked, and everything is still there: accounts (alice logs in, with her id),
    // rooms, messages, documents, sites, the audit log.
    for r in &errors {
        assert_no_leak(r);
    }
    let (token, _) = login(&server, "alice", "alice-password").await;
    let r = call(&server, "GET", "/v1/users/me", Some(&token), None).await;
    assert_eq!(r.json["id"], alice);
    let r = call(&server, "GET", "/v1/rooms", Some(&token), None).await;
    assert_eq!(
        r.json["rooms"].as_array().map(Vec::len),
        Some(INJECTIONS.len()),
        "{}",
        r.text
    );
    let r = call(
        &server,
        "GET",
        "/v1/rooms/public?limit=100",
        Some(&token),
        None,
    )
    .await;
    let names: Vec<&str> = r.json["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    for evil in INJECTIONS {
        assert!(names.contains(evil), "{evil} missing from {names:?}");
    }
    let r = call(&server, "GET", "/v1/documents", Some(&token), None).await;
    assert_eq!(
        r.json["documents"].as_array().map(Vec::len),
        Some(INJECTIONS.len())
    );
    let r = call(&server, "GET", "/v1/admin/sites", Some(&admin.token), None).await;
    assert_eq!(
        r.json["sites"].as_array().map(Vec::len),
        Some(INJECTIONS.len()),
        "{}",
        r.text
    );
    let r = call(
        &server,
        "GET",
        "/v1/admin/audit?limit=5",
        Some(&admin.token),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let store = &server.node().store;
    assert!(store.user_by_username("alice").await.unwrap().is_some());
    assert!(store
        .user_by_username("' or '1'='1")
        .await
        .unwrap()
        .is_none());
    server.shutdown().await;
}

#[tokio::test]
async fn static_paths_never_escape_the_web_bundle() {
    let server = TestServer::start().await;
    let index = raw_http(
        &server,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await
    .1;
    let index_body = index
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap();
    // Markers of files outside the bundle: /etc/passwd, the repository's sources and config.
    let outside = [
        "root:x:",
        "[package]",
        "[workspace]",
        "include_bytes",
        "fn main",
        "BEGIN PRIVATE KEY",
        "hmac_secret",
    ];
    let paths = [
        "/../../../../etc/passwd",
        "/..%2f..%2f..%2f..%2fetc%2fpasswd",
        "/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
        "/%252e%252e/%252e%252e/etc/passwd",
        "/assets/..%2f..%2f..%2fCargo.toml",
        "/assets/../../../Cargo.toml",
        "/assets/%2e%2e/%2e%2e/crates/server/src/main.rs",
        "/..\\..\\..\\etc\\passwd",
        "/..%5c..%5c..%5cetc%5cpasswd",
        "/assets\\..\\..\\Cargo.toml",
        "/index.html%00.js",
        "/%00/../../etc/passwd",
        "/etc/passwd%00",
        "/%c0%ae%c0%ae/%c0%ae%c0%ae/etc/passwd",
        "/./././../etc/passwd",
        "//etc/passwd",
        "/v1/../../etc/passwd",
        "/api/..%2f..%2fetc%2fpasswd",
        "/.git/config",
        "/.env",
        "/data/token_hmac_secret",
        "/../data/api_key",
        "/Cargo.toml",
        "/crates/server/src/main.rs",
        "http://localhost/../../etc/passwd",
        "*",
    ];
    for path in paths {
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let (status, text) = raw_http(&server, req.as_bytes()).await;
        for marker in outside {
            assert!(
                !text.contains(marker),
                "{path} served something outside the bundle ({marker})"
            );
        }
        match status {
            // The app's page (the SPA fallback), nothing else.
            200 => {
                let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
                assert_eq!(body, index_body, "{path}");
            }
            400 | 404 | 405 => {}
            other => panic!("{path}: unexpected status {other}: {text}"),
        }
    }
    server.shutdown().await;
}

/// Asserts that an error response says nothing about the server's insides.
fn assert_no_leak(r: &Resp) {
    const MARKERS: &[&str] = &[
        "sqlx",
        "serde",
        "sqlite",
        "SQLITE",
        "postgres",
        "Postgres",
        "SELECT ",
        "INSERT ",
        "UPDATE ",
        "DELETE FROM",
        " FROM ",
        "WHERE ",
        "constraint",
        "CONSTRAINT",
        "syntax error",
        "near \"",
        "panicked",
        "thread '",
        "backtrace",
        "RUST_",
        "/src/",
        ".rs:",
        "/home/",
        "/root/",
        "/work/",
        "/tmp/",
        "/usr/",
        "i64",
        "i32",
        "u64",
        "u32",
        "usize",
        "f64",
        "struct ",
        "enum ",
        "::",
        "Failed to deserialize",
        "Failed to parse",
        "invalid type:",
        "Cannot parse",
        "at line ",
        "expected a string",
        "expected a sequence",
        "expected struct",
        "tokio",
        "hyper",
        "axum",
        "tungstenite",
        "yrs",
        "Error {",
        "Os {",
        "kind:",
    ];
    for m in MARKERS {
        assert!(
            !r.text.contains(m),
            "response leaks {m:?}: {} {}",
            r.status,
            r.text
        );
    }
}

/// Sends a raw body to `path` and returns the response.
async fn post_raw(
    server: &TestServer,
    path: &str,
    bearer: Option<&str>,
    content_type: &str,
    body: Vec<u8>,
) -> Resp {
    let mut req = http()
        .post(format!("{}{path}", server.http_url()))
        .header("Content-Type", content_type)
        .body(body);
    if let Some(t) = bearer {
        req = req.bearer_auth(t);
    }
    into_resp(req.send().await.expect("request")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_get_413_on_every_entry_point() {
    const LIMIT: usize = 64 * 1024;
    let server =
        TestServer::start_with(&format!("[http]\nmax_body_size = {LIMIT}\n{FAST_HASH}")).await;
    let admin = store_user(&server, "admin", UserRole::Admin).await;
    // A JSON document just over the limit.
    let big = {
        let mut s = String::from("{\"text\": \"");
        s.push_str(&"a".repeat(LIMIT));
        s.push_str("\"}");
        s.into_bytes()
    };
    // Every /v1 operation that takes a body, from the OpenAPI document.
    let openapi = call(&server, "GET", "/v1/openapi.json", None, None)
        .await
        .json;
    let mut checked = 0;
    for (path, item) in openapi["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if op.get("requestBody").is_none() {
                continue;
            }
            let path = path
                .replace("{id}", "1")
                .replace("{user_id}", "1")
                .replace("{version}", "1");
            let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let resp = http()
                .request(method.clone(), format!("{}{path}", server.http_url()))
                .bearer_auth(&admin.token)
                .header("X-Site-Key", "sk_whatever")
                .header("Content-Type", "application/json")
                .body(big.clone())
                .send()
                .await
                .unwrap();
            let r = into_resp(resp).await;
            assert_eq!(r.status, 413, "{method} {path}: {}", r.text);
            assert_no_leak(&r);
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} operations with a body");
    // The server API, every method.
    for method in [
        "publish",
        "broadcast",
        "subscribe",
        "unsubscribe",
        "disconnect",
        "presence",
        "presence_stats",
        "history",
        "history_remove",
        "channels",
        "info",
    ] {
        let resp = http()
            .post(format!("{}/api/{method}", server.http_url()))
            .header("X-API-Key", &server.api_key)
            .body(big.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 413, "/api/{method}");
    }
    // Chunked, with no Content-Length: cut off at the limit all the same.
    let mut req = format!(
        "POST /v1/documents HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        admin.token
    )
    .into_bytes();
    for chunk in big.chunks(4096) {
        req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        req.extend_from_slice(chunk);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let (status, _) = raw_http(&server, &req).await;
    assert_eq!(status, 413, "chunked");
    // A Content-Length over the limit is refused before the body arrives.
    let req = format!(
        "POST /v1/auth/register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{{",
        1u64 << 40
    );
    let (status, _) = raw_http(&server, req.as_bytes()).await;
    assert_eq!(status, 413);
    // Just under the limit is fine (the limit is the limit, not a guess).
    let ok = format!("{{\"title\": \"{}\"}}", "b".repeat(150));
    let r = post_raw(
        &server,
        "/v1/documents",
        Some(&admin.token),
        "application/json",
        ok.into_bytes(),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text);
    // Headers are bounded too: hyper refuses an oversized header block.
    let req = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "h".repeat(1 << 20)
    );
    let (status, _) = raw_http(&server, req.as_bytes()).await;
    assert!(
        status == 431 || status == 0 || status == 400,
        "oversized headers: {status}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_websocket_messages_close_with_1009_or_4413() {
    let server = TestServer::start_with(
        "[client]\nmax_frame_size = 4096\n[docs]\nmax_update_bytes = 8192\n",
    )
    .await;
    let bystander = common::Bystander::start(&server).await;
    let token = server.token("big", None);
    let connect = json!({"id": 1, "connect": {"token": token}}).to_string();
    let big_text = |n: usize| {
        format!(
            "{{\"id\":2,\"rpc\":{{\"method\":\"x\",\"data\":\"{}\"}}}}",
            "a".repeat(n)
        )
    };

    // /connection/websocket: before connect, after connect, in fragments, and a frame header
    // announcing an enormous length (refused from the header alone).
    let open = || RawWs::open(server.addr, "/connection/websocket", &[], None);
    let (mut ws, _) = open().await.unwrap();
    ws.send_frame(true, false, 1, big_text(5000).as_bytes())
        .await;
    assert_eq!(
        ws.close_code().await,
        Some(1009),
        "one frame before connect"
    );

    let (mut ws, _) = open().await.unwrap();
    ws.send_frame(true, false, 1, connect.as_bytes()).await;
    ws.send_frame(true, false, 1, big_text(5000).as_bytes())
        .await;
    assert_eq!(ws.close_code().await, Some(1009), "one frame after connect");

    let (mut ws, _) = open().await.unwrap();
    let msg = big_text(6000);
    let (a, b) = msg.as_bytes().split_at(3000);
    ws.send_frame(false, false, 1, a).await;
    ws.send_frame(true, false, 0, b).await;
    assert_eq!(
        ws.close_code().await,
        Some(1009),
        "fragments adding up past the limit"
    );

    let (mut ws, _) = open().await.unwrap();
    let mut header = vec![0x81u8, 0x80 | 127];
    header.extend_from_slice(&(1u64 << 40).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    ws.send_raw(&header).await;
    assert_eq!(ws.close_code().await, Some(1009), "a lying frame length");

    // Many small fragments that never end: bounded by the same limit.
    let (mut ws, _) = open().await.unwrap();
    ws.send_frame(false, false, 1, b"{").await;
    for _ in 0..100 {
        ws.send_frame(false, false, 0, &[b' '; 100]).await;
    }
    assert_eq!(ws.close_code().await, Some(1009), "endless fragments");

    // /docs/{id}: 4413, the code y-websocket does not retry (see README, Documents).
    let owner = store_user(&server, "owner", UserRole::User).await;
    let r = call(
        &server,
        "POST",
        "/v1/documents",
        Some(&owner.token),
        Some(json!({"title": "big"})),
    )
    .await;
    let doc = r.json["document"]["id"].as_i64().unwrap();
    let path = format!("/docs/{doc}?token={}", owner.token);
    let (mut ws, _) = RawWs::open(server.addr, &path, &[], None).await.unwrap();
    ws.send_frame(true, false, 2, &vec![0u8; 9000]).await;
    assert_eq!(ws.close_code().await, Some(4413), "docs: one big frame");
    let (mut ws, _) = RawWs::open(server.addr, &path, &[], None).await.unwrap();
    let mut header = vec![0x82u8, 0x80 | 127];
    header.extend_from_slice(&(1u64 << 40).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    ws.send_raw(&header).await;
    assert_eq!(
        ws.close_code().await,
        Some(4413),
        "docs: a lying frame length"
    );

    bystander.check(&server).await;
    server.shutdown().await;
}

#[tokio::test]
async fn compression_is_never_negotiated_or_inflated() {
    let server = TestServer::start_with(FAST_HASH).await;
    let bystander = common::Bystander::start(&server).await;
    // permessage-deflate offered: the reply has no extension, on both endpoints.
    for path in ["/connection/websocket", "/docs/1"] {
        let (_, head) = RawWs::open(
            server.addr,
            path,
            &[(
                "Sec-WebSocket-Extensions",
                "permessage-deflate; client_max_window_bits",
            )],
            None,
        )
        .await
        .unwrap();
        assert!(
            !head
                .to_ascii_lowercase()
                .contains("sec-websocket-extensions"),
            "{path}: {head}"
        );
    }
    // So a compressed frame (RSV1 set) is a protocol error: the connection fails, nothing is
    // inflated, and the server carries on.
    let (mut ws, _) = RawWs::open(
        server.addr,
        "/connection/websocket",
        &[("Sec-WebSocket-Extensions", "permessage-deflate")],
        None,
    )
    .await
    .unwrap();
    // A tiny deflate stream that would inflate to a lot.
    ws.send_frame(
        true,
        true,
        1,
        &[0xed, 0xc1, 0x01, 0x0d, 0x00, 0x00, 0x00, 0xc2, 0xa0],
    )
    .await;
    let code = ws.close_code().await;
    assert!(matches!(code, None | Some(1002)), "{code:?}");

    // Compressed request bodies: 415, before any handler reads them.
    let bomb = gzip_zeros(10 << 20);
    assert!(bomb.len() < 100 << 10, "the bomb is small: {}", bomb.len());
    for (path, encoding) in [
        ("/v1/auth/register", "gzip"),
        ("/v1/auth/login", "deflate"),
        ("/v1/auth/login", "br"),
        ("/v1/auth/login", "gzip, identity"),
        ("/api/publish", "gzip"),
    ] {
        let resp = http()
            .post(format!("{}{path}", server.http_url()))
            .header("Content-Type", "application/json")
            .header("Content-Encoding", encoding)
            .header("X-API-Key", &server.api_key)
            .body(bomb.clone())
            .send()
            .await
            .unwrap();
        let r = into_resp(resp).await;
        assert_eq!(r.status, 415, "{path} {encoding}: {}", r.text);
        assert_eq!(r.headers.get("accept-encoding").unwrap(), "identity");
        assert_no_leak(&r);
    }
    // Identity is fine.
    let resp = http()
        .post(format!("{}/v1/auth/login", server.http_url()))
        .header("Content-Type", "application/json")
        .header("Content-Encoding", "identity")
        .body(json!({"username": "nobody", "password": "whatever1"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    // Responses are never compressed either, whatever the client accepts.
    let resp = http()
        .get(format!("{}/v1/openapi.json", server.http_url()))
        .header("Accept-Encoding", "gzip, deflate, br")
        .send()
        .await
        .unwrap();
    assert!(resp.headers().get("content-encoding").is_none());
    bystander.check(&server).await;
    server.shutdown().await;
}

/// A gzip member whose deflate stream (fixed Huffman codes) is one literal zero followed by
/// copies of length 258 at distance 1: `n` zero bytes from a few KiB. The CRC and size in the
/// trailer are left zero; nothing should ever inflate it.
fn gzip_zeros(n: usize) -> Vec<u8> {
    struct Bits {
        out: Vec<u8>,
        acc: u32,
        len: u32,
    }
    impl Bits {
        fn put(&mut self, value: u32, bits: u32) {
            self.acc |= value << self.len;
            self.len += bits;
            while self.len >= 8 {
                self.out.push(self.acc as u8);
                self.acc >>= 8;
                self.len -= 8;
            }
        }
        /// Huffman codes go most significant bit first.
        fn code(&mut self, code: u32, bits: u32) {
            let reversed = code.reverse_bits() >> (32 - bits);
            self.put(reversed, bits);
        }
    }
    let mut b = Bits {
        out: vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff],
        acc: 0,
        len: 0,
    };
    b.put(1, 1); // final block
    b.put(1, 2); // fixed Huffman
    b.code(0x30, 8); // literal 0
    for _ in 0..(n - 1) / 258 {
        b.code(0xc5, 8); // length 258 (code 285)
        b.code(0, 5); // distance 1
    }
    b.code(0, 7); // end of block (256)
    b.put(0, 7);
    b.out.extend_from_slice(&[0; 8]);
    b.out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_requests_are_cut_off_by_the_header_read_timeout() {
    let server = TestServer::start_with("[http]\nheader_read_timeout = \"1s\"\n").await;
    /// Sends `prefix`, then one byte of `drip` every 100 ms; returns how long until the server
    /// closed the connection (or answered), and what it sent.
    async fn drip(server: &TestServer, prefix: &[u8], drip: &[u8]) -> (Duration, String) {
        let mut tcp = TcpStream::connect(server.addr).await.unwrap();
        let started = Instant::now();
        tcp.write_all(prefix).await.unwrap();
        let mut got = Vec::new();
        let mut i = 0;
        loop {
            let mut buf = [0u8; 1024];
            match tokio::time::timeout(Duration::from_millis(100), tcp.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
                Err(_) => {
                    if !drip.is_empty()
                        && tcp.write_all(&drip[i % drip.len()..][..1]).await.is_err()
                    {
                        break;
                    }
                    i += 1;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(6),
                "still open after 6 s"
            );
        }
        (started.elapsed(), String::from_utf8_lossy(&got).to_string())
    }
    // Headers byte by byte, forever.
    let (took, got) = drip(
        &server,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n",
        b"X-Slow: aaaaaaaaaa\r\n",
    )
    .await;
    assert!(took < Duration::from_secs(4), "cut off after {took:?}");
    assert!(!got.contains("200 OK"), "{got}");
    // A WebSocket upgrade request, dripped the same way.
    let (took, _) = drip(
        &server,
        b"GET /connection/websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n",
        b"X-Slow: b\r\n",
    )
    .await;
    assert!(
        took < Duration::from_secs(4),
        "upgrade cut off after {took:?}"
    );
    // A connection that sends nothing at all.
    let (took, _) = drip(&server, b"", b"").await;
    assert!(
        took < Duration::from_secs(4),
        "silent connection cut off after {took:?}"
    );
    // An idle keep-alive connection after a complete request.
    let (took, got) = drip(&server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", b"").await;
    assert!(got.contains("200 OK"), "{got}");
    assert!(
        took < Duration::from_secs(4),
        "idle keep-alive cut off after {took:?}"
    );
    // A well-behaved request is served meanwhile.
    assert_eq!(
        call(&server, "GET", "/healthz", None, None).await.status,
        200
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_that_never_connect_or_authenticate_are_closed() {
    let server = TestServer::start_with(
        "[client]\nstale_timeout = \"1s\"\n[docs]\nheartbeat_interval = \"200ms\"\nidle_timeout = \"2s\"\n",
    )
    .await;
    let started = Instant::now();
    // /connection/websocket: no connect command at all, or half a frame of one.
    let (mut silent, _) = RawWs::open(server.addr, "/connection/websocket", &[], None)
        .await
        .unwrap();
    let (mut half, _) = RawWs::open(server.addr, "/connection/websocket", &[], None)
        .await
        .unwrap();
    half.send_raw(&client_frame(true, false, 1, b"{\"id\":1,\"connect\":{}}")[..5])
        .await;
    // /docs: no token is refused at once; an authorized socket that then says nothing (and
    // does not answer pings) is closed when idle.
    let (mut no_token, _) = RawWs::open(server.addr, "/docs/1", &[], None)
        .await
        .unwrap();
    assert_eq!(no_token.close_code().await, Some(4401));
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "refused at once, not when idle"
    );
    let owner = store_user(&server, "owner", UserRole::User).await;
    let r = call(
        &server,
        "POST",
        "/v1/documents",
        Some(&owner.token),
        Some(json!({"title": "quiet"})),
    )
    .await;
    let doc = r.json["document"]["id"].as_i64().unwrap();
    let (mut quiet, _) = RawWs::open(
        server.addr,
        &format!("/docs/{doc}?token={}", owner.token),
        &[],
        None,
    )
    .await
    .unwrap();

    assert_eq!(silent.close_code().await, Some(3502), "no connect");
    assert_eq!(half.close_code().await, Some(3502), "half a connect frame");
    assert_eq!(quiet.close_code().await, Some(4508), "idle document socket");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(6), "closed after {took:?}");
    // A client that connects in time is kept.
    let mut ok = RawClient::connect(&server, "prompt").await;
    ok.idle_for(Duration::from_millis(1300)).await;
    ok.close().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_responses_never_leak_internals() {
    let server = TestServer::start_with(FAST_HASH).await;
    let (me, token, _) = account(&server, "leaky", "leaky-password").await;
    let r = call(
        &server,
        "POST",
        "/v1/rooms",
        Some(&token),
        Some(json!({"kind": "private", "name": "r"})),
    )
    .await;
    let room = r.json["id"].as_i64().unwrap();
    let r = call(
        &server,
        "POST",
        "/v1/documents",
        Some(&token),
        Some(json!({"title": "d"})),
    )
    .await;
    let doc = r.json["document"]["id"].as_i64().unwrap();
    let json_ct = "application/json";
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let mut cases: Vec<(String, Resp)> = Vec::new();
    let mut add = |what: &str, r: Resp| cases.push((what.to_string(), r));

    // Malformed and mistyped bodies.
    for (what, path, body) in [
        ("not JSON", "/v1/auth/register", b"{not json".to_vec()),
        (
            "truncated",
            "/v1/auth/register",
            b"{\"username\": \"a".to_vec(),
        ),
        (
            "trailing garbage",
            "/v1/auth/login",
            b"{\"username\": \"a\", \"password\": \"b\"} x".to_vec(),
        ),
        (
            "invalid UTF-8",
            "/v1/auth/login",
            b"{\"username\": \"\xff\xfe\", \"password\": \"b\"}".to_vec(),
        ),
        ("deep nesting", "/v1/auth/login", deep.clone().into_bytes()),
        ("array for object", "/v1/auth/login", b"[1, 2, 3]".to_vec()),
        (
            "number for string",
            "/v1/auth/register",
            br#"{"username": 5, "password": "p", "display_name": "d"}"#.to_vec(),
        ),
        (
            "object for string",
            "/v1/auth/register",
            br#"{"username": {"$ne": null}, "password": "p", "display_name": "d"}"#.to_vec(),
        ),
        (
            "null for string",
            "/v1/auth/login",
            br#"{"username": null, "password": "p"}"#.to_vec(),
        ),
        (
            "missing field",
            "/v1/auth/login",
            br#"{"username": "a"}"#.to_vec(),
        ),
        (
            "unknown field",
            "/v1/auth/login",
            br#"{"username": "a", "password": "b", "admin": true}"#.to_vec(),
        ),
        ("empty body", "/v1/auth/login", Vec::new()),
    ] {
        add(what, post_raw(&server, path, None, json_ct, body).await);
    }
    for (what, path, body) in [
        (
            "unknown room kind",
            "/v1/rooms",
            json!({"kind": "secret", "name": "x"}),
        ),
        (
            "huge member id",
            "/v1/rooms",
            json!({"kind": "private", "name": "x", "members": [99999999999999999999u128 as f64]}),
        ),
        (
            "huge number literal",
            "/v1/rooms",
            json!({"kind": "private", "name": "x", "members": [1e300]}),
        ),
        (
            "negative id",
            "/v1/rooms",
            json!({"kind": "direct", "members": [-1]}),
        ),
        (
            "string for number",
            "/v1/notifications/read",
            json!({"ids": ["1"]}),
        ),
        (
            "wrong role",
            &format!("/v1/documents/{doc}/members/{me}") as &str,
            json!({"role": "god"}),
        ),
    ] {
        let method = if path.contains("/members/") {
            "PUT"
        } else {
            "POST"
        };
        add(
            what,
            call(&server, method, path, Some(&token), Some(body)).await,
        );
    }
    add(
        "huge integer literal",
        post_raw(
            &server,
            "/v1/rooms",
            Some(&token),
            json_ct,
            br#"{"kind": "private", "name": "x", "members": [123456789012345678901234567890]}"#
                .to_vec(),
        )
        .await,
    );
    add(
        "number out of range",
        post_raw(
            &server,
            "/v1/rooms",
            Some(&token),
            json_ct,
            br#"{"kind": "private", "name": "x", "members": [1e999]}"#.to_vec(),
        )
        .await,
    );
    add(
        "text/plain body",
        post_raw(
            &server,
            "/v1/auth/login",
            None,
            "text/plain",
            b"{}".to_vec(),
        )
        .await,
    );
    add(
        "bad edit body",
        post_raw(
            &server,
            &format!("/v1/documents/{doc}/updates"),
            Some(&token),
            json_ct,
            br#"{"text": 7}"#.to_vec(),
        )
        .await,
    );
    add(
        "bad binary update",
        post_raw(
            &server,
            &format!("/v1/documents/{doc}/updates"),
            Some(&token),
            "application/octet-stream",
            vec![0xff; 64],
        )
        .await,
    );
    add(
        "bad moderation body",
        post_raw(
            &server,
            "/v1/moderation/users/1/ban",
            Some(&token),
            json_ct,
            br#"{"reason": [1]}"#.to_vec(),
        )
        .await,
    );

    // Queries and paths of the wrong type or out of range.
    for path in [
        "/v1/rooms/public?limit=99999999999999999999".to_string(),
        "/v1/rooms/public?limit=-1".to_string(),
        "/v1/rooms/public?after=1.5".to_string(),
        format!("/v1/rooms/{room}/messages?before=abc"),
        "/v1/notifications?limit=1e9".to_string(),
        "/v1/users?ids=1,2,x".to_string(),
        "/v1/rooms/99999999999999999999".to_string(),
        "/v1/rooms/abc".to_string(),
        "/v1/rooms/1.5".to_string(),
        "/v1/rooms/%00".to_string(),
        "/v1/rooms/%FF%FE".to_string(),
        "/v1/documents/-0x1/content".to_string(),
        format!("/v1/documents/{doc}/versions/abc"),
        format!("/v1/documents/{doc}/content?format=exe"),
        "/v1/users/1e3/presence".to_string(),
    ] {
        let r = call(&server, "GET", &path, Some(&token), None).await;
        assert_eq!(r.status, 400, "{path}: {}", r.text);
        add(&path, r);
    }
    // Unknown ids and routes.
    for path in [
        "/v1/rooms/999999",
        "/v1/rooms/999999/messages",
        "/v1/documents/999999",
        "/v1/documents/999999/versions/1",
        "/v1/users/999999/presence",
        "/v1/nope",
    ] {
        let r = call(&server, "GET", path, Some(&token), None).await;
        assert_eq!(r.status, 404, "{path}: {}", r.text);
        add(path, r);
    }
    // Constraint violations: a taken username (raced, so the unique index decides), a member
    // who does not exist (foreign key), a duplicate membership.
    let racers = join_all((0..6).map(|_| {
        call(
            &server,
            "POST",
            "/v1/auth/register",
            None,
            Some(json!({"username": "twin", "password": "twin-password", "display_name": "Twin"})),
        )
    }))
    .await;
    assert_eq!(racers.iter().filter(|r| r.status == 201).count(), 1);
    for r in racers.into_iter().filter(|r| r.status != 201) {
        assert_eq!(r.status, 409, "{}", r.text);
        add("taken username", r);
    }
    let r = call(
        &server,
        "PUT",
        &format!("/v1/documents/{doc}/members/999999"),
        Some(&token),
        Some(json!({"role": "viewer"})),
    )
    .await;
    assert!(r.status == 404 || r.status == 400, "{}", r.text);
    add("share with a user who does not exist", r);
    let r = call(
        &server,
        "POST",
        &format!("/v1/rooms/{room}/invite"),
        Some(&token),
        Some(json!({"user_id": 999999})),
    )
    .await;
    assert!(r.status == 404 || r.status == 400, "{}", r.text);
    add("invite a user who does not exist", r);
    let r = call(
        &server,
        "POST",
        &format!("/v1/rooms/{room}/invite"),
        Some(&token),
        Some(json!({"user_id": me})),
    )
    .await;
    assert!((400..500).contains(&r.status), "{}", r.text);
    add("invite a member again", r);
    let r = call(
        &server,
        "POST",
        "/v1/rooms",
        Some(&token),
        Some(json!({"kind": "private", "name": "nul\u{0}name"})),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text);
    add("NUL in a name", r);

    // The server API.
    for (what, method, body) in [
        ("api: not JSON", "publish", b"{oops".to_vec()),
        (
            "api: wrong shape",
            "publish",
            br#"{"channel": 5, "data": {}}"#.to_vec(),
        ),
        (
            "api: huge limit",
            "history",
            br#"{"channel": "x", "limit": 1e400}"#.to_vec(),
        ),
        ("api: unknown method", "drop_tables", b"{}".to_vec()),
    ] {
        let resp = http()
            .post(format!("{}/api/{method}", server.http_url()))
            .header("X-API-Key", &server.api_key)
            .body(body)
            .send()
            .await
            .unwrap();
        add(what, into_resp(resp).await);
    }
    let resp = http()
        .post(format!("{}/api/publish", server.http_url()))
        .header("X-API-Key", "' OR '1'='1")
        .body("{}")
        .send()
        .await
        .unwrap();
    let r = into_resp(resp).await;
    assert_eq!(r.status, 401);
    add("api: wrong key", r);

    for (what, r) in &cases {
        assert!(
            r.status >= 400 || r.json["error"].is_object(),
            "{what}: {} {}",
            r.status,
            r.text
        );
        assert_ne!(r.status, 500, "{what}: {}", r.text);
        assert_no_leak(r);
        if r.status >= 400 && !what.starts_with("api") && what != "/v1/nope" {
            let msg = r.json["error"]["message"].as_str();
            assert!(
                msg.is_some_and(|m| !m.is_empty()),
                "{what}: not the JSON error shape: {}",
                r.text
            );
        }
    }
    // Messages still say what is wrong, in the API's words.
    let say = |what: &str| {
        cases
            .iter()
            .find(|(w, _)| w == what)
            .map(|(_, r)| {
                r.json["error"]["message"]
                    .as_str()
                    .unwrap_or("")
                    .to_string()
            })
            .unwrap()
    };
    assert!(
        say("missing field").contains("missing field `password`"),
        "{}",
        say("missing field")
    );
    assert!(
        say("unknown field").contains("unknown field `admin`"),
        "{}",
        say("unknown field")
    );
    assert!(
        say("number for string").contains("`username`"),
        "{}",
        say("number for string")
    );
    assert!(
        say("unknown room kind").contains("`secret`"),
        "{}",
        say("unknown room kind")
    );
    assert!(
        say("not JSON").contains("not valid JSON"),
        "{}",
        say("not JSON")
    );
    assert!(
        say("/v1/rooms/abc").contains("path"),
        "{}",
        say("/v1/rooms/abc")
    );
    assert!(
        say("/v1/rooms/public?limit=-1").contains("`limit`"),
        "{}",
        say("/v1/rooms/public?limit=-1")
    );

    // Over the socket: malformed commands get protocol codes, never text.
    let mut c = common::connect(&server, &token).await;
    for (cmd, code) in [
        (
            json!({"rpc": {"method": "chat.send", "data": {"room": "x"}}}),
            107,
        ),
        (
            json!({"rpc": {"method": "chat.send", "data": {"room": 999999, "text": "x"}}}),
            102,
        ),
        (
            json!({"rpc": {"method": "chat.read", "data": {"room": room, "offset": 1e300}}}),
            107,
        ),
        (json!({"rpc": {"method": "no.such.method"}}), 104),
        (
            json!({"history": {"channel": format!("chat:{room}"), "limit": 5, "since": {"offset": 99999999, "epoch": "x"}}}),
            112,
        ),
    ] {
        let r = c.call(cmd.clone()).await;
        assert_eq!(r["error"]["code"], code, "{cmd}: {r}");
        assert_no_leak(&Resp {
            status: 200,
            json: r.clone(),
            text: r.to_string(),
            headers: Default::default(),
        });
    }
    c.close().await;

    // Internal failures: with the database gone, answers are generic and retryable.
    server.node().store.close().await;
    let r = call(&server, "GET", "/v1/users/me", Some(&token), None).await;
    assert!(
        r.status == 503 || r.status == 500,
        "{} {}",
        r.status,
        r.text
    );
    assert_no_leak(&r);
    let r = call(
        &server,
        "GET",
        &format!("/v1/rooms/{room}/messages"),
        Some(&token),
        None,
    )
    .await;
    assert!(
        r.status == 503 || r.status == 500,
        "{} {}",
        r.status,
        r.text
    );
    assert_no_leak(&r);
    let r = call(
        &server,
        "POST",
        "/v1/auth/login",
        None,
        Some(json!({"username": "leaky", "password": "leaky-password"})),
    )
    .await;
    assert!(
        r.status == 503 || r.status == 500,
        "{} {}",
        r.status,
        r.text
    );
    assert_no_leak(&r);
    let mut c = RawClient::open(&server).await;
    let r = c.call(json!({"connect": {"token": token}})).await;
    if r.get("connect").is_some() {
        let r = c
            .call(json!({"history": {"channel": format!("chat:{room}"), "limit": 5}}))
            .await;
        assert!(
            r["error"]["code"] == 100 || r["error"]["code"] == 103,
            "{r}"
        );
        assert_no_leak(&Resp {
            status: 200,
            json: r.clone(),
            text: r.to_string(),
            headers: Default::default(),
        });
    }
    // Dropped, not shut down: there is no database to flush to.
    drop(server);
}
