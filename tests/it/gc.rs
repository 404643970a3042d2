//! `narq rm`, `narq pin` and `narq gc` on real caches (`file://` and moto S3) filled by real
//! Nix builds through a real daemon, read back by a fresh Nix client.

use crate::cache_under_test::{boto, TestCache};
use crate::util::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

impl TestCache {
    /// The NAR key of `path`'s narinfo.
    fn nar_of(&self, path: &str) -> String {
        let ni = String::from_utf8(self.get(&format!("{}.narinfo", hash(path))).expect("narinfo")).unwrap();
        narq::nix::NarInfo::parse(&ni).unwrap().url
    }

    /// Every key with its size and time (`file://`), or with its ETag (S3).
    fn listing(&self) -> BTreeMap<String, String> {
        match &self.moto {
            None => {
                let mut out = BTreeMap::new();
                walk(&self.n.cache(), "", &mut out);
                out
            }
            Some(moto) => {
                let bucket = &self.bucket;
                let script = format!(
                    "for page in s3.get_paginator('list_objects_v2').paginate(Bucket='{bucket}'):\n    \
                     for o in page.get('Contents', []): print(o['Key'], o['ETag'], o['LastModified'].isoformat())"
                );
                boto(moto, &script)
                    .lines()
                    .filter_map(|l| l.split_once(' ').map(|(k, v)| (k.to_string(), v.to_string())))
                    .collect()
            }
        }
    }

    /// Waits until the daemon recorded `path` as a root.
    fn wait_root(&self, path: &str) {
        let key = format!("narq/roots/{}", hash(path));
        assert!(wait_for(Duration::from_secs(20), || self.get(&key).is_some()), "root {key} not recorded: {}", self.n.daemon_log());
    }
}

fn walk(dir: &Path, prefix: &str, out: &mut BTreeMap<String, String>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = format!("{prefix}{}", e.file_name().to_string_lossy());
        let m = e.metadata().unwrap();
        if m.is_dir() {
            walk(&e.path(), &format!("{name}/"), out);
        } else {
            out.insert(name, format!("{} {:?}", m.len(), m.modified().unwrap()));
        }
    }
}

/// A derivation `name` whose output references `deps` (names bound by `lets`).
fn app(name: &str, deps: &[&str]) -> String {
    let refs: String = deps.iter().map(|d| format!("${{{d}}} ")).collect();
    sh_drv(name, &format!("echo {name} {refs} > $out"))
}

/// `let` bindings of leaf derivations, then `body`.
fn with_leaves(leaves: &[(&str, &str)], body: &str) -> String {
    let lets: String = leaves.iter().map(|(var, name)| format!("{var} = {}; ", sh_drv(name, &format!("echo {name} > $out")))).collect();
    format!("let {lets}in {body}")
}

