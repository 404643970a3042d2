//! `narq gc` and `narq rm`: closure-aware deletion in a bucket that any number of builders
//! share, with no server.
//!
//! [`Model`] is what a [`super::scan`] found, in the terms deletion needs; [`plan_gc`] and
//! [`plan_rm`] are pure functions from it to a [`Plan`], so every rule is tested on a model
//! in memory; [`execute`] deletes what a plan says under the collection protocol of
//! [`super::roots`] (announce, wait the lease, list again, delete, move the generation).
//!
//! What stays in a `gc`: the roots pushed within `keep-days`, the pins, every narinfo written
//! within `grace` (uploads in progress anywhere), and the closures of all of them. With
//! `max-size`, the oldest roots go first (never a pin) until what stays fits.
//!
//! Order: narinfos first, referrers before what they reference, in rounds (a round deletes
//! only narinfos that no narinfo left references), so at every moment each visible narinfo
//! has its references; then NARs, listings and build logs that no remaining narinfo names
//! and that are older than `grace`; expired roots; incomplete uploads older than `grace`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::collection::{protocol_of, Run, PROTOCOL};
use super::roots::{self, ROOTS};
use super::Scan;
use crate::nix::{NarInfo, StorePath};
use crate::storage::{Incomplete, Object, Target, TargetError, DELETE_BATCH, STREAM_TMP_PREFIX};

/// One narinfo, as deletion sees it.
#[derive(Debug, Clone)]
pub struct Entry {
    pub path: StorePath,
    /// Hash parts of its references, itself left out.
    pub refs: Vec<String>,
    /// Its NAR's key (`URL`).
    pub url: String,
    /// The narinfo object's size.
    pub size: u64,
    /// The NAR's size (`FileSize`, else the listed size of the NAR).
    pub file_size: u64,
    /// `log/<deriver>` names its build log.
    pub deriver: Option<String>,
    pub modified: Option<SystemTime>,
}

impl Entry {
    pub fn new(info: &NarInfo, object: &Object) -> Entry {
        Entry {
            path: info.info.path.clone(),
            refs: info.info.references.iter().filter(|r| **r != info.info.path).map(|r| r.hash_part().to_string()).collect(),
            url: info.url.clone(),
            size: object.size,
            file_size: info.file_size.unwrap_or(0),
            deriver: info.info.deriver.as_ref().map(|d| d.base_name().to_string()),
            modified: object.last_modified,
        }
    }
}

/// The `URL`, `References` and `Deriver` of a narinfo that does not parse, as far as they
/// can be read: what it names stays.
#[derive(Debug, Clone, Default)]
pub struct Held {
    /// The narinfo's key.
    pub key: String,
    pub url: Option<String>,
    /// Hash parts.
    pub refs: Vec<String>,
    /// The base name of its deriver (`log/<deriver>` is its build log).
    pub deriver: Option<String>,
}

impl Held {
    pub fn lenient(key: &str, body: &[u8]) -> Held {
        let mut h = Held { key: key.to_string(), ..Held::default() };
        for line in String::from_utf8_lossy(body).lines() {
            let Some((k, v)) = line.split_once(':') else { continue };
            let v = v.trim();
            match k.trim() {
                "URL" if !v.is_empty() => h.url = Some(v.to_string()),
                "References" => h.refs.extend(v.split_whitespace().filter_map(|r| r.get(..32)).map(str::to_string)),
                "Deriver" if !v.is_empty() && !v.contains('/') => h.deriver = Some(v.to_string()),
                _ => {}
            }
        }
        h
    }
}

/// A cache as deletion sees it.
#[derive(Debug, Default)]
pub struct Model {
    /// Narinfos by hash part.
    pub narinfos: HashMap<String, Entry>,
    /// Narinfos that do not parse: left alone, and reported.
    pub unreadable: Vec<String>,
    /// What those name, read leniently ([`Held::lenient`]): a client that reads them (Nix is
    /// more lenient than our parser) needs their NARs and references, so these stay.
    pub held: Vec<Held>,
    /// Every other object (NARs, listings, logs, narq's own, `nix-cache-info`).
    pub objects: Vec<Object>,
    /// Roots: hash part → when last pushed.
    pub roots: HashMap<String, SystemTime>,
    pub pins: BTreeMap<String, StorePath>,
    pub incomplete: Vec<Incomplete>,
}

