//! E2B's REST API (`api.e2b.app`'s), on banger's VMs: create, connect
//! and resume, kill, timeout, info, list, pause, as the SDKs call them
//! (`POST /v2/sandboxes` and the older `POST /sandboxes` alike). Errors
//! are E2B's `{code, message}`; a failed create says not to retry.

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::sync::Arc;

use banger_core::api::{CreateVm, Request as Op};
use banger_core::{AutoStop, TtlAction, VmRecord, VmState};
use serde::Deserialize;
use serde_json::{json, Value};

use super::http::{self, Request};
use super::Fault;
use crate::access::Caller;
use crate::daemon::Daemon;

/// The envd version reported: the highest whose features all work here.
pub const ENVD_VERSION: &str = "0.6.4";
/// A sandbox's timeout at most (E2B's: a day).
const TIMEOUT_MAX: u64 = 86_400;

/// Answers `f` as E2B does (`close`: and ends the connection).
pub fn fault(w: &mut TcpStream, f: &Fault, close: bool) -> std::io::Result<()> {
    let body = json!({"code": f.status, "message": f.message}).to_string();
    let mut headers = vec![("Content-Type", "application/json")];
    if f.status >= 500 {
        // (The SDKs retry 502-504 unless told not to.)
        headers.push(("Should-Retry", "false"));
    }
    if close {
        headers.push(("Connection", "close"));
    }
    http::respond(w, f.status, &headers, body.as_bytes())
}

fn json_ok(w: &mut TcpStream, status: u16, v: &Value) -> std::io::Result<()> {
    http::respond(
        w,
        status,
        &[("Content-Type", "application/json")],
        v.to_string().as_bytes(),
    )
}

/// One REST request of `caller`'s: whether the connection goes on.
pub fn handle(
    d: &Arc<Daemon>,
    caller: &Caller,
    key: &super::Key,
    req: &Request,
    w: &mut TcpStream,
) -> std::io::Result<bool> {
    let parts: Vec<&str> = req.path.trim_matches('/').split('/').collect();
    let m = req.method.as_str();
    if m == "GET" && matches!(parts.as_slice(), ["sandboxes"] | ["v2", "sandboxes"]) {
        // A page, and the next one's token in a header.
        match list(d, caller, req, parts.len() == 2) {
            Ok((page, next)) => http::respond(
                w,
                200,
                &[
                    ("Content-Type", "application/json"),
                    ("x-next-token", &next),
                ],
                page.to_string().as_bytes(),
            )?,
            Err(f) => fault(w, &f, false)?,
        }
        return Ok(true);
    }
    let r = match (m, parts.as_slice()) {
        ("GET", ["sandboxes", "metrics"]) => many_metrics(d, caller, req).map(|v| (200, Some(v))),
        ("GET", ["sandboxes", id, "metrics"]) => vm_of(d, caller, id)
            .and_then(|vm| metrics(d, &vm, req))
            .map(|v| (200, Some(v))),
        ("POST", ["sandboxes"]) => create(d, caller, key, req, false).map(|v| (201, Some(v))),
        ("POST", ["v2", "sandboxes"]) => create(d, caller, key, req, true).map(|v| (201, Some(v))),
        ("GET", ["sandboxes", id]) => vm_of(d, caller, id)
            .and_then(|vm| detail(d, &vm, Some(key)))
            .map(|v| (200, Some(v))),
        ("DELETE", ["sandboxes", id]) => kill(d, caller, id).map(|()| (204, None)),
        ("POST", ["sandboxes", id, "timeout"]) => {
            let secs = body::<Timeout>(req).and_then(|t| timeout_of(Some(t.timeout), 0));
            secs.and_then(|s| set_timeout(d, caller, id, s))
                .map(|()| (204, None))
        }
        ("POST", ["sandboxes", id, "refreshes"]) => {
            let secs = body::<Refresh>(req).map(|r| r.duration.unwrap_or(60).min(3600));
            secs.and_then(|s| extend(d, caller, id, s))
                .map(|()| (204, None))
        }
        ("POST", ["sandboxes", id, "pause"]) => pause(d, caller, id).map(|()| (204, None)),
        ("POST", ["sandboxes", id, "resume"]) => connect(d, caller, key, req, id, true),
        ("POST", ["sandboxes", id, "connect"]) | ("POST", ["v2", "sandboxes", id, "connect"]) => {
            connect(d, caller, key, req, id, false)
        }
        _ => Err(Fault::new(
            404,
            format!("{m} {}: not a route of this API", req.path),
        )),
    };
    match r {
        Ok((status, Some(v))) => json_ok(w, status, &v)?,
        Ok((status, None)) => http::respond(w, status, &[], b"")?,
        Err(f) => fault(w, &f, false)?,
    }
    Ok(true)
}

