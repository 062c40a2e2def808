use std::fmt;

use crate::msg;

/// What can go wrong on a structured channel.
///
/// Hosing errors ([`Error::is_hosing`]) are reported once; the channel then answers every call
/// with [`Error::Hosed`].
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The message layer (transport, shared memory, framing) failed; its error says whether
    /// that hosed the channel.
    Msg(msg::Error),
    /// The root schema has no anonymous union: messages would have no type to dispatch on.
    NoRootUnion,
    /// No union field of the root has this name.
    NoSuchMsgType(String),
    /// The peer sent a message whose union field this schema does not know (another schema?).
    UnknownMsgType,
    /// The peer sent a response to a message id we never sent.
    BadResponseId(u64),
    /// The peer's message could not be read as the channel's root type.
    Decode(capnp::Error),
    /// `sync_request` got no response in time (not hosing; a late response is dropped).
    Timeout,
    /// The peer ended its sending (its graceful end, see
    /// [`Channel::is_peer_ended`](super::Channel::is_peer_ended)), so a request can get no
    /// response: a `sync_request` waiting, or a request made after the end. Not hosing: this
    /// side may go on sending.
    PeerEnded,
    /// The channel is not started yet, so nothing can be received (see
    /// [`start`](super::Channel::start)).
    NotStarted,
    /// `start` was called twice.
    AlreadyStarted,
    /// An `AsyncChannel` was called from one of its own handlers, which hold the channel: use
    /// the `&mut Channel` the handler gets.
    InOwnHandler,
    /// The channel was hosed by an error reported earlier.
    Hosed,
}

impl Error {
    /// Whether this error ended the channel.
    pub fn is_hosing(&self) -> bool {
        match self {
            Error::Msg(e) => e.is_hosing(),
            Error::UnknownMsgType | Error::BadResponseId(_) | Error::Decode(_) | Error::Hosed => {
                true
            }
            Error::NoRootUnion
            | Error::NoSuchMsgType(_)
            | Error::Timeout
            | Error::PeerEnded
            | Error::NotStarted
            | Error::AlreadyStarted
            | Error::InOwnHandler => false,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Msg(e) => e.fmt(f),
            Error::NoRootUnion => f.write_str(
                "the channel's root schema has no anonymous union (it gives messages their type)",
            ),
            Error::NoSuchMsgType(n) => write!(f, "the root union has no field named {n:?}"),
            Error::UnknownMsgType => f.write_str(
                "message of a type (union field) this schema does not know, from the peer",
            ),
            Error::BadResponseId(id) => {
                write!(f, "the peer answered message {id}, which was never sent")
            }
            Error::Decode(_) => f.write_str("message from the peer could not be read"),
            Error::Timeout => f.write_str("no response within the timeout"),
            Error::PeerEnded => f.write_str("the peer ended its sending: no response can come"),
            Error::NotStarted => f.write_str("channel not started: nothing can be received yet"),
            Error::AlreadyStarted => f.write_str("channel already started"),
            Error::InOwnHandler => f.write_str(
                "async channel called from its own handler (use the handler's `&mut Channel`)",
            ),
            Error::Hosed => f.write_str("channel hosed by an error reported earlier"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            // Transparent: it shows as the message-layer error itself.
            Error::Msg(e) => e.source(),
            Error::Decode(e) => Some(e),
            _ => None,
        }
    }
}

impl From<msg::Error> for Error {
    fn from(e: msg::Error) -> Self {
        match e {
            // One `Hosed` for the whole stack.
            msg::Error::Hosed => Error::Hosed,
            e => Error::Msg(e),
        }
    }
}

impl From<crate::transport::Error> for Error {
    fn from(e: crate::transport::Error) -> Self {
        msg::Error::from(e).into()
    }
}

impl crate::hosing::HosingError for Error {
    const TARGET: &'static str = "flowipc::struc";

    fn is_hosing(&self) -> bool {
        Error::is_hosing(self)
    }

    /// The message layer's errors were logged there.
    fn log_level(&self) -> Option<log::Level> {
        match self {
            Error::Msg(_) | Error::Hosed => None,
            _ => Some(log::Level::Warn),
        }
    }

    fn hosed() -> Self {
        Error::Hosed
    }
}
