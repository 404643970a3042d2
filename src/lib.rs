//! narq: every store path that Nix builds, uploaded in the background to a signed binary cache.
//!
//! # Layout
//! - [`nix`]: Nix's formats (nixbase32, store paths, NAR, narinfo, keys and signatures,
//!   `.drv` outputs, NAR listings, realisations) and the read-only view of the local Nix
//!   database. Pure but for `db` and `nar::dump`.
//! - [`config`]: the one TOML configuration of hook, daemon and CLI; [`store_url`]: Nix's
//!   store-URL syntax with each backend's options (`s3_options`), parsed without SDK types.
//! - [`protocol`]: hook ↔ daemon frames (plain `std`, so the hook needs no runtime; their
//!   async reading and writing only with the `daemon` feature).
//! - [`hook`]: what `narq-hook` and `narq push` do: closure, signatures, hand-off or spool.
//! - [`spool`]: requests written to disk while the daemon is away; [`par`]: signing and
//!   checking signatures on all CPUs; [`dirfd`]: directories used by handle, so that no
//!   symlink planted below them is followed.
//! - [`queue`]: the durable queue and all its policy (states, ordering, backoff): `mod.rs`
//!   the database, then one file per concern — `items`, `lookup` (what admission asks),
//!   `trust` (how far `done` is trusted), `roots`, `dropped`, `report` (status and wait).
//! - [`outcome`]: how one upload ends (`Outcome`, `UploadError`), for the queue, the metrics
//!   and the workers alike.
//! - [`upload`]: one item from store to target; [`storage`]: where the cache lives — the
//!   `Target` trait (put/exists for uploads; list, get, open_read, delete and incomplete
//!   uploads for maintenance), one file per backend, opened with its options from
//!   [`store_url`]; [`upstream`]: caches whose paths are not uploaded again.
//! - [`daemon`]: `mod.rs` wires it up (`run`, the state dir's tmp and reserve); `server`
//!   (the socket: limits, requests, `status`, `wait`), `admission` (validating and enqueuing
//!   a request, spool ingestion), `workers` (the dispatcher, which alone holds the in-flight
//!   set and the breaker, and the upload workers), `breaker`, `systemd` (socket activation,
//!   `sd_notify`), `lock` (one daemon per state dir), `shared_queue`.
//! - [`cache`]: reading a whole cache — `scan` lists every object and reads every narinfo
//!   through an index in the state dir that keeps the next scan to what changed; `verify`
//!   (`narq verify`, `--repair`), `deep` (a NAR downloaded and checked), `sign` (`narq sign`),
//!   `roots` (narq's objects in the bucket: roots, pins, and the protocol that keeps uploads
//!   safe while `gc`/`rm` delete), `gc` (the deletion planner), `maint` (`narq gc`, `rm`, `pin`).
//! - [`logging`]: journald under systemd, readable lines on stderr otherwise.
//! - [`doctor`]: `narq doctor`, one line per check of the whole set-up.
//! - [`metrics`]: counters, the uploads in flight with their progress, and the Prometheus
//!   endpoint (`metrics-listen`); [`progress`]: how the CLI shows status and progress.
//!
//! Dependencies run one way: formats and policy below, the uploader and the daemon above;
//! no module takes from one that takes from it (`tests/it/structure.rs` fails on a circle,
//! see docs/development.md).
//!
//! Without the `daemon` feature only what `narq-hook` needs is built: `nix`, `config`,
//! `store_url` with the backends' options, `protocol`, `hook`, `spool`, `dirfd` and `par`.

#[cfg(feature = "daemon")]
pub mod cache;
pub mod config;
#[cfg(feature = "daemon")]
pub mod daemon;
pub mod dirfd;
#[cfg(feature = "daemon")]
pub mod doctor;
pub mod hook;
#[cfg(feature = "daemon")]
pub mod logging;
#[cfg(feature = "daemon")]
pub mod metrics;
pub mod nix;
pub mod par;
pub mod protocol;
#[cfg(feature = "daemon")]
pub mod outcome;
#[cfg(feature = "daemon")]
pub mod progress;
#[cfg(feature = "daemon")]
pub mod queue;
pub mod spool;
#[cfg(feature = "daemon")]
pub mod storage;
pub mod store_url;
#[cfg(feature = "daemon")]
pub mod upload;
#[cfg(feature = "daemon")]
pub mod upstream;
