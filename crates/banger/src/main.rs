//! banger, the CLI: a thin client of bangerd plus ssh.

mod api;
mod cp;
mod detach;
mod dnsinstall;
mod guest;
mod image;
mod mcp;
mod network;
mod output;
mod snapshot;
mod ssh;
mod ui;
mod vm;
mod volume;

use std::net::Ipv4Addr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use banger::client::{self, Client};
use banger_core::api::{Event, Request, Response};
use banger_core::layout::{RUNTIME_DIR_ENV, STATE_DIR_ENV};
use banger_core::net::Cidr;
use banger_core::{Layout, VmmKind};
use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "banger",
    version,
    about = "Disposable Linux microVMs in one command"
)]
struct Cli {
    // The variables are read in `main`, not by clap: an option clap filled
    // from the environment shows in every usage line as if required.
    /// State dir (database, images, VM disks). Default $BANGER_STATE_DIR,
    /// else /var/lib/banger.
    #[arg(long, global = true)]
    state_dir: Option<PathBuf>,
    /// Runtime dir (sockets). Default $BANGER_RUNTIME_DIR, else /run/banger.
    #[arg(long, global = true)]
    runtime_dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create, run and manage VMs.
    #[command(subcommand)]
    Vm(Box<VmCmd>),
    /// Build and list guest images.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Named volumes: disks that outlive VMs (`vm run --volume NAME:/path`).
    #[command(subcommand)]
    Volume(volume::VolumeCmd),
    /// Snapshots of VMs (`vm snapshot`; `vm run --from SNAP` restores one).
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCmd),
    /// The E2B-compatible API (E2B's SDKs drive banger VMs through it).
    #[command(subcommand)]
    Api(api::ApiCmd),
    /// Serve MCP on stdio: an MCP client creates and uses banger VMs
    /// (register `banger mcp` as a stdio server; docs/usage.md).
    Mcp,
    /// Networks of VMs (`vm run --network NAME`): who has one, who may join.
    #[command(subcommand)]
    Network(network::NetworkCmd),
    /// Route the host's `<name>.vm` lookups to banger's DNS, or stop.
    #[command(subcommand)]
    Dns(DnsCmd),
    /// An ssh config snippet for `ssh <name>.vm` (Include it from
    /// ~/.ssh/config): banger's key, the pinned host keys, and a proxy
    /// that finds the VM through the daemon (no DNS setup needed).
    SshConfig,
    /// Check what this host can do.
    Doctor {
        #[arg(long)]
        json: bool,
    },
    /// Talk to the daemon itself.
    #[command(subcommand)]
    Daemon(DaemonCmd),
    /// The daemon's settings (/etc/banger/config.toml, its flags and
    /// environment).
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Print a completion script for a shell: bash, zsh, fish, elvish,
    /// powershell (`banger completion bash > /etc/bash_completion.d/banger`).
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Helpers for banger's own scripts.
    #[command(subcommand, hide = true)]
    Internal(InternalCmd),
}

