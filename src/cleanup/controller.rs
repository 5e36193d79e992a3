//! The controller's half: writes records on DeleteVolume, keeps the index, completes records from
//! the nodes' objects, expires tombstones.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use log::{debug, info, warn};
use serde_json::{json, Value};

use super::acks::Acknowledgements;
use super::pv_names::PvNames;
use super::record::{CleanupRecord, Deletion, IndexEntry, NodeAcks, INDEX_NAME, NODE_LABEL};
use super::{record_name, CleanupConfig, Complaints, FINALIZER, INDEX_SKEW, LABEL};
use crate::controller::Deleter;
use crate::error::{Error, Result};
use crate::kube::{jitter, Client, KubeError, KubeResult, QuietLog};
use crate::metrics;
use crate::time::{self, Deadline};

/// An index entry whose record a pass did not list stays this long: the record may have been
/// created after the list was read.
const UNLISTED_GRACE: Duration = Duration::from_secs(120);
/// Conditional writes of the index tried before a pass gives up until the next one.
const INDEX_ATTEMPTS: usize = 5;
/// Bytes of index lines every node reads on every poll: the newest deletions are listed within
/// it, older ones are left out (nodes that polled all along saw them; others list the records).
/// 16 KiB is ~260 deletions: at 5,000 deletions a day, the last 75 minutes.
const INDEX_BUDGET: usize = 16 * 1024;
/// Deletions this recent stay listed past the budget, so that a burst (a namespace teardown)
/// does not send every node to list the records; polling nodes trust an index that left out
/// only deletions older than `INDEX_SKEW` before their last poll.
const INDEX_RECENT: Duration = Duration::from_secs(2 * INDEX_SKEW.as_secs());
/// The most the index lists in any case, far below the 1 MiB a ConfigMap may hold.
const INDEX_CAP: usize = 512 * 1024;
/// Outside its passes the controller writes the index at most this often: DeleteVolume leaves its
/// line for a write at most this much later. Every write stores the whole index (up to
/// `INDEX_CAP`), and etcd keeps each version until compaction; written on every DeleteVolume of
/// a teardown, the bytes grew with the square of the deletions.
const INDEX_COALESCE: Duration = Duration::from_secs(5);

/// How often the controller looks for the objects of nodes that left the cluster. Autoscaled
/// clusters replace nodes every day; each one left an object that every pass with a pending
/// deletion read again, and etcd kept, for good.
const NODE_SWEEP: Duration = Duration::from_secs(3600);
/// A node object goes once its node has had no CSINode for this long, seen at two sweeps: a
/// CSINode goes with its Node, and a node just registering may not have one yet.
const NODE_GONE_GRACE: Duration = Duration::from_secs(600);

/// When the node objects were last swept, and since when each object's node has been missing.
#[derive(Default)]
struct NodeSweep {
    last: Option<Instant>,
    gone_since: HashMap<String, Instant>,
}

/// The index as last read or written: its entries, from when it lists every deletion, and its
/// resourceVersion (none: no index yet).
struct IndexCopy {
    entries: BTreeSet<IndexEntry>,
    covers_from: u64,
    resource_version: Option<String>,
}

/// The index lines DeleteVolume left for a later write, by volume id, and when this process last
/// wrote the index (or set out to).
#[derive(Default)]
struct Unwritten {
    lines: BTreeMap<String, IndexEntry>,
    last_write: Option<Instant>,
}

impl Unwritten {
    /// Whether lines wait and the window since the last write has passed; if so the caller
    /// writes them, and the next window starts now.
    fn claim(&mut self, now: Instant) -> bool {
        let due = !self.lines.is_empty() && self.next_write().is_none_or(|at| now >= at);
        if due {
            self.last_write = Some(now);
        }
        due
    }

    fn wrote_at(&mut self, now: Instant) {
        self.last_write = Some(self.last_write.map_or(now, |t| t.max(now)));
    }

    fn next_write(&self) -> Option<Instant> {
        self.last_write.map(|t| t + INDEX_COALESCE)
    }

    /// Puts back lines a write failed to store, unless a newer call left another for the volume.
    fn restore(&mut self, lines: BTreeMap<String, IndexEntry>) {
        for (id, line) in lines {
            self.lines.entry(id).or_insert(line);
        }
    }
}

