//! `--deep`: a NAR downloaded, decompressed and checked against its narinfo (`FileHash`,
//! `FileSize`, `NarHash`, `NarSize`) and parsed as a NAR, streamed in bounded memory.
//!
//! Two stages run side by side: the download (which hashes the compressed bytes) on the
//! runtime, and decompression, NAR hashing and parsing on a blocking thread, joined by a
//! small bounded channel. Each stage hashes what only it sees, so a 1 GB NAR costs about
//! the slower of the two, not their sum.

use std::io::{self, Read};
use std::sync::mpsc;

use sha2::Digest;
use tokio::io::AsyncReadExt;

use crate::nix::hash::Sha256;
use crate::nix::NarInfo;
use crate::storage::Target;

/// Bytes per chunk handed from the download to the decompressor.
const CHUNK: usize = 256 << 10;
/// Chunks in flight between the two: bounds memory at `CHUNK * (DEPTH + 2)`.
const DEPTH: usize = 8;
/// Deeper directory nesting than this is refused (the parser recurses).
const MAX_DEPTH: usize = 1024;
/// The longest name or symlink target accepted (Linux's PATH_MAX).
const MAX_STR: u64 = 4096;

/// What a NAR turned out to be.
#[derive(Debug, PartialEq, Eq)]
pub struct Checked {
    pub file_hash: Sha256,
    pub file_size: u64,
    pub nar_hash: Sha256,
    pub nar_size: u64,
}

/// Downloads the NAR of `ni` and checks it; `Err` says what is wrong with it (missing,
/// unreadable, a hash or size that differs, not a NAR). A failure to talk to the target is
/// an `Err` too, prefixed so.
pub async fn check(target: &dyn Target, ni: &NarInfo) -> Result<(), String> {
    check_if_there(target, ni).await.unwrap_or_else(|| Err(format!("NAR {} is missing", ni.url)))
}

/// [`check`], `None` if the NAR is missing (a check that needs no download says so).
pub async fn check_if_there(target: &dyn Target, ni: &NarInfo) -> Option<Result<(), String>> {
    let mut reader = match target.open_read(&ni.url).await {
        Ok(Some(r)) => r,
        Ok(None) => return None,
        Err(e) => return Some(Err(format!("reading {}: {e}", ni.url))),
    };
    Some(read_and_compare(reader.as_mut(), ni).await)
}

async fn read_and_compare(reader: &mut (dyn tokio::io::AsyncRead + Send + Unpin), ni: &NarInfo) -> Result<(), String> {
    let plain = ni.compression == "none";
    let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(DEPTH);
    let compression = ni.compression.clone();
    let unpack = tokio::task::spawn_blocking(move || unpack(&compression, ChannelReader { rx, buf: Vec::new(), pos: 0 }));
    let (mut file_hasher, mut file_size) = (sha2::Sha256::new(), 0u64);
    let mut read_error = None;
    loop {
        let mut buf = vec![0u8; CHUNK];
        let n = match reader.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                read_error = Some(format!("reading {}: {e}", ni.url));
                break;
            }
        };
        buf.truncate(n);
        file_size += n as u64;
        // Uncompressed, the file hash is the NAR hash, which the other stage computes.
        if !plain {
            file_hasher.update(&buf);
        }
        // The other stage gave up (not a NAR): its error says why.
        if blocking_send(&tx, buf).await.is_err() {
            break;
        }
    }
    drop(tx);
    let unpacked = unpack.await.map_err(|e| format!("checking {}: {e}", ni.url))?;
    if let Some(e) = read_error {
        return Err(e);
    }
    let (nar_hash, nar_size) = unpacked?;
    let file_hash = if plain { nar_hash } else { Sha256(file_hasher.finalize().into()) };
    compare(ni, &Checked { file_hash, file_size, nar_hash, nar_size })
}

