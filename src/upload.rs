//! One item, start to finish: store path → NAR (streamed, hashed, checked against the
//! NarHash) → compressed → target, then the narinfo; or a build log to `log/`.
//!
//! How the NAR goes up depends on its size, so that upload time hides behind compression:
//! - small (at most one part): serialised and compressed in memory, one PUT to its key;
//! - large: compressed on a blocking thread into parts that go up as they are filled, to a
//!   random key under [`storage::STREAM_TMP_PREFIX`] (the final key, Nix's
//!   `nar/<filehash>.nar.zst`, is known only once the last byte is compressed); when the
//!   NarHash checks out the object is moved to its key (server-side copy), otherwise the
//!   upload is aborted. An object at a `nar/` key is thus always whole, and always has the
//!   hash its name says, whichever builder (and compression setting) wrote it;
//! - a target that takes whole objects only (`multipart-upload=false`): a compressed temp
//!   file in the state dir, then one PUT.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::cache::collection::{Gate, GcWatch, Look, Settled, Timing};
use crate::metrics::InFlight;
use crate::nix::{db, nar, NarInfo, PathInfo, Realisation, StorePath};
use crate::outcome::{Outcome, UploadError};
use crate::queue::{Item, Kind};
use crate::store_url::{Compression, StoreUrl};
use crate::storage::{self, Body, Chunk, Target, TempFile};

/// How an item ended well: its outcome, and for a path the marker of the collection epoch
/// it is safe in (see `cache::collection`): the queue records it `done` only if that is still
/// the cache's epoch, else `stale` (looked for again before anything relies on it).
#[derive(Debug)]
pub struct Done {
    pub outcome: Outcome,
    pub marker: Option<Arc<str>>,
}

impl Done {
    fn plain(outcome: Outcome) -> Done {
        Done { outcome, marker: None }
    }
}

/// What the workers share.
pub struct Uploader {
    pub target: Arc<dyn Target>,
    pub url: StoreUrl,
    /// Where compressed NARs are written before they go to the target.
    pub tmp_dir: PathBuf,
    /// Caches whose paths are not uploaded again (`upstream`).
    pub upstreams: Option<crate::upstream::Upstreams>,
    /// Counts outcomes, and shows the uploads in flight with their progress.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// What is not uploaded (`exclude`, `upstream-keys`): see [`Uploader::skip`].
    pub filters: crate::config::Filters,
    /// The daemon's view of `narq gc`/`narq rm` runs: narinfos are put only when it allows.
    pub gc: Option<Arc<GcWatch>>,
}

/// Free space kept on the file system of the state dir, beyond a NAR's temp file: the
/// queue and the spool live there, and a full disk would make narq refuse (or the hook
/// spool) the very requests it exists to keep.
pub const MIN_FREE: u64 = 256 << 20;

/// Whether `dir` can take a temp file of up to `size` bytes and keep [`MIN_FREE`] free; the
/// error says how much is free and needed. A compressed NAR is at most about its NAR size.
fn check_room(dir: &Path, size: u64) -> Result<(), String> {
    let free = crate::spool::free_bytes(dir).map_err(|e| format!("checking the free space of {}: {e}", dir.display()))?;
    if free < size.saturating_add(MIN_FREE) {
        return Err(format!(
            "not enough free space in {}: {} MiB free, a NAR of {} MiB plus {} MiB kept free for the queue and spool; will retry",
            dir.display(),
            free >> 20,
            size.div_ceil(1 << 20),
            MIN_FREE >> 20
        ));
    }
    Ok(())
}

/// Result of compressing a NAR.
struct Compressed {
    nar: nar::NarStats,
    file_stats: nar::NarStats,
    /// The NAR's listing, when `write-nar-listing=true`.
    listing: Option<Vec<u8>>,
}

/// NARs at least this large are compressed with one zstd worker per core.
const MULTITHREAD_ABOVE: u64 = 4 << 20;
/// Input per zstd worker job: small enough to keep memory flat, large enough to keep the
/// ratio (zstd's minimum is 512 KiB).
const ZSTD_JOB_SIZE: u32 = 2 << 20;
/// NARs up to this size (and one part of the target's streamed uploads) are serialised and
/// compressed in memory: no temp file, no fsync, one request.
const IN_MEMORY_MAX: u64 = 8 << 20;

/// A writer that reports what passes through it to an upload's progress.
struct Counting<'a, W> {
    inner: W,
    progress: &'a InFlight,
}

impl<W: Write> Write for Counting<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.progress.add(n as u64);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// NARs up to this size are made on the async worker's thread (a few hundred µs at most).
const INLINE_MAX: u64 = 64 << 10;

/// Serialises `path` as a NAR into `out`, compressed as `url` says, hashing both (and
/// listing it with `write-nar-listing`); counts the NAR bytes into `progress`.
fn compress<W: Write>(path: &Path, nar_size: u64, url: &StoreUrl, out: W, progress: &InFlight) -> io::Result<(W, Compressed)> {
    let out = nar::HashingWriter::new(out);
    let list = url.write_nar_listing;
    let dump = |w: &mut dyn Write| nar::dump_listed(path, &mut Counting { inner: w, progress }, list);
    let (out, (nar, listing)) = match url.compression {
        Compression::None => {
            let mut out = out;
            let s = dump(&mut out)?;
            (out, s)
        }
        Compression::Zstd => {
            let mut enc = zstd::Encoder::new(out, url.compression_level.unwrap_or(DEFAULT_ZSTD_LEVEL))?;
            if parallel(url, nar_size) {
                enc.multithread(cores())?;
                // Bounds what the workers buffer (by default jobs grow with the window).
                enc.set_parameter(zstd::stream::raw::CParameter::JobSize(ZSTD_JOB_SIZE))?;
            }
            let s = dump(&mut enc)?;
            (enc.finish()?, s)
        }
        Compression::Xz => {
            let stream = xz_encoder(url.compression_level.unwrap_or(6) as u32, nar_size, parallel(url, nar_size))?;
            let mut enc = xz2::write::XzEncoder::new_stream(out, stream);
            let s = dump(&mut enc)?;
            (enc.finish()?, s)
        }
    };
    let (w, file_stats) = out.finish();
    Ok((w, Compressed { nar, file_stats, listing }))
}

