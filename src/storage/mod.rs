//! Where the cache lives. The uploader sees only [`Target`]; each backend (`file://` in
//! [`file`], S3 in [`s3`]) implements it, opened with its options type, parsed from the store
//! URL in a module without SDK types that the hook builds too
//! ([`crate::store_url::s3_options`]).

#[cfg(feature = "daemon")]
pub mod file;
#[cfg(feature = "daemon")]
mod mtls;
#[cfg(feature = "daemon")]
pub mod s3;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What to put: small objects in memory, NARs as a file the uploader wrote (compressed)
/// under the state dir, so that memory does not grow with NAR size.
pub enum Body {
    Bytes(Vec<u8>),
    /// A temporary file the target takes over: moved into the cache, or removed when it is
    /// dropped, whether or not the put succeeds.
    File(TempFile),
}

/// A temporary file that is removed when this is dropped (an error, a cancelled upload, a
/// finished one alike), unless [`TempFile::release`]d because it was moved elsewhere.
pub struct TempFile {
    path: Option<PathBuf>,
}

impl TempFile {
    /// Owns the (maybe not yet created) file at `path`.
    pub fn new(path: PathBuf) -> TempFile {
        TempFile { path: Some(path) }
    }

    pub fn path(&self) -> &Path {
        self.path.as_deref().unwrap_or(Path::new(""))
    }

    /// Gives up the file (it has been renamed away): it is no longer removed.
    pub fn release(mut self) -> PathBuf {
        self.path.take().unwrap_or_default()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A failure to talk to the target. Almost nothing the target says is final for an item:
/// the network comes back, throttling ends, a disk is cleared, credentials are fixed. But it
/// concerns every item alike, so the daemon pauses all uploads (with backoff) rather than
/// let each item retry on its own. The exception is a refusal of one object for what it is
/// ([`TargetError::permanent`], e.g. `EntityTooLarge`): that item fails, the others go on.
#[derive(Debug, thiserror::Error)]
#[error("{msg}")]
pub struct TargetError {
    pub msg: String,
    /// Needs a person: wrong credentials, a missing bucket, a refused policy.
    pub config: bool,
    /// This object will never be accepted: fail the item, do not pause the target.
    pub permanent: bool,
    /// The store asked us to wait at least this long (`Retry-After`).
    pub retry_after: Option<Duration>,
    /// The store does not implement this call (HTTP 501 or 405, `NotImplemented`): where
    /// the call is optional (listing incomplete uploads, say), callers skip it and say so.
    pub unsupported: bool,
}

impl TargetError {
    pub fn transient(msg: impl Into<String>) -> Self {
        TargetError { msg: msg.into(), config: false, permanent: false, retry_after: None, unsupported: false }
    }
    pub fn target(msg: impl Into<String>) -> Self {
        TargetError { config: true, ..Self::transient(msg) }
    }
    pub fn permanent(msg: impl Into<String>) -> Self {
        TargetError { permanent: true, ..Self::transient(msg) }
    }
    /// A call the store does not implement: needs a person where the call is required.
    pub fn unsupported(msg: impl Into<String>) -> Self {
        TargetError { unsupported: true, ..Self::target(msg) }
    }
}

pub const NARINFO_TYPE: &str = "text/x-nix-narinfo";
pub const NAR_TYPE: &str = "application/x-nix-nar";
pub const CACHE_INFO_TYPE: &str = "text/x-nix-cache-info";
pub const LOG_TYPE: &str = "text/plain; charset=utf-8";
/// NAR listings (`.ls`) and realisations (`.doi`), as Nix uploads them.
pub const JSON_TYPE: &str = "application/json";

/// One stored object, as [`Target::list`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    pub key: String,
    pub size: u64,
    pub last_modified: Option<std::time::SystemTime>,
    /// The server's ETag when it gives one (S3); `file://` gives its inode and change time.
    pub etag: Option<String>,
}

/// An upload begun and never finished: an S3 multipart upload, a `file://` temp file. It
/// costs space until aborted; one still being written looks the same, so callers abort only
/// those older than any upload takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incomplete {
    /// The key the object would have had.
    pub key: String,
    /// What [`Target::abort_incomplete`] needs: the upload id, the temp file's path.
    pub id: String,
    pub started: Option<std::time::SystemTime>,
}

/// [`Target::get`] refuses objects larger than this: it is for narinfos, `nix-cache-info`
/// and logs, not NARs (those are read with [`Target::open_read`]).
pub const MAX_GET: u64 = 64 << 20;

/// A streaming read of one object.
#[cfg(feature = "daemon")]
pub type Reader = Box<dyn tokio::io::AsyncRead + Send + Unpin>;

