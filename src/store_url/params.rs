//! A store URL's query parameters while they are being read: each parser (the binary-cache
//! parameters in [`crate::store_url`], each backend's own in its options module beside this
//! one) takes the ones it knows, and what is left at the end is an unknown parameter.
//!
//! The lowest layer of store-URL parsing: `store_url` and the backends' options modules both
//! depend on it, and it on neither.

use std::collections::BTreeMap;

/// Store parameters not yet read.
pub struct Params(BTreeMap<String, String>);

impl Params {
    pub fn new(map: BTreeMap<String, String>) -> Params {
        Params(map)
    }

    /// Removes and returns the value of `key`.
    pub fn take(&mut self, key: &str) -> Option<String> {
        self.0.remove(key)
    }

    /// Removes `key` and reads it as a boolean (`true`/`false`/`1`/`0`).
    pub fn take_bool(&mut self, key: &str) -> Result<Option<bool>, String> {
        self.take(key).map(|v| parse_bool(key, &v)).transpose()
    }

    /// Removes `key` and reads it as a number of `what` (for the message).
    pub fn take_num<T: std::str::FromStr>(&mut self, key: &str, what: &str) -> Result<Option<T>, String> {
        self.take(key).map(|v| v.parse().map_err(|_| format!("parameter {key}={v:?} is not a number ({what})"))).transpose()
    }

    /// The first parameter nobody took, if any.
    pub fn first_left(&self) -> Option<&str> {
        self.0.keys().next().map(String::as_str)
    }
}

pub fn parse_bool(k: &str, v: &str) -> Result<bool, String> {
    match v {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(format!("parameter {k}={v:?}: expected true or false")),
    }
}

/// A parameter Nix documents that narq does not take, and why: refused with its reason
/// rather than accepted and ignored.
pub fn refused(key: &str, why: &str) -> String {
    format!("store parameter {key:?} is not supported: {why}")
}
