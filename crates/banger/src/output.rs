//! What the CLI prints: tables, timings, status. Anything that came from
//! a guest (last errors quoting its console, its logs) is escaped before a
//! terminal sees it.

use banger_core::api::{Check, DaemonStatus, ImageInfo, VmInfo, VmStats};
use banger_core::duration::format_secs;
use banger_core::text::{escape_control, one_line};

/// Prints `items` as pretty JSON (`--json`) or with `table`.
pub fn emit<T: serde::Serialize>(json: bool, items: &[T], table: fn(&[T])) -> anyhow::Result<i32> {
    if json {
        println!("{}", serde_json::to_string_pretty(items)?);
    } else {
        table(items);
    }
    Ok(0)
}

pub fn print_timings(phases: &[(String, u64)], ready_micros: u64) {
    let mut accounted = 0;
    for (name, us) in phases {
        eprintln!("timing {:<13} {:>9.3} ms", name, *us as f64 / 1e3);
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

pub fn print_vms(vms: &[VmInfo]) {
    let w = vms.iter().map(|v| v.name.len()).max().unwrap_or(0).max(4);
    println!(
        "{:<w$} {:<9} {:<15} {:>4} {:>8} {:<11} {:>5}  LAST ERROR",
        "NAME", "STATE", "IP", "VCPU", "MEMORY", "VMM", "AGE"
    );
    for v in vms {
        println!(
            "{:<w$} {:<9} {:<15} {:>4} {:>8} {:<11} {:>5}  {}",
            v.name,
            v.state.to_string(),
            v.guest_ip.as_deref().unwrap_or("-"),
            v.cpus,
            format!("{}M", v.memory_mib),
            format!("{}/{}", v.vmm, v.accel),
            age(v.created_at),
            v.last_error.as_deref().map(one_line).unwrap_or_default()
        );
    }
}

/// One VM, whole (its last error on as many lines as it has).
pub fn print_vm(v: &VmInfo) {
    let row = |k: &str, val: String| println!("{k:<12} {val}");
    row("name", v.name.clone());
    row("id", v.id.clone());
    row("state", v.state.to_string());
    row("ip", v.guest_ip.clone().unwrap_or_else(|| "-".into()));
    row("image", v.image.clone());
    row(
        "size",
        format!(
            "{} vCPU, {} MiB, {} MiB work disk",
            v.cpus, v.memory_mib, v.disk_mib
        ),
    );
    row("vmm", format!("{} ({})", v.vmm, v.accel));
    if let Some(k) = v.root_disk {
        row("root disk", k.to_string());
    }
    if let Some(t) = v.auto_stop.ttl_secs {
        row("ttl", format_secs(t));
    }
    if let Some(t) = v.auto_stop.idle_secs {
        row("idle stop", format_secs(t));
    }
    if v.net.none {
        row("network", "none".into());
    }
    if let Some(n) = &v.net.network {
        row("network", n.clone());
    }
    if !v.net.allow.is_empty() {
        let a: Vec<String> = v.net.allow.iter().map(|c| c.to_string()).collect();
        row("allow-net", a.join(", "));
    }
    if !v.net.ports.is_empty() {
        let p: Vec<String> = v
            .net
            .ports
            .iter()
            .map(|p| format!("{} -> {}/{}", p.host_side(), p.guest_port, p.proto))
            .collect();
        row("ports", p.join(", "));
    }
    if let Some(cid) = v.vsock_cid {
        row("vsock cid", cid.to_string());
    }
    row("age", age(v.created_at));
    row("dir", v.vm_dir.display().to_string());
    if let Some(e) = &v.last_error {
        println!("last error:\n{}", escape_control(e, true));
    }
}

pub(crate) fn bytes(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

pub fn print_stats(stats: &[VmStats]) {
    let w = stats.iter().map(|s| s.name.len()).max().unwrap_or(0).max(4);
    println!(
        "{:<w$} {:>6} {:>10} {:>10} {:>10} {:>10} {:>10} {:>9} {:>8} {:>10} {:>5}",
        "NAME",
        "CPU%",
        "MEMORY",
        "LIMIT",
        "DISK",
        "NET RX",
        "NET TX",
        "UPTIME",
        "IDLE",
        "GUEST MEM",
        "LOAD"
    );
    for s in stats {
        // The guest's own numbers (used memory, 1-minute load), if its
        // agent answered.
        let (gmem, load) = match &s.guest {
            Some(g) => (
                bytes(g.mem_total_bytes.saturating_sub(g.mem_available_bytes)),
                format!("{:.2}", g.load1),
            ),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{:<w$} {:>6.1} {:>10} {:>10} {:>10} {:>10} {:>10} {:>9} {:>8} {:>10} {:>5}",
            s.name,
            s.cpu_percent,
            // The cgroup's figure (the VMM and its helpers) where there is one.
            bytes(if s.cgroup_memory_bytes > 0 {
                s.cgroup_memory_bytes
            } else {
                s.rss_bytes
            }),
            if s.memory_limit_bytes > 0 {
                bytes(s.memory_limit_bytes)
            } else {
                "-".into()
            },
            bytes(s.disk_bytes),
            bytes(s.net_rx_bytes),
            bytes(s.net_tx_bytes),
            format_secs(s.uptime_secs),
            format_secs(s.idle_secs),
            gmem,
            load
        );
    }
}

/// Processes a guest agent reports: what the guest controls (argv, tag)
/// is escaped before it reaches the terminal.
pub fn print_procs(procs: &[banger_agent::proto::ProcInfo]) {
    println!(
        "{:>7} {:<12} {:<9} {:<10} COMMAND",
        "PID", "TAG", "MODE", "STATUS"
    );
    for p in procs {
        let status = match p.exit {
            None if p.attached => "attached".to_string(),
            None => "running".to_string(),
            Some(e) => format!("exited {}", e.shell_code()),
        };
        let mode = match (p.detached, p.tty) {
            (true, true) => "bg,tty",
            (true, false) => "bg",
            (false, true) => "tty",
            (false, false) => "-",
        };
        println!(
            "{:>7} {:<12} {:<9} {:<10} {}",
            p.pid,
            escape_control(p.tag.as_deref().unwrap_or("-"), false),
            mode,
            status,
            escape_control(&banger_core::text::one_line(&p.argv.join(" ")), false)
        );
    }
}

pub fn print_ports(ports: &[banger_core::net::PortMap]) {
    println!("{:<22} {:>5}  PROTO", "HOST", "GUEST");
    for p in ports {
        println!(
            "{:<22} {:>5}  {}",
            format!("{}:{}", p.host_addr, p.host_port),
            p.guest_port,
            p.proto
        );
    }
}

pub fn print_images(images: &[ImageInfo]) {
    println!(
        "{:<16} {:<24} {:>10} {:>10}  {:<20} DIR",
        "NAME", "KERNEL", "ROOTFS", "ON DISK", "USED BY"
    );
    for i in images {
        let users = if i.used_by.is_empty() {
            "-".to_string()
        } else {
            i.used_by.join(",")
        };
        println!(
            "{:<16} {:<24} {:>9}M {:>10}  {:<20} {}",
            i.name,
            i.kernel_version,
            i.rootfs_bytes / (1024 * 1024),
            bytes(i.disk_bytes),
            users,
            i.dir.display()
        );
    }
}

pub fn print_checks(checks: &[Check]) {
    for c in checks {
        println!(
            "{:4} {:20} {}",
            if c.ok { "ok" } else { "--" },
            c.name,
            escape_control(&c.detail, true)
        );
    }
}

pub fn print_status(st: &DaemonStatus) {
    println!("pid       {}", st.pid);
    println!("version   {} (protocol {})", st.version, st.protocol);
    println!("uptime    {}", format_secs(st.uptime_secs));
    let vms: Vec<String> = st.vms.iter().map(|(s, n)| format!("{n} {s}")).collect();
    println!(
        "vms       {}",
        if vms.is_empty() {
            "none".to_string()
        } else {
            vms.join(", ")
        }
    );
    println!("releases  {} pending", st.pending_releases);
}