/// Adds DeleteVolume's lines to `index`: a line replaces the volume's entry unless that entry is
/// of the same or a later request (then the index, from the records, knows better).
fn add_lines(index: &mut BTreeSet<IndexEntry>, lines: &BTreeMap<String, IndexEntry>) {
    for (id, line) in lines {
        let newer = index
            .iter()
            .any(|e| e.deletion.volume_id == *id && e.deletion.requested_ms >= line.deletion.requested_ms);
        if !newer {
            index.retain(|e| e.deletion.volume_id != *id);
            index.insert(line.clone());
        }
    }
}

pub struct CleanupController {
    kube: Client,
    cfg: CleanupConfig,
    log: QuietLog,
    complaints: Mutex<Complaints>,
    /// Serialises index writes in this process; `None` until read (each pass reads it again).
    index: Mutex<Option<IndexCopy>>,
    /// Index lines DeleteVolume left for a later write.
    unwritten: Mutex<Unwritten>,
    /// Told when DeleteVolume leaves a line, so the run loop writes it in time.
    line_left: Condvar,
    sweep: Mutex<NodeSweep>,
    /// This driver's PVs as the last scan found them, for deletions of volumes this process did
    /// not create.
    pv_names: PvNames,
}

fn unavailable(volume: &str, what: &str, e: &KubeError) -> Error {
    let reason = match e {
        KubeError::DeadlineExceeded => format!("{what}: the caller's deadline passed first; retry"),
        _ => format!("{what}: Kubernetes API: {e}"),
    };
    Error::Unavailable {
        volume: volume.to_owned(),
        reason,
    }
}

impl CleanupController {
    pub fn new(kube: Client, cfg: CleanupConfig) -> Arc<CleanupController> {
        Arc::new(CleanupController {
            kube,
            cfg,
            log: QuietLog::new(),
            complaints: Mutex::default(),
            index: Mutex::new(None),
            unwritten: Mutex::default(),
            line_left: Condvar::new(),
            sweep: Mutex::default(),
            pv_names: PvNames::default(),
        })
    }

    fn complaints(&self) -> MutexGuard<'_, Complaints> {
        self.complaints.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn unwritten(&self) -> MutexGuard<'_, Unwritten> {
        self.unwritten.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The PV whose CSI volume handle is `id`: by the name CreateVolume was given when this
    /// process saw it, else by the name the last scan of the PVs saw, else by a new scan shared
    /// with the deletions waiting for one. Each name is checked with a GET: a PV re-made under
    /// another name with the same handle is found by the next scan.
    fn find_pv(&self, kube: &Client, id: &str, name: Option<&str>, deadline: &Deadline) -> KubeResult<Option<String>> {
        let named = |name: &str| match kube.get_pv(name) {
            Ok(pv) => Ok(pv["spec"]["csi"]["volumeHandle"].as_str() == Some(id)),
            Err(KubeError::NotFound) => Ok(false),
            Err(e) => Err(e),
        };
        for candidate in [
            name.filter(|n| !n.is_empty()).map(str::to_owned),
            self.pv_names.known(id),
        ]
        .into_iter()
        .flatten()
        {
            if named(&candidate)? {
                return Ok(Some(candidate));
            }
        }
        self.pv_names
            .scan_for(id, deadline, || kube.pv_names(&self.cfg.driver_name, None))
    }

