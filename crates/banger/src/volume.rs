//! `banger volume ...`: named persistent volumes (ext4 disks that outlive
//! VMs; `vm run --volume NAME:/path` mounts one).

use anyhow::bail;
use banger_core::api::{Request, Response, VolumeInfo};
use banger_core::sizing::parse_size_mib;
use clap::Subcommand;

use crate::client::Client;
use crate::output::{bytes, emit};
use crate::progress;

#[derive(Debug, Subcommand)]
pub enum VolumeCmd {
    /// Make a volume: an empty ext4 disk (sparse: it takes what it holds).
    Create {
        name: String,
        /// Its size: 1024, 512M, 10G.
        #[arg(long, default_value = "1G")]
        size: String,
    },
    /// Volumes, their size, the VMs that mount them and which one has it.
    Ls {
        #[arg(long)]
        json: bool,
        /// Names only, one per line.
        #[arg(short, long, conflicts_with = "json")]
        quiet: bool,
    },
    /// Delete a volume no VM mounts (its data goes).
    Rm { name: String },
}

pub fn run(client: &Client, cmd: VolumeCmd) -> anyhow::Result<i32> {
    match cmd {
        VolumeCmd::Create { name, size } => {
            let size_mib = parse_size_mib(&size).map_err(|e| anyhow::anyhow!("--size: {e}"))?;
            let r = client.call(Request::VolumeCreate { name, size_mib }, &mut progress)?;
            let Response::Volume(v) = r else {
                bail!("unexpected answer to volume create");
            };
            println!("{}", v.name);
            Ok(0)
        }
        VolumeCmd::Ls { json, quiet } => {
            let Response::Volumes { volumes } = client.call(Request::VolumeList, &mut progress)?
            else {
                bail!("unexpected answer to volume ls");
            };
            if quiet {
                volumes.iter().for_each(|v| println!("{}", v.name));
                return Ok(0);
            }
            emit(json, &volumes, print)
        }
        VolumeCmd::Rm { name } => {
            client.call(Request::VolumeDelete { name: name.clone() }, &mut progress)?;
            println!("{name}");
            Ok(0)
        }
    }
}

fn print(volumes: &[VolumeInfo]) {
    let mut t = crate::output::Table::new(&["NAME", ">SIZE", ">ON DISK", "ATTACHED TO", "USED BY"]);
    for v in volumes {
        t.row(vec![
            v.name.clone(),
            format!("{}M", v.size_mib),
            bytes(v.disk_bytes),
            v.attached_to.clone().unwrap_or_else(|| "-".into()),
            if v.used_by.is_empty() {
                "-".to_string()
            } else {
                v.used_by.join(",")
            },
        ]);
    }
    t.print();
}
