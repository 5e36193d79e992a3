//! Cross-node cleanup: when a volume is deleted, every node wipes its copy — nodes that were down
//! included — and nothing still in use is touched.
//!
//! The protocol, all by polling the Kubernetes API, with every object's size independent of the
//! number of nodes:
//! 1. DeleteVolume (controller) adds the finalizer `node-local-cache.csi.io/cleanup` to the
//!    volume's PV, writes the record ConfigMap `nlc-cleanup-<id>` (label
//!    `node-local-cache.csi.io/cleanup=pending`) and adds the volume to the index ConfigMap
//!    `nlc-cleanup-index` (one line per record), then answers OK. Within 5 s of the last write
//!    of the index it leaves its line to the next one, at most 5 s later: a teardown's deletions
//!    share writes instead of each rewriting the whole index.
//! 2. Every node reads the index (one small cached GET per poll; past 16 KiB the index leaves out
//!    the oldest deletions and says from when it lists every one, and a node that has not read
//!    it since lists the records instead), deletes its copy when nothing
//!    mounts it, and lists the pending deletions it has finished in a ConfigMap of its own,
//!    `nlc-node-<node>`, written only when that list grows: no two nodes write the same object.
//! 3. The controller marks a record `complete` and releases the PV once every node running the
//!    driver has listed it, or when the timeout passes; the record stays as a tombstone for the
//!    retention time so a node that was down cleans up when it returns.
//! 4. Nodes also delete dirs whose PV is gone (orphans) after a grace period.
//! 5. Once an hour the controller deletes the objects of nodes that left the cluster.
//!
//! A failure on one record is logged once, counted, and never stops the others.
//! Records written by earlier versions, with acknowledgements as `ack.<node>` keys, are read too.

mod acks;
mod controller;
mod node;
mod pv_names;
mod record;

use std::collections::HashMap;
use std::fmt::Display;
use std::time::Duration;

use log::warn;

use crate::kube::jitter;
use crate::metrics;

pub use controller::CleanupController;
pub use node::NodeCleaner;
pub use record::{
    node_object_name, record_name, CleanupRecord, Deletion, IndexEntry, NodeAcks, INDEX_NAME, NODE_LABEL,
};

pub const LABEL: &str = "node-local-cache.csi.io/cleanup";
/// Clock skew allowed between the controller and a node, and the most an index entry may lag
/// its record: a node trusts an index that leaves out old deletions only if it read the index
/// this long after the newest deletion left out was requested.
const INDEX_SKEW: Duration = Duration::from_secs(600);
pub const FINALIZER: &str = "node-local-cache.csi.io/cleanup";

#[derive(Debug, Clone)]
pub struct CleanupConfig {
    pub driver_name: String,
    pub node_name: String,
    /// Nodes poll this often (with jitter); the controller too.
    pub poll_interval: Duration,
    /// Longest wait for acknowledgements before the PV is released anyway.
    pub timeout: Duration,
    /// How long a completed record stays for nodes that were away.
    pub retention: Duration,
    /// How long a dir whose PV is gone waits before it is deleted.
    pub orphan_grace: Duration,
}

impl CleanupConfig {
    pub fn new(driver_name: &str, node_name: &str) -> CleanupConfig {
        CleanupConfig {
            driver_name: driver_name.to_owned(),
            node_name: node_name.to_owned(),
            poll_interval: Duration::from_secs(30),
            timeout: Duration::from_secs(60),
            retention: Duration::from_secs(24 * 3600),
            orphan_grace: Duration::from_secs(3600),
        }
    }
}

/// 100–110 % of the interval: never more often than asked, and spread enough that thousands of
/// nodes do not poll in step, while the worst case from request to clean stays near one interval.
pub fn poll_delay(d: Duration) -> Duration {
    d.mul_f64(0.95) + jitter(d / 10)
}

/// Failures by subject (a volume id, or "" for the pass) and reason: each one is counted, but
/// logged only when it is new or its text changed, so a record that always fails does not flood
/// the log on every poll.
#[derive(Default)]
struct Complaints {
    last: HashMap<(String, &'static str), String>,
}

impl Complaints {
    fn failed(&mut self, subject: &str, reason: &'static str, e: &dyn Display) {
        metrics::record_cleanup_error(reason);
        let text = e.to_string();
        let key = (subject.to_owned(), reason);
        if self.last.get(&key) != Some(&text) {
            let what = if subject.is_empty() {
                String::new()
            } else {
                format!("volume {subject}: ")
            };
            warn!("{what}cleanup step {reason:?} failed: {text} (retried every poll; logged again only if the error changes)");
            self.last.insert(key, text);
        }
    }

    fn cleared(&mut self, subject: &str, reason: &'static str) {
        self.last.remove(&(subject.to_owned(), reason));
    }

    /// Forgets subjects no longer seen, so the map stays as small as the work.
    fn retain(&mut self, live: impl Fn(&str) -> bool) {
        self.last.retain(|(subject, _), _| subject.is_empty() || live(subject));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narrow_jitter_bounds() {
        for _ in 0..100 {
            let d = poll_delay(Duration::from_secs(30));
            assert!(
                d >= Duration::from_millis(29_990) && d <= Duration::from_millis(33_000),
                "{d:?}"
            );
        }
    }

    #[test]
    fn complaints_log_once_and_count_every_time() {
        let before = metrics::cleanup_errors("finalizer");
        let mut c = Complaints::default();
        c.failed("nlc-a", "finalizer", &"refused");
        c.failed("nlc-a", "finalizer", &"refused");
        assert_eq!(c.last.len(), 1);
        assert_eq!(metrics::cleanup_errors("finalizer") - before, 2);
        c.cleared("nlc-a", "finalizer");
        assert!(c.last.is_empty());
        c.failed("nlc-b", "complete", &"refused");
        c.retain(|s| s != "nlc-b");
        assert!(c.last.is_empty());
    }
}
