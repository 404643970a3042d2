//! The durable queue as the socket thread, spool ingestion and the dispatcher share it.

use std::sync::{Arc, Mutex};

use crate::queue::Queue;

/// One SQLite connection behind a lock. A panic while it is held leaves the queue as
/// SQLite left it (each change is a transaction), so a poisoned lock is taken anyway.
#[derive(Clone)]
pub(super) struct SharedQueue(Arc<Mutex<Queue>>);

impl SharedQueue {
    pub(super) fn new(q: Queue) -> SharedQueue {
        SharedQueue(Arc::new(Mutex::new(q)))
    }

    /// Runs `f` on the queue on a blocking thread (SQLite commits fsync). A panic in `f` is
    /// returned as an error, not passed on: the dispatcher must outlive it.
    pub(super) async fn run<T: Send + 'static>(&self, f: impl FnOnce(&mut Queue) -> T + Send + 'static) -> Result<T, String> {
        let q = self.0.clone();
        tokio::task::spawn_blocking(move || f(&mut q.lock().unwrap_or_else(|e| e.into_inner())))
            .await
            .map_err(|e| format!("the queue task failed: {e}"))
    }

    /// Runs `f` on the queue on this thread: for the socket thread (see `daemon::run`), for
    /// which a hop to the blocking pool and back costs more than the request itself.
    pub(super) fn here<T>(&self, f: impl FnOnce(&mut Queue) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}
