//! The dm-snapshot sequence on real loop devices, against a recording
//! fake of device-mapper that checks what the kernel would (this kernel
//! has none), and on the real `dmsetup` where `/dev/mapper/control`
//! exists.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileTypeExt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::*;

/// device-mapper as the kernel checks a `snapshot` table: a valid, unused
/// name; exactly `0 LEN snapshot ORIGIN COW P|N CHUNK`; origin and COW
/// distinct block devices; LEN the origin's size; CHUNK a power of two of
/// at least 8 sectors. It opens both devices as the kernel does and keeps
/// them open while the device exists, so the loops' autoclear behaves as
/// with a real snapshot. Every call is recorded.
#[derive(Default)]
struct FakeDm {
    devices: Mutex<BTreeMap<String, (String, Vec<File>)>>,
    log: Mutex<Vec<String>>,
}

fn bad(msg: String) -> DaemonError {
    DaemonError::Invalid(format!("fake dm: {msg}"))
}

impl DeviceMapper for FakeDm {
    fn create(&self, name: &str, table: &str) -> Result<()> {
        self.log
            .lock()
            .unwrap()
            .push(format!("create {name} {table}"));
        if name.is_empty() || name.len() > 127 || name.contains('/') {
            return Err(bad(format!("invalid device name {name:?}")));
        }
        let mut devs = self.devices.lock().unwrap();
        if devs.contains_key(name) {
            return Err(bad(format!("device {name} already exists")));
        }
        let w: Vec<&str> = table.split(' ').collect();
        let [start, len, target, origin, cow, persist, chunk] = w[..] else {
            return Err(bad(format!("snapshot table needs 7 fields: {table:?}")));
        };
        let num = |s: &str| {
            s.parse::<u64>()
                .map_err(|_| bad(format!("not a number: {s:?}")))
        };
        if num(start)? != 0 || target != "snapshot" {
            return Err(bad(format!("not a whole-device snapshot: {table:?}")));
        }
        if origin == cow {
            return Err(bad("origin and COW are one device".into()));
        }
        for dev in [origin, cow] {
            let ft = std::fs::metadata(dev).map_err(|e| bad(format!("{dev}: {e}")))?;
            if !ft.file_type().is_block_device() {
                return Err(bad(format!("{dev} is not a block device")));
            }
        }
        if num(len)? != sectors(origin)? {
            return Err(bad(format!("length {len} is not origin {origin}'s size")));
        }
        if !matches!(persist, "P" | "N") {
            return Err(bad(format!("persistence {persist:?} is not P or N")));
        }
        let c = num(chunk)?;
        if c < 8 || !c.is_power_of_two() {
            return Err(bad(format!("chunk size {c} is not a power of two >= 8")));
        }
        let held = vec![
            File::open(origin).map_err(|e| bad(format!("open {origin}: {e}")))?,
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(cow)
                .map_err(|e| bad(format!("open {cow}: {e}")))?,
        ];
        devs.insert(name.to_string(), (table.to_string(), held));
        Ok(())
    }

    fn remove(&self, name: &str) -> Result<()> {
        self.log.lock().unwrap().push(format!("remove {name}"));
        match self.devices.lock().unwrap().remove(name) {
            Some(_) => Ok(()),
            None => Err(bad(format!("remove {name}: No such device or address"))),
        }
    }

    fn exists(&self, name: &str) -> Result<bool> {
        Ok(self.devices.lock().unwrap().contains_key(name))
    }
}

fn sysfs(dev: &str, file: &str) -> String {
    let base = dev.rsplit('/').next().unwrap();
    std::fs::read_to_string(format!("/sys/class/block/{base}/{file}"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Waits (bounded) until no loop device is backed by any of `files`: the
/// kernel frees an autoclear loop as its last user closes it.
fn wait_detached(files: &[&Path]) {
    let limit = Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<LoopDev> = files.iter().flat_map(|f| loops_of(f).unwrap()).collect();
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < limit, "loops left: {left:?}");
        std::thread::yield_now();
    }
}

fn sum(p: &Path) -> u64 {
    // FNV-1a: enough to see a change.
    std::fs::read(p)
        .unwrap()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
        })
}

struct Scratch {
    _dir: tempfile::TempDir,
    image: PathBuf,
    cows: Vec<PathBuf>,
}

fn scratch(vms: usize) -> Scratch {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let image = dir.path().join("rootfs.ext4");
    let data: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(&image, data).unwrap();
    let cows = (0..vms)
        .map(|i| {
            let p = dir.path().join(format!("root-{i}.cow"));
            let f = File::create(&p).unwrap();
            f.set_len(cow_bytes(8 << 20)).unwrap();
            p
        })
        .collect();
    Scratch {
        _dir: dir,
        image,
        cows,
    }
}

