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
//! An item is a store path to upload (`nar`) or a build log (`log`). It is `pending` until
//! the target acknowledged its narinfo (or log), then `done`; `failed` only for failures
//! that will not pass (path gone, contents differ from the NarHash), and then every pending
//! path that depends on it fails too, since uploading it would break the cache's closure.
//! Transient failures stay `pending` with a later `next_try`: nothing is ever dropped.
//! A path that is `done` is never uploaded again ("remembered locally"); enqueuing a
//! `failed` one again retries it.
//!
//! # Ordering
//! A `nar` item is ready only when every reference (other than itself) is `done`, so a
//! narinfo is never visible before the narinfos of its references.

use rusqlite::{params, Connection, OptionalExtension};
use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::nix::{PathInfo, StorePath};
use crate::protocol::{Failure, Status};

pub type Result<T> = std::result::Result<T, rusqlite::Error>;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS items (
    key        TEXT PRIMARY KEY,          -- store path, or 'log:' + drv path
    kind       TEXT NOT NULL,             -- 'nar' | 'log'
    info       TEXT NOT NULL,             -- PathInfo JSON for 'nar', drv path for 'log'
    state      TEXT NOT NULL,             -- 'pending' | 'done' | 'failed'
    seq        INTEGER NOT NULL,          -- enqueue order, for `wait`
    attempts   INTEGER NOT NULL DEFAULT 0,
    next_try   INTEGER NOT NULL DEFAULT 0, -- unix ms
    last_error TEXT,
    outcome    TEXT,                      -- for done: 'uploaded' | 'present' | 'upstream' | 'no-log'
    bytes      INTEGER NOT NULL DEFAULT 0,
    done_at    INTEGER
);
CREATE INDEX IF NOT EXISTS items_state ON items(state, seq);
CREATE TABLE IF NOT EXISTS refs (
    key TEXT NOT NULL,
    ref TEXT NOT NULL,
    PRIMARY KEY (key, ref)
);
CREATE INDEX IF NOT EXISTS refs_ref ON refs(ref);
";

#[derive(Debug, Clone)]
pub enum Kind {
    Nar(Box<PathInfo>),
    Log(StorePath),
}

