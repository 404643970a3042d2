//! What `narq-hook` does after each build, and what `narq push` shares with it: find the
//! outputs, read their closure from the Nix database, sign every path, hand the request to
//! the daemon, and spool it to disk when the daemon does not answer in time.
//!
//! The hook never fails a build: [`run`] returns the one line to print on trouble, and the
//! binary always exits 0.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::Config;
use crate::nix::{db::NixDb, drv, PathInfo, Realisation, Sha256, StorePath};
use crate::protocol::{self, Client, Request, Response};
use crate::spool;

/// How long the hook's whole hand-off may take (connect, ask, send, answer) before it spools.
/// The daemon answers after one fsync (about a millisecond); two seconds is far beyond that
/// under any load and still short next to a build.
pub const DAEMON_TIMEOUT: Duration = Duration::from_secs(2);

/// Up to this many paths, the hook signs the whole closure instead of first asking the
/// daemon which paths it lacks (a signature costs ~30 µs, a round trip ~300 µs).
const SIGN_ALL_BELOW: usize = 16;

/// The outputs of a build: `OUT_PATHS` (space-separated), else the `.drv` at `DRV_PATH`
/// (Nix 2.8 passes an empty `OUT_PATHS`).
pub fn outputs(out_paths: Option<&str>, drv_path: Option<&str>) -> anyhow::Result<Vec<StorePath>> {
    let listed: Vec<&str> = out_paths.unwrap_or("").split_whitespace().collect();
    if !listed.is_empty() {
        return Ok(listed.into_iter().map(StorePath::parse).collect::<Result<_, _>>()?);
    }
    let drv_path = drv_path.filter(|d| !d.is_empty()).ok_or_else(|| anyhow::anyhow!("neither OUT_PATHS nor DRV_PATH is set"))?;
    // The outputs come first: a `.drv` with a large environment is not read whole.
    use std::io::Read;
    let err = |e: std::io::Error| anyhow::anyhow!("{drv_path}: {e}");
    let mut text = Vec::new();
    let mut file = std::fs::File::open(drv_path).map_err(err)?;
    let outputs = loop {
        let read = file.by_ref().take(text.len().max(64 << 10) as u64).read_to_end(&mut text).map_err(err)?;
        match drv::leading_outputs(&text)? {
            Some(o) => break o,
            None if read == 0 => anyhow::bail!("{drv_path}: {}", drv::DrvError::Expected(text.len(), "the outputs")),
            None => {}
        }
    };
    Ok(outputs.into_iter().filter_map(|o| o.path).collect())
}

pub enum Delivery {
    /// The daemon has the paths it did not have before (`new` of them).
    Queued { new: usize },
    /// The daemon did not answer; the whole signed closure is in this spool file.
    Spooled(PathBuf, String),
}

/// The path info of `roots` and everything they reference, from the Nix database.
pub fn closure(roots: &[StorePath]) -> anyhow::Result<Vec<PathInfo>> {
    Source::Db(NixDb::open_default()?).whole(roots)
}

/// Signatures the paths already carry (from substituters, `nix store sign`) are passed on
/// only when well-formed, and at most [`MAX_SIGS`](crate::nix::path_info::MAX_SIGS) minus
/// room for ours: the daemon refuses a request with a malformed signature or too many, and
/// one odd path must not make every build above it unuploadable.
fn tidy(paths: &mut [PathInfo]) {
    for p in paths {
        tidy_sigs(&mut p.sigs, crate::nix::path_info::MAX_SIGS);
    }
}

/// Keeps the well-formed signatures of `sigs`, at most `max` minus room for ours.
fn tidy_sigs(sigs: &mut std::collections::BTreeSet<String>, max: usize) {
    const ROOM_FOR_OURS: usize = 8;
    sigs.retain(|s| crate::nix::signing::check_signature_syntax(s).is_ok());
    while sigs.len() > max - ROOM_FOR_OURS {
        sigs.pop_last();
    }
}

/// The realisations Nix recorded for the build of `drv` (`ca-derivations`): those of `roots`,
/// or, when the `.drv` names no output paths (a content-addressed derivation), those of the
/// outputs `drv` derived, whose out paths are then the build's outputs. Their signatures
/// are passed on only when well-formed, as for paths (see [`tidy`]). Each is keyed as Nix
/// 2.35 keys it too where it can be ([`key_build_traces`]).
pub fn realisations(db: &NixDb, roots: &[StorePath], drv: Option<&StorePath>) -> anyhow::Result<Vec<Realisation>> {
    let mut found = db.realisations(roots, drv)?;
    for r in &mut found {
        tidy_sigs(&mut r.signatures, crate::nix::realisation::MAX_SIGS);
    }
    key_build_traces(db, &mut found)?;
    Ok(found)
}

