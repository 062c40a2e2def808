//! A structured channel with `async` requests and message streams: [`Channel`].

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use capnp::dynamic_value;
use capnp::introspect::Introspect;
use capnp::traits::Owned;

use super::driver::Driven;
use crate::msg::{MsgIn, MsgOut};
use crate::reactor::Reactor;
use crate::struc::{self, AsyncChannel, Error, Expect, MsgType, ReqId};

fn io(e: std::io::Error) -> Error {
    crate::transport::Error::Io(e).into()
}

/// A structured channel driven by tokio: the blocking API's
/// [`AsyncChannel`](struc::AsyncChannel) on a reactor of its own, which a task of the
/// runtime drives. Handlers ([`expect_msgs`](Channel::expect_msgs) and the like) run in that
/// task and get `&mut struc::Channel`, as there. `Send + Sync`: share it in an `Arc`.
pub struct Channel<M: Owned> {
    inner: AsyncChannel<M>,
    reactor: Arc<Reactor>,
    driven: Driven,
}

impl<M: Owned> std::fmt::Debug for Channel<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("tokio::Channel")
            .field("inner", &self.inner)
            .finish()
    }
}

impl<M> Channel<M>
where
    M: Owned + Introspect + 'static,
    for<'a> M::Reader<'a>: Into<dynamic_value::Reader<'a>>,
{
    /// Wraps a (not yet started) core: set expectations, then [`start`](Channel::start).
    pub fn new(core: struc::Channel<M>) -> Result<Self, Error> {
        let reactor = Reactor::threadless().map_err(io)?;
        Ok(Channel {
            inner: AsyncChannel::new(core)?,
            driven: Driven::new(reactor.clone()),
            reactor,
        })
    }

    /// Starts receiving, in a task of the current runtime. `on_error` gets the hosing error
    /// met while receiving (at most once).
    pub fn start(&self, on_error: impl FnOnce(Error) + Send + 'static) -> Result<(), Error> {
        self.driven.ensure().map_err(io)?;
        self.inner.start_in(&self.reactor, on_error)
    }

    /// The task driving the channel, in this runtime (again, if the one that ran it ended).
    fn driven(&self) -> Result<(), Error> {
        self.driven.ensure().map_err(io)
    }

    /// A new, empty message with the channel's backing.
    pub fn create_msg(&self) -> MsgOut<M> {
        self.inner.create_msg()
    }

    /// Sends (never blocks: what the socket does not take is queued; see
    /// [`struc::Channel::send`]).
    pub fn send(&self, msg: &mut MsgOut<M>, originating: Option<&MsgIn<M>>) -> Result<(), Error> {
        self.inner.send(msg, originating)
    }

    /// Sends a request (at this call, not at the first poll) and gives a future of its one
    /// response, up to `timeout` ([`Error::Timeout`], not hosing). The future borrows only the
    /// channel. Cancel-safe: dropped before the response, the channel stays usable and the
    /// late response is dropped quietly.
    pub fn request(
        &self,
        msg: &mut MsgOut<M>,
        originating: Option<&MsgIn<M>>,
        timeout: Option<Duration>,
    ) -> impl std::future::Future<Output = Result<MsgIn<M>, Error>> + Send + '_ {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut tx = Some(tx);
        let sent = self.driven().and_then(|()| {
            self.inner
                .async_request(msg, originating, Expect::OneOff, move |_, rsp| {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(rsp);
                    }
                })
        });
        // (Made here, not in the future: a future dropped unpolled abandons the request too.)
        let guard = sent.map(|id| Abandon(&self.inner, Some(id)));
        async move {
            let mut guard = guard?;
            let mut rx = rx;
            let got = match timeout {
                Some(t) => tokio::time::timeout(t, &mut rx).await.ok(),
                None => Some((&mut rx).await),
            };
            match got {
                Some(Ok(rsp)) => {
                    guard.1 = None;
                    Ok(rsp)
                }
                // The handler was dropped uncalled: the channel is hosed.
                Some(Err(_)) => Err(Error::Hosed),
                None => {
                    drop(guard);
                    // It may have come between the timeout and the abandon.
                    if let Ok(rsp) = rx.try_recv() {
                        return Ok(rsp);
                    }
                    if self.inner.is_hosed() {
                        Err(Error::Hosed)
                    } else {
                        Err(Error::Timeout)
                    }
                }
            }
        }
    }

    /// The messages of type `which` that arrive from now on (and those cached already), as a
    /// [`Stream`](futures_core::Stream) or with [`Messages::recv`]. One stream per type: a
    /// second replaces the first (see [`struc::Channel::expect_msgs`]).
    pub fn messages(&self, which: MsgType) -> Result<Messages<M>, Error> {
        self.driven()?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.inner.expect_msgs(which, move |_, m| {
            let _ = tx.send(m);
        })?;
        Ok(Messages { rx })
    }

    /// Handles messages of type `which` in `handler` (in the channel's task); see
    /// [`struc::Channel::expect_msgs`].
    pub fn expect_msgs(
        &self,
        which: MsgType,
        handler: impl FnMut(&mut struc::Channel<M>, MsgIn<M>) + Send + 'static,
    ) -> Result<bool, Error> {
        self.inner.expect_msgs(which, handler)
    }

    /// Ends sending gracefully and waits until everything sent so far and the end are
    /// written (see [`AsyncChannel::async_end_sending`]).
    pub async fn end_sending(&self) -> Result<(), Error> {
        self.driven()?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.inner.async_end_sending(move |r| {
            let _ = tx.send(r);
        });
        rx.await.unwrap_or(Err(Error::Hosed))
    }

    /// Whether a hosing error has been reported.
    pub fn is_hosed(&self) -> bool {
        self.inner.is_hosed()
    }

    /// The blocking API's channel (the other expectations, the unexpected-response handlers).
    pub fn blocking(&self) -> &AsyncChannel<M> {
        &self.inner
    }
}

/// Stops waiting for a request's response when dropped first.
struct Abandon<'a, M: Owned>(&'a AsyncChannel<M>, Option<ReqId>);

impl<M: Owned> Drop for Abandon<'_, M> {
    fn drop(&mut self) {
        if let Some(id) = self.1.take() {
            self.0.abandon_request_any(id);
        }
    }
}

/// The messages of one type a [`Channel`] receives, in order (see [`Channel::messages`]).
#[derive(Debug)]
pub struct Messages<M: Owned> {
    rx: tokio::sync::mpsc::UnboundedReceiver<MsgIn<M>>,
}

impl<M: Owned> Messages<M> {
    /// The next message; `None` once the channel is over (or its expectation undone) and every
    /// message was read.
    pub async fn recv(&mut self) -> Option<MsgIn<M>> {
        self.rx.recv().await
    }
}

impl<M: Owned> futures_core::Stream for Messages<M> {
    type Item = MsgIn<M>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<MsgIn<M>>> {
        self.rx.poll_recv(cx)
    }
}
