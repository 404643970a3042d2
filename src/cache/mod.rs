//! Reading a whole cache as a stream: [`scan`] lists every object (the key space in parts,
//! listed at once), reads every top-level narinfo — from the [`index`] when it holds the
//! listed version, else from the cache, a few at a time — and hands objects and narinfos to
//! its caller as they come. Memory holds what is in flight (pages, a batch of narinfos),
//! never the cache. `narq verify`, `narq sign` and the maintenance commands (`rm`, `gc`)
//! build on it: each keeps what it needs and no more (`verify` spills to disk, [`spill`];
//! `gc` keeps one compact record per path, [`gc::Model`]).

pub mod collection;
pub mod deep;
pub mod gc;
pub mod index;
pub mod maint;
pub mod roots;
pub mod sign;
pub mod spill;
pub mod verify;

use std::cell::Cell;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::storage::{Incomplete, Object, Target, TargetError};

pub use crate::par::try_concurrently;

/// Narinfos handed on at a time: the index is asked about them in one go, the missing ones
/// read together.
const BATCH: usize = 1000;

/// Pages of a listing ([`crate::storage::LIST_PAGE`] objects each) queued for the reader
/// beyond the one each part being listed holds: what is in flight stays the same whatever
/// the size of the cache, and the listing waits while the checks are behind.
pub const PAGES_QUEUED: usize = 4;

/// A top-level narinfo as a scan read it.
#[derive(Debug, Clone)]
pub struct Read {
    /// The object as listed (key, size, mtime, ETag).
    pub object: Object,
    /// Its text, or why it has none (not UTF-8). `None`: deleted between the listing and the read.
    pub body: Option<Result<String, String>>,
    /// What a check of this version found before ([`index::Row::verdict`]); a caller that
    /// checks it again sets what it found, and the index keeps it.
    pub verdict: Option<String>,
    /// What the index held as the verdict.
    remembered: Option<String>,
    /// The listed version, if the listing gives one (else it is not remembered).
    stamp: Option<String>,
    /// Read from the cache (not from the index).
    pub fetched: bool,
}

impl Read {
    /// A narinfo read without a scan.
    pub fn new(object: Object, body: Option<Result<String, String>>) -> Read {
        Read { object, body, verdict: None, remembered: None, stamp: None, fetched: true }
    }

    /// The hash part its key names (`<hashpart>.narinfo`).
    pub fn hash_part(&self) -> &str {
        self.object.key.strip_suffix(".narinfo").unwrap_or(&self.object.key)
    }
}

/// What a scan saw.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Stats {
    /// Objects listed.
    pub objects: u64,
    /// Top-level narinfos.
    pub narinfos: u64,
    /// Of those, read from the cache (the rest came from the index).
    pub fetched: u64,
    /// Narinfos the index held that the listing no longer shows.
    #[serde(skip)]
    pub gone: u64,
}

/// How far a scan is, for a progress line: objects listed, narinfos handed on and read.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    pub listed: u64,
    pub narinfos: u64,
    pub fetched: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("the cache index {0}: {1}")]
    Index(PathBuf, rusqlite::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Threads for blocking work (`file://` reads, listing, checks) at most: enough for the
/// default 32 reads in flight and the stages beside them. Tokio's default (512) lets a
/// loaded machine's pool grow to hundreds of threads over a long scan (a new one whenever
/// none is idle at the moment a read is handed over), each with its stack and malloc arena:
/// memory that grew with the length of the run.
const BLOCKING_THREADS: usize = 40;

/// The runtime `verify`, `sign`, `gc` and `rm` run on.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().max_blocking_threads(BLOCKING_THREADS).build()
}

/// Where the index of the cache at `store` (its URL, or [`Target::describe`]) lives under
/// the state dir: one file per cache, so that switching caches keeps each one warm.
pub fn index_path(state_dir: &Path, store: &str) -> PathBuf {
    let h = crate::nix::hash::Sha256::digest(store.as_bytes()).to_hex();
    state_dir.join("cache-index").join(format!("{}.sqlite", &h[..16]))
}

pub fn is_narinfo(key: &str) -> bool {
    key.ends_with(".narinfo") && !key.contains('/')
}

/// The index of a scan, and where it is (for errors).
pub struct Indexed {
    pub index: Mutex<index::Index>,
    pub path: PathBuf,
}

impl Indexed {
    pub fn open(path: &Path) -> Result<Indexed, ScanError> {
        let index = index::Index::open(path).map_err(|e| ScanError::Index(path.to_path_buf(), e))?;
        Ok(Indexed { index: Mutex::new(index), path: path.to_path_buf() })
    }