/// The issue's scenario: two apps over one shared dependency and a third over its own; one
/// app pinned; `gc --keep-days 0 --grace 0s` keeps the pinned app and the shared dependency,
/// removes the rest, leaves a closed cache that a fresh client substitutes from; `rm` of the
/// shared dependency is refused while an app references it.
fn pinned_app_and_shared_dep_survive(s3: bool) {
    let tag = if s3 { "gc-s3" } else { "gc-file" };
    let mut s = TestCache::new(tag, s3);
    s.n.start();
    let u = unique();
    let (lib_name, own_name) = (format!("lib-{u}"), format!("own-{u}"));
    let leaves = [("lib", lib_name.as_str()), ("own", own_name.as_str())];
    let build = |name: &str, dep: &str| s.n.build(&with_leaves(&leaves, &app(&format!("{name}-{u}"), &[dep]))).0[0].clone();
    let app1 = build("app1", "lib");
    let app2 = build("app2", "lib");
    let app3 = build("app3", "own");
    s.n.wait(60);
    let lib = closure(&[app1.clone()]).into_iter().find(|p| p.ends_with(&format!("lib-{u}"))).unwrap();
    let own = closure(&[app3.clone()]).into_iter().find(|p| p.ends_with(&format!("own-{u}"))).unwrap();
    for p in [&app1, &app2, &app3] {
        s.wait_root(p);
    }
    assert!(s.ok(&["pin", "release", &app1]).contains("pinned release"));
    assert_eq!(s.ok(&["pins"]).trim(), format!("release {app1}"));

    let rm = s.narq(&["rm", &lib]);
    assert_eq!(rm.status.code(), Some(1));
    let err = String::from_utf8_lossy(&rm.stderr);
    assert!(err.contains("refused") && err.contains(&app1) && err.contains(&app2), "{err}");
    assert!(s.has(&lib));

    let (lib_nar, app2_nar, own_nar) = (s.nar_of(&lib), s.nar_of(&app2), s.nar_of(&own));
    let out = s.ok(&["gc", "--keep-days", "0", "--grace", "0s"]);
    for p in [&app2, &app3, &own] {
        assert!(out.contains(&format!("removed {p}")), "{out}");
        assert!(!s.has(p), "{p} is still there");
    }
    assert!(s.has(&app1) && s.has(&lib), "{out}");
    assert!(s.get(&lib_nar).is_some());
    assert!(s.get(&app2_nar).is_none() && s.get(&own_nar).is_none(), "NARs no narinfo names are gone");
    match &s.moto {
        None => {
            assert_eq!(check_closed(&s.n.cache()), Ok(2));
            let v = output(Command::new("nix").args(["store", "verify", "--store", &s.url(), "--sigs-needed", "1", &app1]).args(["--option", "trusted-public-keys", &s.n.public_key]).env("NIX_CONF_DIR", &s.n.nix_conf));
            assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
        }
        Some(_) => assert!(s.listing().keys().filter(|k| k.ends_with(".narinfo")).count() == 2),
    }
    let client = s.n.substitute_from(&app1, &s.url());
    assert!(client.join(&lib[1..]).exists());
}

#[test]
fn gc_keeps_the_pinned_app_and_the_shared_dep_file() {
    pinned_app_and_shared_dep_survive(false);
}

#[test]
fn gc_keeps_the_pinned_app_and_the_shared_dep_s3() {
    pinned_app_and_shared_dep_survive(true);
}

/// Hazard 1: the daemon remembers the dependency as uploaded; gc removed it; a new build over
/// it through the same running daemon must upload it again, not complete a broken closure.
#[test]
fn after_gc_a_new_build_over_a_removed_dependency_uploads_it_again() {
    let mut s = TestCache::new("gc-again", false);
    s.n.start();
    let u = unique();
    let lib_name = format!("lib-{u}");
    let leaves = [("lib", lib_name.as_str())];
    let first = s.n.build(&with_leaves(&leaves, &app(&format!("first-{u}"), &["lib"]))).0[0].clone();
    s.n.wait(60);
    let lib = closure(&[first.clone()]).into_iter().find(|p| p.ends_with(&format!("lib-{u}"))).unwrap();
    s.wait_root(&first);
    s.ok(&["gc", "--keep-days", "0", "--grace", "0s"]);
    assert!(!s.has(&lib) && !s.has(&first));
    // lib is in the local store: Nix builds only `second`, and the hook hands its closure over.
    let second = s.n.build(&with_leaves(&leaves, &app(&format!("second-{u}"), &["lib"]))).0[0].clone();
    s.n.wait(90);
    assert!(s.has(&second) && s.has(&lib), "the dependency was not uploaded again: {}", s.n.daemon_log());
    assert_eq!(check_closed(&s.n.cache()), Ok(2));
    s.n.substitute(&second);
}

