//! One configuration, read by the hook, the daemon and the CLI, validated once.
//!
//! Found at `--config FILE`, else `$NARQ_CONFIG`, else `/etc/narq/config.toml`. When the
//! default file does not exist, the defaults apply (a `file://` cache under the state dir);
//! a file named explicitly must exist. Every error names the file, the key and the problem.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

use crate::nix::{PathInfo, PublicKey, SecretKey};
use crate::store_url::StoreUrl;

pub const DEFAULT_PATH: &str = "/etc/narq/config.toml";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/narq";
pub const DEFAULT_SOCKET: &str = "/run/narq/narq.sock";

#[derive(Debug, Error)]
#[error("config {file}{}: {msg}", key.as_ref().map(|k| format!(", key `{k}`")).unwrap_or_default())]
pub struct ConfigError {
    pub file: String,
    pub key: Option<String>,
    pub msg: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct Raw {
    store: Option<String>,
    #[serde(default)]
    secret_key_files: Vec<PathBuf>,
    #[serde(default)]
    public_keys: Vec<String>,
    socket: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    jobs: Option<usize>,
    #[serde(default)]
    allowed_users: Vec<String>,
    #[serde(default)]
    upstream: Vec<String>,
    metrics_listen: Option<String>,
    #[serde(default)]
    exclude: Vec<String>,
    #[serde(default)]
    upstream_keys: Vec<String>,
    #[serde(default)]
    gc: RawGc,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawGc {
    keep_days: Option<u64>,
    max_size: Option<String>,
    grace: Option<String>,
}

/// `[gc]`: what `narq gc` keeps, unless its options say otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcConfig {
    /// Roots pushed within this many days stay, with their closures.
    pub keep_days: u64,
    /// If what stays is larger, the oldest roots go first (never pins).
    pub max_size: Option<u64>,
    /// Anything written within this long stays (uploads in progress anywhere).
    pub grace: Duration,
}

impl Default for GcConfig {
    fn default() -> Self {
        GcConfig { keep_days: 30, max_size: None, grace: Duration::from_secs(86400) }
    }
}

/// `jobs` when the config sets none: enough requests in flight to hide round trips to a
/// distant S3 region behind each other for a closure of small paths.
pub const DEFAULT_JOBS: usize = 64;

#[derive(Debug, Clone)]
pub struct Config {
    /// Where this configuration came from (for messages); `None` for built-in defaults.
    pub file: Option<PathBuf>,
    /// Where uploads go.
    pub store: StoreUrl,
    /// Keys the hook and `narq push` sign with (the daemon never needs them).
    pub secret_key_files: Vec<PathBuf>,
    /// `public-keys`: keys whose signatures the daemon accepts on handed-in paths (see
    /// [`Config::trusted_keys`]).
    pub public_keys: Vec<PublicKey>,
    /// The daemon's Unix socket (unless systemd passes one).
    pub socket: PathBuf,
    /// The durable queue, the spool of requests written while the daemon was away, temp files.
    pub state_dir: PathBuf,
    /// The most uploads at once; what they hold in memory bounds them too (see
    /// `daemon::workers`).
    pub jobs: usize,
    /// Users besides root and the daemon's own user who may enqueue.
    pub allowed_uids: Vec<u32>,
    /// Binary caches (http(s) URLs) whose paths are not uploaded again.
    pub upstream: Vec<String>,
    /// `metrics-listen`: where the daemon serves Prometheus `/metrics`, if anywhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// What the daemon does not upload (`exclude`, `upstream-keys`).
    pub filters: Filters,
    /// `[gc]`: defaults of `narq gc`.
    pub gc: GcConfig,
}

/// What the daemon leaves out, decided from the config when an item is about to be
/// uploaded (so a changed config applies to what is queued, and `narq push` re-decides).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filters {
    /// `exclude`: globs (`*`, `?`) on store path names (after `<hash>-`). A matching path is
    /// not uploaded, nor is anything that references it (its closure would be broken).
    pub exclude: Vec<String>,
    /// `upstream-keys`: names of keys an upstream cache signs with (`cache.nixos.org-1`). A
    /// path whose local signatures include one came from that cache: it is skipped without
    /// asking anyone.
    pub upstream_keys: Vec<String>,
    /// The `upstream-keys` given whole (`NAME:BASE64`, as in `trusted-public-keys`): a
    /// signature in such a key's name counts only if it verifies.
    pub upstream_public_keys: Vec<PublicKey>,
}