/// Sends on the bounded channel without blocking the runtime's thread when it is full.
async fn blocking_send(tx: &mpsc::SyncSender<Vec<u8>>, buf: Vec<u8>) -> Result<(), ()> {
    match tx.try_send(buf) {
        Ok(()) => Ok(()),
        Err(mpsc::TrySendError::Disconnected(_)) => Err(()),
        Err(mpsc::TrySendError::Full(buf)) => {
            let tx = tx.clone();
            tokio::task::spawn_blocking(move || tx.send(buf).map_err(drop)).await.map_err(drop)?
        }
    }
}

/// What differs between the narinfo and the NAR, or `Ok`.
pub fn compare(ni: &NarInfo, c: &Checked) -> Result<(), String> {
    let mut wrong = Vec::new();
    if let Some(h) = &ni.file_hash {
        if *h != c.file_hash {
            wrong.push(format!("FileHash is {h}, the file's is {}", c.file_hash));
        }
    }
    if let Some(s) = ni.file_size {
        if s != c.file_size {
            wrong.push(format!("FileSize is {s}, the file has {} bytes", c.file_size));
        }
    }
    if ni.info.nar_hash != c.nar_hash {
        wrong.push(format!("NarHash is {}, the NAR's is {}", ni.info.nar_hash, c.nar_hash));
    }
    if ni.info.nar_size != c.nar_size {
        wrong.push(format!("NarSize is {}, the NAR has {} bytes", ni.info.nar_size, c.nar_size));
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(format!("NAR {} is corrupt: {}", ni.url, wrong.join("; ")))
    }
}

