//! The hook, the daemon and the durable queue, end to end with real Nix builds.

use crate::util::*;
use narq::nix::{PathInfo, SecretKey};
use narq::protocol::{self, Request, Response};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

/// A three-path closure: a library, a program that refers to it, and a derivation that
/// prints to its build log.
pub fn program_expr(tag: &str) -> String {
    let u = unique();
    format!(
        "let lib = {}; in {}",
        sh_drv(&format!("{tag}-lib-{u}"), "echo 'echo hello from narq' > $out"),
        sh_drv(
            &format!("{tag}-prog-{u}"),
            "echo building the program; mkdir -p $out/bin; printf '#!/bin/sh\\n. ${lib}\\n' > $out/bin/hello; chmod +x $out/bin/hello"
        )
    )
}

#[test]
fn build_lands_signed_and_substitutes() {
    let mut n = Narq::new("land", "");
    n.start();
    let (outs, stderr) = n.build(&program_expr("land"));
    assert!(!stderr.contains("narq-hook:"), "the hook complained: {stderr}");
    n.wait(60);
    let all = closure(&outs);
    assert_eq!(all.len(), 2);
    for p in &all {
        assert!(n.has(p), "{p} missing from the cache");
        let hash = &p[11..43];
        let ni = narq::nix::NarInfo::parse(&std::fs::read_to_string(n.cache().join(format!("{hash}.narinfo"))).unwrap()).unwrap();
        assert!(ni.info.signed_by_any(&[narq::nix::PublicKey::parse(&n.public_key).unwrap()]), "{p} not signed");
    }
    // A fresh store trusting only our key substitutes it, and the program runs.
    let client = n.substitute(&outs[0]);
    // The substituted program runs (its /nix/store reference resolves in this machine's
    // store), and the substituted library, run from the client store, prints the same.
    let prog = client.join(&outs[0][1..]).join("bin/hello");
    assert_eq!(run(&mut Command::new(&prog)), "hello from narq\n");
    let lib = all.iter().find(|p| p.contains("-land-lib-")).unwrap();
    assert_eq!(run(Command::new("/bin/sh").arg(client.join(&lib[1..]))), "hello from narq\n");
    // The build log is in the cache, as Nix has it.
    let drv = run(Command::new("nix-store").args(["-q", "--deriver", &outs[0]]));
    let log = std::fs::read_to_string(n.cache().join("log").join(&drv.trim()[11..])).unwrap();
    assert_eq!(log, run(Command::new("nix-store").args(["-l", drv.trim()])));
    assert!(log.contains("building the program"));
    assert_eq!(std::fs::read_to_string(n.cache().join("nix-cache-info")).unwrap(), "StoreDir: /nix/store\n");
    // Logged: one line per upload with path, bytes and duration.
    let dlog = n.daemon_log();
    let line = dlog.lines().find(|l| l.contains(&format!("uploaded {} (", outs[0]))).unwrap_or_else(|| panic!("{dlog}"));
    assert!(line.contains("bytes=") && line.contains("duration_ms="), "{line}");
}

