//! Issue 13: what the faster uploads must keep. Large NARs stream their parts to a temporary
//! key before their name (the hash of their compressed bytes) is known: every narinfo still
//! names an object with exactly its FileHash and FileSize, whichever builders and
//! compression settings wrote the cache; a NAR that does not match its NarHash never
//! reaches a `nar/` key, and nothing temporary or incomplete is left behind. Small paths go
//! up many at once.

use crate::s3proxy::bucket_keys;
use crate::util::*;
use std::process::Command;
use std::time::{Duration, Instant};

fn s3_narq(tag: &str, port: u16, bucket: &str, params: &str, extra: &str) -> Narq {
    Narq::new(tag, &format!("store = \"s3://{bucket}?endpoint=127.0.0.1:{port}&scheme=http{params}\"\n{extra}"))
}

/// Multipart uploads begun and neither completed nor aborted.
fn incomplete_uploads(port: u16, bucket: &str) -> usize {
    let (head, body) = http(port, "GET", &format!("/{bucket}?uploads"));
    assert!(head.starts_with("http/1.1 200"), "listing uploads of {bucket}: {head}");
    String::from_utf8_lossy(&body).matches("<UploadId>").count()
}

/// The object at `key`, which must be there.
fn object(port: u16, bucket: &str, key: &str) -> Vec<u8> {
    let (head, body) = http(port, "GET", &format!("/{bucket}/{key}"));
    assert!(head.starts_with("http/1.1 200"), "GET {key}: {head}");
    body
}

/// Every `nar/` object is named by the hash of its bytes, and every narinfo names an object
/// with its FileHash and FileSize; returns the narinfos' NAR keys.
fn check_nars_match_names(port: u16, bucket: &str) -> Result<Vec<String>, String> {
    let keys = bucket_keys(port, bucket);
    for k in keys.iter().filter(|k| k.starts_with("nar/")) {
        let body = object(port, bucket, k);
        let hash = narq::nix::Sha256::digest(&body).to_base32();
        if !k.starts_with(&format!("nar/{hash}.nar")) {
            return Err(format!("{k} holds bytes whose hash is {hash}"));
        }
    }
    let mut urls = Vec::new();
    for k in keys.iter().filter(|k| k.ends_with(".narinfo")) {
        let text = String::from_utf8(object(port, bucket, k)).unwrap();
        let ni = narq::nix::NarInfo::parse(&text).map_err(|e| format!("{k}: {e}"))?;
        let body = object(port, bucket, &ni.url);
        if Some(narq::nix::Sha256::digest(&body)) != ni.file_hash || Some(body.len() as u64) != ni.file_size {
            return Err(format!("{k} names {} whose hash or size differs from its FileHash/FileSize", ni.url));
        }
        urls.push(ni.url);
    }
    Ok(urls)
}

