//! Admission: validating and enqueuing a request, from the socket or the spool.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::Notify;

use super::shared_queue::SharedQueue;
use crate::nix::{PathInfo, PublicKey, Realisation, Sha256, StorePath};
use crate::protocol::{self, FrameError, Request, Response};
use crate::queue::Queue;
use crate::spool;

/// What admitting a request needs: who may, which keys, where it goes.
pub(super) struct Admission {
    /// Where admitted requests are stored.
    pub(super) queue: SharedQueue,
    /// Keys that handed-in signatures are checked against ([`crate::config::Config::trusted_keys`]).
    pub(super) trusted_keys: Arc<Vec<PublicKey>>,
    /// Uids that may enqueue: root, our own, and `allowed-users`.
    pub(super) allowed_uids: Vec<u32>,
    /// Where the hook spools requests while the daemon is away.
    pub(super) spool_dir: PathBuf,
    /// Wakes the dispatcher: something was enqueued.
    pub(super) wake: Arc<Notify>,
    /// Held while the spool is ingested: the poller and `wait` both ingest, and two at once
    /// would read a file the other is removing and log a false refusal.
    spool: tokio::sync::Mutex<()>,
    /// Paths that requests named, and when: once the cache's collections were looked at after
    /// that, a collection seen then makes them pending again (`daemon::recheck_asked`).
    pub(super) asked: std::sync::Mutex<Vec<Asked>>,
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

/// The checks of an `enqueue` request's realisations that need no queue state: well-formed,
/// listed once, and signed by one of `keys` (guarantee 8, as for paths). Whether each out
/// path is in the request or queued is [`enqueue`]'s to check.
pub fn check_realisations(keys: &[PublicKey], realisations: &[Realisation]) -> Result<(), String> {
    let ids: HashSet<&str> = realisations.iter().map(|r| r.id.as_str()).collect();
    if ids.len() != realisations.len() {
        return Err("a realisation is listed twice".into());
    }
    realisations.iter().try_for_each(|r| r.check_syntax().and_then(|()| r.check_sigs(keys)))
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


impl Admission {
    pub(super) fn new(queue: SharedQueue, trusted_keys: Vec<PublicKey>, allowed_uids: Vec<u32>, spool_dir: PathBuf, wake: Arc<Notify>) -> Admission {
        Admission { queue, trusted_keys: Arc::new(trusted_keys), allowed_uids, spool_dir, wake, spool: tokio::sync::Mutex::new(()), asked: Default::default() }
    }

    /// [`check`] off the socket thread when the request is large (see [`CHECK_INLINE`]); gives
    /// the request back for [`enqueue`].
    pub(super) async fn checked(&self, paths: Vec<PathInfo>, drv: Option<StorePath>, realisations: Vec<Realisation>) -> Result<Checked, NotStored> {
        check_realisations(&self.trusted_keys, &realisations).map_err(NotStored::Refused)?;
        self.checked_paths(paths, drv).await.map(|(paths, drv)| (paths, drv, realisations))
    }

    async fn checked_paths(&self, paths: Vec<PathInfo>, drv: Option<StorePath>) -> Result<(Vec<PathInfo>, Option<StorePath>), NotStored> {
        if paths.len() <= CHECK_INLINE {
            return check(&self.trusted_keys, &paths, drv.as_ref()).map(|()| (paths, drv)).map_err(NotStored::Refused);
        }
        let keys = self.trusted_keys.clone();
        tokio::task::spawn_blocking(move || check(&keys, &paths, drv.as_ref()).map(|()| (paths, drv)))
            .await
            .map_err(|e| NotStored::Transient(format!("checking the request: {e}")))?
            .map_err(NotStored::Refused)
    }

    /// Notes that a request named `paths` now (see [`Admission::asked`]), in the queue's
    /// place `seq`.
    pub(super) fn asked_now(&self, paths: Vec<StorePath>, seq: i64) {
        if let Ok(mut a) = self.asked.lock() {
            a.push(Asked { at: std::time::Instant::now(), seq, paths });
        }
    }

    /// Whether `uid` may change the queue: root, the daemon's own user and `allowed-users`.
    pub(super) fn may_change(&self, uid: u32) -> bool {
        self.allowed_uids.contains(&uid)
    }

    /// Who may ask what. Any peer that can connect (the socket is 0660: root and the socket's
    /// group) may ask `status`, `wait`, `missing` and `dropped`, which reveal no more than the
    /// cache and the build logs do; only those who [may change](Self::may_change) the queue
    /// may `enqueue`, `report`, `recheck` or `repair`. Returns the refusal.
    pub(super) fn may(&self, uid: u32, req: &Request) -> Result<(), String> {
        let changes = matches!(req, Request::Enqueue { .. } | Request::Roots { .. } | Request::Report { .. } | Request::Recheck { .. } | Request::Repair { .. });
        if changes && !self.may_change(uid) {
            let op = req.op();
            return Err(format!("uid {uid} may not {op} (only root, the daemon's user and allowed-users may)"));
        }
        Ok(())
    }
}

/// An `enqueue` request that passed [`Admission::checked`]: paths, derivation, realisations.
pub(super) type Checked = (Vec<PathInfo>, Option<StorePath>, Vec<Realisation>);

/// Whether a request is a whole closure, whose top paths are its roots, or a part of one
/// sent in several (`enqueue`'s `part`), whose roots come with its last part.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Whole {
    Closure,
    Part,
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

    pub(super) fn response(self) -> Response {
        match self {
            NotStored::Refused(m) => Response::refused(m),
            NotStored::Transient(m) => Response::unavailable(m),
        }
    }
}

/// A request answered while the daemon may not have seen a collection yet (see
/// `daemon::Keeper::recheck_asked`).
pub(super) struct Asked {
    /// When it was answered.
    pub(super) at: std::time::Instant,
    /// Its place in the queue: what it makes pending again keeps it, for `wait`.
    pub(super) seq: i64,
    /// The paths it named.
    pub(super) paths: Vec<StorePath>,
}

/// Validates (the queue-dependent part, after [`check`]) and stores an `enqueue` request in
/// `q`; returns how many paths were new.
pub(super) fn enqueue(q: &mut Queue, keys: &[PublicKey], (paths, drv, realisations): Checked, whole: Whole) -> Result<usize, NotStored> {
    let requested: HashSet<&StorePath> = paths.iter().map(|p| &p.path).collect();
    let mut own: Vec<&StorePath> = requested.iter().copied().chain(realisations.iter().map(|r| &r.out_path)).collect();
    own.sort_unstable();
    own.dedup();
    let mut unknown: HashSet<StorePath> = q.not_queued(&own).map_err(NotStored::queue)?.into_iter().collect();
    let named: Vec<&StorePath> = requested.iter().copied().collect();
    let pending = q.pending_infos(&named).map_err(NotStored::queue)?;
    let held = q.queued_infos(&named).map_err(NotStored::queue)?;
    // References matter only for the paths this request adds or may replace (pending ones):
    // a path uploaded already came with its closure. A build over a queued closure re-sends
    // its outputs (as roots), whose references are then not looked up one by one.
    let mut refs: Vec<&StorePath> = paths
        .iter()
        .filter(|p| unknown.contains(&p.path) || pending.contains_key(&p.path))
        .flat_map(|p| &p.references)
        .filter(|r| !requested.contains(r))
        .collect();
    refs.sort_unstable();
    refs.dedup();
    unknown.extend(q.not_queued(&refs).map_err(NotStored::queue)?);
    let queued: HashSet<StorePath> = own.into_iter().chain(refs).filter(|p| !unknown.contains(*p)).cloned().collect();
    let outside: Vec<&StorePath> = queued.iter().filter(|p| !requested.contains(p)).collect();
    let pending_edges = q.pending_edges(&outside).map_err(NotStored::queue)?;
    validate(keys, &paths, &queued, &pending, &pending_edges).map_err(NotStored::Refused)?;
    // A realisation is uploaded after its out path: which must be on its way.
    if let Some(r) = realisations.iter().find(|r| !requested.contains(&r.out_path) && !queued.contains(&r.out_path)) {
        return Err(NotStored::Refused(format!("realisation {}: its out path {} is neither in the request nor queued", r.id, r.out_path)));
    }
    // New paths, and held ones whose info this request changes (it replaces theirs: a path
    // may have been rebuilt with other contents since).
    let changes = |p: &PathInfo| held.get(&p.path).is_some_and(|old| old.as_ref() != Some(p));
    let new = q.enqueue(paths.iter().filter(|p| !queued.contains(&p.path) || changes(p)), drv.as_ref()).map_err(NotStored::queue)?;
    q.enqueue_realisations(&realisations).map_err(NotStored::queue)?;
    // Its top-level paths are roots of the cache: in use, whether uploaded now or before.
    if whole == Whole::Closure {
        q.note_roots(&PathInfo::tops(&paths)).map_err(NotStored::queue)?;
    }
    // Builds of these paths that the hook dropped earlier are handed over now.
    q.clear_dropped(paths.iter().map(|p| &p.path).chain(drv.as_ref())).map_err(NotStored::queue)?;
    Ok(new)
}

/// Records `roots` that the queue holds (a [`Request::Roots`]) as an [`enqueue`] of them
/// would: roots of the cache, their dropped builds cleared, the build log of `drv` queued.
/// `Err` names those it does not hold (or failed), or failed paths they rely on (then the
/// client sends the closure whole), and nothing is recorded.
pub(super) fn roots(q: &mut Queue, roots: &[StorePath], nar_hashes: &[Sha256], drv: Option<&StorePath>) -> Result<Result<usize, Vec<StorePath>>, NotStored> {
    if let Some(d) = drv.filter(|d| !d.name().ends_with(".drv")) {
        return Err(NotStored::Refused(format!("{d} is not a derivation")));
    }
    if !nar_hashes.is_empty() && nar_hashes.len() != roots.len() {
        return Err(NotStored::Refused(format!("{} NarHashes for {} roots", nar_hashes.len(), roots.len())));
    }
    let named: Vec<&StorePath> = roots.iter().collect();
    // A stale root, or one held with another NarHash, may have been rebuilt with other
    // contents: the client sends it in full.
    let mut unknown = q.lacking(&named).map_err(NotStored::queue)?;
    if !nar_hashes.is_empty() {
        let held = q.queued_nar_hashes(&named).map_err(NotStored::queue)?;
        unknown.extend(roots.iter().zip(nar_hashes).filter(|(r, h)| held.get(*r).and_then(|i| i.as_ref()).is_some_and(|i| i != *h)).map(|(r, _)| r.clone()));
    }
    if !unknown.is_empty() {
        return Ok(Err(unknown));
    }
    let failed = q.failed_below(&named, 100).map_err(NotStored::queue)?;
    if !failed.is_empty() {
        return Ok(Err(failed));
    }
    let new = q.enqueue([], drv).map_err(NotStored::queue)?;
    q.note_roots(roots).map_err(NotStored::queue)?;
    q.clear_dropped(roots.iter().chain(drv)).map_err(NotStored::queue)?;
    Ok(Ok(new))
}

/// [`enqueue`]s the closure `paths`, then marks `repair` (which must be among them) for
/// upload whatever the cache says ([`Queue::repair`]); returns how many were marked.
pub(super) fn repair(q: &mut Queue, keys: &[PublicKey], checked: Checked, repair: &[StorePath]) -> Result<usize, NotStored> {
    if let Some(p) = repair.iter().find(|r| !checked.0.iter().any(|p| &p.path == *r)) {
        return Err(NotStored::Refused(format!("{p} is to be repaired but its path info is not in the request")));
    }
    enqueue(q, keys, checked, Whole::Closure)?;
    q.repair(repair).map_err(NotStored::queue)
}

/// Stores a non-enqueue request that changes the queue (`report`, `recheck`).
pub(super) fn record(q: &mut Queue, req: Request) -> Result<usize, NotStored> {
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

impl Admission {
    /// Stores the requests in the spool dir; moves aside those refused, leaves those that could
    /// not be stored now.
    pub(super) async fn ingest_spool(&self) {
        let _ingesting = self.spool.lock().await;
        let dir = &self.spool_dir;
        match spool::tidy(dir) {
            Ok(done) => done.iter().for_each(|d| tracing::warn!("spool: {d}")),
            Err(e) => tracing::warn!("tidying the spool {}: {e}", dir.display()),
        }
        let files = match spool::list(dir) {
            Ok(f) => f,
            Err(e) => return tracing::warn!("reading the spool {}: {e}", dir.display()),
        };
        for file in files {
            // Whose build this is, should it be refused: its derivation, else the paths nothing
            // else in the request's last part references.
            let mut build = None;
            let result = match spool::open(&file) {
                Ok(f) => self.ingest_file(std::io::BufReader::new(f), &mut build).await,
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => Err(NotStored::Refused(format!("reading it: {e}"))),
                Err(e) => Err(NotStored::Transient(format!("reading it: {e}"))),
            };
            super::release_memory();
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
                        match self.queue.run(move |q| q.record_dropped(&roots, drv.as_ref(), &reason)).await {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => tracing::error!("recording a refused spooled request: {e}"),
                            Err(e) => tracing::error!("recording a refused spooled request: {e}"),
                        }
                    }
                }
            }
        }
    }

    /// Admits the requests of one spool file in order: one, or the parts of a large closure
    /// (see `hook::PART_PATHS`); a part admitted stays queued whatever becomes of the rest,
    /// and admitting it again costs a lookup. `build` is set to whose build it is (see
    /// [`Admission::ingest_spool`]), from the last request, which is read even after a
    /// refusal. Returns how many paths were new.
    async fn ingest_file(&self, mut f: impl std::io::BufRead, build: &mut Option<(Vec<StorePath>, Option<StorePath>)>) -> Result<usize, NotStored> {
        let mut result = Ok(0);
        let mut read_any = false;
        // Bounded by the file: each turn reads one frame of it.
        loop {
            match f.fill_buf() {
                Ok([]) if read_any => return result,
                Ok(_) => {}
                Err(e) => return Err(NotStored::Transient(format!("reading it: {e}"))),
            }
            read_any = true;
            let parsed = protocol::read::<Request>(&mut f);
            if let Ok(Request::Enqueue { paths, drv, .. }) = &parsed {
                *build = Some((PathInfo::tops(paths), drv.clone()));
            }
            if result.is_err() {
                // Refused already: read on only for whose build it was.
                if parsed.is_err() {
                    return result;
                }
                continue;
            }
            let admitted = match parsed {
                Ok(Request::Enqueue { paths, drv, realisations, part }) => {
                    let keys = self.trusted_keys.clone();
                    let whole = if part { Whole::Part } else { Whole::Closure };
                    let new = match self.checked(paths, drv, realisations).await {
                        Ok(req) => self.queue.run(move |q| enqueue(q, &keys, req, whole)).await.unwrap_or_else(|e| Err(NotStored::Transient(e))),
                        Err(e) => Err(e),
                    };
                    self.wake.notify_one();
                    new
                }
                Ok(req @ Request::Report { .. }) => self.queue.run(move |q| record(q, req)).await.unwrap_or_else(|e| Err(NotStored::Transient(e))),
                Ok(other) => Err(NotStored::Refused(format!("not an enqueue request: {other:?}"))),
                // Not a request (a FIFO, too large) or cut short: reading it again would not help.
                Err(FrameError::Io(e)) if matches!(e.kind(), std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof) => {
                    Err(NotStored::Refused(format!("reading it: {e}")))
                }
                Err(FrameError::Io(e)) => Err(NotStored::Transient(format!("reading it: {e}"))),
                Err(e) => Err(NotStored::Refused(e.to_string())),
            };
            match admitted {
                Ok(new) => result = result.map(|n| n + new),
                // Left in place: the next ingestion tries again, from the first part.
                Err(NotStored::Transient(why)) => return Err(NotStored::Transient(why)),
                Err(refused) => result = Err(refused),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::{nixbase32, Sha256, SecretKey};

    fn path(name: &str) -> StorePath {
        let hash = nixbase32::encode(&Sha256::digest(name.as_bytes()).0[..20]);
        StorePath::parse(&format!("/nix/store/{hash}-{name}")).unwrap()
    }

    fn info(name: &str, refs: &[&StorePath], key: &SecretKey) -> PathInfo {
        let p = path(name);
        let mut i = PathInfo {
            references: refs.iter().map(|r| (*r).clone()).chain([p.clone()]).collect(),
            path: p,
            nar_hash: Sha256::digest(name.as_bytes()),
            nar_size: 100,
            deriver: None,
            sigs: Default::default(),
            ca: None,
        };
        i.sign(key);
        i
    }

    fn none() -> (HashSet<StorePath>, HashMap<StorePath, Option<PathInfo>>) {
        (HashSet::new(), HashMap::new())
    }

    #[test]
    fn realisations_need_a_trusted_signature_and_their_out_path_on_its_way() {
        let key = SecretKey::generate("k-1").unwrap();
        let keys = [key.public()];
        let out = info("ca-out", &[], &key);
        let mut r = Realisation {
            id: format!("sha256:{}!out", "ab".repeat(32)),
            out_path: out.path.clone(),
            signatures: Default::default(),
            dependent_realisations: Default::default(),
            build_trace: None,
        };
        assert!(check_realisations(&keys, &[r.clone()]).unwrap_err().contains("no signature by a trusted key"));
        r.sign(&SecretKey::generate("k-1").unwrap());
        assert!(check_realisations(&keys, &[r.clone()]).unwrap_err().contains("does not verify"));
        r.signatures.clear();
        r.sign(&key);
        check_realisations(&keys, &[r.clone()]).unwrap();
        assert!(check_realisations(&keys, &[r.clone(), r.clone()]).unwrap_err().contains("twice"));
        // Its build trace (Nix 2.35's key) needs a trusted signature over its own fingerprint.
        let mut traced = r.clone();
        let drv_path = StorePath::parse(&format!("/nix/store/{}-ca-out.drv", "a".repeat(32))).unwrap();
        traced.build_trace = Some(crate::nix::realisation::Traced { drv_path, signatures: Default::default() });
        assert!(check_realisations(&keys, &[traced.clone()]).unwrap_err().contains("build trace"));
        traced.build_trace.as_mut().unwrap().signatures = r.signatures.clone();
        assert!(check_realisations(&keys, &[traced.clone()]).unwrap_err().contains("does not verify"));
        traced.sign(&key);
        traced.build_trace.as_mut().unwrap().signatures.retain(|s| !r.signatures.contains(s));
        check_realisations(&keys, &[traced]).unwrap();

        let dir = std::env::temp_dir().join(format!("narq-admit-real-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut q = Queue::open(&dir.join("queue.db")).unwrap();
        let Err(NotStored::Refused(why)) = enqueue(&mut q, &keys, (vec![], None, vec![r.clone()]), Whole::Closure) else { panic!("admitted") };
        assert!(why.contains("neither in the request nor queued"), "{why}");
        assert_eq!(enqueue(&mut q, &keys, (vec![out.clone()], None, vec![r.clone()]), Whole::Closure).unwrap(), 1);
        // The realisation waits for its out path's narinfo.
        let ready: Vec<String> = q.ready(10, &HashSet::new()).unwrap().into_iter().map(|i| i.key).collect();
        assert_eq!(ready, [out.path.to_string()]);
        q.done(&out.path.to_string(), crate::outcome::Outcome::Present, None).unwrap();
        let ready: Vec<String> = q.ready(10, &HashSet::new()).unwrap().into_iter().map(|i| i.key).collect();
        assert_eq!(ready, [format!("realisation:{}", r.id)]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn validate_wants_a_closure_of_the_request_and_the_queue() {
        let key = SecretKey::generate("k-1").unwrap();
        let keys = [key.public()];
        let lib = info("lib", &[], &key);
        let prog = info("prog", &[&lib.path], &key);
        let (queued, pending) = none();
        assert!(validate(&keys, &[lib.clone(), prog.clone()], &queued, &pending, &[]).is_ok());
        let why = validate(&keys, &[prog.clone()], &queued, &pending, &[]).unwrap_err();
        assert!(why.starts_with("incomplete closure") && why.contains(&lib.path.to_string()), "{why}");
        // A reference the queue holds completes it; a path the queue holds is not checked again.
        let queued: HashSet<StorePath> = [lib.path.clone()].into();
        assert!(validate(&keys, &[prog.clone()], &queued, &pending, &[]).is_ok());
    }

    #[test]
    fn validate_refuses_other_info_for_a_pending_path_unless_it_was_unsigned() {
        let key = SecretKey::generate("k-1").unwrap();
        let keys = [key.public()];
        let dep = info("dep", &[], &key);
        let p = info("p", &[], &key);
        let queued: HashSet<StorePath> = [p.path.clone(), dep.path.clone()].into();
        let pend = |old: &PathInfo| HashMap::from([(p.path.clone(), Some(old.clone()))]);
        // The same info again is fine.
        assert!(validate(&keys, &[p.clone()], &queued, &pend(&p), &[]).is_ok());
        let mut other_refs = PathInfo { references: [dep.path.clone()].into(), sigs: Default::default(), ..p.clone() };
        other_refs.sign(&key);
        let why = validate(&keys, &[other_refs.clone()], &queued, &pend(&p), &[]).unwrap_err();
        assert!(why.contains("other references"), "{why}");
        let mut other_hash = PathInfo { nar_size: 101, sigs: Default::default(), ..p.clone() };
        other_hash.sign(&key);
        let why = validate(&keys, &[other_hash], &queued, &pend(&p), &[]).unwrap_err();
        assert!(why.contains("another NarHash or NarSize"), "{why}");
        // What an older narq queued unchecked (no signature by our keys) is replaced.
        let unsigned = PathInfo { sigs: Default::default(), ..p.clone() };
        assert!(validate(&keys, &[other_refs], &queued, &pend(&unsigned), &[]).is_ok());
    }

    #[test]
    fn validate_refuses_a_cycle_closed_through_pending_paths() {
        let key = SecretKey::generate("k-1").unwrap();
        let keys = [key.public()];
        let q = path("q");
        let p = info("p", &[&q], &key);
        let queued: HashSet<StorePath> = [q.clone()].into();
        let pending = HashMap::new();
        let why = validate(&keys, &[p.clone()], &queued, &pending, &[(q.clone(), p.path.clone())]).unwrap_err();
        assert!(why.starts_with("reference cycle") && why.contains(&q.to_string()), "{why}");
        // Self-references and edges that do not lead back are fine.
        assert!(validate(&keys, &[p.clone()], &queued, &pending, &[(q.clone(), q.clone())]).is_ok());
        assert!(validate(&keys, &[p], &queued, &pending, &[(q, path("r"))]).is_ok());
    }

    #[test]
    fn check_refuses_duplicates_empty_nars_unsigned_paths_and_cycles() {
        let key = SecretKey::generate("k-1").unwrap();
        let other = SecretKey::generate("k-2").unwrap();
        let keys = [key.public()];
        let a = info("a", &[], &key);
        assert!(check(&keys, &[a.clone()], None).is_ok());
        assert_eq!(check(&keys, &[a.clone(), a.clone()], None).unwrap_err(), "a path is listed twice");
        let empty = PathInfo { nar_size: 0, ..a.clone() };
        assert!(check(&keys, &[empty], None).unwrap_err().contains("NarSize is 0"));
        assert!(check(&keys, &[a.clone()], Some(&path("x"))).unwrap_err().contains("is not a derivation"));
        assert!(check(&keys, &[info("b", &[], &other)], None).is_err());
        let (x, y) = (path("x"), path("y"));
        let xi = PathInfo { references: [y.clone()].into(), ..info("x", &[], &key) };
        let yi = PathInfo { references: [x.clone()].into(), ..info("y", &[], &key) };
        let mut cyc = [xi, yi];
        cyc.iter_mut().for_each(|p| {
            p.sigs.clear();
            p.sign(&key)
        });
        assert!(check(&keys, &cyc, None).unwrap_err().starts_with("reference cycle"));
    }
}
