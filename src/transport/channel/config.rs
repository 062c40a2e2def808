//! A channel's settings ([`ChannelConfig`]).

use std::time::Duration;

/// Default [`ChannelConfig::max_frame`]: 1 GiB + 1 MiB.
pub const DEFAULT_MAX_FRAME: u64 = (1 << 30) + (1 << 20);

/// Settings of a [`Channel`](crate::transport::Channel), builder style.
///
/// ```
/// use std::time::Duration;
/// use flowipc::transport::ChannelConfig;
///
/// let cfg = ChannelConfig::new()
///     .max_frame(16 << 20)
///     .high_water(Some(64 << 20))
///     .idle_timeout(Some(Duration::from_secs(10)))
///     .auto_ping(Some(Duration::from_secs(2)));
/// assert_eq!(cfg.get_max_frame(), 16 << 20);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelConfig {
    pub(super) max_frame: u64,
    pub(super) high_water: Option<usize>,
    pub(super) idle_timeout: Option<Duration>,
    pub(super) auto_ping: Option<Duration>,
    pub(super) fds: bool,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        ChannelConfig {
            max_frame: DEFAULT_MAX_FRAME,
            high_water: None,
            idle_timeout: None,
            auto_ping: None,
            fds: true,
        }
    }
}

impl ChannelConfig {
    /// The defaults: frames up to [`DEFAULT_MAX_FRAME`], unbounded send queue, no idle timeout,
    /// no pings.
    pub fn new() -> Self {
        Self::default()
    }

    /// Largest payload, in bytes, this side sends or accepts ([`Error::FrameTooLarge`](crate::transport::Error::FrameTooLarge)).
    pub fn max_frame(mut self, bytes: u64) -> Self {
        self.max_frame = bytes;
        self
    }

    /// Bound on the bytes of data frames waiting in the send queue (`None`: unbounded). A send
    /// that would take the queue past it is refused with [`Error::HighWater`](crate::transport::Error::HighWater); see
    /// [`Channel::send`](crate::transport::Channel::send).
    pub fn high_water(mut self, bytes: Option<usize>) -> Self {
        self.high_water = bytes;
        self
    }

    /// Fail with [`Error::IdleTimeout`](crate::transport::Error::IdleTimeout) when nothing at all (data or ping) arrived for this long
    /// (`None`: never). Pair it with the peer's [`auto_ping`](ChannelConfig::auto_ping) at a
    /// fraction of the period.
    pub fn idle_timeout(mut self, t: Option<Duration>) -> Self {
        self.idle_timeout = t;
        self
    }

    /// Send a keep-alive ping when nothing was sent for this long (`None`: never).
    pub fn auto_ping(mut self, period: Option<Duration>) -> Self {
        self.auto_ping = period;
        self
    }

    /// Whether frames may carry fds (default `true`). With `false`, a send with an fd is refused
    /// with [`Error::FdsDisabled`](crate::transport::Error::FdsDisabled) (non-hosing) and a frame with an fd from the peer is
    /// [`Error::UnexpectedFd`](crate::transport::Error::UnexpectedFd) (hosing): a channel of blobs only. Such a channel makes no fd
    /// side socket (its hello says so); it accepts the peer's, and never reads it.
    pub fn fds(mut self, on: bool) -> Self {
        self.fds = on;
        self
    }

    /// See [`fds`](ChannelConfig::fds).
    pub fn get_fds(&self) -> bool {
        self.fds
    }

    /// See [`max_frame`](ChannelConfig::max_frame).
    pub fn get_max_frame(&self) -> u64 {
        self.max_frame
    }

    /// See [`high_water`](ChannelConfig::high_water).
    pub fn get_high_water(&self) -> Option<usize> {
        self.high_water
    }

    /// See [`idle_timeout`](ChannelConfig::idle_timeout).
    pub fn get_idle_timeout(&self) -> Option<Duration> {
        self.idle_timeout
    }

    /// See [`auto_ping`](ChannelConfig::auto_ping).
    pub fn get_auto_ping(&self) -> Option<Duration> {
        self.auto_ping
    }
}
