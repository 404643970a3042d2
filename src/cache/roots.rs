//! narq's own objects in the bucket (Nix ignores keys it does not know): the roots and pins
//! that `narq gc` keeps with their closures. How collections and uploads stay out of each
//! other's way is [`super::collection`].
//!
//! - `narq/roots/<hashpart>`: a request's top-level path (a build's output, a `narq push`
//!   argument): the store path, then `narq-protocol 2`; the object's time says when it was
//!   last pushed. Daemons write each at most once a day (`queue::Queue::note_roots`).
//! - `narq/pins/<name>`: a named root, kept whatever its age; the content is the store path.

use std::collections::BTreeMap;

use super::collection::{PROTOCOL, TEXT};
use crate::nix::StorePath;
use crate::storage::{Body, Target, TargetError};

pub const ROOTS: &str = "narq/roots/";
pub const PINS: &str = "narq/pins/";

pub fn root_key(p: &StorePath) -> String {
    format!("{ROOTS}{}", p.hash_part())
}

/// The key of pin `name`; names are what a file name can safely be.
pub fn pin_key(name: &str) -> Result<String, String> {
    let ok = !name.is_empty() && name.len() <= 100 && !name.starts_with('.') && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-+@".contains(&b));
    match ok {
        true => Ok(format!("{PINS}{name}")),
        false => Err(format!("pin name {name:?}: use 1 to 100 of A-Z a-z 0-9 . _ - + @, not starting with a dot")),
    }
}

/// The store path an object of narq's (a root, a pin) holds: its first line.
pub fn parse_path(body: &[u8]) -> Option<StorePath> {
    StorePath::parse(std::str::from_utf8(body).ok()?.lines().next()?.trim()).ok()
}

/// What a root says: its path, and the protocol of the narq that wrote it (see
/// `docs/gc-safety.md`, mixed versions).
pub fn root_body(p: &StorePath) -> Vec<u8> {
    format!("{p}\nnarq-protocol {PROTOCOL}\n").into_bytes()
}

/// Puts the root of `r`.
pub async fn put_root(target: &dyn Target, r: &StorePath) -> Result<(), TargetError> {
    target.put(&root_key(r), Body::Bytes(root_body(r)), TEXT).await
}

/// The pins: name → store path (a pin that does not hold one is left out, with a warning).
pub async fn pins(target: &dyn Target) -> Result<BTreeMap<String, StorePath>, TargetError> {
    let mut keys = Vec::new();
    target.list(PINS, &mut |o| keys.push(o.key)).await?;
    let mut out = BTreeMap::new();
    for k in keys {
        let name = k.trim_start_matches(PINS).to_string();
        match target.get(&k).await?.as_deref().map(parse_path) {
            Some(Some(p)) => {
                out.insert(name, p);
            }
            Some(None) => tracing::warn!("{k} holds no store path; ignored"),
            None => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_are_checked() {
        assert_eq!(pin_key("release-1.2").unwrap(), "narq/pins/release-1.2");
        for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(101)] {
            assert!(pin_key(bad).is_err(), "{bad:?}");
        }
    }
}
