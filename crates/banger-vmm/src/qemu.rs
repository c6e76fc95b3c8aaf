//! The QEMU driver: `qemu-system-x86_64 -M pc` with KVM where hardware
//! virtualisation is usable and TCG otherwise, the ELF kernel booted through
//! PVH, virtio disks and a virtio-net on the VM's tap, the serial console to
//! the VM's log file, QMP on the API socket.

use std::ffi::OsString;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use banger_core::VmmKind;

use crate::{qmp, VmConfig, Vmm, VmmError, VmmProcess};

pub const QEMU_BINARY: &str = "qemu-system-x86_64";

use banger_agent::proto::VPORT_NAME;

/// MiB of TCG's translation cache.
pub const TCG_TB_MIB: u64 = 256;

/// `-sandbox`: QEMU's own seccomp filter with every optional deny on.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

#[derive(Debug, Clone)]
pub struct Qemu {
    pub binary: String,
    /// "kvm" or "tcg".
    pub accel: String,
}

impl Qemu {
    pub fn new(kvm: bool) -> Self {
        Qemu {
            binary: QEMU_BINARY.to_string(),
            accel: if kvm { "kvm" } else { "tcg" }.to_string(),
        }
    }

    /// The full argument list (without the binary), a pure function of the
    /// config so that it is tested as such.
    pub fn args(&self, cfg: &VmConfig) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |s: &str| a.push(OsString::from(s));
        // Threads named for what they run (`CPU 0/TCG`, ...): `top -H`
        // and the tests tell the vCPUs from QEMU's other threads.
        push("-name");
        push(&format!("banger-{},debug-threads=on", cfg.name));
        push("-accel");
        // TCG's translation cache is bounded (QEMU's default is 1 GiB of
        // host memory, grown as the guest runs new code), so that the
        // VMM's memory beyond the guest's has a ceiling its cgroup can
        // count on (`bangerd --vmm-memory-overhead`).
        push(&if self.accel == "tcg" {
            format!("tcg,tb-size={TCG_TB_MIB}")
        } else {
            self.accel.clone()
        });
        push("-M");
        // vhost-user devices (a vsock device's backend, virtiofsd) need
        // the guest's memory shared with their backend process: a memfd.
        // A RAM file of its own (what a snapshot copies) is shared too.
        let vhost_vsock = cfg.vsock.as_ref().is_some_and(|v| !v.serial);
        let shared = if vhost_vsock || !cfg.shares.is_empty() || cfg.ram_fd.is_some() {
            ",memory-backend=mem"
        } else {
            ""
        };
        push(&format!("pc,usb=off,vmport=off{shared}"));
        push("-cpu");
        push(if self.accel == "kvm" { "host" } else { "max" });
        push("-smp");
        push(&cfg.vcpus.to_string());
        push("-m");
        push(&format!("{}M", cfg.memory_mib));
        for s in [
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            // QEMU's seccomp filter: no obsolete system calls, no setuid
            // and friends, no fork or exec, no scheduler or resource
            // changes.
            "-sandbox",
            SANDBOX,
        ] {
            push(s);
        }
        let path = |p: &Path| p.to_string_lossy().into_owned();
        match cfg.ram_fd {
            // Its private /dev/shm hides the file's path: it opens the
            // descriptor it inherited.
            Some(fd) => {
                push("-object");
                push(&format!(
                    "memory-backend-file,id=mem,size={}M,mem-path=/proc/self/fd/{fd},share=on",
                    cfg.memory_mib
                ));
            }
            None if !shared.is_empty() => {
                push("-object");
                push(&format!(
                    "memory-backend-memfd,id=mem,size={}M,share=on",
                    cfg.memory_mib
                ));
            }
            None => {}
        }
        if cfg.incoming {
            push("-incoming");
            push("defer");
        }
        match &cfg.vsock {
            // The agent's channel on a virtio-serial port, which migrates
            // (a snapshot keeps it): `banger-vport` listens before QEMU
            // starts, and QEMU connects again if it restarts. Port 1 by
            // number: a snapshot's clone must number it the same.
            Some(v) if v.serial => {
                push("-device");
                push("virtio-serial-pci,id=vser0,max_ports=2");
                push("-chardev");
                push(&format!(
                    "socket,id=agent,path={},reconnect=1",
                    path(&v.backend).replace(',', ",,")
                ));
                push("-device");
                push(&format!(
                    "virtserialport,bus=vser0.0,nr=1,chardev=agent,name={VPORT_NAME}"
                ));
            }
            // The backend (vhost-device-vsock) listens before QEMU starts:
            // the daemon waits for its socket. (No `reconnect`: with it,
            // QEMU 7.2 connects asynchronously and the device's setup,
            // which needs the connection, fails.)
            Some(v) => {
                push("-chardev");
                push(&format!(
                    "socket,id=vsock,path={}",
                    path(&v.backend).replace(',', ",,")
                ));
                push("-device");
                push("vhost-user-vsock-pci,chardev=vsock");
            }
            None => {}
        }
        // virtiofsd listens before QEMU starts (as the vsock backend).
        for (i, s) in cfg.shares.iter().enumerate() {
            push("-chardev");
            push(&format!(
                "socket,id=fs{i},path={}",
                path(&s.socket).replace(',', ",,")
            ));
            push("-device");
            push(&format!("vhost-user-fs-pci,chardev=fs{i},tag={}", s.tag));
        }
        push("-kernel");
        push(&path(&cfg.kernel));
        push("-initrd");
        push(&path(&cfg.initrd));
        push("-append");
        push(&cfg.cmdline);
        for d in &cfg.disks {
            push("-drive");
            // A comma in a path would split QEMU's option; QEMU escapes it
            // as a double comma.
            push(&format!(
                "file={},if=none,id={},format={},cache=unsafe{}",
                path(&d.path).replace(',', ",,"),
                d.id,
                d.format,
                if d.read_only { ",readonly=on" } else { "" }
            ));
            push("-device");
            push(&format!("virtio-blk-pci,drive={}", d.id));
        }
        for (i, n) in cfg.nics.iter().enumerate() {
            push("-netdev");
            push(&match n.fd {
                // An unprivileged QEMU cannot open /dev/net/tun: it gets
                // the tap as a descriptor.
                Some(fd) => format!("tap,id=net{i},fd={fd}"),
                None => format!("tap,id=net{i},ifname={},script=no,downscript=no", n.tap),
            });
            push("-device");
            let mtu = match n.mtu {
                Some(m) if m != 1500 => format!(",host_mtu={m}"),
                _ => String::new(),
            };
            push(&format!("virtio-net-pci,netdev=net{i},mac={}{mtu}", n.mac));
        }
        // Appended to (O_APPEND), so that the daemon can rotate the console
        // log under the running VMM.
        push("-chardev");
        push(&format!(
            "file,id=console,path={},append=on",
            path(&cfg.console_log).replace(',', ",,")
        ));
        push("-serial");
        push("chardev:console");
        push("-qmp");
        push(&format!(
            "unix:{},server=on,wait=off",
            path(&cfg.api_sock).replace(',', ",,")
        ));
        a
    }
}

