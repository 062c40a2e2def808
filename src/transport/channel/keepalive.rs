//! The keep-alive of a [`Channel`]: its settings, read and changed after creation, and its
//! timers (a ping when nothing was sent for a while, the idle timeout when nothing came).

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use super::link::Link;
use super::tx::Kind;
use super::wire::FLAG_PING;
use super::{Channel, Error, OutFrame};
use crate::sys::{self, PollFd};

impl Channel {
    /// The keep-alive now: `(auto_ping, idle_timeout)` (see
    /// [`ChannelConfig::with_auto_ping`](super::ChannelConfig::with_auto_ping) and
    /// [`ChannelConfig::with_idle_timeout`](super::ChannelConfig::with_idle_timeout)).
    pub fn keep_alive(&self) -> (Option<Duration>, Option<Duration>) {
        (self.cfg.auto_ping, self.cfg.idle_timeout)
    }

    /// Changes the keep-alive (`None`: off). Both periods count from this call: the first ping
    /// goes out `auto_ping` from now if nothing is sent meanwhile, and the idle timeout needs
    /// `idle_timeout` of silence from now. A poll loop should ask for the
    /// [`interest`](crate::poll::Pollable::interest) again (its deadline moved).
    pub fn set_keep_alive(&mut self, auto_ping: Option<Duration>, idle_timeout: Option<Duration>) {
        let now = Instant::now();
        self.cfg.auto_ping = auto_ping;
        self.cfg.idle_timeout = idle_timeout;
        self.last_tx = now;
        self.last_rx = now;
    }

    /// When [`on_timer`](Channel::on_timer) should run next: the earliest of the next
    /// keep-alive ping and the idle-timeout expiry (`None`: no timer, or hosed).
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.hosing.is_hosed() {
            return None;
        }
        // Nothing arrives after the peer's end: the idle timeout no longer applies.
        let idle = self
            .cfg
            .idle_timeout
            .filter(|_| !self.peer_ended)
            .and_then(|t| self.last_rx.checked_add(t));
        let ping = if self.ended {
            None
        } else {
            self.cfg.auto_ping.and_then(|p| self.last_tx.checked_add(p))
        };
        match (idle, ping) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Runs the timers as of `now`: queues (and writes if it can) a keep-alive ping when
    /// nothing was sent for the `auto_ping` period, and fails with [`Error::IdleTimeout`]
    /// (hosing) when nothing was received for `idle_timeout` (bytes waiting unread in the
    /// socket count as received). Early calls do nothing.
    pub fn on_timer(&mut self, now: Instant) -> Result<(), Error> {
        self.hosing.check::<Error>()?;
        if let Some(idle) = self.cfg.idle_timeout.filter(|_| !self.peer_ended) {
            if now.saturating_duration_since(self.last_rx) >= idle {
                let mut p = [PollFd::new(self.sock.as_fd(), true, false)];
                let pending = match sys::poll(&mut p, Some(Duration::ZERO)) {
                    Ok(_) => p[0].ready.readable || p[0].ready.hangup || p[0].ready.error,
                    Err(e) => return Err(self.hose(Error::Io(e))),
                };
                let pending = pending
                    || match self.link.as_deref().map(Link::has_data) {
                        Some(Err(e)) => return Err(self.hose(e)),
                        Some(Ok(data)) => data,
                        None => false,
                    };
                if !pending {
                    return Err(self.hose(Error::IdleTimeout));
                }
                self.last_rx = now;
            }
        }
        if let Some(period) = self.cfg.auto_ping {
            if !self.ended && now.saturating_duration_since(self.last_tx) >= period {
                self.last_tx = now;
                if self.tx.pings == 0 {
                    self.submit(FLAG_PING, OutFrame::new(&[]), Kind::Ping)?;
                }
            }
        }
        Ok(())
    }
}
