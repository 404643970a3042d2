//! The durable queue, and all of its policy: states, ordering, retries and backoff.
//!
//! # Why SQLite
//! The queue must survive `kill -9` and power loss, take many small transactions a second
//! (one per hook), and answer "which pending paths have all their references uploaded?".
//! SQLite in WAL mode with `synchronous=FULL` gives durable commits with one fsync each,
//! and that question is one indexed query. narq already links SQLite (bundled, through
//! `rusqlite`) to read the Nix database, so the queue costs no extra dependency; a
//! hand-written journal would need its own compaction and recovery code, and redb another
//! crate that does what SQLite already does here.
//!
//! # Items and states
//! An item is a store path to upload (`nar`), a build log (`log`), or a realisation of a
//! content-addressed derivation's output (`realisation`, ready once its out path is `done`). It is `pending` until
//! the target acknowledged its narinfo (or log), then `done`; `failed` only for failures
//! that will not pass (path gone, contents differ from the NarHash), and then every pending
//! path that depends on it fails too, since uploading it would break the cache's closure.
//! Transient failures stay `pending` with a later `next_try`: nothing is ever dropped.
//! A path that is `done` is never uploaded again ("remembered locally"); enqueuing a
//! `failed` one again retries it.
//!
//! A build the hook saw but could not hand over (no readable key, an unreadable Nix
//! database, a refusal) is a `dropped` item: failed from the start, with the reason, so that
//! `narq status` and `narq wait` report it until a later request (`narq retry`, `narq push`)
//! queues its paths.
//!
//! # What "done" is worth
//! `done` means "in the cache this queue uploads to". The queue records which cache that is
//! ([`Queue::bind_store`]); opened for another one, it forgets every `done` (they become
//! pending again, and the uploader's cheap existence check finds what the new cache already
//! has), so a closure is never completed with a path that is only in the old cache.
//! [`Queue::recheck`] does the same for given paths (`narq push`), for caches that someone
//! else may have pruned.
//!
//! When `narq gc` or `narq rm` may have deleted paths ([`Queue::note_generation`]), `done`
//! paths become `stale`: not uploaded again for that alone (that would undo the collection),
//! but no longer trusted either. A path that a pending path reaches through its references
//! is pending again, and so is every stale one a new request reaches: the uploader looks for
//! it in the cache and uploads it again if it is gone, before anything that references it.
//!
//! # Ordering
//! A `nar` item is ready only when every reference (other than itself) is `done`, so a
//! narinfo is never visible before the narinfos of its references.

use rusqlite::{params, Connection, OptionalExtension};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::nix::{PathInfo, Realisation, StorePath};
use crate::outcome::Outcome;
use crate::protocol::{DroppedBuild, Failure, Status, WaitSummary};

pub type Result<T> = std::result::Result<T, rusqlite::Error>;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS items (
    key        TEXT PRIMARY KEY,          -- store path, 'log:' + drv path, or 'realisation:' + id
    kind       TEXT NOT NULL,             -- 'nar' | 'log' | 'realisation'
    info       TEXT NOT NULL,             -- PathInfo JSON for 'nar', drv path for 'log', Realisation JSON
    state      TEXT NOT NULL,             -- 'pending' | 'done' | 'failed'
    seq        INTEGER NOT NULL,          -- enqueue order, for `wait`
    attempts   INTEGER NOT NULL DEFAULT 0,
    next_try   INTEGER NOT NULL DEFAULT 0, -- unix ms
    last_error TEXT,                      -- for done 'excluded': why
    outcome    TEXT,                      -- for done: 'uploaded' | 'present' | 'upstream' | 'no-log' | 'excluded'
    bytes      INTEGER NOT NULL DEFAULT 0,
    done_at    INTEGER,
    repair     INTEGER NOT NULL DEFAULT 0 -- 1: upload even if the cache has a narinfo (see Queue::repair)
);
CREATE INDEX IF NOT EXISTS items_state ON items(state, seq);
CREATE TABLE IF NOT EXISTS refs (
    key TEXT NOT NULL,
    ref TEXT NOT NULL,
    PRIMARY KEY (key, ref)
);
CREATE INDEX IF NOT EXISTS refs_ref ON refs(ref);
-- Top-level paths of requests, for the cache's roots (see `cache::roots`): recorded in the
-- bucket at most once a day each; NULL: to be recorded.
CREATE TABLE IF NOT EXISTS roots (
    path        TEXT PRIMARY KEY,
    recorded_at INTEGER,
    seq         INTEGER NOT NULL DEFAULT 0 -- the request that noted it, for `wait`
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,             -- 'store': the cache 'done' refers to; 'waited': see wait_checkpoint
    value TEXT NOT NULL
);
";

/// What `narq status` counts as it happens, so that its counts never go down: an item made
/// pending again (a recheck, a new store, a collection) and done again counts again, and what
/// was written stays written. One row per counter: `uploaded` and `skipped` (store paths),
/// `logs-uploaded`, `bytes` (written to the cache). The trigger bumps them in the transaction
/// that records an item done, whoever records it.
const COUNTERS: &str = "
CREATE TABLE counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TRIGGER count_done AFTER UPDATE OF state ON items
WHEN NEW.state IN ('done', 'stale') AND OLD.state NOT IN ('done', 'stale')
BEGIN
    INSERT INTO counters (name, value)
        SELECT name, n FROM (SELECT 'bytes' AS name, NEW.bytes AS n UNION ALL SELECT COUNTED_AS_NEW, 1) WHERE name IS NOT NULL
        ON CONFLICT(name) DO UPDATE SET value = value + excluded.value;
END;
-- A queue made before the counters starts them from what its items say.
INSERT INTO counters (name, value)
    SELECT name, SUM(n) FROM (
        SELECT COUNTED_AS_ITEM AS name, COUNT(*) AS n FROM items WHERE state IN ('done', 'stale') GROUP BY 1
        UNION ALL SELECT 'bytes', COALESCE(SUM(bytes), 0) FROM items)
    WHERE name IS NOT NULL GROUP BY name;
";

/// The counter an item done counts in (NULL: none; a realisation is counted with its output).
fn counted_as(row: &str) -> String {
    format!(
        "(CASE WHEN {row}.kind = 'nar' THEN (CASE WHEN {row}.outcome = 'uploaded' THEN 'uploaded' ELSE 'skipped' END)
               WHEN {row}.kind = 'log' AND {row}.outcome = 'uploaded' THEN 'logs-uploaded' END)"
    )
}

/// Adds the counters (see [`COUNTERS`]) to a queue that lacks them.
fn add_counters(conn: &mut Connection) -> Result<()> {
    let tx = conn.transaction()?;
    if tx.query_row("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'counters'", [], |r| r.get::<_, i64>(0))? == 0 {
        tx.execute_batch(&COUNTERS.replace("COUNTED_AS_NEW", &counted_as("NEW")).replace("COUNTED_AS_ITEM", &counted_as("items")))?;
    }
    tx.commit()
}

/// Key prefix of builds the hook could not hand over (`dropped:<root>` or `dropped:<drv>`).
const DROPPED: &str = "dropped:";

#[derive(Debug, Clone)]
pub enum Kind {
    Nar(Box<PathInfo>),
    Log(StorePath),
    Realisation(Box<Realisation>),
}

#[derive(Debug, Clone)]
pub struct Item {
    pub key: String,
    pub kind: Kind,
    pub attempts: u32,
    /// A reference that was excluded (`exclude`): the item must not be uploaded either.
    pub excluded_ref: Option<String>,
    /// Upload it even though the cache has its narinfo: it is broken there ([`Queue::repair`]).
    pub repair: bool,
}

/// Makes `done` items pending again under a new sequence number `?1` (so that `narq wait`
/// reports what happens to them from here on), for the uploader to check the cache for them;
/// callers narrow it with `AND …`.
const REPEND: &str = "UPDATE items SET state = 'pending', outcome = NULL, bytes = 0, attempts = 0, next_try = 0,
     last_error = NULL, done_at = NULL, seq = ?1 WHERE state IN ('done', 'stale')";

/// [`REPEND`] for the `stale` items reached through references from the keys that `from`
/// selects: what an upload is about to rely on is looked for in the cache again first.
fn repend_reached(from: &str) -> String {
    format!(
        "WITH RECURSIVE reach(k) AS ({from} UNION SELECT r.ref FROM reach JOIN refs r ON r.key = reach.k)
         UPDATE items SET state = 'pending', outcome = NULL, bytes = 0, attempts = 0, next_try = 0,
             last_error = NULL, done_at = NULL, seq = ?1 WHERE state = 'stale' AND key IN (SELECT k FROM reach)"
    )
}