#[test]
fn daemon_down_builds_succeed_and_spool() {
    let mut n = Narq::new("spool", "");
    // No daemon: the build succeeds, the hook says one line, the request is spooled.
    let (outs, stderr) = n.build(&program_expr("spool"));
    let hook_lines: Vec<&str> = stderr.lines().filter(|l| l.contains("narq-hook:")).collect();
    assert_eq!(hook_lines.len(), 2, "{stderr}");
    assert!(hook_lines[0].contains("unreachable") && hook_lines[0].contains("spooled to"), "{}", hook_lines[0]);
    assert_eq!(narq::spool::list(&n.dir.join("state/spool")).unwrap().len(), 2);
    assert!(!n.has(&outs[0]));
    // Once the daemon starts, the spool is ingested and everything lands.
    n.start();
    n.wait(60);
    for p in closure(&outs) {
        assert!(n.has(&p), "{p} missing");
    }
    assert!(narq::spool::list(&n.dir.join("state/spool")).unwrap().is_empty());
    n.substitute(&outs[0]);

    // A broken config does not fail a build either; the hook names the problem.
    std::fs::write(&n.config, "store = \"s3://my-cache?compression=lz4\"\n").unwrap();
    let (_, stderr) = n.build(&program_expr("badconf"));
    let line = stderr.lines().find(|l| l.contains("narq-hook:")).unwrap_or_else(|| panic!("{stderr}"));
    assert!(line.contains(&format!("config {}, key `store`", n.config.display())) && line.contains("compression=\"lz4\" is not supported"), "{line}");
    // And a missing one.
    std::fs::remove_file(&n.config).unwrap();
    let (_, stderr) = n.build(&program_expr("noconf"));
    assert!(stderr.contains("narq-hook: config") && stderr.contains("No such file"), "{stderr}");
}

/// 220 paths in one closure: a fan of 200 leaves under 20 middles under one top.
fn big_closure_expr(u: &str) -> String {
    format!(
        "let leaf = i: {}; mid = j: {}; in {}",
        sh_drv(&format!("leaf-${{toString i}}-{u}"), "mkdir $out; head -c 20000 /dev/urandom > $out/data; echo ${toString i} > $out/i"),
        sh_drv(
            &format!("mid-${{toString j}}-{u}"),
            "echo ${toString (builtins.genList (i: leaf (j * 10 + i)) 10)} > $out"
        ),
        sh_drv(&format!("top-{u}"), "echo ${toString (builtins.genList mid 20)} > $out")
    )
}

#[test]
fn kill9_mid_upload_loses_nothing_and_cache_stays_closed() {
    // xz at level 9 and one job: slow enough to be killed in the middle.
    let mut n = Narq::new("kill9", "jobs = 1\nstore = \"file:///PLACEHOLDER?compression=xz&compression-level=9\"");
    let cfg = std::fs::read_to_string(&n.config).unwrap().replace("/PLACEHOLDER", &n.cache().display().to_string());
    std::fs::write(&n.config, cfg).unwrap();
    let u = unique();
    let outs = nix_build(&nix_conf(n.dir.path(), None), &big_closure_expr(&u), &[]);
    let all = closure(&outs);
    assert_eq!(all.len(), 221);
    n.start();
    let push = n.narq(&["push", &outs[0]]);
    assert!(push.status.success(), "{}", String::from_utf8_lossy(&push.stderr));

    // Watch the cache while uploads run: it must be closed under references at every look.
    let cache = n.cache();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (cache, stop) = (cache.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut looks = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && looks < 100_000 {
                check_closed(&cache).unwrap_or_else(|e| panic!("cache not closed: {e}"));
                looks += 1;
            }
            looks
        })
    };
    let uploaded = |n: &Narq| n.status()["uploaded"].as_u64().unwrap();
    assert!(wait_for(Duration::from_secs(60), || uploaded(&n) >= 30), "uploads did not start");
    n.kill9();
    let before = check_closed(&cache).unwrap();
    assert!(before < 221, "everything was uploaded before the kill; the test proves nothing");
    n.start();
    n.wait(300);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let looks = watcher.join().unwrap();
    assert!(looks > 10, "the watcher looked only {looks} times");
    for p in &all {
        assert!(n.has(p), "{p} lost after kill -9");
    }
    assert_eq!(check_closed(&cache).unwrap(), 221);
    n.substitute(&outs[0]);
    let s = n.status();
    assert_eq!(s["failed"], 0);
    assert_eq!(s["pending"], 0);
}

