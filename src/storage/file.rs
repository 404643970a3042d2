//! `file://DIR`: a binary cache in a local directory, as `nix copy --to file://DIR` makes.
//! Every object is written with [`Dir::write_atomic`]: a reader (or a crash) sees an object
//! whole or not at all.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Body, BoxFuture, CallCounter, CallKind, Calls, Chunk, Incomplete, Object, Reader, Target, TargetError, MAX_GET};
use crate::dirfd::Dir;

pub struct FileTarget {
    dir: PathBuf,
    calls: CallCounter,
}

/// Temp files untouched this long are left over from a writer that died (`kill -9`, power
/// loss): an object being written is touched every few seconds at most. Another daemon
/// writing to the same directory keeps its own temp files fresh.
const STALE_TEMP: Duration = Duration::from_secs(3600);

impl FileTarget {
    /// The target at `dir`; removes temp files that died writers left behind.
    pub fn open(dir: PathBuf) -> Self {
        let removed: usize = [dir.clone(), dir.join("nar"), dir.join("log"), dir.join(super::STREAM_TMP_PREFIX)].iter().map(|d| remove_stale_temp_files(d, STALE_TEMP)).sum();
        if removed > 0 {
            tracing::info!(removed, "removed temp files left in {} by an interrupted writer", dir.display());
        }
        FileTarget { dir, calls: CallCounter::default() }
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

/// Our temp file name (`.NAME.PID-N.tmp`) to the object's `NAME`; `None` for other names.
fn temp_object_name(name: &str) -> Option<&str> {
    let inner = name.strip_prefix('.')?.strip_suffix(".tmp")?;
    let (object, writer) = inner.rsplit_once('.')?;
    let (pid, n) = writer.split_once('-')?;
    (pid.bytes().all(|b| b.is_ascii_digit()) && n.bytes().all(|b| b.is_ascii_digit()) && !object.is_empty()).then_some(object)
}

/// Walks the cache below `root` (never through a symlink), sending each regular file whose
/// key starts with `prefix` as (key, relative path, metadata): objects, or with `temp` only
/// our temp files under the key they would have had. Stops when `send` returns false.
/// Returns how many directories it read.
fn walk(root: &Path, prefix: &str, temp: bool, send: &mut dyn FnMut(String, String, fs::Metadata) -> bool) -> io::Result<u64> {
    // Directories still to read, as key prefixes ("" or "nar/"); bounded by the tree's depth
    // times its width, never following a link, so it ends.
    let mut dirs = vec![String::new()];
    let mut read = 0;
    while let Some(rel) = dirs.pop() {
        read += 1;
        if !read_dir(root, &rel, prefix, temp, &mut dirs, send)? {
            break;
        }
    }
    Ok(read)
}

/// Reads one directory of [`walk`], `rel` ("" or "nar/"): the subdirectories that may hold
/// keys with `prefix` go to `dirs`, the files to `send`. `Ok(false)`: `send` said stop.
fn read_dir(root: &Path, rel: &str, prefix: &str, temp: bool, dirs: &mut Vec<String>, send: &mut dyn FnMut(String, String, fs::Metadata) -> bool) -> io::Result<bool> {
    let rd = match fs::read_dir(root.join(rel)) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound && !rel.is_empty() => return Ok(true),
        Err(e) => return Err(e),
    };
    for e in rd {
        let e = e?;
        let Some(name) = e.file_name().to_str().map(str::to_string) else { continue };
        let ft = e.file_type()?;
        if ft.is_dir() {
            let sub = format!("{rel}{name}/");
            if sub.starts_with(prefix) || prefix.starts_with(&sub) {
                dirs.push(sub);
            }
            continue;
        }
        if !ft.is_file() {
            continue;
        }
        let key = match (temp, temp_object_name(&name)) {
            (false, None) => format!("{rel}{name}"),
            (true, Some(object)) => format!("{rel}{object}"),
            _ => continue,
        };
        if !key.starts_with(prefix) {
            continue;
        }
        // Deleted (a gc) or renamed (a temp file done) since it was read from the directory.
        let meta = match e.metadata() {
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            m => m?,
        };
        if !send(key, format!("{rel}{name}"), meta) {
            return Ok(false);
        }
    }
    Ok(true)
}

fn object(key: String, meta: &fs::Metadata) -> Object {
    Object { key, size: meta.len(), last_modified: meta.modified().ok(), etag: Some(version(meta)) }
}

/// [`walk`] of the whole cache on up to `jobs` threads, each directory read by one of them
/// (the parallel listing of `file://`: a cache's narinfos all sit in its root, its NARs in
/// `nar/`, so the two are read side by side). Objects go to `pages`, [`super::LIST_PAGE`]
/// at a time; a closed receiver stops the walk. Returns (objects, directories read).
fn walk_parallel(root: &Path, jobs: usize, pages: &tokio::sync::mpsc::Sender<Vec<Object>>) -> io::Result<(u64, u64)> {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Condvar, Mutex};
    // Directories to read, and how many threads are reading one (which may find more).
    let queue = Mutex::new((vec![String::new()], 0usize));
    let ready = Condvar::new();
    let (stop, objects, read) = (AtomicBool::new(false), AtomicU64::new(0), AtomicU64::new(0));
    let worker = || -> io::Result<()> {
        let mut page = Vec::with_capacity(super::LIST_PAGE);
        loop {
            let rel = {
                let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    if stop.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                    if let Some(rel) = q.0.pop() {
                        q.1 += 1;
                        break rel;
                    }
                    if q.1 == 0 {
                        ready.notify_all();
                        return Ok(());
                    }
                    q = ready.wait(q).unwrap_or_else(|e| e.into_inner());
                }
            };
            let mut found = Vec::new();
            let r = read_dir(root, &rel, "", false, &mut found, &mut |key, _, meta| {
                page.push(object(key, &meta));
                if page.len() < super::LIST_PAGE {
                    return true;
                }
                objects.fetch_add(page.len() as u64, Ordering::Relaxed);
                pages.blocking_send(std::mem::replace(&mut page, Vec::with_capacity(super::LIST_PAGE))).is_ok()
            });
            read.fetch_add(1, Ordering::Relaxed);
            let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
            q.0.extend(found);
            q.1 -= 1;
            ready.notify_all();
            drop(q);
            match r {
                Ok(true) => {}
                Ok(false) | Err(_) => {
                    stop.store(true, Ordering::Relaxed);
                    ready.notify_all();
                    return r.map(drop);
                }
            }
            if !page.is_empty() {
                objects.fetch_add(page.len() as u64, Ordering::Relaxed);
                if pages.blocking_send(std::mem::take(&mut page)).is_err() {
                    stop.store(true, Ordering::Relaxed);
                    ready.notify_all();
                    return Ok(());
                }
            }
        }
    };
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..jobs.max(1)).map(|_| s.spawn(worker)).collect();
        handles.into_iter().try_for_each(|h| h.join().unwrap_or_else(|_| Err(io::Error::other("a listing thread panicked"))))
    })?;
    Ok((objects.into_inner(), read.into_inner()))
}

