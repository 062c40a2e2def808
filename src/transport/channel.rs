//! The sync_io core: [`Channel`], a non-blocking framed channel over a Unix stream socket.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, IoSlice};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use super::buf::{AlignedBuf, SharedBytes};
use super::Error;
use crate::sys::{self, PollFd};

/// The first 4 bytes of every frame header.
pub const MAGIC: [u8; 4] = *b"FIPC";
/// Length of a frame header: magic (4) | flags u32 LE (4) | payload length u64 LE (8).
pub const HEADER_LEN: usize = 16;
/// Header flag: the frame carries one fd. On a hello, the fd rides with the frame's first byte
/// (`SCM_RIGHTS`); on any other frame, it was sent before the frame on the sender's fd side
/// socket (see [the module docs](super)).
pub const FLAG_HAS_FD: u32 = 1;
/// Header flag: a keep-alive ping (no payload, no fd); consumed silently by the receiver.
pub const FLAG_PING: u32 = 1 << 1;
/// Header flag: the sender ended its sending (no payload, no fd); nothing follows.
pub const FLAG_END: u32 = 1 << 2;
/// Header flag: the hello, the first frame in each direction (no payload; with
/// [`FLAG_HAS_FD`], its fd is the receiving end of the sender's fd side socket).
pub const FLAG_HELLO: u32 = 1 << 3;
const KNOWN_FLAGS: u32 = FLAG_HAS_FD | FLAG_PING | FLAG_END | FLAG_HELLO;
/// Default [`ChannelConfig::max_frame`]: 1 GiB + 1 MiB.
pub const DEFAULT_MAX_FRAME: u64 = (1 << 30) + (1 << 20);

/// Size of the reusable receive buffer: a header and 64 KiB. Frames that fit are read through it
/// (many per `recv`); larger payloads are read straight into their own [`AlignedBuf`].
const RBUF: usize = HEADER_LEN + (64 << 10);
/// Queued small frames are appended to the previous queued chunk while it is smaller than this
/// (fewer allocations and iovecs for a burst of small frames).
const COALESCE_MAX: usize = 64 << 10;

fn encode_header(flags: u32, len: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&MAGIC);
    h[4..8].copy_from_slice(&flags.to_le_bytes());
    h[8..].copy_from_slice(&len.to_le_bytes());
    h
}

fn header_len_field(h: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&h[8..16]);
    u64::from_le_bytes(b)
}

fn header_flags_field(h: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&h[4..8]);
    u32::from_le_bytes(b)
}

/// Settings of a [`Channel`], builder style.
///
/// ```
/// use std::time::Duration;
/// use flowipc::transport::ChannelConfig;
///
/// let cfg = ChannelConfig::new()
///     .max_frame(16 << 20)
///     .high_water(Some(64 << 20))
///     .idle_timeout(Some(Duration::from_secs(10)))
///     .auto_ping(Some(Duration::from_secs(2)));
/// assert_eq!(cfg.get_max_frame(), 16 << 20);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelConfig {
    max_frame: u64,
    high_water: Option<usize>,
    idle_timeout: Option<Duration>,
    auto_ping: Option<Duration>,
    fds: bool,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        ChannelConfig {
            max_frame: DEFAULT_MAX_FRAME,
            high_water: None,
            idle_timeout: None,
            auto_ping: None,
            fds: true,
        }
    }
}

impl ChannelConfig {
    /// The defaults: frames up to [`DEFAULT_MAX_FRAME`], unbounded send queue, no idle timeout,
    /// no pings.
    pub fn new() -> Self {
        Self::default()
    }

    /// Largest payload, in bytes, this side sends or accepts ([`Error::FrameTooLarge`]).
    pub fn max_frame(mut self, bytes: u64) -> Self {
        self.max_frame = bytes;
        self
    }

    /// Bound on the bytes of data frames waiting in the send queue (`None`: unbounded). A send
    /// that would take the queue past it is refused with [`Error::HighWater`]; see
    /// [`Channel::send`].
    pub fn high_water(mut self, bytes: Option<usize>) -> Self {
        self.high_water = bytes;
        self
    }

    /// Fail with [`Error::IdleTimeout`] when nothing at all (data or ping) arrived for this long
    /// (`None`: never). Pair it with the peer's [`auto_ping`](ChannelConfig::auto_ping) at a
    /// fraction of the period.
    pub fn idle_timeout(mut self, t: Option<Duration>) -> Self {
        self.idle_timeout = t;
        self
    }

    /// Send a keep-alive ping when nothing was sent for this long (`None`: never).
    pub fn auto_ping(mut self, period: Option<Duration>) -> Self {
        self.auto_ping = period;
        self
    }

    /// Whether frames may carry fds (default `true`). With `false`, a send with an fd is refused
    /// with [`Error::FdsDisabled`] (non-hosing) and a frame with an fd from the peer is
    /// [`Error::UnexpectedFd`] (hosing): a channel of blobs only. Such a channel makes no fd
    /// side socket (its hello says so); it accepts the peer's, and never reads it.
    pub fn fds(mut self, on: bool) -> Self {
        self.fds = on;
        self
    }

    /// See [`fds`](ChannelConfig::fds).
    pub fn get_fds(&self) -> bool {
        self.fds
    }

    /// See [`max_frame`](ChannelConfig::max_frame).
    pub fn get_max_frame(&self) -> u64 {
        self.max_frame
    }

    /// See [`high_water`](ChannelConfig::high_water).
    pub fn get_high_water(&self) -> Option<usize> {
        self.high_water
    }

    /// See [`idle_timeout`](ChannelConfig::idle_timeout).
    pub fn get_idle_timeout(&self) -> Option<Duration> {
        self.idle_timeout
    }

    /// See [`auto_ping`](ChannelConfig::auto_ping).
    pub fn get_auto_ping(&self) -> Option<Duration> {
        self.auto_ping
    }
}

/// One received frame: its payload (8-aligned) and the fd that came with it, if any.
#[derive(Debug)]
pub struct Frame {
    /// The payload bytes.
    pub payload: AlignedBuf,
    /// The fd sent with the frame (close-on-exec, owned: dropping the frame closes it).
    pub fd: Option<OwnedFd>,
}

impl Frame {
    /// The payload and the fd.
    pub fn into_parts(self) -> (AlignedBuf, Option<OwnedFd>) {
        (self.payload, self.fd)
    }
}

// ---------------------------------------------------------------------------------------------
// Send queue

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Data,
    Ping,
    End,
    /// The hello: its fd (if any) rides inline, on the data socket.
    Hello,
}

#[derive(Debug)]
enum ChunkData {
    Header([u8; HEADER_LEN], usize),
    Owned(Vec<u8>, usize),
    Shared(SharedBytes),
}

impl ChunkData {
    fn rest(&self) -> &[u8] {
        match self {
            ChunkData::Header(h, off) => h.get(*off..).unwrap_or(&[]),
            ChunkData::Owned(v, off) => v.get(*off..).unwrap_or(&[]),
            ChunkData::Shared(s) => s.as_slice(),
        }
    }

    fn advance(&mut self, n: usize) {
        match self {
            ChunkData::Header(_, off) | ChunkData::Owned(_, off) => *off = off.saturating_add(n),
            ChunkData::Shared(s) => s.advance(n),
        }
    }
}

/// A piece of the send queue: bytes of one frame, or (coalesced) of several data frames of
/// which only the first may carry an fd.
#[derive(Debug)]
struct Chunk {
    data: ChunkData,
    /// The frame's fd, not sent yet (only on a frame's first chunk). It goes out on the side
    /// socket before any byte of the chunk (a hello's: inline, with its first byte).
    fd: Option<OwnedFd>,
    /// A frame starts at this chunk's first byte.
    starts_frame: bool,
    kind: Kind,
    /// Bytes of this chunk not yet written (as accounted in the queue totals).
    left: usize,
}

#[derive(Debug, Default)]
struct SendQueue {
    chunks: VecDeque<Chunk>,
    /// Bytes queued, all kinds.
    bytes: usize,
    /// Bytes of data frames queued (what high-water counts).
    counted: usize,
    /// Pings queued.
    pings: usize,
}

impl SendQueue {
    fn push(&mut self, c: Chunk) {
        self.bytes += c.left;
        if c.kind == Kind::Data {
            self.counted += c.left;
        }
        if c.kind == Kind::Ping && c.starts_frame {
            self.pings += 1;
        }
        self.chunks.push_back(c);
    }

