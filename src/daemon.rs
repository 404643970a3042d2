//! `narq daemon`: accepts requests on the Unix socket, keeps them in the durable queue,
//! ingests the spool, and runs the upload workers.
//!
//! [`run`] takes the listener and a shutdown future, so that tests start a real daemon on
//! a temporary socket and stop it, and systemd can hand over its socket (`LISTEN_FDS`).

use std::collections::HashSet;
use std::future::Future;
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::Path;
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
use crate::target;
use crate::upload::{UploadError, Uploader};

/// How often the spool directory is checked for requests written while we were away.
const SPOOL_POLL: Duration = Duration::from_secs(1);
/// A client that sends nothing for this long is dropped.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

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
    fn fail(&mut self, e: &target::TargetError) {
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

/// Binds the configured socket (parent created, stale socket removed, mode 0660), unless
/// systemd passed one (`LISTEN_FDS`). Non-blocking, for [`run`] to serve.
pub fn listener(config: &Config) -> anyhow::Result<StdUnixListener> {
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

/// Runs the daemon until `shutdown` completes.
pub async fn run(config: Config, listener: StdUnixListener, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let tmp_dir = config.state_dir.join("tmp");
    let _ = std::fs::remove_dir_all(&tmp_dir);
    std::fs::create_dir_all(&tmp_dir).with_context(|| format!("creating {}", tmp_dir.display()))?;
    let db = config.state_dir.join("queue.db");
    let queue = Queue::open(&db).with_context(|| format!("opening the queue {}", db.display()))?;
    let target = target::open(&config.store).await.map_err(|e| anyhow::anyhow!("store {}: {e}", config.store.original))?;
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
        trusted_keys: Arc::new(config.trusted_keys()),
        health: Mutex::new(Health::default()),
        spool: tokio::sync::Mutex::new(()),
        config,
    });
    if shared.trusted_keys.is_empty() {
        tracing::warn!("no public-keys and no readable secret-key-files: handed-in signatures are not checked");
    }
    ingest_spool(&shared).await;
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
    tracing::info!("narq daemon stopped");
    Ok(())
}

