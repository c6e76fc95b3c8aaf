//! What a bundle's OCI spec asks, turned into what banger does: the VM's
//! size and network, and each process as a guest agent exec inside the
//! container's root. Whatever banger cannot honour is refused here, naming
//! the field, before anything is made.

use std::path::Path;

use banger_agent::proto::{Bind, ExecSpec, InRoot, Limits, Rlimit, Tmpfs, WinSize};
use banger_core::api::CreateVm;
use banger_core::mount::HostMount;
use banger_core::sizing::SizeRequest;
use banger_core::NetPolicy;
use oci_spec::runtime::{LinuxNamespaceType, Process, Spec};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum SpecError {
    #[error("bundle {bundle}: config.json: {why}")]
    Unreadable { bundle: String, why: String },
    #[error("container {id}: {why}")]
    Refused { id: String, why: String },
}

/// Where a pod's directory is in the guest: the VM's one virtio-fs share.
/// Each container's root filesystem and mounts are mounted under it on
/// the host, after the VM booted as well as before (the share propagates
/// mounts), at `<POD>/<key>/rootfs` and `<POD>/<key>/mounts/<i>`.
pub const GUEST_POD: &str = "/ctr/pod";

/// Memory the guest's own system needs beside the container's limit.
const GUEST_OVERHEAD_MIB: u64 = 128;

/// The annotation that puts containers outside Kubernetes in one VM
/// (`ctr run --annotation io.containerd.banger.v2.group=NAME`).
pub const GROUP_ANNOTATION: &str = "io.containerd.banger.v2.group";

/// The spec of the bundle at `bundle`.
pub fn load(bundle: &Path) -> Result<Spec, SpecError> {
    let unreadable = |why: String| SpecError::Unreadable {
        bundle: bundle.display().to_string(),
        why,
    };
    let path = bundle.join("config.json");
    let f = std::fs::File::open(&path).map_err(|e| unreadable(e.to_string()))?;
    // Read by serde_json itself, whose errors say what and where.
    serde_json::from_reader(std::io::BufReader::new(f)).map_err(|e| unreadable(e.to_string()))
}

/// The pod a container belongs to: its Kubernetes sandbox, its banger
/// group, or itself.
pub fn pod_of(spec: &Spec, id: &str) -> String {
    let a = spec.annotations().clone().unwrap_or_default();
    let kind = a
        .get("io.kubernetes.cri.container-type")
        .map(String::as_str);
    match (kind, a.get("io.kubernetes.cri.sandbox-id")) {
        (Some("container"), Some(sandbox)) if !sandbox.is_empty() => return sandbox.clone(),
        // A Kubernetes pod is its sandbox, whatever else it says.
        (Some(_), _) => return id.to_string(),
        _ => {}
    }
    match a.get(GROUP_ANNOTATION) {
        Some(g) if !g.is_empty() => g.clone(),
        _ => id.to_string(),
    }
}

/// Whether the container is one of a Kubernetes pod's, not its sandbox.
fn joins_sandbox(spec: &Spec) -> bool {
    let a = spec.annotations().clone().unwrap_or_default();
    a.get("io.kubernetes.cri.container-type")
        .map(String::as_str)
        == Some("container")
        && a.get("io.kubernetes.cri.sandbox-id")
            .is_some_and(|s| !s.is_empty())
}

/// A host path a container mounts: bound by the shim into the pod's
/// directory, where the guest sees it.
#[derive(Debug, Clone)]
pub struct HostBind {
    pub source: std::path::PathBuf,
    pub read_only: bool,
    pub dir: bool,
}

/// What a container gets: the VM of its pod when it is the pod's first
/// (`create`), what of its root every one of its processes shares
/// (`base`: root, hostname, mounts), and the host paths to bind for it.
pub struct Plan {
    pub key: String,
    /// Its cgroup's limits in the guest, from the spec's resources.
    pub limits: Limits,
    pub create: CreateVm,
    pub base: InRoot,
    pub binds: Vec<HostBind>,
}

/// A container's limits in its guest cgroup from OCI resources: the
/// memory limit, and the CPU quota over its period (unset: left as it
/// is; -1, OCI's "unlimited": lifted).
pub fn limits_of(res: &oci_spec::runtime::LinuxResources) -> Limits {
    let memory_max = res
        .memory()
        .as_ref()
        .and_then(|m| m.limit())
        .and_then(|l| match l {
            l if l > 0 => Some(l as u64),
            -1 => Some(0),
            _ => None,
        });
    let cpu_max = res.cpu().as_ref().and_then(|c| {
        let period = c.period().filter(|p| *p > 0).unwrap_or(100_000);
        match c.quota() {
            Some(q) if q > 0 => Some((q as u64, period)),
            Some(-1) => Some((0, period)),
            _ => None,
        }
    });
    Limits {
        memory_max,
        cpu_max,
    }
}

/// Where container `key`'s root is in the guest.
pub fn guest_root(key: &str) -> String {
    format!("{GUEST_POD}/{key}/rootfs")
}

