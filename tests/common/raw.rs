//! A hand-made peer for bad-input tests: it writes raw stream bytes the way a channel of the
//! test crate's [`kind`](super::kind) carries them: on the data socket, or into a
//! shared-memory ring it makes by hand from the layout the transport's docs give (written with
//! `pwrite` on the memfd, so no mapping and no `unsafe` here).

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;

use flowipc::transport::ChannelKind;

use super::{kind, memfd, seal_size, send_with_fds};

pub const MAGIC: [u8; 4] = *b"FIPC";
pub const HEADER_LEN: usize = 16;
pub const FLAG_HAS_FD: u32 = 1;
pub const FLAG_HELLO: u32 = 1 << 3;
pub const FLAG_RING: u32 = 1 << 4;
pub const FLAG_MQ: u32 = 1 << 5;

/// A ring's layout (see `flowipc::shm::ring_map`'s docs).
pub const RING_DATA: u64 = 4096;
pub const RING_TAIL: u64 = 128;
pub const RING_HEAD: u64 = 256;

/// A frame's bytes: header and body (which may be shorter than `len`).
pub fn raw_frame(flags: u32, len: u64, body: &[u8]) -> Vec<u8> {
    let mut v = MAGIC.to_vec();
    v.extend_from_slice(&flags.to_le_bytes());
    v.extend_from_slice(&len.to_le_bytes());
    v.extend_from_slice(body);
    v
}

/// A ring file made by hand: the producer's side of one.
pub struct RawRing {
    pub file: File,
    pub cap: u64,
    pub tail: u64,
}

impl RawRing {
    /// A sealed ring file of `cap` bytes with a valid header.
    pub fn new(cap: u64) -> RawRing {
        let file = memfd("raw-ring");
        file.set_len(RING_DATA + cap).unwrap();
        file.write_all_at(b"FIPCRING", 0).unwrap();
        file.write_all_at(&1u64.to_le_bytes(), 8).unwrap();
        file.write_all_at(&cap.to_le_bytes(), 16).unwrap();
        seal_size(&file);
        RawRing { file, cap, tail: 0 }
    }

    /// Publishes `bytes` (wrapping; the reader must keep up: no check for room here).
    pub fn push(&mut self, bytes: &[u8]) {
        for (i, b) in bytes.iter().enumerate() {
            let at = (self.tail + i as u64) % self.cap;
            self.file.write_all_at(&[*b], RING_DATA + at).unwrap();
        }
        self.tail += bytes.len() as u64;
        self.set_tail(self.tail);
    }

    /// Writes the published position, whatever it is.
    pub fn set_tail(&self, tail: u64) {
        self.file
            .write_all_at(&tail.to_le_bytes(), RING_TAIL)
            .unwrap();
    }
}

/// A POSIX message queue made by hand (unlinked at once).
pub struct RawQueue(pub nix::mqueue::MqdT);

impl RawQueue {
    pub fn new() -> RawQueue {
        use nix::mqueue::{mq_open, mq_unlink, MQ_OFlag, MqAttr};
        let name = format!(
            "/flowipc-raw-{}-{}",
            std::process::id(),
            super::unique_name()
        );
        let attr = MqAttr::new(0, 8, 2048, 0);
        let q = mq_open(
            name.as_str(),
            MQ_OFlag::O_CREAT | MQ_OFlag::O_EXCL | MQ_OFlag::O_RDWR | MQ_OFlag::O_NONBLOCK,
            nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
            Some(&attr),
        )
        .unwrap();
        mq_unlink(name.as_str()).unwrap();
        RawQueue(q)
    }

    /// Sends `bytes` in 2 KiB messages (the reader must keep up: 8 fit).
    pub fn push(&self, bytes: &[u8]) {
        for m in bytes.chunks(2048) {
            nix::mqueue::mq_send(&self.0, m, 0).unwrap();
        }
    }
}

impl Drop for RawQueue {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        let _ = nix::unistd::close(self.0.as_raw_fd());
    }
}

/// The raw peer: the data socket, and the ring or queue when the kind has one.
pub struct RawPeer {
    pub sock: UnixStream,
    pub ring: Option<RawRing>,
    pub queue: Option<RawQueue>,
}

impl RawPeer {
    /// Sends a hello (the crate's kind's: a ring's carries the ring first) with the side
    /// socket's end `side`, if any.
    pub fn hello(sock: UnixStream, side: Option<BorrowedFd<'_>>) -> RawPeer {
        let mut flags = FLAG_HELLO;
        let ring = (kind() == ChannelKind::ShmQueue).then(|| RawRing::new(1 << 16));
        let queue = (kind() == ChannelKind::PosixMq).then(RawQueue::new);
        let mut fds = Vec::new();
        if let Some(r) = &ring {
            flags |= FLAG_RING;
            fds.push(r.file.as_fd());
        }
        if let Some(q) = &queue {
            flags |= FLAG_MQ;
            fds.push(q.0.as_fd());
        }
        if let Some(s) = side {
            flags |= FLAG_HAS_FD;
            fds.push(s);
        }
        assert_eq!(
            send_with_fds(&sock, &raw_frame(flags, 0, &[]), &fds),
            HEADER_LEN
        );
        RawPeer { sock, ring, queue }
    }

    /// Writes stream bytes: on the socket, or into the ring (then a doorbell byte).
    pub fn write(&mut self, bytes: &[u8]) {
        self.write_with_fds(bytes, &[]);
    }

    /// Writes stream bytes with `fds` attached to the data socket: to the bytes themselves,
    /// or (ring) to a doorbell byte sent after them.
    pub fn write_with_fds(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
        match (&mut self.ring, &self.queue) {
            (Some(r), _) => {
                r.push(bytes);
                assert_eq!(send_with_fds(&self.sock, &[0], fds), 1);
            }
            (None, Some(q)) => {
                q.push(bytes);
                assert_eq!(send_with_fds(&self.sock, &[0], fds), 1);
            }
            (None, None) => assert_eq!(send_with_fds(&self.sock, bytes, fds), bytes.len()),
        }
    }
}
