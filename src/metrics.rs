//! What the daemon counts: the uploads in flight with their progress (for `narq status`),
//! and Prometheus metrics served at `/metrics` when `metrics-listen` is set.
//!
//! Counters and histograms live here, in memory, and count from the daemon's start, as
//! Prometheus expects (`rate()` handles restarts). Levels (queue depth, spool, pause) are
//! read from the queue and the dispatcher when scraped ([`Levels`]), so they cannot drift
//! from what `narq status` says.
//!
//! # Why prometheus-client
//! It is the Prometheus project's own Rust client: typed metrics, its text encoder
//! (OpenMetrics, which Prometheus scrapes natively), and with default features off only
//! `dtoa`, `itoa` and `parking_lot` besides its derive crate. The scrape endpoint is served
//! with `hyper`, which the S3 client links already.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::protocol::Upload;
use crate::outcome::{Outcome, UploadError};
use crate::queue::{Item, Kind};

/// One label, as a [`Family`] keys its metrics.
type Label = [(&'static str, &'static str); 1];

/// Every upload outcome and failure kind, so that each series exists (at 0) from the start:
/// an alert on `increase(narq_failures_total[1h]) > 0` must not wait for the first failure.
const FAILURE_KINDS: [&str; 3] = ["transient", "permanent", "store"];
const SKIP_REASONS: [&str; 3] = ["in_cache", "upstream", "excluded"];
const PAUSE_CAUSES: [&str; 2] = ["store_unavailable", "store_refuses"];
/// The requests the hook sends (`missing`, `enqueue`, `report`) and the CLI's.
const OPS: [&str; 8] = ["missing", "roots", "enqueue", "report", "status", "wait", "dropped", "recheck"];

/// The daemon's counters and the uploads in flight; shared by the workers, the socket
/// server and the scrape endpoint.
pub struct Metrics {
    /// What `/metrics` encodes; holds clones of the handles below (they share their values).
    registry: Registry,
    requests: Family<Label, Counter>,
    uploaded_paths: Counter,
    uploaded_bytes: Counter,
    uploaded_logs: Counter,
    skipped_paths: Family<Label, Counter>,
    failures: Family<Label, Counter>,
    /// NAR bytes read by uploads, finished or not: progress, rate and ETA for clients.
    nar_read: Counter,
    upload_seconds: Histogram,
    upload_bytes: Histogram,
    queue_depth: Gauge,
    pending_bytes: Gauge,
    in_flight: Gauge,
    spooled: Gauge,
    failed_items: Gauge,
    paused: Family<Label, Gauge>,
    /// Whether the last store failure needs a person (credentials, bucket): the pause cause.
    store_refuses: AtomicBool,
    /// The uploads in flight, by item key.
    uploading: Mutex<BTreeMap<String, Arc<InFlight>>>,
}

/// An upload in flight: the uploader adds what it reads ([`InFlight::add`]).
pub struct InFlight {
    total: u64,
    done: AtomicU64,
    /// The daemon-wide count, a clone of [`Metrics`]' (shares its value).
    nar_read: Counter,
}

impl InFlight {
    /// `n` more NAR bytes read.
    pub fn add(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
        self.nar_read.inc_by(n);
    }
}

/// Removes its upload from the in-flight list when the upload ends, however it ends.
pub struct Tracked<'a> {
    metrics: &'a Metrics,
    key: String,
    /// What the uploader counts into.
    pub progress: Arc<InFlight>,
}

impl Drop for Tracked<'_> {
    fn drop(&mut self) {
        self.metrics.uploading.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.key);
    }
}

