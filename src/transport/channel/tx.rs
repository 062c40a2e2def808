//! The send queue: what a channel has accepted and not yet written, chunk by chunk, with each
//! frame's fd kept until it goes out (on the side socket, before the frame's first byte).

use std::collections::VecDeque;
use std::io::IoSlice;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use super::frame::Unsent;

use super::wire::HEADER_LEN;
use crate::sys;
use crate::transport::{Error, SharedBytes};

/// Queued small frames are appended to the previous queued chunk while it is smaller than this
/// (fewer allocations and iovecs for a burst of small frames).
const COALESCE_MAX: usize = 64 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Data,
    Ping,
    End,
    /// The hello: its fd (if any) rides inline, on the data socket.
    Hello,
}

#[derive(Debug)]
pub(super) enum ChunkData {
    Header([u8; HEADER_LEN], usize),
    Owned(Vec<u8>, usize),
    Shared(SharedBytes),
}

impl ChunkData {
    pub(super) fn rest(&self) -> &[u8] {
        match self {
            ChunkData::Header(h, off) => h.get(*off..).unwrap_or(&[]),
            ChunkData::Owned(v, off) => v.get(*off..).unwrap_or(&[]),
            ChunkData::Shared(s) => s.as_slice(),
        }
    }

    pub(super) fn advance(&mut self, n: usize) {
        match self {
            ChunkData::Header(_, off) | ChunkData::Owned(_, off) => *off = off.saturating_add(n),
            ChunkData::Shared(s) => s.advance(n),
        }
    }
}

/// A piece of the send queue: bytes of one frame, or (coalesced) of several data frames of
/// which only the first may carry an fd.
#[derive(Debug)]
pub(super) struct Chunk {
    pub(super) data: ChunkData,
    /// The frame's fd, not sent yet (only on a frame's first chunk). It goes out on the side
    /// socket before any byte of the chunk (a hello's: inline, with its first byte).
    pub(super) fd: Option<OwnedFd>,
    /// A frame starts at this chunk's first byte.
    pub(super) starts_frame: bool,
    pub(super) kind: Kind,
    /// Bytes of this chunk not yet written (as accounted in the queue totals).
    pub(super) left: usize,
    /// The `on_unsent` of the frames that end in this chunk: disarmed once it is written,
    /// run if it is dropped unwritten.
    pub(super) unsent: Vec<Unsent<'static>>,
}

#[derive(Debug, Default)]
pub(super) struct SendQueue {
    pub(super) chunks: VecDeque<Chunk>,
    /// Bytes queued, all kinds.
    pub(super) bytes: usize,
    /// Bytes of data frames queued (what high-water counts).
    pub(super) counted: usize,
    /// Pings queued.
    pub(super) pings: usize,
}

impl SendQueue {
    pub(super) fn push(&mut self, c: Chunk) {
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
    pub(super) fn try_coalesce(
        &mut self,
        header: &[u8; HEADER_LEN],
        parts: &[&[u8]],
        total: usize,
    ) -> bool {
        let Some(tail) = self.chunks.back_mut() else {
            return false;
        };
        // (A tail whose frame has an fd may grow: the fd goes out before the chunk's first
        // byte, so before every frame appended to it. One with a give-back may not: that is
        // disarmed when the whole chunk is written, which must be when its frame is.)
        if tail.kind != Kind::Data || !tail.unsent.is_empty() {
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
    pub(super) fn send_fds(&mut self, side: Option<BorrowedFd<'_>>) -> Result<usize, Error> {
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
    pub(super) fn gather<'a>(
        &'a self,
        limit: usize,
        iov: &mut Vec<IoSlice<'a>>,
    ) -> Option<BorrowedFd<'a>> {
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
    pub(super) fn consume(&mut self, mut n: usize) -> bool {
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
            let Some(mut c) = self.chunks.pop_front() else {
                break;
            };
            for u in c.unsent.drain(..) {
                u.disarm();
            }
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
pub(super) struct Cursor {
    pub(super) idx: usize,
    pub(super) off: usize,
}

impl Cursor {
    pub(super) fn advance(&mut self, slices: &[&[u8]], mut n: usize) {
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

    pub(super) fn iov<'a>(&self, slices: &[&'a [u8]]) -> Vec<IoSlice<'a>> {
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
