//! narq's one integration-test binary. Every test uses real Nix (Debian's nix-bin, as root)
//! and, where it needs one, a real S3 server on 127.0.0.1; `.ci/run` installs both.

mod admission;
mod cache_under_test;
mod cli;
mod collection;
mod daemon;
mod doctor;
mod faults;
mod filters;
mod first_hour;
mod formats;
mod gc;
mod guarantees;
mod hook;
mod nix234;
mod nixos;
mod observe;
mod parsers;
mod remote;
mod review;
mod perf;
mod robust;
mod rooms;
mod s3;
mod s3_params;
mod setup;
mod storage;
mod util;
mod verify;
