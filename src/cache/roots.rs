//! narq's own objects in the bucket, under `narq/` (Nix ignores keys it does not know), and
//! the protocol that keeps uploads safe while `narq gc` or `narq rm` delete.
//!
//! # Objects
//! - `narq/roots/<hashpart>`: a request's top-level path (a build's output, a `narq push`
//!   argument); the content is the store path, the object's time when it was last pushed.
//!   Daemons write each at most once a day (`queue::Queue::note_roots`).
//! - `narq/pins/<name>`: a named root, kept whatever its age; the content is the store path.
//! - `narq/gc/run-<id>`: a `gc` or `rm` that is deleting, rewritten as a heartbeat.
//! - `narq/gc/generation`: rewritten when a `gc` or `rm` has deleted something.
//!
//! # Why uploads stay safe (design.md guarantees 9 and 10)
//! A daemon skips what it remembers as uploaded and relies on it when it puts a narinfo that
//! references it. A collector that deleted such a path in between would leave a narinfo
//! without its reference. So:
//! 1. A collector scans, then announces itself (`run-<id>`), waits [`LEASE`], and lists the
//!    narinfos again: any narinfo put meanwhile is kept, with its closure. Only then does it
//!    delete, and it rewrites `generation` when done (then removes `run-<id>`).
//! 2. A daemon lists `narq/gc/` (one request) at most every [`WATCH_TTL`], before it puts a
//!    narinfo. When what it sees changed (a run began or ended, the generation moved), what
//!    it remembers is no longer trusted ([`GcWatch`] calls back: the queue's `done` paths become
//!    `stale`) and its bucket listing is forgotten; an upload that began before the change
//!    looks for its references (and its NAR) in the cache again before it puts its narinfo.
//! 3. A narinfo put must end before `quiet + LEASE - MARGIN`, `quiet` being the daemon's last
//!    look that saw no collector running. Any collector announced after that look lists the
//!    narinfos again after `announce + LEASE > quiet + LEASE`, so it sees the narinfo and keeps
//!    what it references. While a collector runs past that point, narinfo puts wait until it
//!    ends; then the references are looked for again (2.), and what is gone is uploaded again.
//! 4. A collector that dies stops its heartbeat: after [`DEAD_AFTER`] of silence daemons stop
//!    waiting for it; a collector whose own heartbeat is older than [`DEAD_AFTER`] minus a
//!    margin stops before deleting more (it may have been paused and taken for dead).
//!
//! Two collectors at once are harmless: each deletes referrers before what they reference,
//! deleting is idempotent, and daemons wait for every running one. A pin is written, then
//! `narq pin` waits for running collectors to end and checks that its path is still there.
//!
//! Left open: a narinfo PUT that the client gave up on (after its deadline) but the server
//! completes later than `LEASE - WATCH_TTL - MARGIN` after the announce could land after the
//! final listing; the next upload that relies on it finds its references again (2.).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::nix::StorePath;
use crate::storage::{Body, Target, TargetError};

pub const ROOTS: &str = "narq/roots/";
pub const PINS: &str = "narq/pins/";
pub const RUNS: &str = "narq/gc/";
pub const GENERATION: &str = "narq/gc/generation";
const RUN_PREFIX: &str = "narq/gc/run-";

/// How long a daemon trusts its last look at `narq/gc/`.
pub const WATCH_TTL: Duration = Duration::from_secs(3);
/// How long a collector waits between announcing itself and its final listing.
pub const LEASE: Duration = Duration::from_secs(12);
/// Time kept in hand for a narinfo put to end before a collector's final listing.
pub const MARGIN: Duration = Duration::from_secs(3);
/// How long a narinfo put waits for a collection to end (an upload gives its worker back
/// then, and the item is retried; `narq sign` reports the path).
pub const GC_WAIT: Duration = Duration::from_secs(60);
/// A collector rewrites its run object this often.
pub const HEARTBEAT: Duration = Duration::from_secs(30);
/// A run object unchanged this long belongs to a collector that died.
pub const DEAD_AFTER: Duration = Duration::from_secs(120);

pub const TEXT: &str = "text/plain; charset=utf-8";

pub fn root_key(p: &StorePath) -> String {
    format!("{ROOTS}{}", p.hash_part())
}

/// The key of pin `name`; names are what a file name can safely be.
pub fn pin_key(name: &str) -> Result<String, String> {
    let ok = !name.is_empty() && name.len() <= 100 && !name.starts_with('.') && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-+@".contains(&b));
    match ok {
        true => Ok(format!("{PINS}{name}")),
        false => Err(format!("pin name {name:?}: use 1 to 100 of A-Z a-z 0-9 . _ - + @, not starting with a dot")),
    }
}

/// The store path an object of narq's (a root, a pin) holds.
pub fn parse_path(body: &[u8]) -> Option<StorePath> {
    StorePath::parse(std::str::from_utf8(body).ok()?.trim()).ok()
}