impl Vmm for Qemu {
    fn kind(&self) -> VmmKind {
        VmmKind::Qemu
    }

    fn accel(&self) -> &str {
        &self.accel
    }

    fn spawn(&self, cfg: &VmConfig) -> Result<VmmProcess, VmmError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            let vm = cfg.name.clone();
            move |source| VmmError::Io {
                vmm: "qemu".into(),
                vm,
                path,
                source,
            }
        };
        let log = File::create(&cfg.vmm_log).map_err(io(&cfg.vmm_log))?;
        let log2 = log.try_clone().map_err(io(&cfg.vmm_log))?;
        let mut cmd = Command::new(&self.binary);
        cfg.confine
            .apply(&mut cmd)
            .map_err(|source| VmmError::Confine {
                vmm: "qemu".into(),
                vm: cfg.name.clone(),
                source,
            })?;
        // The taps' descriptors stay open across exec (under the numbers
        // the command line names).
        banger_host::confine::inherit_fds(
            &mut cmd,
            cfg.nics
                .iter()
                .filter_map(|n| n.fd)
                .chain(cfg.ram_fd)
                .collect(),
        );
        // A session of its own (so a group of its own: a signal to the
        // daemon's group, a Ctrl-C on a foreground daemon, does not reach
        // the guests). Not only a group: a group in the daemon's session
        // is orphaned when the daemon dies, and the kernel then sends a
        // stopped (`vm pause`d) member SIGHUP, which QEMU dies of.
        // SAFETY: setsid(2) is async-signal-safe; nothing else runs here.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()
                    .map(drop)
                    .map_err(std::io::Error::from)
            });
        }
        let child = cmd
            .args(self.args(cfg))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|source| VmmError::Spawn {
                vmm: self.binary.clone(),
                vm: cfg.name.clone(),
                source,
            })?;
        Ok(VmmProcess {
            pid: child.id() as i32,
            child: Some(child),
        })
    }

    fn request_shutdown(&self, api_sock: &Path) -> Result<(), VmmError> {
        qmp::send_ctrl_alt_del(api_sock)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Disk, Nic};

    fn cfg() -> VmConfig {
        VmConfig {
            name: "hello".into(),
            vcpus: 2,
            memory_mib: 1024,
            kernel: "/img/vmlinux".into(),
            initrd: "/vm/initrd.img".into(),
            cmdline: "console=ttyS0 quiet".into(),
            disks: vec![
                Disk {
                    id: "root".into(),
                    path: "/vm/root.qcow2".into(),
                    format: "qcow2".into(),
                    read_only: false,
                },
                Disk {
                    id: "work".into(),
                    path: "/vm/a,b/work.ext4".into(),
                    format: "raw".into(),
                    read_only: false,
                },
            ],
            nics: vec![Nic {
                tap: "bgtap0".into(),
                mac: "06:00:ac:1e:00:06".into(),
                fd: None,
                mtu: None,
            }],
            console_log: "/vm/console.log".into(),
            vmm_log: "/vm/vmm.log".into(),
            api_sock: "/run/vm/api.sock".into(),
            vsock: None,
            shares: Vec::new(),
            confine: Default::default(),
            jail: None,
            ram_fd: None,
            incoming: false,
        }
    }

    fn joined(q: &Qemu) -> String {
        line(q, &cfg())
    }

    /// The command line for `c`, as one string.
    fn line(q: &Qemu, c: &crate::VmConfig) -> String {
        q.args(c)
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn command_line() {
        let s = joined(&Qemu::new(false));
        assert!(s.contains("-accel tcg,tb-size=256 -M pc,usb=off"), "{s}");
        assert!(s.contains("-cpu max"), "{s}");
        assert!(s.contains("-smp 2 -m 1024M"), "{s}");
        assert!(
            s.contains("-kernel /img/vmlinux -initrd /vm/initrd.img"),
            "{s}"
        );
        assert!(
            s.contains("file=/vm/root.qcow2,if=none,id=root,format=qcow2"),
            "{s}"
        );
        assert!(s.contains("file=/vm/a,,b/work.ext4"), "commas escaped: {s}");
        assert!(
            s.contains("tap,id=net0,ifname=bgtap0,script=no,downscript=no"),
            "{s}"
        );
        assert!(
            s.contains("mac=06:00:ac:1e:00:06 "),
            "no host_mtu at 1500: {s}"
        );
        // A pod network's MTU reaches the guest's NIC.
        let mut c = cfg();
        c.nics[0].mtu = Some(1450);
        let s = line(&Qemu::new(false), &c);
        assert!(s.contains("mac=06:00:ac:1e:00:06,host_mtu=1450 "), "{s}");
        assert!(
            s.contains(
                "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
            ),
            "{s}"
        );
        let mut f = cfg();
        f.nics[0].fd = Some(7);
        let fd = line(&Qemu::new(false), &f);
        assert!(fd.contains("-netdev tap,id=net0,fd=7 "), "{fd}");
        assert!(!fd.contains("ifname="), "{fd}");
        assert!(
            s.contains(
                "-chardev file,id=console,path=/vm/console.log,append=on -serial chardev:console"
            ),
            "{s}"
        );
        assert!(
            s.contains("-qmp unix:/run/vm/api.sock,server=on,wait=off"),
            "{s}"
        );
        // The root disk comes first so that it is /dev/vda.
        assert!(s.find("id=root").unwrap() < s.find("id=work").unwrap());
        let k = joined(&Qemu::new(true));
        assert!(
            k.contains("-accel kvm -M pc") && k.contains("-cpu host"),
            "{k}"
        );
        assert!(
            !s.contains("memory-backend"),
            "no shared memory without vsock: {s}"
        );

        let mut c = cfg();
        c.vsock = Some(crate::Vsock {
            cid: 9,
            uds_path: "/run/vm/vsock.sock".into(),
            backend: "/run/vm/vhost,vsock.sock".into(),
            serial: false,
        });
        let v = line(&Qemu::new(false), &c);
        assert!(
            v.contains("-M pc,usb=off,vmport=off,memory-backend=mem"),
            "{v}"
        );
        assert!(
            v.contains("-object memory-backend-memfd,id=mem,size=1024M,share=on"),
            "{v}"
        );
        assert!(
                        v.contains("-chardev socket,id=vsock,path=/run/vm/vhost,,vsock.sock -device vhost-user-vsock-pci,chardev=vsock"),
            "{v}"
        );

        // The channel on a virtio-serial port: no shared memory (nothing
        // vhost-user), port 1 named for the agent, a chardev that
        // reconnects.
        c.vsock = Some(crate::Vsock {
            cid: 9,
            uds_path: "/run/vm/vsock.sock".into(),
            backend: "/run/vm/v,port.sock".into(),
            serial: true,
        });
        let p = line(&Qemu::new(false), &c);
        assert!(
            !p.contains("memory-backend") && !p.contains("vhost-user"),
            "{p}"
        );
        assert!(
            p.contains(
                "-device virtio-serial-pci,id=vser0,max_ports=2 \
                 -chardev socket,id=agent,path=/run/vm/v,,port.sock,reconnect=1 \
                 -device virtserialport,bus=vser0.0,nr=1,chardev=agent,name=org.banger.agent"
            ),
            "{p}"
        );
        // A RAM file of its own (what a snapshot copies), by the
        // descriptor it inherits; a restore waits for the saved state.
        let mut r = c.clone();
        r.ram_fd = Some(9);
        r.incoming = true;
        let rf = line(&Qemu::new(false), &r);
        assert!(
            rf.contains("-M pc,usb=off,vmport=off,memory-backend=mem")
                && rf.contains(
                    "-object memory-backend-file,id=mem,size=1024M,mem-path=/proc/self/fd/9,share=on"
                )
                && rf.contains("-incoming defer")
                && !rf.contains("memfd"),
            "{rf}"
        );
        assert!(!p.contains("-incoming"), "{p}");
        // A mount's vhost-user-fs still shares the memory.
        c.shares.push(crate::FsShare {
            tag: "m0".into(),
            socket: "/run/vm/fs0.sock".into(),
        });
        let m = line(&Qemu::new(false), &c);
        assert!(
            m.contains("-M pc,usb=off,vmport=off,memory-backend=mem"),
            "{m}"
        );
    }

    #[test]
    fn the_real_qemu_accepts_the_command_line() {
        // QEMU parses its whole command line before it opens anything; a
        // missing kernel is the first thing it trips on, which proves every
        // option before it was understood.
        let q = Qemu::new(false);
        if banger_host::cmd::which(QEMU_BINARY).is_none() {
            panic!("{QEMU_BINARY} is required: run ./scripts/install-deps.sh");
        }
        let d = tempfile::tempdir().unwrap();
        let mut c = cfg();
        c.kernel = d.path().join("missing-vmlinux");
        c.console_log = d.path().join("console.log");
        c.api_sock = d.path().join("api.sock");
        c.vmm_log = d.path().join("vmm.log");
        c.disks.clear();
        c.nics.clear();
        let out = Command::new(QEMU_BINARY).args(q.args(&c)).output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("missing-vmlinux"), "{err}");
        // With the agent's virtio-serial port (its helper not there: the
        // chardev reconnects, which is no error).
        c.vsock = Some(crate::Vsock {
            cid: 3,
            uds_path: d.path().join("v.sock"),
            backend: d.path().join("port.sock"),
            serial: true,
        });
        let out = Command::new(QEMU_BINARY).args(q.args(&c)).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("missing-vmlinux"), "{err}");
    }
}
