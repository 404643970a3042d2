//! The collection protocol: how `narq gc` and `narq rm` (collectors) delete from a cache that
//! daemons on any number of machines keep uploading to, without a server, and without a
//! closure ever staying broken once a writer reported it uploaded — whatever the timing: a
//! process stopped for minutes, an answer arriving late, a collector killed half-way, clocks
//! that disagree. The argument in full, step by step, is `docs/gc-safety.md`.
//!
//! # Objects (under `narq/`, which Nix ignores)
//! - `narq/gc/run-<id>`: a collector that may delete (`narq-protocol 2`, what it is, its
//!   heartbeat count), rewritten every [`Timing::heartbeat`].
//! - `narq/gc/generation`: rewritten when a collector announces itself and again when it
//!   ends. Every value is new, so a writer that sees the one it saw before knows that no
//!   collector announced itself in between.
//! - `narq/locks/run-<id>` (`file://` only): locked by its collector for its whole life, so
//!   that a collector stopped anywhere is alive to the writers and one killed is dead at once.
//!
//! # Collector ([`Run`])
//! Lock (where the store has locks), write the run object, move the generation; the
//! announcement dates from when those writes *returned*. Wait [`Timing::lease`], list the
//! whole cache again (what was written meanwhile stays, with its closure), delete (referrers
//! first), checking before every delete request that its last heartbeat is at most
//! `dead_after / 2` old; move the generation, remove the run object, release the lock. The
//! ages `keep-days` and `grace` compare the store's times with the store's time, read from
//! the run object the collector wrote ([`Run::server_now`]), never with the local clock.
//!
//! # Writer ([`GcWatch`], used by the daemon, `narq sign`, repairs and pins)
//! A look lists `narq/gc/` and is dated from when it was *sent*. A run object is live unless
//! its lock says its process is gone, or (no lock) the writer has seen it unchanged for
//! [`Timing::dead_after`] by its own clock. What a writer relies on (the references of a
//! narinfo it puts, a narinfo it found present) is known in an *epoch*: the epoch moves
//! whenever a look sees something new (the generation, the live runs), and what the daemon
//! remembers as uploaded stops being trusted then.
//! 1. The gate opens on a look that saw no live run: a write that *returns* before
//!    `sent + lease - margin` landed before the final listing of any collector announced
//!    after the look, so that collector keeps it and its closure.
//! 2. A write that returns later is confirmed by a look sent after it returned: the same
//!    epoch and no live run means no collector announced itself in between; anything else,
//!    and once no collector runs, the references and the NAR are looked for again (after
//!    that look) and whatever is gone is uploaded again before the path counts as uploaded.
//!
//! # The one bound left
//! S3 has no locks. A collector stopped between its last heartbeat check and a delete
//! request reaching the store, or whose delete request the network holds, for longer than
//! `dead_after / 2` (60 s), may delete after writers took it for dead. The collector checks
//! before every request; `docs/gc-safety.md` says what that costs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use crate::storage::{Body, Fence, Object, Target, TargetError, LOCKS_PREFIX};

pub const RUNS: &str = "narq/gc/";
pub const GENERATION: &str = "narq/gc/generation";
pub const RUN_PREFIX: &str = "narq/gc/run-";
/// The version of this protocol, in run objects and roots (see `docs/gc-safety.md`, mixed
/// versions): 1 was narq up to 64d1f2c.
pub const PROTOCOL: u32 = 2;

pub const TEXT: &str = "text/plain; charset=utf-8";

