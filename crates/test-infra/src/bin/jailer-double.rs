//! A stand-in for Firecracker's jailer (`docs/jailer.md`, v1.16), for
//! testing banger's jailed Firecracker path here, where Firecracker itself
//! cannot run (no hardware KVM); it execs `firecracker-double`.
//!
//! It takes the jailer's command line as the jailer parses it (`--flag
//! value`; `--id`, `--exec-file`, `--uid`, `--gid` required; the id
//! alphanumeric and '-' up to 64; the exec file's name must contain
//! "firecracker"; `--parent-cgroup` relative; `--cgroup-version` 1 or 2;
//! `--cgroup file=value`, `--resource-limit fsize|no-file=N`, `--netns`,
//! `--daemonize`, `--new-pid-ns`; after `--`, Firecracker's own
//! arguments); anything else is refused with exit status 1. Then it does
//! what the jailer does, in its order: closes every descriptor but 0-2,
//! clears the environment, makes `<chroot_base>/<exec_file_name>/<id>/root`
//! and copies the exec file in (and `banger-vport` from beside it, the
//! double's vsock helper, which the real Firecracker has inside), sets the resource limits (no-file 2048 by
//! default), makes and joins the `--cgroup` groups, makes `/dev/net/tun`
//! and `/dev/kvm` in the chroot (and `/`, `/dev`, `/dev/net`, `/run`, all
//! 0700) owned by `uid:gid`, joins `--netns`, and execs the copy as
//! `uid:gid` with no supplementary group, with `--id <id>
//! --start-time-us N --start-time-cpu-us N --parent-cpu-time-us N` and the
//! extra arguments.
//!
//! What it does not do: the mount namespace and `pivot_root` into the
//! chroot. The double it execs is dynamically linked and boots its guest
//! with the host's QEMU, neither of which runs in an empty root; instead it
//! starts in the chroot as its working directory and resolves every path
//! it is given (`/api.sock`, `/drive-root`, ...) there, as the jailed
//! Firecracker would see them. So a path banger forgot to put in the
//! chroot fails here as it would under the real jailer.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn die(msg: &str) -> ! {
    eprintln!("jailer-double: {msg}");
    std::process::exit(1);
}

#[derive(Debug, Default)]
struct Args {
    id: Option<String>,
    exec_file: Option<PathBuf>,
    uid: Option<u32>,
    gid: Option<u32>,
    chroot_base: Option<PathBuf>,
    parent_cgroup: Option<PathBuf>,
    cgroup_version: Option<u8>,
    cgroups: Vec<(String, String)>,
    netns: Option<PathBuf>,
    limits: Vec<(String, u64)>,
    daemonize: bool,
    new_pid_ns: bool,
    extra: Vec<String>,
}

fn parse(argv: &[String]) -> Args {
    let mut a = Args::default();
    let mut it = argv.iter();
    while let Some(arg) = it.next() {
        let mut val = || {
            it.next()
                .cloned()
                .unwrap_or_else(|| die(&format!("{arg}: a value is required")))
        };
        match arg.as_str() {
            "--id" => a.id = Some(val()),
            "--exec-file" => a.exec_file = Some(val().into()),
            "--uid" => a.uid = Some(val().parse().unwrap_or_else(|_| die("--uid: not a uid"))),
            "--gid" => a.gid = Some(val().parse().unwrap_or_else(|_| die("--gid: not a gid"))),
            "--chroot-base-dir" => a.chroot_base = Some(val().into()),
            "--parent-cgroup" => a.parent_cgroup = Some(val().into()),
            "--cgroup-version" => {
                a.cgroup_version = Some(match val().as_str() {
                    "1" => 1,
                    "2" => 2,
                    v => die(&format!("--cgroup-version {v:?}: 1 or 2")),
                })
            }
            "--cgroup" => {
                let v = val();
                match v.split_once('=') {
                    Some((f, x)) if !f.is_empty() && !x.is_empty() && !x.contains('=') => {
                        a.cgroups.push((f.into(), x.into()))
                    }
                    _ => die(&format!("--cgroup {v:?}: want <file>=<value>")),
                }
            }
            "--netns" => a.netns = Some(val().into()),
            "--resource-limit" => {
                let v = val();
                let (k, n) = v.split_once('=').unwrap_or_else(|| {
                    die(&format!("--resource-limit {v:?}: want <resource>=<value>"))
                });
                if k != "fsize" && k != "no-file" {
                    die(&format!("--resource-limit: unknown resource {k:?}"));
                }
                let n = n
                    .parse()
                    .unwrap_or_else(|_| die(&format!("--resource-limit {v:?}: not a number")));
                a.limits.push((k.into(), n));
            }
            "--daemonize" => a.daemonize = true,
            "--new-pid-ns" => a.new_pid_ns = true,
            "--" => {
                a.extra = it.cloned().collect();
                break;
            }
            other => die(&format!("unknown argument {other:?}")),
        }
    }
    a
}

