//! One pool: a sealed memfd mapped shared, with its header, page map and heap.

use std::fmt;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Mutex, OnceLock, Weak};

use memmap2::{MmapOptions, MmapRaw};
use static_assertions::const_assert;

use super::arena::Shared;
use super::error::{Error, Result};
use super::layout::*;
use super::lockfree::Words;
use super::protocols::{page_entry_off, KNOWN_STARTS};
use super::publish::{header_published, publish_header};
use super::slot::Counters;
use crate::sync::{AtomicU32, AtomicU64, Ordering};

/// One cache line (128 bytes covers the adjacent-line prefetcher too), so that the hot words of
/// different size classes never share a line. `repr(C)` because this is a cross-process layout.
#[repr(C, align(128))]
pub(crate) struct Line<T>(pub(crate) T);

/// Per-class shared state: the free-list head, alone on its line.
#[repr(C)]
pub(crate) struct ClassState {
    pub(crate) head: AtomicU64,
}

/// A thread-cache slot of a pool (see `tcache` and `slot`).
pub(crate) type Slot = super::slot::Slot<NUM_CLASSES>;

/// The pool header at offset 0. Only atomics, so any process may read or write any field at any
/// time without a data race; the immutable fields are written before the fd is shared.
#[repr(C)]
pub(crate) struct PoolHeader {
    pub(crate) magic: AtomicU64,
    pub(crate) version: AtomicU32,
    pub(crate) pool_id: AtomicU32,
    pub(crate) capacity: AtomicU64,
    pub(crate) heap_off: AtomicU64,
    pub(crate) arena_id: AtomicU64,
    /// Next pool id of the arena (used in pool 0 only): ids are unique across processes.
    pub(crate) next_pool_id: AtomicU32,
    _reserved: AtomicU32,
    /// Where a corrupt offset is redirected so that it still names an atomic word (see `word`).
    pub(crate) scratch: AtomicU64,
    pub(crate) bump: Line<AtomicU64>,
    /// Usage counted by threads without a slot, and folded in from released slots.
    pub(crate) base: Line<Counters>,
    pub(crate) classes: [Line<ClassState>; NUM_CLASSES],
    pub(crate) buckets: [AtomicU64; NUM_BUCKETS],
    pub(crate) slots: [Line<Slot>; NUM_SLOTS],
    /// The first page of the ledger a session's client keeps in this (session-scope) arena, if
    /// any (see `shm::ledger`): `pool << 36 | payload offset`, 0 for none.
    pub(crate) ledger: AtomicU64,
    /// Most bytes the arena's pools may take together (used in pool 0 only; written by the
    /// creator, obeyed by every process that grows the arena).
    pub(crate) byte_limit: AtomicU64,
    /// Bytes of the arena's pools so far, claimed before each pool is made (pool 0 only; see
    /// [`claim_up_to`](super::publish::claim_up_to)).
    pub(crate) pool_bytes: AtomicU64,
}

const_assert!(std::mem::size_of::<PoolHeader>() as u64 <= HEADER_BYTES);
const_assert!(std::mem::align_of::<PoolHeader>() as u64 <= PAGE);
const_assert!(std::mem::size_of::<AtomicU64>() == 8 && std::mem::align_of::<AtomicU64>() == 8);
const SCRATCH_OFF: u64 = std::mem::offset_of!(PoolHeader, scratch) as u64;

