//! An HTTP-aware proxy on 127.0.0.1 in front of an S3 server (moto, a Garage node), for
//! tests. It does two things, each request on a connection of its own:
//! - **faults** on chosen requests ([`S3Proxy::add`], [`S3Proxy::rule`]): a cut mid-body, an
//!   S3 error answer, a stall before the server sees the request (for a time, or until the
//!   test opens a [`Gate`]), no answer at all, or the server's answer lost, late or held
//!   after the server acted on the request;
//! - **a service's rules** ([`S3Proxy::service`]): what R2, B2 and older Ceph, or a
//!   virtual-hosted-only service refuse, refused with that service's error code.
//!
//! A rule matches by method, a substring of the target (or of the body of a POST: a batch
//! delete names its keys there), a header, and the entrance: [`S3Proxy::entrance`] opens
//! more ports to the same server, so that a test gives the daemon one and `narq gc` another
//! and tells their requests apart. Every request is recorded ([`S3Proxy::seen`]) from the
//! moment it has been read, with its head, the fault applied, when the server answered,
//! when the client got its answer and the status; a test acts when a chosen request arrives
//! or is answered ([`S3Proxy::wait_seen`]), and prints the whole trace ([`S3Proxy::trace`]).
//! It also serves as an HTTP proxy (absolute-form request targets), so that a client can
//! reach virtual-hosted names without DNS.
//!
//! Direct looks at a moto bucket (not through the proxy) are here too: [`bucket_keys`],
//! [`check_bucket_closed`], [`public_bucket`].

use crate::util::*;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// A gate a held request or answer waits on until the test opens it (at most [`LATCH_MAX`]).
#[derive(Clone, Default)]
pub struct Latch(Arc<(Mutex<bool>, Condvar)>);

/// The longest a latch holds anything: a test that forgets to open one still ends.
pub const LATCH_MAX: Duration = Duration::from_secs(300);

impl Latch {
    pub fn new() -> Latch {
        Latch::default()
    }
    pub fn open(&self) {
        *self.0 .0.lock().unwrap() = true;
        self.0 .1.notify_all();
    }
    pub fn is_open(&self) -> bool {
        *self.0 .0.lock().unwrap()
    }
    /// Waits until the latch opens, at most `max`; whether it opened.
    pub fn wait(&self, max: Duration) -> bool {
        let (m, c) = &*self.0;
        let g = c.wait_timeout_while(m.lock().unwrap(), max, |open| !*open).unwrap();
        *g.0
    }
}

impl std::fmt::Debug for Latch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Latch({})", if self.is_open() { "open" } else { "shut" })
    }
}

/// A [`Latch`] the proxy holds requests or answers on ([`S3Proxy::gate`]): a number, so that
/// a [`Fault`] stays a plain value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gate(usize);

