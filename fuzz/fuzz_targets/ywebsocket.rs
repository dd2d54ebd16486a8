//! The y-websocket decoder (sync step 1/2/update, awareness, auth, query-awareness) and what
//! the server does with each message on an editing connection: apply to the yrs document,
//! fan out, persist, read back (`switchboard_collab::fuzzing::doc_session`).
//!
//! Input: frames, each preceded by its length as a varuint (LEB128); a length that does not
//! decode or runs past the end makes the rest one last frame.
//!
//! Checks, besides "no panic escapes the server's guards": every update the document hands
//! to persistence decodes and applies again, and the document rebuilt from them (as
//! `Collab::load` rebuilds it) has the live document's state vector.
//!
//! Panics inside the server's own guards are allowed (see `guard.rs`).
#![no_main]

#[path = "guard.rs"]
mod guard;

use libfuzzer_sys::fuzz_target;
use switchboard_collab::fuzzing::{doc_session, reload};
use switchboard_collab::CollabConfig;
use yrs::updates::decoder::Decode;
use yrs::{ReadTxn, StateVector, Transact};

fn frames(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let mut len: u64 = 0;
        let mut used = 0;
        let mut done = false;
        for (i, b) in data.iter().take(5).enumerate() {
            len |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                used = i + 1;
                done = true;
                break;
            }
        }
        let rest = &data[used..];
        match usize::try_from(len) {
            Ok(n) if done && n <= rest.len() => {
                out.push(&rest[..n]);
                data = &rest[n..];
            }
            _ => {
                out.push(data);
                break;
            }
        }
    }
    out
}

fn run(data: &[u8]) {
    let config = CollabConfig::default();
    let report = doc_session(frames(data), &config);
    // Sessions that sent blocks past their client's clock (`report.clock_gap`) are checked
    // too: the server cuts those blocks off, so what it shows is what it persisted.
    if report.document_closed {
        // The document closed after a CRDT panic: its connections re-sync into a fresh
        // copy loaded from what was persisted, so live and stored may differ.
        return;
    }
    let (doc, skipped) = reload(report.persisted.iter().map(Vec::as_slice));
    assert_eq!(skipped, 0, "a persisted update did not apply again");
    // Compared decoded: the encoding's client order is a hash map's.
    let live = StateVector::decode_v1(&report.state_vector).expect("our own state vector");
    assert_eq!(
        doc.transact().state_vector(),
        live,
        "the document rebuilt from what was persisted differs from the live one"
    );
}

fuzz_target!(|data: &[u8]| guard::run_guarded("ywebsocket", || run(data)));
