//! A root tarball or an OCI layer on `image import`: unpacked as the import
//! unpacks it, into a scratch root; nothing may appear outside that root
//! (paths with `..`, absolute paths, symlinks then files through them, hard
//! links out), whatever the archive says.
#![no_main]

use libfuzzer_sys::fuzz_target;

fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            out.push(p.clone());
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                walk(&p, out);
            }
        }
    }
}

/// A directory outside every root, which the seeds' links point at (an
/// escape would have the fuzzer write there): it must stay empty.
const SENTINEL: &str = "/dev/shm/banger-fuzz-sentinel";

fuzz_target!(|data: &[u8]| {
    std::fs::create_dir_all(SENTINEL).unwrap();
    // In memory (tmpfs) when it can: each run unpacks to a fresh dir.
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        "/dev/shm"
    } else {
        "/tmp"
    };
    let scratch = tempfile::tempdir_in(base).unwrap();
    let root = scratch.path().join("root");
    std::fs::create_dir(&root).unwrap();
    for layer in [false, true] {
        let _ = banger_guest::import::unpack(std::io::Cursor::new(data), &root, layer);
    }
    let mut all = Vec::new();
    walk(scratch.path(), &mut all);
    for p in &all {
        assert!(p.starts_with(&root), "{} outside the root", p.display());
    }
    // Symlinks may point anywhere (they are the tree's); what matters is
    // that nothing was written through one: the scratch dir holds the root
    // alone.
    let top: Vec<_> = std::fs::read_dir(scratch.path())
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(top.len(), 1);
    let escaped: Vec<_> = std::fs::read_dir(SENTINEL).unwrap().flatten().collect();
    assert!(escaped.is_empty(), "written outside the root: {escaped:?}");
});
