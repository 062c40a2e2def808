//! The client side of a log-in: a real [`ClientSession`] connects (`sync_connect_with`, its
//! configuration, init channels and metadata from the input's setup byte) to a hand-made server
//! on this process's own thread: it listens on the server app's socket beside a PID file naming
//! this process (so the client's checks of the server pass), reads the client's log-in request,
//! and answers with the input's frames: raw ones, and responses, resources (with an arena's pool
//! fd, a socket, another file or none) and channel openings made with capnp's encoder from
//! field values the input picks (valid values xor-ed with input bits); then it ends its sending
//! and waits for the client to close.
//!
//! Oracles: no panic (here, on the hand-made server's thread, or on the library thread); the
//! client's call returns (a log-in cannot hang the client) and the connection is closed once
//! the client is dropped.

use std::cell::RefCell;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use flowipc::schemas::session_capnp::master;
use flowipc::schemas::test_msgs_capnp::channel_mdt;
use flowipc::session::{
    App, ClientApp, ClientSession, ConnectOptions, Metadata, ServerApp, SessionConfig, ShmKind,
};
use flowipc::shm::{Arena, ArenaConfig};
use flowipc::transport::{Channel, ChannelConfig, OutFrame};

use crate::{heap_msg_frame, scratch_dir, some_fd, Input, Program, Seed};

/// What the client asked for, as its request says.
#[derive(Default)]
struct Asked {
    init_channels: u32,
    classic: bool,
}

/// Reads the client's log-in request (a heap message frame, as its real encoder wrote it).
fn asked(payload: &[u8]) -> Asked {
    let read = || -> capnp::Result<Asked> {
        let mut body = payload.get(24..).unwrap_or(&[]);
        let opts = capnp::message::ReaderOptions::new();
        let r = capnp::serialize::read_message_from_flat_slice(&mut body, opts)?;
        let root = r.get_root::<master::Reader<'_>>()?;
        let master::LogIn(l) = root.which()? else {
            return Err(capnp::Error::failed("not a logIn".into()));
        };
        let l = l?;
        Ok(Asked {
            init_channels: l.get_init_channels(),
            classic: l.get_config()?.get_shm_kind() == 1,
        })
    };
    read().expect("the real client's log-in request reads back")
}

/// The hand-made server's arenas (made anew when a session left blocks in them).
struct Arenas([Arena; 2]);

impl Arenas {
    fn new() -> Arenas {
        let make = || Arena::create(ArenaConfig::new().pool_size(1 << 20)).expect("an arena");
        Arenas([make(), make()])
    }

    fn pool_fd(&self, i: usize) -> Option<OwnedFd> {
        self.0[i].pool_fd(0)?.try_clone_to_owned().ok()
    }

    fn clean(&self) -> bool {
        self.0.iter().all(|a| a.stats().blocks_in_use == 0)
    }
}

const OP_FRAME: u8 = 0;
const OP_ACCEPT: u8 = 1;
const OP_REJECT: u8 = 2;
const OP_RESOURCE: u8 = 3;
const OP_OPEN: u8 = 4;
const OP_END: u8 = 5;
const OPS: u8 = 6;

/// Metadata of the input's choosing: none, a `ChannelMdt`, or raw bytes.
fn metadata(inp: &mut Input<'_>) -> Vec<u8> {
    match inp.u8() % 3 {
        0 => Vec::new(),
        1 => {
            let n = u32::from(inp.u8());
            Metadata::build::<channel_mdt::Owned>(|mut m| m.set_n(n))
                .expect("metadata")
                .as_bytes()
                .to_vec()
        }
        _ => inp.chunk().to_vec(),
    }
}

/// Ids of a frame: the input's bits xor-ed with a message id (1) and the answered one.
fn ids(inp: &mut Input<'_>, answers: u64) -> (u64, u64) {
    (1 ^ u64::from(inp.u8()), answers ^ u64::from(inp.u8()))
}

