//! An epoll set by fd number: the one fd a threadless reactor gives its owner's poll loop,
//! readable when any fd its sources wait for is ready.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::libc;

/// An epoll instance (level-triggered, close-on-exec).
#[derive(Debug)]
pub(crate) struct Epoll(OwnedFd);

/// What [`Epoll::ctl`] does with an fd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ctl {
    Add,
    Modify,
    Remove,
}

impl Epoll {
    /// A new, empty set.
    pub(crate) fn new() -> io::Result<Epoll> {
        // SAFETY: epoll_create1 takes no pointers; a non-negative result is a new fd that
        // nothing else owns, which `OwnedFd` then closes once.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: see above: `fd` is open and ours alone.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Adds, changes or removes fd number `fd`, watched for reading and/or writing. By number:
    /// the sources say which fds they wait for by number (see `reactor::Wait`).
    pub(crate) fn ctl(&self, op: Ctl, fd: RawFd, read: bool, write: bool) -> io::Result<()> {
        let mut events = 0u32;
        if read {
            events |= libc::EPOLLIN as u32 | libc::EPOLLRDHUP as u32;
        }
        if write {
            events |= libc::EPOLLOUT as u32;
        }
        let mut ev = libc::epoll_event {
            events,
            u64: fd as u64,
        };
        let op = match op {
            Ctl::Add => libc::EPOLL_CTL_ADD,
            Ctl::Modify => libc::EPOLL_CTL_MOD,
            Ctl::Remove => libc::EPOLL_CTL_DEL,
        };
        // SAFETY: `ev` is a valid, initialised epoll_event that lives across the call (the
        // kernel only reads it). `fd` is a number, not a borrow: if it is not open the call
        // fails (EBADF); if the number was reused by another file, the set watches that file,
        // which at worst has the reactor run a turn for nothing (as `poll` on a stale number
        // does). No memory of ours is at stake either way.
        let r = unsafe { libc::epoll_ctl(self.0.as_raw_fd(), op, fd, &mut ev) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl AsFd for Epoll {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}
