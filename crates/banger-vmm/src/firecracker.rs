//! The Firecracker driver: `firecracker --api-sock <sock> --id <name>`,
//! configured through its REST API on the Unix socket, in the order the
//! getting-started guide uses: PUT /machine-config, /boot-source,
//! /drives/{drive_id} (root first), /network-interfaces/{iface_id}, then
//! /actions `InstanceStart`. A clean stop is /actions `SendCtrlAltDel`.
//! Request bodies follow the official spec (v1.16.1, vendored in
//! `spec/firecracker-v1.16.1.yaml`); the test double checks every request
//! against that file.
//!
//! Firecracker writes the guest's serial console to its stdout, which goes
//! to the VM's console log; its own log goes to `--log-path` (the VM's VMM
//! log). Disks must be raw: the daemon gives a Firecracker VM a raw root disk.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use banger_core::VmmKind;
use serde_json::{json, Value};

use crate::{VmConfig, Vmm, VmmError, VmmProcess};

/// How long the API socket may take to appear after the process starts.
const SOCKET_WAIT: Duration = Duration::from_secs(5);
/// Per API call.
const API_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest version string taken from `GET /version`.
const VERSION_MAX: usize = 64;
/// The spec's `vcpu_count` maximum.
pub const MAX_VCPUS: u32 = 32;

#[derive(Debug, Clone)]
pub struct Firecracker {
    binary: PathBuf,
}

impl Firecracker {
    pub fn new(binary: PathBuf) -> Self {
        Firecracker { binary }
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }
}

fn api_err(sock: &Path, detail: String) -> VmmError {
    VmmError::Api {
        path: sock.to_path_buf(),
        detail,
    }
}

/// The API calls that configure and start one guest, in order: (path,
/// body). Refuses what Firecracker would refuse, before anything starts.
pub fn requests(cfg: &VmConfig) -> Result<Vec<(String, Value)>, VmmError> {
    let bad = |detail: String| VmmError::Config {
        vmm: "firecracker".into(),
        vm: cfg.name.clone(),
        detail,
    };
    // (Odd counts above 1 are refused only with SMT on, which banger
    // leaves at its default, off.)
    if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS {
        return Err(bad(format!(
            "{} vCPUs: Firecracker takes 1 to {MAX_VCPUS} (--cpus)",
            cfg.vcpus
        )));
    }
    if !cfg.shares.is_empty() {
        return Err(bad(
            "Firecracker has no virtio-fs: host directories need QEMU (or a volume)".into(),
        ));
    }
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let mut v = vec![
        (
            "/machine-config".to_string(),
            json!({"vcpu_count": cfg.vcpus, "mem_size_mib": cfg.memory_mib}),
        ),
        (
            "/boot-source".to_string(),
            json!({
                "kernel_image_path": path(&cfg.kernel),
                "initrd_path": path(&cfg.initrd),
                "boot_args": cfg.cmdline,
            }),
        ),
    ];
    for (i, d) in cfg.disks.iter().enumerate() {
        if d.format != "raw" {
            return Err(bad(format!(
                "disk {} is {}: Firecracker takes raw disks only",
                d.id, d.format
            )));
        }
        v.push((
            format!("/drives/{}", d.id),
            json!({
                "drive_id": d.id,
                "path_on_host": path(&d.path),
                "is_root_device": i == 0,
                "is_read_only": d.read_only,
            }),
        ));
    }
    for (i, n) in cfg.nics.iter().enumerate() {
        let id = format!("eth{i}");
        v.push((
            format!("/network-interfaces/{id}"),
            json!({"iface_id": id, "host_dev_name": n.tap, "guest_mac": n.mac}),
        ));
    }
    if let Some(vs) = &cfg.vsock {
        v.push((
            "/vsock".to_string(),
            json!({"guest_cid": vs.cid, "uds_path": path(&vs.uds_path)}),
        ));
    }
    v.push((
        "/actions".to_string(),
        json!({"action_type": "InstanceStart"}),
    ));
    Ok(v)
}

/// Reads the head of an HTTP/1.1 message: its first line (empty at end of
/// stream) and its `Content-Length` (0 without one). The API client here
/// and the test double's server share it.
pub fn read_head(r: &mut impl BufRead) -> std::io::Result<(String, usize)> {
    let mut first = String::new();
    if r.read_line(&mut first)? == 0 {
        return Ok((first, 0));
    }
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            break;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
    }
    Ok((first, len))
}

