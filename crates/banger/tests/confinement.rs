//! Confined VMMs on real guests (issue 11): each QEMU and its vsock
//! backend run as the VM's own unprivileged uid, with no capabilities,
//! no_new_privs and QEMU's seccomp filter, in the VM's cgroup with its
//! limits; as that uid a process can read its own VM's disk and the
//! image, and nothing of another VM or of the daemon; a VM whose
//! processes exceed their memory is stopped by the kernel with the
//! reason as its last error, while another VM runs on. Needs root;
//! `scripts/test.sh` runs it.

use std::path::{Path, PathBuf};
use std::process::Command;

use test_infra::{ok, text, Instance};

fn banger_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_banger"))
}

/// `/proc/<pid>/status` fields.
fn status(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status")
}

fn field<'a>(status: &'a str, key: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {key} in {status}"))
}

/// The instance's processes whose command line contains `needle`.
fn procs(inst: &Instance, needle: &str) -> Vec<i32> {
    inst.processes()
        .into_iter()
        .filter(|(_, c)| c.contains(needle))
        .map(|(p, _)| p)
        .collect()
}

/// The memory cgroup directory of `pid` (v1 here; v2 where unified).
fn memory_cgroup(pid: i32) -> PathBuf {
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
    for l in cg.lines() {
        let mut f = l.splitn(3, ':');
        let (_, ctrls, path) = (f.next().unwrap(), f.next().unwrap(), f.next().unwrap());
        if ctrls.split(',').any(|c| c == "memory") {
            return Path::new("/sys/fs/cgroup/memory").join(path.trim_start_matches('/'));
        }
        if ctrls.is_empty() && Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            return Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
        }
    }
    panic!("no memory cgroup for {pid}: {cg}");
}