/// What the proxy does to a request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fault {
    /// Forwarded to the server.
    Pass,
    /// Half the body is read, then the connection is cut: the server never sees it.
    Drop,
    /// `503 SlowDown` with `Retry-After: secs`.
    SlowDown(u64),
    /// An S3 error answer with this status and code (`500 InternalError`,
    /// `501 NotImplemented`, `403 AccessDenied`, …); the server never sees the request.
    Answer(u16, &'static str),
    /// `301 PermanentRedirect` naming the bucket's region in `x-amz-bucket-region`, as S3
    /// answers a request sent to another region.
    WrongRegion(&'static str),
    /// Held this long, then forwarded.
    Stall(Duration),
    /// Read, and never answered (until the client gives up, 60 s at most).
    Hang,
    /// Forwarded, and the server's answer held this long before the client gets it.
    LateAnswer(Duration),
    /// Forwarded, and the server's answer dropped: the server acted, the client never
    /// learns it (the connection is cut).
    LostAnswer,
    /// Held until the gate opens, then forwarded (whether or not the client still waits).
    HoldRequest(Gate),
    /// Forwarded, and the server's answer held until the gate opens.
    HoldAnswer(Gate),
}

/// Rules a service enforces, beyond what the server behind the proxy does.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Service {
    /// None: the server's own.
    Plain,
    /// Cloudflare R2: every part of a multipart upload but the last of one size, the last
    /// no larger (checked when the upload completes: `400 InvalidPart`); no `Content-MD5`
    /// together with an `x-amz-checksum-*` header; request bodies above `max_body` bytes
    /// refused by the proxy in front (Cloudflare's is 100 MB; tests pass less), with its
    /// HTML `413`.
    R2 { max_body: u64 },
    /// Backblaze B2 and older Ceph RGW: no `x-amz-checksum-*` or
    /// `x-amz-sdk-checksum-algorithm` header and no streaming trailers (`400
    /// InvalidArgument`); DeleteObjects needs a `Content-MD5` that matches, as S3 did before
    /// 2025.
    NoChecksums,
    /// A service that takes virtual-hosted requests only (`Host: <bucket>.<domain>`):
    /// others get `403 SecondLevelDomainForbidden`. The server behind must take them too
    /// (Garage with `root_domain`).
    VirtualHostedOnly { domain: &'static str },
}

/// Applies `fault` to the next `times` requests whose method is `method` (`""`: any),
/// whose target (or, for a POST, body) contains `needle`, that carry a header starting with
/// `header`, if set, and that came in by `entrance`, if set.
pub struct Rule {
    pub method: &'static str,
    pub needle: String,
    pub header: Option<&'static str>,
    pub entrance: Option<&'static str>,
    pub fault: Fault,
    pub times: usize,
}

/// One request the proxy saw, recorded when it was read and completed when it was answered.
#[derive(Clone, Debug)]
pub struct Seen {
    /// When its head was read.
    pub at: Instant,
    /// The entrance it came in by (`main`: [`S3Proxy::port`]).
    pub entrance: &'static str,
    pub method: String,
    pub target: String,
    /// The request's head as it came (request line and headers).
    pub head: String,
    /// The body of a POST (a batch delete names its keys there), else empty.
    pub body: String,
    pub fault: Fault,
    /// When the server's answer came (`None`: not forwarded, or not answered yet).
    pub server_answered: Option<Instant>,
    /// When the client got its answer or was cut off (`None`: still in the proxy).
    pub done: Option<Instant>,
    /// The status the client got (`None`: the connection was cut, or no answer).
    pub status: Option<u16>,
}

impl Seen {
    /// The value of header `name`, if the request had it.
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.head, name)
    }
    /// Whether the target or the body contains `s`.
    pub fn names(&self, s: &str) -> bool {
        self.target.contains(s) || self.body.contains(s)
    }
    /// A LIST request (ListObjectsV2) of `prefix` ("" for the whole bucket).
    pub fn lists(&self, prefix: &str) -> bool {
        self.method == "GET" && query(&self.target, "list-type") == Some("2") && query(&self.target, "prefix").unwrap_or("").replace("%2F", "/") == prefix
    }
}

type Shared<T> = Arc<Mutex<T>>;

/// What the proxy shares between its connections.
#[derive(Default)]
struct State {
    rules: Vec<Rule>,
    seen: Vec<Seen>,
    service: Option<Service>,
    /// R2: the size of each part of each multipart upload (by upload id, part number).
    parts: HashMap<String, BTreeMap<u32, u64>>,
    /// The latches of [`Gate`]s, by number.
    gates: Vec<Latch>,
}

pub struct S3Proxy {
    /// The first entrance, `main`.
    pub port: u16,
    upstream: u16,
    state: Shared<State>,
    stop: Arc<AtomicBool>,
}

/// How long a proxy accepts at most (a bound on its accept loops; a bench runs for hours).
const PROXY_LIFE: Duration = Duration::from_secs(4 * 3600);

