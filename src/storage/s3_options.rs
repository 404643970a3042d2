//! The options of an `s3://BUCKET?…` store, read from its URL when the config is read. Pure
//! (no SDK types): the hook builds it too, so a bad parameter is refused by hook, CLI and
//! daemon alike, naming the config file and key, instead of when the daemon opens the store.

use crate::store_url::{parse_bool, Params};

/// Parts of a multipart upload are at least this large (S3's minimum but for the last).
pub const MIN_PART: u64 = 5 << 20;
pub const DEFAULT_PART: u64 = 16 << 20;

/// When uploads carry a checksum (`checksum=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checksum {
    /// Only where S3 requires one: several S3-compatible servers reject the CRC trailers
    /// recent SDKs add to every upload.
    WhenRequired,
    /// Always (AWS itself).
    WhenSupported,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Options {
    pub bucket: String,
    /// `region=`; the SDK's default chain (then `us-east-1`, as Nix) without it.
    pub region: Option<String>,
    /// `profile=`: the AWS profile credentials are read from.
    pub profile: Option<String>,
    /// `endpoint=` as given (the store's identity is made from it).
    pub endpoint: Option<String>,
    /// `scheme=` for an endpoint given without one: `http` or `https` (default).
    pub scheme: &'static str,
    /// `checksum=`: `when-required` by default with a custom endpoint, `when-supported` for AWS.
    pub checksum: Checksum,
    /// `buffer-size=`: multipart part size, at least [`MIN_PART`].
    pub part_size: u64,
    /// `multipart-upload=` (default true): large NARs as multipart uploads.
    pub multipart: bool,
}

impl S3Options {
    /// The parameters [`S3Options::parse`] reads.
    pub const PARAMS: &'static [&'static str] = &["region", "profile", "endpoint", "scheme", "checksum", "buffer-size", "multipart-upload"];

    /// The options for bucket `bucket` of store URL `url` (for messages), taking its
    /// parameters out of `params`.
    pub fn parse(url: &str, bucket: &str, params: &mut Params) -> Result<S3Options, String> {
        let valid = (3..=63).contains(&bucket.len())
            && bucket.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.');
        if !valid {
            return Err(format!("{url:?}: {bucket:?} is not a valid S3 bucket name"));
        }
        let endpoint = params.take("endpoint");
        let scheme = match params.take("scheme").as_deref() {
            None | Some("https") => "https",
            Some("http") => "http",
            Some(o) => return Err(format!("parameter scheme={o:?}: expected http or https")),
        };
        let checksum = match params.take("checksum").as_deref() {
            Some("when-required") => Checksum::WhenRequired,
            Some("when-supported") => Checksum::WhenSupported,
            Some(o) => return Err(format!("parameter checksum={o:?}: expected when-required or when-supported")),
            None if endpoint.is_some() => Checksum::WhenRequired,
            None => Checksum::WhenSupported,
        };
        let part_size = match params.take("buffer-size") {
            Some(s) => s.parse::<u64>().map_err(|_| format!("parameter buffer-size={s:?} is not a number (bytes)"))?.max(MIN_PART),
            None => DEFAULT_PART,
        };
        let multipart = match params.take("multipart-upload") {
            Some(v) => parse_bool("multipart-upload", &v)?,
            None => true,
        };
        Ok(S3Options {
            bucket: bucket.to_string(),
            region: params.take("region"),
            profile: params.take("profile"),
            endpoint,
            scheme,
            checksum,
            part_size,
            multipart,
        })
    }

    /// The endpoint's URL, with its scheme.
    pub fn endpoint_url(&self) -> Option<String> {
        self.endpoint.as_ref().map(|e| if e.contains("://") { e.clone() } else { format!("{}://{e}", self.scheme) })
    }
}

#[cfg(test)]
mod tests {
    use crate::store_url::{Location, StoreUrl};

    use super::*;

    #[test]
    fn typed_defaults_and_values() {
        let s3 = |u: &str| match StoreUrl::parse(u).unwrap().location {
            Location::S3(o) => o,
            l => panic!("{l:?}"),
        };
        let o = s3("s3://b-1");
        assert_eq!((o.checksum, o.part_size, o.multipart, o.endpoint_url()), (Checksum::WhenSupported, DEFAULT_PART, true, None));
        let o = s3("s3://b-1?endpoint=127.0.0.1:9000&scheme=http&buffer-size=1&multipart-upload=0&profile=p");
        assert_eq!(o.checksum, Checksum::WhenRequired);
        assert_eq!(o.endpoint_url().as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!((o.part_size, o.multipart, o.profile.as_deref()), (MIN_PART, false, Some("p")));
        assert_eq!(s3("s3://b-1?endpoint=https://x/&checksum=when-supported").checksum, Checksum::WhenSupported);
    }
}
