//! An adversary's tools against narq's collection protocol (issue 18): an `LD_PRELOAD` shim,
//! built here with `cc`, that stops a process at a chosen system call or shifts its clock;
//! processes stopped, continued and killed by pid; narq set-ups ("nodes") whose daemons and
//! commands run the binaries under test or the baseline ones (64d1f2c, built by
//! `scripts/setup-baseline.sh`), all at one time scale. The S3 proxy is in `s3proxy.rs`.
//!
//! # Time scale
//! Every narq process a test here starts gets `NARQ_TEST_TIME_SCALE` (debug builds scale
//! the protocol's durations by it: lease, watch TTL, margin, gc wait, heartbeat, dead-after),
//! and the tests' own waits are scaled the same way ([`at_scale`]): 0.1 (a lease of 1.2 s, less
//! than `util::TIME_SCALE` for speed) unless the environment sets it. To run these tests
//! against binaries that do not honour it (`NARQ_TEST_BIN_DIR`, e.g. the 64d1f2c ones), set
//! `NARQ_TEST_TIME_SCALE=1`, so that the tests' waits match those binaries' durations.

use crate::util::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The time scale of the tests here (see the module doc).
pub fn scale() -> f64 {
    static S: OnceLock<f64> = OnceLock::new();
    *S.get_or_init(|| std::env::var("NARQ_TEST_TIME_SCALE").ok().and_then(|v| v.parse().ok()).filter(|s: &f64| *s > 0.0).unwrap_or(0.1))
}

/// `secs` of the protocol's unscaled time, at the tests' scale.
pub fn at_scale(secs: f64) -> Duration {
    Duration::from_secs_f64(secs * scale())
}

/// The protocol's durations (unscaled seconds), for the tests' waits.
pub const LEASE: f64 = 12.0;
pub const DEAD_AFTER: f64 = 120.0;
pub const MARGIN: f64 = 3.0;

/// The shim (`adversary_shim.c`, whose header says what it does), compiled once per source
/// into the cargo target's temp dir.
pub fn shim() -> &'static Path {
    static SHIM: OnceLock<PathBuf> = OnceLock::new();
    SHIM.get_or_init(|| {
        const SOURCE: &str = include_str!("adversary_shim.c");
        let h = narq::nix::Sha256::digest(SOURCE.as_bytes()).to_base32();
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let so = dir.join(format!("narq-shim-{}.so", &h[..12]));
        if !so.exists() {
            let src = dir.join(format!("narq-shim-{}-{}.c", &h[..12], std::process::id()));
            std::fs::write(&src, SOURCE).unwrap();
            let tmp = dir.join(format!(".narq-shim-{}.so", std::process::id()));
            run(Command::new("cc").args(["-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o"]).arg(&tmp).arg(&src).arg("-ldl"));
            std::fs::rename(&tmp, &so).unwrap();
            let _ = std::fs::remove_file(&src);
        }
        so
    })
}

/// Environment that stops a process (once) at the `nth` call among `calls` (e.g.
/// `"rename,renameat,renameat2"`) whose path contains `needle`; `after`: once the call is
/// made. The stop is announced in `marker` ([`stopped_at`]).
pub fn stop_env(calls: &str, needle: &str, nth: u32, after: bool, marker: &Path) -> Vec<(String, String)> {
    vec![
        ("LD_PRELOAD".into(), shim().display().to_string()),
        ("NARQ_SHIM_STOP_CALLS".into(), calls.into()),
        ("NARQ_SHIM_STOP_MATCH".into(), needle.into()),
        ("NARQ_SHIM_STOP_NTH".into(), nth.to_string()),
        ("NARQ_SHIM_STOP_WHEN".into(), if after { "after" } else { "before" }.into()),
        ("NARQ_SHIM_STOP_MARKER".into(), marker.display().to_string()),
    ]
}

/// [`stop_env`] whose calls count only once `arm` exists (the test creates it when it wants
/// the next such call to stop the process).
pub fn armed_stop_env(calls: &str, needle: &str, marker: &Path, arm: &Path) -> Vec<(String, String)> {
    let mut env = stop_env(calls, needle, 1, false, marker);
    env.push(("NARQ_SHIM_STOP_ARM".into(), arm.display().to_string()));
    env
}