/// The levels read at each scrape.
#[derive(Debug, Default, Clone)]
pub struct Levels {
    pub pending: u64,
    pub pending_bytes: u64,
    pub in_flight: u64,
    pub spooled: u64,
    pub failed: u64,
    /// Whether uploads are paused now.
    pub paused: bool,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("narq");
        let requests = Family::<Label, Counter>::default();
        registry.register("requests", "Requests on the socket, by operation (the hook sends missing, enqueue and report)", requests.clone());
        let uploaded_paths = Counter::default();
        registry.register("uploaded_paths", "Store paths uploaded (NAR and narinfo)", uploaded_paths.clone());
        let uploaded_bytes = Counter::default();
        registry.register_with_unit("uploaded", "Bytes written to the store (compressed NARs and build logs)", Unit::Bytes, uploaded_bytes.clone());
        let uploaded_logs = Counter::default();
        registry.register("uploaded_logs", "Build logs uploaded", uploaded_logs.clone());
        let skipped_paths = Family::<Label, Counter>::default();
        registry.register("skipped_paths", "Store paths not uploaded: already in the cache, or in an upstream cache", skipped_paths.clone());
        let failures = Family::<Label, Counter>::default();
        registry.register(
            "failures",
            "Failed upload attempts: transient (retried), permanent (the item failed), store (uploads pause)",
            failures.clone(),
        );
        let nar_read = Counter::default();
        registry.register_with_unit("nar_read", "NAR bytes read from the Nix store by uploads", Unit::Bytes, nar_read.clone());
        // 10 ms to ~3 h, and 1 KiB to 16 GiB: a path of a few bytes to a large closure member.
        let upload_seconds = Histogram::new(exponential_buckets(0.01, 4.0, 10));
        registry.register_with_unit("upload_duration", "Time to upload one store path, NAR and narinfo", Unit::Seconds, upload_seconds.clone());
        let upload_bytes = Histogram::new(exponential_buckets(1024.0, 4.0, 13));
        registry.register_with_unit("upload_size", "Compressed NAR size of each uploaded path", Unit::Bytes, upload_bytes.clone());
        let queue_depth = Gauge::default();
        registry.register("queue_depth", "Items (paths and build logs) waiting to be uploaded, in flight included", queue_depth.clone());
        let pending_bytes = Gauge::default();
        registry.register_with_unit("queue_nar", "NAR bytes of the paths waiting to be uploaded", Unit::Bytes, pending_bytes.clone());
        let in_flight = Gauge::default();
        registry.register("in_flight", "Uploads running now", in_flight.clone());
        let spooled = Gauge::default();
        registry.register("spooled_requests", "Requests in the spool directory, written while the daemon was away", spooled.clone());
        let failed_items = Gauge::default();
        registry.register("failed_items", "Items failed for good (narq status lists them; narq retry or push re-queues)", failed_items.clone());
        let paused = Family::<Label, Gauge>::default();
        registry.register("paused", "1 while uploads are paused, labelled with the cause", paused.clone());
        for kind in FAILURE_KINDS {
            failures.get_or_create_owned(&[("kind", kind)]);
        }
        for reason in SKIP_REASONS {
            skipped_paths.get_or_create_owned(&[("reason", reason)]);
        }
        for cause in PAUSE_CAUSES {
            paused.get_or_create_owned(&[("cause", cause)]);
        }
        for op in OPS {
            requests.get_or_create_owned(&[("op", op)]);
        }
        Metrics {
            registry,
            requests,
            uploaded_paths,
            uploaded_bytes,
            uploaded_logs,
            skipped_paths,
            failures,
            nar_read,
            upload_seconds,
            upload_bytes,
            queue_depth,
            pending_bytes,
            in_flight,
            spooled,
            failed_items,
            paused,
            store_refuses: AtomicBool::new(false),
            uploading: Mutex::default(),
        }
    }

    /// A request with this `op` arrived on the socket.
    pub fn request(&self, op: &'static str) {
        self.requests.get_or_create(&[("op", op)]).inc();
    }

    /// `item` starts uploading; it is in flight until the result is dropped.
    pub fn track(&self, item: &Item) -> Tracked<'_> {
        let total = match &item.kind {
            Kind::Nar(info) => info.nar_size,
            Kind::Log(_) | Kind::Realisation(_) => 0,
        };
        let progress = Arc::new(InFlight { total, done: AtomicU64::new(0), nar_read: self.nar_read.clone() });
        self.uploading.lock().unwrap_or_else(|e| e.into_inner()).insert(item.key.clone(), progress.clone());
        Tracked { metrics: self, key: item.key.clone(), progress }
    }

    /// Counts how the upload of `item` ended, `took` after it started.
    pub fn finished(&self, item: &Item, result: Result<&Outcome, &UploadError>, took: Duration) {
        let path = matches!(item.kind, Kind::Nar(_));
        match result {
            Ok(Outcome::Uploaded { bytes }) => {
                self.uploaded_bytes.inc_by(*bytes);
                match item.kind {
                    Kind::Nar(_) => {
                        self.uploaded_paths.inc();
                        self.upload_seconds.observe(took.as_secs_f64());
                        self.upload_bytes.observe(*bytes as f64);
                    }
                    Kind::Log(_) => {
                        self.uploaded_logs.inc();
                    }
                    Kind::Realisation(_) => {}
                }
            }
            Ok(Outcome::Present) if path => self.skip("in_cache"),
            Ok(Outcome::Upstream) => self.skip("upstream"),
            Ok(Outcome::Excluded(_)) if path => self.skip("excluded"),
            Ok(_) => {}
            Err(UploadError::Transient(_)) => self.fail("transient"),
            Err(UploadError::Permanent(_)) => self.fail("permanent"),
            Err(UploadError::Target(e)) => self.store_failed(e),
        }
    }

    /// The store failed (uploads pause); `e` says whether it needs a person.
    pub fn store_failed(&self, e: &crate::storage::TargetError) {
        self.store_refuses.store(e.config, Ordering::Relaxed);
        self.fail("store");
    }

    fn skip(&self, reason: &'static str) {
        self.skipped_paths.get_or_create(&[("reason", reason)]).inc();
    }

    fn fail(&self, kind: &'static str) {
        self.failures.get_or_create(&[("kind", kind)]).inc();
    }

    /// NAR bytes read by uploads since the daemon started.
    pub fn nar_bytes_read(&self) -> u64 {
        self.nar_read.get()
    }

    /// The uploads in flight and how far each has got, in key order.
    pub fn uploading(&self) -> Vec<Upload> {
        let map = self.uploading.lock().unwrap_or_else(|e| e.into_inner());
        map.iter().map(|(k, f)| Upload { item: k.clone(), done: f.done.load(Ordering::Relaxed), total: f.total }).collect()
    }

    /// The metrics in the text exposition format, with `levels` as the gauges' values.
    pub fn render(&self, levels: &Levels) -> String {
        let set = |g: &Gauge, v: u64| g.set(i64::try_from(v).unwrap_or(i64::MAX));
        set(&self.queue_depth, levels.pending);
        set(&self.pending_bytes, levels.pending_bytes);
        set(&self.in_flight, levels.in_flight);
        set(&self.spooled, levels.spooled);
        set(&self.failed_items, levels.failed);
        let cause = match self.store_refuses.load(Ordering::Relaxed) {
            true => PAUSE_CAUSES[1],
            false => PAUSE_CAUSES[0],
        };
        for c in PAUSE_CAUSES {
            self.paused.get_or_create(&[("cause", c)]).set(i64::from(levels.paused && c == cause));
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// What the scrape endpoint reads at each request.
pub type LevelsFn = Arc<dyn Fn() -> Levels + Send + Sync>;

/// Binds `addr` for [`serve`]; the error names the address.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    use anyhow::Context;
    tokio::net::TcpListener::bind(addr).await.with_context(|| format!("metrics-listen {addr}: binding"))
}

/// Serves `GET /metrics` on `listener` until the task is dropped; other paths are 404.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>, levels: LevelsFn) {
    use http_body_util::Full;
    use hyper::{body::Bytes, Response, StatusCode};
    let mut failures = 0u32;
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => {
                failures = 0;
                s
            }
            Err(e) => {
                // Out of file descriptors, most likely: pause instead of spinning.
                if failures == 0 {
                    tracing::warn!("metrics: accept: {e}");
                }
                failures = failures.saturating_add(1);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (metrics, levels) = (metrics.clone(), levels.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let (metrics, levels) = (metrics.clone(), levels.clone());
                async move {
                    let resp = if req.uri().path() != "/metrics" {
                        Response::builder().status(StatusCode::NOT_FOUND).body(Full::new(Bytes::from_static(b"try /metrics\n")))
                    } else if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
                        Response::builder().status(StatusCode::METHOD_NOT_ALLOWED).body(Full::new(Bytes::new()))
                    } else {
                        // The levels read SQLite: off the async threads.
                        let text = tokio::task::spawn_blocking(move || metrics.render(&levels())).await.unwrap_or_default();
                        Response::builder()
                            .header("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")
                            .body(Full::new(Bytes::from(text)))
                    };
                    resp.map_err(|e| std::io::Error::other(e.to_string()))
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let conn = hyper::server::conn::http1::Builder::new().timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(Duration::from_secs(10)).serve_connection(io, service);
            // A scraper that stalls is cut off: it must not pin a task and a socket.
            if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(30), conn).await {
                tracing::debug!("metrics: {e}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_exists_from_the_start_and_levels_are_rendered() {
        let m = Metrics::new();
        let text = m.render(&Levels { pending: 3, paused: true, ..Levels::default() });
        for line in [
            "narq_queue_depth 3",
            "narq_failures_total{kind=\"store\"} 0",
            "narq_paused{cause=\"store_unavailable\"} 1",
            "narq_paused{cause=\"store_refuses\"} 0",
            "narq_requests_total{op=\"enqueue\"} 0",
            "narq_uploaded_paths_total 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
