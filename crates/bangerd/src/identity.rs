//! A running guest given its VM's identity again, through its agent: what
//! a guest restored from another VM's snapshot needs before it counts as
//! this VM (ARCHITECTURE.md, "Network identity of clones"). Everything the
//! config archive told the guest at boot is sent once more, from the VM's
//! own record: hostname, MAC, address and route, nameservers, root's
//! authorized keys, the sshd host key; and what every clone of one
//! snapshot would otherwise share: a new machine id, a new boot id, and
//! entropy from the host, credited to the guest's pool and its CRNG
//! reseeded (or two clones draw the same "random" numbers).

use std::time::Duration;

use banger_agent::proto::{Call, Identity, Msg};
use banger_core::api::VmInfo;
use banger_core::net::GUEST_PREFIX;
use banger_core::VmState;

use crate::daemon::{lock, random_bytes, random_hex, Daemon};
use crate::error::{DaemonError, Result};

/// How long the guest may take to apply it (an sshd restart included).
pub(crate) const IDENTITY_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes of host entropy a guest is given.
const ENTROPY_BYTES: usize = 64;

impl Daemon {
    /// Re-identifies the running VM `name` (`banger internal reidentify`;
    /// the restore of a snapshot will do it before the clone counts as
    /// running).
    pub fn reidentify(&self, name: &str) -> Result<VmInfo> {
        let _g = self.lock_vm(name)?;
        let vm = self.find(name)?;
        if vm.runtime.state() != VmState::Running {
            return Err(DaemonError::Invalid(format!(
                "vm {name:?} is {}: only a running VM's guest can be re-identified (`banger vm \
                 start {name}`)",
                vm.runtime.state()
            )));
        }
        self.apply_identity(&vm, IDENTITY_TIMEOUT)?;
        Ok(self.info(&vm))
    }

    /// Gives `vm`'s guest its identity (the VM's lock held), the whole
    /// exchange within `within`.
    pub(crate) fn apply_identity(
        &self,
        vm: &banger_core::VmRecord,
        within: Duration,
    ) -> Result<()> {
        let name = &vm.name;
        let nameserver = lock(&self.dns.vms)
            .contains_key(&vm.id)
            .then(|| {
                self.guest_net(vm)
                    .map(|n| std::net::SocketAddr::from((n.host_ip, 53)))
            })
            .transpose()?;
        let boot_id = random_hex(8)?;
        let cfg = crate::resources::initrd::guest_config(&self.host(), vm, &boot_id, nameserver)?;
        let entropy = random_bytes(ENTROPY_BYTES)?;
        let id = Identity {
            hostname: Some(cfg.hostname.clone()),
            address: Some((
                format!("{}/{GUEST_PREFIX}", cfg.guest_ip),
                cfg.gateway.to_string(),
            )),
            host_key: Some((cfg.host_key.clone(), cfg.host_key_pub.clone())),
            mac: Some(cfg.mac.clone()),
            // What the boot's resolv.conf holds (the gateway when the host
            // has no resolver a guest can reach), at most the three a
            // resolver reads.
            nameservers: Some(
                cfg.resolv_conf()
                    .lines()
                    .filter_map(|l| l.strip_prefix("nameserver "))
                    .take(3)
                    .map(str::to_string)
                    .collect(),
            ),
            authorized_keys: Some(cfg.authorized_keys.clone()),
            machine_id: Some(random_hex(16)?),
            entropy: Some(entropy),
            boot_id: Some(boot_id),
        };
        let t = std::time::Instant::now();
        let answer = self.agent_call(vm, Call::SetIdentity(id), within);
        tracing::debug!(vm = %name, ms = t.elapsed().as_millis() as u64, "identity: the agent's call");
        match answer? {
            Msg::Done => Ok(()),
            other => Err(DaemonError::Invalid(format!(
                "vm {name:?}: the guest agent did not take its identity: {}",
                banger_core::text::escape_control(&format!("{other:?}"), false)
                    .chars()
                    .take(300)
                    .collect::<String>()
            ))),
        }
    }
}
