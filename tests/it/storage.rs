//! The storage backends: store-URL options checked when the config is read, and what
//! maintenance needs of a backend (list, get, delete, incomplete uploads), on a real
//! directory and a real S3 server (moto) on 127.0.0.1.

use crate::util::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `cmd` for at most `secs` (killed then); returns whether it exited successfully in
/// time, and its stderr.
fn run_bounded(cmd: &mut Command, dir: &TempDir, secs: u64) -> (Option<bool>, String) {
    let err = dir.join(format!("stderr-{}", unique()));
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(std::fs::File::create(&err).unwrap()).spawn().unwrap();
    let start = Instant::now();
    let mut done = None;
    while start.elapsed() < Duration::from_secs(secs) {
        if let Some(s) = child.try_wait().unwrap() {
            done = Some(s.success());
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if done.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    (done, std::fs::read_to_string(&err).unwrap_or_default())
}

#[test]
fn bad_store_parameters_are_refused_by_hook_cli_and_daemon_naming_file_and_key() {
    for (i, (params, problem)) in [
        ("s3://narq-bad?checksum=x", "checksum=\"x\": expected when-required or when-supported"),
        ("s3://narq-bad?endpoint=127.0.0.1:1&buffer-size=16M", "buffer-size=\"16M\" is not a number"),
        ("s3://narq-bad?multipart-upload=yes", "multipart-upload=\"yes\": expected true or false"),
        ("file:///tmp/narq-bad?region=eu-west-1", "unknown store parameter \"region\" for a file:// store"),
        ("file:///tmp/narq-bad?write-nar-listing=yes", "write-nar-listing=\"yes\": expected true or false"),
    ]
    .into_iter()
    .enumerate()
    {
        let n = Narq::new(&format!("badopt{i}"), &format!("store = \"{params}\""));
        let want = format!("config {}, key `store`: ", n.config.display());
        let env = [("NARQ_CONFIG", n.config.as_os_str()), ("AWS_EC2_METADATA_DISABLED", "true".as_ref())];

        let (ok, hook) = run_bounded(Command::new(bin("narq-hook")).env("OUT_PATHS", "/nix/store/00000000000000000000000000000000-x").envs(env), &n.dir, 20);
        assert_eq!(ok, Some(true), "the hook always exits 0: {hook}");
        assert!(hook.contains(&want) && hook.contains(problem), "hook, {params}: {hook}");

        let (ok, cli) = run_bounded(Command::new(bin("narq")).args(["status"]).envs(env), &n.dir, 20);
        assert_eq!(ok, Some(false), "narq status: {cli}");
        assert!(cli.contains(&want) && cli.contains(problem), "narq status, {params}: {cli}");

        let (ok, daemon) = run_bounded(Command::new(bin("narq")).args(["daemon"]).envs(env), &n.dir, 20);
        assert_eq!(ok, Some(false), "narq daemon: {daemon}");
        assert!(daemon.contains(&want) && daemon.contains(problem), "narq daemon, {params}: {daemon}");
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Hidden temp files (`.NAME.PID-N.tmp`) in `dir`.
fn temp_files(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.') && n.ends_with(".tmp"))
        .collect()
}

#[test]
fn a_failed_file_put_leaves_no_temp_file() {
    use narq::storage::{file::FileTarget, Body, Target};
    let t = TempDir::new("file-put-fails");
    let cache = t.join("cache");
    // The object's name is taken by a non-empty directory: the final rename fails.
    std::fs::create_dir_all(cache.join("nar/x.nar/inside")).unwrap();
    let target = FileTarget::open(cache.clone());
    let put = rt().block_on(target.put("nar/x.nar", Body::Bytes(b"nar".to_vec()), narq::storage::NAR_TYPE));
    let e = put.unwrap_err().to_string();
    assert!(e.contains("nar/x.nar"), "{e}");
    assert_eq!(temp_files(&cache.join("nar")), Vec::<String>::new());

    // A file body (the uploader's compressed NAR) is not left behind either, in the state
    // dir or in the cache.
    let src = t.join("state-x.nar.tmp");
    std::fs::write(&src, b"nar").unwrap();
    let body = Body::File(narq::storage::TempFile::new(src.clone()));
    assert!(rt().block_on(target.put("nar/x.nar", body, narq::storage::NAR_TYPE)).is_err());
    assert!(!src.exists());
    assert_eq!(temp_files(&cache.join("nar")), Vec::<String>::new());
    // And when the put succeeds, the object is whole and the temp names are gone.
    std::fs::write(&src, b"nar2").unwrap();
    let body = Body::File(narq::storage::TempFile::new(src.clone()));
    rt().block_on(target.put("nar/y.nar", body, narq::storage::NAR_TYPE)).unwrap();
    assert_eq!(std::fs::read(cache.join("nar/y.nar")).unwrap(), b"nar2");
    assert!(!src.exists());
    assert_eq!(temp_files(&cache.join("nar")), Vec::<String>::new());
}

/// What maintenance needs of a backend, on `target` (empty at first): `list`, `get`,
/// `open_read`, `delete`; `many` objects under `many/` make listing and deleting take more
/// than one page or batch.
fn maintenance_ops(target: &dyn narq::storage::Target, many: usize) {
    use narq::storage::{Body, NARINFO_TYPE};
    use std::collections::BTreeMap;
    use tokio::io::AsyncReadExt;
    let rt = rt();
    let put = |k: &str, v: &[u8]| rt.block_on(target.put(k, Body::Bytes(v.to_vec()), NARINFO_TYPE)).unwrap();
    put("a.narinfo", b"narinfo a");
    put("nar/x.nar.zst", &vec![7u8; 100_000]);
    put("log/y-drv", b"log");
    // Beside `nar/` and `log/` in key order (the hash alphabet holds n, l and r).
    let mut many_keys: Vec<String> = ["n0.narinfo", "nz.narinfo", "l0.narinfo", "lz.narinfo", "r0.narinfo", "zz.narinfo"].map(String::from).to_vec();
    let extra = many_keys.len();
    many_keys.extend((0..many).map(|i| format!("many/{i:05}")));
    for k in &many_keys {
        put(k, b"m");
    }
    let list = |prefix: &str| {
        let mut seen = BTreeMap::new();
        let now = std::time::SystemTime::now();
        let n = rt
            .block_on(target.list(prefix, &mut |o| {
                let age = o.last_modified.map(|t| now.duration_since(t).unwrap_or_default());
                assert!(age.is_some_and(|a| a < Duration::from_secs(600)), "{o:?}");
                seen.insert(o.key, o.size);
            }))
            .unwrap();
        assert_eq!(n as usize, seen.len());
        seen
    };
    let all = list("");
    assert_eq!(all.len(), 3 + extra + many);
    // The whole key space in ranges listed at once: every key once (S3: past the first page,
    // the ranges split at the hash alphabet, within nar/ and log/ too).
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<narq::storage::Object>>(2);
    let (n, mut keys) = rt.block_on(async {
        let pages = async {
            let mut keys = Vec::new();
            while let Some(page) = rx.recv().await {
                keys.extend(page.into_iter().map(|o| o.key));
            }
            keys
        };
        let (n, keys) = tokio::join!(target.list_all(4, tx), pages);
        (n.unwrap(), keys)
    });
    keys.sort();
    assert_eq!((n as usize, keys), (all.len(), all.keys().cloned().collect::<Vec<_>>()));
    assert_eq!((all["a.narinfo"], all["nar/x.nar.zst"], all["log/y-drv"]), (9, 100_000, 3));
    assert_eq!(list("nar/").into_iter().collect::<Vec<_>>(), [("nar/x.nar.zst".to_string(), 100_000)]);
    assert_eq!(list("many/").len(), many);
    assert!(list("zzz").is_empty());

    assert_eq!(rt.block_on(target.get("a.narinfo")).unwrap().as_deref(), Some(&b"narinfo a"[..]));
    assert_eq!(rt.block_on(target.get("b.narinfo")).unwrap(), None);
    let mut r = rt.block_on(target.open_read("nar/x.nar.zst")).unwrap().expect("the NAR is there");
    let mut nar = Vec::new();
    rt.block_on(r.read_to_end(&mut nar)).unwrap();
    assert_eq!(nar, vec![7u8; 100_000]);
    assert!(rt.block_on(target.open_read("nar/none.nar")).unwrap().is_none());

    let mut gone = many_keys.clone();
    gone.extend(["a.narinfo".to_string(), "never-there".to_string()]);
    rt.block_on(target.delete(&gone)).unwrap();
    assert_eq!(list("").into_keys().collect::<Vec<_>>(), ["log/y-drv", "nar/x.nar.zst"]);
    assert!(!rt.block_on(target.exists("a.narinfo")).unwrap());
}

#[test]
fn file_backend_lists_gets_deletes_and_aborts_temp_files() {
    use narq::storage::{file::FileTarget, Target};
    let t = TempDir::new("file-maint");
    let cache = t.join("cache");
    let target = FileTarget::open(cache.clone());
    maintenance_ops(&target, 1001);

    // A writer that died mid-object left its temp file: an incomplete upload.
    std::fs::write(cache.join("nar/.z.nar.zst.4242-7.tmp"), b"half").unwrap();
    std::fs::write(cache.join(".hidden-not-ours"), b"x").unwrap();
    let rt = rt();
    let inc = rt.block_on(target.list_incomplete("")).unwrap();
    assert_eq!(inc.len(), 1, "{inc:?}");
    assert_eq!((inc[0].key.as_str(), inc[0].id.as_str()), ("nar/z.nar.zst", "nar/.z.nar.zst.4242-7.tmp"));
    assert!(rt.block_on(target.list_incomplete("log/")).unwrap().is_empty());
    rt.block_on(target.abort_incomplete(&inc[0])).unwrap();
    assert!(!cache.join("nar/.z.nar.zst.4242-7.tmp").exists());
    assert!(rt.block_on(target.list_incomplete("")).unwrap().is_empty());
    // Aborting what is not a temp file of ours is refused.
    let not_temp = narq::storage::Incomplete { key: "nar/x.nar.zst".into(), id: "nar/x.nar.zst".into(), started: None };
    assert!(rt.block_on(target.abort_incomplete(&not_temp)).is_err());
    assert!(cache.join("nar/x.nar.zst").exists());
}

#[test]
fn s3_backend_lists_gets_deletes_and_aborts_multipart_uploads() {
    use narq::storage::{s3::S3Target, Target};
    use narq::store_url::{Location, StoreUrl};
    let t = TempDir::new("s3-maint");
    let moto = Moto::start(t.path(), &[]);
    moto.bucket("narq-maint");
    // The SDK reads credentials from the environment; these are moto's.
    std::env::set_var("AWS_ACCESS_KEY_ID", "test");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
    std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    let url = StoreUrl::parse(&format!("s3://narq-maint?endpoint=127.0.0.1:{}&scheme=http", moto.port)).unwrap();
    let Location::S3(options) = &url.location else { panic!() };
    let rt = rt();
    let target = rt.block_on(S3Target::new(options)).unwrap();
    // 1,001 keys: two pages to list, two DeleteObjects batches.
    maintenance_ops(&target, 1001);
    let log = std::fs::read_to_string(&moto.log).unwrap();
    let deletes = log.lines().filter(|l| l.contains("\"POST /narq-maint/?delete")).count();
    let posts: Vec<&str> = log.lines().filter(|l| l.contains("POST")).take(5).collect();
    assert_eq!(deletes, 2, "DeleteObjects requests: {posts:?}");

    // A multipart upload begun and never finished (as a killed daemon leaves one).
    let script = format!(
        "import boto3\n\
         s3 = boto3.client('s3', endpoint_url='http://127.0.0.1:{}', aws_access_key_id='test', \
         aws_secret_access_key='test', region_name='us-east-1')\n\
         print(s3.create_multipart_upload(Bucket='narq-maint', Key='nar/big.nar.zst')['UploadId'])\n",
        moto.port
    );
    let id = run(Command::new("python3").args(["-c", &script])).trim().to_string();
    let inc = rt.block_on(target.list_incomplete("nar/")).unwrap();
    assert_eq!(inc.len(), 1, "{inc:?}");
    assert_eq!((inc[0].key.as_str(), inc[0].id.as_str()), ("nar/big.nar.zst", id.as_str()));
    assert!(inc[0].started.is_some());
    assert!(rt.block_on(target.list_incomplete("log/")).unwrap().is_empty());
    rt.block_on(target.abort_incomplete(&inc[0])).unwrap();
    assert!(rt.block_on(target.list_incomplete("")).unwrap().is_empty());
    // Already gone: no error.
    rt.block_on(target.abort_incomplete(&inc[0])).unwrap();
}
