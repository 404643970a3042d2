//! The worker pool: the dispatcher starts ready items on free workers and records what they
//! report.
//!
//! Only the dispatcher holds the in-flight set and the breaker: a worker uploads one item
//! and reports [`Finished`] over a channel. A worker that panics is reported too (its
//! `JoinHandle` turns the panic into an error), as a failure that may pass, and its slot is
//! free again; nothing a worker does can stop the dispatcher.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, Notify};

use super::breaker::Breaker;
use super::shared_queue::SharedQueue;
use crate::queue::{Item, Outcome, Queue};
use crate::upload::{UploadError, Uploader};

/// What the dispatcher publishes for `status`.
#[derive(Debug, Clone, Default)]
pub(super) struct Snapshot {
    /// Items being uploaded now.
    pub(super) in_flight: usize,
    /// Until when uploads are paused, and why (the breaker's last failure).
    pub(super) paused: Option<(Instant, String)>,
}

impl Snapshot {
    /// Why uploads are paused now, if they are.
    pub(super) fn target_error(&self) -> Option<String> {
        self.paused.as_ref().filter(|(until, _)| *until > Instant::now()).map(|(_, e)| e.clone())
    }

    /// Seconds until uploads are tried again, while paused.
    pub(super) fn paused_secs(&self) -> Option<f64> {
        self.paused.as_ref().and_then(|(until, _)| until.checked_duration_since(Instant::now())).map(|d| d.as_secs_f64())
    }
}

/// A worker's report: the item it was given and how its upload ended.
struct Finished {
    item: Item,
    result: Result<Outcome, UploadError>,
}

/// Starts ready items on free workers; sleeps until woken, a worker finishes, a retry is
/// due, or a pause ends.
pub(super) struct Dispatcher {
    /// What the workers upload with.
    uploader: Arc<Uploader>,
    /// Where items come from and their results go.
    queue: SharedQueue,
    /// The most items uploaded at once (`jobs`).
    jobs: usize,
    /// Something was enqueued.
    wake: Arc<Notify>,
    /// Keys of the items being uploaded now.
    in_flight: HashSet<String>,
    /// Whether the target works; while it does not, uploads pause.
    breaker: Breaker,
    /// `nix-cache-info` is known to be in the cache.
    cache_info: bool,
    /// Cloned into each worker; kept here so that the channel never closes.
    report: mpsc::UnboundedSender<Finished>,
    /// The workers' reports.
    finished: mpsc::UnboundedReceiver<Finished>,
    /// In flight and pause, for `status`.
    publish: watch::Sender<Snapshot>,
}

impl Dispatcher {
    /// A dispatcher, and what it will publish for `status`.
    pub(super) fn new(uploader: Arc<Uploader>, queue: SharedQueue, jobs: usize, wake: Arc<Notify>) -> (Dispatcher, watch::Receiver<Snapshot>) {
        let (report, finished) = mpsc::unbounded_channel();
        let (publish, snapshot) = watch::channel(Snapshot::default());
        let d = Dispatcher { uploader, queue, jobs, wake, in_flight: HashSet::new(), breaker: Breaker::default(), cache_info: false, report, finished, publish };
        (d, snapshot)
    }

    pub(super) async fn run(mut self) {
        loop {
            let mut wait = Duration::from_secs(1);
            if let Some(p) = self.breaker.paused_for() {
                wait = p;
            } else if !self.cache_info {
                match self.uploader.ensure_cache_info().await {
                    Ok(()) => self.cache_info = true,
                    Err(e) => self.breaker.fail(&e),
                }
                self.publish();
                continue;
            } else if let Some(next) = self.start_ready().await {
                wait = wait.min(next + Duration::from_millis(5));
            }
            self.publish();
            let finished = tokio::select! {
                f = self.finished.recv() => f,
                _ = self.wake.notified() => None,
                _ = tokio::time::sleep(wait) => None,
            };
            if let Some(f) = finished {
                self.finish(f).await;
            }
        }
    }

