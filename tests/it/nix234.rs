//! What a user of today's Nix sees: narq under Debian sid's Nix 2.34 (in the chroot
//! scripts/setup-sid.sh makes), its hook, its daemon and its store all inside; the cache
//! read back by 2.34 over `s3://` (anonymously: Debian builds it without AWS credentials,
//! and moto takes unsigned requests) and `file://`. The same checks under the machine's
//! Nix 2.8 live beside the features they test (s3, verify, gc, doctor, hook).

use crate::daemon::program_expr;
use crate::filters::{ca_expr, check_build_traces, lines};
use crate::util::*;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Mutex;

/// Held by the test that runs a nix-daemon in the chroot, and by `narq doctor` in the chroot:
/// doctor looks for a nix-daemon among all processes, and the other test's (in the same
/// chroot, with another config) is not the one Nix there would use.
static NIX_DAEMON: Mutex<()> = Mutex::new(());

/// A narq set-up whose daemon, hook and Nix are 2.34's, in the chroot: `Narq` with its
/// commands run inside, and a hook that records the `OUT_PATHS` Nix gave it.
struct Narq234 {
    sid: Sid,
    n: Narq,
}

impl Narq234 {
    /// `store` is the config's store URL; `keys` secret keys sign (for `--sigs-needed`).
    fn new(sid: Sid, tag: &str, store: &str, keys: usize) -> Narq234 {
        let n = Narq::new(tag, &format!("store = \"{store}\""));
        let mut files = vec![n.dir.join("key.sec")];
        let mut public = n.public_key.clone();
        for i in 2..=keys {
            let (sk, pk) = (n.dir.join(format!("key{i}.sec")), n.dir.join(format!("key{i}.pub")));
            run(Command::new(bin("narq")).args(["keygen", &format!("narq-{tag}-{i}"), "--secret-key-file"]).arg(&sk).arg("--public-key-file").arg(&pk));
            public = format!("{public} {}", std::fs::read_to_string(&pk).unwrap().trim());
            files.push(sk);
        }
        let list = files.iter().map(|f| format!("{:?}", f.display().to_string())).collect::<Vec<_>>().join(", ");
        let config = std::fs::read_to_string(&n.config).unwrap();
        let config = config.lines().map(|l| if l.starts_with("secret-key-files") { format!("secret-key-files = [{list}]") } else { l.to_string() }).collect::<Vec<_>>().join("\n");
        std::fs::write(&n.config, config).unwrap();
        // The hook, through a script that keeps what Nix handed it (named as the hook, for
        // `narq doctor`).
        std::fs::create_dir_all(n.dir.join("wrap")).unwrap();
        let hook = n.dir.join("wrap/narq-hook");
        std::fs::write(&hook, format!("#!/bin/sh\necho \"$OUT_PATHS\" >> {}\nexec {}\n", n.dir.join("out-paths").display(), bin("narq-hook").display())).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(
            n.nix_conf.join("nix.conf"),
            format!(
                "sandbox = false\nbuild-users-group =\nexperimental-features = nix-command\nsubstituters =\nmax-jobs = 4\n\
                 trusted-public-keys = {public}\npost-build-hook = {}\n",
                hook.display()
            ),
        )
        .unwrap();
        Narq234 { sid, n }
    }

    fn start(&mut self) {
        let mut cmd = self.sid.cmd(bin("narq"));
        cmd.arg("daemon").env_remove("JOURNAL_STREAM");
        self.n.spawn_daemon(&mut cmd);
        assert!(wait_for(std::time::Duration::from_secs(20), || self.n.narq(&["status"]).status.success()), "daemon did not come up: {}", self.n.daemon_log());
    }

    /// `nix-build` by 2.34 with the hook; the output paths.
    fn build(&self, expr: &str) -> Vec<String> {
        self.build_saying(expr).0
    }

