//! Golden tests of the Nix formats against real Nix (Debian's nix-bin).

use crate::util::*;
use narq::nix::{db::NixDb, drv, nar, NarInfo, PublicKey, SecretKey, Sha256, StorePath};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::process::Command;

/// A tree with every kind of node and name ordering that the NAR format cares about.
fn make_tree(root: &Path) {
    let w = |p: &str, data: &[u8]| {
        let p = root.join(p);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    };
    w("seed", unique().as_bytes());
    w("bin/run", b"#!/bin/sh\necho hi\n");
    std::fs::set_permissions(root.join("bin/run"), std::fs::Permissions::from_mode(0o755)).unwrap();
    w("empty", b"");
    std::fs::create_dir_all(root.join("emptydir")).unwrap();
    w("a/b/c/d/deep.txt", b"deep");
    // Bytewise order differs from locale order: "B" < "_" < "a" < "é" bytewise.
    for n in ["a", "B", "_x", "Z", "é", "ä", "zz", "Zz", "日本語", "x y", "a.b", "a-b"] {
        w(&format!("names/{n}"), n.as_bytes());
    }
    symlink("bin/run", root.join("link")).unwrap();
    symlink("/nonexistent/dangling", root.join("dangling")).unwrap();
    symlink("..", root.join("a/up")).unwrap();
    // A multi-megabyte file whose length is not a multiple of 8.
    let big: Vec<u8> = (0..3_000_003u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    w("big.bin", &big);
}

fn add_tree() -> (TempDir, StorePath) {
    let dir = TempDir::new("tree");
    let root = dir.join("narq-golden-tree");
    make_tree(&root);
    let out = run(Command::new("nix-store").arg("--add").arg(&root));
    (dir, StorePath::parse(out.trim()).unwrap())
}

#[test]
fn nar_bytes_and_hash_equal_nix() {
    let (_dir, sp) = add_tree();
    let path = sp.to_absolute();
    let nix_nar = output(Command::new("nix-store").args(["--dump", &path])).stdout;
    let mut ours = Vec::new();
    let stats = nar::dump(Path::new(&path), &mut ours).unwrap();
    assert!(ours == nix_nar, "NAR differs from nix-store --dump ({} vs {} bytes)", ours.len(), nix_nar.len());
    assert_eq!(stats.size, nix_nar.len() as u64);
    let nix_hash = run(Command::new("nix-hash").args(["--type", "sha256", "--base32", &path]));
    assert_eq!(stats.hash.to_base32(), nix_hash.trim());
    let info = &NixDb::open_default().unwrap().query(std::slice::from_ref(&sp), false).unwrap()[0];
    assert_eq!(info.nar_hash, stats.hash);
    assert_eq!(info.nar_size, stats.size);
    // A single file and a symlink at the top level, too.
    for sub in ["big.bin", "link", "dangling", "emptydir", "empty"] {
        let p = format!("{path}/{sub}");
        let nix_nar = output(Command::new("nix-store").args(["--dump", &p])).stdout;
        let mut ours = Vec::new();
        nar::dump(Path::new(&p), &mut ours).unwrap();
        assert!(ours == nix_nar, "{sub}: NAR differs");
    }
}

/// Builds an input-addressed path with a reference, a self-reference and a deriver.
fn build_with_refs(t: &TempDir) -> String {
    let u = unique();
    let expr = format!(
        "let dep = {}; in {}",
        sh_drv(&format!("golden-dep-{u}"), "echo dep > $out"),
        sh_drv(&format!("golden-top-{u}"), "mkdir $out; echo ${dep} > $out/ref; ln -s $out $out/self")
    );
    nix_build(&nix_conf(t.path(), None), &expr, &[]).remove(0)
}

fn nix_copy(cache: &Path, key: &Path, path: &str) {
    run(Command::new("nix").args([
        "--extra-experimental-features",
        "nix-command",
        "copy",
        "--to",
        &format!("file://{}?compression=none&secret-key={}", cache.display(), key.display()),
        path,
    ]));
}

/// Our narinfo for `sp`, signed with `key`, for a `compression=none` cache.
fn our_narinfo(sp: &StorePath, key: &SecretKey) -> NarInfo {
    let mut info = NixDb::open_default().unwrap().query(std::slice::from_ref(sp), false).unwrap().remove(0);
    info.sign(key);
    NarInfo {
        url: format!("nar/{}.nar", info.nar_hash.to_base32()),
        compression: "none".into(),
        file_hash: Some(info.nar_hash),
        file_size: Some(info.nar_size),
        info,
    }
}

#[test]
fn narinfo_equals_nix_copy_line_for_line() {
    let t = TempDir::new("narinfo");
    let top_path = build_with_refs(&t);
    let (_tree, tree) = add_tree();

    let key_file = t.join("key.sec");
    run(Command::new("nix-store").args(["--generate-binary-cache-key", "golden-1"]).arg(&key_file).arg(t.join("key.pub")));
    let key = SecretKey::read(&key_file).unwrap();
    let cache = t.join("cache");
    for p in [top_path.as_str(), &tree.to_absolute()] {
        nix_copy(&cache, &key_file, p);
        let sp = StorePath::parse(p).unwrap();
        let nix_text = std::fs::read_to_string(cache.join(format!("{}.narinfo", sp.hash_part()))).unwrap();
        let ours = our_narinfo(&sp, &key).to_string();
        assert_eq!(ours, nix_text);
        // And what Nix wrote parses and renders back unchanged.
        assert_eq!(NarInfo::parse(&nix_text).unwrap().to_string(), nix_text);
    }
    assert_eq!(std::fs::read_to_string(cache.join("nix-cache-info")).unwrap(), "StoreDir: /nix/store\n");
}

#[test]
fn our_signatures_and_keys_work_with_nix() {
    let t = TempDir::new("sigs");
    // Input-addressed, so that only a signature can make Nix trust it.
    let sp = StorePath::parse(&build_with_refs(&t)).unwrap();
    // Our key, used by Nix to sign; we verify Nix's signature.
    let ours = SecretKey::generate("narq-test-1").unwrap();
    std::fs::write(t.join("ours.sec"), ours.to_nix_string()).unwrap();
    let cache = t.join("cache-nix-signed");
    nix_copy(&cache, &t.join("ours.sec"), &sp.to_absolute());
    let ni = NarInfo::parse(&std::fs::read_to_string(cache.join(format!("{}.narinfo", sp.hash_part()))).unwrap()).unwrap();
    assert!(ni.info.signed_by_any(&[ours.public()]));
    assert!(!ni.info.signed_by_any(&[SecretKey::generate("narq-test-1").unwrap().public()]));

    // Nix's key, used by us to sign; Nix verifies our signature in a cache we wrote.
    run(Command::new("nix-store").args(["--generate-binary-cache-key", "nix-made-1"]).arg(t.join("nix.sec")).arg(t.join("nix.pub")));
    let nix_key = SecretKey::read(&t.join("nix.sec")).unwrap();
    let nix_pub = std::fs::read_to_string(t.join("nix.pub")).unwrap();
    assert_eq!(PublicKey::parse(&nix_pub).unwrap(), nix_key.public());
    let cache = t.join("cache-ours");
    std::fs::create_dir_all(cache.join("nar")).unwrap();
    let ni = our_narinfo(&sp, &nix_key);
    nar::dump(Path::new(&sp.to_absolute()), &mut std::fs::File::create(cache.join(&ni.url)).unwrap()).unwrap();
    std::fs::write(cache.join(format!("{}.narinfo", sp.hash_part())), ni.to_string()).unwrap();
    std::fs::write(cache.join("nix-cache-info"), "StoreDir: /nix/store\n").unwrap();
    let store = format!("file://{}", cache.display());
    let verify = |pubkey: &str| {
        output(Command::new("nix").args([
            "--extra-experimental-features", "nix-command", "store", "verify", "--store", &store,
            "--sigs-needed", "1", "--option", "trusted-public-keys", pubkey, &sp.to_absolute(),
        ]))
    };
    let ok = verify(nix_pub.trim());
    assert!(ok.status.success(), "nix store verify refused our signature: {}", String::from_utf8_lossy(&ok.stderr));
    let other = SecretKey::generate("nix-made-1").unwrap().public().to_nix_string();
    assert!(!verify(&other).status.success(), "nix store verify accepted a signature by another key");
}

#[test]
fn drv_outputs_and_closure_equal_nix() {
    let t = TempDir::new("drv");
    let u = unique();
    let dep = sh_drv(&format!("drvdep-{u}"), "echo > $out");
    // The doc output's script puts quotes, backslashes and a newline into the .drv's strings.
    let expr = format!(
        r#"let d = {dep}; in derivation {{ name = "multi-{u}"; system = builtins.currentSystem;
           builder = "/bin/sh"; outputs = ["out" "dev" "doc"];
           args = ["-c" "echo ${{d}} > $out; echo > $dev; echo '\"q\\ \n' > $doc"]; }}"#
    );
    let drv_path = run(Command::new("nix-instantiate").args(["-E", &expr]).env("NIX_CONF_DIR", nix_conf(t.path(), None)));
    let drv_path = drv_path.trim();
    let outs = drv::parse_outputs(&std::fs::read(drv_path).unwrap()).unwrap();
    let mut ours: Vec<String> = outs.iter().map(|o| o.path.as_ref().unwrap().to_string()).collect();
    ours.sort();
    let mut nix: Vec<String> = run(Command::new("nix-store").args(["-q", "--outputs", drv_path])).lines().map(str::to_string).collect();
    nix.sort();
    assert_eq!(ours, nix);
    assert_eq!(outs.iter().map(|o| o.name.as_str()).collect::<Vec<_>>(), ["dev", "doc", "out"]);

    // Closure and references from the database equal nix-store -qR / --references.
    let built = nix_build(&nix_conf(t.path(), None), &expr, &[]);
    let roots: Vec<StorePath> = built.iter().map(|p| StorePath::parse(p).unwrap()).collect();
    let infos = NixDb::open_default().unwrap().query(&roots, true).unwrap();
    let mut closure: Vec<String> = run(Command::new("nix-store").arg("-qR").args(&built)).lines().map(str::to_string).collect();
    closure.sort();
    assert_eq!(infos.iter().map(|i| i.path.to_string()).collect::<Vec<_>>(), closure);
    for i in &infos {
        let mut refs: Vec<String> = run(Command::new("nix-store").args(["-q", "--references", &i.path.to_string()])).lines().map(str::to_string).collect();
        refs.sort();
        assert_eq!(i.references.iter().map(|r| r.to_string()).collect::<Vec<_>>(), refs, "{}", i.path);
        assert_eq!(i.nar_hash, Sha256::parse(run(Command::new("nix-store").args(["-q", "--hash", &i.path.to_string()])).trim()).unwrap());
    }
    let missing = StorePath::parse("/nix/store/00000000000000000000000000000000-missing").unwrap();
    let e = NixDb::open_default().unwrap().query(&[missing], true).unwrap_err().to_string();
    assert!(e.contains("not a valid path"), "{e}");
}

