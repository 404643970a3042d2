//! `s3://BUCKET?…`: any S3-compatible store (AWS, MinIO, R2, Garage, Ceph RGW, B2), with
//! Nix's store-URL parameters. The only module that knows the AWS SDK.
//!
//! - Credentials: the standard AWS chain (environment, `~/.aws/credentials` and
//!   `~/.aws/config` with `profile=`, SSO, credential processes, IMDS).
//! - `endpoint=` (a URL, or a host and port with `scheme=http|https`) selects a custom
//!   endpoint; `addressing-style` says whether the bucket goes in the host or the path (as
//!   Nix 2.34: virtual-hosted for AWS, path-style for a custom endpoint or a dotted bucket).
//! - Every object written carries `storage-class` when one is set; narinfos, listings and
//!   build logs carry the `Content-Encoding` of `narinfo-compression`, `ls-compression` and
//!   `log-compression` (gzip by default for logs), which [`Target::get`] undoes.
//! - `tls-certificate`/`tls-private-key`: a client certificate, through [`super::mtls`].
//! - The proxy of the standard environment variables (`https_proxy`, `no_proxy`, …), as curl
//!   and so Nix honour them.
//! - Checksums: recent SDKs add CRC trailers to every upload, which several S3-compatible
//!   servers reject. `checksum=when-required` (the default with a custom endpoint) sends
//!   them only where S3 requires one, and there (DeleteObjects) `Content-MD5` instead, which
//!   older servers require; `checksum=when-supported` (the default for AWS) always.
//! - NARs at most one part large (or up to `multipart-threshold`) go in one PUT, larger ones
//!   stream: a multipart upload to a temporary key whose parts (`multipart-chunk-size`,
//!   8 MiB by default; larger when the NAR would need more than S3's 10,000 parts; 3 in
//!   flight) go up while the rest is being compressed, then a server-side copy to the NAR's
//!   key (UploadPartCopy above 5 GiB) and a delete of the temporary one. Other large files
//!   (build logs) go up as multipart uploads of `multipart-chunk-size` parts (16 MiB by
//!   default), 6 in flight, each read from its range of the file. A failed multipart upload
//!   is aborted. `multipart-upload=false` forces single PUTs.
//! - A request not answered within 20 s plus its size at 16 KiB/s is given up (and retried
//!   after a pause): a stalled server must not hold a worker forever.
//! - Errors are one line, ending with what to change where the answer tells (a region, the
//!   clock, the IAM action refused, a missing bucket, TLS, checksums, addressing). A call the
//!   store does not implement (501, 405) is marked `unsupported`: callers skip optional ones
//!   (listing incomplete uploads) and say so; a store without CopyObject gets a streamed
//!   NAR read back and uploaded again under its key.

use aws_sdk_s3::config::{RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use std::path::Path;
use std::sync::Arc;

use crate::store_url::s3_options::{Checksum, Encoding, S3Options};
use super::{Body, BoxFuture, CallCounter, CallKind, Calls, Chunk, Incomplete, Object, Reader, Target, TargetError, DELETE_BATCH, MAX_GET};

const PARTS_IN_FLIGHT: usize = 6;

/// A listing of the narinfos at the bucket's root, when the bucket is small enough to list.
struct Listing {
    keys: std::collections::HashSet<String>,
    at: std::time::Instant,
}

/// Buckets with up to this many pages (1,000 keys each) at the root are listed in one go,
/// instead of one HEAD per path.
const LIST_PAGES: usize = 10;
/// How long a listing answers "is it there?" before the bucket is listed again.
const LIST_TTL: std::time::Duration = std::time::Duration::from_secs(600);

pub struct S3Target {
    client: aws_sdk_s3::Client,
    /// The bucket's narinfos as last listed; `None` inside when the bucket is too large to
    /// list (then every check is a HEAD).
    listing: tokio::sync::Mutex<Option<Option<Listing>>>,
    /// Set by [`Target::forget_listing`]: the next check lists the bucket again.
    listing_stale: std::sync::atomic::AtomicBool,
    bucket: String,
    /// Part size of multipart uploads (`multipart-chunk-size`); `None`: [`STREAM_PART`] for
    /// streamed NARs, [`FILE_PART`] for files.
    part_size: Option<u64>,
    /// `multipart-upload` (default true): large NARs as multipart uploads.
    multipart: bool,
    /// `multipart-threshold`: objects up to this size go in one PUT.
    threshold: Option<u64>,
    /// `storage-class`, sent with every object written.
    storage_class: Option<aws_sdk_s3::types::StorageClass>,
    /// `narinfo-compression`, `ls-compression`, `log-compression`.
    narinfo_encoding: Option<Encoding>,
    ls_encoding: Option<Encoding>,
    log_encoding: Option<Encoding>,
    /// `checksum=when-required`: DeleteObjects carries Content-MD5 instead of the SDK's CRC32.
    md5_deletes: bool,
    /// False once the store answered that it does not implement CopyObject: renames then
    /// copy through this machine.
    copies_on_server: std::sync::atomic::AtomicBool,
    /// For messages.
    describe: String,
    /// Whether the server honours `If-Match` ([`Target::conditional_puts`]), once probed.
    conditional: tokio::sync::OnceCell<Result<(), String>>,
    /// Requests sent, by kind.
    calls: Arc<CallCounter>,
}

/// S3 error codes that refuse one object for what it is (its size, its key): sending it
/// again cannot help, and nothing is wrong with the target for other objects.
const OBJECT_REFUSED: &[&str] = &["EntityTooLarge", "EntityTooSmall", "KeyTooLongError", "MetadataTooLarge"];

/// Longest message taken from an SDK error chain; the rest is SDK internals.
const MAX_MSG: usize = 300;

/// The profile credentials are read from, for the "no credentials" message.
static PROFILE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The permission (IAM action) an S3 call needs, and which commands make the call: an
/// "access denied" names both. Every call narq makes has one, or `classify` does not take its errors.
trait Call {
    const ACTION: &'static str;
    const NEEDED_BY: &'static str;
}

macro_rules! calls {
    ($($module:ident::$error:ident => $action:literal, $needed_by:literal;)*) => {
        $(impl Call for aws_sdk_s3::operation::$module::$error {
            const ACTION: &'static str = $action;
            const NEEDED_BY: &'static str = $needed_by;
        })*
    };
}

calls! {
    list_objects_v2::ListObjectsV2Error => "s3:ListBucket", "verify, gc, rm, sign and the daemon";
    get_object::GetObjectError => "s3:GetObject", "every command";
    head_object::HeadObjectError => "s3:GetObject", "the daemon";
    put_object::PutObjectError => "s3:PutObject", "uploads";
    create_multipart_upload::CreateMultipartUploadError => "s3:PutObject", "uploads";
    upload_part::UploadPartError => "s3:PutObject", "uploads";
    complete_multipart_upload::CompleteMultipartUploadError => "s3:PutObject", "uploads";
    copy_object::CopyObjectError => "s3:GetObject and s3:PutObject", "uploads";
    upload_part_copy::UploadPartCopyError => "s3:GetObject and s3:PutObject", "uploads";
    delete_objects::DeleteObjectsError => "s3:DeleteObject", "gc and rm, and by uploads (their temporary keys)";
    delete_object::DeleteObjectError => "s3:DeleteObject", "uploads (their temporary keys)";
    list_multipart_uploads::ListMultipartUploadsError => "s3:ListBucketMultipartUploads", "verify and gc (unfinished uploads)";
    abort_multipart_upload::AbortMultipartUploadError => "s3:AbortMultipartUpload", "gc (unfinished uploads)";
}

/// Sorts an SDK error: wrong or missing credentials and a missing bucket concern the whole
/// target, a refused object only its item, throttling, 5xx, timeouts and dropped connections
/// may pass, a call the store does not implement is marked so. The message is one line and,
/// where the answer tells, ends with what to change.
fn classify<E: Call + ProvideErrorMetadata + std::error::Error + 'static>(what: &str, e: SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> TargetError {
    let status = e.raw_response().map(|r| r.status().as_u16());
    let code = e.as_service_error().and_then(|s| s.code()).unwrap_or("").to_string();
    let header = |name: &str| e.raw_response().and_then(|r| r.headers().get(name)).map(str::to_string);
    // Seconds only: S3 and its clones do not send HTTP dates here.
    let retry_after = header("retry-after").and_then(|v| v.trim().parse::<u64>().ok()).map(std::time::Duration::from_secs);
    if let Some(c) = credentials_error(&e) {
        return TargetError::target(format!("{what}: {c}"));
    }
    if let Some(t) = tls_error(&e) {
        return TargetError::target(format!("{what}: {t}"));
    }
    let text = e.as_service_error().and_then(|s| s.message()).unwrap_or("").to_string();
    let msg = match (&e, status) {
        (SdkError::ServiceError(_), Some(st)) => format!("{what}: HTTP {st} {code} {text}").trim_end().to_string(),
        _ => format!("{what}: {}", one_line(&e)),
    };
    let fix = |hint: String| TargetError::target(format!("{msg} ({hint})"));
    let lower = text.to_ascii_lowercase();
    match code.as_str() {
        "PermanentRedirect" | "AuthorizationHeaderMalformed" | "IllegalLocationConstraintException" => {
            // S3 names the bucket's region in a header; clones (Garage) in the message.
            let region = header("x-amz-bucket-region").or_else(|| named_region(&text));
            return fix(match region {
                Some(r) => format!("the bucket is in region {r:?}: set region={r} in the store URL"),
                None => "the bucket is in another region: set region= in the store URL".into(),
            });
        }
        "RequestTimeTooSkewed" => {
            let theirs = header("date").map(|d| format!(" (the store's time: {d})")).unwrap_or_default();
            return fix(format!("this machine's clock is more than 15 minutes off the store's{theirs}: set the clock, e.g. with NTP"));
        }
        "AccessDenied" | "AllAccessDisabled" => {
            return fix(format!("these credentials lack {} on this bucket, needed by {}: grant it in the key's or the bucket's policy", E::ACTION, E::NEEDED_BY));
        }
        "InvalidAccessKeyId" => return fix("the store does not know this access key: check AWS_ACCESS_KEY_ID, the profile, or the credentials file".into()),
        "SignatureDoesNotMatch" => return fix("the secret key does not match the access key: check AWS_SECRET_ACCESS_KEY or the profile".into()),
        "ExpiredToken" | "TokenRefreshRequired" => return fix("the session token has expired: renew the credentials".into()),
        "NoSuchBucket" => return fix("no such bucket at this endpoint: create it, or correct the bucket name or endpoint= in the store URL".into()),
        "SecondLevelDomainForbidden" => return fix("this store takes virtual-hosted requests only: set addressing-style=virtual in the store URL".into()),
        _ => {}
    }
    // A store that refuses the checksum headers recent SDKs add (R2 and B2 did, older Ceph does).
    let about_checksums = ["checksum", "content-md5", "trailer"].iter().any(|h| lower.contains(h));
    let refusal = matches!(code.as_str(), "InvalidArgument" | "InvalidRequest" | "NotImplemented" | "MissingContentMD5" | "");
    if (about_checksums && refusal && matches!(status, Some(400 | 501))) || code == "MissingContentMD5" {
        return TargetError { unsupported: status == Some(501), ..fix("this store does not take the checksum headers the AWS SDK adds: set checksum=when-required in the store URL".into()) };
    }
    if matches!(status, Some(501 | 405)) || code == "NotImplemented" {
        return TargetError::unsupported(format!("{msg} (the store does not implement this call)"));
    }
    let auth = matches!(status, Some(401 | 403)) || matches!(e, SdkError::ConstructionFailure(_));
    if auth {
        return fix("check the credentials, the bucket and its policy".into());
    }
    if status == Some(413) {
        return TargetError::permanent(format!(
            "{msg} (the store, or a proxy in front of it, refuses a request this large: keep multipart-upload=true, and buffer-size below its limit)"
        ));
    }
    if OBJECT_REFUSED.contains(&code.as_str()) {
        return TargetError::permanent(msg);
    }
    TargetError { retry_after, ..TargetError::transient(msg) }
}

