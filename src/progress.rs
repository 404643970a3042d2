//! How the CLI shows the daemon's state to people: `narq status` (sizes in MiB, rates in
//! MiB/s, the uploads in flight, why uploads are paused, root causes first), and the
//! progress of `narq wait` / `push --wait`.
//!
//! On a terminal the progress is one line redrawn in place (`\r` and erase-to-end-of-line,
//! cut to the terminal's width so that it never wraps); otherwise it is a plain line every
//! [`PLAIN_EVERY`] while something changes, without escape codes, for CI logs. Hand-written
//! rather than `indicatif`: one line of text needs neither its dependencies nor its
//! drawing thread.
//!
//! The progress counts what the daemon does while we wait, from `status` polled
//! alongside the wait itself: paths done since the wait began over those plus the ones
//! pending, NAR bytes read over those plus the NAR bytes pending, the rate over the last
//! few seconds, and the ETA from both.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::Write;
use std::time::{Duration, Instant};

use crate::protocol::{Status, WaitSummary};

/// How often a plain (non-terminal) progress line is written at most.
pub const PLAIN_EVERY: Duration = Duration::from_secs(5);
/// How often the terminal line is redrawn.
pub const TTY_EVERY: Duration = Duration::from_millis(250);
/// The window the rate is measured over.
const RATE_WINDOW: Duration = Duration::from_secs(5);

const KIB: f64 = 1024.0;

/// Bytes for people: B below a KiB, then KiB, MiB, GiB with one decimal.
pub fn bytes(n: u64) -> String {
    let f = n as f64;
    match n {
        0..1024 => format!("{n} B"),
        _ if f < KIB * KIB => format!("{:.1} KiB", f / KIB),
        _ if f < KIB * KIB * KIB => format!("{:.1} MiB", f / (KIB * KIB)),
        _ => format!("{:.1} GiB", f / (KIB * KIB * KIB)),
    }
}

/// A rate in bytes per second for people, in MiB/s (the unit a user compares with a link).
pub fn rate(bytes_per_sec: f64) -> String {
    format!("{:.1} MiB/s", bytes_per_sec.max(0.0) / (KIB * KIB))
}

/// A duration for people: `42s`, `3m05s`, `2h07m`.
pub fn duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// `narq status` for people. Why uploads are paused comes first, before the counts it
/// holds back; failures are listed root causes first (the daemon orders them so).
pub fn status(s: &Status) -> String {
    let mut o = String::new();
    // Writing into a String cannot fail.
    let _ = writeln!(o, "store:     {}", s.store);
    if let Some(e) = &s.target_error {
        let retry = s.paused_secs.map(|p| format!(" (trying again in {})", duration(Duration::from_secs_f64(p.ceil())))).unwrap_or_default();
        let _ = writeln!(o, "paused:    {e}{retry}");
    }
    let logs = s.pending.saturating_sub(s.pending_paths);
    let _ = writeln!(
        o,
        "pending:   {}{} ({} of NARs; {} in flight, {} spooled)",
        plural(s.pending_paths, "path", "paths"),
        if logs > 0 { format!(", {}", plural(logs, "build log", "build logs")) } else { String::new() },
        bytes(s.pending_bytes),
        s.in_flight,
        s.spooled,
    );
    for u in &s.uploading {
        let _ = writeln!(o, "uploading: {}  {}", u.item, fraction(u.done, u.total));
    }
    let _ = writeln!(
        o,
        "uploaded:  {}, {} ({} written, {} over the last minute)",
        plural(s.uploaded, "path", "paths"),
        plural(s.logs_uploaded, "build log", "build logs"),
        bytes(s.bytes),
        rate(s.rate)
    );
    let _ = writeln!(o, "skipped:   {} (already in the cache, in an upstream cache, or excluded)", plural(s.skipped, "path", "paths"));
    if !s.excluded.is_empty() {
        let _ = writeln!(o, "excluded (by `exclude`, latest first):");
        for f in &s.excluded {
            let _ = writeln!(o, "  {}: {}", f.item, f.error);
        }
    }
    let _ = writeln!(o, "failed:    {}", s.failed);
    if !s.recent_failures.is_empty() {
        let _ = writeln!(o, "recent failures (root causes first):");
        for f in &s.recent_failures {
            let _ = writeln!(o, "  {}: {}", f.item, f.error);
        }
    }
    o
}

