//! The socket server: binds or inherits the socket, accepts clients within limits, and
//! answers each request.

use std::collections::HashMap;
use std::os::unix::net::UnixListener as StdUnixListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::{UnixListener, UnixStream};

use tokio::sync::watch;

use super::admission::{enqueue, record, repair, roots, Admission, NotStored, Whole};
use super::lock::{bound, lock_socket, lock_state_dir};
use super::systemd::systemd_listener;
use super::workers::Snapshot;
use crate::config::Config;
use crate::nix::StorePath;
use crate::protocol::{self, Request, Response};
use crate::spool;
use crate::queue::PathList;

/// A client that sends nothing for this long is dropped.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// A client that does not take our answer for this long is dropped, and the memory the
/// answer holds with it.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// What serving a client needs.
pub(super) struct Server {
    /// Admits what changes the queue, and reads it for the rest.
    pub(super) admission: Arc<Admission>,
    /// What the dispatcher publishes: in flight, and why uploads are paused.
    pub(super) workers: watch::Receiver<Snapshot>,
    /// Where uploads go, for `status`.
    pub(super) store: String,
    /// The store itself: a `recheck` makes it forget what it remembers of the cache.
    pub(super) target: Arc<dyn crate::storage::Target>,
    /// Asks the daemon's keeper to settle the requests answered so far (`wait`).
    pub(super) settle: tokio::sync::mpsc::Sender<super::SettleAsk>,
    /// Counts requests; the uploads in flight and their progress, for `status`.
    pub(super) metrics: Arc<crate::metrics::Metrics>,
}

/// Binds the configured socket (parent created, stale socket removed, mode 0660), unless
/// systemd passed one (`LISTEN_FDS`). Non-blocking, for `daemon::run` to serve; `run` removes
/// the socket when it stops. Takes the state dir's lock first and then the socket's, so that
/// a second daemon leaves a running one's socket alone (see `lock`).
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
    lock_socket(path, &config.state_dir)?;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing stale socket {}", path.display()))
        }
        _ => {}
    }
    let l = StdUnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    bound(path)?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o660))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Accepts clients and serves each in a task until `stop` turns true.
