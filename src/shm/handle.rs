//! Cross-process ref-counted objects: [`ShmHandle`], its [`LendBlob`], and the [`ShmSafe`] marker.

use std::fmt;
use std::marker::PhantomData;
use std::ops::Deref;
use std::ptr::NonNull;

use super::alloc::Grant;
use super::arena::{Arena, BlockRef};
use super::error::{Error, Result};
use super::layout::*;
use super::ledger::{Delta, Key};
use super::lockfree::{is_sole, rc_acquire, rc_release, refs, ticket_issue, Words, LINK};
use super::pool::Pool;
use super::protocols::{adopt_ticket, publish_block, Refusal, TAG_AT};
use crate::sync::{AtomicU64, Ordering};

/// Types that may live in shared memory and be read by another process.
///
/// # Safety
/// Implement only for types that
/// * contain no pointers, references, or anything else meaningful only in one address space
///   (no `Box`, `Vec`, `String`, `&T`, fds);
/// * are valid for every bit pattern (another process writes the bytes: no `bool`, `char`,
///   enums, `NonZero*`);
/// * have no `Drop` glue (the last reference may be dropped by another process, which will not
///   run this process's destructors);
/// * are `#[repr(C)]` (or primitives/arrays) so that both processes agree on the layout.
///
/// Fields that are changed after the object is shared must be atomics: plain fields are
/// effectively immutable once another process can see them.
pub unsafe trait ShmSafe: Sized + Send + Sync + 'static {}

macro_rules! shm_safe {
    ($($t:ty),* $(,)?) => { $(
        // SAFETY: a primitive (or atomic over one) has no pointers, no drop glue, a fixed layout,
        // and every bit pattern is a valid value.
        unsafe impl ShmSafe for $t {}
    )* };
}
shm_safe!(
    u8,
    u16,
    u32,
    u64,
    u128,
    i8,
    i16,
    i32,
    i64,
    i128,
    f32,
    f64,
    ()
);
shm_safe!(
    std::sync::atomic::AtomicU8,
    std::sync::atomic::AtomicU16,
    std::sync::atomic::AtomicU32,
    std::sync::atomic::AtomicU64,
    std::sync::atomic::AtomicI8,
    std::sync::atomic::AtomicI16,
    std::sync::atomic::AtomicI32,
    std::sync::atomic::AtomicI64,
);
// SAFETY: an array of ShmSafe elements has the elements' properties and no padding between them.
unsafe impl<T: ShmSafe, const N: usize> ShmSafe for [T; N] {}

