//! `banger vm ...`: requests for the daemon, and ssh into guests.

use std::io::IsTerminal;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Instant;

use anyhow::{anyhow, bail, Context};
use banger_core::api::{CreateVm, Event, Request, Response, VmInfo};
use banger_core::duration::parse_secs;
use banger_core::sizing::{parse_size_mib, SizeRequest};
use banger_core::{AutoStop, VmState};

use crate::client::{Client, ClientError};
use crate::output::{emit, print_ports, print_stats, print_timings, print_vm, print_vms};
use crate::{progress, ssh, CreateFlags, PortCmd, VmCmd};

fn create_request(f: &CreateFlags, start: bool, rm: bool) -> anyhow::Result<CreateVm> {
    if let Some(n) = &f.name {
        banger_core::validate_name(n)?;
    }
    let mem = f
        .memory
        .as_deref()
        .map(parse_size_mib)
        .transpose()
        .map_err(|e| anyhow!("--memory: {e}"))?;
    let disk = f
        .disk_size
        .as_deref()
        .map(parse_size_mib)
        .transpose()
        .map_err(|e| anyhow!("--disk-size: {e}"))?;
    let auto_stop = AutoStop {
        ttl_secs: f
            .ttl
            .as_deref()
            .map(|v| parse_secs("--ttl", v))
            .transpose()?,
        idle_secs: f
            .idle_timeout
            .as_deref()
            .map(|v| parse_secs("--idle-timeout", v))
            .transpose()?,
        at_ttl: Default::default(),
    };
    let mut metadata = std::collections::BTreeMap::new();
    for l in &f.labels {
        let (k, v) = l
            .split_once('=')
            .ok_or_else(|| anyhow!("--label {l:?}: KEY=VALUE"))?;
        metadata.insert(k.to_string(), v.to_string());
    }
    Ok(CreateVm {
        name: f.name.clone(),
        image: f.image.clone(),
        size: SizeRequest {
            cpus: f.cpus,
            memory_mib: mem,
            disk_mib: disk,
        },
        vmm: f.vmm,
        start,
        rm,
        auto_stop,
        metadata,
        env: Vec::new(),
        net: banger_core::NetPolicy {
            none: f.net == crate::NetMode::None,
            allow: f.allow_net.clone(),
            ports: f.publish.clone(),
            network: f.network.clone(),
            pod_netns: None,
        },
        volumes: f.volume.clone(),
        mounts: f
            .mount
            .iter()
            .map(|m| {
                // The daemon gets the directory's real path.
                let host = std::fs::canonicalize(&m.host)
                    .map_err(|e| anyhow!("--mount {m}: {}: {e}", m.host.display()))?;
                if host.to_string_lossy().contains(',') {
                    bail!(
                        "--mount {m}: {} holds a ',', which virtiofsd cannot take",
                        host.display()
                    );
                }
                Ok(banger_core::mount::HostMount { host, ..m.clone() })
            })
            .collect::<anyhow::Result<_>>()?,
        root_mib: f
            .root_size
            .as_deref()
            .map(parse_size_mib)
            .transpose()
            .map_err(|e| anyhow!("--root-size: {e}"))?,
        from: f.from.clone(),
        cold: f.cold,
    })
}

fn expect_vm(r: Response) -> anyhow::Result<VmInfo> {
    match r {
        Response::Vm(v) => Ok(*v),
        other => bail!("unexpected answer from bangerd: {other:?}"),
    }
}

/// A request answered with a VM: prints its name. `doing` labels the
/// spinner ("starting x") on a terminal.
fn vm_action(client: &Client, req: Request, doing: Option<String>) -> anyhow::Result<i32> {
    let vm = match doing {
        Some(d) => {
            let mut ui = crate::ui::Ui::new(d);
            let r = client.call(req, &mut |e| ui.event(e));
            ui.clear();
            expect_vm(r?)?
        }
        None => expect_vm(client.call(req, &mut progress)?)?,
    };
    println!("{}", vm.name);
    Ok(0)
}

