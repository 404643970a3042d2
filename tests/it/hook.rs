//! The hook under faults and hostile local users: bounded hand-off, spool safety, key file permissions.

#[allow(unused_imports)]
use crate::util::*;

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The hook's whole hand-off may take 2 s (`hook::DAEMON_TIMEOUT`); this leaves room for a
/// loaded machine, and is far below "forever".
const HOOK_BOUND: Duration = Duration::from_secs(6);

/// Builds a small derivation without the hook (so the test decides when the hook runs).
fn build_plain(n: &Narq, tag: &str) -> String {
    let conf = nix_conf(&n.dir.join("plain"), None);
    let out = nix_build(&conf, &sh_drv(&format!("hook-{tag}"), &format!("echo {tag}-{} > $out", unique())), &[]);
    out.into_iter().next().expect("one output")
}

/// What one run of `narq-hook` did: exit status, stderr, how long it took. It is killed
/// after 20 s (the test then fails on the time).
struct HookRun {
    ok: bool,
    stderr: String,
    took: Duration,
}

fn run_hook(n: &Narq, out_path: &str) -> HookRun {
    let start = Instant::now();
    let mut child = Command::new(bin("narq-hook"))
        .env("OUT_PATHS", out_path)
        .env("DRV_PATH", "")
        .env("NARQ_CONFIG", &n.config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut status = None;
    while start.elapsed() < Duration::from_secs(20) {
        if let Some(s) = child.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = start.elapsed();
    if status.is_none() {
        let _ = child.kill();
        status = Some(child.wait().unwrap());
    }
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    HookRun { ok: status.is_some_and(|s| s.success()), stderr, took }
}

/// The spooled requests (`*.req`) in `dir`.
fn spooled(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "req")).collect())
        .unwrap_or_default()
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()
}

fn euid() -> u32 {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() }
}

/// A Unix socket at `path` that listens and never accepts, its backlog filled: a wedged
/// daemon. Returns the listener and the connections that fill it (kept open).
fn full_listener(path: &Path) -> (OwnedFd, Vec<OwnedFd>) {
    use std::os::unix::ffi::OsStrExt;
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(path.as_os_str().as_bytes()) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    let sock = |flags| unsafe { OwnedFd::from_raw_fd(libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC | flags, 0)) };
    let l = sock(0);
    use std::os::fd::AsRawFd;
    assert_eq!(unsafe { libc::bind(l.as_raw_fd(), (&addr as *const libc::sockaddr_un).cast(), len) }, 0);
    assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 0) }, 0);
    let mut filling = Vec::new();
    // Bounded: a backlog of 0 holds one or two connections.
    for _ in 0..1000 {
        let c = sock(libc::SOCK_NONBLOCK);
        if unsafe { libc::connect(c.as_raw_fd(), (&addr as *const libc::sockaddr_un).cast(), len) } != 0 {
            assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::EAGAIN), "filling the backlog");
            return (l, filling);
        }
        filling.push(c);
    }
    panic!("the backlog never filled");
}

/// Issue 9, item 5: a daemon whose listen backlog is full (it never accepts) made
/// `connect()` block, and the hook with it, forever. Now the whole hand-off is bounded:
/// the hook spools, exits 0 within the bound, and the daemon uploads the spool later.
#[test]
fn hook_spools_when_the_daemon_never_accepts() {
    let mut n = Narq::new("hook-backlog", "");
    let path = build_plain(&n, "backlog");
    let (listener, filling) = full_listener(&n.socket());
    let r = run_hook(&n, &path);
    assert!(r.took < HOOK_BOUND, "the hook took {:?} against a full backlog: {}", r.took, r.stderr);
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "one line: {}", r.stderr);
    assert!(r.stderr.contains("spooled to"), "{}", r.stderr);
    let spool = n.dir.join("state/spool");
    assert_eq!(spooled(&spool).len(), 1);
    eprintln!("hook against a full backlog: {:?}: {}", r.took, r.stderr.trim());

    drop((listener, filling));
    std::fs::remove_file(n.socket()).unwrap();
    n.start();
    n.wait(60);
    assert!(n.has(&path), "the spooled request was not uploaded: {}", n.daemon_log());
}

