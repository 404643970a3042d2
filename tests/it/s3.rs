//! The S3 target against a real S3 server (moto) on 127.0.0.1, read back by a real Nix
//! client over plain HTTP.

use crate::daemon::program_expr;
use crate::util::*;
use std::process::Command;
use std::time::Duration;

fn s3_narq(tag: &str, port: u16, params: &str) -> Narq {
    Narq::new(tag, &format!("store = \"s3://narq-{tag}?endpoint=127.0.0.1:{port}&scheme=http{params}\""))
}

fn content_type(port: u16, path: &str) -> String {
    // GET, not HEAD: moto refuses anonymous HEAD requests whatever the bucket policy.
    let (head, _) = http(port, "GET", path);
    assert!(head.starts_with("http/1.1 200"), "GET {path}: {head}");
    head.lines().find_map(|l| l.strip_prefix("content-type: ")).unwrap_or("").trim().to_string()
}

#[test]
fn s3_build_lands_and_substitutes_over_http() {
    let t = TempDir::new("s3-moto");
    let moto = Moto::start(t.path(), &[]);
    moto.bucket("narq-s3land");
    let mut n = s3_narq("s3land", moto.port, "");
    n.start();
    let (outs, stderr) = n.build(&program_expr("s3land"));
    assert!(!stderr.contains("narq-hook:"), "{stderr}");
    n.wait(60);
    let bucket = format!("http://127.0.0.1:{}/narq-s3land", moto.port);
    let client = n.substitute_from(&outs[0], &bucket);
    assert_eq!(run(&mut Command::new(client.join(&outs[0][1..]).join("bin/hello"))), "hello from narq\n");

    // Nix's content types.
    let hash = &outs[0][11..43];
    let (_, narinfo) = http(moto.port, "GET", &format!("/narq-s3land/{hash}.narinfo"));
    let ni = narq::nix::NarInfo::parse(std::str::from_utf8(&narinfo).unwrap()).unwrap();
    assert_eq!(ni.compression, "zstd");
    assert_eq!(content_type(moto.port, &format!("/narq-s3land/{hash}.narinfo")), "text/x-nix-narinfo");
    assert_eq!(content_type(moto.port, &format!("/narq-s3land/{}", ni.url)), "application/x-nix-nar");
    assert_eq!(content_type(moto.port, "/narq-s3land/nix-cache-info"), "text/x-nix-cache-info");
    let drv = ni.info.deriver.unwrap();
    assert_eq!(content_type(moto.port, &format!("/narq-s3land/log/{}", drv.base_name())), "text/plain; charset=utf-8");

    // A second push of the same closure uploads nothing: the daemon only checks that the
    // closure is still there (a push always ends with it in the cache).
    let writes = |m: &Moto| {
        std::fs::read_to_string(&m.log).unwrap_or_default().lines().filter(|l| l.contains("\"PUT ") || l.contains("\"POST ")).count()
    };
    let before = writes(&moto);
    let start = std::time::Instant::now();
    let push = n.narq(&["push", "--wait", &outs[0]]);
    assert!(push.status.success());
    assert!(start.elapsed() < Duration::from_secs(1), "second push took {:?}", start.elapsed());
    assert!(String::from_utf8_lossy(&push.stderr).contains("enqueued 0 paths"), "{}", String::from_utf8_lossy(&push.stderr));
    assert_eq!(writes(&moto), before, "the second push uploaded something");

    // A narinfo deleted behind narq's back (within the listing's lifetime) comes back with a
    // push: the re-check asks the bucket, not the listing narq keeps.
    let delete = format!(
        "import boto3\nboto3.client('s3', endpoint_url='http://127.0.0.1:{}', aws_access_key_id='test', \
         aws_secret_access_key='test', region_name='us-east-1').delete_object(Bucket='narq-s3land', Key='{hash}.narinfo')\n",
        moto.port
    );
    run(Command::new(venv_bin("python")).args(["-c", &delete]));
    assert!(http(moto.port, "GET", &format!("/narq-s3land/{hash}.narinfo")).0.starts_with("http/1.1 404"));
    let push = n.narq(&["push", "--wait", &outs[0]]);
    assert!(push.status.success(), "{}", String::from_utf8_lossy(&push.stderr));
    assert!(http(moto.port, "GET", &format!("/narq-s3land/{hash}.narinfo")).0.starts_with("http/1.1 200"), "the deleted narinfo is still missing");
}

#[test]
fn s3_large_nar_goes_multipart_with_flat_memory() {
    let t = TempDir::new("s3-big");
    let moto = Moto::start(t.path(), &[]);
    moto.bucket("narq-s3big");
    // 5 MiB parts: a 160 MiB incompressible NAR is 32 parts or more.
    let mut n = s3_narq("s3big", moto.port, "&buffer-size=5242880");
    n.start();
    let file = t.join(format!("big-{}", unique()));
    run(Command::new("head").args(["-c", "167772160", "/dev/urandom"]).stdout(std::fs::File::create(&file).unwrap()));
    let p = run(Command::new("nix-store").arg("--add").arg(&file)).trim().to_string();
    std::fs::remove_file(&file).unwrap();
    let idle = peak_rss(n.daemon_pid());
    let push = n.narq(&["push", "--wait", &p]);
    assert!(push.status.success(), "{}\n{}", String::from_utf8_lossy(&push.stderr), n.daemon_log());
    let peak = peak_rss(n.daemon_pid());
    eprintln!("daemon peak RSS: {} MiB (idle {} MiB) for a 160 MiB NAR", peak >> 20, idle >> 20);
    assert!(peak < 64 << 20, "daemon peak RSS {} MiB: memory grows with the NAR", peak >> 20);
    // It went up in parts (to a temporary key, then copied to its own: the server's log
    // shows each part), and Nix substitutes it.
    let (_, narinfo) = http(moto.port, "GET", &format!("/narq-s3big/{}.narinfo", &p[11..43]));
    let ni = narq::nix::NarInfo::parse(std::str::from_utf8(&narinfo).unwrap()).unwrap();
    let parts = ni.file_size.unwrap().div_ceil(5 << 20) as usize;
    let log = std::fs::read_to_string(&moto.log).unwrap();
    let sent = log.lines().filter(|l| l.contains("\"PUT /narq-s3big/narq/tmp/") && l.contains("partNumber=")).count();
    assert!(parts >= 32 && sent == parts, "not a {parts}-part multipart upload: {sent} parts sent");
    n.substitute_from(&p, &format!("http://127.0.0.1:{}/narq-s3big", moto.port));
    let _ = Command::new("nix-store").args(["--delete", &p]).output();
}

