//! A user's program: a session server that spawns its client (this program again, in another
//! process), a structured channel the client opens, a request/response, a notification and an
//! fd, ended gracefully. `tests/scenario.rs` runs it.

use flowipc_user_crate::calc_capnp;

use std::io::{Read, Seek, Write};
use std::time::Duration;

use calc_capnp::{msg, MsgKind};
use flowipc::session::{App, ClientApp, ClientSession, ServerApp, SessionServer};

const T: Option<Duration> = Some(Duration::from_secs(10));

fn universe(
    dir: &std::path::Path,
) -> Result<(ServerApp, ClientApp, flowipc::session::ClientApps), flowipc::session::Error> {
    let me = std::env::current_exe().map_err(flowipc::session::Error::Io)?;
    let srv = App {
        exec_path: me.clone(),
        ..App::current("srv")?
    };
    let cli = ClientApp::new(App {
        exec_path: me,
        ..App::current("cli")?
    });
    let server = ServerApp::new(srv, ["cli"]).run_dir(dir);
    let clients = ClientApp::master_set([&cli]);
    Ok((server, cli, clients))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("flowipc-calc-{}", std::process::id()));
    if let Ok(d) = std::env::var("CALC_RUN_DIR") {
        return client(std::path::Path::new(&d));
    }
    std::fs::create_dir_all(&dir)?;
    let (srv, _cli, clients) = universe(&dir)?;
    let server = SessionServer::new(&srv, &clients)?;
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .env("CALC_RUN_DIR", &dir)
        .spawn()?;
    let mut session = server.accept(T)?;
    let (tx, rx) = std::sync::mpsc::channel();
    session.init_handlers_with_passive_open(
        |e| eprintln!("server: session: {e}"),
        move |c, _| {
            let _ = tx.send(c);
        },
    )?;
    let chan = rx.recv_timeout(T.unwrap())?;
    let mut chan = session.structured::<msg::Owned>(chan)?;
    chan.start(|e| eprintln!("server: channel error: {e}"))?;
    chan.expect_msgs(MsgKind::Add, |chan, req| {
        let Ok(msg::Add(Ok(add))) = req.which() else {
            return;
        };
        let mut rsp = chan.create_msg();
        rsp.init_root()
            .init_sum()
            .set_value(add.get_a() + add.get_b());
        chan.send(&mut rsp, Some(&req)).unwrap();
    })?;
    chan.expect_msgs(MsgKind::Note, |_, m| {
        if let Ok(msg::Note(Ok(t))) = m.which() {
            println!("server: note: {}", t.to_str().unwrap_or("?"));
        }
    })?;
    chan.expect_msgs(MsgKind::File, |_, mut m| {
        let mut f = std::fs::File::from(m.take_fd().expect("an fd"));
        let mut s = String::new();
        f.rewind().unwrap();
        f.read_to_string(&mut s).unwrap();
        println!("server: file says {s:?}");
    })?;
    chan.run()?; // until the client ends its sending
    println!("server: the client ended; done");
    drop(chan);
    let status = child.wait()?;
    drop((session, server));
    std::fs::remove_dir_all(&dir)?;
    assert!(status.success());
    Ok(())
}

fn client(dir: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    let (srv, cli, _) = universe(dir)?;
    let mut session = ClientSession::new(&cli, &srv, |e| eprintln!("client: session: {e}"));
    session.sync_connect()?;
    let mut chan = session.structured::<msg::Owned>(session.open_channel(None)?)?;
    chan.start(|e| eprintln!("client: channel error: {e}"))?;
    let mut req = chan.create_msg();
    let mut add = req.init_root().init_add();
    add.set_a(40);
    add.set_b(2);
    let rsp = chan.sync_request(&mut req, None, T)?;
    let msg::Sum(Ok(sum)) = rsp.which()? else {
        panic!("not a sum")
    };
    println!(
        "client: 40 + 2 = {} (zero-copy: {})",
        sum.get_value(),
        rsp.is_zero_copy()
    );
    let mut note = chan.create_msg();
    note.init_root().set_note("hello from the client");
    chan.send(&mut note, None)?;
    let mut file = tempfile()?;
    file.write_all(b"behind the fd")?;
    let mut m = chan.create_msg();
    m.init_root().set_file(());
    chan.send_with_fd(&mut m, None, Some(std::os::fd::AsFd::as_fd(&file)))?;
    assert!(chan.end_sending_blocking(T)?);
    Ok(())
}

fn tempfile() -> std::io::Result<std::fs::File> {
    let p = std::env::temp_dir().join(format!("flowipc-calc-file-{}", std::process::id()));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)?;
    std::fs::remove_file(&p)?;
    Ok(f)
}
