//! Facts too many to hold in memory (the references of a million narinfos), written to disk
//! in parts by key as a scan finds them, then read back a part at a time: what a check needs
//! at once is one part of the cache (a 32nd), not the cache (a grace hash join).
//!
//! Files are unlinked as soon as they are created: nothing is left behind, whatever happens
//! to the process.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, Write};
use std::path::Path;

/// Parts the key space is cut into.
pub const PARTS: usize = 32;

const B32: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// The part of a hash part (or any narinfo key): the parts are ranges of keys, one per
/// nixbase32 character (`[c, next c)`), so that part `p` of the narinfos is a range of the
/// index too. Keys before `1` are in part 0, after `z` in the last.
pub fn part_of_hash(s: &str) -> usize {
    let b = s.as_bytes().first().copied().unwrap_or(0);
    B32.iter().rposition(|c| *c <= b).unwrap_or(0)
}

/// The range of keys `[from, to)` of part `p` ([`part_of_hash`]).
pub fn hash_range(p: usize) -> (String, Option<String>) {
    let from = if p == 0 { String::new() } else { (B32[p] as char).to_string() };
    (from, B32.get(p + 1).map(|c| (*c as char).to_string()))
}

/// The part of any other key (FNV-1a): the same key always lands in the same part.
pub fn part_of_key(s: &str) -> usize {
    let h = s.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
    (h % PARTS as u64) as usize
}

/// One kind of record, in [`PARTS`] files.
pub struct Parts {
    files: Vec<BufWriter<File>>,
    /// Bytes written.
    pub bytes: u64,
}

/// A file in `dir` that is already unlinked.
fn anonymous(dir: &Path) -> io::Result<File> {
    std::fs::create_dir_all(dir)?;
    for n in 0u32.. {
        let path = dir.join(format!(".narq-spill-{}-{n}", std::process::id()));
        match OpenOptions::new().read(true).write(true).create_new(true).open(&path) {
            Ok(f) => {
                std::fs::remove_file(&path)?;
                return Ok(f);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 10_000 => continue,
            Err(e) => return Err(e),
        }
    }
    unreachable!()
}

impl Parts {
    /// [`PARTS`] empty files in `dir`.
    pub fn new(dir: &Path) -> io::Result<Parts> {
        let files = (0..PARTS).map(|_| anonymous(dir).map(|f| BufWriter::with_capacity(16 << 10, f))).collect::<io::Result<_>>()?;
        Ok(Parts { files, bytes: 0 })
    }

    /// Appends `record` to part `p`.
    pub fn push(&mut self, p: usize, record: &[u8]) -> io::Result<()> {
        self.bytes += record.len() as u64;
        self.files[p].write_all(record)
    }

    /// Part `p` from its start.
    pub fn read(&mut self, p: usize) -> io::Result<BufReader<File>> {
        let w = &mut self.files[p];
        w.flush()?;
        let mut f = w.get_ref().try_clone()?;
        f.rewind()?;
        Ok(BufReader::with_capacity(64 << 10, f))
    }
}

/// Builds a record: fixed fields and length-prefixed strings.
#[derive(Default)]
pub struct Record(Vec<u8>);

impl Record {
    pub fn new() -> Record {
        Record(Vec::with_capacity(128))
    }
    pub fn bytes(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// A string of up to 65,535 bytes (longer ones are cut: keys are at most 1,024).
    pub fn str(mut self, s: &str) -> Self {
        let b = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
        self.0.extend_from_slice(&(b.len() as u16).to_le_bytes());
        self.0.extend_from_slice(b);
        self
    }
    pub fn done(&self) -> &[u8] {
        &self.0
    }
}

/// Reads records back field by field; `Ok(false)` from [`Fields::more`] at the end.
pub struct Fields<R> {
    r: R,
}

impl<R: Read> Fields<R> {
    pub fn new(r: R) -> Fields<R> {
        Fields { r }
    }

    /// Whether another record follows: reads its first `N` bytes into `first`.
    pub fn more<const N: usize>(&mut self, first: &mut [u8; N]) -> io::Result<bool> {
        match self.r.read_exact(first) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub fn array<const N: usize>(&mut self) -> io::Result<[u8; N]> {
        let mut b = [0u8; N];
        self.r.read_exact(&mut b)?;
        Ok(b)
    }

    pub fn u64(&mut self) -> io::Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A string whose 2-byte length was read by [`Fields::more`].
    pub fn str_of(&mut self, len: [u8; 2]) -> io::Result<String> {
        let mut b = vec![0u8; u16::from_le_bytes(len) as usize];
        self.r.read_exact(&mut b)?;
        String::from_utf8(b).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    pub fn str(&mut self) -> io::Result<String> {
        let len = self.array()?;
        self.str_of(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cover_every_key_once_in_order() {
        assert_eq!(part_of_hash("0abc"), 0);
        assert_eq!(part_of_hash("!"), 0);
        assert_eq!(part_of_hash("zz"), PARTS - 1);
        assert_eq!(part_of_hash("~"), PARTS - 1);
        // Between two characters of the alphabet ('e' is not one): the lower part.
        assert_eq!(part_of_hash("e1"), part_of_hash("d"));
        for p in 0..PARTS {
            let (from, to) = hash_range(p);
            for key in ["0", "09", "d", "e", "ez", "n", "nar", "z9", "{"] {
                let inside = key >= from.as_str() && to.as_deref().is_none_or(|t| key < t);
                assert_eq!(inside, part_of_hash(key) == p, "{key} in part {p} [{from}, {to:?})");
            }
        }
    }

    #[test]
    fn records_come_back_part_by_part() {
        let dir = std::env::temp_dir().join(format!("narq-spill-{}", std::process::id()));
        let mut parts = Parts::new(&dir).unwrap();
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "nothing on disk but open files");
        for i in 0..1000u64 {
            parts.push((i % 3) as usize, Record::new().u64(i).str(&format!("key-{i}")).done()).unwrap();
        }
        let mut f = Fields::new(parts.read(1).unwrap());
        let mut first = [0u8; 8];
        let mut seen = Vec::new();
        while f.more(&mut first).unwrap() {
            seen.push((u64::from_le_bytes(first), f.str().unwrap()));
        }
        assert_eq!(seen.len(), 333);
        assert_eq!(seen[1], (4, "key-4".to_string()));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
