//! `narq daemon`: accepts requests on the Unix socket, keeps them in the durable queue,
//! ingests the spool, and runs the upload workers.
//!
//! [`run`] takes the listener and a shutdown future, so that tests start a real daemon on
//! a temporary socket and stop it, and systemd can hand over its socket (`LISTEN_FDS`).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;

use crate::config::Config;
use crate::nix::{PathInfo, PublicKey, StorePath};
use crate::protocol::{self, FrameError, Request, Response, HEADER_LEN};
use crate::queue::{Item, Queue};
use crate::spool;
use crate::storage;
use crate::upload::{UploadError, Uploader};

/// How often the spool directory is checked for requests written while we were away.
const SPOOL_POLL: Duration = Duration::from_secs(1);
/// A client that sends nothing for this long is dropped.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// A client that does not take our answer for this long is dropped, and the memory the
/// answer holds with it.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

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

/// The longest pause a store's `Retry-After` may ask for: a broken or hostile header must
/// not stop uploads for hours.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// The circuit breaker: a target failure pauses all uploads, for 1 s doubling up to a
/// minute (with jitter) while failures go on, and at least as long as the store's
/// `Retry-After` (up to [`MAX_RETRY_AFTER`]); a success closes it. One log line per pause,
/// not one per item.
#[derive(Default)]
struct Health {
    failures: u32,
    paused_until: Option<Instant>,
    error: Option<String>,
    /// `nix-cache-info` is known to be in the cache.
    cache_info: bool,
}

impl Health {
    fn fail(&mut self, e: &storage::TargetError) {
        let already = self.paused_until.is_some_and(|t| t > Instant::now());
        let asked = e.retry_after.map_or(Duration::ZERO, |d| d.min(MAX_RETRY_AFTER));
        let pause = crate::queue::backoff(self.failures, &e.msg).min(Duration::from_secs(60)).max(asked);
        self.failures += 1;
        self.paused_until = Some(Instant::now() + pause);
        self.error = Some(e.msg.clone());
        if !already {
            let pause_ms = pause.as_millis() as u64;
            if e.config {
                tracing::error!(error = %e.msg, pause_ms, "the store refuses us; uploads paused: {}", e.msg);
            } else {
                tracing::warn!(error = %e.msg, pause_ms, "the store is unavailable; uploads paused: {}", e.msg);
            }
        }
    }

    fn ok(&mut self) {
        if self.error.take().is_some() {
            tracing::info!("the store works again; uploads resumed");
        }
        self.failures = 0;
        self.paused_until = None;
    }

    fn paused_for(&self) -> Option<Duration> {
        self.paused_until.and_then(|t| t.checked_duration_since(Instant::now()))
    }
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

/// The state dirs whose lock this process holds, with the open lock file (closing it
/// would release the lock).
static LOCKS: Mutex<Vec<(PathBuf, std::fs::File)>> = Mutex::new(Vec::new());

/// Takes the exclusive lock on `dir` (`flock` of `<dir>/lock`, which holds our pid), or
/// fails naming the daemon that holds it. A second daemon on the same state dir would
/// unlink the first one's socket, wipe its `tmp/` and share its queue. Taking it again in
/// the process that holds it is a no-op: both [`listener`] and [`run`] take it, before
/// either touches anything.
fn lock_state_dir(dir: &Path) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let mut held = LOCKS.lock().unwrap_or_else(|e| e.into_inner());
    if held.iter().any(|(d, _)| d == dir) {
        return Ok(());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating the state dir {}", dir.display()))?;
    let path = dir.join("lock");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .with_context(|| format!("opening the lock file {}", path.display()))?;
    // SAFETY: flock on a file descriptor we own; the lock lives as long as the file is open.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(e).with_context(|| format!("locking {}", path.display()));
        }
        let mut pid = String::new();
        let _ = f.read_to_string(&mut pid);
        let pid = match pid.trim() {
            "" => "pid unknown".to_string(),
            p => format!("pid {p}"),
        };
        anyhow::bail!("another narq daemon ({pid}) is running on the state dir {} (it holds {})", dir.display(), path.display());
    }
    f.set_len(0).and_then(|()| writeln!(f, "{}", std::process::id())).with_context(|| format!("writing {}", path.display()))?;
    held.push((dir.to_path_buf(), f));
    Ok(())
}