/// Gives each realisation its build trace's key where Nix 2.35 has one
/// ([`traced_by`](crate::nix::realisation::traced_by)): the deriver Nix registered for its
/// out path, when that `.drv` is resolved. One whose deriver is gone (collected) or is not
/// resolved keeps its old key only.
fn key_build_traces(db: &NixDb, realisations: &mut [Realisation]) -> anyhow::Result<()> {
    use crate::nix::realisation::{traced_by, Traced};
    if realisations.is_empty() {
        return Ok(());
    }
    let mut outs: Vec<StorePath> = realisations.iter().map(|r| r.out_path.clone()).collect();
    outs.sort_unstable();
    outs.dedup();
    let infos = db.query(&outs, false)?;
    let mut drvs: std::collections::HashMap<&StorePath, Option<drv::Drv>> = std::collections::HashMap::new();
    for r in realisations {
        let Some(d) = infos.iter().find(|i| i.path == r.out_path).and_then(|i| i.deriver.as_ref()) else { continue };
        let parsed = drvs.entry(d).or_insert_with(|| std::fs::read(d.to_absolute()).ok().and_then(|t| drv::parse(&t).ok()));
        if parsed.as_ref().is_some_and(|p| traced_by(d, p, r.output(), &r.out_path)) {
            r.build_trace = Some(Traced { drv_path: d.clone(), signatures: Default::default() });
        }
    }
    Ok(())
}

/// What a daemon older than build traces answers a request that carries one.
const NO_BUILD_TRACES: &str = "unknown field `buildTrace`";

/// What to hand over: the roots (a build's outputs, `narq push` arguments) and their
/// closure, read from the Nix database only as far as the daemon lacks it.
pub struct Handover<'a> {
    pub roots: &'a [StorePath],
    /// The closure, when the caller has read it already.
    pub closure: Option<Vec<PathInfo>>,
    pub drv: Option<StorePath>,
    /// The build's realisations (signed here, like the paths).
    pub realisations: Vec<Realisation>,
}

/// Where the closure comes from.
enum Source {
    /// The caller read it.
    Read(Vec<PathInfo>),
    /// The Nix database, read as far as needed.
    Db(NixDb),
}

impl Source {
    /// The closure of `roots` if it holds at most [`SIGN_ALL_BELOW`] paths.
    fn small(&self, roots: &[StorePath]) -> anyhow::Result<Option<Vec<PathInfo>>> {
        let mut c = match self {
            Source::Read(c) => (c.len() <= SIGN_ALL_BELOW).then(|| c.clone()),
            Source::Db(db) => db.closure_below(roots, SIGN_ALL_BELOW + 1)?,
        };
        c.iter_mut().for_each(|c| tidy(c));
        Ok(c)
    }

    /// The NarHash of each of `roots`, in order.
    fn nar_hashes(&self, roots: &[StorePath]) -> anyhow::Result<Vec<Sha256>> {
        match self {
            Source::Read(c) => roots.iter().map(|r| c.iter().find(|p| &p.path == r).map(|p| p.nar_hash).ok_or_else(|| anyhow::anyhow!("{r} is not valid in the local store"))).collect(),
            Source::Db(db) => Ok(db.nar_hashes(roots)?),
        }
    }

    /// The whole closure of `roots`.
    fn whole(&self, roots: &[StorePath]) -> anyhow::Result<Vec<PathInfo>> {
        let mut c = match self {
            Source::Read(c) => c.clone(),
            Source::Db(db) => db.query(roots, true)?,
        };
        tidy(&mut c);
        Ok(c)
    }
}

/// Why a hand-off to the daemon stopped.
enum Stopped {
    /// The daemon failed us (unreachable, too slow, a broken answer): spool.
    Daemon(protocol::FrameError),
    /// The daemon answered something else than asked: say it.
    Answer(Box<Response>),
    /// Reading the Nix database failed: no request can be made.
    Local(anyhow::Error),
}

impl From<protocol::FrameError> for Stopped {
    fn from(e: protocol::FrameError) -> Self {
        Stopped::Daemon(e)
    }
}

