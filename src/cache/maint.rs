//! The commands `narq gc`, `narq rm`, `narq pin`, `narq unpin` and `narq pins`: they scan
//! the cache ([`super::scan`]), plan with [`super::gc`], and delete under the collection
//! protocol of [`super::roots`]. Each returns `Ok(true)` when it did what was asked,
//! `Ok(false)` when it refused (and said why on stderr).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use serde::Serialize;

use super::collection::{self, Run, Timing};
use super::gc::{self, human, Model, Plan, Policy, RmRefused};
use super::roots;
use crate::config::Config;
use crate::nix::{NarInfo, StorePath};
use crate::storage::{self, Body, Target};

/// Parts of the key space listed at once.
const LIST_JOBS: usize = 32;

/// `narq gc`'s options; `None` takes the config's `[gc]`.
#[derive(Debug, Default)]
pub struct GcOptions {
    pub keep_days: Option<u64>,
    pub max_size: Option<u64>,
    pub grace: Option<Duration>,
    pub dry_run: bool,
    pub json: bool,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(super::runtime()?)
}

async fn open(config: &Config) -> anyhow::Result<Arc<dyn Target>> {
    storage::open(&config.store).await.map_err(|e| anyhow::anyhow!("store {}: {e}", config.store.original))
}

/// Scans the cache (through the index in the state dir) into a [`Model`], and reads the pins.
async fn model(config: &Config, target: &dyn Target) -> anyhow::Result<(Model, Stats)> {
    let start = Instant::now();
    let ix = super::Indexed::open(&super::index_path(&config.state_dir, &config.store.identity()))?;
    let jobs = (config.jobs * 8).clamp(8, 64);
    let m = std::cell::RefCell::new(Model::default());
    let mut on_object = |o| m.borrow_mut().add_object(o);
    let on_batch = |batch: Vec<super::Read>| {
        let m = &m;
        async move {
            // Parsed on every CPU, off the runtime; kept here, one compact record each.
            let batch = std::sync::Arc::new(batch);
            let work = batch.clone();
            let parsed = tokio::task::spawn_blocking(move || crate::par::map(&work, |r| r.body.as_ref().map(|b| b.as_ref().ok().map(|t| NarInfo::parse(t).map(|i| gc::Entry::new(&i, &r.object))))))
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            let batch = std::sync::Arc::try_unwrap(batch).map_err(|_| std::io::Error::other("a parse is still running"))?;
            let mut m = m.borrow_mut();
            for (r, p) in batch.iter().zip(parsed) {
                match p {
                    None => {}
                    Some(Some(Ok(e))) => m.add_narinfo(r.hash_part(), e),
                    Some(_) => m.add_unreadable(&r.object.key, r.body.as_ref().map_or(&[][..], |b| b.as_ref().map_or(&[][..], |t| t.as_bytes()))),
                }
            }
            Ok(batch)
        }
    };
    let scanned = super::scan(target, &ix, jobs, jobs, &mut on_object, on_batch, &|_| {}).await.with_context(|| format!("scanning {}", target.describe()))?;
    let mut m = m.into_inner();
    if scanned.gone > 0 {
        let unreadable: HashSet<&str> = m.unreadable.iter().map(String::as_str).collect();
        ix.prune("", None, &mut |k| k.strip_suffix(".narinfo").is_some_and(|hp| m.has(hp)) || unreadable.contains(k))?;
    }
    m.incomplete = super::incomplete(target).await?.0;
    m.pins = roots::pins(target).await?;
    let stats = Stats { objects: scanned.objects, fetched: scanned.fetched, scan_ms: start.elapsed().as_millis() as u64 };
    Ok((m, stats))
}

/// What a scan cost, for `--json` and the benchmark.
#[derive(Debug, Default, Serialize)]
struct Stats {
    /// Objects listed.
    objects: u64,
    /// Narinfos read from the cache (the rest came from the index).
    fetched: u64,
    scan_ms: u64,
}

