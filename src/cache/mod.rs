//! Reading a whole cache: [`scan`] lists every object and reads every narinfo, fetching
//! only those the [`index`] does not already hold in the same version. `narq verify`,
//! `narq sign` and the maintenance commands (`rm`, `gc`) build on it.

pub mod collection;
pub mod deep;
pub mod gc;
pub mod index;
pub mod maint;
pub mod roots;
pub mod sign;
pub mod verify;

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Mutex;
use std::task::Poll;

use crate::nix::NarInfo;
use crate::storage::{Incomplete, Object, Target, TargetError};

/// One `<hashpart>.narinfo` of the cache.
#[derive(Debug, Clone)]
pub struct NarInfoEntry {
    /// The object as listed (key, size, mtime, ETag).
    pub object: Object,
    /// Its contents, or why they do not parse (not UTF-8, a bad field).
    pub info: Result<NarInfo, String>,
}

impl NarInfoEntry {
    /// The hash part its key names (`<hashpart>.narinfo`).
    pub fn hash_part(&self) -> &str {
        self.object.key.strip_suffix(".narinfo").unwrap_or(&self.object.key)
    }
}

/// Everything a scan found.
#[derive(Debug, Default)]
pub struct Scan {
    /// Every object but the top-level narinfos: NARs, listings (`.ls`), logs,
    /// `nix-cache-info`, realisations, narq's own objects.
    pub objects: Vec<Object>,
    /// Every top-level `*.narinfo`, parsed. One deleted between listing and reading is left out.
    pub narinfos: Vec<NarInfoEntry>,
    /// Uploads begun and never finished (S3 multipart uploads, `file://` temp files).
    pub incomplete: Vec<Incomplete>,
    /// How many narinfos were read from the cache (the rest came from the index).
    pub fetched: u64,
    /// What the scan could not look at, and why, one line each (a store that does not list
    /// incomplete uploads): the commands say so and do the rest.
    pub skipped: Vec<String>,
}

/// How far a scan is, for a progress line.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    /// Objects listed so far.
    pub listed: u64,
    /// Narinfos to read from the cache (known once the listing is done).
    pub to_fetch: u64,
    /// Of those, read so far.
    pub fetched: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("the cache index {0}: {1}")]
    Index(PathBuf, rusqlite::Error),
}

/// Where the index of the cache at `store` (its URL, or [`Target::describe`]) lives under
/// the state dir: one file per cache, so that switching caches keeps each one warm.
pub fn index_path(state_dir: &Path, store: &str) -> PathBuf {
    let h = crate::nix::hash::Sha256::digest(store.as_bytes()).to_hex();
    state_dir.join("cache-index").join(format!("{}.sqlite", &h[..16]))
}

fn is_narinfo(key: &str) -> bool {
    key.ends_with(".narinfo") && !key.contains('/')
}

/// Lists the whole cache and reads every narinfo, at most `jobs` at a time, through the
/// index at `index_path`: a narinfo whose listed version (ETag, or size and mtime) is the
/// one the index holds is not fetched again. The index is updated (and cleared of narinfos
/// no longer there) before this returns. `progress` is called as the scan goes.
pub async fn scan(target: &dyn Target, index_path: &Path, jobs: usize, progress: &(dyn Fn(Progress) + Sync)) -> Result<Scan, ScanError> {
    let ix_err = |e| ScanError::Index(index_path.to_path_buf(), e);
    let mut ix = index::Index::open(index_path).map_err(ix_err)?;
    let known = ix.load().map_err(ix_err)?;

    let mut scan = Scan::default();
    let mut listed_narinfos = Vec::new();
    let mut n = 0u64;
    target
        .list("", &mut |o: Object| {
            n += 1;
            if n.is_multiple_of(1000) {
                progress(Progress { listed: n, ..Progress::default() });
            }
            if is_narinfo(&o.key) {
                listed_narinfos.push(o);
            } else {
                scan.objects.push(o);
            }
        })
        .await?;
    scan.incomplete = match target.list_incomplete("").await {
        Ok(found) => found,
        // An optional call: without it, incomplete uploads are neither reported nor aborted.
        Err(e) if e.unsupported => {
            let skipped = format!("skipped incomplete uploads (neither checked nor aborted): {e}");
            eprintln!("narq: {skipped}");
            scan.skipped.push(skipped);
            Vec::new()
        }
        Err(e) => return Err(e.into()),
    };

    // What the index holds in the listed version is parsed from there; the rest is fetched.
    let mut to_fetch = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for o in listed_narinfos {
        seen.insert(o.key.clone());
        let stamp = index::stamp(&o);
        match (known.get(&o.key), &stamp) {
            (Some((s, body)), Some(now)) if s == now => {
                let info = NarInfo::parse(body).map_err(|e| e.to_string());
                scan.narinfos.push(NarInfoEntry { object: o, info });
            }
            _ => to_fetch.push((o, stamp)),
        }
    }
    let total = to_fetch.len() as u64;
    progress(Progress { listed: n, to_fetch: total, fetched: 0 });

    let results = fetch_all(target, to_fetch, jobs.max(1), &|done| progress(Progress { listed: n, to_fetch: total, fetched: done })).await?;
    let mut fresh = Vec::new();
    for (o, stamp, body) in results {
        scan.fetched += 1;
        let Some(body) = body else { continue };
        let info = match String::from_utf8(body) {
            Ok(text) => {
                let info = NarInfo::parse(&text).map_err(|e| e.to_string());
                if let Some(s) = stamp {
                    fresh.push((o.key.clone(), s, text));
                }
                info
            }
            Err(_) => Err("not UTF-8".to_string()),
        };
        scan.narinfos.push(NarInfoEntry { object: o, info });
    }
    let gone: Vec<String> = known.into_keys().filter(|k| !seen.contains(k)).collect();
    ix.update(&fresh, &gone).map_err(ix_err)?;
    scan.narinfos.sort_by(|a, b| a.object.key.cmp(&b.object.key));
    Ok(scan)
}