impl Model {
    /// The model of a scan, with the pins (read apart: `scan` lists them but does not read them).
    pub fn from_scan(scan: Scan, pins: BTreeMap<String, StorePath>) -> Model {
        let mut m = Model { pins, incomplete: scan.incomplete, ..Model::default() };
        for n in scan.narinfos {
            match &n.info {
                Ok(info) => {
                    m.narinfos.insert(n.hash_part().to_string(), Entry::new(info, &n.object));
                }
                Err(_) => m.unreadable.push(n.object.key.clone()),
            }
        }
        for o in &scan.objects {
            if let (Some(hp), Some(t)) = (o.key.strip_prefix(ROOTS), o.last_modified) {
                m.roots.insert(hp.to_string(), t);
            }
        }
        // A NAR's listed size where the narinfo does not say it.
        let sizes: HashMap<&str, u64> = scan.objects.iter().map(|o| (o.key.as_str(), o.size)).collect();
        for e in m.narinfos.values_mut().filter(|e| e.file_size == 0) {
            e.file_size = sizes.get(e.url.as_str()).copied().unwrap_or(0);
        }
        m.objects = scan.objects;
        m
    }

    /// Why a collection now could break what a builder running an older narq (protocol 1)
    /// uploads, if one seems active: it wrote a root within the last [`OLD_WRITER_WINDOW`]
    /// (daemons write their roots at most once a day). An old daemon neither settles its
    /// writes nor sees a collection that a lost answer hid from it (`docs/gc-safety.md`,
    /// mixed versions). A root's protocol shows in its size; a root whose narinfo is
    /// missing is read.
    pub async fn old_writers(&self, target: &dyn Target, now: SystemTime) -> Result<Option<String>, TargetError> {
        for o in self.objects.iter().filter(|o| !older(o.last_modified, OLD_WRITER_WINDOW, now)) {
            let Some(hp) = o.key.strip_prefix(ROOTS) else { continue };
            let old = match self.narinfos.get(hp) {
                // `<path>\n`, or `<path>\nnarq-protocol N\n`.
                Some(e) if o.size == e.path.to_string().len() as u64 + 1 => true,
                Some(e) if o.size == root_size(&e.path) => false,
                _ => target.get(&o.key).await?.is_some_and(|b| protocol_of(&b) < PROTOCOL),
            };
            if old {
                let age = o.last_modified.and_then(|t| now.duration_since(t).ok()).map_or("recently".into(), |a| format!("{} min ago", a.as_secs() / 60));
                return Ok(Some(format!(
                    "{} was written {age} by a builder running an older narq (protocol 1), which a collection now could leave with a broken closure; upgrade narq on every builder, then run this again (roots in the old format stop counting {} days after they were written)",
                    o.key,
                    OLD_WRITER_WINDOW.as_secs() / 86400
                )));
            }
        }
        Ok(None)
    }

    /// The hash part of `p` if the cache has its narinfo.
    fn has(&self, p: &StorePath) -> bool {
        self.narinfos.contains_key(p.hash_part())
    }

    /// Marks the closure of `seed` in `alive` (and its NARs in `nars`); returns the bytes
    /// newly marked (NARs shared with what was marked before count once), and what was newly
    /// marked, to undo it.
    fn mark(&self, seed: &str, alive: &mut HashSet<String>, nars: &mut HashSet<String>) -> (u64, Vec<String>, Vec<String>) {
        let (mut added, mut new_paths, mut new_nars) = (0, Vec::new(), Vec::new());
        let mut stack = vec![seed.to_string()];
        while let Some(hp) = stack.pop() {
            let Some(e) = self.narinfos.get(&hp) else { continue };
            if !alive.insert(hp.clone()) {
                continue;
            }
            new_paths.push(hp);
            added += e.size;
            if nars.insert(e.url.clone()) {
                added += e.file_size;
                new_nars.push(e.url.clone());
            }
            stack.extend(e.refs.iter().filter(|r| !alive.contains(*r)).cloned());
        }
        (added, new_paths, new_nars)
    }
}

