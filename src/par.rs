//! Work split over the CPUs, for the one thing narq does per path in bulk on the request
//! path: signing (hook, `narq push`) and checking signatures (daemon). Each costs ~50 µs a
//! path; a first push of a 1,000-path closure does 1,000 of each. And requests in flight at
//! once ([`try_concurrently`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::Poll;

/// Below this many items a thread costs more than it saves.
const MIN_PER_THREAD: usize = 32;

/// `items.iter().map(f).collect()`, on up to all CPUs when there are many items.
pub fn map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = cpus.min(items.len() / MIN_PER_THREAD).max(1);
    if threads == 1 {
        return items.iter().map(f).collect();
    }
    let chunk = items.len().div_ceil(threads);
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = items.chunks(chunk).map(|c| s.spawn(move || c.iter().map(f).collect::<Vec<R>>())).collect();
        handles.into_iter().flat_map(|h| h.join().expect("worker thread panicked")).collect()
    })
}

/// `f` on every item, at most `jobs` at a time; the results in the order they finish, or
/// the first error. The calls run as futures of this one task (the I/O they wait on runs on
/// the runtime's threads), so that they may borrow, e.g. a `&dyn Target`.
pub async fn try_concurrently<T, R, E, Fut: Future<Output = Result<R, E>>>(items: Vec<T>, jobs: usize, f: impl Fn(T) -> Fut) -> Result<Vec<R>, E> {
    let queue = Mutex::new(items.into_iter());
    let out = Mutex::new(Vec::new());
    let worker = || async {
        loop {
            let next = queue.lock().unwrap_or_else(|e| e.into_inner()).next();
            let Some(item) = next else { return Ok::<(), E>(()) };
            let r = f(item).await?;
            out.lock().unwrap_or_else(|e| e.into_inner()).push(r);
        }
    };
    let mut workers: Vec<Option<Pin<Box<_>>>> = (0..jobs.max(1)).map(|_| Some(Box::pin(worker()))).collect();
    std::future::poll_fn(|cx| {
        let mut running = false;
        for slot in workers.iter_mut() {
            if let Some(w) = slot {
                match w.as_mut().poll(cx) {
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(())) => *slot = None,
                    Poll::Pending => running = true,
                }
            }
        }
        if running { Poll::Pending } else { Poll::Ready(Ok(())) }
    })
    .await?;
    drop(workers);
    Ok(out.into_inner().unwrap_or_else(|e| e.into_inner()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn keeps_order_at_every_size() {
        for n in [0, 1, 31, 32, 64, 65, 1000] {
            let items: Vec<usize> = (0..n).collect();
            assert_eq!(super::map(&items, |i| i * 2), items.iter().map(|i| i * 2).collect::<Vec<_>>(), "n={n}");
        }
    }
}
