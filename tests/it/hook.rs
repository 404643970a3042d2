//! The hook under faults and hostile local users: bounded hand-off, spool safety, key file permissions.

#[allow(unused_imports)]
use crate::util::*;