    /// Appends a whole fd-less data frame to the last chunk if that one may grow, so a burst of
    /// small frames costs one allocation per 64 KiB. Returns false if it could not.
    fn try_coalesce(&mut self, header: &[u8; HEADER_LEN], parts: &[&[u8]], total: usize) -> bool {
        let Some(tail) = self.chunks.back_mut() else {
            return false;
        };
        // (A tail whose frame has an fd may grow: the fd goes out before the chunk's first
        // byte, so before every frame appended to it.)
        if tail.kind != Kind::Data {
            return false;
        }
        let ChunkData::Owned(v, _) = &mut tail.data else {
            return false;
        };
        if v.len() + total > COALESCE_MAX {
            return false;
        }
        v.extend_from_slice(header);
        for p in parts {
            v.extend_from_slice(p);
        }
        tail.left += total;
        self.bytes += total;
        self.counted += total;
        true
    }

    /// Sends, in order, the fds of the frames the next write may hold on the side socket (each
    /// before any byte of its frame goes), and returns how many head chunks that write may
    /// hold: it stops before a frame whose fd the side socket has no room for (0: the head's
    /// own), and a hello with an fd (inline) is written alone.
    fn send_fds(&mut self, side: Option<BorrowedFd<'_>>) -> Result<usize, Error> {
        let mut slices = 0;
        for (i, c) in self.chunks.iter_mut().enumerate() {
            if slices == sys::IOV_MAX {
                return Ok(i);
            }
            if c.kind == Kind::Hello && c.fd.is_some() {
                return Ok(i.max(1));
            }
            if let Some(fd) = &c.fd {
                // (`submit` refuses fds on a channel without a side socket.)
                let side = side.ok_or(Error::FdsDisabled)?;
                if !sys::try_send_one_fd(side, fd.as_fd()).map_err(Error::from_io)? {
                    return Ok(i);
                }
                c.fd = None;
            }
            if !c.data.rest().is_empty() {
                slices += 1;
            }
        }
        Ok(self.chunks.len())
    }

    /// Gathers the next bytes to write: from the first `limit` chunks (see `send_fds`), up to
    /// [`sys::IOV_MAX`] slices. Returns the fd to attach inline: a queued hello's.
    fn gather<'a>(&'a self, limit: usize, iov: &mut Vec<IoSlice<'a>>) -> Option<BorrowedFd<'a>> {
        let fd = self
            .chunks
            .front()
            .filter(|c| c.kind == Kind::Hello)
            .and_then(|c| c.fd.as_ref().map(|f| f.as_fd()));
        for c in self.chunks.iter().take(limit) {
            if iov.len() == sys::IOV_MAX {
                break;
            }
            let r = c.data.rest();
            if !r.is_empty() {
                iov.push(IoSlice::new(r));
            }
        }
        fd
    }

    /// Marks `n` bytes from the head as written, dropping finished chunks (and, if any byte
    /// went, a hello's inline fd: the kernel has it now). Returns whether an END frame was finished.
    fn consume(&mut self, mut n: usize) -> bool {
        let mut end_done = false;
        if n > 0 {
            if let Some(c) = self.chunks.front_mut() {
                c.fd = None;
            }
        }
        while let Some(c) = self.chunks.front_mut() {
            let take = n.min(c.data.rest().len());
            c.data.advance(take);
            n -= take;
            let acct = take.min(c.left);
            c.left -= acct;
            self.bytes -= acct;
            if c.kind == Kind::Data {
                self.counted -= acct;
            }
            if !c.data.rest().is_empty() {
                break;
            }
            // Finished (or its owner shrank: see `SharedBytes`); drop what is left of its
            // accounting with it.
            let Some(c) = self.chunks.pop_front() else {
                break;
            };
            self.bytes -= c.left;
            if c.kind == Kind::Data {
                self.counted -= c.left;
            }
            match c.kind {
                Kind::Ping if c.starts_frame => self.pings -= 1,
                Kind::End => end_done = true,
                _ => {}
            }
        }
        end_done
    }
}

/// Position in a list of slices.
#[derive(Debug, Default, Clone, Copy)]
struct Cursor {
    idx: usize,
    off: usize,
}

impl Cursor {
    fn advance(&mut self, slices: &[&[u8]], mut n: usize) {
        while let Some(s) = slices.get(self.idx) {
            let rem = s.len().saturating_sub(self.off);
            if n < rem {
                self.off += n;
                return;
            }
            n -= rem;
            self.idx += 1;
            self.off = 0;
        }
    }

    fn iov<'a>(&self, slices: &[&'a [u8]]) -> Vec<IoSlice<'a>> {
        let mut out = Vec::with_capacity(slices.len().saturating_sub(self.idx).min(sys::IOV_MAX));
        for (i, s) in slices.iter().enumerate().skip(self.idx) {
            let s = if i == self.idx {
                s.get(self.off..).unwrap_or(&[])
            } else {
                s
            };
            if !s.is_empty() {
                out.push(IoSlice::new(s));
                if out.len() == sys::IOV_MAX {
                    break;
                }
            }
        }
        out
    }
}

/// What a send hands to the common path.
enum Payload<'a> {
    Borrowed(&'a [&'a [u8]]),
    Shared(Vec<SharedBytes>),
}

impl Payload<'_> {
    fn count(&self) -> usize {
        match self {
            Payload::Borrowed(p) => p.len(),
            Payload::Shared(p) => p.len(),
        }
    }
}

enum FdArg<'a> {
    Borrowed(BorrowedFd<'a>),
    Owned(OwnedFd),
}

