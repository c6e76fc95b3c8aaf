//! `banger mcp`: an MCP server over stdio (the official Rust SDK,
//! `rmcp`), so that an MCP client (Claude Desktop, Claude Code, Cursor,
//! VS Code, ...) creates and uses banger VMs: create, run a command, read,
//! write and list files, list and delete VMs.
//!
//! Every tool is what the CLI does, through the same daemon socket with
//! the rights of the user who started `banger mcp`, and its arguments are
//! checked as the CLI's are (names, sizes, durations). Outputs are
//! bounded: a command's output and a file read at most [`OUT_MAX`] bytes
//! each (the rest cut, and said). stdout carries the protocol; nothing
//! else is written there.

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use banger_agent::client::Session;
use banger_agent::proto::{Call, ExecSpec, Msg};
use banger_core::api::{CreateVm, Request, Response, VmInfo};
use rmcp::handler::server::{router::tool::ToolRouter, wrapper::Parameters};
use rmcp::model::{CallToolResult, ContentBlock, ServerCapabilities, ServerConfig};
use rmcp::{schemars, tool, tool_handler, tool_router, ErrorData, ServerHandler, ServiceExt};
use serde::Deserialize;

use crate::client::Client;

/// A command's output, or a file read, at most (each stream).
const OUT_MAX: usize = 1 << 20;
/// A command's time, unless the call says otherwise (and at most).
const RUN_DEFAULT: u64 = 120;
const RUN_MAX: u64 = 3600;

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct CreateArgs {
    /// The VM's name (a DNS label: a-z, 0-9, '-'); one is made up when absent.
    pub name: Option<String>,
    /// The image to boot (default: banger's default image).
    pub image: Option<String>,
    /// vCPUs.
    pub cpus: Option<u32>,
    /// Memory, e.g. "1024", "512M", "2G".
    pub memory: Option<String>,
    /// Stopped and deleted after this long, e.g. "30m", "2h".
    pub ttl: Option<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct RunArgs {
    /// The VM's name.
    pub vm: String,
    /// The command line, run by the guest's /bin/sh -c.
    pub command: String,
    /// The guest user (default: root).
    pub user: Option<String>,
    /// The working directory in the guest (absolute).
    pub cwd: Option<String>,
    /// Seconds the command may take (default 120, at most 3600); it is
    /// killed after.
    pub timeout_secs: Option<u64>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct PathArgs {
    /// The VM's name.
    pub vm: String,
    /// An absolute path in the guest.
    pub path: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct WriteArgs {
    /// The VM's name.
    pub vm: String,
    /// An absolute path in the guest (its directory is made).
    pub path: String,
    /// The file's content (text).
    pub content: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct VmArgs {
    /// The VM's name.
    pub vm: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct NoArgs {}

#[derive(Clone)]
pub struct Banger {
    client: std::sync::Arc<Client>,
    tool_router: ToolRouter<Self>,
}

fn bad(e: impl std::fmt::Display) -> ErrorData {
    ErrorData::invalid_params(e.to_string(), None)
}

/// A tool's text, or its failure as its result (the model reads it), not
/// a protocol error.
fn answer(r: anyhow::Result<String>) -> CallToolResult {
    match r {
        Ok(t) => CallToolResult::success(vec![ContentBlock::text(t)]),
        Err(e) => CallToolResult::error(vec![ContentBlock::text(format!("{e:#}"))]),
    }
}

fn name_ok(what: &str, n: &str) -> Result<(), ErrorData> {
    banger_core::validate_name(n).map_err(|e| bad(format!("{what} {n:?}: {e}")))
}

fn path_ok(p: &str) -> Result<(), ErrorData> {
    if !p.starts_with('/') || p.contains('\0') || p.len() > 4096 {
        return Err(bad(format!("path {p:?}: an absolute path in the guest")));
    }
    Ok(())
}

/// Runs `f` (the CLI's blocking calls) off the protocol's thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .context("the tool's thread")?
}

/// A buffer that keeps the first [`OUT_MAX`] bytes and counts the rest.
#[derive(Default)]
struct Capped {
    kept: Vec<u8>,
    cut: usize,
}

impl Write for Capped {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let room = OUT_MAX.saturating_sub(self.kept.len());
        self.kept.extend_from_slice(&b[..b.len().min(room)]);
        self.cut += b.len().saturating_sub(room);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capped {
    fn text(&self) -> String {
        let mut s = String::from_utf8_lossy(&self.kept).into_owned();
        if self.cut > 0 {
            s.push_str(&format!("\n[{} more bytes cut]", self.cut));
        }
        s
    }
}

fn vm_line(v: &VmInfo) -> String {
    format!(
        "{}: {}, image {}, {} vCPU, {} MiB{}",
        v.name,
        v.state,
        v.image,
        v.cpus,
        v.memory_mib,
        v.guest_ip
            .as_deref()
            .map(|ip| format!(", address {ip}"))
            .unwrap_or_default()
    )
}

impl Banger {
    /// Runs `f` (the CLI's blocking calls, with its client) off the
    /// protocol's thread: its text, or its failure, is the tool's result.
    async fn call(
        &self,
        f: impl FnOnce(&Client) -> anyhow::Result<String> + Send + 'static,
    ) -> Result<CallToolResult, ErrorData> {
        let client = self.client.clone();
        Ok(answer(blocking(move || f(&client)).await))
    }
}

/// One agent call to VM `vm` within 30 s: its answer, an error of the
/// agent's as an error.
fn agent_msg(client: &Client, vm: &str, call: Call) -> anyhow::Result<Msg> {
    let conn = crate::guest::agent(client, vm)?;
    match banger_agent::client::call_within(conn, call, Duration::from_secs(30))
        .map_err(|e| anyhow::anyhow!("vm {vm}: {e}"))?
    {
        Msg::Error { message } => anyhow::bail!("vm {vm}: {message}"),
        m => Ok(m),
    }
}

#[tool_router]
impl Banger {
    pub fn new(client: Client) -> Self {
        Banger {
            client: std::sync::Arc::new(client),
            tool_router: Self::tool_router(),
        }
    }

    #[tool(
        description = "Create and boot a banger microVM (an isolated Linux machine); \
                          returns its name, which the other tools take"
    )]
    async fn create_vm(
        &self,
        Parameters(a): Parameters<CreateArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        if let Some(n) = &a.name {
            name_ok("name", n)?;
        }
        if let Some(i) = &a.image {
            name_ok("image", i)?;
        }
        let memory = a
            .memory
            .as_deref()
            .map(banger_core::sizing::parse_size_mib)
            .transpose()
            .map_err(|e| bad(format!("memory: {e}")))?;
        let ttl = a
            .ttl
            .as_deref()
            .map(|t| banger_core::duration::parse_secs("ttl", t))
            .transpose()
            .map_err(bad)?;
        let req = CreateVm {
            name: a.name,
            image: a.image,
            size: banger_core::sizing::SizeRequest {
                cpus: a.cpus,
                memory_mib: memory,
                disk_mib: None,
            },
            vmm: None,
            start: true,
            rm: false,
            auto_stop: banger_core::AutoStop {
                ttl_secs: ttl,
                at_ttl: if ttl.is_some() {
                    banger_core::TtlAction::Delete
                } else {
                    banger_core::TtlAction::Stop
                },
                ..Default::default()
            },
            net: Default::default(),
            volumes: Vec::new(),
            root_mib: None,
            mounts: Vec::new(),
            from: None,
            cold: false,
            metadata: Default::default(),
            env: Vec::new(),
        };
        let client = self.client.clone();
        let r =
            blocking(
                move || match client.call(Request::VmCreate(Box::new(req)), &mut |_| {})? {
                    Response::Vm(v) => Ok(vm_line(&v)),
                    _ => anyhow::bail!("unexpected answer to the create"),
                },
            )
            .await;
        Ok(answer(r))
    }

    #[tool(
        description = "Run a shell command line in a banger VM; returns its exit code, \
                          stdout and stderr"
    )]
    async fn run_command(
        &self,
        Parameters(a): Parameters<RunArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        name_ok("vm", &a.vm)?;
        if let Some(c) = &a.cwd {
            path_ok(c)?;
        }
        if a.command.contains('\0') || a.command.len() > 1 << 20 {
            return Err(bad("command: at most 1 MiB, without NUL"));
        }
        let limit = a.timeout_secs.unwrap_or(RUN_DEFAULT);
        if limit == 0 || limit > RUN_MAX {
            return Err(bad(format!("timeout_secs {limit}: 1 to {RUN_MAX}")));
        }
        let spec = ExecSpec {
            argv: vec!["/bin/sh".into(), "-c".into(), a.command],
            cwd: a.cwd,
            user: a.user,
            ..Default::default()
        };
        self.call(move |client| {
            let conn = crate::guest::agent(client, &a.vm)?;
            let s = Session::start(conn, Call::Exec(spec))
                .map_err(|e| anyhow::anyhow!("vm {}: {e}", a.vm))?;
            let control = s.control();
            let (mut out, mut err) = (Capped::default(), Capped::default());
            // Killed at its time (the wait is bounded a little beyond).
            let (tx, rx) = std::sync::mpsc::channel::<()>();
            let killer = std::thread::spawn(move || {
                if rx.recv_timeout(Duration::from_secs(limit))
                    == Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                {
                    let _ = control.signal(9);
                }
            });
            let st = s.wait_within(&mut out, &mut err, Duration::from_secs(limit + 30));
            let _ = tx.send(());
            let _ = killer.join();
            let st = st.map_err(|e| anyhow::anyhow!("vm {}: {e}", a.vm))?;
            Ok(format!(
                "exit code: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                st.shell_code(),
                out.text(),
                err.text()
            ))
        })
        .await
    }

    #[tool(description = "Read a text file from a banger VM")]
    async fn read_file(
        &self,
        Parameters(a): Parameters<PathArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        name_ok("vm", &a.vm)?;
        path_ok(&a.path)?;
        self.call(move |client| {
            // What it is first: a file, and how large.
            let st = match agent_msg(
                client,
                &a.vm,
                Call::Stat {
                    path: a.path.clone(),
                },
            )? {
                Msg::Stat(st) => st,
                other => anyhow::bail!("vm {}: unexpected answer {other:?}", a.vm),
            };
            if st.kind != "file" {
                anyhow::bail!("vm {}: {} is not a file ({})", a.vm, a.path, st.kind);
            }
            // Its first OUT_MAX bytes (the guest's head, the path an
            // argument), within a bound.
            let spec = ExecSpec {
                argv: vec![
                    "head".into(),
                    "-c".into(),
                    OUT_MAX.to_string(),
                    "--".into(),
                    a.path.clone(),
                ],
                ..Default::default()
            };
            let conn = crate::guest::agent(client, &a.vm)?;
            let s = Session::start(conn, Call::Exec(spec))
                .map_err(|e| anyhow::anyhow!("vm {}: {e}", a.vm))?;
            let (mut out, mut err) = (Capped::default(), Capped::default());
            let status = s
                .wait_within(&mut out, &mut err, Duration::from_secs(60))
                .map_err(|e| anyhow::anyhow!("vm {}: {}: {e}", a.vm, a.path))?;
            if status.code != Some(0) {
                anyhow::bail!("vm {}: {}: {}", a.vm, a.path, err.text().trim());
            }
            let mut text = out.text();
            if st.size > OUT_MAX as u64 {
                text.push_str(&format!("\n[{} more bytes cut]", st.size - OUT_MAX as u64));
            }
            Ok(text)
        })
        .await
    }

    #[tool(description = "Write a text file in a banger VM (its directory is made)")]
    async fn write_file(
        &self,
        Parameters(a): Parameters<WriteArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        name_ok("vm", &a.vm)?;
        path_ok(&a.path)?;
        if a.path.ends_with('/') || a.content.len() > 64 << 20 {
            return Err(bad("a file path, and at most 64 MiB of content"));
        }
        self.call(move |client| {
            let conn = crate::guest::agent(client, &a.vm)?;
            // No read or write of the copy may stall longer.
            conn.set_read_timeout(Some(Duration::from_secs(30)))?;
            conn.set_write_timeout(Some(Duration::from_secs(30)))?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            banger_agent::client::put_tar(conn, "/", |w| {
                let mut b = tar::Builder::new(w);
                let mut h = tar::Header::new_gnu();
                h.set_size(a.content.len() as u64);
                h.set_mode(0o644);
                h.set_mtime(now);
                h.set_entry_type(tar::EntryType::Regular);
                b.append_data(&mut h, a.path.trim_start_matches('/'), a.content.as_bytes())?;
                b.finish()
            })
            .map_err(|e| anyhow::anyhow!("vm {}: {}: {e}", a.vm, a.path))?;
            Ok(format!("wrote {} bytes to {}", a.content.len(), a.path))
        })
        .await
    }

    #[tool(description = "List a directory in a banger VM: each entry's kind, size and name")]
    async fn list_files(
        &self,
        Parameters(a): Parameters<PathArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        name_ok("vm", &a.vm)?;
        path_ok(&a.path)?;
        self.call(move |client| {
            match agent_msg(
                client,
                &a.vm,
                Call::List {
                    path: a.path.clone(),
                },
            )? {
                Msg::Entries { mut list } => {
                    list.sort_by(|x, y| x.path.cmp(&y.path));
                    Ok(list
                        .iter()
                        .map(|e| {
                            format!(
                                "{}\t{}\t{}",
                                e.kind,
                                e.size,
                                banger_core::text::escape_control(&e.path, false)
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("\n"))
                }
                other => anyhow::bail!("vm {}: unexpected answer {other:?}", a.vm),
            }
        })
        .await
    }

    #[tool(description = "List banger VMs: name, state, image, sizes, address")]
    async fn list_vms(
        &self,
        Parameters(_): Parameters<NoArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        self.call(
            move |client| match client.call(Request::VmList, &mut |_| {})? {
                Response::Vms { vms } => Ok(vms.iter().map(vm_line).collect::<Vec<_>>().join("\n")),
                _ => anyhow::bail!("unexpected answer to the list"),
            },
        )
        .await
    }

    #[tool(description = "Delete a banger VM (stopped first if it runs); everything of it goes")]
    async fn delete_vm(
        &self,
        Parameters(a): Parameters<VmArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        name_ok("vm", &a.vm)?;
        self.call(move |client| {
            client.call(
                Request::VmDelete {
                    name: a.vm.clone(),
                    force: true,
                },
                &mut |_| {},
            )?;
            Ok(format!("deleted {}", a.vm))
        })
        .await
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Banger {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build()).with_instructions(
            "Create and use banger microVMs: isolated Linux machines that boot in seconds. \
             create_vm returns a name; run_command, read_file, write_file and list_files take \
             it; delete_vm removes the VM.",
        )
    }
}

/// `banger mcp`: serves MCP on stdin and stdout until the client closes.
pub fn serve(client: Client) -> anyhow::Result<i32> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the MCP server's runtime")?;
    rt.block_on(async move {
        let service = Banger::new(client)
            .serve(rmcp::transport::stdio())
            .await
            .context("serve MCP on stdio")?;
        service.waiting().await.context("serve MCP on stdio")?;
        anyhow::Ok(())
    })?;
    Ok(0)
}
