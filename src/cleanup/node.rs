//! A node's half: deletes local copies of deleted volumes, reports what it finished in its own
//! object, collects orphans.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use log::{debug, info, warn};

use super::record::{node_object_name, CleanupRecord, Deletion, IndexEntry, NodeAcks, INDEX_NAME};
use super::{poll_delay, CleanupConfig, Complaints, INDEX_SKEW, LABEL};
use crate::error::Result;
use crate::kube::{Client, KubeError, KubeResult, QuietLog};
use crate::node::NodeState;
use crate::time;

pub struct NodeCleaner {
    kube: Client,
    node: Arc<NodeState>,
    cfg: CleanupConfig,
    log: QuietLog,
    complaints: Complaints,
    /// Volume ids first seen without a PV, and when.
    orphans: HashMap<String, Instant>,
    last_reconcile: Option<Instant>,
    /// The finished deletions this node's object lists, as last written.
    reported: HashSet<Deletion>,
    /// When (ms) the last pass that read the deletions started; at start, when the last pass
    /// that went through all of them started, as noted in the base dir.
    last_read_ms: Option<u64>,
}

impl NodeCleaner {
    pub fn new(kube: Client, node: Arc<NodeState>, cfg: CleanupConfig) -> NodeCleaner {
        NodeCleaner {
            kube,
            node,
            cfg,
            log: QuietLog::new(),
            complaints: Complaints::default(),
            orphans: HashMap::new(),
            last_reconcile: None,
            reported: HashSet::new(),
            last_read_ms: None,
        }
    }

    /// Every deletion this node has not seen yet, and more: the index, one small object from the
    /// watch cache. The index leaves out old deletions when there are many; a node that may not
    /// have seen those (it never read the index, or not since before they were left out) lists
    /// the records themselves, as it does without an index (a controller of an earlier version).
    fn deletions(&self) -> KubeResult<Vec<IndexEntry>> {
        let trusted = |covers_from: u64| {
            covers_from == 0
                || self
                    .last_read_ms
                    .is_some_and(|last| last >= covers_from.saturating_add(INDEX_SKEW.as_millis() as u64))
        };
        match self.kube.get_configmap_cached(INDEX_NAME) {
            Ok(index) if trusted(IndexEntry::covers_from(&index)) => Ok(IndexEntry::parse_index(&index)),
            Ok(_) | Err(KubeError::NotFound) => {
                debug!("listing the cleanup records: no index, or it leaves out deletions this node may not have seen");
                self.kube
                    .list_configmaps_cached(LABEL, |cm| CleanupRecord::parse(cm).map(|r| r.index_entry()))
            }
            Err(e) => Err(e),
        }
    }

    /// One pass over the deletions; returns how many local copies were deleted. Only a failure
    /// to read the deletions fails the pass; a failure on one volume, on the report or on the
    /// orphan check is logged once, counted, and the rest goes on.
    pub fn poll_once(&mut self) -> KubeResult<usize> {
        self.poll_once_at(Instant::now())
    }

    /// `poll_once` as if the clock read `now`: the orphan schedule and grace follow it, so a
    /// model can run hours of polls in seconds (tests/apiload.rs).
    pub fn poll_once_at(&mut self, now: Instant) -> KubeResult<usize> {
        let started = SystemTime::now();
        let started_ms = time::to_millis(started);
        if self.last_read_ms.is_none() {
            self.last_read_ms = self.node.index_read().map(time::to_millis);
        }
        let deletions = self.deletions()?;
        self.last_read_ms = Some(started_ms);
        self.node.set_deleted(
            deletions
                .iter()
                .map(|e| (e.deletion.volume_id.clone(), e.deletion.requested()))
                .collect(),
        );
        let mut deleted = 0;
        let mut finished = HashSet::new();
        for e in &deletions {
            let id = e.deletion.volume_id.as_str();
            let clean = match self.clean_local(id, Some(e.deletion.requested())) {
                Ok(Some(true)) => {
                    deleted += 1;
                    true
                }
                Ok(Some(false)) => false,
                Ok(None) => true,
                Err(err) => {
                    self.complaints.failed(id, "local_delete", &err);
                    false
                }
            };
            if clean {
                self.complaints.cleared(id, "local_delete");
                if e.pending {
                    finished.insert(e.deletion.clone());
                }
            }
        }
        // Only a pass that went through every deletion counts after a restart: one cut short
        // is read again whole.
        match self.node.note_index_read(started) {
            Ok(()) => self.complaints.cleared("", "note_read"),
            Err(e) => self.complaints.failed("", "note_read", &e),
        }
        if !finished.is_subset(&self.reported) {
            match self.report(&finished) {
                Ok(()) => {
                    debug!("reported {} finished cleanup(s)", finished.len());
                    self.reported = finished;
                    self.complaints.cleared("", "ack");
                }
                Err(e) => self.complaints.failed("", "ack", &e),
            }
        }
        let due = self
            .last_reconcile
            .is_none_or(|t| now.saturating_duration_since(t) >= self.reconcile_interval());
        if due {
            let known: HashSet<&str> = deletions.iter().map(|e| e.deletion.volume_id.as_str()).collect();
            deleted += self.collect_orphans(&known, now);
            self.last_reconcile = Some(now);
        }
        let live: HashSet<&str> = deletions
            .iter()
            .map(|e| e.deletion.volume_id.as_str())
            .chain(self.orphans.keys().map(String::as_str))
            .collect();
        self.complaints.retain(|id| live.contains(id));
        Ok(deleted)
    }

