//! An HTTP-aware proxy on 127.0.0.1 in front of an S3 server (moto, a Garage node), for
//! tests. It does two things, each request on a connection of its own:
//! - **faults** on chosen requests ([`S3Proxy::add`]): a cut mid-body, an S3 error answer, a
//!   stall before the server sees the request, no answer at all, or the server's answer
//!   lost or late after the server acted on the request;
//! - **a service's rules** ([`S3Proxy::service`]): what R2, B2 and older Ceph, or a
//!   virtual-hosted-only service refuse, refused with that service's error code.
//!
//! Every request is recorded ([`S3Proxy::seen`]) with its head, the fault applied and the
//! status the client got. It also serves as an HTTP proxy (absolute-form request targets),
//! so that a client can reach virtual-hosted names without DNS.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
/// whose target contains `needle`, and that carry a header starting with `header`, if set.
struct Rule {
    method: &'static str,
    needle: &'static str,
    header: Option<&'static str>,
    fault: Fault,
    times: usize,
}

/// One request the proxy saw.
#[derive(Clone, Debug)]
pub struct Seen {
    pub at: Instant,
    pub method: String,
    pub target: String,
    /// The request's head as it came (request line and headers).
    pub head: String,
    pub fault: Fault,
    /// The status the client got (`None`: the connection was cut, or no answer).
    pub status: Option<u16>,
}

impl Seen {
    /// The value of header `name`, if the request had it.
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.head, name)
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
}

pub struct S3Proxy {
    pub port: u16,
    state: Shared<State>,
    stop: Arc<AtomicBool>,
}

impl S3Proxy {
    /// A proxy to the S3 server at 127.0.0.1:`upstream`.
    pub fn start(upstream: u16) -> S3Proxy {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        l.set_nonblocking(true).unwrap();
        let p = S3Proxy { port, state: Default::default(), stop: Default::default() };
        let (state, stop) = (p.state.clone(), p.stop.clone());
        std::thread::spawn(move || {
            // Bounded: at most 30 minutes of 5 ms steps.
            for _ in 0..360_000 {
                if stop.load(Relaxed) {
                    break;
                }
                while let Ok((client, _)) = l.accept() {
                    let state = state.clone();
                    std::thread::spawn(move || serve(client, upstream, &state));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        p
    }

    /// Applies `fault` to the next `times` requests with `method` (`""`: any) whose target
    /// contains `needle`.
    pub fn add(&self, method: &'static str, needle: &'static str, fault: Fault, times: usize) {
        self.state.lock().unwrap().rules.push(Rule { method, needle, header: None, fault, times });
    }

    /// The same, for requests that also carry a header whose name starts with `header`
    /// (e.g. `x-amz-copy-source`: CopyObject; `if-none-match`: a conditional write).
    pub fn add_with_header(&self, method: &'static str, needle: &'static str, header: &'static str, fault: Fault, times: usize) {
        self.state.lock().unwrap().rules.push(Rule { method, needle, header: Some(header), fault, times });
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

fn serve(mut client: TcpStream, upstream: u16, state: &Shared<State>) {
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
    let (fault, service) = {
        let mut st = state.lock().unwrap();
        let hit = st.rules.iter_mut().find(|r| {
            r.times > 0 && (r.method.is_empty() || r.method == method) && target.contains(r.needle) && r.header.is_none_or(|h| has_header(&text, h))
        });
        let fault = match hit {
            Some(r) => {
                r.times -= 1;
                r.fault
            }
            None => Fault::Pass,
        };
        (fault, st.service.unwrap_or(Service::Plain))
    };
    let at = Instant::now();
    let record = |status: Option<u16>| {
        state.lock().unwrap().seen.push(Seen { at, method: method.clone(), target: target.clone(), head: text.clone(), fault, status });
    };
    if header(&text, "expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
        let _ = client.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
    }
    let mut body = vec![0u8; len];
    if fault == Fault::Drop {
        let _ = client.read_exact(&mut body[..len / 2]);
        let _ = client.shutdown(std::net::Shutdown::Both);
        return record(None);
    }
    if client.read_exact(&mut body).is_err() {
        return;
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
        Fault::Pass | Fault::Stall(_) | Fault::Drop | Fault::LateAnswer(_) | Fault::LostAnswer => {
            if let Fault::Stall(d) = fault {
                std::thread::sleep(d);
            }
            let resp = forward(upstream, &method, &target, &text, &body);
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