impl Filters {
    /// The `exclude` pattern that store path name `name` matches, if any.
    pub fn excluded(&self, name: &str) -> Option<&str> {
        self.exclude.iter().find(|p| glob_match(p.as_bytes(), name.as_bytes())).map(String::as_str)
    }

    /// The `upstream-keys` key that signed `info`, if any: by name, or, for a key given
    /// whole, by a signature that verifies.
    pub fn upstream_key(&self, info: &PathInfo) -> Option<&str> {
        let named = |k: &str| info.sigs.iter().any(|s| s.split_once(':').is_some_and(|(n, _)| n == k));
        let key = self.upstream_keys.iter().find(|k| named(k))?;
        let whole: Vec<PublicKey> = self.upstream_public_keys.iter().filter(|p| p.name == *key).cloned().collect();
        (whole.is_empty() || info.signed_by_any(&whole)).then_some(key.as_str())
    }
}

/// Whether `name` matches the glob `pat`: `*` any run of bytes, `?` one byte, anything else
/// itself. Greedy with one backtrack point, so linear-ish and never exponential.
pub fn glob_match(pat: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    // Where the last `*` was, and the name position it has swallowed up to.
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pat.get(p) {
            Some(b'*') => {
                star = Some((p, n));
                p += 1;
            }
            Some(&c) if c == b'?' || c == name[n] => {
                p += 1;
                n += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    p = sp + 1;
                    n = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    pat[p..].iter().all(|&c| c == b'*')
}

impl Config {
    /// The config file to read: `explicit`, else `$NARQ_CONFIG`, else the default.
    pub fn locate(explicit: Option<&Path>) -> (PathBuf, bool) {
        if let Some(p) = explicit {
            return (p.to_path_buf(), true);
        }
        match std::env::var_os("NARQ_CONFIG") {
            Some(p) if !p.is_empty() => (PathBuf::from(p), true),
            _ => (PathBuf::from(DEFAULT_PATH), false),
        }
    }

    pub fn load(explicit: Option<&Path>) -> Result<Config, ConfigError> {
        let (path, must_exist) = Config::locate(explicit);
        match std::fs::read_to_string(&path) {
            Ok(text) => Config::parse(&text, Some(&path)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => Config::parse("", None),
            Err(e) => Err(ConfigError { file: path.display().to_string(), key: None, msg: e.to_string() }),
        }
    }

    pub fn parse(text: &str, file: Option<&Path>) -> Result<Config, ConfigError> {
        let fname = describe(file);
        let err = |key: Option<&str>, msg: String| ConfigError { file: fname.clone(), key: key.map(str::to_string), msg };
        let raw: Raw = toml::from_str(text).map_err(|e| {
            let (line, key) = e
                .span()
                .map(|s| {
                    let line = text[..s.start].matches('\n').count() + 1;
                    let l = text.lines().nth(line - 1).unwrap_or("");
                    (Some(line), l.split_once('=').map(|(k, _)| k.trim().to_string()))
                })
                .unwrap_or((None, None));
            let msg = e.message().to_string();
            let msg = line.map_or(msg.clone(), |l| format!("line {l}: {msg}"));
            err(key.as_deref().filter(|k| !k.is_empty()), msg)
        })?;
        let state_dir = raw.state_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        if !state_dir.is_absolute() {
            return Err(err(Some("state-dir"), format!("{} is not an absolute path", state_dir.display())));
        }
        let default_store = format!("file://{}", state_dir.join("cache").display());
        let store = StoreUrl::parse(raw.store.as_deref().unwrap_or(&default_store)).map_err(|m| err(Some("store"), m))?;
        let mut public_keys = Vec::new();
        for (i, k) in raw.public_keys.iter().enumerate() {
            public_keys.push(PublicKey::parse(k).map_err(|e| err(Some(&format!("public-keys[{i}]")), e.to_string()))?);
        }
        let mut secret_key_files = raw.secret_key_files;
        secret_key_files.extend(store.secret_keys.iter().cloned());
        let jobs = raw.jobs.unwrap_or(DEFAULT_JOBS);
        if !(1..=256).contains(&jobs) {
            return Err(err(Some("jobs"), format!("{jobs} is out of range 1..=256")));
        }
        let allowed_uids = raw
            .allowed_users
            .iter()
            .map(|u| resolve_user(u).ok_or_else(|| err(Some("allowed-users"), format!("no such user {u:?}"))))
            .collect::<Result<_, _>>()?;
        for u in &raw.upstream {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return Err(err(Some("upstream"), format!("{u:?} is not an http(s) binary cache URL")));
            }
        }
        let metrics_listen = match raw.metrics_listen.as_deref() {
            None => None,
            Some(a) => Some(a.parse().map_err(|e| {
                err(Some("metrics-listen"), format!("{a:?} is not an IP address and port such as \"127.0.0.1:9464\" ({e})"))
            })?),
        };
        for (i, p) in raw.exclude.iter().enumerate() {
            if p.is_empty() || p.contains('/') {
                return Err(err(Some(&format!("exclude[{i}]")), format!("{p:?} is not a glob on store path names (like \"*-source\": no '/', not empty)")));
            }
        }
        // A whole public key (`NAME:BASE64`, as in trusted-public-keys) names its key, and
        // its signatures are checked.
        let (mut upstream_keys, mut upstream_public_keys) = (Vec::new(), Vec::new());
        for (i, k) in raw.upstream_keys.iter().enumerate() {
            let key = Some(format!("upstream-keys[{i}]"));
            if k.contains(':') {
                upstream_public_keys.push(PublicKey::parse(k).map_err(|e| err(key.as_deref(), e.to_string()))?);
            }
            let name = k.split_once(':').map_or(k.as_str(), |(n, _)| n);
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(err(key.as_deref(), format!("{k:?} is not a key name (like \"cache.nixos.org-1\") or NAME:BASE64")));
            }
            upstream_keys.push(name.to_string());
        }
        let d = GcConfig::default();
        let gc = GcConfig {
            keep_days: raw.gc.keep_days.unwrap_or(d.keep_days),
            max_size: raw.gc.max_size.as_deref().map(parse_size).transpose().map_err(|m| err(Some("gc.max-size"), m))?,
            grace: raw.gc.grace.as_deref().map(parse_duration).transpose().map_err(|m| err(Some("gc.grace"), m))?.unwrap_or(d.grace),
        };
        Ok(Config {
            gc,
            file: file.map(Path::to_path_buf),
            store,
            secret_key_files,
            public_keys,
            socket: raw.socket.unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET)),
            state_dir,
            jobs,
            allowed_uids,
            upstream: raw.upstream.iter().map(|u| u.trim_end_matches('/').to_string()).collect(),
            metrics_listen,
            filters: Filters { exclude: raw.exclude, upstream_keys, upstream_public_keys },
        })
    }

    /// Reads every secret key file; an unreadable or malformed one is an error naming it.
    pub fn secret_keys(&self) -> Result<Vec<SecretKey>, ConfigError> {
        self.secret_key_files
            .iter()
            .map(|f| {
                SecretKey::read(f).map_err(|e| ConfigError {
                    file: describe(self.file.as_deref()),
                    key: Some("secret-key-files".into()),
                    msg: e.to_string(),
                })
            })
            .collect()
    }

    /// One line naming the secret key files that other users may read or write, or `None`.
    ///
    /// ssh refuses such a key; narq signs with it anyway and says so: the key may already
    /// have been read, and refusing it would leave every build unuploaded without undoing
    /// that. Group read is allowed: `root:narq 0640` lets the daemon derive the public key.
    pub fn secret_key_warning(&self) -> Option<String> {
        use std::os::unix::fs::PermissionsExt;
        let open: Vec<String> = self
            .secret_key_files
            .iter()
            .filter_map(|f| {
                let mode = std::fs::metadata(f).ok()?.permissions().mode() & 0o7777;
                // Group read too: a group that may read the key (the socket's, say) is a group
                // of signers; the daemon needs only `public-keys`.
                (mode & 0o077 != 0).then(|| format!("{} (mode {mode:04o})", f.display()))
            })
            .collect();
        (!open.is_empty()).then(|| {
            format!("secret key file {} is open to other users: signing with it anyway; chmod 600 it and consider the key exposed", open.join(", "))
        })
    }

    /// The keys the daemon checks signatures against: `public-keys`, plus the public halves
    /// of the `secret-key-files` it can read. (Not done while parsing: the hook has no use
    /// for it, and deriving a public key costs a scalar multiplication.)
    pub fn trusted_keys(&self) -> Vec<PublicKey> {
        let mut keys = self.public_keys.clone();
        for sk in self.secret_key_files.iter().filter_map(|f| SecretKey::read(f).ok()) {
            if !keys.contains(&sk.public()) {
                keys.push(sk.public());
            }
        }
        keys
    }

    /// [`Config::trusted_keys`], which the daemon cannot do without: it uploads a path only
    /// with a signature by one of them. None is an error naming the file and `public-keys`.
    pub fn required_trusted_keys(&self) -> Result<Vec<PublicKey>, ConfigError> {
        let keys = self.trusted_keys();
        if keys.is_empty() {
            return Err(ConfigError {
                file: describe(self.file.as_deref()),
                key: Some("public-keys".into()),
                msg: "no key to check signatures with: set the cache's public key here (the daemon could read none of secret-key-files)".into(),
            });
        }
        Ok(keys)
    }

    pub fn spool_dir(&self) -> PathBuf {
        self.state_dir.join("spool")
    }
}