    /// Starts what is ready on the free workers; returns when the next retry is due.
    async fn start_ready(&mut self) -> Option<Duration> {
        let free = self.jobs.saturating_sub(self.in_flight.len());
        if free == 0 {
            return None;
        }
        let busy = self.in_flight.clone();
        // Taken before the queue is read: a collection seen after it makes the items check
        // the references they were found ready with (see `Uploader::run_in`).
        let epoch = self.uploader.gc.as_ref().map_or(0, |g| g.epoch());
        match self.queue.run(move |q| (q.ready(free, &busy), q.next_retry_in())).await {
            Ok((Ok(items), next)) => {
                items.into_iter().for_each(|item| self.start(item, epoch));
                next.ok().flatten()
            }
            Ok((Err(e), _)) => {
                tracing::error!("reading the queue: {e}");
                None
            }
            Err(e) => {
                tracing::error!("reading the queue: {e}");
                None
            }
        }
    }

    fn start(&mut self, item: Item, epoch: u64) {
        self.in_flight.insert(item.key.clone());
        let uploader = self.uploader.clone();
        let report = self.report.clone();
        tokio::spawn(async move {
            let job = tokio::spawn({
                let item = item.clone();
                async move { upload(&uploader, &item, epoch).await }
            });
            let result = job.await.unwrap_or_else(|e| Err(UploadError::Transient(panic_message(e))));
            // Fails only once the dispatcher is gone, at shutdown.
            let _ = report.send(Finished { item, result });
        });
    }

    /// Feeds the breaker, records the result in the queue, and frees the item's slot.
    async fn finish(&mut self, Finished { item, result }: Finished) {
        match &result {
            Ok(_) => self.breaker.ok(),
            Err(UploadError::Target(e)) => self.breaker.fail(e),
            Err(_) => {}
        }
        let key = item.key.clone();
        let attempts = item.attempts;
        let recorded = self.queue.run(move |q| record(q, &key, attempts, result)).await;
        if let Err(e) = recorded.and_then(|r| r.map_err(|e| e.to_string())) {
            tracing::error!(item = %item.key, "recording the result in the queue: {e}");
        }
        self.in_flight.remove(&item.key);
    }

    fn publish(&self) {
        let snapshot = Snapshot { in_flight: self.in_flight.len(), paused: self.breaker.pause() };
        self.publish.send_replace(snapshot);
    }
}

/// Records how an upload ended.
fn record(q: &mut Queue, key: &str, attempts: u32, result: Result<Outcome, UploadError>) -> Result<(), rusqlite::Error> {
    match result {
        Ok(outcome) => q.done(key, outcome),
        Err(UploadError::Target(e)) => q.retry_later(key, attempts, &e.msg).map(drop),
        Err(UploadError::Transient(e)) => {
            let delay = q.retry_later(key, attempts, &e)?;
            tracing::warn!(item = %key, attempt = attempts + 1, retry_in_ms = delay.as_millis() as u64, error = %e, "upload failed, will retry: {key}: {e}");
            Ok(())
        }
        Err(UploadError::Permanent(e)) => {
            let dependents = q.fail(key, &e)?;
            tracing::error!(item = %key, dependents, error = %e, "upload failed permanently: {key}: {e}");
            Ok(())
        }
    }
}

/// One worker's upload.
async fn upload(uploader: &Uploader, item: &Item, epoch: u64) -> Result<Outcome, UploadError> {
    #[cfg(debug_assertions)]
    panic_if_asked(item);
    uploader.run_in(item, epoch).await
}

/// Test-only, and only in debug builds: `NARQ_TEST_PANIC_ON=<substring>` makes the upload
/// of every item whose key contains it panic, so that a test can prove that a panicking
/// worker is reported and its slot reused. Release builds have no such hook.
#[cfg(debug_assertions)]
fn panic_if_asked(item: &Item) {
    if let Some(s) = std::env::var_os("NARQ_TEST_PANIC_ON") {
        let s = s.to_string_lossy();
        if !s.is_empty() && item.key.contains(&*s) {
            panic!("NARQ_TEST_PANIC_ON={s}: panicking on {}", item.key);
        }
    }
}

/// What a worker's `JoinError` says: the panic's message, for the queue and the log.
fn panic_message(e: tokio::task::JoinError) -> String {
    if !e.is_panic() {
        return format!("the upload was cancelled: {e}");
    }
    let payload = e.into_panic();
    let msg = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into());
    format!("the upload panicked: {msg}")
}
