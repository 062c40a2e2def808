//! The receive state: the peer's hello, then frames parsed out of a reusable buffer (small
//! ones) or read straight into their own buffer (big ones), each frame's fd taken from the
//! peer's side socket as the frame is parsed.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use super::wire::{Header, Kind, HEADER_LEN};
use super::{ChannelKind, Frame};
use crate::sys;
use crate::transport::{AlignedBuf, Error};

/// Size of the reusable receive buffer: a header and 64 KiB. Frames that fit are read through it
/// (many per `recv`); larger payloads are read straight into their own [`AlignedBuf`].
pub(super) const RBUF: usize = HEADER_LEN + (64 << 10);

#[derive(Debug)]
pub(super) struct BigFrame {
    pub(super) payload: AlignedBuf,
    pub(super) filled: usize,
    pub(super) fd: Option<OwnedFd>,
}

#[derive(Debug, Default)]
pub(super) struct Rx {
    /// Reusable buffer (allocated on first use); `buf[start..end]` are received, unparsed bytes.
    pub(super) buf: Vec<u8>,
    pub(super) start: usize,
    pub(super) end: usize,
    /// A frame too big for `buf`, being read straight into its payload.
    pub(super) big: Option<BigFrame>,
    /// The last frame was big: read the next header alone (see `make_room`).
    pub(super) last_big: bool,
    /// The peer's hello has been read: frames follow, read with plain `recv`.
    pub(super) hello_done: bool,
    /// Bytes of the hello read so far (with `recvmsg`, for its fd).
    pub(super) hello: [u8; HEADER_LEN],
    pub(super) hello_len: usize,
    /// Fds that came with the hello's bytes.
    pub(super) hello_fds: Vec<OwnedFd>,
    /// The receiving end of the peer's fd side socket (from its hello): the fd of each frame
    /// flagged `FLAG_HAS_FD` is read here when the frame is parsed, never waited for.
    pub(super) side: Option<UnixStream>,
    /// The peer's kind, as its hello says.
    pub(super) queue_kind: ChannelKind,
    /// The peer's ring or queue (from a `ShmQueue` or `PosixMq` peer's hello), until the
    /// channel takes it.
    pub(super) queue_fd: Option<OwnedFd>,
}

pub(super) enum Parsed {
    Frame(Frame),
    Ping,
    End,
    BigStarted,
}

