//! Nix's formats, byte-compatible with what Nix writes, and a read-only view of the local
//! Nix database. Everything but [`db`] and [`nar::dump`] is pure.

pub mod db;
pub mod drv;
pub mod hash;
pub mod nar;
pub mod narinfo;
pub mod nixbase32;
pub mod path_info;
pub mod realisation;
pub mod signing;
pub mod store_path;

pub use hash::Sha256;
pub use narinfo::NarInfo;
pub use path_info::PathInfo;
pub use realisation::Realisation;
pub use signing::{PublicKey, SecretKey};
pub use store_path::StorePath;
