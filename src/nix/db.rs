//! A read-only view of the local Nix database (`/nix/var/nix/db/db.sqlite`).
//!
//! # Why read SQLite directly
//! The hook runs after every build and must finish in about a millisecond. Asking
//! `nix path-info --json` costs 50–100 ms (Nix's evaluator and store start-up); the
//! database holds everything we need (`ValidPaths`: hash, narSize, deriver, sigs, ca;
//! `Refs`: references) and one recursive query returns a whole closure.
//!
//! The database is opened read-only (`SQLITE_OPEN_READ_ONLY`) with a busy timeout. Nix keeps
//! it in WAL mode, so readers see a consistent snapshot and never block Nix's writers, which
//! keeps this correct while builds run. Opening a WAL database needs write access to its
//! `-shm` file, which root (the hook under nix-daemon) has.
//!
//! Schema: `ValidPaths(id, path, hash, registrationTime, deriver, narSize, ultimate, sigs,
//! ca)` and `Refs(referrer, reference)`, unchanged since Nix 2.0 (schema version 10) up to
//! the 2.3x releases; `hash` is `sha256:<base16>`. Tested against Debian's Nix 2.8.
//! With the CA schema (Nix 2.4+), `Realisations(id, drvPath, outputName, outputPath,
//! signatures)` and `RealisationsRefs(referrer, realisationReference)`: `drvPath` is the
//! derivation's hash modulo (`sha256:<base16>`), `outputPath` a `ValidPaths.id`.

use rusqlite::{Connection, OpenFlags, OptionalExtension};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

use super::hash::Sha256;
use super::path_info::PathInfo;
use super::realisation::Realisation;
use super::store_path::StorePath;

#[derive(Debug, Error)]
pub enum DbError {
    #[error("Nix database {}: {}", .0.display(), one_line(.1))]
    Sqlite(PathBuf, rusqlite::Error),
    #[error("{0} is not a valid path in the local Nix store")]
    NotValid(StorePath),
    #[error("Nix database row for {0}: {1}")]
    BadRow(String, String),
}

/// An SQLite error without the SQL text that rusqlite appends to some (several lines that
/// would reach the user's terminal through the hook).
fn one_line(e: &rusqlite::Error) -> String {
    let msg = match e {
        rusqlite::Error::SqlInputError { msg, .. } => msg.clone(),
        e => e.to_string(),
    };
    msg.lines().next().unwrap_or_default().to_string()
}

/// `$NIX_STATE_DIR` (default `/nix/var/nix`), as Nix itself reads it.
pub fn nix_state_dir() -> PathBuf {
    std::env::var_os("NIX_STATE_DIR").map_or_else(|| PathBuf::from("/nix/var/nix"), PathBuf::from)
}

/// Where Nix keeps the build log of `drv`, if it kept one (`$NIX_LOG_DIR`, default
/// `/nix/var/log/nix`; `drvs/<2 chars>/<rest>[.bz2]`).
pub fn build_log_path(drv: &StorePath) -> Option<PathBuf> {
    let dir = std::env::var_os("NIX_LOG_DIR").map_or_else(|| PathBuf::from("/nix/var/log/nix"), PathBuf::from);
    let base = drv.base_name();
    let stem = dir.join("drvs").join(&base[..2]).join(&base[2..]);
    [stem.with_extension("drv.bz2"), stem]
        .into_iter()
        .find(|p| p.exists())
}

pub struct NixDb {
    conn: Connection,
    path: PathBuf,
}

impl NixDb {
    pub fn open_default() -> Result<Self, DbError> {
        Self::open(&nix_state_dir().join("db/db.sqlite"))
    }

    pub fn open(path: &Path) -> Result<Self, DbError> {
        let err = |e| DbError::Sqlite(path.to_path_buf(), e);
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(err)?;
        conn.busy_timeout(Duration::from_secs(2)).map_err(err)?;
        Ok(NixDb { conn, path: path.to_path_buf() })
    }

