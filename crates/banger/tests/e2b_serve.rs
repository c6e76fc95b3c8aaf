//! `banger api serve` (issue 22): what it refuses before anything is
//! made (a listen address that is not loopback, a second serve, a stop
//! of nothing) and the `api_listen` setting, which serves the API from
//! the daemon's start, loopback only. Needs root; `scripts/test.sh`
//! runs it.

use std::path::PathBuf;

use test_infra::{ok, text, Instance};

fn banger_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_banger"))
}

/// What the API refuses before anything is made: a listen address that
/// is not loopback, a member serving it, a second serve.
#[test]
fn api_serve_refuses_what_it_should() {
    let inst = Instance::new(&banger_bin());
    let out = inst.banger(&["api", "serve", "--listen", "0.0.0.0:3999"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("loopback address only"),
        "{}",
        text(&out.stderr)
    );
    let addr = ok(
        &inst.banger(&["api", "serve", "--listen", "127.0.0.1:0"]),
        "api serve",
    );
    let out = inst.banger(&["api", "serve", "--listen", "127.0.0.1:0"]);
    assert!(
        text(&out.stderr).contains(&format!("served on {} already", addr.trim())),
        "{}",
        text(&out.stderr)
    );
    ok(&inst.banger(&["api", "stop"]), "api stop");
    let out = inst.banger(&["api", "stop"]);
    assert!(
        text(&out.stderr).contains("not served"),
        "{}",
        text(&out.stderr)
    );
    inst.assert_baseline();
    drop(inst);
    // The setting serves it from the daemon's start, loopback only.
    let inst = Instance::new(&banger_bin()).with_env("BANGER_API_LISTEN", "127.0.0.1:0");
    let at = ok(&inst.banger(&["api", "status"]), "api status");
    assert!(at.trim().starts_with("127.0.0.1:"), "{at}");
    drop(inst);
    let inst = Instance::new(&banger_bin()).with_env("BANGER_API_LISTEN", "0.0.0.0:80");
    let out = inst.banger(&["api", "status"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("api_listen"),
        "{}",
        text(&out.stderr)
    );
}