/// How long a root written by an older narq holds back `gc` and `rm` ([`Model::old_writers`]).
pub const OLD_WRITER_WINDOW: Duration = Duration::from_secs(2 * 86400);

/// The size of a root object this narq writes for `p` ([`roots::root_body`]).
fn root_size(p: &StorePath) -> u64 {
    roots::root_body(p).len() as u64
}

/// What `gc` keeps.
#[derive(Debug, Clone)]
pub struct Policy {
    pub keep: Duration,
    pub max_size: Option<u64>,
    pub grace: Duration,
    pub now: SystemTime,
}

/// What a `gc` or `rm` deletes, in order.
#[derive(Debug, Default, Serialize)]
pub struct Plan {
    /// Narinfo keys in rounds: each round only after the one before it.
    pub rounds: Vec<Vec<String>>,
    /// The store paths whose narinfos go.
    pub paths: Vec<String>,
    /// NARs, listings, logs, expired roots.
    pub objects: Vec<String>,
    /// Incomplete uploads to abort (their keys).
    #[serde(skip)]
    pub incomplete: Vec<Incomplete>,
    /// Bytes the deleted objects take (incomplete uploads not counted: their size is unknown).
    pub freed: u64,
    /// Paths kept, and the bytes they take.
    pub kept_paths: usize,
    pub kept_bytes: u64,
    /// Roots that `max-size` gave up.
    pub dropped_roots: Vec<String>,
}

fn older(t: Option<SystemTime>, than: Duration, now: SystemTime) -> bool {
    // An object with no time is taken as new: the safe side.
    t.is_some_and(|t| now.duration_since(t).is_ok_and(|age| age >= than))
}

