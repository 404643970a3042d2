//! Adversarial review of cache maintenance (`gc`, `rm`, `verify --repair`, `sign`, pins):
//! each test reproduces a way a guarantee broke, on a real cache filled by real Nix builds
//! through a real daemon, read back by a real Nix client.

use crate::util::*;
use base64::Engine;
use std::process::Command;

/// `app` over `lib`, built through the hook and uploaded; returns (app, lib).
fn app_over_lib(n: &Narq) -> (String, String) {
    let u = unique();
    let lib = sh_drv(&format!("lib-{u}"), &format!("echo lib-{u} > $out"));
    let app = n.build(&format!("let lib = {lib}; in {}", sh_drv(&format!("app-{u}"), "echo ${lib} > $out"))).0[0].clone();
    n.wait(60);
    let lib = closure(std::slice::from_ref(&app)).into_iter().find(|p| p.ends_with(&format!("lib-{u}"))).unwrap();
    // Both are roots (each was a build): recorded within a few seconds.
    for p in [&app, &lib] {
        let root = n.cache().join(format!("narq/roots/{}", hash(p)));
        assert!(wait_for(std::time::Duration::from_secs(20), || root.exists()), "root of {p} not recorded");
    }
    (app, lib)
}

/// A narinfo Nix reads but narq's parser does not (here its NarHash in base64, which Nix
/// accepts) was "left alone" by `gc`, which then deleted its NAR and its references: a
/// narinfo clients see, with nothing behind it.
#[test]
fn gc_keeps_the_nar_and_references_of_a_narinfo_it_cannot_parse() {
    let mut n = Narq::new("rev-unparsed", "");
    n.start();
    let (app, lib) = app_over_lib(&n);
    let key = n.cache().join(format!("{}.narinfo", hash(&app)));
    let text = std::fs::read_to_string(&key).unwrap();
    let ni = narq::nix::NarInfo::parse(&text).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(ni.info.nar_hash.0);
    let changed: String = text
        .lines()
        .map(|l| if l.starts_with("NarHash: ") { format!("NarHash: sha256:{b64}\n") } else { format!("{l}\n") })
        .collect();
    std::fs::write(&key, changed).unwrap();
    // Nix itself still substitutes it.
    n.substitute(&app);

    let out = n.narq(&["gc", "--keep-days", "0", "--grace", "0s"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(n.has(&app), "the narinfo narq cannot parse is left alone");
    assert!(n.has(&lib), "its reference stays: {}", String::from_utf8_lossy(&out.stdout));
    assert!(n.cache().join(&ni.url).exists(), "its NAR stays: {}", String::from_utf8_lossy(&out.stdout));
    n.substitute(&app);
    // rm of its reference is refused while it stays.
    let rm = n.narq(&["rm", &lib]);
    assert_eq!(rm.status.code(), Some(1), "{}", String::from_utf8_lossy(&rm.stderr));
    assert!(n.has(&lib));
}

/// The scan's index knew a `file://` narinfo by its size and mtime only: a narinfo replaced
/// by one of the same size with its mtime kept (`cp -p`, `rsync -a`, a restore) was read from
/// the index, stale, and `gc` deleted the NAR the new narinfo names.
#[test]
fn gc_does_not_trust_the_index_for_a_narinfo_replaced_with_the_same_size_and_mtime() {
    let mut n = Narq::new("rev-index", "");
    n.start();
    let (app, _lib) = app_over_lib(&n);
    assert!(n.narq(&["pin", "app", &app]).status.success());
    // The index learns every narinfo.
    let dry = n.narq(&["gc", "--dry-run", "--keep-days", "0", "--grace", "0s"]);
    assert!(dry.status.success(), "{}", String::from_utf8_lossy(&dry.stderr));

    let key = n.cache().join(format!("{}.narinfo", hash(&app)));
    let text = std::fs::read_to_string(&key).unwrap();
    let url = narq::nix::NarInfo::parse(&text).unwrap().url;
    // The same NAR under another key of the same length: a narinfo as valid as the first.
    let (name, ext) = url["nar/".len()..].split_once('.').unwrap();
    let moved = format!("nar/{}.{ext}", name.chars().rev().collect::<String>());
    std::fs::copy(n.cache().join(&url), n.cache().join(&moved)).unwrap();
    let mtime = std::fs::metadata(&key).unwrap().modified().unwrap();
    let tmp = n.cache().join(".replace.tmp");
    std::fs::write(&tmp, text.replace(&url, &moved)).unwrap();
    std::fs::File::options().write(true).open(&tmp).unwrap().set_modified(mtime).unwrap();
    std::fs::rename(&tmp, &key).unwrap();
    std::fs::remove_file(n.cache().join(&url)).unwrap();
    assert_eq!(check_closed(&n.cache()), Ok(2));

    let out = n.narq(&["gc", "--keep-days", "0", "--grace", "0s"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(check_closed(&n.cache()), Ok(2), "{}", String::from_utf8_lossy(&out.stdout));
    n.substitute(&app);
}

/// After `gc` removed a path, the same path built again (its output deleted from the local
/// store, the same derivation rebuilt) through the same daemon must land in the cache again:
/// the daemon must not answer from what it remembered before the collection.
#[test]
fn a_path_rebuilt_after_gc_removed_it_is_uploaded_again() {
    let mut n = Narq::new("rev-rebuild", "");
    n.start();
    let u = unique();
    let expr = sh_drv(&format!("solo-{u}"), &format!("echo solo-{u} > $out"));
    let solo = n.build(&expr).0[0].clone();
    n.wait(60);
    assert!(n.has(&solo));
    let root = n.cache().join(format!("narq/roots/{}", hash(&solo)));
    assert!(wait_for(std::time::Duration::from_secs(20), || root.exists()), "root not recorded");
    let out = n.narq(&["gc", "--keep-days", "0", "--grace", "0s"]);
    assert!(out.status.success() && !n.has(&solo), "{}", String::from_utf8_lossy(&out.stdout));

    run(Command::new("nix-store").args(["--delete", &solo]));
    assert_eq!(n.build(&expr).0[0], solo);
    n.wait(60);
    assert!(wait_for(std::time::Duration::from_secs(30), || n.has(&solo)), "rebuilt after gc, never uploaded again: {}", n.daemon_log());
    n.substitute(&solo);
}

/// `verify --repair` overwrote a narinfo with one signed only by what the local store
/// knows: a signature `narq sign` had added in the cache was lost, and clients that need it
/// (`--sigs-needed 2`) could no longer substitute the path it had "repaired".
#[test]
fn repair_keeps_the_signatures_the_cache_had() {
    let mut n = Narq::new("rev-repair", "");
    n.start();
    let u = unique();
    let solo = n.build(&sh_drv(&format!("signed-{u}"), &format!("echo signed-{u} > $out"))).0[0].clone();
    n.wait(60);
    let (sk, pk) = (n.dir.join("second.sec"), n.dir.join("second.pub"));
    run(Command::new(bin("narq")).args(["keygen", "rev-second-1", "--secret-key-file"]).arg(&sk).arg("--public-key-file").arg(&pk));
    let key = n.cache().join(format!("{}.narinfo", hash(&solo)));
    // What `narq sign` writes: the second key's signature added in the cache.
    let second = narq::nix::SecretKey::read(&sk).unwrap();
    let text = std::fs::read_to_string(&key).unwrap();
    let fp = narq::nix::NarInfo::parse(&text).unwrap().info.fingerprint();
    std::fs::write(&key, narq::cache::sign::add_sig(&text, &second.sign(&fp))).unwrap();
    assert!(std::fs::read_to_string(&key).unwrap().contains("Sig: rev-second-1:"));

    let url = narq::nix::NarInfo::parse(&std::fs::read_to_string(&key).unwrap()).unwrap().url;
    std::fs::remove_file(n.cache().join(&url)).unwrap();
    // What `narq verify --repair` sends for a path whose NAR is missing.
    let sp = narq::nix::StorePath::parse(&solo).unwrap();
    let mut infos = narq::nix::db::NixDb::open_default().unwrap().query(std::slice::from_ref(&sp), true).unwrap();
    narq::nix::PathInfo::sign_all(&mut infos, &[narq::nix::SecretKey::read(&n.dir.join("key.sec")).unwrap()]);
    let req = narq::protocol::Request::Repair { paths: infos, repair: vec![sp] };
    let resp = narq::protocol::call(&n.socket(), &req, Some(std::time::Duration::from_secs(10))).unwrap();
    assert!(matches!(resp, narq::protocol::Response::Queued { .. }), "{resp:?}");
    assert!(wait_for(std::time::Duration::from_secs(30), || {
        let t = std::fs::read_to_string(&key).unwrap_or_default();
        narq::nix::NarInfo::parse(&t).is_ok_and(|ni| n.cache().join(&ni.url).exists())
    }), "not repaired: {}", n.daemon_log());
    let text = std::fs::read_to_string(&key).unwrap();
    assert!(text.contains("Sig: rev-second-1:"), "the second key's signature was lost:\n{text}");
    let both = format!("{} {}", n.public_key, std::fs::read_to_string(&pk).unwrap().trim());
    let v = output(Command::new("nix").args(["store", "verify", "--store", &format!("file://{}", n.cache().display()), "--sigs-needed", "2", &solo])
        .args(["--option", "trusted-public-keys", &both]).env("NIX_CONF_DIR", &n.nix_conf));
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
}

/// The same after a larger build: above 16 paths the hook asks the daemon what it lacks and
/// sent only that, so an output already uploaded was not in the request at all — neither
/// noted as a root pushed again nor looked for again after a collection.
#[test]
fn a_large_closure_rebuilt_after_gc_is_uploaded_again() {
    let mut n = Narq::new("rev-rebuild-large", "");
    n.start();
    let u = unique();
    let deps: String = (0..20).map(|i| format!("d{i} = {}; ", sh_drv(&format!("dep{i}-{u}"), &format!("echo dep{i}-{u} > $out")))).collect();
    let refs: String = (0..20).map(|i| format!("${{d{i}}} ")).collect();
    let expr = format!("let {deps} in {}", sh_drv(&format!("top-{u}"), &format!("echo {refs} > $out")));
    let top = n.build(&expr).0[0].clone();
    n.wait(60);
    let root = n.cache().join(format!("narq/roots/{}", hash(&top)));
    assert!(wait_for(std::time::Duration::from_secs(20), || root.exists()), "root not recorded");
    let out = n.narq(&["gc", "--keep-days", "0", "--grace", "0s"]);
    assert!(out.status.success() && !n.has(&top), "{}", String::from_utf8_lossy(&out.stdout));

    run(Command::new("nix-store").args(["--delete", &top]));
    assert_eq!(n.build(&expr).0[0], top);
    n.wait(60);
    assert!(wait_for(std::time::Duration::from_secs(30), || n.has(&top)), "rebuilt after gc, never uploaded again: {}", n.daemon_log());
    n.wait(60);
    assert_eq!(check_closed(&n.cache()), Ok(21));
    n.substitute(&top);
}
