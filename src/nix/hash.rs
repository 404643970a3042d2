//! SHA-256 hashes as Nix prints and parses them: `sha256:<nixbase32>` (narinfo, fingerprints),
//! `sha256:<base16>` (the Nix database) and SRI `sha256-<base64>`.

use base64::Engine;
use std::fmt;
use thiserror::Error;

use super::nixbase32;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum HashError {
    #[error("hash {0:?} is not sha256 (expected sha256:<nixbase32|base16> or sha256-<base64>)")]
    UnsupportedType(String),
    #[error("hash {0:?} has a bad digest: {1}")]
    BadDigest(String, String),
}

/// A SHA-256 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256(pub [u8; 32]);

impl Sha256 {
    pub fn digest(data: &[u8]) -> Self {
        use sha2::Digest;
        Sha256(sha2::Sha256::digest(data).into())
    }

    /// `sha256:<nixbase32>`, the form of narinfo files and signature fingerprints.
    pub fn to_nix_string(&self) -> String {
        format!("sha256:{}", nixbase32::encode(&self.0))
    }

    /// The bare nixbase32 digest (file names under `nar/`).
    pub fn to_base32(&self) -> String {
        nixbase32::encode(&self.0)
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses `sha256:<nixbase32>`, `sha256:<base16>` or `sha256-<base64>`.
    pub fn parse(s: &str) -> Result<Self, HashError> {
        let bad = |why: &str| HashError::BadDigest(s.to_string(), why.to_string());
        let bytes = if let Some(d) = s.strip_prefix("sha256:") {
            match d.len() {
                52 => nixbase32::decode(d.as_bytes(), 32).map_err(|e| bad(&e.to_string()))?,
                64 => decode_hex(d).ok_or_else(|| bad("invalid base16"))?,
                n => return Err(bad(&format!("length {n}, expected 52 (nixbase32) or 64 (base16)"))),
            }
        } else if let Some(d) = s.strip_prefix("sha256-") {
            base64::engine::general_purpose::STANDARD
                .decode(d)
                .map_err(|e| bad(&e.to_string()))?
        } else {
            return Err(HashError::UnsupportedType(s.to_string()));
        };
        let arr: [u8; 32] = bytes.try_into().map_err(|_| bad("not 32 bytes"))?;
        Ok(Sha256(arr))
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || !s.is_ascii() {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect()
}

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_nix_string())
    }
}

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256({})", self.to_nix_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_forms_parse_to_the_same_digest() {
        let h = Sha256::digest(b"");
        let b32 = h.to_nix_string();
        assert_eq!(b32, "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73");
        assert_eq!(Sha256::parse(&b32).unwrap(), h);
        assert_eq!(Sha256::parse(&format!("sha256:{}", h.to_hex())).unwrap(), h);
        assert_eq!(Sha256::parse("sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=").unwrap(), h);
    }

    #[test]
    fn rejects_other_types_and_bad_digests() {
        assert!(matches!(Sha256::parse("md5:abc"), Err(HashError::UnsupportedType(_))));
        assert!(matches!(Sha256::parse("sha256:abc"), Err(HashError::BadDigest(..))));
        assert!(matches!(Sha256::parse(&format!("sha256:{}", "g".repeat(64))), Err(HashError::BadDigest(..))));
        assert!(matches!(Sha256::parse("sha256-AAAA"), Err(HashError::BadDigest(..))));
    }
}
