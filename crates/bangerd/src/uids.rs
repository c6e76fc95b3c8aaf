//! The uid range a daemon's VMMs run as (`resources::jail`: uid = base +
//! the VM's address slot), claimed host-wide for as long as the daemon
//! lives: two daemons (the installed service and the tests' instances, a
//! user's second state dir) must never hand one uid to two VMs.
//!
//! A claim is an exclusive `flock` on `/run/banger-uids/<block>.lock` for
//! every block of [`UID_BLOCK`] uids the range touches; the lock file
//! holds the claiming state dir, so a refusal names it.
//!
//! - `--vmm-uid-base` given: that range (recorded as below, so that a
//!   search passes over it while its VMs may run), or a refusal naming
//!   its holder.
//! - not given: the range this state dir claimed before
//!   (`<state>/vmm-uid-base`, kept across restarts: its running VMs' files
//!   and processes are that range's), else the default range for a state
//!   dir an older banger already used (its VMs run as those uids), else the
//!   first free range from the default up, recorded there.
//!
//! Lock files outlive their daemon: VMs keep running across a daemon's
//! restart, so a range stays its state dir's while that dir still records
//! it, and a free-range search skips it even with no daemon holding the
//! lock. A lock file naming a state dir that no longer records that range
//! (removed, or moved on) is free.

use std::io::{Read, Seek, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use banger_host::fsutil::{self, WrapIo};
use thiserror::Error;

/// Where daemons claim their ranges (host-wide, not per state dir).
pub const UID_CLAIMS: &str = "/run/banger-uids";
/// Claims are made in blocks of this many uids.
pub const UID_BLOCK: u64 = 16_384;
/// The file in a state dir that keeps the base its daemon chose itself.
pub const RECORD: &str = "vmm-uid-base";
/// Bases chosen here stay below 2^31 (some tools read uids as signed).
const TOP: u64 = 1 << 31;

#[derive(Debug, Error)]
pub enum UidError {
    #[error(
        "the VMM uids {first}..={last} of --vmm-uid-base {base} are another bangerd's \
         (state dir {holder}, {lock}): give this daemon a base of its own \
         (--vmm-uid-base, at least {UID_BLOCK} apart), or leave the flag out to have a free range chosen"
    )]
    Taken {
        base: u32,
        first: u64,
        last: u64,
        holder: String,
        lock: PathBuf,
    },
    #[error(
        "the VMM uids this state dir keeps ({record}: {base}) are now another bangerd's \
         (state dir {holder}): stop that daemon, or, while no VM of this state dir runs, \
         remove {record} to have a free range chosen"
    )]
    RecordTaken {
        base: u32,
        record: PathBuf,
        holder: String,
    },
    #[error("{path}: {text:?} is not a uid base: remove the file to have a free range chosen")]
    BadRecord { path: PathBuf, text: String },
    #[error("no free range of {count} VMM uids between {from} and 2^31: stop a bangerd, or pass --vmm-uid-base")]
    NoneFree { count: u32, from: u32 },
    #[error("{0}: replaced while it was being claimed (another bangerd starting or stopping): start again")]
    Raced(PathBuf),
    #[error(transparent)]
    Fs(#[from] fsutil::FsError),
}

/// A daemon's claim: its base, and the locks that hold it until the
/// daemon exits. The lock files stay (naming the state dir): see the
/// module's text.
#[derive(Debug)]
pub struct UidClaim {
    pub base: u32,
    /// Whether the daemon chose the base itself (no `--vmm-uid-base`).
    pub chosen: bool,
    locks: Vec<(PathBuf, nix::fcntl::Flock<std::fs::File>)>,
}

/// How often a claim is tried again when a lock file was replaced under it.
const RACE_TRIES: usize = 5;

/// Claims `count` VMM uids for the daemon of `state_dir`: `given`'s range,
/// or (none given) the one the state dir keeps, or the first free one
/// from `default` up (then kept).
pub fn claim(
    given: Option<u32>,
    default: u32,
    count: u32,
    state_dir: &Path,
) -> Result<UidClaim, UidError> {
    claim_in(Path::new(UID_CLAIMS), given, default, count, state_dir)
}