/// What `gc` deletes from `m` under `p`; `also_alive` (narinfos and roots that appeared
/// while the collection waited its lease) stay whatever their age.
pub fn plan_gc(m: &Model, p: &Policy, also_alive: &HashSet<String>) -> Plan {
    let mut alive = HashSet::new();
    let mut nars = HashSet::new();
    let mut size = 0;
    // Kept whatever the size: pins, uploads within grace, what appeared during the lease.
    let mut firm: Vec<&str> = m.pins.values().map(|p| p.hash_part()).collect();
    firm.extend(m.narinfos.iter().filter(|(_, e)| !older(e.modified, p.grace, p.now)).map(|(hp, _)| hp.as_str()));
    firm.extend(also_alive.iter().map(String::as_str));
    firm.extend(m.held.iter().flat_map(|h| h.refs.iter().map(String::as_str)));
    for hp in firm {
        size += m.mark(hp, &mut alive, &mut nars).0;
    }
    nars.extend(m.held.iter().filter_map(|h| h.url.clone()));
    // Roots newest first: with max-size, the oldest are given up first.
    let mut roots: Vec<(&String, &SystemTime)> = m.roots.iter().filter(|(_, t)| !older(Some(**t), p.keep, p.now)).collect();
    roots.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let mut dropped = Vec::new();
    for (hp, _) in roots {
        if !dropped.is_empty() {
            dropped.push(hp.clone());
            continue;
        }
        let (added, new_paths, new_nars) = m.mark(hp, &mut alive, &mut nars);
        if p.max_size.is_some_and(|max| size + added > max) {
            for h in &new_paths {
                alive.remove(h);
            }
            for n in &new_nars {
                nars.remove(n);
            }
            dropped.push(hp.clone());
            continue;
        }
        size += added;
    }
    let dead: HashSet<&str> = m.narinfos.keys().filter(|hp| !alive.contains(*hp)).map(String::as_str).collect();
    let mut plan = rounds(m, &dead);
    let dropped_set: HashSet<&String> = dropped.iter().collect();
    let mut logs: HashSet<String> = alive.iter().filter_map(|hp| m.narinfos[hp].deriver.as_ref().map(|d| format!("log/{d}"))).collect();
    // What a narinfo that does not parse names stays with it: its listing and build log.
    logs.extend(m.held.iter().filter_map(|h| h.deriver.as_ref().map(|d| format!("log/{d}"))));
    let held_listings: HashSet<&str> = m.held.iter().filter_map(|h| h.key.strip_suffix(".narinfo")).collect();
    for o in &m.objects {
        let k = o.key.as_str();
        let gone = if k.starts_with("nar/") {
            !nars.contains(k) && older(o.last_modified, p.grace, p.now)
        } else if let Some(hp) = k.strip_suffix(".ls").filter(|h| !h.contains('/')) {
            !alive.contains(hp) && !held_listings.contains(hp) && older(o.last_modified, p.grace, p.now)
        } else if k.starts_with("log/") {
            !logs.contains(k) && older(o.last_modified, p.grace, p.now)
        } else if k.starts_with(STREAM_TMP_PREFIX) {
            // A streamed NAR whose move to `nar/` never happened (the daemon was killed).
            older(o.last_modified, p.grace, p.now)
        } else if let Some(hp) = k.strip_prefix(ROOTS) {
            older(o.last_modified, p.keep, p.now) || dropped_set.contains(&hp.to_string())
        } else {
            false
        };
        if gone {
            plan.objects.push(o.key.clone());
            plan.freed += o.size;
        }
    }
    plan.incomplete = m.incomplete.iter().filter(|i| older(i.started, p.grace, p.now)).cloned().collect();
    plan.kept_paths = alive.len();
    plan.kept_bytes = size;
    plan.dropped_roots = dropped.into_iter().filter_map(|hp| m.narinfos.get(&hp).map(|e| e.path.to_string())).collect();
    plan
}

/// The narinfos of `dead` in rounds, referrers first: a round holds those that no narinfo
/// still there after the rounds before it references. `dead` must hold every referrer of its
/// members (true of what is not in a closure of what stays, and checked by `rm`).
fn rounds(m: &Model, dead: &HashSet<&str>) -> Plan {
    let mut referrers: HashMap<&str, usize> = dead.iter().map(|hp| (*hp, 0)).collect();
    for hp in dead {
        for r in &m.narinfos[*hp].refs {
            if let Some(n) = referrers.get_mut(r.as_str()) {
                *n += 1;
            }
        }
    }
    let mut plan = Plan::default();
    let mut next: Vec<&str> = referrers.iter().filter(|(_, n)| **n == 0).map(|(hp, _)| *hp).collect();
    while !next.is_empty() {
        next.sort_unstable();
        let mut after = Vec::new();
        for hp in &next {
            let e = &m.narinfos[*hp];
            plan.paths.push(e.path.to_string());
            plan.freed += e.size;
            for r in &e.refs {
                if let Some(n) = referrers.get_mut(r.as_str()) {
                    *n -= 1;
                    if *n == 0 {
                        after.push(r.as_str());
                    }
                }
            }
        }
        plan.rounds.push(next.iter().map(|hp| format!("{hp}.narinfo")).collect());
        next = after;
    }
    plan
}

/// Why `rm` refuses.
#[derive(Debug, PartialEq, Eq)]
pub enum RmRefused {
    /// Narinfos that stay reference paths being removed: (referrer, what it references).
    Referenced(Vec<(String, String)>),
    /// A path being removed is pinned: (pin, path).
    Pinned(Vec<(String, String)>),
    /// A builder running an older narq is active ([`Model::old_writers`]).
    OldWriters(String),
}

