//! Test support: child processes and fd passing.
//!
//! A test spawns a child by re-executing its own test binary, running only the ignored test
//! `child_entry` with a role name in the environment. Parent and child talk over a Unix socket
//! with an *abstract* address (unique per spawn): nothing is created in any file system, so a
//! killed test leaves nothing behind. An arena crosses that socket with `Arena::send_to`.
//!
//! Raw fd passing and memfds, for tests that feed the library hand-made input, come from `nix`
//! directly ([`send_with_fds`], [`memfd`], [`seal_size`]): the library's own syscall module is
//! private.
#![allow(dead_code)]

pub mod balance;
pub mod msgs;
pub mod raw;
pub mod session;

use std::fs::File;
use std::io::{IoSlice, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flowipc::shm::{Arena, ArenaConfig, LendBlob};
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

/// The channel kind this test crate runs its suite over. A suite file under `suites/` is
/// included by three test crates: `<suite>` runs it over sockets, `<suite>_shm_queue` over
/// shared-memory queues, `<suite>_posix_mq` over POSIX message queues (child processes re-execute the same binary, so they agree).
pub fn kind() -> flowipc::transport::ChannelKind {
    let name = env!("CARGO_CRATE_NAME");
    if name.ends_with("_shm_queue") {
        flowipc::transport::ChannelKind::ShmQueue
    } else if name.ends_with("_posix_mq") {
        flowipc::transport::ChannelKind::PosixMq
    } else {
        flowipc::transport::ChannelKind::SocketStream
    }
}

/// A default channel configuration of this crate's [`kind`].
pub fn channel_config() -> flowipc::transport::ChannelConfig {
    flowipc::transport::ChannelConfig::new().with_kind(kind())
}

/// A default session configuration whose channels are of this crate's [`kind`].
pub fn session_config() -> flowipc::session::SessionConfig {
    flowipc::session::SessionConfig::new().with_channel_kind(kind())
}

const ROLE_ENV: &str = "FLOWIPC_TEST_ROLE";
const SOCK_ENV: &str = "FLOWIPC_TEST_SOCK";

/// The role this process was spawned for, if it is a child.
pub fn child_role() -> Option<String> {
    std::env::var(ROLE_ENV).ok()
}

/// A spawned child and the socket to it. Kills the child on drop if it is still running.
pub struct Peer {
    pub child: Child,
    pub sock: UnixStream,
}

impl Drop for Peer {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn unique_name() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "flowipc-test-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Spawns this test binary's `child_entry` with `role`, and sends it `arena`
/// ([`Arena::send_to`]; the child joins with [`child_connect`]).
pub fn spawn(role: &str, arena: &Arena) -> Peer {
    let peer = spawn_plain(role);
    arena.send_to(&peer.sock).unwrap();
    peer
}

/// Spawns this test binary's `child_entry` with `role`, connected by a blocking socket (the
/// child gets its end from [`child_socket`]).
pub fn spawn_plain(role: &str) -> Peer {
    spawn_env(role, &[])
}

/// [`spawn_plain`] with more environment variables for the child.
pub fn spawn_env(role: &str, env: &[(&str, &std::ffi::OsStr)]) -> Peer {
    let name = unique_name();
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let listener = UnixListener::bind_addr(&addr).unwrap();
    listener.set_nonblocking(true).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "child_entry",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE_ENV, role)
        .env(SOCK_ENV, &name)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let sock = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if let Some(status) = child.try_wait().unwrap() {
                    panic!("child {role} exited before connecting: {status}");
                }
                assert!(Instant::now() < deadline, "child {role} never connected");
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    sock.set_nonblocking(false).unwrap();
    Peer { child, sock }
}

/// In a child: connects to the parent and joins its arena (sent by [`spawn`]).
pub fn child_connect() -> (UnixStream, Arena) {
    let sock = child_socket();
    let arena = Arena::join_from(&sock, ArenaConfig::new()).unwrap();
    (sock, arena)
}

/// In a child: connects to the parent (spawned by [`spawn`] or [`spawn_plain`]).
pub fn child_socket() -> UnixStream {
    let name = std::env::var(SOCK_ENV).expect("spawned by common::spawn");
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    UnixStream::connect_addr(&addr).unwrap()
}

/// Sends `data` on `sock` with `fds` attached to its first byte (`SCM_RIGHTS`), without
/// `SIGPIPE`. Returns the bytes sent.
pub fn send_with_fds(sock: &UnixStream, data: &[u8], fds: &[BorrowedFd<'_>]) -> usize {
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
    .unwrap()
}

/// An empty memfd that allows sealing (close-on-exec).
pub fn memfd(name: &str) -> File {
    let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING).unwrap();
    File::from(fd)
}

/// Seals a memfd's size (no shrinking, no growing, no further seals), as pools are.
pub fn seal_size(file: &File) {
    let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
    fcntl(file, FcntlArg::F_ADD_SEALS(seals)).unwrap();
}

pub fn send_u64(sock: &mut UnixStream, v: u64) {
    sock.write_all(&v.to_le_bytes()).unwrap();
}

pub fn recv_u64(sock: &mut UnixStream) -> u64 {
    let mut b = [0u8; 8];
    sock.read_exact(&mut b).unwrap();
    u64::from_le_bytes(b)
}

pub fn send_blob(sock: &mut UnixStream, blob: &LendBlob) {
    sock.write_all(blob.as_bytes()).unwrap();
}

pub fn recv_blob(sock: &mut UnixStream) -> LendBlob {
    let mut b = [0u8; LendBlob::LEN];
    sock.read_exact(&mut b).unwrap();
    LendBlob::from_bytes(&b).unwrap()
}

/// In a child that waits to be killed: returns once the parent is gone (its end of `sock`
/// closed), so that a parent killed first (a test run stopped) leaves no child behind.
pub fn until_parent_gone(sock: &mut UnixStream) {
    let _ = sock.read_to_end(&mut Vec::new());
}

/// Waits for the child to exit and asserts it succeeded.
pub fn wait_ok(mut peer: Peer) {
    let status = peer.child.wait().unwrap();
    assert!(status.success(), "child failed: {status}");
}

/// A small deterministic PRNG (xorshift64*), so tests need no extra crate.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// A size: mostly small, sometimes medium, rarely large (exercises classes and extents).
    pub fn size(&mut self) -> usize {
        match self.below(100) {
            0..=69 => self.below(512) as usize,
            70..=94 => self.below(64 << 10) as usize,
            95..=98 => self.below(512 << 10) as usize,
            _ => (1 << 20) + self.below(1 << 20) as usize,
        }
    }
}

