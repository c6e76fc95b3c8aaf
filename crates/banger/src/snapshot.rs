//! `banger snapshot ...` and `banger vm snapshot`: a running VM's memory,
//! device state and disks, which `vm create|run --from SNAP` restores
//! into a new VM.

use anyhow::bail;
use banger_core::api::{Request, Response, SnapshotInfo};
use banger_core::{SUSPEND_PREFIX, WARM_PREFIX};
use clap::Subcommand;

use crate::client::Client;
use crate::output::{bytes, emit};
use crate::progress;

#[derive(Debug, Subcommand)]
pub enum SnapshotCmd {
    /// Snapshots: the VM each was taken of, its image and sizes.
    #[command(alias = "list")]
    Ls {
        /// Also banger's own: the warm-start cache's (`warm.<key>`:
        /// snapshots of freshly booted guests that `vm run` restores by
        /// itself) and suspended VMs' saved guests (`suspend.<vm id>`).
        #[arg(short, long)]
        all: bool,
        #[arg(long)]
        json: bool,
        /// Names only, one per line.
        #[arg(short, long, conflicts_with = "json")]
        quiet: bool,
    },
    /// Show one snapshot.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete snapshots (their files go; VMs made from them stay).
    #[command(name = "rm", alias = "delete")]
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

/// `vm snapshot NAME [SNAP]`: prints the snapshot's name.
pub fn take(client: &Client, name: String, snapshot: Option<String>) -> anyhow::Result<i32> {
    let mut ui = crate::ui::Ui::new(format!("snapshotting {name}"));
    let r = client.call(Request::VmSnapshot { name, snapshot }, &mut |e| ui.event(e));
    ui.clear();
    let Response::Snapshot(s) = r? else {
        bail!("unexpected answer to vm snapshot");
    };
    println!("{}", s.name);
    Ok(0)
}

/// `vm fork NAME NEW [-n COUNT]`: prints the clones' names.
pub fn fork(client: &Client, name: String, new: String, count: u32) -> anyhow::Result<i32> {
    let mut ui = crate::ui::Ui::new(format!("forking {name}"));
    let r = client.call(Request::VmFork { name, new, count }, &mut |e| ui.event(e));
    ui.clear();
    let Response::Vms { vms } = r? else {
        bail!("unexpected answer to vm fork");
    };
    vms.iter().for_each(|v| println!("{}", v.name));
    Ok(0)
}

pub fn run(client: &Client, cmd: SnapshotCmd) -> anyhow::Result<i32> {
    match cmd {
        SnapshotCmd::Ls { all, json, quiet } => {
            let Response::Snapshots { mut snapshots } =
                client.call(Request::SnapshotList, &mut progress)?
            else {
                bail!("unexpected answer to snapshot ls");
            };
            if !all {
                snapshots.retain(|s| {
                    !s.name.starts_with(WARM_PREFIX) && !s.name.starts_with(SUSPEND_PREFIX)
                });
            }
            if quiet {
                snapshots.iter().for_each(|s| println!("{}", s.name));
                return Ok(0);
            }
            emit(json, &snapshots, print)
        }
        SnapshotCmd::Show { name, json } => {
            let Response::Snapshot(s) =
                client.call(Request::SnapshotGet { name }, &mut progress)?
            else {
                bail!("unexpected answer to snapshot show");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print_one(&s);
            }
            Ok(0)
        }
        SnapshotCmd::Rm { names } => {
            let mut status = 0;
            for name in names {
                match client.call(
                    Request::SnapshotDelete { name: name.clone() },
                    &mut progress,
                ) {
                    Ok(_) => println!("{name}"),
                    Err(e) => {
                        eprintln!("banger: {e}");
                        status = 1;
                    }
                }
            }
            Ok(status)
        }
    }
}

fn print(snapshots: &[SnapshotInfo]) {
    let mut t = crate::output::Table::new(&[
        "NAME", "VM", "IMAGE", "VMM", ">CPUS", ">MEMORY", ">ON DISK", "CREATED",
    ]);
    for s in snapshots {
        t.row(vec![
            s.name.clone(),
            s.vm.clone(),
            s.image.clone(),
            s.vmm.to_string(),
            s.cpus.to_string(),
            format!("{}M", s.memory_mib),
            bytes(s.disk_bytes),
            crate::output::age(s.created_at),
        ]);
    }
    t.print();
}

fn print_one(s: &SnapshotInfo) {
    println!("name:       {}", s.name);
    println!("of vm:      {}", s.vm);
    println!("image:      {}", s.image);
    println!("vmm:        {}", s.vmm);
    println!("cpus:       {}", s.cpus);
    println!("memory:     {} MiB", s.memory_mib);
    println!("on disk:    {}", bytes(s.disk_bytes));
    println!("dir:        {}", s.dir.display());
    println!("created:    {}", crate::output::age(s.created_at));
    println!(
        "owner uid:  {}{}",
        s.owner,
        if s.root_only { " (root only)" } else { "" }
    );
    if !s.pending.is_empty() {
        println!("to restore: {}", s.pending.join(", "));
    }
}
