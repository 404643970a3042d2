//! NAR serialisation, streamed from the file system, hashed on the way.
//!
//! The grammar (Eelco Dolstra's thesis, fig. 5.2; `libutil/archive.cc`), where every
//! `str` is a little-endian u64 length, the bytes, and zero padding to a multiple of 8:
//!
//! ```text
//! nar       = str("nix-archive-1") node
//! node      = str("(") str("type") body str(")")
//! body      = str("regular") [str("executable") str("")] str("contents") str(CONTENTS)
//!           | str("symlink") str("target") str(TARGET)
//!           | str("directory") { str("entry") str("(") str("name") str(NAME)
//!                                 str("node") node str(")") }
//! ```
//! Directory entries come in bytewise order of their names. A regular file is executable
//! when its owner-execute bit is set; other permission bits, times and owners are not kept.
//!
//! Nothing is held in memory beyond one read buffer: [`dump`] writes into any `Write` and
//! returns the SHA-256 and length of what it wrote. [`dump_listed`] also returns the NAR's
//! listing (the `<hashpart>.ls` of `write-nar-listing=true`), built on the same walk.

use sha2::Digest;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::hash::Sha256;

/// Hash and size of a NAR, as they appear in narinfo files (`NarHash`, `NarSize`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NarStats {
    pub hash: Sha256,
    pub size: u64,
}

