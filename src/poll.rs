//! The pollable contract every sync_io core offers: what it waits for ([`Interest`]: fds to
//! watch for reading or writing, and a deadline) and one call to make when any of that is ready
//! ([`Pollable::on_ready`]).
//!
//! A user's own poll loop drives any core ([`transport::Channel`](crate::transport::Channel),
//! [`msg::MsgChannel`](crate::msg::MsgChannel), [`struc::Channel`](crate::struc::Channel))
//! with these two calls alone; the library's async faces are driven the same way by its one
//! library thread.
//!
//! ```
//! use std::time::Instant;
//! use nix::poll::{PollFd, PollFlags, PollTimeout};
//! use flowipc::poll::Pollable;
//! use flowipc::transport::{Channel, ChannelConfig, Error};
//!
//! let (mut a, mut b) = Channel::pair(ChannelConfig::new())?;
//! a.send(b"hello")?;
//! // A poll loop for `b`: wait for what it is interested in, tell it, receive.
//! let frame = loop {
//!     let interest = b.interest();
//!     let mut fds: Vec<PollFd> = interest
//!         .fds()
//!         .map(|(fd, read, write)| {
//!             let mut events = PollFlags::empty();
//!             events.set(PollFlags::POLLIN, read);
//!             events.set(PollFlags::POLLOUT, write);
//!             PollFd::new(fd, events)
//!         })
//!         .collect();
//!     let timeout = interest.deadline().map_or(PollTimeout::NONE, |d| {
//!         let ms = d.saturating_duration_since(Instant::now()).as_millis();
//!         PollTimeout::try_from(ms.min(60_000) as u16).unwrap_or(PollTimeout::MAX)
//!     });
//!     nix::poll::poll(&mut fds, timeout).map_err(|e| Error::Io(e.into()))?;
//!     b.on_ready()?;
//!     if let Some(f) = b.try_recv()? {
//!         break f;
//!     }
//! };
//! assert_eq!(&*frame.payload, b"hello");
//! # Ok::<(), Error>(())
//! ```

use std::os::fd::BorrowedFd;
use std::time::Instant;

/// What a core waits for: one fd to watch for reading, possibly one (the same or another) for
/// writing, and the latest time to call [`Pollable::on_ready`] even if no fd is ready.
#[derive(Debug, Clone, Copy)]
pub struct Interest<'a> {
    read: Option<BorrowedFd<'a>>,
    write: Option<BorrowedFd<'a>>,
    deadline: Option<Instant>,
}

impl<'a> Interest<'a> {
    /// Nothing to wait for (a hosed core).
    pub(crate) fn none() -> Self {
        Interest {
            read: None,
            write: None,
            deadline: None,
        }
    }

    /// Watches `read` for reading, `write` (if any) for writing, and wakes at `deadline`.
    pub(crate) fn new(
        read: Option<BorrowedFd<'a>>,
        write: Option<BorrowedFd<'a>>,
        deadline: Option<Instant>,
    ) -> Self {
        Interest {
            read,
            write,
            deadline,
        }
    }

    /// The fd to watch for reading, if any.
    pub fn read_fd(&self) -> Option<BorrowedFd<'a>> {
        self.read
    }

    /// The fd to watch for writing, if any (it may be the read fd, or another one).
    pub fn write_fd(&self) -> Option<BorrowedFd<'a>> {
        self.write
    }

    /// When to call [`Pollable::on_ready`] at the latest, fds ready or not (`None`: no
    /// timer). A deadline already past means: call it now.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Each fd to watch, with whether to watch it for reading and for writing (an fd watched
    /// for both comes once).
    pub fn fds(&self) -> impl Iterator<Item = (BorrowedFd<'a>, bool, bool)> {
        use std::os::fd::AsRawFd;
        let same =
            matches!((self.read, self.write), (Some(r), Some(w)) if r.as_raw_fd() == w.as_raw_fd());
        let read = self.read.map(|r| (r, true, same));
        let write = self.write.filter(|_| !same).map(|w| (w, false, true));
        read.into_iter().chain(write)
    }
}

/// A sync_io core: a poll loop watches its [`interest`](Pollable::interest) and calls
/// [`on_ready`](Pollable::on_ready) when any of it is ready (or when unsure: a call too many
/// does no harm, it never blocks).
pub trait Pollable {
    /// What `on_ready` reports.
    type Error;

    /// What to wait for now. Ask again after every call to the core: sending may add an fd to
    /// watch for writing, receiving may move the deadline.
    fn interest(&self) -> Interest<'_>;

    /// Does what is ready without blocking: writes queued bytes, runs the timers (keep-alive
    /// pings, idle timeout) and, for cores that dispatch to handlers, receives and dispatches.
    /// Cores that hand out what they receive ([`try_recv`](crate::transport::Channel::try_recv))
    /// leave receiving to that call. Hosing errors are reported as the core reports them.
    fn on_ready(&mut self) -> Result<(), Self::Error>;
}

/// Waits (on the calling thread) until one of `interest`'s fds is ready, its deadline or `until`
/// passes, whichever is first; the read fd only if `read`. For the cores' blocking calls.
pub(crate) fn wait(
    interest: Interest<'_>,
    read: bool,
    until: Option<Instant>,
) -> std::io::Result<()> {
    use crate::sys::PollFd;
    let until = match (until, interest.deadline) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let mut fds = interest
        .fds()
        .map(|(fd, r, w)| PollFd::new(fd, r && read, w))
        .filter(|p| p.read || p.write);
    let timeout = until.map(|u| u.saturating_duration_since(Instant::now()));
    // (On the stack: this runs once per blocking wait.)
    match (fds.next(), fds.next()) {
        (None, _) => crate::sys::poll(&mut [], timeout),
        (Some(a), None) => crate::sys::poll(&mut [a], timeout),
        (Some(a), Some(b)) => crate::sys::poll(&mut [a, b], timeout),
    }
    .map(|_| ())
}
