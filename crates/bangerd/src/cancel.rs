//! Cancelling a boot in progress: `vm kill`, `vm delete`, and a `vm run
//! --rm` client that goes away each set the boot's token; the boot checks
//! it between its steps and while it waits for the guest, and rolls back.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

#[derive(Debug, Default)]
struct Flag {
    set: Mutex<bool>,
    cv: Condvar,
}

#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<Flag>);

impl Cancel {
    pub fn cancel(&self) {
        *self.0.set.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.0.cv.notify_all();
    }

    pub fn is_cancelled(&self) -> bool {
        *self.0.set.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until cancelled or `timeout` passed; returns whether cancelled.
    pub fn wait(&self, timeout: Duration) -> bool {
        let set = self.0.set.lock().unwrap_or_else(PoisonError::into_inner);
        let (set, _) = self
            .0
            .cv
            .wait_timeout_while(set, timeout, |set| !*set)
            .unwrap_or_else(PoisonError::into_inner);
        *set
    }
}

/// The boots in progress, by VM name.
#[derive(Debug, Default)]
pub struct Boots {
    map: Mutex<HashMap<String, Cancel>>,
}

/// Unregisters its boot when dropped.
#[derive(Debug)]
pub struct BootGuard<'a> {
    boots: &'a Boots,
    name: String,
    token: Cancel,
}

impl Boots {
    pub fn register(&self, name: &str, token: Cancel) -> BootGuard<'_> {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_string(), token.clone());
        BootGuard {
            boots: self,
            name: name.to_string(),
            token,
        }
    }

    /// Cancels the boot of `name`, if one is in progress.
    pub fn cancel(&self, name: &str) -> bool {
        match self
            .map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
        {
            Some(t) => {
                t.cancel();
                true
            }
            None => false,
        }
    }
}

impl Drop for BootGuard<'_> {
    fn drop(&mut self) {
        let mut map = self
            .boots
            .map
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if map
            .get(&self.name)
            .is_some_and(|t| Arc::ptr_eq(&t.0, &self.token.0))
        {
            map.remove(&self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancels_only_registered_boots() {
        let boots = Boots::default();
        assert!(!boots.cancel("a"));
        let t = Cancel::default();
        {
            let _g = boots.register("a", t.clone());
            assert!(!t.is_cancelled());
            assert!(!t.wait(Duration::from_millis(1)));
            assert!(boots.cancel("a"));
            assert!(t.is_cancelled());
            assert!(t.wait(Duration::from_secs(60)), "returns at once once set");
        }
        assert!(!boots.cancel("a"), "unregistered on drop");
    }
}
