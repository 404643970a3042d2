//! `narq gc` and `narq rm`: closure-aware deletion in a bucket that any number of builders
//! share, with no server.
//!
//! [`Model`] is what a [`super::scan`] found, in the terms deletion needs, one compact record
//! per path (its hash part, its references as indices, sizes, time, name: ~150 bytes with
//! its NAR's, where a parsed narinfo took 2.5 KiB); [`plan_gc`] and [`plan_rm`] are pure
//! functions from it to a [`Plan`], so every rule is tested on a model in memory; [`execute`]
//! deletes what a plan says under the collection protocol of [`super::collection`]
//! (announce, wait the lease, list again, delete, move the generation).
//!
//! What stays in a `gc`: the roots pushed within `keep-days`, the pins, every narinfo written
//! within `grace` (uploads in progress anywhere), and the closures of all of them. With
//! `max-size`, the oldest roots go first (never a pin) until what stays fits.
//!
//! Order: narinfos first, referrers before what they reference, in rounds (a round deletes
//! only narinfos that no narinfo left references), so at every moment each visible narinfo
//! has its references; then NARs, listings and build logs that no remaining narinfo names
//! and that are older than `grace`; expired roots; incomplete uploads older than `grace`.
//! The requests of a round go out several at once ([`DELETE_JOBS`]), each after its own
//! heartbeat check; a round begins once the one before it is wholly deleted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::BuildHasher;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::collection::{protocol_of, Run, PROTOCOL};
use super::roots::{self, ROOTS};
use crate::nix::{nixbase32, NarInfo, StorePath};
use crate::storage::{Incomplete, Object, Target, TargetError, DELETE_BATCH, STREAM_TMP_PREFIX};

/// Delete requests in flight at once (each of up to [`DELETE_BATCH`] keys).
pub const DELETE_JOBS: usize = 8;

/// One narinfo as it arrives (from a scan, or a test); [`Model::add_narinfo`] keeps it as a
/// compact record.
#[derive(Debug, Clone)]
pub struct Entry {
    pub path: StorePath,
    /// Hash parts of its references, itself left out.
    pub refs: Vec<String>,
    /// Its NAR's key (`URL`).
    pub url: String,
    /// The narinfo object's size.
    pub size: u64,
    /// The NAR's size (`FileSize`; 0: the listed size of the NAR).
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

/// A time as whole seconds since 1970, rounded up (a time read back is never older than it
/// was: ages err on the young, safe side); 0 for none.
fn secs(t: Option<SystemTime>) -> u32 {
    t.and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| (d.as_secs() + (d.subsec_nanos() > 0) as u64).clamp(1, u32::MAX as u64) as u32)
}

fn time(s: u32) -> Option<SystemTime> {
    (s != 0).then(|| UNIX_EPOCH + Duration::from_secs(s as u64))
}

/// An open-addressing table of ids, keyed by what the owner keeps for each id (hash parts,
/// NAR keys) and hashed by the owner: 4 bytes a slot, at most three quarters full.
#[derive(Default)]
struct IdTable {
    slots: Vec<u32>,
    len: usize,
}

const EMPTY: u32 = u32::MAX;

impl IdTable {
    /// The id whose key hashes to `hash` and that `is(id)` says is the one.
    fn find(&self, hash: u64, is: impl Fn(u32) -> bool) -> Option<u32> {
        if self.slots.is_empty() {
            return None;
        }
        let mask = self.slots.len() - 1;
        let mut i = hash as usize & mask;
        loop {
            match self.slots[i] {
                EMPTY => return None,
                id if is(id) => return Some(id),
                _ => i = (i + 1) & mask,
            }
        }
    }

    /// Adds `id` (not there yet), whose key hashes to `hash`; `rehash` gives any id's.
    fn insert(&mut self, id: u32, hash: u64, rehash: impl Fn(u32) -> u64) {
        if (self.len + 1) * 4 > self.slots.len() * 3 {
            let grown = (self.slots.len() * 2).max(64);
            let old = std::mem::replace(&mut self.slots, vec![EMPTY; grown]);
            for x in old.into_iter().filter(|x| *x != EMPTY) {
                self.place(x, rehash(x));
            }
        }
        self.place(id, hash);
        self.len += 1;
    }

    fn place(&mut self, id: u32, hash: u64) {
        let mask = self.slots.len() - 1;
        let mut i = hash as usize & mask;
        while self.slots[i] != EMPTY {
            i = (i + 1) & mask;
        }
        self.slots[i] = id;
    }
}

type Hasher = std::collections::hash_map::RandomState;

/// A path the model knows: one with a narinfo, or one a narinfo references. 40 bytes.
#[derive(Debug, Clone, Copy, Default)]
struct Rec {
    /// `FileSize` (0: the listed size of its NAR).
    file_size: [u32; 2],
    /// Its references in [`Model::refs`].
    refs_at: u32,
    refs_len: u32,
    /// Its NAR in [`Nars`], or [`EMPTY`].
    nar: u32,
    /// The narinfo object's size and time ([`secs`]).
    size: u32,
    mtime: u32,
    /// Its name in [`Model::names`].
    name_at: u32,
    /// [`fingerprint`] of its deriver's base name (0: none).
    deriver: u32,
    name_len: u8,
    /// [`PRESENT`]: it has a narinfo.
    flags: u8,
}

const PRESENT: u8 = 1;

/// 32 bits of a build log's name, never 0: two that differ may collide, which keeps a log
/// (the safe side), never loses one.
fn fingerprint(s: &str) -> u32 {
    let h = s.bytes().fold(0x811c9dc5u32, |h, b| (h ^ b as u32).wrapping_mul(0x01000193));
    h.max(1)
}

/// Extensions of `nar/<filehash>.nar<ext>` keys kept as a code.
const NAR_EXTS: [&str; 8] = ["", ".xz", ".zst", ".bz2", ".br", ".lz4", ".lzip", ".gz"];
/// The code of a NAR key kept as a string ([`Nars::odd`]).
const ODD: u8 = u8::MAX;

/// A NAR key as 33 bytes: the extension's code and the file hash, or [`ODD`] and an index.
type NarKey = [u8; 33];

