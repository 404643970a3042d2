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

pub fn bin(name: &str) -> PathBuf {
    match name {
        "narq" => PathBuf::from(env!("CARGO_BIN_EXE_narq")),
        "narq-hook" => PathBuf::from(env!("CARGO_BIN_EXE_narq-hook")),
        _ => panic!("unknown binary {name}"),
    }
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