/// The region a refusal's message names: S3's "the region 'us-east-1' is wrong; expecting
/// 'eu-west-1'", Garage's "unexpected scope: '…', expected: '20261206/garage/s3/aws4_request'"
/// (the scope's second part).
fn named_region(text: &str) -> Option<String> {
    let after = |word: &str| {
        let rest = &text[text.find(word)? + word.len()..];
        let start = rest.find('\'')? + 1;
        Some(rest[start..start + rest[start..].find('\'')?].to_string())
    };
    let named = after(" expecting").or_else(|| after(" expected"))?;
    let region = if named.contains('/') { named.split('/').nth(1)?.to_string() } else { named };
    Some(region).filter(|r| !r.is_empty())
}

/// A TLS failure with the endpoint in one line, with the two usual causes' fixes.
fn tls_error(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let t = causes(e).find_map(|c| c.downcast_ref::<rustls::Error>())?;
    Some(format!(
        "TLS with the endpoint failed: {t} (an endpoint that speaks plain HTTP: add scheme=http, or write endpoint=http://…; \
         a certificate from a CA of your own: point SSL_CERT_FILE at that CA's certificate)"
    ))
}

/// `e` and its causes, including what each `io::Error` wraps (which its `source()` skips:
/// the TLS client nests its errors two `io::Error`s deep).
fn causes<'a>(e: &'a (dyn std::error::Error + 'static)) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    let mut next = Some(e);
    std::iter::from_fn(move || {
        let cur = next?;
        next = match cur.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => cur.source(),
        };
        Some(cur)
    })
}

/// Forbids the SDK's own quick retry of an answer with `Retry-After`: the SDK would send it
/// again within a second, whatever the store asked.
#[derive(Debug)]
struct RetryAfterIsOurs;

impl aws_sdk_s3::config::retry::ClassifyRetry for RetryAfterIsOurs {
    fn classify_retry(&self, ctx: &aws_sdk_s3::config::interceptors::InterceptorContext) -> aws_sdk_s3::config::retry::RetryAction {
        use aws_sdk_s3::config::retry::RetryAction;
        match ctx.response() {
            Some(r) if r.headers().get("retry-after").is_some() => RetryAction::RetryForbidden,
            _ => RetryAction::NoActionIndicated,
        }
    }

    fn name(&self) -> &'static str {
        "narq: Retry-After is the daemon's"
    }
}

/// Counts every request sent (each attempt, retries included: each is billed) by kind.
#[derive(Debug)]
struct CountCalls(Arc<CallCounter>);

impl aws_sdk_s3::config::Intercept for CountCalls {
    fn name(&self) -> &'static str {
        "narq: count calls"
    }

    fn read_before_transmit(
        &self,
        _: &aws_sdk_s3::config::interceptors::BeforeTransmitInterceptorContextRef<'_>,
        _: &aws_sdk_s3::config::RuntimeComponents,
        cfg: &mut aws_sdk_s3::config::ConfigBag,
    ) -> Result<(), aws_smithy_runtime_api::box_error::BoxError> {
        let op = cfg.load::<aws_smithy_runtime_api::client::orchestrator::Metadata>().map_or("", |m| m.name());
        self.0.add(match op {
            "ListObjectsV2" | "ListObjects" | "ListMultipartUploads" | "ListParts" => CallKind::List,
            "GetObject" => CallKind::Get,
            "HeadObject" => CallKind::Head,
            "PutObject" | "CreateMultipartUpload" | "UploadPart" | "UploadPartCopy" | "CompleteMultipartUpload" | "CopyObject" => CallKind::Put,
            "DeleteObjects" | "DeleteObject" | "AbortMultipartUpload" => CallKind::Delete,
            _ => CallKind::Other,
        });
        Ok(())
    }
}

