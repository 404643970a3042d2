//! `narq sign`: adds a signature to narinfos already in the cache, keeping the ones there
//! (`nix copy` never adds one to a path the cache has, so adding a key would otherwise mean
//! uploading everything again).
//!
//! A signature says that a trusted key vouches for the contents, so `sign` adds one only
//! where that is already so: the narinfo carries a valid signature by a trusted key
//! (`public-keys`, or `--trusted-public-keys`), or the local store holds the same path,
//! valid, with the same NarHash, NarSize and references. `--deep` checks the cache's NAR
//! against the narinfo as well; on its own it proves nothing, since whoever wrote the
//! narinfo wrote its NarHash too. Each narinfo is read and written back under the
//! collection gate (`cache::collection`), with `If-Match` where the store honours it, so a
//! signature another writer added meanwhile is never lost.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use super::collection::{Gate, GcWatch, Settled, Timing};
use super::{try_concurrently, ScanError};
use crate::nix::db::NixDb;
use crate::nix::{NarInfo, PublicKey, SecretKey, StorePath};
use crate::storage::{self, Body, Target, TargetError};

pub struct Options {
    pub key: SecretKey,
    /// The paths to sign; empty: every narinfo of the cache (`--all`).
    pub paths: Vec<StorePath>,
    /// Keys whose valid signature on a narinfo is enough to sign it too.
    pub trusted: Vec<PublicKey>,
    /// Check the cache's NAR against its narinfo too.
    pub deep: bool,
    pub jobs: usize,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct Report {
    /// Paths signed now.
    pub signed: Vec<String>,
    /// Paths that carried a valid signature by the key already.
    pub already: u64,
    /// What was not signed, and why.
    pub refused: Vec<(String, String)>,
}

/// `text` (a narinfo) with `sig` added to its `Sig:` lines, which Nix writes sorted, after
/// `Deriver` and before `CA`. Everything else stays as it was, byte for byte.
pub fn add_sig(text: &str, sig: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut sigs: BTreeSet<&str> = lines.iter().filter_map(|l| l.strip_prefix("Sig: ")).collect();
    sigs.insert(sig);
    let at = lines.iter().position(|l| l.starts_with("Sig: ") || l.starts_with("CA: ")).unwrap_or(lines.len());
    let mut out = String::with_capacity(text.len() + sig.len() + 6);
    for (i, l) in lines.iter().enumerate() {
        if i == at {
            sigs.iter().for_each(|s| out += &format!("Sig: {s}\n"));
        }
        if !l.starts_with("Sig: ") {
            out += l;
            out.push('\n');
        }
    }
    if at == lines.len() {
        sigs.iter().for_each(|s| out += &format!("Sig: {s}\n"));
    }
    out
}

/// Why the cache's narinfo `ni` may not be signed (see the module doc), or `None` if a
/// trusted key already vouches for it or the local store (`db`) holds the same path.
fn untrusted(ni: &NarInfo, trusted: &[PublicKey], db: Option<&NixDb>) -> Option<String> {
    if ni.info.signed_by_any(trusted) {
        return None;
    }
    let Some(db) = db else {
        return Some("carries no valid signature by a trusted key, and the local Nix database cannot be read (sign as root, or pass --trusted-public-keys)".into());
    };
    let local = match db.query(std::slice::from_ref(&ni.info.path), false) {
        Ok(l) => l,
        Err(_) => return Some("carries no valid signature by a trusted key and is not valid in the local store (--trusted-public-keys names keys to trust)".into()),
    };
    let l = local.first()?;
    if (l.nar_hash, l.nar_size) != (ni.info.nar_hash, ni.info.nar_size) {
        return Some(format!(
            "the local store has NarHash {} ({} bytes), the cache {} ({} bytes), and no trusted key signed the cache's",
            l.nar_hash, l.nar_size, ni.info.nar_hash, ni.info.nar_size
        ));
    }
    if l.references != ni.info.references {
        return Some("the local store gives it other references than the cache, and no trusted key signed the cache's".into());
    }
    None
}

/// What to do with one narinfo.
enum Decision {
    Sign(NarInfo),
    Already,
    Refused(String, String),
}

/// Whether `r` may be signed (see the module doc) and needs it.
fn decide(r: &super::Read, public: &PublicKey, opts: &Options, db: Option<&NixDb>) -> Option<Decision> {
    let key = &r.object.key;
    let ni = match r.body.as_ref()?.as_ref().map_err(Clone::clone).and_then(|t| NarInfo::parse(t).map_err(|e| e.to_string())) {
        Ok(ni) if ni.info.path.hash_part() == r.hash_part() => ni,
        Ok(ni) => return Some(Decision::Refused(key.clone(), format!("names {}, not the path of its key", ni.info.path))),
        Err(why) => return Some(Decision::Refused(key.clone(), format!("does not parse: {why}"))),
    };
    if ni.info.signed_by_any(std::slice::from_ref(public)) {
        return Some(Decision::Already);
    }
    Some(match untrusted(&ni, &opts.trusted, db) {
        Some(why) => Decision::Refused(ni.info.path.to_string(), why),
        None => Decision::Sign(ni),
    })
}

/// Signs the narinfos of `opts.paths` (all without) in the cache at `target`: named paths are
/// read one by one; `--all` streams the cache ([`super::scan`]), a batch at a time.
pub async fn sign(shared: &Arc<dyn Target>, index_path: &Path, opts: &Options) -> Result<Report, ScanError> {
    let target = &**shared;
    let watch = GcWatch::new(shared.clone(), Box::new(|_| Ok(())));
    let public = opts.key.public();
    // The local store vouches for what it holds; without it only trusted signatures do.
    let db = match NixDb::open_default() {
        Ok(db) => Some(db),
        Err(e) => {
            tracing::debug!("the local Nix database: {e}");
            None
        }
    };
    let conditional = target.conditional_puts().await?;
    if let Err(why) = &conditional {
        eprintln!("narq: sign: {}: {why}; narinfos are written back without If-Match, so a signature another writer adds at the same moment may be lost (run sign again to see)", target.describe());
    }
    let conditional = conditional.is_ok();
    let report = RefCell::new(Report::default());
    let decided = |reads: &[super::Read]| -> Vec<NarInfo> {
        let mut report = report.borrow_mut();
        let mut todo = Vec::new();
        for d in reads.iter().filter_map(|r| decide(r, &public, opts, db.as_ref())) {
            match d {
                Decision::Sign(ni) => todo.push(ni),
                Decision::Already => report.already += 1,
                Decision::Refused(what, why) => report.refused.push((what, why)),
            }
        }
        todo
    };
    let sign_all = |todo: Vec<NarInfo>| {
        let (watch, report) = (&watch, &report);
        async move {
            let results = try_concurrently(todo, opts.jobs, |ni| sign_one(target, watch, ni, opts, conditional)).await?;
            let mut report = report.borrow_mut();
            for r in results {
                match r {
                    Ok(p) => report.signed.push(p),
                    Err(refused) => report.refused.push(refused),
                }
            }
            Ok::<_, ScanError>(())
        }
    };
    if opts.paths.is_empty() {
        let ix = super::Indexed::open(index_path)?;
        let on_batch = |batch: Vec<super::Read>| {
            let todo = decided(&batch);
            let sign_all = &sign_all;
            async move {
                sign_all(todo).await?;
                Ok(batch)
            }
        };
        super::scan(target, &ix, opts.jobs, opts.jobs.min(32), &mut |_| {}, on_batch, &|_| {}).await?;
    } else {
        let reads = try_concurrently(opts.paths.clone(), opts.jobs, |p| async move {
            let key = format!("{}.narinfo", p.hash_part());
            let body = target.get(&key).await?;
            Ok::<_, TargetError>((p, key, body))
        })
        .await?;
        let mut found = Vec::new();
        for (p, key, body) in reads {
            match body {
                None => report.borrow_mut().refused.push((p.to_string(), "has no narinfo in the cache".into())),
                Some(b) => {
                    let object = crate::storage::Object { key, size: b.len() as u64, last_modified: None, etag: None };
                    found.push(super::Read::new(object, Some(String::from_utf8(b).map_err(|_| "not UTF-8".to_string()))));
                }
            }
        }
        let todo = decided(&found);
        sign_all(todo).await?;
    }
    drop(db);
    let mut report = report.into_inner();
    report.signed.sort();
    report.refused.sort();
    Ok(report)
}

/// Signs one narinfo: read again under the collection gate, signed as read, written back
/// (with `If-Match` where the store honours it), settled. `Err` says why it was not.
async fn sign_one(target: &dyn Target, watch: &GcWatch, ni: NarInfo, opts: &Options, conditional: bool) -> Result<Result<String, (String, String)>, TargetError> {
    let path = ni.info.path.to_string();
    if opts.deep {
        if let Err(why) = super::deep::check(target, &ni).await {
            return Ok(Err((path, why)));
        }
    }
    let sig = opts.key.sign(&ni.info.fingerprint());
    let key = format!("{}.narinfo", ni.info.path.hash_part());
    for _ in 0..5 {
        let open = match watch.wait_open(Timing::get().gc_wait).await? {
            Gate::Open(look) => look,
            Gate::Held(why) => return Ok(Err((path, format!("{why}; run sign again")))),
        };
        // Signed as read now: what was checked must be what gets the signature.
        let Some((body, version)) = target.get_versioned(&key).await? else { return Ok(Err((path, "its narinfo was deleted meanwhile".into()))) };
        let text = String::from_utf8_lossy(&body);
        match NarInfo::parse(&text) {
            Ok(now) if now.info.fingerprint() == ni.info.fingerprint() => {}
            _ => return Ok(Err((path, "its narinfo changed meanwhile; run sign again".into()))),
        }
        let signed = add_sig(&text, &sig).into_bytes();
        if conditional {
            if !target.put_if_version(&key, signed, storage::NARINFO_TYPE, &version).await? {
                continue;
            }
        } else {
            target.put(&key, Body::Bytes(signed), storage::NARINFO_TYPE).await?;
        }
        // A write that a collection may have overlapped must not leave a narinfo whose
        // NAR or references it deleted (without If-Match the put may have brought back
        // one it deleted): looked for, and undone if gone.
        let settled = match watch.settle(&open, Instant::now()).await? {
            Ok(s) => s,
            Err(why) => return Ok(Err((path, format!("{why}; run sign again")))),
        };
        if let Settled::Check(_) = settled {
            if let Some(gone) = missing(target, &ni).await? {
                target.delete(std::slice::from_ref(&key)).await?;
                return Ok(Err((path, format!("a collection removed {gone} meanwhile; its narinfo was removed again"))));
            }
        }
        return Ok(Ok(path));
    }
    Ok(Err((path, "its narinfo kept changing while it was being signed; run sign again".into())))
}

/// What `ni` names that the cache no longer has: its NAR or a reference's narinfo.
async fn missing(target: &dyn Target, ni: &NarInfo) -> Result<Option<String>, TargetError> {
    if !target.exists(&ni.url).await? {
        return Ok(Some(ni.url.clone()));
    }
    for r in ni.info.references.iter().filter(|r| **r != ni.info.path) {
        if !target.exists(&format!("{}.narinfo", r.hash_part())).await? {
            return Ok(Some(r.to_string()));
        }
    }
    Ok(None)
}

/// `narq sign`'s command line.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["path", "all"])))]
#[command(after_help = "A path is signed only if a trusted key already signed its narinfo, or the local store holds it with the same contents.\nExit codes: 0 every path is signed; 1 some path was refused (not vouched for); 2 usage error.")]
pub struct Args {
    /// The secret key to sign with (NAME:BASE64, as nix-store --generate-binary-cache-key writes it)
    #[arg(long, value_name = "FILE")]
    pub key_file: std::path::PathBuf,
    /// Store paths (or links to them, such as ./result) whose narinfos to sign
    pub path: Vec<std::path::PathBuf>,
    /// Sign every narinfo in the cache
    #[arg(long, conflicts_with = "path")]
    pub all: bool,
    /// The cache: file:///DIR or s3://BUCKET?... [default: the configured store]
    #[arg(long, value_name = "URL", value_parser = crate::store_url::StoreUrl::parse)]
    pub store: Option<crate::store_url::StoreUrl>,
    /// Also download each NAR and check it against its narinfo (this alone is no reason to sign)
    #[arg(long)]
    pub deep: bool,
    /// Keys whose valid signature on a narinfo vouches for it [default: public-keys and the secret-key-files' public halves]
    #[arg(long, value_name = "KEYS", value_parser = super::verify::parse_keys)]
    pub trusted_public_keys: Option<super::verify::Keys>,
    /// Concurrent reads and writes
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub jobs: u16,
    /// Print the report as JSON
    #[arg(long)]
    pub json: bool,
}

/// Runs `narq sign`; true when nothing was refused. `resolve` turns a command-line path
/// into a store path.
pub fn run(config: &crate::config::Config, args: Args, resolve: impl Fn(&Path) -> anyhow::Result<StorePath>) -> anyhow::Result<bool> {
    use anyhow::Context;
    let key = SecretKey::read(&args.key_file)?;
    let paths = args.path.iter().map(|p| resolve(p)).collect::<anyhow::Result<Vec<_>>>()?;
    let trusted = match args.trusted_public_keys {
        Some(super::verify::Keys(k)) => k,
        None => config.trusted_keys(),
    };
    let opts = Options { key, paths, trusted, deep: args.deep, jobs: args.jobs.into() };
    let (rt, target, index) = super::verify::open(config, args.store.as_ref())?;
    let report = rt.block_on(sign(&target, &index, &opts)).context("signing")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for p in &report.signed {
            println!("{p}: signed");
        }
        for (p, why) in &report.refused {
            println!("{p}: not signed: {why}");
        }
        println!("signed {} paths with {}; {} were signed by it already; {} refused", report.signed.len(), opts.key.name, report.already, report.refused.len());
    }
    Ok(report.refused.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::nix::narinfo::SAMPLE as NARINFO;

    #[test]
    fn adds_sorted_sig_lines_where_nix_writes_them() {
        let with = |sigs: &[&str], ca: bool| {
            let mut t = NARINFO.to_string();
            sigs.iter().for_each(|s| t += &format!("Sig: {s}\n"));
            if ca {
                t += "CA: fixed:r:sha256:1w1fff338fvdw53sqcamqgqmxgrgjyb3j3bzkqmr0qfkvlsqb05w\n";
            }
            t
        };
        assert_eq!(add_sig(&with(&[], false), "m:1"), with(&["m:1"], false));
        assert_eq!(add_sig(&with(&["b:2", "z:3"], false), "m:1"), with(&["b:2", "m:1", "z:3"], false));
        assert_eq!(add_sig(&with(&[], true), "m:1"), with(&["m:1"], true));
        assert_eq!(add_sig(&with(&["z:3"], true), "a:1"), with(&["a:1", "z:3"], true));
        // The same as narq (and Nix) render the narinfo with both.
        let mut ni = NarInfo::parse(&with(&["b:2"], true)).unwrap();
        ni.info.sigs.insert("a:1".into());
        assert_eq!(add_sig(&with(&["b:2"], true), "a:1"), ni.to_string());
    }
}
