//! What a VM holds of each resource, as its module describes it: one typed
//! variant per resource, recorded in the store as `{"resource": NAME,
//! "data": {...}}` (the store keeps them opaque, [`banger_core::Held`], so
//! a new resource needs no migration).
//!
//! Every description is strict (`deny_unknown_fields`, required keys): an
//! item this daemon cannot read exactly, from an older or newer banger or
//! hand-edited, decodes as [`Item::Unknown`] with its record intact, and is
//! kept and reported rather than released as nothing.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use banger_core::{Held, Release};
use banger_host::firewall::GuestRules;
use banger_host::process::ProcId;
use serde::{Deserialize, Serialize};

/// Files and directories a resource made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Files {
    pub paths: Vec<PathBuf>,
}

/// A guest address, reserved while its record exists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Address {
    /// (Null in records an old migration made of a VM without one.)
    pub ip: Option<Ipv4Addr>,
}

/// The VM's directory and its runtime directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmDir {
    pub dir: PathBuf,
    pub run: PathBuf,
}

/// A tap, and the gateway address it carries (a spare taken back by the
/// pool keeps it; a pool's own spare has none).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tap {
    pub name: String,
    #[serde(default)]
    pub host_ip: Option<Ipv4Addr>,
    /// A pod VM's tap: in this pod's network namespace (not the
    /// daemon's), beside `pod_ifname`, whose ingress redirect goes with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_netns: Option<std::path::PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_ifname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_netns_id: Option<(u64, u64)>,
}

/// Something that lives only in the daemon's process (a DNS listener).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct InProcess {}

/// The volumes a running VM has attached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Volumes {
    pub names: Vec<String>,
}

/// A root disk's dm-snapshot: its dm name over the image and the VM's
/// copy-on-write file (their loop devices are found by backing file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DmSnapshot {
    pub name: String,
    pub image: PathBuf,
    pub cow: PathBuf,
}

/// What confines the VM's processes: their cgroups, the volumes its user
/// owns, the Firecracker jail, and the image its user was granted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Jail {
    pub cgroup: Vec<PathBuf>,
    pub volumes: Vec<PathBuf>,
    pub uid: Option<u32>,
    pub jail: Option<PathBuf>,
    pub image: Option<PathBuf>,
}

/// A process of the VM's, and the sockets it serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    /// The guest's CID, reserved while this record exists.
    pub cid: Option<u32>,
    pub pid: Option<i32>,
    pub start_time: Option<u64>,
    #[serde(default)]
    pub paths: Vec<PathBuf>,
}

impl Vsock {
    pub fn backend(&self) -> Option<ProcId> {
        proc_id(self.pid, self.start_time)
    }
}

/// The virtiofsd processes of the VM's mounts and their sockets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Virtiofs {
    pub procs: Vec<ProcId>,
    #[serde(default)]
    pub paths: Vec<PathBuf>,
}

/// The VMM: its process (when one was found) and its API socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vmm {
    pub pid: Option<i32>,
    pub start_time: Option<u64>,
    pub sock: Option<PathBuf>,
}

impl Vmm {
    pub fn process(&self) -> Option<ProcId> {
        proc_id(self.pid, self.start_time)
    }
}

fn proc_id(pid: Option<i32>, start_time: Option<u64>) -> Option<ProcId> {
    Some(ProcId {
        pid: pid?,
        start_time: start_time?,
    })
}

/// Published ports' listeners (in the daemon's process).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ports {
    pub listeners: usize,
}

/// A VM's firewall elements, or (an older banger's) rules tagged by its id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Firewall {
    Elements(GuestRules),
    Legacy(LegacyRules),
}

/// An older banger's rules, in its `ip banger` table, tagged by VM id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LegacyRules {
    pub vm_id: String,
}

/// One item: the resource's name is the tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "resource", content = "data", rename_all = "snake_case")]
pub enum Item {
    Address(Address),
    VmDir(VmDir),
    RootDisk(Files),
    WorkDisk(Files),
    HostKey(Files),
    Tap(Tap),
    Dns(InProcess),
    Volumes(Volumes),
    DmSnapshot(DmSnapshot),
    Initrd(Files),
    Jail(Jail),
    Vsock(Vsock),
    Virtiofs(Virtiofs),
    Ram(Files),
    Vmm(Vmm),
    Ports(Ports),
    /// Older records call it "nat".
    #[serde(alias = "nat")]
    Firewall(Firewall),
    /// What this banger cannot read exactly: kept as recorded, with why.
    #[serde(skip)]
    Unknown {
        record: Held,
        why: String,
    },
}