    /// The same, and what Nix said on stderr.
    fn build_saying(&self, expr: &str) -> (Vec<String>, String) {
        let out = output(self.sid.cmd("nix-build").args(["--no-out-link", "-E", expr]).env("NIX_CONF_DIR", &self.n.nix_conf).env("NARQ_CONFIG", &self.n.config));
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success() && !stderr.contains("narq-hook:"), "nix-build (2.34): {stderr}");
        (String::from_utf8(out.stdout).unwrap().lines().map(str::to_string).collect(), stderr)
    }

    /// `narq ARGS` inside the chroot (where the store is).
    fn narq(&self, args: &[&str]) -> Output {
        output(
            self.sid
                .cmd(bin("narq"))
                .args(args)
                .env("NARQ_CONFIG", &self.n.config)
                .env("NIX_CONF_DIR", &self.n.nix_conf)
                .env("AWS_ACCESS_KEY_ID", "test")
                .env("AWS_SECRET_ACCESS_KEY", "test")
                .env("AWS_EC2_METADATA_DISABLED", "true"),
        )
    }

    fn nix(&self, args: &[&str]) -> Output {
        self.sid.nix(&self.n.nix_conf, args)
    }

    /// A fresh store (a directory under the test's) for 2.34 to substitute or copy into.
    fn client(&self) -> PathBuf {
        self.n.dir.join(format!("client-{}", unique()))
    }

    fn public_keys(&self) -> String {
        let conf = std::fs::read_to_string(self.n.nix_conf.join("nix.conf")).unwrap();
        conf.lines().find_map(|l| l.strip_prefix("trusted-public-keys = ")).unwrap().to_string()
    }
}