/// Answers one connection with the program `prog`.
fn serve(sock: UnixStream, prog: &[u8], arenas: &Arenas) {
    let cfg = ChannelConfig::new().with_max_frame(4 << 20);
    let mut chan = Channel::from_stream(sock, cfg).expect("a channel");
    let req = match chan.recv_blocking(Some(Duration::from_secs(5))) {
        Ok(Some(f)) => f,
        other => panic!("the client sent no log-in request: {other:?}"),
    };
    let asked = asked(&req.payload);
    let mut inp = Input::new(prog);
    while let Some(op) = inp.op(OPS) {
        let mut msg = capnp::message::Builder::new_default();
        let mut fd = None;
        let frame = match op {
            OP_FRAME => {
                fd = some_fd(inp.u8());
                inp.chunk().to_vec()
            }
            OP_ACCEPT => {
                let mut a = msg
                    .init_root::<master::Builder<'_>>()
                    .init_log_in_rsp()
                    .init_accepted();
                match inp.u8() % 3 {
                    0 => a.set_token(&inp.array::<16>()),
                    1 => a.set_token(inp.chunk()),
                    _ => {}
                }
                a.set_init_by_client(asked.init_channels ^ u32::from(inp.u8()));
                a.set_init_by_server(u32::from(inp.u8()));
                a.set_metadata(&metadata(&mut inp));
                a.set_arenas(asked.classic ^ (inp.u8() & 1 != 0));
                let (id, answers) = ids(&mut inp, 1);
                heap_msg_frame(&msg, id, answers)
            }
            OP_REJECT => {
                let mut r = msg
                    .init_root::<master::Builder<'_>>()
                    .init_log_in_rsp()
                    .init_rejected();
                r.set_reason(inp.u16());
                r.set_detail(String::from_utf8_lossy(inp.chunk()).as_ref());
                let (id, answers) = ids(&mut inp, 1);
                heap_msg_frame(&msg, id, answers)
            }
            OP_RESOURCE => {
                let mut r = msg.init_root::<master::Builder<'_>>().init_resource();
                r.set_kind(inp.u8());
                r.set_index(u32::from(inp.u8()));
                let which = inp.u8();
                fd = match which % 4 {
                    0 => arenas.pool_fd(usize::from(which >> 2) & 1),
                    1 => UnixStream::pair().ok().map(|(a, _)| a.into()),
                    _ => some_fd(which >> 2),
                };
                let (id, answers) = ids(&mut inp, 0);
                heap_msg_frame(&msg, id, answers)
            }
            OP_OPEN => {
                let mut o = msg.init_root::<master::Builder<'_>>().init_open_channel();
                o.set_metadata(&metadata(&mut inp));
                fd = UnixStream::pair().ok().map(|(a, _)| a.into());
                let (id, answers) = ids(&mut inp, 0);
                heap_msg_frame(&msg, id, answers)
            }
            OP_END => {
                let _ = chan.end_sending();
                continue;
            }
            _ => continue,
        };
        if chan.send(OutFrame::new(&frame).owned_fd(fd)).is_err() {
            break;
        }
    }
    let _ = chan.flush_blocking(Some(Duration::from_secs(1)));
    let _ = nix::sys::socket::shutdown(chan.as_raw_fd(), nix::sys::socket::Shutdown::Write);
    // Until the client closes (its call returned and the harness dropped it).
    let deadline = Instant::now() + Duration::from_secs(10);
    while chan.recv_blocking(Some(Duration::from_millis(50))).is_ok() {
        assert!(
            Instant::now() < deadline,
            "the client never closed the connection"
        );
    }
}

/// The hand-made server: its thread, and the two ends of its job queue.
struct Server {
    jobs: mpsc::Sender<Vec<u8>>,
    done: mpsc::Receiver<()>,
    cli: ClientApp,
    srv: ServerApp,
}

thread_local! {
    static STATE: RefCell<Option<Server>> = const { RefCell::new(None) };
}

