//! bangerd's settings: flags, their environment variables, and the config
//! file (`/etc/banger/config.toml`, or `--config`/`BANGER_CONFIG`), in
//! that order of precedence over the defaults. `banger config show`
//! prints the effective values and where each came from.
//!
//! The file's keys are the flags' names with `_` (`tap_pool = 2` is
//! `--tap-pool 2`); each value is checked by the flag's own parser, and a
//! key that is no flag is an error naming it. The state and runtime dirs
//! are not in the file: the CLI finds the socket by them, and it reads
//! no config file.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use banger_core::api::ConfigEntry;
use banger_core::layout::{RUNTIME_DIR_ENV, STATE_DIR_ENV};
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser};
use thiserror::Error;

pub const DEFAULT_CONFIG: &str = "/etc/banger/config.toml";
pub const CONFIG_ENV: &str = "BANGER_CONFIG";

#[derive(Debug, Error)]
pub enum SettingsError {
    #[error("config file {path}: {err}")]
    Read { path: PathBuf, err: std::io::Error },
    #[error("config file {path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config file {path}: unknown key {key:?} (the keys: {known})")]
    UnknownKey {
        path: PathBuf,
        key: String,
        known: String,
    },
    #[error("config file {path}: {key}: {message}")]
    Value {
        path: PathBuf,
        key: String,
        message: String,
    },
    /// Bad flags (and --help, --version): `clap::Error::exit` prints it.
    #[error("{0}")]
    Args(#[from] clap::Error),
}

#[derive(Debug, Parser)]
#[command(name = "bangerd", version, about = "banger's root daemon")]
pub struct Args {
    /// The config file (default /etc/banger/config.toml, which may be
    /// absent; a file named here must exist).
    #[arg(long, env = CONFIG_ENV)]
    pub config: Option<PathBuf>,
    /// State dir (database, images, VM disks). Default /var/lib/banger.
    #[arg(long, env = STATE_DIR_ENV)]
    pub state_dir: Option<PathBuf>,
    /// Runtime dir (sockets). Default /run/banger.
    #[arg(long, env = RUNTIME_DIR_ENV)]
    pub runtime_dir: Option<PathBuf>,
    /// What the daemon logs: error, warn, info, debug, trace (or a
    /// tracing filter such as `bangerd=debug`).
    #[arg(long, env = "BANGER_LOG", default_value = "info")]
    pub log_level: String,
    /// The image a VM boots unless it names one.
    #[arg(long, env = "BANGER_DEFAULT_IMAGE", default_value = banger_guest::image::DEFAULT_IMAGE)]
    pub default_image: String,
    /// vCPUs of a VM that does not say (default: half the host's cores,
    /// at most 4).
    #[arg(long, env = "BANGER_CPUS")]
    pub cpus: Option<u32>,
    /// Memory of a VM that does not say: 1024, 512M, 2G (default: a
    /// sixteenth of the host's, within 512 MiB..2 GiB).
    #[arg(long, env = "BANGER_MEMORY")]
    pub memory: Option<String>,
    /// Work disk of a VM that does not say: 4G (default: a twentieth of the
    /// free disk, within 1..8 GiB).
    #[arg(long, env = "BANGER_DISK_SIZE")]
    pub disk_size: Option<String>,
    /// The VMM of a VM that does not say: qemu or firecracker (default:
    /// Firecracker where KVM and its binary are, else QEMU).
    #[arg(long, env = "BANGER_VMM")]
    pub vmm: Option<banger_core::VmmKind>,
    /// Seconds a guest may take to become ready.
    #[arg(long, env = "BANGER_BOOT_TIMEOUT", default_value_t = 120)]
    pub boot_timeout: u64,
    /// A guest's console log is rotated past this many bytes (one older
    /// file kept).
    #[arg(long, env = "BANGER_CONSOLE_MAX_BYTES", default_value_t = 1 << 20)]
    pub console_max_bytes: u64,
    /// VMs are named `<name>.<suffix>` in banger's DNS.
    #[arg(long, env = "BANGER_DNS_SUFFIX", default_value = "vm")]
    pub dns_suffix: String,
    /// Where the host can ask banger's DNS (`off`: nowhere).
    #[arg(long, env = "BANGER_DNS_LISTEN", default_value = "127.0.0.153:53")]
    pub dns_listen: String,
    /// The resolv.conf whose nameservers banger forwards other names to.
    #[arg(long, env = "BANGER_RESOLV_CONF", default_value = "/etc/resolv.conf")]
    pub resolv_conf: PathBuf,
    /// Spare taps kept warm for starts (0: none).
    #[arg(long, env = "BANGER_TAP_POOL", default_value_t = 0)]
    pub tap_pool: usize,
    /// The guests' addresses: a /30 per VM out of this network.
    #[arg(long, env = "BANGER_SUBNET", default_value = "172.30.0.0/16")]
    pub subnet: banger_core::net::Cidr,
    /// How new VMs' root disks are made: qcow2, dm-snapshot, reflink,
    /// overlay or copy. Default: the best this host and the VMM allow
    /// (`banger doctor` says which).
    #[arg(long, env = "BANGER_ROOT_DISK")]
    pub root_disk: Option<banger_core::RootDiskKind>,
    /// VMMs run as uid/gid BASE + the VM's address slot. Default: the
    /// range this state dir chose before, else the first free one from
    /// 1879048192 up (kept in <state>/vmm-uid-base).
    #[arg(long, env = "BANGER_VMM_UID_BASE")]
    pub vmm_uid_base: Option<u32>,
    /// The gid a jailed Firecracker runs with (the jailer takes one; images
    /// are read through a grant to each VM's uid, not through a group).
    #[arg(long, env = "BANGER_VMM_IMAGES_GID", default_value_t = crate::config::DEFAULT_VMM_UID_BASE)]
    pub vmm_images_gid: u32,
    /// MiB a VM's cgroup allows beyond its guest memory, for the VMM itself.
    #[arg(long, env = "BANGER_VMM_MEMORY_OVERHEAD", default_value_t = crate::config::DEFAULT_VMM_MEMORY_OVERHEAD_MIB)]
    pub vmm_memory_overhead: u64,
    /// The VMs' parent cgroup (default `banger` under the daemon's own in
    /// cgroup v1, `banger.slice` in v2).
    #[arg(long, env = "BANGER_CGROUP_PARENT")]
    pub cgroup_parent: Option<String>,
    /// Disk the warm-start cache may take: snapshots of freshly booted
    /// guests that later `vm run`s of the same image and sizes restore
    /// instead of booting (4G, 512M; 0: no warm starts).
    #[arg(long, env = "BANGER_WARM_CACHE", default_value = "4G")]
    pub warm_cache: String,
    /// Serve the E2B-compatible API on this loopback ADDR:PORT from the
    /// start (as `banger api serve --listen` does for a running daemon).
    #[arg(long, env = "BANGER_API_LISTEN")]
    pub api_listen: Option<String>,
    /// Members of this group may use the socket (`root:GROUP 0660`); while
    /// no such group exists, only root may (`root 0600`).
    #[arg(long, env = "BANGER_SOCKET_GROUP", default_value = "banger")]
    pub socket_group: String,
    /// Print bangerd's man page (roff) and exit.
    #[arg(long, hide = true)]
    pub print_man: bool,
}

/// Flags the file may not set.
const NOT_IN_FILE: [&str; 4] = ["config", "state_dir", "runtime_dir", "print_man"];

/// The keys a config file may hold.
pub fn file_keys() -> Vec<String> {
    Args::command()
        .get_arguments()
        .map(|a| a.get_id().as_str().to_string())
        .filter(|id| id != "help" && id != "version" && !NOT_IN_FILE.contains(&id.as_str()))
        .collect()
}

/// The settings from `argv` (the process's environment read by clap),
/// the config file merged under them, and each effective value's source.
pub fn load(argv: Vec<OsString>) -> Result<(Args, Vec<ConfigEntry>), SettingsError> {
    let cmd = Args::command();
    let first = cmd.clone().try_get_matches_from(&argv)?;
    let named = first.get_one::<PathBuf>("config").cloned();
    let (path, text) = match &named {
        Some(p) => (
            p.clone(),
            Some(
                std::fs::read_to_string(p).map_err(|err| SettingsError::Read {
                    path: p.clone(),
                    err,
                })?,
            ),
        ),
        None => {
            let p = PathBuf::from(DEFAULT_CONFIG);
            match std::fs::read_to_string(&p) {
                Ok(t) => (p, Some(t)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => (p, None),
                Err(err) => return Err(SettingsError::Read { path: p, err }),
            }
        }
    };
    let file = match &text {
        Some(t) => parse_file(&path, t)?,
        None => BTreeMap::new(),
    };
    // What neither a flag nor the environment set comes from the file: as
    // if it were a flag, so the flag's own parser checks it.
    let mut merged = argv.clone();
    let mut from_file = Vec::new();
    for (key, value) in &file {
        let src = first.value_source(key);
        if matches!(
            src,
            Some(ValueSource::CommandLine) | Some(ValueSource::EnvVariable)
        ) {
            continue;
        }
        // `--key=value`: a value that starts with `-` stays a value.
        let flag = format!("--{}={value}", key.replace('_', "-"));
        // Checked alone first, so that an error names the file's key.
        cmd.clone()
            .try_get_matches_from([OsString::from("bangerd"), flag.clone().into()])
            .map_err(|e| SettingsError::Value {
                path: path.clone(),
                key: key.clone(),
                message: first_line(&e.render().to_string()),
            })?;
        merged.push(flag.into());
        from_file.push(key.clone());
    }
    let matches = cmd.try_get_matches_from(&merged)?;
    let args = Args::from_arg_matches(&matches)?;
    let mut entries = Vec::new();
    for a in Args::command().get_arguments() {
        let id = a.get_id().as_str();
        if id == "help" || id == "version" || id == "print_man" {
            continue;
        }
        let value = matches
            .get_raw(id)
            .map(|vs| {
                vs.map(|v| v.to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_else(|| "(auto)".into());
        let source = if from_file.iter().any(|k| k == id) {
            format!("file {}", path.display())
        } else {
            match matches.value_source(id) {
                Some(ValueSource::CommandLine) => {
                    format!("flag --{}", id.replace('_', "-"))
                }
                Some(ValueSource::EnvVariable) => format!(
                    "env {}",
                    a.get_env().map(|e| e.to_string_lossy()).unwrap_or_default()
                ),
                _ => "default".into(),
            }
        };
        entries.push(ConfigEntry {
            key: id.to_string(),
            value,
            source,
        });
    }
    Ok((args, entries))
}

fn first_line(s: &str) -> String {
    s.lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim_start_matches("error: ")
        .to_string()
}

/// The file's keys and values (as a flag's text): a flat table of strings,
/// integers and booleans.
fn parse_file(path: &Path, text: &str) -> Result<BTreeMap<String, String>, SettingsError> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| SettingsError::Syntax {
            path: path.into(),
            message: e.to_string().trim().to_string(),
        })?;
    let known = file_keys();
    let mut out = BTreeMap::new();
    for (key, value) in table {
        if !known.contains(&key) {
            return Err(SettingsError::UnknownKey {
                path: path.into(),
                key,
                known: known.join(", "),
            });
        }
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => {
                return Err(SettingsError::Value {
                    path: path.into(),
                    key,
                    message: format!("want a string or a number, not a {}", other.type_str()),
                })
            }
        };
        out.insert(key, text);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(extra: &[&str], config: &Path) -> Vec<OsString> {
        let mut v: Vec<OsString> = vec!["bangerd".into(), "--config".into(), config.into()];
        v.extend(extra.iter().map(OsString::from));
        v
    }

    fn entry<'a>(e: &'a [ConfigEntry], key: &str) -> &'a ConfigEntry {
        e.iter().find(|c| c.key == key).expect(key)
    }

    #[test]
    fn flags_over_the_file_over_defaults() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("config.toml");
        std::fs::write(
            &f,
            "tap_pool = 3\ndns_suffix = \"box\"\nmemory = \"700M\"\nvmm = \"qemu\"\n",
        )
        .unwrap();
        let (args, e) = load(argv(&["--dns-suffix", "flagged"], &f)).unwrap();
        assert_eq!(args.tap_pool, 3);
        assert_eq!(args.dns_suffix, "flagged");
        assert_eq!(args.memory.as_deref(), Some("700M"));
        assert_eq!(args.vmm, Some(banger_core::VmmKind::Qemu));
        assert_eq!(
            entry(&e, "tap_pool").source,
            format!("file {}", f.display())
        );
        assert_eq!(entry(&e, "tap_pool").value, "3");
        assert_eq!(entry(&e, "dns_suffix").source, "flag --dns-suffix");
        assert_eq!(entry(&e, "boot_timeout").source, "default");
        assert_eq!(entry(&e, "boot_timeout").value, "120");
        assert_eq!(entry(&e, "cpus").value, "(auto)");
    }

