//! Issue 18 item 5: mixed versions in one fleet. Builders upgrade one at a time, so daemons
//! and collectors of 64d1f2c (built by `scripts/setup-baseline.sh`) meet the new ones on one
//! cache, and a daemon is upgraded in place with work still queued. Where the baseline
//! binaries are missing, build.rs has the tests compiled ignored.
//!
//! The old binaries do not scale their durations, so every process here runs at the real
//! time scale (1): a collection takes its full 12 s lease, as in a real fleet.

use crate::adversary::*;
use crate::s3proxy::check_bucket_closed;
use crate::util::*;
use std::time::Duration;

/// The 64d1f2c binaries. Where they are missing, build.rs has the tests here compiled ignored.
fn baseline() -> Bins {
    Bins::baseline().unwrap_or_else(|| panic!("the 64d1f2c binaries are not in {BASELINE_DIR}: scripts/setup-baseline.sh builds them (then `touch build.rs`)"))
}

/// `lib` is shared by everything; `a*` become garbage, `c*` are pushed while the collectors
/// run.
const DRVS: &[(&str, &[&str])] = &[("lib", &[]), ("a1", &["lib"]), ("a2", &["lib"]), ("c1", &["lib"]), ("c2", &["lib"])];

/// An old daemon and a new one push onto one cache; an old `narq gc` and a new one collect
/// it at once while each daemon pushes a path over the shared dependency they are deleting.
/// Once both daemons' `narq wait` returned 0: the cache is closed, both paths pushed during
/// the collections are there and substitute. A collector may refuse (saying why) when it
/// sees writers it cannot vouch for; the promise holds either way.
fn old_and_new_side_by_side(s3: bool) {
    let test = if s3 { "mixed_s3" } else { "mixed_file" };
    let old = baseline();
    let t = TempDir::new(test);
    let (moto, bucket) = (s3.then(|| Moto::start(t.path(), &[])), format!("narq-{}", test.replace('_', "-")));
    let store = moto.as_ref().map(|m| {
        m.bucket(&bucket);
        format!("store = \"s3://{bucket}?endpoint=127.0.0.1:{}&scheme=http\"", m.port)
    });
    let mut new = Node::new(test, store.as_deref(), Bins::under_test());
    new.scale = 1.0;
    let mut oldn = new.sibling(&format!("{test}-old"), old.clone());
    new.start(&[]);
    oldn.start(&[]);
    let p = build_plain(new.n.dir.path(), DRVS, &unique());
    let check = || match &moto {
        None => check_closed(&new.n.cache()).map(|_| ()),
        Some(m) => check_bucket_closed(m.port, &bucket).map(|_| ()),
    };
    let url = match &moto {
        None => format!("file://{}", new.n.cache().display()),
        Some(m) => format!("http://127.0.0.1:{}/{bucket}", m.port),
    };
    oldn.ok(&["push", "--wait", &p["a1"]]);
    new.ok(&["push", "--wait", &p["a2"]]);
    check().unwrap();

    let mut gc_old = oldn.bg(&["gc", "--keep-days", "0", "--grace", "0s"], &[]);
    std::thread::sleep(Duration::from_millis(500));
    let mut gc_new = new.bg(&["gc", "--keep-days", "0", "--grace", "0s"], &[]);
    std::thread::sleep(Duration::from_secs(1));
    oldn.ok(&["push", &p["c1"]]);
    new.ok(&["push", &p["c2"]]);
    let bound = Duration::from_secs(LEASE as u64 + DEAD_AFTER as u64 + 60);
    let (g_old, g_new) = (gc_old.finish(bound), gc_new.finish(bound));
    eprintln!("old gc: {:?} {}{}\nnew gc: {:?} {}{}", g_old.code(), g_old.stdout, g_old.stderr, g_new.code(), g_new.stdout, g_new.stderr);
    assert!(!g_old.timed_out && !g_new.timed_out, "a collection did not end within {bound:?}");
    assert_eq!(g_old.code(), Some(0), "the old gc: {g_old:?}");
    assert!(g_new.code() == Some(0) || (g_new.code() == Some(1) && g_new.stderr.contains("refused")), "the new gc neither collected nor refused: {g_new:?}");
    for (name, n) in [("old", &oldn), ("new", &new)] {
        let w = n.wait(2 * DEAD_AFTER as u64 + 60);
        assert_eq!(w.code(), Some(0), "the {name} daemon's narq wait: {w:?}\n{}", n.log());
    }
    if let Err(e) = check() {
        panic!("both daemons' narq wait returned 0 and the cache is broken: {e}\nold daemon:\n{}\nnew daemon:\n{}", oldn.log(), new.log());
    }
    for top in ["c1", "c2"] {
        new.n.substitute_from(&p[top], &url);
    }
}

