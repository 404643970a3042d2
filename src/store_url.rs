//! Nix's store-URL syntax: `file:///dir?…` and `s3://bucket?…`, with Nix's parameter names,
//! so that a user's `nix copy --to` URL works unchanged.
//!
//! Parsed completely when the config is read (by hook, CLI and daemon alike): the parameters
//! every binary cache has are read here, the rest by the backend's own options parser
//! ([`crate::storage::s3_options`]), and whatever is left is an unknown parameter. A new
//! backend is one [`Location`] variant, one options parser and one `Target` impl.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::storage::s3_options::S3Options;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Zstd,
    Xz,
}

impl Compression {
    /// As the narinfo `Compression:` field and Nix's `compression=` parameter spell it.
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Zstd => "zstd",
            Compression::Xz => "xz",
        }
    }

    /// Suffix of NAR files: `nar/<filehash>.nar<ext>`.
    pub fn extension(self) -> &'static str {
        match self {
            Compression::None => "",
            Compression::Zstd => ".zst",
            Compression::Xz => ".xz",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    File(PathBuf),
    S3(S3Options),
}

#[derive(Debug, Clone, PartialEq)]
pub struct StoreUrl {
    pub location: Location,
    pub compression: Compression,
    /// zstd: 1–19 (default 3, multi-threaded); xz: 0–9 (default 6).
    pub compression_level: Option<i32>,
    /// `Priority:` in `nix-cache-info`, when set.
    pub priority: Option<u32>,
    /// `WantMassQuery:` in `nix-cache-info`, when set.
    pub want_mass_query: Option<bool>,
    /// Extra secret key files given in the URL (`secret-key=`), as `nix copy` accepts them.
    pub secret_keys: Vec<PathBuf>,
    /// `write-nar-listing=true`: a `<hashpart>.ls` listing with each narinfo.
    pub write_nar_listing: bool,
    /// The URL as the user wrote it, for messages.
    pub original: String,
}

/// Parameters of every Nix binary-cache store that narq reads or can safely ignore; each
/// backend's options parser knows its own.
const COMMON_PARAMS: &[&str] = &[
    "compression", "compression-level", "write-nar-listing", "priority", "want-mass-query", "secret-key",
    "parallel-compression", "log-compression", "ls-compression", "narinfo-compression", "index-debug-info", "trusted",
];

/// Store parameters not yet read: a parser takes the ones it knows, and what remains when
/// all have had theirs is an unknown parameter.
pub struct Params(BTreeMap<String, String>);

impl Params {
    /// Removes and returns the value of `key`.
    pub fn take(&mut self, key: &str) -> Option<String> {
        self.0.remove(key)
    }

    /// Removes `key` and reads it as a boolean (`true`/`false`/`1`/`0`).
    pub fn take_bool(&mut self, key: &str) -> Result<Option<bool>, String> {
        self.take(key).map(|v| parse_bool(key, &v)).transpose()
    }
}

pub fn parse_bool(k: &str, v: &str) -> Result<bool, String> {
    match v {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(format!("parameter {k}={v:?}: expected true or false")),
    }
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok());
            out.push(hex.ok_or_else(|| format!("bad percent-encoding in {s:?}"))?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 once decoded"))
}

