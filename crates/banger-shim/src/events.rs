//! Task events for containerd, in order, from one thread: a publish that
//! fails (containerd restarting) is retried on a new connection, with
//! backoff, for up to a minute; containerd learns of exits only this way.

use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::topics;
use containerd_shim::publisher::RemotePublisher;

/// How long an event is retried before it is given up (and logged).
const RETRY_FOR: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub enum Event {
    Create(TaskCreate),
    Start(TaskStart),
    Exit(TaskExit),
    Delete(TaskDelete),
    ExecAdded(TaskExecAdded),
    ExecStarted(TaskExecStarted),
}

impl Event {
    fn topic_and_message(&self) -> (&'static str, Box<dyn MessageDyn>) {
        match self.clone() {
            Event::Create(e) => (topics::TASK_CREATE_EVENT_TOPIC, Box::new(e)),
            Event::Start(e) => (topics::TASK_START_EVENT_TOPIC, Box::new(e)),
            Event::Exit(e) => (topics::TASK_EXIT_EVENT_TOPIC, Box::new(e)),
            Event::Delete(e) => (topics::TASK_DELETE_EVENT_TOPIC, Box::new(e)),
            Event::ExecAdded(e) => (topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(e)),
            Event::ExecStarted(e) => (topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(e)),
        }
    }
}

/// What the publishing thread is given: an event, or a flush to answer
/// once every event before it is out.
enum Queued {
    Event(Event),
    Flush(mpsc::Sender<()>),
}

/// Where events are queued; cheap to clone.
#[derive(Clone)]
pub struct Events(mpsc::Sender<Queued>);

impl Events {
    /// Starts the publishing thread on `publisher` (containerd's ttrpc
    /// socket is `address`, for reconnecting).
    pub fn start(publisher: RemotePublisher, address: String, namespace: String) -> Events {
        let (tx, rx) = mpsc::channel::<Queued>();
        std::thread::spawn(move || {
            let mut publisher = Some(publisher);
            for q in rx {
                match q {
                    Queued::Event(event) => publish(&mut publisher, &address, &namespace, &event),
                    Queued::Flush(done) => {
                        let _ = done.send(());
                    }
                }
            }
        });
        Events(tx)
    }

    pub fn send(&self, e: Event) {
        let _ = self.0.send(Queued::Event(e));
    }

    /// Waits (at most `within`) until every event queued so far is out.
    pub fn flush(&self, within: std::time::Duration) {
        let (tx, rx) = mpsc::channel();
        if self.0.send(Queued::Flush(tx)).is_ok() {
            let _ = rx.recv_timeout(within);
        }
    }
}

fn publish(publisher: &mut Option<RemotePublisher>, address: &str, namespace: &str, event: &Event) {
    let started = std::time::Instant::now();
    let mut backoff = Duration::from_millis(50);
    loop {
        if publisher.is_none() {
            *publisher = RemotePublisher::new(address)
                .map_err(|e| log::warn!("events: connect {address}: {e}"))
                .ok();
        }
        if let Some(p) = publisher.as_ref() {
            let (topic, message) = event.topic_and_message();
            let ctx = containerd_shim::protos::ttrpc::context::with_timeout(
                Duration::from_secs(5).as_nanos() as i64,
            );
            match p.publish(ctx, topic, namespace, message) {
                Ok(()) => return,
                Err(e) => {
                    log::warn!("events: publish {topic}: {e}");
                    *publisher = None;
                }
            }
        }
        if started.elapsed() > RETRY_FOR {
            log::error!("events: gave up on {event:?} after {RETRY_FOR:?}");
            return;
        }
        // Backoff between attempts at a containerd that is not there.
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// A protobuf timestamp of `t`.
pub fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let mut ts = Timestamp::new();
    ts.seconds = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    ts.nanos = i32::try_from(d.subsec_nanos()).unwrap_or(0);
    ts
}
