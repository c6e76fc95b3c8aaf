//! Files: trees in and out as tar streams (modes and times kept, never
//! whole in memory), stat, list, mkdir, move, remove, and watching a
//! directory with inotify.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use banger_agent::proto::{
    check_meta, write_msg, FileStat, FrameReader, FrameWriter, Kind, Msg, ProtoError, META_KEYS,
    META_PREFIX, META_TOTAL_MAX,
};

/// Entries a `list` returns at most.
const MAX_LIST: usize = 100_000;

fn kind_of(ft: std::fs::FileType) -> &'static str {
    if ft.is_symlink() {
        "symlink"
    } else if ft.is_dir() {
        "dir"
    } else if ft.is_file() {
        "file"
    } else {
        "other"
    }
}

/// Users' and groups' names by id, from the guest's /etc/passwd and
/// /etc/group (no NSS in a static binary), read once per call.
#[derive(Default)]
pub struct Names {
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
}

impl Names {
    pub fn read() -> Names {
        // `name:x:id:...`, the first of each id; a file over 4 MiB is
        // none of a sane guest's.
        let ids = |path: &str| {
            let mut out = HashMap::new();
            let mut text = String::new();
            if let Ok(f) = std::fs::File::open(path) {
                use std::io::Read;
                let _ = f.take(4 << 20).read_to_string(&mut text);
            }
            for l in text.lines() {
                let mut f = l.split(':');
                if let (Some(name), Some(_), Some(Ok(id))) =
                    (f.next(), f.next(), f.next().map(str::parse::<u32>))
                {
                    out.entry(id).or_insert_with(|| name.to_string());
                }
            }
            out
        };
        Names {
            users: ids("/etc/passwd"),
            groups: ids("/etc/group"),
        }
    }
}

/// The file's metadata: its `user.e2b.*` attributes (a symlink has none;
/// a filesystem without them, none), as much of it as banger would set:
/// at most [`META_KEYS`] keys and [`META_TOTAL_MAX`] bytes (an attribute
/// set otherwise past that is left out).
fn meta_of(path: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut total = 0;
    for n in meta_names(path) {
        if out.len() == META_KEYS {
            break;
        }
        let key = n[META_PREFIX.len()..].to_string();
        if let Ok(Some(v)) = xattr::get(path, &n) {
            if total + key.len() + v.len() <= META_TOTAL_MAX {
                total += key.len() + v.len();
                out.insert(key, String::from_utf8_lossy(&v).into_owned());
            }
        }
    }
    out
}

/// The names of the file's metadata attributes, all of them (the kernel
/// bounds a file's list of names at 64 KiB).
fn meta_names(path: &Path) -> Vec<String> {
    let Ok(names) = xattr::list(path) else {
        return Vec::new();
    };
    names
        .filter_map(|n| n.into_string().ok())
        .filter(|n| n.starts_with(META_PREFIX) && n.len() > META_PREFIX.len())
        .collect()
}

pub fn stat(path: &str) -> Result<FileStat, String> {
    stat_named(path, &Names::read())
}

fn stat_named(path: &str, names: &Names) -> Result<FileStat, String> {
    let m = std::fs::symlink_metadata(path).map_err(|e| format!("{path}: {e}"))?;
    Ok(FileStat {
        path: path.to_string(),
        kind: kind_of(m.file_type()).into(),
        size: m.len(),
        mode: m.permissions().mode() & 0o7777,
        mtime: m.mtime(),
        uid: m.uid(),
        gid: m.gid(),
        link: m
            .file_type()
            .is_symlink()
            .then(|| std::fs::read_link(path).ok())
            .flatten()
            .map(|l| l.to_string_lossy().into_owned()),
        meta: if m.file_type().is_symlink() {
            BTreeMap::new()
        } else {
            meta_of(Path::new(path))
        },
        owner: names.users.get(&m.uid()).cloned(),
        group: names.groups.get(&m.gid()).cloned(),
    })
}

