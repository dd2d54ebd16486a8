//! Entry points for the fuzz targets in `fuzz/` (hidden from the docs; not an API).
//!
//! [`doc_session`] gives one editing connection a fresh document with no store and no
//! tasks, and feeds it client frames the way [`crate::DocConnection::handle`] does: the
//! same decoder ([`codec::decode`]), then the same [`Document`] methods for each message
//! (step 2, `apply`, `awareness`, query-awareness). After the frames it does what the rest
//! of the node would do with the result: the document task's fan-out (merging the queued
//! updates), the persistence worker's `take_unpersisted`, the REST reads and a server-side
//! text edit. [`reload`] integrates stored updates the way `Collab::load` does.
//!
//! What is left out, and why: the awareness token bucket is time based, so it is replaced
//! by its burst (at most `awareness_burst` awareness frames); viewers are not modelled
//! (their frames are decoded and then dropped).

use std::sync::{Arc, Mutex};

use yrs::updates::encoder::Encode;
use yrs::{ReadTxn, Transact};

use crate::codec::{self, CloseCode, Incoming};
use crate::doc::{ApplyError, ConnEntry, DocSink, Document, Outgoing};
use crate::{read_content, CollabConfig, Content, Format, TEXT_NAME};

/// What the connection was sent, and whether it was closed.
#[derive(Default)]
struct Recorder {
    sent: Mutex<Vec<Vec<u8>>>,
    closed: Mutex<Option<CloseCode>>,
}

impl DocSink for Recorder {
    fn send(&self, msg: &Outgoing) {
        self.sent
            .lock()
            .expect("recorder lock")
            .push(msg.payload().to_vec());
    }

    fn close(&self, code: CloseCode) {
        *self.closed.lock().expect("recorder lock") = Some(code);
    }
}

/// The outcome of a [`doc_session`].
#[derive(Debug)]
pub struct Report {
    /// The code the connection was closed with (the first refused frame ends the session).
    pub close: Option<CloseCode>,
    /// The document closed itself (an update panicked the CRDT): what it holds is not
    /// what it persisted.
    pub document_closed: bool,
    /// An update started past a client's known clock (see [`clock_gap`]); the server cut
    /// those blocks off.
    pub clock_gap: bool,
    /// Every message the connection was sent, in order (its own fan-out included).
    pub sent: Vec<Vec<u8>>,
    /// Every message a second, silent connection was sent (until the end).
    pub watched: Vec<Vec<u8>>,
    /// The document's state vector (v1) after the session and the server-side edit.
    pub state_vector: Vec<u8>,
    /// What the persistence worker would have written, in order: the session's merged
    /// updates, then the server-side edit's.
    pub persisted: Vec<Vec<u8>>,
    /// The `content` text before the server-side edit, as `GET .../content` reads it.
    pub text: String,
}

/// Runs one editing connection's `frames` against a fresh document (see the module docs).
pub fn doc_session<'a>(
    frames: impl IntoIterator<Item = &'a [u8]>,
    config: &CollabConfig,
) -> Report {
    let doc = Arc::new(Document::new(1, yrs::Doc::new(), 0, 0, None));
    let sink = Arc::new(Recorder::default());
    let joined = doc.join(ConnEntry {
        id: 1,
        user: Arc::from("1"),
        sink: sink.clone(),
    });
    assert!(joined, "a fresh document is open");
    // Another connection, which only watches: it gets the fan-out, and the removals when
    // the first one leaves.
    let watcher = Arc::new(Recorder::default());
    doc.join(ConnEntry {
        id: 2,
        user: Arc::from("2"),
        sink: watcher.clone(),
    });
    let mut owned = Vec::new();
    let mut awareness_left = config.awareness_burst;
    let mut close = None;
    let mut gap = false;
    for frame in frames {
        let outcome = handle(
            &doc,
            &sink,
            &mut owned,
            &mut awareness_left,
            &mut gap,
            config,
            frame,
        );
        if let Err(code) = outcome {
            close = Some(code);
            break;
        }
    }
    doc.fan_out();
    let mut persisted: Vec<Vec<u8>> = doc.take_unpersisted().into_iter().collect();
    let mut text = String::new();
    // A closed document is never read or edited again: `Collab::open` loads a fresh copy.
    if !doc.lock().closed {
        text = match read_content(&doc, Format::Text) {
            Some(Content::Text(t)) => t,
            _ => unreachable!("asked for text"),
        };
        let _ = read_content(&doc, Format::Json);
        let _ = read_content(&doc, Format::Update);
        // `POST /v1/documents/{id}/updates` with `{"text": ...}`: `Collab::append_text`.
        let edited = doc.change_text(TEXT_NAME, |txn, t| {
            use yrs::Text;
            let len = t.len(txn);
            t.insert(txn, len, "!");
        });
        if edited.is_ok_and(|a| a.changed) {
            persisted.extend(doc.take_unpersisted());
        }
    }
    doc.leave(1);
    doc.fan_out();
    let state_vector = doc.read(|d| d.transact().state_vector().encode_v1());
    let document_closed = sink.closed.lock().expect("recorder lock").is_some();
    let sent = std::mem::take(&mut *sink.sent.lock().expect("recorder lock"));
    let watched = std::mem::take(&mut *watcher.sent.lock().expect("recorder lock"));
    Report {
        close,
        document_closed,
        clock_gap: gap,
        sent,
        watched,
        state_vector,
        persisted,
        text,
    }
}