/// A NAR: listed, or only named by a narinfo. 48 bytes.
#[derive(Debug, Clone, Copy)]
struct Nar {
    key: NarKey,
    listed: bool,
    size: [u32; 2],
    mtime: u32,
}

/// The NARs the model knows, by key.
#[derive(Default)]
struct Nars {
    all: Vec<Nar>,
    table: IdTable,
    hasher: Hasher,
    /// Keys of another form than `nar/<52 characters>.nar<ext>`.
    odd: Vec<String>,
    odd_ids: HashMap<String, u32>,
}

fn split(v: u64) -> [u32; 2] {
    [v as u32, (v >> 32) as u32]
}

fn join(v: [u32; 2]) -> u64 {
    v[0] as u64 | (v[1] as u64) << 32
}

impl Nars {
    /// The compact form of `key`, if it has the usual one.
    fn compact(key: &str) -> Option<NarKey> {
        let rest = key.strip_prefix("nar/")?;
        let (hash, ext) = (rest.get(..52)?, rest.get(52..)?.strip_prefix(".nar")?);
        let code = NAR_EXTS.iter().position(|e| *e == ext)?;
        let bytes = nixbase32::decode(hash.as_bytes(), 32).ok()?;
        let mut k = [0u8; 33];
        k[0] = code as u8;
        k[1..].copy_from_slice(&bytes);
        // Only a key that comes back as it was (lower-case, no stray bits).
        (nixbase32::encode(&k[1..]) == hash).then_some(k)
    }

    fn key(&self, id: u32) -> String {
        let k = &self.all[id as usize].key;
        match k[0] {
            ODD => self.odd[u32::from_le_bytes([k[1], k[2], k[3], k[4]]) as usize].clone(),
            code => format!("nar/{}.nar{}", nixbase32::encode(&k[1..]), NAR_EXTS[code as usize]),
        }
    }

    fn find(&self, key: &str) -> Option<u32> {
        match Self::compact(key) {
            Some(k) => self.table.find(self.hasher.hash_one(k), |id| self.all[id as usize].key == k),
            None => self.odd_ids.get(key).copied(),
        }
    }

    fn intern(&mut self, key: &str) -> u32 {
        if let Some(id) = self.find(key) {
            return id;
        }
        let id = self.all.len() as u32;
        let k = match Self::compact(key) {
            Some(k) => k,
            None => {
                let mut k = [0u8; 33];
                k[0] = ODD;
                k[1..5].copy_from_slice(&(self.odd.len() as u32).to_le_bytes());
                self.odd_ids.insert(key.to_string(), id);
                self.odd.push(key.to_string());
                k
            }
        };
        self.all.push(Nar { key: k, listed: false, size: [0; 2], mtime: 0 });
        if k[0] != ODD {
            let (all, hasher) = (&self.all, &self.hasher);
            self.table.insert(id, hasher.hash_one(k), |x| hasher.hash_one(all[x as usize].key));
        }
        id
    }
}

/// Any other object: listings, build logs, narq's own, `nix-cache-info`.
#[derive(Debug, Clone)]
struct Other {
    key: Box<str>,
    size: u64,
    mtime: u32,
}

/// A cache as deletion sees it: one compact record per path.
#[derive(Default)]
pub struct Model {
    /// Hash parts (20 bytes) by id, and the table that finds an id by hash part.
    hashes: Vec<[u8; 20]>,
    ids: IdTable,
    hasher: Hasher,
    recs: Vec<Rec>,
    /// Every narinfo's references, by id, one after the other.
    refs: Vec<u32>,
    /// Every path's name, one after the other.
    names: Vec<u8>,
    nars: Nars,
    others: Vec<Other>,
    /// Narinfos there: (count, bytes).
    present: usize,
    /// Roots: hash part → (object size, when last pushed).
    root_objects: BTreeMap<String, (u64, Option<SystemTime>)>,
    /// Narinfos that do not parse: left alone, and reported.
    pub unreadable: Vec<String>,
    /// What those name, read leniently ([`Held::lenient`]): a client that reads them (Nix is
    /// more lenient than our parser) needs their NARs and references, so these stay.
    pub held: Vec<Held>,
    pub pins: BTreeMap<String, StorePath>,
    pub incomplete: Vec<Incomplete>,
}

/// The 20 bytes of a hash part, if it is one.
fn hash_bytes(hp: &str) -> Option<[u8; 20]> {
    nixbase32::decode(hp.as_bytes(), 20).ok()?.try_into().ok()
}

impl Model {
    /// The id of hash part `h`.
    fn id(&self, h: &[u8; 20]) -> Option<u32> {
        self.ids.find(self.hasher.hash_one(h), |id| self.hashes[id as usize] == *h)
    }

    /// The id of hash part `hp` if the cache has its narinfo.
    fn present_id(&self, hp: &str) -> Option<u32> {
        self.id(&hash_bytes(hp)?).filter(|id| self.recs[*id as usize].flags & PRESENT != 0)
    }

    fn intern(&mut self, h: [u8; 20]) -> u32 {
        if let Some(id) = self.id(&h) {
            return id;
        }
        let id = self.hashes.len() as u32;
        self.hashes.push(h);
        self.recs.push(Rec { nar: EMPTY, ..Rec::default() });
        let (hashes, hasher) = (&self.hashes, &self.hasher);
        self.ids.insert(id, hasher.hash_one(h), |x| hasher.hash_one(hashes[x as usize]));
        id
    }

    /// Whether the cache has the narinfo of `hp`.
    pub fn has(&self, hp: &str) -> bool {
        self.present_id(hp).is_some()
    }

    /// How many narinfos the cache has.
    pub fn len(&self) -> usize {
        self.present
    }

    pub fn is_empty(&self) -> bool {
        self.present == 0
    }

    /// The roots: hash part → when last pushed.
    pub fn roots(&self) -> impl Iterator<Item = (&str, SystemTime)> {
        self.root_objects.iter().filter_map(|(hp, (_, t))| Some((hp.as_str(), (*t)?)))
    }

    /// Keeps a listed object (not a top-level narinfo).
    pub fn add_object(&mut self, o: Object) {
        if let Some(hp) = o.key.strip_prefix(ROOTS) {
            self.root_objects.insert(hp.to_string(), (o.size, o.last_modified));
        } else if o.key.starts_with("nar/") {
            let id = self.nars.intern(&o.key) as usize;
            self.nars.all[id] = Nar { listed: true, size: split(o.size), mtime: secs(o.last_modified), ..self.nars.all[id] };
        } else {
            self.others.push(Other { key: o.key.into(), size: o.size, mtime: secs(o.last_modified) });
        }
    }

