//! An OCI image layout on `image import` (a hostile archive's index.json
//! and manifest): the input is the index, a NUL, then the manifest, laid
//! out as `index.json` and the blob `sha256:aaaa…`; a small layer tar is
//! the blob `sha256:bbbb…`. Unpacked as the import unpacks it: no panic,
//! and nothing outside the root it unpacks into.
#![no_main]

use libfuzzer_sys::fuzz_target;

const MANIFEST: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const LAYER: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

fn layer_tar() -> Vec<u8> {
    let mut t = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(3);
    h.set_mode(0o644);
    h.set_cksum();
    t.append_data(&mut h, "etc/hostname", &b"vm\n"[..]).unwrap();
    t.into_inner().unwrap()
}

fuzz_target!(|data: &[u8]| {
    let (index, manifest) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b""[..]),
    };
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        "/dev/shm"
    } else {
        "/tmp"
    };
    let scratch = tempfile::tempdir_in(base).unwrap();
    let layout = scratch.path().join("layout");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    std::fs::write(layout.join("index.json"), index).unwrap();
    std::fs::write(blobs.join(MANIFEST), manifest).unwrap();
    std::fs::write(blobs.join(LAYER), layer_tar()).unwrap();
    let root = scratch.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let _ = banger_guest::oci::unpack_layout(&layout, &root, &mut |_| {});
    // The layout and the root, nothing else.
    let mut top: Vec<_> = std::fs::read_dir(scratch.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    top.sort();
    assert_eq!(top, ["layout", "root"]);
});