/// A writer that hashes and counts what passes through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: sha2::Sha256,
    count: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter { inner, hasher: sha2::Sha256::new(), count: 0 }
    }

    pub fn finish(self) -> (W, NarStats) {
        let stats = NarStats { hash: Sha256(self.hasher.finalize().into()), size: self.count };
        (self.inner, stats)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

const BUF_SIZE: usize = 1 << 20;

/// Writes the NAR of `path` to `out`; returns its hash and size.
pub fn dump<W: Write>(path: &Path, out: &mut W) -> io::Result<NarStats> {
    dump_listed(path, out, false).map(|(stats, _)| stats)
}

/// [`dump`], and with `listing` the NAR's listing as Nix writes it to `<hashpart>.ls`:
/// `{"version":1,"root":NODE}` without whitespace, where a NODE is
/// `{"type":"regular","size":N[,"executable":true],"narOffset":OFFSET}` (OFFSET: where the
/// contents start in the NAR), `{"type":"symlink","target":T}` or
/// `{"type":"directory","entries":{NAME:NODE,...}}` in the NAR's order (Nix 2.8,
/// `listNar` in `nar-accessor.cc`; compared byte for byte with `nix copy` by a test).
pub fn dump_listed<W: Write>(path: &Path, out: &mut W, listing: bool) -> io::Result<(NarStats, Option<Vec<u8>>)> {
    let mut w = NarWriter {
        out: io::BufWriter::with_capacity(64 * 1024, HashingWriter::new(out)),
        buf: vec![0u8; BUF_SIZE],
        pos: 0,
        listing: listing.then(|| br#"{"version":1,"root":"#.to_vec()),
    };
    w.str(b"nix-archive-1")?;
    w.node(path)?;
    let mut listing = w.listing.take();
    if let Some(l) = &mut listing {
        l.push(b'}');
    }
    let hashing = w.out.into_inner().map_err(|e| e.into_error())?;
    let (inner, stats) = hashing.finish();
    inner.flush()?;
    Ok((stats, listing))
}

/// Hash and size of the NAR of `path`, without writing it anywhere.
pub fn hash_path(path: &Path) -> io::Result<NarStats> {
    dump(path, &mut io::sink())
}

struct NarWriter<W: Write> {
    out: io::BufWriter<HashingWriter<W>>,
    buf: Vec<u8>,
    /// Bytes written so far: the listing's `narOffset`s.
    pos: u64,
    /// The listing so far, when one is asked for.
    listing: Option<Vec<u8>>,
}

/// Appends `s` as a JSON string the way Nix 2.8's `toJSON` writes it: `"` and `\` escaped,
/// `\n`, `\r`, `\t`, other control bytes as `\u00xx`, every other byte as it is.
fn json_str(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    for &b in s {
        match b {
            b'"' | b'\\' => out.extend([b'\\', b]),
            b'\n' => out.extend(br"\n"),
            b'\r' => out.extend(br"\r"),
            b'\t' => out.extend(br"\t"),
            0..=31 => out.extend(format!("\\u{b:04x}").bytes()),
            _ => out.push(b),
        }
    }
    out.push(b'"');
}

fn padding(len: u64) -> usize {
    ((8 - (len % 8)) % 8) as usize
}

impl<W: Write> NarWriter<W> {
    fn str(&mut self, s: &[u8]) -> io::Result<()> {
        self.out.write_all(&(s.len() as u64).to_le_bytes())?;
        self.out.write_all(s)?;
        self.pos += 8 + s.len() as u64 + padding(s.len() as u64) as u64;
        self.out.write_all(&[0u8; 8][..padding(s.len() as u64)])
    }

    /// Appends `parts` to the listing, if one is kept.
    fn list(&mut self, parts: &[&[u8]]) {
        if let Some(l) = &mut self.listing {
            parts.iter().for_each(|p| l.extend_from_slice(p));
        }
    }

    fn strs(&mut self, ss: &[&[u8]]) -> io::Result<()> {
        ss.iter().try_for_each(|s| self.str(s))
    }

    fn node(&mut self, path: &Path) -> io::Result<()> {
        let meta = fs::symlink_metadata(path)?;
        let ft = meta.file_type();
        self.strs(&[b"(", b"type"])?;
        if ft.is_symlink() {
            let target = fs::read_link(path)?;
            self.strs(&[b"symlink", b"target", target.as_os_str().as_bytes()])?;
            if let Some(l) = &mut self.listing {
                l.extend_from_slice(br#"{"type":"symlink","target":"#);
                json_str(l, target.as_os_str().as_bytes());
                l.push(b'}');
            }
        } else if ft.is_file() {
            self.str(b"regular")?;
            let executable = meta.permissions().mode() & 0o100 != 0;
            if executable {
                self.strs(&[b"executable", b""])?;
            }
            self.str(b"contents")?;
            // The contents start after their 8-byte length.
            let (size, offset) = (meta.len().to_string(), (self.pos + 8).to_string());
            let exec: &[u8] = if executable { br#","executable":true"# } else { b"" };
            self.list(&[br#"{"type":"regular","size":"#, size.as_bytes(), exec, br#","narOffset":"#, offset.as_bytes(), b"}"]);
            self.contents(path, meta.len())?;
        } else if ft.is_dir() {
            self.str(b"directory")?;
            self.list(&[br#"{"type":"directory","entries":{"#]);
            let mut names: Vec<OsString> =
                fs::read_dir(path)?.map(|e| e.map(|e| e.file_name())).collect::<io::Result<_>>()?;
            names.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            for (i, name) in names.iter().enumerate() {
                if let Some(l) = &mut self.listing {
                    if i > 0 {
                        l.push(b',');
                    }
                    json_str(l, name.as_bytes());
                    l.push(b':');
                }
                self.strs(&[b"entry", b"(", b"name", name.as_bytes(), b"node"])?;
                self.node(&path.join(name))?;
                self.str(b")")?;
            }
            self.list(&[b"}}"]);
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: unsupported file type (not a file, directory or symlink)", path.display()),
            ));
        }
        self.str(b")")
    }

    fn contents(&mut self, path: &Path, size: u64) -> io::Result<()> {
        self.out.write_all(&size.to_le_bytes())?;
        let mut file = File::open(path)?;
        let mut left = size;
        while left > 0 {
            let want = left.min(self.buf.len() as u64) as usize;
            let n = file.read(&mut self.buf[..want])?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{}: file shrank while it was read", path.display()),
                ));
            }
            self.out.write_all(&self.buf[..n])?;
            left -= n as u64;
        }
        self.pos += 8 + size + padding(size) as u64;
        self.out.write_all(&[0u8; 8][..padding(size)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn str_bytes(s: &[u8]) -> Vec<u8> {
        let mut v = (s.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(s);
        v.resize(v.len() + padding(s.len() as u64), 0);
        v
    }

    #[test]
    fn single_file_layout() {
        let dir = std::env::temp_dir().join(format!("narq-nar-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let f = dir.join("f");
        fs::write(&f, b"hello").unwrap();
        let mut out = Vec::new();
        let stats = dump(&f, &mut out).unwrap();
        let mut want = Vec::new();
        for s in [&b"nix-archive-1"[..], b"(", b"type", b"regular", b"contents", b"hello", b")"] {
            want.extend(str_bytes(s));
        }
        assert_eq!(out, want);
        assert_eq!(stats.size, want.len() as u64);
        assert_eq!(stats.hash, Sha256::digest(&want));
        fs::remove_dir_all(&dir).unwrap();
    }
}