    /// Keeps a narinfo that parsed, at `<hp>.narinfo` (a narinfo names its own path, but
    /// for a broken one: what is deleted is the key). One whose key is not a hash part is
    /// left alone, with what it names, as one that does not parse.
    pub fn add_narinfo(&mut self, hp: &str, e: Entry) {
        let Some(h) = hash_bytes(hp) else {
            let held = Held { key: format!("{hp}.narinfo"), url: Some(e.url), refs: e.refs, deriver: e.deriver };
            self.unreadable.push(held.key.clone());
            self.held.push(held);
            return;
        };
        let id = self.intern(h) as usize;
        let refs_at = self.refs.len() as u32;
        for r in e.refs.iter().filter_map(|r| hash_bytes(r)) {
            let r = self.intern(r);
            self.refs.push(r);
        }
        let name = e.path.name().as_bytes();
        let name_at = self.names.len() as u32;
        self.names.extend_from_slice(name);
        if self.recs[id].flags & PRESENT == 0 {
            self.present += 1;
        }
        self.recs[id] = Rec {
            file_size: split(e.file_size),
            refs_at,
            refs_len: self.refs.len() as u32 - refs_at,
            nar: self.nars.intern(&e.url),
            size: e.size.min(u32::MAX as u64) as u32,
            mtime: secs(e.modified),
            name_at,
            deriver: e.deriver.as_deref().map_or(0, fingerprint),
            name_len: name.len() as u8,
            flags: PRESENT,
        };
    }

    /// Keeps a narinfo that does not parse ([`Held`]).
    pub fn add_unreadable(&mut self, key: &str, body: &[u8]) {
        self.unreadable.push(key.to_string());
        self.held.push(Held::lenient(key, body));
    }

    fn rec(&self, id: u32) -> &Rec {
        &self.recs[id as usize]
    }

    fn refs_of(&self, id: u32) -> &[u32] {
        let r = self.rec(id);
        &self.refs[r.refs_at as usize..(r.refs_at + r.refs_len) as usize]
    }

    fn present(&self, id: u32) -> bool {
        self.rec(id).flags & PRESENT != 0
    }

    fn hash_part(&self, id: u32) -> String {
        nixbase32::encode(&self.hashes[id as usize])
    }

    /// The store path of `id` (which has a narinfo).
    pub fn path(&self, id: u32) -> String {
        let r = self.rec(id);
        let name = String::from_utf8_lossy(&self.names[r.name_at as usize..r.name_at as usize + r.name_len as usize]);
        format!("{}/{}-{name}", crate::nix::store_path::STORE_DIR, self.hash_part(id))
    }

    /// The key of `id`'s narinfo.
    pub fn narinfo_key(&self, id: u32) -> String {
        format!("{}.narinfo", self.hash_part(id))
    }

    /// The NAR's size: `FileSize`, else the listed size.
    fn file_size(&self, id: u32) -> u64 {
        let r = self.rec(id);
        match join(r.file_size) {
            0 if r.nar != EMPTY && self.nars.all[r.nar as usize].listed => join(self.nars.all[r.nar as usize].size),
            n => n,
        }
    }

    fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.recs.len() as u32).filter(|id| self.present(*id))
    }

    /// Why a collection now could break what a builder running an older narq (protocol 1)
    /// uploads, if one seems active: it wrote a root within the last [`OLD_WRITER_WINDOW`]
    /// (daemons write their roots at most once a day). An old daemon neither settles its
    /// writes nor sees a collection that a lost answer hid from it (`docs/gc-safety.md`,
    /// mixed versions). A root's protocol shows in its size; a root whose narinfo is
    /// missing is read.
    pub async fn old_writers(&self, target: &dyn Target, now: SystemTime) -> Result<Option<String>, TargetError> {
        for (hp, (size, t)) in self.root_objects.iter().filter(|(_, (_, t))| !older(*t, OLD_WRITER_WINDOW, now)) {
            let key = format!("{ROOTS}{hp}");
            let old = match self.present_id(hp).map(|id| StorePath::parse(&self.path(id))) {
                // `<path>\n`, or `<path>\nnarq-protocol N\n`.
                Some(Ok(p)) if *size == p.to_string().len() as u64 + 1 => true,
                Some(Ok(p)) if *size == root_size(&p) => false,
                _ => target.get(&key).await?.is_some_and(|b| protocol_of(&b) < PROTOCOL),
            };
            if old {
                let age = t.and_then(|t| now.duration_since(t).ok()).map_or("recently".into(), |a| format!("{} min ago", a.as_secs() / 60));
                return Ok(Some(format!(
                    "{key} was written {age} by a builder running an older narq (protocol 1), which a collection now could leave with a broken closure; upgrade narq on every builder, then run this again (roots in the old format stop counting {} days after they were written)",
                    OLD_WRITER_WINDOW.as_secs() / 86400
                )));
            }
        }
        Ok(None)
    }

    /// Marks the closure of `seed` in `alive` (and its NARs in `nars`); returns the bytes
    /// newly marked (NARs shared with what was marked before count once), and what was newly
    /// marked, to undo it.
    fn mark(&self, seed: u32, alive: &mut Bits, nars: &mut Bits) -> (u64, Vec<u32>, Vec<u32>) {
        let (mut added, mut new_paths, mut new_nars) = (0, Vec::new(), Vec::new());
        let mut stack = vec![seed];
        while let Some(id) = stack.pop() {
            if !self.present(id) || !alive.insert(id) {
                continue;
            }
            new_paths.push(id);
            added += self.rec(id).size as u64;
            let nar = self.rec(id).nar;
            if nar != EMPTY && nars.insert(nar) {
                added += self.file_size(id);
                new_nars.push(nar);
            }
            stack.extend(self.refs_of(id).iter().filter(|r| !alive.get(**r)));
        }
        (added, new_paths, new_nars)
    }

    /// The id of a hash part given as a string (a root's, a pin's, a held reference's).
    fn id_of(&self, hp: &str) -> Option<u32> {
        self.id(&hash_bytes(hp)?)
    }

    /// The key of an object a plan deletes.
    fn key_of(&self, o: &Doomed) -> String {
        match o {
            Doomed::Nar(id) => self.nars.key(*id),
            Doomed::Other(i) => self.others[*i as usize].key.to_string(),
            Doomed::Root(hp) => format!("{ROOTS}{hp}"),
        }
    }

    /// The id of the NAR at `key`.
    fn nar_id(&self, key: &str) -> Option<u32> {
        self.nars.find(key)
    }
}

