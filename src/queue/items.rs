//! The items and their life: what one is (a store path, a build log, a realisation),
//! enqueuing them, handing out those that are ready, and recording how each ended: done,
//! retried after a [`backoff`], or failed with everything that depends on it.


use rusqlite::{params, OptionalExtension};
use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{now_ms, repend_reached, Queue, Result};
use crate::nix::{PathInfo, Realisation, StorePath};
use crate::outcome::Outcome;

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

/// The longest [`backoff`].
const BACKOFF_CAP: Duration = Duration::from_secs(300);

/// Capped exponential backoff with jitter: 1 s, 2 s, 4 s … up to 5 min, each scaled by a
/// factor in [0.5, 1) so that many items failing together do not retry together.
pub fn backoff(attempts: u32, key: &str) -> Duration {
    let base = Duration::from_secs(1).saturating_mul(1u32 << attempts.min(9)).min(BACKOFF_CAP);
    let mut h: u64 = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().subsec_nanos() as u64;
    for b in key.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100000001b3);
    }
    base.mul_f64(0.5 + (h % 1000) as f64 / 2000.0)
}

/// Parses a row of [`Queue::ready`]'s query: `rowid, key, kind, info, attempts, repair`.
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
    let repair = r.get::<_, i64>(5).unwrap_or(0) != 0;
    Ok(Item { key, kind, attempts, excluded_ref: None, repair })
}

