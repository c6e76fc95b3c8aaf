//! A request line on the daemon's socket (any local client in the socket's
//! group controls it): parsed as the server parses it, then every name and
//! size a create carries is validated as the daemon validates them.
#![no_main]

use banger_core::api::{Envelope, Request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The server reads one line, at most MAX_REQUEST bytes.
    let line = match std::str::from_utf8(data) {
        Ok(s) => s.lines().next().unwrap_or(""),
        Err(_) => return,
    };
    let Ok(env) = serde_json::from_str::<Envelope>(line) else {
        // What the server does with a line that is not an envelope.
        let _ = serde_json::from_str::<serde_json::Value>(line);
        return;
    };
    // A parsed request round-trips: nothing is lost or invented.
    let again: Envelope = serde_json::from_str(&serde_json::to_string(&env).unwrap()).unwrap();
    assert_eq!(again, env);
    if let Request::VmCreate(c) = &env.request {
        if let Some(n) = &c.name {
            let _ = banger_core::validate_name(n);
        }
    }
});
