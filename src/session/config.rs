//! Settings of a session, both sides' (some must match, see [`SessionConfig`]).

use std::time::Duration;

use crate::transport::{ChannelConfig, ChannelKind, WaitPolicy};

/// Where a session's structured messages live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ShmKind {
    /// SHM-classic: a session-scope arena and an app-scope arena, shared-memory pools both
    /// processes map (growing by pools up to [`SessionConfig::with_arena_limit`]); messages
    /// cross without copies (small ones are copied, which costs less: see
    /// [`MsgChannel::with_inline_max`](crate::msg::MsgChannel::with_inline_max)).
    #[default]
    Classic,
    /// No shared memory (the "vanilla" session): messages are copied through the sockets.
    Heap,
}

/// Who drives a session's work: its keep-alive, the channel openings it answers, its
/// handlers; and, for a server, the log-ins.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum EventLoop {
    /// The process's one library thread (the default): the handlers run there, there is
    /// nothing to drive.
    #[default]
    LibraryThread,
    /// Your own loop (sync_io): the library starts no thread for the session. Its
    /// [`ClientSession`](super::ClientSession), [`SessionServer`](super::SessionServer) and
    /// [`ServerSession`](super::ServerSession) are each a [`Pollable`](crate::poll::Pollable):
    /// watch its [`interest`](crate::poll::Pollable::interest) (one fd and a deadline) and call
    /// [`on_ready`](crate::poll::Pollable::on_ready), which runs the handlers on your thread.
    /// Blocking calls ([`open_channel`](super::Session::open_channel),
    /// [`accept`](super::SessionServer::accept)) drive the session themselves while they wait.
    /// The tokio face (cargo feature `tokio`) is built on this.
    SyncIo,
}

/// A session's settings. Both sides must agree on [`shm`](SessionConfig::with_shm),
/// [`channel_kind`](SessionConfig::with_channel_kind) and
/// [`native_handles`](SessionConfig::with_native_handles), or log-in fails with
/// [`Rejection::Config`](super::Rejection::Config); the rest is each side's own.
///
/// ```
/// use std::time::Duration;
/// use flowipc::session::{SessionConfig, ShmKind};
/// let cfg = SessionConfig::new()
///     .with_shm(ShmKind::Heap)
///     .with_native_handles(false)
///     .with_keep_alive(Some((Duration::from_millis(500), Duration::from_secs(3))));
/// assert_eq!(cfg.shm(), ShmKind::Heap);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionConfig {
    shm: ShmKind,
    channel_kind: ChannelKind,
    wait_policy: WaitPolicy,
    native_handles: bool,
    pool_size: u64,
    arena_limit: u64,
    keep_alive: Option<(Duration, Duration)>,
    log_in_timeout: Duration,
    open_timeout: Duration,
    channel_keep_alive: Option<(Duration, Duration)>,
    event_loop: EventLoop,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            shm: ShmKind::Classic,
            channel_kind: ChannelKind::SocketStream,
            wait_policy: WaitPolicy::default(),
            native_handles: true,
            pool_size: 1 << 30,
            arena_limit: 64 << 30,
            keep_alive: Some((Duration::from_secs(1), Duration::from_secs(5))),
            log_in_timeout: Duration::from_secs(10),
            open_timeout: Duration::from_secs(60),
            channel_keep_alive: None,
            event_loop: EventLoop::LibraryThread,
        }
    }
}

impl SessionConfig {
    /// The defaults: SHM-classic, socket channels with fd passing, 1 GiB pools (sparse: only
    /// touched pages cost memory) up to 64 GiB per arena, a keep-alive ping every second and a 5-second idle timeout on
    /// the session's own channel, 10 s to log in, 60 s to open a channel.
    pub fn new() -> Self {
        Self::default()
    }

    /// SHM-classic or heap (must match the peer's).
    pub fn with_shm(mut self, kind: ShmKind) -> Self {
        self.shm = kind;
        self
    }

