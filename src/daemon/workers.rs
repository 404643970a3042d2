//! The worker pool: the dispatcher starts ready items on free workers and records what they
//! report.
//!
//! How many run at once is bounded by what they hold, not by a small fixed count: small
//! items (most paths of a closure, each a few round trips) run many at once, up to
//! [`MEMORY_IN_FLIGHT`] bytes of NARs in memory and `jobs` items; a large NAR streams (its
//! memory bounded by itself) [`STREAMS_AT_ONCE`] at a time, beside the small ones.
//!
//! Only the dispatcher holds the in-flight set and the breaker: a worker uploads one item
//! and reports [`Finished`] over a channel. A worker that panics is reported too (its
//! `JoinHandle` turns the panic into an error), as a failure that may pass, and its slot is
//! free again; nothing a worker does can stop the dispatcher.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, Notify};

use super::breaker::Breaker;
use super::shared_queue::SharedQueue;
use crate::outcome::UploadError;
use crate::queue::{Item, Queue};
use crate::upload::{Cost, Done, Uploader};

/// Bytes that small items in flight may hold in memory (NARs made in memory, encoders); one
/// item always may, whatever its size.
const MEMORY_IN_FLIGHT: u64 = 24 << 20;
/// Streamed NARs uploading at once: each compresses on every core already, and holds a few
/// parts in memory.
const STREAMS_AT_ONCE: usize = 1;

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
    /// When its upload began.
    started: Instant,
    result: Result<Done, UploadError>,
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
    /// What each item in flight holds ([`Uploader::cost`]).
    costs: HashMap<String, Cost>,
    /// Bytes the items in flight hold ([`Cost::Memory`]).
    memory: u64,
    /// Streamed NARs in flight.
    streams: usize,
    /// Whether the target works; while it does not, uploads pause. Failures reach it from
    /// the requests themselves (the uploader's target is [`super::breaker::Gated`]).
    breaker: Arc<Mutex<Breaker>>,
    /// [`Uploader::prepare`] has succeeded: uploads may start.
    prepared: bool,
    /// Cloned into each worker; kept here so that the channel never closes.
    report: mpsc::UnboundedSender<Finished>,
    /// The workers' reports.
    finished: mpsc::UnboundedReceiver<Finished>,
    /// In flight and pause, for `status`.
    publish: watch::Sender<Snapshot>,
}

impl Dispatcher {
    /// A dispatcher, and what it will publish for `status`. `breaker` is the one the
    /// uploader's target feeds and waits for ([`super::breaker::Gated`]).
    pub(super) fn new(uploader: Arc<Uploader>, breaker: Arc<Mutex<Breaker>>, queue: SharedQueue, jobs: usize, wake: Arc<Notify>) -> (Dispatcher, watch::Receiver<Snapshot>) {
        let (report, finished) = mpsc::unbounded_channel();
        let (publish, snapshot) = watch::channel(Snapshot::default());
        let d = Dispatcher { uploader, queue, jobs, wake, in_flight: HashSet::new(), costs: HashMap::new(), memory: 0, streams: 0, breaker, prepared: false, report, finished, publish };
        (d, snapshot)
    }

