//! A control group per VM: its VMM and the VMM's helper processes (the
//! vsock backend, virtiofsd) share a memory limit, a pids limit and a CPU
//! weight, and the kernel's OOM kills among them are counted there.
//!
//! Both hierarchies are served, since hosts still run both:
//!
//! - cgroup v2 (unified): `<mount>/<parent>/<vm>` with the parent
//!   `banger.slice` at the hierarchy's root (a cgroup holding processes
//!   cannot hand controllers to children, so the VMs' parent is not the
//!   daemon's own cgroup); `memory.max`, `memory.oom.group`, `pids.max`,
//!   `cpu.weight`; OOM kills in `memory.events`.
//! - cgroup v1 (one hierarchy per controller, as on these machines):
//!   `<memory mount>/<daemon's cgroup>/banger/<vm>` and the same under the
//!   pids and cpu hierarchies: nested under the daemon's own cgroup, which
//!   v1 allows; `memory.limit_in_bytes`, `pids.max`, `cpu.shares`; OOM
//!   kills in `memory.oom_control`.
//!
//! The hierarchy is read from `/proc/self/mountinfo` and `/proc/self/cgroup`
//! (paths given to [`Cgroups::detect_from`], so tests can hand it files).

use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum CgroupError {
    #[error("cgroup {path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error(
        "this host has no usable cgroup hierarchy with a memory controller ({0}); \
         banger needs one to limit each VM: mount cgroup2 at /sys/fs/cgroup (or cgroup v1's memory, pids and cpu)"
    )]
    NoHierarchy(String),
    #[error("cgroup name {0:?} is not a plain name (a-z, A-Z, 0-9, '-', '_', '.')")]
    BadName(String),
}

fn io(path: &Path, op: &'static str) -> impl FnOnce(std::io::Error) -> CgroupError {
    let path = path.to_path_buf();
    move |source| CgroupError::Io { path, op, source }
}

/// What a VM's processes may use together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    pub pids: u64,
    /// cgroup v2's scale: 1..=10000, 100 the default share.
    pub cpu_weight: u64,
}

/// The hierarchy this host runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cgroups {
    /// `parent` is where the VMs' groups live (e.g. /sys/fs/cgroup/banger.slice).
    V2 { parent: PathBuf },
    /// The VMs' parent in each controller's hierarchy.
    V1 {
        memory: PathBuf,
        pids: Option<PathBuf>,
        cpu: Option<PathBuf>,
    },
}

/// The name of the VMs' parent group in a v2 hierarchy.
pub const V2_PARENT: &str = "banger.slice";
/// ... and under the daemon's own group in v1.
pub const V1_PARENT: &str = "banger";

fn check_name(name: &str) -> Result<(), CgroupError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(CgroupError::BadName(name.to_string()))
    }
}

fn read(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(io(path, "read"))
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(io(path, "write"))
}

/// A mountinfo line's mount point and, for cgroup mounts, its type and
/// super options.
fn cgroup_mounts(mountinfo: &str) -> Vec<(String, PathBuf, Vec<String>)> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        // id parent maj:min root mountpoint opts [optional...] - fstype source superopts
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mount_point) = left.split(' ').nth(4) else {
            continue;
        };
        let mut r = right.split(' ');
        let (Some(fstype), Some(_source), Some(superopts)) = (r.next(), r.next(), r.next()) else {
            continue;
        };
        if fstype == "cgroup" || fstype == "cgroup2" {
            // mountinfo escapes spaces and the like as octal; cgroup mounts
            // have plain paths, anything else is passed over.
            if mount_point.contains('\\') {
                continue;
            }
            out.push((
                fstype.to_string(),
                PathBuf::from(mount_point),
                superopts.split(',').map(str::to_string).collect(),
            ));
        }
    }
    out
}

/// The calling process's group in the v1 hierarchy of `controller`.
fn own_v1(proc_cgroup: &str, controller: &str) -> Option<String> {
    proc_cgroup.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
        ctrls
            .split(',')
            .any(|c| c == controller)
            .then(|| path.to_string())
    })
}

