//! A namespace pair for one test instance: the daemon's, with a veth
//! "uplink" to a second one that plays the outside world, and the holder
//! process whose mount namespace the daemon's commands run in.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;

use crate::{ip, require_root, HttpServer, NEXT};

/// A namespace pair: `ns` (where bangerd runs) with a default route over a
/// veth to `outside`, which holds the other end at `outside_ip`.
#[derive(Debug)]
pub struct NetNs {
    pub ns: String,
    pub outside: String,
    pub inside_ip: String,
    pub outside_ip: String,
    /// A process whose mount namespace commands in `ns` run in (`cmd`),
    /// started by the first command: mounts the test made before (an XFS
    /// state dir) are in it.
    holder: std::sync::Mutex<Option<std::process::Child>>,
}

impl NetNs {
    pub fn new() -> NetNs {
        require_root();
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}-{n}", std::process::id() % 100_000);
        let ns = format!("bgt-{id}");
        let outside = format!("bgt-{id}-out");
        let octet = (std::process::id() as u32 + n) % 250 + 1;
        let inside_ip = format!("198.18.{octet}.2");
        let outside_ip = format!("198.18.{octet}.1");
        let me = NetNs {
            holder: std::sync::Mutex::new(None),
            ns: ns.clone(),
            outside: outside.clone(),
            inside_ip: inside_ip.clone(),
            outside_ip: outside_ip.clone(),
        };
        ip(&["netns", "add", &ns]);
        ip(&["netns", "add", &outside]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&["-n", &outside, "link", "set", "lo", "up"]);
        ip(&[
            "-n", &ns, "link", "add", "uplink0", "type", "veth", "peer", "name", "world0", "netns",
            &outside,
        ]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{inside_ip}/24"),
            "dev",
            "uplink0",
        ]);
        ip(&[
            "-n",
            &outside,
            "addr",
            "add",
            &format!("{outside_ip}/24"),
            "dev",
            "world0",
        ]);
        ip(&["-n", &ns, "link", "set", "uplink0", "up"]);
        ip(&["-n", &outside, "link", "set", "world0", "up"]);
        ip(&["-n", &ns, "route", "add", "default", "via", &outside_ip]);
        me
    }

    /// A command run inside the daemon's namespace.
    ///
    /// It runs in the mount namespace of the holder (`mount_holder`): the
    /// one `ip netns exec` makes, whose fresh sysfs shows the namespace's
    /// `/sys/class/net`, with the host's cgroup hierarchies mounted again
    /// under `/sys/fs/cgroup`, as a daemon in the host's namespaces sees
    /// them.
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.cmd_in(program, None)
    }

    /// As [`NetNs::cmd`], started in `wd` (entering a mount namespace
    /// moves a process to its root otherwise).
    pub fn cmd_in(
        &self,
        program: impl AsRef<std::ffi::OsStr>,
        wd: Option<&std::path::Path>,
    ) -> Command {
        let pid = {
            let mut h = self.holder.lock().unwrap_or_else(|p| p.into_inner());
            h.get_or_insert_with(|| mount_holder(&self.ns)).id()
        };
        let mut c = Command::new("nsenter");
        c.arg(format!("--mount=/proc/{pid}/ns/mnt"))
            .arg(format!("--net=/run/netns/{}", self.ns));
        if let Some(wd) = wd {
            c.arg(format!("--wd={}", wd.display()));
        }
        c.arg("--").arg(program);
        c
    }

    /// Moves the calling thread into the daemon's namespace (the process's
    /// other threads stay where they are); commands it then spawns start
    /// there directly, without `ip netns exec` (about 2 ms per command here),
    /// which is how the benchmark times the CLI the way a user runs it.
    pub fn enter_on_this_thread(&self) {
        let path = format!("/run/netns/{}", self.ns);
        let f = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("setns {path}: {e}"));
    }

    pub fn outside_cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.outside]).arg(program);
        c
    }

    /// A busybox HTTP server in the outside namespace serving `root` on
    /// `outside_ip:port`; stopped when the guard drops.
    pub fn http_server(&self, root: &Path, port: u16) -> HttpServer {
        let child = self
            .outside_cmd("busybox")
            .args([
                "httpd",
                "-f",
                "-p",
                &format!("{}:{port}", self.outside_ip),
                "-h",
            ])
            .arg(root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("busybox httpd (busybox-static)");
        HttpServer { child }
    }

    /// Interface names in the daemon's namespace.
    pub fn links(&self) -> Vec<String> {
        let out = Command::new("ip")
            .args(["-n", &self.ns, "-o", "link", "show"])
            .output()
            .expect("ip link");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .collect()
    }

    /// Loads an nftables script in the daemon's namespace.
    pub fn nft(&self, script: &str) {
        use std::io::Write;
        let mut nft = self
            .cmd("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("nft");
        nft.stdin
            .take()
            .expect("nft stdin")
            .write_all(script.as_bytes())
            .expect("write the nft script");
        assert!(nft.wait().expect("nft").success(), "nft -f: {script}");
    }

    /// The namespace's nftables ruleset as text.
    pub fn ruleset(&self) -> String {
        let out = self
            .cmd("nft")
            .args(["list", "ruleset"])
            .output()
            .expect("nft");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Default for NetNs {
    fn default() -> Self {
        Self::new()
    }
}

/// A process in namespace `ns` (under `ip netns exec`, which gives it a
/// mount namespace with the namespace's sysfs) that mounts the host's
/// cgroup hierarchies again in that mount namespace (sysfs hid them; a
/// bind from the host's namespace is not allowed, a mount of an existing
/// hierarchy is), says `ready`, and sleeps until the namespace is deleted.
fn mount_holder(ns: &str) -> std::process::Child {
    const SCRIPT: &str = r#"
mount -t tmpfs -o mode=755 cgroup /sys/fs/cgroup
awk '{ split($0, p, " - "); split(p[1], l, " "); split(p[2], r, " ");
       if (r[1] != "cgroup" && r[1] != "cgroup2") next;
       o = ""; n = split(r[3], s, ",");
       for (i = 1; i <= n; i++) if (s[i] != "rw" && s[i] != "ro") o = o (o == "" ? "" : ",") s[i];
       print r[1], l[5], o }' /proc/1/mountinfo |
while read -r t mp o; do
  mkdir -p "$mp"
  if [ -n "$o" ]; then mount -t "$t" -o "$o" "$t" "$mp"; else mount -t "$t" "$t" "$mp"; fi
done
echo ready
exec sleep infinity
"#;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-c", SCRIPT])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the namespace's mount holder");
    let mut line = String::new();
    let out = child.stdout.take().expect("holder stdout");
    std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line)
        .expect("read the holder's ready line");
    assert_eq!(line.trim(), "ready", "the mount holder of {ns} failed");
    child
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let holder = self.holder.get_mut().map(Option::take).unwrap_or(None);
        if let Some(mut h) = holder {
            let _ = h.kill();
            let _ = h.wait();
        }
        // Anything still running in the namespaces dies with them.
        for ns in [&self.ns, &self.outside] {
            let _ = Command::new("ip")
                .args(["netns", "pids", ns])
                .output()
                .map(|o| {
                    for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                        let _ = Command::new("kill").args(["-9", pid]).status();
                    }
                });
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}