/// One `PUT` on the API socket; a non-2xx answer is an error carrying
/// Firecracker's `fault_message`.
pub fn put(sock: &Path, path: &str, body: &Value) -> Result<(), VmmError> {
    call(sock, "PUT", path, Some(body), API_TIMEOUT).map(drop)
}

/// Firecracker's version (`GET /version`), as a snapshot records it:
/// another version refuses to load it.
pub fn version(sock: &Path) -> Result<String, VmmError> {
    let answer = call(sock, "GET", "/version", None, API_TIMEOUT)?;
    serde_json::from_slice::<Value>(&answer)
        .ok()
        .and_then(|v| v["firecracker_version"].as_str().map(str::to_string))
        .filter(|v| {
            !v.is_empty() && v.len() <= VERSION_MAX && v.bytes().all(|b| b.is_ascii_graphic())
        })
        .ok_or_else(|| {
            api_err(
                sock,
                format!(
                    "GET /version: no version in {:?}",
                    String::from_utf8_lossy(&answer[..answer.len().min(VERSION_MAX)])
                ),
            )
        })
}

/// `PUT /snapshot/create` of a paused microVM: its state and its whole
/// memory (`Full`) into the two files (paths as Firecracker sees them),
/// which it creates, within `timeout` (the guest's memory is written
/// whole meanwhile). Firecracker answers nothing else meanwhile.
pub fn create_snapshot(
    sock: &Path,
    state: &Path,
    mem: &Path,
    timeout: Duration,
) -> Result<(), VmmError> {
    let body = json!({
        "snapshot_type": "Full",
        "snapshot_path": state.to_string_lossy(),
        "mem_file_path": mem.to_string_lossy(),
    });
    call(sock, "PUT", "/snapshot/create", Some(&body), timeout).map(drop)
}

/// What a fresh Firecracker loads a snapshot from: paths as it sees
/// them, and what differs from the microVM saved (the taps by interface,
/// the vsock's socket).
#[derive(Debug, Clone)]
pub struct Load {
    pub state: PathBuf,
    /// Mapped privately: the file never changes under it.
    pub mem: PathBuf,
    pub taps: Vec<(String, String)>,
    pub vsock: Option<PathBuf>,
}

/// `PUT /snapshot/load` on a bare Firecracker (nothing configured but
/// its logger), the microVM left paused, within `timeout`. A failed load
/// ends the process: Firecracker cannot be given another.
pub fn load_snapshot(sock: &Path, load: &Load, timeout: Duration) -> Result<(), VmmError> {
    let mut body = json!({
        "snapshot_path": load.state.to_string_lossy(),
        "mem_backend": {"backend_type": "File", "backend_path": load.mem.to_string_lossy()},
        "resume_vm": false,
    });
    if !load.taps.is_empty() {
        body["network_overrides"] = load
            .taps
            .iter()
            .map(|(iface, tap)| json!({"iface_id": iface, "host_dev_name": tap}))
            .collect();
    }
    if let Some(uds) = &load.vsock {
        body["vsock_override"] = json!({"uds_path": uds.to_string_lossy()});
    }
    call(sock, "PUT", "/snapshot/load", Some(&body), timeout).map(drop)
}

/// Pauses the microVM's vCPUs (`PATCH /vm`).
pub fn pause(sock: &Path) -> Result<(), VmmError> {
    patch(sock, "/vm", &json!({"state": "Paused"}))
}

/// Resumes a paused microVM.
pub fn resume(sock: &Path) -> Result<(), VmmError> {
    patch(sock, "/vm", &json!({"state": "Resumed"}))
}

/// One `PATCH` on the API socket, as [`put`].
pub fn patch(sock: &Path, path: &str, body: &Value) -> Result<(), VmmError> {
    call(sock, "PATCH", path, Some(body), API_TIMEOUT).map(drop)
}