/// `4.0 of 10.0 MiB (40%)`, or what was read when the size is not known (a build log).
fn fraction(done: u64, total: u64) -> String {
    if total == 0 {
        return bytes(done);
    }
    format!("{} of {} ({}%)", bytes(done), bytes(total), (done.min(total) * 100) / total)
}

/// The progress of one wait, from `status` answers polled while it runs.
pub struct Meter {
    start: Instant,
    /// The first answer: what was done before the wait began.
    base: Status,
    /// Recent (time, NAR bytes read) samples, for the rate.
    samples: VecDeque<(Instant, u64)>,
}

/// What a [`Meter`] works out from a `status` answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub done: u64,
    pub total: u64,
    pub read: u64,
    pub to_read: u64,
    /// NAR bytes per second over the last few seconds.
    pub rate: f64,
    pub eta: Option<Duration>,
    pub paused: Option<String>,
}

fn finished(s: &Status) -> u64 {
    s.uploaded + s.skipped + s.failed
}

impl Meter {
    pub fn new(base: Status) -> Meter {
        Meter::at(base, Instant::now())
    }

    fn at(base: Status, now: Instant) -> Meter {
        let samples = VecDeque::from([(now, base.nar_bytes_read)]);
        Meter { start: now, base, samples }
    }

    pub fn read(&mut self, s: &Status) -> Reading {
        self.read_at(s, Instant::now())
    }

    fn read_at(&mut self, s: &Status, now: Instant) -> Reading {
        // A daemon restarted meanwhile counts from zero again: nothing goes negative.
        let done = finished(s).saturating_sub(finished(&self.base));
        let read = s.nar_bytes_read.saturating_sub(self.base.nar_bytes_read);
        let in_flight: u64 = s.uploading.iter().map(|u| u.done.min(u.total)).sum();
        let to_read = s.pending_bytes.saturating_sub(in_flight);
        self.samples.push_back((now, s.nar_bytes_read));
        while self.samples.len() > 2 && self.samples.front().is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW) {
            self.samples.pop_front();
        }
        let rate = match self.samples.front() {
            Some((t, b)) if now.duration_since(*t) >= Duration::from_millis(100) => {
                s.nar_bytes_read.saturating_sub(*b) as f64 / now.duration_since(*t).as_secs_f64()
            }
            _ => 0.0,
        };
        let eta = match (to_read, rate > 0.0) {
            (0, _) if s.pending_paths == 0 => Some(Duration::ZERO),
            (_, true) => Duration::try_from_secs_f64(to_read as f64 / rate).ok(),
            _ => None,
        };
        Reading { done, total: done + s.pending_paths, read, to_read, rate, eta, paused: s.target_error.clone() }
    }

    /// The line for `r`: `3/7 paths, 12.5 MiB of 40.0 MiB, 4.2 MiB/s, ETA 7s`.
    pub fn line(&self, r: &Reading) -> String {
        let eta = r.eta.map_or("ETA ?".to_string(), |d| format!("ETA {}", duration(d)));
        let mut l = format!("narq: {}/{} paths, {} of {}, {}, {eta}", r.done, r.total, bytes(r.read), bytes(r.read + r.to_read), rate(r.rate));
        if let Some(p) = &r.paused {
            let _ = write!(l, "; paused: {p}");
        }
        l
    }

    /// The closing line, once the wait has ended.
    pub fn summary(&self, r: &Reading) -> String {
        let took = self.start.elapsed();
        let avg = r.read as f64 / took.as_secs_f64().max(1e-3);
        format!("narq: {}/{} paths done, {} read in {} ({})", r.done, r.total, bytes(r.read), took_secs(took), rate(avg))
    }
}