/// Where [`Target::list_all`] splits the key space beyond its first page: before each
/// character of a store path's hash part (nixbase32: the top-level narinfos), and within
/// `nar/` and `log/` likewise. The alphabet holds `n`, `l` and `r`, so a part by prefix `n`
/// would list the whole of `nar/` too: parts are ranges of keys (after one bound, up to the
/// next), which cover every key whatever it is, each once.
fn list_bounds() -> Vec<String> {
    const B32: &str = "0123456789abcdfghijklmnpqrsvwxyz";
    let mut b: Vec<String> = B32.chars().map(String::from).collect();
    for dir in ["nar/", "log/"] {
        b.extend(B32.chars().map(|c| format!("{dir}{c}")));
    }
    b.sort();
    b
}

/// "No credentials" in one line, if that is what `e` comes down to: the SDK wraps it in a
/// dispatch failure whose text lists every provider's internals.
fn credentials_error(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    use aws_credential_types::provider::error::CredentialsError;
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(c) = err.downcast_ref::<CredentialsError>() {
            return Some(match c {
                CredentialsError::CredentialsNotLoaded(_) => {
                    let profile = PROFILE.get().map_or("default", String::as_str);
                    let imds = match std::env::var("AWS_EC2_METADATA_DISABLED") {
                        Ok(v) if v.eq_ignore_ascii_case("true") => "IMDS (disabled by AWS_EC2_METADATA_DISABLED)",
                        _ => "IMDS",
                    };
                    format!(
                        "no AWS credentials found (looked in: env AWS_ACCESS_KEY_ID, profile {profile:?} in ~/.aws/credentials \
                         and ~/.aws/config, web identity token, ECS, {imds})"
                    )
                }
                CredentialsError::ProviderTimedOut(t) => {
                    format!("loading AWS credentials timed out after {} s", t.timeout_duration().as_secs())
                }
                other => format!("loading AWS credentials: {}", one_line(other)),
            });
        }
        cur = err.source();
    }
    None
}

/// An error and its causes, joined with ": ", each cause's first line only, repeats left
/// out, at most [`MAX_MSG`] characters.
fn one_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = Some(e);
    while let Some(err) = cur {
        let text = err.to_string();
        let first = text.lines().next().unwrap_or("").trim().to_string();
        if !first.is_empty() && !parts.iter().any(|p| p.contains(&first)) {
            parts.push(first);
        }
        cur = err.source();
    }
    let mut msg = parts.join(": ");
    if msg.len() > MAX_MSG {
        let mut cut = MAX_MSG;
        while !msg.is_char_boundary(cut) {
            cut -= 1;
        }
        msg.truncate(cut);
        msg.push('…');
    }
    msg
}

/// A request is given this long, plus its bytes at [`MIN_RATE`], to be answered.
const ANSWER_BASE: std::time::Duration = std::time::Duration::from_secs(20);
/// The slowest average rate per request that is still waited for (6 parts share a link).
const MIN_RATE: u64 = 16 << 10;

/// Waits for `send` (an SDK request carrying `len` bytes) at most [`ANSWER_BASE`] plus
/// `len` at [`MIN_RATE`]. The SDK's own read timeout would count the upload of the body
/// too; without any, a server that takes a request and never answers holds its worker
/// (and, in dependency order, everything after it) forever.
async fn answered<T>(what: &str, len: u64, send: impl std::future::Future<Output = T>) -> Result<T, TargetError> {
    let limit = ANSWER_BASE + std::time::Duration::from_secs(len / MIN_RATE);
    tokio::time::timeout(limit, send)
        .await
        .map_err(|_| TargetError::transient(format!("{what}: no answer within {} s", limit.as_secs())))
}

/// UploadPart of part `n`, `len` bytes of `body`.
async fn upload_part(client: &aws_sdk_s3::Client, bucket: &str, key: &str, upload_id: &str, n: i32, body: ByteStream, len: u64) -> Result<CompletedPart, TargetError> {
    let what = format!("uploading part {n} of {key}");
    let send = client.upload_part().bucket(bucket).key(key).upload_id(upload_id).part_number(n).content_length(len as i64).body(body).send();
    let out = answered(&what, len, send).await?.map_err(|e| classify(&what, e))?;
    Ok(CompletedPart::builder().part_number(n).set_e_tag(out.e_tag().map(str::to_string)).build())
}

/// Streamed NARs go up in parts of this size unless `multipart-chunk-size` says otherwise.
const STREAM_PART: u64 = 8 << 20;
/// Files (build logs) go up in parts of this size unless `multipart-chunk-size` says otherwise.
const FILE_PART: u64 = 16 << 20;
/// Parts of a streamed NAR uploading at once: enough to keep a 50 ms, 50 MiB/s link busy.
const STREAM_IN_FLIGHT: usize = 3;

/// S3 copies at most this much with one CopyObject; larger objects are copied in ranges of
/// this size (UploadPartCopy). Debug builds read `NARQ_TEST_COPY_LIMIT` (at least S3's
/// 5 MiB part minimum), so that a test can take that way with a small NAR.
fn copy_limit() -> u64 {
    const MAX_COPY: u64 = 5 << 30;
    #[cfg(debug_assertions)]
    if let Some(n) = std::env::var("NARQ_TEST_COPY_LIMIT").ok().and_then(|v| v.parse::<u64>().ok()) {
        return n.max(crate::store_url::s3_options::MIN_PART);
    }
    MAX_COPY
}

/// S3 accepts at most this many parts in one multipart upload.
const MAX_PARTS: u64 = 10_000;

/// The part size for a file of `size` bytes: `configured`, or larger (in whole MiB) when
/// `configured` would take more than [`MAX_PARTS`] parts.
fn part_size_for(configured: u64, size: u64) -> u64 {
    let needed = size.div_ceil(MAX_PARTS).div_ceil(1 << 20) << 20;
    configured.max(needed)
}

/// Gives a DeleteObjects request Content-MD5 instead of the CRC32 the SDK adds: S3 clones
/// that predate the SDK's checksums require Content-MD5 there (as S3 itself did), and some
/// refuse a request carrying both.
fn content_md5_instead(req: &mut aws_sdk_s3::config::http::HttpRequest) {
    use base64::Engine;
    use md5::Digest;
    let Some(body) = req.body().bytes() else { return };
    let md5 = base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(body));
    let headers = req.headers_mut();
    let sums: Vec<String> = headers.iter().map(|(k, _)| k.to_ascii_lowercase()).filter(|k| k.starts_with("x-amz-checksum-") || k == "x-amz-sdk-checksum-algorithm").collect();
    for k in sums {
        headers.remove(k.as_str());
    }
    headers.insert("content-md5", md5);
}

