//! The circuit breaker: while the store fails, all uploads pause.

use std::time::{Duration, Instant};

use crate::storage;

/// The longest pause a store's `Retry-After` may ask for: a broken or hostile header must
/// not stop uploads for hours.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// The longest pause of the breaker's own doubling.
const MAX_PAUSE: Duration = Duration::from_secs(60);

/// The circuit breaker: a target failure pauses all uploads, for 1 s doubling up to a
/// minute (with jitter) while failures go on, and at least as long as the store's
/// `Retry-After` (up to [`MAX_RETRY_AFTER`]); a success closes it. One log line per pause,
/// not one per item. Only the dispatcher holds it.
#[derive(Default)]
pub(super) struct Breaker {
    /// Failures since the last success: the next pause doubles with each.
    failures: u32,
    /// Uploads wait until then.
    paused_until: Option<Instant>,
    /// The last failure, for `status` while paused and for the "works again" line.
    error: Option<String>,
}

impl Breaker {
    pub(super) fn fail(&mut self, e: &storage::TargetError) {
        let already = self.paused_for().is_some();
        let asked = e.retry_after.map_or(Duration::ZERO, |d| d.min(MAX_RETRY_AFTER));
        let pause = crate::queue::backoff(self.failures, &e.msg).min(MAX_PAUSE).max(asked);
        self.failures += 1;
        self.paused_until = Some(Instant::now() + pause);
        self.error = Some(e.msg.clone());
        if !already {
            let pause_ms = pause.as_millis() as u64;
            if e.config {
                tracing::error!(error = %e.msg, pause_ms, "the store refuses us; uploads paused: {}", e.msg);
            } else {
                tracing::warn!(error = %e.msg, pause_ms, "the store is unavailable; uploads paused: {}", e.msg);
            }
        }
    }

    pub(super) fn ok(&mut self) {
        if self.error.take().is_some() {
            tracing::info!("the store works again; uploads resumed");
        }
        self.failures = 0;
        self.paused_until = None;
    }

    /// How long uploads stay paused from now, if they are.
    pub(super) fn paused_for(&self) -> Option<Duration> {
        self.paused_until.and_then(|t| t.checked_duration_since(Instant::now()))
    }

    /// Until when uploads are paused, and why (the last failure).
    pub(super) fn pause(&self) -> Option<(Instant, String)> {
        self.paused_until.zip(self.error.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn down(retry_after: Option<Duration>) -> storage::TargetError {
        storage::TargetError { retry_after, ..storage::TargetError::target("connection refused") }
    }

    #[test]
    fn a_failure_pauses_and_doubles_and_a_success_closes() {
        let mut b = Breaker::default();
        assert!(b.paused_for().is_none() && b.pause().is_none());
        b.fail(&down(None));
        // backoff(0) is 1 s scaled by [0.5, 1).
        let first = b.paused_for().expect("paused");
        assert!(first > Duration::from_millis(400) && first <= Duration::from_secs(1), "{first:?}");
        assert_eq!(b.pause().map(|(_, e)| e).as_deref(), Some("connection refused"));
        for _ in 0..20 {
            b.fail(&down(None));
        }
        let p = b.paused_for().expect("paused");
        assert!(p > Duration::from_secs(25) && p <= MAX_PAUSE, "doubling is capped at a minute: {p:?}");
        b.ok();
        assert!(b.paused_for().is_none() && b.pause().is_none());
        b.fail(&down(None));
        assert!(b.paused_for().unwrap() <= Duration::from_secs(1), "a success starts the doubling over");
    }

    #[test]
    fn retry_after_lengthens_the_pause_within_a_cap() {
        let mut b = Breaker::default();
        b.fail(&down(Some(Duration::from_secs(120))));
        let p = b.paused_for().unwrap();
        assert!(p > Duration::from_secs(119) && p <= Duration::from_secs(120), "{p:?}");
        b.fail(&down(Some(Duration::from_secs(86_400))));
        let p = b.paused_for().unwrap();
        assert!(p > MAX_RETRY_AFTER - Duration::from_secs(1) && p <= MAX_RETRY_AFTER, "{p:?}");
    }
}
