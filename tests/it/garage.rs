//! A 3-node Garage cluster on 127.0.0.1 (issue 20): Garage 2.5 built by
//! scripts/setup-garage.sh, replication factor 3, SQLite metadata. Started once per test run
//! and shared by the cluster tests, which take turns ([`Cluster::get`] hands out a guard):
//! they kill and restart nodes, and a 3-node cluster on 2 cores is slow to heal.
//!
//! Every wait is bounded, generous, and says what it waited for.

use crate::util::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// Where scripts/setup-garage.sh installs Garage (`NARQ_GARAGE` overrides).
pub const GARAGE: &str = "/var/cache/narq-test/garage-2.5.0/bin/garage";

/// The S3 credentials the cluster knows (imported, so that they are the same every run).
pub const KEY_ID: &str = "GK6e617271746573745f6b6579";
pub const SECRET: &str = "6e61727174657374736563726574000000000000000000000000000000000000";

/// How long the cluster may take to come up, or to heal after nodes return. One of four
/// runs on a loaded 2-core machine once took over 180 s to heal.
pub const HEAL: Duration = Duration::from_secs(300);

pub struct Node {
    pub s3: u16,
    /// The website endpoint: buckets as plain HTTP for Nix (`Host: <bucket>.web.garage.localhost`).
    pub web: u16,
    rpc: u16,
    config: PathBuf,
    log: PathBuf,
    child: Mutex<Option<Child>>,
}

pub struct Cluster {
    pub nodes: Vec<Node>,
    /// How long it took to start, connect, lay out and heal.
    pub setup: Duration,
}

/// The cluster tests take turns.
static TURN: Mutex<()> = Mutex::new(());
static CLUSTER: OnceLock<Cluster> = OnceLock::new();

/// Runs `f` on a thread that lives as long as the test process. Garage's processes are
/// started from it with `PR_SET_PDEATHSIG`, which fires when the *thread* that forked them
/// ends: tied to it, they die with the test process, not with the test that started them.
fn spawn_for_the_run(cmd: Command) -> std::io::Result<Child> {
    type Job = (Command, std::sync::mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<std::sync::mpsc::Sender<Job>>> = OnceLock::new();
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::spawn(move || {
            for (mut cmd, back) in rx {
                use std::os::unix::process::CommandExt;
                // SAFETY: prctl only sets an attribute of the child, between fork and exec.
                unsafe {
                    cmd.pre_exec(|| {
                        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                        Ok(())
                    });
                }
                let _ = back.send(cmd.spawn());
            }
        });
        Mutex::new(tx)
    });
    let (back, answer) = std::sync::mpsc::channel();
    tx.lock().unwrap().send((cmd, back)).unwrap();
    answer.recv().unwrap()
}

fn garage_bin() -> PathBuf {
    let p = std::env::var_os("NARQ_GARAGE").map_or_else(|| PathBuf::from(GARAGE), PathBuf::from);
    // build.rs found it (else the cluster tests are compiled ignored): it went away since.
    assert!(p.exists(), "Garage not found at {} (scripts/setup.sh builds it; NARQ_GARAGE names another; then `touch build.rs`)", p.display());
    p
}

impl Cluster {
    /// The cluster, started on first use, and this test's turn. Where Garage is not installed
    /// (scripts/setup.sh builds it), build.rs has the cluster tests compiled ignored.
    pub fn get(test: &str) -> (MutexGuard<'static, ()>, &'static Cluster) {
        let turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
        let cluster = CLUSTER.get_or_init(|| Cluster::start(&garage_bin()));
        // A test that failed may have left nodes down: bring them back first.
        cluster.restore(test);
        (turn, cluster)
    }

