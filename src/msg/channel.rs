//! [`MsgChannel`]: messages over an unstructured [`Channel`].
//!
//! Every frame's payload starts with a 24-byte header: kind (1 byte), flags (1 byte: bit 0 says
//! a session token follows), 6 reserved bytes (zero), message id (u64), id of the message
//! answered (u64, 0 for none), all little-endian; then, on a channel of a session, the 16-byte
//! session token. The header travels inline in the socket frame: a small message costs no
//! shared memory for metadata. After it:
//! * `POOL`: arena id (u64), pool id (u32), 4 zero bytes, and the pool's memfd as the frame's fd.
//!   Sent once per pool, before the first handle that points into it.
//! * `SHM`: a 32-byte lend blob naming the message's segment table in the arena.
//! * `HEAP`: the message in capnp's standard stream framing (segment count - 1, sizes in words,
//!   padding to 8 bytes, then the segments): a heap-backed message, or a small arena-backed one
//!   (see [`MsgChannel::with_inline_max`]).
//! * `NOTICE`: the id of our message that the peer received as a response nobody expected is
//!   the header's answered id; a description follows (UTF-8, at most 512 bytes, possibly none).
//!
//! A `SHM` or `HEAP` frame may carry one fd of the user's.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use capnp::traits::Owned;

use super::wire::{
    heap_segments, pool_body, read_pool_body, segment_table_len, write_segment_table, Encoded,
    Header, Kind,
};
use super::{Body, Error, InSegs, MsgIn, MsgOut};
use crate::hosing::Hosing;
use crate::poll::{Interest, Pollable};
use crate::shm::segments::{Adopted, OutMsg};
use crate::shm::{Arena, ArenaConfig, LendBlob};
use crate::transport::{Channel, Frame, OutFrame, SharedBytes};

/// Longest description an unexpected-response notice carries.
pub(crate) const MAX_NOTICE_TEXT: usize = 512;

/// Heap messages of at most this many segments and bytes are sent from their segments as they
/// are (copied if they have to be queued); bigger ones are frozen and their segments queued by
/// reference.
const SMALL_HEAP_SEGMENTS: usize = 6;
const SMALL_HEAP_BYTES: usize = 16 << 10;

/// Arena-backed messages of at most this many bytes (and six segments) are
/// sent inline by default: see [`MsgChannel::with_inline_max`].
pub const DEFAULT_INLINE_MAX: usize = 1536;

/// What a frame turned out to be, for the layers that care about more than messages.
#[derive(Debug)]
pub(crate) enum Incoming<M: Owned> {
    /// A message.
    Msg(MsgIn<M>),
    /// The peer's notice that a message we sent, with this id, arrived as a response nobody
    /// expected, and the peer's description of it.
    UnexpectedResponse(u64, String),
}

/// Where a channel's new messages keep their segments.
#[derive(Clone, Debug)]
pub enum Backing {
    /// Private heap memory; messages are copied through the socket.
    Heap,
    /// An arena both processes map; messages are sent in place (a handle crosses the socket).
    Shm(Arena),
}

/// A channel of capnp messages of root type `M`, over an unstructured [`Channel`] (sync_io: no
/// threads; put [`as_fd`](AsFd::as_fd) in your poll loop, or use the blocking helpers).
///
/// It receives both kinds of message whatever its own backing: in-place ones from any arena
/// whose pools the peer announced (joined on first sight), and copied ones.
pub struct MsgChannel<M: Owned> {
    chan: Channel,
    backing: Backing,
    /// Per arena id: which pool ids have been announced to the peer (a bit each).
    announced: SmallMap<u64, Vec<u64>>,
    /// Arenas whose handles we accept, by the 32-bit tag blobs carry.
    arenas: SmallMap<u32, Arena>,
    next_id: u64,
    /// Arena messages of at most this many bytes are copied into their frame.
    inline_max: usize,
    /// The session token every frame carries (both ways), if the channel belongs to a session.
    token: Option<u128>,
    hosing: Hosing,
    _root: std::marker::PhantomData<fn() -> M>,
}

impl<M: Owned> std::fmt::Debug for MsgChannel<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsgChannel")
            .field("channel", &self.chan)
            .field("backing", &self.backing)
            .field("hosed", &self.hosing.is_hosed())
            .finish()
    }
}