impl S3Target {
    /// The target for `o`, whose values were checked when the config was read; an error only
    /// if its client certificate (`tls-certificate`) cannot be read.
    pub async fn new(o: &S3Options) -> Result<Self, String> {
        use aws_config::BehaviorVersion;
        use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
        // As the default client, plus the proxy from the environment (curl's, and so Nix's,
        // `https_proxy`, `http_proxy`, `no_proxy`).
        let http = aws_smithy_http_client::Builder::new().build_with_connector_fn(|settings, components| {
            let mut b = aws_smithy_http_client::Connector::builder().proxy_config(aws_smithy_http_client::proxy::ProxyConfig::from_env());
            b.set_connector_settings(settings.cloned());
            if let Some(c) = components {
                b.set_sleep_impl(c.sleep_impl());
            }
            b.tls_provider(tls::Provider::Rustls(CryptoMode::Ring)).build()
        });
        let mut loader = match &o.tls_client {
            Some((cert, key)) => aws_config::defaults(BehaviorVersion::latest()).http_client(super::mtls::MtlsClient::new(cert, key)?),
            None => aws_config::defaults(BehaviorVersion::latest()).http_client(http),
        };
        if let Some(region) = &o.region {
            loader = loader.region(aws_sdk_s3::config::Region::new(region.clone()));
        }
        if let Some(profile) = &o.profile {
            loader = loader.profile_name(profile);
        }
        let profile = o.profile.clone().or_else(|| std::env::var("AWS_PROFILE").ok());
        let _ = PROFILE.set(profile.unwrap_or_else(|| "default".into()));
        let sdk = loader.load().await;
        let mut b = aws_sdk_s3::config::Builder::from(&sdk);
        if sdk.region().is_none() {
            // As Nix does.
            b = b.region(aws_sdk_s3::config::Region::new("us-east-1"));
        }
        let endpoint = o.endpoint_url();
        let checksum = match o.checksum {
            Checksum::WhenRequired => RequestChecksumCalculation::WhenRequired,
            Checksum::WhenSupported => RequestChecksumCalculation::WhenSupported,
        };
        if checksum == RequestChecksumCalculation::WhenRequired {
            b = b.response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        }
        b = b.request_checksum_calculation(checksum);
        if let Some(e) = &endpoint {
            b = b.endpoint_url(e);
        }
        b = b.force_path_style(o.path_style());
        // An answer that says when to come back is not retried here: it reaches the daemon's
        // breaker, which holds every request for as long.
        b = b.retry_config(retry_config(o)).retry_classifier(RetryAfterIsOurs);
        let calls = Arc::new(CallCounter::default());
        b = b.interceptor(CountCalls(calls.clone()));
        let describe = format!("s3://{}{}", o.bucket, endpoint.map(|e| format!(" at {e}")).unwrap_or_default());
        Ok(S3Target {
            client: aws_sdk_s3::Client::from_conf(b.build()),
            listing: tokio::sync::Mutex::new(None),
            listing_stale: std::sync::atomic::AtomicBool::new(false),
            bucket: o.bucket.clone(),
            part_size: o.part_size,
            multipart: o.multipart,
            threshold: o.multipart_threshold,
            storage_class: o.storage_class.as_deref().map(aws_sdk_s3::types::StorageClass::from),
            narinfo_encoding: o.narinfo_encoding,
            ls_encoding: o.ls_encoding,
            log_encoding: o.log_encoding,
            md5_deletes: o.checksum == Checksum::WhenRequired,
            copies_on_server: std::sync::atomic::AtomicBool::new(true),
            describe,
            conditional: tokio::sync::OnceCell::new(),
            calls,
        })
    }

    /// Lists the `.narinfo` keys at the root (up to [`LIST_PAGES`] pages); `None` if there
    /// are more.
    async fn list_narinfos(&self) -> Result<Option<Listing>, TargetError> {
        let mut keys = std::collections::HashSet::new();
        let mut token = None;
        for _ in 0..LIST_PAGES {
            let list = self.client.list_objects_v2().bucket(&self.bucket).delimiter("/").set_continuation_token(token).send();
            let out = answered("listing the bucket", 0, list).await?.map_err(|e| classify("listing the bucket", e))?;
            keys.extend(out.contents().iter().filter_map(|o| o.key()).filter(|k| k.ends_with(".narinfo")).map(str::to_string));
            token = out.next_continuation_token().map(str::to_string);
            if token.is_none() {
                return Ok(Some(Listing { keys, at: std::time::Instant::now() }));
            }
        }
        Ok(None)
    }

    async fn put_multipart(&self, key: &str, file: &Path, size: u64, content_type: &str, encoding: Option<&str>) -> Result<(), TargetError> {
        let upload_id = self.create_upload(key, content_type, encoding).await?;
        let parts = match self.upload_parts(key, &upload_id, file, size).await {
            Ok(p) => p,
            Err(e) => {
                self.abort_upload(key, &upload_id, &e).await;
                return Err(e);
            }
        };
        self.complete_upload(key, &upload_id, parts, size).await
    }

    /// CreateMultipartUpload; returns the upload id.
    async fn create_upload(&self, key: &str, content_type: &str, encoding: Option<&str>) -> Result<String, TargetError> {
        let what = format!("starting the multipart upload of {key}");
        let create = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .set_content_encoding(encoding.map(str::to_string))
            .set_storage_class(self.storage_class.clone())
            .send();
        let created = answered(&what, 0, create).await?.map_err(|e| classify(&what, e))?;
        Ok(created.upload_id().unwrap_or_default().to_string())
    }

    /// AbortMultipartUpload, after the failure `after`: a failed abort is only logged (the
    /// failure that led here is what the caller reports; `narq gc` aborts what is left). Not
    /// sent when the store asked us to wait (`Retry-After`): `narq gc` aborts it later.
    async fn abort_upload(&self, key: &str, upload_id: &str, after: &TargetError) {
        if after.retry_after.is_some() {
            return tracing::debug!(key, "the store asked for a pause: the multipart upload is left for `narq gc` to abort");
        }
        let abort = self.client.abort_multipart_upload().bucket(&self.bucket).key(key).upload_id(upload_id).send();
        match answered("aborting", 0, abort).await {
            Ok(Ok(_)) => {}
            Ok(Err(a)) => tracing::warn!(key, "aborting the multipart upload: {}", one_line(&a)),
            Err(a) => tracing::warn!(key, "aborting the multipart upload: {a}"),
        }
    }

    /// CompleteMultipartUpload of `size` bytes; aborted if the server refuses it.
    async fn complete_upload(&self, key: &str, upload_id: &str, parts: Vec<CompletedPart>, size: u64) -> Result<(), TargetError> {
        let what = format!("completing the multipart upload of {key}");
        let complete = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
            .send();
        // The server assembles the parts before it answers: give it time for the whole size.
        if let Err(e) = answered(&what, size, complete).await?.map_err(|e| classify(&what, e)) {
            self.abort_upload(key, upload_id, &e).await;
            return Err(e);
        }
        Ok(())
    }

    /// Uploads the chunks from `chunks` as parts, as they come, at most [`STREAM_IN_FLIGHT`]
    /// of them at a time; returns the parts and the total size.
    async fn stream_parts(&self, key: &str, upload_id: &str, chunks: &mut tokio::sync::mpsc::Receiver<Chunk>) -> Result<(Vec<CompletedPart>, u64), TargetError> {
        let sem = Arc::new(tokio::sync::Semaphore::new(STREAM_IN_FLIGHT));
        let mut tasks = tokio::task::JoinSet::new();
        let (mut parts, mut size, mut n) = (Vec::new(), 0u64, 0i32);
        let joined = |r: Result<Result<CompletedPart, TargetError>, tokio::task::JoinError>| {
            r.map_err(|e| TargetError::transient(format!("part upload task: {e}")))?
        };
        loop {
            // The permit first: the next chunk stays with the writer (which then waits)
            // until a part slot is free.
            let permit = sem.clone().acquire_owned().await.map_err(|e| TargetError::transient(format!("part slots: {e}")))?;
            match chunks.recv().await {
                Some(Chunk::Data(body)) => {
                    n += 1;
                    let (stream, len, tmp) = match body {
                        Body::Bytes(b) => {
                            let len = b.len() as u64;
                            (ByteStream::from(b), len, None)
                        }
                        Body::File(tmp) => {
                            let f = tmp.path();
                            let len = std::fs::metadata(f).map_err(|e| TargetError::transient(format!("{}: {e}", f.display())))?.len();
                            let s = ByteStream::from_path(f).await.map_err(|e| TargetError::transient(format!("reading {}: {e}", f.display())))?;
                            (s, len, Some(tmp))
                        }
                    };
                    size += len;
                    let (client, bucket, key, upload_id) = (self.client.clone(), self.bucket.clone(), key.to_string(), upload_id.to_string());
                    tasks.spawn(async move {
                        // Both held until the part is up: the slot, and the part's temp file.
                        let _held = (permit, tmp);
                        upload_part(&client, &bucket, &key, &upload_id, n, stream, len).await
                    });
                }
                Some(Chunk::End) if n > 0 => break,
                Some(Chunk::End) => return Err(TargetError::transient(format!("streaming {key}: no bytes to upload"))),
                None => return Err(TargetError::transient(format!("streaming {key}: the writer stopped before the end"))),
            }
            // Fail fast: a failed part stops the upload (dropping `tasks` aborts the rest).
            while let Some(done) = tasks.try_join_next() {
                parts.push(joined(done)?);
            }
        }
        while let Some(done) = tasks.join_next().await {
            parts.push(joined(done)?);
        }
        parts.sort_by_key(|p| p.part_number());
        Ok((parts, size))
    }

