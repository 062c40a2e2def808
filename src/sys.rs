//! Thin wrappers over the Linux system calls flowipc needs beyond `std`: sealed memfds, hole
//! punching and fd passing (`SCM_RIGHTS`). This is the crate's one syscall module; together with
//! `shm` it is the only place allowed `unsafe`.
//!
//! Everything returns `std::io::Result`, and every received fd comes back as an [`OwnedFd`], so
//! nothing received can leak.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::errno::Errno;
use nix::fcntl::{fallocate, fcntl, FallocateFlags, FcntlArg, SealFlag};
use nix::libc;
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

/// Most fds one message may carry (a bound, so a peer cannot make us allocate without limit).
pub const MAX_FDS_PER_MSG: usize = 8;

fn io_err(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Creates an anonymous, close-on-exec memfd that allows sealing. It has no name in any file
/// system: the kernel frees it when the last fd and mapping are gone, whatever happens to us.
///
/// # References
/// memfd_create(2)
pub fn memfd_sealable(name: &str) -> io::Result<File> {
    let fd =
        memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING).map_err(io_err)?;
    Ok(File::from(fd))
}

/// Seals the file's size: no shrinking (a shrink would SIGBUS every process mapping it), no
/// growing, and no further seals.
pub fn seal_size(file: &File) -> io::Result<()> {
    let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
    fcntl(file, FcntlArg::F_ADD_SEALS(seals))
        .map(drop)
        .map_err(io_err)
}

/// Whether the fd is sealed against both shrinking and growing. Fds that cannot carry seals
/// (sockets, most regular files) report `false`.
pub fn is_size_sealed(fd: BorrowedFd<'_>) -> bool {
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
pub fn punch_hole(file: &File, off: u64, len: u64) -> io::Result<()> {
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
pub fn reopen(fd: BorrowedFd<'_>) -> io::Result<File> {
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
pub fn try_lock_byte(file: &File, index: u64) -> io::Result<bool> {
    let lock = byte_lock(libc::F_WRLCK, index)?;
    match fcntl(file, FcntlArg::F_OFD_SETLK(&lock)) {
        Ok(_) => Ok(true),
        Err(Errno::EAGAIN | Errno::EACCES) => Ok(false),
        Err(e) => Err(io_err(e)),
    }
}

/// Releases a lock taken with [`try_lock_byte`].
pub fn unlock_byte(file: &File, index: u64) -> io::Result<()> {
    let lock = byte_lock(libc::F_UNLCK, index)?;
    fcntl(file, FcntlArg::F_OFD_SETLK(&lock))
        .map(drop)
        .map_err(io_err)
}

/// Registers `handler` to run in the child after every `fork()` of this process.
///
/// # References
/// pthread_atfork(3)
pub fn on_fork_child(handler: extern "C" fn()) -> io::Result<()> {
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
pub fn send_with_fds(sock: &UnixStream, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
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

/// Receives into `buf`, collecting any fds that came with the bytes (close-on-exec). Returns the
/// bytes read (0 at end of stream) and the fds. Fds beyond [`MAX_FDS_PER_MSG`] are cut off by
/// the kernel (`MSG_CTRUNC`), reported as `InvalidData` after closing those that did arrive.
pub fn recv_with_fds(sock: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut cmsg_buf = nix::cmsg_space!([RawFd; MAX_FDS_PER_MSG]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg_buf),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io_err)?;
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(io_err)? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for fd in raw {
                // SAFETY: the kernel installed `fd` in our table for this message alone
                // (SCM_RIGHTS); nothing else in the process knows it, so taking ownership here
                // is the only ownership it will ever have and it is closed exactly once.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "too many fds with one message",
        ));
    }
    Ok((msg.bytes, fds))
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