impl<M: Owned> MsgChannel<M> {
    /// Takes over `chan`; new messages use `backing`.
    pub fn new(chan: Channel, backing: Backing) -> Self {
        let mut arenas = SmallMap::default();
        if let Backing::Shm(a) = &backing {
            arenas.insert(a.id() as u32, a.clone());
        }
        MsgChannel {
            chan,
            backing,
            announced: SmallMap::default(),
            arenas,
            next_id: 1,
            inline_max: DEFAULT_INLINE_MAX,
            token: None,
            hosing: Hosing::default(),
            _root: std::marker::PhantomData,
        }
    }

    /// Makes every frame carry `token` (a session's, both sides alike) and refuses frames from
    /// the peer that carry another or none ([`Error::WrongSession`], hosing): a channel cannot
    /// be mixed up with another session's.
    pub fn with_session_token(mut self, token: u128) -> Self {
        self.set_session_token(token);
        self
    }

    pub(crate) fn set_session_token(&mut self, token: u128) {
        self.token = Some(token);
    }

    /// Reads the peer's handles into `arena` through this view of it (one the session already
    /// shares, say) instead of joining the arena anew when its pools are announced.
    pub fn with_arena(mut self, arena: &Arena) -> Self {
        if self.arenas.get(&(arena.id() as u32)).is_none() {
            self.arenas.insert(arena.id() as u32, arena.clone());
        }
        self
    }

    /// Sends arena-backed messages of at most `bytes` bytes (used bytes of their segments, at
    /// most six segments) inline: copied into the frame like a heap message, instead of in
    /// place. Default: [`DEFAULT_INLINE_MAX`] (1.5 KiB): up to there a copy costs what the
    /// handle (freeze, lend, borrow, release) does; past it the copy costs more, 7% more at
    /// 2 KiB, 13% at 4 KiB, 60% at 32 KiB (round trips measured by `cargo bench --bench latency
    /// -- rtt/inline`). A message waiting in the send queue (a peer that does not read) then holds
    /// only its bytes of private memory, no arena block; the receiver's [`MsgIn`] is not
    /// [zero-copy](MsgIn::is_zero_copy) and the sent `MsgOut` is not frozen. `0`: every arena
    /// message goes in place. Larger messages always go in place, whatever their size (a
    /// 1 GiB message costs what a 1 KiB one does).
    pub fn with_inline_max(mut self, bytes: usize) -> Self {
        self.inline_max = bytes;
        self
    }

    /// See [`with_inline_max`](MsgChannel::with_inline_max).
    pub fn inline_max(&self) -> usize {
        self.inline_max
    }

    /// The session token frames carry, if any.
    pub fn session_token(&self) -> Option<u128> {
        self.token
    }

    /// A new, empty message with this channel's backing.
    pub fn create_msg(&self) -> MsgOut<M> {
        match &self.backing {
            Backing::Heap => MsgOut::new_heap(),
            Backing::Shm(a) => MsgOut::new_in(a),
        }
    }

    /// The backing new messages use.
    pub fn backing(&self) -> &Backing {
        &self.backing
    }

    /// The unstructured channel underneath, for the layers above (the structured channel).
    /// Not public: raw frames sent through it would break the message protocol.
    pub(crate) fn channel(&mut self) -> &mut Channel {
        &mut self.chan
    }

    /// [`channel`](MsgChannel::channel), to read.
    pub(crate) fn channel_ref(&self) -> &Channel {
        &self.chan
    }

    /// Whether a hosing error has been reported.
    pub fn is_hosed(&self) -> bool {
        self.hosing.is_hosed()
    }

    /// Hoses the channel for a layer above (its transport's queues dropped, unwritten lent
    /// handles given back).
    pub(crate) fn abandon(&mut self) {
        if self.hosing.mark() {
            self.chan.abandon();
        }
    }

    /// Writes what the socket takes of the send queue; `Ok(true)` when it is empty (see
    /// [`Channel::flush`]).
    pub fn flush(&mut self) -> Result<bool, Error> {
        self.hosing.check::<Error>()?;
        let r = self.chan.flush().map_err(Error::from);
        self.hose_on(r)
    }

