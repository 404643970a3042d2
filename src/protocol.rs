//! The hook ↔ daemon protocol: length-prefixed, versioned frames carrying JSON.
//!
//! ```text
//! frame  = magic "NARQ" (4 bytes) | version u32 LE (= 1) | length u32 LE | body (length bytes)
//! body   = one JSON object; requests are tagged by "op"
//! ```
//! The client sends one request frame and reads one response frame; a connection may carry
//! several in turn. The daemon refuses (and logs) a frame with a wrong magic or version, a
//! length above [`MAX_FRAME`], a body that is not a valid request (malformed fields
//! included), and an `enqueue` it does not admit (see `daemon::validate`), and closes the
//! connection after answering `{"op":"error"}`; an error with `"retryable":true` means the
//! daemon could not store the request now, and the client keeps it.
//!
//! Requests: `missing` (which of these paths are not queued or uploaded yet?), `enqueue` (paths with
//! path info and signatures, the `.drv` whose log to upload), `status`, `wait` (answer
//! once everything enqueued so far is uploaded), `report` (a build the hook could not hand
//! over, and why), `dropped` (those builds, for `narq retry`) and `recheck` (check the cache
//! for these paths again), `repair` (upload these paths again though the cache has their
//! narinfos: `narq verify --repair`). The hook asks `missing` first and signs
//! and sends only those paths, so a build whose closure is mostly uploaded costs no
//! signatures for the rest.
//! This module is plain `std` (and `libc` for a bounded connect): the hook links it without
//! an async runtime.

use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};
use thiserror::Error;

use crate::nix::{PathInfo, Realisation, StorePath};

pub const MAGIC: &[u8; 4] = b"NARQ";
pub const VERSION: u32 = 1;
pub const HEADER_LEN: usize = 12;
/// 64 MiB: a 100,000-path closure with signatures fits with room to spare.
pub const MAX_FRAME: u32 = 64 << 20;

