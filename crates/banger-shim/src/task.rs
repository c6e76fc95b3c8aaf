//! containerd's Task service (task API v2, over ttrpc): each pod a banger
//! VM held for it, each container a root and a cgroup in it, each of its
//! processes a guest agent exec there.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use banger::client::Client;
use banger_agent::proto::{Call, InRoot, Limits, Msg, Target, WinSize};
use containerd_shim::api;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskStart,
};
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::ttrpc::{self, Code};
use containerd_shim::protos::types::task::{ProcessInfo, Status as TaskStatus};
use containerd_shim::{ExitSignal, TtrpcContext, TtrpcResult};

use crate::events::{timestamp, Event, Events};
use crate::pod;
use crate::process::{Exit, Proc, Status, Stdio, KILLED};
use crate::spec;
use crate::vm::{self, Lease};

fn status(code: Code, msg: impl std::fmt::Display) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.to_string()))
}

fn not_found(what: impl std::fmt::Display) -> ttrpc::Error {
    status(Code::NOT_FOUND, format!("{what}: not found"))
}

/// How long one agent call may take, the whole exchange.
const AGENT_WITHIN: Duration = Duration::from_secs(10);

/// The file in a container's bundle that names its pod's VM and
/// directory, for a `delete` after the shim's death.
pub const POD_RECORD: &str = "banger-pod";

struct Container {
    id: String,
    bundle: PathBuf,
    /// What each of its processes shares (its root, hostname, mounts).
    base: InRoot,
    init: Arc<Proc>,
    execs: Mutex<HashMap<String, Arc<Proc>>>,
    /// Its pod, its directory and cgroup name in the pod's, the pod's VM.
    pod: String,
    key: String,
    vm: String,
}

/// A pod: its VM, held while any of its containers is there.
struct Pod {
    dir: PathBuf,
    /// The shim's mark in its VM's name and directory.
    mark: String,
    lease: Option<Lease>,
    members: BTreeSet<String>,
}

impl Container {
    fn execs(&self) -> MutexGuard<'_, HashMap<String, Arc<Proc>>> {
        self.execs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn process(&self, exec_id: &str) -> ttrpc::Result<Arc<Proc>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs()
            .get(exec_id)
            .cloned()
            .ok_or_else(|| not_found(format!("exec {exec_id:?} of container {}", self.id)))
    }

    /// The id containerd names process `p` by.
    fn id_of(&self, p: &Proc) -> String {
        if p.exec_id.is_empty() {
            self.id.clone()
        } else {
            p.exec_id.clone()
        }
    }
}

pub struct TaskService {
    namespace: String,
    client: Client,
    events: Events,
    exit: Arc<ExitSignal>,
    /// This shim's own mark, in its pods' VM names and directories: a
    /// late cleanup of an earlier shim of the same pod never touches
    /// this one's.
    nonce: String,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    /// Ids whose create is under way.
    creating: Mutex<HashSet<String>>,
    /// Pods made by this shim so far: the next one's mark (a pod of a
    /// name released a moment ago is never the next one's).
    made: std::sync::atomic::AtomicU32,
    pods: Mutex<HashMap<String, Pod>>,
}

/// An id's create under way, let go however the create ends.
struct Creating<'a>(&'a TaskService, String);

impl Drop for Creating<'_> {
    fn drop(&mut self) {
        self.0
            .creating
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.1);
    }
}

/// One agent call to VM `vm`, the whole exchange within [`AGENT_WITHIN`].
fn agent_call(client: &Client, vm: &str, call: Call) -> Result<Msg, String> {
    let conn = client.agent(vm).map_err(|e| format!("vm {vm}: {e}"))?;
    banger_agent::client::call_within(conn, call, AGENT_WITHIN)
        .map_err(|e| format!("vm {vm}: the agent: {e}"))
}

