//! The NixOS module, the systemd units and the daemon under systemd's protocols
//! (socket activation, sd_notify, journald), as far as they can be checked without a NixOS
//! machine; the module itself under the real module system (nixpkgs' `lib.evalModules`),
//! below.

use crate::util::*;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn nix_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().to_string();
        if p.is_dir() && !name.starts_with('.') && name != "target" {
            nix_files(&p, out);
        } else if name.ends_with(".nix") {
            out.push(p);
        }
    }
}

#[test]
fn every_nix_file_parses() {
    let mut files = Vec::new();
    nix_files(&repo(), &mut files);
    assert!(files.len() >= 7, "only {files:?}");
    for f in files {
        let out = output(Command::new("nix-instantiate").arg("--parse").arg(&f));
        assert!(out.status.success(), "{}: {}", f.display(), String::from_utf8_lossy(&out.stderr));
    }
}

/// Evaluates a Nix expression (no nixpkgs) to JSON.
fn eval_json(expr: &str) -> serde_json::Value {
    let out = run(Command::new("nix-instantiate").args(["--eval", "--strict", "--json", "-E", expr]));
    serde_json::from_str(&out).unwrap()
}

/// The module's option values, as `config.services.narq` would hold them.
fn module_cfg(store: &str, socket: &Path, key: &Path, public_key: &str) -> String {
    format!(
        r#"{{ secretKeyFiles = [ "{}" ]; settings = {{ store = "{store}"; publicKeys = [ "{public_key}" ];
              socket = "{}"; jobs = 4; upstream = [ "https://cache.nixos.org" ]; allowedUsers = [ "root" ]; }}; }}"#,
        key.display(),
        socket.display()
    )
}

#[test]
fn config_written_by_the_module_loads_in_the_daemon() {
    let n = Narq::new("module", "");
    let key = n.dir.join("key.sec");
    let cfg = module_cfg(&format!("file://{}", n.cache().display()), &n.socket(), &key, &n.public_key);
    let dir = repo().join("nixos-module");
    let toml = eval_json(&format!("import {}/toml.nix (import {}/settings.nix {cfg})", dir.display(), dir.display()));
    let toml = toml.as_str().unwrap();
    // The module fixes state-dir to /var/lib/narq; point it at the test's own for this run.
    let toml = toml.replace("\"/var/lib/narq\"", &format!("{:?}", n.dir.join("state").display().to_string()));
    let file = n.dir.join("module.toml");
    std::fs::write(&file, &toml).unwrap();
    let c = narq::config::Config::load(Some(&file)).unwrap_or_else(|e| panic!("{e}\n{toml}"));
    assert_eq!(c.socket, n.socket());
    assert_eq!(c.upstream, ["https://cache.nixos.org"]);
    assert_eq!(c.public_keys[0].to_nix_string(), n.public_key);
    assert_eq!(c.allowed_uids, [0]);
    // And the daemon serves with it.
    std::fs::write(&n.config, &toml).unwrap();
    let mut n = n;
    n.start();
    assert_eq!(n.status()["pending"], 0);
}