/// What `rm` deletes: the narinfos of `paths` (and, `with_referrers`, of every path whose
/// closure holds one), then the NARs and listings that no remaining narinfo names. Paths the
/// cache does not have are left out of the plan.
pub fn plan_rm(m: &Model, paths: &[StorePath], with_referrers: bool) -> Result<Plan, RmRefused> {
    let mut gone: HashSet<&str> = paths.iter().filter(|p| m.has(p)).map(|p| p.hash_part()).collect();
    let mut by_ref: HashMap<&str, Vec<&str>> = HashMap::new();
    for (hp, e) in &m.narinfos {
        for r in &e.refs {
            by_ref.entry(r.as_str()).or_default().push(hp.as_str());
        }
    }
    if with_referrers {
        let mut stack: Vec<&str> = gone.iter().copied().collect();
        while let Some(hp) = stack.pop() {
            for r in by_ref.get(hp).into_iter().flatten() {
                if gone.insert(r) {
                    stack.push(r);
                }
            }
        }
    } else {
        let mut refused: Vec<(String, String)> = gone
            .iter()
            .flat_map(|hp| by_ref.get(hp).into_iter().flatten().filter(|r| !gone.contains(*r)).map(move |r| (*r, *hp)))
            .map(|(r, hp)| (m.narinfos[r].path.to_string(), m.narinfos[hp].path.to_string()))
            .collect();
        if !refused.is_empty() {
            refused.sort();
            return Err(RmRefused::Referenced(refused));
        }
    }
    // A narinfo that does not parse stays (left alone): what it references cannot go.
    let mut held: Vec<(String, String)> = m
        .held
        .iter()
        .flat_map(|h| h.refs.iter().filter(|r| gone.contains(r.as_str())).map(move |r| (h.key.clone(), m.narinfos[r].path.to_string())))
        .collect();
    if !held.is_empty() {
        held.sort();
        return Err(RmRefused::Referenced(held));
    }
    let pinned: Vec<(String, String)> =
        m.pins.iter().filter(|(_, p)| gone.contains(p.hash_part())).map(|(n, p)| (n.clone(), p.to_string())).collect();
    if !pinned.is_empty() {
        return Err(RmRefused::Pinned(pinned));
    }
    let mut plan = rounds(m, &gone);
    let mut named: HashSet<&str> = m.narinfos.iter().filter(|(hp, _)| !gone.contains(hp.as_str())).map(|(_, e)| e.url.as_str()).collect();
    named.extend(m.held.iter().filter_map(|h| h.url.as_deref()));
    let their: HashSet<String> = gone.iter().flat_map(|hp| [m.narinfos[*hp].url.clone(), format!("{hp}.ls")]).collect();
    for o in m.objects.iter().filter(|o| their.contains(&o.key) && !named.contains(o.key.as_str())) {
        plan.objects.push(o.key.clone());
        plan.freed += o.size;
    }
    plan.kept_paths = m.narinfos.len() - gone.len();
    let mut kept_nars = HashSet::new();
    let kept = m.narinfos.iter().filter(|(hp, _)| !gone.contains(hp.as_str()));
    plan.kept_bytes = kept.map(|(_, e)| e.size + if kept_nars.insert(&e.url) { e.file_size } else { 0 }).sum();
    Ok(plan)
}

/// Deletes what `plan` says, round by round, under `run`'s heartbeat.
pub async fn execute(target: &dyn Target, run: &mut Run<'_>, plan: &Plan) -> Result<(), TargetError> {
    for round in &plan.rounds {
        for batch in round.chunks(DELETE_BATCH) {
            run.heartbeat().await?;
            target.delete(batch).await?;
        }
    }
    for batch in plan.objects.chunks(DELETE_BATCH) {
        run.heartbeat().await?;
        target.delete(batch).await?;
    }
    for i in &plan.incomplete {
        run.heartbeat().await?;
        target.abort_incomplete(i).await?;
    }
    Ok(())
}