/// The dictionary of xz at `level` (0–9) for a NAR of `nar_size` bytes: the preset's, but no
/// larger than the NAR (rounded up to a power of two, at least 4 KiB), which compresses it
/// the same. The encoder's tables follow the dictionary: preset 6's 8 MiB one takes ~90 MiB,
/// 17 MiB of it written before the first byte, for a path of 100 bytes as for one of 8 MiB;
/// 64 small paths compressed at once took a daemon past 800 MiB.
fn xz_dict(level: u32, nar_size: u64) -> u32 {
    const PRESETS: [u64; 10] = [256 << 10, 1 << 20, 2 << 20, 4 << 20, 4 << 20, 8 << 20, 8 << 20, 16 << 20, 32 << 20, 64 << 20];
    nar_size.max(4096).next_power_of_two().min(PRESETS[level.min(9) as usize]) as u32
}

/// An xz encoder at `level` for a NAR of `nar_size` bytes ([`xz_dict`]), on every core if
/// `parallel`.
fn xz_encoder(level: u32, nar_size: u64, parallel: bool) -> io::Result<xz2::stream::Stream> {
    use xz2::stream::{Check, Filters, LzmaOptions, MtStreamBuilder, Stream};
    let mut lzma = LzmaOptions::new_preset(level).map_err(io::Error::other)?;
    lzma.dict_size(xz_dict(level, nar_size));
    let mut filters = Filters::new();
    filters.lzma2(&lzma);
    match parallel {
        true => MtStreamBuilder::new().threads(cores()).filters(filters).check(Check::Crc64).encoder(),
        false => Stream::new_stream_encoder(&filters, Check::Crc64),
    }
    .map_err(io::Error::other)
}

/// What xz's encoder holds for a NAR of `nar_size` bytes at the default level: its tables,
/// ~10 bytes per byte of dictionary ([`xz_dict`]; half a MiB more of state and buffers is
/// not counted: the encoder is dropped before the upload's requests, which take longer).
fn xz_memory(nar_size: u64) -> u64 {
    10 * u64::from(xz_dict(6, nar_size))
}

/// The cores compression may use.
fn cores() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get()) as u32
}

/// Whether a NAR of `nar_size` bytes is compressed on every core: as `parallel-compression`
/// says, else (narq's default) for NARs of at least [`MULTITHREAD_ABOVE`], where worker
/// threads pay off (for small ones they would just take CPU from the builds).
fn parallel(url: &StoreUrl, nar_size: u64) -> bool {
    cores() > 1 && url.parallel_compression.unwrap_or(nar_size >= MULTITHREAD_ABOVE)
}

/// zstd's level when the store URL names none: from the compression figures in docs/performance.md
/// (time and ratio on a 1 GB path).
const DEFAULT_ZSTD_LEVEL: i32 = 3;

/// Why a NAR could not be made.
enum NarError {
    /// Reading the store path or writing the output failed.
    Io(io::Error),
    /// The NAR is not what the Nix database says: its hash and size.
    Mismatch(nar::NarStats),
}

impl From<io::Error> for NarError {
    fn from(e: io::Error) -> Self {
        NarError::Io(e)
    }
}

/// `Ok` if `nar` is what the database says `info` is.
fn check_nar(info: &PathInfo, nar: &nar::NarStats) -> Result<(), NarError> {
    match nar.hash == info.nar_hash && nar.size == info.nar_size {
        true => Ok(()),
        false => Err(NarError::Mismatch(*nar)),
    }
}

/// The NAR of a small path, compressed in memory: checked against the database before it
/// is compressed.
fn compress_in_memory(path: &Path, info: &PathInfo, url: &StoreUrl, progress: &InFlight) -> Result<(Vec<u8>, Compressed), NarError> {
    let mut raw = Vec::with_capacity(info.nar_size.min(IN_MEMORY_MAX) as usize);
    let (nar, listing) = nar::dump_listed(path, &mut Counting { inner: &mut raw, progress }, url.write_nar_listing)?;
    check_nar(info, &nar)?;
    let out = match url.compression {
        Compression::None => raw,
        // One shot: zstd sizes its tables to the input, a few KiB for a small path.
        Compression::Zstd if !parallel(url, info.nar_size) => zstd::bulk::compress(&raw, url.compression_level.unwrap_or(DEFAULT_ZSTD_LEVEL))?,
        // Streamed through the encoder (xz, and zstd on every core).
        Compression::Zstd | Compression::Xz => {
            drop(raw);
            let (out, c) = compress(path, info.nar_size, url, Vec::new(), progress)?;
            check_nar(info, &c.nar)?;
            return Ok((out, c));
        }
    };
    let file_stats = nar::NarStats { hash: crate::nix::Sha256::digest(&out), size: out.len() as u64 };
    Ok((out, Compressed { nar, file_stats, listing }))
}

/// Parts larger than this are written to temp files in the state dir, not held in memory:
/// the page cache holds them while they go up, and the daemon's memory stays flat (an
/// S3 part is at least 5 MiB, and a few are in flight while the next is filled).
const SPILL_ABOVE: u64 = 1 << 20;