    /// The kind of the channels the session opens, init channels included (must match the
    /// peer's). The session's own channel, which carries log-in and channel opening, is always
    /// a socket.
    pub fn with_channel_kind(mut self, kind: ChannelKind) -> Self {
        self.channel_kind = kind;
        self
    }

    /// How this side's blocking calls wait on [`ChannelKind::ShmQueue`] channels (each side's
    /// own setting).
    pub fn with_wait_policy(mut self, policy: WaitPolicy) -> Self {
        self.wait_policy = policy;
        self
    }

    /// See [`with_wait_policy`](SessionConfig::with_wait_policy).
    pub fn wait_policy(&self) -> WaitPolicy {
        self.wait_policy
    }

    /// Whether channels carry fds (must match the peer's). Without, a channel refuses to send
    /// one ([`transport::Error::FdsDisabled`](crate::transport::Error::FdsDisabled)).
    pub fn with_native_handles(mut self, on: bool) -> Self {
        self.native_handles = on;
        self
    }

    /// Bytes of each pool of the session's arenas: the first one (the server's setting), and
    /// those each side grows the arenas by when they are full (each side's own; a message
    /// larger than a pool gets a pool of its own, sized to fit). See
    /// [`with_arena_limit`](SessionConfig::with_arena_limit).
    pub fn with_pool_size(mut self, bytes: u64) -> Self {
        self.pool_size = bytes;
        self
    }

    /// Most bytes each of the session's arenas may take, its pools together (default 64 GiB;
    /// pools are sparse, so this bounds the memory an arena can ever use, not what it uses).
    /// The server's setting decides, for both sides: it is recorded in each arena when the
    /// server makes it (the app-scope arena, shared by the app's sessions, at the app's first
    /// log-in). An arena grows by pools up to it; past it, what does not fit fails with
    /// [`shm::Error::LimitReached`](crate::shm::Error::LimitReached) (sending a message:
    /// [`msg::Error::Shm`](crate::msg::Error::Shm), not fatal), and the session goes on.
    pub fn with_arena_limit(mut self, bytes: u64) -> Self {
        self.arena_limit = bytes;
        self
    }

    /// `(ping period, idle timeout)` of the session's own channel: a ping goes out when nothing
    /// was sent for the period, and the session is over ([`Error::IdleTimeout`]) when nothing
    /// came for the timeout. `None`: neither. Not compared at log-in, but the two sides work
    /// together: each side's idle timeout counts on the other's pings, so keep every ping
    /// period well under the peer's idle timeout (the defaults, 1 s and 5 s, do). It runs from
    /// the moment the session opens; a log-in is bounded by
    /// [`with_log_in_timeout`](SessionConfig::with_log_in_timeout) alone.
    ///
    /// [`Error::IdleTimeout`]: super::Error::IdleTimeout
    pub fn with_keep_alive(mut self, k: Option<(Duration, Duration)>) -> Self {
        self.keep_alive = k;
        self
    }

    /// How long log-in may take.
    pub fn with_log_in_timeout(mut self, t: Duration) -> Self {
        self.log_in_timeout = t;
        self
    }

    /// How long `open_channel` waits for the peer's answer.
    pub fn with_open_timeout(mut self, t: Duration) -> Self {
        self.open_timeout = t;
        self
    }

    /// See [`with_shm`](SessionConfig::with_shm).
    pub fn shm(&self) -> ShmKind {
        self.shm
    }

    /// See [`with_channel_kind`](SessionConfig::with_channel_kind).
    pub fn channel_kind(&self) -> ChannelKind {
        self.channel_kind
    }

    /// See [`with_native_handles`](SessionConfig::with_native_handles).
    pub fn native_handles(&self) -> bool {
        self.native_handles
    }

    /// See [`with_pool_size`](SessionConfig::with_pool_size).
    pub fn pool_size(&self) -> u64 {
        self.pool_size
    }

    /// See [`with_arena_limit`](SessionConfig::with_arena_limit).
    pub fn arena_limit(&self) -> u64 {
        self.arena_limit
    }

