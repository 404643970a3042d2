//! Issue 14 items 2 and 3: what people and Prometheus see. `narq status` for people (MiB,
//! the pause cause first), progress of `narq wait` on a terminal and in plain logs, and
//! `/metrics` parsed strictly after real uploads.

use crate::util::*;
use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

/// A three-path closure built without the hook: `a` (3 MiB of random bytes, so that sizes
/// show in MiB), `b` refers to `a`, `c` to `b`. Returns `c`.
fn three_paths(n: &Narq, tag: &str) -> String {
    let u = unique();
    let expr = format!(
        "let a = {}; b = {}; in {}",
        sh_drv(&format!("{tag}-a-{u}"), "head -c 3145728 /dev/urandom > $out"),
        sh_drv(&format!("{tag}-b-{u}"), "echo ${a} > $out"),
        sh_drv(&format!("{tag}-c-{u}"), "echo ${b} > $out"),
    );
    nix_build(&nix_conf(n.dir.path(), None), &expr, &[]).remove(0)
}

/// One sample: the metric's name and its labels, sorted.
type Series = (String, Vec<(String, String)>);

/// A strict parser of the text exposition format (OpenMetrics 1.0, as prometheus-client
/// writes it): every sample belongs to a family declared by `# TYPE` before it, with a
/// suffix its type allows; names, labels, escapes and values are checked; histogram buckets
/// are cumulative and end at `+Inf` = `_count`; the text ends with `# EOF`. Panics with the
/// line on anything else.
fn parse_exposition(text: &str) -> BTreeMap<Series, f64> {
    let name_ok = |s: &str| {
        let mut c = s.chars();
        c.next().is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
            && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
    };
    let value = |s: &str, line: &str| -> f64 {
        match s {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            _ => s.parse().unwrap_or_else(|e| panic!("bad value {s:?} ({e}) in {line:?}")),
        }
    };
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut out = BTreeMap::new();
    let lines: Vec<&str> = text.split_terminator('\n').collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "the exposition does not end with # EOF");
    assert!(text.ends_with("# EOF\n"), "no newline after # EOF");
    for line in &lines[..lines.len() - 1] {
        if let Some(meta) = line.strip_prefix("# ") {
            let mut parts = meta.splitn(3, ' ');
            let (kind, name, rest) = (parts.next().unwrap(), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            assert!(name_ok(name), "bad metric name in {line:?}");
            match kind {
                "TYPE" => {
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "info", "stateset", "unknown", "gaugehistogram"].contains(&rest),
                        "unknown type in {line:?}"
                    );
                    assert!(types.insert(name.to_string(), rest.to_string()).is_none(), "family declared twice: {line:?}");
                }
                "HELP" | "UNIT" => {}
                _ => panic!("unknown comment {line:?}"),
            }
            continue;
        }
        assert!(!line.is_empty() && !line.starts_with('#'), "bad line {line:?}");
        let (name, after) = line.split_at(line.find(['{', ' ']).unwrap_or_else(|| panic!("no value in {line:?}")));
        assert!(name_ok(name), "bad sample name in {line:?}");
        let mut labels = Vec::new();
        let rest = if let Some(body) = after.strip_prefix('{') {
            let mut chars = body.char_indices().peekable();
            let end;
            loop {
                let (i, c) = chars.next().unwrap_or_else(|| panic!("unterminated labels in {line:?}"));
                if c == '}' {
                    end = i;
                    break;
                }
                if c == ',' {
                    continue;
                }
                let mut key = c.to_string();
                for (_, c) in chars.by_ref() {
                    if c == '=' {
                        break;
                    }
                    key.push(c);
                }
                assert!(name_ok(&key) && !key.contains(':'), "bad label name {key:?} in {line:?}");
                assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "label value not quoted in {line:?}");
                let mut v = String::new();
                loop {
                    match chars.next().map(|(_, c)| c) {
                        Some('"') => break,
                        Some('\\') => match chars.next().map(|(_, c)| c) {
                            Some('\\') => v.push('\\'),
                            Some('"') => v.push('"'),
                            Some('n') => v.push('\n'),
                            other => panic!("bad escape {other:?} in {line:?}"),
                        },
                        Some(c) => v.push(c),
                        None => panic!("unterminated label value in {line:?}"),
                    }
                }
                assert!(!labels.iter().any(|(k, _)| k == &key), "label {key} twice in {line:?}");
                labels.push((key, v));
            }
            &body[end + 1..]
        } else {
            after
        };
        let fields: Vec<&str> = rest.strip_prefix(' ').unwrap_or_else(|| panic!("no space before the value in {line:?}")).split(' ').collect();
        assert!(fields.len() == 1 || fields.len() == 2, "bad value part in {line:?}");
        let v = value(fields[0], line);
        // The family: the longest declared name this sample's name starts with, and a suffix
        // its type allows.
        let family = types
            .keys()
            .filter(|f| name.starts_with(f.as_str()))
            .max_by_key(|f| f.len())
            .unwrap_or_else(|| panic!("sample of an undeclared family: {line:?}"));
        let suffix = &name[family.len()..];
        let allowed: &[&str] = match types[family].as_str() {
            "counter" => &["_total", "_created"],
            "histogram" => &["_bucket", "_count", "_sum", "_created"],
            "gauge" | "unknown" | "stateset" => &[""],
            "info" => &["_info"],
            _ => &["", "_count", "_sum", "_created"],
        };
        assert!(allowed.contains(&suffix), "suffix {suffix:?} not allowed for a {} in {line:?}", types[family]);
        if types[family] == "counter" && suffix == "_total" {
            assert!(v >= 0.0, "negative counter in {line:?}");
        }
        labels.sort();
        assert!(out.insert((name.to_string(), labels), v).is_none(), "sample twice: {line:?}");
    }
    // Histograms: cumulative buckets, +Inf equal to _count.
    for (family, _) in types.iter().filter(|(_, t)| *t == "histogram") {
        let bucket = format!("{family}_bucket");
        let mut buckets: Vec<(f64, f64)> = out
            .iter()
            .filter(|((n, _), _)| *n == bucket)
            .map(|((_, l), v)| (l.iter().find(|(k, _)| k == "le").map(|(_, le)| value(le, &bucket)).expect("bucket without le"), *v))
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "{family}: buckets not cumulative: {buckets:?}");
        let count = out[&(format!("{family}_count"), vec![])];
        assert_eq!(buckets.last().map(|b| (b.0, b.1)), Some((f64::INFINITY, count)), "{family}: +Inf bucket is not _count");
    }
    out
}