pub fn run(client: &Client, cmd: VmCmd) -> anyhow::Result<i32> {
    match cmd {
        VmCmd::Run {
            create,
            rm,
            timings,
            detach,
            command,
        } => {
            if detach {
                return vm_run_detached(client, &create, timings, &command);
            }
            vm_run(client, &create, rm, timings, &command)
        }
        VmCmd::Create { create, timings } => {
            let t0 = Instant::now();
            let mut phases: Vec<(String, u64)> = Vec::new();
            let mut ui = crate::ui::Ui::new(doing("creating", &create));
            let mut on_event = |e: Event| {
                if let Event::Phase { name, micros } = &e {
                    phases.push((name.clone(), *micros));
                }
                ui.event(e)
            };
            let req = Request::VmCreate(Box::new(create_request(&create, false, false)?));
            let r = client.call(req, &mut on_event);
            ui.clear();
            let vm = expect_vm(r?)?;
            if timings {
                print_timings(&phases, t0.elapsed().as_micros() as u64);
            }
            println!("{}", vm.name);
            Ok(0)
        }
        VmCmd::Start { name } => {
            let doing = format!("starting {name}");
            vm_action(client, Request::VmStart { name }, Some(doing))
        }
        VmCmd::Stop { name } => {
            let doing = format!("stopping {name}");
            vm_action(client, Request::VmStop { name }, Some(doing))
        }
        VmCmd::Restart { name } => {
            let vm = expect_vm(client.call(Request::VmGet { name: name.clone() }, &mut progress)?)?;
            // A VM that is not running just starts (docker's restart).
            if matches!(vm.state, VmState::Running | VmState::Paused) {
                let mut ui = crate::ui::Ui::new(format!("stopping {name}"));
                let r = client.call(Request::VmStop { name: name.clone() }, &mut |e| ui.event(e));
                ui.clear();
                r?;
            }
            let doing = format!("starting {name}");
            vm_action(client, Request::VmStart { name }, Some(doing))
        }
        VmCmd::Kill { name } => vm_action(client, Request::VmKill { name }, None),
        VmCmd::Pause { name, to_disk } => {
            let doing = to_disk.then(|| format!("saving {name}'s guest to disk"));
            vm_action(client, Request::VmPause { name, to_disk }, doing)
        }
        VmCmd::Resume { name } => vm_action(client, Request::VmResume { name }, None),
        VmCmd::Snapshot { name, snapshot } => crate::snapshot::take(client, name, snapshot),
        VmCmd::Fork { name, new, count } => crate::snapshot::fork(client, name, new, count),
        VmCmd::Delete { names, force } => Ok(delete_each(client, &names, force)),
        VmCmd::Prune { force } => prune(client, force),
        VmCmd::Ls {
            json,
            quiet,
            filter,
        } => {
            let Response::Vms { vms } = client.call(Request::VmList, &mut progress)? else {
                bail!("unexpected answer to vm ls");
            };
            let vms: Vec<VmInfo> = vms
                .into_iter()
                .filter(|v| filter.iter().all(|f| f.matches(v)))
                .collect();
            if quiet {
                vms.iter().for_each(|v| println!("{}", v.name));
                return Ok(0);
            }
            emit(json, &vms, print_vms)
        }
        VmCmd::Show { name, json } => {
            let vm = expect_vm(client.call(Request::VmGet { name }, &mut progress)?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&vm)?);
            } else {
                print_vm(&vm);
            }
            Ok(0)
        }
        VmCmd::Ssh {
            name,
            tty,
            no_tty,
            command,
        } => {
            let vm = expect_vm(client.call(Request::VmGet { name }, &mut progress)?)?;
            if vm.state == VmState::Paused {
                bail!(
                    "vm {:?} is paused: resume it first (`banger vm resume {}`)",
                    vm.name,
                    vm.name
                );
            }
            if vm.state != VmState::Running {
                bail!(
                    "vm {:?} is {}: start it with `banger vm start {}`",
                    vm.name,
                    vm.state,
                    vm.name
                );
            }
            // Ready means the agent is; sshd may still be starting.
            crate::guest::wait_ssh(client, &vm.name)?;
            // ssh's own rule: a terminal for a shell on a terminal; -t asks
            // for one for CMD too (`vm ssh x -t -- vim`), -T for none.
            let tty = tty || (!no_tty && command.is_empty() && std::io::stdin().is_terminal());
            let err = ssh_command(&vm, &command, tty)?.exec();
            Err(err).context("exec ssh")
        }
        VmCmd::Exec {
            name,
            flags,
            command,
        } => crate::guest::exec(client, &name, &flags, &command),
        VmCmd::Ps { name, json } => {
            let list = crate::guest::ps(client, &name)?;
            emit(json, &list, crate::output::print_procs)
        }
        VmCmd::Attach {
            name,
            target,
            interactive,
            sig_proxy,
            detach_keys,
        } => crate::guest::attach(client, &name, &target, interactive, sig_proxy, &detach_keys),
        VmCmd::Signal {
            name,
            target,
            signal,
        } => {
            crate::guest::signal(client, &name, &target, &signal)?;
            Ok(0)
        }
        VmCmd::Commit { name, image } => crate::image::commit(client, &name, &image),
        VmCmd::Cp { src, dst } => {
            crate::cp::cp(client, &src, &dst)?;
            Ok(0)
        }
        VmCmd::Port(PortCmd::Add { name, port }) => {
            vm_action(client, Request::VmPortAdd { name, port }, None)
        }
        VmCmd::Port(PortCmd::Rm { name, host }) => {
            vm_action(client, Request::VmPortRm { name, host }, None)
        }
        VmCmd::Port(PortCmd::Ls { name, json }) => {
            let vm = expect_vm(client.call(Request::VmGet { name }, &mut progress)?)?;
            emit(json, &vm.net.ports, print_ports)
        }
        VmCmd::Logs { name, follow } => {
            client.call(Request::VmLogs { name, follow }, &mut progress)?;
            Ok(0)
        }
        VmCmd::Stats { name, json, watch } => loop {
            let Response::Stats { stats } =
                client.call(Request::VmStats { name: name.clone() }, &mut progress)?
            else {
                bail!("unexpected answer to vm stats");
            };
            emit(json, &stats, print_stats)?;
            if !watch {
                return Ok(0);
            }
            std::thread::sleep(std::time::Duration::from_secs(2));
        },
    }
}

