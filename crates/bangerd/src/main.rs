//! bangerd's entry point: flags, the one-daemon-per-state-dir lock, the
//! socket, signals. Everything else lives in the library.

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use banger_core::Layout;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{SigSet, Signal};

fn main() {
    if let Err(e) = real_main() {
        eprintln!("bangerd: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> anyhow::Result<()> {
    let (args, settings) = match bangerd::settings::load(std::env::args_os().collect()) {
        Ok(v) => v,
        // --help and --version are clap's "errors": printed as they are.
        Err(bangerd::settings::SettingsError::Args(e)) => e.exit(),
        Err(e) => return Err(e.into()),
    };
    if args.print_man {
        use clap::CommandFactory;
        let mut page = Vec::new();
        clap_mangen::Man::new(bangerd::settings::Args::command())
            .section("8")
            .render(&mut page)?;
        std::io::Write::write_all(&mut std::io::stdout(), &page)?;
        return Ok(());
    }
    // systemd's socket activation (banger.socket): the listener is fd 3.
    // Read, then cleared before any thread exists, so that no child sees it.
    let for_us = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let fds = std::env::var("LISTEN_FDS").ok();
    if for_us && fds.as_deref() != Some("1") {
        bail!("LISTEN_FDS={fds:?}: bangerd takes exactly one socket (banger.socket)");
    }
    let activated = for_us;
    for k in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(k);
    }
    if activated {
        // systemd passes it without FD_CLOEXEC: set at once, before any
        // child (nft, mkfs, a VMM) could inherit the listener.
        check_activated_socket()?;
    }
    // The tools the daemon runs (nft, mkfs, losetup, qemu-img, ...) are
    // found on a fixed PATH, not on the PATH of whichever shell started
    // it. (Before any thread exists.)
    std::env::set_var("PATH", banger_host::confine::SAFE_PATH);
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&args.log_level)
                .with_context(|| format!("--log-level {:?}", args.log_level))?,
        )
        .with_writer(std::io::stderr)
        // Colours for a terminal only: the log file a CLI starts it with
        // is read by people and quoted in the CLI's errors.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // A span's close carries its time: per request (info) and per
        // phase of a request (debug).
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
        .init();
    // Test builds only (the `failpoints` feature): FAILPOINTS=name=action.
    let _failpoints = bangerd::failpoint::setup();
    if !nix::unistd::geteuid().is_root() {
        bail!("bangerd must run as root: it creates taps, NAT rules and VMM processes");
    }
    let layout = Layout::resolve(args.state_dir, args.runtime_dir, None, None);
    std::fs::create_dir_all(&layout.state_dir)
        .with_context(|| format!("create state dir {}", layout.state_dir.display()))?;
    std::fs::create_dir_all(&layout.runtime_dir)
        .with_context(|| format!("create runtime dir {}", layout.runtime_dir.display()))?;
    let lock_path = layout.lock_file();
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("open {}", lock_path.display()))?;
    let _lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        anyhow::anyhow!(
            "another bangerd owns {} ({e}): only one daemon per state dir",
            layout.state_dir.display()
        )
    })?;
    let mut cfg = bangerd::Config::new(layout.clone());
    cfg.boot_timeout = Duration::from_secs(args.boot_timeout);
    cfg.console_max_bytes = args.console_max_bytes;
    banger_core::validate_name(&args.dns_suffix)
        .map_err(|e| anyhow::anyhow!("--dns-suffix: {e}"))?;
    cfg.dns_suffix = args.dns_suffix;
    cfg.dns_listen = match args.dns_listen.as_str() {
        "off" => None,
        a => Some(
            a.parse()
                .with_context(|| format!("--dns-listen {a:?}: want ADDR:PORT or off"))?,
        ),
    };
    cfg.resolv_conf = args.resolv_conf;
    cfg.tap_pool = args.tap_pool.min(1024);
    cfg.api_listen = args.api_listen.clone();
    if let Some(l) = &cfg.api_listen {
        let ok = l
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|a| a.ip().is_loopback());
        if !ok {
            anyhow::bail!(
                "api_listen {l:?}: a loopback ADDR:PORT (127.0.0.1:3000, say): the API is served \
                 on loopback only"
            );
        }
    }
    cfg.root_disk = args.root_disk;
    // Ids an account could have are refused: a VMM would share them.
    for (flag, v) in [
        ("--vmm-uid-base", args.vmm_uid_base),
        ("--vmm-images-gid", Some(args.vmm_images_gid)),
    ] {
        let Some(v) = v else { continue };
        if v < 65_536 {
            bail!(
                "{flag} {v}: below 65536 it would share ids with accounts' users or groups; the default is {}",
                bangerd::config::DEFAULT_VMM_UID_BASE
            );
        }
    }
    cfg.vmm_images_gid = args.vmm_images_gid;
    cfg.vmm_memory_overhead_mib = args.vmm_memory_overhead;
    cfg.cgroup_parent = args.cgroup_parent;
    cfg.socket_gid = nix::unistd::Group::from_name(&args.socket_group)
        .with_context(|| format!("look up group {:?}", args.socket_group))?
        .map(|g| g.gid.as_raw());
    cfg.subnet = banger_core::net::Subnet::from_cidr(args.subnet)?;
    cfg.vmm = args.vmm;
    banger_core::validate_name(&args.default_image)
        .map_err(|e| anyhow::anyhow!("--default-image: {e}"))?;
    cfg.default_image = args.default_image.clone();
    let size = |flag: &str, v: &Option<String>| {
        v.as_deref()
            .map(banger_core::sizing::parse_size_mib)
            .transpose()
            .map_err(|e| anyhow::anyhow!("{flag}: {e}"))
    };
    cfg.default_size = banger_core::sizing::SizeRequest {
        cpus: args.cpus,
        memory_mib: size("--memory", &args.memory)?,
        disk_mib: size("--disk-size", &args.disk_size)?,
    };
    cfg.warm_cache_mib = banger_core::sizing::parse_size_mib(&args.warm_cache)
        .map_err(|e| anyhow::anyhow!("--warm-cache: {e}"))?;
    cfg.settings = settings;
    if let Some(base) = args.vmm_uid_base {
        if base.checked_add(cfg.subnet.slots()).is_none() {
            bail!(
                "--vmm-uid-base {base} + the {} VMs --subnet {} holds overflow a uid: lower the base",
                cfg.subnet.slots(),
                args.subnet
            );
        }
    }
    cfg.firecracker = std::env::var_os("BANGER_FIRECRACKER")
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(|| banger_host::cmd::which("firecracker"));
    // The jailer is only looked for where Firecracker is.
    cfg.jailer = cfg.firecracker.as_ref().and_then(|_| {
        std::env::var_os("BANGER_JAILER")
            .filter(|v| !v.is_empty())
            .map(std::path::PathBuf::from)
            .or_else(|| banger_host::cmd::which("jailer"))
    });
    for (what, p) in [
        ("BANGER_FIRECRACKER", &cfg.firecracker),
        ("BANGER_JAILER", &cfg.jailer),
    ] {
        if let Some(p) = p.as_ref().filter(|p| !p.is_absolute()) {
            bail!("{what}={}: give an absolute path", p.display());
        }
    }
    let env_path = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(std::path::PathBuf::from)
    };
    // Beside bangerd (a build tree), or where the Debian package puts it.
    let shipped = |name: &str| {
        let exe = std::env::current_exe().ok()?;
        let dir = exe.parent()?;
        [dir.join(name), dir.join("../lib/banger").join(name)]
            .into_iter()
            .find(|p| p.is_file())
            .and_then(|p| std::fs::canonicalize(p).ok())
    };
    cfg.agent = env_path("BANGER_AGENT").or_else(|| shipped("banger-agent"));
    cfg.vport = env_path("BANGER_VPORT").or_else(|| shipped("banger-vport"));
    if let Some(d) = env_path("BANGER_RAM_DIR") {
        cfg.ram_dir = d;
    }
    // The Debian package ships it beside the agent.
    cfg.vsock_backend = env_path("BANGER_VHOST_VSOCK")
        .or_else(|| banger_host::cmd::which("vhost-device-vsock"))
        .or_else(|| {
            let exe = std::env::current_exe().ok()?;
            std::fs::canonicalize(exe.parent()?.join("../lib/banger/vhost-device-vsock")).ok()
        });
    // Debian ships QEMU's virtiofsd outside PATH.
    cfg.virtiofsd = env_path("BANGER_VIRTIOFSD")
        .or_else(|| banger_host::cmd::which("virtiofsd"))
        .or_else(|| {
            ["/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"]
                .iter()
                .map(PathBuf::from)
                .find(|p| p.is_file())
        });
    // Test hook (see Config::release_delay); ignored unless set to a number.
    if let Some(ms) = std::env::var("BANGER_TEST_RELEASE_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        cfg.release_delay = Duration::from_millis(ms);
    }
    // This daemon's VMM uids are no other daemon's (held until exit): the
    // given range, or the one this state dir keeps, or a free one.
    let uids = bangerd::uids::claim(
        args.vmm_uid_base,
        bangerd::config::DEFAULT_VMM_UID_BASE,
        cfg.subnet.slots(),
        &layout.state_dir,
    )?;
    cfg.vmm_uid_base = uids.base;
    if uids.chosen {
        if let Some(e) = cfg.settings.iter_mut().find(|e| e.key == "vmm_uid_base") {
            e.value = uids.base.to_string();
            e.source = format!(
                "chosen (kept in {})",
                layout.state_dir.join(bangerd::uids::RECORD).display()
            );
        }
    }
    // Open and reconcile before the socket exists: a client that can connect
    // talks to a daemon that is ready.
    let cfg_socket_gid = cfg.socket_gid;
    let daemon = bangerd::open(cfg)?;
    let sock = layout.socket();
    let listener = if activated {
        // SAFETY: systemd passed fd 3, a listening socket, for us alone
        // (LISTEN_PID is ours); nothing else in this process owns it.
        let l = unsafe { <UnixListener as std::os::fd::FromRawFd>::from_raw_fd(3) };
        tracing::info!(socket = %sock.display(), "listening on the socket systemd passed");
        // Its group is the configured one, whatever the unit says.
        if let Some(gid) = cfg_socket_gid {
            if let Err(e) = std::os::unix::fs::chown(&sock, Some(0), Some(gid)) {
                tracing::warn!(err = %e, socket = %sock.display(), "cannot give the socket its group");
            }
        }
        l
    } else {
        bind(&sock, cfg_socket_gid, &args.socket_group)?
    };

    // SIGTERM/SIGINT: stop serving; VMs keep running and are reconciled by
    // the next daemon.
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.thread_block().context("block signals")?;
    let stopper = bangerd::server::Stopper::new().context("make the stop pipe")?;
    {
        let stopper = stopper.clone();
        std::thread::spawn(move || {
            if let Ok(sig) = set.wait() {
                tracing::info!(?sig, "shutting down");
            }
            stopper.stop();
        });
    }
    tracing::info!(state = %layout.state_dir.display(), socket = %sock.display(), "bangerd serving");
    bangerd::serve(daemon, listener, stopper);
    // systemd's socket stays: it starts the next daemon.
    if !activated {
        let _ = std::fs::remove_file(&sock);
    }
    Ok(())
}