/// Two builders with different compression settings (zstd level 1 vs xz) push the same
/// paths to one bucket at the same time, both streaming the large one (one of them copies
/// it to its key in ranges, as for a NAR over 5 GiB): every narinfo names an object with
/// its FileHash and FileSize, both NARs went through a temporary key that is gone, no
/// multipart upload is left, and a client substitutes the path.
#[test]
fn two_builders_with_different_compression_keep_every_narinfo_true() {
    let t = TempDir::new("perf-two");
    let moto = Moto::start(t.path(), &[]);
    let bucket = "narq-perf-two";
    moto.bucket(bucket);
    let mut a = s3_narq("perf-two-a", moto.port, bucket, "&compression=zstd&compression-level=1&buffer-size=5242880", "");
    // Ranges of 5 MiB instead of 5 GiB: the big path's copy takes the UploadPartCopy way.
    a.spawn_daemon(Command::new(bin("narq")).arg("daemon").env("NARQ_TEST_COPY_LIMIT", "5242880"));
    assert!(wait_for(Duration::from_secs(10), || a.narq(&["status"]).status.success()), "{}", a.daemon_log());
    let mut b = s3_narq("perf-two-b", moto.port, bucket, "&compression=xz&compression-level=1&buffer-size=5242880", "");
    b.start();
    let u = unique();
    // 14 MB that compress little: streamed in parts by both, above one copy range.
    let expr = format!(
        "let big = {}; in {}",
        sh_drv(&format!("perf-two-big-{u}"), "head -c 14000000 /dev/urandom > $out"),
        sh_drv(&format!("perf-two-top-{u}"), "echo ${big} > $out"),
    );
    let outs = nix_build(&nix_conf(a.dir.path(), None), &expr, &[]);
    let push = |n: &Narq| Command::new(bin("narq")).args(["push", "--wait", &outs[0]]).env("NARQ_CONFIG", &n.config).output().unwrap();
    let (pa, pb) = std::thread::scope(|s| {
        let pa = s.spawn(|| push(&a));
        let pb = s.spawn(|| push(&b));
        (pa.join().unwrap(), pb.join().unwrap())
    });
    assert!(pa.status.success(), "{}\n{}", String::from_utf8_lossy(&pa.stderr), a.daemon_log());
    assert!(pb.status.success(), "{}\n{}", String::from_utf8_lossy(&pb.stderr), b.daemon_log());

    let urls = check_nars_match_names(moto.port, bucket).unwrap_or_else(|e| panic!("{e}\n{}\n{}", a.daemon_log(), b.daemon_log()));
    assert_eq!(urls.len(), 2, "{urls:?}");
    let keys = bucket_keys(moto.port, bucket);
    let nars: Vec<&String> = keys.iter().filter(|k| k.starts_with("nar/")).collect();
    assert!(nars.iter().any(|k| k.ends_with(".nar.zst")) && nars.iter().any(|k| k.ends_with(".nar.xz")), "both builders must have uploaded: {nars:?}");
    assert!(!keys.iter().any(|k| k.starts_with("narq/tmp/")), "a temporary object is left: {keys:?}");
    assert_eq!(incomplete_uploads(moto.port, bucket), 0, "a multipart upload is left");
    // Both streamed: parts went to temporary keys, and builder a copied in ranges.
    let log = std::fs::read_to_string(&moto.log).unwrap();
    let parts_to_tmp = log.lines().filter(|l| l.contains(&format!("\"PUT /{bucket}/narq/tmp/")) && l.contains("partNumber=")).count();
    assert!(parts_to_tmp >= 4, "the big NAR was not streamed in parts by both builders ({parts_to_tmp} parts)");
    let range_copies = log.lines().filter(|l| l.contains(&format!("\"PUT /{bucket}/nar/")) && l.contains("partNumber=")).count();
    assert!(range_copies >= 2, "builder a did not copy its NAR in ranges ({range_copies} ranges)");

    // A client that trusts both builders (the narinfos are signed by whichever wrote last).
    let client = t.join("client");
    let keys = format!("{} {}", a.public_key, b.public_key);
    run(Command::new("nix-store")
        .arg("--store")
        .arg(&client)
        .args(["-r", &outs[0], "--option", "substituters", &format!("http://127.0.0.1:{}/{bucket}", moto.port)])
        .args(["--option", "trusted-public-keys", &keys])
        .env("NIX_CONF_DIR", &a.nix_conf));
    let big = closure(&outs).into_iter().find(|p| p.contains("perf-two-big")).unwrap();
    assert_eq!(std::fs::read(client.join(&big[1..])).unwrap(), std::fs::read(&big).unwrap());
    for p in closure(&outs) {
        let _ = Command::new("nix-store").args(["--delete", &p]).output();
    }
}