/// Opens the object at `key` for reading, not through a symlink; `None` if there is none.
fn open_object(root: &Path, key: &str) -> io::Result<Option<File>> {
    match open_parent(root, key, false).and_then(|(d, name)| d.open_file(name)) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Removes the file at `rel` (a key or a temp file's path) and syncs its directory.
fn remove(root: &Path, rel: &str) -> io::Result<()> {
    remove_all(root, std::slice::from_ref(&rel))
}

/// Removes the files at `rels`, then syncs each directory they were in, once: when this
/// returns, every removal is durable (a gc's round is, before the next one begins).
fn remove_all<S: AsRef<str>>(root: &Path, rels: &[S]) -> io::Result<()> {
    let mut touched: Vec<(String, Dir)> = Vec::new();
    for rel in rels {
        let rel = rel.as_ref();
        let parent = rel.rsplit_once('/').map_or("", |(p, _)| p);
        let at = match touched.iter().position(|(p, _)| p == parent) {
            Some(at) => at,
            None => match open_parent(root, rel, false) {
                Ok((dir, _)) => {
                    touched.push((parent.to_string(), dir));
                    touched.len() - 1
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            },
        };
        let name = rel.rsplit('/').next().unwrap_or(rel);
        match touched[at].1.remove_file(name) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    touched.iter().try_for_each(|(_, d)| d.sync())
}

impl FileTarget {
    /// Runs `f` on a blocking thread.
    async fn blocking<T: Send + 'static>(&self, f: impl FnOnce(PathBuf) -> Result<T, TargetError> + Send + 'static) -> Result<T, TargetError> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || f(dir)).await.map_err(|e| TargetError::transient(e.to_string()))?
    }

    /// [`walk`] on a blocking thread, its entries handed to `each` as they come (a bounded
    /// channel between them keeps memory flat).
    async fn walk_async(&self, prefix: &str, temp: bool, each: &mut (dyn FnMut(String, String, fs::Metadata) + Send)) -> Result<u64, TargetError> {
        let (tx, mut rx) = tokio::sync::mpsc::channel(1000);
        let (dir, prefix) = (self.dir.clone(), prefix.to_string());
        let walker = tokio::task::spawn_blocking(move || {
            let r = walk(&dir, &prefix, temp, &mut |key, rel, meta| tx.blocking_send((key, rel, meta)).is_ok());
            r.map_err(|e| io_err("listing", &dir, e))
        });
        let mut n = 0;
        while let Some((key, rel, meta)) = rx.recv().await {
            each(key, rel, meta);
            n += 1;
        }
        let dirs = walker.await.map_err(|e| TargetError::transient(e.to_string()))??;
        self.calls.add_n(CallKind::List, dirs);
        Ok(n)
    }
}

/// What stands for an ETag: the inode and its change time, which every write here (a rename of
/// a new file) changes and which, unlike size and mtime, no copy or restore can set back.
fn version(meta: &fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    format!("file:{}:{}.{}", meta.ino(), meta.ctime(), meta.ctime_nsec())
}

/// `flock` on `f`; `Ok(false)` if `nonblocking` and another holds a conflicting lock.
fn flock(f: &File, op: libc::c_int, nonblocking: bool) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    let op = if nonblocking { op | libc::LOCK_NB } else { op };
    loop {
        // SAFETY: a plain syscall on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) if nonblocking => return Ok(false),
            _ => return Err(e),
        }
    }
}