#[derive(Debug, Args, Clone)]
pub struct CreateFlags {
    /// VM name: a DNS label (a-z, 0-9, '-'); generated when absent.
    #[arg(long)]
    name: Option<String>,
    /// A label, KEY=VALUE (repeatable): shown by `vm ls --json` and `vm
    /// show`, and as an E2B sandbox's metadata.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
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
    /// Stop the VM this long after it started (e.g. 30m, 2h).
    #[arg(long, value_name = "DUR")]
    ttl: Option<String>,
    /// Stop the VM once it has been idle this long (no CPU to speak of,
    /// no network traffic), e.g. 10m.
    #[arg(long, value_name = "DUR")]
    idle_timeout: Option<String>,
    /// What the guest may reach: nat (the outside world; never the host,
    /// its networks or other guests) or none.
    #[arg(long, value_enum, default_value = "nat")]
    net: NetMode,
    /// A range the guest may reach despite the isolation, e.g. a LAN
    /// service: 192.168.1.0/24 (repeatable).
    #[arg(long = "allow-net", value_name = "CIDR")]
    allow_net: Vec<Cidr>,
    /// Publish a guest port on the host: [ADDR:]HOST:GUEST[/udp]; ADDR
    /// defaults to 127.0.0.1 (repeatable).
    #[arg(short = 'p', long = "publish", value_name = "PORTS")]
    publish: Vec<banger_core::net::PortMap>,
    /// Make the root filesystem this large (at least the image's; the
    /// guest grows it at boot): 4G, 10240M.
    #[arg(long, value_name = "SIZE")]
    root_size: Option<String>,
    /// Mount a named volume at a path in the guest: NAME:/path
    /// (repeatable; `banger volume create` makes one).
    #[arg(long = "volume", short = 'v', value_name = "NAME:/PATH")]
    volume: Vec<banger_core::volume::VolumeMount>,
    /// Share a host directory with the guest through virtio-fs (QEMU):
    /// /host/dir:/guest/dir, :ro for read-only (enforced on the host);
    /// repeatable.
    #[arg(long = "mount", value_name = "HOST:GUEST[:ro]")]
    mount: Vec<banger_core::mount::HostMount>,
    /// Put the VM on a shared network (created on first use): its VMs
    /// reach and resolve each other as <name>.vm; others cannot.
    #[arg(long, value_name = "NAME")]
    network: Option<String>,
    /// Make the VM a clone of a snapshot (`vm snapshot`): its image,
    /// sizes, memory and disks, restored instead of booted, under this
    /// VM's own name, address and keys.
    #[arg(long, value_name = "SNAP")]
    from: Option<String>,
    /// Boot the image even where a warm-start snapshot of it (and these
    /// sizes) is cached, and leave none.
    #[arg(long, conflicts_with = "from")]
    cold: bool,
}

