//! The server's side of a log-in: [`LogIn`], one client's log-in on the library thread, from
//! its connection to a [`ServerSession`] (or the error the accept calls report), and the
//! checks and provisions it makes.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::core::Master;
use super::lends::Lends;
use super::proto::{self, LogInReq};
use super::server::{Accepted, ServerSession, Shared, MAX_INIT_CHANNELS};
use super::{ClientApp, Error, InitChannels, Metadata, Rejection, Session, ShmKind};
use crate::msg::{Backing, MsgIn};
use crate::poll::{Interest, Pollable};
use crate::reactor::{Source, Wait};
use crate::shm::Arena;
use crate::struc::{self, MsgType};
use crate::sync::lock;
use crate::sys;
use crate::transport;

/// Where a log-in is.
enum Phase {
    /// Waiting for the client's log-in request.
    Waiting {
        core: Box<struc::Channel<Master>>,
        creds: sys::PeerCred,
    },
    /// Rejected: writing the answer (until written, or the deadline), then reporting `error`.
    Telling {
        core: Box<struc::Channel<Master>>,
        error: Error,
    },
}

/// What a turn of a log-in came to. (Moved once per turn, never stored: boxing the larger
/// variant would only add an allocation.)
#[allow(clippy::large_enum_variant)]
enum Step {
    Next(Phase),
    Done(Accepted),
}

/// One client's log-in, a source on the library thread: it waits for the log-in request (up to
/// the log-in timeout), answers it, and files the result for the accept calls. Its place on the
/// library thread is kept in the server's `logins`, under `id`, and given up when it is done.
pub(super) struct LogIn {
    shared: Arc<Shared>,
    id: u64,
    deadline: Instant,
    /// The message awaited, and those that may not come first (nothing else is cached, however
    /// much is sent): looked up once, not at every turn.
    log_in_type: MsgType,
    others: Vec<MsgType>,
    phase: Mutex<Option<Phase>>,
}

impl LogIn {
    /// A log-in on `stream`, just accepted; `Err`: the log-in's error at once.
    pub(super) fn new(shared: Arc<Shared>, id: u64, stream: UnixStream) -> Result<LogIn, Error> {
        // The connecting process as the kernel saw it (a connection accepted from the
        // listening socket: its `SO_PEERCRED` is the client's own, unlike a socketpair's).
        let creds = sys::peer_credentials(stream.as_fd()).map_err(Error::Io)?;
        let cfg = &shared.config;
        let chan = transport::Channel::from_stream(stream, cfg.log_in_config())?;
        let mut core = struc::Channel::<Master>::new(chan, Backing::Heap)?;
        core.start(|_| {})?;
        let deadline = Instant::now() + cfg.log_in_timeout();
        let log_in_type = MsgType::of::<Master>("logIn")?;
        let others = proto::types(&["logInRsp", "resource", "openChannel", "openChannelRsp"])?;
        Ok(LogIn {
            shared,
            id,
            deadline,
            log_in_type,
            others,
            phase: Mutex::new(Some(Phase::Waiting {
                core: Box::new(core),
                creds,
            })),
        })
    }

    /// The log-in is over: its result goes to the accept calls, its place on the library
    /// thread is given up.
    fn done(&self, result: Accepted) {
        self.shared.log_in_done(result);
        let reg = lock(&self.shared.logins).remove(&self.id);
        drop(reg);
    }

    /// Drops this log-in if it is still waiting for its request (a silent connection, making
    /// room for a new one): its connection is closed, its end reported as a log-in timeout.
    /// Returns whether it did.
    pub(super) fn evict(&self) -> bool {
        let Ok(mut slot) = self.phase.try_lock() else {
            return false; // its turn is running: not idle
        };
        if !matches!(*slot, Some(Phase::Waiting { .. })) {
            return false;
        }
        *slot = None;
        drop(slot);
        self.done(Err(Error::LogInTimeout));
        true
    }

