//! The daemon as a process: connection limits, one daemon per state dir, what it cannot parse.

#[allow(unused_imports)]
use crate::util::*;
