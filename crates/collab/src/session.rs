//! One client's y-websocket session on a document: what it may do, and what each of its
//! messages does. The transport feeds it frames ([`DocConnection::handle`]) and ends it by
//! dropping it, which removes the connection and its awareness states from the document.

use std::sync::Arc;
use std::time::Instant;

use crate::codec::{self, CloseCode, Incoming};
use crate::doc::{ApplyError, ConnEntry, DocSink, Document, Outgoing};
use crate::Inner;

/// What a connection may do with a document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read and write (owners and editors).
    Edit,
    /// Receive updates and awareness; writes are refused (viewers). Viewers still share
    /// awareness, so others see their cursors.
    View,
}

/// The reason viewers are given when a write is refused.
const READ_ONLY: &str = "read-only: you may view this document but not edit it";

/// A token bucket: `rate` per second, up to `burst` at once.
struct Bucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u32, burst: u32) -> Bucket {
        Bucket {
            tokens: burst as f64,
            rate: rate as f64,
            burst: burst as f64,
            at: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A connection with a document open. Dropping it leaves the document.
pub struct DocConnection {
    inner: Arc<Inner>,
    doc: Arc<Document>,
    id: u64,
    access: Access,
    sink: Arc<dyn DocSink>,
    /// Awareness client ids this connection introduced.
    owned: Vec<u64>,
    awareness_bucket: Bucket,
    /// Whether the viewer was already told its writes are refused.
    told_read_only: bool,
}

impl DocConnection {
    pub(crate) fn join(
        inner: Arc<Inner>,
        doc: Arc<Document>,
        id: u64,
        user: Arc<str>,
        access: Access,
        sink: Arc<dyn DocSink>,
    ) -> Option<DocConnection> {
        let entry = ConnEntry {
            id,
            user,
            sink: sink.clone(),
        };
        if !doc.join(entry) {
            return None;
        }
        inner.metrics.connections.inc();
        let cfg = &inner.config;
        Some(DocConnection {
            awareness_bucket: Bucket::new(cfg.awareness_rate, cfg.awareness_burst),
            inner,
            doc,
            id,
            access,
            sink,
            owned: Vec::new(),
            told_read_only: false,
        })
    }

    pub fn doc_id(&self) -> i64 {
        self.doc.id
    }

    pub fn access(&self) -> Access {
        self.access
    }

    /// Handles one binary frame from the client. An error is the code to close with; the
    /// document is untouched by the refused frame.
    pub fn handle(&mut self, frame: &[u8]) -> Result<(), CloseCode> {
        let max = self.inner.config.max_update_bytes;
        let msg = codec::decode(frame, max).map_err(|r| r.close_code())?;
        let incremental = matches!(msg, Incoming::Update(_));
        match msg {
            Incoming::SyncStep1(sv) => {
                self.sink.send(&self.doc.step2(&sv));
                Ok(())
            }
            Incoming::SyncStep2(update) | Incoming::Update(update) => {
                if self.access == Access::View {
                    // A viewer's step 2 is normally empty (it has nothing we lack); anything
                    // else is a write, refused: not applied, stored or relayed.
                    if !update.is_empty() && !self.told_read_only {
                        self.told_read_only = true;
                        self.sink
                            .send(&Outgoing::new(codec::permission_denied(READ_ONLY)));
                    }
                    return Ok(());
                }
                match self.doc.apply(update, false) {
                    Ok(applied) => {
                        if applied.changed {
                            self.inner.metrics.updates.inc();
                            self.inner.mark_dirty(&self.doc);
                            self.doc.fan_out_or_schedule(self.inner.config.max_tick);
                        }
                        if applied.cut && incremental {
                            // The client built on content we lack (it reached the client
                            // some other way): our step 1 makes it send all we lack. Not
                            // after a step 2, which already was that answer: no ping-pong.
                            self.sink.send(&self.doc.step1());
                        }
                        Ok(())
                    }
                    Err(ApplyError::Invalid | ApplyError::Gap) => Err(codec::CLOSE_MALFORMED),
                    Err(ApplyError::Closed) => Err(codec::CLOSE_UNAVAILABLE),
                }
            }
            Incoming::Awareness(update) => {
                if !self.awareness_bucket.take() {
                    return Err(codec::CLOSE_FLOOD);
                }
                let cfg = &self.inner.config;
                self.doc.awareness(
                    self.id,
                    &mut self.owned,
                    update,
                    cfg.max_awareness_clients,
                    cfg.max_awareness_state_bytes,
                )
            }
            Incoming::QueryAwareness => {
                self.sink.send(&self.doc.awareness_states());
                Ok(())
            }
            Incoming::Auth => Ok(()),
        }
    }

    /// Sends the heartbeat (an empty awareness message) that keeps a quiet client's
    /// silence watchdog from reconnecting.
    pub fn heartbeat(&self) {
        self.sink
            .send(&Outgoing::new(codec::awareness(std::iter::empty())));
    }
}

impl Drop for DocConnection {
    fn drop(&mut self) {
        self.doc.leave(self.id);
        self.inner.metrics.connections.dec();
    }
}