    /// Runs `f` on the index (never across an await).
    pub fn with<T>(&self, f: impl FnOnce(&mut index::Index) -> rusqlite::Result<T>) -> Result<T, ScanError> {
        f(&mut self.index.lock().unwrap_or_else(|e| e.into_inner())).map_err(|e| ScanError::Index(self.path.clone(), e))
    }

    /// Forgets the narinfos the index holds whose key `listed` refuses (see [`Stats::gone`]).
    pub fn prune(&self, from: &str, to: Option<&str>, listed: &mut dyn FnMut(&str) -> bool) -> Result<u64, ScanError> {
        self.with(|ix| ix.prune(from, to, listed))
    }
}

/// The uploads begun and never finished (S3 multipart uploads, `file://` temp files), and
/// what could not be looked at: listing them is optional, and a store that does not
/// implement it (HTTP 501, 405) has them neither reported nor aborted, said once.
pub async fn incomplete(target: &dyn Target) -> Result<(Vec<Incomplete>, Vec<String>), TargetError> {
    match target.list_incomplete("").await {
        Ok(found) => Ok((found, Vec::new())),
        Err(e) if e.unsupported => {
            let skipped = format!("skipped incomplete uploads (neither checked nor aborted): {e}");
            eprintln!("narq: {skipped}");
            Ok((Vec::new(), vec![skipped]))
        }
        Err(e) => Err(e),
    }
}

