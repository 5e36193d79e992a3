//! Cross-node cleanup: when a volume is deleted, every node wipes its copy — nodes that were down
//! included — and nothing still in use is touched.
//!
//! The protocol, all by polling the Kubernetes API:
//! 1. DeleteVolume (controller) writes the record ConfigMap `nlc-cleanup-<id>` (label
//!    `node-local-cache.csi.io/cleanup=pending`) and adds the finalizer
//!    `node-local-cache.csi.io/cleanup` to the volume's PV, then answers OK.
//! 2. Every node lists the records (one cached list per poll), deletes its copy when nothing
//!    mounts it, and acknowledges with a merge patch of its own data key `ack.<node>`, which no
//!    other node's write can conflict with.
//! 3. The controller marks a record `complete` and releases the PV once every node running the
//!    driver has acknowledged, or when the timeout passes; the record stays as a tombstone for
//!    the retention time so a node that was down cleans up when it returns.
//! 4. Nodes also delete dirs whose PV is gone (orphans) after a grace period.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use log::{debug, info, warn};
use serde_json::{json, Value};

use crate::controller::Deleter;
use crate::error::{Error, Result};
use crate::kube::{jitter, Client, KubeError, KubeResult, QuietLog};
use crate::logging::timestamp;
use crate::metrics;
use crate::node::NodeState;
use crate::volume;

pub const LABEL: &str = "node-local-cache.csi.io/cleanup";
pub const FINALIZER: &str = "node-local-cache.csi.io/cleanup";
const PENDING: &str = "pending";
const COMPLETE: &str = "complete";
const ACK_PREFIX: &str = "ack.";

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

pub fn record_name(volume_id: &str) -> String {
    format!("nlc-cleanup-{volume_id}")
}

fn now_text() -> String {
    timestamp(SystemTime::now())
}

/// RFC 3339 as written by `timestamp` (UTC, `Z`), back to a time.
pub fn parse_time(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || !s.ends_with('Z')
    {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d, h, mi, sec) = (n(0..4)?, n(5..7)?, n(8..10)?, n(11..13)?, n(14..16)?, n(17..19)?);
    let millis = if b[19] == b'.' {
        s[20..s.len() - 1]
            .get(..3.min(s.len() - 21))
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    } else {
        0
    };
    // Days from civil, after Howard Hinnant's public-domain algorithm.
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if mo > 2 { mo - 3 } else { mo + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec;
    let secs = u64::try_from(secs).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis))
}

/// A cleanup record as read from its ConfigMap.
#[derive(Debug, Clone)]
pub struct Record {
    pub volume_id: String,
    pub pending: bool,
    pub requested: SystemTime,
    pub completed: Option<SystemTime>,
    pub pv: String,
    pub acked: HashSet<String>,
}

impl Record {
    pub fn parse(cm: &Value) -> Option<Record> {
        let data = cm["data"].as_object()?;
        let volume_id = data.get("volumeId")?.as_str()?.to_owned();
        volume::check_id(&volume_id).ok()?;
        Some(Record {
            pending: cm["metadata"]["labels"][LABEL].as_str() != Some(COMPLETE),
            requested: data.get("requestedAt").and_then(Value::as_str).and_then(parse_time)?,
            completed: data.get("completedAt").and_then(Value::as_str).and_then(parse_time),
            pv: data.get("pv").and_then(Value::as_str).unwrap_or_default().to_owned(),
            acked: data
                .keys()
                .filter_map(|k| k.strip_prefix(ACK_PREFIX))
                .map(str::to_owned)
                .collect(),
            volume_id,
        })
    }
}

/// Every cleanup record, pending and complete, from one cached list.
fn list_records(kube: &Client) -> KubeResult<Vec<Record>> {
    Ok(kube.list_configmaps(LABEL)?.iter().filter_map(Record::parse).collect())
}

fn unavailable(volume: &str, what: &str, e: &KubeError) -> Error {
    Error::Unavailable {
        volume: volume.to_owned(),
        reason: format!("{what}: Kubernetes API: {e}"),
    }
}

/// The controller's half: writes records on DeleteVolume, completes them, expires tombstones.
pub struct Controller {
    kube: Client,
    cfg: CleanupConfig,
    log: QuietLog,
}

impl Controller {
    pub fn new(kube: Client, cfg: CleanupConfig) -> Arc<Controller> {
        Arc::new(Controller {
            kube,
            cfg,
            log: QuietLog::new(),
        })
    }