fn read_num(p: &Path) -> u64 {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Runs `sh -c script` as `uid` with the VMM's groups (`setpriv`), and
/// says whether it succeeded.
fn as_uid(uid: u32, groups: &str, script: &str, arg: &Path) -> bool {
    let groups = if groups.is_empty() {
        "--clear-groups".to_string()
    } else {
        format!("--groups={groups}")
    };
    Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .arg(groups)
        .args(["--", "sh", "-c", script, "sh"])
        .arg(arg)
        .status()
        .expect("setpriv")
        .success()
}

#[test]
fn vmms_run_as_their_own_unprivileged_users_and_reach_nothing_else() {
    let inst = Instance::new(&banger_bin()).with_image();
    // cb boots another image: ca's VMM may read its own image only.
    let bookworm = inst.state().join("images/bookworm");
    ok(
        &inst.banger(&[
            "image",
            "import",
            "other",
            bookworm.join("rootfs.ext4").to_str().unwrap(),
        ]),
        "import",
    );
    let other = inst.state().join("images/other");
    for (name, image) in [("ca", "bookworm"), ("cb", "other")] {
        ok(
            &inst.banger(&[
                "vm", "create", "--name", name, "--memory", "512", "--image", image,
            ]),
            "create",
        );
    }
    // Both boot at once.
    let starts: Vec<_> = ["ca", "cb"]
        .iter()
        .map(|n| inst.spawn(&["vm", "start", n]))
        .collect();
    for s in starts {
        let out = test_infra::bounded::wait_output(s);
        assert!(out.status.success(), "start: {}", text(&out.stderr));
    }
    let show = |n: &str| -> serde_json::Value {
        serde_json::from_str(&ok(&inst.banger(&["vm", "show", n, "--json"]), "show")).unwrap()
    };
    let (a, b) = (show("ca"), show("cb"));
    let dir = |v: &serde_json::Value| PathBuf::from(v["vm_dir"].as_str().unwrap());
    let (a_dir, b_dir) = (dir(&a), dir(&b));

    let qemu_a = procs(&inst, "-name banger-ca");
    let qemu_b = procs(&inst, "-name banger-cb");
    assert_eq!(
        (qemu_a.len(), qemu_b.len()),
        (1, 1),
        "{:?}",
        inst.processes()
    );
    let (qa, qb) = (qemu_a[0], qemu_b[0]);
    let st = status(qa);
    let uids: Vec<u32> = field(&st, "Uid")
        .split_whitespace()
        .map(|u| u.parse().unwrap())
        .collect();
    let ua = uids[0];
    assert!(ua >= 65_536, "QEMU runs as uid {ua}");
    assert_eq!(uids, vec![ua; 4], "real, effective, saved, fs: {st}");
    assert_eq!(field(&st, "CapEff"), "0000000000000000", "{st}");
    assert_eq!(field(&st, "NoNewPrivs"), "1", "{st}");
    assert_eq!(field(&st, "Seccomp"), "2", "QEMU's -sandbox filter: {st}");
    let groups = field(&st, "Groups")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(",");
    let ub: u32 = field(&status(qb), "Uid")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(ua, ub, "each VM has its own uid");
    // No network of its own to speak of: an empty namespace (its tap is a
    // descriptor), not the daemon's.
    let ns = |pid: i32| std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    assert_ne!(
        ns(qa),
        ns(inst.daemon_pid()),
        "QEMU shares the daemon's network"
    );
    assert_ne!(ns(qa), ns(qb));
    // Its agent channel's process (banger-vport: the test image serves
    // the agent on a virtio-serial port) is the same user.
    let backend = procs(&inst, "banger-vport")
        .into_iter()
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                .unwrap_or_default()
                .contains(a["id"].as_str().unwrap())
        })
        .expect("ca's vsock backend");
    assert!(field(&status(backend), "Uid").starts_with(&ua.to_string()));

    // Its cgroup: named after the VM, holding QEMU and the backend, with
    // the VM's limits.
    let cg = memory_cgroup(qa);
    assert!(
        inst.cgroup_parents()
            .iter()
            .any(|p| cg == p.join(a["id"].as_str().unwrap())),
        "{} is not under the instance's parent {:?}",
        cg.display(),
        inst.cgroup_parents()
    );
    assert_eq!(memory_cgroup(backend), cg);
    let limit_file = if cg.join("memory.max").exists() {
        "memory.max"
    } else {
        test_infra::not_run_here(
            "confinement on a real cgroup v2 hierarchy",
            "this host's memory, pids and cpu controllers are bound to cgroup v1; the v2 \
             files banger writes were checked against a directory laid out as the kernel's \
             (banger-host cgroup::tests)",
        );
        "memory.limit_in_bytes"
    };
    let limit = read_num(&cg.join(limit_file));
    let overhead = bangerd::config::DEFAULT_VMM_MEMORY_OVERHEAD_MIB;
    assert_eq!(limit, (512 + overhead) << 20);
    let usage_file = if cg.join("memory.current").exists() {
        "memory.current"
    } else {
        "memory.usage_in_bytes"
    };
    let used = read_num(&cg.join(usage_file));
    eprintln!(
        "ca's cgroup uses {} MiB of {} MiB after boot (QEMU RSS {} kB)",
        used >> 20,
        limit >> 20,
        field(&st, "VmRSS")
    );
    assert!(used > 0 && used < limit);

    // As ca's VMM: its own disk and its image, yes; anything else, no.
    let read = "head -c 1 \"$1\" >/dev/null";
    assert!(
        as_uid(ua, &groups, read, &a_dir.join("root.qcow2")),
        "its own disk"
    );
    for f in ["rootfs.ext4", "vmlinux"] {
        assert!(
            as_uid(ua, &groups, read, &bookworm.join(f)),
            "its image's {f}"
        );
        assert!(
            !as_uid(ua, &groups, "echo x >> \"$1\"", &bookworm.join(f)),
            "wrote its image's {f}"
        );
        assert!(
            !as_uid(ua, &groups, read, &other.join(f)),
            "ca's VMM read cb's image's {f}"
        );
        assert!(as_uid(ub, "", read, &other.join(f)), "cb's image's {f}");
        assert!(
            !as_uid(ub, "", read, &bookworm.join(f)),
            "cb's VMM read ca's image's {f}"
        );
    }
    assert!(
        !as_uid(ua, &groups, "ls \"$1\" >/dev/null", &bookworm),
        "ca's VMM listed its image's dir"
    );
    for other in [
        b_dir.join("root.qcow2"),
        b_dir.join("work.ext4"),
        b_dir.join("console.log"),
        b_dir.join("initrd.img"),
        a_dir.join("ssh_host_ed25519_key"),
        inst.state().join("banger.db"),
        inst.state().join("ssh/id_ed25519"),
        inst.state().join("bangerd.log"),
    ] {
        assert!(other.exists(), "{}", other.display());
        assert!(
            !as_uid(ua, &groups, read, &other),
            "ca's VMM read {}",
            other.display()
        );
    }
    let b_run = inst.runtime().join("vms").join(b["id"].as_str().unwrap());
    for sock in ["api.sock", "vsock.sock"] {
        assert!(b_run.join(sock).exists(), "{sock}");
        assert!(
            !as_uid(ua, &groups, "test -e \"$1\"", &b_run.join(sock)),
            "ca's VMM reached cb's {sock}"
        );
    }
    for dir in [
        inst.state().join("vms"),
        a_dir.clone(),
        b_dir.clone(),
        b_run.clone(),
    ] {
        assert!(
            !as_uid(ua, &groups, "ls \"$1\" >/dev/null", &dir),
            "ca's VMM listed {}",
            dir.display()
        );
    }
    // It cannot plant anything where the daemon writes.
    assert!(!as_uid(
        ua,
        &groups,
        "ln -s /etc/shadow \"$1/console.log.1\"",
        &a_dir
    ));
    assert!(!a_dir.join("console.log.1").is_symlink());

    // The guests work as before.
    assert_eq!(
        ok(
            &inst.banger(&["vm", "exec", "ca", "--", "hostname"]),
            "exec"
        ),
        "ca\n"
    );
    // A stopped VM's user reads its image no more.
    ok(&inst.banger(&["vm", "stop", "ca"]), "stop");
    // (A release may finish after the reply.)
    inst.settle();
    assert!(
        !as_uid(ua, &groups, read, &bookworm.join("rootfs.ext4")),
        "a stopped VM's user still reads its image"
    );
    ok(&inst.banger(&["vm", "delete", "-f", "ca", "cb"]), "delete");
    // (A delete's release ends after its reply.)
    inst.settle();
    assert!(
        !as_uid(ub, "", read, &other.join("rootfs.ext4")),
        "a deleted VM's user still reads its image"
    );
    ok(&inst.banger(&["image", "rm", "other"]), "image rm");
    inst.assert_baseline();
}