/// Releases the lock [`lock_state_dir`] took on `dir`.
fn unlock_state_dir(dir: &Path) {
    LOCKS.lock().unwrap_or_else(|e| e.into_inner()).retain(|(d, _)| d != dir);
}

/// Binds the configured socket (parent created, stale socket removed, mode 0660), unless
/// systemd passed one (`LISTEN_FDS`). Non-blocking, for [`run`] to serve. Takes the state
/// dir's lock first, so that a second daemon leaves a running one's socket alone.
pub fn listener(config: &Config) -> anyhow::Result<StdUnixListener> {
    lock_state_dir(&config.state_dir)?;
    if let Some(l) = systemd_listener()? {
        tracing::info!("using the socket passed by systemd");
        return Ok(l);
    }
    let path = &config.socket;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing stale socket {}", path.display()))
        }
        _ => {}
    }
    let l = StdUnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o660))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

fn systemd_listener() -> anyhow::Result<Option<StdUnixListener>> {
    use std::os::fd::FromRawFd;
    let pid_ok = std::env::var("LISTEN_PID").ok().and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id());
    let fds: u32 = std::env::var("LISTEN_FDS").ok().and_then(|n| n.parse().ok()).unwrap_or(0);
    if !pid_ok || fds == 0 {
        return Ok(None);
    }
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_FDNAMES");
    // SAFETY: systemd passes the listening sockets as fds 3.., owned by us from here on.
    let l = unsafe { StdUnixListener::from_raw_fd(3) };
    l.set_nonblocking(true)?;
    Ok(Some(l))
}

/// Tells systemd (`Type=notify`) that we serve, if it asked.
fn sd_notify(msg: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(e) => return tracing::warn!("sd_notify: {e}"),
    };
    let bytes = path.as_encoded_bytes();
    let res = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name).and_then(|a| sock.send_to_addr(msg.as_bytes(), &a))
    } else {
        sock.send_to(msg.as_bytes(), Path::new(&path))
    };
    if let Err(e) = res {
        tracing::warn!("sd_notify to {}: {e}", path.to_string_lossy());
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

/// Accepts clients and serves each in a task until `stop` turns true.
///
/// Connections are capped (see [`Conns`]): at the cap, clients wait in the listen backlog,
/// which costs us no file descriptor. An accept that fails (out of file descriptors, most
/// likely) is retried after a pause that grows to a second, and said once, not each time.
async fn accept(shared: Arc<Shared>, listener: UnixListener, mut stop: tokio::sync::watch::Receiver<bool>) {
    let conns = Conns::new();
    let mut failures = 0u32;
    loop {
        let permit = tokio::select! {
            _ = stop.changed() => break,
            p = conns.total.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            _ = stop.changed() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, _)) => {
                if failures > 0 {
                    tracing::info!(failures, "accepting connections again after {failures} failures");
                    failures = 0;
                }
                if let Some(guard) = conns.admit(&stream, permit) {
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        serve(shared, stream).await;
                        drop(guard);
                    });
                }
            }
            Err(e) => {
                if failures == 0 {
                    tracing::warn!("accept: {e}; retrying with a growing pause until it passes");
                }
                failures = failures.saturating_add(1);
                let pause = Duration::from_millis(10 << failures.min(7)).min(Duration::from_secs(1));
                tokio::select! {
                    _ = stop.changed() => break,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
}

/// Caps on open connections, so that clients cannot take the file descriptors (and the
/// memory) that uploads and other clients need.
struct Conns {
    /// One permit per open connection; the accept loop takes one before it accepts.
    total: Arc<tokio::sync::Semaphore>,
    /// Open connections per peer uid, and how many were refused since it reached the cap.
    per_uid: Mutex<HashMap<u32, (usize, u64)>>,
    /// The most one uid may hold open, so that one user cannot starve the others.
    uid_max: usize,
}

impl Conns {
    /// Raises the soft file limit to the hard one (nothing here uses `select()`), and sizes
    /// the caps from it: a quarter of the file descriptors for clients (uploads and the
    /// queue need the rest), at most 1024; a quarter of those for one uid.
    fn new() -> Arc<Conns> {
        let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit and setrlimit with valid pointers to a struct of the right type.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
                let raised = libc::rlimit { rlim_cur: r.rlim_max, rlim_max: r.rlim_max };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                    r = raised;
                }
            }
        }
        let total = (r.rlim_cur / 4).clamp(4, 1024) as usize;
        let uid_max = (total / 4).max(2);
        tracing::debug!(total, uid_max, file_limit = r.rlim_cur, "connection limits");
        Arc::new(Conns { total: Arc::new(tokio::sync::Semaphore::new(total)), per_uid: Mutex::default(), uid_max })
    }

    /// Counts `stream` against its uid's cap; over it, answers a retryable error (the hook
    /// spools) and closes it.
    fn admit(self: &Arc<Self>, stream: &UnixStream, permit: tokio::sync::OwnedSemaphorePermit) -> Option<ConnGuard> {
        // Without credentials `serve` refuses it; it still holds a permit meanwhile.
        let Ok(uid) = stream.peer_cred().map(|c| c.uid()) else {
            return Some(ConnGuard { conns: self.clone(), uid: None, _permit: permit });
        };
        let mut per_uid = self.per_uid.lock().unwrap_or_else(|e| e.into_inner());
        let (open, refused) = per_uid.entry(uid).or_default();
        if *open >= self.uid_max {
            *refused += 1;
            // Logged at 1, 2, 4, 8… refusals: a flood is seen, not echoed.
            if refused.is_power_of_two() {
                tracing::warn!(uid, open = *open, refused = *refused, "refused a connection: uid {uid} has {open} open, the limit per user ({refused} refused)");
            }
            let msg = protocol::encode(&Response::unavailable(format!("too many connections from uid {uid} (limit {})", self.uid_max)));
            // One non-blocking send, straight away (tokio's `try_write` would wait for the
            // reactor to see the new socket writable): the answer fits in an empty socket
            // buffer, and if it does not, the client learns from the close.
            // SAFETY: a valid buffer and an open socket that `stream` owns.
            unsafe {
                use std::os::fd::AsRawFd;
                libc::send(stream.as_raw_fd(), msg.as_ptr().cast(), msg.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
            };
            return None;
        }
        *open += 1;
        Some(ConnGuard { conns: self.clone(), uid: Some(uid), _permit: permit })
    }
}