/// After the lease (see [`super::collection`]): the narinfos, roots and pins written since
/// the scan. New narinfos are read and added to `m`; their hash parts, and those of new or
/// renewed roots and of pins, are returned: they stay whatever the policy says. A renewed
/// root takes its new time in `m`, so that this collection does not delete it as expired.
pub async fn since_scan(target: &dyn Target, m: &mut Model) -> Result<HashSet<String>, TargetError> {
    let mut new_narinfos = Vec::new();
    let mut roots_seen = Vec::new();
    target
        .list("", &mut |o: Object| {
            if let Some(hp) = o.key.strip_suffix(".narinfo").filter(|h| !h.contains('/')) {
                if !m.narinfos.contains_key(hp) {
                    new_narinfos.push(o);
                }
            } else if let Some(hp) = o.key.strip_prefix(ROOTS) {
                if o.last_modified.is_some_and(|t| m.roots.get(hp).is_none_or(|old| t > *old)) {
                    roots_seen.push(o);
                }
            }
        })
        .await?;
    let mut renewed = HashSet::new();
    for o in roots_seen {
        let hp = o.key[ROOTS.len()..].to_string();
        if let Some(t) = o.last_modified {
            m.roots.insert(hp.clone(), t);
        }
        match m.objects.iter_mut().find(|x| x.key == o.key) {
            Some(x) => *x = o,
            None => m.objects.push(o),
        }
        renewed.insert(hp);
    }
    let mut also = HashSet::new();
    for o in new_narinfos {
        let Some(body) = target.get(&o.key).await? else { continue };
        let hp = o.key.trim_end_matches(".narinfo").to_string();
        match std::str::from_utf8(&body).ok().and_then(|s| NarInfo::parse(s).ok()) {
            Some(info) => {
                m.narinfos.insert(hp.clone(), Entry::new(&info, &o));
            }
            None => {
                m.unreadable.push(o.key.clone());
                m.held.push(Held::lenient(&o.key, &body));
            }
        }
        also.insert(hp);
    }
    also.extend(renewed);
    let pins = roots::pins(target).await?;
    also.extend(pins.values().map(|p| p.hash_part().to_string()));
    m.pins = pins;
    Ok(also)
}

