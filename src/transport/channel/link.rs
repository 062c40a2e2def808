//! What carries the frames of a channel that is not of the socket kind: the shared-memory
//! rings ([`ring`](super::ring)) or the POSIX message queues ([`mq`](super::mq)). The channel
//! talks to either through this one type; the socket kind has none.

use std::io::{self, IoSlice};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use super::config::{ChannelConfig, ChannelKind};
use super::mq::MqLink;
use super::ring;
use crate::sys::{self, PollFd};
use crate::transport::Error;

#[derive(Debug)]
pub(super) enum Link {
    Ring(ring::Link),
    Mq(MqLink),
}

impl Link {
    /// The link a channel of `cfg`'s kind needs (`None`: the socket kind).
    pub(super) fn new(cfg: &ChannelConfig, sock: BorrowedFd<'_>) -> Result<Option<Link>, Error> {
        Ok(match cfg.kind {
            ChannelKind::SocketStream => None,
            ChannelKind::ShmQueue => {
                Some(Link::Ring(ring::Link::new(cfg.ring_capacity, cfg.wait)?))
            }
            ChannelKind::PosixMq => Some(Link::Mq(MqLink::new(sock)?)),
        })
    }

    pub(super) fn kind(&self) -> ChannelKind {
        match self {
            Link::Ring(_) => ChannelKind::ShmQueue,
            Link::Mq(_) => ChannelKind::PosixMq,
        }
    }

    /// The fd the hello carries: our ring, or our queue.
    pub(super) fn hello_fd(&self) -> BorrowedFd<'_> {
        match self {
            Link::Ring(l) => l.ring_fd(),
            Link::Mq(l) => l.queue_fd(),
        }
    }

    /// Takes the peer's ring or queue from its hello.
    pub(super) fn attach(&mut self, fd: OwnedFd) -> Result<(), Error> {
        match self {
            Link::Ring(l) => l.attach(fd),
            Link::Mq(l) => l.attach(fd),
        }
    }

    /// Writes what fits of `iov` (with `whole`, `iov` is one frame: a ring takes a small one
    /// whole or not at all). `Ok(None)`: nothing fits now.
    pub(super) fn push(
        &mut self,
        sock: BorrowedFd<'_>,
        iov: &[IoSlice<'_>],
        whole: bool,
    ) -> Result<Option<usize>, Error> {
        match self {
            Link::Ring(l) => l.push(sock, iov, whole),
            Link::Mq(l) => l.push(iov),
        }
    }

    pub(super) fn read(
        &mut self,
        sock: BorrowedFd<'_>,
        dst: &mut [u8],
    ) -> Result<Option<usize>, Error> {
        match self {
            Link::Ring(l) => l.read(sock, dst),
            Link::Mq(l) => l.read(sock, dst),
        }
    }

    pub(super) fn has_data(&self) -> Result<bool, Error> {
        match self {
            Link::Ring(l) => l.has_data(),
            Link::Mq(l) => l.has_data(),
        }
    }

    pub(super) fn has_space(&self) -> Result<bool, Error> {
        match self {
            Link::Ring(l) => l.has_space(),
            Link::Mq(l) => l.has_space(),
        }
    }

    /// Takes back what [`interest`](Link::interest) armed (a ring's bells).
    pub(super) fn settle(&self) {
        if let Link::Ring(l) = self {
            l.settle();
        }
    }

    /// Reads the socket dry of what a poll saw there (doorbell bytes, junk, the end of
    /// stream), for a loop that may only be sending: unread bytes would keep the socket
    /// readable and the loop spinning. A ring drains only when a poll may have seen something.
    pub(super) fn drain(&mut self, sock: BorrowedFd<'_>) -> Result<(), Error> {
        match self {
            Link::Ring(l) if l.peer_check_due() => l.drain(sock).map(drop),
            Link::Ring(_) => Ok(()),
            Link::Mq(l) => l.drain(sock).map(drop),
        }
    }

    /// Whether a full send path should check that the peer is still there.
    pub(super) fn peer_check_due(&self) -> bool {
        match self {
            Link::Ring(l) => l.peer_check_due(),
            Link::Mq(_) => true,
        }
    }

    /// For a poll loop: the fd to read (the socket, or the epoll fd over the socket and the
    /// peer's queue), the fd to watch for room in ours (none for a ring: its wake-ups come on
    /// the socket), and whether there is something to do already (then do not sleep). `space`:
    /// a send waits for room.
    pub(super) fn interest<'a>(
        &'a self,
        sock: BorrowedFd<'a>,
        space: bool,
    ) -> (BorrowedFd<'a>, Option<BorrowedFd<'a>>, bool) {
        match self {
            Link::Ring(l) => (sock, None, l.arm_poll(space)),
            Link::Mq(l) => (l.read_fd(), space.then(|| l.write_fd()), false),
        }
    }

    /// A blocking call's wait (see each kind's).
    pub(super) fn wait(
        &mut self,
        sock: BorrowedFd<'_>,
        side: Option<BorrowedFd<'_>>,
        read: bool,
        space: bool,
        until: Option<Instant>,
    ) -> Result<(), Error> {
        match self {
            Link::Ring(l) => l.wait(sock, side, read, space, until),
            Link::Mq(l) => l.wait(sock, side, read, space, until),
        }
    }

    /// The queue link (tests).
    #[cfg(test)]
    pub(super) fn mq(&self) -> &MqLink {
        match self {
            Link::Mq(l) => l,
            Link::Ring(_) => panic!("not a queue"),
        }
    }

    /// The ring's control words (tests scribble on them).
    #[cfg(test)]
    pub(super) fn ring(&self) -> &ring::Link {
        match self {
            Link::Ring(l) => l,
            Link::Mq(_) => panic!("not a ring"),
        }
    }
}

/// Whether the peer still holds its end of the socket: a closed (or dead) peer's end makes
/// ours report a hang-up, while a peer that only ended its sending does not (that is end of
/// stream for reading). [`Error::Reset`] when it is gone.
pub(super) fn check_alive(sock: BorrowedFd<'_>) -> Result<(), Error> {
    let mut p = [PollFd::new(sock, false, false)];
    sys::poll(&mut p, Some(Duration::ZERO)).map_err(Error::Io)?;
    if p[0].ready.hangup || p[0].ready.error {
        return Err(Error::Reset);
    }
    Ok(())
}

/// Reads of the socket one drain makes at most (a peer that writes junk without end cannot
/// hold the caller).
const DRAIN_READS: usize = 16;

/// Reads a ring or queue channel's socket dry: after the hello a channel writes nothing there
/// but wake-up bytes, which mean nothing once read (any fd attached is closed by the kernel).
/// Notes the end of stream in `eof`: a zero read, or a reset (the peer closed with our hello or
/// wake-up bytes unread). Returns whether the socket is dry or at its end; `false` after
/// [`DRAIN_READS`] full reads, when more may wait.
pub(super) fn drain_socket(sock: BorrowedFd<'_>, eof: &mut bool) -> Result<bool, Error> {
    let mut bytes = [0u8; 512];
    for _ in 0..DRAIN_READS {
        match sys::recv_plain(sock, &mut bytes, false) {
            Ok(0) => *eof = true,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => *eof = true,
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(Error::from_io(e)),
        }
        return Ok(true);
    }
    Ok(false)
}