    /// The server-side copy of the `size`-byte object at `from` to `to`.
    async fn server_copy(&self, from: &str, to: &str, size: u64, content_type: &str) -> Result<(), TargetError> {
        if size > copy_limit() {
            return self.copy_multipart(from, to, size, content_type).await;
        }
        let what = format!("copying {from} to {to}");
        let copy = self
            .client
            .copy_object()
            .bucket(&self.bucket)
            .key(to)
            .copy_source(format!("{}/{from}", self.bucket))
            .content_type(content_type)
            .metadata_directive(aws_sdk_s3::types::MetadataDirective::Replace)
            .set_storage_class(self.storage_class.clone())
            .send();
        answered(&what, size, copy).await?.map_err(|e| classify(&what, e))?;
        Ok(())
    }

    /// The copy of the `size`-byte object at `from` to `to` through this machine, for a store
    /// without server-side copies: read back a part at a time and streamed up again.
    async fn copy_through(&self, from: &str, to: &str, size: u64, content_type: &'static str) -> Result<(), TargetError> {
        use tokio::io::AsyncReadExt;
        let what = format!("reading {from} back to copy it to {to}");
        let Some(out) = self.get_object(from).await? else {
            return Err(TargetError::transient(format!("{what}: it is gone")));
        };
        let part = part_size_for(self.part_size.unwrap_or(STREAM_PART), size);
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let read = async move {
            let mut body = out.body.into_async_read();
            let mut read = 0u64;
            loop {
                let mut buf = Vec::with_capacity(part as usize);
                let n = answered(&what, part, (&mut body).take(part).read_to_end(&mut buf)).await?;
                let n = n.map_err(|e| TargetError::transient(format!("{what}: {e}")))?;
                if n == 0 {
                    break;
                }
                read += n as u64;
                if tx.send(Chunk::Data(Body::Bytes(buf))).await.is_err() {
                    return Ok(());
                }
            }
            if read != size {
                return Err(TargetError::transient(format!("{what}: {read} bytes, not {size}")));
            }
            let _ = tx.send(Chunk::End).await;
            Ok(())
        };
        // A failed read drops the sender without `End`: the upload is aborted.
        let (read, put) = tokio::join!(read, self.put_streamed(to, rx, content_type));
        read?;
        put.map(|_| ())
    }

    /// The copy of a `size`-byte object beyond CopyObject's limit: a multipart upload of
    /// ranges of `from` (UploadPartCopy), aborted on failure.
    async fn copy_multipart(&self, from: &str, to: &str, size: u64, content_type: &str) -> Result<(), TargetError> {
        let upload_id = self.create_upload(to, content_type, None).await?;
        let part = copy_limit();
        let mut parts = Vec::new();
        for (i, offset) in (0..size).step_by(part as usize).enumerate() {
            let n = i as i32 + 1;
            let what = format!("copying part {n} of {from} to {to}");
            let len = part.min(size - offset);
            let send = self
                .client
                .upload_part_copy()
                .bucket(&self.bucket)
                .key(to)
                .upload_id(&upload_id)
                .part_number(n)
                .copy_source(format!("{}/{from}", self.bucket))
                .copy_source_range(format!("bytes={offset}-{}", offset + len - 1))
                .send();
            match answered(&what, len, send).await.and_then(|r| r.map_err(|e| classify(&what, e))) {
                Ok(out) => parts.push(CompletedPart::builder().part_number(n).set_e_tag(out.copy_part_result().and_then(|r| r.e_tag()).map(str::to_string)).build()),
                Err(e) => {
                    self.abort_upload(to, &upload_id, &e).await;
                    return Err(e);
                }
            }
        }
        self.complete_upload(to, &upload_id, parts, size).await
    }

    /// Uploads the parts, `PARTS_IN_FLIGHT` at a time, each streamed from its range of the file.
    async fn upload_parts(&self, key: &str, upload_id: &str, file: &Path, size: u64) -> Result<Vec<CompletedPart>, TargetError> {
        let part_size = part_size_for(self.part_size.unwrap_or(FILE_PART), size);
        let count = size.div_ceil(part_size);
        let sem = Arc::new(tokio::sync::Semaphore::new(PARTS_IN_FLIGHT));
        let mut tasks = tokio::task::JoinSet::new();
        let mut parts = Vec::with_capacity(count as usize);
        let joined = |r: Result<Result<CompletedPart, TargetError>, tokio::task::JoinError>| {
            r.map_err(|e| TargetError::transient(format!("part upload task: {e}")))?
        };
        for i in 0..count {
            let permit = sem.clone().acquire_owned().await.expect("semaphore open");
            let offset = i * part_size;
            let len = part_size.min(size - offset);
            let (client, bucket, key, upload_id, file) =
                (self.client.clone(), self.bucket.clone(), key.to_string(), upload_id.to_string(), file.to_path_buf());
            tasks.spawn(async move {
                let _permit = permit;
                let body = ByteStream::read_from()
                    .path(&file)
                    .offset(offset)
                    .length(Length::Exact(len))
                    .build()
                    .await
                    .map_err(|e| TargetError::transient(format!("reading {}: {e}", file.display())))?;
                upload_part(&client, &bucket, &key, &upload_id, (i + 1) as i32, body, len).await
            });
            // Fail fast: a failed part stops the upload (dropping `tasks` aborts the rest).
            while let Some(done) = tasks.try_join_next() {
                parts.push(joined(done)?);
            }
        }
        while let Some(done) = tasks.join_next().await {
            parts.push(joined(done)?);
        }
        parts.sort_by_key(|p| p.part_number());
        Ok(parts)
    }
}

impl Target for S3Target {
    /// For narinfos of a bucket small enough to list, the answer comes from a listing made
    /// at most [`LIST_TTL`] ago (one request for the whole closure of a first push);
    /// otherwise, and for other keys, a HEAD request. A narinfo written by someone else
    /// after the listing is uploaded again: the same content, no harm. Our own writes are added
    /// to the listing as they are acknowledged.
    fn exists<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, TargetError>> {
        Box::pin(async move {
            if key.ends_with(".narinfo") && !key.contains('/') {
                let mut listing = self.listing.lock().await;
                let forgotten = self.listing_stale.swap(false, std::sync::atomic::Ordering::Relaxed);
                let stale = match &*listing {
                    None => true,
                    Some(Some(l)) => forgotten || l.at.elapsed() > LIST_TTL,
                    Some(None) => false,
                };
                if stale {
                    *listing = Some(self.list_narinfos().await?);
                }
                if let Some(Some(l)) = &*listing {
                    return Ok(l.keys.contains(key));
                }
            }
            let what = format!("checking {key}");
            match answered(&what, 0, self.client.head_object().bucket(&self.bucket).key(key).send()).await? {
                Ok(_) => Ok(true),
                Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => Ok(false),
                // The answer to a HEAD has no body to say why it refuses: a GET's has.
                Err(e) if e.raw_response().is_some_and(|r| r.status().is_client_error()) => self.get_object(key).await.map(|o| o.is_some()),
                Err(e) => Err(classify(&what, e)),
            }
        })
    }

