//! The set-up respects the machine (issue 14): scripts/setup.sh leaves /etc/nix and the system
//! Python alone, says what it installs, installs nothing on a second run, and puts moto into
//! the repository's `.venv/`, where the tests find it.

use crate::util::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs scripts/setup.sh, which must succeed; returns what it said (stderr).
fn setup() -> String {
    let out = output(&mut Command::new(repo().join("scripts/setup.sh")));
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "scripts/setup.sh failed: {}\n{said}", out.status);
    said
}

/// Every file under /etc/nix with its content.
fn etc_nix() -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(dir: &Path, depth: u32, files: &mut BTreeMap<PathBuf, Vec<u8>>) {
        let Ok(rd) = std::fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() && depth < 8 {
                walk(&p, depth + 1, files);
            } else {
                files.insert(p.clone(), std::fs::read(&p).unwrap_or_default());
            }
        }
    }
    let mut files = BTreeMap::new();
    walk(Path::new("/etc/nix"), 0, &mut files);
    files
}

/// What `pip list` of the system Python (`python3` on PATH, the one setup.sh uses) shows, with
/// where and when each distribution was written, so that a reinstall of the same version
/// shows too. Read with importlib.metadata, which is what pip reads, and needs no pip.
fn system_python() -> Vec<String> {
    const LIST: &str = "import importlib.metadata as m, os, sys\n\
        print(sys.executable)\n\
        for d in m.distributions():\n\
        \x20   p = str(getattr(d, '_path', ''))\n\
        \x20   t = os.stat(p).st_mtime_ns if os.path.exists(p) else ''\n\
        \x20   print(d.metadata['Name'], d.version, p, t)\n";
    let mut rows: Vec<String> = run(Command::new("python3").args(["-c", LIST]).current_dir("/")).lines().map(str::to_string).collect();
    rows.sort();
    rows
}

fn diff(before: &[String], after: &[String]) -> String {
    let gone = before.iter().filter(|l| !after.contains(l)).map(|l| format!("- {l}\n"));
    let new = after.iter().filter(|l| !before.contains(l)).map(|l| format!("+ {l}\n"));
    gone.chain(new).collect()
}

/// The "Done when" of issue 14: the README's commands leave `/etc/nix/nix.conf` and the system
/// Python untouched (scripts/setup.sh is what both run before anything else).
#[test]
fn setup_leaves_etc_nix_and_the_system_python_alone() {
    let (nix_before, py_before) = (etc_nix(), system_python());
    let first = setup();
    let second = setup();
    let (nix_after, py_after) = (etc_nix(), system_python());

    for (p, before) in &nix_before {
        let after = nix_after.get(p).map(|a| String::from_utf8_lossy(a).to_string());
        assert!(
            nix_after.get(p) == Some(before),
            "scripts/setup.sh changed {}:\n--- before\n{}--- after\n{}\n(it said: {first})",
            p.display(),
            String::from_utf8_lossy(before),
            after.as_deref().unwrap_or("(removed)\n")
        );
    }
    let created: Vec<_> = nix_after.keys().filter(|p| !nix_before.contains_key(*p)).collect();
    assert!(created.is_empty(), "scripts/setup.sh created {created:?} (it said: {first})");
    assert!(py_before == py_after, "scripts/setup.sh changed the system Python:\n{}(it said: {first})", diff(&py_before, &py_after));

    // Idempotent: everything is there after the first run, so the second one says nothing.
    assert!(!second.contains("setup:"), "a second run of scripts/setup.sh installed again:\n{second}");
}

/// moto runs from the repository's virtual environment, pinned, not from whatever moto the
/// system Python has.
#[test]
fn moto_runs_from_the_repos_venv() {
    let venv = repo().join(".venv/bin");
    let version = run(Command::new(venv.join("python")).args(["-c", "import moto; print(moto.__version__)"]));
    assert_eq!(version.trim(), "5.1.22", "moto in {}", venv.display());

    let t = TempDir::new("setup-moto");
    let moto = Moto::start(t.path(), &[]);
    moto.bucket("venv");
    // The process serving the port: the kernel runs a `#!` script as [interpreter, script, args].
    let port = moto.port.to_string();
    let mut server = None;
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else { continue };
        let args: Vec<String> = cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).to_string()).collect();
        if args.iter().any(|a| a.ends_with("moto_server")) && args.windows(2).any(|w| w[0] == "-p" && w[1] == port) {
            server = Some(args);
        }
    }
    let server = server.unwrap_or_else(|| panic!("no moto_server process with -p {port}"));
    let script = venv.join("moto_server");
    assert!(server.iter().any(|a| Path::new(a) == script), "moto_server on port {port} is not {}: {server:?}", script.display());
}

/// The tests give Nix their settings in a nix.conf of their own (util's `nix_conf`), so they do
/// not need what /etc/nix/nix.conf says: in a private mount namespace with an empty one there
/// (Nix's defaults: a sandbox without /bin/sh, and cache.nixos.org), util's helpers still
/// build with the hook, upload, list the closure and substitute.
#[test]
fn tests_need_nothing_from_etc_nix_conf() {
    let t = TempDir::new("no-etc-nix-conf");
    let empty = t.join("nix.conf");
    std::fs::write(&empty, "").unwrap();
    let probe = sh_drv(&format!("etc-nix-probe-{}", unique()), "echo x > $out");
    // First that the empty file is in force (a build without a nix.conf of its own fails),
    // then the helpers, by running the test below in that namespace.
    let script = r#"mount --bind "$0" /etc/nix/nix.conf || exit 98
        if nix-build --no-out-link --option substituters '' -E "$1" >/dev/null 2>&1; then
            echo "a build without NIX_CONF_DIR worked: the empty /etc/nix/nix.conf is not in force"; exit 99
        fi
        exec "$2" --exact setup::helpers_build_upload_and_substitute --include-ignored --test-threads 1"#;
    let out = output(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", script])
            .arg(&empty)
            .arg(&probe)
            .arg(std::env::current_exe().unwrap()),
    );
    assert!(
        out.status.success(),
        "under an empty /etc/nix/nix.conf (unshare --mount, as root): {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 passed"), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
#[ignore = "run by tests_need_nothing_from_etc_nix_conf, under an empty /etc/nix/nix.conf"]
fn helpers_build_upload_and_substitute() {
    let mut n = Narq::new("no-etc-nix", "");
    n.start();
    let u = unique();
    let dep = sh_drv(&format!("no-etc-dep-{u}"), "echo dep > $out");
    let (outs, _) = n.build(&format!("let dep = {dep}; in {}", sh_drv(&format!("no-etc-top-{u}"), "echo ${dep} > $out")));
    n.wait(60);
    let paths = closure(&outs);
    assert_eq!(paths.len(), 2, "{paths:?}");
    assert!(paths.iter().all(|p| n.has(p)), "not all of {paths:?} in the cache");
    let client = n.substitute(&outs[0]);
    assert!(client.join(&outs[0][1..]).exists());
    nix_build(&nix_conf(n.dir.path(), None), &sh_drv(&format!("no-etc-plain-{u}"), "echo plain > $out"), &[]);
}
