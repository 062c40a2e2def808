//! The Structured Message Transport page's scenario, as two processes: a client and a server
//! talking `CoolMsg` (schemas/test_msgs.capnp) over a structured channel whose messages live in
//! shared memory.
//!
//! * The client sends a `helloThere` notification before the server expects it (it is cached,
//!   then delivered when the server calls `expect_msg`).
//! * It asks for a sum with `sync_request` (one-off, blocking).
//! * It asks "hit me with your best shot" with an indefinite `async_request`: the server answers
//!   three times, and the client handles each answer until it undoes the expectation.
//! * It ends sending; the server sees the end and exits.
//!
//! Run: `cargo run --example struc_demo`.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use flowipc::msg::Backing;
use flowipc::schemas::test_msgs_capnp::{cool_msg, CoolMsgKind};
use flowipc::shm::{Arena, ArenaConfig};
use flowipc::struc::{AsyncChannel, Channel, Expect};
use flowipc::transport::{self, ChannelConfig};

type Cool = cool_msg::Owned;
const ENV: &str = "FLOWIPC_STRUC_DEMO_SERVER";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if let Ok(name) = std::env::var(ENV) {
        return server(&name);
    }
    let name = format!("flowipc-struc-demo-{}", std::process::id());
    let listener = UnixListener::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes())?)?;
    let mut child = Command::new(std::env::current_exe()?)
        .env(ENV, &name)
        .spawn()?;
    let (sock, _) = listener.accept()?;
    let r = client(sock);
    let status = child.wait()?;
    println!("client: server exited with {status}");
    r
}

fn structured(sock: UnixStream) -> Result<AsyncChannel<Cool>, Box<dyn std::error::Error>> {
    let arena = Arena::create(ArenaConfig::new().pool_size(64 << 20))?;
    let chan = transport::Channel::from_stream(sock, ChannelConfig::new())?;
    Ok(AsyncChannel::new(Channel::new(chan, Backing::Shm(arena))?)?)
}

fn client(sock: UnixStream) -> Result<(), Box<dyn std::error::Error>> {
    let chan = structured(sock)?;
    chan.start(|e| println!("client: channel error: {e}"))?;

    let mut hello = chan.create_msg();
    let mut h = hello.init_root().init_hello_there();
    h.set_greeting("hello from the client");
    h.set_num(7);
    chan.send(&mut hello, None)?;
    println!("client: sent {hello}");

    let mut req = chan.create_msg();
    let mut sum = req.init_root().init_sum_request();
    sum.set_constant_factor(10);
    let mut terms = sum.init_terms_to_add(3);
    for (i, t) in [1, 2, 3].into_iter().enumerate() {
        terms.set(i as u32, t);
    }
    let rsp = chan.sync_request(&mut req, None, Some(Duration::from_secs(10)))?;
    println!("client: {req} -> {rsp} (zero-copy: {})", rsp.is_zero_copy());

    let (tx, rx) = mpsc::channel();
    let mut hit = chan.create_msg();
    hit.init_root().init_hit_me_with_your_best_shot();
    let id = chan.async_request(&mut hit, None, Expect::Indefinite, move |_, shot| {
        let _ = tx.send(shot.to_string());
    })?;
    for _ in 0..3 {
        println!(
            "client: best shot: {}",
            rx.recv_timeout(Duration::from_secs(10))?
        );
    }
    chan.undo_expect_responses(id)?;

    let (done_tx, done_rx) = mpsc::channel();
    chan.async_end_sending(move |r| {
        let _ = done_tx.send(r.is_ok());
    });
    println!(
        "client: ended sending: {}",
        done_rx.recv_timeout(Duration::from_secs(10))?
    );
    Ok(())
}

fn server(name: &str) -> Result<(), Box<dyn std::error::Error>> {
    let sock = UnixStream::connect_addr(&SocketAddr::from_abstract_name(name.as_bytes())?)?;
    let chan = structured(sock)?;
    let (end_tx, end_rx) = mpsc::channel();
    let error_tx = end_tx.clone();
    // The client's graceful end (no error), after every message it sent before.
    chan.set_peer_end_handler(move |_| {
        println!("server: the client ended its sending");
        let _ = end_tx.send(());
    });
    // Started before any expectation: the early helloThere waits in the cache.
    chan.start(move |e| {
        println!("server: channel error: {e}");
        let _ = error_tx.send(());
    })?;
    std::thread::sleep(Duration::from_millis(100));
    chan.expect_msg(CoolMsgKind::HelloThere, |_, m| {
        println!("server: got (from the cache) {m}");
    })?;
    chan.expect_msgs(CoolMsgKind::SumRequest, |chan, req| {
        let Ok(cool_msg::SumRequest(Ok(r))) = req.which() else {
            return;
        };
        let sum: i64 = r.get_terms_to_add().map(|t| t.iter().sum()).unwrap_or(0);
        let mut rsp = chan.create_msg();
        rsp.init_root()
            .init_sum_response()
            .set_sum(sum * r.get_constant_factor());
        let _ = chan.send(&mut rsp, Some(&req));
    })?;
    chan.expect_msgs(CoolMsgKind::HitMeWithYourBestShot, |chan, req| {
        for n in 1..=3 {
            let mut rsp = chan.create_msg();
            let mut shot = rsp.init_root().init_my_best_shot();
            shot.set_text("take that");
            shot.set_num(n);
            let _ = chan.send(&mut rsp, Some(&req));
        }
    })?;
    end_rx.recv_timeout(Duration::from_secs(30))?;
    Ok(())
}