/// A memfd pool mapped into this process.
///
/// Created by one process ([`Arena::create`](super::Arena::create)) and opened by others from its
/// fd ([`Arena::join`](super::Arena::join), [`Arena::add_pool`](super::Arena::add_pool)),
/// at whatever address each process maps it: everything inside refers to everything else by
/// offset. The memfd has no name in any file system, and is sealed against shrinking and growing
/// so a peer cannot truncate it under our mapping.
pub struct Pool {
    file: File,
    map: MmapRaw,
    id: u32,
    capacity: u64,
    heap_off: u64,
    arena_id: u64,
    trim: bool,
    /// The arena instance (in this process) that holds the pool; set when it is added.
    pub(crate) owner: Weak<Shared>,
    /// Process-unique number of that arena instance (thread caches are keyed by it).
    pub(crate) instance: u64,
    /// Our own open file description of the pool, for the thread-cache slot locks (lazily),
    /// with the pid that opened it.
    pub(crate) lock_file: OnceLock<(u32, Option<File>)>,
    /// Slots claimed through this instance (bit i: slot i), released when it is dropped.
    pub(crate) claimed: std::sync::atomic::AtomicU64,
    /// Serializes slot claims and releases within this process (OFD locks do not conflict
    /// between threads of one process).
    pub(crate) slot_mutex: Mutex<()>,
    /// Small-class block starts validated here before (see `block_at` and
    /// [`block_start`](super::protocols::block_start)), direct-mapped:
    /// `(offset / 16) | (class + 1) << 32`, 0 when empty. Process-local memory.
    pub(crate) known_starts: [AtomicU64; KNOWN_STARTS],
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("id", &self.id)
            .field("capacity", &self.capacity)
            .field("arena_id", &format_args!("{:#x}", self.arena_id))
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// Creates a pool of `capacity` bytes (rounded up to pages). The memory is sparse: pages cost
    /// RAM only once touched. Pool 0 records the arena's byte limit, `limit`, and counts its own
    /// bytes as the first claimed against it.
    pub(crate) fn create(
        id: u32,
        arena_id: u64,
        capacity: u64,
        trim: bool,
        limit: u64,
    ) -> Result<Pool> {
        let capacity = capacity.div_ceil(PAGE) * PAGE;
        if capacity < MIN_POOL_BYTES {
            return Err(Error::BadConfig("pool smaller than the minimum pool size"));
        }
        if capacity > MAX_POOL_BYTES {
            return Err(Error::BadConfig("pool larger than 1 TiB"));
        }
        let file =
            crate::sys::memfd_sealable("flowipc-pool").map_err(|e| Error::io("memfd_create", e))?;
        file.set_len(capacity)
            .map_err(|e| Error::io("ftruncate", e))?;
        crate::sys::seal_size(&file).map_err(|e| Error::io("seal", e))?;
        let pool = Pool::map(file, capacity, id, arena_id, trim)?;
        let h = pool.hdr();
        h.version.store(LAYOUT_VERSION, Ordering::Relaxed);
        h.pool_id.store(id, Ordering::Relaxed);
        h.capacity.store(capacity, Ordering::Relaxed);
        h.heap_off.store(pool.heap_off, Ordering::Relaxed);
        h.arena_id.store(arena_id, Ordering::Relaxed);
        h.next_pool_id.store(1, Ordering::Relaxed);
        if id == 0 {
            h.byte_limit.store(limit, Ordering::Relaxed);
            h.pool_bytes.store(capacity, Ordering::Relaxed);
        }
        h.bump.0.store(pool.heap_off, Ordering::Relaxed);
        // A process that sees the magic sees the fields above.
        publish_header(&h.magic, MAGIC);
        Ok(pool)
    }

    /// Maps a pool file of `capacity` bytes, shared and read-write.
    fn map(file: File, capacity: u64, id: u32, arena_id: u64, trim: bool) -> Result<Pool> {
        let map = MmapOptions::new()
            .len(capacity as usize)
            .map_raw(&file)
            .map_err(|e| Error::io("mmap", e))?;
        Ok(Pool {
            file,
            map,
            id,
            capacity,
            heap_off: heap_off(capacity),
            arena_id,
            trim,
            owner: Weak::new(),
            instance: 0,
            lock_file: OnceLock::new(),
            claimed: std::sync::atomic::AtomicU64::new(0),
            slot_mutex: Mutex::new(()),
            known_starts: Default::default(),
        })
    }

