//! Issue 14, items 4–6: `exclude` filters and the upstream-key check, NAR listings
//! (`write-nar-listing=true`), and realisations of content-addressed derivations.

use crate::util::*;
use std::process::Command;

/// `nix --extra-experimental-features nix-command …`, with the test's nix.conf.
fn nix(conf: &std::path::Path, args: &[&str]) -> std::process::Output {
    output(Command::new("nix").args(["--extra-experimental-features", "nix-command"]).args(args).env("NIX_CONF_DIR", conf))
}

#[test]
fn write_nar_listing_writes_nix_s_listing_and_nix_store_ls_reads_it() {
    let mut n = Narq::new("listing", "");
    let cache = n.cache();
    std::fs::write(&n.config, std::fs::read_to_string(&n.config).unwrap() + &format!("store = \"file://{}?write-nar-listing=true\"\n", cache.display())).unwrap();
    n.start();
    let u = unique();
    let script = "mkdir -p $out/bin $out/share/doc; echo hi > $out/share/doc/README; printf '#!/bin/sh\\n' > $out/bin/run; \
                  chmod +x $out/bin/run; ln -s bin/run $out/link; : > $out/empty";
    let (outs, _) = n.build(&sh_drv(&format!("listed-{u}"), script));
    n.wait(60);
    let out = &outs[0];
    let hash = &out["/nix/store/".len().."/nix/store/".len() + 32];
    let ours = std::fs::read(cache.join(format!("{hash}.ls"))).expect("narq wrote no .ls");
    // What `nix copy` writes for the same path.
    let nix_cache = n.dir.join("nix-cache");
    let copied = nix(&n.nix_conf, &["copy", "--to", &format!("file://{}?write-nar-listing=true", nix_cache.display()), out]);
    assert!(copied.status.success(), "{}", String::from_utf8_lossy(&copied.stderr));
    let theirs = std::fs::read(nix_cache.join(format!("{hash}.ls"))).unwrap();
    assert!(ours == theirs, "ours: {}\nnix:  {}", String::from_utf8_lossy(&ours), String::from_utf8_lossy(&theirs));
    // Nix reads it: `nix store ls` answers from the listing of the binary cache.
    let store = format!("file://{}", cache.display());
    let ls = nix(&n.nix_conf, &["store", "ls", "--store", &store, "-lR", &format!("{out}/bin")]);
    assert!(ls.status.success(), "nix store ls: {}", String::from_utf8_lossy(&ls.stderr));
    let text = String::from_utf8_lossy(&ls.stdout);
    assert!(text.contains("-r-xr-xr-x") && text.contains("run"), "{text}");
    assert_eq!(check_closed(&cache), Ok(1));
}

/// A content-addressed derivation that depends on another, each builder adding a line to
/// `marker` (outside the store) when it runs.
pub fn ca_expr(u: &str, marker: &std::path::Path) -> String {
    let m = marker.display();
    let ca = |name: &str, script: &str| {
        format!(
            "derivation {{ name = \"{name}\"; system = builtins.currentSystem; builder = \"/bin/sh\"; PATH = \"/usr/bin:/bin\"; \
             __contentAddressed = true; outputHashMode = \"recursive\"; outputHashAlgo = \"sha256\"; args = [\"-c\" {script:?}]; }}"
        )
    };
    let dep = ca(&format!("ca-dep-{u}"), &format!("echo built >> {m}; echo dep-{u} > $out"));
    let top = ca(&format!("ca-top-{u}"), &format!("echo built >> {m}; mkdir $out; echo ${{dep}} > $out/dep"));
    format!("let dep = {dep}; in {top}")
}

pub fn lines(f: &std::path::Path) -> usize {
    std::fs::read_to_string(f).map_or(0, |s| s.lines().count())
}

/// The realisation objects of a cache: file name → text.
fn doi(cache: &std::path::Path) -> std::collections::BTreeMap<String, String> {
    let Ok(rd) = std::fs::read_dir(cache.join("realisations")) else { return Default::default() };
    rd.flatten().map(|e| (e.file_name().to_string_lossy().to_string(), std::fs::read_to_string(e.path()).unwrap())).collect()
}