/// Parses `30d`, `6h`, `15m`, `0s` (and plain seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.find(|c: char| !c.is_ascii_digit()).map_or((s, ""), |i| s.split_at(i));
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration (like 30d, 6h, 15m, 0s)"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        "w" => 7 * 86400,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use s, m, h, d or w)")),
    };
    n.checked_mul(mult).map(Duration::from_secs).ok_or_else(|| format!("{s:?} is too long"))
}

/// Parses `500G`, `20M`, `1T`, `4096` (bytes; K, M, G, T are powers of 1024; an optional `B`
/// or `iB` after them).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, unit) = t.find(|c: char| !c.is_ascii_digit() && c != '.').map_or((t, ""), |i| t.split_at(i));
    let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a size (like 500G, 20M)"))?;
    let unit = unit.trim().to_ascii_uppercase();
    let shift = match unit.trim_end_matches("IB").trim_end_matches('B') {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        "P" => 50,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use K, M, G, T or P)")),
    };
    let v = n * (1u64 << shift) as f64;
    if !v.is_finite() || v < 0.0 || v >= u64::MAX as f64 {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(v as u64)
}

/// The config file, as error messages name it.
fn describe(file: Option<&Path>) -> String {
    file.map_or("(built-in defaults)".to_string(), |f| f.display().to_string())
}