/// Records `roots` in the cache; returns those written (the rest are tried again later).
pub async fn record_roots(target: &dyn Target, roots: &[StorePath]) -> Result<Vec<StorePath>, TargetError> {
    let mut done = Vec::new();
    for r in roots {
        target.put(&root_key(r), Body::Bytes(format!("{r}\n").into_bytes()), TEXT).await?;
        done.push(r.clone());
    }
    Ok(done)
}

/// The pins: name → store path (a pin that does not hold one is left out, with a warning).
pub async fn pins(target: &dyn Target) -> Result<BTreeMap<String, StorePath>, TargetError> {
    let mut keys = Vec::new();
    target.list(PINS, &mut |o| keys.push(o.key)).await?;
    let mut out = BTreeMap::new();
    for k in keys {
        let name = k.trim_start_matches(PINS).to_string();
        match target.get(&k).await?.as_deref().map(parse_path) {
            Some(Some(p)) => {
                out.insert(name, p);
            }
            Some(None) => tracing::warn!("{k} holds no store path; ignored"),
            None => {}
        }
    }
    Ok(out)
}

/// One look at `narq/gc/`: the run objects by key, with what changes at each heartbeat, and
/// the generation object's version.
async fn look(target: &dyn Target) -> Result<(HashMap<String, (Option<SystemTime>, u64)>, Option<(Option<SystemTime>, u64)>), TargetError> {
    let mut runs = HashMap::new();
    let mut generation = None;
    target
        .list(RUNS, &mut |o| {
            if o.key == GENERATION {
                generation = Some((o.last_modified, o.size));
            } else if o.key.starts_with(RUN_PREFIX) {
                runs.insert(o.key, (o.last_modified, o.size));
            }
        })
        .await?;
    Ok((runs, generation))
}

/// Whether a run object last written at `modified` is too old to be alive, whatever the
/// clocks: an hour without a heartbeat (every [`HEARTBEAT`]) is far beyond any skew.
fn long_dead(modified: Option<SystemTime>) -> bool {
    modified.and_then(|m| m.elapsed().ok()).is_some_and(|a| a > Duration::from_secs(3600))
}

/// What [`GcWatch::gate`] says about putting a narinfo now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    /// Put it before `until`; `epoch` is the watch's epoch it was decided in.
    Open { epoch: u64, until: Instant },
    /// A collector is deleting: wait.
    Held(String),
}

type OnChange = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// A daemon's view of the collectors (see the module doc, 2. and 3.).
pub struct GcWatch {
    target: Arc<dyn Target>,
    /// Told the new marker when what was seen changed; an error keeps narinfos waiting.
    on_change: OnChange,
    /// Bumped at each change, once `on_change` succeeded.
    epoch: AtomicU64,
    state: tokio::sync::Mutex<WatchState>,
}

#[derive(Default)]
struct WatchState {
    /// When `narq/gc/` was last listed.
    read_at: Option<Instant>,
    /// Run objects seen: their version and since when it is unchanged (local clock).
    runs: HashMap<String, ((Option<SystemTime>, u64), Instant)>,
    /// The last marker passed to `on_change` (live runs and the generation).
    marker: Option<String>,
    /// The last look that saw no collector running.
    quiet_at: Option<Instant>,
    /// A change `on_change` could not take yet.
    unsettled: bool,
}

impl GcWatch {
    pub fn new(target: Arc<dyn Target>, on_change: OnChange) -> GcWatch {
        GcWatch { target, on_change, epoch: AtomicU64::new(0), state: Default::default() }
    }

