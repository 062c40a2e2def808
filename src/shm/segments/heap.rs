//! Heap segments: zeroed private buffers for heap-backed messages (and for arena messages
//! when the arena is full), recycled per thread.

use std::alloc::Layout;
use std::cell::RefCell;
use std::fmt;
use std::ptr::NonNull;
use std::sync::atomic::AtomicUsize;

/// A zeroed heap buffer used as a segment: heap-mode messages, and the fallback when the arena
/// is exhausted. Shared with the transport's send queue through `Arc` while frozen.
///
/// Small ones are recycled: the last owner clears the prefix the builder reported writing and
/// keeps the buffer in a per-thread spare list, so a small heap message costs neither a fresh
/// allocation nor clearing a whole 8 KiB first segment.
pub struct HeapSeg {
    pub(super) ptr: NonNull<u64>,
    pub(super) words: usize,
    /// Bytes from the start that may be non-zero: all of them until the builder reports how
    /// many words it wrote (`deallocate_segment`).
    pub(super) dirty: AtomicUsize,
}

/// Largest buffer (in words) kept as a spare: 16 KiB.
pub(super) const SPARE_MAX_WORDS: usize = 2048;
/// Most spare buffers per thread.
pub(super) const SPARE_COUNT: usize = 8;

/// Zeroed buffers (pointer, words) kept for reuse by this thread; each was allocated with
/// `Layout::array::<u64>(words)` and is owned by the list alone.
pub(super) struct Spares(pub(super) Vec<(NonNull<u64>, usize)>);

impl Drop for Spares {
    fn drop(&mut self) {
        for &(ptr, words) in &self.0 {
            if let Ok(layout) = Layout::array::<u64>(words) {
                // SAFETY: allocated with this layout (`HeapSeg::zeroed`), owned by the list alone
                // (moved in by `HeapSeg::drop`), freed once (here, as the list goes).
                unsafe { std::alloc::dealloc(ptr.as_ptr().cast(), layout) }
            }
        }
    }
}

thread_local! {
    pub(super) static SPARES: RefCell<Spares> = const { RefCell::new(Spares(Vec::new())) };
}

// SAFETY: a HeapSeg is an owned buffer (like a `Box<[u64]>`); the pointer is not aliased by any
// other owner, so moving it to another thread is fine.
unsafe impl Send for HeapSeg {}
// SAFETY: `&HeapSeg` only gives `&[u8]` (AsRef). Writes go through the capnp builder of the
// `OutMsg` that allocated it, which writes only while it holds the sole `Arc` (checked with
// `Arc::get_mut`, which synchronizes with the other holders' drops), so shared readers never
// race a writer.
unsafe impl Sync for HeapSeg {}

impl HeapSeg {
    pub(super) fn zeroed(words: usize) -> HeapSeg {
        let words = words.max(1);
        if words <= SPARE_MAX_WORDS {
            let spare = SPARES
                .try_with(|s| {
                    let mut s = s.try_borrow_mut().ok()?;
                    let i = s.0.iter().rposition(|&(_, w)| w == words)?;
                    Some(s.0.swap_remove(i).0)
                })
                .ok()
                .flatten();
            if let Some(ptr) = spare {
                return HeapSeg {
                    ptr,
                    words,
                    dirty: AtomicUsize::new(words * 8),
                };
            }
        }
        let Ok(layout) = Layout::array::<u64>(words) else {
            // Unreachable on 64-bit (capnp asks for at most 2^32 words); like a failed
            // allocation elsewhere, it ends the process rather than hand out a short buffer.
            std::alloc::handle_alloc_error(Layout::new::<u64>())
        };
        // SAFETY: the layout has non-zero size (words >= 1).
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw.cast::<u64>()) else {
            std::alloc::handle_alloc_error(layout)
        };
        HeapSeg {
            ptr,
            words,
            dirty: AtomicUsize::new(words * 8),
        }
    }

    /// Records that only the first `bytes` may be non-zero (the builder is done with it).
    pub(super) fn written(&self, bytes: usize) {
        self.dirty.store(
            bytes.min(self.words * 8),
            std::sync::atomic::Ordering::Relaxed,
        );
    }
}

impl Drop for HeapSeg {
    fn drop(&mut self) {
        if self.words <= SPARE_MAX_WORDS {
            // The last owner: the builder's `written` (if it came) happened before, through the
            // `Arc` whose last drop this is.
            let dirty = (*self.dirty.get_mut()).min(self.words * 8);
            let kept = SPARES
                .try_with(|s| {
                    let Ok(mut s) = s.try_borrow_mut() else {
                        return false;
                    };
                    if s.0.len() >= SPARE_COUNT {
                        return false;
                    }
                    // SAFETY: the buffer is ours alone (its last owner is being dropped) and
                    // `dirty` bytes from its start lie within its `words * 8` bytes.
                    unsafe { std::ptr::write_bytes(self.ptr.as_ptr().cast::<u8>(), 0, dirty) };
                    s.0.push((self.ptr, self.words));
                    true
                })
                .unwrap_or(false);
            if kept {
                return;
            }
        }
        if let Ok(layout) = Layout::array::<u64>(self.words) {
            // SAFETY: allocated in `zeroed` with this very layout (directly, or as a spare
            // allocated so), owned by this segment alone, freed once (here).
            unsafe { std::alloc::dealloc(self.ptr.as_ptr().cast(), layout) }
        }
    }
}

impl AsRef<[u8]> for HeapSeg {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the buffer is `words * 8` initialized (zeroed, then written) bytes, alive as
        // long as `self`. No one writes it while this borrow lives: see the `Sync` argument.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast(), self.words * 8) }
    }
}

impl fmt::Debug for HeapSeg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HeapSeg({} words)", self.words)
    }
}