    /// Creates the pending record, or joins it pending already, or restarts a tombstone of an
    /// earlier deletion; returns the deletion the record now stands for. Each path ends in one
    /// conditional write made after the PV was held, so a caller that gives up never leaves
    /// half a record, and a pass completing the record meanwhile either sees the write (its
    /// conditional completion fails and the next pass judges afresh) or is seen by it (the
    /// complete record is restarted, and a later pass releases the PV again).
    fn write_record(&self, kube: &Client, id: &str, pv: &str) -> KubeResult<Deletion> {
        let requested = SystemTime::now();
        let ours = Deletion {
            volume_id: id.to_owned(),
            requested_ms: time::to_millis(requested),
        };
        match kube.create_configmap(&CleanupRecord::new_object(id, requested, pv)) {
            Ok(_) => return Ok(ours),
            Err(KubeError::Conflict(_)) => {}
            Err(e) => return Err(e),
        }
        for _ in 0..5 {
            let existing = kube.get_configmap(&record_name(id))?;
            let written = match CleanupRecord::parse(&existing) {
                Some(r) if r.pending => kube
                    .patch_configmap(&record_name(id), &CleanupRecord::joined_patch(&existing, requested))
                    .map(|_| r.deletion),
                _ => kube
                    .patch_configmap(
                        &record_name(id),
                        &CleanupRecord::restart_patch(&existing, requested, pv),
                    )
                    .map(|_| ours.clone()),
            };
            match written {
                Err(KubeError::Conflict(_)) => continue,
                other => return other,
            }
        }
        Err(KubeError::Conflict(format!("{} kept changing", record_name(id))))
    }

    /// Applies `change` and the lines DeleteVolume left to the index (its entries and from when
    /// it lists every deletion), keeps it within its budget and writes it if that changed it,
    /// conditionally on the version read, retrying on conflict (another controller replica wrote
    /// it meanwhile). Returns whether it wrote; lines it could not store wait for the next write.
    fn update_index(&self, kube: &Client, change: impl Fn(&mut BTreeSet<IndexEntry>, &mut u64)) -> KubeResult<bool> {
        let mut copy = self.index.lock().unwrap_or_else(|p| p.into_inner());
        // Taken with the index held: a write waiting for it takes the lines left meanwhile.
        let lines = std::mem::take(&mut self.unwritten().lines);
        let written = self.write_index(&mut copy, kube, |index, covers_from| {
            change(index, covers_from);
            add_lines(index, &lines);
        });
        if written.is_err() {
            self.unwritten().restore(lines);
        }
        written
    }

