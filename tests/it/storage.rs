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
        ("file:///tmp/narq-bad?write-nar-listing=true", "write-nar-listing=true is not supported yet"),
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
