//! containerd's Task service (task API v2, over ttrpc): each container a
//! banger VM held for it, each of its processes a guest agent exec in its
//! root filesystem.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use banger::client::Client;
use banger_agent::proto::{Call, InRoot, Limits, Msg, WinSize};
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
use crate::process::{Proc, Status, Stdio};
use crate::spec;
use crate::vm::{self, Lease};

fn status(code: Code, msg: impl std::fmt::Display) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.to_string()))
}

fn not_found(what: impl std::fmt::Display) -> ttrpc::Error {
    status(Code::NOT_FOUND, format!("{what}: not found"))
}

struct Container {
    id: String,
    bundle: PathBuf,
    /// What each of its processes shares (its root, hostname, mounts).
    base: InRoot,
    init: Arc<Proc>,
    execs: Mutex<HashMap<String, Arc<Proc>>>,
    /// Its pod, its directory in the pod's, and the pod's VM.
    pod: String,
    key: String,
    vm: String,
}

/// A pod: its VM, held while any of its containers is there.
struct Pod {
    dir: PathBuf,
    lease: Option<Lease>,
    members: std::collections::BTreeSet<String>,
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

    fn vm(&self) -> ttrpc::Result<String> {
        Ok(self.vm.clone())
    }
}

pub struct TaskService {
    namespace: String,
    client: Client,
    events: Events,
    exit: Arc<ExitSignal>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    pods: Mutex<HashMap<String, Pod>>,
}

impl TaskService {
    pub fn new(namespace: &str, client: Client, events: Events, exit: Arc<ExitSignal>) -> Self {
        TaskService {
            namespace: namespace.to_string(),
            client,
            events,
            exit,
            containers: Mutex::new(HashMap::new()),
            pods: Mutex::new(HashMap::new()),
        }
    }

    fn containers(&self) -> MutexGuard<'_, HashMap<String, Arc<Container>>> {
        self.containers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn container(&self, id: &str) -> ttrpc::Result<Arc<Container>> {
        self.containers()
            .get(id)
            .cloned()
            .ok_or_else(|| not_found(format!("container {id}")))
    }

    /// Starts `p` of container `c` and reports it as containerd expects.
    fn start_process(&self, c: &Arc<Container>, p: &Arc<Proc>) -> ttrpc::Result<u32> {
        if p.status().0 != Status::Created {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!(
                    "container {}: process {:?} already started",
                    c.id, p.exec_id
                ),
            ));
        }
        let vm = c.vm()?;
        let agent = self
            .client
            .agent(&vm)
            .map_err(|e| status(Code::UNAVAILABLE, format!("vm {vm}: {e}")))?;
        let events = self.events.clone();
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
        let (cid2, id2) = (
            c.id.clone(),
            if p.exec_id.is_empty() {
                c.id.clone()
            } else {
                p.exec_id.clone()
            },
        );
        let exited = move |pid: u32, exit: crate::process::Exit| {
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

    /// Unmounts a container's root filesystem and mounts; the last of a
    /// pod lets go of the pod's VM and directory.
    fn tear_down(&self, c: &Container) {
        let mut pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        let Some(pod) = pods.get_mut(&c.pod) else {
            return;
        };
        if let Err(e) = pod::unmount_container(&pod.dir, &c.key) {
            log::warn!("container {}: {e}", c.id);
        }
        pod.members.remove(&c.id);
        if !pod.members.is_empty() {
            return;
        }
        let Some(pod) = pods.remove(&c.pod) else {
            return;
        };
        drop(pods);
        release_pod(pod);
    }
}

/// One agent call to VM `vm`, the whole exchange within 10 s.
fn agent_call(client: &Client, vm: &str, call: Call) -> Result<Msg, String> {
    let conn = client.agent(vm).map_err(|e| format!("vm {vm}: {e}"))?;
    banger_agent::client::call_within(conn, call, std::time::Duration::from_secs(10))
        .map_err(|e| format!("vm {vm}: the agent: {e}"))
}

/// Lets go of a pod's VM (bounded), then of its directory.
fn release_pod(mut pod: Pod) {
    if let Some(l) = pod.lease.take() {
        if let Err(e) = l.release() {
            log::warn!("{e}");
        }
    }
    if let Err(e) = pod::remove(&pod.dir) {
        log::warn!("{e}");
    }
}

