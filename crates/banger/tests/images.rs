//! Images made from what users have, on real guests: `image import` of an
//! ext4 image, a directory, a gzip tarball, an OCI layout and a `docker
//! save` archive (two layers, whiteouts, no kernel: it borrows the default
//! image's) each boot and show their own files; a busybox-only tree (no
//! sshd, or a broken one) boots, runs commands and copies files, and only
//! `vm ssh` says it has no sshd, and why. `image customize` runs a script
//! in a booted VM and saves the result; a failing script saves nothing;
//! `vm commit` flattens an overlay VM (mounted in a private mount
//! namespace, nothing left mounted or attached). Needs root;
//! `scripts/test.sh` runs it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use test_infra::{ok, text, wait_until, Gate, Instance};

fn banger_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_banger"))
}

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    ok(&out, what)
}

/// The test image's tree, copied out through a read-only loop mount in a
/// mount namespace of its own (gone with the command).
fn image_tree(inst: &Instance, dest: &Path) {
    let mnt = dest.with_extension("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    std::fs::create_dir_all(dest).unwrap();
    run(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-ec"])
            .arg(r#"mount -o loop,ro,noload "$1" "$2"; cp -a "$2"/. "$3"/"#)
            .arg("sh")
            .arg(inst.state().join("images/bookworm/rootfs.ext4"))
            .arg(&mnt)
            .arg(dest),
        "copy the test image's tree",
    );
}

fn sha256(p: &Path) -> String {
    let out = run(Command::new("sha256sum").arg(p), "sha256sum");
    out.split_whitespace().next().unwrap().to_string()
}

/// A tar of `(path, data)` files (`None`: an empty file, as whiteouts are).
fn layer(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, path, *data).unwrap();
    }
    b.into_inner().unwrap()
}

/// Removes an image once its test is done with it: five imports side by
/// side would need gigabytes of the host's disk at once.
fn image_rm(inst: &Instance, image: &str) {
    ok(
        &inst.banger(&["image", "rm", image]),
        &format!("image rm {image}"),
    );
}

/// Boots `image` and runs `script` in it.
fn in_guest(inst: &Instance, image: &str, script: &str) -> String {
    ok(
        &inst.banger(&[
            "vm", "run", "--rm", "--image", image, "--", "sh", "-c", script,
        ]),
        &format!("vm run --image {image}: {script}"),
    )
}

