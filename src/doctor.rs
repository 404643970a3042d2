//! `narq doctor`: checks the whole set-up, one line per check, `ok` or what to fix; exit 0
//! only when every check passes.
//!
//! The checks, in the order a new set-up breaks: the config parses; each secret key file is
//! root-only and matches its public key; the daemon answers on the socket (and serves this
//! config's store); Nix runs `narq-hook`; the store takes, returns and deletes a probe object
//! (under narq's own prefix `narq/`); the clock agrees with S3's (SigV4 refuses requests
//! signed more than 15 minutes off); `nix-cache-info` says `StoreDir: /nix/store`; each
//! upstream answers. Every check that needs the network is bounded by [`TIMEOUT`].

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::config::Config;
use crate::protocol::{self, Request, Response};
use crate::storage::{self, Body, Target};
use crate::store_url::Location;

/// S3 refuses requests whose SigV4 signature is dated further than this from its clock.
const MAX_SKEW: Duration = Duration::from_secs(15 * 60);
/// Longest wait for one check's answer (the daemon, Nix, the store, S3's clock, an upstream).
const TIMEOUT: Duration = Duration::from_secs(20);
/// The probe object's key prefix: narq's own, which Nix ignores.
const PROBE_PREFIX: &str = "narq/";

/// What one check found: `Ok(detail)` or `Err(problem and what to do)`.
type Verdict = Result<String, String>;

/// Prints the lines and counts the failures.
#[derive(Default)]
struct Report {
    total: usize,
    failed: usize,
}

impl Report {
    fn line(&mut self, what: &str, v: Verdict) {
        self.total += 1;
        match v {
            Ok(detail) => println!("ok    {what}: {detail}"),
            Err(problem) => {
                self.failed += 1;
                println!("FAIL  {what}: {problem}");
            }
        }
    }
}

/// Runs every check against the config at `config` (else `$NARQ_CONFIG`, else the default
/// path); true when all passed.
pub fn run(config: Option<&Path>) -> bool {
    let mut r = Report::default();
    let (path, _) = Config::locate(config);
    let config = match Config::load(config) {
        Ok(c) => c,
        Err(e) => {
            // Nothing else can be checked without it.
            r.line("config", Err(format!("{e}")));
            return false;
        }
    };
    let shown = config.file.as_deref().map_or_else(|| format!("{} absent: built-in defaults", path.display()), |f| f.display().to_string());
    r.line("config", Ok(format!("{shown} parses")));
    for (what, v) in secret_keys(&config) {
        r.line(&what, v);
    }
    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt.block_on(async_checks(&config, &mut r)),
        Err(e) => r.line("store", Err(format!("cannot start an async runtime: {e}"))),
    }
    if r.failed == 0 {
        println!("narq doctor: all {} checks passed", r.total);
    } else {
        println!("narq doctor: {} of {} checks failed", r.failed, r.total);
    }
    r.failed == 0
}

/// Each secret key file: readable, root-only, and its public half is the `public-keys`
/// entry of the same name (when there is one).
fn secret_keys(config: &Config) -> Vec<(String, Verdict)> {
    use std::os::unix::fs::MetadataExt;
    if config.secret_key_files.is_empty() {
        return vec![("secret keys".into(), Err("none configured: the hook cannot sign; set secret-key-files (narq keygen makes a pair)".into()))];
    }
    config
        .secret_key_files
        .iter()
        .map(|f| {
            let what = format!("secret key {}", f.display());
            let v = (|| {
                let meta = std::fs::metadata(f).map_err(|e| format!("cannot read it: {e}"))?;
                let mode = meta.mode() & 0o7777;
                if mode & 0o077 != 0 {
                    return Err(format!("mode {mode:04o} lets other users at it: chmod 600 {} (and consider the key exposed)", f.display()));
                }
                if meta.uid() != 0 {
                    return Err(format!("owned by uid {}, not root: chown root {} (its owner can change what the hook signs with)", meta.uid(), f.display()));
                }
                let sk = crate::nix::SecretKey::read(f).map_err(|e| e.to_string())?;
                let public = sk.public();
                let named: Vec<_> = config.public_keys.iter().filter(|k| k.name == sk.name).collect();
                if named.is_empty() {
                    return Ok(format!(
                        "root-only, key {:?}; public-keys has no entry for it (the daemon derives it only if it can read this file): add {:?}",
                        sk.name,
                        public.to_nix_string()
                    ));
                }
                if !named.contains(&&public) {
                    return Err(format!(
                        "public-keys has a key named {:?} that is not this key's public half, so the daemon refuses what the hook signs: replace it with {:?}",
                        sk.name,
                        public.to_nix_string()
                    ));
                }
                Ok(format!("root-only, key {:?} matches public-keys", sk.name))
            })();
            (what, v)
        })
        .collect()
}

