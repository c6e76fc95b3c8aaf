//! The README's tour, run as written (issue 24: "the README's tour works
//! as written, the image import line included"): every command of its
//! code block, read from README.md itself, in a namespace of the test's
//! own, from a directory holding what the commands name (`./src`, and an
//! Alpine minirootfs tarball built here offline: Alpine's layout, its
//! busybox replaced by Debian's static one). A command added to the tour
//! runs here too; one that cannot is named in [`NOT_HERE`] with why.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use test_infra::{ok, text, Instance};

fn banger_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_banger"))
}

/// The tour's commands that the test does not run, and why.
const NOT_HERE: &[(&str, &str)] = &[(
    "sudo usermod -aG banger $USER",
    "changes a host account's groups; tests/access.rs runs members of a socket group",
)];

/// The commands of the README's tour, in order: the code block under
/// "## A tour", comments dropped, `&&` chains split.
fn tour() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md");
    let readme = std::fs::read_to_string(&path).expect("read README.md");
    let start = readme.find("\n## A tour").expect("README.md has its tour");
    let body = &readme[start + 1..];
    let end = body[1..].find("\n## ").map_or(body.len(), |i| i + 1);
    let mut cmds = Vec::new();
    for line in body[..end].lines() {
        let Some(code) = line.strip_prefix("    ") else {
            continue;
        };
        let code = code.split(" #").next().unwrap_or("").trim();
        if code.is_empty() || code.starts_with('#') {
            continue;
        }
        cmds.extend(code.split("&&").map(|c| c.trim().to_string()));
    }
    cmds
}