/// The closing line of a wait, from what the daemon says became of the items it waited for
/// (`closure`: those of `narq push --wait`; else those enqueued since the last wait):
/// `narq: since the last wait: 2 paths uploaded, 1 build log, 912 B written; waited 0.6s`.
pub fn waited(w: &WaitSummary, closure: bool, took: Duration) -> String {
    let mut parts = Vec::new();
    if w.uploaded > 0 {
        parts.push(format!("{} uploaded", plural(w.uploaded, "path", "paths")));
    }
    if w.skipped > 0 {
        parts.push(format!("{} skipped (already cached or excluded)", plural(w.skipped, "path", "paths")));
    }
    if w.logs_uploaded > 0 {
        parts.push(plural(w.logs_uploaded, "build log", "build logs"));
    }
    if w.bytes > 0 {
        parts.push(format!("{} written", bytes(w.bytes)));
    }
    if w.failed > 0 {
        parts.push(format!("{} failed", w.failed));
    }
    if w.pending > 0 {
        parts.push(format!("{} still pending", w.pending));
    }
    if parts.is_empty() {
        parts.push("nothing to upload".into());
    }
    let scope = if closure { "the closure" } else { "since the last wait" };
    format!("narq: {scope}: {}; waited {}", parts.join(", "), took_secs(took))
}

/// A wait's length: tenths below a minute (a wait of 1.9 s is not "1s").
fn took_secs(took: Duration) -> String {
    if took < Duration::from_secs(60) {
        format!("{:.1}s", took.as_secs_f64())
    } else {
        duration(took)
    }
}

/// Where progress goes: a terminal (one line redrawn) or anything else (plain lines).
pub struct Display<W: Write> {
    out: W,
    tty: bool,
    /// The terminal's width, to cut the line short of wrapping.
    width: usize,
    last: Option<(Instant, String)>,
}

impl<W: Write> Display<W> {
    pub fn new(out: W, tty: bool, width: usize) -> Display<W> {
        Display { out, tty, width: width.max(20), last: None }
    }

    /// How often [`Display::show`] is worth calling.
    pub fn every(&self) -> Duration {
        if self.tty {
            TTY_EVERY
        } else {
            Duration::from_secs(1)
        }
    }

    /// Shows `line`: redrawn in place on a terminal; otherwise written when it changed and
    /// [`PLAIN_EVERY`] has passed since the last one.
    pub fn show(&mut self, line: &str) {
        let now = Instant::now();
        if self.tty {
            let cut: String = line.chars().take(self.width - 1).collect();
            let _ = write!(self.out, "\r{cut}\x1b[K");
        } else {
            if self.last.as_ref().is_some_and(|(t, l)| l == line || now.duration_since(*t) < PLAIN_EVERY) {
                return;
            }
            let _ = writeln!(self.out, "{line}");
        }
        let _ = self.out.flush();
        self.last = Some((now, line.to_string()));
    }

    /// Ends the progress: the terminal line is replaced by `line`.
    pub fn finish(&mut self, line: &str) {
        if self.tty {
            let _ = write!(self.out, "\r\x1b[K");
        }
        let _ = writeln!(self.out, "{line}");
        let _ = self.out.flush();
    }
}