    /// Writes the send queue, waiting up to `timeout` (`None`: no limit) for the socket to take
    /// it; `Ok(true)` once empty, `Ok(false)` at the timeout (see
    /// [`Channel::flush_blocking`]).
    pub fn flush_blocking(&mut self, timeout: Option<Duration>) -> Result<bool, Error> {
        self.hosing.check::<Error>()?;
        let r = self.chan.flush_blocking(timeout).map_err(Error::from);
        self.hose_on(r)
    }

    /// Bytes waiting in the send queue.
    pub fn queued_bytes(&self) -> usize {
        self.chan.queued_bytes()
    }

    /// Ends sending gracefully: everything sent so far goes out, then the peer learns of the
    /// end (see [`Channel::end_sending`]; the peer's receives then answer `Ok(None)` and its
    /// [`is_peer_ended`](MsgChannel::is_peer_ended) is true).
    pub fn end_sending(&mut self) -> Result<(), Error> {
        self.hosing.check::<Error>()?;
        let r = self.chan.end_sending().map_err(Error::from);
        self.hose_on(r)
    }

    /// [`end_sending`](MsgChannel::end_sending) (unless called before), then waits up to
    /// `timeout` for it and everything before it to be written (see
    /// [`Channel::end_sending_blocking`]): `Ok(true)` once written, `Ok(false)` at the timeout.
    pub fn end_sending_blocking(&mut self, timeout: Option<Duration>) -> Result<bool, Error> {
        self.hosing.check::<Error>()?;
        let r = self.chan.end_sending_blocking(timeout).map_err(Error::from);
        self.hose_on(r)
    }

    /// Whether the end of sending (and everything before it) has been written.
    pub fn is_send_done(&self) -> bool {
        self.chan.is_send_done()
    }

    /// Whether the peer ended its sending and every message it sent before has been received:
    /// nothing more will come, and receives answer `Ok(None)` at once. The graceful end, not an
    /// error: this side may go on sending (see [`Channel::is_peer_ended`]).
    pub fn is_peer_ended(&self) -> bool {
        self.chan.is_peer_ended()
    }

    /// Marks the channel hosed if `r` is a hosing error. The transport is hosed with it: its
    /// send queue is dropped, and with it the frames never written, whose lent handles are given
    /// back (each frame's `on_unsent`): the peer can never borrow them now.
    fn hose_on<T>(&mut self, r: Result<T, Error>) -> Result<T, Error> {
        r.map_err(|e| {
            let (e, now) = self.hosing.file(e);
            if now {
                self.chan.abandon();
            }
            e
        })
    }

    /// Sends `msg` with `fd` if given, else with the message's own fd if it has one
    /// ([`MsgOut::set_fd`]). Never blocks: what the socket does not take now is
    /// queued (see [`Channel::send`]).
    ///
    /// An arena-backed message is frozen and sent in place: a handle crosses the socket, and
    /// `msg` stays usable (re-sending it unchanged costs one reference; writing to it copies it
    /// first while a receiver holds it). If it cannot be placed in the arena, this returns
    /// [`Error::Shm`] (not hosing), sends nothing, and leaves `msg` intact.
    pub fn send(&mut self, msg: &mut MsgOut<M>, fd: Option<BorrowedFd<'_>>) -> Result<(), Error> {
        self.send_answering(msg, fd, 0).map(|_| ())
    }

    /// Sends `msg` as the answer to the peer's message `answers` (0: none); returns the id the
    /// message instance got (1, 2, 3... per channel and direction).
    pub(crate) fn send_answering(
        &mut self,
        msg: &mut MsgOut<M>,
        fd: Option<BorrowedFd<'_>>,
        answers: u64,
    ) -> Result<u64, Error> {
        self.hosing.check::<Error>()?;
        let r = self.send_inner(msg, fd, answers);
        self.hose_on(r)
    }

    /// The id the next message will get (every id below it has been used).
    pub(crate) fn next_message_id(&self) -> u64 {
        self.next_id
    }

