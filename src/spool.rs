//! The spool: requests the hook could not hand to the daemon, one file each, written
//! atomically (temp file, fsync, rename, fsync of the directory) so that a file is either
//! whole or absent. The daemon ingests them at start and while it runs, and removes each
//! only once its paths are in the durable queue.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use crate::dirfd::Dir;

const SUFFIX: &str = ".req";

/// Writes `frame` (a whole protocol frame) into `dir`; returns the file's path.
///
/// The hook runs as root, the daemon often as its own user, who owns the state dir
/// (`dir`'s parent) and could plant a symlink or swap a directory in it: everything below
/// the state dir is reached by handle, never through a symlink (see [`crate::dirfd`]). The
/// spool directory and each file are given, by handle, to the state dir's owner, so the
/// daemon can read and remove them.
pub fn write(dir: &Path, frame: &[u8]) -> io::Result<PathBuf> {
    let (Some(state), Some(spool)) = (dir.parent(), dir.file_name().and_then(|n| n.to_str())) else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{} is not a spool directory", dir.display())));
    };
    // The state dir's own path is the configuration's: made if missing, as before.
    fs::DirBuilder::new().recursive(true).mode(0o700).create(state)?;
    let state = Dir::open(state)?;
    let (uid, gid) = state.owner()?;
    let spool = state.subdir(spool, Some(0o700))?;
    if spool.owner()? != (uid, gid) {
        // Fails unless we are root; as any other user we are the daemon's user, or cannot help it.
        let _ = spool.chown(uid, gid);
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let name = format!("{}.{:09}-{}", now.as_secs(), now.subsec_nanos(), std::process::id());
    let tmp = format!(".{name}.tmp");
    let dst = format!("{name}{SUFFIX}");
    let mut f = spool.create_file(&tmp, 0o600)?;
    let _ = std::os::unix::fs::fchown(&f, Some(uid), Some(gid));
    f.write_all(frame)?;
    f.sync_all()?;
    spool.rename(&tmp, &dst)?;
    spool.sync()?;
    Ok(dir.join(dst))
}

/// The spooled requests, oldest first.
pub fn list(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut v = match fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(SUFFIX) && !n.starts_with('.')))
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    v.sort();
    Ok(v)
}

/// Moves a request the daemon refused out of the way, keeping it for inspection.
pub fn reject(file: &Path) -> io::Result<PathBuf> {
    let dir = file.parent().unwrap_or(Path::new(".")).join("rejected");
    fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
    let dst = dir.join(file.file_name().unwrap_or_default());
    fs::rename(file, &dst)?;
    Ok(dst)
}