/// The width of the terminal on `fd`, if it is one.
pub fn terminal_width(fd: std::os::fd::RawFd) -> Option<usize> {
    // SAFETY: TIOCGWINSZ fills a winsize; a zeroed one is valid to pass.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_col > 0).then_some(ws.ws_col as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Failure, Upload};

    #[test]
    fn sizes_rates_and_durations_read_well() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
        assert_eq!(bytes(5 << 30), "5.0 GiB");
        assert_eq!(rate(2.5 * 1048576.0), "2.5 MiB/s");
        assert_eq!(duration(Duration::from_secs(42)), "42s");
        assert_eq!(duration(Duration::from_secs(185)), "3m05s");
        assert_eq!(duration(Duration::from_secs(7620)), "2h07m");
    }

    #[test]
    fn status_puts_the_pause_cause_first_and_shows_uploads_in_flight() {
        let s = Status {
            store: "s3://c".into(),
            pending: 3,
            pending_paths: 2,
            pending_bytes: 10 << 20,
            in_flight: 1,
            uploaded: 4,
            logs_uploaded: 2,
            bytes: 3 << 20,
            rate: 1048576.0,
            target_error: Some("connection refused".into()),
            paused_secs: Some(11.2),
            uploading: vec![Upload { item: "/nix/store/x-a".into(), done: 4 << 20, total: 10 << 20 }],
            recent_failures: vec![Failure { item: "/nix/store/y-b".into(), error: "gone".into() }],
            ..Status::default()
        };
        let text = status(&s);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[1], "paused:    connection refused (trying again in 12s)");
        assert_eq!(lines[2], "pending:   2 paths, 1 build log (10.0 MiB of NARs; 1 in flight, 0 spooled)");
        assert_eq!(lines[3], "uploading: /nix/store/x-a  4.0 MiB of 10.0 MiB (40%)");
        assert_eq!(lines[4], "uploaded:  4 paths, 2 build logs (3.0 MiB written, 1.0 MiB/s over the last minute)");
        assert!(text.ends_with("recent failures (root causes first):\n  /nix/store/y-b: gone\n"), "{text}");
        assert!(!status(&Status::default()).contains("paused"));
    }

    #[test]
    fn the_meter_counts_from_the_start_of_the_wait() {
        let t0 = Instant::now();
        let base = Status { uploaded: 10, pending_paths: 4, pending_bytes: 8 << 20, nar_bytes_read: 100 << 20, ..Status::default() };
        let mut m = Meter::at(base, t0);
        let now = Status {
            uploaded: 12,
            pending_paths: 2,
            pending_bytes: 4 << 20,
            nar_bytes_read: (104 << 20) + (1 << 20),
            uploading: vec![Upload { item: "p".into(), done: 1 << 20, total: 2 << 20 }],
            ..Status::default()
        };
        let r = m.read_at(&now, t0 + Duration::from_secs(2));
        assert_eq!((r.done, r.total, r.read, r.to_read), (2, 4, 5 << 20, 3 << 20));
        assert!((r.rate - 2.5 * 1048576.0).abs() < 1.0, "{}", r.rate);
        assert_eq!(r.eta.map(|d| d.as_millis()), Some(1200));
        assert_eq!(m.line(&r), "narq: 2/4 paths, 5.0 MiB of 8.0 MiB, 2.5 MiB/s, ETA 1s");
        // A restarted daemon counts from zero: no underflow.
        let r = m.read_at(&Status::default(), t0 + Duration::from_secs(3));
        assert_eq!((r.done, r.read, r.eta), (0, 0, Some(Duration::ZERO)));
    }

    /// Issue 21: after a build that uploaded 2 paths, `narq wait` said "0/0 paths done".
    #[test]
    fn a_wait_says_what_became_of_what_it_waited_for() {
        let w = WaitSummary { uploaded: 2, bytes: 912, logs_uploaded: 1, ..WaitSummary::default() };
        assert_eq!(waited(&w, false, Duration::from_millis(600)), "narq: since the last wait: 2 paths uploaded, 1 build log, 912 B written; waited 0.6s");
        let w = WaitSummary { uploaded: 1, bytes: 2048, skipped: 4, failed: 1, pending: 2, ..WaitSummary::default() };
        assert_eq!(
            waited(&w, true, Duration::from_secs(75)),
            "narq: the closure: 1 path uploaded, 4 paths skipped (already cached or excluded), 2.0 KiB written, 1 failed, 2 still pending; waited 1m15s"
        );
        assert_eq!(waited(&WaitSummary::default(), false, Duration::ZERO), "narq: since the last wait: nothing to upload; waited 0.0s");
    }

    #[test]
    fn a_terminal_gets_one_line_redrawn_anything_else_plain_lines() {
        let mut tty = Display::new(Vec::new(), true, 30);
        tty.show("narq: 1/2 paths, a line longer than the terminal");
        tty.finish("done");
        let out = String::from_utf8(tty.out).unwrap();
        assert_eq!(out, "\rnarq: 1/2 paths, a line longe\x1b[K\r\x1b[Kdone\n");
        let mut plain = Display::new(Vec::new(), false, 80);
        plain.show("a");
        plain.show("b");
        plain.finish("done");
        assert_eq!(String::from_utf8(plain.out).unwrap(), "a\ndone\n", "a second line within PLAIN_EVERY is not written");
    }
}
