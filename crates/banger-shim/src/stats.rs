//! A container's numbers as containerd's cgroup v2 metrics: its cgroup's
//! in the guest (memory, CPU time, processes), or, before it has one, its
//! VM's (the VMM's CPU time, the guest's memory and processes).

use banger::client::{Client, ClientError};
use banger_agent::proto::CgroupSample;
use banger_core::api::{Request, Response};
use containerd_shim::protos::cgroups_v2::metrics::{CPUStat, MemoryStat, Metrics, PidsStat};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{Message, MessageField};

/// containerd (`ctr task metrics`, CRI) decodes by this type name.
const METRICS_V2: &str = "io.containerd.cgroups.v2.Metrics";

/// The metrics of a container in VM `vm`: its cgroup's in the guest when
/// there is one (`cgroup`), else the VM's.
pub fn of_vm(client: &Client, vm: &str, cgroup: Option<CgroupSample>) -> Result<Any, ClientError> {
    let r = client.call(
        Request::VmStats {
            name: Some(vm.to_string()),
        },
        &mut |_| {},
    )?;
    let s = match r {
        Response::Stats { stats } => stats
            .into_iter()
            .find(|s| s.name == vm)
            .ok_or_else(|| ClientError::Garbled(format!("no stats for vm {vm}")))?,
        other => return Err(ClientError::Garbled(format!("{other:?}"))),
    };
    let guest = s.guest.as_ref();
    if let Some(c) = cgroup {
        let limit = match c.memory_max {
            0 => guest.map(|g| g.mem_total_bytes).unwrap_or(0),
            m => m,
        };
        let m = Metrics {
            cpu: MessageField::some(CPUStat {
                usage_usec: c.cpu_usec,
                user_usec: c.cpu_user_usec,
                system_usec: c.cpu_system_usec,
                ..Default::default()
            }),
            memory: MessageField::some(MemoryStat {
                usage: c.memory_bytes,
                usage_limit: limit,
                ..Default::default()
            }),
            pids: MessageField::some(PidsStat {
                current: c.pids,
                ..Default::default()
            }),
            ..Default::default()
        };
        return any(&m);
    }
    let m = Metrics {
        cpu: MessageField::some(CPUStat {
            usage_usec: (s.cpu_secs * 1e6) as u64,
            ..Default::default()
        }),
        memory: MessageField::some(MemoryStat {
            usage: guest
                .map(|g| g.mem_total_bytes.saturating_sub(g.mem_available_bytes))
                .unwrap_or(s.rss_bytes),
            usage_limit: guest.map(|g| g.mem_total_bytes).unwrap_or(0),
            file: guest.map(|g| g.mem_cached_bytes).unwrap_or(0),
            ..Default::default()
        }),
        pids: MessageField::some(PidsStat {
            current: guest.map(|g| u64::from(g.processes)).unwrap_or(0),
            ..Default::default()
        }),
        ..Default::default()
    };
    any(&m)
}

fn any(m: &Metrics) -> Result<Any, ClientError> {
    let mut any = Any::new();
    any.type_url = METRICS_V2.to_string();
    any.value = m
        .write_to_bytes()
        .map_err(|e| ClientError::Garbled(format!("metrics: {e}")))?;
    Ok(any)
}