/// The protocol's durations: one set, with fixed ratios between them. Tests shrink them
/// together with `NARQ_TEST_TIME_SCALE` (debug builds only): every narq process of a fleet
/// must use the same ones.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long a writer trusts its last look at `narq/gc/`.
    pub watch_ttl: Duration,
    /// How long a collector waits between announcing itself and its final listing.
    pub lease: Duration,
    /// Time kept in hand for a write to land before a collector's final listing.
    pub margin: Duration,
    /// How long a writer waits for running collections to end before it gives its worker back.
    pub gc_wait: Duration,
    /// A collector rewrites its run object this often.
    pub heartbeat: Duration,
    /// A run object seen unchanged this long (and with no lock to tell) is a dead collector's.
    pub dead_after: Duration,
    /// How long `narq pin` waits for collections to end before it checks its path.
    pub pin_wait: Duration,
}

impl Timing {
    pub const DEFAULT: Timing = Timing {
        watch_ttl: Duration::from_secs(3),
        lease: Duration::from_secs(12),
        margin: Duration::from_secs(3),
        gc_wait: Duration::from_secs(60),
        heartbeat: Duration::from_secs(30),
        dead_after: Duration::from_secs(120),
        pin_wait: Duration::from_secs(600),
    };

    /// The durations this process uses.
    pub fn get() -> &'static Timing {
        static T: OnceLock<Timing> = OnceLock::new();
        T.get_or_init(|| {
            #[cfg(debug_assertions)]
            if let Some(scale) = std::env::var("NARQ_TEST_TIME_SCALE").ok().and_then(|s| s.parse::<f64>().ok()).filter(|s| *s > 0.0 && *s <= 1.0) {
                return Timing::DEFAULT.scaled(scale);
            }
            Timing::DEFAULT
        })
    }

    #[cfg(any(debug_assertions, test))]
    fn scaled(&self, f: f64) -> Timing {
        let s = |d: Duration| d.mul_f64(f);
        Timing {
            watch_ttl: s(self.watch_ttl),
            lease: s(self.lease),
            margin: s(self.margin),
            gc_wait: s(self.gc_wait),
            heartbeat: s(self.heartbeat),
            dead_after: s(self.dead_after),
            pin_wait: s(self.pin_wait),
        }
    }

    /// How old a collector's last heartbeat may be when it sends a delete request.
    pub fn beat_limit(&self) -> Duration {
        self.dead_after / 2
    }
}

/// What identifies one version of an object in a listing.
type Version = (Option<String>, Option<SystemTime>, u64);

fn version(o: &Object) -> Version {
    (o.etag.clone(), o.last_modified, o.size)
}

/// The lock of run object `key` (`narq/gc/run-<id>` → `narq/locks/run-<id>`).
fn lock_key(run_key: &str) -> String {
    format!("{LOCKS_PREFIX}{}", run_key.trim_start_matches(RUNS))
}

/// One listing of `narq/gc/`: the run objects with their versions, the generation's version.
async fn list_runs(target: &dyn Target) -> Result<(HashMap<String, (Version, Option<SystemTime>)>, Option<Version>), TargetError> {
    let mut runs = HashMap::new();
    let mut generation = None;
    target
        .list(RUNS, &mut |o| {
            if o.key == GENERATION {
                generation = Some(version(&o));
            } else if o.key.starts_with(RUN_PREFIX) {
                runs.insert(o.key.clone(), (version(&o), o.last_modified));
            }
        })
        .await?;
    Ok((runs, generation))
}

/// A look at `narq/gc/`, as the writer judged it.
#[derive(Debug, Clone)]
pub struct Look {
    /// When its listing was sent: what it saw held at some moment after this.
    pub sent: Instant,
    /// The writer's epoch after it.
    pub epoch: u64,
    /// The marker of that epoch (what the queue records, [`crate::queue::Queue::note_generation`]).
    pub marker: Arc<str>,
    /// It saw no live collector.
    pub quiet: bool,
}

impl Look {
    /// Until when a write begun now lands before the final listing of any collector announced
    /// after this look (step 1 of the module doc); `None` if the look saw a collector.
    pub fn until(&self) -> Option<Instant> {
        let t = Timing::get();
        self.quiet.then(|| self.sent + t.lease - t.margin)
    }
}

