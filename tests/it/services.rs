//! S3 services' quirks (issue 20): calls a store does not implement are skipped, said in one
//! line, and the rest done; services' own rules (R2, B2 and older Ceph, virtual-hosted
//! only), enforced by the test proxy in front of moto; the errors users meet on real
//! services, each one line naming the fix.

use crate::s3proxy::{Fault, S3Proxy, Service};
use crate::util::*;
use std::process::{Command, Output};
use std::time::Duration;

/// narq writing to a moto bucket through an [`S3Proxy`]; Nix reads moto directly.
struct Behind {
    n: Narq,
    proxy: S3Proxy,
    moto: Moto,
    bucket: String,
    _t: TempDir,
}

impl Behind {
    /// `params` are added to the store URL, `extra` to the config.
    fn new(tag: &str, params: &str, extra: &str) -> Behind {
        let t = TempDir::new(tag);
        let moto = Moto::start(t.path(), &[]);
        let bucket = format!("narq-{tag}");
        moto.bucket(&bucket);
        let proxy = S3Proxy::start(moto.port);
        let n = Narq::new(tag, &format!("store = \"s3://{bucket}?endpoint=127.0.0.1:{}&scheme=http{params}\"\n{extra}", proxy.port));
        Behind { n, proxy, moto, bucket, _t: t }
    }

    /// `narq ARGS` with the test's S3 credentials.
    fn narq(&self, args: &[&str]) -> Output {
        output(
            scaled(Command::new(bin("narq")).args(args))
                .env("NARQ_CONFIG", &self.n.config)
                .env("AWS_ACCESS_KEY_ID", "test")
                .env("AWS_SECRET_ACCESS_KEY", "test")
                .env("AWS_EC2_METADATA_DISABLED", "true"),
        )
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/{}", self.moto.port, self.bucket)
    }
}

