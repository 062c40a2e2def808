//! The sync_io core: [`Channel`], a non-blocking framed channel over a Unix stream socket.
//!
//! * `wire`: the frame header, typed, and its checks;
//! * `frame`: [`OutFrame`] (what a send takes and the queue owns, with its give-back should it
//!   never leave) and [`Frame`] (what a receive hands out);
//! * `submit`: the one send path (write at once what the socket takes, queue the rest);
//! * `tx`: the send queue;
//! * `rx`: the receive state (hello, small and big frames, fds from the side socket);
//! * `config`: [`ChannelConfig`];
//! * this module: the [`Channel`] that owns the sockets and drives the two, and its
//!   [`Pollable`] contract.

mod config;
mod frame;
mod keepalive;
#[cfg(test)]
mod kind_tests;
mod link;
mod mq;
mod ring;
mod rx;
mod submit;
#[cfg(test)]
mod tests;
mod tx;
mod wire;

use std::fmt;
use std::io::{self, IoSlice};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

pub use self::config::{
    ChannelConfig, ChannelKind, WaitPolicy, DEFAULT_MAX_FRAME, DEFAULT_RING_CAPACITY,
};
pub use self::frame::{Frame, OutFrame};
use self::link::Link;
use self::rx::{Parsed, Rx};
use self::tx::{Kind, SendQueue};
use self::wire::FLAG_END;
use super::Error;
use crate::hosing::Hosing;
use crate::poll::{Interest, Pollable};
use crate::sys;

