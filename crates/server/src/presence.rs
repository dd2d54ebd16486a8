//! Per-user presence: a user is **online** while it has at least one connection on this node
//! (`Node::users`), and its **last_seen** is stored when its last connection closes.
//!
//! Closing a connection must stay fast, so `Node::remove_client` only hands `(user, now)` to
//! [`LastSeen::offline`]: a non-blocking `try_send` on a bounded queue ([`QUEUE`]). One task
//! takes what is waiting (up to [`BATCH`]), keeps the newest time per user, and writes them in
//! one transaction (`Store::set_last_seen`, which never moves a time backward).
//!
//! **Overflow policy:** a full queue drops the update (counted, logged at each power of two):
//! that user's `last_seen` stays at its previous value. **Shutdown:** the task keeps draining
//! for a short grace ([`SHUTDOWN_IDLE`] without news, [`SHUTDOWN_MAX`] at most) so the
//! connections closed by the shutdown itself are recorded, then stops (the store is closed
//! after every task ended).
//!
//! Scope: "online" is per node. With several nodes, a client that wants cluster-wide presence
//! uses Centrifugo presence on the rooms it shares (`chat:{room}`), which the broker keeps.
//! Presence changes are not pushed to rooms: clients read `GET /v1/users/{id}/presence`
//! (and the rooms' presence) instead.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use switchboard_store::{now_ms, Store};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Offline events waiting to be written; beyond, they are dropped.
pub const QUEUE: usize = 16_384;
/// Offline events written per transaction at most.
pub const BATCH: usize = 1024;
/// After shutdown: stop once nothing arrived for this long...
pub const SHUTDOWN_IDLE: Duration = Duration::from_millis(250);
/// ...or after this long in any case.
pub const SHUTDOWN_MAX: Duration = Duration::from_secs(2);

/// The connections' end of the last_seen writer. Never blocks.
pub struct LastSeen {
    tx: mpsc::Sender<(i64, i64)>,
    dropped: AtomicU64,
}

impl LastSeen {
    /// Starts the writer task on `tasks`.
    pub fn start(
        store: Arc<dyn Store>,
        tasks: &TaskTracker,
        shutdown: CancellationToken,
    ) -> LastSeen {
        let (tx, rx) = mpsc::channel(QUEUE);
        tasks.spawn(run(store, rx, shutdown));
        LastSeen {
            tx,
            dropped: AtomicU64::new(0),
        }
    }

    /// The last connection of `user` closed now. Users that are not store ids (app tokens
    /// with another `sub`) are ignored.
    pub fn offline(&self, user: &str) {
        let Ok(id) = user.parse::<i64>() else {
            return;
        };
        match self.tx.try_send((id, now_ms())) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(dropped = n, "last_seen queue full: updates dropped");
                }
            }
        }
    }
}

async fn run(
    store: Arc<dyn Store>,
    mut rx: mpsc::Receiver<(i64, i64)>,
    shutdown: CancellationToken,
) {
    let mut buf = Vec::with_capacity(BATCH);
    loop {
        let n = tokio::select! {
            n = rx.recv_many(&mut buf, BATCH) => n,
            _ = shutdown.cancelled() => break,
        };
        if n == 0 {
            return;
        }
        write(&store, &mut buf).await;
    }
    // Shutting down: record the connections the shutdown is closing, briefly.
    let deadline = tokio::time::Instant::now() + SHUTDOWN_MAX;
    loop {
        let wait =
            SHUTDOWN_IDLE.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
        match tokio::time::timeout(wait, rx.recv_many(&mut buf, BATCH)).await {
            Ok(n) if n > 0 => write(&store, &mut buf).await,
            _ => break,
        }
    }
    tracing::debug!("last_seen writer stopped");
}

async fn write(store: &Arc<dyn Store>, buf: &mut Vec<(i64, i64)>) {
    let mut newest: HashMap<i64, i64> = HashMap::with_capacity(buf.len());
    for (user, at) in buf.drain(..) {
        let e = newest.entry(user).or_insert(at);
        *e = (*e).max(at);
    }
    if let Err(e) = store.set_last_seen(newest.into_iter().collect()).await {
        tracing::warn!(error = %e, "last_seen: store write failed");
    }
}
