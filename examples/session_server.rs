//! The Sessions page's tutorial, server side: a session server that accepts clients, and in
//! each session answers the structured messages of the channels the client opens (zero-copy, in
//! the session's shared memory).
//!
//! Run it, then `session_client` (in another terminal, or with `--once` and the client after):
//!
//! ```text
//! cargo run --example session_server            # serves until killed
//! cargo run --example session_client
//! ```
//!
//! `--once`: exit after the first session ends. `FLOWIPC_RUN_DIR=<dir>`: use that run dir.

#[path = "universe/mod.rs"]
mod universe;

use std::sync::mpsc;
use std::time::Duration;

use flowipc::msg::MsgIn;
use flowipc::schemas::test_msgs_capnp::{channel_mdt, cool_msg, CoolMsgKind};
use flowipc::session::{Error, ServerSession, SessionServer};
use flowipc::transport;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let once = std::env::args().any(|a| a == "--once");
    let u = universe::build()?;
    let server = SessionServer::new(&u.server, &u.clients)?;
    println!(
        "server: {} listening on {}",
        u.server.name,
        server.socket_path().display()
    );
    loop {
        // Await an opened session. A failed log-in is reported here too; the server goes on.
        let mut session = match server.accept(None) {
            Ok(s) => s,
            Err(Error::LogInRejected { reason, detail }) => {
                eprintln!("server: log-in rejected ({reason:?}): {detail}");
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        println!("server: session with {}", session.client_app().name);
        let (ended_tx, ended_rx) = mpsc::channel();
        let (chan_tx, chan_rx) = mpsc::channel();
        session.init_handlers_with_passive_open(
            move |e| {
                let _ = ended_tx.send(e);
            },
            move |chan, mdt| {
                let _ = chan_tx.send((chan, mdt));
            },
        )?;
        let worker = std::thread::spawn(move || go_do_ipc_yay(session, chan_rx, ended_rx));
        if once {
            worker.join().expect("session thread")?;
            return Ok(());
        }
    }
}

/// Serves one session until it ends: each channel the client opens is answered on its own
/// thread.
fn go_do_ipc_yay(
    session: ServerSession,
    channels: mpsc::Receiver<(transport::Channel, Option<flowipc::session::Metadata>)>,
    ended: mpsc::Receiver<Error>,
) -> Result<(), Error> {
    let mut workers = Vec::new();
    loop {
        if let Ok(e) = ended.try_recv() {
            println!("server: session over: {e}");
            break;
        }
        let Ok((chan, mdt)) = channels.recv_timeout(Duration::from_millis(50)) else {
            continue;
        };
        let purpose = mdt
            .as_ref()
            .and_then(|m| m.read::<channel_mdt::Owned>().ok())
            .and_then(|r| r.get().ok()?.get_purpose().ok()?.to_string().ok())
            .unwrap_or_default();
        println!("server: channel opened for {purpose:?}");
        let chan = session.structured::<cool_msg::Owned>(chan)?;
        workers.push(std::thread::spawn(move || answer(chan)));
    }
    for w in workers {
        let _ = w.join();
    }
    Ok(())
}

/// Answers `helloThere` with a `helloThere` and `sumRequest` with its `sumResponse`, until the
/// client ends the channel.
fn answer(mut chan: flowipc::struc::Channel<cool_msg::Owned>) {
    let hello = |chan: &mut flowipc::struc::Channel<cool_msg::Owned>,
                 req: MsgIn<cool_msg::Owned>| {
        let Ok(cool_msg::HelloThere(Ok(h))) = req.which() else {
            return;
        };
        let mut rsp = chan.create_msg();
        let mut r = rsp.init_root().init_hello_there();
        r.set_greeting("hello yourself");
        r.set_num(h.get_num() + 1);
        let _ = chan.send(&mut rsp, Some(&req));
    };
    let sum = |chan: &mut flowipc::struc::Channel<cool_msg::Owned>, req: MsgIn<cool_msg::Owned>| {
        let Ok(cool_msg::SumRequest(Ok(r))) = req.which() else {
            return;
        };
        let terms: i64 = r.get_terms_to_add().map(|t| t.iter().sum()).unwrap_or(0);
        let mut rsp = chan.create_msg();
        rsp.init_root()
            .init_sum_response()
            .set_sum(terms * r.get_constant_factor());
        let _ = chan.send(&mut rsp, Some(&req));
    };
    if chan.expect_msgs(CoolMsgKind::HelloThere, hello).is_err()
        || chan.expect_msgs(CoolMsgKind::SumRequest, sum).is_err()
        || chan
            .start(|e| println!("server: channel over: {e}"))
            .is_err()
    {
        return;
    }
    let _ = chan.run();
}