fn state_of(id: &str, bundle: &Path, p: &Proc) -> api::StateResponse {
    let (st, pid, exit) = p.status();
    api::StateResponse {
        id: id.to_string(),
        bundle: bundle.display().to_string(),
        pid,
        status: match st {
            Status::Created => TaskStatus::CREATED,
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
        let id = req.id.clone();
        if self.containers().contains_key(&id) {
            return Err(status(
                Code::ALREADY_EXISTS,
                format!("container {id}: already exists"),
            ));
        }
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
        let pod_dir = pod::dir(&self.client.layout.runtime_dir, &self.namespace, &pod_key);
        let plan = spec::plan(&spec, &self.namespace, &id, &pod_dir).map_err(|e| invalid(&e))?;
        let exec = spec::exec_for(
            &id,
            process,
            &plan.base,
            req.terminal,
            !req.stdin.is_empty(),
        )
        .map_err(|e| invalid(&e))?;
        let started = std::time::Instant::now();
        // The pod's VM: made by its first container, held by its last.
        let mut pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        let new_pod = !pods.contains_key(&pod_key);
        if new_pod {
            pod::make(&pod_dir)
                .map_err(|e| status(Code::UNKNOWN, format!("container {id}: {e}")))?;
            match vm::boot(&self.client, plan.create) {
                Ok(lease) => {
                    log::info!(
                        "pod {pod_key}: vm {} up in {} ms",
                        lease.vm.name,
                        started.elapsed().as_millis()
                    );
                    pods.insert(
                        pod_key.clone(),
                        Pod {
                            dir: pod_dir.clone(),
                            lease: Some(lease),
                            members: Default::default(),
                        },
                    );
                }
                Err(e) => {
                    let _ = pod::remove(&pod_dir);
                    return Err(status(Code::UNKNOWN, format!("container {id}: {e}")));
                }
            }
        }
        let vm_name = pods
            .get(&pod_key)
            .and_then(|p| p.lease.as_ref())
            .map(|l| l.vm.name.clone())
            .unwrap_or_default();
        let mounted = pod::mount_container(&pod_dir, &plan.key, &req.rootfs, &bundle, &plan.binds)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                // Its limits, on its cgroup in the guest.
                if plan.limits == Limits::default() {
                    return Ok(());
                }
                self.limit(&vm_name, &plan.key, plan.limits).map_err(|e| {
                    let _ = pod::unmount_container(&pod_dir, &plan.key);
                    e
                })
            });
        if let Err(e) = mounted {
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
        if c.execs().contains_key(&req.exec_id) {
            return Err(status(
                Code::ALREADY_EXISTS,
                format!("container {}: exec {:?} already exists", c.id, req.exec_id),
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
        c.execs().insert(req.exec_id.clone(), p);
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

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let c = self.container(&req.id)?;
        let mut pids: Vec<u32> = std::iter::once(c.init.clone())
            .chain(c.execs().values().cloned())
            .filter_map(|p| match p.status() {
                (Status::Running, pid, _) => Some(pid),
                _ => None,
            })
            .collect();
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
        let targets: Vec<Arc<Proc>> = if req.all && req.exec_id.is_empty() {
            std::iter::once(c.init.clone())
                .chain(c.execs().values().cloned())
                .collect()
        } else {
            vec![c.process(&req.exec_id)?]
        };
        let mut signalled = 0;
        for p in &targets {
            match p.signal(signal) {
                Ok(()) => signalled += 1,
                Err(crate::process::ProcError::NotStarted) => {
                    // Killed before it ran: it never will.
                    if let Some(exit) = p.end_unstarted(128 + req.signal) {
                        signalled += 1;
                        self.events.send(Event::Exit(TaskExit {
                            container_id: c.id.clone(),
                            id: if p.exec_id.is_empty() {
                                c.id.clone()
                            } else {
                                p.exec_id.clone()
                            },
                            exit_status: exit.status,
                            exited_at: MessageField::some(timestamp(exit.at)),
                            ..Default::default()
                        }));
                    }
                }
                Err(crate::process::ProcError::Finished) => {}
                Err(e) => return Err(status(Code::UNKNOWN, format!("container {}: {e}", c.id))),
            }
        }
        if signalled == 0 && !req.all {
            return Err(not_found(format!(
                "container {}: process already finished",
                c.id
            )));
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
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let (st, pid, exit) = p.status();
        if st == Status::Running {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!(
                    "container {}: process {pid} is running: kill it first",
                    c.id
                ),
            ));
        }
        let exit = exit.unwrap_or(crate::process::Exit {
            status: 0,
            at: std::time::SystemTime::now(),
        });
        if req.exec_id.is_empty() {
            self.containers().remove(&c.id);
            self.tear_down(&c);
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
        let ws = WinSize {
            rows: u16::try_from(req.height).unwrap_or(u16::MAX),
            cols: u16::try_from(req.width).unwrap_or(u16::MAX),
        };
        p.resize(ws).map_err(|e| {
            status(
                Code::FAILED_PRECONDITION,
                format!("container {}: {e}", c.id),
            )
        })?;
        Ok(api::Empty::new())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        if req.stdin {
            match p.close_stdin() {
                Ok(()) | Err(crate::process::ProcError::Finished) => {}
                Err(e) => {
                    return Err(status(
                        Code::FAILED_PRECONDITION,
                        format!("container {}: {e}", c.id),
                    ))
                }
            }
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
        let vm = c.vm()?;
        // The container's own cgroup, when one of its processes made it.
        let cgroup = match agent_call(
            &self.client,
            &vm,
            Call::CgroupStats {
                cgroup: c.key.clone(),
            },
        ) {
            Ok(Msg::Cgroup(s)) => Some(s),
            _ => None,
        };
        crate::stats::of_vm(&self.client, &vm, cgroup)
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
        // last.
        if self.containers().is_empty() {
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
