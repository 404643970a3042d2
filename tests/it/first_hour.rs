//! Issue 21: what a new user met in the first hour. `narq wait` says what it waited for,
//! `status` counts never go down, errors say what to do next, a second daemon does not take
//! a live daemon's socket, a stopped daemon removes its socket, and the log has no noise.

use crate::util::*;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// A two-path closure built with the hook: a dependency whose build prints a line (a build log
/// with text) and a top path whose build prints nothing (an empty build log).
fn build_two(n: &Narq, tag: &str) -> String {
    let u = unique();
    let dep = sh_drv(&format!("{tag}-dep-{u}"), "echo building the dependency; echo dep > $out");
    let (outs, _) = n.build(&format!("let dep = {dep}; in {}", sh_drv(&format!("{tag}-top-{u}"), "echo ${dep} > $out")));
    outs[0].clone()
}

/// `narq status --json` counters that must never go down.
fn counters(n: &Narq) -> [u64; 4] {
    let s = n.status();
    ["uploaded", "skipped", "logs_uploaded", "bytes"].map(|k| s[k].as_u64().unwrap_or_else(|| panic!("no {k} in {s}")))
}

/// Issue 21 items 3, 4 and 7: after a build that uploaded 2 paths, `narq wait` said
/// "0/0 paths done"; after a `narq push` the counts went down ("uploaded: 4" became
/// "uploaded: 2, skipped: 2", bytes 912 B became 629 B); a new daemon said its disk had room
/// again, and an empty build log was logged as uploaded.
#[test]
fn wait_says_what_it_waited_for_and_status_counts_never_go_down() {
    let mut n = Narq::new("first-wait", "");
    n.start();
    let top = build_two(&n, "first-wait");
    let out = n.narq(&["wait", "--timeout", "60"]);
    let said = stderr(&out);
    assert!(out.status.success(), "{said}\n{}", n.daemon_log());
    assert!(said.contains("narq: since the last wait: 2 paths uploaded, 2 build logs, "), "{said}");
    assert!(!said.contains("0/0"), "{said}");
    let before = counters(&n);
    assert_eq!(before[..3], [2, 0, 2], "{}", n.status());
    // A second wait answers for what came since the first.
    let said = stderr(&n.narq(&["wait", "--timeout", "60"]));
    assert!(said.contains("narq: since the last wait: nothing to upload"), "{said}");

    // `narq push` has the closure checked again: found in the cache, counted as skipped, and
    // nothing counted before goes away.
    let out = n.narq(&["push", "--wait", &top]);
    let said = stderr(&out);
    assert!(out.status.success(), "{said}\n{}", n.daemon_log());
    assert!(said.contains("narq: the closure: 2 paths skipped (already cached or excluded); waited "), "{said}");
    let after = counters(&n);
    assert_eq!(after, [before[0], 2, before[2], before[3]], "{}", n.status());
    let text = String::from_utf8(n.narq(&["status"]).stdout).unwrap();
    assert!(text.contains("uploaded:  2 paths, 2 build logs") && text.contains("skipped:   2 paths"), "{text}");

    let log = n.daemon_log();
    assert!(!log.contains("room again"), "a new daemon's reserve is no news:\n{log}");
    // The dependency's log has a line; the top's is empty and uploaded without a word.
    assert_eq!(log.matches("uploaded the build log").count(), 1, "{log}");
}

/// Issue 21 item 5: errors with no next step.
#[test]
fn errors_say_what_to_do_next() {
    let mut n = Narq::new("first-errors", "");
    let socket = n.socket().display().to_string();
    // No daemon ever started: no socket.
    for cmd in [&["status"][..], &["wait", "--timeout", "1"]] {
        let out = n.narq(cmd);
        let said = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{cmd:?}: {said}");
        assert!(said.contains(&format!("no narq daemon answers on {socket} (the socket does not exist): start one")), "{cmd:?}: {said}");
        assert!(said.contains("narq doctor"), "{said}");
    }
    // A socket file nobody listens on (a daemon that was killed).
    drop(std::os::unix::net::UnixListener::bind(n.socket()).unwrap());
    let said = stderr(&n.narq(&["status"]));
    assert!(said.contains(&format!("no narq daemon answers on {socket} (nothing listens on the socket)")), "{said}");

    // `push` of a file outside the store says so, not "<its directory> is not in /nix/store".
    let file = n.dir.join("notes.txt");
    std::fs::write(&file, "x").unwrap();
    let out = n.narq(&["push", file.to_str().unwrap()]);
    let said = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains(&format!("{} is not in the Nix store (/nix/store) nor a link into it", file.display())), "{said}");

    n.start();
    let out = n.narq(&["pins"]);
    assert!(out.status.success() && out.stdout.is_empty(), "{}", stderr(&out));
    assert!(stderr(&out).contains("narq: no pins in file://") && stderr(&out).contains("narq pin NAME PATH"), "{}", stderr(&out));

    // `rm --dry-run` sizes what stays as `gc` does, in words that agree with the numbers.
    let top = build_two(&n, "first-rm");
    n.wait(60);
    let out = n.narq(&["rm", "--dry-run", &top]);
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{said}{}", stderr(&out));
    let summary = said.lines().last().unwrap();
    assert!(summary.starts_with("rm: would remove 1 path and 1 other object (NARs, listings, logs, roots): "), "{said}");
    assert!(summary.contains("; 1 path stays (") && !summary.ends_with("(0 B)"), "{said}");
}

