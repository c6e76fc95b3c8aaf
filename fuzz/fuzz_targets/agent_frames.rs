//! The agent protocol both ways: what the host sends the agent (a guest's
//! agent reads it) and what a guest's agent, which the guest controls,
//! sends the host. Frames are bounded; a bad frame is an error, never a
//! panic or an allocation of what the length field claims.
#![no_main]

use banger_agent::proto;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = std::io::Cursor::new(data);
    let _ = proto::read_request(&mut r);
    let mut r = std::io::Cursor::new(data);
    for _ in 0..64 {
        match proto::read_frame(&mut r) {
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    let mut r = std::io::Cursor::new(data);
    for _ in 0..64 {
        if proto::read_msg(&mut r).is_err() {
            break;
        }
    }
});