    fn write_index(
        &self,
        copy: &mut Option<IndexCopy>,
        kube: &Client,
        change: impl Fn(&mut BTreeSet<IndexEntry>, &mut u64),
    ) -> KubeResult<bool> {
        for _ in 0..INDEX_ATTEMPTS {
            let current = match copy.take() {
                Some(c) => c,
                None => read_index(kube)?,
            };
            let mut next = current.entries.clone();
            let mut covers_from = current.covers_from;
            change(&mut next, &mut covers_from);
            let (next, left_out_from) = trim_index(next, &current, time::to_millis(SystemTime::now()));
            let covers_from = covers_from.max(left_out_from);
            if next == current.entries && covers_from == current.covers_from && current.resource_version.is_some() {
                *copy = Some(current);
                return Ok(false);
            }
            let data = IndexEntry::render_index(&next, covers_from);
            let written = match &current.resource_version {
                None => kube.create_configmap(&json!({
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": { "name": INDEX_NAME },
                    "data": data,
                })),
                Some(rv) => kube.patch_configmap(
                    INDEX_NAME,
                    &json!({ "metadata": { "resourceVersion": rv }, "data": data }),
                ),
            };
            match written {
                Ok(obj) => {
                    *copy = Some(IndexCopy {
                        entries: next,
                        covers_from,
                        resource_version: obj["metadata"]["resourceVersion"].as_str().map(str::to_owned),
                    });
                    return Ok(true);
                }
                // Read again: another replica wrote it, or it was deleted or created meanwhile.
                Err(KubeError::Conflict(_) | KubeError::NotFound) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(KubeError::Conflict(format!("{INDEX_NAME} kept changing")))
    }

    /// Adds (`hold`) or removes our finalizer on the PV, with a resourceVersion precondition so a
    /// concurrent change is never overwritten; retried on conflict.
    fn set_finalizer(&self, kube: &Client, pv: &str, hold: bool) -> KubeResult<()> {
        for _ in 0..5 {
            let obj = match kube.get_pv(pv) {
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
            match kube.patch_pv(pv, &patch) {
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

    /// `volume_deleted` as if the monotonic clock read `now`, so tests can run a burst of
    /// deletions at the provisioner's pace in seconds.
    #[doc(hidden)]
    pub fn volume_deleted_at(&self, id: &str, name: Option<&str>, deadline: Deadline, now: Instant) -> Result<()> {
        let kube = self.kube.with_deadline(deadline.clone());
        let pv = self
            .find_pv(&kube, id, name, &deadline)
            .map_err(|e| unavailable(id, "find the volume's PV", &e))?;
        // The PV is held before the record is written: a pass releases a PV only on its way to
        // completing the record, and the record's write comes after the hold (see write_record).
        if let Some(pv) = &pv {
            self.set_finalizer(&kube, pv, true)
                .map_err(|e| unavailable(id, "add PV finalizer", &e))?;
        }
        let deletion = self
            .write_record(&kube, id, pv.as_deref().unwrap_or_default())
            .map_err(|e| unavailable(id, "write cleanup record", &e))?;
        // The record is what counts: the index only tells nodes sooner, and one that missed it
        // is mended by the next pass. A call within `INDEX_COALESCE` of the last write leaves
        // its line to the next write (a later call's, the run loop's, a pass's).
        let entry = IndexEntry {
            deletion,
            pending: true,
        };
        self.unwritten().lines.insert(id.to_owned(), entry);
        self.write_lines(&kube, now);
        self.line_left.notify_one();
        self.pv_names.forget(id);
        info!(
            "volume {id}: cleanup requested on every node (PV {})",
            pv.as_deref().unwrap_or("unknown")
        );
        Ok(())
    }

    /// Whether a volume id has a cleanup still under way (CreateVolume waits for it).
    pub fn pending(&self, id: &str, deadline: Deadline) -> Result<bool> {
        match self.kube.with_deadline(deadline).get_configmap(&record_name(id)) {
            Ok(cm) => Ok(CleanupRecord::parse(&cm).is_some_and(|r| r.pending)),
            Err(KubeError::NotFound) => Ok(false),
            Err(e) => Err(unavailable(id, "look up cleanup record", &e)),
        }
    }

    /// The nodes expected to acknowledge, and which of them acknowledged each of `pending`; the
    /// nodes' objects are read one at a time, each dropped once counted.
    fn acknowledgements<'a>(&self, pending: &[&'a CleanupRecord]) -> KubeResult<Acknowledgements<'a>> {
        let nodes = self.kube.nodes_with_driver(&self.cfg.driver_name)?;
        let mut acks = Acknowledgements::new(nodes, pending);
        self.kube
            .for_each_configmap(NODE_LABEL, &mut |object| acks.add(object))?;
        Ok(acks)
    }

    /// Releases the PV and marks the record complete if it did not change since listed;
    /// `Ok(false)` when it did (a DeleteVolume joined or restarted it: the next pass judges it
    /// afresh). The error says which step failed.
    fn complete(&self, r: &CleanupRecord, now: SystemTime) -> std::result::Result<bool, (&'static str, KubeError)> {
        if !r.pv.is_empty() {
            self.set_finalizer(&self.kube, &r.pv, false)
                .map_err(|e| ("finalizer", e))?;
        }
        match self
            .kube
            .patch_configmap(&record_name(r.volume_id()), &r.complete_patch(now))
        {
            Ok(_) => Ok(true),
            Err(KubeError::Conflict(_) | KubeError::NotFound) => Ok(false),
            Err(e) => Err(("complete", e)),
        }
    }

    /// Deletes the objects of nodes that left the cluster: no CSINode at two sweeps at least
    /// `NODE_GONE_GRACE` apart, and the object unchanged since it was listed. A node that comes
    /// back under the same name writes a new object when it next finishes a deletion.
    fn sweep_node_objects(&self, now: Instant) -> KubeResult<()> {
        let nodes = self.kube.nodes_in_cluster()?;
        let mut missing = Vec::new();
        self.kube.for_each_configmap(NODE_LABEL, &mut |object| {
            let Some((node, _)) = NodeAcks::read(object) else {
                return;
            };
            let meta = &object["metadata"];
            if let (false, Some(name), Some(rv)) = (
                nodes.contains(node),
                meta["name"].as_str(),
                meta["resourceVersion"].as_str(),
            ) {
                missing.push((name.to_owned(), rv.to_owned(), node.to_owned()));
            }
        })?;
        let mut sweep = self.sweep.lock().unwrap_or_else(|p| p.into_inner());
        let seen_before = std::mem::take(&mut sweep.gone_since);
        let mut failed = None;
        for (name, rv, node) in missing {
            let since = seen_before.get(&name).copied().unwrap_or(now);
            if now.saturating_duration_since(since) < NODE_GONE_GRACE {
                sweep.gone_since.insert(name, since);
                continue;
            }
            match self.kube.delete_configmap_at(&name, &rv) {
                Ok(true) => info!("node {node} left the cluster: its cleanup object {name} is deleted"),
                Ok(false) => debug!("node {node}: cleanup object {name} changed or went before it was deleted"),
                Err(e) => {
                    sweep.gone_since.insert(name, since);
                    failed = Some(e);
                }
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Whether a node sweep is due, counting it as made: one that fails waits for the next, so
    /// a refused list is not repeated on every pass. The first comes an interval after the
    /// first pass, so a controller that restarts adds nothing to its first passes.
    fn claim_node_sweep(&self, now: Instant) -> bool {
        let mut sweep = self.sweep.lock().unwrap_or_else(|p| p.into_inner());
        let due = sweep
            .last
            .is_some_and(|last| now.saturating_duration_since(last) >= NODE_SWEEP);
        if due || sweep.last.is_none() {
            sweep.last = Some(now);
        }
        due
    }

    /// One pass: complete records that every node acknowledged or that timed out; expire
    /// tombstones past their retention; bring the index up to date; now and then, delete the
    /// objects of nodes that left. Only a failure to list the records fails the pass; any other
    /// failure is logged, counted and skipped.
    pub fn poll_once(&self) -> KubeResult<()> {
        self.poll_once_at(Instant::now())
    }

    /// `poll_once` as if the monotonic clock read `now` (the node sweep's schedule and the
    /// index's write window follow it), so tests can run hours of passes in seconds.
    pub fn poll_once_at(&self, now_mono: Instant) -> KubeResult<()> {
        let started = SystemTime::now();
        let mut records = Vec::new();
        let mut unreadable = HashSet::new();
        self.kube
            .for_each_configmap(LABEL, &mut |object| match CleanupRecord::parse(object) {
                Some(r) => records.push(r),
                None => {
                    unreadable.insert(object["metadata"]["name"].as_str().unwrap_or_default().to_owned());
                }
            })?;
        for name in &unreadable {
            // Edited by hand, or an object dressed as a record: no pass completes it.
            self.complaints().failed(
                name,
                "record",
                &"this ConfigMap carries the cleanup label but is no record: a record holds data.volumeId and data.requestedAt under the name nlc-cleanup-<that volume>",
            );
        }
        let pending: Vec<&CleanupRecord> = records.iter().filter(|r| r.pending).collect();
        metrics::CLEANUP_PENDING.store(pending.len() as u64, Ordering::Relaxed);
        let now = SystemTime::now();
        let mut completed = HashSet::new();
        if !pending.is_empty() {
            let acks = match self.acknowledgements(&pending) {
                Ok(a) => {
                    self.complaints().cleared("", "nodes");
                    Some(a)
                }
                Err(e) => {
                    self.complaints().failed("", "nodes", &e);
                    None
                }
            };
            for r in pending {
                let waited = now.duration_since(r.deletion.requested()).unwrap_or_default();
                let missing = acks.as_ref().map(|a| a.missing(r));
                let everyone = missing.as_ref().is_some_and(|m| m.count == 0);
                if !everyone && waited < self.cfg.timeout {
                    continue;
                }
                match &missing {
                    Some(m) if m.count == 0 => info!("volume {}: every node cleaned up", r.volume_id()),
                    Some(m) => warn!(
                        "volume {}: cleanup timed out after {waited:?}; {} node(s) have not acknowledged ({}); they clean up when they return",
                        r.volume_id(),
                        m.count,
                        m.names.join(", ")
                    ),
                    None => warn!(
                        "volume {}: cleanup timed out after {waited:?}; acknowledgements could not be read; nodes that did not clean up do so on their next poll",
                        r.volume_id()
                    ),
                }
                match self.complete(r, now) {
                    Ok(false) => debug!(
                        "volume {}: cleanup record changed since listed; the next pass completes it",
                        r.volume_id()
                    ),
                    Ok(true) => {
                        completed.insert(r.volume_id().to_owned());
                        let mut c = self.complaints();
                        c.cleared(r.volume_id(), "finalizer");
                        c.cleared(r.volume_id(), "complete");
                    }
                    Err((reason, e)) => self.complaints().failed(r.volume_id(), reason, &e),
                }
            }
        }
        let mut expired = HashSet::new();
        for r in records.iter().filter(|r| !r.pending) {
            if r.completed
                .is_some_and(|c| now.duration_since(c).unwrap_or_default() >= self.cfg.retention)
            {
                // Only the tombstone as listed: a DeleteVolume of the same id may have made it
                // pending again since, and deleting that would lose the deletion.
                match self
                    .kube
                    .delete_configmap_at(&record_name(r.volume_id()), &r.resource_version)
                {
                    Ok(true) => {
                        debug!("volume {}: cleanup record expired", r.volume_id());
                        expired.insert(r.volume_id());
                        self.complaints().cleared(r.volume_id(), "expire");
                    }
                    Ok(false) => debug!(
                        "volume {}: cleanup record changed or went before it expired",
                        r.volume_id()
                    ),
                    Err(e) => self.complaints().failed(r.volume_id(), "expire", &e),
                }
            }
        }
        let listed: BTreeSet<IndexEntry> = records
            .iter()
            .filter(|r| !expired.contains(r.volume_id()))
            .map(|r| IndexEntry {
                deletion: r.deletion.clone(),
                pending: r.pending && !completed.contains(r.volume_id()),
            })
            .collect();
        let listed_ids: HashSet<&str> = records.iter().map(|r| r.volume_id()).collect();
        let recent_ms = time::to_millis(started).saturating_sub(UNLISTED_GRACE.as_millis() as u64);
        // Against the index as stored, not as last written here: one GET a pass, and an index
        // deleted or rewritten behind this process's back (by hand, a restore) is mended.
        *self.index.lock().unwrap_or_else(|p| p.into_inner()) = None;
        match self.update_index(&self.kube, |index, covers_from| {
            // Rebuilt from the records: what it leaves out is decided again.
            *covers_from = 0;
            let unlisted = index
                .iter()
                .filter(|e| !listed_ids.contains(e.deletion.volume_id.as_str()) && e.deletion.requested_ms >= recent_ms)
                .cloned()
                .collect::<Vec<_>>();
            *index = listed.clone();
            index.extend(unlisted);
        }) {
            Ok(written) => {
                if written {
                    self.unwritten().wrote_at(now_mono);
                }
                self.complaints().cleared("", "index");
            }
            Err(e) => self.complaints().failed("", "index", &e),
        }
        self.complaints()
            .retain(|id| listed_ids.contains(id) || unreadable.contains(id));
        if self.claim_node_sweep(now_mono) {
            match self.sweep_node_objects(now_mono) {
                Ok(()) => self.complaints().cleared("", "node_objects"),
                Err(e) => self.complaints().failed("", "node_objects", &e),
            }
        }
        Ok(())
    }

    /// Writes the index lines DeleteVolume left, if their window has passed. On a failure they
    /// wait for the next window.
    fn write_lines(&self, kube: &Client, now: Instant) {
        if !self.unwritten().claim(now) {
            return;
        }
        match self.update_index(kube, |_, _| {}) {
            Ok(_) => self.complaints().cleared("", "index"),
            Err(e) => self.complaints().failed("", "index", &e),
        }
    }

    /// Waits until `until`, or until lines DeleteVolume left are due; `true` for the latter.
    fn wait_for_lines(&self, until: Instant) -> bool {
        let mut unwritten = self.unwritten();
        loop {
            let now = Instant::now();
            if now >= until {
                return false;
            }
            let wake = if unwritten.lines.is_empty() {
                until
            } else {
                match unwritten.next_write() {
                    Some(at) if at > now => at.min(until),
                    _ => return true,
                }
            };
            unwritten = self
                .line_left
                .wait_timeout(unwritten, wake - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Passes with jitter, and between them the index lines DeleteVolume left, within
    /// `INDEX_COALESCE` of the last write.
    pub fn run(self: Arc<Self>) {
        thread::Builder::new()
            .name("cleanup-controller".into())
            .spawn(move || loop {
                match self.poll_once() {
                    Ok(()) => self.log.ok(),
                    Err(e) => self.log.failed("cleanup pass", &e),
                }
                let next_pass = Instant::now() + jitter(self.cfg.poll_interval);
                while self.wait_for_lines(next_pass) {
                    self.write_lines(&self.kube, Instant::now());
                }
            })
            .expect("spawn cleanup thread");
    }
}

/// Keeps the newest deletions of `entries` within the budget (and the recent ones within the
/// cap); returns them and from when they list every deletion (0: all of it). A deletion left out
/// counts from its request, if nodes could have read it in the index; one never listed there
/// counts from `now_ms`, so every node lists the records once. A `coversFrom` so raised stays
/// while anything is left out: a node that has not polled since must list them too.
fn trim_index(entries: BTreeSet<IndexEntry>, written: &IndexCopy, now_ms: u64) -> (BTreeSet<IndexEntry>, u64) {
    let read: HashSet<&Deletion> = written.entries.iter().map(|e| &e.deletion).collect();
    let mut newest_first: Vec<IndexEntry> = entries.into_iter().collect();
    newest_first.sort_by_key(|e| std::cmp::Reverse(e.deletion.requested_ms));
    let recent_ms = now_ms.saturating_sub(INDEX_RECENT.as_millis() as u64);
    let (mut kept, mut bytes, mut covers_from) = (BTreeSet::new(), 0, 0);
    for e in newest_first {
        bytes += e.line().len();
        let requested = e.deletion.requested_ms;
        let fits = bytes <= INDEX_BUDGET || (requested >= recent_ms && bytes <= INDEX_CAP);
        if fits && covers_from == 0 {
            kept.insert(e);
        } else if read.contains(&e.deletion) || requested < written.covers_from {
            covers_from = covers_from.max(requested + 1);
        } else {
            covers_from = covers_from.max(now_ms);
        }
    }
    // Keeping it costs a polling node nothing: it trusts the index again once it reads it
    // `INDEX_SKEW` later. One ahead of this clock by more (a clock set wrong, an edit) is not kept.
    if covers_from > 0 && written.covers_from <= now_ms.saturating_add(INDEX_SKEW.as_millis() as u64) {
        covers_from = covers_from.max(written.covers_from);
    }
    (kept, covers_from)
}

fn read_index(kube: &Client) -> KubeResult<IndexCopy> {
    match kube.get_configmap(INDEX_NAME) {
        Ok(cm) => Ok(IndexCopy {
            entries: IndexEntry::parse_index(&cm).into_iter().collect(),
            covers_from: IndexEntry::covers_from(&cm),
            resource_version: cm["metadata"]["resourceVersion"].as_str().map(str::to_owned),
        }),
        Err(KubeError::NotFound) => Ok(IndexCopy {
            entries: BTreeSet::new(),
            covers_from: 0,
            resource_version: None,
        }),
        Err(e) => Err(e),
    }
}

impl Deleter for CleanupController {
    fn volume_deleted(&self, id: &str, name: Option<&str>, deadline: Deadline) -> Result<()> {
        self.volume_deleted_at(id, name, deadline, Instant::now())
    }

    fn creation_blocked(&self, id: &str, deadline: Deadline) -> Result<bool> {
        self.pending(id, deadline)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume;

    const HOUR_MS: u64 = 3600 * 1000;

    fn entries(count: usize, newest_ms: u64, apart_ms: u64) -> BTreeSet<IndexEntry> {
        (0..count)
            .map(|k| IndexEntry {
                deletion: Deletion {
                    volume_id: volume::id_for_name(&format!("pvc-{k}")),
                    requested_ms: newest_ms - k as u64 * apart_ms,
                },
                pending: false,
            })
            .collect()
    }

    fn written(entries: &BTreeSet<IndexEntry>, covers_from: u64) -> IndexCopy {
        IndexCopy {
            entries: entries.clone(),
            covers_from,
            resource_version: Some("1".into()),
        }
    }

    #[test]
    fn a_line_left_by_delete_volume_gives_way_to_the_same_or_a_later_request() {
        let index = entries(3, HOUR_MS, 1000);
        let line = |k: usize, requested_ms: u64| IndexEntry {
            deletion: Deletion {
                volume_id: volume::id_for_name(&format!("pvc-{k}")),
                requested_ms,
            },
            pending: true,
        };
        let lines = |l: &[IndexEntry]| {
            l.iter()
                .map(|e| (e.deletion.volume_id.clone(), e.clone()))
                .collect::<BTreeMap<_, _>>()
        };
        // pvc-0 requested again (its tombstone restarted); pvc-1's deletion, which the index (from
        // the records) knows complete; a new pvc-9.
        let (again, joined, new) = (line(0, HOUR_MS + 5), line(1, HOUR_MS - 1000), line(9, HOUR_MS + 9));
        let mut merged = index.clone();
        add_lines(&mut merged, &lines(&[again.clone(), joined, new.clone()]));
        let mut expected: BTreeSet<IndexEntry> = index
            .into_iter()
            .filter(|e| e.deletion.volume_id != again.deletion.volume_id)
            .collect();
        expected.extend([again, new]);
        assert_eq!(merged, expected);
    }

    #[test]
    fn a_small_index_is_kept_whole() {
        let all = entries(100, 24 * HOUR_MS, 60_000);
        let (kept, covers_from) = trim_index(all.clone(), &written(&all, 0), 24 * HOUR_MS);
        assert_eq!((kept, covers_from), (all, 0));
    }

    #[test]
    fn old_deletions_past_the_budget_are_left_out_from_their_request() {
        let now = 24 * HOUR_MS;
        let all = entries(5000, now, 17_280);
        let (kept, covers_from) = trim_index(all.clone(), &written(&all, 0), now);
        let bytes: usize = kept.iter().map(|e| e.line().len()).sum();
        assert!(bytes <= INDEX_BUDGET && bytes > INDEX_BUDGET - 100, "{bytes}");
        let oldest_kept = kept.iter().map(|e| e.deletion.requested_ms).min().unwrap();
        let newest_left_out = all
            .iter()
            .filter(|e| !kept.contains(e))
            .map(|e| e.deletion.requested_ms)
            .max()
            .unwrap();
        assert!(newest_left_out < oldest_kept);
        assert_eq!(covers_from, newest_left_out + 1);
    }

    #[test]
    fn a_burst_stays_listed_until_it_is_old() {
        let now = 24 * HOUR_MS;
        let burst = entries(2000, now, 10);
        let (kept, covers_from) = trim_index(burst.clone(), &written(&burst, 0), now);
        assert_eq!((kept.len(), covers_from), (2000, 0));
        let later = now + INDEX_RECENT.as_millis() as u64 + 1;
        let (kept, covers_from) = trim_index(burst.clone(), &written(&burst, 0), later);
        assert!(kept.len() < 300);
        assert!(covers_from > 0 && covers_from <= now + 1);
    }

    #[test]
    fn a_deletion_left_out_before_any_node_read_it_sends_every_node_to_the_records() {
        let now = 24 * HOUR_MS;
        let all = entries(1000, now - HOUR_MS, 1000);
        let (_, covers_from) = trim_index(all, &written(&BTreeSet::new(), 0), now);
        assert_eq!(covers_from, now);
        // Left out by an earlier write, which sent every node to the records: that stays, for
        // the nodes that have not polled since, while anything is left out.
        let raised = now - 60_000;
        let all = entries(1000, now - HOUR_MS, 1000);
        let (_, covers_from) = trim_index(all.clone(), &written(&BTreeSet::new(), raised), now);
        assert_eq!(covers_from, raised);
        let few = entries(10, now - HOUR_MS, 1000);
        let (_, covers_from) = trim_index(few, &written(&BTreeSet::new(), raised), now);
        assert_eq!(covers_from, 0, "nothing left out");
        // Ahead of this clock by more than the skew allowed: not kept.
        let ahead = now + 2 * INDEX_SKEW.as_millis() as u64;
        let (_, covers_from) = trim_index(all, &written(&BTreeSet::new(), ahead), now);
        assert!(covers_from < now - HOUR_MS + 1);
    }
}
