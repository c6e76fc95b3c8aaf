//! What the CLI prints: tables, timings, status. Anything that came from
//! a guest (last errors quoting its console, its logs) is escaped before a
//! terminal sees it.

use banger_core::api::{Check, DaemonStatus, ImageInfo, VmInfo, VmStats};
use banger_core::duration::format_secs;
use banger_core::text::{escape_control, one_line};

/// A table whose columns are as wide as their widest cell: `>` before a
/// heading aligns that column right. The last column is never padded.
pub struct Table {
    heads: Vec<(String, bool)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(heads: &[&str]) -> Table {
        Table {
            heads: heads
                .iter()
                .map(|h| match h.strip_prefix('>') {
                    Some(h) => (h.to_string(), true),
                    None => (h.to_string(), false),
                })
                .collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let n = self.heads.len();
        let width = |i: usize| {
            self.rows
                .iter()
                .filter_map(|r| r.get(i))
                .chain(std::iter::once(&self.heads[i].0))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        };
        let widths: Vec<usize> = (0..n).map(width).collect();
        let mut out = String::new();
        let heads: Vec<String> = self.heads.iter().map(|h| h.0.clone()).collect();
        for cells in std::iter::once(&heads).chain(self.rows.iter()) {
            let mut line = String::new();
            for (i, (_, right)) in self.heads.iter().enumerate() {
                let c = cells.get(i).map(String::as_str).unwrap_or("");
                let pad = widths[i].saturating_sub(c.chars().count());
                if i > 0 {
                    line.push_str("  ");
                }
                if *right {
                    line.push_str(&" ".repeat(pad));
                    line.push_str(c);
                } else {
                    line.push_str(c);
                    if i + 1 < n {
                        line.push_str(&" ".repeat(pad));
                    }
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }

    pub fn print(&self) {
        print!("{}", self.render());
    }
}

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

pub fn age(created: i64) -> String {
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
    let mut t = Table::new(&[
        "NAME",
        "STATE",
        "IP",
        ">VCPU",
        ">MEMORY",
        "VMM",
        ">AGE",
        "LABELS",
        "LAST ERROR",
    ]);
    for v in vms {
        t.row(vec![
            v.name.clone(),
            v.state.to_string(),
            v.guest_ip.clone().unwrap_or_else(|| "-".into()),
            v.cpus.to_string(),
            format!("{}M", v.memory_mib),
            format!("{}/{}", v.vmm, v.accel),
            age(v.created_at),
            labels(&v.metadata),
            v.last_error.as_deref().map(one_line).unwrap_or_default(),
        ]);
    }
    t.print();
}

/// A VM's labels (an E2B sandbox's metadata) in a table's cell: `k=v`
/// joined by commas, escaped (a client set them), cut at 40 characters.
fn labels(m: &std::collections::BTreeMap<String, String>) -> String {
    const CELL: usize = 40;
    if m.is_empty() {
        return "-".into();
    }
    let all: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let text = escape_control(&all.join(","), false);
    if text.chars().count() <= CELL {
        return text;
    }
    let mut cut: String = text.chars().take(CELL - 1).collect();
    cut.push('…');
    cut
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
    let mut t = Table::new(&[
        "NAME",
        ">CPU%",
        ">MEMORY",
        ">LIMIT",
        ">DISK",
        ">NET RX",
        ">NET TX",
        ">UPTIME",
        ">IDLE",
        ">GUEST MEM",
        ">LOAD",
    ]);
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
        t.row(vec![
            s.name.clone(),
            format!("{:.1}", s.cpu_percent),
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
            load,
        ]);
    }
    t.print();
}

/// Processes a guest agent reports: what the guest controls (argv, tag)
/// is escaped before it reaches the terminal.
pub fn print_procs(procs: &[banger_agent::proto::ProcInfo]) {
    let mut t = Table::new(&[">PID", "TAG", "MODE", "STATUS", "COMMAND"]);
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
        t.row(vec![
            p.pid.to_string(),
            escape_control(p.tag.as_deref().unwrap_or("-"), false),
            mode.to_string(),
            status,
            escape_control(&banger_core::text::one_line(&p.argv.join(" ")), false),
        ]);
    }
    t.print();
}

pub fn print_ports(ports: &[banger_core::net::PortMap]) {
    let mut t = Table::new(&["HOST", ">GUEST", "PROTO"]);
    for p in ports {
        t.row(vec![
            format!("{}:{}", p.host_addr, p.host_port),
            p.guest_port.to_string(),
            p.proto.to_string(),
        ]);
    }
    t.print();
}

pub fn print_images(images: &[ImageInfo]) {
    let mut t = Table::new(&["NAME", "KERNEL", ">ROOTFS", ">ON DISK", "USED BY", "DIR"]);
    for i in images {
        let users = if i.used_by.is_empty() {
            "-".to_string()
        } else {
            i.used_by.join(",")
        };
        t.row(vec![
            i.name.clone(),
            i.kernel_version.clone(),
            format!("{}M", i.rootfs_bytes / (1024 * 1024)),
            bytes(i.disk_bytes),
            users,
            i.dir.display().to_string(),
        ]);
    }
    t.print();
}

pub fn print_config(entries: &[banger_core::api::ConfigEntry]) {
    let mut t = Table::new(&["KEY", "VALUE", "SOURCE"]);
    for e in entries {
        t.row(vec![
            e.key.clone(),
            escape_control(&e.value, false),
            escape_control(&e.source, false),
        ]);
    }
    t.print();
}

/// One line per check; under a failed one, the command that fixes it.
pub fn print_checks(checks: &[Check]) {
    let w = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    for c in checks {
        println!(
            "{:4} {:w$}  {}",
            if c.ok { "ok" } else { "--" },
            c.name,
            escape_control(&c.detail, true)
        );
        if let Some(fix) = &c.fix {
            println!("{:4} {:w$}  fix: {}", "", "", escape_control(fix, true));
        }
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
    for f in &st.failed_releases {
        println!(
            "          vm {}: failed {} time(s), retried in {} s: {}",
            escape_control(&f.vm, false),
            f.attempts,
            f.retry_in_secs,
            escape_control(&f.error, false)
        );
    }
    println!("clients   {} connected", st.connections);
}

#[cfg(test)]
mod tests {
    use super::{labels, Table};

    #[test]
    fn labels_are_escaped_and_cut() {
        let m = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(labels(&m(&[])), "-");
        assert_eq!(labels(&m(&[("b", "2"), ("a", "1")])), "a=1,b=2");
        assert_eq!(labels(&m(&[("k", "\x1b[2Jx")])), "k=\\x1b[2Jx");
        let long = labels(&m(&[("k", &"v".repeat(100))]));
        assert_eq!(long.chars().count(), 40);
        assert!(long.ends_with('…'));
    }

    #[test]
    fn columns_fit_their_widest_cell() {
        let mut t = Table::new(&["NAME", ">SIZE", "NOTE"]);
        t.row(vec![
            "a-very-long-vm-name-of-forty-characters-x".into(),
            "1".into(),
            "x".into(),
        ]);
        t.row(vec!["b".into(), "1024".into(), String::new()]);
        let out = t.render();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[0],
            "NAME                                       SIZE  NOTE"
        );
        assert_eq!(
            lines[1],
            "a-very-long-vm-name-of-forty-characters-x     1  x"
        );
        // Right-aligned, and no trailing blanks where the last cell is empty.
        assert_eq!(lines[2], "b                                          1024");
    }
}