#[test]
fn units_are_hardened_and_match_the_config() {
    let u = eval_json(&format!(
        r#"import {}/nixos-module/units.nix {{ narq = "/pkg"; configFile = "/etc/narq.toml"; socket = "/run/narq/narq.sock"; environmentFile = "/etc/narq/aws.env"; }}"#,
        repo().display()
    ));
    let sock = &u["socket"]["socketConfig"];
    assert_eq!(sock["ListenStream"], "/run/narq/narq.sock");
    assert_eq!(sock["SocketMode"], "0660");
    assert_eq!(sock["SocketUser"], "root");
    let svc = &u["service"]["serviceConfig"];
    assert_eq!(svc["Type"], "notify");
    assert_eq!(svc["ExecStart"], "/pkg/bin/narq daemon --config /etc/narq.toml");
    assert_eq!(svc["StateDirectory"], "narq");
    assert_eq!(svc["EnvironmentFile"], "/etc/narq/aws.env");
    for (k, v) in [("ProtectSystem", "strict"), ("CapabilityBoundingSet", "")] {
        assert_eq!(svc[k], v, "{k}");
    }
    for k in ["NoNewPrivileges", "PrivateTmp", "ProtectHome", "DynamicUser", "MemoryDenyWriteExecute"] {
        assert_eq!(svc[k], true, "{k}");
    }
    assert!(svc["ReadOnlyPaths"].as_array().unwrap().contains(&"/nix/store".into()));

    // The plain units in examples/ pass systemd's own checker.
    let t = TempDir::new("units");
    for f in ["narq.socket", "narq.service"] {
        let text = std::fs::read_to_string(repo().join("examples/non-nixos").join(f)).unwrap();
        std::fs::write(t.join(f), text.replace("/usr/local/bin/narq", bin("narq").to_str().unwrap())).unwrap();
    }
    let out = output(Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(t.join("narq.service")));
    assert!(out.status.success(), "systemd-analyze verify: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn socket_activation_serves_hooks_and_notifies_readiness() {
    let mut n = Narq::new("activate", "");
    let notify_path = n.dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // systemd-socket-activate listens on the configured socket and starts the daemon on the
    // first connection, passing the socket as LISTEN_FDS.
    n.spawn_daemon(
        Command::new("systemd-socket-activate")
            .arg("-l")
            .arg(n.socket())
            .arg(format!("--setenv=NARQ_CONFIG={}", n.config.display()))
            .arg(format!("--setenv=NOTIFY_SOCKET={}", notify_path.display()))
            .arg(bin("narq"))
            .arg("daemon"),
    );
    assert!(wait_for(Duration::from_secs(10), || n.socket().exists()));
    let (outs, stderr) = n.build(&crate::daemon::program_expr("activate"));
    assert!(!stderr.contains("narq-hook:"), "{stderr}");
    let mut buf = [0u8; 256];
    let got = notify.recv(&mut buf).expect("no sd_notify message");
    assert!(String::from_utf8_lossy(&buf[..got]).contains("READY=1"));
    n.wait(60);
    assert!(n.daemon_log().contains("using the socket passed by systemd"), "{}", n.daemon_log());
    n.substitute(&outs[0]);
}

#[test]
fn under_systemd_the_daemon_logs_structured_fields_to_journald() {
    let journal = Path::new("/run/systemd/journal/socket");
    assert!(!journal.exists(), "a real journald runs here: check with `journalctl -t narq -o json` instead");
    std::fs::create_dir_all(journal.parent().unwrap()).unwrap();
    let sock = UnixDatagram::bind(journal).unwrap();
    struct Cleanup;
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_file("/run/systemd/journal/socket");
        }
    }
    let _cleanup = Cleanup;
    sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut n = Narq::new("journal", "");
    n.spawn_daemon(Command::new(bin("narq")).arg("daemon").env("JOURNAL_STREAM", "8:1234"));
    assert!(wait_for(Duration::from_secs(10), || n.narq(&["status"]).status.success()));
    let u = unique();
    let outs = nix_build(&nix_conf(n.dir.path(), None), &sh_drv(&format!("journal-{u}"), "echo j > $out"), &[]);
    assert!(n.narq(&["push", "--wait", &outs[0]]).status.success());
    // Journal native protocol: `KEY=value\n`, or `KEY\n<u64 LE length><value>\n`.
    fn fields(d: &[u8]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < d.len() {
            let end = d[i..].iter().position(|&c| c == b'\n' || c == b'=').map_or(d.len(), |p| i + p);
            let key = String::from_utf8_lossy(&d[i..end]).to_string();
            if end >= d.len() {
                break;
            }
            if d[end] == b'=' {
                let vend = d[end..].iter().position(|&c| c == b'\n').map_or(d.len(), |p| end + p);
                out.push((key, String::from_utf8_lossy(&d[end + 1..vend]).to_string()));
                i = vend + 1;
            } else {
                let len = u64::from_le_bytes(d[end + 1..end + 9].try_into().unwrap()) as usize;
                out.push((key, String::from_utf8_lossy(&d[end + 9..end + 9 + len]).to_string()));
                i = end + 9 + len + 1;
            }
        }
        out
    }
    let mut buf = vec![0u8; 65536];
    let mut found = None;
    for _ in 0..50 {
        let Ok(len) = sock.recv(&mut buf) else { break };
        let f = fields(&buf[..len]);
        if f.iter().any(|(k, v)| k == "PATH" && v == &outs[0]) {
            found = Some(f);
            break;
        }
    }
    let f = found.expect("no journal entry with PATH= for the upload");
    let get = |k: &str| f.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone()).unwrap_or_else(|| panic!("no {k} in {f:?}"));
    assert!(get("MESSAGE").starts_with(&format!("uploaded {} (", outs[0])), "{f:?}");
    assert_eq!(get("SYSLOG_IDENTIFIER"), "narq");
    assert!(get("BYTES").parse::<u64>().unwrap() > 0);
    assert!(get("NAR_BYTES").parse::<u64>().unwrap() > 0);
    get("DURATION_MS").parse::<u64>().unwrap();
}

