//! A Firecracker stand-in for hosts without hardware KVM (these machines),
//! for testing banger's Firecracker driver end to end.
//!
//! It takes Firecracker's command line (`--api-sock`, `--id`,
//! `--log-path`; anything else is refused, as Firecracker refuses it),
//! serves the REST API on the socket, and checks every request against the
//! official spec file (`test_infra::fcspec`) plus the rules Firecracker
//! enforces beyond the schema: a body id equal to the path's id, pre-boot
//! resources refused after `InstanceStart`, `InstanceStart` only with a
//! boot source, `SendCtrlAltDel` and `PATCH /vm` (pause, resume) only once
//! started, played by QMP `stop` and `cont` (Firecracker's pause stops the
//! vCPUs while its vsock device goes on; the double's vsock is a process
//! of its own). A refused request gets
//! HTTP 400 with `{"fault_message": ...}`, like Firecracker's.
//!
//! `InstanceStart` boots the configured guest for real, with QEMU under
//! TCG: the same kernel (PVH), initrd, boot arguments, raw drives (root
//! first) and tap, the guest's memory in an unlinked tmpfs file, the
//! vsock played by `banger-vport` (Firecracker's hybrid protocol on
//! `uds_path`) behind a virtio-serial port that the guest's agent takes
//! (`banger.vport=1` added to its command line): nothing in it that QEMU
//! cannot migrate (what `/snapshot/*` will need). The serial console on
//! this process's stdout, and
//! `SendCtrlAltDel` sent through QMP; the guest's reboot ends the VMM. The
//! double exits when the guest does, as Firecracker does; its QEMU dies
//! with it (PDEATHSIG).
//!
//! Not exercised: Firecracker's virtio-mmio devices. The double's are
//! virtio-pci (`-M pc`): QEMU's `microvm` machine, which has virtio-mmio
//! devices announced on the kernel command line like Firecracker's, hangs
//! under TCG at the guest kernel's clock calibration, intermittently, with
//! this kernel. The guest side is ready for it (the initramfs loads
//! `virtio_mmio` and passes it its `virtio_mmio.device=` parameters).
//!
//! Every request and its verdict go to `--log-path`.

use std::collections::BTreeMap;
use std::io::{BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use test_infra::fcspec::Spec;

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Vm {
    machine: Option<Value>,
    boot: Option<Value>,
    /// In the order they were added (a PUT of a known id replaces it in
    /// place): Firecracker attaches them in that order, the root first,
    /// so the guest's /dev/vdX follow it.
    drives: Vec<(String, Value)>,
    nics: BTreeMap<String, Value>,
    vsock: Option<Value>,
    #[serde(skip)]
    started: bool,
    /// `PATCH /vm` Paused (or a load without `resume_vm`).
    #[serde(skip)]
    paused: bool,
    /// The QEMU playing the guest, once started.
    #[serde(skip)]
    qemu: Option<i32>,
    /// The guest's RAM (a descriptor of the double's own).
    #[serde(skip)]
    ram: Option<std::fs::File>,
    /// A failed `/snapshot/load`: the process ends once it has answered,
    /// as Firecracker's does.
    #[serde(skip)]
    fatal: bool,
}

struct Double {
    spec: Spec,
    vm: Mutex<Vm>,
    api_sock: PathBuf,
    log: Mutex<std::fs::File>,
}

/// The chroot a jailed Firecracker would see as `/` (unset: not jailed).
static ROOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// A path as this Firecracker sees it: inside its chroot when jailed.
fn at(p: &str) -> PathBuf {
    match ROOT.get() {
        Some(root) => root.join(p.trim_start_matches('/')),
        None => PathBuf::from(p),
    }
}

fn die(msg: &str) -> ! {
    eprintln!("firecracker-double: {msg}");
    std::process::exit(1);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mut sock, mut id, mut log) = (None, None, None);
    let mut jailed = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        // Firecracker takes `--flag value` and `--flag=value`.
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (a.as_str(), None),
        };
        let mut val = || {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .unwrap_or_else(|| die(&format!("{flag} needs a value")))
        };
        match flag {
            "--api-sock" => sock = Some(val()),
            "--id" => id = Some(val()),
            "--log-path" => log = Some(val()),
            // What the jailer passes: Firecracker runs in its chroot.
            "--start-time-us" | "--start-time-cpu-us" | "--parent-cpu-time-us" => {
                let v = val();
                v.parse::<u64>()
                    .unwrap_or_else(|_| die(&format!("{flag} {v:?}: not a number")));
                jailed = true;
            }
            other => die(&format!("unknown argument {other:?}")),
        }
    }
    // Under the (double) jailer, `/` is the chroot, which the jailer made
    // the working directory: every path given is resolved there.
    if jailed {
        let root = std::env::current_dir().unwrap_or_else(|e| die(&format!("cwd: {e}")));
        let _ = ROOT.set(root);
    }
    let sock = at(&sock.unwrap_or_else(|| die("--api-sock is required")));
    if let Some(id) = &id {
        let ok = !id.is_empty()
            && id.len() <= 64
            && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !ok {
            die(&format!("invalid --id {id:?}"));
        }
    }
    let log = log.unwrap_or_else(|| die("this double wants --log-path (banger passes it)"));
    // Like Firecracker, the log file must exist already.
    let log = std::fs::OpenOptions::new()
        .append(true)
        .open(at(&log))
        .unwrap_or_else(|e| die(&format!("--log-path {log}: {e}")));
    let listener =
        UnixListener::bind(&sock).unwrap_or_else(|e| die(&format!("bind {}: {e}", sock.display())));
    let d = Arc::new(Double {
        spec: Spec::load(),
        vm: Mutex::new(Vm::default()),
        api_sock: sock,
        log: Mutex::new(log),
    });
    for conn in listener.incoming() {
        match conn {
            Ok(s) => {
                let d = d.clone();
                std::thread::spawn(move || serve(&d, s));
            }
            Err(e) => die(&format!("accept: {e}")),
        }
    }
}

