//! `vm pause` and `vm resume` on real guests (issue 21's first slice):
//! a paused VM's vCPUs do not run (their threads' CPU time stands still),
//! its agent is not called (`exec` says to resume), an `exec` session
//! open across the pause and a detached process both go on after it, the
//! guest's clock is set to now on resume, a stop of a paused VM powers it
//! off cleanly, and the Firecracker driver's `PATCH /vm` goes through the
//! spec-checked double. Needs root; `scripts/test.sh` runs it.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use test_infra::{ok, text, Instance};

fn banger_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_banger"))
}

/// How long a line from a guest may take (a bound, not a pace).
const LINE: Duration = Duration::from_secs(120);

fn state(inst: &Instance, name: &str) -> String {
    inst.vm(name)
        .and_then(|v| v["state"].as_str().map(str::to_string))
        .unwrap_or_else(|| "gone".into())
}

/// The CPU time (clock ticks) of the VMM's vCPU threads: QEMU names them
/// `CPU <n>/TCG` (`-name ...,debug-threads=on`).
fn vcpu_ticks(inst: &Instance) -> u64 {
    let pid = &qemu_pid(inst);
    let vcpus: Vec<i32> = banger_host::process::threads(*pid)
        .into_iter()
        .filter(|(_, name)| name.starts_with("CPU "))
        .map(|(tid, _)| tid)
        .collect();
    assert!(!vcpus.is_empty(), "QEMU {pid} has no thread named CPU n");
    vcpus
        .iter()
        .filter_map(|t| banger_host::process::thread_stat(*pid, *t))
        .map(|(_, ticks)| ticks)
        .sum()
}

/// The instance's one QEMU.
fn qemu_pid(inst: &Instance) -> i32 {
    let vmms = inst.vmm_processes();
    vmms.iter()
        .find(|(_, c)| c.contains("qemu-system"))
        .map(|(p, _)| *p)
        .unwrap_or_else(|| panic!("no QEMU among {vmms:?}"))
}

/// An interactive `vm exec -i NAME -- cat`: lines written come back.
struct Session {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
}