/// `--dry-run` deletes nothing (the listing is identical); `--max-size` gives up the oldest
/// roots first and never a pin.
fn max_size_and_dry_run(s3: bool) {
    let mut s = TestCache::new(if s3 { "gc-max-s3" } else { "gc-max" }, s3);
    s.n.start();
    let u = unique();
    let mut apps = Vec::new();
    for name in ["oldest", "middle", "newest"] {
        // Each with its own contents, a few KiB, so that sizes decide.
        let p = s.n.build(&sh_drv(&format!("{name}-{u}"), &format!("head -c 3000 /dev/urandom > $out; echo {name} >> $out"))).0[0].clone();
        s.n.wait(60);
        s.wait_root(&p);
        apps.push(p);
        std::thread::sleep(Duration::from_millis(1100));
    }
    s.ok(&["pin", "old", &apps[0]]);
    let before = s.listing();
    let out = s.ok(&["gc", "--keep-days", "0", "--grace", "0s", "--dry-run"]);
    assert!(out.contains(&format!("would remove {}", apps[1])) && out.contains("would remove"), "{out}");
    assert_eq!(s.listing(), before, "--dry-run changed the bucket");

    let size = |p: &str| {
        let ni = s.get(&format!("{}.narinfo", hash(p))).unwrap();
        ni.len() + s.get(&s.nar_of(p)).unwrap().len()
    };
    // Room for the pin and one root: the newest stays, the middle one goes.
    let max = size(&apps[0]) + size(&apps[2]) + 100;
    assert!(max < size(&apps[0]) + size(&apps[1]) + size(&apps[2]));
    let json = s.ok(&["gc", "--keep-days", "30", "--grace", "0s", "--max-size", &max.to_string(), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["paths"], serde_json::json!([apps[1]]), "{json}");
    assert!(s.has(&apps[0]) && s.has(&apps[2]) && !s.has(&apps[1]));
    // Now even a tiny limit keeps the pin.
    s.ok(&["gc", "--keep-days", "30", "--grace", "0s", "--max-size", "1"]);
    assert!(s.has(&apps[0]) && !s.has(&apps[2]));
    s.n.substitute_from(&apps[0], &s.url());
}

#[test]
fn max_size_gives_up_oldest_roots_never_a_pin_and_dry_run_changes_nothing() {
    max_size_and_dry_run(false);
}

#[test]
fn max_size_and_dry_run_s3() {
    max_size_and_dry_run(true);
}

/// Hazards 1–3 under load: `gc` runs in a loop (two at once at times) while builds with the
/// hook and `narq push` go on over shared dependencies, and some roots expire (their objects
/// removed, as age would); a watcher checks the cache at every look; at the end every closure
/// still rooted substitutes. `NARQ_TEST_GC_SECS` sets how long (default 60 s).
#[test]
fn gc_in_a_loop_while_builds_and_pushes_run_never_breaks_a_closure() {
    let secs: u64 = std::env::var("NARQ_TEST_GC_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let mut s = TestCache::new("gc-loop", false);
    s.n.start();
    let cache = s.n.cache();
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (stop, cache) = (stop.clone(), cache.clone());
        std::thread::spawn(move || {
            let mut looks = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if let Err(e) = check_closed(&cache) {
                    return Err(e);
                }
                looks += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(looks)
        })
    };
    let collectors: Vec<_> = (0..2)
        .map(|i| {
            let (stop, config) = (stop.clone(), s.n.config.clone());
            std::thread::spawn(move || {
                let (mut runs, mut removed) = (0, 0);
                // The second collector starts later: at times two run at once.
                std::thread::sleep(Duration::from_secs(5 * i));
                while !stop.load(Ordering::Relaxed) && runs < 2000 {
                    let out = output(Command::new(bin("narq")).args(["gc", "--keep-days", "1", "--grace", "0s"]).env("NARQ_CONFIG", &config));
                    if !out.status.success() {
                        return Err(format!("gc run {runs} failed: {}", String::from_utf8_lossy(&out.stderr)));
                    }
                    removed += String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with("removed /nix/store/")).count();
                    runs += 1;
                    std::thread::sleep(Duration::from_millis(300));
                }
                Ok((runs, removed))
            })
        })
        .collect();
    let u = unique();
    let names: Vec<String> = (0..3).map(|k| format!("d{k}-{u}")).collect();
    let leaves = [("d0", names[0].as_str()), ("d1", names[1].as_str()), ("d2", names[2].as_str())];
    let start = Instant::now();
    let mut kept = Vec::new();
    let mut i = 0;
    while start.elapsed() < Duration::from_secs(secs) && i < 200 {
        let dep = ["d0", "d1", "d2"][i % 3];
        let expr = with_leaves(&leaves, &app(&format!("app{i}-{u}"), &[dep]));
        let p = if i % 2 == 0 {
            s.n.build(&expr).0[0].clone()
        } else {
            // Built without the hook, then pushed.
            let p = nix_build(&nix_conf(&s.n.dir.join(format!("plain{i}")), None), &expr, &[])[0].clone();
            s.ok(&["push", &p]);
            p
        };
        // Every third root expires at once (its object removed, as age would): its closure
        // becomes garbage while others still use the shared dependency.
        if i % 3 == 2 {
            s.n.wait(120);
            s.wait_root(&p);
            std::fs::remove_file(cache.join(format!("narq/roots/{}", hash(&p)))).unwrap();
        } else {
            kept.push(p);
        }
        i += 1;
    }
    s.n.wait(180);
    stop.store(true, Ordering::Relaxed);
    let runs: Vec<(i32, usize)> = collectors.into_iter().map(|c| c.join().unwrap().unwrap_or_else(|e| panic!("{e}"))).collect();
    let looks = watcher.join().unwrap().unwrap_or_else(|e| panic!("a closure was broken: {e}\ndaemon log:\n{}", s.n.daemon_log()));
    eprintln!("{i} builds; (gc runs, paths removed) per collector: {runs:?}; {looks} looks");
    assert!(runs.iter().map(|r| r.1).sum::<usize>() >= 2, "gc removed too little to test anything: {runs:?}");
    let again = s.n.daemon_log().matches("was removed from the cache; it is uploaded again first").count();
    eprintln!("uploads that found a reference collected and waited for it: {again}");
    // A last gc once everything is quiet, then every kept closure substitutes.
    s.ok(&["gc", "--keep-days", "1", "--grace", "0s"]);
    check_closed(&cache).unwrap();
    for p in &kept {
        assert!(s.has(p), "{p} (rooted) is gone: {}", s.n.daemon_log());
    }
    for p in kept.iter().rev().take(6) {
        s.n.substitute(p);
    }
}

