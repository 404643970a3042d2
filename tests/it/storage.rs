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