/// What container `id` of `namespace` gets, its pod's directory on the
/// host being `pod_dir`.
pub fn plan(spec: &Spec, namespace: &str, id: &str, pod_dir: &Path) -> Result<Plan, SpecError> {
    let refused = |why: String| SpecError::Refused {
        id: id.to_string(),
        why,
    };
    let pod = pod_of(spec, id);
    let key = label(id);
    let mut size = SizeRequest::default();
    let mut net = NetPolicy::default();
    let mut limits = Limits::default();
    if let Some(linux) = spec.linux() {
        if let Some(res) = linux.resources() {
            limits = limits_of(res);
            if let Some(limit) = res.memory().as_ref().and_then(|m| m.limit()) {
                if limit > 0 {
                    let mib = (limit as u64).div_ceil(1 << 20);
                    size.memory_mib = Some(mib + GUEST_OVERHEAD_MIB);
                }
            }
            if let Some(cpu) = res.cpu() {
                if let (Some(quota), Some(period)) = (cpu.quota(), cpu.period()) {
                    if quota > 0 && period > 0 {
                        let cpus = (quota as u64).div_ceil(period).max(1);
                        size.cpus = Some(u32::try_from(cpus).unwrap_or(u32::MAX));
                    }
                }
            }
        }
        for ns in linux.namespaces().iter().flatten() {
            if ns.typ() != LinuxNamespaceType::Network {
                continue;
            }
            match ns.path() {
                // A network namespace of its own, empty: as runc gives a
                // container without CNI, a guest with no network.
                None => net.none = true,
                // A Kubernetes pod's containers join its sandbox's
                // namespaces (CRI names them by the sandbox task's pid):
                // they are in its VM already.
                Some(_) if joins_sandbox(spec) => {}
                // A pod's network namespace (CNI's): the VM's NIC is a
                // tap there, redirected to the pod's interface.
                Some(p) => net.pod_netns = Some(p.clone()),
            }
        }
    }
    let mut binds = Vec::new();
    let mut host_binds = Vec::new();
    let mut tmpfs = Vec::new();
    for m in spec.mounts().iter().flatten() {
        let kind = m.typ().as_deref().unwrap_or("");
        let dest = m.destination().display().to_string();
        let options = m.options().clone().unwrap_or_default();
        let is_bind = kind == "bind" || options.iter().any(|o| o == "bind" || o == "rbind");
        if !is_bind {
            let guests = ["/proc", "/sys", "/dev"]
                .iter()
                .any(|g| dest == *g || dest.starts_with(&format!("{g}/")));
            if kind == "tmpfs" && !guests {
                tmpfs.push(Tmpfs {
                    target: dest,
                    options,
                });
                continue;
            }
            if matches!(
                kind,
                "proc" | "sysfs" | "tmpfs" | "devpts" | "mqueue" | "cgroup" | "cgroup2"
            ) {
                // The guest's own /proc, /sys and /dev are bound instead.
                continue;
            }
            return Err(refused(format!(
                "its mount on {dest} is of type {kind:?}; banger's runtime takes bind mounts \
                 of host directories and files, and gives the guest's own /proc, /sys and /dev"
            )));
        }
        let source = m.source().clone().unwrap_or_default();
        if !source.is_absolute() {
            return Err(refused(format!(
                "its bind mount on {dest}: the source {:?} is not an absolute path",
                source.display()
            )));
        }
        let read_only = options.iter().any(|o| o == "ro");
        // Looked at with the shim's rights, which are its containerd's.
        let md = std::fs::metadata(&source).map_err(|e| {
            refused(format!(
                "its bind mount of {} on {dest}: {e}",
                source.display()
            ))
        })?;
        if !md.is_dir() && !md.is_file() {
            return Err(refused(format!(
                "its bind mount of {} on {dest}: neither a directory nor a regular file",
                source.display()
            )));
        }
        binds.push(Bind {
            source: format!("{GUEST_POD}/{key}/mounts/{}", host_binds.len()),
            target: dest,
            read_only,
        });
        host_binds.push(HostBind {
            source: source.clone(),
            read_only,
            dir: md.is_dir(),
        });
    }
    let base = InRoot {
        root: guest_root(&key),
        groups: None,
        rlimits: Vec::new(),
        hostname: spec.hostname().clone().filter(|h| !h.is_empty()),
        binds,
        cgroup: Some(key.clone()),
        tmpfs,
        readonly: spec
            .root()
            .as_ref()
            .and_then(|r| r.readonly())
            .unwrap_or(false),
    };
    base.check_shape().map_err(refused)?;
    let mut metadata = std::collections::BTreeMap::new();
    metadata.insert("containerd.namespace".to_string(), namespace.to_string());
    metadata.insert("containerd.id".to_string(), pod.clone());
    let share = HostMount {
        host: pod_dir.to_path_buf(),
        path: GUEST_POD.to_string(),
        read_only: false,
        owner: None,
    };
    share.validate().map_err(|e| refused(e.to_string()))?;
    let create = CreateVm {
        name: Some(vm_name(namespace, &pod)),
        image: None,
        size,
        vmm: None,
        start: true,
        rm: true,
        auto_stop: Default::default(),
        net,
        volumes: Vec::new(),
        root_mib: None,
        mounts: vec![share],
        from: None,
        cold: false,
        metadata,
        env: Vec::new(),
    };
    create.check_labels().map_err(refused)?;
    Ok(Plan {
        key,
        limits,
        create,
        base,
        binds: host_binds,
    })
}

