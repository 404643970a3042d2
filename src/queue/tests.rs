//! The queue's unit tests.

use std::collections::HashSet;

use super::*;
use crate::nix::{PathInfo, Realisation, Sha256, StorePath};
use crate::outcome::Outcome;
use crate::protocol::{Failure, WaitSummary};

/// An empty queue in a temp dir of its own (`narq-queue-<tag>-<pid>`), and the dir.
fn fresh_queue(tag: &str) -> (std::path::PathBuf, Queue) {
    let dir = std::env::temp_dir().join(format!("narq-queue-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let q = Queue::open(&dir.join("q.db")).unwrap();
    (dir, q)
}

fn info(name: &str, refs: &[&str]) -> PathInfo {
    let p = |n: &str| StorePath::parse(&format!("/nix/store/{}-{n}", "0".repeat(31) + &n[..1])).unwrap();
    PathInfo {
        path: p(name),
        nar_hash: Sha256::digest(name.as_bytes()),
        nar_size: 8,
        references: refs.iter().map(|r| p(r)).chain([p(name)]).collect(),
        deriver: None,
        sigs: Default::default(),
        ca: None,
    }
}

#[test]
fn an_excluded_path_marks_its_referrers_and_realisations_and_is_reported_not_failed() {
    let (dir, mut q) = fresh_queue("excl");
    let (a, b) = (info("a", &[]), info("b", &["a"]));
    q.enqueue(&[a.clone(), b.clone()], None).unwrap();
    let r = Realisation { id: format!("sha256:{}!out", "0".repeat(64)), out_path: a.path.clone(), signatures: Default::default(), dependent_realisations: Default::default(), build_trace: None };
    q.enqueue_realisations(std::slice::from_ref(&r)).unwrap();
    let ready = q.ready(10, &HashSet::new()).unwrap();
    assert_eq!(ready.iter().map(|i| (i.key.as_str(), i.excluded_ref.as_deref())).collect::<Vec<_>>(), [(&*a.path.to_string(), None)]);
    q.done(&a.path.to_string(), Outcome::Excluded("its name matches exclude pattern \"a*\"".into()), None).unwrap();
    // Both the referrer and the realisation come out marked with the excluded reference.
    let mut ready: Vec<(String, Option<String>)> = q.ready(10, &HashSet::new()).unwrap().into_iter().map(|i| (i.key, i.excluded_ref)).collect();
    ready.sort();
    let a_key = Some(a.path.to_string());
    assert_eq!(ready, [(b.path.to_string(), a_key.clone()), (format!("realisation:{}", r.id), a_key)]);
    let s = q.status().unwrap();
    assert_eq!((s.skipped, s.failed, s.recent_failures.len()), (1, 0, 0));
    assert_eq!(s.excluded, [Failure { item: a.path.to_string(), error: "its name matches exclude pattern \"a*\"".into() }]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn references_first_failures_cascade_done_is_remembered() {
    let (dir, mut q) = fresh_queue("main");
    let (a, b, c) = (info("a", &[]), info("b", &["a"]), info("c", &["b"]));
    assert_eq!(q.enqueue(&[c.clone(), b.clone(), a.clone()], None).unwrap(), 3);
    let keys = |v: Vec<Item>| v.into_iter().map(|i| i.key).collect::<Vec<_>>();
    assert_eq!(keys(q.ready(10, &HashSet::new()).unwrap()), [a.path.to_string()]);
    q.done(&a.path.to_string(), Outcome::Uploaded { bytes: 5 }, None).unwrap();
    assert_eq!(keys(q.ready(10, &HashSet::new()).unwrap()), [b.path.to_string()]);
    // A transient failure keeps it pending but not ready until the backoff passes.
    q.retry_later(&b.path.to_string(), 0, "network").unwrap();
    assert!(q.ready(10, &HashSet::new()).unwrap().is_empty());
    assert!(q.next_retry_in().unwrap().unwrap() <= Duration::from_secs(1));
    // A retry time further ahead than the longest backoff was set before the clock stepped
    // back (here two hours): due now, not in two hours (the explorer found a daemon stuck so).
    q.conn.execute("UPDATE items SET next_try = next_try + 7200000 WHERE key = ?1", [b.path.to_string()]).unwrap();
    assert_eq!(q.next_retry_in().unwrap(), Some(Duration::ZERO));
    assert_eq!(keys(q.ready(10, &HashSet::new()).unwrap()), [b.path.to_string()]);
    // A permanent failure fails its dependents.
    assert_eq!(q.fail(&b.path.to_string(), "hash mismatch").unwrap(), 1);
    let s = q.status().unwrap();
    assert_eq!((s.pending, s.failed, s.uploaded, s.bytes), (0, 2, 1, 5));
    // A build log is counted apart from the paths, and pending paths with their NAR size.
    let drv = StorePath::parse(&format!("/nix/store/{}-x.drv", "1".repeat(32))).unwrap();
    q.enqueue(&[info("d", &[])], Some(&drv)).unwrap();
    let s = q.status().unwrap();
    assert_eq!((s.pending, s.pending_paths, s.pending_bytes), (2, 1, 8));
    q.done(&format!("log:{drv}"), Outcome::Uploaded { bytes: 3 }, None).unwrap();
    q.done(&info("d", &[]).path.to_string(), Outcome::Present, None).unwrap();
    let s = q.status().unwrap();
    assert_eq!((s.uploaded, s.logs_uploaded, s.skipped, s.bytes, s.pending), (1, 1, 1, 8, 0));
    // Re-enqueuing: done stays done, failed is retried.
    assert_eq!(q.enqueue(&[a.clone(), b.clone()], None).unwrap(), 1);
    assert_eq!(keys(q.ready(10, &HashSet::new()).unwrap()), [b.path.to_string()]);
    drop(q);
    // Reopened (as after kill -9): the same state.
    let q = Queue::open(&dir.join("q.db")).unwrap();
    assert_eq!(q.status().unwrap().pending, 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// After a collection, `done` is not trusted: what a pending path or a new request reaches
/// is looked for again before it is relied on; the rest is not uploaded again for that alone.
#[test]
fn a_failure_below_a_stale_path_is_found_from_it() {
    let (dir, mut q) = fresh_queue("failedbelow");
    let (d, r) = (info("d", &[]), info("r", &["d"]));
    q.enqueue(&[d.clone(), r.clone()], None).unwrap();
    q.done(&d.path.to_string(), Outcome::Uploaded { bytes: 1 }, None).unwrap();
    q.done(&r.path.to_string(), Outcome::Uploaded { bytes: 1 }, None).unwrap();
    q.fail(&d.path.to_string(), "not while done").unwrap();
    assert!(q.failed_below(&[&r.path], 10).unwrap().is_empty(), "below a done path nothing is looked at");
    q.enqueue(&[d.clone()], None).unwrap();
    q.done(&d.path.to_string(), Outcome::Uploaded { bytes: 1 }, None).unwrap();
    // A collection makes both stale; d is sent again and fails for good: r, still held, relies on it.
    q.note_generation("g1").unwrap();
    q.enqueue(&[d.clone()], None).unwrap();
    q.fail(&d.path.to_string(), "unreadable").unwrap();
    assert_eq!(q.not_queued(&[&r.path]).unwrap(), Vec::<StorePath>::new());
    assert_eq!(q.failed_below(&[&r.path], 10).unwrap(), [d.path.clone()]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_new_generation_makes_done_stale_and_repends_what_uploads_rely_on() {
    let (dir, mut q) = fresh_queue("gen");
    let keys = |v: Vec<Item>| v.into_iter().map(|i| i.key).collect::<Vec<_>>();
    let (a, b, x, y) = (info("a", &[]), info("b", &["a"]), info("x", &[]), info("y", &["x"]));
    q.enqueue(&[a.clone(), x.clone()], None).unwrap();
    q.done(&a.path.to_string(), Outcome::Uploaded { bytes: 1 }, None).unwrap();
    q.done(&x.path.to_string(), Outcome::Uploaded { bytes: 1 }, None).unwrap();
    q.enqueue(&[b.clone()], None).unwrap();
    assert_eq!(q.note_generation("g1").unwrap(), 2);
    assert_eq!(q.note_generation("g1").unwrap(), 0, "the same generation changes nothing");
    // b is pending: a, which it references, is looked for again, and b waits for it.
    assert_eq!(keys(q.ready(10, &HashSet::new()).unwrap()), [a.path.to_string()]);
    // x is stale, not pending: nothing is uploaded again for the collection alone.
    assert_eq!(q.status().unwrap().pending, 2);
    // A request whose references were only remembered (the hook did not send x) repends them.
    q.enqueue(&[y.clone()], None).unwrap();
    let ready = keys(q.ready(10, &HashSet::new()).unwrap());
    assert!(ready.contains(&x.path.to_string()) && !ready.contains(&y.path.to_string()), "{ready:?}");
    // Roots are recorded once a day, and again after a new generation.
    q.note_roots(&[b.path.clone()]).unwrap();
    assert_eq!(q.roots_due(10).unwrap(), [b.path.clone()]);
    q.roots_recorded(&[b.path.clone()], Some("g1")).unwrap();
    q.note_roots(&[b.path.clone()]).unwrap();
    assert!(q.roots_due(10).unwrap().is_empty());
    q.note_roots(&[a.path.clone()]).unwrap();
    q.note_generation("g2").unwrap();
    assert_eq!(q.roots_due(10).unwrap(), [a.path.clone()], "a root not recorded yet stays due");
    q.note_roots(&[b.path.clone()]).unwrap();
    assert_eq!(q.roots_due(10).unwrap().len(), 2);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// What counts as uploaded is tied to the collection epoch it was settled in: a path (or a
/// root) settled in an epoch the queue has left behind is not trusted, and a root recorded
/// after a collection has its stale closure looked for again, for the `wait` of its request.
#[test]
fn results_settled_before_a_collection_are_not_trusted_after_it() {
    let (dir, mut q) = fresh_queue("epoch");
    let (a, b, c) = (info("a", &[]), info("b", &["a"]), info("c", &[]));
    let state = |q: &Queue, p: &PathInfo| q.conn.query_row("SELECT state FROM items WHERE key = ?1", [p.path.to_string()], |r| r.get::<_, String>(0)).unwrap();
    q.note_generation("g1").unwrap();
    q.enqueue(&[a.clone(), b.clone(), c.clone()], None).unwrap();
    q.note_roots(&[b.path.clone()]).unwrap();
    let seq = q.current_seq();
    q.done(&a.path.to_string(), Outcome::Uploaded { bytes: 1 }, Some("g1")).unwrap();
    q.done(&b.path.to_string(), Outcome::Uploaded { bytes: 1 }, Some("g1")).unwrap();
    q.note_generation("g2").unwrap();
    // c settled in g1, but the queue saw g2 before recording it: stale, not done.
    q.done(&c.path.to_string(), Outcome::Uploaded { bytes: 1 }, Some("g1")).unwrap();
    assert_eq!([state(&q, &a), state(&q, &b), state(&q, &c)], ["stale", "stale", "stale"]);
    assert_eq!(q.roots_pending(Some(seq), None).unwrap(), 1, "wait waits for the root");
    // A root put under g1 does not count under g2: it stays due.
    assert_eq!(q.roots_recorded(&[b.path.clone()], Some("g1")).unwrap(), 0);
    assert_eq!(q.roots_due(10).unwrap(), [b.path.clone()]);
    // Recorded under g2, its stale closure is pending again, in the request's place.
    assert_eq!(q.roots_recorded(&[b.path.clone()], Some("g2")).unwrap(), 2);
    assert_eq!(q.roots_pending(Some(seq), None).unwrap(), 0);
    let (pending, _) = q.progress(seq, 0).unwrap();
    assert_eq!(pending, 2, "a wait begun after the request waits for the closure looked for again");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn repair_makes_done_paths_pending_and_marked_until_done_again() {
    let (dir, mut q) = fresh_queue("repair");
    let (a, b) = (info("a", &[]), info("b", &["a"]));
    q.enqueue(&[a.clone(), b.clone()], None).unwrap();
    for p in [&a, &b] {
        q.done(&p.path.to_string(), Outcome::Present, None).unwrap();
    }
    // Enqueuing again leaves done paths alone; repair does not.
    assert_eq!(q.enqueue(&[a.clone(), b.clone()], None).unwrap(), 0);
    assert!(q.ready(10, &HashSet::new()).unwrap().is_empty());
    assert_eq!(q.repair(&[a.path.clone(), b.path.clone()]).unwrap(), 2);
    let ready = q.ready(10, &HashSet::new()).unwrap();
    assert_eq!(ready.iter().map(|i| (i.key.clone(), i.repair)).collect::<Vec<_>>(), [(a.path.to_string(), true)], "references first");
    q.done(&a.path.to_string(), Outcome::Uploaded { bytes: 1 }, None).unwrap();
    assert!(q.ready(10, &HashSet::new()).unwrap()[0].repair);
    q.done(&b.path.to_string(), Outcome::Uploaded { bytes: 1 }, None).unwrap();
    // Pending again for another reason (a recheck), it is no longer marked.
    assert_eq!(q.recheck(&[a.path.clone()]).unwrap(), 1);
    assert!(!q.ready(10, &HashSet::new()).unwrap()[0].repair);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The hints of `ready` (which reference holds an item back) never hold back an item that is
/// ready: not once that reference is done, nor when the item is queued again with others.
#[test]
fn what_holds_an_item_back_is_looked_at_again_when_it_changes() {
    let (dir, mut q) = fresh_queue("hint");
    let (a, b, c) = (info("a", &[]), info("b", &[]), info("c", &["a", "b"]));
    q.enqueue(&[a.clone(), b.clone(), c.clone()], None).unwrap();
    let keys = |v: Vec<Item>| v.into_iter().map(|i| i.key).collect::<Vec<_>>();
    let none = HashSet::new();
    assert_eq!(keys(q.ready(10, &none).unwrap()), [a.path.to_string(), b.path.to_string()]);
    // c waits for b, the last of its references in the queue's order.
    assert_eq!(q.blocked.get(&c.path.to_string()), Some(&b.path.to_string()));
    q.done(&b.path.to_string(), Outcome::Uploaded { bytes: 1 }, None).unwrap();
    assert_eq!(keys(q.ready(10, &none).unwrap()), [a.path.to_string()], "c still waits for a");
    assert_eq!(q.blocked.get(&c.path.to_string()), Some(&a.path.to_string()));
    // Queued again without a: it waits for nothing now.
    let c2 = info("c", &["b"]);
    q.enqueue(std::slice::from_ref(&c2), None).unwrap();
    assert_eq!(keys(q.ready(10, &[a.path.to_string()].into()).unwrap()), [c.path.to_string()]);
    assert!(q.blocked.is_empty());
    // b made pending again (a recheck) holds c back again, and the hint of an item that
    // ended without `ready` (failed) goes once every pending item was looked over.
    q.recheck(&[b.path.clone()]).unwrap();
    assert_eq!(keys(q.ready(1, &[a.path.to_string()].into()).unwrap()), [b.path.to_string()]);
    assert!(q.blocked.contains_key(&c.path.to_string()));
    q.fail(&b.path.to_string(), "gone").unwrap();
    assert!(q.ready(10, &[a.path.to_string()].into()).unwrap().is_empty());
    assert!(q.blocked.is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A reference whose state is not text (a damaged row) holds its referrer back, as the SQL
/// comparison did, and stops no other upload.
#[test]
fn a_damaged_reference_holds_back_only_its_referrers() {
    let (dir, mut q) = fresh_queue("hintbad");
    let (a, b, c) = (info("a", &[]), info("b", &["a"]), info("c", &[]));
    q.enqueue(&[a.clone(), b.clone(), c.clone()], None).unwrap();
    let keys = |v: Vec<Item>| v.into_iter().map(|i| i.key).collect::<Vec<_>>();
    q.conn.execute("UPDATE items SET state = X'00' WHERE key = ?1", [a.path.to_string()]).unwrap();
    assert_eq!(keys(q.ready(10, &HashSet::new()).unwrap()), [c.path.to_string()]);
    // Held with a hint too, once it was found waiting on a.
    q.conn.execute("UPDATE items SET state = 'pending' WHERE key = ?1", [a.path.to_string()]).unwrap();
    assert_eq!(keys(q.ready(10, &[a.path.to_string(), c.path.to_string()].into()).unwrap()), Vec::<String>::new());
    q.conn.execute("UPDATE items SET state = X'00' WHERE key = ?1", [a.path.to_string()]).unwrap();
    assert_eq!(keys(q.ready(10, &HashSet::new()).unwrap()), [c.path.to_string()]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A queue of narq before the `size` column sums its pending NARs' sizes from the infos once.
#[test]
fn an_older_queue_gains_the_sizes_of_its_pending_paths() {
    let (dir, mut q) = fresh_queue("size");
    q.enqueue(&[info("a", &[]), info("b", &["a"])], None).unwrap();
    q.conn.execute_batch("DROP INDEX items_sizes; ALTER TABLE items DROP COLUMN size; CREATE INDEX items_state ON items(state, seq)").unwrap();
    drop(q);
    let q = Queue::open(&dir.join("q.db")).unwrap();
    assert_eq!(q.status().unwrap().pending_bytes, 16);
    let indexes: Vec<String> = q.conn.prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'items' AND sql IS NOT NULL ORDER BY name").unwrap()
        .query_map([], |r| r.get(0)).unwrap().collect::<Result<_>>().unwrap();
    assert_eq!(indexes, ["items_order", "items_sizes"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_bad_row_fails_with_its_reason_and_stops_nothing_else() {
    let (dir, mut q) = fresh_queue("rows");
    let (a, b, c, d) = (info("a", &[]), info("b", &[]), info("c", &["b"]), info("d", &[]));
    q.enqueue(&[a.clone(), b.clone(), c.clone(), d.clone()], None).unwrap();
    let set = |sql: &str, key: &PathInfo| q.conn.execute(sql, [key.path.to_string()]).unwrap();
    set("UPDATE items SET attempts = 1 << 40 WHERE key = ?1", &a);
    set("UPDATE items SET info = '{not json' WHERE key = ?1", &b);
    set("UPDATE items SET kind = 'what' WHERE key = ?1", &d);
    // `status` still answers, counting the NAR sizes recorded when a, b and c were queued.
    assert_eq!(q.status().expect("status with a damaged row").pending_bytes, 24);
    let keys = |v: Vec<Item>| v.into_iter().map(|i| i.key).collect::<Vec<_>>();
    assert_eq!(keys(q.ready(10, &HashSet::new()).unwrap()), [a.path.to_string()]);
    let (pending, failed) = q.progress(i64::MAX, 0).unwrap();
    assert_eq!(pending, 1, "only a is left");
    let reasons: Vec<(String, String)> = failed.into_iter().map(|f| (f.item, f.error)).collect();
    for (k, e) in &reasons {
        match k {
            k if k == &b.path.to_string() => assert!(e.starts_with("unreadable queue row: path info:"), "{e}"),
            k if k == &c.path.to_string() => assert!(e.contains("depends on"), "{e}"),
            k if k == &d.path.to_string() => assert!(e.contains("unknown kind \"what\""), "{e}"),
            k => panic!("{k} failed: {e}"),
        }
    }
    assert_eq!(reasons.len(), 3);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_damaged_database_is_recognised_and_set_aside() {
    let dir = std::env::temp_dir().join(format!("narq-queue-bad-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("q.db");
    std::fs::write(&db, vec![b'x'; 8192]).unwrap();
    let e = Queue::open(&db).err().expect("garbage opens as a queue");
    assert!(is_corrupt(&e), "{e}");
    let to = set_aside(&db).unwrap();
    assert!(to.to_str().unwrap().contains("q.db.corrupt-") && to.exists() && !db.exists());
    Queue::open(&db).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Issue 21: after a `narq push` (a recheck) `status` went from "uploaded: 4" to
/// "uploaded: 2, skipped: 2", and the bytes written went down; a collection (`stale`)
/// counted uploaded paths as skipped.
#[test]
fn status_counts_never_go_down() {
    let (dir, mut q) = fresh_queue("counters");
    let (a, b) = (info("a", &[]), info("b", &["a"]));
    let drv = StorePath::parse(&format!("/nix/store/{}-b.drv", "1".repeat(32))).unwrap();
    q.enqueue(&[a.clone(), b.clone()], Some(&drv)).unwrap();
    let done = |q: &Queue, p: &PathInfo, bytes| q.done(&p.path.to_string(), Outcome::Uploaded { bytes }, None).unwrap();
    done(&q, &a, 500);
    done(&q, &b, 400);
    q.done(&format!("log:{drv}"), Outcome::Uploaded { bytes: 12 }, None).unwrap();
    let counts = |q: &Queue| {
        let s = q.status().unwrap();
        (s.uploaded, s.skipped, s.logs_uploaded, s.bytes, s.pending)
    };
    assert_eq!(counts(&q), (2, 0, 1, 912, 0));
    // `narq push` has both checked again: pending, then found in the cache.
    assert_eq!(q.recheck(&[a.path.clone(), b.path.clone()]).unwrap(), 2);
    assert_eq!(counts(&q), (2, 0, 1, 912, 2));
    q.done(&a.path.to_string(), Outcome::Present, None).unwrap();
    q.done(&b.path.to_string(), Outcome::Present, None).unwrap();
    assert_eq!(counts(&q), (2, 2, 1, 912, 0));
    // A collection makes them stale; a new store makes them pending: nothing goes down.
    q.note_generation("g1").unwrap();
    assert_eq!(counts(&q), (2, 2, 1, 912, 0));
    q.bind_store("file:///elsewhere").unwrap();
    done(&q, &a, 500);
    assert_eq!(counts(&q), (3, 2, 1, 1412, 2));
    // Reopened, and a queue made before the counters starts from what its items say.
    drop(q);
    let q = Queue::open(&dir.join("q.db")).unwrap();
    assert_eq!(counts(&q), (3, 2, 1, 1412, 2));
    q.conn.execute_batch("DROP TRIGGER count_done; DROP TABLE counters;").unwrap();
    drop(q);
    let q = Queue::open(&dir.join("q.db")).unwrap();
    assert_eq!(counts(&q), (1, 0, 0, 500, 2));
    done(&q, &b, 1);
    assert_eq!(counts(&q), (2, 0, 0, 501, 1));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Issue 21: `narq wait` after a build that uploaded 2 paths said "0/0 paths done".
#[test]
fn a_wait_summary_counts_what_the_wait_answers_for() {
    let (dir, mut q) = fresh_queue("summary");
    let (a, b, c) = (info("a", &[]), info("b", &["a"]), info("c", &[]));
    q.enqueue(&[a.clone()], None).unwrap();
    q.done(&a.path.to_string(), Outcome::Uploaded { bytes: 100 }, None).unwrap();
    let since = q.current_seq();
    let drv = StorePath::parse(&format!("/nix/store/{}-b.drv", "1".repeat(32))).unwrap();
    q.enqueue(&[a.clone(), b.clone()], Some(&drv)).unwrap();
    q.enqueue(&[c.clone()], None).unwrap();
    q.done(&b.path.to_string(), Outcome::Uploaded { bytes: 40 }, None).unwrap();
    q.done(&format!("log:{drv}"), Outcome::Uploaded { bytes: 2 }, None).unwrap();
    q.done(&c.path.to_string(), Outcome::Present, None).unwrap();
    let w = q.wait_summary(q.current_seq(), since, None).unwrap();
    // `a` was uploaded before: not this wait's.
    assert_eq!(w, WaitSummary { uploaded: 1, bytes: 42, skipped: 1, logs_uploaded: 1, failed: 0, pending: 0 });
    let w = q.wait_summary(0, 0, Some(&PathList::new(&[a.path.clone(), b.path.clone(), info("d", &[]).path]))).unwrap();
    assert_eq!(w, WaitSummary { uploaded: 2, bytes: 140, ..WaitSummary::default() });
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn backoff_is_capped_and_jittered() {
    assert!(backoff(0, "k") >= Duration::from_millis(500) && backoff(0, "k") < Duration::from_secs(1));
    assert!(backoff(30, "k") <= Duration::from_secs(300) && backoff(30, "k") >= Duration::from_secs(150));
}

/// What `push --wait` polls: the closure's pending count, and its failures, own, of builds
/// the hook dropped, and of paths the queue does not hold, root causes first.
#[test]
fn the_progress_of_a_closure_counts_its_pending_and_names_its_failures() {
    let (dir, mut q) = fresh_queue("progress");
    let (a, b, c, d, f) = (info("a", &[]), info("b", &["a"]), info("c", &[]), info("d", &[]), info("f", &[]));
    q.enqueue(&[a.clone(), b.clone(), c.clone()], None).unwrap();
    let all = PathList::new(&[a.path.clone(), b.path.clone(), c.path.clone()]);
    assert_eq!(q.progress_of(&all).unwrap(), (3, vec![]));
    q.done(&c.path.to_string(), Outcome::Uploaded { bytes: 1 }, None).unwrap();
    q.fail(&a.path.to_string(), "gone").unwrap();
    q.record_dropped(std::slice::from_ref(&d.path), None, "no key").unwrap();
    let (pending, failed) = q.progress_of(&PathList::new(&[a.path.clone(), b.path.clone(), c.path.clone(), d.path.clone(), f.path.clone()])).unwrap();
    assert_eq!(pending, 0);
    let failed: Vec<(String, &str)> = failed
        .iter()
        .map(|x| (x.item.clone(), if x.error.starts_with("depends on") { "dependent" } else if x.error.contains("not in the queue") { "unknown" } else { "own" }))
        .collect();
    let key = |p: &PathInfo| p.path.to_string();
    assert_eq!(failed, [(key(&a), "own"), (key(&d), "own"), (key(&b), "dependent"), (key(&d), "unknown"), (key(&f), "unknown")]);
    std::fs::remove_dir_all(&dir).unwrap();
}
