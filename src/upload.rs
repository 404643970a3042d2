//! One item, start to finish: store path → NAR (streamed, hashed, checked against the
//! NarHash) → compressed temp file → target, then the narinfo; or a build log to `log/`.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::cache::roots::{Gate, GcWatch, GC_WAIT};
use crate::metrics::InFlight;
use crate::nix::{db, nar, NarInfo, PathInfo, Realisation, StorePath};
use crate::queue::{Item, Kind, Outcome};
use crate::store_url::{Compression, StoreUrl};
use crate::storage::{self, Body, Target, TempFile};

/// Why an item did not make it.
#[derive(Debug)]
pub enum UploadError {
    /// May pass: retried with backoff.
    Transient(String),
    /// Will not pass (path gone, contents differ from the NarHash): recorded and reported.
    Permanent(String),
    /// The target failed: retried, and all uploads pause for a while.
    Target(storage::TargetError),
}

impl From<storage::TargetError> for UploadError {
    /// A refusal of this one object fails the item; anything else pauses the target.
    fn from(e: storage::TargetError) -> Self {
        if e.permanent {
            UploadError::Permanent(e.msg)
        } else {
            UploadError::Target(e)
        }
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

/// Result of compressing a NAR into the temp file.
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

fn compress_nar(path: &Path, nar_size: u64, url: &StoreUrl, tmp: &Path, progress: &InFlight) -> io::Result<Compressed> {
    let out = nar::HashingWriter::new(BufWriter::with_capacity(1 << 20, File::create(tmp)?));
    let list = url.write_nar_listing;
    let dump = |w: &mut dyn Write| nar::dump_listed(path, &mut Counting { inner: w, progress }, list);
    let (out, (nar, listing)) = match url.compression {
        Compression::None => {
            let mut out = out;
            let s = dump(&mut out)?;
            (out, s)
        }
        Compression::Zstd => {
            let mut enc = zstd::Encoder::new(out, url.compression_level.unwrap_or(3))?;
            // Worker threads pay off only for large NARs; small ones would just take CPU
            // from the builds.
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
            if threads > 1 && nar_size >= MULTITHREAD_ABOVE {
                enc.multithread(threads)?;
                // Bounds what the workers buffer (by default jobs grow with the window).
                enc.set_parameter(zstd::stream::raw::CParameter::JobSize(ZSTD_JOB_SIZE))?;
            }
            let s = dump(&mut enc)?;
            (enc.finish()?, s)
        }
        Compression::Xz => {
            let mut enc = xz2::write::XzEncoder::new(out, url.compression_level.unwrap_or(6) as u32);
            let s = dump(&mut enc)?;
            (enc.finish()?, s)
        }
    };
    let (buf, file_stats) = out.finish();
    buf.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(Compressed { nar, file_stats, listing })
}

/// Build logs are cut here (with a note at the end). Nix keeps logs bzip2-compressed, and a
/// few KiB of bzip2 can expand to gigabytes: the cap bounds the time, disk and cache space
/// one log costs, whoever ran the build.
pub const MAX_LOG: u64 = 64 << 20;

/// xz preset for build logs: logs compress well at any level, and a low one keeps the
/// encoder's memory at a few MiB.
const LOG_XZ_PRESET: u32 = 1;

/// Streams the build log at `src` (plain or `.bz2`) into `tmp`, at most [`MAX_LOG`] bytes of
/// text, xz-compressed if `xz`; returns the bytes of text written and whether it was cut.
fn copy_log(src: &Path, tmp: &Path, xz: bool) -> io::Result<(u64, bool)> {
    let file = io::BufReader::new(File::open(src)?);
    let mut text: Box<dyn Read> = match src.extension().is_some_and(|e| e == "bz2") {
        true => Box::new(bzip2::read::BzDecoder::new(file)),
        false => Box::new(file),
    };
    // Not NotFound or PermissionDenied: those say the log is gone or unreadable.
    let out = BufWriter::new(File::create(tmp).map_err(|e| io::Error::other(format!("{}: {e}", tmp.display())))?);
    let mut out: Box<dyn WriteFinish> = match xz {
        true => Box::new(xz2::write::XzEncoder::new(out, LOG_XZ_PRESET)),
        false => Box::new(out),
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

impl WriteFinish for xz2::write::XzEncoder<BufWriter<File>> {
    fn finish(self: Box<Self>) -> io::Result<File> {
        (*self).finish()?.into_inner().map_err(|e| e.into_error())
    }
}

impl Uploader {
    pub async fn run(&self, item: &Item) -> Result<Outcome, UploadError> {
        self.run_in(item, self.gc.as_ref().map_or(0, |g| g.epoch())).await
    }

    /// [`Uploader::run`] for an item that the queue gave as ready in the watch's `epoch`:
    /// what it remembered then of the item's references is trusted only in that epoch.
    pub async fn run_in(&self, item: &Item, epoch: u64) -> Result<Outcome, UploadError> {
        let start = Instant::now();
        let tracked = self.metrics.track(item);
        let result = match self.skip(item) {
            Some(skipped) => Ok(skipped),
            None => match &item.kind {
                Kind::Nar(info) => self.upload_path(info, item.repair, tracked.progress.clone(), epoch).await,
                Kind::Log(drv) => self.upload_log(drv).await,
                Kind::Realisation(r) => self.upload_realisation(r).await,
            },
        };
        self.metrics.finished(item, &result, start.elapsed());
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

    /// Puts the narinfo when no collection is in the way, and before the deadline that keeps
    /// it visible to any collection's final listing (see `cache::roots`). If a collection
    /// began or ended since the item was found ready, its references and NAR are looked for
    /// in the cache first: one that is gone makes the item wait for it to be uploaded again.
    async fn put_narinfo(&self, info: &PathInfo, nar_key: &str, key: &str, body: Vec<u8>, mut epoch: u64) -> Result<(), UploadError> {
        let Some(gc) = &self.gc else {
            return Ok(self.target.put(key, Body::Bytes(body), storage::NARINFO_TYPE).await?);
        };
        for _ in 0..3 {
            let until = match gc.wait_open(GC_WAIT).await? {
                Gate::Held(why) => return Err(UploadError::Transient(format!("{}: {why}", info.path))),
                Gate::Open { epoch: now, until } if now == epoch => until,
                Gate::Open { epoch: now, .. } => {
                    for r in info.references.iter().filter(|r| **r != info.path) {
                        if !self.target.exists(&format!("{}.narinfo", r.hash_part())).await? {
                            return Err(UploadError::Transient(format!("{r}, which {} references, was removed from the cache; it is uploaded again first", info.path)));
                        }
                    }
                    if !self.target.exists(nar_key).await? {
                        return Err(UploadError::Transient(format!("the NAR of {} was removed from the cache before its narinfo; uploading it again", info.path)));
                    }
                    epoch = now;
                    continue;
                }
            };
            let left = until.saturating_duration_since(Instant::now());
            return match tokio::time::timeout(left, self.target.put(key, Body::Bytes(body), storage::NARINFO_TYPE)).await {
                Ok(r) => Ok(r?),
                Err(_) => Err(UploadError::Transient(format!("the narinfo of {} took too long to put while a collection may start; will check again", info.path))),
            };
        }
        Err(UploadError::Transient(format!("{}: collections keep starting and ending; will try again", info.path)))
    }

    /// Uploads the path unless the cache (or an upstream) has it; with `repair`, uploads it
    /// whatever the cache has (a broken entry there), overwriting: NAR first, narinfo last.
    async fn upload_path(&self, info: &PathInfo, repair: bool, progress: Arc<InFlight>, epoch: u64) -> Result<Outcome, UploadError> {
        let narinfo_key = format!("{}.narinfo", info.path.hash_part());
        if !repair && self.target.exists(&narinfo_key).await? {
            return Ok(Outcome::Present);
        }
        if let Some(up) = self.upstreams.as_ref().filter(|_| !repair) {
            if let Some(url) = up.find(&info.path).await {
                tracing::info!(path = %info.path, upstream = url, "in an upstream cache, not uploaded");
                return Ok(Outcome::Upstream);
            }
        }
        check_room(&self.tmp_dir, info.nar_size).map_err(UploadError::Transient)?;
        let start = Instant::now();
        let store_path = PathBuf::from(info.path.to_absolute());
        // Removed on every way out but the one that hands it to the target.
        let tmp = TempFile::new(self.tmp_dir.join(format!("{}.nar.tmp", info.path.hash_part())));
        let (url, nar_size) = (self.url.clone(), info.nar_size);
        let c = {
            let (tmp, store_path) = (tmp.path().to_path_buf(), store_path.clone());
            tokio::task::spawn_blocking(move || compress_nar(&store_path, nar_size, &url, &tmp, &progress))
                .await
                .map_err(|e| UploadError::Transient(format!("worker: {e}")))?
        };
        let c = match c {
            Ok(c) => c,
            Err(e) => {
                return Err(if !store_path.exists() {
                    UploadError::Permanent(format!("{} is gone from the store", info.path))
                } else if e.kind() == io::ErrorKind::PermissionDenied {
                    UploadError::Permanent(format!("reading {}: {e}", info.path))
                } else if e.kind() == io::ErrorKind::StorageFull {
                    UploadError::Transient(format!("writing the NAR of {} to {}: {e}; temp file removed", info.path, self.tmp_dir.display()))
                } else {
                    UploadError::Transient(format!("serialising {}: {e}", info.path))
                });
            }
        };
        if c.nar.hash != info.nar_hash || c.nar.size != info.nar_size {
            return Err(UploadError::Permanent(format!(
                "contents of {} do not match the Nix database: NAR has {} ({} bytes), database says {} ({} bytes); not uploaded",
                info.path, c.nar.hash, c.nar.size, info.nar_hash, info.nar_size
            )));
        }
        let ext = self.url.compression.extension();
        let nar_key = format!("nar/{}.nar{ext}", c.file_stats.hash.to_base32());
        let mut narinfo = NarInfo {
            info: info.clone(),
            url: nar_key.clone(),
            compression: self.url.compression.name().to_string(),
            file_hash: Some(c.file_stats.hash),
            file_size: Some(c.file_stats.size),
        };
        self.put_listing(info, c.listing).await?;
        if repair {
            // The narinfo repaired may carry signatures the store does not (`narq sign` adds
            // them in the cache only): those over the same fingerprint stay valid, and stay.
            if let Some(old) = self.target.get(&narinfo_key).await?.and_then(|b| NarInfo::parse(&String::from_utf8_lossy(&b)).ok()) {
                if old.info.fingerprint() == info.fingerprint() {
                    narinfo.info.sigs.extend(old.info.sigs);
                }
            }
        }
        self.target.put(&nar_key, Body::File(tmp), storage::NAR_TYPE).await?;
        self.put_narinfo(info, &nar_key, &narinfo_key, narinfo.to_string().into_bytes(), epoch).await?;
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
        Ok(Outcome::Uploaded { bytes: c.file_stats.size })
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

    /// Writes `realisations/<id>.doi`; the queue starts it only once its out path's narinfo
    /// is in the cache, so a client that finds the realisation finds the path.
    async fn upload_realisation(&self, r: &Realisation) -> Result<Outcome, UploadError> {
        let json = r.to_json().into_bytes();
        let bytes = json.len() as u64;
        self.target.put(&r.key(), Body::Bytes(json), storage::JSON_TYPE).await?;
        tracing::info!(id = %r.id, out_path = %r.out_path, "uploaded the realisation {} of {}", r.id, r.out_path);
        Ok(Outcome::Uploaded { bytes })
    }

    async fn upload_log(&self, drv: &StorePath) -> Result<Outcome, UploadError> {
        let Some(file) = db::build_log_path(drv) else { return Ok(Outcome::NoLog) };
        let key = format!("log/{}", drv.base_name());
        let tmp = TempFile::new(self.tmp_dir.join(format!("{}.log.tmp", drv.hash_part())));
        let encoding = self.target.log_encoding();
        let copied = {
            let tmp = tmp.path().to_path_buf();
            tokio::task::spawn_blocking(move || copy_log(&file, &tmp, encoding.is_some()))
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
        tracing::info!(drv = %drv, bytes, log_bytes = text_bytes, "uploaded the build log of {drv}");
        Ok(Outcome::Uploaded { bytes })
    }

    /// Writes `nix-cache-info` unless the cache has one.
    pub async fn ensure_cache_info(&self) -> Result<(), storage::TargetError> {
        let r = async {
            if !self.target.exists("nix-cache-info").await? {
                let info = self.url.cache_info().into_bytes();
                self.target.put("nix-cache-info", Body::Bytes(info), storage::CACHE_INFO_TYPE).await?;
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