fn body<T: for<'a> Deserialize<'a>>(req: &Request) -> Result<T, Fault> {
    let b: &[u8] = if req.body.is_empty() {
        b"{}"
    } else {
        &req.body
    };
    serde_json::from_slice(b).map_err(|e| Fault::new(400, format!("request body: {e}")))
}

#[derive(Deserialize)]
struct Timeout {
    timeout: u64,
}

#[derive(Deserialize)]
struct Refresh {
    duration: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Connect {
    timeout: Option<u64>,
}

/// `NewSandboxV2` (and the older `NewSandbox`): what banger honours, and
/// what it refuses rather than ignore.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewSandbox {
    #[serde(rename = "templateID")]
    template_id: Option<String>,
    timeout: Option<u64>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    #[serde(default)]
    env_vars: BTreeMap<String, String>,
    #[serde(rename = "allow_internet_access")]
    allow_internet_access: Option<bool>,
    auto_pause: Option<bool>,
    network: Option<Value>,
    mcp: Option<Value>,
    volume_mounts: Option<Vec<Value>>,
}

/// A timeout in seconds: given, or the default, bounded.
fn timeout_of(t: Option<u64>, default: u64) -> Result<u64, Fault> {
    let t = t.unwrap_or(default);
    if t == 0 || t > TIMEOUT_MAX {
        return Err(Fault::new(
            400,
            format!("timeout {t}: 1 to {TIMEOUT_MAX} seconds"),
        ));
    }
    Ok(t)
}

fn create(
    d: &Arc<Daemon>,
    caller: &Caller,
    key: &super::Key,
    req: &Request,
    v2: bool,
) -> Result<Value, Fault> {
    let n: NewSandbox = body(req)?;
    let unsupported = [
        ("network", n.network.as_ref().is_some_and(|v| !v.is_null())),
        ("mcp", n.mcp.as_ref().is_some_and(|v| !v.is_null())),
        (
            "volumeMounts",
            n.volume_mounts.as_ref().is_some_and(|v| !v.is_empty()),
        ),
    ];
    if let Some((what, _)) = unsupported.iter().find(|(_, set)| *set) {
        return Err(Fault::new(
            400,
            format!("{what}: banger's sandboxes do not take it (leave it out)"),
        ));
    }
    // E2B's defaults: 300 s on /v2/sandboxes, 15 s on the older route.
    let ttl = timeout_of(n.timeout, if v2 { 300 } else { 15 })?;
    let image = match n.template_id.as_deref() {
        None | Some("base") => None,
        Some(t) => Some(t.to_string()),
    };
    let c = CreateVm {
        name: None,
        image,
        size: Default::default(),
        vmm: None,
        start: true,
        rm: false,
        auto_stop: AutoStop {
            ttl_secs: Some(ttl),
            idle_secs: None,
            at_ttl: if n.auto_pause == Some(true) {
                TtlAction::Pause
            } else {
                TtlAction::Delete
            },
        },
        net: banger_core::NetPolicy {
            none: n.allow_internet_access == Some(false),
            ..Default::default()
        },
        volumes: Vec::new(),
        root_mib: None,
        mounts: Vec::new(),
        from: None,
        cold: false,
        metadata: n.metadata,
        env: n.env_vars.into_iter().collect(),
    };
    let c = match crate::server::vouch(d, Op::VmCreate(Box::new(c)), caller) {
        Ok(Op::VmCreate(c)) => c,
        Ok(_) => return Err(Fault::new(500, "create changed its kind")),
        Err(e) => return Err(e.into()),
    };
    let info = d
        .create_for(
            &c,
            caller,
            None,
            &mut |_| {},
            crate::cancel::Cancel::default(),
        )
        .map_err(Fault::from)?;
    let vm = d.find(&info.name).map_err(Fault::from)?;
    sandbox(d, &vm, key)
}

