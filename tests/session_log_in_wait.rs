//! A log-in that waits longer than the session keep-alive's ping interval waits without
//! spinning, on both sides. (Found by fuzzing `login_client` on one vCPU: the log-in channel
//! had the session's keep-alive, whose timers the log-in never ran, so once the first ping was
//! due its deadline stayed in the past and every wait returned at once, until the answer or the
//! log-in timeout. A slow server's client, and a server holding a silent connection, spun.)
//!
//! Each test compares CPU time with the time it waited: a spin would burn the whole wait.
//! (Also found there: a server that ended its sending before the log-in was whole left the
//! client spinning on its socket's end until the log-in timeout; now that is the server gone.)

mod common;

use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::session::{universe, RunDir};
use flowipc::session::{ClientSession, Error, SessionConfig, SessionServer};
use flowipc::transport::{self, ChannelConfig};
use nix::sys::resource::{getrusage, UsageWho};

/// One test at a time: the server's check counts the whole process's CPU time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A ping every 5 ms, no idle timeout to speak of, and a log-in timeout of 600 ms.
fn config() -> SessionConfig {
    SessionConfig::new()
        .with_keep_alive(Some((Duration::from_millis(5), Duration::from_secs(600))))
        .with_log_in_timeout(Duration::from_millis(600))
}

fn cpu(who: UsageWho) -> Duration {
    let u = getrusage(who).unwrap();
    let d =
        |t: nix::sys::time::TimeVal| Duration::new(t.tv_sec() as u64, t.tv_usec() as u32 * 1000);
    d(u.user_time()) + d(u.system_time())
}

/// Runs `wait`, and asserts it took at least `at_least` and that `who` spent under a quarter
/// of that on the CPU meanwhile.
fn waits_quietly(who: UsageWho, at_least: Duration, wait: impl FnOnce()) {
    let (t0, c0) = (Instant::now(), cpu(who));
    wait();
    let (waited, spent) = (t0.elapsed(), cpu(who) - c0);
    assert!(waited >= at_least, "waited only {waited:?}");
    assert!(
        spent < waited / 4,
        "{spent:?} of CPU time over a wait of {waited:?}: a spin"
    );
}

/// The client, waiting for an answer that does not come: a "server" (this process, with the
/// server app's socket and PID file) that accepts the connection and says nothing. The log-in ends by its timeout, reported as such.
#[test]
fn a_client_waiting_for_its_answer_does_not_spin() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = RunDir::new();
    let u = universe(&dir.0);
    let listener = UnixListener::bind(u.srv.socket_path()).unwrap();
    std::fs::write(u.srv.pid_file(), std::process::id().to_string()).unwrap();
    let mut client = ClientSession::new(&u.cli, &u.srv, |_| {}).config(config());
    waits_quietly(UsageWho::RUSAGE_THREAD, Duration::from_millis(600), || {
        let r = client.sync_connect();
        assert!(matches!(r, Err(Error::LogInTimeout)), "{r:?}");
    });
    // The connection was made and is closed now.
    let (mut conn, _) = listener.accept().unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut conn, &mut rest).unwrap();
    assert!(!rest.is_empty(), "the client's log-in request");
    std::fs::remove_file(u.srv.pid_file()).unwrap();
    std::fs::remove_file(u.srv.socket_path()).unwrap();
}

/// The server, holding a connection that never logs in: its library thread waits for the
/// log-in timeout, which `accept` reports.
#[test]
fn a_server_holding_a_silent_connection_does_not_spin() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = RunDir::new();
    let u = universe(&dir.0);
    let server = SessionServer::builder(&u.srv, &u.clients)
        .config(config())
        .build()
        .unwrap();
    let silent = UnixStream::connect(u.srv.socket_path()).unwrap();
    waits_quietly(UsageWho::RUSAGE_SELF, Duration::from_millis(500), || {
        let r = server.accept(Some(Duration::from_secs(30)));
        assert!(matches!(r, Err(Error::LogInTimeout)), "{r:?}");
    });
    drop((silent, server));
    assert!(dir.entries().is_empty(), "left behind: {:?}", dir.entries());
}

/// A "server" that ends its sending gracefully (the END frame) and closes, before answering:
/// the log-in fails at once as the server's absence, not by its timeout (30 s here), and the
/// socket's end, readable for good, is not waited on.
#[test]
fn a_server_that_ends_before_answering_is_absent_at_once() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = RunDir::new();
    let u = universe(&dir.0);
    let listener = UnixListener::bind(u.srv.socket_path()).unwrap();
    std::fs::write(u.srv.pid_file(), std::process::id().to_string()).unwrap();
    let server = std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        let cfg = ChannelConfig::new().with_max_frame(4 << 20);
        let mut chan = transport::Channel::from_stream(conn, cfg).unwrap();
        assert!(chan
            .end_sending_blocking(Some(Duration::from_secs(10)))
            .unwrap());
    });
    let cfg = config().with_log_in_timeout(Duration::from_secs(30));
    let mut client = ClientSession::new(&u.cli, &u.srv, |_| {}).config(cfg);
    let (t0, c0) = (Instant::now(), cpu(UsageWho::RUSAGE_THREAD));
    let r = client.sync_connect();
    assert!(matches!(r, Err(Error::ServerAbsent(_))), "{r:?}");
    let spent = cpu(UsageWho::RUSAGE_THREAD) - c0;
    assert!(
        spent < Duration::from_secs(1),
        "{spent:?} of CPU over {:?}",
        t0.elapsed()
    );
    server.join().unwrap();
    std::fs::remove_file(u.srv.pid_file()).unwrap();
    std::fs::remove_file(u.srv.socket_path()).unwrap();
}