    /// Writes this node's object: the pending deletions it has finished, replacing the last list.
    fn report(&self, finished: &HashSet<Deletion>) -> KubeResult<()> {
        let acks = NodeAcks {
            node: self.cfg.node_name.clone(),
            done: finished.clone(),
        };
        let name = node_object_name(&self.cfg.node_name);
        let patch = serde_json::json!({ "data": acks.data() });
        match self.kube.patch_configmap(&name, &patch) {
            Err(KubeError::NotFound) => match self.kube.create_configmap(&acks.new_object()) {
                // Created meanwhile (a restart of this node's plugin overlapping the old one).
                Err(KubeError::Conflict(_)) => self.kube.patch_configmap(&name, &patch).map(drop),
                other => other.map(drop),
            },
            other => other.map(drop),
        }
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

    /// Whether each candidate still has a PV: copies that know their PV's name ask for it, the
    /// rest share one paginated scan, and a copy the scan finds has the name recorded so later
    /// passes ask for its PV alone. A candidate whose check failed is left out of the answer.
    fn live_pvs(&mut self, candidates: &[String]) -> HashMap<String, bool> {
        let mut live = HashMap::new();
        let mut unnamed = HashSet::new();
        for id in candidates {
            let name = self.node.meta(id).map(|m| m.name).unwrap_or_default();
            if name.is_empty() {
                unnamed.insert(id.clone());
                continue;
            }
            match self.kube.get_pv(&name) {
                Ok(pv) => {
                    live.insert(
                        id.clone(),
                        pv["spec"]["csi"]["volumeHandle"].as_str() == Some(id.as_str()),
                    );
                }
                Err(KubeError::NotFound) => {
                    live.insert(id.clone(), false);
                }
                Err(e) => self.complaints.failed(id, "orphan", &e),
            }
        }
        if !unnamed.is_empty() {
            match self.kube.pv_names(&self.cfg.driver_name, Some(&unnamed)) {
                Ok(names) => {
                    self.complaints.cleared("", "orphan");
                    for (id, name) in &names {
                        match self.node.record_pv_name(id, name) {
                            Ok(true) => debug!("volume {id}: PV {name} recorded"),
                            Ok(false) => {}
                            // Only a cost: the next pass scans for it again.
                            Err(e) => debug!("volume {id}: PV {name} not recorded: {e}"),
                        }
                    }
                    live.extend(unnamed.into_iter().map(|id| {
                        let has = names.contains_key(&id);
                        (id, has)
                    }));
                }
                Err(e) => self.complaints.failed("", "orphan", &e),
            }
        }
        live
    }

    /// Local copies with no cleanup record and no PV: deleted once they stayed so for the grace.
    /// A copy mounted now is in use, so not a candidate, and costs no request: its PV cannot be
    /// deleted while a pod uses its claim, and its deletion would be refused anyway.
    fn collect_orphans(&mut self, known: &HashSet<&str>, now: Instant) -> usize {
        let local = match self.node.local_volumes() {
            Ok(ids) => ids,
            Err(e) => {
                warn!("orphan check: {e}");
                return 0;
            }
        };
        let mut candidates: Vec<String> = local.into_iter().filter(|id| !known.contains(id.as_str())).collect();
        if !candidates.is_empty() {
            match self.node.mounted_copies(&candidates) {
                Ok(mounted) => candidates.retain(|id| !mounted.contains(id)),
                // Every candidate is checked then; deleting still refuses a mounted copy.
                Err(e) => warn!("orphan check: {e}"),
            }
        }
        self.orphans.retain(|id, _| candidates.contains(id));
        if candidates.is_empty() {
            return 0;
        }
        let mut deleted = 0;
        for (id, live) in self.live_pvs(&candidates) {
            self.complaints.cleared(&id, "orphan");
            if live {
                self.orphans.remove(&id);
                continue;
            }
            let first = *self.orphans.entry(id.clone()).or_insert(now);
            let waited = now.saturating_duration_since(first);
            if waited < self.cfg.orphan_grace {
                info!(
                    "volume {id}: no PV and no cleanup record; deleting after {:?} unless one appears",
                    self.cfg.orphan_grace - waited
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
                Err(e) => self.complaints.failed(&id, "orphan", &e),
            }
        }
        deleted
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
