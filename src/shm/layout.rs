//! The byte layout of a pool: a wire format between processes, versioned by [`LAYOUT_VERSION`].
//!
//! ```text
//! 0               HEADER_BYTES          heap_off                                  capacity
//! | pool header   | page map (8 B/page) | heap: small-class spans and large extents |
//! ```
//!
//! * Every block starts with a 16-byte header `{info, link}` (two atomic words, never handed to
//!   users) and its payload follows at `block + 16`, so payloads are 16-byte aligned.
//! * `info` = state (free / allocated) | size class | flags | generation. The generation moves on
//!   at every free, so a lent blob of an earlier life of the block is recognized as stale.
//! * `link` = next block while on a free list; reference count while a ref-counted object.
//! * The page map has one atomic word per heap page saying what the page belongs to: a page of a
//!   small-class span (class, index of the page in its span) or the first page of a large extent
//!   (its length in pages). It lets a lent offset be validated as a real block start without
//!   ever reading user bytes.

/// Bytes per page (the unit of large extents, of the page map and of trimming).
pub const PAGE: u64 = 4096;
/// Bytes of the block header that precedes every payload.
pub const BLOCK_HDR: u64 = 16;
/// Bytes reserved at the start of each pool for the pool header (with its thread-cache slots).
pub const HEADER_BYTES: u64 = 128 * 1024;
/// Thread-cache slots per pool (see `tcache`): threads beyond this use the shared lists only.
pub const NUM_SLOTS: usize = 64;
/// Identifies a flowipc pool ("FLOWIPC" + NUL, little-endian).
pub const MAGIC: u64 = u64::from_le_bytes(*b"FLOWIPC\0");
/// Version of this layout; pools of another version are refused.
pub const LAYOUT_VERSION: u32 = 4;
/// Largest pool: the free-list heads keep offsets in 32 bits of 16-byte units (leaving 32 bits
/// of ABA tag). Arenas hold many pools, so this bounds one block, not an arena.
pub const MAX_POOL_BYTES: u64 = 1 << 36;
/// Smallest pool: header, a page of page map and 16 pages of heap.
pub const MIN_POOL_BYTES: u64 = HEADER_BYTES + PAGE + 16 * PAGE;

// --- block `info` word -------------------------------------------------------------------------

/// State byte of a block on a free list.
pub const STATE_FREE: u64 = 0x5A;
/// State byte of an allocated block.
pub const STATE_ALLOC: u64 = 0xA5;
/// Class byte of a large extent.
pub const CLASS_LARGE: u64 = 0xFF;
/// Flag: the payload is all zero bytes.
pub const FLAG_CLEAN: u64 = 1 << 16;
/// Flag: the block holds a ref-counted object (only such blocks can be borrowed).
pub const FLAG_HANDLE: u64 = 1 << 17;

/// Builds an `info` word.
#[inline]
pub const fn info(state: u64, class: u64, flags: u64, generation: u32) -> u64 {
    state | (class << 8) | flags | ((generation as u64) << 32)
}
/// State byte of an `info` word.
#[inline]
pub const fn info_state(i: u64) -> u64 {
    i & 0xFF
}
/// Class byte of an `info` word.
#[inline]
pub const fn info_class(i: u64) -> u64 {
    (i >> 8) & 0xFF
}
/// Generation of an `info` word.
#[inline]
pub const fn info_generation(i: u64) -> u32 {
    (i >> 32) as u32
}

// --- page map entries --------------------------------------------------------------------------

/// Page-map kind: the page belongs to a small-class span.
pub const PM_SMALL: u64 = 1;
/// Page-map kind: the page is the first page of a large extent (free or allocated).
pub const PM_LARGE: u64 = 2;

/// Page-map entry of page `index` of a span of class `class`.
#[inline]
pub const fn pm_small(class: u64, index: u64) -> u64 {
    (PM_SMALL << 56) | (class << 48) | index
}
/// Page-map entry of the first page of an extent of `pages` pages.
#[inline]
pub const fn pm_large(pages: u64) -> u64 {
    (PM_LARGE << 56) | pages
}
/// Kind of a page-map entry (0: nothing starts here).
#[inline]
pub const fn pm_kind(e: u64) -> u64 {
    e >> 56
}
/// Class of a `PM_SMALL` entry.
#[inline]
pub const fn pm_class(e: u64) -> u64 {
    (e >> 48) & 0xFF
}
/// Index of the page in its span (`PM_SMALL`) or length in pages (`PM_LARGE`).
#[inline]
pub const fn pm_value(e: u64) -> u64 {
    e & ((1 << 48) - 1)
}

// --- size classes ------------------------------------------------------------------------------

