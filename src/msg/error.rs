use std::fmt;

use crate::{shm, transport};

/// What can go wrong sending or receiving messages.
///
/// Hosing errors (see [`Error::is_hosing`]) are reported once; the channel then answers every
/// call with [`Error::Hosed`] and does nothing else.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The transport failed (its error says whether that hosed the channel).
    Transport(transport::Error),
    /// Sending: the message could not be placed in the arena (e.g. [`shm::Error::OutOfMemory`]).
    /// Nothing was sent, the `MsgOut` is intact, the channel is fine. Receiving: a handle from
    /// the peer failed validation (forged, stale, unknown pool...), which hoses the channel.
    Shm {
        /// The shared-memory error.
        source: shm::Error,
        /// Whether it came from the peer (hosing) or from our own send (not).
        from_peer: bool,
    },
    /// The peer sent a frame that is not a well-formed message (the text says what).
    BadMessage(&'static str),
    /// A list, `Data` or `Text` longer than capnp allows (see [`MAX_LIST_LEN`](super::MAX_LIST_LEN)).
    ListTooLong {
        /// Requested length.
        len: usize,
    },
    /// The message's backing (heap or arena) does not match the channel's.
    WrongBacking,
    /// A message from the peer carried another session's token, or none where the channel has
    /// one (or one where it has none): it belongs to another session (hosing).
    WrongSession,
    /// The channel was hosed by an error reported earlier.
    Hosed,
}

impl Error {
    /// Whether this error ended the channel (reported once; later calls get [`Error::Hosed`]).
    pub fn is_hosing(&self) -> bool {
        match self {
            Error::Transport(e) => e.is_hosing(),
            Error::Shm { from_peer, .. } => *from_peer,
            Error::BadMessage(_) | Error::WrongSession | Error::Hosed => true,
            Error::ListTooLong { .. } | Error::WrongBacking => false,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Transport(e) => e.fmt(f),
            Error::Shm {
                from_peer: true, ..
            } => f.write_str("bad message handle from the peer"),
            Error::Shm { .. } => f.write_str("message not sendable in place"),
            Error::BadMessage(what) => write!(f, "malformed message from the peer: {what}"),
            Error::ListTooLong { len } => write!(
                f,
                "list of {len} elements exceeds capnp's limit of 2^29-1: split it in chunks"
            ),
            Error::WrongBacking => f.write_str("message backing does not match the channel's"),
            Error::WrongSession => {
                f.write_str("message from the peer carries another session's token")
            }
            Error::Hosed => f.write_str("channel hosed by an error reported earlier"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            // Transparent: it shows as the transport error itself.
            Error::Transport(e) => e.source(),
            Error::Shm { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<transport::Error> for Error {
    fn from(e: transport::Error) -> Self {
        Error::Transport(e)
    }
}

impl crate::hosing::HosingError for Error {
    const TARGET: &'static str = "flowipc::msg";

    fn is_hosing(&self) -> bool {
        Error::is_hosing(self)
    }

    /// The transport's errors were logged there.
    fn log_level(&self) -> Option<log::Level> {
        match self {
            Error::Transport(_) | Error::Hosed => None,
            _ => Some(log::Level::Warn),
        }
    }

    fn hosed() -> Self {
        Error::Hosed
    }
}
