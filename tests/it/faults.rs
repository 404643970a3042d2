//! S3 faults: a proxy that drops, throttles, fails and stalls; upload-side limits (logs, multipart, upstreams, credentials).

use crate::s3proxy::{bucket_keys, check_bucket_closed, read_head, Fault, S3Proxy};
use crate::util::*;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn s3_narq(tag: &str, port: u16, params: &str, extra: &str) -> Narq {
    Narq::new(tag, &format!("store = \"s3://narq-{tag}?endpoint=127.0.0.1:{port}&scheme=http{params}\"\n{extra}"))
}

/// Starts the daemon with `env` as its whole AWS environment (no test credentials), HOME
/// pointing at an empty directory.
fn start_with_env(n: &mut Narq, env: &[(&str, &str)]) {
    let home = n.dir.join("home");
    std::fs::create_dir_all(&home).unwrap();
    let log = std::fs::OpenOptions::new().create(true).append(true).open(n.dir.join("daemon.log")).unwrap();
    let mut cmd = Command::new(bin("narq"));
    cmd.arg("daemon").env_remove("JOURNAL_STREAM").env("NARQ_CONFIG", &n.config).env("HOME", &home);
    for (k, _) in std::env::vars() {
        if k.starts_with("AWS_") {
            cmd.env_remove(k);
        }
    }
    let child = cmd.envs(env.iter().copied()).stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log).spawn().unwrap();
    n.daemon = Some(child);
    assert!(wait_for(Duration::from_secs(10), || n.narq(&["status"]).status.success()), "daemon did not come up: {}", n.daemon_log());
}

/// Issue 9 item 14: no credentials anywhere is one line naming where narq looked, in the
/// log and in `narq status`, not kilobytes of SDK internals.
#[test]
fn s3_missing_credentials_are_one_line() {
    let t = TempDir::new("nocreds");
    let moto = Moto::start(t.path(), &[]);
    moto.bucket("narq-nocreds");
    let mut n = s3_narq("nocreds", moto.port, "", "");
    start_with_env(&mut n, &[("AWS_EC2_METADATA_DISABLED", "true")]);
    let outs = nix_build(&nix_conf(n.dir.path(), None), &sh_drv(&format!("nocreds-{}", unique()), "echo x > $out"), &[]);
    assert!(n.narq(&["push", &outs[0]]).status.success());
    assert!(wait_for(Duration::from_secs(20), || n.status()["target_error"].is_string()), "{}", n.daemon_log());
    let err = n.status()["target_error"].as_str().unwrap().to_string();
    eprintln!("status: {err}");
    eprintln!("log:\n{}", n.daemon_log());
    assert!(err.contains("no AWS credentials found (looked in: env"), "{err}");
    assert!(err.len() < 400 && !err.contains('\n'), "{err}");
    let log = n.daemon_log();
    for noise in ["DispatchFailure", "dispatch failure", "IMDS token", "ConnectorError"] {
        assert!(!log.contains(noise), "{noise:?} in the daemon log:\n{log}");
    }
    let paused = log.lines().filter(|l| l.contains("uploads paused")).collect::<Vec<_>>();
    assert!(!paused.is_empty() && paused.iter().all(|l| l.contains("no AWS credentials found") && l.len() < 600), "{log}");
    assert_eq!(n.status()["failed"], 0);
}

type Shared<T> = std::sync::Arc<std::sync::Mutex<T>>;