/// A large path whose contents changed after Nix registered it: its parts stream to a
/// temporary key, the mismatch is found at the end, and the upload is aborted. Nothing is
/// at a `nar/` key, nothing temporary is left, and the item fails with the reason.
#[test]
fn streamed_nar_that_does_not_match_leaves_nothing() {
    let t = TempDir::new("perf-tamper");
    let moto = Moto::start(t.path(), &[]);
    let bucket = "narq-perf-tamper";
    moto.bucket(bucket);
    let mut n = s3_narq("perf-tamper", moto.port, bucket, "&buffer-size=5242880", "");
    n.start();
    let outs = nix_build(&nix_conf(n.dir.path(), None), &sh_drv(&format!("perf-tamper-{}", unique()), "head -c 14000000 /dev/urandom > $out"), &[]);
    let p = &outs[0];
    // The last byte changes, the size stays: only the hash at the end can tell.
    {
        use std::io::{Seek, SeekFrom, Write};
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        let mut f = std::fs::OpenOptions::new().read(true).write(true).open(p).unwrap();
        f.seek(SeekFrom::End(-1)).unwrap();
        let last = std::fs::read(p).unwrap().pop().unwrap();
        f.write_all(&[last ^ 0xff]).unwrap();
    }
    let push = n.narq(&["push", "--wait", p]);
    assert_eq!(push.status.code(), Some(1), "{}", String::from_utf8_lossy(&push.stderr));
    assert!(String::from_utf8_lossy(&push.stderr).contains("do not match the Nix database"), "{}", String::from_utf8_lossy(&push.stderr));
    let keys = bucket_keys(moto.port, bucket);
    assert!(!keys.iter().any(|k| k.starts_with("nar/") || k.starts_with("narq/tmp/") || k.ends_with(".narinfo")), "something was left: {keys:?}");
    assert_eq!(incomplete_uploads(moto.port, bucket), 0, "the multipart upload was not aborted");
    // It streamed: a multipart upload to a temporary key was begun, then aborted (moto
    // colours the lines of answers other than 200: no quote before the method).
    let log = std::fs::read_to_string(&moto.log).unwrap();
    let begun = log.lines().filter(|l| l.contains(&format!("POST /{bucket}/narq/tmp/")) && l.contains("?uploads")).count();
    let aborted = log.lines().filter(|l| l.contains(&format!("DELETE /{bucket}/narq/tmp/")) && l.contains("uploadId=")).count();
    assert_eq!((begun, aborted), (1, 1), "no streamed upload begun and aborted: the test proves nothing");
    let _ = Command::new("nix-store").args(["--delete", p]).output();
}

