//! Nix's binary-cache keys and signatures.
//!
//! Key files hold `NAME:BASE64`, as `nix-store --generate-binary-cache-key` writes them:
//! 64 bytes (seed then public key) for a secret key, 32 bytes for a public key.
//! A signature is `NAME:BASE64(ed25519(fingerprint))`, the fingerprint being
//! `1;<store path>;<NarHash>;<NarSize>;<comma-separated full reference paths>`.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ed25519_dalek::{Signer, Verifier};
use std::path::Path;
use thiserror::Error;

use super::hash::Sha256;
use super::store_path::StorePath;

#[derive(Debug, Error)]
pub enum KeyError {
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("key {0:?} is not NAME:BASE64")]
    Syntax(String),
    #[error("key {name:?}: {why}")]
    Bad { name: String, why: String },
}

fn split_key(s: &str) -> Result<(&str, Vec<u8>), KeyError> {
    let s = s.trim();
    let (name, b64) = s.split_once(':').ok_or_else(|| KeyError::Syntax(redact(s)))?;
    if name.is_empty() {
        return Err(KeyError::Syntax(redact(s)));
    }
    let bytes = B64
        .decode(b64)
        .map_err(|e| KeyError::Bad { name: name.to_string(), why: format!("bad base64: {e}") })?;
    Ok((name, bytes))
}

/// Never echo secret material in an error: only the part before the first ':'.
fn redact(s: &str) -> String {
    match s.split_once(':') {
        Some((n, _)) => format!("{n}:…"),
        None if s.len() > 16 => format!("{}…", &s[..s.char_indices().nth(16).map_or(s.len(), |c| c.0)]),
        None => s.to_string(),
    }
}

/// The fingerprint that Nix signs (`ValidPathInfo::fingerprint`).
pub fn fingerprint<'a>(
    path: &StorePath,
    nar_hash: &Sha256,
    nar_size: u64,
    references: impl IntoIterator<Item = &'a StorePath>,
) -> String {
    let mut refs: Vec<String> = references.into_iter().map(|r| r.to_string()).collect();
    refs.sort();
    format!("1;{path};{};{nar_size};{}", nar_hash.to_nix_string(), refs.join(","))
}

/// Admits what `fingerprint` describes (`what`, for messages) on its signatures `sigs`: every
/// one named like one of `keys` must verify with it (the first forged one ends the check),
/// and at least one must. Signatures by other keys are kept but prove nothing.
pub fn check_sigs<'a>(fingerprint: &str, sigs: impl IntoIterator<Item = &'a String>, keys: &[PublicKey], what: &dyn std::fmt::Display) -> Result<(), String> {
    let mut verified = false;
    for s in sigs {
        let name = s.split_once(':').map_or(s.as_str(), |n| n.0);
        let mut named = keys.iter().filter(|k| k.name == name).peekable();
        if named.peek().is_none() {
            continue;
        }
        if !named.any(|k| k.verify(fingerprint, s)) {
            return Err(format!("signature {s:?} on {what} does not verify with the configured key of that name"));
        }
        verified = true;
    }
    if verified {
        return Ok(());
    }
    let names: Vec<&str> = keys.iter().map(|k| k.name.as_str()).collect();
    Err(format!("{what} carries no signature by a trusted key ({})", names.join(", ")))
}

/// Checks that `sig` has the form of a signature: `NAME:BASE64` of 64 bytes, with a
/// name of printable ASCII (a control character or a space would split or break the
/// narinfo's `Sig:` line). Says what is wrong, without the signature itself.
pub fn check_signature_syntax(sig: &str) -> Result<(), String> {
    let (name, b64) = sig.split_once(':').ok_or("it is not NAME:BASE64")?;
    if name.is_empty() {
        return Err("its key name is empty".into());
    }
    if let Some(c) = name.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(format!("its key name contains {c:?}"));
    }
    // 64 bytes are 88 base64 characters; checking the length first bounds the work.
    match b64.len() {
        88 => match B64.decode(b64) {
            Ok(b) if b.len() == 64 => Ok(()),
            Ok(b) => Err(format!("it decodes to {} bytes, not 64", b.len())),
            Err(e) => Err(format!("bad base64: {e}")),
        },
        n => Err(format!("its base64 part is {n} characters, not 88 (64 bytes)")),
    }
}

pub struct SecretKey {
    pub name: String,
    key: ed25519_dalek::SigningKey,
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretKey({}:…)", self.name)
    }
}

