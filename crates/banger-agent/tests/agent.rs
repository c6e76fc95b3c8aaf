//! The agent served on a Unix socket (`--unix`), driven through the host's
//! client: everything but the vsock transport, which the end-to-end tests
//! cover on real guests.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use banger_agent::client::{self, Session};
use banger_agent::proto::{read_msg, write_request, Call, ExecSpec, Msg, Target, WinSize};

/// How the tests reach the agent.
#[derive(Debug, Clone, Copy)]
enum Via {
    /// A Unix socket the agent listens on (`--unix`).
    Unix,
    /// The mux over a Unix socket playing the virtio-serial port
    /// (`--serial`), behind `banger-vport`'s hybrid-vsock socket, as a
    /// QEMU VM's agent is reached.
    Mux,
}

struct Agent {
    child: Child,
    helper: Option<Child>,
    via: Via,
    sock: PathBuf,
    dir: tempfile::TempDir,
}

/// Starts a binary that says `line` on stdout once it serves.
fn spawn_until(bin: &str, args: &[&std::ffi::OsStr], line: &str) -> Child {
    let mut child = Command::new(bin)
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut got = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut got)
        .unwrap();
    assert_eq!(got, format!("{line}\n"), "{bin}");
    child
}

impl Agent {
    fn start(via: Via) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        match via {
            Via::Unix => {
                let sock = dir.path().join("agent.sock");
                let child = spawn_until(
                    env!("CARGO_BIN_EXE_banger-agent"),
                    &["--unix".as_ref(), sock.as_os_str()],
                    "listening",
                );
                Agent {
                    child,
                    helper: None,
                    via,
                    sock,
                    dir,
                }
            }
            Via::Mux => {
                let sock = dir.path().join("v.sock");
                let hello = UnixListener::bind(dir.path().join("v.sock_1025")).unwrap();
                let helper = start_helper(dir.path());
                let port = dir.path().join("port.sock");
                let child = spawn_until(
                    env!("CARGO_BIN_EXE_banger-agent"),
                    &["--serial".as_ref(), port.as_os_str()],
                    "serving",
                );
                // Owned before anything can fail: dropped, they are killed.
                let a = Agent {
                    child,
                    helper: Some(helper),
                    via,
                    sock,
                    dir,
                };
                // The agent's hello reaches the daemon's hello socket.
                let (mut h, _) = hello.accept().unwrap();
                match read_msg(&mut h).unwrap() {
                    Msg::Hello { version, .. } => assert_eq!(version, banger_agent::proto::VERSION),
                    m => panic!("not a hello: {m:?}"),
                }
                a
            }
        }
    }

    fn conn(&self) -> UnixStream {
        self.dialer()()
    }

    /// A connection maker another thread can own.
    fn dialer(&self) -> impl Fn() -> UnixStream + Send + 'static {
        let (via, sock) = (self.via, self.sock.clone());
        move || match via {
            Via::Unix => UnixStream::connect(&sock).unwrap(),
            Via::Mux => {
                banger_agent::connect(&sock, 1024, std::time::Duration::from_secs(60)).unwrap()
            }
        }
    }

    fn exec(&self, spec: ExecSpec, stdin: Option<Vec<u8>>) -> (Vec<u8>, Vec<u8>, i32) {
        let s = Session::start(self.conn(), Call::Exec(spec)).unwrap();
        let feeder = stdin.map(|data| {
            let c = s.control();
            std::thread::spawn(move || c.feed(&data[..]).unwrap())
        });
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let status = s.wait(&mut out, &mut err).unwrap();
        if let Some(f) = feeder {
            f.join().unwrap();
        }
        (out, err, status.shell_code())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        for c in std::iter::once(&mut self.child).chain(self.helper.as_mut()) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `banger-vport` for a VM whose files are in `dir`.
fn start_helper(dir: &std::path::Path) -> Child {
    let (port, sock) = (dir.join("port.sock"), dir.join("v.sock"));
    spawn_until(
        env!("CARGO_BIN_EXE_banger-vport"),
        &[
            "--port-socket".as_ref(),
            port.as_os_str(),
            "--uds-path".as_ref(),
            sock.as_os_str(),
            "--guest-port".as_ref(),
            "1025".as_ref(),
        ],
        "listening",
    )
}

/// SIGKILLs the process tagged `tag`, then attaches to it by `pid`.
fn kill_and_attach(a: &Agent, tag: &str, pid: u32) -> Session {
    let m = client::call(
        a.conn(),
        Call::Signal {
            target: Target::Tag(tag.into()),
            signal: 9,
        },
    )
    .unwrap();
    assert_eq!(m, Msg::Done);
    Session::start(
        a.conn(),
        Call::Attach {
            target: Target::Pid(pid),
        },
    )
    .unwrap()
}

fn sh(script: &str) -> ExecSpec {
    ExecSpec {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        ..Default::default()
    }
}

fn exit_codes_signals_and_separate_streams(a: &Agent) {
    let (out, err, code) = a.exec(sh("echo out; echo err >&2; exit 7"), None);
    assert_eq!(
        (&out[..], &err[..], code),
        (&b"out\n"[..], &b"err\n"[..], 7)
    );
    let (_, _, code) = a.exec(sh("kill -TERM $$"), None);
    assert_eq!(code, 128 + 15, "a signal is 128 + its number");
    let mut spec = sh("pwd; echo $GREETING; id -u");
    spec.cwd = Some("/tmp".into());
    spec.env = vec![("GREETING".into(), "hi there".into())];
    spec.user = Some("nobody".into());
    let (out, _, code) = a.exec(spec, None);
    assert_eq!(String::from_utf8(out).unwrap(), "/tmp\nhi there\n65534\n");
    assert_eq!(code, 0);
    let e = Session::start(
        a.conn(),
        Call::Exec(ExecSpec {
            argv: vec!["/no/such/program".into()],
            ..Default::default()
        }),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("/no/such/program"), "{e}");
}

fn binary_data_both_ways_and_a_hundred_megabytes_out(a: &Agent) {
    let data: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut spec = sh("cat");
    spec.stdin = true;
    let (out, _, code) = a.exec(spec, Some(data.clone()));
    assert_eq!(code, 0);
    assert!(
        out == data,
        "stdin came back byte for byte ({} bytes)",
        out.len()
    );

    let s = Session::start(a.conn(), Call::Exec(sh("head -c 100000000 /dev/zero"))).unwrap();
    struct Count(u64);
    impl Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            assert!(b.iter().all(|&x| x == 0));
            self.0 += b.len() as u64;
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut n = Count(0);
    let st = s.wait(&mut n, &mut std::io::sink()).unwrap();
    assert_eq!((n.0, st.shell_code()), (100_000_000, 0));
}

fn a_pty_with_resizes_and_concurrent_execs(a: &Agent) {
    let mut spec = sh("tty; stty size; trap 'stty size; exit 3' WINCH; echo waiting; while :; do sleep 0.05; done");
    spec.tty = Some(WinSize { rows: 24, cols: 80 });
    let s = Session::start(a.conn(), Call::Exec(spec)).unwrap();
    let ctl = s.control();
    // Resize once the shell says it has its trap.
    struct Watch(Vec<u8>, Option<banger_agent::client::Control>);
    impl Write for Watch {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.extend_from_slice(b);
            if String::from_utf8_lossy(&self.0).contains("waiting") {
                if let Some(c) = self.1.take() {
                    c.resize(WinSize {
                        rows: 40,
                        cols: 100,
                    })
                    .unwrap();
                }
            }
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut w = Watch(Vec::new(), Some(ctl));
    let st = s.wait(&mut w, &mut std::io::sink()).unwrap();
    let out = String::from_utf8_lossy(&w.0).replace('\r', "");
    assert!(
        out.starts_with("/dev/pts/"),
        "tty says it is a terminal: {out}"
    );
    assert!(out.contains("24 80\n") && out.contains("40 100\n"), "{out}");
    assert_eq!(st.shell_code(), 3);

    let threads: Vec<_> = (0..8)
        .map(|i| {
            let dial = a.dialer();
            std::thread::spawn(move || {
                let c = dial();
                let s = Session::start(c, Call::Exec(sh(&format!("sleep 0.2; echo {i}")))).unwrap();
                let mut out = Vec::new();
                s.wait(&mut out, &mut std::io::sink()).unwrap();
                assert_eq!(out, format!("{i}\n").into_bytes());
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

fn detached_processes_are_listed_fed_attached_and_signalled(a: &Agent) {
    let spec = ExecSpec {
        argv: vec!["cat".into()],
        detach: true,
        tag: Some("echoer".into()),
        ..Default::default()
    };
    let pid = Session::start(a.conn(), Call::Exec(spec.clone()))
        .unwrap()
        .detached_done()
        .unwrap();
    let e = Session::start(a.conn(), Call::Exec(spec))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("already has tag"), "{e}");

    // Input without attaching; the output is kept.
    let mut c = a.conn();
    write_request(
        &mut c,
        Call::Input {
            target: Target::Tag("echoer".into()),
        },
    )
    .unwrap();
    let ctl_conn = c.try_clone().unwrap();
    banger_agent::proto::write_frame(
        &mut &ctl_conn,
        banger_agent::proto::Kind::Stdin,
        b"kept line\n",
    )
    .unwrap();
    banger_agent::proto::write_msg(&mut &ctl_conn, &Msg::Done).unwrap();
    assert_eq!(read_msg(&mut c).unwrap(), Msg::Done);

    let ps = match client::call(a.conn(), Call::Ps).unwrap() {
        Msg::Processes { list } => list,
        m => panic!("{m:?}"),
    };
    let p = ps.iter().find(|p| p.pid == pid).expect("listed");
    assert_eq!(
        (p.tag.as_deref(), p.detached, p.exit),
        (Some("echoer"), true, None)
    );

    // Attach by pid: the kept output first, then live until stdin closes.
    let s = Session::start(
        a.conn(),
        Call::Attach {
            target: Target::Pid(pid),
        },
    )
    .unwrap();
    let ctl = s.control();
    ctl.stdin(b"live line\n").unwrap();
    ctl.close_stdin().unwrap();
    let mut out = Vec::new();
    let st = s.wait(&mut out, &mut std::io::sink()).unwrap();
    assert_eq!(String::from_utf8(out).unwrap(), "kept line\nlive line\n");
    assert_eq!(st.shell_code(), 0);

    // A signal by tag, to a second detached process.
    let spec = ExecSpec {
        argv: vec!["sleep".into(), "600".into()],
        detach: true,
        tag: Some("sleeper".into()),
        ..Default::default()
    };
    let pid = Session::start(a.conn(), Call::Exec(spec))
        .unwrap()
        .detached_done()
        .unwrap();
    let s = kill_and_attach(a, "sleeper", pid);
    let st = s.wait(&mut std::io::sink(), &mut std::io::sink()).unwrap();
    assert_eq!(st.signal, Some(9));
}

fn a_connection_that_drops_kills_its_attached_process(a: &Agent) {
    let marker = format!("/tmp/banger-agent-test-{}", std::process::id());
    let s = Session::start(
        a.conn(),
        Call::Exec(sh(&format!("echo $$ > {marker}.pid; exec sleep 600"))),
    )
    .unwrap();
    let pid = s.pid;
    drop(s);
    // The agent notices the closed connection when it reads it; the
    // process is gone once `ps` no longer lists it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let Msg::Processes { list } = client::call(a.conn(), Call::Ps).unwrap() else {
            panic!()
        };
        if !list.iter().any(|p| p.pid == pid) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still running: {list:?}"
        );
        std::thread::yield_now();
    }
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    let _ = std::fs::remove_file(format!("{marker}.pid"));
}

fn trees_go_in_and_out_with_modes_and_times(a: &Agent) {
    let src = tempfile::tempdir().unwrap();
    let tree = src.path().join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("sub/secret"), b"\x00\x01binary\xff").unwrap();
    std::fs::set_permissions(
        tree.join("sub/secret"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::fs::write(tree.join("run.sh"), "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(tree.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("run.sh", tree.join("link")).unwrap();
    let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000_000);
    std::fs::File::options()
        .write(true)
        .open(tree.join("run.sh"))
        .unwrap()
        .set_modified(old)
        .unwrap();

    // In: a tar of the tree into the agent's directory.
    let dst = tempfile::tempdir().unwrap();
    let mut tar = tar::Builder::new(Vec::new());
    tar.follow_symlinks(false);
    tar.append_dir_all("tree", &tree).unwrap();
    let bytes = tar.into_inner().unwrap();
    client::put_tar(a.conn(), dst.path().to_str().unwrap(), |w| {
        w.write_all(&bytes)
    })
    .unwrap();
    let got = dst.path().join("tree");
    assert_eq!(
        std::fs::read(got.join("sub/secret")).unwrap(),
        b"\x00\x01binary\xff"
    );
    let mode = |p: PathBuf| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(got.join("sub/secret")), 0o600);
    assert_eq!(mode(got.join("run.sh")), 0o755);
    assert_eq!(
        std::fs::read_link(got.join("link")).unwrap(),
        PathBuf::from("run.sh")
    );
    assert_eq!(
        std::fs::metadata(got.join("run.sh"))
            .unwrap()
            .modified()
            .unwrap(),
        old
    );

    // Out: the same tree back as a stream.
    let mut out = Vec::new();
    client::get_tar(a.conn(), got.to_str().unwrap(), &mut out).unwrap();
    let mut ar = tar::Archive::new(&out[..]);
    let mut names: Vec<(String, u32)> = ar
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.path().unwrap().to_string_lossy().into_owned(),
                e.header().mode().unwrap() & 0o777,
            )
        })
        .collect();
    names.sort();
    assert!(
        names.contains(&("tree/sub/secret".into(), 0o600)),
        "{names:?}"
    );
    assert!(names.contains(&("tree/run.sh".into(), 0o755)), "{names:?}");

    let e = client::put_tar(a.conn(), "/no/such/dir", |w| w.write_all(&bytes))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a directory"), "{e}");
    let mut sink = Vec::new();
    let e = client::get_tar(a.conn(), "/no/such/file", &mut sink)
        .unwrap_err()
        .to_string();
    assert!(e.contains("/no/such/file"), "{e}");
}

