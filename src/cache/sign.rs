//! `narq sign`: adds a signature to narinfos already in the cache, keeping the ones there
//! (`nix copy` never adds one to a path the cache has, so adding a key would otherwise mean
//! uploading everything again). It signs only what it checked: the path is valid in the
//! local store with the same NarHash, NarSize and references, or (`--deep`) the cache's NAR
//! was downloaded and matches.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use super::roots::{Gate, GcWatch, GC_WAIT};
use super::{scan, try_concurrently, NarInfoEntry, ScanError};
use crate::nix::db::NixDb;
use crate::nix::{NarInfo, SecretKey, StorePath};
use crate::storage::{self, Body, Target, TargetError};

pub struct Options {
    pub key: SecretKey,
    /// The paths to sign; empty: every narinfo of the cache (`--all`).
    pub paths: Vec<StorePath>,
    /// Check the cache's NAR instead of the local store.
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

/// Signs the narinfos of `opts.paths` (all without) in the cache at `target`.
pub async fn sign(shared: &Arc<dyn Target>, index_path: &Path, opts: &Options) -> Result<Report, ScanError> {
    let target = &**shared;
    // A narinfo is put back only while no `narq gc`/`narq rm` is deleting, as the daemon's
    // uploads do: else one deleted between our read and our write would come back without
    // its NAR or references.
    let watch = GcWatch::new(shared.clone(), Box::new(|_| Ok(())));
    let watch = &watch;
    let s = scan(target, index_path, opts.jobs, &|_| {}).await?;
    let by_hash: HashMap<&str, &NarInfoEntry> = s.narinfos.iter().map(|e| (e.hash_part(), e)).collect();
    let mut report = Report::default();
    let selected: Vec<&NarInfoEntry> = if opts.paths.is_empty() {
        s.narinfos.iter().collect()
    } else {
        let mut out = Vec::new();
        for p in &opts.paths {
            match by_hash.get(p.hash_part()) {
                Some(e) => out.push(*e),
                None => report.refused.push((p.to_string(), "has no narinfo in the cache".into())),
            }
        }
        out
    };
    let public = opts.key.public();
    // The local store's view first (its database is not shared between tasks).
    let db = if opts.deep { None } else { Some(NixDb::open_default().map_err(|e| TargetError::transient(format!("the local Nix database: {e}")))?) };
    let mut todo: Vec<&NarInfo> = Vec::new();
    for e in selected {
        let ni = match &e.info {
            Ok(ni) if ni.info.path.hash_part() == e.hash_part() => ni,
            Ok(ni) => {
                report.refused.push((e.object.key.clone(), format!("names {}, not the path of its key", ni.info.path)));
                continue;
            }
            Err(why) => {
                report.refused.push((e.object.key.clone(), format!("does not parse: {why}")));
                continue;
            }
        };
        if ni.info.signed_by_any(std::slice::from_ref(&public)) {
            report.already += 1;
            continue;
        }
        if let Some(db) = &db {
            let path = ni.info.path.to_string();
            match db.query(std::slice::from_ref(&ni.info.path), false) {
                Err(_) => {
                    report.refused.push((path, "is not valid in the local store (--deep checks the cache's NAR instead)".into()));
                    continue;
                }
                Ok(local) => {
                    let Some(l) = local.first() else { continue };
                    if (l.nar_hash, l.nar_size) != (ni.info.nar_hash, ni.info.nar_size) {
                        let why = format!("the local store has NarHash {} ({} bytes), the cache {} ({} bytes)", l.nar_hash, l.nar_size, ni.info.nar_hash, ni.info.nar_size);
                        report.refused.push((path, why));
                        continue;
                    }
                    if l.references != ni.info.references {
                        report.refused.push((path, "the local store gives it other references than the cache".into()));
                        continue;
                    }
                }
            }
        }
        todo.push(ni);
    }
    drop(db);
    let results = try_concurrently(todo, opts.jobs, |ni| async move {
        let path = ni.info.path.to_string();
        if opts.deep {
            if let Err(why) = super::deep::check(target, ni).await {
                return Ok::<_, TargetError>(Err((path, why)));
            }
        }
        let until = match watch.wait_open(GC_WAIT).await? {
            Gate::Open { until, .. } => until,
            Gate::Held(why) => return Ok(Err((path, format!("{why}; run sign again")))),
        };
        // Signed as read now: what was checked must be what gets the signature.
        let key = format!("{}.narinfo", ni.info.path.hash_part());
        let Some(body) = target.get(&key).await? else { return Ok(Err((path, "its narinfo was deleted meanwhile".into()))) };
        let text = String::from_utf8_lossy(&body);
        match NarInfo::parse(&text) {
            Ok(now) if now.info.fingerprint() == ni.info.fingerprint() => {
                let sig = opts.key.sign(&ni.info.fingerprint());
                let put = target.put(&key, Body::Bytes(add_sig(&text, &sig).into_bytes()), storage::NARINFO_TYPE);
                match tokio::time::timeout(until.saturating_duration_since(std::time::Instant::now()), put).await {
                    Ok(r) => r?,
                    Err(_) => return Ok(Err((path, "its narinfo took too long to put while a collection may start; run sign again".into()))),
                }
                Ok(Ok(path))
            }
            _ => Ok(Err((path, "its narinfo changed meanwhile; run sign again".into()))),
        }
    })
    .await?;
    for r in results {
        match r {
            Ok(p) => report.signed.push(p),
            Err(refused) => report.refused.push(refused),
        }
    }
    report.signed.sort();
    report.refused.sort();
    Ok(report)
}

/// `narq sign`'s command line.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["path", "all"])))]
#[command(after_help = "Exit codes: 0 every path is signed; 1 some path was refused (not checked); 2 usage error.")]
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
    /// Check each path by downloading its NAR from the cache, instead of against the local store
    #[arg(long)]
    pub deep: bool,
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
    let opts = Options { key, paths, deep: args.deep, jobs: args.jobs.into() };
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