impl Queue {
    /// Adds paths (and a build log) in one durable transaction; returns how many were new.
    /// A pending path's info is replaced by the new one, which the daemon admitted only with
    /// a signature by a trusted key and the references it was queued with (so what an older
    /// narq queued unsigned gives way to a signed request); `done` paths stay done, with the
    /// new info if it differs; `stale` and `failed` ones are pending again.
    pub fn enqueue<'a>(&mut self, paths: impl IntoIterator<Item = &'a PathInfo>, log: Option<&StorePath>) -> Result<usize> {
        let tx = self.conn.transaction()?;
        let seq = self.last_seq + 1;
        let mut new = 0;
        let mut keys = Vec::new();
        {
            let mut get = tx.prepare_cached("SELECT state, info FROM items WHERE key = ?1")?;
            let mut insert = tx.prepare_cached(
                "INSERT INTO items (key, kind, info, state, seq, size) VALUES (?1, ?2, ?3, 'pending', ?4, ?5)
                 ON CONFLICT(key) DO UPDATE SET info = ?3, state = 'pending', seq = ?4, attempts = 0,
                 next_try = 0, last_error = NULL, size = ?5",
            )?;
            let mut add_ref = tx.prepare_cached("INSERT OR IGNORE INTO refs (key, ref) VALUES (?1, ?2)")?;
            let mut clear_refs = tx.prepare_cached("DELETE FROM refs WHERE key = ?1")?;
            // A pending path keeps its place (its seq, which `wait` counts on, and its backoff).
            let mut replace = tx.prepare_cached("UPDATE items SET info = ?2, size = ?3 WHERE key = ?1")?;
            for p in paths {
                let key = p.path.to_string();
                keys.push(key.clone());
                let old: Option<(String, String)> = get.query_row([&key], |r| Ok((r.get(0)?, r.get(1)?))).optional()?;
                let json = serde_json::to_string(p).expect("PathInfo serialises");
                let size = i64::try_from(p.nar_size).unwrap_or(i64::MAX);
                match old.as_ref().map(|(state, info)| (state.as_str(), info == &json)) {
                    Some(("done", true)) => continue,
                    // Rebuilt with other contents (not every build is reproducible): what the
                    // cache has stays trusted, but if it must be uploaded again it is this.
                    Some(("done", false)) | Some(("pending", _)) => {
                        replace.execute(params![key, json, size])?;
                    }
                    // A failed one is retried.
                    _ => {
                        new += 1;
                        insert.execute(params![key, "nar", json, seq, size])?;
                    }
                }
                // The references of the info that replaced the old one, not of both.
                self.blocked.remove(&key);
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
                    self.blocked.remove(&key);
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

    /// Up to `limit` items that may start now, oldest first, skipping `busy` ones.
    ///
    /// A row that does not parse (edited by hand, written by a bug) must neither stop every
    /// upload nor stay pending forever unseen: it is marked failed, with the reason, which
    /// `narq status` and `narq wait` report, and the paths that depend on it fail with it.
    pub fn ready(&mut self, limit: usize, busy: &HashSet<String>) -> Result<Vec<Item>> {
        let mut out = Vec::new();
        let mut unreadable = Vec::new();
        {
            // In order, by `items_order`; whether each waits on a reference is looked at one
            // row at a time below, so that the look stops at `limit` ready ones, and only those
            // are read whole.
            let mut pending = self.conn.prepare_cached(
                "SELECT rowid, key FROM items WHERE state = 'pending' AND (next_try <= ?1 OR next_try > ?1 + ?2)
                 ORDER BY seq, key",
            )?;
            let mut whole = self.conn.prepare_cached("SELECT rowid, key, kind, info, attempts, repair FROM items WHERE rowid = ?1")?;
            let mut state = self.conn.prepare_cached("SELECT state FROM items WHERE key = ?1")?;
            // The one handed out last, so that a hint holds as long as it can (see `blocked`).
            let mut blocker = self.conn.prepare_cached(
                "SELECT r.ref FROM refs r JOIN items d ON d.key = r.ref
                 WHERE r.key = ?1 AND d.state != 'done' ORDER BY d.seq DESC, d.key DESC LIMIT 1",
            )?;
            let mut excluded = self.conn.prepare_cached(
                "SELECT r.ref FROM refs r JOIN items d ON d.key = r.ref WHERE r.key = ?1 AND d.outcome = 'excluded' LIMIT 1",
            )?;
            // A retry set further ahead than the longest backoff was set by a clock that has
            // since been stepped back (NTP at boot, a VM restored): due now, or it would
            // wait for as long as the step.
            let mut rows = pending.query(params![now_ms(), BACKOFF_CAP.as_millis() as i64])?;
            // Items looked over that are held back (with a hint).
            let mut held = 0;
            while out.len() < limit {
                let Some(r) = rows.next()? else {
                    // Looked over every pending item: hints of items no longer pending (done
                    // or failed by another way than this one) go.
                    if self.blocked.len() > held {
                        self.blocked.retain(|k, _| state.query_row([k], |s| s.get::<_, String>(0)).ok().is_some_and(|s| s == "pending"));
                    }
                    break;
                };
                let key: Option<String> = r.get(1).ok();
                if let Some(key) = &key {
                    if busy.contains(key) {
                        continue;
                    }
                    // A value of another type (a damaged row) holds the item back, as the
                    // comparison in SQL did, and stops nothing else.
                    if let Some(b) = self.blocked.get(key) {
                        match state.query_row([b], |s| s.get::<_, String>(0)).optional() {
                            Ok(Some(s)) if s == "done" => {}
                            Ok(None) => {}
                            Ok(Some(_)) | Err(rusqlite::Error::InvalidColumnType(..)) => {
                                held += 1;
                                continue;
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    match blocker.query_row([key], |b| b.get::<_, String>(0)).optional() {
                        Ok(Some(b)) => {
                            self.blocked.insert(key.clone(), b);
                            held += 1;
                            continue;
                        }
                        Err(rusqlite::Error::InvalidColumnType(..)) => continue,
                        Ok(None) => drop(self.blocked.remove(key)),
                        Err(e) => return Err(e),
                    }
                }
                let rowid: i64 = r.get(0)?;
                match whole.query_row([rowid], |r| Ok(item(r)))? {
                    Ok(mut item) => {
                        item.excluded_ref = excluded.query_row([&item.key], |e| e.get(0)).optional()?;
                        out.push(item)
                    }
                    Err(why) => unreadable.push((rowid, key, why)),
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
        // Beyond the longest backoff: due now (see `ready`).
        Ok(t.map(|t| Duration::from_millis((t - now_ms()).max(0) as u64)).map(|d| if d > BACKOFF_CAP { Duration::ZERO } else { d }))
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
}
