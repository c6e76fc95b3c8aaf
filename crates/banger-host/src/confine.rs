//! Starting a VMM (or one of its helpers) confined: in its VM's control
//! groups from its first instruction, as an unprivileged user of its own,
//! with no supplementary groups but the ones named, no way to gain
//! privileges back (`PR_SET_NO_NEW_PRIVS`), and an empty environment but
//! what the caller sets.
//!
//! Everything happens in the child between `fork` and `exec`, in this
//! order: write "0" into each `cgroup.procs` (the files are opened by the
//! daemon before the fork, so no path is resolved in the child), then
//! `setgroups`, `setgid`, `setuid` (which drops every capability), then
//! `prctl(PR_SET_NO_NEW_PRIVS)`; before the identity changes, a network
//! namespace of its own where asked. Only async-signal-safe system calls
//! run there.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::libc;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfineError {
    #[error("open {path} to join the VM's cgroup: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Who a confined process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (the images' group; `kvm` where KVM is used).
    pub groups: Vec<u32>,
}

/// What a confined process gets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Confinement {
    /// None: it keeps the daemon's identity (virtiofsd, which needs root
    /// for its own sandbox), but still joins the cgroups.
    pub identity: Option<Identity>,
    /// `cgroup.procs` files, one per hierarchy.
    pub cgroup_procs: Vec<PathBuf>,
    /// A network namespace of its own, empty (no interface but a loopback
    /// that is down): a process that needs no network (QEMU, which gets
    /// its tap as a descriptor that keeps working across namespaces; the
    /// vsock backend, which speaks Unix sockets) then has none, so a
    /// guest that takes it over cannot reach the host's networks, the
    /// metadata address or abstract Unix sockets from there.
    pub new_netns: bool,
    /// A mount namespace of its own in which `/tmp` and `/dev/shm` are
    /// small private tmpfs: a process that uses neither (QEMU, the vsock
    /// backend) cannot fill the host's, or leave files there for the next
    /// VM of its uid.
    pub private_tmp: bool,
    /// The largest file it may write (`RLIMIT_FSIZE`; past it a write
    /// fails with EFBIG): a helper writing into a descriptor of the
    /// daemon's cannot fill the host's disk.
    pub max_file_bytes: Option<u64>,
}

/// The size of the private `/tmp` and `/dev/shm`.
const PRIVATE_TMP_OPTS: &std::ffi::CStr = c"size=1m,mode=1777";