fn vm_run(
    client: &Client,
    create: &CreateFlags,
    rm: bool,
    timings: bool,
    command: &[String],
) -> anyhow::Result<i32> {
    let t0 = Instant::now();
    let req = create_request(create, true, rm)?;
    let mut phases: Vec<(String, u64)> = Vec::new();
    let mut ui = crate::ui::Ui::new(doing("booting", create));
    let spinner = ui.handle();
    let mut on_event = |e: Event| {
        if let Event::Phase { name, micros } = &e {
            phases.push((name.clone(), *micros));
        }
        ui.event(e)
    };
    if !rm {
        let r = client.call(Request::VmCreate(Box::new(req)), &mut on_event);
        ui.clear();
        let vm = expect_vm(r?)?;
        if timings {
            print_timings(&phases, t0.elapsed().as_micros() as u64);
        }
        let t = Instant::now();
        let code = crate::guest::run_in(client, &vm.name, command);
        if timings {
            eprintln!("timing command       {:>9.1} ms", ms(t));
            eprintln!("timing total         {:>9.1} ms", ms(t0));
        }
        return code;
    }
    // --rm: the VM lives as long as this connection (the daemon deletes it
    // when we hang up, however we go).
    let mut t_ssh = None;
    let mut ran_in = None;
    let (code, answer) = client.call_lease(Request::VmCreate(Box::new(req)), &mut on_event, |vm| {
        // The command's own output follows: no spinner over it.
        if let Some(b) = &spinner {
            b.finish_and_clear();
        }
        ran_in = Some(vm.name.clone());
        let t = Instant::now();
        let code = crate::guest::run_in(client, &vm.name, command);
        t_ssh = Some((t, t.elapsed()));
        code
    });
    // The daemon went while the command ran (a crash: no answer; a
    // shutdown: it answers with the VM it leaves running): the command's
    // status is still the answer, and the VM goes as this process does
    // (the next daemon watches for that).
    let went = match (&answer, &ran_in) {
        (Err(e @ (ClientError::NoAnswer(..) | ClientError::Io { .. })), Some(name)) => {
            Some((name.clone(), e.to_string()))
        }
        (Ok(Response::Vm(vm)), Some(name)) if code.is_some() => Some((
            name.clone(),
            format!("it stopped and left vm {} running", vm.name),
        )),
        _ => None,
    };
    if let Some((name, why)) = went {
        eprintln!(
            "vm {name}: bangerd went while the command ran ({why}): the next bangerd \
             deletes the VM once this command has ended"
        );
        // (Started now if none runs: it finds the VM and watches for this
        // process to end.)
        let _ = client.call(Request::Ping, &mut |_| {});
        return code.unwrap_or(Ok(1));
    }
    let answer = answer?;
    if !matches!(answer, Response::Deleted { .. }) {
        bail!("unexpected answer from bangerd: {answer:?}");
    }
    let code = code.ok_or_else(|| anyhow!("bangerd never said the VM was up"))??;
    if timings {
        if let Some((t, took)) = t_ssh {
            let ready = t.duration_since(t0);
            print_timings(&phases, ready.as_micros() as u64);
            eprintln!("timing command       {:>9.1} ms", took.as_secs_f64() * 1e3);
            eprintln!(
                "timing teardown      {:>9.1} ms",
                (t.elapsed() - took).as_secs_f64() * 1e3
            );
        }
        eprintln!("timing total         {:>9.1} ms", ms(t0));
    }
    Ok(code)
}

