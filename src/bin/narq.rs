//! `narq`: the daemon and the commands around it. See `narq --help`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{CommandFactory, Parser, Subcommand};
use narq::config::Config;
use narq::hook::{self, Delivery};
use narq::nix::{nar, SecretKey, StorePath};
use narq::progress;
use narq::protocol::{self, Request, Response};

/// The command line, parsed completely (by clap) before anything runs.
#[derive(Parser, Debug)]
#[command(name = "narq", version, about, after_help = AFTER_HELP)]
struct Cli {
    /// The configuration file [default: $NARQ_CONFIG, else /etc/narq/config.toml]
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

const AFTER_HELP: &str = "\
Configuration: --config FILE, else $NARQ_CONFIG, else /etc/narq/config.toml.

Exit codes: 0 success; 1 error, or (wait, push --wait, retry) something failed;
2 usage error; 3 wait timed out (uploads go on).";

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the queue and the uploaders (foreground)
    Daemon,
    /// Enqueue paths and their closures, signed like the hook does
    Push {
        /// Then wait until the closures are uploaded; exit 1 if a path failed for good
        #[arg(long)]
        wait: bool,
        /// Store paths, or links to them such as ./result
        #[arg(required = true)]
        path: Vec<PathBuf>,
    },
    /// Queue depth, in flight, uploaded, failed, bytes and rate
    Status {
        /// Print the status as JSON
        #[arg(long)]
        json: bool,
    },
    /// Wait until everything enqueued so far is uploaded; report what failed since the last wait
    #[command(after_help = "Exit codes: 0 all uploaded; 1 some path failed for good; 3 timed out.")]
    Wait {
        /// Give up after SECS seconds (fractions allowed) [default: no limit]
        #[arg(long, value_name = "SECS", value_parser = seconds)]
        timeout: Option<Duration>,
    },
    /// Hand over again the builds the hook could not (see status)
    Retry,
    /// Make a key pair in Nix's format (NAME:BASE64)
    Keygen {
        /// The key's name, conventionally the cache's host name and a number (cache.example.org-1)
        name: String,
        /// Where to write the secret key (created, mode 0600; must not exist)
        #[arg(long, value_name = "FILE")]
        secret_key_file: PathBuf,
        /// Where to write the public key
        #[arg(long, value_name = "FILE")]
        public_key_file: PathBuf,
    },
    /// Check the whole set-up, one line per check (config, keys, daemon, Nix's hook, store, clock, upstreams)
    #[command(after_help = "Exit codes: 0 every check passed; 1 some check failed (its line says what to fix).")]
    Doctor,
    /// Audit a binary cache (the whole cache without paths); --repair uploads broken paths again
    Verify(narq::cache::verify::Args),
    /// Add a signature to narinfos already in the cache, keeping theirs; only to paths it checked
    Sign(narq::cache::sign::Args),
    /// Remove paths from the cache without breaking closures (NARs only when no narinfo left names them)
    #[command(after_help = "Exit codes: 0 removed (or nothing to remove); 1 refused: narinfos that stay reference a path, or it is pinned.")]
    Rm {
        /// Also remove every path that references one of them, directly or not
        #[arg(long)]
        with_referrers: bool,
        /// Print what would be removed; delete nothing
        #[arg(long)]
        dry_run: bool,
        /// Store paths, or links to them such as ./result
        #[arg(required = true)]
        path: Vec<PathBuf>,
    },
    /// Keep PATH's closure in the cache whatever its age, under NAME
    Pin { name: String, path: PathBuf },
    /// Remove the pin NAME (the paths go at a later gc unless something else keeps them)
    Unpin { name: String },
    /// List the pins: NAME PATH
    Pins,
    /// Collect garbage: keep recent roots, pins and their closures; delete the rest, safely while uploads run
    #[command(after_help = "Defaults come from the [gc] section of the config (keep-days 30, grace 24h, no max-size).")]
    Gc {
        /// Keep the closures of roots pushed within N days
        #[arg(long, value_name = "N")]
        keep_days: Option<u64>,
        /// If what stays is larger, give up the oldest roots (never pins) until it fits, e.g. 500G
        #[arg(long, value_name = "SIZE", value_parser = narq::config::parse_size)]
        max_size: Option<u64>,
        /// Keep anything written within this long (uploads in progress), e.g. 24h, 0s
        #[arg(long, value_name = "DURATION", value_parser = narq::config::parse_duration)]
        grace: Option<Duration>,
        /// Print what would be removed; delete nothing
        #[arg(long)]
        dry_run: bool,
        /// Print the summary as JSON
        #[arg(long)]
        json: bool,
    },
    /// Print the NAR hash and size of PATH (like nix-hash --type sha256 --base32)
    NarHash { path: PathBuf },
    /// Print a completion script for SHELL (bash, zsh, fish, elvish, powershell)
    Completions { shell: clap_complete::Shell },
    /// Write man pages for narq and each command into DIR
    Man { dir: PathBuf },
}

