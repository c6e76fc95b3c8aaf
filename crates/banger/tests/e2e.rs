//! End to end, with real parts: a daemon in a network namespace of the
//! test's own (with a veth uplink to a second namespace playing the outside
//! world), real QEMU guests booted from the prebuilt default image, real
//! taps and nftables rules, real SSH. Needs root; `scripts/test.sh` runs it.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use test_infra::{ok, text, vm_list, wait_until, Instance};

fn banger_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_banger"))
}

/// `curl` in the guest of a file served by the outside namespace on :8080.
fn fetch_from_outside(inst: &Instance, vm: &str, file: &str) -> Output {
    let url = format!("http://{}:8080/{file}", inst.net.outside_ip);
    inst.banger(&[
        "vm",
        "ssh",
        vm,
        "--",
        "curl",
        "-fsS",
        "--max-time",
        "20",
        &url,
    ])
}

fn settle(inst: &Instance) {
    inst.settle();
}

fn assert_baseline(inst: &Instance) {
    inst.assert_baseline();
}

fn taps(inst: &Instance) -> Vec<String> {
    inst.taps()
}

fn vmm_processes(inst: &Instance) -> Vec<(i32, String)> {
    inst.vmm_processes()
}

#[test]
fn lifecycle_run_stop_start_crash_delete() {
    let inst = Instance::new(&banger_bin()).with_image();

    // An HTTP server in the outside namespace, for the NAT check.
    let www = inst.dir.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("hello.txt"), "hello from outside\n").unwrap();
    let _httpd = inst.net.http_server(&www, 8080);

    // vm run prints the hostname, which is the VM's name.
    let out = inst.banger(&["vm", "run", "--name", "hello", "--", "cat", "/etc/hostname"]);
    assert_eq!(ok(&out, "vm run").trim(), "hello");
    let spec = text(&out.stderr);
    assert!(
        spec.contains("hello: ") && spec.contains("vCPU") && spec.contains("vmm qemu"),
        "spec line: {spec}"
    );

    // The image lists its size and its VM, and cannot go while it has one.
    let images: Vec<serde_json::Value> =
        serde_json::from_str(&ok(&inst.banger(&["image", "ls", "--json"]), "image ls")).unwrap();
    assert_eq!(
        images[0]["used_by"],
        serde_json::json!(["hello"]),
        "{images:?}"
    );
    assert!(
        images[0]["disk_bytes"].as_u64().unwrap() > 1 << 20,
        "{images:?}"
    );
    let out = inst.banger(&["image", "rm", "bookworm"]);
    assert!(
        !out.status.success() && text(&out.stderr).contains("hello"),
        "{}",
        text(&out.stderr)
    );

    // Status and both streams come back separately.
    let out = inst.banger(&[
        "vm",
        "ssh",
        "hello",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert_eq!(text(&out.stdout), "out\n");
    assert_eq!(text(&out.stderr), "err\n");

    // The VM's NAT rules exist and work: the guest reaches the outside.
    let vms = vm_list(&inst.banger(&["vm", "ls", "--json"]));
    assert_eq!(vms.len(), 1);
    assert_eq!(vms[0]["state"], "running");
    let ip = vms[0]["guest_ip"].as_str().unwrap().to_string();
    assert!(inst.in_firewall(&ip), "{}", inst.net.ruleset());
    assert_eq!(taps(&inst).len(), 1);
    let out = fetch_from_outside(&inst, "hello", "hello.txt");
    assert_eq!(ok(&out, "curl from guest"), "hello from outside\n");

    // The work disk survives stop/start; stop tears the network down.
    ok(
        &inst.banger(&[
            "vm",
            "ssh",
            "hello",
            "--",
            "sh",
            "-c",
            "echo kept > /work/f",
        ]),
        "write work disk",
    );
    ok(&inst.banger(&["vm", "stop", "hello"]), "vm stop");
    let vms = vm_list(&inst.banger(&["vm", "ls", "--json"]));
    assert_eq!(vms[0]["state"], "stopped");
    assert!(vmm_processes(&inst).is_empty(), "stop waits for the VMM");
    settle(&inst);
    assert!(taps(&inst).is_empty(), "stop leaves no tap");
    assert!(
        !inst.net.ruleset().contains("comment \"banger:"),
        "stop leaves no rule"
    );
    ok(&inst.banger(&["vm", "start", "hello"]), "vm start");
    let out = inst.banger(&["vm", "ssh", "hello", "--", "cat", "/work/f"]);
    assert_eq!(ok(&out, "read work disk"), "kept\n");

    // kill -9 of the daemon: the next CLI call starts a new one, which finds
    // the VM still alive; ssh still connects; delete still cleans.
    let old = inst.daemon_pid();
    inst.kill_daemon();
    let out = inst.banger(&["vm", "ssh", "hello", "--", "hostname"]);
    assert_eq!(ok(&out, "ssh after daemon crash"), "hello\n");
    let new = inst.daemon_pid();
    assert_ne!(old, new, "a new daemon answered");
    let vms = vm_list(&inst.banger(&["vm", "ls", "--json"]));
    assert_eq!(vms[0]["state"], "running", "reconcile kept the live VM");

    ok(&inst.banger(&["vm", "delete", "-f", "hello"]), "vm delete");
    assert_baseline(&inst);
}

#[test]
fn run_rm_deletes_the_vm_and_keeps_the_status() {
    let inst = Instance::new(&banger_bin()).with_image();
    let out = inst.banger(&["vm", "run", "--rm", "--", "sh", "-c", "uname -s; exit 3"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(text(&out.stdout), "Linux\n");
    assert!(
        !text(&out.stderr).contains("another version of banger"),
        "the test image is current: {}",
        text(&out.stderr)
    );
    assert_baseline(&inst);

    // An image built by another banger (its manifest names another recipe)
    // is said to be one, by create and by doctor. The manifest is replaced,
    // not edited: the image is hard-linked from the shared test cache.
    let m = inst.state().join("images/bookworm/manifest.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&m).unwrap()).unwrap();
    assert!(v["recipe"].as_str().is_some_and(|r| r.len() == 16), "{v}");
    v["recipe"] = "0000000000000000".into();
    let tmp = m.with_extension("tmp");
    std::fs::write(&tmp, v.to_string()).unwrap();
    std::fs::rename(&tmp, &m).unwrap();
    let out = inst.banger(&["vm", "create", "--name", "old"]);
    ok(&out, "create on an old image");
    assert!(
        text(&out.stderr).contains("built by another version of banger"),
        "{}",
        text(&out.stderr)
    );
    let doctor = text(&inst.banger(&["doctor"]).stdout);
    assert!(doctor.contains("built by another version"), "{doctor}");
    assert!(
        doctor.contains("fix: banger image build --force"),
        "{doctor}"
    );
    ok(&inst.banger(&["vm", "delete", "-f", "old"]), "delete");
    assert_baseline(&inst);
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let inst = Instance::new(&banger_bin()).with_image();
    let refused = |args: &[&str], needle: &str| {
        let out = inst.banger(args);
        assert!(!out.status.success(), "{args:?} should fail");
        let err = text(&out.stderr);
        assert!(
            err.contains(needle),
            "{args:?}: error {err:?} lacks {needle:?}"
        );
        assert!(!err.contains("panicked"), "{err}");
    };
    refused(
        &["vm", "run", "--name", "Foo_1", "--", "true"],
        "not a DNS label",
    );
    refused(
        &["vm", "create", "--name=-x"],
        "may not start or end with '-'",
    );
    refused(&["vm", "create", "--name", &"a".repeat(64)], "at most 63");
    refused(&["vm", "create", "--cpus", "0"], "--cpus 0 is out of range");
    refused(&["vm", "create", "--cpus", "100000"], "is out of range");
    refused(
        &["vm", "create", "--memory", "0"],
        "--memory 0 MiB is out of range",
    );
    refused(&["vm", "create", "--memory", "64T"], "is out of range");
    refused(
        &["vm", "create", "--disk-size", "0"],
        "--disk-size 0 MiB is out of range",
    );
    refused(&["vm", "create", "--disk-size", "lots"], "not a number");
    refused(
        &["vm", "create", "--image", "nope"],
        "image \"nope\" is not built",
    );
    refused(
        &["vm", "create", "--vmm", "firecracker"],
        "no firecracker binary",
    );
    refused(
        &[
            "vm",
            "create",
            "--net",
            "none",
            "--allow-net",
            "10.9.0.0/16",
        ],
        "--net none with --allow-net 10.9.0.0/16",
    );
    // --allow-net cannot open the host itself, nor the guests' subnet.
    refused(
        &["vm", "create", "--allow-net", "127.0.0.1/32"],
        "--allow-net 127.0.0.1/32: that is this host's own address",
    );
    refused(
        &["vm", "create", "--allow-net", "172.30.4.0/24"],
        "that is banger's guest subnet (172.30.0.0/16)",
    );
    refused(
        &["vm", "create", "--mount", "/tmp:/b:bogus"],
        "\"bogus\" is not an option: use :ro",
    );
    for verb in ["start", "stop", "kill", "delete", "rm", "ssh", "show"] {
        refused(&["vm", verb, "ghost"], "vm \"ghost\" not found");
    }
    assert!(vm_list(&inst.banger(&["vm", "ls", "--json"])).is_empty());
    assert!(inst.vm_files().is_empty(), "{:?}", inst.vm_files());

    // A duplicate name: the first VM stays, the second leaves nothing.
    ok(
        &inst.banger(&["vm", "create", "--name", "dup"]),
        "create dup",
    );
    let files = inst.vm_files();
    refused(
        &["vm", "create", "--name", "dup"],
        "vm \"dup\" already exists",
    );
    refused(&["vm", "stop", "dup"], "cannot stop it");
    assert_eq!(vm_list(&inst.banger(&["vm", "ls", "--json"])).len(), 1);
    assert_eq!(inst.vm_files(), files);
    assert!(taps(&inst).is_empty());
    ok(&inst.banger(&["vm", "delete", "-f", "dup"]), "delete dup");
    assert_baseline(&inst);
}

#[test]
fn one_daemon_per_state_dir() {
    let inst = Instance::new(&banger_bin());
    let pid = inst.daemon_pid();
    let bangerd = banger_bin().with_file_name("bangerd");
    let out = inst
        .net
        .cmd(&bangerd)
        .arg("--state-dir")
        .arg(inst.state())
        .arg("--runtime-dir")
        .arg(inst.runtime())
        .output()
        .expect("second bangerd");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("only one daemon per state dir"),
        "{out:?}"
    );
    assert_eq!(inst.daemon_pid(), pid, "the first daemon still answers");
    inst.kill_daemon();
    assert!(wait_until(Duration::from_secs(5), || inst
        .processes()
        .is_empty()));
    let _ = Command::new("true").status();
}

/// Crashes are cleaned up: a VMM that dies under a running daemon (the
/// reaper path), and one that dies while no daemon runs (the reconcile
/// path), both leave the VM stopped with no tap or NAT rule behind.
#[test]
fn dead_vmms_are_cleaned_up_with_or_without_a_daemon() {
    let inst = Instance::new(&banger_bin()).with_image();
    let kill_vmm = |inst: &Instance| {
        let vmms = vmm_processes(inst);
        assert_eq!(vmms.len(), 1, "{vmms:?}");
        let _ = Command::new("kill")
            .args(["-9", &vmms[0].0.to_string()])
            .status();
    };
    let state = |inst: &Instance| {
        vm_list(&inst.banger(&["vm", "ls", "--json"]))[0]["state"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    ok(
        &inst.banger(&["vm", "run", "--name", "crashy", "--", "true"]),
        "vm run",
    );

    // The daemon is alive: its reaper notices and tears down.
    kill_vmm(&inst);
    assert!(
        wait_until(Duration::from_secs(10), || state(&inst) == "stopped"),
        "reaper demoted the VM"
    );
    settle(&inst);
    assert!(taps(&inst).is_empty(), "reaper removed the tap");
    assert!(
        !inst.net.ruleset().contains("table inet banger"),
        "and the rules"
    );
    let vms = vm_list(&inst.banger(&["vm", "ls", "--json"]));
    assert!(
        vms[0]["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("exited"),
        "{vms:?}"
    );

    // No daemon: the next one reconciles.
    ok(&inst.banger(&["vm", "start", "crashy"]), "vm start");
    assert_eq!(taps(&inst).len(), 1);
    inst.kill_daemon();
    kill_vmm(&inst);
    assert!(wait_until(Duration::from_secs(5), || vmm_processes(&inst).is_empty()));
    assert_eq!(state(&inst), "stopped", "reconcile demoted the VM");
    settle(&inst);
    assert!(taps(&inst).is_empty(), "reconcile removed the tap");
    assert!(
        !inst.net.ruleset().contains("table inet banger"),
        "and the rules"
    );

    // And it still boots afterwards.
    let out = inst.banger(&["vm", "start", "crashy"]);
    ok(&out, "start after crash");
    let out = inst.banger(&["vm", "ssh", "crashy", "--", "hostname"]);
    assert_eq!(ok(&out, "ssh after crash"), "crashy\n");
    ok(&inst.banger(&["vm", "delete", "-f", "crashy"]), "vm delete");
    assert_baseline(&inst);
}

/// Two VMs started at once share the NAT table: each gets its own tap,
/// address and three rules; deleting one leaves the other's rules (and its
/// network) intact; deleting the last removes the table.
#[test]
fn two_vms_at_once_share_the_nat_table_safely() {
    let inst = Instance::new(&banger_bin()).with_image();
    let www = inst.dir.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("ok"), "reachable\n").unwrap();
    let _httpd = inst.net.http_server(&www, 8080);
    let _ = inst.daemon_pid();
    let runs: Vec<_> = ["one", "two"]
        .iter()
        .map(|n| {
            inst.banger_cmd(&["vm", "run", "--name", n, "--", "true"])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn vm run")
        })
        .collect();
    for r in runs {
        let out = test_infra::bounded::wait_output(r);
        ok(&out, "parallel vm run");
    }
    let vms = vm_list(&inst.banger(&["vm", "ls", "--json"]));
    assert_eq!(vms.len(), 2);
    assert_ne!(vms[0]["guest_ip"], vms[1]["guest_ip"], "distinct addresses");
    assert_eq!(taps(&inst).len(), 2, "a tap each");
    for v in &vms {
        let ip = v["guest_ip"].as_str().unwrap();
        assert!(inst.in_firewall(ip), "{}", inst.net.ruleset());
    }

    ok(&inst.banger(&["vm", "delete", "-f", "one"]), "delete one");
    settle(&inst);
    let rules = inst.net.ruleset();
    assert!(
        rules.contains("table inet banger"),
        "the table stays for two:\n{rules}"
    );
    let left: Vec<&serde_json::Value> = vms.iter().filter(|v| v["name"] == "two").collect();
    assert!(
        inst.in_firewall(left[0]["guest_ip"].as_str().unwrap()),
        "{rules}"
    );
    let gone: Vec<&serde_json::Value> = vms.iter().filter(|v| v["name"] == "one").collect();
    assert!(
        !inst.in_firewall(gone[0]["guest_ip"].as_str().unwrap()),
        "{rules}"
    );
    assert_eq!(taps(&inst).len(), 1);
    let out = fetch_from_outside(&inst, "two", "ok");
    assert_eq!(ok(&out, "two still reaches the outside"), "reachable\n");

    ok(&inst.banger(&["vm", "delete", "-f", "two"]), "delete two");
    assert_baseline(&inst);
}

/// SIGTERM lets requests in flight finish: a `vm run` whose daemon is told
/// to stop mid-boot still succeeds, and the next daemon finds the VM.
#[test]
fn sigterm_drains_requests_in_flight() {
    let inst = Instance::new(&banger_bin()).with_image();
    let pid = inst.daemon_pid();
    let run = inst
        .banger_cmd(&["vm", "run", "--name", "drained", "--", "hostname"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vm run");
    // Once the VMM runs, the boot wait is in flight.
    assert!(wait_until(Duration::from_secs(20), || !vmm_processes(
        &inst
    )
    .is_empty()));
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let out = test_infra::bounded::wait_output(run);
    assert_eq!(ok(&out, "vm run across a SIGTERM"), "drained\n");
    assert!(
        wait_until(Duration::from_secs(10), || !inst
            .processes()
            .iter()
            .any(|(p, _)| *p == pid)),
        "the old daemon exits once drained"
    );
    let vms = vm_list(&inst.banger(&["vm", "ls", "--json"]));
    assert_eq!(vms[0]["state"], "running", "a new daemon kept the VM");
    ok(
        &inst.banger(&["vm", "delete", "-f", "drained"]),
        "vm delete",
    );
    assert_baseline(&inst);
}

/// Taps and NAT rules are released after the reply, and that is safe: a
/// restart of the VM waits for its previous boot's release (its new rules
/// survive it), a new VM does not get the address of a tap still being
/// released, and a release pending when the daemon dies is finished by the
/// next daemon. The janitor is slowed down with the daemon's test hook so
/// that "pending" lasts long enough to look at.
#[test]
fn releases_after_the_reply_are_ordered_and_survive_a_daemon_crash() {
    let inst = Instance::new(&banger_bin()).with_image();
    let slow_daemon = || {
        let out = inst
            .banger_cmd(&["daemon", "ping"])
            .env("BANGER_TEST_RELEASE_DELAY_MS", "1500")
            .output()
            .unwrap();
        ok(&out, "start a daemon with a slow janitor");
    };
    slow_daemon();
    ok(
        &inst.banger(&["vm", "run", "--name", "a", "--", "true"]),
        "vm run",
    );
    let a = vm_list(&inst.banger(&["vm", "ls", "--json"]));
    let a_ip = a[0]["guest_ip"].as_str().unwrap().to_string();

    // Stop returns with the VMM gone and the tap still being released.
    ok(&inst.banger(&["vm", "stop", "a"]), "vm stop");
    assert!(vmm_processes(&inst).is_empty());
    assert_eq!(taps(&inst).len(), 1, "release deferred past the reply");
    // Start waits for that release: the rules it adds are not deleted by
    // the release of the previous boot.
    ok(&inst.banger(&["vm", "start", "a"]), "vm start");
    settle(&inst);
    assert!(
        inst.in_firewall(&a_ip),
        "the restarted VM keeps its rules:\n{}",
        inst.net.ruleset()
    );
    assert_eq!(taps(&inst).len(), 1);

    // A deleted VM's address stays reserved while its tap is released.
    ok(&inst.banger(&["vm", "delete", "-f", "a"]), "vm delete");
    assert_eq!(taps(&inst).len(), 1, "release deferred past the reply");
    ok(&inst.banger(&["vm", "create", "--name", "b"]), "vm create");
    let b = vm_list(&inst.banger(&["vm", "ls", "--json"]));
    assert_ne!(
        b[0]["guest_ip"].as_str().unwrap(),
        a_ip,
        "address reused too early"
    );
    ok(&inst.banger(&["vm", "delete", "-f", "b"]), "vm delete b");

    // The daemon dies with a's release pending; the next one finishes it.
    inst.kill_daemon();
    assert_eq!(taps(&inst).len(), 1, "still pending at the crash");
    assert_baseline(&inst);
}

/// The Firecracker driver end to end. Firecracker needs hardware KVM, which
/// these machines lack, so the daemon is given `firecracker-double`
/// (test-infra) as its binary: it checks every API request against the
/// official spec file and Firecracker's own rules, and boots the configured
/// guest with QEMU (virtio-pci devices, not Firecracker's virtio-mmio: see
/// the double's notes). On a KVM host the same
/// path runs the real binary (`BANGER_FIRECRACKER` or `firecracker` on
/// PATH).
#[test]
fn firecracker_driver_runs_stops_and_deletes_through_the_spec_checked_double() {
    let inst = Instance::new(&banger_bin()).with_image();
    inst.start_daemon_with_firecracker_double();
    let doctor = ok(&inst.banger(&["doctor"]), "doctor");
    assert!(doctor.contains("firecracker-double"), "{doctor}");
    let out = inst.banger(&[
        "vm",
        "run",
        "--vmm",
        "firecracker",
        "--name",
        "fc",
        "--cpus",
        "2",
        "--",
        "sh",
        "-c",
        "cat /etc/hostname; nproc",
    ]);
    // Every vCPU asked for (the double boots the guest with
    // `vcpu_count` CPUs and the boot line banger gives Firecracker).
    assert_eq!(ok(&out, "vm run on firecracker"), "fc\n2\n");
    assert!(
        text(&out.stderr).contains("vmm firecracker (kvm)"),
        "{}",
        text(&out.stderr)
    );
    let vms = vm_list(&inst.banger(&["vm", "ls", "--json"]));
    let id = vms[0]["id"].as_str().unwrap().to_string();
    let dir = inst.state().join("vms").join(&id);
    // No device-mapper and no reflinks here: the overlay strategy, the
    // image itself read-only as the root drive and a per-VM upper drive.
    assert!(dir.join("root-upper.ext4").is_file(), "an upper disk");
    assert!(!dir.join("root.qcow2").exists() && !dir.join("root.ext4").exists());
    // Every call of the getting-started sequence, each accepted.
    let log = std::fs::read_to_string(dir.join("vmm.log")).unwrap();
    for call in [
        "PUT /machine-config ",
        "PUT /boot-source ",
        "PUT /drives/root ",
        "PUT /drives/work ",
        "PUT /drives/upper ",
        "\"is_read_only\":true",
        "PUT /network-interfaces/eth0 ",
        "PUT /actions {\"action_type\":\"InstanceStart\"} -> 204",
    ] {
        assert!(log.contains(call), "{call:?} missing:\n{log}");
    }
    assert!(!log.contains("-> 400"), "a request was refused:\n{log}");
    // Its root is writable (the overlay's upper disk), and kept across
    // stop/start.
    let out = inst.banger(&["vm", "ssh", "fc", "--", "sh", "-c", "echo kept > /root/f"]);
    ok(&out, "write to the root disk");

    // Stop: SendCtrlAltDel, the guest reboots, the VMM exits by itself.
    ok(&inst.banger(&["vm", "stop", "fc"]), "vm stop");
    let log = std::fs::read_to_string(dir.join("vmm.log")).unwrap();
    assert!(
        log.contains("PUT /actions {\"action_type\":\"SendCtrlAltDel\"} -> 204"),
        "{log}"
    );
    let daemon_log = std::fs::read_to_string(inst.state().join("bangerd.log")).unwrap();
    assert!(
        !daemon_log.contains("did not power off"),
        "the guest shut down cleanly:\n{daemon_log}"
    );
    ok(&inst.banger(&["vm", "start", "fc"]), "vm start again");
    let out = inst.banger(&["vm", "ssh", "fc", "--", "cat", "/root/f"]);
    assert_eq!(ok(&out, "read the root disk"), "kept\n");
    ok(&inst.banger(&["vm", "delete", "-f", "fc"]), "vm delete");
    assert_baseline(&inst);
}