fn serve(d: &Double, s: UnixStream) {
    let Ok(w) = s.try_clone() else { return };
    let mut w = w;
    let mut r = BufReader::new(s);
    loop {
        let Ok((line, len)) = banger_vmm::firecracker::read_head(&mut r) else {
            return;
        };
        if line.is_empty() {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (
            parts.next().unwrap_or("").to_string(),
            parts.next().unwrap_or("").to_string(),
        );
        let mut body = vec![0u8; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        let verdict = handle(d, &method, &path, &body);
        if let Ok(mut l) = d.log.lock() {
            let _ = writeln!(
                l,
                "{method} {path} {} -> {}",
                String::from_utf8_lossy(&body),
                match &verdict {
                    Ok(None) => "204".to_string(),
                    Ok(Some(v)) => format!("200 {v}"),
                    Err(e) => format!("400 {e}"),
                }
            );
        }
        let fatal = d.vm.lock().map(|vm| vm.fatal).unwrap_or(true);
        let reply = match verdict {
            Ok(None) => "HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n".to_string(),
            Ok(Some(v)) => {
                let b = v.to_string();
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
                    b.len()
                )
            }
            Err(e) => {
                let b = json!({ "fault_message": e }).to_string();
                format!(
                    "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
                    b.len()
                )
            }
        };
        if w.write_all(reply.as_bytes()).is_err() {
            return;
        }
        if fatal {
            // Firecracker after a failed load: gone, its guest with it.
            std::process::exit(1);
        }
    }
}

/// The version the double answers `GET /version` with: the spec's.
const VERSION: &str = "1.16.1";

fn handle(d: &Double, method: &str, path: &str, body: &[u8]) -> Result<Option<Value>, String> {
    let body: Option<Value> = if body.is_empty() {
        None
    } else {
        Some(serde_json::from_slice(body).map_err(|e| format!("bad JSON: {e}"))?)
    };
    let params = d.spec.check(method, path, body.as_ref())?;
    let body = body.unwrap_or(Value::Null);
    // Firecracker: the id in the body must be the one in the path.
    for (name, val) in &params {
        if body[name.as_str()].as_str() != Some(val.as_str()) {
            return Err(format!(
                "the {name} in the body ({}) differs from the path's ({val})",
                body[name.as_str()]
            ));
        }
    }
    let mut vm = d.vm.lock().map_err(|_| "state poisoned".to_string())?;
    let pre_boot = |vm: &Vm| {
        if vm.started {
            Err("The requested operation is not supported after starting the microVM.".to_string())
        } else {
            Ok(())
        }
    };
    let is_bare = |vm: &Vm| {
        !vm.started
            && vm.machine.is_none()
            && vm.boot.is_none()
            && vm.drives.is_empty()
            && vm.nics.is_empty()
            && vm.vsock.is_none()
    };
    match (method, path.split('/').nth(1).unwrap_or("")) {
        ("GET", "version") => {
            return Ok(Some(json!({ "firecracker_version": VERSION })));
        }
        ("PUT", "snapshot") if path == "/snapshot/create" => {
            if !vm.started {
                return Err(
                    "The requested operation is not supported before starting the microVM.".into(),
                );
            }
            if !vm.paused {
                return Err("Cannot create a snapshot: the microVM is not paused.".into());
            }
            if body["snapshot_type"] == "Diff" {
                return Err("Diff snapshots are not implemented by the double".into());
            }
            create_snapshot(d, &vm, &body)?;
        }
        ("PUT", "snapshot") => {
            // (/snapshot/load: the spec let no other path through.)
            if !is_bare(&vm) {
                return Err("Loading a microVM snapshot not allowed after configuring boot-specific resources.".into());
            }
            // Whatever goes wrong from here, the process is done.
            vm.fatal = true;
            load_snapshot(d, &mut vm, &body)?;
            vm.fatal = false;
        }
        ("PUT", "machine-config") => {
            pre_boot(&vm)?;
            // Firecracker refuses odd counts above 1 only with SMT on.
            let n = body["vcpu_count"].as_i64().unwrap_or(0);
            if body["smt"] == true && n > 1 && n % 2 != 0 {
                return Err("The vCPU number is invalid! The vCPU number can only be 1 or an even number when SMT is enabled.".into());
            }
            vm.machine = Some(body);
        }
        ("PUT", "boot-source") => {
            pre_boot(&vm)?;
            vm.boot = Some(body);
        }
        ("PUT", "drives") => {
            pre_boot(&vm)?;
            let id = body["drive_id"].as_str().unwrap_or("").to_string();
            if body["is_root_device"] == true
                && vm
                    .drives
                    .iter()
                    .any(|(k, v)| *k != id && v["is_root_device"] == true)
            {
                return Err("A root block device already exists!".into());
            }
            // Firecracker opens the backing file when the drive is added.
            let f = body["path_on_host"].as_str().unwrap_or("");
            std::fs::OpenOptions::new()
                .read(true)
                .write(body["is_read_only"] != true)
                .open(at(f))
                .map_err(|e| format!("drive {id}: {f}: {e}"))?;
            match vm.drives.iter_mut().find(|(k, _)| *k == id) {
                Some(slot) => slot.1 = body,
                None => vm.drives.push((id, body)),
            }
        }
        ("PUT", "network-interfaces") => {
            pre_boot(&vm)?;
            let id = body["iface_id"].as_str().unwrap_or("").to_string();
            vm.nics.insert(id, body);
        }
        ("PUT", "vsock") => {
            pre_boot(&vm)?;
            // Firecracker binds the socket itself: one already there is
            // refused (EADDRINUSE).
            let uds = body["uds_path"].as_str().unwrap_or("");
            if at(uds).exists() {
                return Err(format!("vsock: {uds}: Address in use (os error 98)"));
            }
            vm.vsock = Some(body);
        }
        ("PUT", "actions") => match body["action_type"].as_str() {
            Some("InstanceStart") => {
                pre_boot(&vm)?;
                let boot = vm
                    .boot
                    .clone()
                    .ok_or("Cannot start microvm without kernel configuration.")?;
                let (pid, ram) = start(d, &vm, &boot, None)?;
                vm.qemu = Some(pid);
                vm.ram = Some(ram);
                vm.started = true;
            }
            Some("SendCtrlAltDel") => {
                if !vm.started {
                    return Err(
                        "The requested operation is not supported before starting the microVM."
                            .into(),
                    );
                }
                qmp_ctrl_alt_del(d)?;
            }
            other => return Err(format!("action {other:?} is not implemented by the double")),
        },
        ("PATCH", "vm") => {
            if !vm.started {
                return Err(
                    "The requested operation is not supported before starting the microVM.".into(),
                );
            }
            // (The spec's enum let only these two through.) The vCPUs
            // stop; the vsock (`banger-vport`, a process of its own) goes
            // on, as Firecracker's device thread does.
            let pause = body["state"] == "Paused";
            let cmd = if pause { "stop" } else { "cont" };
            vm.qemu.ok_or("no guest is running")?;
            banger_vmm::qmp::execute(&qmp_sock(d), cmd, None)
                .map_err(|e| format!("QMP {cmd}: {e}"))?;
            vm.paused = pause;
        }
        _ => {
            return Err(format!(
                "{method} {path} is valid but not implemented by the double"
            ))
        }
    }
    Ok(None)
}

/// What `/snapshot/create` writes first in the state file: the double's
/// configuration, a line of JSON; QEMU's migration stream follows.
const STATE_MAGIC: &str = "banger-fc-double-state-1";
/// The longest such line a load reads.
const HEADER_MAX: usize = 1 << 20;
/// How long QEMU may take to save or load a guest's device state.
const STATE_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// `PUT /snapshot/create` of the paused guest: the state file (the
/// configuration, then QEMU's device state: RAM, a shared file, left
/// out), then the memory file (a copy of the RAM file's data). Both
/// created by this process's user; a memory file that exists is
/// overwritten in place (its inode kept, as Firecracker does).
fn create_snapshot(d: &Double, vm: &Vm, body: &Value) -> Result<(), String> {
    let state_path = at(body["snapshot_path"].as_str().unwrap_or(""));
    let mem_path = at(body["mem_file_path"].as_str().unwrap_or(""));
    let ram = vm.ram.as_ref().ok_or("no guest memory")?;
    let mut state = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&state_path)
        .map_err(|e| format!("snapshot {}: {e}", state_path.display()))?;
    let header = json!({ "magic": STATE_MAGIC, "vm": vm }).to_string();
    state
        .write_all(header.as_bytes())
        .and_then(|()| state.write_all(b"\n"))
        .map_err(|e| format!("snapshot {}: {e}", state_path.display()))?;
    let qmp = qmp_sock(d);
    banger_vmm::qmp::save_state(&qmp, &state, std::time::Instant::now() + STATE_WAIT)
        .map_err(|e| format!("save the guest's state: {e}"))?;
    state
        .sync_all()
        .map_err(|e| format!("snapshot {}: {e}", state_path.display()))?;
    let mem = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&mem_path)
        .and_then(|f| f.set_len(0).map(|()| f))
        .map_err(|e| format!("memory file {}: {e}", mem_path.display()))?;
    banger_host::fsutil::copy_extents(ram, std::path::Path::new("guest memory"), &mem, &mem_path)
        .map_err(|e| e.to_string())?;
    mem.sync_all()
        .map_err(|e| format!("memory file {}: {e}", mem_path.display()))?;
    // After a save QEMU has handed its disks over; `cont` takes them
    // back. Paused it stays, as Firecracker's microVM after a create.
    for cmd in ["cont", "stop"] {
        banger_vmm::qmp::execute(&qmp, cmd, None).map_err(|e| format!("QMP {cmd}: {e}"))?;
    }
    Ok(())
}