    #[test]
    fn the_packaged_example_holds_only_real_keys_and_values() {
        let example = include_str!("../../../packaging/config.toml");
        // As shipped: comments only.
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("config.toml");
        std::fs::write(&f, example).unwrap();
        let (_, e) = load(argv(&[], &f)).unwrap();
        assert!(e.iter().all(|c| !c.source.starts_with("file")));
        // Every `# key = value` line uncommented: each is a key, and its
        // value is one the flag takes.
        let live: String = example
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| l.contains(" = "))
            .map(|l| format!("{}\n", l.split(" #").next().unwrap_or(l)))
            .collect();
        assert!(live.lines().count() >= 10, "{live}");
        std::fs::write(&f, &live).unwrap();
        let (_, e) = load(argv(&[], &f)).unwrap();
        let from_file = e.iter().filter(|c| c.source.starts_with("file")).count();
        assert_eq!(from_file, live.lines().count(), "{live}");
    }

    #[test]
    fn bad_files_are_refused_naming_the_key() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("config.toml");
        for (text, says) in [
            ("tap_pol = 2\n", "unknown key \"tap_pol\""),
            ("state_dir = \"/x\"\n", "unknown key \"state_dir\""),
            ("tap_pool = \"many\"\n", "tap_pool: invalid value 'many'"),
            ("tap_pool = \"-2\"\n", "tap_pool: invalid value '-2'"),
            ("vmm = \"kvmtool\"\n", "vmm: invalid value 'kvmtool'"),
            ("[net]\nsubnet = \"10.0.0.0/8\"\n", "unknown key \"net\""),
            (
                "subnet = [\"10.0.0.0/8\"]\n",
                "subnet: want a string or a number, not a array",
            ),
            ("tap_pool = \n", "config file"),
        ] {
            std::fs::write(&f, text).unwrap();
            let e = load(argv(&[], &f)).unwrap_err().to_string();
            assert!(e.contains(says), "{text:?}: {e}");
        }
        // A file named but missing is an error; an empty one is not.
        let e = load(argv(&[], &d.path().join("nope.toml")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope.toml"), "{e}");
        std::fs::write(&f, "").unwrap();
        load(argv(&[], &f)).unwrap();
    }
}
