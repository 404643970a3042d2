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
