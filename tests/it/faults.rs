//! S3 faults: a proxy that drops, throttles, fails and stalls; upload-side limits (logs, multipart, upstreams, credentials).

#[allow(unused_imports)]
use crate::util::*;
