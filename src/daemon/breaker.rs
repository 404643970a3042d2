//! The circuit breaker: while the store fails, all uploads pause.

use std::time::{Duration, Instant};

use crate::storage;

/// The longest pause a store's `Retry-After` may ask for: a broken or hostile header must
/// not stop uploads for hours.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// The circuit breaker: a target failure pauses all uploads, for 1 s doubling up to a
/// minute (with jitter) while failures go on, and at least as long as the store's
/// `Retry-After` (up to [`MAX_RETRY_AFTER`]); a success closes it. One log line per pause,
/// not one per item.
#[derive(Default)]
pub(super) struct Health {
    pub(super) failures: u32,
    pub(super) paused_until: Option<Instant>,
    pub(super) error: Option<String>,
    /// `nix-cache-info` is known to be in the cache.
    pub(super) cache_info: bool,
}

impl Health {
    pub(super) fn fail(&mut self, e: &storage::TargetError) {
        let already = self.paused_until.is_some_and(|t| t > Instant::now());
        let asked = e.retry_after.map_or(Duration::ZERO, |d| d.min(MAX_RETRY_AFTER));
        let pause = crate::queue::backoff(self.failures, &e.msg).min(Duration::from_secs(60)).max(asked);
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

    pub(super) fn paused_for(&self) -> Option<Duration> {
        self.paused_until.and_then(|t| t.checked_duration_since(Instant::now()))
    }
}
