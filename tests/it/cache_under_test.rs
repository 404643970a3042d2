//! A cache under test, for the tests of commands that read and change a whole cache (`verify`,
//! `sign`, `rm`, `gc`): a narq set-up writing to `file://` or to a bucket on moto, and how to
//! reach the cache's objects directly and from Nix.

use crate::util::*;
use std::process::{Command, Output};

pub struct TestCache {
    pub n: Narq,
    pub moto: Option<Moto>,
    pub bucket: String,
    /// Holds moto's log; removed after moto stops (fields drop in order).
    _t: TempDir,
}

impl TestCache {
    /// narq (not started) writing to a `file://` cache, or (`s3`) to a fresh public-read
    /// bucket on moto.
    pub fn new(tag: &str, s3: bool) -> TestCache {
        let t = TempDir::new(tag);
        let bucket = format!("narq-{tag}");
        let (moto, extra) = if s3 {
            let moto = Moto::start(t.path(), &[]);
            moto.bucket(&bucket);
            // `nix store verify` asks with HEAD, which moto answers anonymously only for
            // objects written after the bucket's ACL became public-read.
            boto(&moto, &format!("s3.put_bucket_acl(Bucket='{bucket}', ACL='public-read')"));
            let extra = format!("store = \"s3://{bucket}?endpoint=127.0.0.1:{}&scheme=http\"", moto.port);
            (Some(moto), extra)
        } else {
            (None, String::new())
        };
        TestCache { n: Narq::new(tag, &extra), moto, bucket, _t: t }
    }

    /// The cache as Nix reads it.
    pub fn url(&self) -> String {
        match &self.moto {
            Some(m) => format!("http://127.0.0.1:{}/{}", m.port, self.bucket),
            None => format!("file://{}", self.n.cache().display()),
        }
    }

    /// `narq ARGS` with this config and the test's S3 credentials.
    pub fn narq(&self, args: &[&str]) -> Output {
        output(
            scaled(&mut Command::new(bin("narq")))
                .args(args)
                .env("NARQ_CONFIG", &self.n.config)
                .env("AWS_ACCESS_KEY_ID", "test")
                .env("AWS_SECRET_ACCESS_KEY", "test")
                .env("AWS_EC2_METADATA_DISABLED", "true"),
        )
    }

    /// `narq ARGS`, which must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.narq(args);
        assert!(out.status.success(), "narq {args:?}: {}\n{}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout));
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// The object at `key`, if any.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        match &self.moto {
            Some(m) => {
                let (head, body) = http(m.port, "GET", &format!("/{}/{key}", self.bucket));
                head.starts_with("http/1.1 200").then_some(body)
            }
            None => std::fs::read(self.n.cache().join(key)).ok(),
        }
    }

    pub fn put(&self, key: &str, body: &[u8]) {
        match &self.moto {
            Some(m) => {
                let file = self.n.dir.join(format!("put-{}", unique()));
                std::fs::write(&file, body).unwrap();
                boto(m, &format!("s3.put_object(Bucket='{}', Key='{key}', Body=open('{}', 'rb').read())", self.bucket, file.display()));
            }
            None => std::fs::write(self.n.cache().join(key), body).unwrap(),
        }
    }

    pub fn delete(&self, key: &str) {
        match &self.moto {
            Some(m) => drop(boto(m, &format!("s3.delete_object(Bucket='{}', Key='{key}')", self.bucket))),
            None => std::fs::remove_file(self.n.cache().join(key)).unwrap(),
        }
    }

    /// `path`'s narinfo, parsed.
    pub fn narinfo(&self, path: &str) -> narq::nix::NarInfo {
        let text = self.get(&format!("{}.narinfo", hash(path))).unwrap_or_else(|| panic!("no narinfo for {path}"));
        narq::nix::NarInfo::parse(std::str::from_utf8(&text).unwrap()).unwrap()
    }

    /// Whether the cache has `path`'s narinfo.
    pub fn has(&self, path: &str) -> bool {
        self.get(&format!("{}.narinfo", hash(path))).is_some()
    }
}

/// Runs `call` (Python, with `s3` a boto3 client of `m`), which must succeed; its stdout.
pub fn boto(m: &Moto, call: &str) -> String {
    let script = format!(
        "import boto3\ns3 = boto3.client('s3', endpoint_url='http://127.0.0.1:{}', aws_access_key_id='test', \
         aws_secret_access_key='test', region_name='us-east-1')\n{call}\n",
        m.port
    );
    run(Command::new(venv_bin("python")).args(["-c", &script]))
}
