//! SHM-classic: memfd pools, a lock-free allocator inside them, and cross-process ref-counted
//! handles.
//!
//! An [`Arena`] is a set of [`Pool`]s. Each pool is a `memfd_create` file, sealed against
//! shrinking and growing and mapped `MAP_SHARED`; its fd is what other processes receive (over
//! `SCM_RIGHTS`) to map the same RAM. There are no names in `/dev/shm`: the kernel frees a pool
//! when its last fd and mapping are gone, even if every process using it was SIGKILLed.
//!
//! Inside, everything refers to everything by offset, so each process may map a pool at its own
//! address. The allocator is lock-free (size-class free lists with ABA-tagged heads, a bump
//! pointer for fresh space, exact page-rounded extents for large blocks), so a process killed at
//! any instant can leak what it held but never leave a lock held or a list cut. In front of the
//! shared lists, each thread has a cache of free small blocks whose lists live in the pool too,
//! so a small allocation and free cost no atomic read-modify-write, and the cache of a thread or
//! process that is gone is handed back (on thread exit) or reclaimed (after the process died:
//! [`Arena::reclaim_dead_caches`]).
//!
//! * [`Block`]: an owned allocation (like `Box<[u8]>`), freed on drop.
//! * [`ShmHandle<T>`]: a ref-counted `T` (like `Arc<T>`, for [`ShmSafe`] plain data) whose count
//!   lives in shared memory. [`ShmHandle::lend`] packs one reference into a 32-byte
//!   [`LendBlob`] for another process; [`Arena::borrow`] validates and adopts it there. The
//!   arenas of a session keep a ledger of what the client holds, so that the server gives it
//!   back if the client dies (see [`session`](crate::session#when-a-client-dies)).
//!
//! # Trust model
//! Peers are cooperating processes (the same application suite), not adversaries: a peer can
//! write any byte of a pool it maps. What flowipc guarantees is that *values that cross the
//! socket* — pool fds, lend blobs, offsets — are validated, so that a forged, stale, truncated or
//! mistyped one is an [`Error`], never undefined behaviour or a crash, and that allocator metadata
//! is read only through atomics (a scribbled free list is reported as [`Error::Corrupt`]).
//! Beyond that, what a peer writes in a message it sent (its segment table, its used lengths)
//! is checked before it is followed, and cannot make a later zeroed allocation dirty: a block
//! freed as zeroed is cleared whatever the table claims.
//!
//! # Processes
//! Share an arena over a Unix socket with [`Arena::send_to`]; the other process
//! [joins](Arena::join_from) it, and receives pools created later with
//! [`Arena::add_pools_from`]. (With fds obtained some other way: [`Arena::pool_fd`],
//! [`Arena::join`], [`Arena::add_pool`].) Do not `fork()` a process that uses an arena and keep
//! using it on both sides: the child would inherit the parent's thread-cache slots.
//!
//! # Example: two mappings of one arena
//! ```
//! use flowipc::shm::{Arena, ArenaConfig, ShmHandle};
//! use std::os::unix::net::UnixStream;
//!
//! let a = Arena::create(ArenaConfig::new().pool_size(16 << 20))?;
//! // Two processes would each hold one end of the socket; here one process holds both.
//! let (mine, theirs) = UnixStream::pair()?;
//! a.send_to(&mine)?;
//! let b = Arena::join_from(&theirs, ArenaConfig::new())?;
//!
//! let h: ShmHandle<[u64; 4]> = a.construct([1, 2, 3, 4])?;
//! let blob = h.lend();
//! drop(h); // the lent reference keeps the object alive
//! let there: ShmHandle<[u64; 4]> = b.borrow(&blob)?;
//! assert_eq!(*there, [1, 2, 3, 4]);
//! drop(there); // last reference: freed, through the other mapping
//! assert_eq!(a.stats().blocks_in_use, 0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#[cfg(not(flowipc_loom))]
mod alloc;
#[cfg(not(flowipc_loom))]
mod arena;
#[cfg(not(flowipc_loom))]
pub(crate) use arena::random_id;
#[cfg(not(flowipc_loom))]
mod error;
#[cfg(not(flowipc_loom))]
mod handle;
#[cfg(flowipc_loom)]
pub mod layout;
#[cfg(not(flowipc_loom))]
mod layout;
#[cfg(not(flowipc_loom))]
pub(crate) mod ledger;
#[cfg(not(flowipc_loom))]
mod pool;
#[cfg(not(flowipc_loom))]
pub(crate) mod segments;
#[cfg(flowipc_loom)]
pub mod slot;
#[cfg(not(flowipc_loom))]
pub(crate) mod slot;
#[cfg(not(flowipc_loom))]
mod tcache;

#[cfg(flowipc_loom)]
pub mod lockfree;
#[cfg(not(flowipc_loom))]
pub(crate) mod lockfree;
#[cfg(flowipc_loom)]
pub mod protocols;
#[cfg(not(flowipc_loom))]
pub(crate) mod protocols;
#[cfg(flowipc_loom)]
pub mod publish;
#[cfg(not(flowipc_loom))]
pub(crate) mod publish;
#[cfg(flowipc_loom)]
pub mod ring;
#[cfg(not(flowipc_loom))]
pub(crate) mod ring;
#[cfg(not(flowipc_loom))]
pub(crate) mod ring_map;
#[cfg(flowipc_loom)]
pub mod space;
#[cfg(not(flowipc_loom))]
pub(crate) mod space;

#[cfg(not(flowipc_loom))]
pub use arena::{Arena, ArenaConfig, Block, BlockRef, Stats, Verification};
#[cfg(not(flowipc_loom))]
pub use error::{Error, ReceiveError, Result};
#[cfg(not(flowipc_loom))]
pub use handle::{type_tag, LendBlob, ShmHandle, ShmSafe};
#[cfg(not(flowipc_loom))]
pub use pool::Pool;
