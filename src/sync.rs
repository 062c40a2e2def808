//! Crate-private synchronization primitives.
//!
//! Every atomic used by a lock-free algorithm of this crate comes from here, so the loom models
//! (`--cfg flowipc_loom`) check the very code that runs in production. The cfg is crate-specific
//! so that a downstream `--cfg loom` build does not flip us.
//!
//! Loom atomics are handles into loom's model state, not integers: they are never layout-compatible
//! with std atomics. Code that casts bytes of a shared mapping to atomics (the pool and block
//! headers) therefore exists only without the loom cfg; the algorithms themselves take
//! `&AtomicU64` through the [`Words`](crate::shm::lockfree::Words) trait and run on heap memory
//! under loom.

#[cfg(not(flowipc_loom))]
pub(crate) use std::sync::atomic::{fence, AtomicPtr, AtomicU32, AtomicU64, Ordering};

// Under loom only the lock-free algorithms (and the pool table of `shm::publish`) are compiled.
#[cfg(flowipc_loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicPtr, AtomicU32, AtomicU64, Ordering};

/// Locks `m`, taking the data of a poisoned lock too: the crate's locks guard state that a
/// panicking user handler (never run under them) cannot leave half-written, so poisoning only
/// means some thread panicked elsewhere, and shutting down needs the state anyway.
#[cfg(not(flowipc_loom))]
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
