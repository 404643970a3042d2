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
//! fingerprint, `Realisation::fingerprint`) is the same JSON without `signatures`. Nix 2.34
//! writes the same (with `dependentRealisations` always `{}`).
//!
//! Nix 2.35 moved them ("build traces", [`BuildTrace`]): keyed by the derivation's store path
//! and output name instead of its hash modulo, at `build-trace-v2/<drv>/<output>.doi`, with
//! structured signatures over a new fingerprint. Neither Nix reads the other's layout, so
//! narq writes both: a realisation that narq can key as 2.35 does carries that key and its
//! own signatures ([`Traced`]), and is uploaded to both places.
//!
//! # Which derivation keys a build trace
//! 2.35 records build traces of *resolved* derivations only: a derivation with input
//! derivations is first resolved (their outputs become input sources, placeholders become
//! paths), and the resolved one is built and recorded. A client resolves the same way before
//! it asks (Nix's `derivation-goal.cc`, `derivation-resolution-goal.cc`). Nix 2.8 and 2.34
//! resolve to the same store path (tested: both print it) and register it as the deriver of
//! the output. So narq keys an output by its deriver when that `.drv` has no input
//! derivations and the output is floating content-addressed ([`traced_by`]); every other
//! output's path is known from its derivation, and 2.35 never asks a cache for its trace.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

use super::drv::Drv;
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
    /// The same output as Nix 2.35 keys it, when the hook could tell ([`traced_by`]). Hooks
    /// older than build traces send none, and daemons older than them refuse the field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_trace: Option<Traced>,
}

/// A realisation as Nix 2.35 keys it (see [`BuildTrace`]): the resolved derivation whose
/// output it is, and signatures over the build trace's fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Traced {
    pub drv_path: StorePath,
    /// `NAME:BASE64` signatures of [`BuildTrace::fingerprint`].
    #[serde(default)]
    pub signatures: BTreeSet<String>,
}

/// The name of the path a content-addressed derivation named `drv_name` gives its output
/// `output` (Nix's `outputPathName`).
pub fn output_path_name(drv_name: &str, output: &str) -> String {
    if output == "out" {
        drv_name.to_string()
    } else {
        format!("{drv_name}-{output}")
    }
}

/// Whether Nix 2.35 keys the realisation `output` → `out_path` by `drv_path` (whose `.drv`
/// is `drv`), given that Nix registered `drv_path` as `out_path`'s deriver: `drv` is
/// resolved (it has no input derivations), `output` is one of its floating content-addressed
/// outputs, and `out_path` bears that output's name. See the module doc.
pub fn traced_by(drv_path: &StorePath, drv: &Drv, output: &str, out_path: &StorePath) -> bool {
    let Some(drv_name) = drv_path.name().strip_suffix(".drv") else { return false };
    drv.input_drvs.is_empty()
        && drv.outputs.iter().any(|o| o.name == output && o.is_floating())
        && out_path.name() == output_path_name(drv_name, output)
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
        Ok(Realisation { out_path: sp(&d.out_path)?, signatures: d.signatures, dependent_realisations, id: d.id, build_trace: None })
    }

    /// The key under which a binary cache keeps it.
    pub fn key(&self) -> String {
        format!("realisations/{}.doi", self.id)
    }

    /// The output's name: what follows `!` in the id (the whole id if it has none, which
    /// [`check_id`] refuses).
    pub fn output(&self) -> &str {
        self.id.split_once('!').map_or(self.id.as_str(), |(_, o)| o)
    }

    /// The build trace Nix 2.35 reads for this output, if it carries its key.
    pub fn build_trace(&self) -> Option<BuildTrace> {
        self.build_trace.as_ref().map(|t| BuildTrace {
            drv_path: t.drv_path.clone(),
            output: self.output().to_string(),
            out_path: self.out_path.clone(),
            signatures: t.signatures.clone(),
        })
    }

    /// Signs it, and its build trace if it carries one.
    pub fn sign(&mut self, key: &SecretKey) {
        self.signatures.insert(key.sign(&self.fingerprint()));
        let trace_sig = self.build_trace().map(|t| key.sign(&t.fingerprint()));
        if let (Some(t), Some(sig)) = (&mut self.build_trace, trace_sig) {
            t.signatures.insert(sig);
        }
    }

    /// Checks the form of what a request hands in: the ids, the signatures' syntax, and that
    /// a build trace's key could be one ([`traced_by`] without the `.drv`).
    pub fn check_syntax(&self) -> Result<(), String> {
        check_id(&self.id)?;
        self.dependent_realisations.keys().try_for_each(|d| check_id(d))?;
        let trace_sigs = self.build_trace.as_ref().map_or(0, |t| t.signatures.len());
        if self.signatures.len().max(trace_sigs) > MAX_SIGS || self.dependent_realisations.len() > MAX_DEPENDENT {
            return Err(format!("realisation {}: too many signatures or dependent realisations", self.id));
        }
        let trace = self.build_trace.iter().flat_map(|t| &t.signatures);
        for s in self.signatures.iter().chain(trace) {
            check_signature_syntax(s).map_err(|e| format!("realisation {}: a signature is malformed: {e}", self.id))?;
        }
        if let Some(t) = &self.build_trace {
            let drv_name = t.drv_path.name().strip_suffix(".drv");
            if drv_name.is_none_or(|n| self.out_path.name() != output_path_name(n, self.output())) {
                return Err(format!(
                    "realisation {}: its out path {} cannot be output {:?} of {} (its build trace)",
                    self.id,
                    self.out_path,
                    self.output(),
                    t.drv_path
                ));
            }
        }
        Ok(())
    }

    /// Admits it on its signatures, as [`PathInfo::check_sigs`](super::PathInfo::check_sigs)
    /// admits a path; a build trace it carries must be signed by a trusted key too.
    pub fn check_sigs(&self, keys: &[PublicKey]) -> Result<(), String> {
        super::signing::check_sigs(&self.fingerprint(), &self.signatures, keys, &format!("realisation {}", self.id))?;
        match self.build_trace() {
            Some(t) => t.check_sigs(keys),
            None => Ok(()),
        }
    }
}