#[test]
fn changed_contents_are_refused_never_uploaded() {
    let mut n = Narq::new("tamper", "");
    n.start();
    let u = unique();
    let outs = nix_build(&nix_conf(n.dir.path(), None), &sh_drv(&format!("tamper-{u}"), "echo original > $out"), &[]);
    let p = &outs[0];
    // Change the contents after registration (as root, like a corrupted disk or an attacker).
    std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    std::fs::write(p, "tampered\n").unwrap();
    let push = n.narq(&["push", "--wait", p]);
    assert_eq!(push.status.code(), Some(1), "{}", String::from_utf8_lossy(&push.stderr));
    assert!(String::from_utf8_lossy(&push.stderr).contains("do not match the Nix database"));
    assert!(!n.has(p));
    assert!(std::fs::read_dir(n.cache().join("nar")).map_or(0, |d| d.count()) == 0, "a NAR was uploaded");
    let s = n.status();
    assert_eq!(s["failed"], 1);
    assert!(s["last_error"]["error"].as_str().unwrap().contains("do not match"));
    assert!(n.daemon_log().contains("upload failed permanently"));
    // Leave the store consistent for other tests.
    let _ = Command::new("nix-store").args(["--delete", p]).output();
}

fn raw_exchange(sock: &std::path::Path, bytes: &[u8]) -> Option<Response> {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(bytes);
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    protocol::read(&mut &buf[..]).ok()
}

fn refused(r: Option<Response>, want: &str) {
    match r {
        Some(Response::Error { message, .. }) => assert!(message.contains(want), "{message} lacks {want:?}"),
        other => panic!("expected a refusal with {want:?}, got {other:?}"),
    }
}

