//! Every step of create, start, stop, kill and delete, twice: once failing
//! (an injected error), once crashing the daemon (SIGKILL at the step).
//! After a failure the request must have rolled back; after a crash the
//! next CLI call starts a new daemon, and after its reconcile the VM is
//! either running and fully recorded (its VMM, its tap, ssh answers) or
//! stopped / gone with nothing left behind. Every iteration ends at the
//! host's baseline. Real guests and taps in a network namespace of the
//! test's own; the daemon is the test build's (`failpoints` feature,
//! configured through `FAILPOINTS`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use test_infra::{ok, text, wait_until, Instance};

const VM: &str = "fp";
const PORT: &str = "127.0.0.1:19999:8000";
/// A volume, so that the volumes resource is held too.
const VOLUME: &str = "fpvol:/data";
/// A host directory every Debian has, shared read-only: the VM holds a
/// virtiofsd at every step.
const MOUNT: &str = "/usr/share/common-licenses:/licenses:ro";

fn banger_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_bangerd")).with_file_name("banger")
}

/// What a step needs first, and the request that meets it.
fn plan(step: &str) -> (Pre, Vec<&'static str>) {
    let stage = step.split('.').next().unwrap_or("");
    let create_res: Vec<String> = bangerd::resources::CREATE
        .iter()
        .map(|r| format!("teardown.{}", r.name()))
        .collect();
    match stage {
        "create" => (
            Pre::Nothing,
            vec![
                "vm", "run", "--name", VM, "-p", PORT, "--volume", VOLUME, "--mount", MOUNT, "--",
                "true",
            ],
        ),
        "start" => (Pre::Created, vec!["vm", "start", VM]),
        "kill" => (Pre::Running, vec!["vm", "kill", VM]),
        "delete" => (Pre::Running, vec!["vm", "delete", "-f", VM]),
        "teardown" if create_res.iter().any(|s| s == step) => {
            (Pre::Running, vec!["vm", "delete", "-f", VM])
        }
        "stop" | "teardown" => (Pre::Running, vec!["vm", "stop", VM]),
        _ => panic!("failpoint {step}: no plan for it; add one"),
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Pre {
    Nothing,
    Created,
    Running,
}

fn log_len(inst: &Instance) -> usize {
    std::fs::read_to_string(inst.state().join("bangerd.log"))
        .map(|s| s.len())
        .unwrap_or(0)
}

fn log_since(inst: &Instance, from: usize) -> String {
    std::fs::read_to_string(inst.state().join("bangerd.log"))
        .map(|s| s.get(from..).unwrap_or("").to_string())
        .unwrap_or_default()
}

/// The VM is in a state a user can stand behind: absent with nothing of it
/// left; running with its VMM and tap and answering ssh; or created /
/// stopped / in error with no VMM, tap or rule left.
fn assert_consistent(inst: &Instance, what: &str) {
    inst.settle();
    match inst.vm(VM) {
        None => {
            assert!(inst.vmm_processes().is_empty(), "{what}: VMM left");
            assert!(
                inst.taps().is_empty(),
                "{what}: taps left {:?}",
                inst.taps()
            );
            assert!(
                !inst.net.ruleset().contains("table inet banger"),
                "{what}: NAT rules left"
            );
            assert!(
                inst.vm_files().is_empty(),
                "{what}: files left {:?}",
                inst.vm_files()
            );
        }
        Some(v) if v["state"] == "running" => {
            assert_eq!(inst.vmm_processes().len(), 1, "{what}: {v}");
            assert_eq!(inst.taps().len(), 1, "{what}: {v}");
            let out = inst.banger(&["vm", "ssh", VM, "--", "hostname"]);
            assert_eq!(ok(&out, what).trim(), VM, "{what}");
        }
        Some(v) => {
            let st = v["state"].as_str().unwrap_or("");
            assert!(
                ["created", "stopped", "error"].contains(&st),
                "{what}: state {st}: {v}"
            );
            assert!(inst.vmm_processes().is_empty(), "{what}: VMM left ({v})");
            assert!(
                inst.taps().is_empty(),
                "{what}: taps left {:?}",
                inst.taps()
            );
            assert!(
                !inst.net.ruleset().contains("comment \"banger:"),
                "{what}: NAT rules left"
            );
        }
    }
}

fn one(inst: &Instance, step: &str, mode: &str) {
    let what = format!("{step}={mode}");
    // (Refused once it exists: the volume outlives the iterations.)
    let _ = inst.banger(&["volume", "create", "fpvol", "--size", "16M"]);
    let (pre, op) = plan(step);
    // The precondition, with a daemon without failpoints. (A VM with a
    // `--mount` keeps no RAM file: the `ram` steps' VM has none.)
    let mut args: Vec<&str> = vec!["--name", VM, "-p", PORT, "--volume", VOLUME];
    if !step.ends_with(".ram") {
        args.extend(["--mount", MOUNT]);
    }
    match pre {
        Pre::Nothing => {}
        // (With a published port, so that its listener is a resource too.)
        Pre::Created => {
            let a: Vec<&str> = ["vm", "create"].into_iter().chain(args).collect();
            ok(&inst.banger(&a), &what);
        }
        Pre::Running => {
            let a: Vec<&str> = ["vm", "run"]
                .into_iter()
                .chain(args)
                .chain(["--", "true"])
                .collect();
            ok(&inst.banger(&a), &what);
        }
    }
    // A daemon with the failpoint.
    let from = daemon_with(inst, step, mode, &what);
    let out = inst.banger(&op);
    let log = log_since(inst, from);
    assert!(
        log.contains(&format!("failpoint {step}:")),
        "{what}: the request never met its failpoint ({:?} -> {}):\n{log}",
        op,
        text(&out.stderr)
    );
    if mode == "die" {
        assert!(!out.status.success(), "{what}: the daemon died under it");
    } else if !step.starts_with("teardown.") || step == "teardown.vmm" {
        // (Other teardown steps hand a failure to the release, which
        // retries it after the reply: the request itself succeeds.)
        assert!(!out.status.success(), "{what}: {out:?}");
        let err = text(&out.stderr);
        assert!(err.contains(&format!("failpoint {step}")), "{what}: {err}");
    }
    // An injected error is rolled back by the request itself: the host is
    // consistent before any other daemon reconciles it. (Not a teardown
    // step's: its failure stays injected into the retried release while
    // this daemon lives.)
    if mode == "err" && !step.starts_with("teardown.") {
        assert_consistent(inst, &format!("{what}, before a restart"));
    }
    // Whatever the daemon left, the next one (without failpoints) makes
    // sense of it.
    inst.kill_daemon();
    assert_consistent(inst, &what);
    if inst.vm(VM).is_some() {
        ok(&inst.banger(&["vm", "delete", "-f", VM]), &what);
    }
    inst.assert_baseline();
}

fn run_stage(stages: &[&str]) {
    let inst = Instance::new(&banger_bin()).with_image();
    let t = Instant::now();
    let steps: Vec<String> = bangerd::failpoint::names()
        .into_iter()
        .filter(|s| {
            let (_, op) = plan(s);
            stages.contains(&op[1])
        })
        .filter(|s| {
            // A dm-snapshot is only held where device-mapper exists.
            let unreachable = s.as_str() == "teardown.dm_snapshot"
                && !bangerd::resources::root_disk::dm::available();
            if unreachable {
                test_infra::not_run_here(
                    &format!("failpoint {s}"),
                    "this kernel has no device-mapper, so no VM holds a dm-snapshot to tear down",
                );
            }
            !unreachable
        })
        .collect();
    assert!(!steps.is_empty());
    for step in &steps {
        for mode in ["err", "die"] {
            one(&inst, step, mode);
        }
    }
    eprintln!(
        "failpoints {stages:?}: {} steps x 2 modes in {:.1} s",
        steps.len(),
        t.elapsed().as_secs_f64()
    );
}

#[test]
fn every_create_and_start_step_fails_cleanly_and_survives_a_crash() {
    run_stage(&["run", "start"]);
}

#[test]
fn every_stop_and_kill_step_fails_cleanly_and_survives_a_crash() {
    run_stage(&["stop", "kill"]);
}

#[test]
fn every_delete_step_fails_cleanly_and_survives_a_crash() {
    run_stage(&["delete"]);
}

/// The loop covers every failpoint the daemon has.
#[test]
fn every_failpoint_has_a_plan() {
    let names = bangerd::failpoint::names();
    assert!(names.len() > 20, "{names:?}");
    for n in &names {
        let _ = plan(n);
    }
}

/// A VMM that survives SIGKILL (a process stuck in the kernel, state D):
/// simulated by the `vmm.kill` failpoint, which makes the kill fail while
/// the VMM runs on (a real D state cannot be produced on demand here).
/// The VM is not marked stopped, cannot be started on the same disks, and
/// the user is told why and what to do; once the VMM can be killed, `vm
/// kill` finishes the job and nothing is left.
#[test]
fn a_vmm_that_survives_sigkill_keeps_its_vm_from_starting() {
    let inst = Instance::new(&banger_bin()).with_image();
    ok(
        &inst.banger(&["vm", "run", "--name", VM, "--", "true"]),
        "run",
    );
    inst.kill_daemon();
    let out = inst
        .banger_cmd(&["daemon", "ping"])
        .env("FAILPOINTS", "vmm.kill=return(err)")
        .output()
        .unwrap();
    ok(&out, "a daemon whose kills fail");
    let out = inst.banger(&["vm", "kill", VM]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("survives SIGKILL") && err.contains("banger vm kill fp"),
        "{err}"
    );
    let vm = inst.vm(VM).unwrap();
    assert_eq!(vm["state"], "error", "not marked stopped: {vm}");
    assert!(vm["last_error"]
        .as_str()
        .unwrap()
        .contains("survives SIGKILL"));
    assert_eq!(inst.vmm_processes().len(), 1, "the VMM still runs");
    assert_eq!(inst.taps().len(), 1, "its tap stays: the VMM uses it");
    let out = inst.banger(&["vm", "start", VM]);
    assert!(
        !out.status.success(),
        "started on the disks a VMM still uses"
    );
    assert!(text(&out.stderr).contains("survives SIGKILL"), "{out:?}");
    assert_eq!(inst.vmm_processes().len(), 1, "and nothing was started");

    // The VMM can be killed again: kill finishes the teardown.
    inst.kill_daemon();
    ok(&inst.banger(&["vm", "kill", VM]), "kill again");
    assert_eq!(inst.vm(VM).unwrap()["state"], "stopped");
    inst.settle();
    assert!(inst.vmm_processes().is_empty());
    assert!(inst.taps().is_empty());
    ok(&inst.banger(&["vm", "delete", "-f", VM]), "delete");
    inst.assert_baseline();
}

/// A release that fails is tried again by itself while the daemon runs,
/// after a backoff (1 s, then 2 s, ...): here the tap would not go, so
/// its address stays reserved with it, while the firewall's elements (an
/// item of their own, needing neither) are gone at once. `daemon status`
/// says whose, why, how often and when the next try is.
#[test]
fn a_failed_release_is_retried_by_itself_and_shown() {
    let inst = Instance::new(&banger_bin()).with_image();
    ok(
        &inst.banger(&["vm", "run", "--name", VM, "--", "true"]),
        "run",
    );
    let ip = inst.guest_ip(VM);
    inst.kill_daemon();
    let out = inst
        .banger_cmd(&["daemon", "ping"])
        .env("FAILPOINTS", "release.tap=2*return(err)")
        .output()
        .unwrap();
    ok(&out, "a daemon whose firewall releases fail twice");
    ok(&inst.banger(&["vm", "rm", "-f", VM]), "rm");
    let status = || -> serde_json::Value {
        serde_json::from_str(&ok(&inst.banger(&["daemon", "status", "--json"]), "status")).unwrap()
    };
    let mut seen = serde_json::Value::Null;
    assert!(
        wait_until(Duration::from_secs(30), || {
            seen = status();
            !seen["failed_releases"].as_array().unwrap().is_empty()
        }),
        "no failed release shown: {seen}"
    );
    let f = &seen["failed_releases"][0];
    assert_eq!(f["vm"], VM, "{seen}");
    assert!(
        f["error"]
            .as_str()
            .unwrap()
            .contains("failpoint release.tap"),
        "{seen}"
    );
    assert!(f["attempts"].as_u64().unwrap() >= 1, "{seen}");
    let text = ok(&inst.banger(&["daemon", "status"]), "status");
    assert!(text.contains("vm fp: failed"), "{text}");
    // The firewall's elements did not wait for it; the tap is still there.
    assert!(!inst.in_firewall(&ip));
    assert_eq!(inst.taps().len(), 1, "{:?}", inst.taps());
    // Then it succeeds by itself: no settle, no restart.
    assert!(
        wait_until(Duration::from_secs(30), || {
            seen = status();
            seen["failed_releases"].as_array().unwrap().is_empty() && seen["pending_releases"] == 0
        }),
        "never retried: {seen}"
    );
    assert!(inst.taps().is_empty(), "{:?}", inst.taps());
    inst.assert_baseline();
}

/// The instance's daemon restarted with failpoint `step` set to `mode`:
/// the daemon log's length then (what follows is this run's).
fn daemon_with(inst: &Instance, step: &str, mode: &str, what: &str) -> usize {
    inst.kill_daemon();
    let out = inst
        .banger_cmd(&["daemon", "ping"])
        .env("FAILPOINTS", format!("{step}=return({mode})"))
        .output()
        .unwrap();
    ok(&out, what);
    log_len(inst)
}

/// The request `out` met failpoint `step` (in the daemon's log since
/// `from`) and failed.
fn failed_at(inst: &Instance, from: usize, step: &str, what: &str, out: &std::process::Output) {
    let log = log_since(inst, from);
    assert!(
        log.contains(&format!("failpoint {step}:")),
        "{what}: never met ({}):\n{log}",
        text(&out.stderr)
    );
    assert!(!out.status.success(), "{what}: {out:?}");
}

/// The snapshots on disk (one directory each) and the ones listed.
/// (Listed first: that starts the daemon, whose reconcile removes what
/// a crash left.)
fn snapshots(inst: &Instance) -> (usize, Vec<String>) {
    let out = inst.banger(&["snapshot", "ls", "-a", "-q"]);
    let listed = ok(&out, "snapshot ls")
        .lines()
        .map(str::to_string)
        .collect();
    let dirs = std::fs::read_dir(inst.state().join("snapshots"))
        .map(|d| d.count())
        .unwrap_or(0);
    (dirs, listed)
}

/// Every step of a snapshot and of a clone's restore, failing and
/// crashing the daemon: no half snapshot is listed or left on disk, the
/// VM snapshotted runs on (a crash while it was stopped for the save is
/// undone by the next daemon), and a clone cut short is either gone or a
/// VM that a start brings up as itself.
#[test]
fn every_snapshot_and_restore_step_fails_cleanly_and_survives_a_crash() {
    snapshot_steps(Instance::new(&banger_bin()).with_image(), &[]);
}

/// The same on Firecracker through its jailer (both played by their
/// doubles here): `/snapshot/create` into the jail, and a clone's bare
/// Firecracker given `/snapshot/load`.
#[test]
fn every_firecracker_snapshot_and_restore_step_fails_cleanly_and_survives_a_crash() {
    snapshot_steps(firecracker_instance(), &["--vmm", "firecracker"]);
}

fn snapshot_steps(inst: Instance, vmm: &[&str]) {
    let mut run = vec!["vm", "run", "-d", "--name", "sp"];
    run.extend_from_slice(vmm);
    ok(&inst.banger(&run), "vm run -d sp");
    // (The double's Firecracker is two processes, itself and its QEMU.)
    let per_vm = inst.vmm_processes().len();
    ok(&inst.banger(&["vm", "snapshot", "sp", "s"]), "snapshot s");
    for step in bangerd::snapshots::FAILPOINTS {
        for mode in ["err", "die"] {
            let what = format!("{step}={mode}");
            let from = daemon_with(&inst, step, mode, &what);
            let snapshot = step.starts_with("snapshot.");
            let out = if snapshot {
                inst.banger(&["vm", "snapshot", "sp", "s2"])
            } else {
                inst.banger(&["vm", "run", "-d", "--from", "s", "--name", "c"])
            };
            failed_at(&inst, from, step, &what, &out);
            // The next daemon (without failpoints) makes sense of it.
            inst.kill_daemon();
            let (dirs, listed) = snapshots(&inst);
            assert_eq!(listed, vec!["s"], "{what}: no half snapshot listed");
            assert_eq!(dirs, 1, "{what}: no half snapshot left on disk");
            let sp = inst.vm("sp").unwrap();
            assert_eq!(sp["state"], "running", "{what}: {sp}");
            let out = inst.banger(&["vm", "exec", "sp", "--", "hostname"]);
            assert_eq!(ok(&out, &what).trim(), "sp", "{what}");
            if let Some(c) = inst.vm("c") {
                if c["state"] != "running" {
                    assert_eq!(inst.vmm_processes().len(), per_vm, "{what}: only sp's VMM");
                    ok(&inst.banger(&["vm", "start", "c"]), &what);
                }
                let out = inst.banger(&["vm", "exec", "c", "--", "hostname"]);
                assert_eq!(ok(&out, &what).trim(), "c", "{what}");
                ok(&inst.banger(&["vm", "rm", "-f", "c"]), &what);
            }
        }
    }
    ok(&inst.banger(&["snapshot", "rm", "s"]), "snapshot rm");
    ok(&inst.banger(&["vm", "rm", "-f", "sp"]), "vm rm -f");
    assert_eq!(snapshots(&inst).0, 0);
    inst.assert_baseline();
}

/// Every step of `vm pause --to-disk` and of the resume, failing and
/// crashing the daemon: the VM runs on, or is suspended with its saved
/// guest (and resumes with its memory), or, a resume that failed after its
/// guest ran, boots again; no saved guest is left without its VM.
#[test]
fn every_suspend_and_resume_step_fails_cleanly_and_survives_a_crash() {
    suspend_steps(Instance::new(&banger_bin()).with_image(), &[]);
}

/// The same on Firecracker through its jailer (their doubles here).
#[test]
fn every_firecracker_suspend_and_resume_step_fails_cleanly_and_survives_a_crash() {
    suspend_steps(firecracker_instance(), &["--vmm", "firecracker"]);
}

/// An instance whose Firecracker runs under its jailer (both doubles).
fn firecracker_instance() -> Instance {
    let bin = banger_bin();
    let (fc, jailer) = (
        bin.with_file_name("firecracker-double"),
        bin.with_file_name("jailer-double"),
    );
    assert!(fc.is_file() && jailer.is_file(), "build the doubles");
    Instance::new(&bin)
        .with_image()
        .with_env("BANGER_FIRECRACKER", fc.to_str().unwrap())
        .with_env("BANGER_JAILER", jailer.to_str().unwrap())
}

fn suspend_steps(inst: Instance, vmm: &[&str]) {
    let mut run = vec!["vm", "run", "-d", "--name", "sp"];
    run.extend_from_slice(vmm);
    ok(&inst.banger(&run), "vm run -d sp");
    let steps = bangerd::snapshots::FAILPOINTS
        .iter()
        .chain(bangerd::suspend::FAILPOINTS);
    for step in steps {
        for mode in ["err", "die"] {
            let what = format!("{step}={mode}");
            // A mark in the guest's memory (tmpfs): there after a resume.
            let out = inst.banger(&[
                "vm",
                "exec",
                "sp",
                "--",
                "sh",
                "-c",
                "echo m > /dev/shm/mark",
            ]);
            ok(&out, &what);
            let resume = step.starts_with("restore.");
            if resume {
                ok(&inst.banger(&["vm", "pause", "--to-disk", "sp"]), &what);
            }
            let from = daemon_with(&inst, step, mode, &what);
            let out = if resume {
                inst.banger(&["vm", "resume", "sp"])
            } else {
                inst.banger(&["vm", "pause", "--to-disk", "sp"])
            };
            failed_at(&inst, from, step, &what, &out);
            // The next daemon (without failpoints) makes sense of it: the
            // VM runs, or is suspended, or (a resume that failed once its
            // guest ran) stopped; each goes on from there.
            inst.kill_daemon();
            let sp = inst.vm("sp").unwrap();
            let state = sp["state"].as_str().unwrap_or_default().to_string();
            let (dirs, listed) = snapshots(&inst);
            let saved = usize::from(state == "suspended");
            assert_eq!(
                listed.len(),
                saved,
                "{what}: {state}, saved guests {listed:?}"
            );
            assert_eq!(dirs, saved, "{what}: {state}, no half saved guest on disk");
            let cold = match state.as_str() {
                "running" => false,
                "suspended" => {
                    ok(&inst.banger(&["vm", "resume", "sp"]), &what);
                    false
                }
                _ => {
                    ok(&inst.banger(&["vm", "start", "sp"]), &what);
                    true
                }
            };
            let out = inst.banger(&["vm", "exec", "sp", "--", "hostname"]);
            assert_eq!(ok(&out, &what).trim(), "sp", "{what}");
            let mark = inst.banger(&["vm", "exec", "sp", "--", "cat", "/dev/shm/mark"]);
            assert_eq!(
                mark.status.success(),
                !cold,
                "{what}: the guest's memory kept unless it booted again"
            );
            assert_eq!(
                snapshots(&inst),
                (0, Vec::new()),
                "{what}: nothing saved left"
            );
        }
    }
    ok(&inst.banger(&["vm", "rm", "-f", "sp"]), "vm rm -f");
    inst.assert_baseline();
}
