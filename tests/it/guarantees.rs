//! Nothing lost, nothing silently missing: store changes, dropped builds, transient errors,
//! wait verdicts.

use crate::daemon::program_expr;
use crate::util::*;
use std::process::Command;
use std::time::Duration;

/// Adds `line` to the config file.
fn configure(n: &Narq, line: &str) {
    let mut text = std::fs::read_to_string(&n.config).unwrap();
    text.push_str(line);
    text.push('\n');
    std::fs::write(&n.config, text).unwrap();
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn narinfo_in(cache: &std::path::Path, path: &str) -> bool {
    cache.join(format!("{}.narinfo", &path[11..43])).exists()
}

/// Issue 9.1: the queue's "uploaded" belongs to the store it uploaded to.
#[test]
fn a_new_store_gets_whole_closures() {
    let mut n = Narq::new("newstore", "");
    n.start();
    let u = unique();
    let lib = sh_drv(&format!("newstore-lib-{u}"), "echo 'echo shared' > $out");
    let app = |name: &str| format!("let lib = {lib}; in {}", sh_drv(&format!("newstore-{name}-{u}"), "echo . ${lib} > $out"));
    let (first, _) = n.build(&app("one"));
    n.wait(60);
    assert!(n.has(&first[0]));
    // The user moves to another cache with the same state dir.
    let second_cache = n.dir.join("second-cache");
    configure(&n, &format!("store = \"file://{}\"", second_cache.display()));
    n.kill9();
    n.start();
    // A new build over the same library: its closure must be whole in the new cache.
    let (two, log) = n.build(&app("two"));
    assert!(!log.contains("narq-hook:"), "{log}");
    n.wait(60);
    for p in closure(&two) {
        assert!(narinfo_in(&second_cache, &p), "{p} missing from the new cache");
    }
    check_closed(&second_cache).unwrap();
    n.substitute_from(&two[0], &format!("file://{}", second_cache.display()));
    // `narq push` of a path uploaded only to the old cache ends with it in the new one.
    let push = n.narq(&["push", "--wait", &first[0]]);
    assert!(push.status.success(), "{}", stderr(&push));
    assert!(narinfo_in(&second_cache, &first[0]));
    // And a path deleted from the cache behind the daemon's back comes back with a push.
    std::fs::remove_file(second_cache.join(format!("{}.narinfo", &first[0][11..43]))).unwrap();
    let push = n.narq(&["push", "--wait", &first[0]]);
    assert!(push.status.success(), "{}", stderr(&push));
    assert!(narinfo_in(&second_cache, &first[0]), "push did not upload a path deleted from the cache");
    assert_eq!(check_closed(&second_cache).unwrap(), 3);
}

/// Issue 9.2 and 9.6: a build the hook could not hand over (no key, an unreadable Nix
/// database) is reported by status and wait, naming the path, and `narq retry` uploads it
/// once the cause is fixed.
#[test]
fn dropped_builds_are_reported_until_retried() {
    let mut n = Narq::new("dropped", "");
    let key = n.dir.join("key.sec");
    configure(&n, &format!("public-keys = [\"{}\"]", n.public_key));
    n.start();
    // The key is missing: the build succeeds, the hook says so in one line.
    std::fs::rename(&key, n.dir.join("key.away")).unwrap();
    let (outs, err) = n.build(&program_expr("dropped"));
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("narq-hook:")).collect();
    assert!(!lines.is_empty() && lines.iter().all(|l| l.contains("not uploaded") && l.contains("narq retry")), "{err}");
    let s = n.status();
    assert!(s["failed"].as_u64().unwrap() >= 1, "{s}");
    let failures = s["recent_failures"].to_string();
    assert!(failures.contains(&outs[0]) && failures.contains("key.sec"), "{failures}");
    let wait = n.narq(&["wait", "--timeout", "30"]);
    assert_eq!(wait.status.code(), Some(1), "{}", stderr(&wait));
    assert!(stderr(&wait).contains(&outs[0]), "{}", stderr(&wait));

    // A Nix database the hook cannot read (another schema): one line, recorded too.
    let db_dir = n.dir.join("nix-state/db");
    std::fs::create_dir_all(&db_dir).unwrap();
    run(Command::new("sqlite3").arg(db_dir.join("db.sqlite")).arg("CREATE TABLE Other (x);"));
    std::fs::rename(n.dir.join("key.away"), &key).unwrap();
    let other = nix_build(&nix_conf(n.dir.path(), None), &sh_drv(&format!("dropped-db-{}", unique()), "echo db > $out"), &[]);
    let drv = run(Command::new("nix-store").args(["-q", "--deriver", &other[0]])).trim().to_string();
    let hook = output(
        Command::new(bin("narq-hook"))
            .env("NARQ_CONFIG", &n.config)
            .env("NIX_STATE_DIR", n.dir.join("nix-state"))
            .env("OUT_PATHS", &other[0])
            .env("DRV_PATH", &drv),
    );
    assert!(hook.status.success());
    let line = stderr(&hook);
    assert_eq!(line.lines().count(), 1, "{line}");
    assert!(line.contains("Nix database") && line.contains("no such table") && line.contains("narq retry"), "{line}");
    assert!(n.status()["recent_failures"].to_string().contains(&other[0]));

    // Fixed: `narq retry` hands both builds over, and everything lands.
    let retry = n.narq(&["retry"]);
    assert!(retry.status.success(), "{}", stderr(&retry));
    n.wait(60);
    for p in closure(&outs).iter().chain(&other) {
        assert!(n.has(p), "{p} missing after retry");
    }
    n.substitute(&outs[0]);
    assert_eq!(n.status()["failed"], 0);
    let again = n.narq(&["retry"]);
    assert!(again.status.success() && stderr(&again).contains("no dropped builds"), "{}", stderr(&again));
}

