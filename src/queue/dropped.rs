//! Failures that are no upload: builds the hook could not hand over (`dropped` items,
//! failed from the start) and problems that are not about one path, kept for `narq status`
//! and `narq wait` to report.


use rusqlite::params;

use super::{now_ms, Queue, Result, DROPPED};
use crate::nix::StorePath;
use crate::protocol::DroppedBuild;

impl Queue {
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
}
