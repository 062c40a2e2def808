//! Receiving and dispatch for [`Channel`]: one receive step at a time, unsolicited messages to
//! their expectation (or the cache), responses to their request (or reported as unexpected);
//! a hosing error reported once and the channel marked hosed.

use std::collections::VecDeque;
use std::time::Duration;

use capnp::traits::Owned;

use super::{Channel, Expect, Handler, Request};
use crate::hosing::Report;
use crate::msg::channel::Incoming;
use crate::msg::MsgIn;
use crate::struc::kind::{arm_name, discriminant};
use crate::struc::{Error, MsgType};

impl<M: Owned> Channel<M> {
    /// Marks the channel hosed if `e` hoses it (its handlers are dropped then); returns `e`
    /// for the caller to report.
    pub(super) fn hose(&mut self, e: Error) -> Error {
        let (e, now) = self.hosing.file(e);
        if now {
            self.drop_handlers();
        }
        e
    }

    /// Hoses the channel for its async face (a handler panicked): handlers dropped, the
    /// message channel's queues with them.
    pub(crate) fn abandon(&mut self) {
        if self.hosing.mark() {
            self.drop_handlers();
            self.msgs.abandon();
        }
    }

    fn drop_handlers(&mut self) {
        self.on_error = None;
        self.expect_one.clear();
        self.expect_many.clear();
        self.requests.clear();
        self.sync_waiting.clear();
        self.sync_arrived.clear();
        self.on_unexpected = None;
        self.on_remote_unexpected = None;
        self.on_peer_end = None;
    }

    /// A hosing error met while receiving goes to `on_error`; the caller sees `Hosed`. (One
    /// reported already, by a handler's call or a nested receive, is `Hosed` here.)
    pub(super) fn report(&mut self, e: Error) -> Error {
        match self.hosing.report(e) {
            Report::Return(e) => e,
            Report::First(e) => {
                let handler = self.on_error.take();
                self.drop_handlers();
                match handler {
                    Some(h) => {
                        h(e);
                        Error::Hosed
                    }
                    None => e,
                }
            }
        }
    }

    /// One receive step whose hosing error is the caller's to return (not `on_error`'s);
    /// `Ok(false)` if nothing came.
    pub(super) fn step(&mut self, timeout: Option<Duration>) -> Result<bool, Error> {
        match self.step_inner(timeout) {
            Ok(got) => Ok(got),
            Err(_) if self.hosing.is_hosed() => Err(Error::Hosed),
            Err(e) => Err(self.hose(e)),
        }
    }

