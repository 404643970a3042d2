//! The options of an `s3://BUCKET?…` store, read from its URL when the config is read. Pure
//! (no SDK types): the hook builds it too, so a bad parameter is refused by hook, CLI and
//! daemon alike, naming the config file and key, instead of when the daemon opens the store.
//!
//! Every parameter Nix documents for `s3://` stores (2.35: the S3 store's own, and those of
//! the HTTP binary-cache store it extends) is read here with Nix's meaning, or refused with
//! the reason; none is accepted and ignored. Where narq's default differs from Nix's it says
//! so; the table is in docs/configuration.md.

use std::path::PathBuf;

use super::params::{refused, Params};

/// Parts of a multipart upload are at least this large (S3's minimum but for the last).
pub const MIN_PART: u64 = 5 << 20;
/// And at most this large (S3's maximum).
pub const MAX_PART: u64 = 5 << 30;

/// When uploads carry a checksum (`checksum=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checksum {
    /// Only where S3 requires one: several S3-compatible servers reject the CRC trailers
    /// recent SDKs add to every upload.
    WhenRequired,
    /// Always (AWS itself).
    WhenSupported,
}

/// `addressing-style=`: where the bucket's name goes in a request, as Nix 2.34 decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Addressing {
    /// Virtual-hosted for AWS, path-style for a custom endpoint or a bucket with dots.
    Auto,
    /// `https://endpoint/bucket/key`.
    Path,
    /// `https://bucket.endpoint/key`.
    Virtual,
}

/// The `Content-Encoding` an object is stored with (`log-compression=`, `narinfo-compression=`,
/// `ls-compression=`): undone by every Nix that reads the object over S3 or HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Gzip,
    Zstd,
}

impl Encoding {
    /// As `Content-Encoding` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Encoding::Gzip => "gzip",
            Encoding::Zstd => "zstd",
        }
    }
}

/// Parses a `*-compression=` value as a Content-Encoding; `none` is no encoding.
///
/// What readers decode: Nix up to 2.33 decodes the encoding itself (`br` natively, anything
/// else libarchive knows: gzip, xz, bzip2, zstd); from 2.34 curl does, which knows gzip
/// always, br and zstd when built with them (Debian's and nixpkgs' curl are), deflate, and
/// never xz or bzip2. gzip is the one every Nix (and every browser) reads.
fn encoding(key: &str, v: &str) -> Result<Option<Encoding>, String> {
    match v {
        "none" | "" => Ok(None),
        "gzip" => Ok(Some(Encoding::Gzip)),
        "zstd" => Ok(Some(Encoding::Zstd)),
        "br" => Err(refused(&format!("{key}=br"), "narq has no brotli encoder; gzip (read by every Nix) or zstd")),
        "xz" | "bzip2" => Err(refused(
            &format!("{key}={v}"),
            "Nix 2.34 and later cannot read it (their HTTP client, curl, decodes gzip, br, zstd and deflate only); use gzip or zstd",
        )),
        _ => Err(format!("parameter {key}={v:?}: expected none, gzip or zstd (a Content-Encoding every Nix decodes)")),
    }
}

/// Storage classes whose objects cannot be read until restored: a cache written there is
/// unreadable by Nix, and by narq's own `verify` and `gc`.
const ARCHIVE_CLASSES: &[&str] = &["GLACIER", "DEEP_ARCHIVE"];

/// Retries of one request by the S3 client (`retry-attempts`, `retry-delay`,
/// `retry-max-delay`), beyond which the daemon's queue retries with its own backoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// Attempts of a request in all (Nix: 5, narq: 2, since the queue retries the item).
    pub attempts: u32,
    /// The first pause before a retry, doubled (with jitter) for each next one.
    pub delay_ms: u32,
    /// The longest pause between two attempts.
    pub max_delay_ms: u32,
}

impl Default for Retry {
    fn default() -> Self {
        Retry { attempts: 2, delay_ms: 1000, max_delay_ms: 20_000 }
    }
}