/// One frame, as `DocConnection::handle` takes it for an editor.
fn handle(
    doc: &Arc<Document>,
    sink: &Arc<Recorder>,
    owned: &mut Vec<u64>,
    awareness_left: &mut u32,
    gap: &mut bool,
    config: &CollabConfig,
    frame: &[u8],
) -> Result<(), CloseCode> {
    let msg = codec::decode(frame, config.max_update_bytes).map_err(|r| r.close_code())?;
    match msg {
        Incoming::SyncStep1(sv) => {
            sink.send(&doc.step2(&sv));
            Ok(())
        }
        Incoming::SyncStep2(update) => {
            *gap |= doc.read(|d| clock_gap(&d.transact().state_vector(), update.update()));
            apply(doc, sink, update, false, config)
        }
        Incoming::Update(update) => {
            *gap |= doc.read(|d| clock_gap(&d.transact().state_vector(), update.update()));
            apply(doc, sink, update, true, config)
        }
        Incoming::Awareness(update) => {
            if *awareness_left == 0 {
                return Err(codec::CLOSE_FLOOD);
            }
            *awareness_left -= 1;
            doc.awareness(
                1,
                owned,
                update,
                config.max_awareness_clients,
                config.max_awareness_state_bytes,
            )
        }
        Incoming::QueryAwareness => {
            sink.send(&doc.awareness_states());
            Ok(())
        }
        Incoming::Auth => Ok(()),
    }
}

/// `Document::apply` and what `DocConnection::handle` does with its outcome.
fn apply(
    doc: &Arc<Document>,
    sink: &Arc<Recorder>,
    update: codec::ClientUpdate,
    incremental: bool,
    config: &CollabConfig,
) -> Result<(), CloseCode> {
    match doc.apply(update, false) {
        Ok(applied) => {
            if applied.changed {
                doc.fan_out_or_schedule(config.max_tick);
            }
            if applied.cut && incremental {
                sink.send(&doc.step1());
            }
            Ok(())
        }
        Err(ApplyError::Invalid | ApplyError::Gap) => Err(codec::CLOSE_MALFORMED),
        Err(ApplyError::Closed) => Err(codec::CLOSE_UNAVAILABLE),
    }
}

/// Whether `update` has blocks of a client that start past the clock `known` has for it.
///
/// yrs 0.28.1 integrates such a block (when nothing else it refers to is missing) behind a
/// hole, without advancing the client's clock, and a later block spanning that hole made
/// yrs free memory it still used. `Document::apply` therefore cuts such blocks off before
/// yrs sees them (`codec::layout`); the sessions that sent one are flagged in the report.
pub fn clock_gap(known: &yrs::StateVector, update: &yrs::Update) -> bool {
    update
        .state_vector_lower()
        .iter()
        .any(|(client, &clock)| clock > known.get(client))
}