async fn async_checks(config: &Config, r: &mut Report) {
    let target = match storage::open(&config.store).await {
        Ok(t) => t,
        Err(e) => {
            r.line("store", Err(format!("{}: cannot open it: {e}", config.store.original)));
            r.line("nix", nix_runs_the_hook(&checked_path(config)));
            return;
        }
    };
    let socket = config.socket.clone();
    let status = tokio::task::spawn_blocking(move || protocol::call(&socket, &Request::Status, Some(TIMEOUT))).await;
    r.line("daemon", daemon_verdict(config, status.map_err(|e| e.to_string()), &target.describe()));
    let checked = checked_path(config);
    r.line("nix", tokio::task::spawn_blocking(move || nix_runs_the_hook(&checked)).await.unwrap_or_else(|e| Err(e.to_string())));
    r.line("store", bounded(probe(config, &*target)).await);
    if let Location::S3(o) = &config.store.location {
        let url = o.endpoint_url().unwrap_or_else(|| format!("https://s3.{}.amazonaws.com/", o.region.as_deref().unwrap_or("us-east-1")));
        r.line("clock", bounded(clock(&url)).await);
    }
    r.line("nix-cache-info", bounded(cache_info(&*target)).await);
    for u in &config.upstream {
        r.line(&format!("upstream {u}"), bounded(upstream(u)).await);
    }
}

/// `check`, or a failure once [`TIMEOUT`] has passed.
async fn bounded(check: impl std::future::Future<Output = Verdict>) -> Verdict {
    tokio::time::timeout(TIMEOUT, check).await.unwrap_or_else(|_| Err(format!("no answer within {} s", TIMEOUT.as_secs())))
}

fn daemon_verdict(config: &Config, answer: Result<Result<Response, protocol::FrameError>, String>, store: &str) -> Verdict {
    let socket = config.socket.display();
    let not_running = |e: String| format!("no answer on {socket}: {e}: start it (systemctl start narq.socket, or narq daemon)");
    match answer {
        Err(e) => Err(not_running(e)),
        Ok(Err(protocol::FrameError::Io(e))) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            Err(format!("may not connect to {socket} ({e}): run doctor as root, as the daemon's user, or as a member of the socket's group"))
        }
        Ok(Err(protocol::FrameError::Io(e))) if config.socket.parent().is_some_and(|d| !d.exists()) => {
            let dir = config.socket.parent().map(|d| d.display().to_string()).unwrap_or_default();
            Err(not_running(format!("{e}; its directory {dir} does not exist (it is made at boot by systemd, else by `install -d -o narq -g narq {dir}`)")))
        }
        Ok(Err(e)) => Err(not_running(e.to_string())),
        Ok(Ok(Response::Status(s))) => {
            if s.store != store {
                return Err(format!("serves {}, but this config's store is {store}: restart it with this config", s.store));
            }
            if let Some(e) = s.target_error {
                return Err(format!("uploads are paused: {e}"));
            }
            Ok(format!("answers on {socket} ({} pending, {} failed)", s.pending, s.failed))
        }
        Ok(Ok(Response::Error { message, .. })) => Err(format!("refused the status request on {socket}: {message}")),
        Ok(Ok(other)) => Err(format!("answered {socket} with {other:?}, not a status: is another program listening there?")),
    }
}

