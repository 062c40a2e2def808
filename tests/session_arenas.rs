//! A session's arenas grow by pools, across processes: messages larger than a pool go both ways
//! in place, a lend in a pool the client made reaches the server (the pool announced on the
//! session's own channel before the blob), and past the arena limit a send fails with
//! `LimitReached` while the session goes on.

mod common;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::session::*;
use common::*;
use flowipc::msg::{self, MsgIn, MsgOut};
use flowipc::schemas::test_msgs_capnp::cool_msg;
use flowipc::session::{ClientSession, ConnectOptions, Scope, SessionConfig, SessionServer};
use flowipc::shm::{self, LendBlob, ShmHandle};
use flowipc::struc::{self, MsgType};

type Cool = struc::Channel<cool_msg::Owned>;

/// Pools of 1 MiB, arenas of at most 24 MiB: a 4 MiB message needs a pool of its own, a 32 MiB
/// one passes the limit.
const POOL: u64 = 1 << 20;
const LIMIT: u64 = 24 << 20;
const BIG: usize = 4 << 20;
const HUGE: usize = 32 << 20;
const OBJ: [u64; 4] = [0xab, 0xcd, 0xef, 0x42];
/// An object larger than what a 1 MiB pool holds (its first words are `OBJ`).
type Obj = [u64; 160_000];

fn config() -> SessionConfig {
    SessionConfig::new()
        .with_pool_size(POOL)
        .with_arena_limit(LIMIT)
}

#[test]
#[ignore = "a child process's entry point"]
fn child_entry() {
    match child_role().as_deref() {
        Some("cli_grow") => cli_grow(),
        Some(other) => panic!("unknown role {other}"),
        None => {}
    }
}

/// A `blob` message of one chunk of `size` bytes, filled with the pattern of `tag`.
fn blob(c: &Cool, size: usize, tag: u64) -> MsgOut<cool_msg::Owned> {
    let mut m = c.create_msg();
    let data = m
        .init_root()
        .init_blob()
        .init_chunks(1)
        .get(0)
        .init_data(size as u32);
    fill(data, tag);
    m
}

/// The size of a received blob, after checking its pattern.
fn check_blob(m: &MsgIn<cool_msg::Owned>, tag: u64) -> usize {
    let cool_msg::Blob(Ok(b)) = m.root().unwrap().which().unwrap() else {
        panic!("not a blob");
    };
    let data = b.get_chunks().unwrap().get(0).get_data().unwrap();
    assert!(check(data, tag), "blob {tag}: wrong bytes");
    data.len()
}

fn recv_blob_msg(c: &mut Cool) -> MsgIn<cool_msg::Owned> {
    let ty = MsgType::of::<cool_msg::Owned>("blob").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(m) = c.take_cached(ty).unwrap() {
            return m;
        }
        assert!(Instant::now() < deadline, "no blob in time");
        c.run_for(Duration::from_millis(5)).unwrap();
    }
}

/// The arena limit reached, reported as such and not hosing.
fn assert_limit_reached(r: Result<(), struc::Error>) {
    match r {
        Err(struc::Error::Msg(msg::Error::Shm {
            source: shm::Error::LimitReached { limit, .. },
            from_peer: false,
        })) => assert_eq!(limit, LIMIT),
        other => panic!("expected LimitReached, got {other:?}"),
    }
}