impl S3Proxy {
    /// A proxy to the S3 server at 127.0.0.1:`upstream`, with one entrance, `main`, at
    /// [`S3Proxy::port`].
    pub fn start(upstream: u16) -> S3Proxy {
        let mut p = S3Proxy { port: 0, upstream, state: Default::default(), stop: Default::default() };
        p.port = p.entrance("main");
        p
    }

    /// Opens another entrance to the same server; its port. Requests that come in by it are
    /// recorded with `name`.
    pub fn entrance(&self, name: &'static str) -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        l.set_nonblocking(true).unwrap();
        let (state, stop, upstream) = (self.state.clone(), self.stop.clone(), self.upstream);
        std::thread::spawn(move || {
            let start = Instant::now();
            while !stop.load(Relaxed) && start.elapsed() < PROXY_LIFE {
                while let Ok((client, _)) = l.accept() {
                    let state = state.clone();
                    std::thread::spawn(move || serve(client, name, upstream, &state));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        port
    }

    /// Applies `fault` to the next `times` requests with `method` (`""`: any) whose target
    /// contains `needle`.
    pub fn add(&self, method: &'static str, needle: &str, fault: Fault, times: usize) {
        self.rule(Rule { method, needle: needle.into(), header: None, entrance: None, fault, times });
    }

    /// The same, for requests that also carry a header whose name starts with `header`
    /// (e.g. `x-amz-copy-source`: CopyObject; `if-none-match`: a conditional write).
    pub fn add_with_header(&self, method: &'static str, needle: &str, header: &'static str, fault: Fault, times: usize) {
        self.rule(Rule { method, needle: needle.into(), header: Some(header), entrance: None, fault, times });
    }

    /// A new gate, shut, for [`Fault::HoldRequest`] and [`Fault::HoldAnswer`].
    pub fn gate(&self) -> Gate {
        let mut st = self.state.lock().unwrap();
        st.gates.push(Latch::new());
        Gate(st.gates.len() - 1)
    }

    /// Opens `gate`: what it holds goes on.
    pub fn open(&self, gate: Gate) {
        self.state.lock().unwrap().gates[gate.0].open();
    }

    pub fn rule(&self, rule: Rule) {
        self.state.lock().unwrap().rules.push(rule);
    }

    /// Removes every rule (requests already held stay held until their latch or time).
    pub fn clear(&self) {
        self.state.lock().unwrap().rules.clear();
    }

    /// Waits until a request in the trace (from its `from`-th entry on, see
    /// [`S3Proxy::mark`]) satisfies `f`, at most `timeout`; returns it.
    pub fn wait_seen(&self, from: usize, timeout: Duration, f: impl Fn(&Seen) -> bool) -> Option<Seen> {
        let start = Instant::now();
        loop {
            if let Some(s) = self.state.lock().unwrap().seen.iter().skip(from).find(|s| f(s)) {
                return Some(s.clone());
            }
            if start.elapsed() >= timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// How many requests the trace holds (an index for [`S3Proxy::wait_seen`]).
    pub fn mark(&self) -> usize {
        self.state.lock().unwrap().seen.len()
    }

    /// The trace, one request a line: when it arrived and was done (s since the first), the
    /// entrance, the request, the fault, the status.
    pub fn trace(&self) -> String {
        self.trace_from(0)
    }

    /// [`S3Proxy::trace`] from the `from`-th request on.
    pub fn trace_from(&self, from: usize) -> String {
        let seen: Vec<Seen> = self.seen().into_iter().skip(from).collect();
        let Some(t0) = seen.first().map(|s| s.at) else { return String::new() };
        let since = |t: Instant| t.duration_since(t0).as_secs_f64();
        seen.iter()
            .map(|r| format!("{:8.3} {:>8} {} {} {} {:?} {:?}\n", since(r.at), r.done.map_or("-".into(), |d| format!("{:.3}", since(d))), r.entrance, r.method, r.target, r.fault, r.status))
            .collect()
    }

    /// Enforces `service`'s rules on every request from now on.
    pub fn service(&self, service: Service) {
        self.state.lock().unwrap().service = Some(service);
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }
}

impl Drop for S3Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
    }
}

/// Reads up to the end of an HTTP head; `None` at a clean end of stream.
pub fn read_head(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 64 << 10 || s.read(&mut b).ok()? == 0 {
            return None;
        }
        head.push(b[0]);
    }
    Some(head)
}

pub fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim()))
}

