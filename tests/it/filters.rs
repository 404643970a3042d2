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
fn ca_expr(u: &str, marker: &std::path::Path) -> String {
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

fn lines(f: &std::path::Path) -> usize {
    std::fs::read_to_string(f).map_or(0, |s| s.lines().count())
}

/// The realisation objects of a cache: file name → text.
fn doi(cache: &std::path::Path) -> std::collections::BTreeMap<String, String> {
    let Ok(rd) = std::fs::read_dir(cache.join("realisations")) else { return Default::default() };
    rd.flatten().map(|e| (e.file_name().to_string_lossy().to_string(), std::fs::read_to_string(e.path()).unwrap())).collect()
}

#[test]
fn ca_derivation_is_substituted_from_its_realisations_without_building() {
    let mut n = Narq::new("ca", "");
    let conf = n.nix_conf.join("nix.conf");
    std::fs::write(&conf, std::fs::read_to_string(&conf).unwrap() + "extra-experimental-features = ca-derivations\n").unwrap();
    n.start();
    let (u, marker) = (unique(), n.dir.join("builds.log"));
    let expr_file = n.dir.join("ca.nix");
    std::fs::write(&expr_file, ca_expr(&u, &marker)).unwrap();
    let (outs, _) = n.build(&std::fs::read_to_string(&expr_file).unwrap());
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