fn ok(o: &Output, what: &str) -> String {
    assert!(o.status.success(), "{what}: {}\nstdout: {}", String::from_utf8_lossy(&o.stderr), String::from_utf8_lossy(&o.stdout));
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn python(script: &str) -> String {
    run(Command::new(venv_bin("python")).args(["-c", script]))
}

/// boto3 against moto at `port`, with `body` run after `s3 = …`.
fn boto(port: u16, body: &str) -> String {
    python(&format!(
        "import boto3\ns3 = boto3.client('s3', endpoint_url='http://127.0.0.1:{port}', aws_access_key_id='test', \
         aws_secret_access_key='test', region_name='us-east-1')\n{body}"
    ))
}

/// Issue 19 item 1, over `s3://`: the hook under 2.34 (which sets OUT_PATHS), then 2.34
/// substitutes, verifies with two signatures, shows the build log and copies from the
/// bucket; `narq doctor` passes against 2.34's nix.conf; a bucket after `narq gc` verifies
/// under 2.34; and on a damaged cache `narq verify --deep` and 2.34's `nix store verify`
/// agree.
#[test]
#[cfg_attr(narq_no_sid, ignore = "needs the Nix 2.34 chroot: scripts/setup.sh makes it (NARQ_SID_DIR names another)")]
fn nix234_over_s3_hook_substitute_verify_log_copy_doctor_gc_damage() {
    let sid = Sid::get();
    eprintln!("{}", sid.version());
    let t = TempDir::new("n234s3");
    let moto = Moto::start(t.path(), &[]);
    moto.bucket("narq-n234");
    let s3 = format!("s3://narq-n234?endpoint=http://127.0.0.1:{}&region=us-east-1", moto.port);
    let mut n = Narq234::new(sid, "n234", &s3, 2);
    n.start();

    // The hook, under 2.34: Nix sets OUT_PATHS (2.8 left it empty).
    let outs = n.build(&program_expr("n234"));
    let extra = n.build(&sh_drv(&format!("n234-extra-{}", unique()), "echo extra > $out"));
    let handed = std::fs::read_to_string(n.n.dir.join("out-paths")).unwrap();
    assert!(handed.lines().any(|l| l.split(' ').any(|p| p == outs[0])), "OUT_PATHS did not name {}: {handed:?}", outs[0]);
    n.n.wait(60);

    // Substitution by 2.34 over s3://, into a fresh store.
    let keys = n.public_keys();
    let client = n.client();
    let c = client.display().to_string();
    ok(&output(n.sid.cmd("nix-store").args(["--store", &c, "-r", &outs[0], "--option", "substituters", &s3, "--option", "trusted-public-keys", &keys]).env("NIX_CONF_DIR", &n.n.nix_conf).env("XDG_CACHE_HOME", n.n.nix_conf.join("xdg-cache"))), "substitution by 2.34 over s3://");
    assert!(client.join(&outs[0][1..]).join("bin/hello").exists());

    // Both signatures verify; the closure's contents match.
    ok(&n.nix(&["store", "verify", "-r", "--sigs-needed", "2", "--store", &s3, &outs[0]]), "nix store verify --sigs-needed 2 over s3://");

    // The build log narq uploaded (gzip-encoded), as 2.34 shows it.
    let log = ok(&n.nix(&["log", "--store", &s3, &outs[0]]), "nix log --store s3:// (2.34)");
    assert!(log.contains("building the program"), "nix log: {log:?}");

    // nix copy --from s3://.
    let c2 = n.client().display().to_string();
    ok(&n.nix(&["copy", "--from", &s3, "--to", &c2, &outs[0]]), "nix copy --from s3://");

    // narq doctor against 2.34's nix.conf: Nix runs the hook.
    let doctor = {
        let _alone = NIX_DAEMON.lock().unwrap_or_else(|e| e.into_inner());
        n.narq(&["doctor"])
    };
    let text = String::from_utf8_lossy(&doctor.stdout);
    let nix_line = text.lines().find(|l| l.contains("nix")).unwrap_or("");
    assert!(nix_line.contains("post-build-hook") && !nix_line.to_lowercase().contains("fail"), "doctor under 2.34:\n{text}\n{}", String::from_utf8_lossy(&doctor.stderr));

    // narq gc keeps the pinned closure, removes the rest; 2.34 verifies what stays.
    ok(&n.narq(&["pin", "prog", &outs[0]]), "narq pin");
    ok(&n.narq(&["gc", "--keep-days", "0", "--grace", "0s"]), "narq gc");
    let gone = http(moto.port, "GET", &format!("/narq-n234/{}.narinfo", hash(&extra[0]))).0;
    assert!(gone.starts_with("http/1.1 404"), "gc kept an unpinned path: {gone}");
    ok(&n.nix(&["store", "verify", "-r", "--sigs-needed", "2", "--store", &s3, &outs[0]]), "nix store verify after narq gc");

    // A damaged NAR (the library's): both verifiers find it, and name the same path.
    let lib = run(n.sid.cmd("nix-store").args(["-q", "--references", &outs[0]]).env("NIX_CONF_DIR", &n.n.nix_conf)).lines().find(|l| l.contains("-lib-")).unwrap().to_string();
    let (_, ni) = http(moto.port, "GET", &format!("/narq-n234/{}.narinfo", hash(&lib)));
    let url = narq::nix::NarInfo::parse(std::str::from_utf8(&ni).unwrap()).unwrap().url;
    boto(moto.port, &format!("body = s3.get_object(Bucket='narq-n234', Key='{url}')['Body'].read()\ns3.put_object(Bucket='narq-n234', Key='{url}', Body=body[:-8] + b'narq-bad')"));
    let nix_says = n.nix(&["store", "verify", "-r", "--store", &s3, &outs[0]]);
    let narq_says = n.narq(&["verify", "--deep", "--json", &outs[0], "-r"]);
    let nix_err = String::from_utf8_lossy(&nix_says.stderr).to_string();
    let narq_out = String::from_utf8_lossy(&narq_says.stdout).to_string();
    assert!(!nix_says.status.success() && nix_err.contains(&lib[11..]), "2.34 did not find the damage in {lib}: {nix_err}");
    assert_eq!(narq_says.status.code(), Some(1), "narq verify: {narq_out}\n{}", String::from_utf8_lossy(&narq_says.stderr));
    assert!(narq_out.contains(&lib[11..]), "narq verify did not name {lib}: {narq_out}");
}

/// Issue 19 item 1, over `file://`: the hook under 2.34, then 2.34 substitutes from the
/// directory and shows the build log (stored plain there).
#[test]
#[cfg_attr(narq_no_sid, ignore = "needs the Nix 2.34 chroot: scripts/setup.sh makes it (NARQ_SID_DIR names another)")]
fn nix234_over_file_hook_substitute_log() {
    let sid = Sid::get();
    let t = TempDir::new("n234file");
    let cache = t.join("cache");
    let file = format!("file://{}", cache.display());
    let mut n = Narq234::new(sid, "n234f", &file, 1);
    n.start();
    let outs = n.build(&program_expr("n234f"));
    n.n.wait(60);
    let client = n.client().display().to_string();
    ok(&output(n.sid.cmd("nix-store").args(["--store", &client, "-r", &outs[0], "--option", "substituters", &file]).env("NIX_CONF_DIR", &n.n.nix_conf).env("XDG_CACHE_HOME", n.n.nix_conf.join("xdg-cache"))), "substitution by 2.34 over file://");
    let log = ok(&n.nix(&["log", "--store", &file, &outs[0]]), "nix log --store file:// (2.34)");
    assert!(log.contains("building the program"), "{log:?}");
}

/// The fields of a narinfo that compression does not change.
fn invariant(narinfo: &str) -> Vec<String> {
    let mut v: Vec<String> = narinfo
        .lines()
        .filter(|l| !["URL:", "Compression:", "FileHash:", "FileSize:"].iter().any(|k| l.starts_with(k)))
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

/// Issue 19 item 1: what narq writes is what 2.34's own `nix copy --to s3://` writes, for
/// what compression does not change: the narinfo (signatures included), the `.ls` listing,
/// and `nix-cache-info`.
#[test]
#[cfg_attr(narq_no_sid, ignore = "needs the Nix 2.34 chroot: scripts/setup.sh makes it (NARQ_SID_DIR names another)")]
fn nix234_narinfo_and_listing_equal_nix_copy() {
    let sid = Sid::get();
    let t = TempDir::new("n234eq");
    let moto = Moto::start(t.path(), &[]);
    moto.bucket("narq-n234eq");
    moto.bucket("nix-n234eq");
    let s3 = |b: &str, extra: &str| format!("s3://{b}?endpoint=http://127.0.0.1:{}&region=us-east-1&write-nar-listing=true{extra}", moto.port);
    let mut n = Narq234::new(sid, "n234eq", &s3("narq-n234eq", ""), 1);
    n.start();
    let outs = n.build(&format!(
        "let dep = {}; in {}",
        sh_drv(&format!("n234eq-dep-{}", unique()), "echo dep > $out"),
        sh_drv(&format!("n234eq-{}", unique()), "mkdir -p $out/sub; echo hi > $out/sub/f; ln -s f $out/sub/l; echo ${dep} > $out/ref")
    ));
    n.n.wait(60);
    let key = n.n.dir.join("key.sec").display().to_string();
    ok(&n.nix(&["copy", "--to", &s3("nix-n234eq", &format!("&secret-key={key}")), &outs[0]]), "nix copy --to s3:// (2.34)");
    let get = |b: &str, k: &str| {
        let (head, body) = http(moto.port, "GET", &format!("/{b}/{k}"));
        assert!(head.starts_with("http/1.1 200"), "{b}/{k}: {head}");
        String::from_utf8(body).unwrap()
    };
    let closure = run(n.sid.cmd("nix-store").args(["-qR", &outs[0]]).env("NIX_CONF_DIR", &n.n.nix_conf));
    for p in closure.lines() {
        let (ours, nix) = (get("narq-n234eq", &format!("{}.narinfo", hash(p))), get("nix-n234eq", &format!("{}.narinfo", hash(p))));
        assert_eq!(invariant(&ours), invariant(&nix), "narinfo of {p}:\nnarq:\n{ours}\nnix 2.34:\n{nix}");
        let (ours, nix) = (get("narq-n234eq", &format!("{}.ls", hash(p))), get("nix-n234eq", &format!("{}.ls", hash(p))));
        let (a, b): (serde_json::Value, serde_json::Value) = (serde_json::from_str(&ours).unwrap(), serde_json::from_str(&nix).unwrap());
        assert_eq!(a, b, ".ls of {p}");
    }
    assert_eq!(get("narq-n234eq", "nix-cache-info"), get("nix-n234eq", "nix-cache-info"));
}

/// Issue 19 item 4 under 2.34: a content-addressed build (`ca-derivations`) by 2.34 with the
/// hook uploads both layouts; a fresh 2.34 client substitutes it from `realisations/` without
/// building (`--max-jobs 0`), and the build traces are keyed by the derivation 2.34 resolved
/// the top one to (the path 2.35 resolves it to: same resolution), byte for byte as 2.35
/// writes them.
#[test]
#[cfg_attr(narq_no_sid, ignore = "needs the Nix 2.34 chroot: scripts/setup.sh makes it (NARQ_SID_DIR names another)")]
fn nix234_ca_derivation_uploads_both_layouts_and_is_substituted() {
    let sid = Sid::get();
    let t = TempDir::new("n234ca");
    let cache = t.join("cache");
    let file = format!("file://{}", cache.display());
    let mut n = Narq234::new(sid, "n234ca", &file, 1);
    let conf = n.n.nix_conf.join("nix.conf");
    std::fs::write(&conf, std::fs::read_to_string(&conf).unwrap() + "extra-experimental-features = ca-derivations\n").unwrap();
    n.start();
    let (u, marker) = (unique(), t.join("builds.log"));
    let expr = t.join("ca.nix");
    std::fs::write(&expr, ca_expr(&u, &marker)).unwrap();
    let (outs, stderr) = n.build_saying(&std::fs::read_to_string(&expr).unwrap());
    assert_eq!(lines(&marker), 2, "both derivations built");
    n.n.wait(60);
    let dep = std::fs::read_to_string(n.sid.root.join(&outs[0][1..]).join("dep")).unwrap();
    check_build_traces(&cache, &stderr, &outs[0], dep.trim(), &n.n.public_key);
    assert!(std::fs::read_dir(cache.join("realisations")).unwrap().count() >= 2);

    let client = n.client().display().to_string();
    let built = n.nix(&[
        "--extra-experimental-features", "ca-derivations", "build", "--no-link", "--max-jobs", "0", "--store", &client,
        "-f", &expr.display().to_string(), "--option", "substituters", &file, "--option", "trusted-public-keys", &n.public_keys(),
    ]);
    ok(&built, "substitution of a CA build by 2.34 from realisations/");
    assert!(std::path::Path::new(&client).join(&outs[0][1..]).join("dep").exists());
    assert_eq!(lines(&marker), 2, "a builder ran on the client");
}

/// Nix 2.34's `nix-daemon` in the chroot (multi-user Nix): its own mount namespace, its
/// socket in the test's directory (`NIX_DAEMON_SOCKET_PATH`, which client and daemon both
/// read: tests run in parallel, and the default path would be shared), and the environment
/// it is given — which is the hook's.
struct NixDaemon {
    child: std::process::Child,
    socket: PathBuf,
    log: PathBuf,
}

impl NixDaemon {
    fn start(sid: &Sid, dir: &std::path::Path, env: &[(&str, &std::path::Path)]) -> NixDaemon {
        let (socket, log) = (dir.join("nix-daemon.sock"), dir.join("nix-daemon.log"));
        let f = std::fs::File::create(&log).unwrap();
        let child = sid
            .cmd("nix-daemon")
            .env("NIX_DAEMON_SOCKET_PATH", &socket)
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap();
        let d = NixDaemon { child, socket, log };
        let up = wait_for(std::time::Duration::from_secs(20), || std::os::unix::net::UnixStream::connect(&d.socket).is_ok());
        assert!(up, "nix-daemon (2.34) did not come up: {}", std::fs::read_to_string(&d.log).unwrap_or_default());
        d
    }
}

impl Drop for NixDaemon {
    fn drop(&mut self) {
        // `unshare`, `sh` and `chroot` exec'd it: the child is nix-daemon itself.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Issue 19 item 1, multi-user: a user (not root) builds through 2.34's nix-daemon; the hook
/// runs under the daemon, as root, with the daemon's environment (the client has no
/// `NARQ_CONFIG`, no `post-build-hook`), hands the build to narq, and a fresh 2.34 client
/// substitutes what narq uploaded.
#[test]
#[cfg_attr(narq_no_sid, ignore = "needs the Nix 2.34 chroot: scripts/setup.sh makes it (NARQ_SID_DIR names another)")]
fn nix234_under_nix_daemon_a_user_s_build_is_uploaded_and_substituted() {
    let _alone = NIX_DAEMON.lock().unwrap_or_else(|e| e.into_inner());
    let sid = Sid::get();
    let t = TempDir::new("n234d");
    let cache = t.join("cache");
    let file = format!("file://{}", cache.display());
    let mut n = Narq234::new(sid, "n234d", &file, 1);
    n.start();
    // The hook records who ran it and what it was given.
    let runs = n.n.dir.join("hook-runs");
    let hook = n.n.dir.join("wrap/narq-hook");
    std::fs::write(&hook, format!("#!/bin/sh\necho \"$(id -u) $NARQ_CONFIG $OUT_PATHS\" >> {}\nexec {}\n", runs.display(), bin("narq-hook").display())).unwrap();
    let daemon = NixDaemon::start(&n.sid, t.path(), &[("NIX_CONF_DIR", &n.n.nix_conf), ("NARQ_CONFIG", &n.n.config)]);

    // The user: nobody, with a nix.conf of its own that names no hook.
    let home = t.join("home");
    std::fs::create_dir_all(home.join("conf")).unwrap();
    std::fs::write(home.join("conf/nix.conf"), "experimental-features = nix-command\n").unwrap();
    std::os::unix::fs::chown(&home, Some(65534), Some(65534)).unwrap();
    let built = output(
        n.sid
            .cmd("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "nix-build", "--no-out-link", "-E", &program_expr("n234d")])
            .env("NIX_REMOTE", format!("unix://{}", daemon.socket.display()))
            .env("NIX_CONF_DIR", home.join("conf"))
            .env("HOME", &home)
            .env("XDG_CACHE_HOME", home.join("cache"))
            .env_remove("NARQ_CONFIG"),
    );
    let stderr = String::from_utf8_lossy(&built.stderr);
    assert!(built.status.success() && !stderr.contains("narq-hook:"), "a user's build through nix-daemon (2.34): {stderr}\n{}", std::fs::read_to_string(&daemon.log).unwrap_or_default());
    let outs: Vec<String> = String::from_utf8(built.stdout).unwrap().lines().map(str::to_string).collect();
    let seen = std::fs::read_to_string(&runs).unwrap_or_default();
    let mine = format!("0 {} ", n.n.config.display());
    assert!(seen.lines().any(|l| l.starts_with(&mine) && l.ends_with(&outs[0])), "the hook did not run as root with the daemon's NARQ_CONFIG for {}: {seen:?}", outs[0]);
    n.n.wait(60);

    let client = n.client().display().to_string();
    ok(&output(n.sid.cmd("nix-store").args(["--store", &client, "-r", &outs[0], "--option", "substituters", &file, "--option", "trusted-public-keys", &n.public_keys()]).env("NIX_CONF_DIR", &n.n.nix_conf).env("XDG_CACHE_HOME", n.n.nix_conf.join("xdg-cache"))), "substitution by 2.34 of a build done through nix-daemon");
    assert!(std::path::Path::new(&client).join(&outs[0][1..]).join("bin/hello").exists());
    assert_eq!(check_closed(&cache), Ok(2));
}