/// Hands what is written to it on as [`Chunk`]s of `part` bytes (the last may be shorter),
/// waiting while the uploader is busy: for a thread of the blocking pool.
struct ChunkWriter {
    part: u64,
    /// Bytes in the part being filled.
    filled: u64,
    /// The part being filled, when parts are held in memory.
    mem: Vec<u8>,
    /// The part being filled, when parts are spilled ([`SPILL_ABOVE`]).
    file: Option<(TempFile, BufWriter<File>)>,
    /// Where parts are spilled, and the start of their names; `None`: parts in memory.
    spill: Option<PathBuf>,
    /// Parts sent so far, for the temp files' names.
    sent: u32,
    tx: tokio::sync::mpsc::Sender<Chunk>,
}

impl ChunkWriter {
    fn new(part: u64, spill: Option<PathBuf>, tx: tokio::sync::mpsc::Sender<Chunk>) -> Self {
        let mem = if spill.is_none() { Vec::with_capacity(part as usize) } else { Vec::new() };
        ChunkWriter { part, filled: 0, mem, file: None, spill, sent: 0, tx }
    }

    fn send(&mut self, chunk: Chunk) -> io::Result<()> {
        self.tx.blocking_send(chunk).map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the upload stopped"))
    }

    /// Sends the part being filled, if it has any bytes.
    fn send_part(&mut self) -> io::Result<()> {
        if self.filled == 0 {
            return Ok(());
        }
        let body = match self.file.take() {
            Some((tmp, w)) => {
                w.into_inner().map_err(|e| e.into_error())?;
                Body::File(tmp)
            }
            None => Body::Bytes(std::mem::replace(&mut self.mem, Vec::with_capacity(self.part as usize))),
        };
        self.filled = 0;
        self.sent += 1;
        self.send(Chunk::Data(body))
    }