/// Issue 9.4 and 9.18: `narq wait` answers for what it waits for, not for every failure ever
/// recorded; `narq status` shows root causes before their consequences.
#[test]
fn wait_answers_for_its_own_and_status_shows_causes_first() {
    let mut n = Narq::new("verdict", "");
    n.start();
    let u = unique();
    let expr = format!(
        "let lib = {}; in {}",
        sh_drv(&format!("verdict-lib-{u}"), "echo original > $out"),
        sh_drv(&format!("verdict-app-{u}"), "echo ${lib} > $out")
    );
    let outs = nix_build(&nix_conf(n.dir.path(), None), &expr, &[]);
    let lib = closure(&outs).into_iter().find(|p| p.contains("verdict-lib")).unwrap();
    std::fs::set_permissions(&lib, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    std::fs::write(&lib, "tampered\n").unwrap();
    let push = n.narq(&["push", "--wait", &outs[0]]);
    assert_eq!(push.status.code(), Some(1), "{}", stderr(&push));
    // Causes first: the library's own error, then the app that depends on it.
    let s = n.status();
    let f = s["recent_failures"].as_array().unwrap();
    assert_eq!(f[0]["item"], lib.as_str(), "{s}");
    assert!(f[0]["error"].as_str().unwrap().contains("do not match"), "{s}");
    assert!(f[1]["error"].as_str().unwrap().contains("depends on") && f[1]["error"].as_str().unwrap().contains("do not match"), "{s}");
    let human = String::from_utf8_lossy(&n.narq(&["status"]).stdout).to_string();
    let (cause, effect) = (human.find(&format!("{lib}: contents")).unwrap(), human.find(&format!("{}: depends on", outs[0])).unwrap());
    assert!(cause < effect, "{human}");

    // The first wait reports the failures; a later one after a fresh, good build does not.
    let wait = n.narq(&["wait", "--timeout", "30"]);
    assert_eq!(wait.status.code(), Some(1));
    assert!(stderr(&wait).contains(&lib));
    let (good, _) = n.build(&program_expr("verdict-good"));
    n.wait(60);
    let pushed = n.narq(&["push", "--wait", &good[0]]);
    assert!(pushed.status.success(), "{}", stderr(&pushed));
    // Waiting for the broken closure still says what is wrong with it.
    let again = n.narq(&["push", "--wait", &outs[0]]);
    assert_eq!(again.status.code(), Some(1));
    assert!(stderr(&again).contains(&lib), "{}", stderr(&again));
    let _ = Command::new("nix-store").args(["--delete", &outs[0], &lib]).output();
}

/// Issue 9.3: a build made while the state disk is full is uploaded once space is back,
/// with no manual step.
#[test]
fn a_full_state_disk_delays_uploads_and_loses_nothing() {
    let mut n = Narq::new("diskfull", "");
    let state = n.dir.join("state");
    let _tmpfs = Tmpfs::mount(&state, "300M");
    let cache = n.dir.join("cache");
    configure(&n, &format!("store = \"file://{}\"", cache.display()));
    n.start();
    // Fill the state disk to the last byte.
    let fill = state.join("fill");
    let _ = Command::new("dd").args(["if=/dev/zero", "bs=64k"]).arg(format!("of={}", fill.display())).output();
    let (outs, err) = n.build(&program_expr("diskfull"));
    // The daemon could not store the request and said so; the hook spooled it in the room
    // the reserve left.
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("narq-hook:")).collect();
    assert!(!lines.is_empty() && lines.iter().all(|l| l.contains("could not store") && l.contains("spooled to")), "{err}");
    assert!(!state.join("reserve").exists());
    std::thread::sleep(Duration::from_secs(2));
    // Space comes back; nothing else is done by hand.
    std::fs::remove_file(&fill).unwrap();
    n.wait(120);
    for p in closure(&outs) {
        assert!(narinfo_in(&cache, &p), "{p} lost while the disk was full:\n{err}\n{}", n.daemon_log());
    }
    n.substitute_from(&outs[0], &format!("file://{}", cache.display()));
    assert!(wait_for(Duration::from_secs(10), || state.join("reserve").exists()), "the reserve did not come back");
    n.kill9();
}

