//! Real accounts for tests that need a user who is not root (the socket's
//! group): made with useradd/groupadd, removed when dropped (a test that
//! panics removes them too).

use std::process::Command;

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn id(flag: &str, name: &str) -> u32 {
    let out = Command::new("id").args([flag, name]).output().expect("id");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("id {flag} {name}: {out:?}"))
}

/// A name no account has: `<prefix><6 hex>`.
fn fresh(prefix: &str) -> String {
    let mut b = [0u8; 3];
    getrandom(&mut b);
    format!("{prefix}{:02x}{:02x}{:02x}", b[0], b[1], b[2])
}

fn getrandom(buf: &mut [u8]) {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .expect("/dev/urandom");
}

pub struct TestGroup {
    pub name: String,
    pub gid: u32,
}

impl TestGroup {
    pub fn create() -> TestGroup {
        let name = fresh("bgtg");
        run("groupadd", &["--system", &name]);
        let out = Command::new("getent")
            .args(["group", &name])
            .output()
            .expect("getent");
        let gid = String::from_utf8_lossy(&out.stdout)
            .split(':')
            .nth(2)
            .and_then(|g| g.parse().ok())
            .expect("gid of the new group");
        TestGroup { name, gid }
    }
}

impl Drop for TestGroup {
    fn drop(&mut self) {
        let _ = Command::new("groupdel").arg(&self.name).status();
    }
}

pub struct TestUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Its home: a directory of its own, removed with it.
    pub home: tempfile::TempDir,
}

impl TestUser {
    /// A user (with a group of its own) who is also in `groups`.
    pub fn new(groups: &[&TestGroup]) -> TestUser {
        let name = fresh("bgtu");
        let home = tempfile::Builder::new()
            .prefix("banger-home-")
            .tempdir_in("/var/tmp")
            .expect("home");
        let mut args = vec![
            "--system",
            "--user-group",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            "--home-dir",
        ];
        let home_s = home.path().to_string_lossy().into_owned();
        args.push(&home_s);
        let list: Vec<&str> = groups.iter().map(|g| g.name.as_str()).collect();
        let joined = list.join(",");
        if !list.is_empty() {
            args.push("--groups");
            args.push(&joined);
        }
        args.push(&name);
        run("useradd", &args);
        // From here on a panic drops it, and the account goes.
        let mut user = TestUser {
            name,
            uid: 0,
            gid: 0,
            home,
        };
        user.uid = id("-u", &user.name);
        user.gid = id("-g", &user.name);
        std::os::unix::fs::chown(user.home.path(), Some(user.uid), Some(user.gid))
            .expect("chown home");
        user
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).status();
    }
}