impl Server {
    fn new() -> Server {
        let dir = scratch_dir("login-client");
        let srv = ServerApp::new(App::current("srv").expect("an app"), ["cli"]).run_dir(&dir);
        let cli = ClientApp::new(App::current("cli").expect("an app"));
        std::fs::write(srv.pid_file(), std::process::id().to_string()).expect("the PID file");
        let _ = std::fs::remove_file(srv.socket_path());
        let listener = UnixListener::bind(srv.socket_path()).expect("the socket");
        let (jobs, job_rx) = mpsc::channel::<Vec<u8>>();
        let (done_tx, done) = mpsc::channel();
        std::thread::spawn(move || {
            let mut arenas = Arenas::new();
            for prog in job_rx {
                let (sock, _) = listener.accept().expect("the client connects");
                serve(sock, &prog, &arenas);
                if !arenas.clean() {
                    arenas = Arenas::new();
                }
                if done_tx.send(()).is_err() {
                    return;
                }
            }
        });
        Server {
            jobs,
            done,
            cli,
            srv,
        }
    }
}

/// One input: the client's setup byte (bit 0: vanilla; bits 1-2: init channels it asks for;
/// bit 3: metadata), then the hand-made server's operations.
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let setup = inp.u8();
    STATE.with(|cell| {
        let mut slot = cell.borrow_mut();
        let st = slot.get_or_insert_with(Server::new);
        st.jobs
            .send(inp.bytes(data.len()).to_vec())
            .expect("the server thread");
        let shm = if setup & 1 != 0 {
            ShmKind::Heap
        } else {
            ShmKind::Classic
        };
        let cfg = SessionConfig::new()
            .with_shm(shm)
            .with_log_in_timeout(Duration::from_secs(3));
        let mut opts = ConnectOptions::new().init_channels(u32::from(setup >> 1) & 3);
        if setup & 8 != 0 {
            let md = Metadata::build::<channel_mdt::Owned>(|mut m| m.set_n(2)).expect("md");
            opts = opts.metadata(md);
        }
        let mut client = ClientSession::new(&st.cli, &st.srv, |_| {}).config(cfg);
        if client.sync_connect_with(opts).is_ok() {
            let _ = client.take_init_channels();
            if let Some(md) = client.server_metadata() {
                if let Ok(r) = md.read::<channel_mdt::Owned>() {
                    let _ = r.get().map(|m| m.get_n());
                }
            }
            let _ = client.open_channel(None);
        }
        drop(client);
        st.done
            .recv_timeout(Duration::from_secs(20))
            .expect("the hand-made server finished the connection");
    });
}

/// Seeds: a server's real answers (the resources a client of each setup gets, then the
/// acceptance; a rejection; an acceptance followed by a channel opening).
pub fn seeds() -> Vec<Seed> {
    let mut seeds = Vec::new();
    for setup in [0u8, 1, 2, 4 | 8, 1 | 2] {
        let classic = setup & 1 == 0;
        let init = u32::from(setup >> 1) & 3;
        let mut p = Program::new();
        p.u8(setup);
        if classic {
            p.u8(OP_RESOURCE).u8(0).u8(0).u8(0).u8(0).u8(0);
            p.u8(OP_RESOURCE).u8(1).u8(0).u8(4).u8(0).u8(0);
        }
        for i in 0..init {
            p.u8(OP_RESOURCE).u8(2).u8(i as u8).u8(1).u8(0).u8(0);
        }
        // Token (16 bytes), init channels, metadata (a ChannelMdt), arenas, ids.
        p.u8(OP_ACCEPT)
            .u8(0)
            .bytes(&[7; 16])
            .u8(0)
            .u8(0)
            .u8(1)
            .u8(3)
            .u8(0)
            .u8(0)
            .u8(0);
        p.u8(OP_OPEN).u8(0).u8(0).u8(0);
        seeds.push((format!("accept-{setup}"), p.finish()));
    }
    let mut p = Program::new();
    p.u8(0).u8(OP_REJECT).u16(3).chunk(b"no").u8(0).u8(0);
    seeds.push(("reject".into(), p.finish()));
    seeds
}