/// The VM a sandbox ID names, if the caller may use it.
fn vm_of(d: &Daemon, caller: &Caller, id: &str) -> Result<VmRecord, Fault> {
    let not_found = || Fault::new(404, format!("sandbox {id:?} not found"));
    if banger_core::validate_name(id).is_err() {
        return Err(not_found());
    }
    let vm = match d.find(id) {
        Ok(vm) => vm,
        Err(crate::error::DaemonError::VmNotFound(_)) => return Err(not_found()),
        Err(e) => return Err(e.into()),
    };
    caller
        .may_use_in(&d.store(), &vm)
        .map_err(|_| not_found())?;
    Ok(vm)
}

/// E2B's state of a VM: running, paused, or none (a stopped VM is no
/// sandbox).
fn state_of(vm: &VmRecord) -> Option<&'static str> {
    match vm.runtime.shown_state() {
        VmState::Running => Some("running"),
        VmState::Paused | VmState::Suspended => Some("paused"),
        _ => None,
    }
}

/// The `Sandbox` of a create, connect or resume.
fn sandbox(d: &Daemon, vm: &VmRecord, key: &super::Key) -> Result<Value, Fault> {
    Ok(json!({
        "templateID": vm.spec.image,
        "alias": vm.spec.image,
        "sandboxID": vm.name,
        "clientID": "banger",
        "envdVersion": ENVD_VERSION,
        "envdAccessToken": super::access_token(d, &vm.name, key).map_err(Fault::from)?,
        "domain": null,
    }))
}

/// `SandboxDetail` (with the token of `key`), or `ListedSandbox`.
fn detail(d: &Daemon, vm: &VmRecord, key: Option<&super::Key>) -> Result<Value, Fault> {
    let state =
        state_of(vm).ok_or_else(|| Fault::new(404, format!("sandbox {:?} not found", vm.name)))?;
    let started = vm.runtime.started_at.unwrap_or(vm.created_at);
    let end = vm
        .spec
        .auto_stop
        .ttl_secs
        .map_or(started + TIMEOUT_MAX as i64 * 365, |t| started + t as i64);
    let mut v = json!({
        "templateID": vm.spec.image,
        "alias": vm.spec.image,
        "sandboxID": vm.name,
        "clientID": "banger",
        "startedAt": super::rfc3339(started),
        "endAt": super::rfc3339(end),
        "envdVersion": ENVD_VERSION,
        "cpuCount": vm.spec.sizing.cpus,
        "memoryMB": vm.spec.sizing.memory_mib,
        "diskSizeMB": vm.spec.sizing.disk_mib,
        "state": state,
        "metadata": vm.spec.metadata,
        "allowInternetAccess": !vm.spec.net.none,
    });
    if let Some(key) = key {
        v["envdAccessToken"] = json!(super::access_token(d, &vm.name, key).map_err(Fault::from)?);
    }
    Ok(v)
}