/// A realisation as Nix 2.35 keeps it in a binary cache: which store path output `output` of
/// the (resolved) derivation `drv_path` produced. From Nix's `realisation.cc` and its test
/// data (`src/libstore-tests/data/realisation/`):
///
/// ```text
/// build-trace-v2/<drv base name>/<output>.doi: {"outPath":"<hash>-<name>","signatures":[{"keyName":NAME,"sig":BASE64},...]}
/// fingerprint: {"key":{"drvPath":"<drv base name>","outputName":OUTPUT},"value":{"outPath":"<hash>-<name>"}}
/// ```
/// (nlohmann's `dump()`: keys sorted, no whitespace). 2.35 reads signatures in either form,
/// structured or `NAME:BASE64`, and writes them structured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildTrace {
    pub drv_path: StorePath,
    pub output: String,
    pub out_path: StorePath,
    /// `NAME:BASE64` signatures of [`BuildTrace::fingerprint`].
    pub signatures: BTreeSet<String>,
}

/// Where Nix 2.35 keeps build traces in a binary cache.
pub const BUILD_TRACE_PREFIX: &str = "build-trace-v2/";

impl BuildTrace {
    /// The key under which a binary cache keeps it.
    pub fn key(&self) -> String {
        format!("{BUILD_TRACE_PREFIX}{}/{}.doi", self.drv_path.base_name(), self.output)
    }

    /// What a signature signs.
    pub fn fingerprint(&self) -> String {
        serde_json::json!({
            "key": { "drvPath": self.drv_path.base_name(), "outputName": self.output },
            "value": { "outPath": self.out_path.base_name() },
        })
        .to_string()
    }

    /// The object, as Nix 2.35 writes it: signatures in the order of its `std::set<Signature>`,
    /// by key name, then by the signature's bytes (not its base64).
    pub fn to_json(&self) -> String {
        use base64::Engine;
        let mut sigs: Vec<(&str, Vec<u8>, &str)> = self
            .signatures
            .iter()
            .filter_map(|s| s.split_once(':'))
            .map(|(name, b64)| (name, base64::engine::general_purpose::STANDARD.decode(b64).unwrap_or_default(), b64))
            .collect();
        sigs.sort();
        let sigs: Vec<serde_json::Value> = sigs.into_iter().map(|(name, _, sig)| serde_json::json!({ "keyName": name, "sig": sig })).collect();
        serde_json::json!({ "outPath": self.out_path.base_name(), "signatures": sigs }).to_string()
    }