/// True if `head` has a header whose name starts with `prefix` (case-insensitive).
fn has_header(head: &str, prefix: &str) -> bool {
    head.lines().skip(1).filter_map(|l| l.split_once(':')).any(|(k, _)| k.to_ascii_lowercase().starts_with(&prefix.to_ascii_lowercase()))
}

/// The value of query parameter `name` in a request target.
fn query<'a>(target: &'a str, name: &str) -> Option<&'a str> {
    let q = target.split_once('?')?.1;
    q.split('&').find_map(|kv| match kv.split_once('=') {
        Some((k, v)) if k == name => Some(v),
        None if kv == name => Some(""),
        _ => None,
    })
}

fn s3_error(client: &mut TcpStream, status: u16, code: &str, message: &str, extra: &str) {
    let reason = match status {
        301 => "Moved Permanently",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Slow Down",
        _ => "Error",
    };
    let body = format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message></Error>");
    let _ = write!(
        client,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
        body.len()
    );
}

/// What `service` refuses of this request, before the server sees it: (status, code,
/// message), or a raw answer for what a front proxy says.
enum Refusal {
    S3(u16, &'static str, String),
    Raw(String),
}

fn refuse(service: Service, method: &str, target: &str, head: &str, body: &[u8], state: &Shared<State>) -> Option<Refusal> {
    let checksum_header = head.lines().skip(1).filter_map(|l| l.split_once(':')).map(|(k, _)| k.trim().to_ascii_lowercase()).find(|k| {
        k.starts_with("x-amz-checksum-") || k == "x-amz-sdk-checksum-algorithm" || k == "x-amz-trailer"
    });
    match service {
        Service::Plain => None,
        Service::R2 { max_body } => {
            if body.len() as u64 > max_body {
                let html = "<html><head><title>413 Request Entity Too Large</title></head><body><center><h1>413 Request Entity Too Large</h1></center><hr><center>cloudflare</center></body></html>";
                return Some(Refusal::Raw(format!(
                    "HTTP/1.1 413 Request Entity Too Large\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{html}",
                    html.len()
                )));
            }
            if header(head, "content-md5").is_some() && checksum_header.as_deref().is_some_and(|h| h.starts_with("x-amz-checksum-")) {
                return Some(Refusal::S3(400, "InvalidRequest", "You can only specify one non-default checksum at a time.".into()));
            }
            if method == "POST" && query(target, "uploadId").is_some() {
                let id = query(target, "uploadId").unwrap_or("");
                let listed: Vec<u32> = String::from_utf8_lossy(body)
                    .split("<PartNumber>")
                    .skip(1)
                    .filter_map(|s| s.split_once("</PartNumber>")?.0.trim().parse().ok())
                    .collect();
                let st = state.lock().unwrap();
                let sizes: Vec<u64> = listed.iter().filter_map(|n| st.parts.get(id)?.get(n).copied()).collect();
                let uniform = sizes.split_last().is_none_or(|(last, rest)| rest.windows(2).all(|w| w[0] == w[1]) && rest.first().is_none_or(|f| last <= f));
                if !uniform {
                    return Some(Refusal::S3(400, "InvalidPart", format!("All non-trailing parts must have the same length. Sizes: {sizes:?}")));
                }
            }
            None
        }
        Service::NoChecksums => {
            if let Some(h) = checksum_header {
                return Some(Refusal::S3(400, "InvalidArgument", format!("Unsupported header '{h}' received for this API call.")));
            }
            if header(head, "x-amz-content-sha256").is_some_and(|v| v.contains("TRAILER")) {
                return Some(Refusal::S3(400, "InvalidArgument", "Unsupported streaming payload with trailers.".into()));
            }
            if method == "POST" && query(target, "delete").is_some() {
                use base64::Engine;
                use md5::Digest;
                let want = base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(body));
                return match header(head, "content-md5") {
                    None => Some(Refusal::S3(400, "InvalidRequest", "Missing required header for this request: Content-MD5".into())),
                    Some(v) if v != want => Some(Refusal::S3(400, "BadDigest", "The Content-MD5 you specified did not match what we received.".into())),
                    Some(_) => None,
                };
            }
            None
        }
        Service::VirtualHostedOnly { domain } => {
            let host = header(head, "host").unwrap_or("");
            let name = host.rsplit_once(':').map_or(host, |(h, _)| h);
            let virtual_hosted = name.strip_suffix(domain).is_some_and(|b| b.ends_with('.') && b.len() > 1);
            (!virtual_hosted).then(|| Refusal::S3(403, "SecondLevelDomainForbidden", "Please use virtual hosted style to access.".into()))
        }
    }
}