/// Levels of a closure read one at a time, each after asking the daemon which of its paths
/// it lacks, before the rest is read in one query: a build over a closure the daemon holds
/// reads the outputs and their references only (the daemon holds a path only with its
/// closure), a build of a new closure costs a few round trips more.
const WALK_LEVELS: usize = 3;

/// The paths of the closure of `roots` that the daemon lacks, and the roots whatever it has:
/// it notes them as roots of the cache (pushed again, kept by `narq gc`), and looks again
/// for what a request named once a collection has run. `asked`: which roots the daemon
/// lacks, when its answer to `roots` said so already.
fn lacking(client: &mut Client, db: &NixDb, roots: &[StorePath], mut asked: Option<HashSet<StorePath>>) -> Result<Vec<PathInfo>, Stopped> {
    let local = |e: crate::nix::db::DbError| Stopped::Local(e.into());
    let mut ask = |paths: Vec<StorePath>| -> Result<HashSet<StorePath>, Stopped> {
        match client.call(&Request::Missing { paths })? {
            Response::Missing { paths } => Ok(paths.into_iter().collect()),
            other => Err(Stopped::Answer(Box::new(other))),
        }
    };
    let mut seen: HashSet<StorePath> = roots.iter().cloned().collect();
    let mut out = Vec::new();
    let mut frontier = roots.to_vec();
    for level in 0.. {
        if frontier.is_empty() {
            break;
        }
        let missing = match asked.take() {
            Some(m) => m,
            None => ask(frontier.clone())?,
        };
        if level >= WALK_LEVELS && !missing.is_empty() {
            // Deep and new: the rest of it at once, then one question for all of it.
            let missing: Vec<StorePath> = missing.into_iter().collect();
            let rest: Vec<PathInfo> = db.query(&missing, true).map_err(local)?;
            let fresh: Vec<StorePath> = rest.iter().map(|p| p.path.clone()).filter(|p| !seen.contains(p)).collect();
            let mut wanted = ask(fresh)?;
            wanted.extend(missing);
            out.extend(rest.into_iter().filter(|p| wanted.contains(&p.path)));
            break;
        }
        let wanted: Vec<StorePath> = if level == 0 { frontier } else { frontier.into_iter().filter(|p| missing.contains(p)).collect() };
        let infos = db.query(&wanted, false).map_err(local)?;
        frontier = Vec::new();
        for r in infos.iter().filter(|p| missing.contains(&p.path)).flat_map(|p| &p.references) {
            if seen.insert(r.clone()) {
                frontier.push(r.clone());
            }
        }
        out.extend(infos);
    }
    Ok(out)
}

/// The paths of `closure` that the daemon lacks, and the `roots` whatever it has (see
/// [`lacking`]).
fn lacking_in(client: &mut Client, closure: &[PathInfo], roots: &[StorePath]) -> Result<Vec<PathInfo>, Stopped> {
    let all = closure.iter().map(|p| p.path.clone()).collect();
    match client.call(&Request::Missing { paths: all })? {
        Response::Missing { paths: missing } => {
            let mut wanted: HashSet<StorePath> = missing.into_iter().collect();
            wanted.extend(roots.iter().cloned());
            Ok(closure.iter().filter(|p| wanted.contains(&p.path)).cloned().collect())
        }
        other => Err(Stopped::Answer(Box::new(other))),
    }
}

