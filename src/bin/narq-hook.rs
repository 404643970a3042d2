//! `post-build-hook = narq-hook`: hands the build's closure to the narq daemon.
//! Always exits 0; trouble is one line on stderr, which Nix shows in the build log.

fn main() {
    let env = |k: &str| std::env::var(k).ok();
    let line = match narq::hook::run(None, env("OUT_PATHS").as_deref(), env("DRV_PATH").as_deref()) {
        Ok(None) => return,
        Ok(Some(line)) => line,
        Err(e) => format!("{e:#}; this build is not uploaded"),
    };
    eprintln!("narq-hook: {line}");
}
