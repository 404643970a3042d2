//! What a scan remembers between runs: the text of every narinfo it read, keyed by object
//! key and stamped with what the listing says of the object (ETag, else size and mtime), so
//! that the next scan fetches only narinfos that are new or changed; and what a check of
//! that version found (a verdict, e.g. the signatures valid by a set of trusted keys), so
//! that the next `verify` need not check it again. One SQLite file per cache (rusqlite is
//! already linked for the queue); losing it costs one cold scan.
//!
//! It is queried a key at a time, never loaded: a scan's memory does not grow with it.

use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension};

use crate::storage::Object;

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS narinfo (key TEXT PRIMARY KEY, stamp TEXT NOT NULL, body TEXT NOT NULL, verdict TEXT);";
/// `PRAGMA user_version` of the schema above; 0 was a table without `verdict`.
const VERSION: i64 = 2;
/// SQLite's page cache, in KiB: small and bounded, whatever the size of the file (the
/// kernel's page cache holds the rest).
const CACHE_KIB: i64 = 4 << 10;

/// What identifies one version of an object: its ETag (S3; inode and ctime on `file://`, where
/// size and mtime can be set back by a copy), else its size and modification time in
/// nanoseconds. `None` when the listing gives neither: such an object is always fetched.
pub fn stamp(o: &Object) -> Option<String> {
    if let Some(e) = &o.etag {
        return Some(format!("etag:{e}:{}", o.size));
    }
    let t = o.last_modified?.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    Some(format!("stat:{}:{}", o.size, t.as_nanos()))
}

/// Puts the database in WAL mode. SQLite answers `journal_mode=wal` on a database that
/// another process is creating at the same moment with "database is locked" at once, without
/// the busy handler (two `narq` commands on one state dir, the first time): so the mode is
/// read first, and the switch retried for up to 10 s.
fn wal(conn: &Connection) -> rusqlite::Result<()> {
    let start = std::time::Instant::now();
    loop {
        let r = conn.pragma_query_value(None, "journal_mode", |r| r.get::<_, String>(0)).and_then(|mode| match mode.eq_ignore_ascii_case("wal") {
            true => Ok(()),
            false => conn.pragma_update(None, "journal_mode", "wal"),
        });
        match r {
            Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::DatabaseBusy && start.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(10))
            }
            r => return r,
        }
    }
}

/// What the index holds of one narinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub stamp: String,
    pub body: String,
    pub verdict: Option<String>,
}

pub struct Index {
    conn: Connection,
}