fn text(o: &Output) -> String {
    format!("status {}\nstdout:\n{}\nstderr:\n{}", o.status, String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A closure of three paths, one of them `big` bytes of random data (streamed up in parts
/// when larger than one).
fn closure_with_big(tag: &str, big: u64) -> String {
    let u = unique();
    format!(
        "let big = {}; lib = {}; in {}",
        sh_drv(&format!("{tag}-big-{u}"), &format!("head -c {big} /dev/urandom > $out")),
        sh_drv(&format!("{tag}-lib-{u}"), "echo lib > $out"),
        sh_drv(&format!("{tag}-top-{u}"), "echo ${big} ${lib} > $out"),
    )
}

/// Issue 20 item 2 and its "Done when": a store that implements neither
/// ListMultipartUploads, nor CopyObject (nor UploadPartCopy), nor `x-amz-checksum-*`, nor
/// conditional writes (each answered 501): uploads land (a NAR streamed to its temporary key
/// is copied through narq), and `verify`, `gc --dry-run`, `sign` and `rm` work, each saying
/// in one line what it skipped and why.
#[test]
fn calls_a_store_lacks_are_skipped_and_said() {
    // 5 MiB parts: the 12 MB path is streamed, then moved to its key.
    let mut b = Behind::new("lacks", "&buffer-size=5242880", "");
    let not_implemented = Fault::Answer(501, "NotImplemented");
    b.proxy.add("GET", "?uploads", not_implemented, usize::MAX);
    b.proxy.add_with_header("PUT", "", "x-amz-copy-source", not_implemented, usize::MAX);
    b.proxy.add_with_header("", "", "x-amz-checksum-", not_implemented, usize::MAX);
    b.proxy.add_with_header("PUT", "", "if-none-match", not_implemented, usize::MAX);
    b.proxy.add_with_header("PUT", "", "if-match", not_implemented, usize::MAX);
    b.n.start();
    let (outs, _) = b.n.build(&closure_with_big("lacks", 12_000_000));
    b.n.wait(120);
    let log = b.n.daemon_log();
    let copies = b.proxy.seen().iter().filter(|r| r.header("x-amz-copy-source").is_some()).count();
    assert_eq!(copies, 1, "CopyObject was tried again after the store said it does not implement it:\n{log}");
    let said: Vec<&str> = log.lines().filter(|l| l.contains("copied to their keys through this machine")).collect();
    assert!(said.len() == 1 && said[0].contains("501 NotImplemented"), "the fallback was not said once:\n{log}");
    b.n.substitute_from(&outs[0], &b.url());

    // The audit and the maintenance commands do the rest, and say what they skipped.
    let skipped = |o: &Output| String::from_utf8_lossy(&o.stderr).lines().filter(|l| l.starts_with("narq: skipped incomplete uploads")).count();
    let verify = b.narq(&["verify", "--deep"]);
    assert!(verify.status.success(), "{}", text(&verify));
    assert_eq!(skipped(&verify), 1, "{}", text(&verify));
    assert!(String::from_utf8_lossy(&verify.stderr).contains("HTTP 501 NotImplemented"), "{}", text(&verify));
    let json: serde_json::Value = serde_json::from_slice(&b.narq(&["verify", "--json"]).stdout).unwrap();
    assert_eq!(json["skipped"].as_array().map(Vec::len), Some(1), "{json}");
    let gc = b.narq(&["gc", "--dry-run", "--keep-days", "0", "--grace", "0s"]);
    assert!(gc.status.success() && skipped(&gc) == 1, "{}", text(&gc));
    assert!(String::from_utf8_lossy(&gc.stdout).contains("would remove"), "{}", text(&gc));
    let (sk2, pk2) = (b.n.dir.join("second.sec"), b.n.dir.join("second.pub"));
    run(Command::new("nix-store").args(["--generate-binary-cache-key", "second-1"]).arg(&sk2).arg(&pk2));
    let sign = b.narq(&["sign", "--key-file", sk2.to_str().unwrap(), "--all"]);
    // sign streams the narinfos and never asks for incomplete uploads: nothing to skip.
    assert!(sign.status.success() && skipped(&sign) == 0, "{}", text(&sign));
    assert!(String::from_utf8_lossy(&sign.stdout).contains("signed 3 paths with second-1"), "{}", text(&sign));
    // rm deletes (DeleteObjects): with Content-MD5, not the CRC32 this store refuses.
    let rm = b.narq(&["rm", &outs[0]]);
    assert!(rm.status.success(), "{}", text(&rm));
    assert!(http(b.moto.port, "GET", &format!("/{}/{}.narinfo", b.bucket, hash(&outs[0]))).0.starts_with("http/1.1 404"), "rm left the narinfo");
    // Refused were only the calls tried once to learn what the store lacks: the listing, the
    // copy, and the probe for conditional writes.
    let refused: Vec<_> = b
        .proxy
        .seen()
        .into_iter()
        .filter(|r| r.status == Some(501) && !r.target.contains("?uploads") && r.header("x-amz-copy-source").is_none() && !r.target.contains("/narq/probe/"))
        .collect();
    assert!(refused.is_empty(), "requests with checksums or conditions were sent: {refused:#?}");
}

/// Issue 20 item 3: R2's rules (parts of one size, one checksum at a time, bodies at most
/// 100 MB behind Cloudflare's proxy, here 10 MB): a closure with a streamed NAR lands and
/// substitutes; with `multipart-upload=false` the too-large NAR fails its item alone, and
/// the error names the setting that fixes it.
#[test]
fn r2_rules_are_kept() {
    const LIMIT: u64 = 10_000_000;
    let mut b = Behind::new("r2", "&buffer-size=5242880", "");
    b.proxy.service(Service::R2 { max_body: LIMIT });
    // The proxy refuses parts of several sizes, as R2 does (boto3 sends 5 MiB, then 6 MiB).
    let probe = format!(
        "import boto3, botocore\n\
         s3 = boto3.client('s3', endpoint_url='http://127.0.0.1:{}', aws_access_key_id='test', aws_secret_access_key='test', region_name='us-east-1')\n\
         u = s3.create_multipart_upload(Bucket='{}', Key='probe')['UploadId']\n\
         parts = [dict(PartNumber=i, ETag=s3.upload_part(Bucket='{1}', Key='probe', UploadId=u, PartNumber=i, Body=b'x' * n)['ETag']) for i, n in [(1, 5 << 20), (2, 6 << 20), (3, 1)]]\n\
         try:\n    s3.complete_multipart_upload(Bucket='{1}', Key='probe', UploadId=u, MultipartUpload=dict(Parts=parts))\n    print('taken')\n\
         except botocore.exceptions.ClientError as e:\n    print(e.response['Error']['Code'])\n\
         s3.abort_multipart_upload(Bucket='{1}', Key='probe', UploadId=u)\n",
        b.proxy.port, b.bucket
    );
    assert_eq!(run(Command::new(venv_bin("python")).args(["-c", &probe])).trim(), "InvalidPart");

    b.n.start();
    let (outs, _) = b.n.build(&closure_with_big("r2", 12_000_000));
    b.n.wait(120);
    b.n.substitute_from(&outs[0], &b.url());
    let parts = b.proxy.seen().iter().filter(|r| r.method == "PUT" && r.target.contains("partNumber=") && r.status == Some(200)).count();
    assert!(parts >= 3, "the big NAR did not go up in parts: {parts}");
    let verify = b.narq(&["verify"]);
    assert!(verify.status.success(), "{}", text(&verify));

    // One PUT of 12 MB: refused by the front proxy, the item fails, the rest goes on.
    let mut one = Behind::new("r2whole", "&multipart-upload=false", "jobs = 1");
    one.proxy.service(Service::R2 { max_body: LIMIT });
    one.n.start();
    let (outs, _) = one.n.build(&closure_with_big("r2whole", 12_000_000));
    let wait = one.n.narq(&["wait", "--timeout", "60"]);
    let s = one.n.status();
    let log = one.n.daemon_log();
    assert_eq!(wait.status.code(), Some(1), "{}\n{s}\n{log}", text(&wait));
    assert_eq!(s["failed"], 2, "the big path and its referrer fail, the rest lands: {s}\n{log}");
    let failed = log.lines().find(|l| l.contains("upload failed permanently")).unwrap_or_else(|| panic!("{log}"));
    assert!(failed.contains("HTTP 413") && failed.contains("keep multipart-upload=true"), "{failed}");
    let lib = closure(&outs).into_iter().find(|p| p.contains("-r2whole-lib-")).unwrap();
    assert!(http(one.moto.port, "GET", &format!("/{}/{}.narinfo", one.bucket, hash(&lib))).0.starts_with("http/1.1 200"));
}

/// Issue 20 item 3: B2 and older Ceph take no `x-amz-checksum-*` and no trailers, and want
/// Content-MD5 on DeleteObjects: with the default `checksum=when-required` (a custom
/// endpoint) uploads, `verify` and `rm` work; `checksum=when-supported` pauses the uploads
/// with one line naming the setting.
#[test]
fn b2_and_old_ceph_rules_are_kept() {
    let mut b = Behind::new("b2", "&buffer-size=5242880", "");
    b.proxy.service(Service::NoChecksums);
    b.n.start();
    let (outs, _) = b.n.build(&closure_with_big("b2", 12_000_000));
    b.n.wait(120);
    b.n.substitute_from(&outs[0], &b.url());
    let verify = b.narq(&["verify"]);
    assert!(verify.status.success(), "{}", text(&verify));
    let rm = b.narq(&["rm", &outs[0]]);
    assert!(rm.status.success(), "{}", text(&rm));
    let deletes: Vec<_> = b.proxy.seen().into_iter().filter(|r| r.method == "POST" && r.target.contains("?delete")).collect();
    assert!(!deletes.is_empty() && deletes.iter().all(|r| r.status == Some(200)), "{deletes:#?}");

    let mut sums = Behind::new("b2sums", "&checksum=when-supported", "");
    sums.proxy.service(Service::NoChecksums);
    sums.n.start();
    let p = nix_build(&nix_conf(sums.n.dir.path(), None), &sh_drv(&format!("b2sums-{}", unique()), "echo x > $out"), &[]).remove(0);
    assert!(sums.n.narq(&["push", &p]).status.success());
    assert!(wait_for(Duration::from_secs(20), || sums.n.status()["target_error"].is_string()), "{}", sums.n.daemon_log());
    let err = sums.n.status()["target_error"].as_str().unwrap().to_string();
    assert!(err.contains("InvalidArgument") && err.contains("set checksum=when-required in the store URL"), "{err}");
    assert!(!err.contains('\n') && err.len() < 400, "{err}");
    assert_eq!(sums.n.status()["failed"], 0, "a setting to change must not fail paths for good");
}

/// Issue 20 item 3: a service that takes virtual-hosted requests only: narq's path-style
/// requests are refused, and the error names `addressing-style=virtual`, with which the
/// upload lands.
#[test]
fn virtual_hosted_only_service_names_the_setting() {
    let mut b = Behind::new("vhost", "", "");
    b.proxy.service(Service::VirtualHostedOnly { domain: "s3.example.test" });
    b.n.start();
    let p = nix_build(&nix_conf(b.n.dir.path(), None), &sh_drv(&format!("vhost-{}", unique()), "echo x > $out"), &[]).remove(0);
    assert!(b.n.narq(&["push", &p]).status.success());
    assert!(wait_for(Duration::from_secs(20), || b.n.status()["target_error"].is_string()), "{}", b.n.daemon_log());
    let err = b.n.status()["target_error"].as_str().unwrap().to_string();
    assert!(err.contains("SecondLevelDomainForbidden") && err.contains("set addressing-style=virtual in the store URL"), "{err}");

    // With the setting it names, the path lands (the client reaches the virtual host
    // through `http_proxy`, which narq honours).
    let store = format!("s3://{}?endpoint=http://s3.example.test:{}&addressing-style=virtual", b.bucket, b.moto.port);
    let mut v = Narq::new("vhost-ok", &format!("store = \"{store}\""));
    v.start_env(&[("http_proxy", &format!("http://127.0.0.1:{}", b.proxy.port))]);
    let push = v.narq(&["push", "--wait", &p]);
    assert!(push.status.success(), "{}\n{}", text(&push), v.daemon_log());
    assert!(http(b.moto.port, "GET", &format!("/{}/{}.narinfo", b.bucket, hash(&p))).0.starts_with("http/1.1 200"));
}

/// Issue 20 item 5: the errors users meet on real services are one line each, naming the fix.
#[test]
fn service_errors_name_the_fix() {
    let b = Behind::new("errors", "", "");
    let first_line_error = |args: &[&str]| {
        let out = b.narq(args);
        assert!(!out.status.success(), "{}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "not one line: {err}");
        eprintln!("{}", lines[0]);
        lines[0].to_string()
    };
    let cases: [(Fault, &str, &[&str]); 3] = [
        (Fault::WrongRegion("eu-west-3"), "the bucket is in region \"eu-west-3\": set region=eu-west-3 in the store URL", &["PermanentRedirect"]),
        (Fault::Answer(403, "RequestTimeTooSkewed"), "this machine's clock is more than 15 minutes off the store's", &["set the clock"]),
        (Fault::Answer(403, "AccessDenied"), "these credentials lack s3:ListBucket on this bucket", &["needed by verify, gc, rm, sign and the daemon"]),
    ];
    for (fault, fix, also) in cases {
        b.proxy.add("GET", "list-type=2", fault, 1);
        let line = first_line_error(&["verify"]);
        assert!(line.contains(fix) && also.iter().all(|a| line.contains(a)), "{fault:?}: {line}");
    }
    // gc needs DeleteObject.
    let p = nix_build(&nix_conf(b.n.dir.path(), None), &sh_drv(&format!("errors-{}", unique()), "echo x > $out"), &[]).remove(0);
    let mut n = Narq::new("errors-up", &std::fs::read_to_string(&b.n.config).unwrap().lines().find(|l| l.starts_with("store")).unwrap().to_string());
    n.start();
    assert!(n.narq(&["push", "--wait", &p]).status.success(), "{}", n.daemon_log());
    b.proxy.add("POST", "?delete", Fault::Answer(403, "AccessDenied"), usize::MAX);
    let line = first_line_error(&["rm", &p]);
    assert!(line.contains("these credentials lack s3:DeleteObject on this bucket, needed by gc and rm"), "{line}");

    // A bucket that does not exist.
    let missing = Narq::new("errors-nobucket", &format!("store = \"s3://narq-nosuchbucket?endpoint=127.0.0.1:{}&scheme=http\"", b.moto.port));
    let out = output(scaled(Command::new(bin("narq")).args(["verify"])).env("NARQ_CONFIG", &missing.config).env("AWS_ACCESS_KEY_ID", "test").env("AWS_SECRET_ACCESS_KEY", "test"));
    let err = String::from_utf8_lossy(&out.stderr);
    eprint!("{err}");
    assert!(err.contains("NoSuchBucket") && err.contains("create it, or correct the bucket name or endpoint= in the store URL"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // TLS to an endpoint that speaks plain HTTP.
    let tls = Narq::new("errors-tls", &format!("store = \"s3://{}?endpoint=127.0.0.1:{}&scheme=https\"", b.bucket, b.moto.port));
    let out = output(scaled(Command::new(bin("narq")).args(["verify"])).env("NARQ_CONFIG", &tls.config).env("AWS_ACCESS_KEY_ID", "test").env("AWS_SECRET_ACCESS_KEY", "test"));
    let err = String::from_utf8_lossy(&out.stderr);
    eprint!("{err}");
    assert!(err.contains("TLS with the endpoint failed") && err.contains("add scheme=http"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

/// A key that may not abort multipart uploads (AccessDenied on AbortMultipartUpload, as a
/// policy without s3:AbortMultipartUpload gives): gc does the rest and says what it skipped
/// (it failed on it before).
#[test]
fn gc_skips_the_uploads_it_may_not_abort() {
    let b = Behind::new("noabort", "", "");
    let start = format!(
        "import boto3\n\
         s3 = boto3.client('s3', endpoint_url='http://127.0.0.1:{}', aws_access_key_id='test', aws_secret_access_key='test', region_name='us-east-1')\n\
         print(s3.create_multipart_upload(Bucket='{}', Key='narq/tmp/abandoned.nar.zst')['UploadId'])\n",
        b.moto.port, b.bucket
    );
    run(Command::new(venv_bin("python")).args(["-c", &start]));
    b.proxy.add("DELETE", "uploadId=", Fault::Answer(403, "AccessDenied"), usize::MAX);
    let gc = b.narq(&["gc", "--keep-days", "0", "--grace", "0s"]);
    let err = String::from_utf8_lossy(&gc.stderr);
    assert!(gc.status.success(), "{}", text(&gc));
    assert!(err.contains("skipped aborting incomplete uploads") && err.contains("AccessDenied"), "{}", text(&gc));
}
