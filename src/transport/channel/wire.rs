//! The transport's wire format: the 16-byte header in front of every frame's payload (the table
//! is in [the transport's module docs](crate::transport)), as a typed [`Header`] with its
//! encoding and its checks. The only place that knows where a header's fields lie.

use crate::transport::Error;

/// The first 4 bytes of every frame header.
pub(crate) const MAGIC: [u8; 4] = *b"FIPC";
/// Length of a frame header: magic (4) | flags u32 LE (4) | payload length u64 LE (8).
pub(crate) const HEADER_LEN: usize = 16;
/// Header flag: the frame carries one fd. On a hello, the fd rides with the frame's first byte
/// (`SCM_RIGHTS`); on any other frame, it was sent before the frame on the sender's fd side
/// socket (see [the module docs](crate::transport)).
pub(crate) const FLAG_HAS_FD: u32 = 1;
/// Header flag: a keep-alive ping (no payload, no fd); consumed silently by the receiver.
pub(crate) const FLAG_PING: u32 = 1 << 1;
/// Header flag: the sender ended its sending (no payload, no fd); nothing follows.
pub(crate) const FLAG_END: u32 = 1 << 2;
/// Header flag: the hello, the first frame in each direction (no payload; with
/// [`FLAG_HAS_FD`], its fd is the receiving end of the sender's fd side socket).
pub(crate) const FLAG_HELLO: u32 = 1 << 3;
/// Header flag, on a hello only: the sender's channel is of kind `ShmQueue`, and the hello
/// carries its ring's memfd (the first fd; the side socket, if flagged `HAS_FD`, is the
/// second).
pub(crate) const FLAG_RING: u32 = 1 << 4;
/// Header flag, on a hello only: the sender's channel is of kind `PosixMq`, and the hello
/// carries its queue's descriptor (first, as a ring's).
pub(crate) const FLAG_MQ: u32 = 1 << 5;
const KNOWN_FLAGS: u32 = FLAG_HAS_FD | FLAG_PING | FLAG_END | FLAG_HELLO | FLAG_RING | FLAG_MQ;

/// What a frame after the hello is, as its header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    /// A payload of `len` bytes, with an fd if `has_fd`.
    Data { has_fd: bool },
    /// A keep-alive ping.
    Ping,
    /// The sender's end of sending.
    End,
}

/// A frame header: its flags and its payload length.
/// What a hello announces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Hello {
    /// It carries the receiving end of the sender's fd side socket.
    pub(super) side: bool,
    /// It carries the sender's ring (kind `ShmQueue`).
    pub(super) ring: bool,
    /// It carries the sender's queue (kind `PosixMq`).
    pub(super) mq: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Header {
    pub(super) flags: u32,
    pub(super) len: u64,
}

impl Header {
    pub(super) fn new(flags: u32, len: u64) -> Header {
        Header { flags, len }
    }

    pub(super) fn encode(self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..4].copy_from_slice(&MAGIC);
        h[4..8].copy_from_slice(&self.flags.to_le_bytes());
        h[8..].copy_from_slice(&self.len.to_le_bytes());
        h
    }

    /// The header at the start of `bytes`, as far as it is there: bytes that do not begin
    /// like [`MAGIC`] are a bad frame at once, fewer than [`HEADER_LEN`] bytes otherwise are
    /// `None` (not all here yet), and flag bits this version does not know are a bad frame.
    pub(super) fn decode(bytes: &[u8]) -> Result<Option<Header>, Error> {
        let m = bytes.len().min(MAGIC.len());
        if bytes[..m] != MAGIC[..m] {
            return Err(Error::BadFrame("bad magic"));
        }
        let Some(h) = bytes.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let header = Header {
            flags: u32::from_le_bytes([h[4], h[5], h[6], h[7]]),
            len: len_field(h),
        };
        if header.flags & !KNOWN_FLAGS != 0 {
            return Err(Error::BadFrame("unknown flag bits"));
        }
        Ok(Some(header))
    }

    /// The length, header included, of the frame that `bytes` start, as far as they tell: a
    /// header's length until the header is whole (its length field is not otherwise checked).
    pub(super) fn frame_len_at(bytes: &[u8]) -> u64 {
        bytes.first_chunk().map_or(HEADER_LEN as u64, |h| {
            len_field(h).saturating_add(HEADER_LEN as u64)
        })
    }

    /// The frame's length, header included (saturating: a length near `u64::MAX` is refused
    /// by the `max_frame` check anyway).
    pub(super) fn frame_len(self) -> u64 {
        self.len.saturating_add(HEADER_LEN as u64)
    }

    fn has(self, flag: u32) -> bool {
        self.flags & flag != 0
    }

    /// What a frame after the hello is; refuses flag combinations no sender makes and payloads
    /// over `max_frame`.
    pub(super) fn kind(self, max_frame: u64) -> Result<Kind, Error> {
        let (has_fd, ping, end) = (
            self.has(FLAG_HAS_FD),
            self.has(FLAG_PING),
            self.has(FLAG_END),
        );
        if ping && end {
            return Err(Error::BadFrame("both ping and end flags"));
        }
        if (ping || end) && (has_fd || self.len != 0) {
            return Err(Error::BadFrame("ping or end frame with a payload or an fd"));
        }
        if self.has(FLAG_HELLO) || self.has(FLAG_RING) || self.has(FLAG_MQ) {
            return Err(Error::BadFrame("a hello after the first frame"));
        }
        if self.len > max_frame {
            return Err(Error::FrameTooLarge {
                len: self.len,
                max: max_frame,
                received: true,
            });
        }
        Ok(if ping {
            Kind::Ping
        } else if end {
            Kind::End
        } else {
            Kind::Data { has_fd }
        })
    }

    /// Checks the first frame: a hello, with no payload. Returns whether it announces an fd
    /// (the receiving end of the sender's side socket).
    pub(super) fn hello(self) -> Result<Hello, Error> {
        let hello_flags = FLAG_HELLO | FLAG_HAS_FD | FLAG_RING | FLAG_MQ;
        if !self.has(FLAG_HELLO) || self.flags & !hello_flags != 0 {
            return Err(Error::BadFrame("the first frame is not a hello"));
        }
        if self.len != 0 {
            return Err(Error::BadFrame("a hello with a payload"));
        }
        Ok(Hello {
            side: self.has(FLAG_HAS_FD),
            ring: self.has(FLAG_RING),
            mq: self.has(FLAG_MQ),
        })
    }
}

/// The payload length field of a whole header.
fn len_field(h: &[u8; HEADER_LEN]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&h[8..]);
    u64::from_le_bytes(b)
}
