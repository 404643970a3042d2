//! Nothing lost, nothing silently missing: store changes, dropped builds, transient errors, wait verdicts.

#[allow(unused_imports)]
use crate::util::*;