/// `vm run -d`: create and boot, start CMD (if any) in the background
/// through the agent, print the VM's name.
fn vm_run_detached(
    client: &Client,
    create: &CreateFlags,
    timings: bool,
    command: &[String],
) -> anyhow::Result<i32> {
    let t0 = Instant::now();
    let req = create_request(create, true, false)?;
    let mut phases: Vec<(String, u64)> = Vec::new();
    let mut ui = crate::ui::Ui::new(doing("booting", create));
    let mut on_event = |e: Event| {
        if let Event::Phase { name, micros } = &e {
            phases.push((name.clone(), *micros));
        }
        ui.event(e)
    };
    let r = client.call(Request::VmCreate(Box::new(req)), &mut on_event);
    ui.clear();
    let vm = expect_vm(r?)?;
    if timings {
        print_timings(&phases, t0.elapsed().as_micros() as u64);
    }
    if !command.is_empty() {
        let pid = crate::guest::start_detached(client, &vm.name, command)?;
        eprintln!(
            "{}: started pid {pid} (`banger vm attach {} {pid}`)",
            vm.name, vm.name
        );
    }
    println!("{}", vm.name);
    Ok(0)
}

/// `vm prune`: every VM that is not running (or booting, or stopping) is
/// deleted, after a question on a terminal; `-f` does not ask.
fn prune(client: &Client, force: bool) -> anyhow::Result<i32> {
    let Response::Vms { vms } = client.call(Request::VmList, &mut progress)? else {
        bail!("unexpected answer to vm ls");
    };
    let gone: Vec<&VmInfo> = vms
        .iter()
        .filter(|v| {
            matches!(
                v.state,
                VmState::Created | VmState::Stopped | VmState::Error
            )
        })
        .collect();
    if gone.is_empty() {
        return Ok(0);
    }
    if !force {
        if !std::io::stdin().is_terminal() {
            bail!(
                "vm prune would delete {} VM(s): run it on a terminal to be asked, or with -f",
                gone.len()
            );
        }
        let names: Vec<&str> = gone.iter().map(|v| v.name.as_str()).collect();
        eprint!("delete {} (their disks too)? [y/N] ", names.join(", "));
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            return Ok(1);
        }
    }
    // Without force: a VM started since the listing is left alone.
    let names: Vec<String> = gone.iter().map(|v| v.name.clone()).collect();
    Ok(delete_each(client, &names, false))
}

