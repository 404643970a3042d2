//! `narq daemon`: accepts requests on the Unix socket, keeps them in the durable queue,
//! ingests the spool, and runs the upload workers.
//!
//! [`run`] takes the listener and a shutdown future, so that tests start a real daemon on
//! a temporary socket and stop it, and systemd can hand over its socket (`LISTEN_FDS`).

mod admission;
mod breaker;
mod lock;
mod server;
mod systemd;
mod workers;

use std::collections::HashSet;
use std::future::Future;
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::net::UnixListener;
use tokio::sync::Notify;

use crate::config::Config;
use crate::nix::PublicKey;
use crate::queue::Queue;
use crate::spool;
use crate::storage;
use crate::upload::Uploader;

use admission::ingest_spool;
use breaker::Health;
use lock::{lock_state_dir, unlock_state_dir};
use server::accept;
use systemd::sd_notify;
use workers::dispatch;

pub use admission::{check, validate, NotStored};
pub use server::listener;

/// How often the spool directory is checked for requests written while we were away.
const SPOOL_POLL: Duration = Duration::from_secs(1);

struct Shared {
    config: Config,
    queue: Arc<Mutex<Queue>>,
    uploader: Uploader,
    /// Keys of the items being uploaded now.
    in_flight: Mutex<HashSet<String>>,
    /// Wakes the dispatcher: something was enqueued or a worker finished.
    wake: Notify,
    /// Uids that may enqueue: root, our own, and `allowed-users`.
    allowed_uids: Vec<u32>,
    /// Keys that handed-in signatures are checked against ([`Config::trusted_keys`]).
    trusted_keys: Arc<Vec<PublicKey>>,
    /// Whether the target works; while it does not, uploads pause.
    health: Mutex<Health>,
    /// Held while the spool is ingested: the poller and `wait` both ingest, and two at once
    /// would read a file the other is removing and log a false refusal.
    spool: tokio::sync::Mutex<()>,
}

impl Shared {
    /// Runs `f` on the queue on a blocking thread (SQLite commits fsync).
    async fn queue<T: Send + 'static>(&self, f: impl FnOnce(&mut Queue) -> T + Send + 'static) -> T {
        let q = self.queue.clone();
        tokio::task::spawn_blocking(move || f(&mut q.lock().unwrap_or_else(|e| e.into_inner())))
            .await
            .expect("queue task panicked")
    }

    /// Runs `f` on the queue on this thread: for the socket thread (see [`run`]), for which a
    /// hop to the blocking pool and back costs more than the request itself.
    fn queue_here<T>(&self, f: impl FnOnce(&mut Queue) -> T) -> T {
        f(&mut self.queue.lock().unwrap_or_else(|e| e.into_inner()))
    }
}
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
            Queue::open(&db)
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
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let mut allowed_uids = vec![0, me];
    allowed_uids.extend(&config.allowed_uids);
    let shared = Arc::new(Shared {
        uploader: Uploader {
            target,
            url: config.store.clone(),
            tmp_dir,
            upstreams: match config.upstream.is_empty() {
                true => None,
                false => Some(crate::upstream::Upstreams::new(&config.upstream).context("TLS roots for upstream caches")?),
            },
        },
        queue: Arc::new(Mutex::new(queue)),
        in_flight: Mutex::new(HashSet::new()),
        wake: Notify::new(),
        allowed_uids,
        trusted_keys: Arc::new(config.required_trusted_keys()?),
        health: Mutex::new(Health::default()),
        spool: tokio::sync::Mutex::new(()),
        config,
    });
    ingest_spool(&shared).await;
    keep_reserve(&shared.config.state_dir);
    let status = shared.queue(|q| q.status()).await?;
    tracing::info!(
        store = %shared.uploader.target.describe(),
        jobs = shared.config.jobs,
        pending = status.pending,
        "narq daemon ready"
    );
    sd_notify("READY=1\nSTATUS=serving");

    let dispatcher = tokio::spawn(dispatch(shared.clone()));
    let spooler = tokio::spawn({
        let shared = shared.clone();
        async move {
            loop {
                tokio::time::sleep(SPOOL_POLL).await;
                ingest_spool(&shared).await;
                keep_reserve(&shared.config.state_dir);
            }
        }
    });
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
    let server = std::thread::Builder::new()
        .name("narq-socket".into())
        .spawn({
            let shared = shared.clone();
            move || rt.block_on(accept(shared, listener, stopped))
        })
        .context("starting the socket thread")?;
    shutdown.await;
    sd_notify("STOPPING=1");
    let _ = stop.send(true);
    let _ = server.join();
    dispatcher.abort();
    spooler.abort();
    unlock_state_dir(&shared.config.state_dir);
    tracing::info!("narq daemon stopped");
    Ok(())
}

/// Keeps the state dir's reserve ([`spool::ensure_reserve`]) while there is room for it.
fn keep_reserve(state_dir: &Path) {
    match spool::ensure_reserve(state_dir) {
        Ok(true) => tracing::info!("the state disk has room again: its reserve is back"),
        Ok(false) => {}
        Err(e) => tracing::debug!("keeping the reserve in {}: {e}", state_dir.display()),
    }
}
