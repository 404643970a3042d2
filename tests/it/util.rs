//! Shared helpers: isolated temp dirs, commands that must succeed, real Nix builds.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A directory removed on drop (kept when `NARQ_KEEP_TMP` is set, for debugging).
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "narq-test-{tag}-{}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            unique()
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("NARQ_KEEP_TMP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A string unique to this moment, to make derivations that Nix has not built before.
pub fn unique() -> String {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    format!("{}{:09}", d.as_secs(), d.subsec_nanos())
}

/// Runs `cmd`, panics with its output unless it succeeds, returns stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

/// The binary under test; `NARQ_TEST_BIN_DIR` runs the tests against others (e.g. an older
/// narq's, to show that a test fails there).
pub fn bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("NARQ_TEST_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    match name {
        "narq" => PathBuf::from(env!("CARGO_BIN_EXE_narq")),
        "narq-hook" => PathBuf::from(env!("CARGO_BIN_EXE_narq-hook")),
        _ => panic!("unknown binary {name}"),
    }
}

/// The collection protocol's durations for the narq processes the tests start (debug builds
/// honour it): shrunk together, so that a gc takes 3 s of lease, not 12. Every process of one
/// test must use the same: a test that wants another sets it on its commands itself.
pub const TIME_SCALE: &str = "0.25";

/// Gives `cmd` the tests' [`TIME_SCALE`] unless it has one.
pub fn scaled(cmd: &mut Command) -> &mut Command {
    if !cmd.get_envs().any(|(k, _)| k == "NARQ_TEST_TIME_SCALE") {
        cmd.env("NARQ_TEST_TIME_SCALE", TIME_SCALE);
    }
    cmd
}

/// A nix.conf directory for tests: no sandbox, root builds directly, and an optional hook.
pub fn nix_conf(dir: &Path, hook: Option<&Path>) -> PathBuf {
    let conf = dir.join("nix-conf");
    std::fs::create_dir_all(&conf).unwrap();
    let mut text = String::from(
        "sandbox = false\nbuild-users-group =\nexperimental-features = nix-command\nsubstituters =\nmax-jobs = 4\n",
    );
    if let Some(h) = hook {
        text.push_str(&format!("post-build-hook = {}\n", h.display()));
    }
    std::fs::write(conf.join("nix.conf"), text).unwrap();
    conf
}

/// `nix-build` of `expr` (a Nix expression) with `NIX_CONF_DIR=conf`; returns output paths.
pub fn nix_build(conf: &Path, expr: &str, env: &[(&str, &Path)]) -> Vec<String> {
    let mut cmd = Command::new("nix-build");
    cmd.args(["--no-out-link", "-E", expr]).env("NIX_CONF_DIR", conf);
    for (k, v) in env {
        cmd.env(k, v);
    }
    run(&mut cmd).lines().map(str::to_string).collect()
}