/// Issue 9 item 17: S3 refusing one object (`EntityTooLarge`) fails that item and leaves
/// the other uploads going; it does not pause every upload and retry forever.
#[test]
fn s3_refused_object_fails_its_item_only() {
    let t = TempDir::new("toolarge");
    let moto = Moto::start(t.path(), &[]);
    moto.bucket("narq-toolarge");
    let proxy = S3Proxy::start(moto.port);
    let mut n = s3_narq("toolarge", proxy.port, "", "jobs = 1");
    n.start();
    let u = unique();
    let conf = nix_conf(n.dir.path(), None);
    let a = nix_build(&conf, &sh_drv(&format!("toolarge-a-{u}"), "echo a > $out"), &[]).remove(0);
    let b = nix_build(&conf, &sh_drv(&format!("toolarge-b-{u}"), "echo b > $out"), &[]).remove(0);
    // The first NAR sent is refused for good; the second would pass.
    proxy.add("PUT", "/nar/", Fault::Answer(400, "EntityTooLarge"), 1);
    assert!(n.narq(&["push", &a, &b]).status.success());
    let wait = n.narq(&["wait", "--timeout", "20"]);
    let s = n.status();
    let log = n.daemon_log();
    assert_eq!(s["failed"], 1, "the refused path was not failed: {s}\n{log}");
    assert_eq!(s["uploaded"], 1, "{s}\n{log}");
    assert_eq!(wait.status.code(), Some(1), "narq wait must report the failure: {}", String::from_utf8_lossy(&wait.stderr));
    assert!(log.contains("upload failed permanently") && log.contains("EntityTooLarge"), "{log}");
    assert!(!log.contains("uploads paused"), "one refused object paused every upload:\n{log}");
    let nars = proxy.seen().iter().filter(|r| r.method == "PUT" && r.target.contains("/nar/")).count();
    assert_eq!(nars, 2, "the refused NAR was sent again: {:?}", proxy.seen());
}

