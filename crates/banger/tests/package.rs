//! The Debian package (issue 12): built by scripts/package.sh, installed
//! with dpkg into a copy of a fresh Debian tree that holds only what it
//! depends on (scripts/test-chroot.sh), `banger doctor` run from there
//! (bangerd starts inside the tree, in a network namespace of the test's
//! own), then purged: nothing of it may be left.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use test_infra::{ok, text, NetNs};

fn env_path(var: &str, how: &str) -> PathBuf {
    match std::env::var_os(var) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => panic!("{var} is not set: scripts/test.sh sets it ({how})"),
    }
}

/// Runs `args` chrooted into `root`, in a mount namespace of its own (with
/// /proc, /sys and /dev of the host's; the tree's /run is its own
/// directory, so a daemon's socket outlives the namespace that started
/// it), inside `net`. The script is fixed;
/// the root and the arguments reach it as positional parameters.
fn in_tree(net: &NetNs, root: &Path, args: &[&str]) -> Output {
    net.cmd("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "--fork",
            "--",
            "/bin/sh",
            "-euc",
        ])
        .arg(
            r#"r=$1; shift
mount -t proc proc "$r/proc"
mount --rbind /sys "$r/sys"
mount --rbind /dev "$r/dev"
exec chroot "$r" "$@""#,
        )
        .arg("sh")
        .arg(root)
        .args(args)
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env_remove("BANGER_STATE_DIR")
        .env_remove("BANGER_RUNTIME_DIR")
        .output()
        .expect("unshare")
}

/// Processes whose root is the tree (a daemon left running in it).
fn processes_in(root: &Path) -> Vec<i32> {
    let real = std::fs::canonicalize(root).unwrap();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/root"))
                .ok()
                .as_deref()
                == Some(&real)
        })
        .collect()
}

