//! A container's VM, held as `vm run --rm` holds one: made by bangerd
//! (as any other VM: listed, limited, confined, reconciled) for as long as
//! the shim keeps the create's connection open. Letting go of it, or the
//! shim dying, makes the daemon delete the VM and everything it held.

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use banger::client::{Client, ClientError};
use banger_core::api::{CreateVm, Request, Response, VmInfo};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum VmError {
    #[error("vm {name}: {source}")]
    Daemon { name: String, source: ClientError },
    #[error("vm {name}: not up within {secs} s")]
    Slow { name: String, secs: u64 },
    #[error("vm {name}: the daemon answered {answer} instead of booting it")]
    Unexpected { name: String, answer: String },
}

/// How long a boot may take (TCG on a busy host takes seconds).
const BOOT_WITHIN: Duration = Duration::from_secs(300);
/// How long the daemon may take to delete it once let go.
const DELETE_WITHIN: Duration = Duration::from_secs(60);

pub struct Lease {
    pub vm: VmInfo,
    release: Option<mpsc::Sender<()>>,
    done: Option<JoinHandle<Result<Response, ClientError>>>,
    done_rx: mpsc::Receiver<()>,
}

/// Boots `req` (an `rm` create) and holds it.
pub fn boot(client: &Client, req: CreateVm) -> Result<Lease, VmError> {
    let name = req.name.clone().unwrap_or_default();
    let (ready_tx, ready_rx) = mpsc::channel::<Result<VmInfo, VmError>>();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let client = client.clone();
    let thread_name = name.clone();
    let done = std::thread::spawn(move || {
        let ready = ready_tx.clone();
        let (used, r) =
            client.call_lease(Request::VmCreate(Box::new(req)), &mut |_| {}, move |vm| {
                let _ = ready.send(Ok(vm.clone()));
                // Held until let go (or the shim goes).
                let _ = release_rx.recv();
            });
        if used.is_none() {
            let e = match r {
                Err(source) => VmError::Daemon {
                    name: thread_name,
                    source,
                },
                Ok(answer) => VmError::Unexpected {
                    name: thread_name,
                    answer: format!("{answer:?}"),
                },
            };
            let _ = ready_tx.send(Err(e));
            let _ = done_tx.send(());
            return Err(ClientError::Garbled("no VM".into()));
        }
        let _ = done_tx.send(());
        r
    });
    match ready_rx.recv_timeout(BOOT_WITHIN) {
        Ok(Ok(vm)) => Ok(Lease {
            vm,
            release: Some(release_tx),
            done: Some(done),
            done_rx,
        }),
        Ok(Err(e)) => Err(e),
        Err(_) => {
            // The connection goes with this process's end at the latest;
            // the daemon then cancels the boot.
            drop(release_tx);
            Err(VmError::Slow {
                name,
                secs: BOOT_WITHIN.as_secs(),
            })
        }
    }
}

impl Lease {
    /// Lets go of the VM and waits (bounded) until the daemon deleted it.
    pub fn release(mut self) -> Result<(), VmError> {
        drop(self.release.take());
        let name = self.vm.name.clone();
        if self.done_rx.recv_timeout(DELETE_WITHIN).is_err() {
            return Err(VmError::Slow {
                name,
                secs: DELETE_WITHIN.as_secs(),
            });
        }
        match self.done.take().map(|h| h.join()) {
            Some(Ok(Ok(_))) | None => Ok(()),
            Some(Ok(Err(source))) => Err(VmError::Daemon { name, source }),
            Some(Err(_)) => Err(VmError::Unexpected {
                name,
                answer: "a panic".into(),
            }),
        }
    }
}

/// Deletes VM `name` if it is there (a dead shim's cleanup; the daemon
/// also deletes it once the dead shim's connection is gone).
pub fn delete(client: &Client, name: &str) -> Result<(), VmError> {
    match client.call(
        Request::VmDelete {
            name: name.to_string(),
            force: true,
        },
        &mut |_| {},
    ) {
        Ok(_) => Ok(()),
        Err(ClientError::Api(e)) if e.kind == banger_core::api::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(VmError::Daemon {
            name: name.to_string(),
            source,
        }),
    }
}
