//! The server side of a log-in: real session servers (one SHM-classic, one vanilla, made once
//! per process; with init-channel and metadata callbacks that read the client's metadata)
//! serve a hand-made client that connects to the socket and sends frames on a real transport
//! channel: raw ones, and log-in requests made with capnp's encoder from field values the
//! input picks (each a valid value xor-ed with input bits: the version, the app names, the
//! pid, uid and gid the kernel reports, the configuration, init channels, metadata, ids).
//! Then the client ends its sending and waits for the server to close the connection, taking
//! (and dropping) every session and error the server files meanwhile.
//!
//! Oracles: no panic on the library thread or here; the server closes every connection within
//! a bound (a log-in cannot hang the server), and keeps serving (every input is a new
//! connection to the same servers).

use std::cell::RefCell;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use flowipc::schemas::session_capnp::master;
use flowipc::schemas::test_msgs_capnp::channel_mdt;
use flowipc::session::{
    App, ClientApp, Metadata, ServerApp, SessionConfig, SessionServer, ShmKind,
};
use flowipc::transport::{Channel, ChannelConfig, OutFrame};

use crate::{heap_msg_frame, scratch_dir, some_fd, Input, Program, Seed};

/// The client app's name, and the two servers'.
const CLIENT: &str = "cli";
const SERVERS: [&str; 2] = ["srvc", "srvh"];

struct Servers {
    servers: [SessionServer; 2],
    apps: [ServerApp; 2],
}

thread_local! {
    static STATE: RefCell<Option<Servers>> = const { RefCell::new(None) };
}

/// `n` from the client's metadata, if it is a `ChannelMdt`.
fn mdt_n(md: Option<&Metadata>) -> Option<u32> {
    let r = md?.read::<channel_mdt::Owned>().ok()?;
    let n = r.get().ok()?.get_n();
    Some(n)
}

impl Servers {
    fn new() -> Servers {
        let dir = scratch_dir("login-server");
        let cli = ClientApp::new(App::current(CLIENT).expect("an app"));
        let clients = ClientApp::master_set([&cli]);
        let apps = SERVERS
            .map(|s| ServerApp::new(App::current(s).expect("an app"), [CLIENT]).run_dir(&dir));
        let servers = [ShmKind::Classic, ShmKind::Heap].map(|shm| {
            let cfg = SessionConfig::new()
                .with_shm(shm)
                .with_pool_size(1 << 20)
                .with_log_in_timeout(Duration::from_secs(3));
            let app = &apps[usize::from(shm == ShmKind::Heap)];
            SessionServer::builder(app, &clients)
                .config(cfg)
                .init_channels(|_, _, md| mdt_n(md).unwrap_or(0) % 3)
                .metadata(|_, _, md| md.cloned())
                .build()
                .expect("a server")
        });
        Servers { servers, apps }
    }

    /// Takes (and drops) every session and error the servers filed.
    fn take_results(&self) {
        for s in &self.servers {
            loop {
                match s.accept(Some(Duration::ZERO)) {
                    Err(flowipc::session::Error::AcceptTimeout) => break,
                    Err(flowipc::session::Error::Aborted) => panic!("a server stopped"),
                    // A session (dropped: its connection closes), or a log-in's error.
                    _ => {}
                }
            }
        }
    }
}

/// A name: the expected one, another app's, none, or the input's.
fn name<'a>(inp: &mut Input<'a>, expected: &'a str) -> String {
    match inp.u8() % 4 {
        0 => expected.to_owned(),
        1 => SERVERS[0].to_owned(),
        2 => String::new(),
        _ => String::from_utf8_lossy(inp.chunk()).into_owned(),
    }
}

