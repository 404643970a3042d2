//! The state dir's lock: one daemon per state dir.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context;

/// The state dirs whose lock this process holds, with the open lock file (closing it
/// would release the lock).
static LOCKS: Mutex<Vec<(PathBuf, std::fs::File)>> = Mutex::new(Vec::new());

/// Takes the exclusive lock on `dir` (`flock` of `<dir>/lock`, which holds our pid), or
/// fails naming the daemon that holds it. A second daemon on the same state dir would
/// unlink the first one's socket, wipe its `tmp/` and share its queue. Taking it again in
/// the process that holds it is a no-op: both [`listener`] and [`run`] take it, before
/// either touches anything.
pub(super) fn lock_state_dir(dir: &Path) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let mut held = LOCKS.lock().unwrap_or_else(|e| e.into_inner());
    if held.iter().any(|(d, _)| d == dir) {
        return Ok(());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating the state dir {}", dir.display()))?;
    let path = dir.join("lock");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .with_context(|| format!("opening the lock file {}", path.display()))?;
    // SAFETY: flock on a file descriptor we own; the lock lives as long as the file is open.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(e).with_context(|| format!("locking {}", path.display()));
        }
        let mut pid = String::new();
        let _ = f.read_to_string(&mut pid);
        let pid = match pid.trim() {
            "" => "pid unknown".to_string(),
            p => format!("pid {p}"),
        };
        anyhow::bail!("another narq daemon ({pid}) is running on the state dir {} (it holds {})", dir.display(), path.display());
    }
    f.set_len(0).and_then(|()| writeln!(f, "{}", std::process::id())).with_context(|| format!("writing {}", path.display()))?;
    held.push((dir.to_path_buf(), f));
    Ok(())
}

/// Releases the lock [`lock_state_dir`] took on `dir`.
pub(super) fn unlock_state_dir(dir: &Path) {
    LOCKS.lock().unwrap_or_else(|e| e.into_inner()).retain(|(d, _)| d != dir);
}