/// Where the S3 endpoint is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// As given (the store's identity is made from it).
    pub given: String,
    /// With its scheme: the given one, else `scheme=` (default https).
    pub url: String,
    /// The host, for the addressing style's checks.
    pub host: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Options {
    pub bucket: String,
    /// `region=`; the SDK's default chain (then `us-east-1`, as Nix) without it.
    pub region: Option<String>,
    /// `profile=`: the AWS profile credentials are read from.
    pub profile: Option<String>,
    /// `endpoint=` (with `scheme=` when the endpoint has none).
    pub endpoint: Option<Endpoint>,
    /// `addressing-style=`, already checked against the endpoint and the bucket name.
    pub addressing: Addressing,
    /// `checksum=` (narq's own): `when-required` by default with a custom endpoint,
    /// `when-supported` for AWS.
    pub checksum: Checksum,
    /// `multipart-chunk-size=` (Nix's alias `buffer-size=`): the part size, 5 MiB to 5 GiB.
    /// `None`: narq's defaults, 8 MiB for streamed NARs and 16 MiB for files (Nix: 5 MiB).
    pub part_size: Option<u64>,
    /// `multipart-upload=` (narq: true, Nix: false): large objects as multipart uploads.
    pub multipart: bool,
    /// `multipart-threshold=`: objects up to this size go in one PUT (Nix: 100 MiB). narq
    /// applies it to a NAR's uncompressed size, known before it is compressed. `None`:
    /// narq's default, anything larger than one part goes multipart.
    pub multipart_threshold: Option<u64>,
    /// `storage-class=`: sent with every object written (Nix does the same); the bucket's
    /// default class without it.
    pub storage_class: Option<String>,
    /// `retry-attempts=`, `retry-delay=`, `retry-max-delay=`.
    pub retry: Retry,
    /// `tls-certificate=` and `tls-private-key=`: a client certificate (mTLS), PEM; the key
    /// may be in the certificate's file (then `tls-private-key` can be left out).
    pub tls_client: Option<(PathBuf, PathBuf)>,
    /// `log-compression=` (narq: gzip, Nix: none): build logs' Content-Encoding.
    pub log_encoding: Option<Encoding>,
    /// `narinfo-compression=` (default none).
    pub narinfo_encoding: Option<Encoding>,
    /// `ls-compression=` (default none).
    pub ls_encoding: Option<Encoding>,
}