/// `--json`: the plan, its paths and keys written out as they are rendered.
struct Summary<'a> {
    dry_run: bool,
    plan: &'a Plan,
    m: &'a Model,
    scan: &'a Stats,
    calls: storage::Calls,
}

impl Serialize for Summary<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        /// A sequence serialized as its iterator goes (once).
        struct Seq<I>(std::cell::RefCell<Option<I>>);
        impl<I: Iterator<Item = T>, T: Serialize> Serialize for Seq<I> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_seq(self.0.borrow_mut().take().into_iter().flatten())
            }
        }
        fn seq<I>(i: I) -> Seq<I> {
            Seq(std::cell::RefCell::new(Some(i)))
        }
        let (p, m) = (self.plan, self.m);
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("dry_run", &self.dry_run)?;
        map.serialize_entry("rounds", &seq(p.rounds.iter().map(|r| seq(r.iter().map(|id| m.narinfo_key(*id))))))?;
        map.serialize_entry("paths", &seq(p.paths(m)))?;
        map.serialize_entry("objects", &seq(p.object_keys(m)))?;
        map.serialize_entry("freed", &p.freed)?;
        map.serialize_entry("kept_paths", &p.kept_paths)?;
        map.serialize_entry("kept_bytes", &p.kept_bytes)?;
        map.serialize_entry("dropped_roots", &p.dropped_roots)?;
        map.serialize_entry("incomplete", &p.incomplete.len())?;
        map.serialize_entry("unreadable", &m.unreadable)?;
        map.serialize_entry("scan", self.scan)?;
        map.serialize_entry("calls", &self.calls)?;
        map.end()
    }
}

fn print(what: &str, plan: &Plan, m: &Model, stats: &Stats, calls: storage::Calls, dry_run: bool, json: bool) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if json {
        serde_json::to_writer_pretty(&mut out, &Summary { dry_run, plan, m, scan: stats, calls })?;
        writeln!(out)?;
        return Ok(out.flush()?);
    }
    let verb = if dry_run { "would remove" } else { "removed" };
    for p in plan.paths(m) {
        writeln!(out, "{verb} {p}")?;
    }
    out.flush()?;
    for p in &plan.dropped_roots {
        eprintln!("narq: {what}: max-size: gave up the root {p}");
    }
    for k in &m.unreadable {
        eprintln!("narq: {what}: {k} does not parse; left alone");
    }
    writeln!(out, "{}", summary_line(what, plan, dry_run))?;
    Ok(out.flush()?)
}

/// `rm: would remove 1 path and 2 other objects (NARs, listings, logs, roots): 2.6 KiB; 3 paths stay (5.1 KiB)`.
fn summary_line(what: &str, plan: &Plan, dry_run: bool) -> String {
    let n = |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    format!(
        "{what}: {} {} and {} (NARs, listings, logs, roots): {}{}; {} ({})",
        if dry_run { "would remove" } else { "removed" },
        n(plan.path_count(), "path", "paths"),
        n(plan.objects.len(), "other object", "other objects"),
        human(plan.freed),
        match plan.incomplete.len() {
            0 => String::new(),
            k => format!(", and {}", n(k, "incomplete upload", "incomplete uploads")),
        },
        n(plan.kept_paths, "path stays", "paths stay"),
        human(plan.kept_bytes)
    )
}

