//! Frames: the one a send takes ([`OutFrame`]: it owns, or borrows until queued, all it
//! carries) and the one a receive hands out ([`Frame`]).

use std::fmt;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::shm::{Arena, LendBlob};
use crate::transport::{AlignedBuf, SharedBytes};

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

/// A frame to send with [`Channel::send`](crate::transport::Channel::send): its payload, an
/// optional fd, and what to do should it never wholly leave.
///
/// The payload is one slice, several (written with one vectored `sendmsg`, not concatenated),
/// or reference-counted parts ([`SharedBytes`]: a queued frame keeps them rather than copying).
/// Borrowed bytes and a borrowed fd are copied (duplicated) only if the frame has to be
/// queued. Whatever the frame owns goes with it into the send queue and is released once the
/// frame is written; [`on_unsent`](OutFrame::on_unsent) runs instead if it never wholly is
/// (refused, or dropped with the queue when the channel is hosed or dropped).
///
/// ```
/// use std::os::fd::AsFd;
/// use flowipc::transport::{Channel, ChannelConfig, Error, OutFrame};
///
/// let (mut a, mut b) = Channel::pair(ChannelConfig::new())?;
/// let file = std::fs::File::open("/dev/null").map_err(Error::Io)?;
/// a.send(b"plain bytes")?;
/// a.send(OutFrame::parts(&[b"two ", b"parts"]).fd(file.as_fd()))?;
/// assert_eq!(&*b.recv_blocking(None)?.unwrap().payload, b"plain bytes");
/// let f = b.recv_blocking(None)?.unwrap();
/// assert_eq!(&*f.payload, b"two parts");
/// assert!(f.fd.is_some());
/// # Ok::<(), Error>(())
/// ```
pub struct OutFrame<'a> {
    pub(super) payload: Payload<'a>,
    pub(super) fd: Option<FdArg<'a>>,
    pub(super) unsent: Option<Unsent<'a>>,
}

impl fmt::Debug for OutFrame<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutFrame")
            .field("len", &self.payload.len())
            .field("fd", &self.fd.as_ref().map(|f| f.as_fd()))
            .field("on_unsent", &self.unsent.is_some())
            .finish()
    }
}

impl<'a> OutFrame<'a> {
    fn with_payload(payload: Payload<'a>) -> Self {
        OutFrame {
            payload,
            fd: None,
            unsent: None,
        }
    }

    /// A frame of `payload`.
    pub fn new(payload: &'a [u8]) -> Self {
        Self::with_payload(Payload::One(payload))
    }

    /// A frame whose payload is `parts`, in order.
    pub fn parts(parts: &'a [&'a [u8]]) -> Self {
        Self::with_payload(Payload::Borrowed(parts))
    }

    /// A frame of reference-counted parts: if it has to be queued, the queue keeps the parts
    /// (no copy).
    pub fn shared(parts: Vec<SharedBytes>) -> Self {
        Self::with_payload(Payload::Shared(parts))
    }

    /// Sends `fd` with the frame (`None`: none); the caller keeps its fd (it is duplicated
    /// only if the frame has to be queued).
    pub fn fd(mut self, fd: impl Into<Option<BorrowedFd<'a>>>) -> Self {
        self.fd = fd.into().map(FdArg::Borrowed);
        self
    }

    /// Sends `fd` with the frame and closes it once sent (or when the frame is refused or
    /// dropped unsent).
    pub fn owned_fd(mut self, fd: impl Into<Option<OwnedFd>>) -> Self {
        self.fd = fd.into().map(FdArg::Owned);
        self
    }

    /// Runs `f` if the frame never wholly leaves: refused by the send, or dropped from the
    /// send queue unwritten (the channel hosed or dropped). Once its last byte is written `f`
    /// is dropped without running. (A layer above gives back there what the frame lent the
    /// peer, which the peer can never take now.) `f` may run inside a call of the channel (or,
    /// for an async channel, under its lock): it must not call the channel.
    pub fn on_unsent(mut self, f: impl FnOnce() + Send + Sync + 'static) -> Self {
        self.unsent = Some(Unsent(Some(Give::Call(Box::new(f)))));
        self
    }

    /// The frame carries a handle lent from `arena` (`blob`): should it never wholly leave,
    /// the handle's reference is given back (the peer can never borrow it). No allocation and
    /// no reference on the arena unless the frame is queued.
    pub(crate) fn lending(mut self, arena: &'a Arena, blob: LendBlob) -> Self {
        self.unsent = Some(Unsent(Some(Give::Lent(arena, blob))));
        self
    }

    /// The payload length in bytes.
    pub fn len(&self) -> usize {
        self.payload.len()
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<'a> From<&'a [u8]> for OutFrame<'a> {
    fn from(payload: &'a [u8]) -> Self {
        OutFrame::new(payload)
    }
}