/// One request, answered whole within `timeout` (one deadline for the
/// exchange, however the answer is cut up): the answer's body (at most
/// 1 MiB of it) when its status is 2xx.
fn call(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
    timeout: Duration,
) -> Result<Vec<u8>, VmmError> {
    let io = |what: &str, e: std::io::Error| api_err(sock, format!("{method} {path}: {what}: {e}"));
    let deadline = Instant::now() + timeout;
    let mut s = banger_agent::connect_nofollow(sock).map_err(|e| io("connect", e))?;
    s.set_read_timeout(Some(timeout))
        .and_then(|()| s.set_write_timeout(Some(timeout)))
        .map_err(|e| io("set timeout", e))?;
    let req = match body {
        Some(body) => {
            let body = body.to_string();
            format!(
                "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
        }
        None => format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\r\n"
        ),
    };
    s.write_all(req.as_bytes()).map_err(|e| io("write", e))?;
    // (Each read bounded by what is left of the exchange's time.)
    let left = deadline.saturating_duration_since(Instant::now());
    let mut r = BufReader::new(banger_agent::deadline::Deadline::new(&s, left));
    let (status, len) = read_head(&mut r).map_err(|e| io("read", e))?;
    let code: u16 = status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| api_err(sock, format!("{method} {path}: bad status line {status:?}")))?;
    let mut answer = vec![0u8; len.min(1 << 20)];
    r.read_exact(&mut answer).map_err(|e| io("read body", e))?;
    if (200..300).contains(&code) {
        return Ok(answer);
    }
    let fault = serde_json::from_slice::<Value>(&answer)
        .ok()
        .and_then(|v| v["fault_message"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&answer).into_owned());
    Err(api_err(
        sock,
        format!("{method} {path}: HTTP {code}: {fault}"),
    ))
}

impl Vmm for Firecracker {
    fn kind(&self) -> VmmKind {
        VmmKind::Firecracker
    }

    fn accel(&self) -> &str {
        "kvm"
    }