/// `narq gc`.
pub fn gc(config: &Config, o: &GcOptions) -> anyhow::Result<bool> {
    runtime()?.block_on(async {
        let target = open(config).await?;
        let (mut m, stats) = model(config, &*target).await?;
        let policy = Policy {
            keep: Duration::from_secs(o.keep_days.unwrap_or(config.gc.keep_days).saturating_mul(86400)),
            max_size: o.max_size.or(config.gc.max_size),
            grace: o.grace.unwrap_or(config.gc.grace),
            now: SystemTime::now(),
        };
        let plan = gc::plan_gc(&m, &policy, &HashSet::new());
        if o.dry_run || plan.is_empty() {
            print("gc", &plan, &m, &stats, target.calls(), o.dry_run, o.json)?;
            return Ok(true);
        }
        if let Some(why) = m.old_writers(&*target, policy.now).await? {
            eprintln!("narq: gc: refused: {why}");
            return Ok(false);
        }
        let mut run = Run::begin(&*target, "gc").await?;
        let result = async {
            run.wait_lease().await?;
            let also = gc::since_scan(&*target, &mut m, LIST_JOBS).await?;
            // Ages by the store's clock, not this machine's.
            let policy = Policy { now: run.server_now(), ..policy };
            if let Some(why) = m.old_writers(&*target, policy.now).await? {
                return Ok(Err(why));
            }
            let plan = gc::plan_gc(&m, &policy, &also);
            gc::execute(&*target, &mut run, &plan, &m).await?;
            anyhow::Ok(Ok(plan))
        }
        .await;
        // Deleting may have begun: the generation moves whatever happened.
        let result = ended(result, run.end().await, "gc", "ending the collection (daemons wait for it until its heartbeat is 2 minutes old)")?;
        match result {
            Ok(plan) => print("gc", &plan, &m, &stats, target.calls(), false, o.json)?,
            Err(why) => {
                eprintln!("narq: gc: refused: {why}");
                return Ok(false);
            }
        }
        Ok(true)
    })
}

/// The outcome of a collection once its run has ended: its own error first (a failure to end
/// it is said beside it unless it is the same error), else the failure to end it.
fn ended<T>(result: anyhow::Result<T>, end: Result<(), crate::storage::TargetError>, what: &str, ending: &str) -> anyhow::Result<T> {
    match (result, end) {
        (Err(e), Err(end)) => {
            // Often the same cause (DeleteObject refused): said once.
            let end = end.to_string();
            if !e.chain().any(|c| c.to_string() == end) {
                eprintln!("narq: {what}: also {ending}: {end}");
            }
            Err(e)
        }
        (r, end) => {
            end.context(ending.to_string())?;
            r
        }
    }
}

/// `narq rm`.
pub fn rm(config: &Config, paths: &[StorePath], with_referrers: bool, dry_run: bool) -> anyhow::Result<bool> {
    runtime()?.block_on(async {
        let target = open(config).await?;
        let (mut m, stats) = model(config, &*target).await?;
        let refused = |e: RmRefused| {
            match e {
                RmRefused::Referenced(v) => {
                    eprintln!("narq: rm: refused: {} paths that stay reference paths to remove (--with-referrers removes them too):", v.len());
                    for (r, p) in v {
                        eprintln!("  {r} references {p}");
                    }
                }
                RmRefused::Pinned(v) => {
                    for (n, p) in v {
                        eprintln!("narq: rm: refused: {p} is pinned as {n}; `narq unpin {n}` first");
                    }
                }
                RmRefused::OldWriters(why) => eprintln!("narq: rm: refused: {why}"),
            }
            Ok(false)
        };
        for p in paths.iter().filter(|p| !m.has(p.hash_part())) {
            eprintln!("narq: rm: {p} is not in the cache");
        }
        let plan = match gc::plan_rm(&m, paths, with_referrers) {
            Ok(p) => p,
            Err(e) => return refused(e),
        };
        if dry_run || plan.rounds.is_empty() {
            print("rm", &plan, &m, &stats, target.calls(), dry_run, false)?;
            return Ok(true);
        }
        let now = SystemTime::now();
        if let Some(why) = m.old_writers(&*target, now).await? {
            eprintln!("narq: rm: refused: {why}");
            return Ok(false);
        }
        let mut run = Run::begin(&*target, "rm").await?;
        let result = async {
            run.wait_lease().await?;
            // A referrer uploaded meanwhile is seen here: refused, or removed too.
            gc::since_scan(&*target, &mut m, LIST_JOBS).await?;
            if let Some(why) = m.old_writers(&*target, run.server_now()).await? {
                return Ok(Err(RmRefused::OldWriters(why)));
            }
            match gc::plan_rm(&m, paths, with_referrers) {
                Ok(plan) => gc::execute(&*target, &mut run, &plan, &m).await.map(|()| Ok(plan)).map_err(anyhow::Error::from),
                Err(e) => Ok(Err(e)),
            }
        }
        .await;
        let result = ended(result, run.end().await, "rm", "ending the removal")?;
        match result {
            Ok(plan) => {
                print("rm", &plan, &m, &stats, target.calls(), false, false)?;
                Ok(true)
            }
            Err(e) => refused(e),
        }
    })
}

