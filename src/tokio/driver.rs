//! The one adapter of a threadless reactor to tokio: a task that drives it when its fd is
//! readable or its deadline comes; and waiting for one fd (a log-in's).

use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::time::Instant;

use tokio::io::Interest;

use crate::reactor::Reactor;
use crate::sys;

/// The task driving a reactor; dropping it stops the task (at its next wait: a turn running on
/// another worker finishes first).
#[derive(Debug)]
pub(super) struct Driver(tokio::task::JoinHandle<()>);

impl Drop for Driver {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts the task that drives `reactor` (in the current runtime).
pub(super) fn drive(reactor: Arc<Reactor>) -> std::io::Result<Driver> {
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