fn file_operations_and_watch(a: &Agent) {
    let d = tempfile::tempdir().unwrap();
    let p = |s: &str| d.path().join(s).to_string_lossy().into_owned();
    let ok = |call| assert_eq!(client::call(a.conn(), call).unwrap(), Msg::Done);
    ok(Call::Mkdir {
        path: p("a/b"),
        mode: 0o750,
        parents: true,
    });
    std::fs::write(p("a/b/f"), "x").unwrap();
    match client::call(a.conn(), Call::Stat { path: p("a/b") }).unwrap() {
        Msg::Stat(s) => assert_eq!((s.kind.as_str(), s.mode & 0o777), ("dir", 0o750)),
        m => panic!("{m:?}"),
    }
    ok(Call::Move {
        from: p("a/b/f"),
        to: p("a/g"),
    });
    match client::call(a.conn(), Call::List { path: p("a") }).unwrap() {
        Msg::Entries { list } => {
            let names: Vec<_> = list
                .iter()
                .map(|e| (e.path.clone(), e.kind.clone()))
                .collect();
            assert_eq!(
                names,
                vec![(p("a/b"), "dir".into()), (p("a/g"), "file".into())]
            );
        }
        m => panic!("{m:?}"),
    }
    // Metadata: set as a whole (a key left out goes), read back by stat
    // and list, checked; owner and group by name.
    let set = |meta: &[(&str, &str)]| {
        client::call(
            a.conn(),
            Call::SetMeta {
                path: p("a/g"),
                meta: meta
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            },
        )
    };
    set(&[("purpose", "test"), ("gone", "soon")]).unwrap();
    match set(&[("purpose", "kept")]).unwrap() {
        Msg::Stat(s) => {
            assert_eq!(
                s.meta.into_iter().collect::<Vec<_>>(),
                [("purpose".to_string(), "kept".to_string())]
            );
            assert_eq!(
                (s.owner.as_deref(), s.group.as_deref()),
                (Some("root"), Some("root"))
            );
        }
        m => panic!("{m:?}"),
    }
    match client::call(a.conn(), Call::List { path: p("a") }).unwrap() {
        Msg::Entries { list } => assert_eq!(list[1].meta["purpose"], "kept", "{list:?}"),
        m => panic!("{m:?}"),
    }
    for bad in [("Upper", "v"), ("sp ace", "v"), ("k", "new\nline")] {
        let e = set(&[bad]).unwrap_err();
        assert!(e.to_string().contains("metadata"), "{bad:?}: {e}");
    }
    std::os::unix::fs::symlink("g", p("a/l")).unwrap();
    let e = client::call(
        a.conn(),
        Call::SetMeta {
            path: p("a/l"),
            meta: Default::default(),
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("symlink"), "{e}");
    set(&[]).unwrap();
    assert!(
        !xattr::list(p("a/g"))
            .unwrap()
            .any(|n| n.to_string_lossy().starts_with("user.e2b.")),
        "cleared"
    );

    let e = client::call(
        a.conn(),
        Call::Remove {
            path: p("a"),
            recursive: false,
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("remove"), "{e}");
    ok(Call::Remove {
        path: p("a"),
        recursive: true,
    });
    assert!(!d.path().join("a").exists());

    let mut c = a.conn();
    write_request(
        &mut c,
        Call::Watch {
            path: p(""),
            recursive: true,
            entries: true,
            network_mounts: false,
        },
    )
    .unwrap();
    assert_eq!(read_msg(&mut c).unwrap(), Msg::Done, "watching");
    std::fs::write(p("new"), "y").unwrap();
    match read_msg(&mut c).unwrap() {
        Msg::Event { path, kind, entry } => {
            assert_eq!((path, kind.as_str()), (p("new"), "create"));
            let e = entry.expect("asked for");
            assert_eq!((e.path, e.kind.as_str()), (p("new"), "file"));
        }
        m => panic!("{m:?}"),
    }
    drop(c);
    let mut buf = [0u8; 1];
    let mut c = a.conn();
    write_request(&mut c, Call::Ping).unwrap();
    assert!(matches!(
        read_msg(&mut c).unwrap(),
        Msg::Pong {
            version: banger_agent::proto::VERSION,
            ..
        }
    ));
    assert_eq!(c.read(&mut buf).unwrap(), 0, "one call per connection");
}

/// Two clients attached to one process at once each get its output from
/// their attach on, and its exit; one leaving does not end it.
fn two_clients_attached_both_get_the_output(a: &Agent) {
    let spec = ExecSpec {
        argv: vec!["cat".into()],
        detach: true,
        tag: Some("shared".into()),
        ..Default::default()
    };
    let pid = Session::start(a.conn(), Call::Exec(spec))
        .unwrap()
        .detached_done()
        .unwrap();
    let attach = || {
        Session::start(
            a.conn(),
            Call::Attach {
                target: Target::Pid(pid),
            },
        )
        .unwrap()
    };
    let (first, second, third) = (attach(), attach(), attach());
    // One leaves: the process and the others go on.
    third.control().hang_up();
    drop(third);
    first.control().stdin(b"to both\n").unwrap();
    first.control().close_stdin().unwrap();
    let both = std::thread::scope(|s| {
        let a = s.spawn(move || {
            let mut out = Vec::new();
            let st = first.wait(&mut out, &mut std::io::sink()).unwrap();
            (String::from_utf8(out).unwrap(), st.shell_code())
        });
        let b = s.spawn(move || {
            let mut out = Vec::new();
            let st = second.wait(&mut out, &mut std::io::sink()).unwrap();
            (String::from_utf8(out).unwrap(), st.shell_code())
        });
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!(both.0, ("to both\n".to_string(), 0));
    assert_eq!(both.1, ("to both\n".to_string(), 0));
}

fn detached_output_is_kept_for_a_late_attach(a: &Agent) {
    let d = tempfile::tempdir().unwrap();
    let up = d.path().join("up");
    let spec = ExecSpec {
        argv: vec![
            "sh".into(),
            "-c".into(),
            format!("echo hello; touch {}; exec sleep 600", up.display()),
        ],
        detach: true,
        tag: Some("srv".into()),
        ..Default::default()
    };
    let pid = Session::start(a.conn(), Call::Exec(spec))
        .unwrap()
        .detached_done()
        .unwrap();
    // Signalled only once it has printed (the file comes after the echo).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !up.exists() {
        assert!(std::time::Instant::now() < deadline, "never started");
        std::thread::yield_now();
    }
    let s = kill_and_attach(a, "srv", pid);
    let mut out = Vec::new();
    let st = s.wait(&mut out, &mut std::io::sink()).unwrap();
    assert_eq!(
        (String::from_utf8(out).unwrap(), st.signal),
        ("hello\n".to_string(), Some(9))
    );
}

/// Whether the agent still lists `pid`, asked until it does not or the
/// deadline passes.
fn gone_within(a: &Agent, pid: u32, within: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + within;
    loop {
        let Msg::Processes { list } = client::call(a.conn(), Call::Ps).unwrap() else {
            panic!()
        };
        if !list.iter().any(|p| p.pid == pid) {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::yield_now();
    }
}

/// The helper killed and started again (the daemon respawns a dead one;
/// a clone gets a new one): the agent's port comes back, the new
/// helper's epoch ends the streams of the old one (a session open across
/// it ends, and its process with it), and new calls are served.
#[test]
fn a_restarted_helper_serves_again() {
    let mut a = Agent::start(Via::Mux);
    let s = Session::start(a.conn(), Call::Exec(sh("exec sleep 600"))).unwrap();
    let pid = s.pid;
    let mut helper = a.helper.take().unwrap();
    helper.kill().unwrap();
    helper.wait().unwrap();
    let ended = s.wait(&mut std::io::sink(), &mut std::io::sink());
    assert!(
        ended.is_err(),
        "a session through a dead helper ended: {ended:?}"
    );

    a.helper = Some(start_helper(a.dir.path()));
    let m = client::call(a.conn(), Call::Ping).unwrap();
    assert!(matches!(m, Msg::Pong { .. }), "{m:?}");
    assert!(
        gone_within(&a, pid, std::time::Duration::from_secs(30)),
        "the old helper's session kept its process"
    );
}

/// A client of the helper that sends a bad CONNECT line, or asks for a
/// port the agent does not serve, gets its connection closed; the
/// helper goes on.
#[test]
fn bad_connects_are_closed() {
    let a = Agent::start(Via::Mux);
    for line in [&b"CONNECT 9\n"[..], b"HELLO\n", &[b'x'; 100]] {
        let mut c = UnixStream::connect(&a.sock).unwrap();
        c.set_read_timeout(Some(std::time::Duration::from_secs(60)))
            .unwrap();
        c.write_all(line).unwrap();
        let mut got = Vec::new();
        let _ = c.read_to_end(&mut got);
        assert!(
            got.is_empty(),
            "{:?} got {got:?}",
            String::from_utf8_lossy(line)
        );
    }
    let m = client::call(a.conn(), Call::Ping).unwrap();
    assert!(matches!(m, Msg::Pong { .. }), "{m:?}");
}

/// Held for a snapshot, the agent runs nothing (exec, files, ps) until it
/// is released or given an identity; ping, clock and sync still answer.
fn a_held_agent_runs_nothing_until_released(a: &Agent) {
    let m = client::call(a.conn(), Call::Hold).unwrap();
    assert!(matches!(m, Msg::Done), "{m:?}");
    let e = Session::start(a.conn(), Call::Exec(sh("true")))
        .err()
        .expect("an exec while held is refused")
        .to_string();
    assert!(e.contains("has not been given its own identity"), "{e}");
    for call in [Call::Ps, Call::Stats, Call::Stat { path: "/".into() }] {
        let e = client::call(a.conn(), call).expect_err("refused while held");
        assert!(e.to_string().contains("own identity"), "{e}");
    }
    for call in [Call::Ping, Call::Sync] {
        client::call(a.conn(), call).expect("answered while held");
    }
    let m = client::call(a.conn(), Call::Release).unwrap();
    assert!(matches!(m, Msg::Done), "{m:?}");
    let (out, _, code) = a.exec(sh("echo free"), None);
    assert_eq!((&out[..], code), (&b"free\n"[..], 0));
}

/// Every test above, once per way of reaching the agent.
macro_rules! over {
    ([$($via:ident),*] $names:tt) => {
        $( over!(@one $via $names); )*
    };
    (@one $via:ident [$($name:ident),* $(,)?]) => {
        #[allow(non_snake_case)]
        mod $via {
            $(
                #[test]
                fn $name() {
                    super::$name(&super::Agent::start(super::Via::$via));
                }
            )*
        }
    };
}

over!(
    [Unix, Mux]
    [
        exit_codes_signals_and_separate_streams,
        binary_data_both_ways_and_a_hundred_megabytes_out,
        a_pty_with_resizes_and_concurrent_execs,
        detached_processes_are_listed_fed_attached_and_signalled,
        a_connection_that_drops_kills_its_attached_process,
        trees_go_in_and_out_with_modes_and_times,
        file_operations_and_watch,
        detached_output_is_kept_for_a_late_attach,
        two_clients_attached_both_get_the_output,
        a_held_agent_runs_nothing_until_released
    ]
);
