//! `vm cp`: files and trees between the host and a guest, as tar streams
//! through the guest agent (docker cp's syntax and rules).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use banger_agent::client;
use banger_agent::proto::{Call, FileStat, Msg};

use crate::client::Client;
use crate::guest::agent;

/// One side of a `vm cp`: a VM's path or a local one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    Vm { name: String, path: String },
    Local(String),
}

/// Where a path in a VM that is not absolute is: root's home, where
/// `vm exec` starts (as scp's `host:file` is in the home directory).
pub const GUEST_HOME: &str = "/root";

/// docker cp's syntax: `NAME:PATH` is in a VM when NAME is a valid VM
/// name; anything else (`./a:b`, `/x:y`, `-`) is local. A VM path that is
/// not absolute (`NAME:notes.txt`, `NAME:`) is under [`GUEST_HOME`].
pub fn parse_place(s: &str) -> Place {
    match s.split_once(':') {
        Some((name, path)) if banger_core::validate_name(name).is_ok() && !name.is_empty() => {
            Place::Vm {
                name: name.to_string(),
                path: in_home(path),
            }
        }
        _ => Place::Local(s.to_string()),
    }
}

fn in_home(path: &str) -> String {
    match path {
        p if p.starts_with('/') => p.to_string(),
        "" | "." | "./" => format!("{GUEST_HOME}/"),
        p => format!("{GUEST_HOME}/{}", p.strip_prefix("./").unwrap_or(p)),
    }
}

fn guest_stat(client: &Client, name: &str, path: &str) -> anyhow::Result<Option<FileStat>> {
    match client::call(agent(client, name)?, Call::Stat { path: path.into() }) {
        Ok(Msg::Stat(s)) => Ok(Some(s)),
        Ok(other) => bail!("vm {name}: unexpected agent answer {other:?}"),
        Err(banger_agent::proto::ProtoError::Remote(m)) if m.contains("No such file") => Ok(None),
        Err(e) => Err(anyhow!("vm {name}: {e}")),
    }
}

fn base_name(p: &str) -> anyhow::Result<String> {
    Path::new(p.trim_end_matches('/'))
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| anyhow!("{p:?} names no file"))
}

fn parent_of(p: &str) -> String {
    match Path::new(p.trim_end_matches('/')).parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_string_lossy().into_owned(),
        _ => if p.starts_with('/') { "/" } else { "." }.into(),
    }
}

pub fn cp(client: &Client, src: &str, dst: &str) -> anyhow::Result<()> {
    match (parse_place(src), parse_place(dst)) {
        (Place::Local(from), Place::Vm { name, path }) => cp_in(client, &from, &name, &path),
        (Place::Vm { name, path }, Place::Local(to)) => cp_out(client, &name, &path, &to),
        (Place::Vm { .. }, Place::Vm { .. }) => {
            bail!("vm cp: copy between two VMs through the host (two `vm cp`s)")
        }
        (Place::Local(_), Place::Local(_)) => {
            bail!("vm cp: one side must be in a VM, as NAME:/path (use cp for local copies)")
        }
    }
}

fn cp_in(client: &Client, from: &str, name: &str, path: &str) -> anyhow::Result<()> {
    if from == "-" {
        // A tar stream on stdin, unpacked into the (existing) directory.
        let conn = agent(client, name)?;
        return client::put_tar(conn, path, |w| {
            std::io::copy(&mut std::io::stdin().lock(), w).map(drop)
        })
        .map_err(|e| anyhow!("vm {name}: {e}"));
    }
    let meta = std::fs::symlink_metadata(from).with_context(|| format!("vm cp: {from}"))?;
    // Into the directory if there is one at `path`; else `path` is the
    // new name, in its parent.
    let (dir, entry) = match guest_stat(client, name, path)? {
        Some(s) if s.kind == "dir" => (path.to_string(), base_name(from)?),
        _ => (parent_of(path), base_name(path)?),
    };
    let conn = agent(client, name)?;
    client::put_tar(conn, &dir, |w| {
        let mut b = tar::Builder::new(w);
        b.follow_symlinks(false);
        if meta.is_dir() {
            b.append_dir_all(&entry, from)?;
        } else {
            b.append_path_with_name(from, &entry)?;
        }
        b.finish()
    })
    .map_err(|e| anyhow!("vm {name}: copy {from} to {path}: {e}"))
}

