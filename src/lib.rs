//! narq: every store path that Nix builds, uploaded in the background to a signed binary cache.
//!
//! # Layout
//! - [`nix`]: Nix's formats (nixbase32, store paths, NAR, narinfo, keys and signatures,
//!   `.drv` outputs) and the read-only view of the local Nix database.
pub mod nix;
