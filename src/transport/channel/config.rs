//! A channel's settings ([`ChannelConfig`]).

use std::time::Duration;

/// Default [`max_frame`](ChannelConfig::with_max_frame): 1 GiB + 1 MiB.
pub const DEFAULT_MAX_FRAME: u64 = (1 << 30) + (1 << 20);

/// Settings of a [`Channel`](crate::transport::Channel), builder style.
///
/// ```
/// use std::time::Duration;
/// use flowipc::transport::ChannelConfig;
///
/// let cfg = ChannelConfig::new()
///     .with_max_frame(16 << 20)
///     .with_high_water(Some(64 << 20))
///     .with_idle_timeout(Some(Duration::from_secs(10)))
///     .with_auto_ping(Some(Duration::from_secs(2)));
/// assert_eq!(cfg.max_frame(), 16 << 20);
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
    pub fn with_max_frame(mut self, bytes: u64) -> Self {
        self.max_frame = bytes;
        self
    }

    /// Bound on the bytes of data frames waiting in the send queue (`None`: unbounded). A send
    /// that would take the queue past it is refused with [`Error::HighWater`](crate::transport::Error::HighWater); see
    /// [`Channel::send`](crate::transport::Channel::send).
    pub fn with_high_water(mut self, bytes: Option<usize>) -> Self {
        self.high_water = bytes;
        self
    }

    /// Fail with [`Error::IdleTimeout`](crate::transport::Error::IdleTimeout) when nothing at all (data or ping) arrived for this long
    /// (`None`: never). Pair it with the peer's [`auto_ping`](ChannelConfig::with_auto_ping) at a
    /// fraction of the period.
    pub fn with_idle_timeout(mut self, t: Option<Duration>) -> Self {
        self.idle_timeout = t;
        self
    }

    /// Send a keep-alive ping when nothing was sent for this long (`None`: never).
    pub fn with_auto_ping(mut self, period: Option<Duration>) -> Self {
        self.auto_ping = period;
        self
    }

    /// Whether frames may carry fds (default `true`). With `false`, a send with an fd is refused
    /// with [`Error::FdsDisabled`](crate::transport::Error::FdsDisabled) (non-hosing) and a frame with an fd from the peer is
    /// [`Error::UnexpectedFd`](crate::transport::Error::UnexpectedFd) (hosing): a channel of blobs only. Such a channel makes no fd
    /// side socket (its hello says so); it accepts the peer's, and never reads it.
    pub fn with_fds(mut self, on: bool) -> Self {
        self.fds = on;
        self
    }

    /// See [`with_fds`](ChannelConfig::with_fds).
    pub fn fds(&self) -> bool {
        self.fds
    }

    /// See [`with_max_frame`](ChannelConfig::with_max_frame).
    pub fn max_frame(&self) -> u64 {
        self.max_frame
    }

    /// See [`with_high_water`](ChannelConfig::with_high_water).
    pub fn high_water(&self) -> Option<usize> {
        self.high_water
    }

    /// See [`with_idle_timeout`](ChannelConfig::with_idle_timeout).
    pub fn idle_timeout(&self) -> Option<Duration> {
        self.idle_timeout
    }

    /// See [`with_auto_ping`](ChannelConfig::with_auto_ping).
    pub fn auto_ping(&self) -> Option<Duration> {
        self.auto_ping
    }
}