#[derive(Debug, Subcommand)]
pub enum VmCmd {
    /// Create and boot a VM, then run CMD in it (or open a shell).
    Run {
        #[command(flatten)]
        create: CreateFlags,
        /// Delete the VM when the command or shell ends (or when this
        /// command is interrupted: the daemon sees it go).
        #[arg(long)]
        rm: bool,
        /// Print how long each phase took.
        #[arg(long)]
        timings: bool,
        /// Leave the VM running and print its name; a CMD runs in the
        /// background (`vm ps`, `vm attach` find it).
        #[arg(short, long, conflicts_with = "rm")]
        detach: bool,
        /// Command to run in the guest.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Create a VM without booting it.
    Create {
        #[command(flatten)]
        create: CreateFlags,
        /// Print how long each phase took (root disk, work disk, ...).
        #[arg(long)]
        timings: bool,
    },
    /// Boot a created or stopped VM.
    Start { name: String },
    /// Power a VM off cleanly (Ctrl-Alt-Del), killing it after a timeout.
    Stop { name: String },
    /// Stop a running VM (as `vm stop`), then start it again.
    Restart { name: String },
    /// Kill a VM's VMM at once (a boot in progress is cancelled).
    Kill { name: String },
    /// Stop a running VM's vCPUs; its memory, network and open sessions
    /// are kept (`vm resume` goes on).
    Pause {
        name: String,
        /// Save the guest's memory and devices to disk and end its VMM
        /// (its memory given back, state "suspended"); `vm resume`
        /// restores it, processes included; open sessions end (QEMU).
        #[arg(long)]
        to_disk: bool,
    },
    /// Run a paused VM again, its clock set to now (a suspended one is
    /// restored from disk first).
    Resume { name: String },
    /// Snapshot a running or paused VM (memory, devices, disks); it goes
    /// on as it was. Prints the snapshot's name (SNAP, or one made up).
    Snapshot {
        name: String,
        snapshot: Option<String>,
    },
    /// Clones of a running VM, each its own machine (name, address, keys)
    /// with the VM's memory, processes and files of the moment: NEW, or
    /// NEW-1 to NEW-COUNT. Prints their names.
    Fork {
        name: String,
        new: String,
        /// How many clones.
        #[arg(short = 'n', long, default_value_t = 1)]
        count: u32,
    },
    /// Delete a VM and everything it has (process, tap, disks, files).
    #[command(name = "rm", visible_alias = "delete")]
    Delete {
        #[arg(required = true)]
        names: Vec<String>,
        /// Delete a VM that runs too (its VMM is killed).
        #[arg(short, long)]
        force: bool,
    },
    /// Delete every VM that is not running (created, stopped, in error).
    Prune {
        /// Do not ask.
        #[arg(short, long)]
        force: bool,
    },
    /// List VMs.
    #[command(alias = "list")]
    Ls {
        #[arg(long)]
        json: bool,
        /// Names only, one per line.
        #[arg(short, long, conflicts_with = "json")]
        quiet: bool,
        /// Only VMs that match: state=S, name=PART, image=I, vmm=V,
        /// network=N (repeatable; all must match).
        #[arg(long, value_name = "KEY=VALUE")]
        filter: Vec<vm::Filter>,
    },
    /// Show one VM.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Open a shell in a running VM, or run CMD there, over SSH.
    Ssh {
        name: String,
        /// A terminal for CMD too (default: only for a shell on a terminal).
        #[arg(short = 't', conflicts_with = "no_tty")]
        tty: bool,
        /// No terminal, even for a shell.
        #[arg(short = 'T')]
        no_tty: bool,
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Run CMD in a running VM through its agent (docker exec's flags and
    /// exit status; no SSH).
    Exec {
        name: String,
        #[command(flatten)]
        flags: guest::ExecFlags,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Processes started in a VM through its agent.
    Ps {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Join a process started with `vm exec -d`: its kept output, then
    /// live, until it exits. Leaving does not end it: Ctrl-C (or any
    /// signal) detaches, and so does the detach sequence typed with -i.
    Attach {
        name: String,
        /// Its pid or tag.
        target: String,
        /// Send this terminal's input to it.
        #[arg(short, long)]
        interactive: bool,
        /// Forward this command's signals (INT, TERM, HUP, QUIT) to the
        /// process instead of detaching.
        #[arg(long)]
        sig_proxy: bool,
        /// The keys that detach with -i (docker's format: ctrl-LETTER or a
        /// character, comma-separated); "" for none.
        #[arg(long, value_name = "KEYS", default_value = crate::detach::DEFAULT)]
        detach_keys: String,
    },
    /// Send a signal to a process started through the agent.
    Signal {
        name: String,
        /// Its pid or tag.
        target: String,
        /// A name (TERM, KILL, ...) or number.
        #[arg(short, long, default_value = "TERM")]
        signal: String,
    },
    /// Copy a file or tree between a VM and the host: NAME:/path on one
    /// side (docker cp's syntax); `-` is a tar stream on stdin or stdout.
    Cp { src: String, dst: String },
    /// Save a stopped VM's root filesystem as a new image (it boots with
    /// the VM's image's kernel).
    Commit { name: String, image: String },
    /// Print the guest's console (control characters escaped).
    Logs {
        name: String,
        /// Keep printing what the guest writes until it stops.
        #[arg(short, long)]
        follow: bool,
    },
    /// Published ports: add, remove, list.
    #[command(subcommand)]
    Port(PortCmd),
    /// CPU, memory, disk and network of running VMs (sampled every few
    /// seconds by the daemon).
    Stats {
        name: Option<String>,
        #[arg(long)]
        json: bool,
        /// Print again at each new sample, until interrupted.
        #[arg(long)]
        watch: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum PortCmd {
    /// Publish a guest port: [ADDR:]HOST:GUEST[/udp] (at once if the VM
    /// runs).
    Add {
        name: String,
        port: banger_core::net::PortMap,
    },
    /// Stop publishing a host port: PORT, ADDR:PORT or ADDR:PORT/PROTO.
    Rm { name: String, host: String },
    /// The VM's published ports.
    Ls {
        name: String,
        #[arg(long)]
        json: bool,
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
        /// Names only, one per line.
        #[arg(short, long, conflicts_with = "json")]
        quiet: bool,
    },
    /// Delete an image no VM uses.
    Rm { name: String },
    /// Import an image: an ext4 image, a root filesystem tarball (plain or
    /// gzip), a directory, or an OCI image (an OCI layout dir, or `docker
    /// save` output). banger's init and sshd config are added; the tree
    /// needs /bin/sh (sshd only for `vm ssh`). Without a kernel of its own
    /// it boots bookworm's.
    Import { name: String, source: PathBuf },
    /// Boot IMAGE with outside access, run SCRIPT in it as root, power it
    /// off and save its root filesystem as image NAME (the VM is deleted
    /// either way).
    Customize {
        name: String,
        /// The image to start from.
        #[arg(long, default_value = "bookworm")]
        from: String,
        /// A script (run with /bin/sh in the guest).
        #[arg(long, value_name = "SCRIPT")]
        run: PathBuf,
        /// The VMM to boot it with (default: the host's).
        #[arg(long)]
        vmm: Option<VmmKind>,
    },
}

#[derive(Debug, Subcommand)]
enum DaemonCmd {
    /// Start the daemon if needed and print its pid.
    Ping,
    /// Wait until the taps and NAT rules of deleted or stopped VMs are
    /// released (the daemon does that just after replying); retries failed
    /// releases. After it, the host holds nothing of VMs that are gone.
    Settle,
    /// Stop the daemon (root only) and wait for it to exit: it finishes
    /// the requests in flight; VMs keep running, and the next daemon
    /// (started by the next command, or systemd) picks them up.
    Stop,
    /// The daemon's pid, version, uptime, VMs by state, pending releases.
    Status {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCmd {
    /// Every setting's effective value and where it came from (default,
    /// the file, an environment variable, a flag).
    Show {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum DnsCmd {
    /// Give banger's DNS the `.vm` routing domain of systemd-resolved (or
    /// NetworkManager's dnsmasq).
    Install {
        /// Write under this root instead of / (and reload nothing).
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
    /// Remove what `dns install` wrote.
    Uninstall {
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum InternalCmd {
    /// ssh's ProxyCommand of `banger ssh-config`: connects stdin/stdout to
    /// port 22 of the VM named by HOST (`<name>.vm` or `<name>`).
    SshProxy { host: String },
    /// A VM's firewall and NAT rules (the same code the daemon uses).
    #[command(subcommand)]
    Firewall(FirewallCmd),
    /// Write banger's man pages (banger.1, banger-vm.1, ...) into DIR.
    Man { dir: PathBuf },
    /// Gives a running VM's guest its identity again (hostname, MAC,
    /// address, nameservers, keys, a new machine id and entropy), as the
    /// restore of a snapshot's clone does.
    Reidentify { name: String },
}

#[derive(Debug, Subcommand)]
enum FirewallCmd {
    Up {
        #[arg(long)]
        id: String,
        #[arg(long)]
        tap: String,
        #[arg(long)]
        guest_ip: Ipv4Addr,
        /// No way out (`--net none`).
        #[arg(long)]
        no_outside: bool,
        /// Ranges the guest may reach despite the isolation.
        #[arg(long = "allow-net")]
        allow: Vec<Cidr>,
        /// The guests' subnet.
        #[arg(long, default_value = "172.30.0.0/16")]
        guests: Cidr,
    },
    Down {
        #[arg(long)]
        id: String,
        #[arg(long)]
        tap: String,
        #[arg(long)]
        guest_ip: Ipv4Addr,
        #[arg(long = "allow-net")]
        allow: Vec<Cidr>,
    },
}

/// `--net`: what a guest may reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NetMode {
    /// The outside world through NAT (the host, its networks and other
    /// guests stay closed).
    Nat,
    /// Nothing beyond the VM.
    None,
}

fn main() {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!(
                "banger: {}",
                banger_core::text::escape_control(&format!("{e:#}"), true)
            );
            std::process::exit(1);
        }
    }
}

/// Progress lines go to stderr; text that may come from a guest is escaped.
pub fn progress(e: Event) {
    match e {
        Event::Progress { message } => {
            eprintln!("{}", banger_core::text::escape_control(&message, true))
        }
        Event::Spec { line } => eprintln!("{line}"),
        Event::Log { text } => print!("{}", banger_core::text::escape_control(&text, true)),
        // Byte counts are drawn as a bar on a terminal (`ui.rs`); the
        // lines say the same in plain text.
        Event::Phase { .. } | Event::Ready { .. } | Event::Bytes { .. } => {}
    }
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    let env_dir = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let layout = Layout::resolve(
        cli.state_dir,
        cli.runtime_dir,
        env_dir(STATE_DIR_ENV),
        env_dir(RUNTIME_DIR_ENV),
    );
    let client = Client { layout };
    match cli.cmd {
        Cmd::Vm(v) => vm::run(&client, *v),
        Cmd::Image(i) => image(&client, i),
        Cmd::Volume(v) => volume::run(&client, v),
        Cmd::Snapshot(s) => snapshot::run(&client, s),
        Cmd::Api(a) => api::run(&client, a),
        Cmd::Mcp => mcp::serve(client),
        Cmd::Network(n) => network::run(&client, n),
        Cmd::Completion { shell } => {
            use clap::CommandFactory;
            use std::io::Write;
            // Made in memory, then written (clap_complete panics on a
            // write error, such as a closed pipe).
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "banger", &mut script);
            match std::io::stdout().write_all(&script) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
                _ => Ok(0),
            }
        }
        Cmd::Doctor { json } => {
            let Response::Doctor { checks } = client.call(Request::Doctor, &mut progress)? else {
                bail!("unexpected answer to doctor");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&checks)?);
            } else {
                output::print_checks(&checks);
            }
            Ok(0)
        }
        Cmd::Config(ConfigCmd::Show { json }) => {
            let Response::Config { entries } = client.call(Request::ConfigShow, &mut progress)?
            else {
                bail!("unexpected answer to config show");
            };
            output::emit(json, &entries, output::print_config)
        }
        Cmd::Internal(InternalCmd::Man { dir }) => {
            use clap::CommandFactory;
            std::fs::create_dir_all(&dir)?;
            clap_mangen::generate_to(Cli::command(), &dir)?;
            Ok(0)
        }
        Cmd::Daemon(DaemonCmd::Ping) => {
            let Response::Pong { version, pid } = client.call(Request::Ping, &mut progress)? else {
                bail!("unexpected answer to ping");
            };
            println!("bangerd pid {pid}, protocol {version}");
            Ok(0)
        }
        Cmd::Daemon(DaemonCmd::Stop) => {
            if !client.running() {
                eprintln!("bangerd is not running");
                return Ok(0);
            }
            let pid = match client.call(Request::DaemonStop, &mut progress) {
                Ok(Response::Stopping { pid }) => pid,
                Ok(other) => bail!("unexpected answer to daemon stop: {other:?}"),
                // A daemon of another build cannot read the request: it
                // gets SIGTERM, which drains it the same way.
                Err(client::ClientError::Api(e))
                    if e.kind == banger_core::api::ErrorKind::Version =>
                {
                    let lock = client.layout.lock_file();
                    let pid = banger_host::process::holders(&lock)
                        .into_iter()
                        // The bangerd among those that have it open
                        // (another `daemon stop` may be waiting on it).
                        .find(|p| {
                            std::fs::read_link(format!("/proc/{p}/exe"))
                                .is_ok_and(|e| e.file_name().is_some_and(|n| n == "bangerd"))
                        })
                        .ok_or_else(|| {
                            anyhow::anyhow!("{}: no bangerd holds it", lock.display())
                        })?;
                    nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGTERM,
                    )
                    .with_context(|| format!("SIGTERM to bangerd (pid {pid})"))?;
                    pid as u32
                }
                Err(e) => return Err(e.into()),
            };
            // The daemon holds its state dir's lock until it exits: taking
            // the lock is the wait (it drains requests in flight first).
            let lock_path = client.layout.lock_file();
            let lock = std::fs::File::open(&lock_path)
                .with_context(|| format!("open {}", lock_path.display()))?;
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let _ = tx
                    .send(nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockShared).is_ok());
            });
            match rx.recv_timeout(std::time::Duration::from_secs(400)) {
                Ok(true) => {}
                Ok(false) => bail!("cannot wait on {}", lock_path.display()),
                Err(_) => bail!("bangerd (pid {pid}) is still draining its requests after 400 s"),
            }
            println!("{pid}");
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
        Cmd::Daemon(DaemonCmd::Status { json }) => {
            let Response::Status(st) = client.call(Request::DaemonStatus, &mut progress)? else {
                bail!("unexpected answer to daemon status");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                output::print_status(&st);
            }
            Ok(0)
        }
        Cmd::Dns(DnsCmd::Install { root }) => {
            let Response::Status(st) = client.call(Request::DaemonStatus, &mut progress)? else {
                bail!("unexpected answer to daemon status");
            };
            let Some(listen) = st.dns_listen else {
                bail!("bangerd offers no DNS to the host (--dns-listen off)");
            };
            let path = dnsinstall::install(&root, &st.dns_suffix, &listen)?;
            println!("{}", path.display());
            Ok(0)
        }
        Cmd::Dns(DnsCmd::Uninstall { root }) => {
            for p in dnsinstall::uninstall(&root)? {
                println!("{}", p.display());
            }
            Ok(0)
        }
        Cmd::SshConfig => {
            let Response::Status(st) = client.call(Request::DaemonStatus, &mut progress)? else {
                bail!("unexpected answer to daemon status");
            };
            print!("{}", ssh::config_snippet(&client.layout, &st.dns_suffix)?);
            Ok(0)
        }
        Cmd::Internal(InternalCmd::SshProxy { host }) => ssh::proxy(&client, &host),
        Cmd::Internal(InternalCmd::Reidentify { name }) => {
            let r = client.call(Request::VmReidentify { name }, &mut progress)?;
            let Response::Vm(vm) = r else {
                bail!("unexpected answer to reidentify");
            };
            println!("{}", vm.name);
            Ok(0)
        }
        Cmd::Internal(InternalCmd::Firewall(f)) => {
            use banger_host::firewall::{self, GuestRules};
            match f {
                FirewallCmd::Up {
                    id,
                    tap,
                    guest_ip,
                    no_outside,
                    allow,
                    guests,
                } => firewall::up(&GuestRules {
                    vm_id: id,
                    tap,
                    guest_ip,
                    outside: !no_outside,
                    allow,
                    dns: Vec::new(),
                    guests,
                    networked: false,
                    peers: Vec::new(),
                })?,
                FirewallCmd::Down {
                    id,
                    tap,
                    guest_ip,
                    allow,
                } => firewall::down(&GuestRules {
                    vm_id: id,
                    tap,
                    guest_ip,
                    outside: true,
                    allow,
                    dns: Vec::new(),
                    guests: banger_core::net::Subnet::default().cidr(),
                    networked: false,
                    peers: Vec::new(),
                })?,
            }
            Ok(0)
        }
    }
}

fn image(client: &Client, cmd: ImageCmd) -> anyhow::Result<i32> {
    match cmd {
        ImageCmd::Build { name, force } => {
            let mut ui = ui::Ui::new(format!("building image {name}"));
            let r = client.call(Request::ImageBuild { name, force }, &mut |e| ui.event(e))?;
            ui.clear();
            if let Response::Image(i) = r {
                println!("{}", i.name);
            }
            Ok(0)
        }
        ImageCmd::Ls { json, quiet } => {
            let Response::Images { images } = client.call(Request::ImageList, &mut progress)?
            else {
                bail!("unexpected answer to image ls");
            };
            if quiet {
                images.iter().for_each(|i| println!("{}", i.name));
                return Ok(0);
            }
            output::emit(json, &images, output::print_images)
        }
        ImageCmd::Rm { name } => {
            client.call(Request::ImageDelete { name: name.clone() }, &mut progress)?;
            println!("{name}");
            Ok(0)
        }
        ImageCmd::Import { name, source } => image::import(client, &name, &source),
        ImageCmd::Customize {
            name,
            from,
            run,
            vmm,
        } => image::customize(client, &name, &from, &run, vmm),
    }
}
