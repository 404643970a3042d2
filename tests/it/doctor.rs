//! `narq doctor`: passes on good set-ups (file:// and S3), and each broken part makes it fail
//! with exactly one line naming that part.

use crate::util::*;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// `narq doctor` with `n`'s config and Nix settings from `nix_conf`: (exit 0?, its lines).
fn doctor(n: &Narq, nix_conf: &Path) -> (bool, Vec<String>) {
    let out = output(
        Command::new(bin("narq"))
            .arg("doctor")
            .env("NARQ_CONFIG", &n.config)
            .env("NIX_CONF_DIR", nix_conf)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_EC2_METADATA_DISABLED", "true"),
    );
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect();
    assert!(out.status.code() == Some(0) || out.status.code() == Some(1), "{:?}: {lines:?} {}", out.status, String::from_utf8_lossy(&out.stderr));
    (out.status.success(), lines)
}

/// Asserts that doctor passes: exit 0, every check `ok`, and the checks in `names` ran.
fn passes(n: &Narq, names: &[&str]) -> Vec<String> {
    let (ok, lines) = doctor(n, &n.nix_conf);
    assert!(ok, "doctor failed on a good set-up:\n{}\ndaemon log:\n{}", lines.join("\n"), n.daemon_log());
    for name in names {
        assert!(lines.iter().any(|l| l.starts_with(&format!("ok    {name}"))), "no ok line for {name}: {lines:#?}");
    }
    assert!(lines.last().unwrap().starts_with("narq doctor: all "), "{lines:#?}");
    lines
}

/// Asserts that doctor exits 1 with exactly one failing line, for check `name`, saying `why`.
fn fails_once(n: &Narq, nix_conf: &Path, name: &str, why: &str) {
    let (ok, lines) = doctor(n, nix_conf);
    let failed: Vec<&String> = lines.iter().filter(|l| l.starts_with("FAIL")).collect();
    assert!(!ok, "doctor passed: {lines:#?}");
    assert_eq!(failed.len(), 1, "{name}: {lines:#?}");
    assert!(failed[0].starts_with(&format!("FAIL  {name}")) && failed[0].contains(why), "{name} / {why}: {lines:#?}");
    assert!(lines.last().unwrap().contains("1 of "), "{lines:#?}");
}

fn set_config(n: &Narq, text: &str) {
    std::fs::write(&n.config, text).unwrap();
}

#[test]
fn doctor_passes_on_a_good_set_up_and_names_each_broken_part() {
    let mut n = Narq::new("doctor", "");
    // The cache on a file system of its own, to make it read-only later (root writes
    // anywhere else).
    let cache = n.dir.join("cache");
    let fs = Tmpfs::mount(&cache, "16M");
    let good = format!(
        "{}store = \"file://{}\"\npublic-keys = [\"{}\"]\n",
        std::fs::read_to_string(&n.config).unwrap(),
        cache.display(),
        n.public_key
    );
    set_config(&n, &good);
    n.start();
    assert!(wait_for(Duration::from_secs(10), || cache.join("nix-cache-info").exists()), "{}", n.daemon_log());
    let lines = passes(&n, &["config", "secret key", "daemon", "nix", "store", "nix-cache-info"]);
    assert!(lines.iter().any(|l| l.contains("matches public-keys")), "{lines:#?}");
    // The probe leaves nothing behind, not even narq's directory.
    assert!(!cache.join("narq").exists());

    // A key others may read.
    let key = n.dir.join("key.sec");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    fails_once(&n, &n.nix_conf, "secret key", &format!("{}: mode 0644 lets other users at it: chmod 600", key.display()));
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    // A public key of the same name that is not the secret key's half.
    let other = TempDir::new("doctor-other");
    let name = n.public_key.split(':').next().unwrap();
    run(Command::new(bin("narq")).args(["keygen", name, "--secret-key-file"]).arg(other.join("k.sec")).arg("--public-key-file").arg(other.join("k.pub")));
    let wrong = std::fs::read_to_string(other.join("k.pub")).unwrap();
    set_config(&n, &good.replace(&n.public_key, wrong.trim()));
    fails_once(&n, &n.nix_conf, "secret key", &format!("public-keys has a key named {name:?} that is not this key's public half"));
    set_config(&n, &good);

    // A store that takes no writes.
    run(Command::new("mount").args(["-o", "remount,ro"]).arg(&cache));
    fails_once(&n, &n.nix_conf, "store", "cannot write a probe object");
    fails_once(&n, &n.nix_conf, "store", "Read-only file system");
    run(Command::new("mount").args(["-o", "remount,rw"]).arg(&cache));

    // Nix without the hook.
    let bare = TempDir::new("doctor-nix");
    fails_once(&n, &nix_conf(bare.path(), None), "nix", "Nix runs no post-build-hook");
    let other_hook = nix_conf(bare.path(), Some(Path::new("/bin/true")));
    fails_once(&n, &other_hook, "nix", "post-build-hook is /bin/true, not narq-hook");

    // A stopped daemon.
    n.kill9();
    fails_once(&n, &n.nix_conf, "daemon", &format!("no answer on {}", n.socket().display()));
    drop(fs);
}