/// `narq daemon` with `config`, to its end (it must not start): its exit status and stderr.
fn daemon_that_must_not_start(config: &std::path::Path) -> Output {
    let mut child = Command::new(bin("narq"))
        .arg("daemon")
        .env("NARQ_CONFIG", config)
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if !wait_for(Duration::from_secs(20), || child.try_wait().unwrap().is_some()) {
        let _ = child.kill();
        panic!("a second daemon started: {:?}", child.wait_with_output().map(|o| stderr(&o)));
    }
    child.wait_with_output().unwrap()
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill with a pid of our own child.
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
}

/// Issue 21 item 6: a second daemon with the same socket but another state dir took the
/// socket over (the first became unreachable); a daemon stopped with SIGTERM left its socket.
#[test]
fn a_second_daemon_leaves_a_live_socket_alone_and_a_stopped_one_removes_its_own() {
    let mut a = Narq::new("first-sock-a", "");
    a.start();
    let socket = a.socket();
    // Another daemon: its own state dir, the same socket.
    let b = TempDir::new("first-sock-b");
    let b_config = b.join("config.toml");
    let text = std::fs::read_to_string(&a.config).unwrap().replace(&a.dir.join("state").display().to_string(), &b.join("state").display().to_string());
    std::fs::write(&b_config, text).unwrap();
    let out = daemon_that_must_not_start(&b_config);
    let said = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    let want = format!("another narq daemon (pid {}, state dir {}) serves {}: stop it first", a.daemon_pid(), a.dir.join("state").display(), socket.display());
    assert!(said.contains(&want), "{said}");
    assert!(a.narq(&["status"]).status.success(), "the first daemon lost its socket: {said}");

    // SIGTERM: the socket goes with the daemon; then the other may have it.
    let mut d = a.daemon.take().unwrap();
    signal(d.id(), libc::SIGTERM);
    assert!(d.wait().unwrap().success(), "{}", a.daemon_log());
    assert!(!socket.exists(), "SIGTERM left the socket: {}", a.daemon_log());
    assert!(!a.daemon_log().contains("room again"), "{}", a.daemon_log());
    let mut b_daemon = Command::new(bin("narq")).arg("daemon").env("NARQ_CONFIG", &b_config).stdin(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    assert!(wait_for(Duration::from_secs(10), || a.narq(&["status"]).status.success()));
    // SIGINT (Ctrl-C) likewise.
    signal(b_daemon.id(), libc::SIGINT);
    assert!(b_daemon.wait().unwrap().success());
    assert!(!socket.exists(), "SIGINT left the socket");

    // Any other live listener on the socket is refused too, named by its pid.
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let out = daemon_that_must_not_start(&a.config);
    let said = stderr(&out);
    assert!(said.contains(&format!("another process (pid {}: ", std::process::id())) && said.contains(&format!("serves {}", socket.display())), "{said}");
    drop(listener);
    // A daemon killed with -9 leaves its socket, and the next takes it over.
    a.start();
    a.kill9();
    assert!(socket.exists());
    a.start();
}

/// Issue 21 item 8: the example config parses and asks no upstream cache (the privacy advice).
#[test]
fn the_example_config_parses_and_asks_no_upstream() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/non-nixos/config.toml");
    let n = Narq::new("first-example", "");
    let text = std::fs::read_to_string(&path).unwrap().replace("my-cache-1:REPLACE-WITH-THE-CONTENT-OF-my-cache.pub", &n.public_key);
    let config = narq::config::Config::parse(&text, Some(&path)).unwrap_or_else(|e| panic!("{e}"));
    assert!(config.upstream.is_empty(), "{:?}", config.upstream);
    assert!(!config.filters.upstream_keys.is_empty());
}
