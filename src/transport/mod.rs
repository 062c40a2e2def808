//! The unstructured transport: framed byte messages, each optionally carrying one fd, between
//! two processes connected by a Unix-domain stream socket; the frames go through the socket
//! itself, through a ring in shared memory, or through POSIX message queues
//! ([`ChannelKind`]).
//!
//! * [`Channel`] is the sync_io core: non-blocking, no threads. It is
//!   [`Pollable`](crate::poll::Pollable): the owner polls its `interest()`, calls `on_ready()`
//!   (writes and timers) and [`try_recv`](Channel::try_recv).
//!   [`recv_blocking`](Channel::recv_blocking) and [`flush_blocking`](Channel::flush_blocking)
//!   run that loop for blocking users.
//! * [`AsyncChannel`] is the async-I/O face built on it: the process's library thread drives it
//!   and calls the user's handlers; sends work from any thread.
//!
//! # Example
//!
//! ```
//! use std::io::{Read, Seek, Write};
//! use std::os::fd::AsFd;
//! use flowipc::transport::{Channel, ChannelConfig, Error, OutFrame};
//! use nix::sys::memfd::{memfd_create, MFdFlags};
//!
//! let (mut a, mut b) = Channel::pair(ChannelConfig::new())?;
//!
//! // A frame with an fd: a memfd (made with the `nix` crate) whose contents the receiver reads.
//! let fd = memfd_create("example", MFdFlags::MFD_CLOEXEC).map_err(|e| Error::Io(e.into()))?;
//! let mut file = std::fs::File::from(fd);
//! file.write_all(b"behind the fd").map_err(Error::Io)?;
//! a.send(OutFrame::new(b"look at this").fd(file.as_fd()))?;
//! // Frames without fds, one gathered from parts.
//! a.send(OutFrame::parts(&[b"two ", b"parts"]))?;
//! a.end_sending()?;
//!
//! let first = b.recv_blocking(None)?.expect("no timeout given");
//! assert_eq!(&*first.payload, b"look at this");
//! let mut there = std::fs::File::from(first.fd.expect("the frame carried an fd"));
//! let mut text = String::new();
//! there.rewind().map_err(Error::Io)?; // same open file: shares the offset
//! there.read_to_string(&mut text).map_err(Error::Io)?;
//! assert_eq!(text, "behind the fd");
//!
//! assert_eq!(&*b.recv_blocking(None)?.unwrap().payload, b"two parts");
//! // The peer ended its sending: no error, nothing more to receive (and `b` may still send).
//! assert!(b.recv_blocking(None)?.is_none());
//! assert!(b.is_peer_ended() && !b.is_hosed());
//! b.send(b"bye")?;
//! # Ok::<(), Error>(())
//! ```
//!
//! # Wire format
//!
//! Each frame is a 16-byte header, then the payload:
//!
//! | bytes | field |
//! |---|---|
//! | 0..4 | magic `b"FIPC"` |
//! | 4..8 | flags, u32 little-endian: bit 0 `HAS_FD`, bit 1 `PING`, bit 2 `END`, bit 3 `HELLO`, bit 4 `RING` and bit 5 `MQ` (on a hello only: the sender's [`ChannelKind`]); other bits must be 0 |
//! | 8..16 | payload length, u64 little-endian |
//!
//! Pings, the END frame and the hello have no payload; pings and the END frame have no fd.
//!
//! **The hello.** The first frame in each direction is a hello, sent just before the side's
//! first frame of any kind (a channel that never sends sends no hello, so a socket may be
//! wrapped, left unused and handed on: see [`Channel::from_stream`]). A side with fds enabled
//! ([`ChannelConfig::with_fds`]) makes a `socketpair`, its *fd side socket*, and its hello is
//! flagged `HAS_FD` and carries the side socket's receiving end by `SCM_RIGHTS`, attached
//! to the hello's first byte; a side without fds sends a hello with no flag but
//! `HELLO`. The receiver reads the hello with `recvmsg`, never more than its 16 bytes, so
//! every fd those reads bring is the hello's; errors: [`Error::BadFrame`] (the first frame is
//! not a hello, or has a payload or other flags; a later frame is flagged as a hello; the
//! hello's fd is not a stream socket), [`Error::MissingFd`] / [`Error::UnexpectedFd`] /
//! [`Error::TooManyFds`] (the hello's flag and its fds disagree).
//!
//! **Fds.** After the hello, the data socket is read with plain `recv` (no control buffer:
//! cheaper in the kernel than `recvmsg`), and at most one fd travels per frame, on the side
//! socket: the sender writes one byte with the fd attached (`SCM_RIGHTS`) on its side socket
//! *before* the first byte of the frame flagged `HAS_FD` goes on the data socket (a
//! queued frame's fd goes when its first byte is about to be written, or earlier), so the fd is
//! queued on the side socket by the time the receiver can parse the frame. The receiver takes
//! it (one byte, with `recvmsg`, `MSG_DONTWAIT`) when it parses the flagged frame, and never
//! waits for it: an fd that is not there (nothing queued, or the side socket closed) is
//! [`Error::MissingFd`]; a side message with more than one fd is [`Error::TooManyFds`]; a
//! flagged frame on a channel configured without fds is [`Error::UnexpectedFd`] (that channel
//! keeps the peer's side socket but never reads it). The receiver never polls the side socket.
//! An fd a misbehaving peer attaches to data-socket bytes after the hello is not delivered:
//! with no control buffer the kernel closes it (the bytes arrive as usual). An fd sent on the
//! side socket for a frame that is not flagged stays queued there and would be taken by the
//! next flagged frame: the peer's own mistake, like sending the wrong fd. Every fd that is not
//! delivered is closed; received fds are close-on-exec.
//!
//! # Kinds
//!
//! The frames above form one byte stream per direction, whatever carries it
//! ([`ChannelConfig::with_kind`]; both ends must agree, or the first receive fails with
//! [`Error::KindMismatch`]). The socket is there in every kind: it carries the hellos and the
//! fds (on the side socket, as described above), and its end of stream is how the peer's
//! death is seen.
//!
//! * [`ChannelKind::SocketStream`]: the stream is written to the socket.
//! * [`ChannelKind::ShmQueue`]: each side makes a *ring* for what it sends: a memfd, sealed
//!   against shrinking and growing, whose first page holds the header (magic `b"FIPCRING"` at
//!   0, layout version 1 at 8, the capacity, a power of two, at 16, all u64) and the control
//!   words (`tail`, the bytes published, at 128; `head`, the bytes consumed, at 256; the
//!   consumer's and the producer's doorbells, u32, at 384 and 512); the ring's bytes follow at
//!   4096. Its hello is flagged `RING` and carries the ring's fd (then the side socket's, if
//!   `HAS_FD`); a ring side sends its hello at its first send, or when it has read the peer's,
//!   whichever comes first. The producer copies frames in at `tail % capacity` and publishes the
//!   new `tail`; the consumer copies them out and publishes `head`; each checks the other's
//!   position (at most a ring ahead, never behind) or fails with [`Error::BadQueue`]. A small
//!   frame goes in whole or waits in the send queue; one larger than the ring flows through it
//!   in pieces. A side that waits for data (or room) says so in a doorbell and is woken with
//!   `FUTEX_WAKE` (a blocking call) or with a byte on the socket (a poll loop, the library
//!   thread); a sender whose peer is awake makes no system call. How a blocking call waits is
//!   its [`WaitPolicy`]. After the hello, a ring side writes nothing on the socket but those
//!   wake-up bytes, which the peer drops; the socket's end of stream (or reset) means the peer
//!   closed, and what it published before is still read out of its ring first.
//! * [`ChannelKind::PosixMq`]: each side makes a POSIX message queue for what it sends,
//!   unlinks its name at once and sends its descriptor in a hello flagged `MQ`; the stream
//!   travels in messages of up to 2 KiB. The channel's fd to poll for reading is an epoll fd
//!   over the socket and the peer's queue.
//!
//! Bytes that a ring or queue peer writes on the socket after its hello are dropped (with any
//! fd attached: the kernel closes it). A send to a ring or queue whose reader is gone is not
//! refused (nothing tells the writer, as `EPIPE` does on a socket): the receiving side reports
//! the end, and a blocking flush that waits for room reports [`Error::Reset`].
//!
//! ```
//! use std::time::Duration;
//! use flowipc::transport::{Channel, ChannelConfig, ChannelKind, Error, WaitPolicy};
//!
//! let cfg = ChannelConfig::new()
//!     .with_kind(ChannelKind::ShmQueue)
//!     .with_wait_policy(WaitPolicy::SpinThenBlock(Duration::from_micros(10)));
//! let (mut a, mut b) = Channel::pair(cfg)?;
//! a.send(b"through shared memory")?;
//! assert_eq!(&*b.recv_blocking(None)?.unwrap().payload, b"through shared memory");
//! # Ok::<(), Error>(())
//! ```
//!
//! # Sending
//!
//! Sends never block and never fail because the peer is slow. With an empty send queue a frame
//! is written at once (its fd, if any, on the side socket, then header and payload parts in one
//! `send` or vectored `sendmsg`); whatever the sockets do not take is queued (borrowed bytes
//! copied, [`SharedBytes`] kept by reference, a borrowed fd duplicated), and later frames queue
//! behind it, in order. [`Channel::flush`] (or the async thread) writes the queue when the
//! socket is writable, coalescing queued frames into large vectored writes. When the side
//! socket has no room for the next frame's fd (the peer has not yet parsed the frames whose
//! fds fill it), the queue waits for the side socket: the channel's
//! [`interest`](crate::poll::Pollable::interest) names it as the fd to watch for writing. A high-water
//! mark ([`ChannelConfig::with_high_water`]) bounds the queue: a frame that would pass it is refused
//! with [`Error::HighWater`], and nothing of it is sent (see [`Channel::send`] for the exact
//! rule). `SIGPIPE` is never raised (`MSG_NOSIGNAL`).
//!
//! # Receiving
//!
//! Payloads up to 64 KiB are read through a reusable buffer, many frames per `recv`, and
//! copied out into their own [`AlignedBuf`] (8-byte aligned, as Cap'n Proto readers need).
//! Larger payloads are read by the kernel straight into their `AlignedBuf`: only the bytes of one
//! that arrived in the same `recvmsg` as the small frames before it pass through the buffer
//! (after a large frame the next header is read alone, so a run of large frames is never
//! copied). A header announcing more than [`ChannelConfig::with_max_frame`] fails before anything is
//! allocated.
//!
//! # Errors
//!
//! A *hosing* error ([`Error::is_hosing`]: the peer vanished or reset, bad input, idle timeout,
//! I/O failure) ends the channel. It is reported exactly once, by the
//! call that ran into it; every later call returns [`Error::Hosed`] and makes no system call.
//! The send queue and receive buffers are dropped at that point (the socket stays open until the
//! channel is dropped). Refusals ([`Error::HighWater`], [`Error::FrameTooLarge`] on send,
//! [`Error::SendingEnded`]) leave the channel untouched.
//!
//! # Graceful end, keep-alive
//!
//! [`Channel::end_sending`] queues an END frame; once it and everything before it are written,
//! the socket (of the socket kind) is shut down for writing
//! ([`end_sending_blocking`](Channel::end_sending_blocking) waits for that). The peer delivers
//! every earlier frame, then its receives answer `Ok(None)` for good and
//! [`Channel::is_peer_ended`] says why: the graceful end is not an error, and not hosing (the
//! peer may answer, and end its own sending; the ending side keeps receiving until then, or
//! until the peer closes). The idle timeout stops counting then. End of stream without an END
//! frame is [`Error::PeerGone`]; in the middle of a frame, [`Error::Truncated`].
//!
//! With [`ChannelConfig::with_auto_ping`], a ping frame is sent whenever nothing was sent for the
//! period; with [`ChannelConfig::with_idle_timeout`], the channel fails with [`Error::IdleTimeout`]
//! when nothing at all arrived for that long. Both run from [`Channel::on_timer`], due at
//! [`Channel::next_deadline`]: the sync_io way, with no threads.

mod async_io;
mod buf;
mod channel;
mod error;

pub use async_io::AsyncChannel;
pub use buf::{AlignedBuf, SharedBytes, SharedOwner};
pub use channel::{
    Channel, ChannelConfig, ChannelKind, Frame, OutFrame, WaitPolicy, DEFAULT_MAX_FRAME,
    DEFAULT_RING_CAPACITY,
};
pub use error::Error;