/// A root is recorded in the bucket again once it is this old (see `cache::roots`).
const ROOT_REFRESH_MS: i64 = 86_400_000;

fn set_meta(conn: &Connection, key: &str, value: &str) -> Result<()> {
    conn.execute("INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = ?2", [key, value])?;
    Ok(())
}

/// `ORDER BY` term that puts failures of their own before those of their dependents.
const ROOT_CAUSES_FIRST: &str = "(COALESCE(last_error, '') LIKE 'depends on %')";

/// An item's key as users read it: a store path, `log:<drv>`, or the output of a dropped build.
fn display_key(key: &str) -> String {
    key.strip_prefix(DROPPED).unwrap_or(key).to_string()
}

fn failure(r: &rusqlite::Row) -> rusqlite::Result<Failure> {
    Ok(Failure { item: display_key(&r.get::<_, String>(0)?), error: r.get(1)? })
}

pub struct Queue {
    conn: Connection,
    /// The highest sequence number handed out; only [`Queue::enqueue`] hands them out.
    last_seq: i64,
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as i64
}

/// Capped exponential backoff with jitter: 1 s, 2 s, 4 s … up to 5 min, each scaled by a
/// factor in [0.5, 1) so that many items failing together do not retry together.
pub fn backoff(attempts: u32, key: &str) -> Duration {
    let base = Duration::from_secs(1).saturating_mul(1u32 << attempts.min(9)).min(Duration::from_secs(300));
    let mut h: u64 = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().subsec_nanos() as u64;
    for b in key.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100000001b3);
    }
    base.mul_f64(0.5 + (h % 1000) as f64 / 2000.0)
}

/// Parses a row of [`Queue::ready`]'s query: `rowid, key, kind, info, attempts, excluded_ref, repair`.
fn item(r: &rusqlite::Row) -> std::result::Result<Item, String> {
    let key: String = r.get(1).map_err(|e| format!("key: {e}"))?;
    let kind: String = r.get(2).map_err(|e| format!("kind: {e}"))?;
    let info: String = r.get(3).map_err(|e| format!("info: {e}"))?;
    // Only the backoff depends on it: out of range (or not a number) is clamped, not fatal.
    let attempts = r.get::<_, i64>(4).unwrap_or(0).clamp(0, i64::from(u32::MAX - 1)) as u32;
    let kind = match kind.as_str() {
        "nar" => Kind::Nar(Box::new(serde_json::from_str(&info).map_err(|e| format!("path info: {e}"))?)),
        "log" => Kind::Log(StorePath::parse(&info).map_err(|e| format!("derivation: {e}"))?),
        "realisation" => Kind::Realisation(Box::new(serde_json::from_str(&info).map_err(|e| format!("realisation: {e}"))?)),
        other => return Err(format!("unknown kind {other:?}")),
    };
    let excluded_ref = r.get(5).map_err(|e| format!("excluded reference: {e}"))?;
    let repair = r.get::<_, i64>(6).unwrap_or(0) != 0;
    Ok(Item { key, kind, attempts, excluded_ref, repair })
}

/// Whether `e` says that the database file is damaged, or not a database at all.
pub fn is_corrupt(e: &rusqlite::Error) -> bool {
    matches!(e.sqlite_error_code(), Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase))
}