/// Issue 9, item 5: a daemon that accepts and then says nothing, or trickles its answer a
/// byte at a time (each read got its own timeout, so a trickle kept the hook for as long as
/// the daemon liked). One deadline covers the whole exchange.
#[test]
fn hook_spools_when_the_daemon_does_not_answer_in_time() {
    let n = Narq::new("hook-mute", "");
    let path = build_plain(&n, "mute");
    let spool = n.dir.join("state/spool");
    for (i, trickle) in [true, false].into_iter().enumerate() {
        let _ = std::fs::remove_file(n.socket());
        let listener = std::os::unix::net::UnixListener::bind(n.socket()).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let server = std::thread::spawn(move || {
            let mut held = Vec::new();
            let mut sent = 0u32;
            // Bounded: 30 s of 100 ms steps.
            for _ in 0..300 {
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
                if let Ok((c, _)) = listener.accept() {
                    c.set_nonblocking(false).unwrap();
                    if trickle {
                        // The start of a valid frame with a 1000-byte body, sent slowly.
                        let mut h = narq::protocol::MAGIC.to_vec();
                        h.extend_from_slice(&narq::protocol::VERSION.to_le_bytes());
                        h.extend_from_slice(&1000u32.to_le_bytes());
                        (&c).write_all(&h).unwrap();
                    }
                    held.push(c);
                }
                if trickle {
                    for mut c in &held {
                        let _ = c.write_all(b" ");
                        sent += 1;
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            sent
        });
        let r = run_hook(&n, &path);
        stop.store(true, Ordering::Relaxed);
        let sent = server.join().unwrap();
        let what = if trickle { "trickles its answer" } else { "never answers" };
        assert!(r.took < HOOK_BOUND, "the hook took {:?} against a daemon that {what}: {}", r.took, r.stderr);
        assert!(r.ok, "{}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "one line: {}", r.stderr);
        assert!(r.stderr.contains("spooled to") && r.stderr.contains("in time"), "{}", r.stderr);
        assert_eq!(spooled(&spool).len(), i + 1);
        assert!(!trickle || sent > 0, "the trickling server sent nothing");
        eprintln!("hook against a daemon that {what}: {:?}: {}", r.took, r.stderr.trim());
    }
}

/// Gives `p` to nobody (65534), as if the daemon's user had made it.
fn give_to_nobody(p: &Path) {
    std::os::unix::fs::lchown(p, Some(65534), Some(65534)).unwrap();
}

/// Issue 9, item 7: the daemon's user owns the state dir and can make the hook spool (stop
/// answering). With `spool` a symlink to a root-owned directory, the root hook created a
/// file there. Now it refuses, says so in its one line, and exits 0.
#[test]
fn root_hook_does_not_spool_through_a_planted_symlink() {
    assert_eq!(euid(), 0, "this test plays root and the daemon's user");
    let n = Narq::new("hook-symlink", "");
    let path = build_plain(&n, "symlink");
    let state = n.dir.join("state");
    let victim = n.dir.join("victim");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::create_dir_all(&victim).unwrap();
    give_to_nobody(&state);
    std::os::unix::fs::symlink(&victim, state.join("spool")).unwrap();
    give_to_nobody(&state.join("spool"));

    // No daemon: the hook spools.
    let r = run_hook(&n, &path);
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(entries(&victim), Vec::<String>::new(), "the hook wrote through the symlink: {}", r.stderr);
    assert_eq!(std::fs::metadata(&victim).unwrap().uid(), 0);
    assert_eq!(r.stderr.lines().count(), 1, "one line: {}", r.stderr);
    assert!(r.stderr.contains("spool is a symbolic link, not followed"), "{}", r.stderr);
    assert!(r.stderr.contains("not uploaded"), "{}", r.stderr);
    eprintln!("{}", r.stderr.trim());
}

/// A racer playing the daemon's user: each time `spool` is made in `state`, it moves it
/// away and puts a symlink to `victim` in its place (inotify, as fast as it can; Debian's
/// python3, which nobody can run, unlike a pyenv shim under /root). Exits
/// by itself after 60 s.
const RACER: &str = r#"
import ctypes, os, signal, struct, sys
signal.alarm(60)
state, victim = sys.argv[1], sys.argv[2]
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.inotify_init()
assert libc.inotify_add_watch(fd, state.encode(), 0x100) >= 0  # IN_CREATE
spool, n = os.path.join(state, "spool"), 0
print("ready", flush=True)
while True:
    buf = os.read(fd, 4096)
    i = 0
    while i < len(buf):
        _, mask, _, ln = struct.unpack_from("iIII", buf, i)
        name = buf[i + 16:i + 16 + ln].rstrip(b"\0")
        i += 16 + ln
        if name == b"spool" and mask & 0x40000000:  # IN_ISDIR
            n += 1
            try:
                os.rename(spool, os.path.join(state, "old-%d" % n))
                os.symlink(victim, spool)
            except OSError:
                pass
"#;

/// Issue 9, item 7: the hook made `spool`, then chowned it by path; a racer that swapped a
/// symlink in between got a root-owned directory given to it (and files written there).
/// Now the directory is opened without following and chowned by handle.
#[test]
fn root_hook_never_chowns_or_writes_through_a_swapped_spool_dir() {
    assert_eq!(euid(), 0, "this test plays root and the daemon's user");
    let n = Narq::new("hook-race", "");
    let path = build_plain(&n, "race");
    let state = n.dir.join("state");
    let victim = n.dir.join("victim");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::create_dir_all(&victim).unwrap();
    // nobody must be able to reach the state dir to race in it.
    std::fs::set_permissions(n.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    give_to_nobody(&state);
    let mut racer = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", RACER])
        .arg(&state)
        .arg(&victim)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("setpriv");
    let mut ready = [0u8; 6];
    racer.stdout.take().unwrap().read_exact(&mut ready).unwrap();
    let mut lines = Vec::new();
    for _ in 0..10 {
        let _ = std::fs::remove_file(state.join("spool"));
        let _ = std::fs::remove_dir_all(state.join("spool"));
        let r = run_hook(&n, &path);
        lines.push(r.stderr.trim().to_string());
        assert!(r.ok, "{}", r.stderr);
        let m = std::fs::metadata(&victim).unwrap();
        let wrote = entries(&victim);
        if m.uid() != 0 || !wrote.is_empty() {
            let _ = racer.kill();
            panic!("through the swapped spool dir: victim owned by {}, holds {wrote:?}; hook said: {}", m.uid(), r.stderr);
        }
    }
    let _ = racer.kill();
    let _ = racer.wait();
    let raced = entries(&state).iter().filter(|e| e.starts_with("old-")).count();
    eprintln!("the racer swapped {raced} of 10 spool dirs; the hook said e.g.: {}", lines[0]);
}

/// Issue 9, item 7: the daemon's `tmp/` is wiped and made anew at start; a symlink planted
/// at `tmp` must not make the daemon write elsewhere.
#[test]
fn daemon_does_not_write_through_a_symlink_planted_at_tmp() {
    let mut n = Narq::new("hook-tmp", "");
    let state = n.dir.join("state");
    let victim = n.dir.join("victim");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::create_dir_all(&victim).unwrap();
    std::fs::write(victim.join("keep"), "x").unwrap();
    std::os::unix::fs::symlink(&victim, state.join("tmp")).unwrap();
    n.start();
    let (out, _) = n.build(&sh_drv("hook-tmp", &format!("echo {} > $out", unique())));
    n.wait(60);
    assert!(n.has(&out[0]));
    assert_eq!(entries(&victim), ["keep"]);
    let m = std::fs::symlink_metadata(state.join("tmp")).unwrap();
    assert!(m.is_dir() && m.permissions().mode() & 0o077 == 0, "tmp is {m:?}");
}

/// Issue 9, item 7: between wiping `tmp` and making it again, a symlink put back in the
/// meantime was adopted (`create_dir_all` follows it). A racer plants one as fast as it
/// can while the daemon starts: the daemon must either refuse to start, or have a real,
/// private `tmp`.
#[test]
fn daemon_start_never_adopts_a_symlink_raced_in_at_tmp() {
    let mut n = Narq::new("hook-tmprace", "");
    let state = n.dir.join("state");
    let victim = n.dir.join("victim");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::create_dir_all(&victim).unwrap();
    let (mut refused, mut started) = (0, 0);
    for _ in 0..5 {
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, tmp, target) = (stop.clone(), state.join("tmp"), victim.clone());
        let racer = std::thread::spawn(move || {
            let t = Instant::now();
            while !stop2.load(Ordering::Relaxed) && t.elapsed() < Duration::from_secs(20) {
                let _ = std::os::unix::fs::symlink(&target, &tmp);
            }
        });
        n.spawn_daemon(Command::new(bin("narq")).arg("daemon").env_remove("JOURNAL_STREAM"));
        let up = wait_for(Duration::from_secs(15), || {
            n.daemon.as_mut().unwrap().try_wait().unwrap().is_some() || n.narq(&["status"]).status.success()
        });
        stop.store(true, Ordering::Relaxed);
        racer.join().unwrap();
        assert!(up, "the daemon neither started nor stopped: {}", n.daemon_log());
        let m = std::fs::symlink_metadata(state.join("tmp")).unwrap();
        if n.daemon.as_mut().unwrap().try_wait().unwrap().is_some() {
            n.daemon = None;
            assert!(n.daemon_log().contains("/tmp: "), "{}", n.daemon_log());
            refused += 1;
        } else {
            assert!(!m.file_type().is_symlink(), "the daemon adopted the symlink raced in at tmp");
            assert!(m.is_dir() && m.permissions().mode() & 0o077 == 0, "the daemon runs with tmp = {m:?}");
            n.kill9();
            started += 1;
        }
        let _ = std::fs::remove_file(state.join("tmp"));
    }
    assert_eq!(entries(&victim), Vec::<String>::new());
    eprintln!("with a racer at tmp: the daemon refused to start {refused} times, started with its own tmp {started} times");
}

/// Issue 9, item 7: in a `file://` cache, `nar/` and `log/` replaced by symlinks made the
/// daemon write NARs and logs wherever they pointed. Now it refuses (uploads pause with the
/// cause in `narq status`) and goes on once they are real directories again.
#[test]
fn daemon_does_not_write_through_symlinks_planted_in_a_file_cache() {
    let mut n = Narq::new("hook-cache", "");
    let cache = n.cache();
    let victim = n.dir.join("victim");
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::create_dir_all(&victim).unwrap();
    std::os::unix::fs::symlink(&victim, cache.join("nar")).unwrap();
    std::os::unix::fs::symlink(&victim, cache.join("log")).unwrap();
    n.start();
    let (out, _) = n.build(&sh_drv("hook-cache", &format!("echo {} > $out", unique())));
    let paused = wait_for(Duration::from_secs(30), || {
        // The NAR or the build log, whichever is tried first.
        n.status()["target_error"].as_str().is_some_and(|e| e.contains("nar is a symbolic link, not followed") || e.contains("log is a symbolic link, not followed"))
    });
    assert!(paused, "status: {}\n{}", n.status(), n.daemon_log());
    assert_eq!(entries(&victim), Vec::<String>::new());
    assert!(!n.has(&out[0]));

    // The admin puts real directories back: the upload goes on by itself.
    std::fs::remove_file(cache.join("nar")).unwrap();
    std::fs::remove_file(cache.join("log")).unwrap();
    n.wait(120);
    assert!(n.has(&out[0]));
    assert!(std::fs::symlink_metadata(cache.join("nar")).unwrap().is_dir());
    assert_eq!(entries(&victim), Vec::<String>::new());
    check_closed(&cache).unwrap();
}

/// Issue 9, item 16: a secret key file others may read was used silently. The hook signs
/// with it anyway (a build never suffers) and says so in its one line, once per build.
#[test]
fn hook_warns_about_a_secret_key_others_can_read() {
    let mut n = Narq::new("hook-keymode", "");
    let key = n.dir.join("key.sec");
    n.start();

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (out, stderr) = n.build(&sh_drv("hook-keymode", &format!("echo {} > $out", unique())));
    let said: Vec<&str> = stderr.lines().filter(|l| l.contains("narq-hook: ")).collect();
    assert_eq!(said.len(), 1, "one line from the hook: {stderr}");
    assert!(said[0].contains(&format!("secret key file {} (mode 0644) is open to other users", key.display())), "{}", said[0]);
    n.wait(60);
    assert!(n.has(&out[0]), "signed and uploaded all the same");

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let path = build_plain(&n, "keymode-ok");
    let r = run_hook(&n, &path);
    assert!(r.ok && r.stderr.is_empty(), "a private key says nothing: {}", r.stderr);
}

/// Issue 22: a closure larger than a request's part (`hook::PART_PATHS`, here 4 through
/// `NARQ_TEST_PART_PATHS`) is handed over in parts, references first, spooled as one file of
/// several requests when the daemon is away, and over the socket when it answers: every path
/// arrives, and only the closure's top is a root of the cache (a part's own tops are not).
#[test]
fn a_large_closure_goes_in_parts_with_only_its_top_as_root() {
    let mut n = Narq::new("hook-parts", "");
    let conf = nix_conf(&n.dir.join("plain"), None);
    // 6 leaves, 3 middles over 2 leaves each, a top over the middles: 10 paths.
    let closure_of = |tag: &str| {
        let u = format!("{tag}-{}", unique());
        let leaves: Vec<String> = (0..6).map(|i| sh_drv(&format!("leaf{i}-{u}"), &format!("echo {i} > $out"))).collect();
        let mids: Vec<String> = (0..3)
            .map(|m| format!("(let a = {}; b = {}; in {})", leaves[2 * m], leaves[2 * m + 1], sh_drv(&format!("mid{m}-{u}"), "echo ${a} ${b} > $out")))
            .collect();
        let top = format!("(let m0 = {}; m1 = {}; m2 = {}; in {})", mids[0], mids[1], mids[2], sh_drv(&format!("top-{u}"), "echo ${m0} ${m1} ${m2} > $out"));
        let top = nix_build(&conf, &top, &[]).remove(0);
        assert_eq!(closure(std::slice::from_ref(&top)).len(), 10);
        top
    };
    let config = n.config.clone();
    let push = |top: &str, wait: bool| {
        let mut cmd = Command::new(bin("narq"));
        cmd.arg("push").args(wait.then_some("--wait")).arg(top).env("NARQ_CONFIG", &config).env("NARQ_TEST_PART_PATHS", "4");
        let out = output(scaled(&mut cmd));
        assert!(out.status.success(), "narq push: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let roots = |n: &Narq| -> Vec<String> {
        let mut r: Vec<String> = std::fs::read_dir(n.cache().join("narq/roots")).map_or(vec![], |d| d.map(|e| e.unwrap().file_name().into_string().unwrap()).collect());
        r.sort();
        r
    };

    // The daemon away: one spool file, of parts (4 + 4 + 1 paths, then the top).
    let first = closure_of("spooled");
    assert!(push(&first, false).contains("spooled to"));
    let files = spooled(&n.dir.join("state/spool"));
    assert_eq!(files.len(), 1);
    let mut f = std::io::BufReader::new(std::fs::File::open(&files[0]).unwrap());
    let mut sizes = Vec::new();
    while !std::io::BufRead::fill_buf(&mut f).unwrap().is_empty() {
        match narq::protocol::read::<narq::protocol::Request>(&mut f).unwrap() {
            narq::protocol::Request::Enqueue { paths, part, .. } => sizes.push((paths.len(), part)),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(sizes, [(4, true), (4, true), (1, true), (1, false)]);
    n.start_env(&[("NARQ_LOG", "narq=debug")]);
    n.wait(60);
    assert!(closure(std::slice::from_ref(&first)).iter().all(|p| n.has(p)), "{}", n.daemon_log());
    assert!(wait_for(Duration::from_secs(20), || roots(&n).len() == 1), "roots: {:?}", roots(&n));
    assert_eq!(roots(&n), [hash(&first)]);

    // The daemon up: the parts over the socket, each admitted on its own.
    let second = closure_of("socket");
    let enqueued = |log: &str| log.lines().filter(|l| l.contains("enqueued")).count();
    let before = enqueued(&n.daemon_log());
    push(&second, true);
    assert_eq!(enqueued(&n.daemon_log()) - before, 4, "{}", n.daemon_log());
    let mut want = vec![hash(&first).to_string(), hash(&second).to_string()];
    want.sort();
    assert!(wait_for(Duration::from_secs(20), || roots(&n) == want), "roots: {:?}", roots(&n));
    n.substitute(&second);
}