/// Puts a probe object, reads it back and deletes it.
async fn probe(config: &Config, target: &dyn Target) -> Verdict {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let key = format!("{PROBE_PREFIX}doctor-probe-{}-{nanos}", std::process::id());
    let body = format!("narq doctor probe {nanos}\n").into_bytes();
    let fix = "the daemon's uploads fail the same way";
    // A `file://` cache belongs to the daemon's user: a `narq/` directory made here (as root)
    // would keep it from writing there later, so one made for the probe goes with it.
    let made_dir = match &config.store.location {
        Location::File(dir) => Some(dir.join(PROBE_PREFIX.trim_end_matches('/'))).filter(|d| !d.exists()),
        Location::S3(_) => None,
    };
    let result = async {
        target.put(&key, Body::Bytes(body.clone()), "application/octet-stream").await.map_err(|e| format!("cannot write a probe object: {e} ({fix})"))?;
        // Deleted whatever the read gives: the probe must not stay behind.
        let back = target.get(&key).await;
        let deleted = target.delete(std::slice::from_ref(&key)).await;
        match back {
            Err(e) => return Err(format!("wrote {key} but cannot read it back: {e}")),
            Ok(b) if b.as_deref() != Some(&body[..]) => return Err(format!("wrote {key} but read back something else")),
            Ok(_) => {}
        }
        deleted.map_err(|e| format!("wrote {key} but cannot delete it: {e}"))?;
        Ok(format!("{}: wrote, read back and deleted {key}", target.describe()))
    }
    .await;
    if let Some(d) = made_dir {
        let _ = std::fs::remove_dir(d);
    }
    result
}

/// Compares this machine's clock with the `Date` of S3's answer to a GET of `url`.
async fn clock(url: &str) -> Verdict {
    let client = crate::upstream::http_client().map_err(|e| format!("cannot make an HTTP client: {e}"))?;
    let req = hyper::Request::get(url).body(Default::default()).map_err(|e| format!("bad endpoint URL {url}: {e}"))?;
    let asked = SystemTime::now();
    let resp = client.request(req).await.map_err(|e| format!("no answer from {url}: {}", causes(&e)))?;
    let date = resp
        .headers()
        .get(hyper::header::DATE)
        .and_then(|d| d.to_str().ok())
        .ok_or_else(|| format!("{url} answered without a Date header: cannot compare clocks"))?;
    let theirs = parse_http_date(date).ok_or_else(|| format!("{url} sent a Date header narq cannot read: {date:?}"))?;
    skew_verdict(asked, theirs, url)
}

/// Whether `ours` and `theirs` (S3's `Date`, whole seconds) are within [`MAX_SKEW`].
fn skew_verdict(ours: SystemTime, theirs: SystemTime, url: &str) -> Verdict {
    let (ahead, by) = match ours.duration_since(theirs) {
        Ok(d) => ("ahead of", d),
        Err(e) => ("behind", e.duration()),
    };
    if by > MAX_SKEW {
        return Err(format!(
            "this machine's clock is {} s {ahead} {url}'s: S3 refuses requests signed more than {} min off; fix the time (timedatectl set-ntp true)",
            by.as_secs(),
            MAX_SKEW.as_secs() / 60
        ));
    }
    Ok(format!("within {} s of {url}'s", by.as_secs()))
}

/// An HTTP date in the IMF-fixdate form every S3 server sends: `Sun, 06 Nov 1994 08:49:37 GMT`.
fn parse_http_date(s: &str) -> Option<SystemTime> {
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let f: Vec<&str> = s.split_whitespace().collect();
    let [_, day, month, year, time, "GMT"] = f[..] else { return None };
    let day: i64 = day.parse().ok().filter(|d| (1..=31).contains(d))?;
    let month = MONTHS.iter().position(|m| *m == month)? as i64 + 1;
    let year: i64 = year.parse().ok().filter(|y| *y >= 1970)?;
    let hms: Vec<i64> = time.split(':').map(|x| x.parse().ok()).collect::<Option<_>>()?;
    let [h, m, sec] = hms[..] else { return None };
    if !(0..24).contains(&h) || !(0..60).contains(&m) || !(0..61).contains(&sec) {
        return None;
    }
    // Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    Some(UNIX_EPOCH + Duration::from_secs(u64::try_from(days * 86_400 + h * 3600 + m * 60 + sec).ok()?))
}