/// What [`GcWatch::gate`] says about writing now.
#[derive(Debug, Clone)]
pub enum Gate {
    /// Write; it is safe without another look if it returns before `until`.
    Open(Look),
    /// A collector is deleting: wait.
    Held(String),
}

type OnChange = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// A writer's view of the collectors (module doc, "Writer").
pub struct GcWatch {
    target: Arc<dyn Target>,
    /// Told the new marker when what was seen changed; an error keeps writes waiting.
    on_change: OnChange,
    /// Bumped at each change, once `on_change` succeeded.
    epoch: AtomicU64,
    state: tokio::sync::Mutex<WatchState>,
}

#[derive(Default)]
struct WatchState {
    /// The last look.
    last: Option<Look>,
    /// Run objects seen: their version and since when it is unchanged (local clock).
    runs: HashMap<String, (Version, Instant)>,
    /// The last marker passed to `on_change` (the generation and the live runs).
    marker: Option<Arc<str>>,
    /// A change `on_change` could not take yet.
    unsettled: bool,
    /// Run objects of an older narq already warned about.
    warned: std::collections::HashSet<String>,
}

impl GcWatch {
    pub fn new(target: Arc<dyn Target>, on_change: OnChange) -> GcWatch {
        GcWatch { target, on_change, epoch: AtomicU64::new(0), state: Default::default() }
    }

    /// Changes with every change seen; an upload compares it with the one it began in.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// The last look if it was sent after `after` (and is within [`Timing::watch_ttl`] when
    /// `fresh`), else a new one. Looks are made one at a time: callers waiting meanwhile
    /// share the one that was sent after their `after`.
    pub async fn look(&self, after: Option<Instant>) -> Result<Look, TargetError> {
        let mut s = self.state.lock().await;
        if let Some(last) = &s.last {
            let recent = last.sent.elapsed() < Timing::get().watch_ttl;
            if !s.unsettled && after.map_or(recent, |a| last.sent >= a) {
                return Ok(last.clone());
            }
        }
        let sent = Instant::now();
        let (seen, generation) = list_runs(&*self.target).await?;
        let now = Instant::now();
        let mut live = Vec::new();
        let mut runs = HashMap::new();
        for (key, (v, _)) in seen {
            let since = s.runs.get(&key).filter(|(old, _)| *old == v).map_or(now, |(_, since)| *since);
            let alive = match self.target.fenced(&lock_key(&key)).await? {
                Some(alive) => alive,
                None => now.duration_since(since) < Timing::get().dead_after,
            };
            if alive {
                live.push(key.clone());
            }
            runs.insert(key, (v, since));
        }
        live.sort();
        self.warn_old_collectors(&mut s, &live).await;
        let marker: Arc<str> = format!("{generation:?} {live:?}").into();
        if s.marker.as_ref() != Some(&marker) || s.unsettled {
            self.target.forget_listing();
            match (self.on_change)(&marker) {
                Ok(()) => {
                    s.unsettled = false;
                    s.marker = Some(marker.clone());
                    self.epoch.fetch_add(1, Ordering::SeqCst);
                }
                Err(e) => {
                    tracing::warn!("a collection of the cache was seen, and the queue could not take it yet: {e}");
                    s.unsettled = true;
                }
            }
        }
        s.runs = runs;
        let look = Look { sent, epoch: self.epoch(), marker, quiet: live.is_empty() };
        s.last = Some(look.clone());
        Ok(look)
    }

    /// A collector of an older narq (its run object names no protocol) gives writers less
    /// (`docs/gc-safety.md`, mixed versions): said once per run.
    async fn warn_old_collectors(&self, s: &mut WatchState, live: &[String]) {
        let new: Vec<&String> = live.iter().filter(|k| !s.warned.contains(*k)).collect();
        for key in new {
            if let Ok(Some(body)) = self.target.get(key).await {
                if protocol_of(&body) < PROTOCOL {
                    tracing::warn!(run = %key, "{key} is a collection by an older narq (protocol 1): upgrade narq where `narq gc` runs");
                }
            }
            s.warned.insert(key.clone());
        }
    }

