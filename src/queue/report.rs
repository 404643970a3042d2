//! What `narq status` and `narq wait` report: counts, progress, failures (root causes
//! first), and the checkpoint a wait answers from.


use rusqlite::params;

use super::{display_key, now_ms, PathList, Queue, Result, DROPPED};
use crate::protocol::{Failure, Status, WaitSummary};

/// `ORDER BY` term that puts failures of their own before those of their dependents.
const ROOT_CAUSES_FIRST: &str = "(COALESCE(last_error, '') LIKE 'depends on %')";

fn failure(r: &rusqlite::Row) -> rusqlite::Result<Failure> {
    Ok(Failure { item: display_key(&r.get::<_, String>(0)?), error: r.get(1)? })
}

impl Queue {
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
    /// not hold at all. Counted first, without reading a row: only failures are read.
    pub fn progress_of(&self, paths: &PathList) -> Result<(u64, Vec<Failure>)> {
        let (pending, failed, unknown): (u64, u64, u64) = self.conn.prepare_cached(
            "SELECT COALESCE(SUM(i.state = 'pending'), 0) + COALESCE(SUM(d.state = 'pending'), 0),
                    COALESCE(SUM(i.state = 'failed'), 0) + COALESCE(SUM(d.state = 'failed'), 0),
                    COALESCE(SUM(i.key IS NULL), 0)
             FROM json_each(?1) j LEFT JOIN items i ON i.key = j.value LEFT JOIN items d ON d.key = ?2 || j.value",
        )?.query_row(params![paths.0, DROPPED], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        let mut out = Vec::new();
        if failed > 0 {
            let mut stmt = self.conn.prepare_cached(&format!(
                "SELECT i.key, COALESCE(i.last_error, '') FROM json_each(?1) j CROSS JOIN items i ON i.key IN (j.value, ?2 || j.value)
                 WHERE i.state = 'failed' ORDER BY {ROOT_CAUSES_FIRST}, i.key"
            ))?;
            out = stmt.query_map(params![paths.0, DROPPED], failure)?.collect::<Result<_>>()?;
        }
        if unknown > 0 {
            let mut stmt = self.conn.prepare_cached("SELECT j.value FROM json_each(?1) j WHERE NOT EXISTS (SELECT 1 FROM items WHERE key = j.value)")?;
            for key in stmt.query_map([&paths.0], |r| r.get::<_, String>(0))? {
                out.push(Failure { item: key?, error: "not in the queue (was it pushed?)".into() });
            }
        }
        Ok((pending, out))
    }

    /// Counts for `narq status` (in-flight and spool counts are the daemon's to fill in):
    /// what is pending and failed now, and what was uploaded, skipped and written since the
    /// queue was made (the counters, which never go down).
    pub fn status(&self) -> Result<Status> {
        let mut s = Status::default();
        // A build log is not a store path. From `items_sizes` alone.
        let mut stmt = self.conn.prepare_cached(
            "SELECT kind, state, COUNT(*), SUM(CASE WHEN kind = 'nar' AND state = 'pending' THEN size END)
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
    pub fn wait_summary(&self, upto: i64, since: i64, paths: Option<&PathList>) -> Result<WaitSummary> {
        let select = |scope: &str| format!("SELECT kind, state, outcome = 'uploaded', COUNT(*), COALESCE(SUM(bytes), 0) FROM items WHERE {scope} GROUP BY 1, 2, 3");
        let row = |r: &rusqlite::Row| -> rusqlite::Result<(String, String, bool, u64, i64)> {
            Ok((r.get(0)?, r.get(1)?, r.get::<_, Option<bool>>(2)?.unwrap_or(false), r.get(3)?, r.get(4)?))
        };
        let rows = match paths {
            Some(p) => {
                let mut stmt = self.conn.prepare_cached(&select("key IN (SELECT value FROM json_each(?1) UNION ALL SELECT ?2 || value FROM json_each(?1))"))?;
                let rows = stmt.query_map(params![p.0, DROPPED], row)?.collect::<Result<Vec<_>>>()?;
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