async fn cache_info(target: &dyn Target) -> Verdict {
    match target.get("nix-cache-info").await {
        Err(e) => Err(format!("cannot read it: {e}")),
        Ok(None) => Err(format!("{} has none, so Nix will not use it as a cache: the daemon writes it when it starts", target.describe())),
        Ok(Some(b)) => {
            let text = String::from_utf8_lossy(&b);
            match text.lines().find_map(|l| l.strip_prefix("StoreDir:")).map(str::trim) {
                Some("/nix/store") => Ok("StoreDir: /nix/store".into()),
                Some(other) => Err(format!("StoreDir: {other}: clients with /nix/store refuse the cache; delete nix-cache-info and restart the daemon")),
                None => Err("has no StoreDir line: delete it and restart the daemon, which writes it again".into()),
            }
        }
    }
}

/// An upstream answers if it serves its `nix-cache-info`.
async fn upstream(url: &str) -> Verdict {
    let client = crate::upstream::http_client().map_err(|e| format!("cannot make an HTTP client: {e}"))?;
    let info = format!("{url}/nix-cache-info");
    let req = hyper::Request::get(&info).body(Default::default()).map_err(|e| format!("bad URL {info}: {e}"))?;
    let fix = "fix or remove it from upstream (until then paths it has are uploaded anyway)";
    let resp = client.request(req).await.map_err(|e| format!("no answer: {}; {fix}", causes(&e)))?;
    if !resp.status().is_success() {
        return Err(format!("GET {info}: HTTP {}; {fix}", resp.status()));
    }
    let body = http_body_util::BodyExt::collect(http_body_util::Limited::new(resp.into_body(), 64 << 10))
        .await
        .map_err(|e| format!("GET {info}: {e}; {fix}"))?
        .to_bytes();
    if !String::from_utf8_lossy(&body).lines().any(|l| l.starts_with("StoreDir:")) {
        return Err(format!("GET {info} is not a nix-cache-info: is {url} a binary cache? {fix}"));
    }
    Ok("serves nix-cache-info".into())
}

/// An error and its causes on one line (hyper's own text is only "client error (Connect)").
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    // Bounded: error chains are short, but nothing says they end.
    while let (Some(c), true) = (cur, parts.len() < 8) {
        parts.push(c.to_string());
        cur = c.source();
    }
    parts.join(": ")
}

/// The config file these checks read (the default path when it is absent).
fn checked_path(config: &Config) -> PathBuf {
    config.file.clone().unwrap_or_else(|| PathBuf::from(crate::config::DEFAULT_PATH))
}

/// Nix's `post-build-hook` (as `nix show-config` has it) is a `narq-hook` that exists, and
/// the config it will read is `checked`, the one these checks read (see [`hook_config`]).
fn nix_runs_the_hook(checked: &Path) -> Verdict {
    let hook = nix_hook()?;
    hook_config(checked, nix_daemon()).map(|how| format!("post-build-hook = {hook}; {how}")).map_err(|e| format!("post-build-hook = {hook}, but {e}"))
}

/// Which config the hook reads: `NARQ_CONFIG` in the environment of the process that runs it,
/// else the default. On a multi-user Nix that is nix-daemon (`daemon`: its pid and its
/// `NARQ_CONFIG`, or why that could not be read); fails when it is not `checked`.
fn hook_config(checked: &Path, daemon: Option<(u32, Result<Option<PathBuf>, String>)>) -> Verdict {
    use crate::config::DEFAULT_PATH;
    let same = |a: &Path, b: &Path| a == b || std::fs::canonicalize(a).ok().is_some_and(|a| std::fs::canonicalize(b).ok() == Some(a));
    match daemon {
        None if checked == Path::new(DEFAULT_PATH) => {
            Ok(format!("no nix-daemon runs: it reads $NARQ_CONFIG where the build runs, else {DEFAULT_PATH}"))
        }
        None => Ok(format!("no nix-daemon runs: builds must run with NARQ_CONFIG={} for the hook to read it", checked.display())),
        Some((pid, Err(e))) => Ok(format!("nix-daemon (pid {pid}) runs it; which config it gives the hook is unknown ({e}): run narq doctor as root")),
        Some((pid, Ok(env))) => {
            let (reads, why) = match &env {
                Some(p) => (p.clone(), "NARQ_CONFIG in its environment"),
                None => (PathBuf::from(DEFAULT_PATH), "no NARQ_CONFIG in its environment"),
            };
            if same(&reads, checked) {
                return Ok(format!("nix-daemon (pid {pid}) runs it with {}", reads.display()));
            }
            Err(format!(
                "nix-daemon (pid {pid}) runs it with {} ({why}), not {}, which these checks read: set NARQ_CONFIG={} in nix-daemon's environment and restart it (README: \"Without systemd\")",
                reads.display(),
                checked.display(),
                checked.display()
            ))
        }
    }
}