/// fd 3 as systemd passes it: made close-on-exec, and checked to be a
/// listening Unix stream socket (anything else is refused, not served).
fn check_activated_socket() -> anyhow::Result<()> {
    use nix::sys::socket::{getsockname, getsockopt, sockopt, SockType, UnixAddr};
    use std::os::fd::BorrowedFd;
    nix::fcntl::fcntl(
        3,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .context("LISTEN_FDS: fd 3")?;
    // SAFETY: fd 3 is open (fcntl just succeeded) and stays open for the
    // daemon's life; the borrow ends within this function.
    let fd = unsafe { BorrowedFd::borrow_raw(3) };
    let listening = getsockopt(&fd, sockopt::AcceptConn).unwrap_or(false);
    let stream = getsockopt(&fd, sockopt::SockType).ok() == Some(SockType::Stream);
    let unix = getsockname::<UnixAddr>(3).is_ok();
    if !(listening && stream && unix) {
        bail!("LISTEN_FDS: fd 3 is not a listening Unix stream socket (systemd's banger.socket passes one)");
    }
    Ok(())
}

/// Binds the socket `root:GROUP 0660` (`root 0600` while the group does
/// not exist): whoever talks to it can create VMs.
fn bind(sock: &std::path::Path, gid: Option<u32>, group: &str) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    // We hold the lock, so a socket file left here belongs to a dead daemon.
    let _ = std::fs::remove_file(sock);
    // Made owner-only from the start (the runtime dir is searchable by the
    // VMMs' users): no moment in which another user could connect.
    let old_mask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let bound = UnixListener::bind(sock);
    nix::sys::stat::umask(old_mask);
    let listener = bound.with_context(|| format!("bind {}", sock.display()))?;
    let mode = match gid {
        Some(gid) => {
            let gid = nix::unistd::Gid::from_raw(gid);
            nix::unistd::chown(sock, Some(nix::unistd::Uid::from_raw(0)), Some(gid))
                .with_context(|| format!("chown {} to group {group}", sock.display()))?;
            0o660
        }
        None => {
            tracing::info!(
                "no group {group:?}: only root can use {} (`groupadd --system {group}`, then restart bangerd)",
                sock.display()
            );
            0o600
        }
    };
    std::fs::set_permissions(sock, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", sock.display()))?;
    Ok(listener)
}
