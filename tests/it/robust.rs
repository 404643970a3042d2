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

/// Sets the modification time of the regular file `p` to `age` ago.
fn age(p: &std::path::Path, age: Duration) {
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.set_modified(std::time::SystemTime::now() - age).unwrap();
}

fn mkfifo(p: &std::path::Path) {
    run(Command::new("mkfifo").arg(p));
}

/// Issue 9 item 15, the spool: a FIFO named like a request wedged ingestion (and `narq
/// wait` with it); temp files of failed writes stayed forever; `rejected/` grew without
/// limit.
#[test]
fn spool_skips_and_reports_what_it_cannot_read_and_stays_bounded() {
    let mut n = Narq::new("spooljunk", "");
    let (outs, stderr) = n.build(&sh_drv(&format!("spooljunk-{}", unique()), "echo hi > $out"));
    assert!(stderr.contains("spooled to"), "{stderr}");
    let spool = n.dir.join("state/spool");
    // Sorted before the real request, so that it is read first.
    mkfifo(&spool.join("0000000000.000000000-1.req"));
    std::fs::write(spool.join("0000000000.000000001-1.req"), "not a frame").unwrap();
    std::fs::create_dir(spool.join("0000000000.000000002-1.req")).unwrap();
    let (stale, fresh) = (spool.join(".1.000000000-1.tmp"), spool.join(".2.000000000-1.tmp"));
    std::fs::write(&stale, "half a request").unwrap();
    age(&stale, Duration::from_secs(2 * 3600));
    std::fs::write(&fresh, "a request being written").unwrap();
    let rejected = spool.join("rejected");
    std::fs::create_dir(&rejected).unwrap();
    for i in 0..150u64 {
        let f = rejected.join(format!("old-{i:03}.req"));
        std::fs::write(&f, "refused long ago").unwrap();
        age(&f, Duration::from_secs(3600 + 60 * (150 - i)));
    }
    let ancient = rejected.join("ancient.req");
    std::fs::write(&ancient, "refused 40 days ago").unwrap();
    age(&ancient, Duration::from_secs(40 * 86400));

    n.start();
    let started = Instant::now();
    let out = n.narq(&["wait", "--timeout", "3"]);
    let took = started.elapsed();
    assert!(out.status.success(), "narq wait: {}\n{}", String::from_utf8_lossy(&out.stderr), n.daemon_log());
    assert!(took < Duration::from_secs(5), "narq wait --timeout 3 took {took:?}");
    assert!(outs.iter().all(|p| n.has(p)), "the spooled build was not uploaded:\n{}", n.daemon_log());

    // What could not be read is out of the spool, kept in rejected/, and reported.
    let left: Vec<_> = std::fs::read_dir(&spool).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    let mut left: Vec<&str> = left.iter().map(String::as_str).collect();
    left.sort();
    assert_eq!(left, [".2.000000000-1.tmp", "rejected"], "the stale temp file goes, the fresh one stays");
    let log = n.daemon_log();
    for name in ["0000000000.000000000-1.req", "0000000000.000000001-1.req", "0000000000.000000002-1.req"] {
        assert!(rejected.join(name).symlink_metadata().is_ok(), "{name} is not in rejected/");
        assert!(log.lines().any(|l| l.contains(name) && l.contains("WARN")), "{name} is not reported:\n{log}");
    }
    assert!(log.contains(".1.000000000-1.tmp"), "the stale temp file's removal is not reported:\n{log}");
    // rejected/ is capped: the newest 100 stay, older and too old ones go.
    let kept = std::fs::read_dir(&rejected).unwrap().count();
    assert_eq!(kept, 100, "rejected/ holds {kept} files");
    assert!(!ancient.exists() && !rejected.join("old-000.req").exists() && rejected.join("old-149.req").exists());
}