/// A document rebuilt from stored updates (snapshot first, then the log) the way
/// `Collab::load` does: each part decoded with [`codec::decode_update`] and applied in one
/// transaction; parts that do not decode or apply are skipped. Returns the document and how
/// many parts were skipped.
pub fn reload<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> (yrs::Doc, usize) {
    let doc = yrs::Doc::new();
    let mut skipped = 0;
    {
        let mut txn = doc.transact_mut();
        for bytes in parts {
            let applied = codec::decode_update(bytes)
                .ok_or_else(|| "does not decode".to_string())
                .and_then(|u| txn.apply_update(u).map_err(|e| e.to_string()));
            if applied.is_err() {
                skipped += 1;
            }
        }
    }
    (doc, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use yrs::sync::{Message, SyncMessage};
    use yrs::{GetString, Text};

    #[test]
    fn a_session_is_persisted_and_reloads_to_the_same_state() {
        let client = yrs::Doc::with_client_id(7);
        let text = client.get_or_insert_text(TEXT_NAME);
        let update = {
            let mut txn = client.transact_mut();
            text.insert(&mut txn, 0, "hello");
            txn.encode_update_v1()
        };
        let frame = Message::Sync(SyncMessage::Update(update)).encode_v1();
        let report = doc_session([frame.as_slice()], &CollabConfig::default());
        assert_eq!(report.close, None);
        assert_eq!(report.text, "hello");
        // Step 1 on join, then the fan-out of the update and of the server-side edit.
        assert!(report.sent.len() >= 2, "{:?}", report.sent);
        let (reloaded, skipped) = reload(report.persisted.iter().map(Vec::as_slice));
        assert_eq!(skipped, 0);
        let t = reloaded.get_or_insert_text(TEXT_NAME);
        assert_eq!(t.get_string(&reloaded.transact()), "hello!");
        let sv = reloaded.transact().state_vector().encode_v1();
        assert_eq!(sv, report.state_vector);
    }

    #[test]
    fn a_refused_frame_ends_the_session() {
        let report = doc_session([&[9u8][..], &[0, 2, 1, 0][..]], &CollabConfig::default());
        assert_eq!(report.close, Some(codec::CLOSE_MALFORMED));
    }

    /// Found by the `ywebsocket` target; a yrs 0.28.1 bug (see [`clock_gap`]). A block at
    /// clock 1 of a client the document knows nothing of is integrated by yrs, shown, and
    /// absent from the effective update and the state vector. The server never lets yrs see
    /// it: the session's update is cut, nothing is shown, the sender is sent our step 1, and
    /// what was persisted reloads to the live state. The first half is a canary: it fails
    /// once yrs keeps such a block pending (then `codec::layout` may be retired).
    #[test]
    fn a_block_past_its_clients_clock_is_cut_before_yrs_integrates_it() {
        use yrs::updates::decoder::Decode;
        use yrs::{GetString, StateVector};
        // Client 4, one block at clock 1: "hello" at the start of the text `content`.
        let update: &[u8] = b"\x01\x01\x04\x01\x04\x01\x07content\x05hello\x00";
        let u = yrs::Update::decode_v1(update).unwrap();
        assert!(clock_gap(&StateVector::default(), &u));
        let doc = yrs::Doc::new();
        let text = doc.get_or_insert_text(TEXT_NAME);
        let effective = {
            let mut txn = doc.transact_mut();
            txn.apply_update(u).unwrap();
            txn.encode_update_v1()
        };
        assert_eq!(text.get_string(&doc.transact()), "hello", "yrs shows it");
        assert_eq!(
            effective,
            yrs::Update::EMPTY_V1,
            "but not in the effective update"
        );

        let frame =
            yrs::sync::Message::Sync(yrs::sync::SyncMessage::Update(update.to_vec())).encode_v1();
        let report = doc_session([frame.as_slice()], &CollabConfig::default());
        assert!(report.clock_gap);
        assert_eq!(
            report.close, None,
            "not an error: the sender is asked instead"
        );
        assert_eq!(report.text, "", "the server does not show it");
        // Step 1 on join, then a second step 1: the answer to the cut update.
        let step1s = report
            .sent
            .iter()
            .filter(|m| m.starts_with(&[0, 0]))
            .count();
        assert_eq!(step1s, 2, "{:?}", report.sent);
        let (reloaded, skipped) = reload(report.persisted.iter().map(Vec::as_slice));
        assert_eq!(skipped, 0);
        let t = reloaded.get_or_insert_text(TEXT_NAME);
        assert_eq!(
            t.get_string(&reloaded.transact()),
            "!",
            "only the server-side edit"
        );
        let live = StateVector::decode_v1(&report.state_vector).unwrap();
        assert_eq!(reloaded.transact().state_vector(), live);
    }

    /// Regression (found by the `ywebsocket` target): a heap use-after-free inside yrs
    /// 0.28.1. A step 2 put client 6's block at clock 36 behind a hole; the next update's
    /// block for client 6 at clocks 32..37 spanned the hole's end, and yrs, trimming what it
    /// knew, split that block twice and kept a pointer to the freed middle piece (seen with
    /// AddressSanitizer; the input is `fuzz/known/ywebsocket-yrs-use-after-free`). Both
    /// blocks start past client 6's clock, so both are cut off and yrs never sees them.
    #[test]
    fn blocks_that_would_span_a_hole_never_reach_yrs() {
        use yrs::updates::decoder::Decode;
        let frames: [&[u8]; 4] = [
            &[0, 0, 1, 0],
            &[
                0, 1, 37, 1, 3, 6, 36, 1, 1, 7, 99, 111, 110, 116, 101, 110, 116, 5, 132, 6, 4, 6,
                32, 119, 111, 114, 108, 100, 68, 6, 0, 3, 62, 62, 32, 1, 6, 1, 0, 5,
            ],
            &[
                0, 2, 21, 1, 1, 6, 32, 4, 1, 7, 99, 111, 110, 116, 101, 110, 116, 5, 104, 101, 108,
                108, 111, 0,
            ],
            &[
                0, 2, 15, 0, 1, 6, 5, 132, 6, 46, 6, 32, 119, 111, 62, 62, 32, 0,
            ],
        ];
        let report = doc_session(frames, &CollabConfig::default());
        assert!(report.clock_gap);
        assert_eq!(report.close, None);
        assert!(!report.document_closed);
        let (reloaded, skipped) = reload(report.persisted.iter().map(Vec::as_slice));
        assert_eq!(skipped, 0);
        let live = yrs::StateVector::decode_v1(&report.state_vector).unwrap();
        assert_eq!(reloaded.transact().state_vector(), live);
        let t = reloaded.get_or_insert_text(TEXT_NAME);
        assert_eq!(t.get_string(&reloaded.transact()), report.text + "!");
    }

    /// Regression (found twice by the `ywebsocket` target): sync steps 2 that left pending
    /// blocks yrs cannot merge back, after which every `encode_state_as_update` (the next
    /// client's step 2, `GET .../content?format=update`, versions, peer sync replies)
    /// panicked under the document's lock, poisoning it. First fixed by trying an encoding
    /// after each update that left something pending; the second input got past that (its
    /// encoding failed only from an empty state vector), so every encoding is now guarded
    /// and a panic closes the document (`Document::encode_state`). Both inputs carry legacy
    /// JSON content, which `codec::layout` now refuses before yrs sees it; the guard stays
    /// for whatever else yrs cannot merge back.
    #[test]
    fn updates_whose_pending_part_cannot_be_encoded_never_poison_the_document() {
        let inputs: [&[u8]; 2] = [
            &[
                0, 1, 36, 1, 3, 32, 0, 114, 108, 162, 187, 249, 255, 252, 193, 193, 223, 24, 0, 2,
                21, 1, 1, 4, 116, 0, 2, 113, 149, 0, 0, 35, 0, 0, 0, 0, 1, 10, 2,
            ],
            &[
                0, 1, 37, 1, 3, 1, 0, 1, 1, 1, 1, 3, 226, 1, 1, 1, 1, 1, 1, 1, 1, 0, 3, 0, 0, 1, 1,
                0, 3, 0, 0, 0, 0, 0, 0, 0, 116, 0, 42, 0,
            ],
        ];
        for step2 in inputs {
            let report = doc_session([step2], &CollabConfig::default());
            assert_eq!(report.close, Some(codec::CLOSE_MALFORMED), "{step2:?}");
            // The document's lock is not poisoned: the reads after the session ran.
            assert!(!report.state_vector.is_empty());
            assert!(
                !report.persisted.is_empty(),
                "the server-side edit was stored"
            );
        }
    }

    /// Regression (found by the `ywebsocket` target): an awareness state at clock u32::MAX
    /// made leaving overflow `clock + 1` (a panic in the connection's drop, under the
    /// document's lock). The removal goes out at u32::MAX, which peers still apply.
    #[test]
    fn leaving_after_an_awareness_clock_of_u32_max_removes_the_state() {
        let frame = codec::awareness([(7u64, u32::MAX, r#"{"user":"ann"}"#)].into_iter());
        let report = doc_session([frame.as_slice()], &CollabConfig::default());
        assert_eq!(report.close, None);
        let removal = codec::awareness([(7u64, u32::MAX, "null")].into_iter());
        assert_eq!(
            report.watched.last(),
            Some(&removal),
            "{:?}",
            report.watched
        );
    }

    /// Regression (found by the `ywebsocket` target): yrs refused this update
    /// (`InvalidParent`: a block whose parent is not a type) after integrating the blocks
    /// before it, and the transaction kept them: the document showed content it never
    /// persisted or relayed. Now such a partial apply closes the document (it reloads from
    /// the store, which never had it).
    #[test]
    fn a_partly_applied_invalid_update_closes_the_document() {
        let input: &[u8] = include_bytes!("../../../fuzz/corpus/ywebsocket/crash-partial-apply");
        let frame = &input[1..1 + input[0] as usize];
        let report = doc_session([frame], &CollabConfig::default());
        assert_eq!(report.close, Some(codec::CLOSE_MALFORMED));
        assert!(report.document_closed);
    }
}
