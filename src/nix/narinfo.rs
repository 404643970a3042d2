//! `.narinfo` files, rendered exactly as Nix's `NarInfo::to_string` writes them and parsed
//! as strictly as is useful: required fields present, hashes and paths valid, no field twice
//! (except `Sig`).

use std::collections::BTreeSet;
use std::fmt;
use thiserror::Error;

use super::hash::Sha256;
use super::path_info::PathInfo;
use super::store_path::StorePath;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum NarInfoError {
    #[error("line {0}: not 'Key: value'")]
    Syntax(usize),
    #[error("line {0}: field {1} appears twice")]
    Duplicate(usize, String),
    #[error("line {0}: field {1}: {2}")]
    BadValue(usize, String, String),
    #[error("missing field {0}")]
    Missing(&'static str),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfo {
    pub info: PathInfo,
    /// Relative to the cache root, e.g. `nar/<filehash>.nar.zst`.
    pub url: String,
    /// `none`, `zstd`, `xz`, `bzip2`, …
    pub compression: String,
    pub file_hash: Option<Sha256>,
    pub file_size: Option<u64>,
}

impl NarInfo {
    pub fn parse(s: &str) -> Result<Self, NarInfoError> {
        let mut fields: std::collections::HashMap<&str, (usize, &str)> = Default::default();
        let mut sigs = BTreeSet::new();
        for (i, line) in s.lines().enumerate() {
            let n = i + 1;
            if line.is_empty() {
                continue;
            }
            let (k, v) = line.split_once(": ").or_else(|| line.strip_suffix(':').map(|k| (k, ""))).ok_or(NarInfoError::Syntax(n))?;
            if k.is_empty() || k.contains(char::is_whitespace) {
                return Err(NarInfoError::Syntax(n));
            }
            if k == "Sig" {
                sigs.insert(v.to_string());
            } else if fields.insert(k, (n, v)).is_some() {
                return Err(NarInfoError::Duplicate(n, k.to_string()));
            }
        }
        let get = |k: &'static str| fields.get(k).copied();
        let need = |k: &'static str| get(k).ok_or(NarInfoError::Missing(k));
        let bad = |n: usize, k: &str, e: String| NarInfoError::BadValue(n, k.to_string(), e);
        let path = |(n, v): (usize, &str), k: &str| StorePath::parse(v).map_err(|e| bad(n, k, e.to_string()));
        let base = |(n, v): (usize, &str), k: &str| StorePath::from_base_name(v).map_err(|e| bad(n, k, e.to_string()));
        let hash = |(n, v): (usize, &str), k: &str| Sha256::parse(v).map_err(|e| bad(n, k, e.to_string()));
        let num = |(n, v): (usize, &str), k: &str| v.parse::<u64>().map_err(|e| bad(n, k, e.to_string()));

        let store_path = path(need("StorePath")?, "StorePath")?;
        let (un, url) = need("URL")?;
        if url.is_empty() {
            return Err(bad(un, "URL", "empty".into()));
        }
        let references = match get("References") {
            Some((n, v)) => v
                .split(' ')
                .filter(|r| !r.is_empty())
                .map(|r| base((n, r), "References"))
                .collect::<Result<_, _>>()?,
            None => BTreeSet::new(),
        };
        let info = PathInfo {
            path: store_path,
            nar_hash: hash(need("NarHash")?, "NarHash")?,
            nar_size: num(need("NarSize")?, "NarSize")?,
            references,
            deriver: get("Deriver").filter(|d| d.1 != "unknown-deriver").map(|d| base(d, "Deriver")).transpose()?,
            sigs,
            ca: get("CA").map(|c| c.1.to_string()),
        };
        Ok(NarInfo {
            info,
            url: url.to_string(),
            compression: get("Compression").map_or("bzip2", |c| c.1).to_string(),
            file_hash: get("FileHash").map(|f| hash(f, "FileHash")).transpose()?,
            file_size: get("FileSize").map(|f| num(f, "FileSize")).transpose()?,
        })
    }
}

impl fmt::Display for NarInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let info = &self.info;
        writeln!(f, "StorePath: {}", info.path)?;
        writeln!(f, "URL: {}", self.url)?;
        writeln!(f, "Compression: {}", self.compression)?;
        if let Some(h) = &self.file_hash {
            writeln!(f, "FileHash: {h}")?;
        }
        if let Some(s) = self.file_size {
            writeln!(f, "FileSize: {s}")?;
        }
        writeln!(f, "NarHash: {}", info.nar_hash)?;
        writeln!(f, "NarSize: {}", info.nar_size)?;
        let refs: Vec<&str> = info.references.iter().map(|r| r.base_name()).collect();
        writeln!(f, "References: {}", refs.join(" "))?;
        if let Some(d) = &info.deriver {
            writeln!(f, "Deriver: {}", d.base_name())?;
        }
        for s in &info.sigs {
            writeln!(f, "Sig: {s}")?;
        }
        if let Some(ca) = &info.ca {
            writeln!(f, "CA: {ca}")?;
        }
        Ok(())
    }
}

/// A narinfo as Nix writes it, unsigned: the tests' sample.
#[cfg(test)]
pub(crate) const SAMPLE: &str = "StorePath: /nix/store/6il1lpdfxrnnfp077s9yqgr5nl3k3cm6-top
URL: nar/1w1fff338fvdw53sqcamqgqmxgrgjyb3j3bzkqmr0qfkvlsqb05w.nar.zst
Compression: zstd
FileHash: sha256:1w1fff338fvdw53sqcamqgqmxgrgjyb3j3bzkqmr0qfkvlsqb05w
FileSize: 112
NarHash: sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73
NarSize: 160
References: z4asv3j07d89ywjf8fxkn7sg6mf5s9q5-dep
Deriver: 3m5mqv6z9sjq13jva3mpxk9af68fb56x-top.drv
";

#[cfg(test)]
mod tests {
    use super::*;

    /// The sample, signed twice.
    fn sample() -> String {
        format!("{SAMPLE}Sig: a:x\nSig: b:y\n")
    }

    #[test]
    fn round_trips() {
        let ni = NarInfo::parse(&sample()).unwrap();
        assert_eq!(ni.to_string(), sample());
        assert_eq!(ni.info.references.len(), 1);
        let mut empty = ni.clone();
        empty.info.references.clear();
        assert!(empty.to_string().contains("\nReferences: \n"));
        assert_eq!(NarInfo::parse(&empty.to_string()).unwrap(), empty);
    }

    #[test]
    fn refuses_malformed() {
        assert_eq!(NarInfo::parse("garbage"), Err(NarInfoError::Syntax(1)));
        assert_eq!(NarInfo::parse("URL: x\n"), Err(NarInfoError::Missing("StorePath")));
        let dup = sample().replace("NarSize: 160\n", "NarSize: 160\nNarSize: 1\n");
        assert_eq!(NarInfo::parse(&dup), Err(NarInfoError::Duplicate(8, "NarSize".into())));
        let e = NarInfo::parse(&sample().replace("NarSize: 160", "NarSize: -1")).unwrap_err();
        assert!(matches!(e, NarInfoError::BadValue(7, ref k, _) if k == "NarSize"), "{e}");
        let e = NarInfo::parse(&sample().replace("-dep", "-d/p")).unwrap_err();
        assert!(matches!(e, NarInfoError::BadValue(8, ref k, _) if k == "References"), "{e}");
    }
}
