//! Realisations: which store path an output of a content-addressed derivation turned out to
//! be. A binary cache keeps each as `realisations/<id>.doi`, which a client with
//! `ca-derivations` reads to substitute the build instead of running it.
//!
//! The object is JSON as Nix 2.8 writes it (`Realisation::toJSON` through nlohmann's
//! `dump()`): keys sorted, no whitespace, the out path as a base name:
//!
//! ```text
//! {"dependentRealisations":{ID:OUTPATH,...},"id":"sha256:<base16>!<output>","outPath":"<hash>-<name>","signatures":[SIG,...]}
//! ```
//! where the id's hash is the derivation's "hash modulo" (`DrvOutput`). What is signed (the
//! fingerprint, `Realisation::fingerprint`) is the same JSON without `signatures`.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

use super::signing::{check_signature_syntax, PublicKey, SecretKey};
use super::store_path::StorePath;

/// The most signatures a realisation may carry (as for paths, see
/// [`MAX_SIGS`](super::path_info::MAX_SIGS)).
pub const MAX_SIGS: usize = super::path_info::MAX_SIGS;
/// The most dependent realisations one may list: a derivation's CA inputs, a handful.
pub const MAX_DEPENDENT: usize = 1024;

/// One output of one derivation, realised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Realisation {
    /// `sha256:<base16 hash modulo of the derivation>!<output name>`.
    pub id: String,
    pub out_path: StorePath,
    /// `NAME:BASE64` signatures of [`Realisation::fingerprint`], sorted.
    #[serde(default)]
    pub signatures: BTreeSet<String>,
    /// The realisations of the derivation's content-addressed inputs: id → out path.
    #[serde(default)]
    pub dependent_realisations: BTreeMap<String, StorePath>,
}

/// Checks a `DrvOutput` id: `sha256:` 64 lowercase hex digits `!` an output name.
pub fn check_id(id: &str) -> Result<(), String> {
    let shown: String = id.chars().take(120).collect();
    let (hash, output) = id.split_once('!').ok_or_else(|| format!("realisation id {shown:?} is not HASH!OUTPUT"))?;
    let hex = hash.strip_prefix("sha256:").unwrap_or("");
    if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(format!("realisation id {shown:?}: the hash is not sha256:<64 hex digits>"));
    }
    // Output names are derivation attribute names: the characters of store path names.
    let name_ok = |b: u8| b.is_ascii_alphanumeric() || b"+-._?=".contains(&b);
    if output.is_empty() || output.len() > 211 || !output.bytes().all(name_ok) {
        return Err(format!("realisation id {shown:?}: bad output name"));
    }
    Ok(())
}

impl Realisation {
    /// The object, as Nix writes it to `realisations/<id>.doi`.
    pub fn to_json(&self) -> String {
        self.json(true)
    }

    /// What a signature signs: the JSON without `signatures`.
    pub fn fingerprint(&self) -> String {
        self.json(false)
    }

    /// serde_json (no `preserve_order`) sorts object keys as nlohmann's `std::map` does, and
    /// escapes strings the same way; ids, store paths and signatures have nothing to escape.
    fn json(&self, signatures: bool) -> String {
        let deps: serde_json::Map<String, serde_json::Value> =
            self.dependent_realisations.iter().map(|(k, v)| (k.clone(), v.base_name().into())).collect();
        let mut o = serde_json::Map::new();
        o.insert("dependentRealisations".into(), deps.into());
        o.insert("id".into(), self.id.clone().into());
        o.insert("outPath".into(), self.out_path.base_name().into());
        if signatures {
            o.insert("signatures".into(), self.signatures.iter().cloned().collect::<Vec<_>>().into());
        }
        serde_json::Value::Object(o).to_string()
    }

