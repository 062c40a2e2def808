//! A hand-made transport peer: it writes raw stream bytes the way a channel of each kind carries
//! them (on the data socket, into a shared-memory ring it makes from the layout the transport's
//! docs give, or into a POSIX message queue), puts fds on its fd side socket, and sends the
//! hello, made right or from the input's own bytes.
//!
//! The ring is written with `pwrite` on its memfd: no mapping, no `unsafe`.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;

use flowipc::transport::ChannelKind;

use crate::send_with_fds;

/// The frame header's magic (see the transport's wire format).
pub const MAGIC: [u8; 4] = *b"FIPC";
/// A frame header's length.
pub const HEADER_LEN: usize = 16;
/// Header flags (see the transport's wire format).
pub const FLAG_HAS_FD: u32 = 1;
/// A keep-alive ping.
pub const FLAG_PING: u32 = 1 << 1;
/// The sender's end.
pub const FLAG_END: u32 = 1 << 2;
/// The hello.
pub const FLAG_HELLO: u32 = 1 << 3;
/// A hello of a ring channel.
pub const FLAG_RING: u32 = 1 << 4;
/// A hello of a queue channel.
pub const FLAG_MQ: u32 = 1 << 5;

/// A frame header's bytes.
pub fn header(flags: u32, len: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&MAGIC);
    h[4..8].copy_from_slice(&flags.to_le_bytes());
    h[8..].copy_from_slice(&len.to_le_bytes());
    h
}

/// A ring's layout (see the transport's docs on `ShmQueue`).
const RING_DATA: u64 = 4096;
const RING_TAIL: u64 = 128;
const RING_HEAD: u64 = 256;
/// The ring's capacity: the smallest there is, so that wrapping is reached quickly.
pub const RING_CAP: u64 = 4096;

/// The producer's side of a ring file made by hand.
#[derive(Debug)]
pub struct RawRing {
    file: File,
    cap: u64,
    tail: u64,
}

impl RawRing {
    fn new() -> RawRing {
        use nix::fcntl::{fcntl, FcntlArg, SealFlag};
        use nix::sys::memfd::{memfd_create, MFdFlags};
        let fd = memfd_create(
            "fuzz-ring",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )
        .expect("memfd");
        let file = File::from(fd);
        file.set_len(RING_DATA + RING_CAP).expect("ring size");
        file.write_all_at(b"FIPCRING", 0).expect("ring header");
        file.write_all_at(&1u64.to_le_bytes(), 8)
            .expect("ring header");
        file.write_all_at(&RING_CAP.to_le_bytes(), 16)
            .expect("ring header");
        let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
        fcntl(&file, FcntlArg::F_ADD_SEALS(seals)).expect("seals");
        RawRing {
            file,
            cap: RING_CAP,
            tail: 0,
        }
    }

    fn word(&self, at: u64) -> u64 {
        let mut b = [0u8; 8];
        let _ = self.file.read_exact_at(&mut b, at);
        u64::from_le_bytes(b)
    }

    /// Room for more bytes, as the consumer's published position says (none if it is odd).
    fn room(&self) -> u64 {
        let used = self.tail.wrapping_sub(self.word(RING_HEAD));
        self.cap.saturating_sub(used)
    }

    /// Publishes `bytes` (the caller checked the room).
    fn push(&mut self, bytes: &[u8]) {
        let at = self.tail % self.cap;
        let first = bytes.len().min((self.cap - at) as usize);
        let _ = self.file.write_all_at(&bytes[..first], RING_DATA + at);
        let _ = self.file.write_all_at(&bytes[first..], RING_DATA);
        self.tail = self.tail.wrapping_add(bytes.len() as u64);
        self.set_tail(self.tail);
    }

    /// Writes the published position, whatever it is.
    pub fn set_tail(&self, tail: u64) {
        let _ = self.file.write_all_at(&tail.to_le_bytes(), RING_TAIL);
    }
}

/// A POSIX message queue made by hand (its name unlinked at once), non-blocking.
#[derive(Debug)]
pub struct RawQueue {
    q: Option<nix::mqueue::MqdT>,
    msgsize: usize,
}

impl RawQueue {
    fn new(msgsize: usize) -> RawQueue {
        use nix::mqueue::{mq_open, mq_unlink, MQ_OFlag, MqAttr};
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "/flowipc-fuzz-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let attr = MqAttr::new(0, 8, msgsize as _, 0);
        let flags = MQ_OFlag::O_CREAT
            | MQ_OFlag::O_EXCL
            | MQ_OFlag::O_RDWR
            | MQ_OFlag::O_NONBLOCK
            | MQ_OFlag::O_CLOEXEC;
        let mode = nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR;
        let q = mq_open(name.as_str(), flags, mode, Some(&attr)).expect("mq_open");
        let _ = mq_unlink(name.as_str());
        RawQueue {
            q: Some(q),
            msgsize,
        }
    }

    /// Sends one message; `false` when the queue is full (or the input's size is not one).
    fn send(&self, m: &[u8]) -> bool {
        self.q
            .as_ref()
            .is_some_and(|q| nix::mqueue::mq_send(q, m, 0).is_ok())
    }
}

impl Drop for RawQueue {
    fn drop(&mut self) {
        // (`MqdT` does not close itself.)
        if let Some(q) = self.q.take() {
            let _ = nix::mqueue::mq_close(q);
        }
    }
}

/// How the peer says hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hello {
    /// A correct hello of the peer's kind, with a side socket if `side`.
    Proper {
        /// The hello announces (and carries) a side socket.
        side: bool,
    },
    /// The first bytes written are the hello: the input's own bytes, with the kind's fds
    /// attached (the ring or queue, then the side socket if `side`).
    Raw {
        /// The side socket's end is attached too.
        side: bool,
    },
}