    /// Tells the peer that its message `id` arrived as a response nobody expected, with a
    /// description (UTF-8, cut to [`MAX_NOTICE_TEXT`] bytes at a character boundary).
    pub(crate) fn send_unexpected_notice(&mut self, id: u64, text: &str) -> Result<(), Error> {
        self.hosing.check::<Error>()?;
        let mut end = text.len().min(MAX_NOTICE_TEXT);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let (frame, _) = self.header(Kind::Notice, id);
        let parts = [frame.as_ref(), &text.as_bytes()[..end]];
        let r = self.chan.send(OutFrame::parts(&parts)).map_err(Error::from);
        self.hose_on(r)
    }

    /// A frame header, encoded, and the id it carries. Messages get the next id (1, 2, 3...);
    /// control frames (pool announcements, notices) carry id 0 and take none.
    fn header(&mut self, kind: Kind, answers: u64) -> (Encoded, u64) {
        let mut id = 0;
        if kind.is_msg() {
            id = self.next_id;
            self.next_id += 1;
        }
        let h = Header { kind, id, answers };
        (h.encode(self.token), id)
    }

    /// Sends; returns the id of the message frame.
    fn send_inner(
        &mut self,
        msg: &mut MsgOut<M>,
        fd: Option<BorrowedFd<'_>>,
        answers: u64,
    ) -> Result<u64, Error> {
        // The message's own fd rides along unless the caller gives another: lent out of the
        // message for the send and put back after (no duplicate).
        let own = if fd.is_none() { msg.take_fd() } else { None };
        let fd = fd.or(own.as_ref().map(|f| f.as_fd()));
        let r = match msg.body_mut() {
            Body::Own(out) => self.send_out(out, fd, answers),
            Body::Adopted(a) => self.send_adopted(a, fd, answers),
        };
        if let Some(own) = own {
            msg.set_fd(own);
        }
        r
    }

    /// Sends the frames of one message (see `send_inner`); returns its id.
    fn send_out(
        &mut self,
        out: &mut OutMsg,
        fd: Option<BorrowedFd<'_>>,
        answers: u64,
    ) -> Result<u64, Error> {
        // Small (heap-backed, or arena-backed up to the inline limit): the segments are copied
        // into the frame as they are (the transport copies what it has to queue), with no
        // allocation, no freeze and, for an arena message, no shared memory held while the
        // frame waits.
        let limit = match out.arena() {
            Some(_) => self.inline_max,
            None => SMALL_HEAP_BYTES,
        };
        // (Its size first, which lists nothing: a large message pays nothing for the check.)
        if out.size_in_words().saturating_mul(8) <= limit {
            let segs = out.output_segments();
            if segs.len() <= SMALL_HEAP_SEGMENTS {
                return self.send_heap_parts(&segs, fd, answers);
            }
        }
        let Some(arena) = out.arena() else {
            // Heap: the segments ride in the socket; the queue keeps `Arc`s of them (frozen
            // while queued) rather than copying.
            let parts = out.share_heap().map_err(local)?;
            let (h, id) = self.header(Kind::Heap, answers);
            let mut head = h.as_ref().to_vec();
            head.resize(h.len() + segment_table_len(parts.len()), 0);
            write_segment_table(&mut head[h.len()..], parts.iter().map(|(_, used)| *used));
            let mut shared = Vec::with_capacity(parts.len() + 1);
            shared.push(SharedBytes::from(head));
            for (seg, used) in parts {
                let owner: Arc<dyn AsRef<[u8]> + Send + Sync> = seg;
                shared.push(SharedBytes::new(owner, 0..used).map_err(|_| {
                    local(crate::shm::Error::Corrupt(
                        "segment shorter than its used bytes",
                    ))
                })?);
            }
            // (The fd is duplicated only if the frame has to be queued.)
            self.chan.send(OutFrame::shared(shared).fd(fd))?;
            return Ok(id);
        };
        self.know_arena(arena)?;
        let blob = out.share_shm().map_err(local)?;
        let Some(arena) = out.arena() else {
            return Err(local(crate::shm::Error::BadConfig("no arena")));
        };
        self.send_blob(arena, blob, fd, answers)
    }