/// Block sizes (header included) of the small classes: 16-byte steps to 128, then four steps
/// per doubling, plus "power of two + header" classes so that the common power-of-two payload
/// (1 KiB, 8 KiB: capnp's first segment) does not waste a quarter of its block.
pub const CLASS_SIZES: [u32; NUM_CLASSES] = class_sizes();
/// Number of small classes.
pub const NUM_CLASSES: usize = 53;
/// Largest small block (header included); bigger requests get page-rounded extents.
pub const MAX_SMALL_BLOCK: u64 = CLASS_SIZES[NUM_CLASSES - 1] as u64;
/// Number of large-extent free lists (see [`bucket_of`]): enough for a 64 GiB pool.
pub const NUM_BUCKETS: usize = 352;
const fn class_sizes() -> [u32; NUM_CLASSES] {
    let mut out = [0u32; NUM_CLASSES];
    let mut n = 0;
    let mut s = 32;
    while s <= 128 {
        out[n] = s;
        n += 1;
        s += 16;
    }
    out[n] = 144;
    n += 1;
    let mut p = 128;
    while p < 65536 {
        let q = p / 4;
        out[n] = p + q;
        out[n + 1] = p + 2 * q;
        out[n + 2] = p + 3 * q;
        out[n + 3] = 2 * p;
        out[n + 4] = 2 * p + 16;
        n += 5;
        p *= 2;
    }
    assert!(n == NUM_CLASSES);
    out
}

/// `CLASS_OF[g]` = smallest class whose block holds `g` 16-byte granules.
static CLASS_OF: [u8; (MAX_SMALL_BLOCK / 16) as usize + 1] = class_table();

const fn class_table() -> [u8; (MAX_SMALL_BLOCK / 16) as usize + 1] {
    let mut t = [0u8; (MAX_SMALL_BLOCK / 16) as usize + 1];
    let mut g = 0;
    let mut c = 0;
    while g < t.len() {
        while (CLASS_SIZES[c] as usize) < g * 16 {
            c += 1;
        }
        t[g] = c as u8;
        g += 1;
    }
    t
}

/// The small class for a payload of `size` bytes, or `None` if it needs a large extent.
#[inline]
pub fn class_for(size: usize) -> Option<usize> {
    let block = (size as u64).checked_add(BLOCK_HDR)?;
    if block > MAX_SMALL_BLOCK {
        return None;
    }
    Some(CLASS_OF[block.div_ceil(16) as usize] as usize)
}

/// Pages of one span of class `c`: at least 64 KiB, and room for at least four blocks.
#[inline]
pub const fn span_pages(c: usize) -> u64 {
    let four = (4 * CLASS_SIZES[c] as u64).div_ceil(PAGE);
    if four > 16 {
        four
    } else {
        16
    }
}

/// Per small class, what [`is_block_start`] needs, computed once: bytes of the span that hold
/// whole blocks, the power of two and the inverse (mod 2^64) of the odd part of the block size,
/// and the largest multiple-free quotient (see [`is_block_start`]).
#[derive(Clone, Copy)]
struct StartCheck {
    /// Blocks per span times the block size: offsets at or past it are no block start.
    end: u64,
    /// Trailing zero bits of the block size.
    shift: u32,
    /// Inverse of the odd part of the block size, mod 2^64.
    inv: u64,
    /// `u64::MAX / odd part`: `x` is a multiple of the odd part iff `x * inv <= limit`.
    limit: u64,
}

static START_CHECKS: [StartCheck; NUM_CLASSES] = start_checks();

const fn start_checks() -> [StartCheck; NUM_CLASSES] {
    let mut t = [StartCheck {
        end: 0,
        shift: 0,
        inv: 0,
        limit: 0,
    }; NUM_CLASSES];
    let mut c = 0;
    while c < NUM_CLASSES {
        let size = CLASS_SIZES[c] as u64;
        let shift = size.trailing_zeros();
        let odd = size >> shift;
        // Newton's iteration doubles the correct low bits each step: 3 (odd * odd = 1 mod 8)
        // -> 6 -> 12 -> 24 -> 48 -> 96 >= 64.
        let mut inv = odd;
        let mut i = 0;
        while i < 5 {
            inv = inv.wrapping_mul(2u64.wrapping_sub(odd.wrapping_mul(inv)));
            i += 1;
        }
        assert!(odd.wrapping_mul(inv) == 1);
        let blocks = span_pages(c) * PAGE / size;
        t[c] = StartCheck {
            end: blocks * size,
            shift,
            inv,
            limit: u64::MAX / odd,
        };
        c += 1;
    }
    t
}

/// Whether byte `at` of a span of class `c` is where one of its blocks starts: a multiple of the
/// block size within the span's whole blocks. No division (this runs on every handle and
/// segment validation): a multiple of `2^shift * odd` has `shift` low zero bits, and `x` is a
/// multiple of an odd `odd` iff `x * odd^-1 mod 2^64 <= u64::MAX / odd` (Granlund and
/// Montgomery: the map is a bijection that sends the multiples onto exactly that range).
#[inline]
pub fn is_block_start(c: usize, at: u64) -> bool {
    let k = &START_CHECKS[c];
    at < k.end && at.trailing_zeros() >= k.shift && (at >> k.shift).wrapping_mul(k.inv) <= k.limit
}