#[test]
fn hostile_socket_input_is_refused_and_the_daemon_keeps_serving() {
    let mut n = Narq::new("hostile", "");
    n.start();
    let sock = n.socket();
    let u = unique();
    let outs = nix_build(&nix_conf(n.dir.path(), None), &sh_drv(&format!("hostile-{u}"), "echo x > $out"), &[]);
    let info = narq::nix::db::NixDb::open_default().unwrap().query(&[narq::nix::StorePath::parse(&outs[0]).unwrap()], true).unwrap();

    refused(raw_exchange(&sock, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), "bad magic");
    let mut huge = b"NARQ".to_vec();
    huge.extend_from_slice(&1u32.to_le_bytes());
    huge.extend_from_slice(&u32::MAX.to_le_bytes());
    refused(raw_exchange(&sock, &huge), "larger than the limit");
    let body = serde_json::to_string(&Request::Enqueue { paths: info.clone(), drv: None, realisations: vec![], part: false }).unwrap();
    let bad_path = body.replace(&outs[0], &format!("{}/../../../etc/shadow", outs[0]));
    let mut frame = protocol::encode(&serde_json::Value::Null)[..8].to_vec();
    frame.extend_from_slice(&(bad_path.len() as u32).to_le_bytes());
    frame.extend_from_slice(bad_path.as_bytes());
    refused(raw_exchange(&sock, &frame), "character '/' at position");
    // A signature in our key's name, made by another key.
    let mut forged: Vec<PathInfo> = info.clone();
    let name = n.public_key.split(':').next().unwrap();
    let other = SecretKey::parse(&SecretKey::generate(name).unwrap().to_nix_string()).unwrap();
    forged[0].sign(&other);
    refused(raw_exchange(&sock, &protocol::encode(&Request::Enqueue { paths: forged, drv: None, realisations: vec![], part: false })), "does not verify");
    // An incomplete closure.
    let mut partial = info.clone();
    partial[0].references.insert(narq::nix::StorePath::parse("/nix/store/00000000000000000000000000000000-x").unwrap());
    partial[0].sign(&SecretKey::read(&n.dir.join("key.sec")).unwrap());
    refused(raw_exchange(&sock, &protocol::encode(&Request::Enqueue { paths: partial, drv: None, realisations: vec![], part: false })), "incomplete closure");
    // A peer with another uid (the socket opened up so that it can connect at all) may read
    // the status, but not enqueue.
    std::fs::set_permissions(&sock, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let out = output(
        std::os::unix::process::CommandExt::uid(&mut Command::new(bin("narq")), 65534)
            .args(["status"])
            .env("NARQ_CONFIG", &n.config),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut signed = info.clone();
    signed[0].sign(&SecretKey::read(&n.dir.join("key.sec")).unwrap());
    let frame = protocol::encode(&Request::Enqueue { paths: signed, drv: None, realisations: vec![], part: false });
    refused(crate::admission::exchange_as(65534, &sock, &frame), "uid 65534 may not enqueue");

    let log = n.daemon_log();
    for why in ["bad magic", "larger than the limit", "character '/' at position", "does not verify", "incomplete closure", "uid 65534 may not enqueue"] {
        assert!(log.contains(why), "daemon log lacks {why:?}:\n{log}");
    }
    // Nothing of it was queued, and the daemon still serves.
    assert_eq!(n.status()["pending"], 0);
    let push = n.narq(&["push", "--wait", &outs[0]]);
    assert!(push.status.success(), "{}", String::from_utf8_lossy(&push.stderr));
    assert!(n.has(&outs[0]));
}

#[test]
fn fifty_hooks_at_once_all_land() {
    let mut n = Narq::new("fifty", "");
    let u = unique();
    let expr = format!(
        "builtins.genList (i: {}) 50",
        sh_drv(&format!("par-${{toString i}}-{u}"), "echo ${toString i} > $out")
    );
    let outs = nix_build(&nix_conf(n.dir.path(), None), &expr, &[]);
    assert_eq!(outs.len(), 50);
    n.start();
    // 50 hooks at once, as Nix would run them for 50 parallel builds (empty OUT_PATHS, as Nix 2.8).
    let hooks: Vec<_> = outs
        .iter()
        .map(|p| {
            let drv = run(Command::new("nix-store").args(["-q", "--deriver", p])).trim().to_string();
            Command::new(bin("narq-hook"))
                .env("NARQ_CONFIG", &n.config)
                .env("OUT_PATHS", "")
                .env("DRV_PATH", drv)
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for h in hooks {
        let out = h.wait_with_output().unwrap();
        assert!(out.status.success());
        assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    n.wait(120);
    for p in &outs {
        assert!(n.has(p), "{p} missing");
    }
    let s = n.status();
    assert_eq!((s["uploaded"].as_u64(), s["logs_uploaded"].as_u64()), (Some(50), Some(50)), "50 paths and their 50 build logs: {s}");
}

/// The hook as the README and the flake install it: static (musl), built without the
/// daemon's dependencies (scripts/build-hook.sh). It does the whole job for a real build.
#[test]
fn static_hook_lands_a_build() {
    let hook = std::path::PathBuf::from(run(&mut Command::new("scripts/build-hook.sh")).trim());
    let headers = run(Command::new("readelf").arg("-lW").arg(&hook));
    assert!(headers.contains("LOAD") && !headers.contains("INTERP"), "{} is not static:\n{headers}", hook.display());
    // No async runtime and no S3 client in the hook (their panic locations name their crates).
    let bytes = std::fs::read(&hook).unwrap();
    for name in ["tokio", "aws-sdk-s3", "hyper"] {
        assert!(!bytes.windows(name.len()).any(|w| w == name.as_bytes()), "{name} is linked into the hook");
    }
    let mut n = Narq::new("static", "");
    n.nix_conf = nix_conf(n.dir.path(), Some(&hook));
    n.start();
    let (outs, stderr) = n.build(&program_expr("static"));
    assert!(!stderr.contains("narq-hook:"), "the hook complained: {stderr}");
    n.wait(60);
    for p in closure(&outs) {
        assert!(n.has(&p), "{p} missing from the cache");
    }
    let client = n.substitute(&outs[0]);
    assert_eq!(run(&mut Command::new(client.join(&outs[0][1..]).join("bin/hello"))), "hello from narq\n");
}
