//! The circuit breaker: while the store fails, all uploads pause, and every request the
//! daemon sends it waits ([`Gated`]).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use crate::storage::{self, Body, BoxFuture, Chunk, Incomplete, Object, Reader, Target, TargetError};

/// The longest pause a store's `Retry-After` may ask for: a broken or hostile header must
/// not stop uploads for hours.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// The longest pause of the breaker's own doubling.
const MAX_PAUSE: Duration = Duration::from_secs(60);

/// The circuit breaker: a target failure pauses all uploads, for 1 s doubling up to a
/// minute (with jitter) while failures go on, and at least as long as the store's
/// `Retry-After` (up to [`MAX_RETRY_AFTER`]); a success of an upload begun after the last
/// failure closes it (one begun before proves nothing about the store now). One log line per
/// pause, not one per item. The store's requests see it, and feed it, through [`Gated`].
pub(super) struct Breaker {
    /// Failures since the last success: the next pause doubles with each.
    failures: u32,
    /// When the last failure was reported.
    failed_at: Option<Instant>,
    /// A request begun after the last failure reached the store and succeeded: an upload
    /// that sent none (a path excluded, a build without a log) proves nothing.
    reached: bool,
    /// Uploads wait until then.
    paused_until: Option<Instant>,
    /// The last failure, for `status` while paused and for the "works again" line.
    error: Option<String>,
    /// `paused_until`, for the [`Gated`] targets.
    gate: watch::Sender<Option<Instant>>,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker { failures: 0, failed_at: None, reached: false, paused_until: None, error: None, gate: watch::channel(None).0 }
    }
}

