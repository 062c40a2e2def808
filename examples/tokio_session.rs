//! The Sessions page's tutorial in async form (feature `tokio`): one program, two processes.
//! Run without arguments it starts itself again as the server (`tokio_session server`) and
//! plays the client: connects (retrying while the server is absent), opens a channel, makes it
//! structured (zero-copy, in the session's shared memory), sends requests and awaits their
//! responses, and reads the server's notifications as a stream. Everything runs on
//! current-thread tokio runtimes: neither process has a thread of the library's.
//!
//! ```text
//! cargo run --features tokio --example tokio_session
//! ```
//!
//! `FLOWIPC_RUN_DIR=<dir>`: use that run dir (default: a new one under /tmp).

use std::path::PathBuf;
use std::time::Duration;

use flowipc::schemas::test_msgs_capnp::cool_msg;
use flowipc::session::{App, ClientApp, ClientApps, Error, ServerApp};
use flowipc::struc::MsgType;
use flowipc::tokio::{Channel, ClientSession, SessionServer};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// The universe: this program is both apps (`tok_srv` serves `tok_cli`).
fn universe(dir: PathBuf) -> Result<(ServerApp, ClientApp, ClientApps)> {
    let client = ClientApp::new(App::current("tok_cli")?);
    let server = ServerApp::new(App::current("tok_srv")?, ["tok_cli"]).run_dir(dir);
    let clients = ClientApp::master_set([&client]);
    Ok((server, client, clients))
}

fn main() -> Result<()> {
    let server_role = std::env::args().nth(1).as_deref() == Some("server");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if server_role {
        let dir = PathBuf::from(std::env::var_os("FLOWIPC_RUN_DIR").ok_or("no run dir")?);
        return rt.block_on(serve(dir));
    }
    let (dir, made) = match std::env::var_os("FLOWIPC_RUN_DIR") {
        Some(d) => (PathBuf::from(d), false),
        None => (
            std::env::temp_dir().join(format!("fipc-tokio-{}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&dir)?;
    let mut server = std::process::Command::new(std::env::current_exe()?)
        .arg("server")
        .env("FLOWIPC_RUN_DIR", &dir)
        .spawn()?;
    let r = rt.block_on(client(dir.clone()));
    // The server ends with its session (it sees the client go).
    let status = server.wait()?;
    if made {
        let _ = std::fs::remove_dir(&dir);
    }
    r?;
    if !status.success() {
        return Err(format!("server: {status}").into());
    }
    Ok(())
}

async fn client(dir: PathBuf) -> Result<()> {
    let (srv, cli, _) = universe(dir)?;
    let mut session = ClientSession::new(&cli, &srv, |e| println!("client: session over: {e}"));
    // The page's retry loop: the server may not run yet.
    loop {
        match session.connect().await {
            Ok(()) => break,
            Err(Error::ServerAbsent(_)) => {
                println!("client: server absent, retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    println!("client: session with {}", session.peer_app());
    // Open a channel; make it structured, in the session's arena.
    let chan =
        Channel::new(session.structured::<cool_msg::Owned>(session.open_channel(None).await?)?)?;
    let mut hellos = chan.messages(MsgType::of::<cool_msg::Owned>("helloThere")?)?;
    chan.start(|e| println!("client: channel over: {e}"))?;
    for factor in [1, 2] {
        let mut req = chan.create_msg();
        let mut r = req.init_root().init_sum_request();
        r.set_constant_factor(factor);
        let mut terms = r.init_terms_to_add(3);
        for (i, t) in [1, 2, 3].into_iter().enumerate() {
            terms.set(i as u32, t);
        }
        let rsp = chan
            .request(&mut req, None, Some(Duration::from_secs(10)))
            .await?;
        if let cool_msg::SumResponse(Ok(s)) = rsp.root()?.which()? {
            println!(
                "client: sum = {} (zero-copy: {})",
                s.get_sum(),
                rsp.is_zero_copy()
            );
        }
    }
    // The server's notifications, as a stream.
    for _ in 0..2 {
        let m = hellos.recv().await.ok_or("the channel ended")?;
        if let cool_msg::HelloThere(Ok(h)) = m.root()?.which()? {
            println!("client: hello {} from the server", h.get_num());
        }
    }
    Ok(())
}

async fn serve(dir: PathBuf) -> Result<()> {
    let (srv, _, clients) = universe(dir)?;
    let server = SessionServer::new(&srv, &clients)?;
    let mut session = server.accept().await?;
    println!("server: session with {}", session.client_app().name);
    let (ended_tx, mut ended) = tokio::sync::mpsc::unbounded_channel();
    let (chan_tx, mut channels) = tokio::sync::mpsc::unbounded_channel();
    session.init_handlers_with_passive_open(
        move |e| {
            let _ = ended_tx.send(e);
        },
        move |chan, _| {
            let _ = chan_tx.send(chan);
        },
    )?;
    let raw = channels.recv().await.ok_or("no channel")?;
    let chan = Channel::new(session.structured::<cool_msg::Owned>(raw)?)?;
    // Each sumRequest is answered from its handler (in the channel's task).
    chan.expect_msgs(MsgType::of::<cool_msg::Owned>("sumRequest")?, |c, req| {
        let Ok(cool_msg::SumRequest(Ok(r))) = req.root().and_then(|r| Ok(r.which()?)) else {
            return;
        };
        let sum: i64 = r.get_terms_to_add().map(|t| t.iter().sum()).unwrap_or(0);
        let mut rsp = c.create_msg();
        rsp.init_root()
            .init_sum_response()
            .set_sum(sum * r.get_constant_factor());
        let _ = c.send(&mut rsp, Some(&req));
    })?;
    chan.start(|e| println!("server: channel over: {e}"))?;
    for n in [1, 2] {
        let mut m = chan.create_msg();
        m.init_root().init_hello_there().set_num(n);
        chan.send(&mut m, None)?;
    }
    let e = ended.recv().await.ok_or("no end")?;
    println!("server: session over: {e}");
    Ok(())
}