/// `PUT /snapshot/load` on a bare double: the configuration read back
/// from the state file with the overrides applied (taps by interface,
/// the vsock's socket), the memory file copied into the double's own RAM,
/// QEMU started with `-incoming defer` and given the device state. Any
/// failure ends the process (the caller marks it fatal).
fn load_snapshot(d: &Double, vm: &mut Vm, body: &Value) -> Result<(), String> {
    let mem_path = match (&body["mem_backend"], &body["mem_file_path"]) {
        (Value::Object(b), Value::Null) => {
            if b.get("backend_type").and_then(Value::as_str) != Some("File") {
                return Err("Uffd memory backends are not implemented by the double".into());
            }
            b.get("backend_path").and_then(Value::as_str).unwrap_or("")
        }
        (Value::Null, Value::String(p)) => p.as_str(),
        _ => {
            return Err("Exactly one of mem_backend and mem_file_path must be given.".into());
        }
    };
    let mem_path = at(mem_path);
    let state_path = at(body["snapshot_path"].as_str().unwrap_or(""));
    let mut state = std::fs::File::open(&state_path)
        .map_err(|e| format!("snapshot {}: {e}", state_path.display()))?;
    let header =
        read_header(&mut state).map_err(|e| format!("snapshot {}: {e}", state_path.display()))?;
    let v: Value = serde_json::from_str(&header)
        .map_err(|e| format!("snapshot {}: {e}", state_path.display()))?;
    if v["magic"] != STATE_MAGIC {
        return Err(format!(
            "snapshot {}: not a state file of this double",
            state_path.display()
        ));
    }
    let mut saved: Vm = serde_json::from_value(v["vm"].clone())
        .map_err(|e| format!("snapshot {}: {e}", state_path.display()))?;
    for o in body["network_overrides"].as_array().into_iter().flatten() {
        let iface = o["iface_id"].as_str().unwrap_or("");
        let nic = saved
            .nics
            .get_mut(iface)
            .ok_or_else(|| format!("Invalid network override: no interface {iface:?}"))?;
        nic["host_dev_name"] = o["host_dev_name"].clone();
    }
    if let Some(uds) = body["vsock_override"]["uds_path"].as_str() {
        let vs = saved
            .vsock
            .as_mut()
            .ok_or("Invalid vsock override: the snapshot has no vsock device")?;
        vs["uds_path"] = json!(uds);
    }
    // Firecracker binds the vsock's socket afresh: one there is fatal.
    if let Some(uds) = saved.vsock.as_ref().and_then(|v| v["uds_path"].as_str()) {
        if at(uds).exists() {
            return Err(format!("vsock: {uds}: Address in use (os error 98)"));
        }
    }
    // Its drives reopened at the paths it recorded.
    for (id, dr) in &saved.drives {
        let f = dr["path_on_host"].as_str().unwrap_or("");
        std::fs::OpenOptions::new()
            .read(true)
            .write(dr["is_read_only"] != true)
            .open(at(f))
            .map_err(|e| format!("drive {id}: {f}: {e}"))?;
    }
    let memory = std::fs::File::open(&mem_path)
        .map_err(|e| format!("memory file {}: {e}", mem_path.display()))?;
    let want = saved
        .machine
        .as_ref()
        .and_then(|m| m["mem_size_mib"].as_u64())
        .unwrap_or(128)
        << 20;
    let has = memory.metadata().map(|m| m.len()).unwrap_or(0);
    if has < want {
        return Err(format!(
            "memory file {}: {has} bytes, less than the guest's {want}",
            mem_path.display()
        ));
    }
    let boot = saved
        .boot
        .clone()
        .ok_or("the snapshot has no boot source")?;
    let (pid, ram) = start(d, &saved, &boot, Some((&memory, &mem_path)))?;
    let qmp = qmp_sock(d);
    let deadline = std::time::Instant::now() + STATE_WAIT;
    while banger_vmm::qmp::Session::open(&qmp).is_err() {
        if std::time::Instant::now() >= deadline {
            return Err("QEMU's QMP socket did not come".into());
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    banger_vmm::qmp::load_state(&qmp, &state, deadline)
        .map_err(|e| format!("load the guest's state: {e}"))?;
    let resume = body["resume_vm"] == true;
    if resume {
        banger_vmm::qmp::execute(&qmp, "cont", None).map_err(|e| format!("QMP cont: {e}"))?;
    }
    saved.started = true;
    saved.paused = !resume;
    saved.qemu = Some(pid);
    saved.ram = Some(ram);
    *vm = saved;
    Ok(())
}

/// The state file's first line, the file left just after it (where
/// QEMU's stream starts).
fn read_header(f: &mut std::fs::File) -> std::io::Result<String> {
    use std::io::{Seek, SeekFrom};
    let mut buf = vec![0u8; HEADER_MAX];
    let mut have = 0;
    loop {
        let n = f.read(&mut buf[have..])?;
        if let Some(end) = buf[have..have + n].iter().position(|b| *b == b'\n') {
            let end = have + end;
            f.seek(SeekFrom::Start(end as u64 + 1))?;
            return String::from_utf8(buf[..end].to_vec())
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e));
        }
        have += n;
        if n == 0 || have == buf.len() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "no configuration line",
            ));
        }
    }
}