impl FdArg<'_> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            FdArg::Borrowed(b) => *b,
            FdArg::Owned(o) => o.as_fd(),
        }
    }

    fn into_owned(self) -> io::Result<OwnedFd> {
        match self {
            FdArg::Borrowed(b) => b.try_clone_to_owned(),
            FdArg::Owned(o) => Ok(o),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Receive state

#[derive(Debug)]
struct BigFrame {
    payload: AlignedBuf,
    filled: usize,
    fd: Option<OwnedFd>,
}

#[derive(Debug, Default)]
struct Rx {
    /// Reusable buffer (allocated on first use); `buf[start..end]` are received, unparsed bytes.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// A frame too big for `buf`, being read straight into its payload.
    big: Option<BigFrame>,
    /// The last frame was big: read the next header alone (see `make_room`).
    last_big: bool,
    /// The peer's hello has been read: frames follow, read with plain `recv`.
    hello_done: bool,
    /// Bytes of the hello read so far (with `recvmsg`, for its fd).
    hello: [u8; HEADER_LEN],
    hello_len: usize,
    /// Fds that came with the hello's bytes.
    hello_fds: Vec<OwnedFd>,
    /// The receiving end of the peer's fd side socket (from its hello): the fd of each frame
    /// flagged [`FLAG_HAS_FD`] is read here when the frame is parsed, never waited for.
    side: Option<UnixStream>,
}

enum Parsed {
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
    fn take_fd(&mut self, has_fd: bool, fds_on: bool) -> Result<Option<OwnedFd>, Error> {
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
    fn parse(&mut self, max_frame: u64, fds_on: bool) -> Result<Option<Parsed>, Error> {
        let avail = &self.buf[self.start..self.end];
        let m = avail.len().min(MAGIC.len());
        if avail[..m] != MAGIC[..m] {
            return Err(Error::BadFrame("bad magic"));
        }
        if avail.len() < HEADER_LEN {
            return Ok(None);
        }
        let flags = header_flags_field(avail);
        let len = header_len_field(avail);
        if flags & !KNOWN_FLAGS != 0 {
            return Err(Error::BadFrame("unknown flag bits"));
        }
        let has_fd = flags & FLAG_HAS_FD != 0;
        let ping = flags & FLAG_PING != 0;
        let end = flags & FLAG_END != 0;
        if ping && end {
            return Err(Error::BadFrame("both ping and end flags"));
        }
        if (ping || end) && (has_fd || len != 0) {
            return Err(Error::BadFrame("ping or end frame with a payload or an fd"));
        }
        if flags & FLAG_HELLO != 0 {
            return Err(Error::BadFrame("a hello after the first frame"));
        }
        if len > max_frame {
            return Err(Error::FrameTooLarge {
                len,
                max: max_frame,
                received: true,
            });
        }
        let total = len + HEADER_LEN as u64;
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
        let parsed = if ping {
            Parsed::Ping
        } else if end {
            Parsed::End
        } else {
            let body = &self.buf[self.start + HEADER_LEN..self.start + total];
            Parsed::Frame(Frame {
                payload: AlignedBuf::from_slice(body),
                fd,
            })
        };
        self.start += total;
        Ok(Some(parsed))
    }

    /// Reads the peer's hello, the first frame: with `recvmsg` (its fd rides inline), never
    /// more than its 16 bytes, so every fd these reads bring belongs to it. `Ok(false)`: not all
    /// of it is here yet (only without `wait`).
    fn read_hello(&mut self, sock: BorrowedFd<'_>, wait: bool) -> Result<bool, Error> {
        while self.hello_len < HEADER_LEN {
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
            if truncated || self.hello_fds.len() > 1 {
                return Err(Error::TooManyFds); // all closed with the channel's state
            }
            self.hello_len += r.bytes;
            let m = self.hello_len.min(MAGIC.len());
            if self.hello[..m] != MAGIC[..m] {
                return Err(Error::BadFrame("bad magic"));
            }
        }
        let flags = header_flags_field(&self.hello);
        if flags & !KNOWN_FLAGS != 0 {
            return Err(Error::BadFrame("unknown flag bits"));
        }
        if flags & FLAG_HELLO == 0 || flags & !(FLAG_HELLO | FLAG_HAS_FD) != 0 {
            return Err(Error::BadFrame("the first frame is not a hello"));
        }
        if header_len_field(&self.hello) != 0 {
            return Err(Error::BadFrame("a hello with a payload"));
        }
        match (flags & FLAG_HAS_FD != 0, self.hello_fds.pop()) {
            (true, Some(fd)) => {
                if !sys::is_stream_socket(fd.as_fd()) {
                    return Err(Error::BadFrame("the hello's fd is not a stream socket"));
                }
                self.side = Some(UnixStream::from(fd));
            }
            (true, None) => return Err(Error::MissingFd),
            (false, Some(_)) => return Err(Error::UnexpectedFd),
            (false, None) => {}
        }
        self.hello_done = true;
        Ok(true)
    }

    /// The error for end of stream now.
    fn eof_error(&self) -> Error {
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
        let expected = if avail.len() >= HEADER_LEN {
            header_len_field(avail).saturating_add(HEADER_LEN as u64)
        } else {
            HEADER_LEN as u64
        };
        Error::Truncated {
            expected,
            got: avail.len() as u64,
        }
    }

    /// Makes room at the end of the buffer for the rest of the frame at the parse position,
    /// and returns how many bytes to ask the kernel for.
    ///
    /// After a big frame, with nothing buffered, only a header is read: if the next frame is
    /// big too, its payload then goes straight from the kernel into its own buffer, with no
    /// part of it copied through this one. Small frames read as much as fits.
    fn make_room(&mut self) -> usize {
        if self.buf.is_empty() {
            self.buf = vec![0; RBUF];
        }
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            return if self.last_big { HEADER_LEN } else { RBUF };
        }
        let avail = &self.buf[self.start..self.end];
        let need = if avail.len() >= HEADER_LEN {
            // A small frame (big ones leave the buffer when their header is parsed).
            (header_len_field(avail) as usize).saturating_add(HEADER_LEN)
        } else {
            HEADER_LEN
        };
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

// ---------------------------------------------------------------------------------------------
// Channel

/// A framed, non-blocking channel over a connected Unix stream socket: the sync_io core.
///
/// It never blocks and owns no thread. Sends write at once when they can and queue the rest;
/// the owner polls [`as_fd`](AsFd::as_fd) for readability (then calls
/// [`try_recv`](Channel::try_recv)), for writability while [`wants_write`](Channel::wants_write)
/// (then calls [`flush`](Channel::flush)), and wakes up at
/// [`next_deadline`](Channel::next_deadline) (then calls [`on_timer`](Channel::on_timer)).
/// [`recv_blocking`](Channel::recv_blocking) and [`flush_blocking`](Channel::flush_blocking) do
/// all of that for simple blocking users. See [the module docs](super) for the wire format and
/// the error model.
///
/// Timers only fire when [`on_timer`](Channel::on_timer) runs: a sync_io owner with
/// `auto_ping` or `idle_timeout` set must call it at [`next_deadline`](Channel::next_deadline)
/// even while busy with traffic (the blocking helpers and [`AsyncChannel`](super::AsyncChannel)
/// do).
///
/// Dropping a channel closes the socket; frames still in the send queue are lost. To hand
/// everything over first, [`flush_blocking`](Channel::flush_blocking) (or
/// [`end_sending`](Channel::end_sending) and wait for [`is_send_done`](Channel::is_send_done)).
pub struct Channel {
    sock: UnixStream,
    cfg: ChannelConfig,
    tx: SendQueue,
    rx: Rx,
    hosed: bool,
    /// `end_sending` was called.
    ended: bool,
    /// The END frame is written and the socket shut down for writing.
    send_done: bool,
    /// Bytes written to the socket so far (headers included).
    written: u64,
    last_tx: Instant,
    last_rx: Instant,
    /// The sending end of our fd side socket (its receiving end goes to the peer in our
    /// hello); `None` on a channel without fds.
    side: Option<UnixStream>,
    /// The receiving end of our side socket, until the hello takes it to the peer.
    side_peer: Option<OwnedFd>,
    /// The hello is sent (or queued): it goes just before the first frame of any kind.
    hello_sent: bool,
    /// The last flush stopped because the side socket had no room for the head frame's fd:
    /// poll the side socket for writability ([`Channel::write_fd`]).
    side_full: bool,
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channel")
            .field("fd", &self.sock.as_raw_fd())
            .field("side_fd", &self.side.as_ref().map(|s| s.as_raw_fd()))
            .field("queued_bytes", &self.tx.bytes)
            .field("queued_chunks", &self.tx.chunks.len())
            .field("hosed", &self.hosed)
            .field("sending_ended", &self.ended)
            .field("send_done", &self.send_done)
            .field("config", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

impl AsRawFd for Channel {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

impl Channel {
    /// Two connected channels (a `socketpair`, close-on-exec): typically one end is kept and the
    /// other passed to a child process or sent to a peer with `SCM_RIGHTS`.
    pub fn pair(config: ChannelConfig) -> Result<(Channel, Channel), Error> {
        let (a, b) = UnixStream::pair().map_err(Error::Io)?;
        Ok((
            Channel::from_stream(a, config.clone())?,
            Channel::from_stream(b, config)?,
        ))
    }

    /// Wraps a connected Unix stream socket. The peer must be a `Channel` too: the first
    /// frame in each direction is a hello, sent just before the first frame of any kind (see
    /// [the module docs](super)). With fds enabled ([`ChannelConfig::fds`]), this makes the fd
    /// side socket (a `socketpair`), whose receiving end the hello carries.
    ///
    /// Nothing is written or read here, so a channel may be made, left unused and dropped
    /// while its socket lives on elsewhere (the other end of a [`pair`](Channel::pair) passed
    /// to another process, say): that process wraps it in a channel of its own.
    ///
    /// The socket is put in *blocking* mode, yet no call but
    /// [`recv_blocking`](Channel::recv_blocking) ever waits: every other read and write passes
    /// `MSG_DONTWAIT`.
    /// That lets `recv_blocking` with no time limit wait inside one `recv` (one system call
    /// per frame, like a plain blocking read) instead of a failed read, `poll` and a read. Put the
    /// fd in your own poll loop as usual: readiness is the same in either mode.
    pub fn from_stream(stream: UnixStream, config: ChannelConfig) -> Result<Channel, Error> {
        stream.set_nonblocking(false).map_err(Error::Io)?;
        let (side, side_peer) = if config.fds {
            let (mine, theirs) = UnixStream::pair().map_err(Error::Io)?;
            (Some(mine), Some(OwnedFd::from(theirs)))
        } else {
            (None, None)
        };
        let now = Instant::now();
        Ok(Channel {
            sock: stream,
            cfg: config,
            tx: SendQueue::default(),
            rx: Rx::default(),
            hosed: false,
            ended: false,
            send_done: false,
            written: 0,
            last_tx: now,
            last_rx: now,
            side,
            side_peer,
            hello_sent: false,
            side_full: false,
        })
    }

    /// Connects to the Unix socket at `path` (a blocking `connect`, which for Unix sockets
    /// returns at once unless the listener's backlog is full).
    pub fn connect(path: impl AsRef<Path>, config: ChannelConfig) -> Result<Channel, Error> {
        let s = UnixStream::connect(path).map_err(Error::Io)?;
        Channel::from_stream(s, config)
    }

    /// The configuration.
    pub fn config(&self) -> &ChannelConfig {
        &self.cfg
    }

    /// Whether a hosing error ended the channel.
    pub fn is_hosed(&self) -> bool {
        self.hosed
    }

    /// Records a hosing error (dropping everything queued or buffered) and returns it.
    pub(crate) fn hose(&mut self, e: Error) -> Error {
        if e.is_hosing() {
            self.hosed = true;
            self.tx = SendQueue::default();
            self.rx = Rx::default();
        }
        e
    }

    // -- sending --------------------------------------------------------------------------

    /// Sends one frame with `payload` and, optionally, an fd (the caller keeps its fd: it is
    /// duplicated only if the frame has to be queued).
    ///
    /// Never blocks and never fails because the peer is slow: what the socket does not take at
    /// once is queued (the unsent rest is copied) and written by [`flush`](Channel::flush).
    ///
    /// Refusals that leave the channel as it was (nothing of the frame sent or queued):
    /// [`Error::FrameTooLarge`] (payload over `max_frame`), [`Error::SendingEnded`], and
    /// [`Error::HighWater`]: with a high-water mark set, a frame is refused when the queue is
    /// not empty and its data bytes plus this frame would exceed the mark, or when the queue is
    /// empty, the frame alone exceeds the mark and the socket takes none of it right away (once
    /// its first byte is out a frame cannot be refused, so a frame larger than the mark may
    /// overfill an empty queue; for a frame with an fd, which goes out on the side socket
    /// first, "takes none of it" means that the data socket is not writable or the side socket
    /// has no room for the fd). A frame written entirely at once never counts. The first send
    /// of any kind also sends (or queues) the channel's hello.
    ///
    /// Hosing errors: [`Error::Reset`] (the peer is gone), [`Error::Io`].
    pub fn send(&mut self, payload: &[u8], fd: Option<BorrowedFd<'_>>) -> Result<(), Error> {
        self.submit(
            0,
            Payload::Borrowed(&[payload]),
            fd.map(FdArg::Borrowed),
            Kind::Data,
        )
    }

    /// Like [`send`](Channel::send), with the payload gathered from `parts` (written with one
    /// vectored `sendmsg`, not concatenated first).
    pub fn send_parts(&mut self, parts: &[&[u8]], fd: Option<BorrowedFd<'_>>) -> Result<(), Error> {
        self.submit(
            0,
            Payload::Borrowed(parts),
            fd.map(FdArg::Borrowed),
            Kind::Data,
        )
    }

    /// Like [`send_parts`](Channel::send_parts), with reference-counted parts: if the frame has
    /// to be queued, the queue keeps the parts (no copy). The fd, if any, is closed once sent
    /// (or when the frame is refused).
    pub fn send_shared(
        &mut self,
        parts: Vec<SharedBytes>,
        fd: Option<OwnedFd>,
    ) -> Result<(), Error> {
        self.submit(0, Payload::Shared(parts), fd.map(FdArg::Owned), Kind::Data)
    }

    /// The refusal of a frame that would take the queue past the high-water mark `limit`.
    fn over_high_water(&self, limit: usize) -> Error {
        Error::HighWater {
            queued: self.tx.counted,
            limit,
        }
    }

    fn submit(
        &mut self,
        mut flags: u32,
        payload: Payload<'_>,
        fd: Option<FdArg<'_>>,
        kind: Kind,
    ) -> Result<(), Error> {
        if self.hosed {
            return Err(Error::Hosed);
        }
        if kind == Kind::Data && self.ended {
            return Err(Error::SendingEnded);
        }
        if fd.is_some() && !self.cfg.fds {
            return Err(Error::FdsDisabled);
        }
        if !self.hello_sent && kind != Kind::Hello {
            self.send_hello()?;
        }
        let len = match &payload {
            Payload::Borrowed(p) => p.iter().try_fold(0usize, |a, s| a.checked_add(s.len())),
            Payload::Shared(p) => p
                .iter()
                .try_fold(0usize, |a, s| a.checked_add(s.as_slice().len())),
        }
        .unwrap_or(usize::MAX);
        if len as u64 > self.cfg.max_frame || len > usize::MAX - HEADER_LEN {
            return Err(Error::FrameTooLarge {
                len: len as u64,
                max: self.cfg.max_frame,
                received: false,
            });
        }
        if fd.is_some() {
            flags |= FLAG_HAS_FD;
        }
        let header = encode_header(flags, len as u64);
        let total = HEADER_LEN + len;
        let counted = kind == Kind::Data;

        if !self.tx.chunks.is_empty() {
            if let Some(limit) = self.cfg.high_water.filter(|_| counted) {
                if self.tx.counted.saturating_add(total) > limit {
                    return Err(self.over_high_water(limit));
                }
            }
            return self.enqueue(header, payload, fd, Cursor::default(), kind);
        }

        // The queue is empty: write right away (usually one `send`). A data frame's fd goes
        // first, on the side socket, so that it is there when the peer parses the frame; a
        // hello's rides inline with its first byte.
        let hello_fd = kind == Kind::Hello && fd.is_some();
        let mut fd_sent = false;
        if let Some(f) = fd.as_ref().filter(|_| !hello_fd) {
            let limit = self.cfg.high_water.filter(|_| counted);
            // Once the fd is out the frame can no longer be refused: refuse one over the mark
            // now unless the data socket will take some of it.
            if let Some(l) = limit.filter(|l| total > *l) {
                if !self.data_writable()? {
                    return Err(self.over_high_water(l));
                }
            }
            let side = self.side.as_ref().ok_or(Error::FdsDisabled)?;
            match sys::try_send_one_fd(side.as_fd(), f.as_fd()) {
                Ok(true) => fd_sent = true,
                Ok(false) => {
                    // No room for the fd: nothing of the frame goes now.
                    if let Some(limit) = limit.filter(|l| total > *l) {
                        return Err(self.over_high_water(limit));
                    }
                    self.side_full = true;
                    return self.enqueue(header, payload, fd, Cursor::default(), kind);
                }
                Err(e) => return Err(self.hose(Error::from_io(e))),
            }
        }
        let small = match &payload {
            Payload::Borrowed(parts) if !hello_fd && total <= sys::SMALL_SEND => Some(*parts),
            _ => None,
        };
        if let Some(parts) = small {
            // Small (the common control message; any fd is out already): one contiguous copy on
            // the stack, one `send`, no allocation.
            let mut flat = [0u8; sys::SMALL_SEND];
            flat[..HEADER_LEN].copy_from_slice(&header);
            let mut at = HEADER_LEN;
            for p in parts {
                flat[at..at + p.len()].copy_from_slice(p);
                at += p.len();
            }
            match sys::try_send(self.sock.as_fd(), &flat[..total]) {
                Ok(n) => {
                    self.written += n as u64;
                    if n > 0 {
                        self.note_tx();
                    }
                    if n == total {
                        if kind == Kind::End {
                            self.finish_sending();
                        }
                        return Ok(());
                    }
                    if n > 0 {
                        // Partly out: the rest is queued (it can no longer be refused).
                        let mut all: Vec<&[u8]> = Vec::with_capacity(parts.len() + 1);
                        all.push(&header);
                        all.extend_from_slice(parts);
                        let mut cur = Cursor::default();
                        cur.advance(&all, n);
                        drop(all);
                        return self.enqueue(header, payload, None, cur, kind);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(self.hose(Error::from_io(e))),
            }
        }
        let mut all: Vec<&[u8]> = Vec::with_capacity(1 + payload.count());
        all.push(&header);
        match &payload {
            Payload::Borrowed(p) => all.extend_from_slice(p),
            Payload::Shared(p) => all.extend(p.iter().map(|s| s.as_slice())),
        }
        let mut cur = Cursor::default();
        let mut written = 0usize;
        let mut done = false;
        while !done {
            let iov = cur.iov(&all);
            if iov.is_empty() {
                // Everything went (or a shared owner shrank: see `SharedBytes`).
                done = true;
                break;
            }
            let attach = if written == 0 && hello_fd {
                fd.as_ref().map(|f| f.as_fd())
            } else {
                None
            };
            match sys::try_send_vectored(self.sock.as_fd(), &iov, attach) {
                Ok(0) => break,
                Ok(n) => {
                    written += n;
                    self.written += n as u64;
                    cur.advance(&all, n);
                    done = written >= total;
                    self.note_tx();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(self.hose(Error::from_io(e))),
            }
        }
        drop(all);
        if done {
            if kind == Kind::End {
                self.finish_sending();
            }
            return Ok(()); // an fd we own is closed here: the kernel has its copy
        }
        if written == 0 && !fd_sent {
            if let Some(limit) = self.cfg.high_water.filter(|_| counted) {
                if total > limit {
                    return Err(self.over_high_water(limit));
                }
            }
        }
        let fd = if written == 0 && !fd_sent { fd } else { None };
        self.enqueue(header, payload, fd, cur, kind)
    }

    /// Sends (or queues) the hello, with the receiving end of our side socket if fds are on.
    #[cold]
    fn send_hello(&mut self) -> Result<(), Error> {
        self.hello_sent = true;
        let theirs = self.side_peer.take();
        let flags = if theirs.is_some() {
            FLAG_HELLO | FLAG_HAS_FD
        } else {
            FLAG_HELLO
        };
        self.submit(
            flags,
            Payload::Borrowed(&[]),
            theirs.map(FdArg::Owned),
            Kind::Hello,
        )
    }

    /// Whether the data socket would take some bytes now (a zero-timeout `poll`).
    fn data_writable(&mut self) -> Result<bool, Error> {
        let mut p = [PollFd::new(self.sock.as_fd(), false, true)];
        match sys::poll(&mut p, Some(Duration::ZERO)) {
            Ok(_) => Ok(p[0].ready.writable),
            Err(e) => Err(self.hose(Error::Io(e))),
        }
    }

    /// Queues the frame from `cur` on (a position in header + parts).
    fn enqueue(
        &mut self,
        header: [u8; HEADER_LEN],
        payload: Payload<'_>,
        fd: Option<FdArg<'_>>,
        cur: Cursor,
        kind: Kind,
    ) -> Result<(), Error> {
        let starts_frame = cur.idx == 0 && cur.off == 0;
        let fd_frame = fd.is_some();
        let fd = match fd {
            Some(f) => Some(f.into_owned().map_err(|e| self.hose(Error::Io(e)))?),
            None => None,
        };
        match payload {
            Payload::Borrowed(parts) => {
                let total = HEADER_LEN + parts.iter().map(|s| s.len()).sum::<usize>();
                if starts_frame
                    && !fd_frame
                    && kind == Kind::Data
                    && self.tx.try_coalesce(&header, parts, total)
                {
                    return Ok(());
                }
                let mut all: Vec<&[u8]> = Vec::with_capacity(parts.len() + 1);
                all.push(&header);
                all.extend_from_slice(parts);
                let rest = cur.iov(&all);
                let n: usize = rest.iter().map(|s| s.len()).sum();
                let mut v = Vec::with_capacity(n);
                for s in &rest {
                    v.extend_from_slice(s);
                }
                self.tx.push(Chunk {
                    data: ChunkData::Owned(v, 0),
                    fd,
                    starts_frame,
                    kind,
                    left: n,
                });
            }
            Payload::Shared(parts) => {
                let mut fd = fd;
                let mut first = true;
                if cur.idx == 0 {
                    self.tx.push(Chunk {
                        data: ChunkData::Header(header, cur.off),
                        fd: fd.take(),
                        starts_frame,
                        kind,
                        left: HEADER_LEN - cur.off,
                    });
                    first = false;
                }
                for (i, mut part) in parts.into_iter().enumerate() {
                    let idx = i + 1;
                    if idx < cur.idx {
                        continue;
                    }
                    if idx == cur.idx {
                        part.advance(cur.off);
                    }
                    let left = part.as_slice().len();
                    if left == 0 {
                        continue;
                    }
                    self.tx.push(Chunk {
                        data: ChunkData::Shared(part),
                        fd: fd.take(),
                        starts_frame: starts_frame && first,
                        kind,
                        left,
                    });
                    first = false;
                }
            }
        }
        Ok(())
    }

    fn note_tx(&mut self) {
        if self.cfg.auto_ping.is_some() {
            self.last_tx = Instant::now();
        }
    }

    fn note_rx(&mut self) {
        if self.cfg.idle_timeout.is_some() {
            self.last_rx = Instant::now();
        }
    }

    /// The END frame is out: no more writing on this socket.
    fn finish_sending(&mut self) {
        // The peer may be gone already; there is nothing left to do about that here.
        let _ = self.sock.shutdown(Shutdown::Write);
        self.send_done = true;
    }

    /// Writes as much of the send queue as the socket takes now. `Ok(true)`: the queue is
    /// empty. Hosing errors: [`Error::Reset`], [`Error::Io`].
    pub fn flush(&mut self) -> Result<bool, Error> {
        if self.hosed {
            return Err(Error::Hosed);
        }
        loop {
            if self.tx.chunks.is_empty() {
                self.side_full = false;
                return Ok(true);
            }
            let side = self.side.as_ref().map(|s| s.as_fd());
            let limit = match self.tx.send_fds(side) {
                Ok(n) => n,
                Err(e) => return Err(self.hose(e)),
            };
            self.side_full = limit == 0;
            if limit == 0 {
                return Ok(false);
            }
            let mut iov = Vec::with_capacity(limit.min(sys::IOV_MAX));
            let fd = self.tx.gather(limit, &mut iov);
            let res = if iov.is_empty() {
                Ok(0)
            } else {
                sys::try_send_vectored(self.sock.as_fd(), &iov, fd)
            };
            drop(iov);
            match res {
                Ok(n) => {
                    if n > 0 {
                        self.note_tx();
                    }
                    self.written += n as u64;
                    if self.tx.consume(n) {
                        self.finish_sending();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(self.hose(Error::from_io(e))),
            }
        }
    }

    /// Bytes waiting in the send queue (pings and the end frame included).
    pub fn queued_bytes(&self) -> usize {
        self.tx.bytes
    }

    /// Bytes written to the socket since the channel was made (frame headers included). Right
    /// after a frame is accepted by a send, it ends at `bytes_written() + queued_bytes()`: once
    /// `bytes_written()` reaches that position, the whole frame is in the kernel's hands. (A
    /// layer above uses this to know which of its frames never left.)
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// Whether the send queue is not empty: poll [`write_fd`](Channel::write_fd) for
    /// writability and call [`flush`](Channel::flush).
    pub fn wants_write(&self) -> bool {
        !self.hosed && !self.tx.chunks.is_empty()
    }

    /// The fd to poll for writability while [`wants_write`](Channel::wants_write): the data
    /// socket ([`as_fd`](AsFd::as_fd)), except when the last flush stopped because the fd side
    /// socket had no room for the next frame's fd (the peer has not yet parsed the frames
    /// whose fds fill it): then the side socket. Polling `as_fd` instead is correct but may
    /// spin in that case.
    pub fn write_fd(&self) -> BorrowedFd<'_> {
        match &self.side {
            Some(side) if self.side_full => side.as_fd(),
            _ => self.sock.as_fd(),
        }
    }

    /// The sending end of the fd side socket, if the channel has one (for a poller that keeps
    /// its own duplicate of the fds, with [`waits_on_side`](Channel::waits_on_side)).
    pub(crate) fn side_fd(&self) -> Option<BorrowedFd<'_>> {
        self.side.as_ref().map(|s| s.as_fd())
    }

    /// Whether [`write_fd`](Channel::write_fd) is the side socket now.
    pub(crate) fn waits_on_side(&self) -> bool {
        self.side.is_some() && self.side_full
    }

    /// Ends the sending side gracefully: queues an END frame after everything sent so far (and
    /// writes it if it can). Later sends fail with [`Error::SendingEnded`]; once the END frame
    /// is written the socket is shut down for writing ([`is_send_done`](Channel::is_send_done)).
    /// The peer receives every earlier frame, then [`Error::EndOfStream`]. Receiving on this
    /// channel goes on.
    pub fn end_sending(&mut self) -> Result<(), Error> {
        if self.hosed {
            return Err(Error::Hosed);
        }
        if self.ended {
            return Err(Error::SendingEnded);
        }
        self.ended = true;
        self.submit(FLAG_END, Payload::Borrowed(&[]), None, Kind::End)
    }

    /// Whether [`end_sending`](Channel::end_sending) was called.
    pub fn is_sending_ended(&self) -> bool {
        self.ended
    }

    /// Whether the END frame (and so everything before it) has been written.
    pub fn is_send_done(&self) -> bool {
        self.send_done
    }

    // -- receiving ------------------------------------------------------------------------

    /// Receives the next frame if one is complete, without blocking (`Ok(None)`: nothing yet).
    /// Keep-alive pings are consumed here.
    ///
    /// Hosing errors: [`Error::EndOfStream`] (after every frame the peer sent before ending),
    /// [`Error::PeerGone`], [`Error::Reset`], [`Error::Truncated`], [`Error::BadFrame`],
    /// [`Error::FrameTooLarge`], [`Error::UnexpectedFd`], [`Error::MissingFd`],
    /// [`Error::TooManyFds`], [`Error::Io`].
    pub fn try_recv(&mut self) -> Result<Option<Frame>, Error> {
        if self.hosed {
            return Err(Error::Hosed);
        }
        match self.recv_inner(false) {
            Ok(f) => Ok(f),
            Err(e) => Err(self.hose(e)),
        }
    }

    /// Reads until a frame is complete; with `wait`, reads block (the socket is in blocking
    /// mode, see [`from_stream`](Channel::from_stream)), so `Ok(None)` is never returned.
    ///
    /// After the hello, the data socket is read with plain `recv` (no control buffer: cheaper
    /// in the kernel than `recvmsg`); fds come from the side socket (see `Rx::take_fd`).
    fn recv_inner(&mut self, wait: bool) -> Result<Option<Frame>, Error> {
        if !self.rx.hello_done && !self.rx.read_hello(self.sock.as_fd(), wait)? {
            return Ok(None);
        }
        loop {
            if let Some(big) = self.rx.big.take_if(|b| b.filled >= b.payload.len()) {
                return Ok(Some(Frame {
                    payload: big.payload,
                    fd: big.fd,
                }));
            }
            if let Some(big) = self.rx.big.as_mut() {
                let dst = &mut big.payload[big.filled..];
                match sys::recv_plain(self.sock.as_fd(), dst, wait) {
                    Ok(0) => return Err(self.rx.eof_error()),
                    Ok(n) => {
                        big.filled += n;
                        self.note_rx();
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                    Err(e) => return Err(Error::from_io(e)),
                }
            }
            if self.rx.start < self.rx.end {
                match self.rx.parse(self.cfg.max_frame, self.cfg.fds)? {
                    Some(Parsed::Frame(f)) => return Ok(Some(f)),
                    Some(Parsed::Ping) | Some(Parsed::BigStarted) => continue,
                    Some(Parsed::End) => return Err(Error::EndOfStream),
                    None => {}
                }
            }
            let want = self.rx.make_room();
            let rx = &mut self.rx;
            let hi = rx.end.saturating_add(want).min(rx.buf.len());
            match sys::recv_plain(self.sock.as_fd(), &mut rx.buf[rx.end..hi], wait) {
                Ok(0) => return Err(rx.eof_error()),
                Ok(n) => {
                    rx.end += n;
                    self.note_rx();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(Error::from_io(e)),
            }
        }
    }

    // -- timers ---------------------------------------------------------------------------

    /// When [`on_timer`](Channel::on_timer) should run next: the earliest of the next
    /// keep-alive ping and the idle-timeout expiry (`None`: no timer, or hosed).
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.hosed {
            return None;
        }
        let idle = self
            .cfg
            .idle_timeout
            .and_then(|t| self.last_rx.checked_add(t));
        let ping = if self.ended {
            None
        } else {
            self.cfg.auto_ping.and_then(|p| self.last_tx.checked_add(p))
        };
        match (idle, ping) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Runs the timers as of `now`: queues (and writes if it can) a keep-alive ping when
    /// nothing was sent for the `auto_ping` period, and fails with [`Error::IdleTimeout`]
    /// (hosing) when nothing was received for `idle_timeout` (bytes waiting unread in the
    /// socket count as received). Early calls do nothing.
    pub fn on_timer(&mut self, now: Instant) -> Result<(), Error> {
        if self.hosed {
            return Err(Error::Hosed);
        }
        if let Some(idle) = self.cfg.idle_timeout {
            if now.saturating_duration_since(self.last_rx) >= idle {
                let mut p = [PollFd::new(self.sock.as_fd(), true, false)];
                let pending = match sys::poll(&mut p, Some(Duration::ZERO)) {
                    Ok(_) => p[0].ready.readable || p[0].ready.hangup || p[0].ready.error,
                    Err(e) => return Err(self.hose(Error::Io(e))),
                };
                if !pending {
                    return Err(self.hose(Error::IdleTimeout));
                }
                self.last_rx = now;
            }
        }
        if let Some(period) = self.cfg.auto_ping {
            if !self.ended && now.saturating_duration_since(self.last_tx) >= period {
                self.last_tx = now;
                if self.tx.pings == 0 {
                    self.submit(FLAG_PING, Payload::Borrowed(&[]), None, Kind::Ping)?;
                }
            }
        }
        Ok(())
    }

    // -- blocking conveniences ------------------------------------------------------------

    /// Waits (`poll`) for the next frame, at most `timeout` (`None`: no limit); `Ok(None)` on
    /// timeout. While waiting it keeps flushing the send queue and runs the timers, so two
    /// peers that flood each other while receiving this way never deadlock.
    pub fn recv_blocking(&mut self, timeout: Option<Duration>) -> Result<Option<Frame>, Error> {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        if timeout.is_none() && !self.hosed {
            // Nothing to flush and no timer to run: wait in `recv` itself.
            if self.next_deadline().is_none() && !self.wants_write() {
                match self.recv_inner(true) {
                    Ok(Some(f)) => return Ok(Some(f)),
                    // Someone made the socket non-blocking after all: wait with poll below.
                    Ok(None) => {}
                    Err(e) => return Err(self.hose(e)),
                }
            }
        }
        loop {
            // Timers run even while frames keep coming (our pings must go out regardless).
            self.run_due_timers()?;
            if let Some(f) = self.try_recv()? {
                return Ok(Some(f));
            }
            if self.wants_write() {
                self.flush()?;
            }
            if !self.wait(true, deadline)? {
                return Ok(None);
            }
        }
    }

    /// Waits (`poll`) until the send queue is written, at most `timeout` (`None`: no limit).
    /// `Ok(true)`: all written; `Ok(false)`: timed out with bytes still queued. Runs the
    /// timers meanwhile. It does not receive: if the peer is itself blocked sending to us,
    /// receive with [`recv_blocking`](Channel::recv_blocking) instead (it flushes too).
    pub fn flush_blocking(&mut self, timeout: Option<Duration>) -> Result<bool, Error> {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        loop {
            if self.flush()? {
                return Ok(true);
            }
            if !self.wait(false, deadline)? {
                return Ok(false);
            }
        }
    }

    /// Runs [`on_timer`](Channel::on_timer) if a timer is due; returns whether one was.
    pub(crate) fn run_due_timers(&mut self) -> Result<bool, Error> {
        let Some(due) = self.next_deadline() else {
            return Ok(false);
        };
        let now = Instant::now();
        if due > now {
            return Ok(false);
        }
        self.on_timer(now)?;
        Ok(true)
    }

    /// One wait: runs due timers, then polls (readability if `read`, writability while there
    /// is something to write) until the earlier of `deadline` and the next timer. Returns
    /// false once `deadline` has passed.
    fn wait(&mut self, read: bool, deadline: Option<Instant>) -> Result<bool, Error> {
        if self.run_due_timers()? {
            return Ok(true);
        }
        let now = Instant::now();
        if deadline.is_some_and(|d| d <= now) {
            return Ok(false);
        }
        let until = match (deadline, self.next_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let out = self.wants_write();
        let side = self.side.as_ref().filter(|_| out && self.side_full);
        let mut p = [
            PollFd::new(self.sock.as_fd(), read, out && side.is_none()),
            PollFd::new(self.write_fd(), false, side.is_some()),
        ];
        let n = if side.is_some() { 2 } else { 1 };
        if let Err(e) = sys::poll(&mut p[..n], until.map(|u| u.saturating_duration_since(now))) {
            return Err(self.hose(Error::Io(e)));
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::Arc;

    fn pair() -> (Channel, Channel) {
        Channel::pair(ChannelConfig::new()).unwrap()
    }

    fn pattern(i: usize, len: usize) -> Vec<u8> {
        (0..len).map(|k| (i * 7 + k / 3) as u8).collect()
    }

    /// A pipe whose read end carries a recognisable byte.
    fn tagged_fd(tag: u8) -> OwnedFd {
        let (r, w) = nix::unistd::pipe().unwrap();
        std::fs::File::from(w).write_all(&[tag]).unwrap();
        r
    }

    fn read_tag(fd: OwnedFd) -> u8 {
        let mut b = [0u8; 1];
        std::fs::File::from(fd).read_exact(&mut b).unwrap();
        b[0]
    }

    fn drain(c: &mut Channel, n: usize) -> Vec<Frame> {
        let mut out = Vec::new();
        while out.len() < n {
            match c.recv_blocking(Some(Duration::from_secs(20))).unwrap() {
                Some(f) => out.push(f),
                None => panic!("timed out after {} of {n} frames", out.len()),
            }
        }
        out
    }

    #[test]
    fn header_round_trip() {
        let h = encode_header(FLAG_HAS_FD, 0x0102_0304_0506);
        assert_eq!(&h[..4], b"FIPC");
        assert_eq!(header_flags_field(&h), FLAG_HAS_FD);
        assert_eq!(header_len_field(&h), 0x0102_0304_0506);
    }

    #[test]
    fn queued_frames_keep_order_and_fd_attribution() {
        let (mut a, mut b) = pair();
        // Fill the socket so everything below is queued (and coalesced where allowed).
        let filler = vec![0xAAu8; 1 << 20];
        while a.tx.chunks.is_empty() {
            a.send(&filler, None).unwrap();
        }
        let mut expect = Vec::new();
        for i in 0..300usize {
            let len = (i * 37) % 3000;
            let p = pattern(i, len);
            if i % 7 == 3 {
                let fd = tagged_fd(i as u8);
                a.send(&p, Some(fd.as_fd())).unwrap();
                drop(fd); // the queue holds its own duplicate
                expect.push((p, Some(i as u8)));
            } else if i % 11 == 5 {
                let sh = SharedBytes::from(p.clone());
                let fd = (i % 2 == 0).then(|| tagged_fd(i as u8));
                let tag = fd.as_ref().map(|_| i as u8);
                a.send_shared(
                    vec![
                        sh.clone(),
                        SharedBytes::new(Arc::new(Vec::<u8>::new()), 0..0).unwrap(),
                    ],
                    fd,
                )
                .unwrap();
                expect.push((p, tag));
            } else {
                let (x, y) = p.split_at(len / 2);
                a.send_parts(&[x, &[], y], None).unwrap();
                expect.push((p, None));
            }
        }
        assert!(a.wants_write());
        // Receive the fillers, then the frames in order; `b` flushes nothing, `a` is flushed
        // by a helper thread.
        let t = std::thread::spawn(move || {
            assert!(a.flush_blocking(Some(Duration::from_secs(20))).unwrap());
            a
        });
        let mut got = Vec::new();
        while got.len() < expect.len() {
            let f = drain(&mut b, 1).pop().unwrap();
            if f.payload.len() == filler.len() && f.payload[0] == 0xAA {
                assert!(got.is_empty(), "filler after data");
                continue;
            }
            got.push(f);
        }
        let a = t.join().unwrap();
        assert_eq!(a.queued_bytes(), 0);
        for (i, (f, (p, tag))) in got.into_iter().zip(expect).enumerate() {
            assert_eq!(&*f.payload, &p[..], "frame {i}");
            assert_eq!(f.fd.map(read_tag), tag, "fd of frame {i}");
        }
    }

    #[test]
    fn a_full_side_socket_holds_the_queue_and_is_what_to_poll() {
        let (mut a, mut b) = pair();
        // A side socket that holds only a few fds (the smallest send buffer the kernel allows).
        let side = a.side.as_ref().unwrap();
        nix::sys::socket::setsockopt(side, nix::sys::socket::sockopt::SndBuf, &1).unwrap();
        let side = side.as_raw_fd();
        let n = 200usize;
        for i in 0..n {
            let fd = tagged_fd(i as u8);
            a.send(&pattern(i, i % 50), Some(fd.as_fd())).unwrap();
            // Frames without fds queue behind (and coalesce with) those that wait.
            a.send(&pattern(i, 3), None).unwrap();
        }
        // The data socket has room; the side socket has not: that is what to wait for.
        assert!(a.wants_write());
        assert!(a.side_full);
        assert_eq!(a.write_fd().as_raw_fd(), side);
        assert!(!a.flush().unwrap());
        let t = std::thread::spawn(move || {
            assert!(a.flush_blocking(Some(Duration::from_secs(20))).unwrap());
            assert_eq!(a.write_fd().as_raw_fd(), a.as_raw_fd());
            a
        });
        let got = drain(&mut b, 2 * n);
        let _a = t.join().unwrap();
        for (k, f) in got.into_iter().enumerate() {
            let i = k / 2;
            if k % 2 == 0 {
                assert!(*f.payload == pattern(i, i % 50)[..], "frame {k}");
                assert_eq!(f.fd.map(read_tag), Some(i as u8), "fd of frame {k}");
            } else {
                assert!(
                    *f.payload == pattern(i, 3)[..] && f.fd.is_none(),
                    "frame {k}"
                );
            }
        }
    }

    #[test]
    fn big_frames_with_fd_and_aligned() {
        let (mut a, mut b) = pair();
        let big = pattern(1, (3 << 20) + 5);
        let small = pattern(2, 100);
        let t = std::thread::spawn(move || {
            for i in 0..4u8 {
                let fd = tagged_fd(i);
                if i % 2 == 0 {
                    a.send(&big, Some(fd.as_fd())).unwrap();
                } else {
                    a.send(&small, Some(fd.as_fd())).unwrap();
                }
            }
            a.send(&[], None).unwrap();
            assert!(a.flush_blocking(Some(Duration::from_secs(20))).unwrap());
            a
        });
        let frames = drain(&mut b, 5);
        let _a = t.join().unwrap();
        for (i, f) in frames.into_iter().enumerate() {
            assert_eq!(f.payload.as_ptr() as usize % 8, 0);
            if i == 4 {
                assert!(f.payload.is_empty() && f.fd.is_none());
                continue;
            }
            let want = if i % 2 == 0 { (3 << 20) + 5 } else { 100 };
            assert_eq!(f.payload.len(), want);
            assert_eq!(
                &f.payload[..50],
                &pattern(if i % 2 == 0 { 1 } else { 2 }, 50)[..]
            );
            assert_eq!(read_tag(f.fd.unwrap()), i as u8);
        }
    }

    #[test]
    fn partial_writes_queue_the_rest() {
        let (mut a, mut b) = pair();
        let big: Vec<u8> = pattern(9, 2 << 20);
        let owner: crate::transport::SharedOwner = Arc::new(big.clone());
        let parts = vec![
            SharedBytes::new(owner.clone(), 0..1000).unwrap(),
            SharedBytes::new(owner.clone(), 1000..(1 << 20)).unwrap(),
            SharedBytes::new(owner.clone(), (1 << 20)..(2 << 20)).unwrap(),
        ];
        let fd = tagged_fd(42);
        a.send_shared(parts, Some(fd)).unwrap();
        // The socket took part of it; the queue holds the rest by reference, not by copy.
        assert!(a.wants_write());
        assert!(a.queued_bytes() < (2 << 20) + HEADER_LEN);
        assert!(Arc::strong_count(&owner) > 1);
        let (x, y) = big.split_at(12345);
        a.send_parts(&[x, y], None).unwrap();
        let t = std::thread::spawn(move || {
            assert!(a.flush_blocking(Some(Duration::from_secs(20))).unwrap());
            a
        });
        let got = drain(&mut b, 2);
        let a = t.join().unwrap();
        assert_eq!(a.queued_bytes(), 0);
        assert_eq!(Arc::strong_count(&owner), 1);
        for (i, f) in got.into_iter().enumerate() {
            assert!(*f.payload == big[..], "frame {i}");
            assert_eq!(f.fd.map(read_tag), (i == 0).then_some(42));
        }

        // A direct write that the socket takes only partly, with a borrowed payload and fd.
        let (mut a, mut b) = pair();
        let fd = tagged_fd(7);
        a.send(&big, Some(fd.as_fd())).unwrap();
        drop(fd);
        assert!(a.wants_write());
        let t = std::thread::spawn(move || {
            assert!(a.flush_blocking(Some(Duration::from_secs(20))).unwrap());
        });
        let f = drain(&mut b, 1).pop().unwrap();
        t.join().unwrap();
        assert!(*f.payload == big[..]);
        assert_eq!(f.fd.map(read_tag), Some(7));
    }

    #[test]
    fn high_water_with_an_empty_queue_and_a_full_socket() {
        let limit = 64 << 10;
        let (mut a, mut b) = Channel::pair(ChannelConfig::new().high_water(Some(limit))).unwrap();
        // A first frame takes the hello out.
        a.send(b"first", None).unwrap();
        // Fill the socket behind the channel's back (the peer never parses these bytes).
        let junk = vec![0u8; 4096];
        loop {
            match sys::try_send_vectored(a.as_fd(), &[IoSlice::new(&junk)], None) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(!a.wants_write());
        // Larger than the mark and nothing taken: refused, nothing queued.
        let e = a.send(&vec![1u8; limit + 1], None).unwrap_err();
        assert!(matches!(e, Error::HighWater { queued: 0, .. }), "{e:?}");
        assert!(!a.wants_write() && !a.is_hosed());
        // Small ones queue up to the mark.
        a.send(&[2u8; 1000], None).unwrap();
        assert_eq!(a.queued_bytes(), 1000 + HEADER_LEN);
        // Pings are never refused and do not count.
        a.cfg.auto_ping = Some(Duration::from_millis(1));
        a.on_timer(Instant::now() + Duration::from_secs(1)).unwrap();
        assert_eq!(a.queued_bytes(), 1000 + 2 * HEADER_LEN);
        assert_eq!(a.tx.counted, 1000 + HEADER_LEN);
        drop(b.try_recv()); // (garbage for `b`: whatever it says, `a` is unaffected)
    }

    #[test]
    fn sizes_around_the_buffer_boundary() {
        let (mut a, mut b) = pair();
        let sizes = [
            65536usize, 65537, 0, 65552, 1, 200_000, 3, 65535, 300_000, 300_001, 16,
        ];
        let t = std::thread::spawn(move || {
            for (i, &n) in sizes.iter().enumerate() {
                let fd = (i % 3 == 1).then(|| tagged_fd(i as u8));
                a.send(&pattern(i, n), fd.as_ref().map(|f| f.as_fd()))
                    .unwrap();
                if i % 4 == 0 {
                    assert!(a.flush_blocking(Some(Duration::from_secs(20))).unwrap());
                }
            }
            assert!(a.flush_blocking(Some(Duration::from_secs(20))).unwrap());
            a
        });
        let got = drain(&mut b, sizes.len());
        let _a = t.join().unwrap();
        for (i, f) in got.into_iter().enumerate() {
            assert!(*f.payload == pattern(i, sizes[i])[..], "frame {i}");
            assert_eq!(
                f.fd.map(read_tag),
                (i % 3 == 1).then_some(i as u8),
                "fd {i}"
            );
        }
    }

    #[test]
    fn refusals_do_not_hose() {
        let (mut a, mut b) = Channel::pair(ChannelConfig::new().max_frame(10)).unwrap();
        assert!(matches!(
            a.send(&[0; 11], None),
            Err(Error::FrameTooLarge {
                len: 11,
                max: 10,
                received: false
            })
        ));
        a.send(&[1; 10], None).unwrap();
        a.end_sending().unwrap();
        assert!(a.is_send_done());
        assert!(matches!(a.send(&[1], None), Err(Error::SendingEnded)));
        assert!(matches!(a.end_sending(), Err(Error::SendingEnded)));
        assert!(!a.is_hosed());
        assert_eq!(&*drain(&mut b, 1)[0].payload, &[1; 10]);
        assert!(matches!(b.try_recv(), Err(Error::EndOfStream)));
        assert!(matches!(b.try_recv(), Err(Error::Hosed)));
        assert!(matches!(b.send(&[1], None), Err(Error::Hosed)));
        drop(b);
        assert!(matches!(a.recv_blocking(None), Err(Error::PeerGone)));
    }

    #[test]
    fn pings_are_silent_and_timers_work() {
        let cfg = ChannelConfig::new().auto_ping(Some(Duration::from_millis(1)));
        let (mut a, mut b) = Channel::pair(cfg).unwrap();
        let later = Instant::now() + Duration::from_secs(1);
        assert!(a.next_deadline().unwrap() < later);
        a.on_timer(later).unwrap();
        a.on_timer(later).unwrap(); // not due again yet
        a.send(b"x", None).unwrap();
        assert_eq!(&*drain(&mut b, 1)[0].payload, b"x");
        assert!(b.try_recv().unwrap().is_none());

        let cfg = ChannelConfig::new().idle_timeout(Some(Duration::from_millis(5)));
        let (mut a, _b) = Channel::pair(cfg).unwrap();
        let later = Instant::now() + Duration::from_secs(1);
        assert!(matches!(a.on_timer(later), Err(Error::IdleTimeout)));
        assert!(matches!(a.on_timer(later), Err(Error::Hosed)));
        assert_eq!(a.next_deadline(), None);
    }

    #[test]
    fn raw_bad_input() {
        /// A channel fed `bytes` (and `fd`, with their first byte) by a raw peer that sent a
        /// hello without a side socket first: every frame it delivers, then its error.
        fn raw_case(bytes: &[u8], fd: Option<BorrowedFd<'_>>) -> (Vec<Frame>, Error) {
            let (raw, theirs) = UnixStream::pair().unwrap();
            let mut c =
                Channel::from_stream(theirs, ChannelConfig::new().max_frame(1 << 20)).unwrap();
            sys::send_with_fds(&raw, &encode_header(FLAG_HELLO, 0), &[]).unwrap();
            sys::send_with_fds(&raw, bytes, fd.as_slice()).unwrap();
            drop(raw);
            let mut frames = Vec::new();
            let e = loop {
                match c.try_recv() {
                    Ok(Some(f)) => frames.push(f),
                    Ok(None) => panic!("all bytes are there"),
                    Err(e) => break e,
                }
            };
            assert!(matches!(c.try_recv(), Err(Error::Hosed)));
            (frames, e)
        }
        let err = |bytes: &[u8]| raw_case(bytes, None).1;
        let frame = |flags: u32, len: u64, body: &[u8]| {
            let mut v = encode_header(flags, len).to_vec();
            v.extend_from_slice(body);
            v
        };
        assert!(matches!(err(b"GARBAGE!"), Error::BadFrame("bad magic")));
        assert!(matches!(err(&frame(1 << 9, 0, &[])), Error::BadFrame(_)));
        assert!(matches!(
            err(&frame(FLAG_PING | FLAG_END, 0, &[])),
            Error::BadFrame(_)
        ));
        assert!(matches!(
            err(&frame(FLAG_PING, 1, &[0])),
            Error::BadFrame(_)
        ));
        assert!(matches!(
            err(&frame(FLAG_HELLO, 0, &[])),
            Error::BadFrame("a hello after the first frame")
        ));
        assert!(matches!(
            err(&frame(0, 100, &[0; 10])),
            Error::Truncated {
                expected: 116,
                got: 26
            }
        ));
        assert!(matches!(
            err(&frame(0, 1 << 40, &[])),
            Error::FrameTooLarge {
                len: 0x100_0000_0000,
                max: 0x10_0000,
                received: true
            }
        ));
        assert!(matches!(
            err(&b"FIPC\0\0"[..]),
            Error::Truncated {
                expected: 16,
                got: 6
            }
        ));
        // A peer whose hello had no side socket cannot send fds.
        assert!(matches!(
            err(&frame(FLAG_HAS_FD, 1, &[0])),
            Error::MissingFd
        ));
        // An fd on the data socket, after the hello: read with plain `recv`, so the kernel
        // discards it (closes it); the frame arrives without it.
        let (r, w) = nix::unistd::pipe().unwrap();
        let (frames, e) = raw_case(&frame(0, 1, &[7]), Some(r.as_fd()));
        drop(r);
        assert!(matches!(e, Error::PeerGone), "{e:?}");
        assert_eq!(frames.len(), 1);
        assert!(frames[0].fd.is_none() && *frames[0].payload == [7]);
        // No read end is left anywhere: the pipe is broken.
        assert_eq!(nix::unistd::write(&w, b"x"), Err(nix::errno::Errno::EPIPE));
    }

    #[test]
    fn bad_hellos() {
        fn hello_case(bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Error {
            let (raw, theirs) = UnixStream::pair().unwrap();
            let mut c = Channel::from_stream(theirs, ChannelConfig::new()).unwrap();
            sys::send_with_fds(&raw, bytes, fds).unwrap();
            drop(raw);
            let e = match c.try_recv() {
                Ok(_) => panic!("no frame can come"),
                Err(e) => e,
            };
            assert!(matches!(c.try_recv(), Err(Error::Hosed)));
            e
        }
        // Not a hello first.
        assert!(matches!(
            hello_case(&encode_header(0, 0), &[]),
            Error::BadFrame("the first frame is not a hello")
        ));
        assert!(matches!(
            hello_case(&encode_header(FLAG_HELLO | FLAG_PING, 0), &[]),
            Error::BadFrame("the first frame is not a hello")
        ));
        assert!(matches!(
            hello_case(&encode_header(FLAG_HELLO, 1), &[]),
            Error::BadFrame("a hello with a payload")
        ));
        assert!(matches!(
            hello_case(&encode_header(FLAG_HELLO, 0)[..9], &[]),
            Error::Truncated {
                expected: 16,
                got: 9
            }
        ));
        assert!(matches!(hello_case(&[], &[]), Error::PeerGone));
        // The fd of the hello: flagged and absent, unflagged and present, two, not a socket.
        let (s1, s2) = UnixStream::pair().unwrap();
        assert!(matches!(
            hello_case(&encode_header(FLAG_HELLO | FLAG_HAS_FD, 0), &[]),
            Error::MissingFd
        ));
        assert!(matches!(
            hello_case(&encode_header(FLAG_HELLO, 0), &[s1.as_fd()]),
            Error::UnexpectedFd
        ));
        assert!(matches!(
            hello_case(
                &encode_header(FLAG_HELLO | FLAG_HAS_FD, 0),
                &[s1.as_fd(), s2.as_fd()]
            ),
            Error::TooManyFds
        ));
        let (r, _w) = nix::unistd::pipe().unwrap();
        assert!(matches!(
            hello_case(&encode_header(FLAG_HELLO | FLAG_HAS_FD, 0), &[r.as_fd()]),
            Error::BadFrame("the hello's fd is not a stream socket")
        ));
        // Read in pieces: the fd rides with the first byte and is kept until the end.
        let (raw, theirs) = UnixStream::pair().unwrap();
        let mut c = Channel::from_stream(theirs, ChannelConfig::new()).unwrap();
        let (side_tx, side_rx) = UnixStream::pair().unwrap();
        let h = encode_header(FLAG_HELLO | FLAG_HAS_FD, 0);
        sys::send_with_fds(&raw, &h[..3], &[side_rx.as_fd()]).unwrap();
        drop(side_rx);
        assert!(c.try_recv().unwrap().is_none());
        sys::send_with_fds(&raw, &h[3..], &[]).unwrap();
        assert!(c.try_recv().unwrap().is_none());
        let p = tagged_fd(5);
        assert!(sys::try_send_one_fd(side_tx.as_fd(), p.as_fd()).unwrap());
        sys::send_with_fds(&raw, &encode_header(FLAG_HAS_FD, 0), &[]).unwrap();
        let f = c.try_recv().unwrap().unwrap();
        assert_eq!(read_tag(f.fd.unwrap()), 5);
    }
}
