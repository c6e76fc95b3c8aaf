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
    // the group's copy of the key.
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
    let out = inst.banger_as(&member, &["image", "import", "stolen", "/root"]);
    let err = text(&out.stderr);
    assert!(
        !out.status.success() && err.contains("image import /root"),
        "{err}"
    );
    let own = member.home.path().join("src");
    std::fs::create_dir(&own).unwrap();
    std::os::unix::fs::chown(&own, Some(member.uid), Some(member.gid)).unwrap();
    let out = inst.banger_as(
        &member,
        &[
            "vm",
            "create",
            "--name",
            "g3",
            "--mount",
            &format!("{}:/src", own.display()),
        ],
    );
    ok(&out, "member: --mount of their own directory");
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