/// The same on a `file://` cache: the NAR streams into a temp file under narq's prefix and
/// is renamed into `nar/` only when it matches.
#[test]
fn file_cache_streamed_nar_is_renamed_into_place_only_when_it_matches() {
    let mut n = Narq::new("perf-file", "store = \"file:///PLACEHOLDER\"");
    let cache = n.cache();
    let text = std::fs::read_to_string(&n.config).unwrap().replace("/PLACEHOLDER", &cache.display().to_string());
    std::fs::write(&n.config, text).unwrap();
    n.start();
    let conf = nix_conf(n.dir.path(), None);
    let u = unique();
    let good = nix_build(&conf, &sh_drv(&format!("perf-file-good-{u}"), "head -c 3000000 /dev/urandom > $out"), &[]).remove(0);
    let bad = nix_build(&conf, &sh_drv(&format!("perf-file-bad-{u}"), "head -c 3000000 /dev/urandom > $out"), &[]).remove(0);
    std::fs::set_permissions(&bad, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let mut bytes = std::fs::read(&bad).unwrap();
    *bytes.last_mut().unwrap() ^= 0xff;
    std::fs::write(&bad, bytes).unwrap();
    assert!(n.narq(&["push", "--wait", &good]).status.success(), "{}", n.daemon_log());
    assert_eq!(n.narq(&["push", "--wait", &bad]).status.code(), Some(1));
    let nars: Vec<String> = std::fs::read_dir(cache.join("nar")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    assert_eq!(nars.len(), 1, "{nars:?}");
    let tmp = std::fs::read_dir(cache.join("narq/tmp")).map_or(0, |d| d.count());
    assert_eq!(tmp, 0, "a temporary file is left");
    let body = std::fs::read(cache.join("nar").join(&nars[0])).unwrap();
    assert!(nars[0].starts_with(&narq::nix::Sha256::digest(&body).to_base32()), "{} is not named by its hash", nars[0]);
    assert_eq!(check_closed(&cache).unwrap(), 1);
    n.substitute(&good);
    for p in [&good, &bad] {
        let _ = Command::new("nix-store").args(["--delete", p]).output();
    }
}

/// A closure of small independent paths goes up many at once, not a few at a time: behind
/// a proxy that delays every request by 100 ms, 60 paths (with their build logs) take far
/// less than the 60 × 3 round trips that 4 workers in turn would need.
#[test]
fn small_paths_upload_many_at_once() {
    let t = TempDir::new("perf-many");
    let moto = Moto::start(t.path(), &[]);
    let bucket = "narq-perf-many";
    moto.bucket(bucket);
    let delay = DelayProxy::start(moto.port, Duration::from_millis(100));
    let mut n = s3_narq("perf-many", delay.port, bucket, "", "");
    n.start();
    let u = unique();
    let leaf = format!(
        "derivation {{ name = \"perf-many-${{toString i}}-{u}\"; system = builtins.currentSystem; builder = \"/bin/sh\"; args = [\"-c\" \"echo ${{toString i}} > $out\"]; }}"
    );
    let expr = format!(
        "let leaf = i: {leaf}; in derivation {{ name = \"perf-many-top-{u}\"; system = builtins.currentSystem; builder = \"/bin/sh\"; args = [\"-c\" \"echo ${{toString (builtins.genList leaf 59)}} > $out\"]; }}"
    );
    let outs = nix_build(&nix_conf(n.dir.path(), None), &expr, &[]);
    let start = Instant::now();
    let push = n.narq(&["push", "--wait", &outs[0]]);
    let took = start.elapsed();
    assert!(push.status.success(), "{}", String::from_utf8_lossy(&push.stderr));
    assert_eq!(check_nars_match_names(moto.port, bucket).unwrap().len(), 60);
    let peak = delay.peak();
    eprintln!("60 paths through a 100 ms proxy: {took:?}, at most {peak} requests at once");
    assert!(peak >= 16, "at most {peak} requests at once: small paths wait for each other");
    // 4 at a time: 60 paths × (NAR + narinfo) / 4 × 100 ms = 3 s at the very least.
    assert!(took < Duration::from_secs(3), "60 small paths took {took:?}");
}

/// A TCP proxy to 127.0.0.1:`upstream` that holds each request `delay` before passing it
/// on (one round trip to a distant region), and counts the most connections busy at once.
struct DelayProxy {
    port: u16,
    busy: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    peak: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl DelayProxy {
    fn start(upstream: u16, delay: Duration) -> DelayProxy {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering::SeqCst;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let p = DelayProxy { port, busy: Default::default(), peak: Default::default(), stop: Default::default() };
        let (busy, peak, stop) = (p.busy.clone(), p.peak.clone(), p.stop.clone());
        std::thread::spawn(move || {
            // Bounded: accepts for 10 minutes at most, 1,000 connections at most.
            let until = Instant::now() + Duration::from_secs(600);
            let mut accepted = 0;
            while !stop.load(SeqCst) && Instant::now() < until && accepted < 1000 {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                accepted += 1;
                let (busy, peak) = (busy.clone(), peak.clone());
                std::thread::spawn(move || {
                    let _ = client.set_nonblocking(false);
                    let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", upstream)) else { return };
                    let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                    let (busy2, peak2) = (busy.clone(), peak.clone());
                    // Client to server: a read that holds a request line waits `delay`.
                    let up = std::thread::spawn(move || {
                        let mut buf = vec![0u8; 64 << 10];
                        loop {
                            let n = match c_in.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            if buf[..n].windows(11).any(|w| w == b" HTTP/1.1\r\n") {
                                let now = busy2.fetch_add(1, SeqCst) + 1;
                                peak2.fetch_max(now, SeqCst);
                                std::thread::sleep(delay);
                                busy2.fetch_sub(1, SeqCst);
                            }
                            if s_out.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = s_out.shutdown(std::net::Shutdown::Write);
                    });
                    let (mut s_in, mut c_out) = (server, client);
                    let _ = std::io::copy(&mut s_in, &mut c_out);
                    let _ = c_out.shutdown(std::net::Shutdown::Both);
                    let _ = up.join();
                });
            }
        });
        p
    }

    fn peak(&self) -> usize {
        self.peak.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}
