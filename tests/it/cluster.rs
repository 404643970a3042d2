//! narq against a real distributed object store (issue 20): the 3-node Garage cluster of
//! [`crate::garage`], replication factor 3, with nodes killed under uploads and under `gc`,
//! and two daemons writing through two nodes while `gc` runs through the third. After each:
//! `narq verify --deep` is clean and a fresh Nix client substitutes from the cluster.

use crate::garage::{self, Cluster, HEAL};
use crate::s3proxy::{Fault, S3Proxy};
use crate::util::*;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn text(o: &Output) -> String {
    format!("status {}\nstdout:\n{}\nstderr:\n{}", o.status, String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A bucket name of its own for each test and run.
fn bucket(tag: &str) -> String {
    format!("narq-{tag}-{}", &unique()[6..])
}

/// `narq verify --deep` is clean: every narinfo signed, its NAR whole and matching, its
/// references there.
fn deep_clean(n: &Narq) {
    let out = garage::narq(n, &["verify", "--deep"]);
    assert!(out.status.success(), "verify --deep: {}", text(&out));
}

/// [`deep_clean`] within `secs`. Seen in 2 of 5 runs here, right after the cluster said it
/// was healthy again: verify found the narinfo of a path gc had deleted (its NAR gone), as
/// if the node that missed the delete still listed it; in a run that passed, every node
/// answered 404 for that narinfo. Taken for Garage's anti-entropy not having passed yet (not
/// proven); each unclean verify is printed, and one still unclean after `secs` fails.
fn deep_clean_within(n: &Narq, secs: u64, what: &str) {
    let start = Instant::now();
    loop {
        let out = garage::narq(n, &["verify", "--deep"]);
        if out.status.success() {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(secs), "verify --deep not clean within {secs} s {what}: {}", text(&out));
        eprintln!("verify --deep {what}, after {:.0?}: {}", start.elapsed(), text(&out));
        std::thread::sleep(Duration::from_secs(5));
    }
}

/// `narq status` (JSON) and when its `uploaded` count reaches `at_least`, within `secs`.
fn wait_uploaded(n: &Narq, at_least: u64, secs: u64, what: &str) {
    let mut last = serde_json::Value::Null;
    let reached = wait_for(Duration::from_secs(secs), || {
        last = n.status();
        last["uploaded"].as_u64().unwrap_or(0) >= at_least
    });
    assert!(reached, "waited {secs} s for {at_least} uploads ({what}); status: {last}\n{}", n.daemon_log());
}

/// The scenario: a 400-path closure and a 77 MiB NAR pushed while one node, then a
/// second, is killed. With one node down uploads go on (write quorum 2 of 3); with two, they
/// pause with Garage's reason in `narq status` and nothing fails; once the nodes are back,
/// everything lands, `verify --deep` is clean and a fresh client substitutes the closure
/// through the node that was down longest.
#[test]
#[cfg_attr(narq_no_garage, ignore = "needs Garage: scripts/setup.sh builds it (NARQ_GARAGE names another)")]
fn garage_node_loss_pauses_uploads_and_loses_nothing() {
    let (_turn, c) = Cluster::get("garage_node_loss_pauses_uploads_and_loses_nothing");
    let b = bucket("loss");
    c.bucket(&b);
    let mut n = Narq::new("gloss", &format!("store = \"{}\"", c.store(&b, c.nodes[0].s3)));
    let u = unique();
    let leaves: String = (0..398).map(|i| format!("l{i} = {}; ", sh_drv(&format!("gloss-{i}-{u}"), &format!("echo {i} > $out")))).collect();
    let refs: String = (0..398).map(|i| format!("${{l{i}}} ")).collect();
    let expr = format!(
        "let {leaves}big = {}; in {}",
        sh_drv(&format!("gloss-big-{u}"), "head -c 80740352 /dev/urandom > $out"),
        sh_drv(&format!("gloss-top-{u}"), &format!("echo ${{big}} {refs} > $out")),
    );
    let t = Instant::now();
    let top = nix_build(&nix_conf(n.dir.path(), None), &expr, &[]).remove(0);
    let all = closure(std::slice::from_ref(&top));
    assert_eq!(all.len(), 400);
    eprintln!("built 400 paths in {:.1} s", t.elapsed().as_secs_f64());
    garage::start(&mut n);
    let (leaves, rest): (Vec<&String>, Vec<&String>) = all.iter().filter(|p| **p != top).partition(|p| !p.contains("-gloss-big-") && p.rsplit('-').nth(1).and_then(|i| i.parse::<u32>().ok()).is_some_and(|i| i < 200));
    let push = |paths: &[&String]| {
        let mut args = vec!["push"];
        args.extend(paths.iter().map(|p| p.as_str()));
        assert!(n.narq(&args).status.success());
    };

    // Half the leaves; node 2 killed while they go up: uploads go on (write quorum 2 of 3).
    push(&leaves);
    wait_uploaded(&n, 20, 120, "the first uploads");
    c.kill(2);
    // The other half and the 77 MiB path, with node 2 down.
    push(&rest);
    wait_uploaded(&n, 399, 600, "399 paths with node 2 down");
    // Node 1 killed too: no write quorum. The top's upload pauses with Garage's reason;
    // nothing fails.
    c.kill(1);
    push(&[&top]);
    let mut last = serde_json::Value::Null;
    let paused = wait_for(Duration::from_secs(180), || {
        last = n.status();
        last["target_error"].is_string()
    });
    assert!(paused, "uploads did not pause within 180 s with two of three nodes down: {last}\n{}", n.daemon_log());
    let reason = last["target_error"].as_str().unwrap().to_string();
    eprintln!("paused: {reason}");
    assert!(reason.to_lowercase().contains("quorum"), "Garage's reason is not shown: {reason}");
    // Nothing failed, nothing is taken for done: what waits for the store's answer (the top,
    // and what the daemon must confirm again) stays pending.
    assert!(last["failed"] == 0 && last["pending"].as_u64() >= Some(1), "{last}");
    // Nodes back: everything lands.
    c.revive(1);
    c.revive(2);
    c.wait_healthy("the cluster to heal with nodes 1 and 2 back");
    let wait = n.narq(&["wait", "--timeout", &HEAL.as_secs().to_string()]);
    assert!(wait.status.success(), "uploads did not finish within {} s of the nodes' return: {}\n{}", HEAL.as_secs(), text(&wait), n.daemon_log());
    let s = n.status();
    assert!(s["target_error"].is_null() && s["failed"] == 0, "{s}");
    assert!(n.daemon_log().contains("uploads resumed"), "{}", n.daemon_log());
    deep_clean(&n);
    n.substitute_from(&top, &c.web(&b, 2));
    n.kill9();
    let _ = Command::new("nix-store").arg("--delete").args(&all).output();
}

/// A node killed while `narq gc` deletes (its first DeleteObjects held by a proxy until the
/// node is dead): the collection finishes on the two nodes left, keeps the pinned closure,
/// removes the rest, and after the node returns the cache is clean and substitutes.
#[test]
#[cfg_attr(narq_no_garage, ignore = "needs Garage: scripts/setup.sh builds it (NARQ_GARAGE names another)")]
fn garage_node_killed_while_gc_deletes() {
    let (_turn, c) = Cluster::get("garage_node_killed_while_gc_deletes");
    let b = bucket("gckill");
    c.bucket(&b);
    let proxy = S3Proxy::start(c.nodes[0].s3);
    let mut n = Narq::new("gckill", &format!("store = \"{}\"", c.store(&b, proxy.port)));
    garage::start(&mut n);
    let u = unique();
    let conf = nix_conf(n.dir.path(), None);
    let expr = |name: &str| format!("let dep = {}; in {}", sh_drv(&format!("{name}-dep-{u}"), "echo dep > $out"), sh_drv(&format!("{name}-{u}"), "echo ${dep} > $out"));
    let keep = nix_build(&conf, &expr("gckeep"), &[]).remove(0);
    let lose = nix_build(&conf, &expr("gclose"), &[]).remove(0);
    for p in [&keep, &lose] {
        let push = n.narq(&["push", "--wait", p]);
        assert!(push.status.success(), "{}\n{}", text(&push), n.daemon_log());
    }
    let pin = garage::narq(&n, &["pin", "keep", &keep]);
    assert!(pin.status.success(), "{}", text(&pin));

    proxy.add("POST", "?delete", Fault::Stall(Duration::from_secs(3)), 1);
    let gc = std::thread::spawn({
        let n_config = n.config.clone();
        move || {
            output(
                scaled(Command::new(bin("narq")).args(["gc", "--keep-days", "0", "--grace", "0s"]))
                    .env("NARQ_CONFIG", n_config)
                    .env("AWS_ACCESS_KEY_ID", garage::KEY_ID)
                    .env("AWS_SECRET_ACCESS_KEY", garage::SECRET),
            )
        }
    });
    let deleting = wait_for(Duration::from_secs(120), || proxy.seen().iter().any(|r| r.target.contains("?delete")) || gc.is_finished());
    assert!(deleting, "gc sent no DeleteObjects within 120 s");
    c.kill(2);
    let out = gc.join().unwrap();
    assert!(out.status.success(), "gc with a node killed while it deleted: {}", text(&out));
    assert!(proxy.seen().iter().any(|r| r.target.contains("?delete") && r.fault != Fault::Pass && r.status == Some(200)), "the held delete did not succeed");
    c.revive(2);
    c.wait_healthy("the cluster to heal after gc");
    deep_clean_within(&n, 120, "after the node killed during gc came back");
    n.substitute_from(&keep, &c.web(&b, 2));
    assert_eq!(c.web_status(&b, 2, &format!("{}.narinfo", hash(&keep))), 200);
    assert_eq!(c.web_status(&b, 2, &format!("{}.narinfo", hash(&lose))), 404, "gc kept the unpinned path");
}

/// Two daemons writing through two nodes' endpoints (a shared dependency, new closures as
/// they go) while `narq gc` collects through the third, three times: the cache is closed at
/// the end (`verify --deep`), the pinned closures substitute, and what gc took of the
/// latest pushes comes back with a push.
#[test]
#[cfg_attr(narq_no_garage, ignore = "needs Garage: scripts/setup.sh builds it (NARQ_GARAGE names another)")]
fn garage_two_daemons_and_gc_through_three_nodes() {
    let (_turn, c) = Cluster::get("garage_two_daemons_and_gc_through_three_nodes");
    let b = bucket("three");
    c.bucket(&b);
    let mut x = Narq::new("gthree-x", &format!("store = \"{}\"", c.store(&b, c.nodes[0].s3)));
    let mut y = Narq::new("gthree-y", &format!("store = \"{}\"", c.store(&b, c.nodes[1].s3)));
    let mut gcn = Narq::new("gthree-gc", &format!("store = \"{}\"", c.store(&b, c.nodes[2].s3)));
    // One cache, one key: the builders share it (the shared dependency is signed by whoever
    // uploaded it first).
    for other in [&mut y, &mut gcn] {
        std::fs::copy(x.dir.join("key.sec"), other.dir.join("key.sec")).unwrap();
        other.public_key = x.public_key.clone();
    }
    garage::start(&mut x);
    garage::start(&mut y);
    let u = unique();
    let shared = sh_drv(&format!("gthree-shared-{u}"), "echo shared > $out");
    let app = |who: &str, i: usize| {
        format!(
            "let shared = {shared}; own = {}; in {}",
            sh_drv(&format!("gthree-{who}-own{i}-{u}"), &format!("echo {who} {i} > $out")),
            sh_drv(&format!("gthree-{who}-app{i}-{u}"), "echo ${shared} ${own} > $out")
        )
    };
    let conf = nix_conf(x.dir.path(), None);
    let (x0, y0) = (nix_build(&conf, &app("x", 0), &[]).remove(0), nix_build(&conf, &app("y", 0), &[]).remove(0));
    for (n, p) in [(&x, &x0), (&y, &y0)] {
        let push = n.narq(&["push", "--wait", p]);
        assert!(push.status.success(), "{}\n{}", text(&push), n.daemon_log());
    }
    for (name, p) in [("x", &x0), ("y", &y0)] {
        let pin = garage::narq(&gcn, &["pin", name, p]);
        assert!(pin.status.success(), "{}", text(&pin));
    }
    // Three collections, while each daemon pushes a new app before each.
    let (mut latest, mut removed) = (Vec::new(), 0);
    for round in 1..=3 {
        let (xa, ya) = (nix_build(&conf, &app("x", round), &[]).remove(0), nix_build(&conf, &app("y", round), &[]).remove(0));
        assert!(x.narq(&["push", &xa]).status.success() && y.narq(&["push", &ya]).status.success());
        let gc = garage::narq(&gcn, &["gc", "--keep-days", "0", "--grace", "0s"]);
        assert!(gc.status.success(), "gc round {round}: {}", text(&gc));
        let said = String::from_utf8_lossy(&gc.stdout).lines().last().unwrap_or("").to_string();
        eprintln!("gc round {round}: {said}");
        removed += said.split_whitespace().nth(2).and_then(|n| n.parse::<u32>().ok()).unwrap_or(0);
        latest = vec![(xa, &x), (ya, &y)];
    }
    assert!(removed > 0, "the collections removed nothing: the test proves nothing");
    for n in [&x, &y] {
        n.wait(HEAL.as_secs() as u32);
    }
    deep_clean(&gcn);
    for p in [&x0, &y0] {
        gcn.substitute_from(p, &c.web(&b, 2));
    }
    // The latest apps may have been collected (nothing pinned them): a push brings them back.
    for (p, n) in &latest {
        let push = n.narq(&["push", "--wait", p]);
        assert!(push.status.success(), "{}\n{}", text(&push), n.daemon_log());
        gcn.substitute_from(p, &c.web(&b, 0));
    }
    deep_clean(&gcn);
}

/// Issue 20 items 4 and 5: without `region=garage` the refusal names the region; with it and
/// `addressing-style=virtual`, against Garage's `root_domain`: narq reaches
/// `<bucket>.s3.garage.localhost` through `http_proxy` (a proxy that takes virtual-hosted
/// requests only, so a path-style one would be refused): a closure with a streamed NAR lands,
/// `verify --deep` is clean, and a fresh client substitutes it.
#[test]
#[cfg_attr(narq_no_garage, ignore = "needs Garage: scripts/setup.sh builds it (NARQ_GARAGE names another)")]
fn garage_virtual_hosted_addressing_through_root_domain() {
    use crate::s3proxy::Service;
    let (_turn, c) = Cluster::get("garage_virtual_hosted_addressing_through_root_domain");
    let b = bucket("vhost");
    c.bucket(&b);
    // Without its region, the refusal names it.
    let bare = Narq::new("gvhost-region", "");
    let out = garage::narq(&bare, &["verify", "--store", &format!("s3://{b}?endpoint=127.0.0.1:{}&scheme=http", c.nodes[0].s3)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("AuthorizationHeaderMalformed") && err.contains("set region=garage in the store URL"), "{err}");
    let proxy = S3Proxy::start(c.nodes[0].s3);
    proxy.service(Service::VirtualHostedOnly { domain: "s3.garage.localhost" });
    let store = format!("s3://{b}?endpoint=http://s3.garage.localhost:{}&region=garage&addressing-style=virtual", c.nodes[0].s3);
    let mut n = Narq::new("gvhost", &format!("store = \"{store}\""));
    let via = format!("http://127.0.0.1:{}", proxy.port);
    let env = [("http_proxy", via.as_str())];
    garage::start_env(&mut n, &env);
    let u = unique();
    let expr = format!(
        "let big = {}; in {}",
        sh_drv(&format!("gvhost-big-{u}"), "head -c 12000000 /dev/urandom > $out"),
        sh_drv(&format!("gvhost-top-{u}"), "echo ${big} > $out"),
    );
    let top = nix_build(&nix_conf(n.dir.path(), None), &expr, &[]).remove(0);
    let push = n.narq(&["push", "--wait", &top]);
    assert!(push.status.success(), "{}\n{}", text(&push), n.daemon_log());
    let verify = garage::narq_env(&n, &env, &["verify", "--deep"]);
    assert!(verify.status.success(), "verify --deep: {}", text(&verify));
    let seen = proxy.seen();
    let host = format!("{b}.s3.garage.localhost:{}", c.nodes[0].s3);
    assert!(seen.iter().any(|r| r.target.contains("partNumber=")), "the big NAR did not stream: {seen:#?}");
    assert!(seen.iter().all(|r| r.header("host") == Some(host.as_str()) && r.status.is_some_and(|s| s < 400 || s == 404)), "{seen:#?}");
    n.substitute_from(&top, &c.web(&b, 0));
    let _ = Command::new("nix-store").arg("--delete").args(closure(std::slice::from_ref(&top))).output();
}