/// Accepts clients and serves each in a task until `stop` turns true.
async fn accept(shared: Arc<Shared>, listener: UnixListener, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => { tokio::spawn(serve(shared.clone(), stream)); }
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
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

/// Checks an `enqueue` request before anything of it is stored. `queued` holds the paths
/// (of the request and of its references) that the queue already holds, pending or done:
/// references outside the request must be among them, and their signatures are not
/// checked, since the queue keeps what it has.
pub fn validate(
    keys: &[PublicKey],
    paths: &[PathInfo],
    drv: Option<&StorePath>,
    queued: &HashSet<StorePath>,
) -> Result<(), String> {
    let set: HashSet<&StorePath> = paths.iter().map(|p| &p.path).collect();
    if set.len() != paths.len() {
        return Err("a path is listed twice".into());
    }
    let new: Vec<&PathInfo> = paths.iter().filter(|p| !queued.contains(&p.path)).collect();
    for p in &new {
        if p.nar_size == 0 {
            return Err(format!("{}: NarSize is 0", p.path));
        }
        if let Some(r) = p.references.iter().find(|r| !set.contains(r) && !queued.contains(*r)) {
            return Err(format!("incomplete closure: {} references {r}, which is neither in the request nor queued", p.path));
        }
    }
    let forged = crate::par::map(&new, |p| p.forged_sigs(keys).first().map(|s| format!("signature {s:?} on {}", p.path)));
    if let Some(f) = forged.into_iter().flatten().next() {
        return Err(format!("{f} does not verify with the configured key of that name"));
    }
    if let Some(d) = drv.filter(|d| !d.name().ends_with(".drv")) {
        return Err(format!("{d} is not a derivation"));
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

/// Validates and stores an `enqueue` request in `q`; returns how many paths were new.
fn enqueue(q: &mut Queue, keys: &[PublicKey], paths: Vec<PathInfo>, drv: Option<StorePath>) -> Result<usize, NotStored> {
    let mut mentioned: Vec<&StorePath> = paths.iter().flat_map(|p| p.references.iter().chain([&p.path])).collect();
    mentioned.sort_unstable();
    mentioned.dedup();
    let unknown: HashSet<StorePath> = q.not_queued(&mentioned).map_err(NotStored::queue)?.into_iter().collect();
    let queued: HashSet<StorePath> = mentioned.into_iter().filter(|p| !unknown.contains(*p)).cloned().collect();
    validate(keys, &paths, drv.as_ref(), &queued).map_err(NotStored::Refused)?;
    let todo: Vec<PathInfo> = paths.into_iter().filter(|p| !queued.contains(&p.path)).collect();
    q.enqueue(&todo, drv.as_ref()).map_err(NotStored::queue)
}

async fn ingest_spool(shared: &Shared) {
    let _ingesting = shared.spool.lock().await;
    let dir = shared.config.spool_dir();
    let files = match spool::list(&dir) {
        Ok(f) => f,
        Err(e) => return tracing::warn!("reading the spool {}: {e}", dir.display()),
    };
    for file in files {
        let parsed = std::fs::File::open(&file).map_err(FrameError::from).and_then(|mut f| protocol::read::<Request>(&mut f));
        let result = match parsed {
            Ok(Request::Enqueue { paths, drv }) => {
                let keys = shared.trusted_keys.clone();
                let new = shared.queue(move |q| enqueue(q, &keys, paths, drv)).await;
                shared.wake.notify_one();
                new
            }
            Ok(other) => Err(NotStored::Refused(format!("not an enqueue request: {other:?}"))),
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
    if !shared.allowed_uids.contains(&uid) {
        tracing::warn!(uid, "refused a connection: uid {uid} may not enqueue (allowed-users)");
        let _ = reply(&mut stream, &Response::refused(format!("uid {uid} is not allowed"))).await;
        return;
    }
    loop {
        let req = match tokio::time::timeout(IDLE_TIMEOUT, read_request(&mut stream)).await {
            Ok(Ok(Some(r))) => r,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                tracing::warn!(uid, "refused a request: {e}");
                let _ = reply(&mut stream, &Response::refused(e.to_string())).await;
                return;
            }
            Err(_) => return,
        };
        let started = Instant::now();
        let op = match &req {
            Request::Enqueue { .. } => "enqueue",
            Request::Missing { .. } => "missing",
            Request::Status => "status",
            Request::Wait { .. } => "wait",
        };
        let resp = match req {
            Request::Enqueue { paths, drv } => {
                let n = paths.len();
                match shared.queue_here(|q| enqueue(q, &shared.trusted_keys, paths, drv)) {
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
            Request::Wait { timeout_ms } => wait(&shared, Duration::from_millis(timeout_ms)).await,
        };
        tracing::debug!(uid, op, micros = started.elapsed().as_micros() as u64, "handled");
        if reply(&mut stream, &resp).await.is_err() {
            return;
        }
    }
}

/// Reads one request; `None` on a clean end of stream.
async fn read_request(stream: &mut UnixStream) -> Result<Option<Request>, FrameError> {
    let mut h = [0u8; HEADER_LEN];
    match stream.read_exact(&mut h).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = protocol::parse_header(&h)?;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    Ok(Some(serde_json::from_slice(&body)?))
}

async fn reply(stream: &mut UnixStream, resp: &Response) -> std::io::Result<()> {
    stream.write_all(&protocol::encode(resp)).await
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

async fn wait(shared: &Shared, timeout: Duration) -> Response {
    let start = Instant::now();
    ingest_spool(shared).await;
    let seq = shared.queue_here(|q| q.current_seq());
    loop {
        match shared.queue_here(|q| q.progress_since(seq)) {
            Ok((0, failed)) => return Response::Waited { complete: true, failed },
            Ok((_, failed)) if start.elapsed() >= timeout => return Response::Waited { complete: false, failed },
            Ok(_) => tokio::time::sleep(Duration::from_millis(25)).await,
            Err(e) => return Response::unavailable(format!("queue: {e}")),
        }
    }
}
