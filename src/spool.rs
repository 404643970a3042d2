//! The spool: requests the hook could not hand to the daemon, one file each, written
//! atomically (temp file, fsync, rename, fsync of the directory) so that a file is either
//! whole or absent. The daemon ingests them at start and while it runs, and removes each
//! only once its paths are in the durable queue.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

const SUFFIX: &str = ".req";

/// Writes `frame` (a whole protocol frame) into `dir`; returns the file's path.
///
/// The hook runs as root, the daemon often as its own user: the spool directory and each
/// file are given to the owner of the state dir (`dir`'s parent), so the daemon can read
/// and remove them.
pub fn write(dir: &Path, frame: &[u8]) -> io::Result<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let owner = dir.parent().and_then(|p| fs::metadata(p).ok()).map(|m| (m.uid(), m.gid()));
    if !dir.exists() {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        if let Some((uid, gid)) = owner {
            let _ = std::os::unix::fs::chown(dir, Some(uid), Some(gid));
        }
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let name = format!("{}.{:09}-{}", now.as_secs(), now.subsec_nanos(), std::process::id());
    let tmp = dir.join(format!(".{name}.tmp"));
    let dst = dir.join(format!("{name}{SUFFIX}"));
    let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
    if let Some((uid, gid)) = owner {
        let _ = std::os::unix::fs::fchown(&f, Some(uid), Some(gid));
    }
    f.write_all(frame)?;
    f.sync_all()?;
    fs::rename(&tmp, &dst)?;
    File::open(dir)?.sync_all()?;
    Ok(dst)
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

/// The reserve: a file of [`RESERVE_BYTES`] that the daemon keeps in the state dir while
/// there is room, and that the hook deletes when a spool write finds the disk full. Then the
/// request is spooled after all, and the daemon has room to ingest it into the queue once the
/// disk that something else filled has space again; no build made meanwhile is lost.
pub const RESERVE_NAME: &str = "reserve";
pub const RESERVE_BYTES: u64 = 4 << 20;

/// Creates the reserve in `state_dir` if it is missing and the disk has room for it and as
/// much again. Returns whether it was created now.
pub fn ensure_reserve(state_dir: &Path) -> io::Result<bool> {
    let path = state_dir.join(RESERVE_NAME);
    if fs::symlink_metadata(&path).is_ok() {
        return Ok(false);
    }
    if free_bytes(state_dir)? < 2 * RESERVE_BYTES {
        return Ok(false);
    }
    let tmp = state_dir.join(format!(".{RESERVE_NAME}.tmp"));
    let _ = fs::remove_file(&tmp);
    let f = OpenOptions::new().write(true).create_new(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(&tmp)?;
    // Allocated, not sparse: the point is the blocks it holds.
    // SAFETY: a valid fd and range.
    let r = unsafe { libc::posix_fallocate(std::os::fd::AsRawFd::as_raw_fd(&f), 0, RESERVE_BYTES as libc::off_t) };
    if r != 0 {
        let _ = fs::remove_file(&tmp);
        return Err(io::Error::from_raw_os_error(r));
    }
    f.sync_all()?;
    fs::rename(&tmp, &path)?;
    Ok(true)
}

/// Deletes the reserve (the hook, when the disk is full). Returns whether there was one.
pub fn release_reserve(state_dir: &Path) -> bool {
    fs::remove_file(state_dir.join(RESERVE_NAME)).is_ok()
}

/// Free bytes for an unprivileged writer on the file system of `dir`.
pub fn free_bytes(dir: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statvfs fills the struct it is given; `c` is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}
