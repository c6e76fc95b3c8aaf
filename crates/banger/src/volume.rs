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
        VolumeCmd::Ls { json } => {
            let Response::Volumes { volumes } = client.call(Request::VolumeList, &mut progress)?
            else {
                bail!("unexpected answer to volume ls");
            };
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
    println!(
        "{:<20} {:>8} {:>10}  {:<16} USED BY",
        "NAME", "SIZE", "ON DISK", "ATTACHED TO"
    );
    for v in volumes {
        println!(
            "{:<20} {:>7}M {:>10}  {:<16} {}",
            v.name,
            v.size_mib,
            bytes(v.disk_bytes),
            v.attached_to.as_deref().unwrap_or("-"),
            if v.used_by.is_empty() {
                "-".to_string()
            } else {
                v.used_by.join(",")
            }
        );
    }
}
