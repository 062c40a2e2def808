//! Session test support: a unique run dir per test, the universe of apps, connecting.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flowipc::session::{
    App, ClientApp, ClientApps, ClientSession, ConnectOptions, Error, ServerApp,
};

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
