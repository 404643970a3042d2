//! Directories used by handle (`openat` and friends) rather than by path, so that nothing
//! below them is reached through a symlink or a directory someone swapped in meanwhile.
//!
//! The root hook writes into the daemon's state dir, which the daemon's user owns; the
//! daemon writes into a `file://` cache others may write to. A path would follow whatever
//! they plant (`spool -> /etc`); a handle opened with `O_NOFOLLOW` refuses a symlink, and
//! every later create, chown, rename and fsync acts on the directory that was checked.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// An open directory.
pub struct Dir {
    fd: OwnedFd,
}

fn c_name(name: &[u8]) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name contains a NUL byte"))
}

/// One component: no `/`, not `.` or `..`, not empty.
fn component(name: &str) -> io::Result<CString> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{name:?} is not a plain file name")));
    }
    c_name(name.as_bytes())
}

fn fd_or_err(fd: libc::c_int) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ok_or_err(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Dir {
    /// The directory at `path`, which may be reached through symlinks: it comes from the
    /// configuration, so whoever controls it controls the configuration too.
    pub fn open(path: &Path) -> io::Result<Dir> {
        let c = c_name(path.as_os_str().as_bytes())?;
        // SAFETY: c is a valid C string.
        let fd = fd_or_err(unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) })?;
        Ok(Dir { fd })
    }

    /// The subdirectory `name`, never through a symlink; made with `mode` when it is missing
    /// and `mode` is given. A symlink there is an error saying so.
    pub fn subdir(&self, name: &str, mode: Option<u32>) -> io::Result<Dir> {
        let c = component(name)?;
        let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // Twice at most: once more after making it.
        for _ in 0..2 {
            // SAFETY: c is a valid C string, self.fd an open directory.
            match fd_or_err(unsafe { libc::openat(self.fd.as_raw_fd(), c.as_ptr(), flags) }) {
                Ok(fd) => return Ok(Dir { fd }),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) && mode.is_some() => {
                    // SAFETY: as above.
                    let r = unsafe { libc::mkdirat(self.fd.as_raw_fd(), c.as_ptr(), mode.unwrap_or(0o700) as libc::mode_t) };
                    if let Err(e) = ok_or_err(r) {
                        if e.raw_os_error() != Some(libc::EEXIST) {
                            return Err(e);
                        }
                    }
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)) => {
                    let what = if self.is_symlink(name) { "a symbolic link" } else { "not a directory" };
                    return Err(io::Error::new(io::ErrorKind::Other, format!("{name} is {what}, not followed")));
                }
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(io::ErrorKind::NotFound, format!("{name} vanished while it was made")))
    }

    fn is_symlink(&self, name: &str) -> bool {
        self.stat(name).is_ok_and(|s| s.is_some_and(|s| s.st_mode & libc::S_IFMT == libc::S_IFLNK))
    }

    /// `name` itself (not what a symlink points to); `None` when it does not exist.
    pub fn stat(&self, name: &str) -> io::Result<Option<libc::stat>> {
        let c = component(name)?;
        // SAFETY: st is written by fstatat; c a valid C string.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        match ok_or_err(unsafe { libc::fstatat(self.fd.as_raw_fd(), c.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) }) {
            Ok(()) => Ok(Some(st)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// This directory's owner (uid, gid).
    pub fn owner(&self) -> io::Result<(u32, u32)> {
        // SAFETY: st is written by fstat.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        ok_or_err(unsafe { libc::fstat(self.fd.as_raw_fd(), &mut st) })?;
        Ok((st.st_uid, st.st_gid))
    }

    /// Gives this directory (the one opened, wherever it has been moved since) to `uid:gid`.
    pub fn chown(&self, uid: u32, gid: u32) -> io::Result<()> {
        // SAFETY: plain syscall on our descriptor.
        ok_or_err(unsafe { libc::fchown(self.fd.as_raw_fd(), uid, gid) })
    }

    /// A new file `name`, opened for writing; fails if anything (a symlink too) is there.
    pub fn create_file(&self, name: &str, mode: u32) -> io::Result<File> {
        let c = component(name)?;
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: c is a valid C string; the mode argument is read because of O_CREAT.
        let fd = fd_or_err(unsafe { libc::openat(self.fd.as_raw_fd(), c.as_ptr(), flags, mode as libc::c_uint) })?;
        Ok(File::from(fd))
    }

    /// The existing file `name`, read-only, not through a symlink.
    pub fn open_file(&self, name: &str) -> io::Result<File> {
        let c = component(name)?;
        // SAFETY: c is a valid C string.
        let fd = fd_or_err(unsafe { libc::openat(self.fd.as_raw_fd(), c.as_ptr(), libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC) })?;
        Ok(File::from(fd))
    }

    /// The file `name`, opened read-write and made (`mode`) if missing, not through a symlink.
    pub fn open_or_create(&self, name: &str, mode: u32) -> io::Result<File> {
        let c = component(name)?;
        let flags = libc::O_RDWR | libc::O_CREAT | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: c is a valid C string; the mode argument is read because of O_CREAT.
        let fd = fd_or_err(unsafe { libc::openat(self.fd.as_raw_fd(), c.as_ptr(), flags, mode as libc::c_uint) })?;
        Ok(File::from(fd))
    }

    /// Renames `from` to `to`, both in this directory. A symlink at `to` is replaced, not followed.
    pub fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let (f, t) = (component(from)?, component(to)?);
        let d = self.fd.as_raw_fd();
        // SAFETY: valid C strings, our descriptor.
        ok_or_err(unsafe { libc::renameat(d, f.as_ptr(), d, t.as_ptr()) })
    }

    /// Moves `from` in this directory to `to` in `dir` (a symlink there is replaced, not followed).
    pub fn rename_to(&self, from: &str, dir: &Dir, to: &str) -> io::Result<()> {
        let (f, t) = (component(from)?, component(to)?);
        // SAFETY: valid C strings, our descriptors.
        ok_or_err(unsafe { libc::renameat(self.fd.as_raw_fd(), f.as_ptr(), dir.fd.as_raw_fd(), t.as_ptr()) })
    }

    /// Moves the file at `src` (a path) to `to` in this directory.
    pub fn rename_into(&self, src: &Path, to: &str) -> io::Result<()> {
        let (s, t) = (c_name(src.as_os_str().as_bytes())?, component(to)?);
        // SAFETY: valid C strings, our descriptor.
        ok_or_err(unsafe { libc::renameat(libc::AT_FDCWD, s.as_ptr(), self.fd.as_raw_fd(), t.as_ptr()) })
    }

    /// Writes the file `name` in this directory so that a reader (or a crash) sees it whole
    /// or not at all: `fill` makes it under a hidden temp name (`.NAME.PID-N.tmp`, the name it
    /// is given) in this directory and returns it open; it is synced, renamed to `name` (a
    /// symlink there is replaced, not followed), and the directory synced. Whatever fails,
    /// the temp file is not left behind.
    pub fn write_atomic(&self, name: &str, fill: impl FnOnce(&Dir, &str) -> io::Result<File>) -> io::Result<()> {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        component(name)?;
        let tmp = format!(".{name}.{}-{n}.tmp", std::process::id());
        let written = fill(self, &tmp).and_then(|f| f.sync_all()).and_then(|()| self.rename(&tmp, name));
        if written.is_err() {
            let _ = self.remove_file(&tmp);
            return written;
        }
        self.sync()
    }

    /// Removes the file (or symlink, not what it points to) `name`.
    pub fn remove_file(&self, name: &str) -> io::Result<()> {
        let c = component(name)?;
        // SAFETY: a valid C string, our descriptor.
        ok_or_err(unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), 0) })
    }

    /// Makes the directory's entries durable (after a create or rename in it).
    pub fn sync(&self) -> io::Result<()> {
        // SAFETY: plain syscall on our descriptor.
        ok_or_err(unsafe { libc::fsync(self.fd.as_raw_fd()) })
    }
}
