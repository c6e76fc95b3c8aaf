//! The Kubernetes path without a kubelet: a CRI client (Kubernetes' CRI
//! protos over gRPC, as kubelet speaks them) against containerd's CRI
//! plugin, whose runtime handler `banger` is banger's runtime. A pod of
//! two containers: one VM, each container in its own root, exec, status,
//! stop and remove, nothing left (a host-network pod). Then a pod on a
//! CNI network (Debian's bridge plugin): its VM has the pod's IP, which
//! the node reaches, and it reaches the node.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerStatusRequest, CreateContainerRequest,
    ExecSyncRequest, ImageSpec, LinuxPodSandboxConfig, LinuxSandboxSecurityContext, NamespaceMode,
    NamespaceOption, PodSandboxConfig, PodSandboxMetadata, PodSandboxStatusRequest,
    RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest, StopPodSandboxRequest,
};
use test_infra::containerd::{busybox_image, busybox_image_with, Containerd};
use test_infra::{ok, wait_until, Instance};
use tonic::transport::{Channel, Endpoint, Uri};

fn shim_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_containerd-shim-banger-v2"))
}

fn banger_bin() -> PathBuf {
    shim_bin().with_file_name("banger")
}

/// A CRI client on containerd's socket, and the runtime it runs on.
fn cri(socket: &Path) -> (tokio::runtime::Runtime, RuntimeServiceClient<Channel>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let path = socket.to_path_buf();
    let channel = rt
        .block_on(async {
            Endpoint::try_from("http://[::]")
                .unwrap()
                .connect_timeout(Duration::from_secs(30))
                .timeout(Duration::from_secs(300))
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                            tokio::net::UnixStream::connect(path).await?,
                        ))
                    }
                }))
                .await
        })
        .unwrap();
    (rt, RuntimeServiceClient::new(channel))
}

fn pod_config(inst: &Instance, name: &str, network: NamespaceMode) -> PodSandboxConfig {
    let logs = inst.dir().join(format!("pod-logs-{name}"));
    std::fs::create_dir_all(&logs).unwrap();
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: format!("{name}-host"),
        log_directory: logs.display().to_string(),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: network as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// RunPodSandbox on handler `banger`: the pod's id.
fn run_pod(
    rt: &tokio::runtime::Runtime,
    client: &mut RuntimeServiceClient<Channel>,
    ctd: &Containerd,
    config: &PodSandboxConfig,
) -> String {
    rt.block_on(client.run_pod_sandbox(RunPodSandboxRequest {
        config: Some(config.clone()),
        runtime_handler: "banger".into(),
    }))
    .unwrap_or_else(|e| panic!("RunPodSandbox: {e:?}\n{}", ctd.log_text()))
    .into_inner()
    .pod_sandbox_id
}

/// CreateContainer and StartContainer of `name` in `pod`: its id.
#[allow(clippy::too_many_arguments)]
fn start_container(
    rt: &tokio::runtime::Runtime,
    client: &mut RuntimeServiceClient<Channel>,
    ctd: &Containerd,
    pod: &str,
    config: &PodSandboxConfig,
    name: &str,
    image: &str,
    command: &[&str],
) -> String {
    let id = rt
        .block_on(client.create_container(CreateContainerRequest {
            pod_sandbox_id: pod.to_string(),
            config: Some(ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: name.into(),
                    attempt: 0,
                }),
                image: Some(ImageSpec {
                    image: image.into(),
                    ..Default::default()
                }),
                command: command.iter().map(|s| s.to_string()).collect(),
                log_path: format!("{name}.log"),
                ..Default::default()
            }),
            sandbox_config: Some(config.clone()),
        }))
        .unwrap_or_else(|e| panic!("CreateContainer {name}: {e:?}\n{}", ctd.log_text()))
        .into_inner()
        .container_id;
    rt.block_on(client.start_container(StartContainerRequest {
        container_id: id.clone(),
    }))
    .unwrap_or_else(|e| panic!("StartContainer {name}: {e:?}\n{}", ctd.log_text()));
    id
}