    fn put<'a>(&'a self, key: &'a str, body: Body, content_type: &'static str) -> BoxFuture<'a, Result<(), TargetError>> {
        Box::pin(async move {
            let encoding = if key.ends_with(".narinfo") {
                self.narinfo_encoding
            } else if key.ends_with(".ls") {
                self.ls_encoding
            } else {
                None
            };
            match (encoding, body) {
                (Some(e), Body::Bytes(b)) => {
                    let encoded = encode(e, &b).map_err(|err| TargetError::transient(format!("compressing {key} ({}): {err}", e.name())))?;
                    self.put_with(key, Body::Bytes(encoded), content_type, Some(e.name())).await?
                }
                (_, body) => self.put_with(key, body, content_type, None).await?,
            }
            // What we wrote is there: the listing must not send us to upload it again.
            if let Some(Some(l)) = &mut *self.listing.lock().await {
                l.keys.insert(key.to_string());
            }
            Ok(())
        })
    }

    /// Multipart uploads stream, for objects above `multipart-threshold` when one is set;
    /// without them (`multipart-upload=false`) objects go whole.
    fn stream_part_size(&self, size_hint: u64) -> Option<u64> {
        let above = self.threshold.is_none_or(|t| size_hint > t);
        (self.multipart && above).then(|| part_size_for(self.part_size.unwrap_or(STREAM_PART), size_hint))
    }

    /// A multipart upload whose parts go up as the chunks arrive; aborted on every failure,
    /// the writer's included.
    fn put_streamed<'a>(&'a self, key: &'a str, mut chunks: tokio::sync::mpsc::Receiver<Chunk>, content_type: &'static str) -> BoxFuture<'a, Result<u64, TargetError>> {
        Box::pin(async move {
            let upload_id = self.create_upload(key, content_type, None).await?;
            let (parts, size) = match self.stream_parts(key, &upload_id, &mut chunks).await {
                Ok(p) => p,
                Err(e) => {
                    self.abort_upload(key, &upload_id, &e).await;
                    return Err(e);
                }
            };
            self.complete_upload(key, &upload_id, parts, size).await?;
            Ok(size)
        })
    }

    /// CopyObject (in ranges above [`copy_limit`]), then DeleteObject of `from`. A store
    /// that does not implement the copy gets the object read back and uploaded again (said
    /// once in the log). A delete that fails is only logged: `to` is whole, and the leftover
    /// is a copy under narq's own prefix.
    fn rename<'a>(&'a self, from: &'a str, to: &'a str, size: u64, content_type: &'static str) -> BoxFuture<'a, Result<(), TargetError>> {
        use std::sync::atomic::Ordering::Relaxed;
        Box::pin(async move {
            if !self.copies_on_server.load(Relaxed) {
                self.copy_through(from, to, size, content_type).await?;
            } else if let Err(e) = self.server_copy(from, to, size, content_type).await {
                if !e.unsupported {
                    return Err(e);
                }
                if self.copies_on_server.swap(false, Relaxed) {
                    tracing::warn!("{e}: NARs are copied to their keys through this machine instead (read back and uploaded again)");
                }
                self.copy_through(from, to, size, content_type).await?;
            }
            let what = format!("deleting {from}");
            match answered(&what, 0, self.client.delete_object().bucket(&self.bucket).key(from).send()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(key = from, "{}", classify(&what, e)),
                Err(e) => tracing::warn!(key = from, "{e}"),
            }
            Ok(())
        })
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn forget_listing(&self) {
        self.listing_stale.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// A first page; if there are more, the rest in ranges ([`list_bounds`]), `jobs` at a
    /// time: a cache of a million objects is listed in a few seconds instead of minutes.
    fn list_all<'a>(&'a self, jobs: usize, pages: tokio::sync::mpsc::Sender<Vec<Object>>) -> BoxFuture<'a, Result<u64, TargetError>> {
        Box::pin(async move {
            let (first, more) = self.list_page(None, None).await?;
            let mut n = first.len() as u64;
            let last = first.last().map(|o| o.key.clone());
            if pages.send(first).await.is_err() {
                return Ok(n);
            }
            let (Some(last), true) = (last, more.is_some()) else { return Ok(n) };
            let mut after = vec![last.clone()];
            after.extend(list_bounds().into_iter().filter(|b| *b > last));
            let ranges: Vec<(String, Option<String>)> = after.iter().enumerate().map(|(i, a)| (a.clone(), after.get(i + 1).cloned())).collect();
            let counts = crate::par::try_concurrently(ranges, jobs.max(1), |(after, upto)| self.list_range(after, upto, &pages)).await?;
            n += counts.iter().sum::<u64>();
            Ok(n)
        })
    }

    fn calls(&self) -> Calls {
        self.calls.get()
    }

    fn size_of<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<u64>, TargetError>> {
        Box::pin(async move {
            let what = format!("checking {key}");
            match answered(&what, 0, self.client.head_object().bucket(&self.bucket).key(key).send()).await? {
                Ok(out) => Ok(Some(out.content_length().unwrap_or(0).max(0) as u64)),
                Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => Ok(None),
                Err(e) => Err(classify(&what, e)),
            }
        })
    }

    /// ListObjectsV2, a page of up to 1,000 keys at a time.
    fn list<'a>(&'a self, prefix: &'a str, each: &'a mut (dyn FnMut(Object) + Send)) -> BoxFuture<'a, Result<u64, TargetError>> {
        Box::pin(async move {
            let what = format!("listing {prefix:?} in the bucket");
            let (mut token, mut n) = (None, 0);
            loop {
                let list = self.client.list_objects_v2().bucket(&self.bucket).prefix(prefix).set_continuation_token(token.take()).send();
                let out = answered(&what, 0, list).await?.map_err(|e| classify(&what, e))?;
                for o in out.contents() {
                    let Some(key) = o.key() else { continue };
                    let last_modified = o.last_modified().and_then(|t| std::time::SystemTime::try_from(*t).ok());
                    each(Object { key: key.to_string(), size: o.size().unwrap_or(0).max(0) as u64, last_modified, etag: o.e_tag().map(str::to_string) });
                    n += 1;
                }
                match out.next_continuation_token() {
                    // A server that hands back the token it was given would list forever.
                    Some(t) if out.continuation_token() == Some(t) => {
                        return Err(TargetError::transient(format!("{what}: the server repeated its continuation token")))
                    }
                    Some(t) if out.is_truncated() == Some(true) => token = Some(t.to_string()),
                    _ => return Ok(n),
                }
            }
        })
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, TargetError>> {
        Box::pin(async move {
            let Some(out) = self.get_object(key).await? else { return Ok(None) };
            let size = out.content_length().unwrap_or(0).max(0) as u64;
            if size > MAX_GET {
                return Err(TargetError::transient(format!("{key}: {size} bytes, more than get reads ({MAX_GET})")));
            }
            let what = format!("reading {key}");
            let encoding = out.content_encoding().map(str::to_string);
            let body = answered(&what, size, out.body.collect()).await?.map_err(|e| TargetError::transient(format!("{what}: {}", one_line(&e))))?;
            decode(encoding.as_deref(), body.to_vec()).map(Some).map_err(|e| TargetError::transient(format!("{what}: {e}")))
        })
    }

    fn open_read<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Reader>, TargetError>> {
        Box::pin(async move { Ok(self.get_object(key).await?.map(|out| Box::new(out.body.into_async_read()) as Reader)) })
    }

    /// DeleteObjects, [`DELETE_BATCH`] keys a request; a key any batch could not delete is an
    /// error naming it.
    fn delete<'a>(&'a self, keys: &'a [String]) -> BoxFuture<'a, Result<(), TargetError>> {
        use aws_sdk_s3::types::{Delete, ObjectIdentifier};
        Box::pin(async move {
            for batch in keys.chunks(DELETE_BATCH) {
                let ids = batch
                    .iter()
                    .map(|k| ObjectIdentifier::builder().key(k).build())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| TargetError::transient(format!("deleting: {e}")))?;
                let delete = Delete::builder().set_objects(Some(ids)).quiet(true).build().map_err(|e| TargetError::transient(format!("deleting: {e}")))?;
                let what = format!("deleting {} objects", batch.len());
                // Sent once: a collector checks its heartbeat before each delete request
                // (`cache::collection`), and a retry would go out unchecked.
                let once = aws_sdk_s3::config::Builder::new().retry_config(aws_sdk_s3::config::retry::RetryConfig::standard().with_max_attempts(1));
                let send = self.client.delete_objects().bucket(&self.bucket).delete(delete).customize().config_override(once);
                let send = if self.md5_deletes { send.mutate_request(content_md5_instead) } else { send };
                let out = answered(&what, 0, send.send()).await?.map_err(|e| classify(&what, e))?;
                // Deleted narinfos must not be reported present by the listing.
                if let Some(Some(l)) = &mut *self.listing.lock().await {
                    for k in batch {
                        l.keys.remove(k);
                    }
                }
                if let Some(e) = out.errors().first() {
                    return Err(TargetError::transient(format!(
                        "{what}: {} not deleted, e.g. {}: {} {}",
                        out.errors().len(),
                        e.key().unwrap_or(""),
                        e.code().unwrap_or(""),
                        e.message().unwrap_or("")
                    )));
                }
            }
            Ok(())
        })
    }

    /// ListMultipartUploads, page by page.
    fn list_incomplete<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<Incomplete>, TargetError>> {
        Box::pin(async move {
            let what = format!("listing the incomplete uploads of {prefix:?}");
            let (mut found, mut markers) = (Vec::new(), (None, None));
            loop {
                let list = self
                    .client
                    .list_multipart_uploads()
                    .bucket(&self.bucket)
                    .prefix(prefix)
                    .set_key_marker(markers.0.take())
                    .set_upload_id_marker(markers.1.take())
                    .send();
                let out = answered(&what, 0, list).await?.map_err(|e| {
                    // Keys that may not list uploads skip them, as stores that cannot.
                    let denied = e.as_service_error().and_then(|s| s.code()) == Some("AccessDenied");
                    let e = classify(&what, e);
                    TargetError { unsupported: e.unsupported || denied, ..e }
                })?;
                for u in out.uploads() {
                    let (Some(key), Some(id)) = (u.key(), u.upload_id()) else { continue };
                    let started = u.initiated().and_then(|t| std::time::SystemTime::try_from(*t).ok());
                    found.push(Incomplete { key: key.to_string(), id: id.to_string(), started });
                }
                if out.is_truncated() != Some(true) || out.next_key_marker().is_none() {
                    return Ok(found);
                }
                if (out.next_key_marker(), out.next_upload_id_marker()) == (out.key_marker(), out.upload_id_marker()) {
                    return Err(TargetError::transient(format!("{what}: the server repeated its markers")));
                }
                markers = (out.next_key_marker().map(str::to_string), out.next_upload_id_marker().map(str::to_string));
            }
        })
    }

    fn abort_incomplete<'a>(&'a self, upload: &'a Incomplete) -> BoxFuture<'a, Result<(), TargetError>> {
        Box::pin(async move {
            let what = format!("aborting the multipart upload of {}", upload.key);
            let abort = self.client.abort_multipart_upload().bucket(&self.bucket).key(&upload.key).upload_id(&upload.id).send();
            match answered(&what, 0, abort).await? {
                Ok(_) => Ok(()),
                Err(e) if e.as_service_error().and_then(|s| s.code()) == Some("NoSuchUpload") => Ok(()),
                Err(e) => {
                    // Keys that may not abort uploads leave them, as stores that cannot.
                    let denied = e.as_service_error().and_then(|s| s.code()) == Some("AccessDenied");
                    let e = classify(&what, e);
                    Err(TargetError { unsupported: e.unsupported || denied, ..e })
                }
            }
        })
    }

    fn log_encoding(&self) -> Option<&'static str> {
        self.log_encoding.map(Encoding::name)
    }

    /// S3 has no locks: collectors are judged by their heartbeats.
    fn fence<'a>(&'a self, _key: &'a str) -> BoxFuture<'a, Result<Option<super::Fence>, TargetError>> {
        Box::pin(async { Ok(None) })
    }

    fn fenced<'a>(&'a self, _key: &'a str) -> BoxFuture<'a, Result<Option<bool>, TargetError>> {
        Box::pin(async { Ok(None) })
    }

    fn get_versioned<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<(Vec<u8>, String)>, TargetError>> {
        Box::pin(async move {
            let Some(out) = self.get_object(key).await? else { return Ok(None) };
            let etag = out.e_tag().unwrap_or_default().to_string();
            let size = out.content_length().unwrap_or(0).max(0) as u64;
            if size > MAX_GET {
                return Err(TargetError::transient(format!("{key}: {size} bytes, more than get reads ({MAX_GET})")));
            }
            let what = format!("reading {key}");
            let body = answered(&what, size, out.body.collect()).await?.map_err(|e| TargetError::transient(format!("{what}: {}", one_line(&e))))?;
            Ok(Some((body.to_vec(), etag)))
        })
    }

    /// PutObject with `If-Match`: 412 (or 404, 409 for a concurrent write) is a changed object.
    fn put_if_version<'a>(&'a self, key: &'a str, body: Vec<u8>, content_type: &'static str, version: &'a str) -> BoxFuture<'a, Result<bool, TargetError>> {
        Box::pin(async move {
            let what = format!("uploading {key} if unchanged");
            let len = body.len() as i64;
            let send = self.client.put_object().bucket(&self.bucket).key(key).content_type(content_type).content_length(len).if_match(version).body(ByteStream::from(body)).send();
            match answered(&what, len as u64, send).await? {
                Ok(_) => Ok(true),
                Err(e) if e.raw_response().is_some_and(|r| matches!(r.status().as_u16(), 404 | 409 | 412)) => Ok(false),
                Err(e) => Err(classify(&what, e)),
            }
        })
    }

    /// Probed once: a put with a wrong `If-Match` must be refused (some servers ignore it).
    fn conditional_puts<'a>(&'a self) -> BoxFuture<'a, Result<Result<(), String>, TargetError>> {
        Box::pin(async move {
            self.conditional
                .get_or_try_init(|| async {
                    let key = format!("{}if-match-{}", super::PROBE_PREFIX, std::process::id());
                    self.put_with(&key, Body::Bytes(b"probe".to_vec()), super::JSON_TYPE, None).await?;
                    let what = format!("uploading {key} if unchanged");
                    let send = self.client.put_object().bucket(&self.bucket).key(&key).if_match("\"narq-no-such-version\"").body(ByteStream::from_static(b"probe 2")).send();
                    let verdict = match answered(&what, 7, send).await? {
                        Ok(_) => Err("the server ignores If-Match".to_string()),
                        Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 412) => Ok(()),
                        Err(e) if e.raw_response().is_some_and(|r| matches!(r.status().as_u16(), 400 | 405 | 501)) => {
                            Err(format!("the server does not take If-Match ({})", classify(&what, e)))
                        }
                        Err(e) => return Err(classify(&what, e)),
                    };
                    if let Err(e) = self.delete(std::slice::from_ref(&key)).await {
                        tracing::warn!("deleting the probe {key}: {e}");
                    }
                    Ok(verdict)
                })
                .await
                .cloned()
        })
    }

    fn put_encoded<'a>(&'a self, key: &'a str, body: Body, content_type: &'static str, encoding: &'static str) -> BoxFuture<'a, Result<(), TargetError>> {
        Box::pin(self.put_with(key, body, content_type, Some(encoding)))
    }
}

