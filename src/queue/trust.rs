//! How far `done` is trusted (see "What done is worth" in the [queue](super) doc): tied to
//! the cache it was uploaded to, forgotten for paths to check again or repair, and made
//! `stale` when a collection may have deleted paths.


use rusqlite::params;

use super::{repend_reached, set_meta, Queue, Result, REPEND};
use crate::nix::StorePath;

impl Queue {
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
            &format!("{REPEND} AND +kind = 'nar' AND key IN (SELECT value FROM json_each(?2))"),
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
}
