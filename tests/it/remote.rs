//! Remote builders (`builders = ssh://…`): which machine's post-build hook sees the build.
//!
//! No sshd needed: Nix runs the remote side of `ssh://localhost` with `bash -c` instead of
//! ssh (`SSHMaster`'s "fake SSH"), and `?remote-store=` gives the builder a store of its own
//! (a chroot store under the test's dir), `?remote-program=` its own `nix.conf`. So the
//! builder is a separate Nix with a separate store and settings, reached by the same code
//! path (`nix-store --serve --write`) as a real ssh:// builder.

use crate::util::*;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn script(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn a_remote_build_is_uploaded_by_the_dispatching_machines_hook() {
    let mut n = Narq::new("remote", "");
    n.start();
    let d = n.dir.path();

    // The builder: its own store, its own nix.conf with a hook that records what it is given.
    let store = d.join("builder-store");
    let conf = d.join("builder-conf");
    std::fs::create_dir_all(&conf).unwrap();
    let hook_log = d.join("builder-hook.log");
    let hook = d.join("builder-hook");
    script(&hook, &format!("#!/bin/sh\necho \"DRV_PATH=$DRV_PATH OUT_PATHS=$OUT_PATHS\" >> {}\n", hook_log.display()));
    // A store at another real path builds in a sandbox (Nix insists); /bin/sh comes along.
    std::fs::write(
        conf.join("nix.conf"),
        format!(
            "sandbox = true\nextra-sandbox-paths = /bin /usr /lib /lib64\nbuild-users-group =\nsubstituters =\npost-build-hook = {}\n",
            hook.display()
        ),
    )
    .unwrap();
    let program = d.join("builder-nix-store");
    script(&program, &format!("#!/bin/sh\nNIX_CONF_DIR={} exec nix-store \"$@\"\n", conf.display()));

    // The dispatching machine: narq's hook, no local builds, the builder above.
    let dispatcher = nix_conf(&d.join("dispatcher"), Some(&bin("narq-hook")));
    let mut text = std::fs::read_to_string(dispatcher.join("nix.conf")).unwrap();
    text += &format!(
        "max-jobs = 0\nbuilders = ssh://localhost?remote-store={}&remote-program={} {}-linux\n",
        store.display(),
        program.display(),
        std::env::consts::ARCH
    );
    std::fs::write(dispatcher.join("nix.conf"), text).unwrap();

    let expr = sh_drv(&format!("remote-{}", unique()), "echo built remotely > $out");
    let drv = run(Command::new("nix-instantiate").args(["-E", &expr]).env("NIX_CONF_DIR", &dispatcher)).trim().to_string();
    let out = output(Command::new("nix-build").args(["--no-out-link", &drv]).env("NIX_CONF_DIR", &dispatcher).env("NARQ_CONFIG", &n.config));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "remote build failed: {stderr}");
    let path = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(!stderr.contains("narq-hook:"), "the dispatcher's hook complained: {stderr}");

    // Built on the builder (max-jobs = 0 forbids a local build), copied back.
    let name = Path::new(&path).file_name().unwrap();
    assert!(store.join("nix/store").join(name).exists(), "not built in the builder's store: {stderr}");

    // The builder's Nix ran its own hook too, for a .drv its store does not have: build-remote
    // sends the derivation itself, not its file.
    let log = std::fs::read_to_string(&hook_log).unwrap_or_else(|e| panic!("the builder's hook did not run ({e}): {stderr}"));
    assert!(log.contains(&format!("DRV_PATH={drv} ")), "{log}");
    assert!(!store.join("nix/store").join(Path::new(&drv).file_name().unwrap()).exists());

    // The dispatching machine's hook handed the copied-back output to narq: uploaded, and a
    // fresh client substitutes it.
    n.wait(60);
    assert!(n.has(&path), "{}", n.daemon_log());
    let client = n.substitute(&path);
    let got = std::fs::read_to_string(client.join(path.trim_start_matches('/'))).unwrap();
    assert_eq!(got, "built remotely\n");
}
