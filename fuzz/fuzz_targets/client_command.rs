//! The Centrifugo JSON command decoder, as the server runs it on every WebSocket text frame
//! (`Session::handle_frame`): several commands per frame, one per line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::fuzzing::client_frame;

fuzz_target!(|data: &[u8]| {
    // tungstenite hands the server text frames only as valid UTF-8.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let whole = client_frame(text);
    // A frame is its lines: it decodes when every line does, into as many commands.
    let mut commands = 0;
    let mut every_line = true;
    for line in text.split('\n') {
        match client_frame(line) {
            Ok(n) => commands += n,
            Err(_) => every_line = false,
        }
    }
    match whole {
        Ok(n) => assert!(every_line && n == commands, "{n} != {commands}"),
        Err(_) => assert!(!every_line, "the frame failed but every line decodes"),
    }
});
