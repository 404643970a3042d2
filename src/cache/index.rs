//! What a scan remembers between runs: the text of every narinfo it read, keyed by object
//! key and stamped with what the listing says of the object (ETag, else size and mtime), so
//! that the next scan fetches only narinfos that are new or changed. One SQLite file per
//! cache (rusqlite is already linked for the queue); losing it costs one cold scan.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use rusqlite::{params, Connection};

use crate::storage::Object;

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS narinfo (key TEXT PRIMARY KEY, stamp TEXT NOT NULL, body TEXT NOT NULL);";

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

pub struct Index {
    conn: Connection,
}

impl Index {
    /// Opens (creating) the index at `path`; its parent directory is created too.
    pub fn open(path: &Path) -> rusqlite::Result<Index> {
        if let Some(dir) = path.parent() {
            // An error here shows up as SQLite's own when it opens the file.
            let _ = std::fs::create_dir_all(dir);
        }
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        wal(&conn)?;
        // A lost write costs a refetch, not correctness: no fsync per transaction.
        conn.pragma_update(None, "synchronous", "normal")?;
        conn.execute_batch(SCHEMA)?;
        Ok(Index { conn })
    }

    /// Every remembered narinfo: key → (stamp, body).
    pub fn load(&self) -> rusqlite::Result<HashMap<String, (String, String)>> {
        let mut st = self.conn.prepare("SELECT key, stamp, body FROM narinfo")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, (r.get::<_, String>(1)?, r.get::<_, String>(2)?))))?;
        rows.collect()
    }

    /// Records `fresh` (key, stamp, body) and forgets the keys in `gone`, in one transaction.
    pub fn update(&mut self, fresh: &[(String, String, String)], gone: &[String]) -> rusqlite::Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut put = tx.prepare("INSERT OR REPLACE INTO narinfo (key, stamp, body) VALUES (?1, ?2, ?3)")?;
            for (k, s, b) in fresh {
                put.execute(params![k, s, b])?;
            }
            let mut del = tx.prepare("DELETE FROM narinfo WHERE key = ?1")?;
            for k in gone {
                del.execute([k])?;
            }
        }
        tx.commit()
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

    #[test]
    fn remembers_and_forgets() {
        let dir = std::env::temp_dir().join(format!("narq-index-{}", std::process::id()));
        let path = dir.join("sub/index.sqlite");
        let mut ix = Index::open(&path).unwrap();
        ix.update(&[("a".into(), "s1".into(), "A".into()), ("b".into(), "s2".into(), "B".into())], &[]).unwrap();
        drop(ix);
        let mut ix = Index::open(&path).unwrap();
        assert_eq!(ix.load().unwrap().get("a"), Some(&("s1".to_string(), "A".to_string())));
        ix.update(&[("a".into(), "s3".into(), "A2".into())], &["b".into()]).unwrap();
        let all = ix.load().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all["a"], ("s3".to_string(), "A2".to_string()));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