fn leftovers(inst: &Instance) -> Vec<String> {
    std::fs::read_dir(inst.state().join("images"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains('.'))
        .collect()
}

#[test]
fn imports_of_every_format_boot() {
    let inst = Instance::new(&banger_bin()).with_image();
    let scratch = tempfile::tempdir().unwrap();
    let s = |n: &str| scratch.path().join(n);

    // An ext4 image: its own kernel and tree.
    let ext4 = inst.state().join("images/bookworm/rootfs.ext4");
    ok(
        &inst.banger(&["image", "import", "imp-ext4", ext4.to_str().unwrap()]),
        "import ext4",
    );
    assert_eq!(
        in_guest(
            &inst,
            "imp-ext4",
            "test -x /usr/sbin/sshd && echo sshd; cut -d. -f1 /etc/debian_version"
        ),
        "sshd\n12\n"
    );
    image_rm(&inst, "imp-ext4");

    // A directory, with a file of its own.
    let tree = s("tree");
    image_tree(&inst, &tree);
    std::fs::write(tree.join("etc/banger-import"), "from a dir\n").unwrap();
    ok(
        &inst.banger(&["image", "import", "imp-dir", tree.to_str().unwrap()]),
        "import dir",
    );
    assert_eq!(
        in_guest(&inst, "imp-dir", "cat /etc/banger-import"),
        "from a dir\n"
    );
    // Names are checked; existing images are not replaced.
    let out = inst.banger(&["image", "import", "imp-dir", tree.to_str().unwrap()]);
    assert!(text(&out.stderr).contains("image \"imp-dir\" already exists"));
    image_rm(&inst, "imp-dir");

    // A gzip tarball of it.
    std::fs::write(tree.join("etc/banger-import"), "from a tarball\n").unwrap();
    let tgz = s("root.tar.gz");
    run(
        Command::new("tar")
            .arg("-C")
            .arg(&tree)
            .arg("-czf")
            .arg(&tgz)
            .arg("."),
        "tar",
    );
    ok(
        &inst.banger(&["image", "import", "imp-tgz", tgz.to_str().unwrap()]),
        "import tarball",
    );
    assert_eq!(
        in_guest(&inst, "imp-tgz", "cat /etc/banger-import"),
        "from a tarball\n"
    );
    image_rm(&inst, "imp-tgz");
    std::fs::remove_dir_all(&tree).unwrap();

    // An OCI layout: the tarball as layer 1; layer 2 whites out the marker
    // and everything in /boot (so the image has no kernel) and adds a file.
    let oci = s("oci");
    std::fs::create_dir_all(oci.join("blobs/sha256")).unwrap();
    let l2 = s("l2.tar");
    std::fs::write(
        &l2,
        layer(&[
            ("etc/.wh.banger-import", b""),
            ("boot/.wh..wh..opq", b""),
            ("etc/layer2", b"layer 2\n"),
        ]),
    )
    .unwrap();
    let blob = |p: &Path| -> (String, u64) {
        let d = sha256(p);
        std::fs::copy(p, oci.join("blobs/sha256").join(&d)).unwrap();
        (d, std::fs::metadata(p).unwrap().len())
    };
    let (d1, n1) = blob(&tgz);
    let (d2, n2) = blob(&l2);
    let config = s("config.json");
    std::fs::write(
        &config,
        r#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#,
    )
    .unwrap();
    let (dc, nc) = blob(&config);
    let manifest = s("manifest.json");
    std::fs::write(
        &manifest,
        format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
            "config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{dc}","size":{nc}}},
            "layers":[
              {{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:{d1}","size":{n1}}},
              {{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:{d2}","size":{n2}}}]}}"#
        ),
    )
    .unwrap();
    let (dm, nm) = blob(&manifest);
    std::fs::write(
        oci.join("index.json"),
        format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json",
            "digest":"sha256:{dm}","size":{nm},"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#
        ),
    )
    .unwrap();
    std::fs::write(oci.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let out = inst.banger(&["image", "import", "imp-oci", oci.to_str().unwrap()]);
    ok(&out, "import OCI layout");
    assert!(
        text(&out.stderr).contains("the kernel will be image bookworm's"),
        "{}",
        text(&out.stderr)
    );
    let seen = in_guest(
        &inst,
        "imp-oci",
        "cat /etc/layer2; test -e /etc/banger-import && echo marker; ls /boot | wc -l; \
         test -f /lib/modules/$(uname -r)/modules.dep && echo modules",
    );
    assert_eq!(seen, "layer 2\n0\nmodules\n");
    image_rm(&inst, "imp-oci");
    std::fs::remove_dir_all(&oci).unwrap();

    // `docker save` output, as an archive: the same two layers.
    let docker = s("docker");
    std::fs::create_dir_all(docker.join("a")).unwrap();
    std::fs::create_dir_all(docker.join("b")).unwrap();
    std::fs::copy(&tgz, docker.join("a/layer.tar")).unwrap();
    std::fs::copy(&l2, docker.join("b/layer.tar")).unwrap();
    std::fs::write(
        docker.join("manifest.json"),
        r#"[{"Config":"c.json","RepoTags":["t:latest"],"Layers":["a/layer.tar","b/layer.tar"]}]"#,
    )
    .unwrap();
    let archive = s("docker.tar");
    run(
        Command::new("tar")
            .arg("-C")
            .arg(&docker)
            .arg("-cf")
            .arg(&archive)
            .arg("."),
        "tar the docker archive",
    );
    std::fs::remove_dir_all(&docker).unwrap();
    ok(
        &inst.banger(&["image", "import", "imp-docker", archive.to_str().unwrap()]),
        "import docker archive",
    );
    assert_eq!(
        in_guest(&inst, "imp-docker", "cat /etc/layer2"),
        "layer 2\n"
    );

    assert!(leftovers(&inst).is_empty(), "{:?}", leftovers(&inst));
    image_rm(&inst, "imp-docker");
    inst.assert_baseline();
}

/// A busybox-only root filesystem, built here offline as a tarball (what
/// Alpine's minirootfs is: busybox and its links, no sshd, no
/// /etc/passwd): imported, it boots, runs commands and copies files
/// through the agent; `vm ssh` says at once that there is no sshd. Then
/// the same tree with an sshd that cannot start (a dynamic binary whose
/// loader the tree lacks; then one whose library is a dangling link):
/// `vm ssh` says that it exited, and names what is missing.
#[test]
fn images_without_a_working_sshd_boot_and_only_ssh_says_so() {
    let inst = Instance::new(&banger_bin()).with_image();
    let scratch = tempfile::tempdir().unwrap();
    let tree = scratch.path().join("bb");
    // Merged /usr, as Debian's own: busybox links its applets to where it
    // runs from (its /proc/self/exe), /usr/bin/busybox.
    std::fs::create_dir_all(tree.join("usr/bin")).unwrap();
    std::os::unix::fs::symlink("usr/bin", tree.join("bin")).unwrap();
    std::fs::copy("/usr/bin/busybox", tree.join("usr/bin/busybox")).unwrap();
    run(
        Command::new("/usr/bin/busybox")
            .args(["--install", "-s"])
            .arg(tree.join("usr/bin")),
        "busybox --install",
    );
    let tar_of = |name: &str| {
        let t = scratch.path().join(name);
        run(
            Command::new("tar")
                .arg("-C")
                .arg(&tree)
                .arg("-cf")
                .arg(&t)
                .arg("."),
            "tar the tree",
        );
        t
    };
    let plain = tar_of("bb.tar");
    ok(
        &inst.banger(&["image", "import", "bb", plain.to_str().unwrap()]),
        "import a busybox-only tree",
    );
    // A dynamic binary as sshd (ssh-keygen: the host has no sshd), with
    // neither its loader nor its libraries.
    std::fs::create_dir_all(tree.join("usr/sbin")).unwrap();
    std::fs::copy("/usr/bin/ssh-keygen", tree.join("usr/sbin/sshd")).unwrap();
    let broken = tar_of("broken.tar");
    ok(
        &inst.banger(&["image", "import", "bb-broken", broken.to_str().unwrap()]),
        "import a tree whose sshd cannot start",
    );
    // Its loader and libraries, one of them a dangling link.
    let ldd = run(Command::new("ldd").arg("/usr/bin/ssh-keygen"), "ldd");
    let mut missing = None;
    for path in ldd
        .split_whitespace()
        .filter(|w| w.starts_with('/') && !w.starts_with("/usr/bin"))
    {
        let to = tree.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        if path.contains("libcrypto") {
            std::os::unix::fs::symlink("libcrypto.so.3.gone", &to).unwrap();
            missing = Some(to.file_name().unwrap().to_string_lossy().into_owned());
        } else if !to.exists() {
            std::fs::copy(path, &to).unwrap();
        }
    }
    let missing = missing.expect("ssh-keygen links libcrypto");
    let libs = tar_of("libs.tar");
    ok(
        &inst.banger(&["image", "import", "bb-libs", libs.to_str().unwrap()]),
        "import a tree whose sshd has a dangling library link",
    );
    let no_loader = "exited with status 127 (its loader /lib64/ld-linux-x86-64.so.2 is missing";
    let no_lib = format!("{missing}: cannot open shared object file");

    for (image, why) in [
        ("bb", "the image has no SSH server (/usr/sbin/sshd)"),
        ("bb-broken", no_loader),
        ("bb-libs", no_lib.as_str()),
    ] {
        ok(
            &inst.banger(&["vm", "run", "-d", "--name", image, "--image", image]),
            "vm run -d",
        );
        let out = inst.banger(&[
            "vm",
            "exec",
            image,
            "--",
            "sh",
            "-c",
            "echo hi; cat /etc/hostname",
        ]);
        assert_eq!(ok(&out, "exec"), format!("hi\n{image}\n"));
        let local = scratch.path().join(format!("{image}.txt"));
        std::fs::write(&local, "copied\n").unwrap();
        let dst = format!("{image}:/root/");
        ok(
            &inst.banger(&["vm", "cp", local.to_str().unwrap(), &dst]),
            "cp in",
        );
        let out = inst.banger(&[
            "vm",
            "exec",
            image,
            "--",
            "cat",
            &format!("/root/{image}.txt"),
        ]);
        assert_eq!(ok(&out, "read it back"), "copied\n");
        let t0 = std::time::Instant::now();
        let out = inst.banger(&["vm", "ssh", image, "--", "true"]);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(
            err.contains(&format!("vm {image} has no sshd")) && err.contains(why),
            "{err}"
        );
        assert!(
            err.contains("vm exec -it"),
            "names what works instead: {err}"
        );
        eprintln!("vm ssh on {image} refused after {:?}", t0.elapsed());
        ok(&inst.banger(&["vm", "rm", "-f", image]), "rm");
    }
    for img in ["bb", "bb-broken", "bb-libs"] {
        ok(&inst.banger(&["image", "rm", img]), "image rm");
    }
    inst.assert_baseline();
}

/// On QEMU's default strategy: the commit is a `qemu-img convert`.
#[test]
fn customize_saves_what_a_script_did() {
    let inst = Instance::new(&banger_bin()).with_image();
    let scratch = tempfile::tempdir().unwrap();
    let script = scratch.path().join("setup.sh");
    // With outside access: a default route through the VM's NAT.
    std::fs::write(
        &script,
        "set -e\nip route | grep -q '^default'\necho customized > /etc/banger-custom\nrm /etc/debian_version\n",
    )
    .unwrap();
    let out = inst.banger(&[
        "image",
        "customize",
        "cust",
        "--from",
        "bookworm",
        "--run",
        script.to_str().unwrap(),
    ]);
    ok(&out, "image customize");
    assert!(inst.vms().is_empty(), "the customize VM is gone");
    assert_eq!(
        in_guest(
            &inst,
            "cust",
            "cat /etc/banger-custom; test -e /etc/debian_version && echo kept; true"
        ),
        "customized\n"
    );

    // A failing script saves nothing and leaves no VM.
    std::fs::write(&script, "exit 3\n").unwrap();
    let out = inst.banger(&[
        "image",
        "customize",
        "bad",
        "--run",
        script.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("exited with status 3"),
        "{}",
        text(&out.stderr)
    );
    assert!(inst.vms().is_empty());
    let ls = ok(&inst.banger(&["image", "ls"]), "image ls");
    assert!(!ls.contains("bad"), "{ls}");

    assert!(leftovers(&inst).is_empty(), "{:?}", leftovers(&inst));
    ok(&inst.banger(&["image", "rm", "cust"]), "image rm");
    inst.assert_baseline();
}

#[test]
fn commit_flattens_an_overlay_vm() {
    // Who the commit's tools run as, and in which cgroup (a shell run
    // confined as they are reports it; failpoint builds only).
    let probe_dir = tempfile::tempdir().unwrap();
    let probe = probe_dir.path().join("probe");
    let inst = Instance::new(&banger_bin())
        .with_env("BANGER_ROOT_DISK", "overlay")
        .with_env(
            "FAILPOINTS",
            &format!("commit.tool.probe=return({})", probe.display()),
        )
        .with_image();
    // Refused while running, then flattened from the overlay: the image
    // and the VM's upper disk merged in a private mount namespace.
    ok(&inst.banger(&["vm", "run", "--name", "c1", "--", "sh", "-c",
        "echo committed > /etc/banger-commit && rm /etc/hostname.old 2>/dev/null; rm /etc/issue"]),
        "write in c1");
    let out = inst.banger(&["vm", "commit", "c1", "from-c1"]);
    assert!(
        text(&out.stderr).contains("`banger vm stop c1` first"),
        "{}",
        text(&out.stderr)
    );
    ok(&inst.banger(&["vm", "stop", "c1"]), "stop c1");
    // The tools that read the guest's disk run as the VM's user, lent the
    // file while they do: its owner and mode are as they were after.
    let id = inst.vm("c1").unwrap()["id"].as_str().unwrap().to_string();
    let upper = inst.state().join("vms").join(&id).join("root-upper.ext4");
    let meta = |p: &std::path::Path| {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(p).unwrap();
        (m.uid(), m.gid(), m.mode() & 0o7777)
    };
    let before = meta(&upper);
    assert_ne!(before.0, 0, "the upper disk is the VM user's");
    ok(
        &inst.banger(&["vm", "commit", "c1", "from-c1"]),
        "commit c1",
    );
    assert_eq!(meta(&upper), before);
    let seen = std::fs::read_to_string(&probe).expect("the commit ran its tools");
    let mut lines = seen.lines();
    let tool = lines.next().unwrap_or_default();
    assert!(tool == "e2fsck" || tool == "qemu-img", "{seen}");
    let uid: u32 = lines.next().unwrap_or_default().trim().parse().unwrap();
    assert_eq!(uid, before.0, "a tool runs as the VM's user: {seen}");
    assert!(
        lines.any(|l| l.ends_with(&format!("/{id}"))),
        "a tool runs in the VM's cgroup: {seen}"
    );
    ok(
        &inst.banger(&["vm", "start", "c1"]),
        "c1 starts again after its commit",
    );
    ok(&inst.banger(&["vm", "delete", "-f", "c1"]), "delete c1");
    assert_eq!(
        in_guest(
            &inst,
            "from-c1",
            "cat /etc/banger-commit; test -e /etc/issue && echo issue; true"
        ),
        "committed\n"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&inst.state().to_string_lossy().into_owned()),
        "a commit mount is visible:\n{mounts}"
    );
    let state = inst.state().to_string_lossy().into_owned();
    let loops = || run(Command::new("losetup").arg("--list"), "losetup");
    // Autoclear detaches them as their mounts go.
    assert!(
        test_infra::wait_until(std::time::Duration::from_secs(10), || !loops()
            .contains(&state)),
        "loop devices left:\n{}",
        loops()
    );
    assert!(leftovers(&inst).is_empty(), "{:?}", leftovers(&inst));
    // A VM created but never booted: its root is the image's.
    ok(&inst.banger(&["vm", "create", "--name", "c0"]), "create c0");
    ok(
        &inst.banger(&["vm", "commit", "c0", "from-c0"]),
        "commit c0",
    );
    ok(&inst.banger(&["vm", "delete", "-f", "c0"]), "delete c0");
    assert_eq!(
        in_guest(&inst, "from-c0", "cut -d. -f1 /etc/debian_version"),
        "12\n"
    );
    for img in ["from-c1", "from-c0"] {
        ok(&inst.banger(&["image", "rm", img]), "image rm");
    }
    inst.assert_baseline();
}

/// A `vm create` of the default image finishes while the gate is
/// shut (`held`: what waits at it).
fn create_meanwhile(gate: &Gate, inst: &Instance, held: &str) {
    let mut create = inst.spawn(&["vm", "create", "--name", "meanwhile"]);
    let mut created = None;
    let done = wait_until(Duration::from_secs(120), || {
        created = create.try_wait().unwrap();
        created.is_some()
    });
    if !done {
        gate.open();
        panic!("vm create waited for {held}");
    }
    assert!(
        created.unwrap().success(),
        "vm create: {:?}",
        create.wait_with_output()
    );
}

/// A commit holds nothing a `vm create` needs: while one waits at a gate
/// (its locks taken, its tools about to run), a VM of the same image is
/// created; the commit then goes on.
#[test]
fn a_commit_in_progress_holds_up_no_create() {
    let inst = Instance::new(&banger_bin())
        .with_env("BANGER_ROOT_DISK", "overlay")
        .with_image();
    ok(
        &inst.banger(&["vm", "run", "-d", "--name", "c1"]),
        "vm run c1",
    );
    ok(&inst.banger(&["vm", "stop", "c1"]), "stop c1");
    let gate = Gate::on(&inst, "commit.tools");
    let commit = inst.spawn(&["vm", "commit", "c1", "from-c1"]);
    gate.reached(&inst, "the commit");
    create_meanwhile(&gate, &inst, "a commit");
    gate.open();
    let out = test_infra::bounded::wait_output(commit);
    ok(&out, "the commit, once the gate opened");
    for vm in ["meanwhile", "c1"] {
        ok(&inst.banger(&["vm", "rm", "-f", vm]), "rm");
    }
    ok(&inst.banger(&["image", "rm", "from-c1"]), "image rm");
    inst.assert_baseline();
}

/// Where the kernel has device-mapper: a dm-snapshot VM (on QEMU, which
/// takes the snapshot device as a raw disk) committed and booted. This
/// kernel has none: the test says so and does not run.
#[test]
fn commit_flattens_a_dm_snapshot_vm() {
    if !Path::new("/dev/mapper/control").exists() {
        test_infra::not_run_here(
            "commit_flattens_a_dm_snapshot_vm",
            "this kernel has no device-mapper (/dev/mapper/control is missing): vm commit's \
             dm-snapshot path (re-activate, copy the device, tear down) was not exercised",
        );
        return;
    }
    let inst = Instance::new(&banger_bin())
        .with_env("BANGER_ROOT_DISK", "dm-snapshot")
        .with_image();
    ok(
        &inst.banger(&[
            "vm",
            "run",
            "--name",
            "d1",
            "--",
            "sh",
            "-c",
            "echo dm > /etc/banger-dm",
        ]),
        "write in d1",
    );
    ok(&inst.banger(&["vm", "stop", "d1"]), "stop d1");
    ok(
        &inst.banger(&["vm", "commit", "d1", "from-d1"]),
        "commit d1",
    );
    ok(&inst.banger(&["vm", "delete", "-f", "d1"]), "delete d1");
    assert_eq!(in_guest(&inst, "from-d1", "cat /etc/banger-dm"), "dm\n");
    ok(&inst.banger(&["image", "rm", "from-d1"]), "image rm");
    inst.assert_baseline();
}

/// An import holds only its own image: while one waits (at a gate the
/// test holds, inside the import, its image's lock taken), VMs of other
/// images are created, and the import then finishes.
#[test]
fn an_import_in_progress_holds_up_no_other_image() {
    let inst = Instance::new(&banger_bin()).with_image();
    let scratch = tempfile::tempdir().unwrap();
    let tree = scratch.path().join("bb");
    std::fs::create_dir_all(tree.join("bin")).unwrap();
    std::fs::copy("/usr/bin/busybox", tree.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", tree.join("bin/sh")).unwrap();
    let gate = Gate::on(&inst, "image.import.locked");
    let mut import = inst.spawn(&["image", "import", "slow", tree.to_str().unwrap()]);
    gate.reached(&inst, "the import");
    create_meanwhile(&gate, &inst, "another image's import");
    assert!(
        import.try_wait().unwrap().is_none(),
        "the import still waits"
    );
    // The gate opens: the import goes on and finishes.
    gate.open();
    let out = test_infra::bounded::wait_output(import);
    ok(&out, "the import, once the gate opened");
    ok(&inst.banger(&["vm", "rm", "meanwhile"]), "rm");
    ok(&inst.banger(&["image", "rm", "slow"]), "image rm");
    inst.assert_baseline();
}