impl Breaker {
    pub(super) fn fail(&mut self, e: &storage::TargetError) {
        let already = self.paused_for().is_some();
        let asked = e.retry_after.map_or(Duration::ZERO, |d| d.min(MAX_RETRY_AFTER));
        let pause = crate::queue::backoff(self.failures, &e.msg).min(MAX_PAUSE).max(asked);
        self.failures += 1;
        let now = Instant::now();
        self.failed_at = Some(now);
        self.reached = false;
        // A later failure never shortens a pause (a reset after a `Retry-After: 120`).
        let until = self.paused_until.filter(|t| *t > now + pause).unwrap_or(now + pause);
        self.paused_until = Some(until);
        self.gate.send_replace(self.paused_until);
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

    /// A request begun at `began` succeeded.
    fn reached(&mut self, began: Instant) {
        if self.failed_at.is_none_or(|t| began > t) {
            self.reached = true;
        }
    }

    /// An upload begun at `started` succeeded: the breaker closes if it began after the
    /// last failure and a request since reached the store.
    pub(super) fn ok(&mut self, started: Instant) {
        if self.failed_at.is_some_and(|t| started <= t || !self.reached) {
            return;
        }
        if self.error.take().is_some() {
            tracing::info!("the store works again; uploads resumed");
        }
        self.failures = 0;
        self.failed_at = None;
        self.paused_until = None;
        self.gate.send_replace(None);
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

/// The breaker, as every request to the store meets it: a [`Target`] that waits while
/// uploads are paused before it sends anything, and pauses them the moment a request fails
/// (not when the item it belongs to ends). The daemon's uploads (those in flight included:
/// their next request waits), its root records and its looks for collections all go through
/// it, so nothing reaches a store that asked for a pause before the pause ends. Only a whole
/// upload closes the breaker ([`Breaker::ok`]): one request that works proves little.
pub(super) struct Gated {
    inner: Arc<dyn Target>,
    breaker: Arc<Mutex<Breaker>>,
    until: watch::Receiver<Option<Instant>>,
}

impl Gated {
    /// `target`, its requests held while `breaker` pauses uploads, and their failures fed to it.
    pub(super) fn wrap(target: Arc<dyn Target>, breaker: &Arc<Mutex<Breaker>>) -> Arc<dyn Target> {
        let until = breaker.lock().unwrap_or_else(|e| e.into_inner()).gate.subscribe();
        Arc::new(Gated { inner: target, breaker: breaker.clone(), until })
    }

    /// Returns once no pause holds (at once when there is none); a pause lengthened or ended
    /// meanwhile is followed.
    async fn open(&self) {
        let mut until = self.until.clone();
        loop {
            let Some(t) = (*until.borrow_and_update()).filter(|t| *t > Instant::now()) else { return };
            tokio::select! {
                _ = tokio::time::sleep_until(t.into()) => {}
                changed = until.changed() => if changed.is_err() { return },
            }
        }
    }

    /// Sends the request `f` makes once the gate is open; a failure of the store (not a
    /// refusal of one object) pauses uploads.
    fn through<'a, T: Send + 'a>(&'a self, f: impl FnOnce() -> BoxFuture<'a, Result<T, TargetError>> + Send + 'a) -> BoxFuture<'a, Result<T, TargetError>> {
        Box::pin(async move {
            self.open().await;
            let began = Instant::now();
            let r = f().await;
            let mut breaker = self.breaker.lock().unwrap_or_else(|e| e.into_inner());
            match &r {
                Ok(_) => breaker.reached(began),
                Err(e) if !e.permanent => breaker.fail(e),
                Err(_) => {}
            }
            drop(breaker);
            r
        })
    }
}

impl Target for Gated {
    fn list<'a>(&'a self, prefix: &'a str, each: &'a mut (dyn FnMut(Object) + Send)) -> BoxFuture<'a, Result<u64, TargetError>> {
        self.through(move || self.inner.list(prefix, each))
    }
    fn list_all<'a>(&'a self, jobs: usize, pages: mpsc::Sender<Vec<Object>>) -> BoxFuture<'a, Result<u64, TargetError>> {
        self.through(move || self.inner.list_all(jobs, pages))
    }
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, TargetError>> {
        self.through(move || self.inner.get(key))
    }
    fn size_of<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<u64>, TargetError>> {
        self.through(move || self.inner.size_of(key))
    }
    fn calls(&self) -> storage::Calls {
        self.inner.calls()
    }
    fn open_read<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Reader>, TargetError>> {
        self.through(move || self.inner.open_read(key))
    }
    fn delete<'a>(&'a self, keys: &'a [String]) -> BoxFuture<'a, Result<(), TargetError>> {
        self.through(move || self.inner.delete(keys))
    }
    fn list_incomplete<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<Incomplete>, TargetError>> {
        self.through(move || self.inner.list_incomplete(prefix))
    }
    fn abort_incomplete<'a>(&'a self, upload: &'a Incomplete) -> BoxFuture<'a, Result<(), TargetError>> {
        self.through(move || self.inner.abort_incomplete(upload))
    }
    fn exists<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, TargetError>> {
        self.through(move || self.inner.exists(key))
    }
    fn put<'a>(&'a self, key: &'a str, body: Body, content_type: &'static str) -> BoxFuture<'a, Result<(), TargetError>> {
        self.through(move || self.inner.put(key, body, content_type))
    }
    fn stream_part_size(&self, size_hint: u64) -> Option<u64> {
        self.inner.stream_part_size(size_hint)
    }
    fn put_streamed<'a>(&'a self, key: &'a str, chunks: mpsc::Receiver<Chunk>, content_type: &'static str) -> BoxFuture<'a, Result<u64, TargetError>> {
        self.through(move || self.inner.put_streamed(key, chunks, content_type))
    }
    fn rename<'a>(&'a self, from: &'a str, to: &'a str, size: u64, content_type: &'static str) -> BoxFuture<'a, Result<(), TargetError>> {
        self.through(move || self.inner.rename(from, to, size, content_type))
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn forget_listing(&self) {
        self.inner.forget_listing()
    }
    fn log_encoding(&self) -> Option<&'static str> {
        self.inner.log_encoding()
    }
    fn put_encoded<'a>(&'a self, key: &'a str, body: Body, content_type: &'static str, encoding: &'static str) -> BoxFuture<'a, Result<(), TargetError>> {
        self.through(move || self.inner.put_encoded(key, body, content_type, encoding))
    }
    fn fence<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<storage::Fence>, TargetError>> {
        self.through(move || self.inner.fence(key))
    }
    fn fenced<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<bool>, TargetError>> {
        self.through(move || self.inner.fenced(key))
    }
    fn get_versioned<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<(Vec<u8>, String)>, TargetError>> {
        self.through(move || self.inner.get_versioned(key))
    }
    fn put_if_version<'a>(&'a self, key: &'a str, body: Vec<u8>, content_type: &'static str, version: &'a str) -> BoxFuture<'a, Result<bool, TargetError>> {
        self.through(move || self.inner.put_if_version(key, body, content_type, version))
    }
    fn conditional_puts<'a>(&'a self) -> BoxFuture<'a, Result<Result<(), String>, TargetError>> {
        self.through(move || self.inner.conditional_puts())
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
        b.reached(Instant::now());
        b.ok(Instant::now());
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

    #[test]
    fn a_success_begun_before_the_failure_proves_nothing() {
        let mut b = Breaker::default();
        let before = Instant::now();
        b.fail(&down(None));
        b.reached(before);
        b.ok(before);
        assert!(b.paused_for().is_some(), "an upload in flight when the store failed does not close the breaker");
        b.ok(Instant::now());
        assert!(b.paused_for().is_some(), "an upload that sent no request since (an excluded path) proves nothing");
        b.reached(Instant::now());
        b.ok(Instant::now());
        assert!(b.paused_for().is_none());
    }

    #[test]
    fn a_later_failure_never_shortens_a_retry_after() {
        let mut b = Breaker::default();
        b.fail(&down(Some(Duration::from_secs(120))));
        b.fail(&down(None));
        assert!(b.paused_for().unwrap() > Duration::from_secs(119));
    }

    /// A request through the gate waits out the pause, follows a pause ended early, and
    /// passes at once when there is none.
    #[tokio::test(flavor = "current_thread")]
    async fn requests_wait_while_paused() {
        let dir = std::env::temp_dir().join(format!("narq-gate-{}", std::process::id()));
        let b = Arc::new(Mutex::new(Breaker::default()));
        let t = Gated::wrap(Arc::new(storage::file::FileTarget::open(dir.clone())), &b);
        let timed = |t: Arc<dyn Target>| async move {
            let start = Instant::now();
            assert!(!t.exists("x.narinfo").await.unwrap());
            start.elapsed()
        };
        assert!(timed(t.clone()).await < Duration::from_millis(500));
        b.lock().unwrap().fail(&down(Some(Duration::from_secs(1))));
        let waited = timed(t.clone()).await;
        assert!(waited >= Duration::from_millis(990) && waited < Duration::from_millis(1500), "{waited:?}");
        b.lock().unwrap().fail(&down(Some(Duration::from_secs(60))));
        let request = tokio::spawn(timed(t.clone()));
        tokio::time::sleep(Duration::from_millis(300)).await;
        b.lock().unwrap().reached(Instant::now());
        b.lock().unwrap().ok(Instant::now());
        let waited = request.await.unwrap();
        assert!(waited < Duration::from_secs(1), "a pause ended early lets requests go: {waited:?}");
        // A failing request pauses uploads at once.
        std::fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::symlink("/nonexistent", dir.join("nar")).unwrap();
        assert!(t.put("nar/x", Body::Bytes(vec![]), storage::NAR_TYPE).await.is_err());
        assert!(b.lock().unwrap().paused_for().is_some());
        let _ = std::fs::remove_dir_all(dir);
    }
}