/// The value of a sample; panics naming it if it is missing.
fn sample(m: &BTreeMap<Series, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    let key = (name.to_string(), labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>());
    *m.get(&key).unwrap_or_else(|| panic!("no {name}{labels:?} in {:?}", m.keys().collect::<Vec<_>>()))
}

fn scrape(port: u16) -> BTreeMap<Series, f64> {
    let (head, body) = http(port, "GET", "/metrics");
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-type: application/openmetrics-text"), "{head}");
    parse_exposition(&String::from_utf8(body).unwrap())
}

#[test]
fn the_exposition_parser_is_strict() {
    let good = "# TYPE a counter\na_total 1\n# TYPE h histogram\nh_bucket{le=\"1.0\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 3.5\nh_count 2\n# EOF\n";
    assert_eq!(parse_exposition(good).len(), 5);
    for bad in [
        "a_total 1\n# EOF\n",                                                    // undeclared
        "# TYPE a counter\na 1\n# EOF\n",                                        // counter without _total
        "# TYPE a counter\na_total 1\n",                                         // no EOF
        "# TYPE a gauge\na{x=\"1} 1\n# EOF\n",                                   // unterminated
        "# TYPE a gauge\na one\n# EOF\n",                                        // not a number
        "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 3\n# EOF\n", // +Inf != count
    ] {
        assert!(std::panic::catch_unwind(|| parse_exposition(bad)).is_err(), "accepted {bad:?}");
    }
}