/// A `SandboxMetric` of a running sandbox, now: the guest's own numbers
/// (memory, page cache and root filesystem from its agent), CPU as the
/// host sees its VMM (its share of the sandbox's vCPUs over the poller's
/// last interval). A guest that does not answer in time gets the host's
/// view of memory (its cgroup's use) and disk (its files' blocks) and
/// the sizes it was given. `None` when it is not running.
fn metric_of(d: &Daemon, vm: &VmRecord) -> Option<Value> {
    let s = d.vm_stats(Some(&vm.name)).ok()?.into_iter().next()?;
    let cpus = vm.spec.sizing.cpus.max(1);
    let mib = 1024 * 1024;
    let (mem_used, mem_total, mem_cache, disk_used, disk_total) = match &s.guest {
        Some(g) if g.disk_total_bytes > 0 => (
            g.mem_total_bytes.saturating_sub(g.mem_available_bytes),
            g.mem_total_bytes,
            g.mem_cached_bytes,
            g.disk_used_bytes,
            g.disk_total_bytes,
        ),
        _ => (
            s.cgroup_memory_bytes,
            vm.spec.sizing.memory_mib.saturating_mul(mib),
            0,
            s.disk_bytes,
            vm.spec.sizing.disk_mib.saturating_mul(mib),
        ),
    };
    let now = banger_core::unix_now();
    let pct = (s.cpu_percent / f64::from(cpus)).clamp(0.0, 100.0);
    Some(json!({
        "timestamp": super::rfc3339(now),
        "timestampUnix": now,
        "cpuCount": cpus,
        "cpuUsedPct": (pct * 100.0).round() / 100.0,
        "memUsed": mem_used,
        "memTotal": mem_total,
        "memCache": mem_cache,
        "diskUsed": disk_used,
        "diskTotal": disk_total,
    }))
}

/// `GET /sandboxes/{id}/metrics`: banger keeps no history, so the series
/// is the one sample of now, if it falls within `start`..`end` (Unix
/// seconds) and the sandbox runs.
fn metrics(d: &Daemon, vm: &VmRecord, req: &Request) -> Result<Value, Fault> {
    let bound = |name: &str| -> Result<Option<i64>, Fault> {
        req.param(name)
            .map(|v| {
                v.parse::<i64>()
                    .map_err(|_| Fault::new(400, format!("{name} {v:?}: not Unix seconds")))
            })
            .transpose()
    };
    let (start, end) = (bound("start")?, bound("end")?);
    let now = banger_core::unix_now();
    if start.is_some_and(|s| s > now) || end.is_some_and(|e| e < now) {
        return Ok(json!([]));
    }
    Ok(Value::Array(metric_of(d, vm).into_iter().collect()))
}

/// `GET /sandboxes/metrics?sandbox_ids=a,b`: the latest metric of each
/// named sandbox the caller may use and that runs (at most 100). The
/// guests are asked [`METRICS_AT_ONCE`] at a time (each within a second),
/// no new round begins after [`METRICS_WITHIN`]: those not asked by then
/// are left out, as a sandbox without a sample is.
fn many_metrics(d: &Daemon, caller: &Caller, req: &Request) -> Result<Value, Fault> {
    const METRICS_AT_ONCE: usize = 16;
    const METRICS_WITHIN: std::time::Duration = std::time::Duration::from_secs(3);
    let mut ids: Vec<&str> = req
        .param("sandbox_ids")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    if ids.len() > 100 {
        return Err(Fault::new(
            400,
            format!("{} sandbox IDs: ask for at most 100 at once", ids.len()),
        ));
    }
    // One the caller may not see is left out, as an unknown one.
    let vms: Vec<VmRecord> = ids
        .iter()
        .filter_map(|id| vm_of(d, caller, id).ok())
        .collect();
    let until = std::time::Instant::now() + METRICS_WITHIN;
    let mut out = serde_json::Map::new();
    for chunk in vms.chunks(METRICS_AT_ONCE) {
        if std::time::Instant::now() >= until {
            break;
        }
        std::thread::scope(|s| {
            let asked: Vec<_> = chunk
                .iter()
                .filter_map(|vm| {
                    std::thread::Builder::new()
                        .name("e2b-metrics".into())
                        .spawn_scoped(s, move || metric_of(d, vm))
                        .ok()
                        .map(|h| (vm, h))
                })
                .collect();
            for (vm, h) in asked {
                if let Ok(Some(m)) = h.join() {
                    out.insert(vm.name.clone(), m);
                }
            }
        });
    }
    Ok(json!({ "sandboxes": out }))
}