impl Rx {
    /// Takes the fd of a frame flagged (`has_fd`) as carrying one from the peer's fd side
    /// socket. The peer sent it there before the frame, so it must be queued now: if it is not
    /// (nothing there, or the side socket closed), that is [`Error::MissingFd`]; this never
    /// waits. On a channel without fds, any flagged frame is [`Error::UnexpectedFd`].
    pub(super) fn take_fd(&mut self, has_fd: bool, fds_on: bool) -> Result<Option<OwnedFd>, Error> {
        if !has_fd {
            return Ok(None);
        }
        if !fds_on {
            return Err(Error::UnexpectedFd);
        }
        let Some(side) = &self.side else {
            // The peer's hello announced no side socket: it cannot send fds.
            return Err(Error::MissingFd);
        };
        let r = match sys::try_recv_one_fd(side.as_fd()) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(Error::MissingFd),
            Err(e) => return Err(Error::from_io(e)),
        };
        if r.fds_truncated || r.fds.len() > 1 {
            return Err(Error::TooManyFds); // all closed with `r`
        }
        r.fds.into_iter().next().map(Some).ok_or(Error::MissingFd)
    }

    /// Parses the frame at the parse position if enough of it is here.
    pub(super) fn parse(&mut self, max_frame: u64, fds_on: bool) -> Result<Option<Parsed>, Error> {
        let avail = &self.buf[self.start..self.end];
        let Some(header) = Header::decode(avail)? else {
            return Ok(None);
        };
        let kind = header.kind(max_frame)?;
        let (len, has_fd) = (header.len, kind == Kind::Data { has_fd: true });
        let total = header.frame_len();
        if total > RBUF as u64 {
            let fd = self.take_fd(has_fd, fds_on)?;
            let mut payload = usize::try_from(len)
                .ok()
                .and_then(AlignedBuf::try_zeroed)
                .ok_or_else(|| Error::Io(io::ErrorKind::OutOfMemory.into()))?;
            // Less than the whole frame is here (it does not fit in the buffer).
            let here = &self.buf[self.start + HEADER_LEN..self.end];
            let copy = here.len().min(payload.len());
            payload[..copy].copy_from_slice(&here[..copy]);
            self.start += HEADER_LEN + copy;
            self.big = Some(BigFrame {
                payload,
                filled: copy,
                fd,
            });
            self.last_big = true;
            return Ok(Some(Parsed::BigStarted));
        }
        let total = total as usize; // <= RBUF
        if avail.len() < total {
            return Ok(None);
        }
        let fd = self.take_fd(has_fd, fds_on)?;
        self.last_big = false;
        let parsed = match kind {
            Kind::Ping => Parsed::Ping,
            Kind::End => Parsed::End,
            Kind::Data { .. } => {
                let body = &self.buf[self.start + HEADER_LEN..self.start + total];
                Parsed::Frame(Frame {
                    payload: AlignedBuf::from_slice(body),
                    fd,
                })
            }
        };
        self.start += total;
        Ok(Some(parsed))
    }

    /// Reads the peer's hello, the first frame: with `recvmsg` (its fd rides inline), never
    /// more than its 16 bytes, so every fd these reads bring belongs to it. `Ok(false)`: not all
    /// of it is here yet (only without `wait`).
    pub(super) fn read_hello(&mut self, sock: BorrowedFd<'_>, wait: bool) -> Result<bool, Error> {
        // Each read's bytes are checked as they come: the magic at once, the flags once whole.
        let header = loop {
            if let Some(h) = Header::decode(&self.hello[..self.hello_len])? {
                break h;
            }
            let dst = &mut self.hello[self.hello_len..];
            let got = if wait {
                sys::recv_with_fds_waiting(sock, dst)
            } else {
                sys::try_recv_with_fds(sock, dst)
            };
            let r = match got {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(Error::from_io(e)),
            };
            if r.bytes == 0 {
                return Err(if self.hello_len == 0 {
                    Error::PeerGone
                } else {
                    Error::Truncated {
                        expected: HEADER_LEN as u64,
                        got: self.hello_len as u64,
                    }
                });
            }
            let truncated = r.fds_truncated;
            self.hello_fds.extend(r.fds);
            if truncated || self.hello_fds.len() > 2 {
                return Err(Error::TooManyFds); // all closed with the channel's state
            }
            self.hello_len += r.bytes;
        };
        let hello = header.hello()?;
        let queue = hello.ring || hello.mq;
        let wanted = usize::from(hello.side) + usize::from(queue);
        match self.hello_fds.len().cmp(&wanted) {
            std::cmp::Ordering::Less => return Err(Error::MissingFd),
            std::cmp::Ordering::Greater if wanted == 0 => return Err(Error::UnexpectedFd),
            std::cmp::Ordering::Greater => return Err(Error::TooManyFds),
            std::cmp::Ordering::Equal => {}
        }
        // (In the order sent: the ring's or queue's, then the side socket's.)
        let mut fds = std::mem::take(&mut self.hello_fds).into_iter();
        self.queue_kind = match (hello.ring, hello.mq) {
            (true, false) => ChannelKind::ShmQueue,
            (false, true) => ChannelKind::PosixMq,
            (false, false) => ChannelKind::SocketStream,
            (true, true) => return Err(Error::BadFrame("a hello of two kinds")),
        };
        if queue {
            self.queue_fd = fds.next();
        }
        if let Some(fd) = fds.next() {
            if !sys::is_stream_socket(fd.as_fd()) {
                return Err(Error::BadFrame("the hello's fd is not a stream socket"));
            }
            self.side = Some(UnixStream::from(fd));
        }
        self.hello_done = true;
        Ok(true)
    }

    /// Frees the receive buffer (nothing more will be read: the peer ended its sending).
    pub(super) fn release_buffers(&mut self) {
        self.buf = Vec::new();
        self.start = 0;
        self.end = 0;
        self.big = None;
    }

    /// The error for end of stream now.
    pub(super) fn eof_error(&self) -> Error {
        if let Some(b) = &self.big {
            return Error::Truncated {
                expected: (HEADER_LEN + b.payload.len()) as u64,
                got: (HEADER_LEN + b.filled) as u64,
            };
        }
        let avail = &self.buf[self.start..self.end];
        if avail.is_empty() {
            return Error::PeerGone;
        }
        Error::Truncated {
            expected: Header::frame_len_at(avail),
            got: avail.len() as u64,
        }
    }

    /// Makes room at the end of the buffer for the rest of the frame at the parse position,
    /// and returns how many bytes to ask the kernel for.
    ///
    /// After a big frame, with nothing buffered, only a header is read: if the next frame is
    /// big too, its payload then goes straight from the kernel into its own buffer, with no
    /// part of it copied through this one. Small frames read as much as fits.
    pub(super) fn make_room(&mut self) -> usize {
        if self.buf.is_empty() {
            self.buf = vec![0; RBUF];
        }
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            return if self.last_big { HEADER_LEN } else { RBUF };
        }
        let avail = &self.buf[self.start..self.end];
        // A small frame's (big ones leave the buffer when their header is parsed).
        let need = usize::try_from(Header::frame_len_at(avail)).unwrap_or(usize::MAX);
        if self.start + need > RBUF {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.last_big {
            // Just the rest of this frame (header included): no byte of a following frame.
            (self.start + need).saturating_sub(self.end).max(1)
        } else {
            RBUF - self.end
        }
    }
}