/// The chunks of the channel as one stream of bytes.
struct ChannelReader {
    rx: mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() {
            match self.rx.recv() {
                Ok(b) => (self.buf, self.pos) = (b, 0),
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Decompresses `input` as `compression` says, parses it as a NAR to its end, and returns
/// the NAR's hash and size.
pub fn unpack(compression: &str, input: impl Read) -> Result<(Sha256, u64), String> {
    let decoded: Box<dyn Read> = match compression {
        "none" => Box::new(input),
        "zstd" => Box::new(zstd::stream::read::Decoder::new(input).map_err(|e| format!("zstd: {e}"))?),
        "xz" => Box::new(xz2::read::XzDecoder::new_multi_decoder(input)),
        "bzip2" => Box::new(bzip2::read::MultiBzDecoder::new(input)),
        other => return Err(format!("unknown Compression {other:?}")),
    };
    let mut r = NarParser { r: Hashing { inner: decoded, hasher: sha2::Sha256::new(), count: 0 }, buf: vec![0u8; 1 << 20] };
    r.nar().map_err(|e| format!("not a valid NAR: {e}"))?;
    let Hashing { hasher, count, .. } = r.r;
    Ok((Sha256(hasher.finalize().into()), count))
}

struct Hashing<R> {
    inner: R,
    hasher: sha2::Sha256,
    count: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// A streaming reader of the NAR grammar (see [`crate::nix::nar`]): file contents pass
/// through a fixed buffer, never held whole.
struct NarParser<R> {
    r: Hashing<R>,
    buf: Vec<u8>,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl<R: Read> NarParser<R> {
    fn nar(&mut self) -> io::Result<()> {
        self.expect(b"nix-archive-1")?;
        self.node(0)?;
        // Nothing may follow the root node.
        match self.r.read(&mut [0u8; 1])? {
            0 => Ok(()),
            _ => Err(bad("data after the end of the archive")),
        }
    }

    fn u64(&mut self) -> io::Result<u64> {
        let mut b = [0u8; 8];
        self.r.read_exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn padding(&mut self, len: u64) -> io::Result<()> {
        let pad = ((8 - len % 8) % 8) as usize;
        let mut b = [0u8; 8];
        self.r.read_exact(&mut b[..pad])?;
        if b[..pad].iter().any(|&x| x != 0) {
            return Err(bad("non-zero padding"));
        }
        Ok(())
    }

    fn str(&mut self, max: u64) -> io::Result<Vec<u8>> {
        let len = self.u64()?;
        if len > max {
            return Err(bad(format!("a string of {len} bytes where at most {max} are expected")));
        }
        let mut s = vec![0u8; len as usize];
        self.r.read_exact(&mut s)?;
        self.padding(len)?;
        Ok(s)
    }

    fn expect(&mut self, want: &[u8]) -> io::Result<()> {
        let got = self.str(64)?;
        if got != want {
            return Err(bad(format!("expected {:?}, found {:?}", String::from_utf8_lossy(want), String::from_utf8_lossy(&got))));
        }
        Ok(())
    }

    fn node(&mut self, depth: usize) -> io::Result<()> {
        if depth > MAX_DEPTH {
            return Err(bad("directories nested too deep"));
        }
        self.expect(b"(")?;
        self.expect(b"type")?;
        match self.str(64)?.as_slice() {
            b"regular" => {
                let mut tag = self.str(64)?;
                if tag == b"executable" {
                    self.expect(b"")?;
                    tag = self.str(64)?;
                }
                if tag != b"contents" {
                    return Err(bad(format!("expected \"contents\", found {:?}", String::from_utf8_lossy(&tag))));
                }
                let len = self.u64()?;
                let mut left = len;
                while left > 0 {
                    let n = left.min(self.buf.len() as u64) as usize;
                    self.r.read_exact(&mut self.buf[..n])?;
                    left -= n as u64;
                }
                self.padding(len)?;
            }
            b"symlink" => {
                self.expect(b"target")?;
                if self.str(MAX_STR)?.is_empty() {
                    return Err(bad("empty symlink target"));
                }
            }
            b"directory" => {
                let mut prev: Option<Vec<u8>> = None;
                loop {
                    match self.str(64)?.as_slice() {
                        b")" => return Ok(()),
                        b"entry" => {}
                        other => return Err(bad(format!("expected \"entry\" or \")\", found {:?}", String::from_utf8_lossy(other)))),
                    }
                    self.expect(b"(")?;
                    self.expect(b"name")?;
                    let name = self.str(MAX_STR)?;
                    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0) {
                        return Err(bad(format!("bad entry name {:?}", String::from_utf8_lossy(&name))));
                    }
                    if prev.as_ref().is_some_and(|p| *p >= name) {
                        return Err(bad(format!("entry {:?} out of order", String::from_utf8_lossy(&name))));
                    }
                    self.expect(b"node")?;
                    self.node(depth + 1)?;
                    self.expect(b")")?;
                    prev = Some(name);
                }
            }
            other => return Err(bad(format!("unknown node type {:?}", String::from_utf8_lossy(other)))),
        }
        self.expect(b")")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::nar;

    #[test]
    fn parses_what_dump_writes_and_refuses_damage() {
        let dir = std::env::temp_dir().join(format!("narq-deep-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("t/sub")).unwrap();
        std::fs::write(dir.join("t/a"), vec![7u8; 3_000_001]).unwrap();
        std::fs::write(dir.join("t/sub/b"), b"hello").unwrap();
        std::os::unix::fs::symlink("a", dir.join("t/link")).unwrap();
        let mut bytes = Vec::new();
        let stats = nar::dump(&dir.join("t"), &mut bytes).unwrap();
        assert_eq!(unpack("none", &bytes[..]), Ok((stats.hash, stats.size)));
        let z = zstd::encode_all(&bytes[..], 3).unwrap();
        assert_eq!(unpack("zstd", &z[..]), Ok((stats.hash, stats.size)));
        // Cut short, trailing bytes, a flipped tag: refused.
        assert!(unpack("none", &bytes[..bytes.len() - 8]).unwrap_err().contains("not a valid NAR"));
        let mut more = bytes.clone();
        more.extend_from_slice(&[0u8; 8]);
        assert!(unpack("none", &more[..]).unwrap_err().contains("data after the end"));
        let mut flipped = bytes.clone();
        flipped[8 + 16 + 8] ^= 1; // in "(": the first node's opening
        assert!(unpack("none", &flipped[..]).is_err());
        assert!(unpack("zstd", &bytes[..]).is_err(), "a plain NAR is not zstd");
        assert!(unpack("brotli", &bytes[..]).unwrap_err().contains("unknown Compression"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