/// A set of ids, a bit each.
#[derive(Default)]
struct Bits(Vec<u64>);

impl Bits {
    fn with_len(n: usize) -> Bits {
        Bits(vec![0; n.div_ceil(64)])
    }
    fn get(&self, i: u32) -> bool {
        self.0.get(i as usize / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
    /// Sets bit `i`; false if it was set.
    fn insert(&mut self, i: u32) -> bool {
        let (w, b) = (i as usize / 64, 1u64 << (i % 64));
        if w >= self.0.len() {
            self.0.resize(w + 1, 0);
        }
        let was = self.0[w] & b != 0;
        self.0[w] |= b;
        !was
    }
    fn remove(&mut self, i: u32) {
        if let Some(w) = self.0.get_mut(i as usize / 64) {
            *w &= !(1 << (i % 64));
        }
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

/// An object a plan deletes (not a narinfo).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Doomed {
    Nar(u32),
    Other(u32),
    Root(String),
}

/// What a `gc` or `rm` deletes, in order; the keys and paths are the model's
/// ([`Plan::paths`], [`Plan::object_keys`]).
#[derive(Debug, Default)]
pub struct Plan {
    /// Narinfos (ids) in rounds: each round only after the one before it.
    pub rounds: Vec<Vec<u32>>,
    /// NARs, listings, logs, expired roots.
    pub objects: Vec<Doomed>,
    /// Incomplete uploads to abort.
    pub incomplete: Vec<Incomplete>,
    /// Bytes the deleted objects take (incomplete uploads not counted: their size is unknown).
    pub freed: u64,
    /// Paths kept, and the bytes they take.
    pub kept_paths: usize,
    pub kept_bytes: u64,
    /// Roots that `max-size` gave up.
    pub dropped_roots: Vec<String>,
}

impl Plan {
    /// How many narinfos go.
    pub fn path_count(&self) -> usize {
        self.rounds.iter().map(Vec::len).sum()
    }

    /// The store paths whose narinfos go, in order.
    pub fn paths<'a>(&'a self, m: &'a Model) -> impl Iterator<Item = String> + 'a {
        self.rounds.iter().flatten().map(|id| m.path(*id))
    }

    /// The keys of the other objects that go.
    pub fn object_keys<'a>(&'a self, m: &'a Model) -> impl Iterator<Item = String> + 'a {
        self.objects.iter().map(|o| m.key_of(o))
    }

    /// Whether there is nothing to delete.
    pub fn is_empty(&self) -> bool {
        self.rounds.is_empty() && self.objects.is_empty() && self.incomplete.is_empty()
    }
}

fn older(t: Option<SystemTime>, than: Duration, now: SystemTime) -> bool {
    // An object with no time is taken as new: the safe side.
    t.is_some_and(|t| now.duration_since(t).is_ok_and(|age| age >= than))
}

/// What `gc` deletes from `m` under `p`; `also_alive` (narinfos and roots that appeared
/// while the collection waited its lease) stay whatever their age.
pub fn plan_gc(m: &Model, p: &Policy, also_alive: &HashSet<String>) -> Plan {
    let mut alive = Bits::with_len(m.recs.len());
    let mut nars = Bits::with_len(m.nars.all.len());
    let mut size = 0;
    // Kept whatever the size: pins, uploads within grace, what appeared during the lease.
    let mut firm: Vec<u32> = m.pins.values().filter_map(|p| m.id_of(p.hash_part())).collect();
    firm.extend(m.ids().filter(|id| !older(time(m.rec(*id).mtime), p.grace, p.now)));
    firm.extend(also_alive.iter().filter_map(|hp| m.id_of(hp)));
    firm.extend(m.held.iter().flat_map(|h| h.refs.iter().filter_map(|r| m.id_of(r))));
    for id in firm {
        size += m.mark(id, &mut alive, &mut nars).0;
    }
    for n in m.held.iter().filter_map(|h| m.nar_id(h.url.as_deref()?)) {
        nars.insert(n);
    }
    // Roots newest first: with max-size, the oldest are given up first.
    let mut roots: Vec<(&str, SystemTime)> = m.roots().filter(|(_, t)| !older(Some(*t), p.keep, p.now)).collect();
    roots.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let mut dropped: Vec<&str> = Vec::new();
    for (hp, _) in roots {
        if !dropped.is_empty() {
            dropped.push(hp);
            continue;
        }
        let Some(id) = m.id_of(hp) else { continue };
        let (added, new_paths, new_nars) = m.mark(id, &mut alive, &mut nars);
        if p.max_size.is_some_and(|max| size + added > max) {
            new_paths.iter().for_each(|x| alive.remove(*x));
            new_nars.iter().for_each(|x| nars.remove(*x));
            dropped.push(hp);
            continue;
        }
        size += added;
    }
    let mut dead = Bits::with_len(m.recs.len());
    for id in m.ids().filter(|id| !alive.get(*id)) {
        dead.insert(id);
    }
    let mut plan = rounds(m, &dead);
    let dropped_set: HashSet<&str> = dropped.iter().copied().collect();
    for (id, n) in m.nars.all.iter().enumerate() {
        if n.listed && !nars.get(id as u32) && older(time(n.mtime), p.grace, p.now) {
            plan.objects.push(Doomed::Nar(id as u32));
            plan.freed += join(n.size);
        }
    }
    // Build logs: those of what stays, by their names' fingerprints (only if there are logs).
    let has_logs = m.others.iter().any(|o| o.key.starts_with("log/"));
    let alive_logs: HashSet<u32> = match has_logs {
        true => m.ids().filter(|id| alive.get(*id) && m.rec(*id).deriver != 0).map(|id| m.rec(id).deriver).collect(),
        false => HashSet::new(),
    };
    // What a narinfo that does not parse names stays with it: its listing and build log.
    let held_logs: HashSet<String> = m.held.iter().filter_map(|h| h.deriver.as_ref().map(|d| format!("log/{d}"))).collect();
    let held_listings: HashSet<&str> = m.held.iter().filter_map(|h| h.key.strip_suffix(".narinfo")).collect();
    for (i, o) in m.others.iter().enumerate() {
        let (k, t) = (&*o.key, time(o.mtime));
        let gone = if let Some(hp) = k.strip_suffix(".ls").filter(|h| !h.contains('/')) {
            !m.present_id(hp).is_some_and(|id| alive.get(id)) && !held_listings.contains(hp) && older(t, p.grace, p.now)
        } else if let Some(name) = k.strip_prefix("log/") {
            !alive_logs.contains(&fingerprint(name)) && !held_logs.contains(k) && older(t, p.grace, p.now)
        } else if k.starts_with(STREAM_TMP_PREFIX) {
            // A streamed NAR whose move to `nar/` never happened (the daemon was killed).
            older(t, p.grace, p.now)
        } else {
            false
        };
        if gone {
            plan.objects.push(Doomed::Other(i as u32));
            plan.freed += o.size;
        }
    }
    for (hp, (size, t)) in &m.root_objects {
        if older(*t, p.keep, p.now) || dropped_set.contains(hp.as_str()) {
            plan.objects.push(Doomed::Root(hp.clone()));
            plan.freed += size;
        }
    }
    plan.incomplete = m.incomplete.iter().filter(|i| older(i.started, p.grace, p.now)).cloned().collect();
    plan.kept_paths = m.ids().filter(|id| alive.get(*id)).count();
    plan.kept_bytes = size;
    plan.dropped_roots = dropped.into_iter().filter_map(|hp| m.present_id(hp).map(|id| m.path(id))).collect();
    plan
}

/// The narinfos of `dead` in rounds, referrers first: a round holds those that no narinfo
/// still there after the rounds before it references. `dead` must hold every referrer of its
/// members (true of what is not in a closure of what stays, and checked by `rm`).
fn rounds(m: &Model, dead: &Bits) -> Plan {
    let mut referrers = vec![0u32; m.recs.len()];
    let members: Vec<u32> = m.ids().filter(|id| dead.get(*id)).collect();
    for id in &members {
        for r in m.refs_of(*id).iter().filter(|r| dead.get(**r)) {
            referrers[*r as usize] += 1;
        }
    }
    let mut plan = Plan::default();
    let mut next: Vec<u32> = members.iter().copied().filter(|id| referrers[*id as usize] == 0).collect();
    while !next.is_empty() {
        next.sort_unstable_by_key(|id| m.hashes[*id as usize]);
        let mut after = Vec::new();
        for id in &next {
            plan.freed += m.rec(*id).size as u64;
            for r in m.refs_of(*id).iter().filter(|r| dead.get(**r)) {
                referrers[*r as usize] -= 1;
                if referrers[*r as usize] == 0 {
                    after.push(*r);
                }
            }
        }
        plan.rounds.push(std::mem::replace(&mut next, after));
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
    let mut gone = Bits::with_len(m.recs.len());
    let mut stack: Vec<u32> = paths.iter().filter_map(|p| m.present_id(p.hash_part())).filter(|id| gone.insert(*id)).collect();
    // Who references whom, the other way round (ids of referrers, by referenced id).
    let mut at = vec![0u32; m.recs.len() + 1];
    for id in m.ids() {
        for r in m.refs_of(id) {
            at[*r as usize + 1] += 1;
        }
    }
    for i in 1..at.len() {
        at[i] += at[i - 1];
    }
    let mut by_ref = vec![0u32; at[m.recs.len()] as usize];
    let mut fill = at.clone();
    for id in m.ids() {
        for r in m.refs_of(id) {
            by_ref[fill[*r as usize] as usize] = id;
            fill[*r as usize] += 1;
        }
    }
    let referrers = |id: u32| &by_ref[at[id as usize] as usize..at[id as usize + 1] as usize];
    if with_referrers {
        while let Some(id) = stack.pop() {
            for r in referrers(id) {
                if gone.insert(*r) {
                    stack.push(*r);
                }
            }
        }
    } else {
        let mut refused: Vec<(String, String)> =
            stack.iter().flat_map(|id| referrers(*id).iter().filter(|r| !gone.get(**r)).map(move |r| (m.path(*r), m.path(*id)))).collect();
        if !refused.is_empty() {
            refused.sort();
            refused.dedup();
            return Err(RmRefused::Referenced(refused));
        }
    }
    // A narinfo that does not parse stays (left alone): what it references cannot go.
    let mut held: Vec<(String, String)> = m
        .held
        .iter()
        .flat_map(|h| h.refs.iter().filter_map(|r| m.present_id(r)).filter(|id| gone.get(*id)).map(move |id| (h.key.clone(), m.path(id))))
        .collect();
    if !held.is_empty() {
        held.sort();
        return Err(RmRefused::Referenced(held));
    }
    let pinned: Vec<(String, String)> = m.pins.iter().filter(|(_, p)| m.present_id(p.hash_part()).is_some_and(|id| gone.get(id))).map(|(n, p)| (n.clone(), p.to_string())).collect();
    if !pinned.is_empty() {
        return Err(RmRefused::Pinned(pinned));
    }
    let mut plan = rounds(m, &gone);
    let mut named = Bits::with_len(m.nars.all.len());
    for id in m.ids().filter(|id| !gone.get(*id)) {
        if m.rec(id).nar != EMPTY {
            named.insert(m.rec(id).nar);
        }
    }
    for n in m.held.iter().filter_map(|h| m.nar_id(h.url.as_deref()?)) {
        named.insert(n);
    }
    let mut theirs = Bits::with_len(m.nars.all.len());
    for id in m.ids().filter(|id| gone.get(*id)) {
        let nar = m.rec(id).nar;
        if nar != EMPTY && m.nars.all[nar as usize].listed && !named.get(nar) && theirs.insert(nar) {
            plan.objects.push(Doomed::Nar(nar));
            plan.freed += join(m.nars.all[nar as usize].size);
        }
    }
    // NARs kept outside `nar/` (another layout): among the other objects, by key.
    let elsewhere = |ids: &mut dyn Iterator<Item = u32>| -> HashSet<String> {
        ids.map(|id| m.rec(id).nar).filter(|n| *n != EMPTY && !m.nars.all[*n as usize].listed).map(|n| m.nars.key(n)).collect()
    };
    let gone_elsewhere = elsewhere(&mut m.ids().filter(|id| gone.get(*id)));
    let named_elsewhere = match gone_elsewhere.is_empty() {
        true => HashSet::new(),
        // A narinfo that does not parse names its NAR too.
        false => elsewhere(&mut m.ids().filter(|id| !gone.get(*id))).into_iter().chain(m.held.iter().filter_map(|h| h.url.clone())).collect(),
    };
    for (i, o) in m.others.iter().enumerate() {
        let theirs = gone_elsewhere.contains(&*o.key) && !named_elsewhere.contains(&*o.key);
        if theirs || o.key.strip_suffix(".ls").filter(|h| !h.contains('/')).and_then(|hp| m.present_id(hp)).is_some_and(|id| gone.get(id)) {
            plan.objects.push(Doomed::Other(i as u32));
            plan.freed += o.size;
        }
    }
    plan.kept_paths = m.len() - plan.path_count();
    // What stays is sized as gc sizes it: narinfos, and each NAR they name once.
    let mut kept_nars = Bits::with_len(m.nars.all.len());
    for id in m.ids().filter(|id| !gone.get(*id)) {
        let nar = m.rec(id).nar;
        plan.kept_bytes += m.rec(id).size as u64 + if nar == EMPTY || kept_nars.insert(nar) { m.file_size(id) } else { 0 };
    }
    Ok(plan)
}

/// Deletes what `plan` says, round by round, under `run`'s heartbeat: up to [`DELETE_JOBS`]
/// requests of a round at once (fewer and smaller on a slow store, [`delete_sizing`]), each sent right
/// after its own heartbeat check; a round
/// begins once every request of the one before it has returned.
pub async fn execute(target: &dyn Target, run: &mut Run<'_>, plan: &Plan, m: &Model) -> Result<(), TargetError> {
    let run = tokio::sync::Mutex::new(run);
    let rounds = plan.rounds.iter().map(|round| Batch::Narinfos(round)).chain([Batch::Objects(&plan.objects)]);
    // The first request, of a few keys, goes alone; its time sets the size of the others and
    // how many go at once.
    let mut sizing = None;
    for mut round in rounds {
        if sizing.is_none() && round.len() > 0 {
            let (probe, rest) = round.split_at(PROBE_KEYS.min(round.len()));
            let started = std::time::Instant::now();
            delete_batch(target, &run, m, probe).await?;
            sizing = Some(delete_sizing(started.elapsed(), probe.len()));
            round = rest;
        }
        let (keys, jobs) = sizing.unwrap_or((DELETE_BATCH, DELETE_JOBS));
        crate::par::try_concurrently(round.chunks(keys), jobs, |b| delete_batch(target, &run, m, b)).await?;
    }
    for i in &plan.incomplete {
        run.lock().await.heartbeat().await?;
        match target.abort_incomplete(i).await {
            // A store (or a key) that cannot abort uploads: the rest is done; said once.
            Err(e) if e.unsupported => {
                eprintln!("narq: skipped aborting incomplete uploads (they stay until the store's own lifecycle rules end them): {e}");
                break;
            }
            r => r?,
        }
    }
    Ok(())
}

/// One delete request of [`execute`], after a heartbeat check.
async fn delete_batch(target: &dyn Target, run: &tokio::sync::Mutex<&mut Run<'_>>, m: &Model, batch: Batch<'_>) -> Result<(), TargetError> {
    let keys: Vec<String> = match batch {
        Batch::Narinfos(ids) => ids.iter().map(|id| m.narinfo_key(*id)).collect(),
        Batch::Objects(o) => o.iter().map(|o| m.key_of(o)).collect(),
    };
    run.lock().await.heartbeat().await?;
    target.delete(&keys).await
}

/// Keys in [`execute`]'s first delete request, which sizes the others.
const PROBE_KEYS: usize = 100;

/// Keys a delete request and requests at once, after the first, of `n` keys, took `first`:
/// [`DELETE_BATCH`] and [`DELETE_JOBS`] where that is quick, fewer where the store takes its
/// time, so that each request is answered well within the time it is given (20 s) and sent
/// well within the 60 s after its heartbeat check. A 3-node Garage cluster on 2 cores deletes
/// keys one after the other, ~25 ms each: one request of 1,000 keys went unanswered for 20 s
/// and the gc failed. Requests at once share the store, so each takes about its keys times
/// the time a key took times their number; that is kept under 5 s.
fn delete_sizing(first: std::time::Duration, n: usize) -> (usize, usize) {
    const WITHIN: f64 = 5.0;
    let per_key = (first.as_secs_f64() / n.max(1) as f64).max(1e-6);
    let keys = (WITHIN / per_key).floor().clamp(10.0, DELETE_BATCH as f64) as usize;
    let jobs = (WITHIN / (keys as f64 * per_key)).floor().clamp(1.0, DELETE_JOBS as f64) as usize;
    (keys, jobs)
}

/// One delete request of [`execute`], or a round of them.
#[derive(Clone, Copy)]
enum Batch<'a> {
    Narinfos(&'a [u32]),
    Objects(&'a [Doomed]),
}

impl<'a> Batch<'a> {
    fn len(&self) -> usize {
        match self {
            Batch::Narinfos(b) => b.len(),
            Batch::Objects(b) => b.len(),
        }
    }

    fn split_at(self, n: usize) -> (Batch<'a>, Batch<'a>) {
        match self {
            Batch::Narinfos(b) => (Batch::Narinfos(&b[..n]), Batch::Narinfos(&b[n..])),
            Batch::Objects(b) => (Batch::Objects(&b[..n]), Batch::Objects(&b[n..])),
        }
    }

    /// Requests of `keys` keys each (the last may have fewer).
    fn chunks(self, keys: usize) -> Vec<Batch<'a>> {
        match self {
            Batch::Narinfos(b) => b.chunks(keys).map(Batch::Narinfos).collect(),
            Batch::Objects(b) => b.chunks(keys).map(Batch::Objects).collect(),
        }
    }
}

/// After the lease (see [`super::collection`]): the narinfos, roots and pins written since
/// the scan. The whole cache is listed again (in parts, all begun now); new narinfos are
/// read and added to `m`; their hash parts, and those of new or renewed roots and of pins,
/// are returned: they stay whatever the policy says. A renewed root takes its new time in
/// `m`, so that this collection does not delete it as expired.
pub async fn since_scan(target: &dyn Target, m: &mut Model, jobs: usize) -> Result<HashSet<String>, TargetError> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Object>>(super::PAGES_QUEUED);
    let mut new_narinfos = Vec::new();
    let mut renewed = HashSet::new();
    let listing = target.list_all(jobs, tx);
    let seen = async {
        while let Some(page) = rx.recv().await {
            for o in page {
                if let Some(hp) = o.key.strip_suffix(".narinfo").filter(|h| !h.contains('/')) {
                    if !m.has(hp) && !m.unreadable.contains(&o.key) {
                        new_narinfos.push(o);
                    }
                } else if let Some(hp) = o.key.strip_prefix(ROOTS) {
                    let was = m.root_objects.get(hp).and_then(|(_, t)| *t);
                    if o.last_modified.is_some_and(|t| was.is_none_or(|old| t > old)) {
                        renewed.insert(hp.to_string());
                        m.root_objects.insert(hp.to_string(), (o.size, o.last_modified));
                    }
                }
            }
        }
    };
    let (listed, ()) = tokio::join!(listing, seen);
    listed?;
    let mut also = HashSet::new();
    let read = crate::par::try_concurrently(new_narinfos, jobs, |o| async move { Ok::<_, TargetError>((target.get(&o.key).await?, o)) }).await?;
    for (body, o) in read {
        let Some(body) = body else { continue };
        let hp = o.key.trim_end_matches(".narinfo").to_string();
        match std::str::from_utf8(&body).ok().and_then(|s| NarInfo::parse(s).ok()) {
            Some(info) => m.add_narinfo(&hp, Entry::new(&info, &o)),
            None => m.add_unreadable(&o.key, &body),
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

    #[test]
    fn delete_requests_follow_the_store() {
        let ms = std::time::Duration::from_millis;
        // S3 or a directory: 100 keys in 40 ms.
        assert_eq!(delete_sizing(ms(40), 100), (DELETE_BATCH, DELETE_JOBS));
        // 100 keys in 300 ms: full requests, fewer at once.
        assert_eq!(delete_sizing(ms(300), 100), (DELETE_BATCH, 1));
        // Garage on 2 cores: 25 ms a key.
        assert_eq!(delete_sizing(ms(2500), 100), (200, 1));
        // Slower yet: never fewer than 10 keys a request.
        assert_eq!(delete_sizing(ms(60_000), 100), (10, 1));
    }
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
            self.m.add_narinfo(&p.hash_part().to_string(), Entry { refs: refs.iter().map(|r| sp(r).hash_part().to_string()).collect(), url: url.clone(), size: 1, file_size: size, deriver: None, modified: Some(t), path: p });
            self.m.add_object(Object { key: url, size, last_modified: Some(t), etag: None });
            self
        }
        fn root(&mut self, name: &str, age: Duration) -> &mut Self {
            let p = sp(name);
            self.m.add_object(Object { key: format!("{ROOTS}{}", p.hash_part()), size: 1, last_modified: Some(self.now - age), etag: None });
            self
        }
        fn policy(&self, keep: Duration, max: Option<u64>, grace: Duration) -> Policy {
            Policy { keep, max_size: max, grace, now: self.now }
        }
    }

    fn names(plan: &Plan, m: &Model) -> Vec<String> {
        let mut v: Vec<String> = plan.paths(m).map(|p| p.split_once('-').unwrap().1.to_string()).collect();
        v.sort();
        v
    }

    fn keys(plan: &Plan, m: &Model) -> Vec<String> {
        plan.object_keys(m).collect()
    }

    #[test]
    fn gc_keeps_closures_of_recent_roots_and_pins_deletes_referrers_first() {
        let mut t = M::new();
        t.path("lib", &[], 40 * DAY, 100).path("app1", &["lib"], 40 * DAY, 10).path("app2", &["lib"], 40 * DAY, 10);
        t.path("own", &[], 40 * DAY, 100).path("app3", &["own"], 40 * DAY, 10);
        t.root("app1", 40 * DAY).root("app2", 40 * DAY).root("app3", 2 * DAY);
        t.m.pins.insert("release".into(), sp("app1"));
        let plan = plan_gc(&t.m, &t.policy(30 * DAY, None, DAY), &HashSet::new());
        assert_eq!(names(&plan, &t.m), ["app2"]);
        // keep-days 0: only the pin's closure stays; referrers go in an earlier round.
        let plan = plan_gc(&t.m, &t.policy(Duration::ZERO, None, Duration::ZERO), &HashSet::new());
        assert_eq!(names(&plan, &t.m), ["app2", "app3", "own"]);
        let round_of = |n: &str| plan.rounds.iter().position(|r| r.iter().any(|id| t.m.narinfo_key(*id) == format!("{}.narinfo", sp(n).hash_part()))).unwrap();
        assert!(round_of("app3") < round_of("own"));
        let objects = keys(&plan, &t.m);
        assert!(objects.contains(&"nar/own.nar".to_string()) && !objects.contains(&"nar/lib.nar".to_string()));
        // Expired roots go too.
        assert!(objects.iter().any(|o| o.starts_with(ROOTS)));
        assert_eq!(plan.kept_paths, 2);
    }

    #[test]
    fn grace_keeps_recent_narinfos_and_orphan_nars_and_what_appeared_during_the_lease() {
        let mut t = M::new();
        t.path("old", &[], 40 * DAY, 5).path("new", &["old"], Duration::from_secs(60), 5);
        // A NAR whose narinfo is not written yet.
        t.m.add_object(Object { key: "nar/orphan.nar".into(), size: 7, last_modified: Some(t.now - Duration::from_secs(60)), etag: None });
        // A streamed NAR not yet moved to its key (or left by a daemon killed before the move).
        t.m.add_object(Object { key: "narq/tmp/x-1.nar.zst".into(), size: 9, last_modified: Some(t.now - Duration::from_secs(60)), etag: None });
        let plan = plan_gc(&t.m, &t.policy(DAY, None, DAY), &HashSet::new());
        assert!(plan.rounds.is_empty() && plan.objects.is_empty(), "{plan:?}");
        let plan = plan_gc(&t.m, &t.policy(DAY, None, Duration::ZERO), &HashSet::new());
        assert_eq!(names(&plan, &t.m), ["new", "old"]);
        assert!(keys(&plan, &t.m).contains(&"nar/orphan.nar".to_string()));
        assert!(keys(&plan, &t.m).contains(&"narq/tmp/x-1.nar.zst".to_string()));
        let also: HashSet<String> = [sp("new").hash_part().to_string()].into();
        let plan = plan_gc(&t.m, &t.policy(DAY, None, Duration::ZERO), &also);
        assert!(plan.rounds.is_empty(), "what appeared during the lease stays, with its closure");
    }

    #[test]
    fn max_size_gives_up_oldest_roots_first_never_a_pin() {
        let mut t = M::new();
        t.path("a", &[], 10 * DAY, 100).path("b", &[], 10 * DAY, 100).path("c", &[], 10 * DAY, 100).path("p", &[], 10 * DAY, 100);
        t.root("a", 3 * DAY).root("b", 2 * DAY).root("c", DAY).root("p", 9 * DAY);
        t.m.pins.insert("keep".into(), sp("p"));
        let plan = plan_gc(&t.m, &t.policy(30 * DAY, Some(250), Duration::ZERO), &HashSet::new());
        assert_eq!(names(&plan, &t.m), ["a", "b"], "the pin (oldest root) stays, then the newest root fits");
        assert!(plan.kept_bytes <= 250 || plan.kept_paths == 1);
        let plan = plan_gc(&t.m, &t.policy(30 * DAY, Some(10), Duration::ZERO), &HashSet::new());
        assert_eq!(names(&plan, &t.m), ["a", "b", "c"], "a pin stays even over the limit");
    }

    #[test]
    fn rm_refuses_referenced_paths_unless_with_referrers_and_keeps_shared_nars() {
        let mut t = M::new();
        t.path("lib", &[], DAY, 100).path("app", &["lib"], DAY, 10).path("other", &[], DAY, 10);
        // Another narinfo names the same NAR as app (same contents, another path).
        let twin = sp("twin");
        t.m.add_narinfo(&twin.hash_part().to_string(), Entry { url: "nar/app.nar".into(), refs: vec![], size: 1, file_size: 10, deriver: None, modified: None, path: twin });
        let err = plan_rm(&t.m, &[sp("lib")], false).unwrap_err();
        assert_eq!(err, RmRefused::Referenced(vec![(sp("app").to_string(), sp("lib").to_string())]));
        let plan = plan_rm(&t.m, &[sp("lib")], true).unwrap();
        assert_eq!(names(&plan, &t.m), ["app", "lib"]);
        assert_eq!(plan.rounds.len(), 2);
        assert!(keys(&plan, &t.m).contains(&"nar/lib.nar".to_string()) && !keys(&plan, &t.m).contains(&"nar/app.nar".to_string()));
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
        t.m.add_object(Object { key: "nar/app.nar".into(), size: 5, last_modified: Some(t.now - 40 * DAY), etag: None });
        t.m.add_unreadable("app.narinfo", body.as_bytes());
        let plan = plan_gc(&t.m, &t.policy(Duration::ZERO, None, Duration::ZERO), &HashSet::new());
        assert_eq!(names(&plan, &t.m), ["other"]);
        assert_eq!(keys(&plan, &t.m), ["nar/other.nar"]);
        assert!(matches!(plan_rm(&t.m, &[sp("lib")], true), Err(RmRefused::Referenced(_))));
    }

    /// A path is kept in ~150 bytes, its NAR's included, whatever the order things arrive in
    /// (a reference before its narinfo, a NAR before or after the narinfo that names it).
    #[test]
    fn compact_records_and_late_arrivals() {
        assert_eq!((std::mem::size_of::<Rec>(), std::mem::size_of::<Nar>()), (40, 48));
        let mut t = M::new();
        let nar = |i: u32| format!("nar/{}.nar.zst", nixbase32::encode(&Sha256::digest(&i.to_le_bytes()).0));
        for i in 0..5000u32 {
            let p = sp(&format!("p{i}"));
            // p_i references p_(i+1) and p_(2i+1), before those arrive.
            let later = |j: u32| sp(&format!("p{}", j.min(4999))).hash_part().to_string();
            let refs = if i < 4999 { vec![later(i + 1), later(2 * i + 1)] } else { vec![] };
            if i % 2 == 0 {
                t.m.add_object(Object { key: nar(i), size: 100, last_modified: Some(t.now - 40 * DAY), etag: None });
            }
            t.m.add_narinfo(&p.hash_part().to_string(), Entry { path: p.clone(), refs, url: nar(i), size: 1, file_size: 0, deriver: Some(format!("{}-x.drv", "1".repeat(32))), modified: Some(t.now - 40 * DAY) });
            if i % 2 == 1 {
                t.m.add_object(Object { key: nar(i), size: 100, last_modified: Some(t.now - 40 * DAY), etag: None });
            }
        }
        assert_eq!(t.m.len(), 5000);
        assert_eq!(t.m.nars.all.len(), 5000, "each NAR once, whichever came first");
        assert!(t.m.nars.odd.is_empty(), "usual NAR keys are kept as bytes");
        t.root("p0", DAY);
        let plan = plan_gc(&t.m, &t.policy(30 * DAY, None, DAY), &HashSet::new());
        assert_eq!((plan.path_count(), plan.kept_paths, plan.kept_bytes), (0, 5000, 5000 * 101), "p0's closure is everything");
        assert_eq!(t.m.path(t.m.present_id(sp("p7").hash_part()).unwrap()), sp("p7").to_string());
        let plan = plan_gc(&t.m, &t.policy(Duration::ZERO, None, DAY), &HashSet::new());
        assert_eq!((plan.path_count(), keys(&plan, &t.m).len()), (5000, 5001), "all narinfos, NARs and the root");
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
