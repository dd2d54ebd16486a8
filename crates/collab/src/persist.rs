//! The persistence worker: one task per node that writes every document's new updates to the
//! store, in batches.
//!
//! Every `persist_interval` (50 ms by default; at most 100 ms is allowed by the config) it
//! takes the persistence outbox of every document that changed, merges each document's
//! updates into one, and appends them all in ONE transaction (group commit). So an update a
//! client sent is durable within about one interval plus one commit. If the write fails (the
//! database is down), the updates go back to the front of their outboxes and are retried at
//! the next interval: nothing is dropped, and the documents stay live in memory meanwhile.
//! On shutdown it writes whatever is left before it exits.
//!
//! After a write, a document whose log has grown past `compact_bytes` or `compact_updates`
//! is compacted: its whole state is written as the snapshot and the log entries it covers
//! are deleted, in one transaction (`Store::compact_document`), on a task of its own.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use switchboard_store::NewDocUpdate;

use crate::doc::Document;
use crate::Inner;

/// Runs until shutdown, then flushes once more.
pub(crate) async fn run(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(inner.config.persist_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = inner.shutdown.cancelled() => break,
            _ = tick.tick() => { flush(&inner).await; }
        }
    }
    // Connections are closing; whatever they sent last is written now.
    for _ in 0..3 {
        if flush(&inner).await {
            break;
        }
    }
}

/// Writes every pending update once. Returns true when nothing was left unwritten.
pub(crate) async fn flush(inner: &Arc<Inner>) -> bool {
    let _serial = inner.flush_lock.lock().await;
    let dirty: Vec<Arc<Document>> = inner.dirty_docs();
    if dirty.is_empty() {
        return true;
    }
    let mut docs = Vec::with_capacity(dirty.len());
    let mut batch = Vec::with_capacity(dirty.len());
    for doc in dirty {
        if let Some(update) = doc.take_unpersisted() {
            batch.push(NewDocUpdate {
                doc_id: doc.id,
                data: update,
            });
            docs.push(doc);
        }
    }
    if batch.is_empty() {
        return true;
    }
    let started = Instant::now();
    let sizes: Vec<usize> = batch.iter().map(|u| u.data.len()).collect();
    let datas: Vec<Vec<u8>> = batch.iter().map(|u| u.data.clone()).collect();
    match inner.store.append_doc_updates(batch).await {
        Ok(seqs) => {
            inner
                .metrics
                .persist_seconds
                .observe(started.elapsed().as_secs_f64());
            inner.metrics.persisted.inc_by(seqs.len() as u64);
            let mut compact = Vec::new();
            for ((doc, seq), size) in docs.iter().zip(seqs).zip(sizes) {
                // `None`: the document was deleted meanwhile; its updates are moot.
                let Some(seq) = seq else { continue };
                let mut st = doc.lock();
                st.last_seq = st.last_seq.max(seq);
                st.log_entries += 1;
                st.log_bytes += size;
                if !st.compacting
                    && (st.log_bytes >= inner.config.compact_bytes
                        || st.log_entries >= inner.config.compact_updates)
                {
                    st.compacting = true;
                    compact.push(doc.clone());
                }
            }
            for doc in compact {
                let inner2 = inner.clone();
                inner
                    .tasks
                    .spawn(async move { compact_one(&inner2, &doc).await });
            }
            true
        }
        Err(e) => {
            inner.metrics.persist_errors.inc();
            tracing::warn!(error = %e, docs = docs.len(), "writing document updates failed; retrying");
            for (doc, data) in docs.iter().zip(datas) {
                doc.restore_unpersisted(data);
                inner.mark_dirty(doc);
            }
            false
        }
    }
}

/// Replaces a document's log with a snapshot of its current state.
async fn compact_one(inner: &Arc<Inner>, doc: &Arc<Document>) {
    // The snapshot covers every stored entry up to `through`, and more (updates still in the
    // outbox are in the state too; appending them later is harmless, updates are idempotent).
    let (snapshot, through) = {
        let through = doc.lock().last_seq;
        (doc.state_update(), through)
    };
    let size = snapshot.len();
    let result = inner
        .store
        .compact_document(doc.id, snapshot, through)
        .await;
    let mut st = doc.lock();
    st.compacting = false;
    match result {
        Ok(()) => {
            st.log_entries = 0;
            st.log_bytes = 0;
            inner.metrics.compactions.inc();
            tracing::debug!(doc = doc.id, through, size, "document compacted");
        }
        Err(e) => tracing::warn!(doc = doc.id, error = %e, "compaction failed; will retry"),
    }
}

/// The dirty set: documents with something in their persistence outbox. Bounded by the
/// number of loaded documents (one entry each).
#[derive(Default)]
pub(crate) struct Dirty(std::sync::Mutex<HashMap<i64, Arc<Document>>>);

impl Dirty {
    pub fn mark(&self, doc: &Arc<Document>) {
        self.0
            .lock()
            .expect("dirty lock poisoned")
            .entry(doc.id)
            .or_insert_with(|| doc.clone());
    }

    pub fn take(&self) -> Vec<Arc<Document>> {
        std::mem::take(&mut *self.0.lock().expect("dirty lock poisoned"))
            .into_values()
            .collect()
    }
}