    /// Opens a pool from an fd received from another process, validating it: a sealed memfd,
    /// the magic, the layout version, and header fields that agree with the file's size.
    pub(crate) fn open(fd: OwnedFd, trim: bool) -> Result<Pool> {
        if !crate::sys::is_size_sealed(fd.as_fd()) {
            return Err(Error::NotSealed);
        }
        let file = File::from(fd);
        let size = file.metadata().map_err(|e| Error::io("fstat", e))?.len();
        if !(MIN_POOL_BYTES..=MAX_POOL_BYTES).contains(&size) || size % PAGE != 0 {
            return Err(Error::NotAPool("file size is not a pool size"));
        }
        // Id and arena id are read from the header once it is validated.
        let mut pool = Pool::map(file, size, 0, 0, trim)?;
        let h = pool.hdr();
        if !header_published(&h.magic, MAGIC) {
            return Err(Error::NotAPool("bad magic"));
        }
        let version = h.version.load(Ordering::Relaxed);
        if version != LAYOUT_VERSION {
            return Err(Error::VersionMismatch {
                found: version,
                expected: LAYOUT_VERSION,
            });
        }
        if h.capacity.load(Ordering::Relaxed) != size {
            return Err(Error::NotAPool("capacity field disagrees with file size"));
        }
        if h.heap_off.load(Ordering::Relaxed) != pool.heap_off {
            return Err(Error::NotAPool("heap offset field is wrong"));
        }
        let bump = h.bump.0.load(Ordering::Relaxed);
        if bump < pool.heap_off || bump > size || bump % PAGE != 0 {
            return Err(Error::NotAPool("bump pointer out of range"));
        }
        let (id, arena_id) = (
            h.pool_id.load(Ordering::Relaxed),
            h.arena_id.load(Ordering::Relaxed),
        );
        pool.id = id;
        pool.arena_id = arena_id;
        Ok(pool)
    }

    /// This pool's id within its arena.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Bytes of the pool (header, page map and heap).
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Id of the arena the pool belongs to.
    pub fn arena_id(&self) -> u64 {
        self.arena_id
    }

    /// Offset of the first heap byte.
    pub(crate) fn heap_off(&self) -> u64 {
        self.heap_off
    }

    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    pub(crate) fn trims(&self) -> bool {
        self.trim
    }

    pub(crate) fn hdr(&self) -> &PoolHeader {
        // SAFETY: the mapping is at least MIN_POOL_BYTES > size_of::<PoolHeader>() long (checked
        // in create/open), page-aligned (mmap), and lives as long as `self`. PoolHeader is
        // repr(C) and made only of atomics, for which every bit pattern (including the zeros of
        // a fresh memfd) is a valid value, and all access to it is atomic, in every process.
        unsafe { &*(self.map.as_ptr() as *const PoolHeader) }
    }

    /// The page-map word of heap page `page` (callers check `page` is within the heap).
    pub(crate) fn page_entry(&self, page: u64) -> &AtomicU64 {
        self.word(page_entry_off(page))
    }

    /// Raw pointer to byte `off` of the mapping. Callers keep `off` within the pool.
    pub(crate) fn ptr(&self, off: u64) -> *mut u8 {
        debug_assert!(off <= self.capacity);
        self.map.as_mut_ptr().wrapping_add(off as usize)
    }

    /// The fd, to send to another process.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl Words for Pool {
    #[inline]
    fn word(&self, off: u64) -> &AtomicU64 {
        // A corrupt free list (a peer scribbled over it) may hand us any offset. Instead of
        // trusting it, redirect out-of-range or misaligned offsets to the scratch word: the
        // algorithms then read a harmless value and the allocator's own checks of popped offsets
        // report the corruption.
        let off = if off % 8 == 0 && off <= self.capacity - 8 {
            off
        } else {
            SCRATCH_OFF
        };
        // SAFETY: `off` is 8-aligned and `off + 8 <= capacity`, so the word lies inside the
        // mapping, which is page-aligned and lives as long as `&self`. AtomicU64 has the size and
        // alignment of u64 and every bit pattern is valid, so the reference is valid to create.
        // No data race follows from it: flowipc asks only for header words (pool header, page
        // map, the two words of a block header, and an object's type tag while a reference to
        // the object is held), all of which every process accesses only atomically, and a block
        // header position stays one for the pool's life (spans are never freed, extents never
        // coalesced; see `lockfree`), so a stale offset still names a header word. Offsets read
        // from a list a peer scribbled on are checked before use as blocks (the trust model in
        // the module docs: a peer that writes arbitrary bytes is outside what can be defended).
        unsafe { &*(self.map.as_mut_ptr().add(off as usize) as *const AtomicU64) }
    }
}
