//! `banger api ...`: the E2B-compatible API the daemon serves (issue 22):
//! where it listens, and its keys.

use anyhow::bail;
use banger_core::api::{ApiTokenInfo, Request, Response};
use clap::Subcommand;

use crate::client::Client;
use crate::output::emit;
use crate::progress;

#[derive(Debug, Subcommand)]
pub enum ApiCmd {
    /// Serve the E2B-compatible API on a loopback address (root): the
    /// daemon serves it from now on; prints where. E2B's SDKs then need
    /// E2B_API_URL and E2B_SANDBOX_URL set to http://ADDR and E2B_API_KEY
    /// to a key (`banger api token create`).
    Serve {
        /// ADDR:PORT, a loopback address (port 0: any free one).
        #[arg(long, default_value = "127.0.0.1:3000")]
        listen: String,
    },
    /// Where the API is served (nothing when it is not).
    Status,
    /// Stop serving the API (root).
    Stop,
    /// API keys: each is its maker's, with their rights.
    #[command(subcommand)]
    Token(TokenCmd),
}

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Make a key: printed on the last line, this once (only a hash is
    /// kept).
    Create { name: String },
    /// Your keys (root: everyone's), never the keys themselves.
    #[command(alias = "list")]
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Remove a key of yours (root: `--uid` another user's).
    #[command(name = "rm", alias = "delete")]
    Rm {
        name: String,
        #[arg(long)]
        uid: Option<u32>,
    },
}

pub fn run(client: &Client, cmd: ApiCmd) -> anyhow::Result<i32> {
    let listen = |r: Response| match r {
        Response::Api { listen } => Ok(listen),
        _ => bail!("unexpected answer from the daemon"),
    };
    match cmd {
        ApiCmd::Serve { listen: addr } => {
            let at = listen(client.call(Request::ApiServe { listen: addr }, &mut progress)?)?;
            println!("{}", at.as_deref().unwrap_or_default());
        }
        ApiCmd::Status => {
            if let Some(at) = listen(client.call(Request::ApiStatus, &mut progress)?)? {
                println!("{at}");
            }
        }
        ApiCmd::Stop => {
            listen(client.call(Request::ApiStop, &mut progress)?)?;
        }
        ApiCmd::Token(TokenCmd::Create { name }) => {
            let Response::ApiToken { name, key } =
                client.call(Request::ApiTokenCreate { name }, &mut progress)?
            else {
                bail!("unexpected answer to api token create");
            };
            eprintln!("API key {name} (shown this once; E2B_API_KEY for E2B's SDKs):");
            println!("{key}");
        }
        ApiCmd::Token(TokenCmd::Ls { json }) => {
            let Response::ApiTokens { tokens } =
                client.call(Request::ApiTokenList, &mut progress)?
            else {
                bail!("unexpected answer to api token ls");
            };
            return emit(json, &tokens, print);
        }
        ApiCmd::Token(TokenCmd::Rm { name, uid }) => {
            client.call(
                Request::ApiTokenDelete {
                    name: name.clone(),
                    uid,
                },
                &mut progress,
            )?;
            println!("{name}");
        }
    }
    Ok(0)
}

fn print(tokens: &[ApiTokenInfo]) {
    let mut t = crate::output::Table::new(&["NAME", "UID", "CREATED"]);
    for k in tokens {
        t.row(vec![
            banger_core::text::escape_control(&k.name, false),
            k.uid.to_string(),
            crate::output::age(k.created_at),
        ]);
    }
    t.print();
}