/// Issue 13, "the hook for a queued closure": a build over a closure the daemon holds
/// names its outputs only (`roots`: one request, no path info read, signed or checked),
/// while a new closure above the small-closure size asks what the daemon lacks and enqueues
/// it; both record the outputs as roots of the cache.
#[test]
fn hook_over_a_queued_closure_sends_its_roots_only() {
    let port = free_port();
    let mut n = Narq::new("roots-only", &format!("metrics-listen = \"127.0.0.1:{port}\""));
    n.start();
    let u = unique();
    let leaves: Vec<String> = (0..20).map(|i| format!("l{i} = {};", sh_drv(&format!("rootsonly-{i}-{u}"), &format!("echo {i} > $out")))).collect();
    let refs: Vec<String> = (0..20).map(|i| format!("${{l{i}}}")).collect();
    let expr = format!("let {} in {}", leaves.join(" "), sh_drv(&format!("rootsonly-top-{u}"), &format!("echo {} > $out", refs.join(" "))));
    let (outs, stderr) = n.build(&expr);
    assert!(!stderr.contains("narq-hook:"), "{stderr}");
    n.wait(60);
    let top = &outs[0];
    assert_eq!(closure(&outs).len(), 21);
    assert!(n.has(top));
    let root = n.cache().join(format!("narq/roots/{}", hash(top)));
    assert!(wait_for(Duration::from_secs(20), || root.exists()), "the top was not recorded as a root: {}", n.daemon_log());
    let before = scrape(port);
    // The top's hook asked `roots` first (answered: not held), then `missing`, then enqueued.
    assert_eq!(sample(&before, "narq_requests_total", &[("op", "roots")]), 1.0);
    assert!(sample(&before, "narq_requests_total", &[("op", "missing")]) >= 1.0);
    assert_eq!(sample(&before, "narq_requests_total", &[("op", "enqueue")]), 21.0, "one enqueue per build");

    // The hook again, as after a rebuild of the top: one `roots` request and nothing else.
    let drv = run(Command::new("nix-store").args(["-q", "--deriver", top])).trim().to_string();
    let hook = output(Command::new(bin("narq-hook")).env("OUT_PATHS", "").env("DRV_PATH", &drv).env("NARQ_CONFIG", &n.config));
    assert!(hook.status.success() && hook.stderr.is_empty(), "{hook:?}");
    let after = scrape(port);
    for (op, more) in [("roots", 1.0), ("missing", 0.0), ("enqueue", 0.0)] {
        let (b, a) = (sample(&before, "narq_requests_total", &[("op", op)]), sample(&after, "narq_requests_total", &[("op", op)]));
        assert_eq!(a - b, more, "{op}: {b} then {a}");
    }
    let s = n.status();
    assert_eq!((s["failed"].as_u64(), s["pending"].as_u64()), (Some(0), Some(0)), "{s}");
}

/// Item 3, and item 2's "`uploaded` counts paths": a 3-path closure built with the hook
/// shows as 3 uploaded paths in `status --json` and in `/metrics` (strictly parsed), with
/// bytes, the hook's requests, no failures, an empty queue and the duration and size
/// histograms filled. The build logs are counted apart.
#[test]
fn metrics_after_a_build_count_the_closure() {
    let port = free_port();
    let mut n = Narq::new("metrics", &format!("metrics-listen = \"127.0.0.1:{port}\""));
    n.start();
    // Before any upload every series is there, at zero.
    let m = scrape(port);
    assert_eq!(sample(&m, "narq_uploaded_paths_total", &[]), 0.0);
    let u = unique();
    let expr = format!(
        "let a = {}; b = {}; in {}",
        sh_drv(&format!("metrics-a-{u}"), "echo building a; head -c 100000 /dev/urandom > $out"),
        sh_drv(&format!("metrics-b-{u}"), "echo ${a} > $out"),
        sh_drv(&format!("metrics-c-{u}"), "echo ${b} > $out"),
    );
    let (outs, _) = n.build(&expr);
    n.wait(60);
    let all = closure(&outs);
    assert_eq!(all.len(), 3);
    let s = n.status();
    assert_eq!(s["uploaded"].as_u64(), Some(3), "uploaded counts paths, not paths and logs: {s}");
    let logs = s["logs_uploaded"].as_u64().unwrap();
    let m = scrape(port);
    assert_eq!(sample(&m, "narq_uploaded_paths_total", &[]), all.len() as f64, "{m:?}");
    assert_eq!(sample(&m, "narq_uploaded_logs_total", &[]), logs as f64);
    assert!(sample(&m, "narq_uploaded_bytes_total", &[]) > 0.0);
    assert_eq!(sample(&m, "narq_uploaded_bytes_total", &[]), s["bytes"].as_u64().unwrap() as f64, "metrics and status disagree");
    assert!(sample(&m, "narq_nar_read_bytes_total", &[]) >= 100_000.0);
    for kind in ["transient", "permanent", "store"] {
        assert_eq!(sample(&m, "narq_failures_total", &[("kind", kind)]), 0.0, "{kind}");
    }
    assert_eq!(sample(&m, "narq_queue_depth", &[]), 0.0);
    assert_eq!(sample(&m, "narq_in_flight", &[]), 0.0);
    assert_eq!(sample(&m, "narq_spooled_requests", &[]), 0.0);
    assert_eq!(sample(&m, "narq_paused", &[("cause", "store_unavailable")]), 0.0);
    // One hook per build, each enqueues (a closure this small is signed without asking `missing`).
    assert_eq!(sample(&m, "narq_requests_total", &[("op", "enqueue")]), 3.0);
    assert_eq!(sample(&m, "narq_upload_duration_seconds_count", &[]), 3.0);
    assert!(sample(&m, "narq_upload_duration_seconds_sum", &[]) > 0.0);
    assert_eq!(sample(&m, "narq_upload_size_bytes_count", &[]), 3.0);
    assert_eq!(sample(&m, "narq_upload_size_bytes_sum", &[]), (s["bytes"].as_u64().unwrap() - logs_bytes(&n)) as f64);
    // Only /metrics is served.
    let (head, _) = http(port, "GET", "/");
    assert!(head.starts_with("http/1.1 404"), "{head}");
    dashboard_names_what_is_served(&m);
}

