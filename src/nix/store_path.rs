//! Store paths: `/nix/store/<32 nixbase32 chars>-<name>`, validated as Nix does
//! (`libstore/path.cc`): the hash part must decode to 20 bytes and the name must be
//! 1 to 211 characters of `A-Za-z0-9+-._?=`, not starting with a period.

use std::fmt;
use thiserror::Error;

use super::nixbase32;

pub const STORE_DIR: &str = "/nix/store";
pub const HASH_LEN: usize = 32;
const MAX_NAME_LEN: usize = 211;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum StorePathError {
    #[error("store path {0:?} is not in {STORE_DIR}")]
    NotInStore(String),
    #[error("store path {0:?} is too short to hold a hash and a name")]
    TooShort(String),
    #[error("store path {0:?} has an invalid hash part: {1}")]
    BadHash(String, String),
    #[error("store path {0:?} has an invalid name: {1}")]
    BadName(String, String),
}

/// A validated store path, kept as its base name (`<hash>-<name>`).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct StorePath {
    base: String,
}

/// By the hash part alone (what tells store paths apart; half the bytes of the base name):
/// requests name thousands of paths, each hashed into several sets.
impl std::hash::Hash for StorePath {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.hash_part().hash(state)
    }
}

impl StorePath {
    /// Parses a full path `/nix/store/<hash>-<name>`.
    pub fn parse(path: &str) -> Result<Self, StorePathError> {
        let base = path
            .strip_prefix(STORE_DIR)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| StorePathError::NotInStore(path.to_string()))?;
        Self::from_base_name_for(base, path)
    }

    /// Parses a base name `<hash>-<name>`.
    pub fn from_base_name(base: &str) -> Result<Self, StorePathError> {
        Self::from_base_name_for(base, base)
    }

    fn from_base_name_for(base: &str, shown: &str) -> Result<Self, StorePathError> {
        let err_name = |why: &str| StorePathError::BadName(shown.to_string(), why.to_string());
        if base.len() < HASH_LEN + 2 || !base.is_char_boundary(HASH_LEN) {
            return Err(StorePathError::TooShort(shown.to_string()));
        }
        let (hash, rest) = base.split_at(HASH_LEN);
        nixbase32::decode(hash.as_bytes(), 20)
            .map_err(|e| StorePathError::BadHash(shown.to_string(), e.to_string()))?;
        let name = rest.strip_prefix('-').ok_or_else(|| err_name("no '-' after the hash part"))?;
        if name.len() > MAX_NAME_LEN {
            return Err(err_name(&format!("longer than {MAX_NAME_LEN} characters")));
        }
        if name.starts_with('.') {
            return Err(err_name("starts with a period"));
        }
        if let Some((i, c)) = name
            .char_indices()
            .find(|&(_, c)| !(c.is_ascii_alphanumeric() || "+-._?=".contains(c)))
        {
            return Err(err_name(&format!("character {c:?} at position {i} is not allowed")));
        }
        Ok(StorePath { base: base.to_string() })
    }

    /// `<hash>-<name>`
    pub fn base_name(&self) -> &str {
        &self.base
    }

    /// The 32-character hash part, which names the `.narinfo`.
    pub fn hash_part(&self) -> &str {
        &self.base[..HASH_LEN]
    }

    pub fn name(&self) -> &str {
        &self.base[HASH_LEN + 1..]
    }

    /// `/nix/store/<hash>-<name>`
    pub fn to_absolute(&self) -> String {
        format!("{STORE_DIR}/{}", self.base)
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{STORE_DIR}/{}", self.base)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({self})")
    }
}

impl serde::Serialize for StorePath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for StorePath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        StorePath::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "/nix/store/z4asv3j07d89ywjf8fxkn7sg6mf5s9q5-dep";

    #[test]
    fn parses_valid_paths() {
        let p = StorePath::parse(GOOD).unwrap();
        assert_eq!(p.hash_part(), "z4asv3j07d89ywjf8fxkn7sg6mf5s9q5");
        assert_eq!(p.name(), "dep");
        assert_eq!(p.to_string(), GOOD);
        assert_eq!(StorePath::parse("/nix/store/00000000000000000000000000000000-a+b-1.0_x?=y").unwrap().name(), "a+b-1.0_x?=y");
    }

    #[test]
    fn rejects_invalid_paths() {
        let h = "z4asv3j07d89ywjf8fxkn7sg6mf5s9q5";
        for (p, want) in [
            ("/nix/stor/x", "not in"),
            ("/nix/store", "not in"),
            ("/nix/store/abc", "too short"),
            (&format!("/nix/store/{h}-"), "too short"),
            (&format!("/nix/store/{h}x-a"), "no '-'"),
            ("/nix/store/e4asv3j07d89ywjf8fxkn7sg6mf5s9q5-dep", "invalid hash"),
            (&format!("/nix/store/{h}-.."), "period"),
            (&format!("/nix/store/{h}-a/b"), "'/'"),
            (&format!("/nix/store/{h}-a b"), "' '"),
            (&format!("/nix/store/{h}-ü"), "'ü'"),
            (&format!("/nix/store/{h}-{}", "a".repeat(212)), "longer"),
            (&format!("/nix/store/{}ü-abc", &h[..31]), "too short"),
        ] {
            let e = StorePath::parse(p).unwrap_err().to_string();
            assert!(e.contains(want), "{p}: {e}");
        }
        assert!(StorePath::parse(&format!("/nix/store/{h}-{}", "a".repeat(211))).is_ok());
    }
}
