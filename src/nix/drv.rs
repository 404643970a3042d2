//! Reading a derivation (`.drv`, ATerm) for its outputs.
//!
//! ```text
//! Derive([("out","/nix/store/…-x","",""),…],   outputs: name, path, hash algo, hash
//!        [("/nix/store/…-y.drv",["out"]),…],   input derivations
//!        ["/nix/store/…-src",…],               input sources
//!        "x86_64-linux","/bin/sh",["-c","…"],  system, builder, args
//!        [("name","value"),…])                 environment
//! ```
//! The whole term is parsed (so a truncated or corrupt file is an error), but only the
//! outputs and the input derivations are kept. Strings use C escapes `\" \\ \n \r \t`.
//!
//! An output's path is empty when it is content-addressed and not fixed ("floating"), its
//! hash algorithm (`r:sha256`, `text:sha256`…) is set for every content-addressed one, and its
//! hash for fixed outputs only (`impure` for impure derivations).

use thiserror::Error;

use super::store_path::{StorePath, StorePathError};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DrvError {
    #[error("derivation: at byte {0}: expected {1}")]
    Expected(usize, &'static str),
    #[error("derivation: output {0:?}: {1}")]
    BadOutput(String, StorePathError),
    #[error("derivation: trailing bytes at {0}")]
    Trailing(usize),
}

/// An output of a derivation; `path` is `None` for content-addressed outputs whose path is
/// not known before the build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrvOutput {
    pub name: String,
    pub path: Option<StorePath>,
    /// Empty for an input-addressed output.
    pub hash_algo: String,
    /// Set for a fixed output (and `impure` ones).
    pub hash: String,
}

impl DrvOutput {
    /// Content-addressed with a path known only once built (`__contentAddressed`), which
    /// `ca-derivations` records a realisation for.
    pub fn is_floating(&self) -> bool {
        self.path.is_none() && !self.hash_algo.is_empty() && self.hash.is_empty()
    }
}

/// What is kept of a derivation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drv {
    pub outputs: Vec<DrvOutput>,
    /// The derivations whose outputs it takes as inputs: none once Nix has resolved it.
    pub input_drvs: Vec<String>,
}

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
}

impl<'a> Parser<'a> {
    fn expect(&mut self, lit: &'static str) -> Result<(), DrvError> {
        if self.s[self.pos..].starts_with(lit.as_bytes()) {
            self.pos += lit.len();
            Ok(())
        } else {
            Err(DrvError::Expected(self.pos, lit))
        }
    }

    fn peek(&self, c: u8) -> bool {
        self.s.get(self.pos) == Some(&c)
    }

    fn string(&mut self) -> Result<String, DrvError> {
        self.expect("\"")?;
        let mut out = Vec::new();
        loop {
            // Runs without escapes are copied whole: a `.drv` may hold megabytes of strings.
            let rest = &self.s[self.pos..];
            let Some(i) = rest.iter().position(|&b| b == b'"' || b == b'\\') else {
                self.pos = self.s.len();
                return Err(DrvError::Expected(self.pos, "closing '\"'"));
            };
            out.extend_from_slice(&rest[..i]);
            self.pos += i;
            if rest[i] == b'"' {
                break;
            }
            let c = *self.s.get(self.pos + 1).ok_or(DrvError::Expected(self.pos + 1, "escaped character"))?;
            out.push(match c {
                b'n' => b'\n',
                b'r' => b'\r',
                b't' => b'\t',
                c => c,
            });
            self.pos += 2;
        }
        self.pos += 1;
        String::from_utf8(out).map_err(|_| DrvError::Expected(self.pos, "UTF-8 string"))
    }

    /// `[item,item,…]`
    fn list<T>(&mut self, mut item: impl FnMut(&mut Self) -> Result<T, DrvError>) -> Result<Vec<T>, DrvError> {
        self.expect("[")?;
        let mut v = Vec::new();
        while !self.peek(b']') {
            if !v.is_empty() {
                self.expect(",")?;
            }
            v.push(item(self)?);
        }
        self.expect("]")?;
        Ok(v)
    }
}

/// The outputs of the derivation in `text`.
pub fn parse_outputs(text: &[u8]) -> Result<Vec<DrvOutput>, DrvError> {
    parse(text).map(|d| d.outputs)
}

