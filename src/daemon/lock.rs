//! One daemon per state dir and per socket: the locks that say so, and the socket a daemon
//! bound, removed when it stops.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context;

/// The lock files this process holds, open (closing one would release its lock).
static LOCKS: Mutex<Vec<(PathBuf, std::fs::File)>> = Mutex::new(Vec::new());
/// The socket this process bound, with its device and inode: removed at shutdown only if
/// the path still names that socket.
static BOUND: Mutex<Option<(PathBuf, u64, u64)>> = Mutex::new(None);

/// Takes the exclusive lock on `path` (`flock`), writing `holder` into it, or returns what
/// the process that holds it wrote there (`Err`). Taking one again in the process that holds
/// it is a no-op.
fn lock_file(path: &Path, holder: &str) -> anyhow::Result<Result<(), String>> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let mut held = LOCKS.lock().unwrap_or_else(|e| e.into_inner());
    if held.iter().any(|(p, _)| p == path) {
        return Ok(Ok(()));
    }
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("opening the lock file {}", path.display()))?;
    // SAFETY: flock on a file descriptor we own; the lock lives as long as the file is open.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(e).with_context(|| format!("locking {}", path.display()));
        }
        let mut other = String::new();
        let _ = f.read_to_string(&mut other);
        return Ok(Err(other));
    }
    f.set_len(0).and_then(|()| f.write_all(holder.as_bytes())).with_context(|| format!("writing {}", path.display()))?;
    held.push((path.to_path_buf(), f));
    Ok(Ok(()))
}

/// Takes the exclusive lock on `dir` (`<dir>/lock`, which holds our pid), or fails naming the
/// daemon that holds it. A second daemon on the same state dir would unlink the first one's
/// socket, wipe its `tmp/` and share its queue. Both [`listener`](super::listener) and
/// [`run`](super::run) take it, before either touches anything.
pub(super) fn lock_state_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating the state dir {}", dir.display()))?;
    let path = dir.join("lock");
    if let Err(pid) = lock_file(&path, &format!("{}\n", std::process::id()))? {
        let pid = match pid.trim() {
            "" => "pid unknown".to_string(),
            p => format!("pid {p}"),
        };
        anyhow::bail!("another narq daemon ({pid}) is running on the state dir {} (it holds {})", dir.display(), path.display());
    }
    Ok(())
}

/// Takes `<socket>.lock` (which holds our pid and state dir) before the socket is bound, so
/// that a daemon with another state dir but the same socket refuses to start instead of
/// taking the socket over, naming the daemon that serves it. A live process listening on
/// the socket without that lock (an older narq, a daemon systemd started) refuses it too.
pub(super) fn lock_socket(socket: &Path, state_dir: &Path) -> anyhow::Result<()> {
    let mut lock = socket.as_os_str().to_owned();
    lock.push(".lock");
    let lock = PathBuf::from(lock);
    let stop = "stop it first, or give this daemon another `socket` in its config";
    if let Err(other) = lock_file(&lock, &format!("{}\n{}\n", std::process::id(), state_dir.display()))? {
        let mut lines = other.lines();
        let (pid, dir) = (lines.next().unwrap_or("unknown"), lines.next().unwrap_or("unknown"));
        anyhow::bail!("another narq daemon (pid {pid}, state dir {dir}) serves {}: {stop}", socket.display());
    }
    if let Some(pid) = listening(socket) {
        let what = match pid {
            0 => "pid unknown".to_string(),
            _ => match std::fs::read(format!("/proc/{pid}/cmdline")) {
                Ok(c) => format!("pid {pid}: {}", String::from_utf8_lossy(&c).split('\0').filter(|a| !a.is_empty()).collect::<Vec<_>>().join(" ")),
                Err(_) => format!("pid {pid}"),
            },
        };
        anyhow::bail!("another process ({what}) serves {}: {stop}", socket.display());
    }
    Ok(())
}

/// The pid of the process listening on `socket` (0 if unknown), if one is: it accepts the
/// connection, or its backlog is full (the connection times out).
fn listening(socket: &Path) -> Option<u32> {
    use std::os::fd::AsRawFd;
    let stream = match crate::protocol::connect(socket, std::time::Duration::from_secs(2)) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return Some(0),
        Err(_) => return None,
    };
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED fills a ucred of the length given; the fd is open.
    let r = unsafe { libc::getsockopt(stream.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PEERCRED, (&mut cred as *mut libc::ucred).cast(), &mut len) };
    Some(if r == 0 { cred.pid as u32 } else { 0 })
}

/// Notes that this process bound `socket`, to remove it when it stops ([`release`]).
pub(super) fn bound(socket: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(socket)?;
    *BOUND.lock().unwrap_or_else(|e| e.into_inner()) = Some((socket.to_path_buf(), m.dev(), m.ino()));
    Ok(())
}

/// At shutdown: removes the socket this process bound if the path still names it (not one
/// that someone bound there since, nor one systemd passed), and releases the locks.
pub(super) fn release() {
    use std::os::unix::fs::MetadataExt;
    if let Some((socket, dev, ino)) = BOUND.lock().unwrap_or_else(|e| e.into_inner()).take() {
        if std::fs::symlink_metadata(&socket).is_ok_and(|m| (m.dev(), m.ino()) == (dev, ino)) {
            if let Err(e) = std::fs::remove_file(&socket) {
                tracing::warn!("removing the socket {}: {e}", socket.display());
            }
        }
    }
    LOCKS.lock().unwrap_or_else(|e| e.into_inner()).clear();
}