/// One piece of an object streamed to the target ([`Target::put_streamed`]).
#[cfg(feature = "daemon")]
pub enum Chunk {
    /// The next bytes: a whole part ([`Target::stream_part_size`]) but for the last; a temp
    /// file for parts too large to hold in memory.
    Data(Body),
    /// Everything was sent and the writer vouches for it: complete the object. A channel
    /// that closes without it is a writer that failed, and the upload is aborted.
    End,
}

/// Where narq streams objects whose final key is not known until they are whole (a NAR is
/// named by the hash of its compressed bytes): a random key under narq's own prefix, moved
/// to its place with [`Target::rename`]. Nix ignores keys it does not know.
pub const STREAM_TMP_PREFIX: &str = "narq/tmp/";

/// Where narq writes short-lived probes (`narq doctor`, the check for conditional puts).
pub const PROBE_PREFIX: &str = "narq/probe/";

/// S3's limit of keys per DeleteObjects request.
pub const DELETE_BATCH: usize = 1000;

/// Objects per page of a listing (S3's page; `file://` hands them on as many).
pub const LIST_PAGE: usize = 1000;

/// The calls a target made, by kind: S3 requests (each attempt, retries included), or on
/// `file://` the operations that stand for them (a directory read is a listing).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Calls {
    /// ListObjectsV2 pages, ListMultipartUploads; on `file://` directories read.
    pub list: u64,
    pub get: u64,
    pub head: u64,
    /// PutObject, the requests of a multipart upload, CopyObject.
    pub put: u64,
    /// DeleteObjects (up to 1,000 keys each), DeleteObject, AbortMultipartUpload.
    pub delete: u64,
    /// Anything else (HeadBucket, …).
    pub other: u64,
}

/// Which of [`Calls`] a call counts in.
#[derive(Debug, Clone, Copy)]
pub enum CallKind {
    List,
    Get,
    Head,
    Put,
    Delete,
    Other,
}

/// Counts a target's calls; read with [`CallCounter::get`].
#[derive(Debug, Default)]
pub struct CallCounter([std::sync::atomic::AtomicU64; 6]);

impl CallCounter {
    pub fn add(&self, kind: CallKind) {
        self.add_n(kind, 1);
    }

