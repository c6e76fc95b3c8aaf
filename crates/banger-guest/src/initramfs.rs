//! The image's initramfs: banger's `/init`, the static busybox, and the
//! kernel modules the guest needs before its root is mounted (resolved
//! with their dependencies from the kernel's `modules.dep`, read inside
//! the image tree).

use std::collections::BTreeSet;
use std::path::Path;

use banger_host::fsutil::{self, WrapIo};

use crate::cpio::Archive;
use crate::image::{ImageError, INIT};
use crate::tree;

/// The modules the initramfs loads, with their dependencies resolved from
/// the kernel's modules.dep: virtio over PCI (QEMU's `pc`) and over MMIO
/// (Firecracker), block, net, vsock (the agent's channel) and overlayfs
/// (the `overlay` root-disk strategy).
pub(crate) const INITRAMFS_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "vmw_vsock_virtio_transport",
    "overlay",
];

/// Modules the initramfs loads when the kernel has them: virtio-fs
/// (`--mount`); a kernel without it boots, and a `--mount` on it fails at
/// its mount, naming it.
pub(crate) const OPTIONAL_MODULES: &[&str] = &["virtiofs", VPORT_MODULE];

/// The virtio-serial driver: the agent's channel on QEMU, through the
/// multiplexer (`banger_agent::mux`), which a snapshot keeps.
const VPORT_MODULE: &str = "virtio_console";

/// A file in the initramfs saying its kernel can serve the agent on a
/// virtio-serial port (the module is in it, or built in). The daemon
/// reads an image's initramfs for it ([`supports_vport`]): an image
/// without it (built by an older banger, or a kernel without the
/// driver) keeps the vsock device.
pub const VPORT_MARKER: &str = "banger-vport";

/// Whether an initramfs (an uncompressed newc archive, as [`initramfs`]
/// writes) carries [`VPORT_MARKER`].
pub fn supports_vport(initrd: &[u8]) -> bool {
    // A newc entry's name follows its header, NUL-terminated.
    let mut name = VPORT_MARKER.as_bytes().to_vec();
    name.push(0);
    initrd.windows(name.len()).any(|w| w == name.as_slice())
}

/// Resolves `wanted` against modules.dep text into a load order where every
/// module comes after its dependencies. Paths are relative to the module dir.
pub fn module_load_order(modules_dep: &str, wanted: &[&str]) -> Result<Vec<String>, String> {
    let deps: std::collections::HashMap<&str, Vec<&str>> = modules_dep
        .lines()
        .filter_map(|l| {
            let (m, d) = l.split_once(':')?;
            Some((m.trim(), d.split_whitespace().collect()))
        })
        .collect();
    let by_name = |n: &str| {
        deps.keys()
            .find(|p| {
                let base = p.rsplit('/').next().unwrap_or(p);
                let stem = base.split(".ko").next().unwrap_or(base);
                stem == n || stem.replace('-', "_") == n
            })
            .copied()
    };
    fn visit<'a>(
        m: &'a str,
        deps: &std::collections::HashMap<&'a str, Vec<&'a str>>,
        seen: &mut BTreeSet<&'a str>,
        out: &mut Vec<String>,
    ) {
        if !seen.insert(m) {
            return;
        }
        for d in deps.get(m).map(Vec::as_slice).unwrap_or(&[]) {
            visit(d, deps, seen, out);
        }
        out.push(m.to_string());
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for w in wanted {
        let m = by_name(w).ok_or_else(|| format!("module {w} is not in modules.dep"))?;
        visit(m, &deps, &mut seen, &mut out);
    }
    Ok(out)
}

/// Most of a module list read from an image's tree.
const LIST_MAX: u64 = 16 << 20;

/// A text file of the tree at `root` (an image's: its links resolved
/// inside it), which must be a regular file, read up to [`LIST_MAX`].
fn read_tree_text(root: &Path, guest: &Path) -> Result<String, fsutil::FsError> {
    use std::io::Read;
    let inside = root.join(guest.strip_prefix("/").unwrap_or(guest));
    let path = tree::resolve(root, guest).with_path("resolve", &inside)?;
    let f = std::fs::File::open(&path).with_path("open", &path)?;
    let m = f.metadata().with_path("stat", &path)?;
    if !m.is_file() {
        return Err(std::io::Error::other("not a regular file")).with_path("read", &path);
    }
    let mut text = String::new();
    f.take(LIST_MAX)
        .read_to_string(&mut text)
        .with_path("read", &path)?;
    Ok(text)
}

