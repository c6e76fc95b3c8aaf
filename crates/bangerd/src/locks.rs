//! Locks by name (a VM's name, a VM's id): an entry exists only while
//! someone holds or waits for it, so a stream of requests for names that
//! never become VMs leaves nothing behind.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

#[derive(Debug, Default)]
struct Slot {
    held: Mutex<bool>,
    cv: Condvar,
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
}

impl KeyedLocks {
    pub fn lock(&self, key: &str) -> KeyGuard<'_> {
        let slot = lock(&self.map).entry(key.to_string()).or_default().clone();
        let mut held = lock(&slot.held);
        while *held {
            held = slot.cv.wait(held).unwrap_or_else(PoisonError::into_inner);
        }
        *held = true;
        drop(held);
        KeyGuard {
            locks: self,
            key: key.to_string(),
            slot,
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
        *lock(&self.slot.held) = false;
        self.slot.cv.notify_one();
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
}
