//! The IPC universe description: which applications exist, which are servers and which clients.

use std::collections::{BTreeSet, HashMap};
use std::ops::Deref;
use std::path::{Path, PathBuf};

use super::Error;

/// An application of the IPC universe: its name (the key everything else uses), the path of its
/// executable, and the effective user and group it runs as.
///
/// Build the whole universe description in one place (a function or a constant in code both
/// applications share) so that both sides see the same values: a mismatch makes log-in fail.
///
/// ```
/// use flowipc::session::App;
/// let a = App::new("a", "/usr/bin/app_a", 1000, 1000);
/// assert_eq!(a.name, "a");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct App {
    /// Short, unique name: letters, digits, `_`, `-` and `.`, at most 64 bytes, not starting
    /// with `.` (it names files in the run dir).
    pub name: String,
    /// The executable's path, as `/proc/<pid>/exe` shows it once symbolic links are resolved.
    pub exec_path: PathBuf,
    /// Effective user id.
    pub uid: u32,
    /// Effective group id.
    pub gid: u32,
}

impl App {
    /// An application.
    pub fn new(name: impl Into<String>, exec_path: impl Into<PathBuf>, uid: u32, gid: u32) -> App {
        App {
            name: name.into(),
            exec_path: exec_path.into(),
            uid,
            gid,
        }
    }

    /// This process as application `name`: its executable and its effective ids (for a universe
    /// whose apps are known only at run time, and for tests).
    pub fn current(name: impl Into<String>) -> Result<App, Error> {
        let exe = std::env::current_exe().map_err(Error::Io)?;
        let (uid, gid) = crate::sys::effective_ids();
        Ok(App::new(name, exe, uid, gid))
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        let n = &self.name;
        let ok = !n.is_empty()
            && n.len() <= 64
            && !n.starts_with('.')
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
        if ok {
            Ok(())
        } else {
            Err(Error::BadAppName(n.clone()))
        }
    }
}

/// An [`App`] in the session-client role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientApp {
    /// The application.
    pub app: App,
}

impl ClientApp {
    /// `app` as a client.
    pub fn new(app: App) -> ClientApp {
        ClientApp { app }
    }

    /// The master set of client apps, keyed by name (what a [`SessionServer`] is given).
    ///
    /// [`SessionServer`]: super::SessionServer
    pub fn master_set<'a>(apps: impl IntoIterator<Item = &'a ClientApp>) -> ClientApps {
        apps.into_iter()
            .map(|c| (c.app.name.clone(), c.clone()))
            .collect()
    }
}

impl Deref for ClientApp {
    type Target = App;
    fn deref(&self) -> &App {
        &self.app
    }
}

/// Every client app of the universe, by name.
pub type ClientApps = HashMap<String, ClientApp>;

/// Who may use the files a server puts in its run dir (the Unix socket clients connect to, the
/// PID file).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Permissions {
    /// The server's user only (socket `0600`): all apps run as one user.
    #[default]
    User,
    /// The server's user and group (socket `0660`).
    Group,
    /// Anyone (socket `0666`); the log-in checks still apply.
    Unrestricted,
}

impl Permissions {
    pub(crate) fn socket_mode(self) -> u32 {
        match self {
            Permissions::User => 0o600,
            Permissions::Group => 0o660,
            Permissions::Unrestricted => 0o666,
        }
    }

    pub(crate) fn pid_file_mode(self) -> u32 {
        match self {
            Permissions::User => 0o600,
            Permissions::Group => 0o640,
            Permissions::Unrestricted => 0o644,
        }
    }

    pub(crate) fn dir_mode(self) -> u32 {
        match self {
            Permissions::User => 0o700,
            Permissions::Group => 0o750,
            Permissions::Unrestricted => 0o755,
        }
    }
}

/// An [`App`] in the session-server role: the client apps allowed to open sessions with it, where
/// it keeps its PID file and socket, and who may use them.
///
/// ```
/// use flowipc::session::{App, Permissions, ServerApp};
/// let srv = ServerApp::new(App::new("a", "/usr/bin/app_a", 1000, 1000), ["b"])
///     .run_dir("/tmp/my-universe")
///     .permissions(Permissions::Group);
/// assert_eq!(srv.socket_path(), std::path::Path::new("/tmp/my-universe/a.sock"));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerApp {
    /// The application.
    pub app: App,
    /// Names of the client apps that may open sessions with it.
    pub allowed_client_apps: BTreeSet<String>,
    /// Where the PID file and the socket live (`None`: [`default_run_dir`]).
    pub run_dir: Option<PathBuf>,
    /// Who may use them.
    pub permissions: Permissions,
}

impl ServerApp {
    /// `app` as a server that accepts the client apps named in `allowed`, in the default run dir,
    /// with [`Permissions::User`].
    pub fn new(app: App, allowed: impl IntoIterator<Item = impl Into<String>>) -> ServerApp {
        ServerApp {
            app,
            allowed_client_apps: allowed.into_iter().map(Into::into).collect(),
            run_dir: None,
            permissions: Permissions::User,
        }
    }

    /// Overrides the run dir (an absolute path; created if missing).
    pub fn run_dir(mut self, dir: impl Into<PathBuf>) -> ServerApp {
        self.run_dir = Some(dir.into());
        self
    }

    /// Sets who may use the run dir's files.
    pub fn permissions(mut self, p: Permissions) -> ServerApp {
        self.permissions = p;
        self
    }

    /// The run dir in effect.
    pub fn resolved_run_dir(&self) -> PathBuf {
        self.run_dir.clone().unwrap_or_else(default_run_dir)
    }

    /// The PID file: `<run dir>/<name>.pid`, `flock`ed by the one live server.
    pub fn pid_file(&self) -> PathBuf {
        self.resolved_run_dir()
            .join(format!("{}.pid", self.app.name))
    }

    /// The Unix socket clients connect to: `<run dir>/<name>.sock`.
    pub fn socket_path(&self) -> PathBuf {
        self.resolved_run_dir()
            .join(format!("{}.sock", self.app.name))
    }
}

impl Deref for ServerApp {
    type Target = App;
    fn deref(&self) -> &App {
        &self.app
    }
}

/// The default run dir: `$XDG_RUNTIME_DIR/flowipc` when that variable names an absolute path,
/// else `/tmp/flowipc-<euid>`. Never a path only root may write.
pub fn default_run_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(x) if Path::new(&x).is_absolute() => PathBuf::from(x).join("flowipc"),
        _ => PathBuf::from(format!("/tmp/flowipc-{}", crate::sys::effective_ids().0)),
    }
}

/// Longest path a Unix socket address holds (`sun_path` less its terminating NUL).
pub(crate) const MAX_SOCKET_PATH: usize = 107;