fn kill(d: &Daemon, caller: &Caller, id: &str) -> Result<(), Fault> {
    let vm = vm_of(d, caller, id)?;
    crate::server::vouch(
        d,
        Op::VmDelete {
            name: vm.name.clone(),
            force: true,
        },
        caller,
    )
    .map_err(Fault::from)?;
    d.delete_checked(&vm.name, true).map_err(Fault::from)
}

/// The sandbox expires `secs` from now.
fn set_timeout(d: &Daemon, caller: &Caller, id: &str, secs: u64) -> Result<(), Fault> {
    let vm = vm_of(d, caller, id)?;
    d.set_ttl_from_now(&vm.name, secs, false)
        .map_err(Fault::from)
}

/// The sandbox lives at least `secs` from now (an older keep-alive).
fn extend(d: &Daemon, caller: &Caller, id: &str, secs: u64) -> Result<(), Fault> {
    let vm = vm_of(d, caller, id)?;
    d.set_ttl_from_now(&vm.name, secs, true)
        .map_err(Fault::from)
}

fn pause(d: &Daemon, caller: &Caller, id: &str) -> Result<(), Fault> {
    let vm = vm_of(d, caller, id)?;
    if state_of(&vm) == Some("paused") {
        return Err(Fault::new(409, format!("sandbox {id:?} is paused already")));
    }
    state_of(&vm).ok_or_else(|| Fault::new(404, format!("sandbox {id:?} not found")))?;
    // Its memory given back where it can be snapshotted, else its vCPUs
    // stopped (everything kept).
    let to_disk =
        crate::snapshots::refusal(&d.host(), &vm, false).is_none() && vm.spec.volumes.is_empty();
    crate::server::vouch(
        d,
        Op::VmPause {
            name: vm.name.clone(),
            to_disk,
        },
        caller,
    )
    .map_err(Fault::from)?;
    if to_disk {
        d.suspend(&vm.name).map(drop).map_err(Fault::from)
    } else {
        d.pause(&vm.name).map(drop).map_err(Fault::from)
    }
}

/// Connect (or the older resume, `strict`: 409 when it runs): a paused
/// sandbox is resumed (201), a running one's timeout extended when one
/// is given (200).
fn connect(
    d: &Daemon,
    caller: &Caller,
    key: &super::Key,
    req: &Request,
    id: &str,
    strict: bool,
) -> Result<(u16, Option<Value>), Fault> {
    let c: Connect = body(req)?;
    let timeout = c.timeout.map(|t| timeout_of(Some(t), 0)).transpose()?;
    let vm = vm_of(d, caller, id)?;
    let (status, resumed) = match state_of(&vm) {
        Some("running") if strict => {
            return Err(Fault::new(409, format!("sandbox {id:?} is running")));
        }
        Some("running") => (200, false),
        Some(_) => {
            crate::server::vouch(
                d,
                Op::VmResume {
                    name: vm.name.clone(),
                },
                caller,
            )
            .map_err(Fault::from)?;
            // Its time set before it runs (an old one that ran out would
            // pause it again at once), and again after (a resume from
            // disk starts its clock afresh).
            let t = timeout.unwrap_or(300);
            d.set_ttl_from_now(&vm.name, t, false)
                .map_err(Fault::from)?;
            d.resume(&vm.name).map_err(Fault::from)?;
            (201, true)
        }
        None => return Err(Fault::new(404, format!("sandbox {id:?} not found"))),
    };
    // A resumed sandbox gets its time afresh (its old one may have run
    // out: that is what paused it); a running one's is only extended.
    match (timeout, resumed) {
        (Some(t), _) => d.set_ttl_from_now(&vm.name, t, !resumed),
        (None, true) => d.set_ttl_from_now(&vm.name, 300, false),
        (None, false) => Ok(()),
    }
    .map_err(Fault::from)?;
    let vm = d.find(&vm.name).map_err(Fault::from)?;
    Ok((status, Some(sandbox(d, &vm, key)?)))
}