/// Environment that makes every call among `calls` whose path contains `needle` take
/// `delay` longer (the calling thread sleeps first).
pub fn delay_env(calls: &str, needle: &str, delay: Duration) -> Vec<(String, String)> {
    vec![
        ("LD_PRELOAD".into(), shim().display().to_string()),
        ("NARQ_SHIM_DELAY_CALLS".into(), calls.into()),
        ("NARQ_SHIM_DELAY_MATCH".into(), needle.into()),
        ("NARQ_SHIM_DELAY_MS".into(), delay.as_millis().to_string()),
    ]
}

/// The calls that put an object in place on `file://` (a rename from its temp name).
pub const RENAMES: &str = "rename,renameat,renameat2";
/// The calls that delete an object on `file://`.
pub const UNLINKS: &str = "unlink,unlinkat";

/// Waits until the process that took the stop of [`stop_env`] has stopped; its pid and the
/// marker's line, or `None` after `timeout`.
pub fn stopped_at(marker: &Path, timeout: Duration) -> Option<(u32, String)> {
    let mut found = None;
    wait_for(timeout, || {
        let line = std::fs::read_to_string(marker).unwrap_or_default();
        match line.split(' ').next().and_then(|p| p.parse::<u32>().ok()) {
            Some(pid) if is_stopped(pid) => {
                found = Some((pid, line.trim().to_string()));
                true
            }
            _ => false,
        }
    });
    found
}

/// Whether `pid` is stopped (state `T`).
pub fn is_stopped(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The state follows the command name in parentheses, which may hold spaces.
    stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('T'))
}

pub fn signal(pid: u32, sig: i32) {
    // SAFETY: a plain syscall; the pid is one of the processes the test started.
    unsafe { libc::kill(pid as i32, sig) };
}

/// Environment that runs a process with its clock `offset` seconds off.
pub fn clock_env(offset: f64) -> Vec<(String, String)> {
    vec![("LD_PRELOAD".into(), shim().display().to_string()), ("NARQ_SHIM_CLOCK_OFFSET".into(), offset.to_string())]
}

/// A clock offset that a test moves while the process runs (the shim reads the file at each
/// look at the clock).
pub struct ClockFile(pub PathBuf);

impl ClockFile {
    pub fn new(path: PathBuf, offset: f64) -> ClockFile {
        let c = ClockFile(path);
        std::fs::write(&c.0, [b' '; 64]).unwrap();
        c.set(offset);
        c
    }
    /// Rewrites the offset in place (same length: a reader never sees an empty file).
    pub fn set(&self, offset: f64) {
        use std::io::Write;
        let mut text = format!("{offset}").into_bytes();
        text.resize(64, b' ');
        std::fs::OpenOptions::new().write(true).open(&self.0).unwrap().write_all(&text).unwrap();
    }
    pub fn env(&self) -> Vec<(String, String)> {
        vec![("LD_PRELOAD".into(), shim().display().to_string()), ("NARQ_SHIM_CLOCK_FILE".into(), self.0.display().to_string())]
    }
}

/// Sets the modification time of every file under `dir` (or of `dir` itself, a file) to
/// `days` ago, as age would (`touch -d`).
pub fn age(path: &Path, days: f64) {
    let when = format!("@{}", (std::time::SystemTime::now() - Duration::from_secs_f64(days * 86400.0)).duration_since(std::time::UNIX_EPOCH).unwrap().as_secs());
    let mut files = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        match std::fs::read_dir(&p) {
            Ok(rd) => stack.extend(rd.flatten().map(|e| e.path())),
            Err(_) => files.push(p),
        }
    }
    for chunk in files.chunks(200) {
        run(Command::new("touch").arg("-d").arg(&when).args(chunk));
    }
}

/// The narq binaries a node runs.
#[derive(Clone, Debug)]
pub struct Bins {
    pub narq: PathBuf,
    pub hook: PathBuf,
    /// For messages: "under test", "64d1f2c".
    pub name: String,
}

/// Where `scripts/setup-baseline.sh` puts the 64d1f2c binaries.
pub const BASELINE_DIR: &str = "/var/cache/narq-test/narq-64d1f2c";