///
/// Connections are capped (see [`Conns`]): at the cap, clients wait in the listen backlog,
/// which costs us no file descriptor. An accept that fails (out of file descriptors, most
/// likely) is retried after a pause that grows to a second, and said once, not each time.
pub(super) async fn accept(server: Arc<Server>, listener: UnixListener, mut stop: tokio::sync::watch::Receiver<bool>) {
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
                    let server = server.clone();
                    tokio::spawn(async move {
                        serve(server, stream).await;
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

/// Serves one client connection: frames in, frames out.
async fn serve(server: Arc<Server>, mut stream: UnixStream) {
    let admission = &server.admission;
    let uid = match stream.peer_cred() {
        Ok(c) => c.uid(),
        Err(e) => return tracing::warn!("refused a connection: cannot read its credentials: {e}"),
    };
    // Who may only read sends small requests: a reader cannot make the daemon buffer (or
    // parse, on the socket thread) what only an enqueue needs.
    let limit = if admission.may_change(uid) { protocol::MAX_FRAME as usize } else { READER_MAX_FRAME };
    loop {
        let req = match tokio::time::timeout(IDLE_TIMEOUT, protocol::read_async(&mut stream, limit)).await {
            Ok(Ok(Some(r))) => r,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                tracing::warn!(uid, "refused a request: {e}");
                let _ = protocol::write_async(&mut stream, &Response::refused(e.to_string()), WRITE_TIMEOUT).await;
                return;
            }
            Err(_) => return,
        };
        if let Err(why) = admission.may(uid, &req) {
            tracing::warn!(uid, "refused a request: {why}");
            let _ = protocol::write_async(&mut stream, &Response::refused(why), WRITE_TIMEOUT).await;
            return;
        }
        let started = Instant::now();
        let op = req.op();
        server.metrics.request(op);
        let resp = match req {
            Request::Enqueue { paths, drv, realisations, part } => {
                let n = paths.len();
                let named: Vec<StorePath> = paths.iter().map(|p| p.path.clone()).collect();
                let whole = if part { Whole::Part } else { Whole::Closure };
                let stored = match admission.checked(paths, drv, realisations).await {
                    Ok(req) => admission.queue.here(|q| enqueue(q, &admission.trusted_keys, req, whole).map(|n| (n, q.current_seq()))),
                    Err(e) => Err(e),
                };
                match stored {
                    Ok((new, seq)) => {
                        admission.wake.notify_one();
                        admission.asked_now(named, seq);
                        tracing::debug!(uid, paths = n, new, "enqueued");
                        if n >= LARGE_REQUEST {
                            super::release_memory();
                        }
                        Response::Queued { new }
                    }
                    Err(NotStored::Refused(message)) => {
                        tracing::warn!(uid, "refused a request: {message}");
                        let _ = protocol::write_async(&mut stream, &Response::refused(message), WRITE_TIMEOUT).await;
                        return;
                    }
                    Err(NotStored::Transient(message)) => {
                        tracing::warn!(uid, "could not store a request (the client keeps it): {message}");
                        Response::unavailable(message)
                    }
                }
            }
            Request::Roots { paths, drv, nar_hashes } => match admission.queue.here(|q| roots(q, &paths, &nar_hashes, drv.as_ref()).map(|r| r.map(|n| (n, q.current_seq())))) {
                Ok(Ok((new, seq))) => {
                    admission.wake.notify_one();
                    admission.asked_now(paths, seq);
                    Response::Queued { new }
                }
                Ok(Err(missing)) => Response::Missing { paths: missing },
                Err(e) => e.response(),
            },
            Request::Repair { paths, repair: broken } => {
                let stored = match admission.checked(paths, None, Vec::new()).await {
                    Ok(checked) => admission.queue.here(|q| repair(q, &admission.trusted_keys, checked, &broken)),
                    Err(e) => Err(e),
                };
                match stored {
                    Ok(count) => {
                        admission.wake.notify_one();
                        tracing::info!(uid, paths = count, "{count} paths to repair: uploaded again whatever the cache has");
                        Response::Queued { new: count }
                    }
                    Err(e) => e.response(),
                }
            }
            Request::Missing { paths } => {
                match admission.queue.here(|q| q.lacking(&paths.iter().collect::<Vec<_>>())) {
                    Ok(paths) => Response::Missing { paths },
                    Err(e) => Response::unavailable(format!("queue: {e}")),
                }
            }
            Request::Status => status(&server),
            Request::Wait { timeout_ms, paths } => {
                // A reader's wait must not take the failures it reports away from others.
                let acknowledges = admission.may_change(uid);
                wait(&server, Duration::from_millis(timeout_ms), paths, acknowledges).await
            }
            req @ (Request::Report { .. } | Request::Recheck { .. }) => {
                let recheck = matches!(req, Request::Recheck { .. });
                match admission.queue.here(|q| record(q, req)) {
                    Ok(count) => {
                        // The check must ask the cache, not what the target remembers of it.
                        if recheck && count > 0 {
                            server.target.forget_listing();
                        }
                        admission.wake.notify_one();
                        Response::Recorded { count }
                    }
                    Err(e) => e.response(),
                }
            }
            Request::Dropped => match admission.queue.here(|q| q.dropped()) {
                Ok(builds) => Response::Dropped { builds },
                Err(e) => Response::unavailable(format!("queue: {e}")),
            },
        };
        tracing::debug!(uid, op, micros = started.elapsed().as_micros() as u64, "handled");
        if let Err(e) = protocol::write_async(&mut stream, &resp, WRITE_TIMEOUT).await {
            if e.kind() == std::io::ErrorKind::TimedOut {
                tracing::warn!(uid, op, "dropped a client: {e}");
            }
            return;
        }
    }
}

fn status(server: &Server) -> Response {
    match server.admission.queue.here(|q| q.status()) {
        Ok(mut s) => {
            let workers = server.workers.borrow();
            s.in_flight = workers.in_flight as u64;
            s.target_error = workers.target_error();
            s.paused_secs = workers.paused_secs();
            s.uploading = server.metrics.uploading();
            s.nar_bytes_read = server.metrics.nar_bytes_read();
            s.spooled = spool::list(&server.admission.spool_dir).map_or(0, |v| v.len() as u64);
            s.store = server.store.clone();
            Response::Status(s)
        }
        Err(e) => Response::unavailable(format!("queue: {e}")),
    }
}

/// Paths in a request after which the daemon gives the memory it took back ([`super::release_memory`]).
pub(super) const LARGE_REQUEST: usize = 1000;

/// The largest request a peer that may not change the queue may send (`status`, `wait`,
/// `missing` for some thousands of paths).
const READER_MAX_FRAME: usize = 1 << 20;

/// Waits until the items enqueued so far (or `paths`) are done or failed, and the spool is
/// empty, or `timeout`. Without `paths`, reports the failures since the last wait that saw
/// everything done (the checkpoint); a caller who may change the queue (`acknowledges`)
/// moves the checkpoint once everything is done.
async fn wait(server: &Server, timeout: Duration, paths: Option<Vec<StorePath>>, acknowledges: bool) -> Response {
    let admission = &server.admission;
    let start = Instant::now();
    admission.ingest_spool().await;
    let mut ingested = Instant::now();
    // What requests answered from memory relied on, a collection may have removed since: the
    // daemon looks at the collections first (one request), and what they took is pending again.
    let (ask, settled) = tokio::sync::oneshot::channel();
    if server.settle.send(ask).await.is_ok() {
        let _ = tokio::time::timeout(timeout.min(Duration::from_secs(30)), settled).await;
    }
    let (upto, since) = match admission.queue.here(|q| q.wait_checkpoint().map(|c| (q.current_seq(), c))) {
        Ok(s) => s,
        Err(e) => return Response::unavailable(format!("queue: {e}")),
    };
    let paths = paths.as_deref().map(PathList::new);
    // What the answer says became of the items it waited for.
    let summary = || admission.queue.here(|q| q.wait_summary(upto, since, paths.as_ref())).inspect_err(|e| tracing::warn!("summing up a wait: {e}")).ok();
    loop {
        // Uploads, and the roots of what they uploaded: a machine that goes away after `wait`
        // leaves its paths rooted in the cache.
        let looked = Instant::now();
        let progress = admission.queue.here(|q| {
            let (pending, failed) = match &paths {
                Some(p) => q.progress_of(p)?,
                None => q.progress(upto, since)?,
            };
            Ok::<_, rusqlite::Error>((pending + q.roots_pending(Some(upto), paths.as_ref())?, failed))
        });
        // A request still in the spool (the queue could not take it yet) is not uploaded.
        let spooled = spool::list(&admission.spool_dir).map_or(0, |v| v.len() as u64);
        match progress {
            Ok((0, failed)) if spooled == 0 => {
                if paths.is_none() && acknowledges {
                    if let Err(e) = admission.queue.here(|q| q.set_wait_checkpoint(upto)) {
                        tracing::warn!("recording the wait checkpoint: {e}");
                    }
                }
                return Response::Waited { complete: true, failed, summary: summary() };
            }
            Ok((_, failed)) if start.elapsed() >= timeout => return Response::Waited { complete: false, failed, summary: summary() },
            Ok(_) => {
                if spooled > 0 && ingested.elapsed() >= Duration::from_secs(1) {
                    admission.ingest_spool().await;
                    ingested = Instant::now();
                }
                // A look at a large closure holds the queue (and this thread) for a while:
                // at most a tenth of the time, so that uploads and hooks go on meanwhile.
                tokio::time::sleep(Duration::from_millis(25).max(looked.elapsed() * 10)).await
            }
            Err(e) => return Response::unavailable(format!("queue: {e}")),
        }
    }
}
