//! `narq verify`, `--repair` and `narq sign` (issue 11) on caches narq wrote, damaged by
//! hand, against both backends (`file://` and S3 on moto), with `nix store verify` and a
//! fresh Nix client as the judges.

use crate::cache_under_test::TestCache;
use crate::util::*;
use narq::nix::{NarInfo, SecretKey};
use std::process::{Command, Output};

/// A started cache under test; tags are `v<tag>f` (`file://`) and `v<tag>s3`.
fn started(tag: &str, s3: bool) -> TestCache {
    let mut c = TestCache::new(&format!("v{tag}{}", if s3 { "s3" } else { "f" }), s3);
    c.n.start();
    c
}

impl TestCache {
    fn put_narinfo(&self, ni: &NarInfo) {
        self.put(&format!("{}.narinfo", ni.info.path.hash_part()), ni.to_string().as_bytes());
    }

    /// GET requests for narinfos the S3 server has logged.
    fn narinfo_gets(&self) -> usize {
        let m = self.moto.as_ref().expect("an S3 cache");
        std::fs::read_to_string(&m.log).unwrap_or_default().lines().filter(|l| l.contains("\"GET ") && l.contains(".narinfo")).count()
    }

    /// `nix store verify` of `paths` in this cache (contents included), trusting `keys`.
    fn nix_verify(&self, keys: &str, sigs: u32, paths: &[&str]) -> Output {
        let cache_home = self.n.dir.join(format!("xdg-{}", unique()));
        output(
            Command::new("nix")
                .args(["store", "verify", "--store", &self.url(), "--sigs-needed", &sigs.to_string()])
                .args(["--option", "trusted-public-keys", keys])
                .args(paths)
                .env("NIX_CONF_DIR", &self.n.nix_conf)
                .env("XDG_CACHE_HOME", cache_home),
        )
    }
}

/// Runs `scenario` against a `file://` cache and an S3 one, side by side.
fn each_backend(tag: &str, scenario: impl Fn(&TestCache) + Sync) {
    std::thread::scope(|s| {
        let file = s.spawn(|| scenario(&started(tag, false)));
        let s3 = s.spawn(|| scenario(&started(tag, true)));
        let (file, s3) = (file.join(), s3.join());
        if let Err(e) = file {
            std::panic::resume_unwind(e);
        }
        if let Err(e) = s3 {
            std::panic::resume_unwind(e);
        }
    });
}

