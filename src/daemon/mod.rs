//! `narq daemon`: accepts requests on the Unix socket, keeps them in the durable queue,
//! ingests the spool, and runs the upload workers.
//!
//! [`run`] takes the listener and a shutdown future, so that tests start a real daemon on
//! a temporary socket and stop it, and systemd can hand over its socket (`LISTEN_FDS`).

mod admission;
mod breaker;
mod lock;
mod server;
mod shared_queue;
mod systemd;
mod workers;

use std::future::Future;
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::UnixListener;
use tokio::sync::Notify;

use crate::cache::collection::{Gate, GcWatch, Settled, Timing};
use crate::config::Config;
use crate::metrics::{Levels, Metrics};
use crate::queue::Queue;
use crate::spool;
use crate::storage;
use crate::upload::Uploader;

use admission::Admission;
use lock::lock_state_dir;
use server::{accept, Server};
use shared_queue::SharedQueue;
use systemd::sd_notify;
use breaker::{Breaker, Gated};
use workers::Dispatcher;

pub use admission::{check, validate, NotStored};
pub use server::listener;

/// How often the spool directory is checked for requests written while we were away.
const SPOOL_POLL: Duration = Duration::from_secs(1);

/// Empties `state/tmp` and makes it anew, ours alone (0700), so that nothing planted there
/// (a symlink at `tmp` or inside it) receives what the uploader writes. `remove_dir_all`
/// removes a symlink, not what it points to; the directory is then made exclusively (a
/// symlink put back in between makes this fail instead of being followed) and checked.
fn fresh_tmp_dir(state_dir: &Path) -> std::io::Result<std::path::PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let tmp = state_dir.join("tmp");
    std::fs::create_dir_all(state_dir)?;
    match std::fs::remove_dir_all(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::DirBuilder::new().mode(0o700).create(&tmp).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => std::io::Error::new(e.kind(), "something was put back there as soon as it was removed; not used"),
        _ => e,
    })?;
    let m = std::fs::symlink_metadata(&tmp)?;
    // SAFETY: geteuid has no preconditions.
    if !m.is_dir() || m.uid() != unsafe { libc::geteuid() } {
        return Err(std::io::Error::new(std::io::ErrorKind::Other, "replaced while it was made; not used"));
    }
    Ok(tmp)
}

