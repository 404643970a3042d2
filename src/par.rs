//! Work split over the CPUs, for the one thing narq does per path in bulk on the request
//! path: signing (hook, `narq push`) and checking signatures (daemon). Each costs ~50 µs a
//! path; a first push of a 1,000-path closure does 1,000 of each.

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