/// A closure of seven paths, one for each damage: `top` references a, b, c, d and e; e
/// references f. Returns the paths by name.
fn build_closure(c: &TestCache, tag: &str) -> std::collections::BTreeMap<String, String> {
    let u = unique();
    let d = |name: &str, script: &str| sh_drv(&format!("{tag}-{name}-{u}"), script);
    let expr = format!(
        "let f = {}; e = {}; a = {}; b = {}; c = {}; d = {}; top = {}; in [ top a b c d e f ]",
        d("f", &format!("echo f-{u} > $out")),
        d("e", "echo ${f} > $out"),
        d("a", &format!("echo a-{u} > $out")),
        d("b", "head -c 100000 /dev/urandom > $out"),
        d("c", &format!("echo c-{u} > $out")),
        d("d", &format!("echo d-{u} > $out")),
        d("top", "echo ${a} ${b} ${c} ${d} ${e} > $out"),
    );
    let (outs, _) = c.n.build(&expr);
    c.n.wait(60);
    ["top", "a", "b", "c", "d", "e", "f"].iter().zip(outs).map(|(k, p)| (k.to_string(), p)).collect()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// The lines of `narq verify` output that name `path` and mention `what`.
fn reported(out: &Output, path: &str, what: &str) -> bool {
    String::from_utf8_lossy(&out.stdout).lines().any(|l| l.starts_with(path) && l.contains(what))
}

#[test]
fn verify_finds_each_damage_as_nix_does_and_repair_heals_it() {
    each_backend("dmg", |c| {
        let p = build_closure(c, "dmg");
        let sound = c.narq(&["verify", "--deep"]);
        assert!(sound.status.success(), "a fresh cache is not sound: {}", text(&sound));

        // The damage: a's NAR deleted, b's NAR corrupted (same size), c's signature removed,
        // d signed only by a key nobody trusts, f's narinfo deleted (e references it).
        let a = c.narinfo(&p["a"]);
        c.delete(&a.url);
        let b = c.narinfo(&p["b"]);
        let mut nar = c.get(&b.url).unwrap();
        let mid = nar.len() / 2;
        nar[mid] ^= 0xff;
        c.put(&b.url, &nar);
        let mut ci = c.narinfo(&p["c"]);
        ci.info.sigs.clear();
        c.put_narinfo(&ci);
        let mut di = c.narinfo(&p["d"]);
        di.info.sigs.clear();
        di.info.sign(&SecretKey::generate("untrusted-1").unwrap());
        c.put_narinfo(&di);
        c.delete(&format!("{}.narinfo", hash(&p["f"])));

        let shallow = c.narq(&["verify"]);
        assert_eq!(shallow.status.code(), Some(1), "{}", text(&shallow));
        assert!(reported(&shallow, &p["a"], "nar-missing"), "{}", text(&shallow));
        assert!(reported(&shallow, &p["c"], "0 valid signatures") && reported(&shallow, &p["c"], "no signatures"), "{}", text(&shallow));
        assert!(reported(&shallow, &p["d"], "signatures by untrusted-1"), "{}", text(&shallow));
        assert!(reported(&shallow, &p["e"], &format!("references {}", p["f"])), "{}", text(&shallow));
        assert!(!reported(&shallow, &p["b"], ""), "a same-size corruption is found only by --deep: {}", text(&shallow));
        let summary = String::from_utf8_lossy(&shallow.stdout).lines().last().unwrap_or("").to_string();
        assert!(summary.contains("checked 6 paths") && summary.contains("4 problems"), "{summary}");

        let deep = c.narq(&["verify", "--deep", "--json"]);
        assert_eq!(deep.status.code(), Some(1), "{}", text(&deep));
        let json: serde_json::Value = serde_json::from_slice(&deep.stdout).unwrap();
        let kinds: Vec<(String, String)> = json["problems"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["subject"].as_str().unwrap().to_string(), p["kind"].as_str().unwrap().to_string()))
            .collect();
        let want: Vec<(String, String)> = [("a", "nar-missing"), ("b", "nar-corrupt"), ("c", "signatures"), ("d", "signatures"), ("e", "reference-missing")]
            .iter()
            .map(|(k, kind)| (p[*k].clone(), kind.to_string()))
            .collect();
        let mut kinds_sorted = kinds.clone();
        kinds_sorted.sort();
        let mut want_sorted = want.clone();
        want_sorted.sort();
        assert_eq!(kinds_sorted, want_sorted, "{}", text(&deep));

        // Nix agrees on every path it checks the same way (it does not look at references):
        // damaged and sound alike, each named on its own.
        for name in ["top", "a", "b", "c", "d", "f"] {
            let ours = c.narq(&["verify", "--deep", &p[name]]).status.success();
            let nix = c.nix_verify(&c.n.public_key, 1, &[&p[name]]);
            assert_eq!(ours, nix.status.success(), "{name} in {}: narq says sound={ours}, nix store verify: {}", c.url(), text(&nix));
            assert_eq!(ours, name == "top", "{name}");
        }

        // Repair: every damaged path is valid here; the daemon uploads them again.
        let repair = c.narq(&["verify", "--deep", "--repair"]);
        assert!(repair.status.success(), "{}\n{}", text(&repair), c.n.daemon_log());
        for name in ["a", "b", "c", "d", "f"] {
            assert!(reported(&repair, &p[name], "repaired"), "{name}: {}", text(&repair));
        }
        let after = c.narq(&["verify", "--deep"]);
        assert!(after.status.success(), "after repair: {}", text(&after));
        let all: Vec<&str> = p.values().map(String::as_str).collect();
        assert!(c.nix_verify(&c.n.public_key, 1, &all).status.success());
        c.n.substitute_from(&p["top"], &c.url());
    });
}

