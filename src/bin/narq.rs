//! `narq`: the daemon and the commands around it. See `narq --help`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use narq::config::Config;
use narq::hook::{self, Delivery};
use narq::nix::{nar, SecretKey, StorePath};
use narq::protocol::{self, Request, Response, Status};

const USAGE: &str = "\
usage: narq [--config FILE] COMMAND

commands:
  daemon                     run the queue and the uploaders (foreground)
  push [--wait] PATH...      enqueue paths and their closures, signed like the hook does
  status [--json]            queue depth, in flight, uploaded, failed, bytes and rate
  wait [--timeout SECS]      wait until everything enqueued so far is uploaded; report
                             what failed since the last wait
  retry                      hand over again the builds the hook could not (see status)
  keygen NAME --secret-key-file F --public-key-file F
                             make a key pair in Nix's format
  nar-hash PATH              print the NAR hash and size of PATH (like nix-hash --base32)

config: --config FILE, else $NARQ_CONFIG, else /etc/narq/config.toml
exit codes: 0 success; 1 error, or (wait, push --wait) some path failed for good;
            2 usage error; 3 wait timed out";

struct Args {
    config: Option<PathBuf>,
    command: String,
    rest: Vec<std::ffi::OsString>,
}

fn parse_args() -> Result<Args, lexopt::Error> {
    use lexopt::prelude::*;
    let mut p = lexopt::Parser::from_env();
    let mut config = None;
    loop {
        match p.next()? {
            Some(Long("config")) => config = Some(p.value()?.into()),
            Some(Short('h') | Long("help")) => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            Some(Value(cmd)) => {
                return Ok(Args { config, command: cmd.string()?, rest: p.raw_args()?.collect() });
            }
            Some(arg) => return Err(arg.unexpected()),
            None => return Err("no command given".into()),
        }
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("narq: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("narq: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    use lexopt::prelude::*;
    let mut p = lexopt::Parser::from_args(args.rest);
    let config = || Config::load(args.config.as_deref());
    match args.command.as_str() {
        "daemon" => {
            if let Some(a) = p.next()? {
                return Err(a.unexpected().into());
            }
            daemon(config()?)
        }
        "push" => {
            let (mut paths, mut do_wait) = (Vec::new(), false);
            while let Some(a) = p.next()? {
                match a {
                    Long("wait") => do_wait = true,
                    Value(v) => paths.push(to_store_path(Path::new(&v))?),
                    a => return Err(a.unexpected().into()),
                }
            }
            if paths.is_empty() {
                bail!("push: no paths given");
            }
            let config = config()?;
            let closure = hook::closure(&paths)?;
            let all: Vec<StorePath> = closure.iter().map(|p| p.path.clone()).collect();
            // What the daemon remembers as uploaded may have been deleted from the cache since
            // (by hand, by another tool): have it checked again, so that a push always ends
            // with the closure in the cache. Skipped if the daemon is away (then it is spooled).
            if let Ok(Response::Recorded { count }) = protocol::call(&config.socket, &Request::Recheck { paths: all.clone() }, Some(hook::DAEMON_TIMEOUT)) {
                if count > 0 {
                    eprintln!("narq: checking the cache again for {count} paths uploaded before");
                }
            }
            match hook::submit(&config, closure, None)? {
                Delivery::Queued { new } => eprintln!("narq: enqueued {new} paths not uploaded before"),
                Delivery::Spooled(f, why) => eprintln!("narq: {why}; spooled to {}", f.display()),
            }
            if do_wait {
                return wait(&config, None, Some(all));
            }
            Ok(ExitCode::SUCCESS)
        }
        "status" => {
            let mut json = false;
            while let Some(a) = p.next()? {
                match a {
                    Long("json") => json = true,
                    a => return Err(a.unexpected().into()),
                }
            }
            let config = config()?;
            match call(&config, &Request::Status, Some(Duration::from_secs(10)))? {
                Response::Status(s) if json => println!("{}", serde_json::to_string_pretty(&s)?),
                Response::Status(s) => print_status(&s),
                other => bail!("unexpected answer: {other:?}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        "wait" => {
            let mut timeout = None;
            while let Some(a) = p.next()? {
                match a {
                    Long("timeout") => timeout = Some(Duration::from_secs_f64(p.value()?.parse()?)),
                    a => return Err(a.unexpected().into()),
                }
            }
            wait(&config()?, timeout, None)
        }
        "retry" => {
            if let Some(a) = p.next()? {
                return Err(a.unexpected().into());
            }
            retry(&config()?)
        }
        "keygen" => {
            let (mut name, mut sk, mut pk) = (None, None, None);
            while let Some(a) = p.next()? {
                match a {
                    Long("secret-key-file") => sk = Some(PathBuf::from(p.value()?)),
                    Long("public-key-file") => pk = Some(PathBuf::from(p.value()?)),
                    Value(v) if name.is_none() => name = Some(v.string()?),
                    a => return Err(a.unexpected().into()),
                }
            }
            let (Some(name), Some(sk), Some(pk)) = (name, sk, pk) else {
                bail!("keygen: usage: narq keygen NAME --secret-key-file F --public-key-file F");
            };
            keygen(&name, &sk, &pk)
        }
        "nar-hash" => {
            let Some(Value(v)) = p.next()? else { bail!("nar-hash: usage: narq nar-hash PATH") };
            let stats = nar::hash_path(Path::new(&v)).with_context(|| format!("{}", Path::new(&v).display()))?;
            println!("{} {}", stats.hash.to_base32(), stats.size);
            Ok(ExitCode::SUCCESS)
        }
        other => {
            eprintln!("narq: unknown command {other:?}\n\n{USAGE}");
            Ok(ExitCode::from(2))
        }
    }
}

/// A store path, or something that resolves to one (`./result`).
fn to_store_path(p: &Path) -> anyhow::Result<StorePath> {
    let s = p.to_string_lossy();
    if let Ok(sp) = StorePath::parse(&s) {
        return Ok(sp);
    }
    let real = std::fs::canonicalize(p).with_context(|| format!("{}", p.display()))?;
    let top: PathBuf = real.components().take(4).collect();
    Ok(StorePath::parse(&top.to_string_lossy())?)
}

fn call(config: &Config, req: &Request, timeout: Option<Duration>) -> anyhow::Result<Response> {
    match protocol::call(&config.socket, req, timeout) {
        Ok(Response::Error { message, .. }) => bail!("the daemon refused: {message}"),
        Ok(r) => Ok(r),
        Err(e) => Err(e).with_context(|| format!("asking the daemon at {}", config.socket.display())),
    }
}

/// Hands over again the builds the hook could not (`narq status` lists them as failed).
fn retry(config: &Config) -> anyhow::Result<ExitCode> {
    let Response::Dropped { builds } = call(config, &Request::Dropped, Some(Duration::from_secs(10)))? else {
        bail!("unexpected answer from the daemon")
    };
    if builds.is_empty() {
        eprintln!("narq: no dropped builds");
        return Ok(ExitCode::SUCCESS);
    }
    let mut failed = 0;
    // One submission per build: outputs of one derivation together, with its log.
    let mut seen = std::collections::HashSet::new();
    for b in &builds {
        if !seen.insert((b.drv.clone(), if b.drv.is_some() { None } else { b.root.clone() })) {
            continue;
        }
        let roots: Vec<StorePath> = match &b.drv {
            Some(d) => match hook::outputs(None, Some(&d.to_string())) {
                Ok(r) => r,
                Err(_) => b.root.iter().cloned().collect(),
            },
            None => b.root.iter().cloned().collect(),
        };
        let what = b.drv.as_ref().map_or_else(|| roots.iter().map(ToString::to_string).collect::<Vec<_>>().join(" "), ToString::to_string);
        match hook::closure(&roots).and_then(|c| hook::submit(config, c, b.drv.clone())) {
            Ok(Delivery::Queued { new }) => eprintln!("narq: {what}: enqueued ({new} paths not uploaded before)"),
            Ok(Delivery::Spooled(f, why)) => eprintln!("narq: {what}: {why}; spooled to {}", f.display()),
            Err(e) => {
                failed += 1;
                eprintln!("narq: {what}: still not handed over: {e:#}");
            }
        }
    }
    Ok(if failed > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

fn wait(config: &Config, timeout: Option<Duration>, paths: Option<Vec<StorePath>>) -> anyhow::Result<ExitCode> {
    let t = timeout.unwrap_or(Duration::from_secs(10 * 365 * 86400));
    let req = Request::Wait { timeout_ms: t.as_millis() as u64, paths };
    let resp = call(config, &req, timeout.map(|t| t + Duration::from_secs(30)))?;
    let Response::Waited { complete, failed } = resp else { bail!("unexpected answer: {resp:?}") };
    for f in &failed {
        eprintln!("narq: failed: {}: {}", f.item, f.error);
    }
    Ok(if !failed.is_empty() {
        ExitCode::from(1)
    } else if !complete {
        eprintln!("narq: timed out; uploads go on in the background");
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}

fn print_status(s: &Status) {
    println!("store:     {}", s.store);
    println!("pending:   {} ({} in flight, {} spooled)", s.pending, s.in_flight, s.spooled);
    println!("uploaded:  {} ({} bytes, {:.0} B/s over the last minute)", s.uploaded, s.bytes, s.rate);
    println!("skipped:   {} (already in the cache)", s.skipped);
    println!("failed:    {}", s.failed);
    if let Some(e) = &s.target_error {
        println!("paused:    {e}");
    }
    if !s.recent_failures.is_empty() {
        // Root causes first (the daemon orders them so).
        println!("recent failures:");
        for f in &s.recent_failures {
            println!("  {}: {}", f.item, f.error);
        }
    }
}

fn keygen(name: &str, sk_file: &Path, pk_file: &Path) -> anyhow::Result<ExitCode> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let sk = SecretKey::generate(name)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(sk_file)
        .with_context(|| format!("creating {}", sk_file.display()))?;
    f.write_all(sk.to_nix_string().as_bytes())?;
    f.sync_all()?;
    std::fs::write(pk_file, sk.public().to_nix_string()).with_context(|| format!("writing {}", pk_file.display()))?;
    println!("{}", sk.public().to_nix_string());
    Ok(ExitCode::SUCCESS)
}

fn daemon(config: Config) -> anyhow::Result<ExitCode> {
    narq::logging::init();
    if let Some(f) = &config.file {
        tracing::info!(config = %f.display(), "configuration loaded");
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        let listener = narq::daemon::listener(&config)?;
        let shutdown = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        };
        narq::daemon::run(config, listener, shutdown).await
    })?;
    Ok(ExitCode::SUCCESS)
}