/// `--timeout SECS`: what a `Duration` holds (`Duration::from_secs_f64` would panic on -1).
fn seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.parse().map_err(|e: std::num::ParseFloatError| e.to_string())?;
    Duration::try_from_secs_f64(secs).map_err(|_| "expected seconds, from 0 to 2^64".to_string())
}

/// How `narq` ends: the one place where exit codes are decided (`narq --help` lists them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    /// 0: done, everything asked for succeeded.
    Success,
    /// 1: the command ran but something it reports on failed (a path that failed for good
    /// in `wait`/`push --wait`, a build `retry` still could not hand over).
    Failed,
    /// 1: an error stopped the command.
    Error,
    /// 2: the command line is wrong.
    Usage,
    /// 3: `wait` timed out; the uploads go on in the background.
    TimedOut,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> ExitCode {
        ExitCode::from(match e {
            Exit::Success => 0,
            Exit::Failed | Exit::Error => 1,
            Exit::Usage => 2,
            Exit::TimedOut => 3,
        })
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // clap prints help and --version on stdout, and usage errors on stderr.
            let _ = e.print();
            return if e.use_stderr() { Exit::Usage } else { Exit::Success }.into();
        }
    };
    match run(cli) {
        Ok(exit) => exit.into(),
        Err(e) => {
            eprintln!("narq: {e:#}");
            Exit::Error.into()
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<Exit> {
    let config = || Config::load(cli.config.as_deref());
    match cli.command {
        Cmd::Daemon => daemon(config()?),
        Cmd::Push { wait: do_wait, path } => {
            let paths = path.iter().map(|p| to_store_path(p)).collect::<anyhow::Result<Vec<_>>>()?;
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
            match hook::submit(&config, hook::Handover { roots: &paths, closure: Some(closure), drv: None, realisations: Vec::new() })? {
                Delivery::Queued { new } => eprintln!("narq: enqueued {new} paths not uploaded before"),
                Delivery::Spooled(f, why) => eprintln!("narq: {why}; spooled to {}", f.display()),
            }
            if do_wait {
                return wait(&config, None, Some(all));
            }
            Ok(Exit::Success)
        }
        Cmd::Status { json } => {
            let config = config()?;
            match call(&config, &Request::Status, Some(Duration::from_secs(10)))? {
                Response::Status(s) if json => println!("{}", serde_json::to_string_pretty(&s)?),
                Response::Status(s) => print!("{}", progress::status(&s)),
                other => bail!("unexpected answer: {other:?}"),
            }
            Ok(Exit::Success)
        }
        Cmd::Wait { timeout } => wait(&config()?, timeout, None),
        Cmd::Retry => retry(&config()?),
        Cmd::Keygen { name, secret_key_file, public_key_file } => keygen(&name, &secret_key_file, &public_key_file),
        Cmd::Doctor => Ok(if narq::doctor::run(cli.config.as_deref()) { Exit::Success } else { Exit::Failed }),
        Cmd::Verify(args) => Ok(if narq::cache::verify::run(&config()?, args, to_store_path)? { Exit::Success } else { Exit::Failed }),
        Cmd::Sign(args) => Ok(if narq::cache::sign::run(&config()?, args, to_store_path)? { Exit::Success } else { Exit::Failed }),
        Cmd::Rm { with_referrers, dry_run, path } => done(narq::cache::maint::rm(&config()?, &store_paths(&path)?, with_referrers, dry_run)),
        Cmd::Pin { name, path } => done(narq::cache::maint::pin(&config()?, &name, &to_store_path(&path)?)),
        Cmd::Unpin { name } => done(narq::cache::maint::unpin(&config()?, &name)),
        Cmd::Pins => done(narq::cache::maint::pins(&config()?)),
        Cmd::Gc { keep_days, max_size, grace, dry_run, json } => {
            done(narq::cache::maint::gc(&config()?, &narq::cache::maint::GcOptions { keep_days, max_size, grace, dry_run, json }))
        }
        Cmd::NarHash { path } => {
            let stats = nar::hash_path(&path).with_context(|| format!("{}", path.display()))?;
            println!("{} {}", stats.hash.to_base32(), stats.size);
            Ok(Exit::Success)
        }
        Cmd::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "narq", &mut std::io::stdout());
            Ok(Exit::Success)
        }
        Cmd::Man { dir } => {
            clap_mangen::generate_to(Cli::command(), &dir).with_context(|| format!("writing man pages to {}", dir.display()))?;
            Ok(Exit::Success)
        }
    }
}

