//! flowipc's fuzz harnesses: one module per parser of a peer's bytes, each driving the library
//! through the path a real peer reaches (a real [`Channel`](flowipc::transport::Channel),
//! [`MsgChannel`](flowipc::msg::MsgChannel), structured channel or session fed by a hand-made
//! peer), with `run` (one input, for the target of the same name in `fuzz_targets/`) and
//! `seeds` (valid inputs made with the library's own encoders, written by the `seeds` binary).
//!
//! Inputs are small programs: a few setup bytes, then operations a peer performs (write stream
//! bytes, put fds on its side socket, send a frame, scribble a lent blob...). [`Input`] reads
//! them; an input that ends early reads as zeros, so every byte string is a valid program.
//!
//! What every harness asserts beside "no crash": a hosing error is reported once (every later
//! call answers `Hosed`), a channel always reaches an end once its peer is gone (no hang), and
//! what is delivered is what the peer could have sent (see each module).

pub mod blobs;
pub mod fixture;
pub mod login_client;
pub mod login_server;
pub mod msg_frames;
pub mod peer;
pub mod struc_dispatch;
pub mod tables;
pub mod transport;

use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;

/// Every target's seeds, by target name.
pub fn all_seeds() -> Vec<(&'static str, Vec<Seed>)> {
    vec![
        ("transport_frames", transport::seeds(false)),
        ("transport_fds", transport::seeds(true)),
        ("msg_frames", msg_frames::seeds()),
        ("shm_blobs", blobs::seeds()),
        ("shm_tables", tables::seeds()),
        ("struc_dispatch", struc_dispatch::seeds()),
        ("login_server", login_server::seeds()),
        ("login_client", login_client::seeds()),
    ]
}

/// The environment variable that makes a target write the seed corpora and exit (see [`init`]).
pub const WRITE_SEEDS: &str = "FLOWIPC_FUZZ_WRITE_SEEDS";

/// Every target's start-up (libFuzzer's initialization, before any input): with
/// [`WRITE_SEEDS`]`=<dir>` in the environment, writes every target's seed corpus as
/// `<dir>/<target>/<seed>` (valid inputs made with the library's own encoders; existing files of
/// the same names are replaced) and exits. Any target binary does it for all: they share this
/// library (no extra binary to build, with or without the sanitizer's runtime).
pub fn init() {
    let Some(dir) = std::env::var_os(WRITE_SEEDS) else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    for (target, seeds) in all_seeds() {
        let at = dir.join(target);
        std::fs::create_dir_all(&at).expect("the corpus dir");
        for (name, bytes) in &seeds {
            std::fs::write(at.join(name), bytes).expect("a seed");
        }
        println!("{target}: {} seeds", seeds.len());
    }
    std::process::exit(0);
}

/// Reads an input as a program: every read succeeds (zeros, or fewer bytes, past the end).
#[derive(Debug, Clone)]
pub struct Input<'a> {
    data: &'a [u8],
    ops: u32,
}

/// Most operations one input performs (what follows is ignored): every operation may cost
/// system calls, and a run's speed should not depend on how long an input grew.
pub const MAX_OPS: u32 = 64;

impl<'a> Input<'a> {
    /// A reader over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Input { data, ops: 0 }
    }

    /// Whether another operation follows (`false` once the input is read, or after
    /// [`MAX_OPS`]); counts it.
    pub fn more(&mut self) -> bool {
        if self.data.is_empty() || self.ops >= MAX_OPS {
            return false;
        }
        self.ops += 1;
        true
    }

    /// The next operation's code, one of `n` (see [`more`](Input::more)).
    pub fn op(&mut self, n: u8) -> Option<u8> {
        self.more().then(|| self.u8() % n)
    }

    /// Whether the whole input has been read.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The next byte (0 past the end).
    pub fn u8(&mut self) -> u8 {
        let b = self.data.first().copied().unwrap_or(0);
        self.data = self.data.get(1..).unwrap_or(&[]);
        b
    }

    /// The next 2 bytes, little-endian.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    /// The next 4 bytes, little-endian.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    /// The next 8 bytes, little-endian.
    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | u64::from(self.u32()) << 32
    }

    /// The next `n` bytes (fewer at the end).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.data.split_at(n.min(self.data.len()));
        self.data = b;
        a
    }

    /// A length-prefixed (u16) byte string.
    pub fn chunk(&mut self) -> &'a [u8] {
        let n = self.u16() as usize;
        self.bytes(n)
    }

    /// Exactly `N` bytes (zero-padded at the end).
    pub fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let b = self.bytes(N);
        a[..b.len()].copy_from_slice(b);
        a
    }
}