/// A stable tag for `T`, recorded in the block and in lend blobs so that borrowing as the wrong
/// type is refused. FNV-1a over the type name, size and alignment.
pub fn type_tag<T: 'static>() -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let name = std::any::type_name::<T>();
    let size = std::mem::size_of::<T>() as u64;
    let align = std::mem::align_of::<T>() as u64;
    for b in name
        .bytes()
        .chain(size.to_le_bytes())
        .chain(align.to_le_bytes())
    {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Offset within the payload of the value: after the type tag (at [`TAG_AT`], written once,
/// before the object is published), at 16 so that it is 16-aligned. Count, tickets, liveness and
/// generation are in the block header's link word (see
/// [`handle_word`](super::lockfree::handle_word)).
const VALUE_AT: u64 = 16;

/// A reference-counted `T` in an arena, shared across processes.
///
/// The counter lives in the block header in shared memory. `clone` and `drop` change it; the last
/// drop, in any thread of any process, frees the block. [`lend`](ShmHandle::lend) adds a
/// reference on behalf of another process and packs it into a [`LendBlob`] to send;
/// [`Arena::borrow`] adopts it there after validating it.
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use flowipc::shm::{Arena, ArenaConfig, ShmHandle};
///
/// let arena = Arena::create(ArenaConfig::new().pool_size(16 << 20))?;
/// let counter: ShmHandle<AtomicU64> = arena.construct(AtomicU64::new(41))?;
/// let blob = counter.lend(); // 32 bytes: send them to the process that holds the arena too
/// let there: ShmHandle<AtomicU64> = arena.borrow(&blob)?;
/// there.fetch_add(1, Ordering::Relaxed);
/// assert_eq!(counter.load(Ordering::Relaxed), 42);
/// assert_eq!(counter.ref_count(), 2);
/// # Ok::<(), flowipc::shm::Error>(())
/// ```
pub struct ShmHandle<T: ShmSafe> {
    arena: Arena,
    pool: u32,
    off: u64,
    generation: u32,
    value: NonNull<T>,
    _owns: PhantomData<T>,
}

// SAFETY: a handle is a shared reference to a `T` plus a reference count updated atomically in
// shared memory; sending it to another thread is like sending an `Arc<T>`, which needs
// `T: Send + Sync`, both implied by `ShmSafe`. The `Arena` it holds is Send + Sync.
unsafe impl<T: ShmSafe> Send for ShmHandle<T> {}
// SAFETY: `&ShmHandle<T>` only gives `&T` (T: Sync by ShmSafe) and atomic count updates.
unsafe impl<T: ShmSafe> Sync for ShmHandle<T> {}

impl Arena {
    /// Constructs `value` in the arena and returns the first handle to it (count 1).
    pub fn construct<T: ShmSafe>(&self, value: T) -> Result<ShmHandle<T>> {
        let (pool, g, value_ptr) = self.grant_noted::<T>(false)?;
        // SAFETY: the block is ours (just allocated, not yet published) and has room for a `T`
        // at `value_ptr`, which is 16-aligned (payloads are 16-aligned, the object header is 16
        // bytes, align_of::<T>() <= 16 checked in grant_object). `write` neither reads nor drops
        // the old bytes.
        unsafe { value_ptr.write(value) };
        Ok(self.publish(pool, g, value_ptr))
    }

    /// Constructs an all-zero `T` in the arena without building it on the stack first (for big
    /// objects: `construct_zeroed::<[u8; 1 << 30]>()` is fine). Every `ShmSafe` type is valid
    /// for every bit pattern, so zero is a valid `T`. Fill it through
    /// [`get_mut`](ShmHandle::get_mut) before sharing it.
    pub fn construct_zeroed<T: ShmSafe>(&self) -> Result<ShmHandle<T>> {
        let (pool, g, value_ptr) = self.grant_noted::<T>(true)?;
        Ok(self.publish(pool, g, value_ptr))
    }

    /// [`grant_object`](Arena::grant_object), recorded (held once) in the arena's session ledger
    /// if it keeps one, before the object is published.
    fn grant_noted<T: ShmSafe>(&self, zeroed: bool) -> Result<(&Pool, Grant, *mut T)> {
        let Some(ledger) = self.ledger() else {
            return self.grant_object::<T>(zeroed);
        };
        ledger.gain_new(|| {
            let (pool, g, ptr) = self.grant_object::<T>(zeroed)?;
            let key = Key {
                arena: self.id(),
                pool: pool.id(),
                off: g.off,
                generation: g.generation(),
            };
            Ok((key, (pool, g, ptr)))
        })
    }

    /// Allocates a block for a `T` and writes its type tag; the value is the caller's to write
    /// (already zero if `zeroed`). Not yet borrowable: see `publish`.
    fn grant_object<T: ShmSafe>(&self, zeroed: bool) -> Result<(&Pool, Grant, *mut T)> {
        const {
            assert!(
                std::mem::align_of::<T>() <= 16,
                "ShmHandle supports alignment up to 16"
            );
            assert!(
                !std::mem::needs_drop::<T>(),
                "ShmSafe types have no drop glue"
            );
        }
        let size = VALUE_AT as usize + std::mem::size_of::<T>();
        let (pool, g) = self.grant(size, 0)?;
        let payload = g.off + BLOCK_HDR;
        if zeroed && !g.clean() {
            pool.zero(payload + VALUE_AT, std::mem::size_of::<T>() as u64);
        }
        pool.word(payload + TAG_AT)
            .store(type_tag::<T>(), Ordering::Relaxed);
        Ok((pool, g, pool.ptr(payload + VALUE_AT) as *mut T))
    }

    /// Marks an initialized object block as borrowable and returns its first handle.
    fn publish<T: ShmSafe>(&self, pool: &Pool, g: Grant, value_ptr: *mut T) -> ShmHandle<T> {
        publish_block(pool, g.off, g.generation());
        ShmHandle {
            arena: self.clone(),
            pool: pool.id(),
            off: g.off,
            generation: g.generation(),
            // SAFETY: `pool.ptr` of an in-bounds offset of a live mapping is never null.
            value: unsafe { NonNull::new_unchecked(value_ptr) },
            _owns: PhantomData,
        }
    }

    /// Adopts the reference a [`LendBlob`] carries, after validating it: a blob of this arena,
    /// a known pool, an in-bounds aligned offset where a ref-counted block starts, the same
    /// generation (the block was not freed since), the expected type, and a lent reference not
    /// yet borrowed. Each failure is its own [`Error`] variant; none has side effects.
    pub fn borrow<T: ShmSafe>(&self, blob: &LendBlob) -> Result<ShmHandle<T>> {
        let expected = type_tag::<T>();
        if blob.type_tag() != expected {
            return Err(Error::TypeMismatch {
                expected,
                found: blob.type_tag(),
            });
        }
        let typed = Some((expected, VALUE_AT + std::mem::size_of::<T>() as u64));
        let (pool, off, _) = match self.ledger() {
            None => self.adopt(blob, typed)?,
            Some(ledger) => {
                let key = Key {
                    arena: self.id(),
                    pool: blob.pool(),
                    off: blob.offset().wrapping_sub(BLOCK_HDR),
                    generation: blob.generation(),
                };
                let d = Delta {
                    held: 1,
                    took: 1,
                    ..Delta::default()
                };
                ledger.gain(key, d, || self.adopt(blob, typed))?
            }
        };
        let value_ptr = pool.ptr(off + BLOCK_HDR + VALUE_AT) as *mut T;
        Ok(ShmHandle {
            arena: self.clone(),
            pool: pool.id(),
            off,
            generation: blob.generation(),
            // SAFETY: `pool.ptr` of an in-bounds offset of a live mapping is never null.
            value: unsafe { NonNull::new_unchecked(value_ptr) },
            _owns: PhantomData,
        })
    }

    /// Drops the reference a blob carries without borrowing it (for a blob that will never reach
    /// its receiver, e.g. a failed send). Validates the blob like [`borrow`](Arena::borrow),
    /// except for its type. Any kind of handle may be given back so, a message's included: as
    /// the last reference, it frees what the handle owns (every segment of a message), exactly
    /// as the last holder's drop would.
    pub fn release_blob(&self, blob: &LendBlob) -> Result<()> {
        let (pool, off, cap) = self.adopt(blob, None)?;
        self.give_back(pool, off, cap, blob.generation());
        Ok(())
    }

    /// Validation shared by `borrow` and `release_blob`; on success the caller owns one
    /// reference to the block at the returned offset, whose payload capacity is returned too.
    ///
    /// Everything before the ticket CAS reads header words only (atomics, positions that are
    /// block starts forever), so a stale blob racing a free and reuse of its block touches
    /// nothing of the block's new life. The CAS itself checks liveness, generation and an
    /// outstanding ticket in one step; only then, owning a reference, do we read the payload
    /// (see [`adopt_ticket`]).
    pub(super) fn adopt(
        &self,
        blob: &LendBlob,
        typed: Option<(u64, u64)>,
    ) -> Result<(&Pool, u64, u64)> {
        if blob.arena_tag() != self.id() as u32 {
            return Err(Error::ForeignBlob);
        }
        let (pool, off, info, capacity) = self.live_block(BlockRef {
            pool: blob.pool(),
            offset: blob.offset(),
            generation: blob.generation(),
        })?;
        match adopt_ticket(pool, off, info, capacity, blob.generation(), typed) {
            Ok(()) => Ok((pool, off, capacity)),
            Err(Refusal::Stale) => Err(Error::Stale),
            Err(Refusal::TypeMismatch { expected, found }) => {
                Err(Error::TypeMismatch { expected, found })
            }
        }
    }
}

pub(super) fn release(pool: &Pool, off: u64) {
    if rc_release(pool.word(off + LINK)) {
        // An error here means a peer scribbled on the block's header; the block is then leaked
        // rather than freed into a list it could corrupt. Nothing to report it to from a drop.
        let _ = pool.free_block(off, false);
    }
}

impl<T: ShmSafe> ShmHandle<T> {
    fn pool(&self) -> &Pool {
        // The pool was known when the handle was made, and pools are never removed.
        self.arena
            .pool(self.pool)
            .expect("a handle's pool is part of its arena")
    }

    fn rc(&self) -> &AtomicU64 {
        self.pool().word(self.off + LINK)
    }

    /// The object, as a session ledger names it.
    pub(crate) fn key(&self) -> Key {
        Key {
            arena: self.arena.id(),
            pool: self.pool,
            off: self.off,
            generation: self.generation,
        }
    }

    /// Gains a reference with `op` (a clone, a lend), recorded as `d` in the arena's session
    /// ledger if it keeps one (see `shm::ledger`).
    #[inline]
    fn gain(&self, d: Delta, op: impl FnOnce()) {
        match self.arena.ledger() {
            None => op(),
            Some(l) => {
                let _ = l.gain(self.key(), d, || {
                    op();
                    Ok(())
                });
            }
        }
    }

    /// Adds a reference on behalf of another process and returns it packed in a blob; send the
    /// blob, and the receiver adopts the reference with [`Arena::borrow`]. A blob that is never
    /// borrowed keeps the object alive: give it back with [`Arena::release_blob`].
    pub fn lend(&self) -> LendBlob {
        let d = Delta {
            lent: 1,
            ..Delta::default()
        };
        self.gain(d, || ticket_issue(self.rc()));
        LendBlob::new(
            self.arena.id() as u32,
            self.pool,
            self.off + BLOCK_HDR,
            self.generation,
            type_tag::<T>(),
        )
    }

    /// Current number of references (handles in all processes plus lent blobs not yet
    /// borrowed). A snapshot: other processes may change it at any time.
    pub fn ref_count(&self) -> u64 {
        refs(self.rc().load(Ordering::Relaxed))
    }

    /// Where the object lives (pool, payload offset, generation).
    pub fn block_ref(&self) -> BlockRef {
        BlockRef {
            pool: self.pool,
            offset: self.off + BLOCK_HDR,
            generation: self.generation,
        }
    }

    /// The arena the object lives in.
    pub fn arena(&self) -> &Arena {
        &self.arena
    }

    /// Mutable access if this is the only reference anywhere (like `Arc::get_mut`).
    pub fn get_mut(&mut self) -> Option<&mut T> {
        // (`is_sole` Acquires: another holder's last reads happen before our writes.)
        if !is_sole(self.rc()) {
            return None;
        }
        // SAFETY: count 1 is our own reference: no handle and no unborrowed lend exists in any
        // process (a lend counts), so no one else can reach the value, and `&mut self` excludes
        // other users of this handle. The value was initialized by `construct`.
        Some(unsafe { self.value.as_mut() })
    }
}

impl<T: ShmSafe> Deref for ShmHandle<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the block holds an initialized `T` (written by `construct`, validated by type
        // tag and generation in `borrow`), it stays allocated while this handle's reference is
        // counted, and the mapping lives as long as `self.arena`. Sharing `&T` is sound because
        // `T: Sync` and any later mutation goes through atomics inside `T` (ShmSafe contract).
        unsafe { self.value.as_ref() }
    }
}

impl<T: ShmSafe> Clone for ShmHandle<T> {
    fn clone(&self) -> Self {
        let d = Delta {
            held: 1,
            ..Delta::default()
        };
        self.gain(d, || rc_acquire(self.rc()));
        ShmHandle {
            arena: self.arena.clone(),
            pool: self.pool,
            off: self.off,
            generation: self.generation,
            value: self.value,
            _owns: PhantomData,
        }
    }
}

impl<T: ShmSafe> Drop for ShmHandle<T> {
    fn drop(&mut self) {
        match self.arena.ledger() {
            None => release(self.pool(), self.off),
            Some(l) => {
                let d = Delta {
                    held: -1,
                    ..Delta::default()
                };
                l.lose(self.key(), d, || release(self.pool(), self.off));
            }
        }
    }
}

impl<T: ShmSafe + fmt::Debug> fmt::Debug for ShmHandle<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShmHandle")
            .field("at", &self.block_ref())
            .field("refs", &self.ref_count())
            .field("value", &**self)
            .finish()
    }
}

