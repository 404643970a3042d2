//! `narq verify`: audits a cache, and with `--repair` has the daemon upload again what is
//! broken and valid in the local store.
//!
//! Per narinfo: it parses; its key names its `StorePath`; it carries `sigs_needed` valid
//! signatures by trusted keys (a content-addressed path whose CA matches its store path
//! needs none, as in Nix); its NAR exists with `FileSize`; each reference has a narinfo.
//! `--deep` also downloads every NAR ([`super::deep`]). For the whole cache: NARs no
//! narinfo names, uploads left unfinished for over a day, and `nix-cache-info`.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use super::spill::{self, Fields, Parts, Record, PARTS};
use super::{try_concurrently, ScanError};
use crate::nix::{nixbase32, NarInfo, PathInfo, PublicKey, Sha256, StorePath};
use crate::storage::{Calls, Object, Target};

/// A NAR no narinfo names is an orphan only once it is this old: an upload in progress
/// writes its NAR before its narinfo.
pub const ORPHAN_GRACE: Duration = Duration::from_secs(3600);
/// An unfinished upload this old is left over, not in progress.
pub const STALE_UPLOAD: Duration = Duration::from_secs(86400);

#[derive(Clone)]
pub struct Options {
    /// The paths to check; empty: the whole cache.
    pub paths: Vec<StorePath>,
    /// With `paths`: their closures as the cache's narinfos give them.
    pub recursive: bool,
    pub sigs_needed: usize,
    pub trusted: Vec<PublicKey>,
    pub deep: bool,
    /// Concurrent reads.
    pub jobs: usize,
}

/// What is wrong, by kind (the names `--json` and the summary use).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// A narinfo that does not parse.
    BadNarinfo,
    /// A narinfo whose key is not its `StorePath`'s hash part.
    WrongKey,
    /// Too few valid signatures by trusted keys.
    Signatures,
    NarMissing,
    /// The NAR object's size is not the narinfo's `FileSize`.
    NarSize,
    /// `--deep`: the NAR does not match its narinfo, or is not a NAR.
    NarCorrupt,
    /// A reference has no narinfo.
    ReferenceMissing,
    /// A path named on the command line has no narinfo.
    NotInCache,
    /// A NAR no narinfo names.
    OrphanNar,
    /// An upload begun over a day ago and never finished.
    StaleUpload,
    /// `nix-cache-info` missing or with another `StoreDir`.
    CacheInfo,
}

impl Kind {
    pub fn name(self) -> String {
        serde_json::to_value(self).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    pub kind: Kind,
    /// The store path, or the object's key when there is no path to name.
    pub subject: String,
    pub detail: String,
    /// The path that uploading again would heal (`--repair`): the broken path, or the
    /// missing reference.
    #[serde(skip)]
    pub heal: Option<StorePath>,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// Narinfos checked.
    pub checked: u64,
    /// Narinfos read from the cache (the others came from the index).
    pub fetched: u64,
    pub problems: Vec<Problem>,
    pub orphan_nars: u64,
    pub orphan_bytes: u64,
    pub seconds: f64,
    /// Checks not made, and why (a store that does not list incomplete uploads).
    pub skipped: Vec<String>,
    /// Objects listed.
    pub listed: u64,
    /// Bytes written to disk for the checks against the whole cache ([`super::spill`]).
    pub spilled_bytes: u64,
    /// The calls made to the cache, by kind.
    pub calls: Calls,
}

impl Report {
    pub fn counts(&self) -> BTreeMap<Kind, u64> {
        let mut m = BTreeMap::new();
        for p in &self.problems {
            *m.entry(p.kind).or_default() += 1;
        }
        m
    }