/// R2: remembers the size of a part the server took.
fn record_part(state: &Shared<State>, target: &str, head: &str, body_len: usize) {
    let (Some(id), Some(n)) = (query(target, "uploadId"), query(target, "partNumber").and_then(|n| n.parse::<u32>().ok())) else { return };
    let size = match header(head, "x-amz-copy-source-range").and_then(|r| r.strip_prefix("bytes=")?.split_once('-')) {
        Some((a, b)) => b.parse::<u64>().unwrap_or(0) + 1 - a.parse::<u64>().unwrap_or(0),
        None => header(head, "x-amz-decoded-content-length").and_then(|v| v.parse().ok()).unwrap_or(body_len as u64),
    };
    state.lock().unwrap().parts.entry(id.to_string()).or_default().insert(n, size);
}

fn serve(mut client: TcpStream, entrance: &'static str, upstream: u16, state: &Shared<State>) {
    client.set_nonblocking(false).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // One request per connection: the answer says `Connection: close`.
    let Some(head) = read_head(&mut client) else { return };
    let text = String::from_utf8_lossy(&head).to_string();
    let mut first = text.lines().next().unwrap_or("").split(' ');
    let (method, mut target) = (first.next().unwrap_or("").to_string(), first.next().unwrap_or("").to_string());
    // As an HTTP proxy: `GET http://host:port/path` is `GET /path` with its Host.
    if let Some(rest) = target.strip_prefix("http://") {
        target = rest.find('/').map_or("/".to_string(), |i| rest[i..].to_string());
    }
    assert!(header(&text, "transfer-encoding").is_none(), "chunked request bodies are not handled: {text}");
    let len: usize = header(&text, "content-length").map_or(0, |v| v.parse().unwrap());
    if header(&text, "expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
        let _ = client.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
    }
    // A POST (a batch delete, a multipart completion) is matched on its body too: read first.
    let mut body = vec![0u8; len];
    let post = method == "POST";
    if post && client.read_exact(&mut body).is_err() {
        return;
    }
    let body_text = if post { String::from_utf8_lossy(&body).to_string() } else { String::new() };
    let (fault, service, idx) = {
        let mut st = state.lock().unwrap();
        let hit = st.rules.iter_mut().find(|r| {
            r.times > 0
                && (r.method.is_empty() || r.method == method)
                && r.entrance.is_none_or(|e| e == entrance)
                && (target.contains(&r.needle) || (post && body_text.contains(&r.needle)))
                && r.header.is_none_or(|h| has_header(&text, h))
        });
        let fault = match hit {
            Some(r) => {
                r.times -= 1;
                r.fault
            }
            None => Fault::Pass,
        };
        let seen = Seen {
            at: Instant::now(),
            entrance,
            method: method.clone(),
            target: target.clone(),
            head: text.clone(),
            body: body_text,
            fault,
            server_answered: None,
            done: None,
            status: None,
        };
        st.seen.push(seen);
        (fault, st.service.unwrap_or(Service::Plain), st.seen.len() - 1)
    };
    let record = |status: Option<u16>| {
        let mut st = state.lock().unwrap();
        st.seen[idx].done = Some(Instant::now());
        st.seen[idx].status = status;
    };
    if fault == Fault::Drop {
        if !post {
            let _ = client.read_exact(&mut body[..len / 2]);
        }
        let _ = client.shutdown(std::net::Shutdown::Both);
        return record(None);
    }
    if !post && client.read_exact(&mut body).is_err() {
        return record(None);
    }
    if let Some(r) = refuse(service, &method, &target, &text, &body, state) {
        let status = match r {
            Refusal::S3(status, code, message) => {
                s3_error(&mut client, status, code, &message, "");
                status
            }
            Refusal::Raw(answer) => {
                let _ = client.write_all(answer.as_bytes());
                answer[9..12].parse().unwrap_or(0)
            }
        };
        let _ = client.shutdown(std::net::Shutdown::Both);
        return record(Some(status));
    }
    let latch = |g: Gate| state.lock().unwrap().gates[g.0].clone();
    let status = match fault {
        Fault::Hang => {
            client.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            let _ = client.read(&mut [0u8; 1]);
            None
        }
        Fault::SlowDown(secs) => {
            s3_error(&mut client, 503, "SlowDown", "injected by the test proxy", &format!("Retry-After: {secs}\r\n"));
            Some(503)
        }
        Fault::Answer(status, code) => {
            s3_error(&mut client, status, code, "injected by the test proxy", "");
            Some(status)
        }
        Fault::WrongRegion(region) => {
            s3_error(
                &mut client,
                301,
                "PermanentRedirect",
                "The bucket you are attempting to access must be addressed using the specified endpoint.",
                &format!("x-amz-bucket-region: {region}\r\n"),
            );
            Some(301)
        }
        Fault::Pass | Fault::Stall(_) | Fault::Drop | Fault::LateAnswer(_) | Fault::LostAnswer | Fault::HoldRequest(_) | Fault::HoldAnswer(_) => {
            match fault {
                Fault::Stall(d) => std::thread::sleep(d),
                Fault::HoldRequest(g) => drop(latch(g).wait(LATCH_MAX)),
                _ => {}
            }
            let resp = forward(upstream, &method, &target, &text, &body);
            state.lock().unwrap().seen[idx].server_answered = Some(Instant::now());
            let status = String::from_utf8_lossy(&resp[..resp.len().min(12)]).split(' ').nth(1).and_then(|s| s.parse().ok());
            if status == Some(200) && matches!(service, Service::R2 { .. }) && method == "PUT" {
                record_part(state, &target, &text, body.len());
            }
            match fault {
                Fault::LostAnswer => None,
                Fault::LateAnswer(d) => {
                    std::thread::sleep(d);
                    let _ = client.write_all(&resp);
                    status
                }
                Fault::HoldAnswer(g) => {
                    latch(g).wait(LATCH_MAX);
                    let _ = client.write_all(&resp);
                    status
                }
                _ => {
                    let _ = client.write_all(&resp);
                    status
                }
            }
        }
    };
    let _ = client.shutdown(std::net::Shutdown::Both);
    record(status);
}