    /// A step of waiting for the request.
    fn wait(&self, mut core: Box<struc::Channel<Master>>, creds: sys::PeerCred) -> Step {
        match proto::poll_for(&mut core, self.log_in_type, &self.others) {
            Err(e) => Step::Done(Err(e)),
            Ok(None) if Instant::now() >= self.deadline => Step::Done(Err(Error::LogInTimeout)),
            Ok(None) => Step::Next(Phase::Waiting { core, creds }),
            Ok(Some(req)) => match answer(&self.shared, *core, req, creds) {
                Answer::Accepted(session) => Step::Done(Ok(session)),
                Answer::Rejected(core, error) => Step::Next(Phase::Telling { core, error }),
                Answer::Failed(error) => Step::Done(Err(error)),
            },
        }
    }
}

impl Source for LogIn {
    fn on_ready(&self) -> Wait {
        let mut slot = lock(&self.phase);
        let Some(phase) = slot.take() else {
            return Wait::idle();
        };
        if self.shared.stop.load(Ordering::Acquire) {
            drop(slot);
            self.done(Err(Error::Aborted));
            return Wait::idle();
        }
        let step = match phase {
            Phase::Waiting { core, creds } => self.wait(core, creds),
            telling => Step::Next(telling),
        };
        let step = match step {
            // (Straight from the rejection too: the answer is usually written at once.)
            Step::Next(Phase::Telling { mut core, error }) => {
                if matches!(core.flush(), Ok(false)) && Instant::now() < self.deadline {
                    Step::Next(Phase::Telling { core, error })
                } else {
                    Step::Done(Err(error))
                }
            }
            step => step,
        };
        match step {
            Step::Next(phase) => {
                // The log-in's own deadline alone: its channel has no keep-alive timers (see
                // `SessionConfig::log_in_config`).
                let (read, write) = match &phase {
                    Phase::Waiting { core, .. } => {
                        let i = core.interest();
                        (i.read_fd(), i.write_fd())
                    }
                    // Only writing now: what the client sends is not read any more.
                    Phase::Telling { core, .. } => (None, core.interest().write_fd()),
                };
                let wait = Wait::from(Interest::new(read, write, Some(self.deadline)));
                *slot = Some(phase);
                wait
            }
            Step::Done(result) => {
                drop(slot);
                self.done(result);
                Wait::idle()
            }
        }
    }
}

/// A 128-bit random token (the kernel's randomness; the std hasher's if that fails).
fn random_token() -> u128 {
    let mut b = [0u8; 16];
    if File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_ok()
    {
        return u128::from_le_bytes(b);
    }
    // The arena ids' source (the std hasher's random keys).
    let half = || crate::shm::random_id() as u128;
    half() << 64 | half()
}

/// How a log-in request was answered. (Returned once per log-in, never stored.)
#[allow(clippy::large_enum_variant)]
enum Answer {
    /// The session (the acceptance and the client's resources queued on its master channel,
    /// which the session writes).
    Accepted(ServerSession),
    /// Refused: the channel holds the answer telling the client why, to write before it is
    /// dropped; the error says the same.
    Rejected(Box<struc::Channel<Master>>, Error),
    /// Failed making the session.
    Failed(Error),
}

/// Answers a client's log-in request `req_msg` on `core`.
fn answer(
    shared: &Shared,
    mut core: struc::Channel<Master>,
    req_msg: MsgIn<Master>,
    creds: sys::PeerCred,
) -> Answer {
    match try_answer(shared, &mut core, &req_msg, creds) {
        Ok(Ok(made)) => {
            drop(req_msg);
            core.pause();
            let token = made.token;
            match Session::open(
                core,
                token,
                shared.config.clone(),
                made.client_app.name.clone(),
                made.arenas.clone(),
                Lends::server(&made.arenas),
            ) {
                Ok(session) => {
                    // A session of a sync_io server is driven by the server's turns until
                    // `accept` hands it over (its keep-alive, the client's openings).
                    let carried = session
                        .reactor()
                        .filter(|r| !r.is_threaded())
                        .map(|r| shared.reactor.carry(r.clone()));
                    Answer::Accepted(ServerSession::new(
                        session,
                        made.client_app,
                        made.init,
                        made.metadata,
                        carried,
                    ))
                }
                Err(e) => Answer::Failed(e),
            }
        }
        Ok(Err(rejection)) => Answer::Rejected(Box::new(core), rejection),
        Err(e) => Answer::Failed(e),
    }
}