#[test]
fn s3_outage_loses_nothing() {
    let t = TempDir::new("s3-outage");
    let moto = Moto::start(t.path(), &[]);
    moto.bucket("narq-s3down");
    let proxy = Proxy::start(moto.port);
    let mut n = s3_narq("s3down", proxy.port, "");
    n.start();
    proxy.set(false);
    let (outs, stderr) = n.build(&program_expr("s3down"));
    assert!(!stderr.contains("narq-hook:"), "the build noticed the outage: {stderr}");
    // Paused with a clear reason while S3 is down, nothing lost.
    assert!(
        wait_for(Duration::from_secs(20), || n.status()["target_error"].is_string()),
        "no target error in status: {}",
        n.status()
    );
    let s = n.status();
    assert_eq!(s["failed"], 0);
    assert!(s["pending"].as_u64().unwrap() >= 2, "{s}");
    assert!(n.daemon_log().contains("uploads paused"), "{}", n.daemon_log());
    std::thread::sleep(Duration::from_secs(3));
    proxy.set(true);
    n.wait(120);
    assert!(n.status()["target_error"].is_null());
    assert!(n.daemon_log().contains("uploads resumed"));
    n.substitute_from(&outs[0], &format!("http://127.0.0.1:{}/narq-s3down", moto.port));
}

#[test]
fn s3_wrong_credentials_give_one_clear_error() {
    let t = TempDir::new("s3-creds");
    // A server that checks credentials: the test's keys are unknown to it.
    let moto = Moto::start(t.path(), &[("INITIAL_NO_AUTH_ACTION_COUNT", "0")]);
    let mut n = s3_narq("s3creds", moto.port, "");
    n.start();
    let u = unique();
    let outs = nix_build(&nix_conf(n.dir.path(), None), &sh_drv(&format!("creds-{u}"), "echo x > $out"), &[]);
    let push = n.narq(&["push", &outs[0]]);
    assert!(push.status.success());
    assert!(wait_for(Duration::from_secs(20), || n.status()["target_error"].is_string()));
    let err = n.status()["target_error"].as_str().unwrap().to_string();
    assert!(err.contains("403 InvalidAccessKeyId") && err.contains("the store does not know this access key: check AWS_ACCESS_KEY_ID"), "{err}");
    let wait = n.narq(&["wait", "--timeout", "1"]);
    assert_eq!(wait.status.code(), Some(3));
    let status = String::from_utf8_lossy(&n.narq(&["status"]).stdout).to_string();
    assert!(status.contains("paused:") && status.contains("403"), "{status}");
    // One error line per pause, and no retry storm: the pause doubles.
    let before = moto.requests();
    std::thread::sleep(Duration::from_secs(4));
    let during = moto.requests() - before;
    assert!(during <= 4, "{during} requests in 4 s while credentials are wrong");
    let log = n.daemon_log();
    let lines = log.lines().filter(|l| l.contains("the store refuses us")).count();
    assert!((1..=6).contains(&lines), "{lines} error lines:\n{log}");
    assert_eq!(n.status()["failed"], 0, "a credentials problem must not fail paths for good");
}

#[test]
fn upstream_paths_are_not_uploaded_again() {
    let t = TempDir::new("upstream");
    let moto = Moto::start(t.path(), &[]);
    moto.bucket("narq-upstream");
    let u = unique();
    let expr = format!(
        "let dep = {}; in {}",
        sh_drv(&format!("up-dep-{u}"), "echo dep > $out"),
        sh_drv(&format!("up-top-{u}"), "echo ${dep} > $out")
    );
    let outs = nix_build(&nix_conf(t.path(), None), &expr, &[]);
    let dep = closure(&outs).into_iter().find(|p| p.contains("-up-dep-")).unwrap();
    // The dependency is in the upstream cache, put there by Nix's own uploader.
    run(Command::new("nix")
        .args(["--extra-experimental-features", "nix-command", "copy", "--to"])
        .arg(format!("http://127.0.0.1:{}/narq-upstream", moto.port))
        .arg(&dep));
    let mut n = Narq::new("upstream", &format!("upstream = [\"http://127.0.0.1:{}/narq-upstream/\"]", moto.port));
    n.start();
    let push = n.narq(&["push", "--wait", &outs[0]]);
    assert!(push.status.success(), "{}", String::from_utf8_lossy(&push.stderr));
    assert!(n.has(&outs[0]));
    assert!(!n.has(&dep), "a path of the upstream cache was uploaded again");
    let s = n.status();
    assert_eq!((s["uploaded"].as_u64(), s["skipped"].as_u64()), (Some(1), Some(1)), "{s}");
    assert!(n.daemon_log().contains("in an upstream cache"));
}
