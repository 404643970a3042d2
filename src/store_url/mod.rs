//! Nix's store-URL syntax: `file:///dir?…` and `s3://bucket?…`, with Nix's parameter names,
//! so that a user's `nix copy --to` URL works unchanged.
//!
//! Parsed completely when the config is read (by hook, CLI and daemon alike): the parameters
//! every binary cache has are read here, the rest by the backend's own options parser
//! ([`s3_options`]), and whatever is left is an unknown parameter ([`params`]). A new backend
//! is one [`Location`] variant, one options parser here and one `Target` impl in
//! `crate::storage`, which depends on this module and not the other way round.

pub mod params;
pub mod s3_options;

use std::collections::BTreeMap;
use std::path::PathBuf;

use params::{refused, Params};
use s3_options::S3Options;

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
    /// `parallel-compression=`: compress a NAR on every core. `None`: narq's default, on for
    /// NARs of at least 4 MiB (Nix 2.35: on for zstd; before: off).
    pub parallel_compression: Option<bool>,
    /// `Priority:` in `nix-cache-info`, when set.
    pub priority: Option<u32>,
    /// `WantMassQuery:` in `nix-cache-info`, when set.
    pub want_mass_query: Option<bool>,
    /// Extra secret key files given in the URL (`secret-key=`, and `secret-keys=` as a comma
    /// separated list), as `nix copy` accepts them.
    pub secret_keys: Vec<PathBuf>,
    /// `write-nar-listing=true`: a `<hashpart>.ls` listing with each narinfo.
    pub write_nar_listing: bool,
    /// The URL as the user wrote it, for messages.
    pub original: String,
}

/// Parameters of every Nix binary-cache store, read here; each backend's options parser
/// knows its own.
const COMMON_PARAMS: &[&str] = &[
    "compression",
    "compression-level",
    "parallel-compression",
    "write-nar-listing",
    "priority",
    "want-mass-query",
    "secret-key",
    "secret-keys",
    "index-debug-info",
    "local-nar-cache",
    "path-info-cache-size",
    "system-features",
    "trusted",
];

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
        let mut params = Params::new(params);
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
                // -1 is Nix's "the default level".
                if n != -1 && compression != Compression::None && !range.contains(&n) {
                    return Err(format!("compression-level={n} is out of range {range:?} for {}", compression.name()));
                }
                Ok(n)
            })
            .transpose()?
            .filter(|&n| n != -1);
        let parallel_compression = params.take_bool("parallel-compression")?;
        let write_nar_listing = params.take_bool("write-nar-listing")?.unwrap_or(false);
        let priority = params.take_num("priority", "a priority")?;
        let want_mass_query = params.take_bool("want-mass-query")?;
        let mut secret_keys: Vec<PathBuf> = params.take("secret-key").map(PathBuf::from).into_iter().collect();
        if let Some(list) = params.take("secret-keys") {
            secret_keys.extend(list.split(',').map(str::trim).filter(|k| !k.is_empty()).map(PathBuf::from));
        }
        // Nix's settings for a store it reads or indexes, which an uploader has no use for:
        // refused with the reason rather than taken and ignored. Their defaults are what
        // narq does, and accepted.
        if params.take_bool("index-debug-info")? == Some(true) {
            return Err(refused("index-debug-info=true", "narq writes no debuginfo/ index of DWARF build ids (dwarffs)"));
        }
        for (k, why) in [
            ("local-nar-cache", "it caches NARs a Nix fetched from the cache, for reading; narq only writes"),
            ("path-info-cache-size", "it sizes a Nix's in-memory cache of path infos read from the store; narq remembers what it uploaded in its queue"),
            ("system-features", "it says what a store can build; a binary cache builds nothing"),
            ("trusted", "it tells a Nix reading the cache to accept unsigned paths from it; set it in that Nix's substituters, narq signs what it writes"),
        ] {
            if params.take(k).is_some() {
                return Err(refused(k, why));
            }
        }
        if let Some(k) = params.first_left() {
            let scheme = base.split("://").next().unwrap_or("");
            let known: Vec<&str> = COMMON_PARAMS.iter().chain(backend_params).copied().collect();
            return Err(format!("unknown store parameter {k:?} for a {scheme}:// store (known: {})", known.join(", ")));
        }
        Ok(StoreUrl { location, compression, compression_level, parallel_compression, priority, want_mass_query, secret_keys, write_nar_listing, original: url.to_string() })
    }

    /// Which cache this is, whatever the upload settings: what the queue's "uploaded" is
    /// remembered for. Two URLs with the same identity name the same objects.
    pub fn identity(&self) -> String {
        match &self.location {
            Location::File(dir) => format!("file://{}", dir.display()),
            Location::S3(o) => {
                let endpoint = o.endpoint.as_ref().map(|e| e.given.trim_end_matches('/')).unwrap_or("aws");
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
        let u = StoreUrl::parse("s3://my-cache?parallel-compression=false&compression-level=-1&secret-keys=/a,/b&secret-key=/c&index-debug-info=false").unwrap();
        assert_eq!((u.parallel_compression, u.compression_level), (Some(false), None));
        assert_eq!(u.secret_keys, [PathBuf::from("/c"), "/a".into(), "/b".into()]);
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
            ("s3://bucket?trusted=1", "set it in that Nix's substituters"),
            ("file:///x?index-debug-info=true", "no debuginfo/ index"),
            ("file:///x?local-nar-cache=/x", "narq only writes"),
            ("s3://bucket?parallel-compression=2", "true or false"),
            // S3's own and the HTTP store's parameters are not a file:// store's.
            ("file:///x?log-compression=gzip", "unknown store parameter \"log-compression\" for a file:// store"),
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