    /// Changes with every change seen; an upload compares it with the one it began in.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Looks at `narq/gc/` if the last look is older than [`WATCH_TTL`]; says whether a
    /// narinfo may be put now, and by when.
    pub async fn gate(&self) -> Result<Gate, TargetError> {
        let mut s = self.state.lock().await;
        let now = Instant::now();
        if s.unsettled || s.read_at.is_none_or(|t| now.duration_since(t) >= WATCH_TTL) {
            let (seen, generation) = look(&*self.target).await?;
            let now = Instant::now();
            let runs: HashMap<_, _> = seen
                .into_iter()
                .map(|(k, v)| {
                    let since = s.runs.get(&k).filter(|(old, _)| *old == v).map_or(now, |(_, since)| *since);
                    (k, (v, since))
                })
                .collect();
            let mut live: Vec<&String> =
                runs.iter().filter(|(_, ((m, _), since))| now.duration_since(*since) < DEAD_AFTER && !long_dead(*m)).map(|(k, _)| k).collect();
            live.sort();
            let marker = format!("{generation:?} {live:?}");
            let quiet = live.is_empty();
            if s.marker.as_deref() != Some(&marker) || s.unsettled {
                self.target.forget_listing();
                match (self.on_change)(&marker) {
                    Ok(()) => {
                        s.unsettled = false;
                        s.marker = Some(marker);
                        self.epoch.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => {
                        tracing::warn!("a collection of the cache was seen, and the queue could not take it yet: {e}");
                        s.unsettled = true;
                    }
                }
            }
            if quiet {
                s.quiet_at = Some(now);
            }
            s.runs = runs;
            s.read_at = Some(now);
        }
        if s.unsettled {
            return Ok(Gate::Held("the queue has not taken the last collection yet".into()));
        }
        let until = s.quiet_at.map(|q| q + LEASE - MARGIN).filter(|u| *u > Instant::now() + Duration::from_millis(500));
        Ok(match until {
            Some(until) => Gate::Open { epoch: self.epoch(), until },
            None => Gate::Held("a gc or rm is deleting in the cache; narinfos wait until it ends".into()),
        })
    }

    /// [`GcWatch::gate`] until it opens, for at most `limit`.
    pub async fn wait_open(&self, limit: Duration) -> Result<Gate, TargetError> {
        let start = Instant::now();
        loop {
            let g = self.gate().await?;
            if matches!(g, Gate::Open { .. }) || start.elapsed() >= limit {
                return Ok(g);
            }
            tokio::time::sleep(WATCH_TTL).await;
        }
    }
}

/// A collector's announcement (module doc, 1. and 4.): written by [`Run::begin`], rewritten
/// by [`Run::heartbeat`], removed by [`Run::end`].
pub struct Run<'a> {
    target: &'a dyn Target,
    key: String,
    beats: u64,
    /// When the run object was last written.
    written: Instant,
    /// When it was first written: the final listing waits [`LEASE`] from here.
    pub announced: Instant,
}

impl<'a> Run<'a> {
    pub async fn begin(target: &'a dyn Target, what: &str) -> Result<Run<'a>, TargetError> {
        let id = format!("{}-{}-{}", hostname(), std::process::id(), SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis()));
        let mut run = Run { target, key: format!("{RUN_PREFIX}{id}"), beats: 0, written: Instant::now(), announced: Instant::now() };
        run.write(what).await?;
        run.announced = run.written;
        Ok(run)
    }

    async fn write(&mut self, what: &str) -> Result<(), TargetError> {
        let start = Instant::now();
        let body = format!("{what}\nheartbeat {}\n", self.beats);
        self.target.put(&self.key, Body::Bytes(body.into_bytes()), TEXT).await?;
        self.beats += 1;
        self.written = start;
        Ok(())
    }

    /// Waits until [`LEASE`] has passed since the announcement.
    pub async fn wait_lease(&mut self) -> Result<(), TargetError> {
        let left = LEASE.saturating_sub(self.announced.elapsed());
        tokio::time::sleep(left).await;
        self.heartbeat().await
    }

    /// Rewrites the run object when due; refuses to go on if it was not rewritten in time
    /// (the process was paused, and daemons may have taken it for dead).
    pub async fn heartbeat(&mut self) -> Result<(), TargetError> {
        if self.written.elapsed() > DEAD_AFTER - Duration::from_secs(30) {
            return Err(TargetError::transient(format!(
                "this collection went {} s without a heartbeat (paused?); stopped before deleting more, run it again",
                self.written.elapsed().as_secs()
            )));
        }
        if self.written.elapsed() >= HEARTBEAT {
            self.write("heartbeat").await?;
        }
        Ok(())
    }

    /// Says that deleting is over: the generation moves, then the run object goes.
    pub async fn end(self, deleted: bool) -> Result<(), TargetError> {
        if deleted {
            let body = format!("{} {}\n", self.key.trim_start_matches(RUN_PREFIX), SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
            self.target.put(GENERATION, Body::Bytes(body.into_bytes()), TEXT).await?;
        }
        self.target.delete(std::slice::from_ref(&self.key)).await
    }
}

/// Waits until no collector is running (as a daemon judges it), for at most `limit`.
pub async fn wait_quiet(target: &dyn Target, limit: Duration) -> Result<bool, TargetError> {
    let start = Instant::now();
    let mut first: HashMap<String, ((Option<SystemTime>, u64), Instant)> = HashMap::new();
    loop {
        let (runs, _) = look(target).await?;
        let now = Instant::now();
        first.retain(|k, _| runs.contains_key(k));
        let mut live = 0;
        for (k, v) in runs {
            let e = first.entry(k).or_insert((v, now));
            if e.0 != v {
                *e = (v, now);
            }
            if now.duration_since(e.1) < DEAD_AFTER && !long_dead(v.0) {
                live += 1;
            }
        }
        if live == 0 {
            return Ok(true);
        }
        if start.elapsed() >= limit {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it or fails.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len() - 1) } == 0;
    let n = buf.iter().position(|&b| b == 0).unwrap_or(0);
    let h: String = String::from_utf8_lossy(&buf[..n]).chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.').collect();
    if ok && !h.is_empty() { h } else { "host".into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_are_checked() {
        assert_eq!(pin_key("release-1.2").unwrap(), "narq/pins/release-1.2");
        for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(101)] {
            assert!(pin_key(bad).is_err(), "{bad:?}");
        }
    }
}
