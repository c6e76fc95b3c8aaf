//! banger, the CLI: a thin client of bangerd plus ssh.

mod client;
mod ssh;

use std::io::IsTerminal;
use std::net::Ipv4Addr;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{anyhow, bail, Context};
use banger_core::api::{CreateVm, Event, ImageInfo, Request, Response, VmInfo};
use banger_core::layout::{RUNTIME_DIR_ENV, STATE_DIR_ENV};
use banger_core::sizing::{parse_size_mib, SizeRequest};
use banger_core::{Layout, VmState, VmmKind};
use clap::{Args, Parser, Subcommand};
use client::Client;

#[derive(Debug, Parser)]
#[command(
    name = "banger",
    version,
    about = "Disposable Linux microVMs in one command"
)]
struct Cli {
    /// State dir (database, images, VM disks). Default /var/lib/banger.
    #[arg(long, global = true, env = STATE_DIR_ENV)]
    state_dir: Option<PathBuf>,
    /// Runtime dir (sockets). Default /run/banger.
    #[arg(long, global = true, env = RUNTIME_DIR_ENV)]
    runtime_dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create, run and manage VMs.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Build and list guest images.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Check what this host can do.
    Doctor {
        #[arg(long)]
        json: bool,
    },
    /// Talk to the daemon itself.
    #[command(subcommand)]
    Daemon(DaemonCmd),
    /// Helpers for banger's own scripts.
    #[command(subcommand, hide = true)]
    Internal(InternalCmd),
}

#[derive(Debug, Args, Clone)]
struct CreateFlags {
    /// VM name: a DNS label (a-z, 0-9, '-'); generated when absent.
    #[arg(long)]
    name: Option<String>,
    /// Image to boot (default: bookworm).
    #[arg(long)]
    image: Option<String>,
    /// vCPUs (default: host-aware).
    #[arg(long)]
    cpus: Option<u32>,
    /// Memory, e.g. 1024, 512M, 2G (default: host-aware).
    #[arg(long)]
    memory: Option<String>,
    /// Work disk size, e.g. 4G (default: host-aware).
    #[arg(long)]
    disk_size: Option<String>,
    /// Force a VMM: qemu or firecracker (default: chosen by host).
    #[arg(long)]
    vmm: Option<VmmKind>,
}

#[derive(Debug, Subcommand)]
enum VmCmd {
    /// Create and boot a VM, then run CMD in it (or open a shell).
    Run {
        #[command(flatten)]
        create: CreateFlags,
        /// Delete the VM when the command or shell ends.
        #[arg(long)]
        rm: bool,
        /// Print how long each phase took.
        #[arg(long)]
        timings: bool,
        /// Command to run in the guest.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Create a VM without booting it.
    Create {
        #[command(flatten)]
        create: CreateFlags,
    },
    /// Boot a created or stopped VM.
    Start { name: String },
    /// Power a VM off cleanly (Ctrl-Alt-Del), killing it after a timeout.
    Stop { name: String },
    /// Kill a VM's VMM at once.
    Kill { name: String },
    /// Delete a VM and everything it has (process, tap, disks, files).
    #[command(alias = "rm")]
    Delete {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// List VMs.
    #[command(alias = "list")]
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Show one VM.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Open a shell in a running VM, or run CMD there.
    Ssh {
        name: String,
        #[arg(last = true)]
        command: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum ImageCmd {
    /// Build an image (default: bookworm); cached unless --force.
    Build {
        #[arg(default_value = "bookworm")]
        name: String,
        #[arg(long)]
        force: bool,
    },
    /// List built images.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Delete an image no VM uses.
    Rm { name: String },
}

#[derive(Debug, Subcommand)]
enum DaemonCmd {
    /// Start the daemon if needed and print its pid.
    Ping,
    /// Wait until the taps and NAT rules of deleted or stopped VMs are
    /// released (the daemon does that just after replying); retries failed
    /// releases. After it, the host holds nothing of VMs that are gone.
    Settle,
}

#[derive(Debug, Subcommand)]
enum InternalCmd {
    /// Per-VM NAT rules (the same code the daemon uses).
    #[command(subcommand)]
    Nat(NatCmd),
}

#[derive(Debug, Subcommand)]
enum NatCmd {
    Up {
        #[arg(long)]
        id: String,
        #[arg(long)]
        tap: String,
        #[arg(long)]
        guest_ip: Ipv4Addr,
        /// Uplink interface (default: the default route's).
        #[arg(long)]
        uplink: Option<String>,
    },
    Down {
        #[arg(long)]
        id: String,
    },
}

fn main() {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("banger: {e:#}");
            std::process::exit(1);
        }
    }
}

fn progress(e: Event) {
    match e {
        Event::Progress { message } => eprintln!("{message}"),
        Event::Spec { line } => eprintln!("{line}"),
        Event::Phase { .. } => {}
    }
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    let layout = Layout::resolve(cli.state_dir, cli.runtime_dir, None, None);
    let client = Client { layout };
    match cli.cmd {
        Cmd::Vm(v) => vm(&client, v),
        Cmd::Image(i) => image(&client, i),
        Cmd::Doctor { json } => {
            let Response::Doctor { checks } = client.call(Request::Doctor, &mut progress)? else {
                bail!("unexpected answer to doctor");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&checks)?);
            } else {
                for c in &checks {
                    println!(
                        "{:4} {:20} {}",
                        if c.ok { "ok" } else { "--" },
                        c.name,
                        c.detail
                    );
                }
            }
            Ok(0)
        }
        Cmd::Daemon(DaemonCmd::Ping) => {
            let Response::Pong { version, pid } = client.call(Request::Ping, &mut progress)? else {
                bail!("unexpected answer to ping");
            };
            println!("bangerd pid {pid}, protocol {version}");
            Ok(0)
        }
        Cmd::Daemon(DaemonCmd::Settle) => {
            let Response::Settled { retried } = client.call(Request::Settle, &mut progress)? else {
                bail!("unexpected answer to settle");
            };
            if retried > 0 {
                eprintln!("retried {retried} release(s) that had failed");
            }
            Ok(0)
        }
        Cmd::Internal(InternalCmd::Nat(n)) => {
            match n {
                NatCmd::Up {
                    id,
                    tap,
                    guest_ip,
                    uplink,
                } => {
                    let uplink = uplink
                        .or_else(banger_host::nat::default_uplink)
                        .ok_or_else(|| anyhow!("no default route: pass --uplink"))?;
                    banger_host::nat::up(&banger_host::nat::NatSpec {
                        vm_id: id,
                        tap,
                        guest_ip,
                        uplink,
                    })?
                }
                NatCmd::Down { id } => banger_host::nat::down(&id)?,
            }
            Ok(0)
        }
    }
}