/// Bytes for people: `1.5 GiB`.
pub fn human(bytes: u64) -> String {
    let mut v = bytes as f64;
    for unit in ["B", "KiB", "MiB", "GiB", "TiB"] {
        if v < 1024.0 || unit == "TiB" {
            return if unit == "B" { format!("{bytes} B") } else { format!("{v:.1} {unit}") };
        }
        v /= 1024.0;
    }
    unreachable!()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::{nixbase32, Sha256};

    fn sp(name: &str) -> StorePath {
        let hash = nixbase32::encode(&Sha256::digest(name.as_bytes()).0[..20]);
        StorePath::parse(&format!("/nix/store/{hash}-{name}")).unwrap()
    }

    const DAY: Duration = Duration::from_secs(86400);

    struct M {
        m: Model,
        now: SystemTime,
    }

    impl M {
        fn new() -> M {
            M { m: Model::default(), now: SystemTime::UNIX_EPOCH + 1000 * DAY }
        }
        /// A narinfo `name` written `age` ago, referencing `refs`, with its NAR of `size` bytes.
        fn path(&mut self, name: &str, refs: &[&str], age: Duration, size: u64) -> &mut Self {
            let p = sp(name);
            let t = self.now - age;
            let url = format!("nar/{name}.nar");
            self.m.narinfos.insert(
                p.hash_part().to_string(),
                Entry { refs: refs.iter().map(|r| sp(r).hash_part().to_string()).collect(), url: url.clone(), size: 1, file_size: size, deriver: None, modified: Some(t), path: p },
            );
            self.m.objects.push(Object { key: url, size, last_modified: Some(t), etag: None });
            self
        }
        fn root(&mut self, name: &str, age: Duration) -> &mut Self {
            let p = sp(name);
            self.m.roots.insert(p.hash_part().to_string(), self.now - age);
            self.m.objects.push(Object { key: format!("{ROOTS}{}", p.hash_part()), size: 1, last_modified: Some(self.now - age), etag: None });
            self
        }
        fn policy(&self, keep: Duration, max: Option<u64>, grace: Duration) -> Policy {
            Policy { keep, max_size: max, grace, now: self.now }
        }
    }

    fn names(paths: &[String]) -> Vec<String> {
        let mut v: Vec<String> = paths.iter().map(|p| p.split_once('-').unwrap().1.to_string()).collect();
        v.sort();
        v
    }

    #[test]
    fn gc_keeps_closures_of_recent_roots_and_pins_deletes_referrers_first() {
        let mut t = M::new();
        t.path("lib", &[], 40 * DAY, 100).path("app1", &["lib"], 40 * DAY, 10).path("app2", &["lib"], 40 * DAY, 10);
        t.path("own", &[], 40 * DAY, 100).path("app3", &["own"], 40 * DAY, 10);
        t.root("app1", 40 * DAY).root("app2", 40 * DAY).root("app3", 2 * DAY);
        t.m.pins.insert("release".into(), sp("app1"));
        let plan = plan_gc(&t.m, &t.policy(30 * DAY, None, DAY), &HashSet::new());
        assert_eq!(names(&plan.paths), ["app2"]);
        // keep-days 0: only the pin's closure stays; referrers go in an earlier round.
        let plan = plan_gc(&t.m, &t.policy(Duration::ZERO, None, Duration::ZERO), &HashSet::new());
        assert_eq!(names(&plan.paths), ["app2", "app3", "own"]);
        let round_of = |n: &str| plan.rounds.iter().position(|r| r.contains(&format!("{}.narinfo", sp(n).hash_part()))).unwrap();
        assert!(round_of("app3") < round_of("own"));
        assert!(plan.objects.contains(&"nar/own.nar".to_string()) && !plan.objects.contains(&"nar/lib.nar".to_string()));
        // Expired roots go too.
        assert!(plan.objects.iter().any(|o| o.starts_with(ROOTS)));
        assert_eq!(plan.kept_paths, 2);
    }

    #[test]
    fn grace_keeps_recent_narinfos_and_orphan_nars_and_what_appeared_during_the_lease() {
        let mut t = M::new();
        t.path("old", &[], 40 * DAY, 5).path("new", &["old"], Duration::from_secs(60), 5);
        // A NAR whose narinfo is not written yet.
        t.m.objects.push(Object { key: "nar/orphan.nar".into(), size: 7, last_modified: Some(t.now - Duration::from_secs(60)), etag: None });
        // A streamed NAR not yet moved to its key (or left by a daemon killed before the move).
        t.m.objects.push(Object { key: "narq/tmp/x-1.nar.zst".into(), size: 9, last_modified: Some(t.now - Duration::from_secs(60)), etag: None });
        let plan = plan_gc(&t.m, &t.policy(DAY, None, DAY), &HashSet::new());
        assert!(plan.paths.is_empty() && plan.objects.is_empty(), "{plan:?}");
        let plan = plan_gc(&t.m, &t.policy(DAY, None, Duration::ZERO), &HashSet::new());
        assert_eq!(names(&plan.paths), ["new", "old"]);
        assert!(plan.objects.contains(&"nar/orphan.nar".to_string()));
        assert!(plan.objects.contains(&"narq/tmp/x-1.nar.zst".to_string()));
        let also: HashSet<String> = [sp("new").hash_part().to_string()].into();
        let plan = plan_gc(&t.m, &t.policy(DAY, None, Duration::ZERO), &also);
        assert!(plan.paths.is_empty(), "what appeared during the lease stays, with its closure");
    }

    #[test]
    fn max_size_gives_up_oldest_roots_first_never_a_pin() {
        let mut t = M::new();
        t.path("a", &[], 10 * DAY, 100).path("b", &[], 10 * DAY, 100).path("c", &[], 10 * DAY, 100).path("p", &[], 10 * DAY, 100);
        t.root("a", 3 * DAY).root("b", 2 * DAY).root("c", DAY).root("p", 9 * DAY);
        t.m.pins.insert("keep".into(), sp("p"));
        let plan = plan_gc(&t.m, &t.policy(30 * DAY, Some(250), Duration::ZERO), &HashSet::new());
        assert_eq!(names(&plan.paths), ["a", "b"], "the pin (oldest root) stays, then the newest root fits");
        assert!(plan.kept_bytes <= 250 || plan.kept_paths == 1);
        let plan = plan_gc(&t.m, &t.policy(30 * DAY, Some(10), Duration::ZERO), &HashSet::new());
        assert_eq!(names(&plan.paths), ["a", "b", "c"], "a pin stays even over the limit");
    }

    #[test]
    fn rm_refuses_referenced_paths_unless_with_referrers_and_keeps_shared_nars() {
        let mut t = M::new();
        t.path("lib", &[], DAY, 100).path("app", &["lib"], DAY, 10).path("other", &[], DAY, 10);
        // Another narinfo names the same NAR as app (same contents, another path).
        let twin = sp("twin");
        t.m.narinfos.insert(twin.hash_part().into(), Entry { url: "nar/app.nar".into(), refs: vec![], size: 1, file_size: 10, deriver: None, modified: None, path: twin });
        let err = plan_rm(&t.m, &[sp("lib")], false).unwrap_err();
        assert_eq!(err, RmRefused::Referenced(vec![(sp("app").to_string(), sp("lib").to_string())]));
        let plan = plan_rm(&t.m, &[sp("lib")], true).unwrap();
        assert_eq!(names(&plan.paths), ["app", "lib"]);
        assert_eq!(plan.rounds.len(), 2);
        assert!(plan.objects.contains(&"nar/lib.nar".to_string()) && !plan.objects.contains(&"nar/app.nar".to_string()));
        // What stays is sized as gc sizes it (issue 21: rm said "3 paths stay (0 B)"): other and
        // twin, their narinfos and NARs.
        assert_eq!((plan.kept_paths, plan.kept_bytes), (2, 22));
        let everything = plan_gc(&t.m, &t.policy(DAY, None, 1000 * DAY), &HashSet::new());
        assert_eq!(plan_rm(&t.m, &[], false).unwrap().kept_bytes, everything.kept_bytes);
        t.m.pins.insert("r".into(), sp("app"));
        assert!(matches!(plan_rm(&t.m, &[sp("lib")], true), Err(RmRefused::Pinned(_))));
    }

    #[test]
    fn a_narinfo_that_does_not_parse_keeps_its_nar_and_references() {
        let mut t = M::new();
        t.path("lib", &[], 40 * DAY, 100).path("other", &[], 40 * DAY, 100);
        let body = format!("StorePath: /nix/store/x\nURL: nar/app.nar\nNarHash: sha256:bad\nReferences: {}-lib\n", sp("lib").hash_part());
        t.m.objects.push(Object { key: "nar/app.nar".into(), size: 5, last_modified: Some(t.now - 40 * DAY), etag: None });
        t.m.unreadable.push("app.narinfo".into());
        t.m.held.push(Held::lenient("app.narinfo", body.as_bytes()));
        let plan = plan_gc(&t.m, &t.policy(Duration::ZERO, None, Duration::ZERO), &HashSet::new());
        assert_eq!(names(&plan.paths), ["other"]);
        assert_eq!(plan.objects, ["nar/other.nar"]);
        assert!(matches!(plan_rm(&t.m, &[sp("lib")], true), Err(RmRefused::Referenced(_))));
    }

    #[test]
    fn durations_and_sizes() {
        use crate::config::{parse_duration, parse_size};
        assert_eq!(parse_duration("30d").unwrap(), 30 * DAY);
        assert_eq!(parse_duration("6h").unwrap(), Duration::from_secs(6 * 3600));
        assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
        assert_eq!(parse_size("500G").unwrap(), 500 << 30);
        assert_eq!(parse_size("1.5K").unwrap(), 1536);
        assert_eq!(parse_size("20MiB").unwrap(), 20 << 20);
        for bad in ["", "d", "3x", "-1d", "1.5d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        for bad in ["", "G", "5Q", "-1G"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
