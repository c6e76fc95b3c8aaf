//! The daemon's one way to run and stop a listener thread (a DNS
//! listener, a published port): the thread looks at its stop flag at
//! least once per tick; `stop` sets it, wakes the thread out of a blocking
//! wait (what that takes is the listener's: a socket shut for reading),
//! and joins it. Once `stop` returns, nothing of the listener runs and its
//! socket can be bound again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

#[derive(Debug)]
pub struct Worker {
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Worker {
    /// Runs `serve` on a thread named `name`, handing it the stop flag.
    pub fn spawn(
        name: String,
        serve: impl FnOnce(Arc<AtomicBool>) + Send + 'static,
    ) -> std::io::Result<Worker> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || serve(flag))?;
        Ok(Worker {
            stop,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Sets the flag, calls `wake`, and waits for the thread to end (not
    /// from the thread itself, which would wait forever). Idempotent.
    pub fn stop(&self, wake: impl FnOnce()) {
        self.stop.store(true, Ordering::SeqCst);
        wake();
        let t = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = t {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop(|| {});
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// `stop` returns only once the thread has ended, and twice is fine.
    #[test]
    fn stop_joins_the_thread() {
        let (tx, rx) = mpsc::channel();
        let w = Worker::spawn("t".into(), move |stop| {
            while !stop.load(Ordering::SeqCst) {
                std::thread::park_timeout(std::time::Duration::from_millis(5));
            }
            tx.send("ended").unwrap();
        })
        .unwrap();
        w.stop(|| {});
        assert_eq!(rx.try_recv(), Ok("ended"), "ended before stop returned");
        w.stop(|| {});
    }
}