    /// Parses the object at [`BuildTrace::key`] of `drv_path`'s `output`.
    pub fn parse_nix(drv_path: StorePath, output: &str, text: &str) -> Result<BuildTrace, String> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Sig {
            Structured {
                #[serde(rename = "keyName")]
                key_name: String,
                sig: String,
            },
            Plain(String),
        }
        #[derive(Deserialize)]
        struct Doi {
            #[serde(rename = "outPath")]
            out_path: String,
            #[serde(default)]
            signatures: Vec<Sig>,
        }
        let d: Doi = serde_json::from_str(text).map_err(|e| format!("build trace: {e}"))?;
        let signatures = d
            .signatures
            .into_iter()
            .map(|s| match s {
                Sig::Structured { key_name, sig } => format!("{key_name}:{sig}"),
                Sig::Plain(s) => s,
            })
            .collect();
        let out_path = StorePath::from_base_name(&d.out_path).map_err(|e| format!("build trace {drv_path}^{output}: {e}"))?;
        Ok(BuildTrace { drv_path, output: output.to_string(), out_path, signatures })
    }

    pub fn sign(&mut self, key: &SecretKey) {
        self.signatures.insert(key.sign(&self.fingerprint()));
    }

    pub fn check_sigs(&self, keys: &[PublicKey]) -> Result<(), String> {
        super::signing::check_sigs(&self.fingerprint(), &self.signatures, keys, &format!("build trace {}^{}", self.drv_path, self.output))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nix 2.35's test data: `src/libstore-tests/data/realisation/` and the key in
    /// `src/libstore-tests/realisation.cc`.
    #[test]
    fn build_traces_are_what_nix_2_35_writes_and_signs() {
        let key = SecretKey::parse("test-key:tU7tTvLcScf8pmz/eTV0BEtLmRsPpZfKaRcd0nCN+pysBZPHSeg61/u2oc7mIOewfuAY1V1BiX32homTaDJ2Jw==").unwrap();
        let drv = StorePath::from_base_name("g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-bar.drv").unwrap();
        let mut t = BuildTrace {
            drv_path: drv.clone(),
            output: "foo".into(),
            out_path: StorePath::from_base_name("g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo").unwrap(),
            signatures: BTreeSet::new(),
        };
        // simple-fingerprint.txt
        assert_eq!(t.fingerprint(), r#"{"key":{"drvPath":"g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-bar.drv","outputName":"foo"},"value":{"outPath":"g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo"}}"#);
        assert_eq!(t.key(), "build-trace-v2/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-bar.drv/foo.doi");
        // unkeyed-simple.json, compacted
        assert_eq!(t.to_json(), r#"{"outPath":"g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo","signatures":[]}"#);
        // simple-sig.json: ed25519 is deterministic, so narq's signature is Nix's.
        t.sign(&key);
        assert_eq!(t.signatures.iter().next().unwrap(), "test-key:WsjxK4/EI74COtzMDI+VCjQU9O4FydK0+YeY1CE5hUevogd+T+CPvNXza7oog3GTMS+ZlBwsC2S3ppwusKnJDg==");
        t.check_sigs(&[key.public()]).unwrap();
        assert_eq!(
            t.to_json(),
            r#"{"outPath":"g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo","signatures":[{"keyName":"test-key","sig":"WsjxK4/EI74COtzMDI+VCjQU9O4FydK0+YeY1CE5hUevogd+T+CPvNXza7oog3GTMS+ZlBwsC2S3ppwusKnJDg=="}]}"#
        );
        assert_eq!(BuildTrace::parse_nix(drv.clone(), "foo", &t.to_json()).unwrap(), t);
        // with-signature-unstructured.json's value: the old string form reads too.
        let plain = r#"{"outPath":"g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo.drv","signatures":["asdf:AAAA"]}"#;
        assert_eq!(BuildTrace::parse_nix(drv, "foo", plain).unwrap().signatures.into_iter().collect::<Vec<_>>(), ["asdf:AAAA"]);
        // A moved out path no longer verifies.
        t.out_path = StorePath::from_base_name("g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-bar").unwrap();
        assert!(t.check_sigs(&[key.public()]).is_err());
        // with-signature-fingerprint.txt, with-signature-sig.json, unkeyed-with-signature.json.
        let mut w = BuildTrace { out_path: StorePath::from_base_name("g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo.drv").unwrap(), signatures: BTreeSet::new(), ..t };
        assert_eq!(w.fingerprint(), r#"{"key":{"drvPath":"g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-bar.drv","outputName":"foo"},"value":{"outPath":"g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo.drv"}}"#);
        w.sign(&key);
        assert_eq!(w.signatures.iter().next().unwrap(), "test-key:ZE30UrOh26/EYvUaczjJtz6c4WcRYke6IEhDNN5TiFRF6Uu+H8lHofponlhfZxDDrCUlfstS/vtv3Xm2F6M/AA==");
        w.signatures = [format!("asdf:{}", "A".repeat(86) + "==")].into();
        assert_eq!(w.to_json(), format!(r#"{{"outPath":"g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo.drv","signatures":[{{"keyName":"asdf","sig":"{}=="}}]}}"#, "A".repeat(86)));
    }

    const ID: &str = "sha256:6b537076607a71f2baaca4a3828abfadf9f09b0739d51ad712582e6d4a9b23b6!out";

    fn r() -> Realisation {
        Realisation {
            id: ID.into(),
            out_path: StorePath::parse("/nix/store/0w1m0c4d7h5hhkylyqza1im3y5icykxx-cax").unwrap(),
            signatures: BTreeSet::new(),
            dependent_realisations: BTreeMap::new(),
            build_trace: None,
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

    const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/corpus/drv");

    fn corpus(name: &str) -> Drv {
        super::super::drv::parse(&std::fs::read(format!("{CORPUS}/{name}")).unwrap()).unwrap()
    }

    /// Resolved and unresolved `.drv`s as Nix wrote them (see tests/corpus/README.md).
    #[test]
    fn build_traces_are_keyed_by_resolved_derivations_of_floating_outputs() {
        let resolved = StorePath::from_base_name("sbhvll0znjq6mx6mwkm1ayh85yg7yynm-ca-top-1796535235820158274.drv").unwrap();
        let original = StorePath::from_base_name("pfw1r671k5vj151209fdi2ig4pdfp8m6-ca-top-1796535235820158274.drv").unwrap();
        let out = StorePath::from_base_name("8n80swfa7gnpnkwlr2wy637nn92z1jv4-ca-top-1796535235820158274").unwrap();
        assert!(traced_by(&resolved, &corpus("ca-top-resolved.drv"), "out", &out));
        // Not the derivation that still has input derivations: 2.35 keys its resolved form.
        assert!(!traced_by(&original, &corpus("ca-top.drv"), "out", &out));
        // Not an output it does not have, nor a path of another name.
        assert!(!traced_by(&resolved, &corpus("ca-top-resolved.drv"), "dev", &out));
        let other = StorePath::from_base_name("8n80swfa7gnpnkwlr2wy637nn92z1jv4-ca-top-1796535235820158274-dev").unwrap();
        assert!(!traced_by(&resolved, &corpus("ca-top-resolved.drv"), "out", &other));
        // Not an input-addressed output, whose path its derivation says.
        let dep = StorePath::from_base_name("z4asv3j07d89ywjf8fxkn7sg6mf5s9q5-dep.drv").unwrap();
        let dep_out = StorePath::from_base_name("z4asv3j07d89ywjf8fxkn7sg6mf5s9q5-dep").unwrap();
        assert!(!traced_by(&dep, &corpus("dep.drv"), "out", &dep_out));
        assert_eq!(output_path_name("x", "out"), "x");
        assert_eq!(output_path_name("x", "dev"), "x-dev");
    }

    fn traced() -> Realisation {
        let drv_path = StorePath::from_base_name("sbhvll0znjq6mx6mwkm1ayh85yg7yynm-ca-top-1796535235820158274.drv").unwrap();
        Realisation {
            out_path: StorePath::from_base_name("8n80swfa7gnpnkwlr2wy637nn92z1jv4-ca-top-1796535235820158274").unwrap(),
            build_trace: Some(Traced { drv_path, signatures: BTreeSet::new() }),
            ..r()
        }
    }

    #[test]
    fn a_realisation_with_its_build_trace_is_signed_and_checked_in_both_layouts() {
        let k = SecretKey::generate("narq-real-1").unwrap();
        let mut a = traced();
        a.sign(&k);
        a.check_syntax().unwrap();
        a.check_sigs(&[k.public()]).unwrap();
        // The old layout is what it was; the build trace is signed over its own fingerprint.
        assert_eq!(a.to_json(), Realisation { build_trace: None, ..a.clone() }.to_json());
        let t = a.build_trace().unwrap();
        assert_eq!(t.key(), "build-trace-v2/sbhvll0znjq6mx6mwkm1ayh85yg7yynm-ca-top-1796535235820158274.drv/out.doi");
        let sig = t.signatures.iter().next().unwrap();
        assert!(k.public().verify(&t.fingerprint(), sig));
        assert_ne!(a.signatures.iter().next().unwrap(), sig);
        // Over the wire and in the queue it round-trips; what an older hook sent still reads.
        let wire = serde_json::to_string(&a).unwrap();
        assert!(wire.contains(r#""buildTrace":{"drvPath":"/nix/store/sbhvll0znjq6mx6mwkm1ayh85yg7yynm-ca-top-1796535235820158274.drv","signatures":["narq-real-1:"#), "{wire}");
        assert_eq!(serde_json::from_str::<Realisation>(&wire).unwrap(), a);
        let old = r#"{"id":"sha256:6b537076607a71f2baaca4a3828abfadf9f09b0739d51ad712582e6d4a9b23b6!out","outPath":"/nix/store/0w1m0c4d7h5hhkylyqza1im3y5icykxx-cax","signatures":[],"dependentRealisations":{}}"#;
        assert_eq!(serde_json::from_str::<Realisation>(old).unwrap(), r());

        // A build trace that no trusted key signed, or signed over something else, is refused.
        let mut unsigned = a.clone();
        unsigned.build_trace.as_mut().unwrap().signatures.clear();
        assert!(unsigned.check_sigs(&[k.public()]).unwrap_err().contains("build trace"));
        let mut moved = a.clone();
        moved.build_trace.as_mut().unwrap().drv_path = StorePath::from_base_name("pfw1r671k5vj151209fdi2ig4pdfp8m6-ca-top-1796535235820158274.drv").unwrap();
        assert!(moved.check_sigs(&[k.public()]).unwrap_err().contains("does not verify"));
        // A key that cannot be this output's is refused before any signature is checked.
        let mut wrong = traced();
        wrong.build_trace.as_mut().unwrap().drv_path = StorePath::from_base_name("sbhvll0znjq6mx6mwkm1ayh85yg7yynm-other.drv").unwrap();
        assert!(wrong.check_syntax().unwrap_err().contains("cannot be output"));
        let mut bad = a.clone();
        bad.build_trace.as_mut().unwrap().signatures.insert("narq-real-1:nope".into());
        assert!(bad.check_syntax().unwrap_err().contains("malformed"));
    }

    /// Nix 2.35 keeps signatures in a `std::set<Signature>`: by key name, then by the
    /// signature's bytes, which is not the order of `NAME:BASE64` strings.
    #[test]
    fn build_trace_signatures_are_in_nix_s_order() {
        use base64::Engine;
        let b64 = |b: u8| base64::engine::general_purpose::STANDARD.encode([b; 64]);
        let (high, low) = (format!("k:{}", b64(0xf8)), format!("k:{}", b64(0x00)));
        assert!(high < low, "'+' sorts before 'A' in base64 text");
        let mut t = traced().build_trace().unwrap();
        t.signatures = [high.clone(), low.clone(), format!("k-2:{}", b64(1))].into();
        let json: serde_json::Value = serde_json::from_str(&t.to_json()).unwrap();
        let order: Vec<String> = json["signatures"].as_array().unwrap().iter().map(|s| format!("{}:{}", s["keyName"].as_str().unwrap(), s["sig"].as_str().unwrap())).collect();
        assert_eq!(order, [low, high, format!("k-2:{}", b64(1))]);
    }

    #[test]
    fn bad_ids_are_refused() {
        for id in ["out", "sha256:abc!out", &ID.replace('!', "?"), &ID.replace("!out", "!"), &ID.replace("!out", "!o/t"), &ID.to_uppercase()] {
            assert!(check_id(id).is_err(), "{id}");
        }
        check_id(ID).unwrap();
    }
}