/// What an accepted log-in made, for its session.
struct Made {
    token: u128,
    client_app: ClientApp,
    arenas: (Option<Arena>, Option<Arena>),
    init: InitChannels,
    metadata: Option<Metadata>,
}

/// Checks and provides for the request, and queues the answer on `core`: `Ok(Ok)` accepted,
/// `Ok(Err)` the rejection the client was sent, `Err` a failure.
fn try_answer(
    shared: &Shared,
    core: &mut struc::Channel<Master>,
    req_msg: &MsgIn<Master>,
    creds: sys::PeerCred,
) -> Result<Result<Made, Error>, Error> {
    let cfg = &shared.config;
    let prepared = LogInReq::parse(req_msg)
        .and_then(|req| {
            let app = check(shared, &req, creds)?;
            Ok((req, app))
        })
        .and_then(|(req, app)| {
            let p = provide(shared, &app, &req)?;
            Ok((req, app, p))
        });
    let (req, client_app, p) = match prepared {
        Ok(x) => x,
        Err((reason, detail)) => {
            // Tells the client why (the response to its log-in); our error says the same.
            let mut rsp = core.create_msg();
            {
                let mut r = rsp.init_root().init_log_in_rsp().init_rejected();
                r.set_reason(reason.code());
                r.set_detail(detail.as_str());
            }
            let _ = core.send(&mut rsp, Some(req_msg));
            log::warn!(target: "flowipc::session", "log-in refused ({reason:?}): {detail}");
            return Ok(Err(Error::LogInRejected { reason, detail }));
        }
    };
    // Init channels: ours kept, theirs sent (one resource message, one fd, each).
    let mut init = InitChannels::default();
    for (kind, mine) in p.ours {
        init.push(
            kind,
            transport::Channel::from_stream(mine, cfg.channel_config())?,
        );
    }
    for (kind, index, fd) in p.theirs {
        let mut m = core.create_msg_with_fd(fd);
        {
            let mut r = m.init_root().init_resource();
            r.set_kind(kind);
            r.set_index(index);
        }
        core.send(&mut m, None)?;
    }
    let token = random_token();
    let mut rsp = core.create_msg();
    {
        let mut a = rsp.init_root().init_log_in_rsp().init_accepted();
        a.set_token(&token.to_le_bytes());
        a.set_init_by_client(req.init_channels);
        a.set_init_by_server(p.n_srv);
        if let Some(m) = &p.metadata {
            a.set_metadata(m.as_bytes());
        }
        a.set_arenas(p.arenas.0.is_some());
    }
    core.send(&mut rsp, Some(req_msg))?;
    Ok(Ok(Made {
        token,
        client_app,
        arenas: p.arenas,
        init,
        metadata: req.metadata,
    }))
}

/// What an accepted log-in gets: the arenas, the init channels (our ends by kind; theirs by
/// kind and index, to send), and what the server decided for this client.
struct Provision {
    arenas: (Option<Arena>, Option<Arena>),
    ours: Vec<(u8, UnixStream)>,
    theirs: Vec<(u8, u32, OwnedFd)>,
    n_srv: u32,
    metadata: Option<Metadata>,
}

