//! Runs both scenarios against a small in-process mock of the Centrifugo JSON protocol. The
//! mock checks tokens, answers `connect`, `subscribe` and `publish`, sends a ping after
//! connecting, and joins queued pushes with `\n` into one frame, as the real server may.
//! These tests check the bench itself, so they do not need the real server.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{DecodingKey, Validation};
use switchboard_bench::{conns, fanout, ConnsArgs, FanoutArgs, Target};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "mock-secret";

#[derive(Default)]
struct Counters {
    connects: AtomicUsize,
    pongs: AtomicUsize,
    publishes: AtomicUsize,
}

async fn start_mock() -> (String, Arc<Counters>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "ws://{}/connection/websocket",
        listener.local_addr().unwrap()
    );
    let counters = Arc::new(Counters::default());
    let (pubs, _) = broadcast::channel::<Arc<String>>(4096);
    let c = counters.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(serve(stream, c.clone(), pubs.clone()));
        }
    });
    (url, counters)
}

async fn serve(
    stream: tokio::net::TcpStream,
    c: Arc<Counters>,
    pubs: broadcast::Sender<Arc<String>>,
) {
    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    let mut sub: Option<broadcast::Receiver<Arc<String>>> = None;
    let mut offset = 0u64;
    loop {
        tokio::select! {
            msg = ws.next() => {
                let Some(Ok(Message::Text(text))) = msg else { return };
                let mut out = Vec::new();
                for line in text.as_str().split('\n').filter(|l| !l.is_empty()) {
                    let cmd: serde_json::Value = serde_json::from_str(line).unwrap();
                    let id = cmd["id"].as_u64().unwrap_or(0);
                    if let Some(connect) = cmd.get("connect") {
                        let token = connect["token"].as_str().unwrap();
                        let Ok(claims) = jsonwebtoken::decode::<serde_json::Value>(
                            token,
                            &DecodingKey::from_secret(SECRET.as_bytes()),
                            &Validation::new(jsonwebtoken::Algorithm::HS256),
                        ) else {
                            let _ = ws.close(Some(CloseFrame { code: CloseCode::from(3500), reason: "invalid token".into() })).await;
                            return;
                        };
                        let claims = claims.claims;
                        assert!(claims["sub"].as_str().unwrap().starts_with("bench-"));
                        c.connects.fetch_add(1, Ordering::Relaxed);
                        out.push(format!(r#"{{"id":{id},"connect":{{"client":"c","version":"mock","ping":25,"pong":true}}}}"#));
                        out.push("{}".to_string());
                    } else if let Some(s) = cmd.get("subscribe") {
                        assert_eq!(s["channel"], "bench");
                        sub = Some(pubs.subscribe());
                        out.push(format!(r#"{{"id":{id},"subscribe":{{"delta":false}}}}"#));
                    } else if let Some(p) = cmd.get("publish") {
                        c.publishes.fetch_add(1, Ordering::Relaxed);
                        offset += 1;
                        let push = format!(
                            r#"{{"push":{{"channel":{},"pub":{{"offset":{offset},"data":{}}}}}}}"#,
                            p["channel"], p["data"]
                        );
                        let _ = pubs.send(Arc::new(push));
                        out.push(format!(r#"{{"id":{id},"publish":{{}}}}"#));
                    } else {
                        c.pongs.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if !out.is_empty() && ws.send(Message::text(out.join("\n"))).await.is_err() {
                    return;
                }
            }
            push = recv(&mut sub) => {
                let mut frame = push.to_string();
                while let Some(Ok(more)) = sub.as_mut().map(|s| s.try_recv()) {
                    frame.push('\n');
                    frame.push_str(&more);
                }
                if ws.send(Message::text(frame)).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn recv(sub: &mut Option<broadcast::Receiver<Arc<String>>>) -> Arc<String> {
    match sub {
        Some(rx) => rx.recv().await.expect("mock subscriber lagged"),
        None => std::future::pending().await,
    }
}

fn target(url: String) -> Target {
    Target {
        url,
        secret: SECRET.into(),
        server_pid: Some(std::process::id()),
        sources: 4,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conns_against_mock() {
    let (url, counters) = start_mock().await;
    let report = conns::run(ConnsArgs {
        target: target(url),
        n: 300,
        hold: Duration::from_millis(200),
        concurrency: 50,
    })
    .await
    .unwrap();
    assert_eq!(
        (report.connected, report.failed, report.dropped),
        (300, 0, 0),
        "{report:?}"
    );
    assert!(report.server_rss_after_kb.is_some() && report.rss_per_conn_bytes.is_some());
    assert_eq!(counters.connects.load(Ordering::Relaxed), 300);
    assert_eq!(counters.pongs.load(Ordering::Relaxed), 300);
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["bench"], "conns");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_against_mock() {
    let (url, counters) = start_mock().await;
    let report = fanout::run(FanoutArgs {
        target: target(url),
        subs: 20,
        rate: 500,
        size: 200,
        duration: Duration::from_secs(1),
        warmup: Duration::from_millis(200),
        channel: "bench".into(),
        concurrency: 8,
        stalled: 0,
        publish_url: None,
    })
    .await
    .unwrap();
    assert_eq!(report.subscribed, 20, "{report:?}");
    assert!((450..=550).contains(&report.published), "{report:?}");
    assert_eq!(report.expected_deliveries, report.published * 20);
    assert_eq!(report.deliveries, report.expected_deliveries, "{report:?}");
    assert_eq!(report.loss, 0.0);
    assert_eq!(
        (report.disconnected, report.publish_errors),
        (0, 0),
        "{report:?}"
    );
    let lat = report.latency_ms.unwrap();
    assert!(
        lat.p50 > 0.0 && lat.p50 <= lat.p99 && lat.p99 <= lat.max,
        "{lat:?}"
    );
    assert!(report.server_cpu_s.is_some() && report.bench_cpu_s.is_some());
    // Warm-up publishes were sent too, but are not counted.
    assert!(counters.publishes.load(Ordering::Relaxed) as u64 > report.published);
    // The mock subscribers (connections 0..20) answered the ping sent after connect.
    assert!(counters.pongs.load(Ordering::Relaxed) >= 21);
}

#[tokio::test]
async fn bad_secret_is_reported_per_connection() {
    let (url, _) = start_mock().await;
    let mut t = target(url);
    t.secret = "wrong".into();
    // The mock closes with 3500 on a bad token: every attempt fails and says why.
    let report = conns::run(ConnsArgs {
        target: t,
        n: 3,
        hold: Duration::ZERO,
        concurrency: 3,
    })
    .await
    .unwrap();
    assert_eq!((report.connected, report.failed), (0, 3));
    assert!(report.errors[0].contains("3500"), "{:?}", report.errors);
}