impl<'a, const N: usize> From<&'a [u8; N]> for OutFrame<'a> {
    fn from(payload: &'a [u8; N]) -> Self {
        OutFrame::new(payload)
    }
}

impl<'a> From<&'a Vec<u8>> for OutFrame<'a> {
    fn from(payload: &'a Vec<u8>) -> Self {
        OutFrame::new(payload)
    }
}

impl<'a> From<&'a AlignedBuf> for OutFrame<'a> {
    fn from(payload: &'a AlignedBuf) -> Self {
        OutFrame::new(payload)
    }
}

/// What a send hands to the common path.
pub(super) enum Payload<'a> {
    One(&'a [u8]),
    Borrowed(&'a [&'a [u8]]),
    Shared(Vec<SharedBytes>),
}

impl Payload<'_> {
    pub(super) fn len(&self) -> usize {
        match self {
            Payload::One(p) => p.len(),
            Payload::Borrowed(p) => p.iter().fold(0usize, |a, s| a.saturating_add(s.len())),
            Payload::Shared(p) => p
                .iter()
                .fold(0usize, |a, s| a.saturating_add(s.as_slice().len())),
        }
    }
}

pub(super) enum FdArg<'a> {
    Borrowed(BorrowedFd<'a>),
    Owned(OwnedFd),
}

impl FdArg<'_> {
    pub(super) fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            FdArg::Borrowed(b) => *b,
            FdArg::Owned(o) => o.as_fd(),
        }
    }

    pub(super) fn into_owned(self) -> std::io::Result<OwnedFd> {
        match self {
            FdArg::Borrowed(b) => b.try_clone_to_owned(),
            FdArg::Owned(o) => Ok(o),
        }
    }
}

/// What a frame gives back should it never wholly leave: runs when dropped, unless
/// [`disarm`](Unsent::disarm)ed because the frame's last byte was written.
pub(super) struct Unsent<'a>(Option<Give<'a>>);

enum Give<'a> {
    /// A user's `on_unsent`.
    Call(Box<dyn FnOnce() + Send + Sync>),
    /// A lent handle's reference, its arena borrowed while the frame is the caller's (a frame
    /// written at once costs nothing more) ...
    Lent(&'a Arena, LendBlob),
    /// ... and held once it is queued.
    LentHeld(Arena, LendBlob),
}

impl<'a> Unsent<'a> {
    pub(super) fn disarm(mut self) {
        self.0 = None;
    }

    /// For the send queue: holds what was borrowed.
    pub(super) fn into_queued(mut self) -> Unsent<'static> {
        Unsent(self.0.take().map(|g| match g {
            Give::Call(f) => Give::Call(f),
            Give::Lent(arena, blob) => Give::LentHeld(arena.clone(), blob),
            Give::LentHeld(arena, blob) => Give::LentHeld(arena, blob),
        }))
    }
}

impl fmt::Debug for Unsent<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Unsent")
    }
}

impl Drop for Unsent<'_> {
    fn drop(&mut self) {
        match self.0.take() {
            None => {}
            Some(Give::Call(f)) => f(),
            // The peer can never borrow the handle now: its reference is given back.
            Some(Give::Lent(arena, blob)) => {
                let _ = arena.release_blob(&blob);
            }
            Some(Give::LentHeld(arena, blob)) => {
                let _ = arena.release_blob(&blob);
            }
        }
    }
}
