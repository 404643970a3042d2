//! The spool: requests the hook could not hand to the daemon, one file each, written
//! atomically ([`Dir::write_atomic`]) so that a file is either whole or absent. The daemon ingests them at start and while it runs, and removes each
//! only once its paths are in the durable queue.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};


use crate::dirfd::Dir;

const SUFFIX: &str = ".req";
/// A temp file this old was left by a write that failed (a full disk, a killed hook): no
/// write takes this long.
const STALE_TMP: Duration = Duration::from_secs(3600);
/// `rejected/` keeps the newest this many files, none older than [`REJECTED_AGE`].
const REJECTED_MAX: usize = 100;
const REJECTED_AGE: Duration = Duration::from_secs(30 * 86400);

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
    let dst = format!("{name}{SUFFIX}");
    spool.write_atomic(&dst, |spool, tmp| {
        let mut f = spool.create_file(tmp, 0o600)?;
        let _ = std::os::unix::fs::fchown(&f, Some(uid), Some(gid));
        f.write_all(frame)?;
        Ok(f)
    })?;
    Ok(dir.join(dst))
}

fn is_request(name: &str) -> bool {
    name.ends_with(SUFFIX) && !name.starts_with('.')
}

/// The spooled requests, oldest first: regular files only (a FIFO or a symlink named like
/// a request is not one; [`tidy`] moves them away).
pub fn list(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut v = match fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()) && e.file_name().to_str().is_some_and(is_request))
            .map(|e| e.path())
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    v.sort();
    Ok(v)
}

/// Opens a spooled request for reading without ever blocking or following a link
/// (`O_NONBLOCK | O_NOFOLLOW`): whatever sits in the spool, reading it cannot stall the
/// daemon. Anything but a regular file is an `InvalidData` error. Its size is not bounded
/// here: a large closure is spooled as many requests in one file, which are read one frame at
/// a time, each refused past [`MAX_FRAME`](crate::protocol::MAX_FRAME).
pub fn open(file: &Path) -> io::Result<File> {
    let f = OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW).open(file).map_err(|e| {
        match e.raw_os_error() {
            Some(libc::ELOOP) => io::Error::new(io::ErrorKind::InvalidData, "a symbolic link, not a request"),
            _ => e,
        }
    })?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("not a regular file ({:?})", meta.file_type())));
    }
    Ok(f)
}

/// Clears what ingestion would otherwise trip over or keep forever: removes temp files
/// older than [`STALE_TMP`], and moves entries named like a request that are not regular
/// files (a FIFO, a symlink, a directory) to `rejected/`. Returns one line per thing done,
/// for the daemon to log.
pub fn tidy(dir: &Path) -> io::Result<Vec<String>> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let now = SystemTime::now();
    let mut done = Vec::new();
    for e in rd.filter_map(|e| e.ok()) {
        let (Some(name), Ok(meta)) = (e.file_name().to_str().map(str::to_string), e.metadata()) else { continue };
        let path = e.path();
        if name.starts_with('.') && name.ends_with(".tmp") && meta.is_file() {
            let age = meta.modified().ok().and_then(|m| now.duration_since(m).ok()).unwrap_or_default();
            if age > STALE_TMP {
                match fs::remove_file(&path) {
                    Ok(()) => done.push(format!("removed {}, left {} min ago by a spool write that failed", path.display(), age.as_secs() / 60)),
                    Err(e) => done.push(format!("could not remove the stale temp file {}: {e}", path.display())),
                }
            }
        } else if is_request(&name) && !meta.is_file() {
            match reject(&path) {
                Ok(to) => done.push(format!("moved {} to {}: not a regular file ({:?})", path.display(), to.display(), meta.file_type())),
                Err(e) => done.push(format!("{} is not a regular file ({:?}) and could not be moved: {e}", path.display(), meta.file_type())),
            }
        }
    }
    Ok(done)
}

/// Moves a request the daemon refused out of the way, keeping it for inspection, and
/// trims `rejected/` to the newest [`REJECTED_MAX`] files none older than [`REJECTED_AGE`].
pub fn reject(file: &Path) -> io::Result<PathBuf> {
    let dir = file.parent().unwrap_or(Path::new(".")).join("rejected");
    fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
    let dst = dir.join(file.file_name().unwrap_or_default());
    fs::rename(file, &dst)?;
    // Its age in rejected/ counts from now, not from when it was spooled.
    touch(&dst);
    trim_rejected(&dir);
    Ok(dst)
}

/// Sets the modification time of `p` (not following a link) to now.
fn touch(p: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_bytes()) else { return };
    // SAFETY: a valid C string; a null `times` means "now".
    unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), std::ptr::null(), libc::AT_SYMLINK_NOFOLLOW) };
}

/// Best effort: what cannot be removed now is tried again at the next refusal.
fn trim_rejected(dir: &Path) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    let now = SystemTime::now();
    let mut files: Vec<(SystemTime, PathBuf, bool)> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| e.metadata().ok().map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), e.path(), m.is_dir())))
        .collect();
    files.sort_by(|a, b| b.0.cmp(&a.0));
    for (i, (modified, path, is_dir)) in files.iter().enumerate() {
        if i >= REJECTED_MAX || now.duration_since(*modified).unwrap_or_default() > REJECTED_AGE {
            let _ = if *is_dir { fs::remove_dir_all(path) } else { fs::remove_file(path) };
        }
    }
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
