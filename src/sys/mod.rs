//! Thin wrappers over the Linux system calls flowipc needs beyond `std`: sealed memfds, hole
//! punching, fd passing (`SCM_RIGHTS`), non-blocking gathered sends and `poll`, plus byte views
//! of word buffers (8-aligned receive buffers). This is the crate's one syscall module; together
//! with `shm` it is the only place allowed `unsafe`. It is crate-private: what a user needs of
//! it has a public API of its own (sharing an arena over a socket is `shm::Arena::send_to`).
//!
//! Everything returns `std::io::Result`, and every received fd comes back as an [`OwnedFd`], so
//! nothing received can leak.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{fallocate, fcntl, FallocateFlags, FcntlArg, SealFlag};
use nix::libc;
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

pub(crate) mod epoll;
pub(crate) mod futex;
pub(crate) mod mq;

/// Most fds one message may carry (a bound, so a peer cannot make us allocate without limit).
pub(crate) const MAX_FDS_PER_MSG: usize = 8;

fn io_err(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Creates an anonymous, close-on-exec memfd that allows sealing. It has no name in any file
/// system: the kernel frees it when the last fd and mapping are gone, whatever happens to us.
///
/// # References
/// memfd_create(2)
pub(crate) fn memfd_sealable(name: &str) -> io::Result<File> {
    let fd =
        memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING).map_err(io_err)?;
    Ok(File::from(fd))
}

/// Seals the file's size: no shrinking (a shrink would SIGBUS every process mapping it), no
/// growing, and no further seals.
pub(crate) fn seal_size(file: &File) -> io::Result<()> {
    let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
    fcntl(file, FcntlArg::F_ADD_SEALS(seals))
        .map(drop)
        .map_err(io_err)
}

/// Whether the fd is sealed against both shrinking and growing. Fds that cannot carry seals
/// (sockets, most regular files) report `false`.
pub(crate) fn is_size_sealed(fd: BorrowedFd<'_>) -> bool {
    match fcntl(fd, FcntlArg::F_GET_SEALS) {
        Ok(bits) => {
            let seals = SealFlag::from_bits_truncate(bits);
            seals.contains(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW)
        }
        Err(_) => false,
    }
}

/// Gives the pages of `[off, off + len)` back to the kernel; they read as zeros afterwards.
///
/// # References
/// fallocate(2), `FALLOC_FL_PUNCH_HOLE`
pub(crate) fn punch_hole(file: &File, off: u64, len: u64) -> io::Result<()> {
    let to_off = |v: u64| libc_off(v).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput));
    fallocate(
        file,
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        to_off(off)?,
        to_off(len)?,
    )
    .map_err(io_err)
}

fn libc_off(v: u64) -> Option<i64> {
    i64::try_from(v).ok()
}

/// Opens a new, independent open file description of the file behind `fd` (through
/// `/proc/self/fd`), close-on-exec. Locks taken through it with [`try_lock_byte`] belong to it
/// alone: the kernel drops them when it is closed, including when this process dies.
pub(crate) fn reopen(fd: BorrowedFd<'_>) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

fn byte_lock(kind: libc::c_int, index: u64) -> io::Result<libc::flock> {
    Ok(libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: libc_off(index).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?,
        l_len: 1,
        l_pid: 0,
    })
}

/// Tries to take an exclusive open-file-description lock on byte `index` of `file` (locks are
/// advisory: the byte's contents are not affected, and it may lie beyond the end of the file).
/// Returns `false` if another open file description holds it. A description never conflicts
/// with itself.
///
/// # References
/// fcntl(2), "Open file description locks"
pub(crate) fn try_lock_byte(file: &File, index: u64) -> io::Result<bool> {
    let lock = byte_lock(libc::F_WRLCK, index)?;
    match fcntl(file, FcntlArg::F_OFD_SETLK(&lock)) {
        Ok(_) => Ok(true),
        Err(Errno::EAGAIN | Errno::EACCES) => Ok(false),
        Err(e) => Err(io_err(e)),
    }
}

/// Releases a lock taken with [`try_lock_byte`].
pub(crate) fn unlock_byte(file: &File, index: u64) -> io::Result<()> {
    let lock = byte_lock(libc::F_UNLCK, index)?;
    fcntl(file, FcntlArg::F_OFD_SETLK(&lock))
        .map(drop)
        .map_err(io_err)
}