/// Checks the build traces (Nix 2.35's layout) narq wrote to `cache` for a build of
/// [`ca_expr`] by a Nix whose `stderr` says which derivations it built and how it resolved
/// the top one: one per resolved derivation — the dep (it has no input derivations) and the
/// top's resolved form, not the top itself, which 2.35 never keys — each byte for byte what
/// Nix 2.35's test data (`src/libstore-tests/data/realisation/`) has for the same inputs, its
/// signature by `public_key` over 2.35's fingerprint. `top` is the top's output.
pub fn check_build_traces(cache: &std::path::Path, stderr: &str, top: &str, dep: &str, public_key: &str) {
    let quoted = |line: &str, n: usize| line.split('\'').nth(n).unwrap_or_else(|| panic!("{line}")).trim_start_matches("/nix/store/").to_string();
    let resolved = stderr.lines().find(|l| l.contains("resolved derivation: '")).unwrap_or_else(|| panic!("Nix resolved nothing: {stderr}"));
    let (original, resolved) = (quoted(resolved, 1), quoted(resolved, 3));
    let dep_drv = stderr.lines().find(|l| l.starts_with("building '") && l.contains("-ca-dep-")).map(|l| quoted(l, 1)).unwrap_or_else(|| panic!("{stderr}"));
    let mut found = std::collections::BTreeMap::new();
    for d in std::fs::read_dir(cache.join("build-trace-v2")).expect("no build-trace-v2/ in the cache").flatten() {
        for f in std::fs::read_dir(d.path()).unwrap().flatten() {
            let key = format!("{}/{}", d.file_name().to_string_lossy(), f.file_name().to_string_lossy());
            found.insert(key, std::fs::read_to_string(f.path()).unwrap());
        }
    }
    let want = [(format!("{dep_drv}/out.doi"), dep), (format!("{resolved}/out.doi"), top)];
    let mut keys: Vec<&String> = want.iter().map(|w| &w.0).collect();
    keys.sort();
    assert_eq!(found.keys().collect::<Vec<_>>(), keys, "{original} is resolved to {resolved}");
    let key = narq::nix::PublicKey::parse(public_key).unwrap();
    for (k, out) in want {
        let (drv, out) = (k.strip_suffix("/out.doi").unwrap(), out.trim_start_matches("/nix/store/"));
        let text = &found[&k];
        let sig = serde_json::from_str::<serde_json::Value>(text).unwrap()["signatures"][0]["sig"].as_str().unwrap_or_else(|| panic!("{text}")).to_string();
        // simple-fingerprint.txt and unkeyed-with-signature.json (compact), for these inputs.
        let fingerprint = format!(r#"{{"key":{{"drvPath":"{drv}","outputName":"out"}},"value":{{"outPath":"{out}"}}}}"#);
        assert!(key.verify(&fingerprint, &format!("{}:{sig}", key.name)), "{k}: the signature does not verify over {fingerprint}");
        assert_eq!(*text, format!(r#"{{"outPath":"{out}","signatures":[{{"keyName":"{}","sig":"{sig}"}}]}}"#, key.name), "{k}");
    }
}

/// Issue 14 item 6 and issue 19 item 4: a CA build under Nix 2.8 uploads both layouts, the
/// realisations equal to `nix copy`'s and substituted by 2.8, the build traces as 2.35 writes
/// them.
#[test]
fn ca_derivation_is_substituted_from_its_realisations_without_building() {
    let mut n = Narq::new("ca", "");
    let conf = n.nix_conf.join("nix.conf");
    std::fs::write(&conf, std::fs::read_to_string(&conf).unwrap() + "extra-experimental-features = ca-derivations\n").unwrap();
    n.start();
    let (u, marker) = (unique(), n.dir.join("builds.log"));
    let expr_file = n.dir.join("ca.nix");
    std::fs::write(&expr_file, ca_expr(&u, &marker)).unwrap();
    let (outs, stderr) = n.build(&std::fs::read_to_string(&expr_file).unwrap());
    assert_eq!(lines(&marker), 2, "both derivations built");
    n.wait(60);
    let cache = n.cache();
    assert_eq!(check_closed(&cache), Ok(2));
    let ours = doi(&cache);
    // One per CA output, and Nix 2.8 records one more for the top's resolved derivation.
    assert!(ours.len() >= 2, "a realisation per CA output: {ours:?}\n{}", n.daemon_log());

    // What `nix copy` writes for the same build: byte for byte, but for the signatures
    // (Nix copies the local ones, none here; ours carry narq's).
    let nix_cache = n.dir.join("nix-cache");
    let copied = nix(&n.nix_conf, &["copy", "--to", &format!("file://{}", nix_cache.display()), "-f", &expr_file.to_string_lossy()]);
    assert!(copied.status.success(), "{}", String::from_utf8_lossy(&copied.stderr));
    let theirs = doi(&nix_cache);
    assert_eq!(theirs.len(), 2, "{theirs:?}");
    let key = narq::nix::PublicKey::parse(&n.public_key).unwrap();
    for name in theirs.keys() {
        let text = ours.get(name).unwrap_or_else(|| panic!("narq did not upload {name}: {ours:?}"));
        let r = narq::nix::Realisation::parse_nix(text).unwrap();
        r.check_sigs(std::slice::from_ref(&key)).unwrap();
        assert_eq!(*text, r.to_json());
        // Byte for byte once our signatures are taken out.
        let unsigned = narq::nix::Realisation { signatures: Default::default(), ..r };
        assert_eq!(unsigned.to_json(), theirs[name], "{name}");
    }
    assert!(ours.values().any(|t| t.contains(&format!("\"outPath\":\"{}\"", &outs[0]["/nix/store/".len()..]))));
    // And Nix 2.35's layout beside it.
    let dep = std::fs::read_to_string(std::path::Path::new(&outs[0]).join("dep")).unwrap();
    check_build_traces(&cache, &stderr, &outs[0], dep.trim(), &n.public_key);

    // A fresh client with ca-derivations substitutes the build, and runs no builder.
    let client = n.dir.join("client");
    let store = format!("file://{}", cache.display());
    let built = output(
        Command::new("nix")
            .args(["--extra-experimental-features", "nix-command ca-derivations", "build", "--no-link", "--max-jobs", "0"])
            .arg("--store")
            .arg(&client)
            .args(["-f", &expr_file.to_string_lossy(), "--option", "substituters", &store, "--option", "trusted-public-keys", &n.public_key])
            .env("NIX_CONF_DIR", &n.nix_conf),
    );
    assert!(built.status.success(), "the client did not substitute: {}", String::from_utf8_lossy(&built.stderr));
    assert!(client.join(&outs[0][1..]).join("dep").exists());
    assert_eq!(lines(&marker), 2, "a builder ran on the client");
}

#[test]
fn excluded_paths_and_their_referrers_are_skipped_and_reported_while_the_rest_lands() {
    let mut n = Narq::new("exclude", "exclude = [\"*-excluded-*\", \"*.iso\"]");
    n.start();
    let u = unique();
    let ex = sh_drv(&format!("big-excluded-{u}"), "echo x > $out");
    let mid = sh_drv(&format!("mid-{u}"), "echo ${ex} > $out");
    let top = sh_drv(&format!("top-{u}"), "echo ${mid} > $out");
    let keep = sh_drv(&format!("keep-{u}"), "echo keep > $out");
    let (outs, _) = n.build(&format!("let ex = {ex}; mid = {mid}; in [ ({top}) ({keep}) ]"));
    // `narq wait` exits 0: excluded is not failed.
    n.wait(60);
    let all = closure(&outs);
    let path = |name: &str| all.iter().find(|p| p.contains(&format!("-{name}-{u}"))).unwrap().clone();
    let (ex_p, mid_p, top_p, keep_p) = (path("big-excluded"), path("mid"), path("top"), path("keep"));
    assert!(n.has(&keep_p), "{}", n.daemon_log());
    for p in [&ex_p, &mid_p, &top_p] {
        assert!(!n.has(p), "{p} was uploaded");
    }
    assert_eq!(check_closed(&n.cache()), Ok(1));

    // A later build that references the excluded path is excluded too.
    let late = sh_drv(&format!("late-{u}"), "echo ${ex} > $out");
    let (late_out, _) = n.build(&format!("let ex = {ex}; in {late}"));
    n.wait(60);
    assert!(!n.has(&late_out[0]));
    assert_eq!(check_closed(&n.cache()), Ok(1));

    let s = n.status();
    assert_eq!(s["failed"], 0, "{s}");
    assert!(s["skipped"].as_u64().unwrap() >= 4, "{s}");
    let reasons: std::collections::BTreeMap<String, String> = s["excluded"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["item"].as_str().unwrap().to_string(), f["error"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(reasons[&ex_p], "its name matches exclude pattern \"*-excluded-*\"");
    assert_eq!(reasons[&mid_p], format!("references {ex_p}, which is excluded"));
    assert_eq!(reasons[&top_p], format!("references {mid_p}, which is excluded"));
    assert_eq!(reasons[&late_out[0]], format!("references {ex_p}, which is excluded"));
    assert!(!reasons.contains_key(&keep_p));
    // For people, and in the log.
    let human = String::from_utf8(n.narq(&["status"]).stdout).unwrap();
    assert!(human.contains(&format!("  {mid_p}: references {ex_p}, which is excluded")), "{human}");
    assert!(n.daemon_log().contains(&format!("excluded: {top_p} references {mid_p}, which is excluded")), "{}", n.daemon_log());
}

#[test]
fn paths_signed_by_an_upstream_key_are_skipped_without_a_request() {
    let t = TempDir::new("upkey");
    run(Command::new("nix-store").args(["--generate-binary-cache-key", "narq-upstream-test-1"]).arg(t.join("up.sec")).arg(t.join("up.pub")));
    // Given whole (as in trusted-public-keys), so that its signatures are checked too.
    let up_pub = std::fs::read_to_string(t.join("up.pub")).unwrap();
    let mut n = Narq::new("upkey", &format!("upstream-keys = [{:?}]", up_pub.trim()));
    n.start();
    let u = unique();
    // Built without the hook, then signed locally as a substituted path would be.
    let up_expr = sh_drv(&format!("from-upstream-{u}"), "echo up > $out");
    let up = nix_build(&nix_conf(t.path(), None), &up_expr, &[]).remove(0);
    let signed = nix(&n.nix_conf, &["store", "sign", "--key-file", &t.join("up.sec").to_string_lossy(), &up]);
    assert!(signed.status.success(), "{}", String::from_utf8_lossy(&signed.stderr));
    let (outs, _) = n.build(&format!("let up = {up_expr}; in {}", sh_drv(&format!("uses-upstream-{u}"), "echo ${up} > $out")));
    n.wait(60);
    assert!(n.has(&outs[0]), "{}", n.daemon_log());
    assert!(!n.has(&up), "a path signed by an upstream key was uploaded");
    assert!(n.daemon_log().contains(&format!("{up} is signed by upstream key narq-upstream-test-1: not uploaded")), "{}", n.daemon_log());
    assert_eq!(n.status()["failed"], 0);
}

#[test]
fn the_module_renders_exclude_and_upstream_keys() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("nixos-module");
    let cfg = r#"{ secretKeyFiles = [ "/k" ]; settings = { store = "file:///tmp/c"; publicKeys = [ ]; socket = "/run/narq/narq.sock";
                   jobs = 4; upstream = [ ]; allowedUsers = [ ]; exclude = [ "*-source" "*.iso" ]; upstreamKeys = [ "cache.nixos.org-1" ]; }; }"#;
    let toml = run(Command::new("nix-instantiate").args(["--eval", "--strict", "--json", "-E"]).arg(format!(
        "import {}/toml.nix (import {}/settings.nix {cfg})",
        dir.display(),
        dir.display()
    )));
    let toml: String = serde_json::from_str(&toml).unwrap();
    let c = narq::config::Config::parse(&toml, None).unwrap_or_else(|e| panic!("{e}\n{toml}"));
    assert_eq!(c.filters.exclude, ["*-source", "*.iso"]);
    assert_eq!(c.filters.upstream_keys, ["cache.nixos.org-1"]);
}