/// The peer: the data socket, its fd side socket, and its ring or queue.
#[derive(Debug)]
pub struct RawPeer {
    /// The data socket (non-blocking).
    pub sock: UnixStream,
    /// The sending end of the side socket.
    side: Option<UnixStream>,
    /// Its receiving end, until the hello takes it.
    side_theirs: Option<OwnedFd>,
    ring: Option<RawRing>,
    queue: Option<RawQueue>,
    hello: Hello,
    /// The hello has been written.
    said_hello: bool,
    /// More fds a raw hello carries, after the kind's and the side socket's.
    pub extra: Vec<OwnedFd>,
    /// The data socket is shut down for writing.
    shut: bool,
}

impl RawPeer {
    /// A peer of `kind` on `sock` (its queue's messages of `msgsize` bytes).
    pub fn new(sock: UnixStream, kind: ChannelKind, hello: Hello, msgsize: usize) -> RawPeer {
        sock.set_nonblocking(true).expect("non-blocking");
        let with_side = matches!(
            hello,
            Hello::Proper { side: true } | Hello::Raw { side: true }
        );
        let (side, side_theirs) = if with_side {
            let (a, b) = UnixStream::pair().expect("socketpair");
            a.set_nonblocking(true).expect("non-blocking");
            (Some(a), Some(OwnedFd::from(b)))
        } else {
            (None, None)
        };
        RawPeer {
            sock,
            side,
            side_theirs,
            ring: (kind == ChannelKind::ShmQueue).then(RawRing::new),
            queue: (kind == ChannelKind::PosixMq).then(|| RawQueue::new(msgsize)),
            hello,
            said_hello: false,
            extra: Vec::new(),
            shut: false,
        }
    }

    /// The fds a hello carries: the ring or queue, then the side socket's end.
    fn hello_fds(&self) -> Vec<BorrowedFd<'_>> {
        let mut fds = Vec::new();
        if let Some(r) = &self.ring {
            fds.push(r.file.as_fd());
        }
        if let Some(q) = self.queue.as_ref().and_then(|q| q.q.as_ref()) {
            fds.push(q.as_fd());
        }
        if let Some(s) = &self.side_theirs {
            fds.push(s.as_fd());
        }
        if let Hello::Raw { .. } = self.hello {
            fds.extend(self.extra.iter().map(|f| f.as_fd()));
        }
        fds
    }

    /// Sends the proper hello now, if that is the peer's way and it has not yet.
    pub fn say_hello(&mut self) {
        let Hello::Proper { side } = self.hello else {
            return;
        };
        if self.said_hello {
            return;
        }
        let mut flags = FLAG_HELLO;
        if self.ring.is_some() {
            flags |= FLAG_RING;
        }
        if self.queue.is_some() {
            flags |= FLAG_MQ;
        }
        if side {
            flags |= FLAG_HAS_FD;
        }
        // (Refused only after the input shut the socket down: the receiver sees the end.)
        send_with_fds(&self.sock, &header(flags, 0), &self.hello_fds());
        self.said_hello = true;
        self.side_theirs = None;
    }

    /// Writes what the carrier takes now of `bytes` (the first write of a raw hello goes on the
    /// socket with the hello's fds); returns how many it took.
    pub fn write(&mut self, bytes: &[u8]) -> usize {
        if bytes.is_empty() {
            return 0;
        }
        if !self.said_hello {
            if let Hello::Raw { .. } = self.hello {
                let n = send_with_fds(&self.sock, bytes, &self.hello_fds());
                if n > 0 {
                    self.said_hello = true;
                    self.side_theirs = None;
                }
                return n;
            }
            self.say_hello();
        }
        if let Some(r) = &mut self.ring {
            let n = (r.room() as usize).min(bytes.len());
            if n > 0 {
                r.push(&bytes[..n]);
                self.doorbell();
            }
            return n;
        }
        if let Some(q) = &self.queue {
            let mut n = 0;
            for m in bytes.chunks(q.msgsize) {
                if !q.send(m) {
                    break;
                }
                n += m.len();
            }
            if n > 0 {
                self.doorbell();
            }
            return n;
        }
        send_with_fds(&self.sock, bytes, &[])
    }

    /// A wake-up byte on the socket (what a ring or queue peer writes after publishing).
    fn doorbell(&self) {
        send_with_fds(&self.sock, &[0], &[]);
    }

    /// Puts a message of `bytes` bytes with `fds` on the side socket (before the frame that
    /// names it, as a real peer does). Returns whether the side socket took it.
    pub fn side_message(&self, bytes: usize, fds: &[BorrowedFd<'_>]) -> bool {
        let Some(side) = &self.side else {
            return false;
        };
        let data = vec![0u8; bytes.max(1)];
        send_with_fds(side, &data, fds) > 0
    }

    /// Closes the side socket's sending end.
    pub fn close_side(&mut self) {
        self.side = None;
    }

    /// Scribbles on the ring's published position.
    pub fn set_tail(&mut self, delta: u64) {
        if let Some(r) = &mut self.ring {
            r.tail = r.tail.wrapping_add(delta);
            r.set_tail(r.tail);
            self.doorbell();
        }
    }

    /// Ends sending: shuts the data socket down for writing (the end of stream the receiver
    /// sees after what the carrier holds).
    pub fn shutdown(&mut self) {
        if !self.shut {
            let _ = self.sock.shutdown(std::net::Shutdown::Write);
            self.shut = true;
        }
    }
}