/// One lent reference to a [`ShmHandle`], as the fixed-size bytes that cross the socket.
///
/// Layout (little-endian): magic `"FIPL"` (4), pool id (4), payload offset (8), generation (4),
/// arena tag (4), type tag (8): [`LendBlob::LEN`] = 32 bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct LendBlob([u8; LendBlob::LEN]);

const BLOB_MAGIC: [u8; 4] = *b"FIPL";

impl LendBlob {
    /// Size of a blob in bytes.
    pub const LEN: usize = 32;

    pub(super) fn new(
        arena_tag: u32,
        pool: u32,
        offset: u64,
        generation: u32,
        type_tag: u64,
    ) -> Self {
        let mut b = [0u8; Self::LEN];
        b[0..4].copy_from_slice(&BLOB_MAGIC);
        b[4..8].copy_from_slice(&pool.to_le_bytes());
        b[8..16].copy_from_slice(&offset.to_le_bytes());
        b[16..20].copy_from_slice(&generation.to_le_bytes());
        b[20..24].copy_from_slice(&arena_tag.to_le_bytes());
        b[24..32].copy_from_slice(&type_tag.to_le_bytes());
        LendBlob(b)
    }

    /// Parses received bytes: exactly [`LEN`](LendBlob::LEN) bytes starting with the magic.
    /// Everything else is validated when the blob is borrowed.
    pub fn from_bytes(bytes: &[u8]) -> Result<LendBlob> {
        let arr: [u8; Self::LEN] = bytes
            .try_into()
            .map_err(|_| Error::BlobLength(bytes.len()))?;
        if arr[0..4] != BLOB_MAGIC {
            return Err(Error::BlobMagic);
        }
        Ok(LendBlob(arr))
    }

    /// The bytes to send.
    pub fn as_bytes(&self) -> &[u8; Self::LEN] {
        &self.0
    }

    fn u32_at(&self, i: usize) -> u32 {
        u32::from_le_bytes(self.0[i..i + 4].try_into().expect("4 bytes"))
    }

    fn u64_at(&self, i: usize) -> u64 {
        u64::from_le_bytes(self.0[i..i + 8].try_into().expect("8 bytes"))
    }

    /// Pool id the blob names.
    pub fn pool(&self) -> u32 {
        self.u32_at(4)
    }

    /// Payload offset the blob names.
    pub fn offset(&self) -> u64 {
        self.u64_at(8)
    }

    /// Generation of the block when it was lent.
    pub fn generation(&self) -> u32 {
        self.u32_at(16)
    }

    pub(crate) fn arena_tag(&self) -> u32 {
        self.u32_at(20)
    }

    /// Type tag of the lent object.
    pub fn type_tag(&self) -> u64 {
        self.u64_at(24)
    }
}

impl fmt::Debug for LendBlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LendBlob")
            .field("pool", &self.pool())
            .field("offset", &self.offset())
            .field("generation", &self.generation())
            .field("type_tag", &format_args!("{:#x}", self.type_tag()))
            .finish()
    }
}