/// Makes `meta` the file's whole metadata: keys it lacks are removed,
/// the rest set. A symlink is refused (Linux keeps no user attributes on
/// one); a filesystem without user attributes says so.
pub fn set_meta(path: &str, meta: &BTreeMap<String, String>) -> Result<FileStat, String> {
    check_meta(meta)?;
    let p = Path::new(path);
    let m = std::fs::symlink_metadata(p).map_err(|e| format!("{path}: {e}"))?;
    if m.file_type().is_symlink() {
        return Err(format!("{path}: a symlink keeps no metadata"));
    }
    for n in meta_names(p) {
        if !meta.contains_key(&n[META_PREFIX.len()..]) {
            xattr::remove(p, &n).map_err(|e| format!("{path}: remove metadata {n:?}: {e}"))?;
        }
    }
    for (k, v) in meta {
        xattr::set(p, format!("{META_PREFIX}{k}"), v.as_bytes())
            .map_err(|e| format!("{path}: set metadata {k:?}: {e}"))?;
    }
    stat(path)
}

pub fn list(path: &str) -> Result<Vec<FileStat>, String> {
    let names = Names::read();
    let mut out = Vec::new();
    for e in std::fs::read_dir(path).map_err(|e| format!("{path}: {e}"))? {
        let e = e.map_err(|e| format!("{path}: {e}"))?;
        if out.len() == MAX_LIST {
            return Err(format!("{path}: over {MAX_LIST} entries"));
        }
        out.push(stat_named(&e.path().to_string_lossy(), &names)?);
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

pub fn mkdir(path: &str, mode: u32, parents: bool) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(parents)
        .mode(mode & 0o7777)
        .create(path)
        .map_err(|e| format!("mkdir {path}: {e}"))
}

pub fn rename(from: &str, to: &str) -> Result<(), String> {
    std::fs::rename(from, to).map_err(|e| format!("move {from} to {to}: {e}"))
}

pub fn remove(path: &str, recursive: bool) -> Result<(), String> {
    let m = std::fs::symlink_metadata(path).map_err(|e| format!("{path}: {e}"))?;
    let r = if !m.is_dir() {
        std::fs::remove_file(path)
    } else if recursive {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_dir(path)
    };
    r.map_err(|e| format!("remove {path}: {e}"))
}

/// `path` as a tar stream whose one top entry is named after `path`'s last
/// component; symlinks are archived as links.
pub fn get_tar(mut c: UnixStream, path: &str) -> Result<(), ProtoError> {
    let p = Path::new(path);
    let m = match std::fs::symlink_metadata(p) {
        Ok(m) => m,
        Err(e) => return write_msg(&mut c, &Msg::error(format!("{path}: {e}"))),
    };
    let name = p
        .file_name()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    let mut b = tar::Builder::new(FrameWriter::new(c.try_clone()?, Kind::Data));
    b.follow_symlinks(false);
    let r = if m.is_dir() {
        b.append_dir_all(&name, p)
    } else {
        b.append_path_with_name(p, &name)
    };
    let r = r
        .and_then(|()| b.into_inner())
        .and_then(FrameWriter::finish);
    match r {
        Ok(_) => write_msg(&mut c, &Msg::Done),
        Err(e) => write_msg(&mut c, &Msg::error(format!("{path}: {e}"))),
    }
}

/// Unpacks the tar stream that follows into the directory `dir`. Paths
/// that would leave `dir` (`..`, links out) are refused by the tar crate.
pub fn put_tar(mut c: UnixStream, dir: &str) -> Result<(), ProtoError> {
    if !Path::new(dir).is_dir() {
        // The stream is read to its end so that the host's writes finish.
        let _ = FrameReader::new(c.try_clone()?).finish();
        return write_msg(&mut c, &Msg::error(format!("{dir} is not a directory")));
    }
    let mut a = tar::Archive::new(FrameReader::new(c.try_clone()?));
    a.set_preserve_permissions(true);
    a.set_preserve_mtime(true);
    a.set_overwrite(true);
    let r = a
        .unpack(dir)
        .and_then(|()| a.into_inner().finish().map(drop));
    match r {
        Ok(()) => write_msg(&mut c, &Msg::Done),
        Err(e) => write_msg(&mut c, &Msg::error(format!("unpack into {dir}: {e}"))),
    }
}

/// Events under `path` as messages, until the host closes the connection.
/// Whether `path` is on a network filesystem (NFS, CIFS/SMB, or FUSE,
/// virtio-fs included), whose changes made elsewhere inotify never sees.
fn on_network_mount(path: &str) -> Result<bool, String> {
    const NETWORK: [i64; 5] = [
        0x6969,      // NFS
        0xFF53_4D42, // CIFS
        0x517B,      // SMB
        0xFE53_4D42, // SMB2
        0x6573_5546, // FUSE (virtio-fs)
    ];
    // (As an io::Error, its message says "(os error N)", which the host
    // maps to its code.)
    let s = nix::sys::statfs::statfs(path)
        .map_err(|e| format!("{path}: {}", std::io::Error::from(e)))?;
    // (An i64 on glibc, an unsigned long on musl.)
    #[allow(clippy::unnecessary_cast)]
    let ty = s.filesystem_type().0 as i64;
    Ok(NETWORK.contains(&ty))
}

/// Events under `path` as messages, until the host closes the connection;
/// with `entries`, each with the stat of what it is about.
pub fn watch(
    mut c: UnixStream,
    path: &str,
    recursive: bool,
    entries: bool,
    network_mounts: bool,
) -> Result<(), ProtoError> {
    if !network_mounts {
        match on_network_mount(path) {
            Ok(false) => {}
            Ok(true) => {
                return write_msg(
                    &mut c,
                    &Msg::error(format!(
                        "watch {path}: it is on a network filesystem, whose events may never \
                         come; allow network mounts to watch it anyway"
                    )),
                )
            }
            Err(e) => return write_msg(&mut c, &Msg::error(format!("watch {e}"))),
        }
    }
    let names = entries.then(Names::read);
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let flags = AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_CLOSE_WRITE;
    let ino = match Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK) {
        Ok(i) => i,
        Err(e) => return write_msg(&mut c, &Msg::error(format!("inotify: {e}"))),
    };
    let mut dirs = HashMap::new();
    let add = |ino: &Inotify, dirs: &mut HashMap<_, PathBuf>, d: &Path| {
        ino.add_watch(d, flags).map(|wd| {
            dirs.insert(wd, d.to_path_buf());
        })
    };
    if let Err(e) = add(&ino, &mut dirs, Path::new(path)) {
        let e = std::io::Error::from(e);
        return write_msg(&mut c, &Msg::error(format!("watch {path}: {e}")));
    }
    if recursive {
        let mut stack = vec![PathBuf::from(path)];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    let _ = add(&ino, &mut dirs, &e.path());
                    stack.push(e.path());
                }
            }
        }
    }
    write_msg(&mut c, &Msg::Done)?;
    let conn = c.try_clone()?;
    loop {
        let mut fds = [
            PollFd::new(ino.as_fd(), PollFlags::POLLIN),
            PollFd::new(conn.as_fd(), PollFlags::POLLIN),
        ];
        if poll(&mut fds, PollTimeout::NONE).is_err() {
            continue;
        }
        // The host sends nothing on a watch: readable means it is gone.
        if fds[1].revents().is_some_and(|r| !r.is_empty()) {
            return Ok(());
        }
        for ev in ino.read_events().unwrap_or_default() {
            let Some(dir) = dirs.get(&ev.wd).cloned() else {
                continue;
            };
            let full = match &ev.name {
                Some(n) => dir.join(n),
                None => dir.clone(),
            };
            let m = ev.mask;
            let kind =
                if m.contains(AddWatchFlags::IN_CREATE) || m.contains(AddWatchFlags::IN_MOVED_TO) {
                    if recursive && m.contains(AddWatchFlags::IN_ISDIR) {
                        let _ = add(&ino, &mut dirs, &full);
                    }
                    "create"
                } else if m.contains(AddWatchFlags::IN_DELETE)
                    || m.contains(AddWatchFlags::IN_MOVED_FROM)
                {
                    "remove"
                } else if m.contains(AddWatchFlags::IN_ATTRIB) {
                    "attrib"
                } else {
                    "modify"
                };
            let path = full.to_string_lossy().into_owned();
            let entry = match &names {
                Some(n) if kind != "remove" => stat_named(&path, n).ok().map(Box::new),
                _ => None,
            };
            write_msg(
                &mut c,
                &Msg::Event {
                    path,
                    kind: kind.into(),
                    entry,
                },
            )?;
        }
    }
}