/// Runs the daemon until `shutdown` completes.
pub async fn run(config: Config, listener: StdUnixListener, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    // However it ends: the socket it bound goes (clients then learn at once that no daemon
    // answers), and the locks with it.
    struct Release;
    impl Drop for Release {
        fn drop(&mut self) {
            lock::release();
        }
    }
    let _release = Release;
    lock_state_dir(&config.state_dir)?;
    let tmp_dir = fresh_tmp_dir(&config.state_dir).with_context(|| format!("creating {}", config.state_dir.join("tmp").display()))?;
    let db = config.state_dir.join("queue.db");
    let mut queue = match Queue::open(&db) {
        // Nothing in it can be read: keep it for inspection and start afresh. What was
        // pending comes back from the spool and the next hooks, and what is uploaded already
        // is found in the cache by the uploader's existence check.
        Err(e) if crate::queue::is_corrupt(&e) => {
            let to = crate::queue::set_aside(&db).with_context(|| format!("the queue {} is damaged ({e}); moving it aside", db.display()))?;
            tracing::error!(moved_to = %to.display(), "the queue {} is damaged ({e}): moved it to {} and started an empty one", db.display(), to.display());
            Queue::open(&db).and_then(|mut q| {
                // What it held pending is lost to the daemon: say so where users look.
                let why = format!(
                    "damaged ({e}), moved to {}: uploads it held pending are not known any more; `narq push` what you need",
                    to.display()
                );
                q.record_problem(&db.display().to_string(), &why).map(|()| q)
            })
        }
        // On a full disk SQLite cannot even map its shared memory: the reserve makes room.
        Err(e) if spool::release_reserve(&config.state_dir) => {
            tracing::warn!("opening the queue: {e}; released the state dir's reserve to make room");
            Queue::open(&db)
        }
        r => r,
    }
    .with_context(|| format!("opening the queue {}", db.display()))?;
    let forgotten = queue.bind_store(&config.store.identity()).with_context(|| format!("updating the queue {}", db.display()))?;
    if forgotten > 0 {
        tracing::info!(forgotten, "the queue last uploaded to another store: {forgotten} paths remembered as uploaded will be checked again");
    }
    let target = storage::open(&config.store).await.map_err(|e| anyhow::anyhow!("store {}: {e}", config.store.original))?;
    // Everything the daemon sends the store waits while uploads pause for it (an outage,
    // throttling, `Retry-After`): uploads in flight, root records, looks for collections.
    let breaker = Arc::new(std::sync::Mutex::new(Breaker::default()));
    let target = Gated::wrap(target, &breaker);
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let metrics = Arc::new(Metrics::new());
    let mut allowed_uids = vec![0, me];
    allowed_uids.extend(&config.allowed_uids);
    let queue = SharedQueue::new(queue);
    // What a `gc` or `rm` deleted is not trusted as uploaded any more (see `cache::roots`).
    let gc: Arc<GcWatch> = Arc::new(GcWatch::new(target.clone(), {
        let queue = queue.clone();
        Box::new(move |marker| match queue.here(|q| q.note_generation(marker)) {
            Ok(0) => Ok(()),
            Ok(n) => Ok(tracing::info!(stale = n, "the cache was collected: {n} paths remembered as uploaded will be looked for again before they are relied on")),
            Err(e) => Err(e.to_string()),
        })
    }));
    let uploader = Arc::new(Uploader {
        gc: Some(gc.clone()),
        target,
        url: config.store.clone(),
        tmp_dir,
        upstreams: match config.upstream.is_empty() {
            true => None,
            false => Some(crate::upstream::Upstreams::new(&config.upstream).context("TLS roots for upstream caches")?),
        },
        metrics: metrics.clone(),
        filters: config.filters.clone(),
    });
    let wake = Arc::new(Notify::new());
    let admission = Arc::new(Admission::new(queue.clone(), config.required_trusted_keys()?, allowed_uids, config.spool_dir(), wake.clone()));
    let store = uploader.target.describe();
    let uploader_target = uploader.target.clone();
    let (dispatcher, workers) = Dispatcher::new(uploader, breaker, queue.clone(), config.jobs, wake);
    // Uploads matter more than their metrics: an address that cannot be bound is an error
    // in the log, not a daemon that does not start.
    let scraper = match config.metrics_listen {
        Some(addr) => match crate::metrics::bind(addr).await {
            Ok(l) => {
                tracing::info!(%addr, "serving Prometheus metrics at http://{addr}/metrics");
                Some(tokio::spawn(crate::metrics::serve(l, metrics.clone(), levels(queue.clone(), workers.clone(), config.spool_dir()))))
            }
            Err(e) => {
                tracing::error!("{e:#}; no metrics are served");
                None
            }
        },
        None => None,
    };
    admission.ingest_spool().await;
    keep_reserve(&config.state_dir, true);
    let status = queue.run(|q| q.status()).await.map_err(anyhow::Error::msg)??;
    tracing::info!(store = %store, jobs = config.jobs, pending = status.pending, "narq daemon ready");
    sd_notify("READY=1\nSTATUS=serving");

    let dispatcher = tokio::spawn(dispatcher.run());
    let spooler = tokio::spawn({
        let admission = admission.clone();
        let state_dir = config.state_dir.clone();
        async move {
            loop {
                tokio::time::sleep(SPOOL_POLL).await;
                admission.ingest_spool().await;
                keep_reserve(&state_dir, false);
            }
        }
    });
    let keeper = Arc::new(Keeper { admission: admission.clone(), target: uploader_target.clone(), gc: gc.clone() });
    let roots = tokio::spawn(keeper.clone().record_roots());
    let (settle, settle_asks) = tokio::sync::mpsc::channel(64);
    let asked = tokio::spawn(keeper.clone().recheck_asked(settle_asks));
    // The socket is served on a thread of its own with a single-threaded runtime: a hook's
    // request is read, stored (one fsync) and answered without waking any other thread (on
    // an idle machine each such wake-up costs ~0.1 ms), and busy upload workers share only
    // the queue's lock with it, not their threads.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("the socket runtime")?;
    let listener = {
        let _in = rt.enter();
        UnixListener::from_std(listener)?
    };
    let target = uploader_target;
    let server = Arc::new(Server { admission, workers, store, target, metrics, settle });
    let server = std::thread::Builder::new()
        .name("narq-socket".into())
        .spawn(move || rt.block_on(accept(server, listener, stopped)))
        .context("starting the socket thread")?;
    shutdown.await;
    sd_notify("STOPPING=1");
    let _ = stop.send(true);
    let _ = server.join();
    dispatcher.abort();
    spooler.abort();
    if let Some(s) = scraper {
        s.abort();
    }
    roots.abort();
    asked.abort();
    tracing::info!("narq daemon stopped");
    Ok(())
}

/// What a scrape reads: the queue's counts, the dispatcher's in-flight and pause, the spool.
fn levels(queue: SharedQueue, workers: tokio::sync::watch::Receiver<workers::Snapshot>, spool_dir: std::path::PathBuf) -> crate::metrics::LevelsFn {
    Arc::new(move || {
        let status = queue.here(|q| q.status()).unwrap_or_else(|e| {
            tracing::warn!("metrics: reading the queue: {e}");
            Default::default()
        });
        let w = workers.borrow();
        Levels {
            pending: status.pending,
            pending_bytes: status.pending_bytes,
            in_flight: w.in_flight as u64,
            spooled: spool::list(&spool_dir).map_or(0, |v| v.len() as u64),
            failed: status.failed,
            paused: w.target_error().is_some(),
        }
    })
}

/// How often the roots noted by requests are looked at, to be recorded in the cache.
const ROOTS_POLL: Duration = Duration::from_secs(1);

