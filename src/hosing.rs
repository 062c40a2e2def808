//! The one hosing state machine of every layer (transport, message, structured channels and
//! sessions): a channel is open until an error that ends it (a *hosing* error); that error is
//! reported exactly once, to whoever met it (the call that ran into it, or the error handler
//! when no call is there to return it); from then on every call answers `Hosed`.
//!
//! ```text
//!   open ──(hosing error: reported once)──▶ hosed ──(any call)──▶ Err(Hosed)
//!     │
//!     └──(other errors: returned, the channel goes on)──▶ open
//! ```

/// An error type with hosing errors and a `Hosed` answer.
pub(crate) trait HosingError: Sized + std::error::Error {
    /// Whether this error ends the channel.
    fn is_hosing(&self) -> bool;
    /// The answer to every call once the channel is hosed.
    fn hosed() -> Self;
    /// The `log` target of the layer (`flowipc::transport`, ...).
    const TARGET: &'static str;
    /// How a hosing error met in this layer is logged, when it hoses: `None` for one that the
    /// layer below met and logged already (or `Hosed`).
    fn log_level(&self) -> Option<log::Level> {
        Some(log::Level::Warn)
    }
}

/// Logs the error that hosed a channel now, with its sources (`Display` does not repeat them),
/// at the level its layer gives it.
fn log_hosed<E: HosingError>(e: &E) {
    let Some(level) = e.log_level() else {
        return;
    };
    if !log::log_enabled!(target: E::TARGET, level) {
        return;
    }
    let mut why = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        why.push_str(": ");
        why.push_str(&s.to_string());
        source = s.source();
    }
    log::log!(target: E::TARGET, level, "channel hosed: {why}");
}

/// A channel's hosing state (see the module docs).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hosing {
    hosed: bool,
}

impl Hosing {
    /// Whether a hosing error has been met.
    pub(crate) fn is_hosed(self) -> bool {
        self.hosed
    }

    /// `Err(Hosed)` once hosed.
    pub(crate) fn check<E: HosingError>(self) -> Result<(), E> {
        if self.hosed {
            Err(E::hosed())
        } else {
            Ok(())
        }
    }

    /// Hoses the channel for a layer above that met the hosing error (and reports it itself);
    /// says whether this call hosed it.
    pub(crate) fn mark(&mut self) -> bool {
        let now = !self.hosed;
        self.hosed = true;
        now
    }

    /// Files `e`, an error an operation met, for the operation to return: a hosing error
    /// hoses the channel. Also says whether this call is the one that hosed it (its caller
    /// then releases what the channel held, once).
    pub(crate) fn file<E: HosingError>(&mut self, e: E) -> (E, bool) {
        let now = e.is_hosing() && !self.hosed;
        self.hosed |= e.is_hosing();
        if now {
            log_hosed(&e);
        }
        (e, now)
    }

    /// Files `e`, met where no call can return it to the user (a receive on the library
    /// thread, say), for a report: the first hosing error is [`Report::First`], the channel
    /// hosed now (its owner hands it to its error handler, or returns it without one); any
    /// other error is [`Report::Return`]: a later hosing error as `Hosed` (reported already),
    /// a non-hosing one as it is.
    pub(crate) fn report<E: HosingError>(&mut self, e: E) -> Report<E> {
        if !e.is_hosing() {
            Report::Return(e)
        } else if self.mark() {
            log_hosed(&e);
            Report::First(e)
        } else {
            Report::Return(E::hosed())
        }
    }
}

/// What [`Hosing::report`] decided.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Report<E> {
    /// The error that hosed the channel, to report once.
    First(E),
    /// To return as it is.
    Return(E),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    enum E {
        Refused,
        Broken(u32),
        Hosed,
    }

    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{self:?}")
        }
    }

    impl std::error::Error for E {}

    impl HosingError for E {
        const TARGET: &'static str = "flowipc::test";
        fn is_hosing(&self) -> bool {
            !matches!(self, E::Refused)
        }
        fn hosed() -> Self {
            E::Hosed
        }
    }

    #[test]
    fn a_hosing_error_is_filed_once_then_calls_answer_hosed() {
        let mut h = Hosing::default();
        assert_eq!(h.check::<E>(), Ok(()));
        assert_eq!(h.file(E::Refused), (E::Refused, false));
        assert!(!h.is_hosed());
        assert_eq!(h.file(E::Broken(1)), (E::Broken(1), true));
        assert!(h.is_hosed());
        assert_eq!(
            h.file(E::Broken(2)),
            (E::Broken(2), false),
            "hosed once only"
        );
        assert_eq!(h.check::<E>(), Err(E::Hosed));
    }

    #[test]
    fn the_first_hosing_error_is_the_one_report() {
        let mut h = Hosing::default();
        assert_eq!(h.report(E::Refused), Report::Return(E::Refused));
        assert!(!h.is_hosed());
        assert_eq!(h.report(E::Broken(1)), Report::First(E::Broken(1)));
        assert_eq!(h.report(E::Broken(2)), Report::Return(E::Hosed));
        assert_eq!(h.report(E::Refused), Report::Return(E::Refused));
        let mut h = Hosing::default();
        assert!(h.mark());
        assert_eq!(
            h.report(E::Broken(3)),
            Report::Return(E::Hosed),
            "marked: reported above"
        );
    }
}