/// Issue 9 item 15, the queue: one row with an out-of-range value stopped every upload, and
/// one that did not parse stayed pending forever, unseen.
#[test]
fn a_bad_queue_row_is_reported_and_stops_nothing_else() {
    let mut n = Narq::new("badrow", "");
    // Uploads pause while the cache cannot be made: the requests stay pending in the queue.
    std::fs::create_dir_all(n.dir.join("state")).unwrap();
    std::fs::write(n.cache(), "not a directory").unwrap();
    n.start();
    let u = unique();
    let expr = format!(
        "[ ({}) ({}) ({}) ]",
        sh_drv(&format!("badrow-a-{u}"), "echo a > $out"),
        sh_drv(&format!("badrow-b-{u}"), "echo b > $out"),
        sh_drv(&format!("badrow-c-{u}"), "echo c > $out")
    );
    let (outs, _) = n.build(&expr);
    assert_eq!(outs.len(), 3);
    assert!(wait_for(Duration::from_secs(10), || n.status()["pending"] == 6), "{}", n.status());
    n.kill9();
    std::fs::remove_file(n.cache()).unwrap();
    let db = rusqlite::Connection::open(n.dir.join("state/queue.db")).unwrap();
    db.execute("UPDATE items SET attempts = 1 << 40 WHERE key = ?1", [&outs[0]]).unwrap();
    db.execute("UPDATE items SET info = '{\"path\": 7' WHERE key = ?1", [&outs[1]]).unwrap();
    drop(db);

    n.start();
    let out = n.narq(&["wait", "--timeout", "20"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "narq wait: {stderr}\n{}", n.daemon_log());
    assert!(n.has(&outs[0]) && n.has(&outs[2]), "the good rows were not uploaded:\n{}", n.daemon_log());
    assert!(!n.has(&outs[1]));
    assert!(stderr.contains(&format!("failed: {}: unreadable queue row: path info:", outs[1])), "{stderr}");
    let s = n.status();
    assert_eq!((s["failed"].as_u64(), s["pending"].as_u64()), (Some(1), Some(0)), "{s}");
    assert!(s["last_error"]["error"].as_str().unwrap().starts_with("unreadable queue row"), "{s}");
}

/// Issue 9 item 15: a damaged `queue.db` stopped start-up with no way forward.
#[test]
fn a_damaged_queue_is_set_aside_and_the_daemon_starts_afresh() {
    let mut n = Narq::new("corruptdb", "");
    n.start();
    let u = unique();
    let (first, _) = n.build(&sh_drv(&format!("corrupt-1-{u}"), "echo 1 > $out"));
    n.wait(30);
    n.kill9();
    // Damage every page but the first (the schema): the tables themselves are garbage.
    let db = n.dir.join("state/queue.db");
    let c = rusqlite::Connection::open(&db).unwrap();
    c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())).unwrap();
    drop(c);
    let mut bytes = std::fs::read(&db).unwrap();
    assert!(bytes.len() > 4096, "{} bytes", bytes.len());
    bytes[4096..].fill(0x5a);
    std::fs::write(&db, bytes).unwrap();
    // A build while the daemon is down is spooled.
    let (second, stderr) = n.build(&sh_drv(&format!("corrupt-2-{u}"), "echo 2 > $out"));
    assert!(stderr.contains("spooled to"), "{stderr}");

    n.start();
    // The first wait says that pending work may be lost, and where the damaged queue went;
    // the next one answers for what came after.
    let wait = n.narq(&["wait", "--timeout", "30"]);
    assert_eq!(wait.status.code(), Some(1));
    let said = String::from_utf8_lossy(&wait.stderr).to_string();
    assert!(said.contains("damaged") && said.contains("queue.db.corrupt-") && said.contains("narq push"), "{said}");
    n.wait(30);
    assert!(n.has(&second[0]), "the spooled build was not uploaded:\n{}", n.daemon_log());
    let log = n.daemon_log();
    let said: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(said.len(), 1, "one error line:\n{log}");
    assert!(said[0].contains("is damaged") && said[0].contains("queue.db.corrupt-"), "{}", said[0]);
    let aside: Vec<_> = std::fs::read_dir(n.dir.join("state"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|f| f.starts_with("queue.db.corrupt-"))
        .collect();
    assert!(!aside.is_empty(), "the damaged queue is not kept");
    // What was uploaded before is found in the cache, not uploaded again.
    let push = n.narq(&["push", "--wait", &first[0]]);
    assert!(push.status.success(), "{}", String::from_utf8_lossy(&push.stderr));
    assert_eq!(n.status()["skipped"], 1, "{}", n.status());
}

/// Resident memory of a process now, from /proc (VmRSS), in bytes.
fn rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

/// A frame header announcing a body of `len` bytes.
fn header(len: u32) -> Vec<u8> {
    let mut h = narq::protocol::MAGIC.to_vec();
    h.extend_from_slice(&narq::protocol::VERSION.to_le_bytes());
    h.extend_from_slice(&len.to_le_bytes());
    h
}

