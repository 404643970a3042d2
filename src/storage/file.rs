//! `file://DIR`: a binary cache in a local directory, as `nix copy --to file://DIR` makes.
//! Every object is written with [`Dir::write_atomic`]: a reader (or a crash) sees an object
//! whole or not at all.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Body, BoxFuture, Target, TargetError};
use crate::dirfd::Dir;

pub struct FileTarget {
    dir: PathBuf,
}

/// Temp files untouched this long are left over from a writer that died (`kill -9`, power
/// loss): an object being written is touched every few seconds at most. Another daemon
/// writing to the same directory keeps its own temp files fresh.
const STALE_TEMP: Duration = Duration::from_secs(3600);

impl FileTarget {
    /// The target at `dir`; removes temp files that died writers left behind.
    pub fn open(dir: PathBuf) -> Self {
        let removed: usize = [dir.clone(), dir.join("nar"), dir.join("log")].iter().map(|d| remove_stale_temp_files(d, STALE_TEMP)).sum();
        if removed > 0 {
            tracing::info!(removed, "removed temp files left in {} by an interrupted writer", dir.display());
        }
        FileTarget { dir }
    }
}

/// Removes our temp files (`.NAME.PID-N.tmp`) in `dir` not modified for `age`; returns how many.
fn remove_stale_temp_files(dir: &Path, age: Duration) -> usize {
    // Not into a symlinked `nar/` or `log/`: those files are not ours.
    if !fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir()) {
        return 0;
    }
    let Ok(entries) = fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with('.') && name.ends_with(".tmp")
        })
        .filter(|e| e.metadata().and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().is_ok_and(|a| a >= age)))
        .filter(|e| fs::remove_file(e.path()).is_ok())
        .count()
}

fn io_err(what: &str, path: &Path, e: io::Error) -> TargetError {
    // Disk full or a permission fixed later may pass; retrying is the safe side.
    TargetError::transient(format!("{what} {}: {e}", path.display()))
}

/// The directory that holds `key` under `root`, and the object's name in it. Reached by
/// handle, component by component, never through a symlink: whoever may write in the cache
/// could otherwise point `nar/` (or a temp name) anywhere and have us write there.
fn open_parent<'k>(root: &Path, key: &'k str, create: bool) -> io::Result<(Dir, &'k str)> {
    if create {
        fs::create_dir_all(root)?;
    }
    let (parents, name) = key.rsplit_once('/').unwrap_or(("", key));
    let mut dir = Dir::open(root)?;
    for c in parents.split('/').filter(|c| !c.is_empty()) {
        dir = dir.subdir(c, create.then_some(0o755))?;
    }
    Ok((dir, name))
}

fn put_sync(dir: &Path, key: &str, body: Body) -> Result<(), TargetError> {
    let dst = dir.join(key);
    let (parent, name) = open_parent(dir, key, true).map_err(|e| io_err("opening the directory of", &dst, e))?;
    parent
        .write_atomic(name, |parent, tmp_name| match body {
            Body::Bytes(b) => {
                let mut f = parent.create_file(tmp_name, 0o644)?;
                io::Write::write_all(&mut f, &b)?;
                Ok(f)
            }
            Body::File(src) => {
                // The uploader's temp file is on the state dir's file system; move it when the
                // cache is on the same one, copy it otherwise (`src` removes it when dropped).
                if parent.rename_into(src.path(), tmp_name).is_ok() {
                    src.release();
                } else {
                    let mut from = File::open(src.path())?;
                    let mut to = parent.create_file(tmp_name, 0o644)?;
                    io::copy(&mut from, &mut to)?;
                }
                let f = parent.open_file(tmp_name)?;
                let _ = f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644));
                Ok(f)
            }
        })
        .map_err(|e| io_err("writing", &dst, e))
}

impl Target for FileTarget {
    fn exists<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, TargetError>> {
        let path = self.dir.join(key);
        Box::pin(async move {
            let (dir, key) = (self.dir.clone(), key.to_string());
            tokio::task::spawn_blocking(move || match open_parent(&dir, &key, false).and_then(|(d, name)| d.stat(name)) {
                Ok(found) => Ok(found.is_some()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
                Err(e) => Err(io_err("checking", &path, e)),
            })
            .await
            .map_err(|e| TargetError::transient(e.to_string()))?
        })
    }

    fn put<'a>(&'a self, key: &'a str, body: Body, _content_type: &'static str) -> BoxFuture<'a, Result<(), TargetError>> {
        let (dir, key) = (self.dir.clone(), key.to_string());
        Box::pin(async move {
            tokio::task::spawn_blocking(move || put_sync(&dir, &key, body))
                .await
                .map_err(|e| TargetError::transient(e.to_string()))?
        })
    }

    fn describe(&self) -> String {
        format!("file://{}", self.dir.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    #[test]
    fn only_stale_temp_files_are_removed() {
        let dir = std::env::temp_dir().join(format!("narq-stale-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let old = SystemTime::now() - Duration::from_secs(7200);
        for (name, stale) in [(".x.nar.1-0.tmp", true), (".y.narinfo.2-0.tmp", false), ("x.narinfo", true), (".hidden", true)] {
            let f = File::create(dir.join(name)).unwrap();
            if stale {
                f.set_modified(old).unwrap();
            }
        }
        assert_eq!(remove_stale_temp_files(&dir, STALE_TEMP), 1);
        let mut left: Vec<String> = fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
        left.sort();
        assert_eq!(left, [".hidden", ".y.narinfo.2-0.tmp", "x.narinfo"]);
        fs::remove_dir_all(&dir).unwrap();
    }
}
