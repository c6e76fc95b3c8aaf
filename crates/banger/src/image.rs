//! `banger image import|customize` and `banger vm commit`: images made from
//! what the user has (a root filesystem, an OCI image) or from a VM.

use std::path::Path;

use anyhow::{anyhow, bail, Context};
use banger_core::api::{CreateVm, Request, Response};
use banger_core::sizing::SizeRequest;
use banger_core::VmmKind;

use crate::client::Client;
use crate::guest::ExecFlags;
use crate::progress;

/// Where `customize` puts the script in the guest.
const GUEST_SCRIPT: &str = "banger-customize";

fn print_image(r: Response) -> anyhow::Result<i32> {
    match r {
        Response::Image(i) => {
            println!("{}", i.name);
            Ok(0)
        }
        other => bail!("unexpected answer from bangerd: {other:?}"),
    }
}

pub fn import(client: &Client, name: &str, source: &Path) -> anyhow::Result<i32> {
    // The daemon reads the source: it gets an absolute path.
    let source = std::fs::canonicalize(source)
        .with_context(|| format!("image import: {}", source.display()))?;
    let mut ui = crate::ui::Ui::new(format!("importing image {name}"));
    let r = client.call(
        Request::ImageImport {
            name: name.to_string(),
            source,
        },
        &mut |e| ui.event(e),
    );
    ui.clear();
    print_image(r?)
}

pub fn commit(client: &Client, vm: &str, image: &str) -> anyhow::Result<i32> {
    print_image(client.call(
        Request::VmCommit {
            name: vm.to_string(),
            image: image.to_string(),
        },
        &mut progress,
    )?)
}

/// Boots `from` as a VM that lives as long as this command (an `rm`
/// create: Ctrl-C or a crash deletes it), runs the script through the
/// guest agent with its output on ours, stops the VM cleanly and commits
/// it as `name`.
pub fn customize(
    client: &Client,
    name: &str,
    from: &str,
    script: &Path,
    vmm: Option<VmmKind>,
) -> anyhow::Result<i32> {
    banger_core::validate_name(name).map_err(|e| anyhow!("image customize: {e}"))?;
    let body = std::fs::read(script)
        .with_context(|| format!("image customize: --run {}", script.display()))?;
    let req = Request::VmCreate(Box::new(CreateVm {
        name: None,
        image: Some(from.to_string()),
        size: SizeRequest::default(),
        vmm,
        start: true,
        rm: true,
        auto_stop: Default::default(),
        net: Default::default(),
        volumes: Vec::new(),
        root_mib: None,
        mounts: Vec::new(),
        from: None,
        // A customize session boots the image itself, and leaves no
        // warm-start snapshot.
        cold: true,
        metadata: Default::default(),
        env: Vec::new(),
    }));
    let mut ui = crate::ui::Ui::new(format!("booting {from} to customize"));
    let spinner = ui.handle();
    let (done, answer) =
        client.call_lease(req, &mut |e| ui.event(e), |vm| -> anyhow::Result<i32> {
            if let Some(b) = &spinner {
                b.finish_and_clear();
            }
            let vm_name = vm.name.clone();
            let conn = client.agent(&vm_name)?;
            banger_agent::client::put_tar(conn, "/tmp", |w| {
                let mut h = tar::Header::new_gnu();
                h.set_mode(0o755);
                h.set_size(body.len() as u64);
                h.set_mtime(banger_core::unix_now().max(0) as u64);
                let mut b = tar::Builder::new(w);
                b.append_data(&mut h, GUEST_SCRIPT, &body[..])?;
                b.finish()
            })
            .map_err(|e| anyhow!("vm {vm_name}: copying the script in: {e}"))?;
            eprintln!("running {} in vm {vm_name}", script.display());
            let argv = ["/bin/sh".to_string(), format!("/tmp/{GUEST_SCRIPT}")];
            let code = crate::guest::exec(client, &vm_name, &ExecFlags::default(), &argv)?;
            if code != 0 {
                bail!(
                    "{} exited with status {code} in vm {vm_name}: image {name} not saved",
                    script.display()
                );
            }
            // The script stays behind in /tmp, a tmpfs: not in the image.
            client.call(
                Request::VmStop {
                    name: vm_name.clone(),
                },
                &mut progress,
            )?;
            commit(client, &vm_name, name)
        });
    if done.is_none() {
        answer?;
    }
    done.unwrap_or_else(|| Err(anyhow!("image customize: the VM never came up")))
}