/// Deletes each VM, printing the names deleted and each failure; 1 if any
/// failed (the others are still deleted).
fn delete_each(client: &Client, names: &[String], force: bool) -> i32 {
    let mut failed = false;
    for name in names {
        let req = Request::VmDelete {
            name: name.clone(),
            force,
        };
        match client.call(req, &mut progress) {
            Ok(_) => println!("{name}"),
            Err(e) => {
                eprintln!(
                    "banger: {}",
                    banger_core::text::escape_control(&e.to_string(), true)
                );
                failed = true;
            }
        }
    }
    i32::from(failed)
}

/// `vm ls --filter KEY=VALUE`.
#[derive(Debug, Clone)]
pub struct Filter {
    key: FilterKey,
    value: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FilterKey {
    State,
    Name,
    Image,
    Vmm,
    Network,
}

const STATES: [VmState; 10] = [
    VmState::Creating,
    VmState::Created,
    VmState::Starting,
    VmState::Running,
    VmState::Paused,
    VmState::Suspended,
    VmState::Stopping,
    VmState::Stopped,
    VmState::Error,
    VmState::Deleting,
];

impl std::str::FromStr for Filter {
    type Err = String;
    fn from_str(s: &str) -> Result<Filter, String> {
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: want KEY=VALUE, e.g. state=running"))?;
        let key = match k {
            "state" | "status" => FilterKey::State,
            "name" => FilterKey::Name,
            "image" => FilterKey::Image,
            "vmm" => FilterKey::Vmm,
            "network" => FilterKey::Network,
            other => {
                return Err(format!(
                    "unknown filter {other:?}: state, name, image, vmm or network"
                ))
            }
        };
        if key == FilterKey::State && !STATES.iter().any(|st| st.to_string() == v) {
            let all: Vec<String> = STATES.iter().map(|s| s.to_string()).collect();
            return Err(format!("state {v:?}: one of {}", all.join(", ")));
        }
        Ok(Filter {
            key,
            value: v.to_string(),
        })
    }
}

impl Filter {
    pub fn matches(&self, v: &VmInfo) -> bool {
        match self.key {
            FilterKey::State => v.state.to_string() == self.value,
            FilterKey::Name => v.name.contains(&self.value),
            FilterKey::Image => v.image == self.value,
            FilterKey::Vmm => v.vmm.to_string() == self.value,
            FilterKey::Network => v.net.network.as_deref() == Some(self.value.as_str()),
        }
    }
}

/// The spinner's label: "booting scratch" (or "booting a VM").
fn doing(verb: &str, f: &CreateFlags) -> String {
    match &f.name {
        Some(n) => format!("{verb} {n}"),
        None => format!("{verb} a VM"),
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn ssh_command(vm: &VmInfo, command: &[String], tty: bool) -> anyhow::Result<Command> {
    let ip = vm
        .guest_ip
        .as_deref()
        .ok_or_else(|| anyhow!("vm {:?} has no address", vm.name))?;
    let mut c = Command::new("ssh");
    c.args(ssh::args(vm, ip, command, tty));
    Ok(c)
}