    /// The configuration of the arenas the session makes or joins (`max_bytes` applies where
    /// the server makes them).
    pub(crate) fn arena_config(&self) -> crate::shm::ArenaConfig {
        crate::shm::ArenaConfig::new()
            .pool_size(self.pool_size)
            .max_pools(1024)
            .max_bytes(self.arena_limit)
    }

    /// See [`with_keep_alive`](SessionConfig::with_keep_alive).
    pub fn keep_alive(&self) -> Option<(Duration, Duration)> {
        self.keep_alive
    }

    /// `(ping period, idle timeout)` of this side's end of every channel the session makes:
    /// init channels and the channels opened either way (`None`, the default: no keep-alive on
    /// them; [`Session::open_channel_with`](super::Session::open_channel_with) can choose per
    /// channel). A channel whose peer sends nothing for the idle timeout ends with
    /// [`transport::Error::IdleTimeout`](crate::transport::Error::IdleTimeout); set both sides'
    /// (each side's timeout counts on the other's pings).
    pub fn with_channel_keep_alive(mut self, k: Option<(Duration, Duration)>) -> Self {
        self.channel_keep_alive = k;
        self
    }

    /// See [`with_channel_keep_alive`](SessionConfig::with_channel_keep_alive).
    pub fn channel_keep_alive(&self) -> Option<(Duration, Duration)> {
        self.channel_keep_alive
    }

    /// Who drives the session (see [`EventLoop`]; default: the library thread). For a server,
    /// its log-ins and every session it accepts.
    pub fn with_event_loop(mut self, e: EventLoop) -> Self {
        self.event_loop = e;
        self
    }

    /// See [`with_event_loop`](SessionConfig::with_event_loop).
    pub fn event_loop(&self) -> EventLoop {
        self.event_loop
    }

    /// The reactor a new session (or server) of this configuration runs on.
    pub(crate) fn reactor(&self) -> std::io::Result<std::sync::Arc<crate::reactor::Reactor>> {
        match self.event_loop {
            EventLoop::LibraryThread => crate::reactor::get(),
            EventLoop::SyncIo => crate::reactor::Reactor::threadless(),
        }
    }

    /// See [`with_log_in_timeout`](SessionConfig::with_log_in_timeout).
    pub fn log_in_timeout(&self) -> Duration {
        self.log_in_timeout
    }

    /// See [`with_open_timeout`](SessionConfig::with_open_timeout).
    pub fn open_timeout(&self) -> Duration {
        self.open_timeout
    }

    /// The configuration of the session's channels (init and opened ones).
    pub fn channel_config(&self) -> ChannelConfig {
        let cfg = ChannelConfig::new()
            .with_fds(self.native_handles)
            .with_kind(self.channel_kind)
            .with_wait_policy(self.wait_policy);
        with_keep_alive(cfg, self.channel_keep_alive)
    }

    /// The configuration of the session's own (master) channel during the log-in: no
    /// keep-alive, whose timers the log-in does not run (its own deadline bounds it). The
    /// session's keep-alive is set when the session opens ([`Session::open`]).
    ///
    /// [`Session::open`]: super::core::Session::open
    pub(crate) fn log_in_config(&self) -> ChannelConfig {
        ChannelConfig::new().with_max_frame(4 << 20)
    }

    pub(crate) fn shm_code(&self) -> u8 {
        match self.shm {
            ShmKind::Heap => 0,
            ShmKind::Classic => 1,
        }
    }

    pub(crate) fn channel_code(&self) -> u8 {
        match self.channel_kind {
            ChannelKind::SocketStream => 0,
            ChannelKind::ShmQueue => 1,
            ChannelKind::PosixMq => 2,
        }
    }
}

/// `cfg` with the keep-alive `k` (ping period, idle timeout); `None`: neither.
pub(crate) fn with_keep_alive(
    cfg: ChannelConfig,
    k: Option<(Duration, Duration)>,
) -> ChannelConfig {
    let (ping, idle) = k.unzip();
    cfg.with_auto_ping(ping).with_idle_timeout(idle)
}