    /// Sends what is left and the end: the upload completes.
    fn end(mut self) -> io::Result<()> {
        self.send_part()?;
        self.send(Chunk::End)
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min((self.part - self.filled) as usize);
        match &self.spill {
            Some(prefix) => {
                if self.file.is_none() {
                    let tmp = TempFile::new(PathBuf::from(format!("{}.{}.part", prefix.display(), self.sent)));
                    let f = File::create(tmp.path())?;
                    self.file = Some((tmp, BufWriter::with_capacity(256 << 10, f)));
                }
                if let Some((_, w)) = &mut self.file {
                    w.write_all(&data[..n])?;
                }
            }
            None => self.mem.extend_from_slice(&data[..n]),
        }
        self.filled += n as u64;
        if self.filled == self.part {
            self.send_part()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Compresses the NAR of `path` into chunks for a streamed upload; ends the stream (the
/// upload completes) only if the NAR is what the database says, else the channel closes
/// without its end and the upload is aborted.
fn compress_streamed(path: &Path, info: &PathInfo, url: &StoreUrl, w: ChunkWriter, progress: &InFlight) -> Result<Compressed, NarError> {
    let (w, c) = compress(path, info.nar_size, url, w, progress)?;
    check_nar(info, &c.nar)?;
    w.end()?;
    Ok(c)
}

/// A random name for a streamed upload's temporary key.
fn random_name() -> String {
    let mut b = [0u8; 12];
    // SAFETY: writes at most b.len() bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // Unique enough without it: this process, this instant.
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        b[..8].copy_from_slice(&(t as u64).to_le_bytes());
        b[8..].copy_from_slice(&std::process::id().to_le_bytes());
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Build logs are cut here (with a note at the end). Nix keeps logs bzip2-compressed, and a
/// few KiB of bzip2 can expand to gigabytes: the cap bounds the time, disk and cache space
/// one log costs, whoever ran the build.
pub const MAX_LOG: u64 = 64 << 20;

/// Streams the build log at `src` (plain or `.bz2`) into `tmp`, at most [`MAX_LOG`] bytes of
/// text, compressed as the Content-Encoding `encoding` (`gzip` or `zstd`, at their default
/// levels: a few MiB of encoder memory) says; returns the bytes of text written and whether
/// it was cut.
fn copy_log(src: &Path, tmp: &Path, encoding: Option<&str>) -> io::Result<(u64, bool)> {
    let file = io::BufReader::new(File::open(src)?);
    let mut text: Box<dyn Read> = match src.extension().is_some_and(|e| e == "bz2") {
        true => Box::new(bzip2::read::BzDecoder::new(file)),
        false => Box::new(file),
    };
    // Not NotFound or PermissionDenied: those say the log is gone or unreadable.
    let out = BufWriter::new(File::create(tmp).map_err(|e| io::Error::other(format!("{}: {e}", tmp.display())))?);
    let mut out: Box<dyn WriteFinish> = match encoding {
        None => Box::new(out),
        Some("gzip") => Box::new(flate2::write::GzEncoder::new(out, flate2::Compression::default())),
        Some("zstd") => Box::new(zstd::Encoder::new(out, DEFAULT_ZSTD_LEVEL)?),
        Some(e) => return Err(io::Error::other(format!("no encoder for Content-Encoding {e:?}"))),
    };
    let mut n = io::copy(&mut (&mut text).take(MAX_LOG), &mut out)?;
    let truncated = n == MAX_LOG && text.read(&mut [0u8; 1])? > 0;
    if truncated {
        let note = format!("\n[narq: build log truncated: only its first {} MiB were uploaded]\n", MAX_LOG >> 20);
        out.write_all(note.as_bytes())?;
        n += note.len() as u64;
    }
    out.finish()?.sync_all()?;
    Ok((n, truncated))
}

/// A writer over a file that can be finished (compressors write their end) and synced.
trait WriteFinish: Write {
    fn finish(self: Box<Self>) -> io::Result<File>;
}

impl WriteFinish for BufWriter<File> {
    fn finish(self: Box<Self>) -> io::Result<File> {
        self.into_inner().map_err(|e| e.into_error())
    }
}

impl WriteFinish for flate2::write::GzEncoder<BufWriter<File>> {
    fn finish(self: Box<Self>) -> io::Result<File> {
        (*self).finish()?.into_inner().map_err(|e| e.into_error())
    }
}

impl WriteFinish for zstd::Encoder<'static, BufWriter<File>> {
    fn finish(self: Box<Self>) -> io::Result<File> {
        (*self).finish()?.into_inner().map_err(|e| e.into_error())
    }
}

/// What an item holds while it uploads, for the dispatcher's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cost {
    /// About this many bytes of memory: a small NAR (raw and compressed), a log's encoder.
    Memory(u64),
    /// A streamed NAR: a few parts and a compressor on every core, bounded by itself.
    Stream,
}

/// What a build log upload holds: the encoder's buffers (streamed from and to files).
const LOG_COST: u64 = 1 << 20;

impl Uploader {
    /// What `item` holds while it uploads (see [`Cost`]).
    pub fn cost(&self, item: &Item) -> Cost {
        match &item.kind {
            Kind::Nar(info) if self.in_memory(info.nar_size) => {
                // Small NARs: the NAR and its compressed copy, plus the encoder's tables
                // (zstd sizes them to the input: a few KiB).
                let tables = if self.url.compression == Compression::Xz { xz_memory(info.nar_size).max(64 << 10) } else { 64 << 10 };
                Cost::Memory(2 * info.nar_size + tables)
            }
            Kind::Nar(info) if self.target.stream_part_size(info.nar_size).is_some() => Cost::Stream,
            // A temp file in the state dir: only the encoder's memory.
            Kind::Nar(_) => Cost::Memory(16 << 20),
            Kind::Log(_) => Cost::Memory(LOG_COST),
            // A few hundred bytes of JSON.
            Kind::Realisation(_) => Cost::Memory(4 << 10),
        }
    }

    /// Whether a NAR of `nar_size` bytes is made in memory and goes up in one request: up
    /// to one part of the target's streamed uploads, and at most [`IN_MEMORY_MAX`].
    fn in_memory(&self, nar_size: u64) -> bool {
        nar_size <= self.target.stream_part_size(nar_size).unwrap_or(IN_MEMORY_MAX).min(IN_MEMORY_MAX)
    }

    pub async fn run(&self, item: &Item) -> Result<Done, UploadError> {
        self.run_in(item, self.gc.as_ref().map_or(0, |g| g.epoch())).await
    }

    /// [`Uploader::run`] for an item that the queue gave as ready in the watch's `epoch`:
    /// what it remembered then of the item's references is trusted only in that epoch.
    pub async fn run_in(&self, item: &Item, epoch: u64) -> Result<Done, UploadError> {
        let start = Instant::now();
        let tracked = self.metrics.track(item);
        let result = match self.skip(item) {
            Some(skipped) => Ok(Done::plain(skipped)),
            None => match &item.kind {
                Kind::Nar(info) => self.upload_path(info, item, tracked.progress.clone(), epoch).await,
                Kind::Log(drv) => self.upload_log(drv).await.map(Done::plain),
                Kind::Realisation(r) => self.upload_realisation(r).await.map(Done::plain),
            },
        };
        self.metrics.finished(item, result.as_ref().map(|d| &d.outcome), start.elapsed());
        result
    }

    /// What the config leaves out, decided here, when the item is about to go, rather than
    /// when it is admitted: the daemon reads the config the user controls (the hook only
    /// hands over builds), the current config applies to what was queued before it changed,
    /// and an item made pending again (`narq push`, a store change) is decided afresh.
    ///
    /// A path that `exclude` matches is not uploaded; nor is an item (a path, a realisation)
    /// that references an excluded one (`excluded_ref`, from the queue), since the cache's
    /// closure would be broken: each is done as [`Outcome::Excluded`] with its reason, so its
    /// referrers follow. A path signed by an `upstream-keys` key came from that cache: done
    /// as [`Outcome::Upstream`] without a request. Build logs are never left out.
    fn skip(&self, item: &Item) -> Option<Outcome> {
        let why = if let Some(r) = &item.excluded_ref {
            format!("references {r}, which is excluded")
        } else if let Kind::Nar(info) = &item.kind {
            if let Some(key) = self.filters.upstream_key(info) {
                tracing::info!(path = %info.path, key, "{} is signed by upstream key {key}: not uploaded", info.path);
                return Some(Outcome::Upstream);
            }
            format!("its name matches exclude pattern {:?}", self.filters.excluded(info.path.name())?)
        } else {
            return None;
        };
        tracing::info!(item = %item.key, reason = %why, "excluded: {} {why}", item.key);
        Some(Outcome::Excluded(why))
    }

    /// The gate open (no collection running), with what `info` relies on looked for again
    /// if the epoch moved since `known` (the epoch its references were known in): its
    /// references' narinfos, and `nar` when given. Looked for after the gate's look, so that
    /// they hold in its epoch.
    async fn open_gate(&self, gc: &GcWatch, info: &PathInfo, nar: Option<&str>, known: &mut u64) -> Result<Look, UploadError> {
        let look = match gc.wait_open(Timing::get().gc_wait).await? {
            Gate::Held(why) => return Err(UploadError::Transient(format!("{}: {why}", info.path))),
            Gate::Open(look) => look,
        };
        if look.epoch != *known {
            self.check_relied_on(info, nar).await?;
            *known = look.epoch;
        }
        Ok(look)
    }

    /// Looks in the cache for what `info`'s narinfo relies on: a reference or the NAR that is
    /// gone (a collection removed it) fails the item for now; the queue has the reference
    /// uploaded again first (it was made stale, and the item relies on it), and the item
    /// then uploads its NAR and narinfo again.
    async fn check_relied_on(&self, info: &PathInfo, nar: Option<&str>) -> Result<(), UploadError> {
        self.check_refs(info.references.iter().filter(|r| **r != info.path), info, nar).await
    }

    /// [`Uploader::check_relied_on`] of a narinfo that a collection may have overlapped: the
    /// narinfo itself too (one that was found, or put, may be what it deleted).
    async fn check_overlapped(&self, info: &PathInfo, nar: Option<&str>) -> Result<(), UploadError> {
        self.check_refs(info.references.iter().filter(|r| **r != info.path).chain([&info.path]), info, nar).await
    }

    async fn check_refs(&self, refs: impl Iterator<Item = &StorePath>, info: &PathInfo, nar: Option<&str>) -> Result<(), UploadError> {
        for r in refs {
            if !self.target.exists(&format!("{}.narinfo", r.hash_part())).await? {
                return Err(UploadError::Transient(match *r == info.path {
                    true => format!("{r} was removed from the cache by a collection meanwhile; uploading it again"),
                    false => format!("{r}, which {} references, was removed from the cache; it is uploaded again first", info.path),
                }));
            }
        }
        if let Some(nar) = nar {
            if !self.target.exists(nar).await? {
                return Err(UploadError::Transient(format!("the NAR of {} ({nar}) was removed from the cache; uploading it again", info.path)));
            }
        }
        Ok(())
    }

    /// What a write (or a finding) that returned at `landed`, under `open`, counts in (see
    /// `cache::collection`): the marker of the epoch it is safe in, once what it relies on
    /// was looked for again if a collection may have overlapped it.
    async fn settle(&self, gc: &GcWatch, info: &PathInfo, nar: Option<&str>, open: &Look, landed: Instant) -> Result<Option<Arc<str>>, UploadError> {
        match gc.settle(open, landed).await? {
            Ok(Settled::Safe(look)) => Ok(Some(look.marker)),
            Ok(Settled::Check(look)) => {
                tracing::info!(path = %info.path, "a collection of the cache may have overlapped the upload of {}: looking for what it relies on", info.path);
                self.check_overlapped(info, nar).await?;
                Ok(Some(look.marker))
            }
            Err(why) => Err(UploadError::Transient(format!("{}: {why}", info.path))),
        }
    }

    /// Puts the narinfo when no collection is in the way, then settles it (see
    /// `cache::collection`): a put that returned late, or that a collection may have
    /// overlapped, counts only once what it relies on is found in the cache again. A repair
    /// keeps the signatures the cache's narinfo has over the same contents, read after the
    /// gate opened and written back only if unchanged meanwhile where the store can tell.
    async fn put_narinfo(&self, narinfo: &mut NarInfo, key: &str, repair: bool, known: &mut u64) -> Result<Option<Arc<str>>, UploadError> {
        let info = narinfo.info.clone();
        let Some(gc) = &self.gc else {
            self.write_narinfo(narinfo, key, repair).await?;
            return Ok(None);
        };
        let open = self.open_gate(gc, &info, Some(&narinfo.url), known).await?;
        self.write_narinfo(narinfo, key, repair).await?;
        self.settle(gc, &info, Some(&narinfo.url), &open, Instant::now()).await
    }

    /// Writes the narinfo; a repair merges the signatures the cache has over the same
    /// contents (`narq sign` adds them there only), with a conditional put where the store
    /// honours one, so that a signature added meanwhile is not lost.
    async fn write_narinfo(&self, narinfo: &mut NarInfo, key: &str, repair: bool) -> Result<(), UploadError> {
        if !repair {
            return Ok(self.target.put(key, Body::Bytes(narinfo.to_string().into_bytes()), storage::NARINFO_TYPE).await?);
        }
        let conditional = self.target.conditional_puts().await?.is_ok();
        for _ in 0..5 {
            let Some((body, version)) = self.target.get_versioned(key).await? else { break };
            if let Ok(old) = NarInfo::parse(&String::from_utf8_lossy(&body)) {
                if old.info.fingerprint() == narinfo.info.fingerprint() {
                    narinfo.info.sigs.extend(old.info.sigs);
                }
            }
            if !conditional {
                break;
            }
            if self.target.put_if_version(key, narinfo.to_string().into_bytes(), storage::NARINFO_TYPE, &version).await? {
                return Ok(());
            }
        }
        Ok(self.target.put(key, Body::Bytes(narinfo.to_string().into_bytes()), storage::NARINFO_TYPE).await?)
    }

    /// Whether the narinfo at `key` is whole: its NAR is there. Asked when a narinfo is found
    /// that an earlier attempt of ours may have put without settling it, or after a
    /// collection: a narinfo put after a collection's final listing may have lost its NAR.
    async fn whole(&self, key: &str) -> Result<bool, UploadError> {
        let Some(body) = self.target.get(key).await? else { return Ok(false) };
        match NarInfo::parse(&String::from_utf8_lossy(&body)) {
            Ok(ni) => Ok(self.target.exists(&ni.url).await?),
            // Not ours to judge (Nix reads more than we parse): as found.
            Err(_) => Ok(true),
        }
    }

    /// Uploads the path unless the cache (or an upstream) has it; with `repair`, uploads it
    /// whatever the cache has (a broken entry there), overwriting: NAR first, narinfo last.
    /// The cache is looked at through the gate (a path a running collection is about to
    /// delete is not found present), and what is found or put settles before it counts.
    async fn upload_path(&self, info: &PathInfo, item: &Item, progress: Arc<InFlight>, ready: u64) -> Result<Done, UploadError> {
        let narinfo_key = format!("{}.narinfo", info.path.hash_part());
        let mut known = ready;
        if !item.repair {
            let open = match &self.gc {
                Some(gc) => Some(self.open_gate(gc, info, None, &mut known).await?),
                None => None,
            };
            if self.target.exists(&narinfo_key).await? {
                let landed = Instant::now();
                // An earlier attempt of ours may have put it late, or a collection may have
                // taken its NAR after a late put: then it is uploaded again.
                let doubt = item.attempts > 0 || known != ready;
                if !doubt || self.whole(&narinfo_key).await? {
                    let marker = match (&self.gc, &open) {
                        (Some(gc), Some(open)) => self.settle(gc, info, None, open, landed).await?,
                        _ => None,
                    };
                    return Ok(Done { outcome: Outcome::Present, marker });
                }
                tracing::info!(path = %info.path, "the narinfo of {} is in the cache without its NAR: uploading it again", info.path);
            } else if let Some(up) = &self.upstreams {
                if let Some(url) = up.find(&info.path).await {
                    tracing::info!(path = %info.path, upstream = url, "in an upstream cache, not uploaded");
                    return Ok(Done::plain(Outcome::Upstream));
                }
            }
        }
        let start = Instant::now();
        let c = self.upload_nar(info, &progress).await?;
        let mut narinfo = NarInfo {
            info: info.clone(),
            url: self.nar_key(&c.file_stats),
            compression: self.url.compression.name().to_string(),
            file_hash: Some(c.file_stats.hash),
            file_size: Some(c.file_stats.size),
        };
        self.put_listing(info, c.listing).await?;
        let marker = self.put_narinfo(&mut narinfo, &narinfo_key, item.repair, &mut known).await?;
        // The message stands alone for `journalctl -u narq`; the fields are for queries.
        let ms = start.elapsed().as_millis() as u64;
        tracing::info!(
            path = %info.path,
            nar_bytes = c.nar.size,
            bytes = c.file_stats.size,
            duration_ms = ms,
            "uploaded {} ({} bytes, {} compressed, {ms} ms)",
            info.path,
            c.nar.size,
            c.file_stats.size
        );
        Ok(Done { outcome: Outcome::Uploaded { bytes: c.file_stats.size }, marker })
    }

    /// Writes `<hashpart>.ls` (`write-nar-listing=true`), before the narinfo as Nix does, so
    /// that a narinfo with listings on has its listing.
    async fn put_listing(&self, info: &PathInfo, listing: Option<Vec<u8>>) -> Result<(), UploadError> {
        if let Some(listing) = listing {
            let key = format!("{}.ls", info.path.hash_part());
            self.target.put(&key, Body::Bytes(listing), storage::JSON_TYPE).await?;
        }
        Ok(())
    }

    /// Writes `realisations/<id>.doi`, which Nix 2.4 to 2.34 read, and, when it carries its
    /// build trace, `build-trace-v2/<drv>/<output>.doi`, which 2.35 reads instead (each Nix
    /// reads only its own: both, so that a cache serves every client). The queue starts it
    /// only once its out path's narinfo is in the cache, so a client that finds either finds
    /// the path.
    async fn upload_realisation(&self, r: &Realisation) -> Result<Outcome, UploadError> {
        let trace = r.build_trace().map(|t| (t.key(), t.to_json().into_bytes()));
        let json = r.to_json().into_bytes();
        let mut bytes = json.len() as u64;
        self.target.put(&r.key(), Body::Bytes(json), storage::JSON_TYPE).await?;
        if let Some((key, json)) = trace {
            bytes += json.len() as u64;
            self.target.put(&key, Body::Bytes(json), storage::JSON_TYPE).await?;
            tracing::info!(id = %r.id, out_path = %r.out_path, build_trace = %key, "uploaded the realisation {} of {} (and {key})", r.id, r.out_path);
        } else {
            tracing::info!(id = %r.id, out_path = %r.out_path, "uploaded the realisation {} of {}", r.id, r.out_path);
        }
        Ok(Outcome::Uploaded { bytes })
    }

    /// Where a NAR with these compressed bytes goes: `nar/<filehash>.nar<ext>`.
    fn nar_key(&self, file: &nar::NarStats) -> String {
        format!("nar/{}.nar{}", file.hash.to_base32(), self.url.compression.extension())
    }

    /// Uploads the NAR of `info` to its key ([`Uploader::nar_key`]), checked against the
    /// NarHash; the way depends on its size (see the module doc).
    async fn upload_nar(&self, info: &PathInfo, progress: &Arc<InFlight>) -> Result<Compressed, UploadError> {
        if self.in_memory(info.nar_size) {
            let (store_path, info2, url, progress) = (PathBuf::from(info.path.to_absolute()), info.clone(), self.url.clone(), progress.clone());
            // Tiny NARs (most paths of a large closure) are made right here: a hop to the
            // blocking pool costs more, and its many threads each keep their own heap.
            let made = if info.nar_size <= INLINE_MAX {
                compress_in_memory(&store_path, &info2, &url, &progress)
            } else {
                tokio::task::spawn_blocking(move || compress_in_memory(&store_path, &info2, &url, &progress))
                    .await
                    .map_err(|e| UploadError::Transient(format!("worker: {e}")))?
            };
            let (bytes, c) = made.map_err(|e| self.nar_error(info, e))?;
            self.target.put(&self.nar_key(&c.file_stats), Body::Bytes(bytes), storage::NAR_TYPE).await?;
            return Ok(c);
        }
        match self.target.stream_part_size(info.nar_size) {
            Some(part) => self.stream_nar(info, part, progress.clone()).await,
            None => self.upload_nar_file(info, progress.clone()).await,
        }
    }

    /// A large NAR, compressed into parts that go up as they are filled (see the module doc).
    async fn stream_nar(&self, info: &PathInfo, part: u64, progress: Arc<InFlight>) -> Result<Compressed, UploadError> {
        // Spilled parts in flight, and the one being filled; and the whole NAR, as before
        // streaming, since a `file://` cache is often on the state dir's disk.
        check_room(&self.tmp_dir, info.nar_size.max(8 * part)).map_err(UploadError::Transient)?;
        let tmp_key = format!("{}{}-{}.nar{}", storage::STREAM_TMP_PREFIX, info.path.hash_part(), random_name(), self.url.compression.extension());
        // One chunk waits in the channel while another is filled: the compressor keeps
        // going while a part is uploaded.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let producer = {
            let (store_path, info, url) = (PathBuf::from(info.path.to_absolute()), info.clone(), self.url.clone());
            let spill = (part > SPILL_ABOVE).then(|| self.tmp_dir.join(tmp_key.rsplit('/').next().unwrap_or("nar")));
            let w = ChunkWriter::new(part, spill, tx);
            tokio::task::spawn_blocking(move || compress_streamed(&store_path, &info, &url, w, &progress))
        };
        let uploaded = self.target.put_streamed(&tmp_key, rx, storage::NAR_TYPE).await;
        let produced = producer.await.map_err(|e| UploadError::Transient(format!("worker: {e}")))?;
        let c = match (produced, uploaded) {
            // The compressor stopped because the upload did: the upload's error is the cause.
            (Err(NarError::Io(e)), Err(up)) if e.kind() == io::ErrorKind::BrokenPipe => return Err(up.into()),
            (Err(e), _) => return Err(self.nar_error(info, e)),
            (Ok(_), Err(up)) => return Err(up.into()),
            (Ok(c), Ok(_)) => c,
        };
        let key = self.nar_key(&c.file_stats);
        if let Err(e) = self.target.rename(&tmp_key, &key, c.file_stats.size, storage::NAR_TYPE).await {
            if let Err(d) = self.target.delete(std::slice::from_ref(&tmp_key)).await {
                tracing::warn!(key = tmp_key, "deleting the temporary object after a failed move: {d}");
            }
            return Err(e.into());
        }
        Ok(c)
    }

    /// A NAR for a target that takes whole objects only: compressed to a temp file in the
    /// state dir, then one PUT.
    async fn upload_nar_file(&self, info: &PathInfo, progress: Arc<InFlight>) -> Result<Compressed, UploadError> {
        check_room(&self.tmp_dir, info.nar_size).map_err(UploadError::Transient)?;
        // Removed on every way out but the one that hands it to the target.
        let tmp = TempFile::new(self.tmp_dir.join(format!("{}.nar.tmp", info.path.hash_part())));
        let made = {
            let (tmp, store_path, info) = (tmp.path().to_path_buf(), PathBuf::from(info.path.to_absolute()), info.clone());
            let url = self.url.clone();
            tokio::task::spawn_blocking(move || -> Result<Compressed, NarError> {
                let out = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
                let (out, c) = compress(&store_path, info.nar_size, &url, out, &progress)?;
                out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
                check_nar(&info, &c.nar)?;
                Ok(c)
            })
            .await
            .map_err(|e| UploadError::Transient(format!("worker: {e}")))?
        };
        let c = made.map_err(|e| self.nar_error(info, e))?;
        self.target.put(&self.nar_key(&c.file_stats), Body::File(tmp), storage::NAR_TYPE).await?;
        Ok(c)
    }

    /// What a failure to make the NAR of `info` means for the item.
    fn nar_error(&self, info: &PathInfo, e: NarError) -> UploadError {
        let e = match e {
            NarError::Mismatch(nar) => {
                return UploadError::Permanent(format!(
                    "contents of {} do not match the Nix database: NAR has {} ({} bytes), database says {} ({} bytes); not uploaded",
                    info.path, nar.hash, nar.size, info.nar_hash, info.nar_size
                ))
            }
            NarError::Io(e) => e,
        };
        if !Path::new(&info.path.to_absolute()).exists() {
            UploadError::Permanent(format!("{} is gone from the store", info.path))
        } else if e.kind() == io::ErrorKind::PermissionDenied {
            UploadError::Permanent(format!("reading {}: {e}", info.path))
        } else if e.kind() == io::ErrorKind::StorageFull {
            UploadError::Transient(format!("writing the NAR of {} to {}: {e}; temp file removed", info.path, self.tmp_dir.display()))
        } else {
            UploadError::Transient(format!("serialising {}: {e}", info.path))
        }
    }

    async fn upload_log(&self, drv: &StorePath) -> Result<Outcome, UploadError> {
        let Some(file) = db::build_log_path(drv) else { return Ok(Outcome::NoLog) };
        let key = format!("log/{}", drv.base_name());
        let tmp = TempFile::new(self.tmp_dir.join(format!("{}.log.tmp", drv.hash_part())));
        let encoding = self.target.log_encoding();
        let copied = {
            let tmp = tmp.path().to_path_buf();
            tokio::task::spawn_blocking(move || copy_log(&file, &tmp, encoding))
                .await
                .map_err(|e| UploadError::Transient(format!("worker: {e}")))?
        };
        let (text_bytes, truncated) = match copied {
            Ok(c) => c,
            Err(e) => {
                // A log that is gone, unreadable or corrupt stays so; anything else (the temp
                // file: a full disk, an I/O error) may pass.
                use io::ErrorKind::*;
                return Err(match e.kind() {
                    NotFound | PermissionDenied | InvalidData | InvalidInput | UnexpectedEof => {
                        UploadError::Permanent(format!("reading the build log of {drv}: {e}"))
                    }
                    _ => UploadError::Transient(format!("copying the build log of {drv} to {}: {e}", self.tmp_dir.display())),
                });
            }
        };
        if truncated {
            tracing::warn!(drv = %drv, "the build log of {drv} is over {} MiB; uploaded its first {} MiB", MAX_LOG >> 20, MAX_LOG >> 20);
        }
        let bytes = std::fs::metadata(tmp.path()).map_or(0, |m| m.len());
        match encoding {
            Some(enc) => self.target.put_encoded(&key, Body::File(tmp), storage::LOG_TYPE, enc).await?,
            None => self.target.put(&key, Body::File(tmp), storage::LOG_TYPE).await?,
        }
        // A build that printed nothing has an empty log: uploaded (`nix log` shows it empty,
        // as Nix's own copy would), but no news.
        if text_bytes > 0 {
            tracing::info!(drv = %drv, bytes, log_bytes = text_bytes, "uploaded the build log of {drv}");
        } else {
            tracing::debug!(drv = %drv, bytes, "uploaded the build log of {drv}, which is empty");
        }
        Ok(Outcome::Uploaded { bytes })
    }

    /// What comes before the first upload: writes `nix-cache-info` unless the cache has
    /// one, and makes the first look for collections of the cache, so that the first uploads
    /// begin in its epoch (begun before it, each would look again at what it references).
    pub async fn prepare(&self) -> Result<(), storage::TargetError> {
        let r = async {
            if !self.target.exists("nix-cache-info").await? {
                let info = self.url.cache_info().into_bytes();
                self.target.put("nix-cache-info", Body::Bytes(info), storage::CACHE_INFO_TYPE).await?;
            }
            if let Some(gc) = &self.gc {
                gc.gate().await?;
            }
            Ok(())
        }
        .await;
        // It pauses uploads as an upload's store failure does: counted alike.
        if let Err(e) = &r {
            self.metrics.store_failed(e);
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xz's dictionary, and with it the encoder's tables, follows the NAR's size up to the
    /// preset's (preset 6's 8 MiB costs ~94 MiB, `xz -vv -6`; 4 KiB, 2 MiB), as the stream
    /// says (its first block's LZMA2 property), and what is compressed still decodes.
    #[test]
    fn xz_is_sized_to_the_nar() {
        let dict_of = |packed: &[u8]| {
            // Stream header (12 bytes), block header size and flags, filter 0x21 (LZMA2), one property byte.
            assert_eq!(packed[14..16], [0x21, 0x01]);
            let d = u32::from(packed[16]);
            (2 | (d & 1)) << (d / 2 + 11)
        };
        let pack = |data: &[u8]| {
            let mut enc = xz2::write::XzEncoder::new_stream(Vec::new(), xz_encoder(6, data.len() as u64, false).unwrap());
            enc.write_all(data).unwrap();
            enc.finish().unwrap()
        };
        assert_eq!(dict_of(&pack(b"a small path")), 4096);
        assert_eq!(xz_dict(6, 100 << 20), 8 << 20);
        assert_eq!(xz_dict(0, 100 << 20), 256 << 10);
        let data: Vec<u8> = (0..200_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        let packed = pack(&data);
        assert_eq!(dict_of(&packed), 1 << 20);
        let mut out = Vec::new();
        xz2::read::XzDecoder::new(&packed[..]).read_to_end(&mut out).unwrap();
        assert_eq!(out, data);
    }
    use std::io::Read;

    #[test]
    fn logs_are_encoded_as_their_content_encoding_says() {
        let dir = std::env::temp_dir().join(format!("narq-log-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("log");
        let text = "building '/nix/store/abc-x.drv'...\nhello\n".repeat(1000);
        std::fs::write(&src, &text).unwrap();
        for enc in [None, Some("gzip"), Some("zstd")] {
            let tmp = dir.join("out");
            assert_eq!(copy_log(&src, &tmp, enc).unwrap(), (text.len() as u64, false));
            let raw = std::fs::read(&tmp).unwrap();
            let mut back = String::new();
            match enc {
                None => back = String::from_utf8(raw).unwrap(),
                Some("gzip") => drop(flate2::read::GzDecoder::new(&raw[..]).read_to_string(&mut back).unwrap()),
                _ => drop(zstd::stream::read::Decoder::new(&raw[..]).unwrap().read_to_string(&mut back).unwrap()),
            }
            assert_eq!(back, text, "{enc:?}");
        }
        assert!(copy_log(&src, &dir.join("out"), Some("xz")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn parallel_compression_follows_the_url() {
        let url = |q: &str| StoreUrl::parse(&format!("file:///x{q}")).unwrap();
        let multi = cores() > 1;
        assert_eq!(parallel(&url(""), MULTITHREAD_ABOVE), multi);
        assert!(!parallel(&url(""), MULTITHREAD_ABOVE - 1));
        assert_eq!(parallel(&url("?parallel-compression=true"), 1), multi);
        assert!(!parallel(&url("?parallel-compression=false"), 1 << 30));
    }
}