    /// The summary line: paths checked, problems by kind, orphan bytes, time.
    pub fn summary(&self) -> String {
        let counts = self.counts();
        let kinds: Vec<String> = counts.iter().map(|(k, n)| format!("{n} {}", k.name())).collect();
        let problems = match self.problems.len() {
            0 => "no problems".to_string(),
            n => format!("{n} problems ({})", kinds.join(", ")),
        };
        format!(
            "checked {} paths in {:.1} s ({} narinfos read, the rest from the index): {problems}; orphan NARs: {} ({} bytes)",
            self.checked, self.seconds, self.fetched, self.orphan_nars, self.orphan_bytes
        )
    }
}

/// How many of `info`'s signatures verify with `trusted` keys, as Nix counts them
/// (`ValidPathInfo::checkSignatures`): each valid signature once; a content-addressed
/// path whose CA gives its store path counts as fully signed.
pub fn valid_sigs(info: &PathInfo, trusted: &[PublicKey]) -> usize {
    if info.ca.as_deref().is_some_and(|ca| ca_path(ca, info).as_ref() == Some(&info.path)) {
        return usize::MAX;
    }
    let fp = info.fingerprint();
    info.sigs.iter().filter(|s| trusted.iter().any(|k| k.verify(&fp, s))).count()
}

/// Nix's `makeStorePath`: the store path of `name` for a hash of `ty`pe.
fn make_store_path(ty: &str, hash: &Sha256, name: &str) -> Option<StorePath> {
    let inner = Sha256::digest(format!("{ty}:sha256:{}:/nix/store:{name}", hash.to_hex()).as_bytes());
    let mut c = [0u8; 20];
    for (i, b) in inner.0.iter().enumerate() {
        c[i % 20] ^= b;
    }
    StorePath::parse(&format!("/nix/store/{}-{name}", nixbase32::encode(&c))).ok()
}

/// The digest of `algo` in `h` (base16 or nixbase32), as base16.
fn digest_hex(algo: &str, h: &str) -> Option<String> {
    let len = match algo {
        "md5" => 16,
        "sha1" => 20,
        "sha256" => 32,
        "sha512" => 64,
        _ => return None,
    };
    let bytes = if h.len() == 2 * len {
        (0..len).map(|i| u8::from_str_radix(h.get(2 * i..2 * i + 2)?, 16).ok()).collect::<Option<Vec<u8>>>()?
    } else {
        nixbase32::decode(h.as_bytes(), len).ok()?
    };
    Some(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The store path that the content address `ca` gives `info`'s name and references
/// (Nix's `makeTextPath`, `makeFixedOutputPath`); `None` for a form it does not know.
fn ca_path(ca: &str, info: &PathInfo) -> Option<StorePath> {
    let name = info.path.name();
    let others: Vec<String> = info.references.iter().filter(|r| **r != info.path).map(|r| r.to_string()).collect();
    let self_ref = info.references.contains(&info.path);
    if let Some(h) = ca.strip_prefix("text:sha256:") {
        let hash = Sha256::parse(&format!("sha256:{h}")).ok()?;
        let ty = others.iter().fold("text".to_string(), |t, r| format!("{t}:{r}"));
        return (!self_ref).then(|| make_store_path(&ty, &hash, name)).flatten();
    }
    let rest = ca.strip_prefix("fixed:")?;
    let (recursive, rest) = match rest.strip_prefix("r:") {
        Some(r) => (true, r),
        None => (false, rest),
    };
    let (algo, h) = rest.split_once(':')?;
    if recursive && algo == "sha256" {
        let hash = Sha256::parse(&format!("sha256:{h}")).ok()?;
        let mut ty = others.iter().fold("source".to_string(), |t, r| format!("{t}:{r}"));
        if self_ref {
            ty += ":self";
        }
        return make_store_path(&ty, &hash, name);
    }
    if !info.references.is_empty() {
        return None;
    }
    let inner = format!("fixed:out:{}{algo}:{}:", if recursive { "r:" } else { "" }, digest_hex(algo, h)?);
    make_store_path("output:out", &Sha256::digest(inner.as_bytes()), name)
}

/// A hash part as its 20 bytes, if it is one.
pub fn hash_bytes(hp: &str) -> Option<[u8; 20]> {
    nixbase32::decode(hp.as_bytes(), 20).ok()?.try_into().ok()
}

/// What the index remembers of a narinfo's signatures: how many are valid by a set of
/// trusted keys (named by a digest of them), so that a warm run need not check them again.
fn sigs_verdict(keys: &str, valid: usize) -> String {
    format!("sigs {keys} {valid}")
}

/// The digest of a set of trusted keys that [`sigs_verdict`] names.
fn keys_digest(trusted: &[PublicKey]) -> String {
    let mut keys: Vec<String> = trusted.iter().map(PublicKey::to_nix_string).collect();
    keys.sort();
    Sha256::digest(keys.join(" ").as_bytes()).to_hex()[..16].to_string()
}

/// What one narinfo's own checks found, and what it names for the checks against the whole
/// cache (its references, its NAR).
#[derive(Default)]
struct Checked {
    problems: Vec<Problem>,
    /// Its hash part, if its key names one (it is there for references to it).
    present: Option<[u8; 20]>,
    /// Its references' hash parts (with their [`spill::part_of_hash`]), to be looked for.
    refs: Vec<(usize, [u8; 20])>,
    /// Its NAR: the key, `FileSize`, and whether its absence is this narinfo's problem
    /// (not for one whose key names another path: that is its only problem).
    nar: Option<(String, Option<u64>, bool)>,
    verdict: Option<String>,
    /// Parsed, its key names its path: `--deep` checks its NAR.
    sound: Option<NarInfo>,
}

/// The checks of one narinfo that need nothing else: it parses, its key names its path, its
/// signatures (remembered in `verdict` for the trusted keys `keys`).
fn check_one(r: &super::Read, opts: &Options, keys: &str) -> Checked {
    let mut c = Checked { present: hash_bytes(r.hash_part()), ..Checked::default() };
    let key = &r.object.key;
    let parsed = match &r.body {
        Some(Ok(text)) => NarInfo::parse(text).map_err(|e| e.to_string()),
        Some(Err(why)) => Err(why.clone()),
        None => {
            c.present = None;
            return c;
        }
    };
    let ni = match parsed {
        Ok(ni) => ni,
        Err(why) => {
            c.problems.push(Problem { kind: Kind::BadNarinfo, subject: key.clone(), detail: format!("does not parse: {why}"), heal: None });
            return c;
        }
    };
    let path = &ni.info.path;
    if path.hash_part() != r.hash_part() {
        c.problems.push(Problem { kind: Kind::WrongKey, subject: key.clone(), detail: format!("names {path}, whose narinfo would be {}.narinfo", path.hash_part()), heal: None });
        c.nar = Some((ni.url.clone(), ni.file_size, false));
        return c;
    }
    let prefix = format!("sigs {keys} ");
    let remembered = r.verdict.as_deref().and_then(|v| v.strip_prefix(&prefix)).and_then(|n| n.parse().ok());
    let valid = remembered.unwrap_or_else(|| valid_sigs(&ni.info, &opts.trusted));
    c.verdict = Some(sigs_verdict(keys, valid));
    if valid < opts.sigs_needed {
        let names: Vec<&str> = ni.info.sigs.iter().map(|s| s.split_once(':').map_or(s.as_str(), |n| n.0)).collect();
        let signed = if names.is_empty() { "no signatures".to_string() } else { format!("signatures by {}", names.join(", ")) };
        c.problems.push(Problem {
            kind: Kind::Signatures,
            subject: path.to_string(),
            detail: format!("{valid} valid signatures by trusted keys, {} needed ({signed})", opts.sigs_needed),
            heal: Some(path.clone()),
        });
    }
    c.refs = ni.info.references.iter().filter(|r| *r != path).filter_map(|r| Some((spill::part_of_hash(r.hash_part()), hash_bytes(r.hash_part())?))).collect();
    c.nar = Some((ni.url.clone(), ni.file_size, true));
    c.sound = Some(ni);
    c
}

/// Audits the cache at `target` (through the scan index at `index_path`). `progress`
/// gets a line to show now and then (a terminal's progress line).
pub async fn verify(target: &dyn Target, index_path: &Path, opts: &Options, progress: &(dyn Fn(String) + Sync)) -> Result<Report, ScanError> {
    let start = Instant::now();
    let mut report = match opts.paths.is_empty() {
        true => verify_all(target, index_path, opts, progress).await?,
        false => verify_paths(target, opts).await?,
    };
    report.problems.sort_by(|a, b| (&a.subject, a.kind).cmp(&(&b.subject, b.kind)));
    report.seconds = start.elapsed().as_secs_f64();
    report.calls = target.calls();
    Ok(report)
}

/// The named paths (with `recursive`, their closures as the cache's narinfos give them),
/// read and checked one by one: their narinfos are read, their NARs and references looked
/// for (HEAD), with no listing of the cache.
async fn verify_paths(target: &dyn Target, opts: &Options) -> Result<Report, ScanError> {
    let mut report = Report::default();
    let mut seen = HashSet::new();
    // Whether a narinfo is there, as found (a read, or a HEAD for a reference).
    let mut present: HashMap<String, bool> = HashMap::new();
    let mut frontier: Vec<StorePath> = opts.paths.clone();
    let mut refs: Vec<(StorePath, StorePath)> = Vec::new();
    let mut sound = Vec::new();
    while !frontier.is_empty() {
        let todo: Vec<StorePath> = frontier.drain(..).filter(|p| seen.insert(p.hash_part().to_string())).collect();
        let read = try_concurrently(todo, opts.jobs, |p| async move {
            let body = target.get(&format!("{}.narinfo", p.hash_part())).await?;
            let nar = match body.as_deref().map(|b| std::str::from_utf8(b).map_err(|_| "not UTF-8".to_string()).and_then(|t| NarInfo::parse(t).map_err(|e| e.to_string()))) {
                Some(Ok(ni)) => Some(target.size_of(&ni.url).await?),
                _ => None,
            };
            Ok::<_, ScanError>((p, body, nar))
        })
        .await?;
        for (p, body, nar_size) in read {
            present.insert(p.hash_part().to_string(), body.is_some());
            let Some(body) = body else {
                // A missing reference is its referrer's problem; a named path is its own.
                if opts.paths.contains(&p) {
                    report.problems.push(Problem { kind: Kind::NotInCache, subject: p.to_string(), detail: "has no narinfo in the cache".into(), heal: Some(p.clone()) });
                }
                continue;
            };
            report.checked += 1;
            report.fetched += 1;
            let object = Object { key: format!("{}.narinfo", p.hash_part()), size: body.len() as u64, last_modified: None, etag: None };
            let r = super::Read::new(object, Some(String::from_utf8(body).map_err(|_| "not UTF-8".to_string())));
            let mut c = check_one(&r, opts, &keys_digest(&opts.trusted));
            report.problems.append(&mut c.problems);
            let Some(ni) = c.sound else { continue };
            match nar_size.flatten() {
                None => report.problems.push(nar_missing(&ni.info.path, &ni.url)),
                Some(size) => {
                    if let Some(p) = nar_size_wrong(&ni.info.path, &ni.url, size, ni.file_size) {
                        report.problems.push(p);
                    }
                    sound.push(ni.clone());
                }
            }
            for r in ni.info.references.iter().filter(|r| **r != ni.info.path) {
                refs.push((ni.info.path.clone(), r.clone()));
                if opts.recursive {
                    frontier.push(r.clone());
                }
            }
        }
    }
    // References not read above (without -r) are looked for.
    let unknown: Vec<StorePath> = refs.iter().map(|(_, r)| r.clone()).filter(|r| !present.contains_key(r.hash_part())).collect::<BTreeSet<_>>().into_iter().collect();
    let found = try_concurrently(unknown, opts.jobs, |r| async move { Ok::<_, ScanError>((r.hash_part().to_string(), target.exists(&format!("{}.narinfo", r.hash_part())).await?)) }).await?;
    present.extend(found);
    for (p, r) in refs.iter().filter(|(_, r)| present.get(r.hash_part()) == Some(&false)) {
        report.problems.push(reference_missing(p, r));
    }
    if opts.deep {
        report.problems.extend(deep_checks(target, sound, opts.jobs, &|_| {}).await);
    }
    Ok(report)
}

fn nar_missing(path: &StorePath, url: &str) -> Problem {
    Problem { kind: Kind::NarMissing, subject: path.to_string(), detail: format!("its NAR {url} is missing"), heal: Some(path.clone()) }
}

fn nar_size_wrong(path: &StorePath, url: &str, size: u64, file_size: Option<u64>) -> Option<Problem> {
    let fs = file_size.filter(|fs| *fs != size)?;
    Some(Problem { kind: Kind::NarSize, subject: path.to_string(), detail: format!("its NAR {url} has {size} bytes, FileSize says {fs}"), heal: Some(path.clone()) })
}

fn reference_missing(path: &StorePath, r: &StorePath) -> Problem {
    Problem { kind: Kind::ReferenceMissing, subject: path.to_string(), detail: format!("references {r}, which has no narinfo"), heal: Some(r.clone()) }
}

/// `--deep`: downloads and checks the NARs of `todo` (a NAR missing is reported already).
async fn deep_checks(target: &dyn Target, todo: Vec<NarInfo>, jobs: usize, done: &(dyn Fn(u64) + Sync)) -> Vec<Problem> {
    // Each NAR check keeps a core busy decompressing and hashing: no more than there are.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let n = std::sync::atomic::AtomicU64::new(0);
    let found = try_concurrently(todo, jobs.min(cpus), |ni| {
        let n = &n;
        async move {
            let r = super::deep::check_if_there(target, &ni).await;
            done(n.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1);
            let problem = match r {
                Some(Err(why)) => Some(Problem { kind: Kind::NarCorrupt, subject: ni.info.path.to_string(), detail: why, heal: Some(ni.info.path.clone()) }),
                _ => None,
            };
            Ok::<_, std::convert::Infallible>(problem)
        }
    })
    .await
    .unwrap_or_else(|e| match e {});
    found.into_iter().flatten().collect()
}

/// The records a whole-cache verify spills ([`super::spill`]), one kind per field.
struct Spilled {
    /// Hash parts of the narinfos there (20 bytes each), by [`spill::part_of_hash`].
    present: Parts,
    /// References: the referenced hash part, then the referrer's (40 bytes), by the first.
    refs: Parts,
    /// Every other object: key, size, mtime (seconds, `u64::MAX` unknown), by [`spill::part_of_key`].
    listed: Parts,
    /// What narinfos name as their NAR: key, `FileSize` (`u64::MAX` none), whether to report
    /// it missing (1 byte), the referrer's hash part, by the key.
    named: Parts,
}

impl Spilled {
    fn new(dir: &Path) -> std::io::Result<Spilled> {
        Ok(Spilled { present: Parts::new(dir)?, refs: Parts::new(dir)?, listed: Parts::new(dir)?, named: Parts::new(dir)? })
    }

    fn object(&mut self, o: &Object) -> std::io::Result<()> {
        let t = o.last_modified.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(u64::MAX, |d| d.as_secs());
        self.listed.push(spill::part_of_key(&o.key), Record::new().str(&o.key).u64(o.size).u64(t).done())
    }

    /// What narinfo `r` named, as [`check_one`] found.
    fn checked(&mut self, r: &super::Read, c: &Checked) -> std::io::Result<()> {
        // Only a narinfo whose key is a hash part can be referenced, or have its NAR's
        // absence reported (one whose key names another path names its NAR all the same).
        let hp = c.present.unwrap_or_default();
        if let Some(present) = &c.present {
            self.present.push(spill::part_of_hash(r.hash_part()), present)?;
        }
        for (p, r) in &c.refs {
            self.refs.push(*p, Record::new().bytes(r).bytes(&hp).done())?;
        }
        if let Some((url, fs, check)) = &c.nar {
            self.named.push(spill::part_of_key(url), Record::new().str(url).u64(fs.unwrap_or(u64::MAX)).bytes(&[*check as u8]).bytes(&hp).done())?;
        }
        Ok(())
    }
}

/// A problem found against the whole cache, its path not known yet (the referrer's hash part).
enum Found {
    ReferenceMissing([u8; 20], [u8; 20]),
    NarMissing([u8; 20], String),
    NarSize([u8; 20], String, u64),
}

/// The whole cache, as a stream: the listing and the narinfos go by once; what each
/// narinfo names is spilled to disk, and checked against what is there a part at a time.
async fn verify_all(target: &dyn Target, index_path: &Path, opts: &Options, progress: &(dyn Fn(String) + Sync)) -> Result<Report, ScanError> {
    let start = Instant::now();
    let ix = super::Indexed::open(index_path)?;
    let dir = match index_path.parent() {
        Some(d) if index_path != Path::new(":memory:") => d.to_path_buf(),
        _ => std::env::temp_dir(),
    };
    let spilled = RefCell::new(Spilled::new(&dir)?);
    let keys = keys_digest(&opts.trusted);
    let report = RefCell::new(Report::default());
    let on_scan = |p: super::Progress| {
        let secs = start.elapsed().as_secs_f64().max(0.001);
        progress(format!("listed {} objects; checked {} narinfos ({} read), {:.0}/s", p.listed, p.narinfos, p.fetched, p.narinfos as f64 / secs));
    };
    let mut io_error = None;
    let mut on_object = |o: Object| {
        if let Err(e) = spilled.borrow_mut().object(&o) {
            io_error.get_or_insert(e);
        }
    };
    let on_batch = |mut batch: Vec<super::Read>| {
        let (spilled, report, keys) = (&spilled, &report, &keys);
        async move {
            let shared = std::sync::Arc::new((batch, opts.clone(), keys.clone()));
            let work = shared.clone();
            // Parsing and signatures (~50 µs each) on every CPU, off the runtime.
            let checked = tokio::task::spawn_blocking(move || crate::par::map(&work.0, |r| check_one(r, &work.1, &work.2)))
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            batch = std::sync::Arc::try_unwrap(shared).map_err(|_| std::io::Error::other("a check is still running"))?.0;
            let mut sound = Vec::new();
            {
                let (mut s, mut report) = (spilled.borrow_mut(), report.borrow_mut());
                for (r, mut c) in batch.iter_mut().zip(checked) {
                    s.checked(r, &c)?;
                    report.checked += r.body.is_some() as u64;
                    report.problems.append(&mut c.problems);
                    if c.verdict.is_some() {
                        r.verdict = c.verdict.take();
                    }
                    sound.extend(c.sound.filter(|_| opts.deep));
                }
            }
            if !sound.is_empty() {
                let found = deep_checks(target, sound, opts.jobs, &|_| {}).await;
                report.borrow_mut().problems.extend(found);
            }
            Ok(batch)
        }
    };
    let stats = super::scan(target, &ix, opts.jobs, opts.jobs.min(32), &mut on_object, on_batch, &on_scan).await?;
    if let Some(e) = io_error {
        return Err(e.into());
    }
    let mut report = report.into_inner();
    report.fetched = stats.fetched;
    report.listed = stats.objects;
    let mut spilled = spilled.into_inner();
    report.spilled_bytes = spilled.present.bytes + spilled.refs.bytes + spilled.listed.bytes + spilled.named.bytes;
    progress("checking references and NARs".into());

    let mut found = Vec::new();
    // References, a part of the hash space at a time; the index forgets what is gone.
    for p in 0..PARTS {
        let mut present = HashSet::new();
        let mut f = Fields::new(spilled.present.read(p)?);
        let mut hp = [0u8; 20];
        while f.more(&mut hp)? {
            present.insert(hp);
        }
        let mut f = Fields::new(spilled.refs.read(p)?);
        while f.more(&mut hp)? {
            let referrer = f.array()?;
            if !present.contains(&hp) {
                found.push(Found::ReferenceMissing(referrer, hp));
            }
        }
        if stats.gone > 0 {
            let (from, to) = spill::hash_range(p);
            ix.prune(&from, to.as_deref(), &mut |k| k.strip_suffix(".narinfo").and_then(hash_bytes).is_some_and(|h| present.contains(&h)) || !is_narinfo_key(k))?;
        }
    }
    // NARs, a part of the keys at a time: missing, of another size, or named by nobody.
    let now = SystemTime::now();
    for p in 0..PARTS {
        let mut listed: HashMap<String, (u64, u64, bool)> = HashMap::new();
        let mut f = Fields::new(spilled.listed.read(p)?);
        let mut len = [0u8; 2];
        while f.more(&mut len)? {
            let key = f.str_of(len)?;
            let (size, t) = (f.u64()?, f.u64()?);
            listed.insert(key, (size, t, false));
        }
        let mut f = Fields::new(spilled.named.read(p)?);
        while f.more(&mut len)? {
            let url = f.str_of(len)?;
            let fs = f.u64()?;
            let [check] = f.array::<1>()?;
            let referrer = f.array()?;
            match listed.get_mut(&url) {
                None if check == 1 => found.push(Found::NarMissing(referrer, url)),
                None => {}
                Some((size, _, named)) => {
                    *named = true;
                    if check == 1 && fs != u64::MAX && fs != *size {
                        found.push(Found::NarSize(referrer, url, *size));
                    }
                }
            }
        }
        for (key, (size, t, _)) in listed.into_iter().filter(|(k, (_, _, named))| !named && k.starts_with("nar/")) {
            let t = (t != u64::MAX).then(|| std::time::UNIX_EPOCH + Duration::from_secs(t));
            if t.is_none_or(|t| now.duration_since(t).is_ok_and(|a| a >= ORPHAN_GRACE)) {
                report.orphan_nars += 1;
                report.orphan_bytes += size;
                report.problems.push(Problem { kind: Kind::OrphanNar, subject: key, detail: format!("no narinfo names it ({size} bytes)"), heal: None });
            }
        }
    }
    drop(spilled);
    // The paths of what was found, from their narinfos (few: these are the problems).
    for f in found {
        let referrer = match &f {
            Found::ReferenceMissing(r, _) | Found::NarMissing(r, _) | Found::NarSize(r, _, _) => *r,
        };
        let Some(ni) = narinfo_of(target, &ix, &referrer).await? else { continue };
        let path = &ni.info.path;
        match f {
            Found::ReferenceMissing(_, r) => {
                if let Some(r) = ni.info.references.iter().find(|x| hash_bytes(x.hash_part()) == Some(r)) {
                    report.problems.push(reference_missing(path, r));
                }
            }
            Found::NarMissing(_, url) => report.problems.push(nar_missing(path, &url)),
            Found::NarSize(_, url, size) => report.problems.extend(nar_size_wrong(path, &url, size, ni.file_size)),
        }
    }
    whole_cache(target, &mut report).await?;
    Ok(report)
}

fn is_narinfo_key(k: &str) -> bool {
    super::is_narinfo(k)
}

/// The narinfo of hash part `hp`, from the index (the scan just put it there) or the cache.
async fn narinfo_of(target: &dyn Target, ix: &super::Indexed, hp: &[u8; 20]) -> Result<Option<NarInfo>, ScanError> {
    let key = format!("{}.narinfo", nixbase32::encode(hp));
    let body = match ix.with(|i| i.get(&key))? {
        Some(row) => Some(row.body),
        None => target.get(&key).await?.and_then(|b| String::from_utf8(b).ok()),
    };
    Ok(body.and_then(|b| NarInfo::parse(&b).ok()))
}

/// The checks of the whole cache beyond the narinfos: stale uploads, `nix-cache-info`.
async fn whole_cache(target: &dyn Target, report: &mut Report) -> Result<(), ScanError> {
    let now = SystemTime::now();
    let older = |t: Option<SystemTime>, age: Duration| t.is_none_or(|t| now.duration_since(t).is_ok_and(|a| a >= age));
    let (incomplete, skipped) = super::incomplete(target).await?;
    report.skipped.extend(skipped);
    for u in incomplete.into_iter().filter(|u| older(u.started, STALE_UPLOAD)) {
        report.problems.push(Problem { kind: Kind::StaleUpload, subject: u.key.clone(), detail: format!("an upload begun over a day ago and never finished ({})", u.id), heal: None });
    }
    let info = target.get("nix-cache-info").await?;
    let text = info.as_deref().map(String::from_utf8_lossy);
    let store_dir = text.as_deref().and_then(|t| t.lines().find_map(|l| l.strip_prefix("StoreDir:")).map(str::trim));
    let wrong = match (&text, store_dir) {
        (None, _) => Some("is missing".to_string()),
        (Some(_), Some("/nix/store")) => None,
        (Some(_), Some(d)) => Some(format!("says StoreDir {d}, not /nix/store")),
        (Some(_), None) => Some("has no StoreDir".to_string()),
    };
    if let Some(why) = wrong {
        report.problems.push(Problem { kind: Kind::CacheInfo, subject: "nix-cache-info".into(), detail: why, heal: None });
    }
    Ok(())
}

/// `narq verify`'s command line.
#[derive(Debug, clap::Args)]
#[command(after_help = "Exit codes: 0 the cache is sound (with --repair: everything found was repaired); \
1 a problem was found (with --repair: one remains); 2 usage error.")]
pub struct Args {
    /// Store paths (or links to them, such as ./result) to check [default: the whole cache]
    pub path: Vec<std::path::PathBuf>,
    /// Check the closures of PATHs, as the cache's narinfos give them
    #[arg(short, long)]
    pub recursive: bool,
    /// The cache: file:///DIR or s3://BUCKET?... [default: the configured store]
    #[arg(long, value_name = "URL", value_parser = crate::store_url::StoreUrl::parse)]
    pub store: Option<crate::store_url::StoreUrl>,
    /// Valid signatures by trusted keys that each path needs, as in Nix
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub sigs_needed: usize,
    /// Space-separated NAME:BASE64 public keys [default: public-keys and the public halves of readable secret-key-files]
    #[arg(long, value_name = "KEYS", value_parser = parse_keys)]
    pub trusted_public_keys: Option<Keys>,
    /// Also download every NAR and check FileHash, FileSize, NarHash, NarSize and its format
    #[arg(long)]
    pub deep: bool,
    /// Upload broken paths again from the local store, through the daemon (nothing is deleted)
    #[arg(long)]
    pub repair: bool,
    /// Print the report as JSON
    #[arg(long)]
    pub json: bool,
    /// Concurrent reads from the cache
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub jobs: u16,
}

/// Public keys given on the command line.
#[derive(Debug, Clone)]
pub struct Keys(pub Vec<PublicKey>);

/// `--trusted-public-keys`: space-separated `NAME:BASE64`, at least one.
pub fn parse_keys(s: &str) -> Result<Keys, String> {
    let keys = s.split_whitespace().map(|k| PublicKey::parse(k).map_err(|e| e.to_string())).collect::<Result<Vec<_>, _>>()?;
    if keys.is_empty() {
        return Err("no key given".into());
    }
    Ok(Keys(keys))
}

/// A progress line on stderr when it is a terminal: redrawn at most ten times a second.
pub struct ProgressLine {
    on: bool,
    last: std::sync::Mutex<Option<Instant>>,
}

impl ProgressLine {
    pub fn new() -> ProgressLine {
        ProgressLine { on: std::io::IsTerminal::is_terminal(&std::io::stderr()), last: std::sync::Mutex::new(None) }
    }

    pub fn show(&self, line: String) {
        if !self.on {
            return;
        }
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| t.elapsed() < Duration::from_millis(100)) {
            return;
        }
        *last = Some(Instant::now());
        eprint!("\r\x1b[K{line}");
    }

    pub fn clear(&self) {
        if self.on && self.last.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
            eprint!("\r\x1b[K");
        }
    }
}

impl Default for ProgressLine {
    fn default() -> Self {
        Self::new()
    }
}

/// The cache at `store` (the configured one by default), its index path, and a runtime to
/// read it with: what `verify` and `sign` start from.
pub fn open(config: &crate::config::Config, store: Option<&crate::store_url::StoreUrl>) -> anyhow::Result<(tokio::runtime::Runtime, std::sync::Arc<dyn Target>, std::path::PathBuf)> {
    let url = store.unwrap_or(&config.store);
    let rt = super::runtime()?;
    let target = rt.block_on(crate::storage::open(url)).map_err(anyhow::Error::msg)?;
    let index = super::index_path(&config.state_dir, &url.identity());
    // A user who may not write the state dir still gets an audit, only without a warm index.
    let dir = index.parent().unwrap_or(Path::new("/"));
    let writable = std::fs::create_dir_all(dir).is_ok() && may_write(dir);
    if !writable {
        eprintln!("narq: {} is not writable: no index is kept, every narinfo is read", dir.display());
        return Ok((rt, target, std::path::PathBuf::from(":memory:")));
    }
    Ok((rt, target, index))
}

/// Whether this process may write in `dir` (access(2), which honours root's rights).
fn may_write(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else { return false };
    // SAFETY: a valid NUL-terminated path.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

/// Runs `narq verify`; true when the cache is sound (with `--repair`: when everything found
/// was repaired). `resolve` turns a command-line path into a store path.
pub fn run(config: &crate::config::Config, args: Args, resolve: impl Fn(&Path) -> anyhow::Result<StorePath>) -> anyhow::Result<bool> {
    use anyhow::Context;
    let paths = args.path.iter().map(|p| resolve(p)).collect::<anyhow::Result<Vec<_>>>()?;
    if args.repair {
        let url = args.store.as_ref().unwrap_or(&config.store);
        anyhow::ensure!(
            url.identity() == config.store.identity(),
            "--repair uploads through the daemon, which writes to {}, not {}",
            config.store.original,
            url.original
        );
    }
    let trusted = match args.trusted_public_keys {
        Some(Keys(k)) => k,
        None => config.trusted_keys(),
    };
    anyhow::ensure!(
        !trusted.is_empty() || args.sigs_needed == 0,
        "no trusted keys: set public-keys (or secret-key-files) in the configuration, or pass --trusted-public-keys"
    );
    let opts = Options { paths, recursive: args.recursive, sigs_needed: args.sigs_needed, trusted, deep: args.deep, jobs: args.jobs.into() };
    let (rt, target, index) = open(config, args.store.as_ref())?;
    let line = ProgressLine::new();
    let report = rt.block_on(verify(target.as_ref(), &index, &opts, &|l| line.show(l))).context("verifying the cache")?;
    line.clear();
    let (mut repaired, mut unrepairable) = (Vec::new(), Vec::new());
    if args.repair && !report.problems.is_empty() {
        (repaired, unrepairable) = repair(config, &report)?;
    }
    if args.json {
        let out = serde_json::json!({
            "checked": report.checked,
            "fetched": report.fetched,
            "problems": report.problems,
            "counts": report.counts().into_iter().map(|(k, n)| (k.name(), n)).collect::<BTreeMap<_, _>>(),
            "orphan_nars": report.orphan_nars,
            "orphan_bytes": report.orphan_bytes,
            "seconds": report.seconds,
            "skipped": report.skipped,
            "listed": report.listed,
            "calls": report.calls,
            "spilled_bytes": report.spilled_bytes,
            "repaired": repaired.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "unrepairable": unrepairable.iter().map(|(p, why)| serde_json::json!({"subject": p, "why": why})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for p in &report.problems {
            println!("{}: {} ({})", p.subject, p.detail, p.kind.name());
        }
        for p in &repaired {
            println!("{p}: repaired");
        }
        for (p, why) in &unrepairable {
            println!("{p}: cannot repair: {why}");
        }
        println!("{}", report.summary());
        if args.repair && !report.problems.is_empty() {
            println!("repaired {} paths; {} problems left", repaired.len(), unrepairable.len());
        }
    }
    Ok(if args.repair { unrepairable.is_empty() } else { report.problems.is_empty() })
}

/// How long `--repair` waits for the daemon to upload what it repairs.
const REPAIR_WAIT: Duration = Duration::from_secs(3600);

/// Hands the paths that would heal `report`'s problems, those valid in the local store,
/// with their closures, signed, to the daemon as a `repair` request, and waits until they
/// are uploaded. Returns what was repaired, and what was not with why.
fn repair(config: &crate::config::Config, report: &Report) -> anyhow::Result<(Vec<StorePath>, Vec<(String, String)>)> {
    use crate::protocol::{self, Request, Response};
    let mut unrepairable = Vec::new();
    let mut heal = std::collections::BTreeSet::new();
    for p in &report.problems {
        match &p.heal {
            Some(path) => drop(heal.insert(path.clone())),
            None => unrepairable.push((p.subject.clone(), match p.kind {
                Kind::OrphanNar | Kind::StaleUpload => "not broken, only space taken (`narq gc` removes it)".to_string(),
                _ => format!("{} is not something uploading a path again heals", p.kind.name()),
            })),
        }
    }
    let db = crate::nix::db::NixDb::open_default()?;
    let mut valid = Vec::new();
    for p in heal {
        match db.query(std::slice::from_ref(&p), false) {
            Ok(_) => valid.push(p),
            Err(e) => unrepairable.push((p.to_string(), format!("not valid in the local store ({e})"))),
        }
    }
    drop(db);
    if valid.is_empty() {
        return Ok((valid, unrepairable));
    }
    let mut closure = crate::hook::closure(&valid)?;
    PathInfo::sign_all(&mut closure, &config.secret_keys()?);
    let call = |req: &Request, timeout: Duration| match protocol::call(&config.socket, req, Some(timeout)) {
        Ok(Response::Error { message, .. }) => anyhow::bail!("the daemon refused: {message}"),
        Ok(r) => Ok(r),
        Err(e) => Err(anyhow::anyhow!("asking the daemon at {}: {e}", config.socket.display())),
    };
    call(&Request::Repair { paths: closure, repair: valid.clone() }, Duration::from_secs(60))?;
    let waited = call(&Request::Wait { timeout_ms: REPAIR_WAIT.as_millis() as u64, paths: Some(valid.clone()) }, REPAIR_WAIT + Duration::from_secs(30))?;
    let Response::Waited { complete, failed, .. } = waited else { anyhow::bail!("unexpected answer from the daemon: {waited:?}") };
    anyhow::ensure!(complete, "the daemon did not finish the repair within {} s; it goes on in the background", REPAIR_WAIT.as_secs());
    let failed: HashMap<String, String> = failed.into_iter().map(|f| (f.item, f.error)).collect();
    let (ok, bad): (Vec<StorePath>, Vec<StorePath>) = valid.into_iter().partition(|p| !failed.contains_key(&p.to_string()));
    unrepairable.extend(bad.into_iter().map(|p| {
        let why = failed.get(&p.to_string()).cloned().unwrap_or_default();
        (p.to_string(), format!("the upload failed: {why}"))
    }));
    Ok((ok, unrepairable))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(path: &str, refs: &[&str], ca: &str) -> PathInfo {
        PathInfo {
            path: StorePath::parse(path).unwrap(),
            nar_hash: Sha256::digest(b"x"),
            nar_size: 1,
            references: refs.iter().map(|r| StorePath::parse(r).unwrap()).collect(),
            deriver: None,
            sigs: Default::default(),
            ca: Some(ca.to_string()),
        }
    }

    /// Store paths Nix 2.8 computed (`builtins.toFile`, `nix-store --add`, `--add-fixed`),
    /// with the CA it recorded for them.
    #[test]
    fn ca_paths_as_nix_computes_them() {
        for (path, ca) in [
            ("/nix/store/qa1w9gdfrba6jl2r57mb3c43863gqywp-hello.txt", "text:sha256:00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq"),
            ("/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt", "fixed:r:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw"),
            ("/nix/store/gy454w1cxaq731grqwylhzf4pp9r5izh-hello.txt", "fixed:sha256:00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq"),
            ("/nix/store/svdva85yi507g9vncgsaxvnd1r808h4w-hello.txt", "fixed:sha1:iwjz551fyw0cxcjgf4l6c879zabd6wpm"),
        ] {
            let i = info(path, &[], ca);
            assert_eq!(ca_path(ca, &i), Some(i.path.clone()), "{ca}");
            assert_eq!(valid_sigs(&i, &[]), usize::MAX, "{ca}");
            // The same CA on another path proves nothing.
            let other = info(&path.replace("-hello.txt", "-hellp.txt"), &[], ca);
            assert_eq!(valid_sigs(&other, &[]), 0, "{ca}");
        }
    }
}
