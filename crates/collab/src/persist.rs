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
//!
//! Only local changes are written here: updates relayed from other nodes were stored by the
//! node that accepted them. Several nodes therefore append to one document's log, and a
//! compaction merges what is stored with what is in memory (see [`compact_one`]). Each node
//! counts only its own appends towards `compact_updates`/`compact_bytes`, so with N nodes
//! writing, a log may grow to about N times those before one of them compacts it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use switchboard_store::{DocContent, NewDocUpdate};
use yrs::{ReadTxn, StateVector, Transact};

use crate::codec;
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
                if seq.is_none() {
                    continue;
                }
                let mut st = doc.lock();
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

/// Replaces a document's log with a snapshot.
///
/// Why it reads the log first: other nodes append to the same log, so this node's memory
/// may lack an entry another node stored (its relay message is still on the way, or was
/// lost). A snapshot of memory alone, with `through` = this node's last seq, would delete
/// that entry for good. So the snapshot is the merge of the stored snapshot and log, as read
/// now, with the in-memory state, and `through` is the highest seq actually read: every
/// entry deleted is in the snapshot. It is done on a single node too, where a node's
/// predecessor may still be flushing into the log during a restart. The cost is one read of
/// the log (at most about `compact_bytes`) and one merge on the blocking pool per
/// compaction, which happens once per `compact_updates` writes: rare next to the writes.
async fn compact_one(inner: &Arc<Inner>, doc: &Arc<Document>) {
    let result = compact(inner, doc).await;
    let mut st = doc.lock();
    st.compacting = false;
    match result {
        Ok(done) => {
            st.log_entries = 0;
            st.log_bytes = 0;
            if let Some((through, size)) = done {
                inner.metrics.compactions.inc();
                tracing::debug!(doc = doc.id, through, size, "document compacted");
            }
        }
        Err(e) => tracing::warn!(doc = doc.id, error = %e, "compaction failed; will retry"),
    }
}

/// The compaction itself: `None` when there was nothing to compact (another node just did,
/// or the document is gone).
async fn compact(inner: &Arc<Inner>, doc: &Arc<Document>) -> Result<Option<(i64, usize)>, String> {
    let content = inner
        .store
        .load_document(doc.id)
        .await
        .map_err(|e| e.to_string())?;
    let Some(content) = content else {
        return Ok(None);
    };
    let Some(through) = content.updates.last().map(|u| u.seq) else {
        return Ok(None);
    };
    // Updates still in the persistence outbox are in memory too; appending them later is
    // harmless (updates are idempotent).
    let Some(memory) = doc.state_update() else {
        return Err("the document closed".into());
    };
    let doc_id = doc.id;
    let snapshot = tokio::task::spawn_blocking(move || merged_state(doc_id, &memory, &content))
        .await
        .map_err(|e| format!("merging panicked: {e}"))?;
    let size = snapshot.len();
    inner
        .store
        .compact_document(doc_id, snapshot, through)
        .await
        .map_err(|e| e.to_string())?;
    Ok(Some((through, size)))
}

/// One state from the in-memory state and the stored snapshot and log. Stored bytes that
/// do not apply are skipped, loudly, as when loading.
fn merged_state(doc_id: i64, memory: &[u8], stored: &DocContent) -> Vec<u8> {
    let doc = yrs::Doc::new();
    {
        let mut txn = doc.transact_mut();
        let parts = std::iter::once((-1, memory))
            .chain(
                stored
                    .snapshot
                    .iter()
                    .map(|s| (stored.snapshot_seq, &s[..])),
            )
            .chain(stored.updates.iter().map(|u| (u.seq, &u.data[..])));
        for (seq, bytes) in parts {
            let applied = codec::decode_update(bytes)
                .ok_or_else(|| "does not decode".to_string())
                .and_then(|u| txn.apply_update(u).map_err(|e| e.to_string()));
            if let Err(e) = applied {
                tracing::error!(doc = doc_id, seq, error = %e, "compaction skips an update that does not apply");
            }
        }
    }
    let txn = doc.transact();
    txn.encode_state_as_update_v1(&StateVector::default())
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
