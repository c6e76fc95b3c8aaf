//! A hostile guest stalls nothing on the host (issue 20): its agent is
//! replaced, inside a real guest, by a program that takes banger's vsock
//! connections on the agent's port and trickles an endless answer (a
//! frame header saying 1 MiB, then a byte every 200 ms), or, as a call
//! asks, never answers, closes in the middle of a frame, or floods
//! frames of junk. Every command
//! that asks that guest ends within its call's deadline, and the others
//! do not notice. Each command's time is printed (`--nocapture`) for the
//! closing note; the limits asserted are watchdogs (ten times a bound),
//! not speed targets. Needs root; `scripts/test.sh` runs it.
//!
//! The hostile guest runs on QEMU with its image's initramfs as an older
//! banger built it (no `banger-vport` marker), so its agent speaks
//! AF_VSOCK through `vhost-device-vsock`: a snapshot-able guest's agent
//! rides the multiplexer on a virtio-serial port instead, whose hostile
//! frames (floods, bad CRCs, streams past the limit, data past the credit)
//! the mux's own tests feed `banger-vport` (`banger_agent::mux`). The
//! calls' deadlines are the daemon's, the same over either channel.

use std::path::PathBuf;
use std::process::Output;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use test_infra::{ok, text, wait_until, Instance};

fn banger_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_banger"))
}

/// The hostile agent: perl (in every Debian image, `perl-base`), AF_VSOCK
/// by number. Writes a line to the console once it listens.
const HOSTILE: &str = r#"#!/usr/bin/perl
use strict;
use Socket;
my $AF_VSOCK = 40;
socket(my $s, $AF_VSOCK, SOCK_STREAM, 0) or die "socket: $!";
bind($s, pack("S S L L a4", $AF_VSOCK, 0, 1024, 0xFFFFFFFF, "\0" x 4)) or die "bind: $!";
listen($s, 64) or die "listen: $!";
open(my $con, '>', '/dev/console');
syswrite($con, "banger-hostile: listening\n");
$SIG{CHLD} = 'IGNORE';
while (1) {
    accept(my $c, $s) or next;
    if (fork() == 0) {
        # How to misbehave: named by the call (`vm exec h -- silent`),
        # else a trickle.
        my $req = "";
        sysread($c, $req, 65536);
        if ($req =~ /"silent"/) {
            sleep 1 while 1;
        } elsif ($req =~ /"close"/) {
            syswrite($c, pack("N", 100) . "half a frame");
        } elsif ($req =~ /"flood"/) {
            my $junk = pack("N", 1 << 20) . ("\xff" x (1 << 20));
            while (syswrite($c, $junk)) {}
        } else {
            syswrite($c, pack("N", 1 << 20));
            while (syswrite($c, "x")) { select(undef, undef, undef, 0.2); }
        }
        exit 0;
    }
    close $c;
}
"#;

/// Kills the guest's agent (by its name, `agent`: the image's busybox
/// has no pkill).
const KILL_AGENT: &str = "for p in /proc/[0-9]*; do \
    [ \"$(cat $p/comm 2>/dev/null)\" = agent ] && kill -9 ${p#/proc/}; done; true";

/// Runs `banger args`, killed (and the test failed) if it is not done
/// within `watchdog`; its output and how long it took.
fn timed(inst: &Instance, args: &[&str], watchdog: Duration) -> (Output, Duration) {
    let child = inst
        .banger_cmd(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel();
    let t0 = Instant::now();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(watchdog) {
        Ok(out) => (out.unwrap(), t0.elapsed()),
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("banger {args:?} still waited on the guest after {watchdog:?}");
        }
    }
}

/// Runs VM `name` (its agent on AF_VSOCK) with `volume`, and swaps its
/// agent for the hostile one.
fn turn_hostile(inst: &Instance, name: &str, volume: Option<&str>) {
    let mut args = vec!["vm", "run", "-d", "--name", name];
    if let Some(v) = volume {
        args.extend(["--volume", v]);
    }
    ok(&inst.banger(&args), "vm run -d");
    // Its agent on AF_VSOCK: the helper is vhost-device-vsock.
    let id = inst.vm(name).unwrap()["id"].as_str().unwrap().to_string();
    assert!(
        inst.processes()
            .iter()
            .any(|(_, c)| c.contains("vhost-device-vsock") && c.contains(&id)),
        "{name}'s agent channel is not the vsock device: {:?}",
        inst.processes()
    );
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("hostile");
    std::fs::write(&script, HOSTILE).unwrap();
    let to = format!("{name}:/run/banger/hostile");
    ok(
        &inst.banger(&["vm", "cp", script.to_str().unwrap(), &to]),
        "vm cp",
    );
    // init respawns /run/banger/agent: the hostile program takes its
    // place, and the real agent is killed.
    ok(
        &inst.banger(&[
            "vm",
            "exec",
            "-d",
            name,
            "--",
            "/bin/sh",
            "-c",
            &format!(
                "chmod 755 /run/banger/hostile && mv /run/banger/hostile /run/banger/agent \
                 && {KILL_AGENT}"
            ),
        ]),
        "replace the agent",
    );
    assert!(
        wait_until(Duration::from_secs(60), || text(
            &inst.banger(&["vm", "logs", name]).stdout
        )
        .contains("banger-hostile: listening")),
        "the hostile agent did not start: {}",
        text(&inst.banger(&["vm", "logs", name]).stdout)
    );
}