    fn start(bin: &Path) -> Cluster {
        let start = Instant::now();
        let dir = std::env::temp_dir().join(format!("narq-garage-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let secret: String = (0..32).map(|i| format!("{:02x}", (i * 37 + 11) % 256)).collect();
        let nodes: Vec<Node> = (0..3)
            .map(|i| {
                let n = dir.join(format!("node{i}"));
                std::fs::create_dir_all(&n).unwrap();
                let (s3, rpc, web, admin) = (free_port(), free_port(), free_port(), free_port());
                let config = n.join("garage.toml");
                std::fs::write(
                    &config,
                    format!(
                        "metadata_dir = \"{n}/meta\"\ndata_dir = \"{n}/data\"\ndb_engine = \"sqlite\"\nreplication_factor = 3\n\
                         rpc_bind_addr = \"127.0.0.1:{rpc}\"\nrpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{secret}\"\n\
                         [s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"127.0.0.1:{s3}\"\nroot_domain = \".s3.garage.localhost\"\n\
                         [s3_web]\nbind_addr = \"127.0.0.1:{web}\"\nroot_domain = \".web.garage.localhost\"\n\
                         [admin]\napi_bind_addr = \"127.0.0.1:{admin}\"\n",
                        n = n.display()
                    ),
                )
                .unwrap();
                Node { s3, web, rpc, log: n.join("garage.log"), config, child: Mutex::new(None) }
            })
            .collect();
        let c = Cluster { nodes, setup: Duration::ZERO };
        for i in 0..3 {
            c.start_node(i);
        }
        let cli = |args: &[&str]| c.cli(0, args);
        let ids: Vec<String> = (0..3)
            .map(|i| {
                let mut id = String::new();
                let up = wait_for(Duration::from_secs(60), || {
                    let out = output(Command::new(bin).arg("-c").arg(&c.nodes[i].config).args(["node", "id", "-q"]));
                    id = String::from_utf8_lossy(&out.stdout).trim().to_string();
                    out.status.success() && id.contains('@')
                });
                assert!(up, "garage node {i} did not answer `node id` within 60 s:\n{}", c.node_log(i));
                id
            })
            .collect();
        for id in &ids[1..] {
            ok(cli(&["node", "connect", id]));
        }
        for id in &ids {
            let short = &id[..16];
            ok(cli(&["layout", "assign", "-z", "dc1", "-c", "1G", short]));
        }
        ok(cli(&["layout", "apply", "--version", "1"]));
        ok(cli(&["key", "import", "--yes", "-n", "narq-test", KEY_ID, SECRET]));
        c.wait_healthy("the new cluster to be healthy");
        let c = Cluster { setup: start.elapsed(), ..c };
        eprintln!("garage: a 3-node cluster up in {:.1} s", c.setup.as_secs_f64());
        c
    }

    /// `garage -c <node i's config> ARGS`.
    pub fn cli(&self, i: usize, args: &[&str]) -> Output {
        output(Command::new(garage_bin()).arg("-c").arg(&self.nodes[i].config).args(args))
    }

    fn node_log(&self, i: usize) -> String {
        let log = std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    fn start_node(&self, i: usize) {
        let node = &self.nodes[i];
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&node.log).unwrap();
        let mut cmd = Command::new(garage_bin());
        cmd.arg("-c").arg(&node.config).arg("server").env("RUST_LOG", "garage=warn").stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log);
        let child = spawn_for_the_run(cmd).expect("starting garage");
        *node.child.lock().unwrap() = Some(child);
        let up = wait_for(Duration::from_secs(60), || std::net::TcpStream::connect(("127.0.0.1", node.rpc)).is_ok());
        assert!(up, "garage node {i} did not listen on its RPC port within 60 s:\n{}", self.node_log(i));
    }

    /// `kill -9` of node `i`.
    pub fn kill(&self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.lock().unwrap().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts node `i` again (its data kept).
    pub fn revive(&self, i: usize) {
        if self.nodes[i].child.lock().unwrap().is_none() {
            self.start_node(i);
        }
    }

    /// Every node up and the cluster healthy again, after a test that left nodes down.
    fn restore(&self, test: &str) {
        let down: Vec<usize> = (0..3).filter(|i| self.nodes[*i].child.lock().unwrap().is_none()).collect();
        if !down.is_empty() {
            eprintln!("garage: {test}: restarting nodes {down:?} left down by an earlier test");
            down.iter().for_each(|i| self.revive(*i));
            self.wait_healthy(&format!("the cluster to heal before {test}"));
        }
    }

    /// The cluster's health as node 0 sees it (`garage json-api GetClusterHealth`).
    pub fn health(&self) -> serde_json::Value {
        let out = self.cli(0, &["json-api", "GetClusterHealth"]);
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }

    /// Waits (at most [`HEAL`]) until node 0 sees every storage node and every partition
    /// whole; panics naming `what` and the last health seen.
    pub fn wait_healthy(&self, what: &str) {
        let start = Instant::now();
        let mut last = serde_json::Value::Null;
        let healthy = wait_for(HEAL, || {
            last = self.health();
            std::thread::sleep(Duration::from_millis(200));
            last["status"] == "healthy" && last["partitionsAllOk"] == last["partitions"]
        });
        assert!(healthy, "waited {} s for {what}; last health: {last}\nnode 0:\n{}", HEAL.as_secs(), self.node_log(0));
        eprintln!("garage: {what}: {:.1} s", start.elapsed().as_secs_f64());
    }

    /// A new bucket readable by Nix through the website endpoint, writable with [`KEY_ID`].
    pub fn bucket(&self, name: &str) {
        ok(self.cli(0, &["bucket", "create", name]));
        ok(self.cli(0, &["bucket", "allow", "--read", "--write", "--owner", name, "--key", KEY_ID]));
        ok(self.cli(0, &["bucket", "website", "--allow", name]));
    }

    /// The store URL of `bucket` through node `i`'s S3 endpoint (or `port`, a proxy's).
    pub fn store(&self, bucket: &str, port: u16) -> String {
        format!("s3://{bucket}?endpoint=127.0.0.1:{port}&scheme=http&region=garage")
    }

    /// The binary cache Nix reads `bucket` as, through node `i`'s website endpoint (curl
    /// takes `*.localhost` for 127.0.0.1 without DNS).
    pub fn web(&self, bucket: &str, i: usize) -> String {
        format!("http://{bucket}.web.garage.localhost:{}", self.nodes[i].web)
    }
}

impl Cluster {
    /// The HTTP status of a GET of `key` in `bucket` through node `i`'s website endpoint.
    pub fn web_status(&self, bucket: &str, i: usize, key: &str) -> u16 {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.nodes[i].web)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(s, "GET /{key} HTTP/1.1\r\nHost: {bucket}.web.garage.localhost\r\nConnection: close\r\n\r\n").unwrap();
        let mut head = [0u8; 12];
        s.read_exact(&mut head).unwrap();
        String::from_utf8_lossy(&head[9..12]).parse().unwrap()
    }
}

fn ok(out: Output) -> Output {
    assert!(out.status.success(), "garage: {}\n{}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout));
    out
}

/// `narq ARGS` with config `n` and the cluster's credentials.
pub fn narq(n: &Narq, args: &[&str]) -> Output {
    narq_env(n, &[], args)
}

/// The same, with `env` added (e.g. `http_proxy`).
pub fn narq_env(n: &Narq, env: &[(&str, &str)], args: &[&str]) -> Output {
    output(
        scaled(Command::new(bin("narq")).args(args))
            .env("NARQ_CONFIG", &n.config)
            .env("AWS_ACCESS_KEY_ID", KEY_ID)
            .env("AWS_SECRET_ACCESS_KEY", SECRET)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .envs(env.iter().copied()),
    )
}

/// Starts `n`'s daemon with the cluster's credentials and `env`.
pub fn start_env(n: &mut Narq, env: &[(&str, &str)]) {
    n.start_env(&[&[("AWS_ACCESS_KEY_ID", KEY_ID), ("AWS_SECRET_ACCESS_KEY", SECRET)], env].concat());
}

/// Starts `n`'s daemon with the cluster's credentials.
pub fn start(n: &mut Narq) {
    start_env(n, &[]);
}