#[test]
fn doctor_passes_on_s3_checks_the_clock_and_leaves_no_probe() {
    let mut n = Narq::new("doctor-s3", "");
    let moto = Moto::start(n.dir.path(), &[]);
    moto.bucket("doctor");
    let config = format!(
        "{}store = \"s3://doctor?endpoint=127.0.0.1:{port}&scheme=http&region=us-east-1\"\npublic-keys = [\"{}\"]\nupstream = [\"http://127.0.0.1:{port}/doctor\"]\n",
        std::fs::read_to_string(&n.config).unwrap(),
        n.public_key,
        port = moto.port
    );
    set_config(&n, &config);
    n.start();
    assert!(
        wait_for(Duration::from_secs(20), || http(moto.port, "GET", "/doctor/nix-cache-info").0.starts_with("http/1.1 200")),
        "{}",
        n.daemon_log()
    );
    let lines = passes(&n, &["store", "clock", "nix-cache-info", &format!("upstream http://127.0.0.1:{}/doctor", moto.port)]);
    assert!(lines.iter().any(|l| l.starts_with("ok    clock: within ")), "{lines:#?}");
    // The probe went through S3 and is gone.
    let log = std::fs::read_to_string(&moto.log).unwrap();
    assert!(log.contains("PUT /doctor/narq/doctor-probe-"), "{log}");
    let (_, listing) = http(moto.port, "GET", "/doctor?list-type=2&prefix=narq/");
    let listing = String::from_utf8_lossy(&listing);
    assert!(listing.contains("<KeyCount>0</KeyCount>"), "{listing}");

    // An upstream that does not answer is named.
    let dead = free_port();
    set_config(&n, &config.replace(&format!("upstream = [\"http://127.0.0.1:{}/doctor\"]", moto.port), &format!("upstream = [\"http://127.0.0.1:{dead}\"]")));
    fails_once(&n, &n.nix_conf, &format!("upstream http://127.0.0.1:{dead}"), "no answer");
}

/// An S3 endpoint whose clock is an hour behind: the clock line says ours is ahead. (Its other answers
/// are empty, so the store checks fail too; only the clock line matters here.)
#[test]
fn doctor_names_a_clock_skew_beyond_15_minutes() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let an_hour_ago = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() - 3600;
    let date = run(Command::new("date").args(["-u", "-d", &format!("@{an_hour_ago}"), "+%a, %d %b %Y %H:%M:%S GMT"]));
    let date = date.trim().to_string();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let server = std::thread::spawn(move || {
        use std::io::{Read, Write};
        // Bounded: at most 60 s of 5 ms steps.
        for _ in 0..12_000 {
            if stop2.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
                    let mut buf = [0u8; 65536];
                    let _ = s.read(&mut buf);
                    let _ = write!(s, "HTTP/1.1 200 OK\r\nDate: {date}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    let n = Narq::new("doctor-skew", &format!("store = \"s3://skewed?endpoint=127.0.0.1:{port}&scheme=http\""));
    let (ok, lines) = doctor(&n, &n.nix_conf);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    server.join().unwrap();
    assert!(!ok);
    let clock = lines.iter().find(|l| l.starts_with("FAIL  clock: ")).unwrap_or_else(|| panic!("{lines:#?}"));
    assert!(clock.contains("s ahead of http://127.0.0.1:") && clock.contains("more than 15 min off"), "{clock}");
}
