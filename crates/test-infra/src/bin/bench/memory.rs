//! The VMM's memory beyond the guest's (what `bangerd
//! --vmm-memory-overhead` must cover): per VM, its cgroup's memory after
//! boot, and its peak once the guest has touched all of its memory (a
//! tmpfs filled to 90% of it, then the page cache of a read), minus the
//! guest's memory. Each VM runs with no overhead limit at all
//! (`BANGER_VMM_MEMORY_OVERHEAD` is large) so the peak is what QEMU
//! takes, not what a limit allowed.

use std::path::{Path, PathBuf};

use test_infra::{ok, Instance};

use crate::row;

fn memory_dir(inst: &Instance, name: &str) -> PathBuf {
    let show: serde_json::Value =
        serde_json::from_str(&ok(&inst.banger(&["vm", "show", name, "--json"]), "show"))
            .expect("show json");
    let id = show["id"].as_str().expect("id").to_string();
    let pid = inst
        .processes()
        .into_iter()
        .find(|(_, c)| c.contains(&format!("-name banger-{name}")))
        .map(|(p, _)| p)
        .expect("the VM's QEMU");
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
    for l in cg.lines() {
        let mut f = l.splitn(3, ':');
        let (_, ctrls, path) = (
            f.next().unwrap_or(""),
            f.next().unwrap_or(""),
            f.next().unwrap_or(""),
        );
        if ctrls.split(',').any(|c| c == "memory") {
            let d = Path::new("/sys/fs/cgroup/memory").join(path.trim_start_matches('/'));
            assert!(d.ends_with(&id), "{}", d.display());
            return d;
        }
        if ctrls.is_empty() && Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            return Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
        }
    }
    panic!("no memory cgroup for {name}");
}

fn mib(dir: &Path, v1: &str, v2: &str) -> f64 {
    let f = if dir.join(v2).exists() { v2 } else { v1 };
    let b: u64 = std::fs::read_to_string(dir.join(f))
        .expect("read cgroup file")
        .trim()
        .parse()
        .expect("a number");
    b as f64 / (1 << 20) as f64
}

pub fn bench(table: &mut String, banger: &Path, vms: usize) {
    let inst = Instance::new(banger)
        .with_image()
        .with_env("BANGER_VMM_MEMORY_OVERHEAD", "8192");
    let guest_mib = 512.0;
    let (mut booted, mut peak, mut over) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..vms {
        let name = format!("mem{i}");
        ok(
            &inst.banger(&["vm", "create", "--name", &name, "--memory", "512"]),
            "create",
        );
        ok(&inst.banger(&["vm", "start", &name]), "start");
        let dir = memory_dir(&inst, &name);
        booted.push(mib(&dir, "memory.usage_in_bytes", "memory.current"));
        ok(
            &inst.banger(&[
                "vm",
                "exec",
                &name,
                "--",
                "sh",
                "-c",
                "mkdir -p /fill && mount -t tmpfs -o size=90% fill /fill && \
                 { dd if=/dev/zero of=/fill/x bs=1M count=1024 status=none 2>/dev/null; true; } && \
                 cat /usr/bin/* > /dev/null",
            ]),
            "fill the guest's memory",
        );
        // v2 has no peak file before 5.19; current is the same once full.
        let p = mib(&dir, "memory.max_usage_in_bytes", "memory.peak");
        peak.push(p);
        over.push(p - guest_mib);
        ok(&inst.banger(&["vm", "delete", "-f", &name]), "delete");
    }
    row(
        table,
        "VM cgroup memory after boot (512 MiB guest)",
        &booted,
        "MiB",
    );
    row(
        table,
        "VM cgroup memory peak, guest memory filled",
        &peak,
        "MiB",
    );
    row(
        table,
        "… beyond the guest's 512 MiB (the VMM's own)",
        &over,
        "MiB",
    );
    inst.assert_baseline();
}