/// Issue 9 item 11: the body buffer was allocated in full as soon as a header arrived
/// (100 connections announcing 8 MiB each: 832 MB resident), and an answer the client
/// never read pinned the connection and its memory for good.
#[test]
fn a_connection_costs_what_it_sends_and_an_unread_answer_times_out() {
    use std::io::Write;
    let mut n = Narq::new("connmem", "");
    n.start();
    let pid = n.daemon_pid();
    // A large request (every path unknown: a ~10 MB answer), served and read. Its memory,
    // once freed, is what the allocator hands out to later large buffers, already touched.
    let paths: Vec<String> = (0..150_000).map(|i| format!("/nix/store/{}-p{i}", nixbase32(i))).collect();
    let req = serde_json::to_vec(&serde_json::json!({"op": "missing", "paths": paths})).unwrap();
    {
        let mut c = std::os::unix::net::UnixStream::connect(n.socket()).unwrap();
        c.write_all(&header(req.len() as u32)).unwrap();
        c.write_all(&req).unwrap();
        let answer: narq::protocol::Response = narq::protocol::read(&mut c).unwrap();
        assert!(matches!(answer, narq::protocol::Response::Missing { paths } if paths.len() == 150_000));
    }
    let (rss0, fds0) = (rss(pid), open_fds(pid));
    let conns: Vec<_> = (0..100)
        .map(|_| {
            let mut c = std::os::unix::net::UnixStream::connect(n.socket()).unwrap();
            c.write_all(&header(8 << 20)).unwrap();
            c.write_all(br#"{"op":"missing","#).unwrap();
            c
        })
        .collect();
    // (Give or take the spool poller's directory handle.)
    assert!(wait_for(Duration::from_secs(10), || open_fds(pid) >= fds0 + 99), "not all connections were accepted: {} fds, {fds0} before", open_fds(pid));
    std::thread::sleep(Duration::from_millis(500));
    let grown = rss(pid).saturating_sub(rss0);
    eprintln!("100 connections announcing 8 MiB each: resident memory grew by {} MiB", grown >> 20);
    assert!(grown < 64 << 20, "100 connections announcing 8 MiB each cost {} MiB", grown >> 20);
    drop(conns);
    assert!(wait_for(Duration::from_secs(10), || open_fds(pid) <= fds0 + 1), "closed connections stay open in the daemon");

    // Three clients send it again and never read the answer.
    let started = Instant::now();
    let stuck: Vec<_> = (0..3)
        .map(|_| {
            let mut c = std::os::unix::net::UnixStream::connect(n.socket()).unwrap();
            c.write_all(&header(req.len() as u32)).unwrap();
            c.write_all(&req).unwrap();
            c
        })
        .collect();
    assert!(n.narq(&["status"]).status.success(), "other clients are served meanwhile");
    assert!(
        wait_for(Duration::from_secs(30), || open_fds(pid) < fds0 + 3),
        "the daemon still holds the connections of clients that do not read ({} fds, {} before)",
        open_fds(pid),
        fds0
    );
    eprintln!("unread answers: connections dropped {:?} after the requests were sent", started.elapsed());
    drop(stuck);
}

/// A valid store-path hash part for `i` (32 nixbase32 characters).
fn nixbase32(mut i: usize) -> String {
    const ALPHABET: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
    (0..32)
        .map(|_| {
            let c = ALPHABET[i % 32] as char;
            i /= 32;
            c
        })
        .collect()
}

/// Issue 9 item 11: with a low file limit, 100 idle connections starved every other
/// client, and `accept: Too many open files` was logged ten times a second.
#[test]
fn idle_connections_of_one_user_do_not_starve_another() {
    let mut n = Narq::new("connlimit", "allowed-users = [\"nobody\"]");
    n.spawn_daemon(Command::new("prlimit").arg("--nofile=64:64").arg(bin("narq")).arg("daemon").env_remove("JOURNAL_STREAM"));
    assert!(wait_for(Duration::from_secs(10), || n.narq(&["status"]).status.success()), "{}", n.daemon_log());
    // Only for this test: let `nobody` reach the socket.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(n.socket(), std::fs::Permissions::from_mode(0o666)).unwrap();
    // 100 idle connections from root, connected before the other user comes.
    let mut idle: Vec<_> = (0..100).filter_map(|_| std::os::unix::net::UnixStream::connect(n.socket()).ok()).collect();
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..3 {
        let started = Instant::now();
        let out = output(
            Command::new("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(bin("narq"))
                .args(["status", "--json"])
                .env("NARQ_CONFIG", &n.config),
        );
        let took = started.elapsed();
        assert!(
            out.status.success() && took < Duration::from_secs(3),
            "status #{i} as another user: {} after {took:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            n.daemon_log()
        );
    }
    // Root's connections beyond its share were refused, with a reason the hook spools on.
    let last = idle.last_mut().unwrap();
    last.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    match narq::protocol::read::<narq::protocol::Response>(last) {
        Ok(narq::protocol::Response::Error { message, retryable: true }) => {
            assert!(message.contains("too many connections from uid 0"), "{message}")
        }
        other => panic!("a connection over the limit got {other:?}"),
    }
    drop(idle);
    let log = n.daemon_log();
    assert!(log.contains("refused a connection: uid 0 has"), "the refusals are not reported:\n{log}");
    let emfile = log.lines().filter(|l| l.contains("Too many open files")).count();
    assert!(emfile <= 2, "{emfile} lines about the file limit:\n{log}");
}