/// examples/grafana-dashboard.json is valid JSON whose queries name only series the daemon
/// serves, and has a panel for each thing item 3 lists.
fn dashboard_names_what_is_served(m: &BTreeMap<Series, f64>) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/grafana-dashboard.json");
    let d: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let served: std::collections::BTreeSet<&str> = m.keys().map(|(n, _)| n.as_str()).collect();
    let mut used = std::collections::BTreeSet::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("narq_")) {
                assert!(served.contains(word), "the dashboard queries {word}, which is not served: {expr}");
                used.insert(word.to_string());
            }
        }
    }
    for want in [
        "narq_queue_depth",
        "narq_in_flight",
        "narq_uploaded_paths_total",
        "narq_uploaded_bytes_total",
        "narq_failures_total",
        "narq_spooled_requests",
        "narq_paused",
        "narq_upload_duration_seconds_bucket",
        "narq_upload_size_bytes_bucket",
        "narq_requests_total",
    ] {
        assert!(used.contains(want), "no panel shows {want}");
    }
}

/// The NixOS module's `settings.metricsListen` reaches the config the daemon reads; left
/// null, the key is left out.
#[test]
fn the_module_sets_metrics_listen() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("nixos-module");
    let t = TempDir::new("module-metrics");
    for (listen, want) in [("\"127.0.0.1:9464\"", Some("127.0.0.1:9464")), ("null", None)] {
        let cfg = format!(
            r#"{{ secretKeyFiles = [ ]; settings = {{ store = "file:///tmp/c"; publicKeys = [ ]; socket = "/run/narq/narq.sock";
                  jobs = 4; upstream = [ ]; allowedUsers = [ ]; metricsListen = {listen}; }}; }}"#
        );
        let expr = format!("import {}/toml.nix (import {}/settings.nix {cfg})", dir.display(), dir.display());
        let out = run(Command::new("nix-instantiate").args(["--eval", "--strict", "--json", "-E", &expr]));
        let toml: String = serde_json::from_str(&out).unwrap();
        assert_eq!(toml.contains("metrics-listen"), want.is_some(), "{toml}");
        let file = t.join("module.toml");
        std::fs::write(&file, &toml).unwrap();
        let c = narq::config::Config::load(Some(&file)).unwrap_or_else(|e| panic!("{e}\n{toml}"));
        assert_eq!(c.metrics_listen.map(|a| a.to_string()).as_deref(), want, "{toml}");
    }
}

/// Bytes of the build logs in the cache (the size histogram counts NARs only).
fn logs_bytes(n: &Narq) -> u64 {
    std::fs::read_dir(n.cache().join("log")).map_or(0, |rd| rd.flatten().map(|e| e.metadata().unwrap().len()).sum())
}

