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

    /// `paths` in parts of at most `size` (the last may hold more: all the tops), each after
    /// the paths it references: a closure sent in parts this way has every reference of a part
    /// queued before it, and its [`tops`](PathInfo::tops) (its roots) in the last part, whose
    /// own tops they are. A cycle (never in a store; the daemon refuses one) is kept, in the
    /// order given, before the tops.
    pub fn in_parts(paths: Vec<PathInfo>, size: usize) -> Vec<Vec<PathInfo>> {
        use std::collections::HashMap;
        let n = paths.len();
        let mut waits_on = vec![0usize; n];
        let mut referrers: Vec<Vec<usize>> = vec![Vec::new(); n];
        {
            let index: HashMap<&StorePath, usize> = paths.iter().enumerate().map(|(i, p)| (&p.path, i)).collect();
            for (i, p) in paths.iter().enumerate() {
                for j in p.references.iter().filter(|r| **r != p.path).filter_map(|r| index.get(r)) {
                    waits_on[i] += 1;
                    referrers[*j].push(i);
                }
            }
        }
        let is_top = |i: usize| referrers[i].is_empty();
        // Kahn's order over the paths something references; the tops after them.
        let mut order = Vec::with_capacity(n);
        let mut placed = vec![false; n];
        let mut ready: Vec<usize> = (0..n).filter(|&i| waits_on[i] == 0 && !is_top(i)).collect();
        while let Some(i) = ready.pop() {
            order.push(i);
            placed[i] = true;
            for &k in &referrers[i] {
                waits_on[k] -= 1;
                if waits_on[k] == 0 && !is_top(k) {
                    ready.push(k);
                }
            }
        }
        order.extend((0..n).filter(|&i| !placed[i] && !is_top(i)));
        let tops = (0..n).filter(|&i| is_top(i)).count();
        order.extend((0..n).filter(|&i| is_top(i)));
        let mut slots: Vec<Option<PathInfo>> = paths.into_iter().map(Some).collect();
        let mut ordered = order.into_iter().map(|i| slots[i].take().expect("each index once"));
        // The parts before the last hold no top; the last holds every top.
        let mut parts: Vec<Vec<PathInfo>> = Vec::new();
        let mut left = n - tops;
        while left > 0 {
            let k = left.min(size.max(1));
            parts.push(ordered.by_ref().take(k).collect());
            left -= k;
        }
        parts.push(ordered.collect());
        parts.retain(|p| !p.is_empty());
        parts
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

    /// Parts of a closure: every reference in the same part or an earlier one, every path
    /// once, the parts before the last at most `size`, and the last holding the tops.
    #[test]
    fn a_closure_in_parts_has_references_first_and_the_tops_last() {
        let path = |i: usize| StorePath::parse(&format!("/nix/store/{}-p{i}", nixbase32::encode(&Sha256::digest(&i.to_le_bytes()).0[..20]))).unwrap();
        // 60 paths: i references i / 2 and i / 3 (a DAG with shared dependencies), and
        // itself; 60..63 are tops over several of them.
        let info = |i: usize, refs: Vec<usize>| PathInfo {
            path: path(i),
            nar_hash: Sha256::digest(b"x"),
            nar_size: 1,
            references: refs.into_iter().map(path).chain([path(i)]).collect(),
            deriver: None,
            sigs: Default::default(),
            ca: None,
        };
        let mut all: Vec<PathInfo> = (1..60).map(|i| info(i, [i / 2, i / 3].into_iter().filter(|&r| r >= 1 && r != i).collect())).collect();
        all.extend((60..63).map(|i| info(i, vec![59 - (i - 60), 30, 1])));
        all.reverse();
        let tops = PathInfo::tops(&all);
        let parts = PathInfo::in_parts(all.clone(), 7);
        let mut seen: std::collections::HashSet<StorePath> = Default::default();
        for (k, part) in parts.iter().enumerate() {
            let here: std::collections::HashSet<&StorePath> = part.iter().map(|p| &p.path).collect();
            for p in part {
                for r in p.references.iter().filter(|r| **r != p.path) {
                    assert!(seen.contains(r) || here.contains(r), "part {k}: {} before its reference {r}", p.path);
                }
            }
            assert!(k == parts.len() - 1 || part.len() <= 7);
            seen.extend(part.iter().map(|p| p.path.clone()));
        }
        assert_eq!(seen.len(), all.len());
        let mut last = PathInfo::tops(parts.last().unwrap());
        last.sort();
        let mut want = tops.clone();
        want.sort();
        assert_eq!(last, want);
        assert!(parts[..parts.len() - 1].iter().all(|p| p.iter().all(|p| !tops.contains(&p.path))));
    }

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
