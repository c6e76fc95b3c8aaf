//! The agent's vsock path never stalls under backpressure in both
//! directions at once. vhost-device-vsock 0.3.0 (QEMU's vsock backend
//! here) lost a connection for good when its host-side stream was
//! readable and writable in the same wakeup: it skipped flushing what the
//! guest had sent, the guest's credit never came back, and both sides
//! waited forever (CI hung on `vm exec -i a -- cat` for 80 minutes).
//! `scripts/install-deps.sh` builds it with banger's fix
//! (`scripts/patches/`); this test drives a connection into exactly that
//! state and fails, within a deadline, on the unfixed backend.
//!
//! The state: the guest's process writes 4 MiB while it does not read its
//! input, the test writes input it does not read and does not read the
//! output. The output backs up into the CLI's socket (the backend gets
//! EAGAIN and keeps the rest), the input into the backend's side of that
//! socket (the guest has no credit left). Then the test reads: the
//! backend wakes with both events set. Needs root; `scripts/test.sh`
//! runs it.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use test_infra::{ok, text, wait_until, Instance};

fn banger_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_banger"))
}

const OUT: usize = 4 << 20;
const IN: usize = 2 << 20;

/// Receive queues (bytes) of the CLI's socket to the backend and of the
/// backend's side of it, from `ss` in the instance's namespace.
fn queues(inst: &Instance, cli: u32) -> Option<(u64, u64)> {
    let out = inst.net.cmd("ss").args(["-xpnH"]).output().ok()?;
    let lines: Vec<Vec<String>> = text(&out.stdout)
        .lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect();
    // u_str ESTAB RECVQ SENDQ LOCAL INODE PEER PEER_INODE users:((...))
    let mine = lines
        .iter()
        .find(|f| f.len() >= 9 && f[8].contains(&format!("pid={cli},")) && f[8].contains("fd="))?;
    let (inode, peer) = (&mine[5], &mine[7]);
    let theirs = lines
        .iter()
        .find(|f| f.len() >= 8 && &f[5] == peer && &f[7] == inode)?;
    Some((mine[2].parse().ok()?, theirs[2].parse().ok()?))
}

#[test]
fn both_directions_backed_up_at_once_do_not_stall() {
    let inst = Instance::new(&banger_bin()).with_image();
    ok(
        &inst.banger(&["vm", "run", "--name", "v", "--", "true"]),
        "vm run",
    );
    let script = format!("head -c {OUT} /dev/zero; cat >/dev/null; echo done >&2");
    let mut child = inst
        .banger_cmd(&["vm", "exec", "-i", "v", "--", "sh", "-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vm exec");
    let cli = child.id();
    let mut stdin = child.stdin.take().expect("stdin");
    let writer = std::thread::spawn(move || stdin.write_all(&vec![7u8; IN]));

    // Both directions backed up: the CLI has output it does not read
    // (its stdout is full), the backend has input it cannot pass on.
    let backed_up = wait_until(Duration::from_secs(120), || {
        queues(&inst, cli).is_some_and(|(cli_rx, backend_rx)| cli_rx > 64 * 1024 && backend_rx > 0)
    });
    assert!(
        backed_up,
        "the connection never backed up both ways: {:?}",
        queues(&inst, cli)
    );

    // Now read: everything must come through, within a deadline that a
    // stall cannot pass.
    let mut so = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut n = 0usize;
        let mut buf = vec![0u8; 1 << 16];
        let r = loop {
            match so.read(&mut buf) {
                Ok(0) => break Ok(n),
                Ok(k) => n += k,
                Err(e) => break Err(e),
            }
        };
        let _ = tx.send(r);
    });
    let read = rx.recv_timeout(Duration::from_secs(120));
    if read.is_err() {
        let _ = child.kill();
    }
    let status = child.wait().expect("wait vm exec");
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let n = read
        .unwrap_or_else(|_| {
            panic!(
                "the output stalled with both directions backed up \
                 (the vsock backend's EPOLLIN|EPOLLOUT bug?); stderr: {err}"
            )
        })
        .expect("read stdout");
    writer
        .join()
        .expect("writer thread")
        .expect("all the input was taken");
    assert_eq!(n, OUT, "all the output came through");
    assert!(status.success(), "{status:?}: {err}");
    assert_eq!(err.trim(), "done");

    ok(&inst.banger(&["vm", "delete", "-f", "v"]), "delete");
    inst.assert_baseline();
}

/// A QEMU VM's agent rides a virtio-serial port through `banger-vport`
/// (the channel a snapshot keeps); an image whose initramfs cannot serve
/// it (built by an older banger: no marker) keeps the vsock device and
/// `vhost-device-vsock`. Both answer `vm exec`.
#[test]
fn qemu_agents_ride_the_virtio_serial_port_unless_the_image_cannot() {
    let inst = Instance::new(&banger_bin()).with_image();
    let id = |n: &str| -> String {
        let v: serde_json::Value =
            serde_json::from_str(&ok(&inst.banger(&["vm", "show", n, "--json"]), "show")).unwrap();
        v["id"].as_str().unwrap().to_string()
    };
    let helper = |n: &str| -> Vec<String> {
        let vm = id(n);
        inst.processes()
            .into_iter()
            .filter(|(_, c)| c.contains(&vm))
            .filter_map(|(_, c)| {
                let exe = c.split_whitespace().next()?.rsplit('/').next()?.to_string();
                (exe == "banger-vport" || exe == "vhost-device-vsock").then_some(exe)
            })
            .collect()
    };
    let guest = "cat /proc/cmdline; cat /sys/class/virtio-ports/*/name 2>/dev/null; true";

    ok(
        &inst.banger(&["vm", "run", "-d", "--name", "p"]),
        "vm run p",
    );
    let seen = ok(
        &inst.banger(&["vm", "exec", "p", "--", "sh", "-c", guest]),
        "exec p",
    );
    assert!(seen.contains("banger.vport=1"), "{seen}");
    assert!(seen.contains("org.banger.agent"), "{seen}");
    assert_eq!(helper("p"), vec!["banger-vport".to_string()]);

    // The image as an older banger built it.
    inst.strip_vport_marker();

    ok(
        &inst.banger(&["vm", "run", "-d", "--name", "v"]),
        "vm run v",
    );
    let seen = ok(
        &inst.banger(&["vm", "exec", "v", "--", "sh", "-c", guest]),
        "exec v",
    );
    assert!(!seen.contains("banger.vport"), "{seen}");
    assert!(!seen.contains("org.banger.agent"), "{seen}");
    assert_eq!(helper("v"), vec!["vhost-device-vsock".to_string()]);

    ok(&inst.banger(&["vm", "rm", "-f", "p", "v"]), "rm");
    inst.assert_baseline();
}