    /// Sends an adopted message (see [`MsgOut::from_builder`]): in place through its flat copy
    /// in the channel's arena, or its segments through the socket on a heap channel.
    fn send_adopted(
        &mut self,
        a: &mut Adopted,
        fd: Option<BorrowedFd<'_>>,
        answers: u64,
    ) -> Result<u64, Error> {
        match &self.backing {
            Backing::Heap => {
                if a.segments().is_empty() {
                    // An empty message still has its root pointer, in one segment.
                    let _ = a.root_mut();
                }
                self.send_heap_parts(&a.segments(), fd, answers)
            }
            Backing::Shm(arena) => {
                let arena = arena.clone();
                self.know_arena(&arena)?;
                let blob = a.share_shm(&arena).map_err(local)?;
                self.send_blob(&arena, blob, fd, answers)
            }
        }
    }

    /// Sends a heap message from its segments as they are (the transport copies what it has
    /// to queue).
    fn send_heap_parts(
        &mut self,
        segs: &[&[u8]],
        fd: Option<BorrowedFd<'_>>,
        answers: u64,
    ) -> Result<u64, Error> {
        let n = segs.len();
        let (h, id) = self.header(Kind::Heap, answers);
        if n <= SMALL_HEAP_SEGMENTS {
            // No allocation: the table and the parts on the stack.
            let mut table = [0u8; segment_table_len(SMALL_HEAP_SEGMENTS)];
            let table = &mut table[..segment_table_len(n)];
            write_segment_table(table, segs.iter().map(|s| s.len()));
            let mut parts: [&[u8]; SMALL_HEAP_SEGMENTS + 2] = [&[]; SMALL_HEAP_SEGMENTS + 2];
            parts[0] = h.as_ref();
            parts[1] = table;
            parts[2..n + 2].copy_from_slice(segs);
            self.chan.send(OutFrame::parts(&parts[..n + 2]).fd(fd))?;
        } else {
            let mut table = vec![0u8; segment_table_len(n)];
            write_segment_table(&mut table, segs.iter().map(|s| s.len()));
            let mut parts: Vec<&[u8]> = Vec::with_capacity(n + 2);
            parts.push(h.as_ref());
            parts.push(&table);
            parts.extend_from_slice(segs);
            self.chan.send(OutFrame::parts(&parts).fd(fd))?;
        }
        Ok(id)
    }

    /// Makes `arena` one whose handles this channel sends (and reads). Handles carry 32 bits
    /// of the arena id: two arenas alike in those cannot share a channel (a 1 in 2^31 chance
    /// per pair).
    fn know_arena(&mut self, arena: &Arena) -> Result<(), Error> {
        match self.arenas.get(&(arena.id() as u32)) {
            Some(known) if known.id() != arena.id() => Err(local(crate::shm::Error::BadConfig(
                "another arena on this channel has the same 32-bit tag",
            ))),
            Some(_) => Ok(()),
            None => {
                self.arenas.insert(arena.id() as u32, arena.clone());
                Ok(())
            }
        }
    }

    /// Sends the handle of a message in `arena` (its pools announced first); its reference
    /// goes with the frame.
    fn send_blob(
        &mut self,
        arena: &Arena,
        blob: LendBlob,
        fd: Option<BorrowedFd<'_>>,
        answers: u64,
    ) -> Result<u64, Error> {
        if let Err(e) = self.announce_pools(arena) {
            let _ = arena.release_blob(&blob);
            return Err(e);
        }
        let (h, id) = self.header(Kind::Shm, answers);
        // Header and handle as two parts: the transport copies them once, into the frame. The
        // handle's reference goes with the frame: given back should the frame never wholly
        // leave (refused here, or dropped unwritten with the queue), since the peer can then
        // never borrow it.
        let parts = [h.as_ref(), blob.as_bytes()];
        self.chan
            .send(OutFrame::parts(&parts).fd(fd).lending(arena, blob))?;
        Ok(id)
    }

    /// Sends the fd of every pool of `arena` this process knows and the peer has not been told
    /// of yet (so every pool a handle of ours can point into), before the handle.
    fn announce_pools(&mut self, arena: &Arena) -> Result<(), Error> {
        let bits = self.announced.get_or_default(arena.id());
        let announced: u32 = bits.iter().map(|w| w.count_ones()).sum();
        if announced == arena.pool_count() {
            return Ok(());
        }
        // The header is the same for every announcement.
        let (h, _) = self.header(Kind::Pool, 0);
        let bits = self.announced.get_or_default(arena.id());
        for id in arena.pool_ids() {
            let (word, bit) = (id as usize / 64, 1u64 << (id % 64));
            if bits.len() <= word {
                bits.resize(word + 1, 0);
            }
            if bits[word] & bit != 0 {
                continue;
            }
            let Some(fd) = arena.pool_fd(id) else {
                continue;
            };
            let body = pool_body(arena.id(), id);
            self.chan
                .send(OutFrame::parts(&[h.as_ref(), &body]).fd(fd))?;
            bits[word] |= bit;
        }
        Ok(())
    }