/// A small deterministic generator: the soak test prints its seed, so a failure can be replayed
/// (`NARQ_SOAK_SEED`).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Issue 9, "Done when": hooks, pushes, daemon restarts and `kill -9` at random moments, with
/// the state disk filling and emptying. Afterwards every path a hook saw is in the cache (or
/// reported), the cache was closed under references at every look, and `nix store verify`
/// accepts it.
#[test]
fn soak_hooks_pushes_kills_and_a_filling_disk() {
    let seed = std::env::var("NARQ_SOAK_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| unique()[10..].parse::<u64>().unwrap() | 1);
    eprintln!("soak seed: {seed} (NARQ_SOAK_SEED={seed} replays it)");
    let mut rng = Rng(seed);
    let mut n = Narq::new("soak", "");
    let state = n.dir.join("state");
    let _tmpfs = Tmpfs::mount(&state, "300M");
    let cache = n.dir.join("cache");
    configure(&n, &format!("store = \"file://{}\"\npublic-keys = [\"{}\"]", cache.display(), n.public_key));

    // 24 libraries and 24 apps over two libraries each, built without the hook; the hook is
    // then run for each build as Nix runs it, at random moments.
    let u = unique();
    let expr = format!(
        "let lib = i: {}; app = i: {}; in (builtins.genList lib 24) ++ (builtins.genList app 24)",
        sh_drv(&format!("soak-lib-${{toString i}}-{u}"), "mkdir $out; head -c 30000 /dev/urandom > $out/data"),
        sh_drv(&format!("soak-app-${{toString i}}-{u}"), "echo ${lib i} ${lib (if i < 20 then i + 4 else 0)} > $out")
    );
    let outs = nix_build(&nix_conf(n.dir.path(), None), &expr, &[]);
    assert_eq!(outs.len(), 48);
    let drvs: Vec<String> =
        outs.iter().map(|p| run(Command::new("nix-store").args(["-q", "--deriver", p])).trim().to_string()).collect();
    let mut order: Vec<usize> = (0..outs.len()).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (cache, stop) = (cache.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut looks = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && looks < 200_000 {
                check_closed(&cache).unwrap_or_else(|e| panic!("cache not closed: {e}"));
                looks += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            looks
        })
    };

    n.start();
    let fill = state.join("fill");
    let mut hooks: Vec<std::process::Child> = Vec::new();
    let (mut kills, mut restarts, mut fills, mut pushes) = (0, 0, 0, 0);
    let started = std::time::Instant::now();
    for (step, &i) in order.iter().enumerate() {
        assert!(started.elapsed() < Duration::from_secs(180), "the soak ran out of time at step {step}");
        let out_paths = if rng.below(2) == 0 { outs[i].as_str() } else { "" };
        hooks.push(
            Command::new(bin("narq-hook"))
                .env("NARQ_CONFIG", &n.config)
                .env("OUT_PATHS", out_paths)
                .env("DRV_PATH", &drvs[i])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap(),
        );
        match rng.below(12) {
            0 | 1 if n.daemon.is_some() => {
                std::thread::sleep(Duration::from_millis(rng.below(300)));
                n.kill9();
                kills += 1;
            }
            2 if n.daemon.is_some() => {
                let pid = n.daemon_pid().to_string();
                run(Command::new("kill").args(["-TERM", &pid]));
                let _ = n.daemon.take().unwrap().wait();
                restarts += 1;
            }
            // Something else fills the disk, while narq's reserve is there (without it, a full
            // disk leaves nowhere to keep a request; the hook's line says so).
            3 if !fill.exists() && state.join("reserve").exists() => {
                let _ = Command::new("dd").args(["if=/dev/zero", "bs=64k"]).arg(format!("of={}", fill.display())).output();
                fills += 1;
            }
            4 => {
                let _ = std::fs::remove_file(&fill);
            }
            5 if n.daemon.is_some() => {
                let p = &outs[rng.below(outs.len() as u64) as usize];
                let push = n.narq(&["push", p]);
                // On a full disk a push may fail, loudly; the hooks' builds must not.
                assert!(push.status.success() || fill.exists(), "narq push: {}", String::from_utf8_lossy(&push.stderr));
                pushes += 1;
            }
            _ => {}
        }
        if n.daemon.is_none() && rng.below(2) == 0 {
            n.start();
        }
        std::thread::sleep(Duration::from_millis(rng.below(150)));
    }
    let mut said = String::new();
    for h in hooks {
        let out = h.wait_with_output().unwrap();
        assert!(out.status.success());
        assert!(out.stderr.iter().filter(|&&b| b == b'\n').count() <= 1, "{}", String::from_utf8_lossy(&out.stderr));
        said.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    // The disk has room again and the daemon runs: everything lands with no manual step but
    // `narq retry` for builds the hook could not hand over (none are expected).
    let _ = std::fs::remove_file(&fill);
    if n.daemon.is_none() {
        n.start();
    }
    n.wait(180);
    let status = n.status();
    eprintln!("soak: {kills} kill -9, {restarts} restarts, {fills} full disks, {pushes} pushes; status {status}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let looks = watcher.join().unwrap();
    assert!(looks > 10, "the watcher looked only {looks} times");
    let reported = status["recent_failures"].to_string();
    let everything = closure(&outs);
    for p in &everything {
        assert!(narinfo_in(&cache, p) || reported.contains(p.as_str()), "{p} is neither in the cache nor reported\nhooks said:\n{said}\n{}", n.daemon_log());
    }
    assert_eq!(status["failed"], 0, "{status}");
    assert_eq!(check_closed(&cache).unwrap(), everything.len());
    let verify = output(
        Command::new("nix")
            .args(["store", "verify", "--store", &format!("file://{}", cache.display()), "--sigs-needed", "1"])
            .args(["--option", "trusted-public-keys", &n.public_key])
            .args(&everything)
            .env("NIX_CONF_DIR", &n.nix_conf),
    );
    assert!(verify.status.success(), "nix store verify: {}", String::from_utf8_lossy(&verify.stderr));
}

fn as_nobody(n: &Narq, args: &[&str]) -> std::process::Output {
    output(std::os::unix::process::CommandExt::uid(&mut Command::new(bin("narq")), 65534).args(args).env("NARQ_CONFIG", &n.config))
}

/// Review findings: a reader's `narq wait` does not take failures away from the CI job's
/// wait; a request still in the spool keeps `wait` waiting; a reader cannot make the daemon
/// buffer a large request.
#[test]
fn wait_is_not_fooled_by_readers_or_the_spool() {
    let mut n = Narq::new("waitreaders", "");
    configure(&n, &format!("public-keys = [\"{}\"]", n.public_key));
    n.start();
    std::fs::set_permissions(n.socket(), std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    // A dropped build (no key): a reader's wait sees it, and so does root's after it.
    let key = n.dir.join("key.sec");
    std::fs::rename(&key, n.dir.join("key.away")).unwrap();
    let (outs, _) = n.build(&program_expr("waitreaders"));
    std::fs::rename(n.dir.join("key.away"), &key).unwrap();
    let reader = as_nobody(&n, &["wait", "--timeout", "10"]);
    assert_eq!(reader.status.code(), Some(1), "{}", stderr(&reader));
    let ci = n.narq(&["wait", "--timeout", "10"]);
    assert_eq!(ci.status.code(), Some(1), "a reader's wait took the failure away: {}", stderr(&ci));
    assert!(stderr(&ci).contains(&outs[0]));

    // A reader may not send more than a small request.
    let big: Vec<narq::nix::StorePath> =
        (0..30_000).map(|i| narq::nix::StorePath::parse(&format!("/nix/store/{i:032}-p")).unwrap()).collect();
    let frame = narq::protocol::encode(&narq::protocol::Request::Missing { paths: big });
    assert!(frame.len() > 1 << 20);
    // (The daemon answers and hangs up before the rest arrives; the client may not read it.)
    let _ = crate::admission::exchange_as(65534, &n.socket(), &frame);
    assert!(n.daemon_log().contains("more than the 1048576 bytes this peer may send"), "{}", n.daemon_log());

    // The queue cannot take requests (another process holds it locked): the hook spools, and
    // `wait` does not call that done.
    let db = n.dir.join("state/queue.db");
    let mut locker = Command::new("/usr/bin/python3")
        .args(["-c", "import sqlite3, sys, time\nc = sqlite3.connect(sys.argv[1], isolation_level=None)\nc.execute('BEGIN EXCLUSIVE')\nprint('locked', flush=True)\ntime.sleep(60)\n"])
        .arg(&db)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(locker.stdout.as_mut().unwrap()), &mut line).unwrap();
    assert_eq!(line.trim(), "locked");
    let (held, log) = n.build(&program_expr("waitlocked"));
    assert!(log.contains("spooled to"), "{log}");
    let early = n.narq(&["wait", "--timeout", "3"]);
    assert_eq!(early.status.code(), Some(3), "wait returned while a build was only in the spool: {}", stderr(&early));
    locker.kill().unwrap();
    let _ = locker.wait();
    let retry = n.narq(&["retry"]);
    assert!(retry.status.success(), "{}", stderr(&retry));
    n.wait(60);
    for p in closure(&held).iter().chain(&closure(&outs)) {
        assert!(n.has(p), "{p} missing");
    }
}

/// Review finding: a spooled request that the daemon refuses when it ingests it (here: the
/// key was rotated meanwhile) is reported like a build the hook dropped, not just moved
/// aside, and `narq retry` uploads it with the new key.
#[test]
fn a_spooled_request_refused_later_is_reported() {
    let n = Narq::new("spoolrefused", "");
    // No daemon: the build is spooled, signed with the first key.
    let (outs, log) = n.build(&program_expr("spoolrefused"));
    assert!(log.contains("spooled to"), "{log}");
    // The key is rotated before the daemon starts.
    let (sk, pk) = (n.dir.join("key2.sec"), n.dir.join("key2.pub"));
    run(Command::new(bin("narq")).args(["keygen", "rotated-2", "--secret-key-file"]).arg(&sk).arg("--public-key-file").arg(&pk));
    let text = std::fs::read_to_string(&n.config).unwrap().replace(&n.dir.join("key.sec").display().to_string(), &sk.display().to_string());
    std::fs::write(&n.config, text).unwrap();
    let mut n = n;
    n.public_key = std::fs::read_to_string(&pk).unwrap().trim().to_string();
    n.start();
    let wait = n.narq(&["wait", "--timeout", "30"]);
    assert_eq!(wait.status.code(), Some(1), "{}", stderr(&wait));
    assert!(stderr(&wait).contains(&outs[0]) && stderr(&wait).contains("spooled request was refused"), "{}", stderr(&wait));
    let retry = n.narq(&["retry"]);
    assert!(retry.status.success(), "{}", stderr(&retry));
    n.wait(60);
    n.substitute(&outs[0]);
}

/// Review finding: a path with as many signatures as a request may carry (32, from other
/// keys) does not make the builds above it unuploadable.
#[test]
fn a_path_with_many_foreign_signatures_still_uploads() {
    let mut n = Narq::new("manysigs", "");
    n.start();
    let u = unique();
    let expr = format!(
        "let lib = {}; in {}",
        sh_drv(&format!("manysigs-lib-{u}"), "echo lib > $out"),
        sh_drv(&format!("manysigs-app-{u}"), "echo ${lib} > $out")
    );
    let outs = nix_build(&nix_conf(n.dir.path(), None), &expr, &[]);
    let lib = closure(&outs).into_iter().find(|p| p.contains("manysigs-lib")).unwrap();
    for i in 0..32 {
        let k = n.dir.join(format!("other-{i}.sec"));
        run(Command::new(bin("narq")).args(["keygen", &format!("other-{i}"), "--secret-key-file"]).arg(&k).arg("--public-key-file").arg(n.dir.join(format!("other-{i}.pub"))));
        run(Command::new("nix").args(["store", "sign", "--key-file"]).arg(&k).arg(&lib).env("NIX_CONF_DIR", &n.nix_conf));
    }
    let push = n.narq(&["push", "--wait", &outs[0]]);
    assert!(push.status.success(), "{}", stderr(&push));
    assert!(n.has(&lib) && n.has(&outs[0]));
    n.substitute(&outs[0]);
}