/// The "Done when" of issue 9: S3 behind a proxy that cuts a part upload mid-body, throttles
/// with `Retry-After`, fails with 500, stalls, and takes a request without ever answering. Every path arrives exactly once, the
/// bucket is closed under references at every look, `narq status` shows each pause's
/// cause, and the pause after a `Retry-After` lasts at least that long.
#[test]
fn s3_faults_every_path_once_and_closed() {
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    let started = std::time::Instant::now();
    let t = TempDir::new("faults");
    let moto = Moto::start(t.path(), &[]);
    moto.bucket("narq-faults");
    let proxy = S3Proxy::start(moto.port);
    // One worker, so that the faults meet the uploads in a known order (many at once:
    // `s3_retry_after_holds_uploads_already_in_flight`); 5 MiB parts, so that the big path
    // goes up in 3 parts.
    let mut n = s3_narq("faults", proxy.port, "&buffer-size=5242880", "jobs = 1");
    n.start();
    const RETRY_AFTER: u64 = 3;
    // Each fault twice in a row: the SDK retries once by itself, the second makes it a pause
    // (the 3 parts go up at once: 6 cuts).
    proxy.add("PUT", "partNumber=", Fault::Drop, 6);
    proxy.add("PUT", ".narinfo", Fault::SlowDown(RETRY_AFTER), 2);
    proxy.add("PUT", ".narinfo", Fault::Answer(500, "InternalError"), 2);
    proxy.add("PUT", "/log/", Fault::Hang, 1);
    proxy.add("PUT", "/log/", Fault::Stall(Duration::from_secs(3)), 1);

    // Watchers: the bucket must be closed at every look, and every pause cause is recorded.
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let looker = {
        let (stop, port) = (stop.clone(), moto.port);
        std::thread::spawn(move || {
            let mut looks = 0;
            // Bounded: 3 minutes of looks at most.
            for _ in 0..1800 {
                if stop.load(Relaxed) {
                    break;
                }
                if let Err(e) = check_bucket_closed(port, "narq-faults") {
                    return Err(e);
                }
                looks += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(looks)
        })
    };
    let causes: Shared<Vec<String>> = Default::default();
    let watcher = {
        let (stop, causes, config) = (stop.clone(), causes.clone(), n.config.clone());
        std::thread::spawn(move || {
            for _ in 0..3600 {
                if stop.load(Relaxed) {
                    break;
                }
                let out = output(Command::new(bin("narq")).args(["status", "--json"]).env("NARQ_CONFIG", &config));
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
                    if let Some(e) = v["target_error"].as_str() {
                        let mut c = causes.lock().unwrap();
                        if !c.iter().any(|x| x == e) {
                            c.push(e.to_string());
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    let u = unique();
    let expr = format!(
        "let big = {}; lib = {}; in {}",
        sh_drv(&format!("faults-big-{u}"), "echo making the big one; head -c 12000000 /dev/urandom > $out"),
        sh_drv(&format!("faults-lib-{u}"), "echo lib > $out"),
        sh_drv(&format!("faults-top-{u}"), "echo linking; echo ${big} ${lib} > $out"),
    );
    let (outs, stderr) = n.build(&expr);
    assert!(!stderr.contains("narq-hook:"), "{stderr}");
    let wait = n.narq(&["wait", "--timeout", "90"]);
    stop.store(true, Relaxed);
    let looks = looker.join().unwrap().unwrap_or_else(|e| panic!("the bucket was not closed at one look: {e}\n{}", n.daemon_log()));
    watcher.join().unwrap();
    let log = n.daemon_log();
    assert!(wait.status.success(), "narq wait: {}\n{log}", String::from_utf8_lossy(&wait.stderr));
    let seen = proxy.seen();

    // Every fault happened.
    for f in [Fault::Drop, Fault::SlowDown(RETRY_AFTER), Fault::Answer(500, "InternalError"), Fault::Hang, Fault::Stall(Duration::from_secs(3))] {
        assert!(seen.iter().any(|r| r.fault == f), "{f:?} never happened: {seen:#?}");
    }
    // Every path arrives, its narinfo exactly once.
    let all = closure(&outs);
    assert_eq!(all.len(), 3);
    let narinfos = check_bucket_closed(moto.port, "narq-faults").unwrap();
    for p in &all {
        let key = format!("{}.narinfo", &p[11..43]);
        assert!(narinfos.contains(&key), "{p} missing");
        let stored = seen.iter().filter(|r| r.method == "PUT" && r.target.contains(&key) && r.status == Some(200)).count();
        assert_eq!(stored, 1, "{p}'s narinfo was stored {stored} times");
    }
    n.substitute_from(&outs[0], &format!("http://127.0.0.1:{}/narq-faults", moto.port));
    // Each pause's cause was in `narq status`.
    let causes = causes.lock().unwrap().clone();
    eprintln!("{looks} looks at the bucket; pauses seen in status: {causes:#?}");
    for (what, needles) in [("the cut part", &["uploading part"][..]), ("the throttling", &["503", "SlowDown"]), ("the 500", &["500", "InternalError"]), ("the hang", &["log/", "no answer within"])] {
        assert!(causes.iter().any(|c| needles.iter().all(|n| c.contains(n))), "{what} was not shown in status: {causes:#?}\n{log}");
    }
    // The pause after a `Retry-After` lasted at least that long: nothing was sent meanwhile
    // but what was already on the wire when the store answered (a root record, say).
    let last_503 = seen.iter().filter(|r| r.status == Some(503)).map(|r| r.at).max().unwrap();
    let during: Vec<_> = seen.iter().filter(|r| r.at > last_503 + IN_FLIGHT && r.at < last_503 + Duration::from_millis(RETRY_AFTER * 1000 - 100)).collect();
    eprintln!("whole test {:?}", started.elapsed());
    assert!(during.is_empty(), "the store asked for {RETRY_AFTER} s, and these came meanwhile: {during:#?}");
}

/// A store's `Retry-After` holds every request, not only new uploads: with many uploads in
/// flight (default `jobs`), those already going when the store said "slow down" send their
/// next request only after the pause, and so do root records and looks for collections.
#[test]
fn s3_retry_after_holds_uploads_already_in_flight() {
    let t = TempDir::new("retryafter");
    let moto = Moto::start(t.path(), &[]);
    moto.bucket("narq-retryafter");
    let proxy = S3Proxy::start(moto.port);
    let mut n = s3_narq("retryafter", proxy.port, "", "");
    n.start();
    let u = unique();
    let conf = nix_conf(n.dir.path(), None);
    let paths: Vec<String> = (0..24).map(|i| nix_build(&conf, &sh_drv(&format!("retryafter-{i}-{u}"), &format!("echo {i} > $out")), &[]).remove(0)).collect();
    const RETRY_AFTER: u64 = 3;
    // Two uploads are throttled: the SDK does not retry them itself (it would within a
    // second), the daemon's breaker pauses.
    proxy.add("PUT", ".narinfo", Fault::SlowDown(RETRY_AFTER), 2);
    let mut push = vec!["push"];
    push.extend(paths.iter().map(String::as_str));
    assert!(n.narq(&push).status.success());
    let wait = n.narq(&["wait", "--timeout", "60"]);
    let log = n.daemon_log();
    assert!(wait.status.success(), "{}\n{log}", String::from_utf8_lossy(&wait.stderr));
    let seen = proxy.seen();
    let last_503 = seen.iter().filter(|r| r.status == Some(503)).map(|r| r.at).max().expect("the store was never throttled");
    let during: Vec<_> = seen.iter().filter(|r| r.at > last_503 + IN_FLIGHT && r.at < last_503 + Duration::from_millis(RETRY_AFTER * 1000 - 100)).collect();
    assert!(during.is_empty(), "requests within the {RETRY_AFTER} s the store asked for: {during:#?}\n{log}");
    let after = seen.iter().filter(|r| r.at > last_503).count();
    assert!(after > 0, "nothing was left to send after the pause: the test proves nothing");
    let keys = bucket_keys(moto.port, "narq-retryafter");
    for p in &paths {
        assert!(keys.contains(&format!("{}.narinfo", hash(p))), "{p} missing");
    }
}

/// How long after a store's answer requests sent before the daemon read it may still arrive.
const IN_FLIGHT: Duration = Duration::from_millis(250);

/// A stub upstream cache on 127.0.0.1: answers every request with `200 not found`, or
/// (`stall`) reads it and never answers. Stops with the returned flag.
fn stub_upstream(stall: bool) -> (u16, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    use std::io::Write;
    use std::sync::atomic::Ordering::Relaxed;
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    l.set_nonblocking(true).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        // Bounded: at most 5 minutes of 5 ms steps.
        for _ in 0..60_000 {
            if stop2.load(Relaxed) {
                break;
            }
            while let Ok((mut c, _)) = l.accept() {
                c.set_nonblocking(false).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let _ = read_head(&mut c);
                if stall {
                    held.push(c);
                } else {
                    let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot found");
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    (port, stop)
}

/// Issue 9 item 12: an upstream answering `200 "not found"` does not have the path: it is
/// uploaded, not skipped for good.
#[test]
fn upstream_200_without_a_narinfo_is_not_trusted() {
    let (port, stop) = stub_upstream(false);
    let mut n = Narq::new("up200", &format!("upstream = [\"http://127.0.0.1:{port}\"]"));
    n.start();
    let p = nix_build(&nix_conf(n.dir.path(), None), &sh_drv(&format!("up200-{}", unique()), "echo x > $out"), &[]).remove(0);
    let push = n.narq(&["push", "--wait", &p]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(push.status.success(), "{}", String::from_utf8_lossy(&push.stderr));
    let s = n.status();
    assert!(n.has(&p), "skipped because an upstream said 200: {s}\n{}", n.daemon_log());
    assert_eq!(s["skipped"], 0, "{s}");
    assert!(n.daemon_log().contains("no valid narinfo"), "{}", n.daemon_log());
}

/// Issue 9 item 12: a stalled upstream neither hides the answer of another upstream nor
/// costs its timeout once per path of a chain; it is named in the log.
#[test]
fn stalled_upstream_costs_one_timeout_not_one_per_path() {
    let t = TempDir::new("upstall");
    let moto = Moto::start(t.path(), &[]);
    moto.bucket("narq-upstall");
    let (stalled, stop) = stub_upstream(true);
    let u = unique();
    let expr = format!(
        "let dep = {}; mid = {}; in {}",
        sh_drv(&format!("upstall-dep-{u}"), "echo dep > $out"),
        sh_drv(&format!("upstall-mid-{u}"), "echo ${dep} > $out"),
        sh_drv(&format!("upstall-top-{u}"), "echo ${mid} > $out"),
    );
    let outs = nix_build(&nix_conf(t.path(), None), &expr, &[]);
    let dep = closure(&outs).into_iter().find(|p| p.contains("-upstall-dep-")).unwrap();
    run(Command::new("nix")
        .args(["--extra-experimental-features", "nix-command", "copy", "--to"])
        .arg(format!("http://127.0.0.1:{}/narq-upstall", moto.port))
        .arg(&dep));
    let mut n = Narq::new(
        "upstall",
        &format!("upstream = [\"http://127.0.0.1:{stalled}\", \"http://127.0.0.1:{}/narq-upstall\"]\njobs = 1", moto.port),
    );
    n.start();
    let start = std::time::Instant::now();
    let push = n.narq(&["push", "--wait", &outs[0]]);
    let took = start.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(push.status.success(), "{}", String::from_utf8_lossy(&push.stderr));
    let s = n.status();
    eprintln!("3 paths past a stalled upstream in {took:?}");
    assert_eq!((s["uploaded"].as_u64(), s["skipped"].as_u64()), (Some(2), Some(1)), "{s}");
    assert!(!n.has(&dep));
    assert!(took < Duration::from_secs(12), "a stalled upstream cost {took:?} for 3 paths");
    let log = n.daemon_log();
    assert!(log.contains(&format!("upstream http://127.0.0.1:{stalled} did not answer")), "{log}");
}

/// `nix log --store URL PATH`: what a Nix client reads as the build log of the path's
/// deriver from a cache.
fn nix_log(n: &Narq, store: &str, path: &str) -> Output {
    output(
        Command::new("nix")
            .args(["--extra-experimental-features", "nix-command", "log", "--store", store, path])
            .env("NIX_CONF_DIR", &n.nix_conf),
    )
}

/// Issue 9 item 8: a build log that bzip2 shrank to a few KiB but expands to ~68 MB is
/// streamed (the daemon's memory stays flat) and cut at 64 MiB with a note; `nix log`
/// reads it from the `file://` cache.
#[test]
fn build_log_bomb_is_capped_and_streamed() {
    let mut n = Narq::new("logbomb", "");
    n.start();
    let idle = peak_rss(n.daemon_pid());
    // ~68 MB of log (over the 64 MiB cap) in 50-byte lines: Nix keeps it as a small .bz2.
    let script = "yes 'a line of a build log that never seems to end' | head -c 68000000; echo done > $out";
    let (outs, _) = n.build(&sh_drv(&format!("logbomb-{}", unique()), script));
    n.wait(120);
    let drv = run(Command::new("nix-store").args(["-q", "--deriver", &outs[0]])).trim().to_string();
    let peak = peak_rss(n.daemon_pid());
    let log = n.cache().join("log").join(&drv[11..]);
    let size = std::fs::metadata(&log).unwrap().len();
    eprintln!("daemon peak RSS {} MiB (idle {} MiB); log object {size} bytes", peak >> 20, idle >> 20);
    assert!(size <= narq::upload::MAX_LOG + 200, "a {size}-byte log in the cache");
    let mut tail = vec![0u8; 100];
    {
        use std::io::{Read, Seek};
        let mut f = std::fs::File::open(&log).unwrap();
        f.seek(std::io::SeekFrom::End(-100)).unwrap();
        f.read_exact(&mut tail).unwrap();
    }
    assert!(String::from_utf8_lossy(&tail).contains("[narq: build log truncated"), "no note at the end: {:?}", String::from_utf8_lossy(&tail));
    assert!(peak < 64 << 20, "daemon peak RSS {} MiB: the log was read into memory", peak >> 20);
    // Nix reads it from the cache.
    let out = nix_log(&n, &format!("file://{}", n.cache().display()), &outs[0]);
    assert!(out.status.success(), "nix log: {}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout.starts_with(b"a line of a build log that never seems to end\n"));
    assert_eq!(out.stdout.len() as u64, size);
}

/// Issue 9 item 8, issue 19 item 2: on S3, logs are stored gzip-compressed with
/// `Content-Encoding: gzip` (xz until Nix 2.34 could not read it), which Nix 2.8's HTTP client
/// undoes: `nix log` reads the text. (Nix 2.34 over s3://: `nix234::`.)
#[test]
fn s3_build_log_is_compressed_and_nix_reads_it() {
    let t = TempDir::new("s3log");
    let moto = Moto::start(t.path(), &[]);
    moto.bucket("narq-s3log");
    let mut n = s3_narq("s3log", moto.port, "", "");
    n.start();
    let script = "for i in 1 2 3 4 5 6 7 8 9 10; do echo line $i of a log that compresses well; done; echo x > $out";
    let (outs, _) = n.build(&sh_drv(&format!("s3log-{}", unique()), script));
    n.wait(60);
    let drv = run(Command::new("nix-store").args(["-q", "--deriver", &outs[0]])).trim().to_string();
    let text = run(Command::new("nix-store").args(["-l", &drv]));
    let (head, body) = http(moto.port, "GET", &format!("/narq-s3log/log/{}", &drv[11..]));
    assert!(head.contains("content-encoding: gzip"), "{head}");
    assert!(body.starts_with(b"\x1f\x8b") && body.len() < text.len(), "not gzip: {} bytes", body.len());
    let out = nix_log(&n, &format!("http://127.0.0.1:{}/narq-s3log", moto.port), &outs[0]);
    assert!(out.status.success(), "nix log: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), text);
}

/// Issue 9 item 8: the daemon's units carry a memory ceiling (NixOS module, plain unit).
#[test]
fn units_cap_the_daemons_memory() {
    let repo = env!("CARGO_MANIFEST_DIR");
    let eval = |args: &str| -> serde_json::Value {
        let expr = format!("(import {repo}/nixos-module/units.nix {{ narq = \"/pkg\"; configFile = \"/c\"; socket = \"/s\"; {args} }}).service.serviceConfig.MemoryMax");
        serde_json::from_str(&run(Command::new("nix-instantiate").args(["--eval", "--strict", "--json", "-E", &expr]))).unwrap()
    };
    assert_eq!(eval(""), "1G");
    assert_eq!(eval("memoryMax = \"512M\";"), "512M");
    let plain = std::fs::read_to_string(format!("{repo}/examples/non-nixos/narq.service")).unwrap();
    assert!(plain.lines().any(|l| l == "MemoryMax=1G"), "{plain}");
    let module = std::fs::read_to_string(format!("{repo}/nixos-module/default.nix")).unwrap();
    assert!(module.contains("memoryMax = mkOption") && module.contains("environmentFile memoryMax;"));
}

/// Issue 9 item 3: a NAR's temp file does not take the last free space of the state dir:
/// below the threshold the upload waits (a transient error that says so) and goes once
/// there is room.
#[test]
fn nar_temp_files_keep_the_state_dir_free_space() {
    let mut n = Narq::new("minfree", "");
    // 300 MiB for the queue, the temp files and the (file://) cache: a 60 MB NAR fits,
    // but would leave less than the 256 MiB kept free.
    let fs = Tmpfs::mount(&n.dir.join("state"), "300M");
    n.start();
    let p = nix_build(&nix_conf(n.dir.path(), None), &sh_drv(&format!("minfree-{}", unique()), "head -c 60000000 /dev/urandom > $out"), &[]).remove(0);
    assert!(n.narq(&["push", &p]).status.success());
    let held = wait_for(Duration::from_secs(20), || n.status()["last_error"]["error"].as_str().is_some_and(|e| e.contains("not enough free space")));
    let s = n.status();
    assert!(held, "uploaded into the last free space: {s}\n{}", n.daemon_log());
    assert!(!n.has(&p) && s["failed"] == 0 && s["pending"] == 1, "{s}");
    let tmp_files = std::fs::read_dir(n.dir.join("state/tmp")).unwrap().count();
    assert_eq!(tmp_files, 0, "a temp file was left in state/tmp");
    // Room again: it goes.
    fs.resize("600M");
    n.wait(60);
    assert!(n.has(&p));
    n.kill9();
    let _ = Command::new("nix-store").args(["--delete", &p]).output();
}

/// Answers lost or late after the store acted (the proxy forwards, then drops or holds the
/// answer): the completion of a streamed NAR's upload and a narinfo's PUT are sent again,
/// and the cache ends whole and closed, each path there once.
#[test]
fn s3_lost_and_late_answers_are_sent_again_without_harm() {
    let t = TempDir::new("lostanswer");
    let moto = Moto::start(t.path(), &[]);
    moto.bucket("narq-lostanswer");
    let proxy = S3Proxy::start(moto.port);
    let mut n = s3_narq("lostanswer", proxy.port, "&buffer-size=5242880", "jobs = 1");
    n.start();
    proxy.add("POST", "uploadId=", Fault::LostAnswer, 1);
    proxy.add("PUT", ".narinfo", Fault::LostAnswer, 1);
    proxy.add("PUT", ".narinfo", Fault::LateAnswer(Duration::from_secs(2)), 1);
    let u = unique();
    let expr = format!(
        "let big = {}; in {}",
        sh_drv(&format!("lostanswer-big-{u}"), "head -c 12000000 /dev/urandom > $out"),
        sh_drv(&format!("lostanswer-top-{u}"), "echo ${big} > $out"),
    );
    let (outs, _) = n.build(&expr);
    n.wait(120);
    let seen = proxy.seen();
    for f in [Fault::LostAnswer, Fault::LateAnswer(Duration::from_secs(2))] {
        assert!(seen.iter().any(|r| r.fault == f), "{f:?} never happened: {seen:#?}");
    }
    check_bucket_closed(moto.port, "narq-lostanswer").unwrap();
    n.substitute_from(&outs[0], &format!("http://127.0.0.1:{}/narq-lostanswer", moto.port));
    let _ = Command::new("nix-store").arg("--delete").args(closure(&outs)).output();
}