impl Cgroups {
    /// The hierarchy of this process's host: v1 where a memory hierarchy
    /// is mounted (the controllers are then not in v2), else v2.
    /// `parent` names the VMs' parent group (default [`V1_PARENT`] or
    /// [`V2_PARENT`]; instances side by side, as the tests run, each name
    /// their own).
    pub fn detect(parent: Option<&str>) -> Result<Cgroups, CgroupError> {
        let mi = Path::new("/proc/self/mountinfo");
        let pc = Path::new("/proc/self/cgroup");
        Self::detect_from(&read(mi)?, &read(pc)?, parent, |p| {
            std::fs::read_to_string(p).ok()
        })
    }

    /// [`detect`] from given texts; `read_controllers` reads a v2 mount's
    /// `cgroup.controllers`.
    pub fn detect_from(
        mountinfo: &str,
        proc_cgroup: &str,
        parent: Option<&str>,
        read_controllers: impl Fn(&Path) -> Option<String>,
    ) -> Result<Cgroups, CgroupError> {
        if let Some(p) = parent {
            check_name(p)?;
        }
        let mounts = cgroup_mounts(mountinfo);
        let v1 = |ctrl: &str| {
            mounts
                .iter()
                .find(|(t, _, o)| t == "cgroup" && o.iter().any(|x| x == ctrl))
                .and_then(|(_, m, _)| {
                    let own = own_v1(proc_cgroup, ctrl)?;
                    let own = own.trim_start_matches('/');
                    Some(m.join(own).join(parent.unwrap_or(V1_PARENT)))
                })
        };
        if let Some(memory) = v1("memory") {
            return Ok(Cgroups::V1 {
                memory,
                pids: v1("pids"),
                cpu: v1("cpu"),
            });
        }
        for (t, m, _) in &mounts {
            if t != "cgroup2" {
                continue;
            }
            let ctrls = read_controllers(&m.join("cgroup.controllers")).unwrap_or_default();
            if ctrls.split_whitespace().any(|c| c == "memory") {
                return Ok(Cgroups::V2 {
                    parent: m.join(parent.unwrap_or(V2_PARENT)),
                });
            }
        }
        Err(CgroupError::NoHierarchy(if mounts.is_empty() {
            "no cgroup filesystem is mounted".into()
        } else {
            "no hierarchy offers the memory controller".into()
        }))
    }

    /// The VM group's directories (one per hierarchy in v1).
    pub fn dirs(&self, name: &str) -> Vec<PathBuf> {
        match self {
            Cgroups::V2 { parent } => vec![parent.join(name)],
            Cgroups::V1 { memory, pids, cpu } => [Some(memory), pids.as_ref(), cpu.as_ref()]
                .into_iter()
                .flatten()
                .map(|p| p.join(name))
                .collect(),
        }
    }

    /// The `cgroup.procs` files a process writes itself into (before it
    /// runs the VMM: `confine`).
    pub fn procs_files(&self, name: &str) -> Vec<PathBuf> {
        self.dirs(name)
            .into_iter()
            .map(|d| d.join("cgroup.procs"))
            .collect()
    }

