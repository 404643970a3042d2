//! One decision made at build time: whether the NixOS module tests (tests/it/nixos.rs) can
//! run. They need nixpkgs' `lib`: `$NARQ_NIXPKGS_LIB`, else `shared/nixpkgs-lib/lib` beside
//! the checkout or one of its parents (CI has it; a plain clone does not). Without it they
//! are compiled `#[ignore]`d with the reason (`cfg(narq_no_nixpkgs_lib)`), so that cargo's
//! test runner and nextest report them skipped, never passed. libtest has no way to skip a
//! test at run time, hence the build script.
use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(narq_no_nixpkgs_lib)");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=NARQ_NIXPKGS_LIB");
    let found = match std::env::var_os("NARQ_NIXPKGS_LIB") {
        // The tests say what is wrong with a path that has no default.nix.
        Some(p) => Some(PathBuf::from(p)),
        None => {
            let repo = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
            repo.ancestors().skip(1).map(|a| a.join("shared/nixpkgs-lib/lib")).find(|l| l.join("default.nix").exists())
        }
    };
    match found {
        // Watched only where it exists: a path that does not exist would rerun this script,
        // and rebuild the crate, at every build.
        Some(lib) if lib.join("default.nix").exists() => println!("cargo::rerun-if-changed={}", lib.join("default.nix").display()),
        Some(_) => {}
        None => println!("cargo::rustc-cfg=narq_no_nixpkgs_lib"),
    }
}
