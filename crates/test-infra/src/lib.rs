//! Fixtures for tests that create taps, NAT rules and guests. Every such
//! test runs its daemon inside a network namespace it created, with a veth
//! "uplink" to a second namespace that plays the outside world; nothing is
//! sent off the machine and the root namespace is never touched. `Drop`
//! tears it all down (daemon, namespaces, temp dirs).

pub mod bounded;
pub mod containerd;
mod double;
pub mod e2b;
pub mod fcspec;
mod gate;
mod netns;
pub mod users;
mod xfs;

pub use gate::Gate;
pub use netns::NetNs;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Where `scripts/test.sh` leaves the prebuilt default image. Tests never
/// build images themselves: that would download packages.
pub fn image_cache() -> PathBuf {
    std::env::var_os("BANGER_TEST_IMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!(
                "BANGER_TEST_IMAGE is not set: run the tests through scripts/test.sh, \
                 which builds the image (scripts/test-image.sh) and sets it"
            )
        })
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Says, loudly, that a test (or part of one) cannot run on this host and
/// why: on stderr, and in the file `BANGER_TEST_NOT_RUN` names, which
/// `scripts/test.sh` lists at the end of the run.
pub fn not_run_here(what: &str, why: &str) {
    eprintln!("NOT RUN HERE: {what}: {why}");
    if let Some(f) = std::env::var_os("BANGER_TEST_NOT_RUN") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(f)
        {
            let _ = writeln!(f, "{what}: {why}");
        }
    }
}