#[test]
fn two_snapshots_share_one_read_only_base_loop_and_leave_nothing() {
    let s = scratch(2);
    let before = sum(&s.image);
    let dm = FakeDm::default();
    let (mut a, mut b) = (VmHandles::default(), VmHandles::default());
    activate(&dm, &s.image, &s.cows[0], "banger-aaaaaaaaaaaa", &mut a).unwrap();
    activate(&dm, &s.image, &s.cows[1], "banger-bbbbbbbbbbbb", &mut b).unwrap();

    let base = a.base_loop.clone().unwrap();
    assert_eq!(
        b.base_loop.as_deref(),
        Some(base.as_str()),
        "one base loop per image"
    );
    assert_ne!(a.cow_loop, b.cow_loop);
    assert_eq!(a.dm_dev.as_deref(), Some("/dev/mapper/banger-aaaaaaaaaaaa"));
    assert_eq!(sysfs(&base, "ro"), "1", "the base loop is read-only");
    assert_eq!(sysfs(&base, "loop/backing_file"), s.image.to_str().unwrap());
    let cow = a.cow_loop.clone().unwrap();
    assert_eq!(sysfs(&cow, "ro"), "0");
    assert_eq!(
        sysfs(&cow, "loop/backing_file"),
        s.cows[0].to_str().unwrap()
    );
    // Detached lazily: they go with the snapshot, whatever happens to
    // the daemon.
    for dev in [&base, &cow] {
        assert_eq!(sysfs(dev, "loop/autoclear"), "1", "{dev} autoclear");
    }
    let log = dm.log.lock().unwrap().clone();
    assert_eq!(
        log,
        vec![
            format!("create banger-aaaaaaaaaaaa 0 16384 snapshot {base} {cow} P 8"),
            format!(
                "create banger-bbbbbbbbbbbb 0 16384 snapshot {base} {} P 8",
                b.cow_loop.clone().unwrap()
            ),
        ]
    );

    // A name in use is refused, and nothing of the attempt stays.
    let mut c = VmHandles::default();
    let e = activate(&dm, &s.image, &s.cows[1], "banger-aaaaaaaaaaaa", &mut c).unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    // Its teardown detaches the loop the attempt made; b's, held by b's
    // snapshot, is only marked autoclear again.
    deactivate(&dm, &s.image, &s.cows[1], "banger-cccccccccccc").unwrap();
    let b_cow = b.cow_loop.clone().unwrap();
    assert_eq!(
        sysfs(&b_cow, "loop/backing_file"),
        s.cows[1].to_str().unwrap()
    );
    assert_eq!(
        loops_of(&s.cows[1]).unwrap().len(),
        1,
        "the attempt's loop is gone"
    );
    deactivate(&dm, &s.image, &s.cows[0], "banger-aaaaaaaaaaaa").unwrap();
    assert_eq!(
        sysfs(&base, "loop/backing_file"),
        s.image.to_str().unwrap(),
        "b still holds the base"
    );
    deactivate(&dm, &s.image, &s.cows[1], "banger-bbbbbbbbbbbb").unwrap();
    wait_detached(&[&s.image, &s.cows[0], &s.cows[1]]);
    assert!(!dm.exists("banger-aaaaaaaaaaaa").unwrap());
    assert!(!dm.exists("banger-bbbbbbbbbbbb").unwrap());
    assert_eq!(sum(&s.image), before, "the image never changes");
}

#[test]
fn teardown_finds_everything_from_the_kernel_without_handles_and_is_idempotent() {
    let s = scratch(1);
    let dm = FakeDm::default();
    // A daemon that died after attaching both loops, before the snapshot:
    // nothing recorded but the loops in the kernel.
    let left = [
        attach(&s.image, true).unwrap(),
        attach(&s.cows[0], false).unwrap(),
    ];
    assert!(left.iter().all(|l| l.starts_with("/dev/loop")));
    deactivate(&dm, &s.image, &s.cows[0], "banger-dddddddddddd").unwrap();
    wait_detached(&[&s.image, &s.cows[0]]);
    // A whole activation, its handles lost.
    activate(
        &dm,
        &s.image,
        &s.cows[0],
        "banger-dddddddddddd",
        &mut VmHandles::default(),
    )
    .unwrap();
    deactivate(&dm, &s.image, &s.cows[0], "banger-dddddddddddd").unwrap();
    wait_detached(&[&s.image, &s.cows[0]]);
    deactivate(&dm, &s.image, &s.cows[0], "banger-dddddddddddd").unwrap();
    assert_eq!(
        dm.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with("remove"))
            .count(),
        1,
        "only an existing device is removed"
    );
}

#[test]
fn a_table_the_kernel_would_refuse_is_refused_by_the_fake() {
    let s = scratch(1);
    let dm = FakeDm::default();
    let base = attach(&s.image, true).unwrap();
    let cow = attach(&s.cows[0], false).unwrap();
    for table in [
        format!("0 16383 snapshot {base} {cow} P 8"),
        format!("0 16384 snapshot {base} {base} P 8"),
        format!("0 16384 snapshot {base} {cow} X 8"),
        format!("0 16384 snapshot {base} {cow} P 12"),
        format!("0 16384 snapshot {base} {}", s.cows[0].display()),
    ] {
        assert!(dm.create("banger-eeeeeeeeeeee", &table).is_err(), "{table}");
    }
    detach(&cow).unwrap();
    detach(&base).unwrap();
    wait_detached(&[&s.image, &s.cows[0]]);
}

/// The same sequence on the kernel's device-mapper, where it exists.
#[test]
fn dm_snapshot_on_the_real_device_mapper() {
    if !available() {
        let why = "this kernel has no device-mapper (/dev/mapper/control is missing): \
                   the dm-snapshot strategy was checked against the recording fake only";
        test_infra::not_run_here("dm_snapshot_on_the_real_device_mapper", why);
        return;
    }
    let s = scratch(1);
    let before = sum(&s.image);
    let mut h = VmHandles::default();
    let name = format!("banger-t{:011x}", std::process::id());
    activate(&Dmsetup, &s.image, &s.cows[0], &name, &mut h).unwrap();
    let dev = h.dm_dev.clone().unwrap();
    std::fs::write(&dev, vec![0xffu8; 4096]).unwrap();
    deactivate(&Dmsetup, &s.image, &s.cows[0], &name).unwrap();
    wait_detached(&[&s.image, &s.cows[0]]);
    assert!(!Dmsetup.exists(&name).unwrap());
    assert_eq!(sum(&s.image), before, "the write went to the COW");
}