/// `GET /v2/sandboxes` (and the older `GET /sandboxes`: running ones, one
/// page): the caller's sandboxes, filtered by metadata and state, a page
/// at a time (the next page's token in `x-next-token`).
fn list(d: &Daemon, caller: &Caller, req: &Request, v2: bool) -> Result<(Value, String), Fault> {
    let vms: Vec<VmRecord> = {
        let store = d.store();
        store
            .list_vms()
            .map_err(|e| Fault::new(500, e.to_string()))?
            .into_iter()
            .filter(|vm| caller.may_use_in(&store, vm).is_ok())
            .collect()
    };
    let want_meta = req
        .param("metadata")
        .map(metadata_filter)
        .unwrap_or_default();
    let states: Vec<String> = if v2 {
        req.query
            .iter()
            .filter(|(k, _)| k == "state")
            .flat_map(|(_, v)| v.split(','))
            .map(str::to_string)
            .collect()
    } else {
        vec!["running".into()]
    };
    let mut found: Vec<&VmRecord> = vms
        .iter()
        .filter(|vm| match state_of(vm) {
            Some(s) => states.is_empty() || states.iter().any(|w| w == s),
            None => false,
        })
        .filter(|vm| {
            want_meta
                .iter()
                .all(|(k, v)| vm.spec.metadata.get(k) == Some(v))
        })
        .collect();
    found.sort_by_key(|vm| {
        (
            vm.runtime.started_at.unwrap_or(vm.created_at),
            vm.name.clone(),
        )
    });
    if req.param("order") == Some("desc") {
        found.reverse();
    }
    let limit: usize = req
        .param("limit")
        .map(|l| {
            l.parse()
                .map_err(|_| Fault::new(400, format!("limit {l:?}")))
        })
        .transpose()?
        .unwrap_or(100)
        .clamp(1, 100);
    let from: usize = req
        .param("nextToken")
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse()
                .map_err(|_| Fault::new(400, format!("nextToken {t:?}")))
        })
        .transpose()?
        .unwrap_or(0);
    let page: Vec<Value> = found
        .iter()
        .skip(from)
        .take(if v2 { limit } else { usize::MAX })
        .map(|vm| detail(d, vm, None))
        .collect::<Result<_, _>>()?;
    let next = from + page.len();
    let token = if v2 && next < found.len() {
        next.to_string()
    } else {
        String::new()
    };
    Ok((Value::Array(page), token))
}

/// The `metadata` query value, decoded as the SDKs encode it: a form of
/// pairs whose keys and values were percent-encoded once more.
fn metadata_filter(v: &str) -> Vec<(String, String)> {
    http::parse_query(v)
        .into_iter()
        .map(|(k, v)| (http::percent_decode(&k), http::percent_decode(&v)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metadata_filter_is_decoded_twice() {
        // `{"k": "v w", "a": "1=2&3"}` as the Python SDK sends it, after
        // the query's own decoding.
        let f = metadata_filter("k=v%2520w&a=1%253D2%25263");
        assert_eq!(
            f,
            vec![("k".into(), "v w".into()), ("a".into(), "1=2&3".into())]
        );
    }

    #[test]
    fn timeouts_are_bounded() {
        assert_eq!(timeout_of(None, 300).unwrap(), 300);
        assert!(timeout_of(Some(0), 300).is_err());
        assert!(timeout_of(Some(TIMEOUT_MAX + 1), 300).is_err());
    }
}