impl S3Options {
    /// The parameters [`S3Options::parse`] reads (some only to refuse them with the reason).
    pub const PARAMS: &'static [&'static str] = &[
        "region",
        "profile",
        "endpoint",
        "scheme",
        "addressing-style",
        "checksum",
        "multipart-upload",
        "multipart-chunk-size",
        "buffer-size",
        "multipart-threshold",
        "storage-class",
        "retry-attempts",
        "retry-delay",
        "retry-max-delay",
        "retry-delay-rate-limited",
        "tls-certificate",
        "tls-private-key",
        "log-compression",
        "narinfo-compression",
        "ls-compression",
        "versionId",
    ];

    /// The options for bucket `bucket` of store URL `url` (for messages), taking its
    /// parameters out of `params`.
    pub fn parse(url: &str, bucket: &str, params: &mut Params) -> Result<S3Options, String> {
        let valid = (3..=63).contains(&bucket.len())
            && bucket.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.');
        if !valid {
            return Err(format!("{url:?}: {bucket:?} is not a valid S3 bucket name"));
        }
        let scheme = match params.take("scheme").as_deref() {
            None | Some("https") => "https",
            Some("http") => "http",
            Some(o) => return Err(format!("parameter scheme={o:?}: expected http or https")),
        };
        let endpoint = params.take("endpoint").map(|e| parse_endpoint(&e, scheme)).transpose()?;
        let addressing = addressing(params.take("addressing-style").as_deref(), bucket, endpoint.as_ref())?;
        let checksum = match params.take("checksum").as_deref() {
            Some("when-required") => Checksum::WhenRequired,
            Some("when-supported") => Checksum::WhenSupported,
            Some(o) => return Err(format!("parameter checksum={o:?}: expected when-required or when-supported")),
            None if endpoint.is_some() => Checksum::WhenRequired,
            None => Checksum::WhenSupported,
        };
        let chunk = params.take_num::<u64>("multipart-chunk-size", "bytes")?;
        let buffer = params.take_num::<u64>("buffer-size", "bytes")?;
        let part_size = match (chunk, buffer) {
            (Some(_), Some(_)) => return Err("multipart-chunk-size and buffer-size (its old name) are both given: keep one".into()),
            (Some(n), None) | (None, Some(n)) if !(MIN_PART..=MAX_PART).contains(&n) => {
                return Err(format!("multipart-chunk-size={n} is out of range: S3 takes parts of 5 MiB ({MIN_PART}) to 5 GiB ({MAX_PART})"))
            }
            (c, b) => c.or(b),
        };
        let multipart = params.take_bool("multipart-upload")?.unwrap_or(true);
        let multipart_threshold = params.take_num::<u64>("multipart-threshold", "bytes")?;
        let storage_class = params.take("storage-class").map(|c| storage_class(&c)).transpose()?;
        let retry = retry(params)?;
        let tls_client = match (params.take("tls-certificate"), params.take("tls-private-key")) {
            (None, None) => None,
            (None, Some(_)) => return Err("tls-private-key without tls-certificate: give the client certificate too".into()),
            (Some(cert), key) => {
                let key = key.unwrap_or_else(|| cert.clone());
                for (k, v) in [("tls-certificate", &cert), ("tls-private-key", &key)] {
                    if !v.starts_with('/') {
                        return Err(format!("parameter {k}={v:?}: expected an absolute path"));
                    }
                }
                Some((PathBuf::from(cert), PathBuf::from(key)))
            }
        };
        let mut enc = |key: &str, default: Option<Encoding>| params.take(key).map_or(Ok(default), |v| encoding(key, &v));
        let log_encoding = enc("log-compression", Some(Encoding::Gzip))?;
        let narinfo_encoding = enc("narinfo-compression", None)?;
        let ls_encoding = enc("ls-compression", None)?;
        if params.take("versionId").is_some() {
            return Err(refused("versionId", "it names one version of one object, for reading it; a cache is written, many objects"));
        }
        Ok(S3Options {
            bucket: bucket.to_string(),
            region: params.take("region"),
            profile: params.take("profile"),
            endpoint,
            addressing,
            checksum,
            part_size,
            multipart,
            multipart_threshold,
            storage_class,
            retry,
            tls_client,
            log_encoding,
            narinfo_encoding,
            ls_encoding,
        })
    }

    /// The endpoint's URL, with its scheme.
    pub fn endpoint_url(&self) -> Option<String> {
        self.endpoint.as_ref().map(|e| e.url.clone())
    }

    /// Whether requests name the bucket in the path rather than the host.
    pub fn path_style(&self) -> bool {
        match self.addressing {
            Addressing::Path => true,
            Addressing::Virtual => false,
            Addressing::Auto => self.endpoint.is_some() || self.bucket.contains('.'),
        }
    }
}

/// `endpoint=` with a scheme (`http://host:port`, Nix's preferred form) or without one
/// (`host:port`, then `scheme=` says which).
fn parse_endpoint(given: &str, scheme: &str) -> Result<Endpoint, String> {
    let url = match given.split_once("://") {
        Some(("http" | "https", _)) => given.to_string(),
        Some((s, _)) => return Err(format!("parameter endpoint={given:?}: scheme {s:?} is not http or https")),
        None => format!("{scheme}://{given}"),
    };
    let rest = &url[url.find("://").map_or(0, |i| i + 3)..];
    let authority = rest.split('/').next().unwrap_or("");
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or("").to_string(),
        None => authority.rsplit_once(':').map_or(authority, |(h, port)| if port.bytes().all(|b| b.is_ascii_digit()) { h } else { authority }).to_string(),
    };
    if host.is_empty() || authority.contains('@') {
        return Err(format!("parameter endpoint={given:?}: expected a host and port, or a URL such as http://127.0.0.1:9000"));
    }
    Ok(Endpoint { given: given.to_string(), url, host })
}

