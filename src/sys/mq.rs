//! POSIX message queues (mq_overview(7)) as plain fds: on Linux a queue descriptor is a file
//! descriptor, pollable (readable when a message waits, writable when there is room) and
//! passable with `SCM_RIGHTS`. A queue is made under a unique name and unlinked at once, so it
//! has no name while it is in use and vanishes with its last descriptor, whatever happens to
//! the processes; only a crash between the two calls could leave a name in `/dev/mqueue`.
//!
//! # References
//! mq_overview(7), mq_open(3), mq_send(3), mq_receive(3), mq_getattr(3)

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};

use nix::libc;
use nix::mqueue::{mq_open, mq_unlink, MQ_OFlag, MqAttr};
use nix::sys::stat::Mode;

/// What a queue holds: its message size and count limits, and the messages waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MqState {
    pub msgsize: usize,
    pub maxmsg: usize,
    pub curmsgs: usize,
}

/// A timeout already past: the timed calls below never wait, whatever the queue's `O_NONBLOCK`
/// says (the flag belongs to the open queue, which the peer shares and may change).
const PAST: libc::timespec = libc::timespec {
    tv_sec: 0,
    tv_nsec: 0,
};

/// One message queue descriptor; its calls never wait.
#[derive(Debug)]
pub(crate) struct Mq {
    fd: OwnedFd,
}

impl Mq {
    /// Makes a queue of `maxmsg` messages of up to `msgsize` bytes, and unlinks its name.
    pub(crate) fn create(msgsize: usize, maxmsg: usize) -> io::Result<Mq> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!(
            "/flowipc-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let as_long = |v: usize| libc::c_long::try_from(v).unwrap_or(libc::c_long::MAX);
        let attr = MqAttr::new(0, as_long(maxmsg), as_long(msgsize), 0);
        let flags = MQ_OFlag::O_CREAT
            | MQ_OFlag::O_EXCL
            | MQ_OFlag::O_RDWR
            | MQ_OFlag::O_NONBLOCK
            | MQ_OFlag::O_CLOEXEC;
        let mq = mq_open(
            name.as_str(),
            flags,
            Mode::S_IRUSR | Mode::S_IWUSR,
            Some(&attr),
        )
        .map_err(super::io_err)?;
        // SAFETY: `mq_open` returned a new descriptor that nothing else owns; on Linux a
        // message queue descriptor is a file descriptor, closed with close(2) like any other.
        let fd = unsafe { OwnedFd::from_raw_fd(mq.into_raw_fd()) };
        mq_unlink(name.as_str()).map_err(super::io_err)?;
        Ok(Mq { fd })
    }

    /// A queue from a descriptor the peer sent; checked to be one (`mq_getattr` works on it).
    /// Its `O_NONBLOCK` flag is the peer's to change: the calls here never wait regardless.
    pub(crate) fn from_fd(fd: OwnedFd) -> io::Result<Mq> {
        let mq = Mq { fd };
        mq.state()?;
        Ok(mq)
    }

    /// The queue's limits and how many messages wait.
    pub(crate) fn state(&self) -> io::Result<MqState> {
        let mut attr = std::mem::MaybeUninit::<libc::mq_attr>::zeroed();
        // SAFETY: `attr` is a writable, properly aligned mq_attr on our stack; the descriptor
        // is open for the call (borrowed from `self`). A descriptor that is not a queue makes
        // the call fail (EBADF/EINVAL) without touching `attr`.
        let r = unsafe { libc::mq_getattr(self.fd.as_raw_fd(), attr.as_mut_ptr()) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: mq_getattr succeeded, so it filled the struct (it was zeroed before anyway,
        // and every bit pattern of its integer fields is valid).
        let attr = unsafe { attr.assume_init() };
        let v = |x: libc::c_long| usize::try_from(x).unwrap_or(0);
        Ok(MqState {
            msgsize: v(attr.mq_msgsize),
            maxmsg: v(attr.mq_maxmsg),
            curmsgs: v(attr.mq_curmsgs),
        })
    }

    /// Sends one message without waiting: `Ok(false)` if the queue is full.
    pub(crate) fn try_send(&self, msg: &[u8]) -> io::Result<bool> {
        loop {
            // SAFETY: `msg` is a live slice of `msg.len()` bytes that the kernel only reads;
            // `PAST` is a static timespec it only reads; the descriptor is open for the call.
            let r = unsafe {
                libc::mq_timedsend(
                    self.fd.as_raw_fd(),
                    msg.as_ptr().cast(),
                    msg.len(),
                    0,
                    &PAST,
                )
            };
            if r == 0 {
                return Ok(true);
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => return Ok(false),
                io::ErrorKind::Interrupted => continue,
                _ => return Err(e),
            }
        }
    }

    /// Receives one message into `buf` (at least the queue's `msgsize` long) without waiting:
    /// `Ok(None)` if none waits.
    pub(crate) fn try_receive(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            let mut prio = 0u32;
            // SAFETY: `buf` is a live, exclusively borrowed slice of `buf.len()` bytes, of which
            // the kernel writes at most that many (it fails with EMSGSIZE rather than write
            // past it); `prio` is a live u32; `PAST` is a static timespec the kernel only reads;
            // the descriptor is open for the call.
            let r = unsafe {
                libc::mq_timedreceive(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    &mut prio,
                    &PAST,
                )
            };
            if let Ok(n) = usize::try_from(r) {
                return Ok(Some(n));
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => return Ok(None),
                io::ErrorKind::Interrupted => continue,
                _ => return Err(e),
            }
        }
    }
}

#[cfg(test)]
impl Mq {
    /// Clears the open queue's `O_NONBLOCK`, as a peer may (tests).
    pub(crate) fn clear_nonblock(&self) -> io::Result<()> {
        // SAFETY: mq_attr is plain integers, all-zero is valid (flags 0: blocking).
        let attr: libc::mq_attr = unsafe { std::mem::zeroed() };
        // SAFETY: `attr` is a live mq_attr the kernel only reads (mq_flags); the old-attribute
        // pointer is null (not wanted); the descriptor is open for the call.
        let r = unsafe { libc::mq_setattr(self.fd.as_raw_fd(), &attr, std::ptr::null_mut()) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl AsFd for Mq {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