/// Fills `buf` with a pattern derived from `tag`.
pub fn fill(buf: &mut [u8], tag: u64) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (tag.wrapping_mul(31).wrapping_add(i as u64 / 7)) as u8;
    }
}

/// Checks the pattern written by [`fill`].
pub fn check(buf: &[u8], tag: u64) -> bool {
    buf.iter()
        .enumerate()
        .all(|(i, &b)| b == (tag.wrapping_mul(31).wrapping_add(i as u64 / 7)) as u8)
}

/// Runs `f` on a thread and fails the test if it does not finish within `secs` (a hang). Joins
/// the thread when it does, so that its thread-local destructors (which hand its arena cache
/// back) have run when this returns.
pub fn within<T: Send + 'static>(
    secs: u64,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(v) => {
            thread.join().unwrap();
            v
        }
        Err(_) => panic!("{what}: did not finish within {secs} s (hang?)"),
    }
}

/// Runs `f(i)` for `i` in `0..n` on scoped threads and joins each one explicitly: unlike the
/// implicit join at the end of `std::thread::scope`, an explicit join waits for the thread's
/// thread-local destructors, which hand its arena cache back (rust-lang/rust#116237).
pub fn on_threads<F: Fn(u64) + Sync>(n: u64, f: F) {
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n).map(|i| s.spawn(move || f(i))).collect();
        for h in handles {
            h.join().unwrap();
        }
    });
}

/// Names in /dev/shm that look like ours (there should never be any: pools are memfds).
pub fn dev_shm_leftovers() -> Vec<String> {
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains("flowipc"))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether the other end of `probe` is closed everywhere: a write fails with EPIPE (SIGPIPE is
/// ignored in Rust programs). A child being spawned by another test may hold a copy for an
/// instant (between fork and exec), so this retries for a while.
pub fn closed_everywhere(probe: &mut UnixStream) -> bool {
    probe.set_nonblocking(true).unwrap();
    for _ in 0..500 {
        match probe.write(&[1]) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return true,
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    false
}

/// One round of a test's own poll loop: waits (up to `max`) until an fd of `interests` is
/// ready or the earliest of their deadlines comes (the caller then calls each `on_ready`).
pub fn poll_interests(interests: &[flowipc::poll::Interest<'_>], max: Duration) {
    use nix::poll::{PollFd, PollFlags, PollTimeout};
    let mut deadline = Instant::now() + max;
    let mut fds = Vec::new();
    for i in interests {
        for (fd, r, w) in i.fds() {
            let mut ev = PollFlags::empty();
            ev.set(PollFlags::POLLIN, r);
            ev.set(PollFlags::POLLOUT, w);
            fds.push(PollFd::new(fd, ev));
        }
        if let Some(d) = i.deadline() {
            deadline = deadline.min(d);
        }
    }
    let ms = deadline
        .saturating_duration_since(Instant::now())
        .as_millis();
    let t = PollTimeout::from(ms.min(60_000) as u16);
    let _ = nix::poll::poll(&mut fds, t);
}

/// The threads of this process now.
pub fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}
