//! What the tests and the benchmark of the E2B-compatible API share: the
//! API served with a key, and an SDK's process kept to the loopback port.

use std::process::Command;

use crate::{ok, Instance};

impl Instance {
    /// Serves this instance's E2B-compatible API on a loopback port and
    /// makes a key named `key_name`: (address, key).
    pub fn serve_e2b_api(&self, key_name: &str) -> (String, String) {
        let addr = ok(
            &self.banger(&["api", "serve", "--listen", "127.0.0.1:0"]),
            "api serve",
        )
        .trim()
        .to_string();
        let key = ok(
            &self.banger(&["api", "token", "create", key_name]),
            "api token create",
        )
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
        (addr, key)
    }
}

/// `c` with no proxy, whatever the host's: an SDK's requests go to the
/// loopback port and nowhere else.
pub fn without_proxies(c: &mut Command) -> &mut Command {
    c.env("NO_PROXY", "*")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("ALL_PROXY")
}
