//! Property test of the parsers: seeds from `tests/corpus/`, mutated deterministically.
//! The parsers must never panic, and whatever they accept must round-trip.

use narq::nix::{drv, NarInfo, StorePath};
use std::path::Path;

/// xorshift64*: deterministic, so a failure reproduces from the printed case number.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: &[&[u8]] = &[b":", b": ", b"\n", b"\"", b"\\", b",", b"(", b")", b"[", b"]", b"/", b"-", b"..",
    b"sha256:", b"sha256-", b"\xff", b"\xc3\xa9", b"\0", b"/nix/store/", b"Sig: ", b"18446744073709551616"];

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(v.len() + 1);
        match rng.below(5) {
            0 if !v.is_empty() => v.truncate(at),
            1 if at < v.len() => {
                v[at] = rng.next() as u8;
            }
            2 => {
                let s = INTERESTING[rng.below(INTERESTING.len())];
                v.splice(at..at, s.iter().copied());
            }
            3 if at < v.len() => {
                let end = (at + rng.below(16)).min(v.len());
                v.drain(at..end);
            }
            _ => {
                let from = rng.below(v.len());
                let end = (from + rng.below(32)).min(v.len());
                let chunk = v[from..end].to_vec();
                v.splice(at..at, chunk);
            }
        }
    }
    v
}

fn seeds(kind: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus").join(kind);
    let mut v: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| std::fs::read(e.unwrap().path()).unwrap()).collect();
    assert!(!v.is_empty(), "no seeds in {}", dir.display());
    v.sort();
    v
}

const CASES: usize = 20_000;

fn fuzz(kind: &str, mut check: impl FnMut(&[u8]) -> bool) {
    let seeds = seeds(kind);
    let mut rng = Rng(0x9E3779B97F4A7C15);
    let mut accepted = 0;
    for s in &seeds {
        assert!(check(s), "{kind}: seed not accepted: {}", String::from_utf8_lossy(s));
    }
    for case in 0..CASES {
        let input = mutate(&mut rng, &seeds[case % seeds.len()]);
        let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&input)))
            .unwrap_or_else(|_| panic!("{kind}: case {case} panicked on {:?}", String::from_utf8_lossy(&input)));
        accepted += ok as usize;
    }
    // Mutations must both keep some inputs valid and break most of them, or the test proves little.
    assert!(accepted > 0 && accepted < CASES, "{kind}: {accepted} of {CASES} mutations accepted");
}

/// A refusal: it must say why.
fn refused(e: impl std::fmt::Display) -> bool {
    assert!(!e.to_string().is_empty(), "an error without a message");
    false
}

#[test]
fn narinfo_parser_never_panics_and_round_trips() {
    fuzz("narinfo", |b| {
        let Ok(s) = std::str::from_utf8(b) else { return false };
        match NarInfo::parse(s) {
            Ok(ni) => {
                let again = NarInfo::parse(&ni.to_string()).expect("rendered narinfo does not parse");
                assert_eq!(again, ni);
                true
            }
            Err(e) => refused(e),
        }
    });
}

#[test]
fn store_path_parser_never_panics_and_round_trips() {
    fuzz("store_path", |b| {
        let Ok(s) = std::str::from_utf8(b) else { return false };
        match StorePath::parse(s) {
            Ok(p) => {
                assert_eq!(p.to_string(), s);
                assert_eq!(StorePath::from_base_name(p.base_name()).unwrap(), p);
                true
            }
            Err(e) => refused(e),
        }
    });
}

#[test]
fn drv_parser_never_panics() {
    fuzz("drv", |b| match drv::parse_outputs(b) {
        Ok(outs) => {
            assert!(!outs.is_empty() || b.starts_with(b"Derive([]"));
            true
        }
        Err(e) => refused(e),
    });
}