    /// Receives the next message if one is ready (non-blocking). `Ok(None)`: nothing yet (or,
    /// once [`is_peer_ended`](MsgChannel::is_peer_ended), nothing ever again).
    pub fn try_recv(&mut self) -> Result<Option<MsgIn<M>>, Error> {
        loop {
            match self.next_event(Some(Duration::ZERO))? {
                Some(Incoming::Msg(m)) => return Ok(Some(m)),
                Some(Incoming::UnexpectedResponse(..)) => continue,
                None => return Ok(None),
            }
        }
    }

    /// Waits up to `timeout` (forever if `None`) for the next message, flushing queued sends
    /// meanwhile. `Ok(None)` on timeout, or at once when the peer has ended its sending
    /// ([`is_peer_ended`](MsgChannel::is_peer_ended); with no timeout, that is the only
    /// `None`): `while let Some(m) = chan.recv_blocking(None)? { .. }` reads to the end.
    pub fn recv_blocking(&mut self, timeout: Option<Duration>) -> Result<Option<MsgIn<M>>, Error> {
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        loop {
            let left = deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()));
            match self.next_event(left)? {
                Some(Incoming::Msg(m)) => return Ok(Some(m)),
                Some(Incoming::UnexpectedResponse(..)) => continue,
                None => return Ok(None),
            }
        }
    }

    /// The next message or notice: without waiting if `timeout` is zero, else waiting up to
    /// `timeout` (forever if `None`). `Ok(None)`: nothing within the time.
    pub(crate) fn next_event(
        &mut self,
        timeout: Option<Duration>,
    ) -> Result<Option<Incoming<M>>, Error> {
        let poll_only = timeout == Some(Duration::ZERO);
        let deadline = timeout
            .filter(|_| !poll_only)
            .map(|t| std::time::Instant::now() + t);
        loop {
            self.hosing.check::<Error>()?;
            let r = if poll_only {
                self.chan.try_recv()
            } else {
                // The transport's wait tries a (buffered or non-blocking) read first.
                let left = deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()));
                self.chan.recv_blocking(left)
            };
            let Some(frame) = self.hose_on(r.map_err(Error::from))? else {
                return Ok(None);
            };
            // Matched in place rather than through `hose_on`: a message is moved as little as
            // possible on its way up.
            match self.accept(frame) {
                Ok(Some(ev)) => return Ok(Some(ev)),
                Ok(None) => {}
                Err(e) => return self.hose_on(Err(e)),
            }
        }
    }

    /// Handles one frame: a message, or a pool announcement (`None`).
    fn accept(&mut self, frame: Frame) -> Result<Option<Incoming<M>>, Error> {
        let (frame_buf, fd) = frame.into_parts();
        let buf: &[u8] = &frame_buf;
        let (Header { kind, id, answers }, hlen) = Header::decode(buf, self.token)?;
        let msg = |m: MsgIn<M>| Some(Incoming::Msg(m));
        match kind {
            Kind::Notice => {
                let text = &buf[hlen..];
                if text.len() > MAX_NOTICE_TEXT || fd.is_some() || answers == 0 {
                    return Err(Error::BadMessage("malformed unexpected-response notice"));
                }
                let text = std::str::from_utf8(text).map_err(|_| {
                    Error::BadMessage("unexpected-response notice text is not UTF-8")
                })?;
                Ok(Some(Incoming::UnexpectedResponse(answers, text.into())))
            }
            Kind::Pool => {
                self.add_pool(&buf[hlen..], fd)?;
                Ok(None)
            }
            Kind::Shm => {
                let blob = LendBlob::from_bytes(&buf[hlen..]).map_err(peer)?;
                let arena = self
                    .arenas
                    .get(&blob.arena_tag())
                    .ok_or(peer(crate::shm::Error::ForeignBlob))?;
                let segs = arena.borrow_segments(&blob).map_err(peer)?;
                Ok(msg(MsgIn::new(InSegs::Shm(segs), fd, id, answers)))
            }
            Kind::Heap => {
                let (first, rest) = heap_segments(buf, hlen)?;
                Ok(msg(MsgIn::new(
                    InSegs::Heap {
                        buf: frame_buf,
                        first,
                        rest,
                    },
                    fd,
                    id,
                    answers,
                )))
            }
        }
    }

    fn add_pool(&mut self, body: &[u8], fd: Option<OwnedFd>) -> Result<(), Error> {
        let Some(fd) = fd else {
            return Err(Error::BadMessage("pool announcement without its fd"));
        };
        let (arena_id, pool_id) = read_pool_body(body)?;
        match self.arenas.get(&(arena_id as u32)) {
            Some(arena) if arena.id() == arena_id => {
                match arena.add_pool(fd) {
                    // Our own pool (a shared arena), or one we already know: nothing to do.
                    Ok(_) | Err(crate::shm::Error::DuplicatePool(_)) => Ok(()),
                    Err(e) => Err(peer(e)),
                }
            }
            Some(_) => Err(Error::BadMessage("two arenas with the same tag")),
            None if pool_id == 0 => {
                let arena = Arena::join([fd], ArenaConfig::new().max_pools(1024)).map_err(peer)?;
                if arena.id() != arena_id {
                    return Err(Error::BadMessage("pool announced for another arena"));
                }
                self.arenas.insert(arena_id as u32, arena);
                Ok(())
            }
            None => Err(Error::BadMessage(
                "pool announced before its arena's pool 0",
            )),
        }
    }
}