    /// Looks at `narq/gc/` unless the last look is recent; says whether to write now.
    pub async fn gate(&self) -> Result<Gate, TargetError> {
        let mut look = self.look(None).await?;
        // Too little of its window left: look again.
        if look.until().is_some_and(|u| u <= Instant::now() + Timing::get().margin / 6) {
            look = self.look(Some(Instant::now())).await?;
        }
        if self.state.lock().await.unsettled {
            return Ok(Gate::Held("the queue has not taken the last collection yet".into()));
        }
        Ok(match look.quiet {
            true => Gate::Open(look),
            false => Gate::Held("a gc or rm is deleting in the cache; writes wait until it ends".into()),
        })
    }

    /// [`GcWatch::gate`] until it opens, for at most `limit`.
    pub async fn wait_open(&self, limit: Duration) -> Result<Gate, TargetError> {
        let start = Instant::now();
        loop {
            let g = self.gate().await?;
            if matches!(g, Gate::Open(_)) || start.elapsed() >= limit {
                return Ok(g);
            }
            tokio::time::sleep(Timing::get().watch_ttl).await;
        }
    }

    /// Settles a write (or a finding) that returned at `landed`, begun under `open` (module
    /// doc, step 2). `Ok(Settled::Safe)`: it counts in `open`'s epoch, or in the later one
    /// given; `Ok(Settled::Check)`: a collection may have overlapped it, and what it relies on
    /// must be looked for again now (after the returned look) before it counts; `Err(why)`:
    /// a collection still runs after [`Timing::gc_wait`].
    pub async fn settle(&self, open: &Look, landed: Instant) -> Result<Result<Settled, String>, TargetError> {
        if open.until().is_some_and(|u| landed <= u) {
            return Ok(Ok(Settled::Safe(open.clone())));
        }
        let start = Instant::now();
        let mut after = landed;
        loop {
            let look = self.look(Some(after)).await?;
            if look.quiet && !self.state.lock().await.unsettled {
                return Ok(Ok(match look.epoch == open.epoch {
                    true => Settled::Safe(look),
                    false => Settled::Check(look),
                }));
            }
            if start.elapsed() >= Timing::get().gc_wait {
                return Ok(Err("a gc or rm is deleting in the cache; the write is checked again later".into()));
            }
            tokio::time::sleep(Timing::get().watch_ttl).await;
            after = Instant::now();
        }
    }
}

/// How a write settled ([`GcWatch::settle`]).
#[derive(Debug, Clone)]
pub enum Settled {
    /// No collection can have taken what it relies on: it counts in this look's epoch.
    Safe(Look),
    /// Look for what it relies on again; then it counts in this look's epoch.
    Check(Look),
}

/// The protocol a run object or root says it follows (none: 1).
pub fn protocol_of(body: &[u8]) -> u32 {
    String::from_utf8_lossy(body).lines().find_map(|l| l.strip_prefix("narq-protocol ")).and_then(|v| v.trim().parse().ok()).unwrap_or(1)
}

/// A collector's announcement (module doc, "Collector"): made by [`Run::begin`], kept alive
/// by [`Run::heartbeat`], ended by [`Run::end`].
pub struct Run<'a> {
    target: &'a dyn Target,
    key: String,
    what: String,
    beats: u64,
    /// When the run object was last written (the write returned).
    written: Instant,
    /// When the announcement returned: the final listing waits [`Timing::lease`] from here.
    pub announced: Instant,
    /// The store's time, as the run object was stamped, and when that write returned.
    server: Option<(SystemTime, Instant)>,
    /// The lock that tells writers this collector lives (`file://`).
    _fence: Option<Fence>,
}

