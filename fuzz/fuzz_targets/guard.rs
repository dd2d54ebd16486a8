//! The panic policy of targets whose code path runs yrs parsers under the server's own
//! `catch_unwind` guards (`codec::guarded`, `Document::apply`): yrs rejects some hostile
//! input with debug assertions and overflow checks, which the server catches by design.
//! libFuzzer's panic hook aborts on every panic, caught or not, so these targets install a
//! hook that only notes the panic (printing each new location once) and abort themselves
//! when a panic gets past the server's code ([`run_guarded`]).

use std::cell::RefCell;
use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, Once};

thread_local! {
    static LAST_PANIC: RefCell<String> = const { RefCell::new(String::new()) };
}

pub fn install_hook() {
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
                eprintln!("panic at {at} (new location; caught by the server's guard unless reported below): {text}");
            }
            LAST_PANIC.with(|p| *p.borrow_mut() = text);
        }));
    });
}

/// Runs `f`; a panic that reaches here escaped the server's guards: report it and abort.
pub fn run_guarded(target: &str, f: impl FnOnce()) {
    install_hook();
    if catch_unwind(AssertUnwindSafe(f)).is_err() {
        let last = LAST_PANIC.with(|p| p.borrow().clone());
        eprintln!("{target}: a panic got past the server's guards: {last}");
        std::process::abort();
    }
}