/// Signals every process of container `key`'s cgroup; their pids.
fn signal_all(client: &Client, vm: &str, key: &str, signal: i32) -> Result<Vec<u32>, String> {
    match agent_call(
        client,
        vm,
        Call::CgroupSignal {
            cgroup: key.to_string(),
            signal,
        },
    )? {
        Msg::Pids { list } => Ok(list),
        other => Err(format!("vm {vm}: the agent answered {other:?}")),
    }
}

impl TaskService {
    pub fn new(namespace: &str, client: Client, events: Events, exit: Arc<ExitSignal>) -> Self {
        TaskService {
            namespace: namespace.to_string(),
            client,
            events,
            exit,
            nonce: nonce(),
            containers: Mutex::new(HashMap::new()),
            creating: Mutex::new(HashSet::new()),
            made: std::sync::atomic::AtomicU32::new(0),
            pods: Mutex::new(HashMap::new()),
        }
    }

    fn containers(&self) -> MutexGuard<'_, HashMap<String, Arc<Container>>> {
        self.containers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pods(&self) -> MutexGuard<'_, HashMap<String, Pod>> {
        self.pods.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn container(&self, id: &str) -> ttrpc::Result<Arc<Container>> {
        self.containers()
            .get(id)
            .cloned()
            .ok_or_else(|| not_found(format!("container {id}")))
    }

    fn exit_event(&self, c: &Container, p: &Proc, pid: u32, exit: Exit) {
        self.events.send(Event::Exit(TaskExit {
            container_id: c.id.clone(),
            id: c.id_of(p),
            pid,
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        }));
    }

    /// Starts `p` of container `c` and reports it as containerd expects.
    fn start_process(&self, c: &Arc<Container>, p: &Arc<Proc>) -> ttrpc::Result<u32> {
        if !p.exec_id.is_empty() && c.init.status().0 != Status::Running {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("container {}: its init is not running", c.id),
            ));
        }
        if !p.claim_start() {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!(
                    "container {}: process {:?} was started or killed already",
                    c.id, p.exec_id
                ),
            ));
        }
        let agent = match self.client.agent(&c.vm) {
            Ok(a) => a,
            Err(e) => {
                // A failed start changes nothing.
                p.unclaim();
                return Err(status(Code::UNAVAILABLE, format!("vm {}: {e}", c.vm)));
            }
        };
        let (cid, exec_id) = (c.id.clone(), p.exec_id.clone());
        let started = |pid: u32| {
            self.events.send(if exec_id.is_empty() {
                Event::Start(TaskStart {
                    container_id: cid.clone(),
                    pid,
                    ..Default::default()
                })
            } else {
                Event::ExecStarted(TaskExecStarted {
                    container_id: cid.clone(),
                    exec_id: exec_id.clone(),
                    pid,
                    ..Default::default()
                })
            });
        };
        let events = self.events.clone();
        let (client, vm, key) = (self.client.clone(), c.vm.clone(), c.key.clone());
        let init = p.exec_id.is_empty();
        let (cid2, id2) = (c.id.clone(), c.id_of(p));
        let exited = move |pid: u32, exit: Exit| {
            // The init's end is the container's: the rest of its processes
            // go with it (its cgroup killed), as with a pid namespace.
            if init {
                if let Err(e) = signal_all(&client, &vm, &key, nix::libc::SIGKILL) {
                    log::warn!("container {cid2}: {e}");
                }
            }
            events.send(Event::Exit(TaskExit {
                container_id: cid2,
                id: id2,
                pid,
                exit_status: exit.status,
                exited_at: MessageField::some(timestamp(exit.at)),
                ..Default::default()
            }));
        };
        p.start(agent, started, exited)
            .map_err(|e| status(Code::UNKNOWN, format!("container {}: {e}", c.id)))
    }

    /// Sets a container's limits on its cgroup in the guest.
    fn limit(&self, vm: &str, key: &str, limits: Limits) -> Result<(), String> {
        match agent_call(
            &self.client,
            vm,
            Call::Limit {
                cgroup: key.to_string(),
                limits,
            },
        )? {
            Msg::Done => Ok(()),
            other => Err(format!("vm {vm}: the agent answered {other:?}")),
        }
    }

    /// Boots pod `pod_key`'s VM and checks its agent can run containers.
    fn boot_pod(
        &self,
        create: banger_core::api::CreateVm,
        dir: &Path,
        mark: &str,
    ) -> Result<Pod, String> {
        pod::make(dir).map_err(|e| e.to_string())?;
        let lease = match vm::boot(&self.client, create) {
            Ok(l) => l,
            Err(e) => {
                let _ = pod::remove(dir);
                return Err(e.to_string());
            }
        };
        let pod = Pod {
            dir: dir.to_path_buf(),
            mark: mark.to_string(),
            lease: Some(lease),
            members: BTreeSet::new(),
        };
        // Its agent runs containers: a daemon that speaks this client's
        // protocol (13) gives its guests agents of protocol 2, and checks
        // each one's at its boot.
        Ok(pod)
    }

    /// Unmounts a container's root filesystem and mounts; the last of a
    /// pod lets go of the pod's VM and directory.
    /// (How long the VM's deletion took, when it was let go.)
    fn tear_down(&self, c: &Container) -> Option<Duration> {
        let mut pods = self.pods();
        let pod = pods.get_mut(&c.pod)?;
        if let Err(e) = pod::unmount_container(&pod.dir, &c.key, c.base.binds.len()) {
            log::warn!("container {}: {e}", c.id);
        }
        pod.members.remove(&c.id);
        if !pod.members.is_empty() {
            return None;
        }
        let pod = pods.remove(&c.pod)?;
        drop(pods);
        Some(release_pod(pod))
    }
}