fn check(r: nix::Result<()>, what: &str) {
    if let Err(e) = r {
        die(&format!("{what}: {e}"));
    }
}

fn main() {
    let start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0);
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let a = parse(&argv);
    let id = a.id.clone().unwrap_or_else(|| die("--id is required"));
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        die(&format!("invalid instance id {id:?}"));
    }
    let exec_file = a
        .exec_file
        .clone()
        .unwrap_or_else(|| die("--exec-file is required"));
    let exec_file = std::fs::canonicalize(&exec_file)
        .unwrap_or_else(|e| die(&format!("--exec-file {}: {e}", exec_file.display())));
    if !exec_file.is_file() {
        die(&format!("{} is not a file", exec_file.display()));
    }
    let exec_name = exec_file
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| die("--exec-file has no file name"));
    if !exec_name.to_string_lossy().contains("firecracker") {
        die("the exec file's name must contain \"firecracker\"");
    }
    let uid = a.uid.unwrap_or_else(|| die("--uid is required"));
    let gid = a.gid.unwrap_or_else(|| die("--gid is required"));
    let base = a
        .chroot_base
        .clone()
        .unwrap_or_else(|| "/srv/jailer".into());
    let base = std::fs::canonicalize(&base)
        .unwrap_or_else(|e| die(&format!("--chroot-base-dir {}: {e}", base.display())));
    if !base.is_dir() {
        die(&format!("{} is not a directory", base.display()));
    }
    let parent_cgroup = a
        .parent_cgroup
        .clone()
        .unwrap_or_else(|| PathBuf::from(&exec_name));
    if parent_cgroup
        .components()
        .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        die("--parent-cgroup must be a relative path without . or ..");
    }
    let version = a.cgroup_version.unwrap_or(1);

    // Every descriptor but stdin, stdout and stderr is closed.
    if let Ok(rd) = std::fs::read_dir("/proc/self/fd") {
        let fds: Vec<i32> = rd
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .filter(|fd| *fd > 2)
            .collect();
        for fd in fds {
            // SAFETY: closing descriptors this process does not use (the
            // one read_dir held is gone); nothing refers to them after.
            unsafe { nix::libc::close(fd) };
        }
    }
    let keys: Vec<_> = std::env::vars_os().map(|(k, _)| k).collect();
    for k in keys {
        std::env::remove_var(k);
    }

    let root = base.join(&exec_name).join(&id).join("root");
    std::fs::create_dir_all(&root)
        .unwrap_or_else(|e| die(&format!("create {}: {e}", root.display())));
    let copy = root.join(&exec_name);
    std::fs::copy(&exec_file, &copy).unwrap_or_else(|e| die(&format!("copy the exec file: {e}")));
    // The double's own helper, its vsock (`banger-vport`, beside it in a
    // build tree), goes in too: the real jailer copies Firecracker alone,
    // whose vsock is inside it.
    if let Some(vport) = exec_file
        .parent()
        .map(|d| d.join("banger-vport"))
        .filter(|p| p.is_file())
    {
        std::fs::copy(&vport, root.join("banger-vport"))
            .unwrap_or_else(|e| die(&format!("copy {}: {e}", vport.display())));
    }

    let nofile = a
        .limits
        .iter()
        .find(|(k, _)| k == "no-file")
        .map(|l| l.1)
        .unwrap_or(2048);
    check(
        nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, nofile, nofile),
        "setrlimit no-file",
    );
    if let Some((_, n)) = a.limits.iter().find(|(k, _)| k == "fsize") {
        check(
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_FSIZE, *n, *n),
            "setrlimit fsize",
        );
    }
    for (file, value) in &a.cgroups {
        join_cgroup(version, &parent_cgroup, &id, file, value);
    }

    // The jail's folders and devices, owned by uid:gid.
    for d in ["", "dev", "dev/net", "run"] {
        let p = root.join(d);
        std::fs::create_dir_all(&p)
            .unwrap_or_else(|e| die(&format!("create {}: {e}", p.display())));
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700))
            .unwrap_or_else(|e| die(&format!("chmod {}: {e}", p.display())));
        own(&p, uid, gid);
    }
    for (dev, major, minor) in [("dev/net/tun", 10, 200), ("dev/kvm", 10, 232)] {
        let p = root.join(dev);
        let _ = std::fs::remove_file(&p);
        check(
            nix::sys::stat::mknod(
                &p,
                nix::sys::stat::SFlag::S_IFCHR,
                nix::sys::stat::Mode::from_bits_truncate(0o600),
                nix::sys::stat::makedev(major, minor),
            ),
            &format!("mknod {}", p.display()),
        );
        own(&p, uid, gid);
    }
    if let Some(ns) = &a.netns {
        let f = std::fs::File::open(ns)
            .unwrap_or_else(|e| die(&format!("--netns {}: {e}", ns.display())));
        check(
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET),
            "join --netns",
        );
    }
    if a.daemonize {
        check(nix::unistd::setsid().map(|_| ()), "setsid");
    }
    if a.new_pid_ns {
        die("--new-pid-ns is not played by this double (banger does not pass it)");
    }
    std::env::set_current_dir(&root).unwrap_or_else(|e| die(&format!("chdir: {e}")));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0);
    // (No supplementary group: std clears them when it sets the uid as
    // root, as the jailer's own exec does.)
    let e = Command::new(&copy)
        .args(["--id", &id])
        .args(["--start-time-us", &start.to_string()])
        .args(["--start-time-cpu-us", "0"])
        .args(["--parent-cpu-time-us", &(now - start).to_string()])
        .args(&a.extra)
        .uid(uid)
        .gid(gid)
        .exec();
    die(&format!("exec {}: {e}", copy.display()));
}

