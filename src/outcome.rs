//! How the upload of one queue item ends: well ([`Outcome`], which the queue records with the
//! item) or not ([`UploadError`], which decides whether it is retried, fails, or pauses the
//! target). The uploader makes them; the queue, the metrics and the daemon's workers read
//! them, so they sit below all of those.

use crate::storage::TargetError;

/// How an item ended well.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Uploaded { bytes: u64 },
    /// Already in the cache.
    Present,
    /// In an upstream cache.
    Upstream,
    /// No build log was kept.
    NoLog,
    /// Left out by the config (`exclude`), for this reason. Counts as done (it will not be
    /// uploaded, and `wait` does not wait for it); whatever references it is excluded too.
    Excluded(String),
}

/// Why an item did not make it.
#[derive(Debug)]
pub enum UploadError {
    /// May pass: retried with backoff.
    Transient(String),
    /// Will not pass (path gone, contents differ from the NarHash): recorded and reported.
    Permanent(String),
    /// The target failed: retried, and all uploads pause for a while.
    Target(TargetError),
}

impl From<TargetError> for UploadError {
    /// A refusal of this one object fails the item; anything else pauses the target.
    fn from(e: TargetError) -> Self {
        if e.permanent {
            UploadError::Permanent(e.msg)
        } else {
            UploadError::Target(e)
        }
    }
}
