//! Writes a few valid inputs per target into `corpus/<target>/`, so that
//! the fuzzers start from what banger really reads (scripts/fuzz.sh runs
//! it first).

use std::path::Path;

fn put(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let d = dir.join(target);
    std::fs::create_dir_all(&d).expect("mkdir corpus");
    std::fs::write(d.join(name), bytes).expect("write seed");
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "corpus".into());
    use banger_core::api::{Envelope, Request, PROTOCOL_VERSION};
    for (n, r) in [
        ("ls", Request::VmList),
        (
            "start",
            Request::VmStart {
                name: "web-1".into(),
            },
        ),
        (
            "import",
            Request::ImageImport {
                name: "alpine".into(),
                source: "/tmp/alpine.tar".into(),
            },
        ),
    ] {
        let env = Envelope {
            version: PROTOCOL_VERSION,
            request: r,
        };
        put(
            &dir,
            "daemon_request",
            n,
            serde_json::to_string(&env).unwrap().as_bytes(),
        );
    }

    use banger_agent::proto;
    let mut b = Vec::new();
    proto::write_request(&mut b, proto::Call::Ping).unwrap();
    proto::write_frame(&mut b, proto::Kind::Stdout, b"hello").unwrap();
    put(&dir, "agent_frames", "ping", &b);

    let elf = [b"\x7fELF\x02\x01\x01".as_slice(), &[0u8; 120]].concat();
    let block = lz4_flex::block::compress(&elf);
    let mut k = vec![0u8; 64];
    k.extend_from_slice(&[0x02, 0x21, 0x4c, 0x18]);
    k.extend_from_slice(&(block.len() as u32).to_le_bytes());
    k.extend_from_slice(&block);
    put(&dir, "kernel_image", "lz4", &k);

    let mut t = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(3);
    h.set_mode(0o644);
    h.set_cksum();
    t.append_data(&mut h.clone(), "etc/hostname", &b"vm\n"[..])
        .unwrap();
    let mut l = tar::Header::new_gnu();
    l.set_entry_type(tar::EntryType::Symlink);
    l.set_size(0);
    t.append_link(&mut l, "etc/link", "/etc").unwrap();
    let mut d = tar::Header::new_gnu();
    d.set_entry_type(tar::EntryType::Directory);
    d.set_mode(0o755);
    d.set_size(0);
    d.set_cksum();
    t.append_data(&mut d, "usr/", std::io::empty()).unwrap();
    put(&dir, "tar_import", "tree", &t.into_inner().unwrap());
    // Links out of the tree, then writes through them (the fuzz target's
    // sentinel dir is where they point).
    let mut t = tar::Builder::new(Vec::new());
    for (link, target) in [
        ("etc/out", "/dev/shm/banger-fuzz-sentinel"),
        ("up", "../../../../dev/shm/banger-fuzz-sentinel"),
    ] {
        let mut l = tar::Header::new_gnu();
        l.set_entry_type(tar::EntryType::Symlink);
        l.set_size(0);
        t.append_link(&mut l, link, target).unwrap();
    }
    for name in ["etc/out/x", "up/y"] {
        let mut h = tar::Header::new_gnu();
        h.set_size(2);
        h.set_mode(0o644);
        h.set_cksum();
        t.append_data(&mut h, name, &b"x\n"[..]).unwrap();
    }
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Link);
    h.set_size(0);
    t.append_link(&mut h, "hard", "/dev/shm/banger-fuzz-sentinel/z")
        .unwrap();
    put(&dir, "tar_import", "escapes", &t.into_inner().unwrap());

    // An OCI layout's index, then (after a NUL) its manifest, naming the
    // fuzz target's fixed blobs.
    let a = "a".repeat(64);
    let b = "b".repeat(64);
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{a}","size":300,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#
    );
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{a}","size":2}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:{b}","size":1024}}]}}"#
    );
    put(
        &dir,
        "oci_layout",
        "one-layer",
        format!("{index}\0{manifest}").as_bytes(),
    );

    let q = banger_host::qcow2::overlay_bytes(
        Path::new("/var/lib/banger/images/x/rootfs.ext4"),
        1 << 30,
    )
    .unwrap();
    put(&dir, "qcow2_header", "overlay", &q[..4096]);

    use hickory_proto::op::{Message, MessageType, OpCode, Query};
    use hickory_proto::rr::{Name, RecordType};
    let mut m = Message::query();
    m.metadata.id = 7;
    m.metadata.message_type = MessageType::Query;
    m.metadata.op_code = OpCode::Query;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(
        Name::from_ascii("web.vm.").unwrap(),
        RecordType::A,
    ));
    put(&dir, "dns_query", "a", &m.to_vec().unwrap());

    put(
        &dir,
        "console_text",
        "escapes",
        "boot\x1b[2J\r\nok\u{9b}31m\x07\n".as_bytes(),
    );
}
