//! narq's one integration-test binary. Every test uses real Nix (Debian's nix-bin, as root)
//! and, where it needs one, a real S3 server on 127.0.0.1; `.ci/run` installs both.

mod admission;
mod adversary;
mod cache_under_test;
mod cli;
mod cluster;
mod collection;
mod daemon;
mod doctor;
mod explore;
mod faults;
mod filters;
mod formats;
mod garage;
mod gc;
mod guarantees;
mod hazards;
mod hook;
mod mixed;
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
mod s3proxy;
mod services;
mod setup;
mod storage;
mod util;
mod verify;