impl Index {
    /// Opens (creating) the index at `path`; its parent directory is created too. `:memory:`
    /// (no writable state dir) is a temporary file SQLite deletes when it is closed: in
    /// memory, the bodies of a whole cache's narinfos would be.
    pub fn open(path: &Path) -> rusqlite::Result<Index> {
        let path = if path == Path::new(":memory:") { Path::new("") } else { path };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // An error here shows up as SQLite's own when it opens the file.
            let _ = std::fs::create_dir_all(dir);
        }
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        wal(&conn)?;
        // A lost write costs a refetch, not correctness: no fsync per transaction.
        conn.pragma_update(None, "synchronous", "normal")?;
        conn.pragma_update(None, "cache_size", -CACHE_KIB)?;
        conn.execute_batch(SCHEMA)?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version < VERSION {
            // A table of an older narq keeps its bodies; it gains the verdicts.
            let has_verdict = conn.prepare("SELECT verdict FROM narinfo LIMIT 0").is_ok();
            if !has_verdict {
                conn.execute_batch("ALTER TABLE narinfo ADD COLUMN verdict TEXT")?;
            }
            conn.pragma_update(None, "user_version", VERSION)?;
        }
        Ok(Index { conn })
    }

    /// How many narinfos it holds.
    pub fn len(&self) -> rusqlite::Result<u64> {
        self.conn.query_row("SELECT count(*) FROM narinfo", [], |r| r.get(0))
    }

    pub fn is_empty(&self) -> rusqlite::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// What it holds of `key`.
    pub fn get(&self, key: &str) -> rusqlite::Result<Option<Row>> {
        let mut st = self.conn.prepare_cached("SELECT stamp, body, verdict FROM narinfo WHERE key = ?1")?;
        st.query_row([key], |r| Ok(Row { stamp: r.get(0)?, body: r.get(1)?, verdict: r.get(2)? })).optional()
    }

    /// Records `rows` (key, row), in one transaction.
    pub fn put(&mut self, rows: &[(String, Row)]) -> rusqlite::Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut put = tx.prepare_cached("INSERT OR REPLACE INTO narinfo (key, stamp, body, verdict) VALUES (?1, ?2, ?3, ?4)")?;
            for (k, r) in rows {
                put.execute(params![k, r.stamp, r.body, r.verdict])?;
            }
        }
        tx.commit()
    }

    /// Sets the verdicts of `rows` (key, stamp it is for, verdict) whose stamp is still the
    /// one held, in one transaction.
    pub fn set_verdicts(&mut self, rows: &[(String, String, String)]) -> rusqlite::Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut set = tx.prepare_cached("UPDATE narinfo SET verdict = ?3 WHERE key = ?1 AND stamp = ?2")?;
            for (k, s, v) in rows {
                set.execute(params![k, s, v])?;
            }
        }
        tx.commit()
    }

    /// Forgets every key in `[from, to)` (`to` `None`: to the end) that `keep` refuses;
    /// returns how many. The keys are read in order, a few at a time.
    pub fn prune(&mut self, from: &str, to: Option<&str>, keep: &mut dyn FnMut(&str) -> bool) -> rusqlite::Result<u64> {
        let mut gone = Vec::new();
        {
            let mut st = self.conn.prepare("SELECT key FROM narinfo WHERE key >= ?1 AND (?2 IS NULL OR key < ?2) ORDER BY key")?;
            let mut rows = st.query(params![from, to])?;
            while let Some(r) = rows.next()? {
                let k: String = r.get(0)?;
                if !keep(&k) {
                    gone.push(k);
                }
            }
        }
        let tx = self.conn.transaction()?;
        {
            let mut del = tx.prepare_cached("DELETE FROM narinfo WHERE key = ?1")?;
            for k in &gone {
                del.execute([k])?;
            }
        }
        tx.commit()?;
        Ok(gone.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_change_with_the_object() {
        let t = UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789);
        let o = Object { key: "a.narinfo".into(), size: 10, last_modified: Some(t), etag: None };
        assert_eq!(stamp(&o).as_deref(), Some("stat:10:1700000000123456789"));
        let later = Object { last_modified: Some(t + Duration::from_nanos(1)), ..o.clone() };
        assert_ne!(stamp(&o), stamp(&later));
        let s3 = Object { etag: Some("\"abc\"".into()), ..o.clone() };
        assert_eq!(stamp(&s3).as_deref(), Some("etag:\"abc\":10"));
        assert_eq!(stamp(&Object { last_modified: None, ..o }), None);
    }

    fn row(stamp: &str, body: &str) -> Row {
        Row { stamp: stamp.into(), body: body.into(), verdict: None }
    }

    #[test]
    fn remembers_verdicts_and_forgets() {
        let dir = std::env::temp_dir().join(format!("narq-index-{}", std::process::id()));
        let path = dir.join("sub/index.sqlite");
        let mut ix = Index::open(&path).unwrap();
        ix.put(&[("a".into(), row("s1", "A")), ("b".into(), row("s2", "B")), ("c".into(), row("s3", "C"))]).unwrap();
        drop(ix);
        let mut ix = Index::open(&path).unwrap();
        assert_eq!(ix.get("a").unwrap(), Some(row("s1", "A")));
        // A verdict is for one version: a stale stamp sets nothing.
        ix.set_verdicts(&[("a".into(), "s1".into(), "k:1".into()), ("b".into(), "old".into(), "k:1".into())]).unwrap();
        assert_eq!(ix.get("a").unwrap().unwrap().verdict.as_deref(), Some("k:1"));
        assert_eq!(ix.get("b").unwrap().unwrap().verdict, None);
        ix.put(&[("a".into(), row("s4", "A2"))]).unwrap();
        assert_eq!(ix.get("a").unwrap(), Some(row("s4", "A2")), "a new version forgets the verdict");
        assert_eq!(ix.prune("b", Some("c"), &mut |k| k != "b").unwrap(), 1);
        assert_eq!(ix.prune("", None, &mut |_| true).unwrap(), 0);
        assert_eq!((ix.len().unwrap(), ix.get("b").unwrap()), (2, None));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Without a state dir, a temporary index on disk: it works, and is gone once closed.
    #[test]
    fn a_temporary_index_works() {
        let mut ix = Index::open(Path::new(":memory:")).unwrap();
        ix.put(&[("a".into(), row("s1", "A"))]).unwrap();
        assert_eq!((ix.get("a").unwrap(), ix.len().unwrap()), (Some(row("s1", "A")), 1));
        assert_eq!(Index::open(Path::new(":memory:")).unwrap().len().unwrap(), 0);
    }

    /// An index of an older narq (no verdicts) keeps what it holds.
    #[test]
    fn an_older_index_keeps_its_bodies() {
        let dir = std::env::temp_dir().join(format!("narq-index-old-{}", std::process::id()));
        let path = dir.join("index.sqlite");
        std::fs::create_dir_all(&dir).unwrap();
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE narinfo (key TEXT PRIMARY KEY, stamp TEXT NOT NULL, body TEXT NOT NULL); INSERT INTO narinfo VALUES ('a', 's', 'A');").unwrap();
        drop(conn);
        assert_eq!(Index::open(&path).unwrap().get("a").unwrap(), Some(row("s", "A")));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