impl Item {
    /// Reads a recorded item; never fails (see [`Item::Unknown`]).
    pub fn from_record(h: &Held) -> Item {
        match serde_json::to_value(h).and_then(serde_json::from_value) {
            Ok(item) => item,
            Err(e) => {
                let why = if super::by_name(&h.resource).is_none() {
                    format!(
                        "it names a resource this banger does not know ({:?}); a newer banger wrote it",
                        h.resource
                    )
                } else {
                    format!(
                        "its {:?} record cannot be read by this banger ({e}): {}",
                        h.resource, h.data
                    )
                };
                Item::Unknown {
                    record: h.clone(),
                    why,
                }
            }
        }
    }

    /// The item as the store records it.
    pub fn record(&self) -> Held {
        if let Item::Unknown { record, .. } = self {
            return record.clone();
        }
        let data = match serde_json::to_value(self) {
            Ok(mut v) => v.get_mut("data").map(serde_json::Value::take),
            Err(e) => {
                tracing::warn!(resource = self.resource(), err = %e, "an item cannot be recorded whole");
                None
            }
        }
        .unwrap_or_default();
        Held {
            resource: self.resource().to_string(),
            data,
        }
    }

    /// The name of the resource the item is of (as recorded, for an
    /// unknown one).
    pub fn resource(&self) -> &str {
        match self {
            Item::Address(_) => "address",
            Item::VmDir(_) => "vm_dir",
            Item::RootDisk(_) => "root_disk",
            Item::WorkDisk(_) => "work_disk",
            Item::HostKey(_) => "host_key",
            Item::Tap(_) => "tap",
            Item::Dns(_) => "dns",
            Item::Volumes(_) => "volumes",
            Item::DmSnapshot(_) => "dm_snapshot",
            Item::Initrd(_) => "initrd",
            Item::Jail(_) => "jail",
            Item::Vsock(_) => "vsock",
            Item::Virtiofs(_) => "virtiofs",
            Item::Ram(_) => "ram",
            Item::Vmm(_) => "vmm",
            Item::Ports(_) => "ports",
            Item::Firewall(_) => "firewall",
            Item::Unknown { record, .. } => &record.resource,
        }
    }
}

/// The items of a recorded release.
pub fn items(r: &Release) -> impl Iterator<Item = Item> + '_ {
    r.items.iter().map(Item::from_record)
}

/// What a pending release keeps reserved: the tap names, guest addresses
/// and vsock CIDs its items name. An item this banger cannot read still
/// reserves what its record plainly names (a name is never handed out
/// again on a guess that the record meant nothing).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reserved {
    pub taps: Vec<String>,
    pub addresses: Vec<Ipv4Addr>,
    pub cids: Vec<u32>,
}