fn claim_in(
    dir: &Path,
    given: Option<u32>,
    default: u32,
    count: u32,
    state_dir: &Path,
) -> Result<UidClaim, UidError> {
    // Root's alone: a lock file anyone could open and flock would let
    // anyone keep a daemon from starting.
    fsutil::create_dir_all(dir)?;
    fsutil::set_owner_mode(dir, 0, 0, 0o700)?;
    let holder = std::fs::canonicalize(state_dir)
        .unwrap_or_else(|_| state_dir.to_path_buf())
        .display()
        .to_string();
    let record = state_dir.join(RECORD);
    if let Some(base) = given {
        let c = claim_range(dir, base, count, &holder, false, false)?;
        // Recorded as a chosen range is, unless the state dir records one
        // already (whose VMs may still run): once this daemon is gone
        // with its VMs still running, another's search passes over it.
        if !record.exists() {
            fsutil::write_atomic(&record, format!("{base}\n"))?;
        }
        return Ok(c);
    }
    match std::fs::read_to_string(&record) {
        Ok(text) => {
            let base = text
                .trim()
                .parse::<u32>()
                .map_err(|_| UidError::BadRecord {
                    path: record.clone(),
                    text: text.chars().take(64).collect(),
                })?;
            return claim_range(dir, base, count, &holder, true, false).map_err(|e| match e {
                UidError::Taken { holder, .. } => UidError::RecordTaken {
                    base,
                    record: record.clone(),
                    holder,
                },
                e => e,
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // A state dir an older banger used (it has a database but never
            // recorded a range): its VMs, if any run, are the default's.
            if state_dir.join("banger.db").exists() {
                let c = claim_range(dir, default, count, &holder, true, false)?;
                fsutil::write_atomic(&record, format!("{default}\n"))?;
                return Ok(c);
            }
        }
        Err(source) => {
            return Err(UidError::Fs(fsutil::FsError {
                op: "read",
                path: record,
                source,
            }))
        }
    }
    // Ranges of whole blocks, from the default up.
    let span = u64::from(count.max(2)).div_ceil(UID_BLOCK) * UID_BLOCK;
    let mut base = u64::from(default);
    while base + span < TOP {
        let b = u32::try_from(base).map_err(|_| UidError::NoneFree {
            count,
            from: default,
        })?;
        match claim_range(dir, b, count, &holder, true, true) {
            Ok(c) => {
                fsutil::write_atomic(&record, format!("{b}\n"))?;
                return Ok(c);
            }
            Err(UidError::Taken { .. }) => base += span,
            Err(e) => return Err(e),
        }
    }
    Err(UidError::NoneFree {
        count,
        from: default,
    })
}

/// Claims `base + 1 ..= base + count - 1` (slot 0 is never a VM's): every
/// block the range touches, or none. With `skip_kept`, a block whose lock
/// file names another state dir that still records a range over it counts
/// as taken though no daemon holds it (its VMs may still run).
fn claim_range(
    dir: &Path,
    base: u32,
    count: u32,
    holder: &str,
    chosen: bool,
    skip_kept: bool,
) -> Result<UidClaim, UidError> {
    let mut tries = 0;
    loop {
        match try_claim_range(dir, base, count, holder, chosen, skip_kept) {
            Err(UidError::Raced(_)) if tries + 1 < RACE_TRIES => tries += 1,
            r => return r,
        }
    }
}

fn try_claim_range(
    dir: &Path,
    base: u32,
    count: u32,
    holder: &str,
    chosen: bool,
    skip_kept: bool,
) -> Result<UidClaim, UidError> {
    let first = u64::from(base) + 1;
    let last = u64::from(base) + u64::from(count.max(2)) - 1;
    let mut held = UidClaim {
        base,
        chosen,
        locks: Vec::new(),
    };
    let taken = |who: &str, lock: PathBuf| UidError::Taken {
        base,
        first,
        last,
        holder: banger_core::text::escape_control(who, false),
        lock,
    };
    for block in first / UID_BLOCK..=last / UID_BLOCK {
        let path = dir.join(format!("{}.lock", block * UID_BLOCK));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .open(&path)
            .with_path("open", &path)?;
        let mut lock = match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
        {
            Ok(l) => l,
            Err((f, _)) => {
                // (The blocks claimed so far are let go with `held`.)
                return Err(taken(&read_holder(&f), path));
            }
        };
        // The file may have been unlinked (by a test's cleanup, say)
        // between our open and our lock: the lock counts only on the file
        // still there.
        let same = std::fs::metadata(&path)
            .ok()
            .zip(lock.metadata().ok())
            .is_some_and(|(p, f)| p.ino() == f.ino() && p.dev() == f.dev());
        if !same {
            return Err(UidError::Raced(path));
        }
        let was = read_holder(&lock);
        if skip_kept && !was.is_empty() && was != holder && keeps(Path::new(&was), block) {
            return Err(taken(&was, path));
        }
        // Who holds it, for another daemon's refusal.
        let named = lock
            .set_len(0)
            .and_then(|()| lock.rewind())
            .and_then(|()| lock.write_all(holder.as_bytes()));
        named.with_path("write", &path)?;
        held.locks.push((path, lock));
    }
    Ok(held)
}

/// The state dir a lock file names (at most 4 KiB of it).
fn read_holder(mut f: &std::fs::File) -> String {
    let mut who = String::new();
    let _ = f.rewind();
    let _ = (&mut f).take(4096).read_to_string(&mut who);
    who
}

/// Whether `state_dir` still records a range that touches `block`.
fn keeps(state_dir: &Path, block: u64) -> bool {
    let Some(base) = std::fs::read_to_string(state_dir.join(RECORD))
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok())
    else {
        return false;
    };
    // The record keeps the base only; a range runs up from it, and this
    // state dir's name is in the block's file only if its daemon claimed it.
    (base + 1) / UID_BLOCK <= block
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: u32 = 100 * 16_384;

    /// The claims dir and two state dirs (made) under `d`.
    fn dirs(d: &tempfile::TempDir, a: &str, b: &str) -> (PathBuf, PathBuf, PathBuf) {
        let (a, b) = (d.path().join(a), d.path().join(b));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        (d.path().join("c"), a, b)
    }

    #[test]
    fn a_given_range_is_one_daemons_and_the_refusal_names_the_holder() {
        let d = tempfile::tempdir().unwrap();
        let (claims, a, b) = dirs(&d, "a", "b");
        let first = claim_in(&claims, Some(BASE), BASE, 16_384, &a).unwrap();
        assert!(!first.chosen);
        let e = claim_in(&claims, Some(BASE + 100), BASE, 16_384, &b)
            .unwrap_err()
            .to_string();
        assert!(e.contains("another bangerd's"), "{e}");
        assert!(
            e.contains(&a.canonicalize().unwrap().display().to_string()),
            "{e}"
        );
        let next = claim_in(&claims, Some(BASE + 16_384), BASE, 16_384, &b)
            .expect("the next block is free");
        drop(first);
        // A given base is recorded as a chosen one is: with its daemon
        // gone (its VMs may run on), another's search passes over it.
        assert_eq!(
            std::fs::read_to_string(a.join(RECORD)).unwrap().trim(),
            BASE.to_string()
        );
        let c = d.path().join("c2");
        std::fs::create_dir_all(&c).unwrap();
        let other = claim_in(&claims, None, BASE, 16_384, &c).unwrap();
        assert_eq!(other.base, BASE + 2 * 16_384, "{other:?}");
        drop(other);
        // Given, it is free again once the first daemon is gone; a record
        // already there is kept (its VMs may still run).
        claim_in(&claims, Some(BASE + 100), BASE, 16_000, &b)
            .expect("free again once the first daemon is gone");
        drop(next);
        assert_eq!(
            std::fs::read_to_string(b.join(RECORD)).unwrap().trim(),
            (BASE + 16_384).to_string()
        );
    }

    #[test]
    fn without_a_base_a_free_range_is_chosen_and_kept_for_the_state_dir() {
        let d = tempfile::tempdir().unwrap();
        let (claims, inst, svc) = dirs(&d, "i", "s");
        // The installed service holds the default range.
        let service = claim_in(&claims, None, BASE, 16_384, &svc).unwrap();
        assert_eq!((service.base, service.chosen), (BASE, true));
        assert_eq!(
            std::fs::read_to_string(svc.join(RECORD)).unwrap().trim(),
            BASE.to_string()
        );
        // A second daemon with default flags takes the next free one...
        let second = claim_in(&claims, None, BASE, 16_384, &inst).unwrap();
        assert_eq!(second.base, BASE + 16_384);
        drop(second);
        // ...and keeps it across restarts, even once the default is free.
        drop(service);
        let again = claim_in(&claims, None, BASE, 16_384, &inst).unwrap();
        assert_eq!(again.base, BASE + 16_384, "the state dir's range is kept");
        // Its kept range taken by a daemon that named it: refused, naming
        // the file to remove.
        drop(again);
        let squatter = d.path().join("q");
        std::fs::create_dir_all(&squatter).unwrap();
        let held = claim_in(&claims, Some(BASE + 16_384), BASE, 16_384, &squatter).unwrap();
        let e = claim_in(&claims, None, BASE, 16_384, &inst)
            .unwrap_err()
            .to_string();
        assert!(e.contains(RECORD) && e.contains("remove"), "{e}");
        drop(held);
        // A record that is not a number is named, not overwritten.
        std::fs::write(inst.join(RECORD), "junk\n").unwrap();
        let e = claim_in(&claims, None, BASE, 16_384, &inst)
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"junk") && e.contains("not a uid base"), "{e}");
        assert_eq!(
            std::fs::read_to_string(inst.join(RECORD)).unwrap(),
            "junk\n"
        );
    }

    #[test]
    fn a_range_over_several_blocks_is_claimed_whole_or_not_at_all() {
        let d = tempfile::tempdir().unwrap();
        let (claims, a, b) = dirs(&d, "a", "b");
        // `a` holds the second block of what `b` would want first.
        let _a = claim_in(&claims, Some(BASE + 16_384), BASE, 100, &a).unwrap();
        let got = claim_in(&claims, None, BASE, 30_000, &b).unwrap();
        assert_eq!(
            got.base,
            BASE + 2 * 16_384,
            "two whole blocks past the held one"
        );
        assert_eq!(got.locks.len(), 2);
        // The first block, tried and let go, is free.
        let _c = claim_in(&claims, Some(BASE), BASE, 100, &d.path().join("c")).unwrap();
    }

    #[test]
    fn a_range_stays_its_state_dirs_after_its_daemon_exits_until_the_dir_lets_it_go() {
        let d = tempfile::tempdir().unwrap();
        let (claims, a, b) = dirs(&d, "a", "b");
        drop(claim_in(&claims, None, BASE, 16_384, &a).unwrap());
        // `a`'s daemon is gone, its VMs may not be: `b` goes past.
        let got = claim_in(&claims, None, BASE, 16_384, &b).unwrap();
        assert_eq!(got.base, BASE + 16_384);
        drop(got);
        std::fs::remove_file(b.join(RECORD)).unwrap();
        // Once `a` no longer records it (removed), the range is free.
        std::fs::remove_dir_all(&a).unwrap();
        let got = claim_in(&claims, None, BASE, 16_384, &b).unwrap();
        assert_eq!(got.base, BASE);
    }

    #[test]
    fn a_state_dir_an_older_banger_used_keeps_the_default_range() {
        let d = tempfile::tempdir().unwrap();
        let (claims, old, new) = dirs(&d, "o", "n");
        // A newer daemon took the default range first...
        let n = claim_in(&claims, None, BASE, 16_384, &new).unwrap();
        // ...the old dir's VMs run as the default's uids: refused, named.
        std::fs::write(old.join("banger.db"), b"").unwrap();
        let e = claim_in(&claims, None, BASE, 16_384, &old)
            .unwrap_err()
            .to_string();
        assert!(e.contains("another bangerd's"), "{e}");
        assert!(!old.join(RECORD).exists());
        drop(n);
        let got = claim_in(&claims, None, BASE, 16_384, &old).unwrap();
        assert_eq!(got.base, BASE);
        assert_eq!(
            std::fs::read_to_string(old.join(RECORD)).unwrap().trim(),
            BASE.to_string()
        );
    }
}