/// Sends the request to the server on a connection of its own; returns the whole answer.
fn forward(upstream: u16, method: &str, target: &str, head: &str, body: &[u8]) -> Vec<u8> {
    // The request as it came (origin-form), but for its own connection to the server.
    let headers: String = head
        .split("\r\n")
        .skip(1)
        .filter(|l| !l.is_empty())
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            !l.starts_with("connection:") && !l.starts_with("expect:") && !l.starts_with("proxy-connection:")
        })
        .map(|l| format!("{l}\r\n"))
        .collect();
    let mut resp = Vec::new();
    let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)) else {
        return b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec();
    };
    server.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let _ = server.write_all(format!("{method} {target} HTTP/1.1\r\n{headers}Connection: close\r\n\r\n").as_bytes());
    let _ = server.write_all(body);
    let _ = server.read_to_end(&mut resp);
    resp
}

/// The objects in a moto bucket, listed directly (not through a proxy).
pub fn bucket_keys(port: u16, bucket: &str) -> HashSet<String> {
    let (head, body) = http(port, "GET", &format!("/{bucket}?list-type=2&max-keys=10000"));
    assert!(head.starts_with("http/1.1 200"), "listing {bucket}: {head}");
    let body = String::from_utf8(body).unwrap();
    assert!(!body.contains("<IsTruncated>true"), "listing truncated");
    body.split("<Key>").skip(1).filter_map(|s| s.split_once("</Key>")).map(|(k, _)| k.to_string()).collect()
}