impl Session {
    fn open(inst: &Instance, name: &str) -> Session {
        let mut child = inst
            .banger_cmd(&["vm", "exec", "-i", name, "--", "cat"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { return };
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        Session { child, lines }
    }

    fn send(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    fn next(&self) -> String {
        self.lines
            .recv_timeout(LINE)
            .expect("the session answers within its bound")
    }

    fn close(mut self) -> std::process::ExitStatus {
        drop(self.child.stdin.take());
        test_infra::bounded::wait_within(&mut self.child, LINE).expect("cat ends with its input")
    }
}

fn guest_unix_time(inst: &Instance, name: &str) -> i64 {
    let out = inst.banger(&["vm", "exec", name, "--", "date", "+%s"]);
    ok(&out, "date").trim().parse().unwrap()
}

fn host_unix_time() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn pause_keeps_everything_and_resume_goes_on() {
    let inst = Instance::new(&banger_bin()).with_image();
    ok(
        &inst.banger(&["vm", "run", "-d", "--name", "p"]),
        "vm run -d",
    );
    // A detached process that ticks, and a session left open.
    let out = inst.banger(&[
        "vm",
        "exec",
        "-d",
        "--tag",
        "ticker",
        "p",
        "--",
        "sh",
        "-c",
        "while :; do date +%s%N > /tmp/tick; sleep 0.2; done",
    ]);
    let ticker: u32 = ok(&out, "exec -d").trim().parse().unwrap();
    let mut s = Session::open(&inst, "p");
    s.send("before");
    assert_eq!(s.next(), "before");

    ok(&inst.banger(&["vm", "pause", "p"]), "vm pause");
    assert_eq!(state(&inst, "p"), "paused");
    // Through QMP (its agent channel is the virtio-serial port, it has no
    // mount): the process itself is not stopped, its main loop answers.
    let qemu = qemu_pid(&inst);
    assert!(
        !banger_host::process::all_threads_stopped(qemu),
        "a VM with nothing vhost-user pauses through QMP, not SIGSTOP"
    );
    let out = inst.banger(&["vm", "ls", "-q", "--filter", "state=paused"]);
    assert_eq!(ok(&out, "ls --filter state=paused"), "p\n");
    // Its agent is not called: exec says what to do.
    let out = inst.banger(&["vm", "exec", "p", "--", "true"]);
    let err = text(&out.stderr);
    assert!(
        !out.status.success() && err.contains("is paused: resume it first (`banger vm resume p`)"),
        "{err}"
    );
    let out = inst.banger(&["vm", "ssh", "p", "--", "true"]);
    let err = text(&out.stderr);
    assert!(
        !out.status.success() && err.contains("is paused: resume it first"),
        "{err}"
    );
    // Pausing twice, or resuming a running VM, is refused, naming why.
    let out = inst.banger(&["vm", "pause", "p"]);
    assert!(
        text(&out.stderr).contains("only a running VM can be paused"),
        "{}",
        text(&out.stderr)
    );
    // The vCPUs do not run: their CPU time stands still over a window of
    // a few seconds (a running TCG guest spends hundreds of ticks in it;
    // one tick of slack for the accounting of the stop itself).
    let before = vcpu_ticks(&inst);
    s.send("while paused");
    std::thread::sleep(Duration::from_secs(3));
    let after = vcpu_ticks(&inst);
    assert!(
        after <= before + 1,
        "paused vCPUs ran: {before} -> {after} ticks"
    );

    ok(&inst.banger(&["vm", "resume", "p"]), "vm resume");
    assert_eq!(state(&inst, "p"), "running");
    // The session goes on: what was written while paused comes back.
    assert_eq!(s.next(), "while paused");
    s.send("after");
    assert_eq!(s.next(), "after");
    assert!(s.close().success());
    // The detached process lives on, and ticks again.
    let out = inst.banger(&["vm", "ps", "p", "--json"]);
    let ps: Vec<serde_json::Value> = serde_json::from_str(&ok(&out, "ps")).unwrap();
    assert!(
        ps.iter().any(|p| p["pid"] == ticker && p["exit"].is_null()),
        "{ps:?}"
    );
    // The clock stood still while paused (3 s and more): set to now.
    let skew = (guest_unix_time(&inst, "p") - host_unix_time()).abs();
    assert!(skew <= 1, "the guest's clock is {skew} s off after resume");
    let out = inst.banger(&["vm", "resume", "p"]);
    assert!(
        text(&out.stderr).contains("only a paused or suspended VM can be resumed"),
        "{}",
        text(&out.stderr)
    );

    // A paused VM stops cleanly: resumed first, then powered off.
    ok(&inst.banger(&["vm", "pause", "p"]), "pause again");
    ok(&inst.banger(&["vm", "stop", "p"]), "stop a paused VM");
    assert_eq!(state(&inst, "p"), "stopped");
    let log = std::fs::read_to_string(inst.state().join("bangerd.log")).unwrap();
    assert!(
        !log.contains("did not power off"),
        "the guest shut down cleanly:\n{log}"
    );
    // And starts again as any stopped VM (not paused).
    ok(&inst.banger(&["vm", "start", "p"]), "start again");
    assert_eq!(state(&inst, "p"), "running");
    ok(&inst.banger(&["vm", "rm", "-f", "p"]), "rm -f");
    inst.assert_baseline();
}

/// A paused VM stays paused across a daemon restart, and is killed or
/// deleted without its guest.
#[test]
fn a_paused_vm_survives_a_daemon_restart_and_dies_without_its_guest() {
    let inst = Instance::new(&banger_bin()).with_image();
    for n in ["q1", "q2"] {
        ok(&inst.banger(&["vm", "run", "-d", "--name", n]), "run");
        ok(&inst.banger(&["vm", "pause", n]), "pause");
    }
    inst.kill_daemon();
    assert_eq!(state(&inst, "q1"), "paused", "kept by the next daemon");
    ok(
        &inst.banger(&["vm", "resume", "q1"]),
        "resume after a restart",
    );
    let out = inst.banger(&["vm", "exec", "q1", "--", "cat", "/etc/hostname"]);
    assert_eq!(ok(&out, "exec after resume"), "q1\n");
    ok(&inst.banger(&["vm", "kill", "q2"]), "kill a paused VM");
    assert_eq!(state(&inst, "q2"), "stopped");
    ok(&inst.banger(&["vm", "pause", "q1"]), "pause");
    ok(
        &inst.banger(&["vm", "rm", "-f", "q1", "q2"]),
        "rm -f paused",
    );
    inst.assert_baseline();
}

/// The Firecracker driver pauses and resumes with `PATCH /vm`, checked
/// against the vendored spec by the double (which plays it on QEMU).
#[test]
fn firecracker_pauses_with_patch_vm_through_the_double() {
    let inst = Instance::new(&banger_bin()).with_image();
    inst.start_daemon_with_firecracker_double();
    ok(
        &inst.banger(&["vm", "run", "-d", "--vmm", "firecracker", "--name", "fc"]),
        "vm run -d on firecracker",
    );
    ok(&inst.banger(&["vm", "pause", "fc"]), "pause");
    assert_eq!(state(&inst, "fc"), "paused");
    let before = vcpu_ticks(&inst);
    std::thread::sleep(Duration::from_secs(2));
    assert!(vcpu_ticks(&inst) <= before + 1, "paused vCPUs ran");
    ok(&inst.banger(&["vm", "resume", "fc"]), "resume");
    let out = inst.banger(&["vm", "exec", "fc", "--", "cat", "/etc/hostname"]);
    assert_eq!(ok(&out, "exec after resume"), "fc\n");
    let id = inst.vm("fc").unwrap()["id"].as_str().unwrap().to_string();
    let log = std::fs::read_to_string(inst.state().join("vms").join(id).join("vmm.log")).unwrap();
    for call in [
        "PATCH /vm {\"state\":\"Paused\"} -> 204",
        "PATCH /vm {\"state\":\"Resumed\"} -> 204",
    ] {
        assert!(log.contains(call), "{call:?} missing:\n{log}");
    }
    ok(&inst.banger(&["vm", "rm", "-f", "fc"]), "rm -f");
    inst.assert_baseline();
}

/// A VM with a `--mount` (virtiofsd's vhost-user rings, which QMP's
/// `stop` would stop under it) pauses by stopping its QEMU instead, and
/// its share works after the resume.
#[test]
fn a_vm_with_a_mount_pauses_by_stopping_its_vmm() {
    let inst = Instance::new(&banger_bin()).with_image();
    let share = tempfile::tempdir().unwrap();
    std::fs::write(share.path().join("f"), "shared\n").unwrap();
    let arg = format!("{}:/host", share.path().display());
    ok(
        &inst.banger(&["vm", "run", "-d", "--name", "m", "--mount", &arg]),
        "vm run with a mount",
    );
    ok(&inst.banger(&["vm", "pause", "m"]), "pause");
    let qemu = qemu_pid(&inst);
    assert!(
        banger_host::process::all_threads_stopped(qemu),
        "a VM with a mount pauses by SIGSTOP"
    );
    ok(&inst.banger(&["vm", "resume", "m"]), "resume");
    let out = inst.banger(&["vm", "exec", "m", "--", "cat", "/host/f"]);
    assert_eq!(ok(&out, "the share after resume"), "shared\n");
    ok(&inst.banger(&["vm", "rm", "-f", "m"]), "rm -f");
    inst.assert_baseline();
}
