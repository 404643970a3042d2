//! Logs through `tracing`: to journald with structured fields (`PATH`, `BYTES`,
//! `DURATION_MS`, `ERROR`, …) when systemd started us (`JOURNAL_STREAM` is set), else
//! human-readable lines on stderr. `NARQ_LOG` sets the level (`info` by default; e.g.
//! `debug`, or `narq=debug`).

use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;

pub fn init() {
    let filter: Targets = std::env::var("NARQ_LOG")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO));
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        if let Ok(j) = tracing_journald::layer() {
            let j = j.with_syslog_identifier("narq".into()).with_field_prefix(None);
            tracing_subscriber::registry().with(j).with(filter).init();
            return;
        }
    }
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(false))
        .with(filter)
        .init();
}