/// Every narinfo in the bucket has its NAR and its references' narinfos; returns the
/// narinfo keys. A narinfo deleted between the listing and its read (a collection going on)
/// is not visible, and not counted.
pub fn check_bucket_closed(port: u16, bucket: &str) -> Result<Vec<String>, String> {
    let keys = bucket_keys(port, bucket);
    let mut narinfos = Vec::new();
    for k in keys.iter().filter(|k| k.ends_with(".narinfo") && !k.contains('/')) {
        let (head, body) = http(port, "GET", &format!("/{bucket}/{k}"));
        if head.starts_with("http/1.1 404") {
            continue;
        }
        assert!(head.starts_with("http/1.1 200"), "GET {k}: {head}");
        let ni = narq::nix::NarInfo::parse(&String::from_utf8_lossy(&body)).map_err(|e| format!("{k}: {e}"))?;
        let mut missing: Vec<String> = Vec::new();
        if !keys.contains(&ni.url) {
            missing.push(format!("its NAR {}", ni.url));
        }
        for r in &ni.info.references {
            if !keys.contains(&format!("{}.narinfo", r.hash_part())) {
                missing.push(format!("its reference {r}"));
            }
        }
        // Looked at again: what a collection deleted meanwhile, in order, is no violation.
        if !missing.is_empty() {
            // GET: moto answers an anonymous HEAD only for objects written after a public ACL.
            if !http(port, "GET", &format!("/{bucket}/{k}")).0.starts_with("http/1.1 200") {
                continue;
            }
            let now = bucket_keys(port, bucket);
            missing.retain(|m| {
                let key = m.rsplit(' ').next().unwrap_or("");
                let key = if key.starts_with("/nix/store/") { format!("{}.narinfo", hash(key)) } else { key.to_string() };
                !now.contains(&key)
            });
            if !missing.is_empty() {
                return Err(format!("{k} is visible without {}", missing.join(", ")));
            }
        }
        narinfos.push(k.clone());
    }
    Ok(narinfos)
}

/// Creates `bucket` on moto at `port`, readable by anyone (Nix reads it over plain HTTP),
/// with two plain requests (moto takes them unsigned): faster than a boto3 process.
pub fn public_bucket(port: u16, bucket: &str) {
    let policy = format!(
        r#"{{"Version": "2012-10-17", "Statement": [{{"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::{bucket}/*"}}]}}"#
    );
    for (path, body) in [(format!("/{bucket}"), String::new()), (format!("/{bucket}?policy"), policy)] {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "PUT {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
        let mut resp = Vec::new();
        let _ = s.read_to_end(&mut resp);
        assert!(resp.starts_with(b"HTTP/1.1 200") || resp.starts_with(b"HTTP/1.0 200"), "PUT {path}: {}", String::from_utf8_lossy(&resp));
    }
}
