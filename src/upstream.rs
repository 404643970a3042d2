//! Upstream binary caches (e.g. `https://cache.nixos.org`): a path one of them has is not
//! uploaded again. One GET of `<upstream>/<hash>.narinfo` per path (a narinfo is small, and
//! some S3-compatible servers refuse anonymous HEADs), remembered in the queue like any
//! other skipped path. An upstream that does not answer counts as not
//! having the path: uploading it is the safe side.

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use std::time::Duration;

use crate::nix::StorePath;

const TIMEOUT: Duration = Duration::from_secs(10);

pub struct Upstreams {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>,
    /// Base URLs, without a trailing '/'.
    urls: Vec<String>,
}

impl Upstreams {
    pub fn new(urls: &[String]) -> std::io::Result<Self> {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(rustls::crypto::ring::default_provider())?
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(hyper_util::rt::TokioExecutor::new()).build(https);
        Ok(Upstreams { client, urls: urls.to_vec() })
    }

    /// The first upstream that has `path`, if any.
    pub async fn find(&self, path: &StorePath) -> Option<&str> {
        for url in &self.urls {
            let uri = format!("{url}/{}.narinfo", path.hash_part());
            let req = match hyper::Request::get(&uri).body(Empty::new()) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(upstream = %url, "bad upstream URL: {e}");
                    continue;
                }
            };
            match tokio::time::timeout(TIMEOUT, self.client.request(req)).await {
                Ok(Ok(resp)) if resp.status().is_success() => return Some(url),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::debug!(upstream = %url, "upstream check failed: {e}"),
                Err(_) => tracing::debug!(upstream = %url, "upstream check timed out"),
            }
        }
        None
    }
}
