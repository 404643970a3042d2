//! Issue 22: memory bounded by the work, not by the cache. `narq verify` streams the cache
//! (what it must compare across paths goes to disk, a part at a time), and `narq gc` keeps one
//! compact record per path; measured as peak RSS on synthetic caches of 25,000 and 100,000
//! signed paths. On 64d1f2c both grew by about 2.5 KiB a path (`NARQ_TEST_BIN_DIR` runs this
//! against its binaries, and it fails there).

use crate::util::*;
use narq::nix::{nixbase32, NarInfo, PathInfo, SecretKey, Sha256, StorePath};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Instant;

/// A NAR of one regular file.
fn nar_of(contents: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for s in [&b"nix-archive-1"[..], b"(", b"type", b"regular", b"contents", contents, b")"] {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s);
        out.resize(out.len().div_ceil(8) * 8, 0);
    }
    out
}

/// Writes a `file://` cache of `n` signed paths with tiny NARs: each path references up to
/// three of the 2,000 before it, every 20th is a root. Everything is written now: `gc
/// --grace 0s` plans the unrooted ones away. The paths are signed and written on two threads.
fn synthetic(cache: &Path, n: usize, key: &SecretKey) {
    std::fs::create_dir_all(cache.join("nar")).unwrap();
    std::fs::create_dir_all(cache.join("narq/roots")).unwrap();
    std::fs::write(cache.join("nix-cache-info"), "StoreDir: /nix/store\n").unwrap();
    let paths: Vec<StorePath> = (0..n)
        .map(|i| {
            let hash = nixbase32::encode(&Sha256::digest(format!("scale-{n}-{i}").as_bytes()).0[..20]);
            StorePath::parse(&format!("/nix/store/{hash}-scale-{i}")).unwrap()
        })
        .collect();
    let mut seed = 0x2545f4914f6cdd1du64;
    let mut next = move |m: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % m as u64) as usize
    };
    let refs: Vec<Vec<usize>> = (0..n).map(|i| (0..(if i > 0 { next(4) } else { 0 })).map(|_| i - 1 - next(i.min(2000))).collect()).collect();
    let write = |i: usize| {
        let path = &paths[i];
        let nar = nar_of(format!("{path}\n").as_bytes());
        let nar_hash = Sha256::digest(&nar);
        let references = refs[i].iter().map(|r| paths[*r].clone()).collect();
        let info = PathInfo { path: path.clone(), nar_hash, nar_size: nar.len() as u64, references, deriver: None, sigs: Default::default(), ca: None };
        let url = format!("nar/{}.nar", nar_hash.to_base32());
        let mut ni = NarInfo { info, url, compression: "none".into(), file_hash: Some(nar_hash), file_size: Some(nar.len() as u64) };
        ni.info.sign(key);
        std::fs::write(cache.join(&ni.url), &nar).unwrap();
        std::fs::write(cache.join(format!("{}.narinfo", path.hash_part())), ni.to_string()).unwrap();
        if i % 20 == 19 {
            std::fs::write(cache.join(format!("narq/roots/{}", path.hash_part())), format!("{path}\nnarq-protocol 2\n")).unwrap();
        }
    };
    std::thread::scope(|s| {
        let write = &write;
        for half in [0, 1] {
            s.spawn(move || (half..n).step_by(2).for_each(write));
        }
    });
}

/// Runs `cmd` to its end: its output and its peak resident memory in bytes, as GNU time
/// reports it. Not this process's own wait4: Linux counts in a child's peak the memory of
/// the process it was spawned from (the test binary, hundreds of MiB while the whole suite
/// runs), and `time` is a small process in between.
fn peak(cmd: &mut Command) -> (Output, u64) {
    let t = TempDir::new("scale-rss");
    let file = t.join("rss");
    let mut timed = Command::new("/usr/bin/time");
    timed.arg("-f").arg("%M").arg("-o").arg(&file).arg(cmd.get_program()).args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => timed.env(k, v),
            None => timed.env_remove(k),
        };
    }
    let out = timed.stdin(Stdio::null()).output().unwrap();
    let kib: u64 = std::fs::read_to_string(&file).unwrap_or_default().lines().last().and_then(|l| l.trim().parse().ok()).unwrap_or_else(|| panic!("no peak RSS from /usr/bin/time: {out:?}"));
    (out, kib * 1024)
}

#[test]
fn verify_does_not_grow_with_the_cache_and_gc_keeps_under_200_bytes_a_path() {
    let began = Instant::now();
    let t = TempDir::new("scale");
    let key = SecretKey::generate("scale-1").unwrap();
    eprintln!("set up in {:.1} s", began.elapsed().as_secs_f64());
    let mut measured = Vec::new();
    for n in [25_000usize, 100_000] {
        let start = Instant::now();
        let cache = t.join(format!("cache-{n}"));
        synthetic(&cache, n, &key);
        let config = t.join(format!("narq-{n}.toml"));
        std::fs::write(
            &config,
            format!(
                "store = \"file://{}\"\nstate-dir = \"{}\"\nsocket = \"{}\"\npublic-keys = [\"{}\"]\n",
                cache.display(),
                t.join(format!("state-{n}")).display(),
                t.join(format!("sock-{n}")).display(),
                key.public().to_nix_string()
            ),
        )
        .unwrap();
        let generated = start.elapsed();
        let narq = |args: &[&str]| {
            let (out, rss) = peak(Command::new(bin("narq")).args(args).env("NARQ_CONFIG", &config));
            assert!(out.status.success(), "narq {args:?}: {}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            (out, rss)
        };
        let t = Instant::now();
        let (out, verify) = narq(&["verify"]);
        let verify_secs = t.elapsed();
        assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("checked {n} paths")), "{}", String::from_utf8_lossy(&out.stdout));
        let t = Instant::now();
        let (out, gc) = narq(&["gc", "--dry-run", "--grace", "0s"]);
        let gc_secs = t.elapsed();
        let summary = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or("").to_string();
        assert!(summary.starts_with("gc: would remove ") && !summary.starts_with("gc: would remove 0 paths"), "{summary}");
        let t = Instant::now();
        std::fs::remove_dir_all(&cache).unwrap();
        eprintln!(
            "{n} paths: generated in {:.1} s; verify {:.1} s, peak RSS {:.1} MiB; gc --dry-run {:.1} s, {:.1} MiB; removed in {:.1} s",
            generated.as_secs_f64(),
            verify_secs.as_secs_f64(),
            verify as f64 / 1048576.0,
            gc_secs.as_secs_f64(),
            gc as f64 / 1048576.0,
            t.elapsed().as_secs_f64()
        );
        measured.push((n, verify, gc));
    }
    let [(n0, v0, g0), (n1, v1, g1)] = measured[..] else { unreachable!() };
    let more = (n1 - n0) as u64;
    // Four times the paths: the same memory but what a scan has in flight (a few MiB of
    // pages, batches and SQLite's cache; 64d1f2c: ~180 MiB more).
    assert!(v1 <= v0 + (8 << 20), "verify grew by {} KiB from {n0} to {n1} paths ({} bytes a path)", (v1 - v0.min(v1)) / 1024, (v1.saturating_sub(v0)) / more);
    assert!(g1 <= g0 + 200 * more, "gc --dry-run grew by {} bytes a path from {n0} to {n1} paths", g1.saturating_sub(g0) / more);
}