impl<'a> Run<'a> {
    pub async fn begin(target: &'a dyn Target, what: &str) -> Result<Run<'a>, TargetError> {
        let id = format!("{}-{}-{}", hostname(), std::process::id(), SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis()));
        let key = format!("{RUN_PREFIX}{id}");
        // Locked before anyone can see the run object, released after it is gone.
        let fence = target.fence(&lock_key(&key)).await?;
        let mut run = Run { target, key, what: what.to_string(), beats: 0, written: Instant::now(), announced: Instant::now(), server: None, _fence: fence };
        run.write().await?;
        run.move_generation("announce").await?;
        run.announced = Instant::now();
        // The store's clock: the run object's time as listed (a second behind at most on S3,
        // which makes objects look younger: the safe side).
        let (runs, _) = list_runs(target).await?;
        run.server = runs.get(&run.key).and_then(|(_, t)| *t).map(|t| (t, run.written));
        run.clear_dead(&runs).await;
        Ok(run)
    }

    async fn write(&mut self) -> Result<(), TargetError> {
        let body = format!("narq-protocol {PROTOCOL}\n{}\nheartbeat {}\n", self.what, self.beats);
        self.target.put(&self.key, Body::Bytes(body.into_bytes()), TEXT).await?;
        self.beats += 1;
        self.written = Instant::now();
        Ok(())
    }

    async fn move_generation(&self, why: &str) -> Result<(), TargetError> {
        let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let body = format!("{} {why} {nanos}\n", self.key.trim_start_matches(RUN_PREFIX));
        self.target.put(GENERATION, Body::Bytes(body.into_bytes()), TEXT).await
    }

    /// Removes the run objects (and locks) of collectors that are surely gone: their lock is
    /// free, or (no lock) their last heartbeat is an hour older than ours by the store's
    /// clock. What they deleted is long settled: writers took them for dead after
    /// [`Timing::dead_after`].
    async fn clear_dead(&self, runs: &HashMap<String, (Version, Option<SystemTime>)>) {
        let Some((now, _)) = self.server else { return };
        for (key, (_, modified)) in runs.iter().filter(|(k, _)| **k != self.key) {
            let dead = match self.target.fenced(&lock_key(key)).await {
                Ok(Some(alive)) => !alive,
                Ok(None) => modified.is_some_and(|m| now.duration_since(m).is_ok_and(|age| age > Duration::from_secs(3600))),
                Err(_) => false,
            };
            if dead {
                tracing::info!(run = %key, "removing the run object of a collection that died");
                let _ = self.target.delete(&[key.clone(), lock_key(key)]).await;
            }
        }
    }

    /// The store's time now (as of its clock when the run object was written, plus the time
    /// passed here since); the local clock only if the listing did not show the run object.
    pub fn server_now(&self) -> SystemTime {
        match self.server {
            Some((t, at)) => t + at.elapsed(),
            None => SystemTime::now(),
        }
    }

    /// Waits until [`Timing::lease`] has passed since the announcement.
    pub async fn wait_lease(&mut self) -> Result<(), TargetError> {
        let left = Timing::get().lease.saturating_sub(self.announced.elapsed());
        tokio::time::sleep(left).await;
        self.heartbeat().await
    }

    /// Rewrites the run object when due; refuses to go on if its last write is older than
    /// [`Timing::beat_limit`] (the process was stopped, and writers may take it for dead
    /// before a delete sent now lands). Called before every delete request.
    pub async fn heartbeat(&mut self) -> Result<(), TargetError> {
        let t = Timing::get();
        if self.written.elapsed() > t.beat_limit() {
            return Err(TargetError::transient(format!(
                "this collection went {} s without a heartbeat (stopped?); stopped before deleting more, run it again",
                self.written.elapsed().as_secs()
            )));
        }
        if self.written.elapsed() >= t.heartbeat {
            self.write().await?;
        }
        Ok(())
    }