/// A bad `metrics-listen` is one line naming the file and the key.
#[test]
fn a_bad_metrics_address_names_file_and_key() {
    let n = Narq::new("metrics-bad", "metrics-listen = \"localhost:9464\"");
    let out = n.narq(&["status"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(&n.config.display().to_string()) && err.contains("key `metrics-listen`") && err.contains("127.0.0.1:9464"), "{err}");
}

/// Item 2 and the pause in item 3: with S3 cut, `narq status` says why uploads are paused
/// before what waits (sizes in MiB), `/metrics` shows the pause; `narq wait` on a pseudo-
/// terminal redraws one progress line, and without one writes plain lines, both ending with
/// the closure done once S3 is back.
#[test]
fn status_and_progress_through_an_outage() {
    let t = TempDir::new("observe-s3");
    let moto = Moto::start(t.path(), &[]);
    moto.bucket("narq-observe");
    let proxy = Proxy::start(moto.port);
    let port = free_port();
    let mut n = Narq::new(
        "observe",
        &format!("store = \"s3://narq-observe?endpoint=127.0.0.1:{}&scheme=http\"\nmetrics-listen = \"127.0.0.1:{port}\"", proxy.port),
    );
    n.start();
    proxy.set(false);
    let top = three_paths(&n, "observe");
    let push = n.narq(&["push", &top]);
    assert!(push.status.success(), "{}", String::from_utf8_lossy(&push.stderr));
    assert!(wait_for(Duration::from_secs(20), || n.status()["target_error"].is_string()), "not paused: {}", n.status());
    let cause = n.status()["target_error"].as_str().unwrap().to_string();

    let out = n.narq(&["status"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let line = |prefix: &str| text.lines().position(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix} in\n{text}"));
    assert!(line("paused:") < line("pending:"), "the cause must come before what it holds back:\n{text}");
    assert!(text.lines().nth(line("paused:")).unwrap().contains(&cause), "{text}");
    assert!(text.contains("pending:   3 paths") && text.contains("3.0 MiB of NARs"), "{text}");
    assert!(text.contains("MiB/s"), "{text}");
    assert!(!text.contains('\x1b'), "{text}");

    let m = scrape(port);
    assert_eq!(sample(&m, "narq_paused", &[("cause", "store_unavailable")]), 1.0, "{m:?}");
    assert_eq!(sample(&m, "narq_queue_depth", &[]), 3.0);
    assert!(sample(&m, "narq_failures_total", &[("kind", "store")]) >= 1.0);

    // The same wait twice: under `script` (a pseudo-terminal) and with stderr in a pipe.
    let tty = Command::new("script")
        .args(["-qfec", &format!("{} wait --timeout 60", bin("narq").display()), "/dev/null"])
        .env("NARQ_CONFIG", &n.config)
        .env("COLUMNS", "200")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let plain = Command::new(bin("narq"))
        .args(["wait", "--timeout", "60"])
        .env("NARQ_CONFIG", &n.config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Long enough for a few redraws while paused.
    std::thread::sleep(Duration::from_millis(1500));
    proxy.set(true);
    let tty = tty.wait_with_output().unwrap();
    let plain = plain.wait_with_output().unwrap();
    let shown = String::from_utf8_lossy(&tty.stdout).to_string();
    assert!(tty.status.success(), "{shown}\n{}", n.daemon_log());
    assert!(shown.contains("\rnarq: 0/3 paths, 0 B of 3.0 MiB") && shown.contains("\x1b[K"), "no progress line redrawn: {shown:?}");
    assert!(shown.contains("; paused: "), "the progress line does not say why it waits: {shown:?}");
    assert!(shown.contains("narq: since the last wait: 3 paths uploaded, "), "{shown:?}");
    let said = String::from_utf8_lossy(&plain.stderr).to_string();
    eprintln!("narq status:\n{text}\non a terminal: {shown:?}\nplain:\n{said}");
    assert!(plain.status.success(), "{said}");
    assert!(!said.contains('\x1b') && !said.contains('\r'), "escape codes in plain output: {said:?}");
    let lines: Vec<&str> = said.lines().collect();
    assert!(lines[0].starts_with("narq: 0/3 paths, 0 B of 3.0 MiB"), "{said}");
    assert!(lines.last().unwrap().starts_with("narq: since the last wait: 3 paths uploaded, "), "{said}");
    let m = scrape(port);
    assert_eq!(sample(&m, "narq_uploaded_paths_total", &[]), 3.0);
    assert_eq!(sample(&m, "narq_paused", &[("cause", "store_unavailable")]), 0.0);
    n.substitute_from(&top, &format!("http://127.0.0.1:{}/narq-observe", moto.port));
}