/// `addressing-style=`, checked as Nix checks it; and, since a virtual-hosted name is made by
/// putting the bucket before the host, refused for an endpoint that is an IP address (the
/// SDK would quietly use path-style there).
fn addressing(v: Option<&str>, bucket: &str, endpoint: Option<&Endpoint>) -> Result<Addressing, String> {
    let style = match v {
        None | Some("auto") => Addressing::Auto,
        Some("path") => Addressing::Path,
        Some("virtual") => Addressing::Virtual,
        Some(o) => return Err(format!("parameter addressing-style={o:?}: expected auto, path or virtual")),
    };
    if style == Addressing::Virtual {
        if bucket.contains('.') {
            return Err(format!(
                "addressing-style=virtual: bucket name {bucket:?} contains a dot, which breaks TLS certificate checks of \
                 virtual-hosted names; use addressing-style=path or auto"
            ));
        }
        if let Some(e) = endpoint.filter(|e| e.host.parse::<std::net::IpAddr>().is_ok()) {
            return Err(format!("addressing-style=virtual: endpoint {:?} is an IP address, which cannot take the bucket's name before it; use a host name or addressing-style=path", e.given));
        }
    }
    Ok(style)
}

/// `storage-class=`: S3's names are upper case with underscores. The archive classes are
/// refused: what is written there cannot be read without a restore.
fn storage_class(c: &str) -> Result<String, String> {
    if c.is_empty() || !c.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_') {
        return Err(format!("parameter storage-class={c:?}: expected an S3 storage class such as STANDARD, STANDARD_IA or INTELLIGENT_TIERING"));
    }
    if ARCHIVE_CLASSES.contains(&c) {
        return Err(refused(
            &format!("storage-class={c}"),
            "objects in it cannot be read until restored, so no Nix could substitute from the cache (nor narq verify or gc it); \
             use GLACIER_IR, STANDARD_IA or INTELLIGENT_TIERING, or an S3 lifecycle rule",
        ));
    }
    Ok(c.to_string())
}

