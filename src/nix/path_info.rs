//! What Nix knows about a valid store path (`ValidPathInfo`), and its signatures.

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

use super::hash::Sha256;
use super::signing::{fingerprint, PublicKey, SecretKey};
use super::store_path::StorePath;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathInfo {
    pub path: StorePath,
    pub nar_hash: Sha256,
    pub nar_size: u64,
    /// Sorted, as Nix keeps and writes them; may include the path itself.
    pub references: BTreeSet<StorePath>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deriver: Option<StorePath>,
    /// `NAME:BASE64` signatures, sorted.
    #[serde(default)]
    pub sigs: BTreeSet<String>,
    /// Content-address assertion (`fixed:r:sha256:…`, `text:sha256:…`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
}

impl PathInfo {
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.path, &self.nar_hash, self.nar_size, &self.references)
    }

    pub fn sign(&mut self, key: &SecretKey) {
        self.sigs.insert(key.sign(&self.fingerprint()));
    }

    /// Signs every path with every key (on all CPUs when there are many paths).
    pub fn sign_all(paths: &mut [PathInfo], keys: &[SecretKey]) {
        let sigs = crate::par::map(paths, |p| {
            let fp = p.fingerprint();
            keys.iter().map(|k| k.sign(&fp)).collect::<Vec<_>>()
        });
        for (p, s) in paths.iter_mut().zip(sigs) {
            p.sigs.extend(s);
        }
    }

    /// The signatures among `sigs` that were made by none of `keys`: a path handed to
    /// the daemon may carry other keys' signatures, but every one *named* like one of
    /// our keys must verify with it.
    pub fn forged_sigs<'a>(&'a self, keys: &[PublicKey]) -> Vec<&'a str> {
        let fp = self.fingerprint();
        self.sigs
            .iter()
            .filter(|s| {
                let name = s.split_once(':').map_or(s.as_str(), |n| n.0);
                keys.iter().any(|k| k.name == name) && !keys.iter().any(|k| k.verify(&fp, s))
            })
            .map(String::as_str)
            .collect()
    }

    /// True if some signature verifies with one of `keys`.
    pub fn signed_by_any(&self, keys: &[PublicKey]) -> bool {
        let fp = self.fingerprint();
        self.sigs.iter().any(|s| keys.iter().any(|k| k.verify(&fp, s)))
    }
}

impl Serialize for Sha256 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Sha256 {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Sha256::parse(&s).map_err(serde::de::Error::custom)
    }
}
