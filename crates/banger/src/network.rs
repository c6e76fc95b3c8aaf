//! `banger network ...`: the `--network` names in use (a network is its
//! first VM's creator's while it has VMs), and who else may join one.

use anyhow::bail;
use banger_core::api::{NetworkInfo, Request, Response};
use clap::Subcommand;

use crate::client::Client;
use crate::output::emit;
use crate::progress;

#[derive(Debug, Subcommand)]
pub enum NetworkCmd {
    /// Networks that have VMs: whose, their VMs, shared with whom.
    Ls {
        #[arg(long)]
        json: bool,
        /// Names only, one per line.
        #[arg(short, long, conflicts_with = "json")]
        quiet: bool,
    },
    /// Let USER (a name or uid) put VMs on a network of yours too: its
    /// VMs and theirs reach and resolve each other.
    Share { name: String, user: String },
    /// No longer let USER join it (their VMs already there stay).
    Unshare { name: String, user: String },
}

pub fn run(client: &Client, cmd: NetworkCmd) -> anyhow::Result<i32> {
    let (req, quiet, json) = match cmd {
        NetworkCmd::Ls { json, quiet } => (Request::NetworkList, quiet, json),
        NetworkCmd::Share { name, user } => (
            Request::NetworkShare {
                name,
                user,
                share: true,
            },
            false,
            false,
        ),
        NetworkCmd::Unshare { name, user } => (
            Request::NetworkShare {
                name,
                user,
                share: false,
            },
            false,
            false,
        ),
    };
    let Response::Networks { networks } = client.call(req, &mut progress)? else {
        bail!("unexpected answer from the daemon");
    };
    if quiet {
        networks.iter().for_each(|n| println!("{}", n.name));
        return Ok(0);
    }
    emit(json, &networks, print)
}

fn print(networks: &[NetworkInfo]) {
    let mut t = crate::output::Table::new(&["NAME", ">OWNER", "VMS", "SHARED WITH"]);
    for n in networks {
        t.row(vec![
            n.name.clone(),
            n.owner.to_string(),
            n.vms.join(","),
            if n.shared_with.is_empty() {
                "-".to_string()
            } else {
                n.shared_with
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            },
        ]);
    }
    t.print();
}
