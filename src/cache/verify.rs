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
    let mut report = Report { fetched: s.fetched, ..Report::default() };
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
    for e in &selected {
        check_entry(e, opts, &present, &objects, &mut report.problems);
    }

    if opts.deep {
        // Only NARs that exist: a missing one is reported already.
        let todo: Vec<&NarInfo> = selected.iter().filter_map(|e| e.info.as_ref().ok()).filter(|ni| objects.contains_key(ni.url.as_str())).collect();
        let total = todo.len() as u64;
        let done = std::sync::atomic::AtomicU64::new(0);
        let found = try_concurrently(todo, opts.jobs, |ni| {
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