    /// Says that deleting is over: the generation moves, then the run object goes, then the
    /// lock is released.
    pub async fn end(self) -> Result<(), TargetError> {
        self.move_generation("end").await?;
        self.target.delete(std::slice::from_ref(&self.key)).await
    }
}

/// Waits until no collector is running (as a writer judges it), for at most `limit`.
pub async fn wait_quiet(target: Arc<dyn Target>, limit: Duration) -> Result<bool, TargetError> {
    let watch = GcWatch::new(target, Box::new(|_| Ok(())));
    Ok(matches!(watch.wait_open(limit).await?, Gate::Open(_)))
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
    use crate::storage::file::FileTarget;

    fn temp(tag: &str) -> (std::path::PathBuf, Arc<dyn Target>) {
        let dir = std::env::temp_dir().join(format!("narq-collection-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        (dir.clone(), Arc::new(FileTarget::open(dir)))
    }

    /// A collector's run moves the generation when it announces itself and when it ends, and
    /// a writer sees it live while its lock is held, whatever its heartbeats say.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_run_moves_the_generation_twice_and_is_live_while_locked() {
        let (dir, t) = temp("run");
        let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let w = GcWatch::new(t.clone(), {
            let seen = seen.clone();
            Box::new(move |m| Ok(seen.lock().unwrap().push(m.to_string())))
        });
        let first = w.look(None).await.unwrap();
        assert!(first.quiet && first.until().is_some());
        let run = Run::begin(&*t, "test").await.unwrap();
        let during = w.look(Some(Instant::now())).await.unwrap();
        assert!(!during.quiet, "a run object with its lock held is live");
        assert!(during.epoch > first.epoch);
        assert!(run.server_now().duration_since(SystemTime::now()).unwrap_or_default() < Duration::from_secs(2));
        // The lock, not the clock, says it lives: its process is this one.
        assert_eq!(t.fenced(&lock_key(&run.key)).await.unwrap(), Some(true));
        run.end().await.unwrap();
        let after = w.look(Some(Instant::now())).await.unwrap();
        assert!(after.quiet && after.epoch > during.epoch);
        let markers = seen.lock().unwrap().clone();
        assert_eq!(markers.len(), 3, "{markers:?}");
        assert_ne!(markers[0].split(' ').next(), markers[2].split(' ').next(), "the generation moved");
        assert!(std::fs::read_dir(dir.join("narq/locks")).unwrap().next().is_none(), "the lock file is gone");
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A run object whose lock nobody holds (its process was killed) is dead at once; one with
    /// no lock file (S3, or an older narq) is live until unchanged for `dead_after`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_killed_collector_is_dead_at_once_one_without_a_lock_after_dead_after() {
        let (dir, t) = temp("dead");
        t.put("narq/gc/run-killed", Body::Bytes(b"narq-protocol 2\ngc\n".to_vec()), TEXT).await.unwrap();
        std::fs::create_dir_all(dir.join("narq/locks")).unwrap();
        std::fs::write(dir.join("narq/locks/run-killed"), "").unwrap();
        let w = GcWatch::new(t.clone(), Box::new(|_| Ok(())));
        assert!(w.look(None).await.unwrap().quiet);
        t.put("narq/gc/run-old", Body::Bytes(b"gc\nheartbeat 0\n".to_vec()), TEXT).await.unwrap();
        assert!(!w.look(Some(Instant::now())).await.unwrap().quiet, "no lock file: live until dead_after");
        assert_eq!(protocol_of(b"gc\nheartbeat 0\n"), 1);
        assert_eq!(protocol_of(b"narq-protocol 2\ngc\n"), 2);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn timing_keeps_its_ratios() {
        let t = Timing::DEFAULT.scaled(0.1);
        assert_eq!(t.lease, Duration::from_millis(1200));
        assert_eq!(t.dead_after, Duration::from_secs(12));
        assert!(t.margin < t.lease && t.watch_ttl + t.margin < t.lease && t.beat_limit() > t.heartbeat);
    }
}
