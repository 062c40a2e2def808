//! A channel's settings ([`ChannelConfig`]).

use std::time::Duration;

/// Default [`max_frame`](ChannelConfig::with_max_frame): 1 GiB + 1 MiB.
pub const DEFAULT_MAX_FRAME: u64 = (1 << 30) + (1 << 20);

/// What carries a channel's frames. The Unix socket is there in every kind: it carries the
/// set-up (the hello), the fds, and tells the peer's death (end of stream). Both ends must be of
/// the same kind ([`Error::KindMismatch`](crate::transport::Error::KindMismatch) otherwise).
///
/// | kind | frames go | a small request/response costs (measured in `rtt/kinds`) |
/// |---|---|---|
/// | [`SocketStream`](ChannelKind::SocketStream) | through the socket | two socket hand-offs |
/// | [`ShmQueue`](ChannelKind::ShmQueue) | through a ring in shared memory, one per direction | loads and stores when the reader is awake (spinning, see [`WaitPolicy`]); a futex wake when it sleeps |
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ChannelKind {
    /// A Unix stream socket (a `socketpair` or a connection): every frame is written to it.
    #[default]
    SocketStream,
    /// A single-producer single-consumer byte ring per direction, in a sealed memfd that its
    /// producer makes and sends in its hello (no name anywhere: nothing outlives the two
    /// processes). Frames are copied into the ring (a zero-copy message's frame is its small
    /// handle, so a 1 GiB message costs what a 1 KiB one does); larger frames than the ring
    /// flow through it in pieces. The receiver spins, then sleeps on a shared futex, as its
    /// [`WaitPolicy`] says; the sender makes a system call only to wake a sleeping receiver.
    ShmQueue,
    /// POSIX message queues (mq_overview(7)), one per direction, for parity with Flow-IPC's
    /// `MqType::POSIX`: each queue is made by its sender and unlinked at once (its descriptor
    /// travels in the hello, so it has no name while in use and nothing outlives a crash).
    /// Every message is a system call on both sides, like the socket's, with smaller units
    /// (2 KiB messages, 8 to a queue, within the kernel's default per-user limit): it is not
    /// faster than the socket on any measure here (see the README's table); it exists for
    /// programs that want the queues themselves. Mind the kernel's limits: each queue (two per
    /// channel, made when the channel is) is charged about 17 KB to the user's
    /// `RLIMIT_MSGQUEUE`, 800 KiB by default for all the user's processes together, so about
    /// 23 channels fit; past it, making a channel fails with [`Error::Io`] (`EMFILE`). There
    /// is also a system-wide cap on queues (`/proc/sys/fs/mqueue/queues_max`, 256 by default).
    ///
    /// [`Error::Io`]: crate::transport::Error::Io
    PosixMq,
}

/// How a [`ShmQueue`](ChannelKind::ShmQueue) channel's blocking calls wait for the peer:
/// spin (no system call: the lowest latency, a busy CPU), then sleep in the kernel.
///
/// Only the blocking calls spin ([`recv_blocking`](crate::transport::Channel::recv_blocking)
/// and what is built on it: `sync_request`, the msg and struc blocking receives); a poll loop
/// of your own, and the library thread that drives the async faces, sleep in `poll` at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum WaitPolicy {
    /// Spin for up to this long, then sleep on a futex (`Duration::ZERO`: sleep at once). After
    /// three spins in a row that ran out and were followed by the peer's answer within the
    /// spin's length once asleep (a peer on our own CPU, which cannot run while we spin, or one
    /// slower than the spin), the next 64 waits sleep at once.
    SpinThenBlock(std::time::Duration),
    /// Spin until the wait ends, never sleeping: the lowest latency, one CPU kept busy by each
    /// waiting thread. Only for threads that have a CPU of their own: a spinner that shares
    /// its CPU with the peer it waits for delays that peer.
    BusyPoll,
}

impl WaitPolicy {
    /// Sleep at once (no spinning).
    pub const BLOCK: WaitPolicy = WaitPolicy::SpinThenBlock(std::time::Duration::ZERO);
}

impl Default for WaitPolicy {
    /// Spin for 20 µs, then sleep; adaptively: after three spins in a row that ran out and were
    /// followed by the peer's answer right after we slept, the next 64 waits sleep at once. On a machine with two CPUs this catches a
    /// peer that answers within microseconds from the other CPU (a futex wake-up across CPUs
    /// costs tens of microseconds on some VMs), and stops wasting time when the peer shares our
    /// CPU (it cannot run while we spin; `sched_yield` would hand the CPU to whichever thread
    /// is runnable for a whole time slice, so there is none).
    fn default() -> Self {
        WaitPolicy::SpinThenBlock(std::time::Duration::from_micros(20))
    }
}

/// Default [`ring_capacity`](ChannelConfig::with_ring_capacity): 256 KiB per direction.
pub const DEFAULT_RING_CAPACITY: u64 = 256 << 10;

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
    pub(super) kind: ChannelKind,
    pub(super) wait: WaitPolicy,
    pub(super) ring_capacity: u64,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        ChannelConfig {
            max_frame: DEFAULT_MAX_FRAME,
            high_water: None,
            idle_timeout: None,
            auto_ping: None,
            fds: true,
            kind: ChannelKind::SocketStream,
            wait: WaitPolicy::default(),
            ring_capacity: DEFAULT_RING_CAPACITY,
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

    /// What carries the frames (default [`ChannelKind::SocketStream`]); both ends must agree.
    pub fn with_kind(mut self, kind: ChannelKind) -> Self {
        self.kind = kind;
        self
    }

    /// How blocking calls wait on a [`ChannelKind::ShmQueue`] channel (ignored by the socket
    /// kind, whose waits are the kernel's).
    pub fn with_wait_policy(mut self, policy: WaitPolicy) -> Self {
        self.wait = policy;
        self
    }

    /// Bytes of the ring this side sends through, for [`ChannelKind::ShmQueue`] (rounded up to
    /// a power of two, between 4 KiB and 1 GiB; default [`DEFAULT_RING_CAPACITY`]). A full ring
    /// is not an error: sends queue locally, as on a full socket.
    pub fn with_ring_capacity(mut self, bytes: u64) -> Self {
        self.ring_capacity = bytes;
        self
    }

    /// See [`with_kind`](ChannelConfig::with_kind).
    pub fn kind(&self) -> ChannelKind {
        self.kind
    }

    /// See [`with_wait_policy`](ChannelConfig::with_wait_policy).
    pub fn wait_policy(&self) -> WaitPolicy {
        self.wait
    }

    /// See [`with_ring_capacity`](ChannelConfig::with_ring_capacity).
    pub fn ring_capacity(&self) -> u64 {
        self.ring_capacity
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