impl Reserved {
    pub fn of<'a>(releases: impl IntoIterator<Item = &'a Release>) -> Reserved {
        let mut out = Reserved::default();
        for item in releases.into_iter().flat_map(items) {
            match item {
                // A pod's tap is in the pod's namespace: no name of the
                // daemon's own is held by it.
                Item::Tap(t) if t.pod_netns.is_some() => {}
                Item::Tap(t) => out.taps.push(t.name),
                Item::Address(a) => out.addresses.extend(a.ip),
                Item::Vsock(v) => out.cids.extend(v.cid),
                Item::Unknown { record, .. } => {
                    let field = |k: &str| record.data.get(k).cloned();
                    match record.resource.as_str() {
                        "tap" => out
                            .taps
                            .extend(field("name").and_then(|v| v.as_str().map(String::from))),
                        "address" => out.addresses.extend(
                            field("ip")
                                .and_then(|v| v.as_str().and_then(|s| s.parse::<Ipv4Addr>().ok())),
                        ),
                        "vsock" => out.cids.extend(
                            field("cid")
                                .and_then(|v| v.as_u64())
                                .and_then(|c| u32::try_from(c).ok()),
                        ),
                        _ => {}
                    }
                }
                _ => {}
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rec(resource: &str, data: serde_json::Value) -> Held {
        Held {
            resource: resource.into(),
            data,
        }
    }

    /// Records as this and earlier daemons wrote them read back as their
    /// variant, and are written again unchanged.
    #[test]
    fn records_read_as_their_resource_and_round_trip() {
        let cases = [
            rec("address", json!({"ip": "172.30.0.6"})),
            rec("address", json!({"ip": null})),
            rec("vm_dir", json!({"dir": "/s/vms/a", "run": "/r/vms/a"})),
            rec("root_disk", json!({"paths": ["/s/vms/a/root.ext4"]})),
            rec("tap", json!({"name": "bgtap3", "host_ip": "172.30.0.5"})),
            rec("tap", json!({"name": "bgtap3", "host_ip": null})),
            rec("dns", json!({})),
            rec("volumes", json!({"names": ["v"]})),
            rec(
                "dm_snapshot",
                json!({"name": "banger-a", "image": "/i", "cow": "/c"}),
            ),
            rec(
                "jail",
                json!({"cgroup": ["/sys/fs/cgroup/x"], "volumes": [], "uid": 5, "jail": null, "image": "/i"}),
            ),
            rec("jail", json!({"cgroup": ["/sys/fs/cgroup/x"]})),
            rec(
                "vsock",
                json!({"cid": 7, "pid": 10, "start_time": 99, "paths": ["/r/v.sock"]}),
            ),
            rec(
                "virtiofs",
                json!({"procs": [{"pid": 3, "start_time": 4}], "paths": []}),
            ),
            rec("vmm", json!({"pid": 1, "start_time": 2, "sock": "/r/api"})),
            rec("vmm", json!({"sock": "/r/api"})),
            rec("ports", json!({"listeners": 2})),
            rec("firewall", json!({"vm_id": "abc"})),
        ];
        for h in cases {
            let item = Item::from_record(&h);
            assert!(!matches!(item, Item::Unknown { .. }), "{item:?}");
            assert_eq!(item.resource(), h.resource);
            let again = Item::from_record(&item.record());
            assert_eq!(again, item, "{h:?}");
        }
        let Item::Vmm(v) = Item::from_record(&rec("vmm", json!({"pid": 1, "start_time": 2})))
        else {
            panic!("vmm");
        };
        assert_eq!(
            v.process(),
            Some(ProcId {
                pid: 1,
                start_time: 2
            })
        );
    }

    /// A newer banger's resource, a misspelled key and a key this banger
    /// does not know are kept exactly as recorded, and say why.
    #[test]
    fn what_cannot_be_read_is_kept_and_says_why() {
        for (h, says) in [
            (rec("gpu", json!({"bus": 3})), "does not know (\"gpu\")"),
            (
                rec("tap", json!({"nmae": "bgtap1"})),
                "unknown field `nmae`",
            ),
            (
                rec("tap", json!({"name": "bgtap1", "mtu": 1500})),
                "unknown field `mtu`",
            ),
            (rec("address", json!({"ip": "not an ip"})), "\"address\""),
        ] {
            let item = Item::from_record(&h);
            let Item::Unknown { record, why } = &item else {
                panic!("{h:?} read as {item:?}");
            };
            assert_eq!(record, &h);
            assert_eq!(item.record(), h);
            assert!(why.contains(says), "{why}");
        }
    }

    /// Pending releases reserve what they name, readable or not.
    #[test]
    fn releases_reserve_what_they_name_even_unreadable() {
        let r = Release {
            id: 1,
            vm_id: "a".into(),
            vm_name: "a".into(),
            items: vec![
                rec("tap", json!({"name": "bgtap1", "host_ip": null})),
                rec("tap", json!({"name": "bgtap2", "colour": "red"})),
                rec("address", json!({"ip": "172.30.0.6"})),
                rec("address", json!({"ip": "172.30.0.10", "extra": 1})),
                rec("vsock", json!({"cid": 3, "pid": null, "start_time": null})),
                rec("vsock", json!({"cid": 4, "mystery": true})),
            ],
        };
        let got = Reserved::of([&r]);
        assert_eq!(got.taps, vec!["bgtap1", "bgtap2"]);
        assert_eq!(
            got.addresses,
            vec![Ipv4Addr::new(172, 30, 0, 6), Ipv4Addr::new(172, 30, 0, 10)]
        );
        assert_eq!(got.cids, vec![3, 4]);
    }

    /// An older banger's "nat" is the firewall now.
    #[test]
    fn nat_records_are_the_firewall() {
        let item = Item::from_record(&rec("nat", json!({"vm_id": "abc"})));
        assert_eq!(
            item,
            Item::Firewall(Firewall::Legacy(LegacyRules {
                vm_id: "abc".into()
            }))
        );
        assert_eq!(item.record().resource, "firewall");
    }
}