#[derive(Debug, Error)]
pub enum FrameError {
    #[error("bad magic {0:02x?} (not a narq client?)")]
    BadMagic([u8; 4]),
    #[error("protocol version {0} is not supported (this daemon speaks {VERSION})")]
    BadVersion(u32),
    #[error("frame of {0} bytes is larger than the limit of {MAX_FRAME}")]
    TooLarge(u32),
    #[error("malformed message: {0}")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Io(#[from] io::Error),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Upload `paths` (a closure: every reference is in the list or already uploaded).
    Enqueue {
        paths: Vec<PathInfo>,
        /// The derivation just built, whose build log is uploaded to `log/`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        drv: Option<StorePath>,
        /// Realisations of the build's outputs (`ca-derivations`), each uploaded after its
        /// out path's narinfo; their out paths are in `paths` or already queued. One may
        /// carry its build trace (`buildTrace`, Nix 2.35's key), which a daemon older than
        /// that refuses as an unknown field: the hook then sends them without.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        realisations: Vec<Realisation>,
        /// One part of a closure sent in several (see `hook::PART_PATHS`), references first:
        /// the paths nothing else in it references are not the request's roots; the last
        /// part (without `part`) holds those.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        part: bool,
    },
    /// Outputs of a build (or `narq push` arguments) that the daemon holds already, with
    /// their closures: they are noted as roots of the cache, looked for again after a
    /// collection, and the build log of `drv` is queued, as an `enqueue` of them would, without
    /// sending (and checking) their path info again. Answered with [`Response::Missing`]
    /// naming those it does not hold (then nothing is recorded: enqueue them).
    Roots {
        paths: Vec<StorePath>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        drv: Option<StorePath>,
        /// The NarHash of each of `paths` in the local store (in order; may be empty): a path
        /// the daemon holds with another one was rebuilt with other contents since, and is
        /// answered `missing` (the client then sends its path info).
        #[serde(default, rename = "narHashes", skip_serializing_if = "Vec::is_empty")]
        nar_hashes: Vec<crate::nix::Sha256>,
    },
    /// Which of `paths` the daemon does not hold, queued or uploaded (so the client signs
    /// and sends only those).
    Missing { paths: Vec<StorePath> },
    Status,
    /// Answer once everything enqueued so far (spool included) is uploaded or failed; with
    /// `paths`, once those are. See [`Response::Waited`] for which failures it reports.
    Wait {
        timeout_ms: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        paths: Option<Vec<StorePath>>,
    },
    /// A build the hook saw but could not hand over (`reason`): recorded as failed, so that
    /// `status` and `wait` report it, until its paths are enqueued (`narq retry`).
    Report {
        roots: Vec<StorePath>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        drv: Option<StorePath>,
        reason: String,
    },
    /// The dropped builds ([`Request::Report`]), for `narq retry`.
    Dropped,
    /// Forget that these paths are uploaded: the daemon checks the cache for them again
    /// (and uploads them if they are gone). `narq push` sends it for its closure.
    Recheck { paths: Vec<StorePath> },
    /// Upload `repair` again, whatever the queue remembers and even though the cache has
    /// their narinfos (overwritten, NAR first): `narq verify --repair` found them broken.
    /// `paths` holds their closure, signed, as for `enqueue`; `repair` must be among them.
    Repair { paths: Vec<PathInfo>, repair: Vec<StorePath> },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Response {
    /// The request is durable; `new` paths were not known before.
    Queued { new: usize },
    Missing { paths: Vec<StorePath> },
    Status(Status),
    /// `failed`: without `paths`, the failures of items enqueued since the last wait that
    /// saw everything done (not every failure ever recorded); with `paths`, those of the paths.
    /// `summary`: what became of the items the wait answered for (absent from older daemons).
    Waited {
        complete: bool,
        failed: Vec<Failure>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        summary: Option<WaitSummary>,
    },
    /// Recorded (a [`Request::Report`]), or rechecked (`count` paths).
    Recorded { count: usize },
    Dropped { builds: Vec<DroppedBuild> },
    /// The request was not stored. `retryable`: the daemon could not store it now (a full
    /// disk, a locked database) and the client should keep it (the hook spools it); otherwise
    /// it was refused and sending it again would be refused again.
    Error {
        message: String,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        retryable: bool,
    },
}

impl Request {
    /// The `op` this request is tagged with on the wire, for messages (a unit test holds it
    /// to what serde writes).
    pub fn op(&self) -> &'static str {
        match self {
            Request::Enqueue { .. } => "enqueue",
            Request::Missing { .. } => "missing",
            Request::Roots { .. } => "roots",
            Request::Status => "status",
            Request::Wait { .. } => "wait",
            Request::Report { .. } => "report",
            Request::Dropped => "dropped",
            Request::Recheck { .. } => "recheck",
            Request::Repair { .. } => "repair",
        }
    }
}

impl Response {
    /// A refusal: the request is wrong and will stay wrong.
    pub fn refused(message: impl Into<String>) -> Response {
        Response::Error { message: message.into(), retryable: false }
    }

    /// A failure of the daemon that may pass: the client keeps the request.
    pub fn unavailable(message: impl Into<String>) -> Response {
        Response::Error { message: message.into(), retryable: true }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub pending: u64,
    pub in_flight: u64,
    pub uploaded: u64,
    /// Found already in the cache or an upstream cache, not uploaded again.
    pub skipped: u64,
    pub failed: u64,
    pub spooled: u64,
    /// Compressed bytes written to the target since the queue was created.
    pub bytes: u64,
    /// Bytes per second over the last minute.
    pub rate: f64,
    pub store: String,
    /// Why uploads are paused now, if they are (the target is down, credentials are wrong…).
    pub target_error: Option<String>,
    pub last_error: Option<Failure>,
    pub recent_failures: Vec<Failure>,
    /// Build logs uploaded; `uploaded` counts store paths only.
    #[serde(default)]
    pub logs_uploaded: u64,
    /// Store paths among `pending` (the rest are build logs).
    #[serde(default)]
    pub pending_paths: u64,
    /// NAR bytes of the pending paths: what is left to read, for progress and ETA.
    #[serde(default)]
    pub pending_bytes: u64,
    /// NAR bytes the uploaders have read since the daemon started (in flight included), so
    /// that a client can measure the rate over its own interval.
    #[serde(default)]
    pub nar_bytes_read: u64,
    /// The uploads in flight, with how far each has got.
    #[serde(default)]
    pub uploading: Vec<Upload>,
    /// While uploads are paused (`target_error`): seconds until they are tried again.
    #[serde(default)]
    pub paused_secs: Option<f64>,
    /// Paths left out by `exclude` (counted in `skipped`), with why, latest first (10 at most).
    #[serde(default)]
    pub excluded: Vec<Failure>,
}

/// What became of the items a `wait` answered for: without `paths`, those enqueued since the
/// last wait that saw everything done; with `paths`, those paths.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct WaitSummary {
    /// Store paths uploaded, and the compressed bytes written for them and their build logs.
    pub uploaded: u64,
    pub bytes: u64,
    /// Store paths not uploaded: already in the cache, in an upstream cache, or excluded.
    pub skipped: u64,
    pub logs_uploaded: u64,
    /// Items that failed for good (paths, logs, builds the hook could not hand over).
    pub failed: u64,
    /// Items still pending (when the wait timed out).
    pub pending: u64,
}

