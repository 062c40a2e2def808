use std::fmt;
use std::io;

/// Everything that can go wrong in the shared-memory layer. Matchable: each bad input has its own
/// variant, so callers (and tests) can tell a stale blob from a forged one.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// A system call failed.
    Io {
        /// What we were doing.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// The fd is not sealed against shrinking and growing (or cannot be sealed at all, as a
    /// socket or a regular file on most file systems): a peer could truncate it under our
    /// mapping and crash us with SIGBUS, so we refuse it.
    NotSealed,
    /// The fd is sealed but is not a flowipc pool, or its header is corrupt. The text says which
    /// check failed.
    NotAPool(&'static str),
    /// The pool was created with another layout version of this crate.
    VersionMismatch {
        /// Version found in the pool header.
        found: u32,
        /// Version this build understands.
        expected: u32,
    },
    /// The pool belongs to another arena than the one it is being added to.
    WrongArena {
        /// Id of the arena adding the pool.
        expected: u64,
        /// Id recorded in the pool.
        found: u64,
    },
    /// A pool with this id is already part of the arena.
    DuplicatePool(u32),
    /// The pool id is not (or not yet) known to this process.
    UnknownPool(u32),
    /// The arena has no room for the request and may not grow further.
    OutOfMemory {
        /// Requested payload bytes.
        requested: usize,
    },
    /// The arena has no room for the request, and a pool that would hold it would take the
    /// arena's pools past their byte limit (see
    /// [`ArenaConfig::max_bytes`](crate::shm::ArenaConfig::max_bytes)). Nothing was made: what
    /// fits still does.
    LimitReached {
        /// Requested payload bytes.
        requested: usize,
        /// The arena's byte limit.
        limit: u64,
    },
    /// The request exceeds what one pool can ever hold.
    TooLarge {
        /// Requested payload bytes.
        requested: usize,
        /// Largest payload one pool can hold.
        max: usize,
    },
    /// A configuration value is out of range.
    BadConfig(&'static str),
    /// A lend blob has the wrong length (it is exactly [`LendBlob::LEN`](crate::shm::LendBlob::LEN)
    /// bytes).
    BlobLength(usize),
    /// A lend blob does not start with the blob magic: not a blob, or garbage.
    BlobMagic,
    /// A lend blob names an offset outside the pool's heap.
    OutOfBounds {
        /// Pool id of the blob.
        pool: u32,
        /// Offset of the blob.
        offset: u64,
    },
    /// A lend blob names an offset that is not 16-byte aligned.
    Misaligned(u64),
    /// A lend blob names an aligned in-bounds offset at which no block starts.
    NotABlock(u64),
    /// The block the blob names has been freed (and maybe reused) since the blob was made, or
    /// the blob was already borrowed as many times as it was lent.
    Stale,
    /// The block holds an object of another type than the one asked for.
    TypeMismatch {
        /// Type tag of the requested type.
        expected: u64,
        /// Type tag recorded in the block.
        found: u64,
    },
    /// A lend blob of another arena.
    ForeignBlob,
    /// Shared allocator metadata failed a consistency check (a peer scribbled over it).
    Corrupt(&'static str),
}

impl Error {
    pub(crate) fn io(op: &'static str, source: impl Into<io::Error>) -> Self {
        Error::Io {
            op,
            source: source.into(),
        }
    }

    /// A copy, for an error that is recorded and reported later (an `io::Error` is rebuilt
    /// from its kind and text).
    pub(crate) fn duplicate(&self) -> Self {
        use Error::*;
        match self {
            Io { op, source } => Io {
                op,
                source: match source.raw_os_error() {
                    Some(code) => io::Error::from_raw_os_error(code),
                    None => io::Error::new(source.kind(), source.to_string()),
                },
            },
            NotSealed => NotSealed,
            NotAPool(s) => NotAPool(s),
            VersionMismatch { found, expected } => VersionMismatch {
                found: *found,
                expected: *expected,
            },
            WrongArena { expected, found } => WrongArena {
                expected: *expected,
                found: *found,
            },
            DuplicatePool(p) => DuplicatePool(*p),
            UnknownPool(p) => UnknownPool(*p),
            OutOfMemory { requested } => OutOfMemory {
                requested: *requested,
            },
            LimitReached { requested, limit } => LimitReached {
                requested: *requested,
                limit: *limit,
            },
            TooLarge { requested, max } => TooLarge {
                requested: *requested,
                max: *max,
            },
            BadConfig(s) => BadConfig(s),
            BlobLength(n) => BlobLength(*n),
            BlobMagic => BlobMagic,
            OutOfBounds { pool, offset } => OutOfBounds {
                pool: *pool,
                offset: *offset,
            },
            Misaligned(o) => Misaligned(*o),
            NotABlock(o) => NotABlock(*o),
            Stale => Stale,
            TypeMismatch { expected, found } => TypeMismatch {
                expected: *expected,
                found: *found,
            },
            ForeignBlob => ForeignBlob,
            Corrupt(s) => Corrupt(s),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { op, .. } => write!(f, "{op} failed"),
            Error::NotSealed => f.write_str("fd is not a sealed memfd (shrink/grow seals missing)"),
            Error::NotAPool(why) => write!(f, "not a flowipc pool: {why}"),
            Error::VersionMismatch { found, expected } => {
                write!(
                    f,
                    "pool layout version {found}, this build speaks {expected}"
                )
            }
            Error::WrongArena { expected, found } => {
                write!(f, "pool of arena {found:#x}, expected arena {expected:#x}")
            }
            Error::DuplicatePool(id) => write!(f, "pool {id} is already in the arena"),
            Error::UnknownPool(id) => write!(f, "pool {id} is not known to this process"),
            Error::OutOfMemory { requested } => {
                write!(f, "arena exhausted: no room for {requested} bytes")
            }
            Error::LimitReached { requested, limit } => write!(
                f,
                "arena limit reached: no room for {requested} bytes, and a new pool for them \
                 would take the arena past {limit} bytes"
            ),
            Error::TooLarge { requested, max } => {
                write!(
                    f,
                    "{requested} bytes exceed the largest possible block ({max} bytes)"
                )
            }
            Error::BadConfig(why) => write!(f, "bad arena configuration: {why}"),
            Error::BlobLength(n) => write!(f, "lend blob of {n} bytes, expected 32"),
            Error::BlobMagic => f.write_str("not a lend blob (bad magic)"),
            Error::OutOfBounds { pool, offset } => {
                write!(f, "offset {offset:#x} is outside the heap of pool {pool}")
            }
            Error::Misaligned(o) => write!(f, "offset {o:#x} is not block-aligned"),
            Error::NotABlock(o) => write!(f, "no block starts at offset {o:#x}"),
            Error::Stale => f.write_str("stale blob: the block was freed or the blob already used"),
            Error::TypeMismatch { expected, found } => {
                write!(f, "type tag {found:#x} where {expected:#x} was expected")
            }
            Error::ForeignBlob => f.write_str("lend blob of another arena"),
            Error::Corrupt(why) => write!(f, "corrupt allocator metadata: {why}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Why receiving an arena's pools over a Unix socket failed ([`Arena::join_from`],
/// [`Arena::add_pools_from`]).
///
/// After [`Arena`](ReceiveError::Arena) the whole share was read (or, for a bad configuration
/// given to `join_from`, nothing was): the socket is positioned at what the peer sent next.
/// After the other variants the share may be partly read: the stream is out of step, and the
/// connection should be dropped. Every fd received before the failure is closed.
///
/// [`Arena::join_from`]: crate::shm::Arena::join_from
/// [`Arena::add_pools_from`]: crate::shm::Arena::add_pools_from
#[derive(Debug)]
#[non_exhaustive]
pub enum ReceiveError {
    /// Reading the socket failed. A socket in non-blocking mode with nothing to read, or one
    /// whose read timeout ([`UnixStream::set_read_timeout`]) passed, gives
    /// [`io::ErrorKind::WouldBlock`].
    ///
    /// [`UnixStream::set_read_timeout`]: std::os::unix::net::UnixStream::set_read_timeout
    Io(io::Error),
    /// The peer closed its end before a whole share arrived.
    EndOfStream,
    /// The bytes read are not a share of arena pools (as [`Arena::send_to`] writes); the text
    /// says which check failed.
    ///
    /// [`Arena::send_to`]: crate::shm::Arena::send_to
    BadMessage(&'static str),
    /// A message of the share came with another number of fds than its header announces (none
    /// at all, for instance, when the peer wrote the bytes without attaching the fds).
    FdCount {
        /// Fds the header announces.
        expected: usize,
        /// Fds that came with the message.
        received: usize,
    },
    /// The fds arrived but were refused: the [`Error`] says why (an fd that is not a sealed
    /// memfd is [`Error::NotSealed`], a pool of another arena [`Error::WrongArena`], a share
    /// without pool 0 given to `join_from` [`Error::UnknownPool`]`(0)`, a bad configuration
    /// [`Error::BadConfig`], ...).
    Arena(Error),
}

impl fmt::Display for ReceiveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReceiveError::Io(_) => f.write_str("reading the arena's pools from the socket failed"),
            ReceiveError::EndOfStream => {
                f.write_str("the peer closed the socket before the arena's pools arrived")
            }
            ReceiveError::BadMessage(why) => write!(f, "not a share of arena pools: {why}"),
            ReceiveError::FdCount { expected, received } => write!(
                f,
                "a share message announcing {expected} pool fds came with {received}"
            ),
            ReceiveError::Arena(_) => f.write_str("the received pools were refused"),
        }
    }
}

impl std::error::Error for ReceiveError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ReceiveError::Io(e) => Some(e),
            ReceiveError::Arena(e) => Some(e),
            _ => None,
        }
    }
}

/// Result of the shared-memory layer.
pub type Result<T, E = Error> = std::result::Result<T, E>;