    fn spawn(&self, cfg: &VmConfig) -> Result<VmmProcess, VmmError> {
        // Under the jailer, the API names the files as Firecracker sees
        // them inside its chroot.
        let jailed = match &cfg.jail {
            Some(spec) => {
                requests(cfg)?;
                Some(crate::jailer::prepare(cfg, spec, &self.binary)?)
            }
            None => None,
        };
        // A restore's Firecracker stays bare: its snapshot is loaded
        // into it (`load_snapshot`), nothing configured before.
        let mut calls = requests(jailed.as_ref().unwrap_or(cfg))?;
        if cfg.incoming {
            calls.clear();
        }
        let io = |path: &Path, source| VmmError::Io {
            vmm: "firecracker".into(),
            vm: cfg.name.clone(),
            path: path.to_path_buf(),
            source,
        };
        match std::fs::remove_file(&cfg.api_sock) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io(&cfg.api_sock, e));
            }
            _ => {}
        }
        // Appended to (never truncated here): the daemon rotates the
        // console log under the running VMM, which needs O_APPEND writes.
        let console = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&cfg.console_log)
            .map_err(|e| io(&cfg.console_log, e))?;
        // --log-path wants an existing file; Firecracker's stderr goes there
        // too, appended, so the two writers do not overwrite each other.
        // (Under the jailer, the chroot holds a link to it.)
        let f = std::fs::File::create(&cfg.vmm_log).map_err(|e| io(&cfg.vmm_log, e))?;
        if let Some(spec) = &cfg.jail {
            std::os::unix::fs::fchown(&f, Some(spec.uid), Some(spec.gid))
                .map_err(|e| io(&cfg.vmm_log, e))?;
        }
        let log2 = std::fs::OpenOptions::new()
            .append(true)
            .open(&cfg.vmm_log)
            .map_err(|e| io(&cfg.vmm_log, e))?;
        let mut cmd = match (&cfg.jail, &jailed) {
            (Some(spec), Some(j)) => {
                let mut c = Command::new(&spec.jailer);
                c.args(crate::jailer::args(spec, &self.binary, j));
                c
            }
            _ => {
                let mut c = Command::new(&self.binary);
                c.arg("--api-sock")
                    .arg(&cfg.api_sock)
                    .arg("--id")
                    .arg(&cfg.name)
                    .arg("--log-path")
                    .arg(&cfg.vmm_log);
                c
            }
        };
        cfg.confine
            .apply(&mut cmd)
            .map_err(|source| VmmError::Confine {
                vmm: "firecracker".into(),
                vm: cfg.name.clone(),
                source,
            })?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(log2)
            // Its own process group: a signal to the daemon's group (a
            // terminal's Ctrl-C) does not reach the guests.
            .process_group(0)
            .spawn()
            .map_err(|source| VmmError::Spawn {
                vmm: format!("firecracker ({})", self.binary.display()),
                vm: cfg.name.clone(),
                source,
            })?;
        let mut child = child;
        let configured = (|| {
            let deadline = Instant::now() + SOCKET_WAIT;
            while banger_agent::connect_nofollow(&cfg.api_sock).is_err() {
                if let Ok(Some(st)) = child.try_wait() {
                    return Err(api_err(
                        &cfg.api_sock,
                        format!("firecracker exited ({st}) before its API socket appeared"),
                    ));
                }
                if Instant::now() >= deadline {
                    return Err(api_err(
                        &cfg.api_sock,
                        format!("no API socket after {SOCKET_WAIT:?}"),
                    ));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            for (path, body) in &calls {
                put(&cfg.api_sock, path, body)?;
            }
            Ok(())
        })();
        if let Err(e) = configured {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        Ok(VmmProcess {
            pid: child.id() as i32,
            child: Some(child),
        })
    }

    fn request_shutdown(&self, api_sock: &Path) -> Result<(), VmmError> {
        put(
            api_sock,
            "/actions",
            &json!({"action_type": "SendCtrlAltDel"}),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Disk, Nic};

    fn cfg() -> VmConfig {
        VmConfig {
            name: "fc1".into(),
            vcpus: 2,
            memory_mib: 512,
            kernel: "/k/vmlinux".into(),
            initrd: "/v/initrd.img".into(),
            cmdline: "console=ttyS0".into(),
            disks: vec![
                Disk {
                    id: "root".into(),
                    path: "/v/root.ext4".into(),
                    format: "raw".into(),
                    read_only: false,
                },
                Disk {
                    id: "work".into(),
                    path: "/v/work.ext4".into(),
                    format: "raw".into(),
                    read_only: false,
                },
            ],
            nics: vec![Nic {
                tap: "bgtap0".into(),
                mac: "06:00:ac:1e:00:02".into(),
                fd: None,
                mtu: None,
            }],
            confine: Default::default(),
            jail: None,
            ram_fd: None,
            incoming: false,
            console_log: "/v/console.log".into(),
            vmm_log: "/v/vmm.log".into(),
            api_sock: "/r/api.sock".into(),
            shares: Vec::new(),
            vsock: Some(crate::Vsock {
                cid: 7,
                uds_path: "/r/vsock.sock".into(),
                backend: "/r/unused".into(),
                serial: false,
            }),
        }
    }

    #[test]
    fn requests_follow_the_getting_started_order() {
        let r = requests(&cfg()).unwrap();
        let paths: Vec<&str> = r.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/machine-config",
                "/boot-source",
                "/drives/root",
                "/drives/work",
                "/network-interfaces/eth0",
                "/vsock",
                "/actions"
            ]
        );
        assert_eq!(r[5].1, json!({"guest_cid": 7, "uds_path": "/r/vsock.sock"}));
        assert_eq!(r[0].1, json!({"vcpu_count": 2, "mem_size_mib": 512}));
        assert_eq!(r[2].1["is_root_device"], true);
        assert_eq!(r[3].1["is_root_device"], false);
        assert_eq!(r[4].1["host_dev_name"], "bgtap0");
        assert_eq!(r[6].1["action_type"], "InstanceStart");
    }

    #[test]
    fn what_firecracker_refuses_is_refused_first() {
        let mut c = cfg();
        c.vcpus = 33;
        let e = requests(&c).unwrap_err().to_string();
        assert!(e.contains("33 vCPUs") && e.contains("fc1"), "{e}");
        c.vcpus = 3;
        requests(&c).expect("odd counts are fine with SMT off");
        let mut c = cfg();
        c.disks[0].format = "qcow2".into();
        let e = requests(&c).unwrap_err().to_string();
        assert!(e.contains("raw disks only"), "{e}");
    }
}