/// An upload in flight, as `status` reports it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Upload {
    /// The store path, or `log:<drv>`.
    pub item: String,
    /// NAR bytes read so far.
    pub done: u64,
    /// NAR size (0 for a build log, whose size is known only once read).
    pub total: u64,
}

/// A build the hook could not hand over.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DroppedBuild {
    /// An output of the build; `None` when the hook could not read the outputs.
    pub root: Option<StorePath>,
    pub drv: Option<StorePath>,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Failure {
    pub item: String,
    pub error: String,
}

/// Parses a frame header; returns the body length.
pub fn parse_header(h: &[u8; HEADER_LEN]) -> Result<usize, FrameError> {
    let magic: [u8; 4] = h[0..4].try_into().unwrap();
    if &magic != MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    let version = u32::from_le_bytes(h[4..8].try_into().unwrap());
    if version != VERSION {
        return Err(FrameError::BadVersion(version));
    }
    let len = u32::from_le_bytes(h[8..12].try_into().unwrap());
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len as usize)
}

/// A whole frame for `msg`.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let body = serde_json::to_vec(msg).expect("protocol messages serialise");
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

pub fn write<T: Serialize>(w: &mut impl Write, msg: &T) -> io::Result<()> {
    w.write_all(&encode(msg))?;
    w.flush()
}

pub fn read<T: for<'de> Deserialize<'de>>(r: &mut impl Read) -> Result<T, FrameError> {
    let mut h = [0u8; HEADER_LEN];
    r.read_exact(&mut h)?;
    let len = parse_header(&h)?;
    let mut body = body_buffer(len);
    r.take(len as u64).read_to_end(&mut body)?;
    decode(len, &body)
}

/// The buffer for a body of `len` bytes: grown with what arrives, not allocated from what
/// the header announces, so that a header alone costs nothing.
fn body_buffer(len: usize) -> Vec<u8> {
    Vec::with_capacity(len.min(64 << 10))
}

/// The message in `body`, which should hold the `len` bytes its header announced.
fn decode<T: for<'de> Deserialize<'de>>(len: usize, body: &[u8]) -> Result<T, FrameError> {
    if body.len() < len {
        return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
    }
    Ok(serde_json::from_slice(body)?)
}

/// The async counterparts of [`read()`] and [`write()`], for the daemon; the hook, built without
/// the `daemon` feature, has no runtime and does not link them.
#[cfg(feature = "daemon")]
mod nonblocking {
    use super::*;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    /// [`read()`], except that a stream that ends before a whole header is `None`: a client
    /// that closes between requests.
    pub async fn read_async<T: for<'de> Deserialize<'de>>(r: &mut (impl AsyncRead + Unpin), limit: usize) -> Result<Option<T>, FrameError> {
        let mut h = [0u8; HEADER_LEN];
        match r.read_exact(&mut h).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let len = parse_header(&h)?;
        if len > limit {
            let why = format!("a request of {len} bytes is more than the {limit} bytes this peer may send");
            return Err(io::Error::new(io::ErrorKind::InvalidData, why).into());
        }
        let mut body = body_buffer(len);
        r.take(len as u64).read_to_end(&mut body).await?;
        decode(len, &body).map(Some)
    }

    /// [`write()`], giving up after `timeout`: a peer that does not read must not pin the
    /// connection and the frame's memory.
    pub async fn write_async<T: Serialize>(w: &mut (impl AsyncWrite + Unpin), msg: &T, timeout: Duration) -> io::Result<()> {
        let frame = encode(msg);
        match tokio::time::timeout(timeout, w.write_all(&frame)).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("it did not read a {} byte answer within {} s", frame.len(), timeout.as_secs()),
            )),
        }
    }
}
#[cfg(feature = "daemon")]
pub use nonblocking::{read_async, write_async};