/// StopPodSandbox, then RemovePodSandbox.
fn stop_and_remove(
    rt: &tokio::runtime::Runtime,
    client: &mut RuntimeServiceClient<Channel>,
    ctd: &Containerd,
    pod: &str,
) {
    rt.block_on(client.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: pod.to_string(),
    }))
    .unwrap_or_else(|e| panic!("StopPodSandbox: {e:?}\n{}", ctd.log_text()));
    rt.block_on(client.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: pod.to_string(),
    }))
    .unwrap_or_else(|e| panic!("RemovePodSandbox: {e:?}\n{}", ctd.log_text()));
}

#[test]
fn a_kubernetes_pod_of_two_containers_is_one_banger_vm() {
    let inst = Instance::new(&banger_bin()).with_image();
    ok(&inst.banger(&["daemon", "ping"]), "daemon ping");
    let bin_dir = shim_bin().parent().map(Path::to_path_buf).unwrap();
    let ctd = Containerd::start_with(&inst, &bin_dir, true);
    for (name, user, cmd, file) in [
        (
            "banger.test/busybox:1",
            None,
            vec!["/bin/sh"],
            "busybox.tar",
        ),
        (
            "banger.test/busybox-app:1",
            Some("app"),
            vec!["/bin/sh"],
            "app.tar",
        ),
        (
            "banger.test/pause:1",
            None,
            vec!["sleep", "2147483647"],
            "pause.tar",
        ),
    ] {
        let work = inst.dir().join(format!("img-{file}"));
        std::fs::create_dir_all(&work).unwrap();
        let tar = work.join(file);
        if cmd == ["/bin/sh"] {
            busybox_image(&work, name, user, &tar);
        } else {
            busybox_image_with(&work, name, user, &cmd, &tar);
        }
        ok(
            &ctd.ctr_in(
                &inst,
                "k8s.io",
                &["images", "import", tar.to_str().unwrap()],
            ),
            "ctr -n k8s.io images import",
        );
    }
    let (rt, mut client) = cri(&ctd.socket());

    let config = pod_config(&inst, "web", NamespaceMode::Node);
    let pod = run_pod(&rt, &mut client, &ctd, &config);
    let mut ids = Vec::new();
    for (name, image, command) in [
        (
            "one",
            "banger.test/busybox:1",
            vec!["sh", "-c", "echo one > /tmp/one; exec sleep 600"],
        ),
        ("two", "banger.test/busybox-app:1", vec!["sleep", "601"]),
    ] {
        let id = start_container(&rt, &mut client, &ctd, &pod, &config, name, image, &command);
        ids.push(id);
    }
    // One VM for the pod.
    let ls = ok(&inst.banger(&["vm", "ls"]), "vm ls");
    assert_eq!(ls.lines().count(), 2, "one VM for the pod: {ls}");
    let exec = |client: &mut RuntimeServiceClient<Channel>, id: &str, cmd: &[&str]| {
        rt.block_on(client.exec_sync(ExecSyncRequest {
            container_id: id.to_string(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: 60,
        }))
        .unwrap_or_else(|e| panic!("ExecSync {cmd:?}: {e:?}"))
        .into_inner()
    };
    assert!(
        wait_until(Duration::from_secs(30), || exec(
            &mut client,
            &ids[0],
            &["cat", "/tmp/one"]
        )
        .exit_code
            == 0),
        "container one ran"
    );
    // One machine: two's exec sees one's process; two runs as its image's
    // user, in its own root.
    let out = exec(&mut client, &ids[1], &["sh", "-c", "id -un; ps"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.exit_code, 0, "{out:?}");
    assert!(text.starts_with("app\n"), "{text}");
    assert!(
        text.contains("sleep 600") && text.contains("sleep 601"),
        "{text}"
    );
    let out = exec(&mut client, &ids[1], &["cat", "/tmp/one"]);
    assert_ne!(out.exit_code, 0);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("No such file"),
        "{out:?}"
    );
    let status = rt
        .block_on(client.container_status(ContainerStatusRequest {
            container_id: ids[0].clone(),
            verbose: false,
        }))
        .unwrap()
        .into_inner()
        .status
        .expect("a status");
    assert_eq!(
        status.state,
        k8s_cri::v1::ContainerState::ContainerRunning as i32
    );
    // Stopped and removed: nothing left.
    stop_and_remove(&rt, &mut client, &ctd, &pod);
    drop(client);
    drop(rt);
    ctd.assert_clean(&inst);
}

/// Imports the test's busybox and pause images into `k8s.io`.
fn import_images(inst: &Instance, ctd: &Containerd) {
    for (name, cmd, file) in [
        ("banger.test/busybox:1", vec!["/bin/sh"], "busybox.tar"),
        (
            "banger.test/pause:1",
            vec!["sleep", "2147483647"],
            "pause.tar",
        ),
    ] {
        let work = inst.dir().join(format!("img-{file}"));
        std::fs::create_dir_all(&work).unwrap();
        let tar = work.join(file);
        busybox_image_with(&work, name, None, &cmd, &tar);
        ok(
            &ctd.ctr_in(inst, "k8s.io", &["images", "import", tar.to_str().unwrap()]),
            "ctr -n k8s.io images import",
        );
    }
}

/// `GET /` from `addr`, with a deadline for the whole exchange: the body,
/// or the error.
fn http_get(addr: &str) -> Result<String, String> {
    let sa = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut c =
        TcpStream::connect_timeout(&sa, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"GET / HTTP/1.0\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut r = String::new();
    c.read_to_string(&mut r).map_err(|e| e.to_string())?;
    r.split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .ok_or_else(|| format!("no HTTP answer: {r:?}"))
}

/// A Kubernetes pod on a CNI network (not the node's): containerd makes
/// its namespace and CNI's bridge plugin its interface; its VM's guest
/// takes that interface's address, MAC and route. The pod's IP that CRI
/// reports is the guest's; a server in the pod answers the node at that
/// IP, and the pod reaches a server of the node's on the bridge. Removed,
/// nothing is left (the namespace, and the tap in it, go too).
#[test]
fn a_pod_on_a_cni_network_is_its_vm_at_the_pod_ip() {
    const SUBNET: &str = "10.77.0";
    let inst = Instance::new(&banger_bin()).with_image();
    ok(&inst.banger(&["daemon", "ping"]), "daemon ping");
    let bin_dir = shim_bin().parent().map(Path::to_path_buf).unwrap();
    let forward = |set: Option<&str>| {
        let mut c = inst.net.cmd("sysctl");
        match set {
            Some(v) => c.args(["-qw", &format!("net.ipv4.ip_forward={v}")]),
            None => c.args(["-n", "net.ipv4.ip_forward"]),
        };
        ok(&c.output().unwrap(), "sysctl net.ipv4.ip_forward")
    };
    let forward0 = forward(None);
    let ctd = Containerd::start_with_cni(&inst, &bin_dir, SUBNET);
    import_images(&inst, &ctd);
    let (rt, mut client) = cri(&ctd.socket());
    let config = pod_config(&inst, "netpod", NamespaceMode::Pod);
    let pod = run_pod(&rt, &mut client, &ctd, &config);
    let status = rt
        .block_on(client.pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: false,
        }))
        .unwrap()
        .into_inner()
        .status
        .expect("a pod status");
    let pod_ip = status.network.expect("the pod's network").ip;
    assert!(pod_ip.starts_with(&format!("{SUBNET}.")), "pod IP {pod_ip}");
    let id = start_container(
        &rt,
        &mut client,
        &ctd,
        &pod,
        &config,
        "web",
        "banger.test/busybox:1",
        &[
            "sh",
            "-c",
            "mkdir -p /www && echo served-by-the-pod > /www/index.html && \
             exec httpd -f -p 8080 -h /www",
        ],
    );
    // The pod's VM shows the pod's IP.
    let vms = inst.vms();
    assert_eq!(vms.len(), 1, "{vms:?}");
    assert_eq!(
        vms[0]["guest_ip"].as_str(),
        Some(pod_ip.as_str()),
        "{vms:?}"
    );
    let exec = |client: &mut RuntimeServiceClient<Channel>, cmd: &[&str]| {
        let out = rt
            .block_on(client.exec_sync(ExecSyncRequest {
                container_id: id.clone(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout: 60,
            }))
            .unwrap_or_else(|e| panic!("ExecSync {cmd:?}: {e:?}"))
            .into_inner();
        (
            out.exit_code,
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, addr) = exec(
        &mut client,
        &["ip", "-4", "-o", "addr", "show", "dev", "eth0"],
    );
    assert_eq!(code, 0);
    assert!(addr.contains(&format!(" {pod_ip}/24 ")), "{addr}");
    // The pod network's MTU (CNI's 1400) is the guest NIC's.
    let (code, link) = exec(&mut client, &["ip", "-o", "link", "show", "dev", "eth0"]);
    assert_eq!(code, 0);
    assert!(link.contains(" mtu 1400 "), "{link}");
    // A second VM on the pod's namespace (a container outside the pod
    // given its path) is refused, naming the pod's VM; the pod's own tap
    // and redirect stay, which the node's reaching it below shows.
    let netns_dir = inst
        .dir()
        .join("containerd/state/io.containerd.grpc.v1.cri/netns");
    let netns: Vec<PathBuf> = std::fs::read_dir(&netns_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(netns.len(), 1, "{netns:?}");
    let with_ns = format!("network:{}", netns[0].display());
    let out = ctd.ctr_in(
        &inst,
        "k8s.io",
        &[
            "run",
            "--rm",
            "--runtime",
            "io.containerd.banger.v2",
            "--with-ns",
            &with_ns,
            "banger.test/busybox:1",
            "intruder",
            "true",
        ],
    );
    assert!(!out.status.success());
    assert!(
        test_infra::text(&out.stderr).contains("has this pod's network already"),
        "{}",
        test_infra::text(&out.stderr)
    );
    std::thread::scope(|s| {
        s.spawn(|| {
            inst.net.enter_on_this_thread();
            // The node reaches the pod at its IP.
            let mut last = Err(String::new());
            let served = wait_until(Duration::from_secs(60), || {
                last = http_get(&format!("{pod_ip}:8080"));
                last.is_ok()
            });
            assert!(served, "the pod's server at {pod_ip}:8080: {last:?}");
            assert_eq!(last.unwrap(), "served-by-the-pod\n");
            // The pod reaches the node on the bridge.
            let l = TcpListener::bind(format!("{SUBNET}.1:0")).unwrap();
            let port = l.local_addr().unwrap().port();
            let server = s.spawn(move || {
                let (mut c, _) = l.accept().unwrap();
                c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let mut buf = [0u8; 1024];
                let _ = c.read(&mut buf).unwrap();
                c.write_all(b"HTTP/1.0 200 OK\r\n\r\nserved-by-the-node\n")
                    .unwrap();
            });
            let (code, body) = exec(
                &mut client.clone(),
                &[
                    "wget",
                    "-q",
                    "-O",
                    "-",
                    &format!("http://{SUBNET}.1:{port}/"),
                ],
            );
            assert_eq!((code, body.as_str()), (0, "served-by-the-node\n"));
            server.join().unwrap();
        });
    });
    stop_and_remove(&rt, &mut client, &ctd, &pod);
    drop(client);
    drop(rt);
    // Nothing of the pod's network is left in the node's namespace but
    // CNI's bridge: no veth, no tap.
    let links = inst.net.links();
    assert!(
        links
            .iter()
            .all(|l| !l.starts_with("veth") && !l.starts_with("bgpod")),
        "{links:?}"
    );
    // CNI's bridge plugin (`isGateway`) turned forwarding on in the
    // node's namespace, and its teardown leaves it (and the bridge), as
    // on any node: put back, so that the instance's baseline is banger's.
    forward(Some(forward0.trim()));
    ctd.assert_clean(&inst);
}
