//! The Sessions page's tutorial, client side: connects to `session_server` (retrying while it
//! is absent, as the page recommends), opens a channel with metadata, and exchanges structured
//! messages in the session's shared memory.
//!
//! ```text
//! cargo run --example session_server     # first, or later: the client waits for it
//! cargo run --example session_client
//! ```

#[path = "universe/mod.rs"]
mod universe;

use std::time::Duration;

use flowipc::schemas::test_msgs_capnp::{channel_mdt, cool_msg};
use flowipc::session::{ClientSession, Error, Metadata};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let u = universe::build()?;
    let mut session = ClientSession::new(&u.client, &u.server, |e| {
        println!("client: session over: {e}");
    });
    // The server may not be running yet: sync_connect says so at once; retry in a while.
    let mut waited = Duration::ZERO;
    loop {
        match session.sync_connect() {
            Ok(()) => break,
            Err(Error::ServerAbsent(_)) if waited < Duration::from_secs(60) => {
                if waited.is_zero() {
                    println!("client: server absent, retrying every 250 ms");
                }
                std::thread::sleep(Duration::from_millis(250));
                waited += Duration::from_millis(250);
            }
            Err(e) => return Err(e.into()),
        }
    }
    println!("client: session open with {}", session.peer_app());

    let mdt = Metadata::build::<channel_mdt::Owned>(|mut m| {
        m.set_purpose("tutorial");
        m.set_n(1);
    })?;
    let mut chan = session.structured::<cool_msg::Owned>(session.open_channel(Some(&mdt))?)?;
    chan.start(|e| println!("client: channel over: {e}"))?;
    let timeout = Some(Duration::from_secs(10));

    let mut hello = chan.create_msg();
    {
        let mut h = hello.init_root().init_hello_there();
        h.set_greeting("hello there");
        h.set_num(41);
    }
    let rsp = chan.sync_request(&mut hello, None, timeout)?;
    if let cool_msg::HelloThere(Ok(h)) = rsp.which()? {
        println!(
            "client: server says {:?}, {} (zero-copy: {})",
            h.get_greeting()?.to_str()?,
            h.get_num(),
            rsp.is_zero_copy()
        );
    }

    let mut req = chan.create_msg();
    {
        let mut s = req.init_root().init_sum_request();
        s.set_constant_factor(2);
        let mut terms = s.init_terms_to_add(3);
        for (i, t) in [1, 2, 3].into_iter().enumerate() {
            terms.set(i as u32, t);
        }
    }
    let rsp = chan.sync_request(&mut req, None, timeout)?;
    if let cool_msg::SumResponse(Ok(s)) = rsp.which()? {
        println!("client: sum = {}", s.get_sum());
    }
    Ok(())
}
