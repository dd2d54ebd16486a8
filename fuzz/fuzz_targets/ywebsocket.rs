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
//! yrs rejects some hostile input with debug assertions, which the server catches
//! (`codec::guarded`, `Document::apply`). libFuzzer's panic hook would abort on those, so
//! this target installs its own hook that only notes the panic (and prints each new
//! location once), and aborts when a panic gets past the server's code.
#![no_main]

use std::cell::RefCell;
use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, Once};

use libfuzzer_sys::fuzz_target;
use switchboard_collab::fuzzing::{doc_session, reload};
use switchboard_collab::CollabConfig;
use yrs::updates::encoder::Encode;
use yrs::{ReadTxn, Transact};

thread_local! {
    static LAST_PANIC: RefCell<String> = const { RefCell::new(String::new()) };
}

fn install_hook() {
    static ONCE: Once = Once::new();
    static SEEN: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let at = info
                .location()
                .map_or_else(|| "?".to_string(), |l| format!("{}:{}", l.file(), l.line()));
            let text = format!("{info}");
            if SEEN
                .lock()
                .unwrap()
                .get_or_insert_with(HashSet::new)
                .insert(at.clone())
            {
                eprintln!("ywebsocket: panic at {at} (new location): {text}");
            }
            LAST_PANIC.with(|p| *p.borrow_mut() = text);
        }));
    });
}

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
    if report.document_closed {
        // The document closed after a CRDT panic: its connections re-sync into a fresh
        // copy loaded from what was persisted, so live and stored may differ.
        return;
    }
    let (doc, skipped) = reload(report.persisted.iter().map(Vec::as_slice));
    assert_eq!(skipped, 0, "a persisted update did not apply again");
    let sv = doc.transact().state_vector().encode_v1();
    assert_eq!(
        sv, report.state_vector,
        "the document rebuilt from what was persisted differs from the live one"
    );
}

fuzz_target!(|data: &[u8]| {
    install_hook();
    if catch_unwind(AssertUnwindSafe(|| run(data))).is_err() {
        let last = LAST_PANIC.with(|p| p.borrow().clone());
        eprintln!("ywebsocket: a panic got past the server's guards: {last}");
        std::process::abort();
    }
});