/// An admitted connection: frees its place (and permit) when dropped.
struct ConnGuard {
    conns: Arc<Conns>,
    uid: Option<u32>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let Some(uid) = self.uid else { return };
        let mut per_uid = self.conns.per_uid.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((open, _)) = per_uid.get_mut(&uid) {
            *open -= 1;
            if *open == 0 {
                per_uid.remove(&uid);
            }
        }
    }
}

/// Starts ready items on free workers; sleeps until woken, a retry is due, or a pause ends.
async fn dispatch(shared: Arc<Shared>) {
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

/// The checks of an `enqueue` request that need no queue state, made before the queue lock
/// is taken: the paths' formats were checked when the request was parsed (store paths,
/// signatures, CA); here every path must carry a signature by one of `keys` and none that
/// is forged in a key's name (the first forged one ends the check), and the request must
/// not list a path twice or hold a reference cycle.
pub fn check(keys: &[PublicKey], paths: &[PathInfo], drv: Option<&StorePath>) -> Result<(), String> {
    let set: HashSet<&StorePath> = paths.iter().map(|p| &p.path).collect();
    if set.len() != paths.len() {
        return Err("a path is listed twice".into());
    }
    if let Some(p) = paths.iter().find(|p| p.nar_size == 0) {
        return Err(format!("{}: NarSize is 0", p.path));
    }
    if let Some(d) = drv.filter(|d| !d.name().ends_with(".drv")) {
        return Err(format!("{d} is not a derivation"));
    }
    // In chunks, each on all CPUs: a request of forged signatures costs one chunk at most.
    for chunk in paths.chunks(CHECK_CHUNK) {
        if let Some(e) = crate::par::map(chunk, |p| p.check_sigs(keys).err()).into_iter().flatten().next() {
            return Err(e);
        }
    }
    let edges = paths.iter().flat_map(|p| p.references.iter().map(move |r| (&p.path, r)));
    find_cycle(edges).map_or(Ok(()), |c| Err(cycle_message(&c)))
}

/// Paths checked together by [`check`]; a forged signature is found within one such chunk.
const CHECK_CHUNK: usize = 256;

/// Up to this many paths, [`check`] runs on the socket thread; a larger request is checked
/// on the blocking pool so that the socket thread serves other clients meanwhile (a hop
/// there costs ~0.1 ms, a signature check ~50 µs).
const CHECK_INLINE: usize = 16;

/// Checks an `enqueue` request against what the queue holds, under the queue lock, after
/// [`check`]. `queued` holds the paths (of the request and of its references) that the
/// queue already holds, pending or done: references outside the request must be among them.
/// `pending` holds the request's paths that are pending, with the info they were queued
/// with: a store path's references never change, so one re-sent with other references is
/// refused, unless what was queued carries no signature by `keys` (an older narq queued it
/// unchecked), which the new request then replaces. `pending_edges` are the references
/// among pending paths that the request's references reach: a request that would close a
/// cycle through them is refused, since no path of the cycle would ever become ready.
pub fn validate(
    keys: &[PublicKey],
    paths: &[PathInfo],
    queued: &HashSet<StorePath>,
    pending: &HashMap<StorePath, Option<PathInfo>>,
    pending_edges: &[(StorePath, StorePath)],
) -> Result<(), String> {
    let set: HashSet<&StorePath> = paths.iter().map(|p| &p.path).collect();
    for p in paths.iter().filter(|p| !queued.contains(&p.path)) {
        if let Some(r) = p.references.iter().find(|r| !set.contains(r) && !queued.contains(*r)) {
            return Err(format!("incomplete closure: {} references {r}, which is neither in the request nor queued", p.path));
        }
    }
    for p in paths {
        let Some(Some(old)) = pending.get(&p.path) else { continue };
        if old.fingerprint() == p.fingerprint() || old.check_sigs(keys).is_err() {
            continue;
        }
        return Err(if old.references != p.references {
            format!("{} is queued with other references than this request gives it; a store path's references never change", p.path)
        } else {
            format!("{} is queued with another NarHash or NarSize than this request gives it", p.path)
        });
    }
    // The request's own references stand for its paths; what is queued for them is replaced.
    // Without pending edges, [`check`] has already looked at the request's own graph.
    let queued_edges: Vec<(&StorePath, &StorePath)> =
        pending_edges.iter().filter(|(k, r)| !set.contains(k) && k != r).map(|(k, r)| (k, r)).collect();
    if queued_edges.is_empty() {
        return Ok(());
    }
    let edges = paths.iter().flat_map(|p| p.references.iter().map(move |r| (&p.path, r))).chain(queued_edges);
    find_cycle(edges).map_or(Ok(()), |c| Err(cycle_message(&c)))
}

/// A cycle among different paths in the graph of `edges` (self-references are fine: Nix
/// paths only reference themselves and paths that existed before them), as the paths in
/// order, the first repeated at the end.
fn find_cycle<'a>(edges: impl Iterator<Item = (&'a StorePath, &'a StorePath)>) -> Option<Vec<&'a StorePath>> {
    let mut graph: HashMap<&StorePath, Vec<&StorePath>> = HashMap::new();
    for (from, to) in edges.filter(|(f, t)| f != t) {
        graph.entry(from).or_default().push(to);
    }
    // Iterative depth-first search: on the stack (grey), finished (black).
    let mut black: HashSet<&StorePath> = HashSet::new();
    let mut roots: Vec<&StorePath> = graph.keys().copied().collect();
    roots.sort_unstable();
    for root in roots {
        if black.contains(root) {
            continue;
        }
        let mut stack: Vec<(&StorePath, usize)> = vec![(root, 0)];
        let mut grey: HashSet<&StorePath> = HashSet::from([root]);
        while let Some((node, i)) = stack.last_mut() {
            let next = graph.get(node).and_then(|v| v.get(*i)).copied();
            *i += 1;
            match next {
                None => {
                    grey.remove(*node);
                    black.insert(*node);
                    stack.pop();
                }
                Some(n) if grey.contains(n) => {
                    let start = stack.iter().position(|(p, _)| *p == n).unwrap_or(0);
                    let mut cycle: Vec<&StorePath> = stack[start..].iter().map(|(p, _)| *p).collect();
                    cycle.push(n);
                    return Some(cycle);
                }
                Some(n) if black.contains(n) => {}
                Some(n) => {
                    grey.insert(n);
                    stack.push((n, 0));
                }
            }
        }
    }
    None
}

fn cycle_message(cycle: &[&StorePath]) -> String {
    let names: Vec<String> = cycle.iter().map(|p| p.to_string()).collect();
    format!("reference cycle {}: store paths reference only themselves and older paths", names.join(" -> "))
}

/// [`check`] off the socket thread when the request is large (see [`CHECK_INLINE`]); gives
/// the request back for [`enqueue`].
async fn checked(
    shared: &Shared,
    paths: Vec<PathInfo>,
    drv: Option<StorePath>,
) -> Result<(Vec<PathInfo>, Option<StorePath>), NotStored> {
    if paths.len() <= CHECK_INLINE {
        return check(&shared.trusted_keys, &paths, drv.as_ref()).map(|()| (paths, drv)).map_err(NotStored::Refused);
    }
    let keys = shared.trusted_keys.clone();
    tokio::task::spawn_blocking(move || check(&keys, &paths, drv.as_ref()).map(|()| (paths, drv)))
        .await
        .map_err(|e| NotStored::Transient(format!("checking the request: {e}")))?
        .map_err(NotStored::Refused)
}

/// Who may ask what. Any peer that can connect (the socket is 0660: root and the socket's
/// group) may ask `status`, `wait`, `missing` and `dropped`, which reveal no more than the
/// cache and the build logs do; only root, the daemon's own user and `allowed-users` may
/// change the queue (`enqueue`, `report`, `recheck`). Returns the refusal.
fn may(shared: &Shared, uid: u32, req: &Request) -> Result<(), String> {
    let changes = matches!(req, Request::Enqueue { .. } | Request::Report { .. } | Request::Recheck { .. });
    if changes && !shared.allowed_uids.contains(&uid) {
        let op = protocol::op_name(req);
        return Err(format!("uid {uid} may not {op} (only root, the daemon's user and allowed-users may)"));
    }
    Ok(())
}

/// Why an `enqueue` request was not stored.
#[derive(Debug)]
pub enum NotStored {
    /// The request is wrong (a forged signature, an incomplete closure…): it would be
    /// refused again, so it is not kept.
    Refused(String),
    /// The daemon could not store it now (disk full, database locked): the request must be
    /// kept and sent again (the hook spools it; spool ingestion leaves the file in place).
    Transient(String),
}

impl NotStored {
    fn queue(e: rusqlite::Error) -> NotStored {
        NotStored::Transient(format!("queue: {e}"))
    }

    fn response(self) -> Response {
        match self {
            NotStored::Refused(m) => Response::refused(m),
            NotStored::Transient(m) => Response::unavailable(m),
        }
    }
}

/// Validates (the queue-dependent part, after [`check`]) and stores an `enqueue` request in
/// `q`; returns how many paths were new.
fn enqueue(q: &mut Queue, keys: &[PublicKey], paths: Vec<PathInfo>, drv: Option<StorePath>) -> Result<usize, NotStored> {
    let mut mentioned: Vec<&StorePath> = paths.iter().flat_map(|p| p.references.iter().chain([&p.path])).collect();
    mentioned.sort_unstable();
    mentioned.dedup();
    let unknown: HashSet<StorePath> = q.not_queued(&mentioned).map_err(NotStored::queue)?.into_iter().collect();
    let queued: HashSet<StorePath> = mentioned.into_iter().filter(|p| !unknown.contains(*p)).cloned().collect();
    let requested: HashSet<&StorePath> = paths.iter().map(|p| &p.path).collect();
    let pending = q.pending_infos(&requested.iter().copied().collect::<Vec<_>>()).map_err(NotStored::queue)?;
    let outside: Vec<&StorePath> = queued.iter().filter(|p| !requested.contains(p)).collect();
    let pending_edges = q.pending_edges(&outside).map_err(NotStored::queue)?;
    validate(keys, &paths, &queued, &pending, &pending_edges).map_err(NotStored::Refused)?;
    // New paths, and pending ones whose info this request changes (it replaces theirs).
    let todo: Vec<PathInfo> = paths
        .iter()
        .filter(|p| !queued.contains(&p.path) || pending.get(&p.path).is_some_and(|old| old.as_ref() != Some(*p)))
        .cloned()
        .collect();
    let new = q.enqueue(&todo, drv.as_ref()).map_err(NotStored::queue)?;
    // Builds of these paths that the hook dropped earlier are handed over now.
    q.clear_dropped(paths.iter().map(|p| &p.path).chain(drv.as_ref())).map_err(NotStored::queue)?;
    Ok(new)
}

/// Stores a non-enqueue request that changes the queue (`report`, `recheck`).
fn record(q: &mut Queue, req: Request) -> Result<usize, NotStored> {
    match req {
        Request::Report { roots, drv, reason } => {
            let reason: String = reason.chars().filter(|c| !c.is_control()).take(1000).collect();
            tracing::warn!(roots = ?roots.iter().map(ToString::to_string).collect::<Vec<_>>(), "a build was not handed over: {reason}");
            q.record_dropped(&roots, drv.as_ref(), &format!("not handed to the daemon: {reason}")).map_err(NotStored::queue)?;
            Ok(roots.len().max(1))
        }
        Request::Recheck { paths } => q.recheck(&paths).map_err(NotStored::queue),
        other => Err(NotStored::Refused(format!("not a request that changes the queue: {other:?}"))),
    }
}

/// Keeps the state dir's reserve ([`spool::ensure_reserve`]) while there is room for it.
fn keep_reserve(state_dir: &Path) {
    match spool::ensure_reserve(state_dir) {
        Ok(true) => tracing::info!("the state disk has room again: its reserve is back"),
        Ok(false) => {}
        Err(e) => tracing::debug!("keeping the reserve in {}: {e}", state_dir.display()),
    }
}

/// The paths of a closure that no other path in it references: the outputs it was sent for.
fn tops(paths: &[PathInfo]) -> Vec<StorePath> {
    let referenced: HashSet<&StorePath> =
        paths.iter().flat_map(|p| p.references.iter().filter(move |r| **r != p.path)).collect();
    paths.iter().map(|p| &p.path).filter(|p| !referenced.contains(p)).cloned().collect()
}

async fn ingest_spool(shared: &Shared) {
    let _ingesting = shared.spool.lock().await;
    let dir = shared.config.spool_dir();
    match spool::tidy(&dir) {
        Ok(done) => done.iter().for_each(|d| tracing::warn!("spool: {d}")),
        Err(e) => tracing::warn!("tidying the spool {}: {e}", dir.display()),
    }
    let files = match spool::list(&dir) {
        Ok(f) => f,
        Err(e) => return tracing::warn!("reading the spool {}: {e}", dir.display()),
    };
    for file in files {
        let parsed = spool::open(&file).map_err(FrameError::from).and_then(|mut f| protocol::read::<Request>(&mut f));
        // Whose build this is, should it be refused: its derivation, else the paths nothing
        // else in the request references.
        let build = match &parsed {
            Ok(Request::Enqueue { paths, drv }) => Some((tops(paths), drv.clone())),
            _ => None,
        };
        let result = match parsed {
            Ok(Request::Enqueue { paths, drv }) => {
                let keys = shared.trusted_keys.clone();
                let new = match checked(shared, paths, drv).await {
                    Ok((paths, drv)) => shared.queue(move |q| enqueue(q, &keys, paths, drv)).await,
                    Err(e) => Err(e),
                };
                shared.wake.notify_one();
                new
            }
            Ok(req @ Request::Report { .. }) => shared.queue(move |q| record(q, req)).await,
            Ok(other) => Err(NotStored::Refused(format!("not an enqueue request: {other:?}"))),
            // Not a request (a FIFO, too large) or cut short: reading it again would not help.
            Err(FrameError::Io(e)) if matches!(e.kind(), std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof) => {
                Err(NotStored::Refused(format!("reading it: {e}")))
            }
            Err(FrameError::Io(e)) => Err(NotStored::Transient(format!("reading it: {e}"))),
            Err(e) => Err(NotStored::Refused(e.to_string())),
        };
        match result {
            Ok(new) => {
                tracing::info!(file = %file.display(), new, "ingested spooled request");
                if let Err(e) = std::fs::remove_file(&file) {
                    tracing::warn!("removing {}: {e}", file.display());
                }
            }
            Err(NotStored::Transient(why)) => {
                // Left in place: the next ingestion tries again.
                tracing::warn!(file = %file.display(), "could not ingest a spooled request, will retry: {why}");
            }
            Err(NotStored::Refused(why)) => {
                let moved = spool::reject(&file).map(|p| p.display().to_string()).unwrap_or_else(|e| e.to_string());
                tracing::warn!(file = %file.display(), moved_to = %moved, "refused spooled request: {why}");
                // A build the hook saw: reported until `narq retry` hands it over.
                if let Some((roots, drv)) = build {
                    let reason = format!("its spooled request was refused: {why}");
                    if let Err(e) = shared.queue(move |q| q.record_dropped(&roots, drv.as_ref(), &reason)).await {
                        tracing::error!("recording a refused spooled request: {e}");
                    }
                }
            }
        }
    }
}

/// Serves one client connection: frames in, frames out.
async fn serve(shared: Arc<Shared>, mut stream: UnixStream) {
    let uid = match stream.peer_cred() {
        Ok(c) => c.uid(),
        Err(e) => return tracing::warn!("refused a connection: cannot read its credentials: {e}"),
    };
    // Who may only read sends small requests: a reader cannot make the daemon buffer (or
    // parse, on the socket thread) what only an enqueue needs.
    let limit = if shared.allowed_uids.contains(&uid) { protocol::MAX_FRAME as usize } else { READER_MAX_FRAME };
    loop {
        let req = match tokio::time::timeout(IDLE_TIMEOUT, read_request(&mut stream, limit)).await {
            Ok(Ok(Some(r))) => r,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                tracing::warn!(uid, "refused a request: {e}");
                let _ = reply(&mut stream, &Response::refused(e.to_string())).await;
                return;
            }
            Err(_) => return,
        };
        if let Err(why) = may(&shared, uid, &req) {
            tracing::warn!(uid, "refused a request: {why}");
            let _ = reply(&mut stream, &Response::refused(why)).await;
            return;
        }
        let started = Instant::now();
        let op = protocol::op_name(&req);
        let resp = match req {
            Request::Enqueue { paths, drv } => {
                let n = paths.len();
                let stored = match checked(&shared, paths, drv).await {
                    Ok((paths, drv)) => shared.queue_here(|q| enqueue(q, &shared.trusted_keys, paths, drv)),
                    Err(e) => Err(e),
                };
                match stored {
                    Ok(new) => {
                        shared.wake.notify_one();
                        tracing::debug!(uid, paths = n, new, "enqueued");
                        Response::Queued { new }
                    }
                    Err(NotStored::Refused(message)) => {
                        tracing::warn!(uid, "refused a request: {message}");
                        let _ = reply(&mut stream, &Response::refused(message)).await;
                        return;
                    }
                    Err(NotStored::Transient(message)) => {
                        tracing::warn!(uid, "could not store a request (the client keeps it): {message}");
                        Response::unavailable(message)
                    }
                }
            }
            Request::Missing { paths } => {
                match shared.queue_here(|q| q.not_queued(&paths.iter().collect::<Vec<_>>())) {
                    Ok(paths) => Response::Missing { paths },
                    Err(e) => Response::unavailable(format!("queue: {e}")),
                }
            }
            Request::Status => status(&shared),
            Request::Wait { timeout_ms, paths } => {
                // A reader's wait must not take the failures it reports away from others.
                let acknowledges = shared.allowed_uids.contains(&uid);
                wait(&shared, Duration::from_millis(timeout_ms), paths, acknowledges).await
            }
            req @ (Request::Report { .. } | Request::Recheck { .. }) => {
                let recheck = matches!(req, Request::Recheck { .. });
                match shared.queue_here(|q| record(q, req)) {
                    Ok(count) => {
                        // The check must ask the cache, not what the target remembers of it.
                        if recheck && count > 0 {
                            shared.uploader.target.forget_listing();
                        }
                        shared.wake.notify_one();
                        Response::Recorded { count }
                    }
                    Err(e) => e.response(),
                }
            }
            Request::Dropped => match shared.queue_here(|q| q.dropped()) {
                Ok(builds) => Response::Dropped { builds },
                Err(e) => Response::unavailable(format!("queue: {e}")),
            },
        };
        tracing::debug!(uid, op, micros = started.elapsed().as_micros() as u64, "handled");
        if let Err(e) = reply(&mut stream, &resp).await {
            if e.kind() == std::io::ErrorKind::TimedOut {
                tracing::warn!(uid, op, "dropped a client: {e}");
            }
            return;
        }
    }
}

