//! E2B's Python SDK with `E2B_DOMAIN` alone (issue 22), as E2B's own
//! deployments are addressed (`E2B_API_URL` is deprecated in the SDK):
//! it reaches `https://api.<domain>` and each sandbox's envd at
//! `https://49983-<sandbox ID>.<domain>`. Here the domain is banger's DNS
//! suffix (`vm`) with the API's port; the names resolve through banger's
//! DNS (the namespace's 127.0.0.153, named in a resolv.conf bound over the
//! SDK process's own /etc/resolv.conf, in a mount namespace of its own),
//! and HTTPS is served on the API's port with a certificate of banger's
//! CA, which the SDK trusts through `SSL_CERT_FILE`. Without that trust the
//! SDK refuses the certificate. Needs root; `scripts/test.sh` runs it.

use std::path::PathBuf;

use test_infra::{ok, text, Instance};

const SCRIPT: &str = r#"
import json, sys
from e2b import Sandbox
try:
    s = Sandbox.create(timeout=120)
except Exception as e:
    print(json.dumps({"refused": type(e).__name__, "message": str(e)[:300]}))
    sys.exit(0)
out = {"id": s.sandbox_id}
out["run"] = s.commands.run("echo over https").stdout
s.files.write("/root/t.txt", "tls")
out["read"] = s.files.read("/root/t.txt")
# Several MiB both ways through the relay (rustls's buffers fill).
big = bytes(range(256)) * (3 * 4096)
s.files.write("/root/big.bin", big)
out["big"] = s.files.read("/root/big.bin", format="bytes") == big
out["killed"] = s.kill()
print(json.dumps(out))
"#;

#[test]
fn e2b_domain_alone_reaches_banger_over_https() {
    let python = std::env::var("BANGER_E2B_PYTHON")
        .expect("BANGER_E2B_PYTHON: scripts/test.sh sets it (scripts/e2b-sdk.sh)");
    let inst = Instance::new(&PathBuf::from(env!("CARGO_BIN_EXE_banger"))).with_image();
    let (addr, key) = inst.serve_e2b_api("tls");
    let port = addr.rsplit(':').next().unwrap_or_default().to_string();
    let ca = inst.state().join("api-ca.pem");
    assert!(ca.exists(), "the CA's certificate at {}", ca.display());
    let resolv = inst.dir.path().join("resolv.conf");
    std::fs::write(&resolv, "nameserver 127.0.0.153\n").unwrap();
    let run = |trust: bool| {
        // The SDK's process resolves through banger's DNS: its own mount
        // namespace, with the resolv.conf above over /etc/resolv.conf.
        let mut c = inst.net.cmd("unshare");
        c.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg("mount --bind \"$0\" /etc/resolv.conf && exec \"$@\"")
            .arg(&resolv)
            .arg(&python)
            .arg("-c")
            .arg(SCRIPT)
            .env("E2B_DOMAIN", format!("vm:{port}"))
            .env("E2B_API_KEY", &key)
            .env_remove("E2B_API_URL")
            .env_remove("E2B_SANDBOX_URL")
            .stdin(std::process::Stdio::null());
        test_infra::e2b::without_proxies(&mut c);
        if trust {
            c.env("SSL_CERT_FILE", &ca);
        } else {
            c.env_remove("SSL_CERT_FILE").env_remove("SSL_CERT_DIR");
        }
        let out = test_infra::bounded::output_within(&mut c, test_infra::bounded::COMMAND_LIMIT);
        let stdout = text(&out.stdout);
        assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
        serde_json::from_str::<serde_json::Value>(stdout.lines().last().unwrap_or_default())
            .unwrap_or_else(|e| panic!("{e}: {stdout}"))
    };
    // Not trusting banger's CA: the certificate is refused, nothing made.
    let v = run(false);
    assert!(v["refused"].is_string(), "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap_or_default()
            .to_lowercase()
            .contains("certificate"),
        "{v}"
    );
    assert!(inst.vms().is_empty(), "nothing made: {:?}", inst.vms());
    // Trusting it: the whole round, over HTTPS, by name.
    let v = run(true);
    let id = v["id"].as_str().unwrap_or_default().to_string();
    assert!(!id.is_empty(), "{v}");
    assert_eq!(v["run"], "over https\n", "{v}");
    assert_eq!(v["read"], "tls", "{v}");
    assert_eq!(v["big"], true, "{v}");
    assert_eq!(v["killed"], true, "{v}");
    assert!(inst.vm(&id).is_none(), "kill deletes the VM");
    ok(&inst.banger(&["api", "stop"]), "api stop");
    inst.assert_baseline();
}
