//! What Nix knows about a valid store path (`ValidPathInfo`), and its signatures.

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

use super::hash::Sha256;
use super::nixbase32;
use super::signing::{check_signature_syntax, fingerprint, PublicKey, SecretKey};
use super::store_path::StorePath;

/// The most signatures a path may carry. Nix paths carry one per cache they were signed
/// for, a handful at most; the cap bounds what checking a request can cost (a signature
/// check is ~50 µs) and stops the parsing of one that carries more at the first extra one.
pub const MAX_SIGS: usize = 32;

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
    /// `NAME:BASE64` signatures, sorted; at most [`MAX_SIGS`], each checked by
    /// [`check_signature_syntax`] when parsed.
    #[serde(default, deserialize_with = "de_sigs")]
    pub sigs: BTreeSet<String>,
    /// Content-address assertion (`fixed:r:sha256:…`, `text:sha256:…`), if any; checked
    /// by [`check_ca`] when parsed.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "de_ca")]
    pub ca: Option<String>,
}

impl PathInfo {
    /// The paths of a closure that no other path in it references: the outputs it was sent
    /// for (a request's roots).
    pub fn tops(paths: &[PathInfo]) -> Vec<StorePath> {
        let referenced: std::collections::HashSet<&StorePath> =
            paths.iter().flat_map(|p| p.references.iter().filter(move |r| **r != p.path)).collect();
        paths.iter().map(|p| &p.path).filter(|p| !referenced.contains(p)).cloned().collect()
    }

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

    /// Admits the path on its signatures: every one named like one of `keys` must verify
    /// with it (the first forged one ends the check), and at least one must. Signatures by
    /// other keys are kept but prove nothing.
    pub fn check_sigs(&self, keys: &[PublicKey]) -> Result<(), String> {
        super::signing::check_sigs(&self.fingerprint(), &self.sigs, keys, &self.path)
    }

    /// True if some signature verifies with one of `keys`.
    pub fn signed_by_any(&self, keys: &[PublicKey]) -> bool {
        let fp = self.fingerprint();
        self.sigs.iter().any(|s| keys.iter().any(|k| k.verify(&fp, s)))
    }
}

/// Checks a content-address assertion as Nix writes one (`ContentAddress::render`):
/// `text:sha256:HASH`, or `fixed:[r:|git:]ALGO:HASH` with ALGO one of md5, sha1, sha256,
/// sha512 and HASH its digest in base16, nixbase32 or base64.
pub fn check_ca(ca: &str) -> Result<(), String> {
    // Quoted (control characters escaped) and cut short: the error reaches the log.
    let shown: String = ca.chars().take(120).collect();
    let more = if shown.len() < ca.len() { "…" } else { "" };
    let bad = |why: &str| Err(format!("CA {shown:?}{more} {why}"));
    let (algo, hash) = if let Some(rest) = ca.strip_prefix("text:") {
        match rest.split_once(':') {
            Some(("sha256", h)) => ("sha256", h),
            _ => return bad("is not text:sha256:HASH"),
        }
    } else if let Some(rest) = ca.strip_prefix("fixed:") {
        let rest = rest.strip_prefix("r:").or_else(|| rest.strip_prefix("git:")).unwrap_or(rest);
        match rest.split_once(':') {
            Some(ah) => ah,
            None => return bad("is not fixed:[r:]ALGO:HASH"),
        }
    } else {
        return bad("is neither text:… nor fixed:…");
    };
    let len = match algo {
        "md5" => 16,
        "sha1" => 20,
        "sha256" => 32,
        "sha512" => 64,
        _ => return bad("names an unknown hash algorithm"),
    };
    use base64::Engine;
    let ok = if hash.len() == 2 * len {
        hash.bytes().all(|b| b.is_ascii_hexdigit())
    } else if hash.len() == (len * 8 - 1) / 5 + 1 {
        nixbase32::decode(hash.as_bytes(), len).is_ok()
    } else if hash.len() == len.div_ceil(3) * 4 {
        base64::engine::general_purpose::STANDARD.decode(hash).is_ok_and(|b| b.len() == len)
    } else {
        false
    };
    if !ok {
        return bad(&format!("has no valid {algo} digest"));
    }
    Ok(())
}

fn de_sigs<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeSet<String>, D::Error> {
    struct Sigs;
    impl<'de> serde::de::Visitor<'de> for Sigs {
        type Value = BTreeSet<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "a list of at most {MAX_SIGS} signatures")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            use serde::de::Error;
            let mut out = BTreeSet::new();
            while let Some(s) = seq.next_element::<std::borrow::Cow<'de, str>>()? {
                if out.len() == MAX_SIGS {
                    return Err(A::Error::custom(format!("more than {MAX_SIGS} signatures on one path")));
                }
                check_signature_syntax(&s).map_err(|why| A::Error::custom(format!("malformed signature: {why}")))?;
                out.insert(s.into_owned());
            }
            Ok(out)
        }
    }
    d.deserialize_seq(Sigs)
}

fn de_ca<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let ca = Option::<String>::deserialize(d)?;
    if let Some(c) = &ca {
        check_ca(c).map_err(serde::de::Error::custom)?;
    }
    Ok(ca)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_forms() {
        let h32 = Sha256::digest(b"x").to_base32();
        let h16 = Sha256::digest(b"x").to_hex();
        for ok in [format!("text:sha256:{h32}"), format!("fixed:r:sha256:{h32}"), format!("fixed:sha256:{h16}"), format!("fixed:git:sha1:{}", "0".repeat(40)), format!("fixed:md5:{}", "a".repeat(32))] {
            assert_eq!(check_ca(&ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            (format!("fixed:r:sha256:{h32}\nSig: evil:AAAA"), "no valid sha256 digest"),
            (format!("text:sha1:{h32}"), "not text:sha256"),
            ("fixed:r:sha256".to_string(), "not fixed:"),
            (format!("fixed:r:crc32:{h32}"), "unknown hash algorithm"),
            ("bogus".to_string(), "neither"),
            (format!("fixed:r:sha256:{}", "0".repeat(100_000)), "…"),
            (format!("fixed:sha256:{}", "z".repeat(64)), "no valid sha256 digest"),
        ] {
            let e = check_ca(&bad).unwrap_err();
            assert!(e.contains(why) && !e.contains('\n') && e.len() < 300, "{bad:?}: {e}");
        }
    }
}