/// A derivation expression built with `/bin/sh`, no nixpkgs needed.
pub fn sh_drv(name: &str, script: &str) -> String {
    format!(
        "derivation {{ name = \"{name}\"; system = builtins.currentSystem; builder = \"/bin/sh\"; PATH = \"/usr/bin:/bin\"; \
         args = [\"-c\" {script:?}]; }}"
    )
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// A narq set-up in a temp dir: keys, config, nix.conf with the hook, and (when started)
/// a real `narq daemon` process.
pub struct Narq {
    pub dir: TempDir,
    pub config: PathBuf,
    pub nix_conf: PathBuf,
    pub public_key: String,
    pub daemon: Option<std::process::Child>,
}

impl Narq {
    /// `extra` is appended to the generated config.toml.
    pub fn new(tag: &str, extra: &str) -> Narq {
        let dir = TempDir::new(tag);
        let sk = dir.join("key.sec");
        let pk = dir.join("key.pub");
        run(Command::new(bin("narq")).args(["keygen", &format!("narq-{tag}-1"), "--secret-key-file"]).arg(&sk).arg("--public-key-file").arg(&pk));
        let public_key = std::fs::read_to_string(&pk).unwrap().trim().to_string();
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "state-dir = \"{}\"\nsocket = \"{}\"\nsecret-key-files = [\"{}\"]\n{extra}\n",
                dir.join("state").display(),
                dir.join("narq.sock").display(),
                sk.display()
            ),
        )
        .unwrap();
        let nix_conf = nix_conf(dir.path(), Some(&bin("narq-hook")));
        Narq { dir, config, nix_conf, public_key, daemon: None }
    }

    pub fn cache(&self) -> PathBuf {
        self.dir.join("state/cache")
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("narq.sock")
    }

    pub fn daemon_pid(&self) -> u32 {
        self.daemon.as_ref().expect("daemon running").id()
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// Starts `narq daemon` and waits until it answers `status`.
    pub fn start(&mut self) {
        self.start_env(&[]);
    }

    /// The same with `env` added to the daemon's environment (e.g. other S3 credentials).
    pub fn start_env(&mut self, env: &[(&str, &str)]) {
        self.spawn_daemon(Command::new(bin("narq")).arg("daemon").env_remove("JOURNAL_STREAM").envs(env.iter().copied()));
        assert!(
            wait_for(Duration::from_secs(10), || self.narq(&["status"]).status.success()),
            "daemon did not come up: {}",
            self.daemon_log()
        );
    }

    /// Spawns `cmd` (which runs the daemon) with this config, test credentials for S3
    /// targets (unless `cmd` has its own), no waiting for an EC2 metadata service, and its
    /// output in `daemon.log`.
    pub fn spawn_daemon(&mut self, cmd: &mut Command) {
        assert!(self.daemon.is_none());
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("daemon.log")).unwrap();
        if !cmd.get_envs().any(|(k, _)| k == "AWS_ACCESS_KEY_ID") {
            cmd.env("AWS_ACCESS_KEY_ID", "test").env("AWS_SECRET_ACCESS_KEY", "test");
        }
        let child = scaled(cmd)
            .env("NARQ_CONFIG", &self.config)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.daemon = Some(child);
    }

    /// `kill -9` of the daemon.
    pub fn kill9(&mut self) {
        let mut c = self.daemon.take().expect("daemon running");
        c.kill().unwrap();
        c.wait().unwrap();
    }

    pub fn narq(&self, args: &[&str]) -> Output {
        output(scaled(Command::new(bin("narq")).args(args).env("NARQ_CONFIG", &self.config)))
    }

    /// `narq wait`, which must succeed.
    pub fn wait(&self, secs: u32) {
        let out = self.narq(&["wait", "--timeout", &secs.to_string()]);
        assert!(
            out.status.success(),
            "narq wait: {}\n{}\ndaemon log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.daemon_log()
        );
    }

    pub fn status(&self) -> serde_json::Value {
        let out = self.narq(&["status", "--json"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// `nix-build` with the hook, this config in the environment.
    pub fn build(&self, expr: &str) -> (Vec<String>, String) {
        let out = output(
            Command::new("nix-build")
                .args(["--no-out-link", "-E", expr])
                .env("NIX_CONF_DIR", &self.nix_conf)
                .env("NARQ_CONFIG", &self.config),
        );
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "nix-build failed: {stderr}");
        (String::from_utf8(out.stdout).unwrap().lines().map(str::to_string).collect(), stderr)
    }

    /// Checks that `path`'s narinfo is in the cache.
    pub fn has(&self, path: &str) -> bool {
        self.cache().join(format!("{}.narinfo", hash(path))).exists()
    }

    /// A fresh Nix store that trusts only our key substitutes `path` from the cache.
    pub fn substitute(&self, path: &str) -> PathBuf {
        self.substitute_from(path, &format!("file://{}", self.cache().display()))
    }

    /// The same, from the binary cache at `url`.
    pub fn substitute_from(&self, path: &str, url: &str) -> PathBuf {
        let client = self.dir.join(format!("client-{}", unique()));
        let out = output(
            Command::new("nix-store")
                .arg("--store")
                .arg(&client)
                .args(["-r", path, "--option", "substituters", url])
                .args(["--option", "trusted-public-keys", &self.public_key])
                .env("NIX_CONF_DIR", &self.nix_conf),
        );
        assert!(out.status.success(), "substitution of {path} failed: {}", String::from_utf8_lossy(&out.stderr));
        client
    }
}

impl Drop for Narq {
    fn drop(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The closure of `paths` as `nix-store -qR` lists it.
/// A store path's hash part.
pub fn hash(path: &str) -> &str {
    &path["/nix/store/".len().."/nix/store/".len() + 32]
}

pub fn closure(paths: &[String]) -> Vec<String> {
    run(Command::new("nix-store").arg("-qR").args(paths)).lines().map(str::to_string).collect()
}

/// Every narinfo in `cache` has its NAR and its references' narinfos: the cache is closed.
/// Returns the number of narinfos checked. A narinfo (or reference) that disappears while it
/// is read was deleted meanwhile (a collection deletes referrers first): looked at again, not
/// a violation unless the referrer is still there.
pub fn check_closed(cache: &Path) -> Result<usize, String> {
    let mut n = 0;
    let Ok(rd) = std::fs::read_dir(cache) else { return Ok(0) };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !name.ends_with(".narinfo") || name.starts_with('.') {
            continue;
        }
        let text = match std::fs::read_to_string(e.path()) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            r => r.map_err(|e| format!("{name}: {e}"))?,
        };
        let ni = narq::nix::NarInfo::parse(&text).map_err(|e| format!("{name}: {e}"))?;
        let mut missing = Vec::new();
        if !cache.join(&ni.url).exists() {
            missing.push(format!("its NAR {}", ni.url));
        }
        for r in ni.info.references.iter().filter(|r| !cache.join(format!("{}.narinfo", r.hash_part())).exists()) {
            missing.push(format!("its reference {r}"));
        }
        if !missing.is_empty() && e.path().exists() {
            return Err(format!("{name} is visible without {}", missing.join(", ")));
        }
        n += 1;
    }
    Ok(n)
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The Python virtual environment scripts/setup.sh installs moto into (`.venv/` in the repo):
/// the tests use its `moto_server` and `python`, never a system-wide one.
pub fn venv_bin(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin").join(name);
    assert!(p.exists(), "{} not found: run scripts/setup.sh (it installs moto into .venv/)", p.display());
    p
}

/// A real S3 server (`moto_server`, installed by scripts/setup.sh) on 127.0.0.1.
pub struct Moto {
    pub port: u16,
    child: std::process::Child,
    pub log: PathBuf,
}

impl Moto {
    /// `env`: extra environment for the server (e.g. `INITIAL_NO_AUTH_ACTION_COUNT`).
    pub fn start(dir: &Path, env: &[(&str, &str)]) -> Moto {
        let port = free_port();
        let log = dir.join(format!("moto-{port}.log"));
        let f = std::fs::File::create(&log).unwrap();
        let child = Command::new(venv_bin("moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .expect("moto_server (run scripts/setup.sh)");
        let up = wait_for(Duration::from_secs(30), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        assert!(up, "moto_server did not start: {}", std::fs::read_to_string(&log).unwrap_or_default());
        Moto { port, child, log }
    }

    /// Creates `bucket` with a public-read policy, so that Nix can read it over plain HTTP.
    pub fn bucket(&self, bucket: &str) {
        let script = format!(
            "import boto3, json\n\
             s3 = boto3.client('s3', endpoint_url='http://127.0.0.1:{}', aws_access_key_id='test', \
             aws_secret_access_key='test', region_name='us-east-1')\n\
             s3.create_bucket(Bucket='{bucket}')\n\
             s3.put_bucket_policy(Bucket='{bucket}', Policy=json.dumps({{'Version': '2012-10-17', 'Statement': \
             [{{'Effect': 'Allow', 'Principal': '*', 'Action': 's3:GetObject', 'Resource': 'arn:aws:s3:::{bucket}/*'}}]}}))\n",
            self.port
        );
        run(Command::new(venv_bin("python")).args(["-c", &script]));
    }

    /// Requests the server logged so far.
    pub fn requests(&self) -> usize {
        std::fs::read_to_string(&self.log).unwrap_or_default().lines().filter(|l| l.contains("HTTP/1.1\"")).count()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Plain-HTTP request to 127.0.0.1:`port`; returns status line + headers (lowercased) and body.
pub fn http(port: u16, method: &str, path: &str) -> (String, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n").map_or(buf.len(), |i| i + 4);
    (String::from_utf8_lossy(&buf[..split]).to_lowercase(), buf[split..].to_vec())
}

/// A TCP proxy to 127.0.0.1:`upstream` that can be switched off (connections refused, open
/// ones cut) and on again: an S3 outage without losing the server's state.
pub struct Proxy {
    pub port: u16,
    on: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Proxy {
    pub fn start(upstream: u16) -> Proxy {
        use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
        use std::sync::Arc;
        let port = free_port();
        let on = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let (on2, stop2) = (on.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut listener: Option<std::net::TcpListener> = None;
            let mut conns: Vec<std::net::TcpStream> = Vec::new();
            // Bounded: at most 10 minutes of 5 ms steps.
            for _ in 0..120_000 {
                if stop2.load(Relaxed) {
                    break;
                }
                if on2.load(Relaxed) && listener.is_none() {
                    let l = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
                    l.set_nonblocking(true).unwrap();
                    listener = Some(l);
                } else if !on2.load(Relaxed) && listener.is_some() {
                    listener = None;
                    for c in conns.drain(..) {
                        let _ = c.shutdown(std::net::Shutdown::Both);
                    }
                }
                if let Some(l) = &listener {
                    while let Ok((client, _)) = l.accept() {
                        client.set_nonblocking(false).unwrap();
                        let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", upstream)) else { continue };
                        for (mut a, mut b) in [
                            (client.try_clone().unwrap(), server.try_clone().unwrap()),
                            (server.try_clone().unwrap(), client.try_clone().unwrap()),
                        ] {
                            std::thread::spawn(move || {
                                let _ = std::io::copy(&mut a, &mut b);
                                let _ = b.shutdown(std::net::Shutdown::Write);
                            });
                        }
                        conns.push(client);
                        conns.push(server);
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        assert!(wait_for(Duration::from_secs(5), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()));
        Proxy { port, on, stop }
    }

    pub fn set(&self, on: bool) {
        self.on.store(on, std::sync::atomic::Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Peak resident memory of a process, from /proc (VmHWM), in bytes.
pub fn peak_rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = s.lines().find(|l| l.starts_with("VmHWM:")).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

/// A tmpfs mounted at a directory for one test; lazily unmounted on drop.
pub struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    pub fn mount(dir: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        run(Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(dir));
        Tmpfs(dir.to_path_buf())
    }
    pub fn resize(&self, size: &str) {
        run(Command::new("mount").args(["-o", &format!("remount,size={size}")]).arg(&self.0));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Debian sid's Nix (2.34) in the chroot `scripts/setup-sid.sh` makes once, beside the
/// machine's Nix 2.8. Commands run in it in a private mount namespace (`proc`, `/dev`, the
/// temp dir and the test binaries' dir bound in at their own paths, so that paths mean the
/// same inside and out); the chroot's store is its own `/nix`.
pub struct Sid {
    pub root: PathBuf,
}

/// Run by `sh -c` in the new mount namespace: ROOT BIN_DIR TMP_DIR PROGRAM ARGS...
const SID_ENTER: &str = r#"set -e
r=$1 b=$2 t=$3; shift 3
mount -t proc proc "$r/proc"
mount --rbind /dev "$r/dev"
mkdir -p "$r$t" "$r$b"
mount --bind "$t" "$r$t"
mount --bind "$b" "$r$b"
exec chroot "$r" "$@""#;

impl Sid {
    /// The chroot. Where it is missing, build.rs has the tests that need it compiled ignored.
    pub fn get() -> Sid {
        let root = PathBuf::from(std::env::var_os("NARQ_SID_DIR").unwrap_or_else(|| "/var/cache/narq-test/sid".into()));
        assert!(root.join(".narq-ready").exists(), "no Nix 2.34 chroot at {}: scripts/setup.sh makes it (then `touch build.rs`)", root.display());
        let sid = Sid { root };
        // Its Nix database, once (Nix makes it on first use, but not safely from parallel tests).
        static INIT: std::sync::Once = std::sync::Once::new();
        INIT.call_once(|| {
            let conf = TempDir::new("sid-init");
            std::fs::write(conf.join("nix.conf"), "build-users-group =\n").unwrap();
            run(sid.cmd("nix-store").arg("--init").env("NIX_CONF_DIR", conf.path()));
        });
        sid
    }

    /// `prog` (then the caller's arguments) inside the chroot.
    pub fn cmd(&self, prog: impl AsRef<std::ffi::OsStr>) -> Command {
        let bin_dir = bin("narq").parent().unwrap().to_path_buf();
        let mut c = Command::new("unshare");
        c.args(["-m", "--propagation", "private", "sh", "-c", SID_ENTER, "sh"])
            .arg(&self.root)
            .arg(bin_dir)
            .arg(std::env::temp_dir())
            .arg(prog)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        c
    }

    /// `nix ARGS` (2.34) with the nix.conf directory `conf`, and its own cache of what binary
    /// caches hold (Nix's is keyed by URL, and a port reused by a later test would find it).
    pub fn nix(&self, conf: &Path, args: &[&str]) -> Output {
        output(
            self.cmd("nix")
                .args(["--extra-experimental-features", "nix-command"])
                .args(args)
                .env("NIX_CONF_DIR", conf)
                .env("XDG_CACHE_HOME", conf.join("xdg-cache")),
        )
    }

    /// The Nix version in the chroot, e.g. "nix (Nix) 2.34.8".
    pub fn version(&self) -> String {
        std::fs::read_to_string(self.root.join(".narq-ready")).unwrap_or_default().trim().to_string()
    }
}
