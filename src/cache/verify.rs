//! `narq verify`: audits a cache, and with `--repair` has the daemon upload again what is
//! broken and valid in the local store.
//!
//! Per narinfo: it parses; its key names its `StorePath`; it carries `sigs_needed` valid
//! signatures by trusted keys (a content-addressed path whose CA matches its store path
//! needs none, as in Nix); its NAR exists with `FileSize`; each reference has a narinfo.
//! `--deep` also downloads every NAR ([`super::deep`]). For the whole cache: NARs no
//! narinfo names, uploads left unfinished for over a day, and `nix-cache-info`.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use super::{scan, try_concurrently, NarInfoEntry, Progress, ScanError};
use crate::nix::{nixbase32, NarInfo, PathInfo, PublicKey, Sha256, StorePath};
use crate::storage::Target;

/// A NAR no narinfo names is an orphan only once it is this old: an upload in progress
/// writes its NAR before its narinfo.
pub const ORPHAN_GRACE: Duration = Duration::from_secs(3600);
/// An unfinished upload this old is left over, not in progress.
pub const STALE_UPLOAD: Duration = Duration::from_secs(86400);

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

/// The checks of one narinfo that need no download; `present` holds the hash parts of
/// every narinfo in the cache, `objects` the cache's objects by key.
fn check_entry(e: &NarInfoEntry, opts: &Options, present: &HashSet<&str>, objects: &HashMap<&str, &crate::storage::Object>, out: &mut Vec<Problem>) {
    let key = &e.object.key;
    let ni = match &e.info {
        Ok(ni) => ni,
        Err(why) => {
            out.push(Problem { kind: Kind::BadNarinfo, subject: key.clone(), detail: format!("does not parse: {why}"), heal: None });
            return;
        }
    };
    let path = &ni.info.path;
    let problem = |kind, detail: String, heal: Option<&StorePath>| Problem { kind, subject: path.to_string(), detail, heal: heal.cloned() };
    if path.hash_part() != e.hash_part() {
        out.push(Problem { kind: Kind::WrongKey, subject: key.clone(), detail: format!("names {path}, whose narinfo would be {}.narinfo", path.hash_part()), heal: None });
        return;
    }
    let valid = valid_sigs(&ni.info, &opts.trusted);
    if valid < opts.sigs_needed {
        let names: Vec<&str> = ni.info.sigs.iter().map(|s| s.split_once(':').map_or(s.as_str(), |n| n.0)).collect();
        let signed = if names.is_empty() { "no signatures".to_string() } else { format!("signatures by {}", names.join(", ")) };
        out.push(problem(Kind::Signatures, format!("{valid} valid signatures by trusted keys, {} needed ({signed})", opts.sigs_needed), Some(path)));
    }
    match objects.get(ni.url.as_str()) {
        None => out.push(problem(Kind::NarMissing, format!("its NAR {} is missing", ni.url), Some(path))),
        Some(o) => {
            if let Some(fs) = ni.file_size.filter(|fs| *fs != o.size) {
                out.push(problem(Kind::NarSize, format!("its NAR {} has {} bytes, FileSize says {fs}", ni.url, o.size), Some(path)));
            }
        }
    }
    for r in ni.info.references.iter().filter(|r| *r != path && !present.contains(r.hash_part())) {
        out.push(problem(Kind::ReferenceMissing, format!("references {r}, which has no narinfo"), Some(r)));
    }
}