    /// Receives and dispatches one event (waiting up to `timeout`); `Ok(false)` if none came.
    pub(super) fn step_inner(&mut self, timeout: Option<Duration>) -> Result<bool, Error> {
        // Hosed by a handler's call or a nested receive: reported there already.
        self.hosing.check::<Error>()?;
        match self.msgs.next_event(timeout) {
            Ok(Some(Incoming::Msg(m))) => {
                self.dispatch(m)?;
                Ok(true)
            }
            Ok(Some(Incoming::UnexpectedResponse(id, text))) => {
                if let Some(h) = self.on_remote_unexpected.as_mut() {
                    h(id, &text);
                }
                Ok(true)
            }
            Ok(None) if !self.peer_ended && self.msgs.is_peer_ended() => {
                self.peer_end();
                Ok(true)
            }
            Ok(None) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// The peer's graceful end, met once: nothing more comes, so requests still waiting for a
    /// response are dropped (a waiting `sync_request` sees the flag), then the handler runs.
    fn peer_end(&mut self) {
        self.peer_ended = true;
        self.requests.clear();
        if let Some(h) = self.on_peer_end.take() {
            h(self);
        }
    }

    fn dispatch(&mut self, mut m: MsgIn<M>) -> Result<(), Error> {
        let answers = m.answers();
        if answers != 0 {
            return self.dispatch_response(answers, m);
        }
        let which = match discriminant(&m, self.union_at) {
            Ok(d) if d < self.union_len => MsgType(d),
            Ok(_) => return Err(Error::UnknownMsgType),
            Err(e) => return Err(Error::Decode(e)),
        };
        m.set_union_arm(which.0);
        if let Some(h) = self.expect_one.remove(&which.0) {
            h(self, m);
            return Ok(());
        }
        // Nothing of its type waiting before it and its handler idle: straight to the handler
        // (what going through the cache would do, without the two moves).
        if self.cached(which) == 0 {
            if let Some(h) = self.expect_many.get_mut(&which.0).and_then(Option::take) {
                self.run_many(which, h, m);
                // Whatever a nested receive cached meanwhile follows.
                self.deliver_cached(which);
                return Ok(());
            }
        }
        // Through the cache, so that order holds even when a handler's nested receive brings in
        // more of its own type while it runs (those wait here and follow it).
        self.cache.get_or_default(which.0).push_back(m);
        self.deliver_cached(which);
        Ok(())
    }

    /// Hands cached messages of `which` to its `expect_msgs` handler while there is one, not
    /// already running.
    fn deliver_cached(&mut self, which: MsgType) {
        while !self.hosing.is_hosed() {
            let Some(m) = self.cache.get_mut(&which.0).and_then(VecDeque::pop_front) else {
                return;
            };
            match self.expect_many.get_mut(&which.0).and_then(Option::take) {
                Some(h) => self.run_many(which, h, m),
                None => {
                    // Not expected, or running further up the stack (it takes these when it
                    // returns): back to the front of the line.
                    self.cache.get_or_default(which.0).push_front(m);
                    return;
                }
            }
        }
    }

    /// Runs `which`'s `expect_msgs` handler (taken out of its slot while it runs) on `m`, and
    /// puts it back unless the handler undid (or replaced) the expectation.
    fn run_many(&mut self, which: MsgType, mut h: Handler<M>, m: MsgIn<M>) {
        h(self, m);
        if let Some(slot @ None) = self.expect_many.get_mut(&which.0) {
            *slot = Some(h);
        }
    }

    fn dispatch_response(&mut self, answers: u64, m: MsgIn<M>) -> Result<(), Error> {
        if answers >= self.msgs.next_message_id() {
            return Err(Error::BadResponseId(answers));
        }
        if self.sync_waiting.contains(&answers)
            && !self.sync_arrived.iter().any(|(a, _)| *a == answers)
        {
            self.sync_arrived.push((answers, m));
            return Ok(());
        }
        if let Some(req) = self.requests.get_mut(&answers) {
            req.queued.push_back(m);
            self.deliver_responses(answers);
            return Ok(());
        }
        if self.timed_out.remove(&answers) {
            return Ok(()); // a late response to a timed-out sync_request: dropped quietly
        }
        // Unexpected: dropped; our handler hears of it, and so does the sender (with what it
        // was, as Flow-IPC says it).
        let id = m.id();
        let arm = discriminant(&m, self.union_at)
            .ok()
            .and_then(|d| arm_name::<M>(MsgType(d)))
            .unwrap_or_else(|| "message of an unknown type".into());
        let text =
            format!("{arm} {id} answers message {answers}, which expects no response (any more)");
        if let Some(mut h) = self.on_unexpected.take() {
            h(self, m);
            if self.on_unexpected.is_none() && !self.hosing.is_hosed() {
                self.on_unexpected = Some(h);
            }
        }
        if !self.hosing.is_hosed() {
            match self.msgs.send_unexpected_notice(id, &text) {
                Ok(()) => {}
                // Not hosing (e.g. sending was ended): the notice is a courtesy, skip it.
                Err(e) if !e.is_hosing() => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Hands queued responses of request `id` to its handler (one for a one-off request) while
    /// the handler is not already running.
    fn deliver_responses(&mut self, id: u64) {
        while !self.hosing.is_hosed() {
            let Some(req) = self.requests.get_mut(&id) else {
                return;
            };
            if req.handler.is_none() {
                return; // running further up the stack: it takes these when it returns
            }
            let Some(m) = req.queued.pop_front() else {
                return;
            };
            let expect = req.expect;
            let Some(mut h) = req.handler.take() else {
                return;
            };
            if expect == Expect::OneOff {
                // Done after this one; any other queued response is now unexpected.
                let rest = self
                    .requests
                    .remove(&id)
                    .map(|r| r.queued)
                    .unwrap_or_default();
                h(self, m);
                for extra in rest {
                    let _ = self.dispatch_response(extra.answers(), extra);
                }
                return;
            }
            h(self, m);
            if let Some(Request {
                handler: slot @ None,
                ..
            }) = self.requests.get_mut(&id)
            {
                *slot = Some(h);
            }
        }
    }
}
