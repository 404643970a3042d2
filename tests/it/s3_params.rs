//! Issue 19 item 3: the `s3://` parameters Nix documents take effect as Nix means them, seen
//! in what reaches the S3 server: a recording proxy (tests/tools/s3_recorder.py) in front of
//! moto logs every request (method, path, Host, body length, storage class, encoding).

use crate::util::*;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The recording proxy in front of moto at `upstream`, answering everything with
/// `fail` when it is not 0.
struct Recorder {
    port: u16,
    log: std::path::PathBuf,
    child: Child,
}

impl Recorder {
    fn start(dir: &std::path::Path, upstream: u16, fail: u16) -> Recorder {
        let port = free_port();
        let log = dir.join(format!("requests-{port}.jsonl"));
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tools/s3_recorder.py");
        let child = Command::new(venv_bin("python"))
            .args([script, &upstream.to_string(), log.to_str().unwrap(), &port.to_string(), &fail.to_string()])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        assert!(wait_for(Duration::from_secs(10), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()), "recorder did not start");
        Recorder { port, log, child }
    }

    /// The requests so far, and forgets them.
    fn take(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let _ = std::fs::remove_file(&self.log);
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn s(v: &serde_json::Value, k: &str) -> String {
    v[k].as_str().unwrap_or("").to_string()
}

/// A request's key, without its query.
fn key(v: &serde_json::Value) -> String {
    s(v, "path").split('?').next().unwrap_or("").to_string()
}

/// A path of `mib` MiB that does not compress.
fn random_path(t: &TempDir, mib: u32) -> String {
    let file = t.join(format!("rand-{}", unique()));
    run(Command::new("head").args(["-c", &(mib << 20).to_string(), "/dev/urandom"]).stdout(std::fs::File::create(&file).unwrap()));
    let p = run(Command::new("nix-store").arg("--add").arg(&file)).trim().to_string();
    std::fs::remove_file(&file).unwrap();
    p
}

/// `narq ARGS` with the test credentials an S3 store needs.
fn narq_s3(n: &Narq, args: &[&str]) -> std::process::Output {
    output(
        Command::new(bin("narq"))
            .args(args)
            .env("NARQ_CONFIG", &n.config)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_EC2_METADATA_DISABLED", "true"),
    )
}

fn push(n: &Narq, p: &str) {
    let out = n.narq(&["push", "--wait", p]);
    assert!(out.status.success(), "push: {}\n{}", String::from_utf8_lossy(&out.stderr), n.daemon_log());
}

/// One moto, one recorder, three stores:
/// - `endpoint` without a scheme (`scheme=http`), `storage-class`, `multipart-chunk-size`,
///   `narinfo-compression`, `ls-compression`: every object written carries the class, the
///   parts are the chunk size, narinfos and listings carry their Content-Encoding, and Nix
///   2.8 still substitutes (it undoes the encoding) while `narq verify` reads them back;
/// - `endpoint` with a scheme, `buffer-size` (Nix's alias) and `multipart-threshold`: a NAR
///   under the threshold goes in one PUT;
/// - `addressing-style=virtual`: the bucket is in the Host header (through `http_proxy`,
///   which narq honours as curl does).
#[test]
fn s3_parameters_take_effect_on_the_wire() {
    let t = TempDir::new("s3params");
    let moto = Moto::start(t.path(), &[]);
    let rec = Recorder::start(t.path(), moto.port, 0);
    let big = random_path(&t, 14);

    // 1. Storage class, part size, encodings.
    moto.bucket("narq-cls");
    let params = "&storage-class=STANDARD_IA&multipart-chunk-size=6291456&narinfo-compression=gzip&ls-compression=zstd&write-nar-listing=true";
    let mut n = Narq::new("s3cls", &format!("store = \"s3://narq-cls?endpoint=127.0.0.1:{}&scheme=http{params}\"", rec.port));
    n.start();
    push(&n, &big);
    let reqs = rec.take();
    let writes: Vec<_> = reqs.iter().filter(|r| ["PUT", "POST"].contains(&s(r, "method").as_str()) && !s(r, "path").contains("uploadId=")).collect();
    assert!(writes.len() >= 4, "{reqs:#?}");
    for w in &writes {
        assert_eq!(s(w, "storage_class"), "STANDARD_IA", "a write without the storage class: {w}");
    }
    // Parts go up in parallel: all but the last (the smallest) are the chunk size.
    let mut parts: Vec<u64> = reqs.iter().filter(|r| s(r, "path").contains("partNumber=")).map(|r| r["length"].as_u64().unwrap()).collect();
    parts.sort_unstable_by(|a, b| b.cmp(a));
    assert!(parts.len() >= 3 && parts[..parts.len() - 1].iter().all(|&l| l == 6 << 20), "parts not of multipart-chunk-size: {parts:?}");
    let enc = |suffix: &str| reqs.iter().find(|r| s(r, "method") == "PUT" && key(r).ends_with(suffix)).map(|r| s(r, "encoding")).unwrap_or_else(|| panic!("no PUT of a {suffix}: {reqs:#?}"));
    assert_eq!((enc(".narinfo"), enc(".ls")), ("gzip".to_string(), "zstd".to_string()));
    // What S3 keeps: the class on the NAR (a server-side copy keeps it) and the narinfo.
    let classes = run(Command::new(venv_bin("python")).args(["-c", &format!(
        "import boto3\ns3 = boto3.client('s3', endpoint_url='http://127.0.0.1:{}', aws_access_key_id='t', aws_secret_access_key='t', region_name='us-east-1')\n\
         for o in s3.list_objects_v2(Bucket='narq-cls')['Contents']: print(o['Key'], o.get('StorageClass'))", moto.port)]));
    for line in classes.lines().filter(|l| l.starts_with("nar/") || l.contains(".narinfo")) {
        assert!(line.ends_with(" STANDARD_IA"), "{line}");
    }
    n.substitute_from(&big, &format!("http://127.0.0.1:{}/narq-cls", moto.port));
    let verify = narq_s3(&n, &["verify"]);
    assert!(verify.status.success(), "narq verify of gzip-encoded narinfos: {}{}", String::from_utf8_lossy(&verify.stdout), String::from_utf8_lossy(&verify.stderr));
    drop(n);

    // 2. A NAR under multipart-threshold: one PUT, no parts; endpoint given with its scheme.
    moto.bucket("narq-thr");
    let mut n = Narq::new("s3thr", &format!("store = \"s3://narq-thr?endpoint=http://127.0.0.1:{}&buffer-size=5242880&multipart-threshold=67108864\"", rec.port));
    n.start();
    rec.take();
    push(&n, &big);
    let reqs = rec.take();
    assert!(!reqs.iter().any(|r| s(r, "path").contains("partNumber=") || s(r, "path").contains("/narq/tmp/")), "{reqs:#?}");
    let nar = reqs.iter().find(|r| s(r, "method") == "PUT" && key(r).starts_with("/narq-thr/nar/")).expect("one PUT of the NAR");
    assert!(nar["length"].as_u64().unwrap() > 14 << 20);
    drop(n);

    // 3. Virtual-hosted addressing: the bucket goes in the Host header.
    moto.bucket("narq-virt");
    let mut n = Narq::new("s3virt", &format!("store = \"s3://narq-virt?endpoint=http://s3.test:{}&addressing-style=virtual\"", rec.port));
    n.spawn_daemon(Command::new(bin("narq")).arg("daemon").env_remove("JOURNAL_STREAM").env("http_proxy", format!("http://127.0.0.1:{}", rec.port)));
    assert!(wait_for(Duration::from_secs(10), || n.narq(&["status"]).status.success()), "{}", n.daemon_log());
    let small = nix_build(&nix_conf(n.dir.path(), None), &sh_drv(&format!("virt-{}", unique()), "echo v > $out"), &[]).remove(0);
    rec.take();
    push(&n, &small);
    let reqs = rec.take();
    let narinfo = reqs.iter().find(|r| s(r, "method") == "PUT" && key(r).ends_with(".narinfo")).expect("narinfo PUT");
    assert_eq!(s(narinfo, "host"), format!("narq-virt.s3.test:{}", rec.port), "{narinfo}");
    assert!(http(moto.port, "GET", &format!("/narq-virt/{}.narinfo", hash(&small))).0.starts_with("http/1.1 200"));
    let _ = Command::new("nix-store").args(["--delete", &big]).output();
}

/// `retry-attempts` is how many times one request is sent before narq gives up on it (then
/// the daemon's queue retries the item): counted at a server that answers 500 to everything.
#[test]
fn s3_retry_attempts_count_the_tries_of_a_request() {
    let t = TempDir::new("s3retry");
    let moto = Moto::start(t.path(), &[]);
    let rec = Recorder::start(t.path(), moto.port, 500);
    let n = Narq::new("s3retry", "");
    let tries = |attempts: u32| {
        rec.take();
        let url = format!("s3://narq-retry?endpoint=http://127.0.0.1:{}&retry-attempts={attempts}&retry-delay=1&retry-max-delay=5", rec.port);
        let out = narq_s3(&n, &["verify", "--store", &url]);
        assert!(!out.status.success());
        rec.take().len()
    };
    let (one, four) = (tries(1), tries(4));
    assert!(one >= 1 && four == 4 * one, "retry-attempts=1: {one} requests, retry-attempts=4: {four}");
}

/// `tls-certificate` and `tls-private-key`: narq presents the client certificate a store
/// requires (mTLS, behind tests/tools/mtls_proxy.py); without one the store refuses it, and
/// an unreadable one is an error naming the parameter.
#[test]
fn s3_client_certificate_is_presented() {
    let t = TempDir::new("s3mtls");
    let moto = Moto::start(t.path(), &[]);
    moto.bucket("narq-mtls");
    run(Command::new(venv_bin("python")).args(["-c", &format!(
        "import boto3\nboto3.client('s3', endpoint_url='http://127.0.0.1:{}', aws_access_key_id='t', aws_secret_access_key='t', \
         region_name='us-east-1').put_object(Bucket='narq-mtls', Key='nix-cache-info', Body=b'StoreDir: /nix/store\\n')",
        moto.port
    )]));
    let port = free_port();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tools/mtls_proxy.py");
    let mut proxy = Command::new(venv_bin("python"))
        .arg(script)
        .arg(t.path())
        .args([moto.port.to_string(), port.to_string()])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_for(Duration::from_secs(20), || t.join("ready").exists()), "mtls proxy did not start");
    let n = Narq::new("s3mtls", "");
    let verify = |extra: &str| {
        let url = format!("s3://narq-mtls?endpoint=https://127.0.0.1:{port}{extra}");
        output(
            Command::new(bin("narq"))
                .args(["verify", "--store", &url])
                .env("NARQ_CONFIG", &n.config)
                .env("SSL_CERT_FILE", t.join("ca.pem"))
                .env("AWS_ACCESS_KEY_ID", "test")
                .env("AWS_SECRET_ACCESS_KEY", "test")
                .env("AWS_EC2_METADATA_DISABLED", "true"),
        )
    };
    let with = verify(&format!("&tls-certificate={}&tls-private-key={}", t.join("client.pem").display(), t.join("client.key").display()));
    let without = verify("");
    let unreadable = verify("&tls-certificate=/nonexistent/c.pem");
    let _ = proxy.kill();
    let _ = proxy.wait();
    assert!(with.status.success(), "with the client certificate: {}{}", String::from_utf8_lossy(&with.stdout), String::from_utf8_lossy(&with.stderr));
    assert!(!without.status.success(), "the store took a request without a client certificate");
    let e = String::from_utf8_lossy(&unreadable.stderr);
    assert!(!unreadable.status.success() && e.contains("tls-certificate /nonexistent/c.pem"), "{e}");
}