type Fetched = (Object, Option<String>, Option<Vec<u8>>);

/// Gets every object of `todo` with `jobs` concurrent requests; the first error ends it.
async fn fetch_all(target: &dyn Target, todo: Vec<(Object, Option<String>)>, jobs: usize, done: &(dyn Fn(u64) + Sync)) -> Result<Vec<Fetched>, TargetError> {
    let count = std::sync::atomic::AtomicU64::new(0);
    try_concurrently(todo, jobs, |(o, stamp)| {
        let count = &count;
        async move {
            let body = target.get(&o.key).await?;
            done(count.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1);
            Ok((o, stamp, body))
        }
    })
    .await
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

/// The objects (narinfos aside) of a scan by key, for looking NARs up.
pub fn objects_by_key(scan: &Scan) -> HashMap<&str, &Object> {
    scan.objects.iter().map(|o| (o.key.as_str(), o)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{file::FileTarget, Body};

    use crate::nix::narinfo::SAMPLE as NARINFO;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn second_scan_fetches_only_what_changed() {
        let dir = std::env::temp_dir().join(format!("narq-scan-{}", std::process::id()));
        let t = FileTarget::open(dir.join("cache"));
        let put = |k: &'static str, b: String| t.put(k, Body::Bytes(b.into_bytes()), "");
        put("6il1lpdfxrnnfp077s9yqgr5nl3k3cm6.narinfo", NARINFO.into()).await.unwrap();
        put("z4asv3j07d89ywjf8fxkn7sg6mf5s9q5.narinfo", "garbage".into()).await.unwrap();
        put("nar/1w1fff338fvdw53sqcamqgqmxgrgjyb3j3bzkqmr0qfkvlsqb05w.nar.zst", "x".into()).await.unwrap();
        let ix = dir.join("index.sqlite");
        let s = scan(&t, &ix, 4, &|_| {}).await.unwrap();
        assert_eq!((s.fetched, s.narinfos.len(), s.objects.len()), (2, 2, 1));
        assert!(s.narinfos[0].info.is_ok() && s.narinfos[1].info.is_err());
        assert_eq!(s.narinfos[0].hash_part(), "6il1lpdfxrnnfp077s9yqgr5nl3k3cm6");
        let s = scan(&t, &ix, 4, &|_| {}).await.unwrap();
        assert_eq!((s.fetched, s.narinfos.len()), (0, 2));
        assert!(s.narinfos[1].info.is_err(), "a parse error is remembered too");
        put("z4asv3j07d89ywjf8fxkn7sg6mf5s9q5.narinfo", NARINFO.replace("160", "161")).await.unwrap();
        let s = scan(&t, &ix, 4, &|_| {}).await.unwrap();
        assert_eq!(s.fetched, 1);
        assert_eq!(s.narinfos[1].info.as_ref().unwrap().info.nar_size, 161);
        t.delete(&["6il1lpdfxrnnfp077s9yqgr5nl3k3cm6.narinfo".into()]).await.unwrap();
        let s = scan(&t, &ix, 4, &|_| {}).await.unwrap();
        assert_eq!((s.fetched, s.narinfos.len()), (0, 1));
        assert_eq!(index::Index::open(&ix).unwrap().load().unwrap().len(), 1, "the deleted narinfo is forgotten");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