#[test]
fn a_guest_whose_agent_trickles_stalls_nothing() {
    let inst = Instance::new(&banger_bin()).with_image();
    inst.strip_vport_marker();
    ok(
        &inst.banger(&["volume", "create", "hv", "--size", "16M"]),
        "volume create",
    );
    turn_hostile(&inst, "h", Some("hv:/data"));
    // A second one, for `vm stop` (the first goes by `rm -f`).
    turn_hostile(&inst, "h2", None);
    ok(
        &inst.banger(&["vm", "run", "-d", "--name", "calm"]),
        "vm run -d calm",
    );

    let mut table = Vec::new();
    // Every guest's stats at once: the hostile one's own are left out.
    let (out, t) = timed(&inst, &["vm", "stats", "--json"], Duration::from_secs(30));
    let stats: serde_json::Value = serde_json::from_str(&ok(&out, "vm stats")).unwrap();
    let by = |n: &str| {
        stats
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == n)
            .cloned()
            .unwrap_or_else(|| panic!("{n} not in {stats}"))
    };
    assert!(by("h")["guest"].is_null(), "{stats}");
    assert!(by("h2")["guest"].is_null(), "{stats}");
    assert!(!by("calm")["guest"].is_null(), "{stats}");
    table.push(("vm stats (three VMs)", t));

    let (out, t) = timed(&inst, &["vm", "ls"], Duration::from_secs(10));
    ok(&out, "vm ls");
    table.push(("vm ls", t));

    let (out, t) = timed(
        &inst,
        &["vm", "exec", "calm", "--", "true"],
        Duration::from_secs(30),
    );
    ok(&out, "exec in the other VM");
    table.push(("vm exec calm -- true", t));

    // The CLI's own call: the agent's word that the process started is
    // bounded (30 s).
    let (out, t) = timed(
        &inst,
        &["vm", "exec", "h", "--", "true"],
        Duration::from_secs(300),
    );
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("no whole answer within"), "{err}");
    table.push(("vm exec h -- true (trickle)", t));

    // The other ways: never a word (the CLI's 30 s), half a frame, junk.
    for (how, says, watchdog) in [
        ("silent", "no whole answer within", 300),
        ("close", "closed in the middle of a call", 60),
        ("flood", "agent frame of unknown kind", 60),
    ] {
        let (out, t) = timed(
            &inst,
            &["vm", "exec", "h", "--", how],
            Duration::from_secs(watchdog),
        );
        let err = text(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{how}: {err}");
        table.push((how, t));
    }
    let (out, t) = timed(&inst, &["vm", "ls"], Duration::from_secs(10));
    ok(&out, "vm ls");
    table.push(("vm ls", t));

    // A stop needs nothing of the agent (Ctrl-Alt-Del, then the VMM is
    // killed after the stop timeout).
    let (out, t) = timed(&inst, &["vm", "stop", "h2"], Duration::from_secs(300));
    ok(&out, "vm stop h2");
    table.push(("vm stop h2", t));

    // rm -f flushes the volume first (a Sync call, 10 s), then kills.
    let (out, t) = timed(&inst, &["vm", "rm", "-f", "h"], Duration::from_secs(100));
    ok(&out, "vm rm -f h");
    table.push(("vm rm -f h (with a volume)", t));

    eprintln!("\nhostile agent (trickling answer): command times");
    for (what, t) in &table {
        eprintln!("  {what:<30} {:>8.2} s", t.as_secs_f64());
    }
    ok(
        &inst.banger(&["vm", "rm", "-f", "calm", "h2"]),
        "rm calm, h2",
    );
    ok(&inst.banger(&["volume", "rm", "hv"]), "volume rm");
    inst.assert_baseline();
}