impl S3Target {
    /// One page of the whole bucket: after `start_after`, or where `token` says; the objects,
    /// and whether there are more.
    async fn list_page(&self, start_after: Option<String>, token: Option<String>) -> Result<(Vec<Object>, Option<String>), TargetError> {
        let what = "listing the bucket";
        let list = self.client.list_objects_v2().bucket(&self.bucket).set_start_after(start_after).set_continuation_token(token.clone()).send();
        let out = answered(what, 0, list).await?.map_err(|e| classify(what, e))?;
        let objects = out
            .contents()
            .iter()
            .filter_map(|o| {
                let last_modified = o.last_modified().and_then(|t| std::time::SystemTime::try_from(*t).ok());
                Some(Object { key: o.key()?.to_string(), size: o.size().unwrap_or(0).max(0) as u64, last_modified, etag: o.e_tag().map(str::to_string) })
            })
            .collect();
        let next = match out.next_continuation_token() {
            // A server that hands back the token it was given would list forever.
            Some(t) if token.as_deref() == Some(t) => return Err(TargetError::transient(format!("{what}: the server repeated its continuation token"))),
            Some(t) if out.is_truncated() == Some(true) => Some(t.to_string()),
            _ => None,
        };
        Ok((objects, next))
    }

    /// The keys after `after` and up to `upto` (to the end without), page by page to `pages`.
    async fn list_range(&self, after: String, upto: Option<String>, pages: &tokio::sync::mpsc::Sender<Vec<Object>>) -> Result<u64, TargetError> {
        let (mut start, mut token, mut n) = (Some(after), None, 0);
        loop {
            let (mut objects, next) = self.list_page(start.take(), token.take()).await?;
            let past = upto.as_ref().and_then(|u| objects.iter().position(|o| o.key > *u));
            if let Some(at) = past {
                objects.truncate(at);
            }
            n += objects.len() as u64;
            if pages.send(objects).await.is_err() || past.is_some() {
                return Ok(n);
            }
            match next {
                Some(t) => token = Some(t),
                None => return Ok(n),
            }
        }
    }