/// A pin names a path in the cache, and a name that is a file name; unpin of an unknown name
/// fails; usage errors exit 2.
#[test]
fn pin_checks_its_path_and_name_and_bad_options_are_usage_errors() {
    let s = TestCache::new("gc-pin", false);
    let p = nix_build(&nix_conf(s.n.dir.path(), None), &sh_drv(&format!("pinme-{}", unique()), "echo > $out"), &[])[0].clone();
    let out = s.narq(&["pin", "x", &p]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not in the cache"));
    let out = s.narq(&["pin", "../x", &p]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("pin name"), "{out:?}");
    assert_eq!(s.narq(&["unpin", "nope"]).status.code(), Some(1));
    for bad in [&["gc", "--grace", "3x"][..], &["gc", "--max-size", "lots"], &["gc", "--keep-days", "-1"], &["rm"]] {
        let out = s.narq(bad);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {out:?}");
    }
    std::fs::write(&s.n.config, format!("{}\n[gc]\ngrace = \"soon\"\n", std::fs::read_to_string(&s.n.config).unwrap())).unwrap();
    let out = s.narq(&["gc", "--dry-run"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&s.n.config.display().to_string()) && err.contains("gc.grace"), "{err}");
}

/// `services.narq.gc`: a timer and a oneshot `narq gc` with the daemon's hardening, user and
/// credentials; `[gc]` in the rendered config loads; the units pass systemd's own checker.
#[test]
fn nixos_module_runs_gc_on_a_timer() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let t = TempDir::new("gc-units");
    std::fs::create_dir_all(t.join("pkg/bin")).unwrap();
    std::os::unix::fs::symlink(bin("narq"), t.join("pkg/bin/narq")).unwrap();
    let eval = |expr: &str| -> serde_json::Value { serde_json::from_str(&run(Command::new("nix-instantiate").args(["--eval", "--strict", "--json", "-E", expr]))).unwrap() };
    let u = eval(&format!(
        r#"import {}/nixos-module/units.nix {{ narq = "{}"; configFile = "/etc/narq.toml"; socket = "/run/narq/narq.sock"; environmentFile = "/etc/narq/aws.env"; gcDates = "daily"; }}"#,
        repo.display(),
        t.join("pkg").display()
    ));
    let (svc, timer) = (&u["gcService"]["serviceConfig"], &u["gcTimer"]);
    assert_eq!(svc["Type"], "oneshot");
    assert_eq!(svc["ExecStart"], format!("{}/bin/narq gc --config /etc/narq.toml", t.join("pkg").display()));
    assert_eq!((&svc["User"], &svc["DynamicUser"], &svc["StateDirectory"]), (&"narq".into(), &true.into(), &"narq".into()));
    assert_eq!(svc["EnvironmentFile"], "/etc/narq/aws.env");
    assert_eq!(svc["ProtectSystem"], "strict");
    assert_eq!(timer["timerConfig"]["OnCalendar"], "daily");
    assert_eq!(timer["wantedBy"], serde_json::json!(["timers.target"]));

    // The options reach `[gc]` of the config, which narq reads.
    let cfg = r#"{ secretKeyFiles = [ ]; settings = { store = "file:///tmp/c"; publicKeys = [ ]; socket = "/s"; jobs = 4; upstream = [ ]; allowedUsers = [ ]; }; gc = { enable = true; dates = "weekly"; keepDays = 7; maxSize = "500G"; }; }"#;
    let dir = repo.join("nixos-module");
    let toml = eval(&format!("import {}/toml.nix (import {}/settings.nix {cfg})", dir.display(), dir.display()));
    let c = narq::config::Config::parse(toml.as_str().unwrap(), None).unwrap();
    assert_eq!((c.gc.keep_days, c.gc.max_size), (7, Some(500 << 30)));

    // As unit files, through systemd-analyze verify.
    let ini = |section: &str, v: &serde_json::Value| -> String {
        let mut s = format!("[{section}]\n");
        for (k, v) in v.as_object().unwrap() {
            let v = match v {
                serde_json::Value::Array(a) => a.iter().map(|x| x.as_str().unwrap().to_string()).collect::<Vec<_>>().join(" "),
                serde_json::Value::Bool(b) => b.to_string(),
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            s.push_str(&format!("{k}={v}\n"));
        }
        s
    };
    let service = format!(
        "[Unit]\nDescription={}\n{}Environment=NARQ_CONFIG=/etc/narq.toml\n",
        u["gcService"]["description"].as_str().unwrap(),
        ini("Service", svc)
    );
    let timer_text = format!("[Unit]\nDescription=x\n{}[Install]\nWantedBy=timers.target\n", ini("Timer", &timer["timerConfig"]));
    std::fs::write(t.join("narq-gc.service"), service).unwrap();
    std::fs::write(t.join("narq-gc.timer"), timer_text).unwrap();
    let out = output(Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(t.join("narq-gc.timer")).arg(t.join("narq-gc.service")));
    assert!(out.status.success(), "systemd-analyze verify: {}", String::from_utf8_lossy(&out.stderr));
}