pub fn require_root() {
    if !nix_is_root() {
        panic!(
            "this test needs root (network namespaces, taps, nftables, QEMU guests): \
             run it through scripts/test.sh as root"
        );
    }
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// A DNS resolver a test runs in a namespace of its own (the stand-in for
/// an upstream or a host's loopback stub): answers `name` with `ip`, every
/// other name with NXDOMAIN. Stops when dropped.
#[derive(Debug)]
pub struct DnsStub {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl DnsStub {
    pub fn start(
        ns: &str,
        addr: std::net::SocketAddr,
        name: &str,
        ip: std::net::Ipv4Addr,
    ) -> DnsStub {
        use hickory_proto::op::{Message, ResponseCode};
        use hickory_proto::rr::rdata::A;
        use hickory_proto::rr::{RData, Record};
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let (ns, name) = (ns.to_string(), name.to_lowercase());
        std::thread::spawn(move || {
            let path = format!("/run/netns/{ns}");
            let f = std::fs::File::open(&path).expect("open netns");
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let sock = std::net::UdpSocket::bind(addr).expect("bind the DNS stub");
            sock.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let _ = ready_tx.send(());
            let mut buf = [0u8; 1500];
            while !flag.load(Ordering::SeqCst) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let Ok(q) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let mut r = Message::response(q.metadata.id, q.metadata.op_code);
                r.metadata.recursion_available = true;
                r.add_queries(q.queries.clone());
                match q.queries.first() {
                    Some(query)
                        if query.name().to_lowercase().to_ascii().trim_end_matches('.') == name =>
                    {
                        r.add_answer(Record::from_rdata(
                            query.name().clone(),
                            60,
                            RData::A(A(ip)),
                        ));
                    }
                    _ => r.metadata.response_code = ResponseCode::NXDomain,
                }
                if let Ok(b) = r.to_vec() {
                    let _ = sock.send_to(&b, from);
                }
            }
        });
        ready
            .recv_timeout(Duration::from_secs(10))
            .expect("the DNS stub started");
        DnsStub { stop }
    }
}

impl Drop for DnsStub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// A server in the outside namespace, killed on drop.
#[derive(Debug)]
pub struct HttpServer {
    child: std::process::Child,
}

impl HttpServer {
    /// Guards a server the test started itself.
    pub fn from_child(child: std::process::Child) -> HttpServer {
        HttpServer { child }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An isolated banger instance: its own state and runtime dirs, its daemon
/// inside a `NetNs`, the prebuilt image linked in.
#[derive(Debug)]
pub struct Instance {
    pub net: NetNs,
    pub dir: tempfile::TempDir,
    pub banger: PathBuf,
    /// Environment for banger and the daemon it starts (`with_env`).
    env: Vec<(String, String)>,
    /// The namespace's ip_forward when it was made (a new namespace takes
    /// the host's: 1 while the host's own banger runs a VM).
    forward0: String,
    /// The state dir is an XFS filesystem on a loop device, unmounted on
    /// drop (`on_xfs`).
    xfs: bool,
}

impl Instance {
    pub fn new(banger: &Path) -> Instance {
        // What a new namespace takes (the host's), read here: a command
        // in the namespace now would fix its mount namespace before
        // `on_xfs` mounts the state dir.
        let forward0 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let net = NetNs::new();
        let dir = tempfile::Builder::new()
            .prefix("banger-test-")
            .tempdir_in("/var/tmp")
            .expect("tempdir");
        // VMMs run as users of their own and pass through here (search
        // only) to their VM's files.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))
                .expect("chmod instance dir");
        }
        // Its VMs' cgroups under a parent of its own (gone with its last VM).
        let cgroup_parent = cgroup_parent_of(dir.path());
        let ram_dir = ram_dir_of(dir.path());
        let me = Instance {
            net,
            dir,
            banger: banger.to_path_buf(),
            env: vec![
                ("BANGER_CGROUP_PARENT".into(), cgroup_parent),
                // No socket group unless a test makes one (a host's
                // `banger` group is not the tests').
                ("BANGER_SOCKET_GROUP".into(), "banger-test-no-group".into()),
                // The host's /etc/banger/config.toml is not the tests'.
                ("BANGER_CONFIG".into(), "/dev/null".into()),
                // Its VMs' RAM files in a directory of its own (checked
                // for leaks, removed on drop).
                ("BANGER_RAM_DIR".into(), ram_dir),
                // Cold boots: what a test of booting means. The warm
                // start's tests turn it on (`with_env`, which comes after).
                ("BANGER_WARM_CACHE".into(), "0".into()),
            ],
            xfs: false,
            forward0,
        };
        std::fs::create_dir_all(me.state().join("images")).expect("mkdir images");
        me
    }

    /// The environment banger and its daemon get (`with_env` and the
    /// instance's own).
    pub fn env(&self) -> &[(String, String)] {
        &self.env
    }

    /// Sets `key=value` in the environment of banger and of the daemon it
    /// starts (e.g. `BANGER_ROOT_DISK`).
    pub fn with_env(mut self, key: &str, value: &str) -> Instance {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Links the prebuilt default image into this instance's state dir
    /// (copies it, reflinked where it can, onto another filesystem).
    pub fn with_image(self) -> Instance {
        let link = !self.xfs;
        self.image_linked(link)
    }

    /// The instance's image as an older banger built it: its initramfs
    /// without the `banger-vport` marker, so that QEMU VMs keep the vsock
    /// device and `vhost-device-vsock` (a new file: the cached image it is
    /// linked to stays as it is).
    pub fn strip_vport_marker(&self) {
        let initrd = self.state().join("images/bookworm/initrd.img");
        let bytes = std::fs::read(&initrd).expect("read the image's initramfs");
        let marker = b"banger-vport\0";
        let at = bytes
            .windows(marker.len())
            .position(|w| w == marker)
            .expect("the test image's initramfs has the marker");
        let mut old = bytes.clone();
        old[at..at + marker.len()].copy_from_slice(b"banger-vpor_\0");
        let tmp = initrd.with_extension("new");
        std::fs::write(&tmp, &old).expect("write the initramfs");
        std::fs::rename(&tmp, &initrd).expect("rename the initramfs");
    }

    /// The prebuilt image copied, never hard-linked: for a build whose
    /// daemon must not share the image's inodes (their modes and ACLs)
    /// with this tree's (`bench --compare` of an older revision).
    pub fn with_image_copied(self) -> Instance {
        self.image_linked(false)
    }

    fn image_linked(self, link: bool) -> Instance {
        let cache = image_cache();
        if !cache.join("manifest.json").is_file() {
            panic!(
                "no prebuilt test image at {}: scripts/test.sh builds it before the tests \
                 (or set BANGER_TEST_IMAGE to an image dir)",
                cache.display()
            );
        }
        // A copy takes no ACL along (a grant of a VM running elsewhere).
        let flags: &[&str] = if link {
            &["-al"]
        } else {
            &[
                "-R",
                "--preserve=mode,ownership,timestamps",
                "--reflink=auto",
            ]
        };
        let st = Command::new("cp")
            .args(flags)
            .arg(&cache)
            .arg(self.state().join("images").join("bookworm"))
            .status()
            .expect("cp");
        assert!(st.success(), "link the test image");
        self
    }

    /// The cgroup directories of this instance's VMs' parent (none exist
    /// once its last VM is gone).
    pub fn cgroup_parents(&self) -> Vec<PathBuf> {
        let name = cgroup_parent_of(self.dir.path());
        let c = banger_host::cgroup::Cgroups::detect(Some(&name)).expect("cgroups");
        c.dirs("x")
            .into_iter()
            .filter_map(|d| d.parent().map(Path::to_path_buf))
            .collect()
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn runtime(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    /// `banger ARGS` inside the namespace, against this instance.
    pub fn banger(&self, args: &[&str]) -> Output {
        bounded::output_within(
            self.banger_cmd(args).stdin(Stdio::null()),
            bounded::COMMAND_LIMIT,
        )
    }

    /// `banger ARGS` inside the namespace, in the background, its output
    /// piped.
    pub fn spawn(&self, args: &[&str]) -> std::process::Child {
        let mut c = self.banger_cmd(args);
        // Tests interrupt it with SIGINT as a terminal's Ctrl-C would: a
        // suite started in the background of a non-interactive shell
        // (`./scripts/test.sh &`) hands its children SIGINT ignored.
        // SAFETY: signal(2) is async-signal-safe; nothing else runs between
        // fork and exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            c.pre_exec(|| {
                nix::sys::signal::signal(
                    nix::sys::signal::Signal::SIGINT,
                    nix::sys::signal::SigHandler::SigDfl,
                )
                .map(drop)
                .map_err(std::io::Error::from)
            });
        }
        c.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn banger")
    }

    /// `banger ARGS` started directly, in the caller's namespace (see
    /// `NetNs::enter_on_this_thread`).
    pub fn banger_direct(&self, args: &[&str]) -> Output {
        bounded::output_within(
            Command::new(&self.banger)
                .arg("--state-dir")
                .arg(self.state())
                .arg("--runtime-dir")
                .arg(self.runtime())
                .args(args)
                .stdin(Stdio::null()),
            bounded::COMMAND_LIMIT,
        )
    }

    /// `program` inside the namespace with `user`'s ids (setpriv: its uid,
    /// its group and its supplementary groups).
    fn as_user(&self, user: &users::TestUser, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = self.net.cmd("setpriv");
        c.arg(format!("--reuid={}", user.uid))
            .arg(format!("--regid={}", user.gid))
            .arg("--init-groups")
            .arg("--")
            .arg(program);
        c
    }

    /// `banger ARGS` inside the namespace as `user` (setpriv: its uid, its
    /// group and its supplementary groups, HOME its home), against this
    /// instance.
    pub fn banger_as(&self, user: &users::TestUser, args: &[&str]) -> Output {
        let mut c = self.banger_as_cmd(user, args);
        c.stdin(Stdio::null());
        bounded::output_within(&mut c, bounded::COMMAND_LIMIT)
    }

    /// The command `banger_as` runs, to start in the background.
    pub fn banger_as_cmd(&self, user: &users::TestUser, args: &[&str]) -> Command {
        let mut c = self.as_user(user, &self.banger);
        c.envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("HOME", user.home.path())
            .env("USER", &user.name)
            .arg("--state-dir")
            .arg(self.state())
            .arg("--runtime-dir")
            .arg(self.runtime())
            .args(args);
        c
    }

    /// One raw request line on the daemon's socket, sent by `user` (socat
    /// run with their ids), as a client that skips the CLI would: the
    /// reply line, parsed.
    pub fn raw_request_as(&self, user: &users::TestUser, line: &str) -> serde_json::Value {
        use std::io::Write;
        let mut c = self.as_user(user, "socat");
        c.arg("-t30")
            .arg("-")
            .arg(format!(
                "UNIX-CONNECT:{}",
                self.runtime().join("bangerd.sock").display()
            ))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().expect("socat");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(format!("{line}\n").as_bytes())
            .expect("write the request");
        let out = child.wait_with_output().expect("socat");
        let text = String::from_utf8_lossy(&out.stdout);
        let last = text.lines().last().unwrap_or("");
        serde_json::from_str(last).unwrap_or_else(|e| {
            panic!(
                "reply {text:?} ({e}); socat: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// socat connected to the daemon's socket as `user`, inside the
    /// namespace: a client that skips the CLI (its stdin is the request;
    /// it exits a second after the daemon ends the connection).
    pub fn socket_as(&self, user: &users::TestUser) -> Command {
        let mut c = self.as_user(user, "socat");
        c.arg("-t1").arg("-").arg(format!(
            "UNIX-CONNECT:{}",
            self.runtime().join("bangerd.sock").display()
        ));
        c
    }

    pub fn banger_cmd(&self, args: &[&str]) -> Command {
        self.banger_cmd_in(None, args)
    }

    /// As [`Instance::banger_cmd`], started in `wd` (relative paths in
    /// `args` are the caller's there).
    pub fn banger_cmd_in(&self, wd: Option<&Path>, args: &[&str]) -> Command {
        let mut c = self.net.cmd_in(&self.banger, wd);
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        c.arg("--state-dir")
            .arg(self.state())
            .arg("--runtime-dir")
            .arg(self.runtime())
            .args(args);
        c
    }

    /// The daemon's pid (starting it if needed).
    pub fn daemon_pid(&self) -> i32 {
        let out = self.banger(&["daemon", "ping"]);
        assert!(out.status.success(), "ping: {}", text(&out.stderr));
        text(&out.stdout)
            .split_whitespace()
            .nth(2)
            .and_then(|p| p.trim_end_matches(',').parse().ok())
            .expect("pid in ping output")
    }

    /// Processes whose command line mentions this instance's dirs.
    pub fn processes(&self) -> Vec<(i32, String)> {
        processes_naming(&self.dir.path().to_string_lossy())
    }

    /// The instance's own directory (its state and runtime dirs, and what
    /// a test's fixtures keep beside them).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// SIGKILLs the daemon and waits until its socket refuses connections:
    /// a killed multi-threaded process shows as a zombie while its last
    /// threads still hold the listening socket open.
    pub fn kill_daemon(&self) {
        for (pid, cmd) in self.processes() {
            if cmd.contains("bangerd") {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
        let sock = self.runtime().join("bangerd.sock");
        assert!(
            wait_until(Duration::from_secs(5), || {
                std::os::unix::net::UnixStream::connect(&sock).is_err()
            }),
            "the killed daemon's socket still accepts connections"
        );
    }

    /// Files under the state dir's `vms/` and the runtime dir's `vms/`.
    pub fn vm_files(&self) -> Vec<PathBuf> {
        let mut v = Vec::new();
        // A jailed Firecracker's chroot: `jail/<its binary's name>/<id>`.
        let jails: Vec<PathBuf> = std::fs::read_dir(self.state().join("jail"))
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        for d in [
            self.state().join("vms"),
            self.runtime().join("vms"),
            PathBuf::from(ram_dir_of(self.dir.path())),
        ]
        .into_iter()
        .chain(jails)
        {
            if let Ok(rd) = std::fs::read_dir(&d) {
                v.extend(rd.flatten().map(|e| e.path()));
            }
        }
        v
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.state().join("bangerd.log")).unwrap_or_default();
            eprintln!("---- bangerd.log of the failed test ----\n{log}\n----");
        }
        // VMMs first (they hold taps open), then the daemon; the namespaces
        // go when `net` drops.
        for (pid, _) in self.processes() {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        // Its daemon's image grants (once nothing can make more): the
        // images are hard links of the shared cache, whose inodes outlive
        // the instance.
        for (f, uid) in self.image_grants() {
            let _ = banger_host::acl::revoke(&f, uid);
        }
        // A test that failed half-way may leave its VMs' cgroups (what is
        // in them was killed above) and its daemon's uid claims.
        for parent in self.cgroup_parents() {
            if let Ok(rd) = std::fs::read_dir(&parent) {
                for e in rd.flatten().filter(|e| e.path().is_dir()) {
                    let _ = wait_until(Duration::from_secs(10), || {
                        std::fs::remove_dir(e.path()).is_ok()
                    });
                }
            }
            let _ = std::fs::remove_dir(&parent);
        }
        // The uid claim its daemon left (lock files outlive daemons): gone
        // with the state dir, unless some daemon holds it again or it
        // names another state dir by now.
        if let Some(base) = std::fs::read_to_string(self.state().join("vmm-uid-base"))
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
        {
            let lock = format!("/run/banger-uids/{}.lock", (base + 1) / 16_384 * 16_384);
            let ours = std::fs::canonicalize(self.state())
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            if let Ok(f) = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&lock)
            {
                if let Ok(held) =
                    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
                {
                    let mut who = String::new();
                    let _ = std::io::Read::read_to_string(&mut &*held, &mut who);
                    if who == ours {
                        let _ = std::fs::remove_file(&lock);
                    }
                    drop(held);
                }
            }
        }
        let _ = std::fs::remove_dir_all(ram_dir_of(self.dir.path()));
        if self.xfs {
            // The killed processes' files close as they exit: wait for the
            // filesystem to be free rather than detaching it lazily.
            let state = self.state();
            let done = wait_until(Duration::from_secs(10), || {
                Command::new("umount")
                    .arg(&state)
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            });
            if !done {
                eprintln!("could not unmount {}: unmounting lazily", state.display());
                let _ = Command::new("umount").arg("-l").arg(&state).status();
            }
        }
    }
}

/// The namespace's `net.ipv4.ip_forward`.
fn ip_forward(net: &NetNs) -> String {
    let out = net
        .cmd("cat")
        .arg("/proc/sys/net/ipv4/ip_forward")
        .output()
        .expect("read ip_forward");
    text(&out.stdout).trim().to_string()
}

/// Where an instance's VMs keep their RAM files (a tmpfs).
fn ram_dir_of(dir: &Path) -> String {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
    format!("/dev/shm/{}", name.unwrap_or_default())
}

/// Asserts a command succeeded; returns its stdout.
pub fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

impl Instance {
    /// banger's taps in the daemon's namespace.
    pub fn taps(&self) -> Vec<String> {
        self.net
            .links()
            .into_iter()
            .filter(|l| l.starts_with("bgtap"))
            .collect()
    }

    /// VMM processes of this instance.
    pub fn vmm_processes(&self) -> Vec<(i32, String)> {
        self.processes()
            .into_iter()
            .filter(|(_, c)| c.contains("qemu-system") || c.contains("firecracker"))
            .collect()
    }

    /// Waits (`banger daemon settle`) for the releases the daemon does
    /// after its replies: taps and NAT rules of VMs that ended.
    pub fn settle(&self) {
        ok(&self.banger(&["daemon", "settle"]), "daemon settle");
    }

    /// Whether the guest address `ip` is in banger's firewall (its
    /// `guests` set) in the daemon's namespace.
    pub fn in_firewall(&self, ip: &str) -> bool {
        let rules = self.net.ruleset();
        let Some(i) = rules.find("set guests {") else {
            return false;
        };
        let set = &rules[i..];
        let set = &set[..set.find('}').unwrap_or(set.len())];
        set.contains(&format!("\" . {ip}"))
    }

    /// The guest address of the VM `name` (which must exist).
    pub fn guest_ip(&self, name: &str) -> String {
        self.vm(name)
            .and_then(|v| v["guest_ip"].as_str().map(str::to_string))
            .unwrap_or_else(|| panic!("vm {name} has no address: {:?}", self.vms()))
    }

    /// `vm ls --json`.
    pub fn vms(&self) -> Vec<serde_json::Value> {
        vm_list(&self.banger(&["vm", "ls", "--json"]))
    }

    /// The number in `path` of VM `name`, waited for: a guest process
    /// writing it may not have written it yet, and a read may fall
    /// between a write's truncation and its number.
    pub fn guest_number(&self, name: &str, path: &str) -> u64 {
        let mut last = String::new();
        let mut n = None;
        let seen = wait_until(Duration::from_secs(30), || {
            let out = self.banger(&["vm", "exec", name, "--", "cat", path]);
            last = format!("{}{}", text(&out.stdout), text(&out.stderr));
            n = out
                .status
                .success()
                .then(|| text(&out.stdout).trim().parse::<u64>().ok())
                .flatten();
            n.is_some()
        });
        assert!(seen, "no number in {name}'s {path}: {last}");
        n.unwrap_or_default()
    }

    /// One VM's record as `vm ls --json` shows it.
    pub fn vm(&self, name: &str) -> Option<serde_json::Value> {
        self.vms().into_iter().find(|v| v["name"] == name)
    }

    /// Nothing of any VM is left once released: no VMM, tap, NAT rule, VM
    /// file or row, and ip_forward back to 0.
    pub fn assert_baseline(&self) {
        self.settle();
        assert!(
            self.vmm_processes().is_empty(),
            "VMM left: {:?}",
            self.vmm_processes()
        );
        // Nothing else of the daemon's runs either (vsock backends): no
        // process but the daemon names the instance's state or runtime
        // dir (the test's own outside servers name others).
        let (state, run) = (
            self.state().to_string_lossy().into_owned(),
            self.runtime().to_string_lossy().into_owned(),
        );
        let others: Vec<(i32, String)> = self
            .processes()
            .into_iter()
            .filter(|(_, c)| !c.contains("bangerd") && (c.contains(&state) || c.contains(&run)))
            .collect();
        assert!(others.is_empty(), "processes left: {others:?}");
        assert!(self.taps().is_empty(), "taps left: {:?}", self.taps());
        let rules = self.net.ruleset();
        assert!(
            !rules.contains("table inet banger"),
            "NAT table left:\n{rules}"
        );
        assert_eq!(ip_forward(&self.net), self.forward0, "ip_forward restored");
        assert!(
            self.vm_files().is_empty(),
            "VM files left: {:?}",
            self.vm_files()
        );
        assert!(self.vms().is_empty(), "rows left: {:?}", self.vms());
        let cgroups: Vec<PathBuf> = self
            .cgroup_parents()
            .into_iter()
            .filter(|p| p.exists())
            .collect();
        assert!(cgroups.is_empty(), "cgroups left: {cgroups:?}");
        let grants = self.image_grants();
        assert!(grants.is_empty(), "image grants left: {grants:?}");
    }

    /// The ACL entries on the instance's images that name one of its
    /// daemon's VMM uids (images are hard links shared with other
    /// instances, whose uids are theirs).
    pub fn image_grants(&self) -> Vec<(PathBuf, u32)> {
        let Some(base) = std::fs::read_to_string(self.state().join("vmm-uid-base"))
            .ok()
            .and_then(|b| b.trim().parse::<u64>().ok())
        else {
            return Vec::new();
        };
        let files = std::fs::read_dir(self.state().join("images"))
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
            .map(|f| f.path())
            .filter(|f| f.is_file());
        files
            .flat_map(|f| {
                let users = banger_host::acl::users(&f).unwrap_or_default();
                users.into_iter().map(move |u| (f.clone(), u))
            })
            .filter(|(_, u)| (base..base + 16_384).contains(&u64::from(*u)))
            .collect()
    }
}

/// `banger-test-<the instance dir's random suffix>`.
fn cgroup_parent_of(dir: &Path) -> String {
    let n = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tail: String = n.chars().filter(|c| c.is_ascii_alphanumeric()).collect();
    format!("banger-t-{tail}")
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Live (not zombie) processes whose command line holds `needle`.
pub fn processes_naming(needle: &str) -> Vec<(i32, String)> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) {
                let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
                let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .map(|s| {
                        s.rsplit(')')
                            .next()
                            .unwrap_or("")
                            .trim_start()
                            .starts_with('Z')
                    })
                    .unwrap_or(true);
                if cmd.contains(needle) && !zombie {
                    v.push((pid, cmd));
                }
            }
        }
    }
    v
}

pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// Parses `banger vm ls --json`.
pub fn vm_list(out: &Output) -> Vec<serde_json::Value> {
    assert!(out.status.success(), "vm ls: {}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("vm ls --json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_until_reports_the_outcome() {
        let mut n = 0;
        assert!(wait_until(Duration::from_secs(2), || {
            n += 1;
            n >= 3
        }));
        assert!(!wait_until(Duration::from_millis(50), || false));
    }
}