#[test]
fn a_vm_over_its_memory_limit_is_stopped_and_the_others_run_on() {
    // No room for the VMM beyond the guest's memory: a guest that touches
    // all of its memory takes its VM's processes over the limit.
    let inst = Instance::new(&banger_bin())
        .with_image()
        .with_env("BANGER_VMM_MEMORY_OVERHEAD", "0");
    for name in ["hog", "calm"] {
        ok(
            &inst.banger(&["vm", "create", "--name", name, "--memory", "512"]),
            "create",
        );
        ok(&inst.banger(&["vm", "start", name]), "start");
    }
    // The guest fills a tmpfs as large as its memory; the host's OOM
    // killer ends its VMM (the exec's connection dies with it).
    let _ = inst.banger(&[
        "vm",
        "exec",
        "hog",
        "--",
        "sh",
        "-c",
        "mkdir -p /hog && mount -t tmpfs -o size=100% hog /hog && \
         dd if=/dev/zero of=/hog/fill bs=1M count=600",
    ]);
    assert!(
        test_infra::wait_until(std::time::Duration::from_secs(60), || {
            inst.vm("hog").is_some_and(|v| v["state"] == "stopped")
        }),
        "hog still runs: {:?}",
        inst.vm("hog")
    );
    let hog = inst.vm("hog").unwrap();
    let why = hog["last_error"].as_str().unwrap_or_default();
    assert!(why.contains("OOM killer"), "{hog}");
    assert!(why.contains("512 MiB"), "{why}");
    assert_eq!(
        ok(
            &inst.banger(&["vm", "exec", "calm", "--", "hostname"]),
            "exec"
        ),
        "calm\n"
    );
    assert_eq!(inst.vm("calm").unwrap()["state"], "running");
    ok(
        &inst.banger(&["vm", "delete", "-f", "hog", "calm"]),
        "delete",
    );
    inst.assert_baseline();
}

