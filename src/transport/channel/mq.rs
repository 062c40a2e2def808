//! The POSIX message queues under a [`ChannelKind::PosixMq`](super::ChannelKind::PosixMq)
//! channel (Flow-IPC's `MqType::POSIX`): one queue per direction, made by its sender, unlinked
//! at once and sent (its descriptor) in the hello. The byte stream is cut into messages of up
//! to the queue's message size. The data socket stays for the hello, the fds and the peer's
//! death; an epoll fd that watches it and the incoming queue is the one fd a poll loop reads.

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};

use super::link::{check_alive, drain_socket};
use crate::sys::mq::Mq;
use crate::sys::{self, PollFd};
use crate::transport::Error;

/// Bytes per message. Small on purpose: the kernel charges every queue's whole size
/// (messages × size) to the user's `RLIMIT_MSGQUEUE` (800 KiB by default), and zero-copy
/// messages are small frames.
const MSG_SIZE: usize = 2048;
/// Messages per queue (the default `msg_max` allows at most 10 without privileges).
const MAX_MSGS: usize = 8;
/// Longest wait before the socket is looked at while waiting for room (the peer's death).
const SLICE: Duration = Duration::from_millis(50);

/// One side's queues.
#[derive(Debug)]
pub(super) struct MqLink {
    out: Mq,
    inp: Option<Mq>,
    /// Readable when the incoming queue has a message or the socket has news.
    epoll: Epoll,
    /// The rest of the last message received: `buf[start..end]`.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
}

fn io(e: nix::Error) -> Error {
    Error::Io(io::Error::from_raw_os_error(e as i32))
}

impl MqLink {
    pub(super) fn new(sock: BorrowedFd<'_>) -> Result<MqLink, Error> {
        let out = Mq::create(MSG_SIZE, MAX_MSGS).map_err(Error::Io)?;
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(io)?;
        epoll
            .add(sock, EpollEvent::new(EpollFlags::EPOLLIN, 0))
            .map_err(io)?;
        Ok(MqLink {
            out,
            inp: None,
            epoll,
            buf: Vec::new(),
            start: 0,
            end: 0,
            eof: false,
        })
    }

    /// Our queue's descriptor, for the hello.
    pub(super) fn queue_fd(&self) -> BorrowedFd<'_> {
        self.out.as_fd()
    }

    /// Our queue (tests change its flags, as a peer may).
    #[cfg(test)]
    pub(super) fn out_queue(&self) -> &Mq {
        &self.out
    }

    /// The fd a poll loop watches for reading.
    pub(super) fn read_fd(&self) -> BorrowedFd<'_> {
        self.epoll.0.as_fd()
    }

    /// The fd to watch for room in our queue.
    pub(super) fn write_fd(&self) -> BorrowedFd<'_> {
        self.out.as_fd()
    }

    /// Takes the peer's queue, from its hello.
    pub(super) fn attach(&mut self, fd: OwnedFd) -> Result<(), Error> {
        let inp = Mq::from_fd(fd).map_err(|_| Error::BadQueue("the hello's fd is not a queue"))?;
        let st = inp.state().map_err(Error::Io)?;
        if !(1..=1 << 20).contains(&st.msgsize) {
            return Err(Error::BadQueue("a message size out of range"));
        }
        self.epoll
            .add(inp.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, 1))
            .map_err(io)?;
        self.buf = vec![0; st.msgsize];
        self.inp = Some(inp);
        Ok(())
    }

    /// Sends what the queue takes of `iov`, in messages of up to [`MSG_SIZE`] bytes.
    /// `Ok(None)`: full.
    pub(super) fn push(&mut self, iov: &[IoSlice<'_>]) -> Result<Option<usize>, Error> {
        let mut n = 0;
        let mut msg = [0u8; MSG_SIZE];
        let mut bytes = iov.iter().flat_map(|s| s.iter().copied());
        loop {
            let mut len = 0;
            for (slot, b) in msg.iter_mut().zip(bytes.by_ref()) {
                *slot = b;
                len += 1;
            }
            if len == 0 {
                break;
            }
            if !self.out.try_send(&msg[..len]).map_err(Error::from_io)? {
                break;
            }
            n += len;
            if len < MSG_SIZE {
                break;
            }
        }
        Ok((n > 0).then_some(n))
    }

    /// Whether our queue has room for a message.
    pub(super) fn has_space(&self) -> Result<bool, Error> {
        let st = self.out.state().map_err(Error::Io)?;
        Ok(st.curmsgs < st.maxmsg)
    }

    /// Whether bytes from the peer wait.
    pub(super) fn has_data(&self) -> Result<bool, Error> {
        if self.start < self.end {
            return Ok(true);
        }
        match &self.inp {
            Some(q) => Ok(q.state().map_err(Error::Io)?.curmsgs > 0),
            None => Ok(false),
        }
    }

    /// Reads stream bytes into `dst`, as `ring::Link::read` does: `Ok(None)` nothing now,
    /// `Ok(Some(0))` end of stream (the socket closed and the queue is empty).
    pub(super) fn read(
        &mut self,
        sock: BorrowedFd<'_>,
        dst: &mut [u8],
    ) -> Result<Option<usize>, Error> {
        loop {
            if self.start < self.end {
                let n = dst.len().min(self.end - self.start);
                dst[..n].copy_from_slice(&self.buf[self.start..self.start + n]);
                self.start += n;
                return Ok(Some(n));
            }
            if let Some(q) = &self.inp {
                if let Some(n) = q.try_receive(&mut self.buf).map_err(Error::from_io)? {
                    (self.start, self.end) = (0, n);
                    continue;
                }
            }
            if self.eof {
                return Ok(Some(0));
            }
            // (Junk beyond one drain's bound is left for the next call.)
            self.drain(sock)?;
            if !self.eof {
                return Ok(None);
            }
        }
    }

    /// Reads the socket dry: nothing but the hello is written on it by a channel, so other
    /// bytes mean nothing and are dropped (with any fd attached: the kernel closes it), at most
    /// a bounded amount per call; notes the end of stream. Returns whether the socket is dry
    /// (or at its end).
    pub(super) fn drain(&mut self, sock: BorrowedFd<'_>) -> Result<bool, Error> {
        drain_socket(sock, &mut self.eof)
    }

    /// A blocking call's wait: the epoll fd (if `read`), our queue for room (`space`) or the
    /// side socket (`side`), until `until`; while waiting for room only, at most a slice, then
    /// the peer must still be there.
    pub(super) fn wait(
        &mut self,
        sock: BorrowedFd<'_>,
        side: Option<BorrowedFd<'_>>,
        read: bool,
        space: bool,
        until: Option<Instant>,
    ) -> Result<(), Error> {
        if (read && self.has_data()?) || (space && self.has_space()?) {
            return Ok(());
        }
        let mut left = until.map(|u| u.saturating_duration_since(Instant::now()));
        if !read {
            left = Some(left.map_or(SLICE, |l| l.min(SLICE)));
        }
        let mut fds = [
            PollFd::new(self.epoll.0.as_fd(), read, false),
            PollFd::new(self.out.as_fd(), false, space),
        ];
        let n = if let Some(s) = side {
            sys::poll(&mut [fds[0], fds[1], PollFd::new(s, false, true)], left)
        } else {
            sys::poll(&mut fds, left)
        }
        .map_err(Error::Io)?;
        if n == 0 && !read {
            check_alive(sock)?;
        }
        Ok(())
    }
}
