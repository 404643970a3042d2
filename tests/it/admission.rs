//! What the daemon admits: field formats, signatures by configured keys, who may do what.

#[allow(unused_imports)]
use crate::util::*;