/// A maintenance command's answer: done, or refused (it said why).
fn done(r: anyhow::Result<bool>) -> anyhow::Result<Exit> {
    r.map(|ok| if ok { Exit::Success } else { Exit::Failed })
}

fn store_paths(paths: &[PathBuf]) -> anyhow::Result<Vec<StorePath>> {
    paths.iter().map(|p| to_store_path(p)).collect()
}

/// A store path, or something that resolves to one (`./result`), or a file inside one.
fn to_store_path(p: &Path) -> anyhow::Result<StorePath> {
    use narq::nix::store_path::STORE_DIR;
    let s = p.to_string_lossy();
    if let Ok(sp) = StorePath::parse(&s) {
        return Ok(sp);
    }
    let real = std::fs::canonicalize(p).with_context(|| format!("{}", p.display()))?;
    if !real.starts_with(STORE_DIR) || real == Path::new(STORE_DIR) {
        bail!("{} is not in the Nix store ({STORE_DIR}) nor a link into it: give store paths, or links to them such as ./result", p.display());
    }
    let top: PathBuf = real.components().take(4).collect();
    Ok(StorePath::parse(&top.to_string_lossy())?)
}

fn call(config: &Config, req: &Request, timeout: Option<Duration>) -> anyhow::Result<Response> {
    use std::io::ErrorKind::{ConnectionRefused, NotFound, PermissionDenied};
    let socket = config.socket.display();
    match protocol::call(&config.socket, req, timeout) {
        Ok(Response::Error { message, .. }) => bail!("the daemon refused: {message}"),
        Ok(r) => Ok(r),
        Err(protocol::FrameError::Io(e)) if matches!(e.kind(), NotFound | ConnectionRefused) => {
            let why = if e.kind() == NotFound { "the socket does not exist" } else { "nothing listens on the socket" };
            bail!(
                "no narq daemon answers on {socket} ({why}): start one (`systemctl start narq.socket`, or `narq daemon` under a \
                 supervisor), or point --config / NARQ_CONFIG at the config it runs with; `narq doctor` checks the whole set-up"
            )
        }
        Err(protocol::FrameError::Io(e)) if e.kind() == PermissionDenied => {
            bail!("may not connect to {socket} ({e}): run as root, as the daemon's user, or as a member of the socket's group")
        }
        Err(e) => Err(e).with_context(|| format!("asking the daemon at {socket}")),
    }
}

/// Hands over again the builds the hook could not (`narq status` lists them as failed).
fn retry(config: &Config) -> anyhow::Result<Exit> {
    let Response::Dropped { builds } = call(config, &Request::Dropped, Some(Duration::from_secs(10)))? else {
        bail!("unexpected answer from the daemon")
    };
    if builds.is_empty() {
        eprintln!("narq: no dropped builds");
        return Ok(Exit::Success);
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
        match hook::submit(config, hook::Handover { roots: &roots, closure: None, drv: b.drv.clone(), realisations: Vec::new() }) {
            Ok(Delivery::Queued { new }) => eprintln!("narq: {what}: enqueued ({new} paths not uploaded before)"),
            Ok(Delivery::Spooled(f, why)) => eprintln!("narq: {what}: {why}; spooled to {}", f.display()),
            Err(e) => {
                failed += 1;
                eprintln!("narq: {what}: still not handed over: {e:#}");
            }
        }
    }
    Ok(if failed > 0 { Exit::Failed } else { Exit::Success })
}