    /// The closure of `roots` if it holds fewer than `limit` paths, else `None`; cheap for a
    /// closure of any size: the direct references are counted first (a recursive query would
    /// gather every reference of a path that has thousands before its limit applies).
    pub fn closure_below(&self, roots: &[StorePath], limit: usize) -> Result<Option<Vec<PathInfo>>, DbError> {
        let err = |e| DbError::Sqlite(self.path.clone(), e);
        let placeholders = vec!["?"; roots.len()].join(",");
        let direct = format!(
            "SELECT count(*) FROM (SELECT 1 FROM Refs WHERE referrer IN (SELECT id FROM ValidPaths WHERE path IN ({placeholders})) LIMIT {limit})"
        );
        let names: Vec<String> = roots.iter().map(|r| r.to_string()).collect();
        let n: i64 = self.conn.prepare_cached(&direct).and_then(|mut st| st.query_row(rusqlite::params_from_iter(names.iter()), |r| r.get(0))).map_err(err)?;
        if n as usize + roots.len() > limit {
            return Ok(None);
        }
        let c = self.select(roots, true, Some(limit))?;
        Ok((c.len() < limit).then_some(c))
    }

    /// Path info for `roots` and, with `closure`, everything they reference transitively.
    /// Every root must be valid. The result is sorted by path.
    pub fn query(&self, roots: &[StorePath], closure: bool) -> Result<Vec<PathInfo>, DbError> {
        self.select(roots, closure, None)
    }

    /// The NarHash of each of `paths`, in order, without their references (a path may have
    /// 100,000). Every path must be valid.
    pub fn nar_hashes(&self, paths: &[StorePath]) -> Result<Vec<Sha256>, DbError> {
        let err = |e| DbError::Sqlite(self.path.clone(), e);
        let mut stmt = self.conn.prepare_cached("SELECT hash FROM ValidPaths WHERE path = ?1").map_err(err)?;
        paths
            .iter()
            .map(|p| {
                let hash: Option<String> = stmt.query_row([p.to_string()], |r| r.get(0)).optional().map_err(err)?;
                let hash = hash.ok_or_else(|| DbError::NotValid(p.clone()))?;
                Sha256::parse(&hash).map_err(|e| DbError::BadRow(p.to_string(), e.to_string()))
            })
            .collect()
    }

