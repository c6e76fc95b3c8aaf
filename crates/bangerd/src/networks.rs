//! `banger network ls|share|unshare`: the `--network` names in use, and
//! who else may put VMs on one. A network is its first VM's creator's
//! for as long as it has VMs (`access::Caller::may_join`); its owner (or
//! root) may let other users join it too. The shares go with the
//! network: when its last VM goes, the next to start one owns it anew,
//! shared with nobody.

use banger_core::api::NetworkInfo;
use banger_store::Owned;

use crate::access::Caller;
use crate::daemon::Daemon;
use crate::error::{DaemonError, Result};

impl Daemon {
    /// Every network that has VMs, by name.
    pub fn list_networks(&self) -> Result<Vec<NetworkInfo>> {
        let store = self.store();
        let mut by_name: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for vm in store.list_vms()? {
            if let Some(n) = vm.spec.net.network {
                by_name.entry(n).or_default().push(vm.name);
            }
        }
        by_name
            .into_iter()
            .map(|(name, mut vms)| {
                vms.sort();
                Ok(NetworkInfo {
                    owner: store.owner(Owned::Network, &name)?.uid,
                    shared_with: store.shared_with(Owned::Network, &name)?,
                    name,
                    vms,
                })
            })
            .collect()
    }

    /// Lets `user` (a name or a uid) join network `name`, or no longer
    /// (`share` false; its VMs already there stay). Its owner or root
    /// only, and only while it has VMs (a network without is anyone's).
    pub fn share_network(
        &self,
        name: &str,
        user: &str,
        share: bool,
        caller: &Caller,
    ) -> Result<NetworkInfo> {
        banger_core::validate_name(name)
            .map_err(|e| DaemonError::Invalid(format!("network {name:?}: {e}")))?;
        let uid = uid_of(user)?;
        // Under the network lock: no VM joins in between (one may leave:
        // a share row of a network that became free grants nothing, and
        // the next claim forgets it).
        let _n = crate::daemon::lock(&self.net_lock);
        let mut net = self
            .list_networks()?
            .into_iter()
            .find(|n| n.name == name)
            .ok_or_else(|| {
                DaemonError::Invalid(format!(
                    "network {name:?} has no VMs: it is nobody's (whoever puts a VM on it owns \
                     it); nothing to share"
                ))
            })?;
        if !caller.is_root() && caller.uid != net.owner {
            return Err(DaemonError::Invalid(format!(
                "network {name:?} is uid {}'s, not yours (uid {}): only its owner or root \
                 shares it",
                net.owner, caller.uid
            )));
        }
        let store = self.store();
        if share {
            // Its owner and root join it anyway.
            if uid != net.owner && uid != 0 {
                store.share(Owned::Network, name, uid)?;
            }
        } else if !store.unshare(Owned::Network, name, uid)? {
            return Err(DaemonError::Invalid(format!(
                "network {name:?} is not shared with {user} (uid {uid}): `banger network ls` \
                 says with whom it is"
            )));
        }
        net.shared_with = store.shared_with(Owned::Network, name)?;
        Ok(net)
    }
}

/// A user named by name or uid, who must exist on this host.
fn uid_of(user: &str) -> Result<u32> {
    let found = match user.parse::<u32>() {
        Ok(uid) => nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)),
        Err(_) => nix::unistd::User::from_name(user),
    };
    match found {
        Ok(Some(u)) => Ok(u.uid.as_raw()),
        Ok(None) => Err(DaemonError::Invalid(format!(
            "no user {user:?} on this host: give a user name or uid (`getent passwd`)"
        ))),
        Err(e) => Err(DaemonError::Invalid(format!("user {user:?}: {e}"))),
    }
}