/// Pages of a large extent whose payload is `size` bytes.
#[inline]
pub fn large_pages(size: usize) -> Option<u64> {
    Some((size as u64).checked_add(BLOCK_HDR)?.div_ceil(PAGE))
}

/// Free-list bucket of an extent of `pages` pages: below 16 pages one bucket per length; above,
/// sixteen buckets per doubling (by the four bits after the leading one), so the lengths in one
/// bucket differ by less than 6.25%. Monotonic in `pages`.
#[inline]
pub fn bucket_of(pages: u64) -> usize {
    debug_assert!(pages > 0);
    if pages < 16 {
        return pages as usize;
    }
    let l = 63 - pages.leading_zeros() as u64;
    (16 + 16 * (l - 4) + ((pages >> (l - 4)) & 15)) as usize
}

/// Bytes of the page map of a pool of `capacity` bytes (page-rounded).
#[inline]
pub const fn page_map_bytes(capacity: u64) -> u64 {
    (capacity / PAGE * 8).div_ceil(PAGE) * PAGE
}

/// Offset of the heap in a pool of `capacity` bytes.
#[inline]
pub const fn heap_off(capacity: u64) -> u64 {
    HEADER_BYTES + page_map_bytes(capacity)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_are_sorted_aligned_and_lookup_is_tight() {
        for w in CLASS_SIZES.windows(2) {
            assert!(w[0] < w[1], "{w:?}");
        }
        for s in CLASS_SIZES {
            assert_eq!(s % 16, 0);
        }
        for size in 0..=(MAX_SMALL_BLOCK - BLOCK_HDR) as usize {
            let c = class_for(size).unwrap();
            assert!(CLASS_SIZES[c] as u64 >= size as u64 + BLOCK_HDR);
            if c > 0 {
                assert!((CLASS_SIZES[c - 1] as u64) < size as u64 + BLOCK_HDR);
            }
        }
        assert_eq!(class_for((MAX_SMALL_BLOCK - BLOCK_HDR + 1) as usize), None);
        // Power-of-two payloads fit their "+ header" class exactly.
        assert_eq!(CLASS_SIZES[class_for(8192).unwrap()], 8208);
        assert_eq!(CLASS_SIZES[class_for(1024).unwrap()], 1040);
    }

    #[test]
    fn block_start_check_agrees_with_division() {
        for (c, &size) in CLASS_SIZES.iter().enumerate() {
            let size = size as u64;
            let span = span_pages(c) * PAGE;
            let slow = |at: u64| at % size == 0 && at / size < span / size;
            for at in (0..span + 2 * size).step_by(16) {
                assert_eq!(is_block_start(c, at), slow(at), "class {c} at {at}");
            }
            for at in [
                u64::MAX,
                u64::MAX - 15,
                1 << 63,
                size << 40,
                size * (span / size),
            ] {
                assert_eq!(is_block_start(c, at), slow(at), "class {c} at {at}");
            }
        }
    }

    #[test]
    fn large_extents_are_exact_page_rounded() {
        // 256 MiB + 8 bytes takes 256 MiB + one page, never 512 MiB.
        assert_eq!(large_pages((256 << 20) + 8), Some((256 << 20) / PAGE + 1));
        assert_eq!(bucket_of(1), 1);
        assert_eq!(bucket_of(15), 15);
        assert_eq!(bucket_of(16), 16);
        assert_eq!(bucket_of(17), 17);
        assert_eq!(bucket_of(32), 32);
        assert_eq!(bucket_of(34), 33);
        assert!(bucket_of(MAX_POOL_BYTES / PAGE * 2 - 1) < NUM_BUCKETS);
        // Monotonic, so "any bucket above mine" means "bigger than me".
        for p in 1..100_000u64 {
            assert!(bucket_of(p) <= bucket_of(p + 1));
        }
    }

    #[test]
    fn info_and_page_map_roundtrip() {
        let i = info(STATE_ALLOC, 7, FLAG_CLEAN, 0xDEAD_BEEF);
        assert_eq!(info_state(i), STATE_ALLOC);
        assert_eq!(info_class(i), 7);
        assert_eq!(info_generation(i), 0xDEAD_BEEF);
        let e = pm_small(52, 33);
        assert_eq!((pm_kind(e), pm_class(e), pm_value(e)), (PM_SMALL, 52, 33));
        let e = pm_large(1 << 40);
        assert_eq!((pm_kind(e), pm_value(e)), (PM_LARGE, 1 << 40));
    }
}