    /// Parses a `.doi` object as Nix writes it (out paths as base names).
    pub fn parse_nix(text: &str) -> Result<Realisation, String> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Doi {
            id: String,
            out_path: String,
            #[serde(default)]
            signatures: BTreeSet<String>,
            #[serde(default)]
            dependent_realisations: BTreeMap<String, String>,
        }
        let d: Doi = serde_json::from_str(text).map_err(|e| format!("realisation: {e}"))?;
        let sp = |s: &str| StorePath::from_base_name(s).map_err(|e| format!("realisation {}: {e}", d.id));
        let dependent_realisations = d.dependent_realisations.iter().map(|(k, v)| Ok((k.clone(), sp(v)?))).collect::<Result<_, String>>()?;
        Ok(Realisation { out_path: sp(&d.out_path)?, signatures: d.signatures, dependent_realisations, id: d.id })
    }

    /// The key under which a binary cache keeps it.
    pub fn key(&self) -> String {
        format!("realisations/{}.doi", self.id)
    }

    pub fn sign(&mut self, key: &SecretKey) {
        self.signatures.insert(key.sign(&self.fingerprint()));
    }

    /// Checks the form of what a request hands in: the ids, and the signatures' syntax.
    pub fn check_syntax(&self) -> Result<(), String> {
        check_id(&self.id)?;
        self.dependent_realisations.keys().try_for_each(|d| check_id(d))?;
        if self.signatures.len() > MAX_SIGS || self.dependent_realisations.len() > MAX_DEPENDENT {
            return Err(format!("realisation {}: too many signatures or dependent realisations", self.id));
        }
        for s in &self.signatures {
            check_signature_syntax(s).map_err(|e| format!("realisation {}: a signature is malformed: {e}", self.id))?;
        }
        Ok(())
    }

    /// Admits it on its signatures, as [`PathInfo::check_sigs`](super::PathInfo::check_sigs)
    /// admits a path.
    pub fn check_sigs(&self, keys: &[PublicKey]) -> Result<(), String> {
        super::signing::check_sigs(&self.fingerprint(), &self.signatures, keys, &format!("realisation {}", self.id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "sha256:6b537076607a71f2baaca4a3828abfadf9f09b0739d51ad712582e6d4a9b23b6!out";

    fn r() -> Realisation {
        Realisation {
            id: ID.into(),
            out_path: StorePath::parse("/nix/store/0w1m0c4d7h5hhkylyqza1im3y5icykxx-cax").unwrap(),
            signatures: BTreeSet::new(),
            dependent_realisations: BTreeMap::new(),
        }
    }

    #[test]
    fn json_is_what_nix_copy_writes() {
        // Written by `nix copy --to file://… -f ca.nix` (Nix 2.8).
        let nix = r#"{"dependentRealisations":{},"id":"sha256:6b537076607a71f2baaca4a3828abfadf9f09b0739d51ad712582e6d4a9b23b6!out","outPath":"0w1m0c4d7h5hhkylyqza1im3y5icykxx-cax","signatures":[]}"#;
        assert_eq!(r().to_json(), nix);
        assert_eq!(Realisation::parse_nix(nix).unwrap(), r());
        assert_eq!(r().fingerprint(), nix.replace(r#","signatures":[]"#, ""));
        assert_eq!(r().key(), format!("realisations/{ID}.doi"));
    }

    #[test]
    fn signatures_verify_and_forgeries_do_not() {
        let k = SecretKey::generate("narq-real-1").unwrap();
        let mut a = r();
        a.sign(&k);
        a.check_syntax().unwrap();
        a.check_sigs(&[k.public()]).unwrap();
        assert!(a.to_json().contains(r#""signatures":["narq-real-1:"#));
        let mut moved = a.clone();
        moved.out_path = StorePath::parse("/nix/store/1w1m0c4d7h5hhkylyqza1im3y5icykxx-cax").unwrap();
        assert!(moved.check_sigs(&[k.public()]).unwrap_err().contains("does not verify"));
        assert!(r().check_sigs(&[k.public()]).unwrap_err().contains("no signature by a trusted key"));
    }

    #[test]
    fn bad_ids_are_refused() {
        for id in ["out", "sha256:abc!out", &ID.replace('!', "?"), &ID.replace("!out", "!"), &ID.replace("!out", "!o/t"), &ID.to_uppercase()] {
            assert!(check_id(id).is_err(), "{id}");
        }
        check_id(ID).unwrap();
    }
}
