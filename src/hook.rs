//! What `narq-hook` does after each build, and what `narq push` shares with it: find the
//! outputs, read their closure from the Nix database, sign every path, hand the request to
//! the daemon, and spool it to disk when the daemon does not answer in time.
//!
//! The hook never fails a build: [`run`] returns the one line to print on trouble, and the
//! binary always exits 0.

use std::path::Path;
use std::time::Duration;

use crate::config::Config;
use crate::nix::{db::NixDb, drv, StorePath};
use crate::protocol::{self, Request, Response};
use crate::spool;

/// How long the hook waits for the daemon before spooling. The daemon answers after one
/// fsync; a second is far beyond that and still short next to a build.
pub const DAEMON_TIMEOUT: Duration = Duration::from_secs(2);

/// The outputs of a build: `OUT_PATHS` (space-separated), else the `.drv` at `DRV_PATH`
/// (Nix 2.8 passes an empty `OUT_PATHS`).
pub fn outputs(out_paths: Option<&str>, drv_path: Option<&str>) -> anyhow::Result<Vec<StorePath>> {
    let listed: Vec<&str> = out_paths.unwrap_or("").split_whitespace().collect();
    if !listed.is_empty() {
        return Ok(listed.into_iter().map(StorePath::parse).collect::<Result<_, _>>()?);
    }
    let drv_path = drv_path.filter(|d| !d.is_empty()).ok_or_else(|| anyhow::anyhow!("neither OUT_PATHS nor DRV_PATH is set"))?;
    let text = std::fs::read(drv_path).map_err(|e| anyhow::anyhow!("{drv_path}: {e}"))?;
    Ok(drv::parse_outputs(&text)?.into_iter().filter_map(|o| o.path).collect())
}

/// An `enqueue` request for the closure of `roots`, signed with every configured key.
pub fn closure_request(config: &Config, roots: &[StorePath], drv: Option<StorePath>) -> anyhow::Result<Request> {
    let keys = config.secret_keys()?;
    let mut paths = NixDb::open_default()?.query(roots, true)?;
    for p in &mut paths {
        for k in &keys {
            p.sign(k);
        }
    }
    Ok(Request::Enqueue { paths, drv })
}

pub enum Delivery {
    Queued,
    Spooled(std::path::PathBuf, String),
}

/// Hands `req` to the daemon, or spools it when the daemon is unreachable or too slow.
/// An explicit refusal by the daemon is an error: spooling would only be refused again.
pub fn deliver(config: &Config, req: &Request) -> anyhow::Result<Delivery> {
    let why = match protocol::call(&config.socket, req, Some(DAEMON_TIMEOUT)) {
        Ok(Response::Queued { .. }) => return Ok(Delivery::Queued),
        Ok(Response::Error { message }) => anyhow::bail!("the daemon refused the request: {message}"),
        Ok(other) => format!("unexpected answer {other:?}"),
        Err(e) => format!("daemon at {} unreachable: {e}", config.socket.display()),
    };
    let file = spool::write(&config.spool_dir(), &protocol::encode(req))
        .map_err(|e| anyhow::anyhow!("{why}; and spooling to {} failed: {e}", config.spool_dir().display()))?;
    Ok(Delivery::Spooled(file, why))
}

/// The hook's whole job. `Ok(None)`: nothing to say; `Ok(Some(line))`/`Err`: one line for stderr.
pub fn run(config_file: Option<&Path>, out_paths: Option<&str>, drv_path: Option<&str>) -> anyhow::Result<Option<String>> {
    let config = Config::load(config_file)?;
    let roots = outputs(out_paths, drv_path)?;
    if roots.is_empty() {
        return Ok(None);
    }
    let drv = drv_path.filter(|d| !d.is_empty()).map(StorePath::parse).transpose()?;
    let req = closure_request(&config, &roots, drv)?;
    Ok(match deliver(&config, &req)? {
        Delivery::Queued => None,
        Delivery::Spooled(file, why) => Some(format!("{why}; spooled to {}", file.display())),
    })
}