/// A blocking connection to the daemon (no runtime): the hook and the CLI use it.
pub struct Client {
    stream: std::os::unix::net::UnixStream,
    /// When the whole exchange must be over: every later write and read gets what is left,
    /// so a daemon that trickles its answer cannot stretch it.
    deadline: Option<Instant>,
}

impl Client {
    /// Connects to `socket`; `timeout` bounds the whole exchange from now on: the connect
    /// itself and every call on this client, together.
    pub fn connect(socket: &Path, timeout: Option<Duration>) -> Result<Client, FrameError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let stream = match deadline {
            None => UnixStream::connect(socket)?,
            Some(d) => connect_by(socket, d)?,
        };
        Ok(Client { stream, deadline })
    }

    /// Sends one request and reads the answer.
    pub fn call(&mut self, req: &Request) -> Result<Response, FrameError> {
        let mut conn = Bounded { stream: &self.stream, deadline: self.deadline };
        // The daemon may answer (a refusal) and close before reading everything: read its
        // answer even when the write failed.
        let written = write(&mut conn, req);
        match read(&mut conn) {
            Ok(r) => Ok(r),
            Err(e) => Err(written.err().map_or(e, FrameError::from)),
        }
    }
}

/// Connects to a Unix socket, giving up after `timeout` (see [`connect_by`]).
pub fn connect(socket: &Path, timeout: Duration) -> io::Result<UnixStream> {
    connect_by(socket, Instant::now() + timeout)
}

/// Connects to a Unix socket, giving up at `deadline`. A plain `connect` blocks for as long
/// as the listener's backlog is full (a wedged daemon, one that never accepts); a
/// non-blocking one fails at once with EAGAIN there, and polling cannot wait for room in
/// another socket's backlog. The kernel bounds a blocking connect by the socket's send
/// timeout (socket(7), `SO_SNDTIMEO`), and wakes it as soon as there is room.
fn connect_by(socket: &Path, deadline: Instant) -> io::Result<UnixStream> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    let timed_out = || io::Error::new(io::ErrorKind::TimedOut, "connecting timed out (the daemon accepts no connections)");
    // SAFETY: zeroed sockaddr_un is valid; sun_path is filled below within its length.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let path = socket.as_os_str().as_bytes();
    if path.len() >= addr.sun_path.len() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "socket path is too long"));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(path) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain syscall; the fd is owned from here on.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a new socket nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = (std::mem::size_of::<libc::sa_family_t>() + path.len()) as libc::socklen_t;
    // Bounded: each try waits at most until the deadline, and only a signal ends one early.
    for _ in 0..1000 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out());
        }
        // A zero timeout would mean "forever": at least one microsecond.
        let tv = libc::timeval { tv_sec: left.as_secs() as _, tv_usec: left.subsec_micros().max(1) as _ };
        // SAFETY: tv is a valid timeval for SO_SNDTIMEO; addr/len describe a valid sockaddr_un.
        let r = unsafe {
            libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_SNDTIMEO, (&tv as *const libc::timeval).cast(), std::mem::size_of::<libc::timeval>() as libc::socklen_t)
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above.
        if unsafe { libc::connect(fd.as_raw_fd(), (&addr as *const libc::sockaddr_un).cast(), len) } == 0 {
            return Ok(UnixStream::from(fd));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) | Some(libc::EINPROGRESS) => return Err(timed_out()),
            _ => return Err(e),
        }
    }
    Err(timed_out())
}

/// The stream seen through a deadline: each read and write may block only for what is left.
struct Bounded<'a> {
    stream: &'a UnixStream,
    deadline: Option<Instant>,
}

impl Bounded<'_> {
    fn arm(&self, set: impl Fn(&UnixStream, Option<Duration>) -> io::Result<()>) -> io::Result<()> {
        let Some(d) = self.deadline else { return Ok(()) };
        let left = d.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out(io::ErrorKind::TimedOut.into()));
        }
        set(self.stream, Some(left))
    }
}

/// A socket timeout shows as EAGAIN ("Resource temporarily unavailable"): say what it is.
fn timed_out(e: io::Error) -> io::Error {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => io::Error::new(io::ErrorKind::TimedOut, "the daemon did not answer in time"),
        _ => e,
    }
}