/// Hands `h` to the daemon: asks which paths it lacks, and signs and sends only those (a
/// small closure is signed and sent whole: that costs less than a question). If the daemon
/// is unreachable, too slow at any step, or cannot store the request now, the whole closure
/// is signed and spooled. An explicit refusal is an error: spooling would only be refused
/// again.
pub fn submit(config: &Config, h: Handover) -> anyhow::Result<Delivery> {
    let Handover { roots, closure: known, drv, mut realisations } = h;
    let keys = config.secret_keys()?;
    for r in &mut realisations {
        keys.iter().for_each(|k| r.sign(k));
    }
    let source = match known {
        Some(c) => Source::Read(c),
        None => Source::Db(NixDb::open_default()?),
    };
    let small = source.small(roots)?;
    let handed = || -> Result<Response, Stopped> {
        let mut client = Client::connect(&config.socket, Some(DAEMON_TIMEOUT))?;
        // A build over a closure the daemon holds (a rebuild, `narq push` of what was pushed):
        // only the roots are named again, their path info is neither read nor signed.
        // Which roots the daemon lacks, if it answered `roots`; when it lacks something below
        // the roots it holds (a path a collection made stale, whose reference then failed),
        // the whole closure is looked at (`deep`).
        let mut asked = None;
        let mut deep = false;
        if small.is_none() && realisations.is_empty() {
            // With their NarHashes: a root rebuilt with other contents is sent in full.
            let nar_hashes = source.nar_hashes(roots).map_err(Stopped::Local)?;
            match client.call(&Request::Roots { paths: roots.to_vec(), drv: drv.clone(), nar_hashes })? {
                Response::Missing { paths } => {
                    deep = paths.iter().any(|p| !roots.contains(p));
                    asked = Some(paths.into_iter().collect());
                }
                // A daemon older than `roots` refuses it and hangs up: the whole hand-off.
                Response::Error { retryable: false, .. } => client = Client::connect(&config.socket, Some(DAEMON_TIMEOUT))?,
                answer => return Ok(answer),
            }
        }
        let mut todo = match (&small, &source) {
            (Some(all), _) => all.clone(),
            (None, Source::Read(c)) => lacking_in(&mut client, c, roots)?,
            (None, Source::Db(_)) if deep => lacking_in(&mut client, &source.whole(roots).map_err(Stopped::Local)?, roots)?,
            (None, Source::Db(db)) => lacking(&mut client, db, roots, asked)?,
        };
        tidy(&mut todo);
        PathInfo::sign_all(&mut todo, &keys);
        let requests = enqueue_requests(todo, drv.clone(), realisations.clone());
        let mut new = 0;
        for (i, req) in requests.iter().enumerate() {
            match call_enqueue(&mut client, config, req)? {
                Response::Queued { new: n } => new += n,
                // A daemon older than parts refuses them and hangs up: the closure at once.
                Response::Error { message, retryable: false } if i == 0 && message.contains(NO_PARTS) => {
                    let mut client = Client::connect(&config.socket, Some(DAEMON_TIMEOUT))?;
                    return call_enqueue(&mut client, config, &whole(requests));
                }
                answer => return Ok(answer),
            }
        }
        Ok(Response::Queued { new })
    };
    let why = match handed() {
        Ok(Response::Queued { new }) => return Ok(Delivery::Queued { new }),
        Ok(Response::Error { message, retryable: false }) => anyhow::bail!("the daemon refused the request: {message}"),
        Ok(Response::Error { message, retryable: true }) => format!("the daemon could not store the request ({message})"),
        Ok(other) => format!("unexpected answer {other:?}"),
        Err(Stopped::Answer(other)) => format!("unexpected answer {other:?}"),
        Err(Stopped::Daemon(e)) => format!("daemon at {} unreachable: {e}", config.socket.display()),
        Err(Stopped::Local(e)) => return Err(e),
    };
    let mut paths = match small {
        Some(all) => all,
        None => source.whole(roots)?,
    };
    PathInfo::sign_all(&mut paths, &keys);
    deliver_or_spool(config, &enqueue_requests(paths, drv, realisations), why)
}

/// Paths sent in one `enqueue` request at most: a larger closure goes in parts (in one
/// connection, or one spool file), so that what the daemon holds while it admits a request
/// is bounded (a path's info takes about 1 KiB in memory, and more while it is parsed) and
/// no request nears [`protocol::MAX_FRAME`].
const PART_PATHS: usize = 2_000;

/// What a daemon older than parts answers a request that is one.
const NO_PARTS: &str = "unknown field `part`";

/// The `enqueue` requests that hand over `paths`: one, or the parts of a closure larger than
/// [`PART_PATHS`] ([`PathInfo::in_parts`]), the last with the roots, the derivation and the
/// realisations.
fn enqueue_requests(paths: Vec<PathInfo>, drv: Option<StorePath>, realisations: Vec<Realisation>) -> Vec<Request> {
    let size = part_paths();
    if paths.len() <= size {
        return vec![Request::Enqueue { paths, drv, realisations, part: false }];
    }
    let mut parts: Vec<Request> = PathInfo::in_parts(paths, size).into_iter().map(|paths| Request::Enqueue { paths, drv: None, realisations: Vec::new(), part: true }).collect();
    if let Some(Request::Enqueue { drv: d, realisations: r, part, .. }) = parts.last_mut() {
        (*d, *r, *part) = (drv, realisations, false);
    }
    parts
}

/// [`PART_PATHS`]; in debug builds `NARQ_TEST_PART_PATHS` sets it, for tests to send a small
/// closure in parts.
fn part_paths() -> usize {
    #[cfg(debug_assertions)]
    if let Some(n) = std::env::var("NARQ_TEST_PART_PATHS").ok().and_then(|n| n.parse().ok()).filter(|n| *n > 0) {
        return n;
    }
    PART_PATHS
}