/// The nix-daemon that accepts connections (not one of its per-client children): its pid
/// and its `NARQ_CONFIG` (reading another user's environment needs root). One under another
/// root directory (a chroot or container that shares the process table) serves another
/// store, not this one: it is left out where its root can be read.
fn nix_daemon() -> Option<(u32, Result<Option<PathBuf>, String>)> {
    use std::os::unix::fs::MetadataExt;
    let root = |path: &str| std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
    let ours = root("/");
    let same_root = |pid: &str| match root(&format!("/proc/{pid}/root")) {
        Some(theirs) => Some(theirs) == ours,
        None => true,
    };
    let comm = |pid: &str| std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let ppid = |pid: &str| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
        stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1).map(str::to_string)).unwrap_or_default()
    };
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()))
        .filter(|p| comm(&p.to_string()).trim() == "nix-daemon" && comm(&ppid(&p.to_string())).trim() != "nix-daemon" && same_root(&p.to_string()))
        .collect();
    pids.sort_unstable();
    let pid = *pids.first()?;
    let env = std::fs::read(format!("/proc/{pid}/environ")).map_err(|e| e.to_string()).map(|env| {
        env.split(|b| *b == 0).find_map(|v| v.strip_prefix(b"NARQ_CONFIG=")).filter(|v| !v.is_empty()).map(|v| PathBuf::from(String::from_utf8_lossy(v).into_owned()))
    });
    Some((pid, env))
}

/// Nix's `post-build-hook`, when it is a `narq-hook` that exists.
fn nix_hook() -> Result<String, String> {
    let out = output_within(Command::new("nix").args(["--extra-experimental-features", "nix-command", "show-config"]), TIMEOUT)
        .map_err(|e| format!("cannot run nix show-config: {e}"))?;
    let fix = "add `post-build-hook = /path/to/narq-hook` to /etc/nix/nix.conf and restart nix-daemon (NixOS: services.narq.enable)";
    let hook = out
        .lines()
        .find_map(|l| l.strip_prefix("post-build-hook = "))
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .ok_or_else(|| format!("Nix runs no post-build-hook: {fix}"))?;
    let path = Path::new(hook);
    if path.file_name().is_none_or(|n| n != "narq-hook") {
        return Err(format!("Nix's post-build-hook is {hook}, not narq-hook: {fix}"));
    }
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(hook.to_string()),
        Ok(_) => Err(format!("post-build-hook {hook} is not an executable file")),
        Err(e) => Err(format!("post-build-hook {hook}: {e}")),
    }
}

