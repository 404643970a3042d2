//! What the daemon looks up about a request's paths before it admits them: which the queue
//! lacks, their queued infos, failures they rely on, and the pending graph they join.


use rusqlite::{params, OptionalExtension};
use std::collections::HashMap;

use super::{Queue, Result};
use crate::nix::{PathInfo, Sha256, StorePath};

impl Queue {
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

    /// The NarHash each of `paths` that the queue holds (pending, done or stale) was queued
    /// with, read without the rest of its info (a path may have 100,000 references).
    pub fn queued_nar_hashes(&self, paths: &[&StorePath]) -> Result<HashMap<StorePath, Option<Sha256>>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT CASE WHEN json_valid(info) THEN json_extract(info, '$.narHash') END FROM items
             WHERE key = ?1 AND kind = 'nar' AND state IN ('pending', 'done', 'stale')",
        )?;
        let mut out = HashMap::new();
        for p in paths {
            // A damaged row is held with no NarHash, as `queued_infos` holds it with no info.
            if let Some(h) = stmt.query_row([p.to_string()], |r| r.get::<_, Option<String>>(0)).optional()? {
                out.insert((*p).clone(), h.and_then(|h: String| Sha256::parse(&h).ok()));
            }
        }
        Ok(out)
    }

    fn infos_in(&self, paths: &[&StorePath], states: &'static str) -> Result<HashMap<StorePath, Option<PathInfo>>> {
        let keys: Vec<String> = paths.iter().map(|p| p.to_string()).collect();
        let mut stmt = self.conn.prepare_cached(&format!(
            // CROSS JOIN: each key looked up, never the items of a state scanned once per key.
            "SELECT i.key, i.info FROM json_each(?1) j CROSS JOIN items i ON i.key = j.value
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
}
