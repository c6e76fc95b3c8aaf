//! Locks by name (a VM's name, a VM's id, an image's name): an entry
//! exists only while someone holds or waits for it, so a stream of
//! requests for names that never become VMs leaves nothing behind. A name
//! is held by one (`lock`) or shared by many (`lock_shared`: the VMs
//! created from an image while nobody rebuilds or removes it).

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

#[derive(Debug, Default)]
struct Slot {
    held: Mutex<Held>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct Held {
    one: bool,
    shared: usize,
}

#[derive(Debug, Default)]
pub struct KeyedLocks {
    map: Mutex<HashMap<String, Arc<Slot>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Held until dropped; the entry goes with the last holder or waiter.
#[derive(Debug)]
pub struct KeyGuard<'a> {
    locks: &'a KeyedLocks,
    key: String,
    slot: Arc<Slot>,
    shared: bool,
    /// False only for a `try_lock` that did not get the name.
    holds: bool,
}

impl KeyedLocks {
    pub fn lock(&self, key: &str) -> KeyGuard<'_> {
        self.take(key, false)
    }

    /// Held with any number of other shared holders, never with `lock`'s.
    pub fn lock_shared(&self, key: &str) -> KeyGuard<'_> {
        self.take(key, true)
    }

    /// [`KeyedLocks::lock`] if nobody holds the name now, else `None`
    /// (for a holder of other locks that must not wait on this one).
    pub fn try_lock(&self, key: &str) -> Option<KeyGuard<'_>> {
        let slot = lock(&self.map).entry(key.to_string()).or_default().clone();
        let mut held = lock(&slot.held);
        let free = !held.one && held.shared == 0;
        if free {
            held.one = true;
        }
        drop(held);
        // Not taken: a guard holding nothing, dropped at once, lets the
        // entry go if nobody else has it.
        let g = KeyGuard {
            locks: self,
            key: key.to_string(),
            slot,
            shared: false,
            holds: free,
        };
        free.then_some(g)
    }

    fn take(&self, key: &str, shared: bool) -> KeyGuard<'_> {
        let slot = lock(&self.map).entry(key.to_string()).or_default().clone();
        let mut held = lock(&slot.held);
        while held.one || (!shared && held.shared > 0) {
            held = slot.cv.wait(held).unwrap_or_else(PoisonError::into_inner);
        }
        if shared {
            held.shared += 1;
        } else {
            held.one = true;
        }
        drop(held);
        KeyGuard {
            locks: self,
            key: key.to_string(),
            slot,
            shared,
            holds: true,
        }
    }

    /// How many names have an entry (held or waited for).
    pub fn len(&self) -> usize {
        lock(&self.map).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        {
            let mut held = lock(&self.slot.held);
            match (self.holds, self.shared) {
                (false, _) => {}
                (true, true) => held.shared -= 1,
                (true, false) => held.one = false,
            }
        }
        self.slot.cv.notify_all();
        // Clones are taken under the map's lock, so a count of two (the
        // map's and ours) means nobody else holds or waits for it.
        let mut map = lock(&self.locks.map);
        if Arc::strong_count(&self.slot) == 2 {
            map.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[test]
    fn excludes_and_prunes() {
        let locks = Arc::new(KeyedLocks::default());
        let inside = Arc::new(AtomicU32::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (locks, inside) = (locks.clone(), inside.clone());
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        let _g = locks.lock("vm");
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two holders");
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(locks.is_empty(), "entries pruned");
        {
            let _a = locks.lock("a");
            let _b = locks.lock("b");
            assert_eq!(locks.len(), 2, "different names do not exclude");
        }
        assert!(locks.is_empty());
    }

    #[test]
    fn shared_holders_exclude_only_the_one() {
        let locks = Arc::new(KeyedLocks::default());
        let a = locks.lock_shared("img");
        let b = locks.lock_shared("img");
        let (tx, rx) = std::sync::mpsc::channel();
        let t = {
            let locks = locks.clone();
            std::thread::spawn(move || {
                let _one = locks.lock("img");
                tx.send(()).unwrap();
            })
        };
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(200))
                .is_err(),
            "taken while shared"
        );
        drop(a);
        drop(b);
        rx.recv().unwrap();
        t.join().unwrap();
        assert!(locks.is_empty());
    }

    #[test]
    fn try_lock_takes_only_a_free_name() {
        let locks = KeyedLocks::default();
        let a = locks.lock_shared("s");
        assert!(locks.try_lock("s").is_none());
        drop(a);
        assert!(locks.is_empty(), "a try that failed leaves no entry");
        let one = locks.try_lock("s").expect("free");
        assert!(locks.try_lock("s").is_none());
        drop(one);
        assert!(locks.is_empty());
        let _b = locks.lock_shared("s");
    }
}