    pub fn add_n(&self, kind: CallKind, n: u64) {
        self.0[kind as usize].fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn get(&self) -> Calls {
        let n = |k: CallKind| self.0[k as usize].load(std::sync::atomic::Ordering::Relaxed);
        Calls { list: n(CallKind::List), get: n(CallKind::Get), head: n(CallKind::Head), put: n(CallKind::Put), delete: n(CallKind::Delete), other: n(CallKind::Other) }
    }
}

#[cfg(feature = "daemon")]
pub trait Target: Send + Sync {
    /// Calls `each` for every object whose key starts with `prefix`, in no particular order,
    /// a page at a time (memory does not grow with the cache); returns how many there were.
    /// Upload temp files and incomplete uploads are not objects.
    fn list<'a>(&'a self, prefix: &'a str, each: &'a mut (dyn FnMut(Object) + Send)) -> BoxFuture<'a, Result<u64, TargetError>>;
    /// Lists every object, as `list("")` does, in parts of the key space listed at once (at
    /// most `jobs` at a time), each part read once; sends the objects on `pages` as they come,
    /// at most [`LIST_PAGE`] a message, waiting while the receiver is behind (memory holds
    /// the pages in flight, not the cache). Every part starts listing after this is called.
    /// Returns how many objects there were.
    fn list_all<'a>(&'a self, jobs: usize, pages: tokio::sync::mpsc::Sender<Vec<Object>>) -> BoxFuture<'a, Result<u64, TargetError>>;
    /// The object at `key` (at most [`MAX_GET`] bytes), `None` if there is none.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, TargetError>>;
    /// A streaming read of the object at `key`, `None` if there is none.
    fn open_read<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Reader>, TargetError>>;
    /// Deletes the objects at `keys`; keys with no object are no error.
    fn delete<'a>(&'a self, keys: &'a [String]) -> BoxFuture<'a, Result<(), TargetError>>;
    /// The incomplete uploads whose key starts with `prefix`.
    fn list_incomplete<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<Incomplete>, TargetError>>;
    /// Aborts `upload`, freeing its space; one already gone is no error.
    fn abort_incomplete<'a>(&'a self, upload: &'a Incomplete) -> BoxFuture<'a, Result<(), TargetError>>;
    /// True if an object exists at `key` (e.g. `<hash>.narinfo`).
    fn exists<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, TargetError>>;
    /// The size of the object at `key` (S3: HEAD), `None` if there is none.
    fn size_of<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<u64>, TargetError>>;
    /// The calls made so far, by kind.
    fn calls(&self) -> Calls;
    /// Stores `body` at `key`; durable once this returns `Ok`.
    fn put<'a>(&'a self, key: &'a str, body: Body, content_type: &'static str) -> BoxFuture<'a, Result<(), TargetError>>;
    /// The part size [`Target::put_streamed`] expects for an object of about `size_hint`
    /// bytes; `None` if this target takes whole objects only (then [`Target::put`] it).
    fn stream_part_size(&self, _size_hint: u64) -> Option<u64> {
        None
    }
    /// Stores at `key` the [`Chunk`]s that arrive on `chunks` as they arrive (memory holds a
    /// few parts, whatever the object's size). Whole once [`Chunk::End`] arrives and this
    /// returns `Ok`; if the channel closes without it, or anything fails, nothing is left
    /// at `key` and no incomplete upload is left behind. Returns the object's size.
    fn put_streamed<'a>(&'a self, key: &'a str, chunks: tokio::sync::mpsc::Receiver<Chunk>, content_type: &'static str) -> BoxFuture<'a, Result<u64, TargetError>>;
    /// Moves the whole object at `from` (`size` bytes) to `to`, replacing any object there:
    /// a server-side copy then a delete, or a rename. Readers of `to` see the old object or
    /// the new one whole, never a part.
    fn rename<'a>(&'a self, from: &'a str, to: &'a str, size: u64, content_type: &'static str) -> BoxFuture<'a, Result<(), TargetError>>;
    /// For messages: where this target writes.
    fn describe(&self) -> String;
    /// Forgets what the target remembers of the cache's contents (a listing), so that the
    /// next [`Target::exists`] asks the cache itself: paths are being checked again because
    /// something outside narq may have deleted them.
    fn forget_listing(&self) {}
    /// The `Content-Encoding` its readers undo for build logs, if any (`gzip` or `zstd`).
    /// Nix's HTTP client decompresses by `Content-Encoding`, while a `file://` cache is
    /// read as is, so there logs stay plain.
    fn log_encoding(&self) -> Option<&'static str> {
        None
    }
    /// Stores `body` at `key` with that `Content-Encoding`. Only called when
    /// [`Target::log_encoding`] names one; the default stores the body as is.
    fn put_encoded<'a>(&'a self, key: &'a str, body: Body, content_type: &'static str, _encoding: &'static str) -> BoxFuture<'a, Result<(), TargetError>> {
        self.put(key, body, content_type)
    }
    /// Takes the lock that tells others a collector lives, named by `key` (under
    /// [`LOCKS_PREFIX`]), for as long as the returned [`Fence`] lives: held by a stopped
    /// process too, released when the process dies. `None` where the store has no locks
    /// (S3): there a collector is judged by its heartbeats alone.
    fn fence<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Fence>, TargetError>>;
    /// Whether the lock at `key` is held: `Some(true)` its collector lives (running or
    /// stopped), `Some(false)` its process is gone, `None` this cannot be told (no lock
    /// there, or a store without locks).
    fn fenced<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<bool>, TargetError>>;
    /// The object at `key` (at most [`MAX_GET`] bytes) and its version, which
    /// [`Target::put_if_version`] names; `None` if there is none.
    fn get_versioned<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<(Vec<u8>, String)>, TargetError>>;
    /// Stores `body` at `key` only if the object there is still `version` (S3's `If-Match`);
    /// `Ok(false)` if it changed or went meanwhile. Only where [`Target::conditional_puts`]
    /// says it is honoured; elsewhere it is a plain put.
    fn put_if_version<'a>(&'a self, key: &'a str, body: Vec<u8>, content_type: &'static str, version: &'a str) -> BoxFuture<'a, Result<bool, TargetError>>;
    /// Whether [`Target::put_if_version`] is honoured (S3: probed once, since some servers
    /// ignore `If-Match`); `Err` says why not, for the one line a command prints.
    fn conditional_puts<'a>(&'a self) -> BoxFuture<'a, Result<Result<(), String>, TargetError>>;
}

/// Where collectors' locks live ([`Target::fence`]); Nix ignores these keys.
pub const LOCKS_PREFIX: &str = "narq/locks/";

/// A held lock ([`Target::fence`]): released when dropped.
#[cfg(feature = "daemon")]
pub type Fence = Box<dyn std::any::Any + Send + Sync>;

/// The target for a store URL.
#[cfg(feature = "daemon")]
pub async fn open(url: &crate::store_url::StoreUrl) -> Result<std::sync::Arc<dyn Target>, String> {
    use crate::store_url::Location;
    use std::sync::Arc;
    Ok(match &url.location {
        Location::File(dir) => Arc::new(file::FileTarget::open(dir.clone())),
        Location::S3(options) => Arc::new(s3::S3Target::new(options).await?),
    })
}
