//! Nix's store-URL syntax: `file:///dir?…` and `s3://bucket?…`, with Nix's parameter names,
//! so that a user's `nix copy --to` URL works unchanged.

use std::collections::BTreeMap;
use std::path::PathBuf;

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
    S3 { bucket: String },
}

#[derive(Debug, Clone, PartialEq)]
pub struct StoreUrl {
    pub location: Location,
    pub compression: Compression,
    /// zstd: 1–19 (default 3, multi-threaded); xz: 0–9 (default 6).
    pub compression_level: Option<i32>,
    pub write_nar_listing: bool,
    /// `Priority:` in `nix-cache-info`, when set.
    pub priority: Option<u32>,
    /// `WantMassQuery:` in `nix-cache-info`, when set.
    pub want_mass_query: Option<bool>,
    /// Extra secret key files given in the URL (`secret-key=`), as `nix copy` accepts them.
    pub secret_keys: Vec<PathBuf>,
    /// Every parameter as given, for targets that read their own (`region`, `endpoint`, …).
    pub params: BTreeMap<String, String>,
    /// The URL as the user wrote it, for messages.
    pub original: String,
}

/// Parameters that Nix's binary-cache stores accept and that narq reads or can safely ignore.
const KNOWN_PARAMS: &[&str] = &[
    "compression", "compression-level", "write-nar-listing", "priority", "want-mass-query", "secret-key",
    "parallel-compression", "multipart-upload", "buffer-size", "region", "endpoint", "scheme", "profile",
    "log-compression", "ls-compression", "narinfo-compression", "index-debug-info", "trusted", "checksum",
];

fn parse_bool(k: &str, v: &str) -> Result<bool, String> {
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
        let location = if let Some(p) = base.strip_prefix("file://") {
            if !p.starts_with('/') {
                return Err(format!("{url:?}: a file:// store needs an absolute path (file:///dir)"));
            }
            Location::File(PathBuf::from(percent_decode(p)?))
        } else if let Some(b) = base.strip_prefix("s3://") {
            let valid = (3..=63).contains(&b.len())
                && b.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.');
            if !valid {
                return Err(format!("{url:?}: {b:?} is not a valid S3 bucket name"));
            }
            Location::S3 { bucket: b.to_string() }
        } else {
            return Err(format!("{url:?}: unsupported store URL (expected file:///DIR or s3://BUCKET)"));
        };
        let mut params = BTreeMap::new();
        for kv in query.split('&').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').ok_or_else(|| format!("parameter {kv:?} has no '='"))?;
            if !KNOWN_PARAMS.contains(&k) {
                return Err(format!("unknown store parameter {k:?} (known: {})", KNOWN_PARAMS.join(", ")));
            }
            params.insert(k.to_string(), percent_decode(v)?);
        }
        let get = |k: &str| params.get(k).map(String::as_str);
        let compression = match get("compression").unwrap_or("zstd") {
            "zstd" => Compression::Zstd,
            "xz" => Compression::Xz,
            "none" => Compression::None,
            c => return Err(format!("compression={c:?} is not supported (zstd, xz or none)")),
        };
        let compression_level = get("compression-level")
            .map(|l| {
                let n: i32 = l.parse().map_err(|_| format!("compression-level={l:?} is not a number"))?;
                let range = if compression == Compression::Xz { 0..=9 } else { 1..=19 };
                if compression != Compression::None && !range.contains(&n) {
                    return Err(format!("compression-level={n} is out of range {range:?} for {}", compression.name()));
                }
                Ok(n)
            })
            .transpose()?;
        Ok(StoreUrl {
            location,
            compression,
            compression_level,
            write_nar_listing: get("write-nar-listing").map(|v| parse_bool("write-nar-listing", v)).transpose()?.unwrap_or(false),
            priority: get("priority").map(|v| v.parse().map_err(|_| format!("priority={v:?} is not a number"))).transpose()?,
            want_mass_query: get("want-mass-query").map(|v| parse_bool("want-mass-query", v)).transpose()?,
            secret_keys: get("secret-key").map(PathBuf::from).into_iter().collect(),
            params: params.clone(),
            original: url.to_string(),
        })
    }

    /// Which cache this is, whatever the upload settings: what the queue's "uploaded" is
    /// remembered for. Two URLs with the same identity name the same objects.
    pub fn identity(&self) -> String {
        match &self.location {
            Location::File(dir) => format!("file://{}", dir.display()),
            Location::S3 { bucket } => {
                let endpoint = self.params.get("endpoint").map(|e| e.trim_end_matches('/')).unwrap_or("aws");
                format!("s3://{bucket}@{endpoint}")
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
        assert_eq!(u.location, Location::S3 { bucket: "my-cache".into() });
        assert_eq!(u.compression, Compression::Xz);
        assert_eq!(u.compression_level, Some(9));
        assert_eq!(u.params["region"], "eu-central-1");
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
            ("s3://bucket?compresion=xz", "unknown store parameter \"compresion\""),
            ("s3://bucket?compression=xz&compression-level=12", "out of range"),
            ("s3://bucket?write-nar-listing=maybe", "true or false"),
        ] {
            let e = StoreUrl::parse(u).unwrap_err();
            assert!(e.contains(want), "{u}: {e}");
        }
    }
}