fn cp_out(client: &Client, name: &str, path: &str, to: &str) -> anyhow::Result<()> {
    let conn = agent(client, name)?;
    if to == "-" {
        let mut out = std::io::stdout().lock();
        client::get_tar(conn, path, &mut out).map_err(|e| anyhow!("vm {name}: {e}"))?;
        return out.flush().context("stdout");
    }
    let top = base_name(path).unwrap_or_else(|_| ".".into());
    let to_path = PathBuf::from(to);
    let (dir, rename_to) = if to_path.is_dir() {
        (to_path.clone(), None)
    } else {
        (PathBuf::from(parent_of(to)), Some(to_path.clone()))
    };
    if !dir.is_dir() {
        bail!("vm cp: {} is not a directory", dir.display());
    }
    // Unpacked into a scratch directory beside the destination (the tar
    // crate refuses `..` and links out of it), then moved into place: a
    // failed copy leaves nothing half-written under the final name.
    let scratch = tempfile::Builder::new()
        .prefix(".banger-cp-")
        .tempdir_in(&dir)
        .with_context(|| format!("vm cp: a scratch directory in {}", dir.display()))?;
    let (rx, tx) = std::os::unix::net::UnixStream::pair().context("vm cp: a pipe")?;
    let path_owned = path.to_string();
    let fetch = std::thread::spawn(move || {
        let mut tx = tx;
        client::get_tar(conn, &path_owned, &mut tx)
    });
    let mut ar = tar::Archive::new(rx);
    // The guest wrote this stream: the permission bits are kept, but not
    // setuid, setgid or sticky (a guest must not plant a setuid file on
    // the host), nor ownership (files belong to whoever runs the copy).
    ar.set_preserve_permissions(false);
    ar.set_preserve_ownerships(false);
    ar.set_unpack_xattrs(false);
    ar.set_preserve_mtime(true);
    let unpacked = ar.unpack(scratch.path());
    // Its end of the pipe closed first: a fetch blocked on a full pipe
    // (the unpack stopped early) ends instead of waiting forever.
    drop(ar);
    let fetched = fetch
        .join()
        .map_err(|_| anyhow!("vm cp: the copy thread panicked"))?;
    fetched.map_err(|e| anyhow!("vm {name}: {e}"))?;
    unpacked.with_context(|| format!("vm cp: unpack into {}", dir.display()))?;
    let got = scratch.path().join(&top);
    let dest = rename_to.unwrap_or_else(|| dir.join(&top));
    if dest.is_dir() && got.is_dir() {
        bail!(
            "vm cp: {} exists; copy into it as {}/ or remove it first",
            dest.display(),
            dest.display()
        );
    }
    std::fs::rename(&got, &dest).with_context(|| format!("vm cp: move into {}", dest.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_follow_docker_cp() {
        assert_eq!(
            parse_place("web:/etc/hosts"),
            Place::Vm {
                name: "web".into(),
                path: "/etc/hosts".into()
            }
        );
        assert_eq!(parse_place("./a:b"), Place::Local("./a:b".into()));
        assert_eq!(parse_place("/x:y"), Place::Local("/x:y".into()));
        assert_eq!(parse_place("-"), Place::Local("-".into()));
        // Not absolute: under root's home, where `vm exec` starts.
        for (given, want) in [
            ("web:notes.txt", "/root/notes.txt"),
            ("web:./a/b", "/root/a/b"),
            ("web:", "/root/"),
            ("web:.", "/root/"),
            ("web:../etc", "/root/../etc"),
        ] {
            assert_eq!(
                parse_place(given),
                Place::Vm {
                    name: "web".into(),
                    path: want.into()
                },
                "{given}"
            );
        }
        assert_eq!(
            parse_place("Bad_Name:/x"),
            Place::Local("Bad_Name:/x".into())
        );
        assert_eq!(parent_of("/a/b"), "/a");
        assert_eq!(parent_of("/a"), "/");
        assert_eq!(parent_of("b"), ".");
        assert_eq!(base_name("/a/b/").unwrap(), "b");
    }
}
