//! The sync_io face of sessions ([`EventLoop::SyncIo`](super::EventLoop::SyncIo)): a client,
//! a server and each server session are [`Pollable`]s that the owner's loop drives. The same
//! sources as the library thread's run (log-ins, the session's master channel, its
//! dispatcher), on a reactor of the object's own that has no thread; a session or server the
//! library thread drives has nothing to wait for here (its interest is empty, `on_ready` does
//! nothing).
//!
//! Errors of an open session reach its error handler (called inside `on_ready`), not
//! `on_ready`'s result; `on_ready` returns the errors of a log-in in progress
//! ([`ClientSession::start_connect`]).

use super::{ClientSession, Error, ServerSession, SessionServer};
use crate::poll::{Interest, Pollable};

impl Pollable for ClientSession {
    type Error = Error;

    /// While logging in: the log-in's socket and its deadline; once open: the session's one
    /// fd and deadline.
    fn interest(&self) -> Interest<'_> {
        match self.connecting() {
            Some(c) => c,
            None => self.session().interest(),
        }
    }

    /// Takes a log-in a step further (its failure is returned; see
    /// [`start_connect`](ClientSession::start_connect)), or runs what is due of the open
    /// session, its handlers included.
    fn on_ready(&mut self) -> Result<(), Error> {
        if self.is_connecting() {
            self.step_connect()?;
            if !self.is_open() {
                return Ok(());
            }
        }
        self.session().drive();
        Ok(())
    }
}

impl Pollable for ServerSession {
    type Error = Error;

    /// The session's one fd and deadline.
    fn interest(&self) -> Interest<'_> {
        self.session().interest()
    }

    /// Runs what is due of the session, its handlers included (call
    /// [`init_handlers`](ServerSession::init_handlers) first: until then the client's channel
    /// openings wait).
    fn on_ready(&mut self) -> Result<(), Error> {
        self.session().drive();
        Ok(())
    }
}

impl Pollable for SessionServer {
    type Error = Error;

    /// The server's one fd (its listening socket and every log-in in progress) and deadline.
    fn interest(&self) -> Interest<'_> {
        let r = self.reactor();
        if r.is_threaded() {
            Interest::none()
        } else {
            r.interest()
        }
    }

    /// Accepts connections and takes the log-ins a step further; a finished one goes to the
    /// next [`async_accept`](SessionServer::async_accept) handler (run here) or waits for
    /// [`accept`](SessionServer::accept).
    fn on_ready(&mut self) -> Result<(), Error> {
        let r = self.reactor();
        if !r.is_threaded() {
            r.drive();
        }
        Ok(())
    }
}