#[test]
fn session_arenas_grow_past_a_pool_up_to_their_limit_across_processes() {
    let dir = RunDir::new();
    let u = universe(&dir.0);
    let server = SessionServer::builder(&u.srv, &u.clients)
        .config(config())
        .build()
        .unwrap();
    let mut cli = spawn_env("cli_grow", &dir.env());
    let mut s = server.accept(T).unwrap();
    let (tx, rx) = mpsc::channel();
    let (etx, errors) = mpsc::channel();
    s.init_handlers_with_passive_open(
        move |e| {
            let _ = etx.send(e);
        },
        move |ch, _| tx.send(ch).unwrap(),
    )
    .unwrap();
    let mut c: Cool = s
        .structured(rx.recv_timeout(Duration::from_secs(30)).unwrap())
        .unwrap();
    c.start(|e| panic!("server channel: {e}")).unwrap();

    // 1. The client's 4 MiB message, in a pool the client made, read in place here.
    let m = recv_blob_msg(&mut c);
    assert!(m.is_zero_copy());
    assert_eq!(check_blob(&m, 1), BIG);
    drop(m);
    let sess = s.arena(Scope::Session).unwrap();
    assert!(sess.pool_ids().len() > 1, "pools {:?}", sess.pool_ids());

    // 2. Ours back, in a pool we make.
    c.send(&mut blob(&c, BIG, 2), None).unwrap();

    // 3. A lend in a pool of the app-scope arena the client made: its blob comes over the
    // control socket, not the session, so only the session's own announcement brings the pool.
    let lent = recv_blob(&mut cli.sock);
    assert_ne!(lent.pool(), 0, "the client's object is in a pool it made");
    let h: ShmHandle<Obj> = s.borrow_object(&lent).unwrap();
    assert_eq!(h[..4], OBJ);
    send_u64(&mut cli.sock, 1);
    // And ours, in a pool of the app-scope arena we make (the client's is full while we hold
    // its object): the lend announces it.
    let mut mine: ShmHandle<Obj> = s.arena(Scope::App).unwrap().construct_zeroed().unwrap();
    mine.get_mut().unwrap()[..4].copy_from_slice(&OBJ);
    let pools_before = s.arena(Scope::App).unwrap().pool_ids().len();
    assert_ne!(mine.block_ref().pool, lent.pool(), "a pool of its own");
    send_blob(&mut cli.sock, &s.lend_object(&mine).unwrap());
    assert_eq!(recv_u64(&mut cli.sock), 1, "borrowed");
    assert_eq!(s.arena(Scope::App).unwrap().pool_ids().len(), pools_before);
    drop((mine, h));

    // 4. The client's message past the limit failed there; its next one comes.
    let m = recv_blob_msg(&mut c);
    assert_eq!(check_blob(&m, 3), BIG);
    drop(m);
    // Ours past the limit fails here too, and the session goes on.
    assert_limit_reached(c.send(&mut blob(&c, HUGE, 4), None));
    c.send(&mut blob(&c, 1000, 5), None).unwrap();
    assert_eq!(recv_u64(&mut cli.sock), 2, "client done");
    assert!(!s.is_hosed());
    assert!(errors.try_recv().is_err(), "no session error");
    let limit = LIMIT;
    for a in [
        s.arena(Scope::Session).unwrap(),
        s.arena(Scope::App).unwrap(),
    ] {
        let bytes: u64 = a
            .pool_ids()
            .iter()
            .map(|&id| a.pool(id).unwrap().capacity())
            .sum();
        assert!(bytes <= limit, "{bytes} bytes of pools");
    }
    // A second session of the same app (here) logs in to the grown app-scope arena: the pools
    // past 0 come once its session is open.
    let mut c2 = ClientSession::new(&u.cli, &u.srv, |_| {}).config(config());
    c2.sync_connect().unwrap();
    let s2 = server.accept(T).unwrap();
    let want = s.arena(Scope::App).unwrap().pool_ids();
    assert!(want.len() > 2, "{want:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while c2.arena(Scope::App).unwrap().pool_ids() != want {
        assert!(
            Instant::now() < deadline,
            "the app arena's pools never came"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    drop((c2, s2));
    send_u64(&mut cli.sock, 3);
    wait_ok(cli);
    drop((c, s, server));
}

fn cli_grow() {
    let mut ctl = child_socket();
    let u = universe(&env_dir());
    let mut s =
        ClientSession::new(&u.cli, &u.srv, |e| panic!("client session: {e}")).config(config());
    connect(&mut s, ConnectOptions::new());
    let mut c: Cool = s.structured(s.open_channel(None).unwrap()).unwrap();
    c.start(|e| panic!("client channel: {e}")).unwrap();
    // 1.
    c.send(&mut blob(&c, BIG, 1), None).unwrap();
    // 2.
    let m = recv_blob_msg(&mut c);
    assert!(m.is_zero_copy());
    assert_eq!(check_blob(&m, 2), BIG);
    drop(m);
    // 3. An object too large for pool 0 of the app-scope arena: the arena grows by a pool.
    let app = s.arena(Scope::App).unwrap();
    let mut h: ShmHandle<Obj> = app.construct_zeroed().unwrap();
    h.get_mut().unwrap()[..4].copy_from_slice(&OBJ);
    assert_ne!(h.block_ref().pool, 0);
    let lent: LendBlob = s.lend_object(&h).unwrap();
    send_blob(&mut ctl, &lent);
    assert_eq!(recv_u64(&mut ctl), 1, "borrowed");
    drop(h);
    let theirs: ShmHandle<Obj> = s.borrow_object(&recv_blob(&mut ctl)).unwrap();
    assert_eq!(theirs[..4], OBJ);
    drop(theirs);
    send_u64(&mut ctl, 1);
    // 4.
    assert_limit_reached(c.send(&mut blob(&c, HUGE, 6), None));
    c.send(&mut blob(&c, BIG, 3), None).unwrap();
    let m = recv_blob_msg(&mut c);
    assert_eq!(check_blob(&m, 5), 1000);
    drop(m);
    assert!(!s.is_hosed());
    send_u64(&mut ctl, 2);
    assert_eq!(recv_u64(&mut ctl), 3, "the server is done");
}

/// A peer that announces something that is not a pool of the session's arenas (after an honest
/// log-in): the session ends, once, as a protocol error; the server goes on serving.
#[test]
fn a_bad_pool_announcement_ends_the_session_as_a_protocol_error() {
    use flowipc::schemas::session_capnp::master;
    use flowipc::session::Error;
    use flowipc::transport::{Channel, ChannelConfig};
    let dir = RunDir::new();
    let u = universe(&dir.0);
    let server = SessionServer::builder(&u.srv, &u.clients).build().unwrap();
    let cases: [(u8, u32, bool); 3] = [
        (1, 1, false), // an fd that is not a pool
        (7, 1, true),  // an unknown arena
        (0, 1, true),  // a pool of another arena
    ];
    for (kind, index, pool) in cases {
        let chan = Channel::connect(u.srv.socket_path(), ChannelConfig::new()).unwrap();
        let mut c =
            struc::Channel::<master::Owned>::new(chan, flowipc::msg::Backing::Heap).unwrap();
        c.start(|_| {}).unwrap();
        let mut m = c.create_msg();
        honest(&mut m.init_root().init_log_in(), "cli", "srv");
        let rsp = c.sync_request(&mut m, None, T).unwrap();
        assert!(matches!(
            rsp.root().unwrap().which().unwrap(),
            master::LogInRsp(Ok(_))
        ));
        let mut s = server.accept(T).unwrap();
        let (tx, rx) = mpsc::channel();
        s.init_handlers(move |e| {
            let _ = tx.send(e);
        })
        .unwrap();
        let fd: std::os::fd::OwnedFd = if pool {
            let other = shm::Arena::create(shm::ArenaConfig::new().pool_size(POOL)).unwrap();
            other.pool_fd(0).unwrap().try_clone_to_owned().unwrap()
        } else {
            memfd("not a pool").into()
        };
        let mut r = c.create_msg_with_fd(fd);
        let mut res = r.init_root().init_resource();
        res.set_kind(kind);
        res.set_index(index);
        c.send(&mut r, None).unwrap();
        let e = rx.recv_timeout(Duration::from_secs(30)).unwrap();
        assert!(matches!(e, Error::Protocol(_)), "{kind}: {e:?}");
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err(), "once");
        drop((s, c));
    }
    let mut ok = ClientSession::new(&u.cli, &u.srv, |_| {});
    ok.sync_connect().unwrap();
    server.accept(T).unwrap();
}