/// The writing side of [`Input`], for seeds.
#[derive(Debug, Default, Clone)]
pub struct Program(pub Vec<u8>);

impl Program {
    /// An empty program.
    pub fn new() -> Self {
        Program(Vec::new())
    }

    /// Appends a byte.
    pub fn u8(&mut self, b: u8) -> &mut Self {
        self.0.push(b);
        self
    }

    /// Appends a u16, little-endian.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Appends a u32, little-endian.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Appends a u64, little-endian.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Appends bytes as they are.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }

    /// Appends a length-prefixed (u16) byte string (see [`Input::chunk`]).
    pub fn chunk(&mut self, b: &[u8]) -> &mut Self {
        let n = u16::try_from(b.len()).expect("a chunk of at most 64 KiB");
        self.u16(n).bytes(b)
    }

    /// The program's bytes.
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0)
    }
}

/// A receiving side a harness turns like a poll loop would.
pub trait Turns {
    /// One turn after a poll returned (`interest`, `on_ready`, receive what is there).
    /// Returns whether anything happened.
    fn turn(&mut self) -> bool;
    /// Whether the side reported its end.
    fn ended(&self) -> bool;
    /// The fd its `interest` names for reading.
    fn read_fd(&self) -> Option<BorrowedFd<'_>>;
}

/// The peer is gone: `side` must report an end within a bounded number of turns (each after
/// a short poll of what it asks to be polled for), or the harness fails (a hang).
pub fn until_end(side: &mut impl Turns) {
    for _ in 0..200 {
        if side.ended() {
            return;
        }
        if !side.turn() {
            if let Some(fd) = side.read_fd() {
                let mut p = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
                let _ = nix::poll::poll(&mut p, nix::poll::PollTimeout::from(5u8));
            }
        }
    }
    panic!("the channel never reported its peer's end");
}

/// A message frame's payload as the message layer writes one for a heap message: the 24-byte
/// header (kind 3, no token, the ids given) and the message in capnp's stream framing (capnp's
/// own encoder).
pub fn heap_msg_frame<A: capnp::message::Allocator>(
    m: &capnp::message::Builder<A>,
    id: u64,
    answers: u64,
) -> Vec<u8> {
    let mut f = vec![0u8; 24];
    f[0] = 3;
    f[8..16].copy_from_slice(&id.to_le_bytes());
    f[16..24].copy_from_slice(&answers.to_le_bytes());
    f.extend_from_slice(&capnp::serialize::write_message_to_words(m));
    f
}

/// A scratch directory for a harness's files (a session's run dir): `$FLOWIPC_FUZZ_DIR` (the
/// xtask runner makes one per run and removes it after), else one in the temp dir named by the
/// process id.
pub fn scratch_dir(name: &str) -> std::path::PathBuf {
    let base = std::env::var_os("FLOWIPC_FUZZ_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::env::temp_dir().join(format!("flowipc-fuzz-{}", std::process::id()))
        });
    let dir = base.join(name);
    std::fs::create_dir_all(&dir).expect("a scratch dir");
    dir
}

/// A seed: a file name and its bytes.
pub type Seed = (String, Vec<u8>);

/// Sends `data` on `sock` with `fds` attached (`SCM_RIGHTS`), without waiting; returns the bytes
/// the socket took (0 when full).
pub fn send_with_fds(sock: &UnixStream, data: &[u8], fds: &[BorrowedFd<'_>]) -> usize {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    use std::os::fd::AsRawFd;
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let iov = [std::io::IoSlice::new(data)];
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
    sendmsg::<()>(sock.as_fd().as_raw_fd(), &iov, cmsgs, flags, None).unwrap_or(0)
}

/// Reads what is waiting on `sock` without waiting: the bytes, and the fds that came with them,
/// left open for good (a hello's side socket must stay open while its sender sends fds; this
/// is for the short-lived seed writer).
pub fn drain(sock: &UnixStream) -> (Vec<u8>, Vec<std::os::fd::RawFd>) {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::AsRawFd;
    let mut out = Vec::new();
    let mut fds = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 4]);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC;
        let Ok(msg) = recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut cmsg), flags) else {
            break;
        };
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    fds.extend(raw);
                }
            }
        }
        let n = msg.bytes;
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    (out, fds)
}

/// An fd to send where the protocol wants one of a kind the input picks: `/dev/null` (a file
/// no peer means), a socket, or none.
pub fn some_fd(which: u8) -> Option<std::os::fd::OwnedFd> {
    match which % 3 {
        0 => None,
        1 => std::fs::File::open("/dev/null").ok().map(Into::into),
        _ => UnixStream::pair().ok().map(|(a, _)| a.into()),
    }
}