    /// The PV whose CSI volume handle is `id`, if any (from the watch cache).
    fn find_pv(&self, id: &str) -> KubeResult<Option<String>> {
        Ok(self
            .kube
            .list_pvs()?
            .iter()
            .find(|pv| {
                pv["spec"]["csi"]["driver"].as_str() == Some(&self.cfg.driver_name)
                    && pv["spec"]["csi"]["volumeHandle"].as_str() == Some(id)
            })
            .and_then(|pv| pv["metadata"]["name"].as_str().map(str::to_owned)))
    }

    fn write_record(&self, id: &str, pv: &str) -> KubeResult<()> {
        let name = record_name(id);
        let body = json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": { "name": name, "labels": { LABEL: PENDING } },
            "data": { "volumeId": id, "requestedAt": now_text(), "pv": pv },
        });
        match self.kube.create_configmap(&body) {
            Ok(_) => Ok(()),
            Err(KubeError::Conflict(_)) => {
                let existing = self.kube.get_configmap(&name)?;
                if Record::parse(&existing).is_some_and(|r| r.pending) {
                    return Ok(());
                }
                // A tombstone of an earlier volume with this id: start over, conditionally, so
                // acknowledgements are never mixed across the two deletions.
                let mut data = serde_json::Map::new();
                for key in existing["data"].as_object().into_iter().flat_map(|d| d.keys()) {
                    if key.starts_with(ACK_PREFIX) || key == "completedAt" {
                        data.insert(key.clone(), Value::Null);
                    }
                }
                data.insert("requestedAt".into(), now_text().into());
                data.insert("pv".into(), pv.into());
                let patch = json!({
                    "metadata": { "labels": { LABEL: PENDING }, "resourceVersion": existing["metadata"]["resourceVersion"] },
                    "data": data,
                });
                self.kube.patch_configmap(&name, &patch).map(drop)
            }
            Err(e) => Err(e),
        }
    }

    /// Adds (`hold`) or removes our finalizer on the PV, with a resourceVersion precondition so a
    /// concurrent change is never overwritten; retried on conflict.
    fn set_finalizer(&self, pv: &str, hold: bool) -> KubeResult<()> {
        for _ in 0..5 {
            let obj = match self.kube.get_pv(pv) {
                Err(KubeError::NotFound) => return Ok(()),
                other => other?,
            };
            let current: Vec<&str> = obj["metadata"]["finalizers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let has = current.contains(&FINALIZER);
            if has == hold {
                return Ok(());
            }
            if hold && obj["metadata"]["deletionTimestamp"].is_string() {
                warn!("PV {pv} is already being deleted; the cleanup cannot hold it (nodes still clean up from the record)");
                return Ok(());
            }
            let mut next: Vec<&str> = current.into_iter().filter(|f| *f != FINALIZER).collect();
            if hold {
                next.push(FINALIZER);
            }
            let patch =
                json!({ "metadata": { "finalizers": next, "resourceVersion": obj["metadata"]["resourceVersion"] } });
            match self.kube.patch_pv(pv, &patch) {
                Ok(_) | Err(KubeError::NotFound) => return Ok(()),
                Err(KubeError::Conflict(_)) => continue,
                // Finalizers cannot be added to an object being deleted.
                Err(KubeError::Rejected(422, m)) if hold => {
                    warn!("PV {pv}: finalizer refused ({m}); nodes still clean up from the record");
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
        Err(KubeError::Conflict(format!("PV {pv} kept changing")))
    }

    /// Whether a volume id has a cleanup still under way (CreateVolume waits for it).
    pub fn pending(&self, id: &str) -> Result<bool> {
        match self.kube.get_configmap(&record_name(id)) {
            Ok(cm) => Ok(Record::parse(&cm).is_some_and(|r| r.pending)),
            Err(KubeError::NotFound) => Ok(false),
            Err(e) => Err(unavailable(id, "look up cleanup record", &e)),
        }
    }

    /// One pass: complete records that every node acknowledged or that timed out; expire
    /// tombstones past their retention.
    pub fn poll_once(&self) -> KubeResult<()> {
        let records = list_records(&self.kube)?;
        let pending: Vec<&Record> = records.iter().filter(|r| r.pending).collect();
        metrics::CLEANUP_PENDING.store(pending.len() as u64, Ordering::Relaxed);
        let now = SystemTime::now();
        if !pending.is_empty() {
            let nodes = self.kube.nodes_with_driver(&self.cfg.driver_name)?;
            for r in pending {
                let missing: Vec<&String> = nodes.iter().filter(|n| !r.acked.contains(*n)).collect();
                let waited = now.duration_since(r.requested).unwrap_or_default();
                if !missing.is_empty() && waited < self.cfg.timeout {
                    continue;
                }
                if missing.is_empty() {
                    info!("volume {}: every node ({}) cleaned up", r.volume_id, nodes.len());
                } else {
                    warn!(
                        "volume {}: cleanup timed out after {waited:?}; {} node(s) have not acknowledged ({}); they clean up when they return",
                        r.volume_id,
                        missing.len(),
                        missing.iter().take(10).map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                    );
                }
                if !r.pv.is_empty() {
                    self.set_finalizer(&r.pv, false)?;
                }
                let patch =
                    json!({ "metadata": { "labels": { LABEL: COMPLETE } }, "data": { "completedAt": now_text() } });
                self.kube.patch_configmap(&record_name(&r.volume_id), &patch)?;
            }
        }
        for r in records.iter().filter(|r| !r.pending) {
            if r.completed
                .is_some_and(|c| now.duration_since(c).unwrap_or_default() >= self.cfg.retention)
            {
                debug!("volume {}: cleanup record expired", r.volume_id);
                self.kube.delete_configmap(&record_name(&r.volume_id))?;
            }
        }
        Ok(())
    }

    pub fn run(self: Arc<Self>) {
        thread::Builder::new()
            .name("cleanup-controller".into())
            .spawn(move || loop {
                match self.poll_once() {
                    Ok(()) => self.log.ok(),
                    Err(e) => self.log.failed("cleanup pass", &e),
                }
                thread::sleep(jitter(self.cfg.poll_interval));
            })
            .expect("spawn cleanup thread");
    }
}

impl Deleter for Controller {
    fn volume_deleted(&self, id: &str) -> Result<()> {
        let pv = self
            .find_pv(id)
            .map_err(|e| unavailable(id, "find the volume's PV", &e))?;
        self.write_record(id, pv.as_deref().unwrap_or_default())
            .map_err(|e| unavailable(id, "write cleanup record", &e))?;
        if let Some(pv) = &pv {
            self.set_finalizer(pv, true)
                .map_err(|e| unavailable(id, "add PV finalizer", &e))?;
        }
        info!(
            "volume {id}: cleanup requested on every node (PV {})",
            pv.as_deref().unwrap_or("unknown")
        );
        Ok(())
    }

    fn creation_blocked(&self, id: &str) -> Result<bool> {
        self.pending(id)
    }
}

/// A node's half: deletes local copies of deleted volumes and acknowledges; collects orphans.
pub struct NodeCleaner {
    kube: Client,
    node: Arc<NodeState>,
    cfg: CleanupConfig,
    log: QuietLog,
    /// Volume ids first seen without a PV, and when.
    orphans: HashMap<String, Instant>,
    last_reconcile: Option<Instant>,
}

impl NodeCleaner {
    pub fn new(kube: Client, node: Arc<NodeState>, cfg: CleanupConfig) -> NodeCleaner {
        NodeCleaner {
            kube,
            node,
            cfg,
            log: QuietLog::new(),
            orphans: HashMap::new(),
            last_reconcile: None,
        }
    }

    /// One pass over the records; returns how many local copies were deleted.
    pub fn poll_once(&mut self) -> KubeResult<usize> {
        let records = list_records(&self.kube)?;
        self.node
            .set_deleted(records.iter().map(|r| (r.volume_id.clone(), r.requested)).collect());
        let mut deleted = 0;
        for r in &records {
            let clean = match self.clean_local(&r.volume_id, Some(r.requested)) {
                Ok(Some(true)) => {
                    deleted += 1;
                    true
                }
                Ok(Some(false)) => false,
                Ok(None) => true,
                Err(e) => {
                    warn!("volume {}: cleanup on this node failed: {e}", r.volume_id);
                    false
                }
            };
            if clean && r.pending && !r.acked.contains(&self.cfg.node_name) {
                let patch = json!({ "data": { format!("{ACK_PREFIX}{}", self.cfg.node_name): now_text() } });
                self.kube.patch_configmap(&record_name(&r.volume_id), &patch)?;
                debug!("volume {}: acknowledged cleanup", r.volume_id);
            }
        }
        let due = self
            .last_reconcile
            .is_none_or(|t| t.elapsed() >= self.reconcile_interval());
        if due {
            let known: HashSet<&str> = records.iter().map(|r| r.volume_id.as_str()).collect();
            deleted += self.collect_orphans(&known)?;
            self.last_reconcile = Some(Instant::now());
        }
        Ok(deleted)
    }

    /// Orphans are looked for a few times per grace period.
    fn reconcile_interval(&self) -> Duration {
        (self.cfg.orphan_grace / 4).min(Duration::from_secs(900))
    }

    /// Deletes the local copy of `id` if it was made no later than `before` (any age when `None`) and nothing
    /// uses it. `None`: nothing to delete here; `Some(false)`: in use or busy, try later.
    fn clean_local(&self, id: &str, before: Option<SystemTime>) -> Result<Option<bool>> {
        if !self.node.has_volume(id) {
            return Ok(None);
        }
        // A copy made in the very millisecond of the request is the old incarnation's: a new one
        // cannot be created until the cleanup has finished.
        if let (Some(before), Some(meta)) = (before, self.node.meta(id)) {
            if meta.created > before {
                debug!("volume {id}: local copy is newer than the deletion; kept");
                return Ok(None);
            }
        }
        self.node.delete_data(id, None).map(Some)
    }

    /// Local dirs with no cleanup record and no PV: deleted once they stayed so for the grace.
    fn collect_orphans(&mut self, known: &HashSet<&str>) -> KubeResult<usize> {
        let local = match self.node.local_volumes() {
            Ok(ids) => ids,
            Err(e) => {
                warn!("orphan check: {e}");
                return Ok(0);
            }
        };
        let candidates: Vec<String> = local.into_iter().filter(|id| !known.contains(id.as_str())).collect();
        self.orphans.retain(|id, _| candidates.contains(id));
        if candidates.is_empty() {
            return Ok(0);
        }
        // Dirs that know their PV's name ask for it; the rest share one list of all PVs.
        let mut handles: Option<HashSet<String>> = None;
        let mut deleted = 0;
        for id in candidates {
            let name = self.node.meta(&id).map(|m| m.name).unwrap_or_default();
            let live = if name.is_empty() {
                if handles.is_none() {
                    let pvs = self.kube.list_pvs()?;
                    handles = Some(
                        pvs.iter()
                            .filter_map(|p| p["spec"]["csi"]["volumeHandle"].as_str().map(str::to_owned))
                            .collect(),
                    );
                }
                handles.as_ref().is_some_and(|h| h.contains(&id))
            } else {
                match self.kube.get_pv(&name) {
                    Ok(pv) => pv["spec"]["csi"]["volumeHandle"].as_str() == Some(id.as_str()),
                    Err(KubeError::NotFound) => false,
                    Err(e) => return Err(e),
                }
            };
            if live {
                self.orphans.remove(&id);
                continue;
            }
            let first = *self.orphans.entry(id.clone()).or_insert_with(Instant::now);
            if first.elapsed() < self.cfg.orphan_grace {
                info!(
                    "volume {id}: no PV and no cleanup record; deleting after {:?} unless one appears",
                    self.cfg.orphan_grace - first.elapsed()
                );
                continue;
            }
            match self.node.delete_data(&id, None) {
                Ok(true) => {
                    info!("volume {id}: orphan deleted");
                    self.orphans.remove(&id);
                    deleted += 1;
                }
                Ok(false) => {}
                Err(e) => warn!("volume {id}: orphan cleanup failed: {e}"),
            }
        }
        Ok(deleted)
    }

    pub fn run(mut self) {
        thread::Builder::new()
            .name("cleanup-node".into())
            .spawn(move || loop {
                match self.poll_once() {
                    Ok(_) => self.log.ok(),
                    Err(e) => self.log.failed("cleanup poll", &e),
                }
                thread::sleep(poll_delay(self.cfg.poll_interval));
            })
            .expect("spawn cleanup thread");
    }
}

/// 100–110 % of the interval: never more often than asked, and spread enough that thousands of
/// nodes do not poll in step, while the worst case from request to clean stays near one interval.
pub fn poll_delay(d: Duration) -> Duration {
    d.mul_f64(0.95) + jitter(d / 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_564_799_123);
        assert_eq!(parse_time(&timestamp(t)), Some(t));
        assert_eq!(
            parse_time("2000-02-29T00:00:00Z"),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400))
        );
        for bad in ["", "2000-02-29", "2000-02-29T00:00:00", "x000-02-29T00:00:00Z"] {
            assert_eq!(parse_time(bad), None, "{bad}");
        }
    }

    #[test]
    fn records_parse_acks_and_state() {
        let id = volume::id_for_name("pvc-1");
        let cm = json!({
            "metadata": { "labels": { LABEL: PENDING } },
            "data": { "volumeId": id, "requestedAt": "2026-11-24T00:00:00.000Z", "pv": "pvc-1", "ack.node-a": "x", "ack.node-b": "y" },
        });
        let r = Record::parse(&cm).unwrap();
        assert!(r.pending);
        assert_eq!(r.pv, "pvc-1");
        assert_eq!(r.acked, HashSet::from(["node-a".to_owned(), "node-b".to_owned()]));
        let bad = json!({ "data": { "volumeId": "../etc", "requestedAt": "2026-11-24T00:00:00.000Z" } });
        assert!(Record::parse(&bad).is_none());
    }

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
}