/// A mark of this shim instance: 3 random bytes, as hex.
fn nonce() -> String {
    let mut b = [0u8; 3];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| {
        use std::io::Read;
        f.read_exact(&mut b)
    });
    if read.is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
            ^ std::process::id();
        b.copy_from_slice(&t.to_le_bytes()[..3]);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Lets go of a pod's VM (bounded), then of its directory; how long the
/// VM's deletion took.
fn release_pod(mut pod: Pod) -> Duration {
    let t = std::time::Instant::now();
    if let Some(l) = pod.lease.take() {
        if let Err(e) = l.release() {
            log::warn!("{e}");
        }
    }
    let vm = t.elapsed();
    if let Err(e) = pod::remove(&pod.dir) {
        log::warn!("{e}");
    }
    vm
}

/// Logs how long a call took and how much of it was its VM's boot or
/// deletion (what `vm run` does too): `bench --containerd-only` reads it.
fn timing(what: &str, id: &str, total: Duration, vm: Duration) {
    log::info!(
        "banger-shim timing {what} {id} total_us={} vm_us={}",
        total.as_micros(),
        vm.as_micros()
    );
}

/// Writes the pod record into a container's bundle.
fn record_pod(bundle: &Path, vm: &str, dir: &Path) -> std::io::Result<()> {
    std::fs::write(
        bundle.join(POD_RECORD),
        format!("vm={vm}\ndir={}\n", dir.display()),
    )
}

/// What a bundle's pod record says: the pod's VM and directory.
pub fn read_pod_record(bundle: &Path) -> Option<(String, PathBuf)> {
    let text = std::fs::read_to_string(bundle.join(POD_RECORD)).ok()?;
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
            .map(str::to_string)
    };
    Some((field("vm")?, PathBuf::from(field("dir")?)))
}