fn wait(config: &Config, timeout: Option<Duration>, paths: Option<Vec<StorePath>>) -> anyhow::Result<Exit> {
    let t = timeout.unwrap_or(Duration::from_secs(10 * 365 * 86400));
    let closure = paths.is_some();
    let req = Request::Wait { timeout_ms: t.as_millis() as u64, paths };
    let started = Instant::now();
    let resp = with_progress(
        config,
        || call(config, &req, timeout.map(|t| t + Duration::from_secs(30))),
        |resp| match resp {
            Ok(Response::Waited { summary: Some(w), .. }) => Some(progress::waited(w, closure, started.elapsed())),
            _ => None,
        },
    )?;
    let Response::Waited { complete, failed, .. } = resp else { bail!("unexpected answer: {resp:?}") };
    for f in &failed {
        eprintln!("narq: failed: {}: {}", f.item, f.error);
    }
    Ok(if !failed.is_empty() {
        Exit::Failed
    } else if !complete {
        eprintln!("narq: timed out; uploads go on in the background");
        Exit::TimedOut
    } else {
        Exit::Success
    })
}

/// Runs `wait` (one blocking request) on a thread, and meanwhile shows the daemon's progress
/// on stderr from `status` (see `narq::progress`), from the first redraw on: a wait that ends
/// at once shows only its closing line. That line is `closing`'s, from the wait's answer, else
/// the progress's own summary. Without a first `status` answer it just waits.
fn with_progress<T: Send>(config: &Config, wait: impl FnOnce() -> T + Send, closing: impl FnOnce(&T) -> Option<String>) -> T {
    use std::io::IsTerminal;
    use std::os::fd::AsRawFd;
    let poll = || match protocol::call(&config.socket, &Request::Status, Some(Duration::from_secs(5))) {
        Ok(Response::Status(s)) => Some(s),
        _ => None,
    };
    let Some(base) = poll() else { return wait() };
    let stderr = std::io::stderr();
    let tty = stderr.is_terminal();
    let width = progress::terminal_width(stderr.as_raw_fd()).unwrap_or(80);
    let mut display = progress::Display::new(stderr.lock(), tty, width);
    let mut meter = progress::Meter::new(base.clone());
    let mut reading = meter.read(&base);
    std::thread::scope(|scope| {
        let waiting = scope.spawn(wait);
        // Bounded by the wait itself, which has its own timeout.
        while !waiting.is_finished() {
            let step = Instant::now() + display.every();
            while !waiting.is_finished() && Instant::now() < step {
                std::thread::sleep(Duration::from_millis(20));
            }
            if waiting.is_finished() {
                break;
            }
            if let Some(s) = poll() {
                reading = meter.read(&s);
                display.show(&meter.line(&reading));
            }
        }
        // A panic of the wait is a panic of ours.
        let answer = waiting.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
        let line = closing(&answer).unwrap_or_else(|| {
            if let Some(s) = poll() {
                reading = meter.read(&s);
            }
            meter.summary(&reading)
        });
        display.finish(&line);
        answer
    })
}

fn keygen(name: &str, sk_file: &Path, pk_file: &Path) -> anyhow::Result<Exit> {
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
    Ok(Exit::Success)
}

fn daemon(config: Config) -> anyhow::Result<Exit> {
    // glibc gives each thread that allocates an arena of its own, and keeps what is freed in
    // it: the runtime's workers, the blocking pool and the signature checks' threads would
    // each hold the high-water mark of a large request. Two arenas bound that.
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    narq::logging::init();
    if let Some(f) = &config.file {
        tracing::info!(config = %f.display(), "configuration loaded");
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        // Handled from before the socket is bound: a daemon stopped by SIGTERM or SIGINT
        // (Ctrl-C) at any moment removes the socket it bound.
        use tokio::signal::unix::{signal, SignalKind};
        let (mut term, mut int) = (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?);
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        };
        let listener = narq::daemon::listener(&config)?;
        narq::daemon::run(config, listener, shutdown).await
    })?;
    Ok(Exit::Success)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// clap's own consistency checks of the definition (names, conflicts, value names).
    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn timeout_seconds() {
        assert_eq!(seconds("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(seconds("0"), Ok(Duration::ZERO));
        for bad in ["x", "-1", "inf", "NaN", "1e30", ""] {
            assert!(seconds(bad).is_err(), "{bad}");
        }
    }
}
