//! The socket's group (issue 12): real accounts made by the test, a member
//! and a stranger; the member uses VMs without root (the agent, ssh with
//! the group's key) but names only host paths of their own; the stranger
//! is told which group to join. Real guests in a namespace of the test's
//! own, as in e2e.rs.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use test_infra::users::{TestGroup, TestUser};
use test_infra::{ok, text, Instance};

fn banger_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_banger"))
}

#[test]
fn the_socket_group_uses_vms_without_root() {
    let group = TestGroup::create();
    let member = TestUser::new(&[&group]);
    let stranger = TestUser::new(&[]);
    let inst = Instance::new(&banger_bin())
        .with_image()
        .with_env("BANGER_SOCKET_GROUP", &group.name);

    // Root starts the daemon; the socket is root:<group> 0660.
    inst.daemon_pid();
    let md = std::fs::metadata(inst.runtime().join("bangerd.sock")).unwrap();
    assert_eq!(
        (md.uid(), md.gid(), md.mode() & 0o777),
        (0, group.gid, 0o660)
    );

    // A stranger is told which group to join, and how.
    let out = inst.banger_as(&stranger, &["vm", "ls"]);
    let err = text(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("permission denied")
            && err.contains(&format!("sudo usermod -aG {} $USER", group.name)),
        "{err}"
    );

    // A member runs a VM through the agent, and reaches it over ssh with
    // the group's own key.
    let out = inst.banger_as(
        &member,
        &[
            "vm",
            "run",
            "--rm",
            "--name",
            "g1",
            "--",
            "cat",
            "/etc/hostname",
        ],
    );
    assert_eq!(ok(&out, "member: vm run --rm"), "g1\n");
    let out = inst.banger_as(&member, &["vm", "run", "-d", "--name", "g2"]);
    assert_eq!(ok(&out, "member: vm run -d"), "g2\n");
    let out = inst.banger_as(&member, &["vm", "ssh", "g2", "--", "hostname"]);
    assert_eq!(ok(&out, "member: vm ssh"), "g2\n");
    let snippet = ok(&inst.banger_as(&member, &["ssh-config"]), "ssh-config");
    assert!(snippet.contains("id_ed25519.group"), "{snippet}");
    // Root's ssh keeps the 0600 original.
    let out = inst.banger(&["vm", "ssh", "g2", "--", "hostname"]);
    assert_eq!(ok(&out, "root: vm ssh"), "g2\n");

    // Host paths: a member's own directory, never root's (nor a link to it).
    let out = inst.banger_as(&member, &["vm", "create", "--mount", "/etc:/mnt"]);
    let err = text(&out.stderr);
    assert!(
        !out.status.success() && err.contains("belongs to uid 0, not to you"),
        "{err}"
    );
    let link = member.home.path().join("etc");
    std::os::unix::fs::symlink("/etc", &link).unwrap();
    let out = inst.banger_as(
        &member,
        &[
            "vm",
            "create",
            "--mount",
            &format!("{}:/mnt", link.display()),
        ],
    );
    let err = text(&out.stderr);
    assert!(!out.status.success() && err.contains("--mount"), "{err}");
    let own = member.home.path().join("src");
    std::fs::create_dir(&own).unwrap();
    std::os::unix::fs::chown(&own, Some(member.uid), Some(member.gid)).unwrap();
    // Read-write would let the guest's root leave root's files (a setuid
    // shell) in it: members share read-only.
    let out = inst.banger_as(
        &member,
        &[
            "vm",
            "create",
            "--mount",
            &format!("{}:/src", own.display()),
        ],
    );
    let err = text(&out.stderr);
    assert!(
        !out.status.success() && err.contains("read-only only (add :ro)"),
        "{err}"
    );
    let out = inst.banger_as(
        &member,
        &[
            "vm",
            "create",
            "--name",
            "g3",
            "--mount",
            &format!("{}:/src:ro", own.display()),
        ],
    );
    ok(&out, "member: --mount of their own directory");

    // What a client that skips the CLI sends is checked by the daemon: a
    // link (which the CLI would have resolved), a ',' (virtiofsd's option
    // separator), a guest path not in normal form.
    let comma = member.home.path().join("x,source=");
    std::fs::create_dir(&comma).unwrap();
    std::os::unix::fs::chown(&comma, Some(member.uid), Some(member.gid)).unwrap();
    let v = banger_core::api::PROTOCOL_VERSION;
    for (host, guest, says) in [
        (link.display().to_string(), "/mnt", "is a symbolic link"),
        (
            format!("{},source=/", comma.display()),
            "/mnt",
            "may not hold ','",
        ),
        (own.display().to_string(), "/mnt/../etc", "guest path"),
    ] {
        let req = serde_json::json!({
            "version": v,
            "request": {"op": "vm_create", "name": "raw", "image": null,
                "size": {"cpus": null, "memory_mib": null, "disk_mib": null},
                "vmm": null, "start": false, "rm": false,
                "auto_stop": {"ttl_secs": null, "idle_secs": null},
                "net": {"none": false, "allow": [], "ports": [], "network": null},
                "volumes": [], "root_mib": null,
                "mounts": [{"host": host, "path": guest, "read_only": true, "owner": 0}]}
        });
        let reply = inst.raw_request_as(&member, &req.to_string());
        let msg = reply["message"].as_str().unwrap_or("");
        assert!(
            reply["reply"] == "err" && msg.contains(says),
            "{host}: {reply}"
        );
    }

    // Imports: what the member can read, read as the member.
    let tree = member.home.path().join("tree");
    for d in ["bin", "usr/sbin", "etc"] {
        std::fs::create_dir_all(tree.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", tree.join("bin/sh")).unwrap();
    std::fs::write(tree.join("usr/sbin/sshd"), "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(
        tree.join("usr/sbin/sshd"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::os::unix::fs::symlink("/etc/shadow", tree.join("etc/shadow")).unwrap();
    std::fs::write(tree.join("etc/root-only"), "secret\n").unwrap();
    std::fs::set_permissions(
        tree.join("etc/root-only"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let chown_r = std::process::Command::new("chown")
        .arg("-R")
        .arg(format!("{}:{}", member.uid, member.gid))
        .arg(&tree)
        .status()
        .unwrap();
    assert!(chown_r.success());
    std::os::unix::fs::lchown(tree.join("etc/root-only"), Some(0), Some(0)).unwrap();
    for (src, says) in [
        ("/root".to_string(), "cannot read it"),
        ("/etc/shadow".to_string(), "cannot read it"),
        (tree.display().to_string(), "cannot read it"),
    ] {
        let out = inst.banger_as(&member, &["image", "import", "stolen", &src]);
        let err = text(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{src}: {err}");
    }
    std::fs::remove_file(tree.join("etc/root-only")).unwrap();

    // One staged import at a time per member: a first one held reading a
    // FIFO of theirs (until they write), a second is refused at once.
    let fifo = member.home.path().join("slow.tar");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    std::os::unix::fs::chown(&fifo, Some(member.uid), Some(member.gid)).unwrap();
    let held = inst
        .banger_as_cmd(
            &member,
            &["image", "import", "held", fifo.to_str().unwrap()],
        )
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let fifo_arg = fifo.display().to_string();
    let reading = || {
        std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
            std::fs::read(e.path().join("cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .is_ok_and(|c| c.starts_with("cat ") && c.contains(&fifo_arg))
        })
    };
    assert!(
        test_infra::wait_until(std::time::Duration::from_secs(30), reading),
        "the first import never started reading its FIFO"
    );
    let out = inst.banger_as(
        &member,
        &["image", "import", "second", &tree.display().to_string()],
    );
    let err = text(&out.stderr);
    assert!(
        !out.status.success() && err.contains("already in progress"),
        "{err}"
    );
    // The writer comes and goes: the first import ends (an empty tarball).
    drop(std::fs::OpenOptions::new().write(true).open(&fifo).unwrap());
    let out = test_infra::bounded::wait_output(held);
    assert!(!out.status.success(), "an empty import failed");
    let out = inst.banger_as(
        &member,
        &["image", "import", "mine", &tree.display().to_string()],
    );
    ok(&out, "member: import of their own tree");
    // The link came in as a link, not as what it points at.
    let rootfs = inst.state().join("images/mine/rootfs.ext4");
    let out = std::process::Command::new("debugfs")
        .args(["-R", "stat /etc/shadow"])
        .arg(&rootfs)
        .output()
        .unwrap();
    assert!(
        text(&out.stdout).contains("Type: symlink"),
        "{}",
        text(&out.stdout)
    );
    // Members remove only what they made: their image, not root's.
    let listed: serde_json::Value = serde_json::from_str(&ok(
        &inst.banger(&["image", "ls", "--json"]),
        "image ls --json",
    ))
    .unwrap();
    let mine = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "mine")
        .unwrap();
    assert_eq!(mine["owner"], member.uid, "{mine}");
    let roots_image = ok(&inst.banger(&["image", "ls", "-q"]), "image ls")
        .lines()
        .find(|l| *l != "mine")
        .unwrap()
        .to_string();
    let out = inst.banger_as(&member, &["image", "rm", &roots_image]);
    let err = text(&out.stderr);
    assert!(
        !out.status.success() && err.contains("belongs to uid 0") && err.contains("remove"),
        "{err}"
    );
    ok(
        &inst.banger_as(&member, &["image", "rm", "mine"]),
        "member: image rm of their own",
    );
    // Asking for a build of an image that exists changes nothing: it
    // stays root's (and a rebuild of it is root's to ask for).
    ok(
        &inst.banger_as(&member, &["image", "build", &roots_image]),
        "member: image build of a built image",
    );
    let out = inst.banger_as(&member, &["image", "rm", &roots_image]);
    assert!(
        !out.status.success() && text(&out.stderr).contains("belongs to uid 0"),
        "still root's: {out:?}"
    );
    let out = inst.banger_as(&member, &["image", "build", "--force", &roots_image]);
    assert!(
        !out.status.success() && text(&out.stderr).contains("may rebuild it"),
        "{out:?}"
    );
    ok(
        &inst.banger(&["volume", "create", "rv", "--size", "16M"]),
        "root: volume create",
    );
    let out = inst.banger_as(&member, &["volume", "rm", "rv"]);
    assert!(
        !out.status.success() && text(&out.stderr).contains("belongs to uid 0"),
        "{out:?}"
    );
    ok(
        &inst.banger_as(&member, &["volume", "create", "mv", "--size", "16M"]),
        "member: volume create",
    );
    ok(
        &inst.banger_as(&member, &["volume", "rm", "mv"]),
        "member: volume rm of their own",
    );

    // A VM root made with a mount of root's: only root may use it (its
    // agent, its start, and ssh with the group's key all refused).
    let roots = tempfile::tempdir().unwrap();
    let out = inst.banger(&[
        "vm",
        "run",
        "-d",
        "--name",
        "r1",
        "--mount",
        &format!("{}:/x:ro", roots.path().display()),
        "--volume",
        "rv:/data",
    ]);
    ok(&out, "root: vm run -d with a mount");
    // What r1's guest may write on its volume stays root's.
    let out = inst.banger_as(&member, &["vm", "create", "--volume", "rv:/data"]);
    let err = text(&out.stderr);
    assert!(
        !out.status.success() && err.contains("volume \"rv\" holds what a VM only root may use"),
        "{err}"
    );
    for args in [
        vec!["vm", "exec", "r1", "--", "true"],
        vec!["vm", "stop", "r1"],
        vec!["vm", "logs", "r1"],
    ] {
        let out = inst.banger_as(&member, &args);
        let err = text(&out.stderr);
        assert!(
            !out.status.success() && err.contains("only root may use it"),
            "{args:?}: {err}"
        );
    }
    let out = inst.banger_as(&member, &["vm", "ssh", "r1", "--", "true"]);
    assert!(!out.status.success(), "{out:?}");
    // The group's key is among g2's authorized keys, not among r1's.
    let keys = |vm: &str| {
        let out = inst.banger(&["vm", "exec", vm, "--", "cat", "/root/.ssh/authorized_keys"]);
        ok(&out, "authorized_keys")
            .lines()
            .filter(|l| !l.is_empty())
            .count()
    };
    assert_eq!((keys("g2"), keys("r1")), (2, 1));
    // And so does an image committed from it.
    ok(&inst.banger(&["vm", "stop", "r1"]), "stop r1");
    ok(&inst.banger(&["vm", "commit", "r1", "rimg"]), "commit r1");
    let out = inst.banger_as(&member, &["vm", "create", "--image", "rimg"]);
    let err = text(&out.stderr);
    assert!(
        !out.status.success() && err.contains("image \"rimg\" holds what"),
        "{err}"
    );
    // A VM of that image is root's too, and so are its volumes.
    ok(
        &inst.banger(&["volume", "create", "rv2", "--size", "16M"]),
        "rv2",
    );
    ok(
        &inst.banger(&[
            "vm", "create", "--name", "r2", "--image", "rimg", "--volume", "rv2:/d",
        ]),
        "root: vm create of rimg",
    );
    let out = inst.banger_as(&member, &["vm", "start", "r2"]);
    assert!(
        !out.status.success() && text(&out.stderr).contains("made of data only root may use"),
        "{out:?}"
    );
    let out = inst.banger_as(&member, &["vm", "create", "--volume", "rv2:/d"]);
    assert!(
        !out.status.success() && text(&out.stderr).contains("volume \"rv2\" holds what"),
        "{out:?}"
    );
    ok(&inst.banger(&["vm", "rm", "-f", "r1", "r2"]), "rm r1 r2");
    ok(&inst.banger(&["volume", "rm", "rv2"]), "rm rv2");
    ok(&inst.banger(&["image", "rm", "rimg"]), "rm rimg");
    ok(&inst.banger(&["volume", "rm", "rv"]), "rm rv");
    assert_eq!(
        ok(&inst.banger(&["vm", "ls", "-q"]), "ls").lines().count(),
        2,
        "g2 and g3; the refused creates left nothing"
    );

    // Only root stops the daemon.
    let out = inst.banger_as(&member, &["daemon", "stop"]);
    assert!(
        !out.status.success() && text(&out.stderr).contains("only root may stop bangerd"),
        "{out:?}"
    );

    // Without a daemon, a member is told who can start one.
    inst.kill_daemon();
    let out = inst.banger_as(&member, &["vm", "ls"]);
    let err = text(&out.stderr);
    assert!(
        !out.status.success() && err.contains("only root can start it"),
        "{err}"
    );

    ok(&inst.banger(&["vm", "rm", "-f", "g2", "g3"]), "rm");
    inst.assert_baseline();
}

/// A member cannot pin the daemon's threads or descriptors: a connection
/// that sends no whole request line within 10 s is closed, and a uid
/// other than root holds at most 32 at once (the next is refused, naming
/// the cap); root is never capped.
#[test]
fn a_member_cannot_pin_the_daemons_connections() {
    use std::process::Stdio;
    let group = TestGroup::create();
    let member = TestUser::new(&[&group]);
    let inst = Instance::new(&banger_bin()).with_env("BANGER_SOCKET_GROUP", &group.name);
    inst.daemon_pid();
    let connections = || {
        let out = ok(&inst.banger(&["daemon", "status", "--json"]), "status");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["connections"].as_u64().unwrap()
    };
    // 32 clients that connect and never send a request.
    let mut idle: Vec<std::process::Child> = (0..32)
        .map(|_| {
            inst.socket_as(&member)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    // All of them open (and root's status request besides).
    assert!(
        test_infra::wait_until(std::time::Duration::from_secs(8), || connections() == 33),
        "{} connections",
        connections()
    );
    let ping = serde_json::json!({
        "version": banger_core::api::PROTOCOL_VERSION,
        "request": {"op": "ping"}
    })
    .to_string();
    let reply = inst.raw_request_as(&member, &ping);
    let msg = reply["message"].as_str().unwrap_or("");
    assert!(
        reply["reply"] == "err" && msg.contains("32 connections") && msg.contains("its cap"),
        "{reply}"
    );
    // The daemon ends each idle one at its request line's deadline: the
    // clients see the end of their connection and exit, their input still
    // open (`wait` would close it: `try_wait` does not).
    for c in &mut idle {
        let mut status = None;
        assert!(
            test_infra::wait_until(std::time::Duration::from_secs(60), || {
                status = c.try_wait().unwrap();
                status.is_some()
            }),
            "an idle connection was never ended"
        );
        assert!(status.is_some_and(|s| s.success()), "{status:?}");
    }
    assert_eq!(connections(), 1);
    let reply = inst.raw_request_as(&member, &ping);
    assert_eq!(reply["reply"], "ok", "{reply}");
    inst.assert_baseline();
}

/// A `--network` is its first VM's creator's while it has VMs: a member
/// cannot put a VM on root's network or on another member's (its VMs
/// would reach and resolve theirs), root can join any, and a network
/// with no VM left is free again.
#[test]
fn a_member_joins_only_networks_of_their_own() {
    let group = TestGroup::create();
    let alice = TestUser::new(&[&group]);
    let bob = TestUser::new(&[&group]);
    let inst = Instance::new(&banger_bin())
        .with_image()
        .with_env("BANGER_SOCKET_GROUP", &group.name);
    ok(
        &inst.banger(&["vm", "create", "--name", "r1", "--network", "rootnet"]),
        "root: first VM of rootnet",
    );
    ok(
        &inst.banger_as(
            &alice,
            &["vm", "create", "--name", "a1", "--network", "lab"],
        ),
        "alice: first VM of lab",
    );
    ok(
        &inst.banger_as(
            &alice,
            &["vm", "create", "--name", "a2", "--network", "lab"],
        ),
        "alice: her own network again",
    );
    let refused = |out: std::process::Output, whose: &str| {
        let err = text(&out.stderr);
        assert!(
            !out.status.success() && err.contains(whose) && err.contains("not yours"),
            "{err}"
        );
    };
    refused(
        inst.banger_as(
            &alice,
            &["vm", "create", "--name", "a3", "--network", "rootnet"],
        ),
        "root's",
    );
    refused(
        inst.banger_as(&bob, &["vm", "create", "--name", "b1", "--network", "lab"]),
        "another member's",
    );
    assert!(inst.vm("a3").is_none() && inst.vm("b1").is_none());
    ok(
        &inst.banger(&["vm", "create", "--name", "r2", "--network", "lab"]),
        "root joins any",
    );
    for vm in ["a1", "a2", "r2"] {
        ok(&inst.banger(&["vm", "rm", vm]), "rm");
    }
    ok(
        &inst.banger_as(&bob, &["vm", "create", "--name", "b1", "--network", "lab"]),
        "bob: lab is free again",
    );
    refused(
        inst.banger_as(
            &alice,
            &["vm", "create", "--name", "a4", "--network", "lab"],
        ),
        "another member's",
    );
    for vm in ["b1", "r1"] {
        ok(&inst.banger(&["vm", "rm", vm]), "rm");
    }
    inst.assert_baseline();
}

/// A member joins another's network once its owner shares it (`network
/// share`), and no longer after `unshare`; only the owner (or root)
/// shares; the shares go with the network when its last VM does.
#[test]
fn a_network_is_joined_once_its_owner_shares_it() {
    let group = TestGroup::create();
    let alice = TestUser::new(&[&group]);
    let bob = TestUser::new(&[&group]);
    let inst = Instance::new(&banger_bin())
        .with_image()
        .with_env("BANGER_SOCKET_GROUP", &group.name);
    let create = |who: &TestUser, vm: &str| {
        inst.banger_as(who, &["vm", "create", "--name", vm, "--network", "lab"])
    };
    let fails = |out: std::process::Output, says: &str| {
        let err = text(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{says}: {err}");
    };
    // Only root starts the daemon.
    ok(&inst.banger(&["daemon", "ping"]), "daemon ping");
    ok(&create(&alice, "a1"), "alice: first VM of lab");
    fails(create(&bob, "b1"), "not yours");
    fails(
        inst.banger_as(&bob, &["network", "share", "lab", &bob.name]),
        "only its owner or root shares it",
    );
    ok(
        &inst.banger_as(&alice, &["network", "share", "lab", &bob.name]),
        "alice shares lab with bob",
    );
    let ls: serde_json::Value =
        serde_json::from_str(&ok(&inst.banger(&["network", "ls", "--json"]), "ls")).unwrap();
    assert_eq!(ls[0]["name"], "lab", "{ls}");
    assert_eq!(ls[0]["owner"], alice.uid, "{ls}");
    assert_eq!(ls[0]["shared_with"], serde_json::json!([bob.uid]), "{ls}");
    ok(&create(&bob, "b1"), "bob joins a shared network");
    ok(
        &inst.banger_as(&alice, &["network", "unshare", "lab", &bob.uid.to_string()]),
        "alice takes it back",
    );
    fails(create(&bob, "b2"), "not yours");
    assert!(inst.vm("b1").is_some(), "a VM already there stays");
    fails(
        inst.banger_as(&alice, &["network", "share", "nolab", &bob.name]),
        "has no VMs",
    );
    fails(
        inst.banger_as(&alice, &["network", "share", "lab", "no-such-user-here"]),
        "no user",
    );
    fails(
        inst.banger_as(&alice, &["network", "unshare", "lab", &bob.name]),
        "is not shared with",
    );
    assert!(inst.vm("b2").is_none());

    // Root shares too; and with the last VM gone, the shares go.
    ok(
        &inst.banger(&["network", "share", "lab", &bob.name]),
        "root shares alice's network",
    );
    for vm in ["a1", "b1"] {
        ok(&inst.banger(&["vm", "rm", vm]), "rm");
    }
    // Alice owns it anew: bob's share went with its last VM.
    ok(&create(&alice, "a2"), "alice: lab is free again, hers anew");
    fails(create(&bob, "b3"), "not yours");
    let ls: serde_json::Value =
        serde_json::from_str(&ok(&inst.banger(&["network", "ls", "--json"]), "ls")).unwrap();
    assert_eq!(ls[0]["shared_with"], serde_json::json!([]), "{ls}");
    ok(&inst.banger(&["vm", "rm", "a2"]), "rm");
    inst.assert_baseline();
}