/// Audits the cache at `target` (through the scan index at `index_path`). `progress`
/// gets a line to show now and then (a terminal's progress line).
pub async fn verify(target: &dyn Target, index_path: &Path, opts: &Options, progress: &(dyn Fn(String) + Sync)) -> Result<Report, ScanError> {
    let start = Instant::now();
    let rate = |done: u64, total: u64| {
        let secs = start.elapsed().as_secs_f64().max(0.001);
        let r = done as f64 / secs;
        let eta = if r > 0.0 { (total.saturating_sub(done)) as f64 / r } else { 0.0 };
        format!("{done}/{total}, {r:.0}/s, ETA {eta:.0} s")
    };
    let on_scan = |p: Progress| match p.to_fetch {
        0 => progress(format!("listing: {} objects", p.listed)),
        n => progress(format!("reading narinfos: {}", rate(p.fetched, n))),
    };
    let s = scan(target, index_path, opts.jobs, &on_scan).await?;
    let mut report = Report { fetched: s.fetched, skipped: s.skipped.clone(), ..Report::default() };
    let by_hash: HashMap<&str, &NarInfoEntry> = s.narinfos.iter().map(|e| (e.hash_part(), e)).collect();
    let present: HashSet<&str> = by_hash.keys().copied().collect();
    let objects = super::objects_by_key(&s);

    // Which narinfos to check: all, or the named paths (and with -r their closures).
    let selected: Vec<&NarInfoEntry> = if opts.paths.is_empty() {
        s.narinfos.iter().collect()
    } else {
        let mut seen = HashSet::new();
        let mut todo: VecDeque<&StorePath> = opts.paths.iter().collect();
        let mut out = Vec::new();
        while let Some(p) = todo.pop_front() {
            if !seen.insert(p.hash_part().to_string()) {
                continue;
            }
            match by_hash.get(p.hash_part()) {
                Some(e) => {
                    out.push(*e);
                    if let (true, Ok(ni)) = (opts.recursive, &e.info) {
                        todo.extend(ni.info.references.iter());
                    }
                }
                // A missing reference is its referrer's problem; a named path is its own.
                None if opts.paths.contains(p) => report.problems.push(Problem {
                    kind: Kind::NotInCache,
                    subject: p.to_string(),
                    detail: "has no narinfo in the cache".into(),
                    heal: Some(p.clone()),
                }),
                None => {}
            }
        }
        out
    };
    report.checked = selected.len() as u64;
    // On all CPUs: checking signatures (~50 µs each) is most of a warm run's work.
    let found = crate::par::map(&selected, |e| {
        let mut v = Vec::new();
        check_entry(e, opts, &present, &objects, &mut v);
        v
    });
    report.problems.extend(found.into_iter().flatten());

    if opts.deep {
        // Only NARs that exist: a missing one is reported already.
        let todo: Vec<&NarInfo> = selected.iter().filter_map(|e| e.info.as_ref().ok()).filter(|ni| objects.contains_key(ni.url.as_str())).collect();
        let total = todo.len() as u64;
        let done = std::sync::atomic::AtomicU64::new(0);
        // Each NAR check keeps a core busy decompressing and hashing: no more than there are.
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let found = try_concurrently(todo, opts.jobs.min(cpus), |ni| {
            let done = &done;
            async move {
                let r = super::deep::check(target, ni).await;
                let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                progress(format!("checking NARs: {}", rate(n, total)));
                Ok::<_, std::convert::Infallible>(r.err().map(|why| Problem { kind: Kind::NarCorrupt, subject: ni.info.path.to_string(), detail: why, heal: Some(ni.info.path.clone()) }))
            }
        })
        .await
        .unwrap_or_else(|e| match e {});
        report.problems.extend(found.into_iter().flatten());
    }

    if opts.paths.is_empty() {
        whole_cache(target, &s, &mut report).await?;
    }
    report.problems.sort_by(|a, b| (&a.subject, a.kind).cmp(&(&b.subject, b.kind)));
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

/// The checks of the whole cache: orphan NARs, stale uploads, `nix-cache-info`.
async fn whole_cache(target: &dyn Target, s: &super::Scan, report: &mut Report) -> Result<(), ScanError> {
    let named: HashSet<&str> = s.narinfos.iter().filter_map(|e| e.info.as_ref().ok()).map(|ni| ni.url.as_str()).collect();
    let now = SystemTime::now();
    let older = |t: Option<SystemTime>, age: Duration| t.is_none_or(|t| now.duration_since(t).is_ok_and(|a| a >= age));
    for o in s.objects.iter().filter(|o| o.key.starts_with("nar/") && !named.contains(o.key.as_str())) {
        if older(o.last_modified, ORPHAN_GRACE) {
            report.orphan_nars += 1;
            report.orphan_bytes += o.size;
            report.problems.push(Problem { kind: Kind::OrphanNar, subject: o.key.clone(), detail: format!("no narinfo names it ({} bytes)", o.size), heal: None });
        }
    }
    for u in s.incomplete.iter().filter(|u| older(u.started, STALE_UPLOAD)) {
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
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
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
