//! One decision made at build time: which integration tests can run here. Some need what
//! `scripts/setup.sh` makes outside the clone, or what a plain clone lacks:
//!
//! | cfg when missing         | tests          | looked for                                                        |
//! |--------------------------|----------------|-------------------------------------------------------------------|
//! | `narq_no_nixpkgs_lib`    | `nixos::module_*` | `$NARQ_NIXPKGS_LIB`, else `shared/nixpkgs-lib/lib` beside the checkout or one of its parents |
//! | `narq_no_garage`         | `cluster::*`   | `$NARQ_GARAGE`, else `/var/cache/narq-test/garage-2.5.0/bin/garage` |
//! | `narq_no_sid`            | `nix234::*`    | `$NARQ_SID_DIR`, else `/var/cache/narq-test/sid`, with `.narq-ready` |
//! | `narq_no_baseline`       | `mixed::*`     | `/var/cache/narq-test/narq-64d1f2c/{narq,narq-hook}`              |
//!
//! Without it, the tests are compiled `#[ignore]`d with the reason (`ignore = "needs …"`), so
//! that cargo's test runner reports them skipped, never passed, and `scripts/test.sh` lists
//! them at the end. libtest has no way to skip a test at run time, hence the build script.
//! `scripts/test.sh` runs `scripts/setup.sh` before the first compile, so a fresh machine and
//! CI find everything. What is installed after a build that missed it is seen once this
//! script runs again: a missing path is not watched (cargo would rebuild the crate at every
//! build), so `touch build.rs`. On CI (`CI=true`) only the NixOS module tests may be skipped
//! (`scripts/setup.sh` makes the rest): a missing Garage, chroot or baseline fails its tests.
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=CI");
    let ci = std::env::var("CI").as_deref() == Ok("true");
    let cache = Path::new("/var/cache/narq-test");
    let repo = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let nixpkgs_lib = from_env("NARQ_NIXPKGS_LIB")
        .or_else(|| repo.ancestors().skip(1).map(|a| a.join("shared/nixpkgs-lib/lib")).find(|l| l.join("default.nix").exists()));
    // (cfg, the files it needs (none found: missing), whether CI may go without them)
    let needs: [(&str, Vec<PathBuf>, bool); 4] = [
        ("narq_no_nixpkgs_lib", nixpkgs_lib.map(|l| l.join("default.nix")).into_iter().collect(), true),
        ("narq_no_garage", vec![from_env("NARQ_GARAGE").unwrap_or_else(|| cache.join("garage-2.5.0/bin/garage"))], false),
        ("narq_no_sid", vec![from_env("NARQ_SID_DIR").unwrap_or_else(|| cache.join("sid")).join(".narq-ready")], false),
        ("narq_no_baseline", vec![cache.join("narq-64d1f2c/narq"), cache.join("narq-64d1f2c/narq-hook")], false),
    ];
    for (cfg, files, optional_on_ci) in needs {
        println!("cargo::rustc-check-cfg=cfg({cfg})");
        if !files.is_empty() && files.iter().all(|f| f.exists()) {
            for f in files {
                println!("cargo::rerun-if-changed={}", f.display());
            }
        } else if optional_on_ci || !ci {
            println!("cargo::rustc-cfg={cfg}");
        }
    }
}

/// A path named by an environment variable, watched for changes.
fn from_env(var: &str) -> Option<PathBuf> {
    println!("cargo::rerun-if-env-changed={var}");
    std::env::var_os(var).map(PathBuf::from)
}