fn own(p: &Path, uid: u32, gid: u32) {
    check(
        nix::unistd::chown(
            p,
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
        ),
        &format!("chown {}", p.display()),
    );
}

/// `<mount of the file's controller>/<parent>/<id>`: made, the value
/// written, this process moved in (the jailer's `--cgroup`).
fn join_cgroup(version: u8, parent: &Path, id: &str, file: &str, value: &str) {
    let controller = file.split('.').next().unwrap_or("");
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mount = mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (dir, kind, opts) = (f.get(1)?, f.get(2)?, f.get(3)?);
        let hit = match version {
            2 => *kind == "cgroup2",
            _ => *kind == "cgroup" && opts.split(',').any(|o| o == controller),
        };
        hit.then(|| PathBuf::from(dir))
    });
    let Some(mount) = mount else {
        die(&format!(
            "no cgroup v{version} hierarchy has the {controller} controller"
        ));
    };
    let dir = mount.join(parent).join(id);
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| die(&format!("create {}: {e}", dir.display())));
    std::fs::write(dir.join(file), value).unwrap_or_else(|e| die(&format!("write {file}: {e}")));
    let procs = if version == 2 {
        "cgroup.procs"
    } else {
        "tasks"
    };
    std::fs::write(dir.join(procs), std::process::id().to_string())
        .unwrap_or_else(|e| die(&format!("join {}: {e}", dir.display())));
}