    /// [`NixDb::query`], of at most `limit` paths of the closure when given.
    fn select(&self, roots: &[StorePath], closure: bool, limit: Option<usize>) -> Result<Vec<PathInfo>, DbError> {
        if roots.is_empty() {
            return Ok(Vec::new());
        }
        let err = |e| DbError::Sqlite(self.path.clone(), e);
        let placeholders = vec!["?"; roots.len()].join(",");
        let recurse = if closure {
            "UNION SELECT r.reference FROM Refs r JOIN c ON r.referrer = c.id"
        } else {
            ""
        };
        let limit = limit.map(|n| format!("LIMIT {n}")).unwrap_or_default();
        let sql = format!(
            "WITH RECURSIVE c(id) AS (SELECT id FROM ValidPaths WHERE path IN ({placeholders}) {recurse} {limit})
             SELECT v.path, v.hash, v.narSize, v.deriver, v.sigs, v.ca,
                    (SELECT group_concat(p.path, ' ') FROM Refs r CROSS JOIN ValidPaths p ON p.id = r.reference
                     WHERE r.referrer = v.id)
             FROM c CROSS JOIN ValidPaths v ON v.id = c.id"
        );
        // CROSS JOIN fixes the join order (closure first, then its rows by primary key):
        // without statistics the planner may otherwise scan ValidPaths.
        let mut stmt = self.conn.prepare_cached(&sql).map_err(err)?;
        let names: Vec<String> = roots.iter().map(|r| r.to_string()).collect();
        let rows = stmt
            .query_map(rusqlite::params_from_iter(names.iter()), |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, Option<i64>>(2)?,
                    row.get::<_, Option<String>>(3)?,
                    row.get::<_, Option<String>>(4)?,
                    row.get::<_, Option<String>>(5)?,
                    row.get::<_, Option<String>>(6)?,
                ))
            })
            .map_err(err)?;
        let mut out = Vec::new();
        for row in rows {
            let (path, hash, size, deriver, sigs, ca, refs) = row.map_err(err)?;
            let bad = |why: String| DbError::BadRow(path.clone(), why);
            let sp = |s: &str| StorePath::parse(s).map_err(|e| bad(e.to_string()));
            out.push(PathInfo {
                path: sp(&path)?,
                nar_hash: Sha256::parse(&hash).map_err(|e| bad(e.to_string()))?,
                nar_size: size.and_then(|s| u64::try_from(s).ok()).filter(|&s| s > 0).ok_or_else(|| bad("no narSize".into()))?,
                references: refs.as_deref().unwrap_or("").split(' ').filter(|s| !s.is_empty()).map(sp).collect::<Result<BTreeSet<_>, _>>()?,
                deriver: deriver.as_deref().filter(|d| !d.is_empty()).map(sp).transpose()?,
                sigs: sigs.as_deref().unwrap_or("").split(' ').filter(|s| !s.is_empty()).map(str::to_string).collect(),
                ca: ca.filter(|c| !c.is_empty()),
            });
        }
        out.sort_unstable_by(|a, b| a.path.cmp(&b.path));
        if let Some(missing) = roots.iter().find(|r| out.binary_search_by(|i| i.path.cmp(r)).is_err()) {
            return Err(DbError::NotValid(missing.clone()));
        }
        Ok(out)
    }

    /// The realisations Nix recorded (with `ca-derivations`) for the paths `outputs`, or,
    /// when `outputs` is empty, for the outputs whose deriver is `drv`: a content-addressed
    /// derivation's `.drv` names no output paths, and Nix 2.8 passes no `OUT_PATHS`. None
    /// when the database has no `Realisations` table (no CA schema).
    pub fn realisations(&self, outputs: &[StorePath], drv: Option<&StorePath>) -> Result<Vec<Realisation>, DbError> {
        let err = |e| DbError::Sqlite(self.path.clone(), e);
        let has_table: bool = self
            .conn
            .query_row("SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'Realisations')", [], |r| r.get(0))
            .map_err(err)?;
        let select = "SELECT r.id, r.drvPath, r.outputName, v.path, r.signatures";
        let (sql, args): (String, Vec<String>) = match (outputs, drv) {
            _ if !has_table => return Ok(Vec::new()),
            ([], None) => return Ok(Vec::new()),
            // No index on `deriver`: this scans Realisations, which only builds with `ca-derivations` fill.
            ([], Some(d)) => (
                format!("{select} FROM Realisations r CROSS JOIN ValidPaths v ON v.id = r.outputPath WHERE v.deriver = ?"),
                vec![d.to_string()],
            ),
            // By path: ValidPaths' unique index, then IndexRealisationsRefsOnOutputPath.
            (outs, _) => (
                format!(
                    "{select} FROM ValidPaths v CROSS JOIN Realisations r ON r.outputPath = v.id WHERE v.path IN ({})",
                    vec!["?"; outs.len()].join(",")
                ),
                outs.iter().map(ToString::to_string).collect(),
            ),
        };
        let mut stmt = self.conn.prepare(&sql).map_err(err)?;
        let rows = stmt
            .query_map(rusqlite::params_from_iter(args.iter()), |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, String>(3)?, r.get::<_, Option<String>>(4)?))
            })
            .map_err(err)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(err)?;
        let mut deps = self
            .conn
            .prepare(
                "SELECT d.drvPath, d.outputName, v.path FROM RealisationsRefs rr CROSS JOIN Realisations d ON d.id = rr.realisationReference
                 CROSS JOIN ValidPaths v ON v.id = d.outputPath WHERE rr.referrer = ?1",
            )
            .map_err(err)?;
        let mut out = Vec::new();
        for (rowid, hash, output, path, sigs) in rows {
            let id = format!("{hash}!{output}");
            let bad = |why: String| DbError::BadRow(format!("realisation {id}"), why);
            let sp = |s: &str| StorePath::parse(s).map_err(|e| bad(e.to_string()));
            let mut dependent_realisations = std::collections::BTreeMap::new();
            let dep_rows = deps
                .query_map([rowid], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?)))
                .map_err(err)?;
            for d in dep_rows {
                let (h, o, p) = d.map_err(err)?;
                dependent_realisations.insert(format!("{h}!{o}"), sp(&p)?);
            }
            out.push(Realisation {
                out_path: sp(&path)?,
                signatures: sigs.as_deref().unwrap_or("").split(' ').filter(|s| !s.is_empty()).map(str::to_string).collect(),
                dependent_realisations,
                build_trace: None,
                id,
            });
        }
        out.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }
}