#[test]
fn repair_lists_what_it_cannot_heal_and_deletes_nothing() {
    let c = started("norep", false);
    let p = build_closure(&c, "norep");
    // A narinfo for a path this machine does not have: signed and with its NAR, but it
    // references a path the cache lacks. Nothing local can heal it.
    let mut ghost = c.narinfo(&p["e"]);
    ghost.info.path = narq::nix::StorePath::parse(&p["e"].replace(hash(&p["e"]), &"1".repeat(32))).unwrap();
    ghost.info.references = [narq::nix::StorePath::parse(&p["f"].replace(hash(&p["f"]), &"2".repeat(32))).unwrap()].into();
    ghost.info.sigs.clear();
    ghost.info.sign(&SecretKey::read(&c.n.dir.join("key.sec")).unwrap());
    c.put_narinfo(&ghost);
    c.put("nar/orphan.nar", b"not named by any narinfo");
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
    std::fs::File::options().write(true).open(c.n.cache().join("nar/orphan.nar")).unwrap().set_modified(old).unwrap();
    let out = c.narq(&["verify", "--repair"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let missing = ghost.info.references.iter().next().unwrap().to_string();
    assert!(reported(&out, &missing, "cannot repair: not valid in the local store"), "{}", text(&out));
    assert!(reported(&out, "nar/orphan.nar", "no narinfo names it (24 bytes)"), "{}", text(&out));
    assert!(reported(&out, "nar/orphan.nar", "cannot repair"), "{}", text(&out));
    assert!(c.get("nar/orphan.nar").is_some(), "verify deleted an orphan");
    assert!(String::from_utf8_lossy(&out.stdout).contains("orphan NARs: 1 (24 bytes)"), "{}", text(&out));
}

#[test]
fn sign_adds_a_second_key_and_refuses_what_differs_locally() {
    each_backend("sign", |c| {
        let p = build_closure(c, "sign");
        let (sk2, pk2) = (c.n.dir.join("second.sec"), c.n.dir.join("second.pub"));
        run(Command::new("nix-store").args(["--generate-binary-cache-key", "second-1"]).arg(&sk2).arg(&pk2));
        let pk2 = std::fs::read_to_string(&pk2).unwrap().trim().to_string();
        let both = format!("{} {pk2}", c.n.public_key);
        let paths: Vec<&str> = p.values().map(String::as_str).collect();
        let before: Vec<NarInfo> = paths.iter().map(|x| c.narinfo(x)).collect();

        // Two signatures needed, one key's there: both narq and Nix refuse.
        let two = |keys: &str| c.narq(&["verify", "--sigs-needed", "2", "--trusted-public-keys", keys]);
        assert_eq!(two(&both).status.code(), Some(1));
        assert!(!c.nix_verify(&both, 2, &paths).status.success());

        let mut args = vec!["sign", "--key-file", sk2.to_str().unwrap()];
        args.extend(&paths);
        let out = c.narq(&args);
        assert!(out.status.success(), "{}", text(&out));
        assert!(String::from_utf8_lossy(&out.stdout).contains("signed 7 paths with second-1"), "{}", text(&out));
        for (old, x) in before.iter().zip(&paths) {
            let now = c.narinfo(x);
            assert_eq!(now.info.sigs.len(), 2, "{x}");
            assert!(old.info.sigs.is_subset(&now.info.sigs), "{x}: a signature was lost");
            // Byte for byte what Nix writes for the path with both signatures.
            let mut want = old.clone();
            want.info.sigs = now.info.sigs.clone();
            assert_eq!(String::from_utf8(c.get(&format!("{}.narinfo", hash(x))).unwrap()).unwrap(), want.to_string());
        }
        assert!(two(&both).status.success(), "{}", text(&two(&both)));
        assert_eq!(two(&c.n.public_key).status.code(), Some(1));
        let nix = c.nix_verify(&both, 2, &paths);
        assert!(nix.status.success(), "{}", text(&nix));
        assert!(!c.nix_verify(&pk2, 2, &paths).status.success());
        // Signing again adds nothing.
        let again = c.narq(&args);
        assert!(String::from_utf8_lossy(&again.stdout).contains("signed 0 paths with second-1; 7 were signed by it already"), "{}", text(&again));

        // A narinfo whose NarHash is not the local store's is refused, and left alone.
        let (sk3, pk3) = (c.n.dir.join("third.sec"), c.n.dir.join("third.pub"));
        run(Command::new("nix-store").args(["--generate-binary-cache-key", "third-1"]).arg(&sk3).arg(&pk3));
        let mut odd = c.narinfo(&p["a"]);
        odd.info.nar_hash = narq::nix::Sha256::digest(b"something else");
        c.put_narinfo(&odd);
        let out = c.narq(&["sign", "--key-file", sk3.to_str().unwrap(), &p["a"], &p["c"]]);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert!(reported(&out, &p["a"], "not signed: the local store has NarHash"), "{}", text(&out));
        assert!(reported(&out, &p["c"], "signed"), "{}", text(&out));
        assert_eq!(c.narinfo(&p["a"]), odd, "a refused narinfo was changed");
    });
}

#[test]
fn a_warm_verify_reads_no_narinfo() {
    each_backend("warm", |c| {
        let p = build_closure(c, "warm");
        let json = |o: &Output| -> serde_json::Value { serde_json::from_slice(&o.stdout).unwrap_or_else(|_| panic!("{}", text(o))) };
        let cold = c.narq(&["verify", "--json"]);
        assert!(cold.status.success(), "{}", text(&cold));
        assert_eq!(json(&cold)["fetched"], 7);
        let gets = c.moto.as_ref().map(|_| c.narinfo_gets());
        let warm = c.narq(&["verify", "--json"]);
        assert!(warm.status.success(), "{}", text(&warm));
        assert_eq!((json(&warm)["fetched"].clone(), json(&warm)["checked"].clone()), (0.into(), 7.into()));
        if let Some(g) = gets {
            assert_eq!(c.narinfo_gets(), g, "the warm run read a narinfo from S3");
        }
        // A changed narinfo is read again, and only that one.
        let mut ci = c.narinfo(&p["c"]);
        ci.info.sigs.clear();
        c.put_narinfo(&ci);
        let changed = c.narq(&["verify", "--json"]);
        assert_eq!(json(&changed)["fetched"], 1);
        assert_eq!(json(&changed)["counts"]["signatures"], 1, "{}", text(&changed));
    });
}

#[test]
fn usage_errors_exit_2() {
    let n = Narq::new("vusage", "");
    for args in [
        &["verify", "--sigs-needed", "x"][..],
        &["verify", "--trusted-public-keys", "nocolon"],
        &["verify", "--store", "http://example.org"],
        &["verify", "--jobs", "0"],
        &["sign", "--key-file", "/dev/null"],
        &["sign", "--all", "/nix/store/00000000000000000000000000000000-x", "--key-file", "/dev/null"],
    ] {
        let out = n.narq(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.lines().next().is_some_and(|l| l.starts_with("error:")), "{args:?}: {err}");
    }
}