/// A log-in request made with capnp's encoder: every field a valid value xor-ed with input
/// bits (all zero: the request a real client of server `which` sends).
fn log_in(inp: &mut Input<'_>, which: usize) -> Vec<u8> {
    let mut msg = capnp::message::Builder::new_default();
    {
        let mut l = msg.init_root::<master::Builder<'_>>().init_log_in();
        l.set_protocol_version(1 ^ u32::from(inp.u8()));
        l.set_client_app(name(inp, CLIENT).as_str());
        l.set_server_app(name(inp, SERVERS[which]).as_str());
        let (uid, gid) = (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        l.set_pid(std::process::id() as i32 ^ i32::from(inp.u8()));
        l.set_uid(uid ^ u32::from(inp.u8()));
        l.set_gid(gid ^ u32::from(inp.u8()));
        let mut c = l.reborrow().init_config();
        c.set_shm_kind(u8::from(which == 0) ^ inp.u8());
        c.set_channel_kind(inp.u8());
        c.set_native_handles(inp.u8() & 1 == 0);
        l.set_init_channels(u32::from(inp.u8()));
        match inp.u8() % 3 {
            0 => {}
            1 => {
                let n = u32::from(inp.u8());
                let md = Metadata::build::<channel_mdt::Owned>(|mut m| {
                    m.set_purpose("fuzz");
                    m.set_n(n);
                })
                .expect("metadata");
                l.set_metadata(md.as_bytes());
            }
            _ => l.set_metadata(inp.chunk()),
        }
    }
    let (id, answers) = (1 ^ u64::from(inp.u8()), u64::from(inp.u8()));
    heap_msg_frame(&msg, id, answers)
}

const OP_FRAME: u8 = 0;
const OP_LOG_IN: u8 = 1;
const OP_END: u8 = 2;
const OPS: u8 = 3;

/// One input: a setup byte (bit 0: the vanilla server), then the client's operations.
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let which = usize::from(inp.u8() & 1);
    STATE.with(|cell| {
        let mut slot = cell.borrow_mut();
        let st = slot.get_or_insert_with(Servers::new);
        let sock = UnixStream::connect(st.apps[which].socket_path()).expect("the server listens");
        let cfg = ChannelConfig::new().with_max_frame(4 << 20);
        let mut chan = Channel::from_stream(sock, cfg).expect("a channel");
        while let Some(op) = inp.op(OPS) {
            let r = match op {
                OP_FRAME => {
                    let fd = some_fd(inp.u8());
                    chan.send(OutFrame::new(inp.chunk()).owned_fd(fd))
                }
                OP_LOG_IN => chan.send(&log_in(&mut inp, which)),
                OP_END => chan.end_sending(),
                _ => Ok(()),
            };
            if r.is_err() {
                break;
            }
        }
        let _ = chan.flush_blocking(Some(Duration::from_secs(1)));
        let _ = nix::sys::socket::shutdown(chan.as_raw_fd(), nix::sys::socket::Shutdown::Write);
        // The server answers (or not) and closes the connection.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            st.take_results();
            match chan.recv_blocking(Some(Duration::from_millis(2))) {
                Ok(_) => {}
                Err(_) => break,
            }
            assert!(
                Instant::now() < deadline,
                "the server kept a connection open past its log-in timeout"
            );
        }
        st.take_results();
    });
}

/// Seeds: a valid log-in to each server (with and without metadata and init channels), and
/// requests each check refuses.
pub fn seeds() -> Vec<Seed> {
    let mut seeds = Vec::new();
    // The log-in's field bytes, in `log_in`'s order: version, client name, server name, pid,
    // uid, gid, SHM kind, channel kind, fds, init channels, metadata kind (then its bytes),
    // id, answers.
    let fields = |version: u8, pid: u8, init: u8, md: &[u8]| {
        let mut p = Program::new();
        p.u8(version)
            .u8(0)
            .u8(0)
            .u8(pid)
            .u8(0)
            .u8(0)
            .u8(0)
            .u8(0)
            .u8(0)
            .u8(init);
        p.bytes(md).u8(0).u8(0);
        p.finish()
    };
    for which in [0u8, 1] {
        let cases = [
            ("valid", fields(0, 0, 0, &[0])),
            ("metadata", fields(0, 0, 1, &[1, 2])),
            ("version", fields(2, 0, 0, &[0])),
            ("pid", fields(0, 1, 0, &[0])),
        ];
        for (name, f) in cases {
            let mut p = Program::new();
            p.u8(which).u8(OP_LOG_IN).bytes(&f);
            seeds.push((format!("{name}-{which}"), p.finish()));
        }
    }
    seeds
}
