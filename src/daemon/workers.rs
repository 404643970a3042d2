//! The worker pool: the dispatcher starts ready items on free workers.

use std::sync::Arc;
use std::time::Duration;

use super::Shared;
use crate::queue::Item;
use crate::upload::UploadError;

/// Starts ready items on free workers; sleeps until woken, a retry is due, or a pause ends.
pub(super) async fn dispatch(shared: Arc<Shared>) {
    loop {
        let paused = shared.health.lock().unwrap().paused_for();
        if let Some(p) = paused {
            tokio::time::sleep(p).await;
            continue;
        }
        if !shared.health.lock().unwrap().cache_info {
            match shared.uploader.ensure_cache_info().await {
                Ok(()) => shared.health.lock().unwrap().cache_info = true,
                Err(e) => {
                    shared.health.lock().unwrap().fail(&e);
                    continue;
                }
            }
        }
        let (free, busy) = {
            let f = shared.in_flight.lock().unwrap();
            (shared.config.jobs.saturating_sub(f.len()), f.clone())
        };
        let mut wait = Duration::from_secs(1);
        if free > 0 {
            match shared.queue(move |q| (q.ready(free, &busy), q.next_retry_in())).await {
                (Ok(items), next) => {
                    for item in items {
                        shared.in_flight.lock().unwrap().insert(item.key.clone());
                        tokio::spawn(work(shared.clone(), item));
                    }
                    if let Ok(Some(n)) = next {
                        wait = wait.min(n + Duration::from_millis(5));
                    }
                }
                (Err(e), _) => tracing::error!("reading the queue: {e}"),
            }
        }
        tokio::select! {
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

async fn work(shared: Arc<Shared>, item: Item) {
    let result = shared.uploader.run(&item).await;
    match &result {
        Ok(_) => shared.health.lock().unwrap().ok(),
        Err(UploadError::Target(e)) => shared.health.lock().unwrap().fail(e),
        Err(_) => {}
    }
    let key = item.key.clone();
    let attempts = item.attempts;
    let recorded = shared
        .queue(move |q| -> Result<(), rusqlite::Error> {
            match result {
                Ok(outcome) => q.done(&key, outcome),
                Err(UploadError::Target(e)) => q.retry_later(&key, attempts, &e.msg).map(drop),
                Err(UploadError::Transient(e)) => {
                    let delay = q.retry_later(&key, attempts, &e)?;
                    tracing::warn!(item = %key, attempt = attempts + 1, retry_in_ms = delay.as_millis() as u64, error = %e, "upload failed, will retry: {key}: {e}");
                    Ok(())
                }
                Err(UploadError::Permanent(e)) => {
                    let dependents = q.fail(&key, &e)?;
                    tracing::error!(item = %key, dependents, error = %e, "upload failed permanently: {key}: {e}");
                    Ok(())
                }
            }
        })
        .await;
    if let Err(e) = recorded {
        tracing::error!(item = %item.key, "recording the result in the queue: {e}");
    }
    shared.in_flight.lock().unwrap().remove(&item.key);
    shared.wake.notify_one();
}