    /// Makes the VM's group with its limits (an existing one is reused and
    /// its limits set again). On failure nothing this call made is left.
    pub fn create(&self, name: &str, l: &Limits) -> Result<(), CgroupError> {
        check_name(name)?;
        let mut made = self.create_inner(name, l);
        // Another daemon's `remove` may have taken the empty parent away
        // between our mkdir of it and of the group: once more.
        if matches!(&made, Err(CgroupError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound)
        {
            made = self.create_inner(name, l);
        }
        if made.is_err() {
            let _ = self.remove(name);
        }
        made
    }

    fn create_inner(&self, name: &str, l: &Limits) -> Result<(), CgroupError> {
        match self {
            Cgroups::V2 { parent } => {
                let root = parent.parent().unwrap_or(Path::new("/"));
                enable_controllers(root)?;
                mkdir(parent)?;
                enable_controllers(parent)?;
                let d = parent.join(name);
                mkdir(&d)?;
                write(&d.join("memory.max"), &l.memory_bytes.to_string())?;
                // Swap would let a VM exceed its memory unseen.
                let swap = d.join("memory.swap.max");
                if swap.exists() {
                    write(&swap, "0")?;
                }
                write(&d.join("memory.oom.group"), "1")?;
                write(&d.join("pids.max"), &l.pids.to_string())?;
                write(
                    &d.join("cpu.weight"),
                    &l.cpu_weight.clamp(1, 10_000).to_string(),
                )?;
            }
            Cgroups::V1 { memory, pids, cpu } => {
                let m = memory.join(name);
                mkdir_all(&m)?;
                // memsw may never be below the limit: lifted first (a group
                // reused with a smaller one), set last.
                let memsw = m.join("memory.memsw.limit_in_bytes");
                if memsw.exists() {
                    write(&memsw, "-1")?;
                }
                write(
                    &m.join("memory.limit_in_bytes"),
                    &l.memory_bytes.to_string(),
                )?;
                if memsw.exists() {
                    write(&memsw, &l.memory_bytes.to_string())?;
                }
                if let Some(p) = pids {
                    let p = p.join(name);
                    mkdir_all(&p)?;
                    write(&p.join("pids.max"), &l.pids.to_string())?;
                }
                if let Some(c) = cpu {
                    let c = c.join(name);
                    mkdir_all(&c)?;
                    // v2's weight 100 is v1's 1024 shares.
                    let shares = (l.cpu_weight.clamp(1, 10_000) * 1024 / 100).max(2);
                    write(&c.join("cpu.shares"), &shares.to_string())?;
                }
            }
        }
        Ok(())
    }

    /// Removes the VM's group; one already gone counts as removed. Fails
    /// (EBUSY) while a process is still in it.
    pub fn remove(&self, name: &str) -> Result<(), CgroupError> {
        check_name(name)?;
        self.remove_dirs(&self.dirs(name))
    }

    /// Removes groups by their directories (as recorded when they were
    /// made); only cgroup directories (with a `cgroup.procs`) are touched.
    pub fn remove_dirs(&self, dirs: &[PathBuf]) -> Result<(), CgroupError> {
        let mut first_err = None;
        for d in dirs {
            if !d.join("cgroup.procs").exists() {
                continue;
            }
            match std::fs::remove_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    first_err.get_or_insert(CgroupError::Io {
                        path: d.clone(),
                        op: "remove",
                        source: e,
                    });
                    continue;
                }
            }
            // The parent goes with the last VM (it fails, harmlessly, while
            // another VM's group is in it).
            if let Some(p) = d.parent() {
                let _ = std::fs::remove_dir(p);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Kills what is left in the groups `dirs` (a VM's processes only
    /// ever live there) and removes them, waiting up to `timeout` for the
    /// kernel to finish their exits: a killed VMM is a zombie (and counts
    /// as gone) while its threads still tear its memory down, and the
    /// group stays busy until the last one is done.
    pub fn kill_and_remove(
        &self,
        dirs: &[PathBuf],
        timeout: std::time::Duration,
    ) -> Result<(), CgroupError> {
        let end = std::time::Instant::now() + timeout;
        loop {
            self.kill_all(dirs);
            match self.remove_dirs(dirs) {
                Err(CgroupError::Io { source, .. })
                    if source.raw_os_error() == Some(nix::libc::EBUSY)
                        && std::time::Instant::now() < end =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                r => return r,
            }
        }
    }

    /// The pids in the group directory `dir`.
    pub fn procs_in(&self, dir: &Path) -> Vec<i32> {
        read_procs(&dir.join("cgroup.procs"))
    }

    /// SIGKILLs every process in the groups `dirs` (without waiting).
    pub fn kill_all(&self, dirs: &[PathBuf]) {
        for d in dirs {
            for pid in read_procs(&d.join("cgroup.procs")) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }

    /// Whether any of the VM's group directories exists.
    pub fn exists(&self, name: &str) -> bool {
        check_name(name).is_ok() && self.dirs(name).iter().any(|d| d.exists())
    }

    /// How many times the kernel's OOM killer killed a process of the group.
    pub fn oom_kills(&self, name: &str) -> Option<u64> {
        let (file, key) = match self {
            Cgroups::V2 { parent } => (parent.join(name).join("memory.events"), "oom_kill"),
            Cgroups::V1 { memory, .. } => {
                (memory.join(name).join("memory.oom_control"), "oom_kill")
            }
        };
        keyed(&std::fs::read_to_string(file).ok()?, key)
    }

    /// The memory the group's processes use now, in bytes.
    pub fn memory_current(&self, name: &str) -> Option<u64> {
        let file = match self {
            Cgroups::V2 { parent } => parent.join(name).join("memory.current"),
            Cgroups::V1 { memory, .. } => memory.join(name).join("memory.usage_in_bytes"),
        };
        std::fs::read_to_string(file).ok()?.trim().parse().ok()
    }

    /// The group's memory limit, in bytes.
    pub fn memory_limit(&self, name: &str) -> Option<u64> {
        let file = match self {
            Cgroups::V2 { parent } => parent.join(name).join("memory.max"),
            Cgroups::V1 { memory, .. } => memory.join(name).join("memory.limit_in_bytes"),
        };
        std::fs::read_to_string(file).ok()?.trim().parse().ok()
    }

    /// The group's pids limit.
    pub fn pids_limit(&self, name: &str) -> Option<u64> {
        let dir = match self {
            Cgroups::V2 { parent } => parent.join(name),
            Cgroups::V1 { pids, .. } => pids.as_ref()?.join(name),
        };
        std::fs::read_to_string(dir.join("pids.max"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The pids of the group's processes (from the memory hierarchy in v1).
    pub fn procs(&self, name: &str) -> Vec<i32> {
        let file = match self {
            Cgroups::V2 { parent } => parent.join(name).join("cgroup.procs"),
            Cgroups::V1 { memory, .. } => memory.join(name).join("cgroup.procs"),
        };
        read_procs(&file)
    }
}

fn read_procs(file: &Path) -> Vec<i32> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .filter(|p| *p > 0)
        .collect()
}

fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

fn mkdir(d: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(d) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io(d, "create")(e)),
    }
}

fn mkdir_all(d: &Path) -> Result<(), CgroupError> {
    std::fs::create_dir_all(d).map_err(io(d, "create"))
}

/// Hands the memory, pids and cpu controllers to `dir`'s children (v2).
fn enable_controllers(dir: &Path) -> Result<(), CgroupError> {
    let have = read(&dir.join("cgroup.controllers"))?;
    let on = read(&dir.join("cgroup.subtree_control"))?;
    let want: Vec<String> = ["memory", "pids", "cpu"]
        .iter()
        .filter(|c| have.split_whitespace().any(|h| h == **c))
        .filter(|c| !on.split_whitespace().any(|h| h == **c))
        .map(|c| format!("+{c}"))
        .collect();
    if want.is_empty() {
        return Ok(());
    }
    write(&dir.join("cgroup.subtree_control"), &want.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
29 23 0:26 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs ro,mode=755
31 29 0:28 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw
33 29 0:30 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
34 29 0:31 / /sys/fs/cgroup/pids rw,nosuid - cgroup cgroup rw,pids
35 29 0:32 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct
";
    const SELF: &str = "\
9:name=systemd:/
8:pids:/
4:memory:/process_api/abc
1:cpu,cpuacct:/
0::/
";

    #[test]
    fn v1_groups_nest_under_the_daemons_own() {
        let c = Cgroups::detect_from(HYBRID, SELF, None, |_| Some("hugetlb\n".into())).unwrap();
        assert_eq!(
            c,
            Cgroups::V1 {
                memory: "/sys/fs/cgroup/memory/process_api/abc/banger".into(),
                pids: Some("/sys/fs/cgroup/pids/banger".into()),
                cpu: Some("/sys/fs/cgroup/cpu,cpuacct/banger".into()),
            }
        );
        assert_eq!(
            c.procs_files("vm1")[0],
            PathBuf::from("/sys/fs/cgroup/memory/process_api/abc/banger/vm1/cgroup.procs")
        );
        assert_eq!(c.dirs("vm1").len(), 3);
    }

    #[test]
    fn v2_where_it_has_the_memory_controller() {
        let mi = "31 23 0:28 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n";
        let c = Cgroups::detect_from(mi, "0::/system.slice/x.service\n", None, |p| {
            assert_eq!(p, Path::new("/sys/fs/cgroup/cgroup.controllers"));
            Some("cpuset cpu io memory pids\n".into())
        })
        .unwrap();
        assert_eq!(
            c,
            Cgroups::V2 {
                parent: "/sys/fs/cgroup/banger.slice".into()
            }
        );
        let none = Cgroups::detect_from(mi, "0::/\n", None, |_| Some("cpu pids".into()));
        assert!(matches!(none, Err(CgroupError::NoHierarchy(_))), "{none:?}");
        let e = Cgroups::detect_from("", "", None, |_| None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no cgroup filesystem is mounted"), "{e}");
    }

    #[test]
    fn names_are_plain() {
        let c = Cgroups::V2 {
            parent: "/nonexistent".into(),
        };
        for bad in ["", "..", "../x", "a/b", ".hidden", "a b"] {
            assert!(c.create(bad, &limits()).is_err(), "{bad:?}");
            assert!(c.remove(bad).is_err(), "{bad:?}");
        }
    }

    fn limits() -> Limits {
        Limits {
            memory_bytes: 512 << 20,
            pids: 100,
            cpu_weight: 200,
        }
    }

    /// The v2 writes against a directory laid out as the kernel's: the real
    /// v2 hierarchy cannot be had on a host whose controllers are bound to
    /// v1 (these machines); the v1 path runs for real in the e2e tests.
    #[test]
    fn v2_limits_land_in_the_files_the_kernel_reads() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        std::fs::write(root.join("cgroup.controllers"), "cpu memory pids io\n").unwrap();
        std::fs::write(root.join("cgroup.subtree_control"), "").unwrap();
        let parent = root.join(V2_PARENT);
        std::fs::create_dir(&parent).unwrap();
        std::fs::write(parent.join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        std::fs::write(parent.join("cgroup.subtree_control"), "memory").unwrap();
        let c = Cgroups::V2 {
            parent: parent.clone(),
        };
        c.create("vm1", &limits()).unwrap();
        let got = |f: &str| std::fs::read_to_string(parent.join("vm1").join(f)).unwrap();
        assert_eq!(got("memory.max"), (512u64 << 20).to_string());
        assert_eq!(got("memory.oom.group"), "1");
        assert_eq!(got("pids.max"), "100");
        assert_eq!(got("cpu.weight"), "200");
        assert_eq!(
            std::fs::read_to_string(root.join("cgroup.subtree_control")).unwrap(),
            "+memory +pids +cpu"
        );
        assert_eq!(
            std::fs::read_to_string(parent.join("cgroup.subtree_control")).unwrap(),
            "+pids +cpu",
            "only what is not on yet"
        );
        std::fs::write(
            parent.join("vm1/memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\noom_group_kill 1\n",
        )
        .unwrap();
        assert_eq!(c.oom_kills("vm1"), Some(1));
        assert_eq!(c.memory_limit("vm1"), Some(512 << 20));
        assert_eq!(c.pids_limit("vm1"), Some(100));
        assert!(c.exists("vm1"));
    }

    /// The hierarchy this kernel has, for real (v1 on these machines): a
    /// group made, limited, removed.
    #[test]
    fn on_this_kernel() {
        let parent = format!("banger-unit-{}", std::process::id());
        let c = Cgroups::detect(Some(&parent)).unwrap();
        let name = "vm1";
        c.create(name, &limits()).unwrap();
        assert_eq!(c.memory_limit(name), Some(512 << 20));
        assert_eq!(c.pids_limit(name), Some(100));
        assert_eq!(c.oom_kills(name), Some(0));
        assert!(c.procs(name).is_empty());
        c.remove(name).unwrap();
        assert!(!c.exists(name));
        // The parent went with its last group.
        assert!(c.dirs(name).iter().all(|d| !d.parent().unwrap().exists()));
        c.remove(name).unwrap();
    }
}