#[test]
fn nar_listing_equals_nix_copy_write_nar_listing() {
    let t = TempDir::new("listing");
    let (_tree, tree) = add_tree();
    // The whole tree, and top-level files and symlinks (a listing whose root is not a directory).
    let path = tree.to_absolute();
    let mut paths = vec![path.clone()];
    for sub in ["big.bin", "bin/run", "link", "empty"] {
        paths.push(run(Command::new("nix-store").arg("--add").arg(format!("{path}/{sub}"))).trim().to_string());
    }
    let cache = t.join("cache");
    for p in &paths {
        run(Command::new("nix").args([
            "--extra-experimental-features", "nix-command", "copy", "--to",
            &format!("file://{}?compression=none&write-nar-listing=true", cache.display()), p,
        ]));
        let sp = StorePath::parse(p).unwrap();
        let nix_ls = std::fs::read(cache.join(format!("{}.ls", sp.hash_part()))).unwrap();
        let (stats, ours) = nar::dump_listed(Path::new(p), &mut std::io::sink(), true).unwrap();
        let ours = ours.unwrap();
        assert!(ours == nix_ls, "{p}: listing differs\nours: {}\nnix:  {}", String::from_utf8_lossy(&ours), String::from_utf8_lossy(&nix_ls));
        // The NAR is the same with or without a listing.
        assert_eq!(stats, nar::hash_path(Path::new(p)).unwrap());
    }
}