/// The stdout of `cmd` if it succeeds within `limit`; it is killed after that.
fn output_within(cmd: &mut Command, limit: Duration) -> Result<String, String> {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().map_err(|e| e.to_string())?;
    // Read both pipes off this thread, so that a full pipe cannot stall the child.
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        stdout.as_mut().map(|o| o.read_to_string(&mut s));
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        stderr.as_mut().map(|o| o.read_to_string(&mut s));
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait().map_err(|e| e.to_string())? {
            Some(s) => break s,
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no answer within {} s", limit.as_secs()));
            }
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    let (out, err) = (out.join().unwrap_or_default(), err.join().unwrap_or_default());
    if !status.success() {
        return Err(format!("{status}: {}", err.lines().next().unwrap_or("")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates() {
        let at = |s| parse_http_date(s).map(|t| t.duration_since(UNIX_EPOCH).unwrap().as_secs());
        // Values from `date -u -d ... +%s`.
        assert_eq!(at("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(at("Sun, 06 Nov 1994 08:49:37 GMT"), Some(784_111_777));
        assert_eq!(at("Tue, 29 Feb 2000 12:00:00 GMT"), Some(951_825_600));
        assert_eq!(at("Fri, 27 Nov 2026 16:20:24 GMT"), Some(1_795_796_424));
        for bad in ["", "Sun, 06 Nov 1994 08:49:37 UTC", "Sun, 06 Foo 1994 08:49:37 GMT", "Sun, 06 Nov 1994 24:00:00 GMT", "Sun, 06 Nov 1994 08:49 GMT"] {
            assert_eq!(at(bad), None, "{bad}");
        }
    }

    /// What doctor says when it cannot reach the daemon depends on why (a new user ran it as
    /// another user and was told to start a daemon that was running).
    #[test]
    fn daemon_check_says_why_it_cannot_connect() {
        let io = |kind| Ok(Err(protocol::FrameError::Io(std::io::Error::from(kind))));
        let text = |socket: &str| format!("socket = \"{socket}\"\n");
        let at = |socket: &str, answer| {
            let config = Config::parse(&text(socket), Some(Path::new("/etc/narq/config.toml"))).unwrap();
            daemon_verdict(&config, answer, "file:///x").unwrap_err()
        };
        let tmp = std::env::temp_dir();
        let e = at(&tmp.join("narq-doctor-test.sock").to_string_lossy(), io(std::io::ErrorKind::PermissionDenied));
        assert!(e.contains("run doctor as root, as the daemon's user, or as a member of the socket's group") && !e.contains("start it"), "{e}");
        let e = at(&tmp.join("narq-doctor-test.sock").to_string_lossy(), io(std::io::ErrorKind::NotFound));
        assert!(e.contains("start it (systemctl start narq.socket, or narq daemon)") && !e.contains("does not exist"), "{e}");
        let e = at("/nonexistent-narq-dir/narq.sock", io(std::io::ErrorKind::NotFound));
        assert!(e.contains("its directory /nonexistent-narq-dir does not exist") && e.contains("install -d -o narq -g narq /nonexistent-narq-dir"), "{e}");
    }

    /// Issue 21 item 2: the hook finds a config other than the default only through
    /// NARQ_CONFIG in nix-daemon's environment; doctor says which one it will read.
    #[test]
    fn doctor_says_which_config_the_hook_reads() {
        let default = Path::new(crate::config::DEFAULT_PATH);
        let srv = Path::new("/srv/narq/config.toml");
        assert!(hook_config(default, None).unwrap().contains("else /etc/narq/config.toml"));
        assert!(hook_config(srv, None).unwrap().contains("builds must run with NARQ_CONFIG=/srv/narq/config.toml"));
        assert_eq!(hook_config(default, Some((7, Ok(None)))).unwrap(), "nix-daemon (pid 7) runs it with /etc/narq/config.toml");
        assert_eq!(hook_config(srv, Some((7, Ok(Some(srv.into()))))).unwrap(), "nix-daemon (pid 7) runs it with /srv/narq/config.toml");
        let e = hook_config(srv, Some((7, Ok(None)))).unwrap_err();
        assert!(e.starts_with("nix-daemon (pid 7) runs it with /etc/narq/config.toml (no NARQ_CONFIG in its environment), not /srv/narq/config.toml"), "{e}");
        assert!(e.contains("set NARQ_CONFIG=/srv/narq/config.toml in nix-daemon's environment"), "{e}");
        assert!(hook_config(srv, Some((7, Err("Permission denied".into())))).unwrap().contains("run narq doctor as root"));
    }

    #[test]
    fn skew_beyond_15_minutes_fails_either_way() {
        let t = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let min = Duration::from_secs(60);
        assert!(skew_verdict(t, t, "u").is_ok());
        assert!(skew_verdict(t + 14 * min, t, "u").is_ok());
        assert!(skew_verdict(t, t + 14 * min, "u").is_ok());
        let ahead = skew_verdict(t + 16 * min, t, "u").unwrap_err();
        assert!(ahead.contains("960 s ahead of u's"), "{ahead}");
        let behind = skew_verdict(t, t + 16 * min, "u").unwrap_err();
        assert!(behind.contains("960 s behind u's"), "{behind}");
    }
}
