//! Nix's base-32 encoding: its own alphabet (no `e o u t`) and a reversed bit order,
//! as in `libutil/hash.cc` (`printHash32` / `parseHash32`).

use thiserror::Error;

const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum Nixbase32Error {
    #[error("invalid nixbase32 character {0:?} at position {1}")]
    InvalidChar(char, usize),
    #[error("nixbase32 string has length {0}, expected {1}")]
    BadLength(usize, usize),
    #[error("nixbase32 string has non-zero padding bits")]
    NonZeroPadding,
}

/// Length of the encoding of `n` bytes.
pub const fn encoded_len(n: usize) -> usize {
    if n == 0 {
        0
    } else {
        (n * 8 - 1) / 5 + 1
    }
}

pub fn encode(input: &[u8]) -> String {
    let len = encoded_len(input.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        let lo = (input[i] as u16) >> j;
        let hi = if i + 1 < input.len() { (input[i + 1] as u16) << (8 - j) } else { 0 };
        out.push(ALPHABET[((lo | hi) & 0x1f) as usize] as char);
    }
    out
}

/// Byte → digit, 0xff for bytes outside the alphabet.
const DIGITS: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < 32 {
        t[ALPHABET[i] as usize] = i as u8;
        i += 1;
    }
    t
};

fn digit(c: u8) -> Option<u8> {
    Some(DIGITS[c as usize]).filter(|&d| d != 0xff)
}

/// Decodes exactly `out_len` bytes.
pub fn decode(input: &[u8], out_len: usize) -> Result<Vec<u8>, Nixbase32Error> {
    let len = encoded_len(out_len);
    if input.len() != len {
        return Err(Nixbase32Error::BadLength(input.len(), len));
    }
    let mut out = vec![0u8; out_len];
    for n in 0..len {
        let pos = len - n - 1;
        let c = input[pos];
        let d = digit(c).ok_or(Nixbase32Error::InvalidChar(c as char, pos))? as u16;
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        out[i] |= (d << j) as u8;
        let carry = (d << j) >> 8;
        if i + 1 < out_len {
            out[i + 1] |= carry as u8;
        } else if carry != 0 {
            return Err(Nixbase32Error::NonZeroPadding);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        // sha256("") as Nix prints it: nix-hash --type sha256 --to-base32 e3b0c442...
        let h = [
            0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24,
            0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
        ];
        let s = encode(&h);
        assert_eq!(s, "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73");
        assert_eq!(decode(s.as_bytes(), 32).unwrap(), h);
        assert_eq!(encode(&[]), "");
        assert_eq!(encode(&[0x1f]), "0z");
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(decode(b"0e", 1), Err(Nixbase32Error::InvalidChar('e', 1)));
        assert_eq!(decode(b"000", 1), Err(Nixbase32Error::BadLength(3, 2)));
        assert_eq!(decode(b"z0", 1), Err(Nixbase32Error::NonZeroPadding));
    }

    #[test]
    fn round_trips_all_lengths() {
        for n in 0..64usize {
            let v: Vec<u8> = (0..n).map(|i| (i * 37 + n) as u8).collect();
            assert_eq!(decode(encode(&v).as_bytes(), n).unwrap(), v);
        }
    }
}