/// `retry-*=`: Nix's per-store overrides of its file-transfer retries, in milliseconds; `0`
/// (Nix's default) keeps narq's default.
fn retry(params: &mut Params) -> Result<Retry, String> {
    let d = Retry::default();
    let mut num = |k: &str| params.take_num::<u32>(k, "milliseconds or a count").map(|v| v.filter(|&n| n > 0));
    let r = Retry {
        attempts: num("retry-attempts")?.unwrap_or(d.attempts),
        delay_ms: num("retry-delay")?.unwrap_or(d.delay_ms),
        max_delay_ms: num("retry-max-delay")?.unwrap_or(d.max_delay_ms),
    };
    if r.attempts > 100 {
        return Err(format!("retry-attempts={} is out of range 1..=100", r.attempts));
    }
    if params.take("retry-delay-rate-limited").is_some() {
        return Err(refused(
            "retry-delay-rate-limited",
            "narq does not retry a throttled request on its own: a store that throttles (429, 503 SlowDown, Retry-After) \
             pauses every upload to it, for as long as it asks, with the daemon's backoff",
        ));
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use crate::store_url::{Location, StoreUrl};

    use super::*;

    fn s3(u: &str) -> S3Options {
        match StoreUrl::parse(u).unwrap().location {
            Location::S3(o) => o,
            l => panic!("{l:?}"),
        }
    }

    #[test]
    fn typed_defaults_and_values() {
        let o = s3("s3://b-1");
        assert_eq!((o.checksum, o.part_size, o.multipart, o.endpoint_url()), (Checksum::WhenSupported, None, true, None));
        assert_eq!((o.log_encoding, o.narinfo_encoding, o.retry), (Some(Encoding::Gzip), None, Retry::default()));
        assert!(!o.path_style());
        let o = s3("s3://b-1?endpoint=127.0.0.1:9000&scheme=http&buffer-size=5242880&multipart-upload=0&profile=p");
        assert_eq!(o.checksum, Checksum::WhenRequired);
        assert_eq!(o.endpoint_url().as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!((o.part_size, o.multipart, o.profile.as_deref()), (Some(MIN_PART), false, Some("p")));
        assert!(o.path_style());
        assert_eq!(s3("s3://b-1?endpoint=https://x/&checksum=when-supported").checksum, Checksum::WhenSupported);
        let o = s3("s3://b-1?endpoint=http://s3.test:9000&addressing-style=virtual&multipart-chunk-size=6291456&multipart-threshold=0\
                    &storage-class=STANDARD_IA&retry-attempts=4&retry-delay=10&retry-max-delay=0&log-compression=zstd&narinfo-compression=gzip\
                    &ls-compression=none&tls-certificate=/k/c.pem");
        assert_eq!((o.endpoint.as_ref().unwrap().host.as_str(), o.path_style()), ("s3.test", false));
        assert_eq!((o.part_size, o.multipart_threshold, o.storage_class.as_deref()), (Some(6 << 20), Some(0), Some("STANDARD_IA")));
        assert_eq!(o.retry, Retry { attempts: 4, delay_ms: 10, max_delay_ms: Retry::default().max_delay_ms });
        assert_eq!((o.log_encoding, o.narinfo_encoding, o.ls_encoding), (Some(Encoding::Zstd), Some(Encoding::Gzip), None));
        assert_eq!(o.tls_client, Some(("/k/c.pem".into(), "/k/c.pem".into())));
        // Auto: path-style for a dotted bucket even on AWS.
        assert!(s3("s3://a.b.c").path_style());
        assert!(s3("s3://abc?addressing-style=path").path_style());
        assert_eq!(s3("s3://abc?endpoint=[::1]:9000").endpoint.unwrap().host, "::1");
    }

    #[test]
    fn refusals_give_their_reason() {
        for (u, want) in [
            ("s3://a.b?addressing-style=virtual", "contains a dot"),
            ("s3://ab1?endpoint=http://127.0.0.1:9000&addressing-style=virtual", "is an IP address"),
            ("s3://ab1?addressing-style=sideways", "expected auto, path or virtual"),
            ("s3://ab1?multipart-chunk-size=1", "out of range"),
            ("s3://ab1?buffer-size=6000000000", "out of range"),
            ("s3://ab1?buffer-size=5242880&multipart-chunk-size=5242880", "keep one"),
            ("s3://ab1?storage-class=GLACIER", "cannot be read until restored"),
            ("s3://ab1?storage-class=standard", "expected an S3 storage class"),
            ("s3://ab1?retry-delay-rate-limited=100", "pauses every upload"),
            ("s3://ab1?retry-attempts=x", "is not a number"),
            ("s3://ab1?log-compression=xz", "Nix 2.34 and later cannot read it"),
            ("s3://ab1?narinfo-compression=br", "no brotli encoder"),
            ("s3://ab1?ls-compression=lz4", "expected none, gzip or zstd"),
            ("s3://ab1?tls-private-key=/k", "without tls-certificate"),
            ("s3://ab1?tls-certificate=k.pem", "absolute path"),
            ("s3://ab1?versionId=3", "names one version of one object"),
            ("s3://ab1?endpoint=ftp://h", "not http or https"),
        ] {
            let e = StoreUrl::parse(u).unwrap_err();
            assert!(e.contains(want), "{u}: {e}");
        }
    }
}
