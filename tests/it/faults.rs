//! S3 faults: a proxy that drops, throttles, fails and stalls; upload-side limits (logs, multipart, upstreams, credentials).

use crate::util::*;
use std::process::{Command, Stdio};
use std::time::Duration;

fn s3_narq(tag: &str, port: u16, params: &str, extra: &str) -> Narq {
    Narq::new(tag, &format!("store = \"s3://narq-{tag}?endpoint=127.0.0.1:{port}&scheme=http{params}\"\n{extra}"))
}

/// Starts the daemon with `env` as its whole AWS environment (no test credentials), HOME
/// pointing at an empty directory.
fn start_with_env(n: &mut Narq, env: &[(&str, &str)]) {
    let home = n.dir.join("home");
    std::fs::create_dir_all(&home).unwrap();
    let log = std::fs::OpenOptions::new().create(true).append(true).open(n.dir.join("daemon.log")).unwrap();
    let mut cmd = Command::new(bin("narq"));
    cmd.arg("daemon").env_remove("JOURNAL_STREAM").env("NARQ_CONFIG", &n.config).env("HOME", &home);
    for (k, _) in std::env::vars() {
        if k.starts_with("AWS_") {
            cmd.env_remove(k);
        }
    }
    let child = cmd.envs(env.iter().copied()).stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log).spawn().unwrap();
    n.daemon = Some(child);
    assert!(wait_for(Duration::from_secs(10), || n.narq(&["status"]).status.success()), "daemon did not come up: {}", n.daemon_log());
}

/// Issue 9 item 14: no credentials anywhere is one line naming where narq looked, in the
/// log and in `narq status`, not kilobytes of SDK internals.
#[test]
fn s3_missing_credentials_are_one_line() {
    let t = TempDir::new("nocreds");
    let moto = Moto::start(t.path(), &[]);
    moto.bucket("narq-nocreds");
    let mut n = s3_narq("nocreds", moto.port, "", "");
    start_with_env(&mut n, &[("AWS_EC2_METADATA_DISABLED", "true")]);
    let outs = nix_build(&nix_conf(n.dir.path(), None), &sh_drv(&format!("nocreds-{}", unique()), "echo x > $out"), &[]);
    assert!(n.narq(&["push", &outs[0]]).status.success());
    assert!(wait_for(Duration::from_secs(20), || n.status()["target_error"].is_string()), "{}", n.daemon_log());
    let err = n.status()["target_error"].as_str().unwrap().to_string();
    eprintln!("status: {err}");
    eprintln!("log:\n{}", n.daemon_log());
    assert!(err.contains("no AWS credentials found (looked in: env"), "{err}");
    assert!(err.len() < 400 && !err.contains('\n'), "{err}");
    let log = n.daemon_log();
    for noise in ["DispatchFailure", "dispatch failure", "IMDS token", "ConnectorError"] {
        assert!(!log.contains(noise), "{noise:?} in the daemon log:\n{log}");
    }
    let paused = log.lines().filter(|l| l.contains("uploads paused")).collect::<Vec<_>>();
    assert!(!paused.is_empty() && paused.iter().all(|l| l.contains("no AWS credentials found") && l.len() < 600), "{log}");
    assert_eq!(n.status()["failed"], 0);
}
