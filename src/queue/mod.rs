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
//!
//! # Layout
//! This file holds the database: its schema and the migrations of older queues, the `meta`
//! table, sequence numbers, how keys are spelled, and the SQL that makes items pending again,
//! which the files beside it share. Each of those adds the methods of [`Queue`] for one
//! concern:
//! - `items.rs`: what an item is, enqueuing it, handing out those that are ready, and
//!   recording how each ended (done, retried after a [`backoff`], failed with its dependents);
//! - `lookup.rs`: what the daemon looks up about a request's paths before it admits them;
//! - `trust.rs`: how far `done` is trusted: tied to one cache, rechecked, repaired, made
//!   stale by a collection (see "What done is worth" above);
//! - `roots.rs`: the top-level paths of requests, to record in the cache as roots;
//! - `dropped.rs`: failures that are no upload: builds the hook could not hand over, and
//!   problems that are not about one path;
//! - `report.rs`: what `narq status` and `narq wait` report.

mod dropped;
mod items;
mod lookup;
mod report;
mod roots;
mod trust;

pub use items::{backoff, Item, Kind};

use rusqlite::{Connection, OptionalExtension};

use crate::nix::StorePath;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
    repair     INTEGER NOT NULL DEFAULT 0, -- 1: upload even if the cache has a narinfo (see Queue::repair)
    size       INTEGER NOT NULL DEFAULT 0  -- for 'nar': the NarSize, summed by `status`
);
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

/// Indexes over columns that older queues gain in [`Queue::open`], made after that.
const INDEXES: &str = "
-- The order `ready` hands items out in, without sorting all pending ones for each look.
CREATE INDEX IF NOT EXISTS items_order ON items(state, seq, key);
-- What `status` sums up, without reading the items (a path's info may hold 100,000 references).
CREATE INDEX IF NOT EXISTS items_sizes ON items(state, kind, size);
-- Superseded by items_order (made by narq before it).
DROP INDEX IF EXISTS items_state;
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

/// Makes `done` items pending again under a new sequence number `?1` (so that `narq wait`
/// reports what happens to them from here on), for the uploader to check the cache for them;
/// callers narrow it with `AND …`. (`+state`: rows are found by what narrows them, a list of
/// keys, not by their state, which a million done paths share.)
const REPEND: &str = "UPDATE items SET state = 'pending', outcome = NULL, bytes = 0, attempts = 0, next_try = 0,
     last_error = NULL, done_at = NULL, seq = ?1 WHERE +state IN ('done', 'stale')";

/// [`REPEND`] for the `stale` items reached through references from the keys that `from`
/// selects: what an upload is about to rely on is looked for in the cache again first.
fn repend_reached(from: &str) -> String {
    format!(
        "WITH RECURSIVE reach(k) AS ({from} UNION SELECT r.ref FROM reach JOIN refs r ON r.key = reach.k)
         UPDATE items SET state = 'pending', outcome = NULL, bytes = 0, attempts = 0, next_try = 0,
             last_error = NULL, done_at = NULL, seq = ?1 WHERE state = 'stale' AND key IN (SELECT k FROM reach)"
    )
}

fn set_meta(conn: &Connection, key: &str, value: &str) -> Result<()> {
    conn.execute("INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = ?2", [key, value])?;
    Ok(())
}

/// An item's key as users read it: a store path, `log:<drv>`, or the output of a dropped build.
fn display_key(key: &str) -> String {
    key.strip_prefix(DROPPED).unwrap_or(key).to_string()
}

/// Store paths as the queue's queries take a list of them (a JSON array), made once: a `wait`
/// asks about the same closure, which may hold 100,000 paths, every few milliseconds.
pub struct PathList(String);

impl PathList {
    pub fn new(paths: &[StorePath]) -> PathList {
        PathList(serde_json::to_string(paths).expect("store paths serialise"))
    }
}

pub struct Queue {
    conn: Connection,
    /// The highest sequence number handed out; only [`Queue::enqueue`] hands them out.
    last_seq: i64,
    /// For a pending item found not ready, a reference of it that was not `done` then, the
    /// one handed out last in [`Queue::ready`]'s order: while that one is still not done, the
    /// item is not ready either, which one lookup tells (a path with 100,000 references would
    /// otherwise be looked over whole at each look). Only a hint: forgotten when the item's
    /// references change, and looked over again once that reference is done.
    blocked: std::collections::HashMap<String, String>,
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as i64
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
        // Queues made before `size` sum the sizes from the infos once.
        let has_size: i64 = conn.query_row("SELECT COUNT(*) FROM pragma_table_info('items') WHERE name = 'size'", [], |r| r.get(0))?;
        if has_size == 0 {
            conn.execute_batch(
                "BEGIN;
                 ALTER TABLE items ADD COLUMN size INTEGER NOT NULL DEFAULT 0;
                 UPDATE items SET size = MAX(0, COALESCE(json_extract(info, '$.narSize'), 0)) WHERE kind = 'nar' AND json_valid(info);
                 COMMIT;",
            )?;
        }
        conn.execute_batch(INDEXES)?;
        add_counters(&mut conn)?;
        let last_seq = conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM items", [], |r| r.get(0))?;
        Ok(Queue { conn, last_seq, blocked: Default::default() })
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
}

#[cfg(test)]
mod tests;