impl<M: Owned> Drop for MsgChannel<M> {
    fn drop(&mut self) {
        // Handles the peer sent that will never be read here hold references: take in what has
        // arrived (bounded) and drop it, so the peer's memory is freed. (The references of our
        // own handles that never left are given back by the transport's queue, as it drops.)
        if !self.hosing.is_hosed() {
            for _ in 0..100_000 {
                match self.try_recv() {
                    Ok(Some(msg)) => drop(msg),
                    _ => break,
                }
            }
        }
    }
}

/// A map for the handful of arenas one channel sees: a scan of a few entries costs less than
/// hashing on every message.
#[derive(Debug)]
struct SmallMap<K, V>(Vec<(K, V)>);

impl<K, V> Default for SmallMap<K, V> {
    fn default() -> Self {
        SmallMap(Vec::new())
    }
}

impl<K: PartialEq + Copy, V> SmallMap<K, V> {
    fn get(&self, key: &K) -> Option<&V> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    fn insert(&mut self, key: K, value: V) {
        match self.0.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => *v = value,
            None => self.0.push((key, value)),
        }
    }

    fn get_or_default(&mut self, key: K) -> &mut V
    where
        V: Default,
    {
        let i = match self.0.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None => {
                self.0.push((key, V::default()));
                self.0.len() - 1
            }
        };
        &mut self.0[i].1
    }
}

/// A message of ours that could not be sent as it is (not hosing).
fn local(source: crate::shm::Error) -> Error {
    Error::Shm {
        source,
        from_peer: false,
    }
}

fn peer(source: crate::shm::Error) -> Error {
    Error::Shm {
        source,
        from_peer: true,
    }
}

impl<M: Owned> Pollable for MsgChannel<M> {
    type Error = Error;

    /// The transport's (see [`Channel`'s](Channel#impl-Pollable-for-Channel)); nothing once
    /// hosed.
    fn interest(&self) -> Interest<'_> {
        if self.hosing.is_hosed() {
            Interest::none()
        } else {
            self.chan.interest()
        }
    }

    /// The transport's timers and flush; receiving is [`try_recv`](MsgChannel::try_recv)'s.
    fn on_ready(&mut self) -> Result<(), Error> {
        self.hosing.check::<Error>()?;
        let r = self.chan.on_ready().map_err(Error::from);
        self.hose_on(r)
    }
}

impl<M: Owned> AsFd for MsgChannel<M> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.chan.as_fd()
    }
}

impl<M: Owned> AsRawFd for MsgChannel<M> {
    fn as_raw_fd(&self) -> RawFd {
        self.chan.as_raw_fd()
    }
}