/// A user name or numeric uid to a uid.
fn resolve_user(u: &str) -> Option<u32> {
    if let Ok(n) = u.parse() {
        return Some(n);
    }
    let name = std::ffi::CString::new(u).ok()?;
    // SAFETY: getpwnam returns NULL or a pointer to static storage, read before any other call.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    (!pw.is_null()).then(|| unsafe { (*pw).pw_uid })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_put_a_file_cache_under_the_state_dir() {
        let c = Config::parse("state-dir = \"/tmp/x\"\n", Some(Path::new("/etc/narq/config.toml"))).unwrap();
        assert_eq!(c.store.location, crate::store_url::Location::File("/tmp/x/cache".into()));
        assert_eq!(c.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(c.jobs, DEFAULT_JOBS);
        assert_eq!(c.gc, GcConfig::default());
        let c = Config::parse("[gc]\nkeep-days = 7\nmax-size = \"500G\"\ngrace = \"6h\"\n", None).unwrap();
        assert_eq!(c.gc, GcConfig { keep_days: 7, max_size: Some(500 << 30), grace: std::time::Duration::from_secs(6 * 3600) });
        assert_eq!(Config::parse("allowed-users = [\"root\", \"1000\"]", None).unwrap().allowed_uids, [0, 1000]);
        assert_eq!(c.metrics_listen, None);
        let c = Config::parse("metrics-listen = \"127.0.0.1:9464\"", None).unwrap();
        assert_eq!(c.metrics_listen, Some(([127, 0, 0, 1], 9464).into()));
    }

    #[test]
    fn secret_keys_others_may_read_or_write_are_named() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("narq-keymode-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (mode, warned) in [(0o600, false), (0o400, false), (0o640, true), (0o644, true), (0o660, true), (0o602, true)] {
            let f = dir.join("k.sec");
            std::fs::write(&f, "k:x").unwrap();
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
            let c = Config::parse(&format!("secret-key-files = [{:?}]", f.display().to_string()), None).unwrap();
            let w = c.secret_key_warning();
            assert_eq!(w.is_some(), warned, "{mode:o}: {w:?}");
            if let Some(w) = w {
                assert!(w.contains(&format!("{} (mode {mode:04o})", f.display())), "{w}");
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn globs_match_store_path_names() {
        for (pat, name, want) in [
            ("*-source", "nixpkgs-source", true),
            ("*-source", "source", false),
            ("*-source", "foo-source-1", false),
            ("*.iso", "nixos-24.05.iso", true),
            ("*.iso", "iso", false),
            ("foo-?.?", "foo-1.2", true),
            ("foo-?.?", "foo-12.2", false),
            ("*", "", true),
            ("", "", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyyd", false),
            ("**x", "yyx", true),
            ("*a*a*a*a*a*b", &"a".repeat(60), false),
        ] {
            assert_eq!(glob_match(pat.as_bytes(), name.as_bytes()), want, "{pat} ~ {name}");
        }
        let c = Config::parse("exclude = [\"*-source\", \"*.iso\"]", None).unwrap();
        assert_eq!(c.filters.excluded("x.iso"), Some("*.iso"));
        assert_eq!(c.filters.excluded("x-src"), None);
        assert_eq!(Config::parse("", None).unwrap().filters, Filters::default());
    }

    #[test]
    fn upstream_keys_match_by_name_or_verify_when_given_whole() {
        use crate::nix::{Sha256, StorePath};
        let up = SecretKey::generate("up-1").unwrap();
        let mut info = PathInfo {
            path: StorePath::parse("/nix/store/0w1m0c4d7h5hhkylyqza1im3y5icykxx-x").unwrap(),
            nar_hash: Sha256::digest(b"x"),
            nar_size: 8,
            references: Default::default(),
            deriver: None,
            sigs: Default::default(),
            ca: None,
        };
        let by_name = Config::parse("upstream-keys = [\"up-1\"]", None).unwrap().filters;
        let whole = Config::parse(&format!("upstream-keys = [{:?}]", up.public().to_nix_string()), None).unwrap().filters;
        assert_eq!((by_name.upstream_key(&info), whole.upstream_key(&info)), (None, None));
        // Forged in the key's name: a name is enough for a name, not for a whole key.
        info.sign(&SecretKey::generate("up-1").unwrap());
        assert_eq!((by_name.upstream_key(&info), whole.upstream_key(&info)), (Some("up-1"), None));
        info.sign(&up);
        assert_eq!(whole.upstream_key(&info), Some("up-1"));
        let e = Config::parse("upstream-keys = [\"up-1:AAAA\"]", None).unwrap_err().to_string();
        assert!(e.contains("key `upstream-keys[0]`"), "{e}");
    }

    #[test]
    fn errors_name_file_key_and_problem() {
        let f = Some(Path::new("/etc/narq/config.toml"));
        for (text, want) in [
            ("jobs = \"four\"", "config /etc/narq/config.toml, key `jobs`: line 1: invalid type"),
            ("store = \"s3://bucket?compression=lz4\"", "key `store`: compression=\"lz4\" is not supported"),
            ("\n\nstroe = \"x\"", "line 3: unknown field `stroe`"),
            ("public-keys = [\"k:AAAA\"]", "key `public-keys[0]`: key \"k\": public key is 3 bytes"),
            ("jobs = 0", "key `jobs`: 0 is out of range"),
            ("state-dir = \"rel\"", "key `state-dir`: rel is not an absolute path"),
            ("allowed-users = [\"no-such-user-narq\"]", "no such user"),
            ("store = ", "line 1"),
            ("metrics-listen = \"localhost:9464\"", "key `metrics-listen`: \"localhost:9464\" is not an IP address and port"),
            ("metrics-listen = 9464", "key `metrics-listen`: line 1: invalid type"),
            ("exclude = [\"/nix/store/*-source\"]", "key `exclude[0]`: \"/nix/store/*-source\" is not a glob on store path names"),
            ("exclude = [\"*.iso\", \"\"]", "key `exclude[1]`"),
            ("upstream-keys = [\"a b\"]", "key `upstream-keys[0]`: \"a b\" is not a key name"),
            ("[gc]\ngrace = \"3x\"", "key `gc.grace`: \"3x\": unknown unit"),
            ("[gc]\nmax-size = \"lots\"", "key `gc.max-size`: \"lots\" is not a size"),
            ("[gc]\nkeep-days = -1", "line 2"),
        ] {
            let e = Config::parse(text, f).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(e.starts_with("config /etc/narq/config.toml"), "{e}");
        }
    }
}