// ---- The module under the real module system (nixpkgs' lib.evalModules) ----
//
// tests/nixos/eval.nix evaluates nixos-module/ with small stand-ins for the NixOS options it
// sets; these tests check its JSON. A new option gets one row in OPTIONS (its type and
// default, as Nix describes them) and, for what it renders, one assertion on `unit`,
// `rendered_config` or the evaluation's JSON in `module_renders_units_config_and_hook`.

/// Every option of services.narq: name under `services.narq`, type as Nix describes it,
/// default as JSON (`null` when it has none).
const OPTIONS: &[(&str, &str, &str)] = &[
    ("enable", "boolean", "false"),
    ("package", "package", "null"),
    ("secretKeyFiles", "list of absolute path", "[]"),
    ("environmentFile", "null or string", "null"),
    ("user", "null or string", "null"),
    ("group", "string", r#""narq""#),
    ("memoryMax", "string", r#""1G""#),
    ("settings.store", "string", r#""file:///var/lib/narq/cache""#),
    ("settings.publicKeys", "list of string", "[]"),
    ("settings.socket", "string", r#""/run/narq/narq.sock""#),
    ("settings.jobs", "integer between 1 and 256 (both inclusive)", "4"),
    ("settings.upstream", "list of string", "[]"),
    ("settings.upstreamKeys", "list of string", r#"["cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="]"#),
    ("settings.exclude", "list of string", "[]"),
    ("settings.allowedUsers", "list of string", "[]"),
    ("settings.metricsListen", "null or string", "null"),
    ("gc.enable", "boolean", "false"),
    ("gc.dates", "string", r#""weekly""#),
    ("gc.keepDays", "unsigned integer, meaning >=0", "30"),
    ("gc.maxSize", "null or string", "null"),
];

/// nixpkgs' `lib`: `$NARQ_NIXPKGS_LIB`, else `shared/nixpkgs-lib/lib` beside the repository
/// or beside one of its parents (`../shared` of the main checkout, `../../shared` of a
/// worktree). Where there is none, build.rs compiles the tests that need it ignored (see
/// [`NEEDS_LIB`]); run anyway (`--include-ignored`), they fail here.
fn nixpkgs_lib() -> PathBuf {
    if let Some(p) = std::env::var_os("NARQ_NIXPKGS_LIB") {
        let p = PathBuf::from(p);
        assert!(p.join("default.nix").exists(), "NARQ_NIXPKGS_LIB={} has no default.nix", p.display());
        return p;
    }
    let found = repo().ancestors().skip(1).map(|a| a.join("shared/nixpkgs-lib/lib")).find(|l| l.join("default.nix").exists());
    found.unwrap_or_else(|| panic!("{NEEDS_LIB}"))
}

/// Why a module test is skipped where build.rs found no nixpkgs lib (issue 21: they counted
/// as passed). The `ignore` attributes repeat it: libtest shows a reason only if it is a literal.
const NEEDS_LIB: &str = "needs nixpkgs' lib: ../shared/nixpkgs-lib/lib or NARQ_NIXPKGS_LIB";

/// The module evaluated with `services.narq = narq` (a Nix attribute set); `Err` with Nix's
/// message when the evaluation fails (a type error, say).
fn eval_module(lib: &Path, narq: &str) -> Result<serde_json::Value, String> {
    let out = output(
        Command::new("nix-instantiate")
            .args(["--eval", "--strict", "--json"])
            .arg(repo().join("tests/nixos/eval.nix"))
            .args(["--arg", "lib", &format!("import {}", lib.display())])
            .args(["--arg", "narq", narq]),
    );
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).to_string());
    }
    Ok(serde_json::from_slice(&out.stdout).unwrap())
}

/// A configuration the module accepts: the required public key, the rest from `extra`.
fn enabled(extra: &str) -> String {
    format!(r#"{{ enable = true; settings.publicKeys = [ "test-1:wYD3HOn2vD2CyzhkJN/1nWvEuXdQuYyo0zV3eu5e3vU=" ]; {extra} }}"#)
}

/// `/etc/narq/config.toml` as the module renders it, loaded as narq loads it.
fn rendered_config(v: &serde_json::Value) -> narq::config::Config {
    let text = v["configText"].as_str().unwrap_or_else(|| panic!("no config rendered: {v}"));
    narq::config::Config::parse(text, Some(Path::new("/etc/narq/config.toml"))).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// `systemd.<kind>.<name>` as the module sets it.
fn unit<'a>(v: &'a serde_json::Value, kind: &str, name: &str) -> &'a serde_json::Value {
    let u = &v["systemd"][kind][name];
    assert!(u.is_object(), "no systemd.{kind}.{name}: {}", v["systemd"]);
    u
}

#[test]
#[cfg_attr(narq_no_nixpkgs_lib, ignore = "needs nixpkgs' lib: ../shared/nixpkgs-lib/lib or NARQ_NIXPKGS_LIB")]
fn module_options_have_their_types_and_defaults() {
    let lib = nixpkgs_lib();
    let v = eval_module(&lib, "{ }").unwrap();
    let declared = v["options"].as_object().unwrap();
    for (name, ty, default) in OPTIONS {
        let o = declared.get(*name).unwrap_or_else(|| panic!("services.narq.{name} is not declared"));
        assert_eq!(o["type"], *ty, "type of services.narq.{name}");
        assert_eq!(o["default"], serde_json::from_str::<serde_json::Value>(default).unwrap(), "default of services.narq.{name}");
    }
    let unchecked: Vec<&String> = declared.keys().filter(|k| !OPTIONS.iter().any(|(n, ..)| n == k)).collect();
    assert!(unchecked.is_empty(), "options without a row in OPTIONS (tests/it/nixos.rs): {unchecked:?}");
    // Not enabled: the module sets nothing.
    assert_eq!(v["systemd"]["services"], serde_json::json!({}));
    assert_eq!(v["systemd"]["sockets"], serde_json::json!({}));
    assert_eq!(v["nix"]["settings"], serde_json::json!({}));
    assert_eq!(v["etc"], serde_json::json!([]));
    assert_eq!(v["failedAssertions"], serde_json::json!([]));
}

#[test]
#[cfg_attr(narq_no_nixpkgs_lib, ignore = "needs nixpkgs' lib: ../shared/nixpkgs-lib/lib or NARQ_NIXPKGS_LIB")]
fn module_assertions_fail_with_their_messages() {
    let lib = nixpkgs_lib();
    let failed = |narq: &str| -> Vec<String> {
        let v = eval_module(&lib, narq).unwrap();
        v["failedAssertions"].as_array().unwrap().iter().map(|m| m.as_str().unwrap().to_string()).collect()
    };
    assert_eq!(failed(&enabled(r#"secretKeyFiles = [ "/etc/nix/c.sec" ]; environmentFile = "/etc/narq/aws.env";"#)), Vec::<String>::new());
    let missing = failed("{ enable = true; }");
    assert_eq!(missing.len(), 1, "{missing:?}");
    assert!(missing[0].starts_with("services.narq.settings.publicKeys must list the cache's public key"), "{missing:?}");
    let in_store = failed(&enabled(r#"secretKeyFiles = [ "/nix/store/00000000000000000000000000000000-c.sec" ]; environmentFile = "/nix/store/00000000000000000000000000000000-aws.env";"#));
    assert_eq!(
        in_store,
        [
            "services.narq.secretKeyFiles must not be in the Nix store (it is world-readable).",
            "services.narq.environmentFile must not be in the Nix store."
        ]
    );
}

#[test]
#[cfg_attr(narq_no_nixpkgs_lib, ignore = "needs nixpkgs' lib: ../shared/nixpkgs-lib/lib or NARQ_NIXPKGS_LIB")]
fn module_type_errors_name_the_option() {
    let lib = nixpkgs_lib();
    for (bad, option) in [
        ("settings.jobs = 0;", "services.narq.settings.jobs' is not of type `integer between 1 and 256"),
        (r#"settings.jobs = "four";"#, "services.narq.settings.jobs' is not of type"),
        (r#"secretKeyFiles = "/etc/nix/c.sec";"#, "services.narq.secretKeyFiles' is not of type `list of absolute path'"),
        (r#"secretKeyFiles = [ "relative.sec" ];"#, "services.narq.secretKeyFiles"),
        ("settings.store = 1;", "services.narq.settings.store' is not of type `string'"),
        ("nosuchoption = 1;", "services.narq.nosuchoption' does not exist"),
    ] {
        let e = eval_module(&lib, &enabled(bad)).expect_err(bad);
        assert!(e.contains(option), "{bad}: {e}");
    }
}

#[test]
#[cfg_attr(narq_no_nixpkgs_lib, ignore = "needs nixpkgs' lib: ../shared/nixpkgs-lib/lib or NARQ_NIXPKGS_LIB")]
fn module_renders_units_config_and_hook() {
    let lib = nixpkgs_lib();
    let v = eval_module(
        &lib,
        &enabled(
            r#"secretKeyFiles = [ "/etc/nix/c.sec" ]; environmentFile = "/etc/narq/aws.env"; user = "uploader"; group = "cache";
               memoryMax = "512M"; settings = { store = "s3://c-1?region=eu-west-1"; socket = "/run/narq/x.sock"; jobs = 8;
               upstream = [ ]; allowedUsers = [ "root" ]; metricsListen = "127.0.0.1:9464";
               exclude = [ "*-source" ]; upstreamKeys = [ "cache.nixos.org-1" ]; };"#,
        ),
    )
    .unwrap();
    let pkg = "/nix/store/00000000000000000000000000000000-narq";
    let config_file = "/nix/store/00000000000000000000000000000000-narq.toml";
    // The hook, no wrapper; the config where the hook and the CLI look for it.
    assert_eq!(v["nix"]["settings"]["post-build-hook"], format!("{pkg}/bin/narq-hook"));
    assert_eq!(v["etc"], serde_json::json!(["narq/config.toml"]));
    assert_eq!(v["systemPackages"], serde_json::json!([pkg]));
    // The socket, where the config says, for root and the group.
    let sock = &unit(&v, "sockets", "narq")["socketConfig"];
    assert_eq!(sock["ListenStream"], "/run/narq/x.sock");
    assert_eq!((&sock["SocketMode"], &sock["SocketUser"], &sock["SocketGroup"]), (&"0660".into(), &"root".into(), &"cache".into()));
    assert_eq!(unit(&v, "sockets", "narq")["wantedBy"], serde_json::json!(["sockets.target"]));
    // The service: the daemon with that config, as the given user, with the secrets file.
    let svc = unit(&v, "services", "narq");
    assert_eq!(svc["requires"], serde_json::json!(["narq.socket"]));
    assert_eq!(svc["environment"]["NARQ_CONFIG"], config_file);
    let sc = &svc["serviceConfig"];
    assert_eq!(sc["ExecStart"], format!("{pkg}/bin/narq daemon --config {config_file}"));
    assert_eq!((&sc["Type"], &sc["User"], &sc["Group"]), (&"notify".into(), &"uploader".into(), &"cache".into()));
    assert_eq!(sc["DynamicUser"], serde_json::Value::Null);
    assert_eq!((&sc["EnvironmentFile"], &sc["MemoryMax"]), (&"/etc/narq/aws.env".into(), &"512M".into()));
    assert_eq!(v["users"]["users"]["uploader"], serde_json::json!({ "isSystemUser": true, "group": "cache" }));
    assert_eq!(v["users"]["groups"]["cache"], serde_json::json!({}));
    // The config file, as narq itself reads it.
    let c = rendered_config(&v);
    assert_eq!(c.store.original, "s3://c-1?region=eu-west-1");
    assert_eq!(c.socket, Path::new("/run/narq/x.sock"));
    assert_eq!((c.jobs, c.allowed_uids.as_slice(), c.upstream.len()), (8, &[0][..], 0));
    assert_eq!(c.secret_key_files, [PathBuf::from("/etc/nix/c.sec")]);
    assert_eq!(c.public_keys.len(), 1);
    assert_eq!(c.state_dir, Path::new("/var/lib/narq"));
    assert_eq!(c.metrics_listen, Some("127.0.0.1:9464".parse().unwrap()));
    assert_eq!((c.filters.exclude.as_slice(), c.filters.upstream_keys.as_slice()), (&["*-source".to_string()][..], &["cache.nixos.org-1".to_string()][..]));

    // No gc timer unless asked for; with one, `narq gc` as the daemon's user, on its dates.
    assert_eq!(v["systemd"]["timers"], serde_json::json!({}));
    let v = eval_module(&lib, &enabled(r#"user = "uploader"; gc = { enable = true; dates = "daily"; keepDays = 7; maxSize = "50G"; };"#)).unwrap();
    assert_eq!(v["systemd"]["timers"]["narq-gc"]["timerConfig"]["OnCalendar"], "daily");
    let gc = unit(&v, "services", "narq-gc");
    assert_eq!((&gc["serviceConfig"]["User"], &gc["serviceConfig"]["Type"]), (&"uploader".into(), &"oneshot".into()));
    assert!(gc["serviceConfig"]["ExecStart"].as_str().is_some_and(|e| e.contains("/bin/narq gc")), "{gc}");
    let c = rendered_config(&v);
    assert_eq!((c.gc.keep_days, c.gc.max_size), (7, Some(50 << 30)));

    // Without a user: a DynamicUser, and no user declared.
    let v = eval_module(&lib, &enabled("")).unwrap();
    assert_eq!(unit(&v, "services", "narq")["serviceConfig"]["DynamicUser"], true);
    assert_eq!(v["users"]["users"], serde_json::json!({}));
    // By default no path hash leaves the machine: no upstream is asked, nixpkgs' paths are
    // recognised by their signature.
    assert!(rendered_config(&v).upstream.is_empty());
    assert_eq!(rendered_config(&v).filters.upstream_public_keys.len(), 1);
    assert_eq!(rendered_config(&v).metrics_listen, None);
}