/// Makes what an accepted log-in gets; on failure, why (the client is refused).
fn provide(
    shared: &Shared,
    client_app: &ClientApp,
    req: &LogInReq,
) -> Result<Provision, (Rejection, String)> {
    let cfg = &shared.config;
    let refuse = |detail: String| (Rejection::Resources, detail);
    // Arenas: the session's own, and the client app's (made at its first session).
    let arenas = if cfg.shm() == ShmKind::Classic {
        let pool = cfg.arena_config();
        let session = Arena::create(pool.clone());
        let app = {
            let mut m = lock(&shared.app_arenas);
            match m.get(&client_app.name) {
                Some(a) => Ok(a.clone()),
                None => Arena::create(pool).inspect(|a| {
                    m.insert(client_app.name.clone(), a.clone());
                }),
            }
        };
        match (session, app) {
            (Ok(s), Ok(a)) => (Some(s), Some(a)),
            (Err(e), _) | (_, Err(e)) => return Err(refuse(format!("no arena: {e}"))),
        }
    } else {
        (None, None)
    };
    let n_srv = shared
        .init_channels
        .as_ref()
        .map_or(0, |f| {
            f(client_app, req.init_channels, req.metadata.as_ref())
        })
        .min(MAX_INIT_CHANNELS);
    let metadata = shared
        .metadata
        .as_ref()
        .and_then(|f| f(client_app, req.init_channels, req.metadata.as_ref()));
    let mut theirs = Vec::new();
    for (s, kind) in [
        (&arenas.0, proto::RES_SESSION_ARENA),
        (&arenas.1, proto::RES_APP_ARENA),
    ] {
        if let Some(s) = s {
            match s.pool_fd(0).map(|fd| fd.try_clone_to_owned()) {
                Some(Ok(fd)) => theirs.push((kind, 0, fd)),
                _ => return Err(refuse("arena pool fd".into())),
            }
        }
    }
    let mut ours = Vec::new();
    for (kind, n) in [
        (proto::RES_INIT_BY_CLIENT, req.init_channels),
        (proto::RES_INIT_BY_SERVER, n_srv),
    ] {
        for i in 0..n {
            let (mine, other) =
                UnixStream::pair().map_err(|e| refuse(format!("socketpair: {e}")))?;
            ours.push((kind, mine));
            theirs.push((kind, i, OwnedFd::from(other)));
        }
    }
    Ok(Provision {
        arenas,
        ours,
        theirs,
        n_srv,
        metadata,
    })
}

/// The log-in checks; on failure, why (both sides are told).
fn check(
    shared: &Shared,
    req: &LogInReq,
    creds: sys::PeerCred,
) -> Result<ClientApp, (Rejection, String)> {
    if req.protocol_version != proto::PROTOCOL_VERSION {
        return Err((
            Rejection::ProtocolVersion,
            format!(
                "client speaks version {}, server {}",
                req.protocol_version,
                proto::PROTOCOL_VERSION
            ),
        ));
    }
    if req.server_app != shared.app.name {
        return Err((
            Rejection::WrongServerApp,
            format!(
                "client wants server app {:?}, this is {:?}",
                req.server_app, shared.app.name
            ),
        ));
    }
    let Some(app) = shared.clients.get(&req.client_app) else {
        return Err((
            Rejection::UnknownClientApp,
            format!("client app {:?} is not in the universe", req.client_app),
        ));
    };
    if !shared.app.allowed_client_apps.contains(&req.client_app) {
        return Err((
            Rejection::ClientAppNotAllowed,
            format!(
                "client app {:?} may not open sessions with {:?}",
                req.client_app, shared.app.name
            ),
        ));
    }
    if (creds.uid, creds.gid) != (app.uid, app.gid) {
        return Err((
            Rejection::Credentials,
            format!(
                "the connecting process runs as uid {} gid {}; app {:?} is uid {} gid {}",
                creds.uid, creds.gid, app.name, app.uid, app.gid
            ),
        ));
    }
    if (req.pid, req.uid, req.gid) != (creds.pid, creds.uid, creds.gid) {
        return Err((
            Rejection::Credentials,
            format!(
                "the client claims pid {} uid {} gid {}; the kernel says pid {} uid {} gid {}",
                req.pid, req.uid, req.gid, creds.pid, creds.uid, creds.gid
            ),
        ));
    }
    proto::check_exe(creds.pid, &app.exec_path).map_err(|d| (Rejection::ExecPath, d))?;
    let ours = &shared.config;
    let mismatch = if req.shm != ours.shm_code() {
        Some("SHM kind")
    } else if req.channel_kind != ours.channel_code() {
        Some("channel kind")
    } else if req.native_handles != ours.native_handles() {
        Some("fd passing (native handles)")
    } else {
        None
    };
    if let Some(what) = mismatch {
        return Err((
            Rejection::Config,
            format!("the client's {what} differs from the server's"),
        ));
    }
    if req.init_channels > MAX_INIT_CHANNELS {
        return Err((
            Rejection::Config,
            format!(
                "{} init channels requested; at most {MAX_INIT_CHANNELS}",
                req.init_channels
            ),
        ));
    }
    Ok(app.clone())
}