fn state_of(id: &str, bundle: &Path, p: &Proc) -> api::StateResponse {
    let (st, pid, exit) = p.status();
    api::StateResponse {
        id: id.to_string(),
        bundle: bundle.display().to_string(),
        pid,
        status: match st {
            Status::Created | Status::Starting => TaskStatus::CREATED,
            Status::Running => TaskStatus::RUNNING,
            Status::Stopped => TaskStatus::STOPPED,
        }
        .into(),
        stdin: p.stdio.stdin.clone(),
        stdout: p.stdio.stdout.clone(),
        stderr: p.stdio.stderr.clone(),
        terminal: p.stdio.terminal,
        exit_status: exit.map(|e| e.status).unwrap_or(0),
        exited_at: exit
            .map(|e| MessageField::some(timestamp(e.at)))
            .unwrap_or_default(),
        exec_id: p.exec_id.clone(),
        ..Default::default()
    }
}

impl containerd_shim::Task for TaskService {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let called = std::time::Instant::now();
        let id = req.id.clone();
        // The id is this create's until it ends.
        let _creating = {
            let containers = self.containers();
            let mut creating = self.creating.lock().unwrap_or_else(|p| p.into_inner());
            if containers.contains_key(&id) || !creating.insert(id.clone()) {
                return Err(status(
                    Code::ALREADY_EXISTS,
                    format!("container {id}: already exists"),
                ));
            }
            Creating(self, id.clone())
        };
        if !req.checkpoint.is_empty() {
            return Err(status(
                Code::UNIMPLEMENTED,
                format!("container {id}: restoring a checkpoint is not supported"),
            ));
        }
        let bundle = PathBuf::from(&req.bundle);
        let invalid = |e: &dyn std::fmt::Display| status(Code::INVALID_ARGUMENT, e);
        let spec = spec::load(&bundle).map_err(|e| invalid(&e))?;
        let process = spec
            .process()
            .as_ref()
            .ok_or_else(|| invalid(&format!("container {id}: config.json has no process")))?;
        let pod_key = spec::pod_of(&spec, &id);
        // The pod's directory: its own when it runs already, else a new
        // one marked with this shim's nonce and its count of pods.
        // (The pods' lock is held from here to the pod's VM: a pod of
        // this name let go meanwhile is never mistaken for this one.)
        let mut pods = self.pods();
        let existing = pods.get(&pod_key).map(|p| (p.dir.clone(), p.mark.clone()));
        let (pod_dir, mark) = existing.unwrap_or_else(|| {
            let n = self.made.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mark = format!("{}{n:x}", self.nonce);
            let dir = pod::dir(
                &self.client.layout.runtime_dir,
                &self.namespace,
                &pod_key,
                &mark,
            );
            (dir, mark)
        });
        let mut plan =
            spec::plan(&spec, &self.namespace, &id, &pod_dir).map_err(|e| invalid(&e))?;
        if let Some(name) = plan.create.name.as_mut() {
            name.push('-');
            name.push_str(&mark);
        }
        let exec = spec::exec_for(
            &id,
            process,
            &plan.base,
            req.terminal,
            !req.stdin.is_empty(),
        )
        .map_err(|e| invalid(&e))?;
        // The pod's VM: made by its first container, held by its last.
        let new_pod = !pods.contains_key(&pod_key);
        // A group's later container shares its VM's network; a network
        // namespace of its own cannot be honoured. (A Kubernetes pod's
        // containers join their sandbox's, and ask for none here.)
        if let (false, Some(ns)) = (new_pod, &plan.create.net.pod_netns) {
            return Err(invalid(&format!(
                "container {id}: joins pod {pod_key:?}'s VM, which has its first container's \
                 network; its own network namespace {} cannot be given to it (run it on its own)",
                ns.display()
            )));
        }
        let mut boot = Duration::ZERO;
        if new_pod {
            let t = std::time::Instant::now();
            let pod = self
                .boot_pod(plan.create.clone(), &pod_dir, &mark)
                .map_err(|e| status(Code::UNKNOWN, format!("container {id}: {e}")))?;
            boot = t.elapsed();
            pods.insert(pod_key.clone(), pod);
        }
        let vm_name = pods
            .get(&pod_key)
            .and_then(|p| p.lease.as_ref())
            .map(|l| l.vm.name.clone())
            .unwrap_or_default();
        let made = pod::mount_container(&pod_dir, &plan.key, &req.rootfs, &bundle, &plan.binds)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                let undo = |e: String| {
                    let _ = pod::unmount_container(&pod_dir, &plan.key, plan.binds.len());
                    e
                };
                record_pod(&bundle, &vm_name, &pod_dir)
                    .map_err(|e| undo(format!("{}: {e}", bundle.join(POD_RECORD).display())))?;
                // Its limits, on its cgroup in the guest.
                if plan.limits != Limits::default() {
                    self.limit(&vm_name, &plan.key, plan.limits).map_err(undo)?;
                }
                Ok(())
            });
        if let Err(e) = made {
            if new_pod {
                if let Some(p) = pods.remove(&pod_key) {
                    drop(pods);
                    release_pod(p);
                }
            }
            return Err(invalid(&format!("container {id}: {e}")));
        }
        if let Some(p) = pods.get_mut(&pod_key) {
            p.members.insert(id.clone());
        }
        drop(pods);
        // No process of the container runs yet: the task is the shim's.
        let pid = std::process::id();
        let init = Proc::new(
            "",
            Stdio {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
            },
            exec,
        );
        let c = Arc::new(Container {
            id: id.clone(),
            bundle: bundle.clone(),
            base: plan.base,
            init,
            execs: Mutex::new(HashMap::new()),
            pod: pod_key,
            key: plan.key,
            vm: vm_name,
        });
        self.containers().insert(id.clone(), c);
        timing("create", &id, called.elapsed(), boot);
        self.events.send(Event::Create(TaskCreate {
            container_id: id,
            bundle: req.bundle,
            rootfs: req.rootfs,
            io: MessageField::some(TaskIO {
                stdin: req.stdin,
                stdout: req.stdout,
                stderr: req.stderr,
                terminal: req.terminal,
                ..Default::default()
            }),
            pid,
            ..Default::default()
        }));
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let pid = self.start_process(&c, &p)?;
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id)?;
        let invalid = |e: &dyn std::fmt::Display| status(Code::INVALID_ARGUMENT, e);
        if req.exec_id.is_empty() || req.exec_id.len() > 128 {
            return Err(invalid(&format!(
                "container {}: an exec id of 1 to 128 characters",
                c.id
            )));
        }
        if c.init.status().0 != Status::Running {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("container {}: its init is not running", c.id),
            ));
        }
        let any = req
            .spec
            .as_ref()
            .ok_or_else(|| invalid(&format!("container {}: an exec without a process", c.id)))?;
        let process: oci_spec::runtime::Process = serde_json::from_slice(&any.value)
            .map_err(|e| invalid(&format!("container {}: exec process: {e}", c.id)))?;
        let exec = spec::exec_for(
            &c.id,
            &process,
            &c.base,
            req.terminal,
            !req.stdin.is_empty(),
        )
        .map_err(|e| invalid(&e))?;
        let p = Proc::new(
            &req.exec_id,
            Stdio {
                stdin: req.stdin,
                stdout: req.stdout,
                stderr: req.stderr,
                terminal: req.terminal,
            },
            exec,
        );
        {
            let mut execs = c.execs();
            if execs.contains_key(&req.exec_id) {
                return Err(status(
                    Code::ALREADY_EXISTS,
                    format!("container {}: exec {:?} already exists", c.id, req.exec_id),
                ));
            }
            execs.insert(req.exec_id.clone(), p);
        }
        self.events.send(Event::ExecAdded(TaskExecAdded {
            container_id: c.id.clone(),
            exec_id: req.exec_id,
            ..Default::default()
        }));
        Ok(api::Empty::new())
    }

    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        Ok(state_of(&c.id, &c.bundle, &p))
    }

    /// Every process of the container: its cgroup's, by guest pid.
    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let c = self.container(&req.id)?;
        let mut pids = match signal_all(&self.client, &c.vm, &c.key, 0) {
            Ok(list) => list,
            Err(e) => {
                return Err(status(
                    Code::UNAVAILABLE,
                    format!("container {}: {e}", c.id),
                ))
            }
        };
        pids.sort_unstable();
        Ok(api::PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id)?;
        let signal = i32::try_from(req.signal)
            .ok()
            .filter(|s| (1..=64).contains(s))
            .ok_or_else(|| {
                status(
                    Code::INVALID_ARGUMENT,
                    format!("signal {}: not a signal", req.signal),
                )
            })?;
        let p = c.process(&req.exec_id)?;
        // Killed before it ran: it never will (a start under way is
        // waited for; one that won runs, and is signalled).
        if let Some(exit) = p.end_unstarted(128 + req.signal) {
            self.exit_event(&c, &p, 0, exit);
        } else {
            match p.settled() {
                (Status::Running, pid) => {
                    let r = agent_call(
                        &self.client,
                        &c.vm,
                        Call::Signal {
                            target: Target::Pid(pid),
                            signal,
                        },
                    );
                    match r {
                        Ok(Msg::Done) => {}
                        // The agent may have reaped it before its end got
                        // here: as containerd expects of a finished one.
                        other if p.exit_within(Duration::from_secs(2)).is_some() => {
                            log::debug!("container {}: kill: {other:?}", c.id);
                            if !req.all {
                                return Err(not_found(format!(
                                    "container {}: process already finished",
                                    c.id
                                )));
                            }
                        }
                        Ok(other) => {
                            return Err(status(
                                Code::UNKNOWN,
                                format!("container {}: the agent answered {other:?}", c.id),
                            ))
                        }
                        Err(e) => {
                            return Err(status(
                                Code::UNAVAILABLE,
                                format!("container {}: {e}", c.id),
                            ))
                        }
                    }
                }
                (Status::Stopped, _) if !req.all => {
                    return Err(not_found(format!(
                        "container {}: process already finished",
                        c.id
                    )))
                }
                _ => {}
            }
        }
        // `all`: every process of the container, its children too.
        if req.all && req.exec_id.is_empty() {
            signal_all(&self.client, &c.vm, &c.key, signal)
                .map_err(|e| status(Code::UNAVAILABLE, format!("container {}: {e}", c.id)))?;
        }
        Ok(api::Empty::new())
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let exit = p.wait();
        Ok(api::WaitResponse {
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        })
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let called = std::time::Instant::now();
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let (st, pid) = p.settled();
        if st == Status::Running {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!(
                    "container {}: process {pid} is running: kill it first",
                    c.id
                ),
            ));
        }
        // One that never started: its waiters learn it never will.
        let exit = p.end_unstarted(KILLED).or(p.status().2).unwrap_or(Exit {
            status: KILLED,
            at: std::time::SystemTime::now(),
        });
        if req.exec_id.is_empty() {
            // Whatever of it still runs (execs, their children) goes, its
            // cgroup with it, and what was mounted in its root in the guest
            // (unless it is its pod's last: the VM goes); then its mounts
            // on the host, and the pod's VM with its last container; only
            // then is it gone from the shim (a Shutdown waits for that).
            let last = self
                .pods()
                .get(&c.pod)
                .is_some_and(|p| p.members.len() == 1 && p.members.contains(&c.id));
            if !last {
                let gone = agent_call(
                    &self.client,
                    &c.vm,
                    Call::ContainerGone {
                        root: c.base.root.clone(),
                        cgroup: c.key.clone(),
                    },
                );
                if let Err(e) = gone {
                    log::warn!("container {}: {e}", c.id);
                }
            }
            for e in c.execs().values() {
                e.end_unstarted(KILLED);
            }
            let vm = self.tear_down(&c).unwrap_or_default();
            self.containers().remove(&c.id);
            timing("delete", &c.id, called.elapsed(), vm);
            self.events.send(Event::Delete(TaskDelete {
                container_id: c.id.clone(),
                pid,
                exit_status: exit.status,
                exited_at: MessageField::some(timestamp(exit.at)),
                ..Default::default()
            }));
        } else {
            c.execs().remove(&req.exec_id);
        }
        Ok(api::DeleteResponse {
            pid,
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        })
    }

    fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let (Status::Running, pid) = p.settled() else {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("container {}: the process is not running", c.id),
            ));
        };
        let size = WinSize {
            rows: u16::try_from(req.height).unwrap_or(u16::MAX),
            cols: u16::try_from(req.width).unwrap_or(u16::MAX),
        };
        match agent_call(
            &self.client,
            &c.vm,
            Call::Resize {
                target: Target::Pid(pid),
                size,
            },
        ) {
            Ok(Msg::Done) => Ok(api::Empty::new()),
            Ok(other) => Err(status(
                Code::UNKNOWN,
                format!("container {}: the agent answered {other:?}", c.id),
            )),
            Err(e) => Err(status(
                Code::FAILED_PRECONDITION,
                format!("container {}: {e}", c.id),
            )),
        }
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        if req.stdin {
            p.close_stdin();
        }
        Ok(api::Empty::new())
    }

    /// CPU and memory: the container's cgroup in the guest (the VM's own
    /// size stays: a memory limit over it is the guest's memory).
    fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id)?;
        let invalid = |e: &dyn std::fmt::Display| status(Code::INVALID_ARGUMENT, e);
        let any = req
            .resources
            .as_ref()
            .ok_or_else(|| invalid(&format!("container {}: an update without resources", c.id)))?;
        let res: oci_spec::runtime::LinuxResources = serde_json::from_slice(&any.value)
            .map_err(|e| invalid(&format!("container {}: resources: {e}", c.id)))?;
        let limits = spec::limits_of(&res);
        self.limit(&c.vm, &c.key, limits)
            .map_err(|e| status(Code::UNAVAILABLE, format!("container {}: {e}", c.id)))?;
        Ok(api::Empty::new())
    }

    fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let c = self.container(&req.id)?;
        // The container's own cgroup, when one of its processes made it.
        let cgroup = match agent_call(
            &self.client,
            &c.vm,
            Call::CgroupStats {
                cgroup: c.key.clone(),
            },
        ) {
            Ok(Msg::Cgroup(s)) => Some(s),
            _ => None,
        };
        crate::stats::of_vm(&self.client, &c.vm, cgroup)
            .map(|stats| api::StatsResponse {
                stats: MessageField::some(stats),
                ..Default::default()
            })
            .map_err(|e| status(Code::UNAVAILABLE, format!("container {}: {e}", c.id)))
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = self
            .containers()
            .get(&req.id)
            .map(|c| c.init.status().1)
            .unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        // One shim may serve several containers (a pod): it ends with the
        // last, once its events are out.
        let idle = self.containers().is_empty()
            && self
                .creating
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty();
        if idle {
            self.events.flush(Duration::from_secs(5));
            self.exit.signal();
        }
        Ok(api::Empty::new())
    }

    fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        Err(status(
            Code::UNIMPLEMENTED,
            format!(
                "container {}: pause is not supported by banger's runtime",
                req.id
            ),
        ))
    }

    fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        Err(status(
            Code::UNIMPLEMENTED,
            format!(
                "container {}: resume is not supported by banger's runtime",
                req.id
            ),
        ))
    }

    fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(status(
            Code::UNIMPLEMENTED,
            format!(
                "container {}: checkpoint is not supported by banger's runtime",
                req.id
            ),
        ))
    }
}