fn create_request(f: &CreateFlags, start: bool) -> anyhow::Result<CreateVm> {
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
    })
}

fn expect_vm(r: Response) -> anyhow::Result<VmInfo> {
    match r {
        Response::Vm(v) => Ok(*v),
        other => bail!("unexpected answer from bangerd: {other:?}"),
    }
}

fn vm(client: &Client, cmd: VmCmd) -> anyhow::Result<i32> {
    match cmd {
        VmCmd::Run {
            create,
            rm,
            timings,
            command,
        } => {
            let t0 = Instant::now();
            let req = create_request(&create, true)?;
            let mut phases: Vec<(String, u64)> = Vec::new();
            // The spec line comes once the VM exists: with --rm, a VM this
            // call created and then failed to start is deleted again.
            let mut created: Option<String> = None;
            let mut on_event = |e: Event| match e {
                Event::Phase { name, micros } => phases.push((name, micros)),
                Event::Spec { line } => {
                    created = line.split(':').next().map(str::to_string);
                    progress(Event::Spec { line });
                }
                other => progress(other),
            };
            let answer = client.call(Request::VmCreate(req), &mut on_event);
            let vm = match answer.map_err(anyhow::Error::from).and_then(expect_vm) {
                Ok(vm) => vm,
                Err(e) => {
                    if let (true, Some(name)) = (rm, created) {
                        let _ = client.call(Request::VmDelete { name }, &mut progress);
                    }
                    return Err(e);
                }
            };
            let ready = t0.elapsed();
            if timings {
                print_timings(&phases, ready.as_micros() as u64);
            }
            let tty = command.is_empty() && std::io::stdin().is_terminal();
            if !rm && !timings {
                // Nothing left to do after ssh: become it.
                let err = ssh_command(&vm, &command, tty)?.exec();
                return Err(err).context("exec ssh");
            }
            let t_ssh = Instant::now();
            // With --rm the VM goes even when ssh itself cannot run.
            let code = run_ssh(&vm, &command, tty);
            let t_cmd = t_ssh.elapsed();
            if rm {
                let t = Instant::now();
                client.call(
                    Request::VmDelete {
                        name: vm.name.clone(),
                    },
                    &mut progress,
                )?;
                if timings {
                    eprintln!("timing ssh+command   {:>9.1} ms", t_cmd.as_secs_f64() * 1e3);
                    eprintln!(
                        "timing teardown      {:>9.1} ms",
                        t.elapsed().as_secs_f64() * 1e3
                    );
                }
            } else if timings {
                eprintln!("timing ssh+command   {:>9.1} ms", t_cmd.as_secs_f64() * 1e3);
            }
            if timings {
                eprintln!(
                    "timing total         {:>9.1} ms",
                    t0.elapsed().as_secs_f64() * 1e3
                );
            }
            code
        }
        VmCmd::Create { create } => {
            vm_action(client, Request::VmCreate(create_request(&create, false)?))
        }
        VmCmd::Start { name } => vm_action(client, Request::VmStart { name }),
        VmCmd::Stop { name } => vm_action(client, Request::VmStop { name }),
        VmCmd::Kill { name } => vm_action(client, Request::VmKill { name }),
        VmCmd::Delete { names } => {
            let mut failed = false;
            for name in names {
                match client.call(Request::VmDelete { name: name.clone() }, &mut progress) {
                    Ok(_) => println!("{name}"),
                    Err(e) => {
                        eprintln!("banger: {e}");
                        failed = true;
                    }
                }
            }
            Ok(i32::from(failed))
        }
        VmCmd::Ls { json } => {
            let Response::Vms { vms } = client.call(Request::VmList, &mut progress)? else {
                bail!("unexpected answer to vm ls");
            };
            emit(json, &vms, print_vms)
        }
        VmCmd::Show { name, json } => {
            let vm = expect_vm(client.call(Request::VmGet { name }, &mut progress)?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&vm)?);
                return Ok(0);
            }
            emit(false, std::slice::from_ref(&vm), print_vms)
        }
        VmCmd::Ssh { name, command } => {
            let vm = expect_vm(client.call(Request::VmGet { name }, &mut progress)?)?;
            if vm.state != VmState::Running {
                bail!(
                    "vm {:?} is {}: start it with `banger vm start {}`",
                    vm.name,
                    vm.state,
                    vm.name
                );
            }
            let tty = command.is_empty() && std::io::stdin().is_terminal();
            let err = ssh_command(&vm, &command, tty)?.exec();
            Err(err).context("exec ssh")
        }
    }
}