#[test]
fn the_package_installs_runs_reinstalls_and_purges_cleanly() {
    let deb = env_path("BANGER_TEST_DEB", "scripts/package.sh builds it");
    let tree = env_path("BANGER_TEST_CHROOT", "scripts/test-chroot.sh builds it");
    let net = NetNs::new();
    let work = tempfile::Builder::new()
        .prefix("banger-pkg-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let root = work.path().join("root");
    // A copy: the cached tree stays fresh for the next run.
    let st = Command::new("cp")
        .args(["-a", "--reflink=auto"])
        .arg(&tree)
        .arg(&root)
        .status()
        .unwrap();
    assert!(st.success(), "copy the tree");
    let _reaper = Reaper(root.clone());
    let before = snapshot(&root);
    std::fs::copy(&deb, root.join("tmp/banger.deb")).unwrap();

    // dpkg -i: every dependency is already there.
    ok(
        &in_tree(&net, &root, &["dpkg", "-i", "/tmp/banger.deb"]),
        "dpkg -i",
    );
    for f in [
        "usr/bin/banger",
        "usr/bin/bangerd",
        "usr/bin/containerd-shim-banger-v2",
        "usr/share/doc/banger/containerd-banger.toml",
        "usr/lib/banger/banger-agent",
        "usr/lib/banger/vhost-device-vsock",
        "usr/lib/banger/banger-vport",
        "lib/systemd/system/banger.socket",
        "lib/systemd/system/banger.service",
        "etc/banger/config.toml",
        "usr/share/man/man1/banger.1.gz",
        "usr/share/man/man1/banger-vm-run.1.gz",
        "usr/share/man/man8/bangerd.8.gz",
        "usr/share/bash-completion/completions/banger",
        "usr/share/zsh/vendor-completions/_banger",
        "usr/share/fish/vendor_completions.d/banger.fish",
    ] {
        assert!(root.join(f).exists(), "{f} installed");
    }
    // Enabled as debhelper enables units (no systemd runs in the tree).
    assert!(
        root.join("etc/systemd/system/sockets.target.wants/banger.socket")
            .symlink_metadata()
            .is_ok(),
        "banger.socket is enabled"
    );
    let group = ok(
        &in_tree(&net, &root, &["getent", "group", "banger"]),
        "group",
    );
    assert!(group.starts_with("banger:"), "{group}");
    // The completion script loads in the tree's bash.
    let out = in_tree(
        &net,
        &root,
        &[
            "bash",
            "-c",
            "source /usr/share/bash-completion/completions/banger && complete -p banger",
        ],
    );
    assert!(ok(&out, "completion").contains("banger"), "{out:?}");

    // banger doctor from the tree: its CLI starts its bangerd, which finds
    // the VMM, the agent and the vsock backend the package brought, and
    // reads the example config (all comments).
    let out = in_tree(&net, &root, &["banger", "doctor"]);
    let doctor = ok(&out, "doctor in the tree");
    for (check, says) in [
        ("qemu-system-x86_64", "/usr/bin/qemu-system-x86_64"),
        ("vhost-device-vsock", "/usr/lib/banger/vhost-device-vsock"),
        ("banger-vport", "/usr/lib/banger/banger-vport"),
        ("socket group", "members of banger"),
    ] {
        assert!(
            doctor
                .lines()
                .any(|l| l.starts_with("ok") && l.contains(check) && l.contains(says)),
            "{check}: {doctor}"
        );
    }
    let cfg = ok(
        &in_tree(&net, &root, &["banger", "config", "show"]),
        "config show",
    );
    assert!(
        cfg.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == ["subnet", "172.30.0.0/16", "default"]),
        "{cfg}"
    );
    assert_eq!(processes_in(&root).len(), 1, "one bangerd runs in the tree");

    // Removed (not purged) then installed again: the removal stopped the
    // daemon and masked the socket; the install lifts the mask.
    ok(
        &in_tree(&net, &root, &["dpkg", "--remove", "banger"]),
        "dpkg --remove",
    );
    assert!(
        processes_in(&root).is_empty(),
        "the removal stopped the daemon"
    );
    let wants = root.join("etc/systemd/system/sockets.target.wants/banger.socket");
    ok(
        &in_tree(&net, &root, &["dpkg", "-i", "/tmp/banger.deb"]),
        "dpkg -i after a removal",
    );
    // (The removal leaves the link, dangling; it points at the unit again,
    // resolved in the tree.)
    let target = std::fs::read_link(&wants).expect("banger.socket is enabled");
    let target = match target.strip_prefix("/") {
        Ok(abs) => root.join(abs),
        Err(_) => wants.parent().unwrap().join(target),
    };
    assert!(target.exists(), "enabled again: {}", target.display());
    let masked = root.join("etc/systemd/system/banger.socket");
    assert!(
        masked.symlink_metadata().is_err(),
        "no mask left: {:?}",
        std::fs::read_link(&masked)
    );

    // Purge: the daemon stops, every file and the group go.
    let out = in_tree(&net, &root, &["dpkg", "--purge", "banger"]);
    ok(&out, "dpkg --purge");
    assert!(
        processes_in(&root).is_empty(),
        "the purge stopped the daemon: {:?}",
        processes_in(&root)
    );
    let out = in_tree(&net, &root, &["getent", "group", "banger"]);
    assert!(
        !out.status.success(),
        "the group is gone: {}",
        text(&out.stdout)
    );
    let after = snapshot(&root);
    let added: Vec<&String> = after.iter().filter(|p| !before.contains(p)).collect();
    assert!(added.is_empty(), "left behind by the package: {added:?}");
}

/// Kills whatever still runs in the tree (a failed test's daemon).
struct Reaper(PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in processes_in(&self.0) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Every path under `root` but the ones dpkg and the shell keep for
/// themselves (its database, logs, caches), for a before/after diff.
fn snapshot(root: &Path) -> Vec<String> {
    let out = Command::new("find")
        .arg(root)
        .args(["-xdev", "-mindepth", "1"])
        .output()
        .unwrap();
    let prefix = format!("{}/", root.display());
    let mut v: Vec<String> = text(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix).map(str::to_string))
        .filter(|p| {
            !(p.starts_with("var/lib/dpkg")
                || p.starts_with("var/log")
                || p.starts_with("var/cache")
                || p.starts_with("tmp/")
                || p.starts_with("proc/")
                || p.starts_with("sys/")
                || p.starts_with("dev/")
                || p.starts_with("etc/group")
                || p.starts_with("etc/gshadow"))
        })
        .collect();
    v.sort();
    v
}
