//! The send path: how a frame from a send call goes to the socket at once, as far as the socket
//! takes it, and how the rest (with its fd, if that has not gone yet) is queued.

use std::io::{self, IoSlice};
use std::os::fd::AsFd;
use std::time::Duration;

use super::frame::{FdArg, OutFrame, Payload, Unsent};
use super::tx::{Chunk, ChunkData, Cursor, Kind};
use super::wire::{Header, FLAG_HAS_FD, FLAG_HELLO, FLAG_MQ, FLAG_RING, HEADER_LEN};
use super::Channel;
use crate::sys::{self, PollFd};
use crate::transport::Error;

impl Channel {
    /// The refusal of a frame that would take the queue past the high-water mark `limit`.
    pub(super) fn over_high_water(&self, limit: usize) -> Error {
        Error::HighWater {
            queued: self.tx.counted,
            limit,
        }
    }

    /// The one send path: every frame (data, ping, END, hello) comes through here. The
    /// frame's `on_unsent` runs if this refuses it (it is dropped), is disarmed if the frame
    /// goes out whole at once, and otherwise goes into the queue with the frame's last chunk.
    pub(super) fn submit(
        &mut self,
        mut flags: u32,
        frame: OutFrame<'_>,
        kind: Kind,
    ) -> Result<(), Error> {
        let OutFrame {
            payload,
            fd,
            unsent,
        } = frame;
        self.hosing.check::<Error>()?;
        if kind == Kind::Data && self.ended {
            return Err(Error::SendingEnded);
        }
        if fd.is_some() && !self.cfg.fds {
            return Err(Error::FdsDisabled);
        }
        if !self.hello_sent && kind != Kind::Hello {
            self.send_hello()?;
        }
        // (Saturating: a sum past `usize::MAX` is refused as too large.)
        let len = payload.len();
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
        let header = Header::new(flags, len as u64).encode();
        let total = HEADER_LEN + len;
        let counted = kind == Kind::Data;

        if !self.tx.chunks.is_empty() {
            if let Some(limit) = self.cfg.high_water.filter(|_| counted) {
                if self.tx.counted.saturating_add(total) > limit {
                    return Err(self.over_high_water(limit));
                }
            }
            return self.enqueue(header, payload, fd, unsent, Cursor::default(), kind);
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
                    return self.enqueue(header, payload, fd, unsent, Cursor::default(), kind);
                }
                Err(e) => return Err(self.hose(Error::from_io(e))),
            }
        }
        let one;
        let small = match &payload {
            _ if hello_fd || total > sys::SMALL_SEND => None,
            Payload::One(p) => {
                one = *p;
                Some(std::slice::from_ref(&one))
            }
            Payload::Borrowed(parts) => Some(*parts),
            Payload::Shared(_) => None,
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
            let flat = [IoSlice::new(&flat[..total])];
            match super::write_data(&self.sock, self.link.as_deref_mut(), &flat, None, true) {
                Ok(Some(n)) => {
                    self.written += n as u64;
                    if n > 0 {
                        self.note_tx();
                    }
                    if n == total {
                        if kind == Kind::End {
                            self.finish_sending();
                        }
                        if let Some(u) = unsent {
                            u.disarm();
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
                        return self.enqueue(header, payload, None, unsent, cur, kind);
                    }
                }
                Ok(None) => {}
                Err(e) => return Err(self.hose(e)),
            }
        }
        let count = match &payload {
            Payload::One(_) => 1,
            Payload::Borrowed(p) => p.len(),
            Payload::Shared(p) => p.len(),
        };
        let mut all: Vec<&[u8]> = Vec::with_capacity(1 + count);
        all.push(&header);
        match &payload {
            Payload::One(p) => all.push(p),
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
            let link = self.link.as_deref_mut();
            match super::write_data(&self.sock, link, &iov, attach, written == 0) {
                Ok(Some(0)) | Ok(None) => break,
                Ok(Some(n)) => {
                    written += n;
                    self.written += n as u64;
                    cur.advance(&all, n);
                    done = written >= total;
                    self.note_tx();
                }
                Err(e) => return Err(self.hose(e)),
            }
        }
        drop(all);
        if done {
            if kind == Kind::End {
                self.finish_sending();
            }
            if let Some(u) = unsent {
                u.disarm();
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
        self.enqueue(header, payload, fd, unsent, cur, kind)
    }

    /// Sends (or queues) the hello, with the receiving end of our side socket if fds are on.
    #[cold]
    pub(super) fn send_hello(&mut self) -> Result<(), Error> {
        self.hello_sent = true;
        let theirs = self.side_peer.take();
        if let Some(link) = &self.link {
            // A ring or queue channel's hello carries two fds (the ring or queue, then the side
            // socket's end): it
            // is sent at once, alone, as the first bytes on an empty socket, which always takes
            // them. It must be there before any doorbell byte, and the peer must map the ring
            // before it reads anything from it.
            let mut flags = FLAG_HELLO
                | match link.kind() {
                    super::ChannelKind::PosixMq => FLAG_MQ,
                    _ => FLAG_RING,
                };
            let mut fds = vec![link.hello_fd()];
            if let Some(t) = &theirs {
                flags |= FLAG_HAS_FD;
                fds.push(t.as_fd());
            }
            let header = Header::new(flags, 0).encode();
            return match sys::send_with_fds(&self.sock, &header, &fds) {
                Ok(n) if n == HEADER_LEN => {
                    self.written += n as u64;
                    Ok(())
                }
                Ok(_) => Err(self.hose(Error::Io(io::ErrorKind::WriteZero.into()))),
                // The peer is gone: what it sent is still in its ring, and reading reports its
                // end after that (a ring send never learns it, as a socket send does).
                Err(e) if matches!(Error::from_io(io::Error::from(e.kind())), Error::Reset) => {
                    Ok(())
                }
                Err(e) => Err(self.hose(Error::from_io(e))),
            };
        }
        let flags = if theirs.is_some() {
            FLAG_HELLO | FLAG_HAS_FD
        } else {
            FLAG_HELLO
        };
        self.submit(flags, OutFrame::new(&[]).owned_fd(theirs), Kind::Hello)
    }

    /// Whether the data socket would take some bytes now (a zero-timeout `poll`).
    pub(super) fn data_writable(&mut self) -> Result<bool, Error> {
        if let Some(link) = &self.link {
            return link.has_space().map_err(|e| self.hose(e));
        }
        let mut p = [PollFd::new(self.sock.as_fd(), false, true)];
        match sys::poll(&mut p, Some(Duration::ZERO)) {
            Ok(_) => Ok(p[0].ready.writable),
            Err(e) => Err(self.hose(Error::Io(e))),
        }
    }

    /// Queues the frame from `cur` on (a position in header + parts), its `unsent` with its
    /// last chunk.
    pub(super) fn enqueue(
        &mut self,
        header: [u8; HEADER_LEN],
        payload: Payload<'_>,
        fd: Option<FdArg<'_>>,
        unsent: Option<Unsent<'_>>,
        cur: Cursor,
        kind: Kind,
    ) -> Result<(), Error> {
        let chunks = self.tx.chunks.len();
        // A frame with a give-back is never merged with others into one chunk (nor others into
        // its chunk): the give-back is disarmed when its chunk is wholly written, which must be
        // when its own frame is.
        let alone = unsent.is_some();
        self.enqueue_bytes(header, payload, fd, cur, kind, alone)?;
        if let Some(u) = unsent {
            let queued = self.tx.chunks.len() > chunks;
            match self.tx.chunks.back_mut() {
                Some(last) if queued => last.unsent.push(u.into_queued()),
                // Nothing was left to queue (a shared owner shrank): the frame is out.
                _ => u.disarm(),
            }
        }
        Ok(())
    }

    /// The bytes of [`enqueue`](Self::enqueue); onto the tail chunk if they may (not `alone`).
    fn enqueue_bytes(
        &mut self,
        header: [u8; HEADER_LEN],
        payload: Payload<'_>,
        fd: Option<FdArg<'_>>,
        cur: Cursor,
        kind: Kind,
        alone: bool,
    ) -> Result<(), Error> {
        let starts_frame = cur.idx == 0 && cur.off == 0;
        let fd_frame = fd.is_some();
        let fd = match fd {
            Some(f) => Some(f.into_owned().map_err(|e| self.hose(Error::Io(e)))?),
            None => None,
        };
        let one;
        let copied = match &payload {
            Payload::One(p) => {
                one = *p;
                Some(std::slice::from_ref(&one))
            }
            Payload::Borrowed(parts) => Some(*parts),
            Payload::Shared(_) => None,
        };
        match (copied, payload) {
            (Some(parts), _) => {
                let total = HEADER_LEN + parts.iter().map(|s| s.len()).sum::<usize>();
                if starts_frame
                    && !fd_frame
                    && !alone
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
                    unsent: Vec::new(),
                });
            }
            (None, Payload::One(_) | Payload::Borrowed(_)) => {}
            (None, Payload::Shared(parts)) => {
                let mut fd = fd;
                let mut first = true;
                if cur.idx == 0 {
                    self.tx.push(Chunk {
                        data: ChunkData::Header(header, cur.off),
                        fd: fd.take(),
                        starts_frame,
                        kind,
                        left: HEADER_LEN - cur.off,
                        unsent: Vec::new(),
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
                        unsent: Vec::new(),
                    });
                    first = false;
                }
            }
        }
        Ok(())
    }
}
