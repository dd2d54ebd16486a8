//! The broker restarts mid-stream: the real Redis (which keeps nothing on disk, so its history
//! is lost) and the real NATS (JetStream on disk, so history survives) are restarted with the
//! commands the machine starts them with, while publications flow between two nodes.
//!
//! The subscriber here is a raw client doing what the SDKs do (resubscribe with recovery on
//! an unsubscribe push with code >= 2500), so that every frame can be checked: a client sees
//! every publication once, in order, or is told `recovered: false` with a new epoch; never a
//! silent gap.
//!
//! This is its own test binary because it restarts services other tests use; the two tests
//! run one after the other (a lock), and cargo runs test binaries one at a time.

mod common;

use std::time::{Duration, Instant};

use common::cluster::{nats_url, redis_url, Cluster};
use common::{Event, RawClient};
use serde_json::{json, Value};
use tokio::process::Command;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What the subscriber saw.
#[derive(Default, Debug)]
struct Seen {
    /// (epoch, offset) of every publication, in arrival order.
    pubs: Vec<(String, u64)>,
    /// Results of resubscribes: (recovered, epoch).
    resubscribes: Vec<(bool, String)>,
}

/// Reads `channel` until `until` (an instant), resubscribing like an SDK when told to.
async fn follow(c: &mut RawClient, channel: &str, mut epoch: String, until: Instant) -> Seen {
    let mut seen = Seen::default();
    let mut offset = 0u64;
    while Instant::now() < until {
        let Ok(ev) = tokio::time::timeout(Duration::from_millis(500), c.next_event()).await else {
            continue;
        };
        let Event::Msg(m) = ev else {
            panic!("the subscriber's connection ended: {ev:?}");
        };
        let push = &m["push"];
        if push["channel"] != channel {
            continue;
        }
        if let Some(p) = push.get("pub") {
            let o = p["offset"].as_u64().unwrap();
            assert_eq!(
                o,
                offset + 1,
                "a silent gap or duplicate in epoch {epoch}: {:?}",
                seen.pubs.last()
            );
            offset = o;
            seen.pubs.push((epoch.clone(), o));
        } else if let Some(u) = push.get("unsubscribe") {
            let code = u["code"].as_u64().unwrap_or(0);
            assert!(code >= 2500, "unsubscribed for good: {m}");
            // The SDK resubscribes, recovering from its position.
            let r = c
                .call(json!({"subscribe": {"channel": channel, "recover": true, "offset": offset, "epoch": epoch}}))
                .await;
            let res = &r["subscribe"];
            assert!(res.is_object(), "resubscribe: {r}");
            let recovered = res["recovered"].as_bool().unwrap_or(false);
            let new_epoch = res["epoch"].as_str().unwrap_or_default().to_string();
            if recovered {
                assert_eq!(new_epoch, epoch, "recovered within the same epoch");
                for p in res["publications"].as_array().cloned().unwrap_or_default() {
                    let o = p["offset"].as_u64().unwrap();
                    assert_eq!(o, offset + 1, "recovered publications are contiguous");
                    offset = o;
                    seen.pubs.push((epoch.clone(), o));
                }
            } else {
                assert_ne!(
                    new_epoch, epoch,
                    "recovered: false only when the stream's history is gone (a new epoch)"
                );
                epoch = new_epoch;
                offset = res["offset"].as_u64().unwrap_or(0);
            }
            seen.resubscribes.push((recovered, epoch.clone()));
        }
    }
    seen
}

async fn restart(service: &str) {
    let script = match service {
        "redis" => {
            "redis-cli -h 127.0.0.1 -p 6379 shutdown nosave >/dev/null 2>&1; sleep 1; \
             redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save '' \
             --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log"
        }
        _ => {
            "pkill -x nats-server; sleep 1; start-stop-daemon --start --oknodo --background \
             --exec /usr/sbin/nats-server -- -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server \
             -l /var/log/nats-server.log"
        }
    };
    let status = Command::new("sh")
        .arg("-c")
        .arg(script)
        .status()
        .await
        .expect("run the restart command");
    assert!(status.success(), "restarting {service} failed");
    let url = if service == "redis" {
        "127.0.0.1:6379"
    } else {
        "127.0.0.1:4222"
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while tokio::net::TcpStream::connect(url).await.is_err() {
        assert!(Instant::now() < deadline, "{service} did not come back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn broker_restart(service: &str, broker: &str) -> Option<Seen> {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start(broker, 2).await?;
    let mut sub = cluster.client(0, "reader").await;
    let r = sub
        .call(json!({"subscribe": {"channel": "feed:live"}}))
        .await;
    let epoch = r["subscribe"]["epoch"]
        .as_str()
        .unwrap_or_default()
        .to_string();

    // A publisher on node1, through the server API, for the whole test; failures while the
    // broker is down are expected and counted.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = {
        let stop = stop.clone();
        let url = format!("{}/api/publish", cluster.http(1));
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, 0u32);
            let http = common::http();
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = http
                    .post(&url)
                    .header("X-API-Key", common::cluster::API_KEY)
                    .json(&json!({"channel": "feed:live", "data": {"n": n}}))
                    .timeout(Duration::from_secs(5))
                    .send()
                    .await;
                let body: Option<Value> = match r {
                    Ok(r) => r.json().await.ok(),
                    Err(_) => None,
                };
                if body.is_some_and(|b| b.get("error").is_none()) {
                    ok += 1;
                } else {
                    failed += 1;
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (ok, failed)
        })
    };
    let follow_until = Instant::now() + Duration::from_secs(12);
    let following = follow(&mut sub, "feed:live", epoch, follow_until);
    let restarting = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        restart(service).await;
    };
    let (seen, ()) = tokio::join!(following, restarting);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = publisher.await.unwrap();
    eprintln!(
        "{service}: {ok} publishes acknowledged, {failed} refused; subscriber saw {} publications, resubscribes {:?}",
        seen.pubs.len(),
        seen.resubscribes
    );
    assert!(ok > 100, "publishing went on around the restart");
    // After the restart the nodes are back: publications made then arrive.
    let last_epoch = seen.pubs.last().map(|p| p.0.clone());
    let late = seen
        .pubs
        .iter()
        .rev()
        .take_while(|p| Some(&p.0) == last_epoch.as_ref())
        .count();
    assert!(late > 50, "deliveries resumed after the restart: {seen:?}");
    drop(cluster);
    Some(seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_gives_a_new_epoch_and_recovered_false_never_a_gap() {
    let Some(seen) = broker_restart("redis", &redis_url()).await else {
        return;
    };
    // Redis keeps nothing on disk: the stream is gone, so the client must have been told.
    assert!(
        seen.resubscribes.iter().any(|(recovered, _)| !recovered),
        "the lost history was reported as recovered: false: {:?}",
        seen.resubscribes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_recovers_from_jetstream_never_a_gap() {
    let Some(seen) = broker_restart("nats", &nats_url()).await else {
        return;
    };
    // JetStream keeps the history on disk: whatever was missed is recovered in the same
    // epoch (follow() checked contiguity of every publication).
    assert!(
        seen.resubscribes.iter().all(|(recovered, _)| *recovered),
        "history survived the restart, so recovery succeeds: {:?}",
        seen.resubscribes
    );
}