/// Keeps what the daemon tells clients true while collections run elsewhere (see
/// `cache::collection`): records the roots that requests noted, and looks again for what
/// requests answered from memory relied on.
struct Keeper {
    admission: Arc<Admission>,
    target: Arc<dyn storage::Target>,
    gc: Arc<GcWatch>,
}

/// A caller (`narq wait`) asking the keeper to look for collections now and settle every
/// request answered so far; told when that is done.
pub(super) type SettleAsk = tokio::sync::oneshot::Sender<()>;

impl Keeper {
    /// Records roots in the cache in the background, under the collection gate: a root that a
    /// collection may have missed is settled (its path, if stale, looked for again) before it
    /// counts as recorded. A failure is logged and tried again at the next round.
    async fn record_roots(self: Arc<Self>) {
        loop {
            tokio::time::sleep(ROOTS_POLL).await;
            if let Err(e) = self.record_due().await {
                tracing::warn!("recording roots in the cache (will retry): {e}");
            }
        }
    }

    async fn record_due(&self) -> anyhow::Result<()> {
        let queue = &self.admission.queue;
        let due = queue.run(|q| q.roots_due(100)).await.map_err(anyhow::Error::msg)??;
        if due.is_empty() {
            return Ok(());
        }
        let open = match self.gc.wait_open(Timing::get().gc_wait).await? {
            Gate::Open(look) => look,
            Gate::Held(why) => anyhow::bail!("{why}"),
        };
        crate::cache::try_concurrently(due.iter().collect(), 16, |r| crate::cache::roots::put_root(&*self.target, r)).await?;
        let marker = match self.gc.settle(&open, std::time::Instant::now()).await? {
            Ok(Settled::Safe(look) | Settled::Check(look)) => look.marker,
            Err(why) => anyhow::bail!("{why}"),
        };
        let n = queue.run(move |q| q.roots_recorded(&due, Some(&marker))).await.map_err(anyhow::Error::msg)??;
        if n > 0 {
            tracing::info!(paths = n, "roots recorded after a collection of the cache: {n} paths they rely on are looked for again");
            self.admission.wake.notify_one();
        }
        Ok(())
    }

    /// A request answered from what the daemon remembers (paths `done`) may come before the
    /// daemon saw that a `gc` or `rm` removed them, and then nothing would upload them again.
    /// So once a look at the collections was sent after a request, its paths that a
    /// collection made `stale` are pending again (with the stale paths they reach), in the
    /// request's place in the queue. Looks every second while requests wait for one, and at
    /// once when `narq wait` asks (`asks`).
    async fn recheck_asked(self: Arc<Self>, mut asks: tokio::sync::mpsc::Receiver<SettleAsk>) {
        loop {
            let waiting = tokio::select! {
                ask = asks.recv() => ask,
                _ = tokio::time::sleep(ROOTS_POLL) => None,
            };
            let idle = self.admission.asked.lock().map_or(true, |a| a.is_empty());
            if idle && waiting.is_none() {
                continue;
            }
            // `narq wait` needs a look sent after every request it waits for.
            let after = waiting.as_ref().map(|_| std::time::Instant::now());
            match self.gc.look(after).await {
                Ok(look) => self.repend_asked(look.sent).await,
                Err(e) => tracing::warn!("looking for collections of the cache (will retry): {e}"),
            }
            if let Some(w) = waiting {
                let _ = w.send(());
            }
        }
    }

    /// Makes pending again the stale paths of requests answered before `seen` (a look).
    async fn repend_asked(&self, seen: std::time::Instant) {
        let due: Vec<admission::Asked> = match self.admission.asked.lock() {
            Ok(mut a) => {
                let (old, new): (Vec<_>, Vec<_>) = a.drain(..).partition(|r| r.at <= seen);
                *a = new;
                old
            }
            Err(_) => return,
        };
        if due.is_empty() {
            return;
        }
        match self.admission.queue.run(move |q| due.iter().map(|r| q.repend_stale(&r.paths, r.seq)).sum::<Result<usize, _>>()).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => {
                tracing::info!(paths = n, "requested paths a collection of the cache may have removed are looked for again");
                self.admission.wake.notify_one();
            }
            Ok(Err(e)) => tracing::warn!("rechecking requested paths after a collection: {e}"),
            Err(e) => tracing::warn!("rechecking requested paths after a collection: {e}"),
        }
    }
}

/// Keeps the state dir's reserve ([`spool::ensure_reserve`]) while there is room for it.
/// Made at start (a new state dir has none) it is no news; made later, it had been used.
fn keep_reserve(state_dir: &Path, at_start: bool) {
    match spool::ensure_reserve(state_dir) {
        Ok(true) if at_start => tracing::debug!("made the state dir's reserve"),
        Ok(true) => tracing::info!("the state disk has room again: its reserve is back"),
        Ok(false) => {}
        Err(e) => tracing::debug!("keeping the reserve in {}: {e}", state_dir.display()),
    }
}

/// Gives back to the system what a large request took while it was admitted: glibc keeps
/// freed memory in each thread's arena, so without this the daemon would stay at the size
/// its largest request made it (a 100,000-path closure: about 100 MiB).
pub(super) fn release_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory of the allocator to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}
