//! Upstream binary caches (e.g. `https://cache.nixos.org`): a path one of them has is not
//! uploaded again. One GET of `<upstream>/<hash>.narinfo` per path (a narinfo is small, and
//! some S3-compatible servers refuse anonymous HEADs), remembered in the queue like any
//! other skipped path. An upstream has a path only if it answers with a narinfo for that
//! very path: a `200` with anything else (an error page, a captive portal) is a no.
//! An upstream that does not answer counts as not having the path: uploading it is the
//! safe side.
//!
//! All upstreams are asked at once, so one slow upstream does not delay the answer of the
//! others; one that times out is not asked again for [`SKIP_AFTER_TIMEOUT`], since paths go
//! in dependency order and each would otherwise wait the whole timeout.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::nix::{NarInfo, StorePath};

pub type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// An http(s) client for GETs, with the system's root certificates (`narq doctor` uses it too).
pub fn http_client() -> std::io::Result<HttpClient> {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_native_roots(rustls::crypto::ring::default_provider())?
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(hyper_util::rt::TokioExecutor::new()).build(https))
}

/// Longest wait for one upstream's answer (headers and body).
const TIMEOUT: Duration = Duration::from_secs(5);
/// An answer slower than this is logged at warn, naming the upstream.
const SLOW: Duration = Duration::from_secs(1);
/// How long an upstream that timed out is left out.
const SKIP_AFTER_TIMEOUT: Duration = Duration::from_secs(60);
/// A narinfo is a few hundred bytes; a larger answer is not one.
const MAX_NARINFO: usize = 64 << 10;
/// Upstream requests in flight at once, over all workers.
const MAX_CHECKS: usize = 16;

pub struct Upstreams {
    client: HttpClient,
    /// Base URLs, without a trailing '/'.
    urls: Vec<Arc<str>>,
    /// Per upstream (same order as `urls`): left out until then, after a timeout.
    skip_until: Arc<Mutex<Vec<Option<Instant>>>>,
    /// Bounds the requests in flight ([`MAX_CHECKS`]).
    checks: Arc<tokio::sync::Semaphore>,
}

/// One upstream's answer about one path.
enum Answer {
    Has,
    HasNot,
    TimedOut,
}

impl Upstreams {
    pub fn new(urls: &[String]) -> std::io::Result<Self> {
        Ok(Upstreams {
            client: http_client()?,
            urls: urls.iter().map(|u| Arc::from(u.trim_end_matches('/'))).collect(),
            skip_until: Arc::new(Mutex::new(vec![None; urls.len()])),
            checks: Arc::new(tokio::sync::Semaphore::new(MAX_CHECKS)),
        })
    }

    /// An upstream that has `path`, if any: the first to say so.
    pub async fn find(&self, path: &StorePath) -> Option<&str> {
        let mut asks = tokio::task::JoinSet::new();
        let now = Instant::now();
        for (i, url) in self.urls.iter().enumerate() {
            if self.skip_until.lock().unwrap_or_else(|e| e.into_inner())[i].is_some_and(|t| t > now) {
                continue;
            }
            let (client, url, path, checks) = (self.client.clone(), url.clone(), path.clone(), self.checks.clone());
            asks.spawn(async move {
                let Ok(_permit) = checks.acquire_owned().await else { return (i, Answer::HasNot) };
                (i, ask(&client, &url, &path).await)
            });
        }
        // Dropping `asks` on return aborts the questions still open.
        while let Some(done) = asks.join_next().await {
            match done {
                Ok((i, Answer::Has)) => return Some(&self.urls[i]),
                Ok((i, Answer::TimedOut)) => {
                    self.skip_until.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(Instant::now() + SKIP_AFTER_TIMEOUT);
                    tracing::warn!(
                        upstream = %self.urls[i],
                        "upstream {} did not answer within {} s; not asked for {} s, paths are uploaded meanwhile",
                        self.urls[i],
                        TIMEOUT.as_secs(),
                        SKIP_AFTER_TIMEOUT.as_secs()
                    );
                }
                Ok((_, Answer::HasNot)) => {}
                Err(e) => tracing::warn!("upstream check: {e}"),
            }
        }
        None
    }
}

/// Asks `url` for the narinfo of `path`.
async fn ask(client: &HttpClient, url: &str, path: &StorePath) -> Answer {
    let uri = format!("{url}/{}.narinfo", path.hash_part());
    let req = match hyper::Request::get(&uri).body(Empty::new()) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(upstream = %url, "bad upstream URL: {e}");
            return Answer::HasNot;
        }
    };
    let start = Instant::now();
    let fetch = async {
        let resp = client.request(req).await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Ok(None);
        }
        let body = Limited::new(resp.into_body(), MAX_NARINFO).collect().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(Some(body.to_bytes()))
    };
    let result = tokio::time::timeout(TIMEOUT, fetch).await;
    let took = start.elapsed();
    if took >= SLOW && result.is_ok() {
        tracing::warn!(upstream = %url, took_ms = took.as_millis() as u64, "upstream {url} took {} ms to answer for {path}", took.as_millis());
    }
    match result {
        Err(_) => Answer::TimedOut,
        Ok(Err(e)) => {
            tracing::debug!(upstream = %url, "upstream check failed: {e}");
            Answer::HasNot
        }
        Ok(Ok(None)) => Answer::HasNot,
        Ok(Ok(Some(body))) => match std::str::from_utf8(&body).map_err(|e| e.to_string()).and_then(|s| NarInfo::parse(s).map_err(|e| e.to_string())) {
            Ok(ni) if ni.info.path == *path => Answer::Has,
            Ok(ni) => {
                tracing::warn!(upstream = %url, "upstream {url} answered for {path} with the narinfo of {}; uploading it", ni.info.path);
                Answer::HasNot
            }
            Err(e) => {
                tracing::warn!(upstream = %url, "upstream {url} answered for {path} with no valid narinfo ({e}); uploading it");
                Answer::HasNot
            }
        },
    }
}