#[test]
#[cfg_attr(narq_no_baseline, ignore = "needs the 64d1f2c binaries: scripts/setup.sh builds them")]
fn old_and_new_daemons_and_collectors_file() {
    old_and_new_side_by_side(false);
}

#[test]
#[cfg_attr(narq_no_baseline, ignore = "needs the 64d1f2c binaries: scripts/setup.sh builds them")]
fn old_and_new_daemons_and_collectors_s3() {
    old_and_new_side_by_side(true);
}

/// An upgrade in place: the 64d1f2c daemon holds uploads it could not make (the S3 server
/// unreachable), one build more is spooled by the old hook while no daemon runs, and the new
/// daemon starts on the same state dir: everything is uploaded, nothing is lost.
#[test]
#[cfg_attr(narq_no_baseline, ignore = "needs the 64d1f2c binaries: scripts/setup.sh builds them")]
fn upgrade_in_place_carries_the_queue_over() {
    let old = baseline();
    let t = TempDir::new("upgrade");
    let moto = Moto::start(t.path(), &[]);
    let bucket = "narq-upgrade";
    moto.bucket(bucket);
    let proxy = Proxy::start(moto.port);
    let store = format!("store = \"s3://{bucket}?endpoint=127.0.0.1:{}&scheme=http\"", proxy.port);
    let mut n = Node::new("upgrade", Some(&store), old);
    n.start(&[]);
    proxy.set(false);
    let u = unique();
    let drvs: &[(&str, &[&str])] = &[("lib", &[]), ("mid", &["lib"]), ("top", &["mid"]), ("built", &["lib"]), ("spooled", &["mid"])];
    let p = build_plain(n.n.dir.path(), &drvs[..3], &u);
    n.ok(&["push", &p["top"]]);
    let built = n.build(&drv_expr(drvs, "built", &u)).remove(0);
    assert!(wait_for(Duration::from_secs(30), || n.status()["pending"].as_u64().is_some_and(|x| x >= 4)), "not pending: {}", n.status());
    eprintln!("old daemon, store unreachable: {}", n.status());
    n.stop();
    // The old hook, no daemon: the build is spooled.
    let spooled = n.build(&drv_expr(drvs, "spooled", &u)).remove(0);
    n.bins = Bins::under_test();
    nix_conf(n.n.dir.path(), Some(&n.bins.hook));
    n.start(&[]);
    proxy.set(true);
    let w = n.wait(120);
    assert_eq!(w.code(), Some(0), "{w:?}\n{}", n.log());
    let url = format!("http://127.0.0.1:{}/{bucket}", moto.port);
    check_bucket_closed(moto.port, bucket).unwrap_or_else(|e| panic!("{e}\n{}", n.log()));
    for top in [&p["top"], &built, &spooled] {
        n.n.substitute_from(top, &url);
    }
    let s = n.status();
    assert_eq!((s["pending"].as_u64(), s["failed"].as_u64()), (Some(0), Some(0)), "{s}");
}