/// `narq pin NAME PATH`.
pub fn pin(config: &Config, name: &str, path: &StorePath) -> anyhow::Result<bool> {
    let key = roots::pin_key(name).map_err(anyhow::Error::msg)?;
    runtime()?.block_on(async {
        let target = open(config).await?;
        let narinfo = format!("{}.narinfo", path.hash_part());
        if !target.exists(&narinfo).await? {
            eprintln!("narq: pin: {path} is not in the cache ({}); push it first", target.describe());
            return Ok(false);
        }
        target.put(&key, Body::Bytes(format!("{path}\n").into_bytes()), collection::TEXT).await?;
        // A collection that began before the pin was written may not have seen it: once
        // those are over, the path must still be there.
        let wait = Timing::get().pin_wait;
        if !collection::wait_quiet(target.clone(), wait).await? {
            eprintln!("narq: pin: pinned {name}, but a collection still runs after {} s: check `narq pins` later", wait.as_secs());
            return Ok(false);
        }
        target.forget_listing();
        if !target.exists(&narinfo).await? {
            eprintln!("narq: pin: a collection removed {path} while it was being pinned; push it again (the pin {name} stays)");
            return Ok(false);
        }
        println!("pinned {name} {path}");
        Ok(true)
    })
}

/// `narq unpin NAME`.
pub fn unpin(config: &Config, name: &str) -> anyhow::Result<bool> {
    let key = roots::pin_key(name).map_err(anyhow::Error::msg)?;
    runtime()?.block_on(async {
        let target = open(config).await?;
        if target.get(&key).await?.is_none() {
            eprintln!("narq: unpin: no pin named {name}");
            return Ok(false);
        }
        target.delete(&[key]).await?;
        println!("unpinned {name}");
        Ok(true)
    })
}

/// `narq pins`: one `NAME PATH` line per pin.
pub fn pins(config: &Config) -> anyhow::Result<bool> {
    runtime()?.block_on(async {
        let target = open(config).await?;
        let pins = roots::pins(&*target).await?;
        if pins.is_empty() {
            eprintln!("narq: no pins in {} (`narq pin NAME PATH` keeps a path's closure whatever its age)", target.describe());
        }
        for (name, path) in pins {
            println!("{name} {path}");
        }
        Ok(true)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 21: "1 other objects", and rm's "3 paths stay (0 B)" beside gc's size.
    #[test]
    fn the_summary_counts_in_words() {
        let plan = Plan { rounds: vec![vec![0]], objects: vec![gc::Doomed::Other(0)], freed: 2662, kept_paths: 3, kept_bytes: 5222, ..Plan::default() };
        assert_eq!(summary_line("rm", &plan, true), "rm: would remove 1 path and 1 other object (NARs, listings, logs, roots): 2.6 KiB; 3 paths stay (5.1 KiB)");
        let plan = Plan { kept_paths: 1, ..Plan::default() };
        assert_eq!(summary_line("gc", &plan, false), "gc: removed 0 paths and 0 other objects (NARs, listings, logs, roots): 0 B; 1 path stays (0 B)");
    }
}