/// The environment a confined process starts with: nothing of the
/// daemon's (or of whichever CLI started the daemon) but a fixed PATH.
pub const SAFE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl Confinement {
    /// Sets `cmd` up to start confined.
    pub fn apply(&self, cmd: &mut Command) -> Result<(), ConfineError> {
        let files: Vec<OwnedFd> = self
            .cgroup_procs
            .iter()
            .map(|p| open_procs(p))
            .collect::<Result<_, _>>()?;
        let id = self.identity.clone();
        let new_netns = self.new_netns;
        let private_tmp = self.private_tmp;
        let max_file = self.max_file_bytes.map(|b| libc::rlimit {
            rlim_cur: b,
            rlim_max: b,
        });
        cmd.env_clear().env("PATH", SAFE_PATH);
        // SAFETY: the closure runs in the forked child before exec and
        // makes only async-signal-safe system calls (write, unshare,
        // setgroups, setgid, setuid, prctl) on data prepared before the fork; it
        // allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                for f in &files {
                    let b = b"0";
                    // SAFETY: a valid descriptor and a 1-byte buffer.
                    if libc::write(f.as_raw_fd(), b.as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if new_netns && libc::unshare(libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if private_tmp {
                    private_tmpfs()?;
                }
                // SAFETY: a pointer to an rlimit prepared before the fork.
                if let Some(lim) = &max_file {
                    if libc::setrlimit(libc::RLIMIT_FSIZE, lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some(id) = &id {
                    // SAFETY: a pointer to `len` gid_t values that outlive
                    // the call.
                    if libc::setgroups(id.groups.len(), id.groups.as_ptr()) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    if libc::setgid(id.gid) != 0 || libc::setuid(id.uid) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(())
    }
}

/// The supplementary groups of the process at the other end of a Unix
/// socket, as they were when it connected (`SO_PEERGROUPS`): what the
/// kernel recorded, not what `/proc/<pid>` says now (the pid may be
/// another process's by then).
pub fn peer_groups(sock: &impl AsRawFd) -> std::io::Result<Vec<u32>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: a buffer of `len` bytes that outlives the call.
        let r = unsafe {
            libc::getsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if r == 0 {
            groups.truncate(len as usize / std::mem::size_of::<libc::gid_t>());
            return Ok(groups);
        }
        let e = std::io::Error::last_os_error();
        let needed = len as usize / std::mem::size_of::<libc::gid_t>();
        // ERANGE: `len` says how much it needs (NGROUPS_MAX bounds it).
        if e.raw_os_error() == Some(libc::ERANGE) && needed > groups.len() && needed <= 65_536 {
            groups.resize(needed, 0);
            continue;
        }
        return Err(e);
    }
}

/// Makes `fds` (held open by the caller until the spawn) survive `exec`
/// in `cmd`'s child under the same numbers, for a VMM told them on its
/// command line (QEMU's `-netdev tap,fd=N`).
pub fn inherit_fds(cmd: &mut Command, fds: Vec<i32>) {
    // SAFETY: fcntl on descriptors the caller keeps open; no allocation in
    // the child.
    unsafe {
        cmd.pre_exec(move || {
            for fd in &fds {
                if libc::fcntl(*fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// In the child: a mount namespace of its own (nothing propagates back),
/// with fresh small tmpfs on `/tmp` and `/dev/shm`. Only system calls, on
/// constant strings.
fn private_tmpfs() -> std::io::Result<()> {
    let err = || Err(std::io::Error::last_os_error());
    // SAFETY: unshare and mount take constant NUL-terminated strings (or
    // null) that outlive the calls; no memory is allocated.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return err();
        }
        if libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            // Slave, not private: the host's unmounts still reach this
            // copy (a disk unmounted while a VM runs is not kept busy),
            // nothing of it reaches the host.
            libc::MS_REC | libc::MS_SLAVE,
            std::ptr::null(),
        ) != 0
        {
            return err();
        }
        for dir in [c"/tmp", c"/dev/shm"] {
            if libc::mount(
                c"tmpfs".as_ptr(),
                dir.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                PRIVATE_TMP_OPTS.as_ptr().cast(),
            ) != 0
            {
                return err();
            }
        }
    }
    Ok(())
}

fn open_procs(p: &Path) -> Result<OwnedFd, ConfineError> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(p)
        .map(|f: File| f.into())
        .map_err(|source| ConfineError::Cgroup {
            path: p.to_path_buf(),
            source,
        })
}

/// What `/proc/<pid>/status` says of a process's confinement.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// Real, effective, saved and filesystem uids.
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
    pub groups: Vec<u32>,
    /// 0 off, 1 strict, 2 filter.
    pub seccomp: Option<u32>,
    pub no_new_privs: bool,
    /// The effective capability set, as the kernel prints it (hex).
    pub cap_eff: Option<String>,
}

/// Reads `/proc/<pid>/status`.
pub fn observe(pid: i32) -> Option<Observed> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(parse_status(&s))
}

fn parse_status(s: &str) -> Observed {
    let nums = |v: &str| -> Vec<u32> {
        v.split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect()
    };
    let mut o = Observed::default();
    for l in s.lines() {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        match k {
            "Uid" => o.uids = nums(v),
            "Gid" => o.gids = nums(v),
            "Groups" => o.groups = nums(v),
            "Seccomp" => o.seccomp = v.trim().parse().ok(),
            "NoNewPrivs" => o.no_new_privs = v.trim() == "1",
            "CapEff" => o.cap_eff = Some(v.trim().to_string()),
            _ => {}
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_read() {
        let o = parse_status(
            "Name:\tqemu\nUid:\t5\t5\t5\t5\nGid:\t7\t7\t7\t7\nGroups:\t7 36 \nCapEff:\t0000000000000000\nNoNewPrivs:\t1\nSeccomp:\t2\n",
        );
        assert_eq!(o.uids, vec![5; 4]);
        assert_eq!(o.groups, vec![7, 36]);
        assert_eq!(o.seccomp, Some(2));
        assert!(o.no_new_privs);
        assert_eq!(o.cap_eff.as_deref(), Some("0000000000000000"));
    }

    /// A real child, confined: its uid, groups, no_new_privs, environment
    /// and capabilities are what was asked, and it cannot read a root-only
    /// file.
    #[test]
    fn a_confined_child_is_who_it_was_told() {
        assert!(nix::unistd::geteuid().is_root(), "this test needs root");
        // (Not under /tmp: the child has a private one.)
        let t = tempfile::tempdir_in("/var/tmp").unwrap();
        let secret = t.path().join("secret");
        std::fs::write(&secret, "x").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let c = Confinement {
            identity: Some(Identity {
                uid: 1_879_000_001,
                gid: 1_879_000_000,
                groups: vec![1_879_000_000],
            }),
            cgroup_procs: Vec::new(),
            new_netns: true,
            private_tmp: true,
            max_file_bytes: None,
        };
        let mut cmd = Command::new("/bin/sh");
        cmd.env("KEPT", "no")
            .arg("-c")
            .arg("grep -E '^(Uid|Groups|NoNewPrivs|CapEff):' /proc/self/status; echo \"KEPT=$KEPT\"; echo \"NET=$(readlink /proc/self/ns/net)\"; echo \"TMP=$(ls -A /tmp | wc -l) $(df -k /tmp | tail -1 | tr -s ' ' | cut -d' ' -f2)\"; cat \"$1\" && echo READ")
            .arg("sh")
            .arg(&secret);
        c.apply(&mut cmd).unwrap();
        // (KEPT was set before apply: the environment is cleared.)
        let out = cmd.output().unwrap();
        let s = String::from_utf8_lossy(&out.stdout);
        let o = parse_status(&s);
        assert_eq!(o.uids, vec![1_879_000_001; 4], "{s}");
        assert_eq!(o.groups, vec![1_879_000_000], "{s}");
        assert!(o.no_new_privs, "{s}");
        assert_eq!(o.cap_eff.as_deref(), Some("0000000000000000"), "{s}");
        assert!(s.contains("KEPT=\n"), "the environment is cleared: {s}");
        // An empty 1 MiB /tmp of its own (1024 KiB).
        assert!(s.contains("TMP=0 1024\n"), "a private /tmp: {s}");
        let ours = std::fs::read_link("/proc/self/ns/net").unwrap();
        assert!(s.contains("NET=net:["), "{s}");
        assert!(
            !s.contains(&format!("NET={}", ours.display())),
            "a network namespace of its own: {s}"
        );
        assert!(!s.contains("READ"), "a root-only file was read: {s}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
            "{out:?}"
        );
    }

    #[test]
    fn peer_groups_are_the_kernels() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut got = peer_groups(&a).unwrap();
        got.sort_unstable();
        let mut mine: Vec<u32> = nix::unistd::getgroups()
            .unwrap()
            .iter()
            .map(|g| g.as_raw())
            .collect();
        mine.sort_unstable();
        mine.dedup();
        got.dedup();
        assert_eq!(got, mine);
    }

    #[test]
    fn peer_groups_are_the_connecting_processs_even_past_64() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("s.sock");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let groups: Vec<u32> = (1_879_100_000..1_879_100_100).collect();
        let c = Confinement {
            identity: Some(Identity {
                uid: 0,
                gid: 0,
                groups: groups.clone(),
            }),
            cgroup_procs: Vec::new(),
            new_netns: false,
            private_tmp: false,
            max_file_bytes: None,
        };
        let mut cmd = Command::new("socat");
        cmd.arg("-u")
            .arg("/dev/null")
            .arg(format!("UNIX-CONNECT:{}", path.display()));
        c.apply(&mut cmd).unwrap();
        let mut child = cmd.spawn().unwrap();
        let (s, _) = l.accept().unwrap();
        let mut got = peer_groups(&s).unwrap();
        got.sort_unstable();
        assert_eq!(got, groups);
        let _ = child.wait();
    }

    #[test]
    fn a_file_size_limit_stops_the_writer() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("out");
        let out = File::create(&path).unwrap();
        let c = Confinement {
            identity: None,
            cgroup_procs: Vec::new(),
            new_netns: false,
            private_tmp: false,
            max_file_bytes: Some(1 << 20),
        };
        let mut cmd = Command::new("head");
        cmd.args(["-c", "4194304", "/dev/zero"]);
        c.apply(&mut cmd).unwrap();
        let st = cmd.stdout(out).status().unwrap();
        assert!(!st.success(), "{st:?}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20);
    }
}
