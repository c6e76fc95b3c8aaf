use std::io::Write;
use std::path::Path;

use super::*;

/// A tar archive of `(path, kind)` entries: `Ok(data)` a file, `Err(target)`
/// a symlink; paths ending in `/` are directories.
fn tar_of(entries: &[(&str, Result<&[u8], &str>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, what) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o755);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1);
        match what {
            _ if path.ends_with('/') => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                b.append_data(&mut h, path, std::io::empty()).unwrap();
            }
            Ok(data) => {
                h.set_size(data.len() as u64);
                b.append_data(&mut h, path, *data).unwrap();
            }
            Err(target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                b.append_link(&mut h, path, target).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

#[test]
fn formats_are_told_apart_by_content() {
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n);
    let mut ext4 = vec![0u8; 2048];
    ext4[1080] = 0x53;
    ext4[1081] = 0xef;
    std::fs::write(p("a.img"), &ext4).unwrap();
    assert_eq!(detect(&p("a.img")).unwrap(), Format::Ext4);
    let t = tar_of(&[("etc/", Ok(b""))]);
    std::fs::write(p("a.tar"), &t).unwrap();
    assert_eq!(detect(&p("a.tar")).unwrap(), Format::Tar);
    std::fs::write(p("a.tgz"), gzip(&t)).unwrap();
    assert_eq!(detect(&p("a.tgz")).unwrap(), Format::Tar);
    std::fs::write(p("a.xz"), b"\xfd7zXZ\0rest").unwrap();
    let e = detect(&p("a.xz")).unwrap_err().to_string();
    assert!(
        e.contains("compressed with xz") && e.contains("xz -d"),
        "{e}"
    );
    std::fs::write(p("junk"), b"hello").unwrap();
    let e = detect(&p("junk")).unwrap_err().to_string();
    assert!(e.contains("junk: not an ext4 image"), "{e}");
    assert!(detect(&p("missing")).is_err());

    std::fs::create_dir_all(p("root/etc")).unwrap();
    assert_eq!(detect(&p("root")).unwrap(), Format::Dir);
    std::fs::create_dir_all(p("oci/blobs")).unwrap();
    std::fs::write(p("oci/index.json"), "{}").unwrap();
    assert_eq!(detect(&p("oci")).unwrap(), Format::OciLayout);
    std::fs::create_dir_all(p("docker")).unwrap();
    std::fs::write(p("docker/manifest.json"), "[]").unwrap();
    assert_eq!(detect(&p("docker")).unwrap(), Format::DockerArchive);
}

#[test]
fn hostile_tars_stay_inside_the_tree() {
    let d = tempfile::tempdir().unwrap();
    let outside = d.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let root = d.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    // A symlink out of the tree, then a file through it.
    let t = tar_of(&[
        ("evil", Err(outside.to_str().unwrap())),
        ("evil/owned", Ok(b"x")),
    ]);
    let e = unpack(&t[..], &root, false).unwrap_err().to_string();
    assert!(e.contains("outside of destination"), "{e}");
    assert!(!outside.join("owned").exists());
    // `..` in a path.
    let mut raw = tar_of(&[("x", Ok(b"x"))]);
    raw[..4].copy_from_slice(b"../x");
    let mut h = tar::Header::from_byte_slice(&raw[..512]).clone();
    h.set_cksum();
    raw[..512].copy_from_slice(h.as_bytes());
    let e = unpack(&raw[..], &root, false).unwrap_err().to_string();
    assert!(e.contains("leads out of the root"), "{e}");
    assert!(!d.path().join("x").exists());
}

#[test]
fn layers_apply_in_order_with_whiteouts() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    let l1 = d.path().join("l1.tar.gz");
    let l2 = d.path().join("l2.tar");
    std::fs::write(
        &l1,
        gzip(&tar_of(&[
            ("etc/", Ok(b"")),
            ("etc/keep", Ok(b"1")),
            ("etc/gone", Ok(b"1")),
            ("opaque/", Ok(b"")),
            ("opaque/old", Ok(b"1")),
            ("was_file", Ok(b"1")),
            ("link", Err("etc")),
        ])),
    )
    .unwrap();
    // The opaque marker after this layer's own file: the file stays.
    std::fs::write(
        &l2,
        tar_of(&[
            ("etc/.wh.gone", Ok(b"")),
            ("opaque/new", Ok(b"2")),
            ("opaque/.wh..wh..opq", Ok(b"")),
            ("was_file/", Ok(b"")),
            ("was_file/inner", Ok(b"2")),
            // A whiteout under a symlink is resolved inside the tree.
            ("link/.wh.keep", Ok(b"")),
        ]),
    )
    .unwrap();
    std::fs::create_dir_all(&root).unwrap();
    for l in [&l1, &l2] {
        for w in oci::whiteouts(l).unwrap() {
            oci::remove_whited_out(&root, &w).unwrap();
        }
        unpack_file(l, &root, true, "layer", &mut |_| {}).unwrap();
    }
    assert!(!root.join("etc/gone").exists());
    assert!(!root.join("etc/.wh.gone").exists(), "markers are not files");
    assert!(
        !root.join("etc/keep").exists(),
        "link/.wh.keep is etc/keep inside the tree"
    );
    assert!(!root.join("opaque/old").exists());
    assert_eq!(std::fs::read(root.join("opaque/new")).unwrap(), b"2");
    assert_eq!(std::fs::read(root.join("was_file/inner")).unwrap(), b"2");
}

#[test]
fn a_tree_needs_a_shell_and_no_sshd() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    let e = check_tree(root).unwrap_err().to_string();
    assert!(e.contains("no shell (/bin/sh)"), "{e}");
    tree::write(root, "/usr/bin/sh", b"#!", 0o755).unwrap();
    std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();
    check_tree(root).expect("no sshd is fine");
    let e = own_kernel("x", root).unwrap_err();
    assert!(e.contains("no kernel"), "{e}");
}

#[test]
fn a_failed_import_leaves_nothing() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    std::fs::create_dir_all(src.join("etc")).unwrap();
    let dir = d.path().join("images/x");
    std::fs::create_dir_all(d.path().join("images")).unwrap();
    let e = import(
        "x",
        &dir,
        &src,
        None,
        Path::new("/bin/busybox"),
        &mut |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("image x: the imported tree has no shell"), "{e}");
    assert!(!dir.exists());
    assert!(!dir.with_extension("building").exists());
}