/// An Alpine-shaped minirootfs: `/bin/busybox` (static) and its applets
/// as links to it where Alpine puts them, `/etc/passwd` whose root has
/// `/bin/ash`, `/etc/alpine-release`; no sshd, no kernel.
fn alpine_minirootfs(dir: &Path) -> PathBuf {
    let tree = dir.join("alpine-tree");
    std::fs::create_dir_all(tree.join("bin")).unwrap();
    std::fs::copy("/usr/bin/busybox", tree.join("bin/busybox")).unwrap();
    let list = Command::new("/usr/bin/busybox")
        .arg("--list-full")
        .output()
        .unwrap();
    for applet in text(&list.stdout).lines() {
        let at = tree.join(applet);
        if applet == "bin/busybox" || at.exists() {
            continue;
        }
        std::fs::create_dir_all(at.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink("/bin/busybox", &at).unwrap();
    }
    for d in [
        "dev",
        "proc",
        "sys",
        "run",
        "home",
        "var/empty",
        "usr/local/bin",
    ] {
        std::fs::create_dir_all(tree.join(d)).unwrap();
    }
    use std::os::unix::fs::PermissionsExt;
    for (d, mode) in [("root", 0o700), ("tmp", 0o1777)] {
        std::fs::create_dir_all(tree.join(d)).unwrap();
        std::fs::set_permissions(tree.join(d), std::fs::Permissions::from_mode(mode)).unwrap();
    }
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    for (f, body) in [
        (
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/ash\nnobody:x:65534:65534:nobody:/:/sbin/nologin\n",
        ),
        ("etc/group", "root:x:0:root\nnobody:x:65534:\n"),
        ("etc/alpine-release", "3.20.3\n"),
        (
            "etc/os-release",
            "NAME=\"Alpine Linux\"\nID=alpine\nVERSION_ID=3.20.3\n",
        ),
        ("etc/hostname", "localhost\n"),
    ] {
        std::fs::write(tree.join(f), body).unwrap();
    }
    let tarball = dir.join("alpine-minirootfs-3.20.3-x86_64.tar.gz");
    let out = Command::new("tar")
        .arg("-C")
        .arg(&tree)
        .arg("-czf")
        .arg(&tarball)
        .args(["--owner=0", "--group=0", "."])
        .output()
        .unwrap();
    ok(&out, "tar the Alpine-shaped tree");
    std::fs::remove_dir_all(&tree).unwrap();
    tarball
}

/// `banger ARGS` with its input a terminal (a PTY the test types `input`
/// into), as `vm exec -it` wants: its output.
fn on_a_terminal(inst: &Instance, cwd: &Path, args: &[&str], input: &[u8]) -> String {
    let pty = nix::pty::openpty(None, None).unwrap();
    let child = inst
        .banger_cmd_in(Some(cwd), args)
        .stdin(std::fs::File::from(pty.slave))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut master = std::fs::File::from(pty.master);
    master.write_all(input).unwrap();
    let out = test_infra::bounded::wait_output(child);
    drop(master);
    ok(&out, &args.join(" "))
}

#[test]
fn the_readme_tour_runs_as_written() {
    let inst = Instance::new(&banger_bin()).with_image();
    let cwd = tempfile::tempdir().unwrap();
    alpine_minirootfs(cwd.path());
    std::fs::create_dir_all(cwd.path().join("src")).unwrap();
    std::fs::write(cwd.path().join("src/hello.txt"), "from the host\n").unwrap();

    let cmds = tour();
    assert!(cmds.len() >= 10, "the tour is read: {cmds:?}");
    for line in &cmds {
        if let Some((_, why)) = NOT_HERE.iter().find(|(c, _)| c == line) {
            eprintln!("tour: not run here: {line} ({why})");
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            words.first(),
            Some(&"banger"),
            "a tour command this test does not know how to run: {line:?} (add it to NOT_HERE \
             with why, or make it a banger command)"
        );
        let args = &words[1..];
        eprintln!("tour: {line}");
        let out = if args.starts_with(&["vm", "exec", "-it"]) {
            on_a_terminal(&inst, cwd.path(), args, b"echo tour-$((6 * 7)); exit\n")
        } else {
            let out = test_infra::bounded::output_within(
                inst.banger_cmd_in(Some(cwd.path()), args)
                    .stdin(Stdio::null()),
                test_infra::bounded::COMMAND_LIMIT,
            );
            ok(&out, line)
        };
        // What each says it does.
        match args {
            ["vm", "run", "--rm", "--", "uname", "-a"] => {
                assert!(out.starts_with("Linux "), "{out}")
            }
            ["vm", "exec", "-it", ..] => assert!(out.contains("tour-42"), "{out}"),
            ["vm", "ls", ..] => assert!(out.contains("dev"), "{out}"),
            ["vm", "cp", src, to] => {
                let (vm, dir) = to.split_once(':').unwrap();
                let file = format!("{dir}{}/hello.txt", src.trim_start_matches("./"));
                let got = ok(&inst.banger(&["vm", "exec", vm, "--", "cat", &file]), "cat");
                assert_eq!(got, "from the host\n");
            }
            ["vm", "fork", origin, new, "-n", n] => {
                let n: usize = n.parse().unwrap();
                let clones: Vec<String> = inst
                    .vms()
                    .iter()
                    .filter_map(|v| v["name"].as_str().map(str::to_string))
                    .filter(|v| v.starts_with(new))
                    .collect();
                assert_eq!(clones.len(), n, "{origin} forked into {clones:?}");
            }
            ["api", "serve", "--listen", at] => {
                assert_eq!(out.trim(), *at);
                ok(&inst.banger(&["api", "stop"]), "api stop");
            }
            ["vm", "pause", "--to-disk", name] => {
                assert_eq!(inst.vm(name).unwrap()["state"], "suspended");
            }
            ["vm", "rm", name] => assert!(inst.vm(name).is_none(), "{name} is gone"),
            ["image", "import", name, ..] => {
                // The imported Alpine tree boots and runs commands as root.
                let got = ok(
                    &inst.banger(&[
                        "vm",
                        "run",
                        "--rm",
                        "--image",
                        name,
                        "--",
                        "sh",
                        "-c",
                        "cat /etc/alpine-release; id -un; readlink /bin/sh",
                    ]),
                    "vm run on the imported Alpine tree",
                );
                assert_eq!(got, "3.20.3\nroot\n/bin/busybox\n");
            }
            _ => {}
        }
    }
    // What the tour left: its clones; then nothing.
    for v in inst.vms() {
        let name = v["name"].as_str().unwrap();
        ok(&inst.banger(&["vm", "rm", "-f", name]), "rm");
    }
    ok(&inst.banger(&["snapshot", "rm", "base"]), "snapshot rm");
    ok(&inst.banger(&["image", "rm", "alpine"]), "image rm");
    inst.assert_baseline();
}
