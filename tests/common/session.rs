//! Session test support: a unique run dir per test, the universe of apps, connecting.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flowipc::session::{
    App, ClientApp, ClientApps, ClientSession, ConnectOptions, Error, ServerApp, SessionServer,
    MAX_PENDING_LOG_INS,
};

use flowipc::schemas::session_capnp::log_in;

use super::dev_shm_leftovers;

pub const T: Option<Duration> = Some(Duration::from_secs(30));
pub const DIR_ENV: &str = "FLOWIPC_TEST_RUN_DIR";
/// A unique run dir for one test, removed when dropped (even after a failure).
pub struct RunDir(pub PathBuf);

impl RunDir {
    pub fn new() -> RunDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = PathBuf::from(format!(
            "/tmp/fipc-t{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir(&p).unwrap();
        RunDir(p)
    }

    pub fn entries(&self) -> Vec<String> {
        entries(&self.0)
    }

    pub fn env(&self) -> [(&'static str, &std::ffi::OsStr); 1] {
        [(DIR_ENV, self.0.as_os_str())]
    }
}

impl Drop for RunDir {
    /// Removes the dir; and unless the test failed already, checks that nothing was left in it
    /// (every test drops its servers first: the dir is declared first, dropped last) nor in
    /// /dev/shm.
    fn drop(&mut self) {
        let left = std::fs::read_dir(&self.0).map(|d| d.count()).unwrap_or(0);
        let _ = std::fs::remove_dir_all(&self.0);
        if !std::thread::panicking() {
            assert_eq!(left, 0, "files left in the run dir {}", self.0.display());
            assert_eq!(dev_shm_leftovers(), Vec::<String>::new());
        }
    }
}

pub fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// In a child: the run dir the parent gave.
pub fn env_dir() -> PathBuf {
    PathBuf::from(std::env::var_os(DIR_ENV).expect("run dir in the environment"))
}

/// The universe: a server app `srv` that accepts `cli` and `other`; `stranger` is known but not
/// allowed. All are this test binary (tests cannot run as other users or programs).
pub struct Universe {
    pub srv: ServerApp,
    pub cli: ClientApp,
    pub other: ClientApp,
    pub stranger: ClientApp,
    pub clients: ClientApps,
}

pub fn universe(dir: &Path) -> Universe {
    let srv = ServerApp::new(App::current("srv").unwrap(), ["cli", "other"]).run_dir(dir);
    let cli = ClientApp::new(App::current("cli").unwrap());
    let other = ClientApp::new(App::current("other").unwrap());
    let stranger = ClientApp::new(App::current("stranger").unwrap());
    let clients = ClientApp::master_set([&cli, &other, &stranger]);
    Universe {
        srv,
        cli,
        other,
        stranger,
        clients,
    }
}

/// Fills a hand-made log-in request as the real client would (this process, app `app`,
/// SHM-classic over sockets, fds on).
pub fn honest(l: &mut log_in::Builder<'_>, app: &str, server: &str) {
    let (uid, gid) = (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    );
    l.set_protocol_version(1);
    l.set_client_app(app);
    l.set_server_app(server);
    l.set_pid(std::process::id() as i32);
    l.set_uid(uid);
    l.set_gid(gid);
    let mut c = l.reborrow().init_config();
    c.set_shm_kind(1);
    c.set_native_handles(true);
}

/// Connects, retrying while the server is absent (the page's loop), for up to 30 s.
/// Returns how many times the server was absent.
pub fn connect(s: &mut ClientSession, opts: ConnectOptions) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut absent = 0;
    loop {
        match s.sync_connect_with(opts.clone()) {
            Ok(()) => return absent,
            Err(Error::ServerAbsent(_)) if Instant::now() < deadline => {
                absent += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("connect: {e}"),
        }
    }
}

/// The variable that tells a child the channel kind of its sessions (`socket`, `shm_queue`,
/// `posix_mq`).
pub const KIND_ENV: &str = "FLOWIPC_TEST_KIND";

/// Every channel kind, by the name `KIND_ENV` carries.
pub const KINDS: [(&str, flowipc::transport::ChannelKind); 3] = [
    ("socket", flowipc::transport::ChannelKind::SocketStream),
    ("shm_queue", flowipc::transport::ChannelKind::ShmQueue),
    ("posix_mq", flowipc::transport::ChannelKind::PosixMq),
];

/// In a child: the channel kind the parent gave (see [`KIND_ENV`]).
pub fn env_kind() -> flowipc::transport::ChannelKind {
    let k = std::env::var(KIND_ENV).expect("kind in the environment");
    KINDS.iter().find(|(n, _)| *n == k).expect("known kind").1
}

/// A session's life across processes, over each channel kind: the `server` role says 1 when
/// it serves, the `client` role says 2 when done and waits; the client is killed; the server
/// says 3 once it saw the end, and exits cleanly.
pub fn life_over_every_kind(server: &str, client: &str) {
    use std::io::Read;
    for (name, _) in KINDS {
        let dir = RunDir::new();
        let mut env = dir.env().to_vec();
        env.push((KIND_ENV, std::ffi::OsStr::new(name)));
        let mut srv = super::spawn_env(server, &env);
        assert_eq!(super::recv_u64(&mut srv.sock), 1, "{name}: server ready");
        let mut cli = super::spawn_env(client, &env);
        let mut b = [0u8; 8];
        if cli.sock.read_exact(&mut b).is_err() {
            panic!("{name}: client failed: {:?}", cli.child.wait());
        }
        assert_eq!(u64::from_le_bytes(b), 2, "{name}: client done");
        // The client dies without a word: the server learns it, once.
        cli.child.kill().unwrap();
        cli.child.wait().unwrap();
        if srv.sock.read_exact(&mut b).is_err() {
            panic!("{name}: server failed: {:?}", srv.child.wait());
        }
        assert_eq!(u64::from_le_bytes(b), 3, "{name}: server saw the end once");
        super::wait_ok(srv);
    }
}

/// Holds `MAX_PENDING_LOG_INS + beyond` connections to `server`'s socket that never say a word
/// while `client` logs in, and checks that it gets its session, that the oldest silent ones
/// were dropped to make room (reported to accept as log-in timeouts, their connections closed)
/// and that they cost the process no thread. Returns how many log-in timeouts accept reported.
pub fn log_in_among_silent(
    u: &Universe,
    server: &SessionServer,
    mut client: ClientSession,
    beyond: usize,
) -> usize {
    use std::io::Read;
    super::balance::start_library_thread();
    let before = super::balance::threads();
    let n = MAX_PENDING_LOG_INS + beyond;
    let mut silent: Vec<std::os::unix::net::UnixStream> = (0..n)
        .map(|_| std::os::unix::net::UnixStream::connect(u.srv.socket_path()).unwrap())
        .collect();
    client.sync_connect().unwrap();
    let mut timeouts = 0;
    let s = loop {
        match server.accept(T) {
            Ok(s) => break s,
            Err(Error::LogInTimeout) => timeouts += 1,
            Err(e) => panic!("{e:?}"),
        }
    };
    assert_eq!(s.client_app().name, "cli");
    assert!(
        timeouts >= beyond,
        "only {timeouts} of {n} silent connections made room"
    );
    assert_eq!(
        super::balance::threads(),
        before,
        "{n} silent connections cost no thread"
    );
    // The dropped ones were closed: the oldest see the end of their stream.
    let mut b = [0u8; 1];
    silent[0]
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(silent[0].read(&mut b).unwrap(), 0);
    drop((s, client, silent));
    timeouts
}