/// A VM name (a DNS label) for container `id` of `namespace`: what of the
/// id is a label's, then a hash of both, so distinct ids never share one.
pub fn vm_name(namespace: &str, id: &str) -> String {
    format!("ctr-{}", label(&format!("{namespace}/{id}")))
}

/// A DNS label for `id`: what of it is a label's, then a hash of it, so
/// distinct ids never share one (a container's directory in its pod's).
pub fn label(id: &str) -> String {
    use sha2::{Digest, Sha256};
    let readable_of = id.rsplit('/').next().unwrap_or(id);
    let mut readable: String = readable_of
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9') => c,
            _ => '-',
        })
        .take(30)
        .collect();
    while readable.contains("--") {
        readable = readable.replace("--", "-");
    }
    let readable = readable.trim_matches('-');
    let hash = Sha256::digest(id.as_bytes());
    let hex: String = hash[..8].iter().map(|b| format!("{b:02x}")).collect();
    if readable.is_empty() {
        hex
    } else {
        format!("{readable}-{hex}")
    }
}

/// An OCI process as a guest agent exec in the container's root (`base`:
/// what every process of the container shares).
pub fn exec_for(
    id: &str,
    p: &Process,
    base: &InRoot,
    terminal: bool,
    stdin: bool,
) -> Result<ExecSpec, SpecError> {
    let refused = |why: String| SpecError::Refused {
        id: id.to_string(),
        why,
    };
    let argv = p.args().clone().unwrap_or_default();
    if argv.is_empty() {
        return Err(refused("its process has no args: give a command".into()));
    }
    let cwd = p.cwd().display().to_string();
    if !cwd.starts_with('/') || cwd.split('/').any(|c| c == "..") {
        return Err(refused(format!(
            "its process's cwd {cwd:?} is not an absolute path without .."
        )));
    }
    let mut env = Vec::new();
    for kv in p.env().iter().flatten() {
        match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => env.push((k.to_string(), v.to_string())),
            _ => {
                return Err(refused(format!(
                    "environment entry {:?} is not NAME=VALUE",
                    kv.chars().take(64).collect::<String>()
                )))
            }
        }
    }
    let user = p.user();
    let mut rlimits = Vec::new();
    for r in p.rlimits().iter().flatten() {
        let kind = serde_json::to_value(r.typ())
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .ok_or_else(|| refused("an rlimit without a type".into()))?;
        rlimits.push(Rlimit {
            kind,
            soft: r.soft(),
            hard: r.hard(),
        });
    }
    let container = InRoot {
        groups: Some(user.additional_gids().clone().unwrap_or_default()),
        rlimits,
        ..base.clone()
    };
    container.check_shape().map_err(refused)?;
    Ok(ExecSpec {
        argv,
        env,
        cwd: Some(cwd),
        user: Some(format!("{}:{}", user.uid(), user.gid())),
        tty: terminal.then(|| {
            let (rows, cols) = p
                .console_size()
                .map(|b| (b.height(), b.width()))
                .unwrap_or((24, 80));
            WinSize {
                rows: u16::try_from(rows).unwrap_or(u16::MAX),
                cols: u16::try_from(cols).unwrap_or(u16::MAX),
            }
        }),
        stdin,
        detach: false,
        tag: None,
        container: Some(container),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_names_are_labels_and_distinct() {
        let a = vm_name("default", "t1");
        assert!(
            a.starts_with("ctr-t1-") && a.len() == "ctr-t1-".len() + 16,
            "{a}"
        );
        assert_ne!(a, vm_name("k8s.io", "t1"), "the namespace counts");
        assert_ne!(vm_name("default", "T_1"), vm_name("default", "t-1"));
        let long = vm_name("k8s.io", &"a".repeat(64));
        assert!(long.len() <= 63, "{long}");
        let odd = vm_name("default", "__..__");
        assert!(odd.starts_with("ctr-") && !odd.contains("--"), "{odd}");
        for n in [a, long, odd] {
            assert!(banger_core::validate_name(&n).is_ok(), "{n}");
        }
    }

    /// The configuration snippet the package ships names this runtime.
    #[test]
    fn the_containerd_snippet_names_this_runtime() {
        let snippet: toml::Table =
            toml::from_str(include_str!("../../../packaging/containerd-banger.toml")).unwrap();
        let banger =
            &snippet["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]["banger"];
        assert_eq!(banger["runtime_type"].as_str(), Some(crate::RUNTIME));
        // No annotations passed on: a pod is its CRI sandbox, never a
        // banger group a pod's author could name.
        assert!(banger.get("pod_annotations").is_none());
    }
}
