//! `file://DIR`: a binary cache in a local directory, as `nix copy --to file://DIR` makes.
//! Every object is written to a temporary name, fsynced, renamed into place, and the
//! directory fsynced: a reader (or a crash) sees an object whole or not at all.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Body, BoxFuture, Target, TargetError};

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

fn put_sync(dir: &Path, key: &str, body: Body) -> Result<(), TargetError> {
    let dst = dir.join(key);
    let parent = dst.parent().unwrap_or(dir).to_path_buf();
    fs::create_dir_all(&parent).map_err(|e| io_err("creating", &parent, e))?;
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let base = dst.file_name().unwrap_or_default().to_string_lossy();
    let tmp = parent.join(format!(".{base}.{}-{n}.tmp", std::process::id()));
    match body {
        Body::Bytes(b) => {
            let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(0o644).open(&tmp)
                .map_err(|e| io_err("creating", &tmp, e))?;
            io::Write::write_all(&mut f, &b).map_err(|e| io_err("writing", &tmp, e))?;
            f.sync_all().map_err(|e| io_err("syncing", &tmp, e))?;
        }
        Body::File(src) => {
            // The uploader's temp file is on the state dir's file system; move it when the
            // cache is on the same one, copy it otherwise.
            if fs::rename(&src, &tmp).is_err() {
                fs::copy(&src, &tmp).map_err(|e| io_err("copying to", &tmp, e))?;
                let _ = fs::remove_file(&src);
            }
            let f = File::open(&tmp).map_err(|e| io_err("opening", &tmp, e))?;
            let _ = f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644));
            f.sync_all().map_err(|e| io_err("syncing", &tmp, e))?;
        }
    }
    fs::rename(&tmp, &dst).map_err(|e| io_err("renaming to", &dst, e))?;
    File::open(&parent).and_then(|d| d.sync_all()).map_err(|e| io_err("syncing", &parent, e))
}

impl Target for FileTarget {
    fn exists<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, TargetError>> {
        let path = self.dir.join(key);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || match fs::symlink_metadata(&path) {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
                Err(e) => Err(io_err("checking", &path, e)),
            })
            .await
            .map_err(|e| TargetError::transient(e.to_string()))?
        })
    }

    fn put<'a>(&'a self, key: &'a str, body: Body, _content_type: &'static str) -> BoxFuture<'a, Result<(), TargetError>> {
        let (dir, key) = (self.dir.clone(), key.to_string());
        // We own a file body: whatever happens, it is not left behind.
        let src = match &body {
            Body::File(f) => Some(f.clone()),
            Body::Bytes(_) => None,
        };
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let put = put_sync(&dir, &key, body);
                if let (Err(_), Some(src)) = (&put, src) {
                    let _ = fs::remove_file(src);
                }
                put
            })
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