/// A collector's lock ([`Target::fence`]): the open, locked file; removed and released when
/// dropped (the kernel releases it too when the process dies).
struct FileFence {
    file: Option<File>,
    root: PathBuf,
    key: String,
}

impl Drop for FileFence {
    fn drop(&mut self) {
        let _ = remove(&self.root, &self.key);
        drop(self.file.take());
    }
}

/// Serialises [`Target::put_if_version`]: its check and its write happen under an
/// exclusive lock that every conditional writer of this cache takes.
const WRITE_LOCK: &str = "narq/locks/write";

impl Target for FileTarget {
    fn list<'a>(&'a self, prefix: &'a str, each: &'a mut (dyn FnMut(Object) + Send)) -> BoxFuture<'a, Result<u64, TargetError>> {
        Box::pin(async move {
            self.walk_async(prefix, false, &mut |key, _, meta| each(object(key, &meta))).await
        })
    }

    /// Each directory read by one of up to `jobs` threads ([`walk_parallel`]).
    fn list_all<'a>(&'a self, jobs: usize, pages: tokio::sync::mpsc::Sender<Vec<Object>>) -> BoxFuture<'a, Result<u64, TargetError>> {
        Box::pin(async move {
            let dir = self.dir.clone();
            let (objects, dirs) = tokio::task::spawn_blocking(move || walk_parallel(&dir, jobs.min(8), &pages).map_err(|e| io_err("listing", &dir, e)))
                .await
                .map_err(|e| TargetError::transient(e.to_string()))??;
            self.calls.add_n(CallKind::List, dirs);
            Ok(objects)
        })
    }

    fn calls(&self) -> Calls {
        self.calls.get()
    }

    fn size_of<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<u64>, TargetError>> {
        self.calls.add(CallKind::Head);
        let key = key.to_string();
        Box::pin(self.blocking(move |root| match open_object(&root, &key) {
            Ok(Some(f)) => Ok(Some(f.metadata().map_err(|e| io_err("reading", &root.join(&key), e))?.len())),
            Ok(None) => Ok(None),
            Err(e) => Err(io_err("opening", &root.join(&key), e)),
        }))
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, TargetError>> {
        self.calls.add(CallKind::Get);
        let key = key.to_string();
        Box::pin(self.blocking(move |root| {
            let path = root.join(&key);
            let Some(f) = open_object(&root, &key).map_err(|e| io_err("opening", &path, e))? else { return Ok(None) };
            let size = f.metadata().map_err(|e| io_err("reading", &path, e))?.len();
            if size > MAX_GET {
                return Err(TargetError::transient(format!("{}: {size} bytes, more than get reads ({MAX_GET})", path.display())));
            }
            let mut buf = Vec::with_capacity(size as usize);
            io::Read::read_to_end(&mut io::Read::take(f, MAX_GET + 1), &mut buf).map_err(|e| io_err("reading", &path, e))?;
            Ok(Some(buf))
        }))
    }

    fn open_read<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Reader>, TargetError>> {
        self.calls.add(CallKind::Get);
        let key = key.to_string();
        Box::pin(self.blocking(move |root| {
            let f = open_object(&root, &key).map_err(|e| io_err("opening", &root.join(&key), e))?;
            Ok(f.map(|f| Box::new(tokio::fs::File::from_std(f)) as Reader))
        }))
    }

    /// The files removed, then each directory synced once.
    fn delete<'a>(&'a self, keys: &'a [String]) -> BoxFuture<'a, Result<(), TargetError>> {
        self.calls.add(CallKind::Delete);
        let keys = keys.to_vec();
        Box::pin(self.blocking(move |root| remove_all(&root, &keys).map_err(|e| io_err("deleting in", &root, e))))
    }

    fn list_incomplete<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<Incomplete>, TargetError>> {
        Box::pin(async move {
            let mut found = Vec::new();
            self.walk_async(prefix, true, &mut |key, id, meta| found.push(Incomplete { key, id, started: meta.modified().ok() })).await?;
            Ok(found)
        })
    }

    fn abort_incomplete<'a>(&'a self, upload: &'a Incomplete) -> BoxFuture<'a, Result<(), TargetError>> {
        let id = upload.id.clone();
        Box::pin(self.blocking(move |root| {
            let name = id.rsplit('/').next().unwrap_or("");
            if temp_object_name(name).is_none() {
                return Err(TargetError::transient(format!("{id:?} is not an upload temp file")));
            }
            remove(&root, &id).map_err(|e| io_err("removing", &root.join(&id), e))
        }))
    }

    fn exists<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, TargetError>> {
        self.calls.add(CallKind::Head);
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
        self.calls.add(CallKind::Put);
        let (dir, key) = (self.dir.clone(), key.to_string());
        Box::pin(async move {
            tokio::task::spawn_blocking(move || put_sync(&dir, &key, body))
                .await
                .map_err(|e| TargetError::transient(e.to_string()))?
        })
    }

    /// Chunks of 1 MiB, written as they come: memory stays flat and nothing waits on
    /// round trips.
    fn stream_part_size(&self, _size_hint: u64) -> Option<u64> {
        Some(1 << 20)
    }

    /// Written with [`Dir::write_atomic`]: whole at `key`, or (the writer failed) not at all.
    fn put_streamed<'a>(&'a self, key: &'a str, mut chunks: tokio::sync::mpsc::Receiver<Chunk>, _content_type: &'static str) -> BoxFuture<'a, Result<u64, TargetError>> {
        let key = key.to_string();
        Box::pin(self.blocking(move |root| {
            let dst = root.join(&key);
            let (parent, name) = open_parent(&root, &key, true).map_err(|e| io_err("opening the directory of", &dst, e))?;
            let mut size = 0u64;
            parent
                .write_atomic(name, |parent, tmp_name| {
                    let mut f = parent.create_file(tmp_name, 0o644)?;
                    loop {
                        match chunks.blocking_recv() {
                            Some(Chunk::Data(Body::Bytes(d))) => {
                                io::Write::write_all(&mut f, &d)?;
                                size += d.len() as u64;
                            }
                            Some(Chunk::Data(Body::File(tmp))) => size += io::copy(&mut File::open(tmp.path())?, &mut f)?,
                            Some(Chunk::End) => return Ok(f),
                            None => return Err(io::Error::other("the writer stopped before the end")),
                        }
                    }
                })
                .map_err(|e| io_err("writing", &dst, e))?;
            Ok(size)
        }))
    }

    /// A rename on the cache's file system; the target directory is synced.
    fn rename<'a>(&'a self, from: &'a str, to: &'a str, _size: u64, _content_type: &'static str) -> BoxFuture<'a, Result<(), TargetError>> {
        let (from, to) = (from.to_string(), to.to_string());
        Box::pin(self.blocking(move |root| {
            let dst = root.join(&to);
            let (src_dir, src_name) = open_parent(&root, &from, false).map_err(|e| io_err("opening the directory of", &root.join(&from), e))?;
            let (dst_dir, dst_name) = open_parent(&root, &to, true).map_err(|e| io_err("opening the directory of", &dst, e))?;
            src_dir.rename_to(src_name, &dst_dir, dst_name).and_then(|()| dst_dir.sync()).map_err(|e| io_err("moving into place", &dst, e))
        }))
    }

    fn describe(&self) -> String {
        format!("file://{}", self.dir.display())
    }

    fn fence<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<super::Fence>, TargetError>> {
        let key = key.to_string();
        Box::pin(self.blocking(move |root| {
            let path = root.join(&key);
            let (dir, name) = open_parent(&root, &key, true).map_err(|e| io_err("opening the directory of", &path, e))?;
            let file = dir.open_or_create(name, 0o644).map_err(|e| io_err("creating", &path, e))?;
            if !flock(&file, libc::LOCK_EX, true).map_err(|e| io_err("locking", &path, e))? {
                return Err(TargetError::transient(format!("{} is locked by another process", path.display())));
            }
            dir.sync().map_err(|e| io_err("syncing the directory of", &path, e))?;
            Ok(Some(Box::new(FileFence { file: Some(file), root, key }) as super::Fence))
        }))
    }

    fn fenced<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<bool>, TargetError>> {
        let key = key.to_string();
        Box::pin(self.blocking(move |root| {
            let path = root.join(&key);
            let file = match open_object(&root, &key) {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(None),
                Err(e) => return Err(io_err("opening", &path, e)),
            };
            // A shared lock taken at once means nobody holds the exclusive one.
            Ok(Some(!flock(&file, libc::LOCK_SH, true).map_err(|e| io_err("locking", &path, e))?))
        }))
    }

    fn get_versioned<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<(Vec<u8>, String)>, TargetError>> {
        self.calls.add(CallKind::Get);
        let key = key.to_string();
        Box::pin(self.blocking(move |root| {
            let path = root.join(&key);
            let Some(f) = open_object(&root, &key).map_err(|e| io_err("opening", &path, e))? else { return Ok(None) };
            let meta = f.metadata().map_err(|e| io_err("reading", &path, e))?;
            let mut buf = Vec::with_capacity(meta.len().min(MAX_GET) as usize);
            io::Read::read_to_end(&mut io::Read::take(f, MAX_GET), &mut buf).map_err(|e| io_err("reading", &path, e))?;
            Ok(Some((buf, version(&meta))))
        }))
    }

    fn put_if_version<'a>(&'a self, key: &'a str, body: Vec<u8>, _content_type: &'static str, expected: &'a str) -> BoxFuture<'a, Result<bool, TargetError>> {
        self.calls.add(CallKind::Put);
        let (key, expected) = (key.to_string(), expected.to_string());
        Box::pin(self.blocking(move |root| {
            let lock_path = root.join(WRITE_LOCK);
            let (dir, name) = open_parent(&root, WRITE_LOCK, true).map_err(|e| io_err("opening the directory of", &lock_path, e))?;
            let lock = dir.open_or_create(name, 0o644).map_err(|e| io_err("creating", &lock_path, e))?;
            flock(&lock, libc::LOCK_EX, false).map_err(|e| io_err("locking", &lock_path, e))?;
            let path = root.join(&key);
            let now = match open_object(&root, &key).map_err(|e| io_err("opening", &path, e))? {
                Some(f) => Some(version(&f.metadata().map_err(|e| io_err("reading", &path, e))?)),
                None => None,
            };
            if now.as_deref() != Some(expected.as_str()) {
                return Ok(false);
            }
            put_sync(&root, &key, Body::Bytes(body))?;
            drop(lock);
            Ok(true)
        }))
    }

    fn conditional_puts<'a>(&'a self) -> BoxFuture<'a, Result<Result<(), String>, TargetError>> {
        Box::pin(async { Ok(Ok(())) })
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
