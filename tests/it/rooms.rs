//! The daemon in rooms (issue 10): the dispatcher owns the in-flight set and the breaker, and
//! nothing a worker does can stop it.

use crate::util::*;
use std::process::Command;
use std::time::Duration;

/// A worker whose upload panics used to die with its item still counted in flight: with
/// `jobs = 1` that was the only slot, and nothing was uploaded again until a restart. The
/// panic (made by the debug-only `NARQ_TEST_PANIC_ON` hook) must be reported as a failure
/// that may pass, retried, and its slot used for the next item.
#[test]
fn a_panicking_upload_is_reported_and_its_slot_reused() {
    let mut n = Narq::new("rooms-panic", "jobs = 1");
    let u = unique();
    let doomed = format!("doomed-{u}");
    n.spawn_daemon(Command::new(bin("narq")).arg("daemon").env_remove("JOURNAL_STREAM").env("NARQ_TEST_PANIC_ON", &doomed));
    assert!(wait_for(Duration::from_secs(10), || n.narq(&["status"]).status.success()), "daemon did not come up: {}", n.daemon_log());

    let (bad, _) = n.build(&sh_drv(&doomed, "echo doomed > $out"));
    assert!(
        wait_for(Duration::from_secs(20), || n.daemon_log().contains("the upload panicked")),
        "the panic was not reported: {}",
        n.daemon_log()
    );
    let (good, _) = n.build(&sh_drv(&format!("fine-{u}"), "echo fine > $out"));
    assert!(wait_for(Duration::from_secs(30), || n.has(&good[0])), "the only worker slot was not freed: {}", n.daemon_log());
    assert!(!n.has(&bad[0]));

    // Reported as a failure of that item that may pass, with the panic's message, and retried.
    let log = n.daemon_log();
    assert!(
        log.lines().any(|l| l.contains("upload failed, will retry") && l.contains(&bad[0]) && l.contains("NARQ_TEST_PANIC_ON")),
        "{log}"
    );
    assert!(
        wait_for(Duration::from_secs(20), || {
            let retried = format!("will retry: {}: the upload panicked", bad[0]);
            n.daemon_log().lines().filter(|l| l.contains(&retried)).count() >= 2
        }),
        "the item was not retried: {}",
        n.daemon_log()
    );
    let st = n.status();
    assert!(st["pending"].as_u64().unwrap() >= 1, "{st}");
    assert!(st["in_flight"].as_u64().unwrap() <= 1, "{st}");
}