/// Firecracker through its jailer (played here by `jailer-double`, which
/// does what the jailer does but the `pivot_root`, and execs the
/// spec-checking `firecracker-double`): the VMM runs as the VM's user in
/// its chroot, every file the API names is inside that chroot, the tap is
/// attached from inside as that user (so banger must have made it the
/// tap's owner), and the chroot goes with the VM.
#[test]
fn firecracker_runs_under_its_jailer_as_the_vms_user() {
    let bin = banger_bin();
    let double = bin.with_file_name("firecracker-double");
    let jailer = bin.with_file_name("jailer-double");
    assert!(
        double.is_file() && jailer.is_file(),
        "build the doubles: cargo build --workspace --bins"
    );
    let inst = Instance::new(&bin)
        .with_image()
        .with_env("BANGER_FIRECRACKER", double.to_str().unwrap())
        .with_env("BANGER_JAILER", jailer.to_str().unwrap());
    let out = inst.banger(&[
        "vm",
        "run",
        "--vmm",
        "firecracker",
        "--name",
        "fj",
        "--",
        "cat",
        "/etc/hostname",
    ]);
    assert_eq!(ok(&out, "vm run under the jailer").trim(), "fj");
    let show: serde_json::Value =
        serde_json::from_str(&ok(&inst.banger(&["vm", "show", "fj", "--json"]), "show")).unwrap();
    let id = show["id"].as_str().unwrap().to_string();
    let jail = inst.state().join("jail/firecracker-double").join(&id[..16]);
    let root = jail.join("root");
    let fc: Vec<i32> = procs(&inst, "--start-time-us");
    assert_eq!(fc.len(), 1, "{:?}", inst.processes());
    let st = status(fc[0]);
    let uid: u32 = field(&st, "Uid")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(uid >= 65_536, "the jailed Firecracker runs as {uid}: {st}");
    assert_eq!(field(&st, "Groups"), "", "no supplementary group: {st}");
    assert_eq!(
        std::fs::read_link(format!("/proc/{}/cwd", fc[0])).unwrap(),
        root,
        "it runs in its chroot"
    );
    // What the jailer made and what banger put in the chroot.
    for f in [
        "firecracker-double",
        "dev/net/tun",
        "dev/kvm",
        "api.sock",
        "vsock.sock",
        "vmlinux",
        "initrd.img",
        "drive-0",
        "drive-1",
        "vmm.log",
    ] {
        assert!(
            root.join(f).symlink_metadata().is_ok(),
            "{f} missing in {}",
            root.display()
        );
    }
    let log = std::fs::read_to_string(root.join("vmm.log")).unwrap();
    assert!(log.contains("\"path_on_host\":\"/drive-0\""), "{log}");
    assert!(!log.contains("-> 400"), "a request was refused:\n{log}");
    // Stop and start: the chroot is made again.
    ok(&inst.banger(&["vm", "stop", "fj"]), "stop");
    assert!(!jail.exists(), "the jail outlived the boot");
    ok(&inst.banger(&["vm", "start", "fj"]), "start");
    assert_eq!(
        ok(
            &inst.banger(&["vm", "exec", "fj", "--", "hostname"]),
            "exec"
        ),
        "fj\n"
    );
    // The daemon dies and every record of the VMM's process with it: the
    // next daemon finds the jailed Firecracker by its id, keeps it, and
    // the guest still answers.
    let fc = procs(&inst, "--start-time-us");
    assert_eq!(fc.len(), 1);
    inst.kill_daemon();
    std::fs::remove_file(inst.state().join("vms").join(&id).join("handles.json")).unwrap();
    assert_eq!(
        ok(
            &inst.banger(&["vm", "exec", "fj", "--", "hostname"]),
            "exec after a crash"
        ),
        "fj\n"
    );
    assert_eq!(procs(&inst, "--start-time-us"), fc, "the same VMM");
    ok(&inst.banger(&["vm", "delete", "-f", "fj"]), "delete");
    inst.settle();
    assert!(!jail.exists(), "the jail outlived the VM");
    inst.assert_baseline();
}