pub(crate) fn initramfs(
    name: &str,
    root: &Path,
    kver: &str,
    busybox: &Path,
) -> Result<Vec<u8>, ImageError> {
    let fs = |source| ImageError::Fs {
        name: name.to_string(),
        source,
    };
    let moddir = tree::resolve(root, &Path::new("/lib/modules").join(kver))
        .with_path("resolve", &root.join("lib/modules"))
        .map_err(fs)?;
    let dep = read_tree_text(
        root,
        &Path::new("/lib/modules").join(kver).join("modules.dep"),
    )
    .map_err(fs)?;
    let wanted: Vec<&str> = INITRAMFS_MODULES
        .iter()
        .copied()
        .chain(
            OPTIONAL_MODULES
                .iter()
                .copied()
                .filter(|m| module_load_order(&dep, &[m]).is_ok()),
        )
        .collect();
    let order = module_load_order(&dep, &wanted).map_err(|what| ImageError::Layout {
        name: name.to_string(),
        what,
    })?;
    let bb = std::fs::read(busybox)
        .with_path("read", busybox)
        .map_err(fs)?;
    if !bb.starts_with(b"\x7fELF") {
        return Err(ImageError::Layout {
            name: name.to_string(),
            what: format!(
                "{} is not a static busybox: apt-get install busybox-static",
                busybox.display()
            ),
        });
    }
    let mut a = Archive::new();
    for d in ["bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"] {
        a.dir(d);
    }
    a.file("init", 0o755, INIT.as_bytes());
    a.file("bin/busybox", 0o755, &bb);
    let mut load = String::new();
    for rel in &order {
        let base = rel.rsplit('/').next().unwrap_or(rel);
        if !base.ends_with(".ko") {
            return Err(ImageError::Layout {
                name: name.to_string(),
                what: format!("module {rel} is compressed; only plain .ko modules are supported"),
            });
        }
        // modules.dep is the tree's: its paths stay inside the tree.
        let path = tree::resolve(root, &Path::new("/lib/modules").join(kver).join(rel))
            .with_path("resolve", &moddir.join(rel))
            .map_err(fs)?;
        let data = std::fs::read(&path).with_path("read", &path).map_err(fs)?;
        a.file(&format!("lib/modules/{base}"), 0o644, &data);
        load.push_str(base);
        load.push('\n');
    }
    a.file("modules.load", 0o644, load.as_bytes());
    let builtin = read_tree_text(
        root,
        &Path::new("/lib/modules").join(kver).join("modules.builtin"),
    )
    .unwrap_or_default();
    let vport = load.lines().any(|m| m == format!("{VPORT_MODULE}.ko"))
        || builtin
            .lines()
            .any(|l| l.ends_with(&format!("/{VPORT_MODULE}.ko")));
    if vport {
        a.file(VPORT_MARKER, 0o644, b"");
    }
    Ok(a.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_module_dependencies() {
        let dep = "kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n\
                   kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n\
                   kernel/drivers/virtio/virtio_ring.ko:\n\
                   kernel/drivers/virtio/virtio_pci_legacy_dev.ko:\n\
                   kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n";
        let order = module_load_order(dep, &["virtio_pci", "virtio_blk"]).unwrap();
        let pos = |m: &str| order.iter().position(|o| o.ends_with(m)).unwrap();
        assert!(pos("/virtio_ring.ko") < pos("/virtio.ko"));
        assert!(pos("/virtio.ko") < pos("/virtio_pci.ko"));
        assert!(pos("/virtio_pci_legacy_dev.ko") < pos("/virtio_pci.ko"));
        assert_eq!(order.len(), 5, "each module once: {order:?}");
        assert!(module_load_order(dep, &["nope"]).is_err());
    }

    #[test]
    fn the_vport_marker_is_found_by_its_entry_name() {
        let mut a = Archive::new();
        a.file("modules.load", 0o644, b"virtio_console.ko\n");
        a.file(
            "init",
            0o755,
            b"banger-vport is named here, not as an entry",
        );
        assert!(!supports_vport(&a.finish()));
        let mut a = Archive::new();
        a.file(VPORT_MARKER, 0o644, b"");
        assert!(supports_vport(&a.finish()));
    }
}