#[derive(Debug, Clone)]
pub struct Item {
    pub key: String,
    pub kind: Kind,
    pub attempts: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Uploaded { bytes: u64 },
    /// Already in the cache.
    Present,
    /// In an upstream cache.
    Upstream,
    /// No build log was kept.
    NoLog,
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

/// Parses a row of [`Queue::ready`]'s query: `rowid, key, kind, info, attempts`.
fn item(r: &rusqlite::Row) -> std::result::Result<Item, String> {
    let key: String = r.get(1).map_err(|e| format!("key: {e}"))?;
    let kind: String = r.get(2).map_err(|e| format!("kind: {e}"))?;
    let info: String = r.get(3).map_err(|e| format!("info: {e}"))?;
    // Only the backoff depends on it: out of range (or not a number) is clamped, not fatal.
    let attempts = r.get::<_, i64>(4).unwrap_or(0).clamp(0, i64::from(u32::MAX - 1)) as u32;
    let kind = match kind.as_str() {
        "nar" => Kind::Nar(Box::new(serde_json::from_str(&info).map_err(|e| format!("path info: {e}"))?)),
        "log" => Kind::Log(StorePath::parse(&info).map_err(|e| format!("derivation: {e}"))?),
        other => return Err(format!("unknown kind {other:?}")),
    };
    Ok(Item { key, kind, attempts })
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
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "wal")?;
        conn.pragma_update(None, "synchronous", "full")?;
        conn.execute_batch(SCHEMA)?;
        let last_seq = conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM items", [], |r| r.get(0))?;
        Ok(Queue { conn, last_seq })
    }

    /// The highest sequence number handed out so far.
    pub fn current_seq(&self) -> i64 {
        self.last_seq
    }

    /// Adds paths (and a build log) in one durable transaction; returns how many were new.
    /// Signatures of a pending path are merged; `done` paths are left alone; `failed` ones
    /// are retried.
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
            for p in paths {
                let key = p.path.to_string();
                let old: Option<(String, String)> = get.query_row([&key], |r| Ok((r.get(0)?, r.get(1)?))).optional()?;
                let mut info = p.clone();
                match old {
                    Some((state, _)) if state == "done" => continue,
                    Some((state, old_info)) => {
                        if let Ok(o) = serde_json::from_str::<PathInfo>(&old_info) {
                            info.sigs.extend(o.sigs);
                        }
                        // A pending path keeps its place; a failed one is retried.
                        if state == "failed" {
                            new += 1;
                        }
                    }
                    None => new += 1,
                }
                let json = serde_json::to_string(&info).expect("PathInfo serialises");
                insert.execute(params![key, "nar", json, seq])?;
                for r in &info.references {
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
        tx.commit()?;
        self.last_seq = seq;
        Ok(new)
    }

    /// Those of `paths` that the queue does not hold, pending or done: unknown ones, and
    /// failed ones (which a new request retries).
    pub fn not_queued(&self, paths: &[&StorePath]) -> Result<Vec<StorePath>> {
        let keys: Vec<String> = paths.iter().map(|p| p.to_string()).collect();
        let mut stmt = self.conn.prepare_cached(
            "SELECT j.value FROM json_each(?1) j
             WHERE NOT EXISTS (SELECT 1 FROM items i WHERE i.key = j.value AND i.state != 'failed')",
        )?;
        let json = serde_json::to_string(&keys).expect("strings serialise");
        let rows = stmt.query_map([json], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for r in rows {
            // Every key came from a StorePath.
            out.extend(StorePath::parse(&r?).ok());
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
                "SELECT rowid, key, kind, info, attempts FROM items i
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

    pub fn done(&self, key: &str, outcome: Outcome) -> Result<()> {
        let (name, bytes) = match outcome {
            Outcome::Uploaded { bytes } => ("uploaded", bytes),
            Outcome::Present => ("present", 0),
            Outcome::Upstream => ("upstream", 0),
            Outcome::NoLog => ("no-log", 0),
        };
        self.conn.execute(
            "UPDATE items SET state = 'done', outcome = ?2, bytes = ?3, done_at = ?4, last_error = NULL WHERE key = ?1",
            params![key, name, bytes as i64, now_ms()],
        )?;
        Ok(())
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
            params![key, format!("depends on {key}, which failed"), now_ms()],
        )?;
        tx.commit()?;
        Ok(n)
    }

    /// Items with `seq <= seq` still pending, and those that failed.
    pub fn progress_since(&self, seq: i64) -> Result<(u64, Vec<Failure>)> {
        let pending: u64 =
            self.conn.query_row("SELECT COUNT(*) FROM items WHERE state = 'pending' AND seq <= ?1", [seq], |r| r.get(0))?;
        let mut stmt = self.conn.prepare_cached(
            "SELECT key, COALESCE(last_error, '') FROM items WHERE state = 'failed' AND seq <= ?1 ORDER BY key LIMIT 100",
        )?;
        let failed = stmt
            .query_map([seq], |r| Ok(Failure { item: r.get(0)?, error: r.get(1)? }))?
            .collect::<Result<_>>()?;
        Ok((pending, failed))
    }

    /// Counts for `narq status` (in-flight and spool counts are the daemon's to fill in).
    pub fn status(&self) -> Result<Status> {
        let mut s = Status::default();
        let mut stmt = self.conn.prepare_cached("SELECT state, outcome, COUNT(*), SUM(bytes) FROM items GROUP BY state, outcome")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?, r.get::<_, u64>(2)?, r.get::<_, Option<i64>>(3)?))
        })?;
        for row in rows {
            let (state, outcome, n, bytes) = row?;
            s.bytes += bytes.unwrap_or(0) as u64;
            match (state.as_str(), outcome.as_deref()) {
                ("pending", _) => s.pending += n,
                ("failed", _) => s.failed += n,
                ("done", Some("uploaded")) => s.uploaded += n,
                _ => s.skipped += n,
            }
        }
        let minute_ago = now_ms() - 60_000;
        let recent: Option<i64> =
            self.conn.query_row("SELECT SUM(bytes) FROM items WHERE done_at >= ?1", [minute_ago], |r| r.get(0))?;
        s.rate = recent.unwrap_or(0) as f64 / 60.0;
        let mut stmt = self.conn.prepare_cached(
            "SELECT key, last_error FROM items WHERE last_error IS NOT NULL ORDER BY COALESCE(done_at, next_try) DESC LIMIT 10",
        )?;
        s.recent_failures = stmt
            .query_map([], |r| Ok(Failure { item: r.get(0)?, error: r.get(1)? }))?
            .collect::<Result<_>>()?;
        s.last_error = s.recent_failures.first().cloned();
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::Sha256;

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
    fn references_first_failures_cascade_done_is_remembered() {
        let dir = std::env::temp_dir().join(format!("narq-queue-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut q = Queue::open(&dir.join("q.db")).unwrap();
        let (a, b, c) = (info("a", &[]), info("b", &["a"]), info("c", &["b"]));
        assert_eq!(q.enqueue(&[c.clone(), b.clone(), a.clone()], None).unwrap(), 3);
        let keys = |v: Vec<Item>| v.into_iter().map(|i| i.key).collect::<Vec<_>>();
        assert_eq!(keys(q.ready(10, &HashSet::new()).unwrap()), [a.path.to_string()]);
        q.done(&a.path.to_string(), Outcome::Uploaded { bytes: 5 }).unwrap();
        assert_eq!(keys(q.ready(10, &HashSet::new()).unwrap()), [b.path.to_string()]);
        // A transient failure keeps it pending but not ready until the backoff passes.
        q.retry_later(&b.path.to_string(), 0, "network").unwrap();
        assert!(q.ready(10, &HashSet::new()).unwrap().is_empty());
        assert!(q.next_retry_in().unwrap().unwrap() <= Duration::from_secs(1));
        // A permanent failure fails its dependents.
        assert_eq!(q.fail(&b.path.to_string(), "hash mismatch").unwrap(), 1);
        let s = q.status().unwrap();
        assert_eq!((s.pending, s.failed, s.uploaded, s.bytes), (0, 2, 1, 5));
        // Re-enqueuing: done stays done, failed is retried.
        assert_eq!(q.enqueue(&[a.clone(), b.clone()], None).unwrap(), 1);
        assert_eq!(keys(q.ready(10, &HashSet::new()).unwrap()), [b.path.to_string()]);
        drop(q);
        // Reopened (as after kill -9): the same state.
        let q = Queue::open(&dir.join("q.db")).unwrap();
        assert_eq!(q.status().unwrap().pending, 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_bad_row_fails_with_its_reason_and_stops_nothing_else() {
        let dir = std::env::temp_dir().join(format!("narq-queue-rows-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut q = Queue::open(&dir.join("q.db")).unwrap();
        let (a, b, c, d) = (info("a", &[]), info("b", &[]), info("c", &["b"]), info("d", &[]));
        q.enqueue(&[a.clone(), b.clone(), c.clone(), d.clone()], None).unwrap();
        let set = |sql: &str, key: &PathInfo| q.conn.execute(sql, [key.path.to_string()]).unwrap();
        set("UPDATE items SET attempts = 1 << 40 WHERE key = ?1", &a);
        set("UPDATE items SET info = '{not json' WHERE key = ?1", &b);
        set("UPDATE items SET kind = 'what' WHERE key = ?1", &d);
        let keys = |v: Vec<Item>| v.into_iter().map(|i| i.key).collect::<Vec<_>>();
        assert_eq!(keys(q.ready(10, &HashSet::new()).unwrap()), [a.path.to_string()]);
        let (pending, failed) = q.progress_since(i64::MAX).unwrap();
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

    #[test]
    fn backoff_is_capped_and_jittered() {
        assert!(backoff(0, "k") >= Duration::from_millis(500) && backoff(0, "k") < Duration::from_secs(1));
        assert!(backoff(30, "k") <= Duration::from_secs(300) && backoff(30, "k") >= Duration::from_secs(150));
    }
}