impl StoreUrl {
    pub fn parse(url: &str) -> Result<Self, String> {
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut params = BTreeMap::new();
        for kv in query.split('&').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').ok_or_else(|| format!("parameter {kv:?} has no '='"))?;
            params.insert(k.to_string(), percent_decode(v)?);
        }
        let mut params = Params(params);
        let (location, backend_params): (Location, &[&str]) = if let Some(p) = base.strip_prefix("file://") {
            if !p.starts_with('/') {
                return Err(format!("{url:?}: a file:// store needs an absolute path (file:///dir)"));
            }
            (Location::File(PathBuf::from(percent_decode(p)?)), &[])
        } else if let Some(b) = base.strip_prefix("s3://") {
            (Location::S3(S3Options::parse(url, b, &mut params)?), S3Options::PARAMS)
        } else {
            return Err(format!("{url:?}: unsupported store URL (expected file:///DIR or s3://BUCKET)"));
        };
        let compression = match params.take("compression").as_deref().unwrap_or("zstd") {
            "zstd" => Compression::Zstd,
            "xz" => Compression::Xz,
            "none" => Compression::None,
            c => return Err(format!("compression={c:?} is not supported (zstd, xz or none)")),
        };
        let compression_level = params
            .take("compression-level")
            .map(|l| {
                let n: i32 = l.parse().map_err(|_| format!("compression-level={l:?} is not a number"))?;
                let range = if compression == Compression::Xz { 0..=9 } else { 1..=19 };
                if compression != Compression::None && !range.contains(&n) {
                    return Err(format!("compression-level={n} is out of range {range:?} for {}", compression.name()));
                }
                Ok(n)
            })
            .transpose()?;
        let write_nar_listing = params.take_bool("write-nar-listing")?.unwrap_or(false);
        let priority = params.take("priority").map(|v| v.parse().map_err(|_| format!("priority={v:?} is not a number"))).transpose()?;
        let want_mass_query = params.take_bool("want-mass-query")?;
        let secret_keys = params.take("secret-key").map(PathBuf::from).into_iter().collect();
        // Accepted as Nix does, and ignored: narq compresses NARs its own way, writes
        // listings uncompressed, and writes no debug-info index.
        for k in ["parallel-compression", "index-debug-info", "trusted"] {
            params.take_bool(k)?;
        }
        for k in ["log-compression", "ls-compression", "narinfo-compression"] {
            params.take(k);
        }
        if let Some(k) = params.0.keys().next() {
            let scheme = base.split("://").next().unwrap_or("");
            let known: Vec<&str> = COMMON_PARAMS.iter().chain(backend_params).copied().collect();
            return Err(format!("unknown store parameter {k:?} for a {scheme}:// store (known: {})", known.join(", ")));
        }
        Ok(StoreUrl { location, compression, compression_level, priority, want_mass_query, secret_keys, write_nar_listing, original: url.to_string() })
    }

    /// Which cache this is, whatever the upload settings: what the queue's "uploaded" is
    /// remembered for. Two URLs with the same identity name the same objects.
    pub fn identity(&self) -> String {
        match &self.location {
            Location::File(dir) => format!("file://{}", dir.display()),
            Location::S3(o) => {
                let endpoint = o.endpoint.as_deref().map(|e| e.trim_end_matches('/')).unwrap_or("aws");
                format!("s3://{}@{endpoint}", o.bucket)
            }
        }
    }

    /// The text of `nix-cache-info`.
    pub fn cache_info(&self) -> String {
        let mut s = String::from("StoreDir: /nix/store\n");
        if let Some(w) = self.want_mass_query {
            s += &format!("WantMassQuery: {}\n", w as u8);
        }
        if let Some(p) = self.priority {
            s += &format!("Priority: {p}\n");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nix_urls() {
        let u = StoreUrl::parse("s3://my-cache?region=eu-central-1&compression=xz&compression-level=9&priority=40").unwrap();
        let Location::S3(o) = &u.location else { panic!("{u:?}") };
        assert_eq!((o.bucket.as_str(), o.region.as_deref()), ("my-cache", Some("eu-central-1")));
        assert_eq!(u.compression, Compression::Xz);
        assert_eq!(u.compression_level, Some(9));
        assert_eq!(u.cache_info(), "StoreDir: /nix/store\nPriority: 40\n");
        let f = StoreUrl::parse("file:///var/lib/narq/cache%20x").unwrap();
        assert_eq!(f.location, Location::File("/var/lib/narq/cache x".into()));
        assert_eq!(f.compression, Compression::Zstd);
    }

    #[test]
    fn refuses_bad_urls_clearly() {
        for (u, want) in [
            ("http://x", "unsupported store URL"),
            ("file://relative", "absolute path"),
            ("s3://A_B", "not a valid S3 bucket"),
            ("s3://bucket?compression=brotli", "not supported"),
            ("s3://bucket?compresion=xz", "unknown store parameter \"compresion\" for a s3:// store"),
            ("s3://bucket?compression=xz&compression-level=12", "out of range"),
            ("s3://bucket?write-nar-listing=maybe", "true or false"),
            ("s3://bucket?trusted=maybe", "true or false"),
            // The backend's own parameters: typed, and only for that backend.
            ("file:///x?region=eu-west-1", "unknown store parameter \"region\" for a file:// store"),
            ("s3://bucket?checksum=x", "checksum=\"x\": expected when-required or when-supported"),
            ("s3://bucket?buffer-size=16M", "buffer-size=\"16M\" is not a number"),
            ("s3://bucket?multipart-upload=yes", "multipart-upload=\"yes\": expected true or false"),
            ("s3://bucket?endpoint=h:9000&scheme=ftp", "scheme=\"ftp\": expected http or https"),
        ] {
            let e = StoreUrl::parse(u).unwrap_err();
            assert!(e.contains(want), "{u}: {e}");
        }
    }
}