fn qmp_sock(d: &Double) -> PathBuf {
    let mut p = d.api_sock.clone().into_os_string();
    p.push(".qmp");
    PathBuf::from(p)
}

/// Boots the configured guest with QEMU (or, given a memory file, starts
/// it waiting for a saved device state, its RAM that file's copy); the
/// double exits with it. Its pid, and the guest's RAM.
fn start(
    d: &Double,
    vm: &Vm,
    boot: &Value,
    restore: Option<(&std::fs::File, &std::path::Path)>,
) -> Result<(i32, std::fs::File), String> {
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    // Paths as this Firecracker sees them (inside its chroot when jailed).
    let p = |v: &Value| at(v.as_str().unwrap_or(""));
    let machine = vm
        .machine
        .clone()
        .unwrap_or(json!({"vcpu_count": 1, "mem_size_mib": 128}));
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-M", "pc,accel=tcg,usb=off,vmport=off"])
        .args(["-name", "fc-double,debug-threads=on"])
        .args(["-cpu", "max"])
        .args(["-smp", &machine["vcpu_count"].to_string()])
        .args(["-m", &format!("{}M", machine["mem_size_mib"])])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(p(&boot["kernel_image_path"]));
    if boot.get("initrd_path").is_some() {
        c.arg("-initrd").arg(p(&boot["initrd_path"]));
    }
    let mut args = s(&boot["boot_args"]);
    if vm.vsock.is_some() {
        args.push_str(" banger.vport=1");
    }
    c.arg("-append").arg(args);
    c.args(["-serial", "stdio"]);
    // Root first: it is /dev/vda, as under Firecracker.
    let mut drives: Vec<&Value> = vm.drives.iter().map(|(_, v)| v).collect();
    // Stable: the others keep the order they were added in.
    drives.sort_by_key(|v| v["is_root_device"] != true);
    for (i, dr) in drives.iter().enumerate() {
        let ro = if dr["is_read_only"] == true {
            "on"
        } else {
            "off"
        };
        let file = p(&dr["path_on_host"]).to_string_lossy().replace(',', ",,");
        c.arg("-drive").arg(format!(
            "id=d{i},file={file},format=raw,if=none,readonly={ro}"
        ));
        c.args(["-device", &format!("virtio-blk-pci,drive=d{i}")]);
    }
    // Firecracker opens /dev/net/tun (its jail's own) and attaches to the
    // tap by name: as an unprivileged user that works only on a tap it
    // owns (TUNSETOWNER). The double does the same and hands QEMU the
    // descriptor.
    let mut taps = Vec::new();
    for (i, n) in vm.nics.values().enumerate() {
        let fd = banger_host::tap::open_queue_at(&at("/dev/net/tun"), &s(&n["host_dev_name"]))
            .map_err(|e| format!("network interface {i}: {e}"))?;
        c.arg("-netdev").arg(format!(
            "tap,id=n{i},fd={}",
            std::os::fd::AsRawFd::as_raw_fd(&fd)
        ));
        taps.push(fd);
        let mut dev = format!("virtio-net-pci,netdev=n{i}");
        if n.get("guest_mac").is_some() {
            dev.push_str(&format!(",mac={}", s(&n["guest_mac"])));
        }
        c.args(["-device", &dev]);
    }
    let qmp = qmp_sock(d).to_string_lossy().replace(',', ",,");
    c.arg("-qmp").arg(format!("unix:{qmp},server=on,wait=off"));
    c.stdin(Stdio::null());
    // The guest's memory in a tmpfs file of the double's, unlinked at
    // once (nothing is left behind, whatever ends the double), that QEMU
    // maps shared through the descriptor it inherits: what a snapshot of
    // the double copies, as banger's own QEMU path does.
    let ram = ram_file(machine["mem_size_mib"].as_u64().unwrap_or(128))?;
    if let Some((memory, path)) = restore {
        // A private copy: the snapshot's memory file never changes.
        ram.set_len(0).map_err(|e| format!("guest memory: {e}"))?;
        banger_host::fsutil::copy_extents(memory, path, &ram, std::path::Path::new("guest memory"))
            .map_err(|e| e.to_string())?;
        c.args(["-incoming", "defer"]);
    }
    let ram_keep = ram.try_clone().map_err(|e| format!("guest memory: {e}"))?;
    c.args([
        "-object",
        &format!(
            "memory-backend-file,id=mem,size={}M,mem-path=/proc/self/fd/{},share=on",
            machine["mem_size_mib"],
            std::os::fd::AsRawFd::as_raw_fd(&ram)
        ),
        "-machine",
        "memory-backend=mem",
    ]);
    // Firecracker's hybrid vsock, played by `banger-vport` (the same
    // host-side protocol on `uds_path`, guest-initiated streams to
    // `uds_path_PORT`) behind a virtio-serial port, which a QEMU
    // migration keeps; the guest's agent takes the port when its command
    // line says `banger.vport=1`.
    let mut backend = None;
    let mut be_wait = None;
    if let Some(v) = &vm.vsock {
        let mut be_sock = d.api_sock.clone().into_os_string();
        be_sock.push(".vport");
        let be_sock = PathBuf::from(be_sock);
        let _ = std::fs::remove_file(&be_sock);
        let mut b = Command::new(vport_binary());
        b.arg("--port-socket")
            .arg(&be_sock)
            .arg("--uds-path")
            .arg(p(&v["uds_path"]))
            .arg("--guest-port")
            .arg(banger_agent::proto::HELLO_PORT.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        die_with_double(&mut b);
        backend = Some(b);
        be_wait = Some(be_sock.clone());
        c.args([
            "-device",
            "virtio-serial-pci,id=vser0,max_ports=2",
            "-chardev",
            &format!(
                "socket,id=agent,path={},reconnect=1",
                be_sock.to_string_lossy().replace(',', ",,")
            ),
            "-device",
            &format!(
                "virtserialport,bus=vser0.0,nr=1,chardev=agent,name={}",
                banger_agent::proto::VPORT_NAME
            ),
        ]);
    }
    die_with_double(&mut c);
    // A session of its own: a group the daemon's death orphans sends no
    // SIGHUP its way (as banger's QEMU).
    // SAFETY: setsid(2) is async-signal-safe.
    unsafe {
        c.pre_exec(|| {
            nix::unistd::setsid()
                .map(drop)
                .map_err(std::io::Error::from)
        });
    }
    // (Held open, `taps`, until QEMU is spawned.)
    banger_host::confine::inherit_fds(
        &mut c,
        taps.iter()
            .map(std::os::fd::AsRawFd::as_raw_fd)
            .chain([std::os::fd::AsRawFd::as_raw_fd(&ram)])
            .collect(),
    );
    // PDEATHSIG fires when the spawning *thread* exits, so QEMU (and the
    // vsock backend) are spawned by a thread that lives as long as QEMU
    // does (and then ends the double: Firecracker exits when its guest
    // reboots or stops).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _taps = taps;
        let _ram = ram;
        let _backend = match backend.as_mut().map(Command::spawn).transpose() {
            Ok(b) => b,
            Err(e) => {
                let _ = tx.send(Err(format!("start banger-vport: {e}")));
                return;
            }
        };
        // QEMU needs the backend listening, not only its socket file
        // (made at bind, before listen; bangerd's own QEMU driver waits
        // with inotify; the double looks every millisecond, bounded).
        if let (Some(sock), Some(b)) = (&be_wait, &_backend) {
            let t = std::time::Instant::now();
            while !banger_host::process::listens_on(b.id() as i32, sock)
                && t.elapsed() < std::time::Duration::from_secs(10)
            {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        match c.spawn() {
            Ok(mut child) => {
                let _ = tx.send(Ok(child.id() as i32));
                let code = child.wait().map(|s| s.code().unwrap_or(1)).unwrap_or(1);
                std::process::exit(code);
            }
            Err(e) => {
                let _ = tx.send(Err(format!("start qemu: {e}")));
            }
        }
    });
    let pid = rx.recv().map_err(|e| e.to_string())??;
    Ok((pid, ram_keep))
}

/// A sparse tmpfs file of `mib` MiB, already unlinked: the guest's RAM.
fn ram_file(mib: u64) -> Result<std::fs::File, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = PathBuf::from(format!(
        "/dev/shm/fc-double-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("guest memory {}: {e}", path.display()))?;
    let _ = std::fs::remove_file(&path);
    f.set_len(mib << 20)
        .map_err(|e| format!("guest memory of {mib} MiB: {e}"))?;
    Ok(f)
}

/// `banger-vport`: beside this binary (a build tree's, or the jailer
/// double's copy in the jail), else on the default PATH (a jailed double
/// has no environment).
fn vport_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.join("banger-vport")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("banger-vport"))
}

fn die_with_double(c: &mut Command) {
    // SAFETY: only async-signal-safe work between fork and exec: one
    // prctl, so that the child dies with the double (SIGKILL included).
    unsafe {
        c.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
}

fn qmp_ctrl_alt_del(d: &Double) -> Result<(), String> {
    banger_vmm::qmp::send_ctrl_alt_del(&qmp_sock(d)).map_err(|e| e.to_string())
}