/// Prints `items` as pretty JSON (`--json`) or with `table`.
fn emit<T: serde::Serialize>(json: bool, items: &[T], table: fn(&[T])) -> anyhow::Result<i32> {
    if json {
        println!("{}", serde_json::to_string_pretty(items)?);
    } else {
        table(items);
    }
    Ok(0)
}

/// A request answered with a VM: prints its name.
fn vm_action(client: &Client, req: Request) -> anyhow::Result<i32> {
    let vm = expect_vm(client.call(req, &mut progress)?)?;
    println!("{}", vm.name);
    Ok(0)
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

/// Runs ssh as a child and returns the exit code a shell would report.
fn run_ssh(vm: &VmInfo, command: &[String], tty: bool) -> anyhow::Result<i32> {
    let status = ssh_command(vm, command, tty)?
        .status()
        .context("run ssh (apt-get install openssh-client)")?;
    Ok(status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}

fn print_timings(phases: &[(String, u64)], ready_micros: u64) {
    let mut accounted = 0;
    for (name, us) in phases {
        eprintln!("timing {:<13} {:>9.1} ms", name, *us as f64 / 1e3);
        // "-async" phases overlap the others (NAT runs during the boot).
        if !name.ends_with("-async") {
            accounted += us;
        }
    }
    eprintln!(
        "timing {:<13} {:>9.1} ms",
        "rpc+cli",
        ready_micros.saturating_sub(accounted) as f64 / 1e3
    );
    eprintln!(
        "timing {:<13} {:>9.1} ms",
        "ready",
        ready_micros as f64 / 1e3
    );
}

fn age(created: i64) -> String {
    let now = banger_core::unix_now();
    let s = (now - created).max(0);
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86399 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

fn print_vms(vms: &[VmInfo]) {
    println!(
        "{:<24} {:<9} {:<15} {:>4} {:>8} {:<11} {:>5}  LAST ERROR",
        "NAME", "STATE", "IP", "VCPU", "MEMORY", "VMM", "AGE"
    );
    for v in vms {
        println!(
            "{:<24} {:<9} {:<15} {:>4} {:>8} {:<11} {:>5}  {}",
            v.name,
            v.state.to_string(),
            v.guest_ip.as_deref().unwrap_or("-"),
            v.cpus,
            format!("{}M", v.memory_mib),
            format!("{}/{}", v.vmm, v.accel),
            age(v.created_at),
            v.last_error
                .as_deref()
                .map(|e| e.lines().next().unwrap_or(""))
                .unwrap_or("")
        );
    }
}

fn image(client: &Client, cmd: ImageCmd) -> anyhow::Result<i32> {
    match cmd {
        ImageCmd::Build { name, force } => {
            let r = client.call(Request::ImageBuild { name, force }, &mut progress)?;
            if let Response::Image(i) = r {
                println!("{}", i.name);
            }
            Ok(0)
        }
        ImageCmd::Ls { json } => {
            let Response::Images { images } = client.call(Request::ImageList, &mut progress)?
            else {
                bail!("unexpected answer to image ls");
            };
            emit(json, &images, print_images)
        }
        ImageCmd::Rm { name } => {
            client.call(Request::ImageDelete { name: name.clone() }, &mut progress)?;
            println!("{name}");
            Ok(0)
        }
    }
}

fn print_images(images: &[ImageInfo]) {
    println!("{:<16} {:<24} {:>10}  DIR", "NAME", "KERNEL", "ROOTFS");
    for i in images {
        println!(
            "{:<16} {:<24} {:>9}M  {}",
            i.name,
            i.kernel_version,
            i.rootfs_bytes / (1024 * 1024),
            i.dir.display()
        );
    }
}