/// Lists the whole cache (`list_jobs` parts at a time) and reads every top-level narinfo (up
/// to `jobs` reads at a time) through `ix`: a narinfo whose listed version is the one the
/// index holds is not fetched. Every other object goes to `on_object` as it is listed; the
/// narinfos go to `on_batch` a batch at a time, which hands them back (with any verdict it
/// set) to be remembered. `progress` is called as it goes. The index is not pruned: callers
/// that see every key do it ([`Indexed::prune`]) when [`Stats::gone`] says so.
pub async fn scan<N, Fut>(
    target: &dyn Target,
    ix: &Indexed,
    jobs: usize,
    list_jobs: usize,
    on_object: &mut dyn FnMut(Object),
    mut on_batch: N,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<Stats, ScanError>
where
    N: FnMut(Vec<Read>) -> Fut,
    Fut: Future<Output = Result<Vec<Read>, ScanError>>,
{
    let known = ix.with(|i| i.len())?;
    let (pages_tx, pages) = tokio::sync::mpsc::channel::<Vec<Object>>(PAGES_QUEUED);
    let (batch_tx, batches) = tokio::sync::mpsc::channel::<Vec<Read>>(1);
    let stats = Cell::new(Stats::default());
    let found_in_index = Cell::new(0u64);
    let bump = |f: &dyn Fn(&mut Stats)| {
        let mut s = stats.get();
        f(&mut s);
        stats.set(s);
        progress(Progress { listed: s.objects, narinfos: s.narinfos, fetched: s.fetched });
    };

    let listing = async {
        let r = target.list_all(list_jobs, pages_tx).await;
        r.map_err(ScanError::from)
    };
    // Pages → objects and batches of narinfos, read from the index or the cache.
    let read = async {
        // Owned here: a reader that stops drops them, and the listing stops.
        let (mut pages, batch_tx) = (pages, batch_tx);
        let mut pending: Vec<Object> = Vec::new();
        loop {
            let page = pages.recv().await;
            let done = page.is_none();
            for o in page.into_iter().flatten() {
                bump(&|s| s.objects += 1);
                if is_narinfo(&o.key) {
                    pending.push(o);
                } else {
                    on_object(o);
                }
            }
            if pending.len() >= BATCH || (done && !pending.is_empty()) {
                let batch = read_batch(target, ix, std::mem::take(&mut pending), jobs, &found_in_index, &bump).await?;
                if batch_tx.send(batch).await.is_err() {
                    break;
                }
            }
            if done {
                break;
            }
        }
        Ok::<_, ScanError>(())
    };
    // Batches → the caller, then what it found (and what was fetched) into the index.
    let consume = async {
        let mut batches = batches;
        while let Some(batch) = batches.recv().await {
            let batch = on_batch(batch).await?;
            let fresh: Vec<(String, index::Row)> = batch
                .iter()
                .filter(|r| r.fetched || r.verdict != r.remembered)
                .filter_map(|r| {
                    let body = r.body.as_ref()?.as_ref().ok()?;
                    Some((r.object.key.clone(), index::Row { stamp: r.stamp.clone()?, body: body.clone(), verdict: r.verdict.clone() }))
                })
                .collect();
            if !fresh.is_empty() {
                ix.with(|i| i.put(&fresh))?;
            }
        }
        Ok::<_, ScanError>(())
    };
    let (listed, read, consumed) = tokio::join!(listing, read, consume);
    // The first error is the one to tell; a reader that stopped makes the others stop.
    consumed?;
    read?;
    listed?;
    let mut s = stats.get();
    s.gone = known.saturating_sub(found_in_index.get());
    Ok(s)
}

/// Looks `objects` (narinfos) up in the index and reads the ones it does not hold in their
/// listed version from the cache, `jobs` at a time.
async fn read_batch(target: &dyn Target, ix: &Indexed, objects: Vec<Object>, jobs: usize, found: &Cell<u64>, bump: &dyn Fn(&dyn Fn(&mut Stats))) -> Result<Vec<Read>, ScanError> {
    let mut out = Vec::with_capacity(objects.len());
    let mut todo = Vec::new();
    ix.with(|i| {
        for o in objects {
            let stamp = index::stamp(&o);
            let row = i.get(&o.key)?;
            found.set(found.get() + row.is_some() as u64);
            match row {
                Some(row) if Some(&row.stamp) == stamp.as_ref() => {
                    out.push(Read { object: o, body: Some(Ok(row.body)), remembered: row.verdict.clone(), verdict: row.verdict, stamp, fetched: false })
                }
                _ => todo.push((o, stamp)),
            }
        }
        Ok(())
    })?;
    let known = out.len() as u64;
    bump(&|s| s.narinfos += known);
    let fetched = try_concurrently(todo, jobs.max(1), |(o, stamp)| async move {
        let body = target.get(&o.key).await?;
        let body = body.map(|b| String::from_utf8(b).map_err(|_| "not UTF-8".to_string()));
        Ok::<_, TargetError>(Read { object: o, body, verdict: None, remembered: None, stamp, fetched: true })
    })
    .await?;
    for _ in &fetched {
        bump(&|s| {
            s.narinfos += 1;
            s.fetched += 1;
        });
    }
    out.extend(fetched);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{file::FileTarget, Body};

    use crate::nix::narinfo::SAMPLE as NARINFO;

    /// Scans `t` through the index at `ix`: (stats, the narinfos read, the other keys).
    async fn scanned(t: &dyn Target, ix: &Path) -> (Stats, Vec<Read>, Vec<String>) {
        let ix = Indexed::open(ix).unwrap();
        let (mut reads, mut others) = (Vec::new(), Vec::new());
        let stats = {
            let reads = std::cell::RefCell::new(&mut reads);
            scan(t, &ix, 4, 4, &mut |o| others.push(o.key), |b| {
                reads.borrow_mut().extend(b.iter().cloned());
                async { Ok(b) }
            }, &|_| {})
            .await
            .unwrap()
        };
        reads.sort_by(|a, b| a.object.key.cmp(&b.object.key));
        (stats, reads, others)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn second_scan_fetches_only_what_changed() {
        let dir = std::env::temp_dir().join(format!("narq-scan-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let t = FileTarget::open(dir.join("cache"));
        let put = |k: &'static str, b: String| t.put(k, Body::Bytes(b.into_bytes()), "");
        put("6il1lpdfxrnnfp077s9yqgr5nl3k3cm6.narinfo", NARINFO.into()).await.unwrap();
        put("z4asv3j07d89ywjf8fxkn7sg6mf5s9q5.narinfo", "garbage".into()).await.unwrap();
        put("nar/1w1fff338fvdw53sqcamqgqmxgrgjyb3j3bzkqmr0qfkvlsqb05w.nar.zst", "x".into()).await.unwrap();
        let ix = dir.join("index.sqlite");
        let (s, reads, others) = scanned(&t, &ix).await;
        assert_eq!((s.fetched, s.narinfos, s.objects), (2, 2, 3));
        assert_eq!(others, ["nar/1w1fff338fvdw53sqcamqgqmxgrgjyb3j3bzkqmr0qfkvlsqb05w.nar.zst"]);
        assert_eq!(reads[0].hash_part(), "6il1lpdfxrnnfp077s9yqgr5nl3k3cm6");
        let (s, reads, _) = scanned(&t, &ix).await;
        assert_eq!((s.fetched, s.narinfos, s.gone), (0, 2, 0));
        assert_eq!(reads[1].body.as_ref().unwrap().as_deref(), Ok("garbage"), "what does not parse is remembered too");
        put("z4asv3j07d89ywjf8fxkn7sg6mf5s9q5.narinfo", NARINFO.replace("160", "161")).await.unwrap();
        let (s, reads, _) = scanned(&t, &ix).await;
        assert_eq!(s.fetched, 1);
        assert!(reads[1].body.as_ref().unwrap().as_ref().unwrap().contains("161"));
        t.delete(&["6il1lpdfxrnnfp077s9yqgr5nl3k3cm6.narinfo".into()]).await.unwrap();
        let (s, _, _) = scanned(&t, &ix).await;
        assert_eq!((s.fetched, s.narinfos, s.gone), (0, 1, 1));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