/// The parts `requests` as one request.
fn whole(requests: Vec<Request>) -> Request {
    let mut all = Request::Enqueue { paths: Vec::new(), drv: None, realisations: Vec::new(), part: false };
    for req in requests {
        if let (Request::Enqueue { paths, drv, realisations, .. }, Request::Enqueue { paths: p, drv: d, realisations: r, .. }) = (&mut all, req) {
            paths.extend(p);
            (*drv, *realisations) = (d, r);
        }
    }
    all
}

/// Sends an `enqueue` request. A daemon older than build traces refuses them and hangs up:
/// the realisations without, on a new connection (it writes the layout Nix up to 2.34 reads).
fn call_enqueue(client: &mut Client, config: &Config, req: &Request) -> Result<Response, Stopped> {
    match client.call(req)? {
        Response::Error { message, retryable: false } if message.contains(NO_BUILD_TRACES) => {
            let mut req = req.clone();
            if let Request::Enqueue { realisations, .. } = &mut req {
                realisations.iter_mut().for_each(|r| r.build_trace = None);
            }
            Ok(Client::connect(&config.socket, Some(DAEMON_TIMEOUT))?.call(&req)?)
        }
        answer => Ok(answer),
    }
}

/// Spools `requests` (in one file, read in order), which the daemon did not take (`why`).
/// On a full disk, the daemon's reserve ([`spool::RESERVE_NAME`]) makes room for them.
fn deliver_or_spool(config: &Config, requests: &[Request], why: String) -> anyhow::Result<Delivery> {
    let frame: Vec<u8> = requests.iter().flat_map(protocol::encode).collect();
    let mut written = spool::write(&config.spool_dir(), &frame);
    if written.as_ref().is_err_and(|e| e.raw_os_error() == Some(libc::ENOSPC)) && spool::release_reserve(&config.state_dir) {
        written = spool::write(&config.spool_dir(), &frame);
    }
    let file = written.map_err(|e| anyhow::anyhow!("{why}; and spooling to {} failed: {e}", config.spool_dir().display()))?;
    Ok(Delivery::Spooled(file, why))
}

/// Tells the daemon that the build of `roots` (or of `drv`) was not handed over, and why, so
/// that `narq status` and `narq wait` report it until `narq retry` hands it over. Spooled
/// when the daemon does not answer. Returns the line for the build log.
pub fn report(config: &Config, roots: &[StorePath], drv: Option<StorePath>, why: &anyhow::Error) -> String {
    let reason = format!("{why:#}");
    let req = Request::Report { roots: roots.to_vec(), drv, reason: reason.clone() };
    let kept = match protocol::call(&config.socket, &req, Some(DAEMON_TIMEOUT)) {
        Ok(Response::Recorded { .. }) => Ok(()),
        Ok(other) => Err(format!("{other:?}")),
        Err(e) => Err(format!("daemon at {} unreachable: {e}", config.socket.display())),
    }
    .or_else(|why| deliver_or_spool(config, std::slice::from_ref(&req), why).map(drop).map_err(|e| format!("{e:#}")));
    match kept {
        Ok(()) => format!("{reason}; this build is not uploaded (recorded: `narq retry` uploads it once fixed)"),
        Err(e) => format!("{reason}; this build is not uploaded, and recording that failed: {e}"),
    }
}