/// Registers `handler` to run in the child after every `fork()` of this process.
///
/// # References
/// pthread_atfork(3)
pub(crate) fn on_fork_child(handler: extern "C" fn()) -> io::Result<()> {
    // SAFETY: pthread_atfork only records the three function pointers (two of them null, which
    // it allows); `handler` is a plain `extern "C" fn` that lives for the whole program.
    let rc = unsafe { libc::pthread_atfork(None, None, Some(handler)) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// Sends `data` with `fds` attached to its first byte (`SCM_RIGHTS`). Returns the bytes sent
/// (the fds ride with the first byte, so a short send still delivered them).
pub(crate) fn send_with_fds(
    sock: &UnixStream,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(data)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(io_err)
}

/// What one `recvmsg` call delivered: see [`try_recv_with_fds`].
#[derive(Debug)]
pub(crate) struct Received {
    /// Bytes read into the buffer (0 at end of stream).
    pub bytes: usize,
    /// The fds that came with the bytes (`SCM_RIGHTS`), close-on-exec, owned: nothing leaks.
    pub fds: Vec<OwnedFd>,
    /// The kernel cut control data off (`MSG_CTRUNC`): more than [`MAX_FDS_PER_MSG`] fds were
    /// attached. Those beyond the limit were closed by the kernel; those in `fds` are ours.
    pub fds_truncated: bool,
}

/// Receives into `buf` without blocking (`MSG_DONTWAIT`), collecting any fds (close-on-exec,
/// `MSG_CMSG_CLOEXEC`) that came with the bytes. With no data available it fails with
/// [`io::ErrorKind::WouldBlock`]; at end of stream it returns 0 bytes. Retries on `EINTR`.
///
/// On a Unix stream socket, one call returns bytes of possibly several `sendmsg` calls of the
/// peer, but stops right after the bytes of a kernel buffer that carried fds (Linux
/// `unix_stream_read_generic`): the fds belong to the last bytes returned.
///
/// Unlike nix's `recvmsg` wrapper, this takes ownership of every fd the kernel installed even
/// when the control data was truncated, so none leaks.
///
/// # References
/// recvmsg(2), unix(7) "SCM_RIGHTS", cmsg(3)
pub(crate) fn try_recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    recv_msg(sock, buf, libc::MSG_DONTWAIT)
}

/// Like [`try_recv_with_fds`] but waits for data when the socket is in blocking mode (no
/// `MSG_DONTWAIT`): one system call where a non-blocking reader needs three (a failed read,
/// `poll`, the read).
pub(crate) fn recv_with_fds_waiting(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    recv_msg(sock, buf, 0)
}

/// Receives into `buf` with a plain `recv` (no control buffer): cheaper in the kernel than
/// `recvmsg` (no `msghdr` or iovec to import, no control-message handling). `wait`: block
/// until data arrives if `sock` is in blocking mode; otherwise `MSG_DONTWAIT`, failing with
/// [`io::ErrorKind::WouldBlock`] when nothing is there. Returns the bytes read (0 at end of
/// stream). Retries on `EINTR`.
///
/// Fds a peer attached to these bytes (`SCM_RIGHTS`) are not delivered: with no control
/// buffer, the kernel closes them (and sets `MSG_CTRUNC`, which `recv` does not report). As
/// with `recvmsg`, one call stops right after a kernel buffer that carried fds.
///
/// # References
/// recv(2), unix(7) "SCM_RIGHTS"
pub(crate) fn recv_plain(sock: BorrowedFd<'_>, buf: &mut [u8], wait: bool) -> io::Result<usize> {
    let flags = if wait { 0 } else { libc::MSG_DONTWAIT };
    loop {
        // The system call itself (`recvfrom` with no address, which is `recv`): libc's wrapper
        // is a thread-cancellation point. Integer arguments go as full `long`s (`syscall` is
        // variadic and reads each as one).
        // SAFETY: `buf` is a live slice of `buf.len()` bytes, exclusively borrowed for the
        // call, so the kernel may write up to that many bytes into it (and writes no more);
        // the address and its length pointer are null, as `recv` passes; `sock` is an open fd
        // borrowed for the call.
        let n = unsafe {
            libc::syscall(
                libc::SYS_recvfrom,
                libc::c_long::from(sock.as_raw_fd()),
                buf.as_mut_ptr(),
                buf.len(),
                libc::c_long::from(flags),
                std::ptr::null_mut::<libc::sockaddr>(),
                std::ptr::null_mut::<libc::socklen_t>(),
            )
        };
        if let Ok(n) = usize::try_from(n) {
            return Ok(n);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Whether `fd` is a stream socket (`SO_TYPE` is `SOCK_STREAM`). Anything else (a pipe, a file,
/// a datagram socket) is `false`.
pub(crate) fn is_stream_socket(fd: BorrowedFd<'_>) -> bool {
    matches!(
        nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::SockType),
        Ok(nix::sys::socket::SockType::Stream)
    )
}

/// Sends one fd on `sock` without blocking: one byte with the fd attached (`SCM_RIGHTS`),
/// `MSG_DONTWAIT | MSG_NOSIGNAL`. `Ok(true)`: the fd is in the peer's receive queue; `Ok(false)`:
/// the socket is full and nothing was sent. A peer that closed gives `EPIPE` (or `ECONNRESET`).
/// The transport's fd side socket carries exactly these messages.
pub(crate) fn try_send_one_fd(sock: BorrowedFd<'_>, fd: BorrowedFd<'_>) -> io::Result<bool> {
    match try_send_vectored(sock, &[IoSlice::new(&[0])], Some(fd)) {
        Ok(n) => Ok(n > 0),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
        Err(e) => Err(e),
    }
}

/// Receives what one [`try_send_one_fd`] sent, without blocking: reads a single byte, so the
/// next message's fd stays queued. `bytes` is 0 at end of stream; with nothing queued it fails
/// with [`io::ErrorKind::WouldBlock`].
pub(crate) fn try_recv_one_fd(sock: BorrowedFd<'_>) -> io::Result<Received> {
    let mut b = [0u8; 1];
    try_recv_with_fds(sock, &mut b)
}

/// Bytes of control buffer for [`MAX_FDS_PER_MSG`] fds.
const CMSG_BYTES: usize = {
    let fds_len = MAX_FDS_PER_MSG * std::mem::size_of::<libc::c_int>();
    // SAFETY: `CMSG_SPACE` is the C macro's arithmetic on its argument (alignment rounding and a
    // header size); it dereferences nothing, and `fds_len` (32) is far from overflowing c_uint.
    unsafe { libc::CMSG_SPACE(fds_len as libc::c_uint) as usize }
};

fn recv_msg(sock: BorrowedFd<'_>, buf: &mut [u8], flags: libc::c_int) -> io::Result<Received> {
    // Words, so the buffer is aligned for `cmsghdr` (8 bytes on 64-bit Linux, 4 on 32-bit).
    let mut control = [0u64; CMSG_BYTES.div_ceil(8)];
    let control_len = std::mem::size_of_val(&control);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: `msghdr` is a plain C struct of integers and raw pointers (plus, on some libcs,
    // private padding integers); all zeros is a valid value of every field (null pointers, zero
    // lengths, no flags).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control_len as _;
    let control_start = msg.msg_control as usize;
    let bytes = loop {
        // The system call itself, not libc's wrapper (a thread-cancellation point: a pair of
        // calls around every message, and this library never uses cancellation).
        // SAFETY: `msg` points at one live iovec describing `buf` (exclusively borrowed for this
        // call, so the kernel may write its `buf.len()` bytes) and at `control`, a live, aligned
        // buffer of `msg_controllen` bytes; the kernel writes within those bounds only and
        // updates `msg_controllen`/`msg_flags`, which are fields of our own `msg`.
        let n = unsafe {
            libc::syscall(
                libc::SYS_recvmsg,
                libc::c_long::from(sock.as_raw_fd()),
                &mut msg as *mut libc::msghdr,
                libc::c_long::from(flags | libc::MSG_CMSG_CLOEXEC),
            )
        };
        if let Ok(n) = usize::try_from(n) {
            break n;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    // The end of what the kernel wrote into `control` (it set `msg_controllen` to that).
    let control_end = control_start + (msg.msg_controllen as usize).min(control_len);
    let mut fds = Vec::new();
    // SAFETY: `msg` is the header the kernel just filled; CMSG_FIRSTHDR only reads its
    // `msg_control`/`msg_controllen` and returns null or a pointer to a whole `cmsghdr` within
    // the control buffer.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: `cmsg` is non-null, so CMSG_FIRSTHDR/CMSG_NXTHDR checked that a whole,
        // aligned `cmsghdr` lies inside `control` (alive until the end of this function and not
        // otherwise borrowed since we handed its pointer to `msg`); the kernel initialised it.
        let hdr = unsafe { cmsg.read() };
        if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_DATA only offsets `cmsg` by the aligned header size; the result
            // stays within (or one past) the control buffer, which is checked below.
            let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<libc::c_int>();
            let data_end = (cmsg as usize)
                .saturating_add(hdr.cmsg_len as usize)
                .min(control_end);
            let count = data_end.saturating_sub(data as usize) / std::mem::size_of::<libc::c_int>();
            for i in 0..count {
                // SAFETY: entry `i` lies within `data..data_end`, which is inside the control
                // bytes the kernel wrote (bounded by `control_end` above); `read_unaligned`
                // needs no alignment.
                let raw = unsafe { data.add(i).read_unaligned() };
                // SAFETY: the kernel installed `raw` in our fd table for this message alone
                // (SCM_RIGHTS, close-on-exec); nothing else in the process knows it, so this is
                // the only ownership it will ever have and it is closed exactly once.
                fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        }
        // SAFETY: `cmsg` is a valid header inside `msg`'s control buffer (see above);
        // CMSG_NXTHDR returns the next whole header within `msg_controllen`, or null.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    Ok(Received {
        bytes,
        fds,
        fds_truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
    })
}

/// Sends the bytes of `bufs` (gathered, in order) without blocking (`MSG_DONTWAIT`) and
/// without `SIGPIPE` (`MSG_NOSIGNAL`), with `fd` attached to the first byte (`SCM_RIGHTS`).
/// Returns how many bytes the kernel took (possibly fewer than offered; if any, the fd went with
/// them). With no room at all it fails with [`io::ErrorKind::WouldBlock`] and nothing (fd
/// included) was sent. A peer that closed gives `EPIPE` (or `ECONNRESET`). Retries on `EINTR`.
/// At most `IOV_MAX` (1024) slices are passed; callers pass no more than that.
///
/// # References
/// sendmsg(2), unix(7)
pub(crate) fn try_send_vectored(
    sock: BorrowedFd<'_>,
    bufs: &[IoSlice<'_>],
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<usize> {
    let raw: [RawFd; 1] = [fd.map_or(-1, |f| f.as_raw_fd())];
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if fd.is_some() { &cmsg } else { &[] };
    let bufs = &bufs[..bufs.len().min(IOV_MAX)];
    loop {
        match sendmsg::<()>(
            sock.as_raw_fd(),
            bufs,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
            None,
        ) {
            Err(Errno::EINTR) => continue,
            r => return r.map_err(io_err),
        }
    }
}

/// Frames up to this many bytes without an fd are worth copying into one stack buffer and
/// sending with [`try_send`]: that spares the kernel the `msghdr` and iovec imports of
/// `sendmsg` (measurable per message). The transport's send path does it.
pub(crate) const SMALL_SEND: usize = 256;

/// Sends `buf` without blocking (`MSG_DONTWAIT`) and without `SIGPIPE` (`MSG_NOSIGNAL`).
/// Returns the bytes sent; fails with [`io::ErrorKind::WouldBlock`] if none could be. Retries
/// on `EINTR`.
pub(crate) fn try_send(sock: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    loop {
        // The system call itself (`sendto` with no address, which is `send`): libc's wrapper is
        // a thread-cancellation point, which costs a pair of calls around every message, and
        // this library never uses cancellation. Integer arguments go as full `long`s (`syscall`
        // is variadic and reads each as one).
        // SAFETY: `buf` is a live, readable slice of `buf.len()` bytes for the call's duration
        // (the kernel only reads it); the address pointer is null with length 0, as `send`
        // passes; `sock` is an open fd borrowed for the call.
        let n = unsafe {
            libc::syscall(
                libc::SYS_sendto,
                libc::c_long::from(sock.as_raw_fd()),
                buf.as_ptr(),
                buf.len(),
                libc::c_long::from(libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT),
                std::ptr::null::<libc::sockaddr>(),
                0 as libc::c_long,
            )
        };
        if let Ok(n) = usize::try_from(n) {
            return Ok(n);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Most slices one [`try_send_vectored`] call passes to the kernel (Linux's `UIO_MAXIOV`).
pub(crate) const IOV_MAX: usize = 1024;

/// What to wait for on one fd in [`poll`], and what was found.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PollFd<'fd> {
    /// The fd to watch.
    pub fd: BorrowedFd<'fd>,
    /// Wait until it is readable (`POLLIN`).
    pub read: bool,
    /// Wait until it is writable (`POLLOUT`).
    pub write: bool,
    /// Set by [`poll`]: what the fd is ready for.
    pub ready: Readiness,
}

impl<'fd> PollFd<'fd> {
    /// Watches `fd` for the given readiness.
    pub(crate) fn new(fd: BorrowedFd<'fd>, read: bool, write: bool) -> Self {
        PollFd {
            fd,
            read,
            write,
            ready: Readiness::default(),
        }
    }
}

/// Readiness reported by [`poll`] for one fd.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Readiness {
    /// `POLLIN`: a read will not block (data, or end of stream).
    pub readable: bool,
    /// `POLLOUT`: a write will take at least some bytes.
    pub writable: bool,
    /// `POLLHUP`: the peer hung up (reads will reach end of stream).
    pub hangup: bool,
    /// `POLLERR` or `POLLNVAL`: an error is pending, or the fd is not open.
    pub error: bool,
}

impl Readiness {
    /// Whether anything at all was reported.
    pub(crate) fn any(&self) -> bool {
        self.readable || self.writable || self.hangup || self.error
    }
}

/// Waits until one of `fds` is ready as asked, or `timeout` passes (`None`: no limit; the
/// timeout is rounded up to whole milliseconds, so a short wait never becomes a busy loop).
/// Returns how many fds are ready and sets each one's `ready`. An interrupting signal (`EINTR`)
/// returns `Ok(0)`, like a timeout: callers re-check their deadlines and call again.
///
/// # References
/// poll(2)
pub(crate) fn poll(fds: &mut [PollFd<'_>], timeout: Option<Duration>) -> io::Result<usize> {
    // The library's loops poll two or three fds: those go in a stack array (no allocation per
    // wait); more spill to the heap.
    const INLINE: usize = 4;
    let to_raw = |p: &PollFd<'_>| RawPollFd::new(p.fd.as_raw_fd(), p.read, p.write);
    let mut inline = [RawPollFd::new(-1, false, false); INLINE];
    let mut heap = Vec::new();
    let raw: &mut [RawPollFd] = if fds.len() <= INLINE {
        for (r, p) in inline.iter_mut().zip(fds.iter()) {
            *r = to_raw(p);
        }
        &mut inline[..fds.len()]
    } else {
        heap.extend(fds.iter().map(to_raw));
        &mut heap
    };
    let n = poll_raw(raw, timeout);
    for (p, r) in fds.iter_mut().zip(raw.iter()) {
        p.ready = r.ready();
    }
    n
}

/// One entry of [`poll_raw`]: an fd number, what to wait for, and (after the call) what was
/// found. Layout-compatible with `struct pollfd`.
#[derive(Debug, Clone, Copy)]
#[repr(transparent)]
pub(crate) struct RawPollFd(libc::pollfd);

impl RawPollFd {
    /// Watches fd number `fd` (one that is not open is reported as an error, `POLLNVAL`).
    pub(crate) fn new(fd: RawFd, read: bool, write: bool) -> Self {
        let mut events = 0;
        if read {
            events |= libc::POLLIN;
        }
        if write {
            events |= libc::POLLOUT;
        }
        RawPollFd(libc::pollfd {
            fd,
            events,
            revents: 0,
        })
    }

    /// What the last [`poll_raw`] found.
    pub(crate) fn ready(&self) -> Readiness {
        let r = self.0.revents;
        Readiness {
            readable: r & libc::POLLIN != 0,
            writable: r & libc::POLLOUT != 0,
            hangup: r & libc::POLLHUP != 0,
            error: r & (libc::POLLERR | libc::POLLNVAL) != 0,
        }
    }
}

/// [`poll`] by fd number: for a poller (the reactor) that keeps the owners of the fds alive
/// across the call rather than borrowing the fds themselves. A number that is not open, or was
/// closed and reused meanwhile, only makes a readiness report wrong, never memory unsafe.
pub(crate) fn poll_raw(fds: &mut [RawPollFd], timeout: Option<Duration>) -> io::Result<usize> {
    let ms: libc::c_int = match timeout {
        None => -1,
        Some(d) => {
            let ms = d.as_nanos().div_ceil(1_000_000);
            libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
        }
    };
    for p in fds.iter_mut() {
        p.0.revents = 0;
    }
    // SAFETY: `RawPollFd` is `repr(transparent)` over `libc::pollfd`, so `fds` is a live,
    // initialised, exclusively borrowed array of `fds.len()` pollfd entries; the kernel reads
    // them and writes only their `revents` fields, within the array. The fds are plain numbers
    // to the kernel: one not open is reported as POLLNVAL, nothing is read or written through it.
    let n = unsafe { libc::poll(fds.as_mut_ptr().cast(), fds.len() as libc::nfds_t, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(0)
        } else {
            Err(e)
        };
    }
    Ok(usize::try_from(n).unwrap_or(0))
}

/// The bytes of a word buffer (native byte order), for reading 8-aligned data as bytes.
pub(crate) fn words_as_bytes(words: &[u64]) -> &[u8] {
    // SAFETY: the byte slice covers exactly the memory of `words` (`size_of_val` bytes, which
    // fits in isize because the word slice exists), with the same lifetime and a shared borrow;
    // u64 has no padding, so every byte is initialised, and u8's alignment (1) divides u64's.
    unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), std::mem::size_of_val(words)) }
}

/// The bytes of a word buffer, writable: for receiving into 8-aligned storage.
pub(crate) fn words_as_bytes_mut(words: &mut [u64]) -> &mut [u8] {
    // SAFETY: as in `words_as_bytes`, and the exclusive borrow of `words` moves to the result,
    // so nothing else can observe the words while the bytes are written; every bit pattern is a
    // valid u64, so any bytes written leave valid words.
    unsafe {
        std::slice::from_raw_parts_mut(
            words.as_mut_ptr().cast::<u8>(),
            std::mem::size_of_val(words),
        )
    }
}

/// A vector of `n` zero words, or `None` if the allocation fails (instead of aborting the
/// process, as `vec![0; n]` would). The memory comes from `alloc_zeroed`, so a large buffer is
/// fresh zero pages the kernel has not materialised yet: nothing is written before the caller
/// fills it (a received 1 GiB frame is written once, by `recvmsg`).
pub(crate) fn try_zeroed_words(n: usize) -> Option<Vec<u64>> {
    if n == 0 {
        return Some(Vec::new());
    }
    let layout = std::alloc::Layout::array::<u64>(n).ok()?;
    // SAFETY: `layout` has a non-zero size (n > 0 words of 8 bytes), as `alloc_zeroed` requires.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<u64>();
    if ptr.is_null() {
        return None;
    }
    // SAFETY: `ptr` was just allocated by the global allocator with `Layout::array::<u64>(n)`,
    // which is exactly the layout a `Vec<u64>` of capacity `n` deallocates with; all `n` words
    // are initialised (zero bytes are a valid u64) and the length `n` does not exceed the
    // capacity; nothing else owns the allocation.
    Some(unsafe { Vec::from_raw_parts(ptr, n, n) })
}

/// Test support: forks, runs `f` in the child and `_exit`s with its success, and returns whether
/// the child succeeded (or `false` if it did not finish within 30 s).
#[cfg(test)]
pub(crate) fn fork_and_wait(f: impl FnOnce()) -> bool {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    use nix::unistd::{fork, ForkResult};
    // SAFETY: after fork in a multi-threaded process the child may deadlock on any lock another
    // thread held at the fork (notably malloc's), and must not rely on other threads. The child
    // runs only `f` and then `_exit`, which runs nothing inherited. Callers' `f` allocates and
    // frees nothing and takes only locks of objects private to the calling test (no other thread
    // can hold them across the fork), so it cannot deadlock; memory-wise the child is a copy and
    // whatever it does cannot affect the parent's address space.
    match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_ok();
            // SAFETY: `_exit` ends the child at once, running nothing inherited from the parent.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) }
        }
        ForkResult::Parent { child } => {
            for _ in 0..3000 {
                match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::Exited(_, code)) => return code == 0,
                    Ok(WaitStatus::StillAlive) => {
                        std::thread::sleep(std::time::Duration::from_millis(10))
                    }
                    _ => return false,
                }
            }
            let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
            let _ = waitpid(child, None);
            false
        }
    }
}

/// Credentials of the process at the other end of a connected Unix socket, as the kernel
/// recorded them (`SO_PEERCRED`): for a connection accepted from a listening socket, the
/// connecting process at `connect` time; for a client's socket, the listener's at `listen` time.
/// (For a `socketpair` it is the process that created the pair, whoever holds the other end
/// now: do not use it there.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PeerCred {
    /// Process id.
    pub pid: i32,
    /// Effective user id.
    pub uid: u32,
    /// Effective group id.
    pub gid: u32,
}

/// `getsockopt(SO_PEERCRED)` on a connected Unix socket.
pub(crate) fn peer_credentials(sock: BorrowedFd<'_>) -> io::Result<PeerCred> {
    let c = nix::sys::socket::getsockopt(&sock, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(io_err)?;
    Ok(PeerCred {
        pid: c.pid(),
        uid: c.uid(),
        gid: c.gid(),
    })
}

/// This process's effective user and group ids.
pub(crate) fn effective_ids() -> (u32, u32) {
    (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    )
}

/// Takes an exclusive `flock` on `file` without waiting: `Ok(Err(file))` if another open file
/// description holds one. The lock lives as long as the returned guard (and dies with the
/// process).
pub(crate) fn try_flock(file: File) -> io::Result<Result<nix::fcntl::Flock<File>, File>> {
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Ok(lock)),
        Err((file, Errno::EWOULDBLOCK)) => Ok(Err(file)),
        Err((_, e)) => Err(io_err(e)),
    }
}

/// Wakes a thread that waits in [`poll`]: a non-blocking socket pair whose read end the thread
/// polls. [`wake`](Waker::wake) writes a byte (a full socket already holds a pending wake-up);
/// the woken thread [`drain`](Waker::drain)s it.
#[derive(Debug)]
pub(crate) struct Waker {
    tx: UnixStream,
    rx: UnixStream,
}

impl Waker {
    pub(crate) fn new() -> io::Result<Waker> {
        let (tx, rx) = UnixStream::pair()?;
        tx.set_nonblocking(true)?;
        rx.set_nonblocking(true)?;
        Ok(Waker { tx, rx })
    }

    /// Wakes the thread (any failure leaves it to its next event, all it could do anyway).
    pub(crate) fn wake(&self) {
        let _ = io::Write::write(&mut &self.tx, &[1]);
    }

    /// Takes the pending wake-ups (the thread, after its poll).
    pub(crate) fn drain(&self) {
        let mut b = [0u8; 64];
        while matches!(io::Read::read(&mut &self.rx, &mut b), Ok(n) if n > 0) {}
    }

    /// What the thread polls for reading.
    pub(crate) fn as_fd(&self) -> BorrowedFd<'_> {
        self.rx.as_fd()
    }
}

/// Registers `fd` (ours alone) with the current tokio runtime, for `interest`.
#[cfg(feature = "tokio")]
pub(crate) fn tokio_fd(
    fd: OwnedFd,
    interest: tokio::io::Interest,
) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: tokio's contract: the fd stays open, the same file description, and `as_raw_fd`
    // returns it, for the whole life of the `AsyncFd`. The `AsyncFd` owns `fd` (an `OwnedFd`,
    // which nothing else can close), and an `OwnedFd`'s number never changes.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, interest) }
        .map_err(|e| e.into_parts().1)
}
