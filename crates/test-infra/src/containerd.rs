//! A containerd of the test's own (Debian's package), inside the
//! instance's network and mount namespace, with its own root, state and
//! sockets (never the host's), its runtimes found on a PATH that starts
//! with the workspace's binaries; and OCI image tarballs the tests build
//! (no registry).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::Instance;

/// containerd and what it runs for one test.
pub struct Containerd {
    dir: PathBuf,
    /// banger's runtime's pod directories (`<runtime>/containerd`).
    pods: PathBuf,
    child: Option<Child>,
    bin_dir: PathBuf,
    log: PathBuf,
}

/// How long containerd may take to answer after its start.
const UP_WITHIN: Duration = Duration::from_secs(60);

impl Containerd {
    /// Starts it in `inst`'s namespaces; runtimes are looked for first in
    /// `bin_dir` (where `containerd-shim-banger-v2` was built), and reach
    /// `inst`'s daemon.
    pub fn start(inst: &Instance, bin_dir: &Path) -> Containerd {
        Containerd::start_with(inst, bin_dir, false)
    }

    /// With the CRI plugin and a CNI network (`cni/10-banger-test.conflist`):
    /// Debian's bridge plugin, a bridge `bgtcni0` in the instance's
    /// namespace at `<subnet>.1` with an MTU of 1400 (not Ethernet's, so
    /// that its reaching the guest shows), host-local addresses out of
    /// `<subnet>.0/24` (kept in the instance's dir), a default route
    /// through the bridge, no masquerade: nothing leaves the namespace.
    pub fn start_with_cni(inst: &Instance, bin_dir: &Path, subnet: &str) -> Containerd {
        let dir = inst.dir().join("containerd");
        std::fs::create_dir_all(dir.join("cni")).expect("mkdir containerd cni dir");
        let ipam = dir.join("cni-ipam");
        let conflist = format!(
            r#"{{"cniVersion": "0.4.0", "name": "banger-test", "plugins": [{{
  "type": "bridge", "bridge": "bgtcni0", "isGateway": true, "ipMasq": false, "mtu": 1400,
  "ipam": {{"type": "host-local", "dataDir": "{}",
    "ranges": [[{{"subnet": "{subnet}.0/24", "gateway": "{subnet}.1"}}]],
    "routes": [{{"dst": "0.0.0.0/0"}}]}}}}]}}"#,
            ipam.display()
        );
        std::fs::write(dir.join("cni/10-banger-test.conflist"), conflist)
            .expect("write the CNI network");
        Containerd::start_with(inst, bin_dir, true)
    }

    /// [`Containerd::start`], with its CRI plugin (Kubernetes' API) on
    /// when `cri`: runtime handler `banger` is banger's, the sandbox
    /// image `banger.test/pause:1` (the test imports it into `k8s.io`),
    /// CNI from Debian's plugins with a config dir of its own (empty:
    /// host-network pods need none).
    pub fn start_with(inst: &Instance, bin_dir: &Path, cri: bool) -> Containerd {
        let dir = inst.dir().join("containerd");
        std::fs::create_dir_all(dir.join("cni")).expect("mkdir containerd dir");
        let d = dir.display();
        let disabled_cri = if cri {
            ""
        } else {
            r#""io.containerd.grpc.v1.cri", "#
        };
        let cri_config = if cri {
            format!(
                r#"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "banger.test/pause:1"
  disable_apparmor = true
  enable_selinux = false
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.banger]
      runtime_type = "io.containerd.banger.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni"
"#
            )
        } else {
            String::new()
        };
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = [{disabled_cri}"io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[debug]
  level = "debug"
[metrics]
  address = ""
{cri_config}"#
        );
        std::fs::write(dir.join("config.toml"), config).expect("write containerd config");
        let mut me = Containerd {
            dir: dir.clone(),
            pods: inst.runtime().join("containerd"),
            child: None,
            bin_dir: bin_dir.to_path_buf(),
            log: dir.join("containerd.log"),
        };
        me.spawn(inst);
        me
    }

    /// Starts containerd again after [`Containerd::stop`]: it finds the
    /// shims it left running.
    pub fn restart(&mut self, inst: &Instance) {
        self.stop();
        self.spawn(inst);
    }

    fn spawn(&mut self, inst: &Instance) {
        let dir = self.dir.clone();
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open containerd log");
        let me = self;
        let mut cmd = inst.net.cmd("containerd");
        cmd.arg("--config").arg(dir.join("config.toml"));
        cmd.env(
            "PATH",
            format!(
                "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                me.bin_dir.display()
            ),
        );
        cmd.envs(inst.env().iter().map(|(k, v)| (k, v)));
        cmd.env("BANGER_STATE_DIR", inst.state())
            .env("BANGER_RUNTIME_DIR", inst.runtime());
        let err = log_file.try_clone().expect("dup containerd log");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log_file))
            .stderr(Stdio::from(err));
        me.child = Some(cmd.spawn().expect("spawn containerd"));
        let up = crate::wait_until(UP_WITHIN, || {
            me.try_ctr(inst, &["version"])
                .map(|o| o.status.success())
                .unwrap_or(false)
        });
        assert!(
            up,
            "containerd did not answer within {UP_WITHIN:?}; its log:\n{}",
            me.log_text()
        );
    }

    /// The ctr command against this containerd (namespace `default`).
    pub fn ctr_cmd(&self, inst: &Instance, args: &[&str]) -> Command {
        self.ctr_cmd_in(inst, "default", args)
    }

    /// The ctr command against this containerd, in containerd namespace
    /// `namespace` (`k8s.io` is CRI's).
    pub fn ctr_cmd_in(&self, inst: &Instance, namespace: &str, args: &[&str]) -> Command {
        let mut c = inst.net.cmd("ctr");
        c.arg("--address")
            .arg(self.dir.join("containerd.sock"))
            .arg("--namespace")
            .arg(namespace)
            .args(args);
        c
    }

    /// Runs ctr in containerd namespace `namespace` to its end (bounded).
    pub fn ctr_in(&self, inst: &Instance, namespace: &str, args: &[&str]) -> Output {
        let child = self
            .ctr_cmd_in(inst, namespace, args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ctr");
        crate::bounded::wait_output(child)
    }

    fn try_ctr(&self, inst: &Instance, args: &[&str]) -> std::io::Result<Output> {
        let child = self
            .ctr_cmd(inst, args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        Ok(crate::bounded::wait_output(child))
    }

    /// Runs ctr to its end (bounded), stdin closed.
    pub fn ctr(&self, inst: &Instance, args: &[&str]) -> Output {
        self.try_ctr(inst, args).expect("spawn ctr")
    }

    /// What containerd (and the shims, through it) logged.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The bundle of task `id` of containerd namespace `namespace`.
    pub fn bundle(&self, namespace: &str, id: &str) -> PathBuf {
        self.dir
            .join("state/io.containerd.runtime.v2.task")
            .join(namespace)
            .join(id)
    }

    /// Where the shim of pod `grouping` (a container's id, for a
    /// container alone) of containerd namespace `namespace` serves: the
    /// path containerd's shim crate derives (a hash of the containerd
    /// socket, the namespace and the grouping, under /run/containerd/s).
    pub fn shim_socket(&self, namespace: &str, grouping: &str) -> PathBuf {
        use sha2::{Digest, Sha256};
        let key = self.socket().join(namespace).join(grouping);
        let hash: String = Sha256::digest(key.display().to_string().as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Path::new("/run/containerd/s").join(hash)
    }

    /// The containerd's socket path: shims name it on their command line.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    /// Shim processes serving this containerd.
    pub fn shims(&self) -> Vec<(i32, String)> {
        let sock = self.socket().display().to_string();
        crate::processes_naming(&sock)
            .into_iter()
            .filter(|(_, c)| c.contains("containerd-shim") && c.contains(&sock))
            .collect()
    }

    /// Asserts that nothing of banger's runtime is left: no shim, no VM
    /// of the instance, no pod directory or mount under
    /// `<runtime>/containerd` (in the namespace containerd runs in), and
    /// the instance's baseline.
    pub fn assert_clean(&self, inst: &Instance) {
        assert!(
            crate::wait_until(Duration::from_secs(30), || self.shims().is_empty()),
            "shims left: {:?}",
            self.shims()
        );
        let ls = crate::ok(&inst.banger(&["vm", "ls"]), "vm ls");
        assert_eq!(ls.lines().count(), 1, "no VM but the header: {ls}");
        // A dead shim's pod dir goes with containerd's cleanup of it
        // (`shim delete`), which runs on containerd's side of the shim's
        // death, after the VM (its lease ended with the shim) is gone:
        // waited for.
        let pod_dirs = || -> Vec<PathBuf> {
            std::fs::read_dir(&self.pods)
                .map(|d| d.flatten().map(|e| e.path()).collect())
                .unwrap_or_default()
        };
        crate::wait_until(Duration::from_secs(30), || pod_dirs().is_empty());
        let left = pod_dirs();
        assert!(left.is_empty(), "pod dirs left: {left:?}");
        let mounts = crate::ok(
            &inst
                .net
                .cmd("cat")
                .arg("/proc/self/mountinfo")
                .output()
                .expect("cat mountinfo"),
            "mountinfo",
        );
        let under = format!("{}/", self.pods.display());
        let left: Vec<&str> = mounts
            .lines()
            .filter(|l| l.split(' ').nth(4).is_some_and(|p| p.starts_with(&under)))
            .collect();
        assert!(left.is_empty(), "mounts left: {left:?}");
        inst.assert_baseline();
    }

    /// Stops containerd (its shims go on, as a restart leaves them).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            if crate::bounded::wait_within(&mut child, Duration::from_secs(30)).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Snapshots containerd left mounted (a test that failed midway),
        // in its mount namespace, while it is there to enter.
        if let Some(pid) = self.child.as_ref().map(Child::id) {
            let mounts =
                std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_default();
            let dirs = [
                format!("{}/", self.dir.display()),
                format!("{}/", self.pods.display()),
            ];
            let mut points: Vec<&str> = mounts
                .lines()
                .filter_map(|l| l.split(' ').nth(4))
                .filter(|p| dirs.iter().any(|d| p.starts_with(d.as_str())))
                .collect();
            points.sort_by_key(|p| std::cmp::Reverse(p.len()));
            for p in points {
                let _ = Command::new("nsenter")
                    .arg(format!("--mount=/proc/{pid}/ns/mnt"))
                    .args(["umount", "-l", p])
                    .status();
            }
        }
        self.stop();
        let shims = self.shims();
        for (pid, _) in &shims {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        // Not our children (containerd's, reparented): gone when /proc
        // says so.
        let _ = crate::wait_until(Duration::from_secs(10), || self.shims().is_empty());
    }
}

/// An OCI image layout tarball at `out` named `name` (containerd's
/// `io.containerd.image.name`): Debian's static busybox as /bin/sh and
/// its applets, an /etc/passwd with root and `app` (1000:1000, home
/// /home/app), and `user` as the image's user when given.
pub fn busybox_image(work: &Path, name: &str, user: Option<&str>, out: &Path) {
    busybox_image_with(work, name, user, &["/bin/sh"], out)
}

/// [`busybox_image`] whose command is `cmd` (a pause image's
/// `sleep 2147483647`, say).
pub fn busybox_image_with(work: &Path, name: &str, user: Option<&str>, cmd: &[&str], out: &Path) {
    use sha2::{Digest, Sha256};
    let tree = work.join("tree");
    let _ = std::fs::remove_dir_all(&tree);
    for d in [
        "bin", "etc", "home/app", "tmp", "proc", "sys", "dev", "root",
    ] {
        std::fs::create_dir_all(tree.join(d)).expect("mkdir image tree");
    }
    std::fs::copy("/bin/busybox", tree.join("bin/busybox")).expect("copy busybox");
    for applet in [
        "sh", "cat", "echo", "env", "id", "pwd", "sleep", "ls", "wc", "stty", "true", "false",
        "kill", "ps", "hostname", "head", "trap", "ip", "httpd", "wget", "mkdir",
    ] {
        std::os::unix::fs::symlink("busybox", tree.join("bin").join(applet)).expect("applet link");
    }
    std::fs::write(
        tree.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
    )
    .expect("passwd");
    std::fs::write(
        tree.join("etc/group"),
        "root:x:0:\napp:x:1000:\nextra:x:1500:app\n",
    )
    .expect("group");
    let status = Command::new("chown")
        .args(["1000:1000"])
        .arg(tree.join("home/app"))
        .status()
        .expect("chown");
    assert!(status.success());
    let layout = work.join("layout");
    let _ = std::fs::remove_dir_all(&layout);
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("mkdir blobs");
    let layer = work.join("layer.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(&tree)
        .args(["--owner=0", "--group=0", "--numeric-owner", "-cf"])
        .arg(&layer)
        .arg(".")
        .status()
        .expect("tar the layer");
    assert!(status.success(), "tar the layer");
    let put = |bytes: &[u8]| -> (String, usize) {
        let d: String = Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        std::fs::write(blobs.join(&d), bytes).expect("write blob");
        (d, bytes.len())
    };
    let (dl, nl) = put(&std::fs::read(&layer).expect("read layer"));
    let user_field = user
        .map(|u| format!(r#""User":"{u}","#))
        .unwrap_or_default();
    let cmd = serde_json::to_string(cmd).expect("the command as JSON");
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{{user_field}"Env":["PATH=/bin","FROM_IMAGE=yes"],"Cmd":{cmd}}},"rootfs":{{"type":"layers","diff_ids":["sha256:{dl}"]}}}}"#
    );
    let (dc, nc) = put(config.as_bytes());
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{dc}","size":{nc}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:{dl}","size":{nl}}}]}}"#
    );
    let (dm, nm) = put(manifest.as_bytes());
    std::fs::write(
        layout.join("index.json"),
        format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{dm}","size":{nm},"annotations":{{"io.containerd.image.name":"{name}","org.opencontainers.image.ref.name":"{name}"}}}}]}}"#
        ),
    )
    .expect("index.json");
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .expect("oci-layout");
    let status = Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(out)
        .arg(".")
        .status()
        .expect("tar the layout");
    assert!(status.success(), "tar the layout");
}
