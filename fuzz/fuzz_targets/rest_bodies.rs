//! The JSON bodies of the `/v1` REST API and of the server API (`POST /api/{method}`),
//! decoded as their handlers decode them, with the handlers' checks. Input: one byte that
//! picks the route (`REST_BODIES` then `API_METHODS`, modulo their number), then the body.
//!
//! `POST /v1/documents/{id}/updates` decodes a Yjs update under the server's guard: panics
//! inside it are allowed (see `guard.rs`).
#![no_main]

use std::sync::OnceLock;

#[path = "guard.rs"]
mod guard;

use libfuzzer_sys::fuzz_target;
use switchboard::config::Config;
use switchboard::fuzzing::{api_body, rest_body, API_METHODS, REST_BODIES};

fn config() -> &'static Config {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    CONFIG.get_or_init(|| Config::load(None, Vec::new(), &[]).expect("the defaults load"))
}

fuzz_target!(|data: &[u8]| guard::run_guarded("rest_bodies", || run(data)));

fn run(data: &[u8]) {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let n = REST_BODIES.len() + API_METHODS.len();
    let i = pick as usize % n;
    if i < REST_BODIES.len() {
        let _ = rest_body(REST_BODIES[i], body);
    } else {
        let _ = api_body(config(), API_METHODS[i - REST_BODIES.len()], body);
    }
}
