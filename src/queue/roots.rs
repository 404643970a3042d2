//! The top-level paths of requests, which the daemon records in the cache as roots (see
//! `cache::roots`), and which `narq wait` waits for.


use rusqlite::{params, OptionalExtension};

use super::{now_ms, repend_reached, PathList, Queue, Result};
use crate::nix::StorePath;

/// A root is recorded in the bucket again once it is this old (see `cache::roots`).
const ROOT_REFRESH_MS: i64 = 86_400_000;

impl Queue {
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
    pub fn roots_pending(&self, upto: Option<i64>, paths: Option<&PathList>) -> Result<u64> {
        match paths {
            Some(p) => self.conn.query_row(
                "SELECT COUNT(*) FROM roots WHERE recorded_at IS NULL AND path IN (SELECT value FROM json_each(?1))",
                [&p.0],
                |r| r.get(0),
            ),
            None => self.conn.query_row("SELECT COUNT(*) FROM roots WHERE recorded_at IS NULL AND seq <= ?1", [upto.unwrap_or(i64::MAX)], |r| r.get(0)),
        }
    }
}