/// Moves a damaged database at `path`, with its `-wal` and `-shm` files, to
/// `<path>.corrupt-<unix time>` (kept for inspection); returns the new name of `path`.
pub fn set_aside(path: &Path) -> std::io::Result<std::path::PathBuf> {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let name = |suffix: &str| {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        std::path::PathBuf::from(p)
    };
    let to = name(&format!(".corrupt-{secs}"));
    for extra in ["-wal", "-shm"] {
        match std::fs::rename(name(extra), name(&format!(".corrupt-{secs}{extra}"))) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    std::fs::rename(path, &to)?;
    Ok(to)
}

impl Queue {
    pub fn open(path: &Path) -> Result<Queue> {
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "wal")?;
        conn.pragma_update(None, "synchronous", "full")?;
        // A small WAL, truncated after each checkpoint: the queue must not grow into the room
        // the state dir's reserve keeps for the spool (see `spool::RESERVE_BYTES`).
        conn.pragma_update(None, "wal_autocheckpoint", 64)?;
        conn.pragma_update(None, "journal_size_limit", 256 * 1024)?;
        conn.execute_batch(SCHEMA)?;
        // Queues made before `repair` existed lack its column.
        let has_repair: i64 = conn.query_row("SELECT COUNT(*) FROM pragma_table_info('items') WHERE name = 'repair'", [], |r| r.get(0))?;
        if has_repair == 0 {
            conn.execute_batch("ALTER TABLE items ADD COLUMN repair INTEGER NOT NULL DEFAULT 0")?;
        }
        // Queues of narq 64d1f2c and before lack the roots' sequence numbers.
        let has_root_seq: i64 = conn.query_row("SELECT COUNT(*) FROM pragma_table_info('roots') WHERE name = 'seq'", [], |r| r.get(0))?;
        if has_root_seq == 0 {
            conn.execute_batch("ALTER TABLE roots ADD COLUMN seq INTEGER NOT NULL DEFAULT 0")?;
        }
        add_counters(&mut conn)?;
        let last_seq = conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM items", [], |r| r.get(0))?;
        Ok(Queue { conn, last_seq })
    }

    /// The highest sequence number handed out so far.
    pub fn current_seq(&self) -> i64 {
        self.last_seq
    }

    fn meta(&self, key: &str) -> Result<Option<String>> {
        self.conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0)).optional()
    }

    fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        set_meta(&self.conn, key, value)
    }

    /// Ties what the queue remembers as `done` to the cache `store` (see the module doc).
    /// If the queue last uploaded somewhere else (or does not know where), every `done` item
    /// becomes pending again. Returns how many.
    pub fn bind_store(&mut self, store: &str) -> Result<usize> {
        if self.meta("store")?.as_deref() == Some(store) {
            return Ok(0);
        }
        let tx = self.conn.transaction()?;
        let seq = self.last_seq + 1;
        let n = tx.execute(REPEND, [seq])?;
        set_meta(&tx, "store", store)?;
        tx.commit()?;
        if n > 0 {
            self.last_seq = seq;
        }
        Ok(n)
    }

    /// Makes `paths` (queued `nar` items, in any state) pending again, marked so that the
    /// uploader uploads them even though the cache has their narinfo: `narq verify --repair`
    /// found them broken there (NAR missing or corrupt, too few signatures). Returns how many.
    pub fn repair(&mut self, paths: &[StorePath]) -> Result<usize> {
        let keys: Vec<String> = paths.iter().map(|p| p.to_string()).collect();
        let seq = self.last_seq + 1;
        let n = self.conn.execute(
            "UPDATE items SET state = 'pending', repair = 1, outcome = NULL, bytes = 0, attempts = 0, next_try = 0,
             last_error = NULL, done_at = NULL, seq = ?1 WHERE kind = 'nar' AND key IN (SELECT value FROM json_each(?2))",
            params![seq, serde_json::to_string(&keys).expect("strings serialise")],
        )?;
        if n > 0 {
            self.last_seq = seq;
        }
        Ok(n)
    }

    /// Makes those of `paths` that are `done` pending again, so that the uploader checks that
    /// they are still in the cache (and uploads them if not). Returns how many.
    pub fn recheck(&mut self, paths: &[StorePath]) -> Result<usize> {
        let keys: Vec<String> = paths.iter().map(|p| p.to_string()).collect();
        let seq = self.last_seq + 1;
        let n = self.conn.execute(
            &format!("{REPEND} AND kind = 'nar' AND key IN (SELECT value FROM json_each(?2))"),
            params![seq, serde_json::to_string(&keys).expect("strings serialise")],
        )?;
        if n > 0 {
            self.last_seq = seq;
        }
        Ok(n)
    }

    /// `paths`, named by request `seq` before a collection was seen, and the stale paths they
    /// reach, are pending again: that request relied on them. They keep that request's place,
    /// so that a `narq wait` begun after it waits for them.
    pub fn repend_stale(&mut self, paths: &[StorePath], seq: i64) -> Result<usize> {
        let keys: Vec<String> = paths.iter().map(|p| p.to_string()).collect();
        self.conn.execute(&repend_reached("SELECT value FROM json_each(?2)"), params![seq, serde_json::to_string(&keys).expect("strings serialise")])
    }

    /// Called with the cache's collection marker ([`crate::cache::roots`]): when it is not the
    /// one recorded, a `gc` or `rm` may have deleted paths since, so every `done` path becomes
    /// `stale`, the stale ones pending paths reach are pending again (see the module doc), and
    /// the roots are recorded again at their next request. Returns how many became stale.
    pub fn note_generation(&mut self, generation: &str) -> Result<usize> {
        if self.meta("gc-generation")?.as_deref() == Some(generation) {
            return Ok(0);
        }
        let tx = self.conn.transaction()?;
        let seq = self.last_seq + 1;
        let n = tx.execute("UPDATE items SET state = 'stale' WHERE state = 'done' AND kind = 'nar'", [])?;
        tx.execute(&repend_reached("SELECT key FROM items WHERE state = 'pending'"), [seq])?;
        // Recorded roots are recorded again at their next request; those waiting stay.
        tx.execute("DELETE FROM roots WHERE recorded_at IS NOT NULL", [])?;
        set_meta(&tx, "gc-generation", generation)?;
        tx.commit()?;
        self.last_seq = seq;
        Ok(n)
    }

    /// Notes the top-level paths of a request: each is recorded in the cache as a root when it
    /// was not in the last day.
    pub fn note_roots(&mut self, roots: &[StorePath]) -> Result<()> {
        let mut stmt = self.conn.prepare_cached(
            "INSERT INTO roots (path, recorded_at, seq) VALUES (?1, NULL, ?3)
             ON CONFLICT(path) DO UPDATE SET recorded_at = NULL, seq = ?3 WHERE recorded_at < ?2",
        )?;
        for r in roots {
            stmt.execute(params![r.to_string(), now_ms() - ROOT_REFRESH_MS, self.last_seq])?;
        }
        Ok(())
    }

    /// Up to `limit` roots to record in the cache.
    pub fn roots_due(&self, limit: usize) -> Result<Vec<StorePath>> {
        let mut stmt = self.conn.prepare_cached("SELECT path FROM roots WHERE recorded_at IS NULL LIMIT ?1")?;
        let rows = stmt.query_map([limit as i64], |r| r.get::<_, String>(0))?;
        // A row that does not parse is dropped: it only ever held a parsed store path.
        Ok(rows.filter_map(|r| r.ok().and_then(|p| StorePath::parse(&p).ok())).collect())
    }

    /// `roots` are in the cache now, safe in the collection epoch of `marker` (see
    /// `cache::collection`; `None`: no collections are watched). If the cache's marker has
    /// moved on since, they stay due, to be recorded again. A root's path that a collection
    /// made stale meanwhile (it may have deleted it before the root was there) is looked for
    /// again, with the stale paths it reaches, in the place of the request that noted the
    /// root. Returns how many paths that made pending.
    pub fn roots_recorded(&mut self, roots: &[StorePath], marker: Option<&str>) -> Result<usize> {
        let tx = self.conn.transaction()?;
        if marker.is_some() && tx.query_row("SELECT value FROM meta WHERE key = 'gc-generation'", [], |r| r.get::<_, String>(0)).optional()?.as_deref() != marker {
            return Ok(0);
        }
        let mut repended = 0;
        {
            let mut record = tx.prepare_cached("UPDATE roots SET recorded_at = ?2 WHERE path = ?1 RETURNING seq")?;
            let mut repend = tx.prepare_cached(&repend_reached("SELECT ?2"))?;
            for r in roots {
                let key = r.to_string();
                let seq: Option<i64> = record.query_row(params![key, now_ms()], |row| row.get(0)).optional()?;
                if let Some(seq) = seq {
                    repended += repend.execute(params![seq, key])?;
                }
            }
        }
        tx.commit()?;
        Ok(repended)
    }

    /// Roots noted by requests up to `upto` (all with `None`), or of `paths`, that are not in
    /// the cache yet: `narq wait` waits for them, so that a machine that goes away after it
    /// leaves its paths rooted.
    pub fn roots_pending(&self, upto: Option<i64>, paths: Option<&[StorePath]>) -> Result<u64> {
        match paths {
            Some(p) => {
                let keys: Vec<String> = p.iter().map(|p| p.to_string()).collect();
                self.conn.query_row(
                    "SELECT COUNT(*) FROM roots WHERE recorded_at IS NULL AND path IN (SELECT value FROM json_each(?1))",
                    [serde_json::to_string(&keys).expect("strings serialise")],
                    |r| r.get(0),
                )
            }
            None => self.conn.query_row("SELECT COUNT(*) FROM roots WHERE recorded_at IS NULL AND seq <= ?1", [upto.unwrap_or(i64::MAX)], |r| r.get(0)),
        }
    }

    /// Records a build the hook could not hand over, failed with `reason`: one item per
    /// output (or one for the derivation, when its outputs are unknown).
    pub fn record_dropped(&mut self, roots: &[StorePath], drv: Option<&StorePath>, reason: &str) -> Result<()> {
        let tx = self.conn.transaction()?;
        let seq = self.last_seq + 1;
        let drv_s = drv.map(|d| d.to_string()).unwrap_or_default();
        let keys: Vec<String> = match roots.is_empty() {
            true => drv.map(|d| d.to_string()).into_iter().collect(),
            false => roots.iter().map(|r| r.to_string()).collect(),
        };
        for k in keys {
            // An output that is queued already is on its way: nothing was dropped.
            let queued: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM items WHERE key = ?1 AND state != 'failed')",
                [&k],
                |r| r.get(0),
            )?;
            if queued {
                continue;
            }
            tx.execute(
                "INSERT INTO items (key, kind, info, state, seq, last_error, done_at) VALUES (?1, 'dropped', ?2, 'failed', ?3, ?4, ?5)
                 ON CONFLICT(key) DO UPDATE SET info = ?2, state = 'failed', seq = ?3, last_error = ?4, done_at = ?5",
                params![format!("{DROPPED}{k}"), drv_s, seq, reason, now_ms()],
            )?;
        }
        tx.commit()?;
        self.last_seq = seq;
        Ok(())
    }

    /// Records a failure that is not about one path (a damaged queue set aside): `narq status`
    /// and the next `narq wait` report it under `what`.
    pub fn record_problem(&mut self, what: &str, reason: &str) -> Result<()> {
        let seq = self.last_seq + 1;
        self.conn.execute(
            "INSERT INTO items (key, kind, info, state, seq, last_error, done_at) VALUES (?1, 'problem', '', 'failed', ?2, ?3, ?4)
             ON CONFLICT(key) DO UPDATE SET state = 'failed', seq = ?2, last_error = ?3, done_at = ?4",
            params![what, seq, reason, now_ms()],
        )?;
        self.last_seq = seq;
        Ok(())
    }

    /// Forgets the dropped builds of `paths` (outputs or derivations now queued).
    pub fn clear_dropped<'a>(&self, paths: impl IntoIterator<Item = &'a StorePath>) -> Result<usize> {
        let keys: Vec<String> = paths.into_iter().map(|p| format!("{DROPPED}{p}")).collect();
        self.conn.execute(
            "DELETE FROM items WHERE kind = 'dropped' AND key IN (SELECT value FROM json_each(?1))",
            [serde_json::to_string(&keys).expect("strings serialise")],
        )
    }

    /// Every dropped build, oldest first.
    pub fn dropped(&self) -> Result<Vec<DroppedBuild>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT key, info, COALESCE(last_error, '') FROM items WHERE kind = 'dropped' ORDER BY seq, key",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (key, drv, reason) = row?;
            let Ok(path) = StorePath::parse(&key[DROPPED.len()..]) else { continue };
            let drv = StorePath::parse(&drv).ok();
            let root = (drv.as_ref() != Some(&path)).then_some(path);
            out.push(DroppedBuild { root, drv, reason });
        }
        Ok(out)
    }

    /// Adds paths (and a build log) in one durable transaction; returns how many were new.
    /// A pending path's info is replaced by the new one, which the daemon admitted only with
    /// a signature by a trusted key and the references it was queued with (so what an older
    /// narq queued unsigned gives way to a signed request); `done` paths stay done, with the
    /// new info if it differs; `stale` and `failed` ones are pending again.
    pub fn enqueue(&mut self, paths: &[PathInfo], log: Option<&StorePath>) -> Result<usize> {
        let tx = self.conn.transaction()?;
        let seq = self.last_seq + 1;
        let mut new = 0;
        {
            let mut get = tx.prepare_cached("SELECT state, info FROM items WHERE key = ?1")?;
            let mut insert = tx.prepare_cached(
                "INSERT INTO items (key, kind, info, state, seq) VALUES (?1, ?2, ?3, 'pending', ?4)
                 ON CONFLICT(key) DO UPDATE SET info = ?3, state = 'pending', seq = ?4, attempts = 0,
                 next_try = 0, last_error = NULL",
            )?;
            let mut add_ref = tx.prepare_cached("INSERT OR IGNORE INTO refs (key, ref) VALUES (?1, ?2)")?;
            let mut clear_refs = tx.prepare_cached("DELETE FROM refs WHERE key = ?1")?;
            // A pending path keeps its place (its seq, which `wait` counts on, and its backoff).
            let mut replace = tx.prepare_cached("UPDATE items SET info = ?2 WHERE key = ?1")?;
            for p in paths {
                let key = p.path.to_string();
                let old: Option<(String, String)> = get.query_row([&key], |r| Ok((r.get(0)?, r.get(1)?))).optional()?;
                let json = serde_json::to_string(p).expect("PathInfo serialises");
                match old.as_ref().map(|(state, info)| (state.as_str(), info == &json)) {
                    Some(("done", true)) => continue,
                    // Rebuilt with other contents (not every build is reproducible): what the
                    // cache has stays trusted, but if it must be uploaded again it is this.
                    Some(("done", false)) | Some(("pending", _)) => {
                        replace.execute(params![key, json])?;
                    }
                    // A failed one is retried.
                    _ => {
                        new += 1;
                        insert.execute(params![key, "nar", json, seq])?;
                    }
                }
                // The references of the info that replaced the old one, not of both.
                clear_refs.execute([&key])?;
                for r in &p.references {
                    if r != &p.path {
                        add_ref.execute(params![key, r.to_string()])?;
                    }
                }
            }
            if let Some(drv) = log {
                let n = tx
                    .prepare_cached(
                        "INSERT INTO items (key, kind, info, state, seq) VALUES (?1, 'log', ?2, 'pending', ?3)
                         ON CONFLICT(key) DO NOTHING",
                    )?
                    .execute(params![format!("log:{drv}"), drv.to_string(), seq])?;
                new += n;
            }
        }
        // What the request relies on but was only remembered from before a collection.
        let keys: Vec<String> = paths.iter().map(|p| p.path.to_string()).collect();
        tx.execute(&repend_reached("SELECT value FROM json_each(?2)"), params![seq, serde_json::to_string(&keys).expect("strings serialise")])?;
        tx.commit()?;
        self.last_seq = seq;
        Ok(new)
    }

    /// Adds realisations, each after its out path (which the caller has queued) and the
    /// realisations it depends on, in one
    /// durable transaction; returns how many were new. One already `done` with the same
    /// JSON is left alone; any other is (re)queued.
    pub fn enqueue_realisations(&mut self, realisations: &[Realisation]) -> Result<usize> {
        if realisations.is_empty() {
            return Ok(0);
        }
        let tx = self.conn.transaction()?;
        let seq = self.last_seq + 1;
        let mut new = 0;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO items (key, kind, info, state, seq) VALUES (?1, 'realisation', ?2, 'pending', ?3)
                 ON CONFLICT(key) DO UPDATE SET info = ?2, state = 'pending', seq = ?3, attempts = 0, next_try = 0,
                 last_error = NULL, outcome = NULL, done_at = NULL WHERE items.state != 'done' OR items.info != ?2",
            )?;
            let mut clear_refs = tx.prepare_cached("DELETE FROM refs WHERE key = ?1")?;
            let mut add_ref = tx.prepare_cached("INSERT OR IGNORE INTO refs (key, ref) VALUES (?1, ?2)")?;
            for r in realisations {
                let key = format!("realisation:{}", r.id);
                let n = insert.execute(params![key, serde_json::to_string(r).expect("Realisation serialises"), seq])?;
                new += n;
                if n > 0 {
                    clear_refs.execute([&key])?;
                    add_ref.execute(params![key, r.out_path.to_string()])?;
                    // After the realisations it depends on, when they are queued too (a ref to
                    // a key the queue does not hold holds nothing back).
                    for dep in r.dependent_realisations.keys() {
                        add_ref.execute(params![key, format!("realisation:{dep}")])?;
                    }
                }
            }
        }
        tx.commit()?;
        self.last_seq = seq;
        Ok(new)
    }

    /// Those of `paths` that the queue does not hold, pending or done: unknown ones, and
    /// failed ones (which a new request retries).
    pub fn not_queued(&self, paths: &[&StorePath]) -> Result<Vec<StorePath>> {
        self.not_in(paths, "'failed'")
    }

    /// Those of `paths` a client should send in full (`missing`, `roots`): [`Queue::not_queued`]
    /// and the stale ones, which a collection may have removed and the local store may hold
    /// with other contents since.
    pub fn lacking(&self, paths: &[&StorePath]) -> Result<Vec<StorePath>> {
        self.not_in(paths, "'failed', 'stale'")
    }

    fn not_in(&self, paths: &[&StorePath], states: &'static str) -> Result<Vec<StorePath>> {
        let keys: Vec<String> = paths.iter().map(|p| p.to_string()).collect();
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT j.value FROM json_each(?1) j
             WHERE NOT EXISTS (SELECT 1 FROM items i WHERE i.key = j.value AND i.state NOT IN ({states}))"
        ))?;
        let json = serde_json::to_string(&keys).expect("strings serialise");
        let rows = stmt.query_map([json], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for r in rows {
            // Every key came from a StorePath.
            out.extend(StorePath::parse(&r?).ok());
        }
        Ok(out)
    }

    /// Failed items that `roots` rely on below paths not `done` (at most `limit`): a path
    /// made stale by a collection whose reference then failed is held, but cannot be
    /// uploaded again until that reference is sent again. Stops at `done` paths (their
    /// closure was uploaded), so a queue with no collection costs a lookup per root.
    pub fn failed_below(&self, roots: &[&StorePath], limit: usize) -> Result<Vec<StorePath>> {
        let keys: Vec<String> = roots.iter().map(|p| p.to_string()).collect();
        let mut stmt = self.conn.prepare_cached(
            "WITH RECURSIVE reach(k) AS (
                 SELECT value FROM json_each(?1)
                 UNION SELECT r.ref FROM refs r JOIN reach ON r.key = reach.k
                       JOIN items i ON i.key = reach.k WHERE i.state NOT IN ('done', 'failed'))
             SELECT i.key FROM reach JOIN items i ON i.key = reach.k WHERE i.state = 'failed' LIMIT ?2",
        )?;
        let json = serde_json::to_string(&keys).expect("strings serialise");
        let rows = stmt.query_map(params![json, limit as i64], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for r in rows {
            out.extend(StorePath::parse(&r?).ok());
        }
        Ok(out)
    }

    /// The pending ones among `paths`, with their info (`None` if it no longer parses, as
    /// when an older narq stored what is now refused).
    pub fn pending_infos(&self, paths: &[&StorePath]) -> Result<HashMap<StorePath, Option<PathInfo>>> {
        self.infos_in(paths, "'pending'")
    }

    /// The same for every path the queue holds (pending, done or stale): one rebuilt with
    /// other contents since (not every build is reproducible) takes the new request's info.
    pub fn queued_infos(&self, paths: &[&StorePath]) -> Result<HashMap<StorePath, Option<PathInfo>>> {
        self.infos_in(paths, "'pending', 'done', 'stale'")
    }

    fn infos_in(&self, paths: &[&StorePath], states: &'static str) -> Result<HashMap<StorePath, Option<PathInfo>>> {
        let keys: Vec<String> = paths.iter().map(|p| p.to_string()).collect();
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT i.key, i.info FROM json_each(?1) j JOIN items i ON i.key = j.value
             WHERE i.kind = 'nar' AND i.state IN ({states})"
        ))?;
        let json = serde_json::to_string(&keys).expect("strings serialise");
        let rows = stmt.query_map(params![json], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = HashMap::new();
        for r in rows {
            let (key, info) = r?;
            if let Ok(p) = StorePath::parse(&key) {
                out.insert(p, serde_json::from_str(&info).ok());
            }
        }
        Ok(out)
    }

    /// The references (other than to itself) of every pending path that `from` reach
    /// through pending paths: the part of the queue's graph that a request's new paths
    /// join, for the daemon to refuse a request that would close a cycle.
    pub fn pending_edges(&self, from: &[&StorePath]) -> Result<Vec<(StorePath, StorePath)>> {
        let keys: Vec<String> = from.iter().map(|p| p.to_string()).collect();
        let mut stmt = self.conn.prepare_cached(
            "WITH RECURSIVE reach(k) AS (
                 SELECT value FROM json_each(?1)
                 UNION
                 SELECT r.ref FROM reach JOIN items i ON i.key = reach.k AND i.state = 'pending'
                 JOIN refs r ON r.key = reach.k
             )
             SELECT r.key, r.ref FROM reach JOIN items i ON i.key = reach.k AND i.state = 'pending'
             JOIN refs r ON r.key = reach.k",
        )?;
        let json = serde_json::to_string(&keys).expect("strings serialise");
        let rows = stmt.query_map([json], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = Vec::new();
        for r in rows {
            let (k, r) = r?;
            if let (Ok(k), Ok(r)) = (StorePath::parse(&k), StorePath::parse(&r)) {
                out.push((k, r));
            }
        }
        Ok(out)
    }

    /// Up to `limit` items that may start now, oldest first, skipping `busy` ones.
    ///
    /// A row that does not parse (edited by hand, written by a bug) must neither stop every
    /// upload nor stay pending forever unseen: it is marked failed, with the reason, which
    /// `narq status` and `narq wait` report, and the paths that depend on it fail with it.
    pub fn ready(&mut self, limit: usize, busy: &HashSet<String>) -> Result<Vec<Item>> {
        let mut out = Vec::new();
        let mut unreadable = Vec::new();
        {
            let mut stmt = self.conn.prepare_cached(
                "SELECT rowid, key, kind, info, attempts,
                        (SELECT r.ref FROM refs r JOIN items d ON d.key = r.ref
                         WHERE r.key = i.key AND d.outcome = 'excluded' LIMIT 1),
                        repair
                 FROM items i
                 WHERE state = 'pending' AND next_try <= ?1
                   AND NOT EXISTS (SELECT 1 FROM refs r JOIN items d ON d.key = r.ref
                                   WHERE r.key = i.key AND d.state != 'done')
                 ORDER BY seq, key LIMIT ?2",
            )?;
            let mut rows = stmt.query(params![now_ms(), (limit + busy.len()) as i64])?;
            while let Some(r) = rows.next()? {
                let key: Option<String> = r.get(1).ok();
                if key.as_ref().is_some_and(|k| busy.contains(k)) || out.len() >= limit {
                    continue;
                }
                match item(r) {
                    Ok(item) => out.push(item),
                    Err(why) => unreadable.push((r.get::<_, i64>(0)?, key, why)),
                }
            }
        }
        for (rowid, key, why) in unreadable {
            let why = format!("unreadable queue row: {why}");
            tracing::error!(item = key.as_deref().unwrap_or("?"), rowid, "{why}; marked failed");
            match key {
                Some(key) => drop(self.fail(&key, &why)?),
                None => drop(self.conn.execute(
                    "UPDATE items SET state = 'failed', last_error = ?2, done_at = ?3 WHERE rowid = ?1",
                    params![rowid, why, now_ms()],
                )?),
            }
        }
        Ok(out)
    }

    /// The soonest `next_try` of a pending item that waits on nothing but time.
    pub fn next_retry_in(&self) -> Result<Option<Duration>> {
        let t: Option<i64> = self.conn.query_row(
            "SELECT MIN(next_try) FROM items WHERE state = 'pending' AND next_try > ?1",
            [now_ms()],
            |r| r.get(0),
        )?;
        Ok(t.map(|t| Duration::from_millis((t - now_ms()).max(0) as u64)))
    }

    /// Records an item done. `marker` is the collection marker of the epoch a path is safe
    /// in (see `cache::collection`): if the cache's marker has moved on since (a collection
    /// was seen meanwhile), the path is recorded `stale` instead, to be looked for again
    /// before anything relies on it.
    pub fn done(&self, key: &str, outcome: Outcome, marker: Option<&str>) -> Result<()> {
        let (name, bytes, why) = match outcome {
            Outcome::Uploaded { bytes } => ("uploaded", bytes, None),
            Outcome::Present => ("present", 0, None),
            Outcome::Upstream => ("upstream", 0, None),
            Outcome::NoLog => ("no-log", 0, None),
            Outcome::Excluded(why) => ("excluded", 0, Some(why)),
        };
        self.conn.execute(
            "UPDATE items SET state = CASE WHEN ?6 IS NULL OR ?6 IS (SELECT value FROM meta WHERE key = 'gc-generation') THEN 'done' ELSE 'stale' END,
                 outcome = ?2, bytes = ?3, done_at = ?4, last_error = ?5, repair = 0 WHERE key = ?1",
            params![key, name, bytes as i64, now_ms(), why, marker],
        )?;
        Ok(())
    }

    /// Runs `f` in one transaction, so that all its changes cost one fsync: for recording
    /// many results at once ([`Queue::done`], [`Queue::retry_later`]; nothing that opens a
    /// transaction of its own). Rolled back if `f` fails.
    pub fn in_one_transaction<T>(&self, f: impl FnOnce(&Queue) -> Result<T>) -> Result<T> {
        let tx = self.conn.unchecked_transaction()?;
        let out = f(self)?;
        tx.commit()?;
        Ok(out)
    }

    /// A failure that may pass: retried after [`backoff`]. Returns the delay.
    pub fn retry_later(&self, key: &str, attempts: u32, error: &str) -> Result<Duration> {
        let delay = backoff(attempts, key);
        self.conn.execute(
            "UPDATE items SET attempts = ?2, next_try = ?3, last_error = ?4 WHERE key = ?1",
            params![key, attempts + 1, now_ms() + delay.as_millis() as i64, error],
        )?;
        Ok(delay)
    }

    /// A failure that will not pass; every pending path that depends on `key` fails too.
    /// Returns how many dependents failed with it.
    pub fn fail(&mut self, key: &str, error: &str) -> Result<usize> {
        let tx = self.conn.transaction()?;
        tx.execute("UPDATE items SET state = 'failed', last_error = ?2, done_at = ?3 WHERE key = ?1", params![key, error, now_ms()])?;
        let n = tx.execute(
            "WITH RECURSIVE dep(key) AS (SELECT ?1 UNION SELECT r.key FROM refs r JOIN dep ON r.ref = dep.key)
             UPDATE items SET state = 'failed', last_error = ?2, done_at = ?3
             WHERE key IN (SELECT key FROM dep) AND key != ?1 AND state = 'pending'",
            params![key, format!("depends on {key}, which failed: {error}"), now_ms()],
        )?;
        tx.commit()?;
        Ok(n)
    }

    /// What `narq wait` reports by default: failures of items enqueued after this sequence
    /// number (the start of the last wait that saw everything done), so that a wait answers
    /// for what happened since the previous one, not for every failure ever recorded.
    pub fn wait_checkpoint(&self) -> Result<i64> {
        Ok(self.meta("waited")?.and_then(|v| v.parse().ok()).unwrap_or(0))
    }

    /// Moves the checkpoint forward to `seq` (never back).
    pub fn set_wait_checkpoint(&self, seq: i64) -> Result<()> {
        if seq > self.wait_checkpoint()? {
            self.set_meta("waited", &seq.to_string())?;
        }
        Ok(())
    }

    /// Items with `seq <= upto` still pending, and the failures of items with `seq > since`,
    /// root causes first.
    pub fn progress(&self, upto: i64, since: i64) -> Result<(u64, Vec<Failure>)> {
        let pending: u64 =
            self.conn.query_row("SELECT COUNT(*) FROM items WHERE state = 'pending' AND seq <= ?1", [upto], |r| r.get(0))?;
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT key, COALESCE(last_error, '') FROM items WHERE state = 'failed' AND seq > ?1
             ORDER BY {ROOT_CAUSES_FIRST}, key LIMIT 100"
        ))?;
        let failed = stmt.query_map([since], failure)?.collect::<Result<_>>()?;
        Ok((pending, failed))
    }

    /// The same for the closure `paths` (`narq push --wait`): how many are pending, and the
    /// failures among them, including builds of them the hook dropped and paths the queue does
    /// not hold at all.
    pub fn progress_of(&self, paths: &[StorePath]) -> Result<(u64, Vec<Failure>)> {
        let keys: Vec<String> = paths.iter().flat_map(|p| [p.to_string(), format!("{DROPPED}{p}")]).collect();
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT key, state, COALESCE(last_error, '') FROM items WHERE key IN (SELECT value FROM json_each(?1))
             ORDER BY {ROOT_CAUSES_FIRST}, key"
        ))?;
        let rows = stmt.query_map([serde_json::to_string(&keys).expect("strings serialise")], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?))
        })?;
        let (mut pending, mut failed, mut seen) = (0, Vec::new(), HashSet::new());
        for row in rows {
            let (key, state, error) = row?;
            seen.insert(key.clone());
            match state.as_str() {
                "pending" => pending += 1,
                "failed" => failed.push(Failure { item: display_key(&key), error }),
                _ => {}
            }
        }
        for p in paths.iter().map(|p| p.to_string()).filter(|k| !seen.contains(k)) {
            failed.push(Failure { item: p, error: "not in the queue (was it pushed?)".into() });
        }
        Ok((pending, failed))
    }

    /// Counts for `narq status` (in-flight and spool counts are the daemon's to fill in):
    /// what is pending and failed now, and what was uploaded, skipped and written since the
    /// queue was made (the counters, which never go down).
    pub fn status(&self) -> Result<Status> {
        let mut s = Status::default();
        // A build log is not a store path. A damaged row must not make `status` fail: json_valid.
        let mut stmt = self.conn.prepare_cached(
            "SELECT kind, state, COUNT(*),
                    SUM(CASE WHEN kind = 'nar' AND state = 'pending' AND json_valid(info) THEN json_extract(info, '$.narSize') END)
             FROM items WHERE state IN ('pending', 'failed') GROUP BY kind, state",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, u64>(2)?, r.get::<_, Option<i64>>(3)?)))?;
        for row in rows {
            let (kind, state, n, pending_nar) = row?;
            s.pending_bytes += pending_nar.unwrap_or(0).max(0) as u64;
            match state.as_str() {
                "pending" => {
                    s.pending += n;
                    if kind == "nar" {
                        s.pending_paths += n;
                    }
                }
                _ => s.failed += n,
            }
        }
        let mut stmt = self.conn.prepare_cached("SELECT name, value FROM counters")?;
        for row in stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?.max(0) as u64)))? {
            let (name, value) = row?;
            match name.as_str() {
                "uploaded" => s.uploaded = value,
                "skipped" => s.skipped = value,
                "logs-uploaded" => s.logs_uploaded = value,
                "bytes" => s.bytes = value,
                _ => {}
            }
        }
        let minute_ago = now_ms() - 60_000;
        let recent: Option<i64> =
            self.conn.query_row("SELECT SUM(bytes) FROM items WHERE done_at >= ?1", [minute_ago], |r| r.get(0))?;
        s.rate = recent.unwrap_or(0) as f64 / 60.0;
        // Root causes first: "depends on X, which failed" says less than X's own error.
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT key, last_error FROM items WHERE last_error IS NOT NULL AND state != 'done'
             ORDER BY {ROOT_CAUSES_FIRST}, COALESCE(done_at, next_try) DESC LIMIT 10"
        ))?;
        s.recent_failures = stmt.query_map([], failure)?.collect::<Result<_>>()?;
        let mut stmt = self.conn.prepare_cached(
            "SELECT key, last_error FROM items WHERE state = 'done' AND outcome = 'excluded' ORDER BY done_at DESC, key LIMIT 10",
        )?;
        s.excluded = stmt.query_map([], failure)?.collect::<Result<_>>()?;
        s.last_error = s.recent_failures.first().cloned();
        Ok(s)
    }

    /// What became of the items a `narq wait` answers for: those enqueued after `since` up to
    /// `upto` ([`Queue::progress`]), or with `paths`, those paths ([`Queue::progress_of`]).
    pub fn wait_summary(&self, upto: i64, since: i64, paths: Option<&[StorePath]>) -> Result<WaitSummary> {
        let select = |scope: &str| format!("SELECT kind, state, outcome = 'uploaded', COUNT(*), COALESCE(SUM(bytes), 0) FROM items WHERE {scope} GROUP BY 1, 2, 3");
        let row = |r: &rusqlite::Row| -> rusqlite::Result<(String, String, bool, u64, i64)> {
            Ok((r.get(0)?, r.get(1)?, r.get::<_, Option<bool>>(2)?.unwrap_or(false), r.get(3)?, r.get(4)?))
        };
        let rows = match paths {
            Some(p) => {
                let keys: Vec<String> = p.iter().flat_map(|p| [p.to_string(), format!("{DROPPED}{p}")]).collect();
                let mut stmt = self.conn.prepare_cached(&select("key IN (SELECT value FROM json_each(?1))"))?;
                let rows = stmt.query_map([serde_json::to_string(&keys).expect("strings serialise")], row)?.collect::<Result<Vec<_>>>()?;
                rows
            }
            None => self.conn.prepare_cached(&select("seq > ?1 AND seq <= ?2"))?.query_map([since, upto], row)?.collect::<Result<Vec<_>>>()?,
        };
        let mut w = WaitSummary::default();
        for (kind, state, uploaded, n, bytes) in rows {
            w.bytes += bytes.max(0) as u64;
            match (kind.as_str(), state.as_str(), uploaded) {
                (_, "pending", _) => w.pending += n,
                (_, "failed", _) => w.failed += n,
                ("nar", _, true) => w.uploaded += n,
                ("nar", _, false) => w.skipped += n,
                ("log", _, true) => w.logs_uploaded += n,
                _ => {}
            }
        }
        Ok(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::Sha256;

    /// An empty queue in a temp dir of its own (`narq-queue-<tag>-<pid>`), and the dir.
    fn fresh_queue(tag: &str) -> (std::path::PathBuf, Queue) {
        let dir = std::env::temp_dir().join(format!("narq-queue-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let q = Queue::open(&dir.join("q.db")).unwrap();
        (dir, q)
    }

    fn info(name: &str, refs: &[&str]) -> PathInfo {
        let p = |n: &str| StorePath::parse(&format!("/nix/store/{}-{n}", "0".repeat(31) + &n[..1])).unwrap();
        PathInfo {
            path: p(name),
            nar_hash: Sha256::digest(name.as_bytes()),
            nar_size: 8,
            references: refs.iter().map(|r| p(r)).chain([p(name)]).collect(),
            deriver: None,
            sigs: Default::default(),
            ca: None,
        }
    }

    #[test]
    fn an_excluded_path_marks_its_referrers_and_realisations_and_is_reported_not_failed() {
        let (dir, mut q) = fresh_queue("excl");
        let (a, b) = (info("a", &[]), info("b", &["a"]));
        q.enqueue(&[a.clone(), b.clone()], None).unwrap();
        let r = Realisation { id: format!("sha256:{}!out", "0".repeat(64)), out_path: a.path.clone(), signatures: Default::default(), dependent_realisations: Default::default(), build_trace: None };
        q.enqueue_realisations(std::slice::from_ref(&r)).unwrap();
        let ready = q.ready(10, &HashSet::new()).unwrap();
        assert_eq!(ready.iter().map(|i| (i.key.as_str(), i.excluded_ref.as_deref())).collect::<Vec<_>>(), [(&*a.path.to_string(), None)]);
        q.done(&a.path.to_string(), Outcome::Excluded("its name matches exclude pattern \"a*\"".into()), None).unwrap();
        // Both the referrer and the realisation come out marked with the excluded reference.
        let mut ready: Vec<(String, Option<String>)> = q.ready(10, &HashSet::new()).unwrap().into_iter().map(|i| (i.key, i.excluded_ref)).collect();
        ready.sort();
        let a_key = Some(a.path.to_string());
        assert_eq!(ready, [(b.path.to_string(), a_key.clone()), (format!("realisation:{}", r.id), a_key)]);
        let s = q.status().unwrap();
        assert_eq!((s.skipped, s.failed, s.recent_failures.len()), (1, 0, 0));
        assert_eq!(s.excluded, [Failure { item: a.path.to_string(), error: "its name matches exclude pattern \"a*\"".into() }]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn references_first_failures_cascade_done_is_remembered() {
        let (dir, mut q) = fresh_queue("main");
        let (a, b, c) = (info("a", &[]), info("b", &["a"]), info("c", &["b"]));
        assert_eq!(q.enqueue(&[c.clone(), b.clone(), a.clone()], None).unwrap(), 3);
        let keys = |v: Vec<Item>| v.into_iter().map(|i| i.key).collect::<Vec<_>>();
        assert_eq!(keys(q.ready(10, &HashSet::new()).unwrap()), [a.path.to_string()]);
        q.done(&a.path.to_string(), Outcome::Uploaded { bytes: 5 }, None).unwrap();
        assert_eq!(keys(q.ready(10, &HashSet::new()).unwrap()), [b.path.to_string()]);
        // A transient failure keeps it pending but not ready until the backoff passes.
        q.retry_later(&b.path.to_string(), 0, "network").unwrap();
        assert!(q.ready(10, &HashSet::new()).unwrap().is_empty());
        assert!(q.next_retry_in().unwrap().unwrap() <= Duration::from_secs(1));
        // A permanent failure fails its dependents.
        assert_eq!(q.fail(&b.path.to_string(), "hash mismatch").unwrap(), 1);
        let s = q.status().unwrap();
        assert_eq!((s.pending, s.failed, s.uploaded, s.bytes), (0, 2, 1, 5));
        // A build log is counted apart from the paths, and pending paths with their NAR size.
        let drv = StorePath::parse(&format!("/nix/store/{}-x.drv", "1".repeat(32))).unwrap();
        q.enqueue(&[info("d", &[])], Some(&drv)).unwrap();
        let s = q.status().unwrap();
        assert_eq!((s.pending, s.pending_paths, s.pending_bytes), (2, 1, 8));
        q.done(&format!("log:{drv}"), Outcome::Uploaded { bytes: 3 }, None).unwrap();
        q.done(&info("d", &[]).path.to_string(), Outcome::Present, None).unwrap();
        let s = q.status().unwrap();
        assert_eq!((s.uploaded, s.logs_uploaded, s.skipped, s.bytes, s.pending), (1, 1, 1, 8, 0));
        // Re-enqueuing: done stays done, failed is retried.
        assert_eq!(q.enqueue(&[a.clone(), b.clone()], None).unwrap(), 1);
        assert_eq!(keys(q.ready(10, &HashSet::new()).unwrap()), [b.path.to_string()]);
        drop(q);
        // Reopened (as after kill -9): the same state.
        let q = Queue::open(&dir.join("q.db")).unwrap();
        assert_eq!(q.status().unwrap().pending, 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// After a collection, `done` is not trusted: what a pending path or a new request reaches
    /// is looked for again before it is relied on; the rest is not uploaded again for that alone.
    #[test]
    fn a_failure_below_a_stale_path_is_found_from_it() {
        let (dir, mut q) = fresh_queue("failedbelow");
        let (d, r) = (info("d", &[]), info("r", &["d"]));
        q.enqueue(&[d.clone(), r.clone()], None).unwrap();
        q.done(&d.path.to_string(), Outcome::Uploaded { bytes: 1 }, None).unwrap();
        q.done(&r.path.to_string(), Outcome::Uploaded { bytes: 1 }, None).unwrap();
        q.fail(&d.path.to_string(), "not while done").unwrap();
        assert!(q.failed_below(&[&r.path], 10).unwrap().is_empty(), "below a done path nothing is looked at");
        q.enqueue(&[d.clone()], None).unwrap();
        q.done(&d.path.to_string(), Outcome::Uploaded { bytes: 1 }, None).unwrap();
        // A collection makes both stale; d is sent again and fails for good: r, still held, relies on it.
        q.note_generation("g1").unwrap();
        q.enqueue(&[d.clone()], None).unwrap();
        q.fail(&d.path.to_string(), "unreadable").unwrap();
        assert_eq!(q.not_queued(&[&r.path]).unwrap(), Vec::<StorePath>::new());
        assert_eq!(q.failed_below(&[&r.path], 10).unwrap(), [d.path.clone()]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_new_generation_makes_done_stale_and_repends_what_uploads_rely_on() {
        let (dir, mut q) = fresh_queue("gen");
        let keys = |v: Vec<Item>| v.into_iter().map(|i| i.key).collect::<Vec<_>>();
        let (a, b, x, y) = (info("a", &[]), info("b", &["a"]), info("x", &[]), info("y", &["x"]));
        q.enqueue(&[a.clone(), x.clone()], None).unwrap();
        q.done(&a.path.to_string(), Outcome::Uploaded { bytes: 1 }, None).unwrap();
        q.done(&x.path.to_string(), Outcome::Uploaded { bytes: 1 }, None).unwrap();
        q.enqueue(&[b.clone()], None).unwrap();
        assert_eq!(q.note_generation("g1").unwrap(), 2);
        assert_eq!(q.note_generation("g1").unwrap(), 0, "the same generation changes nothing");
        // b is pending: a, which it references, is looked for again, and b waits for it.
        assert_eq!(keys(q.ready(10, &HashSet::new()).unwrap()), [a.path.to_string()]);
        // x is stale, not pending: nothing is uploaded again for the collection alone.
        assert_eq!(q.status().unwrap().pending, 2);
        // A request whose references were only remembered (the hook did not send x) repends them.
        q.enqueue(&[y.clone()], None).unwrap();
        let ready = keys(q.ready(10, &HashSet::new()).unwrap());
        assert!(ready.contains(&x.path.to_string()) && !ready.contains(&y.path.to_string()), "{ready:?}");
        // Roots are recorded once a day, and again after a new generation.
        q.note_roots(&[b.path.clone()]).unwrap();
        assert_eq!(q.roots_due(10).unwrap(), [b.path.clone()]);
        q.roots_recorded(&[b.path.clone()], Some("g1")).unwrap();
        q.note_roots(&[b.path.clone()]).unwrap();
        assert!(q.roots_due(10).unwrap().is_empty());
        q.note_roots(&[a.path.clone()]).unwrap();
        q.note_generation("g2").unwrap();
        assert_eq!(q.roots_due(10).unwrap(), [a.path.clone()], "a root not recorded yet stays due");
        q.note_roots(&[b.path.clone()]).unwrap();
        assert_eq!(q.roots_due(10).unwrap().len(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// What counts as uploaded is tied to the collection epoch it was settled in: a path (or a
    /// root) settled in an epoch the queue has left behind is not trusted, and a root recorded
    /// after a collection has its stale closure looked for again, for the `wait` of its request.
    #[test]
    fn results_settled_before_a_collection_are_not_trusted_after_it() {
        let (dir, mut q) = fresh_queue("epoch");
        let (a, b, c) = (info("a", &[]), info("b", &["a"]), info("c", &[]));
        let state = |q: &Queue, p: &PathInfo| q.conn.query_row("SELECT state FROM items WHERE key = ?1", [p.path.to_string()], |r| r.get::<_, String>(0)).unwrap();
        q.note_generation("g1").unwrap();
        q.enqueue(&[a.clone(), b.clone(), c.clone()], None).unwrap();
        q.note_roots(&[b.path.clone()]).unwrap();
        let seq = q.current_seq();
        q.done(&a.path.to_string(), Outcome::Uploaded { bytes: 1 }, Some("g1")).unwrap();
        q.done(&b.path.to_string(), Outcome::Uploaded { bytes: 1 }, Some("g1")).unwrap();
        q.note_generation("g2").unwrap();
        // c settled in g1, but the queue saw g2 before recording it: stale, not done.
        q.done(&c.path.to_string(), Outcome::Uploaded { bytes: 1 }, Some("g1")).unwrap();
        assert_eq!([state(&q, &a), state(&q, &b), state(&q, &c)], ["stale", "stale", "stale"]);
        assert_eq!(q.roots_pending(Some(seq), None).unwrap(), 1, "wait waits for the root");
        // A root put under g1 does not count under g2: it stays due.
        assert_eq!(q.roots_recorded(&[b.path.clone()], Some("g1")).unwrap(), 0);
        assert_eq!(q.roots_due(10).unwrap(), [b.path.clone()]);
        // Recorded under g2, its stale closure is pending again, in the request's place.
        assert_eq!(q.roots_recorded(&[b.path.clone()], Some("g2")).unwrap(), 2);
        assert_eq!(q.roots_pending(Some(seq), None).unwrap(), 0);
        let (pending, _) = q.progress(seq, 0).unwrap();
        assert_eq!(pending, 2, "a wait begun after the request waits for the closure looked for again");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn repair_makes_done_paths_pending_and_marked_until_done_again() {
        let (dir, mut q) = fresh_queue("repair");
        let (a, b) = (info("a", &[]), info("b", &["a"]));
        q.enqueue(&[a.clone(), b.clone()], None).unwrap();
        for p in [&a, &b] {
            q.done(&p.path.to_string(), Outcome::Present, None).unwrap();
        }
        // Enqueuing again leaves done paths alone; repair does not.
        assert_eq!(q.enqueue(&[a.clone(), b.clone()], None).unwrap(), 0);
        assert!(q.ready(10, &HashSet::new()).unwrap().is_empty());
        assert_eq!(q.repair(&[a.path.clone(), b.path.clone()]).unwrap(), 2);
        let ready = q.ready(10, &HashSet::new()).unwrap();
        assert_eq!(ready.iter().map(|i| (i.key.clone(), i.repair)).collect::<Vec<_>>(), [(a.path.to_string(), true)], "references first");
        q.done(&a.path.to_string(), Outcome::Uploaded { bytes: 1 }, None).unwrap();
        assert!(q.ready(10, &HashSet::new()).unwrap()[0].repair);
        q.done(&b.path.to_string(), Outcome::Uploaded { bytes: 1 }, None).unwrap();
        // Pending again for another reason (a recheck), it is no longer marked.
        assert_eq!(q.recheck(&[a.path.clone()]).unwrap(), 1);
        assert!(!q.ready(10, &HashSet::new()).unwrap()[0].repair);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_bad_row_fails_with_its_reason_and_stops_nothing_else() {
        let (dir, mut q) = fresh_queue("rows");
        let (a, b, c, d) = (info("a", &[]), info("b", &[]), info("c", &["b"]), info("d", &[]));
        q.enqueue(&[a.clone(), b.clone(), c.clone(), d.clone()], None).unwrap();
        let set = |sql: &str, key: &PathInfo| q.conn.execute(sql, [key.path.to_string()]).unwrap();
        set("UPDATE items SET attempts = 1 << 40 WHERE key = ?1", &a);
        set("UPDATE items SET info = '{not json' WHERE key = ?1", &b);
        set("UPDATE items SET kind = 'what' WHERE key = ?1", &d);
        // `status` still answers, counting the NAR sizes it can read (a and c).
        assert_eq!(q.status().expect("status with a damaged row").pending_bytes, 16);
        let keys = |v: Vec<Item>| v.into_iter().map(|i| i.key).collect::<Vec<_>>();
        assert_eq!(keys(q.ready(10, &HashSet::new()).unwrap()), [a.path.to_string()]);
        let (pending, failed) = q.progress(i64::MAX, 0).unwrap();
        assert_eq!(pending, 1, "only a is left");
        let reasons: Vec<(String, String)> = failed.into_iter().map(|f| (f.item, f.error)).collect();
        for (k, e) in &reasons {
            match k {
                k if k == &b.path.to_string() => assert!(e.starts_with("unreadable queue row: path info:"), "{e}"),
                k if k == &c.path.to_string() => assert!(e.contains("depends on"), "{e}"),
                k if k == &d.path.to_string() => assert!(e.contains("unknown kind \"what\""), "{e}"),
                k => panic!("{k} failed: {e}"),
            }
        }
        assert_eq!(reasons.len(), 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_damaged_database_is_recognised_and_set_aside() {
        let dir = std::env::temp_dir().join(format!("narq-queue-bad-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let db = dir.join("q.db");
        std::fs::write(&db, vec![b'x'; 8192]).unwrap();
        let e = Queue::open(&db).err().expect("garbage opens as a queue");
        assert!(is_corrupt(&e), "{e}");
        let to = set_aside(&db).unwrap();
        assert!(to.to_str().unwrap().contains("q.db.corrupt-") && to.exists() && !db.exists());
        Queue::open(&db).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Issue 21: after a `narq push` (a recheck) `status` went from "uploaded: 4" to
    /// "uploaded: 2, skipped: 2", and the bytes written went down; a collection (`stale`)
    /// counted uploaded paths as skipped.
    #[test]
    fn status_counts_never_go_down() {
        let (dir, mut q) = fresh_queue("counters");
        let (a, b) = (info("a", &[]), info("b", &["a"]));
        let drv = StorePath::parse(&format!("/nix/store/{}-b.drv", "1".repeat(32))).unwrap();
        q.enqueue(&[a.clone(), b.clone()], Some(&drv)).unwrap();
        let done = |q: &Queue, p: &PathInfo, bytes| q.done(&p.path.to_string(), Outcome::Uploaded { bytes }, None).unwrap();
        done(&q, &a, 500);
        done(&q, &b, 400);
        q.done(&format!("log:{drv}"), Outcome::Uploaded { bytes: 12 }, None).unwrap();
        let counts = |q: &Queue| {
            let s = q.status().unwrap();
            (s.uploaded, s.skipped, s.logs_uploaded, s.bytes, s.pending)
        };
        assert_eq!(counts(&q), (2, 0, 1, 912, 0));
        // `narq push` has both checked again: pending, then found in the cache.
        assert_eq!(q.recheck(&[a.path.clone(), b.path.clone()]).unwrap(), 2);
        assert_eq!(counts(&q), (2, 0, 1, 912, 2));
        q.done(&a.path.to_string(), Outcome::Present, None).unwrap();
        q.done(&b.path.to_string(), Outcome::Present, None).unwrap();
        assert_eq!(counts(&q), (2, 2, 1, 912, 0));
        // A collection makes them stale; a new store makes them pending: nothing goes down.
        q.note_generation("g1").unwrap();
        assert_eq!(counts(&q), (2, 2, 1, 912, 0));
        q.bind_store("file:///elsewhere").unwrap();
        done(&q, &a, 500);
        assert_eq!(counts(&q), (3, 2, 1, 1412, 2));
        // Reopened, and a queue made before the counters starts from what its items say.
        drop(q);
        let q = Queue::open(&dir.join("q.db")).unwrap();
        assert_eq!(counts(&q), (3, 2, 1, 1412, 2));
        q.conn.execute_batch("DROP TRIGGER count_done; DROP TABLE counters;").unwrap();
        drop(q);
        let q = Queue::open(&dir.join("q.db")).unwrap();
        assert_eq!(counts(&q), (1, 0, 0, 500, 2));
        done(&q, &b, 1);
        assert_eq!(counts(&q), (2, 0, 0, 501, 1));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Issue 21: `narq wait` after a build that uploaded 2 paths said "0/0 paths done".
    #[test]
    fn a_wait_summary_counts_what_the_wait_answers_for() {
        let (dir, mut q) = fresh_queue("summary");
        let (a, b, c) = (info("a", &[]), info("b", &["a"]), info("c", &[]));
        q.enqueue(&[a.clone()], None).unwrap();
        q.done(&a.path.to_string(), Outcome::Uploaded { bytes: 100 }, None).unwrap();
        let since = q.current_seq();
        let drv = StorePath::parse(&format!("/nix/store/{}-b.drv", "1".repeat(32))).unwrap();
        q.enqueue(&[a.clone(), b.clone()], Some(&drv)).unwrap();
        q.enqueue(&[c.clone()], None).unwrap();
        q.done(&b.path.to_string(), Outcome::Uploaded { bytes: 40 }, None).unwrap();
        q.done(&format!("log:{drv}"), Outcome::Uploaded { bytes: 2 }, None).unwrap();
        q.done(&c.path.to_string(), Outcome::Present, None).unwrap();
        let w = q.wait_summary(q.current_seq(), since, None).unwrap();
        // `a` was uploaded before: not this wait's.
        assert_eq!(w, WaitSummary { uploaded: 1, bytes: 42, skipped: 1, logs_uploaded: 1, failed: 0, pending: 0 });
        let w = q.wait_summary(0, 0, Some(&[a.path.clone(), b.path.clone(), info("d", &[]).path])).unwrap();
        assert_eq!(w, WaitSummary { uploaded: 2, bytes: 140, ..WaitSummary::default() });
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn backoff_is_capped_and_jittered() {
        assert!(backoff(0, "k") >= Duration::from_millis(500) && backoff(0, "k") < Duration::from_secs(1));
        assert!(backoff(30, "k") <= Duration::from_secs(300) && backoff(30, "k") >= Duration::from_secs(150));
    }
}
