//! The config parser: TOML text, then `SWITCHBOARD_*` environment overrides
//! (`Config::load` without the file read). Input: the TOML text, then up to four `KEY=VALUE`
//! pairs, each after a NUL byte; `SWITCHBOARD_` is put before each key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut parts = text.split('\0');
    let toml = parts.next().unwrap_or("");
    let env: Vec<(String, String)> = parts
        .take(4)
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (format!("SWITCHBOARD_{k}"), v.to_string())
        })
        .collect();
    let file = (!toml.is_empty()).then_some(("fuzz.toml", toml));
    if let Ok(cfg) = Config::from_layers(file, env, &[]) {
        // What start-up derives from a config that loaded.
        let _ = cfg.database_url();
        let _ = cfg.docs.to_collab();
        let _ = cfg.namespace("chat:1");
    }
});
