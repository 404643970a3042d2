//! The daemon as a process: connection limits, one daemon per state dir, what it cannot parse.

#[allow(unused_imports)]
use crate::util::*;
use std::process::Command;
use std::time::{Duration, Instant};

/// Waits up to `timeout` for `child` to exit; kills it if it does not. Returns its exit
/// status, or `None` when it had to be killed.
fn exited_within(child: &mut std::process::Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// Issue 9 item 13: a second daemon on the same state dir used to unlink the live socket
/// and wipe tmp/, leaving the first running but unreachable.
#[test]
fn second_daemon_on_the_same_state_dir_exits_and_names_the_first() {
    let mut n = Narq::new("second", "");
    n.start();
    let first = n.daemon_pid();
    let marker = n.dir.join("state/tmp/in-use");
    std::fs::write(&marker, "an upload's temp file").unwrap();
    let log = n.dir.join("second.log");
    let mut second = Command::new(bin("narq"))
        .arg("daemon")
        .env("NARQ_CONFIG", &n.config)
        .env_remove("JOURNAL_STREAM")
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let status = exited_within(&mut second, Duration::from_secs(10));
    let said = std::fs::read_to_string(&log).unwrap();
    let status = status.unwrap_or_else(|| panic!("the second daemon kept running; it said: {said}"));
    assert!(!status.success(), "the second daemon exited 0: {said}");
    let errors: Vec<&str> = said.lines().filter(|l| l.starts_with("narq: ")).collect();
    assert_eq!(errors.len(), 1, "one error line: {said}");
    assert!(errors[0].contains(&format!("pid {first}")), "the error does not name the first daemon's pid {first}: {said}");
    // The first daemon is untouched: its socket answers, its tmp/ is intact.
    assert!(n.narq(&["status"]).status.success(), "the first daemon is unreachable");
    assert!(marker.exists(), "the second daemon wiped the first one's tmp/");
    // Once the first has gone, a new daemon takes the state dir over.
    n.kill9();
    n.start();
}