/// The hook's whole job. `Ok(None)`: nothing to say; `Ok(Some(line))`/`Err`: one line for stderr.
pub fn run(config_file: Option<&Path>, out_paths: Option<&str>, drv_path: Option<&str>) -> anyhow::Result<Option<String>> {
    let config = Config::load(config_file)?;
    let drv = drv_path.filter(|d| !d.is_empty()).map(StorePath::parse).transpose()?;
    let found = outputs(out_paths, drv_path).and_then(|roots| {
        let realised = realisations(&NixDb::open_default()?, &roots, drv.as_ref())?;
        // A content-addressed derivation's outputs are known only by their realisations.
        let roots = if roots.is_empty() { realised.iter().map(|r| r.out_path.clone()).collect() } else { roots };
        Ok((roots, realised))
    });
    let (roots, realised) = match found {
        Ok(r) => r,
        Err(e) => return Ok(Some(report(&config, &[], drv, &e))),
    };
    if roots.is_empty() {
        return Ok(None);
    }
    // Whatever stops the hand-off from here on (an unreadable key or Nix database, a refusal)
    // is recorded with the daemon: a build the hook saw is never silently missing.
    let delivered = submit(&config, Handover { roots: &roots, closure: None, drv: drv.clone(), realisations: realised });
    let line = match delivered {
        Ok(Delivery::Queued { .. }) => None,
        Ok(Delivery::Spooled(file, why)) => Some(format!("{why}; spooled to {}", file.display())),
        Err(e) => Some(report(&config, &roots, drv, &e)),
    };
    // An exposed key is said on every build, in the same one line as anything else.
    Ok(match (config.secret_key_warning(), line) {
        (None, line) => line,
        (Some(w), line) => Some(line.map_or(w.clone(), |l| format!("{w}; {l}"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/corpus/drv");

    #[test]
    fn outputs_come_from_out_paths_else_from_the_drv() {
        let listed = "/nix/store/z4asv3j07d89ywjf8fxkn7sg6mf5s9q5-dep  /nix/store/zzasv3j07d89ywjf8fxkn7sg6mf5s9q5-dev\n";
        let got = outputs(Some(listed), Some("/nonexistent.drv")).unwrap();
        assert_eq!(got.iter().map(ToString::to_string).collect::<Vec<_>>(), listed.split_whitespace().collect::<Vec<_>>());
        // Nix 2.8: OUT_PATHS empty, the outputs are read from the .drv.
        let drv = format!("{CORPUS}/dep.drv");
        let from_drv = outputs(Some(""), Some(&drv)).unwrap();
        let want: Vec<StorePath> = drv::parse_outputs(&std::fs::read(&drv).unwrap()).unwrap().into_iter().filter_map(|o| o.path).collect();
        assert!(!want.is_empty());
        assert_eq!(from_drv, want);
        assert_eq!(outputs(None, Some(&drv)).unwrap(), want);
    }

    /// A daemon older than build traces reads an `enqueue` with its `Realisation` as it was:
    /// it refuses one that carries a build trace with the message [`submit`] looks for (its
    /// answer is `malformed message: ` and serde's), and takes the same request without.
    #[test]
    fn a_daemon_older_than_build_traces_refuses_them_as_the_hook_expects() {
        use std::collections::{BTreeMap, BTreeSet};
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase", deny_unknown_fields)]
        #[allow(dead_code)]
        struct OldRealisation {
            id: String,
            out_path: StorePath,
            #[serde(default)]
            signatures: BTreeSet<String>,
            #[serde(default)]
            dependent_realisations: BTreeMap<String, StorePath>,
        }
        #[derive(serde::Deserialize)]
        #[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
        #[allow(dead_code)]
        enum OldRequest {
            Enqueue {
                paths: Vec<PathInfo>,
                #[serde(default)]
                drv: Option<StorePath>,
                #[serde(default)]
                realisations: Vec<OldRealisation>,
            },
        }
        let key = crate::nix::SecretKey::generate("k-1").unwrap();
        let mut r = Realisation {
            id: format!("sha256:{}!out", "ab".repeat(32)),
            out_path: StorePath::parse(&format!("/nix/store/{}-x", "a".repeat(32))).unwrap(),
            signatures: BTreeSet::new(),
            dependent_realisations: BTreeMap::new(),
            build_trace: Some(crate::nix::realisation::Traced {
                drv_path: StorePath::parse(&format!("/nix/store/{}-x.drv", "b".repeat(32))).unwrap(),
                signatures: BTreeSet::new(),
            }),
        };
        r.sign(&key);
        let req = |realisations| serde_json::to_vec(&Request::Enqueue { paths: vec![], drv: None, realisations, part: false }).unwrap();
        let e = serde_json::from_slice::<OldRequest>(&req(vec![r.clone()])).err().expect("an old daemon took a build trace").to_string();
        assert!(e.contains(NO_BUILD_TRACES), "{e}");
        r.build_trace = None;
        serde_json::from_slice::<OldRequest>(&req(vec![r])).unwrap();
    }

    #[test]
    fn outputs_refuse_what_they_cannot_read_and_say_why() {
        assert!(outputs(None, None).unwrap_err().to_string().contains("neither OUT_PATHS nor DRV_PATH"));
        assert!(outputs(Some(" "), Some("")).unwrap_err().to_string().contains("neither OUT_PATHS nor DRV_PATH"));
        assert!(outputs(Some("/tmp/not-a-store-path"), None).is_err());
        let e = outputs(None, Some("/nonexistent/x.drv")).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/x.drv") && e.contains("No such file"), "{e}");
    }
}