impl Read for Bounded<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.arm(UnixStream::set_read_timeout)?;
        (&mut &*self.stream).read(buf).map_err(timed_out)
    }
}

impl Write for Bounded<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.arm(UnixStream::set_write_timeout)?;
        (&mut &*self.stream).write(buf).map_err(timed_out)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One request on a new connection.
pub fn call(socket: &Path, req: &Request, timeout: Option<Duration>) -> Result<Response, FrameError> {
    Client::connect(socket, timeout)?.call(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_headers_are_refused() {
        let f = encode(&Request::Wait { timeout_ms: 5, paths: None });
        assert!(matches!(read::<Request>(&mut &f[..]).unwrap(), Request::Wait { timeout_ms: 5, paths: None }));
        let mut bad = f.clone();
        bad[0] = b'X';
        assert!(matches!(read::<Request>(&mut &bad[..]), Err(FrameError::BadMagic(_))));
        let mut bad = f.clone();
        bad[4] = 2;
        assert!(matches!(read::<Request>(&mut &bad[..]), Err(FrameError::BadVersion(2))));
        let mut bad = f.clone();
        bad[8..12].copy_from_slice(&(MAX_FRAME + 1).to_le_bytes());
        assert!(matches!(read::<Request>(&mut &bad[..]), Err(FrameError::TooLarge(_))));
        let body = br#"{"op":"enqueue","paths":[{"path":"/tmp/x"}]}"#;
        let mut bad = f[..8].to_vec();
        bad.extend_from_slice(&(body.len() as u32).to_le_bytes());
        bad.extend_from_slice(body);
        let e = read::<Request>(&mut &bad[..]).unwrap_err().to_string();
        assert!(e.contains("malformed message"), "{e}");
    }

    #[test]
    fn op_is_the_tag_on_the_wire() {
        let p = StorePath::parse("/nix/store/00000000000000000000000000000000-x").unwrap();
        let all = [
            Request::Enqueue { paths: vec![], drv: None, realisations: vec![], part: false },
            Request::Missing { paths: vec![p.clone()] },
            Request::Roots { paths: vec![p.clone()], drv: None, nar_hashes: vec![] },
            Request::Status,
            Request::Wait { timeout_ms: 1, paths: None },
            Request::Report { roots: vec![p.clone()], drv: None, reason: "r".into() },
            Request::Dropped,
            Request::Recheck { paths: vec![p.clone()] },
            Request::Repair { paths: vec![], repair: vec![p] },
        ];
        for req in all {
            let json = serde_json::to_value(&req).unwrap();
            assert_eq!(json["op"], req.op(), "{json}");
        }
    }

    #[cfg(feature = "daemon")]
    #[test]
    fn async_frames_round_trip_end_cleanly_and_time_out() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (mut a, mut b) = tokio::io::duplex(1 << 16);
            let req = Request::Wait { timeout_ms: 7, paths: None };
            write_async(&mut a, &req, Duration::from_secs(5)).await.unwrap();
            // What the sync reader reads is what the async writer wrote, and back.
            let got: Option<Request> = read_async(&mut b, MAX_FRAME as usize).await.unwrap();
            assert!(matches!(got, Some(Request::Wait { timeout_ms: 7, paths: None })));
            let frame = encode(&Response::Queued { new: 3 });
            assert!(matches!(read::<Response>(&mut &frame[..]).unwrap(), Response::Queued { new: 3 }));
            tokio::io::AsyncWriteExt::write_all(&mut a, &frame[..HEADER_LEN + 2]).await.unwrap();
            drop(a);
            // A body cut short is an error; a stream that ends between frames is not.
            assert!(matches!(read_async::<Response>(&mut b, MAX_FRAME as usize).await, Err(FrameError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof));
            assert!(read_async::<Response>(&mut b, MAX_FRAME as usize).await.unwrap().is_none());
            let mut bad = encode(&req);
            bad[0] = b'X';
            assert!(matches!(read_async::<Request>(&mut &bad[..], MAX_FRAME as usize).await, Err(FrameError::BadMagic(_))));
            // A peer that does not read: the write gives up.
            let (mut a, _b) = tokio::io::duplex(16);
            let e = write_async(&mut a, &req, Duration::from_millis(50)).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        });
    }
}