/// The largest request a peer that may not change the queue may send (`status`, `wait`,
/// `missing` for some thousands of paths).
const READER_MAX_FRAME: usize = 1 << 20;

/// Reads one request of at most `limit` bytes; `None` on a clean end of stream.
async fn read_request(stream: &mut UnixStream, limit: usize) -> Result<Option<Request>, FrameError> {
    let mut h = [0u8; HEADER_LEN];
    match stream.read_exact(&mut h).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = protocol::parse_header(&h)?;
    if len > limit {
        let why = format!("a request of {len} bytes is more than the {limit} bytes this peer may send");
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, why).into());
    }
    // Grown with what arrives, not allocated from what the header announces: a header
    // alone costs nothing.
    let mut body = Vec::with_capacity(len.min(64 << 10));
    AsyncReadExt::take(&mut *stream, len as u64).read_to_end(&mut body).await?;
    if body.len() < len {
        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
    }
    Ok(Some(serde_json::from_slice(&body)?))
}

/// Writes `resp`, giving up after [`WRITE_TIMEOUT`]: a client that does not read must not
/// pin the connection and the answer's memory.
async fn reply(stream: &mut UnixStream, resp: &Response) -> std::io::Result<()> {
    let frame = protocol::encode(resp);
    match tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&frame)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("it did not read a {} byte answer within {} s", frame.len(), WRITE_TIMEOUT.as_secs()),
        )),
    }
}