impl Bins {
    /// The binaries under test: cargo's, or those in `NARQ_TEST_BIN_DIR` ([`bin`]).
    pub fn under_test() -> Bins {
        let name = std::env::var("NARQ_TEST_BIN_DIR").unwrap_or_else(|_| "under test".into());
        Bins { narq: bin("narq"), hook: bin("narq-hook"), name }
    }

    /// The 64d1f2c binaries, if `scripts/setup-baseline.sh` built them.
    pub fn baseline() -> Option<Bins> {
        let d = Path::new(BASELINE_DIR);
        let b = Bins { narq: d.join("narq"), hook: d.join("narq-hook"), name: "64d1f2c".into() };
        (b.narq.exists() && b.hook.exists()).then_some(b)
    }
}

/// A process started in the background, its output in files; ended by [`Bg::finish`] (or
/// killed when dropped).
pub struct Bg {
    pub child: Option<Child>,
    out: PathBuf,
    err: PathBuf,
    started: Instant,
}

/// How a background process ended.
#[derive(Debug)]
pub struct Done {
    /// `None`: killed at the deadline (or by a signal).
    pub status: Option<ExitStatus>,
    pub timed_out: bool,
    pub stdout: String,
    pub stderr: String,
    pub took: Duration,
}

impl Done {
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }
}

/// Has the process started by `cmd` killed when the thread that starts it ends (a test
/// killed or panicking past its clean-up leaves no daemon, stopped or not, behind).
pub fn die_with_test(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec here.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        })
    }
}

