//! The transport's error type.

use std::fmt;
use std::io;

/// Everything that can go wrong on a [`Channel`](super::Channel).
///
/// Errors are either *hosing* ([`Error::is_hosing`]) or not. A hosing error ends the channel: it
/// is returned exactly once, by whichever call ran into it (a send, [`flush`], [`try_recv`] or
/// [`on_timer`]; in the async-I/O face, the send call or else the on-error handler), and every
/// later call returns [`Error::Hosed`] without doing anything. A non-hosing error refuses one
/// request and leaves the channel as it was.
///
/// [`flush`]: super::Channel::flush
/// [`try_recv`]: super::Channel::try_recv
/// [`on_timer`]: super::Channel::on_timer
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The peer's channel is of another [`ChannelKind`](super::ChannelKind) (its hello says
    /// which). Hosing.
    KindMismatch {
        /// This side's kind.
        ours: super::ChannelKind,
        /// The peer's.
        theirs: super::ChannelKind,
    },
    /// The peer's shared-memory ring is not one (a file of the wrong size or not sealed, a bad
    /// header) or its control words hold positions no correct peer writes; or the peer's POSIX
    /// message queue is not one. The text says which. Hosing.
    BadQueue(&'static str),
    /// A system call failed in an unexpected way (hosing).
    Io(io::Error),
    /// The connection was reset (`ECONNRESET` or `EPIPE`: the peer closed its end, typically
    /// while data was still in flight). Hosing.
    Reset,
    /// The peer closed the connection (end of stream at a frame boundary) without ending its
    /// sending gracefully first. Hosing. (A graceful end is no error: see
    /// [`Channel::is_peer_ended`](super::Channel::is_peer_ended).)
    PeerGone,
    /// The stream ended in the middle of a frame. Hosing.
    Truncated {
        /// Bytes the frame should have had: the 16-byte header plus the payload length it
        /// announced, or just 16 if the header itself was cut.
        expected: u64,
        /// Bytes of the frame (header included) that did arrive.
        got: u64,
    },
    /// Bytes that are not a frame: wrong magic, unknown flag bits, or a contradictory header.
    /// The text says which. Hosing.
    BadFrame(&'static str),
    /// A frame larger than the channel's `max_frame`.
    ///
    /// Sending one is refused (non-hosing: nothing was sent, `received` is false). Receiving a
    /// header that announces one hoses the channel (`received` is true), before anything is
    /// allocated for it.
    FrameTooLarge {
        /// The frame's payload length.
        len: u64,
        /// The configured maximum.
        max: u64,
        /// Whether the frame came from the peer (hosing) rather than from a local send.
        received: bool,
    },
    /// An fd the channel does not take: the peer's hello carried one without being flagged
    /// for it, or a frame flagged as carrying one reached a channel configured without fds
    /// ([`ChannelConfig::with_fds`](super::ChannelConfig::with_fds)). Any fd received was closed. (An fd a
    /// peer attaches to the data socket after the hello is closed by the kernel, unseen: see the
    /// wire format in [the module docs](super).) Hosing.
    UnexpectedFd,
    /// A frame is flagged as carrying an fd, but it is not on the peer's fd side socket, where
    /// the peer must have put it before the frame (nothing there, a message without an fd, the
    /// side socket closed, or the peer's hello announced no side socket); or the hello is
    /// flagged and came without one. Hosing.
    MissingFd,
    /// More than one fd arrived with one frame's side-socket message or with the hello (or so
    /// many that the kernel cut them off). All were closed. Hosing.
    TooManyFds,
    /// Nothing at all (data or keep-alive ping) arrived for the configured idle timeout. Hosing.
    IdleTimeout,
    /// The channel was hosed earlier (the error that hosed it was reported then). Nothing was
    /// done.
    Hosed,
    /// Queuing this frame would take the send queue past the configured high-water mark. Nothing
    /// of the frame was sent or queued; the channel is fine. Non-hosing.
    HighWater {
        /// Bytes of data frames queued now (keep-alive pings and the end frame do not count).
        queued: usize,
        /// The configured high-water mark.
        limit: usize,
    },
    /// [`end_sending`](super::Channel::end_sending) was called before: no more frames may be
    /// sent. Non-hosing.
    SendingEnded,
    /// A [`SharedBytes`](super::SharedBytes) range does not fit its owner's bytes. Non-hosing.
    InvalidRange {
        /// Start of the range.
        start: usize,
        /// End of the range.
        end: usize,
        /// Length of the owner's bytes.
        len: usize,
    },
    /// The [`AsyncChannel`](super::AsyncChannel) was dropped before the operation completed.
    Aborted,
    /// A send with an fd on a channel configured without fds
    /// ([`ChannelConfig::with_fds`](super::ChannelConfig::with_fds)). Nothing was sent. Non-hosing.
    FdsDisabled,
}

impl Error {
    /// Whether this error ended the channel (see the type's docs). [`Error::Hosed`] itself is
    /// not hosing: it reports an earlier hosing error.
    pub fn is_hosing(&self) -> bool {
        match self {
            Error::Io(_)
            | Error::KindMismatch { .. }
            | Error::BadQueue(_)
            | Error::Reset
            | Error::PeerGone
            | Error::Truncated { .. }
            | Error::BadFrame(_)
            | Error::UnexpectedFd
            | Error::MissingFd
            | Error::TooManyFds
            | Error::IdleTimeout => true,
            Error::FrameTooLarge { received, .. } => *received,
            Error::Hosed
            | Error::HighWater { .. }
            | Error::SendingEnded
            | Error::InvalidRange { .. }
            | Error::Aborted
            | Error::FdsDisabled => false,
        }
    }

    /// Maps an OS error from a send or receive: a reset connection is [`Error::Reset`].
    pub(crate) fn from_io(e: io::Error) -> Error {
        match e.kind() {
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => Error::Reset,
            _ => Error::Io(e),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(_) => f.write_str("transport I/O error"),
            Error::KindMismatch { ours, theirs } => write!(
                f,
                "the peer's channel kind is {theirs:?}, this side's is {ours:?}"
            ),
            Error::BadQueue(what) => write!(f, "bad ring or message queue: {what}"),
            Error::Reset => f.write_str("connection reset by peer"),
            Error::PeerGone => f.write_str("peer closed the connection"),
            Error::Truncated { expected, got } => write!(
                f,
                "stream ended inside a frame: {got} of its {expected} bytes arrived"
            ),
            Error::BadFrame(what) => write!(f, "bad frame: {what}"),
            Error::FrameTooLarge { len, max, received } => write!(
                f,
                "{} frame of {len} bytes exceeds the maximum of {max}",
                if *received { "received" } else { "outgoing" }
            ),
            Error::UnexpectedFd => f.write_str("received an fd that belongs to no frame"),
            Error::MissingFd => f.write_str("frame flagged as carrying an fd arrived without one"),
            Error::TooManyFds => f.write_str("more than one fd arrived with one frame"),
            Error::IdleTimeout => f.write_str("nothing received for the idle timeout"),
            Error::Hosed => f.write_str("channel was hosed by an earlier error"),
            Error::HighWater { queued, limit } => write!(
                f,
                "send queue holds {queued} bytes; this frame would exceed the high-water mark of {limit}"
            ),
            Error::SendingEnded => f.write_str("sending was ended on this channel"),
            Error::InvalidRange { start, end, len } => {
                write!(f, "range {start}..{end} does not fit in {len} bytes")
            }
            Error::Aborted => f.write_str("channel dropped before the operation completed"),
            Error::FdsDisabled => f.write_str("this channel is configured without fds"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl crate::hosing::HosingError for Error {
    const TARGET: &'static str = "flowipc::transport";

    fn is_hosing(&self) -> bool {
        Error::is_hosing(self)
    }

    /// The peer gone is ordinary news (info); anything else is a warning.
    fn log_level(&self) -> Option<log::Level> {
        Some(match self {
            Error::PeerGone | Error::Reset => log::Level::Info,
            _ => log::Level::Warn,
        })
    }

    fn hosed() -> Self {
        Error::Hosed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosing_classification() {
        assert!(Error::PeerGone.is_hosing());
        assert!(!Error::Hosed.is_hosing());
        assert!(!Error::SendingEnded.is_hosing());
        assert!(!Error::HighWater {
            queued: 1,
            limit: 1
        }
        .is_hosing());
        let sent = Error::FrameTooLarge {
            len: 2,
            max: 1,
            received: false,
        };
        let got = Error::FrameTooLarge {
            len: 2,
            max: 1,
            received: true,
        };
        assert!(!sent.is_hosing());
        assert!(got.is_hosing());
        assert!(got.to_string().contains("received frame of 2 bytes"));
        assert!(matches!(
            Error::from_io(io::Error::from_raw_os_error(nix::libc::EPIPE)),
            Error::Reset
        ));
        assert!(matches!(
            Error::from_io(io::Error::from_raw_os_error(nix::libc::EBADF)),
            Error::Io(_)
        ));
    }
}