impl SecretKey {
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let (name, bytes) = split_key(s)?;
        let bad = |why: &str| KeyError::Bad { name: name.to_string(), why: why.to_string() };
        let arr: [u8; 64] = bytes
            .try_into()
            .map_err(|v: Vec<u8>| bad(&format!("secret key is {} bytes, expected 64", v.len())))?;
        let key = ed25519_dalek::SigningKey::from_keypair_bytes(&arr)
            .map_err(|_| bad("public half does not match the secret half"))?;
        Ok(SecretKey { name: name.to_string(), key })
    }

    pub fn read(path: &Path) -> Result<Self, KeyError> {
        let s = std::fs::read_to_string(path).map_err(|e| KeyError::Io(path.display().to_string(), e))?;
        Self::parse(&s)
    }

    /// A new key from 32 random bytes of the kernel.
    pub fn generate(name: &str) -> Result<Self, KeyError> {
        if name.is_empty() || name.contains(':') {
            return Err(KeyError::Syntax(name.to_string()));
        }
        let mut seed = [0u8; 32];
        let mut f = std::fs::File::open("/dev/urandom").map_err(|e| KeyError::Io("/dev/urandom".into(), e))?;
        std::io::Read::read_exact(&mut f, &mut seed).map_err(|e| KeyError::Io("/dev/urandom".into(), e))?;
        Ok(SecretKey { name: name.to_string(), key: ed25519_dalek::SigningKey::from_bytes(&seed) })
    }

    /// `NAME:BASE64(seed ‖ public)`, the content of a secret key file.
    pub fn to_nix_string(&self) -> String {
        format!("{}:{}", self.name, B64.encode(self.key.to_keypair_bytes()))
    }

    pub fn public(&self) -> PublicKey {
        PublicKey { name: self.name.clone(), key: self.key.verifying_key() }
    }

    /// `NAME:BASE64(signature)` of a message (normally a [`fingerprint`]).
    pub fn sign(&self, msg: &str) -> String {
        format!("{}:{}", self.name, B64.encode(self.key.sign(msg.as_bytes()).to_bytes()))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKey {
    pub name: String,
    key: ed25519_dalek::VerifyingKey,
}

impl PublicKey {
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let (name, bytes) = split_key(s)?;
        let bad = |why: String| KeyError::Bad { name: name.to_string(), why };
        let arr: [u8; 32] =
            bytes.try_into().map_err(|v: Vec<u8>| bad(format!("public key is {} bytes, expected 32", v.len())))?;
        let key = ed25519_dalek::VerifyingKey::from_bytes(&arr).map_err(|e| bad(e.to_string()))?;
        Ok(PublicKey { name: name.to_string(), key })
    }

    pub fn to_nix_string(&self) -> String {
        format!("{}:{}", self.name, B64.encode(self.key.as_bytes()))
    }

    /// True if `sig` (`NAME:BASE64`) is this key's signature of `msg`.
    pub fn verify(&self, msg: &str, sig: &str) -> bool {
        let Some((name, b64)) = sig.split_once(':') else { return false };
        if name != self.name {
            return false;
        }
        let Ok(bytes) = B64.decode(b64) else { return false };
        let Ok(sig) = ed25519_dalek::Signature::from_slice(&bytes) else { return false };
        self.key.verify(msg.as_bytes(), &sig).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_round_trip_and_key_format() {
        let sk = SecretKey::generate("test-1").unwrap();
        let again = SecretKey::parse(&sk.to_nix_string()).unwrap();
        let pk = PublicKey::parse(&sk.public().to_nix_string()).unwrap();
        let p = StorePath::parse("/nix/store/z4asv3j07d89ywjf8fxkn7sg6mf5s9q5-dep").unwrap();
        let fp = fingerprint(&p, &Sha256::digest(b"x"), 120, [&p]);
        assert!(fp.starts_with("1;/nix/store/z4asv3j07d89ywjf8fxkn7sg6mf5s9q5-dep;sha256:"));
        assert!(fp.ends_with(";120;/nix/store/z4asv3j07d89ywjf8fxkn7sg6mf5s9q5-dep"));
        let sig = again.sign(&fp);
        assert!(sig.starts_with("test-1:"));
        assert!(pk.verify(&fp, &sig));
        assert!(!pk.verify(&fp.replace("120", "121"), &sig));
        assert!(!pk.verify(&fp, &sig.replace("test-1:", "other:")));
        let other = SecretKey::generate("test-1").unwrap();
        assert!(!pk.verify(&fp, &other.sign(&fp)));
    }

    #[test]
    fn bad_keys_are_refused_without_echoing_secrets() {
        assert!(matches!(SecretKey::parse("nocolon"), Err(KeyError::Syntax(_))));
        let e = SecretKey::parse("k:AAAA").unwrap_err().to_string();
        assert!(e.contains("3 bytes, expected 64"), "{e}");
        let e = SecretKey::parse("k:***secret***").unwrap_err().to_string();
        assert!(!e.contains("secret***"), "{e}");
        assert!(PublicKey::parse("k:").is_err());
    }

    #[test]
    fn signature_syntax() {
        let sig = SecretKey::generate("k-1").unwrap().sign("x");
        assert_eq!(check_signature_syntax(&sig), Ok(()));
        let b64 = sig.split_once(':').unwrap().1;
        for (bad, why) in [
            ("nocolon".to_string(), "NAME:BASE64"),
            (format!(":{b64}"), "empty"),
            (format!("k\n1:{b64}"), "'\\n'"),
            (format!("k 1:{b64}"), "' '"),
            (format!("k:{b64}\n"), "89 characters"),
            ("k:AAAA".to_string(), "4 characters"),
            (format!("k:{}", "*".repeat(88)), "bad base64"),
        ] {
            let e = check_signature_syntax(&bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }
}
