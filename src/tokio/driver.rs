//! The one adapter of a threadless reactor to tokio: a task that drives it when its fd is
//! readable or its deadline comes; and waiting for one fd (a log-in's).

use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::Interest;

use crate::reactor::Reactor;
use crate::sys;

/// The task driving a reactor; dropping it stops the task (at its next wait: a turn running on
/// another worker finishes first).
#[derive(Debug)]
struct Driver(tokio::task::JoinHandle<()>);

impl Drop for Driver {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A reactor and the task that drives it. The task belongs to a runtime: if that runtime
/// ended (its tasks went with it) while the object lives on, the next async call starts it
/// again in the caller's runtime.
#[derive(Debug)]
pub(super) struct Driven {
    reactor: Arc<Reactor>,
    task: std::sync::Mutex<Option<Driver>>,
}

impl Driven {
    pub(super) fn new(reactor: Arc<Reactor>) -> Driven {
        Driven {
            reactor,
            task: std::sync::Mutex::new(None),
        }
    }

    /// Has a task of the current runtime drive the reactor (one already running is kept).
    pub(super) fn ensure(&self) -> std::io::Result<()> {
        let mut t = crate::sync::lock(&self.task);
        if t.as_ref().is_some_and(|d| !d.0.is_finished()) {
            return Ok(());
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(std::io::Error::other(
                "flowipc's tokio face is used outside a tokio runtime",
            ));
        }
        // A runtime built without its timer panics at the first timer: ask now, and say so.
        let timers = std::panic::catch_unwind(|| drop(tokio::time::sleep(Duration::ZERO)));
        if timers.is_err() {
            return Err(std::io::Error::other(
                "flowipc's tokio face needs the runtime's timers (enable_time or enable_all)",
            ));
        }
        // (Registering the fd panics likewise without the IO driver.)
        let task =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drive(self.reactor.clone())))
                .map_err(|_| {
                    std::io::Error::other(
                "flowipc's tokio face needs the runtime's IO driver (enable_io or enable_all)",
            )
                })??;
        *t = Some(task);
        Ok(())
    }
}

/// Starts the task that drives `reactor` (in the current runtime).
fn drive(reactor: Arc<Reactor>) -> std::io::Result<Driver> {
    // (A copy of the fd for tokio, which it owns: the same epoll set.)
    let own = reactor
        .interest()
        .read_fd()
        .ok_or_else(|| std::io::Error::other("not a threadless reactor"))?
        .try_clone_to_owned()?;
    let fd = sys::tokio_fd(own, Interest::READABLE)?;
    Ok(Driver(tokio::spawn(async move {
        // Edges are enough: the reactor's set is level-triggered, and tokio sees an edge for
        // every event that reaches it after `clear_ready` (an event on an fd of the set wakes
        // the set's watchers even when the fd was ready already). A source that leaves
        // something ready unread says so by asking for another turn at once (its deadline:
        // now), which the deadline below honours.
        loop {
            reactor.drive();
            let ready = match reactor.interest().deadline() {
                None => fd.readable().await,
                Some(d) => tokio::select! {
                    ready = fd.readable() => ready,
                    () = tokio::time::sleep_until(d.into()) => continue,
                },
            };
            match ready {
                // (Cleared before the next turn: an edge after this is seen again.)
                Ok(mut guard) => guard.clear_ready(),
                Err(_) => return,
            }
        }
    })))
}

/// Sleeps until `deadline` (for good if `None`).
pub(super) async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Waits until `fd` is readable (or writable, if `write`), or `deadline`.
pub(super) async fn ready(
    fd: BorrowedFd<'_>,
    write: bool,
    deadline: Option<Instant>,
) -> std::io::Result<()> {
    let interest = if write {
        Interest::READABLE | Interest::WRITABLE
    } else {
        Interest::READABLE
    };
    let fd = sys::tokio_fd(fd.try_clone_to_owned()?, interest)?;
    tokio::select! {
        r = fd.ready(interest) => r.map(drop),
        () = sleep_until(deadline) => Ok(()),
    }
}