fn status(shared: &Shared) -> Response {
    match shared.queue_here(|q| q.status()) {
        Ok(mut s) => {
            s.in_flight = shared.in_flight.lock().unwrap().len() as u64;
            s.spooled = spool::list(&shared.config.spool_dir()).map_or(0, |v| v.len() as u64);
            s.store = shared.uploader.target.describe();
            let h = shared.health.lock().unwrap();
            s.target_error = h.paused_for().and(h.error.clone());
            Response::Status(s)
        }
        Err(e) => Response::unavailable(format!("queue: {e}")),
    }
}

/// Waits until the items enqueued so far (or `paths`) are done or failed, and the spool is
/// empty, or `timeout`. Without `paths`, reports the failures since the last wait that saw
/// everything done (the checkpoint); a caller who may change the queue (`acknowledges`)
/// moves the checkpoint once everything is done.
async fn wait(shared: &Shared, timeout: Duration, paths: Option<Vec<StorePath>>, acknowledges: bool) -> Response {
    let start = Instant::now();
    ingest_spool(shared).await;
    let mut ingested = Instant::now();
    let (upto, since) = match shared.queue_here(|q| q.wait_checkpoint().map(|c| (q.current_seq(), c))) {
        Ok(s) => s,
        Err(e) => return Response::unavailable(format!("queue: {e}")),
    };
    let spool_dir = shared.config.spool_dir();
    loop {
        let progress = shared.queue_here(|q| match &paths {
            Some(p) => q.progress_of(p),
            None => q.progress(upto, since),
        });
        // A request still in the spool (the queue could not take it yet) is not uploaded.
        let spooled = spool::list(&spool_dir).map_or(0, |v| v.len() as u64);
        match progress {
            Ok((0, failed)) if spooled == 0 => {
                if paths.is_none() && acknowledges {
                    if let Err(e) = shared.queue_here(|q| q.set_wait_checkpoint(upto)) {
                        tracing::warn!("recording the wait checkpoint: {e}");
                    }
                }
                return Response::Waited { complete: true, failed };
            }
            Ok((_, failed)) if start.elapsed() >= timeout => return Response::Waited { complete: false, failed },
            Ok(_) => {
                if spooled > 0 && ingested.elapsed() >= SPOOL_POLL {
                    ingest_spool(shared).await;
                    ingested = Instant::now();
                }
                tokio::time::sleep(Duration::from_millis(25)).await
            }
            Err(e) => return Response::unavailable(format!("queue: {e}")),
        }
    }
}
