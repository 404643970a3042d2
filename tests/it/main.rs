//! narq's one integration-test binary. Every test uses real Nix (Debian's nix-bin, as root)
//! and, where it needs one, a real S3 server on 127.0.0.1; `.ci/run` installs both.

mod admission;
mod cli;
mod daemon;
mod faults;
mod formats;
mod guarantees;
mod hook;
mod nixos;
mod parsers;
mod perf;
mod robust;
mod rooms;
mod s3;
mod setup;
mod storage;
mod util;