impl Bg {
    pub fn spawn(cmd: &mut Command, dir: &Path) -> Bg {
        let tag = unique();
        let (out, err) = (dir.join(format!("bg-{tag}.out")), dir.join(format!("bg-{tag}.err")));
        let child = die_with_test(cmd)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        Bg { child: Some(child), out, err, started: Instant::now() }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Whether it has ended (without reaping it for good: [`Bg::finish`] still reports it).
    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Waits until it ends, at most `timeout` (then kills it).
    pub fn finish(&mut self, timeout: Duration) -> Done {
        let mut c = self.child.take().expect("finished once");
        let deadline = Instant::now() + timeout;
        let mut timed_out = false;
        let status = loop {
            match c.try_wait().unwrap() {
                Some(s) => break Some(s),
                None if Instant::now() >= deadline => {
                    timed_out = true;
                    // A stopped process takes SIGKILL too.
                    let _ = c.kill();
                    let _ = c.wait();
                    break None;
                }
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        Done {
            status: status.filter(|s| s.code().is_some()),
            timed_out,
            stdout: std::fs::read_to_string(&self.out).unwrap_or_default(),
            stderr: std::fs::read_to_string(&self.err).unwrap_or_default(),
            took: self.started.elapsed(),
        }
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A narq set-up (config, keys, state dir, nix.conf with the hook) running `bins`, its
/// daemon and commands at the tests' time scale.
pub struct Node {
    pub n: Narq,
    pub bins: Bins,
    /// `NARQ_TEST_TIME_SCALE` of its processes ([`scale`] unless set).
    pub scale: f64,
}

impl Node {
    /// `store`: the config's `store = ...` line (`None`: the `file://` cache in the dir).
    pub fn new(tag: &str, store: Option<&str>, bins: Bins) -> Node {
        let n = Narq::new(tag, store.unwrap_or(""));
        nix_conf(n.dir.path(), Some(&bins.hook));
        Node { n, bins, scale: scale() }
    }

    /// Another node with the same keys and cache (`store` line), its own state dir and socket.
    pub fn sibling(&self, tag: &str, bins: Bins) -> Node {
        let mut n = Narq::new(tag, "");
        let text = std::fs::read_to_string(&self.n.config).unwrap();
        let mine = |line: &str| line.starts_with("state-dir") || line.starts_with("socket");
        let own = std::fs::read_to_string(&n.config).unwrap();
        let mut config: String = own.lines().filter(|l| mine(l)).map(|l| format!("{l}\n")).collect();
        config.extend(text.lines().filter(|l| !mine(l)).map(|l| format!("{l}\n")));
        if !text.lines().any(|l| l.starts_with("store")) {
            config.push_str(&format!("store = \"file://{}\"\n", self.n.cache().display()));
        }
        std::fs::write(&n.config, config).unwrap();
        n.public_key = self.n.public_key.clone();
        nix_conf(n.dir.path(), Some(&bins.hook));
        Node { n, bins, scale: self.scale }
    }

    /// `narq ARGS` with this config, the test S3 credentials and the time scale.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bins.narq);
        c.args(args)
            .env("NARQ_CONFIG", &self.n.config)
            .env("NARQ_TEST_TIME_SCALE", self.scale.to_string())
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env_remove("JOURNAL_STREAM");
        c
    }

    pub fn run(&self, args: &[&str]) -> std::process::Output {
        output(&mut self.cmd(args))
    }

    /// `narq ARGS`, which must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "narq {args:?} ({}): {}\n{}", self.bins.name, String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout));
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// `narq ARGS` in the background, with `env` (shims) added.
    pub fn bg(&self, args: &[&str], env: &[(String, String)]) -> Bg {
        let mut c = self.cmd(args);
        c.envs(env.iter().map(|(k, v)| (k, v)));
        Bg::spawn(&mut c, self.n.dir.path())
    }

    /// Starts the daemon with `env` (shims) added, and waits until it answers.
    pub fn start(&mut self, env: &[(String, String)]) {
        let mut c = self.cmd(&["daemon"]);
        c.envs(env.iter().map(|(k, v)| (k, v)));
        self.n.spawn_daemon(die_with_test(&mut c));
        assert!(wait_for(Duration::from_secs(20), || self.run(&["status"]).status.success()), "daemon ({}) did not come up: {}", self.bins.name, self.n.daemon_log());
    }

    /// Stops the daemon as systemd does (SIGTERM), and waits for it.
    pub fn stop(&mut self) {
        let mut c = self.n.daemon.take().expect("daemon running");
        signal(c.id(), libc::SIGTERM);
        let start = Instant::now();
        while c.try_wait().unwrap().is_none() {
            if start.elapsed() > Duration::from_secs(30) {
                let _ = c.kill();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `narq status --json` of this node's binary.
    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["status", "--json"])).unwrap()
    }

    pub fn daemon_pid(&self) -> u32 {
        self.n.daemon_pid()
    }

    /// `nix-build` of `expr` through the post-build hook of this node's binaries.
    pub fn build(&self, expr: &str) -> Vec<String> {
        let out = output(
            Command::new("nix-build")
                .args(["--no-out-link", "-E", expr])
                .env("NIX_CONF_DIR", &self.n.nix_conf)
                .env("NARQ_CONFIG", &self.n.config)
                .env("NARQ_TEST_TIME_SCALE", self.scale.to_string()),
        );
        assert!(out.status.success(), "nix-build failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().lines().map(str::to_string).collect()
    }

    /// `narq wait --timeout SECS`, bounded.
    pub fn wait(&self, secs: u64) -> Done {
        self.bg(&["wait", "--timeout", &secs.to_string()], &[]).finish(Duration::from_secs(secs + 30))
    }

    pub fn log(&self) -> String {
        self.n.daemon_log()
    }
}

/// Small derivations as `(name, names of the earlier ones it depends on)`: the `let`
/// bindings of all of them (named `NAME-u` in the store), each output naming its dependencies.
fn lets(drvs: &[(&str, &[&str])], u: &str) -> String {
    let mut lets = String::new();
    for (name, deps) in drvs {
        let refs: String = deps.iter().map(|d| format!("${{{d}}} ")).collect();
        lets.push_str(&format!("{name} = {}; ", sh_drv(&format!("{name}-{u}"), &format!("echo {name} {refs} > $out"))));
    }
    lets
}

/// The expression of derivation `name` of `drvs` (to build it through a node's hook).
pub fn drv_expr(drvs: &[(&str, &[&str])], name: &str, u: &str) -> String {
    format!("let {}in {name}", lets(drvs, u))
}

/// Builds all of `drvs` without a hook; their output paths by name.
pub fn build_plain(dir: &Path, drvs: &[(&str, &[&str])], u: &str) -> std::collections::BTreeMap<String, String> {
    let names: Vec<&str> = drvs.iter().map(|(n, _)| *n).collect();
    let expr = format!("let {}in [ {} ]", lets(drvs, u), names.join(" "));
    let outs = nix_build(&nix_conf(&dir.join("plain"), None), &expr, &[]);
    names.iter().zip(outs).map(|(n, p)| (n.to_string(), p)).collect()
}