/// A framed, non-blocking channel over a connected Unix stream socket: the sync_io core.
///
/// It never blocks and owns no thread. Sends write at once when they can and queue the rest;
/// the owner polls what [`interest`](Pollable::interest) names (an fd to read, one to write
/// while something is queued, a deadline), then calls [`on_ready`](Pollable::on_ready) (writes,
/// timers) and [`try_recv`](Channel::try_recv). Ask `interest` again before every poll: on a
/// [`ChannelKind::ShmQueue`] channel it is also what tells the peer to wake this side with a
/// byte on the socket, and on a [`ChannelKind::PosixMq`] channel the fd to read is an epoll fd,
/// not [`as_fd`](AsFd::as_fd). (On the socket kind, polling `as_fd` for readability and, while
/// [`wants_write`](Channel::wants_write), for writability, and calling
/// [`on_timer`](Channel::on_timer) at [`next_deadline`](Channel::next_deadline) does the
/// same.)
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
    hosing: Hosing,
    /// `end_sending` was called.
    ended: bool,
    /// The END frame is written (and, on the socket kind, the socket shut down for writing).
    send_done: bool,
    /// The peer's END frame was received: every frame it sent has been delivered, and
    /// receiving is over (not an error: see [`is_peer_ended`](Channel::is_peer_ended)).
    peer_ended: bool,
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
    /// poll the side socket for writability (`write_fd`).
    side_full: bool,
    /// The shared-memory rings of a [`ChannelKind::ShmQueue`] channel (`None`: the socket
    /// kind).
    link: Option<Box<Link>>,
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channel")
            .field("fd", &self.sock.as_raw_fd())
            .field("side_fd", &self.side.as_ref().map(|s| s.as_raw_fd()))
            .field("queued_bytes", &self.tx.bytes)
            .field("queued_chunks", &self.tx.chunks.len())
            .field("hosed", &self.hosing.is_hosed())
            .field("sending_ended", &self.ended)
            .field("send_done", &self.send_done)
            .field("peer_ended", &self.peer_ended)
            .field("kind", &self.cfg.kind)
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
    /// [the module docs](super)). With fds enabled ([`ChannelConfig::with_fds`]), this makes the fd
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
        let link = Link::new(&config, stream.as_fd())?.map(Box::new);
        let now = Instant::now();
        Ok(Channel {
            sock: stream,
            cfg: config,
            tx: SendQueue::default(),
            rx: Rx::default(),
            hosing: Hosing::default(),
            ended: false,
            send_done: false,
            peer_ended: false,
            written: 0,
            last_tx: now,
            last_rx: now,
            side,
            side_peer,
            hello_sent: false,
            side_full: false,
            link,
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
        self.hosing.is_hosed()
    }

    /// Records a hosing error (dropping everything queued or buffered) and returns it.
    pub(crate) fn hose(&mut self, e: Error) -> Error {
        let (e, now) = self.hosing.file(e);
        if now {
            self.tx = SendQueue::default();
            self.rx = Rx::default();
        }
        e
    }

    /// Hoses the channel for a layer above that found it broken: both queues are dropped (the
    /// unwritten frames' `on_unsent` run), every later call answers [`Error::Hosed`].
    pub(crate) fn abandon(&mut self) {
        if self.hosing.mark() {
            self.tx = SendQueue::default();
            self.rx = Rx::default();
        }
    }

    // -- sending --------------------------------------------------------------------------

    /// Sends one frame: bytes (`b"..."`, a `&[u8]`, a `&Vec<u8>`) or an [`OutFrame`] (parts,
    /// shared parts, an fd, an `on_unsent`).
    ///
    /// Never blocks and never fails because the peer is slow: what the socket does not take at
    /// once is queued (borrowed bytes are copied, a borrowed fd duplicated, shared parts kept)
    /// and written by [`flush`](Channel::flush).
    ///
    /// Refusals that leave the channel as it was (nothing of the frame sent or queued; its
    /// `on_unsent` runs): [`Error::FrameTooLarge`] (payload over `max_frame`),
    /// [`Error::SendingEnded`], [`Error::FdsDisabled`], and [`Error::HighWater`]: with a
    /// high-water mark set, a frame is refused when the queue is not empty and its data bytes
    /// plus this frame would exceed the mark, or when the queue is empty, the frame alone
    /// exceeds the mark and the socket takes none of it right away (once its first byte is out
    /// a frame cannot be refused, so a frame larger than the mark may overfill an empty queue;
    /// for a frame with an fd, which goes out on the side socket first, "takes none of it"
    /// means that the data socket is not writable or the side socket has no room for the fd).
    /// A frame written entirely at once never counts. The first send of any kind also sends
    /// (or queues) the channel's hello.
    ///
    /// Hosing errors: [`Error::Reset`] (the peer is gone), [`Error::Io`].
    pub fn send<'a>(&mut self, frame: impl Into<OutFrame<'a>>) -> Result<(), Error> {
        self.submit(0, frame.into(), Kind::Data)
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

    /// The END frame is out: no more writing on this socket. A ring or queue channel leaves
    /// its socket open for writing: it still rings the peer's doorbell there when it makes room
    /// in the peer's ring (the peer may go on sending after our end).
    fn finish_sending(&mut self) {
        if self.link.is_none() {
            // The peer may be gone already; there is nothing left to do about that here.
            let _ = self.sock.shutdown(Shutdown::Write);
        }
        self.send_done = true;
    }

    /// Writes as much of the send queue as the socket takes now. `Ok(true)`: the queue is
    /// empty. Hosing errors: [`Error::Reset`], [`Error::Io`].
    pub fn flush(&mut self) -> Result<bool, Error> {
        self.hosing.check::<Error>()?;
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
                Ok(Some(0))
            } else {
                write_data(&self.sock, self.link.as_deref_mut(), &iov, fd, false)
            };
            drop(iov);
            match res {
                Ok(Some(n)) => {
                    if n > 0 {
                        self.note_tx();
                    }
                    self.written += n as u64;
                    if self.tx.consume(n) {
                        self.finish_sending();
                    }
                }
                Ok(None) => {
                    if let Some(link) = &self.link {
                        // A full ring or queue: a peer that is gone will never make room.
                        if link.peer_check_due() {
                            if let Err(e) = link::check_alive(self.sock.as_fd()) {
                                return Err(self.hose(e));
                            }
                        }
                    }
                    return Ok(false);
                }
                Err(e) => return Err(self.hose(e)),
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

    /// Whether the send queue is not empty (the [`interest`](Pollable::interest) then has an
    /// fd to watch for writing: see `write_fd`), for [`flush`](Channel::flush).
    pub fn wants_write(&self) -> bool {
        !self.hosing.is_hosed() && !self.tx.chunks.is_empty()
    }

    /// The fd to poll for writability while [`wants_write`](Channel::wants_write): the data
    /// socket ([`as_fd`](AsFd::as_fd)), except when the last flush stopped because the fd side
    /// socket had no room for the next frame's fd (the peer has not yet parsed the frames
    /// whose fds fill it): then the side socket. Polling `as_fd` instead is correct but may
    /// spin in that case.
    pub(crate) fn write_fd(&self) -> BorrowedFd<'_> {
        match &self.side {
            Some(side) if self.side_full => side.as_fd(),
            _ => self.sock.as_fd(),
        }
    }

    /// Ends the sending side gracefully: queues an END frame after everything sent so far (and
    /// writes it if it can). Later sends fail with [`Error::SendingEnded`]; once the END frame
    /// is written the socket is shut down for writing ([`is_send_done`](Channel::is_send_done)).
    /// The peer receives every earlier frame, then the end: its receives answer `Ok(None)`
    /// from then on and its [`is_peer_ended`](Channel::is_peer_ended) is true (not an error;
    /// it may go on sending to this side). Receiving on this channel goes on.
    pub fn end_sending(&mut self) -> Result<(), Error> {
        self.hosing.check::<Error>()?;
        if self.ended {
            return Err(Error::SendingEnded);
        }
        self.ended = true;
        self.submit(FLAG_END, OutFrame::new(&[]), Kind::End)
    }

    /// [`end_sending`](Channel::end_sending) (unless called before), then waits up to `timeout`
    /// (`None`: no limit) for the END frame and everything before it to be written, like
    /// [`flush_blocking`](Channel::flush_blocking): `Ok(true)` once written, `Ok(false)` at the
    /// timeout (the rest stays queued; call again, or [`flush`](Channel::flush)).
    pub fn end_sending_blocking(&mut self, timeout: Option<Duration>) -> Result<bool, Error> {
        if !self.ended {
            self.end_sending()?;
        }
        self.flush_blocking(timeout)
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

    /// Receives the next frame if one is complete, without blocking (`Ok(None)`: nothing yet,
    /// or nothing ever again once the peer ended its sending: see
    /// [`is_peer_ended`](Channel::is_peer_ended)). Keep-alive pings are consumed here.
    ///
    /// Hosing errors: [`Error::PeerGone`], [`Error::Reset`], [`Error::Truncated`], [`Error::BadFrame`],
    /// [`Error::FrameTooLarge`], [`Error::UnexpectedFd`], [`Error::MissingFd`],
    /// [`Error::TooManyFds`], [`Error::Io`].
    pub fn try_recv(&mut self) -> Result<Option<Frame>, Error> {
        self.hosing.check::<Error>()?;
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
        if self.peer_ended {
            return Ok(None);
        }
        if !self.rx.hello_done {
            if let Some(link) = &self.link {
                link.settle();
            }
            if !self.rx.read_hello(self.sock.as_fd(), wait)? {
                return Ok(None);
            }
            self.check_kind()?;
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
                match read_data(&self.sock, self.link.as_deref_mut(), dst, wait)? {
                    Some(0) => return Err(self.rx.eof_error()),
                    Some(n) => {
                        big.filled += n;
                        self.note_rx();
                        continue;
                    }
                    None => return Ok(None),
                }
            }
            if self.rx.start < self.rx.end {
                match self.rx.parse(self.cfg.max_frame, self.cfg.fds)? {
                    Some(Parsed::Frame(f)) => return Ok(Some(f)),
                    Some(Parsed::Ping) | Some(Parsed::BigStarted) => continue,
                    Some(Parsed::End) => {
                        self.peer_ended = true;
                        // Nothing follows the END frame: what the buffer holds is done with.
                        self.rx.release_buffers();
                        return Ok(None);
                    }
                    None => {}
                }
            }
            let want = self.rx.make_room();
            let rx = &mut self.rx;
            let hi = rx.end.saturating_add(want).min(rx.buf.len());
            let dst = &mut rx.buf[rx.end..hi];
            match read_data(&self.sock, self.link.as_deref_mut(), dst, wait)? {
                Some(0) => return Err(rx.eof_error()),
                Some(n) => {
                    rx.end += n;
                    self.note_rx();
                }
                None => return Ok(None),
            }
        }
    }

    // -- blocking conveniences ------------------------------------------------------------

    /// Whether the peer ended its sending ([`end_sending`](Channel::end_sending) on its side)
    /// and its END frame has been received: every frame it sent before has been delivered,
    /// nothing more will come, and receives answer `Ok(None)` at once. This is the graceful
    /// end, not an error: the channel is not hosed, and this side may go on sending (and end
    /// its own sending when done).
    pub fn is_peer_ended(&self) -> bool {
        self.peer_ended
    }

    /// Waits (`poll`) for the next frame, at most `timeout` (`None`: no limit); `Ok(None)` on
    /// timeout, or at once when the peer has ended its sending
    /// ([`is_peer_ended`](Channel::is_peer_ended); with no timeout, that is the only `None`).
    /// While waiting it keeps flushing the send queue and runs the timers, so two
    /// peers that flood each other while receiving this way never deadlock.
    pub fn recv_blocking(&mut self, timeout: Option<Duration>) -> Result<Option<Frame>, Error> {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        if timeout.is_none() && !self.hosing.is_hosed() && self.link.is_none() {
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
            if self.peer_ended {
                return Ok(None);
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
        if self.link.is_some() {
            return self.ring_wait(read, deadline).map(|()| true);
        }
        if let Err(e) = crate::poll::wait(self.interest(), read, deadline) {
            return Err(self.hose(Error::Io(e)));
        }
        Ok(true)
    }

    /// [`wait`](Channel::wait) on a channel of another kind than the socket: on the rings, it
    /// spins and sleeps as the policy says (see `ring::Link::wait`); on the queues, it polls.
    fn ring_wait(&mut self, read: bool, deadline: Option<Instant>) -> Result<(), Error> {
        let until = match (deadline, self.next_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let writing = self.wants_write();
        let side = match &self.side {
            Some(side) if writing && self.side_full => Some(side.as_fd()),
            _ => None,
        };
        let space = writing && side.is_none();
        let Some(link) = self.link.as_deref_mut() else {
            return Ok(());
        };
        match link.wait(self.sock.as_fd(), side, read, space, until) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.hose(e)),
        }
    }

    /// On a ring or queue channel, reads what a poll saw on the socket, or the socket stays
    /// readable and a loop that only sends would spin: the peer's hello (which also maps its
    /// ring or queue), then wake-up bytes and the end of stream (which `try_recv` reports).
    fn take_socket_news(&mut self) -> Result<(), Error> {
        let Some(link) = self.link.as_deref_mut() else {
            return Ok(());
        };
        link.settle();
        let res = if self.rx.hello_done {
            link.drain(self.sock.as_fd())
        } else {
            match self.rx.read_hello(self.sock.as_fd(), false) {
                Ok(true) => self.check_kind(),
                Ok(false) => Ok(()),
                Err(e) => Err(e),
            }
        };
        res.map_err(|e| self.hose(e))
    }

    /// After the peer's hello: both ends must be of one kind; a ring's is mapped, a queue's
    /// taken.
    fn check_kind(&mut self) -> Result<(), Error> {
        let theirs = self.rx.queue_kind;
        if theirs != self.cfg.kind {
            return Err(Error::KindMismatch {
                ours: self.cfg.kind,
                theirs,
            });
        }
        if let (Some(link), Some(fd)) = (self.link.as_deref_mut(), self.rx.queue_fd.take()) {
            link.attach(fd)?;
            // Reading the peer's ring may wake the peer with a doorbell byte on our socket,
            // which must come after our hello: send it now if no send has yet.
            if !self.hello_sent {
                self.send_hello()?;
            }
        }
        Ok(())
    }
}

impl Pollable for Channel {
    type Error = Error;

    /// The socket for reading (until hosed, or until the peer ended its sending), the
    /// `write_fd` for writing while [`wants_write`](Channel::wants_write), the
    /// [`next_deadline`](Channel::next_deadline).
    fn interest(&self) -> Interest<'_> {
        if self.hosing.is_hosed() {
            return Interest::none();
        }
        let reading = !self.peer_ended;
        let Some(link) = &self.link else {
            return Interest::new(
                reading.then(|| self.sock.as_fd()),
                self.wants_write().then(|| self.write_fd()),
                self.next_deadline(),
            );
        };
        // A ring has no fd: the socket is where the peer's doorbell bytes (for data, and for
        // room in a full ring) arrive, armed here. A queue channel reads an epoll fd over the
        // socket and the peer's queue. The side socket is watched as usual.
        let writing = self.wants_write();
        let side_wait = writing && self.side_full && self.side.is_some();
        let (read, write, ready) = link.interest(self.sock.as_fd(), writing && !side_wait);
        let deadline = if ready {
            Some(Instant::now())
        } else {
            self.next_deadline()
        };
        let write = if side_wait {
            Some(self.write_fd())
        } else {
            write
        };
        // Once the peer ended, the socket still brings a ring's wake-ups for room (while a
        // send waits for it); nothing else is read.
        let read = (reading || (writing && write.is_none())).then_some(read);
        Interest::new(read, write, deadline)
    }

    /// Runs the due timers and writes what the socket takes; receiving is
    /// [`try_recv`](Channel::try_recv)'s. Errors as [`flush`](Channel::flush) and
    /// [`on_timer`](Channel::on_timer).
    fn on_ready(&mut self) -> Result<(), Error> {
        if self.link.is_some() && !self.hosing.is_hosed() {
            self.take_socket_news()?;
        }
        self.run_due_timers()?;
        if self.wants_write() {
            self.flush()?;
        }
        Ok(())
    }
}

/// Writes bytes of the stream: to the socket (with a hello's fd `attach`ed), or into our ring or
/// queue (`whole`: `iov` is one frame, see `Link::push`). `Ok(None)`: nothing was taken (a full
/// socket, ring or queue).
fn write_data(
    sock: &UnixStream,
    link: Option<&mut Link>,
    iov: &[IoSlice<'_>],
    attach: Option<BorrowedFd<'_>>,
    whole: bool,
) -> Result<Option<usize>, Error> {
    match link {
        Some(link) => link.push(sock.as_fd(), iov, whole),
        None => match sys::try_send_vectored(sock.as_fd(), iov, attach) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(Error::from_io(e)),
        },
    }
}

/// Reads bytes of the stream (after the hello) into `dst`: from the socket (blocking if
/// `wait`), or from the peer's ring. `Ok(None)`: nothing now; `Ok(Some(0))`: end of stream.
fn read_data(
    sock: &UnixStream,
    link: Option<&mut Link>,
    dst: &mut [u8],
    wait: bool,
) -> Result<Option<usize>, Error> {
    match link {
        Some(link) => link.read(sock.as_fd(), dst),
        None => match sys::recv_plain(sock.as_fd(), dst, wait) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(Error::from_io(e)),
        },
    }
}