    /// GetObject; `None` for a missing key.
    async fn get_object(&self, key: &str) -> Result<Option<aws_sdk_s3::operation::get_object::GetObjectOutput>, TargetError> {
        let what = format!("reading {key}");
        match answered(&what, 0, self.client.get_object().bucket(&self.bucket).key(key).send()).await? {
            Ok(out) => Ok(Some(out)),
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) && e.as_service_error().and_then(|s| s.code()) != Some("NoSuchBucket") => Ok(None),
            Err(e) => Err(classify(&what, e)),
        }
    }

    async fn put_with(&self, key: &str, body: Body, content_type: &str, encoding: Option<&str>) -> Result<(), TargetError> {
        let (stream, len) = match body {
            Body::Bytes(b) => {
                let n = b.len() as i64;
                (ByteStream::from(b), n)
            }
            // `tmp` is removed when it goes out of scope, whatever the outcome.
            Body::File(tmp) => {
                let f = tmp.path();
                let size = std::fs::metadata(f).map_err(|e| TargetError::transient(format!("{}: {e}", f.display())))?.len();
                return if self.multipart && size > self.threshold.unwrap_or(self.part_size.unwrap_or(FILE_PART)) {
                    self.put_multipart(key, f, size, content_type, encoding).await
                } else {
                    match ByteStream::from_path(f).await {
                        Ok(s) => self.put_one(key, s, size as i64, content_type, encoding).await,
                        Err(e) => Err(TargetError::transient(format!("reading {}: {e}", f.display()))),
                    }
                };
            }
        };
        self.put_one(key, stream, len, content_type, encoding).await
    }

    async fn put_one(&self, key: &str, body: ByteStream, len: i64, content_type: &str, encoding: Option<&str>) -> Result<(), TargetError> {
        let what = format!("uploading {key}");
        let send = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .set_content_encoding(encoding.map(str::to_string))
            .set_storage_class(self.storage_class.clone())
            .content_length(len)
            .body(body)
            .send();
        answered(&what, len as u64, send).await?.map_err(|e| classify(&what, e))?;
        Ok(())
    }
}

/// The S3 client's retries of one request (`retry-attempts`, `retry-delay`,
/// `retry-max-delay`): exponential backoff with jitter, as Nix's.
fn retry_config(o: &S3Options) -> aws_sdk_s3::config::retry::RetryConfig {
    use std::time::Duration;
    aws_sdk_s3::config::retry::RetryConfig::standard()
        .with_max_attempts(o.retry.attempts)
        .with_initial_backoff(Duration::from_millis(o.retry.delay_ms.into()))
        .with_max_backoff(Duration::from_millis(o.retry.max_delay_ms.into()))
}

/// `data` with Content-Encoding `e`.
pub fn encode(e: Encoding, data: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::Write;
    match e {
        Encoding::Gzip => {
            let mut w = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            w.write_all(data)?;
            w.finish()
        }
        Encoding::Zstd => zstd::bulk::compress(data, 3),
    }
}

/// Undoes the `Content-Encoding` an object was stored with (what an HTTP client does by
/// itself; the SDK does not). At most [`MAX_GET`] bytes come out.
fn decode(encoding: Option<&str>, body: Vec<u8>) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let mut out = Vec::new();
    let read = match encoding.map(str::trim) {
        None | Some("" | "identity") => return Ok(body),
        Some("gzip" | "x-gzip") => flate2::read::GzDecoder::new(&body[..]).take(MAX_GET + 1).read_to_end(&mut out),
        Some("zstd") => zstd::stream::read::Decoder::new(&body[..]).and_then(|d| d.take(MAX_GET + 1).read_to_end(&mut out)),
        Some(e) => return Err(format!("stored with Content-Encoding {e:?}, which narq does not decode (gzip, zstd)")),
    };
    read.map_err(|e| format!("decoding its Content-Encoding: {e}"))?;
    if out.len() as u64 > MAX_GET {
        return Err(format!("more than {MAX_GET} bytes once decoded"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_round_trip_and_retries_follow_the_url() {
        for e in [Encoding::Gzip, Encoding::Zstd] {
            let text = b"building '/nix/store/x.drv'...\n".repeat(100);
            let enc = encode(e, &text).unwrap();
            assert!(enc.len() < text.len() / 5, "{e:?}");
            assert_eq!(decode(Some(e.name()), enc).unwrap(), text);
        }
        assert_eq!(decode(None, b"plain".to_vec()).unwrap(), b"plain");
        assert!(decode(Some("xz"), vec![1]).unwrap_err().contains("does not decode"));
        let url = crate::store_url::StoreUrl::parse("s3://b-1?retry-attempts=7&retry-delay=50&retry-max-delay=900").unwrap();
        let crate::store_url::Location::S3(o) = url.location else { panic!() };
        let r = retry_config(&o);
        assert_eq!((r.max_attempts(), r.initial_backoff().as_millis(), r.max_backoff().as_millis()), (7, 50, 900));
    }

    #[test]
    fn the_region_a_refusal_names() {
        let s3 = "The authorization header is malformed; the region 'us-east-1' is wrong; expecting 'eu-west-1'";
        assert_eq!(named_region(s3).as_deref(), Some("eu-west-1"));
        let garage = "Authorization header malformed, unexpected scope: '20261206/us-east-1/s3/aws4_request', expected: '20261206/garage/s3/aws4_request'";
        assert_eq!(named_region(garage).as_deref(), Some("garage"));
        assert_eq!(named_region("Authorization header malformed"), None);
    }

    #[test]
    fn part_size_keeps_within_10000_parts() {
        const MIB: u64 = 1 << 20;
        assert_eq!(part_size_for(16 * MIB, 100 * MIB), 16 * MIB);
        // ~156 GiB is where 16 MiB parts run out; beyond, parts grow in whole MiB.
        for size in [156 * 1024 * MIB, 157 * 1024 * MIB, 1024 * 1024 * MIB, 5 * 1024 * 1024 * MIB] {
            let part = part_size_for(16 * MIB, size);
            assert!(size.div_ceil(part) <= MAX_PARTS, "{size}: {part}");
            assert_eq!(part % MIB, 0);
        }
        assert_eq!(part_size_for(16 * MIB, 200 * 1024 * MIB), 21 * MIB);
    }
}