/// The outputs of the derivation whose text begins with `head` (the outputs come first), or
/// `None` if `head` ends before they do: the rest of a `.drv` (its environment, its inputs)
/// may be megabytes that a hook need not read.
pub fn leading_outputs(head: &[u8]) -> Result<Option<Vec<DrvOutput>>, DrvError> {
    let mut p = Parser { s: head, pos: 0 };
    match p.expect("Derive(").and_then(|()| outputs(&mut p)) {
        Ok(o) => Ok(Some(o)),
        // What was expected begins with all that is left.
        Err(DrvError::Expected(pos, lit)) if lit.as_bytes().starts_with(head.get(pos..).unwrap_or_default()) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `[("name","path","hashAlgo","hash"),…]`, the outputs.
fn outputs(p: &mut Parser) -> Result<Vec<DrvOutput>, DrvError> {
    let outputs = p.list(|p| {
        p.expect("(")?;
        let name = p.string()?;
        let mut f = || -> Result<String, DrvError> {
            p.expect(",")?;
            p.string()
        };
        let (path, hash_algo, hash) = (f()?, f()?, f()?);
        p.expect(")")?;
        Ok((name, path, hash_algo, hash))
    })?;
    outputs
        .into_iter()
        .map(|(name, path, hash_algo, hash)| {
            let path = if path.is_empty() {
                None
            } else {
                Some(StorePath::parse(&path).map_err(|e| DrvError::BadOutput(name.clone(), e))?)
            };
            Ok(DrvOutput { name, path, hash_algo, hash })
        })
        .collect()
}

/// The derivation in `text`.
pub fn parse(text: &[u8]) -> Result<Drv, DrvError> {
    let mut p = Parser { s: text, pos: 0 };
    p.expect("Derive(")?;
    let outputs = outputs(&mut p)?;
    p.expect(",")?;
    let input_drvs = p.list(|p| {
        p.expect("(")?;
        let drv = p.string()?;
        p.expect(",")?;
        p.list(Parser::string)?;
        p.expect(")")?;
        Ok(drv)
    })?;
    p.expect(",")?;
    p.list(Parser::string)?;
    for _ in 0..2 {
        p.expect(",")?;
        p.string()?;
    }
    p.expect(",")?;
    p.list(Parser::string)?;
    p.expect(",")?;
    p.list(|p| {
        p.expect("(")?;
        p.string()?;
        p.expect(",")?;
        p.string()?;
        p.expect(")")
    })?;
    p.expect(")")?;
    if p.pos != text.len() {
        return Err(DrvError::Trailing(p.pos));
    }
    Ok(Drv { outputs, input_drvs })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DRV: &str = r#"Derive([("out","/nix/store/z4asv3j07d89ywjf8fxkn7sg6mf5s9q5-dep","","")],[],[],"x86_64-linux","/bin/sh",["-c","echo \"dep\" > $out\n"],[("builder","/bin/sh"),("name","dep"),("out","/nix/store/z4asv3j07d89ywjf8fxkn7sg6mf5s9q5-dep")])"#;

    #[test]
    fn reads_outputs() {
        let outs = parse_outputs(DRV.as_bytes()).unwrap();
        assert_eq!(outs.len(), 1);
        assert_eq!(outs[0].name, "out");
        assert_eq!(outs[0].path.as_ref().unwrap().name(), "dep");
    }

    /// A content-addressed derivation and its resolved form (tests/corpus/README.md).
    #[test]
    fn reads_floating_outputs_and_input_derivations() {
        let read = |name: &str| parse(&std::fs::read(format!("{}/tests/corpus/drv/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()).unwrap();
        let top = read("ca-top.drv");
        assert_eq!(top.input_drvs, ["/nix/store/zl01zcc1filq6igsq72y5526ba12k7k8-ca-dep-1796535235820158274.drv"]);
        assert_eq!(top.outputs, [DrvOutput { name: "out".into(), path: None, hash_algo: "r:sha256".into(), hash: String::new() }]);
        assert!(top.outputs[0].is_floating());
        assert!(read("ca-top-resolved.drv").input_drvs.is_empty());
        let dep = parse(DRV.as_bytes()).unwrap();
        assert!(dep.input_drvs.is_empty() && !dep.outputs[0].is_floating());
    }

    #[test]
    fn reads_the_outputs_from_the_head_alone() {
        let outs = parse_outputs(DRV.as_bytes()).unwrap();
        let head_len = DRV.find("],").unwrap() + 1;
        for cut in 0..DRV.len() {
            let got = leading_outputs(&DRV.as_bytes()[..cut]).unwrap();
            assert_eq!(got.as_ref(), (cut >= head_len).then_some(&outs), "head of {cut} bytes");
        }
        assert!(leading_outputs(b"Derivx([").is_err());
        assert!(leading_outputs(DRV.replacen("/nix/store/z4asv", "/tmp/z4asv", 1).as_bytes()).is_err());
    }

    #[test]
    fn refuses_truncated_and_corrupt() {
        for cut in 0..DRV.len() {
            assert!(parse_outputs(&DRV.as_bytes()[..cut]).is_err(), "prefix of {cut} bytes parsed");
        }
        assert_eq!(parse_outputs(format!("{DRV} ").as_bytes()), Err(DrvError::Trailing(DRV.len())));
        let bad = DRV.replacen("/nix/store/z4asv", "/tmp/z4asv", 1);
        assert!(matches!(parse_outputs(bad.as_bytes()), Err(DrvError::BadOutput(..))));
    }
}
