//! The NixOS module, the systemd units and the daemon under systemd's protocols
//! (socket activation, sd_notify, journald), as far as they can be checked without nixpkgs.

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