    pub(super) async fn run(mut self) {
        loop {
            let mut wait = Duration::from_secs(1);
            let paused = self.breaker().paused_for();
            if let Some(p) = paused {
                wait = p;
            } else if !self.prepared {
                // A failure has paused uploads already.
                self.prepared = self.uploader.prepare().await.is_ok();
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
                // Whatever else has finished meanwhile is recorded with it: one trip to the
                // queue's thread, and one look for ready items, for all of them.
                let mut all = vec![f];
                while let Ok(f) = self.finished.try_recv() {
                    all.push(f);
                }
                self.finish(all).await;
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
                for item in items {
                    let cost = self.uploader.cost(&item);
                    if self.fits(cost) {
                        self.start(item, cost, epoch);
                    }
                }
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

    /// Whether an item that holds `cost` may start now (see the module doc).
    fn fits(&self, cost: Cost) -> bool {
        match cost {
            Cost::Stream => self.streams < STREAMS_AT_ONCE,
            Cost::Memory(bytes) => self.memory == 0 || self.memory + bytes <= MEMORY_IN_FLIGHT,
        }
    }

    fn start(&mut self, item: Item, cost: Cost, epoch: u64) {
        self.in_flight.insert(item.key.clone());
        match cost {
            Cost::Stream => self.streams += 1,
            Cost::Memory(bytes) => self.memory += bytes,
        }
        self.costs.insert(item.key.clone(), cost);
        let uploader = self.uploader.clone();
        let report = self.report.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let job = tokio::spawn({
                let item = item.clone();
                async move { upload(&uploader, &item, epoch).await }
            });
            let result = job.await.unwrap_or_else(|e| Err(UploadError::Transient(panic_message(e))));
            // Fails only once the dispatcher is gone, at shutdown.
            let _ = report.send(Finished { item, started, result });
        });
    }

    /// Feeds the breaker, records the results in the queue, and frees the items' slots.
    async fn finish(&mut self, all: Vec<Finished>) {
        let mut records = Vec::with_capacity(all.len());
        for Finished { item, started, result } in all {
            if result.is_ok() {
                self.breaker().ok(started);
            }
            records.push((item.key, item.attempts, result));
        }
        let keys: Vec<String> = records.iter().map(|(k, _, _)| k.clone()).collect();
        let recorded = self.queue.run(move |q| record_all(q, records)).await;
        match recorded {
            Ok(errors) => errors.into_iter().for_each(|(key, e)| tracing::error!(item = %key, "recording the result in the queue: {e}")),
            Err(e) => tracing::error!("recording {} results in the queue: {e}", keys.len()),
        }
        for key in keys {
            self.in_flight.remove(&key);
            match self.costs.remove(&key) {
                Some(Cost::Stream) => self.streams -= 1,
                Some(Cost::Memory(bytes)) => self.memory -= bytes,
                None => {}
            }
        }
    }

    fn breaker(&self) -> std::sync::MutexGuard<'_, Breaker> {
        self.breaker.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self) {
        let snapshot = Snapshot { in_flight: self.in_flight.len(), paused: self.breaker().pause() };
        self.publish.send_replace(snapshot);
    }
}

/// Records how uploads ended: the results that only update their item in one transaction
/// (one fsync for a batch of small paths instead of one each), the permanent failures (which
/// fail their dependents too) each in its own. Returns the keys whose result could not be
/// recorded, and why.
fn record_all(q: &mut Queue, records: Vec<(String, u32, Result<Done, UploadError>)>) -> Vec<(String, rusqlite::Error)> {
    let (permanent, simple): (Vec<_>, Vec<_>) = records.into_iter().partition(|(_, _, r)| matches!(r, Err(UploadError::Permanent(_))));
    let mut errors = Vec::new();
    let keys: Vec<String> = simple.iter().map(|(k, _, _)| k.clone()).collect();
    let batch = q.in_one_transaction(|q| {
        for (key, attempts, result) in simple {
            record_simple(q, &key, attempts, result)?;
        }
        Ok(())
    });
    if let Err(e) = batch {
        // Rolled back: none of them is recorded, each will be uploaded (checked) again.
        errors.extend(keys.into_iter().map(|k| (k, clone_error(&e))));
    }
    for (key, attempts, result) in permanent {
        if let Err(e) = record(q, &key, attempts, result) {
            errors.push((key, e));
        }
    }
    errors
}

/// A `rusqlite::Error` for each item of a failed batch (the error itself is not `Clone`).
fn clone_error(e: &rusqlite::Error) -> rusqlite::Error {
    rusqlite::Error::ToSqlConversionFailure(e.to_string().into())
}

/// Records an upload that ended without failing for good: done, or retried later.
fn record_simple(q: &Queue, key: &str, attempts: u32, result: Result<Done, UploadError>) -> Result<(), rusqlite::Error> {
    match result {
        Ok(Done { outcome, marker }) => q.done(key, outcome, marker.as_deref()),
        Err(UploadError::Target(e)) => q.retry_later(key, attempts, &e.msg).map(drop),
        Err(UploadError::Transient(e)) => {
            let delay = q.retry_later(key, attempts, &e)?;
            tracing::warn!(item = %key, attempt = attempts + 1, retry_in_ms = delay.as_millis() as u64, error = %e, "upload failed, will retry: {key}: {e}");
            Ok(())
        }
        // Recorded by [`record`] (it fails the dependents in a transaction of its own).
        Err(UploadError::Permanent(_)) => Err(rusqlite::Error::ToSqlConversionFailure(format!("{key}: a permanent failure in a batch").into())),
    }
}

/// Records how an upload ended.
fn record(q: &mut Queue, key: &str, attempts: u32, result: Result<Done, UploadError>) -> Result<(), rusqlite::Error> {
    match result {
        Err(UploadError::Permanent(e)) => {
            let dependents = q.fail(key, &e)?;
            tracing::error!(item = %key, dependents, error = %e, "upload failed permanently: {key}: {e}");
            Ok(())
        }
        other => record_simple(q, key, attempts, other),
    }
}

/// One worker's upload.
async fn upload(uploader: &Uploader, item: &Item, epoch: u64) -> Result<Done, UploadError> {
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
