//! Shared futexes: a wait and a wake on a 32-bit word that may live in memory other processes
//! map (`MAP_SHARED`). Unlike the `FUTEX_PRIVATE_FLAG` variants (what `std` and `atomic-wait`
//! use), these key the wait queue on the mapped file and offset, so a wake from another process
//! reaches the waiter.
//!
//! # References
//! futex(2)

use std::io;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use nix::libc;

/// Sleeps while `*word == expected`, at most `timeout` (`None`: no limit). Returns on a wake,
/// when the word holds another value (at once), at the timeout, or on a signal: the caller
/// re-checks whatever it waits for, as with any futex.
pub(crate) fn wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) -> io::Result<()> {
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: libc::time_t::try_from(t.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(t.subsec_nanos() as i32),
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `word` is a live, 4-aligned AtomicU32 for the whole call (borrowed); the kernel
    // only reads it (atomically, comparing with `expected`). `ts_ptr` is null or points to a
    // timespec on our stack that outlives the call; FUTEX_WAIT reads it as a relative timeout.
    // The unused arguments (uaddr2, val3) are ignored by FUTEX_WAIT.
    let r = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::c_long::from(libc::FUTEX_WAIT),
            libc::c_long::from(expected as i32),
            ts_ptr,
            std::ptr::null::<u32>(),
            0 as libc::c_long,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::ETIMEDOUT) | Some(libc::EINTR) => Ok(()),
        _ => Err(e),
    }
}

/// Wakes the waiters sleeping on `word` (in any process). A wake with no waiter does nothing.
pub(crate) fn wake(word: &AtomicU32) {
    // SAFETY: `word` is a live AtomicU32 (borrowed for the call); FUTEX_WAKE uses its address
    // only as the key of the wait queue and neither reads nor writes it. The remaining
    // arguments are ignored by FUTEX_WAKE. A failure (there is none for a valid address) would
    // only leave the waiter to its timeout slice: nothing to report.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::c_long::from(libc::FUTEX_WAKE),
            libc::c_long::from(i32::MAX),
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0 as libc::c_long,
        );
    }
}
